//! ExpertMesh control plane: membership (workers' keys under their leases), leader election,
//! placement epochs (propose, workers load and report ready, commit), drains, load statistics
//! and cluster status, all kept in a [`store::MetadataStore`] (embedded, or a real etcd).

pub mod error;
pub mod keys;
pub mod service;
pub mod store;
pub mod validate;

pub use error::{CoordinatorError, Result};
pub use service::{serve, CoordinatorConfig};
