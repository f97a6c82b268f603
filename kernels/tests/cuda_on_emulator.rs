//! The CUDA backend itself (kernels/src/cuda.rs through cudarc), run without a GPU: a stand-in
//! for the CUDA driver (`kernels/cuda/emu/fake_driver.cpp`, built here with g++) executes the
//! NVRTC-compiled module's kernels on the host emulator of `kernels/cuda/experts.cu`. The
//! backend conformance suite runs on it from the same test bodies as on the CPU, with every
//! output poisoned first, and permute/combine are checked against the permutation they invert.
//! Device memory is host memory with guard bands after every allocation: a kernel or copy that
//! writes past a buffer fails the call. Not covered here: real concurrency between streams,
//! tensor-core hardware, NCCL and speed (`scripts/gpu-check.sh` on a GPU machine).
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use bytes::Bytes;
use expertmesh_core::dtype::DType;
use expertmesh_core::rng::SplitMix64;
use expertmesh_kernels::conformance::Suite;
use expertmesh_kernels::cuda::{nvrtc_available, CudaBackend, CudaRows};
use expertmesh_kernels::cuda_plan::Permutation;
use expertmesh_kernels::{ExpertBackend, HostRows};

/// The fake driver, loaded under the name cudarc opens first (`libcuda.so`), so that its
/// `dlopen` finds this library already loaded instead of searching for the real one.
fn fake_driver() {
    static LIB: OnceLock<libloading::os::unix::Library> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Err(e) = nvrtc_available() {
            panic!("{e}\n`scripts/install-nvrtc.sh` installs NVRTC 13.0 from PyPI and prints the directory to put on LD_LIBRARY_PATH (`make test` does both)");
        }
        let dir = std::env::temp_dir().join(format!("expertmesh-fake-cuda-{}", std::process::id()));
        let out = expertmesh_kernels::fake_driver::build(&dir).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: our own library (built just now); RTLD_GLOBAL makes it the `libcuda.so` that
        // later dlopen calls by that name resolve to.
        let lib = unsafe {
            libloading::os::unix::Library::open(Some(&out), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL)
        }
        .expect("loading the fake CUDA driver");
        let _ = std::fs::remove_dir_all(&dir);
        lib
    });
}

fn backend() -> CudaBackend {
    fake_driver();
    let be = CudaBackend::new(0).unwrap_or_else(|e| panic!("the CUDA backend on the fake driver: {e}"));
    assert!(be.name().contains("ExpertMesh CUDA emulator"), "{}", be.name());
    be
}

#[test]
fn the_cuda_backend_passes_the_conformance_suite_on_the_emulated_driver() {
    let be = backend();
    let failures = Suite::new().run(&be);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn permute_and_combine_on_the_device_invert_a_permutation() {
    let be = backend();
    let mut rng = SplitMix64::new(7);
    // hidden 64 (bf16 rows of 128 bytes: the 16-byte copy path) and 33 (66 bytes: bytewise).
    for (cols, dtype) in [(64, DType::BF16), (33, DType::BF16), (33, DType::F32), (64, DType::F32)] {
        let (tokens, k, experts) = (37usize, 4usize, 16u64);
        let here = |e: u32| !e.is_multiple_of(3);
        let routed: Vec<u32> = (0..tokens * k).map(|_| rng.below(experts) as u32).collect();
        let weights: Vec<f32> = (0..tokens * k).map(|_| rng.uniform(1.0) as f32).collect();
        let p = Permutation::build(&routed, &weights, k, here).unwrap();
        let x: Vec<f32> = (0..tokens * cols).map(|_| half::bf16::from_f32(rng.normal() as f32).to_f32()).collect();
        let host = match dtype {
            DType::BF16 => {
                let b: Vec<u8> = x.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
                HostRows::new(DType::BF16, tokens, cols, Bytes::from(b)).unwrap()
            }
            _ => HostRows::from_f32(tokens, cols, &x).unwrap(),
        };
        let row_bytes = cols * dtype.size();
        let xr = be.upload(host.clone()).unwrap();
        let xr = xr.as_any().downcast_ref::<CudaRows>().unwrap();
        let g = be.permute(xr, &p).unwrap();
        let y = be.combine(&g, &p, tokens).unwrap();
        // The gathered rows are the tokens' rows, byte for byte.
        let gathered = be.download(Box::new(g)).unwrap();
        for (i, &t) in p.gather.iter().enumerate() {
            let t = t as usize;
            assert_eq!(
                &gathered.data[i * row_bytes..(i + 1) * row_bytes],
                &host.data[t * row_bytes..(t + 1) * row_bytes],
                "{dtype:?} x {cols}: row {i}"
            );
        }
        // Each token gets its row times the summed weights of its choices held here.
        let y = be.download(Box::new(y)).unwrap();
        let got: Vec<f32> = y.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        for t in 0..tokens {
            let w: f64 = (0..k).filter(|&j| here(routed[t * k + j])).map(|j| weights[t * k + j] as f64).sum();
            for c in 0..cols {
                let want = w * x[t * cols + c] as f64;
                let got = got[t * cols + c] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{dtype:?} x {cols}: token {t} col {c}: {got} vs {want}"
                );
            }
        }
    }
}
