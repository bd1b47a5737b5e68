//! Virtual actors (DESIGN.md decision 6): every live counter (a quota key, an upstream's
//! circuit) has one owner node, chosen by rendezvous hashing ([`ownership`]) over the
//! members this node can reach. Any node computes the same owner from the same view, with
//! no lookup table to replicate; when a member leaves or stops answering, only the keys it
//! owned move, and they spread evenly over the others.
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
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tollgate_proto::actor::v1 as pb;
use tollgate_proto::actor::v1::actors_client::ActorsClient;
use tollgate_proto::actor::v1::actors_server::{Actors as ActorsRpc, ActorsServer};
use tonic::{Request, Response, Status};

use crate::raft::cluster::Cluster;
use crate::raft::network::Peers;
use quota::{Algorithm, Grant, Ledger, Report, TICK_MS};
use quotas::{Quotas, to_wire};

/// How long a remote exchange may take before the owner counts as unreachable.
const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(100);
/// Failed exchanges in a row after which a peer is taken out of the owner set.
const DOWN_AFTER: u32 = 2;
/// How often a peer that is down is tried again.
const PROBE_EVERY_MS: u64 = 250;

/// Wall-clock ms since the epoch: windows must line up across nodes.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One exchange, as the owner's mailbox takes it.
struct Exchange {
    from: u64,
    quotas: Vec<pb::QuotaReport>,
    reply: oneshot::Sender<Vec<pb::QuotaGrant>>,
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
    mailbox: mpsc::Sender<Exchange>,
    health: Mutex<HashMap<u64, PeerHealth>>,
    /// Per quota: what this node could admit uncounted (as a lease holder) and what it has
    /// granted unspent (as an owner); their sum is its part of the over-admission bound.
    bound: Mutex<HashMap<String, (u64, u64)>>,
}

impl Actors {
    /// Starts the owner's mailbox; [`Actors::run`] starts the tick.
    pub fn start(quotas: Arc<Quotas>, stop: CancellationToken) -> Arc<Actors> {
        let (tx, rx) = mpsc::channel(1024);
        let actors = Arc::new(Actors {
            quotas,
            mailbox: tx,
            health: Mutex::default(),
            bound: Mutex::default(),
        });
        tokio::spawn(owner_loop(actors.clone(), rx, stop));
        actors
    }

    pub fn service(self: &Arc<Self>, peers: Arc<Peers>) -> ActorsServer<ActorService> {
        ActorsServer::new(ActorService {
            actors: self.clone(),
            peers,
        })
    }

    /// Hands an exchange to this node's owner mailbox and waits for the grants.
    async fn to_owner(
        &self,
        from: u64,
        quotas: Vec<pb::QuotaReport>,
    ) -> Result<Vec<pb::QuotaGrant>, String> {
        let (reply, rx) = oneshot::channel();
        self.mailbox
            .send(Exchange {
                from,
                quotas,
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

        // Every lease's reports, batched by owner.
        let mut batches: HashMap<u64, Batch> = HashMap::new();
        self.quotas.retain(|key, slot| {
            if slot.lease.idle() {
                return false;
            }
            let reports = slot.lease.reports(now);
            let scope = |m: &&Member| !slot.def.per_region || m.region == self.quotas.region;
            let size = members.iter().filter(scope).count() as u64;
            let candidates = up.iter().copied().filter(scope).map(|m| m.id);
            let owner = ownership::owner(key.as_bytes(), candidates).filter(|_| quorum);
            slot.owner = owner;
            match owner {
                Some(owner) => {
                    let batch = batches.entry(owner).or_default();
                    for r in reports {
                        batch.wire.push(to_wire(key, &slot.def, &r));
                        batch.sent.push((key.to_string(), r, size));
                    }
                }
                None => slot.lease.unanswered(&reports, size),
            }
            true
        });

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
                let wire = batch.wire.clone();
                let res = this.exchange(&cluster, owner, &addr, wire).await;
                (owner, batch, res)
            }
        });
        let results = futures::future::join_all(calls).await;
        for (owner, batch, res) in results {
            let grants = res.and_then(|g| {
                if g.len() == batch.sent.len() {
                    Ok(g)
                } else {
                    Err(format!(
                        "node {owner} answered {} reports with {} grants",
                        batch.sent.len(),
                        g.len()
                    ))
                }
            });
            self.note(owner, grants.is_ok());
            match grants {
                Ok(grants) => {
                    for ((key, _, _), g) in batch.sent.iter().zip(grants) {
                        self.quotas.with_slot(key, |slot| {
                            slot.lease.granted(Grant {
                                window: g.window,
                                tokens: g.tokens,
                                valid_until_ms: g.valid_until_ms,
                                remaining: g.remaining,
                            })
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(owner, "quota exchange failed: {e}");
                    for (key, r, size) in &batch.sent {
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
                let ok = this.exchange(&cluster, id, &addr, Vec::new()).await.is_ok();
                this.note(id, ok);
            });
        }
    }

    fn note(&self, peer: u64, ok: bool) {
        if peer == self.quotas.node {
            return;
        }
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
    ) -> Result<Vec<pb::QuotaGrant>, String> {
        if owner == self.quotas.node {
            return self.to_owner(owner, quotas).await;
        }
        if cluster.peers.faults.is_isolated(owner) {
            return Err(format!("node {owner} is isolated by fault injection"));
        }
        let channel = cluster.peers.channel(addr)?;
        let req = pb::ExchangeRequest {
            from: self.quotas.node,
            sent_at_ms: wall_ms(),
            quotas,
            circuits: Vec::new(),
        };
        let mut client = ActorsClient::new(channel);
        let call = client.exchange(req);
        match tokio::time::timeout(EXCHANGE_TIMEOUT, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().grants),
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
        self.quotas.retain(|_, slot| {
            let name = slot.def.name.to_string();
            *held.entry(name.clone()).or_default() += slot.lease.held();
            *uncounted.entry(name).or_default() += slot.lease.unaccounted_allowance();
            if slot.lease.standing == quota::Standing::Cutoff {
                cutoff += 1;
            }
            true
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
    /// Per report: the key, the report, and the members in its scope.
    sent: Vec<(String, Report, u64)>,
}

/// The owner's mailbox: one task holds every ledger this node owns, so a ledger is only
/// ever touched by it.
async fn owner_loop(
    actors: Arc<Actors>,
    mut rx: mpsc::Receiver<Exchange>,
    stop: CancellationToken,
) {
    let mut ledgers: HashMap<String, Ledger> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                let now = wall_ms();
                let grants = msg
                    .quotas
                    .iter()
                    .map(|r| answer(&mut ledgers, now, msg.from, r))
                    .collect();
                let _ = msg.reply.send(grants);
            }
            _ = sweep.tick() => {
                let now = wall_ms();
                ledgers.retain(|_, l| !l.expired(now));
                let mut owned: HashMap<String, (u64, u64)> = HashMap::new();
                for (key, l) in &ledgers {
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

/// The owner's answer to one report (nothing for a report that does not make sense).
fn answer(
    ledgers: &mut HashMap<String, Ledger>,
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
    if r.limit == 0 || r.window_ms == 0 || r.key.is_empty() {
        return nothing;
    }
    let ledger = ledgers
        .entry(r.key.clone())
        .or_insert_with(|| Ledger::new(algorithm, r.limit, r.burst, r.window_ms, now));
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
        },
    );
    pb::QuotaGrant {
        key: r.key.clone(),
        window: g.window,
        tokens: g.tokens,
        valid_until_ms: g.valid_until_ms,
        remaining: g.remaining,
    }
}

/// `tollgate.actor.v1.Actors` on the node's gRPC port.
pub struct ActorService {
    actors: Arc<Actors>,
    peers: Arc<Peers>,
}

#[tonic::async_trait]
impl ActorsRpc for ActorService {
    async fn exchange(
        &self,
        req: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        let req = req.into_inner();
        if self.peers.faults.is_isolated(req.from) {
            return Err(Status::unavailable(format!(
                "node {} is isolated by fault injection",
                req.from
            )));
        }
        let grants = self
            .actors
            .to_owner(req.from, req.quotas)
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(pb::ExchangeResponse { grants }))
    }
}
