//! Print the PTX of the CUDA kernels for one architecture (default compute_90):
//! `cargo run -p expertmesh-kernels --features cuda --example cuda_ptx -- sm_90`.
fn main() {
    let arch: &'static str = std::env::args().nth(1).map(|a| &*a.leak()).unwrap_or("compute_90");
    match expertmesh_kernels::cuda::compile(arch) {
        Ok(p) => print!("{}", p.to_src()),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
