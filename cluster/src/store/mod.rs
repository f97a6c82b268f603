//! The metadata store: one trait, two implementations. [`EmbeddedStore`] runs in the process (the
//! default on one machine); [`EtcdStore`] keeps the state in a real etcd v3 cluster. Both pass the
//! same test suite (`tests/store_suite.rs`). Keys follow `/expertmesh/{cluster}/...`
//! (docs/architecture.md).

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::{ClusterError, Result};

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A lease id. Keys written under a lease vanish when it expires or is revoked.
pub type LeaseId = i64;

/// A key, its value, and the store revision that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: u64,
    /// The lease the key is bound to (0: none).
    pub lease: LeaseId,
}

/// A change to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEvent {
    pub key: String,
    /// None: deleted (or expired with its lease).
    pub value: Option<Vec<u8>>,
    pub revision: u64,
}

/// Cluster state storage with revisions, leases, compare-and-put and watches.
#[async_trait]
pub trait MetadataStore: Send + Sync + std::fmt::Debug {
    /// Write `key` (bound to `lease` if given); returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64>;
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Delete `key`; returns the store revision after the delete.
    async fn delete(&self, key: &str) -> Result<u64>;
    /// Every key under `prefix` in key order, and the revision they were read at (watch from it
    /// to miss nothing).
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64)>;
    /// Write `key` only if its mod revision is `expected` (0: only if absent), atomically.
    /// Returns the new revision, or None when the comparison failed.
    async fn put_if(&self, key: &str, value: Vec<u8>, expected: u64, lease: Option<LeaseId>) -> Result<Option<u64>>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Renew `lease`; false when it no longer exists (expired or revoked).
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool>;
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
    /// Changes under `prefix` with revision > `after`, in order (`after` = 0: from now). The
    /// channel closes when the watch cannot continue (connection lost, history compacted): the
    /// caller lists again and watches from the listed revision, so no change is missed.
    async fn watch(&self, prefix: &str, after: u64) -> Result<mpsc::Receiver<StoreEvent>>;
}

/// A random lease id in 1..2^63: unique in practice and not guessable, so no peer can name
/// another's lease (etcd takes the id we choose).
pub(crate) fn random_lease_id() -> LeaseId {
    let mut b = [0u8; 8];
    // The OS generator does not fail on Linux once booted; a time-based fallback keeps the id
    // unique if it ever did.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64).to_le_bytes();
    }
    ((u64::from_le_bytes(b) >> 1) as LeaseId).max(1)
}

/// Open a store from a URL: `embedded`, `etcd://HOST:PORT[,HOST:PORT...]` (plaintext) or
/// `etcds://HOST:PORT[,...]` (TLS with `tls`'s certificate, the etcd server's host name checked
/// against its certificate).
pub async fn open_store(url: &str, tls: Option<&expertmesh_trust::Tls>) -> Result<std::sync::Arc<dyn MetadataStore>> {
    if url == "embedded" || url.is_empty() {
        return Ok(std::sync::Arc::new(EmbeddedStore::new()));
    }
    let (rest, secure) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
        (Some(r), _) => (r, false),
        (_, Some(r)) => (r, true),
        _ => {
            return Err(ClusterError::InvalidInput(format!(
                "unknown store `{url}`; expected `embedded`, `etcd://HOST:PORT[,HOST:PORT...]` or `etcds://HOST:PORT[,...]` (TLS)"
            )))
        }
    };
    let endpoints: Vec<String> = rest.split(',').filter(|s| !s.is_empty()).map(String::from).collect();
    if endpoints.is_empty() {
        return Err(ClusterError::InvalidInput(format!("store `{url}` names no etcd endpoint")));
    }
    let tls = match (secure, tls) {
        (false, _) => None,
        (true, Some(t)) => Some(t.clone()),
        (true, None) => {
            return Err(ClusterError::InvalidInput(format!(
                "store `{url}` is reached over TLS and needs a client certificate: give --etcd-tls-cert, --etcd-tls-key and --etcd-tls-ca (or --tls-*)"
            )))
        }
    };
    Ok(std::sync::Arc::new(EtcdStore::connect(&endpoints, tls).await?))
}
