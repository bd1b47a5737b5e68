//! Quota ledgers moving between owners with their state (docs/cluster.md, "Actors move
//! with their state").
//!
//! An owner answers for a key only while it holds the key's ledger *active*. A node that
//! becomes a key's owner by its view (a join, a peer back from the dead, a peer leaving)
//! does not start a ledger from nothing: it claims the key from the node that would own it
//! were it not for itself (its *previous owner*), which gives up the ledger (and answers
//! `moved` from then on) before it sends it. A node that leaves pushes every ledger it owns
//! to the next owner first. So a key is never active on two nodes that agree on the
//! membership, and whoever gives a ledger up has stopped granting from it.
//!
//! Reporters whose report lands on a node that does not own the key (yet) are answered
//! `moved`: nothing is counted and they report again next tick; their lease stands.
//! A claim that gets no answer within [`CLAIM_PATIENCE_MS`] activates the key from what
//! this node has (its backup copy, else the reports): the previous owner is taken for dead.

use std::collections::{HashMap, HashSet};

use tollgate_proto::actor::v1 as pb;

use super::ownership;
use super::quota::{Algorithm, Ledger};

/// How long a claimed key may wait for its previous owner's answer.
pub const CLAIM_PATIENCE_MS: u64 = 1_000;
/// Keys one claim asks for (moves in flight per peer: one claim at a time).
pub const CLAIM_BATCH: usize = 512;
/// How long a node that gave a key up answers `moved` for it, whatever its view says.
const TOMBSTONE_MS: u64 = 5_000;

/// Who may own what, as this node sees the cluster (refreshed every tick).
#[derive(Debug, Clone, Default)]
pub struct View {
    pub me: u64,
    /// Members that answer and are not leaving (this node too, unless it is leaving), with
    /// their region: the owners.
    pub owners: Vec<(u64, String)>,
    /// Members that answer, leaving ones included: where a key may still be held.
    pub reachable: Vec<(u64, String)>,
    /// Whether this node can reach a majority: a node that cannot owns nothing.
    pub quorum: bool,
}

/// The region of a per-region quota key (`name#digest@region/value`).
fn key_region(key: &str) -> Option<&str> {
    let head = key.split('/').next()?;
    head.split_once('@').map(|(_, region)| region)
}

fn rank<'a>(
    key: &str,
    among: impl Iterator<Item = &'a (u64, String)>,
    except: Option<u64>,
) -> Option<u64> {
    let region = key_region(key);
    ownership::owner(
        key.as_bytes(),
        among
            .filter(|(id, r)| Some(*id) != except && region.is_none_or(|want| want == r))
            .map(|(id, _)| *id),
    )
}

impl View {
    /// The key's owner by this view.
    pub fn owner_of(&self, key: &str) -> Option<u64> {
        if !self.quorum {
            return None;
        }
        rank(key, self.owners.iter(), None)
    }

    /// Where the key is held if not here: its owner among the reachable members (leaving
    /// ones included) other than this node.
    pub fn previous_owner(&self, key: &str) -> Option<u64> {
        rank(key, self.reachable.iter(), Some(self.me))
    }

    /// The view less peers a claim could not reach lately.
    pub fn without(&self, unreachable: &HashMap<u64, u64>, now: u64) -> View {
        let gone = |id: &u64| unreachable.get(id).is_some_and(|until| *until > now);
        View {
            reachable: self
                .reachable
                .iter()
                .filter(|(id, _)| !gone(id))
                .cloned()
                .collect(),
            ..self.clone()
        }
    }
}

/// One key's ledger on this node.
#[derive(Debug)]
pub struct Entry {
    pub ledger: Ledger,
    /// The node whose report made it (for the per-peer limit).
    pub from: u64,
    /// Owners the key has had (see `ActorState.epoch`).
    pub epoch: u64,
    /// Granting from it (owned), or a backup copy kept from the owner's reports.
    pub active: bool,
}

/// A key this node owns by its view and is claiming.
#[derive(Debug, Clone)]
pub struct Pending {
    pub since_ms: u64,
    /// What a new ledger is made of, if nobody has one.
    pub seed: (Algorithm, u64, u64, u64),
    pub from: u64,
}

/// Every ledger this node holds, and the keys in motion.
#[derive(Debug, Default)]
pub struct Ledgers {
    pub by_key: HashMap<String, Entry>,
    pub per_peer: HashMap<u64, usize>,
    pub pending: HashMap<String, Pending>,
    /// Keys given up: to whom, until when.
    pub tombstones: HashMap<String, (u64, u64)>,
    /// Peers a claim is in flight to.
    pub claiming: HashSet<u64>,
    /// Peers whose last claim failed, until when: claims pass them over meanwhile (a dead
    /// owner's keys are claimed from the next in line at once).
    pub unreachable: HashMap<u64, u64>,
}

/// How a key came to be owned here, for `tollgate_actor_activations_total{how}`.
#[derive(Debug, Clone, Copy)]
pub enum How {
    /// With its previous owner's ledger.
    Handed,
    /// From the backup copy this node kept.
    Backup,
    /// From nothing: no one had it (a new key, or its owner was lost without a backup).
    Fresh,
}

impl How {
    fn as_str(self) -> &'static str {
        match self {
            How::Handed => "handed",
            How::Backup => "backup",
            How::Fresh => "fresh",
        }
    }
}

impl Ledgers {
    pub fn sweep(&mut self, now: u64) {
        self.by_key.retain(|_, e| !e.ledger.expired(now));
        self.tombstones.retain(|_, (_, until)| *until > now);
        self.per_peer.clear();
        for e in self.by_key.values() {
            *self.per_peer.entry(e.from).or_default() += 1;
        }
    }

    /// Whether this node gave `key` up lately to a node that may still own it (it then
    /// answers `moved` for the key, whatever its own view says: views catch up).
    pub fn given_up(&self, key: &str, view: &View, now: u64) -> bool {
        self.tombstones
            .get(key)
            .is_some_and(|(to, until)| *until > now && view.owners.iter().any(|(id, _)| id == to))
    }

    /// Owns `key` from now on: with `state` (a handoff), else from its backup copy or the
    /// pending claim's seed. False when there is nothing to make it of.
    pub fn activate(&mut self, key: &str, state: Option<&pb::ActorState>, now: u64) -> bool {
        let pending = self.pending.remove(key);
        let waited = pending.as_ref().map(|p| now.saturating_sub(p.since_ms));
        self.tombstones.remove(key);
        let imported = state.and_then(|s| Some((s.epoch, Ledger::import(s.ledger.as_ref()?)?)));
        let (how, epoch) = match (self.by_key.get_mut(key), imported) {
            (Some(e), Some((epoch, theirs))) => {
                e.ledger.merge(&theirs);
                e.epoch = e.epoch.max(epoch) + 1;
                e.active = true;
                (How::Handed, e.epoch)
            }
            (Some(e), None) => {
                e.epoch += 1;
                e.active = true;
                (How::Backup, e.epoch)
            }
            (None, Some((epoch, ledger))) => {
                let from = pending.as_ref().map_or(0, |p| p.from);
                let entry = Entry {
                    ledger,
                    from,
                    epoch: epoch + 1,
                    active: true,
                };
                self.by_key.insert(key.to_string(), entry);
                (How::Handed, epoch + 1)
            }
            (None, None) => {
                let Some(p) = pending else {
                    return false;
                };
                let (algorithm, limit, burst, window_ms) = p.seed;
                let entry = Entry {
                    ledger: Ledger::new(algorithm, limit, burst, window_ms, now),
                    from: p.from,
                    epoch: 1,
                    active: true,
                };
                self.by_key.insert(key.to_string(), entry);
                (How::Fresh, 1)
            }
        };
        metrics::counter!("tollgate_actor_activations_total", "how" => how.as_str()).increment(1);
        if let Some(ms) = waited {
            // How long reports for the key were answered `moved` while it was claimed.
            metrics::histogram!("tollgate_actor_handoff_seconds").record(ms as f64 / 1000.0);
        }
        tracing::debug!(key, epoch, how = how.as_str(), "actor activated");
        true
    }

    /// Gives `key` up to `to` (a claim, or this node leaving): its state, if it was owned.
    pub fn give_up(&mut self, key: &str, to: u64, now: u64) -> Option<pb::ActorState> {
        self.tombstones
            .insert(key.to_string(), (to, now + TOMBSTONE_MS));
        self.pending.remove(key);
        let entry = self.by_key.remove(key)?;
        if let Some(n) = self.per_peer.get_mut(&entry.from) {
            *n = n.saturating_sub(1);
        }
        if !entry.active {
            return None;
        }
        metrics::counter!("tollgate_actor_handoffs_total").increment(1);
        tracing::debug!(key, epoch = entry.epoch, to, "actor handed off");
        Some(pb::ActorState {
            key: key.to_string(),
            epoch: entry.epoch,
            ledger: Some(entry.ledger.export()),
        })
    }

    /// Keys owned here (active ledgers).
    pub fn owned(&self) -> usize {
        self.by_key.values().filter(|e| e.active).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(me: u64, owners: &[u64], reachable: &[u64]) -> View {
        let r = |ids: &[u64]| ids.iter().map(|id| (*id, "r".to_string())).collect();
        View {
            me,
            owners: r(owners),
            reachable: r(reachable),
            quorum: true,
        }
    }

    /// A key moves to a joining node only by a claim from the node that had it, which gives
    /// it up first; the joiner counts on from the old owner's ledger.
    #[test]
    fn a_claimed_key_is_owned_by_one_node_at_a_time() {
        let key = (0..1000)
            .map(|i| format!("q#d/v{i}"))
            .find(|k| {
                view(4, &[1, 2, 3, 4], &[1, 2, 3, 4]).owner_of(k) == Some(4)
                    && view(1, &[1, 2, 3], &[1, 2, 3]).owner_of(k) == Some(1)
            })
            .unwrap();
        let seed = (Algorithm::Window, 100, 0, 60_000);
        // Node 1 owns it and has counted 60.
        let mut old = Ledgers::default();
        old.pending.insert(
            key.clone(),
            Pending {
                since_ms: 0,
                seed,
                from: 2,
            },
        );
        assert!(old.activate(&key, None, 0));
        let e = old.by_key.get_mut(&key).unwrap();
        let report = super::super::quota::Report {
            window: 0,
            window_end_ms: 60_000,
            used: 60,
            held: 0,
            returned: 0,
            unleased: 0,
            want: 0,
            limit: 100,
            applied_index: 0,
        };
        e.ledger.exchange(10, 2, &report);
        // Node 4 joins: by its view it owns the key; its previous owner is node 1.
        let joiner = view(4, &[1, 2, 3, 4], &[1, 2, 3, 4]);
        assert_eq!(joiner.previous_owner(&key), Some(1));
        let state = old.give_up(&key, 4, 20).unwrap();
        assert!(old.given_up(&key, &joiner, 21) && !old.by_key.contains_key(&key));
        assert!(old.give_up(&key, 4, 22).is_none(), "given up once");
        let mut new = Ledgers::default();
        assert!(new.activate(&key, Some(&state), 30));
        let e = new.by_key.get_mut(&key).unwrap();
        assert_eq!((e.epoch, e.active), (2, true));
        // 60 counted by node 2 under the old owner: 40 left.
        let g = e.ledger.exchange(
            40,
            3,
            &super::super::quota::Report {
                want: 100,
                used: 0,
                ..report
            },
        );
        assert_eq!(g.tokens, 40);
        // The tombstone lapses.
        old.sweep(30 + TOMBSTONE_MS);
        assert!(!old.given_up(&key, &joiner, 30 + TOMBSTONE_MS));
        // A tombstone for a node that has gone since does not hold the key back.
        old.give_up(&key, 4, 40);
        assert!(!old.given_up(&key, &view(1, &[1, 2, 3], &[1, 2, 3]), 41));
    }

    #[test]
    fn per_region_keys_are_owned_in_their_region() {
        let v = View {
            me: 1,
            owners: vec![(1, "a".into()), (2, "b".into()), (3, "b".into())],
            reachable: vec![(1, "a".into()), (2, "b".into()), (3, "b".into())],
            quorum: true,
        };
        for i in 0..50 {
            let key = format!("q#d@b/v{i}");
            assert_ne!(v.owner_of(&key), Some(1));
            assert_ne!(v.previous_owner(&key), Some(1));
        }
        let cut_off = View { quorum: false, ..v };
        assert_eq!(cut_off.owner_of("q#d/x"), None);
    }
}
