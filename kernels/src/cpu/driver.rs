//! The GEMM driver of the CPU backend: `C = A W^T` for a row-major activation panel A and
//! packed weights W, C tile-major (`[tile][m][NR]` f32, each tile contiguous so threads own
//! disjoint tiles). Rows are taken in chunks that keep A in L2 while every tile sweeps it; tiles
//! run in parallel on the rayon pool; k runs in chunks that keep one tile's B chunk in L1.

use expertmesh_core::dtype::DType;
use rayon::prelude::*;

use super::pack::{Packed, NR};
use super::simd::{bf16_block, f32_block, widen_fp8_bf16, widen_pairs_f32, Isa, MR};

/// Longest k chunk.
const KC: usize = 256;
/// Bytes of A kept in L2 per row chunk.
const A_CHUNK_BYTES: usize = 768 << 10;

/// Which products a GEMM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Math {
    /// bf16 x bf16 products, f32 accumulation (AVX-512 BF16).
    Bf16,
    /// f32 FMA.
    F32,
}

/// Row-major activations in the math's element type, `m` rows `lda` apart, zero past k.
#[derive(Debug)]
pub(crate) enum Panel {
    Bf16 { data: Vec<u16>, lda: usize },
    F32 { data: Vec<f32>, lda: usize },
}

impl Panel {
    pub(crate) fn zeros(math: Math, m: usize, k: usize) -> Self {
        let lda = k.next_multiple_of(2);
        match math {
            Math::Bf16 => Panel::Bf16 { data: vec![0; m * lda], lda },
            Math::F32 => Panel::F32 { data: vec![0.0; m * lda], lda },
        }
    }

    /// Pack `m` rows of `k` little-endian `dtype` (bf16 or f32) elements.
    pub(crate) fn from_rows(math: Math, dtype: DType, src: &[u8], m: usize, k: usize) -> Self {
        let mut p = Self::zeros(math, m, k);
        let es = dtype.size();
        match &mut p {
            Panel::Bf16 { data, lda } => {
                for (dst, row) in data.chunks_exact_mut(*lda).zip(src.chunks_exact(k * es)) {
                    if dtype == DType::BF16 {
                        for (d, c) in dst.iter_mut().zip(row.chunks_exact(2)) {
                            *d = u16::from_le_bytes([c[0], c[1]]);
                        }
                    } else {
                        for (d, c) in dst.iter_mut().zip(row.chunks_exact(4)) {
                            *d = half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits();
                        }
                    }
                }
            }
            Panel::F32 { data, lda } => {
                for (dst, row) in data.chunks_exact_mut(*lda).zip(src.chunks_exact(k * es)) {
                    if dtype == DType::BF16 {
                        for (d, c) in dst.iter_mut().zip(row.chunks_exact(2)) {
                            *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                        }
                    } else {
                        for (d, c) in dst.iter_mut().zip(row.chunks_exact(4)) {
                            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                    }
                }
            }
        }
        p
    }

    fn lda(&self) -> usize {
        match self {
            Panel::Bf16 { lda, .. } | Panel::F32 { lda, .. } => *lda,
        }
    }

    fn elem_bytes(&self) -> usize {
        match self {
            Panel::Bf16 { .. } => 2,
            Panel::F32 { .. } => 4,
        }
    }
}

/// `c[tile][r][lane] = sum_k a[r][k] * W[tile * NR + lane][k]` over the tiles of `mats` in
/// order (the tiles of `mats[0]`, then of `mats[1]`, ...). `c` holds `m * NR` f32 per tile.
pub(crate) fn gemm(isa: Isa, a: &Panel, m: usize, mats: &[&Packed], c: &mut [f32]) {
    let tiles: Vec<(&Packed, usize)> = mats.iter().flat_map(|w| (0..w.tiles).map(move |t| (*w, t))).collect();
    assert_eq!(
        c.len(),
        tiles.len() * m * NR,
        "C holds {} values; {} tiles of {m} rows need more",
        c.len(),
        tiles.len()
    );
    if m == 0 || tiles.is_empty() {
        return;
    }
    let k_max = mats.iter().map(|w| w.kpad).max().unwrap_or(0);
    for w in mats {
        assert!(a.lda() >= w.kpad, "A rows of {} cannot feed k = {}", a.lda(), w.kpad);
    }
    let mc = (A_CHUNK_BYTES / (k_max.max(1) * a.elem_bytes())).max(MR) / MR * MR;
    let threads = rayon::current_num_threads().max(1);
    let min_len = (tiles.len() / (threads * 4)).max(1);
    for r0 in (0..m).step_by(mc) {
        let r1 = (r0 + mc).min(m);
        c.par_chunks_mut(m * NR).zip(tiles.par_iter()).with_min_len(min_len).for_each(|(ct, &(w, t))| {
            tile_rows(isa, a, w, t, r0, r1, ct);
        });
    }
}

/// Rows `r0..r1` of one tile, over all of k.
fn tile_rows(isa: Isa, a: &Panel, w: &Packed, t: usize, r0: usize, r1: usize, ct: &mut [f32]) {
    let mut scratch_f32: Vec<f32> = Vec::new();
    let mut scratch_bf16: Vec<u16> = Vec::new();
    for (ci, &(k0, k1)) in w.k_chunks(KC).iter().enumerate() {
        let first = ci == 0;
        let kc = k1 - k0;
        let src = w.tile_slice(t, k0, k1);
        match a {
            Panel::Bf16 { data, lda } => {
                let b: &[u16] = match w.dtype {
                    DType::BF16 => words(src, &mut scratch_bf16),
                    DType::F8E4M3 => {
                        scratch_bf16.resize(src.len(), 0);
                        widen_fp8_bf16(isa, src, &mut scratch_bf16);
                        &scratch_bf16
                    }
                    d => panic!("bf16 math on {} weights", d.name()),
                };
                let scale = w.scale_lanes(t, k0);
                for q0 in (r0..r1).step_by(MR) {
                    let rows = (r1 - q0).min(MR);
                    bf16_block(isa, rows, kc / 2, &data[q0 * lda + k0..], *lda, b, &mut ct[q0 * NR..], first, &scale);
                }
            }
            Panel::F32 { data, lda } => {
                // The first row block streams f32 weights (read in place) from memory: it
                // prefetches them ahead, 1.5-2x at 24 rows where reading the weights bounds the
                // call (docs/BENCHMARKS.md). Widened weights were read before the kernel ran;
                // prefetching the next chunk for them measured no gain.
                let stream = w.dtype == DType::F32;
                let b: &[f32] = if w.dtype == DType::F32 {
                    words(src, &mut scratch_f32)
                } else {
                    scratch_f32.resize(kc * NR, 0.0);
                    widen_pairs_f32(isa, w.dtype, src, kc / 2, &w.scale_lanes(t, k0), &mut scratch_f32);
                    &scratch_f32
                };
                for q0 in (r0..r1).step_by(MR) {
                    let rows = (r1 - q0).min(MR);
                    let prefetch = stream && q0 == r0;
                    f32_block(isa, rows, kc, &data[q0 * lda + k0..], *lda, b, &mut ct[q0 * NR..], first, prefetch);
                }
            }
        }
    }
}

/// `src` viewed in place as `T` (packed tiles are aligned for it), else copied into `scratch`.
fn words<'a, T: bytemuck::Pod>(src: &'a [u8], scratch: &'a mut Vec<T>) -> &'a [T] {
    match bytemuck::try_cast_slice(src) {
        Ok(w) => w,
        Err(_) => {
            scratch.clear();
            scratch.extend(src.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned::<T>));
            scratch
        }
    }
}
