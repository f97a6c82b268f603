//! Expert weights as a checkpoint stores them: row-major matrices in their stored dtype, with
//! FP8 block scales alongside. Nothing here is dequantised; a backend packs these bytes into its
//! own resident layout.

use std::borrow::Cow;

use expertmesh_core::dtype::DType;

use crate::{KernelError, Result};

/// Per-block dequantisation factors of an FP8 matrix (`weight_scale_inv`): element (r, c)
/// is `fp8(r, c) * values[(r / br) * ceil(cols / bc) + c / bc]`.
#[derive(Debug, Clone)]
pub struct BlockScales {
    /// (br, bc): rows and columns of one block.
    pub block: (usize, usize),
    pub values: Vec<f32>,
}

/// One projection matrix `[rows, cols]` (rows = outputs, cols = inputs), little-endian.
#[derive(Debug, Clone)]
pub struct StoredMatrix<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: Cow<'a, [u8]>,
    /// Present exactly when `dtype` is FP8 e4m3.
    pub scales: Option<BlockScales>,
}

impl StoredMatrix<'_> {
    /// Bytes this matrix takes in the checkpoint (data and scales).
    pub fn stored_bytes(&self) -> u64 {
        (self.data.len() + self.scales.as_ref().map_or(0, |s| s.values.len() * 4)) as u64
    }

    /// Check sizes, dtype and scales; `what` names the matrix in errors.
    pub fn check(&self, what: &str, rows: usize, cols: usize) -> Result<()> {
        let bad = |m: String| Err(KernelError::Shape(format!("{what}: {m}")));
        if (self.rows, self.cols) != (rows, cols) {
            return bad(format!("shape [{}, {}]; expected [{rows}, {cols}]", self.rows, self.cols));
        }
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3) {
            return bad(format!("dtype {}; expected f32, bf16, f16 or f8_e4m3", self.dtype.name()));
        }
        let need = rows.checked_mul(cols).and_then(|n| n.checked_mul(self.dtype.size()));
        if need != Some(self.data.len()) {
            return bad(format!(
                "{} bytes; [{rows}, {cols}] of {} needs {}",
                self.data.len(),
                self.dtype.name(),
                need.map_or("more than usize".into(), |n| n.to_string())
            ));
        }
        match (&self.scales, self.dtype) {
            (None, DType::F8E4M3) => bad("FP8 weights without block scales (`weight_scale_inv`)".into()),
            (Some(_), d) if d != DType::F8E4M3 => bad(format!("block scales given for {} weights", d.name())),
            (Some(s), _) => {
                let (br, bc) = s.block;
                if br == 0 || bc == 0 || bc % 2 != 0 {
                    return bad(format!("FP8 block [{br}, {bc}]; expected positive sizes with an even column count"));
                }
                let want = rows.div_ceil(br) * cols.div_ceil(bc);
                if s.values.len() != want {
                    return bad(format!(
                        "{} block scales; [{rows}, {cols}] in [{br}, {bc}] blocks needs {want}",
                        s.values.len()
                    ));
                }
                if let Some(i) = s.values.iter().position(|v| !v.is_finite()) {
                    return bad(format!("block scale {i} is {}; scales must be finite", s.values[i]));
                }
                // 0x7F and 0xFF are e4m3fn's NaNs; weights never hold them.
                if let Some(i) = self.data.iter().position(|b| b & 0x7F == 0x7F) {
                    return bad(format!("FP8 element {i} (row {}, column {}) is NaN", i / cols, i % cols));
                }
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }
}

/// One routed expert: gate (w1) and up (w3) `[ffn, hidden]`, down (w2) `[hidden, ffn]`.
#[derive(Debug, Clone)]
pub struct ExpertWeights<'a> {
    pub expert: u32,
    pub w1: StoredMatrix<'a>,
    pub w3: StoredMatrix<'a>,
    pub w2: StoredMatrix<'a>,
}

impl ExpertWeights<'_> {
    pub fn stored_bytes(&self) -> u64 {
        self.w1.stored_bytes() + self.w3.stored_bytes() + self.w2.stored_bytes()
    }
}

/// The experts of one layer that a backend is to hold.
#[derive(Debug, Clone)]
pub struct LayerWeights<'a> {
    pub layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    /// SwiGLU clamp (DeepSeek V4): gate <= limit, -limit <= up <= limit.
    pub swiglu_limit: Option<f32>,
    pub experts: Vec<ExpertWeights<'a>>,
}

impl LayerWeights<'_> {
    /// Check every matrix's shape, dtype and scales, and that no expert appears twice.
    pub fn check(&self) -> Result<()> {
        let (h, f) = (self.hidden, self.ffn);
        let mut seen = std::collections::HashSet::new();
        for e in &self.experts {
            if !seen.insert(e.expert) {
                return Err(KernelError::Shape(format!("layer {}: expert {} given twice", self.layer, e.expert)));
            }
            let name = |p: &str| format!("layer {} expert {} {p}", self.layer, e.expert);
            e.w1.check(&name("w1 (gate)"), f, h)?;
            e.w3.check(&name("w3 (up)"), f, h)?;
            e.w2.check(&name("w2 (down)"), h, f)?;
        }
        if let Some(l) = self.swiglu_limit {
            if !(l.is_finite() && l > 0.0) {
                return Err(KernelError::Shape(format!("swiglu_limit {l}; expected a positive finite value")));
            }
        }
        Ok(())
    }
}
