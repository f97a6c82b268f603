use expertmesh_core::CoreError;
use expertmesh_kernels::KernelError;
use thiserror::Error;

/// Errors of the data plane. Each maps to one gRPC status code.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The caller sent something wrong (shape, dtype, layer, token id, NaN...).
    #[error("{0}")]
    InvalidInput(String),
    /// The checkpoint is missing a tensor or has a wrong one.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The worker does not hold an expert it was asked for (placement moved on).
    #[error("worker {worker} does not hold layer {layer} expert {expert} (its placement epoch is {epoch}; the request used epoch {request_epoch})")]
    NotHeld { worker: String, layer: usize, expert: usize, epoch: u64, request_epoch: u64 },
    /// No worker can serve some experts right now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("rpc: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        use tonic::Status;
        match &e {
            WorkerError::InvalidInput(_) => Status::invalid_argument(e.to_string()),
            WorkerError::Core(CoreError::InvalidInput(_)) => Status::invalid_argument(e.to_string()),
            WorkerError::NotHeld { epoch, .. } => {
                let mut s = Status::failed_precondition(e.to_string());
                if let Ok(v) = epoch.to_string().parse() {
                    s.metadata_mut().insert("x-expertmesh-epoch", v);
                }
                s
            }
            WorkerError::Unavailable(_) => Status::unavailable(e.to_string()),
            WorkerError::Rpc(s) => Status::new(s.code(), s.message().to_string()),
            WorkerError::Kernel(KernelError::Shape(_)) => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}
