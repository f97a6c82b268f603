use thiserror::Error;

/// Errors of the cluster state layer: the metadata store and the control-plane client.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// The metadata store failed or cannot be reached.
    #[error("metadata store: {0}")]
    Store(String),
    /// The caller gave something wrong (a store URL, an address).
    #[error("{0}")]
    InvalidInput(String),
    /// The control plane cannot be reached now; retrying is safe.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A status a coordinator answered.
    #[error("rpc: {0}")]
    Rpc(#[from] tonic::Status),
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

impl From<ClusterError> for tonic::Status {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::InvalidInput(_) => tonic::Status::invalid_argument(e.to_string()),
            ClusterError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
            ClusterError::Rpc(s) => s,
            ClusterError::Store(_) => tonic::Status::internal(e.to_string()),
        }
    }
}
