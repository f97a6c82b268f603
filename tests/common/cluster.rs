//! Real `expertmesh` processes on loopback ports, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use expertmesh_proto::v1::moe_layer_client::MoeLayerClient;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_expertmesh");

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `expertmesh ARGS` and wait for its `MARKER ... addr=...` line.
pub fn spawn(args: &[&str], marker: &str, log: &Path) -> Proc {
    let mut c = Command::new(BIN);
    c.args(args);
    spawn_command(c, marker, log)
}

/// Start `cmd` (an `expertmesh` process, maybe wrapped, e.g. in `ip netns exec`) and wait for
/// its `MARKER ... addr=...` line.
pub fn spawn_command(mut cmd: Command, marker: &str, log: &Path) -> Proc {
    let logf = std::fs::File::create(log).unwrap();
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(logf))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if !sent && line.starts_with(&marker) {
                let addr = line.split_whitespace().find_map(|kv| kv.strip_prefix("addr=")).unwrap_or("").to_string();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => Proc { child, addr, log: log.to_path_buf() },
        Err(_) => {
            let _ = child.kill();
            panic!("{what} did not become ready:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
    }
}

/// `expertmesh coordinator --model MODEL ARGS`, logging to `log`.
pub fn spawn_coordinator(model: &Path, args: &[&str], log: &Path) -> Proc {
    let m = model.display().to_string();
    let mut a = vec!["coordinator", "--model", &m];
    a.extend_from_slice(args);
    spawn(&a, "EXPERTMESH_COORDINATOR_READY", log)
}

/// Send `sig` (e.g. "-KILL", "-TERM", "-STOP") to a process.
pub fn signal(p: &Proc, sig: &str) {
    let pid = p.child.id().to_string();
    assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success(), "kill {sig} {pid}");
}

/// Wait (bounded by `limit`) for a process to exit; its exit status.
pub fn wait_exit(p: &mut Proc, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = p.child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Coordinator + N workers.
pub struct Cluster {
    pub coordinator: Proc,
    pub workers: Vec<Proc>,
    pub logs: tempfile::TempDir,
}

impl Cluster {
    pub fn start(model: &Path, n: usize, extra_coord: &[&str]) -> Self {
        Self::start_with(model, n, extra_coord, &[])
    }

    pub fn start_with(model: &Path, n: usize, extra_coord: &[&str], extra_worker: &[&str]) -> Self {
        let mut c = Self::coordinator_only(model, n, extra_coord);
        for i in 0..n {
            c.add_worker(&format!("w{i}"), extra_worker);
        }
        c
    }

    /// A coordinator that waits for `expect` workers, and no workers yet.
    pub fn coordinator_only(model: &Path, expect: usize, extra_coord: &[&str]) -> Self {
        let logs = tempfile::tempdir().unwrap();
        let m = model.display().to_string();
        let ns = expect.to_string();
        let mut args = vec!["coordinator", "--model", &m, "--expect-workers", &ns];
        if !extra_coord.contains(&"--listen") {
            args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
        }
        args.extend_from_slice(extra_coord);
        let coordinator = spawn(&args, "EXPERTMESH_COORDINATOR_READY", &logs.path().join("coordinator.log"));
        Self { coordinator, workers: Vec::new(), logs }
    }

    /// SIGKILL the coordinator and start a new one with `args` (same port, same store).
    pub fn restart_coordinator(&mut self, model: &Path, expect: usize, extra_coord: &[&str]) {
        let _ = self.coordinator.child.kill();
        let _ = self.coordinator.child.wait();
        let m = model.display().to_string();
        let ns = expect.to_string();
        let mut args = vec!["coordinator", "--model", &m, "--expect-workers", &ns];
        args.extend_from_slice(extra_coord);
        let log = self.logs.path().join("coordinator-2.log");
        self.coordinator = spawn(&args, "EXPERTMESH_COORDINATOR_READY", &log);
    }

    /// Start a worker `id` and wait until it serves.
    pub fn add_worker(&mut self, id: &str, extra: &[&str]) {
        let mut args = vec!["worker", "--coordinator", &self.coordinator.addr, "--listen", "127.0.0.1:0", "--id", id];
        args.extend_from_slice(extra);
        let p = spawn(&args, "EXPERTMESH_WORKER_READY", &self.logs.path().join(format!("{id}.log")));
        self.workers.push(p);
    }

    /// Start a worker `id` that registers in the store directly (no coordinator address).
    pub fn add_store_worker(&mut self, id: &str, store: &str, extra: &[&str]) {
        let mut args = vec!["worker", "--store", store, "--listen", "127.0.0.1:0", "--id", id];
        args.extend_from_slice(extra);
        let p = spawn(&args, "EXPERTMESH_WORKER_READY", &self.logs.path().join(format!("{id}.log")));
        self.workers.push(p);
    }

    /// Index of worker `id` in `workers`.
    pub fn worker_index(&self, id: &str) -> usize {
        self.workers.iter().position(|p| p.log.file_stem().is_some_and(|s| s == id)).expect("no such worker")
    }

    /// A failover MoeLayer client over workers `entries` (each call bounded by `deadline`).
    pub fn moe_failover(
        &self,
        entries: &[usize],
        deadline: Duration,
    ) -> std::sync::Arc<expertmesh_worker::client::MoeClient> {
        let addrs: Vec<String> = entries.iter().map(|&i| self.workers[i].addr.clone()).collect();
        std::sync::Arc::new(expertmesh_worker::client::MoeClient::new(&addrs, deadline, 256 << 20, None).unwrap())
    }

    /// A MoeLayer client on worker `i`.
    pub async fn moe_client(&self, i: usize) -> MoeLayerClient<Channel> {
        MoeLayerClient::connect(format!("http://{}", self.workers[i].addr))
            .await
            .unwrap()
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    pub fn dump_logs(&self) -> String {
        let mut s = String::new();
        for p in std::iter::once(&self.coordinator).chain(&self.workers) {
            s.push_str(&format!("--- {}\n{}\n", p.log.display(), std::fs::read_to_string(&p.log).unwrap_or_default()));
        }
        s
    }
}
