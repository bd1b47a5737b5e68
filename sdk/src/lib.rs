//! Typed async client for Tollgate's gRPC APIs.
//!
//! Today it speaks the node admin API (`tollgate.node.v1.NodeAdmin`): status, cluster
//! membership, spec writes and reads. Any node accepts writes and forwards them to the
//! leader. The control-plane client joins it when that service exists.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tollgate_sdk::Error> {
//! let mut node = tollgate_sdk::NodeClient::connect("127.0.0.1:7070").await?;
//! let status = node.status().await?;
//! println!("node {} serves spec generation {}", status.node_id, status.spec_generation);
//! # Ok(()) }
//! ```

use std::time::Duration;

use tollgate_proto::node::v1::{
    ApplySpecRequest, ClusterStatusRequest, HistoryRequest, ListApisRequest, ReadSpecRequest,
    RemoveRequest, SetFaultsRequest, StatusRequest, WriteRequest,
    node_admin_client::NodeAdminClient,
};
use tonic::transport::{Channel, Endpoint};

pub use tollgate_proto::node::v1::{
    ApplySpecResponse, ClusterStatusResponse, Member, ReadSpecResponse, StatusResponse,
};
pub use tollgate_proto::node::v1::{ListApisResponse, WriteResponse};
pub use tollgate_proto::state::v1 as state;
pub use tollgate_proto::state::v1::Change;

/// Response metadata naming the leader's gRPC address on UNAVAILABLE answers.
pub const LEADER_METADATA: &str = "x-tollgate-leader";

/// What went wrong talking to a Tollgate API, phrased so the caller knows what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid node address {addr:?}: {reason} (expected HOST:PORT, e.g. 127.0.0.1:7070)")]
    InvalidAddress { addr: String, reason: String },
    #[error(
        "cannot reach node at {addr}: {source} (is tollgate-node running with --grpc-addr {addr}?)"
    )]
    Unreachable {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("node answered {:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}

impl Error {
    /// The gRPC status code, when the node answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// The leader's gRPC address, when a node answered that it is not the leader.
    pub fn leader_hint(&self) -> Option<String> {
        match self {
            Error::Status(s) => s
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        }
    }
}

/// An endpoint for `addr` (`HOST:PORT`, or a full `http://` URI).
fn endpoint(addr: &str) -> Result<Endpoint, Error> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri).map_err(|e| Error::InvalidAddress {
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// A client for one node's admin API.
#[derive(Debug, Clone)]
pub struct NodeClient {
    inner: NodeAdminClient<Channel>,
}

impl NodeClient {
    /// Connects to a node's gRPC address (`HOST:PORT`, or a full `http://` URI).
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        let channel = endpoint(addr)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|source| Error::Unreachable {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Self {
            inner: NodeAdminClient::new(channel),
        })
    }

    /// A client that connects on first use (and reconnects after failures), for callers
    /// that keep a client per node and must not block on a node that is down.
    pub fn lazy(addr: &str) -> Result<Self, Error> {
        let channel = endpoint(addr)?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            inner: NodeAdminClient::new(channel),
        })
    }

    /// What the node is and what it serves right now.
    pub async fn status(&mut self) -> Result<StatusResponse, Error> {
        Ok(self.inner.status(StatusRequest {}).await?.into_inner())
    }

    /// Members, roles, leader and term as this node sees them.
    pub async fn cluster_status(&mut self) -> Result<ClusterStatusResponse, Error> {
        Ok(self
            .inner
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner())
    }

    /// Replaces the cluster's spec (or, with `dry_run`, only plans it). `request_id` makes
    /// a retry safe: a write whose id was already applied is not applied again.
    pub async fn apply_spec(
        &mut self,
        spec_yaml: impl Into<String>,
        dry_run: bool,
        request_id: impl Into<String>,
    ) -> Result<ApplySpecResponse, Error> {
        let req = ApplySpecRequest {
            spec_yaml: spec_yaml.into(),
            dry_run,
            request_id: request_id.into(),
        };
        Ok(self.inner.apply_spec(req).await?.into_inner())
    }

    /// The cluster's spec: linearizable (through the leader) unless `local`.
    pub async fn read_spec(&mut self, local: bool) -> Result<ReadSpecResponse, Error> {
        Ok(self
            .inner
            .read_spec(ReadSpecRequest { local })
            .await?
            .into_inner())
    }

    /// Proposes a state-machine command (the API lifecycle commands); any node forwards it
    /// to the leader. A refused command answers with the status that says why.
    pub async fn write(&mut self, command: state::Command) -> Result<WriteResponse, Error> {
        Ok(self
            .inner
            .write(WriteRequest {
                command: Some(command),
            })
            .await?
            .into_inner())
    }

    /// APIs and their versions; linearizable unless `local`; one tenant's when given.
    pub async fn list_apis(
        &mut self,
        local: bool,
        tenant: &str,
    ) -> Result<ListApisResponse, Error> {
        Ok(self
            .inner
            .list_apis(ListApisRequest {
                local,
                tenant: tenant.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Takes a node out of the cluster.
    pub async fn remove(&mut self, node_id: u64) -> Result<(), Error> {
        self.inner.remove(RemoveRequest { node_id }).await?;
        Ok(())
    }

    /// The recent applied changes on this node, oldest first.
    pub async fn history(&mut self) -> Result<Vec<Change>, Error> {
        Ok(self
            .inner
            .history(HistoryRequest {})
            .await?
            .into_inner()
            .changes)
    }

    /// Tests only (the node must run with `--enable-fault-injection`): drop Raft traffic
    /// between this node and `peers`; an empty list heals.
    pub async fn set_faults(&mut self, peers: Vec<u64>) -> Result<(), Error> {
        self.inner
            .set_faults(SetFaultsRequest {
                isolate_from: peers,
            })
            .await?;
        Ok(())
    }
}

pub use tollgate_proto::cp::v1 as cp;

/// A client for the control plane (`tollgate-cp`): any number of replica addresses; a call
/// that gets UNAVAILABLE or a transport failure moves on to the next replica, backing off,
/// for up to 10 s. Every other answer (INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND,
/// ...) is returned at once: it says what to change.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    replicas: Vec<(
        String,
        cp::api_lifecycle_client::ApiLifecycleClient<Channel>,
    )>,
}

impl ControlPlaneClient {
    /// `addrs`: `HOST:PORT` of one or more replicas. Connects on first use.
    pub fn new(addrs: &[&str]) -> Result<Self, Error> {
        if addrs.is_empty() {
            return Err(Error::InvalidAddress {
                addr: String::new(),
                reason: "no control-plane address given".into(),
            });
        }
        let mut replicas = Vec::new();
        for addr in addrs {
            let channel = endpoint(addr)?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(20))
                .connect_lazy();
            replicas.push((
                addr.to_string(),
                cp::api_lifecycle_client::ApiLifecycleClient::new(channel),
            ));
        }
        Ok(Self { replicas })
    }

    /// Sends `req` with `f`, to the next replica after each UNAVAILABLE.
    async fn call<Req, T, F, Fut>(&self, req: Req, f: F) -> Result<T, Error>
    where
        Req: Clone,
        F: Fn(cp::api_lifecycle_client::ApiLifecycleClient<Channel>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut i = 0;
        loop {
            let client = self.replicas[i % self.replicas.len()].1.clone();
            match f(client, req.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
                        && started.elapsed() + delay < Duration::from_secs(10) =>
                {
                    i += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(s) => return Err(Error::Status(s)),
            }
        }
    }

    pub async fn create_api(&self, name: &str, tenant: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::CreateApiRequest {
            name: name.into(),
            tenant: tenant.into(),
        };
        self.call(req, |mut c, r| async move { c.create_api(r).await })
            .await
    }

    pub async fn get_api(&self, name: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::GetApiRequest { name: name.into() };
        self.call(req, |mut c, r| async move { c.get_api(r).await })
            .await
    }

    /// Every API, or one tenant's (`tenant` non-empty).
    pub async fn list_apis(&self, tenant: &str) -> Result<Vec<state::ApiState>, Error> {
        let req = cp::ListApisRequest {
            tenant: tenant.into(),
        };
        Ok(self
            .call(req, |mut c, r| async move { c.list_apis(r).await })
            .await?
            .apis)
    }

    pub async fn create_version(
        &self,
        api: &str,
        version: &str,
        content: &str,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::CreateVersionRequest {
            api: api.into(),
            version: version.into(),
            content: content.into(),
        };
        self.call(req, |mut c, r| async move { c.create_version(r).await })
            .await
    }

    /// Moves a version: `to` is edit, publish, deprecate, retire or discard.
    pub async fn transition(
        &self,
        api: &str,
        version: &str,
        to: state::version_transition::To,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::TransitionVersionRequest {
            api: api.into(),
            transition: Some(state::VersionTransition {
                version: version.into(),
                to: Some(to),
            }),
        };
        self.call(req, |mut c, r| async move { c.transition_version(r).await })
            .await
    }

    /// Splits traffic by weight, e.g. `[("1.0.0", 90), ("2.0.0", 10)]`.
    pub async fn set_split(
        &self,
        api: &str,
        weights: &[(&str, u32)],
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::SetSplitRequest {
            api: api.into(),
            weights: weights
                .iter()
                .map(|(v, w)| state::SplitEntry {
                    version: v.to_string(),
                    weight: *w,
                })
                .collect(),
        };
        self.call(req, |mut c, r| async move { c.set_split(r).await })
            .await
    }

    pub async fn promote(&self, api: &str, version: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::PromoteRequest {
            api: api.into(),
            version: version.into(),
        };
        self.call(req, |mut c, r| async move { c.promote(r).await })
            .await
    }

    pub async fn rollback(&self, api: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::RollbackRequest { api: api.into() };
        self.call(req, |mut c, r| async move { c.rollback(r).await })
            .await
    }
}
