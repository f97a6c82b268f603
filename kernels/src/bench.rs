//! Expert FFN throughput of a backend (what `expertmesh bench ffn` reports), and the probe a
//! worker runs at start to tell placement what its device can do.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use expertmesh_core::dtype::{encode_f32, DType};
use expertmesh_core::rng::SplitMix64;
use serde::Serialize;

use crate::conformance::{encode, stored, Stored};
use crate::{ExpertBackend, ExpertWeights, Groups, HostRows, LayerExperts, LayerWeights, Result};

/// One measurement: `experts` experts of `[hidden, ffn]`, `rows` rows each, in one grouped call.
#[derive(Debug, Clone, Serialize)]
pub struct FfnRate {
    pub weights: String,
    pub activations: String,
    pub hidden: usize,
    pub ffn: usize,
    pub experts: usize,
    pub rows_per_expert: usize,
    /// Median seconds per grouped call.
    pub seconds: f64,
    pub gflops: f64,
    pub calls: usize,
}

/// One expert's W1, W3 and W2 with uniform values of scale 1/sqrt(k), stored in `dtype`
/// (FP8 with 128 x 128 block scales).
fn random_expert(rng: &mut SplitMix64, hidden: usize, ffn: usize, dtype: DType) -> [Stored; 3] {
    let mut mat = |r: usize, c: usize| {
        let a = 1.0 / (c as f64).sqrt();
        let v: Vec<f32> = (0..r * c).map(|_| rng.uniform(a) as f32).collect();
        encode(dtype, r, c, &v, (128, 128))
    };
    [mat(ffn, hidden), mat(ffn, hidden), mat(hidden, ffn)]
}

/// A layer of `experts` random experts of `[hidden, ffn]` in `dtype`, resident on `backend`.
pub fn synthetic_layer(
    backend: &dyn ExpertBackend,
    hidden: usize,
    ffn: usize,
    experts: usize,
    dtype: DType,
    seed: u64,
) -> Result<Arc<dyn LayerExperts>> {
    let mut rng = SplitMix64::new(seed);
    let mats: Vec<[Stored; 3]> = (0..experts).map(|_| random_expert(&mut rng, hidden, ffn, dtype)).collect();
    let w = LayerWeights {
        layer: 0,
        hidden,
        ffn,
        swiglu_limit: None,
        experts: mats
            .iter()
            .enumerate()
            .map(|(e, m)| ExpertWeights {
                expert: e as u32,
                w1: stored(&m[0], (128, 128)),
                w3: stored(&m[1], (128, 128)),
                w2: stored(&m[2], (128, 128)),
            })
            .collect(),
    };
    backend.load_layer(w, None)
}

/// Like [`synthetic_layer`], but every expert gets the same random matrices (each its own
/// resident copy): the timing is the same and building a model-sized layer takes one expert's
/// generation time instead of all of them.
pub fn repeated_layer(
    backend: &dyn ExpertBackend,
    hidden: usize,
    ffn: usize,
    experts: usize,
    dtype: DType,
    seed: u64,
) -> Result<Arc<dyn LayerExperts>> {
    let m = random_expert(&mut SplitMix64::new(seed), hidden, ffn, dtype);
    // Loaded a few experts at a time, so the host never holds more than a few copies.
    let mut layer: Option<Arc<dyn LayerExperts>> = None;
    for first in (0..experts).step_by(4) {
        let w = LayerWeights {
            layer: 0,
            hidden,
            ffn,
            swiglu_limit: None,
            experts: (first..(first + 4).min(experts))
                .map(|e| ExpertWeights {
                    expert: e as u32,
                    w1: stored(&m[0], (128, 128)),
                    w3: stored(&m[1], (128, 128)),
                    w2: stored(&m[2], (128, 128)),
                })
                .collect(),
        };
        let keep: Vec<u32> = (0..first as u32).collect();
        layer = Some(backend.load_layer(w, layer.as_ref().map(|l| (l, &keep[..])))?);
    }
    layer.ok_or_else(|| crate::KernelError::Shape("a layer of 0 experts".into()))
}

/// The rate of grouped calls of `rows` rows per expert over every expert of `layer`: median of
/// calls over at least `min_secs`, after one warm-up call.
pub fn layer_rate(
    backend: &dyn ExpertBackend,
    layer: &dyn LayerExperts,
    ffn: usize,
    rows: usize,
    act: DType,
    min_secs: f64,
) -> Result<FfnRate> {
    let experts = layer.experts().len();
    let total = experts * rows;
    let hidden = layer.hidden();
    let xb = random_rows(total * hidden, act, 18)?;
    let call = || time_forward(backend, layer, &xb, rows, act);
    call()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < min_secs {
        times.push(call()?);
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    // Each expert: 2 x rows x hidden x ffn for each of W1, W3 and W2.
    let flops = 6.0 * total as f64 * hidden as f64 * ffn as f64;
    Ok(FfnRate {
        weights: String::new(),
        activations: act.name().into(),
        hidden,
        ffn,
        experts,
        rows_per_expert: rows,
        seconds,
        gflops: flops / seconds / 1e9,
        calls: times.len(),
    })
}

/// Seconds of one grouped call of `rows` rows per expert over every expert of `layer`, after
/// the inputs are resident (upload and output allocation are not timed).
pub fn time_forward(
    backend: &dyn ExpertBackend,
    layer: &dyn LayerExperts,
    x: &Bytes,
    rows: usize,
    act: DType,
) -> Result<f64> {
    let experts = layer.experts();
    let total = experts.len() * rows;
    let groups = Groups::from_counts(experts.iter().map(|&e| (e, rows)));
    let x = backend.upload(HostRows::new(act, total, layer.hidden(), x.clone())?)?;
    let mut out = backend.alloc(act, total, layer.hidden())?;
    let t = Instant::now();
    layer.forward(&*x, &groups, &mut *out)?;
    Ok(t.elapsed().as_secs_f64())
}

/// `n` random activations in `act`.
pub fn random_rows(n: usize, act: DType, seed: u64) -> Result<Bytes> {
    let mut rng = SplitMix64::new(seed);
    let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let mut xb = Vec::new();
    encode_f32(act, &x, &mut xb).map_err(|e| crate::KernelError::Shape(e.to_string()))?;
    Ok(Bytes::from(xb))
}

/// Measure a grouped FFN call for at least `min_secs` (after one warm-up call).
#[allow(clippy::too_many_arguments)]
pub fn ffn_rate(
    backend: &dyn ExpertBackend,
    hidden: usize,
    ffn: usize,
    experts: usize,
    rows: usize,
    dtype: DType,
    act: DType,
    min_secs: f64,
) -> Result<FfnRate> {
    let layer = synthetic_layer(backend, hidden, ffn, experts, dtype, 17)?;
    let mut r = layer_rate(backend, &*layer, ffn, rows, act, min_secs)?;
    r.weights = dtype.name().into();
    Ok(r)
}

/// What a worker measures about its device at start: placement weights devices by it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceProbe {
    /// bf16 expert-FFN rate on this backend, TFLOP/s (grouped call, bf16 weights and rows).
    pub tflops: f64,
    /// Rows per expert of the measured call (grown until one call is long enough to time).
    pub rows_per_expert: usize,
    pub seconds: f64,
    /// Memory the device has free for weights, and in all.
    pub memory_free: u64,
    pub memory_total: u64,
}

/// The throughput probe: 8 bf16 experts of hidden 1024 x FFN 512 (compute-bound from 64 rows
/// per expert), rows per expert grown by 4x from 64 until one grouped call takes at least 4 ms
/// after a warm-up call (or 16384 rows), then the best of four calls. Tens of milliseconds on a
/// CPU, a few on a GPU.
pub fn probe(backend: &dyn ExpertBackend) -> Result<DeviceProbe> {
    let (hidden, ffn, experts) = (1024, 512, 8);
    let layer = synthetic_layer(backend, hidden, ffn, experts, DType::BF16, 23)?;
    let mut rows = 64;
    loop {
        let x = random_rows(experts * rows * hidden, DType::BF16, 29)?;
        // The first call at a size pays for waking threads and touching buffers: not timed.
        time_forward(backend, &*layer, &x, rows, DType::BF16)?;
        let first = time_forward(backend, &*layer, &x, rows, DType::BF16)?;
        if first < 4e-3 && rows < 16384 {
            rows *= 4;
            continue;
        }
        let mut best = first;
        for _ in 0..3 {
            best = best.min(time_forward(backend, &*layer, &x, rows, DType::BF16)?);
        }
        let (memory_free, memory_total) = backend.memory()?;
        let flops = 6.0 * (experts * rows * hidden * ffn) as f64;
        return Ok(DeviceProbe {
            tflops: flops / best.max(1e-9) / 1e12,
            rows_per_expert: rows,
            seconds: best,
            memory_free,
            memory_total,
        });
    }
}
