//! The metadata store: one trait, an embedded in-process implementation (the default on one
//! machine). Keys follow `/expertmesh/{cluster}/...` (docs/architecture.md).

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::{CoordinatorError, Result};

/// A change to a key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreEvent {
    pub key: String,
    /// None: deleted.
    pub value: Option<Vec<u8>>,
    pub revision: u64,
}

/// Cluster state storage. Implementations: [`EmbeddedStore`]; etcd v3 is the next one.
#[async_trait]
pub trait MetadataStore: Send + Sync + std::fmt::Debug {
    /// Write `key`; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64>;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    async fn delete(&self, key: &str) -> Result<u64>;
    /// Every key under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// Changes under `prefix` from now on.
    async fn watch(&self, prefix: &str) -> Result<broadcast::Receiver<StoreEvent>>;
}

#[derive(Debug, Default)]
struct Inner {
    revision: u64,
    kv: BTreeMap<String, Vec<u8>>,
}

/// In-process store with revisions and watches.
#[derive(Debug)]
pub struct EmbeddedStore {
    inner: Mutex<Inner>,
    events: broadcast::Sender<StoreEvent>,
}

impl Default for EmbeddedStore {
    fn default() -> Self {
        Self { inner: Mutex::new(Inner::default()), events: broadcast::channel(1024).0 }
    }
}

impl EmbeddedStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| CoordinatorError::Store("embedded store lock poisoned".into()))
    }
}

#[async_trait]
impl MetadataStore for EmbeddedStore {
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        let rev = {
            let mut g = self.lock()?;
            g.revision += 1;
            g.kv.insert(key.to_string(), value.clone());
            g.revision
        };
        let _ = self.events.send(StoreEvent { key: key.to_string(), value: Some(value), revision: rev });
        Ok(rev)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.kv.get(key).cloned())
    }

    async fn delete(&self, key: &str) -> Result<u64> {
        let rev = {
            let mut g = self.lock()?;
            g.revision += 1;
            g.kv.remove(key);
            g.revision
        };
        let _ = self.events.send(StoreEvent { key: key.to_string(), value: None, revision: rev });
        Ok(rev)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .lock()?
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn watch(&self, prefix: &str) -> Result<broadcast::Receiver<StoreEvent>> {
        let _ = prefix; // filtered by the receiver; one channel serves every prefix
        Ok(self.events.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete_watch() {
        let s = EmbeddedStore::default();
        let mut w = s.watch("/a/").await.unwrap();
        let r1 = s.put("/a/1", b"x".to_vec()).await.unwrap();
        let r2 = s.put("/a/2", b"y".to_vec()).await.unwrap();
        s.put("/b/1", b"z".to_vec()).await.unwrap();
        assert!(r2 > r1);
        assert_eq!(s.get("/a/1").await.unwrap(), Some(b"x".to_vec()));
        assert_eq!(s.list("/a/").await.unwrap().len(), 2);
        s.delete("/a/1").await.unwrap();
        assert_eq!(s.get("/a/1").await.unwrap(), None);
        let e = w.recv().await.unwrap();
        assert_eq!((e.key.as_str(), e.revision), ("/a/1", r1));
    }
}
