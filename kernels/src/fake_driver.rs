//! For tests: a stand-in for the CUDA driver (`kernels/cuda/emu/fake_driver.cpp` over the host
//! emulator of `kernels/cuda/experts.cu`), so that the CUDA backend and GPU workers run on a
//! machine without a GPU. Built from this source tree with g++.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Build `dir/libcuda.so` (soname `libcuda.so`, the first name cudarc opens). A process finds
/// it through `LD_LIBRARY_PATH=dir`, or by loading it (RTLD_GLOBAL) before cudarc opens the
/// driver.
pub fn build(dir: &Path) -> Result<PathBuf, String> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda/emu/fake_driver.cpp");
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let out = dir.join("libcuda.so");
    let built = Command::new("g++")
        .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-DEXPERTMESH_EMU"])
        .arg("-Wl,-soname,libcuda.so")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .arg("-lpthread")
        .output()
        .map_err(|e| {
            format!("running g++ to build the fake CUDA driver: {e}; install it with `apt-get install g++` (make deps does)")
        })?;
    if !built.status.success() {
        return Err(format!("g++ could not build {}:\n{}", src.display(), String::from_utf8_lossy(&built.stderr)));
    }
    Ok(out)
}
