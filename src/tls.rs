//! The TLS flags every role shares, the etcd client certificate flags, and what both server
//! roles share (metrics endpoint, TLS).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use expertmesh_trust::{IdentityMap, Tls, TlsFiles};

use crate::env;

/// What both server roles (coordinator, worker) take besides their own flags: their metrics
/// endpoint, their TLS, and the client certificate for an `etcds://` store.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct ServerArgs {
    /// Serve Prometheus metrics over plain HTTP at `GET /metrics` on this address (default: not
    /// served).
    #[arg(long, env = env::METRICS_LISTEN)]
    pub(crate) metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    #[command(flatten)]
    pub(crate) etcd_tls: EtcdTlsArgs,
}

/// Mutual TLS of this process: its certificate (naming its identity: docs/operations.md), key,
/// and the cluster CA. All three, or none (plaintext; loopback development only).
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct TlsArgs {
    /// PEM certificate chain of this process (with --tls-key and --tls-ca: mutual TLS on every
    /// port and every call). Reloaded when the file changes.
    #[arg(long, env = env::TLS_CERT)]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = env::TLS_KEY)]
    pub(crate) tls_key: Option<PathBuf>,
    /// PEM certificate(s) of the cluster CA: every peer must present a certificate it signed.
    #[arg(long, env = env::TLS_CA)]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Map another certificate naming onto identities: PATTERN=IDENTITY, PATTERN may hold
    /// `{id}` (repeat the flag, or comma-separate in the variable).
    #[arg(long, env = env::TLS_IDENTITY_MAP, value_delimiter = ',')]
    pub(crate) tls_identity_map: Vec<String>,
}

impl TlsArgs {
    /// The files, loaded and watched for changes; None without the flags.
    pub(crate) fn load(&self) -> Result<Option<Tls>> {
        let files = TlsFiles::from_flags(self.tls_cert.clone(), self.tls_key.clone(), self.tls_ca.clone())?;
        load(files, &self.tls_identity_map)
    }
}

fn load(files: Option<TlsFiles>, map: &[String]) -> Result<Option<Tls>> {
    let Some(files) = files else { return Ok(None) };
    let map = IdentityMap::parse(map).map_err(anyhow::Error::msg)?;
    let tls = Tls::load(files, map)?;
    tls.watch(None);
    Ok(Some(tls))
}

/// The client certificate for an `etcds://` store; defaults to the role's own (--tls-*).
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct EtcdTlsArgs {
    /// PEM client certificate for an `etcds://` store (default: --tls-cert).
    #[arg(long, env = env::ETCD_TLS_CERT)]
    pub(crate) etcd_tls_cert: Option<PathBuf>,
    /// PEM private key of --etcd-tls-cert.
    #[arg(long, env = env::ETCD_TLS_KEY)]
    pub(crate) etcd_tls_key: Option<PathBuf>,
    /// CA of etcd's server certificate.
    #[arg(long, env = env::ETCD_TLS_CA)]
    pub(crate) etcd_tls_ca: Option<PathBuf>,
}

impl EtcdTlsArgs {
    pub(crate) fn load(&self, role: Option<&Tls>) -> Result<Option<Tls>> {
        let files =
            TlsFiles::from_flags(self.etcd_tls_cert.clone(), self.etcd_tls_key.clone(), self.etcd_tls_ca.clone())
                .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("--tls-", "--etcd-tls-")))?;
        match files {
            Some(f) => load(Some(f), &[]),
            None => Ok(role.cloned()),
        }
    }
}
