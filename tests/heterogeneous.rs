//! Workers measure their devices at start and placement weights them by what they measured:
//! a probe on the worker's own backend gives its throughput, the device its memory; an
//! operator's `--tflops` overrides the probe. A device this build has no backend for is refused
//! with a message naming what to build.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, BIN};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

fn worker<'a>(status: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    status["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["worker_id"] == id))
        .unwrap_or_else(|| panic!("{id} not in status {status}"))
}

#[test]
fn placement_follows_measured_and_declared_throughput() {
    let ov = PresetOverrides { hidden: Some(64), ffn: Some(32), experts: Some(64), ..Default::default() };
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, ov, 5);
    let mut cluster = Cluster::coordinator_only(dir.path(), 3, &[]);
    cluster.add_worker("probed", &[]);
    cluster.add_worker("fast", &["--tflops", "4"]);
    cluster.add_worker("slow", &["--tflops", "1"]);
    let s = wait_status(&cluster.coordinator.addr, Duration::from_secs(60), "epoch 1 committed", |s| {
        s["current_epoch"].as_u64() >= Some(1)
    });

    let probed = &worker(&s, "probed")["devices"][0];
    assert_eq!(probed["kind"], "cpu", "{probed}");
    assert_eq!(probed["tflops_measured"], true, "{probed}");
    let tf = probed["tflops"].as_f64().unwrap();
    // Any CPU this runs on does a bf16 FFN between 1 GFLOP/s and 100 TFLOP/s.
    assert!(tf > 1e-3 && tf < 100.0, "probed throughput {tf} TFLOP/s");
    assert!(probed["name"].as_str().unwrap().starts_with("cpu ("), "{probed}");
    let total = probed["memory_total_bytes"].as_u64().unwrap();
    let offered = probed["memory_offered_bytes"].as_u64().unwrap();
    assert!(offered > 0 && offered <= total, "offered {offered} of {total}");
    let log = std::fs::read_to_string(&cluster.workers[0].log).unwrap();
    assert!(log.contains("device measured"), "the probe is logged:\n{log}");

    let fast = &worker(&s, "fast")["devices"][0];
    assert_eq!((fast["tflops"].as_f64(), fast["tflops_measured"].as_bool()), (Some(4.0), Some(false)), "{fast}");
    assert!(fast["memory_offered_bytes"].as_u64() > Some(0), "{fast}");
    // A declared throughput skips the probe (seconds of a GPU worker's or a slow CPU's start).
    let log = std::fs::read_to_string(&cluster.workers[1].log).unwrap();
    assert!(log.contains("no probe") && !log.contains("device measured"), "--tflops still probed:\n{log}");

    // Declared 4 against 1: the fast worker holds four times the slow one's experts (give or
    // take rounding on each of the model's layers).
    let held = |id: &str| worker(&s, id)["experts_held"].as_u64().unwrap() as f64;
    let (f, sl, p) = (held("fast"), held("slow"), held("probed"));
    let layers = spec.moe_layers().len() as f64;
    assert_eq!(f + sl + p, layers * spec.n_routed as f64, "every expert placed once");
    assert!((f / sl - 4.0).abs() <= 4.0 * layers / sl, "fast holds {f}, slow {sl}: expected about 4x");
}

#[test]
fn a_device_without_a_backend_in_this_build_is_refused_plainly() {
    let ov = PresetOverrides { hidden: Some(64), ffn: Some(32), ..Default::default() };
    let (dir, _) = gen_model("tiny-v3", DType::BF16, ov, 6);
    let cluster = Cluster::coordinator_only(dir.path(), 1, &[]);
    for (device, says) in [("cuda:0", "cuda"), ("tpu:0", "unknown device `tpu:0`")] {
        let o = std::process::Command::new(BIN)
            .args(["worker", "--coordinator", &cluster.coordinator.addr, "--id", "w0", "--device", device])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "--device {device} must fail in this build");
        assert!(err.contains(says), "--device {device}: {err}");
        assert!(err.lines().count() <= 3, "one clear message, not a trace:\n{err}");
    }
    let o =
        std::process::Command::new(BIN).args(["up", "--workers", "cpu:1,tpu:2", "--duration", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unknown device kind `tpu`"), "{err}");
}
