//! Progress of long work a worker does (loading a placement's experts): bytes done of a total,
//! the rate, and the time left; for the logs, the load reports (`status`) and the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Bytes done of a total since a start; all zero when idle.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    started: Mutex<Option<Instant>>,
}

/// A moment of a [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub done: u64,
    pub total: u64,
    /// Bytes per second since the start.
    pub rate: f64,
}

impl Progress {
    pub fn start(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        if let Ok(mut s) = self.started.lock() {
            *s = Some(Instant::now());
        }
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.total.store(0, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut s) = self.started.lock() {
            *s = None;
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let (done, total) = (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        let secs = self.started.lock().ok().and_then(|s| *s).map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        Snapshot { done, total, rate: if secs > 0.0 { done as f64 / secs } else { 0.0 } }
    }
}

impl Snapshot {
    /// "1.20 of 4.00 GiB (30%), 150 MiB/s, about 19 s left".
    pub fn describe(&self) -> String {
        expertmesh_core::metrics::progress_text(self.done, self.total, self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_from_a_start_to_a_finish() {
        let p = Progress::default();
        assert_eq!(p.snapshot(), Snapshot { done: 0, total: 0, rate: 0.0 });
        p.start(100);
        p.add(40);
        let s = p.snapshot();
        assert_eq!((s.done, s.total), (40, 100));
        p.finish();
        assert_eq!(p.snapshot().total, 0);
    }
}
