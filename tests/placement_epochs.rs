//! Workers follow placement epochs without dropping a token: a worker joins and another leaves
//! (SIGTERM) under steady traffic; every request is answered, and answered correctly.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_graceful_leave_under_traffic_lose_nothing() {
    let ov = PresetOverrides { hidden: Some(128), ffn: Some(64), ..Default::default() };
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, ov, 21);
    let mut cluster = Cluster::start(dir.path(), 2, &["--lease-ttl-ms", "2000"]);
    let cases = traffic_cases(dir.path(), &spec, 48, 6);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A third worker joins: epoch 2 spreads experts over three workers.
    cluster.add_worker("w2", &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // w1 leaves gracefully: it deregisters, the coordinator re-plans without it (epoch 3).
    let pid = cluster.workers[1].child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = cluster.workers[1].child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "w1 did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "w1 exits 0 on SIGTERM, got {status}");
    while status_json(&cluster.coordinator.addr)["current_epoch"].as_u64() < Some(3) {
        assert!(t.elapsed() < Duration::from_secs(30), "epoch 3 not committed\n{}", cluster.dump_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    let w0_log = std::fs::read_to_string(&cluster.workers[0].log).unwrap_or_default();
    let retried = w0_log.matches("will retry its rows").count();
    println!("{}, destinations retried {retried}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert!(rep.epochs.first() == Some(&1) && rep.epochs.last() == Some(&3), "epochs {:?}", rep.epochs);
}
