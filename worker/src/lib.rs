//! ExpertMesh data plane: checkpoint loading, the expert service a worker serves, the
//! dispatcher (gate, route, pack, send, combine) and the in-process MoE layer.

pub mod admission;
pub mod checkpoint;
pub mod client;
pub mod compute;
pub mod control;
pub mod dispatcher;
pub mod error;
pub mod health;
pub mod limits;
pub mod moe;
pub mod node;
pub mod service;
pub mod synth;
pub mod wire;

pub use checkpoint::Checkpoint;
pub use error::{Result, WorkerError};
