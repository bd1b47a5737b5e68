//! The replicated state machine: what every node holds once a Raft entry is applied.
//!
//! Apply is deterministic and never fails: a command that cannot take effect (a request id
//! already seen) is recorded as a no-op with the same result as the first time. What the
//! data plane serves is compiled from this state by [`crate::state::snapshot`], off the
//! Raft task (see `raft::state_machine`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tollgate_proto::state::v1::{
    AccessCommand, ApiCommand, AuditEntry, BillingCommand, Bootstrap, Change, CircuitCommand,
    CircuitMode, CircuitState, Command, PutSpec, StateSnapshot, UsageBatch, command,
};

use crate::state::access::{self, Access, AccessChange};
use crate::state::billing::Billing;
use crate::state::circuit;
use crate::state::lifecycle::{self, Api, Refusal};
use crate::state::usage::Usage;

use crate::state::spec::{Spec, SpecErrors, parse_yaml};

/// How many applied changes the state keeps (oldest dropped first). Deduplication of a
/// retried write works within this window.
pub const HISTORY_LIMIT: usize = 10_000;

/// How many audit entries the state keeps (oldest dropped first).
pub const AUDIT_LIMIT: usize = 10_000;

/// Finished rollouts kept beside each API's last one, and rollout events kept for the
/// leader to tell.
pub const ROLLOUT_HISTORY: usize = 200;
pub const ROLLOUT_EVENTS: usize = 1_000;

/// The cluster's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// +1 for every command that changed the spec.
    pub generation: u64,
    /// Shared, not copied: every apply publishes it to the data plane.
    pub spec_yaml: Arc<str>,
    /// `kind/name` -> digest of the object, for plans.
    pub objects: BTreeMap<String, String>,
    pub history: VecDeque<Change>,
    /// APIs and their versions, by name. Shared with the data plane's compiler, which
    /// reuses what it built while this `Arc` is unchanged.
    pub apis: Arc<BTreeMap<String, Api>>,
    /// Tenants, keys, tokens and subscriptions (shared the same way).
    pub access: Arc<Access>,
    /// Who changed what, newest last (bounded by [`AUDIT_LIMIT`]).
    pub audit: VecDeque<AuditEntry>,
    pub audit_seq: u64,
    /// Circuit breakers that changed at least once, by upstream (shared the same way).
    pub circuits: Arc<circuit::Circuits>,
    /// Usage rollups (not served by the data plane: it is never published).
    pub usage: Usage,
    /// Plans, tenants on plans, budgets and spend.
    pub billing: Billing,
    /// Tenants whose budget's hard cap is reached, with the month (see
    /// `billing::month_of_ms`) it holds for: published to the data plane, which answers
    /// their requests 402.
    pub capped: Arc<BTreeMap<String, u64>>,
    /// Each API's current or last canary rollout (shared with the data plane).
    pub rollouts: Arc<BTreeMap<String, tollgate_proto::state::v1::RolloutState>>,
    /// Finished rollouts a newer one replaced, oldest first (bounded).
    pub rollout_history: VecDeque<tollgate_proto::state::v1::RolloutState>,
    /// Rollout transitions for the leader to tell (bounded), and the last seq.
    pub rollout_events: VecDeque<tollgate_proto::state::v1::RolloutEvent>,
    pub rollout_event_seq: u64,
    /// Anomaly alerts by `api@version/metric`.
    pub alerts: BTreeMap<String, tollgate_proto::state::v1::VersionAlert>,
    /// Prices and hard-capped budgets, published to the data plane.
    pub billing_view: Arc<crate::state::billing::BillingView>,
}

/// What applying one command did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    pub generation: u64,
    pub log_index: u64,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Set when the command was refused (it changed nothing).
    pub refusal: Option<Refusal>,
    /// The command's request id was already applied (for the same actor): this is the
    /// earlier answer, and nothing was applied now.
    pub deduplicated: bool,
}

/// Objects added, changed and removed by a new spec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

impl ClusterState {
    /// Applies one command taken from log entry `log_index`. A request id already in the
    /// history for the same actor is answered as the first time and applied once.
    pub fn apply(&mut self, log_index: u64, cmd: &Command) -> Applied {
        if !cmd.request_id.is_empty()
            && let Some(earlier) = self
                .history
                .iter()
                .rev()
                .find(|c| c.request_id == cmd.request_id && c.actor == cmd.actor)
        {
            return Applied {
                generation: earlier.generation,
                log_index: earlier.log_index,
                added: earlier.added.clone(),
                changed: earlier.changed.clone(),
                removed: earlier.removed.clone(),
                refusal: None,
                deduplicated: true,
            };
        }
        match &cmd.kind {
            Some(command::Kind::PutSpec(put)) => self.put_spec(log_index, cmd, put),
            Some(command::Kind::Api(api)) => self.api_command(log_index, cmd, api),
            Some(command::Kind::Access(a)) => self.access_command(log_index, cmd, a),
            Some(command::Kind::Bootstrap(b)) => self.bootstrap(log_index, cmd, b),
            Some(command::Kind::Circuit(c)) => self.circuit_command(log_index, cmd, c),
            Some(command::Kind::Usage(b)) => self.usage_batch(log_index, cmd, b),
            Some(command::Kind::Billing(b)) => self.billing_command(log_index, cmd, b),
            Some(command::Kind::Identity(i)) => self.identity_command(log_index, cmd, i),
            Some(command::Kind::Rollout(r)) => self.rollout_command(log_index, cmd, r),
            Some(command::Kind::Alert(a)) => self.alert_command(log_index, cmd, a),
            // A command from a newer node that this one does not know: nothing to do here,
            // and never fatal (docs/architecture.md, decision 2).
            None => Applied {
                generation: self.generation,
                log_index,
                ..Applied::default()
            },
        }
    }

    /// The hash key and operator token: audited and recorded in the history, but it takes
    /// no generation, since nothing the data plane serves changes (generations count what
    /// operators change).
    fn bootstrap(&mut self, log_index: u64, cmd: &Command, b: &Bootstrap) -> Applied {
        let mut next = (*self.access).clone();
        match access::bootstrap(&mut next, b, cmd.at_ms) {
            Err(refusal) => Applied {
                generation: self.generation,
                log_index,
                refusal: Some(refusal),
                ..Applied::default()
            },
            Ok(None) => Applied {
                generation: self.generation,
                log_index,
                ..Applied::default()
            },
            Ok(Some(change)) => {
                self.access = Arc::new(next);
                self.audit(
                    cmd,
                    change.action,
                    change.object.clone(),
                    String::new(),
                    change.before,
                    change.after,
                );
                Applied {
                    generation: self.generation,
                    log_index,
                    added: vec![change.object],
                    ..Applied::default()
                }
            }
        }
    }

    /// Usage from one node's journal: applied once (a retried batch is a no-op), added to
    /// the rollups and the tenants' spend. Takes a generation only when a budget's cap
    /// changed, since that is all of it the data plane serves.
    fn usage_batch(&mut self, log_index: u64, cmd: &Command, b: &UsageBatch) -> Applied {
        let mut applied = Applied {
            generation: self.generation,
            log_index,
            ..Applied::default()
        };
        if !self.usage.apply_batch(b, cmd.at_ms) {
            applied.deduplicated = true;
            return applied;
        }
        if self.billing.add_usage(&b.entries, cmd.at_ms) {
            self.capped = Arc::new(self.billing.capped());
            self.generation += 1;
            applied.generation = self.generation;
        }
        applied
    }

    fn billing_command(&mut self, log_index: u64, cmd: &Command, b: &BillingCommand) -> Applied {
        match self.billing.apply(b, cmd.at_ms) {
            Err(refusal) => Applied {
                generation: self.generation,
                log_index,
                refusal: Some(refusal),
                ..Applied::default()
            },
            Ok(change) => {
                self.capped = Arc::new(self.billing.capped());
                self.billing_view = Arc::new(self.billing.view(cmd.at_ms));
                let applied = self.record(
                    log_index,
                    cmd,
                    Vec::new(),
                    vec![change.object.clone()],
                    Vec::new(),
                );
                self.audit(
                    cmd,
                    change.action,
                    change.object,
                    change.tenant,
                    String::new(),
                    change.after,
                );
                applied
            }
        }
    }

    fn circuit_command(&mut self, log_index: u64, cmd: &Command, c: &CircuitCommand) -> Applied {
        let mut next = (*self.circuits).clone();
        match circuit::apply(&mut next, c, log_index, cmd.at_ms, &cmd.actor) {
            Err(refusal) => Applied {
                generation: self.generation,
                log_index,
                refusal: Some(refusal),
                ..Applied::default()
            },
            Ok(change) => {
                self.circuits = Arc::new(next);
                let object = format!("circuit/{}", c.upstream);
                let applied =
                    self.record(log_index, cmd, Vec::new(), vec![object.clone()], Vec::new());
                let json = |s: &CircuitState| {
                    serde_json::json!({
                        "open": s.open,
                        "open_until_ms": s.open_until_ms,
                        "mode": CircuitMode::try_from(s.mode).map(|m| m.as_str_name()).unwrap_or("unknown"),
                        "reason": s.reason,
                    })
                    .to_string()
                };
                self.audit(
                    cmd,
                    change.action,
                    object,
                    String::new(),
                    change.before.as_ref().map(json).unwrap_or_default(),
                    json(&change.after),
                );
                applied
            }
        }
    }

    fn access_command(&mut self, log_index: u64, cmd: &Command, a: &AccessCommand) -> Applied {
        let mut next = (*self.access).clone();
        let apis = &self.apis;
        let result = access::apply_command(
            &mut next,
            a,
            cmd.at_ms,
            &|name| apis.get(name).map(|a| a.tenant.clone()),
            &|tenant| apis.values().any(|x| x.tenant == tenant),
        );
        if matches!(result, Ok(Some(_))) {
            self.access = Arc::new(next);
        }
        self.access_result(log_index, cmd, result)
    }

    /// Node identity (join tokens, the CA, revocations, named secrets): audited and
    /// recorded in the history (a retried request id is applied once), but only a re-seal
    /// takes a generation. Named secrets (certificates' keys) reach the data plane without
    /// one: the state machine publishes a change of them too.
    fn identity_command(
        &mut self,
        log_index: u64,
        cmd: &Command,
        i: &tollgate_proto::state::v1::IdentityCommand,
    ) -> Applied {
        let mut next = (*self.access).clone();
        let change = match super::identity::apply(&mut next, i, cmd.at_ms) {
            Err(refusal) => {
                return Applied {
                    generation: self.generation,
                    log_index,
                    refusal: Some(refusal),
                    ..Applied::default()
                };
            }
            Ok(None) => {
                return Applied {
                    generation: self.generation,
                    log_index,
                    ..Applied::default()
                };
            }
            Ok(Some(change)) => change,
        };
        self.access = Arc::new(next);
        // A re-seal also covers secrets kept with APIs and budgets. Their plain text is the
        // same, but the data plane opens them when it compiles (key checks, JWT keys), and
        // a node that compiled an older sealing (read back from its last snapshot) could
        // not open it: it takes a generation, so every node compiles again.
        use tollgate_proto::state::v1::identity_command::Op as IdentityOp;
        if let Some(IdentityOp::Reseal(r)) = &i.op {
            self.generation += 1;
            if !r.jwks.is_empty() {
                let mut apis = (*self.apis).clone();
                for (name, jwks) in &r.jwks {
                    if let Some(jwt) = apis.get_mut(name).and_then(|a| a.settings.jwt.as_mut()) {
                        jwt.jwks = jwks.clone();
                    }
                }
                self.apis = Arc::new(apis);
            }
            for (tenant, webhook) in &r.webhooks {
                if let Some(b) = self.billing.budgets.get_mut(tenant) {
                    b.webhook = webhook.clone();
                }
            }
        }
        let (added, changed) = if change.added {
            (vec![change.object.clone()], Vec::new())
        } else {
            (Vec::new(), vec![change.object.clone()])
        };
        self.history.push_back(Change {
            generation: self.generation,
            log_index,
            request_id: cmd.request_id.clone(),
            actor: cmd.actor.clone(),
            added: added.clone(),
            changed: changed.clone(),
            removed: Vec::new(),
        });
        while self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.audit(
            cmd,
            change.action,
            change.object,
            String::new(),
            change.before,
            change.after,
        );
        Applied {
            generation: self.generation,
            log_index,
            added,
            changed,
            ..Applied::default()
        }
    }

    fn access_result(
        &mut self,
        log_index: u64,
        cmd: &Command,
        result: Result<Option<AccessChange>, Refusal>,
    ) -> Applied {
        match result {
            Err(refusal) => Applied {
                generation: self.generation,
                log_index,
                refusal: Some(refusal),
                ..Applied::default()
            },
            Ok(None) => Applied {
                generation: self.generation,
                log_index,
                ..Applied::default()
            },
            Ok(Some(change)) => {
                let tenant = match &cmd.kind {
                    Some(command::Kind::Access(a)) => a.tenant.clone(),
                    _ => String::new(),
                };
                let (added, changed) = if change.added {
                    (vec![change.object.clone()], Vec::new())
                } else {
                    (Vec::new(), vec![change.object.clone()])
                };
                let applied = self.record(log_index, cmd, added, changed, Vec::new());
                self.audit(
                    cmd,
                    change.action,
                    change.object,
                    tenant,
                    change.before,
                    change.after,
                );
                applied
            }
        }
    }

    /// Appends to the audit log (called after `record`, so it carries the new generation).
    fn audit(
        &mut self,
        cmd: &Command,
        action: &str,
        object: String,
        tenant: String,
        before: String,
        after: String,
    ) {
        self.audit_seq += 1;
        self.audit.push_back(AuditEntry {
            seq: self.audit_seq,
            at_ms: cmd.at_ms,
            actor: cmd.actor.clone(),
            action: action.to_string(),
            object,
            tenant,
            before,
            after,
            generation: self.generation,
        });
        while self.audit.len() > AUDIT_LIMIT {
            self.audit.pop_front();
        }
    }

    fn api_command(&mut self, log_index: u64, cmd: &Command, api: &ApiCommand) -> Applied {
        let before = self.apis.get(&api.api).map(Api::audit_json);
        let access = &self.access;
        let mut next = (*self.apis).clone();
        let result = lifecycle::apply_command(&mut next, api, cmd.at_ms, &|t| {
            access.tenants.contains_key(t)
        });
        if matches!(&result, Ok(c) if !c.is_empty()) {
            self.apis = Arc::new(next);
        }
        match result {
            Err(refusal) => Applied {
                generation: self.generation,
                log_index,
                refusal: Some(refusal),
                ..Applied::default()
            },
            Ok(changed) if changed.is_empty() => Applied {
                generation: self.generation,
                log_index,
                ..Applied::default()
            },
            Ok(changed) => {
                let added = matches!(
                    api.op,
                    Some(tollgate_proto::state::v1::api_command::Op::CreateApi(_))
                );
                let (added, changed) = if added {
                    (changed, Vec::new())
                } else {
                    (Vec::new(), changed)
                };
                let object = added
                    .first()
                    .or(changed.first())
                    .cloned()
                    .unwrap_or_default();
                let applied = self.record(log_index, cmd, added, changed, Vec::new());
                let after = self.apis.get(&api.api);
                let tenant = after.map(|a| a.tenant.clone()).unwrap_or_default();
                let after = after.map(Api::audit_json).unwrap_or_default();
                self.audit(
                    cmd,
                    api_action(api),
                    object,
                    tenant,
                    before.unwrap_or_default(),
                    after,
                );
                applied
            }
        }
    }

    /// A rollout command: a transition sets the API's split (a generation, audited, told by
    /// the leader); a checkpoint only stores the judge's evidence.
    fn rollout_command(
        &mut self,
        log_index: u64,
        cmd: &Command,
        r: &tollgate_proto::state::v1::RolloutCommand,
    ) -> Applied {
        use crate::rollout::state::Outcome;
        let before = self.apis.get(&r.api).map(Api::audit_json);
        let mut apis = (*self.apis).clone();
        let mut rollouts = (*self.rollouts).clone();
        let mut finished = Vec::new();
        let result = crate::rollout::state::apply(
            &mut apis,
            &mut rollouts,
            &mut finished,
            r,
            cmd,
            log_index,
        );
        let unchanged = Applied {
            generation: self.generation,
            log_index,
            ..Applied::default()
        };
        match result {
            Err(refusal) => Applied {
                refusal: Some(refusal),
                ..unchanged
            },
            Ok(Outcome::Nothing) => unchanged,
            Ok(Outcome::Checkpoint) => {
                self.rollouts = Arc::new(rollouts);
                unchanged
            }
            Ok(Outcome::Transition { action }) => {
                self.apis = Arc::new(apis);
                self.rollouts = Arc::new(rollouts);
                self.rollout_history.extend(finished);
                while self.rollout_history.len() > ROLLOUT_HISTORY {
                    self.rollout_history.pop_front();
                }
                let object = format!("apis/{}", r.api);
                let applied =
                    self.record(log_index, cmd, Vec::new(), vec![object.clone()], Vec::new());
                if let Some(ro) = self.rollouts.get(&r.api)
                    && let Some(d) = ro.decisions.last()
                {
                    self.rollout_event_seq += 1;
                    self.rollout_events
                        .push_back(tollgate_proto::state::v1::RolloutEvent {
                            seq: self.rollout_event_seq,
                            at_ms: cmd.at_ms,
                            api: r.api.clone(),
                            rollout: ro.id,
                            action: d.action.clone(),
                            step: d.step,
                            weight: d.weight,
                            reason: d.reason.clone(),
                            webhook: ro.webhook.clone(),
                            canary: ro.canary.clone(),
                            stable: ro.stable.clone(),
                            kind: "rollout".into(),
                            webhook_secret: String::new(),
                            tenant: ro.tenant.clone(),
                        });
                    while self.rollout_events.len() > ROLLOUT_EVENTS {
                        self.rollout_events.pop_front();
                    }
                }
                let after = self.apis.get(&r.api);
                let tenant = after.map(|a| a.tenant.clone()).unwrap_or_default();
                let after = after.map(Api::audit_json).unwrap_or_default();
                self.audit(
                    cmd,
                    &format!("rollout.{action}"),
                    object,
                    tenant,
                    before.unwrap_or_default(),
                    after,
                );
                applied
            }
        }
    }

    /// An anomaly alert raised or resolved: stored, audited and told by the leader. It
    /// takes no generation (nothing the data plane serves changes). A raise within the
    /// quiet period after the last one, or of an alert already firing, changes nothing.
    fn alert_command(
        &mut self,
        log_index: u64,
        cmd: &Command,
        a: &tollgate_proto::state::v1::AlertCommand,
    ) -> Applied {
        use tollgate_proto::state::v1::alert_command::Op;
        let unchanged = Applied {
            generation: self.generation,
            log_index,
            ..Applied::default()
        };
        let tenant = match self.apis.get(&a.api) {
            Some(api) => api.tenant.clone(),
            None => return unchanged,
        };
        let key = format!("{}@{}/{}", a.api, a.version, a.metric);
        let alert = self.alerts.entry(key.clone()).or_insert_with(|| {
            tollgate_proto::state::v1::VersionAlert {
                api: a.api.clone(),
                version: a.version.clone(),
                metric: a.metric.clone(),
                tenant: tenant.clone(),
                ..Default::default()
            }
        });
        let (action, summary, webhook_secret) = match &a.op {
            Some(Op::Raise(r)) => {
                if alert.firing
                    || (alert.raised_ms != 0 && cmd.at_ms < alert.raised_ms + r.quiet_ms)
                {
                    return unchanged;
                }
                alert.firing = true;
                alert.raised_ms = cmd.at_ms;
                alert.count += 1;
                alert.raise = Some(r.clone());
                ("raise", r.summary.clone(), r.webhook_secret.clone())
            }
            Some(Op::Resolve(r)) => {
                if !alert.firing {
                    return unchanged;
                }
                alert.firing = false;
                alert.resolved_ms = cmd.at_ms;
                alert.resolve_summary = r.summary.clone();
                let secret = alert
                    .raise
                    .as_ref()
                    .map(|r| r.webhook_secret.clone())
                    .unwrap_or_default();
                ("resolve", r.summary.clone(), secret)
            }
            None => return unchanged,
        };
        self.rollout_event_seq += 1;
        self.rollout_events
            .push_back(tollgate_proto::state::v1::RolloutEvent {
                seq: self.rollout_event_seq,
                at_ms: cmd.at_ms,
                api: a.api.clone(),
                action: action.into(),
                reason: summary,
                canary: a.version.clone(),
                kind: "alert".into(),
                webhook_secret,
                tenant: tenant.clone(),
                stable: a.metric.clone(),
                ..Default::default()
            });
        while self.rollout_events.len() > ROLLOUT_EVENTS {
            self.rollout_events.pop_front();
        }
        let after = format!("{{\"firing\":{}}}", action == "raise");
        self.audit(
            cmd,
            &format!("alert.{action}"),
            key,
            tenant,
            String::new(),
            after,
        );
        unchanged
    }

    /// Takes the next generation and records the change in the bounded history.
    fn record(
        &mut self,
        log_index: u64,
        cmd: &Command,
        added: Vec<String>,
        changed: Vec<String>,
        removed: Vec<String>,
    ) -> Applied {
        self.generation += 1;
        self.history.push_back(Change {
            generation: self.generation,
            log_index,
            request_id: cmd.request_id.clone(),
            actor: cmd.actor.clone(),
            added: added.clone(),
            changed: changed.clone(),
            removed: removed.clone(),
        });
        while self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
        Applied {
            generation: self.generation,
            log_index,
            added,
            changed,
            removed,
            refusal: None,
            deduplicated: false,
        }
    }

    fn put_spec(&mut self, log_index: u64, cmd: &Command, put: &PutSpec) -> Applied {
        let plan = self.plan(&put.objects);
        if plan.is_empty() && put.spec_yaml == *self.spec_yaml {
            return Applied {
                generation: self.generation,
                log_index,
                ..Applied::default()
            };
        }
        self.spec_yaml = Arc::from(put.spec_yaml.as_str());
        self.objects = put
            .objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let summary = |p: &Plan| {
            serde_json::json!({"added": p.added, "changed": p.changed, "removed": p.removed})
                .to_string()
        };
        let after = summary(&plan);
        let applied = self.record(log_index, cmd, plan.added, plan.changed, plan.removed);
        self.audit(
            cmd,
            "spec.apply",
            "spec".into(),
            String::new(),
            String::new(),
            after,
        );
        applied
    }

    /// What replacing the current objects with `objects` would change.
    pub fn plan<'a>(&self, objects: impl IntoIterator<Item = (&'a String, &'a String)>) -> Plan {
        let new: BTreeMap<&String, &String> = objects.into_iter().collect();
        let mut plan = Plan::default();
        for (name, digest) in &new {
            match self.objects.get(*name) {
                None => plan.added.push((*name).clone()),
                Some(old) if old != *digest => plan.changed.push((*name).clone()),
                Some(_) => {}
            }
        }
        for name in self.objects.keys() {
            if !new.contains_key(name) {
                plan.removed.push(name.clone());
            }
        }
        plan
    }

    pub fn to_proto(&self) -> StateSnapshot {
        let mut out = StateSnapshot {
            generation: self.generation,
            spec_yaml: self.spec_yaml.to_string(),
            objects: self
                .objects
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            history: self.history.iter().cloned().collect(),
            apis: self.apis.values().map(Api::to_proto).collect(),
            audit: self.audit.iter().cloned().collect(),
            audit_seq: self.audit_seq,
            circuits: self.circuits.values().cloned().collect(),
            rollouts: self.rollouts.values().cloned().collect(),
            rollout_history: self.rollout_history.iter().cloned().collect(),
            rollout_events: self.rollout_events.iter().cloned().collect(),
            rollout_event_seq: self.rollout_event_seq,
            alerts: self.alerts.values().cloned().collect(),
            ..StateSnapshot::default()
        };
        self.access.to_proto(&mut out);
        self.usage.to_proto(&mut out);
        self.billing.to_proto(&mut out);
        out
    }

    pub fn from_proto(p: StateSnapshot) -> ClusterState {
        let access = Arc::new(Access::from_proto(&p));
        let usage = Usage::from_proto(&p);
        let billing = Billing::from_proto(&p);
        ClusterState {
            capped: Arc::new(billing.capped()),
            billing_view: Arc::new(billing.view(crate::raft::service::now_ms())),
            usage,
            billing,
            access,
            audit: p.audit.into(),
            audit_seq: p.audit_seq,
            circuits: Arc::new(
                p.circuits
                    .iter()
                    .map(|c| (c.upstream.clone(), c.clone()))
                    .collect(),
            ),
            rollouts: Arc::new(
                p.rollouts
                    .iter()
                    .map(|r| (r.api.clone(), r.clone()))
                    .collect(),
            ),
            rollout_history: p.rollout_history.into(),
            rollout_events: p.rollout_events.into(),
            rollout_event_seq: p.rollout_event_seq,
            alerts: p
                .alerts
                .iter()
                .map(|a| (format!("{}@{}/{}", a.api, a.version, a.metric), a.clone()))
                .collect(),
            generation: p.generation,
            spec_yaml: Arc::from(p.spec_yaml),
            objects: p.objects.into_iter().collect(),
            history: p.history.into(),
            apis: Arc::new(
                p.apis
                    .iter()
                    .map(|a| (a.name.clone(), Api::from_proto(a)))
                    .collect(),
            ),
        }
    }
}

/// The audit action of an API command.
fn api_action(cmd: &ApiCommand) -> &'static str {
    use tollgate_proto::state::v1::api_command::Op;
    use tollgate_proto::state::v1::version_transition::To;
    match &cmd.op {
        Some(Op::CreateApi(_)) => "api.create",
        Some(Op::UpdateApi(_)) => "api.update",
        Some(Op::CreateVersion(_)) => "version.create",
        Some(Op::Transition(t)) => match t.to {
            Some(To::Edit(_)) => "version.edit",
            Some(To::Publish(_)) => "version.publish",
            Some(To::Deprecate(_)) => "version.deprecate",
            Some(To::Retire(_)) => "version.retire",
            Some(To::Discard(_)) => "version.discard",
            None => "version.unknown",
        },
        Some(Op::SetSplit(_)) => "api.split",
        Some(Op::Promote(_)) => "api.promote",
        Some(Op::Rollback(_)) => "api.rollback",
        None => "api.unknown",
    }
}

/// A checked spec, ready to be proposed: its text and the digest of each object.
#[derive(Debug, Clone)]
pub struct CheckedSpec {
    pub yaml: String,
    pub objects: BTreeMap<String, String>,
    pub spec: Spec,
}

/// Checks a spec the way a write does before it is proposed: parsed, validated (every
/// error listed), endpoint names resolved, and each object digested for the plan.
pub fn check_spec(yaml: &str, max_bytes: usize) -> Result<CheckedSpec, SpecErrors> {
    check_parsed(yaml, parse_checked(yaml, max_bytes)?)
}

/// The first half of [`check_spec`]: size limit and YAML syntax (never blocks).
pub fn parse_checked(yaml: &str, max_bytes: usize) -> Result<serde_yaml_ng::Value, SpecErrors> {
    if yaml.len() > max_bytes {
        let mut e = SpecErrors::default();
        e.push(
            "spec",
            format!(
                "the spec is {} bytes, over the limit of {max_bytes} bytes; split it or raise --max-spec-bytes",
                yaml.len()
            ),
        );
        return Err(e);
    }
    parse_yaml(yaml)
}

/// The second half of [`check_spec`]: validation and name resolution (blocks on DNS when
/// [`crate::state::spec::needs_dns`] says so).
pub fn check_parsed(yaml: &str, doc: serde_yaml_ng::Value) -> Result<CheckedSpec, SpecErrors> {
    let objects = object_digests(&doc);
    let spec = Spec::from_value(doc)?;
    Ok(CheckedSpec {
        yaml: yaml.to_string(),
        objects,
        spec,
    })
}

/// `kind/name` -> a digest of the object's content, independent of key order and
/// formatting (the object as canonical JSON, hashed with FNV-1a 64: this detects changes
/// for plans; it is not a security boundary).
fn object_digests(doc: &serde_yaml_ng::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let serde_yaml_ng::Value::Mapping(top) = doc else {
        return out;
    };
    for (kind, objects) in top {
        let (Some(kind), serde_yaml_ng::Value::Mapping(objects)) = (kind.as_str(), objects) else {
            continue;
        };
        let kind = kind.trim_end_matches('s');
        for (name, value) in objects {
            let Some(name) = name.as_str() else { continue };
            // serde_json's maps are sorted: the same object written in another key order
            // or style gives the same text.
            let canonical = serde_json::to_value(value)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| format!("{value:?}"));
            out.insert(
                format!("{kind}/{name}"),
                crate::hash::fnv1a_hex(canonical.as_bytes()),
            );
        }
    }
    out
}

/// The command that puts a checked spec.
pub fn put_spec_command(checked: &CheckedSpec, request_id: &str) -> Command {
    Command {
        request_id: request_id.to_string(),
        kind: Some(command::Kind::PutSpec(PutSpec {
            spec_yaml: checked.yaml.clone(),
            objects: checked
                .objects
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })),
        ..Command::default()
    }
}

#[cfg(test)]
mod tests;
