//! `expertmesh bench` runs end to end and prints the JSON its docs describe. Timings are not
//! asserted (tests never fail on timing); what is asserted holds on any machine: the bytes on the
//! wire stay within 5% of the minimum, a killed worker costs no request and moves the epoch, and
//! a frozen worker with replicas costs no request.

mod common;

use common::cluster::BIN;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

fn bench(args: &[&str]) -> serde_json::Value {
    let o = std::process::Command::new(BIN).arg("bench").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "bench {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr).lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bench output is not JSON ({e})"))
}

#[test]
fn throughput_bench_reports_both_paths_and_minimal_wire_bytes() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(128), ..Default::default() }, 91);
    let m = dir.path().display().to_string();
    let out = bench(&["--model", &m, "--workers", "2", "--batches", "1,64", "--iters", "2"]);
    // Decode size: judged by p50 overhead over in-process; larger: by the throughput ratio.
    let d = &out["results"][0];
    assert_eq!(d["tokens_per_batch"], 1);
    assert!(d["p50_overhead_ms"].is_f64() && d["target"]["p50_overhead_ms_at_most"] == 1.0, "{out}");
    assert!(d["target"]["met"].is_boolean(), "{out}");
    let r = &out["results"][1];
    assert_eq!(r["tokens_per_batch"], 64);
    assert!(r["target"]["throughput_ratio_at_least"] == 0.9 && r["target"]["met"].is_boolean(), "{out}");
    assert!(r["distributed"]["tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    assert!(r["in_process"]["tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    let wire = r["wire_ratio"].as_f64().unwrap();
    assert!((1.0..=1.05).contains(&wire), "wire bytes / minimum = {wire}");
}

#[test]
fn fault_bench_kill_worker_loses_nothing_and_replans() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(128), ..Default::default() }, 92);
    let m = dir.path().display().to_string();
    let out = bench(&[
        "--model",
        &m,
        "--fault",
        "kill-worker",
        "--workers",
        "3",
        "--batches",
        "32",
        "--steady-s",
        "1",
        "--lease-ttl-ms",
        "1500",
    ]);
    println!("{out}");
    assert_eq!(out["benchmark"], "fault");
    assert_eq!(out["failed"], 0, "{out}");
    assert!(out["epochs"]["after"].as_u64() > out["epochs"]["before"].as_u64(), "{out}");
    assert!(out["interruption_s"].as_f64().is_some(), "an affected request was answered after the fault: {out}");
    for w in ["before", "during", "after"] {
        assert!(out[w]["answered"].as_u64().unwrap() > 0, "answers {w} the fault: {out}");
    }
}

#[test]
fn fault_bench_stop_worker_with_replicas_loses_nothing() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(128), ..Default::default() }, 93);
    let m = dir.path().display().to_string();
    let out = bench(&[
        "--model",
        &m,
        "--fault",
        "stop-worker",
        "--replicas",
        "2",
        "--workers",
        "3",
        "--batches",
        "32",
        "--steady-s",
        "1",
        "--outage-s",
        "3",
        "--lease-ttl-ms",
        "1500",
    ]);
    println!("{out}");
    assert_eq!(out["fault"], "StopWorker");
    assert_eq!(out["failed"], 0, "{out}");
    assert!(out["recovery_s"].as_f64().unwrap() >= 3.0, "recovery counts from SIGSTOP to SIGCONT: {out}");
    assert!(out["dispatcher"]["hedges"].as_u64().is_some(), "{out}");
    for w in ["before", "during", "after"] {
        assert!(out[w]["answered"].as_u64().unwrap() > 0, "answers {w} the fault: {out}");
    }
}
