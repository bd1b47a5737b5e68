//! The metering journal: what the data plane counted, written to this node's sled store
//! (and flushed) before it is shipped, and deleted only once the cluster has applied it.
//!
//! Batches are numbered 1, 2, 3 ... within a journal whose id is made once, with the store.
//! They are shipped oldest first and one at a time; a batch whose answer was lost is sent
//! again, and the state machine applies it once (see `state::usage`). A node that restarts
//! ships what its journal still holds.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_util::sync::CancellationToken;
use tollgate_proto::node::v1::WriteRequest;
use tollgate_proto::state::v1::{Command, UsageBatch, command};

use super::Meter;
use crate::auth::principal::Caller;
use crate::raft::cluster::Cluster;

const JOURNAL_ID: &[u8] = b"journal_id";
const NEXT_SEQ: &[u8] = b"next_seq";
/// Batch keys: this prefix and the sequence, big-endian (so they sort in order).
const BATCH: u8 = b'b';
/// Entries per batch: keeps one Raft entry well under the command size limit.
pub const MAX_ENTRIES: usize = 2_000;

pub struct Journal {
    node_id: u64,
    journal_id: u64,
    db: sled::Db,
    tree: sled::Tree,
    meter: Arc<Meter>,
    /// Serializes journaling and shipping (the periodic task and the final flush).
    lock: tokio::sync::Mutex<()>,
}

fn batch_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = BATCH;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn u64_of(v: Option<sled::IVec>) -> Option<u64> {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
}

impl Journal {
    pub fn open(db: &sled::Db, node_id: u64, meter: Arc<Meter>) -> anyhow::Result<Journal> {
        let tree = db.open_tree("metering_journal")?;
        let journal_id = match u64_of(tree.get(JOURNAL_ID)?) {
            Some(id) => id,
            None => {
                let id = fastrand::u64(1..);
                tree.insert(JOURNAL_ID, &id.to_be_bytes())?;
                db.flush()?;
                id
            }
        };
        let pending = tree.scan_prefix([BATCH]).count();
        if pending > 0 {
            tracing::info!(
                batches = pending,
                "the metering journal holds usage not yet shipped; shipping it"
            );
        }
        Ok(Journal {
            node_id,
            journal_id,
            db: db.clone(),
            tree,
            meter,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Batches journaled and not yet applied by the cluster.
    pub fn pending(&self) -> usize {
        self.tree.scan_prefix([BATCH]).count()
    }

    /// Moves what the data plane counted into the journal (flushed to disk).
    async fn journal(&self) -> anyhow::Result<usize> {
        let drained = self.meter.drain();
        if drained.is_empty() {
            self.meter.spend.journaled(None);
            return Ok(0);
        }
        let crate::metering::Drained {
            entries,
            latencies,
            llm,
        } = drained;
        let mut llm = Some(llm);
        let mut seq = u64_of(self.tree.get(NEXT_SEQ)?).unwrap_or(1);
        let mut written = 0;
        let mut latencies = Some(latencies);
        let chunks: Vec<_> = if entries.is_empty() {
            vec![Vec::new()]
        } else {
            entries.chunks(MAX_ENTRIES).map(<[_]>::to_vec).collect()
        };
        let mut batch = sled::Batch::default();
        for chunk in chunks {
            let b = UsageBatch {
                node_id: self.node_id,
                journal_id: self.journal_id,
                seq,
                entries: chunk,
                // Histograms are few (per API version and minute): all in the first batch.
                latencies: latencies.take().unwrap_or_default(),
                llm: llm.take().unwrap_or_default(),
            };
            batch.insert(&batch_key(seq), b.encode_to_vec());
            seq += 1;
            written += 1;
        }
        batch.insert(NEXT_SEQ, &seq.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.db.flush_async().await?;
        self.meter.spend.journaled(Some(seq - 1));
        metrics::gauge!("tollgate_metering_journal_batches").set(self.pending() as f64);
        Ok(written)
    }

    /// Ships journaled batches, oldest first, until one fails (it is retried next time).
    async fn ship(&self, cluster: &Cluster) -> Result<usize, String> {
        let mut shipped = 0;
        while let Some(Ok((key, bytes))) = self.tree.scan_prefix([BATCH]).next() {
            let batch = UsageBatch::decode(bytes.as_ref()).map_err(|e| {
                // Written by this code; a batch that does not decode would block every one
                // after it, so it is set aside and said loudly.
                let _ = self.tree.remove(&key);
                format!("a journaled usage batch does not decode and was dropped: {e}")
            })?;
            let seq = batch.seq;
            let cmd = Command {
                kind: Some(command::Kind::Usage(batch)),
                ..Command::default()
            };
            let req = WriteRequest { command: Some(cmd) };
            match cluster.write_command(req, false, &Caller::Node).await {
                Ok(resp) => {
                    self.meter.spend.shipped(seq, resp.log_index);
                    // Applied (or a retry of one applied): it may go.
                    self.tree.remove(&key).map_err(|e| e.to_string())?;
                    shipped += 1;
                    metrics::counter!("tollgate_metering_batches_total", "outcome" => "shipped")
                        .increment(1);
                }
                Err(e) => {
                    metrics::counter!("tollgate_metering_batches_total", "outcome" => "failed")
                        .increment(1);
                    return Err(e.message().to_string());
                }
            }
        }
        metrics::gauge!("tollgate_metering_journal_batches").set(self.pending() as f64);
        Ok(shipped)
    }

    /// Journals what was counted, then ships what the journal holds.
    pub async fn tick(&self, cluster: &Cluster) -> Result<(), String> {
        let _one = self.lock.lock().await;
        self.journal()
            .await
            .map_err(|e| format!("cannot write the metering journal: {e:#}"))?;
        self.ship(cluster).await.map(|_| ())
    }

    /// Every `interval` until `stop`.
    pub async fn run(
        self: Arc<Self>,
        cluster: Arc<Cluster>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when shipping has failed, and when that was last said.
        let mut failing: Option<(std::time::Instant, Option<std::time::Instant>)> = None;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.tick(&cluster).await {
                Ok(()) => {
                    if let Some((since, Some(_))) = failing.take() {
                        tracing::info!(
                            "usage batches are being shipped again, after {:.0?}",
                            since.elapsed()
                        );
                    }
                }
                Err(e) => {
                    // Kept in the journal and retried. A leader that restarts or changes
                    // stops shipping for a moment: said at WARN once it has lasted
                    // SHIPPING_STALLED, then every minute.
                    let now = std::time::Instant::now();
                    let (since, said) = failing.get_or_insert((now, None));
                    let say = match said {
                        None => now.duration_since(*since) >= SHIPPING_STALLED,
                        Some(t) => now.duration_since(*t) >= Duration::from_secs(60),
                    };
                    if say {
                        *said = Some(now);
                        tracing::warn!(
                            pending = self.pending(),
                            "usage has been journaled but not shipped for {:.0?} (retrying): {e}",
                            since.elapsed()
                        );
                    }
                }
            }
        }
    }
}

/// How long shipping may fail (a leader restarting or changing) before it is a warning.
const SHIPPING_STALLED: Duration = Duration::from_secs(10);
