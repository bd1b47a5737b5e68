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

pub struct RaftService {
    pub raft: Raft,
    pub peers: Arc<Peers>,
    /// Counts the calls into the local Raft; refuses them once the node shuts down.
    pub gate: Arc<super::cluster::Gate>,
    pub id: super::NodeId,
    /// Milliseconds since the epoch of the last AppendEntries accepted from a leader (for
    /// followers and learners: "when did I last hear from the cluster").
    pub last_leader_contact_ms: Arc<AtomicU64>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        let mut stream = req.into_inner();
        let Some(first) = stream.next().await.transpose()? else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        let Some(pb::snapshot_chunk::Part::Header(header)) = first.part else {
            return Err(Status::invalid_argument(
                "a snapshot stream must start with its header",
            ));
        };
        self.refuse_if_isolated(header.vote.as_ref())?;
        if header.total_bytes > MAX_SNAPSHOT_BYTES {
            return Err(Status::invalid_argument(format!(
                "snapshot of {} bytes is over the limit of {MAX_SNAPSHOT_BYTES}",
                header.total_bytes
            )));
        }
        let vote = codec::vote_from_pb(header.vote).map_err(bad)?;
        let meta = codec::snapshot_meta_from_pb(header.meta).map_err(bad)?;
        let mut data = Vec::with_capacity(header.total_bytes as usize);
        while let Some(chunk) = stream.next().await.transpose()? {
            match chunk.part {
                Some(pb::snapshot_chunk::Part::Chunk(bytes)) => {
                    if (data.len() + bytes.len()) as u64 > header.total_bytes {
                        return Err(Status::invalid_argument(
                            "snapshot stream is longer than its header said",
                        ));
                    }
                    data.extend_from_slice(&bytes);
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "only chunks may follow a snapshot header",
                    ));
                }
            }
        }
        if data.len() as u64 != header.total_bytes {
            return Err(Status::invalid_argument(format!(
                "snapshot stream ended after {} of {} bytes",
                data.len(),
                header.total_bytes
            )));
        }
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
