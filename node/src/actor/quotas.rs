//! Quotas on a running node: the leases the data plane admits from ([`Quotas::admit`]) and
//! the per-tick exchange that keeps them filled (run by [`super::Actors`]).
//!
//! The lease table is sharded behind plain mutexes: a request hashes its key, locks one
//! shard for a map lookup and a decrement, and never waits on anything else.

use rustc_hash::FxHashMap as HashMap;
use std::sync::{Arc, Mutex};

use metrics::Counter;

use super::quota::{Admit, Algorithm, Lease, Report, Span};
use crate::state::spec::{
    FailMode, QuotaAlgorithm, QuotaPer, QuotaScope, QuotaSpec, QuotaUnit, QuotaWindow,
};

const SHARDS: usize = 16;

/// A quota definition, compiled for the data plane.
#[derive(Debug)]
pub struct QuotaDef {
    pub name: Arc<str>,
    /// `name#digest`: a changed definition starts counting afresh.
    pub id: String,
    pub scope: QuotaScope,
    pub limit: u64,
    pub burst: u64,
    pub span: Span,
    pub algorithm: Algorithm,
    pub fail_open: bool,
    pub per_region: bool,
    /// Which requests count: spec routes and APIs by name (both empty: all).
    pub routes: Vec<String>,
    pub apis: Vec<String>,
    pub unit: QuotaUnit,
    pub admitted: Counter,
    pub refused: Counter,
    /// Requests that waited for the next exchange (no token here, budget at the owner).
    pub waited: Counter,
}

impl QuotaDef {
    pub fn compile(name: &str, q: &QuotaSpec) -> QuotaDef {
        let algorithm = match q.algorithm() {
            QuotaAlgorithm::Gcra => Algorithm::Gcra,
            QuotaAlgorithm::Window => Algorithm::Window,
        };
        let span = match q.window {
            QuotaWindow::Month => Span::Month,
            _ => Span::Fixed(q.window_ms()),
        };
        let identity = format!(
            "{:?}/{}/{:?}/{:?}/{}/{:?}/{:?}",
            q.scope,
            q.limit,
            q.window,
            algorithm,
            q.burst(),
            q.per,
            q.unit
        );
        let counter = |result: &'static str| metrics::counter!("tollgate_quota_requests_total", "quota" => name.to_string(), "result" => result);
        QuotaDef {
            name: Arc::from(name),
            id: format!(
                "{name}#{:08x}",
                crate::hash::fnv1a(identity.as_bytes()) as u32
            ),
            scope: q.scope,
            limit: q.limit.max(1) as u64,
            burst: q.burst(),
            span,
            algorithm,
            fail_open: q.fail == FailMode::Open,
            per_region: q.per == QuotaPer::Region,
            routes: q.routes.clone(),
            apis: q.apis.clone(),
            unit: q.unit,
            admitted: counter("admitted"),
            refused: counter("refused"),
            waited: metrics::counter!("tollgate_quota_waits_total", "quota" => name.to_string()),
        }
    }

    /// A tenant's LLM budget as a lease (amounts in nanos of the plan's currency, one
    /// calendar month): the same lease protocol as a quota, its limit what is left after
    /// the committed spend.
    pub fn budget(tenant: &str, fail_open: bool) -> QuotaDef {
        let counter = |result: &'static str| metrics::counter!("tollgate_budget_reservations_total", "tenant" => tenant.to_string(), "result" => result);
        QuotaDef {
            name: Arc::from(BUDGET),
            id: BUDGET.to_string(),
            scope: QuotaScope::Tenant,
            limit: 1,
            burst: 1,
            span: Span::Month,
            algorithm: Algorithm::Window,
            fail_open,
            per_region: false,
            routes: Vec::new(),
            apis: Vec::new(),
            unit: QuotaUnit::Requests,
            admitted: counter("admitted"),
            refused: counter("refused"),
            waited: metrics::counter!("tollgate_budget_waits_total", "tenant" => tenant.to_string()),
        }
    }

    /// A provider's limit for one deployment (tokens or requests per minute), held by the
    /// whole cluster: `llm-tpm` or `llm-rpm`.
    pub fn provider(kind: &'static str, limit: u64, unit: QuotaUnit) -> QuotaDef {
        let counter = |result: &'static str| metrics::counter!("tollgate_llm_provider_quota_total", "quota" => kind, "result" => result);
        QuotaDef {
            name: Arc::from(kind),
            id: format!("{kind}#{limit}"),
            scope: QuotaScope::Route,
            limit: limit.max(1),
            burst: 1,
            span: Span::Fixed(60_000),
            algorithm: Algorithm::Window,
            // The provider enforces its limit anyway: a node cut off from the owner
            // spends its share rather than stop calling.
            fail_open: true,
            per_region: false,
            routes: Vec::new(),
            apis: Vec::new(),
            unit,
            admitted: counter("admitted"),
            refused: counter("refused"),
            waited: counter("waited"),
        }
    }

    /// Counted by the LLM gateway once it has read the request (tokens, or per model),
    /// not at the quota phase.
    pub fn llm_only(&self) -> bool {
        self.unit != QuotaUnit::Requests || self.scope == QuotaScope::Model
    }

    /// Whether requests to the spec route `route` (or to API `api`) count.
    pub fn covers(&self, route: Option<&str>, api: Option<&str>) -> bool {
        (self.routes.is_empty() && self.apis.is_empty())
            || route.is_some_and(|r| self.routes.iter().any(|x| x == r))
            || api.is_some_and(|a| self.apis.iter().any(|x| x == a))
    }

    /// Seconds until a refused caller may try again: the window's end for a counter, the
    /// next token for GCRA (at least 1).
    pub fn retry_after_s(&self, now_ms: u64) -> u64 {
        let ms = match self.algorithm {
            Algorithm::Window => self.span.window(now_ms).2.saturating_sub(now_ms),
            Algorithm::Gcra => self.span.nominal_ms() / self.limit,
        };
        ms.div_ceil(1000).max(1)
    }

    pub fn window_s(&self) -> u64 {
        self.span.nominal_ms() / 1000
    }
}

/// The quota name (and key prefix) of budget leases: `budget/<tenant>`.
pub const BUDGET: &str = "budget";

/// One key's lease and what the tick needs to report it.
pub struct Slot {
    pub def: Arc<QuotaDef>,
    pub lease: Lease,
    /// The owner the last tick reported to (none while cut off).
    pub owner: Option<u64>,
}

/// The quota side of a node.
pub struct Quotas {
    pub node: u64,
    pub region: String,
    shards: Box<[Mutex<HashMap<String, Slot>>]>,
    /// Bumped after every exchange round; requests that wait for a lease watch it.
    rounds: tokio::sync::watch::Sender<u64>,
    /// Members in each scope, for new leases' credit and share: (all, this region).
    members: Mutex<(u64, u64)>,
}

thread_local! {
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Quotas {
    pub fn new(node: u64, region: String) -> Quotas {
        Quotas {
            node,
            region,
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            rounds: tokio::sync::watch::Sender::new(0),
            members: Mutex::new((1, 1)),
        }
    }

    /// The table key of `value` under `def`: `name#digest/value`, with the region for a
    /// per-region quota.
    fn key_into(&self, buf: &mut String, def: &QuotaDef, value: &str) {
        buf.clear();
        buf.push_str(&def.id);
        if def.per_region {
            buf.push('@');
            buf.push_str(&self.region);
        }
        buf.push('/');
        buf.push_str(value);
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Slot>> {
        &self.shards[(crate::hash::fnv1a(key.as_bytes()) as usize) % SHARDS]
    }

    /// Admits one request under `def` for `value` (an API key id, a tenant, ...).
    pub fn admit(&self, def: &Arc<QuotaDef>, value: &str, now_ms: u64, may_wait: bool) -> Admit {
        self.with_lease(def, value, |lease| lease.admit(now_ms, may_wait))
    }

    /// Runs `f` on the lease of `value` under `def`, made (empty) if there is none.
    /// `limit`: the lease's limit when it is made (a budget's is what is left of it).
    pub fn with_lease<T>(
        &self,
        def: &Arc<QuotaDef>,
        value: &str,
        f: impl FnOnce(&mut Lease) -> T,
    ) -> T {
        KEY.with_borrow_mut(|key| {
            self.key_into(key, def, value);
            let mut shard = self.shard(key).lock().expect("quota shard");
            if let Some(slot) = shard.get_mut(key.as_str()) {
                // A budget's key outlives an edit of its fail mode.
                slot.lease.fail_open = def.fail_open;
                return f(&mut slot.lease);
            }
            let members = {
                let m = self.members.lock().expect("members");
                if def.per_region { m.1 } else { m.0 }
            };
            let mut lease = Lease::new(def.algorithm, def.limit, def.span, def.fail_open, members);
            let out = f(&mut lease);
            shard.insert(
                key.clone(),
                Slot {
                    def: def.clone(),
                    lease,
                    owner: None,
                },
            );
            out
        })
    }

    /// Waits for up to `rounds` exchange rounds (bounded by `max`), for a request that
    /// found no token while the owner still had budget.
    pub async fn wait_rounds(&self, rounds: u64, max: std::time::Duration) {
        let mut rx = self.rounds.subscribe();
        let start = *rx.borrow_and_update();
        let _ = tokio::time::timeout(max, async {
            while rx.changed().await.is_ok() {
                if *rx.borrow() >= start + rounds {
                    break;
                }
            }
        })
        .await;
    }

    pub(super) fn round_done(&self) {
        self.rounds.send_modify(|r| *r += 1);
    }

    pub(super) fn set_members(&self, all: u64, region: u64) {
        *self.members.lock().expect("members") = (all.max(1), region.max(1));
    }

    /// Runs `f` over every slot, shard by shard, dropping those for which it returns false.
    pub(super) fn retain(&self, mut f: impl FnMut(&str, &mut Slot) -> bool) {
        for shard in &self.shards {
            shard
                .lock()
                .expect("quota shard")
                .retain(|k, slot| f(k, slot));
        }
    }

    /// Runs `f` over every slot, shard by shard.
    pub fn for_each(&self, mut f: impl FnMut(&str, &Slot)) {
        for shard in &self.shards {
            for (key, slot) in shard.lock().expect("quota shard").iter() {
                f(key, slot);
            }
        }
    }

    /// Runs `f` on the slot of `key`, if it is still there.
    pub(super) fn with_slot(&self, key: &str, f: impl FnOnce(&mut Slot)) {
        if let Some(slot) = self.shard(key).lock().expect("quota shard").get_mut(key) {
            f(slot);
        }
    }

    /// What this node holds, per key, for `/quotas` on the admin port.
    pub fn leases(&self) -> Vec<LeaseView> {
        let mut out = Vec::new();
        self.for_each(|key, slot| {
            out.push(LeaseView {
                key: key.to_string(),
                quota: slot.def.name.to_string(),
                standing: format!("{:?}", slot.lease.standing).to_lowercase(),
                owner: slot.owner,
                held: slot.lease.held(),
                used: slot.lease.used(),
            })
        });
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

#[derive(Debug, serde::Serialize)]
pub struct LeaseView {
    pub key: String,
    pub quota: String,
    pub standing: String,
    pub owner: Option<u64>,
    pub held: u64,
    pub used: u64,
}

/// A report as sent on the wire.
pub fn to_wire(key: &str, def: &QuotaDef, r: &Report) -> tollgate_proto::actor::v1::QuotaReport {
    tollgate_proto::actor::v1::QuotaReport {
        key: key.to_string(),
        limit: r.limit,
        window_ms: def.span.nominal_ms(),
        algorithm: match def.algorithm {
            Algorithm::Window => 0,
            Algorithm::Gcra => 1,
        },
        window: r.window,
        used: r.used,
        held: r.held,
        returned: r.returned,
        want: r.want,
        window_end_ms: r.window_end_ms,
        unleased: r.unleased,
        burst: def.burst,
        applied_index: r.applied_index,
    }
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").field("node", &self.node).finish()
    }
}
