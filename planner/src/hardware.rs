//! The hardware catalog (a data file shipped with the binary, a source on every row) and the
//! inventory a user plans on: node pools of catalog or custom devices.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{PlanError, Precision, Result, GB};

/// The catalog shipped with ExpertMesh.
pub const CATALOG_YAML: &str = include_str!("../data/hardware.yaml");

/// One device: what memory, compute and links it brings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// gpu, npu or cpu.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub memory_gb: f64,
    pub memory_bw_tbs: f64,
    /// Dense peak TFLOP/s per precision; a precision left out is not supported in hardware.
    pub tflops: BTreeMap<Precision, f64>,
    pub scale_up_gbs: f64,
    #[serde(default = "one")]
    pub scale_up_domain: usize,
    #[serde(default = "one")]
    pub devices_per_node: usize,
    pub nic_gbps: f64,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub note: String,
}

fn default_kind() -> String {
    "gpu".into()
}

fn one() -> usize {
    1
}

impl DeviceSpec {
    /// The precision the device computes `p` in: `p` itself when it has hardware for it, else
    /// the next wider one it has (FP4 weights on an H100 compute as FP8; FP8 on a 910B as BF16).
    pub fn compute_precision(&self, p: Precision) -> Precision {
        let order: &[Precision] = match p {
            Precision::Fp4 => &[Precision::Fp4, Precision::Fp8, Precision::Int8, Precision::Bf16],
            Precision::Fp8 => &[Precision::Fp8, Precision::Bf16],
            Precision::Int8 => &[Precision::Int8, Precision::Bf16],
            Precision::Bf16 => &[Precision::Bf16],
        };
        order.iter().copied().find(|q| self.tflops.get(q).is_some_and(|t| *t > 0.0)).unwrap_or(Precision::Bf16)
    }

    /// Peak FLOP/s when computing weights stored in `p`.
    pub fn peak_flops(&self, p: Precision) -> f64 {
        let q = self.compute_precision(p);
        self.tflops.get(&q).copied().or_else(|| self.tflops.values().copied().reduce(f64::max)).unwrap_or(0.0) * 1e12
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str, v: f64| {
            Err(PlanError::Hardware(format!("device `{}`: {what} must be a positive number, got {v}", self.name)))
        };
        for (what, v) in [
            ("memory_gb", self.memory_gb),
            ("memory_bw_tbs", self.memory_bw_tbs),
            ("scale_up_gbs", self.scale_up_gbs),
            ("nic_gbps", self.nic_gbps),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return bad(what, v);
            }
        }
        if !self.tflops.values().any(|t| *t > 0.0) {
            return Err(PlanError::Hardware(format!(
                "device `{}`: tflops needs at least one positive entry (bf16, fp8, fp4, int8)",
                self.name
            )));
        }
        if self.devices_per_node == 0 {
            return Err(PlanError::Hardware(format!("device `{}`: devices_per_node must be at least 1", self.name)));
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> f64 {
        self.memory_gb * GB
    }
}

/// Known devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Catalog {
    pub devices: Vec<DeviceSpec>,
}

impl Catalog {
    /// The shipped catalog.
    pub fn builtin() -> Self {
        Self::parse(CATALOG_YAML).expect("the shipped hardware catalog parses")
    }

    pub fn parse(text: &str) -> Result<Self> {
        let c: Catalog =
            serde_yaml::from_str(text).map_err(|e| PlanError::Hardware(format!("catalog is not valid: {e}")))?;
        for d in &c.devices {
            d.check()?;
        }
        Ok(c)
    }

    /// A device by name or alias (case-insensitive).
    pub fn get(&self, name: &str) -> Result<&DeviceSpec> {
        let n = name.to_ascii_lowercase();
        self.devices
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(&n) || d.aliases.iter().any(|a| a.eq_ignore_ascii_case(&n)))
            .ok_or_else(|| {
                PlanError::Hardware(format!(
                    "unknown device `{name}`; the catalog has {} (or add it under `devices:` in the inventory)",
                    self.devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })
    }

    /// Add or replace devices (inventory `devices:` rows).
    pub fn extend(&mut self, devices: Vec<DeviceSpec>) -> Result<()> {
        for d in devices {
            d.check()?;
            self.devices.retain(|x| !x.name.eq_ignore_ascii_case(&d.name));
            self.devices.push(d);
        }
        Ok(())
    }
}

/// A pool's device: a catalog name, or a whole spec inline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceRef {
    Name(String),
    Spec(Box<DeviceSpec>),
}

/// One node pool as written in an inventory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub name: Option<String>,
    pub device: DeviceRef,
    pub nodes: usize,
    pub devices_per_node: Option<usize>,
    /// Per device, per direction, inside a node (GB/s); default: the device's scale-up.
    pub intra_node_gbs: Option<f64>,
    /// Per device, between nodes (Gb/s); default: the device's NIC.
    pub inter_node_gbps: Option<f64>,
}

/// An inventory file (YAML).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
    pub pools: Vec<PoolFile>,
}

/// A pool resolved against the catalog.
#[derive(Debug, Clone, Serialize)]
pub struct Pool {
    pub name: String,
    pub device: DeviceSpec,
    pub nodes: usize,
    pub devices_per_node: usize,
    pub intra_node_gbs: f64,
    pub inter_node_gbps: f64,
}

impl Pool {
    pub fn of(device: &DeviceSpec, nodes: usize) -> Self {
        Pool {
            name: device.name.clone(),
            device: device.clone(),
            nodes,
            devices_per_node: device.devices_per_node,
            intra_node_gbs: device.scale_up_gbs,
            inter_node_gbps: device.nic_gbps,
        }
    }

    pub fn devices(&self) -> usize {
        self.nodes * self.devices_per_node
    }

    /// Devices of this pool that share one scale-up fabric (a node, or a whole NVL72 / UB domain).
    pub fn scale_up_group(&self) -> usize {
        self.devices_per_node.max(self.device.scale_up_domain.min(self.devices()))
    }
}

/// What a plan runs on.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub pools: Vec<Pool>,
}

impl Inventory {
    /// Parse an inventory file; `catalog` gains the file's own devices.
    pub fn parse(text: &str, catalog: &mut Catalog) -> Result<Self> {
        let f: InventoryFile = serde_yaml::from_str(text).map_err(|e| {
            PlanError::Inventory(format!(
                "{e}; expected `pools:` (a list of {{device, nodes, devices_per_node?, intra_node_gbs?, inter_node_gbps?}}) and optionally `devices:`"
            ))
        })?;
        catalog.extend(f.devices)?;
        if f.pools.is_empty() {
            return Err(PlanError::Inventory("`pools:` is empty; expected at least one node pool".into()));
        }
        let mut pools = Vec::new();
        for (i, p) in f.pools.into_iter().enumerate() {
            let device = match p.device {
                DeviceRef::Name(n) => catalog.get(&n)?.clone(),
                DeviceRef::Spec(s) => {
                    s.check()?;
                    *s
                }
            };
            let name = p.name.unwrap_or_else(|| device.name.clone());
            if p.nodes == 0 {
                return Err(PlanError::Inventory(format!("pool {i} (`{name}`): nodes must be at least 1")));
            }
            let dpn = p.devices_per_node.unwrap_or(device.devices_per_node);
            if dpn == 0 {
                return Err(PlanError::Inventory(format!("pool `{name}`: devices_per_node must be at least 1")));
            }
            for (what, v) in [("intra_node_gbs", p.intra_node_gbs), ("inter_node_gbps", p.inter_node_gbps)] {
                if v.is_some_and(|x| !(x > 0.0 && x.is_finite())) {
                    return Err(PlanError::Inventory(format!("pool `{name}`: {what} must be positive")));
                }
            }
            pools.push(Pool {
                name,
                nodes: p.nodes,
                devices_per_node: dpn,
                intra_node_gbs: p.intra_node_gbs.unwrap_or(device.scale_up_gbs),
                inter_node_gbps: p.inter_node_gbps.unwrap_or(device.nic_gbps),
                device,
            });
        }
        Ok(Inventory { pools })
    }

    pub fn devices(&self) -> usize {
        self.pools.iter().map(Pool::devices).sum()
    }

    pub fn nodes(&self) -> usize {
        self.pools.iter().map(|p| p.nodes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_has_the_required_devices_each_with_a_source() {
        let c = Catalog::builtin();
        for name in ["h100", "h800", "h200", "b200", "gb200", "910b", "910c", "ascend-950", "cpu"] {
            let d = c.get(name).unwrap();
            assert!(!d.source.is_empty(), "{name} has no source");
        }
        assert!(c.devices.iter().all(|d| !d.source.is_empty()));
        let h200 = c.get("H200").unwrap();
        assert_eq!((h200.memory_gb, h200.memory_bw_tbs), (141.0, 4.8));
        assert_eq!(h200.compute_precision(Precision::Fp4), Precision::Fp8);
        assert_eq!(c.get("910b").unwrap().compute_precision(Precision::Fp8), Precision::Bf16);
        assert_eq!(c.get("b200").unwrap().compute_precision(Precision::Fp4), Precision::Fp4);
        let e = c.get("tpu-v9").unwrap_err().to_string();
        assert!(e.contains("tpu-v9") && e.contains("h200-sxm"), "{e}");
    }

    #[test]
    fn inventory_with_custom_devices_and_overrides() {
        let mut c = Catalog::builtin();
        let inv = Inventory::parse(
            r#"
devices:
  - {name: my-accel, memory_gb: 96, memory_bw_tbs: 2.0, tflops: {bf16: 400, fp8: 800}, scale_up_gbs: 200, nic_gbps: 200, devices_per_node: 4, source: "vendor sheet"}
pools:
  - {device: h200, nodes: 2, inter_node_gbps: 800}
  - name: inline
    device: {name: box, memory_gb: 32, memory_bw_tbs: 1, tflops: {bf16: 100}, scale_up_gbs: 64, nic_gbps: 100}
    nodes: 3
    devices_per_node: 2
  - {device: my-accel, nodes: 1}
"#,
            &mut c,
        )
        .unwrap();
        assert_eq!(inv.devices(), 16 + 6 + 4);
        assert_eq!(inv.pools[0].inter_node_gbps, 800.0);
        assert_eq!(inv.pools[0].intra_node_gbs, 450.0);
        assert_eq!(inv.pools[1].name, "inline");
        assert_eq!(inv.pools[2].device.memory_gb, 96.0);
    }

    #[test]
    fn bad_inventories_say_what_was_expected() {
        let mut c = Catalog::builtin();
        let e = Inventory::parse("pools: []", &mut c).unwrap_err().to_string();
        assert!(e.contains("at least one node pool"), "{e}");
        let e = Inventory::parse("pools:\n  - {device: h300, nodes: 1}", &mut c).unwrap_err().to_string();
        assert!(e.contains("unknown device `h300`"), "{e}");
        let e = Inventory::parse("pools:\n  - {device: h200, nodes: 0}", &mut c).unwrap_err().to_string();
        assert!(e.contains("nodes must be at least 1"), "{e}");
        let e = Inventory::parse("pools:\n  - {device: h200, nodez: 1}", &mut c).unwrap_err().to_string();
        assert!(e.contains("nodez"), "{e}");
        let e = Inventory::parse(
            "devices:\n  - {name: x, memory_gb: -1, memory_bw_tbs: 1, tflops: {bf16: 1}, scale_up_gbs: 1, nic_gbps: 1}\npools:\n  - {device: x, nodes: 1}",
            &mut c,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory_gb must be a positive number"), "{e}");
    }
}
