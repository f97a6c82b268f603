//! Graceful drain: SIGTERM on a worker moves its experts to the others first (a new epoch that
//! lists it as draining), then it finishes in-flight work, revokes its lease and exits 0.
//! `expertmesh drain WORKER_ID` does the same from outside. Under steady traffic no request
//! fails, and none even needs a retry: the experts moved before the worker left.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{signal, wait_exit, Cluster, BIN};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_cli_drain_move_experts_before_leaving() {
    let ov = PresetOverrides { hidden: Some(128), ffn: Some(64), ..Default::default() };
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, ov, 81);
    let mut cluster = Cluster::start(dir.path(), 3, &["--lease-ttl-ms", "2000"]);
    let addr = cluster.coordinator.addr.clone();
    wait_status(&addr, Duration::from_secs(30), "epoch 1", |s| s["current_epoch"] == 1);
    let cases = traffic_cases(dir.path(), &spec, 32, 6);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;

    // SIGTERM: w2 asks for a drain, waits for the epoch that moves its experts, then leaves.
    let t = Instant::now();
    signal(&cluster.workers[2], "-TERM");
    let status = wait_exit(&mut cluster.workers[2], Duration::from_secs(30)).expect("w2 exits after SIGTERM");
    println!("w2 drained and exited in {:.2} s: {status}", t.elapsed().as_secs_f64());
    assert!(status.success(), "exit 0 after a drain, got {status}");
    let w2_log = std::fs::read_to_string(&cluster.workers[2].log).unwrap();
    assert!(w2_log.contains("drained: the committed placement moved every expert away"), "{w2_log}");
    assert!(!w2_log.contains("leaving anyway") && !w2_log.contains("cannot revoke"), "{w2_log}");
    let s = wait_status(&addr, Duration::from_secs(30), "w2 gone", |s| s["workers"].as_array().unwrap().len() == 2);
    assert_eq!(s["current_epoch"], 2, "one epoch for the drain, none for the exit: {s}");

    // From outside, as a Kubernetes preStop hook runs it in the worker's container (the id and
    // the coordinator from the worker's environment): it returns once the experts moved; then
    // SIGTERM, as kubelet sends next, finds a drained worker, which leaves.
    let o = std::process::Command::new(BIN)
        .args(["drain", "--until", "moved", "--wait-s", "30"])
        .env("EXPERTMESH_WORKER_ID", "w1")
        .env("EXPERTMESH_COORDINATOR", &addr)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "drain w1: {}{}", out, String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("w1's experts moved away in placement epoch 3") || out.contains("w1 drained and left"),
        "{out}"
    );
    let s = status_json(&addr);
    assert_eq!(s["current_epoch"], 3, "the drain's epoch is committed when the hook returns: {s}");
    signal(&cluster.workers[1], "-TERM");
    let status = wait_exit(&mut cluster.workers[1], Duration::from_secs(10)).expect("w1 exits after its drain");
    assert!(status.success(), "exit 0 after a drain, got {status}");
    let s = status_json(&addr);
    assert_eq!(s["current_epoch"], 3, "{s}");
    let w = s["workers"].as_array().unwrap();
    assert_eq!(w.len(), 1);
    let all = (spec.moe_layers().len() * spec.n_routed) as u64;
    assert_eq!(w[0]["experts_held"], all, "w0 holds every expert now: {s}");

    // Bad input: an unknown worker is named, with the members listed.
    let o = std::process::Command::new(BIN).args(["drain", "nosuch", "--coordinator", &addr]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("no worker `nosuch`") && err.contains("w0"), "{err}");
    // The status reads as words, not as tonic's debug rendering.
    assert!(err.starts_with("error: not found: drain: no worker") && !err.contains("code: '"), "{err}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    let w0_log = std::fs::read_to_string(&cluster.workers[0].log).unwrap_or_default();
    let retried = w0_log.matches("will retry its rows").count();
    println!("{}, destinations retried {retried}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert_eq!(rep.epochs, vec![1, 2, 3]);
    assert_eq!(retried, 0, "a drain moves experts before the worker leaves; nothing should need a retry");
}
