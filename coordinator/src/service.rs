//! The Coordinator gRPC service and its planning loop.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use expertmesh_core::placement::{CapacitySpread, PlacementPolicy, PlacementRequest, WorkerCapacity};
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use expertmesh_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, DeregisterRequest, DeregisterResponse, GetPlacementRequest,
    HeartbeatRequest, HeartbeatResponse, LayerPlacement, LoadReport, PlacementEvent, PlacementPlan, RegisterRequest,
    RegisterResponse, Replicas, ReportLoadResponse, ReportReadyRequest, ReportReadyResponse, WatchPlacementRequest,
    WorkerInfo, WorkerStatus,
};
use prost::Message;
use tokio::sync::{broadcast, Mutex};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::error::{CoordinatorError, Result};
use crate::store::{open_store, LeaseId, MetadataStore};

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub cluster: String,
    /// The model the cluster serves.
    pub model_dir: String,
    pub model_config_json: String,
    /// Lease TTL: a worker that does not heartbeat within it is removed.
    pub lease_ttl: Duration,
    /// Do not place until this many workers have registered.
    pub expect_workers: usize,
    /// Copies of every expert.
    pub replicas: usize,
    /// Bytes one expert occupies on a worker (f32 weights on the CPU backend).
    pub expert_bytes: u64,
}

#[derive(Debug)]
struct Member {
    info: WorkerInfo,
    lease_id: LeaseId,
    last_heartbeat: Instant,
    ready_epoch: u64,
    load: HashMap<(u32, u32), u64>,
    error: String,
}

#[derive(Debug, Default)]
struct State {
    members: BTreeMap<String, Member>,
    /// Highest epoch ever proposed (read back from the store on start).
    epoch: u64,
    current: Option<PlacementPlan>,
    pending: Option<PlacementPlan>,
    /// Membership changed at this instant; re-plan once it settles.
    dirty_since: Option<Instant>,
}

/// The coordinator: state, store, and the event stream watchers follow.
#[derive(Debug)]
pub struct CoordinatorCore {
    cfg: CoordinatorConfig,
    spec: ModelSpec,
    state: Mutex<State>,
    store: Arc<dyn MetadataStore>,
    events: broadcast::Sender<PlacementEvent>,
    policy: Box<dyn PlacementPolicy>,
}

impl CoordinatorCore {
    pub fn new(cfg: CoordinatorConfig, store: Arc<dyn MetadataStore>) -> Result<Arc<Self>> {
        let spec = ModelSpec::from_config_json(&cfg.model_config_json)?;
        Ok(Arc::new(Self {
            cfg,
            spec,
            state: Mutex::new(State::default()),
            store,
            events: broadcast::channel(64).0,
            policy: Box::new(CapacitySpread),
        }))
    }

    fn key(&self, rest: &str) -> String {
        format!("/expertmesh/{}/{rest}", self.cfg.cluster)
    }

    fn plan_key(&self, epoch: u64) -> String {
        self.key(&format!("placement/{epoch:020}"))
    }

    fn ready_key(&self, epoch: u64, worker: &str) -> String {
        self.key(&format!("ready/{epoch:020}/{worker}"))
    }

    async fn read_plan(&self, epoch: u64) -> Result<Option<PlacementPlan>> {
        match self.store.get(&self.plan_key(epoch)).await? {
            Some(kv) => PlacementPlan::decode(kv.value.as_slice())
                .map(Some)
                .map_err(|e| CoordinatorError::Store(format!("placement {epoch} in the store does not decode: {e}"))),
            None => Ok(None),
        }
    }

    async fn read_epoch(&self, name: &str) -> Result<u64> {
        Ok(match self.store.get(&self.key(&format!("placement/{name}"))).await? {
            Some(kv) => String::from_utf8_lossy(&kv.value).trim().parse().unwrap_or(0),
            None => 0,
        })
    }

    /// Rebuild the working state from the store: members (with their leases), the committed
    /// plan, a proposal in progress and its ready markers. A coordinator restarted against the
    /// same store resumes where the last one stopped, without re-planning.
    pub async fn resume(&self) -> Result<()> {
        let mut st = self.state.lock().await;
        let (workers, _) = self.store.list(&self.key("workers/")).await?;
        for kv in workers {
            let Ok(info) = WorkerInfo::decode(kv.value.as_slice()) else { continue };
            let m = Member {
                info,
                lease_id: kv.lease,
                // A full TTL for its next heartbeat to reach this coordinator.
                last_heartbeat: Instant::now(),
                ready_epoch: 0,
                load: HashMap::new(),
                error: String::new(),
            };
            st.members.insert(m.info.worker_id.clone(), m);
        }
        let (plans, _) = self.store.list(&self.key("placement/0")).await?;
        st.epoch = plans
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next().and_then(|e| e.parse::<u64>().ok()))
            .max()
            .unwrap_or(0);
        let current = self.read_epoch("current").await?;
        if current > 0 {
            st.current = self.read_plan(current).await?;
            let ids: Vec<String> =
                st.current.iter().flat_map(|p| p.workers.iter().map(|w| w.worker_id.clone())).collect();
            for id in ids {
                if let Some(m) = st.members.get_mut(&id) {
                    m.ready_epoch = current;
                }
            }
        }
        let pending = self.read_epoch("pending").await?;
        if pending > current {
            st.pending = self.read_plan(pending).await?;
            let (ready, _) = self.store.list(&self.key(&format!("ready/{pending:020}/"))).await?;
            for kv in ready {
                let worker = kv.key.rsplit('/').next().unwrap_or_default().to_string();
                if let Some(m) = st.members.get_mut(&worker) {
                    if kv.value.is_empty() {
                        m.ready_epoch = m.ready_epoch.max(pending);
                    } else {
                        m.error = String::from_utf8_lossy(&kv.value).into_owned();
                    }
                }
            }
        }
        let planned: Vec<&str> =
            st.current.iter().flat_map(|p| p.workers.iter().map(|w| w.worker_id.as_str())).collect();
        let members: Vec<&str> = st.members.keys().map(String::as_str).collect();
        if planned != members {
            st.dirty_since = Some(Instant::now());
        }
        info!(
            workers = st.members.len(),
            current_epoch = current,
            pending_epoch = st.pending.as_ref().map(|p| p.epoch).unwrap_or(0),
            "coordinator state read from the store"
        );
        Ok(())
    }

    /// Expire leases, re-plan after membership settles, commit a plan once all its workers are
    /// ready. Runs every `tick`.
    async fn tick(&self) -> Result<()> {
        let mut st = self.state.lock().await;
        let ttl = self.cfg.lease_ttl;
        let expired: Vec<String> =
            st.members.iter().filter(|(_, m)| m.last_heartbeat.elapsed() > ttl).map(|(k, _)| k.clone()).collect();
        for id in expired {
            let Some(lease) = st.members.get(&id).map(|m| m.lease_id) else { continue };
            // The store expires the key with the lease; revoking makes it immediate. If the store
            // is unreachable the member stays until it can be revoked (membership changes wait).
            self.store.revoke(lease).await?;
            warn!(worker = %id, "lease expired; removed worker");
            st.members.remove(&id);
            st.dirty_since = Some(Instant::now());
        }
        if let Some(t) = st.dirty_since {
            // `expect_workers` gates only the first placement; after that, every change re-plans
            // on whoever is left.
            let enough = if st.current.is_none() && st.pending.is_none() {
                st.members.len() >= self.cfg.expect_workers.max(1)
            } else {
                !st.members.is_empty()
            };
            if t.elapsed() >= Duration::from_millis(150) && enough {
                st.dirty_since = None;
                self.propose(&mut st).await?;
            }
        }
        if let Some(p) = &st.pending {
            let all_ready =
                p.workers.iter().all(|w| st.members.get(&w.worker_id).is_some_and(|m| m.ready_epoch >= p.epoch));
            if all_ready {
                let p = st.pending.take().unwrap_or_default();
                info!(epoch = p.epoch, workers = p.workers.len(), "placement committed");
                self.store.put(&self.key("placement/current"), p.epoch.to_string().into_bytes(), None).await?;
                self.store.delete(&self.key("placement/pending")).await?;
                st.current = Some(p.clone());
                let _ = self.events.send(PlacementEvent { plan: Some(p), committed: true });
            }
        }
        Ok(())
    }

    async fn propose(&self, st: &mut State) -> Result<()> {
        let workers: Vec<&Member> = st.members.values().collect();
        let caps: Vec<WorkerCapacity> = workers
            .iter()
            .map(|m| WorkerCapacity {
                id: m.info.worker_id.clone(),
                node: m.info.node.clone(),
                memory_bytes: m.info.devices.iter().map(|d| d.memory_bytes).sum(),
                tflops: m.info.devices.iter().map(|d| d.tflops).sum(),
            })
            .collect();
        let req = PlacementRequest {
            layers: self.spec.moe_layers(),
            experts: self.spec.n_routed,
            expert_bytes: self.cfg.expert_bytes,
            replicas: self.cfg.replicas,
        };
        let plan = match self.policy.place(&req, &caps) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot place experts on the current workers; waiting for membership to change");
                return Ok(());
            }
        };
        st.epoch += 1;
        let msg = PlacementPlan {
            epoch: st.epoch,
            workers: workers.iter().map(|m| m.info.clone()).collect(),
            layers: plan
                .layers
                .iter()
                .map(|(l, experts)| LayerPlacement {
                    layer: *l as u32,
                    experts: experts.iter().map(|r| Replicas { workers: r.clone() }).collect(),
                })
                .collect(),
        };
        info!(epoch = msg.epoch, workers = msg.workers.len(), policy = self.policy.name(), "placement proposed");
        if self.store.put_if(&self.plan_key(msg.epoch), msg.encode_to_vec(), 0, None).await?.is_none() {
            return Err(CoordinatorError::Store(format!(
                "placement epoch {} already exists in the store: another coordinator is writing to this cluster",
                msg.epoch
            )));
        }
        self.store.put(&self.key("placement/pending"), msg.epoch.to_string().into_bytes(), None).await?;
        st.pending = Some(msg.clone());
        let _ = self.events.send(PlacementEvent { plan: Some(msg), committed: false });
        Ok(())
    }
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
        let req = req.into_inner();
        let seen_epoch = req.epoch;
        let info = req.worker.ok_or_else(|| Status::invalid_argument("register: missing `worker`"))?;
        if info.worker_id.is_empty() || info.address.is_empty() {
            return Err(Status::invalid_argument("register: worker_id and address are required"));
        }
        let c = &self.core;
        let mut st = c.state.lock().await;
        if let Some(old) = st.members.remove(&info.worker_id) {
            // Registering again (lease lost, or restarted): the old lease goes with its key.
            c.store.revoke(old.lease_id).await.map_err(Status::from)?;
        }
        st.epoch = st.epoch.max(seen_epoch);
        let lease_id = c.store.grant_lease(c.cfg.lease_ttl).await.map_err(Status::from)?;
        info!(worker = %info.worker_id, address = %info.address, lease = lease_id, "worker registered");
        c.store
            .put(&c.key(&format!("workers/{}", info.worker_id)), info.encode_to_vec(), Some(lease_id))
            .await
            .map_err(Status::from)?;
        st.members.insert(
            info.worker_id.clone(),
            Member {
                info,
                lease_id,
                last_heartbeat: Instant::now(),
                ready_epoch: 0,
                load: HashMap::new(),
                error: String::new(),
            },
        );
        st.dirty_since = Some(Instant::now());
        Ok(Response::new(RegisterResponse {
            lease_id: lease_id as u64,
            ttl_ms: c.cfg.lease_ttl.as_millis() as u32,
            model_config_json: c.cfg.model_config_json.clone(),
            model_dir: c.cfg.model_dir.clone(),
        }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let c = &self.core;
        let mut st = c.state.lock().await;
        let current_epoch = st.current.as_ref().map(|p| p.epoch).unwrap_or(0);
        let lease = r.lease_id as LeaseId;
        let ours = st.members.get(&r.worker_id).is_some_and(|m| m.lease_id == lease);
        let known = if ours {
            match c.store.keep_alive(lease).await {
                Ok(alive) => alive,
                Err(e) => {
                    // The worker reached us, so it is alive; the store cannot confirm the lease
                    // right now. Keep the member (membership changes wait for the store) and let
                    // the next heartbeat renew the lease once the store is back.
                    warn!(worker = %r.worker_id, error = %e, "store unreachable; keeping the worker until it can be checked");
                    true
                }
            }
        } else {
            false
        };
        if known {
            if let Some(m) = st.members.get_mut(&r.worker_id) {
                m.last_heartbeat = Instant::now();
            }
        } else if ours {
            warn!(worker = %r.worker_id, "lease expired in the store; the worker must register again");
            st.members.remove(&r.worker_id);
            st.dirty_since = Some(Instant::now());
        }
        Ok(Response::new(HeartbeatResponse { known, current_epoch }))
    }

    async fn deregister(&self, req: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        let r = req.into_inner();
        let c = &self.core;
        let mut st = c.state.lock().await;
        if st.members.get(&r.worker_id).is_some_and(|m| m.lease_id == r.lease_id as LeaseId) {
            st.members.remove(&r.worker_id);
            st.dirty_since = Some(Instant::now());
            c.store.revoke(r.lease_id as LeaseId).await.map_err(Status::from)?;
            info!(worker = %r.worker_id, "worker deregistered");
        }
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn get_placement(&self, _: Request<GetPlacementRequest>) -> Result<Response<PlacementPlan>, Status> {
        let st = self.core.state.lock().await;
        st.current.clone().map(Response::new).ok_or_else(|| Status::unavailable("no placement committed yet"))
    }

    type WatchPlacementStream = EventStream;

    async fn watch_placement(
        &self,
        _: Request<WatchPlacementRequest>,
    ) -> Result<Response<Self::WatchPlacementStream>, Status> {
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
        let r = req.into_inner();
        let c = &self.core;
        let mut st = c.state.lock().await;
        let m = st
            .members
            .get_mut(&r.worker_id)
            .ok_or_else(|| Status::not_found(format!("worker {} is not registered", r.worker_id)))?;
        c.store
            .put(&c.ready_key(r.epoch, &r.worker_id), r.error.clone().into_bytes(), None)
            .await
            .map_err(Status::from)?;
        if !r.error.is_empty() {
            warn!(worker = %r.worker_id, epoch = r.epoch, error = %r.error, "worker cannot load its experts; placement cannot commit");
            m.error = r.error;
            return Ok(Response::new(ReportReadyResponse {}));
        }
        m.error.clear();
        m.ready_epoch = m.ready_epoch.max(r.epoch);
        Ok(Response::new(ReportReadyResponse {}))
    }

    async fn report_load(&self, req: Request<LoadReport>) -> Result<Response<ReportLoadResponse>, Status> {
        let r = req.into_inner();
        let mut st = self.core.state.lock().await;
        if let Some(m) = st.members.get_mut(&r.worker_id) {
            for e in r.experts {
                m.load.insert((e.layer, e.expert), e.tokens);
            }
        }
        Ok(Response::new(ReportLoadResponse {}))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let c = &self.core;
        let st = c.state.lock().await;
        let held = |id: &str| -> u32 {
            let Some(p) = &st.current else { return 0 };
            let Some(idx) = p.workers.iter().position(|w| w.worker_id == id) else { return 0 };
            p.layers.iter().flat_map(|l| &l.experts).filter(|r| r.workers.contains(&(idx as u32))).count() as u32
        };
        Ok(Response::new(ClusterStatusResponse {
            current_epoch: st.current.as_ref().map(|p| p.epoch).unwrap_or(0),
            pending_epoch: st.pending.as_ref().map(|p| p.epoch).unwrap_or(0),
            workers: st
                .members
                .values()
                .map(|m| WorkerStatus {
                    info: Some(m.info.clone()),
                    experts_held: held(&m.info.worker_id),
                    tokens_total: m.load.values().sum(),
                    ready_epoch: m.ready_epoch,
                    heartbeat_age_s: m.last_heartbeat.elapsed().as_secs_f64(),
                    error: m.error.clone(),
                })
                .collect(),
            model_type: c.spec.model_type.clone(),
            moe_layers: c.spec.moe_layers().len() as u32,
            routed_experts: c.spec.n_routed as u32,
        }))
    }
}

/// Serve the coordinator on `listener` until `shutdown` fires.
pub async fn serve(
    cfg: CoordinatorConfig,
    store_url: &str,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = open_store(store_url).await?;
    let core = CoordinatorCore::new(cfg, store)?;
    core.resume().await?;
    let addr: SocketAddr = listener.local_addr()?;
    let ticker = {
        let core = core.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = iv.tick() => {
                        if let Err(e) = core.tick().await {
                            warn!(error = %e, "coordinator tick failed");
                        }
                    }
                }
            }
        })
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = expertmesh_proto::reflection_service().map_err(CoordinatorError::InvalidInput)?;
    info!(%addr, "coordinator serving");
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(CoordinatorService { core }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown.cancelled())
        .await?;
    ticker.abort();
    Ok(())
}
