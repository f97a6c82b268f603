//! Helpers the commands share: signals, wire dtype, random inputs, percentiles, scratch
//! directories, the synthetic-or-given model, and a local cluster with a dispatcher routing by
//! its first placement.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use expertmesh_cluster::control::{connect_coordinator, ControlTarget};
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_core::rng::SplitMix64;
use expertmesh_dispatcher::dispatcher::{Dispatcher, DispatcherConfig};
use expertmesh_dispatcher::Checkpoint;
use expertmesh_proto::v1::ClusterStatusRequest;
use expertmesh_worker::node::connect_dispatcher;
use expertmesh_worker::synth::{generate, GenOptions};
use tokio_util::sync::CancellationToken;

use crate::env;
use crate::local::{LocalCluster, LocalOptions};

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
    /// Routed experts per MoE layer of the synthetic model.
    #[arg(long, default_value_t = 32)]
    pub(crate) experts: usize,
    /// Hidden size of the synthetic model.
    #[arg(long, default_value_t = 512)]
    pub(crate) hidden: usize,
    /// Expert FFN (intermediate) size of the synthetic model.
    #[arg(long, default_value_t = 256)]
    pub(crate) ffn: usize,
    /// Experts each token is routed to in the synthetic model.
    #[arg(long, default_value_t = 6)]
    pub(crate) top_k: usize,
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
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

/// Clap parser for a count that must be at least 1 (tokens, clients, threads, copies, runs).
pub(crate) fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number; expected at least 1")),
    }
}

/// Clap parser for one `HOST:PORT` address (one this process announces: no scheme).
pub(crate) fn address(s: &str) -> Result<String, String> {
    expertmesh_core::limits::check_address("address", s).map(|()| s.to_string())
}

/// Clap parser for one `HOST:PORT` address to dial (an `http://` or `https://` prefix allowed).
pub(crate) fn dial_address(s: &str) -> Result<String, String> {
    let bare = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://")).unwrap_or(s);
    expertmesh_core::limits::check_address("address", bare).map(|()| s.to_string())
}

/// Clap parser for one or more comma-separated addresses to dial (coordinators tried in turn).
pub(crate) fn addresses(s: &str) -> Result<String, String> {
    let list: Vec<&str> = s.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    if list.is_empty() {
        return Err("expected HOST:PORT, or several comma-separated".into());
    }
    list.iter().try_for_each(|a| dial_address(a).map(|_| ()))?;
    Ok(s.to_string())
}

/// Clap parser for milliseconds of at least `min`.
pub(crate) fn millis(min: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.parse::<u64>() {
        Ok(v) if v >= min => Ok(v),
        Ok(_) => Err(format!("expected at least {min} ms")),
        Err(_) => Err(format!("`{s}` is not a whole number of milliseconds")),
    }
}

/// Clap parser for a time in seconds: a finite number above 0.
pub(crate) fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err(format!("{s} seconds: expected a number of seconds above 0")),
        Err(_) => Err(format!("`{s}` is not a number of seconds")),
    }
}

/// Clap parser for a fraction from 0 to 1.
pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}`: expected a fraction from 0 to 1")),
    }
}

/// `--replicas` copies of every expert on distinct workers of a local cluster of `workers`.
pub(crate) fn check_replicas(replicas: usize, workers: usize) -> Result<()> {
    if replicas > workers {
        bail!(
            "--replicas {replicas}: every expert on {replicas} distinct workers needs at least {replicas} workers; --workers gives {workers}"
        );
    }
    Ok(())
}

pub(crate) fn parse_wire(s: &str) -> Result<DType> {
    match DType::parse(s)? {
        d @ (DType::BF16 | DType::F32) => Ok(d),
        d => bail!("--wire {}: expected bf16 or f32", d.name()),
    }
}

pub(crate) fn random_batch(spec: &expertmesh_core::ModelSpec, tokens: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut r = SplitMix64::new(seed);
    let x = (0..tokens * spec.hidden).map(|_| r.normal() as f32).collect();
    let ids = (0..tokens).map(|_| r.below(spec.vocab_size as u64) as i64).collect();
    (x, ids)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `name` on PATH, if there.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::var("PATH").ok()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// A scratch directory removed when dropped.
pub(crate) fn scratch(prefix: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir()?)
}

/// A local cluster plus a dispatcher in this process that routes by its placement.
pub(crate) async fn cluster_dispatcher(
    model: &Path,
    opts: &LocalOptions,
    log_dir: &Path,
    stop: CancellationToken,
) -> Result<(LocalCluster, Arc<Dispatcher>)> {
    let cluster = LocalCluster::start(model, opts, log_dir).await?;
    let ck = Arc::new(Checkpoint::open(model)?);
    let target = ControlTarget::Coordinator { addrs: cluster.coordinator.clone(), tls: cluster.tls.clone() };
    let dcfg = DispatcherConfig { tls: cluster.tls.clone(), ..Default::default() };
    let d = connect_dispatcher(&target, ck, "cpu", dcfg, stop).await?;
    first_placement(&cluster, &d).await?;
    Ok((cluster, d))
}

/// Wait for the local cluster's first committed placement; a worker that cannot load its experts
/// fails the wait at once with its own error (the coordinator keeps it with the worker's status),
/// and so does a cluster the coordinator cannot place the experts on, with the coordinator's.
pub(crate) async fn first_placement(cluster: &LocalCluster, d: &Dispatcher) -> Result<()> {
    let mut coord = connect_coordinator(&cluster.coordinator, Duration::from_secs(5), cluster.tls.as_ref()).await?;
    let load_error = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Ok(s) = coord.cluster_status(ClusterStatusRequest {}).await else { continue };
            let s = s.into_inner();
            if !s.placement_blocked.is_empty() {
                return anyhow!("the coordinator cannot place the experts: {}", s.placement_blocked);
            }
            if let Some(w) = s.workers.into_iter().find(|w| !w.error.is_empty()) {
                let id = w.info.map(|i| i.worker_id).unwrap_or_default();
                return anyhow!("worker {id} cannot load its experts: {}", w.error);
            }
        }
    };
    tokio::select! {
        r = d.route_table(None) => r.map(|_| ()).context("waiting for the first placement"),
        e = load_error => Err(e),
    }
}

pub(crate) fn resolve_model(src: &ModelSource, scratch: &Path) -> Result<PathBuf> {
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

/// The float64 single-process reference of one layer (`--check` of `bench` and `forward`).
pub(crate) struct Reference {
    layer: expertmesh_core::reference::RefLayer,
}

impl Reference {
    /// Reads the checkpoint's files whole and holds the layer in float64: for small and
    /// scaled-down models. Refuses, with the figures, when that would not fit in memory.
    pub(crate) fn load(model: &Path, spec: &expertmesh_core::ModelSpec, layer: usize) -> Result<Self> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(model)
            .with_context(|| format!("reading {}", model.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        names.sort();
        let files: u64 = names.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
        let experts = (spec.n_routed + spec.n_shared) as u64;
        let need = files + experts * spec.expert_params() * 8;
        if let Some((available, _)) = expertmesh_kernels::cpu::host_memory() {
            if need > available {
                bail!(
                    "the float64 reference of layer {layer} needs about {:.1} GiB (the checkpoint's files read whole, \
                     and the layer's {experts} experts in float64); this machine has {:.1} GiB available. \
                     --check is for small or scaled-down models (gen-model --layers/--experts/--hidden/--ffn)",
                    need as f64 / (1u64 << 30) as f64,
                    available as f64 / (1u64 << 30) as f64
                );
            }
        }
        eprintln!("loading the float64 reference of layer {layer}");
        let shards = names
            .iter()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
            .collect::<Result<Vec<_>>>()?;
        let ck = expertmesh_core::reference::RefCheckpoint::new(&shards)?;
        Ok(Self { layer: expertmesh_core::reference::RefLayer::load(spec, layer, &ck)? })
    }

    pub(crate) fn forward(
        &self,
        spec: &expertmesh_core::ModelSpec,
        x: &[f32],
        tokens: usize,
        ids: Option<&[i64]>,
    ) -> Result<expertmesh_core::reference::RefOutput> {
        let x: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        Ok(expertmesh_core::reference::moe_forward(spec, &self.layer, &x, tokens, ids)?)
    }
}

/// Relative L2 error of `a` against the float64 `b`.
pub(crate) fn rel_l2_f32(a: &[f32], b: &[f64]) -> f64 {
    let a: Vec<f64> = a.iter().map(|v| *v as f64).collect();
    expertmesh_core::reference::rel_l2(&a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_that_would_not_fit_in_memory_is_refused_with_figures() {
        let cfg = expertmesh_core::config::preset_config("tiny-v3", &PresetOverrides::default()).unwrap();
        let mut spec = expertmesh_core::ModelSpec::from_config_json(&cfg.to_string()).unwrap();
        // 2^30 experts of 3 x 64 x 32 parameters: 48 TiB in float64.
        spec.n_routed = 1 << 30;
        let dir = tempfile::tempdir().unwrap();
        let e = Reference::load(dir.path(), &spec, 1).err().expect("refused").to_string();
        assert!(e.contains("needs about 49152.0 GiB") && e.contains("GiB available"), "{e}");
    }
}
