//! Certificates for a local or test cluster (`expertmesh certs`): a CA and one certificate per
//! identity of the scheme, each good for serving and for calling (serverAuth and clientAuth).
//! Production clusters get theirs from their own PKI (cert-manager: docs/operations.md).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::TrustError;

fn gen_err(what: &str) -> impl Fn(rcgen::Error) -> TrustError + '_ {
    move |e| TrustError::Config(format!("{what}: {e}"))
}

/// A certificate authority that can issue leaf certificates.
#[derive(Debug)]
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

/// One issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Authority {
    /// A new self-signed CA named `name`, valid for ten years.
    pub fn create(name: &str) -> Result<Self, TrustError> {
        let key = KeyPair::generate().map_err(gen_err("generating the CA key"))?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "ExpertMesh");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let cert = p.self_signed(&key).map_err(gen_err("signing the CA certificate"))?;
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(p, key), cert_pem: cert.pem(), key_pem })
    }

    /// The CA kept in `dir` (`ca.pem`, `ca-key.pem`), if both files are there.
    pub fn open(dir: &Path) -> Result<Option<Self>, TrustError> {
        let (c, k) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if !c.exists() || !k.exists() {
            return Ok(None);
        }
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|e| TrustError::Config(format!("{}: {e}", p.display())));
        let (cert_pem, key_pem) = (read(&c)?, read(&k)?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TrustError::Config(format!("{}: {e}", k.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| TrustError::Config(format!("{}: not a usable CA certificate: {e}", c.display())))?;
        Ok(Some(Self { issuer, cert_pem, key_pem }))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Write `ca.pem` and `ca-key.pem` (the key readable by its owner only) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<Vec<PathBuf>, TrustError> {
        Ok(vec![write(dir, "ca.pem", &self.cert_pem, false)?, write(dir, "ca-key.pem", &self.key_pem, true)?])
    }

    /// A leaf certificate for `names` (DNS names, IP addresses, or URIs with `://`), valid for
    /// `days`, usable by a server and a client.
    pub fn issue(&self, names: &[String], days: i64) -> Result<Issued, TrustError> {
        let key = KeyPair::generate().map_err(gen_err("generating a key"))?;
        let mut p = CertificateParams::default();
        for n in names {
            let san = if let Ok(ip) = n.parse::<std::net::IpAddr>() {
                SanType::IpAddress(ip)
            } else if n.contains("://") {
                SanType::URI(n.clone().try_into().map_err(gen_err(n))?)
            } else {
                SanType::DnsName(n.clone().try_into().map_err(gen_err(n))?)
            };
            p.subject_alt_names.push(san);
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + Duration::days(days);
        let cert = p.signed_by(&key, &self.issuer).map_err(gen_err("signing a certificate"))?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issue a leaf for `names` and write it as `DIR/STEM.pem` and `DIR/STEM-key.pem`.
    pub fn write_leaf(&self, dir: &Path, stem: &str, names: &[String], days: i64) -> Result<Vec<PathBuf>, TrustError> {
        let i = self.issue(names, days)?;
        Ok(vec![
            write(dir, &format!("{stem}.pem"), &i.cert_pem, false)?,
            write(dir, &format!("{stem}-key.pem"), &i.key_pem, true)?,
        ])
    }
}

/// Write `name` in `dir` through a temporary file and a rename, so a process watching the file
/// never reads half of it.
fn write(dir: &Path, name: &str, text: &str, secret: bool) -> Result<PathBuf, TrustError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |e: std::io::Error| TrustError::Config(format!("writing {}: {e}", path.display()));
    std::fs::write(&tmp, text).map_err(io)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(path)
}

/// Names every certificate of a local cluster carries besides its identity, so tools that check
/// host names (grpcurl, etcd's clients) accept them on this machine.
pub const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Write a CA (reusing the one already in `dir`) and certificates for `coordinator`, `admin`,
/// `client`, `etcd` and `worker.<id>` for each of `workers` into `dir`, each also naming
/// [`LOCAL_NAMES`] and `hosts`. Returns the files written.
pub fn generate(dir: &Path, workers: &[String], hosts: &[String]) -> Result<Vec<PathBuf>, TrustError> {
    for w in workers {
        expertmesh_core::limits::check_id("worker id", w).map_err(TrustError::Config)?;
    }
    std::fs::create_dir_all(dir).map_err(|e| TrustError::Config(format!("creating {}: {e}", dir.display())))?;
    let mut written = Vec::new();
    let ca = match Authority::open(dir)? {
        Some(ca) => ca,
        None => {
            let ca = Authority::create("ExpertMesh cluster CA")?;
            written.extend(ca.save(dir)?);
            ca
        }
    };
    let extra: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).chain(hosts.iter().cloned()).collect();
    let mut stems: Vec<String> = ["coordinator", "admin", "client", "etcd"].iter().map(|s| s.to_string()).collect();
    stems.extend(workers.iter().map(|w| format!("worker.{w}")));
    for stem in stems {
        let mut names = vec![stem.clone()];
        names.extend(extra.iter().cloned());
        written.extend(ca.write_leaf(dir, &stem, &names, 365)?);
    }
    Ok(written)
}
