//! Tensors on the wire: `expertmesh.v1.Tensor` <-> Vec, with errors that name the field.

use bytes::Bytes;
use expertmesh_core::dtype::{decode_f32, encode_f32, DType};
use expertmesh_core::limits::{checked_bytes, checked_product};
use expertmesh_proto::v1::{DType as PDType, Tensor};

use crate::error::{Error, Result};

/// Map a protocol dtype number to a dtype, naming the field when it is unknown.
pub fn dtype_from_proto(v: i32, field: &str) -> Result<DType> {
    match PDType::try_from(v) {
        Ok(PDType::DtypeF32) => Ok(DType::F32),
        Ok(PDType::DtypeBf16) => Ok(DType::BF16),
        Ok(PDType::DtypeF16) => Ok(DType::F16),
        Ok(PDType::DtypeI64) => Ok(DType::I64),
        Ok(PDType::DtypeI32) => Ok(DType::I32),
        _ => Err(Error::InvalidInput(format!(
            "{field}: unknown dtype {v}; expected DTYPE_F32 (1), DTYPE_BF16 (2), DTYPE_F16 (3), DTYPE_I64 (4) or DTYPE_I32 (5)"
        ))),
    }
}

pub fn dtype_to_proto(d: DType) -> i32 {
    (match d {
        DType::F32 => PDType::DtypeF32,
        DType::BF16 => PDType::DtypeBf16,
        DType::F16 => PDType::DtypeF16,
        DType::I64 => PDType::DtypeI64,
        DType::I32 => PDType::DtypeI32,
        DType::F8E4M3 => PDType::DtypeUnspecified,
    }) as i32
}

fn check_len(t: &Tensor, d: DType, field: &str) -> Result<usize> {
    let need = expected_bytes(t, d, field)?;
    if t.data.len() != need {
        return Err(Error::InvalidInput(format!(
            "{field}: {} bytes of data; shape {:?} of {} needs {need} (truncated or padded tensor)",
            t.data.len(),
            t.shape,
            d.name()
        )));
    }
    Ok(need / d.size())
}

/// A float tensor as f32 values and its shape.
pub fn tensor_to_f32(t: &Tensor, field: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let d = dtype_from_proto(t.dtype, field)?;
    if !d.is_float() {
        return Err(Error::InvalidInput(format!("{field}: dtype {}; expected f32, bf16 or f16", d.name())));
    }
    let n = check_len(t, d, field)?;
    let mut out = vec![0f32; n];
    decode_f32(d, &t.data, &mut out)?;
    Ok((out, t.shape.iter().map(|&x| x as usize).collect()))
}

/// An integer tensor as i64 values and its shape.
pub fn tensor_to_i64(t: &Tensor, field: &str) -> Result<(Vec<i64>, Vec<usize>)> {
    let d = dtype_from_proto(t.dtype, field)?;
    let n = check_len(t, d, field)?;
    let v = match d {
        DType::I64 => t.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
        DType::I32 => t.data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
        other => return Err(Error::InvalidInput(format!("{field}: dtype {}; expected i64 or i32", other.name()))),
    };
    debug_assert_eq!(Vec::<i64>::len(&v), n);
    Ok((v, t.shape.iter().map(|&x| x as usize).collect()))
}

pub fn f32_tensor(shape: &[usize], values: &[f32]) -> Tensor {
    let mut data = Vec::with_capacity(values.len() * 4);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Tensor { dtype: PDType::DtypeF32 as i32, shape: shape.iter().map(|&x| x as u64).collect(), data: Bytes::from(data) }
}

pub fn encoded_tensor(dtype: DType, shape: &[usize], values: &[f32]) -> Result<Tensor> {
    let mut data = Vec::new();
    encode_f32(dtype, values, &mut data)?;
    Ok(Tensor {
        dtype: dtype_to_proto(dtype),
        shape: shape.iter().map(|&x| x as u64).collect(),
        data: Bytes::from(data),
    })
}

pub fn i64_tensor(shape: &[usize], values: &[i64]) -> Tensor {
    Tensor {
        dtype: PDType::DtypeI64 as i32,
        shape: shape.iter().map(|&x| x as u64).collect(),
        data: Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
    }
}

/// A `grpc-timeout` header value (at most 8 digits and a unit: H, M, S, m, u, n), as the gRPC
/// over HTTP/2 spec writes it; None when it is malformed.
pub fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let unit = v.chars().last()?;
    let digits = &v[..v.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline a caller set with `grpc-timeout`, a little early (a tenth of the timeout, at most
/// 20 ms) so that our DEADLINE_EXCEEDED, which names what was missing, goes out before the
/// transport's own timer cancels the call.
pub fn grpc_deadline(md: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
    let d = parse_grpc_timeout(md.get("grpc-timeout")?.to_str().ok()?)?;
    let margin = (d / 10).min(std::time::Duration::from_millis(20));
    Some(std::time::Instant::now() + (d - margin))
}

/// Bytes of a tensor's data as its shape and dtype say, checked; an error names the field.
pub fn expected_bytes(t: &Tensor, d: DType, field: &str) -> Result<usize> {
    checked_product(&t.shape).and_then(|n| checked_bytes(n, d.size())).ok_or_else(|| {
        Error::InvalidInput(format!(
            "{field}: shape {:?} of {} does not fit in memory (the element count overflows)",
            t.shape,
            d.name()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        for bad in ["", "m", "123456789m", "10x", "-5m", "1.5S", "5é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
