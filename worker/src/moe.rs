//! The token owner's side of one MoE layer, shared by the in-process layer and the
//! distributed dispatcher: input checks, the gate, grouping routed pairs by expert, the shared
//! expert, and the combine in a fixed order (results never depend on arrival order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use expertmesh_core::gating::{route, GateInputs, Routing};
use expertmesh_core::ModelSpec;
use expertmesh_kernels::{ExpertBackend, LoadedFfn};

use crate::checkpoint::{Checkpoint, GateWeights};
use crate::compute::on_pool;
use crate::error::{Result, WorkerError};

/// One MoE forward: `tokens` rows of `hidden_states` [tokens, hidden].
#[derive(Debug, Clone)]
pub struct MoeInput {
    pub layer: usize,
    pub tokens: usize,
    pub hidden_states: Vec<f32>,
    pub input_ids: Option<Vec<i64>>,
}

/// The whole MoE block's answer.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// [tokens, hidden]: routed experts plus shared expert.
    pub output: Vec<f32>,
    pub routing: Routing,
    /// Placement epoch used (0 in process).
    pub epoch: u64,
}

/// Router and shared expert of one layer, loaded once.
#[derive(Debug)]
pub struct LayerFront {
    pub layer: usize,
    pub gate: GateWeights,
    pub shared: Option<Arc<dyn LoadedFfn>>,
}

/// Loads and caches each layer's router and shared expert; validates inputs; gates.
#[derive(Debug)]
pub struct Frontend {
    ck: Arc<Checkpoint>,
    backend: Arc<dyn ExpertBackend>,
    layers: Mutex<HashMap<usize, Arc<LayerFront>>>,
}

/// Routed (token, slot) pairs grouped by expert: `pairs[e]` lists pair indices `t * k + j`
/// in token order.
#[derive(Debug, Clone)]
pub struct ExpertGroups {
    pub pairs: Vec<Vec<u32>>,
}

impl ExpertGroups {
    pub fn new(routing: &Routing, n_routed: usize) -> Self {
        let mut pairs = vec![Vec::new(); n_routed];
        for (p, &e) in routing.indices.iter().enumerate() {
            pairs[e as usize].push(p as u32);
        }
        Self { pairs }
    }
}

impl Frontend {
    pub fn new(ck: Arc<Checkpoint>, backend: Arc<dyn ExpertBackend>) -> Self {
        Self { ck, backend, layers: Mutex::new(HashMap::new()) }
    }

    pub fn spec(&self) -> &ModelSpec {
        self.ck.spec()
    }

    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.ck
    }

    pub fn backend(&self) -> &Arc<dyn ExpertBackend> {
        &self.backend
    }

    /// The layer's router and shared expert (loaded from the checkpoint on first use).
    pub async fn layer(&self, layer: usize) -> Result<Arc<LayerFront>> {
        if let Some(f) = self.layers.lock().map_err(|_| poisoned())?.get(&layer) {
            return Ok(f.clone());
        }
        let ck = self.ck.clone();
        let backend = self.backend.clone();
        let front = on_pool(move || -> Result<LayerFront> {
            let gate = ck.load_gate(layer)?;
            let shared = match ck.load_shared(layer)? {
                Some(w) => Some(backend.load_ffn(w)?),
                None => None,
            };
            Ok(LayerFront { layer, gate, shared })
        })
        .await??;
        let front = Arc::new(front);
        self.layers.lock().map_err(|_| poisoned())?.insert(layer, front.clone());
        Ok(front)
    }

    /// Check a request against the model before any work is done.
    pub fn validate(&self, inp: &MoeInput) -> Result<()> {
        let s = self.spec();
        s.check_moe_layer(inp.layer)?;
        if inp.tokens == 0 {
            return Err(WorkerError::InvalidInput("hidden_states has 0 tokens; expected at least 1".into()));
        }
        if inp.hidden_states.len() != inp.tokens * s.hidden {
            return Err(WorkerError::InvalidInput(format!(
                "hidden_states has {} values for {} tokens; expected [{}, {}] (hidden size {})",
                inp.hidden_states.len(),
                inp.tokens,
                inp.tokens,
                s.hidden,
                s.hidden
            )));
        }
        if let Some(i) = inp.hidden_states.iter().position(|v| !v.is_finite()) {
            return Err(WorkerError::InvalidInput(format!(
                "hidden_states has a non-finite value ({}) at token {} (hidden index {}); activations must be finite",
                inp.hidden_states[i],
                i / s.hidden,
                i % s.hidden
            )));
        }
        if s.is_hash_layer(inp.layer) {
            let ids = inp.input_ids.as_ref().ok_or_else(|| {
                WorkerError::InvalidInput(format!(
                    "layer {} is hash-routed and needs input_ids (i64 [{}])",
                    inp.layer, inp.tokens
                ))
            })?;
            if ids.len() != inp.tokens {
                return Err(WorkerError::InvalidInput(format!(
                    "input_ids has {} tokens; hidden_states has {}",
                    ids.len(),
                    inp.tokens
                )));
            }
            if let Some((t, id)) = ids.iter().enumerate().find(|(_, id)| **id < 0 || **id as usize >= s.vocab_size) {
                return Err(WorkerError::InvalidInput(format!(
                    "input_ids[{t}] = {id} is outside the vocabulary (0..{})",
                    s.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Router product and top-k, on the compute pool.
    pub async fn gate(&self, front: &Arc<LayerFront>, inp: &Arc<MoeInput>) -> Result<Routing> {
        let spec = self.spec().clone();
        let backend = self.backend.clone();
        let (front, inp) = (front.clone(), inp.clone());
        on_pool(move || -> Result<Routing> {
            let mut logits = vec![0f32; inp.tokens * spec.n_routed];
            backend.matmul_nt(
                &inp.hidden_states,
                &front.gate.weight,
                inp.tokens,
                spec.n_routed,
                spec.hidden,
                &mut logits,
            )?;
            let hash = match (&front.gate.hash, &inp.input_ids) {
                (Some(t), Some(ids)) => Some((t, ids.as_slice())),
                _ => None,
            };
            Ok(route(&spec, &logits, inp.tokens, GateInputs { bias: front.gate.bias.as_deref(), hash })?)
        })
        .await?
    }
}

/// The shared expert's output [tokens, hidden], if the model has one, on the compute pool.
pub async fn shared_expert(front: Arc<LayerFront>, inp: Arc<MoeInput>) -> Result<Option<Vec<f32>>> {
    let Some(ffn) = front.shared.clone() else { return Ok(None) };
    on_pool(move || -> Result<Option<Vec<f32>>> {
        let mut out = vec![0f32; inp.hidden_states.len()];
        ffn.forward(&inp.hidden_states, inp.tokens, &mut out)?;
        Ok(Some(out))
    })
    .await?
}

fn poisoned() -> WorkerError {
    WorkerError::Internal("layer cache lock poisoned".into())
}

/// `out[t] = sum_j w[t, j] * y[t * k + j] + shared[t]`, summed in slot order j = 0..k.
pub fn combine(hidden: usize, routing: &Routing, y: &[f32], shared: Option<&[f32]>) -> Vec<f32> {
    let k = routing.top_k;
    let tokens = routing.tokens();
    let mut out = match shared {
        Some(s) => s.to_vec(),
        None => vec![0f32; tokens * hidden],
    };
    // Routed sum first, in slot order, then the shared expert: a fixed order.
    let mut acc = vec![0f32; hidden];
    for t in 0..tokens {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for j in 0..k {
            let p = t * k + j;
            let w = routing.weights[p];
            for (a, v) in acc.iter_mut().zip(&y[p * hidden..(p + 1) * hidden]) {
                *a += w * v;
            }
        }
        for (o, a) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(&acc) {
            *o += a;
        }
    }
    out
}

/// Gather the rows of `pairs` from `x` [tokens, hidden] (pair p is token p / k).
pub fn gather_rows(x: &[f32], hidden: usize, k: usize, pairs: &[u32], out: &mut Vec<f32>) {
    out.reserve(pairs.len() * hidden);
    for &p in pairs {
        let t = p as usize / k;
        out.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
    }
}

/// The whole MoE layer in this process, with the same backend as a worker: the baseline the
/// distributed path is measured and checked against.
#[derive(Debug)]
pub struct LocalMoe {
    front: Frontend,
    experts: Mutex<HashMap<(usize, usize), Arc<dyn LoadedFfn>>>,
}

impl LocalMoe {
    pub fn new(ck: Arc<Checkpoint>, backend: Arc<dyn ExpertBackend>) -> Self {
        Self { front: Frontend::new(ck, backend), experts: Mutex::new(HashMap::new()) }
    }

    pub fn frontend(&self) -> &Frontend {
        &self.front
    }

    /// Load every expert of `layer` now (so timing excludes loading).
    pub async fn preload(&self, layer: usize) -> Result<()> {
        self.front.layer(layer).await?;
        for e in 0..self.front.spec().n_routed {
            self.expert(layer, e).await?;
        }
        Ok(())
    }

    async fn expert(&self, layer: usize, e: usize) -> Result<Arc<dyn LoadedFfn>> {
        if let Some(f) = self.experts.lock().map_err(|_| poisoned())?.get(&(layer, e)) {
            return Ok(f.clone());
        }
        let ck = self.front.checkpoint().clone();
        let backend = self.front.backend().clone();
        let f = on_pool(move || -> Result<Arc<dyn LoadedFfn>> { Ok(backend.load_ffn(ck.load_expert(layer, e)?)?) })
            .await??;
        self.experts.lock().map_err(|_| poisoned())?.insert((layer, e), f.clone());
        Ok(f)
    }

    pub async fn forward(&self, inp: MoeInput) -> Result<MoeOutput> {
        self.front.validate(&inp)?;
        let inp = Arc::new(inp);
        let front = self.front.layer(inp.layer).await?;
        let routing = self.front.gate(&front, &inp).await?;
        let spec = self.front.spec().clone();
        let groups = ExpertGroups::new(&routing, spec.n_routed);
        let mut ffns = Vec::new();
        for (e, pairs) in groups.pairs.iter().enumerate() {
            if !pairs.is_empty() {
                ffns.push((e, self.expert(inp.layer, e).await?));
            }
        }
        let shared = shared_expert(front.clone(), inp.clone()).await?;
        let (h, k) = (spec.hidden, spec.top_k);
        let inp2 = inp.clone();
        let y = on_pool(move || -> Result<Vec<f32>> {
            let mut y = vec![0f32; inp2.tokens * k * h];
            let mut xs = Vec::new();
            for (e, ffn) in &ffns {
                let pairs = &groups.pairs[*e];
                xs.clear();
                gather_rows(&inp2.hidden_states, h, k, pairs, &mut xs);
                let mut ys = vec![0f32; xs.len()];
                ffn.forward(&xs, pairs.len(), &mut ys)?;
                for (i, &p) in pairs.iter().enumerate() {
                    y[p as usize * h..(p as usize + 1) * h].copy_from_slice(&ys[i * h..(i + 1) * h]);
                }
            }
            Ok(y)
        })
        .await??;
        let output = combine(h, &routing, &y, shared.as_deref());
        Ok(MoeOutput { output, routing, epoch: 0 })
    }
}
