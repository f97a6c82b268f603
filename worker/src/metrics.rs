//! A worker's Prometheus metrics (`--metrics-listen`), rendered at scrape time from the state the
//! worker keeps anyway plus the histograms and error counts its services record here.

use std::sync::Arc;

use expertmesh_core::metrics::{names, Exposition, Histogram, Kind, LabeledCounter, LATENCY_BUCKETS};
use expertmesh_dispatcher::dispatcher::Dispatcher;

use crate::readiness::Readiness;
use crate::service::{Admission, ExpertStore};

/// Most per-expert series one worker exposes; past it, the rest add to `layer="other"`.
pub const MAX_EXPERT_SERIES: usize = 4096;

/// What the services record.
#[derive(Debug)]
pub struct WorkerMetrics {
    /// `MoeLayer.Forward`, arrival to answer.
    pub forward: Histogram,
    /// Errors answered, by service and gRPC code.
    pub errors: LabeledCounter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self { forward: Histogram::new(&LATENCY_BUCKETS), errors: LabeledCounter::new(64) }
    }
}

impl WorkerMetrics {
    pub fn error(&self, service: &str, s: &tonic::Status) {
        self.errors.add(&[service, &format!("{:?}", s.code())], 1);
    }
}

/// Everything a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub metrics: Arc<WorkerMetrics>,
    pub store: Arc<ExpertStore>,
    pub dispatcher: Arc<Dispatcher>,
    pub admission: Arc<Admission>,
    pub readiness: Arc<Readiness>,
    pub progress: Arc<crate::progress::Progress>,
    /// The worker's NCCL group links (GPU workers of a build with `nccl`).
    pub links: Option<Arc<crate::links::Links>>,
}

fn b(v: bool) -> f64 {
    if v {
        1.0
    } else {
        0.0
    }
}

/// The exposition text now.
pub fn render(s: &Sources) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut e = Exposition::new();
    let (expert_ok, moe_ok) = s.readiness.serving();
    e.single(names::PLACEMENT_EPOCH, Kind::Gauge, "Placement epoch the worker serves", s.store.epoch() as f64);
    e.single(names::LEASE_HELD, Kind::Gauge, "1 while the worker holds its lease", b(!s.readiness.lease_lost()));
    e.family(
        names::SERVING,
        Kind::Gauge,
        "1 while the service reports SERVING to gRPC health",
        &["service"],
        [
            (vec![expertmesh_proto::EXPERT_SERVICE.into()], b(expert_ok)),
            (vec![expertmesh_proto::MOE_LAYER_SERVICE.into()], b(moe_ok)),
        ],
    );
    e.single(
        names::RESIDENT_BYTES,
        Kind::Gauge,
        "Bytes the backend holds for the worker's experts (their checkpoint dtype)",
        s.store.resident_bytes() as f64,
    );
    e.single(
        names::PROCESS_RESIDENT_BYTES,
        Kind::Gauge,
        "Resident set of the process",
        crate::node::rss_bytes() as f64,
    );
    let p = s.progress.snapshot();
    e.single(
        names::LOAD_DONE_BYTES,
        Kind::Gauge,
        "Checkpoint bytes read so far by the load in progress (0 when not loading)",
        p.done as f64,
    );
    e.single(
        names::LOAD_TOTAL_BYTES,
        Kind::Gauge,
        "Checkpoint bytes the load in progress reads (0 when not loading)",
        p.total as f64,
    );
    e.single(
        names::EXPERTS_HELD,
        Kind::Gauge,
        "Experts the worker holds, over all layers",
        s.store.held().len() as f64,
    );
    // Per expert, busiest first, bounded.
    let mut loads = s.store.counters();
    loads.sort_by(|a, b| b.tokens.cmp(&a.tokens).then((a.layer, a.expert).cmp(&(b.layer, b.expert))));
    let rest: u64 = loads.iter().skip(MAX_EXPERT_SERIES).map(|l| l.tokens).sum();
    let mut series: Vec<(Vec<String>, f64)> = loads
        .iter()
        .take(MAX_EXPERT_SERIES)
        .map(|l| (vec![l.layer.to_string(), l.expert.to_string()], l.tokens as f64))
        .collect();
    series.sort_by(|a, b| a.0.cmp(&b.0));
    if loads.len() > MAX_EXPERT_SERIES {
        series.push((vec!["other".into(), "other".into()], rest as f64));
    }
    e.family(
        names::EXPERT_ROWS_TOTAL,
        Kind::Counter,
        "Routed rows computed, per expert held",
        &["layer", "expert"],
        series,
    );
    if let Some(l) = &s.links {
        let groups: Vec<(Vec<String>, (u64, u64))> = l
            .groups()
            .iter()
            .map(|g| (vec![g.group().name.clone(), g.group().epoch.to_string()], g.rounds()))
            .collect();
        e.family(
            names::GROUP_ROUNDS_TOTAL,
            Kind::Counter,
            "Rounds of the worker's NCCL group link (each an exchange among all members), per group and epoch",
            &["group", "epoch"],
            groups.iter().map(|(k, r)| (k.clone(), r.0 as f64)),
        );
        e.family(
            names::GROUP_BUSY_ROUNDS_TOTAL,
            Kind::Counter,
            "Rounds of the worker's NCCL group link that moved rows, per group and epoch",
            &["group", "epoch"],
            groups.iter().map(|(k, r)| (k.clone(), r.1 as f64)),
        );
    }
    let d = s.dispatcher.dispatched();
    e.family(
        names::DISPATCHED_TOKENS_TOTAL,
        Kind::Counter,
        "Tokens this worker's dispatcher sent through a layer (MoeLayer.Forward)",
        &["layer"],
        d.iter().map(|&(l, t, _)| (vec![l.to_string()], t as f64)),
    );
    e.family(
        names::DISPATCHED_ROWS_TOTAL,
        Kind::Counter,
        "Routed rows (token, expert pairs) this worker's dispatcher sent through a layer",
        &["layer"],
        d.iter().map(|&(l, _, r)| (vec![l.to_string()], r as f64)),
    );
    let w = s.dispatcher.stats();
    e.family(
        names::DISPATCHED_BYTES_TOTAL,
        Kind::Counter,
        "Bytes this worker's dispatcher put on and took off the wire (gRPC messages)",
        &["direction"],
        [
            (vec!["sent".into()], w.bytes_sent.load(Relaxed) as f64),
            (vec!["received".into()], w.bytes_received.load(Relaxed) as f64),
        ],
    );
    e.single(
        names::HEDGES_TOTAL,
        Kind::Counter,
        "Sends re-sent to a replica after a silence",
        w.hedges.load(Relaxed) as f64,
    );
    e.histograms(
        names::FORWARD_SECONDS,
        "MoeLayer.Forward on this worker, arrival to answer",
        &[],
        [(vec![], &s.metrics.forward)],
    );
    e.histograms(
        names::COMPUTE_SECONDS,
        "One chunk of expert rows, queued to computed (gRPC and NCCL)",
        &[],
        [(vec![], s.store.compute_seconds())],
    );
    e.family(
        names::ERRORS_TOTAL,
        Kind::Counter,
        "Errors answered, by service and gRPC code",
        &["service", "code"],
        s.metrics.errors.snapshot().into_iter().map(|(k, v)| (k, v as f64)),
    );
    let (unauth, denied) = expertmesh_trust::authz::refusals();
    e.family(
        names::REFUSED_TOTAL,
        Kind::Counter,
        "Calls and connections refused, by reason",
        &["reason"],
        [
            (vec!["unauthenticated".into()], unauth as f64),
            (vec!["permission_denied".into()], denied as f64),
            (vec!["resource_exhausted".into()], s.admission.refused_total() as f64),
            (vec!["connection_limit".into()], s.admission.conns.refused() as f64),
        ],
    );
    e.single(
        names::CONNECTIONS_OPEN,
        Kind::Gauge,
        "Open connections to the worker's gRPC port",
        s.admission.conns.open() as f64,
    );
    e.finish()
}
