//! What a worker's gRPC health service says, kept true to its state:
//!
//! | service                       | SERVING when                                                        |
//! |-------------------------------|---------------------------------------------------------------------|
//! | `expertmesh.v1.ExpertService` | it holds its experts of the committed placement, has its lease, and is not draining |
//! | `expertmesh.v1.MoeLayer`      | a committed placement routes its calls, it has its lease, and is not draining |
//! | `""` (the whole server)       | as `ExpertService`                                                  |
//!
//! NOT_SERVING otherwise (from start until the first commit that places it, while draining, with
//! its lease lost). A peer that only needs to know the worker is up and reachable (the leader's
//! member check, a dispatcher clearing a suspect) accepts any answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::info;

/// The state the statuses follow; each setter wakes the reporter.
#[derive(Debug, Default)]
pub struct Readiness {
    lease_lost: AtomicBool,
    draining: AtomicBool,
    committed: AtomicBool,
    placed: AtomicBool,
    changed: Notify,
}

fn status(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn set(&self, flag: &AtomicBool, v: bool) {
        if flag.swap(v, Ordering::AcqRel) != v {
            self.changed.notify_one();
        }
    }

    /// The worker's lease is known to be gone (true) or held again (false). A control plane
    /// that cannot be reached changes nothing: the worker serves on.
    pub fn set_lease_lost(&self, lost: bool) {
        self.set(&self.lease_lost, lost);
    }

    pub fn set_draining(&self) {
        self.set(&self.draining, true);
    }

    /// A placement committed; `placed`: it lists this worker (whose experts are then loaded:
    /// the plan could only commit once the worker reported them ready).
    pub fn set_committed(&self, placed: bool) {
        self.set(&self.committed, true);
        self.set(&self.placed, placed);
    }

    pub fn lease_lost(&self) -> bool {
        self.lease_lost.load(Ordering::Acquire)
    }

    /// (ExpertService, MoeLayer) SERVING?
    pub fn serving(&self) -> (bool, bool) {
        let up = !self.lease_lost.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire);
        (up && self.placed.load(Ordering::Acquire), up && self.committed.load(Ordering::Acquire))
    }

    /// Why not serving, for the log.
    fn why(&self) -> &'static str {
        if self.draining.load(Ordering::Acquire) {
            "draining"
        } else if self.lease_lost.load(Ordering::Acquire) {
            "lease lost"
        } else if !self.committed.load(Ordering::Acquire) {
            "no committed placement yet"
        } else {
            "not in the committed placement"
        }
    }

    /// Set every service NOT_SERVING now (before the server answers), then follow the state
    /// until `stop`.
    pub async fn report(self: Arc<Self>, reporter: HealthReporter, stop: CancellationToken) {
        let apply = |reporter: HealthReporter, (expert, moe): (bool, bool)| async move {
            reporter.set_service_status(expertmesh_proto::EXPERT_SERVICE, status(expert)).await;
            reporter.set_service_status("", status(expert)).await;
            reporter.set_service_status(expertmesh_proto::MOE_LAYER_SERVICE, status(moe)).await;
        };
        let mut last = (false, false);
        apply(reporter.clone(), last).await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = self.serving();
            if now != last {
                if now.0 {
                    info!("health: SERVING (experts of the committed placement held)");
                } else {
                    info!(why = self.why(), moe_layer_serving = now.1, "health: NOT_SERVING");
                }
                apply(reporter.clone(), now).await;
                last = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_follows_placement_lease_and_drain() {
        let r = Readiness::new();
        assert_eq!(r.serving(), (false, false), "nothing committed yet");
        r.set_committed(false);
        assert_eq!(r.serving(), (false, true), "routing, but not placed");
        r.set_committed(true);
        assert_eq!(r.serving(), (true, true));
        r.set_lease_lost(true);
        assert_eq!(r.serving(), (false, false));
        assert_eq!(r.why(), "lease lost");
        r.set_lease_lost(false);
        assert_eq!(r.serving(), (true, true));
        r.set_draining();
        assert_eq!((r.serving(), r.why()), ((false, false), "draining"));
    }
}
