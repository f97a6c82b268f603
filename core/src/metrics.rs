//! Prometheus metrics without a dependency: histograms and bounded label maps that servers
//! update as they work, and a writer for the text exposition format (version 0.0.4) that
//! servers fill at scrape time from these and from the counters they already keep.
//!
//! Names follow `expertmesh_{name}_{unit}`: `_total` for counters, `_seconds` and `_bytes` for
//! units; labels are few and bounded (see [`names`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Every metric name, in one place.
pub mod names {
    // Worker
    pub const PLACEMENT_EPOCH: &str = "expertmesh_placement_epoch";
    pub const PLACEMENT_PENDING_EPOCH: &str = "expertmesh_placement_pending_epoch";
    pub const LEASE_HELD: &str = "expertmesh_lease_held";
    pub const SERVING: &str = "expertmesh_serving";
    pub const RESIDENT_BYTES: &str = "expertmesh_resident_bytes";
    pub const PROCESS_RESIDENT_BYTES: &str = "expertmesh_process_resident_bytes";
    pub const EXPERTS_HELD: &str = "expertmesh_experts_held";
    pub const LOAD_DONE_BYTES: &str = "expertmesh_load_done_bytes";
    pub const LOAD_TOTAL_BYTES: &str = "expertmesh_load_total_bytes";
    pub const EXPERT_ROWS_TOTAL: &str = "expertmesh_expert_rows_total";
    pub const DISPATCHED_TOKENS_TOTAL: &str = "expertmesh_dispatched_tokens_total";
    pub const DISPATCHED_ROWS_TOTAL: &str = "expertmesh_dispatched_rows_total";
    pub const DISPATCHED_BYTES_TOTAL: &str = "expertmesh_dispatched_bytes_total";
    pub const HEDGES_TOTAL: &str = "expertmesh_hedges_total";
    pub const FORWARD_SECONDS: &str = "expertmesh_forward_duration_seconds";
    pub const COMPUTE_SECONDS: &str = "expertmesh_compute_duration_seconds";
    pub const ERRORS_TOTAL: &str = "expertmesh_errors_total";
    pub const REFUSED_TOTAL: &str = "expertmesh_refused_calls_total";
    pub const CONNECTIONS_OPEN: &str = "expertmesh_connections_open";
    pub const GROUP_ROUNDS_TOTAL: &str = "expertmesh_group_rounds_total";
    pub const GROUP_BUSY_ROUNDS_TOTAL: &str = "expertmesh_group_busy_rounds_total";
    // Coordinator
    pub const LEADER: &str = "expertmesh_leader";
    pub const STORE_REACHABLE: &str = "expertmesh_store_reachable";
    pub const WORKERS: &str = "expertmesh_workers";
    pub const PLACEMENT_IMBALANCE: &str = "expertmesh_placement_imbalance";
    pub const REBALANCES_TOTAL: &str = "expertmesh_rebalances_total";
}

/// Latency buckets, seconds: 100 µs to 60 s.
pub const LATENCY_BUCKETS: [f64; 16] =
    [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0];

/// A histogram with fixed buckets, updated without locks.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations, f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0) }
    }

    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

/// Counters by label values, at most `max` series; past that, new label sets add to one
/// series whose every label is `other` (so a peer cannot grow the exposition without bound).
#[derive(Debug)]
pub struct LabeledCounter {
    max: usize,
    series: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl LabeledCounter {
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), series: Mutex::new(BTreeMap::new()) }
    }

    pub fn add(&self, labels: &[&str], n: u64) {
        let Ok(mut m) = self.series.lock() else { return };
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let key =
            if m.contains_key(&key) || m.len() < self.max { key } else { vec!["other".to_string(); labels.len()] };
        let v = m.entry(key).or_default();
        *v = v.saturating_add(n);
    }

    /// Every series: label values and count.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        self.series.lock().map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default()
    }
}

/// Metric kinds of the exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Writes the text exposition format: one `# HELP` and `# TYPE` per metric, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels_text(names: &[&str], values: &[String], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
    if let Some((n, v)) = extra {
        parts.push(format!("{n}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn num(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', " "));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One metric without labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, v: f64) -> &mut Self {
        self.family(name, kind, help, &[], [(Vec::new(), v)])
    }

    /// One metric with labels `label_names`, one sample per label value set.
    pub fn family(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label_names: &[&str],
        samples: impl IntoIterator<Item = (Vec<String>, f64)>,
    ) -> &mut Self {
        self.head(name, if kind == Kind::Counter { "counter" } else { "gauge" }, help);
        for (values, v) in samples {
            let _ = writeln!(self.out, "{name}{} {}", labels_text(label_names, &values, None), num(v));
        }
        self
    }

    /// A histogram (cumulative `_bucket`s with `le`, `_sum`, `_count`), one per label set.
    pub fn histograms<'h>(
        &mut self,
        name: &str,
        help: &str,
        label_names: &[&str],
        hs: impl IntoIterator<Item = (Vec<String>, &'h Histogram)>,
    ) -> &mut Self {
        self.head(name, "histogram", help);
        for (values, h) in hs {
            let mut cum = 0u64;
            for (i, c) in h.counts.iter().enumerate() {
                cum += c.load(Ordering::Relaxed);
                let le = h.bounds.get(i).copied().unwrap_or(f64::INFINITY);
                let _ = writeln!(
                    self.out,
                    "{name}_bucket{} {cum}",
                    labels_text(label_names, &values, Some(("le", num(le))))
                );
            }
            let l = labels_text(label_names, &values, None);
            let _ = writeln!(self.out, "{name}_sum{l} {}", num(h.sum()));
            let _ = writeln!(self.out, "{name}_count{l} {cum}");
        }
        self
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.out)
    }
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Progress of long work for people: "1.20 of 4.00 GiB (30%), 150 MiB/s, about 19 s left".
pub fn progress_text(done: u64, total: u64, rate: f64) -> String {
    let pct = if total > 0 { 100.0 * done as f64 / total as f64 } else { 0.0 };
    let left = if rate > 0.0 && total > done {
        format!(", about {:.0} s left", (total - done) as f64 / rate)
    } else {
        String::new()
    };
    format!("{:.2} of {:.2} GiB ({pct:.0}%), {:.0} MiB/s{left}", done as f64 / GIB, total as f64 / GIB, rate / MIB)
}

/// A text bar for a terminal: `[#########...........]  45%`.
pub fn progress_bar(done: u64, total: u64, width: usize) -> String {
    let f = if total > 0 { (done as f64 / total as f64).clamp(0.0, 1.0) } else { 0.0 };
    let n = (f * width as f64).round() as usize;
    format!("[{}{}] {:>3.0}%", "#".repeat(n), ".".repeat(width - n), f * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_a_person_wants() {
        assert_eq!(
            progress_text(3 << 30, 4 << 30, (100u64 << 20) as f64),
            "3.00 of 4.00 GiB (75%), 100 MiB/s, about 10 s left"
        );
        assert_eq!(progress_bar(1, 4, 8), "[##......]  25%");
    }

    #[test]
    fn histograms_are_cumulative_and_text_is_well_formed() {
        static B: [f64; 3] = [0.1, 1.0, 10.0];
        let h = Histogram::new(&B);
        for v in [0.05, 0.5, 0.5, 5.0, 50.0] {
            h.observe(v);
        }
        assert_eq!(h.count(), 5);
        assert!((h.sum() - 56.05).abs() < 1e-9);
        let mut e = Exposition::new();
        e.histograms("x_seconds", "a \"quoted\" help", &["svc"], [(vec!["a\"b".to_string()], &h)]);
        e.single("y_total", Kind::Counter, "y", 3.0);
        let t = e.finish();
        assert!(t.contains("x_seconds_bucket{svc=\"a\\\"b\",le=\"0.1\"} 1\n"), "{t}");
        assert!(t.contains("x_seconds_bucket{svc=\"a\\\"b\",le=\"1\"} 3\n"), "{t}");
        assert!(t.contains("x_seconds_bucket{svc=\"a\\\"b\",le=\"+Inf\"} 5\n"), "{t}");
        assert!(t.contains("x_seconds_count{svc=\"a\\\"b\"} 5\n"), "{t}");
        assert!(t.contains("# TYPE y_total counter\ny_total 3\n"), "{t}");
    }

    #[test]
    fn labeled_counters_stay_bounded() {
        let c = LabeledCounter::new(2);
        c.add(&["a"], 1);
        c.add(&["b"], 1);
        c.add(&["c"], 5);
        c.add(&["d"], 1);
        c.add(&["a"], 1);
        let s = c.snapshot();
        assert_eq!(s.len(), 3);
        assert!(s.contains(&(vec!["other".to_string()], 6)));
        assert!(s.contains(&(vec!["a".to_string()], 2)));
    }
}
