//! Checkpoint problems are named precisely; the CLI's forward, gen-model and up work end to end.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::cluster::BIN;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::Checkpoint;
use expertmesh_worker::synth::{write_safetensors, OwnedTensor};

/// Rewrite the shard holding `name` with `f` applied to its tensors.
fn edit_tensor(dir: &std::path::Path, mut f: impl FnMut(&mut BTreeMap<String, OwnedTensor>)) {
    for p in std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()) {
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut m: BTreeMap<String, OwnedTensor> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let dtype = DType::from_safetensors(v.dtype()).unwrap();
                (n, OwnedTensor { dtype, shape: v.shape().to_vec(), data: v.data().to_vec() })
            })
            .collect();
        f(&mut m);
        write_safetensors(&p, &m).unwrap();
    }
}

#[test]
fn checkpoint_errors_name_the_tensor_and_the_expectation() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 2);
    let l = spec.moe_layers()[0];
    let w1 = spec.expert_weight_name(l, 3, expertmesh_core::Proj::Gate);
    let w2 = spec.expert_weight_name(l, 4, expertmesh_core::Proj::Down);
    let w3 = spec.expert_weight_name(l, 5, expertmesh_core::Proj::Up);
    let (a, b, c) = (w1.clone(), w2.clone(), w3.clone());
    edit_tensor(dir.path(), move |m| {
        m.remove(&a);
        if let Some(t) = m.get_mut(&b) {
            t.shape = vec![t.shape[1], t.shape[0]];
        }
        if let Some(t) = m.get_mut(&c) {
            t.dtype = DType::I32;
            t.shape = vec![t.shape[0], t.shape[1] / 2];
        }
    });
    let ck = Checkpoint::open(dir.path()).unwrap();
    let e = ck.layer_weights(l, &[3]).unwrap_err().to_string();
    assert!(e.contains(&format!("tensor `{w1}` is missing")), "{e}");
    let e = ck.layer_weights(l, &[4]).unwrap_err().to_string();
    assert!(e.contains(&w2) && e.contains("has shape [32, 64]; expected [64, 32]"), "{e}");
    let e = ck.layer_weights(l, &[5]).unwrap_err().to_string();
    assert!(e.contains(&w3) && e.contains("dtype i32; expected a float dtype"), "{e}");
    // Other experts still load.
    assert!(ck.layer_weights(l, &[6]).is_ok());
    let e = ck.layer_weights(0, &[0]).unwrap_err().to_string();
    assert!(e.contains("dense"), "{e}");
    let e = ck.layer_weights(l, &[16]).unwrap_err().to_string();
    assert!(e.contains("expert 16 is out of range"), "{e}");

    // A truncated shard is refused when the checkpoint is opened, naming the tensor.
    let shard = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("truncated") || e.contains("bad safetensors header"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_file_checkpoint_without_index_loads_the_same() {
    let (dir, spec) = gen_model("tiny-v3", DType::F16, PresetOverrides::default(), 8);
    // Merge the shards into one model.safetensors and drop the index.
    let mut all = BTreeMap::new();
    edit_tensor(dir.path(), |m| all.extend(m.clone()));
    for p in std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()) {
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.ends_with(".safetensors") || n.ends_with(".index.json") {
            std::fs::remove_file(p).unwrap();
        }
    }
    write_safetensors(&dir.path().join("model.safetensors"), &all).unwrap();
    let ck = std::sync::Arc::new(Checkpoint::open(dir.path()).unwrap());
    let moe =
        expertmesh_dispatcher::moe::LocalMoe::new(ck, std::sync::Arc::new(expertmesh_kernels::cpu::CpuBackend::new()));
    for layer in spec.moe_layers() {
        let (x, ids) = random_input(&spec, 17, layer as u64);
        let r = reference(dir.path(), &spec, layer, &x, 17, Some(&ids));
        let out = moe
            .forward(expertmesh_dispatcher::moe::MoeInput { layer, tokens: 17, hidden_states: x, input_ids: None })
            .await
            .unwrap();
        assert!(rel_l2_f32(&out.output, &r.output) < 1e-5);
    }
}

#[test]
fn forward_cli_in_process_and_on_workers_matches_reference() {
    let (dir, spec) = gen_model("tiny-v4", DType::BF16, PresetOverrides::default(), 9);
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.safetensors");
    let st = Command::new(BIN)
        .args(["gen-input", "--model", dir.path().to_str().unwrap(), "--tokens", "21", "--seed", "4", "--out"])
        .arg(&input)
        .status()
        .unwrap();
    assert!(st.success());
    let x = read_f32(&input, "hidden_states");
    let ids = read_i64(&input, "input_ids");
    for layer in [1usize, 4] {
        let r = reference(dir.path(), &spec, layer, &x, 21, Some(&ids));
        for (workers, wire, tol) in [(None, "bf16", 1e-5), (Some("3"), "bf16", 1e-2), (Some("2"), "f32", 1e-5)] {
            let out = work.path().join("out.safetensors");
            let mut cmd = Command::new(BIN);
            cmd.args([
                "forward",
                "--model",
                dir.path().to_str().unwrap(),
                "--layer",
                &layer.to_string(),
                "--wire",
                wire,
                "--check",
            ])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out);
            if let Some(n) = workers {
                cmd.args(["--workers", n]);
            }
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "forward failed: {}", String::from_utf8_lossy(&o.stderr));
            let said = String::from_utf8_lossy(&o.stdout);
            assert!(said.contains("chosen experts match") && said.contains("output rel L2"), "--check: {said}");
            let ob = std::fs::read(&out).unwrap();
            let ot = safetensors::SafeTensors::deserialize(&ob).unwrap();
            let y = read_f32(&out, "output");
            assert_eq!(ot.tensor("topk_indices").unwrap().shape(), &[21, spec.top_k]);
            assert_eq!(ot.tensor("topk_weights").unwrap().shape(), &[21, spec.top_k]);
            let err = rel_l2_f32(&y, &r.output);
            println!("forward layer {layer} workers {workers:?} wire {wire}: rel L2 {err:.2e}");
            assert!(err < tol, "layer {layer} workers {workers:?}: {err}");
        }
    }
    // A dense or missing layer is refused with a clear message.
    let o = Command::new(BIN)
        .args(["forward", "--model", dir.path().to_str().unwrap(), "--layer", "7"])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(work.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("layer 7 is out of range"));
}

#[test]
fn gen_model_refuses_full_size_and_explains() {
    let work = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["gen-model", "--preset", "deepseek-v4-pro", "--out"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("GiB") && err.contains("--layers"), "{err}");
    let o = Command::new(BIN).args(["gen-model", "--preset", "nope", "--out"]).arg(work.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown preset `nope`"));
}

#[test]
fn up_runs_a_bounded_demo_and_reports() {
    up_demo(false);
}

#[test]
fn up_with_tls_runs_the_demo_over_mutual_tls() {
    up_demo(true);
}

fn up_demo(tls: bool) {
    let logs = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args([
            "up",
            "--workers",
            "3",
            "--duration",
            "3",
            "--layers",
            "2",
            "--experts",
            "8",
            "--hidden",
            "64",
            "--ffn",
            "32",
        ])
        .arg("--log-dir")
        .arg(logs.path())
        .args(if tls { &["--tls"][..] } else { &[][..] })
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "up failed: {err}\n{out}");
    assert!(out.contains("tokens/s") && out.contains("p99 ms") && out.contains("worker-2"), "{out}");
    assert!(out.contains("0 errors"), "{out}");
    assert_eq!(err.contains("mutual TLS on every link"), tls, "{err}");
    // With --tls the driver dials every process over TLS only, so traffic without errors means
    // the whole cluster spoke mutual TLS.
    if tls {
        assert!(logs.path().join("certs/worker.worker-2.pem").is_file());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_load_its_experts_is_reported_not_served_from() {
    use common::cluster::Cluster;
    use expertmesh_dispatcher::wire::f32_tensor;
    use expertmesh_proto::v1::ForwardRequest;

    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 4);
    let l = spec.moe_layers()[0];
    let missing = spec.expert_weight_name(l, 5, expertmesh_core::Proj::Up);
    let m2 = missing.clone();
    edit_tensor(dir.path(), move |m| {
        m.remove(&m2);
    });
    let cluster = Cluster::start_with(dir.path(), 2, &[], &["--placement-wait-ms", "1500"]);
    let t = std::time::Instant::now();
    let (v, errors) = loop {
        let o =
            Command::new(BIN).args(["status", "--json", "--coordinator", &cluster.coordinator.addr]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let errors: Vec<String> = v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["error"].as_str().filter(|e| !e.is_empty()).map(String::from))
            .collect();
        if !errors.is_empty() {
            break (v, errors);
        }
        assert!(t.elapsed().as_secs() < 30, "no worker reported the load failure:\n{}", cluster.dump_logs());
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(errors[0].contains(&format!("tensor `{missing}` is missing")), "{errors:?}");
    assert_eq!(v["current_epoch"], 0, "a placement that cannot load is never committed");
    // Requests are refused with a clear error, not answered wrongly; the worker keeps serving.
    let mut c = cluster.moe_client(0).await;
    let (x, _) = random_input(&spec, 3, 1);
    let err = c
        .forward(ForwardRequest {
            layer: l as u32,
            hidden_states: Some(f32_tensor(&[3, spec.hidden], &x)),
            input_ids: None,
            wire_dtype: 0,
        })
        .await
        .expect_err("no placement");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("no placement committed"), "{}", err.message());
}

/// Regression: `forward --workers N` on a checkpoint a worker cannot load waited 20 s for a
/// placement and blamed a generic cause; it now fails with the worker's own error, naming the
/// missing tensor.
#[test]
fn forward_on_workers_names_a_workers_load_error() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 6);
    let l = spec.moe_layers()[0];
    let missing = spec.expert_weight_name(l, 2, expertmesh_core::Proj::Down);
    let m2 = missing.clone();
    edit_tensor(dir.path(), move |m| {
        m.remove(&m2);
    });
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.safetensors");
    let st = Command::new(BIN)
        .args(["gen-input", "--model", dir.path().to_str().unwrap(), "--tokens", "3", "--out"])
        .arg(&input)
        .status()
        .unwrap();
    assert!(st.success());
    let o = Command::new(BIN)
        .args(["forward", "--model", dir.path().to_str().unwrap(), "--layer", &l.to_string(), "--workers", "2"])
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(work.path().join("out.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "forward succeeded on a checkpoint missing {missing}");
    assert!(
        err.contains("cannot load its experts") && err.contains(&format!("tensor `{missing}` is missing")),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

/// `status` shows per worker the bytes its backend holds for experts: the checkpoint bytes of
/// the experts it holds (weights and FP8 scales, in the stored dtype) within 5%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_resident_expert_bytes_per_worker() {
    use common::cluster::Cluster;
    for dtype in [DType::BF16, DType::F8E4M3] {
        let (dir, spec) = gen_model("tiny-v3", dtype, PresetOverrides::default(), 8);
        let per_expert = Checkpoint::open(dir.path()).unwrap().expert_bytes(spec.moe_layers()[0]).unwrap();
        let cluster = Cluster::start(dir.path(), 2, &[]);
        let t = std::time::Instant::now();
        let v = loop {
            let v = status_json(&cluster.coordinator.addr);
            let reported = v["workers"].as_array().unwrap().iter().all(|w| w["resident_bytes"].as_u64() > Some(0));
            if v["current_epoch"] == 1 && reported {
                break v;
            }
            assert!(t.elapsed().as_secs() < 30, "no load reports with resident bytes: {v}\n{}", cluster.dump_logs());
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        for w in v["workers"].as_array().unwrap() {
            let want = w["experts_held"].as_u64().unwrap() * per_expert;
            let got = w["resident_bytes"].as_u64().unwrap();
            println!("{} {}: resident {got} bytes, checkpoint {want}", dtype.name(), w["worker_id"]);
            assert!(want > 0 && got.abs_diff(want) as f64 <= 0.05 * want as f64, "{}: {got} vs {want}", dtype.name());
            assert!(w["rss_bytes"].as_u64().unwrap() > got, "process RSS holds at least the experts: {w}");
        }
        let o = Command::new(BIN).args(["status", "--coordinator", &cluster.coordinator.addr]).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && text.contains("KiB resident"), "{text}");
    }
}

/// A worker's resident set after loading stays within 1.15x of the checkpoint bytes of the
/// experts it holds, bf16 and FP8: weights are held in the stored dtype, and what loading
/// allocates on the way is handed back (192 MiB of experts each, one worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_rss_after_loading_is_close_to_the_checkpoint_bytes() {
    use common::cluster::Cluster;
    for (dtype, experts) in [(DType::BF16, 64), (DType::F8E4M3, 128)] {
        let ov = PresetOverrides {
            hidden: Some(1024),
            ffn: Some(512),
            experts: Some(experts),
            layers: Some(2),
            n_group: Some(1),
            topk_group: Some(1),
            ..Default::default()
        };
        let (dir, _) = gen_model("tiny-v3", dtype, ov, 12);
        let cluster = Cluster::start(dir.path(), 1, &[]);
        let t = std::time::Instant::now();
        let w = loop {
            let v = status_json(&cluster.coordinator.addr);
            let w = v["workers"][0].clone();
            if v["current_epoch"] == 1 && w["resident_bytes"].as_u64() > Some(0) {
                break w;
            }
            assert!(t.elapsed().as_secs() < 60, "no load report: {v}\n{}", cluster.dump_logs());
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let (resident, rss) = (w["resident_bytes"].as_u64().unwrap(), rss_bytes(cluster.workers[0].child.id()));
        let ratio = rss as f64 / resident as f64;
        println!("{}: experts {resident} bytes, worker RSS {rss} ({ratio:.3}x)", dtype.name());
        assert!(resident >= 190 << 20, "{resident}");
        assert!(ratio <= 1.15, "{}: worker RSS {rss} is {ratio:.3}x its experts' {resident} bytes", dtype.name());
    }
}

/// Names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/task");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// `--compute-threads` sizes a process's compute pool (named threads, so an operator sees them in
/// `top -H`); 0 is refused with a message that names the flag.
#[test]
fn compute_threads_size_the_pool_and_zero_is_refused() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 13);
    let mut c = common::cluster::Cluster::coordinator_only(dir.path(), 1, &[]);
    c.add_worker("w0", &["--compute-threads", "3"]);
    let names = thread_names(c.workers[0].child.id());
    let mut pool: Vec<&String> = names.iter().filter(|n| n.starts_with("em-compute")).collect();
    pool.sort();
    assert_eq!(pool, ["em-compute-0", "em-compute-1", "em-compute-2"], "threads: {names:?}");
    let o = Command::new(BIN)
        .args(["--compute-threads", "0", "worker", "--coordinator", &c.coordinator.addr, "--id", "w1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("at least 1 thread (--compute-threads)"), "{err}");
}

/// `--cpus` binds a process to CPUs (as the kernel reports for every one of its threads) and
/// sizes its compute pool to them; a CPU the process may not use, or a bad list, is refused
/// with a message naming the flag.
#[test]
fn cpus_bind_a_worker_and_size_its_pool() {
    let (dir, _) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 14);
    let mut c = common::cluster::Cluster::coordinator_only(dir.path(), 1, &[]);
    let cpu = expertmesh_dispatcher::compute::allowed_cpus().unwrap()[0];
    c.add_worker("w0", &["--cpus", &cpu.to_string()]);
    let pid = c.workers[0].child.id();
    let names = thread_names(pid);
    assert_eq!(names.iter().filter(|n| n.starts_with("em-compute")).count(), 1, "threads: {names:?}");
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
        assert_eq!(allowed, cpu.to_string(), "a thread of the worker runs outside --cpus");
    }
    let beyond = expertmesh_dispatcher::compute::allowed_cpus().unwrap().last().unwrap() + 1;
    for (list, says) in [
        (beyond.to_string(), format!("CPU {beyond} is not one this process may use")),
        ("1-0".to_string(), "runs backwards".to_string()),
        ("x".to_string(), "`x` is not a CPU number".to_string()),
    ] {
        let o = Command::new(BIN)
            .args(["--cpus", &list, "worker", "--coordinator", &c.coordinator.addr, "--id", "w1"])
            .output()
            .unwrap();
        assert!(!o.status.success(), "--cpus {list} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&says) && err.contains("--cpus"), "--cpus {list}: {err}");
    }
}

#[test]
fn every_flag_has_help_and_bad_flag_values_are_refused() {
    let commands: &[&[&str]] = &[
        &["up"],
        &["coordinator"],
        &["worker"],
        &["forward"],
        &["gen-model"],
        &["gen-input"],
        &["bench"],
        &["status"],
        &["drain"],
        &["plan"],
        &["certs"],
        &["backend", "check"],
        &["backend", "probe"],
        &["backend", "bench"],
    ];
    for c in commands {
        let o = Command::new(BIN).args(*c).arg("--help").output().unwrap();
        assert!(o.status.success(), "{c:?} --help");
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            let is_option =
                l.starts_with("  ") && (t.starts_with("--") || (t.starts_with('-') && t.get(2..4) == Some(", ")));
            if !is_option || t.starts_with("--help") || t.starts_with("-h, --help") || t.starts_with("-V, --version") {
                continue;
            }
            let next = lines.get(i + 1).copied().unwrap_or("");
            assert!(next.starts_with("          ") && !next.trim().is_empty(), "{c:?}: `{}` has no help text", t);
        }
    }
    let o = Command::new(BIN).args(["--log-format", "yaml", "status", "--coordinator", "x:1"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("yaml") && err.contains("text") && err.contains("json"), "{err}");
    let o = Command::new(BIN).args(["--log", "verbose", "status", "--coordinator", "x:1"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`verbose` is not a level"), "{err}");
    // An impossible inventory is an error, not a plan.
    let o = Command::new(BIN)
        .args(["plan", "--model", "deepseek-v3", "--device", "h100", "--devices-per-node", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--devices-per-node 0"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Counts, times and fractions out of range are refused before anything is built or started.
    for (args, says) in [
        (&["bench", "--batches", "1,0"][..], "invalid value '0' for '--batches <BATCHES>': expected at least 1"),
        (&["bench", "--skew", "1.5"], "expected a fraction from 0 to 1"),
        (&["bench", "--worker-threads", "0"], "expected at least 1"),
        (
            &["bench", "--replicas", "5", "--fault", "kill-worker"],
            "--replicas 5: every expert on 5 distinct workers needs at least 5 workers; --workers gives 4",
        ),
        (&["up", "--batch", "0"], "invalid value '0' for '--batch <BATCH>': expected at least 1"),
        (&["up", "--concurrency", "x"], "`x` is not a whole number"),
        (&["up", "--duration", "0"], "expected a number of seconds above 0"),
        (&["up", "--workers", "2", "--replicas", "3"], "needs at least 3 workers; --workers gives 2"),
        (&["up", "--concurrency", "0"], "invalid value '0' for '--concurrency <CONCURRENCY>': expected at least 1"),
        (&["up", "--replicas", "0"], "invalid value '0' for '--replicas <REPLICAS>': expected at least 1"),
        (&["up", "--workers", "0"], "0 workers: expected a worker count"),
        (
            &[
                "forward",
                "--model",
                "/nonexistent",
                "--input",
                "/nonexistent",
                "--output",
                "/nonexistent",
                "--timeout-ms",
                "0",
            ],
            "invalid value '0' for '--timeout-ms <TIMEOUT_MS>': expected at least 1 ms",
        ),
        (&["backend", "bench", "--tokens", "128,0"], "invalid value '0' for '--tokens <TOKENS>': expected at least 1"),
        (&["backend", "bench", "--share", "0"], "invalid value '0' for '--share <SHARE>': expected at least 1"),
        (&["backend", "bench", "--min-secs", "0"], "expected a number of seconds above 0"),
        // Addresses are checked before anything is dialled (a DNS lookup of `nonsense` was the
        // error before; port 99999 was "connection refused").
        (&["status", "--coordinator", "nonsense"], "address `nonsense` has no port; expected HOST:PORT"),
        (&["drain", "w1", "--coordinator", "127.0.0.1:99999"], "address `127.0.0.1:99999` has no valid port"),
        (&["placement", "show", "--coordinator", "127.0.0.1:7400,bad"], "address `bad` has no port"),
        (&["worker", "--coordinator", "127.0.0.1:1", "--advertise", "0.0.0.0"], "address `0.0.0.0` has no port"),
        (&["forward", "--entry", "a:1,b", "--layer", "0", "--input", "x", "--output", "y"], "address `b` has no port"),
        (
            &["coordinator", "--model", "/nonexistent", "--replicas", "0"],
            "invalid value '0' for '--replicas <REPLICAS>'",
        ),
        (&["worker", "--coordinator", "127.0.0.1:1", "--max-batch-tokens", "0"], "expected at least 1"),
        (&["worker", "--coordinator", "127.0.0.1:1", "--stall-timeout-ms", "50"], "expected at least 100 ms"),
        (&["gen-input", "--model", "/nonexistent", "--out", "/nonexistent/x", "--tokens", "0"], "expected at least 1"),
    ] {
        let o = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("generating") && !err.contains("starting"),
            "{args:?}: refused only after starting work:\n{err}"
        );
    }
    // gen-model keeps an existing model unless told.
    let work = tempfile::tempdir().unwrap();
    let gen = |force: bool| {
        let mut c = Command::new(BIN);
        c.args(["gen-model", "--preset", "tiny", "--out"]).arg(work.path());
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    assert!(gen(false).status.success());
    let o = gen(false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(gen(true).status.success());
}
