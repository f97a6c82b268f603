//! `expertmesh worker`: a process that holds and computes experts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use expertmesh_cluster::control::ControlTarget;
use expertmesh_dispatcher::dispatcher::DispatcherConfig;
use expertmesh_worker::limits::Limits;
use expertmesh_worker::node::{run_worker, StopSignals, WorkerConfig};
use expertmesh_worker::service::AdmissionConfig;

use crate::env;
use crate::shared::{self, count, millis};
use crate::tls::ServerArgs;

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Coordinator address (host:port). Not needed with `--store etcd://...`.
    #[arg(long, env = env::COORDINATOR, required_unless_present = "store", value_parser = shared::addresses)]
    pub(crate) coordinator: Option<String>,
    /// Register in etcd directly (`etcd://HOST:PORT[,HOST:PORT...]`) instead of through a
    /// coordinator: the worker keeps serving and following placement while coordinators are down.
    #[arg(long, env = env::STORE)]
    pub(crate) store: Option<String>,
    /// Cluster name: the prefix of its keys in the store (with --store).
    #[arg(long, default_value = "default", env = env::CLUSTER)]
    pub(crate) cluster: String,
    /// TTL of the worker's lease in the store (with `--store`; through a coordinator, the
    /// coordinator's TTL applies).
    #[arg(long, default_value_t = 10_000, env = env::LEASE_TTL_MS, value_parser = millis(300))]
    pub(crate) lease_ttl_ms: u64,
    /// On SIGTERM, how long to wait for the experts to move away before leaving anyway.
    #[arg(long, default_value_t = 25_000, env = env::DRAIN_TIMEOUT_MS)]
    pub(crate) drain_timeout_ms: u64,
    /// Address the gRPC server binds (`0.0.0.0:7500` to serve other machines; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0", env = env::LISTEN)]
    pub(crate) listen: SocketAddr,
    /// Address other processes reach this worker at (default: the bound address).
    #[arg(long, env = env::ADVERTISE, value_parser = shared::address)]
    pub(crate) advertise: Option<String>,
    /// Worker id (default: worker-<pid>).
    #[arg(long, env = env::WORKER_ID)]
    pub(crate) id: Option<String>,
    /// Machine name, for spreading replicas (default: the hostname).
    #[arg(long, env = env::NODE)]
    pub(crate) node: Option<String>,
    /// cpu, or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu", env = env::DEVICE)]
    pub(crate) device: String,
    /// Throughput placement weights this worker by, TFLOP/s (default: measured at start by a
    /// short bf16 expert-FFN probe on the worker's backend).
    #[arg(long, env = env::TFLOPS)]
    pub(crate) tflops: Option<f64>,
    /// Checkpoint directory (default: the path the coordinator serves).
    #[arg(long, env = env::MODEL)]
    pub(crate) model: Option<PathBuf>,
    /// Memory offered for expert weights, GiB (default: what the device has free at start:
    /// MemAvailable on a CPU, bounded by a container's memory limit; free device memory on a GPU).
    #[arg(long, env = env::MEMORY_GIB)]
    pub(crate) memory_gib: Option<f64>,
    /// Largest gRPC message either way, MiB (and so the largest chunk of rows).
    #[arg(long, default_value_t = 64, env = env::MAX_MESSAGE_MIB, value_parser = count)]
    pub(crate) max_message_mib: usize,
    /// How long rows with no live owner wait for a (newer) committed placement before the
    /// request fails UNAVAILABLE.
    #[arg(long, default_value_t = 20_000, env = env::PLACEMENT_WAIT_MS)]
    pub(crate) placement_wait_ms: u64,
    /// The longest a destination may stay silent before its stream is given up and it is
    /// reported (rows with a live replica are hedged much sooner, after a budget learned from
    /// the destination's own answers).
    #[arg(long, default_value_t = 5_000, env = env::RPC_TIMEOUT_MS, value_parser = millis(10))]
    pub(crate) rpc_timeout_ms: u64,
    /// Deadline of a MoeLayer.Forward whose caller sent no `grpc-timeout`.
    #[arg(long, default_value_t = 30_000, env = env::REQUEST_TIMEOUT_MS, value_parser = millis(1))]
    pub(crate) request_timeout_ms: u64,
    /// Never hedge a silent destination's rows sooner than this after its last answer.
    #[arg(long, default_value_t = 20, env = env::HEDGE_MIN_MS)]
    pub(crate) hedge_min_ms: u64,
    /// Most tokens in one MoeLayer.Forward; a Compute stream carries at most this x top-k rows.
    #[arg(long, default_value_t = 65_536, env = env::MAX_BATCH_TOKENS, value_parser = count)]
    pub(crate) max_batch_tokens: usize,
    /// Most chunks in one ExpertService.Compute stream.
    #[arg(long, default_value_t = 65_536, env = env::MAX_STREAM_CHUNKS, value_parser = count)]
    pub(crate) max_stream_chunks: usize,
    /// Budget of ExpertService activation bytes in flight (decoded, computed, encoded).
    #[arg(long, default_value_t = 1024, env = env::MAX_INFLIGHT_MIB, value_parser = count)]
    pub(crate) max_inflight_mib: usize,
    /// Budget of MoeLayer.Forward bytes in flight on this entry worker.
    #[arg(long, default_value_t = 2048, env = env::MAX_FORWARD_INFLIGHT_MIB, value_parser = count)]
    pub(crate) max_forward_inflight_mib: usize,
    /// Concurrent streams and calls per peer connection.
    #[arg(long, default_value_t = 64, env = env::MAX_STREAMS_PER_PEER, value_parser = count)]
    pub(crate) max_streams_per_peer: usize,
    /// Open connections; more are closed at once.
    #[arg(long, default_value_t = 1024, env = env::MAX_CONNECTIONS, value_parser = count)]
    pub(crate) max_connections: usize,
    /// Open connections from one IP address; more are closed at once.
    #[arg(long, default_value_t = 256, env = env::MAX_CONNECTIONS_PER_IP, value_parser = count)]
    pub(crate) max_connections_per_ip: usize,
    /// How long a request waits for room under a budget before RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1_000, env = env::ADMISSION_WAIT_MS)]
    pub(crate) admission_wait_ms: u64,
    /// A peer that does not read its answers for this long loses its connection.
    #[arg(long, default_value_t = 10_000, env = env::STALL_TIMEOUT_MS, value_parser = millis(100))]
    pub(crate) stall_timeout_ms: u64,
    /// A Compute stream whose peer sends nothing for this long is closed.
    #[arg(long, default_value_t = 30_000, env = env::STREAM_IDLE_TIMEOUT_MS, value_parser = millis(100))]
    pub(crate) stream_idle_timeout_ms: u64,
    /// How long a starting worker keeps trying to reach its coordinator (or store) before it
    /// exits non-zero saying why; once registered it serves on through outages.
    #[arg(long, default_value_t = 30_000, env = env::CONTROL_WAIT_MS)]
    pub(crate) control_wait_ms: u64,
    #[command(flatten)]
    pub(crate) server: ServerArgs,
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

pub(crate) async fn run(a: WorkerArgs) -> Result<()> {
    let id = a.id.unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let node = a.node.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
    });
    let memory_bytes = a.memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64);
    if let Some(t) = a.tflops {
        if !(t.is_finite() && t > 0.0 && t <= 1e6) {
            bail!("--tflops {t}: expected a positive number of TFLOP/s up to 1e6 (or leave it out to measure)");
        }
    }
    let tls = a.server.tls.load()?;
    let control = match (a.store, a.coordinator) {
        (Some(url), _) if url != "embedded" => ControlTarget::Store {
            url,
            cluster: a.cluster,
            lease_ttl: Duration::from_millis(a.lease_ttl_ms),
            tls: a.server.etcd_tls.load(tls.as_ref())?,
        },
        (_, Some(c)) => ControlTarget::Coordinator { addrs: c, tls: tls.clone() },
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
        tflops: a.tflops,
        admission: AdmissionConfig {
            limits: Limits {
                max_message_bytes: a.max_message_mib << 20,
                max_batch_tokens: a.max_batch_tokens,
                max_stream_chunks: a.max_stream_chunks,
            },
            compute_budget_bytes: (a.max_inflight_mib as u64) << 20,
            forward_budget_bytes: (a.max_forward_inflight_mib as u64) << 20,
            max_streams_per_peer: a.max_streams_per_peer,
            max_connections: a.max_connections,
            max_connections_per_ip: a.max_connections_per_ip,
            admission_wait: Duration::from_millis(a.admission_wait_ms),
            stall_timeout: Duration::from_millis(a.stall_timeout_ms),
            stream_idle_timeout: Duration::from_millis(a.stream_idle_timeout_ms),
        },
        dispatcher: DispatcherConfig {
            max_message_bytes: a.max_message_mib << 20,
            placement_wait: Duration::from_millis(a.placement_wait_ms),
            rpc_timeout: Duration::from_millis(a.rpc_timeout_ms),
            request_timeout: Duration::from_millis(a.request_timeout_ms),
            hedge_min: Duration::from_millis(a.hedge_min_ms),
            tls: tls.clone(),
            ..Default::default()
        },
        drain_timeout: Duration::from_millis(a.drain_timeout_ms),
        tls,
        metrics_listen: a.server.metrics_listen,
        control_wait: Duration::from_millis(a.control_wait_ms),
    };
    run_worker(cfg, worker_signals()).await?;
    Ok(())
}
