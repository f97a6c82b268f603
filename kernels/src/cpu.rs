//! CPU backend: multi-threaded SIMD GEMM from the `gemm` crate on the rayon pool, a fused
//! W1|W3 product, then SwiGLU and W2.

use std::sync::Arc;

use crate::{ExpertBackend, FfnWeights, KernelError, LoadedFfn, Result};

/// Multi-threaded CPU backend. Callers run it on a compute pool, never on async runtime threads.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

/// `out[m, n] = a[m, k] . b[n, k]^T`, all row-major, f32, on the current rayon pool.
pub fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) -> Result<()> {
    if a.len() != m * k || b.len() != n * k || out.len() != m * n {
        return Err(KernelError::Shape(format!(
            "matmul_nt: a has {} (want {m}x{k}), b has {} (want {n}x{k}), out has {} (want {m}x{n})",
            a.len(),
            b.len(),
            out.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the lengths were checked above: `a` holds m*k values read with row stride k and
    // column stride 1; `b` (as the k x n right operand b^T) holds n*k values, element (kk, nn)
    // at nn*k + kk, so its row stride is 1 and column stride k; `out` holds m*n values written
    // with row stride n. The three slices do not overlap (`out` is a unique borrow), and
    // read_dst = false so `out`'s previous contents are not read.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

#[derive(Debug)]
struct CpuFfn {
    hidden: usize,
    ffn: usize,
    /// [W1; W3] stacked: [2 * ffn, hidden].
    w13: Vec<f32>,
    w2: Vec<f32>,
    limit: Option<f32>,
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl LoadedFfn for CpuFfn {
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        let (h, f) = (self.hidden, self.ffn);
        if x.len() != rows * h || out.len() != rows * h {
            return Err(KernelError::Shape(format!(
                "expert input has {} values and output {}; expected {rows} rows x {h}",
                x.len(),
                out.len()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let mut gu = vec![0f32; rows * 2 * f];
        matmul_nt(x, &self.w13, rows, 2 * f, h, &mut gu)?;
        let mut act = vec![0f32; rows * f];
        for (r, a) in act.chunks_exact_mut(f).enumerate() {
            let row = &gu[r * 2 * f..(r + 1) * 2 * f];
            let (g, u) = row.split_at(f);
            match self.limit {
                Some(l) => {
                    for ((o, &g), &u) in a.iter_mut().zip(g).zip(u) {
                        *o = silu(g.min(l)) * u.clamp(-l, l);
                    }
                }
                None => {
                    for ((o, &g), &u) in a.iter_mut().zip(g).zip(u) {
                        *o = silu(g) * u;
                    }
                }
            }
        }
        matmul_nt(&act, &self.w2, rows, h, f, out)
    }

    fn bytes(&self) -> u64 {
        ((self.w13.len() + self.w2.len()) * 4) as u64
    }

    fn hidden(&self) -> usize {
        self.hidden
    }
}

impl ExpertBackend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn load_ffn(&self, w: FfnWeights) -> Result<Arc<dyn LoadedFfn>> {
        let (h, f) = (w.hidden, w.ffn);
        if w.w1.len() != f * h || w.w3.len() != f * h || w.w2.len() != h * f {
            return Err(KernelError::Shape(format!(
                "FFN weights: w1 {} w3 {} w2 {} values; expected {f}x{h}, {f}x{h}, {h}x{f}",
                w.w1.len(),
                w.w3.len(),
                w.w2.len()
            )));
        }
        let mut w13 = w.w1;
        w13.extend_from_slice(&w.w3);
        Ok(Arc::new(CpuFfn { hidden: h, ffn: f, w13, w2: w.w2, limit: w.swiglu_limit }))
    }

    fn matmul_nt(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) -> Result<()> {
        matmul_nt(a, b, m, n, k, out)
    }
}

/// Measured f32 GEMM rate (GFLOP/s) of a square `n` product with the same library and pool.
pub fn gemm_gflops(n: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
    let mut c = vec![0f32; n * n];
    let _ = matmul_nt(&a, &b, n, n, n, &mut c);
    let t = std::time::Instant::now();
    for _ in 0..reps.max(1) {
        let _ = matmul_nt(&a, &b, n, n, n, &mut c);
    }
    let s = t.elapsed().as_secs_f64();
    2.0 * (n as f64).powi(3) * reps.max(1) as f64 / s / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut o = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k).map(|l| a[i * k + l] as f64 * b[j * k + l] as f64).sum();
            }
        }
        o
    }

    #[test]
    fn matmul_matches_naive_on_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (130, 70, 129)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 17 % 89) as f32 - 44.0) / 40.0).collect();
            let mut o = vec![f32::NAN; m * n];
            matmul_nt(&a, &b, m, n, k, &mut o).unwrap();
            let r = naive_nt(&a, &b, m, n, k);
            for (x, y) in o.iter().zip(&r) {
                assert!((*x as f64 - y).abs() < 1e-4 * (1.0 + y.abs()), "{m}x{n}x{k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn shape_errors_are_reported() {
        let e = matmul_nt(&[0.0; 3], &[0.0; 4], 2, 2, 2, &mut [0.0; 4]).unwrap_err();
        assert!(e.to_string().contains("want 2x2"), "{e}");
        assert!(crate::backend_for_device("cuda:0").unwrap_err().to_string().contains("not available"));
        assert!(crate::backend_for_device("tpu").is_err());
    }
}
