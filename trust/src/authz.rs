//! Authorisation by identity: what each call needs, checked against what the caller's
//! certificate names. Refusals are logged (rate-limited) and counted.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

use crate::identity::Identity;
use crate::server::{denial, Auth, Peer};

/// What a call needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Any identity of the cluster: `admin`, `coordinator`, `client` or `worker.*`.
    Cluster,
    /// `admin`.
    Admin,
    /// `worker.<id>` for exactly this id.
    Worker(&'a str),
    /// `worker.<id>` for this id, or `admin` (removing a worker).
    WorkerOrAdmin(&'a str),
}

impl std::fmt::Display for Need<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Need::Cluster => f.write_str("a cluster identity (admin, coordinator, client or worker.<id>)"),
            Need::Admin => f.write_str("identity `admin`"),
            Need::Worker(id) => write!(f, "identity `worker.{id}`"),
            Need::WorkerOrAdmin(id) => write!(f, "identity `worker.{id}` or `admin`"),
        }
    }
}

impl Need<'_> {
    fn met_by(&self, ids: &[Identity]) -> bool {
        ids.iter().any(|i| match (self, i) {
            (_, Identity::Admin) => !matches!(self, Need::Worker(_)),
            (Need::Cluster, _) => true,
            (Need::Worker(w) | Need::WorkerOrAdmin(w), Identity::Worker(id)) => id == w,
            _ => false,
        })
    }
}

/// Who made a call that was let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A server without TLS: not known.
    Open,
    Identities(Vec<Identity>),
}

static UNAUTHENTICATED: AtomicU64 = AtomicU64::new(0);
static PERMISSION_DENIED: AtomicU64 = AtomicU64::new(0);

/// Calls this process refused: (unauthenticated, permission denied).
pub fn refusals() -> (u64, u64) {
    (UNAUTHENTICATED.load(Ordering::Relaxed), PERMISSION_DENIED.load(Ordering::Relaxed))
}

/// Count a refusal; true for the ones worth a log line (the first, then one in 100).
pub(crate) fn count_refusal(s: &tonic::Status) -> bool {
    let c = if s.code() == tonic::Code::PermissionDenied { &PERMISSION_DENIED } else { &UNAUTHENTICATED };
    c.fetch_add(1, Ordering::Relaxed) % 100 == 0
}

/// Let a call through if its caller meets `need`; otherwise PERMISSION_DENIED (or
/// UNAUTHENTICATED for a connection that proved nothing) naming the call, what it needs and
/// what the caller's certificate names. A request that did not come through
/// [`crate::server::incoming`] (an in-process server) is [`Caller::Open`].
pub fn authorize<T>(req: &tonic::Request<T>, call: &str, need: Need<'_>) -> Result<Caller, tonic::Status> {
    let Some(peer) = Peer::of(req) else { return Ok(Caller::Open) };
    let status = match &*peer.auth {
        Auth::Open => return Ok(Caller::Open),
        Auth::Verified { identities, .. } if need.met_by(identities) => {
            return Ok(Caller::Identities(identities.clone()))
        }
        Auth::Verified { identities, names } => tonic::Status::permission_denied(format!(
            "{call} needs {need}; the caller's certificate names {} ({})",
            if identities.is_empty() {
                "no identity of the scheme".to_string()
            } else {
                identities.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
            },
            if names.is_empty() { "no DNS or URI names".to_string() } else { names.join(", ") }
        )),
        other => match denial(other) {
            Some(s) => s,
            None => return Ok(Caller::Open),
        },
    };
    if count_refusal(&status) {
        warn!(peer = ?peer.remote, call, code = ?status.code(), reason = %status.message(), "call refused");
    }
    Err(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_are_met_by_the_right_identities() {
        let w1 = Identity::Worker("w1".into());
        let w2 = Identity::Worker("w2".into());
        let cases: Vec<(Need<'_>, Identity, bool)> = vec![
            (Need::Cluster, Identity::Client, true),
            (Need::Cluster, w1.clone(), true),
            (Need::Cluster, Identity::Coordinator, true),
            (Need::Admin, Identity::Admin, true),
            (Need::Admin, Identity::Coordinator, false),
            (Need::Admin, w1.clone(), false),
            (Need::Worker("w1"), w1.clone(), true),
            (Need::Worker("w1"), w2.clone(), false),
            (Need::Worker("w1"), Identity::Admin, false),
            (Need::WorkerOrAdmin("w1"), Identity::Admin, true),
            (Need::WorkerOrAdmin("w1"), w2, false),
            (Need::WorkerOrAdmin("w1"), Identity::Client, false),
        ];
        for (need, id, ok) in cases {
            assert_eq!(need.met_by(std::slice::from_ref(&id)), ok, "{need} by {id}");
        }
        assert!(!Need::Cluster.met_by(&[]));
    }
}
