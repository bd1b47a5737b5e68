//! Metering (docs/architecture.md, decision 8): every request the data plane answers is
//! counted per (tenant, API, version, key, minute) in memory, journaled to this node's sled
//! store every `--meter-interval`, and shipped from the journal through Raft in batches
//! that are applied once (see `state::usage`).
//!
//! On the request path this is one uncontended lock per request: each data-plane thread
//! counts into its own [`Shard`], which the journal task swaps out once per interval.
//! What a node can lose is what it counted and had not journaled when it died: at most
//! one interval of its requests (docs/metering.md).

pub mod alerts;
pub mod journal;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use rustc_hash::FxHasher;
use tollgate_proto::state::v1::{LatencyEntry, UsageCounts, UsageEntry};

use crate::state::usage::{LATENCY_BUCKETS, latency_bucket};

/// One answered request, as metering sees it.
pub struct Sample<'a> {
    pub minute: u64,
    pub tenant: Option<&'a Arc<str>>,
    pub api: Option<&'a Arc<str>>,
    pub version: Option<&'a Arc<str>>,
    pub key: Option<&'a Arc<str>>,
    pub status: u16,
    /// Answered without reaching an upstream.
    pub refused: bool,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub upstream_us: u64,
    pub latency_us: u64,
}

/// Every data-plane thread's shard, for the journal task to drain.
#[derive(Default)]
pub struct Meter {
    shards: Mutex<Vec<Arc<Mutex<Shard>>>>,
}

impl Meter {
    /// A new shard for one data-plane thread.
    pub fn shard(&self) -> Arc<Mutex<Shard>> {
        let shard = Arc::new(Mutex::new(Shard::default()));
        self.shards.lock().expect("meter lock").push(shard.clone());
        shard
    }

    /// Takes everything counted so far, merged across threads.
    pub fn drain(&self) -> (Vec<UsageEntry>, Vec<LatencyEntry>) {
        let shards: Vec<_> = self.shards.lock().expect("meter lock").clone();
        let mut merged = Shard::default();
        for shard in shards {
            let taken = std::mem::take(&mut *shard.lock().expect("meter shard lock"));
            merged.merge(taken);
        }
        merged.into_entries()
    }
}

struct Row {
    minute: u64,
    tenant: Option<Arc<str>>,
    api: Option<Arc<str>>,
    version: Option<Arc<str>>,
    key: Option<Arc<str>>,
    counts: UsageCounts,
}

struct Latency {
    minute: u64,
    api: Option<Arc<str>>,
    version: Option<Arc<str>>,
    buckets: Vec<u64>,
}

/// One thread's counts since the last drain.
#[derive(Default)]
pub struct Shard {
    /// By a hash of the row's identity; a collision shares the vector.
    rows: HashMap<u64, Vec<Row>, rustc_hash::FxBuildHasher>,
    latencies: HashMap<u64, Vec<Latency>, rustc_hash::FxBuildHasher>,
}

fn text(s: Option<&Arc<str>>) -> &str {
    s.map_or("", |s| s)
}

fn same(a: &Option<Arc<str>>, b: Option<&Arc<str>>) -> bool {
    a.as_deref().unwrap_or("") == text(b)
}

impl Shard {
    pub fn record(&mut self, s: &Sample) {
        let mut h = FxHasher::default();
        (s.minute, text(s.api), text(s.version)).hash(&mut h);
        let latency_hash = h.finish();
        (text(s.tenant), text(s.key)).hash(&mut h);
        let row_hash = h.finish();

        let rows = self.rows.entry(row_hash).or_default();
        let row = match rows.iter().position(|r| {
            r.minute == s.minute
                && same(&r.tenant, s.tenant)
                && same(&r.api, s.api)
                && same(&r.version, s.version)
                && same(&r.key, s.key)
        }) {
            Some(i) => &mut rows[i],
            None => {
                rows.push(Row {
                    minute: s.minute,
                    tenant: s.tenant.cloned(),
                    api: s.api.cloned(),
                    version: s.version.cloned(),
                    key: s.key.cloned(),
                    counts: UsageCounts::default(),
                });
                rows.last_mut().expect("just pushed")
            }
        };
        let c = &mut row.counts;
        c.requests += 1;
        match s.status {
            100..=199 => c.class_1xx += 1,
            200..=299 => c.class_2xx += 1,
            300..=399 => c.class_3xx += 1,
            400..=499 => c.class_4xx += 1,
            _ => c.class_5xx += 1,
        }
        if s.refused {
            c.refused += 1;
        }
        c.request_bytes += s.request_bytes;
        c.response_bytes += s.response_bytes;
        c.upstream_us += s.upstream_us;

        let latencies = self.latencies.entry(latency_hash).or_default();
        let l = match latencies.iter().position(|l| {
            l.minute == s.minute && same(&l.api, s.api) && same(&l.version, s.version)
        }) {
            Some(i) => &mut latencies[i],
            None => {
                latencies.push(Latency {
                    minute: s.minute,
                    api: s.api.cloned(),
                    version: s.version.cloned(),
                    buckets: vec![0; LATENCY_BUCKETS as usize],
                });
                latencies.last_mut().expect("just pushed")
            }
        };
        l.buckets[latency_bucket(s.latency_us) as usize] += 1;
    }

    fn merge(&mut self, other: Shard) {
        for (hash, rows) in other.rows {
            let mine = self.rows.entry(hash).or_default();
            for row in rows {
                match mine.iter_mut().find(|r| {
                    r.minute == row.minute
                        && r.tenant == row.tenant
                        && r.api == row.api
                        && r.version == row.version
                        && r.key == row.key
                }) {
                    Some(r) => crate::state::usage::add_counts(&mut r.counts, &row.counts),
                    None => mine.push(row),
                }
            }
        }
        for (hash, latencies) in other.latencies {
            let mine = self.latencies.entry(hash).or_default();
            for l in latencies {
                match mine
                    .iter_mut()
                    .find(|m| m.minute == l.minute && m.api == l.api && m.version == l.version)
                {
                    Some(m) => {
                        for (a, b) in m.buckets.iter_mut().zip(&l.buckets) {
                            *a += b;
                        }
                    }
                    None => mine.push(l),
                }
            }
        }
    }

    fn into_entries(self) -> (Vec<UsageEntry>, Vec<LatencyEntry>) {
        let owned = |s: Option<Arc<str>>| s.map(|s| s.to_string()).unwrap_or_default();
        let mut entries: Vec<UsageEntry> = self
            .rows
            .into_values()
            .flatten()
            .map(|r| UsageEntry {
                minute: r.minute,
                tenant: owned(r.tenant),
                api: owned(r.api),
                version: owned(r.version),
                key: owned(r.key),
                counts: Some(r.counts),
            })
            .collect();
        entries.sort_by(|a, b| {
            (a.minute, &a.tenant, &a.api, &a.version, &a.key)
                .cmp(&(b.minute, &b.tenant, &b.api, &b.version, &b.key))
        });
        let mut latencies: Vec<LatencyEntry> = self
            .latencies
            .into_values()
            .flatten()
            .map(|l| LatencyEntry {
                minute: l.minute,
                api: owned(l.api),
                version: owned(l.version),
                buckets: l
                    .buckets
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(i, n)| (i as u32, *n))
                    .collect(),
            })
            .collect();
        latencies
            .sort_by(|a, b| (a.minute, &a.api, &a.version).cmp(&(b.minute, &b.api, &b.version)));
        (entries, latencies)
    }
}

#[cfg(test)]
mod tests;
