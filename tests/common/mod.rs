//! Shared helpers for the end-to-end tests: synthetic models, random inputs, the f64
//! reference, and real `expertmesh` processes on loopback ports.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod etcd;

use std::path::{Path, PathBuf};

use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_core::reference::{moe_forward, RefCheckpoint, RefLayer, RefOutput};
use expertmesh_core::rng::SplitMix64;
use expertmesh_core::ModelSpec;
use expertmesh_worker::synth::{generate, GenOptions};

/// Generate a preset model into a fresh temporary directory.
pub fn gen_model(preset: &str, dtype: DType, ov: PresetOverrides, seed: u64) -> (tempfile::TempDir, ModelSpec) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = generate(dir.path(), &GenOptions { preset: preset.into(), overrides: ov, dtype, seed, max_bytes: 1 << 32 })
        .unwrap_or_else(|e| panic!("gen-model {preset}: {e}"));
    (dir, s.spec)
}

/// Every safetensors file of a checkpoint, read whole (for the reference only).
pub fn read_shards(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The f64 reference for one layer.
pub fn reference(
    dir: &Path,
    spec: &ModelSpec,
    layer: usize,
    x: &[f32],
    tokens: usize,
    ids: Option<&[i64]>,
) -> RefOutput {
    let shards = read_shards(dir);
    let ck = RefCheckpoint::new(&shards).unwrap();
    let w = RefLayer::load(spec, layer, &ck).unwrap();
    let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
    moe_forward(spec, &w, &x64, tokens, ids).unwrap()
}

/// Random activations [tokens, hidden] with unit-ish scale, and token ids.
pub fn random_input(spec: &ModelSpec, tokens: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut r = SplitMix64::new(seed);
    let x = (0..tokens * spec.hidden).map(|_| r.normal() as f32).collect();
    let ids = (0..tokens).map(|_| r.below(spec.vocab_size as u64) as i64).collect();
    (x, ids)
}

pub fn rel_l2_f32(a: &[f32], b: &[f64]) -> f64 {
    let a64: Vec<f64> = a.iter().map(|v| *v as f64).collect();
    expertmesh_core::reference::rel_l2(&a64, b)
}

/// Requests with known float64 answers, sent in a loop until `stop`; counts what came back.
pub struct TrafficReport {
    pub sent: u64,
    pub correct: u64,
    pub failures: Vec<String>,
    pub epochs: Vec<u64>,
    /// (when it finished, latency, epoch) of every correct answer.
    pub log: Vec<(std::time::Instant, std::time::Duration, u64)>,
}

impl TrafficReport {
    /// "requests sent N, answered correctly N, failed N, lost 0, epochs [..]" for the printed figures.
    pub fn summary(&self) -> String {
        format!(
            "requests sent {}, answered correctly {}, failed {}, lost 0, epochs {:?}",
            self.sent,
            self.correct,
            self.failures.len(),
            self.epochs
        )
    }

    /// Every request answered, and answered correctly; `logs` explains a failure.
    pub fn assert_all_correct(&self, logs: impl FnOnce() -> String) {
        assert!(self.failures.is_empty(), "{:#?}\n{}", self.failures, logs());
        assert_eq!(self.sent, self.correct, "every request answered correctly");
    }

    /// p99 latency of correct answers finished in [from, to).
    pub fn p99_between(&self, from: std::time::Instant, to: std::time::Instant) -> Option<std::time::Duration> {
        let mut v: Vec<_> = self.log.iter().filter(|(t, _, _)| *t >= from && *t < to).map(|(_, l, _)| *l).collect();
        v.sort();
        (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * 0.99).round() as usize])
    }
}

pub type Case = (usize, Vec<f32>, Vec<i64>, Vec<f64>);

/// Inputs for `n` requests over the model's MoE layers, with their reference outputs.
pub fn traffic_cases(dir: &Path, spec: &ModelSpec, tokens: usize, n: usize) -> Vec<Case> {
    let layers = spec.moe_layers();
    (0..n)
        .map(|i| {
            let layer = layers[i % layers.len()];
            let (x, ids) = random_input(spec, tokens, 900 + i as u64);
            let r = reference(dir, spec, layer, &x, tokens, Some(&ids));
            (layer, x, ids, r.output)
        })
        .collect()
}

pub fn start_traffic(
    mut client: expertmesh_proto::v1::moe_layer_client::MoeLayerClient<tonic::transport::Channel>,
    cases: Vec<Case>,
    hidden: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<TrafficReport> {
    use expertmesh_proto::v1::{DType as PDType, ForwardRequest};
    use expertmesh_worker::wire::{f32_tensor, i64_tensor, tensor_to_f32};
    tokio::spawn(async move {
        let mut rep = TrafficReport { sent: 0, correct: 0, failures: Vec::new(), epochs: Vec::new(), log: Vec::new() };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let (layer, x, ids, want) = &cases[rep.sent as usize % cases.len()];
            let tokens = ids.len();
            rep.sent += 1;
            let started = std::time::Instant::now();
            let resp = client
                .forward(ForwardRequest {
                    layer: *layer as u32,
                    hidden_states: Some(f32_tensor(&[tokens, hidden], x)),
                    input_ids: Some(i64_tensor(&[tokens], ids)),
                    wire_dtype: PDType::DtypeBf16 as i32,
                })
                .await;
            match resp {
                Ok(r) => {
                    let r = r.into_inner();
                    let (out, _) = tensor_to_f32(r.output.as_ref().unwrap(), "output").unwrap();
                    let err = rel_l2_f32(&out, want);
                    if err < 1e-2 {
                        rep.correct += 1;
                        rep.log.push((std::time::Instant::now(), started.elapsed(), r.epoch));
                    } else {
                        rep.failures.push(format!("request {}: wrong answer, rel L2 {err}", rep.sent));
                    }
                    if rep.epochs.last() != Some(&r.epoch) {
                        rep.epochs.push(r.epoch);
                    }
                }
                Err(e) => {
                    if rep.failures.len() < 1000 {
                        rep.failures.push(format!("request {}: {e}", rep.sent));
                    }
                    // A client backs off; also keeps a dead cluster from spinning this loop.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
        rep
    })
}

/// `expertmesh status --json` of a coordinator.
pub fn status_json(coordinator: &str) -> serde_json::Value {
    let o = std::process::Command::new(cluster::BIN)
        .args(["status", "--json", "--coordinator", coordinator])
        .output()
        .unwrap();
    assert!(o.status.success(), "status: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `status --json` of whichever coordinator answers, or None when it does not.
pub fn try_status(addr: &str) -> Option<serde_json::Value> {
    let o = std::process::Command::new(cluster::BIN).args(["status", "--json", "--coordinator", addr]).output().ok()?;
    o.status.success().then(|| serde_json::from_slice(&o.stdout).ok()).flatten()
}

/// Poll until `pred` holds for `addr`'s status; panics with `what` after `limit`.
pub fn wait_status(
    addr: &str,
    limit: std::time::Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = std::time::Instant::now();
    loop {
        if let Some(s) = try_status(addr) {
            if pred(&s) {
                return s;
            }
        }
        assert!(t.elapsed() < limit, "{what} not reached within {limit:?}; last status {:?}", try_status(addr));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
