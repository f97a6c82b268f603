//! A real etcd on free loopback ports with a temporary data directory, stopped when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    pub data: tempfile::TempDir,
    log: std::path::PathBuf,
    /// Serve clients over TLS with this certificate directory (`expertmesh certs` layout),
    /// requiring client certificates of its CA (etcd's `--client-cert-auth`).
    tls: Option<std::path::PathBuf>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Start etcd; fails (never skips) when the binary is missing.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Start etcd serving clients over TLS only, with `certs/etcd.pem` and client certificate
    /// authentication against `certs/ca.pem`.
    pub fn start_tls(certs: &std::path::Path) -> Self {
        Self::start_inner(Some(certs.to_path_buf()))
    }

    fn start_inner(tls: Option<std::path::PathBuf>) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut e = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            log: data.path().join("etcd.log"),
            data,
            tls,
        };
        e.spawn();
        e
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let bin = which_etcd();
        let (c, p) = (self.client_port, self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new(bin);
        if let Some(d) = &self.tls {
            cmd.arg("--cert-file").arg(d.join("etcd.pem"));
            cmd.arg("--key-file").arg(d.join("etcd-key.pem"));
            cmd.arg("--trusted-ca-file").arg(d.join("ca.pem"));
            cmd.arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "test", "--data-dir"])
            .arg(self.data.path().join("data"))
            .args(["--listen-client-urls", &format!("{scheme}://127.0.0.1:{c}")])
            .args(["--advertise-client-urls", &format!("{scheme}://127.0.0.1:{c}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args(["--initial-cluster", &format!("test=http://127.0.0.1:{p}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", c)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "etcd did not listen:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL etcd (its data stays for a restart).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn which_etcd() -> std::path::PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join("etcd");
        if p.is_file() {
            return p;
        }
    }
    panic!("etcd not found on PATH: install it with `apt-get install -y etcd-server` (`make test` runs scripts/install-deps.sh, which does)");
}
