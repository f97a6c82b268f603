//! Members the coordinator must not trust: a registration with an address that is not
//! `HOST:PORT` (refused, or never placed when written to etcd directly), a member whose health
//! service does not answer (never placed), and a member that passes its health check but never
//! becomes ready (planned around after --ready-timeout-ms; and a lost worker is replaced at once
//! without waiting for it). The cluster keeps answering correctly throughout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::etcd::Etcd;
use common::fake::{coordinator, healthy_looking_server, register_and_heartbeat};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_proto::v1::coordinator_client::CoordinatorClient;
use expertmesh_proto::v1::{DeviceInfo, GetPlacementRequest, LoadReport, RegisterRequest, WorkerInfo};
use tonic::transport::Channel;

fn info(id: &str, address: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.into(),
        address: address.into(),
        node: "fake-node".into(),
        devices: vec![DeviceInfo {
            kind: "cpu".into(),
            index: 0,
            memory_bytes: 64 << 30,
            tflops: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn worker_status<'a>(s: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    s["workers"].as_array().unwrap().iter().find(|w| w["worker_id"] == id)
}

async fn placed(c: &mut CoordinatorClient<Channel>) -> (u64, Vec<String>) {
    let p = c.get_placement(GetPlacementRequest {}).await.unwrap().into_inner();
    (p.epoch, p.workers.into_iter().map(|w| w.worker_id).collect())
}

fn start_clients(
    cluster: &Cluster,
    entries: &[usize],
    dir: &std::path::Path,
    spec: &expertmesh_core::ModelSpec,
    n: usize,
) -> Streams {
    let cases = Arc::new(traffic_cases(dir, spec, 24, 6));
    Streams::start(
        cluster.moe_failover(entries, Duration::from_secs(20)),
        cases,
        n,
        spec.hidden,
        Duration::from_secs(20),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_are_refused_and_silent_members_never_placed() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 91);
    let cluster = Cluster::start(dir.path(), 2, &[]);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let clients = start_clients(&cluster, &[0, 1], dir.path(), &spec, 2);
    let mut c = coordinator(&cluster.coordinator.addr).await;
    for (what, w, says) in [
        ("address that is not HOST:PORT", info("fake1", "not a host port"), "HOST:PORT"),
        ("port 0", info("fake1", "127.0.0.1:0"), "HOST:PORT"),
        ("1 MB worker id", info(&"x".repeat(1 << 20), "127.0.0.1:9"), "limit is 128"),
        ("id with a slash", info("a/b", "127.0.0.1:9"), "'/'"),
        (
            "NaN throughput",
            {
                let mut i = info("fake1", "127.0.0.1:9");
                i.devices[0].tflops = f64::NAN;
                i
            },
            "tflops",
        ),
    ] {
        let e = c.register(RegisterRequest { worker: Some(w), epoch: 0 }).await.expect_err(what);
        println!("register with {what}: {:?}: {}", e.code(), &e.message()[..e.message().len().min(200)]);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
        assert!(e.message().contains(says), "{what}: `{}` should say `{says}`", e.message());
    }
    // A load report with counts that would wrap the cluster's sums, for a real member.
    let l = spec.moe_layers()[0] as u32;
    let huge = |e| expertmesh_proto::v1::ExpertLoad { layer: l, expert: e, tokens: u64::MAX - 1 };
    // A member whose address is well formed but whose health service never answers: a listener
    // that accepts connections and says nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let hb = register_and_heartbeat(&mut c, info("silent", &silent_addr)).await;
    c.report_load(LoadReport {
        worker_id: "silent".into(),
        epoch: 0,
        experts: vec![huge(0), huge(1)],
        ..Default::default()
    })
    .await
    .unwrap();
    let bad_report =
        LoadReport { worker_id: "silent".into(), epoch: 0, experts: vec![huge(9_999)], ..Default::default() };
    let e = c.report_load(bad_report).await.expect_err("expert out of range");
    assert!(e.message().contains("expert 9999"), "{e}");
    let s = wait_status(&cluster.coordinator.addr, Duration::from_secs(15), "silent member checked", |s| {
        worker_status(s, "silent").is_some_and(|w| w["left_out"].as_str().unwrap_or("").contains("health check failed"))
    });
    let w = worker_status(&s, "silent").unwrap();
    println!("silent member: verified {}, left out: {}", w["verified"], w["left_out"]);
    assert_eq!(w["verified"], false);
    assert_eq!(w["tokens_total"].as_u64(), Some(u64::MAX), "sums saturate instead of wrapping: {w}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (epoch, workers) = placed(&mut c).await;
    assert!(!workers.contains(&"silent".to_string()), "epoch {epoch} places an unchecked member: {workers:?}");
    hb.abort();
    drop(silent);
    let rep = clients.finish().await;
    println!("traffic meanwhile: {}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
    assert!(rep.correct > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_becomes_ready_is_left_out_after_the_ready_timeout() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 92);
    let cluster = Cluster::start(dir.path(), 2, &["--ready-timeout-ms", "3000"]);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let clients = start_clients(&cluster, &[0, 1], dir.path(), &spec, 2);
    let mut c = coordinator(&cluster.coordinator.addr).await;
    let (addr, server) = healthy_looking_server().await;
    let hb = register_and_heartbeat(&mut c, info("lazy", &addr)).await;
    let t = Instant::now();
    // It passes its health check, is proposed, never reports ready...
    wait_status(&cluster.coordinator.addr, Duration::from_secs(15), "a plan waiting on lazy", |s| {
        s["pending_epoch"].as_u64() > s["current_epoch"].as_u64()
            && worker_status(s, "lazy").is_some_and(|w| w["verified"] == true)
    });
    // ...and is left out after the ready timeout; a plan without it commits.
    let s = wait_status(&cluster.coordinator.addr, Duration::from_secs(20), "lazy left out", |s| {
        s["current_epoch"].as_u64() >= Some(2)
            && worker_status(s, "lazy")
                .is_some_and(|w| w["left_out"].as_str().unwrap_or("").contains("did not report ready"))
    });
    println!(
        "never-ready member left out {:.1} s after joining (ready timeout 3 s): {}; epoch {} committed",
        t.elapsed().as_secs_f64(),
        worker_status(&s, "lazy").unwrap()["left_out"],
        s["current_epoch"]
    );
    let (_, workers) = placed(&mut c).await;
    assert!(!workers.contains(&"lazy".to_string()), "{workers:?}");
    hb.abort();
    server.abort();
    let rep = clients.finish().await;
    println!("traffic meanwhile: {}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_is_replaced_without_waiting_for_a_never_ready_member() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 93);
    // A ready timeout far beyond the test: only the repair rule can explain a quick recovery.
    let mut cluster = Cluster::start(dir.path(), 3, &["--ready-timeout-ms", "120000", "--lease-ttl-ms", "2000"]);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let clients = start_clients(&cluster, &[0, 1], dir.path(), &spec, 3);
    let mut c = coordinator(&cluster.coordinator.addr).await;
    let (addr, server) = healthy_looking_server().await;
    let hb = register_and_heartbeat(&mut c, info("lazy", &addr)).await;
    wait_status(&cluster.coordinator.addr, Duration::from_secs(15), "a plan waiting on lazy", |s| {
        s["pending_epoch"].as_u64() > s["current_epoch"].as_u64()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t_kill = Instant::now();
    let _ = cluster.workers[2].child.kill();
    let s = wait_status(&cluster.coordinator.addr, Duration::from_secs(20), "a plan without w2 committed", |s| {
        s["current_epoch"].as_u64() >= Some(3) && worker_status(s, "w2").is_none()
    });
    let recovered = t_kill.elapsed();
    let (epoch, workers) = placed(&mut c).await;
    println!(
        "w2 killed while a plan waited on a never-ready member: epoch {epoch} on {workers:?} committed {:.2} s later (status epoch {})",
        recovered.as_secs_f64(),
        s["current_epoch"]
    );
    assert!(workers.iter().all(|w| w == "w0" || w == "w1"), "the repair uses proven workers only: {workers:?}");
    assert!(recovered < Duration::from_secs(10), "recovery took {recovered:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    hb.abort();
    server.abort();
    let rep = clients.finish().await;
    println!("traffic meanwhile: {}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_written_to_etcd_directly_are_checked_too() {
    use expertmesh_cluster::keys::ClusterKeys;
    use prost::Message;
    let etcd = Etcd::start();
    let store_url = format!("etcd://{}", etcd.endpoint());
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 94);
    let mut cluster = Cluster::coordinator_only(dir.path(), 1, &["--store", &store_url]);
    cluster.add_store_worker("w0", &store_url, &[]);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let clients = start_clients(&cluster, &[0], dir.path(), &spec, 2);
    let store = expertmesh_cluster::store::open_store(&store_url, None).await.unwrap();
    let keys = ClusterKeys::new("default");
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    for w in [info("badaddr", "not a host port"), info("nobody", "127.0.0.1:1")] {
        store.put(&keys.worker(&w.worker_id), w.encode_to_vec(), Some(lease)).await.unwrap();
    }
    // A record stored under another id than it names.
    store.put(&keys.worker("liar"), info("w0", "127.0.0.1:2").encode_to_vec(), Some(lease)).await.unwrap();
    // Load reports written straight into the store are checked as the gRPC path checks them:
    // counts that would wrap the sums saturate; an expert the model does not have is refused.
    let l = spec.moe_layers()[0] as u32;
    let load = |id: &str, entries: Vec<(u32, u64)>| LoadReport {
        worker_id: id.into(),
        epoch: 0,
        experts: entries
            .into_iter()
            .map(|(expert, tokens)| expertmesh_proto::v1::ExpertLoad { layer: l, expert, tokens })
            .collect(),
        ..Default::default()
    };
    store
        .put(
            &keys.load("nobody"),
            load("nobody", vec![(0, u64::MAX - 1), (1, u64::MAX - 1)]).encode_to_vec(),
            Some(lease),
        )
        .await
        .unwrap();
    store.put(&keys.load("badaddr"), load("badaddr", vec![(9_999, 5)]).encode_to_vec(), Some(lease)).await.unwrap();
    let s = wait_status(&cluster.coordinator.addr, Duration::from_secs(15), "bad members explained", |s| {
        ["badaddr", "nobody", "liar"]
            .iter()
            .all(|id| worker_status(s, id).is_some_and(|w| !w["left_out"].as_str().unwrap_or("").is_empty()))
            && worker_status(s, "nobody")
                .is_some_and(|w| w["left_out"].as_str().unwrap_or("").contains("health check failed"))
    });
    for id in ["badaddr", "nobody", "liar"] {
        println!("{id}: left out: {}", worker_status(&s, id).unwrap()["left_out"]);
    }
    assert!(worker_status(&s, "badaddr").unwrap()["left_out"].as_str().unwrap().contains("invalid registration"));
    let s = wait_status(&cluster.coordinator.addr, Duration::from_secs(10), "store load reports applied", |s| {
        worker_status(s, "nobody").is_some_and(|w| w["tokens_total"].as_u64() == Some(u64::MAX))
    });
    assert_eq!(worker_status(&s, "badaddr").unwrap()["tokens_total"], 0, "an invalid load report is ignored");
    assert!(worker_status(&s, "liar").unwrap()["left_out"].as_str().unwrap().contains("names itself"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = coordinator(&cluster.coordinator.addr).await;
    let (epoch, workers) = placed(&mut c).await;
    assert_eq!(workers, vec!["w0".to_string()], "epoch {epoch}");
    store.revoke(lease).await.unwrap();
    let rep = clients.finish().await;
    println!("traffic meanwhile: {}", rep.summary());
    rep.assert_all_correct(|| cluster.dump_logs());
}
