//! The backend conformance suite: every backend runs it against the float64 reference
//! (`expertmesh_core::reference`), which decodes the same checkpoint bytes on its own.
//!
//! It covers every weight dtype (f32, bf16, f16, FP8 e4m3 with block scales, including blocks
//! that do not divide the matrix and blocks narrower than a tile), bf16 and f32 activations in
//! and out, shapes with odd k, k longer than one chunk and rows past one row chunk, groups of
//! 0, 1 and odd row counts, an expert taking two groups, a batch of no rows, DeepSeek V4's
//! SwiGLU clamp, experts kept from a previous resident layer, and the errors a caller can cause.
//! Output buffers start as NaN, so an element a kernel never writes fails its case.
//!
//! ```no_run
//! use expertmesh_kernels::{conformance::Suite, cpu::CpuBackend};
//! let backend = CpuBackend::new();
//! let suite = Suite::new();
//! let failures = suite.run(&backend);
//! assert!(failures.is_empty(), "{failures:#?}");
//! ```

use std::sync::Arc;

use bytes::Bytes;
use expertmesh_core::dtype::{encode_f32, f32_to_fp8_e4m3, DType};
use expertmesh_core::reference::{ffn_forward, RefCheckpoint, RefFfn};
use expertmesh_core::rng::SplitMix64;

use crate::{
    BlockScales, ExpertBackend, ExpertWeights, Groups, HostRows, KernelError, LayerExperts, LayerWeights, StoredMatrix,
};

/// One matrix as the checkpoint stores it.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) dtype: DType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: Vec<u8>,
    pub(crate) scales: Option<Vec<f32>>,
}

struct Shaped<'a> {
    dtype: DType,
    shape: Vec<usize>,
    data: &'a [u8],
}

impl safetensors::View for &Shaped<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.data.into()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub(crate) fn encode(dtype: DType, rows: usize, cols: usize, values: &[f32], block: (usize, usize)) -> Stored {
    if dtype != DType::F8E4M3 {
        let mut data = Vec::new();
        // Encoding f32 as a float dtype cannot fail.
        let _ = encode_f32(dtype, values, &mut data);
        return Stored { dtype, rows, cols, data, scales: None };
    }
    let (br, bc) = block;
    let sc = cols.div_ceil(bc);
    let mut scales = vec![0f32; rows.div_ceil(br) * sc];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / br) * sc + c / bc];
            *s = s.max(values[r * cols + c].abs());
        }
    }
    scales.iter_mut().for_each(|s| *s = if *s > 0.0 { *s / 448.0 } else { 1.0 });
    let data =
        (0..rows * cols).map(|i| f32_to_fp8_e4m3(values[i] / scales[(i / cols / br) * sc + (i % cols) / bc])).collect();
    Stored { dtype, rows, cols, data, scales: Some(scales) }
}

/// One case: a layer of experts 0..n and a batch grouped over them.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub hidden: usize,
    pub ffn: usize,
    pub dtype: DType,
    pub block: (usize, usize),
    pub limit: Option<f32>,
    pub x_dtype: DType,
    pub out_dtype: DType,
    pub groups: Vec<(u32, usize)>,
}

#[derive(Debug)]
struct Prepared {
    case: Case,
    /// Per expert: w1, w3, w2.
    weights: Vec<[Stored; 3]>,
    /// Input rows as the backend receives them.
    x: Bytes,
    /// Reference output rows, f64.
    want: Vec<f64>,
}

/// The prepared suite: weights, inputs and float64 answers, made once and run on any backend.
#[derive(Debug)]
pub struct Suite {
    cases: Vec<Prepared>,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let groups = vec![(0, 0), (1, 1), (2, 5), (0, 13), (3, 12), (1, 25)];
    type Shape = (usize, usize, Vec<(u32, usize)>);
    let shapes: [Shape; 4] = [
        (64, 96, groups.clone()),
        (33, 47, groups.clone()),
        (130, 200, groups.clone()),
        // k = 2048 takes several k chunks; 100 rows in one group pass one f32 row chunk.
        (2048, 64, vec![(1, 100), (0, 3)]),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3] {
        for (hidden, ffn, g) in &shapes {
            for (x_dtype, out_dtype) in
                [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::BF16, DType::F32)]
            {
                v.push(Case {
                    name: format!("{} [{hidden}, {ffn}] {}->{}", dtype.name(), x_dtype.name(), out_dtype.name()),
                    hidden: *hidden,
                    ffn: *ffn,
                    dtype,
                    block: (128, 128),
                    limit: None,
                    x_dtype,
                    out_dtype,
                    groups: g.clone(),
                });
            }
        }
    }
    for dtype in [DType::BF16, DType::F8E4M3, DType::F32] {
        for x_dtype in [DType::F32, DType::BF16] {
            v.push(Case {
                name: format!("{} V4 clamp {}", dtype.name(), x_dtype.name()),
                hidden: 64,
                ffn: 96,
                dtype,
                block: (128, 128),
                limit: Some(0.5),
                x_dtype,
                out_dtype: x_dtype,
                groups: groups.clone(),
            });
        }
    }
    for x_dtype in [DType::F32, DType::BF16] {
        v.push(Case {
            name: format!("f8_e4m3 [48, 64] blocks {}", x_dtype.name()),
            hidden: 200,
            ffn: 150,
            dtype: DType::F8E4M3,
            block: (48, 64),
            limit: None,
            x_dtype,
            out_dtype: DType::F32,
            groups: groups.clone(),
        });
    }
    v.push(Case {
        name: "no rows".into(),
        hidden: 64,
        ffn: 96,
        dtype: DType::BF16,
        block: (128, 128),
        limit: None,
        x_dtype: DType::BF16,
        out_dtype: DType::BF16,
        groups: vec![(0, 0)],
    });
    v
}

fn round_to(dtype: DType, v: f32) -> f32 {
    if dtype == DType::BF16 {
        half::bf16::from_f32(v).to_f32()
    } else {
        v
    }
}

fn prepare(case: Case, seed: u64) -> Result<Prepared, String> {
    let mut rng = SplitMix64::new(seed);
    let (h, f) = (case.hidden, case.ffn);
    let experts = case.groups.iter().map(|g| g.0 as usize + 1).max().unwrap_or(1).max(4);
    let mut weights = Vec::new();
    let mut files = Vec::new();
    for _ in 0..experts {
        let mut mat = |rows: usize, cols: usize, scale: f64| {
            // Magnitudes vary across rows and columns (by up to 8x), so every FP8 block gets a
            // scale of its own and a scale applied to the wrong columns shows.
            let v: Vec<f32> = (0..rows * cols)
                .map(|i| (rng.uniform(scale) * f64::from(1u32 << ((i / cols / 11 + i % cols / 13) % 4)) / 3.0) as f32)
                .collect();
            encode(case.dtype, rows, cols, &v, case.block)
        };
        let a = 2.0 / (h as f64).sqrt();
        let w = [mat(f, h, a), mat(f, h, a), mat(h, f, 2.0 / (f as f64).sqrt())];
        let mut tensors: Vec<(String, Shaped<'_>)> = Vec::new();
        for (i, m) in w.iter().enumerate() {
            tensors.push((format!("w{i}"), Shaped { dtype: m.dtype, shape: vec![m.rows, m.cols], data: &m.data }));
        }
        let scale_bytes: Vec<(usize, Vec<u8>, Vec<usize>)> = w
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                m.scales.as_ref().map(|s| {
                    (
                        i,
                        s.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        vec![m.rows.div_ceil(case.block.0), m.cols.div_ceil(case.block.1)],
                    )
                })
            })
            .collect();
        for (i, b, shape) in &scale_bytes {
            tensors.push((format!("w{i}_scale_inv"), Shaped { dtype: DType::F32, shape: shape.clone(), data: b }));
        }
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), None)
            .map_err(|e| format!("{}: serialising the weights: {e}", case.name))?;
        files.push(bytes);
        weights.push(w);
    }
    let rows: usize = case.groups.iter().map(|g| g.1).sum();
    let x: Vec<f32> = (0..rows * h).map(|_| round_to(case.x_dtype, rng.normal() as f32)).collect();
    let mut xb = Vec::new();
    encode_f32(case.x_dtype, &x, &mut xb).map_err(|e| e.to_string())?;
    let mut want = vec![0f64; rows * h];
    let mut r0 = 0;
    for &(e, n) in &case.groups {
        let file = [files[e as usize].clone()];
        let ck = RefCheckpoint::new(&file).map_err(|e| e.to_string())?;
        let t = |i: usize| ck.tensor(&format!("w{i}"), Some(case.block)).map(|t| t.0).map_err(|e| e.to_string());
        let ffn = RefFfn { ffn: f, w1: t(0)?, w3: t(1)?, w2: t(2)? };
        for r in r0..r0 + n {
            let xr: Vec<f64> = x[r * h..(r + 1) * h].iter().map(|&v| v as f64).collect();
            let y = ffn_forward(&ffn, h, &xr, case.limit.map(|l| l as f64));
            want[r * h..(r + 1) * h].copy_from_slice(&y);
        }
        r0 += n;
    }
    Ok(Prepared { case, weights, x: Bytes::from(xb), want })
}

pub(crate) fn stored<'a>(s: &'a Stored, block: (usize, usize)) -> StoredMatrix<'a> {
    StoredMatrix {
        dtype: s.dtype,
        rows: s.rows,
        cols: s.cols,
        data: (&s.data[..]).into(),
        scales: s.scales.as_ref().map(|v| BlockScales { block, values: v.clone() }),
    }
}

fn layer_weights(p: &Prepared, experts: impl Iterator<Item = usize>) -> LayerWeights<'_> {
    let c = &p.case;
    LayerWeights {
        layer: 3,
        hidden: c.hidden,
        ffn: c.ffn,
        swiglu_limit: c.limit,
        experts: experts
            .map(|e| ExpertWeights {
                expert: e as u32,
                w1: stored(&p.weights[e][0], c.block),
                w3: stored(&p.weights[e][1], c.block),
                w2: stored(&p.weights[e][2], c.block),
            })
            .collect(),
    }
}

fn decode_rows(dtype: DType, b: &[u8]) -> Vec<f64> {
    match dtype {
        DType::BF16 => {
            b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64).collect()
        }
        _ => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
    }
}

impl Default for Suite {
    fn default() -> Self {
        Self::new()
    }
}

impl Suite {
    /// Build every case and its float64 answer.
    pub fn new() -> Self {
        let cases = cases()
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let name = c.name.clone();
                prepare(c, 1000 + i as u64).unwrap_or_else(|e| panic!("conformance case {name}: {e}"))
            })
            .collect();
        Self { cases }
    }

    pub fn len(&self) -> usize {
        self.cases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// Run every case on `backend`; the failures, each naming its case (empty: all passed).
    pub fn run(&self, backend: &dyn ExpertBackend) -> Vec<String> {
        let mut failures = Vec::new();
        for p in &self.cases {
            if let Err(e) = self.run_case(backend, p) {
                failures.push(format!("{} on {}: {e}", p.case.name, backend.name()));
            }
        }
        if let Err(e) = self.check_errors(backend) {
            failures.push(format!("error handling on {}: {e}", backend.name()));
        }
        failures
    }

    fn run_case(&self, backend: &dyn ExpertBackend, p: &Prepared) -> Result<(), String> {
        let c = &p.case;
        let n = p.weights.len();
        // Load half the experts, then the rest on top of them (kept, not reloaded).
        let first = backend.load_layer(layer_weights(p, 0..n / 2), None).map_err(|e| e.to_string())?;
        let keep: Vec<u32> = (0..n as u32 / 2).collect();
        let layer = backend.load_layer(layer_weights(p, n / 2..n), Some((&first, &keep))).map_err(|e| e.to_string())?;
        if layer.experts() != (0..n as u32).collect::<Vec<_>>() {
            return Err(format!("holds {:?}; expected 0..{n}", layer.experts()));
        }
        let want_bytes = n as u64 * backend.resident_bytes(c.hidden, c.ffn, c.dtype, Some(c.block));
        if layer.bytes() != want_bytes {
            return Err(format!("bytes() is {}; resident_bytes says {want_bytes}", layer.bytes()));
        }
        let rows: usize = c.groups.iter().map(|g| g.1).sum();
        let groups = Groups::from_counts(c.groups.iter().copied());
        let x = backend
            .upload(HostRows::new(c.x_dtype, rows, c.hidden, p.x.clone()).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        // The output starts as NaN (bf16 0x7FC0, f32 0x7FC00000): an element the backend never
        // writes fails the check below.
        let poison: Vec<u8> = match c.out_dtype {
            DType::BF16 => [0xC0, 0x7F].repeat(rows * c.hidden),
            _ => [0x00, 0x00, 0xC0, 0x7F].repeat(rows * c.hidden),
        };
        let mut out = backend
            .upload(HostRows::new(c.out_dtype, rows, c.hidden, Bytes::from(poison)).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        layer.forward(&*x, &groups, &mut *out).map_err(|e| e.to_string())?;
        let got = backend.download(out).map_err(|e| e.to_string())?;
        if (got.dtype, got.rows, got.cols) != (c.out_dtype, rows, c.hidden) {
            return Err(format!("answered [{}, {}] {}", got.rows, got.cols, got.dtype.name()));
        }
        let got = decode_rows(c.out_dtype, &got.data);
        // f32 math agrees with float64 to f32 rounding (about 1e-6 measured); each bf16 step
        // (inputs, the SwiGLU intermediate, the output) costs about 2^-9 per element (up to
        // 4e-3 per row measured). Twice and five times the worst seen: a scale applied to the
        // wrong half of one tile already fails.
        let tol = if c.x_dtype == DType::BF16 || c.out_dtype == DType::BF16 { 8e-3 } else { 5e-6 };
        for r in 0..rows {
            let (g, w) = (&got[r * c.hidden..(r + 1) * c.hidden], &p.want[r * c.hidden..(r + 1) * c.hidden]);
            let err = g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
            let norm = w.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-30);
            if let Some(col) = g.iter().position(|v| !v.is_finite()) {
                return Err(format!("row {r} column {col} is {} (never written, or computed as NaN)", g[col]));
            }
            if err / norm >= tol || !err.is_finite() {
                return Err(format!("row {r}: relative L2 error {:.3e} (tolerance {tol:.1e})", err / norm));
            }
        }
        Ok(())
    }

    /// Errors a caller can cause are answered as errors naming the problem.
    fn check_errors(&self, backend: &dyn ExpertBackend) -> Result<(), String> {
        let p = self.cases.first().ok_or("no cases")?;
        let c = &p.case;
        let layer: Arc<dyn LayerExperts> =
            backend.load_layer(layer_weights(p, 0..2), None).map_err(|e| e.to_string())?;
        let x = backend
            .upload(
                HostRows::new(DType::F32, 2, c.hidden, Bytes::from(vec![0u8; 8 * c.hidden]))
                    .map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
        let mut out = backend.alloc(DType::F32, 2, c.hidden).map_err(|e| e.to_string())?;
        let expect = |r: crate::Result<()>, what: &str, needle: &str| -> Result<(), String> {
            match r {
                Err(e) if e.to_string().contains(needle) => Ok(()),
                Err(e) => Err(format!("{what}: error `{e}` does not mention `{needle}`")),
                Ok(()) => Err(format!("{what}: accepted")),
            }
        };
        let r = layer.forward(&*x, &Groups::from_counts([(3, 2)]), &mut *out);
        if !matches!(r, Err(KernelError::NotResident { expert: 3, .. })) {
            return Err(format!("an expert not held: {r:?}"));
        }
        expect(layer.forward(&*x, &Groups::from_counts([(0, 3)]), &mut *out), "groups past the rows", "3 rows")?;
        let mut short = backend.alloc(DType::F32, 1, c.hidden).map_err(|e| e.to_string())?;
        expect(layer.forward(&*x, &Groups::from_counts([(0, 2)]), &mut *short), "a short output", "same rows")?;
        let mut w = layer_weights(p, 0..1);
        w.experts[0].w2.rows += 1;
        expect(backend.load_layer(w, None).map(|_| ()), "a wrong shape", "w2 (down)")?;
        let mut w = layer_weights(p, 0..1);
        w.experts.push(w.experts[0].clone());
        expect(backend.load_layer(w, None).map(|_| ()), "an expert twice", "given twice")?;
        expect(
            backend
                .upload(HostRows { dtype: DType::F32, rows: 2, cols: c.hidden, data: Bytes::from(vec![0u8; 3]) })
                .map(|_| ()),
            "short activations",
            "need",
        )?;
        Ok(())
    }
}
