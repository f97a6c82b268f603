//! `expertmesh plan` end to end: JSON, the table, the HTML report, bad input, a config.json
//! path, and `--from-cluster` against a real running cluster with measured loads.

mod common;

use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, BIN};
use common::*;
use expertmesh_core::config::{preset_config, PresetOverrides};
use expertmesh_core::dtype::DType;
use serde_json::Value;

fn plan(args: &[&str]) -> Output {
    Command::new(BIN).arg("plan").args(args).output().unwrap()
}

fn plan_json(args: &[&str]) -> Value {
    let o = plan(&[args, &["--json"]].concat());
    assert!(o.status.success(), "plan {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn plan_err(args: &[&str]) -> String {
    let o = plan(args);
    assert!(!o.status.success(), "plan {args:?} should fail; printed {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn plan_json_table_html_and_bad_input() {
    let v = plan_json(&[
        "--model",
        "deepseek-v3",
        "--device",
        "h200",
        "--nodes",
        "2",
        "--batch",
        "256",
        "--context",
        "4096",
    ]);
    let total = v["model"]["params"]["total"].as_f64().unwrap();
    assert!((total - 671e9).abs() / 671e9 < 0.01, "{total}");
    assert_eq!(v["model"]["kv_bytes_per_token"].as_f64().unwrap(), 70_272.0);
    let e = &v["estimate"];
    assert_eq!(e["fits"], true);
    assert_eq!(e["devices"][0]["experts_held"], 58 * 256 / 16);
    assert_eq!(e["layers"].as_array().unwrap().len(), 61);
    assert!(e["step_overlap_s"].as_f64().unwrap() <= e["step_no_overlap_s"].as_f64().unwrap());
    let tps = e["tokens_per_s"].as_f64().unwrap();
    assert!((tps - 256.0 / e["step_overlap_s"].as_f64().unwrap()).abs() < 1e-6 * tps);
    let curve = v["curves"]["h200-sxm"].as_array().unwrap();
    let ys: Vec<f64> = curve.iter().map(|p| p["tokens_per_s"].as_f64().unwrap()).collect();
    assert!(ys.windows(2).all(|w| w[1] >= w[0]), "{ys:?}");

    // The table and the HTML report.
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("plan.html");
    let o = plan(&["--model", "deepseek-v4-flash", "--device", "h200", "--html", html.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in ["Memory per device", "kv cache", "Per layer", "Step:", "Tokens/s:", "Bottleneck:", "moe-hash/window"] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("<svg").count(), 3, "memory, step and node-count charts");
    for want in ["Memory per device (GB)", "Step time (ms)", "Tokens/s against node count"] {
        assert!(page.contains(want), "missing `{want}`");
    }

    // A config.json path plans the same model as its preset.
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, preset_config("deepseek-v4-pro", &PresetOverrides::default()).unwrap().to_string()).unwrap();
    let a = plan_json(&["--model", cfg.to_str().unwrap(), "--device", "b200", "--nodes", "2", "--batch", "64"]);
    let b = plan_json(&["--model", "deepseek-v4-pro", "--device", "b200", "--nodes", "2", "--batch", "64"]);
    assert_eq!(a["model"]["params"], b["model"]["params"]);
    assert_eq!(a["estimate"]["step_overlap_s"], b["estimate"]["step_overlap_s"]);

    // The catalog lists every required device, with sources.
    let o = plan(&["--list-devices"]);
    let list = String::from_utf8_lossy(&o.stdout);
    for d in ["h100-sxm", "h800", "h200-sxm", "b200", "gb200", "ascend-910b", "ascend-910c", "ascend-950", "cpu-2s-spr"]
    {
        assert!(list.contains(d), "catalog lacks {d}");
    }

    // Bad input: each error names what was wrong and what was expected.
    let e = plan_err(&["--device", "h300"]);
    assert!(e.contains("unknown device `h300`") && e.contains("h200-sxm"), "{e}");
    let e = plan_err(&["--model", "deepseek-v9"]);
    assert!(e.contains("neither a file nor a preset") && e.contains("deepseek-v4-pro"), "{e}");
    let e = plan_err(&["--device", "h200", "--attn-tp", "3"]);
    assert!(e.contains("attention TP 3"), "{e}");
    let e = plan_err(&["--phase", "train"]);
    assert!(e.contains("expected prefill or decode"), "{e}");
    let e = plan_err(&["--expert-precision", "fp6"]);
    assert!(e.contains("fp6") && e.contains("fp4, fp8, int8 or bf16"), "{e}");
    // Not fitting is an answer, not an error: the table shows by how much.
    let o = plan(&["--model", "deepseek-v4-pro", "--device", "h200", "--expert-precision", "fp8", "--attn-tp", "8"]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && t.contains("does not fit") && t.contains("141.0 GB") && t.contains("NO"), "{t}");
    let bad = dir.path().join("inv.yaml");
    std::fs::write(&bad, "pools:\n  - {device: h200}\n").unwrap();
    let e = plan_err(&["--inventory", bad.to_str().unwrap()]);
    assert!(e.contains("inv.yaml") && e.contains("nodes"), "{e}");
    let e = plan_err(&["--device", "h200", "--attn-tp", "2", "--attn-dp", "2"]);
    assert!(e.contains("must equal the instance's 8 devices"), "{e}");
}

#[test]
fn plan_search_meets_the_target_with_the_fewest_nodes() {
    let v = plan_json(&[
        "--model",
        "deepseek-v3",
        "--device",
        "h200",
        "--device",
        "910c",
        "--search",
        "--max-nodes",
        "8",
        "--target-tokens-per-s",
        "50000",
        "--max-step-ms",
        "60",
        "--context",
        "4096",
    ]);
    let s = &v["search"];
    let choice = &s["choice"];
    let best = &s["best"];
    assert_eq!(best["fits"], true);
    assert_eq!(best["target"]["met"], true, "{best}");
    assert!(best["cluster_tokens_per_s"].as_f64().unwrap() >= 50_000.0 * 0.99);
    assert!(best["step_overlap_s"].as_f64().unwrap() * 1e3 <= 60.0);
    // Its node count is where that device's curve first reaches the target.
    let pool = choice["pool"].as_str().unwrap();
    let n = choice["total_nodes"].as_u64().unwrap() as usize;
    let curve = s["curves"][pool].as_array().unwrap();
    assert!(curve[n - 1]["tokens_per_s"].as_f64().unwrap() >= 50_000.0);
    if n > 1 {
        assert!(curve[n - 2]["tokens_per_s"].as_f64().unwrap() < 50_000.0);
    }
    assert_eq!(s["per_pool"].as_array().unwrap().len(), 2);
    assert!(s["next_bottleneck"].as_str().unwrap().contains("step:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_from_a_live_cluster_uses_its_workers_and_measured_loads() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 77);
    let mut cluster = Cluster::coordinator_only(dir.path(), 3, &[]);
    for (i, node) in ["n0", "n0", "n1"].iter().enumerate() {
        cluster.add_worker(&format!("w{i}"), &["--node", node, "--memory-gib", "2"]);
    }
    let addr = cluster.coordinator.addr.clone();
    wait_status(&addr, Duration::from_secs(30), "placement committed", |s| s["current_epoch"].as_u64() >= Some(1));

    // Traffic with known totals: every answer is checked against the f64 reference.
    let tokens = 32;
    let cases = traffic_cases(dir.path(), &spec, tokens, 6);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    rep.assert_all_correct(|| cluster.dump_logs());
    let routed = rep.correct * (tokens * spec.top_k) as u64;

    // Workers report loads every second: wait until the plan sees all of them.
    let t = Instant::now();
    let v = loop {
        let a = addr.clone();
        let v =
            tokio::task::spawn_blocking(move || plan_json(&["--from-cluster", &a, "--batch", "4", "--context", "128"]))
                .await
                .unwrap();
        let notes = v["notes"].to_string();
        if notes.contains(&format!("measured expert loads: {routed} routed tokens")) {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "loads never reached {routed}: {notes}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let pools = v["inventory"]["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2, "two nodes: {pools:?}");
    let devices: u64 =
        pools.iter().map(|p| p["nodes"].as_u64().unwrap() * p["devices_per_node"].as_u64().unwrap()).sum();
    assert_eq!(devices, 3);
    assert!((pools[0]["device"]["memory_gb"].as_f64().unwrap() - 2.0 * 1.073_741_824).abs() < 1e-6);
    let e = &v["estimate"];
    assert_eq!(e["placement"]["from_measured_loads"], true);
    assert_eq!(e["placement"]["layers"], spec.moe_layers().len());
    assert_eq!(e["devices_per_instance"], 3);
    assert!(e["model"].as_str().unwrap().contains(&addr));
    // The three workers' token shares add up to the whole.
    let shares: f64 = e["devices"].as_array().unwrap().iter().map(|d| d["token_share"].as_f64().unwrap()).sum();
    assert!(shares > 0.0 && shares <= 1.0 + 1e-9);

    // A cluster that is not there is a clear error.
    drop(cluster);
    let e = plan_err(&["--from-cluster", &addr]);
    assert!(e.contains(&addr), "{e}");
}
