//! Workers follow placement epochs without dropping a token: a worker joins and another leaves
//! (SIGTERM) under steady traffic; every request is answered, and answered correctly.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_proto::v1::{DType as PDType, ForwardRequest};
use expertmesh_worker::wire::{f32_tensor, i64_tensor, tensor_to_f32};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_graceful_leave_under_traffic_lose_nothing() {
    let ov = PresetOverrides { hidden: Some(128), ffn: Some(64), ..Default::default() };
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, ov, 21);
    let mut cluster = Cluster::start(dir.path(), 2, &["--lease-ttl-ms", "2000"]);
    // A fixed set of inputs with their float64 answers.
    let tokens = 48;
    let layers = spec.moe_layers();
    let cases: Vec<_> = (0..6)
        .map(|i| {
            let layer = layers[i % layers.len()];
            let (x, ids) = random_input(&spec, tokens, 900 + i as u64);
            let r = reference(dir.path(), &spec, layer, &x, tokens, Some(&ids));
            (layer, x, ids, r.output)
        })
        .collect();
    let client = cluster.moe_client(0).await;
    let traffic = {
        let (cases, spec) = (cases.clone(), spec.clone());
        tokio::spawn(async move {
            let mut client = client;
            let mut epochs = Vec::new();
            let (mut sent, mut correct) = (0u64, 0u64);
            let mut failures = Vec::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(40) {
                let (layer, x, ids, want) = &cases[sent as usize % cases.len()];
                sent += 1;
                let resp = client
                    .forward(ForwardRequest {
                        layer: *layer as u32,
                        hidden_states: Some(f32_tensor(&[tokens, spec.hidden], x)),
                        input_ids: Some(i64_tensor(&[tokens], ids)),
                        wire_dtype: PDType::DtypeBf16 as i32,
                    })
                    .await;
                match resp {
                    Ok(r) => {
                        let r = r.into_inner();
                        let (out, _) = tensor_to_f32(r.output.as_ref().unwrap(), "output").unwrap();
                        let err = rel_l2_f32(&out, want);
                        if err < 1e-2 {
                            correct += 1;
                        } else {
                            failures.push(format!("request {sent}: wrong answer, rel L2 {err}"));
                        }
                        if epochs.last() != Some(&r.epoch) {
                            epochs.push(r.epoch);
                        }
                        // Stop once the last change (epoch 3) has served a good number of requests.
                        if r.epoch >= 3 && epochs.len() >= 2 && sent > 60 {
                            break;
                        }
                    }
                    Err(e) => failures.push(format!("request {sent}: {e}")),
                }
            }
            (sent, correct, failures, epochs)
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A third worker joins: epoch 2 spreads experts over three workers.
    cluster.add_worker("w2", &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // w1 leaves gracefully: it deregisters, the coordinator re-plans without it (epoch 3).
    let pid = cluster.workers[1].child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = cluster.workers[1].child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "w1 did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "w1 exits 0 on SIGTERM, got {status}");
    let (sent, correct, failures, epochs) = traffic.await.unwrap();
    let w0_log = std::fs::read_to_string(&cluster.workers[0].log).unwrap_or_default();
    let retried = w0_log.matches("will retry its rows").count();
    println!(
        "requests sent {sent}, answered correctly {correct}, failed {}, lost 0, epochs seen {epochs:?}, destinations retried on a newer epoch {retried}",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}\n{}", cluster.dump_logs());
    assert_eq!(sent, correct);
    assert!(epochs.first() == Some(&1) && epochs.last() == Some(&3), "epochs {epochs:?}");
}
