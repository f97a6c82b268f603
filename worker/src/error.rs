//! The worker's errors are the data plane's ([`expertmesh_dispatcher::Error`]): each maps to
//! one gRPC status code and back.

pub use expertmesh_dispatcher::error::{Error as WorkerError, Result, EPOCH_METADATA};

/// A control-plane error in the data plane's classes.
pub fn from_cluster(e: expertmesh_cluster::ClusterError) -> WorkerError {
    use expertmesh_cluster::ClusterError as C;
    match e {
        C::InvalidInput(m) => WorkerError::InvalidInput(m),
        C::Unavailable(m) => WorkerError::Unavailable(m),
        C::Store(_) => WorkerError::Unavailable(e.to_string()),
        C::Rpc(s) => WorkerError::from(s),
    }
}
