//! The dispatcher as a library in an inference engine's process: built from the model's
//! config.json alone (no checkpoint), fed placement by the coordinator's watch, given the
//! engine's own routing, it sends rows over gRPC to real workers and combines their answers.
//! Checked against the float64 reference of exactly that routing; bad routing is refused
//! naming what was wrong, and the dispatcher keeps serving.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::Cluster;
use common::*;
use expertmesh_cluster::control::{connect_control, ControlTarget};
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_core::gating::Routing;
use expertmesh_core::reference::{ffn_forward, RefCheckpoint, RefLayer};
use expertmesh_core::rng::SplitMix64;
use expertmesh_core::ModelSpec;
use expertmesh_dispatcher::moe::MoeInput;
use expertmesh_dispatcher::{route_table_channel, Dispatcher, DispatcherConfig, Error, RouteTable};

/// Routing an engine might choose: k distinct experts per token, positive weights.
fn engine_routing(spec: &ModelSpec, tokens: usize, seed: u64) -> Routing {
    let mut r = SplitMix64::new(seed);
    let k = spec.top_k;
    let mut indices = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut chosen: Vec<u32> = Vec::with_capacity(k);
        while chosen.len() < k {
            let e = r.below(spec.n_routed as u64) as u32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        indices.extend(chosen);
        weights.extend((0..k).map(|_| 0.1 + r.below(1000) as f32 / 1000.0));
    }
    Routing { top_k: k, indices, weights }
}

/// `sum_j w[t, j] * expert_j(x[t])` in f64, from the checkpoint's bytes.
fn routed_reference(dir: &std::path::Path, spec: &ModelSpec, layer: usize, x: &[f32], r: &Routing) -> Vec<f64> {
    let shards = read_shards(dir);
    let ck = RefCheckpoint::new(&shards).unwrap();
    let w = RefLayer::load(spec, layer, &ck).unwrap();
    let (h, k) = (spec.hidden, spec.top_k);
    let mut out = vec![0f64; r.tokens() * h];
    for t in 0..r.tokens() {
        let xt: Vec<f64> = x[t * h..(t + 1) * h].iter().map(|v| *v as f64).collect();
        for j in 0..k {
            let p = t * k + j;
            let y = ffn_forward(&w.experts[r.indices[p] as usize], h, &xt, None);
            for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(y) {
                *o += r.weights[p] as f64 * v;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_routes_its_own_tokens_through_the_dispatcher_library() {
    // Mixtral: no shared expert, so the routed sum is the whole block.
    let (dir, spec) = gen_model("tiny-mixtral", DType::BF16, PresetOverrides::default(), 91);
    let cluster = Cluster::start(dir.path(), 3, &[]);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);

    // What an engine holds: the model's config.json, and the coordinator's address.
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let spec_only = ModelSpec::from_config_json(&config).unwrap();
    let control =
        connect_control(&ControlTarget::coordinator(cluster.coordinator.addr.clone()), Duration::from_secs(10))
            .await
            .unwrap();
    let mut plans = control.watch_placement().await.unwrap();
    let (tx, rx) = route_table_channel();
    tokio::spawn(async move {
        while let Some(ev) = plans.recv().await {
            if let (true, Some(p)) = (ev.committed, ev.plan) {
                let _ = tx.send(Some(Arc::new(RouteTable::from_plan(&p))));
            }
        }
    });
    let cfg = DispatcherConfig::default();
    let d = Dispatcher::new(spec_only, cfg.grpc_transport(), rx, cfg);

    let layer = spec.moe_layers()[0];
    for (tokens, seed) in [(1usize, 1u64), (7, 2), (64, 3)] {
        let (x, _) = random_input(&spec, tokens, 900 + seed);
        let routing = engine_routing(&spec, tokens, seed);
        let want = routed_reference(dir.path(), &spec, layer, &x, &routing);
        for (wire, tol) in [(DType::BF16, 1e-2), (DType::F32, 1e-5)] {
            let inp = MoeInput { layer, tokens, hidden_states: x.clone(), input_ids: None };
            let out = d
                .forward_routed(inp, routing.clone(), wire, None)
                .await
                .unwrap_or_else(|e| panic!("{tokens} tokens, {}: {e}\n{}", wire.name(), cluster.dump_logs()));
            assert_eq!(out.epoch, 1, "routed by the committed placement");
            assert_eq!(out.routing.indices, routing.indices, "the caller's routing is the one used");
            let err = rel_l2_f32(&out.output, &want);
            assert!(err < tol, "{tokens} tokens, {} wire: rel L2 {err} against the f64 reference", wire.name());
        }
    }
    let stats = d.stats();
    assert!(stats.payload_sent.load(std::sync::atomic::Ordering::Relaxed) > 0, "rows went over the wire");

    // Bad routing is refused before any row is sent, naming what was wrong.
    let (x, _) = random_input(&spec, 2, 77);
    let inp = || MoeInput { layer, tokens: 2, hidden_states: x.clone(), input_ids: None };
    let mut r = engine_routing(&spec, 2, 9);
    r.indices[3] = spec.n_routed as u32;
    let e = d.forward_routed(inp(), r, DType::BF16, None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    assert!(e.to_string().contains("indices[3]") && e.to_string().contains(&format!("0..{}", spec.n_routed)), "{e}");
    let mut r = engine_routing(&spec, 2, 9);
    r.weights.pop();
    let e = d.forward_routed(inp(), r, DType::BF16, None).await.unwrap_err();
    assert!(e.to_string().contains("weights has 3 entries; expected tokens x top_k = 2 x 2 = 4"), "{e}");
    let mut r = engine_routing(&spec, 2, 9);
    r.weights[0] = f32::NAN;
    let e = d.forward_routed(inp(), r, DType::BF16, None).await.unwrap_err();
    assert!(e.to_string().contains("weights[0]") && e.to_string().contains("finite"), "{e}");
    // Without a checkpoint it cannot gate, and says so.
    let e = d.forward(inp(), DType::BF16).await.unwrap_err();
    assert!(e.to_string().contains("no checkpoint to gate with"), "{e}");
    // And it still serves.
    let routing = engine_routing(&spec, 2, 10);
    let want = routed_reference(dir.path(), &spec, layer, &x, &routing);
    let out = d.forward_routed(inp(), routing, DType::F32, None).await.unwrap();
    assert!(rel_l2_f32(&out.output, &want) < 1e-5);
}

/// The same library over a collective group instead of gRPC: two members linked in this
/// process (the NCCL fabric's stand-in), each computing with a real expert store holding half
/// the experts; the dispatcher at rank 0 reaches both (itself included) through the group's
/// rounds, and the answers match the float64 reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_over_a_collective_group_matches_the_reference() {
    use expertmesh_dispatcher::collective::{CollectiveTransport, GroupInfo};
    use expertmesh_dispatcher::transport::RoutedTransport;
    use expertmesh_dispatcher::Checkpoint;
    use expertmesh_kernels::cpu::CpuBackend;
    use expertmesh_kernels::fabric::LoopbackFabric;
    use expertmesh_kernels::ExpertBackend;
    use expertmesh_proto::v1::{LayerPlacement, PlacementPlan, Replicas, WorkerInfo};
    use expertmesh_worker::service::ExpertStore;

    let (dir, spec) = gen_model("tiny-mixtral", DType::BF16, PresetOverrides::default(), 92);
    let layer = spec.moe_layers()[0];
    let ck = Checkpoint::open(dir.path()).unwrap();
    let backend: Arc<dyn ExpertBackend> = Arc::new(CpuBackend::new());
    let half = spec.n_routed as u32 / 2;
    let addrs = ["10.1.0.1:7500".to_string(), "10.1.0.2:7500".to_string()];
    let mut stores = Vec::new();
    for (i, experts) in [(0..half).collect::<Vec<_>>(), (half..spec.n_routed as u32).collect()].iter().enumerate() {
        let store = Arc::new(ExpertStore::new(format!("g{i}"), spec.clone(), backend.clone()));
        let l = expertmesh_dispatcher::moe::load_experts(&ck, &*backend, layer, experts, None, &[]).unwrap();
        store.insert(vec![l]);
        store.set_epoch(1);
        stores.push(store);
    }
    let group = GroupInfo { name: "box".into(), epoch: 1, members: addrs.to_vec() };
    let links: Vec<Arc<CollectiveTransport>> = LoopbackFabric::group(2, backend.clone())
        .into_iter()
        .zip(&stores)
        .map(|(f, s)| {
            Arc::new(CollectiveTransport::start(group.clone(), f, s.clone(), Duration::from_secs(20)).unwrap())
        })
        .collect();
    let cfg = DispatcherConfig { rpc_timeout: Duration::from_secs(5), ..Default::default() };
    let routed = Arc::new(RoutedTransport::new(cfg.grpc()));
    routed.add_group(links[0].clone());
    let plan = |epoch: u64| PlacementPlan {
        epoch,
        workers: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| WorkerInfo {
                worker_id: format!("g{i}"),
                address: a.clone(),
                node: "box".into(),
                devices: vec![],
                ..Default::default()
            })
            .collect(),
        layers: vec![LayerPlacement {
            layer: layer as u32,
            experts: (0..spec.n_routed as u32)
                .map(|e| Replicas { workers: vec![u32::from(e >= half)], shares: vec![] })
                .collect(),
        }],
        ..Default::default()
    };
    let (tx, rx) = route_table_channel();
    tx.send(Some(Arc::new(RouteTable::from_plan(&plan(1))))).unwrap();
    let d = Dispatcher::new(spec.clone(), routed.clone(), rx, cfg);
    for (tokens, seed) in [(1, 1), (7, 2), (64, 3)] {
        let (x, _) = random_input(&spec, tokens, 500 + seed);
        let routing = engine_routing(&spec, tokens, seed);
        let want = routed_reference(dir.path(), &spec, layer, &x, &routing);
        for (wire, tol) in [(DType::BF16, 1e-2), (DType::F32, 1e-5)] {
            let inp = MoeInput { layer, tokens, hidden_states: x.clone(), input_ids: None };
            let out = d.forward_routed(inp, routing.clone(), wire, None).await.unwrap();
            let err = rel_l2_f32(&out.output, &want);
            assert!(err < tol, "{tokens} tokens, {} wire: rel L2 {err} against the f64 reference", wire.name());
        }
    }
    let (_, busy) = links[0].rounds();
    assert!(busy >= 6, "every call went through the group's rounds ({busy} busy rounds)");
    assert_eq!(links[1].in_flight(), 0);
    for l in &links {
        l.shutdown();
    }
}
