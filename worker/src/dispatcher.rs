//! The dispatcher: the token owner's side of distributed expert parallelism. Gate, choose a
//! replica for every routed pair under the committed placement, pack one chunked stream per
//! destination (rows grouped by expert), send all destinations concurrently, and combine in a
//! fixed order. Chunks a worker did not answer (it lost the expert, or died) are retried on the
//! owner a newer placement names, so every pair is computed exactly once or the request fails
//! with a clear error naming the experts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use expertmesh_core::dtype::{decode_f32, encode_f32, DType};
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{ExpertBatch, PlacementPlan, WorkerInfo};
use prost::Message;
use tokio::sync::{watch, Mutex};
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use crate::error::{Result, WorkerError};
use crate::moe::{combine, shared_expert, ExpertGroups, Frontend, MoeInput, MoeOutput};
use crate::wire::dtype_to_proto;

/// The committed placement in the form the hot path reads.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub epoch: u64,
    pub workers: Vec<WorkerInfo>,
    /// layer -> expert -> replica worker indices.
    pub layers: HashMap<u32, Vec<Vec<u32>>>,
}

impl RouteTable {
    pub fn from_plan(p: &PlacementPlan) -> Self {
        Self {
            epoch: p.epoch,
            workers: p.workers.clone(),
            layers: p.layers.iter().map(|l| (l.layer, l.experts.iter().map(|r| r.workers.clone()).collect())).collect(),
        }
    }
}

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Target payload of one chunk on the wire.
    pub chunk_bytes: usize,
    pub max_message_bytes: usize,
    /// How long a request waits for a (newer) placement before failing UNAVAILABLE.
    pub placement_wait: Duration,
    /// A destination that answers nothing for this long is treated as failed: its unanswered
    /// rows go to the owner a newer placement names.
    pub rpc_timeout: Duration,
    pub retries: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 2 << 20,
            max_message_bytes: 64 << 20,
            placement_wait: Duration::from_secs(20),
            rpc_timeout: Duration::from_secs(30),
            retries: 3,
        }
    }
}

/// Bytes this dispatcher put on and took off the wire: gRPC messages (protobuf + the 5-byte
/// gRPC prefix), HTTP/2 frame headers excluded.
#[derive(Debug, Default)]
pub struct WireStats {
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub payload_sent: AtomicU64,
    pub payload_received: AtomicU64,
}

/// Rows routed to one expert: (expert, pair indices).
pub type Segment = (u32, Vec<u32>);
/// The watch a dispatcher routes by: the latest committed placement, if any.
pub type RouteTableRx = watch::Receiver<Option<Arc<RouteTable>>>;
pub type RouteTableTx = watch::Sender<Option<Arc<RouteTable>>>;

/// One chunk of one destination's stream.
#[derive(Debug, Clone)]
struct Chunk {
    /// (expert, pairs) segments in order.
    segs: Vec<Segment>,
}

impl Chunk {
    fn rows(&self) -> usize {
        self.segs.iter().map(|s| s.1.len()).sum()
    }
}

fn plan_chunks(segs: Vec<Segment>, rows_per_chunk: usize) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut cur = Chunk { segs: Vec::new() };
    let mut room = rows_per_chunk;
    for (e, pairs) in segs {
        let mut rest = pairs.as_slice();
        while !rest.is_empty() {
            let n = rest.len().min(room);
            cur.segs.push((e, rest[..n].to_vec()));
            rest = &rest[n..];
            room -= n;
            if room == 0 {
                chunks.push(std::mem::replace(&mut cur, Chunk { segs: Vec::new() }));
                room = rows_per_chunk;
            }
        }
    }
    if !cur.segs.is_empty() {
        chunks.push(cur);
    }
    chunks
}

/// What one destination answered, and what it did not.
#[derive(Debug)]
struct Outcome {
    answered: Vec<(Vec<u32>, Vec<f32>)>,
    failed: Option<(WorkerError, Vec<Segment>)>,
}

/// Routes MoE layers across the cluster.
#[derive(Debug)]
pub struct Dispatcher {
    front: Frontend,
    table: RouteTableRx,
    clients: Mutex<HashMap<String, ExpertServiceClient<Channel>>>,
    cfg: DispatcherConfig,
    stats: WireStats,
    next_id: AtomicU64,
    /// Where to send the ids of workers this dispatcher could not reach.
    unreachable: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Dispatcher {
    /// Send the id of every worker a request could not reach (not one that refused an expert
    /// it no longer holds) to `tx`, for the control plane to check.
    pub fn report_unreachable_to(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        let _ = self.unreachable.set(tx);
    }

    pub fn new(front: Frontend, table: RouteTableRx, cfg: DispatcherConfig) -> Self {
        Self {
            front,
            table,
            clients: Mutex::new(HashMap::new()),
            cfg,
            stats: WireStats::default(),
            next_id: AtomicU64::new(1),
            unreachable: std::sync::OnceLock::new(),
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        self.front.spec()
    }

    pub fn frontend(&self) -> &Frontend {
        &self.front
    }

    pub fn stats(&self) -> &WireStats {
        &self.stats
    }

    /// The committed placement, waiting (bounded) for one newer than `after` if asked.
    pub async fn route_table(&self, after: Option<u64>) -> Result<Arc<RouteTable>> {
        let mut rx = self.table.clone();
        let ok = |t: &Option<Arc<RouteTable>>| t.as_ref().is_some_and(|t| after.is_none_or(|a| t.epoch > a));
        let wait = tokio::time::timeout(self.cfg.placement_wait, rx.wait_for(ok)).await;
        match wait {
            Ok(Ok(t)) => Ok(t.clone().expect("checked by wait_for")),
            Ok(Err(_)) => Err(WorkerError::Unavailable("placement watch closed".into())),
            Err(_) => Err(WorkerError::Unavailable(match after {
                None => format!(
                    "no placement committed within {:?} (`expertmesh status` shows workers that cannot load their experts)",
                    self.cfg.placement_wait
                ),
                Some(e) => format!("no placement newer than epoch {e} within {:?}", self.cfg.placement_wait),
            })),
        }
    }

    async fn client(&self, addr: &str) -> Result<ExpertServiceClient<Channel>> {
        let mut g = self.clients.lock().await;
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| WorkerError::InvalidInput(format!("worker address `{addr}`: {e}")))?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let c = ExpertServiceClient::new(ch)
            .max_decoding_message_size(self.cfg.max_message_bytes)
            .max_encoding_message_size(self.cfg.max_message_bytes);
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// One MoE block across the cluster.
    pub async fn forward(&self, inp: MoeInput, wire: DType) -> Result<MoeOutput> {
        if !matches!(wire, DType::BF16 | DType::F32) {
            return Err(WorkerError::InvalidInput(format!("wire dtype {}; expected bf16 or f32", wire.name())));
        }
        self.front.validate(&inp)?;
        let spec = self.front.spec().clone();
        let (h, k) = (spec.hidden, spec.top_k);
        let inp = Arc::new(inp);
        let front = self.front.layer(inp.layer).await?;
        let routing = self.front.gate(&front, &inp).await?;
        // The shared expert runs on the compute pool while the routed rows are on the wire.
        let shared = tokio::spawn(shared_expert(front.clone(), inp.clone()));
        let groups = ExpertGroups::new(&routing, spec.n_routed);
        let mut todo: Vec<Segment> =
            groups.pairs.into_iter().enumerate().filter(|(_, p)| !p.is_empty()).map(|(e, p)| (e as u32, p)).collect();
        let rid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut y = vec![0f32; inp.tokens * k * h];
        let mut after = None;
        let mut epoch = 0;
        // Workers that failed this request: their rows go to another replica at once, or wait
        // for a placement that no longer names them.
        let mut bad: HashSet<String> = HashSet::new();
        // A worker answered "not held": this placement is behind the workers'.
        let mut stale = false;
        for attempt in 0..=self.cfg.retries {
            let table = self.route_table(after).await.map_err(|e| {
                let why = match e {
                    WorkerError::Unavailable(m) => m,
                    other => other.to_string(),
                };
                missing(&todo, inp.layer, &why)
            })?;
            if table.epoch != epoch {
                // A newer plan was made after the failures were reported (and the leader checked
                // them): a worker it still names gets another chance.
                bad.clear();
                stale = false;
            }
            epoch = table.epoch;
            let placed = table.layers.get(&(inp.layer as u32)).ok_or_else(|| {
                WorkerError::Unavailable(format!("placement epoch {} does not place layer {}", table.epoch, inp.layer))
            })?;
            let mut dests: BTreeMap<u32, Vec<Segment>> = BTreeMap::new();
            let mut blocked: Vec<Segment> = Vec::new();
            for (e, pairs) in std::mem::take(&mut todo) {
                let reps = placed.get(e as usize).filter(|r| !r.is_empty()).ok_or_else(|| {
                    WorkerError::Unavailable(format!(
                        "placement epoch {} has no worker for layer {} expert {e}",
                        table.epoch, inp.layer
                    ))
                })?;
                let live: Vec<u32> = reps
                    .iter()
                    .copied()
                    .filter(|w| table.workers.get(*w as usize).is_some_and(|i| !bad.contains(&i.address)))
                    .collect();
                if live.is_empty() {
                    blocked.push((e, pairs));
                    continue;
                }
                // Spread an expert's rows over its live replicas in contiguous parts.
                let n = live.len();
                let per = pairs.len().div_ceil(n);
                for (i, part) in pairs.chunks(per.max(1)).enumerate() {
                    let w = live[(i + rid as usize + e as usize) % n];
                    dests.entry(w).or_default().push((e, part.to_vec()));
                }
            }
            let targets: Vec<u32> = dests.keys().copied().collect();
            let sends = dests.into_iter().map(|(w, segs)| {
                let table = table.clone();
                let inp = inp.clone();
                async move { self.send_to(&table, w, &inp, wire, segs, rid).await }
            });
            let outcomes = futures::future::join_all(sends).await;
            let mut last_err = None;
            for (w, o) in targets.into_iter().zip(outcomes) {
                for (pairs, rows) in o.answered {
                    for (i, p) in pairs.iter().enumerate() {
                        let p = *p as usize;
                        y[p * h..(p + 1) * h].copy_from_slice(&rows[i * h..(i + 1) * h]);
                    }
                }
                if let Some((err, rest)) = o.failed {
                    if let WorkerError::InvalidInput(_) = err {
                        return Err(err);
                    }
                    warn!(request = rid, epoch = table.epoch, attempt, error = %err, "destination failed; will retry its rows on another replica or a newer placement");
                    if let WorkerError::NotHeld { .. } = err {
                        // Alive, but the placement moved on: wait for the epoch that names the new owner.
                        stale = true;
                    } else if let Some(i) = table.workers.get(w as usize) {
                        bad.insert(i.address.clone());
                        if let Some(tx) = self.unreachable.get() {
                            let _ = tx.send(i.worker_id.clone());
                        }
                    }
                    todo.extend(rest);
                    last_err = Some(err);
                }
            }
            let waiting = !blocked.is_empty();
            todo.extend(blocked);
            if todo.is_empty() {
                break;
            }
            if attempt == self.cfg.retries {
                let e = last_err.map(|e| e.to_string()).unwrap_or_else(|| "every replica failed".into());
                return Err(missing(&todo, inp.layer, &e));
            }
            // Rows with a live replica left go again on this placement; otherwise wait for a newer one.
            let all_live = todo.iter().all(|(e, _)| {
                placed.get(*e as usize).is_some_and(|r| {
                    r.iter().any(|w| table.workers.get(*w as usize).is_some_and(|i| !bad.contains(&i.address)))
                })
            });
            after = if all_live && !waiting && !stale { None } else { Some(table.epoch) };
        }
        let shared = shared.await.map_err(|e| WorkerError::Internal(format!("shared expert task: {e}")))??;
        let output = combine(h, &routing, &y, shared.as_deref());
        Ok(MoeOutput { output, routing, epoch })
    }

    async fn send_to(
        &self,
        table: &RouteTable,
        w: u32,
        inp: &Arc<MoeInput>,
        wire: DType,
        segs: Vec<Segment>,
        rid: u64,
    ) -> Outcome {
        let h = self.front.spec().hidden;
        let k = self.front.spec().top_k;
        let rows_per_chunk = (self.cfg.chunk_bytes / (h * wire.size())).max(1);
        let chunks = Arc::new(plan_chunks(segs, rows_per_chunk));
        let fail = |err: WorkerError, from: usize| Outcome {
            answered: Vec::new(),
            failed: Some((err, chunks[from..].iter().flat_map(|c| c.segs.clone()).collect())),
        };
        let Some(worker) = table.workers.get(w as usize) else {
            return fail(
                WorkerError::Internal(format!("placement names worker index {w} of {}", table.workers.len())),
                0,
            );
        };
        let mut client = match self.client(&worker.address).await {
            Ok(c) => c,
            Err(e) => return fail(e, 0),
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<ExpertBatch>(2);
        let producer = {
            let (chunks, inp) = (chunks.clone(), inp.clone());
            let (layer, epoch) = (inp.layer as u32, table.epoch);
            tokio::spawn(async move {
                let mut sent = (0u64, 0u64);
                let mut rows = Vec::new();
                for (i, c) in chunks.iter().enumerate() {
                    rows.clear();
                    for (_, pairs) in &c.segs {
                        crate::moe::gather_rows(&inp.hidden_states, h, k, pairs, &mut rows);
                    }
                    let mut data = Vec::new();
                    if encode_f32(wire, &rows, &mut data).is_err() {
                        break;
                    }
                    let b = ExpertBatch {
                        request_id: rid,
                        epoch,
                        layer,
                        dtype: dtype_to_proto(wire),
                        hidden: h as u32,
                        experts: c.segs.iter().map(|s| s.0).collect(),
                        rows: c.segs.iter().map(|s| s.1.len() as u32).collect(),
                        data: Bytes::from(data),
                        chunk: i as u32,
                    };
                    sent.0 += b.encoded_len() as u64 + 5;
                    sent.1 += b.data.len() as u64;
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
                sent
            })
        };
        let mut answered = Vec::with_capacity(chunks.len());
        let result: Result<()> = async {
            let silent = || {
                WorkerError::Unavailable(format!(
                    "worker {} ({}) answered nothing for {:?}",
                    worker.worker_id, worker.address, self.cfg.rpc_timeout
                ))
            };
            let call = client.compute(tokio_stream::wrappers::ReceiverStream::new(rx));
            let mut resp = tokio::time::timeout(self.cfg.rpc_timeout, call).await.map_err(|_| silent())??.into_inner();
            while answered.len() < chunks.len() {
                let next = tokio::time::timeout(self.cfg.rpc_timeout, resp.message()).await.map_err(|_| silent())?;
                let Some(r) = next? else {
                    return Err(WorkerError::Unavailable(format!(
                        "worker {} closed the stream after {} of {} chunks",
                        worker.worker_id,
                        answered.len(),
                        chunks.len()
                    )));
                };
                let c = &chunks[answered.len()];
                if r.chunk as usize != answered.len() || r.rows as usize != c.rows() {
                    return Err(WorkerError::Internal(format!(
                        "worker {} answered chunk {} with {} rows; expected chunk {} with {}",
                        worker.worker_id,
                        r.chunk,
                        r.rows,
                        answered.len(),
                        c.rows()
                    )));
                }
                self.stats.bytes_received.fetch_add(r.encoded_len() as u64 + 5, Ordering::Relaxed);
                self.stats.payload_received.fetch_add(r.data.len() as u64, Ordering::Relaxed);
                let mut vals = vec![0f32; c.rows() * h];
                decode_f32(wire, &r.data, &mut vals)?;
                let pairs: Vec<u32> = c.segs.iter().flat_map(|s| s.1.iter().copied()).collect();
                answered.push((pairs, vals));
            }
            Ok(())
        }
        .await;
        if let Ok((b, p)) = producer.await {
            self.stats.bytes_sent.fetch_add(b, Ordering::Relaxed);
            self.stats.payload_sent.fetch_add(p, Ordering::Relaxed);
        }
        debug!(request = rid, worker = %worker.worker_id, chunks = chunks.len(), ok = result.is_ok(), "destination done");
        let n = answered.len();
        match result {
            Ok(()) => Outcome { answered, failed: None },
            Err(e) => {
                let e = match e {
                    WorkerError::Rpc(s) if s.code() == tonic::Code::InvalidArgument => {
                        WorkerError::InvalidInput(s.message().to_string())
                    }
                    other => other,
                };
                Outcome { answered, failed: Some((e, chunks[n..].iter().flat_map(|c| c.segs.clone()).collect())) }
            }
        }
    }
}

fn missing(todo: &[(u32, Vec<u32>)], layer: usize, why: &str) -> WorkerError {
    let mut experts: Vec<u32> = todo.iter().map(|s| s.0).collect();
    experts.sort();
    experts.dedup();
    WorkerError::Unavailable(format!("layer {layer} experts {experts:?} could not be computed: {why}"))
}

/// A watch of route tables fed from a coordinator's committed placements.
pub fn route_table_channel() -> (RouteTableTx, RouteTableRx) {
    watch::channel(None)
}
