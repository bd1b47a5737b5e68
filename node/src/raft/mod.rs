//! The Raft cluster: openraft 0.9 (storage v2) with its log and state machine in sled and
//! its RPCs over gRPC.
//!
//! - [`codec`]: openraft types <-> `tollgate.raft.v1` protobuf, on disk and on the wire.
//! - [`log_store`], [`state_machine`]: storage, flushed before anything is acknowledged.
//! - [`network`], [`service`]: node-to-node RPC client and server.
//! - [`cluster`]: what the node admin API does with all this (bootstrap, join, writes
//!   forwarded to the leader, linearizable reads, status).
//!
//! Everything openraft-specific stays in this folder, so moving to openraft 0.10 stays local.

pub mod cluster;
pub mod codec;
pub mod log_store;
pub mod network;
pub mod service;
pub mod state_machine;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

use tollgate_proto::state::v1::Command;

use crate::state::machine::Applied;

pub type NodeId = u64;

/// What the cluster knows about a member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node-to-node gRPC address (Raft and node admin), as peers should dial it.
    pub grpc_addr: String,
    pub region: String,
    pub proxy_addr: String,
    pub admin_addr: String,
}

openraft::declare_raft_types!(
    /// Tollgate's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = NodeInfo,
        SnapshotData = Vec<u8>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Membership = openraft::Membership<NodeId, NodeInfo>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;

/// Raft timing and log compaction, from the node's settings.
#[derive(Debug, Clone, Copy)]
pub struct RaftSettings {
    pub heartbeat_interval: Duration,
    /// Election timeouts are drawn from [min, 2 * min).
    pub election_timeout: Duration,
    /// Build a snapshot (and compact the log) after this many entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot, for slow followers.
    pub keep_logs: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_interval: Duration::from_millis(75),
            election_timeout: Duration::from_millis(300),
            snapshot_every: 5000,
            keep_logs: 1000,
        }
    }
}

impl RaftSettings {
    pub fn openraft_config(&self) -> anyhow::Result<openraft::Config> {
        let min = self.election_timeout.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: "tollgate".into(),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: min,
            election_timeout_max: min * 2,
            // Per snapshot transfer (plus a second per MiB, see network::full_snapshot).
            install_snapshot_timeout: 5_000,
            max_payload_entries: 64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_logs,
            ..Default::default()
        };
        Ok(config.validate()?)
    }
}

/// Opens the node's sled database under `data_dir/raft`.
pub fn open_db(data_dir: &Path) -> anyhow::Result<sled::Db> {
    let path = data_dir.join("raft");
    std::fs::create_dir_all(&path)
        .map_err(|e| anyhow::anyhow!("create the data directory {}: {e}", path.display()))?;
    sled::Config::new()
        .path(&path)
        // sled's default cache is about 1 GiB (docs/architecture.md, decision 10,
        // pitfall 2); our state is small.
        .cache_capacity(64 * 1024 * 1024)
        // Every acknowledged write is flushed explicitly; this only bounds the rest.
        .flush_every_ms(Some(1000))
        .open()
        .map_err(|e| match e {
            // sled reports the lock another process holds as an I/O error of its own.
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                anyhow::anyhow!(
                    "the data directory {} is in use by another Tollgate process (a `tollgate dev` \
                 or node that is still running); stop that one, or give this one its own \
                 --data-dir",
                    data_dir.display()
                )
            }
            e => anyhow::anyhow!(
                "open the Raft store in {}: {e} (is another node using this --data-dir?)",
                path.display()
            ),
        })
}
