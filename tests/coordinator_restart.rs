//! The coordinator holds no state that is not in the metadata store: SIGKILL it under traffic and
//! start another. With etcd the new one resumes the same placement epoch without re-planning;
//! with the embedded store it re-plans at a higher epoch. The data plane serves throughout and
//! every answer is correct.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::Cluster;
use common::etcd::Etcd;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

async fn restart_under_traffic(store: &str) -> (TrafficReport, serde_json::Value) {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(96), ..Default::default() }, 51);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", listen.as_str(), "--store", store, "--lease-ttl-ms", "3000"];
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &args);
    cluster.add_worker("w0", &[]);
    cluster.add_worker("w1", &[]);
    let cases = traffic_cases(dir.path(), &spec, 32, 6);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = status_json(&cluster.coordinator.addr);
    assert_eq!(before["current_epoch"], 1, "{before}");
    cluster.restart_coordinator(dir.path(), 2, &args);
    // Longer than the lease TTL: leases must be kept alive through the new coordinator.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let after = status_json(&cluster.coordinator.addr);
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    println!("{store}: {}; after restart: {after}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert_eq!(after["workers"].as_array().unwrap().len(), 2, "{after}");
    (rep, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_backed_coordinator_resumes_the_same_epoch() {
    let etcd = Etcd::start();
    let (rep, after) = restart_under_traffic(&format!("etcd://{}", etcd.endpoint())).await;
    assert_eq!(after["current_epoch"], 1, "resumed from etcd without re-planning: {after}");
    assert_eq!(after["pending_epoch"], 0);
    assert_eq!(rep.epochs, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_coordinator_replans_above_every_seen_epoch() {
    let (rep, after) = restart_under_traffic("embedded").await;
    let epoch = after["current_epoch"].as_u64().unwrap();
    assert!(epoch >= 2, "a coordinator that lost its state must not reuse epoch 1: {after}");
    assert_eq!(rep.epochs.first(), Some(&1));
}
