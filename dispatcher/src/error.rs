use expertmesh_core::CoreError;
use expertmesh_kernels::KernelError;

/// The metadata key that carries a worker's placement epoch on a "not held" answer.
pub const EPOCH_METADATA: &str = "x-expertmesh-epoch";

/// Errors of the data plane. Each maps to one gRPC status code, and a status received from a
/// peer maps back to the same variant ([`Error::from`]), so a client branches on the class
/// a server meant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something wrong (shape, dtype, layer, token id, NaN, a size over a
    /// limit...). INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidInput(String),
    /// The checkpoint is missing a tensor or has a wrong one.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The worker does not hold an expert it was asked for: its placement moved on (its epoch is
    /// `epoch`). FAILED_PRECONDITION with the epoch in `x-expertmesh-epoch`.
    #[error("{detail}")]
    NotHeld { epoch: u64, detail: String },
    /// No worker can serve some experts right now. UNAVAILABLE: retrying (elsewhere) is safe.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An admission limit (in-flight bytes, streams per peer) is reached. RESOURCE_EXHAUSTED.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The path to a live destination closed (its NCCL group ended because a member left):
    /// send again, by another path. UNAVAILABLE to an outside caller; a dispatcher retries the
    /// rows without holding it against the destination.
    #[error("link closed: {0}")]
    LinkClosed(String),
    /// The request's deadline passed before it was done. DEADLINE_EXCEEDED.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Any other status a peer answered.
    #[error("rpc: {0}")]
    Rpc(tonic::Status),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Strip the prefix `Display` adds to a variant, so a round trip does not stack prefixes.
fn strip<'a>(msg: &'a str, prefix: &str) -> &'a str {
    msg.strip_prefix(prefix).unwrap_or(msg)
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let m = s.message();
        match s.code() {
            Code::InvalidArgument => Error::InvalidInput(m.to_string()),
            Code::FailedPrecondition => match s.metadata().get(EPOCH_METADATA).and_then(|v| v.to_str().ok()) {
                Some(e) => Error::NotHeld { epoch: e.parse().unwrap_or(0), detail: m.to_string() },
                None => Error::Rpc(s),
            },
            Code::Unavailable => Error::Unavailable(strip(m, "unavailable: ").to_string()),
            Code::ResourceExhausted => Error::ResourceExhausted(strip(m, "resource exhausted: ").to_string()),
            Code::DeadlineExceeded => Error::DeadlineExceeded(strip(m, "deadline exceeded: ").to_string()),
            _ => Error::Rpc(s),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::InvalidInput(_) => Status::invalid_argument(e.to_string()),
            Error::Core(CoreError::InvalidInput(_)) => Status::invalid_argument(e.to_string()),
            Error::NotHeld { epoch, .. } => {
                let mut s = Status::failed_precondition(e.to_string());
                if let Ok(v) = epoch.to_string().parse() {
                    s.metadata_mut().insert(EPOCH_METADATA, v);
                }
                s
            }
            Error::Unavailable(_) | Error::LinkClosed(_) => Status::unavailable(e.to_string()),
            Error::ResourceExhausted(_) => Status::resource_exhausted(e.to_string()),
            Error::DeadlineExceeded(_) => Status::deadline_exceeded(e.to_string()),
            Error::Rpc(s) => Status::new(s.code(), s.message().to_string()),
            Error::Kernel(KernelError::Shape(_)) => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every class a server sends comes back as the same variant on the client.
    #[test]
    fn errors_round_trip_through_status() {
        let back = |e: Error| Error::from(tonic::Status::from(e));
        assert!(matches!(back(Error::InvalidInput("x".into())), Error::InvalidInput(m) if m == "x"));
        match back(Error::NotHeld { epoch: 7, detail: "w1 does not hold layer 3 expert 5".into() }) {
            Error::NotHeld { epoch, detail } => {
                assert_eq!(epoch, 7);
                assert_eq!(detail, "w1 does not hold layer 3 expert 5");
            }
            other => panic!("not held came back as {other:?}"),
        }
        assert!(matches!(back(Error::Unavailable("u".into())), Error::Unavailable(m) if m == "u"));
        assert!(matches!(back(Error::ResourceExhausted("r".into())), Error::ResourceExhausted(m) if m == "r"));
        assert!(matches!(back(Error::DeadlineExceeded("d".into())), Error::DeadlineExceeded(m) if m == "d"));
        assert!(matches!(back(Error::Internal("i".into())), Error::Rpc(s) if s.code() == tonic::Code::Internal));
        // A FAILED_PRECONDITION without the epoch is not a placement answer.
        let plain = Error::from(tonic::Status::failed_precondition("other"));
        assert!(matches!(plain, Error::Rpc(_)));
    }
}
