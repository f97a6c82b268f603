//! The round protocol on ranks linked in one process ([`LoopbackFabric`]): every send is
//! answered with what the expert layer computes for it directly, errors keep their class, and
//! the group ends cleanly (a member leaving) or by its watchdog (a member that never comes).

use std::sync::Arc;

use bytes::Bytes;
use expertmesh_core::rng::SplitMix64;
use expertmesh_kernels::cpu::CpuBackend;
use expertmesh_kernels::fabric::LoopbackFabric;
use expertmesh_kernels::{ExpertBackend, Groups, HostRows, LayerExperts};

use super::*;

const H: usize = 64;

struct Layer {
    backend: Arc<dyn ExpertBackend>,
    layer: Arc<dyn LayerExperts>,
    /// Experts from this id up are "not held" (placement epoch 9).
    held_below: u32,
}

impl Layer {
    fn new(held_below: u32) -> Arc<Self> {
        let backend: Arc<dyn ExpertBackend> = Arc::new(CpuBackend::new());
        let layer = expertmesh_kernels::bench::synthetic_layer(&*backend, H, 32, 8, DType::BF16, 3).unwrap();
        Arc::new(Self { backend, layer, held_below })
    }

    /// What the layer computes for `data` directly.
    fn direct(&self, experts: &[u32], rows: &[u32], data: &Bytes) -> Vec<u8> {
        let n: usize = rows.iter().map(|&r| r as usize).sum();
        let x = self.backend.upload(HostRows::new(DType::F32, n, H, data.clone()).unwrap()).unwrap();
        let mut y = self.backend.alloc(DType::F32, n, H).unwrap();
        let g = Groups::from_counts(experts.iter().zip(rows).map(|(&e, &r)| (e, r as usize)));
        self.layer.forward(&*x, &g, &mut *y).unwrap();
        self.backend.download(y).unwrap().data.to_vec()
    }
}

impl ComputeSink for Layer {
    fn compute(&self, h: &SendHeader, experts: &[u32], rows: &[u32], x: &dyn Rows) -> Result<Box<dyn Rows>> {
        if let Some(e) = experts.iter().find(|&&e| e >= self.held_below) {
            return Err(Error::NotHeld {
                epoch: 9,
                detail: format!("expert {e} is not held (request epoch {})", h.epoch),
            });
        }
        let mut y = self.backend.alloc(h.dtype, x.rows(), x.cols())?;
        let g = Groups::from_counts(experts.iter().zip(rows).map(|(&e, &r)| (e, r as usize)));
        self.layer.forward(x, &g, &mut *y)?;
        Ok(y)
    }
}

fn group(n: usize) -> GroupInfo {
    GroupInfo { name: "node-a".into(), epoch: 3, members: (0..n).map(|i| format!("10.0.0.{i}:7000")).collect() }
}

fn start(n: usize, sink: &Arc<Layer>, limit: Duration) -> Vec<Arc<CollectiveTransport>> {
    LoopbackFabric::group(n, sink.backend.clone())
        .into_iter()
        .map(|f| Arc::new(CollectiveTransport::start(group(n), f, sink.clone(), limit).unwrap()))
        .collect()
}

fn header(request_id: u64) -> SendHeader {
    SendHeader { request_id, epoch: 3, layer: 1, dtype: DType::F32, hidden: H }
}

/// A random chunk of up to 3 expert groups (some empty) below `experts`.
fn chunk(rng: &mut SplitMix64, index: u32, experts: u64) -> OutChunk {
    let k = 1 + rng.below(3) as usize;
    let ids: Vec<u32> = (0..k).map(|_| rng.below(experts) as u32).collect();
    let rows: Vec<u32> = (0..k).map(|_| rng.below(6) as u32).collect();
    let n: usize = rows.iter().map(|&r| r as usize).sum();
    let mut data = Vec::with_capacity(n * H * 4);
    for _ in 0..n * H {
        data.extend_from_slice(&(rng.normal() as f32).to_le_bytes());
    }
    OutChunk { index, experts: ids, rows, data: Bytes::from(data) }
}

async fn send(t: &CollectiveTransport, to: &str, h: SendHeader, chunks: Vec<OutChunk>) -> Vec<Result<ChunkAnswer>> {
    let (tx, rx) = mpsc::channel(4);
    let stats = Arc::new(WireStats::default());
    let mut answers = t.open(to, h, rx, Instant::now() + Duration::from_secs(10), stats).await.unwrap();
    let feed = tokio::spawn(async move {
        for c in chunks {
            tx.send(c).await.unwrap();
        }
    });
    let mut out = Vec::new();
    while let Some(a) = answers.next().await {
        out.push(a);
    }
    feed.await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rank_sends_to_every_rank_and_gets_what_the_layer_computes() {
    let sink = Layer::new(8);
    let ts = start(3, &sink, Duration::from_secs(20));
    let mut jobs = Vec::new();
    let mut rng = SplitMix64::new(11);
    for (from, t) in ts.iter().enumerate() {
        for to in 0..3 {
            for s in 0..4u64 {
                let chunks: Vec<OutChunk> = (0..1 + rng.below(4) as u32).map(|i| chunk(&mut rng, i, 8)).collect();
                let (t, sink) = (t.clone(), sink.clone());
                let addr = group(3).members[to].clone();
                jobs.push(tokio::spawn(async move {
                    let got = send(&t, &addr, header(s), chunks.clone()).await;
                    assert_eq!(got.len(), chunks.len(), "rank {from} to {to}: one answer per chunk");
                    for (c, a) in chunks.iter().zip(got) {
                        let a = a.unwrap_or_else(|e| panic!("rank {from} to {to}: {e}"));
                        assert_eq!(a.chunk, c.index, "answers in chunk order");
                        assert_eq!(a.rows, c.rows.iter().sum::<u32>());
                        assert_eq!(&a.data[..], &sink.direct(&c.experts, &c.rows, &c.data)[..], "rank {from} to {to}");
                    }
                }));
            }
        }
    }
    for j in jobs {
        j.await.unwrap();
    }
    let (rounds, busy) = ts[0].rounds();
    assert!(busy >= 1 && busy <= rounds, "{busy} busy rounds of {rounds}");
    for t in &ts {
        t.shutdown();
        assert_eq!(t.stopped().as_deref(), Some("a member left the group"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_held_comes_back_with_its_epoch_and_other_chunks_still_answer() {
    let sink = Layer::new(4);
    let ts = start(2, &sink, Duration::from_secs(20));
    let mut rng = SplitMix64::new(5);
    let ok = chunk(&mut rng, 0, 4);
    let mut bad = chunk(&mut rng, 1, 4);
    bad.experts[0] = 6;
    let got = send(&ts[0], &group(2).members[1], header(1), vec![ok.clone(), bad]).await;
    assert_eq!(got.len(), 2);
    assert_eq!(&got[0].as_ref().unwrap().data[..], &sink.direct(&ok.experts, &ok.rows, &ok.data)[..]);
    match &got[1] {
        Err(Error::NotHeld { epoch: 9, detail }) => assert!(detail.contains("expert 6 is not held"), "{detail}"),
        other => panic!("expected not held at epoch 9, got {other:?}"),
    }
    let e = ts[0].open("10.9.9.9:1", header(2), mpsc::channel(1).1, Instant::now(), Default::default()).await;
    assert!(matches!(e, Err(Error::Unavailable(m)) if m.contains("not in group node-a")));
    for t in &ts {
        t.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaving_ends_the_group_for_everyone() {
    let sink = Layer::new(8);
    let ts = start(3, &sink, Duration::from_secs(20));
    ts[1].leave();
    let t0 = Instant::now();
    while ts.iter().any(|t| t.stopped().is_none()) {
        assert!(t0.elapsed() < Duration::from_secs(5), "the group did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = ts[0].open(&group(3).members[2], header(1), mpsc::channel(1).1, Instant::now(), Default::default()).await;
    // The destination is alive: its dispatcher sends again by gRPC without blaming it.
    assert!(matches!(e, Err(Error::LinkClosed(m)) if m.contains("a member left")), "sends after the end fail");
    for t in &ts {
        t.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replaced_by_a_newer_placement_answers_not_held_at_that_epoch() {
    let sink = Layer::new(8);
    let ts = start(2, &sink, Duration::from_secs(20));
    let mut rng = SplitMix64::new(9);
    let c = chunk(&mut rng, 0, 8);
    let got = send(&ts[1], &group(2).members[0], header(1), vec![c.clone()]).await;
    assert_eq!(&got[0].as_ref().unwrap().data[..], &sink.direct(&c.experts, &c.rows, &c.data)[..]);
    ts[0].leave_for(7);
    let t0 = Instant::now();
    while ts.iter().any(|t| t.stopped().is_none()) {
        assert!(t0.elapsed() < Duration::from_secs(5), "the group did not end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ts[1].stopped().unwrap().contains("placement epoch 7"), "{:?}", ts[1].stopped());
    // The dispatcher resends such rows by the newer placement; it never blames the worker.
    let e = ts[1].open(&group(2).members[0], header(2), mpsc::channel(1).1, Instant::now(), Default::default()).await;
    assert!(matches!(e, Err(Error::NotHeld { epoch: 7, .. })), "{:?}", e.err());
    assert_eq!(ts[1].in_flight(), 0);
    for t in &ts {
        t.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_comes_fails_sends_after_the_round_limit() {
    let sink = Layer::new(8);
    let mut fabrics = LoopbackFabric::group(3, sink.backend.clone());
    fabrics.pop(); // rank 2 never starts
    let ts: Vec<_> = fabrics
        .into_iter()
        .map(|f| CollectiveTransport::start(group(3), f, sink.clone(), Duration::from_millis(300)).unwrap())
        .collect();
    let mut rng = SplitMix64::new(8);
    let t0 = Instant::now();
    // Opened before or after the abort, the send fails UNAVAILABLE, never hangs.
    let got = send(&ts[0], &group(3).members[1], header(1), vec![chunk(&mut rng, 0, 8)]).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(matches!(&got[..], [Err(Error::Unavailable(_))]), "{got:?}");
    assert!(ts[0].stopped().is_some_and(|w| w.contains("aborted")), "{:?}", ts[0].stopped());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_backs_off() {
    let sink = Layer::new(8);
    let ts = start(2, &sink, Duration::from_secs(20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rounds, busy) = ts[0].rounds();
    // Without back-off two ranks in one process turn thousands of rounds in 300 ms; with it,
    // at most one every 500 us once idle.
    assert_eq!(busy, 0);
    assert!(rounds > 3 && rounds < 1500, "{rounds} idle rounds in 300 ms");
    for t in &ts {
        t.shutdown();
    }
}

#[test]
fn descriptions_and_statuses_round_trip() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut rng = SplitMix64::new(2);
    let ps: Vec<Pending> = (0..3)
        .map(|i| Pending {
            header: SendHeader { request_id: 40 + i, epoch: 7, layer: 3, dtype: DType::BF16, hidden: H },
            chunk: {
                let mut c = chunk(&mut rng, i as u32, 8);
                let n: usize = c.rows.iter().map(|&r| r as usize).sum();
                c.data = Bytes::from(vec![0u8; n * H * 2]);
                c
            },
            answer: tx.clone(),
            stats: Default::default(),
        })
        .collect();
    let mut m = Vec::new();
    encode_meta(&ps.iter().collect::<Vec<_>>(), &mut m);
    let data: usize = ps.iter().map(Pending::out_bytes).sum();
    let back = decode_meta(&m, data).unwrap();
    for (p, b) in ps.iter().zip(&back) {
        assert_eq!((b.header.request_id, b.header.epoch, b.header.layer), (p.header.request_id, 7, 3));
        assert_eq!((b.header.dtype, b.header.hidden, b.index), (DType::BF16, H, p.chunk.index));
        assert_eq!((&b.experts, &b.rows), (&p.chunk.experts, &p.chunk.rows));
    }
    assert!(decode_meta(&m, data + 1).unwrap_err().to_string().contains("account for"));
    assert!(decode_meta(&m[..m.len() - 3], data).is_err(), "a cut description is an error, not a panic");

    let mut s = Vec::new();
    encode_status(Ok(()), &mut s);
    encode_status(Err(Error::NotHeld { epoch: 12, detail: "gone".into() }), &mut s);
    encode_status(Err(Error::InvalidInput("é".repeat(300))), &mut s);
    assert!(decode_status(&s[..STATUS_BYTES]).is_ok());
    assert!(matches!(decode_status(&s[STATUS_BYTES..2 * STATUS_BYTES]), Err(Error::NotHeld { epoch: 12, .. })));
    match decode_status(&s[2 * STATUS_BYTES..]) {
        Err(Error::InvalidInput(m)) => assert!(m.starts_with("éé") && m.len() <= STATUS_BYTES - 20),
        other => panic!("{other:?}"),
    }
}
