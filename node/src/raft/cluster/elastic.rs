//! Elastic membership (docs/cluster.md, "Nodes that come and go"): the voters stay at the
//! cluster's `--voters`; every other node is a learner that may come and go.
//!
//! - A node that shuts down leaves ([`Cluster::leave`]): a learner always may; a voter only
//!   when a caught-up learner can take its place (or the cluster has voters to spare), so a
//!   rolling restart of the voters keeps them.
//! - The leader tends the membership every second ([`Cluster::tend`]): a member that has not
//!   answered for the eviction grace period is removed (a voter only when a learner takes
//!   its place or there are voters to spare), and a learner is promoted while voters are
//!   missing.
//! - Every change is audited (`node.join`, `node.leave`, `node.evict`, `node.promote`),
//!   logged and counted (`tollgate_cluster_membership_changes_total{action}`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use openraft::{ChangeMembers, ServerState};
use tollgate_proto::node::v1 as api;
use tollgate_proto::node::v1::node_admin_client::NodeAdminClient;
use tollgate_proto::state::v1::MemberEvent;
use tonic::Status;
use tonic::transport::Channel;

use super::super::NodeId;
use super::super::service::now_ms;
use super::{Cluster, IdentityOp};
use crate::auth::principal::Caller;

/// A learner whose log is at most this many entries behind the leader's counts as caught
/// up (ready to be promoted).
const CAUGHT_UP_SLACK: u64 = 64;

/// Which peers have stopped answering, and since when (ms since the epoch), as this node's
/// actor exchanges see them (every 25 ms to a live peer, every 250 ms to one that is down).
#[derive(Debug, Default)]
pub struct Liveness(Mutex<HashMap<NodeId, u64>>);

impl Liveness {
    /// A peer answered (`ok`) or did not.
    pub fn note(&self, peer: NodeId, ok: bool, now_ms: u64) {
        let mut down = self.0.lock().expect("liveness lock");
        if ok {
            down.remove(&peer);
        } else {
            down.entry(peer).or_insert(now_ms);
        }
    }

    /// How long `peer` has not answered (None: it answers).
    pub fn down_for(&self, peer: NodeId, now_ms: u64) -> Option<Duration> {
        let down = self.0.lock().expect("liveness lock");
        down.get(&peer)
            .map(|since| Duration::from_millis(now_ms.saturating_sub(*since)))
    }
}

/// The membership's voters and learners as this node has them.
struct Roles {
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
}

impl Roles {
    fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

impl Cluster {
    fn roles(&self) -> Roles {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        let learners = m
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !voters.contains(id))
            .collect();
        Roles { voters, learners }
    }

    /// A learner in this leader's region that answers and whose log is caught up with the
    /// leader's, to promote (learners in other regions stay learners: decision 11).
    fn ready_learner(&self, roles: &Roles, now: u64) -> Option<NodeId> {
        let metrics = self.raft.metrics().borrow().clone();
        let last = metrics.last_log_index.unwrap_or(0);
        let replication = metrics.replication.as_ref()?;
        let members = metrics.membership_config.membership().clone();
        roles.learners.iter().copied().find(|id| {
            members
                .get_node(id)
                .is_some_and(|n| n.region == self.info.region)
                && self.liveness.down_for(*id, now).is_none()
                && replication
                    .get(id)
                    .and_then(|l| l.as_ref())
                    .is_some_and(|l| l.index + CAUGHT_UP_SLACK >= last)
        })
    }

    /// Audits, logs and counts a membership change (the change itself is already made: a
    /// failure here is logged, not returned).
    pub(super) async fn member_event(&self, id: NodeId, action: &str, role: &str, reason: String) {
        tracing::info!(node = id, action, role, reason = %reason, "membership changed");
        metrics::counter!("tollgate_cluster_membership_changes_total", "action" => action.to_string())
            .increment(1);
        let op = IdentityOp::MemberEvent(MemberEvent {
            node_id: id,
            action: action.into(),
            role: role.into(),
            reason,
        });
        if let Err(e) = self.identity_write(op).await {
            tracing::warn!(
                node = id,
                action,
                "auditing a membership change failed: {}",
                e.message()
            );
        }
    }

    async fn promote(&self, id: NodeId, reason: String) -> Result<(), Status> {
        self.membership_change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await?;
        self.member_event(id, "promote", "voter", reason).await;
        Ok(())
    }

    /// Takes `id` out: out of the voters first (when it is one), then out of the members.
    async fn take_out(&self, id: NodeId, voter: bool) -> Result<(), Status> {
        if voter {
            self.membership_change(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
                .await?;
        }
        if self.roles().contains(id) {
            self.membership_change(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
                .await?;
        }
        Ok(())
    }

    /// A node leaves the membership as it shuts down (see the module's docs). Unlike
    /// `remove`, its certificate stays good: it may join again later.
    pub async fn leave(
        &self,
        req: api::LeaveRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::LeaveResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.leave(r).await };
        if let Some(resp) = self.on_leader(&req, forwarded, caller, forward).await? {
            return Ok(resp);
        }
        let _changing = self.membership_turn().await?;
        let id = req.node_id;
        let roles = self.roles();
        if !roles.contains(id) {
            return Ok(api::LeaveResponse::default());
        }
        let voter = roles.voters.contains(&id);
        let mut promoted = 0;
        if voter && roles.voters.len() as u32 <= self.voters.max(1) {
            let Some(learner) = self.ready_learner(&roles, now_ms()) else {
                return Err(Status::failed_precondition(format!(
                    "node {id} is one of the cluster's {} voters (--voters {}) and no caught-up \
                     learner can take its place, so it stays a member; it can restart and \
                     rejoin as it is, or be removed with `tollgate cluster remove {id}`",
                    roles.voters.len(),
                    self.voters
                )));
            };
            self.promote(
                learner,
                format!("takes the place of voter {id}, which is leaving"),
            )
            .await?;
            promoted = learner;
        }
        self.take_out(id, voter).await?;
        let role = if voter { "voter" } else { "learner" };
        self.member_event(id, "leave", "", format!("it shut down (a {role})"))
            .await;
        Ok(api::LeaveResponse {
            left: true,
            role: role.into(),
            promoted,
        })
    }

    /// On the leader, once a second: evicts members that have not answered for
    /// `evict_after`, and promotes a learner while voters are missing. Does nothing while
    /// another membership change runs, or while this leader has not heard from a majority
    /// in the last second (it may be the one cut off).
    pub async fn tend(&self, evict_after: Duration) {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader
            || metrics.millis_since_quorum_ack.is_none_or(|ms| ms > 1_000)
        {
            return;
        }
        let Ok(_changing) = self.membership.try_lock() else {
            return;
        };
        let now = now_ms();
        let roles = self.roles();
        self.stranded
            .lock()
            .expect("stranded lock")
            .retain(|id| roles.contains(*id) && self.liveness.down_for(*id, now).is_some());
        let dead: Vec<(NodeId, Duration)> = roles
            .voters
            .iter()
            .chain(&roles.learners)
            .filter(|id| **id != self.id)
            .filter_map(|id| Some((*id, self.liveness.down_for(*id, now)?)))
            .filter(|(_, down)| !evict_after.is_zero() && *down >= evict_after)
            .collect();
        let result: Result<(), Status> = async {
            for (id, down) in dead {
                let roles = self.roles();
                let voter = roles.voters.contains(&id);
                let why = format!(
                    "it has not answered for {} s (the grace period is {} s)",
                    down.as_secs(),
                    evict_after.as_secs()
                );
                if voter && roles.voters.len() as u32 <= self.voters.max(1) {
                    let Some(learner) = self.ready_learner(&roles, now) else {
                        self.stranded_voter(id, down);
                        continue;
                    };
                    self.promote(
                        learner,
                        format!("takes the place of voter {id}, which stopped answering"),
                    )
                    .await?;
                }
                self.take_out(id, voter).await?;
                self.member_event(id, "evict", "", why).await;
            }
            let roles = self.roles();
            if (roles.voters.len() as u32) < self.voters
                && let Some(learner) = self.ready_learner(&roles, now)
            {
                self.promote(
                    learner,
                    format!(
                        "the cluster had {} voters of {}",
                        roles.voters.len(),
                        self.voters
                    ),
                )
                .await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(
                "tending the membership failed (retried in a second): {}",
                e.message()
            );
        }
    }

    /// Says once per outage that a dead voter stays for want of a learner.
    fn stranded_voter(&self, id: NodeId, down: Duration) {
        if self.stranded.lock().expect("stranded lock").insert(id) {
            tracing::warn!(
                node = id,
                down_s = down.as_secs(),
                "a voter has stopped answering and no caught-up learner can take its place: \
                 it stays a voter (the cluster needs a majority of its voters); add a node, \
                 or remove it with `tollgate cluster remove`"
            );
        }
    }
}
