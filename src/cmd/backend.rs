//! `expertmesh backend`: what one device's backend does, without a cluster.
//! - `check`: the backend conformance suite against the float64 reference;
//! - `probe`: the throughput and memory a worker on this device would report;
//! - `bench`: the grouped expert FFN at real model shapes (and on CUDA, copy bandwidth and
//!   permute/combine), as JSON.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use expertmesh_core::dtype::DType;
use expertmesh_kernels::{backend_for_device, conformance::Suite};

#[derive(Debug, Args)]
pub(crate) struct BackendArgs {
    #[command(subcommand)]
    cmd: BackendCmd,
}

#[derive(Debug, Subcommand)]
enum BackendCmd {
    /// Run the conformance suite (every weight dtype, ragged FP8 blocks, 0, 1 and odd row
    /// counts, the V4 clamp; outputs poisoned with NaN first) against the float64 reference.
    Check {
        /// Device: cpu, or cuda:N (a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Measure the device as a worker does at start (throughput probe, memory); prints JSON.
    Probe {
        /// Device: cpu, or cuda:N (a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Expert FFN rates at model shapes with one device holding 1/8 of the experts; prints JSON.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Device: cpu, or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Shapes: v4-pro (hidden 7168, FFN 3072, 384 experts, top-6), v3 (hidden 7168, FFN 2048,
    /// 256 experts, top-8), bench (hidden 2048, FFN 1024, 64 experts, top-6).
    #[arg(long, value_delimiter = ',', default_value = "v4-pro,v3")]
    shapes: Vec<String>,
    /// Tokens per batch (the whole batch; this device takes its 1/SHARE of the rows).
    #[arg(long, value_delimiter = ',', default_value = "128,1024,8192", value_parser = crate::shared::count)]
    tokens: Vec<usize>,
    /// Weight dtypes: bf16, f8_e4m3 (128x128 block scales), f16, f32.
    #[arg(long, value_delimiter = ',', default_value = "bf16,f8_e4m3")]
    weights: Vec<String>,
    /// Measure each point for at least this long.
    #[arg(long, default_value_t = 0.5, value_parser = crate::shared::seconds)]
    min_secs: f64,
    /// This device holds 1/SHARE of the experts (as one of SHARE devices of an expert-parallel
    /// group).
    #[arg(long, default_value_t = 8, value_parser = crate::shared::count)]
    share: usize,
}

struct Shape {
    name: &'static str,
    hidden: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
}

fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "v4-pro" => Shape { name: "v4-pro", hidden: 7168, ffn: 3072, experts: 384, top_k: 6 },
        "v3" => Shape { name: "v3", hidden: 7168, ffn: 2048, experts: 256, top_k: 8 },
        "bench" => Shape { name: "bench", hidden: 2048, ffn: 1024, experts: 64, top_k: 6 },
        other => bail!("unknown shape `{other}`; expected v4-pro, v3 or bench"),
    })
}

pub(crate) fn run(a: BackendArgs) -> Result<()> {
    match a.cmd {
        BackendCmd::Check { device } => check(&device),
        BackendCmd::Probe { device } => {
            let b = backend_for_device(&device)?;
            let p = expertmesh_kernels::probe(&*b)?;
            println!("{}", serde_json::json!({"device": device, "backend": b.name(), "probe": p}));
            Ok(())
        }
        BackendCmd::Bench(a) => bench(a),
    }
}

fn check(device: &str) -> Result<()> {
    let b = backend_for_device(device)?;
    let suite = Suite::new();
    let t = Instant::now();
    let failures = suite.run(&*b);
    if failures.is_empty() {
        println!("conformance: {} cases passed on {} ({:.1} s)", suite.len(), b.name(), t.elapsed().as_secs_f64());
        return Ok(());
    }
    for f in &failures {
        println!("FAILED {f}");
    }
    bail!("conformance: {} of {} cases failed on {}", failures.len(), suite.len() + 1, b.name())
}

fn bench(a: BenchArgs) -> Result<()> {
    let b = backend_for_device(&a.device)?;
    let mut points = Vec::new();
    for s in &a.shapes {
        let s = shape(s)?;
        let local = (s.experts / a.share).max(1);
        for w in &a.weights {
            let dtype = DType::parse(w)?;
            let layer = expertmesh_kernels::bench::repeated_layer(&*b, s.hidden, s.ffn, local, dtype, 41)?;
            for &t in &a.tokens {
                // Routing spread evenly: the batch's t x top-k rows over all experts.
                let rows = (t * s.top_k).div_ceil(s.experts).max(1);
                let r = expertmesh_kernels::bench::layer_rate(&*b, &*layer, s.ffn, rows, DType::BF16, a.min_secs)?;
                eprintln!(
                    "{} {} {t} tokens ({rows} rows x {local} experts): {:.3} ms, {:.1} TFLOP/s, weights {:.0} GB/s",
                    s.name,
                    dtype.name(),
                    r.seconds * 1e3,
                    r.gflops / 1e3,
                    layer.bytes() as f64 / r.seconds / 1e9
                );
                points.push(serde_json::json!({
                    "shape": s.name, "hidden": s.hidden, "ffn": s.ffn, "experts": s.experts, "top_k": s.top_k,
                    "local_experts": local, "weights": dtype.name(), "tokens": t, "rows_per_expert": rows,
                    "seconds": r.seconds, "tflops": r.gflops / 1e3, "calls": r.calls,
                    "weight_bytes": layer.bytes(),
                    "weight_gb_per_s": layer.bytes() as f64 / r.seconds / 1e9,
                }));
            }
        }
    }
    let extra = device_extras(&a.device)?;
    println!(
        "{}",
        serde_json::json!({"device": a.device, "backend": b.name(), "ffn": points, "device_figures": extra})
    );
    Ok(())
}

/// Copy bandwidth and permute/combine rates of a CUDA device.
#[cfg(feature = "cuda")]
fn device_extras(device: &str) -> Result<serde_json::Value> {
    let Some(i) = device.strip_prefix("cuda:") else { return Ok(serde_json::Value::Null) };
    let b = expertmesh_kernels::cuda::CudaBackend::new(i.parse()?)?;
    Ok(serde_json::to_value(b.transfer_rates(7168, 8192, 8)?)?)
}

#[cfg(not(feature = "cuda"))]
fn device_extras(_device: &str) -> Result<serde_json::Value> {
    Ok(serde_json::Value::Null)
}
