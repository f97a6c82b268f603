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
        }
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
