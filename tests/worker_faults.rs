//! A worker dies (SIGKILL) or freezes (SIGSTOP) under steady traffic. A dispatcher that cannot
//! reach it reports it; the leader's own health check fails too and it revokes the lease at once
//! (a frozen worker's lease also just expires). The coordinator re-plans, survivors load the lost experts, and the rows in flight to it are retried
//! on the new owner. With a replica of every expert, rows fail over to the replica at once. Every
//! request gets its correct answer; nothing is lost. A frozen worker that lost its lease registers
//! again when it thaws and is planned back in, without restarting (through a coordinator, and
//! registered in etcd directly). Each test prints its figures.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::etcd::Etcd;
use common::*;
use expertmesh_core::config::PresetOverrides;
use expertmesh_core::dtype::DType;

const WORKER_ARGS: [&str; 4] = ["--rpc-timeout-ms", "1500", "--placement-wait-ms", "15000"];

enum Fault {
    Kill,
    Freeze,
}

/// The tests here judge how a fault is detected and how fast a cluster recovers, so they run one
/// at a time: six clusters of four processes on two cores at once change which detector fires
/// first (a dispatcher's report or the lease), and that is not what they test.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// `etcd`: the workers register in etcd directly instead of through the coordinator.
async fn fault_under_traffic(fault: Fault, replicas: &str, etcd: Option<&Etcd>) {
    let _serial = one_at_a_time().await;
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(96), ..Default::default() }, 71);
    let store = etcd.map(|e| format!("etcd://{}", e.endpoint()));
    let mut coord_args = vec!["--lease-ttl-ms", "2000", "--replicas", replicas];
    if let Some(s) = &store {
        coord_args.extend_from_slice(&["--store", s]);
    }
    let mut cluster = Cluster::coordinator_only(dir.path(), 3, &coord_args);
    for i in 0..3 {
        match &store {
            Some(s) => {
                cluster.add_store_worker(&format!("w{i}"), s, &[&WORKER_ARGS[..], &["--lease-ttl-ms", "2000"]].concat())
            }
            None => cluster.add_worker(&format!("w{i}"), &WORKER_ARGS),
        }
    }
    let cases = traffic_cases(dir.path(), &spec, 32, 6);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(cluster.moe_client(0).await, cases, spec.hidden, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = cluster.workers[2].child.id().to_string();
    let t_fault = Instant::now();
    let name = match fault {
        Fault::Kill => {
            let _ = cluster.workers[2].child.kill();
            "SIGKILL"
        }
        Fault::Freeze => {
            assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
            "SIGSTOP"
        }
    };
    // Until the re-plan without the lost worker is committed, then a little steady state.
    let t = Instant::now();
    loop {
        let s = status_json(&cluster.coordinator.addr);
        if s["current_epoch"].as_u64() >= Some(2) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no re-plan after the fault: {s}\n{}", cluster.dump_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t_replanned = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if let Fault::Freeze = fault {
        // Thawed, w2 finds its lease gone, registers again and is planned back in.
        assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
        let t = Instant::now();
        loop {
            let s = status_json(&cluster.coordinator.addr);
            if s["workers"].as_array().unwrap().len() == 3 && s["current_epoch"].as_u64() >= Some(3) {
                println!(
                    "w2 registered again and was planned back in {:.2} s after it thawed",
                    t.elapsed().as_secs_f64()
                );
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "w2 did not come back: {s}\n{}", cluster.dump_logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(cluster.workers[2].child.try_wait().unwrap().is_none(), "w2 resumed instead of exiting");
        let w2_log = std::fs::read_to_string(&cluster.workers[2].log).unwrap_or_default();
        assert!(w2_log.contains("registered again; serving on"), "{w2_log}");
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let rep = traffic.await.unwrap();
    let first_after = rep.log.iter().find(|(t, _, _)| *t > t_fault).map(|(t, _, _)| t.duration_since(t_fault));
    let first_new_epoch = rep.log.iter().find(|(_, _, e)| *e >= 2).map(|(t, _, _)| t.duration_since(t_fault));
    let steady = rep.p99_between(t_fault - Duration::from_millis(1400), t_fault);
    let during = rep.p99_between(t_fault, t_replanned + Duration::from_millis(500));
    println!(
        "{name} worker, replicas {replicas}: requests sent {}, answered correctly {}, failed with a clear error {}, lost 0; \
         first correct answer after the fault {:?}, first at the new epoch {:?}, re-planned after {:?}; \
         p99 steady {:?}, p99 during recovery {:?}; epochs {:?}",
        rep.sent,
        rep.correct,
        rep.failures.len(),
        first_after,
        first_new_epoch,
        t_replanned.duration_since(t_fault),
        steady,
        during,
        rep.epochs
    );
    rep.assert_all_correct(|| cluster.dump_logs());
    if let Fault::Kill = fault {
        // Detected through the dispatchers' reports and a failed health check, not the TTL.
        let log = std::fs::read_to_string(&cluster.coordinator.log).unwrap();
        assert!(log.contains("health check failed); lease revoked"), "{log}");
    }
    if let (Fault::Freeze, "1") = (&fault, replicas) {
        // Rows in flight to the frozen worker had nowhere else to go; the placement that removed
        // it cancelled them and they went to their new owner.
        let w0 = std::fs::read_to_string(&cluster.workers[0].log).unwrap();
        assert!(w0.contains("placement removed a worker with rows in flight; cancelling"), "{w0}");
    }
    assert!(rep.epochs.contains(&1) && rep.epochs.iter().any(|e| *e >= 2), "epochs {:?}", rep.epochs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_without_replicas_experts_reloaded_by_survivors() {
    fault_under_traffic(Fault::Kill, "1", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_with_replicas_fails_over_at_once() {
    fault_under_traffic(Fault::Kill, "2", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_times_out_and_its_rows_move() {
    fault_under_traffic(Fault::Freeze, "1", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_registered_in_etcd_loses_its_lease_and_comes_back() {
    let etcd = Etcd::start();
    fault_under_traffic(Fault::Freeze, "1", Some(&etcd)).await;
}

/// When no owner can come back within the request's deadline (the survivor has no room for the
/// lost experts), requests fail UNAVAILABLE naming the layer and the missing experts, never a
/// wrong answer; once a worker with room joins, the same requests are answered correctly again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_room_for_lost_experts_gives_a_clear_error_until_capacity_returns() {
    let _serial = one_at_a_time().await;
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides { hidden: Some(96), ..Default::default() }, 73);
    // Placement budgets an expert at its checkpoint bytes (bf16 here).
    let per_expert =
        expertmesh_dispatcher::Checkpoint::open(dir.path()).unwrap().expert_bytes(spec.moe_layers()[0]).unwrap();
    let total = (spec.moe_layers().len() * spec.n_routed) as f64 * per_expert as f64;
    // Room for 60% of the experts: two workers hold them all, one alone cannot.
    let gib = format!("{}", 0.6 * total / (1u64 << 30) as f64);
    let wargs = ["--memory-gib", gib.as_str(), "--placement-wait-ms", "1500"];
    let mut cluster = Cluster::coordinator_only(dir.path(), 2, &["--lease-ttl-ms", "2000"]);
    cluster.add_worker("w0", &wargs);
    cluster.add_worker("w1", &wargs);
    let cases = traffic_cases(dir.path(), &spec, 32, 2);
    let t = Instant::now();
    while status_json(&cluster.coordinator.addr)["current_epoch"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(30), "no first placement\n{}", cluster.dump_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = cluster.workers[1].child.kill();
    let mut c = cluster.moe_client(0).await;
    let forward = |c: &mut expertmesh_proto::v1::moe_layer_client::MoeLayerClient<_>, case: &Case| {
        use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor};
        use expertmesh_proto::v1::ForwardRequest;
        let (layer, x, ids, _) = case;
        let req = ForwardRequest {
            layer: *layer as u32,
            hidden_states: Some(f32_tensor(&[ids.len(), spec.hidden], x)),
            input_ids: Some(i64_tensor(&[ids.len()], ids)),
            wire_dtype: 0,
        };
        let mut c = c.clone();
        async move { c.forward(req).await }
    };
    let err = forward(&mut c, &cases[0]).await.expect_err("the survivor cannot hold every expert");
    println!("with w1 dead and no room on w0: {err}");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(
        err.message().contains(&format!("layer {} experts [", cases[0].0))
            && err.message().contains("could not be computed"),
        "names the layer and the experts: {}",
        err.message()
    );
    let log = std::fs::read_to_string(&cluster.coordinator.log).unwrap();
    assert!(log.contains("cannot place experts"), "the leader says why it cannot re-plan:\n{log}");
    // Capacity returns: requests are answered, and answered correctly.
    cluster.add_worker("w2", &wargs);
    let t = Instant::now();
    while status_json(&cluster.coordinator.addr)["current_epoch"].as_u64() < Some(2) {
        assert!(t.elapsed() < Duration::from_secs(30), "no re-plan with w2\n{}", cluster.dump_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for case in &cases {
        let r = forward(&mut c, case).await.expect("answered once capacity returns").into_inner();
        let (out, _) = expertmesh_dispatcher::wire::tensor_to_f32(r.output.as_ref().unwrap(), "output").unwrap();
        assert!(rel_l2_f32(&out, &case.3) < 1e-2);
    }
}

/// A request never waits past its own deadline: with a frozen worker holding experts nobody else
/// holds, a Forward with a 600 ms `grpc-timeout` ends by then (the transport's CANCELLED, or our
/// DEADLINE_EXCEEDED naming the missing experts), instead of waiting for a re-plan.
///
/// The first failed request reports the frozen worker; the leader's health check (1 s) then
/// revokes its lease and plans it out, so a later request may be answered in full. Such an answer
/// must come after the new epoch and be right; every call, answered or not, ends in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_never_waits_past_its_deadline() {
    let _serial = one_at_a_time().await;
    use expertmesh_dispatcher::wire::{f32_tensor, i64_tensor};
    use expertmesh_proto::v1::ForwardRequest;
    let (dir, spec) = gen_model("tiny-v3", DType::BF16, PresetOverrides::default(), 75);
    let cluster = Cluster::start(dir.path(), 2, &[]);
    wait_status(&cluster.coordinator.addr, Duration::from_secs(30), "first placement", |s| s["current_epoch"] == 1);
    let mut c = cluster.moe_client(0).await;
    let layer = spec.moe_layers()[0];
    let (x, ids) = random_input(&spec, 64, 5);
    let want = reference(dir.path(), &spec, layer, &x, 64, Some(&ids)).output;
    let req = || {
        let mut r = tonic::Request::new(ForwardRequest {
            layer: layer as u32,
            hidden_states: Some(f32_tensor(&[64, spec.hidden], &x)),
            input_ids: Some(i64_tensor(&[64], &ids)),
            wire_dtype: 0,
        });
        r.set_timeout(Duration::from_millis(600));
        r
    };
    c.forward(req()).await.expect("answered before the fault");
    let pid = cluster.workers[1].child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let mut failed = 0;
    for i in 0..8 {
        let t = Instant::now();
        let r = c.forward(req()).await;
        let took = t.elapsed();
        assert!(took < Duration::from_millis(900), "call {i} took {took:?}");
        match r {
            Err(e) => {
                println!("deadline 600 ms, frozen owner: {:?} after {took:?}: {}", e.code(), e.message());
                assert!(matches!(e.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{e}");
                if e.code() == tonic::Code::DeadlineExceeded {
                    assert!(e.message().contains("experts") && e.message().contains("deadline"), "{e}");
                }
                failed += 1;
            }
            Ok(r) => {
                // Only possible once the leader has planned the frozen worker out.
                assert!(i > 0, "the first request after the freeze was answered, yet only w1 holds some experts");
                let s = status_json(&cluster.coordinator.addr);
                assert!(s["current_epoch"].as_u64() >= Some(2), "answered without a re-plan: {s}");
                let out = r.into_inner().output.expect("an output tensor");
                let (out, _) = expertmesh_dispatcher::wire::tensor_to_f32(&out, "output").unwrap();
                let err = rel_l2_f32(&out, &want);
                println!("call {i} answered after the re-plan, rel L2 {err:.2e}");
                assert!(err < 1e-2, "answered wrongly after the re-plan: rel L2 {err}");
            }
        }
    }
    assert!(failed >= 1, "the frozen worker's experts were never missing");
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
}
