//! A GPU worker's NCCL group (feature `nccl`): the dispatcher in this worker reaches the other
//! GPU workers of its node over one NCCL communicator per placement epoch instead of gRPC.
//!
//! - Proposed plan: as rank 0 of a group, make its unique id (or keep the live group's id when
//!   the members did not change) and report it with readiness.
//! - Committed plan: the plan carries the id; every member joins (ncclCommInitRank, on a
//!   thread of its own, bounded by [`JOIN_LIMIT`]) and starts the group's rounds; the
//!   dispatcher sends to members over it from then on. Until then, and if joining fails, it
//!   sends by gRPC. A group whose members did not change is kept as it is.
//! - The group an epoch replaced stops taking new sends at once; it is left once nothing is in
//!   flight on it (or after [`DRAIN_LIMIT`]); sends still queued anywhere in it are answered
//!   "not held" at the new epoch, and their dispatchers resend them by the new placement.

use std::sync::Arc;
use std::time::Duration;

use expertmesh_dispatcher::collective::{CollectiveTransport, ComputeSink, GroupInfo};
use expertmesh_dispatcher::transport::RoutedTransport;
use expertmesh_kernels::ExpertBackend;
use expertmesh_proto::v1::PlacementPlan;
use tracing::{info, warn};

/// Longest wait for every member to join a new communicator.
pub const JOIN_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for sends in flight on a replaced group before leaving it anyway.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// A round slower than this means a member died mid-exchange: the link is aborted.
pub const ROUND_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Live {
    members: Vec<String>,
    addresses: Vec<String>,
    id: Vec<u8>,
    transport: Arc<CollectiveTransport>,
}

/// This worker's part in NCCL groups.
pub struct Links {
    worker_id: String,
    routed: Arc<RoutedTransport>,
    backend: Arc<dyn ExpertBackend>,
    sink: Arc<dyn ComputeSink>,
    live: tokio::sync::Mutex<Option<Live>>,
    /// The newest committed epoch handled (commits are handled in their own tasks).
    handled: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").field("worker_id", &self.worker_id).finish()
    }
}

/// Whether a worker on `backend` can join NCCL groups: a CUDA device, a build with the `nccl`
/// feature, and libnccl loadable.
pub fn capable(backend: &dyn ExpertBackend) -> bool {
    #[cfg(feature = "nccl")]
    {
        backend.as_any().is::<expertmesh_kernels::cuda::CudaBackend>()
            && expertmesh_kernels::nccl::nccl_available().is_ok()
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = backend;
        false
    }
}

impl Links {
    pub fn new(
        worker_id: String,
        routed: Arc<RoutedTransport>,
        backend: Arc<dyn ExpertBackend>,
        sink: Arc<dyn ComputeSink>,
    ) -> Self {
        Self {
            worker_id,
            routed,
            backend,
            sink,
            live: tokio::sync::Mutex::new(None),
            handled: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The group links in use (one, or two while an epoch replaces a group), newest first.
    pub fn groups(&self) -> Vec<Arc<CollectiveTransport>> {
        self.routed.groups()
    }

    /// The transport this worker's dispatcher sends with.
    pub fn transport(&self) -> Arc<dyn expertmesh_dispatcher::ExpertTransport> {
        self.routed.clone()
    }

    /// For a proposed plan: the (group, unique id) to report as its rank 0, if this worker is.
    pub async fn id_to_report(&self, plan: &PlacementPlan) -> Option<(String, Vec<u8>)> {
        let g = expertmesh_cluster::groups::led_by(plan, &self.worker_id)?;
        let live = self.live.lock().await;
        if let Some(l) = live.as_ref().filter(|l| l.members == g.members && l.transport.stopped().is_none()) {
            return Some((g.name.clone(), l.id.clone()));
        }
        drop(live);
        match new_id() {
            Ok(id) => Some((g.name.clone(), id)),
            Err(e) => {
                warn!(group = %g.name, epoch = plan.epoch, error = %e, "cannot make the NCCL group's id; its members talk gRPC this epoch");
                None
            }
        }
    }

    /// For a committed plan: keep, form or leave this worker's group.
    pub async fn on_committed(&self, plan: &PlacementPlan) {
        let mine = plan.nccl_groups.iter().find(|g| g.members.contains(&self.worker_id));
        let wanted = mine.and_then(|g| {
            let addresses: Option<Vec<String>> = g
                .members
                .iter()
                .map(|m| plan.workers.iter().find(|w| &w.worker_id == m).map(|w| w.address.clone()))
                .collect();
            let rank = g.members.iter().position(|m| m == &self.worker_id)?;
            (!g.unique_id.is_empty())
                .then(|| (g.name.clone(), g.members.clone(), addresses, g.unique_id.to_vec(), rank))
        });
        let mut live = self.live.lock().await;
        if self.handled.fetch_max(plan.epoch, std::sync::atomic::Ordering::AcqRel) >= plan.epoch {
            return;
        }
        if let (Some(l), Some((_, members, Some(addresses), id, _))) = (live.as_ref(), wanted.as_ref()) {
            if &l.members == members && &l.addresses == addresses && &l.id == id && l.transport.stopped().is_none() {
                return;
            }
        }
        if let Some(old) = live.take() {
            self.retire(old, plan.epoch);
        }
        let Some((name, members, Some(addresses), id, rank)) = wanted else { return };
        let group = GroupInfo { name: name.clone(), epoch: plan.epoch, members: addresses.clone() };
        match self.join(group, id.clone(), rank).await {
            Ok(t) => {
                info!(group = %name, epoch = plan.epoch, rank, size = members.len(), "NCCL group joined; members are reached over it");
                self.routed.add_group(t.clone());
                *live = Some(Live { members, addresses, id, transport: t });
            }
            Err(e) => {
                warn!(group = %name, epoch = plan.epoch, error = %e, "cannot join the NCCL group; its members are reached by gRPC");
            }
        }
    }

    /// Stop sending over `old`; leave it once nothing is in flight on it.
    fn retire(&self, old: Live, epoch: u64) {
        let t = old.transport;
        self.routed.remove_groups(|g| std::ptr::eq(g, &*t));
        tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            while t.in_flight() > 0 && t0.elapsed() < DRAIN_LIMIT {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            t.leave_for(epoch);
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        });
    }

    /// Leave the group (the worker stops).
    pub async fn shutdown(&self) {
        if let Some(l) = self.live.lock().await.take() {
            self.routed.remove_groups(|_| true);
            let t = l.transport;
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
    }

    #[cfg(feature = "nccl")]
    async fn join(&self, group: GroupInfo, id: Vec<u8>, rank: usize) -> Result<Arc<CollectiveTransport>, String> {
        use expertmesh_kernels::cuda::CudaBackend;
        use expertmesh_kernels::nccl::NcclFabric;
        let cuda = self
            .backend
            .as_any()
            .downcast_ref::<CudaBackend>()
            .cloned()
            .ok_or_else(|| "this worker's backend is not CUDA".to_string())?;
        let size = group.members.len();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // ncclCommInitRank blocks until every member joined: on a thread of its own, so a
        // member that never comes costs one parked thread, not the worker.
        std::thread::Builder::new()
            .name("em-nccl-join".into())
            .spawn(move || {
                let _ = tx.send(NcclFabric::join(&cuda, &id, rank, size));
            })
            .map_err(|e| e.to_string())?;
        let fabric = match tokio::time::timeout(JOIN_LIMIT, rx).await {
            Ok(Ok(Ok(f))) => f,
            Ok(Ok(Err(e))) => return Err(e.to_string()),
            Ok(Err(_)) => return Err("the join thread ended without an answer".into()),
            Err(_) => return Err(format!("not every member joined within {JOIN_LIMIT:?}")),
        };
        CollectiveTransport::start(group, fabric, self.sink.clone(), ROUND_LIMIT)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }

    #[cfg(not(feature = "nccl"))]
    async fn join(&self, _group: GroupInfo, _id: Vec<u8>, _rank: usize) -> Result<Arc<CollectiveTransport>, String> {
        let _ = (&self.backend, &self.sink);
        Err("this build has no NCCL (the `nccl` feature)".into())
    }
}

#[cfg(feature = "nccl")]
fn new_id() -> Result<Vec<u8>, String> {
    expertmesh_kernels::nccl::unique_id().map(|id| id.to_vec()).map_err(|e| e.to_string())
}

#[cfg(not(feature = "nccl"))]
fn new_id() -> Result<Vec<u8>, String> {
    Err("this build has no NCCL (the `nccl` feature)".into())
}
