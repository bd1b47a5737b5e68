//! The server side of node-to-node Raft RPCs: decodes each request and hands it to the
//! local openraft instance.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::raft::AppendEntriesResponse;
use tokio_stream::StreamExt as _;
use tollgate_proto::raft::v1 as pb;
use tollgate_proto::raft::v1::raft_server::Raft as RaftRpc;
use tonic::{Request, Response, Status, Streaming};

use super::network::Peers;
use super::{Raft, Snapshot, codec};

/// Largest snapshot a node accepts.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
/// How long an incoming snapshot waits for the one being received before it.
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct RaftService {
    pub raft: Raft,
    pub peers: Arc<Peers>,
    /// Counts the calls into the local Raft; refuses them once the node shuts down.
    pub gate: Arc<super::cluster::Gate>,
    pub id: super::NodeId,
    /// Milliseconds since the epoch of the last AppendEntries accepted from a leader (for
    /// followers and learners: "when did I last hear from the cluster").
    pub last_leader_contact_ms: Arc<AtomicU64>,
    /// Who may call: a node speaks only for itself (by its certificate).
    pub identity: Arc<crate::identity::Identity>,
    pub state_machine: super::state_machine::StateMachineStore,
    /// Where incoming snapshots are written while they arrive.
    pub snapshot_dir: std::path::PathBuf,
    /// Held while a snapshot is received.
    pub receiving: Arc<tokio::sync::Mutex<()>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RaftService {
    /// Writes a snapshot's chunks to a file as they arrive (at most `total` bytes, as the
    /// header declared) and reads it back once it is whole.
    async fn receive(
        &self,
        stream: &mut Streaming<pb::SnapshotChunk>,
        total: u64,
    ) -> Result<Vec<u8>, Status> {
        use tokio::io::AsyncWriteExt;
        let path = self
            .snapshot_dir
            .join(format!("snapshot-incoming-{}.tmp", std::process::id()));
        let io = |e: std::io::Error| Status::internal(format!("cannot store the snapshot: {e}"));
        let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
        let mut received: u64 = 0;
        let result = async {
            while let Some(chunk) = stream.next().await.transpose()? {
                match chunk.part {
                    Some(pb::snapshot_chunk::Part::Chunk(bytes)) => {
                        received += bytes.len() as u64;
                        if received > total {
                            return Err(Status::invalid_argument(
                                "snapshot stream is longer than its header said",
                            ));
                        }
                        file.write_all(&bytes).await.map_err(io)?;
                    }
                    _ => {
                        return Err(Status::invalid_argument(
                            "only chunks may follow a snapshot header",
                        ));
                    }
                }
            }
            if received != total {
                return Err(Status::invalid_argument(format!(
                    "snapshot stream ended after {received} of {total} bytes"
                )));
            }
            file.flush().await.map_err(io)?;
            tokio::fs::read(&path).await.map_err(io)
        }
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        result
    }
}

fn bad(e: codec::DecodeError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal(e: impl std::fmt::Display) -> Status {
    // The local Raft has stopped (shutting down, or a storage failure): tell the sender to
    // back off and try elsewhere.
    Status::unavailable(format!("raft on this node is not running: {e}"))
}

impl RaftService {
    /// The caller's certificate must be that of `vote`'s node: the leader sending entries
    /// or a snapshot, or the candidate asking for a vote.
    fn require_sender<T>(&self, req: &Request<T>, vote: Option<&pb::Vote>) -> Result<(), Status> {
        let claimed = vote
            .and_then(|v| v.leader_id.as_ref())
            .map(|l| l.node_id)
            .ok_or_else(|| Status::invalid_argument("the request has no vote"))?;
        let certs = req.peer_certs();
        self.state_machine.read(|a| {
            self.identity.require_node(
                certs.as_deref().map(Vec::as_slice),
                &a.state.access,
                claimed,
                "this Raft message",
            )
        })
    }

    fn refuse_if_isolated(&self, from: Option<&pb::Vote>) -> Result<(), Status> {
        let sender = from.and_then(|v| v.leader_id.as_ref()).map(|l| l.node_id);
        match sender {
            Some(id) if self.peers.faults.is_isolated(id) => Err(Status::unavailable(format!(
                "traffic from node {id} is dropped by fault injection"
            ))),
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.require_sender(&req, req.get_ref().vote.as_ref())?;
        let req = req.into_inner();
        self.refuse_if_isolated(req.vote.as_ref())?;
        let rpc = openraft::raft::AppendEntriesRequest {
            vote: codec::vote_from_pb(req.vote).map_err(bad)?,
            prev_log_id: codec::opt_log_id_from_pb(req.prev_log_id).map_err(bad)?,
            entries: req
                .entries
                .into_iter()
                .map(codec::entry_from_pb)
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            leader_commit: codec::opt_log_id_from_pb(req.leader_commit).map_err(bad)?,
        };
        let _call = self.gate.enter(self.id)?;
        let resp = self.raft.append_entries(rpc).await.map_err(fatal)?;
        use pb::append_entries_response::Result as R;
        let result = match resp {
            AppendEntriesResponse::Success => {
                self.last_leader_contact_ms
                    .store(now_ms(), Ordering::Relaxed);
                R::Success(pb::Blank {})
            }
            AppendEntriesResponse::PartialSuccess(m) => {
                self.last_leader_contact_ms
                    .store(now_ms(), Ordering::Relaxed);
                R::PartialSuccess(pb::PartialSuccess {
                    matching: codec::opt_log_id_to_pb(&m),
                })
            }
            AppendEntriesResponse::Conflict => {
                self.last_leader_contact_ms
                    .store(now_ms(), Ordering::Relaxed);
                R::Conflict(pb::Blank {})
            }
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(codec::vote_to_pb(&v)),
        };
        Ok(Response::new(pb::AppendEntriesResponse {
            result: Some(result),
        }))
    }

    async fn vote(
        &self,
        req: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        self.require_sender(&req, req.get_ref().vote.as_ref())?;
        let req = req.into_inner();
        self.refuse_if_isolated(req.vote.as_ref())?;
        let rpc = openraft::raft::VoteRequest {
            vote: codec::vote_from_pb(req.vote).map_err(bad)?,
            last_log_id: codec::opt_log_id_from_pb(req.last_log_id).map_err(bad)?,
        };
        let _call = self.gate.enter(self.id)?;
        let resp = self.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(pb::VoteResponse {
            vote: Some(codec::vote_to_pb(&resp.vote)),
            vote_granted: resp.vote_granted,
            last_log_id: codec::opt_log_id_to_pb(&resp.last_log_id),
        }))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        // Only a member may send one: checked before a byte of it is read.
        let certs = req.peer_certs();
        if self.identity.secure {
            self.state_machine.read(|a| {
                self.identity
                    .peer(certs.as_deref().map(Vec::as_slice), &a.state.access)
            })?;
        }
        let mut stream = req.into_inner();
        let Some(first) = stream.next().await.transpose()? else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        let Some(pb::snapshot_chunk::Part::Header(header)) = first.part else {
            return Err(Status::invalid_argument(
                "a snapshot stream must start with its header",
            ));
        };
        let claimed = header
            .vote
            .as_ref()
            .and_then(|v| v.leader_id.as_ref())
            .map(|l| l.node_id)
            .ok_or_else(|| Status::invalid_argument("the snapshot header has no vote"))?;
        self.state_machine.read(|a| {
            self.identity.require_node(
                certs.as_deref().map(Vec::as_slice),
                &a.state.access,
                claimed,
                "this snapshot",
            )
        })?;
        self.refuse_if_isolated(header.vote.as_ref())?;
        if header.total_bytes > MAX_SNAPSHOT_BYTES {
            return Err(Status::invalid_argument(format!(
                "snapshot of {} bytes is over the limit of {MAX_SNAPSHOT_BYTES}",
                header.total_bytes
            )));
        }
        let vote = codec::vote_from_pb(header.vote).map_err(bad)?;
        let meta = codec::snapshot_meta_from_pb(header.meta).map_err(bad)?;
        // A sender whose vote is behind this node's is no longer the leader: answer with
        // this node's vote (it steps down) before reading the snapshot.
        let mine = self.raft.metrics().borrow().vote;
        if vote < mine {
            metrics::counter!("tollgate_raft_snapshots_refused_total", "reason" => "stale_vote")
                .increment(1);
            return Ok(Response::new(pb::SnapshotResponse {
                vote: Some(codec::vote_to_pb(&mine)),
            }));
        }
        // One snapshot at a time, written to disk as it arrives (never sized by what the
        // header declares), and read back whole only once it is complete.
        let _one = tokio::time::timeout(SNAPSHOT_WAIT, self.receiving.lock())
            .await
            .map_err(|_| Status::unavailable("another snapshot is being received; retry"))?;
        let data = self.receive(&mut stream, header.total_bytes).await?;
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(data),
        };
        let _call = self.gate.enter(self.id)?;
        let resp = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(fatal)?;
        self.last_leader_contact_ms
            .store(now_ms(), Ordering::Relaxed);
        metrics::counter!("tollgate_raft_snapshots_installed_total").increment(1);
        Ok(Response::new(pb::SnapshotResponse {
            vote: Some(codec::vote_to_pb(&resp.vote)),
        }))
    }
}
