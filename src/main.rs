//! `expertmesh`: one binary for every role. Parses flags and hands off to the crates.

mod commands;
mod env;
mod fault_bench;
mod local;
mod plan;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "expertmesh", version, about = "Distributed expert-parallel runtime for Mixture-of-Experts layers")]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info`, `expertmesh_worker=debug`.
    #[arg(long, global = true, env = env::LOG)]
    log: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, default_value = "text", env = env::LOG_FORMAT)]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a local cluster (coordinator + N workers on loopback) and drive traffic through
    /// every MoE layer, with a live summary, until stopped or --duration passes.
    Up(UpArgs),
    /// Run the coordinator (control plane).
    Coordinator(CoordinatorArgs),
    /// Run a worker that holds and computes experts.
    Worker(WorkerArgs),
    /// Run one MoE layer on inputs from a safetensors file.
    Forward(ForwardArgs),
    /// Write a synthetic model in the upstream checkpoint layout.
    GenModel(GenModelArgs),
    /// Write random inputs (hidden_states, input_ids) for `forward`.
    GenInput(GenInputArgs),
    /// Benchmark the distributed layer against the same layer in one process; prints JSON.
    Bench(BenchArgs),
    /// Show a cluster's members, placement epoch, leader and load.
    Status(StatusArgs),
    /// Move a worker's experts to the others, then let it leave (as SIGTERM on the worker does).
    Drain(DrainArgs),
    /// Size a cluster for a model and a workload: memory per device, placement, traffic,
    /// roofline step time and tokens/s; or search for the smallest inventory (docs/planner.md).
    Plan(plan::PlanArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ModelSource {
    /// Checkpoint directory (config.json + safetensors). Default: a synthetic model.
    #[arg(long, env = env::MODEL)]
    pub(crate) model: Option<PathBuf>,
    /// Preset for the synthetic model when --model is not given.
    #[arg(long, default_value = "deepseek-v3")]
    pub(crate) preset: String,
    /// Layers of the synthetic model (DeepSeek V3 keeps its first 3 dense: 6 gives 3 MoE layers).
    #[arg(long, default_value_t = 6)]
    pub(crate) layers: usize,
    #[arg(long, default_value_t = 32)]
    pub(crate) experts: usize,
    #[arg(long, default_value_t = 512)]
    pub(crate) hidden: usize,
    #[arg(long, default_value_t = 256)]
    pub(crate) ffn: usize,
    #[arg(long, default_value_t = 6)]
    pub(crate) top_k: usize,
}

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    pub(crate) source: ModelSource,
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: usize,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Tokens per request.
    #[arg(long, default_value_t = 256)]
    pub(crate) batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 2)]
    pub(crate) concurrency: usize,
    /// Activations dtype on the wire: bf16 or f32.
    #[arg(long, default_value = "bf16", env = env::WIRE_DTYPE)]
    pub(crate) wire: String,
    #[arg(long, default_value_t = 1)]
    pub(crate) replicas: usize,
    /// Where process logs go (default: a temporary directory).
    #[arg(long)]
    pub(crate) log_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CoordinatorArgs {
    #[arg(long, default_value = "127.0.0.1:7400", env = env::LISTEN)]
    pub(crate) listen: SocketAddr,
    /// Checkpoint directory of the model the cluster serves.
    #[arg(long, env = env::MODEL)]
    pub(crate) model: PathBuf,
    /// Wait for this many workers before the first placement.
    #[arg(long, default_value_t = 1, env = env::EXPECT_WORKERS)]
    pub(crate) expect_workers: usize,
    /// Copies of every expert, on distinct workers.
    #[arg(long, default_value_t = 1, env = env::REPLICAS)]
    pub(crate) replicas: usize,
    #[arg(long, default_value_t = 10_000, env = env::LEASE_TTL_MS)]
    pub(crate) lease_ttl_ms: u64,
    #[arg(long, default_value = "default", env = env::CLUSTER)]
    pub(crate) cluster: String,
    /// Where cluster state lives: `embedded` (in this process) or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, default_value = "embedded", env = env::STORE)]
    pub(crate) store: String,
    /// Address workers and other coordinators reach this one at (default: the bound address).
    #[arg(long, env = env::ADVERTISE)]
    pub(crate) advertise: Option<String>,
    /// A worker that does not report ready for a proposed placement within this is left out of
    /// the next plans for as long again, so it never blocks re-planning for the others.
    #[arg(long, default_value_t = 180_000, env = env::READY_TIMEOUT_MS)]
    pub(crate) ready_timeout_ms: u64,
}

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Coordinator address (host:port). Not needed with `--store etcd://...`.
    #[arg(long, env = env::COORDINATOR, required_unless_present = "store")]
    pub(crate) coordinator: Option<String>,
    /// Register in etcd directly (`etcd://HOST:PORT[,HOST:PORT...]`) instead of through a
    /// coordinator: the worker keeps serving and following placement while coordinators are down.
    #[arg(long, env = env::STORE)]
    pub(crate) store: Option<String>,
    #[arg(long, default_value = "default", env = env::CLUSTER)]
    pub(crate) cluster: String,
    /// TTL of the worker's lease in the store (with `--store`; through a coordinator, the
    /// coordinator's TTL applies).
    #[arg(long, default_value_t = 10_000, env = env::LEASE_TTL_MS)]
    pub(crate) lease_ttl_ms: u64,
    /// On SIGTERM, how long to wait for the experts to move away before leaving anyway.
    #[arg(long, default_value_t = 25_000, env = env::DRAIN_TIMEOUT_MS)]
    pub(crate) drain_timeout_ms: u64,
    #[arg(long, default_value = "127.0.0.1:0", env = env::LISTEN)]
    pub(crate) listen: SocketAddr,
    /// Address other processes reach this worker at (default: the bound address).
    #[arg(long, env = env::ADVERTISE)]
    pub(crate) advertise: Option<String>,
    /// Worker id (default: worker-<pid>).
    #[arg(long, env = env::WORKER_ID)]
    pub(crate) id: Option<String>,
    /// Machine name, for spreading replicas (default: the hostname).
    #[arg(long, env = env::NODE)]
    pub(crate) node: Option<String>,
    /// cpu (cuda:N and npu:N are not in this build yet).
    #[arg(long, default_value = "cpu", env = env::DEVICE)]
    pub(crate) device: String,
    /// Checkpoint directory (default: the path the coordinator serves).
    #[arg(long, env = env::MODEL)]
    pub(crate) model: Option<PathBuf>,
    /// Memory offered for expert weights, GiB (default: the machine's available memory).
    #[arg(long, env = env::MEMORY_GIB)]
    pub(crate) memory_gib: Option<f64>,
    #[arg(long, default_value_t = 64, env = env::MAX_MESSAGE_MIB)]
    pub(crate) max_message_mib: usize,
    /// How long rows with no live owner wait for a (newer) committed placement before the
    /// request fails UNAVAILABLE.
    #[arg(long, default_value_t = 20_000, env = env::PLACEMENT_WAIT_MS)]
    pub(crate) placement_wait_ms: u64,
    /// The longest a destination may stay silent before its stream is given up and it is
    /// reported (rows with a live replica are hedged much sooner, after a budget learned from
    /// the destination's own answers).
    #[arg(long, default_value_t = 5_000, env = env::RPC_TIMEOUT_MS)]
    pub(crate) rpc_timeout_ms: u64,
    /// Deadline of a MoeLayer.Forward whose caller sent no `grpc-timeout`.
    #[arg(long, default_value_t = 30_000, env = env::REQUEST_TIMEOUT_MS)]
    pub(crate) request_timeout_ms: u64,
    /// Never hedge a silent destination's rows sooner than this after its last answer.
    #[arg(long, default_value_t = 20, env = env::HEDGE_MIN_MS)]
    pub(crate) hedge_min_ms: u64,
    /// Most tokens in one MoeLayer.Forward; a Compute stream carries at most this x top-k rows.
    #[arg(long, default_value_t = 65_536, env = env::MAX_BATCH_TOKENS)]
    pub(crate) max_batch_tokens: usize,
    /// Most chunks in one ExpertService.Compute stream.
    #[arg(long, default_value_t = 65_536, env = env::MAX_STREAM_CHUNKS)]
    pub(crate) max_stream_chunks: usize,
    /// Budget of ExpertService activation bytes in flight (decoded, computed, encoded).
    #[arg(long, default_value_t = 1024, env = env::MAX_INFLIGHT_MIB)]
    pub(crate) max_inflight_mib: u64,
    /// Budget of MoeLayer.Forward bytes in flight on this entry worker.
    #[arg(long, default_value_t = 2048, env = env::MAX_FORWARD_INFLIGHT_MIB)]
    pub(crate) max_forward_inflight_mib: u64,
    /// Concurrent streams and calls per peer connection.
    #[arg(long, default_value_t = 64, env = env::MAX_STREAMS_PER_PEER)]
    pub(crate) max_streams_per_peer: usize,
    /// Open connections; more are closed at once.
    #[arg(long, default_value_t = 1024, env = env::MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,
    /// How long a request waits for room under a budget before RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1_000, env = env::ADMISSION_WAIT_MS)]
    pub(crate) admission_wait_ms: u64,
    /// A peer that does not read its answers for this long loses its connection.
    #[arg(long, default_value_t = 10_000, env = env::STALL_TIMEOUT_MS)]
    pub(crate) stall_timeout_ms: u64,
}

#[derive(Debug, Args)]
pub(crate) struct ForwardArgs {
    /// Checkpoint directory (not needed with --entry).
    #[arg(long, env = env::MODEL, required_unless_present = "entry")]
    pub(crate) model: Option<PathBuf>,
    /// The model's own layer index.
    #[arg(long)]
    pub(crate) layer: usize,
    /// safetensors with `hidden_states` (f32 [T, hidden]) and, for hash layers, `input_ids` (i64 [T]).
    #[arg(long)]
    pub(crate) input: PathBuf,
    /// safetensors to write: `output`, `topk_indices`, `topk_weights`.
    #[arg(long)]
    pub(crate) output: PathBuf,
    /// Run across N worker processes of a local cluster (default: in this process).
    #[arg(long, conflicts_with = "entry")]
    pub(crate) workers: Option<usize>,
    /// Send the layer to a running cluster through these workers' MoeLayer service
    /// (HOST:PORT, comma-separated); on UNAVAILABLE or a broken connection the next is tried.
    #[arg(long, env = env::ENTRY, value_delimiter = ',')]
    pub(crate) entry: Vec<String>,
    /// With --entry: deadline of the whole call, retries included (sent as grpc-timeout).
    #[arg(long, default_value_t = 30_000)]
    pub(crate) timeout_ms: u64,
    #[arg(long, default_value = "bf16", env = env::WIRE_DTYPE)]
    pub(crate) wire: String,
}

#[derive(Debug, Args)]
pub(crate) struct GenModelArgs {
    /// tiny (default), tiny-v3, tiny-v4, tiny-mixtral, tiny-qwen3, deepseek-v3, deepseek-v4-flash,
    /// deepseek-v4-pro, mixtral-8x7b, qwen3-30b-a3b.
    #[arg(long, default_value = "tiny")]
    pub(crate) preset: String,
    #[arg(long)]
    pub(crate) out: PathBuf,
    #[arg(long)]
    pub(crate) layers: Option<usize>,
    #[arg(long)]
    pub(crate) experts: Option<usize>,
    #[arg(long)]
    pub(crate) hidden: Option<usize>,
    #[arg(long)]
    pub(crate) ffn: Option<usize>,
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    #[arg(long)]
    pub(crate) vocab: Option<usize>,
    #[arg(long)]
    pub(crate) n_group: Option<usize>,
    #[arg(long)]
    pub(crate) topk_group: Option<usize>,
    /// Expert weight dtype: bf16, f16, f32, or f8_e4m3 (DeepSeek V3's block-scaled FP8).
    #[arg(long, default_value = "bf16")]
    pub(crate) dtype: String,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Refuse to write more than this many GiB.
    #[arg(long, default_value_t = 16.0)]
    pub(crate) max_gib: f64,
}

#[derive(Debug, Args)]
pub(crate) struct GenInputArgs {
    #[arg(long, env = env::MODEL)]
    pub(crate) model: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub(crate) tokens: usize,
    #[arg(long)]
    pub(crate) out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Checkpoint to use (default: the V3-shaped benchmark layer: hidden 2048, 64 experts,
    /// top-6, expert FFN 1024).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: usize,
    /// Tokens per batch, comma-separated.
    #[arg(long, default_value = "256,4096", value_delimiter = ',')]
    pub(crate) batches: Vec<usize>,
    /// Timed iterations per batch size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub(crate) iters: usize,
    #[arg(long, default_value = "bf16")]
    pub(crate) wire: String,
    #[arg(long)]
    pub(crate) log_dir: Option<PathBuf>,
    /// Inject a fault under steady traffic instead (etcd, 2 coordinators, workers registered in
    /// etcd; the first --batches size is the request size) and report its effect.
    #[arg(long, value_enum)]
    pub(crate) fault: Option<fault_bench::Fault>,
    /// With --fault: copies of every expert.
    #[arg(long, default_value_t = 1)]
    pub(crate) replicas: usize,
    /// With --fault: lease TTL of workers and coordinators.
    #[arg(long, default_value_t = 3000)]
    pub(crate) lease_ttl_ms: u64,
    /// With --fault: seconds of steady traffic before the fault and after recovery.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) steady_s: f64,
    /// With --fault stop-etcd or stop-worker: how long etcd stays down, or the worker frozen.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) outage_s: f64,
    /// With --fault: concurrent clients.
    #[arg(long, default_value_t = 2)]
    pub(crate) concurrency: usize,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Coordinator address; several, comma-separated: the first that answers.
    #[arg(long, env = env::COORDINATOR)]
    pub(crate) coordinator: String,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// The worker to drain (its id, as `expertmesh status` lists it).
    pub(crate) worker_id: String,
    /// Coordinator address; several, comma-separated: the first that answers.
    #[arg(long, env = env::COORDINATOR)]
    pub(crate) coordinator: String,
    /// Wait at most this long for the worker to leave the cluster (0: do not wait).
    #[arg(long, default_value_t = 60)]
    pub(crate) wait_s: u64,
}

fn init_tracing(cli: &Cli, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.clone().unwrap_or_else(|| default.to_string()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> std::process::ExitCode {
    // A user error is one clear message (with its causes), never a stack trace, whatever
    // RUST_BACKTRACE says.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let server = matches!(cli.cmd, Cmd::Coordinator(_) | Cmd::Worker(_));
    init_tracing(&cli, if server { "info" } else { "warn" });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(a) => commands::up(a).await,
            Cmd::Coordinator(a) => commands::coordinator(a).await,
            Cmd::Worker(a) => commands::worker(a).await,
            Cmd::Forward(a) => commands::forward(a).await,
            Cmd::GenModel(a) => commands::gen_model(a),
            Cmd::GenInput(a) => commands::gen_input(a),
            Cmd::Bench(a) => commands::bench(a).await,
            Cmd::Status(a) => commands::status(a).await,
            Cmd::Drain(a) => commands::drain(a).await,
            Cmd::Plan(a) => plan::plan(a).await,
        }
    })
}
