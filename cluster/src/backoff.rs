//! Retry delays that grow (doubling from `min` to `max`) with ±20% jitter, so that processes
//! restarted together do not retry in lockstep; and a throttle for the log line a retry loop
//! writes, so an outage is reported plainly once and then every `every`, not on every try.

use std::time::{Duration, Instant};

/// Growing, jittered retry delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.subsec_nanos() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), next: min }
    }

    /// The delay before the next try (and the one after grows).
    pub fn delay(&mut self) -> Duration {
        let d = self.next.mul_f64(0.8 + 0.4 * unit_random());
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Says when a repeating failure is worth a log line: the first time, then every `every`.
#[derive(Debug, Clone)]
pub struct LogEvery {
    every: Duration,
    last: Option<Instant>,
    since: Option<Instant>,
}

impl LogEvery {
    pub fn new(every: Duration) -> Self {
        Self { every, last: None, since: None }
    }

    /// A failure happened: Some(how long failures have lasted) when it should be logged.
    pub fn failed(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if self.last.is_none_or(|l| now.duration_since(l) >= self.every) {
            self.last = Some(now);
            return Some(now.duration_since(since));
        }
        None
    }

    /// It worked: Some(how long it had failed) if failures were logged.
    pub fn recovered(&mut self) -> Option<Duration> {
        let was = self.since.take().map(|s| s.elapsed());
        self.last.take().and(was)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let d: Vec<f64> = (0..6).map(|_| b.delay().as_secs_f64() * 1e3).collect();
        for (i, base) in [100.0, 200.0, 400.0, 800.0, 1000.0, 1000.0].iter().enumerate() {
            assert!(d[i] >= base * 0.8 - 1e-9 && d[i] <= base * 1.2 + 1e-9, "{d:?}");
        }
        b.reset();
        assert!(b.delay() <= Duration::from_millis(120));
        // Jitter: not every delay the same.
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(100));
        let v: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        assert!(v.iter().any(|x| *x != v[0]), "{v:?}");
    }

    #[test]
    fn repeated_failures_are_logged_once_per_interval() {
        let mut l = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(l.failed(), Some(Duration::ZERO));
        assert_eq!(l.failed(), None);
        assert!(l.recovered().is_some());
        assert!(l.recovered().is_none());
        assert!(l.failed().is_some(), "a new outage is logged again");
    }
}
