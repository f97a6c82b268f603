//! What a worker serves: `ExpertService` (compute routed rows of the experts it holds) and
//! `MoeLayer` (the whole block through the dispatcher, for callers in other languages).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use expertmesh_core::dtype::{decode_f32, encode_f32, DType};
use expertmesh_core::ModelSpec;
use expertmesh_kernels::LoadedFfn;
use expertmesh_proto::v1::expert_service_server::ExpertService;
use expertmesh_proto::v1::moe_layer_server::MoeLayer;
use expertmesh_proto::v1::{
    CountersRequest, CountersResponse, DescribeRequest, ExpertBatch, ExpertLoad, ExpertResult, ForwardRequest,
    ForwardResponse, ModelDescription,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::compute::on_pool;
use crate::dispatcher::Dispatcher;
use crate::error::{Result, WorkerError};
use crate::moe::MoeInput;
use crate::wire::{dtype_from_proto, dtype_to_proto, f32_tensor, i64_tensor, tensor_to_f32, tensor_to_i64};

type ExpertMap = HashMap<(u32, u32), Arc<dyn LoadedFfn>>;

/// The experts a worker holds, its epoch, and per-expert token counters.
#[derive(Debug)]
pub struct ExpertStore {
    worker_id: String,
    spec: ModelSpec,
    epoch: AtomicU64,
    experts: RwLock<Arc<ExpertMap>>,
    /// Tokens computed, index layer * n_routed + expert.
    counters: Vec<AtomicU64>,
}

impl ExpertStore {
    pub fn new(worker_id: String, spec: ModelSpec) -> Self {
        let n = spec.num_layers * spec.n_routed;
        Self {
            worker_id,
            spec,
            epoch: AtomicU64::new(0),
            experts: RwLock::new(Arc::new(HashMap::new())),
            counters: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn set_epoch(&self, e: u64) {
        self.epoch.store(e, Ordering::Release);
    }

    fn snapshot(&self) -> Arc<ExpertMap> {
        self.experts.read().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn holds(&self, layer: u32, expert: u32) -> bool {
        self.snapshot().contains_key(&(layer, expert))
    }

    pub fn held(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<_> = self.snapshot().keys().copied().collect();
        v.sort();
        v
    }

    /// Add experts (loaded before an epoch switch).
    pub fn insert(&self, loaded: Vec<((u32, u32), Arc<dyn LoadedFfn>)>) {
        if let Ok(mut g) = self.experts.write() {
            let mut m = (**g).clone();
            m.extend(loaded);
            *g = Arc::new(m);
        }
    }

    /// Keep only `keep`; in-flight batches hold their own references, so nothing they use is
    /// freed under them.
    pub fn retain(&self, keep: &std::collections::HashSet<(u32, u32)>) {
        if let Ok(mut g) = self.experts.write() {
            let m: ExpertMap = g.iter().filter(|(k, _)| keep.contains(k)).map(|(k, v)| (*k, v.clone())).collect();
            *g = Arc::new(m);
        }
    }

    pub fn counters(&self) -> Vec<ExpertLoad> {
        let e = self.spec.n_routed;
        self.counters
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| ExpertLoad { layer: (i / e) as u32, expert: (i % e) as u32, tokens: n })
            })
            .collect()
    }

    /// Check and compute one chunk; answers the same rows in the same order.
    pub async fn compute_chunk(&self, b: ExpertBatch) -> Result<ExpertResult> {
        let s = &self.spec;
        let dtype = dtype_from_proto(b.dtype, "ExpertBatch.dtype")?;
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(WorkerError::InvalidInput(format!(
                "ExpertBatch.dtype {} is not an activation dtype; expected f32, bf16 or f16",
                dtype.name()
            )));
        }
        if b.hidden as usize != s.hidden {
            return Err(WorkerError::InvalidInput(format!(
                "ExpertBatch.hidden is {}; this model's hidden size is {}",
                b.hidden, s.hidden
            )));
        }
        s.check_moe_layer(b.layer as usize)?;
        if b.experts.len() != b.rows.len() {
            return Err(WorkerError::InvalidInput(format!(
                "ExpertBatch has {} experts but {} row counts; expected one count per expert",
                b.experts.len(),
                b.rows.len()
            )));
        }
        let rows: usize = b.rows.iter().map(|&r| r as usize).sum();
        let need = rows * s.hidden * dtype.size();
        if b.data.len() != need {
            return Err(WorkerError::InvalidInput(format!(
                "ExpertBatch.data has {} bytes; {rows} rows x hidden {} of {} need {need} (truncated tensor bytes)",
                b.data.len(),
                s.hidden,
                dtype.name()
            )));
        }
        let experts = self.snapshot();
        let mut ffns = Vec::with_capacity(b.experts.len());
        for &e in &b.experts {
            if e as usize >= s.n_routed {
                return Err(WorkerError::InvalidInput(format!(
                    "expert {e} is out of range: layer {} has experts 0..{}",
                    b.layer, s.n_routed
                )));
            }
            match experts.get(&(b.layer, e)) {
                Some(f) => ffns.push(f.clone()),
                None => {
                    return Err(WorkerError::NotHeld {
                        worker: self.worker_id.clone(),
                        layer: b.layer as usize,
                        expert: e as usize,
                        epoch: self.epoch(),
                        request_epoch: b.epoch,
                    })
                }
            }
        }
        let h = s.hidden;
        let seg_rows = b.rows.clone();
        let data = b.data.clone();
        let out = on_pool(move || -> Result<Vec<u8>> {
            let mut x = vec![0f32; rows * h];
            decode_f32(dtype, &data, &mut x)?;
            let mut y = vec![0f32; rows * h];
            let mut off = 0;
            for (ffn, &r) in ffns.iter().zip(&seg_rows) {
                let r = r as usize;
                ffn.forward(&x[off * h..(off + r) * h], r, &mut y[off * h..(off + r) * h])?;
                off += r;
            }
            let mut bytes = Vec::with_capacity(rows * h * dtype.size());
            encode_f32(dtype, &y, &mut bytes)?;
            Ok(bytes)
        })
        .await??;
        for (&e, &r) in b.experts.iter().zip(&b.rows) {
            self.counters[b.layer as usize * s.n_routed + e as usize].fetch_add(r as u64, Ordering::Relaxed);
        }
        Ok(ExpertResult { chunk: b.chunk, dtype: dtype_to_proto(dtype), rows: rows as u32, data: Bytes::from(out) })
    }
}

/// gRPC `ExpertService` over an [`ExpertStore`].
#[derive(Debug, Clone)]
pub struct ExpertServiceImpl {
    pub store: Arc<ExpertStore>,
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<ExpertResult, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for ExpertServiceImpl {
    type ComputeStream = ResultStream;

    async fn compute(&self, req: Request<Streaming<ExpertBatch>>) -> Result<Response<Self::ComputeStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Reader: pull chunks off the connection while earlier chunks compute.
        let (qtx, mut qrx) = tokio::sync::mpsc::channel::<Result<ExpertBatch, Status>>(8);
        tokio::spawn(async move {
            while let Some(m) = inbound.next().await {
                if qtx.send(m).await.is_err() {
                    break;
                }
            }
        });
        let store = self.store.clone();
        tokio::spawn(async move {
            while let Some(m) = qrx.recv().await {
                let r = match m {
                    Ok(b) => store.compute_chunk(b).await.map_err(Status::from),
                    Err(s) => Err(s),
                };
                let failed = r.is_err();
                if tx.send(r).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn counters(&self, _: Request<CountersRequest>) -> Result<Response<CountersResponse>, Status> {
        Ok(Response::new(CountersResponse { worker_id: self.store.worker_id.clone(), experts: self.store.counters() }))
    }
}

/// gRPC `MoeLayer` over a [`Dispatcher`].
#[derive(Debug, Clone)]
pub struct MoeLayerImpl {
    pub dispatcher: Arc<Dispatcher>,
}

/// Decode a ForwardRequest into the dispatcher's input.
pub fn forward_input(spec: &ModelSpec, r: &ForwardRequest) -> Result<(MoeInput, DType)> {
    let hs = r.hidden_states.as_ref().ok_or_else(|| {
        WorkerError::InvalidInput("ForwardRequest.hidden_states is required (f32 [T, hidden])".into())
    })?;
    let (x, shape) = tensor_to_f32(hs, "hidden_states")?;
    if shape.len() != 2 || shape[1] != spec.hidden {
        return Err(WorkerError::InvalidInput(format!(
            "hidden_states has shape {shape:?}; expected [T, {}] (hidden size {})",
            spec.hidden, spec.hidden
        )));
    }
    let ids = match &r.input_ids {
        Some(t) if !t.shape.is_empty() || !t.data.is_empty() => {
            let (ids, ishape) = tensor_to_i64(t, "input_ids")?;
            if ishape.len() != 1 {
                return Err(WorkerError::InvalidInput(format!("input_ids has shape {ishape:?}; expected [T]")));
            }
            Some(ids)
        }
        _ => None,
    };
    let wire = match r.wire_dtype {
        0 => DType::BF16,
        v => {
            let d = dtype_from_proto(v, "wire_dtype")?;
            if !matches!(d, DType::F32 | DType::BF16) {
                return Err(WorkerError::InvalidInput(format!("wire_dtype {}; expected bf16 or f32", d.name())));
            }
            d
        }
    };
    Ok((MoeInput { layer: r.layer as usize, tokens: shape[0], hidden_states: x, input_ids: ids }, wire))
}

#[tonic::async_trait]
impl MoeLayer for MoeLayerImpl {
    async fn forward(&self, req: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        let spec = self.dispatcher.spec().clone();
        let (inp, wire) = forward_input(&spec, req.get_ref())?;
        let tokens = inp.tokens;
        let out = self.dispatcher.forward(inp, wire).await?;
        let k = out.routing.top_k;
        let idx: Vec<i64> = out.routing.indices.iter().map(|&v| v as i64).collect();
        Ok(Response::new(ForwardResponse {
            output: Some(f32_tensor(&[tokens, spec.hidden], &out.output)),
            topk_indices: Some(i64_tensor(&[tokens, k], &idx)),
            topk_weights: Some(f32_tensor(&[tokens, k], &out.routing.weights)),
            epoch: out.epoch,
        }))
    }

    async fn describe(&self, _: Request<DescribeRequest>) -> Result<Response<ModelDescription>, Status> {
        Ok(Response::new(describe(self.dispatcher.spec())))
    }
}

pub fn describe(s: &ModelSpec) -> ModelDescription {
    let moe = s.moe_layers();
    ModelDescription {
        model_type: s.model_type.clone(),
        hidden: s.hidden as u32,
        num_layers: s.num_layers as u32,
        hash_layers: moe.iter().filter(|l| s.is_hash_layer(**l)).map(|&l| l as u32).collect(),
        moe_layers: moe.iter().map(|&l| l as u32).collect(),
        routed_experts: s.n_routed as u32,
        top_k: s.top_k as u32,
        vocab_size: s.vocab_size as u32,
    }
}
