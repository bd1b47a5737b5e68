//! Virtual actors (docs/architecture.md, decision 6): every live counter (a quota key, an
//! upstream's circuit) has one owner node, chosen by rendezvous hashing ([`ownership`])
//! over the members this node can reach. Any node computes the same owner from the same
//! view, with no lookup table to replicate; when a member leaves or stops answering, only
//! the keys it owned move, and they spread evenly over the others.
//!
//! - [`quota`]: the lease protocol as pure state (the owner's ledger, a node's lease).
//! - [`quotas`]: the lease table the data plane admits from.
//! - [`Actors`]: the owner's mailbox (one tokio task that holds every ledger this node
//!   owns, fed by local and remote exchanges) and the tick that, every [`TICK_MS`], sends
//!   each owner one batched `Exchange` over gRPC and applies the grants.
//!
//! A node that cannot reach a majority of the members owns nothing and asks no one: every
//! quota follows its fail mode until it can.

pub mod ownership;
pub mod quota;
pub mod quotas;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tollgate_proto::actor::v1 as pb;
use tollgate_proto::actor::v1::actors_client::ActorsClient;
use tollgate_proto::actor::v1::actors_server::{Actors as ActorsRpc, ActorsServer};
use tonic::{Request, Response, Status};

use crate::auth::principal::Caller;
use crate::proxy::Shared;
use crate::raft::cluster::Cluster;
use crate::raft::network::Peers;
use crate::routing::circuit::{CircuitBook, Outcomes, Verdict};
use crate::routing::upstream::Cluster as UpstreamCluster;
use crate::state::circuit::{Phase, phase};
use crate::state::snapshot::Snapshot;
use quota::{Algorithm, Grant, Ledger, Report, TICK_MS};
use quotas::{Quotas, to_wire};
use tollgate_proto::state::v1::{
    CircuitCommand, CircuitMode, CircuitTransition, Command, circuit_command, command,
};

/// How long a remote exchange may take before the owner counts as unreachable.
const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(100);
/// Failed exchanges in a row after which a peer is taken out of the owner set.
const DOWN_AFTER: u32 = 2;
/// How often a peer that is down is tried again.
const PROBE_EVERY_MS: u64 = 250;

/// Wall-clock ms since the epoch (the clock Raft commands carry): windows must line up
/// across nodes.
pub use crate::raft::service::now_ms as wall_ms;

/// One exchange, as the owner's mailbox takes it.
struct Exchange {
    from: u64,
    quotas: Vec<pb::QuotaReport>,
    circuits: Vec<pb::CircuitReport>,
    rollouts: Vec<pb::RolloutReport>,
    reply: oneshot::Sender<pb::ExchangeResponse>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PeerHealth {
    failures: u32,
    last_try_ms: u64,
}

impl PeerHealth {
    fn up(&self) -> bool {
        self.failures < DOWN_AFTER
    }
}

/// A member as the tick sees it.
#[derive(Debug, Clone)]
struct Member {
    id: u64,
    addr: String,
    region: String,
}

/// The actors of one node: its leases, its owner mailbox, its view of the peers.
pub struct Actors {
    pub quotas: Arc<Quotas>,
    /// The data plane's snapshot: upstream clusters, their breakers, committed circuits.
    shared: Arc<Shared>,
    mailbox: mpsc::Sender<Exchange>,
    health: Mutex<HashMap<u64, PeerHealth>>,
    /// Per quota: what this node could admit uncounted (as a lease holder) and what it has
    /// granted unspent (as an owner); their sum is its part of the over-admission bound.
    bound: Mutex<HashMap<String, (u64, u64)>>,
}

impl Actors {
    /// Starts the owner's mailbox; [`Actors::run`] starts the tick.
    pub fn start(
        quotas: Arc<Quotas>,
        shared: Arc<Shared>,
        cluster: Arc<Cluster>,
        stop: CancellationToken,
    ) -> Arc<Actors> {
        let (tx, rx) = mpsc::channel(1024);
        let actors = Arc::new(Actors {
            quotas,
            shared,
            mailbox: tx,
            health: Mutex::default(),
            bound: Mutex::default(),
        });
        tokio::spawn(owner_loop(actors.clone(), cluster, rx, stop));
        actors
    }

    pub fn service(self: &Arc<Self>, cluster: &Cluster) -> ActorsServer<ActorService> {
        ActorsServer::new(ActorService {
            actors: self.clone(),
            peers: cluster.peers.clone(),
            identity: cluster.identity.clone(),
            state_machine: cluster.state_machine.clone(),
        })
    }

    /// Hands an exchange to this node's owner mailbox and waits for the grants.
    async fn to_owner(
        &self,
        from: u64,
        quotas: Vec<pb::QuotaReport>,
        circuits: Vec<pb::CircuitReport>,
        rollouts: Vec<pb::RolloutReport>,
    ) -> Result<pb::ExchangeResponse, String> {
        let (reply, rx) = oneshot::channel();
        self.mailbox
            .send(Exchange {
                from,
                quotas,
                circuits,
                rollouts,
                reply,
            })
            .await
            .map_err(|_| "the owner mailbox is closed".to_string())?;
        rx.await
            .map_err(|_| "the owner mailbox dropped the exchange".to_string())
    }

    /// The members as the cluster's membership has them (just this node before it joins).
    fn members(&self, cluster: &Cluster) -> Vec<Member> {
        let m = cluster.raft.metrics().borrow().membership_config.clone();
        let mut out: Vec<Member> = m
            .membership()
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                addr: n.grpc_addr.clone(),
                region: n.region.clone(),
            })
            .collect();
        if !out.iter().any(|n| n.id == cluster.id) {
            out.push(Member {
                id: cluster.id,
                addr: cluster.info.grpc_addr.clone(),
                region: cluster.info.region.clone(),
            });
        }
        out
    }

    /// Every [`TICK_MS`]: report every lease to its owner, take the grants.
    pub async fn run(self: Arc<Self>, cluster: Arc<Cluster>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.round(&cluster).await;
            n += 1;
            if n.is_multiple_of(1000 / TICK_MS) {
                self.export_lease_metrics();
            }
        }
    }

    async fn round(self: &Arc<Self>, cluster: &Arc<Cluster>) {
        let now = wall_ms();
        let me = self.quotas.node;
        let members = self.members(cluster);
        let up: Vec<&Member> = {
            let health = self.health.lock().expect("health");
            members
                .iter()
                .filter(|m| m.id == me || health.get(&m.id).is_none_or(|h| h.up()))
                .collect()
        };
        let quorum = up.len() * 2 > members.len();
        let in_region = members
            .iter()
            .filter(|m| m.region == self.quotas.region)
            .count() as u64;
        self.quotas.set_members(members.len() as u64, in_region);

        // Budgets: what is left of each after the spend this node has applied, and the
        // spend it has applied since the last tick (no longer counted by its lease).
        let budgets = if self.shared.snapshot.load().billing.budgets.is_empty() {
            None
        } else {
            Some(cluster.state_machine.read(|s| {
                let index = s.last_applied.map_or(0, |l| l.index);
                let left: HashMap<String, u64> =
                    s.state.billing.budgets_left(now).into_iter().collect();
                let settled = self
                    .shared
                    .meter
                    .as_ref()
                    .map(|m| m.spend.settle(index))
                    .unwrap_or_default();
                (index, left, settled)
            }))
        };

        // Every lease's reports, batched by owner.
        let mut batches: HashMap<u64, Batch> = HashMap::new();
        self.quotas.retain(|key, slot| {
            let mut applied_index = 0;
            if slot.def.id == quotas::BUDGET
                && let Some((index, left, settled)) = &budgets
            {
                let tenant = key.strip_prefix("budget/").unwrap_or_default();
                slot.lease.limit = left.get(tenant).copied().unwrap_or(0);
                if let Some(n) = settled.get(tenant) {
                    slot.lease.settled(*n);
                }
                applied_index = *index;
            }
            if slot.lease.idle() {
                return false;
            }
            let mut reports = slot.lease.reports(now);
            for r in &mut reports {
                r.applied_index = applied_index;
            }
            let scope = |m: &&Member| !slot.def.per_region || m.region == self.quotas.region;
            let size = members.iter().filter(scope).count() as u64;
            let candidates = up.iter().copied().filter(scope).map(|m| m.id);
            let ranked = ownership::owner_and_backup(key.as_bytes(), candidates);
            let owner = ranked.first().copied().filter(|_| quorum);
            slot.owner = owner;
            match owner {
                Some(owner) => {
                    let batch = batches.entry(owner).or_default();
                    for r in &reports {
                        batch.wire.push(to_wire(key, &slot.def, r));
                        batch.sent.push((key.to_string(), *r, size, false));
                    }
                    // Window counters: the backup gets a copy (asking for nothing), so if
                    // the owner dies it takes over knowing every node's usage, the dead
                    // node's included, up to the last tick.
                    if let Some(backup) = ranked.get(1)
                        && slot.def.algorithm == quota::Algorithm::Window
                    {
                        let batch = batches.entry(*backup).or_default();
                        for r in &reports {
                            let copy = Report { want: 0, ..*r };
                            batch.wire.push(to_wire(key, &slot.def, &copy));
                            batch.sent.push((key.to_string(), copy, size, true));
                        }
                    }
                }
                None => slot.lease.unanswered(&reports, size),
            }
            true
        });

        // Every breaker's outcomes since the last tick, to its circuit's owner.
        let snapshot = self.shared.snapshot.load_full();
        for c in &snapshot.routing.clusters {
            let Some(breaker) = &c.circuit else { continue };
            let outcomes = breaker.take();
            if outcomes.is_empty() {
                continue;
            }
            let key = format!("circuit/{}#{}", c.name, breaker.policy);
            let owner = ownership::owner(key.as_bytes(), up.iter().map(|m| m.id));
            let Some(owner) = owner.filter(|_| quorum) else {
                // Cut off: nobody can decide, and these outcomes will be stale.
                continue;
            };
            let index = snapshot
                .circuits
                .get(&*c.name)
                .map(|s| s.since_index)
                .unwrap_or(0);
            let batch = batches.entry(owner).or_default();
            batch.circuits.push(pb::CircuitReport {
                cluster: c.name.to_string(),
                policy: breaker.policy.clone(),
                ok: outcomes.ok,
                failed: outcomes.failed,
                slow: outcomes.slow,
                consecutive_failures: outcomes.consecutive,
                probes_ok: outcomes.probes_ok,
                probes_failed: outcomes.probes_failed,
                want_probes: outcomes.want_probes,
                state_index: index,
            });
            batch.circuit_sent.push((c.clone(), outcomes));
        }

        // Every running rollout's counts since the last tick, to its judge (sent even when
        // nothing was counted: the judge then knows the rollout is alive but idle).
        for (api, counters) in snapshot.rollout_counters.iter() {
            let key = format!("rollout/{api}#{}", counters.id);
            let owner = ownership::owner(key.as_bytes(), up.iter().map(|m| m.id));
            let Some(owner) = owner.filter(|_| quorum) else {
                continue;
            };
            let report = pb::RolloutReport {
                api: api.to_string(),
                rollout: counters.id,
                step: counters.step,
                versions: vec![
                    counters.canary_counts.take(&counters.canary),
                    counters.stable_counts.take(&counters.stable),
                ],
            };
            let batch = batches.entry(owner).or_default();
            batch.rollouts.push(report);
            batch.rollout_sent.push(counters.clone());
        }

        // Peers that are up but own nothing this node holds get an empty exchange: it is
        // how this node learns it can still reach a majority.
        for m in &up {
            if m.id != me {
                batches.entry(m.id).or_default();
            }
        }
        let calls = batches.into_iter().map(|(owner, batch)| {
            let addr = members
                .iter()
                .find(|m| m.id == owner)
                .map(|m| m.addr.clone())
                .unwrap_or_default();
            let this = self.clone();
            let cluster = cluster.clone();
            async move {
                let mut batch = batch;
                let (wire, circuits) = (
                    std::mem::take(&mut batch.wire),
                    std::mem::take(&mut batch.circuits),
                );
                let rollouts = batch.rollouts.clone();
                let res = this
                    .exchange(&cluster, owner, &addr, wire, circuits, rollouts)
                    .await;
                (owner, batch, res)
            }
        });
        let results = futures::future::join_all(calls).await;
        for (owner, batch, res) in results {
            let answer = res.and_then(|a| {
                if a.grants.len() == batch.sent.len()
                    && a.circuits.len() == batch.circuit_sent.len()
                {
                    Ok(a)
                } else {
                    Err(format!(
                        "node {owner} answered {}+{} reports with {}+{} grants",
                        batch.sent.len(),
                        batch.circuit_sent.len(),
                        a.grants.len(),
                        a.circuits.len()
                    ))
                }
            });
            self.note(cluster, owner, answer.is_ok());
            match answer {
                Ok(a) => {
                    for ((c, _), g) in batch.circuit_sent.iter().zip(&a.circuits) {
                        if let Some(breaker) = &c.circuit
                            && g.probes > 0
                        {
                            breaker.grant_permits(g.state_index, g.probes, wall_ms());
                        }
                    }
                    // The backup's answers to its copies are not used.
                    let own = batch.sent.iter().zip(a.grants).filter(|(s, _)| !s.3);
                    for ((key, ..), g) in own {
                        self.quotas.with_slot(key, |slot| {
                            slot.lease.granted(Grant {
                                window: g.window,
                                tokens: g.tokens,
                                valid_until_ms: g.valid_until_ms,
                                remaining: g.remaining,
                                revoke: g.revoke,
                            })
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(owner, "exchange failed: {e}");
                    for (report, counters) in batch.rollouts.iter().zip(&batch.rollout_sent) {
                        for v in &report.versions {
                            if let Some(c) = counters.of(&v.version) {
                                c.restore(v);
                            }
                        }
                    }
                    // The next owner gets these outcomes and reports.
                    for (c, outcomes) in &batch.circuit_sent {
                        if let Some(breaker) = &c.circuit {
                            breaker.restore(outcomes);
                        }
                    }
                    for (key, r, size, _) in batch.sent.iter().filter(|s| !s.3) {
                        self.quotas
                            .with_slot(key, |slot| slot.lease.unanswered(&[*r], *size));
                    }
                }
            }
        }
        self.quotas.round_done();
        self.probe_down_peers(cluster, &members, now);
    }

    /// Tries peers that are down now and then (in the background, so a silent peer does
    /// not hold up the tick), so they come back into the owner set once they answer.
    fn probe_down_peers(self: &Arc<Self>, cluster: &Arc<Cluster>, members: &[Member], now: u64) {
        let mut health = self.health.lock().expect("health");
        for m in members {
            let Some(h) = health.get_mut(&m.id) else {
                continue;
            };
            if h.up() || now.saturating_sub(h.last_try_ms) < PROBE_EVERY_MS {
                continue;
            }
            h.last_try_ms = now;
            let (this, cluster, id, addr) = (self.clone(), cluster.clone(), m.id, m.addr.clone());
            tokio::spawn(async move {
                let ok = this
                    .exchange(&cluster, id, &addr, Vec::new(), Vec::new(), Vec::new())
                    .await
                    .is_ok();
                this.note(&cluster, id, ok);
            });
        }
    }

    fn note(&self, cluster: &Cluster, peer: u64, ok: bool) {
        if peer == self.quotas.node {
            return;
        }
        cluster.liveness.note(peer, ok, wall_ms());
        let mut health = self.health.lock().expect("health");
        let h = health.entry(peer).or_default();
        let was_up = h.up();
        if ok {
            h.failures = 0;
        } else {
            h.failures = h.failures.saturating_add(1);
        }
        h.last_try_ms = wall_ms();
        if was_up != h.up() {
            let state = if h.up() { "up" } else { "down" };
            tracing::info!(peer, state, "actor owner set changed");
            metrics::gauge!("tollgate_actor_peer_up", "peer" => peer.to_string()).set(if h.up() {
                1.0
            } else {
                0.0
            });
        }
    }

    async fn exchange(
        &self,
        cluster: &Cluster,
        owner: u64,
        addr: &str,
        quotas: Vec<pb::QuotaReport>,
        circuits: Vec<pb::CircuitReport>,
        rollouts: Vec<pb::RolloutReport>,
    ) -> Result<pb::ExchangeResponse, String> {
        if owner == self.quotas.node {
            return self.to_owner(owner, quotas, circuits, rollouts).await;
        }
        if cluster.peers.faults.is_isolated(owner) {
            return Err(format!("node {owner} is isolated by fault injection"));
        }
        let channel = cluster.peers.channel(addr)?;
        let req = pb::ExchangeRequest {
            from: self.quotas.node,
            quotas,
            circuits,
            rollouts,
        };
        let mut client = ActorsClient::new(channel);
        let call = client.exchange(req);
        match tokio::time::timeout(EXCHANGE_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(format!("node {owner}: {}", status.message())),
            Err(_) => Err(format!(
                "node {owner} did not answer within {EXCHANGE_TIMEOUT:?}"
            )),
        }
    }

    /// Per quota: tokens held here, and what this node could admit that no owner counts.
    fn export_lease_metrics(&self) {
        let mut held: HashMap<String, u64> = HashMap::new();
        let mut uncounted: HashMap<String, u64> = HashMap::new();
        let mut cutoff = 0u64;
        self.quotas.for_each(|_, slot| {
            let name = slot.def.name.to_string();
            *held.entry(name.clone()).or_default() += slot.lease.held();
            *uncounted.entry(name).or_default() += slot.lease.unaccounted_allowance();
            if slot.lease.standing == quota::Standing::Cutoff {
                cutoff += 1;
            }
        });
        metrics::gauge!("tollgate_quota_cutoff_keys").set(cutoff as f64);
        for (name, n) in &held {
            metrics::gauge!("tollgate_quota_held_tokens", "quota" => name.clone()).set(*n as f64);
        }
        let mut bound = self.bound.lock().expect("bound");
        for entry in bound.values_mut() {
            entry.0 = 0;
        }
        for (name, n) in uncounted {
            bound.entry(name).or_default().0 = n;
        }
        export_bound(&bound);
    }
}

/// `tollgate_quota_overadmission_bound{quota}`: this node's part of the most a quota can be
/// exceeded by, were owners lost now. Summed over the nodes, it bounds the cluster.
fn export_bound(bound: &HashMap<String, (u64, u64)>) {
    for (name, (uncounted, outstanding)) in bound {
        metrics::gauge!("tollgate_quota_overadmission_bound", "quota" => name.clone())
            .set((uncounted + outstanding) as f64);
    }
}

#[derive(Default)]
struct Batch {
    wire: Vec<pb::QuotaReport>,
    /// Per report: the key, the report, the members in its scope, and whether it is the
    /// copy for the key's backup (whose answer is not used).
    sent: Vec<(String, Report, u64, bool)>,
    circuits: Vec<pb::CircuitReport>,
    /// Per circuit report: the upstream cluster and what was taken from its counters.
    circuit_sent: Vec<(Arc<UpstreamCluster>, Outcomes)>,
    rollouts: Vec<pb::RolloutReport>,
    /// Per rollout report: the counters it was taken from (put back if undelivered).
    rollout_sent: Vec<Arc<crate::rollout::counters::RolloutCounters>>,
}

/// The owner's mailbox: one task holds every ledger this node owns, so a ledger is only
/// ever touched by it.
async fn owner_loop(
    actors: Arc<Actors>,
    cluster: Arc<Cluster>,
    mut rx: mpsc::Receiver<Exchange>,
    stop: CancellationToken,
) {
    let mut ledgers = Ledgers::default();
    let mut books: HashMap<String, CircuitBook> = HashMap::new();
    let mut judges = crate::rollout::judge::Judges::default();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                let now = wall_ms();
                let snapshot = actors.shared.snapshot.load();
                let grants = msg
                    .quotas
                    .iter()
                    .map(|r| answer(&mut ledgers, &snapshot, now, msg.from, r))
                    .collect();
                let circuits = msg
                    .circuits
                    .iter()
                    .map(|r| decide(&mut books, &snapshot, &cluster, now, r))
                    .collect();
                let _ = msg.reply.send(pb::ExchangeResponse { grants, circuits });
                for r in &msg.rollouts {
                    judges.report(&cluster, &actors.shared, r, now);
                }
            }
            _ = sweep.tick() => {
                let now = wall_ms();
                judges.tick(&cluster, &actors.shared, now);
                ledgers.sweep(now);
                let mut owned: HashMap<String, (u64, u64)> = HashMap::new();
                for (key, (l, _)) in &ledgers.by_key {
                    let name = key.split('#').next().unwrap_or(key).to_string();
                    let e = owned.entry(name).or_default();
                    e.0 += 1;
                    e.1 += l.outstanding(now);
                }
                let mut bound = actors.bound.lock().expect("bound");
                for entry in bound.values_mut() {
                    entry.1 = 0;
                }
                for (name, (keys, outstanding)) in &owned {
                    metrics::gauge!("tollgate_quota_keys_owned", "quota" => name.clone()).set(*keys as f64);
                    bound.entry(name.clone()).or_default().1 = *outstanding;
                }
                export_bound(&bound);
            }
        }
    }
}

/// Most reports one exchange may carry.
pub const MAX_REPORTS: usize = 20_000;

/// Most ledgers an owner holds, and most of them one peer's reports may have made: past
/// these, reports for keys the owner does not hold yet are refused (and counted) until
/// ledgers expire. Each is a few hundred bytes.
pub const MAX_LEDGERS: usize = 500_000;
pub const MAX_LEDGERS_PER_PEER: usize = 200_000;
/// The longest quota key a report may name (`quota#digest@region/value`).
pub const MAX_KEY_BYTES: usize = 512;

/// The quota ledgers this node owns, with who made each (its first report's sender).
#[derive(Default)]
struct Ledgers {
    by_key: HashMap<String, (Ledger, u64)>,
    per_peer: HashMap<u64, usize>,
}

impl Ledgers {
    fn sweep(&mut self, now: u64) {
        self.by_key.retain(|_, (l, _)| !l.expired(now));
        self.per_peer.clear();
        for (_, from) in self.by_key.values() {
            *self.per_peer.entry(*from).or_default() += 1;
        }
    }
}

/// Why a report was refused, for `tollgate_actor_reports_refused_total`.
fn refused(reason: &'static str) {
    metrics::counter!("tollgate_actor_reports_refused_total", "reason" => reason).increment(1);
}

/// The owner's answer to one report (nothing for a report that does not make sense, names
/// a quota this node's spec does not have, or would need a ledger past the limits).
fn answer(
    ledgers: &mut Ledgers,
    snapshot: &Snapshot,
    now: u64,
    from: u64,
    r: &pb::QuotaReport,
) -> pb::QuotaGrant {
    let nothing = pb::QuotaGrant {
        key: r.key.clone(),
        window: r.window,
        ..Default::default()
    };
    let algorithm = match r.algorithm {
        0 => Algorithm::Window,
        1 => Algorithm::Gcra,
        _ => return nothing,
    };
    // A budget's limit is what is left of it, which may be nothing.
    let budget = r.key.strip_prefix("budget/");
    if (r.limit == 0 && budget.is_none())
        || r.window_ms == 0
        || r.key.is_empty()
        || r.key.len() > MAX_KEY_BYTES
    {
        refused("malformed");
        return nothing;
    }
    if !ledgers.by_key.contains_key(&r.key) {
        // A new key must belong to a quota of the spec this node serves, with its limit
        // (or to a tenant's hard-capped budget).
        let id = r.key.split(['@', '/']).next().unwrap_or_default();
        let known = match budget {
            Some(tenant) => {
                algorithm == Algorithm::Window && snapshot.billing.budgets.contains_key(tenant)
            }
            None => snapshot
                .routing
                .quotas
                .iter()
                .chain(&snapshot.routing.provider_quotas)
                .any(|q| q.id == id && q.limit == r.limit),
        };
        if !known {
            refused("unknown_quota");
            return nothing;
        }
        let mine = ledgers.per_peer.get(&from).copied().unwrap_or(0);
        if ledgers.by_key.len() >= MAX_LEDGERS || mine >= MAX_LEDGERS_PER_PEER {
            refused("too_many_keys");
            return nothing;
        }
        *ledgers.per_peer.entry(from).or_default() += 1;
    }
    let (ledger, _) = ledgers.by_key.entry(r.key.clone()).or_insert_with(|| {
        (
            Ledger::new(algorithm, r.limit, r.burst, r.window_ms, now),
            from,
        )
    });
    let g = ledger.exchange(
        now,
        from,
        &Report {
            window: r.window,
            window_end_ms: r.window_end_ms,
            used: r.used,
            held: r.held,
            returned: r.returned,
            unleased: r.unleased,
            want: r.want,
            limit: r.limit,
            applied_index: r.applied_index,
        },
    );
    pb::QuotaGrant {
        key: r.key.clone(),
        window: g.window,
        tokens: g.tokens,
        valid_until_ms: g.valid_until_ms,
        remaining: g.remaining,
        revoke: g.revoke,
    }
}

/// The owner's side of a circuit: takes one node's outcomes, grants half-open probe
/// permits, and proposes a transition through Raft when one is due.
fn decide(
    books: &mut HashMap<String, CircuitBook>,
    snapshot: &Snapshot,
    cluster: &Arc<Cluster>,
    now: u64,
    r: &pb::CircuitReport,
) -> pb::CircuitGrant {
    let none = pb::CircuitGrant {
        cluster: r.cluster.clone(),
        probes: 0,
        state_index: r.state_index,
    };
    // The breaker as this node has it: a node on another spec (policy) is not counted.
    let Some(breaker) = snapshot
        .routing
        .clusters
        .iter()
        .find(|c| *c.name == *r.cluster)
        .and_then(|c| c.circuit.as_ref())
        .filter(|b| b.policy == r.policy)
    else {
        return none;
    };
    let state = snapshot.circuits.get(&r.cluster);
    let index = state.map(|s| s.since_index).unwrap_or(0);
    let forced = state.is_some_and(|s| s.mode != CircuitMode::Auto as i32);
    let book = books
        .entry(format!("{}#{}", r.cluster, r.policy))
        .or_default();
    let outcomes = Outcomes {
        ok: r.ok,
        failed: r.failed,
        slow: r.slow,
        consecutive: r.consecutive_failures,
        probes_ok: r.probes_ok,
        probes_failed: r.probes_failed,
        want_probes: r.want_probes,
    };
    let (probes, verdict) = match phase(state, now) {
        _ if forced => (0, Verdict::Stay),
        Phase::Closed => {
            book.add(now, &outcomes, breaker.spec.window);
            (0, book.check_closed(&breaker.spec))
        }
        // Outcomes of calls made before it opened: nothing to decide until half-open.
        Phase::Open { .. } => (0, Verdict::Stay),
        Phase::HalfOpen => book.half_open(now, index, &outcomes, &breaker.spec),
    };
    let proposed = book
        .pending
        .is_some_and(|(i, at)| i == index && now.saturating_sub(at) < 2_000);
    if verdict != Verdict::Stay && !proposed {
        book.pending = Some((index, now));
        book.reset();
        let (open, reason) = match verdict {
            Verdict::Open(reason) => (true, reason),
            _ => (false, "half-open probes succeeded".to_string()),
        };
        let transition = CircuitTransition {
            open,
            open_until_ms: now + breaker.spec.open_for.as_millis() as u64,
            reason,
            from_index: index,
        };
        tokio::spawn(commit(cluster.clone(), r.cluster.clone(), transition));
    }
    pb::CircuitGrant {
        cluster: r.cluster.clone(),
        probes,
        state_index: index,
    }
}

/// Commits a circuit transition through Raft (as this node; forwarded to the leader).
async fn commit(cluster: Arc<Cluster>, upstream: String, t: CircuitTransition) {
    let what = if t.open { "open" } else { "close" };
    let cmd = Command {
        request_id: format!("circuit/{upstream}/{}/{what}", t.from_index),
        kind: Some(command::Kind::Circuit(CircuitCommand {
            upstream: upstream.clone(),
            op: Some(circuit_command::Op::Transition(t.clone())),
        })),
        ..Command::default()
    };
    let req = tollgate_proto::node::v1::WriteRequest { command: Some(cmd) };
    match cluster.write_command(req, false, &Caller::Node).await {
        Ok(w) => tracing::warn!(
            upstream,
            state = what,
            reason = %t.reason,
            log_index = w.log_index,
            "circuit breaker changed for the whole cluster"
        ),
        Err(e) => tracing::info!(
            upstream,
            state = what,
            "circuit transition not committed: {}",
            e.message()
        ),
    }
}

/// `tollgate.actor.v1.Actors` on the node's gRPC port.
pub struct ActorService {
    actors: Arc<Actors>,
    peers: Arc<Peers>,
    /// A node reports only its own usage and outcomes (by its certificate).
    identity: Arc<crate::identity::Identity>,
    state_machine: crate::raft::state_machine::StateMachineStore,
}

#[tonic::async_trait]
impl ActorsRpc for ActorService {
    async fn exchange(
        &self,
        req: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        let certs = req.peer_certs();
        self.state_machine.read(|a| {
            self.identity.require_node(
                certs.as_deref().map(Vec::as_slice),
                &a.state.access,
                req.get_ref().from,
                "this exchange",
            )
        })?;
        let req = req.into_inner();
        if req.quotas.len() + req.circuits.len() + req.rollouts.len() > MAX_REPORTS {
            return Err(Status::invalid_argument(format!(
                "an exchange carries at most {MAX_REPORTS} reports"
            )));
        }
        if self.peers.faults.is_isolated(req.from) {
            return Err(Status::unavailable(format!(
                "node {} is isolated by fault injection",
                req.from
            )));
        }
        let answer = self
            .actors
            .to_owner(req.from, req.quotas, req.circuits, req.rollouts)
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(answer))
    }
}
