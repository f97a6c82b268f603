//! Bad input gets a clear error that names the problem, and the server keeps serving everyone
//! else: every case is followed by a good request that must still be answered correctly.

mod common;

use bytes::Bytes;
use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor, tensor_to_f32};
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::moe_layer_client::MoeLayerClient;
use expertmesh_proto::v1::{DType as PDType, ExpertBatch, ForwardRequest, Tensor};
use tonic::transport::Channel;
use tonic::Code;

struct Case {
    name: &'static str,
    req: ForwardRequest,
    code: Code,
    says: &'static [&'static str],
}

async fn still_serves(client: &mut MoeLayerClient<Channel>, dir: &std::path::Path, spec: &expertmesh_core::ModelSpec) {
    let (x, ids) = random_input(spec, 9, 77);
    let layer = spec.moe_layers()[1];
    let r = reference(dir, spec, layer, &x, 9, Some(&ids));
    let resp = client
        .forward(ForwardRequest {
            layer: layer as u32,
            hidden_states: Some(f32_tensor(&[9, spec.hidden], &x)),
            input_ids: Some(i64_tensor(&[9], &ids)),
            wire_dtype: PDType::DtypeF32 as i32,
        })
        .await
        .expect("a good request after a bad one is served")
        .into_inner();
    let (out, _) = tensor_to_f32(resp.output.as_ref().unwrap(), "output").unwrap();
    assert!(rel_l2_f32(&out, &r.output) < 1e-5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_rejects_bad_requests_and_keeps_serving() {
    // V4: layers 0..=2 hash-routed; hidden 64, vocab 1000.
    let (dir, spec) = gen_model("tiny-v4", DType::BF16, PresetOverrides::default(), 3);
    let cluster = Cluster::start(dir.path(), 2, &[]);
    let mut client = cluster.moe_client(0).await;
    let h = spec.hidden;
    let (x, ids) = random_input(&spec, 4, 1);
    let good_x = || f32_tensor(&[4, h], &x);
    let good_ids = || i64_tensor(&[4], &ids);
    let req = |layer: u32, hs: Option<Tensor>, ids: Option<Tensor>| ForwardRequest {
        layer,
        hidden_states: hs,
        input_ids: ids,
        wire_dtype: 0,
    };
    let mut nan_x = x.clone();
    nan_x[2 * h + 5] = f32::NAN;
    let mut inf_x = x.clone();
    inf_x[3 * h] = f32::INFINITY;
    let mut truncated = good_x();
    truncated.data = truncated.data.slice(..truncated.data.len() - 3);
    let mut unknown_dtype = good_x();
    unknown_dtype.dtype = 42;
    let bad_ids = i64_tensor(&[4], &[1, 2, 1000, 3]);
    let cases = vec![
        Case {
            name: "hidden size mismatch",
            req: req(3, Some(f32_tensor(&[2, h * 2], &[0.5; 256])), Some(i64_tensor(&[2], &[1, 2]))),
            code: Code::InvalidArgument,
            says: &["hidden_states has shape [2, 128]", "expected [T, 64]"],
        },
        Case {
            name: "layer out of range",
            req: req(99, Some(good_x()), Some(good_ids())),
            code: Code::InvalidArgument,
            says: &["layer 99 is out of range", "5 layers (0 to 4)", "MoE layers are"],
        },
        Case {
            name: "missing input_ids on a hash layer",
            req: req(1, Some(good_x()), None),
            code: Code::InvalidArgument,
            says: &["layer 1 is hash-routed", "input_ids"],
        },
        Case {
            name: "token id out of vocabulary",
            req: req(0, Some(good_x()), Some(bad_ids)),
            code: Code::InvalidArgument,
            says: &["input_ids[2] = 1000", "vocabulary"],
        },
        Case {
            name: "truncated tensor bytes",
            req: req(3, Some(truncated), None),
            code: Code::InvalidArgument,
            says: &["hidden_states", "1021 bytes", "needs 1024"],
        },
        Case {
            name: "NaN in activations",
            req: req(3, Some(f32_tensor(&[4, h], &nan_x)), None),
            code: Code::InvalidArgument,
            says: &["non-finite", "token 2"],
        },
        Case {
            name: "Inf in activations",
            req: req(3, Some(f32_tensor(&[4, h], &inf_x)), None),
            code: Code::InvalidArgument,
            says: &["non-finite", "token 3"],
        },
        Case {
            name: "unknown dtype",
            req: req(3, Some(unknown_dtype), None),
            code: Code::InvalidArgument,
            says: &["unknown dtype 42", "DTYPE_F32"],
        },
        Case {
            name: "missing hidden_states",
            req: req(3, None, None),
            code: Code::InvalidArgument,
            says: &["hidden_states is required"],
        },
    ];
    for c in cases {
        let err = client.forward(c.req).await.expect_err(c.name);
        assert_eq!(err.code(), c.code, "{}: {err}", c.name);
        for s in c.says {
            assert!(err.message().contains(s), "{}: message `{}` should mention `{s}`", c.name, err.message());
        }
        println!("{}: {:?}: {}", c.name, err.code(), err.message());
        still_serves(&mut client, dir.path(), &spec).await;
    }

    // Over the message size limit (64 MiB default): refused, and the server still serves.
    let big = Tensor {
        dtype: PDType::DtypeF32 as i32,
        shape: vec![300_000, h as u64],
        data: Bytes::from(vec![0u8; 300_000 * h * 4]),
    };
    let err = client.forward(req(3, Some(big), None)).await.expect_err("oversized");
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{err}");
    assert!(err.message().contains("too large") || err.message().contains("limit"), "{}", err.message());
    println!("oversized message: {:?}: {}", err.code(), err.message());
    still_serves(&mut client, dir.path(), &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_service_names_unheld_experts_and_bad_batches() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 5);
    let cluster = Cluster::start(dir.path(), 2, &[]);
    // Wait for the placement to commit, using a forward through the dispatcher.
    let mut moe = cluster.moe_client(0).await;
    still_serves(&mut moe, dir.path(), &spec).await;
    // The whole block on a dense layer is refused, naming the MoE layers.
    let (x, _) = random_input(&spec, 2, 3);
    let err = moe
        .forward(ForwardRequest {
            layer: 0,
            hidden_states: Some(f32_tensor(&[2, spec.hidden], &x)),
            input_ids: None,
            wire_dtype: 0,
        })
        .await
        .expect_err("dense layer");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("layer 0 is a dense layer") && err.message().contains("1..=3"), "{}", err.message());
    let mut c = ExpertServiceClient::connect(format!("http://{}", cluster.workers[0].addr)).await.unwrap();
    let h = spec.hidden;
    let layer = spec.moe_layers()[0] as u32;
    // Find an expert worker 0 does not hold: ask for each until one is refused.
    let batch = |expert: u32, rows: u32, data: Vec<u8>, dtype: i32, hidden: u32| ExpertBatch {
        request_id: 1,
        epoch: 1,
        layer,
        dtype,
        hidden,
        experts: vec![expert],
        rows: vec![rows],
        data: Bytes::from(data),
        chunk: 0,
    };
    let one_row = vec![0u8; h * 4];
    let mut refused = None;
    for e in 0..spec.n_routed as u32 {
        let s = futures_once(batch(e, 1, one_row.clone(), PDType::DtypeF32 as i32, h as u32));
        let r = c.compute(s).await;
        let r = match r {
            Ok(resp) => resp.into_inner().message().await,
            Err(e) => Err(e),
        };
        if let Err(st) = r {
            refused = Some((e, st));
            break;
        }
    }
    let (e, st) = refused.expect("with 2 workers, worker 0 does not hold every expert");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st}");
    assert!(st.message().contains(&format!("does not hold layer {layer} expert {e}")), "{}", st.message());
    assert!(st.message().contains("placement epoch is"), "{}", st.message());
    assert!(st.metadata().get("x-expertmesh-epoch").is_some(), "typed error carries the worker's epoch");

    let expect_bad = |b: ExpertBatch, says: &'static str| {
        let mut c = c.clone();
        async move {
            let st = match c.compute(futures_once(b)).await {
                Ok(resp) => resp.into_inner().message().await.expect_err(says),
                Err(st) => st,
            };
            assert_eq!(st.code(), Code::InvalidArgument, "{st}");
            assert!(st.message().contains(says), "`{}` should mention `{says}`", st.message());
        }
    };
    expect_bad(batch(0, 2, one_row.clone(), PDType::DtypeF32 as i32, h as u32), "truncated tensor bytes").await;
    expect_bad(batch(0, 1, one_row.clone(), PDType::DtypeF32 as i32, 65), "this model's hidden size is 64").await;
    expect_bad(batch(0, 1, one_row.clone(), 9, h as u32), "unknown dtype 9").await;
    expect_bad(batch(999, 1, one_row.clone(), PDType::DtypeF32 as i32, h as u32), "expert 999 is out of range").await;
    let mut dense = batch(0, 1, one_row.clone(), PDType::DtypeF32 as i32, h as u32);
    dense.layer = 0;
    expect_bad(dense, "layer 0 is a dense layer").await;
    still_serves(&mut moe, dir.path(), &spec).await;
}

fn futures_once(b: ExpertBatch) -> impl tokio_stream::Stream<Item = ExpertBatch> {
    tokio_stream::iter(vec![b])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (dir, _spec) = gen_model("tiny-mixtral", DType::BF16, PresetOverrides::default(), 1);
    let cluster = Cluster::start(dir.path(), 1, &[]);
    for (addr, service) in [
        (&cluster.coordinator.addr, "expertmesh.v1.Coordinator"),
        (&cluster.workers[0].addr, "expertmesh.v1.ExpertService"),
    ] {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut h = HealthClient::new(ch.clone());
        // A worker turns SERVING once the first placement commits (tests/health.rs).
        let t = std::time::Instant::now();
        for name in ["", service] {
            loop {
                let r = h.check(HealthCheckRequest { service: name.into() }).await.unwrap().into_inner();
                if r.status() == ServingStatus::Serving {
                    break;
                }
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(30),
                    "{addr} health of `{name}`: {:?}",
                    r.status()
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        let mut refl = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("no service list") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == service), "{addr} reflection lists {names:?}");
        // The older reflection version too (Python's grpcio-reflection speaks only v1alpha).
        {
            use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as OldClient;
            use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as OldRequest;
            use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as OldResponse;
            use tonic_reflection::pb::v1alpha::ServerReflectionRequest as OldReq;
            let ch =
                tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let req = OldReq { host: String::new(), message_request: Some(OldRequest::ListServices(String::new())) };
            let mut resp =
                OldClient::new(ch).server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
            let msg = resp.message().await.unwrap().unwrap();
            let Some(OldResponse::ListServicesResponse(list)) = msg.message_response else { panic!("no v1alpha list") };
            assert!(list.service.iter().any(|s| s.name == service), "{addr} v1alpha reflection");
        }
    }
}
