//! Certificates from files, turned into rustls configurations, and reloaded when the files
//! change (rotation without a restart: connections opened after the change use the new files,
//! open ones keep the keys they were made with).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use tracing::{info, warn};

use crate::identity::{certificate_names, Identity, IdentityMap};
use crate::TrustError;

/// The three files of a role's mutual TLS (`--tls-cert`, `--tls-key`, `--tls-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of this process (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM certificates of the cluster CA(s) every peer must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// From the three optional flags: all three or none. Names the missing ones otherwise.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<Self>, TrustError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self { cert, key, ca })),
            (c, k, a) => {
                let missing: Vec<&str> =
                    [(c.is_none(), "--tls-cert"), (k.is_none(), "--tls-key"), (a.is_none(), "--tls-ca")]
                        .into_iter()
                        .filter_map(|(m, n)| m.then_some(n))
                        .collect();
                Err(TrustError::Config(format!(
                    "mutual TLS needs --tls-cert, --tls-key and --tls-ca together; missing {}",
                    missing.join(", ")
                )))
            }
        }
    }

    fn read(&self) -> Result<Vec<Vec<u8>>, TrustError> {
        [&self.cert, &self.key, &self.ca]
            .iter()
            .map(|p| std::fs::read(p).map_err(|e| TrustError::Config(format!("cannot read {}: {e}", p.display()))))
            .collect()
    }
}

/// The sentinel server names a client passes when it cannot expect one identity.
pub(crate) const ANY_SERVER: &str = "any.expertmesh.invalid";
pub(crate) const ANY_WORKER: &str = "any-worker.expertmesh.invalid";

/// One generation of the files, parsed.
#[derive(Debug)]
pub(crate) struct Material {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
    /// Checks a client's chain after a handshake that let any certificate through.
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    /// The identities our own certificate names.
    pub(crate) own: Vec<Identity>,
    /// The names in our own certificate (for messages).
    pub(crate) own_names: Vec<String>,
    /// The file contents this generation came from.
    source: Vec<Vec<u8>>,
}

/// ring: builds everywhere with a C compiler and no cmake. (rustls marks it deprecated for
/// lacking post-quantum key exchange; aws-lc-rs would bring it at the cost of a cmake build.)
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TrustError::Config(format!("{}: not PEM certificates: {e}", what.display())))?;
    if certs.is_empty() {
        return Err(TrustError::Config(format!(
            "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            what.display()
        )));
    }
    Ok(certs)
}

impl Material {
    fn load(files: &TlsFiles, map: &IdentityMap) -> Result<Self, TrustError> {
        let source = files.read()?;
        let chain = certs(&files.cert, &source[0])?;
        let key = PrivateKeyDer::from_pem_slice(&source[1]).map_err(|e| {
            TrustError::Config(format!("{}: no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}", files.key.display()))
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs(&files.ca, &source[2])? {
            roots
                .add(c)
                .map_err(|e| TrustError::Config(format!("{}: not a usable CA certificate: {e}", files.ca.display())))?;
        }
        let roots = Arc::new(roots);
        let p = provider();
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
            .build()
            .map_err(|e| TrustError::Config(format!("{}: {e}", files.ca.display())))?;
        let server = ServerConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(AnyClientCert { inner: client_verifier.clone() }))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                TrustError::Config(format!(
                    "{} and {} do not make a usable key pair: {e}",
                    files.cert.display(),
                    files.key.display()
                ))
            })?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, p.clone())
            .build()
            .map_err(|e| TrustError::Config(format!("{}: {e}", files.ca.display())))?;
        let client = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ByIdentity { inner: server_verifier, map: map.clone() }))
            .with_client_auth_cert(chain.clone(), key)
            .map_err(|e| TrustError::Config(format!("{}: {e}", files.key.display())))?;
        let own_names =
            certificate_names(&chain[0]).map_err(|e| TrustError::Config(format!("{}: {e}", files.cert.display())))?;
        let own = map.identities(&own_names);
        let mut server = server;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = client;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { server: Arc::new(server), client: Arc::new(client), client_verifier, own, own_names, source })
    }
}

/// Lets any client certificate (or none) through the handshake; the chain is checked right
/// after it ([`crate::server`]), so a refused peer gets a gRPC status that says why instead of
/// a bare TLS alert. Signatures (proof that the peer holds the key) are checked here.
#[derive(Debug)]
struct AnyClientCert {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a server's chain against the cluster CA and its name against what the client
/// expects: a host name as usual, or an identity of the scheme (`coordinator`, `worker.w1`),
/// or any worker, or any certificate of the CA.
#[derive(Debug)]
struct ByIdentity {
    inner: Arc<WebPkiServerVerifier>,
    map: IdentityMap,
}

impl ServerCertVerifier for ByIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                // The chain is good (webpki checks the name last); the name is ours to judge.
                let ServerName::DnsName(want) = server_name else {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName));
                };
                let names = certificate_names(end_entity).map_err(rustls::Error::General)?;
                let ids = self.map.identities(&names);
                let ok = match want.as_ref() {
                    ANY_SERVER => true,
                    ANY_WORKER => ids.iter().any(|i| matches!(i, Identity::Worker(_))),
                    w => Identity::parse(w).is_some_and(|w| ids.contains(&w)),
                };
                if ok {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "the server's certificate names {names:?}, not `{}`",
                        match want.as_ref() {
                            ANY_WORKER => "worker.<id>",
                            w => w,
                        }
                    )))
                }
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct Inner {
    files: TlsFiles,
    map: IdentityMap,
    current: RwLock<Arc<Material>>,
}

/// A process's mutual TLS: its certificate, key and CA, reloaded when the files change.
/// Cheap to clone; servers and clients of one process share it.
#[derive(Debug, Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

/// How often the files are checked for a change unless `EXPERTMESH_TLS_RELOAD_MS` says.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

impl Tls {
    /// Load `files` now (errors name the file and what is wrong with it). Call [`Tls::watch`]
    /// to reload them when they change.
    pub fn load(files: TlsFiles, map: IdentityMap) -> Result<Self, TrustError> {
        let m = Material::load(&files, &map)?;
        Ok(Self { inner: Arc::new(Inner { files, map, current: RwLock::new(Arc::new(m)) }) })
    }

    pub(crate) fn current(&self) -> Arc<Material> {
        match self.inner.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    pub fn identity_map(&self) -> &IdentityMap {
        &self.inner.map
    }

    /// The identities this process's own certificate names.
    pub fn own_identities(&self) -> Vec<Identity> {
        self.current().own.clone()
    }

    /// The DNS and URI names of this process's own certificate.
    pub fn own_names(&self) -> Vec<String> {
        self.current().own_names.clone()
    }

    /// Read the files again; if their contents changed and still make a usable configuration,
    /// use it for new connections. `Ok(true)` when a new generation took over. A broken set of
    /// files (half-written by a rotation) leaves the old one in place and is reported.
    pub fn reload(&self) -> Result<bool, TrustError> {
        let now = self.inner.files.read()?;
        if now == self.current().source {
            return Ok(false);
        }
        let m = Material::load(&self.inner.files, &self.inner.map)?;
        match self.inner.current.write() {
            Ok(mut g) => *g = Arc::new(m),
            Err(p) => *p.into_inner() = Arc::new(m),
        }
        Ok(true)
    }

    /// Check the files every `interval` (or `EXPERTMESH_TLS_RELOAD_MS`) on the current tokio
    /// runtime and reload them when they change; the task ends when every handle is dropped.
    pub fn watch(&self, interval: Option<Duration>) {
        let interval = interval
            .or_else(|| {
                std::env::var("EXPERTMESH_TLS_RELOAD_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis)
            })
            .unwrap_or(DEFAULT_RELOAD_INTERVAL);
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let tls = Tls { inner };
                match tls.reload() {
                    Ok(true) => {
                        failing = false;
                        info!(cert = %tls.files().cert.display(), names = ?tls.own_names(), "TLS certificates changed on disk; new connections use them");
                    }
                    Ok(false) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        warn!(error = %e, "TLS files changed but cannot be used; keeping the previous certificates");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
