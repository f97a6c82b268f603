//! Prometheus metrics of a live cluster: scraped over HTTP, parsed, checked against what the
//! test itself sent (tokens, rows per expert from the answers' routing, errors), and passed
//! through `promtool check metrics`.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;
use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor, tensor_to_i64};
use expertmesh_proto::v1::{DType as PDType, ForwardRequest};

/// `name{labels}` -> value, every sample of the text; panics on a malformed line.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (k, v) = line.rsplit_once(' ').unwrap_or_else(|| panic!("malformed sample `{line}`"));
        let v: f64 = match v {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of `{line}`")),
        };
        assert!(out.insert(k.to_string(), v).is_none(), "duplicate sample {k}");
    }
    out
}

fn promtool(text: &str) {
    let mut c = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool not found: install it with `apt-get install -y prometheus` (`make test` runs scripts/install-deps.sh, which does)");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}\n{text}");
}

fn sum_where(m: &HashMap<String, f64>, prefix: &str) -> f64 {
    m.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_cluster_exposes_metrics_that_match_its_traffic() {
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 91);
    let (pc, p0, p1) = (free_port(), free_port(), free_port());
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &["--metrics-listen", &format!("127.0.0.1:{pc}")]);
    cluster.add_worker("w0", &["--metrics-listen", &format!("127.0.0.1:{p0}")]);
    cluster.add_worker("w1", &["--metrics-listen", &format!("127.0.0.1:{p1}")]);
    let mut client = cluster.moe_client(0).await;
    let layer = spec.moe_layers()[0];
    let tokens = 20;
    let mut routed: HashMap<i64, f64> = HashMap::new();
    let t = Instant::now();
    let mut sent = 0;
    while sent < 5 {
        let (x, ids) = random_input(&spec, tokens, 700 + sent);
        let req = ForwardRequest {
            layer: layer as u32,
            hidden_states: Some(f32_tensor(&[tokens, spec.hidden], &x)),
            input_ids: Some(i64_tensor(&[tokens], &ids)),
            wire_dtype: PDType::DtypeBf16 as i32,
        };
        match client.forward(req).await {
            Ok(r) => {
                let (idx, _) = tensor_to_i64(r.get_ref().topk_indices.as_ref().unwrap(), "topk_indices").unwrap();
                for e in idx {
                    *routed.entry(e).or_default() += 1.0;
                }
                sent += 1;
            }
            Err(s) => {
                // Only before the first placement commits.
                assert!(t.elapsed() < Duration::from_secs(30), "{s:?}\n{}", cluster.dump_logs());
                panic!("Forward failed: {s:?}");
            }
        }
    }
    // One bad request: counted as an error by class.
    let bad = ForwardRequest {
        layer: 999,
        hidden_states: Some(f32_tensor(&[1, spec.hidden], &vec![0.0; spec.hidden])),
        input_ids: None,
        wire_dtype: PDType::DtypeBf16 as i32,
    };
    assert_eq!(client.forward(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Load reports and counters settle within a second.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut per_worker = Vec::new();
    for port in [p0, p1] {
        let (status, body) = get(port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        promtool(&body);
        per_worker.push(parse(&body));
    }
    let w0 = &per_worker[0];
    let l = layer.to_string();
    assert_eq!(w0["expertmesh_forward_duration_seconds_count"], 6.0, "5 answered + 1 refused");
    assert_eq!(w0["expertmesh_forward_duration_seconds_bucket{le=\"+Inf\"}"], 6.0);
    assert_eq!(w0[&format!("expertmesh_dispatched_tokens_total{{layer=\"{l}\"}}")], (5 * tokens) as f64);
    assert_eq!(w0[&format!("expertmesh_dispatched_rows_total{{layer=\"{l}\"}}")], (5 * tokens * spec.top_k) as f64);
    assert_eq!(w0["expertmesh_errors_total{service=\"MoeLayer.Forward\",code=\"InvalidArgument\"}"], 1.0);
    assert!(w0["expertmesh_dispatched_bytes_total{direction=\"sent\"}"] > 0.0);
    // Rows per expert, summed over the workers, equal the routing the answers reported.
    for (e, n) in &routed {
        let key = format!("expertmesh_expert_rows_total{{layer=\"{l}\",expert=\"{e}\"}}");
        let got: f64 = per_worker.iter().map(|m| m.get(&key).copied().unwrap_or(0.0)).sum();
        assert_eq!(got, *n, "rows of expert {e}");
    }
    let total: f64 = per_worker.iter().map(|m| sum_where(m, "expertmesh_expert_rows_total")).sum();
    assert_eq!(total, (5 * tokens * spec.top_k) as f64, "no row counted twice or lost");
    for m in &per_worker {
        assert!(m["expertmesh_placement_epoch"] >= 1.0);
        assert_eq!(m["expertmesh_lease_held"], 1.0);
        assert_eq!(m["expertmesh_serving{service=\"expertmesh.v1.ExpertService\"}"], 1.0);
        assert!(m["expertmesh_resident_bytes"] > 0.0);
        assert!(m["expertmesh_compute_duration_seconds_count"] > 0.0);
        // Buckets are cumulative.
        let mut buckets: Vec<(f64, f64)> = m
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix("expertmesh_compute_duration_seconds_bucket{le=\"")?.strip_suffix("\"}")?;
                Some((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    }

    // `status --json` carries each worker's per-expert rows (from its load reports, every second).
    let t = Instant::now();
    loop {
        let v = status_json(&cluster.coordinator.addr);
        let rows: u64 = v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|w| w["expert_loads"].as_array().unwrap().clone())
            .filter(|e| e["layer"].as_u64() == Some(layer as u64))
            .map(|e| e["tokens"].as_u64().unwrap())
            .sum();
        if rows == (5 * tokens * spec.top_k) as u64 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "status expert loads: {rows}\n{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = get(pc, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    promtool(&body);
    let c = parse(&body);
    assert_eq!(c["expertmesh_leader"], 1.0);
    assert_eq!(c["expertmesh_store_reachable"], 1.0);
    assert!(c["expertmesh_placement_epoch"] >= 1.0);
    assert_eq!(c["expertmesh_workers{state=\"registered\"}"], 2.0);
    assert_eq!(c["expertmesh_workers{state=\"ready\"}"], 2.0);
    // The health states over HTTP too (kubelet probes: plaintext even where gRPC is mutual TLS).
    let ok = ("HTTP/1.1 200 OK".to_string(), "SERVING\n".to_string());
    for path in ["/readyz", "/livez", "/health/expertmesh.v1.Coordinator", "/health/expertmesh.v1.Coordinator.leader"] {
        assert_eq!(get(pc, path), ok, "coordinator {path}");
    }
    for port in [p0, p1] {
        for path in ["/readyz", "/livez", "/health/expertmesh.v1.MoeLayer", "/health/expertmesh.v1.ExpertService"] {
            assert_eq!(get(port, path), ok, "worker {path}");
        }
        let (status, body) = get(port, "/health/expertmesh.v1.Nope");
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert!(body.contains("no health service `expertmesh.v1.Nope`"), "{body}");
    }
    // Anything else is refused plainly.
    let (status, body) = get(pc, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(body.contains("/metrics, /readyz, /livez"), "{body}");
}
