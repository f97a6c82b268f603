//! ExpertMesh control plane: membership (leases kept by heartbeats), placement epochs
//! (propose, workers load and report ready, commit), load statistics, cluster status, all
//! persisted through a [`store::MetadataStore`].

pub mod error;
pub mod service;
pub mod store;

pub use error::{CoordinatorError, Result};
pub use service::{serve, CoordinatorConfig};
