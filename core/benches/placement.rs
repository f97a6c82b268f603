//! Placement balance and speed, printed as JSON lines.
//!
//! Balance: the mean over layers of max/mean device load, for the V3 shape (58 layers x 256
//! experts, 8 groups) on 32, 64, 144 and 320 devices (8 per node) with Zipf-skewed loads
//! (s = 1.0 and 1.5), for three placements given the same slots:
//! - `none`: no replicas, experts dealt evenly (what plain expert parallelism does);
//! - `eplb`: DeepSeek EPLB's published greedy steps, implemented below from its description
//!   (pack groups to nodes, replicate the heaviest per-replica load, pack replicas onto GPUs by
//!   lightest pack; tokens split evenly over an expert's replicas; hierarchical when the groups
//!   divide over the nodes, else one group on one node);
//! - `ours`: `expertmesh_core::balance::place` with `Policy::Auto`.
//!
//! EPLB's setting gives every device the same number of slots, so each device gets
//! S = ceil((256 + 32) / devices) slots and a layer N x S physical experts: 32 redundant on 32
//! and 144 devices, 64 on 64 and 320 (where 288 is not a multiple of the device count).
//!
//! `lower_bound` is what no placement with those slots can beat (an expert with c replicas puts
//! at least load / c on some device; the greedy counts minimise the largest such load): where
//! EPLB already reaches it (one or two slots per device), nothing can do better.
//!
//! Speed: the V4-Pro shape (61 layers x 384 experts) onto 1024 devices, one slot each, one
//! thread.
//!
//! `cargo bench -p expertmesh-core --bench placement`; under `cargo test` (no `--bench`
//! argument) one small case runs and its results are checked.

use std::time::Instant;

use expertmesh_core::balance::{
    even_placement, place, zipf_loads, Device, LayerPlacement, Placement, Policy, Problem, Slot,
};

/// EPLB's `balanced_packing`: items in decreasing weight, each to the lightest pack that still
/// has fewer than `per_pack` items. Returns the pack of each item.
fn balanced_packing(weight: &[f64], packs: usize) -> Vec<usize> {
    let per_pack = weight.len() / packs;
    let mut order: Vec<usize> = (0..weight.len()).collect();
    order.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
    let (mut load, mut items) = (vec![0.0f64; packs], vec![0usize; packs]);
    let mut out = vec![0; weight.len()];
    for i in order {
        let p = (0..packs)
            .filter(|&p| items[p] < per_pack)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .expect("a pack with room");
        out[i] = p;
        load[p] += weight[i];
        items[p] += 1;
    }
    out
}

/// EPLB's `replicate_experts`: each extra replica to the expert with the heaviest load per
/// replica. Returns (physical -> logical, replica counts).
fn replicate_experts(weight: &[f64], physical: usize) -> (Vec<usize>, Vec<usize>) {
    let mut phy: Vec<usize> = (0..weight.len()).collect();
    let mut count = vec![1usize; weight.len()];
    for _ in weight.len()..physical {
        let e = (0..weight.len())
            .max_by(|&a, &b| (weight[a] / count[a] as f64).total_cmp(&(weight[b] / count[b] as f64)).then(b.cmp(&a)))
            .expect("experts");
        phy.push(e);
        count[e] += 1;
    }
    (phy, count)
}

/// EPLB's `rebalance_experts` for one layer: its slots (device, expert, share = 1 / count).
fn eplb_layer(w: &[f64], physical: usize, groups: usize, nodes: usize, gpus: usize) -> Vec<Slot> {
    let (groups, nodes) = if groups.is_multiple_of(nodes) { (groups, nodes) } else { (1, 1) };
    let experts = w.len();
    let group_size = experts / groups;
    let group_load: Vec<f64> = (0..groups).map(|g| w[g * group_size..(g + 1) * group_size].iter().sum()).collect();
    let group_node = balanced_packing(&group_load, nodes);
    let gpus_per_node = gpus / nodes;
    let mut slots = Vec::with_capacity(physical);
    for node in 0..nodes {
        let logical: Vec<usize> =
            (0..groups).filter(|&g| group_node[g] == node).flat_map(|g| g * group_size..(g + 1) * group_size).collect();
        let wl: Vec<f64> = logical.iter().map(|&e| w[e]).collect();
        let (phy, count) = replicate_experts(&wl, physical / nodes);
        let per_phy: Vec<f64> = phy.iter().map(|&m| wl[m] / count[m] as f64).collect();
        let gpu = balanced_packing(&per_phy, gpus_per_node);
        for (i, &m) in phy.iter().enumerate() {
            slots.push(Slot {
                expert: logical[m] as u32,
                device: (node * gpus_per_node + gpu[i]) as u32,
                share: 1.0 / count[m] as f64,
            });
        }
    }
    slots
}

fn eplb(loads: &[Vec<f64>], physical: usize, groups: usize, nodes: usize, gpus: usize) -> Placement {
    Placement {
        policy: None,
        layers: loads.iter().map(|w| LayerPlacement { slots: eplb_layer(w, physical, groups, nodes, gpus) }).collect(),
    }
}

struct Case {
    layers: usize,
    experts: usize,
    groups: usize,
    devices: usize,
    s: f64,
}

fn balance_case(c: &Case) -> serde_json::Value {
    let per_node = 8.min(c.devices);
    let nodes = c.devices / per_node;
    let slots = (c.experts + 32).div_ceil(c.devices);
    let physical = slots * c.devices;
    let devs: Vec<Device> = (0..c.devices)
        .map(|d| Device { node: (d / per_node) as u32, throughput: 1.0, slots: slots * c.layers })
        .collect();
    let loads = zipf_loads(c.layers, c.experts, c.s, 1e6, 1000 + c.devices as u64 + (c.s * 10.0) as u64);
    let none = even_placement(c.layers, c.experts, c.devices).imbalance(&loads, &devs);
    let t = Instant::now();
    let base = eplb(&loads, physical, c.groups, nodes, c.devices);
    let eplb_s = t.elapsed().as_secs_f64();
    let base_imb = base.imbalance(&loads, &devs);
    let t = Instant::now();
    let ours = place(&Problem {
        loads: &loads,
        devices: &devs,
        physical,
        min_replicas: 1,
        groups: c.groups,
        policy: Policy::Auto,
        current: None,
        stickiness: 0.0,
    })
    .expect("placement");
    let ours_s = t.elapsed().as_secs_f64();
    let ours_imb = ours.imbalance(&loads, &devs);
    serde_json::json!({
        "bench": "placement_balance",
        "shape": format!("{} layers x {} experts, {} groups", c.layers, c.experts, c.groups),
        "devices": c.devices, "nodes": nodes, "slots_per_device": slots, "redundant": physical - c.experts,
        "zipf_s": c.s,
        "policy": ours.policy.map(Policy::name),
        "imbalance": {"none": round(none), "eplb": round(base_imb), "ours": round(ours_imb),
                      "lower_bound": round(lower_bound(&loads, physical, c.devices))},
        "ours_over_eplb": round(ours_imb / base_imb),
        "seconds": {"eplb": round(eplb_s), "ours": round(ours_s)},
    })
}

/// A lower bound on any placement's imbalance with these slots, per layer averaged: an expert
/// with c replicas puts at least load / c on one device, and the best counts for that are the
/// greedy ones (`replicate_experts`, capped at one replica per device).
fn lower_bound(loads: &[Vec<f64>], physical: usize, devices: usize) -> f64 {
    let per_layer: Vec<f64> = loads
        .iter()
        .map(|w| {
            let mut count = vec![1usize; w.len()];
            for _ in w.len()..physical {
                let e = (0..w.len())
                    .filter(|&e| count[e] < devices)
                    .max_by(|&a, &b| (w[a] / count[a] as f64).total_cmp(&(w[b] / count[b] as f64)))
                    .expect("an expert to replicate");
                count[e] += 1;
            }
            let worst = (0..w.len()).map(|e| w[e] / count[e] as f64).fold(0.0, f64::max);
            let mean = w.iter().sum::<f64>() / devices as f64;
            worst.max(mean) / mean
        })
        .collect();
    per_layer.iter().sum::<f64>() / per_layer.len() as f64
}

fn round(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn speed(layers: usize, experts: usize, devices: usize, rounds: usize) -> serde_json::Value {
    let devs: Vec<Device> =
        (0..devices).map(|d| Device { node: (d / 8) as u32, throughput: 1.0, slots: layers }).collect();
    let loads = zipf_loads(layers, experts, 1.0, 1e6, 7);
    let mut times = Vec::new();
    let mut imb = 0.0;
    for _ in 0..rounds {
        let t = Instant::now();
        let p = place(&Problem {
            loads: &loads,
            devices: &devs,
            physical: devices,
            min_replicas: 1,
            groups: 1,
            policy: Policy::Auto,
            current: None,
            stickiness: 0.0,
        })
        .expect("placement");
        times.push(t.elapsed().as_secs_f64());
        imb = p.imbalance(&loads, &devs);
    }
    times.sort_by(f64::total_cmp);
    serde_json::json!({
        "bench": "placement_speed",
        "shape": format!("{layers} layers x {experts} experts onto {devices} devices, 1 slot each"),
        "threads": 1,
        "seconds_median": round(times[times.len() / 2]),
        "seconds_min": round(times[0]),
        "imbalance": round(imb),
    })
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        // Smoke test under `cargo test`: a small case, checked.
        let v = balance_case(&Case { layers: 4, experts: 64, groups: 8, devices: 16, s: 1.2 });
        println!("{v}");
        let imb = &v["imbalance"];
        let (none, base, ours) =
            (imb["none"].as_f64().unwrap(), imb["eplb"].as_f64().unwrap(), imb["ours"].as_f64().unwrap());
        assert!(ours <= base && base < none, "{v}");
        return;
    }
    for devices in [32, 64, 144, 320] {
        for s in [1.0, 1.5] {
            println!("{}", balance_case(&Case { layers: 58, experts: 256, groups: 8, devices, s }));
        }
    }
    println!("{}", speed(61, 384, 1024, 5));
}
