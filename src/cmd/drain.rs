//! `expertmesh drain`: move a worker's experts away, then let it leave.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use expertmesh_cluster::control::connect_coordinator;
use expertmesh_proto::v1::{ClusterStatusRequest, DrainRequest};

use crate::env;
use crate::tls::TlsArgs;

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// The worker to drain (its id, as `expertmesh status` lists it). From a worker's own
    /// environment (a Kubernetes preStop hook), its `EXPERTMESH_WORKER_ID`.
    #[arg(env = env::WORKER_ID)]
    pub(crate) worker_id: String,
    /// Coordinator address; several, comma-separated: the first that answers.
    #[arg(long, env = env::COORDINATOR)]
    pub(crate) coordinator: String,
    /// Wait at most this long for the worker to leave the cluster (0: do not wait).
    #[arg(long, default_value_t = 60)]
    pub(crate) wait_s: u64,
    /// An `admin` certificate, when the cluster runs mutual TLS.
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

pub(crate) async fn run(a: DrainArgs) -> Result<()> {
    let tls = a.tls.load()?;
    let mut c = connect_coordinator(&a.coordinator, Duration::from_secs(5), tls.as_ref()).await?;
    let r = c.drain(DrainRequest { worker_id: a.worker_id.clone() }).await?.into_inner();
    if !r.will_move {
        eprintln!(
            "warning: no other worker can take {}'s experts; it stays until another joins or it is stopped",
            a.worker_id
        );
    }
    if a.wait_s == 0 {
        println!("drain of {} requested", a.worker_id);
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.wait_s);
    loop {
        let s = c.cluster_status(ClusterStatusRequest {}).await?.into_inner();
        let present = s.workers.iter().any(|w| w.info.as_ref().is_some_and(|i| i.worker_id == a.worker_id));
        if !present {
            println!("{} drained and left; placement epoch {}", a.worker_id, s.current_epoch);
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} has not left after {} s; `expertmesh status` shows where it stands", a.worker_id, a.wait_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
