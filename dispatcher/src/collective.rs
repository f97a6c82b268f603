//! The collective transport: the workers of a group (GPU workers sharing an NCCL communicator)
//! move rows to each other in rounds of all-to-allv over a [`Fabric`], instead of one gRPC
//! stream per send.
//!
//! Every rank runs the same loop on its own thread, in lockstep with the others:
//! 1. **header**: each rank tells every rank how many bytes of chunk descriptions and rows it
//!    has for it this round, and how much it sends in all (32 bytes per pair);
//! 2. if nobody sends anything, every rank knows it from the same headers: all back off by the
//!    same schedule (20 us doubling to 500 us; a rank with new work stops waiting at once and
//!    the exchange waits for the others) and go to 1;
//! 3. **dispatch**: one grouped send/recv carries every chunk (descriptions, then rows);
//! 4. each rank computes what it received through its [`ComputeSink`] (the worker's resident
//!    experts), chunk by chunk, on the fabric's device;
//! 5. **combine**: one grouped send/recv carries the answers back, a 256-byte status per chunk
//!    (ok, or the error's class, epoch and message), then the output rows. Sizes are known on
//!    both sides from the dispatch, so nothing else is exchanged.
//!
//! A chunk whose expert is not held (its placement moved on) is answered with that error, as
//! the gRPC path answers it, so the dispatcher's retry logic is the same for both transports.
//! A rank that leaves says so in its header; the whole group ends after that round and every
//! unanswered send fails UNAVAILABLE (the dispatcher retries it by gRPC or the next epoch). A
//! round that does not finish within the round limit (a peer died mid-exchange) aborts the
//! fabric, with the same outcome.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use expertmesh_core::dtype::DType;
use expertmesh_kernels::fabric::{Fabric, Part};
use expertmesh_kernels::Rows;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::error::{Error, Result, EPOCH_METADATA};
use crate::transport::{AnswerStream, ChunkAnswer, ExpertTransport, OutChunk, SendHeader, WireStats};

/// Bytes of one chunk's answer status.
pub const STATUS_BYTES: usize = 256;
const HEADER_BYTES: usize = 32;
/// Rows a rank sends one peer in one round, at most (a bigger single chunk still goes alone).
const ROUND_BYTES: usize = 64 << 20;

/// A group as a placement names it: the addresses of its ranks in rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub epoch: u64,
    pub members: Vec<String>,
}

/// What computes the chunks a rank receives: the worker's resident experts.
pub trait ComputeSink: Send + Sync + 'static {
    /// The FFN of `x`, rows grouped by expert (`rows[i]` rows of `experts[i]`) of the header's
    /// layer, routed by the header's epoch; rows of the same backend as `x`.
    fn compute(&self, header: &SendHeader, experts: &[u32], rows: &[u32], x: &dyn Rows) -> Result<Box<dyn Rows>>;
}

struct Pending {
    header: SendHeader,
    chunk: OutChunk,
    answer: mpsc::UnboundedSender<Result<ChunkAnswer>>,
    stats: Arc<WireStats>,
}

impl Pending {
    fn out_bytes(&self) -> usize {
        self.chunk.data.len()
    }
}

struct Shared {
    name: String,
    queues: Mutex<Vec<VecDeque<Pending>>>,
    wake: Condvar,
    /// 0 while staying; the placement epoch this rank leaves for, or u64::MAX (shutting down).
    leaving: AtomicU64,
    /// Chunks queued or in a round, not yet answered.
    in_flight: AtomicU64,
    /// Why the group stopped serving (None while it serves).
    dead: Mutex<Option<String>>,
    /// The placement epoch that replaced the group, once it ended that way.
    replaced_by: AtomicU64,
    /// The group ended because a member left (not because a round failed).
    left: std::sync::atomic::AtomicBool,
    rounds: AtomicU64,
    busy_rounds: AtomicU64,
    /// When the round in progress started (None between rounds).
    round_started: Mutex<Option<Instant>>,
}

impl Shared {
    fn dead(&self) -> Option<String> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The answer to a send the group can no longer take.
    fn refusal(&self) -> Option<Error> {
        let why = self.dead()?;
        Some(match self.replaced_by.load(Ordering::Relaxed) {
            0 if self.left.load(Ordering::Relaxed) => Error::LinkClosed(format!("group {}: {why}", self.name)),
            0 => Error::Unavailable(format!("group {} stopped: {why}", self.name)),
            epoch => {
                Error::NotHeld { epoch, detail: format!("group {} was replaced by placement epoch {epoch}", self.name) }
            }
        })
    }
}

/// [`ExpertTransport`] to the members of one group, over a [`Fabric`] driven by a thread of
/// its own. Sends to addresses outside the group are refused (the dispatcher sends those by
/// gRPC: see [`crate::transport::RoutedTransport`]).
pub struct CollectiveTransport {
    group: GroupInfo,
    rank: usize,
    rank_of: HashMap<String, usize>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for CollectiveTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectiveTransport").field("group", &self.group).field("rank", &self.rank).finish()
    }
}

impl CollectiveTransport {
    /// Start serving `group` as the fabric's rank. A round that takes longer than
    /// `round_limit` aborts the fabric (a peer died mid-exchange).
    pub fn start<F: Fabric>(
        group: GroupInfo,
        fabric: F,
        sink: Arc<dyn ComputeSink>,
        round_limit: Duration,
    ) -> Result<Self> {
        let n = fabric.size();
        if n != group.members.len() || fabric.rank() >= n {
            return Err(Error::InvalidInput(format!(
                "group {} has {} members; the fabric is rank {} of {n}",
                group.name,
                group.members.len(),
                fabric.rank()
            )));
        }
        let rank_of: HashMap<String, usize> = group.members.iter().enumerate().map(|(i, a)| (a.clone(), i)).collect();
        if rank_of.len() != n {
            return Err(Error::InvalidInput(format!("group {} names a member twice: {:?}", group.name, group.members)));
        }
        let shared = Arc::new(Shared {
            name: group.name.clone(),
            queues: Mutex::new((0..n).map(|_| VecDeque::new()).collect()),
            wake: Condvar::new(),
            leaving: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            dead: Mutex::new(None),
            replaced_by: AtomicU64::new(0),
            left: std::sync::atomic::AtomicBool::new(false),
            rounds: AtomicU64::new(0),
            busy_rounds: AtomicU64::new(0),
            round_started: Mutex::new(None),
        });
        let rank = fabric.rank();
        let abort = fabric.aborter();
        let (sh, sh2) = (shared.clone(), shared.clone());
        let engine = std::thread::Builder::new()
            .name(format!("em-group-{rank}"))
            .spawn(move || engine(fabric, sh, sink))
            .map_err(|e| Error::Internal(format!("cannot start the group thread: {e}")))?;
        let watchdog = std::thread::Builder::new()
            .name(format!("em-group-wd-{rank}"))
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                if sh2.dead().is_some() {
                    return;
                }
                let started = *sh2.round_started.lock().unwrap_or_else(|p| p.into_inner());
                if started.is_some_and(|t| t.elapsed() > round_limit) {
                    tracing::warn!(group = %sh2.name, limit_ms = round_limit.as_millis() as u64, "a round of the group outlasted its limit; aborting the link");
                    abort();
                    return;
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the group watchdog: {e}")))?;
        Ok(Self { group, rank, rank_of, shared, threads: Mutex::new(vec![engine, watchdog]) })
    }

    pub fn group(&self) -> &GroupInfo {
        &self.group
    }

    /// Whether `address` is a member this transport reaches (and the group still serves).
    pub fn serves(&self, address: &str) -> bool {
        self.rank_of.contains_key(address) && self.shared.dead().is_none()
    }

    /// Why the group stopped serving, or None while it serves.
    pub fn stopped(&self) -> Option<String> {
        self.shared.dead()
    }

    /// Rounds run so far, and those that moved rows.
    pub fn rounds(&self) -> (u64, u64) {
        (self.shared.rounds.load(Ordering::Relaxed), self.shared.busy_rounds.load(Ordering::Relaxed))
    }

    /// Chunks sent through the group and not answered yet.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Leave the group because placement `epoch` replaced it: announced in the next round,
    /// after which every rank stops, and sends still queued anywhere in the group are answered
    /// "not held" at `epoch`, so their dispatchers resend them by the newer placement (over the
    /// new group, or gRPC) instead of blaming the destination.
    pub fn leave_for(&self, epoch: u64) {
        let _ = self.shared.leaving.compare_exchange(0, epoch.max(1), Ordering::Relaxed, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }

    /// Leave the group without a newer placement (the worker stops): what is still queued
    /// fails UNAVAILABLE.
    pub fn leave(&self) {
        let _ = self.shared.leaving.compare_exchange(0, u64::MAX, Ordering::Relaxed, Ordering::Relaxed);
        self.shared.wake.notify_all();
    }

    /// Leave and wait for the group's threads to end.
    pub fn shutdown(&self) {
        self.leave();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for CollectiveTransport {
    fn drop(&mut self) {
        self.leave();
    }
}

#[async_trait::async_trait]
impl ExpertTransport for CollectiveTransport {
    async fn open(
        &self,
        address: &str,
        header: SendHeader,
        mut chunks: mpsc::Receiver<OutChunk>,
        _deadline: Instant,
        stats: Arc<WireStats>,
    ) -> Result<AnswerStream> {
        let Some(&peer) = self.rank_of.get(address) else {
            return Err(Error::Unavailable(format!("{address} is not in group {}", self.group.name)));
        };
        if let Some(e) = self.shared.refusal() {
            return Err(e);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let sh = self.shared.clone();
        tokio::spawn(async move {
            while let Some(chunk) = chunks.recv().await {
                let p = Pending { header, chunk, answer: tx.clone(), stats: stats.clone() };
                let mut q = sh.queues.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(e) = sh.refusal() {
                    let _ = p.answer.send(Err(e));
                    return;
                }
                q[peer].push_back(p);
                sh.in_flight.fetch_add(1, Ordering::Relaxed);
                drop(q);
                sh.wake.notify_all();
            }
            // Each queued chunk holds a sender; the stream ends once the last is answered.
            drop(tx);
        });
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }

    async fn probe(&self, address: &str, _limit: Duration) -> Result<()> {
        if self.serves(address) {
            Ok(())
        } else {
            Err(Error::Unavailable(format!("{address} is not served by group {}", self.group.name)))
        }
    }

    fn retain(&self, _keep: &HashSet<String>) {}
}

/// One chunk as the dispatch round describes it.
#[derive(Debug, Clone)]
struct ChunkMeta {
    header: SendHeader,
    index: u32,
    experts: Vec<u32>,
    rows: Vec<u32>,
}

impl ChunkMeta {
    fn row_count(&self) -> usize {
        self.rows.iter().map(|&r| r as usize).sum()
    }

    fn data_bytes(&self) -> usize {
        self.row_count() * self.header.hidden * self.header.dtype.size()
    }
}

fn dtype_code(d: DType) -> u8 {
    if d == DType::F32 {
        0
    } else {
        1
    }
}

fn encode_meta(chunks: &[&Pending], out: &mut Vec<u8>) {
    for p in chunks {
        let h = &p.header;
        out.extend_from_slice(&h.request_id.to_le_bytes());
        out.extend_from_slice(&h.epoch.to_le_bytes());
        out.extend_from_slice(&h.layer.to_le_bytes());
        out.extend_from_slice(&[dtype_code(h.dtype), 0, 0, 0]);
        out.extend_from_slice(&(h.hidden as u32).to_le_bytes());
        out.extend_from_slice(&p.chunk.index.to_le_bytes());
        out.extend_from_slice(&(p.chunk.experts.len() as u32).to_le_bytes());
        for e in &p.chunk.experts {
            out.extend_from_slice(&e.to_le_bytes());
        }
        for r in &p.chunk.rows {
            out.extend_from_slice(&r.to_le_bytes());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(Error::Internal(format!("a chunk description ends {n} bytes early")));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }
}

fn decode_meta(bytes: &[u8], data_len: usize) -> Result<Vec<ChunkMeta>> {
    let mut r = Reader(bytes);
    let mut out = Vec::new();
    let mut data = 0usize;
    while !r.0.is_empty() {
        let request_id = r.u64()?;
        let epoch = r.u64()?;
        let layer = r.u32()?;
        let dtype = match r.take(4)?[0] {
            0 => DType::F32,
            1 => DType::BF16,
            c => return Err(Error::Internal(format!("a chunk description names dtype code {c}"))),
        };
        let hidden = r.u32()? as usize;
        let index = r.u32()?;
        let n = r.u32()? as usize;
        if n > r.0.len() / 8 {
            return Err(Error::Internal(format!("a chunk description claims {n} expert groups")));
        }
        let experts = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
        let rows = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
        let m = ChunkMeta { header: SendHeader { request_id, epoch, layer, dtype, hidden }, index, experts, rows };
        data = data.saturating_add(m.data_bytes());
        out.push(m);
    }
    if data != data_len {
        return Err(Error::Internal(format!("chunk descriptions account for {data} bytes of rows; {data_len} came")));
    }
    Ok(out)
}

/// A chunk's answer status: 0 for ok, else the gRPC code the error maps to, the placement
/// epoch of a "not held" answer, and the message (cut to fit).
fn encode_status(r: Result<()>, out: &mut Vec<u8>) {
    let mut rec = [0u8; STATUS_BYTES];
    if let Err(e) = r {
        let s = tonic::Status::from(e);
        let epoch = s.metadata().get(EPOCH_METADATA).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        rec[..4].copy_from_slice(&(s.code() as i32).to_le_bytes());
        rec[4] = u8::from(epoch.is_some());
        rec[8..16].copy_from_slice(&epoch.unwrap_or(0).to_le_bytes());
        let msg = s.message();
        let mut n = msg.len().min(STATUS_BYTES - 20);
        while n > 0 && !msg.is_char_boundary(n) {
            n -= 1;
        }
        rec[16..20].copy_from_slice(&(n as u32).to_le_bytes());
        rec[20..20 + n].copy_from_slice(&msg.as_bytes()[..n]);
    }
    out.extend_from_slice(&rec);
}

fn decode_status(rec: &[u8]) -> Result<()> {
    let code = i32::from_le_bytes(rec[..4].try_into().unwrap_or_default());
    if code == 0 {
        return Ok(());
    }
    let n = (u32::from_le_bytes(rec[16..20].try_into().unwrap_or_default()) as usize).min(STATUS_BYTES - 20);
    let msg = String::from_utf8_lossy(&rec[20..20 + n]).into_owned();
    let mut s = tonic::Status::new(tonic::Code::from_i32(code), msg);
    if rec[4] == 1 {
        let epoch = u64::from_le_bytes(rec[8..16].try_into().unwrap_or_default());
        if let Ok(v) = epoch.to_string().parse() {
            s.metadata_mut().insert(EPOCH_METADATA, v);
        }
    }
    Err(Error::from(s))
}

/// Idle back-off after `idle` empty rounds in a row (the same on every rank).
fn backoff(idle: u32) -> Duration {
    Duration::from_micros((20u64 << idle.min(5)).min(500))
}

fn engine<F: Fabric>(mut f: F, sh: Arc<Shared>, sink: Arc<dyn ComputeSink>) {
    let n = f.size();
    let mut idle = 0u32;
    // The round that failed: answered once the group is marked stopped, so a sender that sees
    // the failure also sees `stopped()`.
    let mut failed_round: Vec<Vec<Pending>> = Vec::new();
    let why = loop {
        let mut work: Vec<Vec<Pending>> = (0..n).map(|_| Vec::new()).collect();
        {
            let mut q = sh.queues.lock().unwrap_or_else(|p| p.into_inner());
            for (p, queue) in q.iter_mut().enumerate() {
                let mut bytes = 0;
                while let Some(front) = queue.front() {
                    if !work[p].is_empty() && bytes + front.out_bytes() > ROUND_BYTES {
                        break;
                    }
                    bytes += front.out_bytes();
                    work[p].extend(queue.pop_front());
                }
            }
        }
        let leaving = sh.leaving.load(Ordering::Relaxed);
        let taken: u64 = work.iter().map(|w| w.len() as u64).sum();
        *sh.round_started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let r = round(&mut f, &sh, &*sink, &work, leaving);
        *sh.round_started.lock().unwrap_or_else(|p| p.into_inner()) = None;
        sh.rounds.fetch_add(1, Ordering::Relaxed);
        match r {
            Err(e) => {
                failed_round = work;
                break Ending::Failed(format!("a round failed: {e}"));
            }
            Ok(Round { busy, leave_epoch }) => {
                sh.in_flight.fetch_sub(taken, Ordering::Relaxed);
                if leave_epoch != 0 {
                    break Ending::Left(leave_epoch);
                }
                if busy {
                    idle = 0;
                    sh.busy_rounds.fetch_add(1, Ordering::Relaxed);
                } else {
                    idle = idle.saturating_add(1);
                    let q = sh.queues.lock().unwrap_or_else(|p| p.into_inner());
                    if q.iter().all(VecDeque::is_empty) && sh.leaving.load(Ordering::Relaxed) == 0 {
                        let _ = sh.wake.wait_timeout(q, backoff(idle));
                    }
                }
            }
        }
    };
    tracing::info!(group = %sh.name, reason = %why, "group link stopped");
    let queued: Vec<Vec<Pending>> = {
        if let Ending::Left(e) = why {
            sh.left.store(true, Ordering::Relaxed);
            if e != u64::MAX {
                sh.replaced_by.store(e, Ordering::Relaxed);
            }
        }
        let mut dead = sh.dead.lock().unwrap_or_else(|p| p.into_inner());
        *dead = Some(why.to_string());
        let mut q = sh.queues.lock().unwrap_or_else(|p| p.into_inner());
        q.iter_mut().map(|d| d.drain(..).collect()).collect()
    };
    let mut all = failed_round;
    all.extend(queued);
    let n: u64 = all.iter().map(|w| w.len() as u64).sum();
    fail_all(all, &sh.name, &why);
    sh.in_flight.fetch_sub(n, Ordering::Relaxed);
}

/// Why a group ended.
enum Ending {
    /// A member left for placement epoch `e` (u64::MAX: it stopped).
    Left(u64),
    Failed(String),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Left(u64::MAX) => write!(f, "a member left the group"),
            Ending::Left(e) => write!(f, "a member left the group for placement epoch {e}"),
            Ending::Failed(why) => write!(f, "{why}"),
        }
    }
}

fn fail_all(work: Vec<Vec<Pending>>, name: &str, why: &Ending) {
    for p in work.into_iter().flatten() {
        let e = match why {
            Ending::Left(epoch) if *epoch != u64::MAX => {
                p.stats.cancelled_sends.fetch_add(1, Ordering::Relaxed);
                Error::NotHeld {
                    epoch: *epoch,
                    detail: format!("group {name} was replaced by placement epoch {epoch}"),
                }
            }
            Ending::Left(_) => {
                p.stats.cancelled_sends.fetch_add(1, Ordering::Relaxed);
                Error::LinkClosed(format!("group {name}: {why}"))
            }
            Ending::Failed(_) => {
                p.stats.failed_sends.fetch_add(1, Ordering::Relaxed);
                Error::Unavailable(format!("group {name}: {why}"))
            }
        };
        let _ = p.answer.send(Err(e));
    }
}

struct Round {
    busy: bool,
    /// The highest epoch a member leaves for this round (0: nobody leaves).
    leave_epoch: u64,
}

fn le_u64(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default())
}

fn round<F: Fabric>(
    f: &mut F,
    sh: &Shared,
    sink: &dyn ComputeSink,
    work: &[Vec<Pending>],
    leaving: u64,
) -> Result<Round> {
    let n = f.size();
    // 1. Headers: description bytes, row bytes, all I send, whether I leave.
    let mut metas = Vec::with_capacity(n);
    for w in work {
        let mut m = Vec::new();
        encode_meta(&w.iter().collect::<Vec<_>>(), &mut m);
        metas.push(m);
    }
    let data_len: Vec<usize> = work.iter().map(|w| w.iter().map(Pending::out_bytes).sum()).collect();
    let total: usize = metas.iter().map(Vec::len).sum::<usize>() + data_len.iter().sum::<usize>();
    let mut hdr_send = Vec::with_capacity(n);
    for p in 0..n {
        let mut h = Vec::with_capacity(HEADER_BYTES);
        for v in [metas[p].len() as u64, data_len[p] as u64, total as u64, leaving] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        hdr_send.push(f.upload(&h)?);
    }
    let got = f.exchange(&hdr_send, &vec![HEADER_BYTES; n], &vec![HEADER_BYTES; n])?;
    let mut hdr = Vec::with_capacity(n);
    for g in &got {
        hdr.push(f.download(g, 0, HEADER_BYTES)?);
    }
    let busy = hdr.iter().any(|h| le_u64(h, 2) > 0);
    // Leaving for a placement beats stopping: queued sends then go by the newer placement.
    let leaves: Vec<u64> = hdr.iter().map(|h| le_u64(h, 3)).filter(|&e| e != 0).collect();
    let leave_epoch = leaves.iter().copied().filter(|&e| e != u64::MAX).max().or(leaves.first().copied()).unwrap_or(0);
    if !busy {
        return Ok(Round { busy, leave_epoch });
    }
    // 2. Dispatch: descriptions then rows, to every rank.
    let mut sends = Vec::with_capacity(n);
    let mut send_bytes = Vec::with_capacity(n);
    for p in 0..n {
        let mut b = std::mem::take(&mut metas[p]);
        for w in &work[p] {
            b.extend_from_slice(&w.chunk.data);
        }
        send_bytes.push(b.len());
        sends.push(f.upload(&b)?);
    }
    let recv_bytes: Vec<usize> = hdr.iter().map(|h| (le_u64(h, 0) + le_u64(h, 1)) as usize).collect();
    let got = f.exchange(&sends, &send_bytes, &recv_bytes)?;
    drop(sends);
    for c in work.iter().flatten() {
        c.stats.payload_sent.fetch_add(c.out_bytes() as u64, Ordering::Relaxed);
        c.stats.bytes_sent.fetch_add((c.out_bytes() + 36 + 8 * c.chunk.experts.len()) as u64, Ordering::Relaxed);
    }
    // 3. Compute what came, and build the answers.
    let mut answers = Vec::with_capacity(n);
    let mut answer_bytes = Vec::with_capacity(n);
    for p in 0..n {
        let (meta_len, data_len) = (le_u64(&hdr[p], 0) as usize, le_u64(&hdr[p], 1) as usize);
        let chunks = decode_meta(&f.download(&got[p], 0, meta_len)?, data_len)
            .map_err(|e| Error::Internal(format!("from rank {p} of group {}: {e}", sh.name)))?;
        let mut status = Vec::with_capacity(chunks.len() * STATUS_BYTES);
        let mut parts = Vec::with_capacity(chunks.len() + 1);
        let mut off = meta_len;
        let mut bytes = 0;
        for c in &chunks {
            let len = c.data_bytes();
            let (h, rows) = (&c.header, c.row_count());
            let r = f
                .rows(&got[p], off, h.dtype, rows, h.hidden)
                .map_err(Error::from)
                .and_then(|x| sink.compute(h, &c.experts, &c.rows, &*x))
                .and_then(|y| {
                    if (y.dtype(), y.rows(), y.cols()) == (h.dtype, rows, h.hidden) {
                        Ok(y)
                    } else {
                        Err(Error::Internal(format!(
                            "the expert server answered [{}, {}] {} for [{rows}, {}] {}",
                            y.rows(),
                            y.cols(),
                            y.dtype().name(),
                            h.hidden,
                            h.dtype.name()
                        )))
                    }
                });
            match r {
                Ok(y) => {
                    encode_status(Ok(()), &mut status);
                    parts.push(Part::Rows(y));
                }
                Err(e) => {
                    tracing::debug!(group = %sh.name, from = p, request = h.request_id, chunk = c.index, error = %e, "chunk refused");
                    encode_status(Err(e), &mut status);
                    parts.push(Part::Host(vec![0u8; len]));
                }
            }
            off += len;
            bytes += STATUS_BYTES + len;
        }
        parts.insert(0, Part::Host(status));
        answers.push(f.join(parts)?);
        answer_bytes.push(bytes);
    }
    drop(got);
    // 4. Combine: statuses then rows, back to the senders.
    let expect: Vec<usize> = work.iter().map(|w| w.iter().map(|c| STATUS_BYTES + c.out_bytes()).sum()).collect();
    let back = f.exchange(&answers, &answer_bytes, &expect)?;
    drop(answers);
    for p in 0..n {
        if work[p].is_empty() {
            continue;
        }
        let b = f.download(&back[p], 0, expect[p])?;
        let k = work[p].len();
        let mut off = k * STATUS_BYTES;
        for (i, c) in work[p].iter().enumerate() {
            let len = c.out_bytes();
            let rows: u32 = c.chunk.rows.iter().sum();
            let a = decode_status(&b[i * STATUS_BYTES..(i + 1) * STATUS_BYTES]).map(|()| ChunkAnswer {
                chunk: c.chunk.index,
                rows,
                data: Bytes::copy_from_slice(&b[off..off + len]),
            });
            c.stats.payload_received.fetch_add(len as u64, Ordering::Relaxed);
            c.stats.bytes_received.fetch_add((len + STATUS_BYTES) as u64, Ordering::Relaxed);
            let _ = c.answer.send(a);
            off += len;
        }
    }
    Ok(Round { busy, leave_epoch })
}

#[cfg(test)]
mod tests;
