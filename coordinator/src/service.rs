//! The coordinator: a reconciler over the cluster state in the metadata store.
//!
//! Every coordinator mirrors the store (list, then watch from the listed revision; list again
//! whenever the watch ends) and answers the gRPC API from that mirror. One of them holds the
//! `leader` key under its lease; only the leader plans and commits. Workers join either through
//! the gRPC API (the coordinator writes their keys) or by writing their keys into etcd directly;
//! both look the same in the store, so the coordinator treats them alike.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use expertmesh_core::limits::MAX_ERROR_BYTES;
use expertmesh_core::placement::{CapacitySpread, PlacementPolicy, PlacementRequest, WorkerCapacity};
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use expertmesh_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, DeregisterRequest, DeregisterResponse, DrainRequest, DrainResponse,
    ExpertLoad, GetPlacementRequest, HeartbeatRequest, HeartbeatResponse, LayerPlacement, LoadReport, PlacementEvent,
    PlacementPlan, RegisterRequest, RegisterResponse, Replicas, ReportLoadResponse, ReportReadyRequest,
    ReportReadyResponse, ReportUnreachableRequest, ReportUnreachableResponse, WatchPlacementRequest, WorkerInfo,
    WorkerStatus,
};
use prost::Message;
use tokio::sync::{broadcast, Mutex};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use expertmesh_trust::{authorize, Expect, Identity, Need, Tls};

use crate::error::{CoordinatorError, Result};
use expertmesh_cluster::keys::{parse_epoch, ClusterKeys, Key};
use expertmesh_cluster::store::{open_store, LeaseId, MetadataStore};
use expertmesh_cluster::watch::{watch_prefix, WatchEvent, WatchOptions};

/// Membership must be quiet this long before the leader re-plans: a node's workers join (or die)
/// together, and one plan for all of them beats one per worker.
const SETTLE: Duration = Duration::from_millis(50);
/// Plans kept in the store behind the committed one.
const PLANS_KEPT: u64 = 8;
/// Largest control message either way (a placement of a 61-layer, 384-expert model is ~1 MiB).
const MAX_CONTROL_MESSAGE_BYTES: usize = 16 << 20;
/// Concurrent streams one connection may hold open (a worker uses a handful).
const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Open connections in all, and from one IP address (a worker holds two or three).
const MAX_CONNECTIONS: usize = 16_384;
const MAX_CONNECTIONS_PER_IP: usize = 256;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub cluster: String,
    /// The model the cluster serves.
    pub model_dir: String,
    pub model_config_json: String,
    /// Lease TTL of workers registered through this coordinator, and of its leadership.
    pub lease_ttl: Duration,
    /// Do not place until this many workers have registered.
    pub expect_workers: usize,
    /// Copies of every expert.
    pub replicas: usize,
    /// Bytes one expert occupies on a worker (f32 weights on the CPU backend).
    pub expert_bytes: u64,
    /// This coordinator's address as others reach it (default: the bound address).
    pub advertise: String,
    /// A member that does not report ready for a proposed plan within this is left out of the
    /// next plans (for as long again), so it never blocks the others.
    pub ready_timeout: Duration,
    /// Mutual TLS of this coordinator's server and of its calls to workers; None: plaintext
    /// (loopback development clusters).
    pub tls: Option<Tls>,
    /// The client certificate for an `etcds://` store.
    pub store_tls: Option<Tls>,
    /// Where to serve Prometheus metrics (`GET /metrics`); None: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Replicas per layer beyond `replicas` copies of every expert, given to the hottest.
    pub redundant_experts: usize,
    /// Rebalance when the committed plan's imbalance under the window's loads passes this
    /// (max over workers of load per throughput, over the ideal); 0: never.
    pub rebalance_threshold: f64,
    /// The load window, and the least time between two rebalances.
    pub rebalance_interval: Duration,
    /// Tokens the window must hold before its loads are trusted.
    pub rebalance_min_tokens: u64,
    /// Keep an expert where it is when that worker is within this (relative load) of the best:
    /// fewer bytes move, for a little balance.
    pub stickiness: f64,
}

impl CoordinatorConfig {
    /// Defaults for the load-balancing settings: 0 redundant experts; rebalance past 1.5 over a
    /// 5-minute window of at least 100k tokens; stickiness 0.1.
    pub const DEFAULT_REBALANCE: (usize, f64, Duration, u64, f64) = (0, 1.5, Duration::from_secs(300), 100_000, 0.1);
}

#[derive(Debug)]
struct Member {
    info: WorkerInfo,
    /// Last sign of life the coordinator saw (registration, heartbeat, load report).
    last_seen: Instant,
    ready_epoch: u64,
    load: HashMap<(u32, u32), u64>,
    /// From the last load report: bytes held for routed experts; process RSS.
    resident_bytes: u64,
    rss_bytes: u64,
    /// From the last load report: a load in progress (bytes done, total, bytes per second).
    loading: (u64, u64, f64),
    error: String,
    /// The leader reached its health service at its address: only then may it hold experts.
    verified: bool,
    /// Why the last health check failed; when to check again; failures in a row.
    check_error: String,
    next_check: Instant,
    check_failures: u32,
    /// The registration itself is wrong (written to the store directly): never placed.
    invalid: Option<String>,
    /// Left out of plans until the instant, and why: it did not become ready in time, or
    /// could not load its experts.
    excluded: Option<(String, Instant)>,
    /// Named by the pending plan and not ready for it since.
    waiting_since: Option<Instant>,
}

impl Member {
    fn new(info: WorkerInfo) -> Self {
        let invalid = expertmesh_cluster::validate::check_worker_info(&info).err();
        Self {
            info,
            last_seen: Instant::now(),
            ready_epoch: 0,
            load: HashMap::new(),
            resident_bytes: 0,
            rss_bytes: 0,
            loading: (0, 0, 0.0),
            error: String::new(),
            verified: false,
            check_error: String::new(),
            next_check: Instant::now(),
            check_failures: 0,
            invalid,
            excluded: None,
            waiting_since: None,
        }
    }

    /// Why the next plan leaves this member out, if it does.
    fn left_out(&self) -> Option<String> {
        if let Some(why) = &self.invalid {
            return Some(format!("invalid registration: {why}"));
        }
        if let Some((why, _)) = &self.excluded {
            return Some(why.clone());
        }
        if !self.verified {
            return Some(if self.check_error.is_empty() {
                "waiting for the leader's health check".to_string()
            } else {
                format!("the leader's health check failed: {}", self.check_error)
            });
        }
        None
    }
}

#[derive(Debug, Default)]
struct State {
    members: BTreeMap<String, Member>,
    draining: BTreeSet<String>,
    /// Plans seen in the store, by epoch (recent ones).
    plans: BTreeMap<u64, PlacementPlan>,
    /// Highest epoch seen in the store.
    epoch: u64,
    current: Option<PlacementPlan>,
    pending: Option<PlacementPlan>,
    /// Membership or drains last changed at this instant.
    changed_at: Option<Instant>,
    /// The leading coordinator's address, per the store.
    leader: String,
    /// Worker set a placement last failed for (not retried until membership changes).
    failed_for: Option<Vec<WorkerInfo>>,
    /// Why that placement failed; cleared by the next proposal.
    blocked: String,
    /// Workers a dispatcher could not reach -> who reported it.
    suspects: BTreeMap<String, String>,
    /// NCCL unique ids rank 0 of each group reported: (epoch, group) -> id.
    nccl_ids: BTreeMap<(u64, String), Vec<u8>>,
    /// Expert loads of the recent past (what placement balances); None until configured.
    window: Option<crate::rebalance::LoadWindow>,
    /// When the committed plan last changed, or a rebalance was last considered.
    rebalanced_at: Option<Instant>,
    /// Load-balancing proposals made since start.
    rebalances: u64,
    /// The policy of the latest proposal.
    policy: String,
}

impl State {
    fn epoch_of(p: &Option<PlacementPlan>) -> u64 {
        p.as_ref().map(|p| p.epoch).unwrap_or(0)
    }

    fn touch(&mut self) {
        self.changed_at = Some(Instant::now());
        self.failed_for = None;
    }

    /// Members the next plan may place on: not draining, registration valid, checked by the
    /// leader, not left out for failing to become ready. In id order.
    fn eligible(&self) -> Vec<&Member> {
        self.members.values().filter(|m| !self.draining.contains(&m.info.worker_id) && m.left_out().is_none()).collect()
    }

    /// The committed plan names a worker that is gone, draining or left out: some experts may
    /// have no live owner until the next plan commits.
    fn degraded(&self) -> bool {
        self.current.as_ref().is_some_and(|p| {
            p.workers.iter().any(|w| {
                self.draining.contains(&w.worker_id)
                    || self.members.get(&w.worker_id).is_none_or(|m| m.info != *w || m.left_out().is_some())
            })
        })
    }

    /// Workers the next plan should place on. Degraded, the repair goes to members that have
    /// already proven they load (ready for some epoch), so a member that never becomes ready
    /// cannot hold it up; the others join in the plan after. If the proven members alone cannot
    /// hold every expert, everyone eligible.
    fn desired(&self) -> Vec<WorkerInfo> {
        let all: Vec<WorkerInfo> = self.eligible().into_iter().map(|m| m.info.clone()).collect();
        if self.degraded() {
            let proven: Vec<WorkerInfo> =
                self.eligible().into_iter().filter(|m| m.ready_epoch > 0).map(|m| m.info.clone()).collect();
            if !proven.is_empty() && proven.len() < all.len() && self.failed_for.as_ref() != Some(&proven) {
                return proven;
            }
        }
        all
    }

    /// Whether the latest plan (pending, else committed) matches membership and lists every
    /// draining member.
    fn plan_is_current(&self) -> bool {
        let Some(p) = self.pending.as_ref().or(self.current.as_ref()) else { return false };
        let mut planned = p.workers.clone();
        planned.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        planned == self.desired()
            && self.draining.iter().filter(|d| self.members.contains_key(*d)).all(|d| p.draining.contains(d))
    }
}

/// The coordinator: store mirror, leadership, and the event stream watchers follow.
#[derive(Debug)]
pub struct CoordinatorCore {
    cfg: CoordinatorConfig,
    spec: ModelSpec,
    keys: ClusterKeys,
    state: Mutex<State>,
    store: Arc<dyn MetadataStore>,
    events: broadcast::Sender<PlacementEvent>,
    policy: Box<dyn PlacementPolicy>,
    is_leader: AtomicBool,
    /// Highest epoch any registering worker reported (an embedded store that lost its plans
    /// must not reuse their epochs).
    epoch_floor: AtomicU64,
    /// Suspects whose health check is in progress.
    checking: std::sync::Mutex<BTreeSet<String>>,
    /// New members whose health check is in progress.
    verifying: std::sync::Mutex<BTreeSet<String>>,
    /// What a metrics scrape reads, refreshed with the health (every 200 ms).
    gauges: Gauges,
    /// Members whose arrival was logged, as they registered: a resync that reads an unchanged
    /// member again logs nothing at info.
    announced: std::sync::Mutex<HashMap<String, WorkerInfo>>,
    /// A standby's last write of each worker's load report to the store (for the leader, which
    /// balances by them), at most every LOAD_FORWARD.
    forwarded: std::sync::Mutex<HashMap<String, Instant>>,
}

/// How often a standby coordinator passes a worker's load report on to the leader (through
/// the store).
const LOAD_FORWARD: Duration = Duration::from_secs(5);

/// The coordinator's metrics, as of the last health check.
#[derive(Debug, Default)]
struct Gauges {
    store_ok: AtomicBool,
    epoch: AtomicU64,
    pending: AtomicU64,
    registered: AtomicU64,
    verified: AtomicU64,
    ready: AtomicU64,
    draining: AtomicU64,
    /// f64 bits: the committed plan's imbalance under the load window (refreshed every second).
    imbalance: AtomicU64,
    rebalances: AtomicU64,
}

impl CoordinatorCore {
    pub fn new(cfg: CoordinatorConfig, store: Arc<dyn MetadataStore>) -> Result<Arc<Self>> {
        let spec = ModelSpec::from_config_json(&cfg.model_config_json)?;
        let state = State {
            window: Some(crate::rebalance::LoadWindow::new(cfg.rebalance_interval, &spec.moe_layers(), spec.n_routed)),
            ..State::default()
        };
        Ok(Arc::new(Self {
            keys: ClusterKeys::new(&cfg.cluster),
            cfg,
            spec,
            state: Mutex::new(state),
            store,
            events: broadcast::channel(64).0,
            policy: Box::new(CapacitySpread),
            is_leader: AtomicBool::new(false),
            epoch_floor: AtomicU64::new(0),
            gauges: Gauges::default(),
            announced: std::sync::Mutex::new(HashMap::new()),
            forwarded: std::sync::Mutex::new(HashMap::new()),
            checking: std::sync::Mutex::new(BTreeSet::new()),
            verifying: std::sync::Mutex::new(BTreeSet::new()),
        }))
    }

    pub fn is_leader(&self) -> bool {
        self.is_leader.load(Ordering::Acquire)
    }

    /// Refuse to serve a different model than the one the cluster in the store serves; publish
    /// ours when the store names none.
    pub async fn check_model(&self) -> Result<()> {
        if let Some(kv) = self.store.get(&self.keys.model_config()).await? {
            let theirs = ModelSpec::from_config_json(&String::from_utf8_lossy(&kv.value))?;
            if theirs != self.spec {
                return Err(CoordinatorError::InvalidInput(format!(
                    "cluster `{}` in the store serves a different model ({}, {} layers, {} experts) than {} ({}, {} layers, {} experts); use another --cluster or the same model",
                    self.cfg.cluster, theirs.model_type, theirs.num_layers, theirs.n_routed, self.cfg.model_dir,
                    self.spec.model_type, self.spec.num_layers, self.spec.n_routed
                )));
            }
        }
        // The directory first: workers look for the config and then read the directory.
        self.store.put(&self.keys.model_dir(), self.cfg.model_dir.clone().into_bytes(), None).await?;
        self.store.put(&self.keys.model_config(), self.cfg.model_config_json.clone().into_bytes(), None).await?;
        Ok(())
    }

    /// Apply one key's new value (None: deleted) to the mirror. Idempotent: the leader applies
    /// its own writes at once and again when the watch delivers them.
    fn apply(&self, st: &mut State, key: &str, value: Option<&[u8]>) {
        let Some(k) = self.keys.parse(key) else { return };
        match (k, value) {
            (Key::Worker(id), Some(v)) => {
                let Ok(info) = WorkerInfo::decode(v) else {
                    warn!(key = %expertmesh_core::limits::truncate_text(key, 200), "worker record does not decode; ignored");
                    return;
                };
                match st.members.get_mut(&id) {
                    Some(m) if m.info == info => m.last_seen = Instant::now(),
                    _ => {
                        let mut m = Member::new(info);
                        if m.info.worker_id != id {
                            m.invalid = Some(format!("stored under id `{id}` but names itself `{}`", m.info.worker_id));
                        }
                        let fresh = self
                            .announced
                            .lock()
                            .map(|mut a| a.insert(id.clone(), m.info.clone()).as_ref() != Some(&m.info))
                            .unwrap_or(true);
                        match &m.invalid {
                            None if !fresh => {
                                debug!(worker = %id, "member read again, unchanged")
                            }
                            None => {
                                info!(worker = %id, address = %m.info.address, "worker joined; checking its health before placing it")
                            }
                            Some(why) => {
                                warn!(worker = %expertmesh_core::limits::truncate_text(&id, 200), error = %why, "worker joined with an invalid registration; it will not be placed")
                            }
                        }
                        st.members.insert(id, m);
                        st.touch();
                    }
                }
            }
            (Key::Worker(id), None) if st.members.remove(&id).is_some() => {
                if let Ok(mut a) = self.announced.lock() {
                    a.remove(&id);
                }
                info!(worker = %id, "worker left (lease revoked or expired)");
                st.touch();
            }
            (Key::Ready(epoch, id), Some(v)) => {
                let mut touched = false;
                let pending_epoch = State::epoch_of(&st.pending);
                if let Some(m) = st.members.get_mut(&id) {
                    m.last_seen = Instant::now();
                    if v.is_empty() {
                        m.ready_epoch = m.ready_epoch.max(epoch);
                        m.error.clear();
                        m.waiting_since = None;
                        if m.excluded.take().is_some() {
                            info!(worker = %id, epoch, "worker became ready after all; it may be placed again");
                            touched = true;
                        }
                    } else {
                        m.error = expertmesh_core::limits::truncate_text(&String::from_utf8_lossy(v), MAX_ERROR_BYTES);
                        if m.excluded.is_none() && pending_epoch == epoch {
                            let why = format!("cannot load its experts for placement epoch {epoch}: {}", m.error);
                            m.excluded = Some((why, Instant::now() + self.cfg.ready_timeout));
                            touched = true;
                        }
                    }
                }
                if touched {
                    st.touch();
                }
            }
            (Key::Load(id), Some(v)) => {
                // Written by the worker itself in store mode: checked as the gRPC path checks it.
                let report = LoadReport::decode(v)
                    .ok()
                    .filter(|r| expertmesh_cluster::validate::check_load_report(&self.spec, r).is_ok());
                if let (Some(m), Some(r)) = (st.members.get_mut(&id), report) {
                    let now = Instant::now();
                    m.last_seen = now;
                    let new: HashMap<(u32, u32), u64> =
                        r.experts.into_iter().map(|e| ((e.layer, e.expert), e.tokens)).collect();
                    // The window counts what was computed since the last report (a counter that
                    // went down restarted: its new value counts).
                    let deltas: Vec<((u32, u32), u64)> = new
                        .iter()
                        .map(|(k, &v)| {
                            let old = m.load.get(k).copied().unwrap_or(0);
                            (*k, if v >= old { v - old } else { v })
                        })
                        .filter(|(_, d)| *d > 0)
                        .collect();
                    m.load = new;
                    (m.resident_bytes, m.rss_bytes) = (r.resident_bytes, r.rss_bytes);
                    let rate = if r.load_bytes_per_s.is_finite() { r.load_bytes_per_s.max(0.0) } else { 0.0 };
                    m.loading = (r.load_done_bytes.min(r.load_total_bytes), r.load_total_bytes, rate);
                    if let Some(w) = st.window.as_mut() {
                        for ((layer, expert), d) in deltas {
                            w.add(layer, expert, d, now);
                        }
                    }
                }
            }
            (Key::Drain(id), Some(_)) if st.draining.insert(id.clone()) => {
                info!(worker = %id, "drain requested");
                st.touch();
            }
            (Key::Drain(id), None) => {
                st.draining.remove(&id);
            }
            (Key::Suspect(id), Some(v)) => {
                let reporter = expertmesh_core::limits::truncate_text(&String::from_utf8_lossy(v), 128);
                st.suspects.insert(id, reporter);
            }
            (Key::Suspect(id), None) => {
                st.suspects.remove(&id);
            }
            (Key::Plan(epoch), Some(v)) => match PlacementPlan::decode(v) {
                Ok(p) => {
                    st.epoch = st.epoch.max(epoch);
                    st.plans.insert(epoch, p);
                    let keep_from = State::epoch_of(&st.current).saturating_sub(1);
                    st.plans.retain(|e, _| *e >= keep_from);
                }
                Err(e) => warn!(epoch, error = %e, "placement in the store does not decode; ignored"),
            },
            (Key::Plan(epoch), None) => {
                st.plans.remove(&epoch);
            }
            (Key::NcclId(epoch, group), Some(v)) => {
                st.nccl_ids.insert((epoch, group), v.to_vec());
                let ids = std::mem::take(&mut st.nccl_ids);
                if let Some(c) = st.current.as_mut().filter(|c| c.epoch == epoch) {
                    expertmesh_cluster::groups::fill_ids(c, &ids);
                }
                st.nccl_ids = ids;
            }
            (Key::NcclId(epoch, group), None) => {
                st.nccl_ids.remove(&(epoch, group));
            }
            (Key::Pending, Some(v)) => {
                let epoch = parse_epoch(v);
                if epoch > State::epoch_of(&st.current) && epoch != State::epoch_of(&st.pending) {
                    if let Some(p) = st.plans.get(&epoch).cloned() {
                        st.pending = Some(p.clone());
                        let _ = self.events.send(PlacementEvent { plan: Some(p), committed: false });
                    }
                }
            }
            (Key::Pending, None) => st.pending = None,
            (Key::Current, Some(v)) => {
                let epoch = parse_epoch(v);
                if epoch != State::epoch_of(&st.current) {
                    if let Some(mut p) = st.plans.get(&epoch).cloned() {
                        expertmesh_cluster::groups::fill_ids(&mut p, &st.nccl_ids);
                        for w in &p.workers {
                            if let Some(m) = st.members.get_mut(&w.worker_id).filter(|m| m.info == *w) {
                                m.ready_epoch = m.ready_epoch.max(epoch);
                                m.verified = true;
                            }
                        }
                        if State::epoch_of(&st.pending) <= epoch {
                            st.pending = None;
                        }
                        st.rebalanced_at = Some(Instant::now());
                        st.current = Some(p.clone());
                        let _ = self.events.send(PlacementEvent { plan: Some(p), committed: true });
                    }
                }
            }
            (Key::Leader, v) => st.leader = v.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default(),
            _ => {}
        }
    }

    /// Rebuild the mirror from a full listing; returns the listing's revision. A coordinator
    /// restarted against the same store resumes where the last one stopped, without re-planning.
    pub async fn resync(&self) -> Result<u64> {
        let (kvs, rev) = self.store.list(self.keys.root()).await?;
        self.rebuild(kvs).await;
        debug!(revision = rev, "mirrored the store");
        Ok(rev)
    }

    /// Rebuild the mirror from every key of the cluster, keeping what only this process knows.
    async fn rebuild(&self, mut kvs: Vec<expertmesh_cluster::store::KeyValue>) {
        // Plans before the pointers to them; members before their ready markers and loads.
        let rank = |k: &str| match self.keys.parse(k) {
            Some(Key::Plan(_)) => 0,
            Some(Key::Current) => 1,
            Some(Key::Pending) => 2,
            Some(Key::Worker(_)) => 3,
            _ => 4,
        };
        kvs.sort_by_key(|kv| rank(&kv.key));
        let mut st = self.state.lock().await;
        let old = std::mem::take(&mut *st);
        for kv in &kvs {
            self.apply(&mut st, &kv.key, Some(&kv.value));
        }
        // Keep what only this process knows: loads reported over gRPC, last signs of life,
        // health checks and exclusions. Members a plan names were checked by the leader that
        // placed them.
        let planned: BTreeSet<(String, String)> = [&st.current, &st.pending]
            .into_iter()
            .flatten()
            .flat_map(|p| p.workers.iter().map(|w| (w.worker_id.clone(), w.address.clone())))
            .collect();
        for (id, m) in st.members.iter_mut() {
            if planned.contains(&(id.clone(), m.info.address.clone())) {
                m.verified = true;
            }
            if let Some(o) = old.members.get(id).filter(|o| o.info == m.info) {
                m.last_seen = o.last_seen;
                if m.load.is_empty() {
                    m.load = o.load.clone();
                }
                m.verified |= o.verified;
                m.check_error = o.check_error.clone();
                m.next_check = o.next_check;
                m.check_failures = o.check_failures;
                m.excluded = o.excluded.clone().or(m.excluded.take());
                m.waiting_since = o.waiting_since;
                m.ready_epoch = m.ready_epoch.max(o.ready_epoch);
            }
        }
        st.changed_at = Some(old.changed_at.unwrap_or_else(Instant::now));
        // The load window and the rebalance clock are this process's own too.
        st.window = old.window;
        st.rebalances = old.rebalances;
        st.policy = old.policy;
        if State::epoch_of(&old.current) == State::epoch_of(&st.current) {
            st.rebalanced_at = old.rebalanced_at;
        }
        if old.current.as_ref().map(|p| p.epoch) != st.current.as_ref().map(|p| p.epoch) {
            info!(
                workers = st.members.len(),
                current_epoch = State::epoch_of(&st.current),
                pending_epoch = State::epoch_of(&st.pending),
                "coordinator state read from the store"
            );
        }
    }

    /// Mirror the store until `shutdown`: one snapshot, then every change (the watch catches up
    /// by itself after an outage and sends only what changed meanwhile).
    async fn mirror(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failing = false;
        let mut rx = loop {
            match watch_prefix(self.store.clone(), self.keys.root(), WatchOptions::default()).await {
                Ok((kvs, rx)) => {
                    self.rebuild(kvs).await;
                    break rx;
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "cannot read the metadata store; serving the last known state and retrying");
                        failing = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    }
                }
            }
        };
        if failing {
            info!("metadata store reachable again; state reconciled");
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = rx.recv() => match ev {
                    Some(WatchEvent::Change(ev)) => {
                        let mut st = self.state.lock().await;
                        self.apply(&mut st, &ev.key, ev.value.as_deref());
                    }
                    Some(WatchEvent::Lost(e)) => {
                        warn!(error = %e, "cannot read the metadata store; serving the last known state and retrying");
                    }
                    Some(WatchEvent::Restored) => info!("metadata store reachable again; state reconciled"),
                    None => return,
                },
            }
        }
    }

    /// Campaign for the `leader` key; while leading, keep its lease alive. Revokes it on
    /// shutdown so a standby takes over at once.
    async fn lead(self: Arc<Self>, shutdown: CancellationToken) {
        let ttl = self.cfg.lease_ttl;
        let poll = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let lease = match self.campaign().await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(poll) => {} }
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "cannot campaign for leadership");
                    tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(poll) => {} }
                    continue;
                }
            };
            // Lead from a fresh view of the store.
            if let Err(e) = self.resync().await {
                warn!(error = %e, "cannot read the store after winning leadership");
            }
            self.is_leader.store(true, Ordering::Release);
            info!(coordinator = %self.cfg.advertise, lease, "leading the cluster");
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.is_leader.store(false, Ordering::Release);
                        let _ = self.store.revoke(lease).await;
                        info!("leadership released");
                        return;
                    }
                    _ = tokio::time::sleep(ttl / 3) => {}
                }
                match self.store.keep_alive(lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!("leadership lease lost; standing by");
                        self.is_leader.store(false, Ordering::Release);
                        break;
                    }
                    // Nothing can be written while the store is down, so holding on is harmless;
                    // etcd restarts leases with a full TTL when it comes back.
                    Err(e) => debug!(error = %e, "cannot renew the leadership lease"),
                }
            }
        }
    }

    /// One attempt to take the `leader` key. Some(lease) when this coordinator now leads.
    async fn campaign(&self) -> Result<Option<LeaseId>> {
        if self.store.get(&self.keys.leader()).await?.is_some() {
            return Ok(None);
        }
        let lease = self.store.grant_lease(self.cfg.lease_ttl).await?;
        let me = self.cfg.advertise.clone().into_bytes();
        if self.store.put_if(&self.keys.leader(), me, 0, Some(lease)).await?.is_some() {
            return Ok(Some(lease));
        }
        self.store.revoke(lease).await?;
        Ok(None)
    }

    /// Leader only: check the health of members never checked and of workers a dispatcher
    /// could not reach; leave out members that do not become ready in time; re-plan after
    /// membership settles; commit a plan once all its workers are ready. Runs every `tick`.
    async fn tick(self: &Arc<Self>) -> Result<()> {
        if !self.is_leader() {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        for (id, reporter) in &st.suspects {
            let fresh = self.checking.lock().map(|mut c| c.insert(id.clone())).unwrap_or(false);
            if fresh {
                let address = st.members.get(id).map(|m| m.info.address.clone());
                tokio::spawn(self.clone().check_suspect(id.clone(), reporter.clone(), address));
            }
        }
        let now = Instant::now();
        for (id, m) in &st.members {
            if !m.verified && m.invalid.is_none() && now >= m.next_check {
                let fresh = self.verifying.lock().map(|mut c| c.insert(id.clone())).unwrap_or(false);
                if fresh {
                    tokio::spawn(self.clone().verify(id.clone(), m.info.clone()));
                }
            }
        }
        self.check_readiness(&mut st, now);
        let settled = st.changed_at.is_some_and(|t| t.elapsed() >= SETTLE);
        if settled && !st.plan_is_current() {
            let desired = st.desired();
            // `expect_workers` gates only the first placement; after that, every change re-plans
            // on whoever is left.
            let first = st.current.is_none() && st.pending.is_none();
            let enough = if first { desired.len() >= self.cfg.expect_workers.max(1) } else { !desired.is_empty() };
            if enough && st.failed_for.as_ref() != Some(&desired) {
                self.propose(&mut st, desired, None).await?;
            }
        } else if settled || st.changed_at.is_none() {
            self.maybe_rebalance(&mut st).await?;
        }
        if let Some(p) = &st.pending {
            let all_ready =
                p.workers.iter().all(|w| st.members.get(&w.worker_id).is_some_and(|m| m.ready_epoch >= p.epoch));
            if all_ready {
                let epoch = p.epoch;
                self.store.put(&self.keys.current(), epoch.to_string().into_bytes(), None).await?;
                self.store.delete(&self.keys.pending()).await?;
                info!(epoch, workers = p.workers.len(), draining = p.draining.len(), "placement committed");
                self.apply(&mut st, &self.keys.current(), Some(epoch.to_string().as_bytes()));
                self.apply(&mut st, &self.keys.pending(), None);
                drop(st);
                self.collect_garbage(epoch).await?;
            }
        }
        Ok(())
    }

    /// Members the pending plan waits on: one not ready within `ready_timeout` is left out of
    /// the next plans for as long again (then tried again), so it never holds the others up.
    fn check_readiness(&self, st: &mut State, now: Instant) {
        let pending: Option<(u64, Vec<String>)> =
            st.pending.as_ref().map(|p| (p.epoch, p.workers.iter().map(|w| w.worker_id.clone()).collect()));
        let mut touched = false;
        for (id, m) in st.members.iter_mut() {
            if let Some((_, until)) = &m.excluded {
                if now >= *until {
                    info!(worker = %id, "trying a worker left out of plans again");
                    m.excluded = None;
                    m.waiting_since = None;
                    touched = true;
                }
            }
            let waited_on = pending.as_ref().filter(|(e, ids)| ids.contains(id) && m.ready_epoch < *e);
            let Some((epoch, _)) = waited_on else {
                m.waiting_since = None;
                continue;
            };
            let since = *m.waiting_since.get_or_insert(now);
            if m.excluded.is_none() && now.duration_since(since) >= self.cfg.ready_timeout {
                let why = format!(
                    "did not report ready for placement epoch {epoch} within {:?} (--ready-timeout-ms){}",
                    self.cfg.ready_timeout,
                    if m.error.is_empty() { String::new() } else { format!(": {}", m.error) }
                );
                warn!(worker = %id, epoch, "worker not ready in time; planning around it");
                m.excluded = Some((why, now + self.cfg.ready_timeout));
                m.waiting_since = None;
                touched = true;
            }
        }
        if touched {
            st.touch();
        }
    }

    async fn apply_health(self: Arc<Self>, r: &tonic_health::server::HealthReporter, store_ok: bool, leads: bool) {
        use tonic_health::ServingStatus::{NotServing, Serving};
        let s = |ok: bool| if ok { Serving } else { NotServing };
        r.set_service_status("", s(store_ok)).await;
        r.set_service_status(expertmesh_proto::COORDINATOR_SERVICE, s(store_ok)).await;
        r.set_service_status(expertmesh_proto::LEADER_SERVICE, s(store_ok && leads)).await;
    }

    /// Keep the health service true: whether the store answers, whether this coordinator leads.
    async fn report_health(self: Arc<Self>, r: tonic_health::server::HealthReporter, stop: CancellationToken) {
        let mut last: Option<(bool, bool)> = None;
        let mut round = 0u64;
        loop {
            round += 1;
            let store_ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), self.store.get(&self.keys.leader())).await,
                Ok(Ok(_))
            );
            let now = (store_ok, self.is_leader());
            {
                let g = &self.gauges;
                let st = self.state.lock().await;
                let current = State::epoch_of(&st.current);
                g.store_ok.store(store_ok, Ordering::Relaxed);
                g.epoch.store(current, Ordering::Relaxed);
                g.pending.store(State::epoch_of(&st.pending), Ordering::Relaxed);
                g.registered.store(st.members.len() as u64, Ordering::Relaxed);
                g.verified.store(st.members.values().filter(|m| m.verified).count() as u64, Ordering::Relaxed);
                g.ready.store(
                    st.members.values().filter(|m| current > 0 && m.ready_epoch >= current).count() as u64,
                    Ordering::Relaxed,
                );
                g.draining.store(st.draining.len() as u64, Ordering::Relaxed);
                g.rebalances.store(st.rebalances, Ordering::Relaxed);
                if round % 5 == 1 {
                    g.imbalance.store(self.window_imbalance(&st).to_bits(), Ordering::Relaxed);
                }
            }
            if Some(now) != last {
                if last.is_some_and(|l| l.0 != store_ok) {
                    if store_ok {
                        info!("health: SERVING (the store answers again)");
                    } else {
                        warn!("health: NOT_SERVING (the store does not answer)");
                    }
                }
                self.clone().apply_health(&r, now.0, now.1).await;
                last = Some(now);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// The Prometheus exposition of this coordinator now.
    /// The committed plan's imbalance under the window's loads (0 without a plan or load).
    fn window_imbalance(&self, st: &State) -> f64 {
        let Some((loads, total, _)) = st.window.as_ref().map(|w| w.loads(Instant::now())) else { return 0.0 };
        self.imbalance_under(st, &loads, total)
    }

    /// The committed plan's imbalance under `loads` (their sum `total`; 0 without a plan or load).
    fn imbalance_under(&self, st: &State, loads: &[Vec<f64>], total: f64) -> f64 {
        let Some(p) = &st.current else { return 0.0 };
        if total <= 0.0 {
            return 0.0;
        }
        let layers = self.spec.moe_layers();
        let devices = crate::rebalance::devices(&p.workers, self.cfg.expert_bytes);
        crate::rebalance::placement_of(p, &p.workers, &layers).imbalance(loads, &devices)
    }

    pub fn render_metrics(&self) -> String {
        use expertmesh_core::metrics::{names, Exposition, Kind};
        let g = &self.gauges;
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        let (unauth, denied) = expertmesh_trust::authz::refusals();
        let mut e = Exposition::new();
        e.single(names::PLACEMENT_EPOCH, Kind::Gauge, "Committed placement epoch", v(&g.epoch))
            .single(names::PLACEMENT_PENDING_EPOCH, Kind::Gauge, "Proposed placement epoch (0: none)", v(&g.pending))
            .single(names::LEADER, Kind::Gauge, "1 on the coordinator that leads", b(self.is_leader()))
            .single(
                names::STORE_REACHABLE,
                Kind::Gauge,
                "1 while the metadata store answers",
                b(g.store_ok.load(Ordering::Relaxed)),
            )
            .family(
                names::WORKERS,
                Kind::Gauge,
                "Workers by state: registered, verified (health-checked), ready (loaded the committed epoch), draining",
                &["state"],
                [
                    (vec!["registered".into()], v(&g.registered)),
                    (vec!["verified".into()], v(&g.verified)),
                    (vec!["ready".into()], v(&g.ready)),
                    (vec!["draining".into()], v(&g.draining)),
                ],
            )
            .single(
                names::PLACEMENT_IMBALANCE,
                Kind::Gauge,
                "Max over workers of load per throughput over the ideal, for the committed placement under the load window (0: no load)",
                f64::from_bits(g.imbalance.load(Ordering::Relaxed)),
            )
            .single(
                names::REBALANCES_TOTAL,
                Kind::Counter,
                "Placements proposed to rebalance load",
                v(&g.rebalances),
            )
            .family(
                names::REFUSED_TOTAL,
                Kind::Counter,
                "Calls refused, by reason",
                &["reason"],
                [(vec!["unauthenticated".into()], unauth as f64), (vec!["permission_denied".into()], denied as f64)],
            );
        e.finish()
    }

    /// Whether `lease` is the lease `worker`'s record is bound to. Lease ids are random and only
    /// ever reach the worker they were granted to; this makes a guessed one useless too.
    async fn owns_lease(&self, worker: &str, lease: u64) -> Result<bool> {
        let held = self.store.get(&self.keys.worker(worker)).await?;
        Ok(held.is_some_and(|kv| kv.lease != 0 && kv.lease as u64 == lease))
    }

    /// Check a new member's health service at its address before it may hold experts.
    async fn verify(self: Arc<Self>, id: String, info: WorkerInfo) {
        // Over TLS the address must present `worker.<id>`: a registration cannot point the
        // cluster's traffic at someone else's server.
        let expect = Expect::Identity(Identity::Worker(id.clone()));
        let r = expertmesh_proto::reachable(
            &info.address,
            expertmesh_proto::EXPERT_SERVICE,
            Duration::from_secs(1),
            self.cfg.tls.as_ref(),
            expect,
        )
        .await;
        {
            let mut st = self.state.lock().await;
            let mut touched = false;
            if let Some(m) = st.members.get_mut(&id).filter(|m| m.info == info) {
                match r {
                    Ok(()) => {
                        info!(worker = %id, address = %info.address, "worker answers the leader's health check; it may hold experts");
                        m.verified = true;
                        m.check_error.clear();
                        m.check_failures = 0;
                        touched = true;
                    }
                    Err(e) => {
                        m.check_failures = m.check_failures.saturating_add(1);
                        let backoff = Duration::from_millis(250) * (1u32 << m.check_failures.min(4));
                        m.next_check = Instant::now() + backoff;
                        if m.check_failures >= 3 && m.check_error != e {
                            warn!(worker = %id, address = %info.address, error = %e, "worker does not answer the leader's health check; it is not placed");
                        }
                        m.check_error = e;
                    }
                }
            }
            if touched {
                st.touch();
            }
        }
        if let Ok(mut v) = self.verifying.lock() {
            v.remove(&id);
        }
    }

    /// A dispatcher could not reach `id`: ask the worker's health service ourselves; if it does
    /// not answer SERVING within a second, revoke its lease now (its keys go, the leader
    /// re-plans) instead of waiting up to a TTL for it to expire. A live worker that was wrongly
    /// removed finds its lease gone and registers again.
    async fn check_suspect(self: Arc<Self>, id: String, reporter: String, address: Option<String>) {
        let alive = match &address {
            Some(a) => expertmesh_proto::reachable(
                a,
                expertmesh_proto::EXPERT_SERVICE,
                Duration::from_secs(1),
                self.cfg.tls.as_ref(),
                Expect::Identity(Identity::Worker(id.clone())),
            )
            .await
            .is_ok(),
            None => true, // not a member (already gone): nothing to do
        };
        if !alive {
            match self.store.get(&self.keys.worker(&id)).await {
                Ok(Some(kv)) if kv.lease != 0 => match self.store.revoke(kv.lease).await {
                    Ok(()) => {
                        warn!(worker = %id, reporter = %reporter, "worker unreachable (reported, and its health check failed); lease revoked")
                    }
                    Err(e) => warn!(worker = %id, error = %e, "cannot revoke the lease of an unreachable worker"),
                },
                Ok(_) => {}
                Err(e) => warn!(worker = %id, error = %e, "cannot read the worker's lease"),
            }
        } else if address.is_some() {
            info!(worker = %id, reporter = %reporter, "worker reported unreachable but answers its health check; keeping it");
        }
        let _ = self.store.delete(&self.keys.suspect(&id)).await;
        {
            let mut st = self.state.lock().await;
            self.apply(&mut st, &self.keys.suspect(&id), None);
        }
        if let Ok(mut c) = self.checking.lock() {
            c.remove(&id);
        }
    }

    /// Delete ready markers of epochs before `committed` and plans older than PLANS_KEPT.
    async fn collect_garbage(&self, committed: u64) -> Result<()> {
        let (kvs, _) = self.store.list(&self.keys.ready_all()).await?;
        for kv in kvs {
            if matches!(self.keys.parse(&kv.key), Some(Key::Ready(e, _)) if e < committed) {
                self.store.delete(&kv.key).await?;
            }
        }
        let (ids, _) = self.store.list(&self.keys.nccl_ids()).await?;
        for kv in ids {
            if matches!(self.keys.parse(&kv.key), Some(Key::NcclId(e, _)) if e < committed) {
                self.store.delete(&kv.key).await?;
            }
        }
        let (plans, _) = self.store.list(&self.keys.placement()).await?;
        for kv in plans {
            if matches!(self.keys.parse(&kv.key), Some(Key::Plan(e)) if e + PLANS_KEPT < committed) {
                self.store.delete(&kv.key).await?;
            }
        }
        Ok(())
    }

    /// Leader only, with the plan current and nothing pending: when the committed plan's
    /// imbalance under the window's loads passes the threshold and a new plan would cut it by a
    /// tenth or more, propose that plan (same workers; the epoch protocol moves the experts).
    async fn maybe_rebalance(&self, st: &mut State) -> Result<()> {
        let cfg = &self.cfg;
        if cfg.rebalance_threshold <= 0.0 || st.pending.is_some() || !st.plan_is_current() || st.degraded() {
            return Ok(());
        }
        let Some(current) = st.current.clone() else { return Ok(()) };
        let now = Instant::now();
        if st.rebalanced_at.is_some_and(|t| now.duration_since(t) < cfg.rebalance_interval) {
            return Ok(());
        }
        let Some((loads, total, _)) = st.window.as_ref().map(|w| w.loads(now)) else { return Ok(()) };
        if total < cfg.rebalance_min_tokens as f64 {
            return Ok(());
        }
        st.rebalanced_at = Some(now);
        let layers = self.spec.moe_layers();
        let devices = crate::rebalance::devices(&current.workers, cfg.expert_bytes);
        let before = crate::rebalance::placement_of(&current, &current.workers, &layers);
        let now_imb = before.imbalance(&loads, &devices);
        if now_imb < cfg.rebalance_threshold {
            debug!(imbalance = format!("{now_imb:.3}"), "load balanced enough; no rebalance");
            return Ok(());
        }
        match self.balanced(&current.workers, &loads, Some(&current)) {
            Ok(p) => {
                let next = p.imbalance(&loads, &devices);
                if next > now_imb * 0.9 {
                    info!(
                        imbalance = format!("{now_imb:.3}"),
                        best = format!("{next:.3}"),
                        "load imbalance past --rebalance-threshold, but no plan would cut it by a tenth; keeping the placement"
                    );
                    return Ok(());
                }
                let moved: u64 =
                    expertmesh_core::balance::bytes_moved(&before, &p, &vec![cfg.expert_bytes; devices.len()])
                        .iter()
                        .sum();
                info!(
                    imbalance = format!("{now_imb:.3}"),
                    predicted = format!("{next:.3}"),
                    window_tokens = total as u64,
                    bytes_to_load = moved,
                    "rebalancing expert placement"
                );
                st.rebalances += 1;
                self.propose(st, current.workers.clone(), Some(p)).await
            }
            Err(e) => {
                warn!(error = %e, "cannot compute a balanced placement; keeping the current one");
                Ok(())
            }
        }
    }

    /// The balanced placement of every MoE layer over `workers` for `loads` (uniform where none
    /// are known), staying near `current` where that costs little balance.
    fn balanced(
        &self,
        workers: &[WorkerInfo],
        loads: &[Vec<f64>],
        current: Option<&PlacementPlan>,
    ) -> std::result::Result<expertmesh_core::balance::Placement, expertmesh_core::CoreError> {
        let layers = self.spec.moe_layers();
        let devices = crate::rebalance::devices(workers, self.cfg.expert_bytes);
        let experts = self.spec.n_routed;
        let uniform;
        let loads = if loads.iter().flatten().sum::<f64>() > 0.0 {
            loads
        } else {
            uniform = vec![vec![1.0; experts]; layers.len()];
            &uniform
        };
        let from = current.map(|c| crate::rebalance::placement_of(c, workers, &layers));
        expertmesh_core::balance::place(&expertmesh_core::balance::Problem {
            loads,
            devices: &devices,
            physical: experts * self.cfg.replicas.max(1) + self.cfg.redundant_experts,
            min_replicas: self.cfg.replicas.max(1),
            groups: self.spec.n_group.max(1),
            policy: expertmesh_core::balance::Policy::Auto,
            current: from.as_ref(),
            stickiness: self.cfg.stickiness,
        })
    }

    /// Propose the next epoch over `workers`: `placement` when the caller computed it for
    /// them, else balanced for the window's loads.
    async fn propose(
        &self,
        st: &mut State,
        workers: Vec<WorkerInfo>,
        placement: Option<expertmesh_core::balance::Placement>,
    ) -> Result<()> {
        let layers = self.spec.moe_layers();
        let balanced = match placement {
            Some(p) => Ok(p),
            None => {
                let loads = st.window.as_ref().map(|w| w.loads(Instant::now()).0).unwrap_or_default();
                self.balanced(&workers, &loads, st.current.as_ref())
            }
        };
        let (plan_layers, policy) = match balanced {
            Ok(p) => (
                crate::rebalance::layers_of(&p, &layers, self.spec.n_routed),
                p.policy.unwrap_or_default().name().to_string(),
            ),
            Err(e) => {
                // The balancer splits each worker's memory evenly over the layers; the spread
                // below uses it whole, so it still fits where memory is tight.
                debug!(error = %e, "balanced placement does not fit; spreading by capacity");
                let caps: Vec<WorkerCapacity> =
                    workers.iter().map(|w| crate::rebalance::capacity(w, &workers)).collect();
                let req = PlacementRequest {
                    layers: layers.clone(),
                    experts: self.spec.n_routed,
                    expert_bytes: self.cfg.expert_bytes,
                    replicas: self.cfg.replicas,
                };
                match self.policy.place(&req, &caps) {
                    Ok(p) => (
                        p.layers
                            .iter()
                            .map(|(l, experts)| LayerPlacement {
                                layer: *l as u32,
                                experts: experts
                                    .iter()
                                    .map(|r| Replicas { workers: r.clone(), shares: vec![] })
                                    .collect(),
                            })
                            .collect(),
                        self.policy.name().to_string(),
                    ),
                    Err(e) => {
                        warn!(error = %e, workers = workers.len(), "cannot place experts on the current workers; waiting for membership to change");
                        let why = e.to_string();
                        let why = why.strip_prefix("placement: ").unwrap_or(&why);
                        st.blocked = format!("{why} (waiting for membership to change)");
                        st.failed_for = Some(workers);
                        return Ok(());
                    }
                }
            }
        };
        let epoch = st.epoch.max(self.epoch_floor.load(Ordering::Acquire)) + 1;
        let draining: Vec<String> = st.draining.iter().filter(|d| st.members.contains_key(*d)).cloned().collect();
        let nccl_groups = expertmesh_cluster::groups::plan_groups(&workers);
        let msg = PlacementPlan { epoch, workers, layers: plan_layers, nccl_groups, draining };
        // Written once: a second leader racing for the same epoch loses here.
        let bytes = msg.encode_to_vec();
        if self.store.put_if(&self.keys.plan(epoch), bytes.clone(), 0, None).await?.is_none() {
            return Err(CoordinatorError::Cluster(expertmesh_cluster::ClusterError::Store(format!(
                "placement epoch {epoch} already exists in the store: another coordinator is writing to this cluster"
            ))));
        }
        self.store.put(&self.keys.pending(), epoch.to_string().into_bytes(), None).await?;
        info!(
            epoch,
            workers = msg.workers.len(),
            draining = msg.draining.len(),
            policy = %policy,
            "placement proposed"
        );
        st.policy = policy;
        st.blocked.clear();
        self.apply(st, &self.keys.plan(epoch), Some(&bytes));
        self.apply(st, &self.keys.pending(), Some(epoch.to_string().as_bytes()));
        Ok(())
    }
}

/// Refuse an identifier argument that is empty, too long or not `[A-Za-z0-9._-]`.
fn id_arg(rpc: &str, field: &str, v: &str) -> Result<(), Status> {
    expertmesh_core::limits::check_id(field, v).map_err(|e| Status::invalid_argument(format!("{rpc}: {e}")))
}

/// The gRPC face of [`CoordinatorCore`].
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    core: Arc<CoordinatorCore>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<PlacementEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let id = req.get_ref().worker.as_ref().map(|w| w.worker_id.clone()).unwrap_or_default();
        authorize(&req, "Register", Need::Worker(&id))?;
        let req = req.into_inner();
        let info = req.worker.ok_or_else(|| Status::invalid_argument("register: missing `worker`"))?;
        expertmesh_cluster::validate::check_worker_info(&info)
            .map_err(|e| Status::invalid_argument(format!("register: {e}")))?;
        let c = &self.core;
        c.epoch_floor.fetch_max(req.epoch, Ordering::AcqRel);
        let key = c.keys.worker(&info.worker_id);
        let mut unchanged = false;
        if let Some(old) = c.store.get(&key).await.map_err(Status::from)? {
            // Registering again (lease lost, or restarted): the old lease goes with its keys.
            unchanged = WorkerInfo::decode(old.value.as_slice()).is_ok_and(|o| o == info);
            if old.lease != 0 {
                c.store.revoke(old.lease).await.map_err(Status::from)?;
            }
        }
        let lease_id = c.store.grant_lease(c.cfg.lease_ttl).await.map_err(Status::from)?;
        let bytes = info.encode_to_vec();
        c.store.put(&key, bytes.clone(), Some(lease_id)).await.map_err(Status::from)?;
        if unchanged {
            debug!(worker = %info.worker_id, lease = lease_id, "worker registered again, unchanged");
        } else {
            info!(worker = %info.worker_id, address = %info.address, lease = lease_id, "worker registered");
        }
        let mut st = c.state.lock().await;
        c.apply(&mut st, &key, Some(&bytes));
        let placement_epoch = State::epoch_of(&st.current).max(State::epoch_of(&st.pending));
        Ok(Response::new(RegisterResponse {
            lease_id: lease_id as u64,
            ttl_ms: c.cfg.lease_ttl.as_millis() as u32,
            model_config_json: c.cfg.model_config_json.clone(),
            model_dir: c.cfg.model_dir.clone(),
            placement_epoch,
        }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        authorize(&req, "Heartbeat", Need::Worker(&req.get_ref().worker_id))?;
        let r = req.into_inner();
        id_arg("heartbeat", "worker_id", &r.worker_id)?;
        let c = &self.core;
        // Only the lease the worker's record is bound to: a heartbeat naming any other lease
        // (another worker's, the leader's) keeps nothing alive.
        let owned = c.owns_lease(&r.worker_id, r.lease_id).await;
        let renewed = match owned {
            Ok(false) => Ok(false),
            Ok(true) | Err(_) => c.store.keep_alive(r.lease_id as LeaseId).await,
        };
        let known = match renewed {
            Ok(alive) => alive,
            Err(e) => {
                // The worker reached us, so it is alive; the store cannot confirm the lease right
                // now. Membership changes wait for the store; the next heartbeat renews the lease.
                debug!(worker = %r.worker_id, error = %e, "store unreachable; cannot renew the lease now");
                true
            }
        };
        let mut st = c.state.lock().await;
        if let Some(m) = st.members.get_mut(&r.worker_id) {
            m.last_seen = Instant::now();
        }
        if !known {
            warn!(worker = %r.worker_id, "lease expired in the store; the worker must register again");
        }
        Ok(Response::new(HeartbeatResponse { known, current_epoch: State::epoch_of(&st.current) }))
    }

    async fn deregister(&self, req: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        authorize(&req, "Deregister", Need::WorkerOrAdmin(&req.get_ref().worker_id))?;
        let r = req.into_inner();
        id_arg("deregister", "worker_id", &r.worker_id)?;
        let c = &self.core;
        // A lease is only ever revoked for the worker it belongs to.
        if !c.owns_lease(&r.worker_id, r.lease_id).await.map_err(Status::from)? {
            return Err(Status::permission_denied(format!(
                "deregister: lease {} is not the lease of worker `{}`",
                r.lease_id, r.worker_id
            )));
        }
        c.store.revoke(r.lease_id as LeaseId).await.map_err(Status::from)?;
        let mut st = c.state.lock().await;
        c.apply(&mut st, &c.keys.worker(&r.worker_id), None);
        info!(worker = %r.worker_id, "worker deregistered");
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn get_placement(&self, req: Request<GetPlacementRequest>) -> Result<Response<PlacementPlan>, Status> {
        authorize(&req, "GetPlacement", Need::Cluster)?;
        let st = self.core.state.lock().await;
        st.current.clone().map(Response::new).ok_or_else(|| Status::unavailable("no placement committed yet"))
    }

    type WatchPlacementStream = EventStream;

    async fn watch_placement(
        &self,
        req: Request<WatchPlacementRequest>,
    ) -> Result<Response<Self::WatchPlacementStream>, Status> {
        authorize(&req, "WatchPlacement", Need::Cluster)?;
        let (mut rx, initial) = {
            let st = self.core.state.lock().await;
            let rx = self.core.events.subscribe();
            let mut initial = Vec::new();
            if let Some(p) = &st.current {
                initial.push(PlacementEvent { plan: Some(p.clone()), committed: true });
            }
            if let Some(p) = &st.pending {
                initial.push(PlacementEvent { plan: Some(p.clone()), committed: false });
            }
            (rx, initial)
        };
        let (tx, out) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for ev in initial {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let item = match rx.recv().await {
                    Ok(ev) => Ok(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::data_loss(format!("placement watch lagged by {n} events; watch again")))
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        let s: EventStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(out));
        Ok(Response::new(s))
    }

    async fn report_ready(&self, req: Request<ReportReadyRequest>) -> Result<Response<ReportReadyResponse>, Status> {
        authorize(&req, "ReportReady", Need::Worker(&req.get_ref().worker_id))?;
        let mut r = req.into_inner();
        id_arg("report_ready", "worker_id", &r.worker_id)?;
        r.error = expertmesh_core::limits::truncate_text(&r.error, MAX_ERROR_BYTES);
        let c = &self.core;
        if !c.state.lock().await.members.contains_key(&r.worker_id) {
            return Err(Status::not_found(format!("worker {} is not registered", r.worker_id)));
        }
        if !r.nccl_group.is_empty() || !r.nccl_unique_id.is_empty() {
            // The id first: whoever sees the worker ready finds its group's id already stored.
            let plan = c.state.lock().await.plans.get(&r.epoch).cloned().unwrap_or_default();
            expertmesh_cluster::groups::check_report(&plan, &r.worker_id, &r.nccl_group, &r.nccl_unique_id)
                .map_err(|m| Status::invalid_argument(format!("report_ready: {m}")))?;
            let key = c.keys.nccl_id(r.epoch, &r.nccl_group);
            c.store.put(&key, r.nccl_unique_id.to_vec(), None).await.map_err(Status::from)?;
            let mut st = c.state.lock().await;
            c.apply(&mut st, &key, Some(&r.nccl_unique_id));
        }
        let key = c.keys.ready(r.epoch, &r.worker_id);
        c.store.put(&key, r.error.clone().into_bytes(), None).await.map_err(Status::from)?;
        if !r.error.is_empty() {
            warn!(worker = %r.worker_id, epoch = r.epoch, error = %r.error, "worker cannot load its experts; placement cannot commit");
        }
        let mut st = c.state.lock().await;
        c.apply(&mut st, &key, Some(r.error.as_bytes()));
        Ok(Response::new(ReportReadyResponse {}))
    }

    async fn report_load(&self, req: Request<LoadReport>) -> Result<Response<ReportLoadResponse>, Status> {
        // Statistics only: kept in this coordinator's memory, not written to the store.
        authorize(&req, "ReportLoad", Need::Worker(&req.get_ref().worker_id))?;
        let r = req.into_inner();
        let c = &self.core;
        expertmesh_cluster::validate::check_load_report(&c.spec, &r)
            .map_err(|e| Status::invalid_argument(format!("report_load: {e}")))?;
        let bytes = r.encode_to_vec();
        {
            let mut st = c.state.lock().await;
            c.apply(&mut st, &c.keys.load(&r.worker_id), Some(&bytes));
        }
        // A standby passes the numbers on to the leader through the store, under the worker's
        // lease, now and then (the leader balances placement by them).
        if !c.is_leader() {
            let due = c.forwarded.lock().is_ok_and(|mut f| {
                let due = f.get(&r.worker_id).is_none_or(|t| t.elapsed() >= LOAD_FORWARD);
                if due {
                    f.insert(r.worker_id.clone(), Instant::now());
                }
                due
            });
            if due {
                if let Ok(Some(kv)) = c.store.get(&c.keys.worker(&r.worker_id)).await {
                    let lease = (kv.lease != 0).then_some(kv.lease);
                    if let Err(e) = c.store.put(&c.keys.load(&r.worker_id), bytes, lease).await {
                        debug!(worker = %r.worker_id, error = %e, "cannot pass a load report on to the leader");
                    }
                }
            }
        }
        Ok(Response::new(ReportLoadResponse {}))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        // A worker asks to drain itself (SIGTERM); anyone else's drain is an operator's.
        authorize(&req, "Drain", Need::WorkerOrAdmin(&req.get_ref().worker_id))?;
        let r = req.into_inner();
        id_arg("drain", "worker_id", &r.worker_id)?;
        let c = &self.core;
        let (known, others) = {
            let st = c.state.lock().await;
            let others = st.eligible().iter().filter(|m| m.info.worker_id != r.worker_id).count();
            (st.members.keys().cloned().collect::<Vec<_>>(), others)
        };
        let wkey = c.keys.worker(&r.worker_id);
        let lease = match c.store.get(&wkey).await.map_err(Status::from)? {
            Some(kv) => kv.lease,
            None => {
                return Err(Status::not_found(format!(
                    "drain: no worker `{}` in the cluster; members are: {}",
                    r.worker_id,
                    if known.is_empty() { "(none)".to_string() } else { known.join(", ") }
                )))
            }
        };
        // Bound to the worker's lease: the request vanishes with the worker.
        let key = c.keys.drain(&r.worker_id);
        c.store.put(&key, b"1".to_vec(), (lease != 0).then_some(lease)).await.map_err(Status::from)?;
        let mut st = c.state.lock().await;
        c.apply(&mut st, &key, Some(b"1"));
        if others == 0 {
            warn!(worker = %r.worker_id, "drain requested, but no other worker can take its experts");
        }
        Ok(Response::new(DrainResponse { will_move: others > 0 }))
    }

    async fn report_unreachable(
        &self,
        req: Request<ReportUnreachableRequest>,
    ) -> Result<Response<ReportUnreachableResponse>, Status> {
        // Any dispatcher may report (a worker's, or an engine's with a `client` certificate): the
        // leader acts only on its own health check of the worker, never on the report alone.
        authorize(&req, "ReportUnreachable", Need::Cluster)?;
        let r = req.into_inner();
        id_arg("report_unreachable", "worker_id", &r.worker_id)?;
        id_arg("report_unreachable", "reporter", &r.reporter)?;
        let c = &self.core;
        let key = c.keys.suspect(&r.worker_id);
        if c.state.lock().await.members.contains_key(&r.worker_id) {
            c.store.put(&key, r.reporter.clone().into_bytes(), None).await.map_err(Status::from)?;
            let mut st = c.state.lock().await;
            c.apply(&mut st, &key, Some(r.reporter.as_bytes()));
        }
        Ok(Response::new(ReportUnreachableResponse {}))
    }

    async fn cluster_status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        authorize(&req, "ClusterStatus", Need::Cluster)?;
        let c = &self.core;
        let st = c.state.lock().await;
        let layers = c.spec.moe_layers();
        let (window, window_total, window_s) =
            st.window.as_ref().map(|w| w.loads(Instant::now())).unwrap_or((Vec::new(), 0.0, 0.0));
        let imbalance = c.imbalance_under(&st, &window, window_total);
        let window_loads: Vec<ExpertLoad> = window
            .iter()
            .zip(&layers)
            .flat_map(|(w, &l)| {
                w.iter().enumerate().filter(|(_, t)| **t > 0.0).map(move |(e, &t)| ExpertLoad {
                    layer: l as u32,
                    expert: e as u32,
                    tokens: t as u64,
                })
            })
            .collect();
        let held = |id: &str| -> u32 {
            let Some(p) = &st.current else { return 0 };
            let Some(idx) = p.workers.iter().position(|w| w.worker_id == id) else { return 0 };
            p.layers.iter().flat_map(|l| &l.experts).filter(|r| r.workers.contains(&(idx as u32))).count() as u32
        };
        Ok(Response::new(ClusterStatusResponse {
            current_epoch: State::epoch_of(&st.current),
            pending_epoch: State::epoch_of(&st.pending),
            workers: st
                .members
                .iter()
                .map(|(id, m)| WorkerStatus {
                    // Under the id it holds in the store (a record may name another).
                    info: Some(WorkerInfo { worker_id: id.clone(), ..m.info.clone() }),
                    experts_held: if m.info.worker_id == *id { held(id) } else { 0 },
                    // Reports are a peer's numbers: sums saturate instead of wrapping.
                    tokens_total: m.load.values().fold(0u64, |a, &t| a.saturating_add(t)),
                    ready_epoch: m.ready_epoch,
                    heartbeat_age_s: m.last_seen.elapsed().as_secs_f64(),
                    error: m.error.clone(),
                    draining: st.draining.contains(&m.info.worker_id),
                    verified: m.verified,
                    left_out: m.left_out().unwrap_or_default(),
                    resident_bytes: m.resident_bytes,
                    rss_bytes: m.rss_bytes,
                    load_done_bytes: m.loading.0,
                    load_total_bytes: m.loading.1,
                    load_bytes_per_s: m.loading.2,
                    expert_loads: {
                        let mut v: Vec<ExpertLoad> = m
                            .load
                            .iter()
                            .map(|(&(layer, expert), &tokens)| ExpertLoad { layer, expert, tokens })
                            .collect();
                        v.sort_by_key(|e| (e.layer, e.expert));
                        v
                    },
                })
                .collect(),
            model_type: c.spec.model_type.clone(),
            moe_layers: c.spec.moe_layers().len() as u32,
            routed_experts: c.spec.n_routed as u32,
            leader: st.leader.clone(),
            is_leader: c.is_leader(),
            coordinator: c.cfg.advertise.clone(),
            model_config_json: c.cfg.model_config_json.clone(),
            expert_loads: {
                let mut sum: BTreeMap<(u32, u32), u64> = BTreeMap::new();
                for m in st.members.values() {
                    for (k, t) in &m.load {
                        let e = sum.entry(*k).or_default();
                        *e = e.saturating_add(*t);
                    }
                }
                sum.into_iter().map(|((layer, expert), tokens)| ExpertLoad { layer, expert, tokens }).collect()
            },
            mutual_tls: c.cfg.tls.is_some(),
            window_loads,
            window_s,
            imbalance,
            rebalances: st.rebalances,
            placement_policy: st.policy.clone(),
            placement_blocked: st.blocked.clone(),
            expect_workers: c.cfg.expect_workers as u32,
            pending_waits_for: match &st.pending {
                None => Vec::new(),
                Some(p) => p
                    .workers
                    .iter()
                    .filter_map(|w| {
                        let m = st.members.get(&w.worker_id);
                        if m.is_some_and(|m| m.ready_epoch >= p.epoch) {
                            return None;
                        }
                        Some(match m {
                            None => format!("{}: gone (the leader re-plans)", w.worker_id),
                            Some(m) if !m.error.is_empty() => format!("{}: cannot load: {}", w.worker_id, m.error),
                            Some(m) if m.loading.1 > 0 => format!(
                                "{}: loading its experts, {}",
                                w.worker_id,
                                expertmesh_core::metrics::progress_text(m.loading.0, m.loading.1, m.loading.2)
                            ),
                            Some(_) => format!("{}: not ready yet", w.worker_id),
                        })
                    })
                    .collect(),
            },
            refused_calls: {
                let (a, b) = expertmesh_trust::authz::refusals();
                a + b
            },
        }))
    }
}

/// Serve the coordinator on `listener` until `shutdown` fires. `on_ready` runs once the store is
/// open, the model checked against it, and the state read back.
pub async fn serve(
    mut cfg: CoordinatorConfig,
    store_url: &str,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    if cfg.advertise.is_empty() {
        cfg.advertise = addr.to_string();
    }
    let store = open_store(store_url, cfg.store_tls.as_ref()).await?;
    let tls = cfg.tls.clone();
    if tls.is_none() && !expertmesh_trust::is_loopback(&addr) {
        warn!(%addr, "serving WITHOUT TLS on a non-loopback address: anyone who can reach this port can register workers, read the cluster's state and drain workers; give --tls-cert, --tls-key and --tls-ca");
    }
    let core = CoordinatorCore::new(cfg, store)?;
    core.check_model().await?;
    core.resync().await?;
    let stop_tasks = CancellationToken::new();
    let mirror = tokio::spawn(core.clone().mirror(stop_tasks.clone()));
    let leader = tokio::spawn(core.clone().lead(stop_tasks.clone()));
    let ticker = {
        let core = core.clone();
        let stop = stop_tasks.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(50));
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = iv.tick() => match core.tick().await {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            warn!(error = %e, "coordinator tick failed; retrying");
                            failing = true;
                        }
                        Err(_) => {}
                    },
                }
            }
        })
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // `""` and `expertmesh.v1.Coordinator`: SERVING while the store answers (checked every
    // 500 ms); `expertmesh.v1.Coordinator.leader`: SERVING on the leader only.
    let health_task = tokio::spawn(core.clone().report_health(health_reporter.clone(), stop_tasks.clone()));
    if let Some(at) = core.cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|e| CoordinatorError::InvalidInput(format!("--metrics-listen {at}: cannot bind: {e}")))?;
        let c = core.clone();
        let render: expertmesh_cluster::metrics_http::Render = Arc::new(move || c.render_metrics());
        let health = expertmesh_cluster::metrics_http::health_of(health_reporter.clone());
        tokio::spawn(expertmesh_cluster::metrics_http::serve_metrics(l, render, health, stop_tasks.clone()));
    }
    core.clone().apply_health(&health_reporter, true, core.is_leader()).await;
    health_reporter.set_service_status(expertmesh_proto::LIVE_SERVICE, tonic_health::ServingStatus::Serving).await;
    let reflection = expertmesh_proto::reflection_service().map_err(CoordinatorError::InvalidInput)?;
    info!(%addr, "coordinator serving");
    on_ready(addr);
    // Control messages are small: a 16 MiB ceiling both ways (placements of the largest
    // models are a few MiB); bounded streams per connection; pings find dead peers.
    // At most MAX_CONNECTIONS open, MAX_CONNECTIONS_PER_IP from one address (TCP_NODELAY set).
    let conns = expertmesh_cluster::conns::Connections::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP);
    let incoming = expertmesh_trust::server::incoming(expertmesh_cluster::conns::incoming(listener, conns), tls);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(expertmesh_trust::server::RequireAuthLayer)
        .add_service(health)
        .add_service(reflection)
        .add_service(expertmesh_proto::reflection_service_v1alpha().map_err(CoordinatorError::InvalidInput)?)
        .add_service(
            CoordinatorServer::new(CoordinatorService { core })
                .max_decoding_message_size(MAX_CONTROL_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_CONTROL_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    stop_tasks.cancel();
    ticker.abort();
    mirror.abort();
    health_task.abort();
    // Let the leader task release its lease so a standby takes over at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), leader).await;
    Ok(())
}
