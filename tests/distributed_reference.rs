//! A local cluster of real processes (coordinator + 1..4 workers) answers MoeLayer.Forward with
//! the float64 reference's result: rel L2 < 1e-2 with bf16 on the wire, < 1e-5 with f32; V3
//! (groups; bf16 and FP8 checkpoints), V4 (hash layers, clamp), Mixtral, Qwen2 (gated shared expert) and Qwen3; top-k 2..8.
//! Every routed pair is computed exactly once (worker counters against the gate's choices).

mod common;

use std::collections::HashMap;

use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::{tensor_to_f32, tensor_to_i64};
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{CountersRequest, DType as PDType};

async fn run_case(preset: &str, dtype: DType, ov: PresetOverrides, workers: usize, tokens: usize) {
    let (dir, spec) = gen_model(preset, dtype, ov, 11);
    let cluster = Cluster::start(dir.path(), workers, &[]);
    let mut client = cluster.moe_client(workers - 1).await;
    let mut routed: HashMap<(u32, u32), u64> = HashMap::new();
    for (i, layer) in spec.moe_layers().into_iter().enumerate() {
        let (x, ids) = random_input(&spec, tokens, 500 + i as u64);
        let r = reference(dir.path(), &spec, layer, &x, tokens, Some(&ids));
        for (wire, tol) in [(PDType::DtypeBf16, 1e-2), (PDType::DtypeF32, 1e-5)] {
            let resp = client
                .forward(forward_request(&spec, layer, &x, &ids, wire))
                .await
                .unwrap_or_else(|e| panic!("{preset} layer {layer}: {e}\n{}", cluster.dump_logs()))
                .into_inner();
            let (out, shape) = tensor_to_f32(resp.output.as_ref().unwrap(), "output").unwrap();
            assert_eq!(shape, vec![tokens, spec.hidden]);
            let (idx, ishape) = tensor_to_i64(resp.topk_indices.as_ref().unwrap(), "topk_indices").unwrap();
            assert_eq!(ishape, vec![tokens, spec.top_k]);
            assert_eq!(idx, r.topk_indices, "{preset} layer {layer}: chosen experts");
            let (w, _) = tensor_to_f32(resp.topk_weights.as_ref().unwrap(), "topk_weights").unwrap();
            assert!(rel_l2_f32(&w, &r.topk_weights) < 1e-5);
            let err = rel_l2_f32(&out, &r.output);
            println!("{preset} {} workers={workers} layer {layer} wire={wire:?}: rel L2 {err:.2e}", dtype.name());
            assert!(err < tol, "{preset} layer {layer} wire {wire:?}: rel L2 {err} >= {tol}");
            for e in idx {
                *routed.entry((layer as u32, e as u32)).or_default() += 1;
            }
        }
    }
    // Exactly once: the workers' counters equal the gate's choices, pair for pair.
    let mut counted: HashMap<(u32, u32), u64> = HashMap::new();
    for w in &cluster.workers {
        let mut c = ExpertServiceClient::connect(format!("http://{}", w.addr)).await.unwrap();
        for e in c.counters(CountersRequest {}).await.unwrap().into_inner().experts {
            *counted.entry((e.layer, e.expert)).or_default() += e.tokens;
        }
    }
    assert_eq!(counted, routed, "{preset}: per-expert counters vs routed pairs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_bf16_checkpoint_one_to_four_workers() {
    for workers in 1..=4 {
        run_case("tiny-v3", DType::BF16, PresetOverrides::default(), workers, 45).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_fp8_block_scaled_checkpoint() {
    run_case("tiny-v3", DType::F8E4M3, PresetOverrides { hidden: Some(160), ..Default::default() }, 3, 33).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_hash_layers_and_clamp() {
    run_case("tiny-v4", DType::BF16, PresetOverrides::default(), 2, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixtral_top2_and_qwen3_top8() {
    run_case("tiny-mixtral", DType::BF16, PresetOverrides::default(), 3, 30).await;
    run_case("tiny-qwen3", DType::F32, PresetOverrides::default(), 4, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_gated_shared_expert() {
    run_case("tiny-qwen2", DType::BF16, PresetOverrides::default(), 3, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top1_and_large_batches_chunked() {
    let ov = PresetOverrides { top_k: Some(1), n_group: Some(1), topk_group: Some(1), ..Default::default() };
    run_case("tiny-v3", DType::BF16, ov, 2, 20).await;
    // 3000 tokens x 4 slots x 256 hidden: streams of several chunks per destination.
    run_case(
        "tiny-v3",
        DType::BF16,
        PresetOverrides { hidden: Some(256), layers: Some(2), ..Default::default() },
        2,
        3000,
    )
    .await;
}
