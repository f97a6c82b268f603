//! Admission control: a worker's memory is bounded per peer and in total. Streams that send
//! 4 MiB chunks and never read their answers are flow-controlled (a chunk is read off the
//! connection only when its bytes fit the in-flight budget; HTTP/2 windows hold the rest back
//! at the sender), answered RESOURCE_EXHAUSTED when the budget stays full, and cut once they
//! stall past --stall-timeout-ms. Meanwhile a dispatcher's traffic through the same worker is
//! answered correctly. A peer opening more streams than --max-streams-per-peer gets
//! RESOURCE_EXHAUSTED naming the limit.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{DType as PDType, ExpertBatch};
use tonic::transport::{Channel, Endpoint};

const MIB: f64 = (1u64 << 20) as f64;

fn chunk(layer: u32, hidden: usize, expert: u32, rows: usize, data: &Bytes, i: u32) -> ExpertBatch {
    ExpertBatch {
        request_id: 7,
        epoch: 1,
        layer,
        dtype: PDType::DtypeF32 as i32,
        hidden: hidden as u32,
        experts: vec![expert],
        rows: vec![rows as u32],
        data: data.clone(),
        chunk: i,
    }
}

async fn connection(addr: &str) -> ExpertServiceClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    ExpertServiceClient::new(ch).max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_never_read_are_bounded_and_cut() {
    // Hidden 1024: a 4 MiB f32 chunk is 1024 rows.
    let ov = PresetOverrides { hidden: Some(1024), ffn: Some(64), ..Default::default() };
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, ov, 97);
    let budget_mib = 64u64;
    let stall = Duration::from_secs(3);
    let wargs = [
        "--max-inflight-mib",
        "64",
        "--stall-timeout-ms",
        "3000",
        "--admission-wait-ms",
        "500",
        "--max-streams-per-peer",
        "8",
    ];
    let mut cluster = Cluster::start_with(dir.path(), 2, &[], &wargs);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let target = cluster.workers[1].addr.clone();
    let pid = cluster.workers[1].child.id();
    let layer = spec.moe_layers()[0] as u32;
    let h = spec.hidden;
    // An expert worker 1 holds.
    let one = Bytes::from(vec![0u8; h * 4]);
    let mut probe = connection(&target).await;
    let mut expert = None;
    for e in 0..spec.n_routed as u32 {
        let r = probe.compute(tokio_stream::iter(vec![chunk(layer, h, e, 1, &one, 0)])).await;
        if let Ok(mut s) = r {
            if s.get_mut().message().await.is_ok() {
                expert = Some(e);
                break;
            }
        }
    }
    let expert = expert.expect("worker 1 holds an expert");

    // Legitimate traffic through worker 0's dispatcher, whose rows partly go to worker 1.
    let cases = Arc::new(traffic_cases(dir.path(), &spec, 16, 6));
    let client = cluster.moe_failover(&[0], Duration::from_secs(30));
    let legit = Streams::start(client, cases, 2, h, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss_bytes(pid);

    // 64 streams over 8 connections, each an endless run of 4 MiB chunks, answers never read.
    let rows = 1024;
    let data = Bytes::from(vec![0u8; rows * h * 4]);
    let mut held = Vec::new();
    let t0 = Instant::now();
    for _ in 0..8 {
        let conn = connection(&target).await;
        for _ in 0..8 {
            let mut c = conn.clone();
            let data = data.clone();
            let stream = tokio_stream::iter((0u32..).map(move |i| chunk(layer, h, expert, rows, &data, i)));
            held.push(tokio::spawn(async move { c.compute(stream).await }));
        }
    }
    // Long enough for every stream to be refused (its chunk found no room within the admission
    // wait) or cut (it stalled for the stall timeout while holding room), wave after wave.
    let mut peak = base;
    while t0.elapsed() < stall * 4 + Duration::from_secs(2) {
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grew = peak.saturating_sub(base) as f64 / MIB;
    // Every stream ended: refused, or its connection cut. Reading un-stalls a live stream, so
    // read only what arrived before the end (a handful of answers), then the end.
    // All at once: streams of one connection share its window, so draining them one by one
    // would leave the others' answers stuck behind unread data.
    let drains: Vec<_> = held
        .into_iter()
        .map(|h| {
            tokio::spawn(async move {
                match h.await.expect("the call task") {
                    Err(s) => format!("{:?}", s.code()),
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        loop {
                            match s.message().await {
                                Ok(Some(_)) => continue,
                                Ok(None) => break "closed".to_string(),
                                Err(e) => break format!("{:?}", e.code()),
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut ended = 0;
    let mut codes = std::collections::BTreeMap::new();
    for d in drains {
        let end = tokio::time::timeout(Duration::from_secs(20), d).await.expect("every stream ends").unwrap();
        *codes.entry(end).or_insert(0) += 1;
        ended += 1;
    }
    let after = rss_bytes(pid);
    println!(
        "64 streams of 4 MiB chunks that never read: worker RSS {:.0} MiB before, peak +{grew:.0} MiB (budget {budget_mib} MiB), \
         {:.0} MiB after; {ended} streams ended {codes:?}",
        base as f64 / MIB,
        after as f64 / MIB
    );
    assert_eq!(ended, 64, "{}", std::fs::read_to_string(&cluster.workers[1].log).unwrap());
    // The budget, plus per connection its receive window (8 MiB), plus per stream the chunk it
    // read and waits to fit and the answer the transport holds for it; before admission control
    // this pinned 45 MiB per stream (2.9 GB for 64), without limit on the streams.
    let bound = budget_mib as f64 + 8.0 * 8.0 + 64.0 * (4.0 + 4.0) + 64.0;
    assert!(grew < bound, "worker memory grew {grew:.0} MiB; bound {bound:.0} MiB");
    assert!(alive(&mut cluster.workers[1]));

    // A peer whose chunks fit the budget but who never reads its answers: its answers fill the
    // stream's queue, and after the stall timeout its connection is cut (every stream on it).
    let cuts = |l: &str| l.matches("peer stopped reading its answers; cutting its connection").count();
    let before = cuts(&std::fs::read_to_string(&cluster.workers[1].log).unwrap());
    let small_rows = 64;
    let small_data = Bytes::from(vec![0u8; small_rows * h * 4]);
    let conn = connection(&target).await;
    let t_stall = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut c = conn.clone();
        let data = small_data.clone();
        let stream = tokio_stream::iter((0u32..).map(move |i| chunk(layer, h, expert, small_rows, &data, i)));
        slow.push(c.compute(stream).await.expect("admitted").into_inner());
    }
    let log = loop {
        let log = std::fs::read_to_string(&cluster.workers[1].log).unwrap();
        if cuts(&log) > before {
            break log;
        }
        // A liveness bound, not a timing target: without the cut this never ends.
        assert!(t_stall.elapsed() < stall + Duration::from_secs(30), "a peer that never reads is not cut:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "a peer that stopped reading was cut {:.1} s after it started (stall timeout {stall:?})",
        t_stall.elapsed().as_secs_f64()
    );
    assert!(t_stall.elapsed() >= stall, "cut only after the stall timeout:\n{log}");
    for mut s in slow {
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            }
        })
        .await
        .expect("a cut stream ends");
        assert!(end.is_some(), "a cut stream ends with an error, not a clean end");
    }

    // Streams per peer: one connection may hold 8; the 9th and 10th are refused after the wait.
    let conn = connection(&target).await;
    let small = Bytes::from(vec![0u8; h * 4]);
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..10 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(chunk(layer, h, expert, 1, &small, 0)).await.unwrap();
        let mut c = conn.clone();
        let r =
            tokio::time::timeout(Duration::from_secs(5), c.compute(tokio_stream::wrappers::ReceiverStream::new(rx)))
                .await
                .expect("answered within the admission wait");
        match r {
            Ok(s) => open.push((tx, s)),
            Err(s) => refused.push(s),
        }
    }
    println!(
        "10 streams on one connection: {} open, {} refused: {:?}",
        open.len(),
        refused.len(),
        refused.first().map(|s| s.message().to_string())
    );
    assert_eq!(open.len(), 8);
    assert!(refused
        .iter()
        .all(|s| s.code() == tonic::Code::ResourceExhausted && s.message().contains("--max-streams-per-peer")));
    drop(open);

    let rep = legit.finish().await;
    println!("legitimate traffic meanwhile: {}, slowest {:?}", rep.summary(), rep.max_latency);
    assert_eq!(rep.wrong, 0);
    assert_eq!(rep.hung, 0);
    rep.assert_all_correct(|| cluster.dump_logs());
}
