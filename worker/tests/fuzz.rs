//! Fuzz targets for every decoder and validator a peer's bytes reach, run by proptest for a
//! fixed number of cases (bounded time, in every `cargo test`; `EXPERTMESH_FUZZ_CASES=1000000`
//! for a long run): arbitrary protobuf bytes,
//! arbitrary field values with a bias toward the extremes (0, 1, 2^31, 2^56, u64::MAX), and
//! arbitrary strings. None may panic, and what they accept must be consistent.

use bytes::Bytes;
use expertmesh_core::config::{preset_config, PresetOverrides};
use expertmesh_core::limits::{check_address, check_id, checked_product};
use expertmesh_core::ModelSpec;
use expertmesh_dispatcher::wire::{parse_grpc_timeout, tensor_to_f32, tensor_to_i64};
use expertmesh_proto::v1::{
    DeviceInfo, ExpertBatch, ExpertLoad, ForwardRequest, LoadReport, RegisterRequest, Tensor, WorkerInfo,
};
use expertmesh_worker::limits::{check_batch, check_forward_shape, Limits, StreamCheck};
use expertmesh_worker::service::{forward_cost, forward_input};
use proptest::prelude::*;
use prost::Message;

/// Cases per target: 10,000 in CI (about 2 s for all); `EXPERTMESH_FUZZ_CASES` for longer runs.
fn cases() -> u32 {
    std::env::var("EXPERTMESH_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

fn spec() -> ModelSpec {
    let cfg = preset_config("tiny-v3", &PresetOverrides::default()).unwrap();
    ModelSpec::from_config_json(&cfg.to_string()).unwrap()
}

fn limits() -> Limits {
    Limits { max_message_bytes: 1 << 20, max_batch_tokens: 64, max_stream_chunks: 16 }
}

fn big_u64() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..70, Just(1u64 << 31), Just(1u64 << 54), Just(1u64 << 56), Just(u64::MAX), any::<u64>()]
}

fn big_u32() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..70, Just(u32::MAX), Just(1u32 << 31), any::<u32>()]
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (-1i32..8, prop::collection::vec(big_u64(), 0..4), prop::collection::vec(any::<u8>(), 0..2048))
        .prop_map(|(dtype, shape, data)| Tensor { dtype, shape, data: Bytes::from(data) })
}

fn forward_request() -> impl Strategy<Value = ForwardRequest> {
    (big_u32(), prop::option::of(tensor()), prop::option::of(tensor()), -1i32..8).prop_map(
        |(layer, hidden_states, input_ids, wire_dtype)| ForwardRequest { layer, hidden_states, input_ids, wire_dtype },
    )
}

fn expert_batch() -> impl Strategy<Value = ExpertBatch> {
    (
        (any::<u64>(), any::<u64>(), big_u32(), -1i32..8, big_u32()),
        prop::collection::vec(big_u32(), 0..6),
        prop::collection::vec(big_u32(), 0..6),
        prop::collection::vec(any::<u8>(), 0..4096),
        big_u32(),
    )
        .prop_map(|((request_id, epoch, layer, dtype, hidden), experts, rows, data, chunk)| ExpertBatch {
            request_id,
            epoch,
            layer,
            dtype,
            hidden,
            experts,
            rows,
            data: Bytes::from(data),
            chunk,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// A Forward request: refused with a message, or decoded into exactly what its shape says.
    #[test]
    fn forward_requests_never_panic(req in forward_request()) {
        let s = spec();
        let l = limits();
        if let Ok((inp, _wire)) = forward_input(&s, &l, &req) {
            prop_assert!(inp.tokens >= 1 && inp.tokens <= l.max_batch_tokens);
            prop_assert_eq!(inp.hidden_states.len(), inp.tokens * s.hidden);
            if let Some(ids) = &inp.input_ids {
                prop_assert_eq!(ids.len(), inp.tokens);
            }
        }
        if let Some(t) = &req.hidden_states {
            if let Ok(tokens) = check_forward_shape(&s, &l, t) {
                prop_assert!(forward_cost(&s, tokens) > 0);
            }
        }
    }

    /// A chunk: refused, or its rows fit one message and its bytes match them exactly.
    #[test]
    fn expert_batches_never_panic(b in expert_batch()) {
        let s = spec();
        let l = limits();
        if let Ok(shape) = check_batch(&s, &l, &b) {
            prop_assert!(shape.rows >= 1);
            prop_assert_eq!(b.data.len(), shape.rows * s.hidden * shape.dtype.size());
            prop_assert!(b.data.len() <= l.max_message_bytes);
            prop_assert!(shape.cost_bytes >= b.data.len() as u64);
        }
    }

    /// Chunk numbering and stream totals: whatever arrives, in order or not.
    #[test]
    fn stream_checks_never_panic(chunks in prop::collection::vec((big_u32(), any::<usize>()), 0..40)) {
        let s = spec();
        let l = limits();
        let mut c = StreamCheck::new(&s, &l);
        let mut admitted = 0u64;
        for (chunk, rows) in chunks {
            if c.admit(chunk, rows).is_ok() {
                prop_assert_eq!(u64::from(chunk), admitted);
                admitted += 1;
            }
        }
        prop_assert!(admitted as usize <= l.max_stream_chunks);
    }

    /// Any bytes as any of the messages a peer sends: decoded or not, the validators answer.
    #[test]
    fn arbitrary_protobuf_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let s = spec();
        let l = limits();
        if let Ok(r) = ForwardRequest::decode(bytes.as_slice()) {
            let _ = forward_input(&s, &l, &r);
        }
        if let Ok(b) = ExpertBatch::decode(bytes.as_slice()) {
            let _ = check_batch(&s, &l, &b);
        }
        if let Ok(r) = RegisterRequest::decode(bytes.as_slice()) {
            if let Some(w) = &r.worker {
                let _ = expertmesh_cluster::validate::check_worker_info(w);
            }
        }
        if let Ok(r) = LoadReport::decode(bytes.as_slice()) {
            let _ = expertmesh_cluster::validate::check_load_report(&s, &r);
        }
    }

    /// Tensors of any dtype, shape and length.
    #[test]
    fn tensors_never_panic(t in tensor()) {
        if let Ok((v, shape)) = tensor_to_f32(&t, "t") {
            prop_assert_eq!(v.len(), shape.iter().product::<usize>());
        }
        if let Ok((v, shape)) = tensor_to_i64(&t, "t") {
            prop_assert_eq!(v.len(), shape.iter().product::<usize>());
        }
    }

    /// Products of any dimensions: exact, or refused.
    #[test]
    fn checked_products_are_exact(dims in prop::collection::vec(big_u64(), 0..5)) {
        let exact = if dims.contains(&0) { Some(0) } else { dims.iter().try_fold(1u128, |a, &d| a.checked_mul(d as u128)) };
        match checked_product(&dims) {
            Some(p) => prop_assert_eq!(Some(p as u128), exact),
            None => prop_assert!(exact.is_none_or(|e| e > usize::MAX as u128)),
        }
    }

    /// Strings where ids, addresses, timeouts and store keys go.
    #[test]
    fn strings_never_panic(s in ".{0,300}", raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let lossy = String::from_utf8_lossy(&raw).into_owned();
        for v in [s.as_str(), lossy.as_str()] {
            if check_id("id", v).is_ok() {
                prop_assert!(!v.is_empty() && v.len() <= 128 && !v.contains('/'));
            }
            if check_address("address", v).is_ok() {
                prop_assert!(v.contains(':') && v.len() <= 256);
            }
            let _ = parse_grpc_timeout(v);
            let keys = expertmesh_cluster::keys::ClusterKeys::new("c");
            let _ = keys.parse(&format!("{}{v}", keys.root()));
        }
    }

    /// Registrations and load reports with any figures.
    #[test]
    fn registrations_and_reports_never_panic(
        id in ".{0,40}",
        addr in ".{0,40}",
        tflops in any::<f64>(),
        memory in any::<u64>(),
        loads in prop::collection::vec((big_u32(), big_u32(), any::<u64>()), 0..50),
    ) {
        let w = WorkerInfo {
            worker_id: id,
            address: addr,
            node: "n".into(),
            devices: vec![DeviceInfo { kind: "cpu".into(), index: 0, memory_bytes: memory, tflops, ..Default::default() }],
            ..Default::default()
        };
        if expertmesh_cluster::validate::check_worker_info(&w).is_ok() {
            prop_assert!(tflops.is_finite() && tflops >= 0.0);
        }
        let r = LoadReport {
            worker_id: "w".into(),
            epoch: 0,
            experts: loads.into_iter().map(|(layer, expert, tokens)| ExpertLoad { layer, expert, tokens }).collect(),
            ..Default::default()
        };
        let _ = expertmesh_cluster::validate::check_load_report(&spec(), &r);
    }
}
