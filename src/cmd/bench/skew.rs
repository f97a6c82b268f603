//! `expertmesh bench --skew FRACTION`: a skewed workload through a local cluster before and
//! after the leader rebalances: tokens/s, p50/p99 latency and the imbalance of each phase.
//!
//! A FRACTION of the tokens are pulled toward a few hot experts (the hot experts' gate rows
//! plus noise: such a token picks every hot expert among its top-k), the rest are random. The
//! hot experts are ones the first plan put on one worker, unreplicated: the hot set has drifted
//! onto one device, the case a rebalance is for. The coordinator runs with redundant experts
//! and a rebalance threshold; the first phase runs on the first (uniform-load) plan, then the
//! leader sees the skew in its load window and proposes a balanced plan; the second phase runs
//! on that.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use expertmesh_cluster::control::{connect_coordinator, ControlTarget};
use expertmesh_core::rng::SplitMix64;
use expertmesh_dispatcher::dispatcher::DispatcherConfig;
use expertmesh_dispatcher::moe::MoeInput;
use expertmesh_dispatcher::Checkpoint;
use expertmesh_proto::v1::ClusterStatusRequest;
use expertmesh_worker::node::connect_dispatcher;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use crate::local::{LocalCluster, LocalOptions};
use crate::shared::{parse_wire, percentile};

/// Batches of `tokens` for `layer` whose tokens go to all `hot` experts with probability `frac`.
fn skewed_batches(
    ck: &Checkpoint,
    layer: usize,
    tokens: usize,
    hot: &[usize],
    frac: f64,
    n: usize,
) -> Result<Vec<(Vec<f32>, Vec<i64>)>> {
    let spec = ck.spec();
    let gate = ck.load_gate(layer)?.weight;
    let h = spec.hidden;
    Ok((0..n)
        .map(|i| {
            let mut r = SplitMix64::new(77 + i as u64);
            let mut x = Vec::with_capacity(tokens * h);
            for _ in 0..tokens {
                let pull = r.next_f64() < frac;
                let start = x.len();
                x.extend((0..h).map(|_| r.normal() as f32));
                if pull {
                    for &e in hot {
                        let g = &gate[e * h..][..h];
                        let norm = g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt().max(1e-12);
                        for (xi, &gv) in x[start..].iter_mut().zip(g) {
                            *xi += (6.0 * f64::from(gv) / norm) as f32;
                        }
                    }
                }
            }
            let ids = (0..tokens).map(|_| r.below(spec.vocab_size as u64) as i64).collect();
            (x, ids)
        })
        .collect())
}

/// `n` experts of a layer that its plan (expert -> replica workers) gives to one worker alone:
/// the worker holding the most unreplicated experts, its lowest ids first; other experts fill
/// in where it has fewer than `n`.
fn hot_on_one_worker(plan: Option<&Vec<Vec<u32>>>, n: usize) -> Vec<usize> {
    let Some(plan) = plan else { return (0..n).collect() };
    let mut alone: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (e, reps) in plan.iter().enumerate() {
        if let [w] = reps[..] {
            alone.entry(w).or_default().push(e);
        }
    }
    let mut hot =
        alone.into_values().max_by_key(|v| (v.len(), std::cmp::Reverse(v.first().copied()))).unwrap_or_default();
    hot.truncate(n);
    let fill: Vec<usize> = (0..plan.len()).filter(|e| !hot.contains(e)).take(n.saturating_sub(hot.len())).collect();
    hot.extend(fill);
    hot
}

/// (start, end, ok, epoch) of every request.
type Samples = Arc<Mutex<Vec<(Instant, Instant, bool, u64)>>>;

fn phase(samples: &[(Instant, Instant, bool, u64)], from: Instant, to: Instant, tokens: usize) -> serde_json::Value {
    let inside: Vec<_> = samples.iter().filter(|s| s.0 >= from && s.1 <= to).collect();
    let mut lat: Vec<f64> = inside.iter().filter(|s| s.2).map(|s| (s.1 - s.0).as_secs_f64()).collect();
    lat.sort_by(f64::total_cmp);
    let secs = (to - from).as_secs_f64();
    serde_json::json!({
        "seconds": secs,
        "answered": lat.len(),
        "failed": inside.iter().filter(|s| !s.2).count(),
        "tokens_per_s": if secs > 0.0 { (lat.len() * tokens) as f64 / secs } else { 0.0 },
        "p50_ms": (!lat.is_empty()).then(|| percentile(&lat, 0.5) * 1e3),
        "p99_ms": (!lat.is_empty()).then(|| percentile(&lat, 0.99) * 1e3),
    })
}

pub(crate) async fn skew_bench(a: &BenchArgs, frac: f64, model: &Path, work: &Path) -> Result<()> {
    let ck = Arc::new(Checkpoint::open(model)?);
    let spec = ck.spec().clone();
    let layers = spec.moe_layers();
    let tokens = a.batches.first().copied().unwrap_or(256);
    let steady = Duration::from_secs_f64(a.steady_s);
    let log_dir = a.log_dir.clone().unwrap_or_else(|| work.join("logs"));
    std::fs::create_dir_all(&log_dir)?;
    let redundant = (spec.n_routed / 8).max(1);
    let n_hot = (spec.n_routed / 16).max(2);
    // The first rebalance may come once the window is 2 x steady old: the first phase runs on
    // the uniform plan.
    let interval = 2.0 * a.steady_s;
    let mut opts = LocalOptions::simple(a.workers.clone(), 1, a.worker_threads);
    opts.pin_workers = a.pin_workers;
    opts.coordinator_args = [
        "--redundant-experts",
        &redundant.to_string(),
        "--rebalance-threshold",
        "1.1",
        "--rebalance-interval-s",
        &interval.to_string(),
        "--rebalance-min-tokens",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    eprintln!("starting a coordinator and {} ({redundant} redundant experts per layer)", a.workers);
    let cluster = LocalCluster::start(model, &opts, &log_dir).await?;
    let stop = CancellationToken::new();
    let coordinator = cluster.coordinators[0].clone();
    let target = ControlTarget::Coordinator { addrs: coordinator.clone(), tls: None };
    let dcfg = DispatcherConfig { placement_wait: Duration::from_secs(120), ..Default::default() };
    let d = connect_dispatcher(&target, ck.clone(), "cpu", dcfg, stop.clone()).await?;
    let first = d.route_table(None).await.context("waiting for the first placement")?;
    let hot: Vec<Vec<usize>> =
        layers.iter().map(|&l| hot_on_one_worker(first.layers.get(&(l as u32)), n_hot)).collect();
    let batches: Vec<Vec<(Vec<f32>, Vec<i64>)>> =
        layers.iter().zip(&hot).map(|(&l, hot)| skewed_batches(&ck, l, tokens, hot, frac, 8)).collect::<Result<_>>()?;
    let batches = Arc::new(batches);
    eprintln!(
        "traffic: {} clients x {tokens} tokens over {} layers, {:.0}% pulled to experts {hot:?} (per layer)",
        a.concurrency,
        layers.len(),
        frac * 100.0
    );
    let samples: Samples = Arc::new(Mutex::new(Vec::new()));
    let wire = parse_wire(&a.wire)?;
    let mut clients = Vec::new();
    for c in 0..a.concurrency {
        let (d, samples, batches, stop, layers) =
            (d.clone(), samples.clone(), batches.clone(), stop.clone(), layers.clone());
        clients.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.is_cancelled() {
                let li = i % layers.len();
                let (x, ids) = batches[li][(i / layers.len()) % batches[li].len()].clone();
                i += 1;
                let start = Instant::now();
                let r = d
                    .forward(MoeInput { layer: layers[li], tokens, hidden_states: x, input_ids: Some(ids) }, wire)
                    .await;
                let (ok, epoch) = match &r {
                    Ok(out) => (true, out.epoch),
                    Err(e) => {
                        tracing::warn!(error = %e, "request failed");
                        (false, 0)
                    }
                };
                if let Ok(mut s) = samples.lock() {
                    s.push((start, Instant::now(), ok, epoch));
                }
            }
        }));
    }
    let mut status = connect_coordinator(&coordinator, Duration::from_secs(5), None).await?;
    // Phase 1: the first plan (balanced for uniform load).
    let t0 = Instant::now();
    tokio::time::sleep(steady).await;
    let t1 = Instant::now();
    let s1 = status.cluster_status(ClusterStatusRequest {}).await?.into_inner();
    // The rebalance: wait for it to commit.
    let deadline = Instant::now() + Duration::from_secs_f64(interval + 120.0);
    let committed_at = loop {
        let s = status.cluster_status(ClusterStatusRequest {}).await?.into_inner();
        if s.rebalances >= 1 && s.pending_epoch == 0 && s.current_epoch > s1.current_epoch {
            break Instant::now();
        }
        if Instant::now() > deadline {
            stop.cancel();
            bail!("no rebalance committed within {:.0} s (imbalance {:.3})", interval + 120.0, s.imbalance);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Phase 2: the balanced plan (the window then holds only its traffic).
    tokio::time::sleep(Duration::from_secs_f64(interval).max(steady)).await;
    let t2 = Instant::now();
    tokio::time::sleep(steady).await;
    let t3 = Instant::now();
    let s2 = status.cluster_status(ClusterStatusRequest {}).await?.into_inner();
    stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    let all = samples.lock().map_err(|_| anyhow!("samples poisoned"))?.clone();
    let before = phase(&all, t0, t1, tokens);
    let after = phase(&all, t2, t3, tokens);
    let ratio =
        after["tokens_per_s"].as_f64().unwrap_or(0.0) / before["tokens_per_s"].as_f64().unwrap_or(1.0).max(1e-9);
    let failed = all.iter().filter(|s| !s.2).count();
    println!(
        "{}",
        serde_json::json!({
            "bench": "rebalance",
            "workers": a.workers.to_string(),
            "pinned_workers": a.pin_workers,
            "tokens": tokens,
            "concurrency": a.concurrency,
            "skew": frac,
            "hot_experts": hot,
            "redundant_experts": redundant,
            "before": before,
            "after": after,
            "imbalance_before": s1.imbalance,
            "imbalance_after": s2.imbalance,
            "tokens_per_s_after_over_before": ratio,
            "rebalance_committed_after_s": (committed_at - t1).as_secs_f64(),
            "epochs": [s1.current_epoch, s2.current_epoch],
            "requests": all.len(),
            "failed": failed,
        })
    );
    cluster.stop().await;
    if failed > 0 {
        bail!("{failed} requests failed across the rebalance");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_set_is_taken_from_one_workers_unreplicated_experts() {
        // Experts 0..8 on workers 0,1,0,1,...; expert 2 also on worker 1; expert 5 on 0 and 1.
        let mut plan: Vec<Vec<u32>> = (0..8).map(|e| vec![e % 2]).collect();
        plan[2].push(1);
        plan[5].push(0);
        // Worker 0 alone holds 0, 4, 6; worker 1 alone holds 1, 3, 7: a tie goes to the lower ids.
        assert_eq!(hot_on_one_worker(Some(&plan), 2), vec![0, 4]);
        assert_eq!(hot_on_one_worker(Some(&plan), 3), vec![0, 4, 6]);
        assert_eq!(hot_on_one_worker(Some(&plan), 5), vec![0, 4, 6, 1, 2], "others fill in");
        assert_eq!(hot_on_one_worker(None, 3), vec![0, 1, 2]);
    }
}
