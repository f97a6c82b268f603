//! Mutual TLS between a real tonic server and clients on loopback: who gets in, what the
//! refused are told, and rotation of the files without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use expertmesh_trust::certs::Authority;
use expertmesh_trust::client::{connect, endpoint, TlsConnector};
use expertmesh_trust::server::{incoming, RequireAuthLayer};
use expertmesh_trust::{Expect, Identity, IdentityMap, Tls, TlsFiles};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn files(dir: &Path, stem: &str) -> TlsFiles {
    TlsFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}-key.pem")), ca: dir.join("ca.pem") }
}

async fn serve(tls: Tls) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let inc = incoming(tokio_stream::wrappers::TcpListenerStream::new(l), Some(tls));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(RequireAuthLayer)
            .add_service(health)
            .serve_with_incoming(inc)
            .await
            .unwrap();
    });
    addr
}

async fn check(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await.map(|_| ())
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        r.add(c.unwrap()).unwrap();
    }
    r
}

#[tokio::test]
async fn only_certificates_of_the_cluster_ca_get_in_and_the_refused_are_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let written = expertmesh_trust::certs::generate(dir.path(), &["w1".into()], &[]).unwrap();
    assert!(written.iter().any(|p| p.ends_with("worker.w1-key.pem")));
    let server = Tls::load(files(dir.path(), "worker.w1"), IdentityMap::default()).unwrap();
    assert_eq!(server.own_identities(), vec![Identity::Worker("w1".into())]);
    let addr = serve(server).await;
    let ep = || endpoint(&addr.to_string()).unwrap().timeout(Duration::from_secs(5));

    // A client of the cluster that expects worker w1 there.
    let client = Tls::load(files(dir.path(), "client"), IdentityMap::default()).unwrap();
    let w1 = Expect::Identity(Identity::Worker("w1".into()));
    check(connect(ep(), Some(&client), w1.clone()).await.unwrap()).await.unwrap();
    check(connect(ep(), Some(&client), Expect::AnyWorker).await.unwrap()).await.unwrap();

    // Expecting another identity there: the client refuses the server.
    let e = connect(ep(), Some(&client), Expect::Identity(Identity::Coordinator)).await.unwrap_err();
    let msg = expertmesh_trust_test_chain(&e);
    assert!(msg.contains("not `coordinator`"), "{msg}");

    // Plaintext.
    let s = check(ep().connect().await.unwrap()).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("plaintext"), "{}", s.message());

    // TLS without a client certificate.
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anon = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&ca_pem))
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let ch = ep().connect_with_connector(TlsConnector::fixed(anon, name.clone())).await.unwrap();
    let s = check(ch).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(s.message().contains("no client certificate"), "{}", s.message());

    // A certificate of another CA, with the right name.
    let other = Authority::create("someone else").unwrap();
    let forged = other.issue(&["admin".into()], 30).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(forged.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(forged.key_pem.as_bytes()).unwrap();
    let foreign = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&ca_pem))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let ch = ep().connect_with_connector(TlsConnector::fixed(foreign, name)).await.unwrap();
    let s = check(ch).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(s.message().contains("not accepted") && s.message().contains("UnknownIssuer"), "{}", s.message());
    assert!(expertmesh_trust::authz::refusals().0 >= 3);
}

fn expertmesh_trust_test_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[tokio::test]
async fn rotated_files_are_used_for_new_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    expertmesh_trust::certs::generate(dir.path(), &["w1".into()], &[]).unwrap();
    let server = Tls::load(files(dir.path(), "worker.w1"), IdentityMap::default()).unwrap();
    server.watch(Some(Duration::from_millis(50)));
    let addr = serve(server.clone()).await;
    let ep = || endpoint(&addr.to_string()).unwrap().timeout(Duration::from_secs(5));
    let client = Tls::load(files(dir.path(), "client"), IdentityMap::default()).unwrap();

    // The whole cluster moves to a new CA: the server's files first (its CA file trusts both
    // while clients move), then the client's.
    let old_ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let new = Authority::create("rotated CA").unwrap();
    let new_dir = tempfile::tempdir().unwrap();
    new.save(new_dir.path()).unwrap();
    new.write_leaf(new_dir.path(), "client", &["client".into()], 30).unwrap();
    std::fs::write(dir.path().join("ca.pem"), format!("{old_ca}{}", new.cert_pem())).unwrap();
    let new_client = Tls::load(
        TlsFiles { ca: dir.path().join("ca.pem"), ..files(new_dir.path(), "client") },
        IdentityMap::default(),
    )
    .unwrap();
    let mut accepted = false;
    for _ in 0..100 {
        if check(connect(ep(), Some(&new_client), Expect::AnyWorker).await.unwrap()).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "a certificate of the new CA is accepted once the server's CA file trusts it");
    // The old client still works: both CAs are trusted.
    check(connect(ep(), Some(&client), Expect::AnyWorker).await.unwrap()).await.unwrap();

    // The server drops the old CA: old-CA clients are refused on new connections.
    std::fs::write(dir.path().join("ca.pem"), new.cert_pem()).unwrap();
    let mut refused = None;
    for _ in 0..100 {
        match check(connect(ep(), Some(&client), Expect::AnyWorker).await.unwrap()).await {
            Err(s) => {
                refused = Some(s);
                break;
            }
            Ok(()) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let s = refused.expect("old-CA client refused after the rotation");
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("UnknownIssuer"), "{}", s.message());

    // The server's own certificate rotates (here to one naming another identity, so the
    // client can tell which one it was shown).
    new.write_leaf(dir.path(), "worker.w1", &["worker.w2".into()], 30).unwrap();
    let w2 = Expect::Identity(Identity::Worker("w2".into()));
    let mut shown = false;
    for _ in 0..100 {
        if let Ok(ch) = connect(ep(), Some(&new_client), w2.clone()).await {
            check(ch).await.unwrap();
            shown = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(shown, "the server presents its rotated certificate on new connections");
    assert_eq!(server.own_identities(), vec![Identity::Worker("w2".into())]);
}

#[test]
fn missing_or_broken_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = TlsFiles::from_flags(Some("a".into()), None, None).unwrap_err().to_string();
    assert!(e.contains("missing --tls-key, --tls-ca"), "{e}");
    assert!(TlsFiles::from_flags(None, None, None).unwrap().is_none());
    let e = Tls::load(files(dir.path(), "nobody"), IdentityMap::default()).unwrap_err().to_string();
    assert!(e.contains("nobody.pem"), "{e}");
    expertmesh_trust::certs::generate(dir.path(), &[], &[]).unwrap();
    std::fs::write(dir.path().join("client-key.pem"), "not a key").unwrap();
    let e = Tls::load(files(dir.path(), "client"), IdentityMap::default()).unwrap_err().to_string();
    assert!(e.contains("client-key.pem") && e.contains("private key"), "{e}");
}
