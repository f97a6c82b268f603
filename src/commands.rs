//! The subcommands.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use expertmesh_coordinator::CoordinatorConfig;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_core::rng::SplitMix64;
use expertmesh_kernels::cpu::{gemm_gflops, CpuBackend};
use expertmesh_kernels::ExpertBackend;
use expertmesh_proto::v1::{ClusterStatusRequest, DrainRequest};
use expertmesh_worker::control::{connect_coordinator, ControlTarget};
use expertmesh_worker::dispatcher::{Dispatcher, DispatcherConfig};
use expertmesh_worker::limits::Limits;
use expertmesh_worker::moe::{LocalMoe, MoeInput, MoeOutput};
use expertmesh_worker::node::{connect_dispatcher, run_worker, StopSignals, WorkerConfig};
use expertmesh_worker::service::AdmissionConfig;
use expertmesh_worker::synth::{generate, write_safetensors, GenOptions, OwnedTensor};
use expertmesh_worker::Checkpoint;
use tokio_util::sync::CancellationToken;

use crate::local::{LocalCluster, LocalOptions};
use crate::{
    BenchArgs, CoordinatorArgs, DrainArgs, ForwardArgs, GenInputArgs, GenModelArgs, ModelSource, StatusArgs, UpArgs,
    WorkerArgs,
};

/// A token cancelled on SIGTERM or Ctrl-C.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        t.cancel();
    });
    token
}

/// SIGTERM drains the worker; SIGINT (Ctrl-C) stops it at once.
fn worker_signals() -> StopSignals {
    let signals = StopSignals::default();
    let s = signals.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return,
        };
        tokio::select! {
            _ = term.recv() => s.drain.cancel(),
            _ = tokio::signal::ctrl_c() => s.quit.cancel(),
        }
        // A second signal of either kind: stop now.
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        s.quit.cancel();
    });
    signals
}

pub(crate) fn parse_wire(s: &str) -> Result<DType> {
    match DType::parse(s)? {
        d @ (DType::BF16 | DType::F32) => Ok(d),
        d => bail!("--wire {}: expected bf16 or f32", d.name()),
    }
}

pub(crate) async fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.model).with_context(|| format!("opening model {}", a.model.display()))?;
    let model_dir = a.model.canonicalize()?.display().to_string();
    let spec = ck.spec().clone();
    let cfg = CoordinatorConfig {
        cluster: a.cluster,
        model_dir,
        model_config_json: ck.config_text().to_string(),
        lease_ttl: Duration::from_millis(a.lease_ttl_ms.max(300)),
        expect_workers: a.expect_workers,
        replicas: a.replicas,
        expert_bytes: spec.expert_params() * 4,
        advertise: a.advertise.unwrap_or_default(),
        ready_timeout: Duration::from_millis(a.ready_timeout_ms.max(100)),
    };
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    let ready = |addr| {
        println!("EXPERTMESH_COORDINATOR_READY addr={addr}");
        let _ = std::io::stdout().flush();
    };
    expertmesh_coordinator::serve(cfg, &a.store, listener, shutdown_on_signals(), ready).await?;
    Ok(())
}

fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

pub(crate) async fn worker(a: WorkerArgs) -> Result<()> {
    let id = a.id.unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let node = a.node.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
    });
    let memory_bytes = a.memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64).unwrap_or_else(available_memory);
    let control = match (a.store, a.coordinator) {
        (Some(url), _) if url != "embedded" => {
            ControlTarget::Store { url, cluster: a.cluster, lease_ttl: Duration::from_millis(a.lease_ttl_ms.max(300)) }
        }
        (_, Some(c)) => ControlTarget::Coordinator(c),
        (Some(_), None) => {
            bail!("--store embedded lives inside the coordinator's process: give the worker --coordinator HOST:PORT")
        }
        (None, None) => bail!("give --coordinator HOST:PORT or --store etcd://HOST:PORT"),
    };
    let cfg = WorkerConfig {
        control,
        listen: a.listen,
        advertise: a.advertise,
        worker_id: id,
        node,
        device: a.device,
        model: a.model,
        memory_bytes,
        tflops: 1.0,
        admission: AdmissionConfig {
            limits: Limits {
                max_message_bytes: a.max_message_mib << 20,
                max_batch_tokens: a.max_batch_tokens.max(1),
                max_stream_chunks: a.max_stream_chunks.max(1),
            },
            compute_budget_bytes: a.max_inflight_mib.max(1) << 20,
            forward_budget_bytes: a.max_forward_inflight_mib.max(1) << 20,
            max_streams_per_peer: a.max_streams_per_peer.max(1),
            max_connections: a.max_connections.max(1),
            admission_wait: Duration::from_millis(a.admission_wait_ms),
            stall_timeout: Duration::from_millis(a.stall_timeout_ms.max(100)),
        },
        dispatcher: DispatcherConfig {
            max_message_bytes: a.max_message_mib << 20,
            placement_wait: Duration::from_millis(a.placement_wait_ms),
            rpc_timeout: Duration::from_millis(a.rpc_timeout_ms.max(10)),
            request_timeout: Duration::from_millis(a.request_timeout_ms.max(1)),
            hedge_min: Duration::from_millis(a.hedge_min_ms),
            ..Default::default()
        },
        drain_timeout: Duration::from_millis(a.drain_timeout_ms),
    };
    run_worker(cfg, worker_signals()).await?;
    Ok(())
}

pub(crate) fn gen_model(a: GenModelArgs) -> Result<()> {
    let opts = GenOptions {
        preset: a.preset,
        overrides: PresetOverrides {
            layers: a.layers,
            experts: a.experts,
            hidden: a.hidden,
            ffn: a.ffn,
            top_k: a.top_k,
            vocab: a.vocab,
            n_group: a.n_group,
            topk_group: a.topk_group,
            fp8: None,
        },
        dtype: DType::parse(&a.dtype)?,
        seed: a.seed,
        max_bytes: (a.max_gib * (1u64 << 30) as f64) as u64,
    };
    let s = generate(&a.out, &opts)?;
    println!(
        "wrote {} ({}): {} MoE layers x {} experts, hidden {}, expert FFN {}, top-{}; {} files, {:.1} MiB",
        a.out.display(),
        s.spec.model_type,
        s.spec.moe_layers().len(),
        s.spec.n_routed,
        s.spec.hidden,
        s.spec.moe_ffn,
        s.spec.top_k,
        s.files,
        s.bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}

pub(crate) fn random_batch(spec: &expertmesh_core::ModelSpec, tokens: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut r = SplitMix64::new(seed);
    let x = (0..tokens * spec.hidden).map(|_| r.normal() as f32).collect();
    let ids = (0..tokens).map(|_| r.below(spec.vocab_size as u64) as i64).collect();
    (x, ids)
}

pub(crate) fn gen_input(a: GenInputArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.model)?;
    let spec = ck.spec();
    let (x, ids) = random_batch(spec, a.tokens, a.seed);
    let mut t = BTreeMap::new();
    t.insert("hidden_states".to_string(), OwnedTensor::from_f32(DType::F32, vec![a.tokens, spec.hidden], &x)?);
    t.insert("input_ids".to_string(), OwnedTensor::from_i64(vec![a.tokens], &ids));
    write_safetensors(&a.out, &t)?;
    println!(
        "wrote {}: hidden_states f32 [{}, {}], input_ids i64 [{}]",
        a.out.display(),
        a.tokens,
        spec.hidden,
        a.tokens
    );
    Ok(())
}

/// Read `hidden_states` and optional `input_ids` from a safetensors file.
fn read_input(path: &Path, hidden: usize) -> Result<(usize, Vec<f32>, Option<Vec<i64>>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let hs = st
        .tensor("hidden_states")
        .map_err(|_| anyhow!("{}: missing tensor `hidden_states` (f32 [T, {hidden}])", path.display()))?;
    let shape = hs.shape().to_vec();
    if shape.len() != 2 {
        bail!("{}: `hidden_states` has shape {shape:?}; expected [T, {hidden}]", path.display());
    }
    let d = DType::from_safetensors(hs.dtype())?;
    if !d.is_float() || d == DType::F8E4M3 {
        bail!("{}: `hidden_states` has dtype {}; expected f32 (or bf16/f16)", path.display(), d.name());
    }
    let mut x = vec![0f32; shape[0] * shape[1]];
    expertmesh_core::dtype::decode_f32(d, hs.data(), &mut x)?;
    let ids = match st.tensor("input_ids") {
        Ok(t) => {
            let v: Vec<i64> = match t.dtype() {
                safetensors::Dtype::I64 => {
                    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
                }
                safetensors::Dtype::I32 => {
                    t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
                }
                other => bail!("{}: `input_ids` has dtype {other:?}; expected i64 (or i32)", path.display()),
            };
            Some(v)
        }
        Err(_) => None,
    };
    // The hidden size is checked against the model by the layer itself (clear error there).
    let tokens = shape[0];
    if shape[1] != hidden {
        bail!(
            "{}: `hidden_states` has shape {shape:?}; the model's hidden size is {hidden}, so expected [{tokens}, {hidden}]",
            path.display()
        );
    }
    Ok((tokens, x, ids))
}

fn write_output(path: &Path, hidden: usize, out: &MoeOutput) -> Result<()> {
    let k = out.routing.top_k;
    let tokens = out.routing.tokens();
    let idx: Vec<i64> = out.routing.indices.iter().map(|&v| v as i64).collect();
    let mut t = BTreeMap::new();
    t.insert("output".to_string(), OwnedTensor::from_f32(DType::F32, vec![tokens, hidden], &out.output)?);
    t.insert("topk_indices".to_string(), OwnedTensor::from_i64(vec![tokens, k], &idx));
    t.insert("topk_weights".to_string(), OwnedTensor::from_f32(DType::F32, vec![tokens, k], &out.routing.weights)?);
    write_safetensors(path, &t)?;
    Ok(())
}

/// `name` on PATH, if there.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var("PATH").ok()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// A scratch directory removed when dropped.
fn scratch(prefix: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir()?)
}

/// A local cluster plus a dispatcher in this process that routes by its placement.
async fn cluster_dispatcher(
    model: &Path,
    workers: usize,
    replicas: usize,
    log_dir: &Path,
    stop: CancellationToken,
) -> Result<(LocalCluster, Arc<Dispatcher>)> {
    let cluster = LocalCluster::start(model, &LocalOptions::simple(workers, replicas), log_dir).await?;
    let ck = Arc::new(Checkpoint::open(model)?);
    let target = ControlTarget::Coordinator(cluster.coordinator.clone());
    let d = connect_dispatcher(&target, ck, "cpu", DispatcherConfig::default(), stop).await?;
    d.route_table(None).await.context("waiting for the first placement")?;
    Ok((cluster, d))
}

pub(crate) async fn forward(a: ForwardArgs) -> Result<()> {
    let wire = parse_wire(&a.wire)?;
    if !a.entry.is_empty() {
        return forward_entry(&a, wire).await;
    }
    let model =
        a.model.clone().ok_or_else(|| anyhow!("give --model DIR (or --entry HOST:PORT for a running cluster)"))?;
    let ck = Arc::new(Checkpoint::open(&model)?);
    let spec = ck.spec().clone();
    spec.check_moe_layer(a.layer)?;
    let (tokens, x, ids) = read_input(&a.input, spec.hidden)?;
    let inp = MoeInput { layer: a.layer, tokens, hidden_states: x, input_ids: ids };
    let out = match a.workers {
        None => LocalMoe::new(ck, Arc::new(CpuBackend::new())).forward(inp).await?,
        Some(n) => {
            if n == 0 {
                bail!("--workers must be at least 1");
            }
            let stop = CancellationToken::new();
            let logs = scratch("expertmesh-forward-")?;
            let (cluster, d) = cluster_dispatcher(&model, n, 1, logs.path(), stop.clone()).await?;
            let r = d.forward(inp, wire).await;
            stop.cancel();
            cluster.stop().await;
            r?
        }
    };
    write_output(&a.output, spec.hidden, &out)?;
    println!(
        "layer {}: {} tokens -> {} (output [{}, {}], top-{} indices and weights)",
        a.layer,
        tokens,
        a.output.display(),
        tokens,
        spec.hidden,
        spec.top_k
    );
    Ok(())
}

/// `forward --entry`: the layer through a running cluster's MoeLayer service, with failover
/// over the entry workers (Forward is idempotent).
async fn forward_entry(a: &ForwardArgs, wire: DType) -> Result<()> {
    use expertmesh_proto::v1::moe_layer_client::MoeLayerClient;
    use expertmesh_proto::v1::{DescribeRequest, ForwardRequest};
    use expertmesh_worker::client::MoeClient;
    use expertmesh_worker::wire::{dtype_to_proto, f32_tensor, i64_tensor, tensor_to_f32, tensor_to_i64};
    let timeout = Duration::from_millis(a.timeout_ms.max(1));
    let client = MoeClient::new(&a.entry, timeout, 256 << 20).map_err(|e| anyhow!("--entry: {e}"))?;
    // The model's shape, from the first entry that answers.
    let mut desc = None;
    for e in &a.entry {
        let ch =
            tonic::transport::Endpoint::from_shared(format!("http://{e}"))?.connect_timeout(Duration::from_secs(3));
        if let Ok(ch) = ch.connect().await {
            if let Ok(d) = MoeLayerClient::new(ch).describe(DescribeRequest {}).await {
                desc = Some(d.into_inner());
                break;
            }
        }
    }
    let desc = desc.ok_or_else(|| anyhow!("no entry worker of {:?} answered Describe", a.entry))?;
    let hidden = desc.hidden as usize;
    let (tokens, x, ids) = read_input(&a.input, hidden)?;
    let req = ForwardRequest {
        layer: a.layer as u32,
        hidden_states: Some(f32_tensor(&[tokens, hidden], &x)),
        input_ids: ids.as_ref().map(|v| i64_tensor(&[tokens], v)),
        wire_dtype: dtype_to_proto(wire),
    };
    let r = client.forward(req).await.map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?;
    let (output, _) = tensor_to_f32(r.output.as_ref().ok_or_else(|| anyhow!("answer without output"))?, "output")?;
    let (idx, ishape) =
        tensor_to_i64(r.topk_indices.as_ref().ok_or_else(|| anyhow!("answer without topk_indices"))?, "topk_indices")?;
    let (weights, _) =
        tensor_to_f32(r.topk_weights.as_ref().ok_or_else(|| anyhow!("answer without topk_weights"))?, "topk_weights")?;
    let k = ishape.get(1).copied().unwrap_or(0);
    let routing =
        expertmesh_core::gating::Routing { top_k: k, indices: idx.iter().map(|&v| v as u32).collect(), weights };
    write_output(&a.output, hidden, &MoeOutput { output, routing, epoch: r.epoch })?;
    println!(
        "layer {}: {tokens} tokens -> {} through the cluster (placement epoch {}; output [{tokens}, {hidden}], top-{k})",
        a.layer,
        a.output.display(),
        r.epoch
    );
    Ok(())
}

fn resolve_model(src: &ModelSource, scratch: &Path) -> Result<PathBuf> {
    if let Some(m) = &src.model {
        return Ok(m.clone());
    }
    let dir = scratch.join("model");
    let opts = GenOptions {
        preset: src.preset.clone(),
        overrides: PresetOverrides {
            layers: Some(src.layers),
            experts: Some(src.experts),
            hidden: Some(src.hidden),
            ffn: Some(src.ffn),
            top_k: Some(src.top_k),
            ..Default::default()
        },
        dtype: DType::BF16,
        seed: 1,
        max_bytes: 8 << 30,
    };
    generate(&dir, &opts)?;
    Ok(dir)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) async fn up(a: UpArgs) -> Result<()> {
    let wire = parse_wire(&a.wire)?;
    let work = scratch("expertmesh-up-")?;
    let model = resolve_model(&a.source, work.path())?;
    // Logs outlive the run (the generated model does not).
    let log_dir = a
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("expertmesh-up-logs-{}", std::process::id())));
    let stop = shutdown_on_signals();
    eprintln!("starting coordinator and {} workers (logs in {})", a.workers, log_dir.display());
    let (cluster, d) = cluster_dispatcher(&model, a.workers, a.replicas, &log_dir, stop.clone()).await?;
    let spec = d.spec().clone();
    let layers = spec.moe_layers();
    eprintln!(
        "cluster up: coordinator {}, workers {:?}; model {} ({} MoE layers x {} experts, top-{}, hidden {})",
        cluster.coordinator,
        cluster.workers,
        spec.model_type,
        layers.len(),
        spec.n_routed,
        spec.top_k,
        spec.hidden
    );
    let deadline = a.duration.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let lat: Arc<std::sync::Mutex<HashMap<usize, Vec<f64>>>> = Default::default();
    let tokens_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut drivers = Vec::new();
    for c in 0..a.concurrency.max(1) {
        let (d, layers, lat, tokens_done, errors, stop) =
            (d.clone(), layers.clone(), lat.clone(), tokens_done.clone(), errors.clone(), stop.clone());
        let batch = a.batch;
        drivers.push(tokio::spawn(async move {
            let mut i = c as u64;
            while !stop.is_cancelled() && deadline.is_none_or(|t| Instant::now() < t) {
                for &l in &layers {
                    let (x, ids) = random_batch(d.spec(), batch, i * 131 + l as u64);
                    let t = Instant::now();
                    let r = d
                        .forward(MoeInput { layer: l, tokens: batch, hidden_states: x, input_ids: Some(ids) }, wire)
                        .await;
                    match r {
                        Ok(_) => {
                            lat.lock().map(|mut m| m.entry(l).or_default().push(t.elapsed().as_secs_f64())).ok();
                            tokens_done.fetch_add(batch as u64, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::error!(layer = l, error = %e, "request failed");
                        }
                    }
                }
                i += a.concurrency as u64;
            }
        }));
    }
    let mut coord = connect_coordinator(&cluster.coordinator, Duration::from_secs(5)).await?;
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        let finished = stop.is_cancelled() || deadline.is_some_and(|t| Instant::now() >= t);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {},
            _ = stop.cancelled() => {},
        }
        let done = tokens_done.load(std::sync::atomic::Ordering::Relaxed);
        let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), done);
        let status = coord.cluster_status(ClusterStatusRequest {}).await.map(|r| r.into_inner()).ok();
        let mut s = String::new();
        if tty {
            s.push_str("\x1b[2J\x1b[H");
        }
        s.push_str(&format!(
            "ExpertMesh local cluster  t={:.0}s  epoch {}  {:.0} tokens/s  ({} tokens, {} errors)\n",
            start.elapsed().as_secs_f64(),
            status.as_ref().map(|s| s.current_epoch).unwrap_or(0),
            rate,
            done,
            errors.load(std::sync::atomic::Ordering::Relaxed)
        ));
        s.push_str("  layer   requests   p50 ms   p99 ms\n");
        if let Ok(m) = lat.lock() {
            for l in &layers {
                let mut v = m.get(l).cloned().unwrap_or_default();
                v.sort_by(f64::total_cmp);
                s.push_str(&format!(
                    "  {:>5} {:>10} {:>8.1} {:>8.1}\n",
                    l,
                    v.len(),
                    percentile(&v, 0.5) * 1e3,
                    percentile(&v, 0.99) * 1e3
                ));
            }
        }
        s.push_str("  worker        address               experts   rows computed\n");
        for w in status.map(|s| s.workers).unwrap_or_default() {
            let info = w.info.unwrap_or_default();
            s.push_str(&format!(
                "  {:<13} {:<21} {:>7} {:>17}\n",
                info.worker_id, info.address, w.experts_held, w.tokens_total
            ));
            if !w.error.is_empty() {
                s.push_str(&format!("      error: {}\n", w.error));
            }
        }
        print!("{s}");
        let _ = std::io::stdout().flush();
        if finished {
            break;
        }
    }
    stop.cancel();
    for d in drivers {
        let _ = d.await;
    }
    cluster.stop().await;
    let done = tokens_done.load(std::sync::atomic::Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "done: {done} tokens through {} MoE layers in {secs:.1} s ({:.0} tokens/s on average); logs in {}",
        layers.len(),
        done as f64 / secs,
        log_dir.display()
    );
    let errs = errors.load(std::sync::atomic::Ordering::Relaxed);
    if errs > 0 {
        bail!("{errs} requests failed; see the logs in {}", log_dir.display());
    }
    Ok(())
}

pub(crate) async fn status(a: StatusArgs) -> Result<()> {
    let mut c = connect_coordinator(&a.coordinator, Duration::from_secs(5)).await?;
    let s = c.cluster_status(ClusterStatusRequest {}).await?.into_inner();
    if a.json {
        let workers: Vec<_> = s
            .workers
            .iter()
            .map(|w| {
                let i = w.info.clone().unwrap_or_default();
                serde_json::json!({"worker_id": i.worker_id, "address": i.address, "node": i.node,
                    "experts_held": w.experts_held, "tokens_total": w.tokens_total, "ready_epoch": w.ready_epoch,
                    "heartbeat_age_s": w.heartbeat_age_s, "error": w.error, "draining": w.draining,
                    "verified": w.verified, "left_out": w.left_out})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"current_epoch": s.current_epoch, "pending_epoch": s.pending_epoch,
                "model_type": s.model_type, "moe_layers": s.moe_layers, "routed_experts": s.routed_experts,
                "leader": s.leader, "is_leader": s.is_leader, "coordinator": s.coordinator, "workers": workers})
        );
        return Ok(());
    }
    println!(
        "model {} ({} MoE layers x {} experts); placement epoch {} (pending {})",
        s.model_type, s.moe_layers, s.routed_experts, s.current_epoch, s.pending_epoch
    );
    println!(
        "coordinator {} ({}); leader {}",
        s.coordinator,
        if s.is_leader { "leading" } else { "standby" },
        if s.leader.is_empty() { "(none)" } else { &s.leader }
    );
    for w in s.workers {
        let i = w.info.unwrap_or_default();
        println!(
            "  {:<14} {:<22} node {:<12} experts {:>5}  tokens {:>10}  heartbeat {:.1}s ago",
            i.worker_id, i.address, i.node, w.experts_held, w.tokens_total, w.heartbeat_age_s
        );
        if w.draining {
            println!("      draining: its experts are moving to the other workers");
        }
        if !w.left_out.is_empty() {
            println!("      not placed: {}", w.left_out);
        }
        if !w.error.is_empty() {
            println!("      error: {}", w.error);
        }
    }
    Ok(())
}

pub(crate) async fn drain(a: DrainArgs) -> Result<()> {
    let mut c = connect_coordinator(&a.coordinator, Duration::from_secs(5)).await?;
    let r = c.drain(DrainRequest { worker_id: a.worker_id.clone() }).await?.into_inner();
    if !r.will_move {
        eprintln!(
            "warning: no other worker can take {}'s experts; it stays until another joins or it is stopped",
            a.worker_id
        );
    }
    if a.wait_s == 0 {
        println!("drain of {} requested", a.worker_id);
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.wait_s);
    loop {
        let s = c.cluster_status(ClusterStatusRequest {}).await?.into_inner();
        let present = s.workers.iter().any(|w| w.info.as_ref().is_some_and(|i| i.worker_id == a.worker_id));
        if !present {
            println!("{} drained and left; placement epoch {}", a.worker_id, s.current_epoch);
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} has not left after {} s; `expertmesh status` shows where it stands", a.worker_id, a.wait_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Timing {
    tokens_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn time_batches<F, Fut>(iters: usize, tokens: usize, mut f: F) -> Result<Timing>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    f(999).await?; // warm-up
    let mut lat = Vec::new();
    let t0 = Instant::now();
    for i in 0..iters.max(1) {
        let t = Instant::now();
        f(i as u64).await?;
        lat.push(t.elapsed().as_secs_f64());
    }
    let total = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok(Timing {
        tokens_per_s: (tokens * lat.len()) as f64 / total,
        p50_ms: percentile(&lat, 0.5) * 1e3,
        p99_ms: percentile(&lat, 0.99) * 1e3,
    })
}

pub(crate) async fn bench(a: BenchArgs) -> Result<()> {
    let wire = parse_wire(&a.wire)?;
    let work = scratch("expertmesh-bench-")?;
    if a.fault.is_some() && which("etcd").is_none() {
        bail!(
            "--fault runs a real etcd: install it with `apt-get install -y etcd-server` (or scripts/install-deps.sh)"
        );
    }
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let dir = work.path().join("model");
            // The fault benchmark runs many requests through recovery on a small machine: half
            // the width of the throughput benchmark's layer.
            let (hidden, ffn) = if a.fault.is_some() { (1024, 512) } else { (2048, 1024) };
            let opts = GenOptions {
                preset: "deepseek-v3".into(),
                overrides: PresetOverrides {
                    layers: Some(2),
                    experts: Some(64),
                    hidden: Some(hidden),
                    ffn: Some(ffn),
                    top_k: Some(6),
                    ..Default::default()
                },
                dtype: DType::BF16,
                seed: 3,
                max_bytes: 8 << 30,
            };
            eprintln!("generating the benchmark model in {}", dir.display());
            generate(&dir, &opts)?;
            dir
        }
    };
    if let Some(fault) = a.fault {
        return crate::fault_bench::fault_bench(&a, fault, &model, work.path()).await;
    }
    let ck = Arc::new(Checkpoint::open(&model)?);
    let spec = ck.spec().clone();
    let layer = *spec.moe_layers().first().ok_or_else(|| anyhow!("no MoE layer"))?;
    let backend = Arc::new(CpuBackend::new());
    eprintln!("measuring f32 GEMM peak");
    let peak = gemm_gflops(2048, 3);
    // Expert FFN rate at the row count one expert sees at the largest batch.
    let big = a.batches.iter().copied().max().unwrap_or(4096);
    let rows = (big * spec.top_k).div_ceil(spec.n_routed);
    let ffn = backend.load_ffn(ck.load_expert(layer, 0)?)?;
    let (x, _) = random_batch(&spec, rows, 5);
    let mut y = vec![0f32; x.len()];
    ffn.forward(&x, rows, &mut y)?;
    let t = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        ffn.forward(&x, rows, &mut y)?;
    }
    let ffn_gflops = 6.0 * (rows * spec.hidden * spec.moe_ffn) as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9;

    eprintln!("in-process baseline");
    let local = LocalMoe::new(ck.clone(), backend.clone());
    local.preload(layer).await?;
    let mut inproc = BTreeMap::new();
    for &b in &a.batches {
        let s = spec.clone();
        let t = time_batches(a.iters, b, |i| {
            let (x, ids) = random_batch(&s, b, 7 + i);
            let local = &local;
            async move {
                local.forward(MoeInput { layer, tokens: b, hidden_states: x, input_ids: Some(ids) }).await?;
                Ok(())
            }
        })
        .await?;
        inproc.insert(b, t);
    }
    drop(local);

    eprintln!("distributed: {} workers on loopback", a.workers);
    let stop = CancellationToken::new();
    let log_dir = a.log_dir.clone().unwrap_or_else(|| work.path().join("logs"));
    let (cluster, d) = cluster_dispatcher(&model, a.workers, 1, &log_dir, stop.clone()).await?;
    let mut results = Vec::new();
    for &b in &a.batches {
        let s = spec.clone();
        let before = (
            d.stats().bytes_sent.load(std::sync::atomic::Ordering::Relaxed),
            d.stats().bytes_received.load(std::sync::atomic::Ordering::Relaxed),
        );
        let dd = d.clone();
        let t = time_batches(a.iters, b, |i| {
            let (x, ids) = random_batch(&s, b, 7 + i);
            let d = dd.clone();
            async move {
                d.forward(MoeInput { layer, tokens: b, hidden_states: x, input_ids: Some(ids) }, wire).await?;
                Ok(())
            }
        })
        .await?;
        let sent = d.stats().bytes_sent.load(std::sync::atomic::Ordering::Relaxed) - before.0;
        let recv = d.stats().bytes_received.load(std::sync::atomic::Ordering::Relaxed) - before.1;
        let calls = (a.iters.max(1) + 1) as u64;
        let min = (b * spec.top_k * spec.hidden * wire.size() * 2) as f64;
        let wire_per_batch = (sent + recv) as f64 / calls as f64;
        let ip = &inproc[&b];
        results.push(serde_json::json!({
            "tokens_per_batch": b,
            "distributed": {"tokens_per_s": t.tokens_per_s, "p50_ms": t.p50_ms, "p99_ms": t.p99_ms},
            "in_process": {"tokens_per_s": ip.tokens_per_s, "p50_ms": ip.p50_ms, "p99_ms": ip.p99_ms},
            "throughput_ratio": t.tokens_per_s / ip.tokens_per_s,
            "wire_bytes_per_batch": wire_per_batch,
            "wire_min_bytes_per_batch": min,
            "wire_ratio": wire_per_batch / min,
        }));
    }
    stop.cancel();
    cluster.stop().await;
    let out = serde_json::json!({
        "benchmark": "moe_layer",
        "model": {"model_type": spec.model_type, "hidden": spec.hidden, "experts": spec.n_routed, "top_k": spec.top_k, "expert_ffn": spec.moe_ffn, "layer": layer},
        "workers": a.workers,
        "wire_dtype": wire.name(),
        "iters": a.iters,
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "gemm_f32_peak_gflops": peak,
        "expert_ffn": {"rows": rows, "gflops": ffn_gflops, "fraction_of_peak": ffn_gflops / peak},
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
