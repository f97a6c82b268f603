//! NCCL groups of a placement: which GPU workers share a communicator, and the unique ids that
//! rank 0 of each group reports, filled into the committed plan for every member.

use std::collections::BTreeMap;

use expertmesh_proto::v1::{NcclGroup, PlacementPlan, WorkerInfo};

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// One group per node of the plan's NCCL-capable workers (a CUDA device registered with
/// `nccl`), members in worker-id order; a node with one such worker gets a group of one (its
/// dispatcher reaches its own experts through the link).
pub fn plan_groups(workers: &[WorkerInfo]) -> Vec<NcclGroup> {
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for w in workers {
        if w.devices.iter().any(|d| d.kind == "cuda" && d.nccl) {
            by_node.entry(w.node.as_str()).or_default().push(w.worker_id.clone());
        }
    }
    by_node
        .into_iter()
        .map(|(node, mut members)| {
            members.sort();
            NcclGroup { name: node.to_string(), members, unique_id: Default::default() }
        })
        .collect()
}

/// The throughput placement weights `w` by. A measured device counts as the median of the
/// measurements of the same device (kind and name) on the same node: identical hardware
/// measures the same, and workers that start together on one machine probe while sharing it,
/// so one noisy probe must not move experts. A figure an operator set is used as set.
pub fn pooled_tflops(all: &[WorkerInfo], w: &WorkerInfo) -> f64 {
    w.devices
        .iter()
        .map(|d| {
            if !d.tflops_measured {
                return d.tflops;
            }
            let mut same: Vec<f64> = all
                .iter()
                .filter(|o| o.node == w.node)
                .flat_map(|o| &o.devices)
                .filter(|o| o.tflops_measured && o.kind == d.kind && model(&o.name) == model(&d.name))
                .map(|o| o.tflops)
                .collect();
            same.sort_by(f64::total_cmp);
            same.get(same.len() / 2).copied().unwrap_or(d.tflops)
        })
        .sum()
}

/// The hardware a backend's name describes, without the device index or what the backend
/// measured: `cuda:1 (NVIDIA H100, sm_90, 80 GiB)` -> `NVIDIA H100, sm_90, 80 GiB`,
/// `cpu (avx512, 2 threads; f32 FMA 176 GFLOP/s ...)` -> `avx512, 2 threads`.
fn model(name: &str) -> &str {
    let inner = name.split_once('(').map_or(name, |(_, r)| r);
    inner.split([';', ')']).next().unwrap_or(inner).trim()
}

/// The group of `plan` whose rank 0 is `worker`, if any.
pub fn led_by<'a>(plan: &'a PlacementPlan, worker: &str) -> Option<&'a NcclGroup> {
    plan.nccl_groups.iter().find(|g| g.members.first().is_some_and(|m| m == worker))
}

/// Fill each group's unique id from `ids` ((epoch, group) -> id), where one was reported.
pub fn fill_ids(plan: &mut PlacementPlan, ids: &BTreeMap<(u64, String), Vec<u8>>) {
    for g in &mut plan.nccl_groups {
        if let Some(id) = ids.get(&(plan.epoch, g.name.clone())) {
            g.unique_id = id.clone().into();
        }
    }
}

/// A reported id: rank 0 of `group` in `plan`, 128 bytes.
pub fn check_report(plan: &PlacementPlan, worker: &str, group: &str, id: &[u8]) -> Result<(), String> {
    if id.len() != NCCL_ID_BYTES {
        return Err(format!("an NCCL unique id has {NCCL_ID_BYTES} bytes; got {}", id.len()));
    }
    match plan.nccl_groups.iter().find(|g| g.name == group) {
        None => Err(format!("placement epoch {} has no NCCL group `{group}`", plan.epoch)),
        Some(g) if g.members.first().map(String::as_str) != Some(worker) => Err(format!(
            "worker {worker} is not rank 0 of NCCL group `{group}` in placement epoch {} (rank 0 is {})",
            plan.epoch,
            g.members.first().map(String::as_str).unwrap_or("nobody")
        )),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_proto::v1::DeviceInfo;

    fn w(id: &str, node: &str, kind: &str, nccl: bool) -> WorkerInfo {
        WorkerInfo {
            worker_id: id.into(),
            address: format!("{id}:1"),
            node: node.into(),
            devices: vec![DeviceInfo { kind: kind.into(), nccl, ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn measured_twins_on_a_node_count_as_their_median() {
        let m = |id: &str, node: &str, name: &str, tf: f64, measured: bool| WorkerInfo {
            worker_id: id.into(),
            node: node.into(),
            devices: vec![DeviceInfo {
                kind: "cpu".into(),
                name: name.into(),
                tflops: tf,
                tflops_measured: measured,
                ..Default::default()
            }],
            ..Default::default()
        };
        let ws = [
            m("a", "n1", "cpu (avx512, 2 threads; f32 FMA 176 GFLOP/s)", 0.1, true),
            m("b", "n1", "cpu (avx512, 2 threads; f32 FMA 105 GFLOP/s)", 0.3, true),
            m("c", "n1", "cpu (avx512, 2 threads; f32 FMA 130 GFLOP/s)", 0.2, true),
            m("d", "n1", "cpu (avx512, 1 threads; f32 FMA 176 GFLOP/s)", 0.9, true),
            m("e", "n2", "cpu (avx512, 2 threads; f32 FMA 176 GFLOP/s)", 0.5, true),
            m("f", "n1", "cpu (avx512, 2 threads; f32 FMA 176 GFLOP/s)", 4.0, false),
        ];
        let got: Vec<f64> = ws.iter().map(|w| pooled_tflops(&ws, w)).collect();
        assert_eq!(got, [0.2, 0.2, 0.2, 0.9, 0.5, 4.0]);
        assert_eq!(model("cuda:1 (NVIDIA H100 80GB HBM3, sm_90, 80 GiB)"), "NVIDIA H100 80GB HBM3, sm_90, 80 GiB");
        assert_eq!(model("cuda:0 (NVIDIA H100 80GB HBM3, sm_90, 80 GiB)"), "NVIDIA H100 80GB HBM3, sm_90, 80 GiB");
    }

    #[test]
    fn one_group_per_node_of_nccl_gpu_workers() {
        let ws = [
            w("g2", "a", "cuda", true),
            w("g1", "a", "cuda", true),
            w("c1", "a", "cpu", false),
            w("g3", "b", "cuda", true),
            w("g4", "b", "cuda", false),
        ];
        let gs = plan_groups(&ws);
        assert_eq!(gs.len(), 2);
        assert_eq!((gs[0].name.as_str(), &gs[0].members[..]), ("a", &["g1".to_string(), "g2".to_string()][..]));
        assert_eq!((gs[1].name.as_str(), &gs[1].members[..]), ("b", &["g3".to_string()][..]));
        let mut plan = PlacementPlan { epoch: 5, nccl_groups: gs, ..Default::default() };
        assert_eq!(led_by(&plan, "g1").map(|g| g.name.as_str()), Some("a"));
        assert!(led_by(&plan, "g2").is_none());
        assert!(check_report(&plan, "g1", "a", &[7; 128]).is_ok());
        assert!(check_report(&plan, "g2", "a", &[7; 128]).unwrap_err().contains("not rank 0"));
        assert!(check_report(&plan, "g1", "a", &[7; 12]).unwrap_err().contains("128 bytes"));
        assert!(check_report(&plan, "g1", "zz", &[7; 128]).unwrap_err().contains("no NCCL group"));
        let ids = [((5, "a".to_string()), vec![1u8; 128]), ((4, "b".to_string()), vec![2u8; 128])].into();
        fill_ids(&mut plan, &ids);
        assert_eq!(&plan.nccl_groups[0].unique_id[..], &[1u8; 128][..]);
        assert!(plan.nccl_groups[1].unique_id.is_empty(), "an id of another epoch is not used");
    }
}
