//! A worker process: register (with a coordinator, or in etcd directly), keep the lease on a
//! thread of its own, follow placement epochs (load what a proposed plan adds before reporting
//! ready; free what a committed plan dropped), serve ExpertService and MoeLayer, report load;
//! on SIGTERM drain (experts move away first), on SIGINT leave at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use expertmesh_kernels::backend_for_device;
use expertmesh_proto::v1::expert_service_server::ExpertServiceServer;
use expertmesh_proto::v1::moe_layer_server::MoeLayerServer;
use expertmesh_proto::v1::{DeviceInfo, LoadReport, PlacementPlan, WorkerInfo};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{from_cluster, Result, WorkerError};
use crate::service::{Admission, AdmissionConfig, ExpertServiceImpl, ExpertStore, MoeLayerImpl};
use expertmesh_cluster::control::{connect_control, ControlPlane, ControlTarget, Registration};
use expertmesh_dispatcher::checkpoint::Checkpoint;
use expertmesh_dispatcher::compute::on_pool;
use expertmesh_dispatcher::dispatcher::{route_table_channel, Dispatcher, DispatcherConfig, RouteTable, RouteTableTx};
use expertmesh_dispatcher::moe::{load_experts, Frontend};
use expertmesh_dispatcher::transport::{ExpertTransport, RoutedTransport};

/// Worker settings (from `expertmesh worker` flags).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator, or the store the worker registers in directly.
    pub control: ControlTarget,
    pub listen: SocketAddr,
    /// Address others reach this worker at (default: the bound address).
    pub advertise: Option<String>,
    pub worker_id: String,
    pub node: String,
    pub device: String,
    /// Checkpoint directory; default: the one the coordinator names.
    pub model: Option<PathBuf>,
    /// Memory offered for expert weights; None: what the device has free at start.
    pub memory_bytes: Option<u64>,
    /// Throughput placement weights this worker by; None: measured at start by the probe.
    pub tflops: Option<f64>,
    /// Limits and admission control of the worker's servers.
    pub admission: AdmissionConfig,
    pub dispatcher: DispatcherConfig,
    /// How long a drain (SIGTERM) waits for the experts to move before leaving anyway.
    pub drain_timeout: Duration,
    /// Mutual TLS of the worker's server (its calls carry their own: `control`, `dispatcher`).
    pub tls: Option<expertmesh_trust::Tls>,
    /// Where to serve Prometheus metrics (`GET /metrics`); None: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a starting worker waits for its control plane before it exits.
    pub control_wait: Duration,
}

/// After the drain commits, keep serving this long so dispatchers that routed by the previous
/// epoch finish against this worker, then stop accepting and finish what is in flight.
const DRAIN_GRACE: Duration = Duration::from_millis(1000);

/// How a worker is asked to stop.
#[derive(Debug, Clone, Default)]
pub struct StopSignals {
    /// Graceful (SIGTERM): move the experts away first, then leave.
    pub drain: CancellationToken,
    /// Fast (SIGINT): leave now; dispatchers retry what was in flight on the next epoch.
    pub quit: CancellationToken,
}

/// Follow committed placements into `tx` until `shutdown`; watches again when the feed breaks.
/// `on_event` sees every event first (workers load proposed plans there).
pub async fn follow_placement<F, Fut>(
    control: Arc<dyn ControlPlane>,
    tx: RouteTableTx,
    shutdown: CancellationToken,
    mut on_event: F,
) where
    F: FnMut(PlacementPlan, bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut failing = false;
    let mut backoff = expertmesh_cluster::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let feed = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = control.watch_placement() => s,
        };
        match feed {
            Ok(mut rx) => {
                if failing {
                    info!("placement feed back; following again");
                    failing = false;
                }
                backoff.reset();
                loop {
                    let ev = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        ev = rx.recv() => ev,
                    };
                    let Some(ev) = ev else { break };
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
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot follow placement; routing by the last committed plan and retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.delay()) => {}
        }
    }
}

/// Forward the dispatcher's unreachable workers to the control plane, each at most once per
/// second.
fn spawn_unreachable_reporter(
    control: Arc<dyn ControlPlane>,
    reporter: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: std::collections::HashMap<String, std::time::Instant> = Default::default();
        while let Some(id) = rx.recv().await {
            if last.get(&id).is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            last.insert(id.clone(), std::time::Instant::now());
            if let Err(e) = control.report_unreachable(&id, &reporter).await {
                warn!(worker = %id, error = %e, "cannot report an unreachable worker");
            }
        }
    })
}

/// Register, retrying until `deadline` (a store-mode worker may start before any coordinator
/// has published the model).
async fn register_with_retry(
    control: &Arc<dyn ControlPlane>,
    info: &WorkerInfo,
    deadline: Duration,
) -> Result<Registration> {
    let start = std::time::Instant::now();
    let mut backoff = expertmesh_cluster::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut log = expertmesh_cluster::backoff::LogEvery::new(Duration::from_secs(30));
    loop {
        match control.register(info, 0).await {
            Ok(r) => return Ok(r),
            Err(e) if start.elapsed() < deadline => {
                if log.failed().is_some() {
                    warn!(error = %e, gives_up_in_s = deadline.saturating_sub(start.elapsed()).as_secs(), "cannot register yet; retrying");
                }
                tokio::time::sleep(backoff.delay()).await;
            }
            Err(e) => return Err(from_cluster(e)),
        }
    }
}

/// Keep the lease alive on a thread of its own with its own runtime and its own connection, so
/// a data plane that keeps every other thread busy cannot starve it. Registers again (with the
/// epoch the worker follows) when the lease was lost.
fn spawn_lease_keeper(
    target: ControlTarget,
    info: WorkerInfo,
    lease: Arc<AtomicU64>,
    store: Arc<ExpertStore>,
    ttl: Duration,
    stop: CancellationToken,
    readiness: Arc<crate::readiness::Readiness>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("expertmesh-lease".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "cannot start the lease keeper's runtime");
                return;
            }
        };
        rt.block_on(async move {
            let control = tokio::select! {
                _ = stop.cancelled() => return,
                c = connect_control(&target, Duration::from_secs(3600)) => match c {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "lease keeper cannot reach the control plane");
                        return;
                    }
                },
            };
            let id = info.worker_id.clone();
            let mut failing = false;
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(ttl / 3) => {} }
                let l = lease.load(Ordering::Acquire);
                match control.keep_alive(&id, l).await {
                    Ok(true) => {
                        readiness.set_lease_lost(false);
                        if failing {
                            info!(worker = %id, "lease renewed again");
                            failing = false;
                        }
                    }
                    Ok(false) => {
                        warn!(worker = %id, "lease lost; registering again");
                        readiness.set_lease_lost(true);
                        match control.register(&info, store.epoch()).await {
                            Ok(r) => {
                                readiness.set_lease_lost(false);
                                lease.store(r.lease, Ordering::Release);
                                info!(worker = %id, lease = r.lease, "registered again; serving on");
                            }
                            Err(e) => warn!(worker = %id, error = %e, "cannot register again yet"),
                        }
                    }
                    Err(e) => {
                        if !failing {
                            warn!(worker = %id, error = %e, "cannot renew the lease; serving on and retrying");
                            failing = true;
                        }
                    }
                }
            }
        })
    })
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

/// The device as the worker reports it: throughput from the probe on its backend (unless
/// `tflops` overrides it: then no probe runs), memory from the device (unless `memory`
/// overrides it).
async fn measure_device(
    backend: &Arc<dyn expertmesh_kernels::ExpertBackend>,
    memory: Option<u64>,
    tflops: Option<f64>,
) -> Result<DeviceInfo> {
    let (kind, index) = backend.device();
    let (value, measured, memory_free, memory_total) = match tflops {
        Some(t) => {
            let (free, total) = backend
                .memory()
                .map_err(|e| WorkerError::Internal(format!("reading the memory of {}: {e}", backend.name())))?;
            tracing::info!(backend = %backend.name(), tflops = t, memory_free = free, memory_total = total, "device throughput set by --tflops (no probe)");
            (t, false, free, total)
        }
        None => {
            let b = backend.clone();
            let probe = on_pool(move || expertmesh_kernels::probe(&*b)).await?.map_err(|e| {
                WorkerError::Internal(format!("the throughput probe on {} failed: {e}", backend.name()))
            })?;
            tracing::info!(
                backend = %backend.name(),
                probe_tflops = format!("{:.3}", probe.tflops),
                probe_rows_per_expert = probe.rows_per_expert,
                probe_ms = format!("{:.2}", probe.seconds * 1e3),
                memory_free = probe.memory_free,
                memory_total = probe.memory_total,
                "device measured (bf16 expert FFN, 8 experts of 1024 x 512)"
            );
            (probe.tflops, true, probe.memory_free, probe.memory_total)
        }
    };
    Ok(DeviceInfo {
        kind: kind.into(),
        index,
        memory_bytes: memory.unwrap_or(memory_free),
        tflops: value,
        name: backend.name(),
        memory_total_bytes: memory_total,
        tflops_measured: measured,
        nccl: crate::links::capable(&**backend),
    })
}

/// Run a worker until it is stopped or drained. Prints `EXPERTMESH_WORKER_READY id=.. addr=..`
/// on stdout once it serves.
pub async fn run_worker(cfg: WorkerConfig, signals: StopSignals) -> Result<()> {
    use expertmesh_core::limits::{check_address, check_id};
    check_id("--id", &cfg.worker_id).map_err(WorkerError::InvalidInput)?;
    check_id("--node", &cfg.node).map_err(WorkerError::InvalidInput)?;
    if let Some(a) = &cfg.advertise {
        check_address("--advertise", a).map_err(WorkerError::InvalidInput)?;
    }
    let backend = backend_for_device(&cfg.device)?;
    let device = measure_device(&backend, cfg.memory_bytes, cfg.tflops).await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    if cfg.tls.is_none() && !expertmesh_trust::is_loopback(&listener.local_addr()?) {
        warn!(addr = %listener.local_addr()?, "serving WITHOUT TLS on a non-loopback address: anyone who can reach this port can read and answer activations; give --tls-cert, --tls-key and --tls-ca");
    }
    let addr = cfg.advertise.clone().unwrap_or(listener.local_addr()?.to_string());
    let info_msg = WorkerInfo {
        worker_id: cfg.worker_id.clone(),
        address: addr.clone(),
        node: cfg.node.clone(),
        devices: vec![device],
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    let progress = Arc::new(crate::progress::Progress::default());
    // A starting worker waits `control_wait` for its control plane, then exits saying why; once
    // registered it serves on and retries without a deadline.
    let control = connect_control(&cfg.control, cfg.control_wait).await.map_err(from_cluster)?;
    let reg = register_with_retry(&control, &info_msg, cfg.control_wait).await?;
    let model_dir = cfg.model.clone().unwrap_or_else(|| PathBuf::from(&reg.model_dir));
    let ck = Arc::new(Checkpoint::open(&model_dir)?);
    let theirs = expertmesh_core::ModelSpec::from_config_json(&reg.model_config_json)?;
    if &theirs != ck.spec() {
        let _ = control.deregister(&cfg.worker_id, reg.lease).await;
        return Err(WorkerError::Checkpoint(format!(
            "{} is not the model the cluster serves ({} vs {})",
            model_dir.display(),
            ck.spec().model_type,
            theirs.model_type
        )));
    }
    let store = Arc::new(ExpertStore::new(cfg.worker_id.clone(), ck.spec().clone(), backend.clone()));
    let (table_tx, table_rx) = route_table_channel();
    // A GPU worker that can join NCCL groups routes per destination: its group's members over
    // the group's link, everyone else by gRPC.
    let links = crate::links::capable(&*backend).then(|| {
        let routed = Arc::new(RoutedTransport::new(cfg.dispatcher.grpc()));
        Arc::new(crate::links::Links::new(cfg.worker_id.clone(), routed, backend.clone(), store.clone()))
    });
    let transport: Arc<dyn ExpertTransport> = match &links {
        Some(l) => l.transport(),
        None => cfg.dispatcher.grpc_transport(),
    };
    let dispatcher = Arc::new(
        Dispatcher::new(ck.spec().clone(), transport, table_rx, cfg.dispatcher.clone())
            .with_router(Frontend::new(ck.clone(), backend.clone())),
    );
    let (utx, urx) = tokio::sync::mpsc::unbounded_channel();
    dispatcher.report_unreachable_to(utx);
    let reporter = spawn_unreachable_reporter(control.clone(), cfg.worker_id.clone(), urx);

    let server_stop = CancellationToken::new();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // NOT_SERVING from the first answer until a committed placement places this worker.
    let readiness = crate::readiness::Readiness::new();
    let health_stop = CancellationToken::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        for s in ["", expertmesh_proto::EXPERT_SERVICE, expertmesh_proto::MOE_LAYER_SERVICE] {
            health_reporter.set_service_status(s, tonic_health::ServingStatus::NotServing).await;
        }
        health_reporter.set_service_status(expertmesh_proto::LIVE_SERVICE, tonic_health::ServingStatus::Serving).await;
    })
    .await;
    let http_health = expertmesh_cluster::metrics_http::health_of(health_reporter.clone());
    tokio::spawn(readiness.clone().report(health_reporter, health_stop.clone()));
    let reflection = expertmesh_proto::reflection_service().map_err(WorkerError::Internal)?;
    let admission = Admission::new(cfg.admission.clone(), &cfg.worker_id);
    let metrics = Arc::new(crate::metrics::WorkerMetrics::default());
    if let Some(at) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|e| WorkerError::InvalidInput(format!("--metrics-listen {at}: cannot bind: {e}")))?;
        let sources = crate::metrics::Sources {
            metrics: metrics.clone(),
            store: store.clone(),
            dispatcher: dispatcher.clone(),
            admission: admission.clone(),
            readiness: readiness.clone(),
            progress: progress.clone(),
            links: links.clone(),
        };
        let render: expertmesh_cluster::metrics_http::Render = Arc::new(move || crate::metrics::render(&sources));
        tokio::spawn(expertmesh_cluster::metrics_http::serve_metrics(l, render, http_health, health_stop.clone()));
    }
    let max = cfg.admission.limits.max_message_bytes;
    // Windows a few chunks deep: enough to keep a link busy, small enough that a peer that
    // sends and never reads pins little. A stream count above the per-peer limit, so excess
    // streams reach the handler and get a clear RESOURCE_EXHAUSTED; pings find dead peers.
    let streams =
        u32::try_from(cfg.admission.max_streams_per_peer.saturating_mul(2).saturating_add(16)).unwrap_or(u32::MAX);
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .max_concurrent_streams(Some(streams))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(expertmesh_trust::server::RequireAuthLayer)
        .add_service(health)
        .add_service(reflection)
        .add_service(expertmesh_proto::reflection_service_v1alpha().map_err(WorkerError::Internal)?)
        .add_service(
            ExpertServiceServer::new(ExpertServiceImpl {
                store: store.clone(),
                admission: admission.clone(),
                mutual_tls: cfg.tls.is_some(),
                metrics: metrics.clone(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            MoeLayerServer::new(MoeLayerImpl {
                dispatcher: dispatcher.clone(),
                admission: admission.clone(),
                metrics: metrics.clone(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(
            expertmesh_trust::server::incoming(
                crate::admission::incoming(listener, admission.conns.clone()),
                cfg.tls.clone(),
            ),
            server_stop.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    info!(worker = %cfg.worker_id, %addr, device = %backend.name(), model = %model_dir.display(), "worker serving");
    println!("EXPERTMESH_WORKER_READY id={} addr={}", cfg.worker_id, addr);

    let lease = Arc::new(AtomicU64::new(reg.lease));
    let tasks_stop = CancellationToken::new();
    let keeper = spawn_lease_keeper(
        cfg.control.clone(),
        info_msg.clone(),
        lease.clone(),
        store.clone(),
        reg.ttl,
        tasks_stop.clone(),
        readiness.clone(),
    )?;
    // Load reports.
    let reports = {
        let (c, store, stop, id, lease, progress) = (
            control.clone(),
            store.clone(),
            tasks_stop.clone(),
            cfg.worker_id.clone(),
            lease.clone(),
            progress.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                let p = progress.snapshot();
                let report = LoadReport {
                    worker_id: id.clone(),
                    epoch: store.epoch(),
                    experts: store.counters(),
                    resident_bytes: store.resident_bytes(),
                    rss_bytes: rss_bytes(),
                    load_done_bytes: p.done,
                    load_total_bytes: p.total,
                    load_bytes_per_s: p.rate,
                };
                let _ = c.report_load(report, lease.load(Ordering::Acquire)).await;
            }
        })
    };
    // Placement: load on proposal, switch and free on commit; a committed plan that lists this
    // worker as draining (and gives it nothing) lets it leave.
    let drained = CancellationToken::new();
    let follower = {
        let (c, store, ck, backend, stop, links) =
            (control.clone(), store.clone(), ck.clone(), backend.clone(), tasks_stop.clone(), links.clone());
        let id = cfg.worker_id.clone();
        let drained = drained.clone();
        let readiness = readiness.clone();
        let progress = progress.clone();
        // Plans up to this epoch that list our id as draining are about an earlier process
        // with this id (drained, then restarted: a StatefulSet pod, a systemd unit).
        let joined_epoch = reg.placement_epoch;
        tokio::spawn(async move {
            let mut pending: Option<(u64, HashSet<(u32, u32)>)> = None;
            let rc = c.clone();
            follow_placement(c, table_tx, stop, move |plan, committed| {
                let mine = my_experts(&plan, &id);
                let (store, ck, backend, id) = (store.clone(), ck.clone(), backend.clone(), id.clone());
                let drains_us = plan.draining.contains(&id) && plan.epoch > joined_epoch;
                let leaving = committed && drains_us && !plan.workers.iter().any(|w| w.worker_id == id);
                if drains_us {
                    readiness.set_draining();
                }
                if committed {
                    readiness.set_committed(plan.workers.iter().any(|w| w.worker_id == id));
                }
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
                let rc = rc.clone();
                let drained = drained.clone();
                let links = links.clone();
                let progress = progress.clone();
                async move {
                    if let (true, Some(l)) = (committed, &links) {
                        // Joining waits for every member: never on the placement path.
                        let (l, p) = (l.clone(), plan.clone());
                        tokio::spawn(async move { l.on_committed(&p).await });
                    }
                    if leaving {
                        // Keep the experts: dispatchers that routed by the last epoch finish here.
                        info!(worker = %id, epoch = plan.epoch, "drained: the committed placement moved every expert away");
                        drained.cancel();
                        return;
                    }
                    if let Some(keep) = keep {
                        store.set_epoch(plan.epoch);
                        if let Err(e) = store.retain(&keep) {
                            warn!(worker = %id, epoch = plan.epoch, error = %e, "cannot free the experts the placement moved away");
                        }
                        info!(worker = %id, epoch = plan.epoch, experts = keep.len(), "placement committed");
                        return;
                    }
                    let missing: Vec<(u32, u32)> = mine.iter().filter(|(l, e)| !store.holds(*l, *e)).copied().collect();
                    let n = missing.len();
                    let held = store.clone();
                    let mut by_layer: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
                    for (l, e) in missing {
                        by_layer.entry(l).or_default().push(e);
                    }
                    // Checkpoint bytes to read: the progress logs, load reports and metrics show.
                    let total: u64 = by_layer
                        .iter()
                        .map(|(l, es)| ck.expert_bytes(*l as usize).unwrap_or(0).saturating_mul(es.len() as u64))
                        .sum();
                    progress.start(total);
                    let started = std::time::Instant::now();
                    let ticker = {
                        let (progress, id, epoch) = (progress.clone(), id.clone(), plan.epoch);
                        tokio::spawn(async move {
                            loop {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                let p = progress.snapshot();
                                info!(worker = %id, epoch, done_bytes = p.done, total_bytes = p.total, "loading experts: {}", p.describe());
                            }
                        })
                    };
                    let counted = progress.clone();
                    let loaded = on_pool(move || -> Result<Vec<_>> {
                        let mut layers = Vec::with_capacity(by_layer.len());
                        for (l, experts) in by_layer {
                            // One resident object per layer: what it holds now, plus the new ones.
                            let prev = held.layer(l);
                            let keep = prev.as_ref().map(|p| p.experts()).unwrap_or_default();
                            layers.push(load_experts(&ck, &*backend, l as usize, &experts, prev, &keep)?);
                            counted.add(ck.expert_bytes(l as usize).unwrap_or(0).saturating_mul(experts.len() as u64));
                        }
                        Ok(layers)
                    })
                    .await;
                    ticker.abort();
                    let rate = progress.snapshot().rate;
                    progress.finish();
                    let error = match loaded {
                        Ok(Ok(v)) => {
                            store.insert(v);
                            info!(
                                worker = %id,
                                epoch = plan.epoch,
                                loaded = n,
                                held = mine.len(),
                                bytes = total,
                                seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                                mib_per_s = format!("{:.0}", rate / (1u64 << 20) as f64),
                                "experts loaded; ready"
                            );
                            String::new()
                        }
                        Ok(Err(e)) | Err(e) => {
                            warn!(worker = %id, epoch = plan.epoch, error = %e, "cannot load experts for the proposed placement");
                            format!("cannot load experts for placement epoch {}: {e}", plan.epoch)
                        }
                    };
                    let nccl = match (&links, error.is_empty()) {
                        (Some(l), true) => l.id_to_report(&plan).await,
                        _ => None,
                    };
                    if let Err(e) = rc.report_ready(&id, plan.epoch, error, nccl).await {
                        warn!(worker = %id, epoch = plan.epoch, error = %e, "cannot report ready; the next placement event retries");
                    }
                }
            })
            .await;
        })
    };

    enum Exit {
        Quit,
        Drain,
        Drained,
    }
    let exit = tokio::select! {
        _ = signals.quit.cancelled() => Exit::Quit,
        _ = signals.drain.cancelled() => Exit::Drain,
        _ = drained.cancelled() => Exit::Drained,
    };
    let id = cfg.worker_id.clone();
    let l = lease.load(Ordering::Acquire);
    match exit {
        Exit::Quit => {
            info!(worker = %id, "stopping now: deregistering, then finishing in-flight requests");
            let _ = tokio::time::timeout(Duration::from_secs(3), control.deregister(&id, l)).await;
        }
        Exit::Drain => {
            readiness.set_draining();
            info!(worker = %id, deadline = ?cfg.drain_timeout, "draining: asking for the experts to move away");
            let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
            let will_move = loop {
                match tokio::time::timeout_at(deadline, control.request_drain(&id, l)).await {
                    Ok(Ok(w)) => break w,
                    Ok(Err(e)) => {
                        warn!(worker = %id, error = %e, "cannot record the drain request; retrying");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Err(_) => break false,
                }
            };
            if !will_move {
                warn!(worker = %id, "no other worker can take this worker's experts; leaving without moving them");
            } else {
                tokio::select! {
                    _ = drained.cancelled() => {}
                    _ = signals.quit.cancelled() => warn!(worker = %id, "stopped during the drain; leaving now"),
                    _ = tokio::time::sleep_until(deadline) => {
                        warn!(worker = %id, "drain deadline passed before the experts moved; leaving anyway");
                    }
                }
            }
        }
        Exit::Drained => info!(worker = %id, "drained from outside; leaving"),
    }
    readiness.set_draining();
    if !matches!(exit, Exit::Quit) && drained.is_cancelled() {
        tokio::select! {
            _ = tokio::time::sleep(DRAIN_GRACE) => {}
            _ = signals.quit.cancelled() => {}
        }
    }
    // Stop accepting; in-flight streams finish.
    server_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), server).await.is_err() {
        warn!(worker = %id, "in-flight requests did not finish within 10 s");
    }
    tasks_stop.cancel();
    if let Some(l) = &links {
        // Leaving ends the group for its other members after this round: their queued sends
        // fail over to gRPC at once instead of waiting out the round watchdog.
        let _ = tokio::time::timeout(Duration::from_secs(5), l.shutdown()).await;
    }
    let _ = tokio::task::spawn_blocking(move || keeper.join()).await;
    if !matches!(exit, Exit::Quit) {
        let l = lease.load(Ordering::Acquire);
        if let Err(e) = tokio::time::timeout(Duration::from_secs(3), control.deregister(&id, l))
            .await
            .unwrap_or_else(|_| Err(expertmesh_cluster::ClusterError::Unavailable("timed out".into())))
        {
            warn!(worker = %id, error = %e, "cannot revoke the lease; it expires on its own");
        }
    }
    reports.abort();
    follower.abort();
    reporter.abort();
    health_stop.cancel();
    info!(worker = %id, "worker stopped");
    Ok(())
}

/// A dispatcher in this process that routes by the cluster's committed placements.
pub async fn connect_dispatcher(
    target: &ControlTarget,
    ck: Arc<Checkpoint>,
    device: &str,
    cfg: DispatcherConfig,
    shutdown: CancellationToken,
) -> Result<Arc<Dispatcher>> {
    let backend = backend_for_device(device)?;
    let control = connect_control(target, Duration::from_secs(30)).await.map_err(from_cluster)?;
    let (tx, rx) = route_table_channel();
    tokio::spawn(follow_placement(control.clone(), tx, shutdown, |_, _| async {}));
    let d = Arc::new(
        Dispatcher::new(ck.spec().clone(), cfg.grpc_transport(), rx, cfg).with_router(Frontend::new(ck, backend)),
    );
    let (utx, urx) = tokio::sync::mpsc::unbounded_channel();
    d.report_unreachable_to(utx);
    spawn_unreachable_reporter(control, format!("dispatcher-{}", std::process::id()), urx);
    Ok(d)
}

/// This process's resident set size in bytes (`VmRSS` of Linux's `/proc/self/status`; 0 where
/// unreadable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}
