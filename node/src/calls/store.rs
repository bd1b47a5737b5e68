//! Where a node keeps its call log: a fjall database in `<data dir>/calls`.
//!
//! - `records`: chunks of records. Key = the first record's time in microseconds
//!   (big-endian; the writer makes record times strictly increasing), value = the chunk's
//!   `CallRecord`s, each length-delimited. One insert per chunk (at most [`CHUNK`] records
//!   or about [`CHUNK_BYTES`]) rather than per record keeps the write cost to copying. FIFO
//!   compaction: the oldest tables are dropped whole when the keyspace passes its size or
//!   their age passes the retention, which needs keys written in order: they are.
//! - `slow`: key = a minute (big-endian), value = that minute's slowest records (duration and
//!   time, slowest first, at most [`SLOW_PER_MINUTE`]), written when the minute is over. The
//!   slowest calls of an hour read 60 of these instead of every record. FIFO too.
//! - `ids`: the request and trace ids of each block of records, sorted. Key = the block's
//!   first record time, then the first (kind, id) of a run of [`ID_RUN`] ids; value = the
//!   run's (kind, id, time) entries. A block is written whole when it holds [`BLOCK_IDS`]
//!   ids or is [`BLOCK_AGE`] old, so keys are in order (FIFO again) and an id costs no
//!   insert of its own; the block being filled is searched in memory. `blocks` lists each
//!   block's first and last record time (kept in memory too), so finding an id is one seek
//!   per block whose time overlaps the query's range.
//!
//! fjall because it is an LSM (writes are appends, sequential on disk), its FIFO compaction
//! with a TTL drops expired data by deleting files rather than rewriting them, and it is
//! maintained; sled, which holds the Raft log, has no TTL, rewrites pages, and grows.

use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message;
use tollgate_proto::node::v1::CallRecord;

use super::Filter;

/// The slowest records kept per minute for `--slowest` (exact up to this many).
pub const SLOW_PER_MINUTE: usize = 1000;
/// Records a query may look at before it stops and says so.
pub const MAX_EXAMINED: u64 = 2_000_000;
/// Most records in one stored chunk ...
pub const CHUNK: usize = 256;
/// ... and the bytes past which a chunk is stored with fewer.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Ids per stored run of an id block.
pub const ID_RUN: usize = 512;
/// Most ids in one block, and the most time its first id waits to be written.
pub const BLOCK_IDS: usize = 1 << 17;
pub const BLOCK_AGE: Duration = Duration::from_secs(300);
const MINUTE_US: u64 = 60_000_000;

pub const KIND_REQUEST: u8 = 1;
pub const KIND_TRACE: u8 = 2;

/// (kind, id, record time).
pub type IdEntry = (u8, u128, u64);
const ID_ENTRY_BYTES: usize = 1 + 16 + 8;

pub struct Store {
    db: Database,
    records: Keyspace,
    slow: Keyspace,
    ids: Keyspace,
    blocks: Keyspace,
    /// Each stored id block: first record time -> last record time.
    block_times: std::sync::RwLock<BTreeMap<u64, u64>>,
    retention: Duration,
}

/// What a query found.
#[derive(Debug, Default)]
pub struct Found {
    pub records: Vec<CallRecord>,
    pub examined: u64,
    pub truncated: bool,
}

/// The minute the writer is filling: its slowest records so far (a min-heap of
/// (duration, time)).
#[derive(Debug, Default)]
pub struct SlowMinute {
    pub minute: u64,
    pub heap: BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
}

impl SlowMinute {
    pub fn offer(&mut self, duration_us: u64, time_us: u64) {
        if self.heap.len() < SLOW_PER_MINUTE {
            self.heap.push(std::cmp::Reverse((duration_us, time_us)));
        } else if self.heap.peek().is_some_and(|m| m.0.0 < duration_us) {
            self.heap.pop();
            self.heap.push(std::cmp::Reverse((duration_us, time_us)));
        }
    }

    fn entries(&self) -> Vec<(u64, u64)> {
        self.heap.iter().map(|r| r.0).collect()
    }
}

/// The ids of the records written since the last stored block.
#[derive(Debug, Default)]
pub struct IdBlock {
    pub entries: Vec<IdEntry>,
    pub started: Option<std::time::Instant>,
}

impl IdBlock {
    pub fn due(&self) -> bool {
        self.entries.len() >= BLOCK_IDS || self.started.is_some_and(|s| s.elapsed() >= BLOCK_AGE)
    }
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

impl Store {
    /// Opens (or creates) the store. `max_bytes` bounds the records; the slow lists and
    /// id blocks are bounded at a share of it (docs/calls.md).
    pub fn open(dir: &Path, retention: Duration, max_bytes: u64) -> anyhow::Result<Store> {
        let db = Database::builder(dir)
            .manual_journal_persist(true)
            // Chunks are compressed once, in the tables; compressing them in the journal as
            // well cost the writer thread a third of its time.
            .journal_compression(fjall::CompressionType::None)
            .worker_threads(1)
            .cache_size(32 * 1024 * 1024)
            .open()
            .map_err(|e| anyhow::anyhow!("open the call log in {}: {e}", dir.display()))?;
        let ttl = Some(retention.as_secs().max(1));
        let fifo = |limit: u64| {
            move || {
                KeyspaceCreateOptions::default()
                    .manual_journal_persist(true)
                    .max_memtable_size(8 * 1024 * 1024)
                    .compaction_strategy(Arc::new(fjall::compaction::Fifo::new(limit, ttl)))
            }
        };
        let records = db.keyspace("records", fifo(max_bytes))?;
        let slow = db.keyspace("slow", fifo((max_bytes / 100).max(1 << 20)))?;
        let ids = db.keyspace("ids", fifo((max_bytes / 4).max(1 << 20)))?;
        let blocks = db.keyspace("blocks", fifo((max_bytes / 1000).max(1 << 20)))?;
        let mut block_times = BTreeMap::new();
        for kv in blocks.iter() {
            let (k, v) = kv.into_inner()?;
            if let (Some(first), Some(last)) = (be_u64(&k), be_u64(&v)) {
                block_times.insert(first, last);
            }
        }
        Ok(Store {
            db,
            records,
            slow,
            ids,
            blocks,
            block_times: std::sync::RwLock::new(block_times),
            retention,
        })
    }

    /// The newest record time written (0: none), so a restarted writer continues after it.
    pub fn last_time(&self) -> anyhow::Result<u64> {
        let Some(kv) = self.records.last_key_value() else {
            return Ok(0);
        };
        Ok(decode_chunk(&kv.value()?)?.last().map_or(0, |r| r.time_us))
    }

    /// Records older than this are past the retention: never returned, whether or not
    /// compaction has removed them yet.
    fn floor(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.retention.as_micros() as u64)
    }

    /// The oldest record still held (0: none).
    pub fn oldest(&self, now_us: u64) -> anyhow::Result<u64> {
        let floor = self.floor(now_us);
        for chunk in self.chunks(floor, u64::MAX) {
            if let Some(r) = chunk?.into_iter().find(|r| r.time_us >= floor) {
                return Ok(r.time_us);
            }
        }
        Ok(0)
    }

    /// Writes one chunk of records (times strictly increasing, after every stored one).
    /// Nothing is synced: a crash may lose the last records, never corrupt the rest.
    /// Stores a chunk: records as stored (length-delimited, back to back), the first of
    /// them at `first_us`.
    pub fn write_chunk(&self, first_us: u64, records: &[u8]) -> anyhow::Result<()> {
        self.records.insert(first_us.to_be_bytes(), records)?;
        Ok(())
    }

    /// Stores a full (or old enough) block of ids, sorted, in runs.
    pub fn write_ids(&self, block: &mut IdBlock) -> anyhow::Result<()> {
        let (Some(first), Some(last)) = (
            block.entries.iter().map(|e| e.2).min(),
            block.entries.iter().map(|e| e.2).max(),
        ) else {
            block.started = None;
            return Ok(());
        };
        block.entries.sort_unstable();
        let mut b = self.db.batch();
        b.insert(&self.blocks, first.to_be_bytes(), last.to_be_bytes());
        for run in block.entries.chunks(ID_RUN) {
            let mut key = Vec::with_capacity(8 + 17);
            key.extend_from_slice(&first.to_be_bytes());
            key.push(run[0].0);
            key.extend_from_slice(&run[0].1.to_be_bytes());
            let mut v = Vec::with_capacity(run.len() * ID_ENTRY_BYTES);
            for (kind, id, time) in run {
                v.push(*kind);
                v.extend_from_slice(&id.to_be_bytes());
                v.extend_from_slice(&time.to_be_bytes());
            }
            b.insert(&self.ids, key, v);
        }
        b.commit()?;
        let floor = self.floor(super::now_us());
        let mut times = self.block_times.write().expect("block times lock");
        times.insert(first, last);
        // Blocks past the retention are never searched again.
        while times.first_key_value().is_some_and(|(_, &l)| l < floor) {
            times.pop_first();
        }
        drop(times);
        block.entries.clear();
        block.started = None;
        Ok(())
    }

    /// Stores a finished minute's slowest records.
    pub fn write_slow(&self, minute: &SlowMinute) -> anyhow::Result<()> {
        let mut entries = minute.entries();
        entries.sort_unstable_by(|a, b| b.cmp(a));
        let mut v = Vec::with_capacity(entries.len() * 16);
        for (d, k) in entries {
            v.extend_from_slice(&d.to_be_bytes());
            v.extend_from_slice(&k.to_be_bytes());
        }
        self.slow.insert(minute.minute.to_be_bytes(), v)?;
        Ok(())
    }

    /// Flushes what is written to the operating system (called on shutdown).
    pub fn persist(&self) {
        let _ = self.db.persist(PersistMode::Buffer);
    }

    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// The chunks that may hold records in [since, until): the one that starts at or
    /// before `since`, then those that start inside (oldest first; `.rev()` for newest).
    fn chunks(
        &self,
        since: u64,
        until: u64,
    ) -> impl DoubleEndedIterator<Item = anyhow::Result<Vec<CallRecord>>> + '_ {
        let start = match self.records.range(..=since.to_be_bytes()).next_back() {
            Some(kv) => kv.key().ok().and_then(|k| be_u64(&k)).unwrap_or(since),
            None => since,
        };
        self.records
            .range(start.to_be_bytes()..until.to_be_bytes())
            .map(|kv| decode_chunk(&kv.value()?))
    }

    /// The record written at `time`.
    fn get(&self, time: u64) -> anyhow::Result<Option<CallRecord>> {
        let Some(kv) = self.records.range(..=time.to_be_bytes()).next_back() else {
            return Ok(None);
        };
        Ok(decode_chunk(&kv.value()?)?
            .into_iter()
            .find(|r| r.time_us == time))
    }

    /// Runs a query. `current`: the slowest records of the minute being written; `block`:
    /// the ids not stored yet.
    pub fn query(
        &self,
        f: &Filter,
        now_us: u64,
        current: &SlowMinute,
        block: &[IdEntry],
    ) -> anyhow::Result<Found> {
        let since = f.since_us.max(self.floor(now_us));
        let until = if f.until_us == 0 {
            u64::MAX
        } else {
            f.until_us
        };
        if since >= until {
            return Ok(Found::default());
        }
        if let Some((kind, id)) = f.id() {
            return self.by_id(kind, id, since, until, f, block);
        }
        if f.slowest > 0 && f.only_time() && f.slowest as usize <= SLOW_PER_MINUTE {
            return self.slowest_unfiltered(since, until, f, current);
        }
        self.scan(since, until, f)
    }

    fn by_id(
        &self,
        kind: u8,
        id: u128,
        since: u64,
        until: u64,
        f: &Filter,
        block: &[IdEntry],
    ) -> anyhow::Result<Found> {
        let mut times: Vec<u64> = block
            .iter()
            .filter(|e| e.0 == kind && e.1 == id)
            .map(|e| e.2)
            .collect();
        // One seek per stored block that overlaps the range: the run whose first id is at
        // or before this one.
        let blocks: Vec<u64> = self
            .block_times
            .read()
            .expect("block times lock")
            .range(..until)
            .filter(|(_, last)| **last >= since)
            .map(|(first, _)| *first)
            .collect();
        for first in blocks {
            let mut probe = Vec::with_capacity(25);
            probe.extend_from_slice(&first.to_be_bytes());
            probe.push(kind);
            probe.extend_from_slice(&id.to_be_bytes());
            // The id's entries may begin in the run before the one that starts with it.
            let block = first.to_be_bytes().to_vec();
            let from = match self.ids.range(block.clone()..probe.clone()).next_back() {
                Some(kv) => kv.key()?.to_vec(),
                None => block,
            };
            for kv in self.ids.range(from..=probe.clone()) {
                let v = kv.value()?;
                for e in v.chunks_exact(ID_ENTRY_BYTES) {
                    if e[0] == kind && u128::from_be_bytes(e[1..17].try_into()?) == id {
                        times.push(u64::from_be_bytes(e[17..25].try_into()?));
                    }
                }
            }
        }
        let mut found = Found::default();
        times.sort_unstable_by(|a, b| b.cmp(a));
        times.dedup();
        for t in times.into_iter().filter(|t| (since..until).contains(t)) {
            found.examined += 1;
            if let Some(r) = self.get(t)?
                && f.matches(&r)
            {
                found.records.push(r);
                if found.records.len() >= f.limit() {
                    break;
                }
            }
        }
        Ok(found)
    }

    /// The slowest N in a time range with no other filter, from the per-minute lists: a
    /// minute's list holds its slowest [`SLOW_PER_MINUTE`], so its N slowest inside the
    /// range are exact unless the range cuts the minute and leaves fewer than N of the
    /// list inside; that part of the minute is scanned.
    fn slowest_unfiltered(
        &self,
        since: u64,
        until: u64,
        f: &Filter,
        current: &SlowMinute,
    ) -> anyhow::Result<Found> {
        let n = f.slowest as usize;
        let mut candidates: Vec<(u64, u64)> = Vec::new();
        let mut found = Found::default();
        let mut lists: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
        let (first, last) = (since / MINUTE_US, (until - 1) / MINUTE_US);
        for kv in self.slow.range(first.to_be_bytes()..=last.to_be_bytes()) {
            let (k, v) = kv.into_inner()?;
            let Some(minute) = be_u64(&k) else { continue };
            let entries = v
                .chunks_exact(16)
                .filter_map(|c| Some((be_u64(&c[..8])?, be_u64(&c[8..])?)))
                .collect();
            lists.push((minute, entries));
        }
        if (first..=last).contains(&current.minute) {
            lists.push((current.minute, current.entries()));
        }
        for (minute, entries) in lists {
            let full = entries.len() >= SLOW_PER_MINUTE;
            let inside: Vec<(u64, u64)> = entries
                .into_iter()
                .filter(|(_, t)| (since..until).contains(t))
                .collect();
            if full && inside.len() < n {
                // The range cuts this minute: its slowest inside may not be on the list.
                let from = since.max(minute * MINUTE_US);
                let to = until.min((minute + 1) * MINUTE_US);
                let part = self.scan(from, to, f)?;
                found.examined += part.examined;
                found.truncated |= part.truncated;
                candidates.extend(part.records.iter().map(|r| (r.duration_us, r.time_us)));
            } else {
                candidates.extend(inside);
            }
        }
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        candidates.dedup_by_key(|c| c.1);
        for (_, time) in candidates.into_iter().take(n) {
            found.examined += 1;
            if let Some(r) = self.get(time)? {
                found.records.push(r);
            }
        }
        Ok(found)
    }

    /// Looks at every record in the range, newest first, keeping the newest `limit` that
    /// match (or the slowest N), up to [`MAX_EXAMINED`].
    fn scan(&self, since: u64, until: u64, f: &Filter) -> anyhow::Result<Found> {
        let mut found = Found::default();
        let limit = f.limit();
        let mut slowest: BinaryHeap<std::cmp::Reverse<(u64, u64)>> = BinaryHeap::new();
        let mut kept: BTreeMap<u64, CallRecord> = BTreeMap::new();
        'chunks: for chunk in self.chunks(since, until).rev() {
            for r in chunk?.into_iter().rev() {
                if !(since..until).contains(&r.time_us) {
                    continue;
                }
                if found.examined >= MAX_EXAMINED {
                    found.truncated = true;
                    break 'chunks;
                }
                found.examined += 1;
                if !f.matches(&r) {
                    continue;
                }
                if f.slowest == 0 {
                    found.records.push(r);
                    if found.records.len() >= limit {
                        break 'chunks;
                    }
                    continue;
                }
                let entry = (r.duration_us, r.time_us);
                if slowest.len() < f.slowest as usize {
                    slowest.push(std::cmp::Reverse(entry));
                    kept.insert(r.time_us, r);
                } else if slowest.peek().is_some_and(|m| m.0 < entry) {
                    if let Some(std::cmp::Reverse((_, gone))) = slowest.pop() {
                        kept.remove(&gone);
                    }
                    slowest.push(std::cmp::Reverse(entry));
                    kept.insert(r.time_us, r);
                }
            }
        }
        if f.slowest > 0 {
            found.records = kept.into_values().collect();
            found
                .records
                .sort_by_key(|r| std::cmp::Reverse((r.duration_us, r.time_us)));
        }
        Ok(found)
    }
}

fn decode_chunk(mut v: &[u8]) -> anyhow::Result<Vec<CallRecord>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        out.push(CallRecord::decode_length_delimited(&mut v)?);
    }
    Ok(out)
}

/// Request and trace ids are 32 hex digits.
pub fn parse_id(text: &str) -> Option<u128> {
    if text.len() != 32 {
        return None;
    }
    u128::from_str_radix(text, 16).ok().filter(|&v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes records as the writer does.
    fn write(s: &Store, records: &[CallRecord]) {
        let mut v = Vec::new();
        for r in records {
            r.encode_length_delimited(&mut v).unwrap();
        }
        s.write_chunk(records[0].time_us, &v).unwrap();
    }

    fn noisy(i: u64, time_us: u64) -> CallRecord {
        CallRecord {
            time_us,
            request_id: format!("{:032x}", fastrand::u128(1..)),
            path: format!("/x/{:064x}", fastrand::u128(..)),
            duration_us: i,
            ..Default::default()
        }
    }

    fn first_time(s: &Store) -> u64 {
        s.records
            .first_key_value()
            .and_then(|kv| be_u64(&kv.key().ok()?))
            .unwrap_or(0)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn past_its_size_the_oldest_records_go_first() {
        let dir = std::env::temp_dir().join(format!("tollgate-calls-size-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let limit = 1 << 20;
        let s = Store::open(&dir, Duration::from_secs(86_400), limit).unwrap();
        let t0 = super::super::now_us() - 60_000_000;
        let mut t = t0;
        for _ in 0..16 {
            for _ in 0..8 {
                let chunk: Vec<CallRecord> = (0..CHUNK as u64)
                    .map(|i| {
                        t += 1;
                        noisy(i, t)
                    })
                    .collect();
                write(&s, &chunk);
            }
            s.records.rotate_memtable_and_wait().unwrap();
        }
        // 16 tables of about 250 KiB were written; 1 MiB is kept, the oldest dropped.
        wait_for("the oldest tables dropped", || first_time(&s) > t0 + 1);
        assert!(
            s.records.disk_space() <= limit + (512 << 10),
            "{} bytes kept, {} tables",
            s.records.disk_space(),
            s.records.table_count()
        );
        // The newest are still there.
        assert!(s.get(t).unwrap().is_some());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn past_the_retention_records_are_not_returned_and_their_tables_go() {
        let dir = std::env::temp_dir().join(format!("tollgate-calls-age-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open(&dir, Duration::from_secs(1), 1 << 30).unwrap();
        let t0 = super::super::now_us();
        let old: Vec<CallRecord> = (0..10).map(|i| noisy(i, t0 + i)).collect();
        write(&s, &old);
        s.records.rotate_memtable_and_wait().unwrap();
        let f = Filter::parse(&Default::default()).unwrap();
        let live = |s: &Store| {
            s.query(&f, super::super::now_us(), &SlowMinute::default(), &[])
                .unwrap()
                .records
                .len()
        };
        assert_eq!(live(&s), 10);
        std::thread::sleep(Duration::from_millis(1_100));
        assert_eq!(live(&s), 0, "past the retention, never returned");
        // The next flush lets FIFO compaction drop the expired table itself.
        let t1 = super::super::now_us();
        write(&s, &[noisy(0, t1)]);
        s.records.rotate_memtable_and_wait().unwrap();
        wait_for("the expired table dropped", || first_time(&s) >= t1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
