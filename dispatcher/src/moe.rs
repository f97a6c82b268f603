//! The token owner's side of one MoE layer, shared by the in-process layer and the
//! distributed dispatcher: input checks, the gate, grouping routed pairs by expert, the shared
//! expert, and the combine in a fixed order (results never depend on arrival order).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use expertmesh_core::dtype::{decode_f32, encode_f32, DType};
use expertmesh_core::gating::{route, GateInputs, Routing};
use expertmesh_core::ModelSpec;
use expertmesh_kernels::{ExpertBackend, Groups, HostRows, LayerExperts};
use rayon::prelude::*;
use tokio::sync::OnceCell;

use crate::checkpoint::{Checkpoint, GateWeights};
use crate::compute::on_pool;
use crate::error::{Error, Result};

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
    pub shared: Option<Arc<dyn LayerExperts>>,
}

/// Experts loaded per layer at most once, however many requests ask at the same time.
type OnceMap<T> = Mutex<HashMap<usize, Arc<OnceCell<T>>>>;

fn cell<T>(map: &OnceMap<T>, layer: usize) -> Result<Arc<OnceCell<T>>> {
    Ok(map.lock().map_err(|_| poisoned())?.entry(layer).or_default().clone())
}

/// Experts loaded into one resident layer per call, so that a layer of hundreds of experts
/// never has all of its checkpoint bytes in memory twice.
pub const LOAD_BATCH: usize = 8;

/// Make `experts` of `layer` resident on `backend` on top of `prev` (keeping `keep` of it),
/// reading and packing [`LOAD_BATCH`] experts at a time. Runs on the calling thread.
pub fn load_experts(
    ck: &Checkpoint,
    backend: &dyn ExpertBackend,
    layer: usize,
    experts: &[u32],
    mut prev: Option<Arc<dyn LayerExperts>>,
    keep: &[u32],
) -> Result<Arc<dyn LayerExperts>> {
    let mut kept: Vec<u32> = keep.to_vec();
    let mut batches: Vec<&[u32]> = experts.chunks(LOAD_BATCH).collect();
    if batches.is_empty() {
        // Nothing new: the layer is `keep` of `prev`.
        batches.push(&[]);
    }
    for batch in batches {
        let l = backend.load_layer(ck.layer_weights(layer, batch)?, prev.as_ref().map(|p| (p, kept.as_slice())))?;
        kept = l.experts();
        prev = Some(l);
    }
    release_freed_memory();
    prev.ok_or_else(|| Error::Internal("no resident layer".into()))
}

/// Hand memory freed by loading (read buffers, replaced layers) back to the OS. glibc keeps
/// freed blocks of a few MiB in its heap once its mmap threshold has adapted upwards, which kept
/// ~0.1x of the checkpoint bytes resident after a load.
#[allow(unsafe_code)]
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `rows` rows of `x` through expert `expert` of `layer`, f32 in and out, computed on
/// activations of `act` (bf16 or f32).
pub fn ffn_rows(
    backend: &dyn ExpertBackend,
    layer: &dyn LayerExperts,
    expert: u32,
    x: &[f32],
    rows: usize,
    act: DType,
) -> Result<Vec<f32>> {
    let h = layer.hidden();
    let host = match act {
        DType::F32 => HostRows::from_f32(rows, h, x)?,
        _ => {
            let mut bytes = Vec::with_capacity(x.len() * act.size());
            encode_f32(act, x, &mut bytes)?;
            HostRows::new(act, rows, h, Bytes::from(bytes))?
        }
    };
    let input = backend.upload(host)?;
    let mut out = backend.alloc(act, rows, h)?;
    layer.forward(&*input, &Groups::from_counts([(expert, rows)]), &mut *out)?;
    let out = backend.download(out)?;
    let mut y = vec![0f32; rows * h];
    decode_f32(act, &out.data, &mut y)?;
    Ok(y)
}

/// Loads and caches each layer's router and shared expert; validates inputs; gates.
#[derive(Debug)]
pub struct Frontend {
    ck: Arc<Checkpoint>,
    backend: Arc<dyn ExpertBackend>,
    layers: OnceMap<Arc<LayerFront>>,
    loads: AtomicU64,
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
        Self { ck, backend, layers: Mutex::new(HashMap::new()), loads: AtomicU64::new(0) }
    }

    /// How many times a layer's router and shared expert were read from the checkpoint.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
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

    /// The layer's router and shared expert, read from the checkpoint once: concurrent first
    /// requests wait for the same load.
    pub async fn layer(&self, layer: usize) -> Result<Arc<LayerFront>> {
        let cell = cell(&self.layers, layer)?;
        let front = cell
            .get_or_try_init(|| async {
                let ck = self.ck.clone();
                let backend = self.backend.clone();
                self.loads.fetch_add(1, Ordering::Relaxed);
                let front = on_pool(move || -> Result<LayerFront> {
                    let gate = ck.load_gate(layer)?;
                    let shared = match ck.shared_weights(layer)? {
                        Some(w) => Some(backend.load_layer(w, None)?),
                        None => None,
                    };
                    Ok(LayerFront { layer, gate, shared })
                })
                .await??;
                Ok::<_, Error>(Arc::new(front))
            })
            .await?;
        Ok(front.clone())
    }

    /// Check a request against the model before any work is done.
    pub fn validate(&self, inp: &MoeInput) -> Result<()> {
        validate_input(self.spec(), inp)
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

/// Check a request against the model `s` before any work is done: layer, shape, finite
/// values, and token ids for a hash-routed layer.
pub fn validate_input(s: &ModelSpec, inp: &MoeInput) -> Result<()> {
    s.check_moe_layer(inp.layer)?;
    if inp.tokens == 0 {
        return Err(Error::InvalidInput("hidden_states has 0 tokens; expected at least 1".into()));
    }
    if inp.hidden_states.len() != inp.tokens * s.hidden {
        return Err(Error::InvalidInput(format!(
            "hidden_states has {} values for {} tokens; expected [{}, {}] (hidden size {})",
            inp.hidden_states.len(),
            inp.tokens,
            inp.tokens,
            s.hidden,
            s.hidden
        )));
    }
    if let Some(i) = inp.hidden_states.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidInput(format!(
            "hidden_states has a non-finite value ({}) at token {} (hidden index {}); activations must be finite",
            inp.hidden_states[i],
            i / s.hidden,
            i % s.hidden
        )));
    }
    if s.is_hash_layer(inp.layer) {
        let ids = inp.input_ids.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!(
                "layer {} is hash-routed and needs input_ids (i64 [{}])",
                inp.layer, inp.tokens
            ))
        })?;
        if ids.len() != inp.tokens {
            return Err(Error::InvalidInput(format!(
                "input_ids has {} tokens; hidden_states has {}",
                ids.len(),
                inp.tokens
            )));
        }
        if let Some((t, id)) = ids.iter().enumerate().find(|(_, id)| **id < 0 || **id as usize >= s.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "input_ids[{t}] = {id} is outside the vocabulary (0..{})",
                s.vocab_size
            )));
        }
    }
    Ok(())
}

/// The shared expert's output [tokens, hidden], if the model has one, on the compute pool, on
/// activations of `act`: the dtype the routed rows travel and compute in (bf16 or f32).
pub async fn shared_expert(
    backend: Arc<dyn ExpertBackend>,
    front: Arc<LayerFront>,
    inp: Arc<MoeInput>,
    act: DType,
) -> Result<Option<Vec<f32>>> {
    let Some(ffn) = front.shared.clone() else { return Ok(None) };
    on_pool(move || {
        let mut y = ffn_rows(&*backend, &*ffn, 0, &inp.hidden_states, inp.tokens, act)?;
        if let Some(g) = &front.gate.shared_gate {
            // Qwen2-MoE: scaled per token by sigmoid(x . shared_expert_gate).
            let h = g.len();
            for (yt, xt) in y.chunks_exact_mut(h).zip(inp.hidden_states.chunks_exact(h)) {
                let z: f32 = xt.iter().zip(g).map(|(a, b)| a * b).sum();
                let scale = 1.0 / (1.0 + (-z).exp());
                yt.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(Some(y))
    })
    .await?
}

fn poisoned() -> Error {
    Error::Internal("layer cache lock poisoned".into())
}

/// `out[t] = sum_j w[t, j] * y[t * k + j] + shared[t]`, summed in slot order j = 0..k. Tokens
/// are spread over the rayon pool; each token's sum has the same fixed order on any thread.
pub fn combine(hidden: usize, routing: &Routing, y: &[f32], shared: Option<&[f32]>) -> Vec<f32> {
    let k = routing.top_k;
    let tokens = routing.tokens();
    let mut out = match shared {
        Some(s) => s.to_vec(),
        None => vec![0f32; tokens * hidden],
    };
    // Routed sum first, in slot order, then the shared expert: a fixed order.
    let one = |acc: &mut Vec<f32>, (t, o): (usize, &mut [f32])| {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for j in 0..k {
            let p = t * k + j;
            let w = routing.weights[p];
            for (a, v) in acc.iter_mut().zip(&y[p * hidden..(p + 1) * hidden]) {
                *a += w * v;
            }
        }
        for (o, a) in o.iter_mut().zip(acc.iter()) {
            *o += a;
        }
    };
    if tokens * k * hidden < PARALLEL_ELEMENTS {
        let mut acc = vec![0f32; hidden];
        out.chunks_mut(hidden).enumerate().for_each(|c| one(&mut acc, c));
    } else {
        out.par_chunks_mut(hidden).enumerate().for_each_init(|| vec![0f32; hidden], one);
    }
    out
}

/// Below this many elements, a pass over rows stays on the calling thread: handing it to the
/// pool costs more than it saves at decode sizes.
pub const PARALLEL_ELEMENTS: usize = 1 << 18;

/// [`combine`] without holding an async runtime thread for long: large batches run on the
/// compute pool, decode sizes inline. Gives the routing back with the output.
pub async fn combine_off_runtime(
    hidden: usize,
    routing: Routing,
    y: Vec<f32>,
    shared: Option<Vec<f32>>,
) -> Result<(Vec<f32>, Routing)> {
    if routing.indices.len() * hidden < PARALLEL_ELEMENTS {
        let out = combine(hidden, &routing, &y, shared.as_deref());
        return Ok((out, routing));
    }
    on_pool(move || {
        let out = combine(hidden, &routing, &y, shared.as_deref());
        (out, routing)
    })
    .await
}

/// The whole MoE layer in this process, with the same backend as a worker: the baseline the
/// distributed path is measured and checked against.
#[derive(Debug)]
pub struct LocalMoe {
    front: Frontend,
    experts: OnceMap<Arc<dyn LayerExperts>>,
    activations: DType,
    loads: AtomicU64,
}

impl LocalMoe {
    /// Experts computed on f32 activations.
    pub fn new(ck: Arc<Checkpoint>, backend: Arc<dyn ExpertBackend>) -> Self {
        Self {
            front: Frontend::new(ck, backend),
            experts: Mutex::new(HashMap::new()),
            activations: DType::F32,
            loads: AtomicU64::new(0),
        }
    }

    /// Routed rows go to the experts in `dtype` (bf16 or f32) and come back in it, as they
    /// travel on a wire of that dtype.
    pub fn with_activations(mut self, dtype: DType) -> Result<Self> {
        expertmesh_kernels::check_activation_dtype(dtype)?;
        self.activations = dtype;
        Ok(self)
    }

    pub fn frontend(&self) -> &Frontend {
        &self.front
    }

    /// How many times a layer's routed experts were read from the checkpoint.
    pub fn expert_loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Load every expert of `layer` now (so timing excludes loading).
    pub async fn preload(&self, layer: usize) -> Result<()> {
        self.front.layer(layer).await?;
        self.experts(layer).await?;
        Ok(())
    }

    async fn experts(&self, layer: usize) -> Result<Arc<dyn LayerExperts>> {
        let cell = cell(&self.experts, layer)?;
        let l = cell
            .get_or_try_init(|| async {
                self.front.spec().check_moe_layer(layer)?;
                let ck = self.front.checkpoint().clone();
                let backend = self.front.backend().clone();
                let all: Vec<u32> = (0..self.front.spec().n_routed as u32).collect();
                self.loads.fetch_add(1, Ordering::Relaxed);
                on_pool(move || load_experts(&ck, &*backend, layer, &all, None, &[])).await?
            })
            .await?;
        Ok(l.clone())
    }

    pub async fn forward(&self, inp: MoeInput) -> Result<MoeOutput> {
        self.front.validate(&inp)?;
        let inp = Arc::new(inp);
        let front = self.front.layer(inp.layer).await?;
        let routing = self.front.gate(&front, &inp).await?;
        let spec = self.front.spec().clone();
        let groups = ExpertGroups::new(&routing, spec.n_routed);
        let experts = self.experts(inp.layer).await?;
        let backend = self.front.backend().clone();
        // The shared expert runs beside the routed experts, as in the distributed layer.
        let shared = tokio::spawn(shared_expert(backend.clone(), front.clone(), inp.clone(), self.activations));
        let (h, k, act) = (spec.hidden, spec.top_k, self.activations);
        let inp2 = inp.clone();
        let y = on_pool(move || -> Result<Vec<f32>> {
            let rows = inp2.tokens * k;
            let mut order = Vec::with_capacity(rows);
            let mut segments = Vec::new();
            for (e, pairs) in groups.pairs.iter().enumerate() {
                if !pairs.is_empty() {
                    order.extend_from_slice(pairs);
                    segments.push((e as u32, pairs.len()));
                }
            }
            // Rows in expert order, encoded straight into the activation dtype, in parallel.
            let row_bytes = h * act.size();
            let mut bytes = vec![0u8; rows * row_bytes];
            bytes.par_chunks_mut(row_bytes).zip(order.par_iter()).try_for_each_init(
                || Vec::with_capacity(row_bytes),
                |buf, (dst, &p)| -> Result<()> {
                    let t = p as usize / k;
                    buf.clear();
                    encode_f32(act, &inp2.hidden_states[t * h..(t + 1) * h], buf)?;
                    dst.copy_from_slice(buf);
                    Ok(())
                },
            )?;
            let x = backend.upload(HostRows::new(act, rows, h, Bytes::from(bytes))?)?;
            let mut out = backend.alloc(act, rows, h)?;
            experts.forward(&*x, &Groups::from_counts(segments), &mut *out)?;
            let out = backend.download(out)?;
            // Back to pair order, decoded in parallel: row `at[p]` of the output is pair p's.
            let mut at = vec![0usize; rows];
            for (i, &p) in order.iter().enumerate() {
                at[p as usize] = i;
            }
            let mut y = vec![0f32; rows * h];
            y.par_chunks_mut(h).zip(at.par_iter()).try_for_each(|(dst, &i)| -> Result<()> {
                decode_f32(act, &out.data[i * row_bytes..(i + 1) * row_bytes], dst)?;
                Ok(())
            })?;
            Ok(y)
        })
        .await
        .and_then(|r| r);
        let y = match y {
            Ok(y) => y,
            Err(e) => {
                shared.abort();
                return Err(e);
            }
        };
        let shared = shared.await.map_err(|e| Error::Internal(format!("shared expert task: {e}")))??;
        let (output, routing) = combine_off_runtime(h, routing, y, shared).await?;
        Ok(MoeOutput { output, routing, epoch: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_core::rng::SplitMix64;

    /// The combine on the pool (large batches) and inline (decode sizes) both equal the weighted
    /// sum plus the shared output, summed in f64 here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn combine_matches_the_weighted_sum_inline_and_on_the_pool() {
        let (h, k) = (64, 4);
        for tokens in [1usize, 3, 2 * PARALLEL_ELEMENTS / (h * k)] {
            let mut r = SplitMix64::new(tokens as u64);
            let y: Vec<f32> = (0..tokens * k * h).map(|_| r.normal() as f32).collect();
            let shared: Vec<f32> = (0..tokens * h).map(|_| r.normal() as f32).collect();
            let weights: Vec<f32> = (0..tokens * k).map(|_| r.normal() as f32).collect();
            let routing = Routing { top_k: k, indices: vec![0; tokens * k], weights: weights.clone() };
            let (out, back) = combine_off_runtime(h, routing, y.clone(), Some(shared.clone())).await.unwrap();
            assert_eq!(back.weights, weights, "the routing comes back unchanged");
            for t in 0..tokens {
                for i in 0..h {
                    let want: f64 = shared[t * h + i] as f64
                        + (0..k).map(|j| weights[t * k + j] as f64 * y[(t * k + j) * h + i] as f64).sum::<f64>();
                    let got = out[t * h + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{tokens} tokens, [{t}, {i}]: {got} != {want}"
                    );
                }
            }
        }
    }
}
