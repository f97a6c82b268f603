//! `expertmesh coordinator`: the control plane.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use expertmesh_coordinator::CoordinatorConfig;
use expertmesh_dispatcher::Checkpoint;

use crate::env;
use crate::shared::{self, count, millis, shutdown_on_signals};
use crate::tls::ServerArgs;

#[derive(Debug, Args)]
pub(crate) struct CoordinatorArgs {
    /// Address the gRPC server binds (`0.0.0.0:7400` to serve other machines).
    #[arg(long, default_value = "127.0.0.1:7400", env = env::LISTEN)]
    pub(crate) listen: SocketAddr,
    /// Checkpoint directory of the model the cluster serves.
    #[arg(long, env = env::MODEL)]
    pub(crate) model: PathBuf,
    /// Wait for this many workers before the first placement.
    #[arg(long, default_value_t = 1, env = env::EXPECT_WORKERS, value_parser = count)]
    pub(crate) expect_workers: usize,
    /// Copies of every expert, on distinct workers.
    #[arg(long, default_value_t = 1, env = env::REPLICAS, value_parser = count)]
    pub(crate) replicas: usize,
    /// Lease TTL of workers registered through this coordinator, and of its leadership.
    #[arg(long, default_value_t = 10_000, env = env::LEASE_TTL_MS, value_parser = millis(300))]
    pub(crate) lease_ttl_ms: u64,
    /// Cluster name: the prefix of its keys in the store (several clusters can share one etcd).
    #[arg(long, default_value = "default", env = env::CLUSTER)]
    pub(crate) cluster: String,
    /// Where cluster state lives: `embedded` (in this process) or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, default_value = "embedded", env = env::STORE)]
    pub(crate) store: String,
    /// Address workers and other coordinators reach this one at (default: the bound address).
    #[arg(long, env = env::ADVERTISE, value_parser = shared::address)]
    pub(crate) advertise: Option<String>,
    /// A worker that does not report ready for a proposed placement within this is left out of
    /// the next plans for as long again, so it never blocks re-planning for the others.
    #[arg(long, default_value_t = 180_000, env = env::READY_TIMEOUT_MS, value_parser = millis(100))]
    pub(crate) ready_timeout_ms: u64,
    /// Extra expert replicas per layer, beyond --replicas copies of every expert: placement
    /// gives them to the experts with the most load per replica.
    #[arg(long, default_value_t = CoordinatorConfig::DEFAULT_REBALANCE.0, env = env::REDUNDANT_EXPERTS)]
    pub(crate) redundant_experts: usize,
    /// Rebalance the placement when its imbalance under the load of the last window (max over
    /// workers of load per throughput, over the ideal) passes this; 0: never.
    #[arg(long, default_value_t = CoordinatorConfig::DEFAULT_REBALANCE.1, env = env::REBALANCE_THRESHOLD)]
    pub(crate) rebalance_threshold: f64,
    /// The load window placement balances over, and the least time between two rebalances.
    #[arg(long, default_value_t = CoordinatorConfig::DEFAULT_REBALANCE.2.as_secs_f64(), env = env::REBALANCE_INTERVAL_S)]
    pub(crate) rebalance_interval_s: f64,
    /// Tokens the window must hold before a rebalance is considered.
    #[arg(long, default_value_t = CoordinatorConfig::DEFAULT_REBALANCE.3, env = env::REBALANCE_MIN_TOKENS)]
    pub(crate) rebalance_min_tokens: u64,
    /// Keep an expert on its worker when that worker is within this fraction of the best
    /// choice's load per throughput: higher moves fewer bytes per rebalance, lower balances
    /// better.
    #[arg(long, default_value_t = CoordinatorConfig::DEFAULT_REBALANCE.4, env = env::STICKINESS)]
    pub(crate) stickiness: f64,
    #[command(flatten)]
    pub(crate) server: ServerArgs,
}

pub(crate) async fn run(a: CoordinatorArgs) -> Result<()> {
    if !(a.rebalance_threshold == 0.0 || a.rebalance_threshold >= 1.0) || !a.rebalance_threshold.is_finite() {
        anyhow::bail!(
            "--rebalance-threshold {}: expected 0 (never) or an imbalance of at least 1.0 (perfect balance)",
            a.rebalance_threshold
        );
    }
    if !(a.rebalance_interval_s.is_finite() && a.rebalance_interval_s >= 0.1) {
        anyhow::bail!("--rebalance-interval-s {}: expected at least 0.1 seconds", a.rebalance_interval_s);
    }
    if !(a.stickiness.is_finite() && a.stickiness >= 0.0) {
        anyhow::bail!("--stickiness {}: expected a non-negative fraction (0.1: within 10%)", a.stickiness);
    }
    let tls = a.server.tls.load()?;
    let store_tls = a.server.etcd_tls.load(tls.as_ref())?;
    let ck = Checkpoint::open(&a.model).with_context(|| format!("opening model {}", a.model.display()))?;
    let model_dir = a.model.canonicalize()?.display().to_string();
    let spec = ck.spec().clone();
    // Backends hold the checkpoint's dtype: an expert takes its stored bytes (and FP8 scales).
    let first =
        *spec.moe_layers().first().ok_or_else(|| anyhow!("{}: the model has no MoE layer", a.model.display()))?;
    let expert_bytes = ck.expert_bytes(first)?;
    let cfg = CoordinatorConfig {
        cluster: a.cluster,
        model_dir,
        model_config_json: ck.config_text().to_string(),
        lease_ttl: Duration::from_millis(a.lease_ttl_ms),
        expect_workers: a.expect_workers,
        replicas: a.replicas,
        expert_bytes,
        advertise: a.advertise.unwrap_or_default(),
        ready_timeout: Duration::from_millis(a.ready_timeout_ms),
        tls,
        store_tls,
        metrics_listen: a.server.metrics_listen,
        redundant_experts: a.redundant_experts,
        rebalance_threshold: a.rebalance_threshold,
        rebalance_interval: Duration::from_secs_f64(a.rebalance_interval_s),
        rebalance_min_tokens: a.rebalance_min_tokens,
        stickiness: a.stickiness,
    };
    let listener = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding {}", a.listen))?;
    let ready = |addr| {
        println!("EXPERTMESH_COORDINATOR_READY addr={addr}");
        let _ = std::io::stdout().flush();
    };
    expertmesh_coordinator::serve(cfg, &a.store, listener, shutdown_on_signals(), ready).await?;
    Ok(())
}
