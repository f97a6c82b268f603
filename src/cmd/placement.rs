//! `expertmesh placement`: the load-balanced placement, offline (`simulate`) and live (`show`).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use expertmesh_core::balance::{
    bytes_moved, even_placement, layer_slots, place, Device, LayerPlacement, Placement, Policy, Problem, Slot,
};
use serde::{Deserialize, Serialize};

use crate::env;
use crate::shared;
use crate::tls::TlsArgs;

#[derive(Debug, Args)]
pub(crate) struct PlacementArgs {
    #[command(subcommand)]
    cmd: PlacementCmd,
}

#[derive(Debug, Subcommand)]
enum PlacementCmd {
    /// Run the placement algorithm offline on given loads and a cluster; prints the plan, its
    /// imbalance and (with --from) the bytes each device would load.
    Simulate(SimulateArgs),
    /// The live plan of a cluster: per-worker load over the last window, and the imbalance.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// Loads: JSON `{"loads": [[tokens per logical expert] per layer]}`.
    #[arg(long)]
    loads: std::path::PathBuf,
    /// The cluster (YAML): `pools:` of {name?, nodes, devices_per_node, memory_gib,
    /// throughput, expert_bytes?}, and `expert_bytes` (one expert replica's bytes where a pool
    /// gives none). Instead: --devices, --nodes and --slots-per-device.
    #[arg(long, conflicts_with_all = ["devices", "slots_per_device"])]
    cluster: Option<std::path::PathBuf>,
    /// Devices (all alike; with --nodes and --slots-per-device, EPLB's setting).
    #[arg(long, requires = "slots_per_device")]
    devices: Option<usize>,
    /// Nodes the devices are spread over, evenly.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Expert slots every device has per layer; every slot is filled.
    #[arg(long, requires = "devices")]
    slots_per_device: Option<usize>,
    /// Extra replicas per layer beyond one per expert (with --cluster; default: fill every slot
    /// the devices have).
    #[arg(long)]
    redundant: Option<usize>,
    /// Replicas every expert gets at least, on distinct devices.
    #[arg(long, default_value_t = 1)]
    min_replicas: usize,
    /// Expert groups (group-limited routing); the hierarchical policy keeps a group in one node.
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// auto (hierarchical when the groups divide over the nodes), hierarchical or global.
    #[arg(long, default_value = "auto")]
    policy: Policy,
    /// The current placement (a `--json` output of this command): rebalance from it and report
    /// the bytes each device loads.
    #[arg(long)]
    from: Option<std::path::PathBuf>,
    /// How much more loaded (relative) a device already holding an expert may be than the best
    /// one and still keep it: 0 balances best; larger values move fewer bytes.
    #[arg(long, default_value_t = 0.0)]
    stickiness: f64,
    /// Bytes of one expert replica (with --slots-per-device; for the bytes moved).
    #[arg(long, default_value_t = 1)]
    expert_bytes: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Deserialize)]
struct LoadsFile {
    loads: Vec<Vec<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    #[serde(default)]
    expert_bytes: Option<u64>,
    #[serde(default)]
    redundant: Option<usize>,
    pools: Vec<PoolFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolFile {
    #[serde(default)]
    name: Option<String>,
    nodes: usize,
    devices_per_node: usize,
    /// Memory for expert weights per device.
    memory_gib: f64,
    /// Relative throughput (e.g. measured TFLOP/s).
    throughput: f64,
    /// One expert replica's bytes on this pool's backend (default: the file's).
    #[serde(default)]
    expert_bytes: Option<u64>,
}

/// A plan as `--json` prints it (and `--from` reads back).
#[derive(Debug, Serialize, Deserialize)]
struct PlanJson {
    policy: String,
    imbalance: f64,
    imbalance_max: f64,
    even_imbalance: f64,
    seconds: f64,
    devices: Vec<DeviceJson>,
    layers: Vec<LayerJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes_moved: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes_moved_per_device: Option<Vec<u64>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DeviceJson {
    device: u32,
    pool: String,
    node: u32,
    throughput: f64,
    slots: usize,
    expert_bytes: u64,
    /// Mean over layers of this device's load / throughput over the ideal.
    relative_load: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct LayerJson {
    layer: usize,
    imbalance: f64,
    slots: Vec<Slot>,
    replicas: Vec<u32>,
    physical_to_logical: Vec<u32>,
    logical_to_physical: Vec<Vec<u32>>,
}

struct Cluster {
    devices: Vec<Device>,
    pools: Vec<String>,
    expert_bytes: Vec<u64>,
    physical: usize,
}

fn cluster_from_file(
    path: &std::path::Path,
    layers: usize,
    experts: usize,
    redundant: Option<usize>,
) -> Result<Cluster> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--cluster {}", path.display()))?;
    let f: ClusterFile = serde_yaml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--cluster {}: {e}; expected `pools:` (a list of {{name?, nodes, devices_per_node, memory_gib, throughput, expert_bytes?}}) and `expert_bytes`",
            path.display()
        )
    })?;
    if f.pools.is_empty() {
        bail!("--cluster {}: `pools:` is empty; expected at least one pool", path.display());
    }
    let (mut devices, mut pools, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let mut node = 0u32;
    for (i, p) in f.pools.iter().enumerate() {
        let name = p.name.clone().unwrap_or_else(|| format!("pool{i}"));
        let eb = p.expert_bytes.or(f.expert_bytes).with_context(|| {
            format!("--cluster: pool `{name}` has no expert_bytes and the file gives none; expected the bytes one expert replica takes on it")
        })?;
        if eb == 0 || p.nodes == 0 || p.devices_per_node == 0 {
            bail!("--cluster: pool `{name}`: nodes, devices_per_node and expert_bytes must be positive");
        }
        if !(p.throughput.is_finite() && p.throughput > 0.0 && p.memory_gib.is_finite() && p.memory_gib >= 0.0) {
            bail!("--cluster: pool `{name}`: throughput must be positive and memory_gib non-negative");
        }
        let slots = ((p.memory_gib * (1u64 << 30) as f64) / eb as f64).floor() as usize;
        for _ in 0..p.nodes {
            for _ in 0..p.devices_per_node {
                devices.push(Device { node, throughput: p.throughput, slots });
                pools.push(name.clone());
                bytes.push(eb);
            }
            node += 1;
        }
    }
    let capacity = layer_slots(&devices, layers).iter().map(|l| l.iter().sum::<usize>()).min().unwrap_or(0);
    let physical = match redundant.or(f.redundant) {
        Some(r) => experts + r,
        None => capacity,
    };
    Ok(Cluster { devices, pools, expert_bytes: bytes, physical })
}

fn read_plan(path: &std::path::Path) -> Result<Placement> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--from {}", path.display()))?;
    let p: PlanJson = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!("--from {}: {e}; expected a `placement simulate --json` output", path.display())
    })?;
    Ok(Placement {
        policy: p.policy.parse().ok(),
        layers: p.layers.into_iter().map(|l| LayerPlacement { slots: l.slots }).collect(),
    })
}

pub(crate) fn simulate(a: SimulateArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.loads).with_context(|| format!("--loads {}", a.loads.display()))?;
    let loads: LoadsFile = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--loads {}: {e}; expected {{\"loads\": [[number per logical expert] per layer]}}",
            a.loads.display()
        )
    })?;
    let loads = loads.loads;
    let (layers, experts) = (loads.len(), loads.first().map_or(0, Vec::len));
    if layers == 0 || experts == 0 {
        bail!("--loads {}: no layers or no experts; expected at least one of each", a.loads.display());
    }
    let cluster = match (&a.cluster, a.devices, a.slots_per_device) {
        (Some(path), _, _) => cluster_from_file(path, layers, experts, a.redundant)?,
        (None, Some(n), Some(s)) => {
            if n == 0 || a.nodes == 0 || n % a.nodes != 0 {
                bail!("--devices {n} --nodes {}: expected devices to spread evenly over at least one node", a.nodes);
            }
            let per = n / a.nodes;
            Cluster {
                devices: (0..n)
                    .map(|d| Device { node: (d / per) as u32, throughput: 1.0, slots: s * layers })
                    .collect(),
                pools: vec!["device".into(); n],
                expert_bytes: vec![a.expert_bytes; n],
                physical: n * s,
            }
        }
        _ => bail!("the cluster: expected --cluster CLUSTER.yaml, or --devices N --nodes M --slots-per-device S"),
    };
    let current = a.from.as_deref().map(read_plan).transpose()?;
    if let Some(c) = &current {
        if c.layers.len() != layers {
            bail!("--from places {} layers; the loads have {layers}", c.layers.len());
        }
    }
    let t = Instant::now();
    let plan = place(&Problem {
        loads: &loads,
        devices: &cluster.devices,
        physical: cluster.physical,
        min_replicas: a.min_replicas,
        groups: a.groups,
        policy: a.policy,
        current: current.as_ref(),
        stickiness: a.stickiness,
    })?;
    let seconds = t.elapsed().as_secs_f64();
    let per_layer = plan.layer_imbalance(&loads, &cluster.devices);
    let even = even_placement(layers, experts, cluster.devices.len()).imbalance(&loads, &cluster.devices);
    let t: Vec<f64> = cluster.devices.iter().map(|d| d.throughput).collect();
    let speed: f64 = t.iter().sum();
    // Each device's load over its fair share, averaged over the layers that have any load.
    let mut rel = vec![0.0; cluster.devices.len()];
    let loaded = loads.iter().filter(|w| w.iter().any(|&x| x > 0.0)).count().max(1) as f64;
    for (l, layer) in plan.layers.iter().enumerate() {
        let d = layer.device_loads(&loads[l], cluster.devices.len());
        let ideal = d.iter().sum::<f64>() / speed;
        for (j, x) in d.iter().enumerate() {
            if ideal > 0.0 {
                rel[j] += x / t[j] / ideal / loaded;
            }
        }
    }
    let moved = current.as_ref().map(|c| bytes_moved(c, &plan, &cluster.expert_bytes));
    let out = PlanJson {
        policy: plan.policy.unwrap_or_default().name().into(),
        imbalance: per_layer.iter().sum::<f64>() / layers as f64,
        imbalance_max: per_layer.iter().copied().fold(0.0, f64::max),
        even_imbalance: even,
        seconds,
        devices: cluster
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceJson {
                device: i as u32,
                pool: cluster.pools[i].clone(),
                node: d.node,
                throughput: d.throughput,
                slots: d.slots,
                expert_bytes: cluster.expert_bytes[i],
                relative_load: rel[i],
            })
            .collect(),
        layers: plan
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerJson {
                layer: i,
                imbalance: per_layer[i],
                slots: l.slots.clone(),
                replicas: l.replica_counts(experts),
                physical_to_logical: l.physical_to_logical(),
                logical_to_physical: l.logical_to_physical(experts),
            })
            .collect(),
        bytes_moved: moved.as_ref().map(|m| m.iter().sum()),
        bytes_moved_per_device: moved,
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!(
        "placement ({}): {layers} layers x {experts} experts onto {} devices on {} nodes, {} slots per layer, in {:.3} s",
        out.policy,
        cluster.devices.len(),
        cluster.devices.iter().map(|d| d.node).max().map_or(0, |n| n + 1),
        plan.layers.first().map_or(0, |l| l.slots.len()),
        seconds
    );
    println!(
        "imbalance (max over devices of load / throughput, over the ideal): mean {:.3}, worst layer {:.3}; the even placement without replicas: {:.3}",
        out.imbalance, out.imbalance_max, even
    );
    let (hot, cold) = rel
        .iter()
        .enumerate()
        .fold((0, 0), |(h, c), (i, &r)| (if r > rel[h] { i } else { h }, if r < rel[c] { i } else { c }));
    if loads.iter().flatten().all(|&w| w == 0.0) {
        println!("devices: no layer has any load; every placement is as good");
    } else {
        println!(
            "devices: most loaded {hot} ({}) at {:.3}x its fair share, least loaded {cold} ({}) at {:.3}x (means over layers)",
            cluster.pools[hot], rel[hot], cluster.pools[cold], rel[cold]
        );
    }
    if let (Some(total), Some(per)) = (out.bytes_moved, &out.bytes_moved_per_device) {
        let busiest = per.iter().enumerate().max_by_key(|(_, b)| **b).map(|(i, b)| (i, *b)).unwrap_or((0, 0));
        println!(
            "from the current placement: {} to load in all ({} devices load something; the most, device {}: {})",
            human_bytes(total),
            per.iter().filter(|&&b| b > 0).count(),
            busiest.0,
            human_bytes(busiest.1)
        );
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{b:.0} B")
    }
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// Coordinator address; several, comma-separated: the first that answers.
    #[arg(long, env = env::COORDINATOR, value_parser = shared::addresses)]
    coordinator: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

pub(crate) async fn run(a: PlacementArgs) -> Result<()> {
    match a.cmd {
        PlacementCmd::Simulate(s) => simulate(s),
        PlacementCmd::Show(s) => show(s).await,
    }
}

async fn show(a: ShowArgs) -> Result<()> {
    use expertmesh_proto::v1::{ClusterStatusRequest, GetPlacementRequest};
    let tls = a.tls.load()?;
    let mut c = expertmesh_cluster::control::connect_coordinator(
        &a.coordinator,
        std::time::Duration::from_secs(5),
        tls.as_ref(),
    )
    .await?;
    let status = c.cluster_status(ClusterStatusRequest {}).await?.into_inner();
    let plan = c.get_placement(GetPlacementRequest {}).await?.into_inner();
    if plan.epoch == 0 || plan.workers.is_empty() {
        bail!("no placement committed yet (the cluster waits for {} workers)", status.expect_workers);
    }
    let layers: Vec<usize> = {
        let mut v: Vec<usize> = plan.layers.iter().map(|l| l.layer as usize).collect();
        v.sort_unstable();
        v
    };
    let experts = status.routed_experts as usize;
    let row: std::collections::HashMap<u32, usize> = layers.iter().enumerate().map(|(i, &l)| (l as u32, i)).collect();
    let mut loads = vec![vec![0.0; experts]; layers.len()];
    for e in &status.window_loads {
        if let (Some(&l), true) = (row.get(&e.layer), (e.expert as usize) < experts) {
            loads[l][e.expert as usize] += e.tokens as f64;
        }
    }
    // Expert bytes do not matter here: slots only bound new plans.
    let devices = expertmesh_coordinator::rebalance::devices(&plan.workers, 1);
    let placement = expertmesh_coordinator::rebalance::placement_of(&plan, &plan.workers, &layers);
    let per_layer = placement.layer_imbalance(&loads, &devices);
    let total: f64 = loads.iter().flatten().sum();
    let speed: f64 = devices.iter().map(|d| d.throughput).sum();
    let mut worker_load = vec![0.0; devices.len()];
    let mut replicas = vec![0usize; devices.len()];
    for (l, layer) in placement.layers.iter().enumerate() {
        for (d, x) in layer.device_loads(&loads[l], devices.len()).iter().enumerate() {
            worker_load[d] += x;
        }
        for (d, n) in layer.device_slots(devices.len()).iter().enumerate() {
            replicas[d] += n;
        }
    }
    let relative: Vec<f64> = worker_load
        .iter()
        .zip(&devices)
        .map(|(l, d)| if total > 0.0 { l / d.throughput / (total / speed) } else { 0.0 })
        .collect();
    let mut hot: Vec<(usize, usize, f64)> = loads
        .iter()
        .enumerate()
        .flat_map(|(l, w)| w.iter().enumerate().map(move |(e, &t)| (l, e, t)))
        .filter(|x| x.2 > 0.0)
        .collect();
    hot.sort_by(|a, b| b.2.total_cmp(&a.2));
    let hot_json = |l: usize, e: usize, t: f64| {
        let reps: Vec<serde_json::Value> = placement.layers[l]
            .slots
            .iter()
            .filter(|s| s.expert as usize == e)
            .map(|s| serde_json::json!({"worker": plan.workers[s.device as usize].worker_id, "share": s.share}))
            .collect();
        serde_json::json!({"layer": layers[l], "expert": e, "tokens": t, "replicas": reps})
    };
    if a.json {
        let v = serde_json::json!({
            "epoch": plan.epoch,
            "policy": status.placement_policy,
            "imbalance": status.imbalance,
            "layer_imbalance": layers.iter().zip(&per_layer).map(|(l, x)| serde_json::json!({"layer": l, "imbalance": x})).collect::<Vec<_>>(),
            "window_s": status.window_s,
            "window_tokens": total,
            "rebalances": status.rebalances,
            "workers": plan.workers.iter().enumerate().map(|(i, w)| serde_json::json!({
                "worker": w.worker_id, "node": w.node, "throughput": devices[i].throughput,
                "replicas": replicas[i], "tokens": worker_load[i], "relative_load": relative[i],
            })).collect::<Vec<_>>(),
            "hottest": hot.iter().take(16).map(|&(l, e, t)| hot_json(l, e, t)).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    let policy = if status.placement_policy.is_empty() { "as committed" } else { status.placement_policy.as_str() };
    println!(
        "placement epoch {} ({policy}): {} workers, {} MoE layers x {experts} experts, {} replicas in all",
        plan.epoch,
        plan.workers.len(),
        layers.len(),
        replicas.iter().sum::<usize>()
    );
    if total <= 0.0 {
        println!("no load in the last {:.0} s: nothing to balance yet", status.window_s);
        return Ok(());
    }
    println!(
        "load over the last {:.0} s: {total:.0} routed rows; imbalance {:.3} (max over workers of load per throughput, over the ideal; worst layer {:.3}); {} rebalances",
        status.window_s,
        status.imbalance,
        per_layer.iter().copied().fold(0.0, f64::max),
        status.rebalances
    );
    println!("{:<20} {:<12} {:>10} {:>9} {:>12} {:>9}", "worker", "node", "throughput", "replicas", "rows", "relative");
    for (i, w) in plan.workers.iter().enumerate() {
        println!(
            "{:<20} {:<12} {:>10.3} {:>9} {:>12.0} {:>8.3}x",
            w.worker_id, w.node, devices[i].throughput, replicas[i], worker_load[i], relative[i]
        );
    }
    println!(
        "  (throughput: what the placement weighs each worker by, in TFLOP/s: the median probe of \
         its device on its node, or --tflops, in half-octave steps; `status` shows each probe)"
    );
    println!("hottest experts:");
    for &(l, e, t) in hot.iter().take(5) {
        let reps: Vec<String> = placement.layers[l]
            .slots
            .iter()
            .filter(|s| s.expert as usize == e)
            .map(|s| format!("{} {:.0}%", plan.workers[s.device as usize].worker_id, s.share * 100.0))
            .collect();
        println!("  layer {} expert {e}: {t:.0} rows ({:.1}%), on {}", layers[l], 100.0 * t / total, reps.join(", "));
    }
    Ok(())
}
