//! ExpertMesh core: the model spec (config.json and presets), gating, the float64 reference MoE
//! layer, placement algorithms and dtype codecs. No I/O and no async: callers hand in bytes.

pub mod balance;
pub mod config;
pub mod dtype;
pub mod error;
pub mod gating;
pub mod limits;
pub mod metrics;
pub mod placement;
pub mod reference;
pub mod rng;

pub use config::{Family, ModelSpec, Proj, Scoring};
pub use error::CoreError;
