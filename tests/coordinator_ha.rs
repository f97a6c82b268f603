//! Two coordinators elect one leader through etcd; workers register in etcd directly. SIGKILL the
//! leader under traffic: the standby leads within two lease TTLs, serves the same placement, and
//! re-plans when a worker dies. Then both coordinators go down: the workers keep serving, are not
//! restarted, and the restarted coordinators read the same state back from etcd.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{signal, spawn_coordinator, Cluster, Proc};
use common::etcd::Etcd;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

const TTL_MS: u64 = 2000;

fn free_addr() -> String {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_and_workers_outlive_both_coordinators() {
    let etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let ttl = TTL_MS.to_string();
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(96), ..Default::default() }, 71);
    let addrs = [free_addr(), free_addr()];
    let args = |i: usize| -> Vec<&str> { vec!["--listen", &addrs[i], "--store", &store, "--lease-ttl-ms", &ttl] };
    let full = |i: usize| [args(i), vec!["--expect-workers", "3"]].concat();
    let mut cluster = Cluster::coordinator_only(dir.path(), 3, &args(0));
    let logdir = cluster.logs.path().to_path_buf();
    let log = |name: &str| logdir.join(name);
    let mut coords: Vec<Option<Proc>> = vec![None, Some(spawn_coordinator(dir.path(), &full(1), &log("coord-b.log")))];
    for id in ["w0", "w1", "w2"] {
        cluster.add_store_worker(id, &store, &["--lease-ttl-ms", &ttl]);
    }
    let s0 = wait_status(&addrs[0], Duration::from_secs(30), "epoch 1", |s| s["current_epoch"] == 1);
    let s1 = wait_status(&addrs[1], Duration::from_secs(10), "epoch 1 on the standby", |s| s["current_epoch"] == 1);
    let leader = s0["leader"].as_str().unwrap().to_string();
    assert_eq!(s1["leader"], s0["leader"], "both coordinators see the same leader");
    assert_eq!(s0["is_leader"].as_bool().unwrap() as u8 + s1["is_leader"].as_bool().unwrap() as u8, 1, "{s0}\n{s1}");
    let li = addrs.iter().position(|a| *a == leader).expect("leader is one of the two");
    let si = 1 - li;
    println!("leader {leader}, standby {}", addrs[si]);

    let cases = traffic_cases(dir.path(), &spec, 24, 6);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // SIGKILL the leader: its lease expires and the standby takes the key.
    if li == 0 {
        signal(&cluster.coordinator, "-KILL");
    } else {
        signal(coords[1].as_ref().unwrap(), "-KILL");
    }
    let killed = Instant::now();
    let s = wait_status(&addrs[si], Duration::from_secs(30), "standby leading", |s| s["is_leader"] == true);
    let takeover = killed.elapsed();
    println!(
        "standby led {:.2} s after the leader was killed (TTL {:.1} s)",
        takeover.as_secs_f64(),
        TTL_MS as f64 / 1e3
    );
    assert!(takeover < Duration::from_millis(2 * TTL_MS), "takeover took {takeover:?}, more than two TTLs");
    assert_eq!(s["current_epoch"], 1, "the new leader serves the same placement: {s}");
    assert_eq!(s["pending_epoch"], 0, "{s}");
    assert_eq!(s["workers"].as_array().unwrap().len(), 3);

    // The new leader plans: a worker dies, the survivors take its experts (epoch 2).
    let w2 = cluster.worker_index("w2");
    signal(&cluster.workers[w2], "-KILL");
    let s = wait_status(&addrs[si], Duration::from_secs(30), "re-plan without w2", |s| {
        s["current_epoch"] == 2 && s["workers"].as_array().unwrap().len() == 2
    });
    println!("after w2 died: {s}");

    // Both coordinators down: workers keep serving on their own leases.
    if si == 0 {
        signal(&cluster.coordinator, "-KILL");
    } else {
        signal(coords[1].as_ref().unwrap(), "-KILL");
    }
    let both_down = Instant::now();
    tokio::time::sleep(Duration::from_millis(3 * TTL_MS / 2)).await;
    let restarted = Instant::now();
    cluster.coordinator = spawn_coordinator(dir.path(), &full(0), &log("coord-a2.log"));
    coords[1] = Some(spawn_coordinator(dir.path(), &full(1), &log("coord-b2.log")));
    let s = wait_status(&addrs[0], Duration::from_secs(30), "a leader after the restart", |s| {
        !s["leader"].as_str().unwrap_or("").is_empty()
    });
    assert_eq!(s["current_epoch"], 2, "state read back from etcd: {s}");
    assert_eq!(s["pending_epoch"], 0, "no re-plan after the restart: {s}");
    assert_eq!(s["workers"].as_array().unwrap().len(), 2, "{s}");
    for id in ["w0", "w1"] {
        let i = cluster.worker_index(id);
        assert!(cluster.workers[i].child.try_wait().unwrap().is_none(), "{id} kept running (never restarted)");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    let served_while_down = rep.log.iter().filter(|(t, _, _)| *t >= both_down && *t < restarted).count();
    println!("{}; {served_while_down} answered while both coordinators were down", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert_eq!(rep.epochs, vec![1, 2]);
    assert!(served_while_down > 0, "the data plane served while both coordinators were down");
    drop(coords);
}
