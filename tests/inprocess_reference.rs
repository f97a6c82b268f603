//! The in-process MoE layer (fast path: f32 GEMM, fast gating) equals the independent float64
//! reference on random inputs, for every model family and checkpoint dtype.

mod common;

use std::sync::Arc;

use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::moe::{LocalMoe, MoeInput};
use expertmesh_dispatcher::Checkpoint;
use expertmesh_kernels::cpu::CpuBackend;

async fn check(preset: &str, dtype: DType, ov: PresetOverrides, tokens: usize, tol: f64) {
    let (dir, spec) = gen_model(preset, dtype, ov, 7);
    let moe = LocalMoe::new(Arc::new(Checkpoint::open(dir.path()).unwrap()), Arc::new(CpuBackend::new()));
    for (i, layer) in spec.moe_layers().into_iter().enumerate() {
        let (x, ids) = random_input(&spec, tokens, 100 + i as u64);
        let out = moe
            .forward(MoeInput { layer, tokens, hidden_states: x.clone(), input_ids: Some(ids.clone()) })
            .await
            .unwrap();
        let r = reference(dir.path(), &spec, layer, &x, tokens, Some(&ids));
        let got: Vec<i64> = out.routing.indices.iter().map(|v| *v as i64).collect();
        assert_eq!(got, r.topk_indices, "{preset} layer {layer}: top-k experts");
        let err = rel_l2_f32(&out.output, &r.output);
        let werr = rel_l2_f32(&out.routing.weights, &r.topk_weights);
        println!("{preset} {} layer {layer}: rel L2 {err:.2e}, weights {werr:.2e}", dtype.name());
        assert!(err < tol, "{preset} layer {layer}: rel L2 {err} >= {tol}");
        assert!(werr < 1e-5, "{preset} layer {layer}: weights rel L2 {werr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_groups_bf16_and_fp8() {
    check("tiny-v3", DType::BF16, PresetOverrides::default(), 37, 1e-5).await;
    check("tiny-v3", DType::F8E4M3, PresetOverrides::default(), 29, 1e-5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_hash_layers_and_clamp() {
    check("tiny-v4", DType::F32, PresetOverrides::default(), 41, 1e-5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixtral_and_qwen3_softmax() {
    check("tiny-mixtral", DType::F16, PresetOverrides::default(), 33, 1e-5).await;
    check("tiny-qwen3", DType::BF16, PresetOverrides::default(), 19, 1e-5).await;
}

/// Qwen2-MoE: a shared expert of its own width, scaled per token by sigmoid(x . gate); the
/// top-k weights are not renormalised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_gated_shared_expert() {
    check("tiny-qwen2", DType::BF16, PresetOverrides::default(), 43, 1e-5).await;
    check("tiny-qwen2", DType::F32, PresetOverrides { top_k: Some(2), ..Default::default() }, 47, 1e-5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_from_1_to_8() {
    for k in [1, 2, 3, 5, 8] {
        let ov = PresetOverrides { top_k: Some(k), n_group: Some(1), topk_group: Some(1), ..Default::default() };
        check("tiny-v3", DType::BF16, ov, 23, 1e-5).await;
    }
}

/// Regression: concurrent first requests for a layer each read its weights from the checkpoint;
/// they now wait for one load. With bf16 activations (as on a bf16 wire) the answers still
/// match the float64 reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_load_a_layer_once() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 9);
    let moe = Arc::new(
        LocalMoe::new(Arc::new(Checkpoint::open(dir.path()).unwrap()), Arc::new(CpuBackend::new()))
            .with_activations(DType::BF16)
            .unwrap(),
    );
    let layer = spec.moe_layers()[0];
    let tokens = 11;
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let (moe, spec) = (moe.clone(), spec.clone());
        tasks.push(tokio::spawn(async move {
            let (x, ids) = random_input(&spec, tokens, 300 + i);
            let out = moe
                .forward(MoeInput { layer, tokens, hidden_states: x.clone(), input_ids: Some(ids.clone()) })
                .await
                .unwrap();
            (x, ids, out)
        }));
    }
    for t in tasks {
        let (x, ids, out) = t.await.unwrap();
        let r = reference(dir.path(), &spec, layer, &x, tokens, Some(&ids));
        let err = rel_l2_f32(&out.output, &r.output);
        assert!(err < 1e-2, "bf16 activations: rel L2 {err}");
    }
    assert_eq!(moe.frontend().loads(), 1, "the router and shared expert were read more than once");
    assert_eq!(moe.expert_loads(), 1, "the routed experts were read more than once");
}
