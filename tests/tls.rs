//! Mutual TLS and authorisation across real processes: a coordinator keeping its state in etcd
//! over TLS (client-certificate auth) and two workers, all with certificates generated here.
//! The cluster answers correctly (against the float64 reference); every refusal (plaintext, no
//! certificate, another CA, the wrong identity, a guessed lease) is asserted with its code and
//! message; a CA rotated on disk is picked up without a restart.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::{spawn, wait_exit, Proc, BIN};
use common::etcd::Etcd;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::tensor_to_f32;
use expertmesh_proto::v1::coordinator_client::CoordinatorClient;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::moe_layer_client::MoeLayerClient;
use expertmesh_proto::v1::{
    ClusterStatusRequest, CountersRequest, DType as PDType, DeregisterRequest, DrainRequest, HeartbeatRequest,
    RegisterRequest, WorkerInfo,
};
use expertmesh_trust::certs::Authority;
use expertmesh_trust::client::{connect, endpoint};
use expertmesh_trust::{Expect, Identity, IdentityMap, Tls, TlsFiles};
use rustls::pki_types::pem::PemObject;
use tonic::transport::Channel;
use tonic::Code;

fn files(dir: &Path, stem: &str) -> TlsFiles {
    TlsFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}-key.pem")), ca: dir.join("ca.pem") }
}

fn flags(dir: &Path, stem: &str) -> Vec<String> {
    let f = files(dir, stem);
    vec![
        "--tls-cert".into(),
        f.cert.display().to_string(),
        "--tls-key".into(),
        f.key.display().to_string(),
        "--tls-ca".into(),
        f.ca.display().to_string(),
    ]
}

fn tls(dir: &Path, stem: &str) -> Tls {
    Tls::load(files(dir, stem), IdentityMap::default()).unwrap()
}

async fn channel(addr: &str, t: &Tls, expect: Expect) -> Channel {
    let ep = endpoint(addr).unwrap().timeout(Duration::from_secs(10));
    connect(ep, Some(t), expect).await.unwrap_or_else(|e| panic!("connecting to {addr}: {e:?}"))
}

fn coord(ch: Channel) -> CoordinatorClient<Channel> {
    CoordinatorClient::new(ch)
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, says: &[&str]) {
    let s = r.expect_err("the call must be refused");
    assert_eq!(s.code(), code, "{s:?}");
    for w in says {
        assert!(s.message().contains(w), "`{}` does not say `{w}`", s.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_serves_its_identities_and_refuses_everyone_else() {
    // Processes check their certificate files every 200 ms (rotation below).
    std::env::set_var("EXPERTMESH_TLS_RELOAD_MS", "200");
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path();
    // The certificates come from the CLI a user would run.
    let out = std::process::Command::new(BIN)
        .args(["certs", "--out", &c.display().to_string(), "--worker-ids", "w0,w1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in
        ["ca.pem", "coordinator-key.pem", "admin.pem", "client.pem", "etcd.pem", "worker.w0.pem", "worker.w1-key.pem"]
    {
        assert!(c.join(f).is_file(), "expertmesh certs wrote no {f}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(c.join("ca-key.pem")).unwrap().permissions().mode() & 0o077, 0, "keys are private");
    let etcd = Etcd::start_tls(c);
    let store = format!("etcds://{}", etcd.endpoint());
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 71);
    let logs = tempfile::tempdir().unwrap();

    let m = dir.path().display().to_string();
    let mut args: Vec<String> =
        ["coordinator", "--model", &m, "--expect-workers", "2", "--listen", "127.0.0.1:0", "--store", &store]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(flags(c, "coordinator"));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = spawn(&a, "EXPERTMESH_COORDINATOR_READY", &logs.path().join("coordinator.log"));
    let mut workers: Vec<Proc> = Vec::new();
    let w0_http = common::free_port();
    for id in ["w0", "w1"] {
        let mut args: Vec<String> =
            ["worker", "--coordinator", &coordinator.addr, "--listen", "127.0.0.1:0", "--id", id]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(flags(c, &format!("worker.{id}")));
        if id == "w0" {
            args.extend(["--metrics-listen".to_string(), format!("127.0.0.1:{w0_http}")]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        workers.push(spawn(&a, "EXPERTMESH_WORKER_READY", &logs.path().join(format!("{id}.log"))));
    }
    let log_files: Vec<std::path::PathBuf> =
        std::iter::once(&coordinator).chain(&workers).map(|p| p.log.clone()).collect();
    let dump = || {
        let mut s = String::new();
        for p in &log_files {
            s.push_str(&format!("--- {}\n{}\n", p.display(), std::fs::read_to_string(p).unwrap_or_default()));
        }
        s
    };

    let admin = tls(c, "admin");
    let client = tls(c, "client");
    let w1 = tls(c, "worker.w1");
    let coordinator_id = Expect::Identity(Identity::Coordinator);
    let mut as_admin = coord(channel(&coordinator.addr, &admin, coordinator_id.clone()).await);
    let t = Instant::now();
    loop {
        let s = as_admin.cluster_status(ClusterStatusRequest {}).await.unwrap().into_inner();
        assert!(s.mutual_tls, "the coordinator says it requires mutual TLS");
        if s.current_epoch >= 1 && s.workers.len() == 2 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no placement over TLS:\n{}", dump());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A `client` certificate gets correct answers through either worker.
    let layer = spec.moe_layers()[0];
    let (x, ids) = random_input(&spec, 24, 9);
    let want = reference(dir.path(), &spec, layer, &x, 24, Some(&ids));
    for w in &workers {
        let mut moe = MoeLayerClient::new(channel(&w.addr, &client, Expect::AnyWorker).await);
        let r = moe
            .forward(forward_request(&spec, layer, &x, &ids, PDType::DtypeF32))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", dump()));
        let (out, _) = tensor_to_f32(r.get_ref().output.as_ref().unwrap(), "output").unwrap();
        let err = rel_l2_f32(&out, &want.output);
        assert!(err < 1e-5, "rel L2 {err} through {}", w.addr);
    }

    // Plaintext: refused on the coordinator's and the workers' ports.
    let plain = |addr: &str| endpoint(addr).unwrap().timeout(Duration::from_secs(5));
    let ch = plain(&coordinator.addr).connect().await.unwrap();
    refused(
        coord(ch).cluster_status(ClusterStatusRequest {}).await,
        Code::Unauthenticated,
        &["plaintext", "--tls-cert"],
    );
    let ch = plain(&workers[0].addr).connect().await.unwrap();
    refused(
        MoeLayerClient::new(ch).forward(forward_request(&spec, layer, &x, &ids, PDType::DtypeF32)).await,
        Code::Unauthenticated,
        &["plaintext"],
    );
    let ch = plain(&workers[0].addr).connect().await.unwrap();
    refused(
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await,
        Code::Unauthenticated,
        &["plaintext"],
    );
    // ... while kubelet's plaintext probes read the same states over the metrics port's HTTP.
    assert_eq!(common::get(w0_http, "/readyz"), ("HTTP/1.1 200 OK".into(), "SERVING\n".into()));
    assert_eq!(common::get(w0_http, "/livez").0, "HTTP/1.1 200 OK");

    // TLS without a client certificate, and with one of another CA (naming `admin`).
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(c.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let anon = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("coordinator").unwrap();
    let ch = plain(&coordinator.addr)
        .connect_with_connector(expertmesh_trust::client::TlsConnector::fixed(anon, name.clone()))
        .await
        .unwrap();
    refused(coord(ch).cluster_status(ClusterStatusRequest {}).await, Code::Unauthenticated, &["no client certificate"]);
    let other = Authority::create("another CA").unwrap();
    let forged = other.issue(&["admin".into()], 30).unwrap();
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(forged.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(forged.key_pem.as_bytes()).unwrap();
    let foreign = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let ch = plain(&coordinator.addr)
        .connect_with_connector(expertmesh_trust::client::TlsConnector::fixed(foreign, name))
        .await
        .unwrap();
    refused(coord(ch).drain(DrainRequest { worker_id: "w0".into() }).await, Code::Unauthenticated, &["UnknownIssuer"]);

    // `worker.w1` cannot register as w2, drain anyone else, or heartbeat as w0.
    let mut as_w1 = coord(channel(&coordinator.addr, &w1, coordinator_id.clone()).await);
    let fake = WorkerInfo {
        worker_id: "w2".into(),
        address: workers[1].addr.clone(),
        node: "n".into(),
        devices: vec![],
        ..Default::default()
    };
    refused(
        as_w1.register(RegisterRequest { worker: Some(fake.clone()), epoch: 0 }).await,
        Code::PermissionDenied,
        &["Register needs identity `worker.w2`", "`worker.w1`"],
    );
    refused(
        as_w1.drain(DrainRequest { worker_id: "w0".into() }).await,
        Code::PermissionDenied,
        &["Drain needs identity `worker.w0` or `admin`"],
    );
    refused(
        as_w1.heartbeat(HeartbeatRequest { worker_id: "w0".into(), lease_id: 1 }).await,
        Code::PermissionDenied,
        &["Heartbeat needs identity `worker.w0`"],
    );
    // A `client` can read the cluster and Forward, but not drain or register.
    let mut as_client = coord(channel(&coordinator.addr, &client, coordinator_id.clone()).await);
    let s = as_client.cluster_status(ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.workers.len(), 2);
    refused(
        as_client.drain(DrainRequest { worker_id: "w0".into() }).await,
        Code::PermissionDenied,
        &["Drain needs", "`client`"],
    );
    refused(
        as_client
            .register(RegisterRequest { worker: Some(WorkerInfo { worker_id: "c".into(), ..fake }), epoch: 0 })
            .await,
        Code::PermissionDenied,
        &["Register needs identity `worker.c`"],
    );
    // An admin may remove a worker, but only with the worker's own lease: a guessed one is
    // refused, and the leader's lease is out of reach.
    for guess in [1u64, 2, 3, u64::MAX / 2] {
        refused(
            as_admin.deregister(DeregisterRequest { worker_id: "w0".into(), lease_id: guess }).await,
            Code::PermissionDenied,
            &["is not the lease of worker `w0`"],
        );
    }
    // Still serving everyone with the right certificate, and the refusals are counted.
    let s = as_admin.cluster_status(ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.workers.len(), 2, "nobody was removed:\n{}", dump());
    assert!(s.refused_calls >= 8, "refused calls counted: {}", s.refused_calls);
    let mut ec = ExpertServiceClient::new(channel(&workers[0].addr, &client, Expect::AnyWorker).await);
    let counters = ec.counters(CountersRequest {}).await.unwrap().into_inner();
    assert!(counters.mutual_tls && counters.refused_calls >= 2, "{counters:?}");
    // A client expecting w1 at w0's address refuses the server.
    let e =
        connect(endpoint(&workers[0].addr).unwrap(), Some(&client), Expect::Identity(Identity::Worker("w1".into())))
            .await
            .unwrap_err();
    assert!(format!("{e:?}").contains("not `worker.w1`"), "{e:?}");

    // The CLI: `status` with the admin certificate works; without one it says why not.
    let cli = |extra: &[String]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["status", "--coordinator", &coordinator.addr]).args(extra);
        cmd.output().unwrap()
    };
    let ok = cli(&flags(c, "admin"));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let no = cli(&[]);
    assert!(!no.status.success());
    let err = String::from_utf8_lossy(&no.stderr);
    assert!(err.contains("plaintext") || err.contains("TLS"), "{err}");

    // Rotation: the cluster's CA file gains a new CA; a client holding only a certificate of
    // the new CA is accepted by the running coordinator, no restart.
    let rotated = Authority::create("rotated CA").unwrap();
    let old_ca = std::fs::read_to_string(c.join("ca.pem")).unwrap();
    let newdir = tempfile::tempdir().unwrap();
    rotated.write_leaf(newdir.path(), "admin", &["admin".into()], 30).unwrap();
    std::fs::write(newdir.path().join("ca.pem"), &old_ca).unwrap(); // it still checks servers by the old CA
    let new_admin = tls(newdir.path(), "admin");
    let status_as_new_admin = || async {
        coord(channel(&coordinator.addr, &new_admin, coordinator_id.clone()).await)
            .cluster_status(ClusterStatusRequest {})
            .await
    };
    refused(status_as_new_admin().await, Code::Unauthenticated, &["UnknownIssuer"]);
    std::fs::write(c.join("ca.pem"), format!("{old_ca}{}", rotated.cert_pem())).unwrap();
    let t = Instant::now();
    while let Err(s) = status_as_new_admin().await {
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        assert!(t.elapsed() < Duration::from_secs(30), "the rotated CA was not picked up:\n{}", dump());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An operator drains w1 with the admin certificate: w1 moves its experts, revokes its own
    // lease and leaves; w0 serves the whole layer, still correct.
    let mut drain = std::process::Command::new(BIN);
    drain.args(["drain", "w1", "--coordinator", &coordinator.addr, "--wait-s", "60"]).args(flags(c, "admin"));
    let out = drain.output().unwrap();
    assert!(out.status.success(), "drain: {}\n{}", String::from_utf8_lossy(&out.stderr), dump());
    assert!(
        wait_exit(&mut workers[1], Duration::from_secs(30)).is_some_and(|s| s.success()),
        "w1 exits 0:\n{}",
        dump()
    );
    let mut moe = MoeLayerClient::new(channel(&workers[0].addr, &client, Expect::AnyWorker).await);
    let r = moe
        .forward(forward_request(&spec, layer, &x, &ids, PDType::DtypeF32))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", dump()));
    let (out, _) = tensor_to_f32(r.get_ref().output.as_ref().unwrap(), "output").unwrap();
    assert!(rel_l2_f32(&out, &want.output) < 1e-5);
    let s = as_admin.cluster_status(ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.workers.len(), 1, "{s:?}");
    drop(etcd);
}

#[test]
fn a_cluster_without_tls_says_it_is_unauthenticated() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 72);
    let logs = tempfile::tempdir().unwrap();
    let m = dir.path().display().to_string();
    let log = logs.path().join("coordinator.log");
    let p = spawn(&["coordinator", "--model", &m, "--listen", "0.0.0.0:0"], "EXPERTMESH_COORDINATOR_READY", &log);
    let port = p.addr.rsplit_once(':').unwrap().1.to_string();
    let addr = format!("127.0.0.1:{port}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("WITHOUT TLS on a non-loopback address"), "{text}");
    let out = std::process::Command::new(BIN).args(["status", "--coordinator", &addr]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("UNAUTHENTICATED"));
    let out = std::process::Command::new(BIN).args(["status", "--json", "--coordinator", &addr]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mutual_tls"], false);
    // Half a TLS configuration is refused at start, naming what is missing.
    let out = std::process::Command::new(BIN)
        .args(["coordinator", "--model", &m, "--listen", "127.0.0.1:0", "--tls-cert", "/nonexistent.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing --tls-key, --tls-ca"), "{err}");
}
