//! `expertmesh forward`: one MoE layer on inputs from a file, in process, on a local cluster,
//! or through a running one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::moe::{LocalMoe, MoeInput, MoeOutput};
use expertmesh_dispatcher::Checkpoint;
use expertmesh_kernels::cpu::CpuBackend;
use expertmesh_worker::synth::{write_safetensors, OwnedTensor};
use tokio_util::sync::CancellationToken;

use crate::env;
use crate::local::{LocalOptions, WorkerMix};
use crate::shared::{self, cluster_dispatcher, parse_wire, rel_l2_f32, scratch, Reference};
use crate::tls::TlsArgs;

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
    #[arg(long, env = env::ENTRY, value_delimiter = ',', value_parser = shared::address)]
    pub(crate) entry: Vec<String>,
    /// With --entry: deadline of the whole call, retries included (sent as grpc-timeout).
    #[arg(long, default_value_t = 30_000, value_parser = crate::shared::millis(1))]
    pub(crate) timeout_ms: u64,
    /// Activations dtype on the wire: bf16 or f32.
    #[arg(long, default_value = "bf16", env = env::WIRE_DTYPE)]
    pub(crate) wire: String,
    /// Also compute the layer's float64 single-process reference from --model and compare: the
    /// chosen experts must match it, and the output's relative L2 error must stay under 1e-5 (in
    /// process, or an f32 wire) or 1e-2 (a bf16 wire); otherwise exit non-zero (the output is
    /// written either way). With --entry this checks a running cluster's answer. The reference
    /// reads the checkpoint whole and holds the layer in float64: for small or scaled-down models.
    #[arg(long, requires = "model")]
    pub(crate) check: bool,
    /// With --entry: a `client` (or other cluster) certificate, when the cluster runs mutual TLS.
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

/// Read `hidden_states` and optional `input_ids` from a safetensors file.
fn read_input(path: &Path, hidden: usize) -> Result<(usize, Vec<f32>, Option<Vec<i64>>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let hs = st
        .tensor("hidden_states")
        .map_err(|_| anyhow!("{}: missing tensor `hidden_states` (f32 [T, {hidden}])", path.display()))?;
    let shape = hs.shape().to_vec();
    if shape.len() != 2 {
        bail!("{}: `hidden_states` has shape {shape:?}; expected [T, {hidden}]", path.display());
    }
    let d = DType::from_safetensors(hs.dtype())?;
    if !d.is_float() || d == DType::F8E4M3 {
        bail!("{}: `hidden_states` has dtype {}; expected f32 (or bf16/f16)", path.display(), d.name());
    }
    let mut x = vec![0f32; shape[0] * shape[1]];
    expertmesh_core::dtype::decode_f32(d, hs.data(), &mut x)?;
    let ids = match st.tensor("input_ids") {
        Ok(t) => {
            let v: Vec<i64> = match t.dtype() {
                safetensors::Dtype::I64 => {
                    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
                }
                safetensors::Dtype::I32 => {
                    t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
                }
                other => bail!("{}: `input_ids` has dtype {other:?}; expected i64 (or i32)", path.display()),
            };
            Some(v)
        }
        Err(_) => None,
    };
    // The hidden size is checked against the model by the layer itself (clear error there).
    let tokens = shape[0];
    if shape[1] != hidden {
        bail!(
            "{}: `hidden_states` has shape {shape:?}; the model's hidden size is {hidden}, so expected [{tokens}, {hidden}]",
            path.display()
        );
    }
    Ok((tokens, x, ids))
}

fn write_output(path: &Path, hidden: usize, out: &MoeOutput) -> Result<()> {
    let k = out.routing.top_k;
    let tokens = out.routing.tokens();
    let idx: Vec<i64> = out.routing.indices.iter().map(|&v| v as i64).collect();
    let mut t = BTreeMap::new();
    t.insert("output".to_string(), OwnedTensor::from_f32(DType::F32, vec![tokens, hidden], &out.output)?);
    t.insert("topk_indices".to_string(), OwnedTensor::from_i64(vec![tokens, k], &idx));
    t.insert("topk_weights".to_string(), OwnedTensor::from_f32(DType::F32, vec![tokens, k], &out.routing.weights)?);
    write_safetensors(path, &t)?;
    Ok(())
}

pub(crate) async fn run(a: ForwardArgs) -> Result<()> {
    let wire = parse_wire(&a.wire)?;
    if !a.entry.is_empty() {
        return forward_entry(&a, wire).await;
    }
    let model =
        a.model.clone().ok_or_else(|| anyhow!("give --model DIR (or --entry HOST:PORT for a running cluster)"))?;
    let ck = Arc::new(Checkpoint::open(&model)?);
    let spec = ck.spec().clone();
    spec.check_moe_layer(a.layer)?;
    let (tokens, x, ids) = read_input(&a.input, spec.hidden)?;
    // The inputs are kept for --check only.
    let kept = a.check.then(|| (x.clone(), ids.clone()));
    let inp = MoeInput { layer: a.layer, tokens, hidden_states: x, input_ids: ids };
    let out = match a.workers {
        None => LocalMoe::new(ck, Arc::new(CpuBackend::new())).forward(inp).await?,
        Some(n) => {
            if n == 0 {
                bail!("--workers must be at least 1");
            }
            let stop = CancellationToken::new();
            let logs = scratch("expertmesh-forward-")?;
            let (cluster, d) = cluster_dispatcher(
                &model,
                &LocalOptions::simple(WorkerMix::cpu(n), 1, None),
                logs.path(),
                stop.clone(),
            )
            .await?;
            let r = d.forward(inp, wire).await;
            stop.cancel();
            cluster.stop().await;
            r?
        }
    };
    write_output(&a.output, spec.hidden, &out)?;
    println!(
        "layer {}: {} tokens -> {} (output [{}, {}], top-{} indices and weights)",
        a.layer,
        tokens,
        a.output.display(),
        tokens,
        spec.hidden,
        spec.top_k
    );
    if let Some((x, ids)) = kept {
        let tol = if a.workers.is_none() || wire == DType::F32 { 1e-5 } else { 1e-2 };
        check(&model, a.layer, &x, tokens, ids.as_deref(), &out, tol)?;
    }
    Ok(())
}

/// `--check`: `out` against the float64 reference of the layer in `model`.
fn check(
    model: &Path,
    layer: usize,
    x: &[f32],
    tokens: usize,
    ids: Option<&[i64]>,
    out: &MoeOutput,
    tol: f64,
) -> Result<()> {
    let spec = Checkpoint::open(model)?.spec().clone();
    spec.check_moe_layer(layer)?;
    if x.len() != tokens * spec.hidden {
        bail!(
            "--check: --model {} has hidden size {}; the input is {tokens} x {}",
            model.display(),
            spec.hidden,
            x.len() / tokens.max(1)
        );
    }
    let want = Reference::load(model, &spec, layer)?.forward(&spec, x, tokens, ids)?;
    let got: Vec<i64> = out.routing.indices.iter().map(|&v| v as i64).collect();
    let chosen = got == want.topk_indices;
    let err = rel_l2_f32(&out.output, &want.output);
    let werr = rel_l2_f32(&out.routing.weights, &want.topk_weights);
    println!(
        "check against the float64 reference: chosen experts {}; routing weights rel L2 {werr:.1e}; output rel L2 {err:.1e} (tolerance {tol:.0e})",
        if chosen { "match" } else { "DIFFER" }
    );
    if !chosen {
        let first = (0..tokens).find(|&t| {
            let k = spec.top_k;
            got.get(t * k..(t + 1) * k) != want.topk_indices.get(t * k..(t + 1) * k)
        });
        let at = match first {
            Some(t) => format!("first at token {t}"),
            None => format!("{} indices against the reference's {}", got.len(), want.topk_indices.len()),
        };
        bail!("--check: the chosen experts differ from the reference's ({at})");
    }
    // NaN fails these comparisons too.
    if !(err < tol && werr < 1e-5) {
        bail!("--check: the answer differs from the reference: output rel L2 {err:.2e} (tolerance {tol:.0e}), routing weights {werr:.2e} (tolerance 1e-5)");
    }
    Ok(())
}

/// `forward --entry`: the layer through a running cluster's MoeLayer service, with failover
/// over the entry workers (Forward is idempotent).
async fn forward_entry(a: &ForwardArgs, wire: DType) -> Result<()> {
    use expertmesh_dispatcher::wire::{dtype_to_proto, f32_tensor, i64_tensor, tensor_to_f32, tensor_to_i64};
    use expertmesh_proto::v1::moe_layer_client::MoeLayerClient;
    use expertmesh_proto::v1::{DescribeRequest, ForwardRequest};
    use expertmesh_worker::client::MoeClient;
    let timeout = Duration::from_millis(a.timeout_ms);
    let tls = a.tls.load()?;
    let client = MoeClient::new(&a.entry, timeout, 256 << 20, tls.as_ref()).map_err(|e| anyhow!("--entry: {e}"))?;
    // The model's shape, from the first entry that answers.
    let mut desc = None;
    let mut last = String::new();
    for e in &a.entry {
        let ep =
            expertmesh_trust::client::endpoint(e).map_err(anyhow::Error::msg)?.connect_timeout(Duration::from_secs(3));
        match expertmesh_trust::client::connect(ep, tls.as_ref(), expertmesh_trust::Expect::AnyWorker).await {
            Ok(ch) => match MoeLayerClient::new(ch).describe(DescribeRequest {}).await {
                Ok(d) => {
                    desc = Some(d.into_inner());
                    break;
                }
                Err(s) => last = format!("{e}: {:?}: {}", s.code(), s.message()),
            },
            Err(err) => last = format!("{e}: {}", expertmesh_proto::error_chain(&err)),
        }
    }
    let desc = desc.ok_or_else(|| anyhow!("no entry worker of {:?} answered Describe (last: {last})", a.entry))?;
    let hidden = desc.hidden as usize;
    let (tokens, x, ids) = read_input(&a.input, hidden)?;
    let req = ForwardRequest {
        layer: a.layer as u32,
        hidden_states: Some(f32_tensor(&[tokens, hidden], &x)),
        input_ids: ids.as_ref().map(|v| i64_tensor(&[tokens], v)),
        wire_dtype: dtype_to_proto(wire),
    };
    let r = client.forward(req).await.map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?;
    let (output, _) = tensor_to_f32(r.output.as_ref().ok_or_else(|| anyhow!("answer without output"))?, "output")?;
    let (idx, ishape) =
        tensor_to_i64(r.topk_indices.as_ref().ok_or_else(|| anyhow!("answer without topk_indices"))?, "topk_indices")?;
    let (weights, _) =
        tensor_to_f32(r.topk_weights.as_ref().ok_or_else(|| anyhow!("answer without topk_weights"))?, "topk_weights")?;
    let k = ishape.get(1).copied().unwrap_or(0);
    let routing =
        expertmesh_core::gating::Routing { top_k: k, indices: idx.iter().map(|&v| v as u32).collect(), weights };
    let out = MoeOutput { output, routing, epoch: r.epoch };
    write_output(&a.output, hidden, &out)?;
    println!(
        "layer {}: {tokens} tokens -> {} through the cluster (placement epoch {}; output [{tokens}, {hidden}], top-{k})",
        a.layer,
        a.output.display(),
        r.epoch
    );
    if let (true, Some(model)) = (a.check, &a.model) {
        let tol = if wire == DType::F32 { 1e-5 } else { 1e-2 };
        check(model, a.layer, &x, tokens, ids.as_deref(), &out, tol)?;
    }
    Ok(())
}
