//! `expertmesh bench --fault KIND`: steady traffic through a local production-shaped cluster (a
//! real etcd, two coordinators electing a leader, workers registered in etcd directly), one
//! fault, and what it did to the traffic: the interruption, throughput and p99 latency before,
//! during and after, failures, and the targets checked against the figures.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use expertmesh_cluster::control::{connect_coordinator, ControlTarget};
use expertmesh_core::ModelSpec;
use expertmesh_dispatcher::dispatcher::DispatcherConfig;
use expertmesh_dispatcher::moe::load_experts;
use expertmesh_dispatcher::moe::MoeInput;
use expertmesh_dispatcher::Checkpoint;
use expertmesh_kernels::cpu::CpuBackend;
use expertmesh_proto::v1::ClusterStatusRequest;
use expertmesh_worker::node::connect_dispatcher;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use crate::local::{LocalCluster, LocalEtcd, LocalOptions};
use crate::shared::{parse_wire, percentile, random_batch};

/// The faults `bench --fault` injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Fault {
    /// SIGKILL a worker.
    KillWorker,
    /// SIGSTOP a worker for --outage-s, then SIGCONT (a frozen process: its connections stay
    /// open and silent).
    StopWorker,
    /// SIGKILL the leading coordinator (a standby takes over).
    KillCoordinator,
    /// SIGKILL etcd for --outage-s, then start it again.
    StopEtcd,
}

/// One request of the traffic.
struct Sample {
    start: Instant,
    end: Instant,
    ok: bool,
    tokens: usize,
    /// It routed tokens to an expert the killed worker held.
    affected: bool,
}

/// Figures of the requests `pick` selects, over `secs` seconds.
fn window(samples: &[Sample], secs: f64, pick: impl Fn(&Sample) -> bool) -> serde_json::Value {
    let inside: Vec<&Sample> = samples.iter().filter(|s| pick(s)).collect();
    let mut lat: Vec<f64> = inside.iter().filter(|s| s.ok).map(|s| (s.end - s.start).as_secs_f64()).collect();
    lat.sort_by(f64::total_cmp);
    let tokens: usize = inside.iter().filter(|s| s.ok).map(|s| s.tokens).sum();
    serde_json::json!({
        "seconds": secs,
        "answered": lat.len(),
        "failed": inside.iter().filter(|s| !s.ok).count(),
        "tokens_per_s": if secs > 0.0 { tokens as f64 / secs } else { 0.0 },
        "p50_ms": (!lat.is_empty()).then(|| percentile(&lat, 0.5) * 1e3),
        "p99_ms": (!lat.is_empty()).then(|| percentile(&lat, 0.99) * 1e3),
    })
}

/// Seconds to load `n` experts of `layer` into this process, as a worker does.
fn load_seconds(ck: &Checkpoint, layer: usize, experts: &[u32]) -> Result<f64> {
    let backend = CpuBackend::new();
    let t = Instant::now();
    load_experts(ck, &backend, layer, experts, None, &[])?;
    Ok(t.elapsed().as_secs_f64())
}

pub(crate) async fn fault_bench(a: &BenchArgs, fault: Fault, model: &Path, work: &Path) -> Result<()> {
    if a.workers.len() < 2 {
        bail!("--fault needs at least 2 workers (--workers), so that someone survives");
    }
    let ck = Arc::new(Checkpoint::open(model)?);
    let spec: ModelSpec = ck.spec().clone();
    let layer = *spec.moe_layers().first().ok_or_else(|| anyhow!("no MoE layer"))?;
    let tokens = a.batches.first().copied().unwrap_or(256);
    let ttl = Duration::from_millis(a.lease_ttl_ms);
    let steady = Duration::from_secs_f64(a.steady_s);
    let log_dir = a.log_dir.clone().unwrap_or_else(|| work.join("logs"));
    std::fs::create_dir_all(&log_dir)?;

    eprintln!("starting etcd, 2 coordinators and {} (registered in etcd)", a.workers);
    let mut etcd = LocalEtcd::start(&log_dir).await?;
    let opts = LocalOptions {
        workers: a.workers.clone(),
        replicas: a.replicas,
        coordinators: 2,
        store: etcd.url(),
        lease_ttl_ms: a.lease_ttl_ms,
        worker_threads: a.worker_threads,
        tls: false,
        coordinator_args: Vec::new(),
        pin_workers: a.pin_workers,
    };
    let mut cluster = LocalCluster::start(model, &opts, &log_dir).await?;
    let stop = CancellationToken::new();
    let target = ControlTarget::Store { url: etcd.url(), cluster: "default".into(), lease_ttl: ttl, tls: None };
    let dcfg = DispatcherConfig { placement_wait: Duration::from_secs(120), ..Default::default() };
    let d = connect_dispatcher(&target, ck.clone(), "cpu", dcfg, stop.clone()).await?;
    let table = d.route_table(None).await.context("waiting for the first placement")?;

    // The victim (kill-worker) and the experts it holds in the measured layer.
    let victim = 1usize;
    let victim_id = format!("worker-{victim}");
    let vi = table.workers.iter().position(|w| w.worker_id == victim_id).map(|i| i as u32);
    let victim_experts: HashSet<u32> = table.layers[&(layer as u32)]
        .iter()
        .enumerate()
        .filter(|(_, r)| vi.is_some_and(|v| r.contains(&v)))
        .map(|(e, _)| e as u32)
        .collect();
    let sole: Vec<u32> = table.layers[&(layer as u32)]
        .iter()
        .enumerate()
        .filter(|(_, r)| r.len() == 1 && vi.is_some_and(|v| r.contains(&v)))
        .map(|(e, _)| e as u32)
        .collect();
    // What survivors must load when the victim dies: its experts without another replica, in
    // every MoE layer (measured here, on this machine, before the run).
    let reload_s = load_seconds(&ck, layer, &sole)? * spec.moe_layers().len() as f64;

    eprintln!("traffic: {} clients x {tokens} tokens on layer {layer}", a.concurrency);
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let inputs: Vec<_> = (0..8).map(|i| random_batch(&spec, tokens, 100 + i)).collect();
    let inputs = Arc::new(inputs);
    let mut clients = Vec::new();
    for c in 0..a.concurrency {
        let (d, samples, inputs, stop, victim_experts) =
            (d.clone(), samples.clone(), inputs.clone(), stop.clone(), victim_experts.clone());
        let wire = parse_wire(&a.wire)?;
        clients.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.is_cancelled() {
                let (x, ids) = inputs[i % inputs.len()].clone();
                i += 1;
                let start = Instant::now();
                let r = d.forward(MoeInput { layer, tokens, hidden_states: x, input_ids: Some(ids) }, wire).await;
                let end = Instant::now();
                let (ok, affected) = match &r {
                    Ok(out) => (true, out.routing.indices.iter().any(|e| victim_experts.contains(e))),
                    Err(e) => {
                        tracing::warn!(error = %e, "request failed");
                        (false, false)
                    }
                };
                if let Ok(mut s) = samples.lock() {
                    s.push(Sample { start, end, ok, tokens, affected });
                }
                if !ok {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    tokio::time::sleep(steady).await;

    let leader_of = |s: &expertmesh_proto::v1::ClusterStatusResponse| s.leader.clone();
    let coords = cluster.coordinators.join(",");
    let mut status = connect_coordinator(&coords, Duration::from_secs(5), None).await?;
    let before_status = status.cluster_status(ClusterStatusRequest {}).await?.into_inner();
    let epoch_before = before_status.current_epoch;
    let leader = leader_of(&before_status);

    // When the store drops the victim's key (lease revoked after a failed health check, or
    // expired): the detection part of recovery.
    let detected = Arc::new(Mutex::new(None::<Instant>));
    {
        let store = expertmesh_cluster::store::open_store(&etcd.url(), None).await?;
        let key = expertmesh_cluster::keys::ClusterKeys::new("default").worker(&victim_id);
        let mut w = store.watch(&key, 0).await?;
        let detected = detected.clone();
        tokio::spawn(async move {
            let _store = store;
            while let Some(ev) = w.recv().await {
                if ev.value.is_none() {
                    if let Ok(mut d) = detected.lock() {
                        d.get_or_insert(Instant::now());
                    }
                }
            }
        });
    }
    eprintln!("fault: {fault:?}");
    let t_fault = Instant::now();
    let t_recovered = match fault {
        Fault::KillWorker => {
            cluster.kill_worker(victim).await;
            d.route_table(Some(epoch_before)).await.context("waiting for the re-plan")?;
            Instant::now()
        }
        Fault::KillCoordinator => {
            let li = cluster.coordinators.iter().position(|c| *c == leader).context("no leader found")?;
            cluster.kill_coordinator(li).await;
            let standby = cluster.coordinators[1 - li].clone();
            let mut s = connect_coordinator(&standby, Duration::from_secs(5), None).await?;
            loop {
                if s.cluster_status(ClusterStatusRequest {}).await?.into_inner().is_leader {
                    break Instant::now();
                }
                if t_fault.elapsed() > Duration::from_secs(120) {
                    bail!("the standby did not take over within 120 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Fault::StopWorker => {
            cluster.signal_worker(victim, "-STOP")?;
            tokio::time::sleep(Duration::from_secs_f64(a.outage_s)).await;
            cluster.signal_worker(victim, "-CONT")?;
            Instant::now()
        }
        Fault::StopEtcd => {
            etcd.kill().await;
            tokio::time::sleep(Duration::from_secs_f64(a.outage_s)).await;
            etcd.restart().await?;
            Instant::now()
        }
    };
    tokio::time::sleep(steady).await;
    stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    let t_end = Instant::now();
    let after_status = connect_coordinator(&coords, Duration::from_secs(5), None)
        .await?
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    cluster.stop().await;
    etcd.kill().await;

    let samples = samples.lock().map_err(|_| anyhow!("poisoned"))?;
    let failed = samples.iter().filter(|s| !s.ok).count();
    // Interruption: for a killed worker, until the first correct answer that started after the
    // fault and used one of its experts; otherwise the longest gap between answers after it.
    let interruption = if fault == Fault::KillWorker {
        samples
            .iter()
            .filter(|s| s.ok && s.affected && s.start >= t_fault)
            .map(|s| s.end - t_fault)
            .min()
            .map(|d| d.as_secs_f64())
    } else {
        let mut ends: Vec<Instant> = samples.iter().filter(|s| s.ok && s.end >= t_fault).map(|s| s.end).collect();
        ends.sort();
        let mut prev = t_fault;
        let mut gap = Duration::ZERO;
        for e in ends {
            gap = gap.max(e - prev);
            prev = e;
        }
        Some(gap.as_secs_f64())
    };
    // Before: finished in the steady window before the fault. During: finished after the fault
    // but started before recovery (they overlapped it). After: started after recovery.
    let before = window(&samples, steady.as_secs_f64(), |s| s.end >= t_fault - steady && s.end < t_fault);
    let overlapped = |s: &Sample| s.end >= t_fault && s.start < t_recovered;
    let during_end = samples.iter().filter(|s| overlapped(s)).map(|s| s.end).max().unwrap_or(t_recovered);
    let during = window(&samples, (during_end.max(t_recovered) - t_fault).as_secs_f64(), overlapped);
    let after = window(&samples, (t_end - t_recovered).as_secs_f64(), |s| s.start >= t_recovered);
    let p99 = |w: &serde_json::Value| w["p99_ms"].as_f64();
    let p99_ratio = match (p99(&during), p99(&before)) {
        (Some(d), Some(b)) if b > 0.0 => Some(d / b),
        _ => None,
    };
    let recovery_s = (t_recovered - t_fault).as_secs_f64();
    let detected_s = detected.lock().ok().and_then(|d| *d).map(|d| d.saturating_duration_since(t_fault).as_secs_f64());
    let targets = match fault {
        Fault::KillWorker | Fault::StopWorker if a.replicas >= 2 => serde_json::json!({
            "no_request_fails": failed == 0,
            "p99_during_recovery_under_3x_steady": p99_ratio.map(|r| r < 3.0),
        }),
        Fault::KillWorker => serde_json::json!({
            "no_request_fails": failed == 0,
            "recovery_within_ttl_plus_load_s": ttl.as_secs_f64() + reload_s,
            "recovery_within_ttl_plus_load": recovery_s <= ttl.as_secs_f64() + reload_s,
        }),
        _ => serde_json::json!({ "no_request_fails": failed == 0 }),
    };
    let out = serde_json::json!({
        "benchmark": "fault",
        "fault": format!("{fault:?}"),
        "model": {"model_type": spec.model_type, "hidden": spec.hidden, "experts": spec.n_routed, "top_k": spec.top_k, "expert_ffn": spec.moe_ffn, "layer": layer},
        "workers": a.workers.len(),
        "replicas": a.replicas,
        "coordinators": 2,
        "store": "etcd",
        "lease_ttl_s": ttl.as_secs_f64(),
        "tokens_per_request": tokens,
        "clients": a.concurrency,
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)},
        "victim_experts_in_layer": victim_experts.len(),
        "victim_sole_owner_experts_in_layer": sole.len(),
        "reload_estimate_s": reload_s,
        "requests": samples.len(),
        "failed": failed,
        "recovery_s": recovery_s,
        "worker_removed_after_s": if fault == Fault::KillWorker { detected_s } else { None },
        "recovery_after_removal_s": if fault == Fault::KillWorker { detected_s.map(|d| recovery_s - d) } else { None },
        "interruption_s": interruption,
        "dispatcher": {
            "hedges": d.stats().hedges.load(std::sync::atomic::Ordering::Relaxed),
            "failed_sends": d.stats().failed_sends.load(std::sync::atomic::Ordering::Relaxed),
            "cancelled_sends": d.stats().cancelled_sends.load(std::sync::atomic::Ordering::Relaxed),
        },
        "epochs": {"before": epoch_before, "after": after_status.current_epoch},
        "leader": {"before": leader, "after": after_status.leader},
        "before": before,
        "during": during,
        "after": after,
        "p99_recovery_over_steady": p99_ratio,
        "targets": targets,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
