//! Microkernels and tile widening, per instruction set.
//!
//! A microkernel computes one `rows x NR` block of C (rows <= [`MR`]) over one k chunk:
//! `C = A B` on the first chunk, `C += A B` after, with A row-major (`lda` apart) and B one
//! tile's chunk. Two kinds:
//! - bf16 dot (AVX-512 BF16 `vdpbf16ps`): A bf16 pairs broadcast, B in the paired layout,
//!   products of bf16 values accumulated in f32, then scaled per column (FP8 block scales).
//! - f32 FMA (AVX-512F, or portable code for CPUs without AVX-512): A f32, B `[k][NR]` f32.
//!
//! The public functions here are safe: they check every length the unsafe code relies on.

use expertmesh_core::dtype::DType;

use super::pack::{elem_f32, fp8_bf16_table, NR};

/// Rows per microkernel call: 2 x 12 accumulators of 16 lanes, with room for B and A.
pub(crate) const MR: usize = 12;

/// Instruction sets the CPU backend can use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F/BW with BF16 dot products: bf16 math on bf16 and FP8 weights.
    Avx512Bf16,
    /// AVX-512 F/BW: f32 FMA; weights widened tile by tile.
    Avx512,
    /// No SIMD intrinsics: code the compiler vectorises for the build target.
    Portable,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512-bf16",
            Isa::Avx512 => "avx512",
            Isa::Portable => "portable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Isa::Avx512Bf16, Isa::Avx512, Isa::Portable].into_iter().find(|i| i.name() == s)
    }

    /// Every instruction set this CPU runs, best first.
    pub fn supported() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                if is_x86_feature_detected!("avx512bf16") {
                    v.push(Isa::Avx512Bf16);
                }
                v.push(Isa::Avx512);
            }
        }
        v.push(Isa::Portable);
        v
    }

    pub fn bf16_dot(self) -> bool {
        self == Isa::Avx512Bf16
    }

    pub(crate) fn avx512(self) -> bool {
        matches!(self, Isa::Avx512Bf16 | Isa::Avx512)
    }
}

/// Dispatch a const-generic row count 1..=MR.
macro_rules! by_rows {
    ($rows:expr, $f:ident, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            _ => $f::<12>($($arg),*),
        }
    };
}

fn check_tile(rows: usize, k: usize, a_len: usize, lda: usize, b_len: usize, b_need: usize, c_len: usize) {
    assert!((1..=MR).contains(&rows), "microkernel rows {rows} outside 1..={MR}");
    assert!(k <= lda && a_len >= (rows - 1) * lda + k, "A panel too short: {a_len} for {rows} rows of {lda}");
    assert!(b_len >= b_need, "B chunk too short: {b_len} < {b_need}");
    assert!(c_len >= rows * NR, "C block too short: {c_len} < {}", rows * NR);
}

/// k steps ahead of the f32 kernel that `prefetch` asks for B (2 KiB).
const PF_K: usize = 16;

/// f32 FMA: `C[rows][NR] (+)= A[rows][0..kc] . B[kc][NR]`. With `prefetch`, B is asked for
/// PF_K k steps ahead, so that weights read from memory stream in while the FMAs run instead
/// of stalling them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn f32_block(
    isa: Isa,
    rows: usize,
    kc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: &mut [f32],
    first: bool,
    prefetch: bool,
) {
    check_tile(rows, kc, a.len(), lda, b.len(), kc * NR, c.len());
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: the CPU has AVX-512F (this Isa was detected), and check_tile proved every
        // offset the kernel reads (A rows r < rows, columns < kc; B < kc * NR) or writes
        // (C < rows * NR) is inside the slices.
        #[allow(unsafe_code)]
        unsafe {
            by_rows!(rows, f32_avx512, kc, a.as_ptr(), lda, b.as_ptr(), c.as_mut_ptr(), first, prefetch)
        };
        return;
    }
    let _ = (isa, prefetch);
    by_rows!(rows, f32_portable, kc, a, lda, b, c, first)
}

/// bf16 dot: `C[rows][NR] (+)= (A[rows][0..2 kp] . B) * scale`; `isa` must have BF16.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bf16_block(
    isa: Isa,
    rows: usize,
    kp: usize,
    a: &[u16],
    lda: usize,
    b: &[u16],
    c: &mut [f32],
    first: bool,
    scale: &[f32; NR],
) {
    check_tile(rows, 2 * kp, a.len(), lda, b.len(), kp * 2 * NR, c.len());
    assert!(isa.bf16_dot(), "bf16 dot products need AVX-512 BF16; this path runs {}", isa.name());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (asserted above from the detected Isa);
    // check_tile proved every offset read (A rows < rows, columns < 2 kp; B < kp * 2 * NR)
    // and written (C < rows * NR) is inside the slices.
    #[allow(unsafe_code)]
    unsafe {
        by_rows!(rows, bf16_avx512, kp, a.as_ptr(), lda, b.as_ptr(), c.as_mut_ptr(), first, scale)
    };
}

fn f32_portable<const M: usize>(kc: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], first: bool) {
    let mut acc = [[0f32; NR]; M];
    for (k, bk) in b.chunks_exact(NR).take(kc).enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = a[r * lda + k];
            for (o, &bv) in acc.iter_mut().zip(bk) {
                *o += av * bv;
            }
        }
    }
    for (acc, crow) in acc.iter().zip(c.chunks_exact_mut(NR)) {
        for (o, &v) in crow.iter_mut().zip(acc) {
            *o = if first { v } else { *o + v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn f32_avx512<const M: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    first: bool,
    prefetch: bool,
) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm512_setzero_ps(); M];
    let mut acc1 = [_mm512_setzero_ps(); M];
    for k in 0..kc {
        if prefetch {
            // A prefetch never faults: running past the end of B is harmless.
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((k + PF_K) * NR) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((k + PF_K) * NR + 16) as *const i8);
        }
        let b0 = _mm512_loadu_ps(b.add(k * NR));
        let b1 = _mm512_loadu_ps(b.add(k * NR + 16));
        for r in 0..M {
            let av = _mm512_set1_ps(*a.add(r * lda + k));
            acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
    }
    for r in 0..M {
        let p = c.add(r * NR);
        if first {
            _mm512_storeu_ps(p, acc0[r]);
            _mm512_storeu_ps(p.add(16), acc1[r]);
        } else {
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), acc0[r]));
            _mm512_storeu_ps(p.add(16), _mm512_add_ps(_mm512_loadu_ps(p.add(16)), acc1[r]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_avx512<const M: usize>(
    kp: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    c: *mut f32,
    first: bool,
    scale: &[f32; NR],
) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm512_setzero_ps(); M];
    let mut acc1 = [_mm512_setzero_ps(); M];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 2 * NR + NR) as *const _));
        for r in 0..M {
            let pair = (a.add(r * lda + 2 * p) as *const i32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
            acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
        }
    }
    let s0 = _mm512_loadu_ps(scale.as_ptr());
    let s1 = _mm512_loadu_ps(scale.as_ptr().add(16));
    for r in 0..M {
        let p = c.add(r * NR);
        let (c0, c1) = if first {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        } else {
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        };
        _mm512_storeu_ps(p, _mm512_fmadd_ps(acc0[r], s0, c0));
        _mm512_storeu_ps(p.add(16), _mm512_fmadd_ps(acc1[r], s1, c1));
    }
}

/// FLOP rates (GFLOP/s, one thread) of the bf16 dot and the f32 FMA microkernels on blocks
/// resident in L1: best of several short runs. CPUs differ: on some, `vdpbf16ps` does twice
/// the work of an FMA per cycle; on others (measured: an Intel Xeon with AVX-512 BF16) the
/// FMA is faster, and f32 products of bf16 values are also exact.
pub(crate) fn calibrate() -> Option<(f64, f64)> {
    if !Isa::supported().contains(&Isa::Avx512Bf16) {
        return None;
    }
    let (kc, reps) = (256, 64);
    let a16 = vec![0x3F80u16; MR * kc];
    let b16 = vec![0x3F80u16; kc * NR];
    let a32 = vec![1f32; MR * kc];
    let b32 = vec![1f32; kc * NR];
    let mut c = vec![0f32; MR * NR];
    let ones = [1f32; NR];
    let flops = (2 * MR * NR * kc * reps) as f64;
    let (mut bf16, mut f32) = (0f64, 0f64);
    for _ in 0..5 {
        let t = std::time::Instant::now();
        for i in 0..reps {
            bf16_block(Isa::Avx512Bf16, MR, kc / 2, &a16, kc, &b16, &mut c, i == 0, &ones);
        }
        bf16 = bf16.max(flops / t.elapsed().as_secs_f64() / 1e9);
        let t = std::time::Instant::now();
        for i in 0..reps {
            f32_block(Isa::Avx512, MR, kc, &a32, kc, &b32, &mut c, i == 0, false);
        }
        f32 = f32.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&c);
    Some((bf16, f32))
}

/// Widen a paired-layout chunk (`kp` k-pairs of one tile, bf16, f16 or FP8) to f32 `[2 kp][NR]`,
/// multiplying column j by `scale[j]`.
pub(crate) fn widen_pairs_f32(isa: Isa, dtype: DType, src: &[u8], kp: usize, scale: &[f32; NR], dst: &mut [f32]) {
    let es = dtype.size();
    assert!(matches!(dtype, DType::BF16 | DType::F16 | DType::F8E4M3), "paired layout of {}", dtype.name());
    assert!(src.len() >= kp * 2 * NR * es && dst.len() >= kp * 2 * NR, "widen: chunk too short");
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        // SAFETY: AVX-512F/BW are present (detected Isa); the lengths were asserted above and
        // the kernel reads `kp * 2 * NR` elements of `es` bytes and writes `kp * 2 * NR` f32.
        #[allow(unsafe_code)]
        unsafe {
            widen_pairs_avx512(dtype, src.as_ptr(), kp, scale, dst.as_mut_ptr())
        };
        return;
    }
    let _ = isa;
    for p in 0..kp {
        for h in 0..2 {
            for c in 0..16 {
                for s in 0..2 {
                    let i = p * 2 * NR + h * NR + c * 2 + s;
                    let col = h * 16 + c;
                    dst[(2 * p + s) * NR + col] = elem_f32(dtype, src, i) * scale[col];
                }
            }
        }
    }
}

/// Widen FP8 bytes to bf16 bits, element by element (exact).
pub(crate) fn widen_fp8_bf16(isa: Isa, src: &[u8], dst: &mut [u16]) {
    assert!(dst.len() >= src.len(), "widen: bf16 destination too short");
    #[cfg(target_arch = "x86_64")]
    if isa.avx512() {
        let n = src.len() / 32 * 32;
        // SAFETY: AVX-512F/BW are present; the kernel reads `n <= src.len()` bytes and writes
        // `n <= dst.len()` u16.
        #[allow(unsafe_code)]
        unsafe {
            fp8_bf16_avx512(src.as_ptr(), n, dst.as_mut_ptr())
        };
        let t = fp8_bf16_table();
        for (o, &b) in dst[n..].iter_mut().zip(&src[n..]) {
            *o = t[b as usize];
        }
        return;
    }
    let _ = isa;
    let t = fp8_bf16_table();
    for (o, &b) in dst.iter_mut().zip(src) {
        *o = t[b as usize];
    }
}

/// 32 FP8 bytes (zero-extended to u16 lanes) to bf16 bits.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn fp8_lanes_to_bf16(x: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let t = fp8_bf16_table();
    let mut sub = [0u16; 32];
    sub[..8].copy_from_slice(&t[..8]);
    let sub_table = _mm512_loadu_si512(sub.as_ptr() as *const _);
    let mag = _mm512_and_si512(x, _mm512_set1_epi16(0x7F));
    // e4m3 exponent bias 7 -> bf16 bias 127: shift the 7 magnitude bits into place, add 120.
    let normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
    let subnormal = _mm512_permutexvar_epi16(mag, sub_table);
    let v = _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), normal, subnormal);
    _mm512_or_si512(v, _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8))
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn fp8_bf16_avx512(src: *const u8, n: usize, dst: *mut u16) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i < n {
        let x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(src.add(i) as *const _));
        _mm512_storeu_si512(dst.add(i) as *mut _, fp8_lanes_to_bf16(x));
        i += 32;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn widen_pairs_avx512(dtype: DType, src: *const u8, kp: usize, scale: &[f32; NR], dst: *mut f32) {
    use std::arch::x86_64::*;
    let s = [_mm512_loadu_ps(scale.as_ptr()), _mm512_loadu_ps(scale.as_ptr().add(16))];
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for p in 0..kp {
        for (h, sh) in s.iter().enumerate() {
            let i = p * 2 * NR + h * NR; // element index of this vector of 16 pairs
            let (even, odd) = match dtype {
                DType::F16 => {
                    let z = _mm512_loadu_si512(src.add(2 * i) as *const _);
                    (
                        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(z)),
                        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(z, 16))),
                    )
                }
                _ => {
                    let z = if dtype == DType::F8E4M3 {
                        fp8_lanes_to_bf16(_mm512_cvtepu8_epi16(_mm256_loadu_si256(src.add(i) as *const _)))
                    } else {
                        _mm512_loadu_si512(src.add(2 * i) as *const _)
                    };
                    (_mm512_castsi512_ps(_mm512_slli_epi32(z, 16)), _mm512_castsi512_ps(_mm512_and_si512(z, high)))
                }
            };
            _mm512_storeu_ps(dst.add(2 * p * NR + h * 16), _mm512_mul_ps(even, *sh));
            _mm512_storeu_ps(dst.add((2 * p + 1) * NR + h * 16), _mm512_mul_ps(odd, *sh));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_widening_matches_the_portable_one() {
        let isas = Isa::supported();
        let mut scale = [1f32; NR];
        scale.iter_mut().enumerate().for_each(|(i, s)| *s = 0.5 + i as f32 / 8.0);
        for dtype in [DType::BF16, DType::F16, DType::F8E4M3] {
            let kp = 5;
            let n = kp * 2 * NR;
            let src: Vec<u8> = (0..n * dtype.size())
                .map(|i| {
                    let b = (i * 37 + 11) as u8;
                    // Avoid NaN/Inf bit patterns (FP8 0x7F/0xFF; f16 and bf16 exponent all ones).
                    if dtype == DType::F8E4M3 && b & 0x7F == 0x7F {
                        b - 1
                    } else if dtype != DType::F8E4M3 && i % 2 == 1 {
                        b & 0x3F
                    } else {
                        b
                    }
                })
                .collect();
            let mut want = vec![0f32; n];
            widen_pairs_f32(Isa::Portable, dtype, &src, kp, &scale, &mut want);
            for &isa in &isas {
                let mut got = vec![f32::NAN; n];
                widen_pairs_f32(isa, dtype, &src, kp, &scale, &mut got);
                assert_eq!(got, want, "{} {}", isa.name(), dtype.name());
            }
        }
        let all: Vec<u8> = (0..=255u8).filter(|b| b & 0x7F != 0x7F).collect();
        let mut want = vec![0u16; all.len()];
        widen_fp8_bf16(Isa::Portable, &all, &mut want);
        for &isa in &isas {
            let mut got = vec![0u16; all.len()];
            widen_fp8_bf16(isa, &all, &mut got);
            assert_eq!(got, want, "{}", isa.name());
        }
    }
}
