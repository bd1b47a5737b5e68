//! A rollout's life in the replicated state: started by a person, stepped, promoted or
//! rolled back by the judge's verdicts, paused, resumed or aborted by a person. Applied
//! deterministically on every node; each transition sets the API's split, so every node
//! moves its weights at the same log index.

use std::collections::BTreeMap;

use tollgate_proto::state::v1::{
    Command, RolloutCommand, RolloutDecision, RolloutEvidence, RolloutState, RolloutStep,
    rollout_command,
};

use crate::state::lifecycle::{Api, Refusal, parse_version};

pub const METRICS: [&str; 4] = ["errors", "latency", "ttft", "cost"];
pub const DEFAULT_LEVEL: f64 = 0.001;
/// Decisions kept per rollout (the first, start, is always kept).
const MAX_DECISIONS: usize = 200;

/// What applying a rollout command did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Nothing (a verdict for a step already decided, a checkpoint of an old step).
    Nothing,
    /// Evidence stored; nothing the data plane serves changed.
    Checkpoint,
    /// A transition: its decision (the last in the rollout's list).
    Transition { action: &'static str },
}

pub fn running(r: &RolloutState) -> bool {
    r.phase == "running"
}

fn weight_of(r: &RolloutState) -> u32 {
    r.steps.get(r.step as usize).map_or(0, |s| s.weight)
}

/// Sets the split to `weight` percent on the canary, the rest on the stable version.
fn split(api: &mut Api, r: &RolloutState, weight: u32) -> Result<(), Refusal> {
    match weight {
        0 => api.set_split(&[(&r.stable, 100)]),
        100 => api.set_split(&[(&r.canary, 100)]),
        w => api.set_split(&[(&r.stable, 100 - w), (&r.canary, w)]),
    }
}

fn decide(
    r: &mut RolloutState,
    cmd: &Command,
    log_index: u64,
    action: &str,
    reason: String,
    evidence: Option<RolloutEvidence>,
    weight: u32,
) {
    r.decisions.push(RolloutDecision {
        at_ms: cmd.at_ms,
        step: r.step,
        action: action.into(),
        by: if cmd.actor.starts_with("node/") {
            "judge".into()
        } else {
            cmd.actor.clone()
        },
        reason,
        evidence,
        log_index,
        weight,
    });
    if r.decisions.len() > MAX_DECISIONS {
        r.decisions.remove(1);
    }
}

/// Checks a start and fills in its defaults.
fn check_start(
    api: &Api,
    s: &tollgate_proto::state::v1::StartRollout,
) -> Result<RolloutState, Refusal> {
    let bad = |m: String| Err(Refusal::Invalid(m));
    let canary = parse_version(&s.canary)?;
    let stable = match s.stable.as_str() {
        "" => api
            .split
            .iter()
            .filter(|(v, _)| **v != canary)
            .max_by_key(|(v, w)| (**w, (*v).clone()))
            .map(|(v, _)| v.clone())
            .ok_or_else(|| {
                Refusal::Precondition(format!(
                    "API {} sends no traffic to a version other than {canary}: name the stable version",
                    api.name
                ))
            })?,
        text => parse_version(text)?,
    };
    if stable == canary {
        return bad(format!(
            "the canary and the stable version are both {canary}"
        ));
    }
    for v in [&canary, &stable] {
        match api.versions.get(v) {
            None => {
                return Err(Refusal::NotFound(format!(
                    "API {} has no version {v}",
                    api.name
                )));
            }
            Some(x) if !x.stage.takes_traffic() => {
                return Err(Refusal::Precondition(format!(
                    "version {v} is {}; publish it before a rollout",
                    x.stage.name()
                )));
            }
            Some(_) => {}
        }
    }
    let steps: Vec<RolloutStep> = if s.steps.is_empty() {
        [10, 25, 50]
            .into_iter()
            .map(|weight| RolloutStep {
                weight,
                min_ms: 60_000,
                min_requests: 100,
            })
            .collect()
    } else {
        s.steps.clone()
    };
    if steps.len() > 20 {
        return bad(format!("{} steps: at most 20", steps.len()));
    }
    let mut last = 0;
    for (i, step) in steps.iter().enumerate() {
        if step.weight <= last || step.weight >= 100 {
            return bad(format!(
                "steps[{i}]: weight {} must be above the step before ({last}) and below 100 \
                 (the canary is judged against the stable's traffic; passing the last step \
                 promotes it to 100)",
                step.weight
            ));
        }
        if step.min_ms > 7 * 86_400_000 {
            return bad(format!("steps[{i}]: a step lasts at most 7 days"));
        }
        last = step.weight;
    }
    let level = if s.level == 0.0 {
        DEFAULT_LEVEL
    } else {
        s.level
    };
    if !(level > 0.0 && level <= 0.1) {
        return bad(format!(
            "level {level}: a significance level is above 0 and at most 0.1"
        ));
    }
    let mut metrics = if s.metrics.is_empty() {
        vec!["errors".to_string(), "latency".to_string()]
    } else {
        s.metrics.clone()
    };
    metrics.dedup();
    for m in &metrics {
        if !METRICS.contains(&m.as_str()) {
            return bad(format!(
                "metric {m:?} is not one of errors, latency, ttft, cost"
            ));
        }
    }
    let on_fail = match s.on_fail.as_str() {
        "" | "rollback" => "rollback",
        "pause" => "pause",
        other => return bad(format!("on_fail {other:?} is not rollback or pause")),
    };
    let on_pass = match s.on_pass.as_str() {
        "" | "promote" => "promote",
        "pause" => "pause",
        other => return bad(format!("on_pass {other:?} is not promote or pause")),
    };
    Ok(RolloutState {
        api: api.name.clone(),
        canary: canary.to_string(),
        stable: stable.to_string(),
        steps,
        level,
        metrics,
        on_fail: on_fail.into(),
        on_pass: on_pass.into(),
        webhook: s.webhook.clone(),
        tenant: api.tenant.clone(),
        ..Default::default()
    })
}

/// Applies one rollout command. `history` receives a finished rollout a new one replaces.
pub fn apply(
    apis: &mut BTreeMap<String, Api>,
    rollouts: &mut BTreeMap<String, RolloutState>,
    history: &mut Vec<RolloutState>,
    c: &RolloutCommand,
    cmd: &Command,
    log_index: u64,
) -> Result<Outcome, Refusal> {
    use rollout_command::Op;
    let Some(api) = apis.get_mut(&c.api) else {
        return Err(Refusal::NotFound(format!("there is no API {}", c.api)));
    };
    let current = rollouts.get_mut(&c.api);
    match &c.op {
        None => Err(Refusal::Invalid("the rollout command has no op".into())),
        Some(Op::Start(s)) => {
            if let Some(r) = &current
                && matches!(r.phase.as_str(), "running" | "paused")
            {
                return Err(Refusal::Precondition(format!(
                    "API {} has a rollout {} (to {}); abort it first",
                    c.api, r.phase, r.canary
                )));
            }
            let mut r = check_start(api, s)?;
            r.id = log_index;
            r.phase = "running".into();
            r.started_ms = cmd.at_ms;
            r.step_started_ms = cmd.at_ms;
            let w = weight_of(&r);
            split(api, &r, w)?;
            let reason = format!("{w}% to {} (stable {})", r.canary, r.stable);
            decide(&mut r, cmd, log_index, "start", reason, None, w);
            if let Some(old) = rollouts.insert(c.api.clone(), r) {
                history.push(old);
            }
            Ok(Outcome::Transition { action: "start" })
        }
        Some(Op::Checkpoint(k)) => {
            let Some(r) = current else {
                return Ok(Outcome::Nothing);
            };
            if r.id != k.rollout || r.step != k.step || !running(r) {
                return Ok(Outcome::Nothing);
            }
            r.evidence = k.evidence.clone();
            Ok(Outcome::Checkpoint)
        }
        Some(Op::Verdict(v)) => {
            let Some(r) = current else {
                return Ok(Outcome::Nothing);
            };
            // A verdict for a step already decided (a new owner's repeat), or a rollout
            // paused meanwhile: nothing.
            if r.id != v.rollout || r.step != v.step || !running(r) {
                return Ok(Outcome::Nothing);
            }
            let summary = v
                .evidence
                .as_ref()
                .map(|e| e.summary.clone())
                .unwrap_or_default();
            r.evidence = v.evidence.clone();
            let action = if !v.pass {
                if r.on_fail == "pause" {
                    r.phase = "paused".into();
                    let w = weight_of(r);
                    decide(
                        r,
                        cmd,
                        log_index,
                        "pause",
                        format!("failed: {summary}"),
                        v.evidence.clone(),
                        w,
                    );
                    "pause"
                } else {
                    split(api, r, 0)?;
                    r.phase = "rolled_back".into();
                    r.ended_ms = cmd.at_ms;
                    decide(
                        r,
                        cmd,
                        log_index,
                        "rollback",
                        format!("failed: {summary}"),
                        v.evidence.clone(),
                        0,
                    );
                    "rollback"
                }
            } else if (r.step as usize) + 1 < r.steps.len() {
                r.step += 1;
                r.step_started_ms = cmd.at_ms;
                let w = weight_of(r);
                split(api, r, w)?;
                decide(
                    r,
                    cmd,
                    log_index,
                    "step",
                    format!("passed: {summary}"),
                    v.evidence.clone(),
                    w,
                );
                r.evidence = None;
                "step"
            } else if r.on_pass == "pause" {
                r.phase = "paused".into();
                let w = weight_of(r);
                decide(
                    r,
                    cmd,
                    log_index,
                    "pause",
                    format!("passed every step, waiting for a person to promote: {summary}"),
                    v.evidence.clone(),
                    w,
                );
                "pause"
            } else {
                split(api, r, 100)?;
                r.phase = "promoted".into();
                r.ended_ms = cmd.at_ms;
                decide(
                    r,
                    cmd,
                    log_index,
                    "promote",
                    format!("passed every step: {summary}"),
                    v.evidence.clone(),
                    100,
                );
                "promote"
            };
            Ok(Outcome::Transition { action })
        }
        Some(Op::Control(k)) => {
            let Some(r) = current else {
                return Err(Refusal::NotFound(format!("API {} has no rollout", c.api)));
            };
            if k.rollout != 0 && k.rollout != r.id {
                return Err(Refusal::Precondition(format!(
                    "rollout {} of API {} is not the current one ({})",
                    k.rollout, c.api, r.id
                )));
            }
            let reason = if k.reason.is_empty() {
                "by hand".to_string()
            } else {
                k.reason.clone()
            };
            let action = match (k.action.as_str(), r.phase.as_str()) {
                ("pause", "running") => {
                    r.phase = "paused".into();
                    let w = weight_of(r);
                    decide(r, cmd, log_index, "pause", reason, None, w);
                    "pause"
                }
                ("resume", "paused") => {
                    r.phase = "running".into();
                    // The step starts over: its minimum time counts from now, and its
                    // evidence (the counts before the pause) is kept.
                    r.step_started_ms = cmd.at_ms;
                    let w = weight_of(r);
                    split(api, r, w)?;
                    decide(r, cmd, log_index, "resume", reason, None, w);
                    "resume"
                }
                ("abort", "running" | "paused") => {
                    split(api, r, 0)?;
                    r.phase = "aborted".into();
                    r.ended_ms = cmd.at_ms;
                    decide(r, cmd, log_index, "abort", reason, None, 0);
                    "abort"
                }
                ("pause" | "resume" | "abort", phase) => {
                    return Err(Refusal::Precondition(format!(
                        "the rollout of API {} is {phase}: it cannot {}",
                        c.api, k.action
                    )));
                }
                (other, _) => {
                    return Err(Refusal::Invalid(format!(
                        "action {other:?} is not pause, resume or abort"
                    )));
                }
            };
            Ok(Outcome::Transition { action })
        }
    }
}
