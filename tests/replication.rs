//! `--replicas R`: every expert on R distinct workers (distinct nodes where there are several),
//! dispatchers spread each expert's rows over its replicas, and answers stay correct.

mod common;

use std::collections::{HashMap, HashSet};

use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor, tensor_to_f32};
use expertmesh_proto::v1::coordinator_client::CoordinatorClient;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{CountersRequest, DType as PDType, ForwardRequest, GetPlacementRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_distinct_nodes_share_the_rows() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 31);
    // Four workers on two "nodes": replicas must land on different nodes.
    let mut cluster = Cluster::coordinator_only(dir.path(), 4, &["--replicas", "2"]);
    for (i, node) in ["n0", "n0", "n1", "n1"].iter().enumerate() {
        cluster.add_worker(&format!("w{i}"), &["--node", node]);
    }
    let mut moe = cluster.moe_client(0).await;
    let tokens = 200;
    let mut routed = 0u64;
    for (i, layer) in spec.moe_layers().into_iter().enumerate() {
        let (x, ids) = random_input(&spec, tokens, 40 + i as u64);
        let r = reference(dir.path(), &spec, layer, &x, tokens, Some(&ids));
        let resp = moe
            .forward(ForwardRequest {
                layer: layer as u32,
                hidden_states: Some(f32_tensor(&[tokens, spec.hidden], &x)),
                input_ids: Some(i64_tensor(&[tokens], &ids)),
                wire_dtype: PDType::DtypeF32 as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.dump_logs()))
            .into_inner();
        let (out, _) = tensor_to_f32(resp.output.as_ref().unwrap(), "output").unwrap();
        assert!(rel_l2_f32(&out, &r.output) < 1e-5);
        routed += (tokens * spec.top_k) as u64;
    }
    // The committed plan: two replicas per expert, on distinct workers and distinct nodes.
    let mut c = CoordinatorClient::connect(format!("http://{}", cluster.coordinator.addr)).await.unwrap();
    let plan = c.get_placement(GetPlacementRequest {}).await.unwrap().into_inner();
    assert_eq!(plan.workers.len(), 4);
    let node_of: HashMap<u32, String> =
        plan.workers.iter().enumerate().map(|(i, w)| (i as u32, w.node.clone())).collect();
    for l in &plan.layers {
        for (e, reps) in l.experts.iter().enumerate() {
            assert_eq!(reps.workers.len(), 2, "layer {} expert {e}", l.layer);
            let nodes: HashSet<&String> = reps.workers.iter().map(|w| &node_of[w]).collect();
            assert_eq!(nodes.len(), 2, "layer {} expert {e}: replicas on one node", l.layer);
        }
    }
    // Rows computed once in total, and split by the plan's shares: one request per layer, so
    // each expert's rows were split once, by systematic sampling, which gives replica i either
    // floor(n x share_i) or ceil(n x share_i) rows. The shares need not be even: placement
    // levels the workers' loads with them.
    let mut per_expert: HashMap<(u32, u32), HashMap<String, u64>> = HashMap::new();
    let mut total = 0;
    for w in &cluster.workers {
        let mut ec = ExpertServiceClient::connect(format!("http://{}", w.addr)).await.unwrap();
        let resp = ec.counters(CountersRequest {}).await.unwrap().into_inner();
        for e in resp.experts {
            per_expert.entry((e.layer, e.expert)).or_default().insert(resp.worker_id.clone(), e.tokens);
            total += e.tokens;
        }
    }
    assert_eq!(total, routed, "every routed pair computed exactly once across replicas");
    let mut spread = 0;
    for l in &plan.layers {
        for (e, reps) in l.experts.iter().enumerate() {
            let shares: Vec<f64> = if reps.shares.is_empty() {
                vec![0.5; reps.workers.len()]
            } else {
                reps.shares.iter().map(|&s| f64::from(s)).collect()
            };
            assert_eq!(shares.len(), reps.workers.len(), "layer {} expert {e}: one share per replica", l.layer);
            assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-4, "layer {} expert {e}: shares {shares:?}", l.layer);
            assert!(
                shares.iter().all(|&s| s > 0.0),
                "layer {} expert {e}: a replica without a share {shares:?}",
                l.layer
            );
            let counts = per_expert.get(&(l.layer, e as u32));
            let got: Vec<u64> = reps
                .workers
                .iter()
                .map(|&w| counts.and_then(|c| c.get(&plan.workers[w as usize].worker_id)).copied().unwrap_or(0))
                .collect();
            let n: u64 = got.iter().sum();
            for (c, s) in got.iter().zip(&shares) {
                let want = n as f64 * s;
                assert!(
                    (want - 1e-3).floor() <= *c as f64 && *c as f64 <= (want + 1e-3).ceil(),
                    "layer {} expert {e}: {n} rows split {got:?}, shares {shares:?}",
                    l.layer
                );
            }
            spread += usize::from(got.iter().all(|&c| c > 0));
        }
    }
    // Not vacuous: some expert's rows were actually split over its replicas.
    println!("experts with rows on every replica: {spread}");
    assert!(spread > 0, "no expert had its rows split over its replicas");
}

#[test]
fn more_replicas_than_workers_is_reported_in_status_until_a_worker_joins() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 32);
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &["--replicas", "3"]);
    cluster.add_worker("w0", &[]);
    cluster.add_worker("w1", &[]);
    let addr = cluster.coordinator.addr.clone();
    let s = wait_status(&addr, std::time::Duration::from_secs(60), "placement blocked", |s| {
        s["placement_blocked"].as_str().is_some_and(|b| !b.is_empty())
    });
    let why = s["placement_blocked"].as_str().unwrap();
    assert!(why.contains("3 replicas of every expert need 3 workers; the cluster has 2"), "{why}");
    assert_eq!(s["current_epoch"], 0, "{s}");
    // The text form says it where an operator looks first.
    let o = std::process::Command::new(common::cluster::BIN).args(["status", "--coordinator", &addr]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("cannot place the experts: 3 replicas of every expert need 3 workers"), "{text}");
    // A third worker makes it placeable: committed, and the reason is gone.
    cluster.add_worker("w2", &[]);
    let s = wait_status(&addr, std::time::Duration::from_secs(60), "epoch 1 on three workers", |s| {
        s["current_epoch"].as_u64() >= Some(1)
    });
    assert_eq!(s["placement_blocked"], "", "{s}");
}
