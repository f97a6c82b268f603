//! Expert FFN throughput of a backend (what `expertmesh bench ffn` reports).

use std::time::Instant;

use bytes::Bytes;
use expertmesh_core::dtype::{encode_f32, DType};
use expertmesh_core::rng::SplitMix64;
use serde::Serialize;

use crate::conformance::{encode, stored};
use crate::{ExpertBackend, ExpertWeights, Groups, HostRows, LayerWeights, Result};

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
    let mut rng = SplitMix64::new(17);
    let mut mats = Vec::new();
    for _ in 0..experts {
        let mut mat = |r: usize, c: usize| {
            let a = 1.0 / (c as f64).sqrt();
            let v: Vec<f32> = (0..r * c).map(|_| rng.uniform(a) as f32).collect();
            encode(dtype, r, c, &v, (128, 128))
        };
        mats.push([mat(ffn, hidden), mat(ffn, hidden), mat(hidden, ffn)]);
    }
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
    let layer = backend.load_layer(w, None)?;
    drop(mats);
    let total = experts * rows;
    let x: Vec<f32> = (0..total * hidden).map(|_| rng.normal() as f32).collect();
    let mut xb = Vec::new();
    encode_f32(act, &x, &mut xb).map_err(|e| crate::KernelError::Shape(e.to_string()))?;
    let xb = Bytes::from(xb);
    let groups = Groups::from_counts((0..experts as u32).map(|e| (e, rows)));
    let call = || -> Result<f64> {
        let x = backend.upload(HostRows::new(act, total, hidden, xb.clone())?)?;
        let mut out = backend.alloc(act, total, hidden)?;
        let t = Instant::now();
        layer.forward(&*x, &groups, &mut *out)?;
        Ok(t.elapsed().as_secs_f64())
    };
    call()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < min_secs {
        times.push(call()?);
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let flops = 6.0 * (total * hidden * ffn) as f64;
    Ok(FfnRate {
        weights: dtype.name().into(),
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
