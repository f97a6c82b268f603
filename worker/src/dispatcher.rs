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
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{ExpertBatch, PlacementPlan, WorkerInfo};
use prost::Message;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::error::{Result, WorkerError};
use crate::health::{DestSnapshot, Health, HedgeConfig};
use crate::moe::{combine, shared_expert, Frontend, MoeInput, MoeOutput};
use crate::wire::dtype_to_proto;

/// The committed placement in the form the hot path reads.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub epoch: u64,
    pub workers: Vec<WorkerInfo>,
    /// layer -> expert -> replica worker indices.
    pub layers: HashMap<u32, Vec<Vec<u32>>>,
}

impl RouteTable {
    pub fn from_plan(p: &PlacementPlan) -> Self {
        Self {
            epoch: p.epoch,
            workers: p.workers.clone(),
            layers: p.layers.iter().map(|l| (l.layer, l.experts.iter().map(|r| r.workers.clone()).collect())).collect(),
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
        }
    }
}

/// Bytes this dispatcher put on and took off the wire (gRPC messages: protobuf + the 5-byte
/// gRPC prefix, HTTP/2 frame headers excluded), and how often it had to route around trouble.
#[derive(Debug, Default)]
pub struct WireStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub payload_sent: AtomicU64,
    pub payload_received: AtomicU64,
    /// Sends whose unanswered rows were re-sent to a replica after a silence.
    pub hedges: AtomicU64,
    /// Sends given up: failed, silent past `rpc_timeout`, or cancelled by a placement change.
    pub failed_sends: AtomicU64,
    pub cancelled_sends: AtomicU64,
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
    /// One chunk answered: its pairs and their rows [pairs, hidden].
    Answer { send: u64, pairs: Vec<u32>, rows: Vec<f32> },
    /// Every chunk answered.
    Done { send: u64 },
    /// The stream ended with an error before every chunk was answered.
    Failed { send: u64, err: WorkerError },
}

/// Routes MoE layers across the cluster.
#[derive(Debug)]
pub struct Dispatcher {
    front: Frontend,
    table: RouteTableRx,
    clients: Mutex<HashMap<String, ExpertServiceClient<Channel>>>,
    cfg: DispatcherConfig,
    stats: Arc<WireStats>,
    health: Arc<Health>,
    next_id: AtomicU64,
    /// Epoch the client and health tables were last pruned at.
    pruned_epoch: AtomicU64,
    /// Where to send the ids of workers this dispatcher could not reach.
    unreachable: OnceLock<mpsc::UnboundedSender<String>>,
}

impl Dispatcher {
    pub fn new(front: Frontend, table: RouteTableRx, cfg: DispatcherConfig) -> Self {
        let health = Health::new(HedgeConfig {
            min: cfg.hedge_min,
            initial: Duration::from_secs(1).min(cfg.rpc_timeout),
            cap: cfg.rpc_timeout,
            ratio: 0.1,
        });
        Self {
            front,
            table,
            clients: Mutex::new(HashMap::new()),
            cfg,
            stats: Arc::new(WireStats::default()),
            health,
            next_id: AtomicU64::new(1),
            pruned_epoch: AtomicU64::new(0),
            unreachable: OnceLock::new(),
        }
    }

    /// Send the id of every worker a request could not reach (not one that refused an expert
    /// it no longer holds, nor one at its admission limit) to `tx`, for the control plane.
    pub fn report_unreachable_to(&self, tx: mpsc::UnboundedSender<String>) {
        let _ = self.unreachable.set(tx);
    }

    pub fn spec(&self) -> &ModelSpec {
        self.front.spec()
    }

    pub fn frontend(&self) -> &Frontend {
        &self.front
    }

    pub fn config(&self) -> &DispatcherConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &WireStats {
        &self.stats
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
            Ok(Err(_)) => Err(WorkerError::Unavailable("placement watch closed".into())),
            Err(_) => Err(WorkerError::Unavailable(match after {
                None => format!(
                    "no placement committed within {:?} (`expertmesh status` shows workers that cannot load their experts)",
                    self.cfg.placement_wait
                ),
                Some(e) => format!("no placement newer than epoch {e} within {:?}", self.cfg.placement_wait),
            })),
        }
    }

    async fn client(&self, addr: &str) -> Result<ExpertServiceClient<Channel>> {
        let mut g = self.clients.lock().await;
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        // A member's address was checked when it registered; one that still does not parse is
        // that worker's fault, never the caller's: an Unavailable destination, not bad input.
        expertmesh_core::limits::check_address("worker address", addr).map_err(WorkerError::Unavailable)?;
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| WorkerError::Unavailable(format!("worker address `{addr}`: {e}")))?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect_timeout(Duration::from_secs(5).min(self.cfg.rpc_timeout))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let c = ExpertServiceClient::new(ch)
            .max_decoding_message_size(self.cfg.max_message_bytes)
            .max_encoding_message_size(self.cfg.max_message_bytes);
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Forget connections and health of workers no committed placement names any more.
    async fn prune(&self, table: &RouteTable) {
        if self.pruned_epoch.swap(table.epoch, Ordering::AcqRel) == table.epoch {
            return;
        }
        let keep: HashSet<String> = table.workers.iter().map(|w| w.address.clone()).collect();
        self.clients.lock().await.retain(|a, _| keep.contains(a));
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
            self.health
                .spawn_probe(address.to_string(), move |a| rx.borrow().as_ref().is_some_and(|t| t.names_address(a)));
        }
    }

    /// One MoE block across the cluster, within `request_timeout`.
    pub async fn forward(&self, inp: MoeInput, wire: DType) -> Result<MoeOutput> {
        self.forward_until(inp, wire, None).await
    }

    /// One MoE block across the cluster, done by `deadline` (default: `request_timeout` from now)
    /// or failed DEADLINE_EXCEEDED naming what was missing.
    pub async fn forward_until(&self, inp: MoeInput, wire: DType, deadline: Option<Instant>) -> Result<MoeOutput> {
        if !matches!(wire, DType::BF16 | DType::F32) {
            return Err(WorkerError::InvalidInput(format!("wire dtype {}; expected bf16 or f32", wire.name())));
        }
        self.front.validate(&inp)?;
        let arrived = Instant::now();
        let deadline = deadline.unwrap_or(arrived + self.cfg.request_timeout);
        let layer = inp.layer;
        let late = |what: &str| {
            WorkerError::DeadlineExceeded(format!(
                "layer {layer}: the request's deadline ({:?} after it arrived) passed {what}",
                deadline.saturating_duration_since(arrived)
            ))
        };
        if deadline <= arrived {
            return Err(late("before it arrived"));
        }
        let spec = self.front.spec().clone();
        let inp = Arc::new(inp);
        let front = tokio::time::timeout_at(deadline.into(), self.front.layer(inp.layer))
            .await
            .map_err(|_| late("while the layer's router loaded"))??;
        let routing = tokio::time::timeout_at(deadline.into(), self.front.gate(&front, &inp))
            .await
            .map_err(|_| late("while gating"))??;
        // The shared expert runs on the compute pool while the routed rows are on the wire.
        let shared = tokio::spawn(shared_expert(front.clone(), inp.clone()));
        let rid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let current = self.table.borrow().clone();
        let table = match current {
            Some(t) => t,
            None => {
                let until = deadline.min(arrived + self.cfg.placement_wait);
                self.route_table_until(None, until).await.map_err(|e| {
                    if Instant::now() >= deadline {
                        late("waiting for a committed placement")
                    } else {
                        missing_error(layer, routing.indices.clone(), &e.to_string())
                    }
                })?
            }
        };
        self.prune(&table).await;
        let mut flight = Flight::new(self, rid, inp.clone(), wire, &routing.indices, table, deadline, arrived);
        let y = flight.run().await;
        let epoch = flight.table.epoch;
        drop(flight);
        let y = match y {
            Ok(y) => y,
            Err(e) => {
                shared.abort();
                return Err(e);
            }
        };
        let shared = shared.await.map_err(|e| WorkerError::Internal(format!("shared expert task: {e}")))??;
        let output = combine(spec.hidden, &routing, &y, shared.as_deref());
        Ok(MoeOutput { output, routing, epoch })
    }
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
        let h = d.front.spec().hidden;
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
            let err = WorkerError::Unavailable(format!(
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
        warn!(request = self.rid, worker = %worker_id, destination = %address, silent_ms = silent_for.as_millis() as u64, "destination silent; hedging its unanswered rows to a replica");
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
            SendEvent::Answer { send, pairs, rows } => {
                let now = Instant::now();
                if let Some(s) = self.sends.get_mut(&send) {
                    self.d.health.observe(&s.address, now - s.last, pairs.len());
                    s.last = now;
                    s.answered += 1;
                }
                // A late answer from a cancelled or hedged stream is still a correct answer.
                let h = self.d.front.spec().hidden;
                for (i, &p) in pairs.iter().enumerate() {
                    let p = p as usize;
                    if !self.filled[p] {
                        self.filled[p] = true;
                        self.remaining -= 1;
                        self.y[p * h..(p + 1) * h].copy_from_slice(&rows[i * h..(i + 1) * h]);
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

    async fn on_failed(&mut self, id: u64, err: WorkerError) -> Result<()> {
        let Some(s) = self.sends.remove(&id) else { return Ok(()) };
        self.uncover(&s.pairs);
        self.d.stats.failed_sends.fetch_add(1, Ordering::Relaxed);
        match err {
            WorkerError::InvalidInput(_) => return Err(err),
            WorkerError::NotHeld { epoch, .. } if s.epoch < self.table.epoch => {
                // Routed by an older placement than the one in use now: route again at once.
                debug!(request = self.rid, worker = %s.worker_id, worker_epoch = epoch, sent_at = s.epoch, epoch = self.table.epoch, "rows sent under an older placement were refused; routing them by the current one");
                self.requeue_uncovered(&s.pairs);
            }
            WorkerError::NotHeld { epoch, .. } if epoch > self.table.epoch => {
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
            WorkerError::NotHeld { .. } => {
                // Not ahead of us, yet without experts this placement gives it (restarted at the
                // same address?): treat it as failed until a newer placement names it again.
                warn!(request = self.rid, worker = %s.worker_id, error = %err, "worker lacks experts the current placement gives it; routing around it");
                self.bad.insert(s.address.clone());
                self.last_error = Some(err.to_string());
                self.requeue_uncovered(&s.pairs);
            }
            WorkerError::ResourceExhausted(_) | WorkerError::DeadlineExceeded(_) => {
                // Alive but busy: another live replica takes the rows now; without one, they
                // go back to the same worker after a short pause.
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
            WorkerError::Unavailable(format!("placement epoch {} does not place layer {layer}", table.epoch))
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
                WorkerError::Unavailable(format!(
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
            let n = live.len();
            let per = pairs.len().div_ceil(n).max(1);
            for (i, part) in pairs.chunks(per).enumerate() {
                let w = live[(i + self.rid as usize + e as usize) % n];
                dests.entry(w).or_default().push((e, part.to_vec()));
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
        let spec = self.d.front.spec();
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
            stats: self.d.stats.clone(),
        };
        let client = self.d.client(&worker.address).await;
        let task = tokio::spawn(run_send(client, job, self.events_tx.clone()));
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

    fn missing_error(&self, why: &str) -> WorkerError {
        missing_error(self.layer(), self.missing_experts(), why)
    }

    fn deadline_error(&self) -> WorkerError {
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
        WorkerError::DeadlineExceeded(format!(
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
    stats: Arc<WireStats>,
}

/// Stream `job`'s chunks to one worker and report each answer, then Done or Failed. Aborted by
/// its request when no longer needed (the stream is reset).
async fn run_send(client: Result<ExpertServiceClient<Channel>>, job: SendJob, events: mpsc::Sender<SendEvent>) {
    let id = job.id;
    let failed = |err| SendEvent::Failed { send: id, err };
    let mut client = match client {
        Ok(c) => c,
        Err(e) => {
            let _ = events.send(failed(e)).await;
            return;
        }
    };
    let (h, k, wire) = (job.hidden, job.top_k, job.wire);
    let chunks = Arc::new(job.chunks);
    let (tx, rx) = mpsc::channel::<ExpertBatch>(2);
    let producer = {
        let (chunks, inp, stats) = (chunks.clone(), job.inp.clone(), job.stats.clone());
        let (rid, epoch, layer) = (job.rid, job.epoch, job.layer);
        tokio::spawn(async move {
            let mut rows = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                rows.clear();
                for (_, pairs) in &c.segs {
                    crate::moe::gather_rows(&inp.hidden_states, h, k, pairs, &mut rows);
                }
                let mut data = Vec::new();
                if encode_f32(wire, &rows, &mut data).is_err() {
                    break;
                }
                let b = ExpertBatch {
                    request_id: rid,
                    epoch,
                    layer,
                    dtype: dtype_to_proto(wire),
                    hidden: h as u32,
                    experts: c.segs.iter().map(|s| s.0).collect(),
                    rows: c.segs.iter().map(|s| s.1.len() as u32).collect(),
                    data: Bytes::from(data),
                    chunk: i as u32,
                };
                stats.bytes_sent.fetch_add(b.encoded_len() as u64 + 5, Ordering::Relaxed);
                stats.payload_sent.fetch_add(b.data.len() as u64, Ordering::Relaxed);
                if tx.send(b).await.is_err() {
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
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.set_timeout(job.deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
    let mut resp = match client.compute(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let _ = events.send(failed(s.into())).await;
            return;
        }
    };
    for (i, c) in chunks.iter().enumerate() {
        let r = match resp.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                let e = WorkerError::Unavailable(format!(
                    "worker {} closed the stream after {i} of {} chunks",
                    job.worker_id,
                    chunks.len()
                ));
                let _ = events.send(failed(e)).await;
                return;
            }
            Err(s) => {
                let _ = events.send(failed(s.into())).await;
                return;
            }
        };
        if r.chunk as usize != i || r.rows as usize != c.rows() {
            let e = WorkerError::Internal(format!(
                "worker {} answered chunk {} with {} rows; expected chunk {i} with {}",
                job.worker_id,
                r.chunk,
                r.rows,
                c.rows()
            ));
            let _ = events.send(failed(e)).await;
            return;
        }
        job.stats.bytes_received.fetch_add(r.encoded_len() as u64 + 5, Ordering::Relaxed);
        job.stats.payload_received.fetch_add(r.data.len() as u64, Ordering::Relaxed);
        let mut vals = vec![0f32; c.rows() * h];
        if let Err(e) = decode_f32(wire, &r.data, &mut vals) {
            let e = WorkerError::Internal(format!("worker {} answered undecodable rows: {e}", job.worker_id));
            let _ = events.send(failed(e)).await;
            return;
        }
        let pairs: Vec<u32> = c.segs.iter().flat_map(|s| s.1.iter().copied()).collect();
        if events.send(SendEvent::Answer { send: id, pairs, rows: vals }).await.is_err() {
            return;
        }
    }
    let _ = events.send(SendEvent::Done { send: id }).await;
}

/// UNAVAILABLE naming the layer and the (sorted, distinct) experts that could not be computed.
fn missing_error(layer: usize, mut experts: Vec<u32>, why: &str) -> WorkerError {
    experts.sort_unstable();
    experts.dedup();
    WorkerError::Unavailable(format!(
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
    fn chunks_keep_segment_order_and_bound_rows() {
        let segs = vec![(3, vec![0, 1, 2, 3, 4]), (5, vec![7]), (9, vec![8, 9])];
        let c = plan_chunks(segs, 3);
        let rows: Vec<usize> = c.iter().map(Chunk::rows).collect();
        assert_eq!(rows, vec![3, 3, 2]);
        let flat: Vec<(u32, u32)> =
            c.iter().flat_map(|c| c.segs.iter().flat_map(|(e, p)| p.iter().map(move |p| (*e, *p)))).collect();
        assert_eq!(flat, vec![(3, 0), (3, 1), (3, 2), (3, 3), (3, 4), (5, 7), (9, 8), (9, 9)]);
    }
}
