//! Usage rollups (docs/architecture.md, decision 8): what every node's data plane counted,
//! applied once per batch and kept per minute for two days, then per hour.
//!
//! A batch is identified by (node, journal, sequence). Each node ships its journal's
//! batches in order and one at a time, so a batch at or below the last one applied from
//! the same journal is a retry (an answer lost, a leader change) and changes nothing.

use std::collections::BTreeMap;

use tollgate_proto::state::v1::{
    LatencyEntry, LlmEntry, StateSnapshot, UsageBatch, UsageCounts, UsageEntry, UsageSource,
};

/// How long rollups stay per minute before they are folded into hours.
pub const MINUTE_RETENTION_MINUTES: u64 = 2 * 24 * 60;

/// Latency histogram buckets, four per power of two: bucket 4k + j holds durations in
/// [(4 + j) / 4 * 2^k, (5 + j) / 4 * 2^k) µs (at most 25% wide); the last one everything
/// from about 10 minutes up.
pub const LATENCY_BUCKETS: u32 = 120;

/// One rollup row's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    pub minute: u64,
    pub tenant: String,
    pub api: String,
    pub version: String,
    pub key: String,
    /// LLM requests: the model asked for and the provider that answered.
    pub model: String,
    pub provider: String,
    pub deployment: String,
}

/// An LLM entry's identity: (minute, api, version, model, deployment, provider).
pub type LlmKey = (u64, String, String, String, String, String);

/// A latency histogram's identity: (minute, api, version).
pub type LatencyKey = (u64, String, String);
pub type Histogram = BTreeMap<u32, u64>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// The last batch applied from each node: (journal, sequence).
    pub sources: BTreeMap<u64, (u64, u64)>,
    pub minutes: BTreeMap<RowKey, UsageCounts>,
    /// Rows older than [`MINUTE_RETENTION_MINUTES`], by the hour's first minute.
    pub hours: BTreeMap<RowKey, UsageCounts>,
    pub latency_minutes: BTreeMap<LatencyKey, Histogram>,
    pub latency_hours: BTreeMap<LatencyKey, Histogram>,
    pub llm_minutes: BTreeMap<LlmKey, LlmEntry>,
    pub llm_hours: BTreeMap<LlmKey, LlmEntry>,
    /// Minutes before this one have been folded into hours.
    compacted_to: u64,
}

/// Adds `from` into `into`.
pub fn add_counts(into: &mut UsageCounts, from: &UsageCounts) {
    into.requests += from.requests;
    into.class_1xx += from.class_1xx;
    into.class_2xx += from.class_2xx;
    into.class_3xx += from.class_3xx;
    into.class_4xx += from.class_4xx;
    into.class_5xx += from.class_5xx;
    into.refused += from.refused;
    into.request_bytes += from.request_bytes;
    into.response_bytes += from.response_bytes;
    into.upstream_us += from.upstream_us;
    for (model, n) in &from.tokens {
        *into.tokens.entry(model.clone()).or_default() += n;
    }
    into.input_tokens += from.input_tokens;
    into.output_tokens += from.output_tokens;
    into.cached_input_tokens += from.cached_input_tokens;
    into.cache_write_tokens += from.cache_write_tokens;
    into.reasoning_tokens += from.reasoning_tokens;
    into.estimated += from.estimated;
    into.cached_requests += from.cached_requests;
    for (code, n) in &from.errors {
        *into.errors.entry(code.clone()).or_default() += n;
    }
    for (into, from) in [
        (&mut into.latency, &from.latency),
        (&mut into.tokens_per_request, &from.tokens_per_request),
        (&mut into.cost_per_request, &from.cost_per_request),
    ] {
        for (&bucket, &n) in from {
            *into.entry(bucket.min(LATENCY_BUCKETS - 1)).or_default() += n;
        }
    }
}

/// Adds `from`'s counts into `into` (the key fields are `into`'s).
pub fn add_llm(into: &mut LlmEntry, from: &LlmEntry) {
    into.calls += from.calls;
    into.failures += from.failures;
    into.input_tokens += from.input_tokens;
    into.output_tokens += from.output_tokens;
    into.streamed_output_tokens += from.streamed_output_tokens;
    into.output_us += from.output_us;
    into.incomplete += from.incomplete;
    for (&bucket, &n) in &from.ttft {
        *into
            .ttft
            .entry(bucket.min(LATENCY_BUCKETS - 1))
            .or_default() += n;
    }
}

pub fn llm_key(e: &LlmEntry) -> LlmKey {
    (
        e.minute,
        e.api.clone(),
        e.version.clone(),
        e.model.clone(),
        e.deployment.clone(),
        e.provider.clone(),
    )
}

fn llm_row(k: &LlmKey, e: &LlmEntry) -> LlmEntry {
    LlmEntry {
        minute: k.0,
        api: k.1.clone(),
        version: k.2.clone(),
        model: k.3.clone(),
        deployment: k.4.clone(),
        provider: k.5.clone(),
        ..e.clone()
    }
}

pub fn add_histogram(into: &mut Histogram, from: &BTreeMap<u32, u64>) {
    for (&bucket, &n) in from {
        *into.entry(bucket.min(LATENCY_BUCKETS - 1)).or_default() += n;
    }
}

/// The bucket of a duration in microseconds.
pub fn latency_bucket(us: u64) -> u32 {
    if us <= 1 {
        return 0;
    }
    // The top bit's position, then the next two bits: which quarter of the octave.
    let top = 63 - us.leading_zeros();
    let frac = if top >= 2 {
        (us >> (top - 2)) & 0b11
    } else {
        (us << (2 - top)) & 0b11
    };
    (top * 4 + frac as u32).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of a bucket in microseconds (what a percentile in it is reported as).
pub fn bucket_upper_us(bucket: u32) -> u64 {
    let top = bucket / 4;
    let frac = u64::from(bucket % 4);
    // (4 + frac + 1) / 4 * 2^top
    ((4 + frac + 1) << top) / 4
}

/// The duration below which `q` (0..=1) of the histogram's samples fall, as the upper bound
/// of the bucket that holds it (µs). None for an empty histogram.
pub fn percentile_us(h: &Histogram, q: f64) -> Option<u64> {
    let total: u64 = h.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (&bucket, &n) in h {
        seen += n;
        if seen >= rank {
            return Some(bucket_upper_us(bucket));
        }
    }
    h.keys().last().map(|&b| bucket_upper_us(b))
}

impl Usage {
    /// Applies a batch; false when it is a retry of one already applied.
    pub fn apply_batch(&mut self, b: &UsageBatch, now_ms: u64) -> bool {
        if let Some(&(journal, seq)) = self.sources.get(&b.node_id)
            && journal == b.journal_id
            && b.seq <= seq
        {
            return false;
        }
        self.sources.insert(b.node_id, (b.journal_id, b.seq));
        self.compact(now_ms);
        for e in &b.entries {
            let (rows, minute) = if e.minute < self.compacted_to {
                (&mut self.hours, e.minute / 60 * 60)
            } else {
                (&mut self.minutes, e.minute)
            };
            let key = RowKey {
                minute,
                tenant: e.tenant.clone(),
                api: e.api.clone(),
                version: e.version.clone(),
                key: e.key.clone(),
                model: e.model.clone(),
                provider: e.provider.clone(),
                deployment: e.deployment.clone(),
            };
            add_counts(
                rows.entry(key).or_default(),
                &e.counts.clone().unwrap_or_default(),
            );
        }
        for l in &b.latencies {
            let (rows, minute) = if l.minute < self.compacted_to {
                (&mut self.latency_hours, l.minute / 60 * 60)
            } else {
                (&mut self.latency_minutes, l.minute)
            };
            let key = (minute, l.api.clone(), l.version.clone());
            add_histogram(rows.entry(key).or_default(), &l.buckets);
        }
        for e in &b.llm {
            let (rows, minute) = if e.minute < self.compacted_to {
                (&mut self.llm_hours, e.minute / 60 * 60)
            } else {
                (&mut self.llm_minutes, e.minute)
            };
            let mut key = llm_key(e);
            key.0 = minute;
            add_llm(rows.entry(key).or_default(), e);
        }
        true
    }

    /// Folds minute rows older than the retention into hours (deterministic: `now_ms` is
    /// the command's time).
    fn compact(&mut self, now_ms: u64) {
        let cutoff = (now_ms / 60_000).saturating_sub(MINUTE_RETENTION_MINUTES) / 60 * 60;
        if cutoff <= self.compacted_to {
            return;
        }
        self.compacted_to = cutoff;
        let keep = self.minutes.split_off(&RowKey {
            minute: cutoff,
            ..RowKey::default()
        });
        for (mut key, counts) in std::mem::replace(&mut self.minutes, keep) {
            key.minute = key.minute / 60 * 60;
            add_counts(self.hours.entry(key).or_default(), &counts);
        }
        let keep = self
            .latency_minutes
            .split_off(&(cutoff, String::new(), String::new()));
        for ((minute, api, version), h) in std::mem::replace(&mut self.latency_minutes, keep) {
            add_histogram(
                self.latency_hours
                    .entry((minute / 60 * 60, api, version))
                    .or_default(),
                &h,
            );
        }
        let keep = self.llm_minutes.split_off(&(
            cutoff,
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ));
        for (mut key, e) in std::mem::replace(&mut self.llm_minutes, keep) {
            key.0 = key.0 / 60 * 60;
            add_llm(self.llm_hours.entry(key).or_default(), &e);
        }
    }

    /// LLM entries whose minute (or hour) starts in [since, until), hours first.
    pub fn llm(&self, since_minute: u64, until_minute: u64) -> Vec<LlmEntry> {
        let mut out = Vec::new();
        if since_minute >= until_minute {
            return out;
        }
        let from = (
            since_minute,
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        );
        for rows in [&self.llm_hours, &self.llm_minutes] {
            for (k, e) in rows.range(from.clone()..) {
                if k.0 >= until_minute {
                    break;
                }
                out.push(llm_row(k, e));
            }
        }
        out
    }

    /// Rows whose minute (or hour) starts in [since, until), hours first, as entries.
    pub fn entries(&self, since_minute: u64, until_minute: u64) -> Vec<UsageEntry> {
        let mut out = Vec::new();
        if since_minute >= until_minute {
            return out;
        }
        let range = |rows: &BTreeMap<RowKey, UsageCounts>, out: &mut Vec<UsageEntry>| {
            let from = RowKey {
                minute: since_minute,
                ..RowKey::default()
            };
            for (k, c) in rows.range(from..) {
                if k.minute >= until_minute {
                    break;
                }
                out.push(entry(k, c));
            }
        };
        range(&self.hours, &mut out);
        range(&self.minutes, &mut out);
        out
    }

    /// Latency histograms in [since, until), hours first.
    pub fn latencies(&self, since_minute: u64, until_minute: u64) -> Vec<LatencyEntry> {
        let mut out = Vec::new();
        if since_minute >= until_minute {
            return out;
        }
        for rows in [&self.latency_hours, &self.latency_minutes] {
            for ((minute, api, version), h) in
                rows.range((since_minute, String::new(), String::new())..)
            {
                if *minute >= until_minute {
                    break;
                }
                out.push(latency_entry(*minute, api, version, h));
            }
        }
        out
    }

    pub fn to_proto(&self, out: &mut StateSnapshot) {
        out.usage_sources = self
            .sources
            .iter()
            .map(|(&node_id, &(journal_id, seq))| UsageSource {
                node_id,
                journal_id,
                seq,
            })
            .collect();
        out.usage_minutes = self.minutes.iter().map(|(k, c)| entry(k, c)).collect();
        out.usage_hours = self.hours.iter().map(|(k, c)| entry(k, c)).collect();
        let latencies = |rows: &BTreeMap<LatencyKey, Histogram>| {
            rows.iter()
                .map(|((m, a, v), h)| latency_entry(*m, a, v, h))
                .collect()
        };
        out.latency_minutes = latencies(&self.latency_minutes);
        out.latency_hours = latencies(&self.latency_hours);
        out.llm_minutes = self
            .llm_minutes
            .iter()
            .map(|(k, e)| llm_row(k, e))
            .collect();
        out.llm_hours = self.llm_hours.iter().map(|(k, e)| llm_row(k, e)).collect();
        out.usage_compacted_to = self.compacted_to;
    }

    pub fn from_proto(p: &StateSnapshot) -> Usage {
        let rows = |entries: &[UsageEntry]| {
            let mut out = BTreeMap::new();
            for e in entries {
                add_counts(
                    out.entry(row_key(e)).or_default(),
                    &e.counts.clone().unwrap_or_default(),
                );
            }
            out
        };
        let latencies = |entries: &[LatencyEntry]| {
            let mut out: BTreeMap<LatencyKey, Histogram> = BTreeMap::new();
            for l in entries {
                add_histogram(
                    out.entry((l.minute, l.api.clone(), l.version.clone()))
                        .or_default(),
                    &l.buckets,
                );
            }
            out
        };
        let llm = |entries: &[LlmEntry]| {
            let mut out: BTreeMap<LlmKey, LlmEntry> = BTreeMap::new();
            for e in entries {
                add_llm(out.entry(llm_key(e)).or_default(), e);
            }
            out
        };
        Usage {
            llm_minutes: llm(&p.llm_minutes),
            llm_hours: llm(&p.llm_hours),
            sources: p
                .usage_sources
                .iter()
                .map(|s| (s.node_id, (s.journal_id, s.seq)))
                .collect(),
            minutes: rows(&p.usage_minutes),
            hours: rows(&p.usage_hours),
            latency_minutes: latencies(&p.latency_minutes),
            latency_hours: latencies(&p.latency_hours),
            compacted_to: p.usage_compacted_to,
        }
    }
}

fn row_key(e: &UsageEntry) -> RowKey {
    RowKey {
        minute: e.minute,
        tenant: e.tenant.clone(),
        api: e.api.clone(),
        version: e.version.clone(),
        key: e.key.clone(),
        model: e.model.clone(),
        provider: e.provider.clone(),
        deployment: e.deployment.clone(),
    }
}

fn entry(k: &RowKey, c: &UsageCounts) -> UsageEntry {
    UsageEntry {
        minute: k.minute,
        tenant: k.tenant.clone(),
        api: k.api.clone(),
        version: k.version.clone(),
        key: k.key.clone(),
        counts: Some(c.clone()),
        model: k.model.clone(),
        provider: k.provider.clone(),
        deployment: k.deployment.clone(),
    }
}

fn latency_entry(minute: u64, api: &str, version: &str, h: &Histogram) -> LatencyEntry {
    LatencyEntry {
        minute,
        api: api.to_string(),
        version: version.to_string(),
        buckets: h.iter().map(|(&b, &n)| (b, n)).collect(),
    }
}

#[cfg(test)]
mod tests;
