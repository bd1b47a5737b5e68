//! The call log: every request a node serves, failed ones too, recorded on that node and
//! searchable (docs/calls.md).
//!
//! The request path never waits on it. Each data-plane thread encodes its calls into one
//! buffer ([`encode`]) and hands them over in batches through a bounded channel
//! (`try_send`: when the writer is behind, the batch is dropped and counted); one writer
//! thread stamps each record with a strictly increasing time, stores them in chunks
//! ([`store`]), keeps the minute's slowest and the ids of the current block, and holds the
//! newest chunks in memory for `tollgate logs --follow`.

pub mod capture;
pub mod encode;
pub mod store;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prost::Message;

use tollgate_proto::node::v1::{CallQuery, CallQueryResponse, CallRecord};

pub use encode::{Batch, Call};
use store::{IdBlock, SlowMinute, Store};

/// Records a data-plane thread collects before it hands them over ...
const HAND_OVER_AT: usize = 128;
/// ... or bytes, whichever comes first (captured bodies make large records).
const HAND_OVER_BYTES: usize = 256 << 10;
/// Batches waiting for the writer; past this, batches are dropped (and counted).
const QUEUE: usize = 512;
/// Newest records kept in memory for followers.
const LIVE: usize = 16_384;
/// Most records one query returns.
pub const MAX_LIMIT: u32 = 10_000;
const DEFAULT_LIMIT: u32 = 100;

/// The call log's settings (`--call-log`, `--call-log-retention`, `--call-log-max-bytes`).
#[derive(Debug, Clone)]
pub struct CallLogSettings {
    pub enabled: bool,
    pub retention: Duration,
    pub max_bytes: u64,
}

impl Default for CallLogSettings {
    fn default() -> Self {
        CallLogSettings {
            enabled: true,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the writer shares with queries.
#[derive(Default)]
struct Live {
    slow: SlowMinute,
    block: IdBlock,
    /// The newest chunks of records, numbered 1, 2, ... since the node started.
    recent: VecDeque<Arc<LiveChunk>>,
    /// Records in `recent`.
    recent_len: usize,
    written: u64,
}

/// A stored chunk kept for followers: its records' bytes as stored, and the number of
/// its first record.
struct LiveChunk {
    first: u64,
    bytes: Vec<u8>,
    /// Where each record ends.
    ends: Vec<u32>,
}

/// A node's call log.
pub struct CallLog {
    pub node_id: u64,
    tx: SyncSender<Batch>,
    store: Arc<Store>,
    live: Arc<Mutex<Live>>,
    dropped: AtomicU64,
    /// Records handed over and not yet stored.
    pending: Arc<AtomicU64>,
    /// Emptied batches, for the data-plane threads to fill again.
    spare: Arc<Mutex<Vec<Batch>>>,
}

/// Emptied batches kept for reuse ...
const SPARE: usize = 32;
/// ... when they have grown no larger than this.
const SPARE_BYTES: usize = 128 << 10;

impl CallLog {
    /// Opens the store in `<dir>/calls` and starts the writer.
    pub fn open(dir: &Path, node_id: u64, s: &CallLogSettings) -> anyhow::Result<Arc<CallLog>> {
        let store = Arc::new(Store::open(&dir.join("calls"), s.retention, s.max_bytes)?);
        let last = store.last_time()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let live = Arc::new(Mutex::new(Live::default()));
        let pending = Arc::new(AtomicU64::new(0));
        let spare = Arc::new(Mutex::new(Vec::with_capacity(SPARE)));
        {
            let (store, live, pending) = (store.clone(), live.clone(), pending.clone());
            let spare = spare.clone();
            std::thread::Builder::new()
                .name("tollgate-calls".into())
                .spawn(move || write_loop(rx, &store, &live, &pending, &spare, last))?;
        }
        Ok(Arc::new(CallLog {
            node_id,
            tx,
            store,
            live,
            dropped: AtomicU64::new(0),
            pending,
            spare,
        }))
    }

    /// Hands a thread's records to the writer, or drops and counts them when it is behind.
    pub fn hand_over(&self, batch: Batch) {
        let n = batch.len() as u64;
        self.pending.fetch_add(n, Ordering::Relaxed);
        match self.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(n, Ordering::Relaxed);
                self.dropped.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("tollgate_call_log_dropped_total").increment(n);
            }
        }
    }

    /// An empty batch to fill: one the writer is done with, or a new one.
    fn empty_batch(&self) -> Batch {
        let reused = self.spare.lock().expect("call log spare lock").pop();
        reused.unwrap_or_else(|| Batch::with_capacity(HAND_OVER_AT))
    }

    /// Waits up to `limit` for the writer to store what was handed over; true if it did.
    pub fn wait_written(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (up to 2 s) for the writer to store what was handed over, stores the id
    /// block being filled, and flushes to the operating system: a node that stops keeps
    /// its last calls.
    pub fn close(&self) {
        self.wait_written(Duration::from_secs(2));
        {
            let mut live = self.live.lock().expect("call log lock");
            if let Err(e) = self.store.write_ids(&mut live.block) {
                tracing::warn!("call log: storing the last ids failed: {e:#}");
            }
            if !live.slow.heap.is_empty()
                && let Err(e) = self.store.write_slow(&live.slow)
            {
                tracing::warn!("call log: storing the minute's slowest failed: {e:#}");
            }
        }
        self.store.persist();
    }

    /// Answers a query on this node's records (already scoped to what the caller may see).
    pub fn query(&self, q: &CallQuery) -> Result<CallQueryResponse, tonic::Status> {
        let f = Filter::parse(q)?;
        let mut resp = CallQueryResponse {
            node_id: self.node_id,
            dropped: self.dropped(),
            ..Default::default()
        };
        if q.follow {
            // Records are numbered 1, 2, ... as written; the cursor is the next number.
            let (next, chunks) = {
                let live = self.live.lock().expect("call log lock");
                (live.written + 1, live.recent.clone())
            };
            resp.cursor = next;
            if q.after == 0 || q.after >= next {
                return Ok(resp);
            }
            let oldest = chunks.front().map_or(next, |c| c.first);
            resp.missed = oldest.saturating_sub(q.after);
            'chunks: for c in &chunks {
                let mut start = 0;
                for (number, &end) in (c.first..).zip(&c.ends) {
                    let bytes = &c.bytes[start..end as usize];
                    start = end as usize;
                    if number < q.after {
                        continue;
                    }
                    resp.examined += 1;
                    let r = CallRecord::decode_length_delimited(bytes).map_err(|e| {
                        tonic::Status::internal(format!("a call log record is unreadable: {e}"))
                    })?;
                    if f.matches(&r) {
                        resp.records.push(r);
                        if resp.records.len() >= f.limit() {
                            resp.cursor = number + 1;
                            break 'chunks;
                        }
                    }
                }
            }
            return Ok(resp);
        }
        let now = now_us();
        let (slow, block) = {
            let live = self.live.lock().expect("call log lock");
            let slow = SlowMinute {
                minute: live.slow.minute,
                heap: live.slow.heap.clone(),
            };
            let block = match f.id() {
                Some(_) => live.block.entries.clone(),
                None => Vec::new(),
            };
            (slow, block)
        };
        let found = self.store.query(&f, now, &slow, &block).map_err(|e| {
            tonic::Status::internal(format!("the call log could not be read: {e:#}"))
        })?;
        resp.records = found.records;
        resp.examined = found.examined;
        resp.truncated = found.truncated;
        resp.oldest_us = self.store.oldest(now).unwrap_or(0);
        Ok(resp)
    }

    pub fn disk_bytes(&self) -> u64 {
        self.store.disk_bytes()
    }
}

/// The chunk the writer is filling: records as stored, and what it needs of each.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    ends: Vec<u32>,
    calls: Vec<encode::Meta>,
}

impl Chunk {
    fn full(&self) -> bool {
        self.calls.len() >= store::CHUNK || self.bytes.len() >= store::CHUNK_BYTES
    }
}

fn write_loop(
    rx: Receiver<Batch>,
    store: &Store,
    live: &Mutex<Live>,
    pending: &AtomicU64,
    spare: &Mutex<Vec<Batch>>,
    mut last: u64,
) {
    let mut chunk = Chunk::default();
    let mut gauge_at = Instant::now();
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(b) => Some(b),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let (mut n, mut consumed) = (0u64, 0u64);
        for batch in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            consumed += batch.len() as u64;
            for (meta, body) in batch.records() {
                // Strictly increasing times: the store's keys, and the order followers see.
                last = meta.time_us.max(last + 1);
                encode::append_stored(&mut chunk.bytes, last, body);
                chunk.ends.push(chunk.bytes.len() as u32);
                let mut meta = *meta;
                meta.time_us = last;
                chunk.calls.push(meta);
                if chunk.full() {
                    n += store_chunk(store, live, &mut chunk);
                }
            }
            if batch.capacity() <= SPARE_BYTES {
                let mut spare = spare.lock().expect("call log spare lock");
                if spare.len() < SPARE {
                    let mut batch = batch;
                    batch.clear();
                    spare.push(batch);
                }
            }
            if n > 4 * store::CHUNK as u64 {
                break;
            }
        }
        n += store_chunk(store, live, &mut chunk);
        if n > 0 {
            metrics::counter!("tollgate_call_log_records_total").increment(n);
        }
        pending.fetch_sub(consumed, Ordering::Relaxed);
        // An id block due, even when no record came. (A minute's slowest are stored when
        // a record of a later minute comes; until then queries read them from memory.)
        let mut l = live.lock().expect("call log lock");
        if l.block.due()
            && let Err(e) = store.write_ids(&mut l.block)
        {
            tracing::warn!("call log: storing ids failed: {e:#}");
        }
        drop(l);
        if gauge_at.elapsed() >= Duration::from_secs(10) {
            gauge_at = Instant::now();
            metrics::gauge!("tollgate_call_log_disk_bytes").set(store.disk_bytes() as f64);
        }
    }
}

fn finish_minute(store: &Store, l: &mut Live, minute: u64) {
    if !l.slow.heap.is_empty()
        && let Err(e) = store.write_slow(&l.slow)
    {
        tracing::warn!("call log: storing a minute's slowest failed: {e:#}");
    }
    l.slow = SlowMinute {
        minute,
        ..Default::default()
    };
}

/// Stores a chunk and records it for queries and followers; returns how many it held.
fn store_chunk(store: &Store, live: &Mutex<Live>, chunk: &mut Chunk) -> u64 {
    let Some(first) = chunk.calls.first() else {
        return 0;
    };
    let n = chunk.calls.len() as u64;
    let stored = store.write_chunk(first.time_us, &chunk.bytes);
    // The bytes and ends go to the follow window; the next chunk starts at this one's size.
    let next = Chunk {
        bytes: Vec::with_capacity(chunk.bytes.len().min(store::CHUNK_BYTES)),
        ends: Vec::with_capacity(store::CHUNK),
        calls: Vec::with_capacity(store::CHUNK),
    };
    let Chunk { bytes, ends, calls } = std::mem::replace(chunk, next);
    if let Err(e) = stored {
        tracing::warn!("call log: a write failed, {n} records lost: {e:#}");
        metrics::counter!("tollgate_call_log_dropped_total").increment(n);
        return 0;
    }
    let mut l = live.lock().expect("call log lock");
    for m in &calls {
        let minute = m.time_us / 60_000_000;
        if minute != l.slow.minute {
            finish_minute(store, &mut l, minute);
        }
        l.slow.offer(m.duration_us, m.time_us);
        for (kind, id) in [
            (store::KIND_REQUEST, m.request_id),
            (store::KIND_TRACE, m.trace_id),
        ] {
            if id != 0 {
                l.block.entries.push((kind, id, m.time_us));
            }
        }
    }
    l.block.started.get_or_insert_with(Instant::now);
    let first = l.written + 1;
    l.written += n;
    l.recent_len += ends.len();
    l.recent
        .push_back(Arc::new(LiveChunk { first, bytes, ends }));
    while l
        .recent
        .front()
        .is_some_and(|c| l.recent_len - c.ends.len() >= LIVE)
    {
        let gone = l.recent.pop_front().expect("checked above");
        l.recent_len -= gone.ends.len();
    }
    if l.block.due()
        && let Err(e) = store.write_ids(&mut l.block)
    {
        tracing::warn!("call log: storing ids failed: {e:#}");
    }
    n
}

/// A data-plane thread's records waiting to be handed over.
pub struct CallBuffer {
    log: Arc<CallLog>,
    buf: std::cell::RefCell<Batch>,
}

impl CallBuffer {
    pub fn new(log: Arc<CallLog>) -> CallBuffer {
        CallBuffer {
            log,
            buf: std::cell::RefCell::new(Batch::with_capacity(HAND_OVER_AT)),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.log.node_id
    }

    pub fn push(&self, c: &Call<'_>) {
        let mut buf = self.buf.borrow_mut();
        buf.push(c);
        if buf.len() >= HAND_OVER_AT || buf.bytes() >= HAND_OVER_BYTES {
            let batch = std::mem::replace(&mut *buf, self.log.empty_batch());
            drop(buf);
            self.log.hand_over(batch);
        }
    }

    /// Hands over what is waiting (the thread's flush timer, and its end).
    pub fn flush(&self) {
        let batch = std::mem::take(&mut *self.buf.borrow_mut());
        if !batch.is_empty() {
            self.log.hand_over(batch);
        }
    }
}

/// A status filter: one status or a class.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Status {
    Any,
    Exact(u32),
    Class(u32),
}

/// A query's conditions, checked.
#[derive(Debug, Clone)]
pub struct Filter {
    pub since_us: u64,
    pub until_us: u64,
    api: String,
    version: String,
    tenant: String,
    key_id: String,
    model: String,
    status: Status,
    error: String,
    trace_id: Option<u128>,
    request_id: Option<u128>,
    min_duration_us: u64,
    pub slowest: u32,
    limit: u32,
}

impl Filter {
    pub fn parse(q: &CallQuery) -> Result<Filter, tonic::Status> {
        let bad = |m: String| Err(tonic::Status::invalid_argument(m));
        for (what, v) in [
            ("api", &q.api),
            ("version", &q.version),
            ("tenant", &q.tenant),
            ("key", &q.key_id),
            ("model", &q.model),
            ("error", &q.error),
        ] {
            if v.len() > 256 {
                return bad(format!("{what} is longer than 256 bytes"));
            }
        }
        let status = match q.status.as_str() {
            "" => Status::Any,
            s if s.len() == 3 && s.ends_with("xx") => match s[..1].parse::<u32>() {
                Ok(c @ 1..=5) => Status::Class(c),
                _ => {
                    return bad(format!(
                        "status {s:?}: give a status (404) or a class (1xx to 5xx)"
                    ));
                }
            },
            s => match s.parse::<u32>() {
                Ok(c @ 100..=599) => Status::Exact(c),
                _ => {
                    return bad(format!(
                        "status {s:?}: give a status (404) or a class (1xx to 5xx)"
                    ));
                }
            },
        };
        let id = |what: &str, text: &str| -> Result<Option<u128>, tonic::Status> {
            if text.is_empty() {
                return Ok(None);
            }
            store::parse_id(text).map(Some).ok_or_else(|| {
                tonic::Status::invalid_argument(format!(
                    "{what} {text:?} is not an id: it is 32 hex digits (as in x-request-id or a traceparent)"
                ))
            })
        };
        if q.limit > MAX_LIMIT || q.slowest > MAX_LIMIT {
            return bad(format!("at most {MAX_LIMIT} records a query"));
        }
        if q.until_us != 0 && q.until_us <= q.since_us {
            return bad("the range is empty: since must be before until".into());
        }
        Ok(Filter {
            since_us: q.since_us,
            until_us: q.until_us,
            api: q.api.clone(),
            version: q.version.clone(),
            tenant: q.tenant.clone(),
            key_id: q.key_id.clone(),
            model: q.model.clone(),
            status,
            error: q.error.clone(),
            trace_id: id("trace id", &q.trace_id)?,
            request_id: id("request id", &q.request_id)?,
            min_duration_us: q.min_duration_us,
            slowest: q.slowest,
            limit: if q.limit == 0 { DEFAULT_LIMIT } else { q.limit },
        })
    }

    pub fn limit(&self) -> usize {
        if self.slowest > 0 {
            self.slowest as usize
        } else {
            self.limit as usize
        }
    }

    /// An id to look up, when the query names one.
    pub fn id(&self) -> Option<(u8, u128)> {
        self.request_id
            .map(|id| (store::KIND_REQUEST, id))
            .or(self.trace_id.map(|id| (store::KIND_TRACE, id)))
    }

    /// Only a time range (and perhaps --slowest): the per-minute lists answer it.
    pub fn only_time(&self) -> bool {
        self.api.is_empty()
            && self.version.is_empty()
            && self.tenant.is_empty()
            && self.key_id.is_empty()
            && self.model.is_empty()
            && self.status == Status::Any
            && self.error.is_empty()
            && self.trace_id.is_none()
            && self.request_id.is_none()
            && self.min_duration_us == 0
    }

    pub fn matches(&self, r: &CallRecord) -> bool {
        let eq = |want: &str, have: &str| want.is_empty() || want == have;
        eq(&self.api, &r.api)
            && eq(&self.version, &r.version)
            && eq(&self.tenant, &r.tenant)
            && eq(&self.key_id, &r.key_id)
            && eq(&self.model, &r.model)
            && eq(&self.error, &r.error)
            && match self.status {
                Status::Any => true,
                Status::Exact(s) => r.status == s,
                Status::Class(c) => r.status / 100 == c,
            }
            && self
                .trace_id
                .is_none_or(|id| store::parse_id(&r.trace_id) == Some(id))
            && self
                .request_id
                .is_none_or(|id| store::parse_id(&r.request_id) == Some(id))
            && r.duration_us >= self.min_duration_us
            && r.time_us >= self.since_us
            && (self.until_us == 0 || r.time_us < self.until_us)
    }
}

/// `id` as 32 lowercase hex digits (without the formatting machinery: once per request).
pub fn hex_id(id: u128) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for byte in id.to_be_bytes() {
        out.push(DIGITS[(byte >> 4) as usize] as char);
        out.push(DIGITS[(byte & 15) as usize] as char);
    }
    out
}

/// The client's address of a record, as text (empty when it has none).
pub fn client_text(r: &CallRecord) -> String {
    let ip = if let Ok(b) = <[u8; 4]>::try_from(r.client_ip.as_slice()) {
        std::net::IpAddr::from(b)
    } else if let Ok(b) = <[u8; 16]>::try_from(r.client_ip.as_slice()) {
        std::net::IpAddr::from(b)
    } else {
        return String::new();
    };
    std::net::SocketAddr::new(ip, r.client_port as u16).to_string()
}

/// Up to ten calls of `api@version` since `since_us` that show a metric going wrong (its
/// 5xx for `errors`, else its slowest), as evidence for a rollout verdict or an alert.
/// Empty when the call log is off or cannot be read.
pub async fn sample(
    log: Option<Arc<CallLog>>,
    api: &str,
    version: &str,
    since_us: u64,
    metric: &str,
) -> Vec<tollgate_proto::state::v1::FailingCall> {
    let Some(log) = log else {
        return Vec::new();
    };
    let errors = metric == "errors";
    let q = CallQuery {
        api: api.to_string(),
        version: version.to_string(),
        since_us,
        status: if errors { "5xx".into() } else { String::new() },
        slowest: if errors { 0 } else { 10 },
        limit: 10,
        ..Default::default()
    };
    match tokio::task::spawn_blocking(move || log.query(&q)).await {
        Ok(Ok(found)) => found
            .records
            .into_iter()
            .map(|r| tollgate_proto::state::v1::FailingCall {
                request_id: r.request_id,
                trace_id: r.trace_id,
                status: r.status,
                error: r.error,
                node_id: r.node_id,
                time_us: r.time_us,
                duration_us: r.duration_us,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A new request id: 32 hex digits, random (never zero).
pub fn new_request_id() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests;
