//! Thousands of requests over the same worker-to-worker connections, four at a time, every
//! answer checked against the float64 reference. Regression: the dispatcher dropped each Compute
//! stream on its last answer, before the stream's trailers; h2 then reset the stream, answered
//! the late trailers with resets of its own, and after 1024 of those closed the connection
//! (ENHANCE_YOUR_CALM), failing every request in flight on it (seen after ~10k requests in CI).
//! Whether the trailers arrive late depends on load; the dispatcher's unit test
//! `a_send_ends_its_stream_before_its_last_answer` makes them late every time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_requests_share_one_connection() {
    use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor};
    use expertmesh_proto::v1::{DType as PDType, ForwardRequest};
    let (dir, spec) = gen_model("tiny-v4", DType::BF16, PresetOverrides::default(), 62);
    let cluster = Cluster::start(dir.path(), 2, &[]);
    let cases = Arc::new(traffic_cases(dir.path(), &spec, 8, 6));
    let client = cluster.moe_failover(&[0], Duration::from_secs(10));
    // 4 x 800 requests: well past 1024 resets had every stream been reset.
    let t = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|c| {
            let (client, cases, hidden) = (client.clone(), cases.clone(), spec.hidden);
            tokio::spawn(async move {
                let mut rep = TrafficReport::default();
                for i in 0..800 {
                    let (layer, x, ids, want) = &cases[(c + i) % cases.len()];
                    rep.sent += 1;
                    let req = ForwardRequest {
                        layer: *layer as u32,
                        hidden_states: Some(f32_tensor(&[ids.len(), hidden], x)),
                        input_ids: Some(i64_tensor(&[ids.len()], ids)),
                        wire_dtype: PDType::DtypeBf16 as i32,
                    };
                    let started = Instant::now();
                    match client.forward(req).await {
                        Ok(r) => rep.record(&r, want, started),
                        Err(s) => rep.failures.push(format!("request {}: {:?}: {}", rep.sent, s.code(), s.message())),
                    }
                }
                rep
            })
        })
        .collect();
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.unwrap());
    }
    let rep = TrafficReport::merge(reports);
    println!("{} in {:.1} s", rep.summary(), t.elapsed().as_secs_f64());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert_eq!(rep.sent, 3200);
    let log = std::fs::read_to_string(&cluster.workers[0].log).unwrap();
    assert!(!log.contains("reset streams reached limit"), "h2 closed a connection for its resets:\n{log}");
}
