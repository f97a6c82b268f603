//! The elementwise steps between and after the GEMMs: SwiGLU from the tile-major W1|W3 product
//! into the next GEMM's row-major panel, and the output rows in their dtype. Written so the
//! compiler vectorises them; compiled once more for AVX-512 and chosen at run time.

use expertmesh_core::dtype::DType;
use rayon::prelude::*;

use super::driver::Panel;
use super::pack::NR;
use super::simd::Isa;

/// bf16 bits of `v`, rounded to nearest even (values here are finite).
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// `e^x` to about 2 ulp for |x| <= 87 (Cody-Waite reduction, degree-7 Taylor), branch free
/// so it vectorises.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

trait Elem: Copy + Send + Sync {
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn from_f32(v: f32) -> u16 {
        bf16_bits(v)
    }
}

/// Row `r` of `silu(min(g, limit)) * clamp(u, -limit, limit)` into `dst`.
#[inline(always)]
fn swiglu_row<T: Elem>(c1: &[f32], m: usize, ft: usize, f: usize, lim: f32, r: usize, dst: &mut [T]) {
    for jt in 0..ft {
        let g = &c1[(jt * m + r) * NR..][..NR];
        let u = &c1[((ft + jt) * m + r) * NR..][..NR];
        let mut v = [0f32; NR];
        for ((o, &g), &u) in v.iter_mut().zip(g).zip(u) {
            let g = g.min(lim);
            *o = g / (1.0 + exp(-g)) * u.max(-lim).min(lim);
        }
        let n = NR.min(f - jt * NR);
        for (d, &v) in dst[jt * NR..jt * NR + n].iter_mut().zip(&v) {
            *d = T::from_f32(v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_row_avx512<T: Elem>(c1: &[f32], m: usize, ft: usize, f: usize, lim: f32, r: usize, dst: &mut [T]) {
    swiglu_row(c1, m, ft, f, lim, r, dst)
}

#[allow(clippy::too_many_arguments)]
fn swiglu_any<T: Elem>(isa: Isa, c1: &[f32], m: usize, ft: usize, f: usize, lim: f32, r: usize, dst: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: AVX-512F is present (detected Isa); the function is safe Rust compiled for it.
        #[allow(unsafe_code)]
        unsafe {
            swiglu_row_avx512(c1, m, ft, f, lim, r, dst)
        };
        return;
    }
    let _ = isa;
    swiglu_row(c1, m, ft, f, lim, r, dst)
}

/// SwiGLU of the W1|W3 product `c1` (`2 ft` tiles of `m` rows: W1's then W3's) into `a2`
/// (`[m, f]` row-major, its padding left zero).
pub(crate) fn swiglu(isa: Isa, c1: &[f32], m: usize, ft: usize, f: usize, limit: Option<f32>, a2: &mut Panel) {
    assert!(c1.len() >= 2 * ft * m * NR && ft * NR >= f, "swiglu: product too short");
    let lim = limit.unwrap_or(f32::INFINITY);
    match a2 {
        Panel::F32 { data, lda } => data
            .par_chunks_mut(*lda)
            .with_min_len(16)
            .enumerate()
            .for_each(|(r, d)| swiglu_any(isa, c1, m, ft, f, lim, r, d)),
        Panel::Bf16 { data, lda } => data
            .par_chunks_mut(*lda)
            .with_min_len(16)
            .enumerate()
            .for_each(|(r, d)| swiglu_any(isa, c1, m, ft, f, lim, r, d)),
    }
}

/// Rows of the tile-major product `c2` (`m` rows, `h` columns) as little-endian `dtype`.
pub(crate) fn write_rows(c2: &[f32], m: usize, h: usize, dtype: DType, out: &mut [u8]) {
    let es = dtype.size();
    assert!(out.len() == m * h * es && c2.len() >= h.div_ceil(NR) * m * NR, "output rows: sizes disagree");
    out.par_chunks_mut(h * es).with_min_len(16).enumerate().for_each(|(r, row)| {
        for t in 0..h.div_ceil(NR) {
            let v = &c2[(t * m + r) * NR..][..NR];
            let n = NR.min(h - t * NR);
            let dst = &mut row[t * NR * es..(t * NR + n) * es];
            if dtype == DType::BF16 {
                for (d, &v) in dst.chunks_exact_mut(2).zip(v) {
                    d.copy_from_slice(&bf16_bits(v).to_le_bytes());
                }
            } else {
                for (d, &v) in dst.chunks_exact_mut(4).zip(v) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range_silu_uses() {
        let mut worst = 0f64;
        for i in -87_000..=87_000 {
            let x = i as f32 / 1000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn bf16_rounding_matches_half() {
        for v in [0.0f32, 1.0, -1.5, 1.003_906_3, 1.005_859_4, 3.4e38, -2.5e-3, 1e-40] {
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
    }
}
