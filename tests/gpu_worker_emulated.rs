//! GPU workers in a local cluster without a GPU: `expertmesh worker --device cuda:0` runs the
//! CUDA backend on the fake CUDA driver (`kernels/cuda/emu/fake_driver.cpp`, the kernels of
//! `kernels/cuda/experts.cu` on a host emulator) and forms NCCL groups over the fake NCCL
//! (`kernels/cuda/emu/fake_nccl.cpp`, loopback TCP). Beside a CPU worker they register as CUDA
//! devices, hold their share of the experts, join their node's group (of one, then of two), and
//! the cluster's answers through every worker match the float64 reference; the GPU workers'
//! counters and group metrics show they computed rows and moved them over the group's link.
//! Built with `--features cuda,nccl` (`make cuda-check` runs it, with NVRTC on LD_LIBRARY_PATH).
#![cfg(all(feature = "cuda", feature = "nccl"))]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::{spawn_command, Cluster, BIN};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::tensor_to_f32;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{CountersRequest, DType as PDType};

/// Start GPU worker `id` on the fake libraries in `drv`, its metrics on `metrics_port`.
fn add_gpu_worker(cluster: &mut Cluster, drv: &Path, id: &str, metrics_port: u16) {
    let mut gpu = Command::new(BIN);
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    gpu.env("LD_LIBRARY_PATH", format!("{}:{path}", drv.display()));
    gpu.args(["worker", "--coordinator", &cluster.coordinator.addr, "--listen", "127.0.0.1:0", "--id", id]);
    // Equal declared throughput: the emulator's measured one would give it no experts.
    gpu.args(["--device", "cuda:0", "--tflops", "1", "--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
    // The emulated kernels take about a second a chunk, and several seconds when workers'
    // chunks queue on two cores: silences far past the default 5 s are not faults here.
    gpu.args(["--rpc-timeout-ms", "60000"]);
    let log = cluster.logs.path().join(format!("{id}.log"));
    cluster.workers.push(spawn_command(gpu, "EXPERTMESH_WORKER_READY", &log));
}

/// `name{labels} value` summed over the series of `name`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every MoE layer at 1, 7 and 40 tokens through every worker, bf16 and f32 on the wire,
/// against the float64 reference.
async fn check_answers(cluster: &Cluster, dir: &Path, spec: &expertmesh_core::ModelSpec, what: &str) {
    for (i, layer) in spec.moe_layers().into_iter().enumerate() {
        let tokens = [1, 7, 40][i % 3];
        let (x, ids) = random_input(spec, tokens, 70 + i as u64);
        let want = reference(dir, spec, layer, &x, tokens, Some(&ids));
        for entry in 0..cluster.workers.len() {
            for (wire, tol) in [(PDType::DtypeBf16, 1e-2), (PDType::DtypeF32, 1e-5)] {
                let mut client = cluster.moe_client(entry).await;
                let resp = client
                    .forward(forward_request(spec, layer, &x, &ids, wire))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("{what}: layer {layer} via worker {entry}: {e}\n{}", cluster.dump_logs())
                    })
                    .into_inner();
                let (out, _) = tensor_to_f32(resp.output.as_ref().unwrap(), "output").unwrap();
                let err = rel_l2_f32(&out, &want.output);
                assert!(err < tol, "{what}: layer {layer} via worker {entry} wire {wire:?}: rel L2 {err}");
            }
        }
    }
}

/// Wait until worker `i`'s log says it joined an NCCL group of `size`.
fn joined(cluster: &Cluster, i: usize, size: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&cluster.workers[i].log).unwrap();
        if log.contains("NCCL group joined") && log.contains(&format!("size={size}")) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "worker {i} joined no group of {size}:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test layer: small enough for the emulator, 128 x 128 FP8 blocks still whole.
fn test_model(dtype: DType, seed: u64) -> (tempfile::TempDir, expertmesh_core::ModelSpec) {
    let ov = PresetOverrides { hidden: Some(128), ffn: Some(96), experts: Some(16), ..Default::default() };
    gen_model("tiny-v3", dtype, ov, seed)
}

fn wait_epoch_1(cluster: &Cluster) {
    wait_status(&cluster.coordinator.addr, Duration::from_secs(60), "epoch 1", |s| {
        s["current_epoch"].as_u64() >= Some(1)
    });
}

/// The worker whose metrics are on `port` moved rows over its NCCL group's link.
fn assert_link_moved_rows(port: u16, what: &str) {
    let (_, m) = get(port, "/metrics");
    assert!(metric_sum(&m, "expertmesh_group_busy_rounds_total") > 0.0, "{what}: nothing moved over the link:\n{m}");
}

async fn rows_computed(addr: &str) -> u64 {
    let mut c = ExpertServiceClient::connect(format!("http://{addr}")).await.unwrap();
    c.counters(CountersRequest {}).await.unwrap().into_inner().experts.iter().map(|e| e.tokens).sum()
}

/// The emulated kernels are CPU-hungry: one cluster at a time, so that two clusters' workers
/// do not starve each other past their timeouts on a small machine.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn fake_libraries() -> tempfile::TempDir {
    if let Err(e) = expertmesh_kernels::cuda::nvrtc_available() {
        panic!("{e}\n`scripts/install-nvrtc.sh` installs NVRTC 13.0 from PyPI and prints the directory to put on LD_LIBRARY_PATH (`make test` does both)");
    }
    let drv = tempfile::tempdir().unwrap();
    expertmesh_kernels::fake_driver::build(drv.path()).unwrap_or_else(|e| panic!("{e}"));
    drv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_worker_on_the_emulated_driver_serves_beside_a_cpu_worker() {
    let _one = ONE_CLUSTER.lock().await;
    let drv = fake_libraries();
    // bf16 and FP8 checkpoints: tensor-core kernels, FP8 with 128x128 scales.
    for dtype in [DType::BF16, DType::F8E4M3] {
        let (dir, spec) = test_model(dtype, 21);
        let mut cluster = Cluster::coordinator_only(dir.path(), 2, &[]);
        cluster.add_worker("c0", &["--tflops", "1"]);
        let mp = free_port();
        add_gpu_worker(&mut cluster, drv.path(), "g0", mp);
        wait_epoch_1(&cluster);
        let s = status_json(&cluster.coordinator.addr);
        let g0 = s["workers"].as_array().unwrap().iter().find(|w| w["worker_id"] == "g0").unwrap();
        let dev = &g0["devices"][0];
        assert_eq!(dev["kind"], "cuda", "{g0}");
        assert!(dev["name"].as_str().unwrap().contains("ExpertMesh CUDA emulator"), "{g0}");
        assert!(g0["experts_held"].as_u64() > Some(0), "the GPU worker holds no experts: {g0}");

        check_answers(&cluster, dir.path(), &spec, dtype.name()).await;
        assert!(rows_computed(&cluster.workers[1].addr).await > 0, "the GPU worker computed no rows");
        // Alone on its node, it is a group of one: its dispatcher reaches its own experts
        // through the link (NCCL at world size 1).
        let log = std::fs::read_to_string(&cluster.workers[1].log).unwrap();
        assert!(log.contains("NCCL group joined") && log.contains("size=1"), "no group of one:\n{log}");
        assert_link_moved_rows(mp, "the group of one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gpu_workers_exchange_rows_over_their_nccl_group() {
    let _one = ONE_CLUSTER.lock().await;
    let drv = fake_libraries();
    let (dir, spec) = test_model(DType::BF16, 22);
    let mut cluster = Cluster::coordinator_only(dir.path(), 3, &[]);
    cluster.add_worker("c0", &["--tflops", "1"]);
    let ports = [free_port(), free_port()];
    add_gpu_worker(&mut cluster, drv.path(), "g0", ports[0]);
    add_gpu_worker(&mut cluster, drv.path(), "g1", ports[1]);
    wait_epoch_1(&cluster);
    // Both members joined one group of two (the coordinator relayed rank 0's id).
    joined(&cluster, 1, 2);
    joined(&cluster, 2, 2);
    check_answers(&cluster, dir.path(), &spec, "group of two").await;
    for (i, port) in [(1, ports[0]), (2, ports[1])] {
        assert!(rows_computed(&cluster.workers[i].addr).await > 0, "GPU worker {i} computed no rows");
        assert_link_moved_rows(port, &format!("worker {i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_worker_joining_re_forms_the_group_and_no_request_is_lost() {
    let _one = ONE_CLUSTER.lock().await;
    let drv = fake_libraries();
    let (dir, spec) = test_model(DType::BF16, 23);
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &[]);
    add_gpu_worker(&mut cluster, drv.path(), "g0", free_port());
    add_gpu_worker(&mut cluster, drv.path(), "g1", free_port());
    wait_epoch_1(&cluster);
    joined(&cluster, 0, 2);
    // Checked traffic through both members while a third GPU worker joins: the plan's group
    // grows to three, the old communicator is left and a new one formed under load.
    let cases = std::sync::Arc::new(traffic_cases(dir.path(), &spec, 9, 6));
    let client = cluster.moe_failover(&[0, 1], Duration::from_secs(120));
    let streams = Streams::start(client, cases, 2, spec.hidden, Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(2)).await;
    add_gpu_worker(&mut cluster, drv.path(), "g2", free_port());
    for i in 0..3 {
        joined(&cluster, i, 3);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rep = streams.finish().await;
    println!("{}", rep.summary());
    assert_eq!(rep.wrong, 0, "wrong answers: {:#?}", rep.failures);
    assert_eq!(rep.hung, 0, "hung calls: {:#?}", rep.failures);
    assert!(rep.failures.is_empty(), "failed calls across the switch: {:#?}\n{}", rep.failures, cluster.dump_logs());
    // Traffic ran from two seconds before the join until after it, every call answered: the
    // calls in flight across the switch were answered too.
    assert!(rep.correct >= 2, "too little traffic to cross the switch: {}", rep.summary());
    assert!(rep.epochs.iter().any(|&e| e >= 2), "no answer after the switch: {:?}", rep.epochs);
    // The group of three serves: every entry, every layer, against the reference.
    check_answers(&cluster, dir.path(), &spec, "group of three").await;
    assert!(rows_computed(&cluster.workers[2].addr).await > 0, "the new member computed no rows");
}
