//! Element types of checkpoints and of the wire, and the fast-path codecs to f32.

use crate::error::{CoreError, Result};

/// Element types ExpertMesh reads from checkpoints or carries on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    F8E4M3,
    I64,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 => 1,
            DType::I64 => 8,
        }
    }

    /// Parse a name as safetensors, the CLI or a config writes it.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" | "fp16" | "half" => DType::F16,
            "f8_e4m3" | "f8e4m3" | "fp8" | "float8_e4m3fn" | "e4m3" => DType::F8E4M3,
            "i64" | "int64" => DType::I64,
            "i32" | "int32" => DType::I32,
            other => {
                return Err(CoreError::InvalidInput(format!(
                    "unknown dtype `{other}`; expected one of f32, bf16, f16, f8_e4m3, i64, i32"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8_e4m3",
            DType::I64 => "i64",
            DType::I32 => "i32",
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Result<Self> {
        use safetensors::Dtype as S;
        Ok(match d {
            S::F32 => DType::F32,
            S::BF16 => DType::BF16,
            S::F16 => DType::F16,
            S::F8_E4M3 => DType::F8E4M3,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            other => {
                return Err(CoreError::Checkpoint(format!(
                    "unsupported tensor dtype {other:?}; expected F32, BF16, F16, F8_E4M3, I64 or I32"
                )))
            }
        })
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F32 => S::F32,
            DType::BF16 => S::BF16,
            DType::F16 => S::F16,
            DType::F8E4M3 => S::F8_E4M3,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I64 | DType::I32)
    }
}

/// f32 value of every FP8 e4m3 (`float8_e4m3fn`) byte: no infinities; 0x7F/0xFF are NaN.
pub fn fp8_e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
            let exp = ((b >> 3) & 0xF) as i32;
            let man = (b & 0x7) as f32;
            *v = if exp == 0xF && (b & 0x7) == 0x7 {
                f32::NAN
            } else if exp == 0 {
                sign * man / 8.0 * 2f32.powi(-6)
            } else {
                sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
        }
        t
    })
}

/// Nearest FP8 e4m3 byte for `v` (round to nearest even, saturating at +-448).
pub fn f32_to_fp8_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let table = fp8_e4m3_table();
    let sign: u8 = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs().min(448.0);
    // Search the 127 non-negative finite codes (monotonic in the code).
    let (mut lo, mut hi) = (0usize, 0x7Eusize);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if table[mid] <= a {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let below = lo;
    let code = if below < 0x7E {
        let (d0, d1) = (a - table[below], table[below + 1] - a);
        if d1 < d0 || (d1 == d0 && (below & 1) == 1) {
            below + 1
        } else {
            below
        }
    } else {
        below
    };
    sign | code as u8
}

/// Decode little-endian elements of a float dtype into f32 (fast path).
pub fn decode_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let need = out.len() * dtype.size();
    if bytes.len() != need {
        return Err(CoreError::InvalidInput(format!(
            "tensor data is {} bytes; {} elements of {} need {need}",
            bytes.len(),
            out.len(),
            dtype.name()
        )));
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::F8E4M3 => {
            let t = fp8_e4m3_table();
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = t[b as usize];
            }
        }
        DType::I64 | DType::I32 => {
            return Err(CoreError::InvalidInput(format!("expected a float tensor, got {}", dtype.name())))
        }
    }
    Ok(())
}

/// Encode f32 values as little-endian `dtype` bytes (f32, bf16 round-to-nearest-even, f16).
pub fn encode_f32(dtype: DType, values: &[f32], out: &mut Vec<u8>) -> Result<()> {
    out.reserve(values.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in values {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F16 => {
            for v in values {
                out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F8E4M3 => out.extend(values.iter().map(|v| f32_to_fp8_e4m3(*v))),
        DType::I64 | DType::I32 => {
            return Err(CoreError::InvalidInput(format!("cannot encode floats as {}", dtype.name())))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_table_known_values() {
        let t = fp8_e4m3_table();
        assert_eq!(t[0x00], 0.0);
        assert_eq!(t[0x38], 1.0);
        assert_eq!(t[0x7E], 448.0);
        assert_eq!(t[0xFE], -448.0);
        assert_eq!(t[0x01], 2f32.powi(-9));
        assert!(t[0x7F].is_nan());
    }

    #[test]
    fn fp8_roundtrip_every_code() {
        let t = fp8_e4m3_table();
        for b in 0..=255u8 {
            if t[b as usize].is_nan() || b == 0x80 {
                continue;
            }
            assert_eq!(f32_to_fp8_e4m3(t[b as usize]), b, "code {b:#x}");
        }
        assert_eq!(f32_to_fp8_e4m3(1e6), 0x7E);
        assert_eq!(f32_to_fp8_e4m3(1.06), 0x38); // nearer 1.0 than 1.125
    }

    #[test]
    fn decode_checks_length() {
        let mut out = [0f32; 3];
        let err = decode_f32(DType::BF16, &[0u8; 5], &mut out).unwrap_err();
        assert!(err.to_string().contains("need 6"), "{err}");
    }
}
