//! The CPU backend's resident weight layout: each matrix `W [n, k]` (outputs x inputs) is cut
//! into tiles of [`NR`] output columns, each tile stored contiguously, in the checkpoint's own
//! dtype (the bytes are permuted, never converted):
//!
//! - f32: k-major, `[tile][k][NR]`: one k step is two 16-lane vectors.
//! - bf16, f16, FP8: k-pairs, `[tile][k / 2][2 halves][16 columns][2]`: one k-pair of one half
//!   is a 16-lane vector of (k, k + 1) pairs, the operand layout of AVX-512 BF16's `vdpbf16ps`;
//!   k is padded to even with zeros.
//!
//! Columns past `n` in the last tile are zeros. FP8 keeps its block scales beside the bytes.

use expertmesh_core::dtype::{fp8_e4m3_table, DType};

use crate::weights::{BlockScales, StoredMatrix};

/// Output columns per tile: two AVX-512 f32 vectors.
pub(crate) const NR: usize = 32;

/// One resident matrix.
#[derive(Debug)]
pub(crate) struct Packed {
    pub(crate) dtype: DType,
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// k as stored: `k` for f32, `k` rounded up to even for the paired layout.
    pub(crate) kpad: usize,
    pub(crate) tiles: usize,
    /// The tiles' bytes, in 4-byte words so that any tile chunk can be viewed as u16 or f32
    /// in place (every chunk starts at a multiple of 64 bytes).
    pub(crate) data: Vec<u32>,
    pub(crate) scales: Option<BlockScales>,
}

pub(crate) fn kpad(dtype: DType, k: usize) -> usize {
    if dtype == DType::F32 {
        k
    } else {
        k.next_multiple_of(2)
    }
}

/// Bytes a packed `[n, k]` matrix takes (data and scales).
pub(crate) fn packed_bytes(dtype: DType, n: usize, k: usize, block: Option<(usize, usize)>) -> u64 {
    let data = n.div_ceil(NR) * NR * kpad(dtype, k) * dtype.size();
    let scales = match (dtype, block) {
        (DType::F8E4M3, Some((br, bc))) if br > 0 && bc > 0 => n.div_ceil(br) * k.div_ceil(bc) * 4,
        _ => 0,
    };
    (data + scales) as u64
}

impl Packed {
    /// Permute a checked stored matrix into tiles.
    pub(crate) fn from_stored(m: &StoredMatrix<'_>) -> Self {
        let (n, k, es) = (m.rows, m.cols, m.dtype.size());
        let kp = kpad(m.dtype, k);
        let tiles = n.div_ceil(NR);
        // kp is even for every paired dtype and NR = 32, so a tile is a multiple of 64 bytes.
        let mut words = vec![0u32; (tiles * NR * kp * es).div_ceil(4)];
        let data: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        let src = &m.data[..];
        for row in 0..n {
            let (t, lane) = (row / NR, row % NR);
            let tile = &mut data[t * kp * NR * es..(t + 1) * kp * NR * es];
            let srow = &src[row * k * es..(row + 1) * k * es];
            if m.dtype == DType::F32 {
                for kk in 0..k {
                    let d = (kk * NR + lane) * es;
                    tile[d..d + es].copy_from_slice(&srow[kk * es..(kk + 1) * es]);
                }
            } else {
                let (h, c) = (lane / 16, lane % 16);
                for kk in 0..k {
                    let d = ((kk / 2) * 2 * NR + h * NR + c * 2 + (kk % 2)) * es;
                    tile[d..d + es].copy_from_slice(&srow[kk * es..(kk + 1) * es]);
                }
            }
        }
        Packed { dtype: m.dtype, n, k, kpad: kp, tiles, data: words, scales: m.scales.clone() }
    }

    pub(crate) fn bytes(&self) -> u64 {
        (self.data.len() * 4 + self.scales.as_ref().map_or(0, |s| s.values.len() * 4)) as u64
    }

    /// Bytes of one tile.
    pub(crate) fn tile_len(&self) -> usize {
        self.kpad * NR * self.dtype.size()
    }

    /// The stored bytes of tile `t`, k range `k0..k1` (k0 even for the paired layout).
    pub(crate) fn tile_slice(&self, t: usize, k0: usize, k1: usize) -> &[u8] {
        let es = self.dtype.size();
        let base = t * self.tile_len();
        let bytes: &[u8] = bytemuck::cast_slice(&self.data);
        &bytes[base + k0 * NR * es..base + k1 * NR * es]
    }

    /// k ranges the kernels take one at a time: at most `max` long, never across an FP8 scale
    /// block, starting even; the last one ends at `kpad`.
    pub(crate) fn k_chunks(&self, max: usize) -> Vec<(usize, usize)> {
        let bc = self.scales.as_ref().map_or(usize::MAX, |s| s.block.1);
        let mut out = Vec::new();
        let mut k0 = 0;
        while k0 < self.kpad {
            let block_end = if bc == usize::MAX { usize::MAX } else { (k0 / bc + 1) * bc };
            let k1 = (k0 + max).min(block_end).min(self.kpad);
            out.push((k0, k1));
            k0 = k1;
        }
        out
    }

    /// The FP8 scale of each column of tile `t` in the scale block holding k index `k0`;
    /// 1 for other dtypes and for padding columns.
    pub(crate) fn scale_lanes(&self, t: usize, k0: usize) -> [f32; NR] {
        let mut s = [1f32; NR];
        if let Some(b) = &self.scales {
            let (br, bc) = b.block;
            let kb = k0 / bc;
            let per_row = self.k.div_ceil(bc);
            for (lane, v) in s.iter_mut().enumerate() {
                let col = t * NR + lane;
                if col < self.n {
                    *v = b.values[(col / br) * per_row + kb];
                }
            }
        }
        s
    }
}

/// One stored element as f32 (the portable widening).
#[inline]
pub(crate) fn elem_f32(dtype: DType, b: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
        DType::F8E4M3 => fp8_e4m3_table()[b[i] as usize],
        DType::I64 | DType::I32 => 0.0,
    }
}

/// bf16 bits of every FP8 e4m3 byte (exact: e4m3 values are bf16 values).
pub(crate) fn fp8_bf16_table() -> &'static [u16; 256] {
    static TABLE: std::sync::OnceLock<[u16; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let f = fp8_e4m3_table();
        let mut t = [0u16; 256];
        for (o, v) in t.iter_mut().zip(f.iter()) {
            *o = (v.to_bits() >> 16) as u16;
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_values_are_exact_in_bf16() {
        let f = fp8_e4m3_table();
        for (b, &bits) in fp8_bf16_table().iter().enumerate() {
            if f[b].is_nan() {
                continue;
            }
            assert_eq!(f32::from_bits((bits as u32) << 16), f[b], "code {b:#x}");
        }
    }

    #[test]
    fn chunks_respect_scale_blocks_and_padding() {
        let m = StoredMatrix {
            dtype: DType::F8E4M3,
            rows: 3,
            cols: 301,
            data: vec![0u8; 903].into(),
            scales: Some(BlockScales { block: (128, 128), values: vec![1.0; 3] }),
        };
        let p = Packed::from_stored(&m);
        assert_eq!(p.kpad, 302);
        assert_eq!(p.k_chunks(96), vec![(0, 96), (96, 128), (128, 224), (224, 256), (256, 302)]);
        assert_eq!(p.bytes(), packed_bytes(DType::F8E4M3, 3, 301, Some((128, 128))));
    }
}
