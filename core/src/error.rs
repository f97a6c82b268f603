use thiserror::Error;

/// Errors from model-spec parsing, gating and placement.
#[derive(Debug, Error)]
pub enum CoreError {
    #[error("config.json: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("placement: {0}")]
    Placement(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
