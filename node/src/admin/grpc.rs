//! The node's gRPC server (default 127.0.0.1:7070): the node admin API
//! (`tollgate.node.v1.NodeAdmin`), node-to-node Raft (`tollgate.raft.v1.Raft`),
//! `grpc.health.v1` and server reflection.
//!
//! Admin calls that change the cluster run on the leader; any node accepts them and
//! forwards (see [`crate::raft::cluster`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_proto::actor::v1::actors_server::ActorsServer;
use tollgate_proto::node::v1::node_admin_server::{NodeAdmin, NodeAdminServer};
use tollgate_proto::node::v1::*;
use tollgate_proto::raft::v1::raft_server::RaftServer;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::auth::principal::Caller;
use crate::proxy::Shared;
use crate::raft::cluster::{AS_NODE_METADATA, Cluster, FORWARDED_METADATA};
use crate::raft::network::MAX_MESSAGE_BYTES;

pub struct AdminService {
    pub actors: Arc<crate::actor::Actors>,
    pub shared: Arc<Shared>,
    pub cluster: Arc<Cluster>,
    pub region: String,
    pub proxy_addr: String,
    pub admin_addr: String,
    /// This node's call log (None: `--call-log false`).
    pub calls: Option<Arc<crate::calls::CallLog>>,
}

impl AdminService {
    /// A circuit names an upstream cluster this node serves.
    fn check_upstream(&self, name: &str) -> Result<(), Status> {
        let snapshot = self.shared.snapshot.load();
        let clusters = &snapshot.routing.clusters;
        if clusters.iter().any(|c| &*c.name == name) {
            return Ok(());
        }
        let known: Vec<&str> = clusters.iter().map(|c| &*c.name).take(20).collect();
        Err(Status::not_found(format!(
            "no upstream {name:?}; upstreams: [{}] (an API version's are named api@version/upstream)",
            known.join(", ")
        )))
    }
}

impl AdminService {
    /// Who the caller's certificate says it is (None: no certificate, or not a node).
    fn peer_node<T>(&self, req: &Request<T>) -> Option<u64> {
        let certs = req.peer_certs();
        let subject = self.cluster.state_machine.read(|a| {
            self.cluster
                .identity
                .peer(certs.as_deref().map(Vec::as_slice), &a.state.access)
        });
        match subject {
            Ok(crate::identity::ca::Subject::Node(id)) => Some(id),
            _ => None,
        }
    }

    /// The caller's certificate is node `claimed`'s.
    fn require_node<T>(&self, req: &Request<T>, claimed: u64, what: &str) -> Result<(), Status> {
        let certs = req.peer_certs();
        self.cluster.state_machine.read(|a| {
            self.cluster.identity.require_node(
                certs.as_deref().map(Vec::as_slice),
                &a.state.access,
                claimed,
                what,
            )
        })
    }

    /// Whether another node forwarded this request (it is then never forwarded again).
    /// Taken from a node's certificate only; with `--insecure-cluster`, at its word.
    fn forwarded<T>(&self, req: &Request<T>) -> bool {
        req.metadata().contains_key(FORWARDED_METADATA)
            && (!self.cluster.identity.secure || self.peer_node(req).is_some())
    }

    /// Who is calling: a token's holder, or a node writing on its own behalf (known by its
    /// certificate; with `--insecure-cluster`, by the id it sends).
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let m = req.metadata();
        if m.contains_key("authorization") || !m.contains_key(AS_NODE_METADATA) {
            return Ok(Caller::from_metadata(m));
        }
        let claimed: u64 = m
            .get(AS_NODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("{AS_NODE_METADATA} must be a node id"))
            })?;
        if !self.cluster.identity.secure {
            return Ok(Caller::Peer(claimed));
        }
        match self.peer_node(req) {
            Some(id) if id == claimed => Ok(Caller::Peer(id)),
            _ => Err(Status::unauthenticated(format!(
                "{AS_NODE_METADATA} is for a node's own writes, sent with its cluster \
                 certificate; clients send a token in `authorization`"
            ))),
        }
    }
}

#[tonic::async_trait]
impl NodeAdmin for AdminService {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let snapshot = self.shared.snapshot.load();
        Ok(Response::new(StatusResponse {
            node_id: self.cluster.id,
            region: self.region.clone(),
            spec_generation: snapshot.generation,
            routes: snapshot.routing.routes.len() as u32,
            upstreams: snapshot.routing.clusters.len() as u32,
            open_connections: self.shared.open_connections.load(Ordering::Relaxed) as u64,
            ready: self.shared.ready.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_string(),
            proxy_addr: self.proxy_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            applied_generation: self.cluster.state_machine.read(|a| a.state.generation),
        }))
    }

    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(self.cluster.status()))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // A member forwarding a join has checked the joiner's certificate itself.
        let fwd = self.forwarded(&req);
        if !fwd {
            self.require_node(&req, req.get_ref().node_id, "this join")?;
        }
        Ok(Response::new(
            self.cluster.join(req.into_inner(), fwd).await?,
        ))
    }

    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let fwd = self.forwarded(&req);
        let certs = req.peer_certs();
        let peer = self
            .cluster
            .state_machine
            .read(|a| {
                self.cluster
                    .identity
                    .peer(certs.as_deref().map(Vec::as_slice), &a.state.access)
            })
            .ok();
        Ok(Response::new(
            self.cluster.enroll(req.into_inner(), fwd, peer).await?,
        ))
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster.remove(req.into_inner(), fwd, &caller).await?,
        ))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let fwd = self.forwarded(&req);
        // An operator, or the node itself (its certificate); a member forwarding a leave
        // has checked the leaver's.
        let caller = if req.metadata().contains_key("authorization") {
            let caller = self.caller(&req)?;
            self.cluster
                .principal(&caller)?
                .require_operator("taking a node out of the cluster")?;
            caller
        } else {
            if !fwd {
                self.require_node(&req, req.get_ref().node_id, "leaving")?;
            }
            Caller::Node
        };
        Ok(Response::new(
            self.cluster.leave(req.into_inner(), fwd, &caller).await?,
        ))
    }

    async fn apply_spec(
        &self,
        req: Request<ApplySpecRequest>,
    ) -> Result<Response<ApplySpecResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster
                .apply_spec(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn read_spec(
        &self,
        req: Request<ReadSpecRequest>,
    ) -> Result<Response<ReadSpecResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster
                .read_spec(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        if let Some(tollgate_proto::state::v1::command::Kind::Circuit(c)) =
            req.get_ref().command.as_ref().and_then(|c| c.kind.as_ref())
        {
            self.check_upstream(&c.upstream)?;
        }
        Ok(Response::new(
            self.cluster
                .write_command(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn list_tenants(
        &self,
        req: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster
                .list_tenants(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn list_subscriptions(
        &self,
        req: Request<ListSubscriptionsRequest>,
    ) -> Result<Response<ListSubscriptionsResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster
                .list_subscriptions(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn list_credentials(
        &self,
        req: Request<ListCredentialsRequest>,
    ) -> Result<Response<ListCredentialsResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster
                .list_credentials(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster.audit(req.into_inner(), fwd, &caller).await?,
        ))
    }

    async fn list_apis(
        &self,
        req: Request<ListApisRequest>,
    ) -> Result<Response<ListApisResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster
                .list_apis(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster.usage(req.into_inner(), fwd, &caller).await?,
        ))
    }

    async fn history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        self.cluster
            .principal(&self.caller(&req)?)?
            .require_operator("the change history")?;
        Ok(Response::new(HistoryResponse {
            changes: self.cluster.history(),
        }))
    }

    async fn rollouts(
        &self,
        req: Request<RolloutsRequest>,
    ) -> Result<Response<RolloutsResponse>, Status> {
        let (fwd, caller) = (self.forwarded(&req), self.caller(&req)?);
        Ok(Response::new(
            self.cluster
                .rollouts(req.into_inner(), fwd, &caller)
                .await?,
        ))
    }

    async fn query_calls(
        &self,
        req: Request<CallQuery>,
    ) -> Result<Response<CallQueryResponse>, Status> {
        let principal = self.cluster.principal(&self.caller(&req)?)?;
        let mut q = req.into_inner();
        if let Some(tenant) = principal.tenant() {
            if !q.tenant.is_empty() && q.tenant != tenant {
                return Err(Status::permission_denied(format!(
                    "a token of tenant {tenant} sees only its own calls; leave out --tenant or give {tenant}"
                )));
            }
            q.tenant = tenant.to_string();
        }
        let Some(calls) = &self.calls else {
            return Err(Status::failed_precondition(format!(
                "node {} runs with --call-log false: it keeps no call log",
                self.cluster.id
            )));
        };
        let calls = calls.clone();
        // Reads the store: off the async workers.
        tokio::task::spawn_blocking(move || calls.query(&q))
            .await
            .map_err(|e| Status::internal(format!("the call log query failed: {e}")))?
            .map(Response::new)
    }

    async fn list_circuits(
        &self,
        req: Request<ListCircuitsRequest>,
    ) -> Result<Response<ListCircuitsResponse>, Status> {
        self.cluster.principal(&self.caller(&req)?)?;
        let (circuits, generation) = self
            .cluster
            .state_machine
            .read(|a| (a.state.circuits.clone(), a.state.generation));
        Ok(Response::new(ListCircuitsResponse {
            circuits: circuits.values().cloned().collect(),
            generation,
            now_ms: crate::actor::wall_ms(),
        }))
    }

    async fn set_faults(
        &self,
        req: Request<SetFaultsRequest>,
    ) -> Result<Response<SetFaultsResponse>, Status> {
        let faults = &self.cluster.peers.faults;
        if !faults.enabled {
            return Err(Status::failed_precondition(
                "fault injection is off; start the node with --enable-fault-injection (tests only)",
            ));
        }
        let peers = req.into_inner().isolate_from;
        tracing::warn!(
            ?peers,
            "fault injection: dropping Raft traffic to and from these nodes"
        );
        faults.set_isolated(peers);
        Ok(Response::new(SetFaultsResponse {}))
    }
}

/// The node's own gRPC services, as registered below: reflection lists them and
/// `tollgate dev`'s banner names them from this list.
pub const SERVICES: [&str; 3] = [
    <NodeAdminServer<AdminService> as NamedService>::NAME,
    <RaftServer<crate::raft::service::RaftService> as NamedService>::NAME,
    <ActorsServer<crate::actor::ActorService> as NamedService>::NAME,
];

/// The standard services beside them, on the node and on the control plane.
pub const STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

pub async fn serve(
    listener: TcpListener,
    service: AdminService,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let raft = service.cluster.raft_service();
    let actors = service.actors.service(&service.cluster);
    let identity = service.cluster.identity.clone();
    let gate = service.cluster.clone();
    // The largest admin message: a spec (or a version's content) at --max-spec-bytes, and
    // room for the rest of the request.
    let max_admin = service.cluster.max_spec_bytes + 256 * 1024;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeAdminServer<AdminService>>().await;
    // Reflection lists exactly what this server serves; v1alpha too, since grpcurl and
    // Python's grpcio-reflection still ask for it.
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tollgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in SERVICES.into_iter().chain(STANDARD_SERVICES) {
            b = b.with_service_name(name);
        }
        b
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;
    let server = tonic::transport::Server::builder()
        // Admin calls are traced (continuing the caller's traceparent); Raft and actor
        // exchanges, many per second, are not.
        .trace_fn(|req| {
            crate::telemetry::traces::grpc_server_span(req, &["tollgate.node.v1.NodeAdmin"])
        })
        .layer(SayWhatToChange::layer(NODE_GRPC))
        .layer(Gatekeeper::layer(gate))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            NodeAdminServer::new(service)
                .max_decoding_message_size(max_admin)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(actors)
        .add_service(
            RaftServer::new(raft)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    if identity.secure {
        let config = identity
            .tls
            .server_config()
            .map_err(|e| anyhow::anyhow!(e))?;
        let incoming = crate::identity::tls::incoming(listener, config, shutdown.clone());
        server
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await?;
    } else {
        server
            .serve_with_incoming_shutdown(
                // Raft and admin messages are small request/response pairs: no Nagle delay.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown.cancelled_owned(),
            )
            .await?;
    }
    Ok(())
}

/// Refuses a call before its body is read when its caller cannot be allowed it: node-to-
/// node calls (Raft, actor exchanges, Join) without a member's certificate, and the state
/// calls without a token (or a member's certificate). A caller without credentials then
/// never makes the node allocate for a message it sent.
#[derive(Clone)]
pub struct Gatekeeper<S> {
    inner: S,
    cluster: Arc<Cluster>,
}

impl<S> Gatekeeper<S> {
    pub fn layer(cluster: Arc<Cluster>) -> impl tower::Layer<S, Service = Gatekeeper<S>> + Clone {
        tower::layer::layer_fn(move |inner| Gatekeeper {
            inner,
            cluster: cluster.clone(),
        })
    }
}

/// What a call must carry before its body is read.
enum Needs {
    Nothing,
    /// A member's certificate.
    Member,
    /// A token, or a member's certificate.
    TokenOrMember,
}

fn needs(path: &str) -> Needs {
    if path.starts_with("/tollgate.raft.v1.Raft/")
        || path.starts_with("/tollgate.actor.v1.Actors/")
        || path == "/tollgate.node.v1.NodeAdmin/Join"
    {
        return Needs::Member;
    }
    match path.strip_prefix("/tollgate.node.v1.NodeAdmin/") {
        Some("Status" | "ClusterStatus" | "Enroll" | "SetFaults") | None => Needs::Nothing,
        Some(_) => Needs::TokenOrMember,
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Gatekeeper<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let need = needs(req.uri().path());
        // Whether the caller is a member, by its certificate (why not, when it is not).
        let member = || -> Result<(), Status> {
            let certs =
                req.extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<
                        tonic::transport::server::TcpConnectInfo,
                    >>()
                    .and_then(|i| i.peer_certs());
            let subject = self.cluster.state_machine.read(|a| {
                self.cluster
                    .identity
                    .peer(certs.as_deref().map(Vec::as_slice), &a.state.access)
            })?;
            match subject {
                crate::identity::ca::Subject::Node(_) => Ok(()),
                other => Err(Status::permission_denied(format!(
                    "{other}'s certificate does not speak for a node"
                ))),
            }
        };
        let secure = self.cluster.identity.secure;
        let refusal = match need {
            Needs::Nothing => None,
            Needs::Member if secure => member().err(),
            Needs::TokenOrMember
                if !(req.headers().contains_key("authorization")
                    || (secure && member().is_ok())) =>
            {
                Some(Status::unauthenticated(
                    "this call needs a token: send `authorization: Bearer <token>` (the \
                     operator token printed at bootstrap, or a tenant token from `tollgate token \
                     create`)",
                ))
            }
            _ => None,
        };
        if let Some(status) = refusal {
            metrics::counter!("tollgate_grpc_refused_before_body_total").increment(1);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let fut = self.inner.call(req);
        Box::pin(fut)
    }
}

/// Turns tonic's bare answers into ones that say what to change:
///
/// - a request body that is not the protobuf message the method takes is the caller's
///   mistake: INVALID_ARGUMENT, not the INTERNAL that tonic's codec answers with;
/// - a call to a service this server does not serve (UNIMPLEMENTED with an empty message)
///   says which server this is and where the asked-for service is: a CLI pointed at the
///   wrong port learns which port it needs.
///
/// Used by the node's and the control plane's gRPC servers.
#[derive(Clone)]
pub struct SayWhatToChange<S> {
    inner: S,
    /// Which server this is and what it serves, e.g. "a Tollgate node's gRPC port".
    this: &'static str,
}

impl<S> SayWhatToChange<S> {
    pub fn layer(this: &'static str) -> impl tower::Layer<S, Service = SayWhatToChange<S>> + Clone {
        tower::layer::layer_fn(move |inner| SayWhatToChange { inner, this })
    }
}

/// Where a gRPC service is served, by its package, for UNIMPLEMENTED answers.
fn served_at(service: &str) -> &'static str {
    if service.starts_with("tollgate.cp.") {
        "the control plane serves it (`tollgate dev` runs one at 127.0.0.1:7080; `--cp`, TOLLGATE_CP)"
    } else if service.starts_with("tollgate.") {
        "a node's gRPC port serves it (127.0.0.1:7070 under `tollgate dev`; `--node`, TOLLGATE_NODE)"
    } else {
        "it is not a Tollgate service"
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for SayWhatToChange<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let service = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let this = self.this;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let headers = resp.headers_mut();
            let status = headers.get("grpc-status").cloned();
            let message = headers.get("grpc-message").cloned();
            let decode_error = status.as_ref().is_some_and(|s| s == "13")
                && message.as_ref().is_some_and(|m| {
                    let m = m.as_bytes();
                    m.starts_with(b"failed to decode Protobuf message")
                        || m.starts_with(b"failed%20to%20decode%20Protobuf%20message")
                });
            if decode_error {
                headers.insert("grpc-status", http::HeaderValue::from_static("3"));
            }
            let bare_unimplemented = status.as_ref().is_some_and(|s| s == "12")
                && message.as_ref().is_none_or(|m| m.is_empty());
            if bare_unimplemented {
                let text = format!(
                    "this is {this}, which does not serve {service}; {}",
                    served_at(&service)
                );
                if let Ok(v) = http::HeaderValue::from_str(&percent_encode(&text)) {
                    headers.insert("grpc-message", v);
                }
            }
            Ok(resp)
        })
    }
}

/// grpc-message's encoding: printable ASCII but `%` as is, the rest percent-encoded.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// This server, as named in its UNIMPLEMENTED answers.
pub const NODE_GRPC: &str =
    "a Tollgate node's gRPC port (tollgate.node.v1.NodeAdmin, Raft, actors, health, reflection)";
