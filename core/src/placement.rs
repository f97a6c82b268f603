//! Placement: which worker holds which routed expert of which layer.
//!
//! Behind a trait so that load-aware balancing (a later piece of work) slots in beside the
//! first policy here, which spreads experts by device capacity.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};

use crate::error::{CoreError, Result};

/// What a worker offers for expert weights.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCapacity {
    pub id: String,
    pub node: String,
    pub memory_bytes: u64,
    /// Relative compute weight (TFLOP/s); 0 falls back to memory.
    pub tflops: f64,
}

impl WorkerCapacity {
    /// How much of the load this worker should take: its throughput rounded to half-octave
    /// steps (probes of the same hardware differ by noise, more so when workers start together
    /// on one machine, and a few percent must not move experts), or its memory when it gives no
    /// throughput.
    pub fn weight(&self) -> f64 {
        if self.tflops > 0.0 && self.tflops.is_finite() {
            2f64.powf((2.0 * self.tflops.log2()).round() / 2.0)
        } else {
            (self.memory_bytes as f64).max(1.0)
        }
    }
}

/// What must be placed.
#[derive(Debug, Clone)]
pub struct PlacementRequest {
    pub layers: Vec<usize>,
    pub experts: usize,
    /// Bytes one expert occupies on a worker.
    pub expert_bytes: u64,
    /// Copies of every expert, on distinct workers.
    pub replicas: usize,
}

/// A placement: for each layer, for each routed expert, the indices (into `workers`) of the
/// workers holding a replica.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub workers: Vec<String>,
    pub layers: BTreeMap<usize, Vec<Vec<u32>>>,
}

impl Plan {
    /// (layer, expert) pairs held by worker `w`.
    pub fn held_by(&self, w: u32) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (&l, experts) in &self.layers {
            for (e, reps) in experts.iter().enumerate() {
                if reps.contains(&w) {
                    out.push((l, e));
                }
            }
        }
        out
    }

    /// Check every expert of every layer has at least one valid replica.
    pub fn validate(&self, req: &PlacementRequest) -> Result<()> {
        for &l in &req.layers {
            let experts =
                self.layers.get(&l).ok_or_else(|| CoreError::Placement(format!("layer {l} is not placed")))?;
            if experts.len() != req.experts {
                return Err(CoreError::Placement(format!(
                    "layer {l} places {} of {} experts",
                    experts.len(),
                    req.experts
                )));
            }
            for (e, reps) in experts.iter().enumerate() {
                if reps.is_empty() || reps.iter().any(|w| *w as usize >= self.workers.len()) {
                    return Err(CoreError::Placement(format!("layer {l} expert {e} has no valid worker")));
                }
            }
        }
        Ok(())
    }
}

/// A placement algorithm.
pub trait PlacementPolicy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn place(&self, req: &PlacementRequest, workers: &[WorkerCapacity]) -> Result<Plan>;
}

/// Spread experts in proportion to each worker's compute (or memory), within its memory,
/// replicas on distinct workers and, where possible, distinct nodes. Deterministic: the same
/// inputs give the same plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct CapacitySpread;

/// A worker's key in [`CapacitySpread`]'s heap: the load its next expert would give it, then
/// its index (the scan's tie-break).
#[derive(Debug, Clone, Copy)]
struct Next {
    key: f64,
    worker: usize,
}

impl Ord for Next {
    fn cmp(&self, o: &Self) -> Ordering {
        self.key.total_cmp(&o.key).then(self.worker.cmp(&o.worker))
    }
}
impl PartialOrd for Next {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Next {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Next {}

impl PlacementPolicy for CapacitySpread {
    fn name(&self) -> &'static str {
        "capacity-spread"
    }

    fn place(&self, req: &PlacementRequest, workers: &[WorkerCapacity]) -> Result<Plan> {
        if workers.is_empty() {
            return Err(CoreError::Placement("no workers to place experts on".into()));
        }
        let r = req.replicas.max(1);
        if r > workers.len() {
            return Err(CoreError::Placement(format!(
                "{r} replicas of every expert need {r} workers; the cluster has {}",
                workers.len()
            )));
        }
        let total_slots = (req.layers.len() * req.experts * r) as u64;
        let need = total_slots * req.expert_bytes;
        let have: u64 = workers.iter().map(|w| w.memory_bytes).sum();
        if need > have {
            return Err(CoreError::Placement(format!(
                "{} layers x {} experts x {r} replicas need {need} bytes; the workers offer {have}",
                req.layers.len(),
                req.experts
            )));
        }
        let weight: Vec<f64> = workers.iter().map(WorkerCapacity::weight).collect();
        let cap: Vec<u64> =
            workers.iter().map(|w| w.memory_bytes.checked_div(req.expert_bytes).unwrap_or(u64::MAX)).collect();
        // The heap makes the same choices as the scan when there are no replicas to keep apart:
        // thousands of devices in one plan (`expertmesh plan` on a large inventory) take
        // milliseconds instead of minutes.
        let layers =
            if r == 1 { spread_heap(req, &weight, &cap)? } else { spread_scan(req, workers, r, &weight, &cap)? };
        let plan = Plan { workers: workers.iter().map(|w| w.id.clone()).collect(), layers };
        plan.validate(req)?;
        Ok(plan)
    }
}

type Layers = BTreeMap<usize, Vec<Vec<u32>>>;

/// One replica per expert: each to the worker whose load after it, `(count + 1) / weight`, is
/// least (then the lowest index), among those with room.
fn spread_heap(req: &PlacementRequest, weight: &[f64], cap: &[u64]) -> Result<Layers> {
    let mut count = vec![0u64; weight.len()];
    let mut heap: BinaryHeap<Reverse<Next>> =
        (0..weight.len()).filter(|&w| cap[w] > 0).map(|w| Reverse(Next { key: 1.0 / weight[w], worker: w })).collect();
    let mut layers = BTreeMap::new();
    for &l in &req.layers {
        let mut experts = Vec::with_capacity(req.experts);
        for e in 0..req.experts {
            let Reverse(Next { worker: w, .. }) = heap.pop().ok_or_else(|| {
                CoreError::Placement(format!("no worker has room for layer {l} expert {e} replica 0"))
            })?;
            count[w] += 1;
            if count[w] < cap[w] {
                heap.push(Reverse(Next { key: (count[w] + 1) as f64 / weight[w], worker: w }));
            }
            experts.push(vec![w as u32]);
        }
        layers.insert(l, experts);
    }
    Ok(layers)
}

/// `r` replicas per expert on distinct workers, on distinct nodes where it can: each replica
/// to the worker on a node the expert does not use yet, then with the least load after it.
fn spread_scan(
    req: &PlacementRequest,
    workers: &[WorkerCapacity],
    r: usize,
    weight: &[f64],
    cap: &[u64],
) -> Result<Layers> {
    let mut count = vec![0u64; workers.len()];
    let mut layers = BTreeMap::new();
    for &l in &req.layers {
        let mut experts = Vec::with_capacity(req.experts);
        for e in 0..req.experts {
            let mut reps: Vec<u32> = Vec::with_capacity(r);
            for _ in 0..r {
                let nodes: Vec<&str> = reps.iter().map(|&w| workers[w as usize].node.as_str()).collect();
                let pick = (0..workers.len())
                    .filter(|&w| !reps.contains(&(w as u32)) && count[w] < cap[w])
                    .min_by(|&a, &b| {
                        let na = nodes.contains(&workers[a].node.as_str());
                        let nb = nodes.contains(&workers[b].node.as_str());
                        na.cmp(&nb)
                            .then(((count[a] + 1) as f64 / weight[a]).total_cmp(&((count[b] + 1) as f64 / weight[b])))
                            .then(a.cmp(&b))
                    })
                    .ok_or_else(|| {
                        CoreError::Placement(format!(
                            "no worker has room for layer {l} expert {e} replica {}",
                            reps.len()
                        ))
                    })?;
                count[pick] += 1;
                reps.push(pick as u32);
            }
            experts.push(reps);
        }
        layers.insert(l, experts);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, node: &str, mem: u64, tf: f64) -> WorkerCapacity {
        WorkerCapacity { id: id.into(), node: node.into(), memory_bytes: mem, tflops: tf }
    }

    #[test]
    fn spreads_by_compute_and_respects_memory() {
        let req = PlacementRequest { layers: vec![1, 2], experts: 30, expert_bytes: 10, replicas: 1 };
        let ws = [w("a", "n0", 1000, 2.0), w("b", "n1", 1000, 1.0)];
        let p = CapacitySpread.place(&req, &ws).unwrap();
        assert_eq!(p.held_by(0).len(), 40);
        assert_eq!(p.held_by(1).len(), 20);
        let small = [w("a", "n0", 100, 2.0), w("b", "n1", 1000, 1.0)];
        let p = CapacitySpread.place(&req, &small).unwrap();
        assert_eq!(p.held_by(0).len(), 10, "memory caps worker a at 10 experts");
        let e = CapacitySpread.place(&req, &[w("a", "n0", 100, 1.0)]).unwrap_err();
        assert!(e.to_string().contains("need 600 bytes"), "{e}");
    }

    #[test]
    fn replicas_on_distinct_workers_and_nodes() {
        let req = PlacementRequest { layers: vec![0], experts: 8, expert_bytes: 1, replicas: 2 };
        let ws = [w("a", "n0", 100, 1.0), w("b", "n0", 100, 1.0), w("c", "n1", 100, 1.0), w("d", "n1", 100, 1.0)];
        let p = CapacitySpread.place(&req, &ws).unwrap();
        for reps in &p.layers[&0] {
            assert_eq!(reps.len(), 2);
            assert_ne!(reps[0], reps[1]);
            assert_ne!(ws[reps[0] as usize].node, ws[reps[1] as usize].node);
        }
    }

    proptest::proptest! {
        /// With one replica the heap chooses exactly what the scan does (ties, memory caps,
        /// workers without room, running out of room included).
        #[test]
        fn the_heap_places_as_the_scan_does(
            spec in proptest::collection::vec((0u64..40, 0u32..6), 1..12),
            layers in 1usize..5,
            experts in 1usize..40,
        ) {
            let ws: Vec<WorkerCapacity> = spec
                .iter()
                .enumerate()
                .map(|(i, &(mem, tf))| w(&format!("w{i}"), &format!("n{}", i % 3), mem, tf as f64 * 0.5))
                .collect();
            let req = PlacementRequest { layers: (0..layers).collect(), experts, expert_bytes: 1, replicas: 1 };
            let weight: Vec<f64> = ws.iter().map(WorkerCapacity::weight).collect();
            let cap: Vec<u64> = ws.iter().map(|w| w.memory_bytes).collect();
            let heap = spread_heap(&req, &weight, &cap).map_err(|e| e.to_string());
            let scan = spread_scan(&req, &ws, 1, &weight, &cap).map_err(|e| e.to_string());
            proptest::prop_assert_eq!(heap, scan);
        }
    }
}
