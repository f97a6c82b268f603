//! A GPU worker in a local cluster without a GPU: `expertmesh worker --device cuda:0` runs the
//! CUDA backend on the fake CUDA driver (`kernels/cuda/emu/fake_driver.cpp`, the kernels of
//! `kernels/cuda/experts.cu` on a host emulator), beside a CPU worker. It registers as a CUDA
//! device, holds its share of the experts, and the cluster's answers through either worker
//! match the float64 reference, with the GPU worker's counters showing it computed its rows.
//! Built with `--features cuda` (`make cuda-check` runs it, with NVRTC on LD_LIBRARY_PATH).
#![cfg(feature = "cuda")]

mod common;

use std::process::Command;

use common::cluster::{spawn_command, Cluster, BIN};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor, tensor_to_f32};
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{CountersRequest, DType as PDType, ForwardRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_worker_on_the_emulated_driver_serves_beside_a_cpu_worker() {
    if let Err(e) = expertmesh_kernels::cuda::nvrtc_available() {
        panic!("{e}\n`scripts/install-nvrtc.sh` installs NVRTC 13.0 from PyPI and prints the directory to put on LD_LIBRARY_PATH (`make test` does both)");
    }
    let drv = tempfile::tempdir().unwrap();
    expertmesh_kernels::fake_driver::build(drv.path()).unwrap_or_else(|e| panic!("{e}"));
    // bf16 and FP8 checkpoints: tensor-core kernels, FP8 with 128x128 scales.
    for dtype in [DType::BF16, DType::F8E4M3] {
        let ov = PresetOverrides { hidden: Some(128), ffn: Some(96), experts: Some(16), ..Default::default() };
        let (dir, spec) = gen_model("tiny-v3", dtype, ov, 21);
        let mut cluster = Cluster::coordinator_only(dir.path(), 2, &[]);
        // Equal declared throughput, so the GPU worker gets half the experts (the emulator's
        // measured one would give it none).
        cluster.add_worker("c0", &["--tflops", "1"]);
        let mut gpu = Command::new(BIN);
        let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        gpu.env("LD_LIBRARY_PATH", format!("{}:{path}", drv.path().display()));
        gpu.args(["worker", "--coordinator", &cluster.coordinator.addr, "--listen", "127.0.0.1:0", "--id", "g0"]);
        gpu.args(["--device", "cuda:0", "--tflops", "1"]);
        let log = cluster.logs.path().join("g0.log");
        cluster.workers.push(spawn_command(gpu, "EXPERTMESH_WORKER_READY", &log));

        let s = wait_status(&cluster.coordinator.addr, std::time::Duration::from_secs(60), "epoch 1", |s| {
            s["current_epoch"].as_u64() >= Some(1)
        });
        let g0 = s["workers"].as_array().unwrap().iter().find(|w| w["worker_id"] == "g0").unwrap();
        let dev = &g0["devices"][0];
        assert_eq!(dev["kind"], "cuda", "{g0}");
        assert!(dev["name"].as_str().unwrap().contains("ExpertMesh CUDA emulator"), "{g0}");
        let held = g0["experts_held"].as_u64().unwrap();
        assert!(held > 0, "the GPU worker holds no experts: {g0}");

        for (i, layer) in spec.moe_layers().into_iter().enumerate() {
            let tokens = [1, 7, 40][i % 3];
            let (x, ids) = random_input(&spec, tokens, 70 + i as u64);
            let want = reference(dir.path(), &spec, layer, &x, tokens, Some(&ids));
            for entry in 0..2 {
                for (wire, tol) in [(PDType::DtypeBf16, 1e-2), (PDType::DtypeF32, 1e-5)] {
                    let mut client = cluster.moe_client(entry).await;
                    let resp = client
                        .forward(ForwardRequest {
                            layer: layer as u32,
                            hidden_states: Some(f32_tensor(&[tokens, spec.hidden], &x)),
                            input_ids: Some(i64_tensor(&[tokens], &ids)),
                            wire_dtype: wire as i32,
                        })
                        .await
                        .unwrap_or_else(|e| panic!("layer {layer} via worker {entry}: {e}\n{}", cluster.dump_logs()))
                        .into_inner();
                    let (out, _) = tensor_to_f32(resp.output.as_ref().unwrap(), "output").unwrap();
                    let err = rel_l2_f32(&out, &want.output);
                    assert!(err < tol, "{} layer {layer} via worker {entry} wire {wire:?}: rel L2 {err}", dtype.name());
                }
            }
        }
        let mut c = ExpertServiceClient::connect(format!("http://{}", cluster.workers[1].addr)).await.unwrap();
        let computed: u64 =
            c.counters(CountersRequest {}).await.unwrap().into_inner().experts.iter().map(|e| e.tokens).sum();
        assert!(computed > 0, "the GPU worker computed no rows:\n{}", cluster.dump_logs());
    }
}
