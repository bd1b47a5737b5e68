//! The rollout's owner: takes every node's counts, runs the sequential tests of each
//! metric ([`super::sprt`]) and says when a step has passed or failed. Every few seconds
//! it checkpoints its statistics through Raft, so a new owner (the old one died) carries
//! on from them rather than from nothing.

use std::collections::{BTreeMap, VecDeque};

use tollgate_proto::actor::v1::{RolloutReport, VersionCounts};
use tollgate_proto::state::v1::{EvidencePoint, MetricEvidence, RolloutEvidence, RolloutState};

use super::sprt::{Counts, Judge, Tolerance, Verdict};
use crate::state::usage::{Histogram, percentile_us};

/// How often the statistics are checkpointed (and a point added to their history).
pub const CHECKPOINT_MS: u64 = 5_000;
/// Points of history kept (every other one is dropped past it).
const MAX_HISTORY: usize = 720;
/// Stable requests a percentile threshold needs before "slower than the stable's p95"
/// is judged.
const MIN_BASELINE: u64 = 50;
/// The nodes report every few tens of milliseconds, each with a handful of requests: the
/// tests take the cluster's counts in windows of at least this long, once both versions
/// have had requests in them (at most [`MAX_WINDOW_MS`]). When a window closes depends on
/// the request counts only, never on how the requests went, so the tests stay valid.
const MIN_WINDOW_MS: u64 = 1_000;
const MAX_WINDOW_MS: u64 = 60_000;

fn tolerance(metric: &str) -> Tolerance {
    match metric {
        "errors" => Tolerance {
            margin: 2.0,
            slack: 0.01,
        },
        // About 5% of the stable's calls are above its 95th percentile.
        _ => Tolerance {
            margin: 1.5,
            slack: 0.05,
        },
    }
}

struct Metric {
    name: String,
    judge: Judge,
    /// Latency, ttft, cost: the stable's histogram so far (the threshold's source).
    stable: Histogram,
}

/// What the owner should do now.
#[derive(Debug, PartialEq)]
pub enum Action {
    Nothing,
    Checkpoint(RolloutEvidence),
    Verdict {
        pass: bool,
        evidence: RolloutEvidence,
    },
}

/// One rollout step's judge.
pub struct Book {
    /// This node (named in the evidence).
    pub judge: u64,
    pub id: u64,
    pub step: u32,
    metrics: Vec<Metric>,
    history: Vec<EvidencePoint>,
    last_checkpoint_ms: u64,
    /// When a verdict was proposed (not proposed again for a while).
    pub proposed_ms: Option<u64>,
    /// (ms, canary requests, stable requests) of the last minute's reports, for how long a
    /// decision should take.
    recent: VecDeque<(u64, u64, u64)>,
    /// The window being filled: the canary's and the stable's counts, and when it began.
    window: (VersionCounts, VersionCounts, u64),
}

fn add_counts(into: &mut VersionCounts, from: &VersionCounts) {
    into.requests += from.requests;
    into.errors += from.errors;
    for (into, from) in [
        (&mut into.latency, &from.latency),
        (&mut into.ttft, &from.ttft),
        (&mut into.cost, &from.cost),
    ] {
        for (&b, &n) in from {
            *into.entry(b).or_default() += n;
        }
    }
}

fn bad_above(h: &BTreeMap<u32, u64>, threshold: u32) -> u64 {
    h.range(threshold + 1..).map(|(_, n)| n).sum()
}

impl Book {
    /// A judge for the rollout's current step, resuming its last checkpoint when there is
    /// one for this step.
    pub fn new(r: &RolloutState, now: u64, judge: u64) -> Book {
        let saved: BTreeMap<&str, &MetricEvidence> = r
            .evidence
            .iter()
            .flat_map(|e| &e.metrics)
            .map(|m| (m.metric.as_str(), m))
            .collect();
        let metrics = r
            .metrics
            .iter()
            .map(|name| {
                let mut m = Metric {
                    name: name.clone(),
                    judge: Judge::default(),
                    stable: Histogram::new(),
                };
                if let Some(s) = saved.get(name.as_str()) {
                    m.judge.restore(
                        &s.worse,
                        &s.within,
                        Counts {
                            canary_requests: s.canary_requests,
                            canary_bad: s.canary_bad,
                            stable_requests: s.stable_requests,
                            stable_bad: s.stable_bad,
                        },
                    );
                    m.stable = s.stable_histogram.iter().map(|(&b, &n)| (b, n)).collect();
                }
                m
            })
            .collect();
        Book {
            judge,
            id: r.id,
            step: r.step,
            metrics,
            history: r
                .evidence
                .as_ref()
                .map(|e| e.history.clone())
                .unwrap_or_default(),
            last_checkpoint_ms: now,
            proposed_ms: None,
            recent: VecDeque::new(),
            window: (VersionCounts::default(), VersionCounts::default(), now),
        }
    }

    /// One node's counts.
    pub fn observe(&mut self, report: &RolloutReport, r: &RolloutState, now: u64) {
        let find = |v: &str| {
            report
                .versions
                .iter()
                .find(|c| c.version == v)
                .cloned()
                .unwrap_or_default()
        };
        let (c, s): (VersionCounts, VersionCounts) = (find(&r.canary), find(&r.stable));
        self.recent.push_back((now, c.requests, s.requests));
        while self
            .recent
            .front()
            .is_some_and(|x| now.saturating_sub(x.0) > 60_000)
        {
            self.recent.pop_front();
        }
        add_counts(&mut self.window.0, &c);
        add_counts(&mut self.window.1, &s);
        self.close_window(now);
    }

    /// Hands the window to the tests when it is long enough and both versions had
    /// requests in it (or it has gone on for [`MAX_WINDOW_MS`]).
    fn close_window(&mut self, now: u64) {
        let age = now.saturating_sub(self.window.2);
        let both = self.window.0.requests > 0 && self.window.1.requests > 0;
        if !(age >= MIN_WINDOW_MS && both || age >= MAX_WINDOW_MS) {
            return;
        }
        let (c, s, _) = std::mem::replace(
            &mut self.window,
            (VersionCounts::default(), VersionCounts::default(), now),
        );
        for m in &mut self.metrics {
            let t = tolerance(&m.name);
            let counts = match m.name.as_str() {
                "errors" => Some(Counts {
                    canary_requests: c.requests,
                    canary_bad: c.errors,
                    stable_requests: s.requests,
                    stable_bad: s.errors,
                }),
                other => {
                    let (ch, sh) = match other {
                        "latency" => (&c.latency, &s.latency),
                        "ttft" => (&c.ttft, &s.ttft),
                        _ => (&c.cost, &s.cost),
                    };
                    // "Bad": above the stable's 95th percentile as it stood before these
                    // counts (so the threshold does not depend on them).
                    let known: u64 = m.stable.values().sum();
                    let p95 = percentile_us(&m.stable, 0.95).filter(|_| known >= MIN_BASELINE);
                    let counts = match p95 {
                        Some(p95) => {
                            let threshold = crate::state::usage::latency_bucket(p95);
                            Some(Counts {
                                canary_requests: ch.values().sum(),
                                canary_bad: bad_above(ch, threshold),
                                stable_requests: sh.values().sum(),
                                stable_bad: bad_above(sh, threshold),
                            })
                        }
                        _ => None,
                    };
                    for (&b, &n) in sh {
                        *m.stable.entry(b).or_default() += n;
                    }
                    counts
                }
            };
            if let Some(counts) = counts {
                m.judge.observe(counts, t);
            }
        }
    }

    fn log_threshold(r: &RolloutState) -> f64 {
        (r.metrics.len().max(1) as f64 / r.level).ln()
    }

    /// Canary and stable requests a second over the last minute.
    fn rates(&self) -> (f64, f64) {
        let (Some(first), Some(last)) = (self.recent.front(), self.recent.back()) else {
            return (0.0, 0.0);
        };
        let secs = ((last.0 - first.0) as f64 / 1000.0).max(1.0);
        let (c, s) = self
            .recent
            .iter()
            .fold((0, 0), |(c, s), x| (c + x.1, s + x.2));
        (c as f64 / secs, s as f64 / secs)
    }

    /// Where each metric stands, in words.
    fn describe(&self, r: &RolloutState) -> String {
        let threshold = Book::log_threshold(r);
        self.metrics
            .iter()
            .map(|m| {
                let t = &m.judge.totals;
                let pct = |bad: u64, n: u64| {
                    if n == 0 {
                        0.0
                    } else {
                        bad as f64 * 100.0 / n as f64
                    }
                };
                let what = match m.name.as_str() {
                    "errors" => "errors",
                    "latency" => "slower than the stable's p95",
                    "ttft" => "first token later than the stable's p95",
                    _ => "costlier than the stable's p95",
                };
                format!(
                    "{}: canary {:.2}% {what} ({} of {}), stable {:.2}% ({} of {}); worse {:.2}, within {:.2}, threshold {:.2}",
                    m.name,
                    pct(t.canary_bad, t.canary_requests),
                    t.canary_bad,
                    t.canary_requests,
                    pct(t.stable_bad, t.stable_requests),
                    t.stable_bad,
                    t.stable_requests,
                    m.judge.worse(),
                    m.judge.within(),
                    threshold
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn evidence(&self, r: &RolloutState, now: u64, summary: String) -> RolloutEvidence {
        RolloutEvidence {
            at_ms: now,
            log_threshold: Book::log_threshold(r),
            metrics: self
                .metrics
                .iter()
                .map(|m| {
                    let (worse, within) = m.judge.components();
                    let t = m.judge.totals;
                    MetricEvidence {
                        metric: m.name.clone(),
                        worse,
                        within,
                        canary_requests: t.canary_requests,
                        canary_bad: t.canary_bad,
                        stable_requests: t.stable_requests,
                        stable_bad: t.stable_bad,
                        worse_statistic: m.judge.worse(),
                        within_statistic: m.judge.within(),
                        stable_histogram: m.stable.iter().map(|(&b, &n)| (b, n)).collect(),
                    }
                })
                .collect(),
            history: self.history.clone(),
            failing: Vec::new(),
            summary,
            judge: self.judge,
        }
    }

    /// What to do now: a verdict when one is due, else a checkpoint every
    /// [`CHECKPOINT_MS`].
    pub fn evaluate(&mut self, r: &RolloutState, now: u64) -> Action {
        self.close_window(now);
        let threshold = Book::log_threshold(r);
        let verdicts: Vec<Verdict> = self
            .metrics
            .iter()
            .map(|m| m.judge.verdict(threshold))
            .collect();
        let step = r.steps.get(r.step as usize).cloned().unwrap_or_default();
        let canary: u64 = self
            .metrics
            .first()
            .map_or(0, |m| m.judge.totals.canary_requests);
        let elapsed = now.saturating_sub(r.step_started_ms);
        if self
            .proposed_ms
            .is_some_and(|at| now.saturating_sub(at) < 3_000)
        {
            return Action::Nothing;
        }
        if let Some(i) = verdicts.iter().position(|v| *v == Verdict::Worse) {
            let summary = format!(
                "{} is worse than the stable version's. {}",
                self.metrics[i].name,
                self.describe(r)
            );
            self.point(now);
            return Action::Verdict {
                pass: false,
                evidence: self.evidence(r, now, summary),
            };
        }
        let all_within = !verdicts.is_empty() && verdicts.iter().all(|v| *v == Verdict::Within);
        if all_within && elapsed >= step.min_ms && canary >= step.min_requests {
            self.point(now);
            let summary = format!("every metric within tolerance. {}", self.describe(r));
            return Action::Verdict {
                pass: true,
                evidence: self.evidence(r, now, summary),
            };
        }
        if now.saturating_sub(self.last_checkpoint_ms) < CHECKPOINT_MS {
            return Action::Nothing;
        }
        self.last_checkpoint_ms = now;
        self.point(now);
        let waiting = if all_within {
            let mut why = Vec::new();
            if elapsed < step.min_ms {
                why.push(format!(
                    "{} s of the step's minimum time left",
                    (step.min_ms - elapsed).div_ceil(1000)
                ));
            }
            if canary < step.min_requests {
                why.push(format!(
                    "{} of its {} canary requests",
                    canary, step.min_requests
                ));
            }
            format!("within tolerance; waiting for {}", why.join(" and "))
        } else {
            let rates = self.rates();
            let eta = self
                .metrics
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| **v == Verdict::Undecided)
                .map(|(m, _)| m.judge.eta_seconds(threshold, rates, tolerance(&m.name)))
                .try_fold(0.0f64, |acc, e| e.map(|e| acc.max(e)));
            match eta {
                Some(s) => format!(
                    "not enough evidence yet: about {} min to a decision at the current rate ({:.1} canary requests/s)",
                    (s / 60.0).ceil().max(1.0),
                    rates.0
                ),
                None => format!(
                    "not enough evidence yet: too little traffic to say when ({:.2} canary requests/s)",
                    rates.0
                ),
            }
        };
        Action::Checkpoint(self.evidence(r, now, format!("{waiting}. {}", self.describe(r))))
    }

    fn point(&mut self, now: u64) {
        for m in &self.metrics {
            self.history.push(EvidencePoint {
                at_ms: now,
                metric: m.name.clone(),
                worse: m.judge.worse(),
                within: m.judge.within(),
            });
        }
        if self.history.len() > MAX_HISTORY {
            // Thin the older half: every other point goes.
            let half = self.history.len() / 2;
            let mut i = 0;
            self.history.retain(|_| {
                i += 1;
                i > half || i % 2 == 0
            });
        }
    }
}

/// The books of the rollouts this node judges, by API.
#[derive(Default)]
pub struct Judges {
    books: std::collections::HashMap<String, Book>,
}

/// The committed rollout of `api` (the latest applied, evidence included).
fn committed(cluster: &crate::raft::cluster::Cluster, api: &str) -> Option<RolloutState> {
    cluster
        .state_machine
        .read(|a| a.state.rollouts.get(api).cloned())
}

impl Judges {
    /// One node's counts of a rollout this node owns.
    pub fn report(
        &mut self,
        cluster: &std::sync::Arc<crate::raft::cluster::Cluster>,
        shared: &std::sync::Arc<crate::proxy::Shared>,
        r: &RolloutReport,
        now: u64,
    ) {
        let Some(state) = committed(cluster, &r.api) else {
            return;
        };
        if state.id != r.rollout || !super::state::running(&state) {
            self.books.remove(&r.api);
            return;
        }
        // Counts of a step already decided.
        if r.step != state.step {
            return;
        }
        let book = self
            .books
            .entry(r.api.clone())
            .or_insert_with(|| Book::new(&state, now, cluster.id));
        if book.id != state.id || book.step != state.step {
            *book = Book::new(&state, now, cluster.id);
        }
        book.observe(r, &state, now);
        self.act(cluster, shared, &state, now);
    }

    /// Every second: steps whose minimum time has passed, checkpoints of quiet rollouts,
    /// and books of rollouts no longer running.
    pub fn tick(
        &mut self,
        cluster: &std::sync::Arc<crate::raft::cluster::Cluster>,
        shared: &std::sync::Arc<crate::proxy::Shared>,
        now: u64,
    ) {
        let apis: Vec<String> = self.books.keys().cloned().collect();
        for api in apis {
            match committed(cluster, &api) {
                Some(state)
                    if super::state::running(&state)
                        && self
                            .books
                            .get(&api)
                            .is_some_and(|b| b.id == state.id && b.step == state.step) =>
                {
                    self.act(cluster, shared, &state, now)
                }
                _ => {
                    self.books.remove(&api);
                }
            }
        }
    }

    fn act(
        &mut self,
        cluster: &std::sync::Arc<crate::raft::cluster::Cluster>,
        shared: &std::sync::Arc<crate::proxy::Shared>,
        state: &RolloutState,
        now: u64,
    ) {
        let Some(book) = self.books.get_mut(&state.api) else {
            return;
        };
        let action = book.evaluate(state, now);
        for m in &book.metrics {
            for (test, value) in [("worse", m.judge.worse()), ("within", m.judge.within())] {
                metrics::gauge!(
                    "tollgate_rollout_statistic",
                    "api" => state.api.clone(),
                    "metric" => m.name.clone(),
                    "test" => test
                )
                .set(value.max(-1e6));
            }
        }
        metrics::gauge!("tollgate_rollout_step", "api" => state.api.clone())
            .set(f64::from(state.step));
        use tollgate_proto::state::v1::rollout_command::Op;
        use tollgate_proto::state::v1::{RolloutCheckpoint, RolloutVerdict};
        let (request_id, op, failing) = match action {
            Action::Nothing => return,
            Action::Checkpoint(evidence) => (
                format!(
                    "rollout/{}/{}/{}/checkpoint/{now}",
                    state.api, state.id, state.step
                ),
                Op::Checkpoint(RolloutCheckpoint {
                    rollout: state.id,
                    step: state.step,
                    evidence: Some(evidence),
                }),
                None,
            ),
            Action::Verdict { pass, evidence } => {
                book.proposed_ms = Some(now);
                // A failed step names its failing calls, from this node's call log.
                let failing = (!pass).then(|| {
                    let worst = evidence
                        .metrics
                        .iter()
                        .find(|m| m.worse_statistic >= evidence.log_threshold)
                        .map_or("errors", |m| m.metric.as_str())
                        .to_string();
                    (shared.calls.clone(), worst)
                });
                (
                    format!("rollout/{}/{}/{}/verdict", state.api, state.id, state.step),
                    Op::Verdict(RolloutVerdict {
                        rollout: state.id,
                        step: state.step,
                        pass,
                        evidence: Some(evidence),
                    }),
                    failing,
                )
            }
        };
        let cluster = cluster.clone();
        let (api, canary, since_us) = (
            state.api.clone(),
            state.canary.clone(),
            state.step_started_ms * 1000,
        );
        tokio::spawn(async move {
            let mut op = op;
            if let (Some((calls, worst)), Op::Verdict(v)) = (failing, &mut op)
                && let Some(e) = v.evidence.as_mut()
            {
                e.failing = crate::calls::sample(calls, &api, &canary, since_us, &worst).await;
            }
            let verdict = matches!(op, Op::Verdict(_));
            let cmd = tollgate_proto::state::v1::Command {
                request_id,
                kind: Some(tollgate_proto::state::v1::command::Kind::Rollout(
                    tollgate_proto::state::v1::RolloutCommand {
                        api: api.clone(),
                        op: Some(op),
                    },
                )),
                ..Default::default()
            };
            let req = tollgate_proto::node::v1::WriteRequest { command: Some(cmd) };
            match cluster
                .write_command(req, false, &crate::auth::principal::Caller::Node)
                .await
            {
                Ok(w) if verdict => {
                    tracing::info!(api, log_index = w.log_index, "rollout verdict committed")
                }
                Ok(_) => {}
                Err(e) => tracing::info!(api, "rollout decision not committed: {}", e.message()),
            }
        });
    }
}
