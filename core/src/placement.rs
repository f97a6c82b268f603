//! Placement: which worker holds which routed expert of which layer.
//!
//! Behind a trait so that load-aware balancing (a later piece of work) slots in beside the
//! first policy here, which spreads experts by device capacity.

use std::collections::BTreeMap;

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
        let mut count = vec![0u64; workers.len()];
        let mut plan = Plan { workers: workers.iter().map(|w| w.id.clone()).collect(), layers: BTreeMap::new() };
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
                                .then(
                                    ((count[a] + 1) as f64 / weight[a]).total_cmp(&((count[b] + 1) as f64 / weight[b])),
                                )
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
            plan.layers.insert(l, experts);
        }
        plan.validate(req)?;
        Ok(plan)
    }
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
}
