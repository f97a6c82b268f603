//! Fast-path gating: from router logits to each token's top-k experts and weights.
//!
//! The router GEMM (`x . Wg^T`) is done by the caller's backend; this module applies the
//! scoring function, score-correction bias, group limit or hash table, normalisation and
//! routed scaling. Ties go to the lower expert index.

use crate::config::{ModelSpec, Scoring};
use crate::error::{CoreError, Result};

/// Each token's chosen experts and combine weights, `top_k` per token, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub indices: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.indices.len() / self.top_k.max(1)
    }
}

/// Hash routing table of a V4 hash layer: `[vocab, top_k]` expert ids.
#[derive(Debug, Clone)]
pub struct HashTable {
    pub vocab: usize,
    pub top_k: usize,
    pub experts: Vec<u32>,
}

impl HashTable {
    /// Build from the checkpoint's `tid2eid` values, checking every id names a routed expert.
    pub fn new(values: Vec<i64>, vocab: usize, top_k: usize, n_routed: usize) -> Result<Self> {
        if values.len() != vocab * top_k {
            return Err(CoreError::Checkpoint(format!(
                "tid2eid has {} entries; expected vocab {vocab} x top_k {top_k}",
                values.len()
            )));
        }
        let mut experts = Vec::with_capacity(values.len());
        for (i, v) in values.into_iter().enumerate() {
            if v < 0 || v as usize >= n_routed {
                return Err(CoreError::Checkpoint(format!(
                    "tid2eid[{}][{}] = {v} is not a routed expert (0..{n_routed})",
                    i / top_k,
                    i % top_k
                )));
            }
            experts.push(v as u32);
        }
        Ok(Self { vocab, top_k, experts })
    }
}

/// What the gate of one layer needs besides the logits.
#[derive(Debug, Clone, Copy)]
pub struct GateInputs<'a> {
    /// Score-correction bias [n_routed] (affects the choice, not the weights).
    pub bias: Option<&'a [f32]>,
    /// Hash layers: the table and each token's id.
    pub hash: Option<(&'a HashTable, &'a [i64])>,
}

#[inline]
fn score(scoring: Scoring, logit: f32) -> f32 {
    match scoring {
        Scoring::Sigmoid => 1.0 / (1.0 + (-logit).exp()),
        Scoring::SqrtSoftplus => {
            let sp = logit.max(0.0) + (-logit.abs()).exp().ln_1p();
            sp.sqrt()
        }
        Scoring::Softmax => logit, // normalised per token below
    }
}

/// Insert (value, index) into `best`, kept sorted by value descending then index ascending,
/// holding at most `k` entries.
#[inline]
fn push_top(best: &mut Vec<(f32, u32)>, k: usize, v: f32, i: u32) {
    if best.len() == k {
        let last = best[k - 1];
        if !(v > last.0 || (v == last.0 && i < last.1)) {
            return;
        }
        best.pop();
    }
    let pos = best.iter().position(|&(bv, bi)| v > bv || (v == bv && i < bi)).unwrap_or(best.len());
    best.insert(pos, (v, i));
}

/// Route `tokens` tokens whose router logits are `logits` [tokens, n_routed].
pub fn route(spec: &ModelSpec, logits: &[f32], tokens: usize, inp: GateInputs<'_>) -> Result<Routing> {
    let e = spec.n_routed;
    let k = spec.top_k;
    if logits.len() != tokens * e {
        return Err(CoreError::InvalidInput(format!(
            "router logits have {} values; expected {tokens} tokens x {e} experts",
            logits.len()
        )));
    }
    if let Some(b) = inp.bias {
        if b.len() != e {
            return Err(CoreError::InvalidInput(format!("gate bias has {} values; expected {e}", b.len())));
        }
    }
    if let Some((table, ids)) = inp.hash {
        if ids.len() != tokens {
            return Err(CoreError::InvalidInput(format!(
                "input_ids has {} tokens; hidden_states has {tokens}",
                ids.len()
            )));
        }
        if table.top_k != k {
            return Err(CoreError::Checkpoint(format!("tid2eid has {} columns; top_k is {k}", table.top_k)));
        }
        if let Some((t, id)) = ids.iter().enumerate().find(|(_, id)| **id < 0 || **id as usize >= table.vocab) {
            return Err(CoreError::InvalidInput(format!(
                "input_ids[{t}] = {id} is outside the vocabulary (0..{})",
                table.vocab
            )));
        }
    }
    let groups = spec.n_group;
    let per_group = e / groups;
    let mut indices = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    let mut s = vec![0f32; e];
    let mut choice = vec![0f32; e];
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    let mut gbest: Vec<(f32, u32)> = Vec::with_capacity(groups + 1);
    for t in 0..tokens {
        let row = &logits[t * e..(t + 1) * e];
        for (o, &l) in s.iter_mut().zip(row) {
            *o = score(spec.scoring, l);
        }
        if spec.scoring == Scoring::Softmax {
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in s.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            for v in s.iter_mut() {
                *v /= sum;
            }
        }
        best.clear();
        if let Some((table, ids)) = inp.hash {
            let id = ids[t] as usize;
            for &x in &table.experts[id * k..(id + 1) * k] {
                best.push((s[x as usize], x));
            }
        } else {
            match inp.bias {
                Some(b) => {
                    for ((c, &sv), &bv) in choice.iter_mut().zip(&s).zip(b) {
                        *c = sv + bv;
                    }
                }
                None => choice.copy_from_slice(&s),
            }
            if groups > 1 {
                gbest.clear();
                for g in 0..groups {
                    let part = &choice[g * per_group..(g + 1) * per_group];
                    let (mut a, mut b2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &v in part {
                        if v > a {
                            b2 = a;
                            a = v;
                        } else if v > b2 {
                            b2 = v;
                        }
                    }
                    let gs = if per_group >= 2 { a + b2 } else { a };
                    push_top(&mut gbest, spec.topk_group, gs, g as u32);
                }
                for &(_, g) in &gbest {
                    let g = g as usize;
                    let base = g * per_group;
                    for (i, &v) in choice[base..base + per_group].iter().enumerate() {
                        push_top(&mut best, k, v, (base + i) as u32);
                    }
                }
                // Same order as an ungrouped search: by choice score, ties to the lower index.
                best.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            } else {
                for (i, &v) in choice.iter().enumerate() {
                    push_top(&mut best, k, v, i as u32);
                }
            }
        }
        let sum: f32 = best.iter().map(|&(_, i)| s[i as usize]).sum();
        let denom = if spec.norm_topk_prob { sum + 1e-20 } else { 1.0 };
        let scale = spec.routed_scaling as f32;
        for &(_, i) in &best {
            indices.push(i);
            weights.push(s[i as usize] / denom * scale);
        }
    }
    Ok(Routing { top_k: k, indices, weights })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset_config, PresetOverrides};

    fn spec(name: &str) -> ModelSpec {
        ModelSpec::from_config_json(&preset_config(name, &PresetOverrides::default()).unwrap().to_string()).unwrap()
    }

    #[test]
    fn group_limit_excludes_groups() {
        // tiny-v3: 16 experts, 4 groups of 4, top-2 groups, top-4 experts.
        let s = spec("tiny-v3");
        let mut logits = vec![-5f32; 16];
        // Group 3 has the single best expert but a weak second; groups 0 and 1 are strong pairs.
        logits[15] = 4.0;
        logits[0] = 2.0;
        logits[1] = 2.0;
        logits[4] = 1.5;
        logits[5] = 1.5;
        let r = route(&s, &logits, 1, GateInputs { bias: None, hash: None }).unwrap();
        assert_eq!(r.indices, vec![0, 1, 4, 5]);
        let sum: f32 = r.weights.iter().sum();
        assert!((sum - 2.5).abs() < 1e-5, "weights sum to routed scale, got {sum}");
    }

    #[test]
    fn hash_rejects_out_of_vocab_token() {
        let s = spec("tiny-v4");
        let table = HashTable::new(vec![0; 1000 * 4], 1000, 4, 16).unwrap();
        let ids = [3i64, 1000];
        let e = route(&s, &[0.0; 32], 2, GateInputs { bias: None, hash: Some((&table, &ids)) }).unwrap_err();
        assert!(e.to_string().contains("input_ids[1] = 1000"), "{e}");
    }
}
