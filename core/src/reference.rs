//! The float64 single-process reference MoE block.
//!
//! Deliberately independent of the fast path: its own checkpoint decoding (bf16, f16, FP8 e4m3
//! with block scales), its own gating (full sort), its own SwiGLU, all in f64 and written for
//! clarity rather than speed. It shares only the model spec (config parsing and tensor names)
//! with the code it checks.

use std::collections::HashMap;

use safetensors::SafeTensors;

use crate::config::{Family, ModelSpec, Proj, Scoring};
use crate::error::{CoreError, Result};

/// One FFN's weights in f64: w1 (gate) and w3 (up) [ffn, hidden], w2 (down) [hidden, ffn].
#[derive(Debug, Clone)]
pub struct RefFfn {
    pub ffn: usize,
    pub w1: Vec<f64>,
    pub w3: Vec<f64>,
    pub w2: Vec<f64>,
}

/// One MoE layer's weights in f64.
#[derive(Debug, Clone)]
pub struct RefLayer {
    pub gate: Vec<f64>,
    pub bias: Option<Vec<f64>>,
    pub tid2eid: Option<Vec<i64>>,
    pub experts: Vec<RefFfn>,
    pub shared: Option<RefFfn>,
    /// Qwen2-MoE's shared-expert gate [hidden].
    pub shared_gate: Option<Vec<f64>>,
}

/// The reference's view of a checkpoint: every safetensors file's bytes.
#[derive(Debug)]
pub struct RefCheckpoint<'a> {
    files: Vec<SafeTensors<'a>>,
    index: HashMap<String, usize>,
}

fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1F) as i32;
    let man = (bits & 0x3FF) as f64;
    match exp {
        0 => sign * man / 1024.0 * 2f64.powi(-14),
        31 => {
            if man == 0.0 {
                sign * f64::INFINITY
            } else {
                f64::NAN
            }
        }
        _ => sign * (1.0 + man / 1024.0) * 2f64.powi(exp - 15),
    }
}

fn fp8_e4m3_to_f64(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0xF) as i32;
    let man = (b & 0x7) as f64;
    if exp == 15 && man == 7.0 {
        f64::NAN
    } else if exp == 0 {
        sign * man / 8.0 * 2f64.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f64.powi(exp - 7)
    }
}

impl<'a> RefCheckpoint<'a> {
    pub fn new(files: &'a [Vec<u8>]) -> Result<Self> {
        let mut parsed = Vec::new();
        let mut index = HashMap::new();
        for (i, bytes) in files.iter().enumerate() {
            let st = SafeTensors::deserialize(bytes)
                .map_err(|e| CoreError::Checkpoint(format!("reference: file {i}: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            parsed.push(st);
        }
        Ok(Self { files: parsed, index })
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Values of `name` in f64 and its shape; FP8 tensors are multiplied by their block scales.
    pub fn tensor(&self, name: &str, block: Option<(usize, usize)>) -> Result<(Vec<f64>, Vec<usize>)> {
        let i =
            *self.index.get(name).ok_or_else(|| CoreError::Checkpoint(format!("reference: missing tensor {name}")))?;
        let view = self.files[i].tensor(name).map_err(|e| CoreError::Checkpoint(format!("reference: {name}: {e}")))?;
        let shape = view.shape().to_vec();
        let d = view.data();
        use safetensors::Dtype as S;
        let mut vals: Vec<f64> = match view.dtype() {
            S::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
            S::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
            S::BF16 => d
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            S::F16 => d.chunks_exact(2).map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]]))).collect(),
            S::F8_E4M3 => d.iter().map(|&b| fp8_e4m3_to_f64(b)).collect(),
            S::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64).collect(),
            S::I32 => d.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
            other => return Err(CoreError::Checkpoint(format!("reference: {name}: dtype {other:?}"))),
        };
        if view.dtype() == S::F8_E4M3 {
            let (br, bc) = block.unwrap_or((128, 128));
            let (scales, sshape) = self.tensor(&format!("{name}_scale_inv"), None)?;
            let (rows, cols) = (shape[0], shape[1]);
            let scols = cols.div_ceil(bc);
            if sshape != [rows.div_ceil(br), scols] {
                return Err(CoreError::Checkpoint(format!("reference: {name}_scale_inv shape {sshape:?}")));
            }
            for r in 0..rows {
                for c in 0..cols {
                    vals[r * cols + c] *= scales[(r / br) * scols + c / bc];
                }
            }
        }
        Ok((vals, shape))
    }
}

impl RefLayer {
    pub fn load(spec: &ModelSpec, layer: usize, ck: &RefCheckpoint<'_>) -> Result<Self> {
        let blk = spec.fp8_block;
        let ffn = |get: &dyn Fn(Proj) -> String, size: usize| -> Result<RefFfn> {
            Ok(RefFfn {
                ffn: size,
                w1: ck.tensor(&get(Proj::Gate), blk)?.0,
                w3: ck.tensor(&get(Proj::Up), blk)?.0,
                w2: ck.tensor(&get(Proj::Down), blk)?.0,
            })
        };
        let experts = (0..spec.n_routed)
            .map(|e| ffn(&|p| spec.expert_weight_name(layer, e, p), spec.moe_ffn))
            .collect::<Result<Vec<_>>>()?;
        let shared =
            if spec.n_shared > 0 { Some(ffn(&|p| spec.shared_weight_name(layer, p), spec.shared_ffn)?) } else { None };
        let shared_gate = if spec.shared_gate { Some(ck.tensor(&spec.shared_gate_name(layer), None)?.0) } else { None };
        let bias = if spec.has_gate_bias(layer) { Some(ck.tensor(&spec.gate_bias_name(layer), None)?.0) } else { None };
        let tid2eid = if spec.is_hash_layer(layer) {
            Some(ck.tensor(&spec.tid2eid_name(layer), None)?.0.into_iter().map(|v| v as i64).collect())
        } else {
            None
        };
        let gate = ck.tensor(&spec.gate_weight_name(layer), None)?.0;
        Ok(Self { gate, bias, tid2eid, experts, shared, shared_gate })
    }
}

/// The reference's answer for a batch.
#[derive(Debug, Clone)]
pub struct RefOutput {
    pub output: Vec<f64>,
    pub topk_indices: Vec<i64>,
    pub topk_weights: Vec<f64>,
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// y = W2 (silu(W1 x) * (W3 x)), with V4's clamp when `limit` is set.
pub fn ffn_forward(f: &RefFfn, hidden: usize, x: &[f64], limit: Option<f64>) -> Vec<f64> {
    let mut h = vec![0.0; f.ffn];
    for (j, hj) in h.iter_mut().enumerate() {
        let mut g = 0.0;
        let mut u = 0.0;
        for (i, xi) in x.iter().enumerate().take(hidden) {
            g += f.w1[j * hidden + i] * xi;
            u += f.w3[j * hidden + i] * xi;
        }
        if let Some(l) = limit {
            g = g.min(l);
            u = u.clamp(-l, l);
        }
        *hj = silu(g) * u;
    }
    (0..hidden).map(|i| (0..f.ffn).map(|j| f.w2[i * f.ffn + j] * h[j]).sum()).collect()
}

/// The whole MoE block for `tokens` rows of `x` [tokens, hidden].
pub fn moe_forward(spec: &ModelSpec, w: &RefLayer, x: &[f64], tokens: usize, ids: Option<&[i64]>) -> Result<RefOutput> {
    let (h, e, k) = (spec.hidden, spec.n_routed, spec.top_k);
    let mut out = RefOutput { output: vec![0.0; tokens * h], topk_indices: vec![], topk_weights: vec![] };
    let limit = if spec.family == Family::DeepseekV4 { spec.swiglu_limit } else { None };
    for t in 0..tokens {
        let xt = &x[t * h..(t + 1) * h];
        let logits: Vec<f64> = (0..e).map(|j| (0..h).map(|i| w.gate[j * h + i] * xt[i]).sum()).collect();
        let scores: Vec<f64> = match spec.scoring {
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
            Scoring::SqrtSoftplus => logits.iter().map(|l| (1.0 + l.exp()).ln().sqrt()).collect(),
            Scoring::Softmax => {
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let ex: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let s: f64 = ex.iter().sum();
                ex.iter().map(|v| v / s).collect()
            }
        };
        let chosen: Vec<usize> = if let Some(table) = &w.tid2eid {
            let ids = ids.ok_or_else(|| CoreError::InvalidInput("hash layer needs token ids".into()))?;
            let id = ids[t] as usize;
            (0..k).map(|j| table[id * k + j] as usize).collect()
        } else {
            let choice: Vec<f64> = match &w.bias {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            let per = e / spec.n_group;
            let mut allowed = vec![true; e];
            if spec.n_group > 1 {
                let mut gs: Vec<(f64, usize)> = (0..spec.n_group)
                    .map(|g| {
                        let mut v: Vec<f64> = choice[g * per..(g + 1) * per].to_vec();
                        v.sort_by(|a, b| b.total_cmp(a));
                        (v.iter().take(2).sum(), g)
                    })
                    .collect();
                gs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let keep: Vec<usize> = gs.iter().take(spec.topk_group).map(|p| p.1).collect();
                for (i, a) in allowed.iter_mut().enumerate() {
                    *a = keep.contains(&(i / per));
                }
            }
            let mut order: Vec<usize> = (0..e).filter(|i| allowed[*i]).collect();
            order.sort_by(|a, b| choice[*b].total_cmp(&choice[*a]).then(a.cmp(b)));
            order.truncate(k);
            order
        };
        let raw: Vec<f64> = chosen.iter().map(|&i| scores[i]).collect();
        let denom = if spec.norm_topk_prob { raw.iter().sum::<f64>() + 1e-20 } else { 1.0 };
        let o = &mut out.output[t * h..(t + 1) * h];
        for (&i, r) in chosen.iter().zip(&raw) {
            let wt = r / denom * spec.routed_scaling;
            let y = ffn_forward(&w.experts[i], h, xt, limit);
            for (oi, yi) in o.iter_mut().zip(&y) {
                *oi += wt * yi;
            }
            out.topk_indices.push(i as i64);
            out.topk_weights.push(wt);
        }
        if let Some(s) = &w.shared {
            let y = ffn_forward(s, h, xt, limit);
            // Qwen2-MoE: sigmoid(x . shared_expert_gate) scales the shared expert's output.
            let scale = match &w.shared_gate {
                Some(g) => 1.0 / (1.0 + (-(0..h).map(|i| g[i] * xt[i]).sum::<f64>()).exp()),
                None => 1.0,
            };
            for (oi, yi) in o.iter_mut().zip(&y) {
                *oi += scale * yi;
            }
        }
    }
    Ok(out)
}

/// Relative L2 error ||a - b|| / ||b||.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}
