//! `expertmesh placement simulate`: the balancer offline, as a user runs it, with its JSON
//! checked for what the issue asks (shares summing to 1 per expert, both maps, bytes moved),
//! and bad input refused with what was wrong.

mod common;

use std::process::Command;

use common::cluster::BIN;
use expertmesh_core::balance::zipf_loads;

fn simulate(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN).arg("placement").arg("simulate").args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn simulate_balances_skewed_loads_and_reports_moves() {
    let dir = tempfile::tempdir().unwrap();
    let loads = zipf_loads(6, 64, 1.2, 1e5, 9);
    let lp = dir.path().join("loads.json");
    std::fs::write(&lp, serde_json::json!({ "loads": loads }).to_string()).unwrap();
    let l = lp.to_str().unwrap();
    let (ok, out, err) = simulate(&[
        "--loads",
        l,
        "--devices",
        "16",
        "--nodes",
        "2",
        "--slots-per-device",
        "5",
        "--groups",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy"], "hierarchical", "8 groups over 2 nodes");
    let (imb, even) = (v["imbalance"].as_f64().unwrap(), v["even_imbalance"].as_f64().unwrap());
    assert!(imb < even / 2.0 && imb >= 1.0, "{imb} vs {even}");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6);
    for layer in layers {
        let slots = layer["slots"].as_array().unwrap();
        assert_eq!(slots.len(), 80, "16 devices x 5 slots, all filled");
        let mut sum = vec![0.0; 64];
        for s in slots {
            sum[s["expert"].as_u64().unwrap() as usize] += s["share"].as_f64().unwrap();
        }
        assert!(sum.iter().all(|x| (x - 1.0).abs() < 1e-6), "{sum:?}");
        let p2l = layer["physical_to_logical"].as_array().unwrap();
        for (e, phys) in layer["logical_to_physical"].as_array().unwrap().iter().enumerate() {
            for p in phys.as_array().unwrap() {
                assert_eq!(p2l[p.as_u64().unwrap() as usize], e as u64, "the two maps agree");
            }
        }
        assert_eq!(layer["replicas"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>(), 80);
    }
    // From itself with the same loads: nothing moves.
    let cur = dir.path().join("current.json");
    std::fs::write(&cur, &out).unwrap();
    let c = cur.to_str().unwrap();
    let args =
        ["--loads", l, "--devices", "16", "--nodes", "2", "--slots-per-device", "5", "--groups", "8", "--from", c];
    let (ok, out, err) = simulate(&[&args[..], &["--json", "--expert-bytes", "1000"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["bytes_moved"], 0);
    // Text, and a heterogeneous cluster from YAML.
    let (ok, out, _) = simulate(&args);
    assert!(ok && out.contains("imbalance") && out.contains("0 B to load"), "{out}");
    let cy = dir.path().join("cluster.yaml");
    std::fs::write(
        &cy,
        "expert_bytes: 1048576\nredundant: 8\npools:\n  - {name: fast, nodes: 1, devices_per_node: 4, memory_gib: 1, throughput: 4}\n  - {name: slow, nodes: 2, devices_per_node: 2, memory_gib: 1, throughput: 1}\n",
    )
    .unwrap();
    let (ok, out, err) = simulate(&["--loads", l, "--cluster", cy.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let devs = v["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 8);
    assert!(v["imbalance"].as_f64().unwrap() < 1.3, "{}", v["imbalance"]);
    assert_eq!(v["layers"][0]["slots"].as_array().unwrap().len(), 72, "64 experts + 8 redundant");
}

#[test]
fn simulate_refuses_bad_input_saying_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let lp = dir.path().join("loads.json");
    let l = lp.to_str().unwrap();
    for (loads, says) in [
        ("{\"loads\": [[1, 2], [1, 2, 3]]}", "layer 1 has loads for 3 experts"),
        ("{\"loads\": []}", "no layers or no experts"),
        ("[1, 2]", "expected {\"loads\""),
        ("{\"loads\": [[1, -2]]}", "finite and non-negative"),
        ("{\"loads\": [[1e308, 1e308, 1]]}", "layer 0's loads sum past the largest number a float64 holds"),
    ] {
        std::fs::write(&lp, loads).unwrap();
        let (ok, _, err) = simulate(&["--loads", l, "--devices", "2", "--slots-per-device", "2"]);
        assert!(!ok && err.contains(says), "{loads}: {err}");
    }
    std::fs::write(&lp, "{\"loads\": [[1, 2, 3, 4]]}").unwrap();
    let (ok, _, err) = simulate(&["--loads", l]);
    assert!(!ok && err.contains("--devices N --nodes M --slots-per-device S"), "{err}");
    let (ok, _, err) = simulate(&["--loads", l, "--devices", "1", "--slots-per-device", "2"]);
    assert!(!ok && err.contains("need 4 slots; the devices hold 2"), "{err}");
    let (ok, _, err) = simulate(&["--loads", l, "--devices", "3", "--nodes", "2", "--slots-per-device", "2"]);
    assert!(!ok && err.contains("spread evenly"), "{err}");
    let cy = dir.path().join("c.yaml");
    std::fs::write(&cy, "pools:\n  - {nodes: 1, devices_per_node: 2, memory_gib: 1, throughput: 1, colour: red}\n")
        .unwrap();
    let (ok, _, err) = simulate(&["--loads", l, "--cluster", cy.to_str().unwrap()]);
    assert!(!ok && err.contains("colour") && err.contains("expected `pools:`"), "{err}");
    let (ok, _, err) = simulate(&["--loads", l, "--devices", "4", "--slots-per-device", "2", "--policy", "best"]);
    assert!(!ok && err.contains("expected auto, hierarchical or global"), "{err}");
}
