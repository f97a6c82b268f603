//! The link of a group of workers that move rows collectively (an NCCL communicator between
//! GPU workers): every rank calls [`Fabric::exchange`] in the same order, and each call is one
//! grouped send/recv with every rank, itself included, an all-to-allv. The collective
//! transport's round protocol (`expertmesh_dispatcher::collective`) runs over this trait.
//!
//! [`LoopbackFabric`] connects ranks inside one process through host memory: the protocol's
//! tests run on it on any machine; `nccl::NcclFabric` (feature `nccl`) is the real one.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use expertmesh_core::dtype::DType;

use crate::{ExpertBackend, HostRows, KernelError, Result, Rows};

/// One piece of an outgoing buffer: rows a backend computed, or host bytes.
#[derive(Debug)]
pub enum Part {
    Rows(Box<dyn Rows>),
    Host(Vec<u8>),
}

/// A group's collective link, from one rank's side.
pub trait Fabric: Send + 'static {
    /// A buffer in the memory the link moves (device memory for NCCL).
    type Buf: Send + 'static;

    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf>;
    /// `len` bytes of `buf` from byte `start`, into host memory.
    fn download(&self, buf: &Self::Buf, start: usize, len: usize) -> Result<Vec<u8>>;
    /// Send the first `send_bytes[p]` bytes of `sends[p]` to rank p and receive
    /// `recv_bytes[p]` bytes from every rank p (0 bytes: nothing is posted for that pair; both
    /// sides know the sizes). Every rank of the group calls this the same number of times.
    fn exchange(&mut self, sends: &[Self::Buf], send_bytes: &[usize], recv_bytes: &[usize]) -> Result<Vec<Self::Buf>>;
    /// `rows x cols` of `dtype` at byte `offset` of `buf`, as rows of the backend that computes
    /// them.
    fn rows(&self, buf: &Self::Buf, offset: usize, dtype: DType, rows: usize, cols: usize) -> Result<Box<dyn Rows>>;
    /// One buffer holding `parts` back to back.
    fn join(&self, parts: Vec<Part>) -> Result<Self::Buf>;
    /// Something another thread may call to make a hung [`Fabric::exchange`] fail (a peer died
    /// mid-round): the fabric is unusable afterwards.
    fn aborter(&self) -> Arc<dyn Fn() + Send + Sync>;
}

type Mail = HashMap<(u64, usize, usize), Vec<u8>>;

#[derive(Debug, Default)]
struct Post {
    mail: Mutex<(Mail, bool)>,
    arrived: Condvar,
}

/// Ranks in one process linked through host memory. Rows are the given backend's (a CPU
/// backend: its rows are host memory too).
pub struct LoopbackFabric {
    rank: usize,
    size: usize,
    round: u64,
    post: Arc<Post>,
    backend: Arc<dyn ExpertBackend>,
    /// An exchange that waits longer than this for its peers fails (a test's guard).
    pub limit: Duration,
}

impl std::fmt::Debug for LoopbackFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackFabric").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

impl LoopbackFabric {
    /// `size` linked ranks.
    pub fn group(size: usize, backend: Arc<dyn ExpertBackend>) -> Vec<LoopbackFabric> {
        let post = Arc::new(Post::default());
        (0..size)
            .map(|rank| LoopbackFabric {
                rank,
                size,
                round: 0,
                post: post.clone(),
                backend: backend.clone(),
                limit: Duration::from_secs(30),
            })
            .collect()
    }
}

impl Fabric for LoopbackFabric {
    type Buf = Vec<u8>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn upload(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }

    fn download(&self, buf: &Vec<u8>, start: usize, len: usize) -> Result<Vec<u8>> {
        buf.get(start..start + len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| KernelError::Shape(format!("bytes {start}..{} of a {}-byte buffer", start + len, buf.len())))
    }

    fn exchange(&mut self, sends: &[Vec<u8>], send_bytes: &[usize], recv_bytes: &[usize]) -> Result<Vec<Vec<u8>>> {
        let n = self.size;
        if sends.len() != n || send_bytes.len() != n || recv_bytes.len() != n {
            return Err(KernelError::Shape(format!("an exchange of a {n}-rank group needs {n} sends and sizes")));
        }
        let round = self.round;
        self.round += 1;
        let mut g = self.post.mail.lock().unwrap_or_else(|p| p.into_inner());
        for p in 0..n {
            if send_bytes[p] > 0 {
                g.0.insert((round, self.rank, p), sends[p][..send_bytes[p]].to_vec());
            }
        }
        self.post.arrived.notify_all();
        let deadline = Instant::now() + self.limit;
        let mut out = vec![Vec::new(); n];
        for p in 0..n {
            if recv_bytes[p] == 0 {
                continue;
            }
            loop {
                if g.1 {
                    return Err(KernelError::Device("the loopback group was aborted".into()));
                }
                if let Some(v) = g.0.remove(&(round, p, self.rank)) {
                    if v.len() != recv_bytes[p] {
                        return Err(KernelError::Shape(format!(
                            "rank {p} sent {} bytes; rank {} expected {}",
                            v.len(),
                            self.rank,
                            recv_bytes[p]
                        )));
                    }
                    out[p] = v;
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(KernelError::Device(format!(
                        "rank {} waited {:?} for rank {p} in round {round}",
                        self.rank, self.limit
                    )));
                }
                g = self.post.arrived.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
        Ok(out)
    }

    fn rows(&self, buf: &Vec<u8>, offset: usize, dtype: DType, rows: usize, cols: usize) -> Result<Box<dyn Rows>> {
        let len = rows * cols * dtype.size();
        let bytes = self.download(buf, offset, len)?;
        self.backend.upload(HostRows::new(dtype, rows, cols, Bytes::from(bytes))?)
    }

    fn join(&self, parts: Vec<Part>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for p in parts {
            match p {
                Part::Host(b) => out.extend_from_slice(&b),
                Part::Rows(r) => out.extend_from_slice(&self.backend.download(r)?.data),
            }
        }
        Ok(out)
    }

    fn aborter(&self) -> Arc<dyn Fn() + Send + Sync> {
        let post = self.post.clone();
        Arc::new(move || {
            post.mail.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
            post.arrived.notify_all();
        })
    }
}
