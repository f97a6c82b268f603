//! The dispatcher: the token owner's side of distributed expert parallelism. Gate, choose a
//! replica for every routed pair under the committed placement, pack one chunked stream per
//! destination (rows grouped by expert), send all destinations concurrently, and combine in a
//! fixed order.
//!
//! A request is an event loop over its sends. Every routed pair is filled exactly once: the
//! first answer for it wins, later ones are dropped. What can go wrong with a destination, and
//! what the loop does:
//! - it fails (connection refused or broken, an internal error): the destination becomes
//!   suspect for every request of this dispatcher, is reported to the control plane, and its
//!   unanswered rows go to a live replica at once (or wait for a placement that names one);
//! - it goes silent past a budget learned from its own answers ([`crate::health`]): its
//!   unanswered rows are hedged to a live replica while the original stream keeps running;
//! - it answers "not held" (its placement moved on): its rows wait for the newer placement;
//! - it is at an admission limit (RESOURCE_EXHAUSTED): its rows try another replica;
//! - a newer placement no longer names it: its in-flight streams are cancelled and their rows
//!   re-routed.
//!
//! Nothing waits past the request's deadline (the caller's `grpc-timeout`, else
//! `request_timeout`): the request then fails DEADLINE_EXCEEDED naming the missing experts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use expertmesh_core::dtype::{decode_f32, encode_f32, DType};
use expertmesh_core::gating::Routing;
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::{PlacementPlan, WorkerInfo};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::health::{DestSnapshot, Health, HedgeConfig};
use crate::moe::{combine_off_runtime, shared_expert, validate_input, Frontend, MoeInput, MoeOutput};
pub use crate::transport::WireStats;
use crate::transport::{ExpertTransport, GrpcTransport, OutChunk, SendHeader};

/// The committed placement in the form the hot path reads.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub epoch: u64,
    pub workers: Vec<WorkerInfo>,
    /// layer -> expert -> replica worker indices.
    pub layers: HashMap<u32, Vec<Vec<u32>>>,
    /// layer -> expert -> each replica's share of the expert's rows (the order of `layers`);
    /// an expert missing here, or with shares that do not fit its replicas, splits evenly.
    pub shares: HashMap<u32, Vec<Vec<f32>>>,
}

impl RouteTable {
    pub fn from_plan(p: &PlacementPlan) -> Self {
        Self {
            epoch: p.epoch,
            workers: p.workers.clone(),
            layers: p.layers.iter().map(|l| (l.layer, l.experts.iter().map(|r| r.workers.clone()).collect())).collect(),
            shares: p
                .layers
                .iter()
                .filter(|l| l.experts.iter().any(|r| !r.shares.is_empty()))
                .map(|l| {
                    let valid = |r: &expertmesh_proto::v1::Replicas| {
                        r.shares.len() == r.workers.len()
                            && r.shares.iter().all(|x| x.is_finite() && *x >= 0.0)
                            && r.shares.iter().sum::<f32>() > 0.0
                    };
                    (l.layer, l.experts.iter().map(|r| if valid(r) { r.shares.clone() } else { Vec::new() }).collect())
                })
                .collect(),
        }
    }

    /// The shares of `live` (worker indices among expert `e`'s replicas in `layer`); even when
    /// the plan gives none.
    fn live_shares(&self, layer: u32, e: u32, live: &[u32]) -> Vec<f64> {
        let reps = self.layers.get(&layer).and_then(|l| l.get(e as usize));
        let shares = self.shares.get(&layer).and_then(|l| l.get(e as usize)).filter(|s| !s.is_empty());
        match (reps, shares) {
            (Some(reps), Some(shares)) => live
                .iter()
                .map(|w| reps.iter().position(|r| r == w).and_then(|i| shares.get(i)).map_or(0.0, |&x| f64::from(x)))
                .collect(),
            _ => vec![1.0; live.len()],
        }
    }

    fn names_address(&self, address: &str) -> bool {
        self.workers.iter().any(|w| w.address == address)
    }
}

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Target payload of one chunk on the wire.
    pub chunk_bytes: usize,
    pub max_message_bytes: usize,
    /// How long rows with no live owner wait for a (newer) placement before the request fails
    /// UNAVAILABLE.
    pub placement_wait: Duration,
    /// The longest a destination may stay silent before its stream is given up (its rows are
    /// hedged much sooner when a replica exists: see `hedge_min`).
    pub rpc_timeout: Duration,
    /// Deadline of a request whose caller gave none.
    pub request_timeout: Duration,
    /// A silent destination's rows are never hedged sooner than this after its last answer.
    pub hedge_min: Duration,
    /// Mutual TLS to the workers (each must present a `worker.<id>` certificate of the CA);
    /// None: plaintext.
    pub tls: Option<expertmesh_trust::Tls>,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 2 << 20,
            max_message_bytes: 64 << 20,
            placement_wait: Duration::from_secs(20),
            rpc_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            hedge_min: Duration::from_millis(20),
            tls: None,
        }
    }
}

impl DispatcherConfig {
    /// The gRPC transport with these settings' message limit and connect timeout.
    pub fn grpc_transport(&self) -> Arc<dyn ExpertTransport> {
        Arc::new(self.grpc())
    }

    /// The gRPC transport itself (to wrap in a [`crate::transport::RoutedTransport`]).
    pub fn grpc(&self) -> GrpcTransport {
        GrpcTransport::new(self.max_message_bytes, Duration::from_secs(5).min(self.rpc_timeout))
            .with_tls(self.tls.clone())
    }
}

/// Rows routed to one expert: (expert, pair indices).
pub type Segment = (u32, Vec<u32>);
/// The watch a dispatcher routes by: the latest committed placement, if any.
pub type RouteTableRx = watch::Receiver<Option<Arc<RouteTable>>>;
pub type RouteTableTx = watch::Sender<Option<Arc<RouteTable>>>;

/// One chunk of one destination's stream: (expert, pairs) segments in order.
#[derive(Debug, Clone)]
struct Chunk {
    segs: Vec<Segment>,
}

impl Chunk {
    fn rows(&self) -> usize {
        self.segs.iter().map(|s| s.1.len()).sum()
    }
}

fn plan_chunks(segs: Vec<Segment>, rows_per_chunk: usize) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut cur = Chunk { segs: Vec::new() };
    let mut room = rows_per_chunk;
    for (e, pairs) in segs {
        let mut rest = pairs.as_slice();
        while !rest.is_empty() {
            let n = rest.len().min(room);
            cur.segs.push((e, rest[..n].to_vec()));
            rest = &rest[n..];
            room -= n;
            if room == 0 {
                chunks.push(std::mem::replace(&mut cur, Chunk { segs: Vec::new() }));
                room = rows_per_chunk;
            }
        }
    }
    if !cur.segs.is_empty() {
        chunks.push(cur);
    }
    chunks
}

/// What a send task tells its request.
#[derive(Debug)]
enum SendEvent {
    /// One chunk answered: its pairs and their rows [pairs, hidden] in the wire dtype (length
    /// checked), decoded straight into the request's output.
    Answer { send: u64, pairs: Vec<u32>, rows: Bytes },
    /// Every chunk answered.
    Done { send: u64 },
    /// The stream ended with an error before every chunk was answered.
    Failed { send: u64, err: Error },
}

/// A number in [0, 1) from `x` (SplitMix64's finaliser).
fn unit_hash(x: u64) -> f64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// `n` rows over replicas with these shares (any non-negative scale; all zero: even): replica
/// `i` gets `floor(n * C_i + offset) - floor(n * C_(i-1) + offset)`, `C` the cumulative
/// normalised shares. The counts sum to `n`, each is within one of `n x share`, and over
/// offsets uniform in [0, 1) each averages exactly `n x share`.
pub fn split_by_shares(n: usize, shares: &[f64], offset: f64) -> Vec<usize> {
    if shares.is_empty() {
        return Vec::new();
    }
    let total: f64 = shares.iter().filter(|x| x.is_finite() && **x > 0.0).sum();
    let norm: Vec<f64> = if total > 0.0 {
        shares.iter().map(|&x| if x.is_finite() && x > 0.0 { x / total } else { 0.0 }).collect()
    } else {
        vec![1.0 / shares.len() as f64; shares.len()]
    };
    let mut out = Vec::with_capacity(shares.len());
    let (mut cum, mut prev) = (0.0, 0usize);
    for (i, s) in norm.iter().enumerate() {
        cum += s;
        let edge = if i + 1 == norm.len() { n } else { ((n as f64 * cum + offset).floor() as usize).min(n) };
        let edge = edge.max(prev);
        out.push(edge - prev);
        prev = edge;
    }
    out
}

/// Routes MoE layers across the cluster.
#[derive(Debug)]
pub struct Dispatcher {
    spec: ModelSpec,
    /// The checkpoint's routers and shared experts, when this dispatcher gates itself.
    router: Option<Frontend>,
    transport: Arc<dyn ExpertTransport>,
    table: RouteTableRx,
    cfg: DispatcherConfig,
    stats: Arc<WireStats>,
    health: Arc<Health>,
    next_id: AtomicU64,
    /// Epoch the client and health tables were last pruned at.
    pruned_epoch: AtomicU64,
    /// Where to send the ids of workers this dispatcher could not reach.
    unreachable: OnceLock<mpsc::UnboundedSender<String>>,
    /// Per model layer: (tokens, routed rows) dispatched.
    dispatched: Vec<(AtomicU64, AtomicU64)>,
}

impl Dispatcher {
    /// A dispatcher for `spec`'s layers that takes routing from its caller
    /// ([`Dispatcher::forward_routed`]); placement comes from `table`, rows travel over
    /// `transport`. [`Dispatcher::with_router`] lets it gate by itself.
    pub fn new(
        spec: ModelSpec,
        transport: Arc<dyn ExpertTransport>,
        table: RouteTableRx,
        cfg: DispatcherConfig,
    ) -> Self {
        let layers = spec.num_layers;
        let health = Health::new(HedgeConfig {
            min: cfg.hedge_min,
            initial: Duration::from_secs(1).min(cfg.rpc_timeout),
            cap: cfg.rpc_timeout,
            ratio: 0.1,
        });
        Self {
            spec,
            router: None,
            transport,
            table,
            cfg,
            stats: Arc::new(WireStats::default()),
            health,
            next_id: AtomicU64::new(1),
            pruned_epoch: AtomicU64::new(0),
            unreachable: OnceLock::new(),
            dispatched: (0..layers).map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect(),
        }
    }

    /// Send the id of every worker a request could not reach (not one that refused an expert
    /// it no longer holds, nor one at its admission limit) to `tx`, for the control plane.
    pub fn report_unreachable_to(&self, tx: mpsc::UnboundedSender<String>) {
        let _ = self.unreachable.set(tx);
    }

    /// Gate from the checkpoint's routers and add the shared experts ([`Dispatcher::forward`]).
    pub fn with_router(mut self, front: Frontend) -> Self {
        self.router = Some(front);
        self
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The checkpoint-backed router, if this dispatcher gates itself.
    pub fn frontend(&self) -> Option<&Frontend> {
        self.router.as_ref()
    }

    pub fn config(&self) -> &DispatcherConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &WireStats {
        &self.stats
    }

    /// (layer, tokens, routed rows) dispatched so far, for every layer that saw traffic.
    pub fn dispatched(&self) -> Vec<(usize, u64, u64)> {
        self.dispatched
            .iter()
            .enumerate()
            .map(|(l, (t, r))| (l, t.load(Ordering::Relaxed), r.load(Ordering::Relaxed)))
            .filter(|&(_, t, _)| t > 0)
            .collect()
    }

    /// What this dispatcher knows about each destination.
    pub fn destinations(&self) -> Vec<DestSnapshot> {
        self.health.snapshot()
    }

    /// The committed placement, waiting (bounded) for one newer than `after` if asked.
    pub async fn route_table(&self, after: Option<u64>) -> Result<Arc<RouteTable>> {
        self.route_table_until(after, Instant::now() + self.cfg.placement_wait).await
    }

    async fn route_table_until(&self, after: Option<u64>, until: Instant) -> Result<Arc<RouteTable>> {
        let mut rx = self.table.clone();
        let ok = |t: &Option<Arc<RouteTable>>| t.as_ref().is_some_and(|t| after.is_none_or(|a| t.epoch > a));
        let wait = tokio::time::timeout_at(until.into(), rx.wait_for(ok)).await;
        match wait {
            Ok(Ok(t)) => Ok(t.clone().expect("checked by wait_for")),
            Ok(Err(_)) => Err(Error::Unavailable("placement watch closed".into())),
            Err(_) => Err(Error::Unavailable(match after {
                None => format!(
                    "no placement committed within {:?} (`expertmesh status` says why: workers that cannot load their experts, or experts that do not fit the workers)",
                    self.cfg.placement_wait
                ),
                Some(e) => format!("no placement newer than epoch {e} within {:?}", self.cfg.placement_wait),
            })),
        }
    }

    /// Forget connections and health of workers no committed placement names any more.
    async fn prune(&self, table: &RouteTable) {
        if self.pruned_epoch.swap(table.epoch, Ordering::AcqRel) == table.epoch {
            return;
        }
        let keep: HashSet<String> = table.workers.iter().map(|w| w.address.clone()).collect();
        self.transport.retain(&keep);
        self.health.retain(&keep);
    }

    fn report(&self, worker_id: &str) {
        if let Some(tx) = self.unreachable.get() {
            let _ = tx.send(worker_id.to_string());
        }
    }

    /// Mark a destination suspect; start its health probe if none runs.
    fn suspect(&self, address: &str, why: &str) {
        if self.health.mark_suspect(address, why) {
            let rx = self.table.clone();
            let placed = move |a: &str| rx.borrow().as_ref().is_some_and(|t| t.names_address(a));
            self.health.spawn_probe(address.to_string(), self.transport.clone(), placed);
        }
    }

    /// One MoE block across the cluster, gated from the checkpoint, within `request_timeout`.
    pub async fn forward(&self, inp: MoeInput, wire: DType) -> Result<MoeOutput> {
        self.forward_until(inp, wire, None).await
    }

    /// One MoE block across the cluster (routed experts by the checkpoint's router, plus the
    /// shared expert), done by `deadline` (default: `request_timeout` from now) or failed
    /// DEADLINE_EXCEEDED naming what was missing. Needs [`Dispatcher::with_router`].
    pub async fn forward_until(&self, inp: MoeInput, wire: DType, deadline: Option<Instant>) -> Result<MoeOutput> {
        let Some(router) = &self.router else {
            return Err(Error::InvalidInput(
                "this dispatcher has no checkpoint to gate with; pass the routing (forward_routed)".into(),
            ));
        };
        check_wire(wire)?;
        router.validate(&inp)?;
        let arrived = Instant::now();
        let deadline = deadline.unwrap_or(arrived + self.cfg.request_timeout);
        let late = late_error(inp.layer, arrived, deadline);
        if deadline <= arrived {
            return Err(late("before it arrived"));
        }
        let (inp_layer, tokens) = (inp.layer, inp.tokens);
        let inp = Arc::new(inp);
        let front = tokio::time::timeout_at(deadline.into(), router.layer(inp.layer))
            .await
            .map_err(|_| late("while the layer's router loaded"))??;
        let routing = tokio::time::timeout_at(deadline.into(), router.gate(&front, &inp))
            .await
            .map_err(|_| late("while gating"))??;
        let gated = arrived.elapsed();
        // The shared expert runs on the compute pool while the routed rows are on the wire.
        let shared = tokio::spawn(shared_expert(router.backend().clone(), front.clone(), inp.clone(), wire));
        let (y, epoch) = match self.dispatch(inp, &routing.indices, wire, arrived, deadline).await {
            Ok(r) => r,
            Err(e) => {
                shared.abort();
                return Err(e);
            }
        };
        let routed = arrived.elapsed();
        let shared = shared.await.map_err(|e| Error::Internal(format!("shared expert task: {e}")))??;
        let with_shared = arrived.elapsed();
        let (output, routing) = combine_off_runtime(self.spec.hidden, routing, y, shared).await?;
        debug!(
            layer = inp_layer,
            tokens,
            gate_us = gated.as_micros() as u64,
            routed_us = routed.as_micros() as u64,
            shared_wait_us = (with_shared - routed).as_micros() as u64,
            total_us = arrived.elapsed().as_micros() as u64,
            "forward done"
        );
        Ok(MoeOutput { output, routing, epoch })
    }

    /// The routed experts of one MoE block across the cluster, with the caller's routing (an
    /// inference engine that gates on its own device): `routing.indices[t * k + j]` is token
    /// t's j-th expert and `routing.weights[t * k + j]` its weight. The output is
    /// `sum_j w[t, j] * expert_j(x[t])`, summed in slot order; the shared expert, if the model
    /// has one, is the caller's. No checkpoint is read.
    pub async fn forward_routed(
        &self,
        inp: MoeInput,
        routing: Routing,
        wire: DType,
        deadline: Option<Instant>,
    ) -> Result<MoeOutput> {
        check_wire(wire)?;
        validate_input(&self.spec, &inp)?;
        check_routing(&self.spec, &routing, inp.tokens)?;
        let arrived = Instant::now();
        let deadline = deadline.unwrap_or(arrived + self.cfg.request_timeout);
        if deadline <= arrived {
            return Err(late_error(inp.layer, arrived, deadline)("before it arrived"));
        }
        let (y, epoch) = self.dispatch(Arc::new(inp), &routing.indices, wire, arrived, deadline).await?;
        let (output, routing) = combine_off_runtime(self.spec.hidden, routing, y, None).await?;
        Ok(MoeOutput { output, routing, epoch })
    }

    /// Compute every routed pair (`expert_of[p]` for pair p = t * k + j) on the workers that
    /// hold the experts: the outputs [pairs, hidden] and the placement epoch used.
    async fn dispatch(
        &self,
        inp: Arc<MoeInput>,
        expert_of: &[u32],
        wire: DType,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<(Vec<f32>, u64)> {
        let layer = inp.layer;
        if let Some((t, r)) = self.dispatched.get(layer) {
            t.fetch_add(inp.tokens as u64, Ordering::Relaxed);
            r.fetch_add(expert_of.len() as u64, Ordering::Relaxed);
        }
        let rid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let current = self.table.borrow().clone();
        let table = match current {
            Some(t) => t,
            None => {
                let until = deadline.min(arrived + self.cfg.placement_wait);
                self.route_table_until(None, until).await.map_err(|e| {
                    if Instant::now() >= deadline {
                        late_error(layer, arrived, deadline)("waiting for a committed placement")
                    } else {
                        missing_error(layer, expert_of.to_vec(), &e.to_string())
                    }
                })?
            }
        };
        self.prune(&table).await;
        let mut flight = Flight::new(self, rid, inp, wire, expert_of, table, deadline, arrived);
        let y = flight.run().await?;
        Ok((y, flight.table.epoch))
    }
}

fn check_wire(wire: DType) -> Result<()> {
    match wire {
        DType::BF16 | DType::F32 => Ok(()),
        _ => Err(Error::InvalidInput(format!("wire dtype {}; expected bf16 or f32", wire.name()))),
    }
}

/// DEADLINE_EXCEEDED for a request on `layer`, saying where it was when the deadline passed.
fn late_error(layer: usize, arrived: Instant, deadline: Instant) -> impl Fn(&str) -> Error {
    move |what: &str| {
        Error::DeadlineExceeded(format!(
            "layer {layer}: the request's deadline ({:?} after it arrived) passed {what}",
            deadline.saturating_duration_since(arrived)
        ))
    }
}

/// A caller's routing against the model: top-k slots per token, experts in range, finite
/// weights.
fn check_routing(spec: &ModelSpec, r: &Routing, tokens: usize) -> Result<()> {
    let k = spec.top_k;
    if r.top_k != k {
        return Err(Error::InvalidInput(format!("routing has top_k {}; the model routes each token to {k}", r.top_k)));
    }
    for (what, n) in [("indices", r.indices.len()), ("weights", r.weights.len())] {
        if n != tokens * k {
            return Err(Error::InvalidInput(format!(
                "routing {what} has {n} entries; expected tokens x top_k = {tokens} x {k} = {}",
                tokens * k
            )));
        }
    }
    if let Some((p, e)) = r.indices.iter().enumerate().find(|(_, e)| **e as usize >= spec.n_routed) {
        return Err(Error::InvalidInput(format!(
            "routing indices[{p}] (token {}, slot {}) = expert {e}; the model has experts 0..{}",
            p / k,
            p % k,
            spec.n_routed
        )));
    }
    if let Some(p) = r.weights.iter().position(|w| !w.is_finite()) {
        return Err(Error::InvalidInput(format!(
            "routing weights[{p}] (token {}, slot {}) is {}; weights must be finite",
            p / k,
            p % k,
            r.weights[p]
        )));
    }
    Ok(())
}

/// One in-flight send (one stream to one destination).
#[derive(Debug)]
struct Send {
    address: String,
    worker_id: String,
    /// The placement epoch it was routed by.
    epoch: u64,
    /// Every pair the send carries.
    pairs: Vec<u32>,
    /// Rows of each chunk, in order.
    chunk_rows: Vec<usize>,
    answered: usize,
    /// Start, or the last answer.
    last: Instant,
    /// Its unanswered rows were re-sent elsewhere after a silence (the stream still runs).
    hedged: bool,
    task: JoinHandle<()>,
}

/// The state of one request across its sends.
struct Flight<'a> {
    d: &'a Dispatcher,
    rid: u64,
    inp: Arc<MoeInput>,
    wire: DType,
    /// Expert of every routed pair.
    expert_of: &'a [u32],
    y: Vec<f32>,
    filled: Vec<bool>,
    remaining: usize,
    /// Live sends carrying each pair.
    cover: Vec<u8>,
    /// Whether each pair sits in one of the queues below.
    queued: Vec<bool>,
    /// Pairs to route now.
    pending: Vec<u32>,
    /// Pairs with no live replica: wait for a newer placement or a destination cleared.
    blocked: Vec<u32>,
    /// Pairs a worker refused as "not held": wait for a newer placement.
    stale: Vec<u32>,
    /// Pairs whose only live owner is at its admission limit: retried at `retry_at`.
    delayed: Vec<u32>,
    retry_at: Option<Instant>,
    waiting_since: Option<Instant>,
    table: Arc<RouteTable>,
    /// Destinations that failed or went silent in this request (until a newer placement).
    bad: HashSet<String>,
    sends: HashMap<u64, Send>,
    next_send: u64,
    events_tx: mpsc::Sender<SendEvent>,
    events_rx: mpsc::Receiver<SendEvent>,
    deadline: Instant,
    arrived: Instant,
    last_error: Option<String>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        for s in self.sends.values() {
            s.task.abort();
        }
    }
}

impl<'a> Flight<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        d: &'a Dispatcher,
        rid: u64,
        inp: Arc<MoeInput>,
        wire: DType,
        expert_of: &'a [u32],
        table: Arc<RouteTable>,
        deadline: Instant,
        arrived: Instant,
    ) -> Self {
        let n = expert_of.len();
        let h = d.spec.hidden;
        let (events_tx, events_rx) = mpsc::channel(8);
        // Pairs in expert order, each expert's pairs in token order.
        let mut pending: Vec<u32> = (0..n as u32).collect();
        pending.sort_by_key(|&p| (expert_of[p as usize], p));
        Self {
            d,
            rid,
            inp,
            wire,
            expert_of,
            y: vec![0f32; n * h],
            filled: vec![false; n],
            remaining: n,
            cover: vec![0; n],
            queued: vec![true; n],
            pending,
            blocked: Vec::new(),
            stale: Vec::new(),
            delayed: Vec::new(),
            retry_at: None,
            waiting_since: None,
            table,
            bad: HashSet::new(),
            sends: HashMap::new(),
            next_send: 0,
            events_tx,
            events_rx,
            deadline,
            arrived,
            last_error: None,
        }
    }

    fn layer(&self) -> usize {
        self.inp.layer
    }

    async fn run(&mut self) -> Result<Vec<f32>> {
        let mut table_rx = self.d.table.clone();
        table_rx.borrow_and_update();
        let mut health_rx = self.d.health.changes();
        health_rx.borrow_and_update();
        self.assign().await?;
        loop {
            if self.remaining == 0 {
                return Ok(std::mem::take(&mut self.y));
            }
            let now = Instant::now();
            if now >= self.deadline {
                return Err(self.deadline_error());
            }
            self.check_timers(now).await?;
            if self.remaining == 0 {
                continue;
            }
            let wake = self.next_wake();
            tokio::select! {
                ev = self.events_rx.recv() => {
                    // The flight holds a sender, so the channel never closes under it.
                    if let Some(ev) = ev {
                        self.on_event(ev).await?;
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
                r = table_rx.changed() => {
                    if r.is_ok() {
                        let t = table_rx.borrow_and_update().clone();
                        if let Some(t) = t.filter(|t| t.epoch > self.table.epoch) {
                            self.on_new_table(t).await?;
                        }
                    }
                }
                r = health_rx.changed() => {
                    if r.is_ok() {
                        health_rx.borrow_and_update();
                        self.on_health_change().await?;
                    }
                }
            }
        }
    }

    /// The earliest instant something must be looked at: a send's silence budget or hard
    /// timeout, the end of the placement wait, the deadline.
    fn next_wake(&self) -> Instant {
        let mut wake = self.deadline;
        for s in self.sends.values() {
            wake = wake.min(s.last + self.d.cfg.rpc_timeout);
            if !s.hedged {
                wake = wake.min(s.last + self.budget(s));
            }
        }
        if let Some(t) = self.retry_at {
            wake = wake.min(t);
        }
        if let (Some(t), true) = (self.waiting_since, self.sends.is_empty()) {
            wake = wake.min(t + self.d.cfg.placement_wait);
        }
        wake
    }

    fn budget(&self, s: &Send) -> Duration {
        let rows = s.chunk_rows.get(s.answered).copied().unwrap_or(1);
        self.d.health.budget(&s.address, rows)
    }

    async fn check_timers(&mut self, now: Instant) -> Result<()> {
        let timeout = self.d.cfg.rpc_timeout;
        let silent: Vec<u64> = self.sends.iter().filter(|(_, s)| now >= s.last + timeout).map(|(id, _)| *id).collect();
        for id in silent {
            let Some(s) = self.sends.get(&id) else { continue };
            let err = Error::Unavailable(format!(
                "worker {} ({}) answered nothing for {:?} (--rpc-timeout-ms)",
                s.worker_id, s.address, timeout
            ));
            s.task.abort();
            self.on_failed(id, err).await?;
        }
        let due: Vec<u64> =
            self.sends.iter().filter(|(_, s)| !s.hedged && now >= s.last + self.budget(s)).map(|(id, _)| *id).collect();
        for id in due {
            self.on_silent(id, now).await?;
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            let d = std::mem::take(&mut self.delayed);
            self.pending.extend(d);
            self.assign().await?;
        }
        if let Some(t) = self.waiting_since {
            if now >= t + self.d.cfg.placement_wait && self.sends.is_empty() {
                let why = self.last_error.clone().unwrap_or_else(|| {
                    format!(
                        "no live worker holds them and no newer placement came within {:?} (placement epoch {})",
                        self.d.cfg.placement_wait, self.table.epoch
                    )
                });
                return Err(self.missing_error(&why));
            }
        }
        Ok(())
    }

    /// A send stayed silent past its budget: the destination becomes suspect (so no request
    /// sends it new rows while a replica lives) and this send's unanswered rows go to a replica
    /// while the stream keeps running; the first answer wins.
    async fn on_silent(&mut self, id: u64, now: Instant) -> Result<()> {
        let Some(s) = self.sends.get_mut(&id) else { return Ok(()) };
        let silent_for = now - s.last;
        let (address, worker_id) = (s.address.clone(), s.worker_id.clone());
        let already = self.d.health.is_suspect(&address);
        // A destination already known to be in trouble is failed over without asking; the first
        // silence of a healthy one is a speculative hedge, limited by the throttle.
        if !already && !self.d.health.try_hedge() {
            debug!(request = self.rid, destination = %address, "silent destination, but the hedge budget is spent; waiting");
            s.hedged = true;
            return Ok(());
        }
        s.hedged = true;
        let why = format!("silent for {silent_for:?} past its latency budget");
        warn!(request = self.rid, worker = %worker_id, destination = %address, silent_ms = silent_for.as_millis() as u64, "destination silent past its latency budget; its unanswered rows go to a replica where one lives (else they wait for it), and the coordinator is asked to check it");
        self.d.stats.hedges.fetch_add(1, Ordering::Relaxed);
        self.d.suspect(&address, &why);
        self.d.report(&worker_id);
        self.bad.insert(address);
        let pairs: Vec<u32> = s.pairs.clone();
        self.requeue(&pairs);
        self.assign().await
    }

    async fn on_health_change(&mut self) -> Result<()> {
        // Sends to a destination that another request found silent or failed: fail over now.
        let now = Instant::now();
        let suspect = self.d.health.suspects();
        let moved: Vec<u64> =
            self.sends.iter().filter(|(_, s)| !s.hedged && suspect.contains(&s.address)).map(|(id, _)| *id).collect();
        for id in moved {
            self.on_silent(id, now).await?;
        }
        // A destination cleared may take rows that had nowhere to go.
        if !self.blocked.is_empty() {
            let b = std::mem::take(&mut self.blocked);
            self.pending.extend(b);
            self.assign().await?;
        }
        Ok(())
    }

    async fn on_new_table(&mut self, t: Arc<RouteTable>) -> Result<()> {
        debug!(request = self.rid, from = self.table.epoch, to = t.epoch, "newer placement committed mid-request");
        self.table = t;
        self.d.prune(&self.table).await;
        // The new plan was made after the failures were reported and checked: a worker it still
        // names gets another chance.
        self.bad.clear();
        let removed: Vec<u64> =
            self.sends.iter().filter(|(_, s)| !self.table.names_address(&s.address)).map(|(id, _)| *id).collect();
        for id in removed {
            if let Some(s) = self.sends.remove(&id) {
                s.task.abort();
                self.d.stats.cancelled_sends.fetch_add(1, Ordering::Relaxed);
                info!(request = self.rid, worker = %s.worker_id, epoch = self.table.epoch, "placement removed a worker with rows in flight; cancelling and re-routing them");
                self.uncover(&s.pairs);
                self.requeue_uncovered(&s.pairs);
            }
        }
        let waiting: Vec<u32> = self.stale.drain(..).chain(self.blocked.drain(..)).collect();
        self.pending.extend(waiting);
        self.waiting_since = None;
        self.assign().await
    }

    async fn on_event(&mut self, ev: SendEvent) -> Result<()> {
        match ev {
            SendEvent::Answer { send, pairs, rows: data } => {
                let now = Instant::now();
                if let Some(s) = self.sends.get_mut(&send) {
                    self.d.health.observe(&s.address, now - s.last, pairs.len());
                    s.last = now;
                    s.answered += 1;
                }
                // A late answer from a cancelled or hedged stream is still a correct answer.
                let h = self.d.spec.hidden;
                let row_bytes = h * self.wire.size();
                for (i, &p) in pairs.iter().enumerate() {
                    let p = p as usize;
                    if !self.filled[p] {
                        decode_f32(
                            self.wire,
                            &data[i * row_bytes..(i + 1) * row_bytes],
                            &mut self.y[p * h..(p + 1) * h],
                        )?;
                        self.filled[p] = true;
                        self.remaining -= 1;
                    }
                }
                Ok(())
            }
            SendEvent::Done { send } => {
                if let Some(s) = self.sends.remove(&send) {
                    self.uncover(&s.pairs);
                    self.d.health.on_send_done();
                }
                Ok(())
            }
            SendEvent::Failed { send, err } => self.on_failed(send, err).await,
        }
    }

    async fn on_failed(&mut self, id: u64, err: Error) -> Result<()> {
        let Some(s) = self.sends.remove(&id) else { return Ok(()) };
        self.uncover(&s.pairs);
        self.d.stats.failed_sends.fetch_add(1, Ordering::Relaxed);
        match err {
            Error::InvalidInput(_) => return Err(err),
            Error::NotHeld { epoch, .. } if s.epoch < self.table.epoch => {
                // Routed by an older placement than the one in use now: route again at once.
                debug!(request = self.rid, worker = %s.worker_id, worker_epoch = epoch, sent_at = s.epoch, epoch = self.table.epoch, "rows sent under an older placement were refused; routing them by the current one");
                self.requeue_uncovered(&s.pairs);
            }
            Error::NotHeld { epoch, .. } if epoch > self.table.epoch => {
                // Alive, and ahead of this placement: the rows wait for the epoch naming the new owner.
                debug!(request = self.rid, worker = %s.worker_id, worker_epoch = epoch, epoch = self.table.epoch, "worker no longer holds the experts; waiting for the newer placement");
                let unfilled: Vec<u32> = s.pairs.iter().copied().filter(|&p| self.needs_route(p)).collect();
                for &p in &unfilled {
                    self.queued[p as usize] = true;
                }
                self.stale.extend(unfilled);
                self.waiting_since.get_or_insert_with(Instant::now);
                self.last_error = Some(err.to_string());
            }
            Error::NotHeld { .. } => {
                // Not ahead of us, yet without experts this placement gives it (restarted at the
                // same address?): treat it as failed until a newer placement names it again.
                warn!(request = self.rid, worker = %s.worker_id, error = %err, "worker lacks experts the current placement gives it; routing around it");
                self.bad.insert(s.address.clone());
                self.last_error = Some(err.to_string());
                self.requeue_uncovered(&s.pairs);
            }
            Error::ResourceExhausted(_) | Error::DeadlineExceeded(_) | Error::LinkClosed(_) => {
                // Alive but busy (or its link closed): another live replica takes the rows now;
                // without one, they go back to the same worker after a short pause (by gRPC
                // once a closed link is gone from the transport).
                warn!(request = self.rid, worker = %s.worker_id, error = %err, "destination busy; will retry its rows on another replica");
                self.last_error = Some(err.to_string());
                self.bad.insert(s.address.clone());
                let unfilled: Vec<u32> = s.pairs.iter().copied().filter(|&p| self.needs_route(p)).collect();
                let suspect = self.d.health.suspects();
                if unfilled.iter().all(|&p| !self.live_replicas(self.expert_of[p as usize], &suspect).is_empty()) {
                    self.requeue_uncovered(&unfilled);
                } else {
                    self.bad.remove(&s.address);
                    for &p in &unfilled {
                        self.queued[p as usize] = true;
                    }
                    self.delayed.extend(unfilled);
                    self.retry_at.get_or_insert_with(|| Instant::now() + Duration::from_millis(100));
                }
            }
            other => {
                warn!(request = self.rid, worker = %s.worker_id, destination = %s.address, epoch = self.table.epoch, error = %other, "destination failed; will retry its rows on another replica or a newer placement");
                self.d.suspect(&s.address, &other.to_string());
                self.d.report(&s.worker_id);
                self.bad.insert(s.address.clone());
                self.last_error = Some(other.to_string());
                self.requeue_uncovered(&s.pairs);
            }
        }
        self.assign().await
    }

    /// The replicas of expert `e` of this layer (worker indices) that neither failed in this
    /// request nor are `suspect`.
    fn live_replicas(&self, e: u32, suspect: &HashSet<String>) -> Vec<u32> {
        let t = &self.table;
        let reps = t.layers.get(&(self.layer() as u32)).and_then(|l| l.get(e as usize));
        reps.into_iter()
            .flatten()
            .copied()
            .filter(|w| {
                t.workers
                    .get(*w as usize)
                    .is_some_and(|i| !self.bad.contains(&i.address) && !suspect.contains(&i.address))
            })
            .collect()
    }

    /// Whether a pair still needs a new send: not filled, not carried by a live send, not queued.
    fn needs_route(&self, p: u32) -> bool {
        let p = p as usize;
        !self.filled[p] && self.cover[p] == 0 && !self.queued[p]
    }

    fn uncover(&mut self, pairs: &[u32]) {
        for &p in pairs {
            let c = &mut self.cover[p as usize];
            *c = c.saturating_sub(1);
        }
    }

    /// Queue the unfilled pairs of `pairs` for routing, even those a silent send still carries
    /// (a hedge: the first answer wins).
    fn requeue(&mut self, pairs: &[u32]) {
        for &p in pairs {
            let i = p as usize;
            if !self.filled[i] && !self.queued[i] {
                self.queued[i] = true;
                self.pending.push(p);
            }
        }
    }

    /// Queue the pairs of a send that ended which no other live send carries.
    fn requeue_uncovered(&mut self, pairs: &[u32]) {
        for &p in pairs {
            if self.needs_route(p) {
                self.queued[p as usize] = true;
                self.pending.push(p);
            }
        }
    }

    /// Route every pending pair under the current placement: one send per destination, rows of
    /// an expert split in contiguous parts over its live replicas. Pairs with no live replica
    /// are blocked until something changes.
    async fn assign(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let layer = self.layer() as u32;
        let table = self.table.clone();
        let placed = table.layers.get(&layer).ok_or_else(|| {
            Error::Unavailable(format!("placement epoch {} does not place layer {layer}", table.epoch))
        })?;
        let mut by_expert: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for p in std::mem::take(&mut self.pending) {
            if self.filled[p as usize] {
                self.queued[p as usize] = false;
                continue;
            }
            by_expert.entry(self.expert_of[p as usize]).or_default().push(p);
        }
        let suspect = self.d.health.suspects();
        let mut dests: BTreeMap<u32, Vec<Segment>> = BTreeMap::new();
        for (e, mut pairs) in by_expert {
            placed.get(e as usize).filter(|r| !r.is_empty()).ok_or_else(|| {
                Error::Unavailable(format!(
                    "placement epoch {} has no worker for layer {layer} expert {e}",
                    table.epoch
                ))
            })?;
            let live = self.live_replicas(e, &suspect);
            if live.is_empty() {
                self.blocked.extend(pairs);
                continue;
            }
            pairs.sort_unstable();
            if let [only] = live[..] {
                dests.entry(only).or_default().push((e, pairs));
                continue;
            }
            // Rows over the live replicas by their shares: systematic sampling with an offset
            // that varies by request and expert, so that even one row per request follows the
            // shares over many requests.
            let shares = table.live_shares(layer, e, &live);
            let offset = unit_hash(self.rid ^ (u64::from(e) << 40) ^ u64::from(layer) << 20);
            let counts = split_by_shares(pairs.len(), &shares, offset);
            let mut rest = pairs.as_slice();
            for (i, n) in counts.into_iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let (part, tail) = rest.split_at(n);
                rest = tail;
                dests.entry(live[i]).or_default().push((e, part.to_vec()));
            }
        }
        if self.blocked.is_empty() && self.stale.is_empty() {
            self.waiting_since = None;
        } else {
            self.waiting_since.get_or_insert_with(Instant::now);
        }
        for (w, segs) in dests {
            self.spawn_send(w, segs).await;
        }
        Ok(())
    }

    async fn spawn_send(&mut self, w: u32, segs: Vec<Segment>) {
        let Some(worker) = self.table.workers.get(w as usize).cloned() else { return };
        let spec = &self.d.spec;
        let (h, k) = (spec.hidden, spec.top_k);
        let rows_per_chunk = (self.d.cfg.chunk_bytes / (h * self.wire.size())).max(1);
        let chunks = plan_chunks(segs, rows_per_chunk);
        let pairs: Vec<u32> = chunks.iter().flat_map(|c| c.segs.iter().flat_map(|s| s.1.iter().copied())).collect();
        for &p in &pairs {
            self.cover[p as usize] += 1;
            self.queued[p as usize] = false;
        }
        let id = self.next_send;
        self.next_send += 1;
        let job = SendJob {
            id,
            rid: self.rid,
            epoch: self.table.epoch,
            layer: self.layer() as u32,
            wire: self.wire,
            hidden: h,
            top_k: k,
            inp: self.inp.clone(),
            chunks: chunks.clone(),
            deadline: self.deadline,
            worker_id: worker.worker_id.clone(),
            address: worker.address.clone(),
            stats: self.d.stats.clone(),
        };
        let task = tokio::spawn(run_send(self.d.transport.clone(), job, self.events_tx.clone()));
        self.sends.insert(
            id,
            Send {
                address: worker.address,
                worker_id: worker.worker_id,
                epoch: self.table.epoch,
                pairs,
                chunk_rows: chunks.iter().map(Chunk::rows).collect(),
                answered: 0,
                last: Instant::now(),
                hedged: false,
                task,
            },
        );
    }

    fn missing_experts(&self) -> Vec<u32> {
        let mut experts: Vec<u32> =
            (0..self.filled.len()).filter(|&p| !self.filled[p]).map(|p| self.expert_of[p]).collect();
        experts.sort_unstable();
        experts.dedup();
        experts
    }

    fn missing_error(&self, why: &str) -> Error {
        missing_error(self.layer(), self.missing_experts(), why)
    }

    fn deadline_error(&self) -> Error {
        let now = Instant::now();
        let waiting: Vec<String> = self
            .sends
            .values()
            .map(|s| format!("{} ({}, silent {:?})", s.worker_id, s.address, now - s.last))
            .collect();
        let on = if waiting.is_empty() {
            self.last_error.clone().unwrap_or_else(|| "a placement that names their owner".into())
        } else {
            waiting.join(", ")
        };
        Error::DeadlineExceeded(format!(
            "layer {} experts {:?} were not computed within the request's deadline ({:?} after it arrived); waiting on {on}",
            self.layer(),
            self.missing_experts(),
            self.deadline.saturating_duration_since(self.arrived)
        ))
    }
}

/// What one send task needs.
struct SendJob {
    id: u64,
    rid: u64,
    epoch: u64,
    layer: u32,
    wire: DType,
    hidden: usize,
    top_k: usize,
    inp: Arc<MoeInput>,
    chunks: Vec<Chunk>,
    deadline: Instant,
    worker_id: String,
    address: String,
    stats: Arc<WireStats>,
}

/// Stream `job`'s chunks to one worker over `transport` and report each answer, then Done or
/// Failed. Aborted by its request when no longer needed (the stream is abandoned).
async fn run_send(transport: Arc<dyn ExpertTransport>, job: SendJob, events: mpsc::Sender<SendEvent>) {
    let id = job.id;
    let failed = |err| SendEvent::Failed { send: id, err };
    let (h, k, wire) = (job.hidden, job.top_k, job.wire);
    let chunks = Arc::new(job.chunks);
    let (tx, rx) = mpsc::channel::<OutChunk>(2);
    let producer = {
        let (chunks, inp) = (chunks.clone(), job.inp.clone());
        tokio::spawn(async move {
            for (i, c) in chunks.iter().enumerate() {
                // Each pair's token row, encoded straight into the wire dtype: one pass.
                let mut data = Vec::with_capacity(c.rows() * h * wire.size());
                let encoded = c.segs.iter().flat_map(|(_, pairs)| pairs).try_for_each(|&p| {
                    let t = p as usize / k;
                    encode_f32(wire, &inp.hidden_states[t * h..(t + 1) * h], &mut data)
                });
                if encoded.is_err() {
                    break;
                }
                let out = OutChunk {
                    index: i as u32,
                    experts: c.segs.iter().map(|s| s.0).collect(),
                    rows: c.segs.iter().map(|s| s.1.len() as u32).collect(),
                    data: Bytes::from(data),
                };
                if tx.send(out).await.is_err() {
                    break;
                }
            }
        })
    };
    struct AbortOnDrop(JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _producer = AbortOnDrop(producer);
    let header = SendHeader { request_id: job.rid, epoch: job.epoch, layer: job.layer, dtype: wire, hidden: h };
    let mut resp = match transport.open(&job.address, header, rx, job.deadline, job.stats.clone()).await {
        Ok(r) => r,
        Err(e) => {
            let _ = events.send(failed(e)).await;
            return;
        }
    };
    for (i, c) in chunks.iter().enumerate() {
        let r = match resp.next().await {
            Some(Ok(r)) => r,
            None => {
                let e = Error::Unavailable(format!(
                    "worker {} closed the stream after {i} of {} chunks",
                    job.worker_id,
                    chunks.len()
                ));
                let _ = events.send(failed(e)).await;
                return;
            }
            Some(Err(e)) => {
                let _ = events.send(failed(e)).await;
                return;
            }
        };
        if r.chunk as usize != i || r.rows as usize != c.rows() {
            let e = Error::Internal(format!(
                "worker {} answered chunk {} with {} rows; expected chunk {i} with {}",
                job.worker_id,
                r.chunk,
                r.rows,
                c.rows()
            ));
            let _ = events.send(failed(e)).await;
            return;
        }
        if r.data.len() != c.rows() * h * wire.size() {
            let e = Error::Internal(format!(
                "worker {} answered chunk {i} with {} bytes; expected {} rows of {h} {} values ({} bytes)",
                job.worker_id,
                r.data.len(),
                c.rows(),
                wire.name(),
                c.rows() * h * wire.size()
            ));
            let _ = events.send(failed(e)).await;
            return;
        }
        if i + 1 == chunks.len() {
            // Read the stream's end (its OK trailers) before the last answer: the request completes
            // on that answer and drops this task, and a stream dropped before its trailers arrive is
            // reset. h2 answers frames that arrive on reset streams with resets of its own, and
            // after 1024 of those closes the whole connection (ENHANCE_YOUR_CALM), failing every
            // request in flight on it.
            let end = match resp.next().await {
                None => None,
                Some(Ok(extra)) => Some(Error::Internal(format!(
                    "worker {} sent chunk {} after the last of {} chunks",
                    job.worker_id,
                    extra.chunk,
                    chunks.len()
                ))),
                Some(Err(e)) => Some(e),
            };
            if let Some(e) = end {
                let _ = events.send(failed(e)).await;
                return;
            }
        }
        let pairs: Vec<u32> = c.segs.iter().flat_map(|s| s.1.iter().copied()).collect();
        if events.send(SendEvent::Answer { send: id, pairs, rows: r.data }).await.is_err() {
            return;
        }
    }
    let _ = events.send(SendEvent::Done { send: id }).await;
}

/// UNAVAILABLE naming the layer and the (sorted, distinct) experts that could not be computed.
fn missing_error(layer: usize, mut experts: Vec<u32>, why: &str) -> Error {
    experts.sort_unstable();
    experts.dedup();
    Error::Unavailable(format!(
        "layer {layer} experts {experts:?} could not be computed: {why}; MoeLayer.Forward is idempotent, so retrying is safe"
    ))
}

/// A watch of route tables fed from a coordinator's committed placements.
pub fn route_table_channel() -> (RouteTableTx, RouteTableRx) {
    watch::channel(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_over_replicas_by_their_shares() {
        for (n, shares) in
            [(10, vec![0.7, 0.3]), (1, vec![0.5, 0.25, 0.25]), (7, vec![1.0, 0.0, 2.0]), (5, vec![0.0, 0.0])]
        {
            let total: f64 = shares.iter().sum();
            let mut mean = vec![0.0; shares.len()];
            let rounds = 1000;
            for r in 0..rounds {
                let c = split_by_shares(n, &shares, unit_hash(r));
                assert_eq!(c.iter().sum::<usize>(), n, "{shares:?}");
                for (i, &k) in c.iter().enumerate() {
                    let want = if total > 0.0 { n as f64 * shares[i] / total } else { n as f64 / shares.len() as f64 };
                    assert!((k as f64 - want).abs() < 1.0 + 1e-9, "{c:?} for {shares:?}");
                    mean[i] += k as f64 / rounds as f64;
                }
            }
            for (i, m) in mean.iter().enumerate() {
                let want = if total > 0.0 { n as f64 * shares[i] / total } else { n as f64 / shares.len() as f64 };
                assert!(
                    (m - want).abs() < 0.05 * n as f64 + 0.03,
                    "replica {i} of {shares:?}: {m} rows on average, want {want}"
                );
            }
        }
        assert!(split_by_shares(3, &[], 0.5).is_empty());
    }
    use expertmesh_proto::v1::{ExpertBatch, ExpertResult};

    #[test]
    fn chunks_keep_segment_order_and_bound_rows() {
        let segs = vec![(3, vec![0, 1, 2, 3, 4]), (5, vec![7]), (9, vec![8, 9])];
        let c = plan_chunks(segs, 3);
        let rows: Vec<usize> = c.iter().map(Chunk::rows).collect();
        assert_eq!(rows, vec![3, 3, 2]);
        let flat: Vec<(u32, u32)> =
            c.iter().flat_map(|c| c.segs.iter().flat_map(|(e, p)| p.iter().map(move |p| (*e, *p)))).collect();
        assert_eq!(flat, vec![(3, 0), (3, 1), (3, 2), (3, 3), (3, 4), (5, 7), (9, 8), (9, 9)]);
    }

    /// A worker that answers every chunk at once (zeros) and ends its stream `end_after` later,
    /// noting whether the caller had reset the stream by then.
    struct LateEnd {
        end_after: Duration,
        reset: Arc<std::sync::atomic::AtomicBool>,
    }

    #[tonic::async_trait]
    impl expertmesh_proto::v1::expert_service_server::ExpertService for LateEnd {
        type ComputeStream = tokio_stream::wrappers::ReceiverStream<std::result::Result<ExpertResult, tonic::Status>>;

        async fn compute(
            &self,
            req: tonic::Request<tonic::Streaming<ExpertBatch>>,
        ) -> std::result::Result<tonic::Response<Self::ComputeStream>, tonic::Status> {
            let mut inbound = req.into_inner();
            let (tx, rx) = mpsc::channel(4);
            let (end_after, reset) = (self.end_after, self.reset.clone());
            tokio::spawn(async move {
                while let Ok(Some(b)) = inbound.message().await {
                    let rows: u32 = b.rows.iter().sum();
                    let data = vec![0u8; rows as usize * b.hidden as usize * 2];
                    let r = ExpertResult { chunk: b.chunk, dtype: b.dtype, rows, data: data.into() };
                    let _ = tx.send(Ok(r)).await;
                }
                tokio::time::sleep(end_after).await;
                reset.store(tx.is_closed(), Ordering::SeqCst);
            });
            Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
        }

        async fn counters(
            &self,
            _: tonic::Request<expertmesh_proto::v1::CountersRequest>,
        ) -> std::result::Result<tonic::Response<expertmesh_proto::v1::CountersResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("counters"))
        }
    }

    /// Regression: a send reported its last answer before its stream ended; the request then
    /// completed and dropped the send, resetting the stream. h2 answers the late trailers of a
    /// reset stream with resets of its own and after 1024 of them closes the whole connection.
    #[tokio::test]
    async fn a_send_ends_its_stream_before_its_last_answer() {
        use expertmesh_proto::v1::expert_service_server::ExpertServiceServer;
        let reset = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = LateEnd { end_after: Duration::from_millis(200), reset: reset.clone() };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExpertServiceServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let transport: Arc<dyn ExpertTransport> = DispatcherConfig::default().grpc_transport();
        let (h, tokens) = (4, 3);
        let job = SendJob {
            id: 7,
            rid: 1,
            epoch: 1,
            layer: 0,
            wire: DType::BF16,
            hidden: h,
            top_k: 1,
            inp: Arc::new(MoeInput { layer: 0, tokens, hidden_states: vec![0.5; tokens * h], input_ids: None }),
            chunks: plan_chunks(vec![(0, vec![0, 1]), (1, vec![2])], 2),
            deadline: Instant::now() + Duration::from_secs(10),
            worker_id: "w0".into(),
            address: addr.to_string(),
            stats: Arc::default(),
        };
        let (events_tx, mut events) = mpsc::channel(8);
        let task = tokio::spawn(run_send(transport, job, events_tx));
        let mut answered = 0;
        while answered < 3 {
            match events.recv().await.expect("send events") {
                SendEvent::Answer { pairs, rows, .. } => {
                    assert_eq!(rows.len(), pairs.len() * h * DType::BF16.size());
                    answered += pairs.len();
                }
                SendEvent::Failed { err, .. } => panic!("send failed: {err}"),
                SendEvent::Done { .. } => panic!("done before every answer"),
            }
        }
        // Every row answered: the request completes and drops its sends, as a Flight does.
        task.abort();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!reset.load(Ordering::SeqCst), "the stream was reset before the worker ended it");
    }

    /// A transport with no network: each "worker" answers a chunk in this process with a
    /// stand-in expert, `y = (e + 1) * x`; an address in `down` is unreachable. Shows that the
    /// dispatcher needs nothing from gRPC: routing, failover and combine run over the trait.
    #[derive(Debug, Default)]
    struct Loopback {
        down: HashSet<String>,
        opened: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl ExpertTransport for Loopback {
        async fn open(
            &self,
            address: &str,
            header: SendHeader,
            mut chunks: mpsc::Receiver<OutChunk>,
            _deadline: Instant,
            _stats: Arc<WireStats>,
        ) -> Result<crate::transport::AnswerStream> {
            self.opened.lock().unwrap().push(address.to_string());
            if self.down.contains(address) {
                return Err(Error::Unavailable(format!("{address} is down")));
            }
            let (tx, rx) = mpsc::channel(4);
            let h = header.hidden;
            tokio::spawn(async move {
                while let Some(c) = chunks.recv().await {
                    let total: u32 = c.rows.iter().sum();
                    let mut x = vec![0f32; total as usize * h];
                    decode_f32(header.dtype, &c.data, &mut x).unwrap();
                    let mut row = 0;
                    for (e, n) in c.experts.iter().zip(&c.rows) {
                        for v in &mut x[row * h..(row + *n as usize) * h] {
                            *v *= (*e + 1) as f32;
                        }
                        row += *n as usize;
                    }
                    let mut data = Vec::new();
                    encode_f32(header.dtype, &x, &mut data).unwrap();
                    let a = crate::transport::ChunkAnswer { chunk: c.index, rows: total, data: data.into() };
                    if tx.send(Ok(a)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
        }

        async fn probe(&self, address: &str, _limit: Duration) -> Result<()> {
            if self.down.contains(address) {
                Err(Error::Unavailable(format!("{address} is down")))
            } else {
                Ok(())
            }
        }

        fn retain(&self, _keep: &HashSet<String>) {}
    }

    fn tiny_spec() -> ModelSpec {
        let cfg = serde_json::json!({
            "model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 4,
            "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 10,
        });
        ModelSpec::from_config_json(&cfg.to_string()).unwrap()
    }

    /// Every expert on both workers, w1 unreachable: every answer comes from w0, correct.
    #[tokio::test]
    async fn routes_combines_and_fails_over_through_any_transport() {
        let spec = tiny_spec();
        let (h, k, tokens) = (spec.hidden, spec.top_k, 5);
        let worker =
            |i: usize| WorkerInfo { worker_id: format!("w{i}"), address: format!("mem:{i}"), ..Default::default() };
        let table = RouteTable {
            epoch: 3,
            workers: vec![worker(0), worker(1)],
            layers: HashMap::from([(0, vec![vec![1, 0]; spec.n_routed])]),
            shares: HashMap::new(),
        };
        let (tx, rx) = route_table_channel();
        tx.send(Some(Arc::new(table))).unwrap();
        let transport = Arc::new(Loopback { down: HashSet::from(["mem:1".to_string()]), ..Default::default() });
        let d = Dispatcher::new(spec.clone(), transport.clone(), rx, DispatcherConfig::default());
        let x: Vec<f32> = (0..tokens * h).map(|i| (i % 7) as f32 - 3.0).collect();
        let indices: Vec<u32> = (0..tokens * k).map(|p| ((p * 3 + p / k) % spec.n_routed) as u32).collect();
        let weights: Vec<f32> = (0..tokens * k).map(|p| 0.25 + p as f32 / 16.0).collect();
        let routing = Routing { top_k: k, indices: indices.clone(), weights: weights.clone() };
        let inp = MoeInput { layer: 0, tokens, hidden_states: x.clone(), input_ids: None };
        let out = d.forward_routed(inp, routing, DType::F32, None).await.unwrap();
        assert_eq!(out.epoch, 3);
        for t in 0..tokens {
            for i in 0..h {
                let want: f32 =
                    (0..k).map(|j| weights[t * k + j] * (indices[t * k + j] + 1) as f32 * x[t * h + i]).sum();
                let got = out.output[t * h + i];
                assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "token {t} column {i}: {got} != {want}");
            }
        }
        let opened = transport.opened.lock().unwrap().clone();
        assert!(opened.contains(&"mem:1".to_string()), "w1 was tried: {opened:?}");
        assert!(d.stats().failed_sends.load(Ordering::Relaxed) >= 1, "the failed send was counted");
        assert!(d.destinations().iter().any(|s| s.address == "mem:1" && s.suspect.is_some()), "{:?}", d.destinations());
    }
}
