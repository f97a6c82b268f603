//! A `MoeLayer` client for callers of a running cluster. `MoeLayer.Forward` is idempotent (the
//! same request always gets the same answer and computes nothing twice that matters), so when
//! the worker a call entered through is unavailable, drains, dies mid-call or is at its
//! admission limit, the call is retried on the next entry worker, within one deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use expertmesh_proto::v1::moe_layer_client::MoeLayerClient;
use expertmesh_proto::v1::{ForwardRequest, ForwardResponse};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::debug;

/// Whether a failed Forward may be sent again to another entry worker: the entry could not
/// serve it (unavailable, at its limits, or its connection broke), never because the request
/// is wrong or its deadline is gone.
pub fn retry_elsewhere(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => true,
        // A connection that broke mid-call ("transport error", "h2 protocol error", "stream
        // removed"...) is reported by the transport as UNKNOWN, INTERNAL or CANCELLED without a
        // server's status behind it; hyper says "operation was canceled" for a call whose
        // connection went away before it was answered (the caller's own deadline reads
        // "timeout expired").
        Code::Unknown | Code::Internal | Code::Cancelled => {
            let m = s.message().to_ascii_lowercase();
            [
                "transport",
                "h2 protocol",
                "stream removed",
                "connection",
                "broken pipe",
                "reset",
                "error trying to connect",
                "operation was canceled",
            ]
            .iter()
            .any(|w| m.contains(w))
                && !m.contains("timeout expired")
        }
        _ => false,
    }
}

/// Forward with failover over several entry workers.
#[derive(Debug)]
pub struct MoeClient {
    entries: Vec<(String, MoeLayerClient<Channel>)>,
    next: AtomicUsize,
    timeout: Duration,
}

impl MoeClient {
    /// Clients for `entries` (`HOST:PORT` each; connected lazily). `timeout` bounds a whole
    /// call, retries included, and travels to the server as `grpc-timeout`.
    /// With `tls`, over mutual TLS (each entry must present a `worker.<id>` certificate).
    pub fn new(
        entries: &[String],
        timeout: Duration,
        max_message_bytes: usize,
        tls: Option<&expertmesh_trust::Tls>,
    ) -> Result<Self, String> {
        if entries.is_empty() {
            return Err("no entry worker given; expected one or more HOST:PORT".into());
        }
        let mut v = Vec::new();
        for e in entries {
            expertmesh_core::limits::check_address("entry worker", e)?;
            let ep = Endpoint::from_shared(format!("http://{e}"))
                .map_err(|err| format!("entry worker `{e}`: {err}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(3).min(timeout));
            let ch = expertmesh_trust::client::connect_lazy(ep, tls, expertmesh_trust::Expect::AnyWorker);
            let c = MoeLayerClient::new(ch)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes);
            v.push((e.clone(), c));
        }
        Ok(Self { entries: v, next: AtomicUsize::new(0), timeout })
    }

    /// One Forward: entry workers are tried in turn (starting with a different one per call),
    /// each at most once, until one answers or an error says retrying cannot help.
    pub async fn forward(&self, req: ForwardRequest) -> Result<ForwardResponse, Status> {
        let deadline = Instant::now() + self.timeout;
        let n = self.entries.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut tried = Vec::new();
        let mut last = None;
        for i in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let (addr, client) = &self.entries[(first + i) % n];
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(left);
            match client.clone().forward(r).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) if retry_elsewhere(&s) => {
                    debug!(entry = %addr, code = ?s.code(), error = %s.message(), "entry worker could not serve; trying the next");
                    tried.push(addr.clone());
                    last = Some(s);
                }
                Err(s) => return Err(s),
            }
        }
        let s = last.unwrap_or_else(|| Status::deadline_exceeded("no time left to try an entry worker"));
        Err(Status::new(
            s.code(),
            format!("{} (tried entry workers {}, within {:?})", s.message(), tried.join(", "), self.timeout),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_retried_elsewhere() {
        assert!(retry_elsewhere(&Status::unavailable("worker w1 is leaving")));
        assert!(retry_elsewhere(&Status::resource_exhausted("budget")));
        assert!(retry_elsewhere(&Status::unknown("transport error")));
        assert!(retry_elsewhere(&Status::internal("h2 protocol error: stream no longer needed")));
        assert!(retry_elsewhere(&Status::cancelled("connection reset")));
        assert!(retry_elsewhere(&Status::cancelled("operation was canceled")), "hyper: the connection went away");
        assert!(!retry_elsewhere(&Status::cancelled("Timeout expired")));
        assert!(!retry_elsewhere(&Status::invalid_argument("bad shape")));
        assert!(!retry_elsewhere(&Status::deadline_exceeded("late")));
        assert!(!retry_elsewhere(&Status::internal("compute task panicked")));
    }

    #[test]
    fn entries_are_checked() {
        assert!(MoeClient::new(&[], Duration::from_secs(1), 1 << 20, None).is_err());
        let e = MoeClient::new(&["not a host port".into()], Duration::from_secs(1), 1 << 20, None).unwrap_err();
        assert!(e.contains("HOST:PORT"), "{e}");
    }
}
