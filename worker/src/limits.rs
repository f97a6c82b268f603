//! What one request may ask of a worker, checked before anything is allocated. Every size
//! derived from a request (tokens x hidden, the rows of a chunk and of a stream, chunk counts)
//! is computed with checked arithmetic and compared with a configured limit; a violation is an
//! INVALID_ARGUMENT that names the limit and the flag that sets it.

use expertmesh_core::dtype::{decode_f32, DType};
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::{ExpertBatch, Tensor};

use crate::error::{Result, WorkerError};
use expertmesh_dispatcher::wire::dtype_from_proto;

/// Per-request limits of a worker (flags of `expertmesh worker`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest gRPC message either way (`--max-message-mib`).
    pub max_message_bytes: usize,
    /// Most tokens in one `MoeLayer.Forward` (`--max-batch-tokens`).
    pub max_batch_tokens: usize,
    /// Most chunks in one `ExpertService.Compute` stream (`--max-stream-chunks`).
    pub max_stream_chunks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_message_bytes: 64 << 20, max_batch_tokens: 65_536, max_stream_chunks: 65_536 }
    }
}

impl Limits {
    /// Most rows one Compute stream may carry in total: every routed pair of the largest batch.
    pub fn max_stream_rows(&self, top_k: usize) -> usize {
        self.max_batch_tokens.saturating_mul(top_k.max(1))
    }
}

/// A checked `ExpertBatch`: what computing it will take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub dtype: DType,
    /// Rows in the chunk (sum of the segments' rows).
    pub rows: usize,
    /// Bytes the chunk occupies while it is decoded, computed and encoded (for admission).
    pub cost_bytes: u64,
}

/// Check one chunk against the model and the limits; no allocation, no arithmetic that can wrap.
pub fn check_batch(spec: &ModelSpec, limits: &Limits, b: &ExpertBatch) -> Result<BatchShape> {
    let dtype = dtype_from_proto(b.dtype, "ExpertBatch.dtype")?;
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(WorkerError::InvalidInput(format!(
            "ExpertBatch.dtype {} is not an activation dtype; expected f32, bf16 or f16",
            dtype.name()
        )));
    }
    if b.hidden as usize != spec.hidden {
        return Err(WorkerError::InvalidInput(format!(
            "ExpertBatch.hidden is {}; this model's hidden size is {}",
            b.hidden, spec.hidden
        )));
    }
    spec.check_moe_layer(b.layer as usize)?;
    if b.experts.len() != b.rows.len() {
        return Err(WorkerError::InvalidInput(format!(
            "ExpertBatch has {} experts but {} row counts; expected one count per expert",
            b.experts.len(),
            b.rows.len()
        )));
    }
    if let Some(e) = b.experts.iter().find(|&&e| e as usize >= spec.n_routed) {
        return Err(WorkerError::InvalidInput(format!(
            "expert {e} is out of range: layer {} has experts 0..{}",
            b.layer, spec.n_routed
        )));
    }
    let row_bytes = spec.hidden * dtype.size();
    // A chunk's rows must fit in one message, which bounds every product below.
    let max_rows = limits.max_message_bytes / row_bytes.max(1);
    let rows = b.rows.iter().try_fold(0usize, |acc, &r| acc.checked_add(r as usize)).filter(|&r| r <= max_rows);
    let Some(rows) = rows else {
        let total: u128 = b.rows.iter().map(|&r| r as u128).sum();
        return Err(WorkerError::InvalidInput(format!(
            "ExpertBatch has {total} rows; at hidden {} in {} a chunk holds at most {max_rows} rows (the {} MiB message limit, --max-message-mib)",
            spec.hidden,
            dtype.name(),
            limits.max_message_bytes >> 20
        )));
    };
    if rows == 0 {
        return Err(WorkerError::InvalidInput("ExpertBatch has no rows; expected at least 1".into()));
    }
    let need = rows * row_bytes; // <= max_message_bytes: no overflow
    if b.data.len() != need {
        return Err(WorkerError::InvalidInput(format!(
            "ExpertBatch.data has {} bytes; {rows} rows x hidden {} of {} need {need} (truncated tensor bytes)",
            b.data.len(),
            spec.hidden,
            dtype.name()
        )));
    }
    // Held while the chunk is in flight: its bytes, the f32 input and output, the encoded
    // answer, and one expert's intermediate activations [rows, 3 x ffn] in f32.
    let values = (rows * spec.hidden) as u64;
    let cost = need as u64 + values * 8 + values * dtype.size() as u64 + rows as u64 * spec.moe_ffn as u64 * 12;
    Ok(BatchShape { dtype, rows, cost_bytes: cost })
}

/// Order and totals of one Compute stream: chunks arrive numbered 0, 1, 2, ...; the stream's
/// chunk count and rows stay within the limits.
#[derive(Debug, Clone)]
pub struct StreamCheck {
    next: u64,
    rows: usize,
    max_rows: usize,
    max_chunks: usize,
}

impl StreamCheck {
    pub fn new(spec: &ModelSpec, limits: &Limits) -> Self {
        Self { next: 0, rows: 0, max_rows: limits.max_stream_rows(spec.top_k), max_chunks: limits.max_stream_chunks }
    }

    /// Admit chunk `chunk` with `rows` rows, or say what is wrong with it.
    pub fn admit(&mut self, chunk: u32, rows: usize) -> Result<()> {
        if u64::from(chunk) != self.next {
            return Err(WorkerError::InvalidInput(format!(
                "ExpertBatch.chunk is {chunk}; expected chunk {} (chunks of a stream are numbered 0, 1, 2, ... in order)",
                self.next
            )));
        }
        if self.next >= self.max_chunks as u64 {
            return Err(WorkerError::InvalidInput(format!(
                "the stream has more than {} chunks (--max-stream-chunks)",
                self.max_chunks
            )));
        }
        match self.rows.checked_add(rows).filter(|&r| r <= self.max_rows) {
            Some(r) => self.rows = r,
            None => {
                return Err(WorkerError::InvalidInput(format!(
                    "the stream carries more than {} rows (--max-batch-tokens x top-k)",
                    self.max_rows
                )))
            }
        }
        self.next += 1;
        Ok(())
    }
}

/// Check `hidden_states` of a Forward request ([T, hidden] of a float dtype, 1 <= T <= the
/// limit, data exactly T x hidden values); returns T. No allocation.
pub fn check_forward_shape(spec: &ModelSpec, limits: &Limits, t: &Tensor) -> Result<usize> {
    if t.shape.len() != 2 || t.shape[1] != spec.hidden as u64 {
        return Err(WorkerError::InvalidInput(format!(
            "hidden_states has shape {:?}; expected [T, {}] (hidden size {})",
            t.shape, spec.hidden, spec.hidden
        )));
    }
    let tokens = t.shape[0];
    if tokens == 0 {
        return Err(WorkerError::InvalidInput("hidden_states has 0 tokens; expected at least 1".into()));
    }
    if tokens > limits.max_batch_tokens as u64 {
        return Err(WorkerError::InvalidInput(format!(
            "hidden_states has {tokens} tokens; this worker takes at most {} per request (--max-batch-tokens)",
            limits.max_batch_tokens
        )));
    }
    Ok(tokens as usize)
}

/// The first non-finite value of `x` (rows of `hidden`), as an error naming row and column.
pub fn check_finite(x: &[f32], hidden: usize, what: &str) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(WorkerError::InvalidInput(format!(
            "{what} has a non-finite value ({}) at row {} (hidden index {}); activations must be finite",
            x[i],
            i / hidden.max(1),
            i % hidden.max(1)
        ))),
    }
}

/// [`check_finite`] on little-endian bf16 or f32 rows as received, without decoding them.
pub fn check_finite_bytes(dtype: DType, data: &[u8], hidden: usize, what: &str) -> Result<()> {
    let bad = match dtype {
        // bf16: an exponent of all ones is Inf or NaN.
        DType::BF16 => data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80),
        _ => data.chunks_exact(4).position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
    };
    let Some(i) = bad else { return Ok(()) };
    let es = dtype.size();
    let mut v = [0f32; 1];
    decode_f32(dtype, &data[i * es..(i + 1) * es], &mut v)?;
    Err(WorkerError::InvalidInput(format!(
        "{what} has a non-finite value ({}) at row {} (hidden index {}); activations must be finite",
        v[0],
        i / hidden.max(1),
        i % hidden.max(1)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use expertmesh_core::config::{preset_config, PresetOverrides};
    use expertmesh_proto::v1::DType as PDType;

    fn spec() -> ModelSpec {
        let cfg = preset_config("tiny-v3", &PresetOverrides::default()).unwrap();
        ModelSpec::from_config_json(&cfg.to_string()).unwrap()
    }

    fn batch(s: &ModelSpec, rows: Vec<u32>, data: usize) -> ExpertBatch {
        ExpertBatch {
            request_id: 1,
            epoch: 1,
            layer: s.moe_layers()[0] as u32,
            dtype: PDType::DtypeBf16 as i32,
            hidden: s.hidden as u32,
            experts: (0..rows.len() as u32).collect(),
            rows,
            data: Bytes::from(vec![0u8; data]),
            chunk: 0,
        }
    }

    #[test]
    fn rows_summing_past_the_address_space_are_refused_before_any_allocation() {
        let s = spec();
        let l = Limits::default();
        // 2^54 rows in total: the product rows x hidden x 2 would wrap.
        let b = batch(&s, vec![1 << 31, 1 << 31, u32::MAX, u32::MAX], 0);
        let e = check_batch(&s, &l, &b).unwrap_err().to_string();
        assert!(e.contains("--max-message-mib"), "{e}");
        let ok = batch(&s, vec![3, 2], 5 * s.hidden * 2);
        let shape = check_batch(&s, &l, &ok).unwrap();
        assert_eq!(shape.rows, 5);
        assert!(shape.cost_bytes >= (5 * s.hidden * 2) as u64);
        let e = check_batch(&s, &l, &batch(&s, vec![0], 0)).unwrap_err().to_string();
        assert!(e.contains("no rows"), "{e}");
    }

    #[test]
    fn stream_chunks_in_order_and_within_totals() {
        let s = spec();
        let l = Limits { max_batch_tokens: 4, max_stream_chunks: 3, ..Default::default() };
        let mut c = StreamCheck::new(&s, &l);
        c.admit(0, 1).unwrap();
        let e = c.admit(2, 1).unwrap_err().to_string();
        assert!(e.contains("expected chunk 1"), "{e}");
        c.admit(1, 1).unwrap();
        c.admit(2, 1).unwrap();
        let e = c.admit(3, 1).unwrap_err().to_string();
        assert!(e.contains("--max-stream-chunks"), "{e}");
        let mut c = StreamCheck::new(&s, &l);
        let max = l.max_stream_rows(s.top_k);
        c.admit(0, max).unwrap();
        let e = c.admit(1, 1).unwrap_err().to_string();
        assert!(e.contains("--max-batch-tokens"), "{e}");
    }

    #[test]
    fn forward_shapes_that_overflow_are_refused() {
        let s = spec();
        let l = Limits::default();
        let t = Tensor { dtype: PDType::DtypeF32 as i32, shape: vec![1 << 56, s.hidden as u64], data: Bytes::new() };
        let e = check_forward_shape(&s, &l, &t).unwrap_err().to_string();
        assert!(e.contains("--max-batch-tokens"), "{e}");
        let t = Tensor { dtype: PDType::DtypeF32 as i32, shape: vec![1 << 56, 256], data: Bytes::new() };
        assert!(expertmesh_dispatcher::wire::expected_bytes(&t, DType::F32, "hidden_states").is_err());
        assert!(check_forward_shape(&s, &l, &t).is_err());
    }
}
