//! Load-aware placement for the leader: the expert loads of a sliding window (from the
//! differences between workers' load reports), the cluster as `core::balance` sees it, and the
//! conversions between its placements and the plans the store holds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use expertmesh_core::balance::{Device, LayerPlacement as Layer, Placement, Slot};
use expertmesh_core::placement::WorkerCapacity;
use expertmesh_proto::v1::{LayerPlacement, PlacementPlan, Replicas, WorkerInfo};

/// Tokens per (layer, expert) over the last `span`, in buckets of `span / 10`.
#[derive(Debug)]
pub(crate) struct LoadWindow {
    span: Duration,
    bucket: Duration,
    /// MoE layer -> row of the loads.
    layer_index: HashMap<u32, usize>,
    experts: usize,
    buckets: VecDeque<(Instant, Vec<f64>)>,
}

impl LoadWindow {
    pub(crate) fn new(span: Duration, layers: &[usize], experts: usize) -> Self {
        Self {
            span,
            bucket: (span / 10).max(Duration::from_millis(100)),
            layer_index: layers.iter().enumerate().map(|(i, &l)| (l as u32, i)).collect(),
            experts,
            buckets: VecDeque::new(),
        }
    }

    /// Count `tokens` more for (layer, expert) now.
    pub(crate) fn add(&mut self, layer: u32, expert: u32, tokens: u64, now: Instant) {
        let (Some(&l), true) = (self.layer_index.get(&layer), (expert as usize) < self.experts) else { return };
        if self.buckets.back().is_none_or(|(t, _)| now.duration_since(*t) >= self.bucket) {
            self.buckets.push_back((now, vec![0.0; self.layer_index.len() * self.experts]));
        }
        while self.buckets.front().is_some_and(|(t, _)| now.duration_since(*t) > self.span) {
            self.buckets.pop_front();
        }
        if let Some((_, v)) = self.buckets.back_mut() {
            v[l * self.experts + expert as usize] += tokens as f64;
        }
    }

    /// Loads per layer (in the order of the layers given at construction) and per expert, their
    /// total, and the seconds the window covers.
    pub(crate) fn loads(&self, now: Instant) -> (Vec<Vec<f64>>, f64, f64) {
        let mut out = vec![vec![0.0; self.experts]; self.layer_index.len()];
        let mut oldest = now;
        for (t, v) in self.buckets.iter().filter(|(t, _)| now.duration_since(*t) <= self.span) {
            oldest = oldest.min(*t);
            for (i, x) in v.iter().enumerate() {
                out[i / self.experts][i % self.experts] += x;
            }
        }
        let total = out.iter().flatten().sum();
        (out, total, now.duration_since(oldest).as_secs_f64())
    }
}

/// What a worker offers, as the coordinator weighs it.
pub fn capacity(w: &WorkerInfo, all: &[WorkerInfo]) -> WorkerCapacity {
    WorkerCapacity {
        id: w.worker_id.clone(),
        node: w.node.clone(),
        memory_bytes: w.devices.iter().map(|d| d.memory_bytes).sum(),
        tflops: expertmesh_cluster::groups::pooled_tflops(all, w),
    }
}

/// The workers as devices for `core::balance`: node indices by name, throughput the worker's
/// placement weight, slots its memory over one expert's bytes.
pub fn devices(workers: &[WorkerInfo], expert_bytes: u64) -> Vec<Device> {
    let mut names: Vec<&str> = workers.iter().map(|w| w.node.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    workers
        .iter()
        .map(|w| {
            let c = capacity(w, workers);
            Device {
                node: names.binary_search(&w.node.as_str()).unwrap_or(0) as u32,
                throughput: c.weight(),
                slots: usize::try_from(c.memory_bytes.checked_div(expert_bytes).unwrap_or(u64::MAX))
                    .unwrap_or(usize::MAX),
            }
        })
        .collect()
}

/// A stored plan as a placement over `workers` (by id; replicas on workers not among them
/// are dropped), layers in the order of `layers`.
pub fn placement_of(plan: &PlacementPlan, workers: &[WorkerInfo], layers: &[usize]) -> Placement {
    let index: HashMap<&str, u32> = workers.iter().enumerate().map(|(i, w)| (w.worker_id.as_str(), i as u32)).collect();
    let by_layer: BTreeMap<u32, &LayerPlacement> = plan.layers.iter().map(|l| (l.layer, l)).collect();
    let layers = layers
        .iter()
        .map(|&l| {
            let mut slots = Vec::new();
            if let Some(lp) = by_layer.get(&(l as u32)) {
                for (e, r) in lp.experts.iter().enumerate() {
                    let even = 1.0 / r.workers.len().max(1) as f64;
                    for (i, w) in r.workers.iter().enumerate() {
                        let id = plan.workers.get(*w as usize).map(|w| w.worker_id.as_str()).unwrap_or_default();
                        if let Some(&d) = index.get(id) {
                            let share = r.shares.get(i).map_or(even, |&s| f64::from(s));
                            slots.push(Slot { expert: e as u32, device: d, share });
                        }
                    }
                }
            }
            slots.sort_by_key(|s| (s.device, s.expert));
            Layer { slots }
        })
        .collect();
    Placement { policy: None, layers }
}

/// A placement as the layers of a stored plan.
pub(crate) fn layers_of(p: &Placement, layers: &[usize], experts: usize) -> Vec<LayerPlacement> {
    p.layers
        .iter()
        .zip(layers)
        .map(|(lp, &l)| {
            let mut reps = vec![Replicas::default(); experts];
            for s in &lp.slots {
                let r = &mut reps[s.expert as usize];
                r.workers.push(s.device);
                r.shares.push(s.share as f32);
            }
            LayerPlacement { layer: l as u32, experts: reps }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_proto::v1::DeviceInfo;

    fn w(id: &str, node: &str, gib: u64, tflops: f64) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            node: node.into(),
            devices: vec![DeviceInfo { memory_bytes: gib << 30, tflops, ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn the_window_counts_recent_tokens_only() {
        let mut win = LoadWindow::new(Duration::from_secs(10), &[3, 5], 4);
        let t0 = Instant::now();
        win.add(3, 1, 100, t0);
        win.add(5, 2, 7, t0 + Duration::from_secs(2));
        win.add(9, 0, 1000, t0 + Duration::from_secs(2)); // not a MoE layer: ignored
        win.add(3, 4, 1000, t0 + Duration::from_secs(2)); // no such expert: ignored
        let (l, total, _) = win.loads(t0 + Duration::from_secs(5));
        assert_eq!((l[0][1], l[1][2], total), (100.0, 7.0, 107.0));
        win.add(3, 0, 1, t0 + Duration::from_secs(11));
        let (l, total, secs) = win.loads(t0 + Duration::from_secs(11));
        assert_eq!((l[0][1], l[1][2], total), (0.0, 7.0, 8.0), "the first bucket aged out");
        assert!(secs <= 10.0);
    }

    #[test]
    fn plans_and_placements_convert_both_ways_by_worker_id() {
        let ws = vec![w("a", "n0", 1, 1.0), w("b", "n1", 1, 1.0), w("c", "n1", 2, 4.0)];
        let devs = devices(&ws, 256 << 20);
        assert_eq!(devs.iter().map(|d| (d.node, d.slots)).collect::<Vec<_>>(), [(0, 4), (1, 4), (1, 8)]);
        assert!(devs[2].throughput > devs[0].throughput);
        let plan = PlacementPlan {
            epoch: 1,
            workers: ws.clone(),
            layers: vec![LayerPlacement {
                layer: 3,
                experts: vec![
                    Replicas { workers: vec![0, 2], shares: vec![0.25, 0.75] },
                    Replicas { workers: vec![1], shares: vec![] },
                ],
            }],
            ..Default::default()
        };
        // The same workers in another order, one gone.
        let now = vec![ws[2].clone(), ws[1].clone()];
        let p = placement_of(&plan, &now, &[3]);
        assert_eq!(
            p.layers[0].slots,
            [Slot { expert: 0, device: 0, share: 0.75 }, Slot { expert: 1, device: 1, share: 1.0 }]
        );
        let back = layers_of(&p, &[3], 2);
        assert_eq!(back[0].experts[0], Replicas { workers: vec![0], shares: vec![0.75] });
        assert_eq!(back[0].layer, 3);
    }
}
