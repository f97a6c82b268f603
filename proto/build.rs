use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "expertmesh/v1/common.proto",
        "expertmesh/v1/coordinator.proto",
        "expertmesh/v1/expert.proto",
        "expertmesh/v1/moe.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .bytes(".")
        .file_descriptor_set_path(out.join("expertmesh_descriptor.bin"))
        .compile_protos(&protos, &["."])
        .map_err(|e| format!("compiling protos failed: {e}\nprotoc is needed: apt-get install -y protobuf-compiler"))?;
    Ok(())
}
