//! Conversions between openraft's types and their protobuf form (`tollgate.raft.v1`), used
//! both on disk (log, vote, snapshots) and on the wire.
//!
//! Decoding is strict about what Raft needs (a log entry must have a log id) and says what
//! is missing; it ignores unknown fields (docs/architecture.md, decision 2).

use std::collections::{BTreeMap, BTreeSet};

use openraft::{EntryPayload, LeaderId};
use prost::Message;
use tollgate_proto::raft::v1 as pb;
use tollgate_proto::state::v1::Command;

use super::{Entry, LogId, Membership, NodeId, NodeInfo, SnapshotMeta, StoredMembership, Vote};

/// A protobuf message that lacked something Raft needs, or did not decode.
#[derive(Debug, thiserror::Error)]
#[error("bad raft message: {0}")]
pub struct DecodeError(pub String);

impl From<prost::DecodeError> for DecodeError {
    fn from(e: prost::DecodeError) -> Self {
        DecodeError(e.to_string())
    }
}

fn missing(what: &str) -> DecodeError {
    DecodeError(format!("{what} is missing"))
}

pub fn leader_id_to_pb(l: &LeaderId<NodeId>) -> pb::LeaderId {
    pb::LeaderId {
        term: l.term,
        node_id: l.node_id,
    }
}

pub fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(leader_id_to_pb(&v.leader_id)),
        committed: v.committed,
    }
}

pub fn vote_from_pb(v: Option<pb::Vote>) -> Result<Vote, DecodeError> {
    let v = v.ok_or_else(|| missing("vote"))?;
    let l = v.leader_id.ok_or_else(|| missing("vote.leader_id"))?;
    Ok(if v.committed {
        Vote::new_committed(l.term, l.node_id)
    } else {
        Vote::new(l.term, l.node_id)
    })
}

pub fn log_id_to_pb(id: &LogId) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id_to_pb(&id.leader_id)),
        index: id.index,
    }
}

pub fn opt_log_id_to_pb(id: &Option<LogId>) -> Option<pb::LogId> {
    id.as_ref().map(log_id_to_pb)
}

pub fn log_id_from_pb(id: pb::LogId) -> Result<LogId, DecodeError> {
    let l = id.leader_id.ok_or_else(|| missing("log_id.leader_id"))?;
    Ok(LogId::new(LeaderId::new(l.term, l.node_id), id.index))
}

pub fn opt_log_id_from_pb(id: Option<pb::LogId>) -> Result<Option<LogId>, DecodeError> {
    id.map(log_id_from_pb).transpose()
}

pub fn node_to_pb(n: &NodeInfo) -> pb::NodeInfo {
    pb::NodeInfo {
        grpc_addr: n.grpc_addr.clone(),
        region: n.region.clone(),
        proxy_addr: n.proxy_addr.clone(),
        admin_addr: n.admin_addr.clone(),
    }
}

pub fn node_from_pb(n: pb::NodeInfo) -> NodeInfo {
    NodeInfo {
        grpc_addr: n.grpc_addr,
        region: n.region,
        proxy_addr: n.proxy_addr,
        admin_addr: n.admin_addr,
    }
}

pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::VoterSet {
                ids: set.iter().copied().collect(),
            })
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, node_to_pb(n))).collect(),
    }
}

pub fn membership_from_pb(m: pb::Membership) -> Membership {
    let configs: Vec<BTreeSet<NodeId>> = m
        .configs
        .into_iter()
        .map(|set| set.ids.into_iter().collect())
        .collect();
    let nodes: BTreeMap<NodeId, NodeInfo> = m
        .nodes
        .into_iter()
        .map(|(id, n)| (id, node_from_pb(n)))
        .collect();
    Membership::new(configs, nodes)
}

pub fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to_pb(m.log_id()),
        membership: Some(membership_to_pb(m.membership())),
    }
}

pub fn stored_membership_from_pb(
    m: Option<pb::StoredMembership>,
) -> Result<StoredMembership, DecodeError> {
    let Some(m) = m else {
        return Ok(StoredMembership::default());
    };
    Ok(StoredMembership::new(
        opt_log_id_from_pb(m.log_id)?,
        membership_from_pb(m.membership.unwrap_or_default()),
    ))
}

pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(cmd) => pb::entry::Payload::Command(cmd.encode_to_vec()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    }
}

pub fn entry_from_pb(e: pb::Entry) -> Result<Entry, DecodeError> {
    let log_id = log_id_from_pb(e.log_id.ok_or_else(|| missing("entry.log_id"))?)?;
    let payload = match e.payload {
        // An entry with a payload kind this node does not know is kept as a blank: it
        // takes its place in the log and changes nothing here.
        None | Some(pb::entry::Payload::Blank(_)) => EntryPayload::Blank,
        Some(pb::entry::Payload::Command(bytes)) => {
            EntryPayload::Normal(Command::decode(bytes.as_slice())?)
        }
        Some(pb::entry::Payload::Membership(m)) => EntryPayload::Membership(membership_from_pb(m)),
    };
    Ok(Entry { log_id, payload })
}

pub fn snapshot_meta_to_pb(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(&m.last_log_id),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
        snapshot_id: m.snapshot_id.clone(),
    }
}

pub fn snapshot_meta_from_pb(m: Option<pb::SnapshotMeta>) -> Result<SnapshotMeta, DecodeError> {
    let m = m.ok_or_else(|| missing("snapshot meta"))?;
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(m.last_log_id)?,
        last_membership: stored_membership_from_pb(m.last_membership)?,
        snapshot_id: m.snapshot_id,
    })
}
