//! The etcd v3 store (`etcd-client`): leases for membership, revisions and watches for
//! placement, transactions for compare-and-put.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::mpsc;

use super::{KeyValue, LeaseId, MetadataStore, StoreEvent};
use crate::error::{ClusterError, Result};

/// A store in an etcd v3 cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).finish()
    }
}

fn err(what: &str, e: etcd_client::Error) -> ClusterError {
    ClusterError::Store(format!("etcd {what}: {e}"))
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision() as u64,
        lease: k.lease(),
    }
}

impl EtcdStore {
    /// Connect to `endpoints` (`host:port`), over TLS with `tls`'s certificate when given.
    pub async fn connect(endpoints: &[String], tls: Option<expertmesh_trust::Tls>) -> Result<Self> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let fail = |e: etcd_client::Error| {
            ClusterError::Store(format!("cannot connect to etcd at {}: {e}", endpoints.join(",")))
        };
        let client = match tls {
            None => Client::connect(endpoints, Some(opts)).await.map_err(fail)?,
            Some(tls) => {
                for e in endpoints {
                    expertmesh_core::limits::check_address("etcd endpoint", e).map_err(ClusterError::InvalidInput)?;
                }
                // One channel that dials the endpoints in turn (the first that completes TCP and
                // TLS wins), each checked against its own host name.
                let connector =
                    Failover { tls, endpoints: Arc::new(endpoints.to_vec()), next: Arc::new(AtomicUsize::new(0)) };
                let channel = tonic::transport::Endpoint::from_static("http://etcd")
                    .connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(2))
                    .keep_alive_while_idle(true)
                    .connect_with_connector_lazy(connector);
                let c = Client::from_channel(etcd_client::Channel::Tonic(channel), Some(opts)).await.map_err(fail)?;
                // Fail now, with the reason, rather than at the first call.
                c.clone().status().await.map_err(fail)?;
                c
            }
        };
        Ok(Self { client, endpoints: endpoints.to_vec() })
    }
}

/// Dials etcd endpoints in turn over TLS (see [`EtcdStore::connect`]).
#[derive(Debug, Clone)]
struct Failover {
    tls: expertmesh_trust::Tls,
    endpoints: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
}

impl tower_service::Service<tonic::transport::Uri> for Failover {
    type Response = <expertmesh_trust::client::TlsConnector as tower_service::Service<tonic::transport::Uri>>::Response;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let n = me.endpoints.len();
            let start = me.next.fetch_add(1, Ordering::Relaxed);
            let mut last = std::io::Error::other("no etcd endpoint");
            for i in 0..n {
                let ep = &me.endpoints[(start + i) % n];
                let uri: tonic::transport::Uri = format!("http://{ep}")
                    .parse()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{ep}: {e}")))?;
                let mut c = expertmesh_trust::client::TlsConnector::new(me.tls.clone(), expertmesh_trust::Expect::Host);
                match tower_service::Service::call(&mut c, uri).await {
                    Ok(io) => return Ok(io),
                    Err(e) => last = std::io::Error::new(e.kind(), format!("{ep}: {e}")),
                }
            }
            Err(last)
        })
    }
}

#[async_trait]
impl MetadataStore for EtcdStore {
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let r = self.client.clone().put(key, value, opts).await.map_err(|e| err("put", e))?;
        Ok(r.header().map(|h| h.revision() as u64).unwrap_or(0))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let r = self.client.clone().get(key, None).await.map_err(|e| err("get", e))?;
        Ok(r.kvs().first().map(kv))
    }

    async fn delete(&self, key: &str) -> Result<u64> {
        let r = self.client.clone().delete(key, None).await.map_err(|e| err("delete", e))?;
        Ok(r.header().map(|h| h.revision() as u64).unwrap_or(0))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64)> {
        let r =
            self.client.clone().get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(|e| err("list", e))?;
        let rev = r.header().map(|h| h.revision() as u64).unwrap_or(0);
        let mut kvs: Vec<KeyValue> = r.kvs().iter().map(kv).collect();
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((kvs, rev))
    }

    async fn put_if(&self, key: &str, value: Vec<u8>, expected: u64, lease: Option<LeaseId>) -> Result<Option<u64>> {
        let cmp = Compare::mod_revision(key, CompareOp::Equal, expected as i64);
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(key, value, opts)]);
        let r = self.client.clone().txn(txn).await.map_err(|e| err("txn", e))?;
        Ok(r.succeeded().then(|| r.header().map(|h| h.revision() as u64).unwrap_or(0)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        // Our own random id: etcd's are sequential per member, so guessable.
        let opts = etcd_client::LeaseGrantOptions::new().with_id(super::random_lease_id());
        let r = self.client.clone().lease_grant(secs, Some(opts)).await.map_err(|e| err("lease grant", e))?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        // etcd answers a keep-alive of an expired or revoked lease with "lease not found" (some
        // versions with TTL 0): either way the lease is gone, which is not a store failure.
        let gone = |e: &etcd_client::Error| e.to_string().contains("lease not found");
        let (mut keeper, mut stream) = match self.client.clone().lease_keep_alive(lease).await {
            Ok(ks) => ks,
            Err(e) if gone(&e) => return Ok(false),
            Err(e) => return Err(err("lease keep-alive", e)),
        };
        keeper.keep_alive().await.map_err(|e| err("lease keep-alive", e))?;
        match stream.message().await {
            Ok(Some(r)) => Ok(r.ttl() > 0),
            Ok(None) => Err(ClusterError::Store("etcd lease keep-alive: stream closed".into())),
            Err(e) if gone(&e) => Ok(false),
            Err(e) => Err(err("lease keep-alive", e)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self.client.clone().lease_revoke(lease).await {
            Ok(_) => Ok(()),
            // Already gone is what the caller wanted.
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(err("lease revoke", e)),
        }
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<mpsc::Receiver<StoreEvent>> {
        let mut opts = WatchOptions::new().with_prefix();
        if after > 0 {
            opts = opts.with_start_revision(after as i64 + 1);
        }
        let mut stream = self.client.clone().watch(prefix, Some(opts)).await.map_err(|e| err("watch", e))?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    _ => return,
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    return;
                }
                for ev in resp.events() {
                    let Some(k) = ev.kv() else { continue };
                    let deleted = matches!(ev.event_type(), etcd_client::EventType::Delete);
                    let e = StoreEvent {
                        key: String::from_utf8_lossy(k.key()).into_owned(),
                        value: (!deleted).then(|| k.value().to_vec()),
                        revision: k.mod_revision() as u64,
                    };
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}
