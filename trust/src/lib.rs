//! Trust between the parts of an ExpertMesh cluster: mutual TLS on every link (rustls, no
//! OpenSSL), identities named by certificates, and authorisation of each call by identity.
//!
//! - [`Tls`]: a process's certificate, key and CA from files, reloaded when they change.
//! - [`server::incoming`] and [`server::RequireAuthLayer`]: a server's connections and the
//!   refusal of peers that did not prove a cluster certificate.
//! - [`client`]: channels that present our certificate and check the server's.
//! - [`authz::authorize`]: what a call needs ([`authz::Need`]) against who the caller is.
//! - [`certs`]: a CA and certificates for a local or test cluster.

pub mod authz;
pub mod certs;
pub mod client;
pub mod identity;
mod material;
pub mod server;

pub use authz::{authorize, Need};
pub use client::Expect;
pub use identity::{Identity, IdentityMap};
pub use material::{Tls, TlsFiles, DEFAULT_RELOAD_INTERVAL};
pub use server::{peer_addr, Auth, Peer};

/// What can go wrong setting up trust.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A flag, a file or a certificate is not usable; the message names it.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Whether `host` (of a `HOST:PORT` listen address) is a loopback address, where running
/// without TLS is acceptable.
pub fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}
