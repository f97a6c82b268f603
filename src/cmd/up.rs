//! `expertmesh up`: a local cluster with a demo workload and a live summary.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use expertmesh_cluster::control::connect_coordinator;
use expertmesh_dispatcher::moe::MoeInput;
use expertmesh_proto::v1::ClusterStatusRequest;

use crate::env;
use crate::local::{LocalOptions, WorkerMix};
use crate::shared::{
    check_replicas, cluster_dispatcher, count, parse_wire, percentile, random_batch, resolve_model, scratch, seconds,
    shutdown_on_signals, ModelSource,
};

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    pub(crate) source: ModelSource,
    /// Workers: a count of CPU workers, or devices by kind (`cpu:2,cuda:1`).
    #[arg(long, default_value = "4")]
    pub(crate) workers: WorkerMix,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_parser = seconds)]
    pub(crate) duration: Option<f64>,
    /// Tokens per request.
    #[arg(long, default_value_t = 256, value_parser = count)]
    pub(crate) batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 2, value_parser = count)]
    pub(crate) concurrency: usize,
    /// Activations dtype on the wire: bf16 or f32.
    #[arg(long, default_value = "bf16", env = env::WIRE_DTYPE)]
    pub(crate) wire: String,
    /// Copies of every expert, on distinct workers.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub(crate) replicas: usize,
    /// Compute threads of each worker (default: one per core; the workers share the cores).
    #[arg(long, value_parser = count)]
    pub(crate) worker_threads: Option<usize>,
    /// Bind each worker to CPUs of its own (`--cpus`: even blocks of this machine's CPUs, or
    /// one each in turn when there are more workers than CPUs).
    #[arg(long)]
    pub(crate) pin_workers: bool,
    /// Where process logs go (default: a temporary directory).
    #[arg(long)]
    pub(crate) log_dir: Option<PathBuf>,
    /// Mutual TLS on every link: certificates are generated (`expertmesh certs`) into
    /// LOG_DIR/certs, and the demo drives the cluster with the `client` one.
    #[arg(long)]
    pub(crate) tls: bool,
}

pub(crate) async fn run(a: UpArgs) -> Result<()> {
    let wire = parse_wire(&a.wire)?;
    check_replicas(a.replicas, a.workers.len())?;
    let work = scratch("expertmesh-up-")?;
    let model = resolve_model(&a.source, work.path())?;
    // Logs outlive the run (the generated model does not).
    let log_dir = a
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("expertmesh-up-logs-{}", std::process::id())));
    let stop = shutdown_on_signals();
    eprintln!("starting coordinator and {} (logs in {})", a.workers, log_dir.display());
    let mut opts = LocalOptions::simple(a.workers.clone(), a.replicas, a.worker_threads);
    opts.tls = a.tls;
    opts.pin_workers = a.pin_workers;
    let (cluster, d) = cluster_dispatcher(&model, &opts, &log_dir, stop.clone()).await?;
    let spec = d.spec().clone();
    let layers = spec.moe_layers();
    if cluster.tls.is_some() {
        eprintln!(
            "mutual TLS on every link; certificates in {} (status: expertmesh status --coordinator {} --tls-cert {d}/admin.pem --tls-key {d}/admin-key.pem --tls-ca {d}/ca.pem)",
            log_dir.join("certs").display(),
            cluster.coordinator,
            d = log_dir.join("certs").display()
        );
    }
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
    for c in 0..a.concurrency {
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
    let mut coord = connect_coordinator(&cluster.coordinator, Duration::from_secs(5), cluster.tls.as_ref()).await?;
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {},
            _ = stop.cancelled() => {},
        }
        let finished = stop.is_cancelled() || deadline.is_some_and(|t| Instant::now() >= t);
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
    // The traffic's time, not the cluster's shutdown.
    let secs = start.elapsed().as_secs_f64();
    cluster.stop().await;
    let done = tokens_done.load(std::sync::atomic::Ordering::Relaxed);
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
