//! Members that are not `expertmesh` processes: a registration kept alive by hand, and a
//! server that only answers its health check (for tests of what the coordinator trusts).

use std::time::Duration;

use expertmesh_proto::v1::coordinator_client::CoordinatorClient;
use expertmesh_proto::v1::{HeartbeatRequest, RegisterRequest, WorkerInfo};
use tonic::transport::Channel;

pub async fn coordinator(addr: &str) -> CoordinatorClient<Channel> {
    CoordinatorClient::connect(format!("http://{addr}")).await.unwrap()
}

/// Register `info` and keep its lease alive until the task is aborted.
pub async fn register_and_heartbeat(c: &mut CoordinatorClient<Channel>, w: WorkerInfo) -> tokio::task::JoinHandle<()> {
    let r = c.register(RegisterRequest { worker: Some(w.clone()), epoch: 0 }).await.unwrap().into_inner();
    let mut c = c.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = c.heartbeat(HeartbeatRequest { worker_id: w.worker_id.clone(), lease_id: r.lease_id }).await;
        }
    })
}

/// A gRPC server that answers its health check as an ExpertService would, and nothing else:
/// a member that looks alive and never loads anything.
pub async fn healthy_looking_server() -> (String, tokio::task::JoinHandle<()>) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("expertmesh.v1.ExpertService", tonic_health::ServingStatus::Serving).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let _reporter = reporter;
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await;
    });
    (addr, task)
}
