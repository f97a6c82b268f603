//! One test suite for both metadata stores: the embedded one and a real etcd started here.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::Etcd;
use expertmesh_cluster::store::{open_store, EmbeddedStore, MetadataStore, StoreEvent};

async fn next(rx: &mut tokio::sync::mpsc::Receiver<StoreEvent>) -> StoreEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("watch event in time").expect("watch open")
}

async fn suite(s: Arc<dyn MetadataStore>) {
    // put / get / revisions
    let r1 = s.put("/t/a", b"1".to_vec(), None).await.unwrap();
    let r2 = s.put("/t/b", b"2".to_vec(), None).await.unwrap();
    s.put("/u/x", b"x".to_vec(), None).await.unwrap();
    assert!(r2 > r1);
    let a = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.mod_revision), (&b"1"[..], r1));
    assert!(s.get("/t/none").await.unwrap().is_none());
    let (kvs, rev) = s.list("/t/").await.unwrap();
    assert_eq!(kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["/t/a", "/t/b"]);
    assert!(rev >= r2);

    // compare-and-put: create only if absent, then only at the revision read
    let c1 = s.put_if("/t/epoch", b"1".to_vec(), 0, None).await.unwrap().expect("created");
    assert!(s.put_if("/t/epoch", b"x".to_vec(), 0, None).await.unwrap().is_none(), "exists: create fails");
    assert!(s.put_if("/t/epoch", b"x".to_vec(), c1 + 100, None).await.unwrap().is_none(), "stale revision fails");
    let c2 = s.put_if("/t/epoch", b"2".to_vec(), c1, None).await.unwrap().expect("current revision wins");
    assert!(c2 > c1);
    assert_eq!(s.get("/t/epoch").await.unwrap().unwrap().value, b"2");

    // watch from a past revision replays what happened after it, then follows live changes
    let mut w = s.watch("/t/", r1).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.key.as_str(), e.revision), ("/t/b", r2));
    assert_eq!(next(&mut w).await.revision, c1);
    assert_eq!(next(&mut w).await.revision, c2);
    s.put("/u/ignored", b"-".to_vec(), None).await.unwrap();
    let d = s.delete("/t/a").await.unwrap();
    let e = next(&mut w).await;
    assert_eq!((e.key.as_str(), e.value.clone(), e.revision), ("/t/a", None, d), "delete seen, other prefix not");

    // leases: kept alive the key stays; revoked it goes; left alone it expires
    let ttl = Duration::from_secs(2);
    // Lease ids are not guessable: no two in a row are neighbours, none is small.
    let ids: Vec<i64> =
        futures::future::join_all((0..6).map(|_| s.grant_lease(ttl))).await.into_iter().map(|r| r.unwrap()).collect();
    for w in ids.windows(2) {
        assert!((w[1] - w[0]).abs() > 1, "sequential lease ids {ids:?}");
    }
    assert!(ids.iter().all(|&i| i > 1 << 32), "small lease ids {ids:?}");
    for i in ids {
        s.revoke(i).await.unwrap();
    }
    let l = s.grant_lease(ttl).await.unwrap();
    s.put("/t/lease/kept", b"k".to_vec(), Some(l)).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(s.keep_alive(l).await.unwrap(), "lease alive while kept");
    }
    assert_eq!(
        s.get("/t/lease/kept").await.unwrap().map(|k| k.lease),
        Some(l),
        "kept past its TTL, bound to its lease"
    );
    s.revoke(l).await.unwrap();
    assert!(s.get("/t/lease/kept").await.unwrap().is_none(), "revoked lease removes its keys");
    // "Gone" is an answer, not a store failure: a worker registers again on it.
    assert!(!s.keep_alive(l).await.unwrap(), "revoked lease cannot be kept alive");
    let e = next(&mut w).await;
    assert_eq!((e.key.as_str(), e.value.clone()), ("/t/lease/kept", Some(b"k".to_vec())));
    let e = next(&mut w).await;
    assert_eq!((e.key.as_str(), e.value.clone()), ("/t/lease/kept", None));

    let l2 = s.grant_lease(ttl).await.unwrap();
    s.put("/t/lease/expiring", b"e".to_vec(), Some(l2)).await.unwrap();
    assert_eq!(next(&mut w).await.value, Some(b"e".to_vec()));
    let e = tokio::time::timeout(Duration::from_secs(15), w.recv()).await.expect("expiry within the TTL").unwrap();
    assert_eq!((e.key.as_str(), e.value), ("/t/lease/expiring", None), "expired lease deletes its key");
    assert!(s.put("/t/x", b"-".to_vec(), Some(l2)).await.is_err(), "writing under an expired lease fails");
    assert!(!s.keep_alive(l2).await.unwrap(), "expired lease cannot be kept alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_suite() {
    suite(Arc::new(EmbeddedStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_suite() {
    let etcd = Etcd::start();
    let store = open_store(&format!("etcd://{}", etcd.endpoint()), None).await.unwrap();
    suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate_passes_the_suite() {
    use expertmesh_trust::{IdentityMap, Tls, TlsFiles};
    let certs = tempfile::tempdir().unwrap();
    expertmesh_trust::certs::generate(certs.path(), &[], &[]).unwrap();
    let etcd = Etcd::start_tls(certs.path());
    let files = |stem: &str| TlsFiles {
        cert: certs.path().join(format!("{stem}.pem")),
        key: certs.path().join(format!("{stem}-key.pem")),
        ca: certs.path().join("ca.pem"),
    };
    let url = format!("etcds://{}", etcd.endpoint());
    // Plaintext to a TLS-only etcd fails.
    let plain = format!("etcd://{}", etcd.endpoint());
    let failed = match open_store(&plain, None).await {
        Err(_) => true,
        Ok(s) => s.get("/x").await.is_err(),
    };
    assert!(failed, "plaintext to a TLS etcd");
    // TLS without a certificate in hand is refused before any connection.
    let e = open_store(&url, None).await.unwrap_err().to_string();
    assert!(e.contains("needs a client certificate"), "{e}");
    // A certificate of another CA: etcd refuses the handshake.
    let other = tempfile::tempdir().unwrap();
    expertmesh_trust::certs::generate(other.path(), &[], &[]).unwrap();
    let foreign = Tls::load(
        TlsFiles {
            ca: certs.path().join("ca.pem"),
            ..TlsFiles {
                cert: other.path().join("coordinator.pem"),
                key: other.path().join("coordinator-key.pem"),
                ca: other.path().join("ca.pem"),
            }
        },
        IdentityMap::default(),
    )
    .unwrap();
    let e = open_store(&url, Some(&foreign)).await.unwrap_err().to_string();
    assert!(e.contains("cannot connect to etcd"), "{e}");
    let tls = Tls::load(files("coordinator"), IdentityMap::default()).unwrap();
    let store = open_store(&url, Some(&tls)).await.unwrap();
    suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_urls_are_checked() {
    let e = open_store("zookeeper://x", None).await.unwrap_err().to_string();
    assert!(e.contains("expected `embedded`, `etcd://"), "{e}");
    let e = open_store("etcd://", None).await.unwrap_err().to_string();
    assert!(e.contains("no etcd endpoint"), "{e}");
}
