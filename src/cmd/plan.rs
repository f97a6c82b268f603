//! `expertmesh plan`: size a cluster for a model and a workload (see docs/planner.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use expertmesh_cluster::control::connect_coordinator;
use expertmesh_core::Family;
use expertmesh_planner::estimate::{curve, Efficiency};
use expertmesh_planner::hardware::{Catalog, DeviceSpec, Inventory, Pool};
use expertmesh_planner::{
    evaluate, report, search, Layout, ModelArch, Phase, PlanInput, Precision, Precisions, Workload,
};
use expertmesh_proto::v1::ClusterStatusRequest;

use crate::shared;

#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// Model: a preset (deepseek-v4-pro, deepseek-v4-flash, deepseek-v3, mixtral-8x7b,
    /// qwen1.5-moe-a2.7b, qwen2-57b-a14b, qwen3-30b-a3b), a config.json, or a checkpoint
    /// directory holding one.
    #[arg(long, default_value = "deepseek-v4-pro")]
    model: String,
    /// Routed experts: fp4, fp8, int8 or bf16 (default: as the model ships; V4 fp4, V3 fp8).
    #[arg(long)]
    expert_precision: Option<Precision>,
    /// Attention, dense and shared-expert weights (default: fp8 for DeepSeek, else bf16).
    #[arg(long)]
    attention_precision: Option<Precision>,
    /// KV cache: fp4, fp8, int8 or bf16.
    #[arg(long, default_value = "bf16")]
    kv_precision: Precision,
    /// Hardware inventory (YAML: `pools:` and optionally `devices:`; docs/planner.md).
    #[arg(long, conflicts_with_all = ["device", "from_cluster"])]
    inventory: Option<PathBuf>,
    /// Instead of an inventory file: one pool of this catalog device (`--list-devices`).
    #[arg(long, conflicts_with = "from_cluster")]
    device: Vec<String>,
    /// Nodes of the `--device` pool.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Devices per node of the `--device` pool (default: the catalog's).
    #[arg(long)]
    devices_per_node: Option<usize>,
    /// Plan on a live cluster: its workers, model and measured expert loads (coordinator host:port).
    #[arg(long, value_parser = shared::addresses)]
    from_cluster: Option<String>,
    /// With --from-cluster: a cluster certificate, when the cluster runs mutual TLS.
    #[command(flatten)]
    tls: crate::tls::TlsArgs,
    /// prefill or decode.
    #[arg(long, default_value = "decode")]
    phase: String,
    /// Requests in flight per instance (decode) or prompts per step (prefill); default: the
    /// largest that fits in memory and meets --max-step-ms.
    #[arg(long)]
    batch: Option<usize>,
    /// Decode: context per request; prefill: prompt length.
    #[arg(long, default_value_t = 8192)]
    context: usize,
    /// Prefill: tokens per step (a chunk) instead of batch x context.
    #[arg(long)]
    tokens_per_step: Option<usize>,
    /// Cluster-wide tokens/s to reach.
    #[arg(long)]
    target_tokens_per_s: Option<f64>,
    /// Bound on one step, ms (decode: time per output token).
    #[arg(long)]
    max_step_ms: Option<f64>,
    /// Devices per expert-parallel instance (default: the whole inventory).
    #[arg(long)]
    ep: Option<usize>,
    /// Attention tensor parallelism inside an instance.
    #[arg(long, default_value_t = 1)]
    attn_tp: usize,
    /// Attention data parallelism (checked: must be EP / attention TP).
    #[arg(long)]
    attn_dp: Option<usize>,
    /// Copies of every expert.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Search each device kind of the inventory for the smallest inventory meeting the target.
    #[arg(long)]
    search: bool,
    /// Largest instance the search tries, in nodes.
    #[arg(long, default_value_t = 32)]
    max_nodes: usize,
    /// Fraction of peak FLOP/s, memory and link bandwidth real kernels reach.
    #[arg(long, default_value_t = 0.6)]
    compute_eff: f64,
    /// Fraction of peak memory bandwidth real kernels reach.
    #[arg(long, default_value_t = 0.8)]
    memory_eff: f64,
    /// Fraction of peak link bandwidth real transfers reach.
    #[arg(long, default_value_t = 0.8)]
    network_eff: f64,
    /// Device memory held back for the runtime.
    #[arg(long, default_value_t = 0.06)]
    reserve_frac: f64,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write an HTML report with charts here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Print the hardware catalog and exit.
    #[arg(long)]
    list_devices: bool,
}

fn load_model(m: &str) -> Result<ModelArch> {
    let p = Path::new(m);
    if p.exists() {
        let file = if p.is_dir() { p.join("config.json") } else { p.to_path_buf() };
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        return Ok(ModelArch::from_config_text(&file.display().to_string(), &text)?);
    }
    ModelArch::preset(m).with_context(|| format!("`{m}` is neither a file nor a preset"))
}

fn default_precisions(a: &ModelArch, args: &PlanArgs) -> Precisions {
    let (e, at) = match a.spec.family {
        Family::DeepseekV4 => (Precision::Fp4, Precision::Fp8),
        Family::DeepseekV3 => (Precision::Fp8, Precision::Fp8),
        _ => (Precision::Bf16, Precision::Bf16),
    };
    Precisions {
        experts: args.expert_precision.unwrap_or(e),
        attention: args.attention_precision.unwrap_or(at),
        kv_cache: args.kv_precision,
    }
}

/// A live cluster as an inventory: one pool per node, one device per worker device; link and
/// bandwidth figures the workers do not report come from the catalog row of their kind.
async fn from_cluster(
    addr: &str,
    tls: Option<&expertmesh_trust::Tls>,
    catalog: &Catalog,
    notes: &mut Vec<String>,
) -> Result<(ModelArch, Inventory, BTreeMap<(usize, usize), u64>)> {
    let mut c = connect_coordinator(addr, Duration::from_secs(5), tls).await?;
    let s = c.cluster_status(ClusterStatusRequest {}).await.context("cluster status")?.into_inner();
    if s.model_config_json.is_empty() {
        bail!("the coordinator at {addr} does not report its model config (an older version?)");
    }
    let arch = ModelArch::from_config_text(&format!("cluster {addr} ({})", s.model_type), &s.model_config_json)?;
    let mut by_node: BTreeMap<String, Vec<DeviceSpec>> = BTreeMap::new();
    for w in &s.workers {
        let info = w.info.clone().unwrap_or_default();
        for d in &info.devices {
            let row = match d.kind.as_str() {
                "cuda" => "h100",
                "npu" => "910b",
                _ => "cpu",
            };
            let base = catalog.get(row)?;
            let mut spec = base.clone();
            spec.name = format!("{}:{}", info.worker_id, d.kind);
            spec.aliases.clear();
            spec.memory_gb = d.memory_bytes as f64 / 1e9;
            if d.tflops > 0.0 {
                spec.tflops = [(Precision::Bf16, d.tflops)].into_iter().collect();
            }
            spec.devices_per_node = 1;
            spec.source = format!(
                "worker {} as registered (memory, TFLOP/s); links from catalog `{}`",
                info.worker_id, base.name
            );
            by_node
                .entry(if info.node.is_empty() { info.worker_id.clone() } else { info.node.clone() })
                .or_default()
                .push(spec);
        }
    }
    if by_node.is_empty() {
        bail!("the cluster at {addr} has no registered workers to plan on");
    }
    let mut pools = Vec::new();
    for (node, devs) in by_node {
        // A node's devices are taken as alike (the first one's spec), as the placement treats
        // every device of a pool the same.
        let mut p = Pool::of(&devs[0], 1);
        p.name = node;
        p.devices_per_node = devs.len();
        pools.push(p);
    }
    notes.push(format!(
        "from {addr}: {} worker(s) on {} node(s); memory and TFLOP/s as the workers registered them, bandwidths from the catalog row of each device kind",
        s.workers.len(),
        pools.len()
    ));
    let loads: BTreeMap<(usize, usize), u64> =
        s.expert_loads.iter().map(|l| ((l.layer as usize, l.expert as usize), l.tokens)).collect();
    let total: u64 = loads.values().sum();
    notes.push(if total > 0 {
        format!("measured expert loads: {total} routed tokens over {} (layer, expert) pairs", loads.len())
    } else {
        "no expert loads reported yet: uniform routing assumed".into()
    });
    Ok((arch, Inventory { pools }, loads))
}

pub(crate) async fn plan(args: PlanArgs) -> Result<()> {
    let mut catalog = Catalog::builtin();
    if args.list_devices {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&catalog)?);
        } else {
            println!(
                "{:<14} {:>5} {:>8} {:>26} {:>9} {:>7} {:>6} {:>5}  source",
                "device", "GB", "TB/s", "TFLOPS", "up GB/s", "domain", "/node", "NIC"
            );
            for d in &catalog.devices {
                let tf: Vec<String> = d.tflops.iter().map(|(p, t)| format!("{p} {t}")).collect();
                println!(
                    "{:<14} {:>5} {:>8} {:>26} {:>9} {:>7} {:>6} {:>5}  {}",
                    d.name,
                    d.memory_gb,
                    d.memory_bw_tbs,
                    tf.join(", "),
                    d.scale_up_gbs,
                    d.scale_up_domain,
                    d.devices_per_node,
                    d.nic_gbps,
                    d.source
                );
            }
        }
        return Ok(());
    }
    let mut notes = Vec::new();
    let (arch, inventory, loads) = if let Some(addr) = &args.from_cluster {
        let (a, i, l) = from_cluster(addr, args.tls.load()?.as_ref(), &catalog, &mut notes).await?;
        (a, i, Some(l))
    } else {
        let arch = load_model(&args.model)?;
        let inventory = if let Some(path) = &args.inventory {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Inventory::parse(&text, &mut catalog).with_context(|| format!("{}", path.display()))?
        } else {
            let names = if args.device.is_empty() { vec!["h200".to_string()] } else { args.device.clone() };
            let mut pools = Vec::new();
            if args.nodes == 0 {
                bail!("--nodes 0: an inventory needs at least one node");
            }
            if args.devices_per_node == Some(0) {
                bail!("--devices-per-node 0: a node needs at least one device");
            }
            for n in names {
                let mut p = Pool::of(catalog.get(&n)?, args.nodes);
                if let Some(d) = args.devices_per_node {
                    p.devices_per_node = d;
                }
                pools.push(p);
            }
            Inventory { pools }
        };
        (arch, inventory, None)
    };
    for a in &arch.assumed {
        notes.push(format!("config.json lacks it, assumed {a}"));
    }
    let phase = match args.phase.as_str() {
        "decode" => Phase::Decode,
        "prefill" => Phase::Prefill,
        other => bail!("--phase `{other}`: expected prefill or decode"),
    };
    if args.context == 0 {
        bail!("--context must be at least 1 token");
    }
    if args.context > arch.max_context {
        notes.push(format!("context {} exceeds the model's {} positions", args.context, arch.max_context));
    }
    for (name, v) in
        [("--compute-eff", args.compute_eff), ("--memory-eff", args.memory_eff), ("--network-eff", args.network_eff)]
    {
        if !(v > 0.0 && v <= 1.0) {
            bail!("{name} {v}: expected a fraction in (0, 1]");
        }
    }
    if !(0.0..1.0).contains(&args.reserve_frac) {
        bail!("--reserve-frac {}: expected a fraction in [0, 1)", args.reserve_frac);
    }
    let ep = args.ep.unwrap_or(inventory.devices());
    if let Some(dp) = args.attn_dp {
        if dp * args.attn_tp != ep {
            bail!("--attn-dp {dp} x --attn-tp {} must equal the instance's {ep} devices (--ep)", args.attn_tp);
        }
    }
    let input = PlanInput {
        precisions: default_precisions(&arch, &args),
        arch,
        inventory,
        layout: Layout { ep: args.ep, attn_tp: args.attn_tp },
        workload: Workload {
            phase,
            batch: args.batch,
            context: args.context,
            tokens_per_step: args.tokens_per_step,
            target_tokens_per_s: args.target_tokens_per_s,
            max_step_ms: args.max_step_ms,
        },
        replicas: args.replicas,
        eff: Efficiency {
            compute: args.compute_eff,
            memory: args.memory_eff,
            network: args.network_eff,
            reserve_frac: args.reserve_frac,
            ..Efficiency::default()
        },
        expert_loads: loads,
    };
    let params = input.arch.params();
    let model_json = serde_json::json!({
        "name": input.arch.name,
        "attention": input.arch.attention,
        "params": params,
        "kv_bytes_per_token": input.arch.kv_bytes_per_token(input.precisions.kv_cache),
        "kv_bytes_per_seq": input.arch.kv_bytes_per_seq(input.workload.context, input.precisions.kv_cache),
    });
    let (estimate, search_result) = if args.search {
        let r = search(&input, args.max_nodes)?;
        (r.best.clone(), Some(r))
    } else {
        (Some(evaluate(&input)?), None)
    };
    let curves: Vec<(String, Vec<_>)> = match &search_result {
        Some(r) => r.curves.clone().into_iter().collect(),
        None if (args.json || args.html.is_some()) && input.inventory.pools.len() == 1 && loads_absent(&input) => {
            let p = &input.inventory.pools[0];
            let max = (2 * p.nodes).clamp(8, 32);
            vec![(p.name.clone(), curve(&input, p, max, None))]
        }
        None => vec![],
    };
    if let (Some(path), Some(e)) = (&args.html, &estimate) {
        std::fs::write(path, report::html(e, &curves, search_result.as_ref()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        let out = serde_json::json!({
            "model": model_json,
            "inventory": input.inventory,
            "workload": input.workload,
            "efficiency": input.eff,
            "estimate": estimate,
            "search": search_result,
            "curves": curves.into_iter().collect::<BTreeMap<_, _>>(),
            "notes": notes,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "model {}: {:.1}B parameters ({:.1}B active, MTP {:.1}B not counted); KV {:.0} bytes/token at {}",
        input.arch.name,
        params.total as f64 / 1e9,
        params.active as f64 / 1e9,
        params.mtp as f64 / 1e9,
        input.arch.kv_bytes_per_token(input.precisions.kv_cache),
        input.precisions.kv_cache
    );
    for n in &notes {
        println!("note: {n}");
    }
    match (&search_result, &estimate) {
        (Some(r), _) => print!("{}", report::search_text(r)),
        (None, Some(e)) => print!("{}", report::text(e)),
        (None, None) => {}
    }
    if let Some(p) = &args.html {
        println!("HTML report: {}", p.display());
    }
    Ok(())
}

fn loads_absent(i: &PlanInput) -> bool {
    i.expert_loads.as_ref().is_none_or(|l| l.is_empty())
}
