//! The key layout of one cluster in the metadata store, shared by coordinators and by workers
//! that talk to the store directly (`--store etcd://...`). docs/architecture.md has the table.

/// One key of the layout, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `workers/{id}`: WorkerInfo, under the worker's lease.
    Worker(String),
    /// `ready/{epoch}/{id}`: empty when the worker loaded the plan, else its load error.
    Ready(u64, String),
    /// `load/{id}`: LoadReport, under the worker's lease.
    Load(String),
    /// `drain/{id}`: present while the worker is being drained, under the worker's lease.
    Drain(String),
    /// `suspect/{id}`: a dispatcher could not reach the worker (value: who reported it).
    Suspect(String),
    /// `placement/{epoch:020}`: PlacementPlan, written once.
    Plan(u64),
    /// `placement/pending`: the epoch being loaded.
    Pending,
    /// `placement/current`: the committed epoch.
    Current,
    /// `placement/nccl/{epoch:020}/{group}`: the NCCL unique id rank 0 of the group made.
    NcclId(u64, String),
    /// `leader`: the leading coordinator's address, under its lease.
    Leader,
    /// `model/config.json` and `model/dir`: the model the cluster serves.
    ModelConfig,
    ModelDir,
}

/// Keys under `/expertmesh/{cluster}/`.
#[derive(Debug, Clone)]
pub struct ClusterKeys {
    root: String,
}

impl ClusterKeys {
    pub fn new(cluster: &str) -> Self {
        Self { root: format!("/expertmesh/{cluster}/") }
    }

    /// Prefix of every key of the cluster.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn k(&self, rest: &str) -> String {
        format!("{}{rest}", self.root)
    }

    pub fn worker(&self, id: &str) -> String {
        self.k(&format!("workers/{id}"))
    }

    pub fn workers(&self) -> String {
        self.k("workers/")
    }

    pub fn ready(&self, epoch: u64, id: &str) -> String {
        self.k(&format!("ready/{epoch:020}/{id}"))
    }

    pub fn ready_all(&self) -> String {
        self.k("ready/")
    }

    pub fn load(&self, id: &str) -> String {
        self.k(&format!("load/{id}"))
    }

    pub fn drain(&self, id: &str) -> String {
        self.k(&format!("drain/{id}"))
    }

    pub fn drains(&self) -> String {
        self.k("drain/")
    }

    pub fn suspect(&self, id: &str) -> String {
        self.k(&format!("suspect/{id}"))
    }

    pub fn plan(&self, epoch: u64) -> String {
        self.k(&format!("placement/{epoch:020}"))
    }

    /// Prefix of plans, `pending` and `current`.
    pub fn placement(&self) -> String {
        self.k("placement/")
    }

    pub fn nccl_id(&self, epoch: u64, group: &str) -> String {
        self.k(&format!("placement/nccl/{epoch:020}/{group}"))
    }

    pub fn nccl_ids(&self) -> String {
        self.k("placement/nccl/")
    }

    pub fn pending(&self) -> String {
        self.k("placement/pending")
    }

    pub fn current(&self) -> String {
        self.k("placement/current")
    }

    pub fn leader(&self) -> String {
        self.k("leader")
    }

    pub fn model_config(&self) -> String {
        self.k("model/config.json")
    }

    pub fn model_dir(&self) -> String {
        self.k("model/dir")
    }

    /// Which key this is, or None for keys outside the layout.
    pub fn parse(&self, key: &str) -> Option<Key> {
        let rest = key.strip_prefix(&self.root)?;
        let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
        match (head, tail) {
            ("workers", id) if !id.is_empty() => Some(Key::Worker(id.into())),
            ("load", id) if !id.is_empty() => Some(Key::Load(id.into())),
            ("drain", id) if !id.is_empty() => Some(Key::Drain(id.into())),
            ("suspect", id) if !id.is_empty() => Some(Key::Suspect(id.into())),
            ("ready", t) => {
                let (e, id) = t.split_once('/')?;
                Some(Key::Ready(e.parse().ok()?, id.into()))
            }
            ("placement", "pending") => Some(Key::Pending),
            ("placement", "current") => Some(Key::Current),
            ("placement", t) if t.starts_with("nccl/") => {
                let (e, g) = t["nccl/".len()..].split_once('/')?;
                (!g.is_empty()).then(|| Some(Key::NcclId(e.parse().ok()?, g.into())))?
            }
            ("placement", e) => e.parse().ok().map(Key::Plan),
            ("leader", "") => Some(Key::Leader),
            ("model", "config.json") => Some(Key::ModelConfig),
            ("model", "dir") => Some(Key::ModelDir),
            _ => None,
        }
    }
}

/// An epoch written as decimal text (`placement/pending`, `placement/current`).
pub fn parse_epoch(value: &[u8]) -> u64 {
    String::from_utf8_lossy(value).trim().parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_parse() {
        let k = ClusterKeys::new("c1");
        assert_eq!(k.parse(&k.worker("w-1")), Some(Key::Worker("w-1".into())));
        assert_eq!(k.parse(&k.ready(7, "w-1")), Some(Key::Ready(7, "w-1".into())));
        assert_eq!(k.parse(&k.load("w")), Some(Key::Load("w".into())));
        assert_eq!(k.parse(&k.drain("w")), Some(Key::Drain("w".into())));
        assert_eq!(k.parse(&k.suspect("w")), Some(Key::Suspect("w".into())));
        assert_eq!(k.parse(&k.plan(12)), Some(Key::Plan(12)));
        assert_eq!(k.parse(&k.pending()), Some(Key::Pending));
        assert_eq!(k.parse(&k.current()), Some(Key::Current));
        assert_eq!(k.parse(&k.nccl_id(4, "node-a")), Some(Key::NcclId(4, "node-a".into())));
        assert_eq!(k.parse(&format!("{}placement/nccl/4/", k.root())), None);
        assert_eq!(k.parse(&k.leader()), Some(Key::Leader));
        assert_eq!(k.parse(&k.model_config()), Some(Key::ModelConfig));
        assert_eq!(k.parse(&k.model_dir()), Some(Key::ModelDir));
        assert_eq!(k.parse("/expertmesh/other/workers/w"), None);
        assert_eq!(k.parse(&format!("{}placement/xyz", k.root())), None);
        assert_eq!(k.parse(&format!("{}workers/", k.root())), None);
    }
}
