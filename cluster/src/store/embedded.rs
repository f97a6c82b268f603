//! The embedded store: in-process, with revisions, leases (expired by a sweeper task), compare-
//! and-put and watches that replay recent history.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use super::{KeyValue, LeaseId, MetadataStore, StoreEvent};
use crate::error::{ClusterError, Result};

/// Events kept for watches that start from a past revision.
const HISTORY: usize = 4096;

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

#[derive(Debug, Default)]
struct Inner {
    revision: u64,
    kv: BTreeMap<String, (Vec<u8>, u64, Option<LeaseId>)>,
    leases: HashMap<LeaseId, Lease>,
    history: VecDeque<StoreEvent>,
}

/// In-process store.
#[derive(Debug)]
pub struct EmbeddedStore {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<StoreEvent>,
}

impl Default for EmbeddedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn record(&mut self, ev: StoreEvent, tx: &broadcast::Sender<StoreEvent>) {
        self.history.push_back(ev.clone());
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let _ = tx.send(ev);
    }

    fn remove_key(&mut self, key: &str, tx: &broadcast::Sender<StoreEvent>) -> bool {
        match self.kv.remove(key) {
            Some((_, _, lease)) => {
                if let Some(l) = lease.and_then(|l| self.leases.get_mut(&l)) {
                    l.keys.remove(key);
                }
                self.revision += 1;
                let ev = StoreEvent { key: key.to_string(), value: None, revision: self.revision };
                self.record(ev, tx);
                true
            }
            None => false,
        }
    }

    fn drop_lease(&mut self, id: LeaseId, tx: &broadcast::Sender<StoreEvent>) {
        if let Some(l) = self.leases.remove(&id) {
            let mut keys: Vec<String> = l.keys.into_iter().collect();
            keys.sort();
            for k in keys {
                self.remove_key(&k, tx);
            }
        }
    }

    fn write(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        tx: &broadcast::Sender<StoreEvent>,
    ) -> Result<u64> {
        if let Some(l) = lease {
            if !self.leases.contains_key(&l) {
                return Err(ClusterError::Store(format!("lease {l} not found (expired or revoked)")));
            }
        }
        if let Some((_, _, Some(old))) = self.kv.get(key) {
            let old = *old;
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.remove(key);
            }
        }
        self.revision += 1;
        let rev = self.revision;
        self.kv.insert(key.to_string(), (value.clone(), rev, lease));
        if let Some(l) = lease.and_then(|l| self.leases.get_mut(&l)) {
            l.keys.insert(key.to_string());
        }
        self.record(StoreEvent { key: key.to_string(), value: Some(value), revision: rev }, tx);
        Ok(rev)
    }
}

impl EmbeddedStore {
    /// A new store; when a tokio runtime is running, a sweeper task expires leases.
    pub fn new() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let events = broadcast::channel(HISTORY).0;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Mutex<Inner>> = Arc::downgrade(&inner);
            let tx = events.clone();
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let Ok(mut g) = inner.lock() else { return };
                    let now = Instant::now();
                    let expired: Vec<LeaseId> =
                        g.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
                    for id in expired {
                        g.drop_lease(id, &tx);
                    }
                }
            });
        }
        Self { inner, events }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| ClusterError::Store("embedded store lock poisoned".into()))
    }
}

#[async_trait]
impl MetadataStore for EmbeddedStore {
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<u64> {
        let mut g = self.lock()?;
        g.write(key, value, lease, &self.events)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.lock()?.kv.get(key).map(|(v, rev, l)| KeyValue {
            key: key.to_string(),
            value: v.clone(),
            mod_revision: *rev,
            lease: l.unwrap_or(0),
        }))
    }

    async fn delete(&self, key: &str) -> Result<u64> {
        let mut g = self.lock()?;
        g.remove_key(key, &self.events);
        Ok(g.revision)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64)> {
        let g = self.lock()?;
        let kvs =
            g.kv.range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, (v, rev, l))| KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                    mod_revision: *rev,
                    lease: l.unwrap_or(0),
                })
                .collect();
        Ok((kvs, g.revision))
    }

    async fn put_if(&self, key: &str, value: Vec<u8>, expected: u64, lease: Option<LeaseId>) -> Result<Option<u64>> {
        let mut g = self.lock()?;
        let current = g.kv.get(key).map(|(_, rev, _)| *rev).unwrap_or(0);
        if current != expected {
            return Ok(None);
        }
        g.write(key, value, lease, &self.events).map(Some)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut g = self.lock()?;
        // Not guessable (a peer that could name another's lease could revoke it), unique, > 0.
        let id = loop {
            let id = super::random_lease_id();
            if !g.leases.contains_key(&id) {
                break id;
            }
        };
        g.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: HashSet::new() });
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let mut g = self.lock()?;
        Ok(match g.leases.get_mut(&lease) {
            Some(l) if l.deadline > Instant::now() => {
                l.deadline = Instant::now() + l.ttl;
                true
            }
            _ => false,
        })
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut g = self.lock()?;
        g.drop_lease(lease, &self.events);
        Ok(())
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<mpsc::Receiver<StoreEvent>> {
        let (tx, rx) = mpsc::channel(256);
        let (backlog, mut live, mut last) = {
            let g = self.lock()?;
            let after = if after == 0 { g.revision } else { after };
            if let Some(first) = g.history.front() {
                if after + 1 < first.revision {
                    return Err(ClusterError::Store(format!(
                        "revision {after} is compacted (oldest kept is {}); list again and watch from its revision",
                        first.revision
                    )));
                }
            }
            let backlog: Vec<StoreEvent> =
                g.history.iter().filter(|e| e.revision > after && e.key.starts_with(prefix)).cloned().collect();
            // Subscribed under the lock: nothing can slip between the backlog and the live feed.
            (backlog, self.events.subscribe(), after)
        };
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            for ev in backlog {
                last = ev.revision;
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(ev) if ev.revision > last && ev.key.starts_with(&prefix) => {
                        last = ev.revision;
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Lagged or closed: end the watch; the caller re-lists and re-watches.
                    Err(_) => return,
                }
            }
        });
        Ok(rx)
    }
}
