//! The Raft log, vote and committed index in sled (openraft storage v2).
//!
//! Durability: an append, a vote, a truncation and a purge are flushed (fsync) before they
//! are reported done; openraft counts an entry towards a quorum only after the flush
//! callback fires (docs/architecture.md, decision 10, pitfall 1). Appends return as soon as
//! the entries are readable and a flusher thread fires their callbacks once flushed:
//! openraft can then replicate while the leader's own flush is in progress (as etcd does),
//! and appends that arrive during a flush share the next one (group commit). Entries are
//! `tollgate.raft.v1.Entry` messages keyed by their index, big-endian, so sled's key order
//! is log order.

// openraft's StorageError is large; it is the storage traits' error type, not ours to shrink.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogReader, StorageError, StorageIOError};
use prost::Message;
use tollgate_proto::raft::v1 as pb;

use super::codec;
use super::{Entry, LogId, NodeId, TypeConfig, Vote};

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";

/// The log store. Cheap to clone: sled trees are shared handles.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// The committed index + 1 (0: none), for status and metrics.
    committed: Arc<AtomicU64>,
    /// The committed log id, and the last one written to disk.
    committed_id: Arc<std::sync::Mutex<Option<LogId>>>,
    committed_written: Arc<std::sync::Mutex<Option<LogId>>>,
    /// Callbacks of appends waiting for the flusher thread.
    flusher: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

fn io(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(io(e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(io(e)).into()
}

/// The thread that flushes appended entries and then reports them durable, in order. It
/// ends when the last `LogStore` handle is dropped.
fn spawn_flusher(db: sled::Db) -> std::io::Result<std::sync::mpsc::Sender<LogFlushed<TypeConfig>>> {
    let (tx, rx) = std::sync::mpsc::channel::<LogFlushed<TypeConfig>>();
    std::thread::Builder::new()
        .name("tollgate-log-flush".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                // Everything queued so far was written before this flush starts.
                let mut waiting = vec![first];
                waiting.extend(rx.try_iter());
                let result = db.flush().map(|_| ());
                for callback in waiting {
                    callback.log_io_completed(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| std::io::Error::other(e.to_string())),
                    );
                }
            }
        })?;
    Ok(tx)
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    pub fn open(db: &sled::Db) -> anyhow::Result<LogStore> {
        let store = LogStore {
            db: db.clone(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            committed: Arc::default(),
            committed_id: Arc::default(),
            committed_written: Arc::default(),
            flusher: spawn_flusher(db.clone())?,
        };
        Ok(store)
    }

    /// Writes the committed log id if it moved since the last call (not flushed: the next
    /// log flush carries it). Called every 100 ms by the node.
    pub fn persist_committed(&self) -> anyhow::Result<()> {
        let current = *self.committed_id.lock().expect("committed lock");
        let mut written = self.committed_written.lock().expect("committed lock");
        if let Some(id) = current
            && current != *written
        {
            self.meta
                .insert(COMMITTED, codec::log_id_to_pb(&id).encode_to_vec())?;
            *written = current;
        }
        Ok(())
    }

    /// The last committed log index this node knows of.
    pub fn committed_index(&self) -> Option<u64> {
        self.committed.load(Ordering::Relaxed).checked_sub(1)
    }

    fn get_log_id(&self, key: &[u8]) -> Result<Option<LogId>, StorageError<NodeId>> {
        let Some(bytes) = self.meta.get(key).map_err(read_err)? else {
            return Ok(None);
        };
        let id = pb::LogId::decode(bytes.as_ref()).map_err(read_err)?;
        Ok(Some(codec::log_id_from_pb(id).map_err(read_err)?))
    }

    async fn flush(&self) -> Result<(), StorageError<NodeId>> {
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    fn decode_entry(bytes: &[u8]) -> Result<Entry, StorageError<NodeId>> {
        let e = pb::Entry::decode(bytes).map_err(read_err)?;
        codec::entry_from_pb(e).map_err(read_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range::<[u8; 8], _>((start, end)) {
            let (_, value) = item.map_err(read_err)?;
            out.push(Self::decode_entry(&value)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id = self.get_log_id(LAST_PURGED)?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, value)) => Some(Self::decode_entry(&value)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError<NodeId>> {
        let bytes = codec::vote_to_pb(vote).encode_to_vec();
        self.meta
            .insert(VOTE, bytes)
            .map_err(|e| StorageError::from(StorageIOError::write_vote(io(e))))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(io(e))))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError<NodeId>> {
        let read = |e: &dyn std::fmt::Display| -> StorageError<NodeId> {
            StorageIOError::read_vote(AnyError::error(e.to_string())).into()
        };
        let Some(bytes) = self.meta.get(VOTE).map_err(|e| read(&e))? else {
            return Ok(None);
        };
        let v = pb::Vote::decode(bytes.as_ref()).map_err(|e| read(&e))?;
        Ok(Some(codec::vote_from_pb(Some(v)).map_err(|e| read(&e))?))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        // Kept in memory here and written by `persist_committed` every 100 ms: it only tells
        // a restarting node how far it may re-apply its own log before it hears from a
        // leader (the state machine lives in memory, see state_machine.rs). Writing it on
        // every commit cost a sled write, with its thread wake-ups, on every node.
        let index = committed.map(|id| id.index + 1).unwrap_or(0);
        self.committed.store(index, Ordering::Relaxed);
        *self.committed_id.lock().expect("committed lock") = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        self.get_log_id(COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(
                &key(entry.log_id.index),
                codec::entry_to_pb(&entry).encode_to_vec(),
            );
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        // Readable now; durable (and so reported done) only once the flusher has flushed.
        self.flusher
            .send(callback)
            .map_err(|_| write_err(std::io::Error::other("the log flusher thread has stopped")))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(key(log_id.index)..) {
            let (k, _) = item.map_err(read_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        // The purge point first: a crash in between leaves entries that are known purged.
        self.meta
            .insert(LAST_PURGED, codec::log_id_to_pb(&log_id).encode_to_vec())
            .map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(read_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.flush().await
    }
}
