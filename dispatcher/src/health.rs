//! What a dispatcher knows about each destination, across requests: how long its answers take
//! (so a silent one is noticed after a budget derived from its own history, not a fixed
//! timeout), whether it is suspect (failed, or went silent), and a throttle on speculative
//! hedges. A suspect destination gets no new rows while a live replica exists; a background
//! probe (the transport's, for gRPC the worker's health service) clears the suspicion when it answers again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info};

use crate::transport::ExpertTransport;

/// Hedging knobs (flags of `expertmesh worker`).
#[derive(Debug, Clone)]
pub struct HedgeConfig {
    /// Never hedge sooner than this after a destination's last answer (`--hedge-min-ms`).
    pub min: Duration,
    /// Budget before a destination has answered a few chunks (connection setup included).
    pub initial: Duration,
    /// Never wait longer than this on a silent destination (`--rpc-timeout-ms`).
    pub cap: Duration,
    /// At most this many speculative hedges per answered send, over time (a token bucket).
    pub ratio: f64,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(20),
            initial: Duration::from_secs(1),
            cap: Duration::from_secs(5),
            ratio: 0.1,
        }
    }
}

/// The time between a destination's answers, smoothed as TCP smooths round trips (RFC 6298:
/// `srtt`, `rttvar`), and per row, so that a large chunk is given the time it needs.
#[derive(Debug, Clone, Default)]
pub struct LatencyEstimate {
    srtt: f64,
    rttvar: f64,
    per_row: f64,
    samples: u64,
}

impl LatencyEstimate {
    /// Samples needed before the estimate replaces the initial budget.
    const WARM: u64 = 3;

    /// One answer of `rows` rows came `gap` after the previous event of its stream.
    pub fn observe(&mut self, gap: Duration, rows: usize) {
        let r = gap.as_secs_f64();
        let pr = r / rows.max(1) as f64;
        if self.samples == 0 {
            self.srtt = r;
            self.rttvar = r / 2.0;
            self.per_row = pr;
        } else {
            self.rttvar = 0.75 * self.rttvar + 0.25 * (self.srtt - r).abs();
            self.srtt = 0.875 * self.srtt + 0.125 * r;
            self.per_row = 0.875 * self.per_row + 0.125 * pr;
        }
        self.samples += 1;
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Smoothed gap between answers.
    pub fn typical(&self) -> Duration {
        Duration::from_secs_f64(self.srtt)
    }

    /// How long the destination may stay silent on a chunk of `rows` rows: TCP's retransmission
    /// timeout `srtt + 4 rttvar`, or twice the per-row time of `rows` if that is longer (a chunk
    /// larger than usual), within [min, cap]. Spurious hedges this lets through are capped by
    /// the [`HedgeThrottle`].
    pub fn budget(&self, rows: usize, cfg: &HedgeConfig) -> Duration {
        if self.samples < Self::WARM {
            return cfg.initial.clamp(cfg.min.min(cfg.cap), cfg.cap);
        }
        let typical = self.srtt + 4.0 * self.rttvar;
        let scaled = 2.0 * self.per_row * rows as f64;
        let b = typical.max(scaled);
        Duration::from_secs_f64(b.clamp(cfg.min.as_secs_f64(), cfg.cap.as_secs_f64().max(cfg.min.as_secs_f64())))
    }
}

/// A token bucket (as gRPC's retry throttling): every answered send adds `ratio` tokens, every
/// speculative hedge takes one; no hedge without a whole token. Keeps a slow cluster from
/// doubling its own load.
#[derive(Debug, Clone)]
pub struct HedgeThrottle {
    /// In thousandths of a token.
    milli: u32,
    max: u32,
    per_success: u32,
}

impl HedgeThrottle {
    pub fn new(ratio: f64) -> Self {
        let per_success = (ratio.clamp(0.0, 1.0) * 1000.0).round() as u32;
        Self { milli: 10_000, max: 10_000, per_success }
    }

    pub fn on_success(&mut self) {
        self.milli = (self.milli + self.per_success).min(self.max);
    }

    /// Take a token for one hedge, if there is one.
    pub fn try_hedge(&mut self) -> bool {
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Default)]
struct Dest {
    latency: LatencyEstimate,
    failures: u32,
    /// Since when, and why, the destination gets no new rows.
    suspect: Option<(Instant, String)>,
    probing: bool,
}

/// Destination health shared by every request of one dispatcher.
#[derive(Debug)]
pub struct Health {
    cfg: HedgeConfig,
    dests: Mutex<HashMap<String, Dest>>,
    throttle: Mutex<HedgeThrottle>,
    /// Bumped whenever a destination becomes suspect or is cleared: requests waiting on rows
    /// with no live replica look again.
    generation: watch::Sender<u64>,
}

/// A snapshot of one destination, for logs and status.
#[derive(Debug, Clone)]
pub struct DestSnapshot {
    pub address: String,
    pub typical: Duration,
    pub samples: u64,
    pub failures: u32,
    pub suspect: Option<String>,
}

impl Health {
    pub fn new(cfg: HedgeConfig) -> Arc<Self> {
        let throttle = Mutex::new(HedgeThrottle::new(cfg.ratio));
        Arc::new(Self { cfg, dests: Mutex::new(HashMap::new()), throttle, generation: watch::channel(0).0 })
    }

    pub fn config(&self) -> &HedgeConfig {
        &self.cfg
    }

    /// A receiver that changes whenever suspicion changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// An answer of `rows` rows arrived `gap` after the stream's previous event.
    pub fn observe(&self, address: &str, gap: Duration, rows: usize) {
        if let Ok(mut m) = self.dests.lock() {
            let d = m.entry(address.to_string()).or_default();
            d.latency.observe(gap, rows);
            d.failures = 0;
        }
    }

    /// A send finished with every chunk answered.
    pub fn on_send_done(&self) {
        if let Ok(mut t) = self.throttle.lock() {
            t.on_success();
        }
    }

    /// May a speculative hedge go out now?
    pub fn try_hedge(&self) -> bool {
        self.throttle.lock().map(|mut t| t.try_hedge()).unwrap_or(false)
    }

    pub fn budget(&self, address: &str, rows: usize) -> Duration {
        let m = self.dests.lock();
        let est = m.ok().and_then(|m| m.get(address).map(|d| d.latency.clone())).unwrap_or_default();
        est.budget(rows, &self.cfg)
    }

    /// The destinations suspect now (one lock for a whole routing decision).
    pub fn suspects(&self) -> HashSet<String> {
        self.dests
            .lock()
            .map(|m| m.iter().filter(|(_, d)| d.suspect.is_some()).map(|(a, _)| a.clone()).collect())
            .unwrap_or_default()
    }

    pub fn is_suspect(&self, address: &str) -> bool {
        self.dests.lock().ok().is_some_and(|m| m.get(address).is_some_and(|d| d.suspect.is_some()))
    }

    /// Mark `address` suspect (it failed, or went silent past its budget). Returns whether a
    /// probe should start (it was not probing yet).
    pub fn mark_suspect(&self, address: &str, why: &str) -> bool {
        let start_probe = {
            let Ok(mut m) = self.dests.lock() else { return false };
            let d = m.entry(address.to_string()).or_default();
            d.failures = d.failures.saturating_add(1);
            if d.suspect.is_none() {
                info!(destination = %address, reason = %why, "destination suspect: no new rows until it answers its health check");
                d.suspect = Some((Instant::now(), why.to_string()));
            }
            let start = !d.probing;
            d.probing = true;
            start
        };
        self.bump();
        start_probe
    }

    fn clear(&self, address: &str) {
        if let Ok(mut m) = self.dests.lock() {
            if let Some(d) = m.get_mut(address) {
                if let Some((since, _)) = d.suspect.take() {
                    info!(destination = %address, after = ?since.elapsed(), "destination answers its health check again");
                }
                d.failures = 0;
                d.probing = false;
            }
        }
        self.bump();
    }

    fn stop_probing(&self, address: &str) {
        if let Ok(mut m) = self.dests.lock() {
            if let Some(d) = m.get_mut(address) {
                d.probing = false;
            }
        }
    }

    /// Forget destinations no longer in any placement.
    pub fn retain(&self, keep: &HashSet<String>) {
        if let Ok(mut m) = self.dests.lock() {
            m.retain(|a, _| keep.contains(a));
        }
    }

    pub fn snapshot(&self) -> Vec<DestSnapshot> {
        let m = self.dests.lock();
        let mut v: Vec<DestSnapshot> = m
            .map(|m| {
                m.iter()
                    .map(|(a, d)| DestSnapshot {
                        address: a.clone(),
                        typical: d.latency.typical(),
                        samples: d.latency.samples(),
                        failures: d.failures,
                        suspect: d.suspect.as_ref().map(|s| s.1.clone()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.address.cmp(&b.address));
        v
    }

    /// Probe a suspect destination's health service until it answers (then clear it) or
    /// `still_placed` says it left the placement (then stop). Backs off from 100 ms to 2 s.
    pub fn spawn_probe(
        self: &Arc<Self>,
        address: String,
        transport: Arc<dyn ExpertTransport>,
        still_placed: impl Fn(&str) -> bool + Send + 'static,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(100);
            loop {
                tokio::time::sleep(wait).await;
                if !me.is_suspect(&address) {
                    me.stop_probing(&address);
                    return;
                }
                if !still_placed(&address) {
                    debug!(destination = %address, "suspect destination left the placement; probe stops");
                    me.stop_probing(&address);
                    return;
                }
                let limit = me.cfg.cap.min(Duration::from_secs(1));
                match transport.probe(&address, limit).await {
                    Ok(()) => {
                        me.clear(&address);
                        return;
                    }
                    Err(e) => debug!(destination = %address, error = %e, "suspect destination still does not answer"),
                }
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HedgeConfig {
        HedgeConfig {
            min: Duration::from_millis(20),
            initial: Duration::from_millis(700),
            cap: Duration::from_secs(5),
            ratio: 0.1,
        }
    }

    #[test]
    fn budget_follows_observed_gaps() {
        let mut e = LatencyEstimate::default();
        assert_eq!(e.budget(10, &cfg()), Duration::from_millis(700), "initial budget before samples");
        for _ in 0..20 {
            e.observe(Duration::from_millis(10), 10);
        }
        // Steady 10 ms gaps for 10 rows: srtt 10 ms, rttvar decays toward 0, and twice the
        // per-row time of 10 rows is 20 ms: the budget is about 20 ms.
        let b = e.budget(10, &cfg());
        assert!(b >= Duration::from_millis(19) && b <= Duration::from_millis(30), "{b:?}");
        // A chunk 10x larger gets 10x the time.
        let big = e.budget(100, &cfg());
        assert!(big >= Duration::from_millis(195), "{big:?}");
        // Jitter widens the budget: gaps of 5 and 45 ms have srtt 25 ms and rttvar near 20 ms.
        let mut j = LatencyEstimate::default();
        for i in 0..40 {
            j.observe(Duration::from_millis(if i % 2 == 0 { 5 } else { 45 }), 10);
        }
        assert!(j.budget(10, &cfg()) > Duration::from_millis(80), "{:?}", j.budget(10, &cfg()));
        // Never above the cap.
        let mut slow = LatencyEstimate::default();
        for _ in 0..5 {
            slow.observe(Duration::from_secs(30), 1);
        }
        assert_eq!(slow.budget(1, &cfg()), Duration::from_secs(5));
    }

    #[test]
    fn throttle_limits_hedges_to_a_fraction_of_successes() {
        let mut t = HedgeThrottle::new(0.1);
        let burst = (0..20).filter(|_| t.try_hedge()).count();
        assert_eq!(burst, 10, "a burst is capped by the bucket");
        for _ in 0..100 {
            t.on_success();
        }
        let after = (0..20).filter(|_| t.try_hedge()).count();
        assert_eq!(after, 10, "100 successes earn 10 hedges");
    }

    #[tokio::test]
    async fn suspicion_is_shared_and_announced() {
        let h = Health::new(cfg());
        let mut rx = h.changes();
        assert!(!h.is_suspect("a:1"));
        assert!(h.mark_suspect("a:1", "silent"));
        assert!(!h.mark_suspect("a:1", "again"), "one probe per destination");
        assert!(h.is_suspect("a:1"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        h.clear("a:1");
        assert!(!h.is_suspect("a:1") && rx.has_changed().unwrap());
        h.retain(&HashSet::new());
        assert!(h.snapshot().is_empty());
    }
}
