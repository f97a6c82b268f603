//! For tests: stand-ins for the CUDA driver (`kernels/cuda/emu/fake_driver.cpp` over the host
//! emulator of `kernels/cuda/experts.cu`) and for NCCL (`kernels/cuda/emu/fake_nccl.cpp`, over
//! loopback TCP), so that the CUDA backend, GPU workers and their NCCL groups run on a machine
//! without a GPU. Built from this source tree with g++.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Build `dir/libcuda.so` and `dir/libnccl.so` (sonames `libcuda.so` and `libnccl.so`, the
/// first names cudarc opens). A process finds them through `LD_LIBRARY_PATH=dir`, or by loading
/// them (RTLD_GLOBAL) before cudarc opens the libraries. Returns the driver's path.
pub fn build(dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    gxx(dir, "fake_driver.cpp", "libcuda.so", &["-fno-strict-aliasing", "-DEXPERTMESH_EMU"])?;
    gxx(dir, "fake_nccl.cpp", "libnccl.so", &[])?;
    Ok(dir.join("libcuda.so"))
}

fn gxx(dir: &Path, source: &str, lib: &str, flags: &[&str]) -> Result<(), String> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cuda/emu").join(source);
    let built = Command::new("g++")
        .args(["-std=c++20", "-O1", "-shared", "-fPIC"])
        .args(flags)
        .arg(format!("-Wl,-soname,{lib}"))
        .arg(&src)
        .arg("-o")
        .arg(dir.join(lib))
        .arg("-lpthread")
        .output()
        .map_err(|e| {
            format!("running g++ to build {lib}: {e}; install it with `apt-get install g++` (make deps does)")
        })?;
    if !built.status.success() {
        return Err(format!("g++ could not build {}:\n{}", src.display(), String::from_utf8_lossy(&built.stderr)));
    }
    Ok(())
}
