//! Load-balanced placement, in the class of DeepSeek's EPLB: for every MoE layer, how many
//! replicas each logical expert gets, the device of every replica (a physical slot), and each
//! slot's share of its expert's tokens.
//!
//! Per layer:
//! 1. **Replica counts.** Every expert starts with `min_replicas`; each further slot goes to the
//!    expert whose per-replica load `load / count` is largest (this minimises the largest
//!    per-replica load, the unit the packing has to place).
//! 2. **Packing.** Replicas in decreasing per-replica load, each onto the device, among those
//!    with a free slot that do not hold the expert yet, where it ends with the smallest load
//!    per unit of throughput (heterogeneous devices take load in proportion to their speed).
//!    Migrating from a current placement, a device that already holds the expert is taken
//!    when it is within `stickiness` of the best choice.
//! 3. **Shares** (where this goes past EPLB, which splits an expert's tokens evenly over its
//!    replicas): given where the replicas are, the shares that minimise the largest load per
//!    throughput, exactly, as a parametric max-flow (experts send their load to the devices
//!    holding them; devices take at most `T x throughput`; bisect on `T`).
//!
//! The hierarchical policy first packs whole expert groups onto nodes (as group-limited routing
//! wants: a token's experts on few nodes), then runs the three steps inside each node; the
//! global policy runs them over every device. `Policy::Auto` takes the hierarchical one when
//! the groups divide evenly over the nodes (EPLB's rule) and only one replica is required.
//!
//! Memory: a device holds at most its `slots` expert replicas over all layers (its memory
//! divided by one expert's bytes at the dtype its backend holds), split over the layers as
//! evenly as it goes ([`layer_slots`]); no plan ever exceeds it.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// One device of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The node (machine) it sits in; devices of a node share its fast links.
    pub node: u32,
    /// Measured throughput (any unit, the same for every device): load is carried in
    /// proportion to it.
    pub throughput: f64,
    /// Expert replicas it can hold over all layers (memory / bytes of one expert).
    pub slots: usize,
}

/// Which algorithm arranges the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Hierarchical when the expert groups divide evenly over the nodes, else global.
    #[default]
    Auto,
    /// Whole expert groups per node, then balance inside each node.
    Hierarchical,
    /// Balance over every device.
    Global,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Auto => "auto",
            Policy::Hierarchical => "hierarchical",
            Policy::Global => "global",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Policy::Auto),
            "hierarchical" => Ok(Policy::Hierarchical),
            "global" => Ok(Policy::Global),
            o => Err(format!("unknown placement policy `{o}`; expected auto, hierarchical or global")),
        }
    }
}

/// A physical expert slot: a replica of `expert` on `device`, taking `share` of the expert's
/// tokens (the shares of an expert sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub expert: u32,
    pub device: u32,
    pub share: f64,
}

/// One layer's slots, in physical order: by device, then expert.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LayerPlacement {
    pub slots: Vec<Slot>,
}

impl LayerPlacement {
    /// Physical slot -> logical expert.
    pub fn physical_to_logical(&self) -> Vec<u32> {
        self.slots.iter().map(|s| s.expert).collect()
    }

    /// Logical expert -> its physical slots.
    pub fn logical_to_physical(&self, experts: usize) -> Vec<Vec<u32>> {
        let mut out = vec![Vec::new(); experts];
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(v) = out.get_mut(s.expert as usize) {
                v.push(i as u32);
            }
        }
        out
    }

    /// Replicas per logical expert.
    pub fn replica_counts(&self, experts: usize) -> Vec<u32> {
        let mut c = vec![0u32; experts];
        for s in &self.slots {
            if let Some(x) = c.get_mut(s.expert as usize) {
                *x += 1;
            }
        }
        c
    }

    /// The load each device carries under `loads` (per logical expert).
    pub fn device_loads(&self, loads: &[f64], devices: usize) -> Vec<f64> {
        let mut d = vec![0.0; devices];
        for s in &self.slots {
            d[s.device as usize] += loads.get(s.expert as usize).copied().unwrap_or(0.0) * s.share;
        }
        d
    }

    /// Slots per device.
    pub fn device_slots(&self, devices: usize) -> Vec<usize> {
        let mut d = vec![0; devices];
        for s in &self.slots {
            d[s.device as usize] += 1;
        }
        d
    }
}

/// A placement of every layer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Placement {
    /// The policy that made it (never `Auto`).
    pub policy: Option<Policy>,
    pub layers: Vec<LayerPlacement>,
}

impl Placement {
    /// Per layer, max over devices of load / throughput over the ideal (all load / all
    /// throughput): 1.0 is perfect balance.
    pub fn layer_imbalance(&self, loads: &[Vec<f64>], devices: &[Device]) -> Vec<f64> {
        let t: Vec<f64> = devices.iter().map(|d| d.throughput).collect();
        self.layers.iter().zip(loads).map(|(l, w)| imbalance(&l.device_loads(w, devices.len()), &t)).collect()
    }

    /// The mean over layers of [`Placement::layer_imbalance`].
    pub fn imbalance(&self, loads: &[Vec<f64>], devices: &[Device]) -> f64 {
        let v = self.layer_imbalance(loads, devices);
        if v.is_empty() {
            1.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
}

/// Max over devices of `load / throughput`, over `sum(load) / sum(throughput)`; 1.0 without load.
pub fn imbalance(device_loads: &[f64], throughput: &[f64]) -> f64 {
    let total: f64 = device_loads.iter().sum();
    let speed: f64 = throughput.iter().sum();
    if total <= 0.0 || speed <= 0.0 {
        return 1.0;
    }
    let worst = device_loads.iter().zip(throughput).map(|(l, t)| l / t).fold(0.0, f64::max);
    worst / (total / speed)
}

/// Bytes each device must load to go from `from` to `to`: replicas it holds in `to` and not in
/// `from`, times `expert_bytes[device]`.
pub fn bytes_moved(from: &Placement, to: &Placement, expert_bytes: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; expert_bytes.len()];
    for (l, layer) in to.layers.iter().enumerate() {
        let had: std::collections::HashSet<(u32, u32)> =
            from.layers.get(l).map(|p| p.slots.iter().map(|s| (s.expert, s.device)).collect()).unwrap_or_default();
        for s in &layer.slots {
            if !had.contains(&(s.expert, s.device)) {
                out[s.device as usize] += expert_bytes[s.device as usize];
            }
        }
    }
    out
}

/// Each device's slots per layer: `slots / layers` each, the remainder spread so that every
/// layer gets nearly the same total (device d's extra slots start where device d-1's ended).
pub fn layer_slots(devices: &[Device], layers: usize) -> Vec<Vec<usize>> {
    let mut out = vec![vec![0usize; devices.len()]; layers];
    if layers == 0 {
        return out;
    }
    let mut start = 0usize;
    for (d, dev) in devices.iter().enumerate() {
        let (base, rem) = (dev.slots / layers, dev.slots % layers);
        for (l, row) in out.iter_mut().enumerate() {
            row[d] = base + usize::from((l + layers - start) % layers < rem);
        }
        start = (start + rem) % layers;
    }
    out
}

/// The even placement without replicas (what expert parallelism does by default): layer by
/// layer, expert `e` on device `e x devices / experts`, every share 1.
pub fn even_placement(layers: usize, experts: usize, devices: usize) -> Placement {
    let slots: Vec<Slot> =
        (0..experts).map(|e| Slot { expert: e as u32, device: (e * devices / experts) as u32, share: 1.0 }).collect();
    Placement { policy: None, layers: vec![LayerPlacement { slots }; layers] }
}

/// Synthetic skewed loads: per layer, expert loads proportional to `1 / rank^s` (Zipf), the
/// ranks a fresh random permutation per layer, scaled to `tokens` per layer.
pub fn zipf_loads(layers: usize, experts: usize, s: f64, tokens: f64, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    let norm: f64 = (1..=experts).map(|r| (r as f64).powf(-s)).sum();
    (0..layers)
        .map(|_| {
            let mut rank: Vec<usize> = (0..experts).collect();
            for i in (1..experts).rev() {
                rank.swap(i, rng.below(i as u64 + 1) as usize);
            }
            rank.iter().map(|&r| tokens * ((r + 1) as f64).powf(-s) / norm).collect()
        })
        .collect()
}

/// What to place.
#[derive(Debug, Clone)]
pub struct Problem<'a> {
    /// Per layer, per logical expert: its load (tokens routed to it over some window).
    pub loads: &'a [Vec<f64>],
    pub devices: &'a [Device],
    /// Physical slots to fill per layer (at least experts x `min_replicas`); fewer when the
    /// devices hold fewer.
    pub physical: usize,
    /// Replicas every expert gets at least, on distinct devices (and distinct nodes where the
    /// cluster has enough of them).
    pub min_replicas: usize,
    /// Expert groups (1: none). The hierarchical policy keeps a group on one node.
    pub groups: usize,
    pub policy: Policy,
    /// The placement in force, when rebalancing.
    pub current: Option<&'a Placement>,
    /// How much worse (relative load per throughput) a device that already holds an expert may
    /// be than the best device and still be kept: 0 balances best, larger values move fewer bytes.
    pub stickiness: f64,
}

/// Choose every layer's replicas, their devices and their shares. With `Policy::Auto`, a
/// hierarchical plan that does not fit (a node too small for its share of the groups) gives way
/// to a global one.
pub fn place(p: &Problem) -> Result<Placement> {
    match place_with(p) {
        Err(e) if p.policy == Policy::Auto => match place_with(&Problem { policy: Policy::Global, ..p.clone() }) {
            Ok(global) => Ok(global),
            Err(_) => Err(e),
        },
        r => r,
    }
}

fn place_with(p: &Problem) -> Result<Placement> {
    let n = p.devices.len();
    let experts = p.loads.first().map_or(0, Vec::len);
    if n == 0 {
        return Err(CoreError::Placement("no devices to place experts on".into()));
    }
    if experts == 0 {
        return Err(CoreError::Placement("no experts to place".into()));
    }
    if let Some((l, w)) = p.loads.iter().enumerate().find(|(_, w)| w.len() != experts) {
        return Err(CoreError::Placement(format!(
            "layer {l} has loads for {} experts; layer 0 has {experts}",
            w.len()
        )));
    }
    if let Some(w) = p.loads.iter().flatten().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(CoreError::Placement(format!("an expert load is {w}; loads must be finite and non-negative")));
    }
    // Sums of loads (device loads, the ideal) must stay finite too; only the ratios matter.
    if let Some(l) = p.loads.iter().position(|w| !w.iter().sum::<f64>().is_finite()) {
        return Err(CoreError::Placement(format!(
            "layer {l}'s loads sum past the largest number a float64 holds ({:e}); scale them down (only their ratios matter)",
            f64::MAX
        )));
    }
    if let Some((d, dev)) =
        p.devices.iter().enumerate().find(|(_, d)| !(d.throughput.is_finite() && d.throughput > 0.0))
    {
        return Err(CoreError::Placement(format!(
            "device {d} has throughput {}; expected a positive number",
            dev.throughput
        )));
    }
    let min_r = p.min_replicas.max(1);
    if min_r > n {
        return Err(CoreError::Placement(format!(
            "{min_r} replicas of every expert need {min_r} devices; there are {n}"
        )));
    }
    let caps = layer_slots(p.devices, p.loads.len());
    let nodes = {
        let mut v: Vec<u32> = p.devices.iter().map(|d| d.node).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let groups = p.groups.max(1);
    let hierarchical_fits =
        groups > 1 && experts.is_multiple_of(groups) && nodes.len() > 1 && groups.is_multiple_of(nodes.len());
    let policy = match p.policy {
        Policy::Auto if hierarchical_fits && min_r == 1 => Policy::Hierarchical,
        Policy::Auto => Policy::Global,
        Policy::Hierarchical if !hierarchical_fits => {
            return Err(CoreError::Placement(format!(
                "the hierarchical policy needs the {groups} expert groups to divide the {experts} experts and spread evenly over the {} nodes",
                nodes.len()
            )))
        }
        x => x,
    };
    let mut out = Placement { policy: Some(policy), layers: Vec::with_capacity(p.loads.len()) };
    for (l, w) in p.loads.iter().enumerate() {
        let cap = &caps[l];
        let have: usize = cap.iter().sum();
        if have < experts * min_r {
            return Err(CoreError::Placement(format!(
                "layer {l}: {experts} experts x {min_r} replicas need {} slots; the devices hold {have} for it",
                experts * min_r
            )));
        }
        let physical = p.physical.clamp(experts * min_r, have);
        let current: HashMap<u32, Vec<u32>> = p
            .current
            .and_then(|c| c.layers.get(l))
            .map(|c| {
                let mut m: HashMap<u32, Vec<u32>> = HashMap::new();
                for s in &c.slots {
                    if (s.device as usize) < n {
                        m.entry(s.expert).or_default().push(s.device);
                    }
                }
                m
            })
            .unwrap_or_default();
        let ctx = Ctx { devices: p.devices, caps: cap, current: &current, stickiness: p.stickiness.max(0.0) };
        let mut slots = match policy {
            Policy::Hierarchical => hierarchical(&ctx, w, groups, &nodes, physical, min_r, l)?,
            _ => {
                let all: Vec<u32> = (0..experts as u32).collect();
                let devs: Vec<u32> = (0..n as u32).collect();
                place_part(&ctx, w, &all, &devs, physical, min_r, l)?
            }
        };
        slots.sort_by_key(|s| (s.device, s.expert));
        out.layers.push(LayerPlacement { slots });
    }
    Ok(out)
}

struct Ctx<'a> {
    devices: &'a [Device],
    caps: &'a [usize],
    current: &'a HashMap<u32, Vec<u32>>,
    stickiness: f64,
}

/// A float with a total order (loads are finite).
#[derive(Debug, Clone, Copy, PartialEq)]
struct F(f64);
impl Eq for F {}
impl PartialOrd for F {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for F {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// Groups onto nodes (`groups / nodes` each), then each node on its own.
fn hierarchical(
    ctx: &Ctx,
    w: &[f64],
    groups: usize,
    nodes: &[u32],
    physical: usize,
    min_r: usize,
    layer: usize,
) -> Result<Vec<Slot>> {
    let experts = w.len();
    let per_group = experts / groups;
    let per_node = groups / nodes.len();
    let node_devs: Vec<Vec<u32>> = nodes
        .iter()
        .map(|&nd| (0..ctx.devices.len() as u32).filter(|&d| ctx.devices[d as usize].node == nd).collect())
        .collect();
    let speed: Vec<f64> =
        node_devs.iter().map(|ds| ds.iter().map(|&d| ctx.devices[d as usize].throughput).sum()).collect();
    let cap: Vec<usize> = node_devs.iter().map(|ds| ds.iter().map(|&d| ctx.caps[d as usize]).sum()).collect();
    // Where each group's experts are now (for stickiness): the node holding most of them.
    let node_index: HashMap<u32, usize> = nodes.iter().enumerate().map(|(i, &nd)| (nd, i)).collect();
    let group_load: Vec<f64> = (0..groups).map(|g| w[g * per_group..(g + 1) * per_group].iter().sum()).collect();
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| group_load[b].total_cmp(&group_load[a]).then(a.cmp(&b)));
    let (mut load, mut count) = (vec![0.0; nodes.len()], vec![0usize; nodes.len()]);
    let mut of_node: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for g in order {
        let x = group_load[g];
        let cost = |i: usize| (load[i] + x) / speed[i];
        let open = |i: &usize| count[*i] < per_node && cap[*i] >= (count[*i] + 1) * per_group * min_r;
        let best = (0..nodes.len()).filter(open).min_by(|&a, &b| F(cost(a)).cmp(&F(cost(b))).then(a.cmp(&b)));
        let Some(mut pick) = best else {
            return Err(CoreError::Placement(format!(
                "layer {layer}: no node has room for expert group {g} ({per_group} experts)"
            )));
        };
        let mut votes = vec![0usize; nodes.len()];
        for e in g * per_group..(g + 1) * per_group {
            for d in ctx.current.get(&(e as u32)).into_iter().flatten() {
                if let Some(&i) = node_index.get(&ctx.devices[*d as usize].node) {
                    votes[i] += 1;
                }
            }
        }
        if let Some(home) = (0..nodes.len()).filter(open).max_by_key(|&i| (votes[i], Reverse(i))) {
            if votes[home] > 0 && cost(home) <= cost(pick) * (1.0 + ctx.stickiness) {
                pick = home;
            }
        }
        load[pick] += x;
        count[pick] += 1;
        of_node[pick].push(g);
    }
    // Physical slots per node: its experts once, the rest where the load is.
    let base: Vec<usize> = of_node.iter().map(|gs| gs.len() * per_group * min_r).collect();
    let mut phys = base.clone();
    let mut extra = physical.saturating_sub(base.iter().sum());
    while extra > 0 {
        let room: Vec<usize> = (0..nodes.len()).filter(|&i| phys[i] < cap[i]).collect();
        if room.is_empty() {
            break;
        }
        let total: f64 = room.iter().map(|&i| load[i]).sum();
        let mut given = 0;
        for &i in &room {
            let want = if total > 0.0 { (extra as f64 * load[i] / total).floor() as usize } else { extra / room.len() };
            let take = want.min(cap[i] - phys[i]);
            phys[i] += take;
            given += take;
        }
        if given == 0 {
            // Less than one slot each: the most loaded node with room first.
            let i = *room.iter().max_by(|&&a, &&b| load[a].total_cmp(&load[b]).then(b.cmp(&a))).unwrap_or(&room[0]);
            phys[i] += 1;
            given = 1;
        }
        extra -= given.min(extra);
    }
    let mut slots = Vec::with_capacity(physical);
    for (i, gs) in of_node.iter().enumerate() {
        let ex: Vec<u32> = gs.iter().flat_map(|&g| (g * per_group) as u32..((g + 1) * per_group) as u32).collect();
        slots.extend(place_part(ctx, w, &ex, &node_devs[i], phys[i], min_r, layer)?);
    }
    Ok(slots)
}

/// Counts, packing and shares for `experts` over `devs` with `physical` slots.
fn place_part(
    ctx: &Ctx,
    w: &[f64],
    experts: &[u32],
    devs: &[u32],
    physical: usize,
    min_r: usize,
    layer: usize,
) -> Result<Vec<Slot>> {
    if experts.is_empty() {
        return Ok(Vec::new());
    }
    let k = devs.len();
    // 1. Replica counts.
    let mut count = vec![min_r.min(k); experts.len()];
    let mut extra = physical.saturating_sub(count.iter().sum());
    let mut heap: BinaryHeap<(F, Reverse<usize>)> =
        (0..experts.len()).map(|i| (F(w[experts[i] as usize] / count[i] as f64), Reverse(i))).collect();
    while extra > 0 {
        let Some((_, Reverse(i))) = heap.pop() else { break };
        if count[i] >= k {
            continue;
        }
        count[i] += 1;
        extra -= 1;
        heap.push((F(w[experts[i] as usize] / count[i] as f64), Reverse(i)));
    }
    // 2. Packing: replicas in decreasing per-replica load.
    let mut items: Vec<(f64, usize)> = Vec::with_capacity(count.iter().sum());
    for (i, &c) in count.iter().enumerate() {
        let x = w[experts[i] as usize] / c as f64;
        items.extend(std::iter::repeat_n((x, i), c));
    }
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut pack = Packer::new(ctx, devs);
    let mut held: Vec<Vec<u32>> = vec![Vec::with_capacity(min_r); experts.len()];
    let spread_nodes = min_r > 1;
    for (x, i) in items {
        let e = experts[i];
        let nodes_used: Vec<u32> =
            if spread_nodes { held[i].iter().map(|&d| ctx.devices[d as usize].node).collect() } else { Vec::new() };
        let first = held[i].len() < min_r && spread_nodes;
        let pick = pack
            .best(ctx, x, &held[i], if first { Some(&nodes_used) } else { None })
            .or_else(|| pack.best(ctx, x, &held[i], None))
            .ok_or_else(|| {
                CoreError::Placement(format!(
                    "layer {layer}: no device with a free slot for replica {} of expert {e}",
                    held[i].len() + 1
                ))
            })?;
        let pick = pack.sticky(ctx, x, e, &held[i], pick);
        pack.take(pick, x);
        held[i].push(pick);
    }
    // 3. Shares.
    Ok(shares(ctx, w, experts, &held))
}

/// Devices by load, lightest first.
type LoadHeap = BinaryHeap<Reverse<(F, u32)>>;

/// Devices with free slots, by throughput class, each class a min-heap on load (lazy: entries
/// whose load went stale are pushed again when seen).
struct Packer {
    load: HashMap<u32, f64>,
    free: HashMap<u32, usize>,
    classes: Vec<(f64, LoadHeap)>,
}

impl Packer {
    fn new(ctx: &Ctx, devs: &[u32]) -> Self {
        let mut classes: Vec<(f64, LoadHeap)> = Vec::new();
        let mut free = HashMap::with_capacity(devs.len());
        for &d in devs {
            let cap = ctx.caps[d as usize];
            if cap == 0 {
                continue;
            }
            free.insert(d, cap);
            let t = ctx.devices[d as usize].throughput;
            match classes.iter_mut().find(|(ct, _)| *ct == t) {
                Some((_, h)) => h.push(Reverse((F(0.0), d))),
                None => classes.push((t, BinaryHeap::from([Reverse((F(0.0), d))]))),
            }
        }
        Self { load: devs.iter().map(|&d| (d, 0.0)).collect(), free, classes }
    }

    /// The device where `x` more load ends lowest per throughput, among those with a free slot
    /// not in `held` (and, with `avoid_nodes`, not on those nodes).
    fn best(&mut self, ctx: &Ctx, x: f64, held: &[u32], avoid_nodes: Option<&Vec<u32>>) -> Option<u32> {
        let mut best: Option<(F, u32)> = None;
        for (t, heap) in &mut self.classes {
            let mut skipped = Vec::new();
            while let Some(Reverse((F(l), d))) = heap.pop() {
                let Some(&f) = self.free.get(&d) else { continue };
                if f == 0 {
                    continue; // full: dropped
                }
                let now = self.load[&d];
                if now != l {
                    heap.push(Reverse((F(now), d)));
                    continue;
                }
                skipped.push(Reverse((F(l), d)));
                let bad = held.contains(&d) || avoid_nodes.is_some_and(|ns| ns.contains(&ctx.devices[d as usize].node));
                if !bad {
                    let cost = F((l + x) / *t);
                    if best.is_none_or(|(c, bd)| (cost, d) < (c, bd)) {
                        best = Some((cost, d));
                    }
                    break;
                }
            }
            heap.extend(skipped);
        }
        best.map(|(_, d)| d)
    }

    /// Keep the replica where the current placement has it, if that is within stickiness.
    fn sticky(&self, ctx: &Ctx, x: f64, e: u32, held: &[u32], pick: u32) -> u32 {
        let Some(cur) = ctx.current.get(&e) else { return pick };
        if cur.contains(&pick) {
            return pick;
        }
        let cost = |d: u32| (self.load[&d] + x) / ctx.devices[d as usize].throughput;
        let limit = cost(pick) * (1.0 + ctx.stickiness);
        cur.iter()
            .copied()
            .filter(|d| self.free.get(d).is_some_and(|&f| f > 0) && !held.contains(d))
            .filter(|&d| cost(d) <= limit)
            .min_by(|&a, &b| F(cost(a)).cmp(&F(cost(b))).then(a.cmp(&b)))
            .unwrap_or(pick)
    }

    fn take(&mut self, d: u32, x: f64) {
        if let Some(l) = self.load.get_mut(&d) {
            *l += x;
        }
        if let Some(f) = self.free.get_mut(&d) {
            *f -= 1;
        }
        // The heap entry of `d` is now stale; `best` re-pushes it with its new load.
    }
}

/// Shares that minimise the largest load per throughput over `held`'s devices, given where the
/// replicas are: single replicas take everything; the others split by a parametric max-flow.
fn shares(ctx: &Ctx, w: &[f64], experts: &[u32], held: &[Vec<u32>]) -> Vec<Slot> {
    let mut fixed: HashMap<u32, f64> = HashMap::new();
    let mut multi: Vec<usize> = Vec::new();
    for (i, ds) in held.iter().enumerate() {
        let x = w[experts[i] as usize];
        if ds.len() == 1 || x <= 0.0 {
            for &d in ds {
                *fixed.entry(d).or_default() += x / ds.len() as f64;
            }
        } else {
            multi.push(i);
            for &d in ds {
                fixed.entry(d).or_default();
            }
        }
    }
    let even = |i: usize| -> Vec<Slot> {
        let n = held[i].len() as f64;
        held[i].iter().map(|&d| Slot { expert: experts[i], device: d, share: 1.0 / n }).collect()
    };
    let mut out: Vec<Slot> = Vec::with_capacity(held.iter().map(Vec::len).sum());
    for (i, ds) in held.iter().enumerate() {
        if ds.len() == 1 || w[experts[i] as usize] <= 0.0 {
            out.extend(even(i));
        }
    }
    if multi.is_empty() {
        return out;
    }
    // Devices the flow can move load between, and their load from single replicas.
    let devs: Vec<u32> = {
        let mut v: Vec<u32> = multi.iter().flat_map(|&i| held[i].iter().copied()).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let di: HashMap<u32, usize> = devs.iter().enumerate().map(|(j, &d)| (d, j)).collect();
    let t: Vec<f64> = devs.iter().map(|&d| ctx.devices[d as usize].throughput).collect();
    let base: Vec<f64> = devs.iter().map(|d| fixed[d]).collect();
    let total: f64 = multi.iter().map(|&i| w[experts[i] as usize]).sum();
    // Bounds on the best T: even shares give an upper one; everything spread ideally a lower.
    let mut even_load = base.clone();
    for &i in &multi {
        let x = w[experts[i] as usize] / held[i].len() as f64;
        for d in &held[i] {
            even_load[di[d]] += x;
        }
    }
    let mut hi = (0..devs.len()).map(|j| even_load[j] / t[j]).fold(0.0, f64::max);
    let mut lo = (0..devs.len())
        .map(|j| base[j] / t[j])
        .fold(0.0, f64::max)
        .max((total + base.iter().sum::<f64>()) / t.iter().sum::<f64>());
    let mut net = Flow::new(&multi, held, &di, devs.len());
    let supply: Vec<f64> = multi.iter().map(|&i| w[experts[i] as usize]).collect();
    let free: Vec<f64> = vec![f64::INFINITY; net.replica_edges.len()];
    let mut best: Option<Vec<f64>> = None;
    for _ in 0..40 {
        if hi - lo <= 1e-7 * hi {
            break;
        }
        let mid = 0.5 * (lo + hi);
        let caps: Vec<f64> = (0..devs.len()).map(|j| (mid * t[j] - base[j]).max(0.0)).collect();
        let (flow, edges) = net.run(&supply, &caps, &free);
        if flow >= total * (1.0 - 1e-9) {
            hi = mid;
            best = Some(edges);
        } else {
            lo = mid;
        }
    }
    let Some(mut edges) = best else {
        for &i in &multi {
            out.extend(even(i));
        }
        return out;
    };
    // Among optimal shares, the evenest. A max-flow picks extreme points, which can leave a
    // replica with next to no rows (0.02 against 0.98 where 0.45 against 0.55 levels the
    // devices as well), so: the smallest cap on any replica's share of its expert that still
    // keeps every device within 0.01% of the optimum, then a blend toward even shares as far
    // as that slack allows (all the way when even shares are within it).
    let target = hi * 1.0001;
    let caps: Vec<f64> = (0..devs.len()).map(|j| (target * t[j] - base[j]).max(0.0)).collect();
    let (mut u_lo, mut u_hi) = (0.0f64, 1.0f64);
    while u_hi - u_lo > 1e-3 {
        let u = 0.5 * (u_lo + u_hi);
        let limit: Vec<f64> = multi
            .iter()
            .flat_map(|&i| {
                let cap = w[experts[i] as usize] * u.max(1.0 / held[i].len() as f64);
                held[i].iter().map(move |_| cap)
            })
            .collect();
        let (flow, e) = net.run(&supply, &caps, &limit);
        if flow >= total * (1.0 - 1e-9) {
            u_hi = u;
            edges = e;
        } else {
            u_lo = u;
        }
    }
    {
        let mut flow_load = base.clone();
        let mut k = 0;
        for &i in &multi {
            for d in &held[i] {
                flow_load[di[d]] += edges[k].max(0.0);
                k += 1;
            }
        }
        let lambda = (0..devs.len())
            .filter(|&j| even_load[j] > flow_load[j])
            .map(|j| ((target * t[j] - flow_load[j]) / (even_load[j] - flow_load[j])).clamp(0.0, 1.0))
            .fold(1.0f64, f64::min);
        let mut k = 0;
        for &i in &multi {
            let x = w[experts[i] as usize] / held[i].len() as f64;
            for _ in &held[i] {
                edges[k] = lambda * x + (1.0 - lambda) * edges[k].max(0.0);
                k += 1;
            }
        }
    }
    let mut k = 0;
    for &i in &multi {
        let f: Vec<f64> = held[i]
            .iter()
            .map(|_| {
                let v = edges[k].max(0.0);
                k += 1;
                v
            })
            .collect();
        let sum: f64 = f.iter().sum();
        for (j, &d) in held[i].iter().enumerate() {
            let share = if sum > 0.0 { f[j] / sum } else { 1.0 / held[i].len() as f64 };
            out.push(Slot { expert: experts[i], device: d, share });
        }
    }
    out
}

/// Max-flow (Dinic) on source -> expert -> device -> sink with float capacities; the
/// expert -> device edges are the replicas, in `held` order.
struct Flow {
    n: usize,
    head: Vec<usize>,
    to: Vec<usize>,
    cap: Vec<f64>,
    next: Vec<usize>,
    /// Edge indices of the replica edges, in order.
    replica_edges: Vec<usize>,
    /// Edge indices of source -> expert and device -> sink.
    supply_edges: Vec<usize>,
    sink_edges: Vec<usize>,
    experts: usize,
}

const NONE: usize = usize::MAX;

impl Flow {
    fn new(multi: &[usize], held: &[Vec<u32>], di: &HashMap<u32, usize>, devs: usize) -> Self {
        let experts = multi.len();
        let n = experts + devs + 2;
        let mut f = Flow {
            n,
            head: vec![NONE; n],
            to: Vec::new(),
            cap: Vec::new(),
            next: Vec::new(),
            replica_edges: Vec::new(),
            supply_edges: Vec::new(),
            sink_edges: Vec::new(),
            experts,
        };
        let (s, t) = (n - 2, n - 1);
        for (a, &i) in multi.iter().enumerate() {
            let e = f.edge(s, a);
            f.supply_edges.push(e);
            for d in &held[i] {
                let e = f.edge(a, experts + di[d]);
                f.replica_edges.push(e);
            }
        }
        for j in 0..devs {
            let e = f.edge(experts + j, t);
            f.sink_edges.push(e);
        }
        f
    }

    fn edge(&mut self, a: usize, b: usize) -> usize {
        let i = self.to.len();
        for (x, y) in [(a, b), (b, a)] {
            self.to.push(y);
            self.cap.push(0.0);
            self.next.push(self.head[x]);
            self.head[x] = self.to.len() - 1;
        }
        i
    }

    /// Max flow with these supplies, device capacities and caps on the replica edges (in
    /// `replica_edges` order); (flow, flow on each replica edge).
    fn run(&mut self, supply: &[f64], sink: &[f64], replica: &[f64]) -> (f64, Vec<f64>) {
        for c in self.cap.iter_mut() {
            *c = 0.0;
        }
        for (k, &e) in self.supply_edges.iter().enumerate() {
            self.cap[e] = supply[k];
        }
        for (&e, &c) in self.replica_edges.iter().zip(replica) {
            self.cap[e] = c;
        }
        for (j, &e) in self.sink_edges.iter().enumerate() {
            self.cap[e] = sink[j];
        }
        let (s, t) = (self.n - 2, self.n - 1);
        let eps = 1e-12 * supply.iter().fold(0.0f64, |a, &b| a.max(b)).max(1e-300);
        let mut total = 0.0;
        let mut level = vec![0usize; self.n];
        let mut it = vec![NONE; self.n];
        loop {
            // BFS levels.
            level.fill(usize::MAX);
            level[s] = 0;
            let mut q = std::collections::VecDeque::from([s]);
            while let Some(u) = q.pop_front() {
                let mut e = self.head[u];
                while e != NONE {
                    let v = self.to[e];
                    if self.cap[e] > eps && level[v] == usize::MAX {
                        level[v] = level[u] + 1;
                        q.push_back(v);
                    }
                    e = self.next[e];
                }
            }
            if level[t] == usize::MAX {
                break;
            }
            it.copy_from_slice(&self.head);
            loop {
                let f = self.dfs(s, t, f64::INFINITY, &level, &mut it, eps);
                if f <= eps {
                    break;
                }
                total += f;
            }
        }
        let used: Vec<f64> = self.replica_edges.iter().map(|&e| self.cap[e ^ 1]).collect();
        debug_assert!(self.experts == self.supply_edges.len());
        (total, used)
    }

    fn dfs(&mut self, u: usize, t: usize, f: f64, level: &[usize], it: &mut [usize], eps: f64) -> f64 {
        if u == t {
            return f;
        }
        while it[u] != NONE {
            let e = it[u];
            let v = self.to[e];
            if self.cap[e] > eps && level[v] == level[u] + 1 {
                let d = self.dfs(v, t, f.min(self.cap[e]), level, it, eps);
                if d > eps {
                    self.cap[e] -= d;
                    self.cap[e ^ 1] += d;
                    return d;
                }
            }
            it[u] = self.next[e];
        }
        0.0
    }
}

#[cfg(test)]
mod tests;
