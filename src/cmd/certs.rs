//! `expertmesh certs`: a CA and certificates for a local or test cluster.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct CertsArgs {
    /// Directory to write into (created if missing). A CA already there (`ca.pem`,
    /// `ca-key.pem`) is reused, so running again re-issues the certificates under the same CA.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Certificates for workers `worker-0` .. `worker-{N-1}` (the ids `expertmesh up` gives).
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: usize,
    /// Worker ids instead of the numbered ones (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub(crate) worker_ids: Vec<String>,
    /// Extra DNS names or IPs every certificate carries (where tools check host names).
    #[arg(long, value_delimiter = ',')]
    pub(crate) host: Vec<String>,
}

pub(crate) fn run(a: CertsArgs) -> Result<()> {
    let ids: Vec<String> =
        if a.worker_ids.is_empty() { (0..a.workers).map(|i| format!("worker-{i}")).collect() } else { a.worker_ids };
    if ids.len() > 100_000 {
        bail!("--workers {}: at most 100000", ids.len());
    }
    let written = expertmesh_trust::certs::generate(&a.out, &ids, &a.host)?;
    let dir = a.out.display();
    eprintln!("wrote {} files in {dir}", written.len());
    println!(
        "# the CA: {dir}/ca.pem (its key, {dir}/ca-key.pem, signs more; keep it off the cluster)\n\
         expertmesh coordinator --tls-cert {dir}/coordinator.pem --tls-key {dir}/coordinator-key.pem --tls-ca {dir}/ca.pem ...\n\
         expertmesh worker --id {w} --tls-cert {dir}/worker.{w}.pem --tls-key {dir}/worker.{w}-key.pem --tls-ca {dir}/ca.pem ...\n\
         expertmesh status --tls-cert {dir}/admin.pem --tls-key {dir}/admin-key.pem --tls-ca {dir}/ca.pem ...",
        w = ids.first().map(String::as_str).unwrap_or("ID")
    );
    Ok(())
}
