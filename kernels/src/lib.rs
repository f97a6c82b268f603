//! ExpertMesh expert backends.
//!
//! [`ExpertBackend`] is the seam: the CPU backend ([`cpu::CpuBackend`]) is always built; other
//! device kinds resolve through [`backend_for_device`], which answers a typed error when the
//! backend is not in this build, so call sites need no `#[cfg]`.

use std::sync::Arc;

use thiserror::Error;

pub mod cpu;

/// Errors from a backend.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("device `{device}` is not available in this build: {reason}")]
    NotCompiledIn { device: String, reason: String },
    #[error("unknown device `{0}`; expected cpu, cuda:N or npu:N")]
    UnknownDevice(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// One FFN's weights as the checkpoint lays them out, decoded to f32.
#[derive(Debug, Clone)]
pub struct FfnWeights {
    pub hidden: usize,
    pub ffn: usize,
    /// W1 (gate) [ffn, hidden].
    pub w1: Vec<f32>,
    /// W3 (up) [ffn, hidden].
    pub w3: Vec<f32>,
    /// W2 (down) [hidden, ffn].
    pub w2: Vec<f32>,
    /// SwiGLU clamp: gate <= limit, -limit <= up <= limit.
    pub swiglu_limit: Option<f32>,
}

/// An FFN resident on a backend.
pub trait LoadedFfn: Send + Sync + std::fmt::Debug {
    /// `out[rows, hidden] = W2 (silu(W1 x) * (W3 x))` for `x[rows, hidden]`.
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()>;
    /// Bytes the weights occupy on the device.
    fn bytes(&self) -> u64;
    fn hidden(&self) -> usize;
}

/// A compute backend for expert FFNs and the router's product.
pub trait ExpertBackend: Send + Sync + std::fmt::Debug {
    fn name(&self) -> String;
    fn load_ffn(&self, w: FfnWeights) -> Result<Arc<dyn LoadedFfn>>;
    /// `out[m, n] = a[m, k] . b[n, k]^T`.
    fn matmul_nt(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) -> Result<()>;
}

/// The backend for a device name: `cpu`, `cuda:N`, `npu:N`.
pub fn backend_for_device(device: &str) -> Result<Arc<dyn ExpertBackend>> {
    let kind = device.split(':').next().unwrap_or_default();
    match kind {
        "cpu" => Ok(Arc::new(cpu::CpuBackend::new())),
        "cuda" | "npu" => Err(KernelError::NotCompiledIn {
            device: device.to_string(),
            reason: format!("this build has only the cpu backend; the {kind} backend is not implemented yet"),
        }),
        _ => Err(KernelError::UnknownDevice(device.to_string())),
    }
}
