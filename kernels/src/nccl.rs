//! NCCL link of a group of GPU workers (feature `nccl`): the [`Fabric`] the collective
//! transport's rounds run over. One communicator per group and placement epoch, on a stream of
//! its own; each exchange is one `ncclGroupStart` / `ncclSend` + `ncclRecv` per peer /
//! `ncclGroupEnd`, so NCCL schedules the whole all-to-allv at once.
//!
//! Bootstrap: rank 0 makes the group's unique id ([`unique_id`], which starts NCCL's bootstrap
//! root in rank 0's process), the coordinator hands it to every member with the committed
//! placement, and each rank calls [`NcclFabric::join`] (blocking until all have joined).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};
use expertmesh_core::dtype::DType;

use crate::cuda::CudaBackend;
use crate::fabric::{Fabric, Part};
use crate::{KernelError, Result, Rows};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn nccl_err(what: &str) -> impl Fn(result::NcclError) -> KernelError + '_ {
    move |e| KernelError::Device(format!("{what}: NCCL error {:?}", e.0))
}

/// Whether NCCL can be loaded; an error naming how to get it when not.
pub fn nccl_available() -> Result<()> {
    // SAFETY: probing for the library only opens and closes it.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::Unavailable {
            device: "nccl".into(),
            reason: "libnccl.so.2 cannot be loaded: install NCCL 2.28 (Debian/Ubuntu `libnccl2`) or put its directory on LD_LIBRARY_PATH".into(),
        })
    }
}

/// A new unique id for a group; the calling process serves NCCL's bootstrap root for it, so
/// only rank 0 calls this.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    nccl_available()?;
    let id = result::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
    Ok(id.internal.map(|c| c as u8))
}

struct RawComm {
    comm: sys::ncclComm_t,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; the fabric's owner (one engine thread) makes every call except ncclCommAbort,
// which NCCL documents as safe to call from another thread to unblock a hung operation.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

impl RawComm {
    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the communicator is valid until dropped, and abort runs at most once.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::SeqCst) {
            // SAFETY: nothing else uses the communicator once its last owner drops it.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}

/// One rank's side of a group's NCCL communicator.
pub struct NcclFabric {
    comm: Arc<RawComm>,
    rank: usize,
    size: usize,
    backend: CudaBackend,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for NcclFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclFabric").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

impl NcclFabric {
    /// Join the group of `size` ranks as `rank` (ncclCommInitRank: returns once every rank
    /// has joined with the same id).
    pub fn join(backend: &CudaBackend, id: &[u8], rank: usize, size: usize) -> Result<Self> {
        nccl_available()?;
        let internal: [std::ffi::c_char; ID_BYTES] = id
            .try_into()
            .map(|a: [u8; ID_BYTES]| a.map(|b| b as std::ffi::c_char))
            .map_err(|_| KernelError::Shape(format!("an NCCL unique id has {ID_BYTES} bytes; got {}", id.len())))?;
        if rank >= size {
            return Err(KernelError::Shape(format!("rank {rank} of a group of {size}")));
        }
        backend.bind()?;
        let stream = backend.new_stream()?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: comm is written by ncclCommInitRank before it is read; the id is 128 bytes.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), size as i32, sys::ncclUniqueId { internal }, rank as i32)
                .map_err(nccl_err("ncclCommInitRank"))?;
            comm.assume_init()
        };
        Ok(Self {
            comm: Arc::new(RawComm { comm, aborted: AtomicBool::new(false) }),
            rank,
            size,
            backend: backend.clone(),
            stream,
        })
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: receive buffers are written by NCCL before anything reads them.
        unsafe { self.stream.alloc::<u8>(n.max(1)) }
            .map_err(|e| KernelError::Device(format!("allocating a receive buffer: {e}")))
    }
}

impl Fabric for NcclFabric {
    type Buf = CudaSlice<u8>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        let mut b = self.alloc(bytes.len())?;
        if !bytes.is_empty() {
            self.stream
                .memcpy_htod(bytes, &mut b)
                .map_err(|e| KernelError::Device(format!("copying to the device: {e}")))?;
        }
        Ok(b)
    }

    fn download(&self, buf: &CudaSlice<u8>, start: usize, len: usize) -> Result<Vec<u8>> {
        if start + len > buf.len() {
            return Err(KernelError::Shape(format!("bytes {start}..{} of a {}-byte buffer", start + len, buf.len())));
        }
        let mut out = vec![0u8; len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&buf.slice(start..start + len), &mut out[..])
                .map_err(|e| KernelError::Device(format!("copying from the device: {e}")))?;
            self.stream.synchronize().map_err(|e| KernelError::Device(format!("copying from the device: {e}")))?;
        }
        Ok(out)
    }

    fn exchange(
        &mut self,
        sends: &[CudaSlice<u8>],
        send_bytes: &[usize],
        recv_bytes: &[usize],
    ) -> Result<Vec<CudaSlice<u8>>> {
        let n = self.size;
        if sends.len() != n || send_bytes.len() != n || recv_bytes.len() != n {
            return Err(KernelError::Shape(format!("an exchange of a {n}-rank group needs {n} sends and sizes")));
        }
        if let Some(p) = (0..n).find(|&p| send_bytes[p] > sends[p].len()) {
            return Err(KernelError::Shape(format!(
                "{} bytes to send to rank {p} from a shorter buffer",
                send_bytes[p]
            )));
        }
        let mut recvs = recv_bytes.iter().map(|&b| self.alloc(b)).collect::<Result<Vec<_>>>()?;
        let s = &self.stream;
        let cs = s.cu_stream() as sys::cudaStream_t;
        let comm = self.comm.comm;
        let mut guards = Vec::new();
        result::group_start().map_err(nccl_err("ncclGroupStart"))?;
        let mut posted = Ok(());
        for p in 0..n {
            if send_bytes[p] > 0 {
                let (ptr, g) = sends[p].device_ptr(s);
                guards.push(g);
                // SAFETY: ptr addresses send_bytes[p] <= len bytes of a live device buffer,
                // kept alive (and its use recorded) until the group completes below.
                posted = posted.and(
                    unsafe {
                        result::send(ptr as *const _, send_bytes[p], sys::ncclDataType_t::ncclUint8, p as i32, comm, cs)
                    }
                    .map(drop),
                );
            }
        }
        for (p, r) in recvs.iter_mut().enumerate() {
            if recv_bytes[p] > 0 {
                let (ptr, g) = r.device_ptr_mut(s);
                guards.push(g);
                // SAFETY: ptr addresses recv_bytes[p] bytes (the buffer's length or more).
                posted = posted.and(
                    unsafe {
                        result::recv(ptr as *mut _, recv_bytes[p], sys::ncclDataType_t::ncclUint8, p as i32, comm, cs)
                    }
                    .map(drop),
                );
            }
        }
        let ended = result::group_end();
        posted.map_err(nccl_err("posting ncclSend/ncclRecv"))?;
        ended.map_err(nccl_err("ncclGroupEnd"))?;
        s.synchronize().map_err(|e| KernelError::Device(format!("waiting for the exchange: {e}")))?;
        drop(guards);
        if self.comm.aborted.load(Ordering::SeqCst) {
            return Err(KernelError::Device("the group's NCCL communicator was aborted".into()));
        }
        Ok(recvs)
    }

    fn rows(
        &self,
        buf: &CudaSlice<u8>,
        offset: usize,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<Box<dyn Rows>> {
        self.backend.rows_from(buf, offset, dtype, rows, cols)
    }

    fn join(&self, parts: Vec<Part>) -> Result<CudaSlice<u8>> {
        self.backend.join_parts(parts)
    }

    fn aborter(&self) -> Arc<dyn Fn() + Send + Sync> {
        let c = self.comm.clone();
        Arc::new(move || c.abort())
    }
}
