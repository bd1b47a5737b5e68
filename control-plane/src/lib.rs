//! Tollgate's control plane (`tollgate-cp`): API lifecycle over the cluster's state.
//!
//! It stores nothing (DESIGN.md decision 3). Every call becomes a node admin call: writes
//! are `Write` commands carrying a request id, reads are linearizable `ListApis`. The
//! [`Nodes`] pool tries the node that answered last, follows the `x-tollgate-leader` hint,
//! moves on to the next address on UNAVAILABLE, and backs off, within a deadline. A retried
//! write keeps its request id, so the cluster applies it once. Several replicas may run.
//!
//! Today it serves the API lifecycle (`tollgate.cp.v1.ApiLifecycle`), with
//! `grpc.health.v1` and server reflection. Tenants, keys, tokens and costs come next
//! (the control-plane and metering issues); until tokens exist it has no authentication,
//! so keep it on a private network.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_proto::cp::v1 as cp;
use tollgate_proto::cp::v1::api_lifecycle_server::{ApiLifecycle, ApiLifecycleServer};
use tollgate_proto::state::v1 as state;
use tollgate_sdk::NodeClient;
use tonic::{Request, Response, Status};

/// How long one control-plane call may spend finding a node that can take it.
const DEADLINE: Duration = Duration::from_secs(10);

/// The nodes the control plane talks to, with a client per address.
pub struct Nodes {
    addrs: Mutex<Vec<String>>,
    clients: Mutex<Vec<(String, NodeClient)>>,
    /// Index (into `addrs`) of the node that answered last.
    preferred: AtomicUsize,
}

impl Nodes {
    pub fn new(addrs: &[String]) -> Result<Nodes, String> {
        if addrs.is_empty() {
            return Err("give at least one node address (--nodes HOST:PORT,...)".into());
        }
        let mut clients = Vec::new();
        for a in addrs {
            clients.push((a.clone(), NodeClient::lazy(a).map_err(|e| e.to_string())?));
        }
        Ok(Nodes {
            addrs: Mutex::new(addrs.to_vec()),
            clients: Mutex::new(clients),
            preferred: AtomicUsize::new(0),
        })
    }

    fn client(&self, addr: &str) -> Result<NodeClient, Status> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some((_, c)) = clients.iter().find(|(a, _)| a == addr) {
            return Ok(c.clone());
        }
        // A leader hint naming a node we were not given: remember it.
        let c = NodeClient::lazy(addr).map_err(|e| Status::internal(e.to_string()))?;
        clients.push((addr.to_string(), c.clone()));
        self.addrs
            .lock()
            .expect("addrs lock")
            .push(addr.to_string());
        Ok(c)
    }

    /// Runs `call` against a node, moving to another one (the leader's, when named) on
    /// UNAVAILABLE or a transport failure, with backoff, until `DEADLINE`.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(NodeClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, tollgate_sdk::Error>>,
    {
        let started = Instant::now();
        let mut delay = Duration::from_millis(25);
        let mut next: Option<String> = None;
        loop {
            let addr = match next.take() {
                Some(a) => a,
                None => {
                    let addrs = self.addrs.lock().expect("addrs lock");
                    addrs[self.preferred.load(Ordering::Relaxed) % addrs.len()].clone()
                }
            };
            let result = call(self.client(&addr)?).await;
            let err = match result {
                Ok(v) => {
                    let addrs = self.addrs.lock().expect("addrs lock");
                    if let Some(i) = addrs.iter().position(|a| *a == addr) {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let retry = matches!(
                err.code(),
                None | Some(tonic::Code::Unavailable) | Some(tonic::Code::Cancelled)
            );
            if !retry {
                return Err(match err {
                    tollgate_sdk::Error::Status(s) => s,
                    other => Status::internal(other.to_string()),
                });
            }
            if started.elapsed() + delay > DEADLINE {
                return Err(Status::unavailable(format!(
                    "no node could take the call within {DEADLINE:?}; last answer from {addr}: {err}"
                )));
            }
            match err.leader_hint() {
                Some(leader) if leader != addr => next = Some(leader),
                _ => {
                    let n = self.addrs.lock().expect("addrs lock").len();
                    let current = self.preferred.load(Ordering::Relaxed);
                    self.preferred.store((current + 1) % n, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// The `ApiLifecycle` service.
pub struct Service {
    nodes: Nodes,
    /// Distinguishes this replica's request ids from another's.
    replica: String,
    counter: AtomicU64,
}

impl Service {
    pub fn new(nodes: Nodes) -> Service {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Service {
            nodes,
            replica: format!("cp-{}-{nanos}", std::process::id()),
            counter: AtomicU64::new(0),
        }
    }

    /// Writes one API command (retried with the same request id) and returns the API as
    /// it is afterwards.
    async fn write(&self, api: &str, op: state::api_command::Op) -> Result<cp::ApiReply, Status> {
        let command = state::Command {
            request_id: format!(
                "{}-{}",
                self.replica,
                self.counter.fetch_add(1, Ordering::Relaxed)
            ),
            kind: Some(state::command::Kind::Api(state::ApiCommand {
                api: api.to_string(),
                op: Some(op),
            })),
        };
        let written = self
            .nodes
            .call(|mut c| {
                let command = command.clone();
                async move { c.write(command).await }
            })
            .await?;
        let mut reply = self.get(api).await?;
        reply.generation = reply.generation.max(written.generation);
        Ok(reply)
    }

    async fn list(&self, tenant: &str) -> Result<tollgate_sdk::ListApisResponse, Status> {
        self.nodes
            .call(|mut c| {
                let tenant = tenant.to_string();
                async move { c.list_apis(false, &tenant).await }
            })
            .await
    }

    async fn get(&self, name: &str) -> Result<cp::ApiReply, Status> {
        let list = self.list("").await?;
        let api = list
            .apis
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| Status::not_found(format!("there is no API {name}")))?;
        Ok(cp::ApiReply {
            api: Some(api),
            generation: list.generation,
        })
    }
}

fn check_size(what: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes, over the limit of {max}",
            value.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl ApiLifecycle for Service {
    async fn create_api(
        &self,
        req: Request<cp::CreateApiRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let r = req.into_inner();
        check_size("the API name", &r.name, 256)?;
        check_size("the tenant name", &r.tenant, 256)?;
        let op = state::api_command::Op::CreateApi(state::CreateApi { tenant: r.tenant });
        Ok(Response::new(self.write(&r.name, op).await?))
    }

    async fn get_api(
        &self,
        req: Request<cp::GetApiRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let r = req.into_inner();
        check_size("the API name", &r.name, 256)?;
        Ok(Response::new(self.get(&r.name).await?))
    }

    async fn list_apis(
        &self,
        req: Request<cp::ListApisRequest>,
    ) -> Result<Response<cp::ListApisReply>, Status> {
        let r = req.into_inner();
        check_size("the tenant name", &r.tenant, 256)?;
        let list = self.list(&r.tenant).await?;
        Ok(Response::new(cp::ListApisReply { apis: list.apis }))
    }

    async fn create_version(
        &self,
        req: Request<cp::CreateVersionRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let r = req.into_inner();
        check_size("the version", &r.version, 256)?;
        let op = state::api_command::Op::CreateVersion(state::CreateVersion {
            version: r.version,
            content: r.content,
        });
        Ok(Response::new(self.write(&r.api, op).await?))
    }

    async fn transition_version(
        &self,
        req: Request<cp::TransitionVersionRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let r = req.into_inner();
        let Some(t) = r.transition else {
            return Err(Status::invalid_argument(
                "say which transition: edit, publish, deprecate, retire or discard",
            ));
        };
        let op = state::api_command::Op::Transition(t);
        Ok(Response::new(self.write(&r.api, op).await?))
    }

    async fn set_split(
        &self,
        req: Request<cp::SetSplitRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let r = req.into_inner();
        let op = state::api_command::Op::SetSplit(state::SetSplit { weights: r.weights });
        Ok(Response::new(self.write(&r.api, op).await?))
    }

    async fn promote(
        &self,
        req: Request<cp::PromoteRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let r = req.into_inner();
        let op = state::api_command::Op::Promote(state::Promote { version: r.version });
        Ok(Response::new(self.write(&r.api, op).await?))
    }

    async fn rollback(
        &self,
        req: Request<cp::RollbackRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let r = req.into_inner();
        let op = state::api_command::Op::Rollback(state::Rollback {});
        Ok(Response::new(self.write(&r.api, op).await?))
    }
}

/// Serves the control plane on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    nodes: Nodes,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ApiLifecycleServer<Service>>().await;
    // Reflection lists exactly what this server serves; v1alpha too, since grpcurl and
    // Python's grpcio-reflection still ask for it.
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tollgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in ["tollgate.cp.v1.ApiLifecycle"].into_iter().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]) {
            b = b.with_service_name(name);
        }
        b
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ApiLifecycleServer::new(Service::new(nodes)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// `tollgate-cp`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CpArgs {
    /// Where to serve the control-plane gRPC API.
    #[arg(long, env = "TOLLGATE_CP_ADDR", default_value = "127.0.0.1:7080")]
    pub listen: SocketAddr,
    /// Node gRPC addresses to read and write the cluster through (comma-separated; any
    /// members: writes are forwarded to the leader).
    #[arg(
        long,
        env = "TOLLGATE_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    pub nodes: Vec<String>,
    /// Write the bound address here once listening (for scripts and tests).
    #[arg(long, env = "TOLLGATE_CP_ADDR_FILE")]
    pub addr_file: Option<std::path::PathBuf>,
}

/// Runs the control plane until SIGTERM or Ctrl-C.
pub fn run(args: CpArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let nodes = Nodes::new(&args.nodes).map_err(|e| anyhow::anyhow!(e))?;
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("bind {}: {e}", args.listen))?;
        let addr = listener.local_addr()?;
        if let Some(path) = &args.addr_file {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, addr.to_string())?;
            std::fs::rename(&tmp, path)?;
        }
        tracing::info!(%addr, nodes = ?args.nodes, "tollgate-cp serving");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            }
            stop.cancel();
        });
        serve(listener, nodes, shutdown).await
    })
}
