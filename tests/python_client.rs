//! The Python client (clients/python) against a live cluster: its example forwards a layer and
//! writes the same answer `expertmesh forward --entry` writes, which matches the float64
//! reference. Dependencies come from PyPI (scripts/install-pyclient.sh, pinned).

mod common;

use std::process::Command;

use common::cluster::{Cluster, BIN};
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_python_client_answers_as_the_cli_does() {
    let deps =
        Command::new(root().join("scripts/install-pyclient.sh")).output().expect("running scripts/install-pyclient.sh");
    assert!(
        deps.status.success(),
        "scripts/install-pyclient.sh failed (it needs python3 with pip, from apt, and PyPI):\n{}",
        String::from_utf8_lossy(&deps.stderr)
    );
    let site = String::from_utf8_lossy(&deps.stdout).trim().to_string();
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 61);
    let cluster = Cluster::start(dir.path(), 2, &[]);
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.safetensors");
    let o = Command::new(BIN)
        .args(["gen-input", "--tokens", "17", "--seed", "5", "--model"])
        .arg(dir.path())
        .arg("--out")
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let layer = spec.moe_layers()[1].to_string();
    let entries = format!("{},{}", cluster.workers[0].addr, cluster.workers[1].addr);
    let cli_out = work.path().join("cli.safetensors");
    let o = Command::new(BIN)
        .args(["forward", "--entry", &entries, "--layer", &layer, "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&cli_out)
        .output()
        .unwrap();
    assert!(o.status.success(), "forward: {}\n{}", String::from_utf8_lossy(&o.stderr), cluster.dump_logs());
    let py_out = work.path().join("py.safetensors");
    let o = Command::new("python3")
        .arg(root().join("clients/python/example.py"))
        .args(["--entry", &entries, "--layer", &layer, "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&py_out)
        .env("PYTHONPATH", format!("{site}:{}", root().join("clients/python").display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "example.py: {}\n{}", String::from_utf8_lossy(&o.stderr), cluster.dump_logs());
    assert!(String::from_utf8_lossy(&o.stdout).contains("through the cluster"));
    // The same answer (Forward is deterministic), and the reference's.
    assert_eq!(read_i64(&py_out, "topk_indices"), read_i64(&cli_out, "topk_indices"));
    let (py, cli) = (read_f32(&py_out, "output"), read_f32(&cli_out, "output"));
    assert_eq!(py.len(), 17 * spec.hidden);
    let cli64: Vec<f64> = cli.iter().map(|&v| v as f64).collect();
    assert!(rel_l2_f32(&py, &cli64) < 1e-6, "python and CLI answers differ");
    let x = read_f32(&input, "hidden_states");
    let ids = read_i64(&input, "input_ids");
    let want = reference(dir.path(), &spec, spec.moe_layers()[1], &x, 17, Some(&ids));
    assert!(rel_l2_f32(&py, &want.output) < 1e-2, "against the float64 reference");
}
