//! The coordinator's side of NCCL groups, with real processes and members that only look like
//! GPU workers (no GPU here): a placement groups the NCCL-capable CUDA workers of a node, rank
//! 0 reports the group's unique id with its readiness, and the committed plan hands the id to
//! every member. A report from anyone but rank 0, or of an id that is not 128 bytes, is refused
//! with the reason.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::fake::{coordinator, healthy_looking_server, register_and_heartbeat};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_proto::v1::{
    DeviceInfo, GetPlacementRequest, PlacementPlan, ReportReadyRequest, WatchPlacementRequest, WorkerInfo,
};

fn gpu(id: &str, address: &str, node: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.into(),
        address: address.into(),
        node: node.into(),
        devices: vec![DeviceInfo {
            kind: "cuda".into(),
            index: 0,
            memory_bytes: 64 << 30,
            tflops: 400.0,
            name: "a GPU that is not here".into(),
            memory_total_bytes: 80 << 30,
            tflops_measured: true,
            nccl: true,
        }],
        ..Default::default()
    }
}

fn ready(worker: &str, epoch: u64, group: &str, id: &[u8]) -> ReportReadyRequest {
    ReportReadyRequest {
        worker_id: worker.into(),
        epoch,
        error: String::new(),
        nccl_group: group.into(),
        nccl_unique_id: id.to_vec().into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_plan_hands_rank_zeros_id_to_every_member() {
    let ov = PresetOverrides { hidden: Some(64), ffn: Some(32), ..Default::default() };
    let (dir, _) = gen_model("tiny-v3", DType::BF16, ov, 31);
    let cluster = Cluster::coordinator_only(dir.path(), 3, &["--ready-timeout-ms", "60000"]);
    let mut c = coordinator(&cluster.coordinator.addr).await;
    let mut servers = Vec::new();
    let mut beats = Vec::new();
    for (id, node) in [("g1", "box-a"), ("g0", "box-a"), ("g2", "box-b")] {
        let (addr, server) = healthy_looking_server().await;
        beats.push(register_and_heartbeat(&mut c, gpu(id, &addr, node)).await);
        servers.push(server);
    }
    // The proposed plan: one group per node, members in id order, no ids yet.
    let mut events = c.watch_placement(WatchPlacementRequest {}).await.unwrap().into_inner();
    let t0 = Instant::now();
    let proposed: PlacementPlan = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), events.message()).await.unwrap().unwrap().unwrap();
        if !ev.committed {
            break ev.plan.unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
    };
    let groups: Vec<(&str, Vec<&str>)> = proposed
        .nccl_groups
        .iter()
        .map(|g| (g.name.as_str(), g.members.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(groups, [("box-a", vec!["g0", "g1"]), ("box-b", vec!["g2"])]);
    assert!(proposed.nccl_groups.iter().all(|g| g.unique_id.is_empty()));

    let e = proposed.epoch;
    let err = c.report_ready(ready("g1", e, "box-a", &[1; 128])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("g1 is not rank 0 of NCCL group `box-a`"), "{}", err.message());
    let err = c.report_ready(ready("g0", e, "box-a", &[1; 12])).await.unwrap_err();
    assert!(err.message().contains("128 bytes"), "{}", err.message());
    let err = c.report_ready(ready("g0", e, "box-z", &[1; 128])).await.unwrap_err();
    assert!(err.message().contains("no NCCL group `box-z`"), "{}", err.message());

    let (id_a, id_b) = ([7u8; 128], [9u8; 128]);
    c.report_ready(ready("g0", e, "box-a", &id_a)).await.unwrap();
    c.report_ready(ready("g1", e, "", &[])).await.unwrap();
    c.report_ready(ready("g2", e, "box-b", &id_b)).await.unwrap();
    let committed = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), events.message()).await.unwrap().unwrap().unwrap();
        if ev.committed && ev.plan.as_ref().is_some_and(|p| p.epoch == e) {
            break ev.plan.unwrap();
        }
    };
    let ids: Vec<&[u8]> = committed.nccl_groups.iter().map(|g| &g.unique_id[..]).collect();
    assert_eq!(ids, [&id_a[..], &id_b[..]], "the watch's committed plan carries the ids");
    let got = c.get_placement(GetPlacementRequest {}).await.unwrap().into_inner();
    assert_eq!(got.nccl_groups, committed.nccl_groups, "GetPlacement agrees");
    for t in beats.into_iter().chain(servers) {
        t.abort();
    }
}
