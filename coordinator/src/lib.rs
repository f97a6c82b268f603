//! ExpertMesh control plane: membership (workers' keys under their leases), leader election,
//! placement epochs (propose, workers load and report ready, commit), drains, load statistics
//! and cluster status, all kept in the metadata store of `expertmesh-cluster` (embedded, or a
//! real etcd).

pub mod error;
pub mod rebalance;
pub mod service;

pub use error::{CoordinatorError, Result};
pub use service::{serve, CoordinatorConfig};
