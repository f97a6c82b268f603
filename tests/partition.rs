//! A worker cut off the network: it runs in a network namespace of the test's own, joined by a
//! veth pair, and the link goes down for 15 s, so packets either way vanish without an answer (no
//! reset, no refusal) as in a real partition. Under steady traffic with 2 replicas the bar is
//! the frozen worker's: 0 wrong, 0 hung, no failure (p99 during the partition against steady is printed; `bench --fault` holds the 3x bar).
//! Healed, the worker finds its lease gone, registers again and is planned back in.
//! Needs root and iproute2 (CI runs as root; `make test` installs iproute2).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{spawn_command, Cluster, BIN};
use common::netns::NetNs;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_worker_costs_requests_a_bounded_delay_with_replicas() {
    let ns = NetNs::create();
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(96), ..Default::default() }, 83);
    // The coordinator listens on every address: host workers reach it on loopback, the
    // namespace's worker over the link.
    let mut cluster = Cluster::coordinator_only(
        dir.path(),
        4,
        &["--listen", "0.0.0.0:0", "--replicas", "2", "--lease-ttl-ms", "3000"],
    );
    let port = cluster.coordinator.addr.rsplit(':').next().unwrap().to_string();
    for i in 0..3 {
        cluster.add_worker(&format!("w{i}"), &[]);
    }
    let mut cmd = ns.command(BIN);
    let coord = format!("{}:{port}", ns.host_ip);
    let listen = format!("{}:0", ns.ns_ip);
    cmd.args(["worker", "--coordinator", &coord, "--listen", &listen, "--id", "w3", "--model"]).arg(dir.path());
    let w3 = spawn_command(cmd, "EXPERTMESH_WORKER_READY", &cluster.logs.path().join("w3.log"));
    cluster.workers.push(w3);
    let status =
        wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let w3_addr = &cluster.workers[3].addr;
    assert!(w3_addr.starts_with(&ns.ns_ip), "w3 serves inside the namespace: {w3_addr}; {status}");
    let cases = Arc::new(traffic_cases(dir.path(), &spec, 32, 8));
    let deadline = Duration::from_secs(10);
    let client = cluster.moe_failover(&[0, 1, 2], deadline);
    let streams = Streams::start(client, cases, 16, spec.hidden, deadline);
    let warm = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // w3 must have carried rows before the cut, or the test proves nothing.
    let before = status_json(&cluster.coordinator.addr);
    let w3_rows = |s: &serde_json::Value| {
        s["workers"].as_array().unwrap().iter().find(|w| w["worker_id"] == "w3").map(|w| w["tokens_total"].as_u64())
    };
    assert!(w3_rows(&before).flatten() > Some(0), "w3 computed rows before the partition: {before}");
    let t_cut = Instant::now();
    ns.cut();
    let out = wait_status(&cluster.coordinator.addr, Duration::from_secs(15), "w3 planned out", |s| {
        s["workers"].as_array().unwrap().iter().all(|w| w["worker_id"] != "w3")
    });
    println!("w3 removed {:.2} s after the cut (epoch {})", t_cut.elapsed().as_secs_f64(), out["current_epoch"]);
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(t_cut.elapsed())).await;
    let t_heal = Instant::now();
    ns.heal();
    let back = wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "w3 planned back in", |s| {
        s["workers"].as_array().unwrap().iter().any(|w| w["worker_id"] == "w3" && w["experts_held"].as_u64() > Some(0))
    });
    println!(
        "w3 planned back in {:.2} s after the link came back (epoch {})",
        t_heal.elapsed().as_secs_f64(),
        back["current_epoch"]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rep = streams.finish().await;
    let f = FaultFigures::new(&rep, warm, t_cut, t_heal);
    f.assert_bar(&rep, "w3 partitioned for 15 s, 2 replicas, 16 streams", || cluster.dump_logs());
    assert!(f.longest_gap < Duration::from_secs(3), "no answer for {:?} during the partition", f.longest_gap);
    let w3_log = std::fs::read_to_string(&cluster.workers[3].log).unwrap();
    assert!(w3_log.contains("registered again; serving on"), "w3 came back by registering again:\n{w3_log}");
}
