//! The CUDA kernels, run on this machine: `kernels/cuda/experts.cu` built for the host with the
//! emulator in `kernels/cuda/emu/emu.cpp` (g++), driven by an [`ExpertBackend`] that plans its
//! launches with the CUDA backend's own host code ([`tile_table`], [`mat_descriptor`],
//! [`ffn_launch`], [`device_expert_bytes`]) over host buffers in place of device memory. The
//! backend conformance suite runs on it, so the kernels' indexing, staging, FP8 widening,
//! tensor-core fragment use, clamp and permute/combine are checked in CI without a GPU.
//! What it cannot check: cudarc's calls, streams, timing, and the hardware itself.

use std::any::Any;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use expertmesh_core::dtype::DType;

use crate::cuda_plan::{device_expert_bytes, dtype_code, ffn_launch, mat_descriptor, tile_table};
use crate::{
    check_activation_dtype, ExpertBackend, Groups, HostRows, KernelError, LayerExperts, LayerWeights, Result, Rows,
    StoredMatrix,
};

type Launch = unsafe extern "C" fn(*const c_char, c_uint, c_uint, c_uint, *mut *mut c_void) -> c_int;

struct Emu {
    _lib: libloading::Library,
    launch: Launch,
    /// The emulator keeps its launch state in globals: one launch at a time.
    lock: Mutex<()>,
}

/// The emulator library, built once per test process.
fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda/emu/emu.cpp");
        let out = std::env::temp_dir().join(format!("expertmesh-cuda-emu-{}.so", std::process::id()));
        let built = Command::new("g++")
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-DEXPERTMESH_EMU"])
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .arg("-lpthread")
            .output()
            .unwrap_or_else(|e| {
                panic!("running g++ to build the CUDA kernel emulator: {e}; install it with `apt-get install g++` (make deps does)")
            });
        assert!(
            built.status.success(),
            "g++ could not build {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&built.stderr)
        );
        // SAFETY: the library is ours (built just now from emu.cpp); loading runs no
        // initialisers beyond C++ statics of that file.
        let lib = unsafe { libloading::Library::new(&out) }.expect("loading the CUDA kernel emulator");
        let _ = std::fs::remove_file(&out);
        // SAFETY: emu_launch has exactly the `Launch` signature in emu.cpp.
        let launch = *unsafe { lib.get::<Launch>(b"emu_launch\0") }.expect("emu_launch in the emulator");
        Emu { _lib: lib, launch, lock: Mutex::new(()) }
    })
}

/// One launch of kernel `name`; `args` point at the kernel's parameters in order (as
/// cuLaunchKernel takes them).
fn launch(name: &str, grid: (u32, u32, u32), block: u32, args: &mut [*mut c_void]) {
    let e = emu();
    let _g = e.lock.lock().unwrap_or_else(|p| p.into_inner());
    let n = CString::new(name).expect("kernel name");
    // SAFETY: every pointer in `args` points at a live value of the type the kernel's
    // parameter has, and every buffer address in them covers what the kernel reads or writes
    // (the callers size them as the CUDA backend sizes its device buffers).
    let rc = unsafe { (e.launch)(n.as_ptr(), grid.0, grid.1, block, args.as_mut_ptr()) };
    assert_eq!(rc, 0, "the emulator has no kernel `{name}`");
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// "Device memory": 16-byte aligned host bytes (cudaMalloc aligns to 256).
#[derive(Debug, Clone)]
struct Buf {
    words: Vec<u128>,
    len: usize,
}

impl Buf {
    fn zeroed(len: usize) -> Self {
        Self { words: vec![0; len.div_ceil(16)], len }
    }
    fn from_bytes(b: &[u8]) -> Self {
        let mut s = Self::zeroed(b.len());
        s.bytes_mut().copy_from_slice(b);
        s
    }
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }
    fn addr(&self) -> u64 {
        self.words.as_ptr() as u64
    }
}

#[derive(Debug)]
struct EmuMatrix {
    dtype: DType,
    data: Buf,
    scales: Option<(Buf, (usize, usize))>,
}

impl EmuMatrix {
    fn upload(m: &StoredMatrix<'_>) -> Self {
        let scales = m.scales.as_ref().map(|s| {
            let b: Vec<u8> = s.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (Buf::from_bytes(&b), s.block)
        });
        Self { dtype: m.dtype, data: Buf::from_bytes(&m.data), scales }
    }
    fn descriptor(&self) -> [u64; 4] {
        mat_descriptor(self.data.addr(), self.scales.as_ref().map(|(s, b)| (s.addr(), *b)), self.dtype)
    }
    fn bytes(&self) -> u64 {
        (self.data.len + self.scales.as_ref().map_or(0, |(s, _)| s.len)) as u64
    }
}

#[derive(Debug)]
struct EmuExpert {
    w: [EmuMatrix; 3],
}

/// Activations in "device memory".
#[derive(Debug)]
pub(crate) struct EmuRows {
    dtype: DType,
    rows: usize,
    cols: usize,
    buf: Buf,
}

impl Rows for EmuRows {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[derive(Debug)]
struct EmuLayer {
    layer: usize,
    hidden: usize,
    ffn: usize,
    limit: Option<f32>,
    experts: BTreeMap<u32, Arc<EmuExpert>>,
    slots: BTreeMap<u32, u32>,
    table: Buf,
    bf16_weights: bool,
}

impl EmuLayer {
    fn new(shape: (usize, usize, usize, Option<f32>), experts: BTreeMap<u32, Arc<EmuExpert>>) -> Self {
        let (layer, hidden, ffn, limit) = shape;
        let mut desc: Vec<u64> = Vec::new();
        let mut slots = BTreeMap::new();
        for (i, (&id, e)) in experts.iter().enumerate() {
            slots.insert(id, i as u32);
            e.w.iter().for_each(|m| desc.extend_from_slice(&m.descriptor()));
        }
        desc.push(0);
        let table = Buf::from_bytes(bytemuck::cast_slice(&desc));
        let bf16_weights = experts.values().all(|e| e.w.iter().all(|m| matches!(m.dtype, DType::BF16 | DType::F8E4M3)));
        Self { layer, hidden, ffn, limit, experts, slots, table, bf16_weights }
    }
}

impl crate::ResidentLayer<Arc<EmuExpert>> for EmuLayer {
    fn shape(&self) -> (usize, usize, usize) {
        (self.layer, self.hidden, self.ffn)
    }
    fn expert(&self, id: u32) -> Option<&Arc<EmuExpert>> {
        self.experts.get(&id)
    }
}

impl LayerExperts for EmuLayer {
    fn layer(&self) -> usize {
        self.layer
    }
    fn experts(&self) -> Vec<u32> {
        self.experts.keys().copied().collect()
    }
    fn holds(&self, expert: u32) -> bool {
        self.experts.contains_key(&expert)
    }
    fn hidden(&self) -> usize {
        self.hidden
    }
    fn bytes(&self) -> u64 {
        self.experts.values().map(|e| e.w.iter().map(EmuMatrix::bytes).sum::<u64>()).sum()
    }

    fn forward(&self, x: &dyn Rows, groups: &Groups, out: &mut dyn Rows) -> Result<()> {
        let x = x
            .as_any()
            .downcast_ref::<EmuRows>()
            .ok_or_else(|| KernelError::Shape("input rows belong to another backend".into()))?;
        let out = out
            .as_any_mut()
            .downcast_mut::<EmuRows>()
            .ok_or_else(|| KernelError::Shape("output rows belong to another backend".into()))?;
        let (h, f) = (self.hidden, self.ffn);
        if x.cols != h || out.cols != h || out.rows != x.rows {
            return Err(KernelError::Shape(format!(
                "layer {}: input [{}, {}] and output [{}, {}]; both must be [rows, {h}] with the same rows",
                self.layer, x.rows, x.cols, out.rows, out.cols
            )));
        }
        groups.check(x.rows)?;
        let tiles = tile_table(groups, |e| self.slots.get(&e).copied(), self.layer)?;
        let ntiles = tiles.len() / 4;
        if ntiles == 0 {
            return Ok(());
        }
        let tiles = Buf::from_bytes(bytemuck::cast_slice(&tiles));
        let plan = ffn_launch(x.dtype, self.bf16_weights, h, f, ntiles);
        let hbuf = Buf::zeroed(x.rows * f * plan.h_dtype().size());
        let (mut tp, mut ep, mut xp, mut hp, mut op) =
            (tiles.addr(), self.table.addr(), x.buf.addr(), hbuf.addr(), out.buf.addr());
        let (mut hi, mut fi, mut limit) = (h as i32, f as i32, self.limit.unwrap_or(0.0));
        let (mut xd, mut od) = (dtype_code(x.dtype), dtype_code(out.dtype));
        let (gateup, down) = plan.kernels();
        if plan.tensor_cores {
            let mut a =
                [arg(&mut tp), arg(&mut ep), arg(&mut xp), arg(&mut hi), arg(&mut fi), arg(&mut limit), arg(&mut hp)];
            launch(gateup, plan.gateup_grid, plan.block, &mut a);
        } else {
            let mut a = [
                arg(&mut tp),
                arg(&mut ep),
                arg(&mut xp),
                arg(&mut xd),
                arg(&mut hi),
                arg(&mut fi),
                arg(&mut limit),
                arg(&mut hp),
            ];
            launch(gateup, plan.gateup_grid, plan.block, &mut a);
        }
        let mut a = [arg(&mut tp), arg(&mut ep), arg(&mut hp), arg(&mut hi), arg(&mut fi), arg(&mut op), arg(&mut od)];
        launch(down, plan.down_grid, plan.block, &mut a);
        Ok(())
    }

    fn subset(&self, keep: &[u32]) -> Result<Arc<dyn LayerExperts>> {
        let mut experts = BTreeMap::new();
        for &e in keep {
            let x = self.experts.get(&e).ok_or(KernelError::NotResident { layer: self.layer, expert: e })?;
            experts.insert(e, x.clone());
        }
        Ok(Arc::new(EmuLayer::new((self.layer, self.hidden, self.ffn, self.limit), experts)))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The CUDA kernels on the host emulator, as an expert backend.
#[derive(Debug, Default)]
pub(crate) struct EmuBackend;

impl EmuBackend {
    fn rows_of(r: &dyn Rows) -> &EmuRows {
        r.as_any().downcast_ref::<EmuRows>().expect("emulator rows")
    }

    /// `gather_rows` as the CUDA backend launches it (one block of 128 threads per row).
    fn permute(&self, x: &EmuRows, gather: &[u32]) -> EmuRows {
        let rows = gather.len();
        let row_bytes = x.cols * x.dtype.size();
        let out = EmuRows { dtype: x.dtype, rows, cols: x.cols, buf: Buf::zeroed(rows * row_bytes) };
        if rows > 0 {
            let idx = Buf::from_bytes(bytemuck::cast_slice(gather));
            let (mut s, mut d, mut i) = (x.buf.addr(), out.buf.addr(), idx.addr());
            let (mut n, mut rb) = (rows as u32, row_bytes as u32);
            let mut a = [arg(&mut s), arg(&mut d), arg(&mut i), arg(&mut n), arg(&mut rb)];
            launch("gather_rows", (rows as u32, 1, 1), 128, &mut a);
        }
        out
    }

    /// `combine_rows` as the CUDA backend launches it (one block of 256 threads per token).
    fn combine(&self, y: &EmuRows, slot: &[u32], weight: &[f32], tokens: usize) -> EmuRows {
        let k = slot.len() / tokens.max(1);
        let out = EmuRows { dtype: DType::F32, rows: tokens, cols: y.cols, buf: Buf::zeroed(tokens * y.cols * 4) };
        if tokens > 0 {
            let (sb, wb) = (Buf::from_bytes(bytemuck::cast_slice(slot)), Buf::from_bytes(bytemuck::cast_slice(weight)));
            let (mut yp, mut sp, mut wp, mut op) = (y.buf.addr(), sb.addr(), wb.addr(), out.buf.addr());
            let (mut dt, mut t, mut kk, mut h) = (dtype_code(y.dtype), tokens as u32, k as u32, y.cols as u32);
            let mut a = [
                arg(&mut yp),
                arg(&mut dt),
                arg(&mut sp),
                arg(&mut wp),
                arg(&mut t),
                arg(&mut kk),
                arg(&mut h),
                arg(&mut op),
            ];
            launch("combine_rows", (tokens as u32, 1, 1), 256, &mut a);
        }
        out
    }
}

impl ExpertBackend for EmuBackend {
    fn name(&self) -> String {
        "cuda kernels on the host emulator".into()
    }

    fn load_layer(
        &self,
        w: LayerWeights<'_>,
        prev: Option<(&Arc<dyn LayerExperts>, &[u32])>,
    ) -> Result<Arc<dyn LayerExperts>> {
        w.check()?;
        let mut experts = crate::kept_experts::<EmuLayer, Arc<EmuExpert>>(prev, &w)?;
        for e in &w.experts {
            let w = [EmuMatrix::upload(&e.w1), EmuMatrix::upload(&e.w3), EmuMatrix::upload(&e.w2)];
            experts.insert(e.expert, Arc::new(EmuExpert { w }));
        }
        Ok(Arc::new(EmuLayer::new((w.layer, w.hidden, w.ffn, w.swiglu_limit), experts)))
    }

    fn resident_bytes(&self, hidden: usize, ffn: usize, dtype: DType, block: Option<(usize, usize)>) -> u64 {
        device_expert_bytes(hidden, ffn, dtype, block)
    }

    fn upload(&self, rows: HostRows) -> Result<Box<dyn Rows>> {
        let rows = HostRows::new(rows.dtype, rows.rows, rows.cols, rows.data)?;
        Ok(Box::new(EmuRows { dtype: rows.dtype, rows: rows.rows, cols: rows.cols, buf: Buf::from_bytes(&rows.data) }))
    }

    fn alloc(&self, dtype: DType, rows: usize, cols: usize) -> Result<Box<dyn Rows>> {
        check_activation_dtype(dtype)?;
        Ok(Box::new(EmuRows { dtype, rows, cols, buf: Buf::zeroed(rows * cols * dtype.size()) }))
    }

    fn download(&self, rows: Box<dyn Rows>) -> Result<HostRows> {
        let r = Self::rows_of(&*rows);
        HostRows::new(r.dtype, r.rows, r.cols, Bytes::copy_from_slice(r.buf.bytes()))
    }

    fn matmul_nt(&self, _a: &[f32], _b: &[f32], _m: usize, _n: usize, _k: usize, _out: &mut [f32]) -> Result<()> {
        Err(KernelError::Device("the emulator runs the expert kernels only".into()))
    }

    fn memory(&self) -> Result<(u64, u64)> {
        Ok((1 << 40, 1 << 40))
    }

    fn device(&self) -> (&'static str, u32) {
        ("cuda", 0)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Suite;
    use crate::cuda_plan::Permutation;
    use expertmesh_core::rng::SplitMix64;

    #[test]
    fn the_cuda_kernels_pass_the_conformance_suite_on_the_emulator() {
        let failures = Suite::new().run(&EmuBackend);
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn the_permute_and_combine_kernels_invert_a_permutation() {
        let mut rng = SplitMix64::new(7);
        // hidden 64 (bf16 rows of 128 bytes: the 16-byte path) and 33 (66 bytes: bytewise).
        for (cols, dtype) in [(64, DType::BF16), (33, DType::BF16), (33, DType::F32), (64, DType::F32)] {
            let (tokens, k, experts) = (37usize, 4usize, 16u32);
            let here = |e: u32| !e.is_multiple_of(3);
            let routed: Vec<u32> = (0..tokens * k).map(|_| rng.next_u64() as u32 % experts).collect();
            let weights: Vec<f32> = (0..tokens * k).map(|_| rng.uniform(1.0) as f32).collect();
            let p = Permutation::build(&routed, &weights, k, here).unwrap();
            let x: Vec<f32> = (0..tokens * cols).map(|_| half::bf16::from_f32(rng.normal() as f32).to_f32()).collect();
            let host = HostRows::from_f32(tokens, cols, &x).unwrap();
            let host = if dtype == DType::BF16 {
                let b: Vec<u8> = x.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
                HostRows::new(DType::BF16, tokens, cols, Bytes::from(b)).unwrap()
            } else {
                host
            };
            let be = EmuBackend;
            let xr = be.upload(host).unwrap();
            let g = be.permute(EmuBackend::rows_of(&*xr), &p.gather);
            // The gathered rows are the tokens' rows, byte for byte.
            let row_bytes = cols * dtype.size();
            let xb = EmuBackend::rows_of(&*xr).buf.bytes();
            for (i, &t) in p.gather.iter().enumerate() {
                let t = t as usize;
                assert_eq!(
                    &g.buf.bytes()[i * row_bytes..(i + 1) * row_bytes],
                    &xb[t * row_bytes..(t + 1) * row_bytes],
                    "{dtype:?} x {cols}: row {i}"
                );
            }
            // Combining the gathered rows gives each token its row times the weights of the
            // choices held here.
            let y = be.combine(&g, &p.slot, &p.weight, tokens);
            let got: Vec<f32> =
                y.buf.bytes().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            for t in 0..tokens {
                let w: f64 = (0..k).filter(|&j| here(routed[t * k + j])).map(|j| weights[t * k + j] as f64).sum();
                for c in 0..cols {
                    let want = w * x[t * cols + c] as f64;
                    let d = (got[t * cols + c] as f64 - want).abs();
                    assert!(
                        d <= 1e-5 * (1.0 + want.abs()),
                        "{dtype:?} x {cols}: token {t} col {c}: {} vs {want}",
                        got[t * cols + c]
                    );
                }
            }
        }
    }
}
