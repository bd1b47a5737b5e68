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

/// A client for one node's admin API.
#[derive(Debug, Clone)]
pub struct NodeClient {
    inner: NodeAdminClient<Channel>,
}

impl NodeClient {
    /// Connects to a node's gRPC address (`HOST:PORT`, or a full `http://` URI).
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri).map_err(|e| Error::InvalidAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        let channel = endpoint
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
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = Endpoint::from_shared(uri).map_err(|e| Error::InvalidAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        let channel = endpoint
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
