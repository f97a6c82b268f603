//! ExpertMesh data plane: checkpoint loading, the expert service a worker serves, the
//! dispatcher (gate, route, pack, send, combine) and the in-process MoE layer.

pub mod checkpoint;
pub mod error;
pub mod synth;

pub use checkpoint::Checkpoint;
pub use error::{Result, WorkerError};
pub mod compute;
pub mod control;
pub mod dispatcher;
pub mod moe;
pub mod node;
pub mod service;
pub mod wire;
