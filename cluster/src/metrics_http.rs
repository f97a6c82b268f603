//! The Prometheus endpoint (`--metrics-listen`): plain HTTP/1.1 on a port of its own, `GET
//! /metrics` answered with the text the server renders at that moment, and the gRPC health
//! states over HTTP for probes that cannot speak TLS (kubelet's gRPC probes are plaintext, and a
//! server with mutual TLS refuses plaintext): `GET /readyz` (service `""`), `/livez`
//! (`expertmesh.live`) and `/health/<service>`, 200 `SERVING` or 503 `NOT_SERVING`. Minimal on
//! purpose: one request per connection, a request head of at most 8 KiB read within 5 s, 64
//! connections at once; anything else gets 400, 404 or 405.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Renders the exposition text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Whether a gRPC health service is SERVING (None: no such service).
pub type Health = Arc<dyn Fn(String) -> BoxFuture<'static, Option<bool>> + Send + Sync>;

/// The states a gRPC health reporter holds, as [`Health`].
pub fn health_of(reporter: tonic_health::server::HealthReporter) -> Health {
    use tonic_health::pb::health_server::Health as _;
    let service = Arc::new(tonic_health::server::HealthService::from_health_reporter(reporter));
    Arc::new(move |name: String| {
        let service = service.clone();
        Box::pin(async move {
            let r = service.check(tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: name })).await;
            r.ok().map(|r| {
                r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            })
        })
    })
}

/// The health service a probe path names.
fn probe_service(path: &str) -> Option<String> {
    match path {
        "/readyz" | "/health" | "/health/" => Some(String::new()),
        "/livez" => Some(expertmesh_proto::LIVE_SERVICE.to_string()),
        p => p.strip_prefix("/health/").map(str::to_string),
    }
}

const MAX_HEAD: usize = 8 << 10;

async fn answer(mut s: tokio::net::TcpStream, render: Render, health: Health) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let (status, body, ctype) = match complete {
        Ok(Ok(true)) => {
            let line = String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default()).to_string();
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next().map(|p| p.split('?').next().unwrap_or(p))) {
                (Some("GET"), Some("/metrics")) => ("200 OK", render(), "text/plain; version=0.0.4; charset=utf-8"),
                (Some("GET"), Some(path)) => match probe_service(path) {
                    Some(service) => match health(service.clone()).await {
                        Some(true) => ("200 OK", "SERVING\n".into(), "text/plain"),
                        Some(false) => ("503 Service Unavailable", "NOT_SERVING\n".into(), "text/plain"),
                        None => ("404 Not Found", format!("no health service `{service}`\n"), "text/plain"),
                    },
                    None => (
                        "404 Not Found",
                        "served here: /metrics, /readyz, /livez, /health/<service>\n".into(),
                        "text/plain",
                    ),
                },
                (Some(_), Some(_)) => ("405 Method Not Allowed", "GET /metrics\n".into(), "text/plain"),
                _ => ("400 Bad Request", "not an HTTP request\n".into(), "text/plain"),
            }
        }
        _ => ("400 Bad Request", "incomplete or oversized request head\n".into(), "text/plain"),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

/// Serve `render` at `GET /metrics` and `health` at the probe paths on `listener` until `stop`.
pub async fn serve_metrics(listener: TcpListener, render: Render, health: Health, stop: CancellationToken) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics serving at http://{a}/metrics");
    }
    let slots = Arc::new(Semaphore::new(64));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (s, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "metrics: cannot accept; pausing 50 ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: at the limit
        };
        let (render, health) = (render.clone(), health.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = s.set_nodelay(true);
            if let Err(e) = answer(s, render, health).await {
                tracing::debug!(%peer, error = %e, "metrics request failed");
            }
        });
    }
}
