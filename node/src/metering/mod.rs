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
use tollgate_proto::state::v1::{LatencyEntry, LlmEntry, UsageCounts, UsageEntry};

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
    /// The gateway's error code, when it answered by itself.
    pub error: Option<&'static str>,
    /// An LLM request's cost at its tenant's prices (nanos), when the tenant is on a plan.
    pub cost_nanos: Option<u64>,
    /// An LLM request's model, provider, tokens and calls.
    pub llm: Option<&'a LlmSample>,
}

/// What metering counts of an LLM request.
#[derive(Debug, Default, Clone)]
pub struct LlmSample {
    /// The model the caller asked for.
    pub model: Arc<str>,
    /// The provider and the deployment that answered (empty when none did).
    pub provider: Arc<str>,
    pub deployment: Arc<str>,
    /// The provider's model id that answered, for per-model prices.
    pub upstream_model: Arc<str>,
    pub usage: crate::llm::ir::Usage,
    pub estimated: bool,
    /// Each provider call: (deployment, provider, failed). The last is the one that
    /// answered unless it failed.
    pub calls: Vec<(Arc<str>, Arc<str>, bool)>,
    pub ttft_us: Option<u64>,
    /// Streamed answers: first token to last.
    pub output_us: Option<u64>,
    pub incomplete: bool,
    /// The deployment's upstream cluster (`<api>@<version>/llm/<model>/<deployment>`).
    pub upstream: Option<Arc<str>>,
    /// What the provider's answer named: its id, its model, why it stopped.
    pub response_id: String,
    pub response_model: String,
    pub finish: Option<String>,
    /// The answer's text, kept only when the operator captures content in traces.
    pub output_text: Option<String>,
    /// Answered from the response cache.
    pub cached: bool,
}

/// What a drain takes: usage rows, latency histograms and LLM call entries.
#[derive(Default)]
pub struct Drained {
    pub entries: Vec<UsageEntry>,
    pub latencies: Vec<LatencyEntry>,
    pub llm: Vec<LlmEntry>,
}

impl Drained {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.latencies.is_empty() && self.llm.is_empty()
    }
}

/// Every data-plane thread's shard, for the journal task to drain.
#[derive(Default)]
pub struct Meter {
    shards: Mutex<Vec<Arc<Mutex<Shard>>>>,
    /// LLM spend against hard-capped budgets on its way into the committed spend.
    pub spend: Spend,
}

/// Amounts (nanos) by tenant.
pub type Amounts = HashMap<Arc<str>, u64>;

/// A node's LLM spend against budgets, followed from the request to the committed spend
/// (docs/llm.md, budgets): recorded after the request's usage row, then journaled with
/// the next batch, then shipped at a Raft log index. Once this node has applied that
/// index, the spend is in the committed spend its budget limits are computed from, and
/// the budget lease stops counting it ([`Spend::settle`]). A cost is never attributed to
/// a batch earlier than its usage row's, so it is never settled before it is committed.
#[derive(Default)]
pub struct Spend {
    inner: Mutex<SpendInner>,
}

#[derive(Default)]
struct SpendInner {
    unjournaled: Amounts,
    /// By the last journal sequence number of the drain that took them.
    journaled: std::collections::BTreeMap<u64, Amounts>,
    /// By the log index their batch was committed at.
    shipped: Vec<(u64, Amounts)>,
    last_index: u64,
}

fn merge_amounts(into: &mut Amounts, from: Amounts) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

impl Spend {
    /// A request's final spend against `tenant`'s budget (after its usage was recorded).
    pub fn record(&self, tenant: &Arc<str>, nanos: u64) {
        if nanos > 0 {
            let mut s = self.inner.lock().expect("spend lock");
            *s.unjournaled.entry(tenant.clone()).or_default() += nanos;
        }
    }

    /// The journal wrote batches up to `seq` (None: it wrote none).
    pub fn journaled(&self, seq: Option<u64>) {
        let mut s = self.inner.lock().expect("spend lock");
        let taken = std::mem::take(&mut s.unjournaled);
        if taken.is_empty() {
            return;
        }
        match seq {
            Some(seq) => merge_amounts(s.journaled.entry(seq).or_default(), taken),
            None => match s.journaled.last_entry() {
                // Their rows are in a batch not shipped yet, or already shipped.
                Some(mut e) => merge_amounts(e.get_mut(), taken),
                None => {
                    let index = s.last_index;
                    s.shipped.push((index, taken));
                }
            },
        }
    }

    /// The batch with sequence number `seq` was committed at `index`.
    pub fn shipped(&self, seq: u64, index: u64) {
        let mut s = self.inner.lock().expect("spend lock");
        s.last_index = s.last_index.max(index);
        let later = s.journaled.split_off(&(seq + 1));
        let done = std::mem::replace(&mut s.journaled, later);
        for (_, amounts) in done {
            s.shipped.push((index, amounts));
        }
    }

    /// What is committed as of `applied` (this node's last applied log index).
    pub fn settle(&self, applied: u64) -> Amounts {
        let mut s = self.inner.lock().expect("spend lock");
        let mut out = Amounts::default();
        let mut keep = Vec::new();
        for (index, amounts) in std::mem::take(&mut s.shipped) {
            if index <= applied {
                merge_amounts(&mut out, amounts);
            } else {
                keep.push((index, amounts));
            }
        }
        s.shipped = keep;
        out
    }
}

impl Meter {
    /// A new shard for one data-plane thread.
    pub fn shard(&self) -> Arc<Mutex<Shard>> {
        let shard = Arc::new(Mutex::new(Shard::default()));
        self.shards.lock().expect("meter lock").push(shard.clone());
        shard
    }

    /// Takes everything counted so far, merged across threads.
    pub fn drain(&self) -> Drained {
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
    model: Option<Arc<str>>,
    provider: Option<Arc<str>>,
    deployment: Option<Arc<str>>,
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
    /// LLM calls by (minute, api, version, model, deployment, provider).
    llm: HashMap<crate::state::usage::LlmKey, LlmEntry>,
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
        let model = s.llm.map(|l| &l.model);
        let provider = s.llm.map(|l| &l.provider);
        let deployment = s.llm.map(|l| &l.deployment);
        if s.llm.is_some() {
            (text(model), text(provider), text(deployment)).hash(&mut h);
        }
        let row_hash = h.finish();

        let rows = self.rows.entry(row_hash).or_default();
        let row = match rows.iter().position(|r| {
            r.minute == s.minute
                && same(&r.tenant, s.tenant)
                && same(&r.api, s.api)
                && same(&r.version, s.version)
                && same(&r.key, s.key)
                && same(&r.model, model)
                && same(&r.provider, provider)
                && same(&r.deployment, deployment)
        }) {
            Some(i) => &mut rows[i],
            None => {
                rows.push(Row {
                    minute: s.minute,
                    tenant: s.tenant.cloned(),
                    api: s.api.cloned(),
                    version: s.version.cloned(),
                    key: s.key.cloned(),
                    model: model.cloned(),
                    provider: provider.cloned(),
                    deployment: deployment.cloned(),
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
        *c.latency.entry(latency_bucket(s.latency_us)).or_default() += 1;
        match (s.error, s.status) {
            (Some(code), _) => *c.errors.entry(code.to_string()).or_default() += 1,
            (None, 400..) => *c.errors.entry(format!("status_{}", s.status)).or_default() += 1,
            _ => {}
        }
        if let Some(l) = s.llm {
            let u = &l.usage;
            c.input_tokens += u.input;
            c.output_tokens += u.output;
            c.cached_input_tokens += u.cached_input;
            c.cache_write_tokens += u.cache_write;
            c.reasoning_tokens += u.reasoning;
            if l.estimated {
                c.estimated += 1;
            }
            if l.cached {
                c.cached_requests += 1;
            }
            *c.tokens_per_request
                .entry(latency_bucket(u.input + u.output))
                .or_default() += 1;
            if let Some(cost) = s.cost_nanos {
                *c.cost_per_request.entry(latency_bucket(cost)).or_default() += 1;
            }
            if u.input + u.output > 0 && !l.upstream_model.is_empty() {
                *c.tokens.entry(l.upstream_model.to_string()).or_default() += u.input + u.output;
            }
            self.record_llm(s, l);
        }

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

    fn record_llm(&mut self, s: &Sample, l: &LlmSample) {
        let last = l.calls.len().saturating_sub(1);
        for (i, (deployment, provider, failed)) in l.calls.iter().enumerate() {
            let key = (
                s.minute,
                text(s.api).to_string(),
                text(s.version).to_string(),
                l.model.to_string(),
                deployment.to_string(),
                provider.to_string(),
            );
            let e = self.llm.entry(key).or_default();
            e.calls += 1;
            if *failed {
                e.failures += 1;
                continue;
            }
            if i != last {
                continue;
            }
            e.input_tokens += l.usage.input;
            e.output_tokens += l.usage.output;
            if let Some(t) = l.ttft_us {
                *e.ttft.entry(latency_bucket(t)).or_default() += 1;
            }
            if let Some(us) = l.output_us {
                e.streamed_output_tokens += l.usage.output;
                e.output_us += us;
            }
            if l.incomplete {
                e.incomplete += 1;
            }
        }
    }

    fn merge(&mut self, other: Shard) {
        for (key, e) in other.llm {
            crate::state::usage::add_llm(self.llm.entry(key).or_default(), &e);
        }
        for (hash, rows) in other.rows {
            let mine = self.rows.entry(hash).or_default();
            for row in rows {
                match mine.iter_mut().find(|r| {
                    r.minute == row.minute
                        && r.tenant == row.tenant
                        && r.api == row.api
                        && r.version == row.version
                        && r.key == row.key
                        && r.model == row.model
                        && r.provider == row.provider
                        && r.deployment == row.deployment
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

    fn into_entries(self) -> Drained {
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
                model: owned(r.model),
                provider: owned(r.provider),
                deployment: owned(r.deployment),
            })
            .collect();
        entries.sort_by(|a, b| {
            (
                a.minute,
                &a.tenant,
                &a.api,
                &a.version,
                &a.key,
                &a.model,
                &a.provider,
                &a.deployment,
            )
                .cmp(&(
                    b.minute,
                    &b.tenant,
                    &b.api,
                    &b.version,
                    &b.key,
                    &b.model,
                    &b.provider,
                    &b.deployment,
                ))
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
        let mut llm: Vec<(crate::state::usage::LlmKey, LlmEntry)> = self.llm.into_iter().collect();
        llm.sort_by(|a, b| a.0.cmp(&b.0));
        let llm = llm
            .into_iter()
            .map(|(k, e)| LlmEntry {
                minute: k.0,
                api: k.1,
                version: k.2,
                model: k.3,
                deployment: k.4,
                provider: k.5,
                ..e
            })
            .collect();
        Drained {
            entries,
            latencies,
            llm,
        }
    }
}

#[cfg(test)]
mod tests;
