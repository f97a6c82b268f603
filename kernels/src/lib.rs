//! ExpertMesh expert backends.
//!
//! The seam is per layer: [`ExpertBackend::load_layer`] makes the experts of one layer that a
//! worker holds one resident object ([`LayerExperts`]) with the weights in the checkpoint's
//! dtype, and [`LayerExperts::forward`] computes a whole batch whose rows are grouped by expert
//! ([`Groups`]). Activations live in the backend's own buffers ([`Rows`]: host memory on the
//! CPU, device memory on an accelerator), moved in and out with [`ExpertBackend::upload`] and
//! [`ExpertBackend::download`], so callers never touch a backend's memory directly.
//!
//! The CPU backend ([`cpu::CpuBackend`]) is always built; other device kinds resolve through
//! [`backend_for_device`], which answers a typed error when the backend is not in this build or its device cannot be used here.

use std::any::Any;
use std::sync::Arc;

use bytes::Bytes;
use expertmesh_core::dtype::DType;
use thiserror::Error;

pub mod bench;
pub mod conformance;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_plan;
pub mod fabric;
#[cfg(feature = "cuda")]
pub mod fake_driver;
#[cfg(feature = "nccl")]
pub mod nccl;
mod weights;

pub use bench::{probe, DeviceProbe};
pub use weights::{BlockScales, ExpertWeights, LayerWeights, StoredMatrix};

/// Errors from a backend.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The device cannot be used here: its backend is not in this build, it has no driver, or it
    /// lacks what the kernels need.
    #[error("device `{device}` is not available: {reason}")]
    Unavailable { device: String, reason: String },
    #[error("unknown device `{0}`; expected cpu, cuda:N or npu:N")]
    UnknownDevice(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("layer {layer} holds no expert {expert} on this backend")]
    NotResident { layer: usize, expert: u32 },
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Activations in host memory: `rows x cols` little-endian elements of `dtype` (bf16 or f32).
#[derive(Debug, Clone)]
pub struct HostRows {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: Bytes,
}

impl HostRows {
    pub fn new(dtype: DType, rows: usize, cols: usize, data: Bytes) -> Result<Self> {
        check_activation_dtype(dtype)?;
        let need = rows.checked_mul(cols).and_then(|n| n.checked_mul(dtype.size()));
        if need != Some(data.len()) {
            return Err(KernelError::Shape(format!(
                "{} bytes of activations; {rows} rows x {cols} of {} need {}",
                data.len(),
                dtype.name(),
                need.map_or("more than usize".into(), |n| n.to_string())
            )));
        }
        Ok(Self { dtype, rows, cols, data })
    }

    /// f32 rows as host activations.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Self::new(DType::F32, rows, cols, Bytes::from(data))
    }
}

/// Activations resident on a backend (its own memory: host for the CPU, device for CUDA).
pub trait Rows: Send + Sync + std::fmt::Debug {
    fn dtype(&self) -> DType;
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Which rows of a batch each expert takes: rows `offsets[i]..offsets[i + 1]` go to
/// `experts[i]`. An expert may appear more than once; groups may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Groups {
    pub experts: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl Groups {
    /// Groups from (expert, row count) segments in row order.
    pub fn from_counts(segments: impl IntoIterator<Item = (u32, usize)>) -> Self {
        let mut g = Groups { experts: Vec::new(), offsets: vec![0] };
        let mut end = 0;
        for (e, n) in segments {
            end += n;
            g.experts.push(e);
            g.offsets.push(end);
        }
        g
    }

    pub fn rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Check that the groups tile `0..rows` in order.
    pub fn check(&self, rows: usize) -> Result<()> {
        if self.offsets.len() != self.experts.len() + 1 || self.offsets.first() != Some(&0) {
            return Err(KernelError::Shape(format!(
                "{} expert groups need {} row offsets starting at 0; got {:?}",
                self.experts.len(),
                self.experts.len() + 1,
                self.offsets
            )));
        }
        if let Some(w) = self.offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(KernelError::Shape(format!(
                "row offsets decrease at group {w} ({} then {})",
                self.offsets[w],
                self.offsets[w + 1]
            )));
        }
        if self.rows() != rows {
            return Err(KernelError::Shape(format!("groups cover {} rows; the batch has {rows}", self.rows())));
        }
        Ok(())
    }
}

/// The experts of one layer resident on a backend, weights in the checkpoint's dtype.
pub trait LayerExperts: Send + Sync + std::fmt::Debug {
    fn layer(&self) -> usize;
    /// Expert ids held, ascending.
    fn experts(&self) -> Vec<u32>;
    fn holds(&self, expert: u32) -> bool;
    fn hidden(&self) -> usize;
    /// Bytes the weights occupy on the device.
    fn bytes(&self) -> u64;
    /// `out[r] = W2_e (silu(W1_e x[r]) * (W3_e x[r]))` for every row r of group e. `x` and `out`
    /// are `[rows, hidden]` buffers of this backend (bf16 or f32, not necessarily the same).
    /// bf16 activations on bf16 or FP8 weights use bf16 products with f32 accumulation;
    /// everything else is f32 math.
    fn forward(&self, x: &dyn Rows, groups: &Groups, out: &mut dyn Rows) -> Result<()>;
    /// The same layer holding only `keep` (already resident: nothing is loaded or copied).
    fn subset(&self, keep: &[u32]) -> Result<Arc<dyn LayerExperts>>;
    fn as_any(&self) -> &dyn Any;
}

/// A compute backend for a layer's experts, the shared expert and the router's product.
pub trait ExpertBackend: Send + Sync + std::fmt::Debug {
    fn name(&self) -> String;
    /// Make `w`'s experts resident, together with the experts `keep` of `prev` (already
    /// resident: not loaded again).
    fn load_layer(
        &self,
        w: LayerWeights<'_>,
        prev: Option<(&Arc<dyn LayerExperts>, &[u32])>,
    ) -> Result<Arc<dyn LayerExperts>>;
    /// Bytes one expert of this shape and dtype takes once resident.
    fn resident_bytes(&self, hidden: usize, ffn: usize, dtype: DType, block: Option<(usize, usize)>) -> u64;
    /// Move host activations into this backend's memory.
    fn upload(&self, rows: HostRows) -> Result<Box<dyn Rows>>;
    /// An output buffer of `rows x cols` in `dtype`.
    fn alloc(&self, dtype: DType, rows: usize, cols: usize) -> Result<Box<dyn Rows>>;
    /// Move activations back to host memory.
    fn download(&self, rows: Box<dyn Rows>) -> Result<HostRows>;
    /// `out[m, n] = a[m, k] . b[n, k]^T`, f32 in host memory (the router's product).
    fn matmul_nt(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) -> Result<()>;
    /// (free, total) bytes of the memory that holds this backend's weights.
    fn memory(&self) -> Result<(u64, u64)>;
    /// Device kind and index as a worker reports them: ("cpu", 0), ("cuda", 1).
    fn device(&self) -> (&'static str, u32);
    /// The concrete backend (a worker joining an NCCL group needs its CUDA backend).
    fn as_any(&self) -> &dyn Any;
}

/// A backend's own resident layer: what `load_layer` needs to keep experts of a previous one.
pub(crate) trait ResidentLayer<E: Clone>: 'static {
    /// (layer, hidden, ffn).
    fn shape(&self) -> (usize, usize, usize);
    fn expert(&self, id: u32) -> Option<&E>;
}

/// The experts `keep` of `prev` (a layer resident on the same backend, of `w`'s shape), for
/// `load_layer` to hold again without loading them.
pub(crate) fn kept_experts<L: ResidentLayer<E>, E: Clone>(
    prev: Option<(&Arc<dyn LayerExperts>, &[u32])>,
    w: &LayerWeights<'_>,
) -> Result<std::collections::BTreeMap<u32, E>> {
    let mut out = std::collections::BTreeMap::new();
    let Some((p, keep)) = prev else { return Ok(out) };
    let p = p
        .as_any()
        .downcast_ref::<L>()
        .ok_or_else(|| KernelError::Shape("the previous layer is resident on another backend".into()))?;
    let (layer, hidden, ffn) = p.shape();
    if (layer, hidden, ffn) != (w.layer, w.hidden, w.ffn) {
        return Err(KernelError::Shape(format!(
            "cannot extend layer {layer} (hidden {hidden}, ffn {ffn}) with layer {} (hidden {}, ffn {})",
            w.layer, w.hidden, w.ffn
        )));
    }
    for &e in keep {
        let x = p.expert(e).ok_or(KernelError::NotResident { layer, expert: e })?;
        out.insert(e, x.clone());
    }
    Ok(out)
}

/// Activations are bf16 or f32.
pub fn check_activation_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::BF16 | DType::F32 => Ok(()),
        d => Err(KernelError::Shape(format!("activations in {}; expected bf16 or f32", d.name()))),
    }
}

/// The backend for a device name: `cpu`, `cuda:N`, `npu:N`.
pub fn backend_for_device(device: &str) -> Result<Arc<dyn ExpertBackend>> {
    let (kind, index) = match device.split_once(':') {
        Some((k, i)) => (k, Some(i)),
        None => (device, None),
    };
    let ordinal = || -> Result<usize> {
        index.unwrap_or("0").parse().map_err(|_| KernelError::UnknownDevice(device.to_string()))
    };
    match kind {
        "cpu" if index.is_none() || index == Some("0") => Ok(Arc::new(cpu::CpuBackend::new())),
        "cuda" => cuda_backend(ordinal()?),
        "npu" => Err(KernelError::Unavailable {
            device: device.to_string(),
            reason: "there is no NPU backend yet; workers run on cpu or cuda:N".into(),
        }),
        _ => Err(KernelError::UnknownDevice(device.to_string())),
    }
}

#[cfg(feature = "cuda")]
fn cuda_backend(ordinal: usize) -> Result<Arc<dyn ExpertBackend>> {
    Ok(Arc::new(cuda::CudaBackend::new(ordinal)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(ordinal: usize) -> Result<Arc<dyn ExpertBackend>> {
    Err(KernelError::Unavailable {
        device: format!("cuda:{ordinal}"),
        reason: "this binary was built without the `cuda` feature; build it with \
                 `cargo build --release --features cuda,nccl`"
            .into(),
    })
}
