//! ExpertMesh worker: the expert service it serves, its node (registration with the control
//! plane, loading the experts of each placement epoch, draining), admission limits, and
//! synthetic checkpoints. The dispatcher, checkpoint reading and the in-process layer live in
//! `expertmesh-dispatcher`.

pub mod admission;
pub mod client;
pub mod error;
pub mod limits;
pub mod links;
pub mod metrics;
pub mod node;
pub mod progress;
pub mod readiness;
pub mod service;
pub mod synth;

pub use error::{Result, WorkerError};
