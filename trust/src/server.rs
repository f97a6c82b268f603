//! The server side: every accepted connection becomes a [`PeerIo`] that knows who is on the
//! other end ([`Peer`]), and [`RequireAuthLayer`] answers every call of a peer that did not
//! prove a cluster certificate with UNAUTHENTICATED, saying what was wrong.
//!
//! With TLS configured, the first byte of a connection tells a TLS handshake (0x16) from
//! plaintext HTTP/2; plaintext peers are served only to be refused with a clear message.
//! Handshakes run concurrently, each bounded by [`HANDSHAKE_LIMIT`], so a peer that opens a
//! connection and says nothing holds up no one.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::pki_types::UnixTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::debug;

use crate::identity::{certificate_names, Identity};
use crate::material::Tls;

/// Longest a TLS handshake (or the first byte of a connection) may take.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// What a connection proved about its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// The server runs without TLS: everyone is trusted (loopback development clusters).
    Open,
    /// The server requires mutual TLS and the peer spoke plaintext.
    Plaintext,
    /// A TLS peer that presented no certificate.
    NoCertificate,
    /// A TLS peer whose certificate does not chain to the cluster CA (why).
    Rejected(String),
    /// A peer whose certificate chains to the cluster CA: what it names.
    Verified { identities: Vec<Identity>, names: Vec<String> },
}

/// The connection info a server's requests carry (in their extensions).
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    pub auth: Arc<Auth>,
}

impl Peer {
    /// The peer of a request, if it came through [`incoming`].
    pub fn of<T>(req: &tonic::Request<T>) -> Option<&Peer> {
        req.extensions().get::<Peer>()
    }
}

/// The remote address of a request, through [`incoming`] or a plain TCP listener.
pub fn peer_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    Peer::of(req).and_then(|p| p.remote).or_else(|| req.remote_addr())
}

/// Bytes read before the stream was handed on (the sniffed first byte), replayed first.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Option<u8>,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(b) = self.prefix.take() {
            if buf.remaining() > 0 {
                buf.put_slice(&[b]);
                return Poll::Ready(Ok(()));
            }
            self.prefix = Some(b);
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug)]
enum Io<IO> {
    Plain(Rewind<IO>),
    Tls(Box<tokio_rustls::server::TlsStream<Rewind<IO>>>),
}

/// An accepted connection, plaintext or TLS, with what it proved about its peer.
#[derive(Debug)]
pub struct PeerIo<IO> {
    io: Io<IO>,
    peer: Peer,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for PeerIo<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PeerIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl<IO: Send + 'static> Connected for PeerIo<IO> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// TLS record type of a handshake: the first byte of every TLS connection.
const TLS_HANDSHAKE: u8 = 0x16;

async fn classify<IO>(mut io: IO, remote: Option<SocketAddr>, tls: Tls) -> io::Result<PeerIo<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut first = [0u8; 1];
    if io.read(&mut first).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before saying anything"));
    }
    let rewound = Rewind { prefix: Some(first[0]), inner: io };
    if first[0] != TLS_HANDSHAKE {
        return Ok(PeerIo { io: Io::Plain(rewound), peer: Peer { remote, auth: Arc::new(Auth::Plaintext) } });
    }
    let m = tls.current();
    let s = tokio_rustls::TlsAcceptor::from(m.server.clone()).accept(rewound).await?;
    let auth = match s.get_ref().1.peer_certificates() {
        None | Some([]) => Auth::NoCertificate,
        Some([leaf, rest @ ..]) => match m.client_verifier.verify_client_cert(leaf, rest, UnixTime::now()) {
            Err(e) => Auth::Rejected(e.to_string()),
            Ok(_) => match certificate_names(leaf) {
                Ok(names) => Auth::Verified { identities: tls.identity_map().identities(&names), names },
                Err(e) => Auth::Rejected(e),
            },
        },
    };
    Ok(PeerIo { io: Io::Tls(Box::new(s)), peer: Peer { remote, auth: Arc::new(auth) } })
}

/// Wrap a server's accepted connections: with `tls`, sniff and handshake each one (in its own
/// task, within [`HANDSHAKE_LIMIT`]); without, hand them on as they are, trusted
/// ([`Auth::Open`]). Connections that fail their handshake are closed and logged at debug.
pub fn incoming<S, IO>(accepted: S, tls: Option<Tls>) -> Pin<Box<dyn Stream<Item = io::Result<PeerIo<IO>>> + Send>>
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected<ConnectInfo = TcpConnectInfo> + Unpin + Send + 'static,
{
    let Some(tls) = tls else {
        let open = Arc::new(Auth::Open);
        return Box::pin(accepted.map(move |r| {
            r.map(|io| {
                let remote = io.connect_info().remote_addr();
                PeerIo { io: Io::Plain(Rewind { prefix: None, inner: io }), peer: Peer { remote, auth: open.clone() } }
            })
        }));
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<PeerIo<IO>>>(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        while let Some(r) = accepted.next().await {
            let io = match r {
                Ok(io) => io,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let (out, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let remote = io.connect_info().remote_addr();
                match tokio::time::timeout(HANDSHAKE_LIMIT, classify(io, remote, tls)).await {
                    Ok(Ok(p)) => {
                        let _ = out.send(Ok(p)).await;
                    }
                    Ok(Err(e)) => debug!(peer = ?remote, error = %e, "TLS handshake failed; connection closed"),
                    Err(_) => debug!(peer = ?remote, "no TLS handshake within {HANDSHAKE_LIMIT:?}; connection closed"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Why a connection's calls are refused before any service sees them, if they are.
pub fn denial(auth: &Auth) -> Option<tonic::Status> {
    let how = "connect over TLS with a certificate signed by the cluster CA (--tls-cert, --tls-key, --tls-ca)";
    match auth {
        Auth::Open | Auth::Verified { .. } => None,
        Auth::Plaintext => Some(tonic::Status::unauthenticated(format!(
            "this server requires mutual TLS and the connection is plaintext; {how}"
        ))),
        Auth::NoCertificate => {
            Some(tonic::Status::unauthenticated(format!("no client certificate was presented; {how}")))
        }
        Auth::Rejected(why) => {
            Some(tonic::Status::unauthenticated(format!("the client certificate is not accepted ({why}); {how}")))
        }
    }
}

/// Refuses every call on a connection that did not prove a cluster certificate
/// ([`denial`]), for every service of a server (health and reflection included).
#[derive(Debug, Clone, Default)]
pub struct RequireAuthLayer;

impl<S> tower_layer::Layer<S> for RequireAuthLayer {
    type Service = RequireAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireAuth { inner }
    }
}

/// See [`RequireAuthLayer`].
#[derive(Debug, Clone)]
pub struct RequireAuth<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for RequireAuth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<Peer>();
        if let Some(status) = peer.and_then(|p| denial(&p.auth)) {
            crate::authz::count_refusal(&status);
            tracing::warn!(peer = ?peer.and_then(|p| p.remote), path = %req.uri().path(), reason = %status.message(), "call refused: unauthenticated");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(req))
    }
}
