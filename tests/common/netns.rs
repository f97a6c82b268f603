//! A test host of our own: a network namespace joined to this one by a veth pair, so a worker
//! can be cut off the network (packets silently dropped, as in a real partition) and healed.
//! Needs root (CI runs as root) and iproute2's `ip`; without them the test fails and says so.

use std::process::Command;

pub struct NetNs {
    pub name: String,
    ns_if: String,
    host_if: String,
    /// This side's address on the link (reach the namespace's processes from here; they reach
    /// this side's servers at it).
    pub host_ip: String,
    /// The namespace's address.
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).output().map_err(|e| {
        format!("running `ip {}`: {e}; install iproute2 (`apt-get install -y iproute2`)", args.join(" "))
    })?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

impl NetNs {
    /// A fresh namespace and link, named after this process so runs never collide.
    pub fn create() -> Self {
        let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        assert_eq!(
            uid.as_deref().unwrap_or(""),
            "0",
            "the partition test makes a network namespace with `ip netns`, which needs root (CI runs as root)"
        );
        let pid = std::process::id();
        let (b, c) = (100 + pid % 100, (pid / 100) % 250);
        let n = NetNs {
            name: format!("emtest{pid}"),
            ns_if: format!("emn{pid}"),
            host_if: format!("emh{pid}"),
            host_ip: format!("10.{b}.{c}.1"),
            ns_ip: format!("10.{b}.{c}.2"),
        };
        let _ = ip(&["netns", "del", &n.name]);
        let _ = ip(&["link", "del", &n.host_if]);
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &n.name])?;
            ip(&["link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if])?;
            ip(&["link", "set", &n.ns_if, "netns", &n.name])?;
            ip(&["addr", "add", &format!("{}/30", n.host_ip), "dev", &n.host_if])?;
            ip(&["link", "set", &n.host_if, "up"])?;
            n.exec_ip(&["addr", "add", &format!("{}/30", n.ns_ip), "dev", &n.ns_if])?;
            n.exec_ip(&["link", "set", &n.ns_if, "up"])?;
            n.exec_ip(&["link", "set", "lo", "up"])
        };
        if let Err(e) = setup() {
            panic!("cannot build the test's network namespace: {e}");
        }
        n
    }

    fn exec_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["netns", "exec", &self.name, "ip"];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// `ip netns exec NAME program` as a Command to add arguments to.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Cut the link: from now on packets either way are dropped without an answer.
    pub fn cut(&self) {
        self.exec_ip(&["link", "set", &self.ns_if, "down"]).expect("cutting the link");
    }

    /// Bring the link back.
    pub fn heal(&self) {
        self.exec_ip(&["link", "set", &self.ns_if, "up"]).expect("healing the link");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
