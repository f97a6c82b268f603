//! gRPC health tells the truth: a worker is NOT_SERVING until a committed placement places it
//! and again while it drains; a coordinator is NOT_SERVING while it cannot reach its store,
//! and only the leader reports the leader service SERVING.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{spawn, wait_exit, Cluster};
use common::etcd::Etcd;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_proto::{COORDINATOR_SERVICE, EXPERT_SERVICE, LEADER_SERVICE, LIVE_SERVICE, MOE_LAYER_SERVICE};
use tonic_health::ServingStatus::{self, NotServing, Serving};

async fn status(addr: &str, service: &str) -> Option<ServingStatus> {
    let plain = expertmesh_trust::Expect::AnyServer;
    expertmesh_proto::health_status(addr, service, Duration::from_secs(2), None, plain).await.ok()
}

/// Wait (bounded) until `addr` reports `want` for `service`.
async fn until(addr: &str, service: &str, want: ServingStatus, limit: Duration, logs: &dyn Fn() -> String) {
    let t = Instant::now();
    loop {
        let s = status(addr, service).await;
        if s == Some(want) {
            return;
        }
        assert!(t.elapsed() < limit, "{addr} `{service}`: {s:?}, waited for {want:?}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_only_once_placed_and_stops_while_draining() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 81);
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &[]);
    let http = free_port();
    cluster.add_worker("w0", &["--metrics-listen", &format!("127.0.0.1:{http}")]);
    let w0 = cluster.workers[0].addr.clone();
    // Waiting for a second worker: no placement, so nothing is served yet; but it answers.
    for _ in 0..10 {
        for s in ["", EXPERT_SERVICE, MOE_LAYER_SERVICE] {
            assert_eq!(status(&w0, s).await, Some(NotServing), "`{s}` before any placement");
        }
        assert_eq!(status(&w0, LIVE_SERVICE).await, Some(Serving), "alive all along");
        // The same over HTTP, where Kubernetes probes look.
        for path in ["/readyz", "/health/expertmesh.v1.MoeLayer"] {
            assert_eq!(get(http, path), ("HTTP/1.1 503 Service Unavailable".into(), "NOT_SERVING\n".into()), "{path}");
        }
        assert_eq!(get(http, "/livez").0, "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = cluster.coordinator.addr.clone();
    // `status` says what the cluster waits for, and who the worker is.
    let v = status_json(&c);
    assert_eq!((v["expect_workers"].as_u64(), v["current_epoch"].as_u64()), (Some(2), Some(0)), "{v}");
    let w = &v["workers"][0];
    assert_eq!(w["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert!(w["uptime_s"].as_u64().is_some_and(|u| u < 120), "{v}");
    let out = std::process::Command::new(common::cluster::BIN).args(["status", "--coordinator", &c]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no placement yet: waiting for 2 workers (1 registered)") && text.contains("version "),
        "{text}"
    );
    assert_eq!(status(&c, "").await, Some(Serving));
    assert_eq!(status(&c, COORDINATOR_SERVICE).await, Some(Serving));
    let none = || String::new();
    until(&c, LEADER_SERVICE, Serving, Duration::from_secs(10), &none).await;
    cluster.add_worker("w1", &[]);
    let w1 = cluster.workers[1].addr.clone();
    let logs = || cluster.dump_logs();
    for w in [&w0, &w1] {
        for s in ["", EXPERT_SERVICE, MOE_LAYER_SERVICE] {
            until(w, s, Serving, Duration::from_secs(30), &logs).await;
        }
    }
    assert_eq!(get(http, "/readyz"), ("HTTP/1.1 200 OK".into(), "SERVING\n".into()));
    let text = std::fs::read_to_string(&cluster.workers[0].log).unwrap();
    assert!(text.contains("experts loaded; ready") && text.contains("mib_per_s="), "{text}");
    // Drain w1 from outside: it reports NOT_SERVING while its experts move, then leaves.
    let out = std::process::Command::new(common::cluster::BIN)
        .args(["drain", "w1", "--coordinator", &c, "--wait-s", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until(&w1, EXPERT_SERVICE, NotServing, Duration::from_secs(20), &logs).await;
    assert_eq!(status(&w0, EXPERT_SERVICE).await, Some(Serving), "w0 serves on");
    let i = cluster.worker_index("w1");
    assert!(
        wait_exit(&mut cluster.workers[i], Duration::from_secs(30)).is_some(),
        "w1 leaves\n{}",
        cluster.dump_logs()
    );
    let text = std::fs::read_to_string(&cluster.workers[i].log).unwrap();
    assert!(text.contains("health: NOT_SERVING") && text.contains("draining"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_reports_its_store_and_its_leadership() {
    let mut etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 82);
    let logs = tempfile::tempdir().unwrap();
    let m = dir.path().display().to_string();
    let a = ["coordinator", "--model", &m, "--listen", "127.0.0.1:0", "--store", &store, "--lease-ttl-ms", "1500"];
    let first = spawn(&a, "EXPERTMESH_COORDINATOR_READY", &logs.path().join("c1.log"));
    let dump = || std::fs::read_to_string(logs.path().join("c1.log")).unwrap_or_default();
    until(&first.addr, LEADER_SERVICE, Serving, Duration::from_secs(20), &dump).await;
    let second = spawn(&a, "EXPERTMESH_COORDINATOR_READY", &logs.path().join("c2.log"));
    until(&second.addr, "", Serving, Duration::from_secs(20), &dump).await;
    for _ in 0..5 {
        assert_eq!(status(&second.addr, LEADER_SERVICE).await, Some(NotServing), "the standby does not lead");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The store goes away: both say so; it comes back: both serve again.
    etcd.kill();
    for c in [&first.addr, &second.addr] {
        until(c, "", NotServing, Duration::from_secs(15), &dump).await;
        until(c, COORDINATOR_SERVICE, NotServing, Duration::from_secs(5), &dump).await;
        until(c, LEADER_SERVICE, NotServing, Duration::from_secs(5), &dump).await;
        assert_eq!(status(c, LIVE_SERVICE).await, Some(Serving), "alive without its store");
    }
    etcd.restart();
    for c in [&first.addr, &second.addr] {
        until(c, "", Serving, Duration::from_secs(30), &dump).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_that_comes_back_with_its_id_rejoins() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 83);
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &[]);
    cluster.add_worker("w0", &[]);
    cluster.add_worker("w1", &[]);
    let logs = || cluster.dump_logs();
    let w1 = cluster.workers[1].addr.clone();
    until(&w1, EXPERT_SERVICE, Serving, Duration::from_secs(30), &logs).await;
    let c = cluster.coordinator.addr.clone();
    let out = std::process::Command::new(common::cluster::BIN)
        .args(["drain", "w1", "--coordinator", &c, "--wait-s", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let i = cluster.worker_index("w1");
    assert!(wait_exit(&mut cluster.workers[i], Duration::from_secs(30)).is_some(), "w1 leaves");
    // The same id comes back (a StatefulSet restarting its pod): it is placed again and stays.
    cluster.workers.remove(i);
    cluster.add_worker("w1", &[]);
    let w1 = cluster.workers.last().unwrap().addr.clone();
    let logs = || cluster.dump_logs();
    until(&w1, EXPERT_SERVICE, Serving, Duration::from_secs(30), &logs).await;
    std::thread::sleep(Duration::from_secs(2));
    let j = cluster.worker_index("w1");
    assert!(alive(&mut cluster.workers[j]), "w1 stays\n{}", cluster.dump_logs());
    let v = status_json(&c);
    let held =
        v["workers"].as_array().unwrap().iter().find(|w| w["worker_id"] == "w1").unwrap()["experts_held"].clone();
    assert!(held.as_u64().unwrap() > 0, "{v}");
    // An unchanged member is announced once, not on every resync.
    let text = std::fs::read_to_string(&cluster.coordinator.log).unwrap();
    assert_eq!(text.matches("worker joined").count(), 3, "w0, w1, and w1 again:\n{text}");
}

#[test]
fn a_worker_whose_coordinator_stays_away_says_so_and_exits_after_its_deadline() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let t = Instant::now();
    let out = std::process::Command::new(common::cluster::BIN)
        .args(["worker", "--coordinator", &dead, "--id", "w9", "--control-wait-ms", "4000"])
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("control plane unreachable after 4s") && err.contains(&dead), "{err}");
    assert!(took < Duration::from_secs(20), "gave up after {took:?}");
    // Said plainly, not once per try: one line for the outage (then one every 30 s).
    assert_eq!(err.matches("cannot reach the control plane").count(), 1, "{err}");
}
