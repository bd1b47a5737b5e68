//! The state machine's storage in sled, and its snapshots (openraft storage v2).
//!
//! One apply batch is one atomic sled batch: the state's changes, `last_applied` and the
//! last membership are written together (STACK.md pitfall 3) and flushed before apply
//! returns. The state is also held in memory ([`ClusterState`]); every applied change of
//! the spec is published on a watch channel, from which the node compiles the data plane's
//! next Snapshot off this task.
//!
//! Layout of the `state_machine` tree: `applied`, `membership`, `generation`, `spec`,
//! `objects`, `snapshot` (the current Raft snapshot), and `history/<generation, BE>` for
//! each recent change.

// openraft's StorageError is large; it is the storage traits' error type, not ours to shrink.
#![allow(clippy::result_large_err)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageError, StorageIOError,
};
use prost::Message;
use tokio::sync::watch;
use tollgate_proto::raft::v1 as pb;
use tollgate_proto::state::v1::{Change, StateSnapshot};

use super::codec;
use super::{Entry, LogId, NodeId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};
use crate::state::machine::{Applied, ClusterState};

const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
const GENERATION: &[u8] = b"generation";
const SPEC: &[u8] = b"spec";
const OBJECTS: &[u8] = b"objects";
const SNAPSHOT: &[u8] = b"snapshot";
const HISTORY: &[u8] = b"history/";

fn history_key(generation: u64) -> Vec<u8> {
    let mut k = HISTORY.to_vec();
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

/// What the data plane is told after a change: the generation and the spec to compile.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub generation: u64,
    pub spec_yaml: Arc<str>,
}

/// Applied state shared with readers (admin RPCs): the in-memory state and where it is.
#[derive(Debug, Default)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: ClusterState,
}

/// The state machine store. Cheap to clone.
#[derive(Clone)]
pub struct StateMachineStore {
    db: sled::Db,
    tree: sled::Tree,
    inner: Arc<RwLock<AppliedState>>,
    publish: Arc<watch::Sender<Published>>,
    snapshots_built: Arc<AtomicU64>,
}

fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn snapshot_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

impl StateMachineStore {
    /// Opens the state machine and loads it into memory.
    pub fn open(db: &sled::Db) -> Result<StateMachineStore, StorageError<NodeId>> {
        let tree = db.open_tree("state_machine").map_err(read_err)?;
        let get = |k: &[u8]| tree.get(k).map_err(read_err);
        let last_applied = match get(APPLIED)? {
            Some(b) => Some(
                codec::log_id_from_pb(pb::LogId::decode(b.as_ref()).map_err(read_err)?)
                    .map_err(read_err)?,
            ),
            None => None,
        };
        let membership = match get(MEMBERSHIP)? {
            Some(b) => codec::stored_membership_from_pb(Some(
                pb::StoredMembership::decode(b.as_ref()).map_err(read_err)?,
            ))
            .map_err(read_err)?,
            None => StoredMembership::default(),
        };
        let mut state = ClusterState::default();
        if let Some(b) = get(GENERATION)? {
            state.generation = u64::from_be_bytes(
                b.as_ref()
                    .try_into()
                    .map_err(|_| read_err("generation is not 8 bytes"))?,
            );
        }
        if let Some(b) = get(SPEC)? {
            state.spec_yaml = String::from_utf8(b.to_vec()).map_err(read_err)?;
        }
        if let Some(b) = get(OBJECTS)? {
            state.objects = StateSnapshot::decode(b.as_ref())
                .map_err(read_err)?
                .objects
                .into_iter()
                .collect();
        }
        for item in tree.scan_prefix(HISTORY) {
            let (_, v) = item.map_err(read_err)?;
            state
                .history
                .push_back(Change::decode(v.as_ref()).map_err(read_err)?);
        }
        let published = Published {
            generation: state.generation,
            spec_yaml: Arc::from(state.spec_yaml.as_str()),
        };
        Ok(StateMachineStore {
            db: db.clone(),
            tree,
            inner: Arc::new(RwLock::new(AppliedState {
                last_applied,
                membership,
                state,
            })),
            publish: Arc::new(watch::channel(published).0),
            snapshots_built: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Changes of the spec, newest only (a slow reader skips to the latest).
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.publish.subscribe()
    }

    /// Reads the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&AppliedState) -> T) -> T {
        f(&self.inner.read().expect("state machine lock poisoned"))
    }

    pub fn snapshots_built(&self) -> u64 {
        self.snapshots_built.load(Ordering::Relaxed)
    }

    fn objects_bytes(state: &ClusterState) -> Vec<u8> {
        StateSnapshot {
            objects: state
                .objects
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..StateSnapshot::default()
        }
        .encode_to_vec()
    }

    /// Writes the whole state into `batch` (after the keys it replaces were removed).
    fn write_state(batch: &mut sled::Batch, state: &ClusterState) {
        batch.insert(GENERATION, &state.generation.to_be_bytes());
        batch.insert(SPEC, state.spec_yaml.as_bytes());
        batch.insert(OBJECTS, Self::objects_bytes(state));
        for c in &state.history {
            batch.insert(history_key(c.generation), c.encode_to_vec());
        }
    }

    fn publish_if_changed(&self, generation: u64, spec_yaml: &str) {
        self.publish.send_if_modified(|p| {
            if p.generation == generation {
                return false;
            }
            *p = Published {
                generation,
                spec_yaml: Arc::from(spec_yaml),
            };
            true
        });
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        Ok(self.read(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut batch = sled::Batch::default();
        let (generation, spec) = {
            let mut guard = self.inner.write().expect("state machine lock poisoned");
            let a = &mut *guard;
            let first_kept_before = a.state.history.front().map(|c| c.generation);
            let generation_before = a.state.generation;
            let mut last = None;
            for entry in entries {
                last = Some(entry.log_id);
                let result = match &entry.payload {
                    EntryPayload::Blank => Applied {
                        generation: a.state.generation,
                        log_index: entry.log_id.index,
                        ..Applied::default()
                    },
                    EntryPayload::Normal(cmd) => a.state.apply(entry.log_id.index, cmd),
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Applied {
                            generation: a.state.generation,
                            log_index: entry.log_id.index,
                            ..Applied::default()
                        }
                    }
                };
                results.push(result);
            }
            let Some(last) = last else {
                return Ok(results);
            };
            a.last_applied = Some(last);
            batch.insert(APPLIED, codec::log_id_to_pb(&last).encode_to_vec());
            batch.insert(
                MEMBERSHIP,
                codec::stored_membership_to_pb(&a.membership).encode_to_vec(),
            );
            if a.state.generation != generation_before {
                batch.insert(GENERATION, &a.state.generation.to_be_bytes());
                batch.insert(SPEC, a.state.spec_yaml.as_bytes());
                batch.insert(OBJECTS, Self::objects_bytes(&a.state));
                for c in a
                    .state
                    .history
                    .iter()
                    .filter(|c| c.generation > generation_before)
                {
                    batch.insert(history_key(c.generation), c.encode_to_vec());
                }
                // Changes that fell out of the bounded history.
                let first_kept = a.state.history.front().map(|c| c.generation);
                if let (Some(from), Some(to)) = (first_kept_before, first_kept) {
                    for g in from..to {
                        batch.remove(history_key(g));
                    }
                }
            }
            (a.state.generation, a.state.spec_yaml.clone())
        };
        self.tree.apply_batch(batch).map_err(write_err)?;
        self.db.flush_async().await.map_err(write_err)?;
        self.publish_if_changed(generation, &spec);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError<NodeId>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError<NodeId>> {
        let state = ClusterState::from_proto(
            StateSnapshot::decode(snapshot.as_slice()).map_err(snapshot_err)?,
        );
        let mut batch = sled::Batch::default();
        for item in self.tree.iter() {
            let (k, _) = item.map_err(read_err)?;
            batch.remove(k);
        }
        Self::write_state(&mut batch, &state);
        if let Some(id) = &meta.last_log_id {
            batch.insert(APPLIED, codec::log_id_to_pb(id).encode_to_vec());
        }
        batch.insert(
            MEMBERSHIP,
            codec::stored_membership_to_pb(&meta.last_membership).encode_to_vec(),
        );
        batch.insert(
            SNAPSHOT,
            pb::StoredSnapshot {
                meta: Some(codec::snapshot_meta_to_pb(meta)),
                data: snapshot.to_vec(),
            }
            .encode_to_vec(),
        );
        self.tree.apply_batch(batch).map_err(snapshot_err)?;
        self.db.flush_async().await.map_err(snapshot_err)?;
        let (generation, spec) = (state.generation, state.spec_yaml.clone());
        {
            let mut a = self.inner.write().expect("state machine lock poisoned");
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
            a.state = state;
        }
        self.publish_if_changed(generation, &spec);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError<NodeId>> {
        let Some(bytes) = self.tree.get(SNAPSHOT).map_err(read_err)? else {
            return Ok(None);
        };
        let stored = pb::StoredSnapshot::decode(bytes.as_ref()).map_err(read_err)?;
        Ok(Some(Snapshot {
            meta: codec::snapshot_meta_from_pb(stored.meta).map_err(read_err)?,
            snapshot: Box::new(stored.data),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError<NodeId>> {
        let (meta, data) = self.read(|a| {
            let n = self.snapshots_built.fetch_add(1, Ordering::Relaxed) + 1;
            let snapshot_id = match &a.last_applied {
                Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, n),
                None => format!("0-0-{n}"),
            };
            (
                SnapshotMeta {
                    last_log_id: a.last_applied,
                    last_membership: a.membership.clone(),
                    snapshot_id,
                },
                a.state.to_proto().encode_to_vec(),
            )
        });
        let stored = pb::StoredSnapshot {
            meta: Some(codec::snapshot_meta_to_pb(&meta)),
            data: data.clone(),
        };
        self.tree
            .insert(SNAPSHOT, stored.encode_to_vec())
            .map_err(snapshot_err)?;
        self.db.flush_async().await.map_err(snapshot_err)?;
        metrics::counter!("tollgate_raft_snapshots_built_total").increment(1);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}
