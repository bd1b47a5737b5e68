//! The client side of node-to-node Raft RPCs over gRPC.
//!
//! One lazily connected tonic `Channel` per peer address, shared by every Raft client for
//! that peer (and by write forwarding, see [`Peers::channel`]). A connection failure is
//! reported as `Unreachable`, so openraft backs off instead of retrying in a tight loop.
//!
//! Fault injection ([`Faults`]): with `--enable-fault-injection`, a node can be told to drop
//! Raft and forwarding traffic to and from given peers, which is how tests partition a
//! cluster of real processes without touching the host's network.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use tokio_stream::StreamExt as _;
use tollgate_proto::raft::v1 as pb;
use tollgate_proto::raft::v1::raft_client::RaftClient;
use tonic::transport::{Channel, Endpoint};

use super::codec;
use super::{NodeId, NodeInfo, Snapshot, TypeConfig, Vote};

/// Largest gRPC message between nodes (an AppendEntries batch, a snapshot chunk).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Size of one snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// Test-only partitions, off unless the node runs with `--enable-fault-injection`.
#[derive(Debug, Default)]
pub struct Faults {
    pub enabled: bool,
    isolated: RwLock<HashSet<NodeId>>,
}

impl Faults {
    pub fn new(enabled: bool) -> Faults {
        Faults {
            enabled,
            isolated: RwLock::default(),
        }
    }

    pub fn is_isolated(&self, peer: NodeId) -> bool {
        self.enabled && self.isolated.read().expect("faults lock").contains(&peer)
    }

    pub fn set_isolated(&self, peers: impl IntoIterator<Item = NodeId>) {
        *self.isolated.write().expect("faults lock") = peers.into_iter().collect();
    }
}

/// How long a peer may fail every Raft call before the node says so at WARN. A restart
/// takes a second or two, and openraft retries by itself: that is not worth a warning.
pub const SILENCE_WARNING: Duration = Duration::from_secs(10);

/// Whether each peer answers Raft calls: one WARN once a peer has failed every call for
/// [`SILENCE_WARNING`], one INFO when it answers again. (openraft's own per-call errors
/// are left out of the default log: one line per failed heartbeat.)
#[derive(Debug, Default)]
pub struct Contact {
    failing: Mutex<HashMap<NodeId, (std::time::Instant, bool)>>,
}

impl Contact {
    pub fn answered(&self, peer: NodeId) {
        let was = self.failing.lock().expect("contact lock").remove(&peer);
        if let Some((since, true)) = was {
            tracing::info!(
                peer,
                "node {peer} answers Raft calls again, after {:.0?}",
                since.elapsed()
            );
        }
    }

    pub fn failed(&self, peer: NodeId, addr: &str, why: &str) {
        let mut failing = self.failing.lock().expect("contact lock");
        let (since, warned) = failing
            .entry(peer)
            .or_insert_with(|| (std::time::Instant::now(), false));
        if !*warned && since.elapsed() >= SILENCE_WARNING {
            *warned = true;
            tracing::warn!(
                peer,
                "node {peer} at {addr} has failed every Raft call for {:.0?} (last: {why}); \
                 it is down, cut off, or not listening there",
                since.elapsed()
            );
        }
    }
}

/// Channels to peers, one per address, created on first use and never connected eagerly.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    pub faults: Faults,
    pub contact: Contact,
    /// Mutual TLS to peers (None with `--insecure-cluster`).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Peers {
    pub fn new(faults: Faults, tls: Option<Arc<rustls::ClientConfig>>) -> Peers {
        Peers {
            channels: Mutex::default(),
            faults,
            contact: Contact::default(),
            tls,
        }
    }

    /// Drops every channel: calls from now on connect again, presenting the certificate
    /// this node holds now (after it enrolled, or renewed its certificate).
    pub fn reconnect(&self) {
        self.channels.lock().expect("peers lock").clear();
    }

    /// The channel to `addr` (`host:port`), connecting lazily.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().expect("peers lock");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("invalid peer address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = match &self.tls {
            Some(config) => endpoint.connect_with_connector_lazy(crate::identity::tls::Connector {
                config: config.clone(),
            }),
            None => endpoint.connect_lazy(),
        };
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// openraft's network factory: one [`PeerClient`] per replication target.
#[derive(Clone)]
pub struct Network {
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient {
            target,
            addr: node.grpc_addr.clone(),
            channel: self.peers.channel(&node.grpc_addr),
            peers: self.peers.clone(),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    channel: Result<Channel, String>,
    peers: Arc<Peers>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, Unreachable> {
        if self.peers.faults.is_isolated(self.target) {
            return Err(Unreachable::new(&Msg(format!(
                "node {} is isolated by fault injection",
                self.target
            ))));
        }
        let channel = self
            .channel
            .clone()
            .map_err(|e| Unreachable::new(&Msg(e)))?;
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn status_error<E: std::error::Error>(&self, s: tonic::Status) -> RpcErr<E> {
        let e = Msg(format!(
            "node {} at {}: {}: {}",
            self.target,
            self.addr,
            s.code(),
            s.message()
        ));
        self.peers.contact.failed(self.target, &self.addr, &e.0);
        match s.code() {
            // Connection refused or reset, or the peer refusing Raft traffic for now.
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&e)),
            _ => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

fn decode_err<E: std::error::Error>(e: codec::DecodeError) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let mut client = self.client()?;
        let req = pb::AppendEntriesRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            prev_log_id: codec::opt_log_id_to_pb(&rpc.prev_log_id),
            entries: rpc.entries.iter().map(codec::entry_to_pb).collect(),
            leader_commit: codec::opt_log_id_to_pb(&rpc.leader_commit),
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(option.hard_ttl());
        let resp = client
            .append_entries(req)
            .await
            .map_err(|s| self.status_error(s))?
            .into_inner();
        self.peers.contact.answered(self.target);
        use pb::append_entries_response::Result as R;
        match resp.result {
            Some(R::Success(_)) => Ok(AppendEntriesResponse::Success),
            Some(R::PartialSuccess(p)) => Ok(AppendEntriesResponse::PartialSuccess(
                codec::opt_log_id_from_pb(p.matching).map_err(decode_err)?,
            )),
            Some(R::Conflict(_)) => Ok(AppendEntriesResponse::Conflict),
            Some(R::HigherVote(v)) => Ok(AppendEntriesResponse::HigherVote(
                codec::vote_from_pb(Some(v)).map_err(decode_err)?,
            )),
            None => Err(decode_err(codec::DecodeError(
                "append-entries response without a result".into(),
            ))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let mut client = self.client()?;
        let mut req = tonic::Request::new(pb::VoteRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            last_log_id: codec::opt_log_id_to_pb(&rpc.last_log_id),
        });
        req.set_timeout(option.hard_ttl());
        let resp = client
            .vote(req)
            .await
            .map_err(|s| self.status_error(s))?
            .into_inner();
        self.peers.contact.answered(self.target);
        Ok(VoteResponse {
            vote: codec::vote_from_pb(resp.vote).map_err(decode_err)?,
            vote_granted: resp.vote_granted,
            last_log_id: codec::opt_log_id_from_pb(resp.last_log_id).map_err(decode_err)?,
        })
    }

    #[allow(deprecated)]
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        // Snapshots travel whole through `full_snapshot` (feature generic-snapshot-data);
        // openraft never calls the chunked RPC then.
        Err(RPCError::Network(NetworkError::new(&Msg(
            "chunked install_snapshot is not used: snapshots are streamed by full_snapshot".into(),
        ))))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut client = self.client()?;
        let data = *snapshot.snapshot;
        let total = data.len();
        let header = pb::SnapshotChunk {
            part: Some(pb::snapshot_chunk::Part::Header(pb::SnapshotHeader {
                vote: Some(codec::vote_to_pb(&vote)),
                meta: Some(codec::snapshot_meta_to_pb(&snapshot.meta)),
                total_bytes: total as u64,
            })),
        };
        let chunks: Vec<pb::SnapshotChunk> = std::iter::once(header)
            .chain(
                data.chunks(SNAPSHOT_CHUNK_BYTES)
                    .map(|c| pb::SnapshotChunk {
                        part: Some(pb::snapshot_chunk::Part::Chunk(c.to_vec())),
                    }),
            )
            .collect();
        // The whole transfer gets the per-RPC budget plus a second per MiB, so a large
        // snapshot on a slow link is not cut off chunk by chunk.
        let budget =
            option.hard_ttl() + Duration::from_secs((total / SNAPSHOT_CHUNK_BYTES) as u64 + 5);
        let mut req = tonic::Request::new(tokio_stream::iter(chunks).map(|c| c));
        req.set_timeout(budget);
        let target = self.target;
        let addr = self.addr.clone();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            resp = client.install_snapshot(req) => {
                let resp = resp.map_err(|s| {
                    let e = Msg(format!("snapshot to node {target} at {addr}: {}: {}", s.code(), s.message()));
                    self.peers.contact.failed(target, &addr, &e.0);
                    if s.code() == tonic::Code::Unavailable {
                        StreamingError::Unreachable(Unreachable::new(&e))
                    } else {
                        StreamingError::Network(NetworkError::new(&e))
                    }
                })?.into_inner();
                self.peers.contact.answered(target);
                let vote = codec::vote_from_pb(resp.vote)
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                Ok(SnapshotResponse { vote })
            }
        }
    }
}
