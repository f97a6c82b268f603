//! CUDA backend (feature `cuda`): a layer's experts resident in device memory in the
//! checkpoint's dtype (bf16, f16, f32, FP8 e4m3 with its block scales), computed by our own
//! kernels (`kernels/cuda/experts.cu`, compiled by NVRTC at start for the device's
//! architecture) in two launches per batch over every expert of the batch (see
//! [`crate::cuda_plan::tile_table`]).
//!
//! cudarc loads the CUDA driver and NVRTC at run time, so this builds on machines without CUDA;
//! [`CudaBackend::new`] answers a typed error naming the missing library instead.
//!
//! Streams: uploads go through pinned staging buffers on a copy stream and are awaited by the
//! compute stream through an event, so a worker uploading its next chunk overlaps the compute
//! of this one; `forward` returns when its kernels have finished.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use expertmesh_core::dtype::DType;

use crate::cuda_plan::{dtype_code, ffn_launch, mat_descriptor, tile_table, Permutation};
use crate::{
    check_activation_dtype, ExpertBackend, HostRows, KernelError, LayerExperts, LayerWeights, Result, Rows,
    StoredMatrix,
};

/// The kernel source, compiled at start by NVRTC.
pub const SOURCE: &str = include_str!("../cuda/experts.cu");
/// Every kernel `SOURCE` defines.
pub const KERNELS: [&str; 6] = ["gateup_mma", "down_mma", "gateup_simt", "down_simt", "gather_rows", "combine_rows"];
/// Architectures CI compiles for (PTX, JIT-compiled by the driver for newer devices).
pub const CI_ARCHES: [&str; 2] = ["compute_80", "compute_90"];

fn drv(what: &str) -> impl Fn(DriverError) -> KernelError + '_ {
    move |e| KernelError::Device(format!("{what}: {e}"))
}

/// Whether NVRTC can be loaded; an error naming how to get it when not.
pub fn nvrtc_available() -> Result<()> {
    // SAFETY: probing for the library only opens and closes it.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::Unavailable {
            device: "cuda".into(),
            reason: "NVRTC (libnvrtc.so.13) cannot be loaded: install the CUDA 13.0 toolkit or \
                     `pip install nvidia-cuda-nvrtc==13.0.*` and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        })
    }
}

/// Compile [`SOURCE`] for `arch` (`compute_80`, `compute_90`, ...) with NVRTC.
pub fn compile(arch: &'static str) -> Result<Ptx> {
    nvrtc_available()?;
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some("experts.cu".into()),
        options: vec!["--std=c++17".into(), "-lineinfo".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        let why = match &e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        KernelError::Device(format!("NVRTC could not compile kernels/cuda/experts.cu for {arch}:\n{why}"))
    })
}

/// The PTX architecture for a device of compute capability (major, minor).
fn arch_for(cc: (i32, i32)) -> Result<&'static str> {
    Ok(match cc {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (8, _) => "compute_80",
        (9, _) => "compute_90",
        (m, _) if m > 9 => "compute_90",
        (m, n) => {
            return Err(KernelError::Unavailable {
                device: "cuda".into(),
                reason: format!("compute capability {m}.{n}: the kernels need 8.0 (A100) or newer"),
            })
        }
    })
}

struct Kernels {
    gateup_mma: CudaFunction,
    down_mma: CudaFunction,
    gateup_simt: CudaFunction,
    down_simt: CudaFunction,
    gather_rows: CudaFunction,
    combine_rows: CudaFunction,
}

/// Pinned host buffers reused across uploads and downloads (allocating pinned memory costs
/// milliseconds).
struct Staging {
    free: Mutex<Vec<PinnedHostSlice<u8>>>,
    write_combined: bool,
}

impl Staging {
    const KEEP: usize = 8;

    fn take(&self, ctx: &Arc<CudaContext>, n: usize) -> Result<PinnedHostSlice<u8>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = free.iter().position(|b| b.len() >= n) {
            return Ok(free.swap_remove(i));
        }
        drop(free);
        let len = n.max(4096).next_power_of_two();
        let flags = if self.write_combined { cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
        // SAFETY: the buffer is written before it is read (uploads fill it from host data,
        // downloads from the device).
        unsafe { ctx.alloc_pinned_with_flags::<u8>(len, flags) }.map_err(drv("allocating pinned staging memory"))
    }

    fn give(&self, b: PinnedHostSlice<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < Self::KEEP {
            free.push(b);
        }
    }
}

struct Inner {
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    k: Kernels,
    ordinal: usize,
    name: String,
    up: Staging,
    down: Staging,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("ordinal", &self.ordinal).field("name", &self.name).finish()
    }
}

/// The CUDA backend of one device.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl CudaBackend {
    /// The backend on device `ordinal`: opens the driver, compiles the kernels for the device.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: probing for the library only opens and closes it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::Unavailable {
                device: format!("cuda:{ordinal}"),
                reason: "the CUDA driver (libcuda.so) cannot be loaded: this machine has no NVIDIA driver".into(),
            });
        }
        let count = CudaContext::device_count().map_err(drv("counting CUDA devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(KernelError::UnknownDevice(format!("cuda:{ordinal} (this machine has {count} CUDA devices)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("opening the CUDA device"))?;
        let cc = ctx.compute_capability().map_err(drv("reading the compute capability"))?;
        let arch = arch_for(cc)?;
        let module = ctx.load_module(compile(arch)?).map_err(drv("loading the compiled kernels"))?;
        let f = |n: &str| module.load_function(n).map_err(drv("finding a kernel"));
        let k = Kernels {
            gateup_mma: f("gateup_mma")?,
            down_mma: f("down_mma")?,
            gateup_simt: f("gateup_simt")?,
            down_simt: f("down_simt")?,
            gather_rows: f("gather_rows")?,
            combine_rows: f("combine_rows")?,
        };
        let total = ctx.total_mem().map_err(drv("reading device memory"))?;
        let name = format!(
            "cuda:{ordinal} ({}, sm_{}{}, {:.0} GiB)",
            ctx.name().unwrap_or_else(|_| "unknown device".into()),
            cc.0,
            cc.1,
            total as f64 / (1u64 << 30) as f64
        );
        let compute = ctx.new_stream().map_err(drv("creating the compute stream"))?;
        let copy = ctx.new_stream().map_err(drv("creating the copy stream"))?;
        let staging = |wc| Staging { free: Mutex::new(Vec::new()), write_combined: wc };
        Ok(Self {
            inner: Arc::new(Inner { ctx, compute, copy, k, ordinal, name, up: staging(true), down: staging(false) }),
        })
    }

    fn rows_of<'a>(&self, r: &'a dyn Rows, what: &str) -> Result<&'a CudaRows> {
        r.as_any().downcast_ref::<CudaRows>().ok_or_else(|| {
            KernelError::Shape(format!("{what} rows belong to another backend; upload them to {}", self.inner.name))
        })
    }

    /// Rows of `x` in the order of `p.gather` (the expert-ordered batch), on the device.
    pub fn permute(&self, x: &CudaRows, p: &Permutation) -> Result<CudaRows> {
        if let Some(&t) = p.gather.iter().find(|&&t| t as usize >= x.rows) {
            return Err(KernelError::Shape(format!("the permutation names token {t}; the batch has {}", x.rows)));
        }
        let s = &self.inner.compute;
        x.await_on(s)?;
        let rows = p.gather.len();
        let row_bytes = x.cols * x.dtype.size();
        let mut out = CudaRows::alloc(s, x.dtype, rows, x.cols)?;
        if rows > 0 {
            let idx = s.clone_htod(&p.gather).map_err(drv("uploading the permutation"))?;
            let (n, rb) = (rows as u32, row_bytes as u32);
            let cfg = LaunchConfig { grid_dim: (n, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let mut b = s.launch_builder(&self.inner.k.gather_rows);
            b.arg(&x.buf).arg(&mut out.buf).arg(&idx).arg(&n).arg(&rb);
            // SAFETY: gather_rows reads rows idx[i] < x.rows (checked above) of `row_bytes`
            // bytes from x and writes `rows` rows of `out`, allocated for exactly that.
            unsafe { b.launch(cfg) }.map_err(drv("launching gather_rows"))?;
        }
        s.synchronize().map_err(drv("permuting rows"))?;
        Ok(out)
    }

    /// `out[t] = sum_j weight[t, j] y[slot[t, j]]` for `tokens` tokens, f32, on the device.
    pub fn combine(&self, y: &CudaRows, p: &Permutation, tokens: usize) -> Result<CudaRows> {
        let k = p.slot.len().checked_div(tokens).unwrap_or(0);
        if tokens * k != p.slot.len() || p.weight.len() != p.slot.len() {
            return Err(KernelError::Shape(format!("{} routing slots are not {tokens} tokens x k", p.slot.len())));
        }
        if let Some(&r) = p.slot.iter().find(|&&r| r != u32::MAX && r as usize >= y.rows) {
            return Err(KernelError::Shape(format!(
                "the permutation names row {r}; the expert outputs have {}",
                y.rows
            )));
        }
        let s = &self.inner.compute;
        y.await_on(s)?;
        let mut out = CudaRows::alloc(s, DType::F32, tokens, y.cols)?;
        if tokens > 0 {
            let slot = s.clone_htod(&p.slot).map_err(drv("uploading the combine slots"))?;
            let weight = s.clone_htod(&p.weight).map_err(drv("uploading the combine weights"))?;
            let (dt, t, kk, h) = (dtype_code(y.dtype), tokens as u32, k as u32, y.cols as u32);
            let cfg = LaunchConfig { grid_dim: (t, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let mut b = s.launch_builder(&self.inner.k.combine_rows);
            b.arg(&y.buf).arg(&dt).arg(&slot).arg(&weight).arg(&t).arg(&kk).arg(&h).arg(&mut out.buf);
            // SAFETY: combine_rows reads rows slot[..] < y.rows (checked) of y and writes
            // `tokens` f32 rows of `h` columns into `out`, allocated for exactly that.
            unsafe { b.launch(cfg) }.map_err(drv("launching combine_rows"))?;
        }
        s.synchronize().map_err(drv("combining rows"))?;
        Ok(out)
    }
}

/// Device memory figures (`expertmesh backend bench`): what moving rows costs on this device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransferRates {
    /// Device-to-device copy of 1 GiB: bytes read plus bytes written per second.
    pub copy_gb_per_s: f64,
    /// Host to device through pinned staging (the worker's upload path).
    pub upload_gb_per_s: f64,
    pub download_gb_per_s: f64,
    /// `tokens x k` bf16 rows of `hidden` gathered into expert order: bytes read + written.
    pub permute_gb_per_s: f64,
    /// The same rows weighted and summed back per token into f32: bytes read + written.
    pub combine_gb_per_s: f64,
    pub tokens: usize,
    pub k: usize,
    pub hidden: usize,
}

fn median_secs(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::new();
    let start = std::time::Instant::now();
    while t.len() < 5 || start.elapsed().as_secs_f64() < 0.3 {
        let s = std::time::Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

impl CudaBackend {
    /// Measure [`TransferRates`] with a batch of `tokens` tokens routed to `k` experts each.
    pub fn transfer_rates(&self, hidden: usize, tokens: usize, k: usize) -> Result<TransferRates> {
        let s = &self.inner.compute;
        let n = 1usize << 30;
        let src = s.alloc_zeros::<u8>(n).map_err(drv("allocating 1 GiB"))?;
        let mut dst = s.alloc_zeros::<u8>(n).map_err(drv("allocating 1 GiB"))?;
        let copy = median_secs(|| {
            s.memcpy_dtod(&src, &mut dst).map_err(drv("copying on the device"))?;
            s.synchronize().map_err(drv("copying on the device"))
        })?;
        drop((src, dst));
        let rows = tokens * k;
        let bytes = rows * hidden * 2;
        let host = crate::HostRows::new(DType::BF16, rows, hidden, bytes::Bytes::from(vec![0u8; bytes]))?;
        let up = median_secs(|| self.upload(host.clone()).map(drop))?;
        let down = median_secs(|| {
            let y = CudaRows::alloc(s, DType::BF16, rows, hidden)?;
            self.download(Box::new(y)).map(drop)
        })?;
        // Token t's choices go to experts (t + j * 37) mod 256: every expert gets rows.
        let experts: Vec<u32> = (0..rows).map(|i| ((i / k + (i % k) * 37) % 256) as u32).collect();
        let weights = vec![1.0 / k as f32; rows];
        let p = Permutation::build(&experts, &weights, k, |_| true)?;
        let tok = CudaRows::alloc(s, DType::BF16, tokens, hidden)?;
        let permute = median_secs(|| self.permute(&tok, &p).map(drop))?;
        let y = self.permute(&tok, &p)?;
        let combine = median_secs(|| self.combine(&y, &p, tokens).map(drop))?;
        let gb = |b: usize, t: f64| b as f64 / t / 1e9;
        Ok(TransferRates {
            copy_gb_per_s: gb(2 * n, copy),
            upload_gb_per_s: gb(bytes, up),
            download_gb_per_s: gb(bytes, down),
            permute_gb_per_s: gb(2 * bytes, permute),
            combine_gb_per_s: gb(bytes + tokens * hidden * 4, combine),
            tokens,
            k,
            hidden,
        })
    }
}

impl CudaBackend {
    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    /// Bind this backend's context to the calling thread (before raw driver or NCCL calls).
    pub fn bind(&self) -> Result<()> {
        self.inner.ctx.bind_to_thread().map_err(drv("binding the CUDA context"))
    }

    /// A new stream on this device (NCCL gets its own, so a round waiting for its peers never
    /// holds up the compute stream).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.inner.ctx.new_stream().map_err(drv("creating a stream"))
    }

    /// `rows x cols` of `dtype` at byte `offset` of a device buffer, copied into rows of this
    /// backend.
    pub fn rows_from(
        &self,
        buf: &CudaSlice<u8>,
        offset: usize,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<Box<dyn Rows>> {
        check_activation_dtype(dtype)?;
        let s = &self.inner.compute;
        let mut r = CudaRows::alloc(s, dtype, rows, cols)?;
        let n = r.len();
        if offset + n > buf.len() {
            return Err(KernelError::Shape(format!("bytes {offset}..{} of a {}-byte buffer", offset + n, buf.len())));
        }
        if n > 0 {
            s.memcpy_dtod(&buf.slice(offset..offset + n), &mut r.buf.slice_mut(..n))
                .map_err(drv("copying rows on the device"))?;
        }
        Ok(Box::new(r))
    }

    /// One device buffer holding `parts` back to back (rows of this backend, or host bytes).
    pub fn join_parts(&self, parts: Vec<crate::fabric::Part>) -> Result<CudaSlice<u8>> {
        use crate::fabric::Part;
        let s = &self.inner.compute;
        let mut total = 0;
        for p in &parts {
            total += match p {
                Part::Host(b) => b.len(),
                Part::Rows(r) => self.rows_of(&**r, "joined")?.len(),
            };
        }
        let mut out = s.alloc_zeros::<u8>(total.max(1)).map_err(drv("allocating a joined buffer"))?;
        let mut off = 0;
        for p in &parts {
            match p {
                Part::Host(b) if !b.is_empty() => {
                    s.memcpy_htod(&b[..], &mut out.slice_mut(off..off + b.len()))
                        .map_err(drv("copying bytes to the device"))?;
                    off += b.len();
                }
                Part::Host(_) => {}
                Part::Rows(r) => {
                    let r = self.rows_of(&**r, "joined")?;
                    let n = r.len();
                    if n > 0 {
                        r.await_on(s)?;
                        s.memcpy_dtod(&r.buf.slice(..n), &mut out.slice_mut(off..off + n))
                            .map_err(drv("copying rows on the device"))?;
                    }
                    off += n;
                }
            }
        }
        s.synchronize().map_err(drv("joining buffers"))?;
        Ok(out)
    }
}

/// Activations in device memory.
#[derive(Debug)]
pub struct CudaRows {
    dtype: DType,
    rows: usize,
    cols: usize,
    /// At least one byte (a device allocation is never empty).
    buf: CudaSlice<u8>,
    /// Recorded on the copy stream after an upload; the compute stream waits for it.
    ready: Option<CudaEvent>,
}

impl CudaRows {
    fn alloc(s: &Arc<CudaStream>, dtype: DType, rows: usize, cols: usize) -> Result<Self> {
        let n = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| KernelError::Shape(format!("{rows} x {cols} rows of {} overflow", dtype.name())))?;
        let buf = s.alloc_zeros::<u8>(n.max(1)).map_err(drv("allocating device rows"))?;
        Ok(Self { dtype, rows, cols, buf, ready: None })
    }

    fn await_on(&self, s: &CudaStream) -> Result<()> {
        if let Some(ev) = &self.ready {
            s.wait(ev).map_err(drv("waiting for an upload"))?;
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }
}

impl Rows for CudaRows {
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

/// One weight matrix resident on the device.
#[derive(Debug)]
struct DevMatrix {
    dtype: DType,
    data: CudaSlice<u8>,
    scales: Option<(CudaSlice<f32>, (usize, usize))>,
}

impl DevMatrix {
    fn upload(s: &Arc<CudaStream>, m: &StoredMatrix<'_>) -> Result<Self> {
        let data = s.clone_htod(&m.data[..]).map_err(drv("uploading weights"))?;
        let scales = match &m.scales {
            Some(b) => Some((s.clone_htod(&b.values).map_err(drv("uploading block scales"))?, b.block)),
            None => None,
        };
        Ok(Self { dtype: m.dtype, data, scales })
    }

    fn bytes(&self) -> u64 {
        (self.data.len() + self.scales.as_ref().map_or(0, |(s, _)| s.len() * 4)) as u64
    }

    /// The kernels' `Mat`: data and scale pointers, then dtype, block rows, block columns, 0.
    fn descriptor(&self, s: &CudaStream) -> [u64; 4] {
        let (d, _g) = self.data.device_ptr(s);
        let scales = self.scales.as_ref().map(|(sc, b)| (sc.device_ptr(s).0, *b));
        mat_descriptor(d, scales, self.dtype)
    }
}

#[derive(Debug)]
struct DevExpert {
    w1: DevMatrix,
    w3: DevMatrix,
    w2: DevMatrix,
}

impl DevExpert {
    fn bytes(&self) -> u64 {
        self.w1.bytes() + self.w3.bytes() + self.w2.bytes()
    }

    /// Tensor cores apply: every weight is bf16 or FP8.
    fn tensor_cores(&self) -> bool {
        [&self.w1, &self.w3, &self.w2].iter().all(|m| matches!(m.dtype, DType::BF16 | DType::F8E4M3))
    }
}

/// The experts of one layer, resident on a CUDA device.
#[derive(Debug)]
pub struct CudaLayer {
    layer: usize,
    hidden: usize,
    ffn: usize,
    limit: Option<f32>,
    experts: BTreeMap<u32, Arc<DevExpert>>,
    /// Expert id to its index in `table`.
    slots: BTreeMap<u32, u32>,
    /// The kernels' `Expert` descriptors, one per slot.
    table: CudaSlice<u64>,
    tensor_cores: bool,
    be: Arc<Inner>,
}

impl CudaLayer {
    fn new(
        be: &Arc<Inner>,
        shape: (usize, usize, usize, Option<f32>),
        experts: BTreeMap<u32, Arc<DevExpert>>,
    ) -> Result<Self> {
        let (layer, hidden, ffn, limit) = shape;
        let s = &be.compute;
        let mut desc = Vec::with_capacity(experts.len() * 12);
        let mut slots = BTreeMap::new();
        for (i, (&id, e)) in experts.iter().enumerate() {
            slots.insert(id, i as u32);
            for m in [&e.w1, &e.w3, &e.w2] {
                desc.extend_from_slice(&m.descriptor(s));
            }
        }
        if desc.is_empty() {
            desc.push(0);
        }
        let table = s.clone_htod(&desc).map_err(drv("uploading the expert table"))?;
        let tensor_cores = experts.values().all(|e| e.tensor_cores());
        Ok(Self { layer, hidden, ffn, limit, experts, slots, table, tensor_cores, be: be.clone() })
    }
}

impl crate::ResidentLayer<Arc<DevExpert>> for CudaLayer {
    fn shape(&self) -> (usize, usize, usize) {
        (self.layer, self.hidden, self.ffn)
    }
    fn expert(&self, id: u32) -> Option<&Arc<DevExpert>> {
        self.experts.get(&id)
    }
}

impl LayerExperts for CudaLayer {
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

    fn forward(&self, x: &dyn Rows, groups: &crate::Groups, out: &mut dyn Rows) -> Result<()> {
        let name = &self.be.name;
        let x = x.as_any().downcast_ref::<CudaRows>().ok_or_else(|| {
            KernelError::Shape(format!("input rows belong to another backend; upload them to {name}"))
        })?;
        let out = out.as_any_mut().downcast_mut::<CudaRows>().ok_or_else(|| {
            KernelError::Shape(format!("output rows belong to another backend; allocate them on {name}"))
        })?;
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
        if ntiles > 65_535 {
            return Err(KernelError::Shape(format!(
                "{} rows in one call need {ntiles} tiles; a launch takes at most 65535 (split the batch)",
                x.rows
            )));
        }
        let s = &self.be.compute;
        x.await_on(s)?;
        out.await_on(s)?;
        out.ready = None;
        let tiles_d = s.clone_htod(&tiles).map_err(drv("uploading the tile table"))?;
        let (hi, fi) = (h as i32, f as i32);
        let limit = self.limit.unwrap_or(0.0);
        let od = dtype_code(out.dtype);
        let plan = ffn_launch(x.dtype, self.tensor_cores, h, f, ntiles);
        let k = &self.be.k;
        if plan.tensor_cores {
            let mut hbuf = s.alloc_zeros::<u16>(x.rows * f).map_err(drv("allocating the intermediate rows"))?;
            let mut b = s.launch_builder(&k.gateup_mma);
            b.arg(&tiles_d).arg(&self.table).arg(&x.buf).arg(&hi).arg(&fi).arg(&limit).arg(&mut hbuf);
            let cfg = LaunchConfig { grid_dim: plan.gateup_grid, block_dim: (plan.block, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: every tile names a slot of `table` (built with it) and rows within
            // x.rows (groups checked against x); gateup_mma reads x [rows, h] and writes
            // hbuf [rows, f], allocated for exactly that.
            unsafe { b.launch(cfg) }.map_err(drv("launching gateup_mma"))?;
            let mut b = s.launch_builder(&k.down_mma);
            b.arg(&tiles_d).arg(&self.table).arg(&hbuf).arg(&hi).arg(&fi).arg(&mut out.buf).arg(&od);
            let cfg = LaunchConfig { grid_dim: plan.down_grid, block_dim: (plan.block, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: as above; down_mma writes out [rows, h] in out's dtype (checked shape).
            unsafe { b.launch(cfg) }.map_err(drv("launching down_mma"))?;
        } else {
            let xd = dtype_code(x.dtype);
            let mut hbuf = s.alloc_zeros::<f32>(x.rows * f).map_err(drv("allocating the intermediate rows"))?;
            let mut b = s.launch_builder(&k.gateup_simt);
            b.arg(&tiles_d).arg(&self.table).arg(&x.buf).arg(&xd).arg(&hi).arg(&fi).arg(&limit).arg(&mut hbuf);
            let cfg = LaunchConfig { grid_dim: plan.gateup_grid, block_dim: (plan.block, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: as for the tensor-core path, with f32 intermediate rows.
            unsafe { b.launch(cfg) }.map_err(drv("launching gateup_simt"))?;
            let mut b = s.launch_builder(&k.down_simt);
            b.arg(&tiles_d).arg(&self.table).arg(&hbuf).arg(&hi).arg(&fi).arg(&mut out.buf).arg(&od);
            let cfg = LaunchConfig { grid_dim: plan.down_grid, block_dim: (plan.block, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.map_err(drv("launching down_simt"))?;
        }
        s.synchronize().map_err(drv(&format!("layer {} expert FFN on {name}", self.layer)))
    }

    fn subset(&self, keep: &[u32]) -> Result<Arc<dyn LayerExperts>> {
        let mut experts = BTreeMap::new();
        for &e in keep {
            let x = self.experts.get(&e).ok_or(KernelError::NotResident { layer: self.layer, expert: e })?;
            experts.insert(e, x.clone());
        }
        Ok(Arc::new(CudaLayer::new(&self.be, (self.layer, self.hidden, self.ffn, self.limit), experts)?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl ExpertBackend for CudaBackend {
    fn name(&self) -> String {
        self.inner.name.clone()
    }

    fn load_layer(
        &self,
        w: LayerWeights<'_>,
        prev: Option<(&Arc<dyn LayerExperts>, &[u32])>,
    ) -> Result<Arc<dyn LayerExperts>> {
        w.check()?;
        let mut experts = crate::kept_experts::<CudaLayer, Arc<DevExpert>>(prev, &w)?;
        let s = &self.inner.copy;
        for e in &w.experts {
            let d = DevExpert {
                w1: DevMatrix::upload(s, &e.w1)?,
                w3: DevMatrix::upload(s, &e.w3)?,
                w2: DevMatrix::upload(s, &e.w2)?,
            };
            experts.insert(e.expert, Arc::new(d));
        }
        s.synchronize().map_err(drv("uploading a layer's weights"))?;
        Ok(Arc::new(CudaLayer::new(&self.inner, (w.layer, w.hidden, w.ffn, w.swiglu_limit), experts)?))
    }

    fn resident_bytes(&self, hidden: usize, ffn: usize, dtype: DType, block: Option<(usize, usize)>) -> u64 {
        crate::cuda_plan::device_expert_bytes(hidden, ffn, dtype, block)
    }

    fn upload(&self, rows: HostRows) -> Result<Box<dyn Rows>> {
        let rows = HostRows::new(rows.dtype, rows.rows, rows.cols, rows.data)?;
        let be = &self.inner;
        let n = rows.data.len();
        let mut staging = be.up.take(&be.ctx, n)?;
        staging.as_mut_slice().map_err(drv("writing pinned staging memory"))?[..n].copy_from_slice(&rows.data);
        let s = &be.copy;
        // SAFETY: the buffer is fully written by the copy below before anything reads it.
        let mut buf = unsafe { s.alloc::<u8>(n.max(1)) }.map_err(drv("allocating device rows"))?;
        if n > 0 {
            // A slice of pinned memory: the driver copies it asynchronously by DMA.
            let src = &staging.as_slice().map_err(drv("reading pinned staging memory"))?[..n];
            s.memcpy_htod(src, &mut buf).map_err(drv("copying rows to the device"))?;
        }
        let ready = s.record_event(None).map_err(drv("recording an upload"))?;
        // The staging buffer is reused only once the copy has read it.
        ready.synchronize().map_err(drv("uploading rows"))?;
        be.up.give(staging);
        Ok(Box::new(CudaRows { dtype: rows.dtype, rows: rows.rows, cols: rows.cols, buf, ready: Some(ready) }))
    }

    fn alloc(&self, dtype: DType, rows: usize, cols: usize) -> Result<Box<dyn Rows>> {
        check_activation_dtype(dtype)?;
        Ok(Box::new(CudaRows::alloc(&self.inner.compute, dtype, rows, cols)?))
    }

    fn download(&self, rows: Box<dyn Rows>) -> Result<HostRows> {
        let r = self.rows_of(&*rows, "downloaded")?;
        let be = &self.inner;
        let n = r.len();
        let s = &be.copy;
        r.await_on(s)?;
        let mut staging = be.down.take(&be.ctx, n)?;
        if n > 0 {
            let dst = &mut staging.as_mut_slice().map_err(drv("writing pinned staging memory"))?[..n];
            s.memcpy_dtoh(&r.buf.slice(..n), dst).map_err(drv("copying rows from the device"))?;
        }
        s.synchronize().map_err(drv("downloading rows"))?;
        let data = staging.as_slice().map_err(drv("reading pinned staging memory"))?[..n].to_vec();
        be.down.give(staging);
        HostRows::new(r.dtype, r.rows, r.cols, bytes::Bytes::from(data))
    }

    fn matmul_nt(&self, a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) -> Result<()> {
        // The router's product is small and its inputs are on the host: computed there.
        crate::cpu::matmul_nt(a, b, m, n, k, out)
    }

    fn memory(&self) -> Result<(u64, u64)> {
        self.inner.ctx.bind_to_thread().map_err(drv("binding the CUDA context"))?;
        let (free, total) = self.inner.ctx.mem_get_info().map_err(drv("reading device memory"))?;
        Ok((free as u64, total as u64))
    }

    fn device(&self) -> (&'static str, u32) {
        ("cuda", self.inner.ordinal as u32)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
