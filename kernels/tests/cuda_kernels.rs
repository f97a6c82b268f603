//! Every CUDA kernel compiles with NVRTC 13.0 for the architectures the GPU machines have
//! (sm_80 and sm_90), as real targets (so ptxas checks registers and instructions too) and as
//! the PTX the backend loads at run time. Needs NVRTC only, no GPU: `make test` installs it
//! from PyPI (`scripts/install-nvrtc.sh`) and puts it on LD_LIBRARY_PATH.
#![cfg(feature = "cuda")]

use expertmesh_kernels::cuda::{compile, nvrtc_available, CI_ARCHES, KERNELS};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if let Err(e) = nvrtc_available() {
        panic!("{e}\n`scripts/install-nvrtc.sh` installs NVRTC 13.0 from PyPI and prints the directory to put on LD_LIBRARY_PATH (`make test` does both)");
    }
    for arch in CI_ARCHES.iter().chain(&["sm_80", "sm_90"]) {
        let ptx = compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for k in KERNELS {
            assert!(text.contains(&format!(".entry {k}(")), "{arch}: kernel {k} missing from the PTX");
        }
        assert!(text.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"), "{arch}: no tensor-core MMA");
    }
}
