//! Crafted requests cannot crash, stall or fool a worker. The cases that used to abort a worker
//! (sizes whose products wrapped to 0, then a huge allocation panicked on the compute pool),
//! chunks out of order, non-finite activations, deadlines, and a seeded fuzz corpus of mutated
//! Forward requests and Compute streams: each is answered with an error that names what was
//! wrong (or, for a mutation that happens to be valid, a well-formed answer), no process dies,
//! and a correct answer follows.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::Cluster;
use common::corpus::{compute_cases, forward_cases};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor, tensor_to_f32};
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::moe_layer_client::MoeLayerClient;
use expertmesh_proto::v1::{DType as PDType, ExpertBatch, ForwardRequest, Tensor};
use tonic::transport::Channel;
use tonic::Code;

async fn good_request(client: &mut MoeLayerClient<Channel>, dir: &std::path::Path, spec: &expertmesh_core::ModelSpec) {
    let (x, ids) = random_input(spec, 5, 7);
    let layer = spec.moe_layers()[0];
    let r = reference(dir, spec, layer, &x, 5, Some(&ids));
    let resp = client
        .forward(ForwardRequest {
            layer: layer as u32,
            hidden_states: Some(f32_tensor(&[5, spec.hidden], &x)),
            input_ids: Some(i64_tensor(&[5], &ids)),
            wire_dtype: PDType::DtypeF32 as i32,
        })
        .await
        .expect("a good request is answered")
        .into_inner();
    let (out, _) = tensor_to_f32(resp.output.as_ref().unwrap(), "output").unwrap();
    assert!(rel_l2_f32(&out, &r.output) < 1e-5);
}

/// Send one Compute stream; the first error, or Ok with the number of answers.
async fn compute(c: &mut ExpertServiceClient<Channel>, stream: Vec<ExpertBatch>) -> Result<usize, tonic::Status> {
    let n = stream.len();
    let mut resp = c.compute(tokio_stream::iter(stream)).await?.into_inner();
    let mut answers = 0;
    while answers < n {
        match resp.message().await? {
            Some(_) => answers += 1,
            None => break,
        }
    }
    Ok(answers)
}

fn batch(layer: u32, hidden: usize, experts: Vec<u32>, rows: Vec<u32>, data: Vec<u8>, chunk: u32) -> ExpertBatch {
    ExpertBatch {
        request_id: 1,
        epoch: 1,
        layer,
        dtype: PDType::DtypeF32 as i32,
        hidden: hidden as u32,
        experts,
        rows,
        data: Bytes::from(data),
        chunk,
    }
}

fn assert_alive(cluster: &mut Cluster, after: &str) {
    assert!(alive(&mut cluster.coordinator), "the coordinator died after {after}");
    for w in cluster.workers.iter_mut() {
        assert!(
            alive(w),
            "worker {} died after {after}:\n{}",
            w.log.display(),
            std::fs::read_to_string(&w.log).unwrap_or_default()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_requests_get_clear_errors_and_nothing_dies() {
    // Hidden 256, as in the report: [2^56, 256] and rows summing to 2^54 used to wrap to 0 bytes.
    let (dir, spec) =
        gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(256), ..Default::default() }, 95);
    let mut cluster = Cluster::start(dir.path(), 2, &[]);
    let mut moe = cluster.moe_client(0).await;
    good_request(&mut moe, dir.path(), &spec).await;
    let h = spec.hidden;
    let layer = spec.moe_layers()[0] as u32;

    // Forward with a shape whose element count overflows, and no data.
    for shape in [vec![1u64 << 56, h as u64], vec![1u64 << 62, 1 << 62], vec![u64::MAX, h as u64]] {
        let req = ForwardRequest {
            layer,
            hidden_states: Some(Tensor { dtype: PDType::DtypeF32 as i32, shape: shape.clone(), data: Bytes::new() }),
            input_ids: None,
            wire_dtype: 0,
        };
        let e = moe.forward(req).await.expect_err("overflowing shape");
        println!("Forward hidden_states {shape:?}, no data: {:?}: {}", e.code(), e.message());
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains("--max-batch-tokens") || e.message().contains("expected [T, 256]"), "{e}");
        assert_alive(&mut cluster, "an overflowing Forward shape");
        good_request(&mut moe, dir.path(), &spec).await;
    }

    let mut c = ExpertServiceClient::connect(format!("http://{}", cluster.workers[0].addr))
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    // f32 rows summing to exactly 2^54 (x 256 x 4 bytes = 2^64), no data: 4,194,305 segments.
    let mut rows = vec![u32::MAX; 4_194_304];
    rows.push(4_194_304);
    assert_eq!(rows.iter().map(|&r| r as u128).sum::<u128>(), 1u128 << 54);
    let experts = vec![0u32; rows.len()];
    let t = Instant::now();
    let e = compute(&mut c, vec![batch(layer, h, experts, rows, Vec::new(), 0)]).await.expect_err("2^54 rows");
    println!(
        "Compute with f32 rows summing to 2^54 and no data ({:.1} s): {:?}: {}",
        t.elapsed().as_secs_f64(),
        e.code(),
        e.message()
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("--max-message-mib"), "{e}");
    assert_alive(&mut cluster, "rows summing to 2^54");
    good_request(&mut moe, dir.path(), &spec).await;

    // Find an expert worker 0 holds, for the stream-level checks below.
    let one = |chunk: u32, e: u32, v: f32| batch(layer, h, vec![e], vec![1], v.to_le_bytes().repeat(h), chunk);
    let mut held = None;
    for e in 0..spec.n_routed as u32 {
        if compute(&mut c, vec![one(0, e, 0.5)]).await.is_ok() {
            held = Some(e);
            break;
        }
    }
    let e = held.expect("worker 0 holds some expert");
    let cases: Vec<(&str, Vec<ExpertBatch>, &str)> = vec![
        ("chunk 1 first", vec![one(1, e, 0.5)], "expected chunk 0"),
        ("chunk 0 twice", vec![one(0, e, 0.5), one(0, e, 0.5)], "expected chunk 1"),
        ("chunks 0, 2", vec![one(0, e, 0.5), one(2, e, 0.5)], "expected chunk 1"),
        ("NaN activations", vec![one(0, e, f32::NAN)], "non-finite"),
        ("infinite activations", vec![one(0, e, f32::INFINITY)], "non-finite"),
        ("a chunk with no rows", vec![batch(layer, h, vec![e], vec![0], Vec::new(), 0)], "no rows"),
    ];
    for (what, stream, says) in cases {
        let err = compute(&mut c, stream).await.expect_err(what);
        println!("Compute {what}: {:?}: {}", err.code(), err.message());
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
        assert!(err.message().contains(says), "{what}: `{}` should say `{says}`", err.message());
        assert_alive(&mut cluster, what);
    }
    good_request(&mut moe, dir.path(), &spec).await;

    // A deadline too short for the work ends the call, clearly, and costs the server nothing.
    let (x, ids) = random_input(&spec, 64, 3);
    let mut req = tonic::Request::new(ForwardRequest {
        layer,
        hidden_states: Some(f32_tensor(&[64, h], &x)),
        input_ids: Some(i64_tensor(&[64], &ids)),
        wire_dtype: 0,
    });
    req.set_timeout(Duration::from_micros(200));
    let err = moe.forward(req).await.expect_err("200 µs is too short");
    println!("Forward with a 200 µs deadline: {:?}: {}", err.code(), err.message());
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err}");
    good_request(&mut moe, dir.path(), &spec).await;

    // The fuzz corpus.
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let fw = forward_cases(&spec, 300, 2026);
    for (i, (what, req)) in fw.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(20), moe.forward(req.clone())).await;
        let r = r.unwrap_or_else(|_| panic!("{what}: no answer within 20 s"));
        match r {
            Ok(resp) => {
                // A mutation that happened to be valid: a well-formed answer.
                let resp = resp.into_inner();
                let t = req.hidden_states.as_ref().unwrap().shape[0] as usize;
                let (out, shape) = tensor_to_f32(resp.output.as_ref().unwrap(), "output").unwrap();
                assert_eq!(shape, vec![t, h], "{what}");
                assert!(out.iter().all(|v| v.is_finite()), "{what}: non-finite output");
                *codes.entry("Ok".into()).or_default() += 1;
            }
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::InvalidArgument | Code::OutOfRange),
                    "{what}: {:?}: {}",
                    s.code(),
                    s.message()
                );
                assert!(!s.message().is_empty(), "{what}: an error says what was wrong");
                *codes.entry(format!("{:?}", s.code())).or_default() += 1;
            }
        }
        if i % 50 == 49 {
            assert_alive(&mut cluster, &what);
            good_request(&mut moe, dir.path(), &spec).await;
        }
    }
    let cc = compute_cases(&spec, 300, 2027);
    for (i, (what, stream)) in cc.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(20), compute(&mut c, stream)).await;
        match r.unwrap_or_else(|_| panic!("{what}: no answer within 20 s")) {
            Ok(_) => *codes.entry("Compute Ok".into()).or_default() += 1,
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange),
                    "{what}: {:?}: {}",
                    s.code(),
                    s.message()
                );
                *codes.entry(format!("Compute {:?}", s.code())).or_default() += 1;
            }
        }
        if i % 50 == 49 {
            assert_alive(&mut cluster, &what);
            good_request(&mut moe, dir.path(), &spec).await;
        }
    }
    println!("fuzz corpus (300 Forward requests, 300 Compute streams): {codes:?}");
    assert_alive(&mut cluster, "the fuzz corpus");
    good_request(&mut moe, dir.path(), &spec).await;
}

/// `forward --entry A,B`: MoeLayer.Forward is idempotent, so when the first entry is dead the
/// call goes to the next and the answer is still the reference's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_through_entries_skips_a_dead_one() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 96);
    let cluster = Cluster::start(dir.path(), 2, &[]);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.safetensors");
    let output = work.path().join("out.safetensors");
    let bin = common::cluster::BIN;
    let m = dir.path().display().to_string();
    let o = std::process::Command::new(bin)
        .args(["gen-input", "--model", &m, "--tokens", "12", "--seed", "4", "--out"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Nothing listens on the first entry (a port just closed).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let entries = format!("{dead},{}", cluster.workers[1].addr);
    let layer = spec.moe_layers()[1].to_string();
    for _ in 0..2 {
        let o = std::process::Command::new(bin)
            .args(["forward", "--entry", &entries, "--layer", &layer, "--wire", "f32", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        println!("{}", String::from_utf8_lossy(&o.stdout).trim());
        let out = read_f32(&output, "output");
        let x = read_f32(&input, "hidden_states");
        let ids = read_i64(&input, "input_ids");
        let r = reference(dir.path(), &spec, spec.moe_layers()[1], &x, 12, Some(&ids));
        assert!(rel_l2_f32(&out, &r.output) < 1e-5);
    }
    // --check compares the cluster's answer with the float64 reference of --model: it passes
    // for the model the cluster serves, and fails, naming the difference, for another model of
    // the same shape (other weights).
    let check = |model: &str| {
        std::process::Command::new(bin)
            .args(["forward", "--entry", &entries, "--layer", &layer, "--wire", "bf16", "--check", "--model", model])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()
            .unwrap()
    };
    let o = check(&m);
    let said = String::from_utf8_lossy(&o.stdout);
    println!("--check, the served model: {}", said.trim());
    assert!(
        o.status.success() && said.contains("chosen experts match"),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (other, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 97);
    let o = check(&other.path().display().to_string());
    let err = String::from_utf8_lossy(&o.stderr);
    println!("--check, another model: {}", err.trim());
    assert!(
        !o.status.success() && err.contains("--check: the") && err.contains("differ") && !err.contains("Some("),
        "{err}"
    );
    let o = std::process::Command::new(bin)
        .args(["forward", "--entry", &entries, "--layer", &layer, "--check", "--input", "x", "--output", "y"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--model"), "--check needs --model: {err}");

    // Only dead entries: a clear error naming them, not a hang; one message even with
    // RUST_BACKTRACE set, never a stack trace.
    let o = std::process::Command::new(bin)
        .env("RUST_BACKTRACE", "1")
        .args(["forward", "--entry", &dead, "--layer", &layer, "--timeout-ms", "3000", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("only a dead entry: {}", err.trim());
    assert!(!o.status.success());
    assert!(err.contains(&dead), "{err}");
    assert!(err.trim().lines().count() == 1 && !err.contains("anyhow"), "one clear message: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_stream_that_sends_nothing_is_closed() {
    let (dir, _spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 33);
    let cluster = Cluster::start_with(dir.path(), 1, &[], &["--stream-idle-timeout-ms", "500"]);
    let mut c = ExpertServiceClient::connect(format!("http://{}", cluster.workers[0].addr)).await.unwrap();
    // A stream opened and then silent: no chunk, no end.
    let (_tx, rx) = tokio::sync::mpsc::channel::<ExpertBatch>(1);
    let t = Instant::now();
    let mut answers = c.compute(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let e = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("the worker closes the silent stream")
        .expect_err("closed with an error");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(e.message().contains("sent nothing") && e.message().contains("--stream-idle-timeout-ms"), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(400), "not before the idle limit: {:?}", t.elapsed());
}
