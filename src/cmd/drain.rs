//! `expertmesh drain`: move a worker's experts away, then let it leave.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use expertmesh_cluster::control::connect_coordinator;
use expertmesh_proto::v1::{ClusterStatusRequest, DrainRequest};

use crate::env;
use crate::shared;
use crate::tls::TlsArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Until {
    Left,
    Moved,
}

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// The worker to drain (its id, as `expertmesh status` lists it). From a worker's own
    /// environment (a Kubernetes preStop hook), its `EXPERTMESH_WORKER_ID`.
    #[arg(env = env::WORKER_ID)]
    pub(crate) worker_id: String,
    /// Coordinator address; several, comma-separated: the first that answers.
    #[arg(long, env = env::COORDINATOR, value_parser = shared::addresses)]
    pub(crate) coordinator: String,
    /// Wait at most this long (0: do not wait) for what `--until` names.
    #[arg(long, default_value_t = 60)]
    pub(crate) wait_s: u64,
    /// What to wait for: `left` (the worker has left the cluster) or `moved` (a committed
    /// placement holds none of its experts; it is leaving). A Kubernetes preStop hook waits for
    /// `moved`, so the hook ends before the worker's own exit would cut it short.
    #[arg(long, value_enum, default_value_t = Until::Left)]
    pub(crate) until: Until,
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
        if a.until == Until::Moved {
            return Ok(());
        }
    }
    if a.wait_s == 0 {
        println!("drain of {} requested", a.worker_id);
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.wait_s);
    loop {
        let s = c.cluster_status(ClusterStatusRequest {}).await?.into_inner();
        let me = s.workers.iter().find(|w| w.info.as_ref().is_some_and(|i| i.worker_id == a.worker_id));
        match me {
            None => {
                println!("{} drained and left; placement epoch {}", a.worker_id, s.current_epoch);
                return Ok(());
            }
            Some(w) if a.until == Until::Moved && w.draining && w.experts_held == 0 => {
                println!("{}'s experts moved away in placement epoch {}; it is leaving", a.worker_id, s.current_epoch);
                return Ok(());
            }
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            let what = match a.until {
                Until::Left => "has not left",
                Until::Moved => "still holds experts",
            };
            bail!("{} {what} after {} s; `expertmesh status` shows where it stands", a.worker_id, a.wait_s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
