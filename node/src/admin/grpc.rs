//! The node admin gRPC service (`tollgate.node.v1.NodeAdmin`, default 127.0.0.1:7070),
//! with `grpc.health.v1` and server reflection beside it. Raft's peer RPCs and cluster
//! membership join this server when the cluster lands.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_proto::node::v1::node_admin_server::{NodeAdmin, NodeAdminServer};
use tollgate_proto::node::v1::{StatusRequest, StatusResponse};
use tonic::{Request, Response, Status};

use crate::proxy::Shared;

pub struct AdminService {
    pub shared: Arc<Shared>,
    pub node_id: u64,
    pub region: String,
    pub proxy_addr: String,
    pub admin_addr: String,
}

#[tonic::async_trait]
impl NodeAdmin for AdminService {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let snapshot = self.shared.snapshot.load();
        Ok(Response::new(StatusResponse {
            node_id: self.node_id,
            region: self.region.clone(),
            spec_generation: snapshot.generation,
            routes: snapshot.routes.len() as u32,
            upstreams: snapshot.clusters.len() as u32,
            open_connections: self.shared.open_connections.load(Ordering::Relaxed) as u64,
            ready: self.shared.ready.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_string(),
            proxy_addr: self.proxy_addr.clone(),
            admin_addr: self.admin_addr.clone(),
        }))
    }
}

pub async fn serve(
    listener: TcpListener,
    service: AdminService,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeAdminServer<AdminService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tollgate_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(NodeAdminServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}
