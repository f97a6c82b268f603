//! CPU backend: a layer's experts resident in the checkpoint's dtype ([`pack`]), computed by
//! our own AVX-512 microkernels ([`simd`]) under a GEMM driver ([`gemm`]) on the rayon pool:
//! bf16 dot products with f32 accumulation where the CPU has AVX-512 BF16 and both sides are
//! bf16 (FP8 weights widened to bf16 tile by tile, exactly, their block scales applied to the
//! f32 partial sums); f32 FMA otherwise, weights widened tile by tile. The instruction set is
//! chosen at run time ([`Isa::supported`]); `EXPERTMESH_CPU_ISA` pins one.
//!
//! Callers run it on a compute pool, never on async runtime threads.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use expertmesh_core::dtype::DType;
use rayon::prelude::*;

use crate::{
    check_activation_dtype, ExpertBackend, ExpertWeights, Groups, HostRows, KernelError, LayerExperts, LayerWeights,
    Result, Rows,
};

mod act;
mod driver;
mod pack;
mod simd;

#[cfg(target_endian = "big")]
compile_error!("the CPU backend reads packed little-endian weights in place; big-endian targets are not supported");

pub use simd::Isa;

use driver::{Math, Panel};
use pack::{packed_bytes, Packed, NR};

/// Environment variable that pins the CPU backend's instruction set (`avx512-bf16`, `avx512`,
/// `portable`).
pub const ISA_ENV: &str = "EXPERTMESH_CPU_ISA";

/// Multi-threaded CPU backend.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    isa: Isa,
    /// Why this instruction set (shown in the backend's name).
    why: String,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// The instruction set chosen for this process, and why.
fn chosen() -> &'static (Isa, String) {
    static CHOICE: std::sync::OnceLock<(Isa, String)> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| {
        let supported = Isa::supported();
        if let Ok(s) = std::env::var(ISA_ENV) {
            if let Some(i) = Isa::parse(&s).filter(|i| supported.contains(i)) {
                return (i, format!("pinned by {ISA_ENV}"));
            }
        }
        match simd::calibrate() {
            Some((bf16, f32)) if bf16 > 1.25 * f32 => {
                (Isa::Avx512Bf16, format!("BF16 dot products {bf16:.0} GFLOP/s per thread, f32 FMA {f32:.0}"))
            }
            Some((bf16, f32)) => (
                Isa::Avx512,
                format!("f32 FMA {f32:.0} GFLOP/s per thread, BF16 dot products only {bf16:.0}: bf16 values multiplied in f32"),
            ),
            None => (supported[0], "the best this CPU has".into()),
        }
    })
}

impl CpuBackend {
    /// The fastest instruction set this CPU has (measured once per process when it has both
    /// BF16 dot products and f32 FMA), or the one `EXPERTMESH_CPU_ISA` names if the CPU has it.
    pub fn new() -> Self {
        let (isa, why) = chosen().clone();
        Self { isa, why }
    }

    /// A backend on a given instruction set; an error if this CPU lacks it.
    pub fn with_isa(isa: Isa) -> Result<Self> {
        if Isa::supported().contains(&isa) {
            Ok(Self { isa, why: "chosen by the caller".into() })
        } else {
            Err(KernelError::Unavailable {
                device: format!("cpu ({})", isa.name()),
                reason: format!(
                    "this CPU does not have it; it has {}",
                    Isa::supported().iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                ),
            })
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

/// Activations in host memory: the CPU backend's buffers.
#[derive(Debug)]
pub struct CpuRows {
    dtype: DType,
    rows: usize,
    cols: usize,
    data: RowsData,
}

#[derive(Debug)]
enum RowsData {
    /// Uploaded input, shared with the caller (for example a received message): never copied.
    Shared(Bytes),
    Owned(Vec<u8>),
}

impl CpuRows {
    fn bytes(&self) -> &[u8] {
        match &self.data {
            RowsData::Shared(b) => b,
            RowsData::Owned(v) => v,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        if let RowsData::Shared(b) = &self.data {
            self.data = RowsData::Owned(b.to_vec());
        }
        match &mut self.data {
            RowsData::Owned(v) => v,
            RowsData::Shared(_) => &mut [],
        }
    }
}

impl Rows for CpuRows {
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

/// One resident expert.
#[derive(Debug)]
struct CpuExpert {
    w1: Packed,
    w3: Packed,
    w2: Packed,
}

impl CpuExpert {
    fn pack(w: &ExpertWeights<'_>) -> Self {
        Self { w1: Packed::from_stored(&w.w1), w3: Packed::from_stored(&w.w3), w2: Packed::from_stored(&w.w2) }
    }

    fn bytes(&self) -> u64 {
        self.w1.bytes() + self.w3.bytes() + self.w2.bytes()
    }

    /// bf16 products when the activations are bf16, the CPU has BF16 dot products, and every
    /// weight is exactly a bf16 value (bf16 or FP8); f32 otherwise.
    fn math(&self, isa: Isa, act: DType) -> Math {
        let exact_in_bf16 = |p: &Packed| matches!(p.dtype, DType::BF16 | DType::F8E4M3);
        if act == DType::BF16 && isa.bf16_dot() && [&self.w1, &self.w3, &self.w2].into_iter().all(exact_in_bf16) {
            Math::Bf16
        } else {
            Math::F32
        }
    }
}

/// The experts of one layer, resident in host memory.
#[derive(Debug)]
pub struct CpuLayer {
    layer: usize,
    hidden: usize,
    ffn: usize,
    limit: Option<f32>,
    isa: Isa,
    experts: BTreeMap<u32, Arc<CpuExpert>>,
}

impl CpuLayer {
    /// One expert's FFN on `m` rows: `x` and `out` are `[m, hidden]` in their dtypes.
    fn expert_forward(&self, e: &CpuExpert, x_dtype: DType, x: &[u8], m: usize, out_dtype: DType, out: &mut [u8]) {
        if m == 0 {
            return;
        }
        let (h, f) = (self.hidden, self.ffn);
        let math = e.math(self.isa, x_dtype);
        let a1 = Panel::from_rows(math, x_dtype, x, m, h);
        let ft = e.w1.tiles;
        let mut c1 = vec![0f32; 2 * ft * m * NR];
        driver::gemm(self.isa, &a1, m, &[&e.w1, &e.w3], &mut c1);
        drop(a1);
        let mut a2 = Panel::zeros(math, m, f);
        act::swiglu(self.isa, &c1, m, ft, f, self.limit, &mut a2);
        drop(c1);
        let mut c2 = vec![0f32; e.w2.tiles * m * NR];
        driver::gemm(self.isa, &a2, m, &[&e.w2], &mut c2);
        act::write_rows(&c2, m, h, out_dtype, out);
    }
}

impl LayerExperts for CpuLayer {
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
        self.experts.values().map(|e| e.bytes()).sum()
    }

    fn forward(&self, x: &dyn Rows, groups: &Groups, out: &mut dyn Rows) -> Result<()> {
        let x = x.as_any().downcast_ref::<CpuRows>().ok_or_else(|| {
            KernelError::Shape("input rows belong to another backend; upload them to the CPU backend".into())
        })?;
        let out = out.as_any_mut().downcast_mut::<CpuRows>().ok_or_else(|| {
            KernelError::Shape("output rows belong to another backend; allocate them on the CPU backend".into())
        })?;
        let h = self.hidden;
        if x.cols != h || out.cols != h || out.rows != x.rows {
            return Err(KernelError::Shape(format!(
                "layer {}: input [{}, {}] and output [{}, {}]; both must be [rows, {h}] with the same rows",
                self.layer, x.rows, x.cols, out.rows, out.cols
            )));
        }
        groups.check(x.rows)?;
        let mut jobs = Vec::with_capacity(groups.experts.len());
        for (&id, w) in groups.experts.iter().zip(groups.offsets.windows(2)) {
            let e = self.experts.get(&id).ok_or(KernelError::NotResident { layer: self.layer, expert: id })?;
            jobs.push((e.clone(), w[0], w[1] - w[0]));
        }
        let (xd, od) = (x.dtype, out.dtype);
        let (xs, os) = (xd.size() * h, od.size() * h);
        let input = x.bytes();
        let mut rest = out.bytes_mut();
        let mut outs = Vec::with_capacity(jobs.len());
        for (_, _, m) in &jobs {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(m * os);
            outs.push(head);
            rest = tail;
        }
        jobs.into_par_iter().zip(outs).with_max_len(1).for_each(|((e, r0, m), o)| {
            self.expert_forward(&e, xd, &input[r0 * xs..(r0 + m) * xs], m, od, o);
        });
        Ok(())
    }

    fn subset(&self, keep: &[u32]) -> Result<Arc<dyn LayerExperts>> {
        let mut experts = BTreeMap::new();
        for &e in keep {
            let x = self.experts.get(&e).ok_or(KernelError::NotResident { layer: self.layer, expert: e })?;
            experts.insert(e, x.clone());
        }
        Ok(Arc::new(CpuLayer { experts, ..self.clone_shape() }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl crate::ResidentLayer<Arc<CpuExpert>> for CpuLayer {
    fn shape(&self) -> (usize, usize, usize) {
        (self.layer, self.hidden, self.ffn)
    }
    fn expert(&self, id: u32) -> Option<&Arc<CpuExpert>> {
        self.experts.get(&id)
    }
}

impl CpuLayer {
    fn clone_shape(&self) -> CpuLayer {
        CpuLayer {
            layer: self.layer,
            hidden: self.hidden,
            ffn: self.ffn,
            limit: self.limit,
            isa: self.isa,
            experts: BTreeMap::new(),
        }
    }
}

impl ExpertBackend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({}, {} threads; {})", self.isa.name(), rayon::current_num_threads(), self.why)
    }

    fn load_layer(
        &self,
        w: LayerWeights<'_>,
        prev: Option<(&Arc<dyn LayerExperts>, &[u32])>,
    ) -> Result<Arc<dyn LayerExperts>> {
        w.check()?;
        let mut experts = crate::kept_experts::<CpuLayer, Arc<CpuExpert>>(prev, &w)?;
        let packed: Vec<(u32, Arc<CpuExpert>)> =
            w.experts.par_iter().map(|e| (e.expert, Arc::new(CpuExpert::pack(e)))).collect();
        experts.extend(packed);
        Ok(Arc::new(CpuLayer {
            layer: w.layer,
            hidden: w.hidden,
            ffn: w.ffn,
            limit: w.swiglu_limit,
            isa: self.isa,
            experts,
        }))
    }

    fn resident_bytes(&self, hidden: usize, ffn: usize, dtype: DType, block: Option<(usize, usize)>) -> u64 {
        2 * packed_bytes(dtype, ffn, hidden, block) + packed_bytes(dtype, hidden, ffn, block)
    }

    fn upload(&self, rows: HostRows) -> Result<Box<dyn Rows>> {
        let rows = HostRows::new(rows.dtype, rows.rows, rows.cols, rows.data)?;
        Ok(Box::new(CpuRows { dtype: rows.dtype, rows: rows.rows, cols: rows.cols, data: RowsData::Shared(rows.data) }))
    }

    fn alloc(&self, dtype: DType, rows: usize, cols: usize) -> Result<Box<dyn Rows>> {
        check_activation_dtype(dtype)?;
        let n = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| KernelError::Shape(format!("{rows} x {cols} rows of {} overflow", dtype.name())))?;
        Ok(Box::new(CpuRows { dtype, rows, cols, data: RowsData::Owned(vec![0; n]) }))
    }

    fn download(&self, mut rows: Box<dyn Rows>) -> Result<HostRows> {
        let cpu = rows
            .as_any_mut()
            .downcast_mut::<CpuRows>()
            .ok_or_else(|| KernelError::Shape("rows belong to another backend; download them there".into()))?;
        let data = match std::mem::replace(&mut cpu.data, RowsData::Owned(Vec::new())) {
            RowsData::Shared(b) => b,
            RowsData::Owned(v) => Bytes::from(v),
        };
        HostRows::new(cpu.dtype, cpu.rows, cpu.cols, data)
    }

    fn matmul_nt(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) -> Result<()> {
        matmul_nt(a, b, m, n, k, out)
    }

    fn memory(&self) -> Result<(u64, u64)> {
        host_memory()
            .ok_or_else(|| KernelError::Device("cannot read MemAvailable and MemTotal from /proc/meminfo".into()))
    }

    fn device(&self) -> (&'static str, u32) {
        ("cpu", 0)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// (available, total) bytes of host memory: `/proc/meminfo`, bounded by the memory limit of this
/// process's cgroup (a container's `limits.memory`) where there is one, since `/proc/meminfo`
/// shows the whole machine.
pub fn host_memory() -> Option<(u64, u64)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    bounded_memory(&meminfo, cgroup_memory())
}

/// A cgroup's memory limit and what counts against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupMemory {
    pub limit: u64,
    pub usage: u64,
    /// Page cache the kernel reclaims before it would kill (not part of the working set).
    pub inactive_file: u64,
}

/// The limit of this process's cgroup: v2 (`memory.max`, `memory.current`, `memory.stat`) or v1
/// (`memory.limit_in_bytes`, ...). None without a limit.
fn cgroup_memory() -> Option<CgroupMemory> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    if let Some(max) = read("/sys/fs/cgroup/memory.max") {
        return parse_cgroup_memory(
            &max,
            &read("/sys/fs/cgroup/memory.current")?,
            &read("/sys/fs/cgroup/memory.stat")?,
        );
    }
    parse_cgroup_memory(
        &read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?,
        &read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?,
        &read("/sys/fs/cgroup/memory/memory.stat")?,
    )
}

/// `max` (`max` or bytes; v1 writes a huge number for none), `current` (bytes), `stat` (lines
/// `key value`: `inactive_file`, or v1's `total_inactive_file`).
pub fn parse_cgroup_memory(max: &str, current: &str, stat: &str) -> Option<CgroupMemory> {
    let limit: u64 = max.trim().parse().ok().filter(|&l| l < 1 << 60)?;
    let usage: u64 = current.trim().parse().ok()?;
    let field = |name: &str| {
        stat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    let inactive_file = field("inactive_file").or_else(|| field("total_inactive_file")).unwrap_or(0);
    Some(CgroupMemory { limit, usage, inactive_file })
}

/// (available, total) from `/proc/meminfo` text and the cgroup limit: the smaller of the machine's
/// and the cgroup's, the cgroup's available being its limit less its working set.
pub fn bounded_memory(meminfo: &str, cgroup: Option<CgroupMemory>) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let (available, total) = (field("MemAvailable:")?, field("MemTotal:")?);
    Some(match cgroup {
        Some(c) => {
            let working_set = c.usage.saturating_sub(c.inactive_file);
            (available.min(c.limit.saturating_sub(working_set)), total.min(c.limit))
        }
        None => (available, total),
    })
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
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    // SAFETY: the lengths were checked above: `a` holds m*k values read with row stride k and
    // column stride 1; `b` (as the k x n right operand b^T) holds n*k values, element (kk, nn)
    // at nn*k + kk, so its row stride is 1 and column stride k; `out` holds m*n values written
    // with row stride n. The three slices do not overlap (`out` is a unique borrow), and
    // read_dst = false so `out`'s previous contents are not read.
    #[allow(unsafe_code)]
    unsafe {
        ::gemm::gemm(
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

    const MEMINFO: &str = "MemTotal:       65536000 kB\nMemFree:         1000 kB\nMemAvailable:   32768000 kB\n";
    const GIB: u64 = 1 << 30;

    #[test]
    fn machine_memory_without_a_cgroup_limit() {
        assert_eq!(bounded_memory(MEMINFO, None), Some((32768000 * 1024, 65536000 * 1024)));
        assert_eq!(parse_cgroup_memory("max\n", "123\n", "inactive_file 0\n"), None);
        // cgroup v1 without a limit writes a page-rounded i64::MAX.
        assert_eq!(parse_cgroup_memory("9223372036854771712\n", "123\n", ""), None);
        assert_eq!(bounded_memory("MemTotal: 1 kB\n", None), None, "no MemAvailable");
    }

    #[test]
    fn a_container_limit_bounds_both_and_page_cache_does_not_count() {
        // 16 GiB limit, 6 GiB charged of which 2 GiB is reclaimable page cache: 12 GiB available.
        let c = parse_cgroup_memory(
            &format!("{}\n", 16 * GIB),
            &format!("{}\n", 6 * GIB),
            &format!("anon 1\nfile 2\ninactive_file {}\nactive_file 5\n", 2 * GIB),
        )
        .unwrap();
        assert_eq!(c, CgroupMemory { limit: 16 * GIB, usage: 6 * GIB, inactive_file: 2 * GIB });
        assert_eq!(bounded_memory(MEMINFO, Some(c)), Some((12 * GIB, 16 * GIB)));
        // v1 names it total_inactive_file; the machine's own available memory still bounds it.
        let v1 = parse_cgroup_memory(&format!("{}", 64 * GIB), "0", &format!("total_inactive_file {}\n", GIB)).unwrap();
        assert_eq!(v1.inactive_file, GIB);
        assert_eq!(bounded_memory(MEMINFO, Some(v1)), Some((32768000 * 1024, 65536000 * 1024)));
    }
}
