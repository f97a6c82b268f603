//! A local cluster of real processes on loopback: one coordinator and N workers, each this
//! same binary, as `expertmesh up`, `forward --workers` and `bench` use it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Running coordinators and workers; killed when dropped.
#[derive(Debug)]
pub(crate) struct LocalCluster {
    /// Address of the first coordinator.
    pub(crate) coordinator: String,
    pub(crate) coordinators: Vec<String>,
    pub(crate) workers: Vec<String>,
    /// Coordinators first, then workers.
    children: Vec<Option<Child>>,
    /// With mutual TLS: this process's certificate (`client`) for calls into the cluster.
    pub(crate) tls: Option<expertmesh_trust::Tls>,
}

/// The workers of a local cluster: a count of CPU workers (`4`) or devices by kind
/// (`cpu:2,cuda:1`: two CPU workers and one on `cuda:0`; CUDA workers take `cuda:0`,
/// `cuda:1`, ... in order).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkerMix {
    devices: Vec<String>,
}

impl WorkerMix {
    pub(crate) fn cpu(n: usize) -> Self {
        Self { devices: vec!["cpu".into(); n] }
    }

    /// The `--device` of each worker, in start order.
    pub(crate) fn devices(&self) -> &[String] {
        &self.devices
    }

    pub(crate) fn len(&self) -> usize {
        self.devices.len()
    }
}

impl std::str::FromStr for WorkerMix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let want = "expected a worker count (4) or devices by kind (cpu:2,cuda:1)";
        if let Ok(n) = s.trim().parse::<usize>() {
            return if n == 0 { Err(format!("0 workers: {want}")) } else { Ok(Self::cpu(n)) };
        }
        let mut devices = Vec::new();
        let mut gpus = 0;
        for part in s.split(',').map(str::trim) {
            let (kind, n) = part.split_once(':').ok_or_else(|| format!("`{part}`: {want}"))?;
            let n: usize = n.parse().map_err(|_| format!("`{part}`: `{n}` is not a count; {want}"))?;
            for _ in 0..n {
                match kind {
                    "cpu" => devices.push("cpu".to_string()),
                    "cuda" => {
                        devices.push(format!("cuda:{gpus}"));
                        gpus += 1;
                    }
                    _ => return Err(format!("`{part}`: unknown device kind `{kind}`; expected cpu or cuda")),
                }
            }
        }
        if devices.is_empty() {
            return Err(format!("`{s}` names no workers; {want}"));
        }
        Ok(Self { devices })
    }
}

impl std::fmt::Display for WorkerMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpus = self.devices.iter().filter(|d| *d == "cpu").count();
        let gpus = self.devices.len() - cpus;
        match (cpus, gpus) {
            (c, 0) => write!(f, "{c} CPU workers"),
            (0, g) => write!(f, "{g} CUDA workers"),
            (c, g) => write!(f, "{c} CPU and {g} CUDA workers"),
        }
    }
}

/// How to lay a local cluster out.
#[derive(Debug, Clone)]
pub(crate) struct LocalOptions {
    pub(crate) workers: WorkerMix,
    pub(crate) replicas: usize,
    /// Coordinators (more than one needs an etcd store: they elect a leader).
    pub(crate) coordinators: usize,
    /// `embedded`, or `etcd://...`: then workers register in etcd directly.
    pub(crate) store: String,
    pub(crate) lease_ttl_ms: u64,
    /// Compute threads of each worker (`--compute-threads`); None: one per core.
    pub(crate) worker_threads: Option<usize>,
    /// Mutual TLS on every link, with certificates generated into LOG_DIR/certs.
    pub(crate) tls: bool,
    /// More flags for every coordinator.
    pub(crate) coordinator_args: Vec<String>,
    /// Bind each worker to its own CPUs (`--cpus`, from [`worker_cpus`]), as if each had a
    /// device of its own.
    pub(crate) pin_workers: bool,
}

/// The CPUs of each of `workers` workers pinned on `allowed`: contiguous blocks as even as
/// may be when there are at least as many CPUs as workers; else worker `i` gets CPU `i mod n`.
pub(crate) fn worker_cpus(allowed: &[usize], workers: usize) -> Vec<Vec<usize>> {
    let n = allowed.len();
    if n == 0 {
        return vec![Vec::new(); workers];
    }
    if workers > n {
        return (0..workers).map(|i| vec![allowed[i % n]]).collect();
    }
    let mut at = 0;
    (0..workers)
        .map(|i| {
            let len = n / workers + usize::from(i < n % workers);
            let block = allowed[at..at + len].to_vec();
            at += len;
            block
        })
        .collect()
}

impl LocalOptions {
    pub(crate) fn simple(workers: WorkerMix, replicas: usize, worker_threads: Option<usize>) -> Self {
        Self {
            workers,
            replicas,
            coordinators: 1,
            store: "embedded".into(),
            lease_ttl_ms: 10_000,
            worker_threads,
            tls: false,
            coordinator_args: Vec::new(),
            pin_workers: false,
        }
    }
}

/// `--tls-cert`, `--tls-key`, `--tls-ca` for the certificate `stem` in `dir`.
fn tls_flags(dir: &Path, stem: &str) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{stem}.pem")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{stem}-key.pem")).display().to_string(),
        "--tls-ca".into(),
        dir.join("ca.pem").display().to_string(),
    ]
}

async fn spawn_ready(args: &[String], log: &Path, marker: &str) -> Result<(Child, String)> {
    let exe = std::env::current_exe().context("locating the expertmesh binary")?;
    let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .context("starting an expertmesh process")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(marker) {
                let addr = rest.split_whitespace().find_map(|kv| kv.strip_prefix("addr=")).unwrap_or_default();
                return Ok::<_, std::io::Error>(Some(addr.to_string()));
            }
        }
        Ok(None)
    })
    .await;
    let addr = match found {
        Ok(Ok(Some(a))) => a,
        _ => {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "`expertmesh {}` did not become ready; last log lines ({}):\n{}",
                args.first().map(String::as_str).unwrap_or(""),
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

impl LocalCluster {
    /// Start coordinators serving `model` and CPU workers; returns once every worker serves
    /// (placement may still be loading: dispatchers wait for the first commit).
    pub(crate) async fn start(model: &Path, opts: &LocalOptions, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let model = model.canonicalize().with_context(|| format!("model directory {}", model.display()))?;
        let in_store = opts.store.starts_with("etcd://");
        if opts.coordinators > 1 && !in_store {
            bail!("{} coordinators need an etcd store to elect a leader", opts.coordinators);
        }
        let certs = log_dir.join("certs");
        let ids: Vec<String> = (0..opts.workers.len()).map(|i| format!("worker-{i}")).collect();
        let tls = if opts.tls {
            if in_store {
                bail!("a local cluster with TLS keeps its state in the coordinator (--store embedded)");
            }
            expertmesh_trust::certs::generate(&certs, &ids, &[])?;
            let files = expertmesh_trust::TlsFiles {
                cert: certs.join("client.pem"),
                key: certs.join("client-key.pem"),
                ca: certs.join("ca.pem"),
            };
            Some(expertmesh_trust::Tls::load(files, Default::default())?)
        } else {
            None
        };
        let mut children = Vec::new();
        let mut coordinators = Vec::new();
        for i in 0..opts.coordinators.max(1) {
            let mut args: Vec<String> = vec![
                "coordinator".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--model".into(),
                model.display().to_string(),
                "--expect-workers".into(),
                opts.workers.len().to_string(),
                "--replicas".into(),
                opts.replicas.to_string(),
                "--store".into(),
                opts.store.clone(),
                "--lease-ttl-ms".into(),
                opts.lease_ttl_ms.to_string(),
            ];
            if opts.tls {
                args.extend(tls_flags(&certs, "coordinator"));
            }
            args.extend(opts.coordinator_args.iter().cloned());
            let (c, addr) = spawn_ready(
                &args,
                &log_dir.join(if i == 0 { "coordinator.log".to_string() } else { format!("coordinator-{i}.log") }),
                "EXPERTMESH_COORDINATOR_READY",
            )
            .await?;
            children.push(Some(c));
            coordinators.push(addr);
        }
        let mut addrs = Vec::new();
        let pins = if opts.pin_workers {
            worker_cpus(&expertmesh_dispatcher::compute::allowed_cpus()?, opts.workers.len())
        } else {
            vec![Vec::new(); opts.workers.len()]
        };
        let starts = opts.workers.devices().iter().enumerate().map(|(i, device)| {
            let mut args: Vec<String> = vec![
                "worker".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--id".into(),
                ids[i].clone(),
                "--device".into(),
                device.clone(),
            ];
            if opts.tls {
                args.extend(tls_flags(&certs, &format!("worker.{}", ids[i])));
            }
            if let Some(n) = opts.worker_threads {
                args.extend(["--compute-threads".into(), n.to_string()]);
            }
            if !pins[i].is_empty() {
                args.extend(["--cpus".into(), expertmesh_dispatcher::compute::cpu_list(&pins[i])]);
            }
            if in_store {
                args.extend(["--store".into(), opts.store.clone()]);
                args.extend(["--lease-ttl-ms".into(), opts.lease_ttl_ms.to_string()]);
            } else {
                args.extend(["--coordinator".into(), coordinators[0].clone()]);
            }
            let log = log_dir.join(format!("worker-{i}.log"));
            async move { spawn_ready(&args, &log, "EXPERTMESH_WORKER_READY").await }
        });
        // Workers start concurrently: each loads its model header and binds on its own.
        for r in futures::future::join_all(starts).await {
            let (c, a) = r?;
            children.push(Some(c));
            addrs.push(a);
        }
        Ok(Self { coordinator: coordinators[0].clone(), coordinators, workers: addrs, children, tls })
    }

    /// SIGKILL coordinator `i`.
    pub(crate) async fn kill_coordinator(&mut self, i: usize) {
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            let _ = c.kill().await;
        }
    }

    /// SIGKILL worker `i`.
    pub(crate) async fn kill_worker(&mut self, i: usize) {
        let n = self.coordinators.len();
        if let Some(mut c) = self.children.get_mut(n + i).and_then(Option::take) {
            let _ = c.kill().await;
        }
    }

    /// Send `sig` (`-STOP`, `-CONT`...) to worker `i`.
    pub(crate) fn signal_worker(&self, i: usize, sig: &str) -> Result<()> {
        let n = self.coordinators.len();
        let pid = self.children.get(n + i).and_then(|c| c.as_ref()).and_then(Child::id);
        let pid = pid.ok_or_else(|| anyhow!("worker {i} is not running"))?;
        let ok = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status()?.success();
        if !ok {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// Stop workers at once (SIGINT: the whole cluster is going, so there is nowhere to drain
    /// to), then the coordinators (SIGTERM); wait (bounded) for exit.
    pub(crate) async fn stop(mut self) {
        let n = self.coordinators.len();
        for (i, c) in self.children.iter().enumerate().rev() {
            if let Some(pid) = c.as_ref().and_then(Child::id) {
                let sig = if i < n { "-TERM" } else { "-INT" };
                let _ = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status();
            }
        }
        for c in self.children.iter_mut().rev().flatten() {
            if tokio::time::timeout(Duration::from_secs(8), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// A single-member etcd on free loopback ports with its data in `dir` (for `bench --fault`).
#[derive(Debug)]
pub(crate) struct LocalEtcd {
    child: Option<Child>,
    pub(crate) client_port: u16,
    peer_port: u16,
    dir: std::path::PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalEtcd {
    pub(crate) async fn start(dir: &Path) -> Result<Self> {
        let mut e = Self { child: None, client_port: free_port()?, peer_port: free_port()?, dir: dir.to_path_buf() };
        e.spawn().await?;
        Ok(e)
    }

    pub(crate) fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    async fn spawn(&mut self) -> Result<()> {
        let (c, p) = (self.client_port, self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log"))?;
        let child = Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(["--initial-cluster", &format!("bench=http://127.0.0.1:{p}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context(
                "starting etcd (install it with `apt-get install -y etcd-server`, or run scripts/install-deps.sh)",
            )?;
        self.child = Some(child);
        let t = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", c)).await.is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("etcd did not listen on 127.0.0.1:{c}; see {}", self.dir.join("etcd.log").display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// SIGKILL (the data stays for a restart).
    pub(crate) async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    pub(crate) async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.spawn().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_mix_parses_counts_and_kinds() {
        assert_eq!("3".parse::<WorkerMix>().unwrap().devices(), ["cpu", "cpu", "cpu"]);
        let m: WorkerMix = "cpu:2,cuda:2".parse().unwrap();
        assert_eq!(m.devices(), ["cpu", "cpu", "cuda:0", "cuda:1"]);
        assert_eq!(m.to_string(), "2 CPU and 2 CUDA workers");
        assert_eq!("cuda:1, cpu:1".parse::<WorkerMix>().unwrap().devices(), ["cuda:0", "cpu"]);
        for (bad, says) in [
            ("0", "0 workers"),
            ("cpu:0", "names no workers"),
            ("tpu:1", "unknown device kind `tpu`"),
            ("cpu:x", "`x` is not a count"),
            ("cpu", "expected a worker count"),
        ] {
            let e = bad.parse::<WorkerMix>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn pinned_workers_get_even_contiguous_blocks_or_share_cpus_round_robin() {
        let cpus: Vec<usize> = vec![0, 1, 2, 3, 4, 5, 6];
        assert_eq!(worker_cpus(&cpus, 2), vec![vec![0, 1, 2, 3], vec![4, 5, 6]]);
        assert_eq!(worker_cpus(&cpus, 7), (0..7).map(|c| vec![c]).collect::<Vec<_>>());
        assert_eq!(worker_cpus(&[0, 1], 4), vec![vec![0], vec![1], vec![0], vec![1]]);
        assert_eq!(worker_cpus(&[2, 5], 1), vec![vec![2, 5]], "the allowed set, not 0..n");
        for workers in 1..10 {
            let got = worker_cpus(&cpus, workers);
            assert_eq!(got.len(), workers);
            assert!(got.iter().all(|b| !b.is_empty()), "{workers}: {got:?}");
            if workers <= cpus.len() {
                assert_eq!(got.concat(), cpus, "{workers}: every CPU once");
                let (lo, hi) = (got.iter().map(Vec::len).min(), got.iter().map(Vec::len).max());
                assert!(hi.unwrap() - lo.unwrap() <= 1, "{workers}: {got:?}");
            }
        }
    }
}
