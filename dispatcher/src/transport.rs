//! How a dispatcher reaches the workers that hold experts: the [`ExpertTransport`] seam, and
//! its gRPC implementation ([`GrpcTransport`], `expertmesh.v1.ExpertService/Compute`).
//!
//! A send is one stream to one destination: chunks of rows grouped by expert go out as the
//! dispatcher produces them, and the destination answers each chunk, in order, with its output
//! rows, then ends the stream. The dispatcher owns everything else (routing, hedging, deadlines,
//! combining); a transport only moves chunks and answers, counts the bytes it moved, and says
//! whether a suspect destination answers again. A collective transport (NCCL, next) implements
//! the same trait for the destinations of its group.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use expertmesh_core::dtype::DType;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::ExpertBatch;
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};
use crate::wire::dtype_to_proto;

/// What every chunk of one send shares.
#[derive(Debug, Clone, Copy)]
pub struct SendHeader {
    pub request_id: u64,
    /// The placement epoch the rows were routed by; a worker past it answers "not held".
    pub epoch: u64,
    pub layer: u32,
    /// Dtype of the rows, both ways (bf16 or f32).
    pub dtype: DType,
    pub hidden: usize,
}

/// One chunk of a send: rows grouped by expert (`rows[i]` rows of `experts[i]`, in order).
#[derive(Debug, Clone)]
pub struct OutChunk {
    /// Position in the send, from 0.
    pub index: u32,
    pub experts: Vec<u32>,
    pub rows: Vec<u32>,
    /// `sum(rows) * hidden` values of the header's dtype.
    pub data: Bytes,
}

/// A destination's answer to one chunk: its output rows in the chunk's row order.
#[derive(Debug, Clone)]
pub struct ChunkAnswer {
    pub chunk: u32,
    pub rows: u32,
    pub data: Bytes,
}

/// The answers of one send, one per chunk in order, then the end of the stream: `None` when the
/// destination ended it cleanly, an error when it failed.
pub type AnswerStream = BoxStream<'static, Result<ChunkAnswer>>;

/// Bytes a dispatcher put on and took off the wire (for gRPC: protobuf plus the 5-byte gRPC
/// prefix, HTTP/2 frame headers excluded), and how often it had to route around trouble.
#[derive(Debug, Default)]
pub struct WireStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub payload_sent: AtomicU64,
    pub payload_received: AtomicU64,
    /// Sends whose unanswered rows were re-sent to a replica after a silence.
    pub hedges: AtomicU64,
    /// Sends given up: failed, silent past `rpc_timeout`, or cancelled by a placement change.
    pub failed_sends: AtomicU64,
    pub cancelled_sends: AtomicU64,
}

/// Moves chunks of rows to the worker at an address and their answers back.
#[async_trait::async_trait]
pub trait ExpertTransport: Send + Sync + std::fmt::Debug + 'static {
    /// Start a send to `address`: chunks are taken from `chunks` as they come, and the stream
    /// ends when `chunks` closes. Dropping the returned stream abandons the send. Fails with
    /// the destination's error class ([`Error`]): UNAVAILABLE when it cannot be reached.
    async fn open(
        &self,
        address: &str,
        header: SendHeader,
        chunks: mpsc::Receiver<OutChunk>,
        deadline: Instant,
        stats: Arc<WireStats>,
    ) -> Result<AnswerStream>;

    /// Whether the expert server at `address` answers as serving within `limit` (used to clear
    /// a suspect destination).
    async fn probe(&self, address: &str, limit: Duration) -> Result<()>;

    /// Forget connection state for addresses not in `keep` (they left the placement).
    fn retain(&self, keep: &HashSet<String>);
}

/// [`ExpertTransport`] over gRPC: one HTTP/2 connection per destination, one stream per send.
#[derive(Debug)]
pub struct GrpcTransport {
    clients: Mutex<HashMap<String, ExpertServiceClient<Channel>>>,
    max_message_bytes: usize,
    connect_timeout: Duration,
    tls: Option<expertmesh_trust::Tls>,
}

impl GrpcTransport {
    pub fn new(max_message_bytes: usize, connect_timeout: Duration) -> Self {
        Self { clients: Mutex::new(HashMap::new()), max_message_bytes, connect_timeout, tls: None }
    }

    /// Reach workers over mutual TLS with `tls` (each must present a `worker.<id>`
    /// certificate of the cluster CA).
    pub fn with_tls(mut self, tls: Option<expertmesh_trust::Tls>) -> Self {
        self.tls = tls;
        self
    }

    fn client(&self, addr: &str) -> Result<ExpertServiceClient<Channel>> {
        let mut g = self.clients.lock().map_err(|_| Error::Internal("transport client table lock poisoned".into()))?;
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        // A member's address was checked when it registered; one that still does not parse is
        // that worker's fault, never the caller's: an Unavailable destination, not bad input.
        expertmesh_core::limits::check_address("worker address", addr).map_err(Error::Unavailable)?;
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Unavailable(format!("worker address `{addr}`: {e}")))?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = expertmesh_trust::client::connect_lazy(ep, self.tls.as_ref(), expertmesh_trust::Expect::AnyWorker);
        let c = ExpertServiceClient::new(ch)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

#[async_trait::async_trait]
impl ExpertTransport for GrpcTransport {
    async fn open(
        &self,
        address: &str,
        header: SendHeader,
        chunks: mpsc::Receiver<OutChunk>,
        deadline: Instant,
        stats: Arc<WireStats>,
    ) -> Result<AnswerStream> {
        let mut client = self.client(address)?;
        let sent = stats.clone();
        let batches = tokio_stream::wrappers::ReceiverStream::new(chunks).map(move |c| {
            let b = ExpertBatch {
                request_id: header.request_id,
                epoch: header.epoch,
                layer: header.layer,
                dtype: dtype_to_proto(header.dtype),
                hidden: header.hidden as u32,
                experts: c.experts,
                rows: c.rows,
                data: c.data,
                chunk: c.index,
            };
            sent.bytes_sent.fetch_add(b.encoded_len() as u64 + 5, Ordering::Relaxed);
            sent.payload_sent.fetch_add(b.data.len() as u64, Ordering::Relaxed);
            b
        });
        let mut req = tonic::Request::new(batches);
        req.set_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        let resp = client.compute(req).await.map_err(Error::from)?.into_inner();
        let answers = resp.map(move |r| {
            let r = r.map_err(Error::from)?;
            stats.bytes_received.fetch_add(r.encoded_len() as u64 + 5, Ordering::Relaxed);
            stats.payload_received.fetch_add(r.data.len() as u64, Ordering::Relaxed);
            Ok(ChunkAnswer { chunk: r.chunk, rows: r.rows, data: r.data })
        });
        Ok(answers.boxed())
    }

    async fn probe(&self, address: &str, limit: Duration) -> Result<()> {
        let expect = expertmesh_trust::Expect::AnyWorker;
        // Reachable is enough: a worker that answers NOT_SERVING (draining, between epochs)
        // still computes the experts it holds.
        expertmesh_proto::reachable(address, expertmesh_proto::EXPERT_SERVICE, limit, self.tls.as_ref(), expect)
            .await
            .map_err(|e| Error::Unavailable(format!("{address}: {e}")))
    }

    fn retain(&self, keep: &HashSet<String>) {
        if let Ok(mut g) = self.clients.lock() {
            g.retain(|a, _| keep.contains(a));
        }
    }
}

/// The dispatcher's transport when its worker is in a collective group: sends to members of a
/// live group go over the group's link, everything else (other groups, CPU workers, a group
/// that stopped or is still forming) over gRPC.
#[derive(Debug)]
pub struct RoutedTransport {
    grpc: GrpcTransport,
    groups: std::sync::RwLock<Vec<Arc<crate::collective::CollectiveTransport>>>,
}

impl RoutedTransport {
    pub fn new(grpc: GrpcTransport) -> Self {
        Self { grpc, groups: std::sync::RwLock::new(Vec::new()) }
    }

    /// Serve the group's members over its link from now on (newest group first).
    pub fn add_group(&self, g: Arc<crate::collective::CollectiveTransport>) {
        if let Ok(mut v) = self.groups.write() {
            v.insert(0, g);
        }
    }

    /// Stop using groups `drop_if` selects (they are left by the caller).
    pub fn remove_groups(&self, drop_if: impl Fn(&crate::collective::CollectiveTransport) -> bool) {
        if let Ok(mut v) = self.groups.write() {
            v.retain(|g| !drop_if(g));
        }
    }

    /// The groups in use, newest first.
    pub fn groups(&self) -> Vec<Arc<crate::collective::CollectiveTransport>> {
        self.groups.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// The live group that reaches `address`, if any.
    pub fn group_for(&self, address: &str) -> Option<Arc<crate::collective::CollectiveTransport>> {
        self.groups.read().ok()?.iter().find(|g| g.serves(address)).cloned()
    }
}

#[async_trait::async_trait]
impl ExpertTransport for RoutedTransport {
    async fn open(
        &self,
        address: &str,
        header: SendHeader,
        chunks: mpsc::Receiver<OutChunk>,
        deadline: Instant,
        stats: Arc<WireStats>,
    ) -> Result<AnswerStream> {
        match self.group_for(address) {
            Some(g) => g.open(address, header, chunks, deadline, stats).await,
            None => self.grpc.open(address, header, chunks, deadline, stats).await,
        }
    }

    async fn probe(&self, address: &str, limit: Duration) -> Result<()> {
        match self.group_for(address) {
            Some(g) => g.probe(address, limit).await,
            None => self.grpc.probe(address, limit).await,
        }
    }

    fn retain(&self, keep: &HashSet<String>) {
        self.grpc.retain(keep);
    }
}
