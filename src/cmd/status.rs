//! `expertmesh status`: a cluster's members, placement, leader and load.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use expertmesh_cluster::control::connect_coordinator;
use expertmesh_proto::v1::ClusterStatusRequest;

use crate::env;
use crate::shared;
use crate::tls::TlsArgs;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Coordinator address; several, comma-separated: the first that answers.
    #[arg(long, env = env::COORDINATOR, value_parser = shared::addresses)]
    pub(crate) coordinator: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

/// Seconds since `started_unix_ms` (0 when unknown).
fn uptime_s(started_unix_ms: u64) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64);
    match (started_unix_ms, now) {
        (0, _) | (_, Err(_)) => 0,
        (s, Ok(n)) => n.saturating_sub(s) / 1000,
    }
}

/// "3 s", "4 min 10 s", "2 h 5 min", "3 d 4 h".
fn fmt_age(s: u64) -> String {
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// "812.0 KiB", "1.50 GiB".
fn fmt_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub(crate) async fn run(a: StatusArgs) -> Result<()> {
    let tls = a.tls.load()?;
    let mut c = connect_coordinator(&a.coordinator, Duration::from_secs(5), tls.as_ref()).await?;
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
                    "verified": w.verified, "left_out": w.left_out, "resident_bytes": w.resident_bytes,
                    "rss_bytes": w.rss_bytes, "version": i.version, "uptime_s": uptime_s(i.started_unix_ms),
                    "loading": (w.load_total_bytes > 0).then(|| serde_json::json!({"done_bytes": w.load_done_bytes,
                        "total_bytes": w.load_total_bytes, "bytes_per_s": w.load_bytes_per_s})),
                    "expert_loads": w.expert_loads.iter().map(|e| serde_json::json!({"layer": e.layer, "expert": e.expert, "tokens": e.tokens})).collect::<Vec<_>>(),
                    "devices": i.devices.iter().map(|d| serde_json::json!({"kind": d.kind, "index": d.index,
                        "name": d.name, "tflops": d.tflops, "tflops_measured": d.tflops_measured,
                        "memory_offered_bytes": d.memory_bytes, "memory_total_bytes": d.memory_total_bytes}))
                        .collect::<Vec<_>>()})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"current_epoch": s.current_epoch, "pending_epoch": s.pending_epoch,
                "model_type": s.model_type, "moe_layers": s.moe_layers, "routed_experts": s.routed_experts,
                "leader": s.leader, "is_leader": s.is_leader, "coordinator": s.coordinator,
                "mutual_tls": s.mutual_tls, "refused_calls": s.refused_calls, "expect_workers": s.expect_workers,
                "pending_waits_for": s.pending_waits_for, "placement_blocked": s.placement_blocked,
                "placement_policy": s.placement_policy, "imbalance": s.imbalance, "rebalances": s.rebalances,
                "window_s": s.window_s, "window_tokens": s.window_loads.iter().fold(0u64, |a, e| a.saturating_add(e.tokens)),
                "workers": workers})
        );
        return Ok(());
    }
    let placement = match (s.current_epoch, s.pending_epoch) {
        (0, 0) if !s.placement_blocked.is_empty() => format!("cannot place the experts: {}", s.placement_blocked),
        (0, 0) => {
            format!("no placement yet: waiting for {} workers ({} registered)", s.expect_workers, s.workers.len())
        }
        (c, 0) => format!("placement epoch {c}"),
        (0, p) => format!("no placement committed yet; epoch {p} proposed"),
        (c, p) => format!("placement epoch {c}; epoch {p} proposed"),
    };
    println!("model {} ({} MoE layers x {} experts); {placement}", s.model_type, s.moe_layers, s.routed_experts);
    for w in &s.pending_waits_for {
        println!("  epoch {} waits for {w}", s.pending_epoch);
    }
    if s.current_epoch > 0 && !s.placement_blocked.is_empty() {
        println!("  the membership change cannot be placed: {}", s.placement_blocked);
    }
    if s.imbalance > 0.0 {
        println!(
            "load balance: imbalance {:.3} over the last {:.0} s ({} rows; {}; {} rebalances; `expertmesh placement show` for more)",
            s.imbalance,
            s.window_s,
            s.window_loads.iter().fold(0u64, |a, e| a.saturating_add(e.tokens)),
            if s.placement_policy.is_empty() { "policy as committed" } else { s.placement_policy.as_str() },
            s.rebalances
        );
    }
    println!(
        "coordinator {} ({}); leader {}",
        s.coordinator,
        if s.is_leader { "leading" } else { "standby" },
        if s.leader.is_empty() { "(none)" } else { &s.leader }
    );
    if s.mutual_tls {
        println!("mutual TLS: every call authenticated by certificate; {} refused so far", s.refused_calls);
    } else {
        println!(
            "UNAUTHENTICATED: the coordinator runs without TLS; anyone who can reach its port can register workers, read this and drain workers (--tls-cert, --tls-key, --tls-ca: docs/operations.md)"
        );
    }
    for w in s.workers {
        let i = w.info.unwrap_or_default();
        println!(
            "  {:<14} {:<22} node {:<12} experts {:>5} ({:>9} resident, process {:>9})  tokens {:>10}  heartbeat {:.1}s ago",
            i.worker_id,
            i.address,
            i.node,
            w.experts_held,
            fmt_bytes(w.resident_bytes),
            fmt_bytes(w.rss_bytes),
            w.tokens_total,
            w.heartbeat_age_s
        );
        println!(
            "      version {}, up {}",
            if i.version.is_empty() { "unknown" } else { &i.version },
            fmt_age(uptime_s(i.started_unix_ms))
        );
        if w.load_total_bytes > 0 {
            println!(
                "      loading {} {}",
                expertmesh_core::metrics::progress_bar(w.load_done_bytes, w.load_total_bytes, 24),
                expertmesh_core::metrics::progress_text(w.load_done_bytes, w.load_total_bytes, w.load_bytes_per_s)
            );
        }
        if !w.expert_loads.is_empty() {
            let mut hot = w.expert_loads.clone();
            hot.sort_by_key(|e| std::cmp::Reverse(e.tokens));
            let top: Vec<String> =
                hot.iter().take(5).map(|e| format!("L{}/E{} {}", e.layer, e.expert, e.tokens)).collect();
            println!("      busiest experts (rows): {}", top.join(", "));
        }
        for d in &i.devices {
            println!(
                "      {}:{} {:.3} TFLOP/s ({}), {} offered of {}; {}",
                d.kind,
                d.index,
                d.tflops,
                if d.tflops_measured { "measured" } else { "set by --tflops" },
                fmt_bytes(d.memory_bytes),
                fmt_bytes(d.memory_total_bytes),
                d.name
            );
        }
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
