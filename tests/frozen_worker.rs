//! A frozen worker (SIGSTOP 20 s) under steady traffic, with 2 replicas of every expert: its
//! connections stay open and silent. Dispatchers notice the silence after a budget learned from
//! the worker's own answers, hedge its rows to the live replicas (first answer wins), stop
//! sending it rows (for every request, not just the one that noticed), and report it; the
//! leader's health check fails, the worker is planned out; thawed, it registers again and is
//! planned back in. Bar: 0 wrong, 0 hung, no failure (p99 during the fault against steady is printed; `bench --fault` holds the 3x bar).
//! Alone in its test binary so no other test shares the two cores while it measures.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{signal, Cluster};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_costs_requests_a_bounded_delay_with_replicas() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(96), ..Default::default() }, 81);
    let mut cluster = Cluster::coordinator_only(dir.path(), 4, &["--replicas", "2", "--lease-ttl-ms", "3000"]);
    for i in 0..4 {
        cluster.add_worker(&format!("w{i}"), &[]);
    }
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let cases = Arc::new(traffic_cases(dir.path(), &spec, 32, 8));
    // Clients enter through the workers that stay up; 16 streams.
    let deadline = Duration::from_secs(10);
    let client = cluster.moe_failover(&[0, 1, 2], deadline);
    let streams = Streams::start(client, cases, 16, spec.hidden, deadline);
    let warm = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t_fault = Instant::now();
    signal(&cluster.workers[3], "-STOP");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let t_thaw = Instant::now();
    signal(&cluster.workers[3], "-CONT");
    // Thawed, w3 finds its lease gone, registers again and is planned back in.
    let back = wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "w3 planned back in", |s| {
        s["workers"].as_array().unwrap().iter().any(|w| w["worker_id"] == "w3" && w["experts_held"].as_u64() > Some(0))
    });
    println!(
        "w3 planned back in {:.2} s after it thawed (epoch {})",
        t_thaw.elapsed().as_secs_f64(),
        back["current_epoch"]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rep = streams.finish().await;
    let f = FaultFigures::new(&rep, warm, t_fault, t_thaw);
    f.assert_bar(&rep, "SIGSTOP w3 for 20 s, 2 replicas, 16 streams", || cluster.dump_logs());
    // Throughput held up: the three live workers carry the load.
    assert!(f.during_rate > f.steady_rate / 3.0, "answers/s fell from {:.0} to {:.0}", f.steady_rate, f.during_rate);
    assert!(f.longest_gap < Duration::from_secs(3), "no answer for {:?} during the fault", f.longest_gap);
    let w0 = std::fs::read_to_string(&cluster.workers[0].log).unwrap();
    assert!(w0.contains("destination silent past its latency budget"), "the silence was detected by the budget:\n{w0}");
    assert!(alive(&mut cluster.workers[3]), "w3 resumed instead of exiting");
}
