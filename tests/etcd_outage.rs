//! etcd stopped for 30 s under traffic: the data plane keeps serving on the last placement, no
//! worker is expired, and when etcd returns everything reconciles without restarting anything.
//! One worker goes through the coordinator, the other is registered in etcd directly; both
//! watches resume, so the next epoch (a worker joining after the outage) reaches both.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::etcd::Etcd;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_serving_and_reconciles() {
    let mut etcd = Etcd::start();
    let (dir, spec) = gen_model("tiny-v4", DType::BF16, PresetOverrides::default(), 61);
    let store = format!("etcd://{}", etcd.endpoint());
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &["--store", &store, "--lease-ttl-ms", "3000"]);
    cluster.add_worker("w0", &[]);
    cluster.add_store_worker("w1", &store, &["--lease-ttl-ms", "3000"]);
    let cases = traffic_cases(dir.path(), &spec, 24, 5);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(status_json(&cluster.coordinator.addr)["current_epoch"], 1);

    etcd.kill();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = status_json(&cluster.coordinator.addr);
    etcd.restart();
    println!("etcd down for {:.1} s", outage.elapsed().as_secs_f64());
    // Reconciled: leases renewed in etcd, same members, same epoch.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = status_json(&cluster.coordinator.addr);
    // Membership changes resume: a worker joins, and epoch 2 reaches both watchers.
    cluster.add_store_worker("w2", &store, &["--lease-ttl-ms", "3000"]);
    let t = Instant::now();
    while status_json(&cluster.coordinator.addr)["current_epoch"] != 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "epoch 2 after the outage\n{}", cluster.dump_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    println!("{}; after: {after}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert_eq!(rep.epochs, vec![1, 2], "served on the last placement throughout, then the next one");
    let served_down =
        rep.log.iter().filter(|(t, _, _)| *t > outage && t.duration_since(outage) < Duration::from_secs(30)).count();
    assert!(served_down > 0, "answers while etcd was down");
    for w in ["w0", "w1"] {
        let log = std::fs::read_to_string(&cluster.workers[cluster.worker_index(w)].log).unwrap();
        assert!(log.contains("placement committed worker=") && log.contains("epoch=2"), "{w} followed epoch 2:\n{log}");
    }
    for s in [&during, &after] {
        assert_eq!(s["workers"].as_array().unwrap().len(), 2, "no worker expired: {s}");
        assert_eq!(s["current_epoch"], 1, "{s}");
    }
    // The worker keys are back under live leases in etcd.
    let st = expertmesh_cluster::store::open_store(&store, None).await.unwrap();
    let (workers, _) = st.list("/expertmesh/default/workers/").await.unwrap();
    assert_eq!(workers.len(), 3);
    for w in workers {
        assert!(st.keep_alive(w.lease).await.unwrap(), "lease of {} renewed after the outage", w.key);
    }
}
