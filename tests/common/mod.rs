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
