//! The client side: channels that speak TLS with this process's certificate (whatever the files
//! hold when the connection opens) and check the server's certificate against the cluster CA
//! and the identity the caller expects there.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::Identity;
use crate::material::{Tls, ANY_SERVER, ANY_WORKER};

/// Which server a client expects at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// This identity (`coordinator`, `worker.w1`).
    Identity(Identity),
    /// Some `worker.<id>`.
    AnyWorker,
    /// Any certificate of the cluster CA (an address given by hand).
    AnyServer,
    /// The host name or IP of the address, checked as a browser would (etcd).
    Host,
}

impl Expect {
    fn server_name(&self, uri: &Uri) -> std::io::Result<ServerName<'static>> {
        let name = match self {
            Expect::Identity(i) => i.server_name(),
            Expect::AnyWorker => ANY_WORKER.to_string(),
            Expect::AnyServer => ANY_SERVER.to_string(),
            Expect::Host => uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string(),
        };
        ServerName::try_from(name.clone()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{name}` is not a TLS server name: {e}"))
        })
    }
}

/// Connects TCP (TCP_NODELAY) and then TLS, for tonic's `connect_with_connector`.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    /// This process's files as of each connection, expecting `Expect` at the other end.
    Files(Tls, Expect),
    /// A fixed configuration and server name.
    Fixed(Arc<rustls::ClientConfig>, ServerName<'static>),
}

impl TlsConnector {
    pub fn new(tls: Tls, expect: Expect) -> Self {
        Self { source: Source::Files(tls, expect) }
    }

    /// A fixed rustls configuration, for tools and tests that need one the files cannot express
    /// (no client certificate, another CA).
    pub fn fixed(mut config: rustls::ClientConfig, name: ServerName<'static>) -> Self {
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self { source: Source::Fixed(Arc::new(config), name) }
    }
}

type Io = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let source = self.source.clone();
        Box::pin(async move {
            let (config, name) = match source {
                Source::Files(tls, expect) => (tls.current().client.clone(), expect.server_name(&uri)?),
                Source::Fixed(config, name) => (config, name),
            };
            dial(uri, config, name).await
        })
    }
}

async fn dial(uri: Uri, config: Arc<rustls::ClientConfig>, name: ServerName<'static>) -> std::io::Result<Io> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{uri}` names no host")))?;
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
    tcp.set_nodelay(true)?;
    let s = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    Ok(TokioIo::new(s))
}

/// `http://ADDR` (TLS, when used, is the connector's business, not the scheme's).
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.replacen("https://", "http://", 1)
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(url).map_err(|e| format!("address `{addr}` is not usable: {e}"))
}

/// Connect `ep` now: over TLS with `tls` (expecting `expect` at the other end), or plaintext.
pub async fn connect(ep: Endpoint, tls: Option<&Tls>, expect: Expect) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(t) => ep.connect_with_connector(TlsConnector::new(t.clone(), expect)).await,
        None => ep.connect().await,
    }
}

/// Like [`connect`], connecting on first use.
pub fn connect_lazy(ep: Endpoint, tls: Option<&Tls>, expect: Expect) -> Channel {
    match tls {
        Some(t) => ep.connect_with_connector_lazy(TlsConnector::new(t.clone(), expect)),
        None => ep.connect_lazy(),
    }
}
