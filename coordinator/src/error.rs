use thiserror::Error;

/// Errors of the control plane.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Cluster(#[from] expertmesh_cluster::ClusterError),
    #[error("{0}")]
    InvalidInput(String),
    #[error(transparent)]
    Core(#[from] expertmesh_core::CoreError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        match e {
            CoordinatorError::InvalidInput(_) => tonic::Status::invalid_argument(e.to_string()),
            CoordinatorError::Cluster(e) => tonic::Status::from(e),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}
