//! The control plane as workers and dispatchers see it, two ways: through a coordinator's gRPC
//! API, or straight to etcd (`--store etcd://...`), writing the same keys a coordinator would.
//! With the store, workers keep serving and following placement while every coordinator is down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use expertmesh_proto::v1::coordinator_client::CoordinatorClient;
use expertmesh_proto::v1::{
    DeregisterRequest, DrainRequest, HeartbeatRequest, LoadReport, PlacementEvent, PlacementPlan, RegisterRequest,
    ReportReadyRequest, ReportUnreachableRequest, WatchPlacementRequest, WorkerInfo,
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{debug, warn};

use crate::error::{ClusterError, Result};
use crate::keys::{parse_epoch, ClusterKeys, Key};
use crate::store::{open_store, MetadataStore};
use crate::watch::{watch_prefix, WatchEvent, WatchOptions};

/// Where a worker (or a dispatcher) finds the control plane.
#[derive(Debug, Clone)]
pub enum ControlTarget {
    /// Coordinators' gRPC addresses (comma-separated), reached over mutual TLS with `tls`.
    Coordinator { addrs: String, tls: Option<expertmesh_trust::Tls> },
    /// A metadata store URL (`etcd://HOST:PORT[,...]`, `etcds://` for TLS with `tls`), the
    /// cluster name, and the TTL of the worker's own lease.
    Store { url: String, cluster: String, lease_ttl: Duration, tls: Option<expertmesh_trust::Tls> },
}

impl ControlTarget {
    /// Coordinators at `addrs`, plaintext.
    pub fn coordinator(addrs: impl Into<String>) -> Self {
        Self::Coordinator { addrs: addrs.into(), tls: None }
    }

    /// "coordinator HOST:PORT" or "store etcd://...", for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Coordinator { addrs, .. } => format!("coordinator {addrs}"),
            Self::Store { url, .. } => format!("store {url}"),
        }
    }
}

/// What registering gave the worker.
#[derive(Debug, Clone)]
pub struct Registration {
    pub lease: u64,
    pub ttl: Duration,
    pub model_config_json: String,
    pub model_dir: String,
    /// The highest placement epoch when the worker registered: plans up to it that list the
    /// worker as draining are about an earlier process with its id.
    pub placement_epoch: u64,
}

/// Membership, readiness, drains and placement events, whichever way they travel.
#[async_trait]
pub trait ControlPlane: Send + Sync + std::fmt::Debug {
    /// Join under a new lease. `epoch`: the placement epoch the worker follows now.
    async fn register(&self, info: &WorkerInfo, epoch: u64) -> Result<Registration>;
    /// Renew the lease; false when it is gone (register again).
    async fn keep_alive(&self, worker: &str, lease: u64) -> Result<bool>;
    /// The worker loaded placement `epoch` (or could not: `error`). As rank 0 of an NCCL group
    /// of that placement it also reports the group's unique id (`nccl`: group name and id).
    async fn report_ready(
        &self,
        worker: &str,
        epoch: u64,
        error: String,
        nccl: Option<(String, Vec<u8>)>,
    ) -> Result<()>;
    async fn report_load(&self, report: LoadReport, lease: u64) -> Result<()>;
    /// Ask for the worker's experts to be moved away. Returns false when no other worker can
    /// take them.
    async fn request_drain(&self, worker: &str, lease: u64) -> Result<bool>;
    /// Leave now: revoke the lease (its keys go with it).
    async fn deregister(&self, worker: &str, lease: u64) -> Result<()>;
    /// `reporter` could not reach `worker`; the leader checks it and removes it if it is dead.
    async fn report_unreachable(&self, worker: &str, reporter: &str) -> Result<()>;
    /// Placement events: first the committed plan and any proposal in progress, then every
    /// change. The channel closes when the feed breaks; call again (duplicates are harmless).
    async fn watch_placement(&self) -> Result<mpsc::Receiver<PlacementEvent>>;
}

/// Connect to the control plane, retrying (backing off with jitter, 200 ms to 5 s) until
/// `deadline`; says so once, then every 30 s, while it cannot.
pub async fn connect_control(target: &ControlTarget, deadline: Duration) -> Result<Arc<dyn ControlPlane>> {
    let start = std::time::Instant::now();
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut log = crate::backoff::LogEvery::new(Duration::from_secs(30));
    loop {
        let attempt: Result<Arc<dyn ControlPlane>> = match target {
            ControlTarget::Coordinator { addrs, tls } => {
                first_coordinator(addrs, tls.as_ref()).await.map(|c| Arc::new(c) as _)
            }
            ControlTarget::Store { url, cluster, lease_ttl, tls } => open_store(url, tls.as_ref())
                .await
                .map(|store| Arc::new(StoreControl { store, keys: ClusterKeys::new(cluster), ttl: *lease_ttl }) as _)
                .map_err(|e| ClusterError::Unavailable(e.to_string())),
        };
        match attempt {
            Ok(c) => {
                if let Some(down) = log.recovered() {
                    tracing::info!(after = ?down, "control plane reached");
                }
                return Ok(c);
            }
            Err(e) if start.elapsed() < deadline => {
                if let Some(down) = log.failed() {
                    let left = deadline.saturating_sub(start.elapsed());
                    warn!(target = %target.describe(), error = %e, for_s = down.as_secs(), gives_up_in_s = left.as_secs(), "cannot reach the control plane; retrying");
                }
                tokio::time::sleep(backoff.delay()).await;
            }
            Err(e) => {
                return Err(ClusterError::Unavailable(format!("control plane unreachable after {deadline:?}: {e}")))
            }
        }
    }
}

/// A coordinator client, retrying the connection until `deadline`. `addrs` may name several
/// coordinators, comma-separated: the first that answers is used.
pub async fn connect_coordinator(
    addrs: &str,
    deadline: Duration,
    tls: Option<&expertmesh_trust::Tls>,
) -> Result<CoordinatorClient<Channel>> {
    let start = std::time::Instant::now();
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let last = match first_coordinator(addrs, tls).await {
            Ok(c) => return Ok(c.client),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= deadline {
            return Err(ClusterError::Unavailable(format!(
                "no coordinator of `{addrs}` reachable after {deadline:?}: {last}"
            )));
        }
        tokio::time::sleep(backoff.delay()).await;
    }
}

/// The first of the comma-separated coordinators `addrs` that answers.
async fn first_coordinator(addrs: &str, tls: Option<&expertmesh_trust::Tls>) -> Result<GrpcControl> {
    let mut last = ClusterError::InvalidInput(format!("`{addrs}` names no coordinator"));
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match GrpcControl::connect(addr, tls).await {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Through a coordinator.
#[derive(Debug, Clone)]
pub struct GrpcControl {
    client: CoordinatorClient<Channel>,
}

impl GrpcControl {
    /// Connect to the coordinator at `addr`; with `tls`, over mutual TLS, expecting the
    /// `coordinator` identity there.
    pub async fn connect(addr: &str, tls: Option<&expertmesh_trust::Tls>) -> Result<Self> {
        // Every call ends within 5 s (a partitioned coordinator must not hang a lease renewal
        // for TCP's retransmission time); pings find a dead connection. The placement watch is
        // a stream: the timeout covers only its opening.
        let ep = expertmesh_trust::client::endpoint(addr)
            .map_err(|e| ClusterError::InvalidInput(format!("coordinator {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let expect = expertmesh_trust::Expect::Identity(expertmesh_trust::Identity::Coordinator);
        let channel = expertmesh_trust::client::connect(ep, tls, expect).await.map_err(|e| {
            ClusterError::Unavailable(format!("coordinator {addr}: {}", expertmesh_proto::error_chain(&e)))
        })?;
        let client = CoordinatorClient::new(channel).max_decoding_message_size(256 << 20);
        Ok(Self { client })
    }
}

#[async_trait]
impl ControlPlane for GrpcControl {
    async fn register(&self, info: &WorkerInfo, epoch: u64) -> Result<Registration> {
        let r = self.client.clone().register(RegisterRequest { worker: Some(info.clone()), epoch }).await?.into_inner();
        Ok(Registration {
            lease: r.lease_id,
            ttl: Duration::from_millis(r.ttl_ms.max(300) as u64),
            model_config_json: r.model_config_json,
            model_dir: r.model_dir,
            placement_epoch: r.placement_epoch,
        })
    }

    async fn keep_alive(&self, worker: &str, lease: u64) -> Result<bool> {
        let r = self.client.clone().heartbeat(HeartbeatRequest { worker_id: worker.into(), lease_id: lease }).await?;
        Ok(r.into_inner().known)
    }

    async fn report_ready(
        &self,
        worker: &str,
        epoch: u64,
        error: String,
        nccl: Option<(String, Vec<u8>)>,
    ) -> Result<()> {
        let (nccl_group, nccl_unique_id) = nccl.unwrap_or_default();
        let req = ReportReadyRequest {
            worker_id: worker.into(),
            epoch,
            error,
            nccl_group,
            nccl_unique_id: nccl_unique_id.into(),
        };
        self.client.clone().report_ready(req).await?;
        Ok(())
    }

    async fn report_load(&self, report: LoadReport, _lease: u64) -> Result<()> {
        self.client.clone().report_load(report).await?;
        Ok(())
    }

    async fn request_drain(&self, worker: &str, _lease: u64) -> Result<bool> {
        let r = self.client.clone().drain(DrainRequest { worker_id: worker.into() }).await?;
        Ok(r.into_inner().will_move)
    }

    async fn deregister(&self, worker: &str, lease: u64) -> Result<()> {
        self.client.clone().deregister(DeregisterRequest { worker_id: worker.into(), lease_id: lease }).await?;
        Ok(())
    }

    async fn report_unreachable(&self, worker: &str, reporter: &str) -> Result<()> {
        let req = ReportUnreachableRequest { worker_id: worker.into(), reporter: reporter.into() };
        self.client.clone().report_unreachable(req).await?;
        Ok(())
    }

    async fn watch_placement(&self) -> Result<mpsc::Receiver<PlacementEvent>> {
        let mut s = self.client.clone().watch_placement(WatchPlacementRequest {}).await?.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                match s.message().await {
                    Ok(Some(ev)) => {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "placement watch ended");
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Straight to the metadata store.
#[derive(Debug)]
pub struct StoreControl {
    store: Arc<dyn MetadataStore>,
    keys: ClusterKeys,
    ttl: Duration,
}

fn store_err(e: ClusterError) -> ClusterError {
    match e {
        ClusterError::Store(_) => ClusterError::Unavailable(e.to_string()),
        e => e,
    }
}

impl StoreControl {
    async fn get_plan(&self, epoch: u64) -> Result<Option<PlacementPlan>> {
        match self.store.get(&self.keys.plan(epoch)).await.map_err(store_err)? {
            Some(kv) => Ok(PlacementPlan::decode(kv.value.as_slice()).ok()),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl ControlPlane for StoreControl {
    async fn register(&self, info: &WorkerInfo, _epoch: u64) -> Result<Registration> {
        let config = self.store.get(&self.keys.model_config()).await.map_err(store_err)?.ok_or_else(|| {
            ClusterError::Unavailable(
                "no coordinator has published this cluster's model to the store yet (start a coordinator with the same --store and --cluster)".into(),
            )
        })?;
        let dir = self.store.get(&self.keys.model_dir()).await.map_err(store_err)?;
        let key = self.keys.worker(&info.worker_id);
        if let Some(old) = self.store.get(&key).await.map_err(store_err)? {
            if old.lease != 0 {
                self.store.revoke(old.lease).await.map_err(store_err)?;
            }
        }
        let lease = self.store.grant_lease(self.ttl).await.map_err(store_err)?;
        self.store.put(&key, info.encode_to_vec(), Some(lease)).await.map_err(store_err)?;
        let mut placement_epoch = 0;
        for k in [self.keys.current(), self.keys.pending()] {
            if let Some(kv) = self.store.get(&k).await.map_err(store_err)? {
                let e = String::from_utf8_lossy(&kv.value).trim().parse::<u64>().unwrap_or(0);
                placement_epoch = placement_epoch.max(e);
            }
        }
        Ok(Registration {
            lease: lease as u64,
            ttl: self.ttl,
            model_config_json: String::from_utf8_lossy(&config.value).into_owned(),
            model_dir: dir.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()).unwrap_or_default(),
            placement_epoch,
        })
    }

    async fn keep_alive(&self, _worker: &str, lease: u64) -> Result<bool> {
        self.store.keep_alive(lease as i64).await.map_err(store_err)
    }

    async fn report_ready(
        &self,
        worker: &str,
        epoch: u64,
        error: String,
        nccl: Option<(String, Vec<u8>)>,
    ) -> Result<()> {
        // The id first: whoever sees the worker ready finds its group's id already stored.
        if let Some((group, id)) = nccl {
            if id.len() != crate::groups::NCCL_ID_BYTES {
                return Err(ClusterError::InvalidInput(format!("an NCCL unique id of {} bytes", id.len())));
            }
            self.store.put(&self.keys.nccl_id(epoch, &group), id, None).await.map_err(store_err)?;
        }
        self.store.put(&self.keys.ready(epoch, worker), error.into_bytes(), None).await.map_err(store_err)?;
        Ok(())
    }

    async fn report_load(&self, report: LoadReport, lease: u64) -> Result<()> {
        let key = self.keys.load(&report.worker_id);
        self.store.put(&key, report.encode_to_vec(), Some(lease as i64)).await.map_err(store_err)?;
        Ok(())
    }

    async fn request_drain(&self, worker: &str, lease: u64) -> Result<bool> {
        self.store.put(&self.keys.drain(worker), b"1".to_vec(), Some(lease as i64)).await.map_err(store_err)?;
        let (members, _) = self.store.list(&self.keys.workers()).await.map_err(store_err)?;
        let (drains, _) = self.store.list(&self.keys.drains()).await.map_err(store_err)?;
        let draining: Vec<Key> = drains.iter().filter_map(|kv| self.keys.parse(&kv.key)).collect();
        let others = members
            .iter()
            .filter_map(|kv| match self.keys.parse(&kv.key) {
                Some(Key::Worker(id)) if id != worker && !draining.contains(&Key::Drain(id.clone())) => Some(id),
                _ => None,
            })
            .count();
        Ok(others > 0)
    }

    async fn deregister(&self, _worker: &str, lease: u64) -> Result<()> {
        self.store.revoke(lease as i64).await.map_err(store_err)
    }

    async fn report_unreachable(&self, worker: &str, reporter: &str) -> Result<()> {
        self.store.put(&self.keys.suspect(worker), reporter.as_bytes().to_vec(), None).await.map_err(store_err)?;
        Ok(())
    }

    async fn watch_placement(&self) -> Result<mpsc::Receiver<PlacementEvent>> {
        // Listing again every few seconds catches a store watch that stalls without closing.
        let opts = WatchOptions { resync_every: Some(Duration::from_secs(5)), ..Default::default() };
        let (kvs, mut watch) =
            watch_prefix(self.store.clone(), &self.keys.placement(), opts).await.map_err(store_err)?;
        let mut plans: BTreeMap<u64, PlacementPlan> = BTreeMap::new();
        let mut ids: BTreeMap<(u64, String), Vec<u8>> = BTreeMap::new();
        let (mut cur, mut pend) = (0u64, 0u64);
        for kv in &kvs {
            match self.keys.parse(&kv.key) {
                Some(Key::Plan(e)) => {
                    if let Ok(p) = PlacementPlan::decode(kv.value.as_slice()) {
                        plans.insert(e, p);
                    }
                }
                Some(Key::NcclId(e, g)) => {
                    ids.insert((e, g), kv.value.clone());
                }
                Some(Key::Current) => cur = parse_epoch(&kv.value),
                Some(Key::Pending) => pend = parse_epoch(&kv.value),
                _ => {}
            }
        }
        let (tx, rx) = mpsc::channel(16);
        let mut initial = Vec::new();
        if let Some(p) = plans.get(&cur) {
            let mut p = p.clone();
            crate::groups::fill_ids(&mut p, &ids);
            initial.push(PlacementEvent { plan: Some(p), committed: true });
        }
        if pend > cur {
            if let Some(p) = plans.get(&pend) {
                initial.push(PlacementEvent { plan: Some(p.clone()), committed: false });
            }
        }
        let me = StoreControl { store: self.store.clone(), keys: self.keys.clone(), ttl: self.ttl };
        tokio::spawn(async move {
            for ev in initial {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    ev = watch.recv() => {
                        // An outage closes the feed: the caller says so and calls again.
                        let Some(WatchEvent::Change(ev)) = ev else {
                            if let Some(WatchEvent::Lost(e)) = &ev {
                                debug!(error = %e, "placement watch lost the store");
                            }
                            if matches!(ev, Some(WatchEvent::Restored)) {
                                continue;
                            }
                            return;
                        };
                        let Some(value) = ev.value else { continue };
                        let (epoch, committed) = match me.keys.parse(&ev.key) {
                            Some(Key::Plan(e)) => {
                                if let Ok(p) = PlacementPlan::decode(value.as_slice()) {
                                    plans.insert(e, p);
                                }
                                continue;
                            }
                            Some(Key::NcclId(e, g)) => {
                                ids.insert((e, g), value);
                                continue;
                            }
                            Some(Key::Current) => (parse_epoch(&value), true),
                            Some(Key::Pending) => (parse_epoch(&value), false),
                            _ => continue,
                        };
                        let mut plan = match plans.get(&epoch) {
                            Some(p) => p.clone(),
                            None => match me.get_plan(epoch).await {
                                Ok(Some(p)) => p,
                                _ => return,
                            },
                        };
                        if committed {
                            crate::groups::fill_ids(&mut plan, &ids);
                            plans.retain(|e, _| *e >= epoch);
                            ids.retain(|(e, _), _| *e >= epoch);
                        }
                        if tx.send(PlacementEvent { plan: Some(plan), committed }).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}
