//! ExpertMesh capacity planner: for a MoE model, precisions, a hardware inventory, a workload and
//! a parallel layout, estimate per-device memory (and whether it fits), the expert placement
//! (the coordinator's own placement code), dispatch/combine traffic per layer, a roofline step
//! time with and without compute/communication overlap, and tokens/s; or search for the
//! smallest inventory that meets a target. Equations and how rough each one is: docs/planner.md.

pub mod arch;
pub mod estimate;
pub mod hardware;
pub mod report;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use arch::{Attention, ModelArch, ParamCounts};
pub use estimate::{evaluate, search, Estimate, Layout, Phase, PlanInput, SearchResult, Workload};
pub use hardware::{Catalog, DeviceSpec, Inventory, Pool};

/// Errors a planner user can act on: each names what was wrong and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("model: {0}")]
    Model(String),
    #[error("hardware: {0}")]
    Hardware(String),
    #[error("inventory: {0}")]
    Inventory(String),
    #[error("layout: {0}")]
    Layout(String),
    #[error("workload: {0}")]
    Workload(String),
    #[error("placement: {0}")]
    Placement(String),
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;

/// Storage precision of weights or KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp4,
    Fp8,
    Int8,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Precision::Fp4, Precision::Fp8, Precision::Int8, Precision::Bf16];

    /// Bytes per stored element, scales included: FP4 as MXFP4 (one e8m0 scale per 32 values),
    /// FP8 e4m3 with one f32 scale per 128x128 block (DeepSeek's format), INT8 per-channel scales
    /// (negligible), BF16 none.
    pub fn bytes(self) -> f64 {
        match self {
            Precision::Fp4 => 0.5 + 1.0 / 32.0,
            Precision::Fp8 => 1.0 + 4.0 / (128.0 * 128.0),
            Precision::Int8 => 1.0,
            Precision::Bf16 => 2.0,
        }
    }

    /// Bytes per cached KV element: FP8 and INT8 with per-tensor scales, FP4 with one FP8 scale
    /// per 16 values (NVFP4), BF16 as is.
    pub fn kv_bytes(self) -> f64 {
        match self {
            Precision::Fp4 => 0.5 + 1.0 / 16.0,
            Precision::Fp8 | Precision::Int8 => 1.0,
            Precision::Bf16 => 2.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp4 => "fp4",
            Precision::Fp8 => "fp8",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp4" | "mxfp4" | "nvfp4" => Ok(Precision::Fp4),
            "fp8" | "e4m3" => Ok(Precision::Fp8),
            "int8" | "w8a8" => Ok(Precision::Int8),
            "bf16" | "bfloat16" | "fp16" => Ok(Precision::Bf16),
            other => Err(PlanError::Workload(format!("unknown precision `{other}`; expected fp4, fp8, int8 or bf16"))),
        }
    }
}

/// The precisions a plan stores weights and KV cache in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Precisions {
    /// Routed experts.
    pub experts: Precision,
    /// Attention, dense FFN, shared experts and router weights.
    pub attention: Precision,
    pub kv_cache: Precision,
}

impl Default for Precisions {
    fn default() -> Self {
        Precisions { experts: Precision::Fp8, attention: Precision::Fp8, kv_cache: Precision::Bf16 }
    }
}

pub(crate) const GB: f64 = 1e9;
