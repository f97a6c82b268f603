//! Live rebalancing: under skewed traffic the leader sees the imbalance in the workers' load
//! reports, proposes a placement that replicates the hot experts (the epoch protocol loads,
//! switches and frees), and every answer during and after the switch is correct. `placement
//! show` reports the plan, the load per worker and the imbalance.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, BIN};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_load_is_rebalanced_under_traffic_with_every_answer_correct() {
    let ov = PresetOverrides { experts: Some(32), top_k: Some(2), layers: Some(2), ..Default::default() };
    let (dir, spec) = gen_model("tiny-mixtral", DType::BF16, ov, 131);
    let flags = [
        "--redundant-experts",
        "8",
        "--rebalance-threshold",
        "1.2",
        "--rebalance-interval-s",
        "3",
        "--rebalance-min-tokens",
        "1000",
    ];
    let http = free_port();
    let listen = format!("127.0.0.1:{http}");
    let flags = [&flags[..], &["--metrics-listen", &listen]].concat();
    let mut cluster = Cluster::coordinator_only(dir.path(), 4, &flags);
    for i in 0..4 {
        cluster.add_worker(&format!("w{i}"), &[]);
    }
    let addr = cluster.coordinator.addr.clone();
    wait_status(&addr, Duration::from_secs(60), "epoch 1", |s| s["current_epoch"] == 1);
    // Uniform loads at first: the first plan gives the 8 redundant slots to some experts, with
    // even shares.
    let hot = [3usize, 17, 29];
    let cases = skewed_cases(dir.path(), &spec, 24, 12, &hot, 0.85);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());

    // The skew shows in the window, and the leader rebalances.
    let t = Instant::now();
    let before = wait_status(&addr, Duration::from_secs(30), "imbalance measured", |s| {
        s["imbalance"].as_f64().is_some_and(|x| x > 0.0) && s["window_tokens"].as_f64().unwrap_or(0.0) > 1000.0
    });
    let imb_before = before["imbalance"].as_f64().unwrap();
    println!("imbalance before: {imb_before:.3}");
    assert!(imb_before > 1.2, "the skewed traffic must unbalance the first plan: {before}");
    let after = wait_status(&addr, Duration::from_secs(60), "a rebalance committed", |s| {
        s["rebalances"].as_u64().unwrap_or(0) >= 1
            && s["current_epoch"].as_u64().unwrap_or(0) >= 2
            && s["pending_epoch"] == 0
    });
    println!("rebalanced after {:.1} s: epoch {}", t.elapsed().as_secs_f64(), after["current_epoch"]);
    let log = std::fs::read_to_string(cluster.logs.path().join("coordinator.log")).unwrap();
    assert!(log.contains("rebalancing expert placement"), "{log}");
    // The hot experts have replicas now, with shares.
    let o =
        std::process::Command::new(BIN).args(["placement", "show", "--json", "--coordinator", &addr]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let show: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let hottest = &show["hottest"][0];
    assert!(hot.contains(&(hottest["expert"].as_u64().unwrap() as usize)), "{show}");
    let reps = hottest["replicas"].as_array().unwrap();
    assert!(reps.len() >= 2, "the hottest expert is replicated: {show}");
    let shares: f64 = reps.iter().map(|r| r["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-3, "{show}");
    assert_eq!(show["workers"].as_array().unwrap().len(), 4);
    // Once the window holds only traffic routed by the new plan, the imbalance is lower.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = status_json(&addr);
    let imb_after = s["imbalance"].as_f64().unwrap();
    println!("imbalance after: {imb_after:.3}");
    assert!(imb_after < imb_before * 0.85, "{imb_before} -> {imb_after}: {s}");
    let (_, metrics) = get(http, "/metrics");
    let sample = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}:\n{metrics}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    assert!(sample("expertmesh_rebalances_total") >= 1.0, "{metrics}");
    let gauge = sample("expertmesh_placement_imbalance");
    assert!(gauge > 0.0 && gauge < imb_before, "{gauge}: {metrics}");
    let o = std::process::Command::new(BIN).args(["placement", "show", "--coordinator", &addr]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("imbalance") && text.contains("hottest experts:") && text.contains("w3"), "{text}");

    stop.store(true, Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    println!("{}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert!(rep.epochs.len() >= 2, "traffic ran across the switch: {:?}", rep.epochs);
}
