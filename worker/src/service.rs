//! What a worker serves: `ExpertService` (compute routed rows of the experts it holds) and
//! `MoeLayer` (the whole block through the dispatcher, for callers in other languages).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use expertmesh_core::dtype::DType;
use expertmesh_core::ModelSpec;
use expertmesh_dispatcher::collective::ComputeSink;
use expertmesh_dispatcher::transport::SendHeader;
use expertmesh_kernels::{ExpertBackend, Groups, HostRows, LayerExperts, Rows};
use expertmesh_proto::v1::expert_service_server::ExpertService;
use expertmesh_proto::v1::moe_layer_server::MoeLayer;
use expertmesh_proto::v1::{
    CountersRequest, CountersResponse, DescribeRequest, ExpertBatch, ExpertLoad, ExpertResult, ForwardRequest,
    ForwardResponse, ModelDescription, Tensor,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use expertmesh_trust::{authorize, Need};

use crate::admission::{Budget, Connections, PeerStreams};
use crate::error::{Result, WorkerError};
use crate::limits::{check_batch, check_finite_bytes, check_forward_shape, BatchShape, Limits, StreamCheck};
use expertmesh_dispatcher::compute::on_pool;
use expertmesh_dispatcher::dispatcher::Dispatcher;
use expertmesh_dispatcher::moe::MoeInput;
use expertmesh_dispatcher::wire::{
    dtype_from_proto, dtype_to_proto, f32_tensor, grpc_deadline, i64_tensor, tensor_to_f32, tensor_to_i64,
};

/// Each layer's resident experts, by layer.
type LayerMap = HashMap<u32, Arc<dyn LayerExperts>>;

/// The experts a worker holds (one resident object per layer), its epoch, and per-expert
/// token counters.
#[derive(Debug)]
pub struct ExpertStore {
    worker_id: String,
    spec: ModelSpec,
    backend: Arc<dyn ExpertBackend>,
    epoch: AtomicU64,
    layers: RwLock<Arc<LayerMap>>,
    /// Tokens computed, index layer * n_routed + expert.
    counters: Vec<AtomicU64>,
    /// Seconds per computed chunk, queued to done.
    compute_seconds: expertmesh_core::metrics::Histogram,
}

impl ExpertStore {
    pub fn new(worker_id: String, spec: ModelSpec, backend: Arc<dyn ExpertBackend>) -> Self {
        let n = spec.num_layers * spec.n_routed;
        Self {
            worker_id,
            spec,
            backend,
            epoch: AtomicU64::new(0),
            layers: RwLock::new(Arc::new(HashMap::new())),
            counters: (0..n).map(|_| AtomicU64::new(0)).collect(),
            compute_seconds: expertmesh_core::metrics::Histogram::new(&expertmesh_core::metrics::LATENCY_BUCKETS),
        }
    }

    pub fn compute_seconds(&self) -> &expertmesh_core::metrics::Histogram {
        &self.compute_seconds
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn backend(&self) -> &Arc<dyn ExpertBackend> {
        &self.backend
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn set_epoch(&self, e: u64) {
        self.epoch.store(e, Ordering::Release);
    }

    fn snapshot(&self) -> Arc<LayerMap> {
        self.layers.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// The resident experts of `layer`, if any.
    pub fn layer(&self, layer: u32) -> Option<Arc<dyn LayerExperts>> {
        self.snapshot().get(&layer).cloned()
    }

    pub fn holds(&self, layer: u32, expert: u32) -> bool {
        self.snapshot().get(&layer).is_some_and(|l| l.holds(expert))
    }

    pub fn held(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<_> =
            self.snapshot().iter().flat_map(|(&l, x)| x.experts().into_iter().map(move |e| (l, e))).collect();
        v.sort();
        v
    }

    /// Bytes the held experts' weights occupy on the backend.
    pub fn resident_bytes(&self) -> u64 {
        self.snapshot().values().map(|l| l.bytes()).sum()
    }

    /// Replace layers with new resident objects (made before an epoch switch).
    pub fn insert(&self, loaded: Vec<Arc<dyn LayerExperts>>) {
        if let Ok(mut g) = self.layers.write() {
            let mut m = (**g).clone();
            for l in loaded {
                m.insert(l.layer() as u32, l);
            }
            *g = Arc::new(m);
        }
    }

    /// Keep only `keep`; in-flight batches hold their own references, so nothing they use is
    /// freed under them.
    pub fn retain(&self, keep: &std::collections::HashSet<(u32, u32)>) -> Result<()> {
        let Ok(mut g) = self.layers.write() else { return Err(WorkerError::Internal("expert map poisoned".into())) };
        let mut m = LayerMap::new();
        for (&l, x) in g.iter() {
            let held = x.experts();
            let kept: Vec<u32> = held.iter().copied().filter(|&e| keep.contains(&(l, e))).collect();
            if kept.len() == held.len() {
                m.insert(l, x.clone());
            } else if !kept.is_empty() {
                m.insert(l, x.subset(&kept)?);
            }
        }
        *g = Arc::new(m);
        Ok(())
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

    /// Compute one chunk that [`check_batch`] accepted; answers the same rows in the same order.
    /// The resident layer holding every one of `experts`, or the "not held" answer with this
    /// worker's placement epoch.
    fn holding(&self, layer: u32, experts: &[u32], request_epoch: u64) -> Result<Arc<dyn LayerExperts>> {
        let l = self.layer(layer);
        let missing = experts.iter().find(|&&e| !l.as_ref().is_some_and(|l| l.holds(e)));
        match (l, missing) {
            (Some(l), None) => Ok(l),
            (_, missing) => {
                let epoch = self.epoch();
                let e = missing.copied().unwrap_or_default();
                Err(WorkerError::NotHeld {
                    epoch,
                    detail: format!(
                        "worker {} does not hold layer {layer} expert {e} (its placement epoch is {epoch}; the request used epoch {request_epoch})",
                        self.worker_id
                    ),
                })
            }
        }
    }

    fn count(&self, layer: u32, experts: &[u32], rows: &[u32]) {
        for (&e, &r) in experts.iter().zip(rows) {
            if let Some(c) = self.counters.get(layer as usize * self.spec.n_routed + e as usize) {
                let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(r as u64)));
            }
        }
    }

    pub async fn compute_chunk(&self, b: ExpertBatch, shape: BatchShape) -> Result<ExpertResult> {
        let s = &self.spec;
        let layer = self.holding(b.layer, &b.experts, b.epoch)?;
        let (h, dtype, rows) = (s.hidden, shape.dtype, shape.rows);
        check_finite_bytes(dtype, &b.data, h, "ExpertBatch.data")?;
        let groups = Groups::from_counts(b.experts.iter().zip(&b.rows).map(|(&e, &r)| (e, r as usize)));
        let backend = self.backend.clone();
        let data = b.data.clone();
        let queued = Instant::now();
        let (out, started, computed) = on_pool(move || -> Result<(Bytes, Instant, Duration)> {
            let started = Instant::now();
            let x = backend.upload(HostRows::new(dtype, rows, h, data)?)?;
            let mut y = backend.alloc(dtype, rows, h)?;
            layer.forward(&*x, &groups, &mut *y)?;
            Ok((backend.download(y)?.data, started, started.elapsed()))
        })
        .await??;
        debug!(
            layer = b.layer,
            rows,
            experts = b.experts.len(),
            queue_us = (started - queued).as_micros() as u64,
            compute_us = computed.as_micros() as u64,
            back_us = (started.elapsed() - computed).as_micros() as u64,
            "chunk computed"
        );
        self.count(b.layer, &b.experts, &b.rows);
        self.compute_seconds.observe(queued.elapsed().as_secs_f64());
        Ok(ExpertResult { chunk: b.chunk, dtype: dtype_to_proto(dtype), rows: rows as u32, data: out })
    }
}

/// The experts of a worker as its NCCL group computes with them: rows arrive on the device
/// and their answers stay there.
impl ComputeSink for ExpertStore {
    fn compute(&self, h: &SendHeader, experts: &[u32], rows: &[u32], x: &dyn Rows) -> Result<Box<dyn Rows>> {
        let s = &self.spec;
        if h.hidden != s.hidden || h.layer as usize >= s.num_layers || experts.len() != rows.len() {
            return Err(WorkerError::InvalidInput(format!(
                "a group chunk of layer {} with hidden {} and {} groups for {} row counts; the model has {} layers of hidden {}",
                h.layer,
                h.hidden,
                experts.len(),
                rows.len(),
                s.num_layers,
                s.hidden
            )));
        }
        if let Some(&e) = experts.iter().find(|&&e| e as usize >= s.n_routed) {
            return Err(WorkerError::InvalidInput(format!("expert {e}; the model has {}", s.n_routed)));
        }
        let layer = self.holding(h.layer, experts, h.epoch)?;
        let groups = Groups::from_counts(experts.iter().zip(rows).map(|(&e, &r)| (e, r as usize)));
        let mut y = self.backend.alloc(h.dtype, x.rows(), x.cols())?;
        layer.forward(x, &groups, &mut *y)?;
        self.count(h.layer, experts, rows);
        Ok(y)
    }
}

/// Admission settings of a worker's servers (flags of `expertmesh worker`).
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub limits: Limits,
    /// Bytes of ExpertService chunks in flight (`--max-inflight-mib`).
    pub compute_budget_bytes: u64,
    /// Bytes of MoeLayer.Forward requests in flight on this entry worker
    /// (`--max-forward-inflight-mib`). A separate budget: a Forward waits on chunks that may
    /// land on this same worker, so one shared budget could deadlock.
    pub forward_budget_bytes: u64,
    /// Concurrent streams and calls per peer connection (`--max-streams-per-peer`).
    pub max_streams_per_peer: usize,
    /// Open connections (`--max-connections`).
    pub max_connections: usize,
    /// Open connections from one IP address (`--max-connections-per-ip`).
    pub max_connections_per_ip: usize,
    /// How long a request waits for room before RESOURCE_EXHAUSTED (`--admission-wait-ms`).
    pub admission_wait: Duration,
    /// A peer that does not read its answers for this long loses its connection
    /// (`--stall-timeout-ms`).
    pub stall_timeout: Duration,
    /// A Compute stream whose peer sends nothing (no chunk, no end) for this long is closed
    /// with DEADLINE_EXCEEDED (`--stream-idle-timeout-ms`).
    pub stream_idle_timeout: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            compute_budget_bytes: 1 << 30,
            forward_budget_bytes: 2 << 30,
            max_streams_per_peer: 64,
            max_connections: 1024,
            max_connections_per_ip: 256,
            admission_wait: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// One worker's admission state, shared by its services.
#[derive(Debug)]
pub struct Admission {
    pub cfg: AdmissionConfig,
    pub compute: Budget,
    pub forward: Budget,
    pub peers: Arc<PeerStreams>,
    pub conns: Arc<Connections>,
    /// Calls answered RESOURCE_EXHAUSTED.
    pub refused: AtomicU64,
}

impl Admission {
    pub fn new(cfg: AdmissionConfig, worker_id: &str) -> Arc<Self> {
        let owner = format!("worker {worker_id}");
        Arc::new(Self {
            compute: Budget::new(cfg.compute_budget_bytes, "in-flight activation", "--max-inflight-mib", &owner),
            forward: Budget::new(cfg.forward_budget_bytes, "in-flight Forward", "--max-forward-inflight-mib", &owner),
            peers: PeerStreams::new(cfg.max_streams_per_peer, &owner),
            conns: Connections::new(cfg.max_connections, cfg.max_connections_per_ip),
            refused: AtomicU64::new(0),
            cfg,
        })
    }

    /// Requests refused at admission (RESOURCE_EXHAUSTED).
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Count a refusal and turn it into the status the caller gets.
    fn refuse(&self, e: WorkerError) -> Status {
        if matches!(e, WorkerError::ResourceExhausted(_)) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            debug!(error = %e, "request refused at admission");
        }
        Status::from(e)
    }
}

/// gRPC `ExpertService` over an [`ExpertStore`].
#[derive(Debug, Clone)]
pub struct ExpertServiceImpl {
    pub store: Arc<ExpertStore>,
    pub admission: Arc<Admission>,
    /// Whether the server requires mutual TLS (reported in Counters).
    pub mutual_tls: bool,
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<ExpertResult, Status>> + Send>>;
type Queued = Result<(ExpertBatch, BatchShape, OwnedSemaphorePermit), Status>;

#[tonic::async_trait]
impl ExpertService for ExpertServiceImpl {
    type ComputeStream = ResultStream;

    /// A reader checks each chunk (order, sizes, model) and reserves its bytes before queueing
    /// it; it stops reading while the queue is full, so HTTP/2 flow control holds the peer back.
    /// The computer answers each chunk in order; a peer that stops reading its answers past the
    /// stall timeout loses its connection.
    async fn compute(&self, req: Request<Streaming<ExpertBatch>>) -> Result<Response<Self::ComputeStream>, Status> {
        const SERVICE: &str = "ExpertService.Compute";
        let metrics = self.metrics.clone();
        let counted = |s: Status| {
            metrics.error(SERVICE, &s);
            s
        };
        authorize(&req, SERVICE, Need::Cluster).map_err(counted)?;
        let adm = self.admission.clone();
        let peer = expertmesh_trust::peer_addr(&req);
        let deadline = grpc_deadline(req.metadata());
        let slot = adm.peers.acquire(peer, adm.cfg.admission_wait).await.map_err(|e| counted(adm.refuse(e)))?;
        let mut inbound = req.into_inner();
        // An answer keeps its chunk's reservation until the transport takes it off this queue:
        // answers a peer does not read stay inside the budget.
        let (tx, rx) = tokio::sync::mpsc::channel::<(Result<ExpertResult, Status>, Option<OwnedSemaphorePermit>)>(2);
        let (qtx, mut qrx) = tokio::sync::mpsc::channel::<Queued>(2);
        let store = self.store.clone();
        let reader = {
            let (store, adm) = (store.clone(), adm.clone());
            tokio::spawn(async move {
                let mut order = StreamCheck::new(store.spec(), &adm.cfg.limits);
                let idle = adm.cfg.stream_idle_timeout;
                loop {
                    let m = match tokio::time::timeout(idle, inbound.next()).await {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(_) => {
                            warn!(peer = ?peer, ?idle, "Compute stream sent nothing; closing it");
                            Err(Status::deadline_exceeded(format!(
                                "worker {}: the stream sent nothing for {idle:?} (--stream-idle-timeout-ms); closed",
                                store.worker_id()
                            )))
                        }
                    };
                    let item = match m {
                        Err(s) => Err(s),
                        Ok(b) => {
                            let checked = check_batch(store.spec(), &adm.cfg.limits, &b)
                                .and_then(|shape| order.admit(b.chunk, shape.rows).map(|()| shape));
                            match checked {
                                Err(e) => Err(Status::from(e)),
                                Ok(shape) => {
                                    match adm.compute.acquire(shape.cost_bytes, adm.cfg.admission_wait).await {
                                        Ok(permit) => Ok((b, shape, permit)),
                                        Err(e) => Err(adm.refuse(e)),
                                    }
                                }
                            }
                        }
                    };
                    let stop = item.is_err();
                    if qtx.send(item).await.is_err() || stop {
                        break;
                    }
                }
            })
        };
        tokio::spawn(async move {
            let _slot = slot;
            while let Some(item) = qrx.recv().await {
                let (r, permit) = match item {
                    Ok((b, shape, permit)) => {
                        let r = if deadline.is_some_and(|d| Instant::now() >= d) {
                            Err(Status::deadline_exceeded(format!(
                                "worker {}: the stream's deadline passed before chunk {} was computed",
                                store.worker_id(),
                                b.chunk
                            )))
                        } else {
                            store.compute_chunk(b, shape).await.map_err(Status::from)
                        };
                        (r, Some(permit))
                    }
                    Err(s) => (Err(s), None),
                };
                let failed = r.is_err();
                if let Err(s) = &r {
                    metrics.error(SERVICE, s);
                }
                match tokio::time::timeout(adm.cfg.stall_timeout, tx.send((r, permit))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break, // the caller went away (cancelled, or a hedge won)
                    Err(_) => {
                        warn!(peer = ?peer, stall = ?adm.cfg.stall_timeout, "peer stopped reading its answers; cutting its connection");
                        if let Some(p) = peer {
                            adm.conns.cut(p);
                        }
                        break;
                    }
                }
                if failed {
                    break;
                }
            }
            reader.abort();
        });
        let answers = tokio_stream::wrappers::ReceiverStream::new(rx).map(|(r, _reservation)| r);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn counters(&self, req: Request<CountersRequest>) -> Result<Response<CountersResponse>, Status> {
        authorize(&req, "ExpertService.Counters", Need::Cluster)?;
        let (a, b) = expertmesh_trust::authz::refusals();
        Ok(Response::new(CountersResponse {
            worker_id: self.store.worker_id.clone(),
            experts: self.store.counters(),
            refused_calls: a + b,
            mutual_tls: self.mutual_tls,
        }))
    }
}

/// gRPC `MoeLayer` over a [`Dispatcher`].
#[derive(Debug, Clone)]
pub struct MoeLayerImpl {
    pub dispatcher: Arc<Dispatcher>,
    pub admission: Arc<Admission>,
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
}

/// Bytes one Forward of `tokens` tokens holds while it is dispatched: its input, the routed rows
/// and their answers (top-k per token), the shared expert's output, the output, and the encoded
/// chunks on the wire.
pub fn forward_cost(spec: &ModelSpec, tokens: usize) -> u64 {
    let (h, k) = (spec.hidden as u64, spec.top_k as u64);
    (tokens as u64).saturating_mul(h).saturating_mul(4 * (k + 4) + 2 * k)
}

/// The tokens of a Forward request and its `hidden_states`, present and [T, hidden] with T
/// within the limit. No allocation.
pub fn forward_tokens<'a>(spec: &ModelSpec, limits: &Limits, r: &'a ForwardRequest) -> Result<(usize, &'a Tensor)> {
    let hs = r.hidden_states.as_ref().ok_or_else(|| {
        WorkerError::InvalidInput("ForwardRequest.hidden_states is required (f32 [T, hidden])".into())
    })?;
    Ok((check_forward_shape(spec, limits, hs)?, hs))
}

/// Decode a ForwardRequest into the dispatcher's input: every size is checked against the model
/// and the limits before anything is allocated.
pub fn forward_input(spec: &ModelSpec, limits: &Limits, r: &ForwardRequest) -> Result<(MoeInput, DType)> {
    let (tokens, hs) = forward_tokens(spec, limits, r)?;
    let (x, _) = tensor_to_f32(hs, "hidden_states")?;
    let ids = match &r.input_ids {
        Some(t) if !t.shape.is_empty() || !t.data.is_empty() => {
            if t.shape.len() != 1 || t.shape[0] != tokens as u64 {
                return Err(WorkerError::InvalidInput(format!(
                    "input_ids has shape {:?}; expected [{tokens}] (one id per token of hidden_states)",
                    t.shape
                )));
            }
            let (ids, _) = tensor_to_i64(t, "input_ids")?;
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
    Ok((MoeInput { layer: r.layer as usize, tokens, hidden_states: x, input_ids: ids }, wire))
}

#[tonic::async_trait]
impl MoeLayer for MoeLayerImpl {
    /// Idempotent: the same request always gets the same answer, so a caller may retry it on any
    /// worker (after UNAVAILABLE, or a broken connection).
    async fn forward(&self, req: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        let t = Instant::now();
        let r = self.forward_inner(req).await;
        self.metrics.forward.observe(t.elapsed().as_secs_f64());
        if let Err(s) = &r {
            self.metrics.error("MoeLayer.Forward", s);
        }
        r
    }

    async fn describe(&self, req: Request<DescribeRequest>) -> Result<Response<ModelDescription>, Status> {
        authorize(&req, "MoeLayer.Describe", Need::Cluster)?;
        Ok(Response::new(describe(self.dispatcher.spec())))
    }
}

impl MoeLayerImpl {
    async fn forward_inner(&self, req: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        authorize(&req, "MoeLayer.Forward", Need::Cluster)?;
        let adm = &self.admission;
        let deadline = grpc_deadline(req.metadata());
        let peer = expertmesh_trust::peer_addr(&req);
        let _slot = adm.peers.acquire(peer, adm.cfg.admission_wait).await.map_err(|e| adm.refuse(e))?;
        let spec = self.dispatcher.spec().clone();
        let r = req.get_ref();
        let (tokens, _) = forward_tokens(&spec, &adm.cfg.limits, r)?;
        let _permit = adm
            .forward
            .acquire(forward_cost(&spec, tokens), adm.cfg.admission_wait)
            .await
            .map_err(|e| adm.refuse(e))?;
        let (inp, wire) = forward_input(&spec, &adm.cfg.limits, r)?;
        let out = self.dispatcher.forward_until(inp, wire, deadline).await?;
        let k = out.routing.top_k;
        let idx: Vec<i64> = out.routing.indices.iter().map(|&v| v as i64).collect();
        Ok(Response::new(ForwardResponse {
            output: Some(f32_tensor(&[tokens, spec.hidden], &out.output)),
            topk_indices: Some(i64_tensor(&[tokens, k], &idx)),
            topk_weights: Some(f32_tensor(&[tokens, k], &out.routing.weights)),
            epoch: out.epoch,
        }))
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
