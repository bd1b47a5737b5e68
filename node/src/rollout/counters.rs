//! What each node counts of a running rollout's two versions, for the judge: lock-free
//! counters the request path adds to, taken (and zeroed) every actor tick.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_proto::actor::v1::VersionCounts;
use tollgate_proto::state::v1::RolloutState;

use crate::state::usage::{LATENCY_BUCKETS, latency_bucket};

const N: usize = LATENCY_BUCKETS as usize;

/// One version's counts since the last take.
#[derive(Debug)]
pub struct VersionCounter {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; N],
    ttft: [AtomicU64; N],
    cost: [AtomicU64; N],
}

impl Default for VersionCounter {
    fn default() -> Self {
        VersionCounter {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            ttft: std::array::from_fn(|_| AtomicU64::new(0)),
            cost: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn take(buckets: &[AtomicU64; N]) -> BTreeMap<u32, u64> {
    buckets
        .iter()
        .enumerate()
        .filter_map(|(i, b)| match b.swap(0, Ordering::Relaxed) {
            0 => None,
            n => Some((i as u32, n)),
        })
        .collect()
}

fn restore(buckets: &[AtomicU64; N], from: &BTreeMap<u32, u64>) {
    for (&i, &n) in from {
        if let Some(b) = buckets.get(i as usize) {
            b.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl VersionCounter {
    /// One answered request: its status, duration, and for LLM calls its time to first
    /// token and cost (nanos).
    pub fn record(
        &self,
        status: u16,
        duration_us: u64,
        ttft_us: Option<u64>,
        cost_nanos: Option<u64>,
    ) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency[latency_bucket(duration_us) as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(t) = ttft_us {
            self.ttft[latency_bucket(t) as usize].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = cost_nanos {
            self.cost[latency_bucket(c) as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn take(&self, version: &str) -> VersionCounts {
        VersionCounts {
            version: version.to_string(),
            requests: self.requests.swap(0, Ordering::Relaxed),
            errors: self.errors.swap(0, Ordering::Relaxed),
            latency: take(&self.latency),
            ttft: take(&self.ttft),
            cost: take(&self.cost),
        }
    }

    /// Puts back counts whose report was not delivered (the next owner gets them).
    pub fn restore(&self, c: &VersionCounts) {
        self.requests.fetch_add(c.requests, Ordering::Relaxed);
        self.errors.fetch_add(c.errors, Ordering::Relaxed);
        restore(&self.latency, &c.latency);
        restore(&self.ttft, &c.ttft);
        restore(&self.cost, &c.cost);
    }
}

/// A running rollout's counters on this node.
#[derive(Debug)]
pub struct RolloutCounters {
    pub api: Arc<str>,
    pub id: u64,
    pub step: u32,
    pub canary: Arc<str>,
    pub stable: Arc<str>,
    pub canary_counts: VersionCounter,
    pub stable_counts: VersionCounter,
}

impl RolloutCounters {
    /// The counter of `version`, when it is one of the rollout's two.
    pub fn of(&self, version: &str) -> Option<&VersionCounter> {
        if version == &*self.canary {
            Some(&self.canary_counts)
        } else if version == &*self.stable {
            Some(&self.stable_counts)
        } else {
            None
        }
    }
}

/// Running rollouts' counters by API, for the data plane's snapshot.
pub type Counters = HashMap<Arc<str>, Arc<RolloutCounters>>;

/// The counters for `rollouts` (the running ones), reusing `old`'s for a rollout still at
/// the same step so no count is lost when the snapshot is rebuilt.
pub fn for_rollouts(rollouts: &BTreeMap<String, RolloutState>, old: &Counters) -> Counters {
    rollouts
        .values()
        .filter(|r| super::state::running(r))
        .map(|r| {
            let api: Arc<str> = Arc::from(r.api.as_str());
            let counters = match old.get(&api) {
                Some(c) if c.id == r.id && c.step == r.step => c.clone(),
                _ => Arc::new(RolloutCounters {
                    api: api.clone(),
                    id: r.id,
                    step: r.step,
                    canary: Arc::from(r.canary.as_str()),
                    stable: Arc::from(r.stable.as_str()),
                    canary_counts: VersionCounter::default(),
                    stable_counts: VersionCounter::default(),
                }),
            };
            (api, counters)
        })
        .collect()
}
