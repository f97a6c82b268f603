//! Every environment variable ExpertMesh reads, in one place.

pub(crate) const LOG: &str = "EXPERTMESH_LOG";
pub(crate) const LOG_FORMAT: &str = "EXPERTMESH_LOG_FORMAT";
pub(crate) const COORDINATOR: &str = "EXPERTMESH_COORDINATOR";
pub(crate) const LISTEN: &str = "EXPERTMESH_LISTEN";
pub(crate) const ADVERTISE: &str = "EXPERTMESH_ADVERTISE";
pub(crate) const MODEL: &str = "EXPERTMESH_MODEL";
pub(crate) const WORKER_ID: &str = "EXPERTMESH_WORKER_ID";
pub(crate) const NODE: &str = "EXPERTMESH_NODE";
pub(crate) const DEVICE: &str = "EXPERTMESH_DEVICE";
pub(crate) const MEMORY_GIB: &str = "EXPERTMESH_MEMORY_GIB";
pub(crate) const EXPECT_WORKERS: &str = "EXPERTMESH_EXPECT_WORKERS";
pub(crate) const REPLICAS: &str = "EXPERTMESH_REPLICAS";
pub(crate) const LEASE_TTL_MS: &str = "EXPERTMESH_LEASE_TTL_MS";
pub(crate) const CLUSTER: &str = "EXPERTMESH_CLUSTER";
pub(crate) const MAX_MESSAGE_MIB: &str = "EXPERTMESH_MAX_MESSAGE_MIB";
pub(crate) const WIRE_DTYPE: &str = "EXPERTMESH_WIRE_DTYPE";
pub(crate) const PLACEMENT_WAIT_MS: &str = "EXPERTMESH_PLACEMENT_WAIT_MS";
pub(crate) const STORE: &str = "EXPERTMESH_STORE";
pub(crate) const RPC_TIMEOUT_MS: &str = "EXPERTMESH_RPC_TIMEOUT_MS";
pub(crate) const DRAIN_TIMEOUT_MS: &str = "EXPERTMESH_DRAIN_TIMEOUT_MS";
