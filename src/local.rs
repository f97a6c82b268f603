//! A local cluster of real processes on loopback: one coordinator and N workers, each this
//! same binary, as `expertmesh up`, `forward --workers` and `bench` use it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Running coordinator and workers; killed when dropped.
#[derive(Debug)]
pub(crate) struct LocalCluster {
    pub(crate) coordinator: String,
    pub(crate) workers: Vec<String>,
    children: Vec<Child>,
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
    /// Start a coordinator serving `model` and `workers` CPU workers; returns once every worker
    /// serves (placement may still be loading: dispatchers wait for the first commit).
    pub(crate) async fn start(model: &Path, workers: usize, replicas: usize, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let model = model.canonicalize().with_context(|| format!("model directory {}", model.display()))?;
        let (coord, caddr) = spawn_ready(
            &[
                "coordinator".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--model".into(),
                model.display().to_string(),
                "--expect-workers".into(),
                workers.to_string(),
                "--replicas".into(),
                replicas.to_string(),
            ],
            &log_dir.join("coordinator.log"),
            "EXPERTMESH_COORDINATOR_READY",
        )
        .await?;
        let mut children = vec![coord];
        let mut addrs = Vec::new();
        let starts = (0..workers).map(|i| {
            let args: Vec<String> = vec![
                "worker".into(),
                "--coordinator".into(),
                caddr.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--id".into(),
                format!("worker-{i}"),
                "--device".into(),
                "cpu".into(),
            ];
            let log = log_dir.join(format!("worker-{i}.log"));
            async move { spawn_ready(&args, &log, "EXPERTMESH_WORKER_READY").await }
        });
        for r in futures_join(starts).await {
            let (c, a) = r?;
            children.push(c);
            addrs.push(a);
        }
        Ok(Self { coordinator: caddr, workers: addrs, children })
    }

    /// Stop workers at once (SIGINT: the whole cluster is going, so there is nowhere to drain
    /// to), then the coordinator (SIGTERM); wait (bounded) for exit.
    pub(crate) async fn stop(mut self) {
        for (i, c) in self.children.iter().enumerate().rev() {
            if let Some(pid) = c.id() {
                let sig = if i == 0 { "-TERM" } else { "-INT" };
                let _ = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status();
            }
        }
        for c in self.children.iter_mut().rev() {
            if tokio::time::timeout(Duration::from_secs(8), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

async fn futures_join<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    let handles: Vec<_> = fs.collect();
    for f in handles {
        out.push(f.await);
    }
    out
}
