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
use crate::store::{EmbeddedStore, MetadataStore};

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
    lease_id: u64,
    last_heartbeat: Instant,
    ready_epoch: u64,
    load: HashMap<(u32, u32), u64>,
    error: String,
}

#[derive(Debug, Default)]
struct State {
    members: BTreeMap<String, Member>,
    next_lease: u64,
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
            state: Mutex::new(State { next_lease: 1, ..Default::default() }),
            store,
            events: broadcast::channel(64).0,
            policy: Box::new(CapacitySpread),
        }))
    }

    fn key(&self, rest: &str) -> String {
        format!("/expertmesh/{}/{rest}", self.cfg.cluster)
    }

    /// Expire leases, re-plan after membership settles, commit a plan once all its workers are
    /// ready. Runs every `tick`.
    async fn tick(&self) -> Result<()> {
        let mut st = self.state.lock().await;
        let ttl = self.cfg.lease_ttl;
        let expired: Vec<String> =
            st.members.iter().filter(|(_, m)| m.last_heartbeat.elapsed() > ttl).map(|(k, _)| k.clone()).collect();
        for id in expired {
            warn!(worker = %id, "lease expired; removing worker");
            st.members.remove(&id);
            st.dirty_since = Some(Instant::now());
            self.store.delete(&self.key(&format!("workers/{id}"))).await?;
        }
        if let Some(t) = st.dirty_since {
            if t.elapsed() >= Duration::from_millis(150) && st.members.len() >= self.cfg.expect_workers.max(1) {
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
        self.store.put(&self.key(&format!("placement/{}", msg.epoch)), msg.encode_to_vec(), None).await?;
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
        let info = req.into_inner().worker.ok_or_else(|| Status::invalid_argument("register: missing `worker`"))?;
        if info.worker_id.is_empty() || info.address.is_empty() {
            return Err(Status::invalid_argument("register: worker_id and address are required"));
        }
        let c = &self.core;
        let mut st = c.state.lock().await;
        let lease_id = st.next_lease;
        st.next_lease += 1;
        info!(worker = %info.worker_id, address = %info.address, "worker registered");
        c.store
            .put(&c.key(&format!("workers/{}", info.worker_id)), info.encode_to_vec(), None)
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
            lease_id,
            ttl_ms: c.cfg.lease_ttl.as_millis() as u32,
            model_config_json: c.cfg.model_config_json.clone(),
            model_dir: c.cfg.model_dir.clone(),
        }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let mut st = self.core.state.lock().await;
        let current_epoch = st.current.as_ref().map(|p| p.epoch).unwrap_or(0);
        let known = match st.members.get_mut(&r.worker_id) {
            Some(m) if m.lease_id == r.lease_id => {
                m.last_heartbeat = Instant::now();
                true
            }
            _ => false,
        };
        Ok(Response::new(HeartbeatResponse { known, current_epoch }))
    }

    async fn deregister(&self, req: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        let r = req.into_inner();
        let c = &self.core;
        let mut st = c.state.lock().await;
        if st.members.get(&r.worker_id).is_some_and(|m| m.lease_id == r.lease_id) {
            st.members.remove(&r.worker_id);
            st.dirty_since = Some(Instant::now());
            c.store.delete(&c.key(&format!("workers/{}", r.worker_id))).await.map_err(Status::from)?;
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
        if !r.error.is_empty() {
            warn!(worker = %r.worker_id, epoch = r.epoch, error = %r.error, "worker cannot load its experts; placement cannot commit");
            m.error = r.error;
            return Ok(Response::new(ReportReadyResponse {}));
        }
        m.error.clear();
        m.ready_epoch = m.ready_epoch.max(r.epoch);
        c.store
            .put(&c.key(&format!("placement/{}/ready/{}", r.epoch, r.worker_id)), vec![], None)
            .await
            .map_err(Status::from)?;
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
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let store: Arc<dyn MetadataStore> = Arc::new(EmbeddedStore::new());
    let core = CoordinatorCore::new(cfg, store)?;
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
