//! `expertmesh`: one binary for every role. Parses flags and hands off to the crates.

mod cmd;
mod env;
mod local;
mod shared;
mod tls;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "expertmesh", version, about = "Distributed expert-parallel runtime for Mixture-of-Experts layers")]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info`, `expertmesh_worker=debug`.
    #[arg(long, global = true, env = env::LOG)]
    log: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, default_value = "text", env = env::LOG_FORMAT, value_parser = ["text", "json"])]
    log_format: String,
    /// Threads of this process's compute pool (expert FFNs, gating, combine; default: one per
    /// core). Processes sharing a machine may split its cores.
    #[arg(long, global = true, env = env::COMPUTE_THREADS)]
    compute_threads: Option<usize>,
    /// Run this process on these CPUs only (kernel list syntax: `0-7`, `0,2,4-5`); the compute
    /// pool then defaults to one thread per listed CPU. For several workers on one host (one
    /// per socket or NUMA node); in Kubernetes the kubelet's CPU manager does this instead.
    #[arg(long, global = true, env = env::CPUS)]
    cpus: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a local cluster (coordinator + N workers on loopback) and drive traffic through
    /// every MoE layer, with a live summary, until stopped or --duration passes.
    Up(cmd::up::UpArgs),
    /// Run the coordinator (control plane).
    Coordinator(cmd::coordinator::CoordinatorArgs),
    /// Run a worker that holds and computes experts.
    Worker(cmd::worker::WorkerArgs),
    /// Run one MoE layer on inputs from a safetensors file.
    Forward(cmd::forward::ForwardArgs),
    /// Write a synthetic model in the upstream checkpoint layout.
    GenModel(cmd::gen::GenModelArgs),
    /// Write random inputs (hidden_states, input_ids) for `forward`.
    GenInput(cmd::gen::GenInputArgs),
    /// Benchmark the distributed layer against the same layer in one process; prints JSON.
    Bench(cmd::bench::BenchArgs),
    /// Show a cluster's members, placement epoch, leader and load.
    Status(cmd::status::StatusArgs),
    /// Move a worker's experts to the others, then let it leave (as SIGTERM on the worker does).
    Drain(cmd::drain::DrainArgs),
    /// Size a cluster for a model and a workload: memory per device, placement, traffic,
    /// roofline step time and tokens/s; or search for the smallest inventory (docs/planner.md).
    Plan(cmd::plan::PlanArgs),
    /// Load-balanced expert placement: `simulate` runs the algorithm offline on given loads,
    /// `show` the live plan of a cluster with its per-device load and imbalance.
    Placement(cmd::placement::PlacementArgs),
    /// One device's backend without a cluster: conformance against the float64 reference
    /// (`check`), the start-up probe (`probe`), expert FFN rates at model shapes (`bench`).
    Backend(cmd::backend::BackendArgs),
    /// Write a CA and certificates (coordinator, admin, client, etcd, one per worker) for a
    /// local or test cluster with mutual TLS.
    Certs(cmd::certs::CertsArgs),
}

fn init_tracing(cli: &Cli, default: &str) -> Result<()> {
    // tracing takes any bare word as a target name; a bare word here is meant as a level.
    if let Some(bad) = cli.log.as_deref().unwrap_or("").split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains('=')
            && !d.contains("::")
            && !d.contains('_')
            && !["trace", "debug", "info", "warn", "error", "off"].contains(&d.to_ascii_lowercase().as_str())
    }) {
        anyhow::bail!("--log: `{bad}` is not a level; expected trace, debug, info, warn, error or off, or TARGET=LEVEL (e.g. `warn,expertmesh_worker=debug`)");
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(cli.log.clone().unwrap_or_else(|| default.to_string())) {
        Ok(f) => f,
        Err(e) => {
            return Err(anyhow::anyhow!(
                "--log `{}`: not a log filter ({e}); expected e.g. `info`, `warn,expertmesh_worker=debug`",
                cli.log.clone().unwrap_or_default()
            ))
        }
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    // A user error is one clear message (with its causes), never a stack trace, whatever
    // RUST_BACKTRACE says.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, as `{:#}` prints them, except that a gRPC status reads
/// `not found: <message>` rather than tonic's `code: 'Some requested entity was not found',
/// message: "<message>"`.
fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| match cause.downcast_ref::<tonic::Status>() {
            Some(s) => format!("{}: {}", code_words(s.code()), s.message()),
            None => cause.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// `NotFound` as `not found`.
fn code_words(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let server = matches!(cli.cmd, Cmd::Coordinator(_) | Cmd::Worker(_));
    init_tracing(&cli, if server { "info" } else { "warn" })?;
    if let Some(list) = &cli.cpus {
        let cpus = expertmesh_dispatcher::compute::parse_cpu_list(list)?;
        expertmesh_dispatcher::compute::pin_process(&cpus)?;
        tracing::info!(cpus = %expertmesh_dispatcher::compute::cpu_list(&cpus), "pinned to CPUs");
    }
    expertmesh_dispatcher::compute::init_pool(cli.compute_threads)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(a) => cmd::up::run(a).await,
            Cmd::Coordinator(a) => cmd::coordinator::run(a).await,
            Cmd::Worker(a) => cmd::worker::run(a).await,
            Cmd::Forward(a) => cmd::forward::run(a).await,
            Cmd::GenModel(a) => cmd::gen::gen_model(a),
            Cmd::GenInput(a) => cmd::gen::gen_input(a),
            Cmd::Bench(a) => cmd::bench::run(a).await,
            Cmd::Status(a) => cmd::status::run(a).await,
            Cmd::Drain(a) => cmd::drain::run(a).await,
            Cmd::Plan(a) => cmd::plan::plan(a).await,
            Cmd::Certs(a) => cmd::certs::run(a),
            Cmd::Backend(a) => cmd::backend::run(a),
            Cmd::Placement(a) => cmd::placement::run(a).await,
        }
    })
}
