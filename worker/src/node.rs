//! A worker process: register with the coordinator, keep the lease, follow placement epochs
//! (load what a proposed plan adds before reporting ready; free what a committed plan dropped),
//! serve ExpertService and MoeLayer, report load, and deregister on shutdown.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use expertmesh_kernels::backend_for_device;
use expertmesh_proto::v1::coordinator_client::CoordinatorClient;
use expertmesh_proto::v1::expert_service_server::ExpertServiceServer;
use expertmesh_proto::v1::moe_layer_server::MoeLayerServer;
use expertmesh_proto::v1::{
    DeregisterRequest, DeviceInfo, HeartbeatRequest, LoadReport, PlacementPlan, RegisterRequest, ReportReadyRequest,
    WatchPlacementRequest, WorkerInfo,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::checkpoint::Checkpoint;
use crate::compute::on_pool;
use crate::dispatcher::{route_table_channel, Dispatcher, DispatcherConfig, RouteTable, RouteTableTx};
use crate::error::{Result, WorkerError};
use crate::moe::Frontend;
use crate::service::{ExpertServiceImpl, ExpertStore, MoeLayerImpl};

/// Worker settings (from `expertmesh worker` flags).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub listen: SocketAddr,
    /// Address others reach this worker at (default: the bound address).
    pub advertise: Option<String>,
    pub worker_id: String,
    pub node: String,
    pub device: String,
    /// Checkpoint directory; default: the one the coordinator names.
    pub model: Option<PathBuf>,
    pub memory_bytes: u64,
    pub tflops: f64,
    pub max_message_bytes: usize,
    pub dispatcher: DispatcherConfig,
}

/// Connect to the coordinator, retrying until `deadline`.
pub async fn connect_coordinator(addr: &str, deadline: Duration) -> Result<CoordinatorClient<Channel>> {
    let url = if addr.starts_with("http") { addr.to_string() } else { format!("http://{addr}") };
    let start = std::time::Instant::now();
    loop {
        match CoordinatorClient::connect(url.clone()).await {
            Ok(c) => return Ok(c.max_decoding_message_size(256 << 20)),
            Err(e) if start.elapsed() < deadline => {
                warn!(coordinator = %addr, error = %e, "coordinator not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(WorkerError::Unavailable(format!("coordinator {addr} unreachable after {deadline:?}: {e}")))
            }
        }
    }
}

/// Follow the coordinator's committed placements into `tx` until `shutdown`; reconnects when
/// the watch drops. `on_event` sees every event first (workers load proposed plans there).
pub async fn follow_placement<F, Fut>(
    mut client: CoordinatorClient<Channel>,
    tx: RouteTableTx,
    shutdown: CancellationToken,
    mut on_event: F,
) where
    F: FnMut(PlacementPlan, bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = client.watch_placement(WatchPlacementRequest {}) => s,
        };
        match stream {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = s.message() => m,
                    };
                    match msg {
                        Ok(Some(ev)) => {
                            let Some(plan) = ev.plan else { continue };
                            on_event(plan.clone(), ev.committed).await;
                            if ev.committed {
                                let newer = tx.borrow().as_ref().is_none_or(|t| t.epoch < plan.epoch);
                                if newer {
                                    info!(epoch = plan.epoch, "routing by committed placement");
                                    let _ = tx.send(Some(Arc::new(RouteTable::from_plan(&plan))));
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "placement watch failed; re-watching");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot watch placement; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

fn my_experts(plan: &PlacementPlan, worker_id: &str) -> HashSet<(u32, u32)> {
    let Some(idx) = plan.workers.iter().position(|w| w.worker_id == worker_id) else { return HashSet::new() };
    let mut out = HashSet::new();
    for l in &plan.layers {
        for (e, r) in l.experts.iter().enumerate() {
            if r.workers.contains(&(idx as u32)) {
                out.insert((l.layer, e as u32));
            }
        }
    }
    out
}

/// Run a worker until `shutdown` fires. Prints `EXPERTMESH_WORKER_READY id=.. addr=..` on
/// stdout once it serves.
pub async fn run_worker(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<()> {
    let backend = backend_for_device(&cfg.device)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = cfg.advertise.clone().unwrap_or(listener.local_addr()?.to_string());
    let info_msg = WorkerInfo {
        worker_id: cfg.worker_id.clone(),
        address: addr.clone(),
        node: cfg.node.clone(),
        devices: vec![DeviceInfo {
            kind: cfg.device.clone(),
            index: 0,
            memory_bytes: cfg.memory_bytes,
            tflops: cfg.tflops,
        }],
    };
    let mut coord = connect_coordinator(&cfg.coordinator, Duration::from_secs(30)).await?;
    let reg = coord.register(RegisterRequest { worker: Some(info_msg.clone()), epoch: 0 }).await?.into_inner();
    let model_dir = cfg.model.clone().unwrap_or_else(|| PathBuf::from(&reg.model_dir));
    let ck = Arc::new(Checkpoint::open(&model_dir)?);
    let theirs = expertmesh_core::ModelSpec::from_config_json(&reg.model_config_json)?;
    if &theirs != ck.spec() {
        return Err(WorkerError::Checkpoint(format!(
            "{} is not the model the coordinator serves ({} vs {})",
            model_dir.display(),
            ck.spec().model_type,
            theirs.model_type
        )));
    }
    let store = Arc::new(ExpertStore::new(cfg.worker_id.clone(), ck.spec().clone()));
    let (table_tx, table_rx) = route_table_channel();
    let dispatcher =
        Arc::new(Dispatcher::new(Frontend::new(ck.clone(), backend.clone()), table_rx, cfg.dispatcher.clone()));

    let server_stop = CancellationToken::new();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ExpertServiceServer<ExpertServiceImpl>>().await;
    let reflection = expertmesh_proto::reflection_service().map_err(WorkerError::Internal)?;
    let max = cfg.max_message_bytes;
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(health)
        .add_service(reflection)
        .add_service(
            ExpertServiceServer::new(ExpertServiceImpl { store: store.clone() })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            MoeLayerServer::new(MoeLayerImpl { dispatcher })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            server_stop.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    info!(worker = %cfg.worker_id, %addr, device = %backend.name(), model = %model_dir.display(), "worker serving");
    println!("EXPERTMESH_WORKER_READY id={} addr={}", cfg.worker_id, addr);

    let lease = Arc::new(std::sync::atomic::AtomicU64::new(reg.lease_id));
    let ttl = Duration::from_millis(reg.ttl_ms.max(300) as u64);
    // Heartbeats; re-register when the lease was lost rather than exit.
    let hb = {
        let (mut c, lease, stop, info_msg) = (coord.clone(), lease.clone(), shutdown.clone(), info_msg.clone());
        let store = store.clone();
        let id = cfg.worker_id.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(ttl / 3) => {} }
                let l = lease.load(std::sync::atomic::Ordering::Acquire);
                match c.heartbeat(HeartbeatRequest { worker_id: id.clone(), lease_id: l }).await {
                    Ok(r) if r.get_ref().known => {}
                    Ok(_) => {
                        warn!(worker = %id, "lease lost; registering again");
                        let req = RegisterRequest { worker: Some(info_msg.clone()), epoch: store.epoch() };
                        if let Ok(r) = c.register(req).await {
                            lease.store(r.get_ref().lease_id, std::sync::atomic::Ordering::Release);
                        }
                    }
                    Err(e) => warn!(worker = %id, error = %e, "heartbeat failed"),
                }
            }
        })
    };
    // Load reports.
    let reports = {
        let (mut c, store, stop, id) = (coord.clone(), store.clone(), shutdown.clone(), cfg.worker_id.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                let _ = c
                    .report_load(LoadReport { worker_id: id.clone(), epoch: store.epoch(), experts: store.counters() })
                    .await;
            }
        })
    };
    // Placement: load on proposal, switch and free on commit.
    let follower = {
        let (c, store, ck, backend, stop) =
            (coord.clone(), store.clone(), ck.clone(), backend.clone(), shutdown.clone());
        let id = cfg.worker_id.clone();
        tokio::spawn(async move {
            let mut pending: Option<(u64, HashSet<(u32, u32)>)> = None;
            let rc = c.clone();
            follow_placement(c, table_tx, stop, move |plan, committed| {
                let mine = my_experts(&plan, &id);
                let (store, ck, backend, id) = (store.clone(), ck.clone(), backend.clone(), id.clone());
                let mut keep = None;
                if committed {
                    let mut k = mine.clone();
                    if let Some((e, p)) = &pending {
                        if *e > plan.epoch {
                            k.extend(p.iter().copied());
                        }
                    }
                    if pending.as_ref().is_some_and(|(e, _)| *e <= plan.epoch) {
                        pending = None;
                    }
                    keep = Some(k);
                } else {
                    pending = Some((plan.epoch, mine.clone()));
                }
                let mut rc = rc.clone();
                async move {
                    if let Some(keep) = keep {
                        store.set_epoch(plan.epoch);
                        store.retain(&keep);
                        info!(worker = %id, epoch = plan.epoch, experts = keep.len(), "placement committed");
                        return;
                    }
                    let missing: Vec<(u32, u32)> = mine.iter().filter(|(l, e)| !store.holds(*l, *e)).copied().collect();
                    let n = missing.len();
                    let loaded = on_pool(move || -> Result<Vec<_>> {
                        use rayon::prelude::*;
                        missing
                            .par_iter()
                            .map(|&(l, e)| Ok(((l, e), backend.load_ffn(ck.load_expert(l as usize, e as usize)?)?)))
                            .collect()
                    })
                    .await;
                    match loaded {
                        Ok(Ok(v)) => {
                            store.insert(v);
                            info!(worker = %id, epoch = plan.epoch, loaded = n, held = mine.len(), "experts loaded; ready");
                            let _ = rc.report_ready(ReportReadyRequest { worker_id: id.clone(), epoch: plan.epoch, error: String::new() }).await;
                        }
                        Ok(Err(e)) | Err(e) => {
                            warn!(worker = %id, epoch = plan.epoch, error = %e, "cannot load experts for the proposed placement");
                            let error = format!("cannot load experts for placement epoch {}: {e}", plan.epoch);
                            let _ = rc.report_ready(ReportReadyRequest { worker_id: id.clone(), epoch: plan.epoch, error }).await;
                        }
                    }
                }
            })
            .await;
        })
    };

    shutdown.cancelled().await;
    info!(worker = %cfg.worker_id, "shutting down: deregistering, then draining");
    let l = lease.load(std::sync::atomic::Ordering::Acquire);
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        coord.deregister(DeregisterRequest { worker_id: cfg.worker_id.clone(), lease_id: l }),
    )
    .await;
    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    hb.abort();
    reports.abort();
    follower.abort();
    Ok(())
}

/// A dispatcher in this process that routes by `coordinator`'s committed placements.
pub async fn connect_dispatcher(
    coordinator: &str,
    ck: Arc<Checkpoint>,
    device: &str,
    cfg: DispatcherConfig,
    shutdown: CancellationToken,
) -> Result<Arc<Dispatcher>> {
    let backend = backend_for_device(device)?;
    let client = connect_coordinator(coordinator, Duration::from_secs(30)).await?;
    let (tx, rx) = route_table_channel();
    tokio::spawn(follow_placement(client, tx, shutdown, |_, _| async {}));
    Ok(Arc::new(Dispatcher::new(Frontend::new(ck, backend), rx, cfg)))
}
