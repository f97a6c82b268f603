//! Checks on what members send the control plane (registrations, load reports), whether it
//! comes through the gRPC API or straight into the store. Every refusal names the field, what
//! was wrong and what was expected.

use expertmesh_core::limits::{check_address, check_id, MAX_DEVICES, MAX_DEVICE_KIND_BYTES};
use expertmesh_core::ModelSpec;
use expertmesh_proto::v1::{LoadReport, WorkerInfo};

/// A registration a coordinator may accept: id and node are identifiers, the address is
/// `HOST:PORT`, devices are few and their figures finite and non-negative.
pub fn check_worker_info(info: &WorkerInfo) -> Result<(), String> {
    check_id("worker_id", &info.worker_id)?;
    check_address("address", &info.address)?;
    if !info.node.is_empty() {
        check_id("node", &info.node)?;
    }
    if info.version.len() > 64 || info.version.chars().any(char::is_control) {
        return Err(format!("version is {} bytes; expected up to 64 bytes of printable text", info.version.len()));
    }
    if info.devices.len() > MAX_DEVICES {
        return Err(format!("{} devices registered; the limit is {MAX_DEVICES}", info.devices.len()));
    }
    for (i, d) in info.devices.iter().enumerate() {
        if d.kind.is_empty()
            || d.kind.len() > MAX_DEVICE_KIND_BYTES
            || !d.kind.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(format!(
                "devices[{i}].kind `{}` is not a device kind; expected cpu, cuda or npu (up to {MAX_DEVICE_KIND_BYTES} letters or digits)",
                d.kind.escape_debug()
            ));
        }
        if !d.tflops.is_finite() || d.tflops < 0.0 || d.tflops > 1e6 {
            return Err(format!("devices[{i}].tflops is {}; expected a finite number in 0..=1e6", d.tflops));
        }
        if d.name.len() > 256 || d.name.chars().any(char::is_control) {
            return Err(format!(
                "devices[{i}].name is {} bytes{}; expected up to 256 bytes of printable text",
                d.name.len(),
                if d.name.chars().any(char::is_control) { " with control characters" } else { "" }
            ));
        }
    }
    Ok(())
}

/// A load report a coordinator may accept: at most one entry per (MoE layer, expert) of the
/// model, each naming a real one.
pub fn check_load_report(spec: &ModelSpec, r: &LoadReport) -> Result<(), String> {
    check_id("worker_id", &r.worker_id)?;
    let moe = spec.moe_layers();
    let max = moe.len().saturating_mul(spec.n_routed);
    if r.experts.len() > max {
        return Err(format!(
            "the load report has {} entries; the model has {max} (MoE layer, expert) pairs",
            r.experts.len()
        ));
    }
    if let Some(e) = r.experts.iter().find(|e| !moe.contains(&(e.layer as usize)) || e.expert as usize >= spec.n_routed)
    {
        return Err(format!(
            "the load report names layer {} expert {}; the model's MoE layers have experts 0..{}",
            e.layer, e.expert, spec.n_routed
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_proto::v1::{DeviceInfo, ExpertLoad};

    fn info() -> WorkerInfo {
        WorkerInfo {
            worker_id: "w1".into(),
            address: "127.0.0.1:7500".into(),
            node: "n1".into(),
            devices: vec![DeviceInfo {
                kind: "cpu".into(),
                index: 0,
                memory_bytes: 1 << 30,
                tflops: 1.0,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn registrations() {
        assert!(check_worker_info(&info()).is_ok());
        let mut i = info();
        i.address = "not a host port".into();
        assert!(check_worker_info(&i).unwrap_err().contains("HOST:PORT"));
        let mut i = info();
        i.worker_id = "x".repeat(1 << 20);
        assert!(check_worker_info(&i).unwrap_err().contains("limit is 128"));
        let mut i = info();
        i.devices[0].tflops = f64::NAN;
        assert!(check_worker_info(&i).unwrap_err().contains("tflops"));
        let mut i = info();
        i.devices = vec![i.devices[0].clone(); 65];
        assert!(check_worker_info(&i).unwrap_err().contains("limit is 64"));
    }

    #[test]
    fn load_reports() {
        let cfg = expertmesh_core::config::preset_config("tiny-v3", &Default::default()).unwrap();
        let spec = ModelSpec::from_config_json(&cfg.to_string()).unwrap();
        let l = spec.moe_layers()[0] as u32;
        let ok = LoadReport {
            worker_id: "w1".into(),
            epoch: 1,
            experts: vec![ExpertLoad { layer: l, expert: 3, tokens: u64::MAX }],
            ..Default::default()
        };
        assert!(check_load_report(&spec, &ok).is_ok(), "huge counts are fine: sums saturate");
        let mut bad = ok.clone();
        bad.experts[0].expert = 10_000;
        assert!(check_load_report(&spec, &bad).unwrap_err().contains("expert 10000"));
        let mut bad = ok.clone();
        bad.experts = vec![ok.experts[0]; 100_000];
        assert!(check_load_report(&spec, &bad).unwrap_err().contains("100000 entries"));
    }
}
