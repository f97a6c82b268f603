//! ExpertMesh cluster state, below both roles: the metadata store ([`store::MetadataStore`],
//! embedded or a real etcd), the key layout and value checks ([`keys`], [`validate`]), watches
//! that open with a full snapshot and then stream every change with no gap ([`watch`]), and the
//! control-plane client workers and dispatchers use ([`control`]: through a coordinator's gRPC
//! API, or straight to the store), and the Prometheus endpoint both roles serve ([`metrics_http`]).

pub mod backoff;
pub mod conns;
pub mod control;
pub mod error;
pub mod groups;
pub mod keys;
pub mod metrics_http;
pub mod store;
pub mod validate;
pub mod watch;

pub use error::{ClusterError, Result};
