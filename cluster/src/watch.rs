//! Watches that open with a full snapshot and then stream every change with no gap. The store's
//! own `watch` ends when its connection breaks or history is compacted; [`watch_prefix`] hides
//! that: it lists again, turns what changed meanwhile into ordinary change events (deletes for
//! keys that vanished, puts for keys that are new or rewritten), and watches on. A caller applies
//! the snapshot once and then every event; it never lists, re-watches or polls itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use crate::error::Result;
use crate::store::{KeyValue, MetadataStore, StoreEvent};

/// What a [`watch_prefix`] stream carries after its snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// One change, in revision order. After a reconnection, the changes missed while away.
    Change(StoreEvent),
    /// The store cannot be read (the error); the watch keeps retrying and the caller's state is
    /// the last it saw. Sent once per outage.
    Lost(String),
    /// The store answers again; the changes made meanwhile have been sent just before this.
    Restored,
}

/// How a watch recovers.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Between attempts to reach the store while it is down.
    pub retry: Duration,
    /// List again this often even when the watch looks healthy (a store watch can stall without
    /// closing); only differences are sent. None: never.
    pub resync_every: Option<Duration>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self { retry: Duration::from_millis(300), resync_every: Some(Duration::from_secs(30)) }
    }
}

/// Keys under `prefix` now, sorted by key, and a stream of every later change. Fails only if
/// the first listing fails. The stream ends when the receiver is dropped.
pub async fn watch_prefix(
    store: Arc<dyn MetadataStore>,
    prefix: &str,
    opts: WatchOptions,
) -> Result<(Vec<KeyValue>, mpsc::Receiver<WatchEvent>)> {
    let (kvs, revision) = store.list(prefix).await?;
    let known: HashMap<String, u64> = kvs.iter().map(|kv| (kv.key.clone(), kv.mod_revision)).collect();
    let (tx, rx) = mpsc::channel(256);
    let w = Watcher { store, prefix: prefix.to_string(), opts, known, revision, tx };
    tokio::spawn(w.run());
    Ok((kvs, rx))
}

enum Ended {
    Closed,
    ResyncDue,
    CallerGone,
}

struct Watcher {
    store: Arc<dyn MetadataStore>,
    prefix: String,
    opts: WatchOptions,
    /// Key -> mod revision of everything the caller has been told exists.
    known: HashMap<String, u64>,
    /// Every change up to this revision has been sent.
    revision: u64,
    tx: mpsc::Sender<WatchEvent>,
}

impl Watcher {
    async fn run(mut self) {
        let mut lost = false;
        // The snapshot was just listed: watch from it first.
        let mut listed = true;
        loop {
            if !listed {
                // Catch up from a listing, retrying while the store is down.
                loop {
                    match self.store.list(&self.prefix).await {
                        Ok((kvs, revision)) => {
                            if !self.catch_up(kvs, revision).await {
                                return;
                            }
                            break;
                        }
                        Err(e) => {
                            if !self.lost(&mut lost, e.to_string()).await || !self.pause().await {
                                return;
                            }
                        }
                    }
                }
            }
            listed = false;
            match self.store.watch(&self.prefix, self.revision).await {
                Ok(rx) => {
                    if lost {
                        lost = false;
                        if self.tx.send(WatchEvent::Restored).await.is_err() {
                            return;
                        }
                    }
                    match self.follow(rx).await {
                        Ended::CallerGone => return,
                        Ended::ResyncDue => {}
                        // A broken connection or compaction: do not spin if it keeps breaking.
                        Ended::Closed => {
                            if !self.pause().await {
                                return;
                            }
                        }
                    }
                }
                Err(e) => {
                    if !self.lost(&mut lost, e.to_string()).await || !self.pause().await {
                        return;
                    }
                }
            }
        }
    }

    /// Report an outage once; false when the caller has gone.
    async fn lost(&self, lost: &mut bool, error: String) -> bool {
        if *lost {
            return true;
        }
        *lost = true;
        self.tx.send(WatchEvent::Lost(error)).await.is_ok()
    }

    /// Wait `retry`; false when the caller has gone meanwhile.
    async fn pause(&self) -> bool {
        tokio::select! {
            _ = self.tx.closed() => false,
            _ = tokio::time::sleep(self.opts.retry) => true,
        }
    }

    /// Forward the store watch's events until it ends, a resync is due or the caller goes.
    async fn follow(&mut self, mut rx: mpsc::Receiver<StoreEvent>) -> Ended {
        let resync = tokio::time::sleep(self.opts.resync_every.unwrap_or(Duration::from_secs(86_400 * 365)));
        tokio::pin!(resync);
        loop {
            tokio::select! {
                _ = self.tx.closed() => return Ended::CallerGone,
                _ = &mut resync => return Ended::ResyncDue,
                ev = rx.recv() => {
                    let Some(ev) = ev else { return Ended::Closed };
                    if ev.revision <= self.revision && self.known.get(&ev.key) == Some(&ev.revision) {
                        continue;
                    }
                    match &ev.value {
                        Some(_) => self.known.insert(ev.key.clone(), ev.revision),
                        None => self.known.remove(&ev.key),
                    };
                    self.revision = self.revision.max(ev.revision);
                    if self.tx.send(WatchEvent::Change(ev)).await.is_err() {
                        return Ended::CallerGone;
                    }
                }
            }
        }
    }

    /// Send what differs between what the caller knows and a fresh listing: deletes first,
    /// then puts in the order they were written. False when the caller has gone.
    async fn catch_up(&mut self, kvs: Vec<KeyValue>, revision: u64) -> bool {
        let now: HashMap<&str, &KeyValue> = kvs.iter().map(|kv| (kv.key.as_str(), kv)).collect();
        let mut gone: Vec<String> = self.known.keys().filter(|k| !now.contains_key(k.as_str())).cloned().collect();
        gone.sort();
        let mut changed: Vec<&KeyValue> =
            kvs.iter().filter(|kv| self.known.get(&kv.key) != Some(&kv.mod_revision)).collect();
        changed.sort_by_key(|kv| kv.mod_revision);
        if !gone.is_empty() || !changed.is_empty() {
            debug!(prefix = %self.prefix, deleted = gone.len(), changed = changed.len(), revision, "watch caught up from a listing");
        }
        for key in gone {
            self.known.remove(&key);
            if self.tx.send(WatchEvent::Change(StoreEvent { key, value: None, revision })).await.is_err() {
                return false;
            }
        }
        for kv in changed {
            self.known.insert(kv.key.clone(), kv.mod_revision);
            let ev = StoreEvent { key: kv.key.clone(), value: Some(kv.value.clone()), revision: kv.mod_revision };
            if self.tx.send(WatchEvent::Change(ev)).await.is_err() {
                return false;
            }
        }
        self.revision = self.revision.max(revision);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("an event in time").expect("open")
    }

    fn change(ev: WatchEvent) -> (String, Option<Vec<u8>>) {
        match ev {
            WatchEvent::Change(e) => (e.key, e.value),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    /// The snapshot holds what was there; every later write arrives once, in order; a periodic
    /// resync that finds nothing new sends nothing.
    #[tokio::test]
    async fn snapshot_then_every_change_once() {
        let store: Arc<dyn MetadataStore> = Arc::new(EmbeddedStore::new());
        store.put("/p/a", b"1".to_vec(), None).await.unwrap();
        store.put("/q/x", b"other prefix".to_vec(), None).await.unwrap();
        let opts = WatchOptions { retry: Duration::from_millis(10), resync_every: Some(Duration::from_millis(50)) };
        let (snap, mut rx) = watch_prefix(store.clone(), "/p/", opts).await.unwrap();
        assert_eq!(snap.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(), ["/p/a"]);
        store.put("/p/b", b"2".to_vec(), None).await.unwrap();
        store.put("/p/a", b"3".to_vec(), None).await.unwrap();
        store.delete("/p/b").await.unwrap();
        assert_eq!(change(next(&mut rx).await), ("/p/b".into(), Some(b"2".to_vec())));
        assert_eq!(change(next(&mut rx).await), ("/p/a".into(), Some(b"3".to_vec())));
        assert_eq!(change(next(&mut rx).await), ("/p/b".into(), None));
        // Several resyncs pass: nothing is repeated.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "a resync with nothing new sent something");
        store.put("/p/c", b"4".to_vec(), None).await.unwrap();
        assert_eq!(change(next(&mut rx).await), ("/p/c".into(), Some(b"4".to_vec())));
    }

    /// A store that fails its watches and, while "down", its listings: the watch reports the
    /// outage once, then the changes made meanwhile as ordinary changes, then that it is back.
    #[derive(Debug)]
    struct Flaky {
        inner: EmbeddedStore,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl MetadataStore for Flaky {
        async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<u64> {
            self.inner.put(key, value, lease).await
        }
        async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
            self.inner.get(key).await
        }
        async fn delete(&self, key: &str) -> Result<u64> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64)> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::ClusterError::Store("down".into()));
            }
            self.inner.list(prefix).await
        }
        async fn put_if(&self, key: &str, value: Vec<u8>, expected: u64, lease: Option<i64>) -> Result<Option<u64>> {
            self.inner.put_if(key, value, expected, lease).await
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<i64> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: i64) -> Result<bool> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke(&self, lease: i64) -> Result<()> {
            self.inner.revoke(lease).await
        }
        async fn watch(&self, prefix: &str, after: u64) -> Result<mpsc::Receiver<StoreEvent>> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::ClusterError::Store("down".into()));
            }
            // A watch that ends at once, as one whose connection broke.
            let _ = (prefix, after);
            let (_tx, rx) = mpsc::channel(1);
            Ok(rx)
        }
    }

    #[tokio::test]
    async fn an_outage_is_reported_and_the_missed_changes_follow() {
        use std::sync::atomic::Ordering::SeqCst;
        let flaky = Arc::new(Flaky { inner: EmbeddedStore::new(), down: false.into() });
        let store: Arc<dyn MetadataStore> = flaky.clone();
        store.put("/p/keep", b"k".to_vec(), None).await.unwrap();
        store.put("/p/gone", b"g".to_vec(), None).await.unwrap();
        let opts = WatchOptions { retry: Duration::from_millis(10), resync_every: None };
        let (snap, mut rx) = watch_prefix(store.clone(), "/p/", opts).await.unwrap();
        assert_eq!(snap.len(), 2);
        flaky.down.store(true, SeqCst);
        assert!(matches!(next(&mut rx).await, WatchEvent::Lost(e) if e.contains("down")));
        store.delete("/p/gone").await.unwrap();
        store.put("/p/new", b"n1".to_vec(), None).await.unwrap();
        store.put("/p/new", b"n2".to_vec(), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        flaky.down.store(false, SeqCst);
        assert_eq!(change(next(&mut rx).await), ("/p/gone".into(), None));
        assert_eq!(change(next(&mut rx).await), ("/p/new".into(), Some(b"n2".to_vec())));
        assert_eq!(next(&mut rx).await, WatchEvent::Restored);
        // The flaky watch keeps ending: each catch-up finds nothing new, so nothing repeats.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "an unchanged key was sent again");
    }
}
