//! Admission control on a worker, so that no peer can make it buffer without bound:
//!
//! - [`Budget`]: bytes of activations in flight (chunks being decoded, computed and encoded;
//!   Forward requests being dispatched). A request that does not fit waits briefly, then gets
//!   RESOURCE_EXHAUSTED naming the budget and its flag.
//! - [`PeerStreams`]: concurrent streams per peer connection, same rule.
//! - [`Connections`] (`expertmesh_cluster::conns`): every accepted connection, behind a
//!   [`GuardedIo`] the worker can cut. A peer that stops reading its answers is first
//!   flow-controlled (HTTP/2 windows and the bounded queues of a stream) and, past the stall
//!   timeout, its connection is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Result, WorkerError};

pub use expertmesh_cluster::conns::{incoming, Connections, GuardedIo};

const MIB: f64 = (1u64 << 20) as f64;

/// A budget of bytes in flight, counted in KiB.
#[derive(Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total_kib: u32,
    /// "in-flight activation" or the like, for messages.
    what: &'static str,
    flag: &'static str,
    owner: String,
}

impl Budget {
    pub fn new(bytes: u64, what: &'static str, flag: &'static str, owner: &str) -> Self {
        let total_kib = (bytes / 1024).clamp(1, u32::MAX as u64) as u32;
        Self { sem: Arc::new(Semaphore::new(total_kib as usize)), total_kib, what, flag, owner: owner.to_string() }
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_kib as u64 * 1024
    }

    pub fn in_use_bytes(&self) -> u64 {
        (self.total_kib as u64).saturating_sub(self.sem.available_permits() as u64) * 1024
    }

    /// Reserve `bytes`, waiting at most `wait`; the reservation lasts as long as the permit.
    pub async fn acquire(&self, bytes: u64, wait: Duration) -> Result<OwnedSemaphorePermit> {
        let kib = bytes.div_ceil(1024).max(1);
        if kib > self.total_kib as u64 {
            return Err(WorkerError::ResourceExhausted(format!(
                "{}: a request needing {:.1} MiB of {} memory can never fit its budget of {:.1} MiB ({})",
                self.owner,
                bytes as f64 / MIB,
                self.what,
                self.total_bytes() as f64 / MIB,
                self.flag
            )));
        }
        match tokio::time::timeout(wait, self.sem.clone().acquire_many_owned(kib as u32)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(WorkerError::Unavailable(format!("{}: shutting down", self.owner))),
            Err(_) => Err(WorkerError::ResourceExhausted(format!(
                "{}: {} memory is at its budget ({:.1} of {:.1} MiB in use, {}); waited {:?} for {:.1} MiB; retry later or on another replica",
                self.owner,
                self.what,
                self.in_use_bytes() as f64 / MIB,
                self.total_bytes() as f64 / MIB,
                self.flag,
                wait,
                bytes as f64 / MIB
            ))),
        }
    }
}

/// Concurrent streams (and unary calls) per peer connection.
#[derive(Debug)]
pub struct PeerStreams {
    limit: usize,
    owner: String,
    peers: Mutex<HashMap<SocketAddr, Arc<Semaphore>>>,
}

/// One stream's slot; frees it when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    permit: Option<OwnedSemaphorePermit>,
    sem: Arc<Semaphore>,
    peer: SocketAddr,
    owner: Arc<PeerStreams>,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Ok(mut m) = self.owner.peers.lock() {
            // The map's handle and ours are the only ones: nobody waits, forget the peer.
            let idle = m.get(&self.peer).is_some_and(|s| {
                Arc::ptr_eq(s, &self.sem)
                    && Arc::strong_count(&self.sem) <= 2
                    && self.sem.available_permits() == self.owner.limit
            });
            if idle {
                m.remove(&self.peer);
            }
        }
    }
}

impl PeerStreams {
    pub fn new(limit: usize, owner: &str) -> Arc<Self> {
        Arc::new(Self { limit: limit.max(1), owner: owner.to_string(), peers: Mutex::new(HashMap::new()) })
    }

    /// A slot for one stream from `peer`, waiting at most `wait` (no limit without a peer address).
    pub async fn acquire(self: &Arc<Self>, peer: Option<SocketAddr>, wait: Duration) -> Result<Option<PeerSlot>> {
        let Some(peer) = peer else { return Ok(None) };
        let sem = {
            let mut m = self.peers.lock().map_err(|_| WorkerError::Internal("peer table poisoned".into()))?;
            m.entry(peer).or_insert_with(|| Arc::new(Semaphore::new(self.limit))).clone()
        };
        match tokio::time::timeout(wait, sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Some(PeerSlot { permit: Some(p), sem, peer, owner: self.clone() })),
            Ok(Err(_)) => Err(WorkerError::Unavailable(format!("{}: shutting down", self.owner))),
            Err(_) => Err(WorkerError::ResourceExhausted(format!(
                "{}: peer {peer} already has {} streams open (--max-streams-per-peer); waited {wait:?}; retry later",
                self.owner, self.limit
            ))),
        }
    }

    /// Peers with at least one stream open.
    pub fn peers(&self) -> usize {
        self.peers.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn budget_waits_then_refuses_naming_the_flag() {
        let b = Budget::new(1 << 20, "in-flight activation", "--max-inflight-mib", "worker w0");
        let p = b.acquire(800 << 10, Duration::from_millis(10)).await.unwrap();
        assert!(b.in_use_bytes() >= 800 << 10);
        let e = b.acquire(400 << 10, Duration::from_millis(20)).await.unwrap_err().to_string();
        assert!(e.contains("--max-inflight-mib") && e.contains("waited"), "{e}");
        drop(p);
        let _held = b.acquire(400 << 10, Duration::from_millis(10)).await.unwrap();
        let e = b.acquire(2 << 20, Duration::from_secs(10)).await.unwrap_err().to_string();
        assert!(e.contains("can never fit"), "{e}");
    }

    #[tokio::test]
    async fn peer_streams_are_limited_per_peer_and_forgotten_when_idle() {
        let p = PeerStreams::new(2, "worker w0");
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let s1 = p.acquire(Some(a), Duration::from_millis(5)).await.unwrap();
        let _s2 = p.acquire(Some(a), Duration::from_millis(5)).await.unwrap();
        let e = p.acquire(Some(a), Duration::from_millis(20)).await.unwrap_err().to_string();
        assert!(e.contains("--max-streams-per-peer"), "{e}");
        let _other = p.acquire(Some(b), Duration::from_millis(5)).await.unwrap();
        drop(s1);
        let _s3 = p.acquire(Some(a), Duration::from_millis(5)).await.unwrap();
        drop((_s2, _s3, _other));
        assert_eq!(p.peers(), 0, "idle peers are forgotten");
        assert!(p.acquire(None, Duration::ZERO).await.unwrap().is_none());
    }
}
