//! Typed async client for Tollgate's gRPC APIs.
//!
//! Today it speaks the node admin API (`tollgate.node.v1.NodeAdmin`); the control-plane
//! client joins it when that service exists.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tollgate_sdk::Error> {
//! let mut node = tollgate_sdk::NodeClient::connect("127.0.0.1:7070").await?;
//! let status = node.status().await?;
//! println!("node {} serves spec generation {}", status.node_id, status.spec_generation);
//! # Ok(()) }
//! ```

use std::time::Duration;

use tollgate_proto::node::v1::{StatusRequest, node_admin_client::NodeAdminClient};
use tonic::transport::{Channel, Endpoint};

pub use tollgate_proto::node::v1::StatusResponse;

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
    #[error("node answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
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

    /// What the node is and what it serves right now.
    pub async fn status(&mut self) -> Result<StatusResponse, Error> {
        Ok(self.inner.status(StatusRequest {}).await?.into_inner())
    }
}
