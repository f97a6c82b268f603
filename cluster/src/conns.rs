//! Every connection a server accepted, behind a [`GuardedIo`] the server can cut: at most a
//! maximum in all and per IP address (one peer cannot take every slot); a peer that stops
//! reading its answers can be cut. Coordinators and workers accept through [`incoming`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

#[derive(Debug, Default)]
struct Cut {
    cut: AtomicBool,
    waker: AtomicWaker,
}

/// Every open connection of a server, so one can be cut; at most `max` in all and `per_ip`
/// from one IP address (so one peer cannot take every slot).
#[derive(Debug)]
pub struct Connections {
    max: usize,
    per_ip: usize,
    by_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    open: AtomicUsize,
    refused: AtomicU64,
    cut_total: AtomicU64,
    live: Mutex<HashMap<SocketAddr, Arc<Cut>>>,
}

impl Connections {
    pub fn new(max: usize, per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            per_ip: per_ip.max(1),
            by_ip: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            cut_total: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused because `max` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections cut (peers that stopped reading).
    pub fn cut_total(&self) -> u64 {
        self.cut_total.load(Ordering::Relaxed)
    }

    /// Cut the connection from `peer`: its next read fails and the server drops it with every
    /// stream on it. False when no such connection is open.
    pub fn cut(&self, peer: SocketAddr) -> bool {
        let c = self.live.lock().ok().and_then(|m| m.get(&peer).cloned());
        match c {
            Some(c) => {
                if !c.cut.swap(true, Ordering::AcqRel) {
                    self.cut_total.fetch_add(1, Ordering::Relaxed);
                }
                c.waker.wake();
                true
            }
            None => false,
        }
    }

    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Option<GuardedIo> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            if self.refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(100) {
                warn!(%peer, max = self.max, "connection refused: the server has its maximum of connections open (--max-connections)");
            }
            return None;
        }
        let from_ip = match self.by_ip.lock() {
            Ok(mut m) => {
                let n = m.entry(peer.ip()).or_default();
                *n += 1;
                *n
            }
            Err(_) => 1,
        };
        if from_ip > self.per_ip {
            self.release_ip(peer.ip());
            self.open.fetch_sub(1, Ordering::AcqRel);
            if self.refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(100) {
                warn!(%peer, per_ip = self.per_ip, "connection refused: this address has its maximum of connections open (--max-connections-per-ip)");
            }
            return None;
        }
        let _ = stream.set_nodelay(true);
        let cut = Arc::new(Cut::default());
        if let Ok(mut m) = self.live.lock() {
            m.insert(peer, cut.clone());
        }
        Some(GuardedIo { inner: stream, cut, peer, conns: self.clone() })
    }
}

impl Connections {
    fn release_ip(&self, ip: std::net::IpAddr) {
        if let Ok(mut m) = self.by_ip.lock() {
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

/// A TCP connection the server can cut (see [`Connections::cut`]).
#[derive(Debug)]
pub struct GuardedIo {
    inner: TcpStream,
    cut: Arc<Cut>,
    peer: SocketAddr,
    conns: Arc<Connections>,
}

impl Drop for GuardedIo {
    fn drop(&mut self) {
        self.conns.open.fetch_sub(1, Ordering::AcqRel);
        self.conns.release_ip(self.peer.ip());
        if let Ok(mut m) = self.conns.live.lock() {
            if m.get(&self.peer).is_some_and(|c| Arc::ptr_eq(c, &self.cut)) {
                m.remove(&self.peer);
            }
        }
    }
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut: the peer stopped reading its answers")
}

impl AsyncRead for GuardedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.cut.waker.register(cx.waker());
        if self.cut.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.cut.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.cut.cut.load(Ordering::Acquire) {
            return Poll::Ready(Err(cut_error()));
        }
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

impl Connected for GuardedIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accept connections from `listener` as [`GuardedIo`]s registered in `conns` (TCP_NODELAY set;
/// beyond the maximum, new connections are closed at once). Accept errors (out of file
/// descriptors) pause accepting briefly instead of spinning.
pub fn incoming(listener: TcpListener, conns: Arc<Connections>) -> impl Stream<Item = io::Result<GuardedIo>> {
    futures::stream::unfold((listener, conns), |(l, conns)| async move {
        loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    if let Some(io) = conns.admit(s, peer) {
                        return Some((Ok(io), (l, conns)));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept a connection; pausing 50 ms");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_connection_fails_its_pending_read() {
        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Connections::new(1, 8);
        let mut inc = Box::pin(incoming(l, conns.clone()));
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let mut io = tokio_stream::StreamExt::next(&mut inc).await.unwrap().unwrap();
        assert_eq!(conns.open(), 1);
        // At the maximum: the next connection is closed at once.
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        let accept_more = tokio::time::timeout(Duration::from_millis(200), tokio_stream::StreamExt::next(&mut inc));
        assert!(accept_more.await.is_err(), "no second connection is handed out");
        let mut buf = [0u8; 1];
        assert_eq!(c2.read(&mut buf).await.unwrap_or(0), 0, "refused connection is closed");
        assert_eq!(conns.refused(), 1);
        let peer = io.peer;
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 1];
            io.read(&mut b).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(conns.cut(peer));
        let r = reader.await.unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(conns.open(), 0, "the dropped connection is forgotten");
        assert_eq!(conns.cut_total(), 1);
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_connection_slot() {
        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Connections::new(10, 2);
        let mut inc = Box::pin(incoming(l, conns.clone()));
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let io1 = tokio_stream::StreamExt::next(&mut inc).await.unwrap().unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let _io2 = tokio_stream::StreamExt::next(&mut inc).await.unwrap().unwrap();
        // A third from the same address is closed at once, though the server has room.
        let mut c3 = TcpStream::connect(addr).await.unwrap();
        let more = tokio::time::timeout(Duration::from_millis(200), tokio_stream::StreamExt::next(&mut inc));
        assert!(more.await.is_err(), "no third connection from one address");
        let mut buf = [0u8; 1];
        assert_eq!(c3.read(&mut buf).await.unwrap_or(0), 0, "refused connection is closed");
        assert_eq!((conns.open(), conns.refused()), (2, 1));
        // One closes: the address may connect again.
        drop(io1);
        let _c4 = TcpStream::connect(addr).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), tokio_stream::StreamExt::next(&mut inc)).await;
        let _io4 = r.unwrap().unwrap().unwrap();
        assert_eq!(conns.open(), 2);
    }
}
