//! A bounded chaos run: a real etcd, two coordinators electing a leader, four workers registered
//! in etcd with two replicas of every expert, six client streams entering through any worker
//! (MoeLayer.Forward is idempotent: a client whose entry dies retries on the next). For 60 s,
//! workers are SIGKILLed and started again on the same address, and the leading coordinator is
//! SIGKILLed and started again, on a seeded schedule. Bar: no wrong answer, no call outliving its
//! deadline, and every failure a clear error naming what could not be done.
//! Alone in its test binary: it takes the whole machine for a minute.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{signal, spawn, spawn_coordinator, Cluster, Proc};
use common::etcd::Etcd;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_core::rng::SplitMix64;

const TTL_MS: &str = "2000";

fn free_addr() -> String {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

fn start_worker(id: &str, addr: &str, store: &str, logs: &std::path::Path, n: usize) -> Proc {
    let log = logs.join(format!("{id}-{n}.log"));
    spawn(
        &["worker", "--store", store, "--listen", addr, "--id", id, "--lease-ttl-ms", TTL_MS],
        "EXPERTMESH_WORKER_READY",
        &log,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run_nothing_wrong_nothing_hung() {
    let etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(96), ..Default::default() }, 99);
    let caddrs = [free_addr(), free_addr()];
    let cargs = |i: usize| -> Vec<&str> {
        vec!["--listen", &caddrs[i], "--store", &store, "--lease-ttl-ms", TTL_MS, "--replicas", "2"]
    };
    let cluster = Cluster::coordinator_only(dir.path(), 4, &cargs(0));
    let logs = cluster.logs.path().to_path_buf();
    let mut coords: Vec<Proc> = vec![cluster.coordinator];
    let full1 = [cargs(1), vec!["--expect-workers", "4"]].concat();
    coords.push(spawn_coordinator(dir.path(), &full1, &logs.join("coord-1-0.log")));
    let ids = ["w0", "w1", "w2", "w3"];
    let waddrs: Vec<String> = ids.iter().map(|_| free_addr()).collect();
    let mut workers: Vec<Proc> = ids.iter().zip(&waddrs).map(|(id, a)| start_worker(id, a, &store, &logs, 0)).collect();
    wait_status(&caddrs.join(","), Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);

    let cases = Arc::new(traffic_cases(dir.path(), &spec, 24, 8));
    let deadline = Duration::from_secs(15);
    let client = Arc::new(expertmesh_worker::client::MoeClient::new(&waddrs, deadline, 256 << 20, None).unwrap());
    let streams = Streams::start(client, cases, 6, spec.hidden, deadline);

    // The schedule: a worker killed every 7 s and started again 2.5 s later (one down at a
    // time, so two replicas leave a live owner of every expert); the leader killed at 26 s and
    // started again 3 s later.
    let mut rng = SplitMix64::new(2026);
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let mut restarts = [0usize; 4];
    let mut events = Vec::new();
    for (k, when) in [5.0, 12.0, 19.0, 33.0, 40.0, 47.0, 54.0].into_iter().enumerate() {
        tokio::time::sleep_until(at(when).into()).await;
        let i = rng.below(4) as usize;
        signal(&workers[i], "-KILL");
        let _ = workers[i].child.wait();
        events.push(format!("{:.1}s kill {}", t0.elapsed().as_secs_f64(), ids[i]));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        restarts[i] += 1;
        workers[i] = start_worker(ids[i], &waddrs[i], &store, &logs, restarts[i]);
        events.push(format!("{:.1}s {} back", t0.elapsed().as_secs_f64(), ids[i]));
        if k == 2 {
            tokio::time::sleep_until(at(26.0).into()).await;
            let s = try_status(&caddrs.join(",")).expect("a coordinator answers");
            let leader = s["leader"].as_str().unwrap_or_default().to_string();
            let li = caddrs.iter().position(|a| *a == leader).expect("a leader");
            signal(&coords[li], "-KILL");
            let _ = coords[li].child.wait();
            events.push(format!("{:.1}s kill leader {leader}", t0.elapsed().as_secs_f64()));
            tokio::time::sleep(Duration::from_secs(3)).await;
            coords[li] = spawn_coordinator(dir.path(), &cargs(li), &logs.join(format!("coord-{li}-1.log")));
            events.push(format!("{:.1}s coordinator {} back", t0.elapsed().as_secs_f64(), caddrs[li]));
        }
    }
    tokio::time::sleep_until(at(60.0).into()).await;
    let rep = streams.finish().await;
    let mut by_code = std::collections::BTreeMap::new();
    for c in &rep.failure_codes {
        *by_code.entry(format!("{c:?}")).or_insert(0) += 1;
    }
    let status = try_status(&caddrs.join(",")).unwrap_or_default();
    println!("chaos events: {events:?}");
    println!(
        "chaos, 60 s: requests sent {}, answered correctly {}, wrong {}, hung {}, failed {} {by_code:?}; slowest call {:?}; epochs {:?}; final epoch {}",
        rep.sent,
        rep.correct,
        rep.wrong,
        rep.hung,
        rep.failures.len(),
        rep.max_latency,
        rep.epochs,
        status["current_epoch"]
    );
    let dump = || {
        let mut s = String::new();
        for e in std::fs::read_dir(&logs).unwrap().flatten() {
            s.push_str(&format!(
                "--- {}\n{}\n",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            ));
        }
        s
    };
    assert_eq!(rep.wrong, 0, "{:#?}", rep.failures);
    assert_eq!(rep.hung, 0, "{:#?}", rep.failures);
    for f in &rep.failures {
        let clear =
            (f.contains("layer") && f.contains("experts")) || f.contains("tried entry workers") || f.contains("--max-");
        assert!(clear, "a failure that does not say what could not be done: {f}\n{}", dump());
    }
    assert!(rep.correct > 500, "traffic flowed: {}", rep.summary());
    for (i, w) in workers.iter_mut().enumerate() {
        assert!(alive(w), "{} is running at the end", ids[i]);
    }
    assert!(status["workers"].as_array().is_some_and(|w| w.len() == 4), "every worker is a member again: {status}");
}
