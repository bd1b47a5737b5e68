//! `tollgate rollout start|status|pause|resume|abort`: canary rollouts judged by the
//! cluster (docs/hypercare.md), through the control plane.

use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};
use tollgate_sdk::{cp, state};

use crate::billing::Connection;
use crate::logs::time_text;

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start moving an API's traffic to a canary version in steps; the cluster judges each
    /// step and promotes, rolls back or pauses.
    Start {
        api: String,
        /// The version to roll out.
        #[arg(long)]
        canary: String,
        /// The version it is judged against [default: the one with the most traffic now]
        #[arg(long, default_value = "")]
        stable: String,
        /// The canary's share of the traffic at each step, percent, each below 100; passing
        /// the last step promotes it to 100.
        #[arg(long, value_delimiter = ',', default_value = "10,25,50")]
        steps: Vec<u32>,
        /// Each step lasts at least this long...
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        step_min_time: Duration,
        /// ...and sees at least this many canary requests.
        #[arg(long, default_value_t = 100)]
        step_min_requests: u64,
        /// The significance level of every decision.
        #[arg(long, default_value_t = 0.001)]
        level: f64,
        /// What is judged: errors, latency, ttft, cost (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "errors,latency")]
        metrics: Vec<String>,
        /// When a step fails: rollback or pause.
        #[arg(long, default_value = "rollback")]
        on_fail: String,
        /// When the last step passes: promote or pause.
        #[arg(long, default_value = "promote")]
        on_pass: String,
        /// POSTed a JSON event on every transition.
        #[arg(long, default_value = "")]
        webhook: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// The API's current or last rollout: weights, counts, each test's statistic against
    /// its threshold, the verdict, the failing calls, every decision.
    Status {
        api: String,
        /// Redraw every second until the rollout ends (Ctrl-C stops).
        #[arg(long)]
        watch: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Stop judging and stepping; the weights stay where they are.
    Pause {
        api: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Go on judging the current step (its minimum time starts over).
    Resume {
        api: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// End the rollout and send every request to the stable version.
    Abort {
        api: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Connection,
    },
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    let s = now_ms.saturating_sub(at_ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

fn weight(r: &state::RolloutState) -> u32 {
    match r.phase.as_str() {
        "promoted" => 100,
        "rolled_back" | "aborted" => 0,
        _ => r.steps.get(r.step as usize).map_or(0, |s| s.weight),
    }
}

/// The rollout as text: what a person needs to see to trust the verdict.
pub fn render(r: &state::RolloutState, now_ms: u64) -> String {
    let mut out = String::new();
    let w = weight(r);
    out += &format!(
        "rollout {} of {}: {} (canary) against {} (stable): {}\n",
        r.id, r.api, r.canary, r.stable, r.phase
    );
    out += &format!(
        "  weights: {} {}%, {} {}%; step {} of {} (steps {})\n",
        r.canary,
        w,
        r.stable,
        100 - w,
        r.step + 1,
        r.steps.len(),
        r.steps
            .iter()
            .map(|s| s.weight.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    if let Some(s) = r.steps.get(r.step as usize) {
        out += &format!(
            "  step started {}; it needs {} s and {} canary requests\n",
            ago(now_ms, r.step_started_ms),
            s.min_ms / 1000,
            s.min_requests
        );
    }
    out += &format!(
        "  level {}; judging {}; on fail {}, on pass {}{}\n",
        r.level,
        r.metrics.join(", "),
        r.on_fail,
        r.on_pass,
        if r.webhook.is_empty() {
            String::new()
        } else {
            format!("; webhook {}", r.webhook)
        }
    );
    if let Some(e) = &r.evidence {
        out += &format!("\nevidence ({}):\n  {}\n", ago(now_ms, e.at_ms), e.summary);
        out += &format!(
            "  {:<8} {:>22} {:>22} {:>9} {:>9} {:>9}  verdict\n",
            "metric", "canary bad", "stable bad", "worse", "within", "threshold"
        );
        for m in &e.metrics {
            let pct = |bad: u64, n: u64| {
                if n == 0 {
                    0.0
                } else {
                    bad as f64 * 100.0 / n as f64
                }
            };
            let verdict = if m.worse_statistic >= e.log_threshold {
                "WORSE"
            } else if m.within_statistic >= e.log_threshold {
                "within"
            } else {
                "not enough evidence"
            };
            out += &format!(
                "  {:<8} {:>22} {:>22} {:>9.2} {:>9.2} {:>9.2}  {verdict}\n",
                m.metric,
                format!(
                    "{:.2}% {}/{}",
                    pct(m.canary_bad, m.canary_requests),
                    m.canary_bad,
                    m.canary_requests
                ),
                format!(
                    "{:.2}% {}/{}",
                    pct(m.stable_bad, m.stable_requests),
                    m.stable_bad,
                    m.stable_requests
                ),
                m.worse_statistic.max(-999.0),
                m.within_statistic.max(-999.0),
                e.log_threshold
            );
        }
        if !e.failing.is_empty() {
            out += "  failing calls (tollgate logs --request-id ID):\n";
            for f in &e.failing {
                out += &format!(
                    "    {} node {} status {} {} trace {}\n",
                    f.request_id,
                    f.node_id,
                    f.status,
                    f.error,
                    if f.trace_id.is_empty() {
                        "-"
                    } else {
                        &f.trace_id
                    }
                );
            }
        }
    }
    out += "\ndecisions:\n";
    for d in &r.decisions {
        out += &format!(
            "  {}  {:<8} step {} -> canary {:>3}%  by {}: {}\n",
            time_text(d.at_ms * 1000),
            d.action,
            d.step + 1,
            d.weight,
            d.by,
            d.reason
        );
    }
    out
}

fn rollout_json(r: &state::RolloutState) -> Value {
    let evidence = |e: &state::RolloutEvidence| {
        json!({
            "at": time_text(e.at_ms * 1000),
            "log_threshold": e.log_threshold,
            "summary": e.summary,
            "metrics": e.metrics.iter().map(|m| json!({
                "metric": m.metric,
                "canary_requests": m.canary_requests, "canary_bad": m.canary_bad,
                "stable_requests": m.stable_requests, "stable_bad": m.stable_bad,
                "worse": m.worse_statistic, "within": m.within_statistic,
            })).collect::<Vec<_>>(),
            "history": e.history.iter().map(|p| json!({
                "at": time_text(p.at_ms * 1000), "metric": p.metric, "worse": p.worse, "within": p.within,
            })).collect::<Vec<_>>(),
            "failing": e.failing.iter().map(|f| json!({
                "request_id": f.request_id, "trace_id": f.trace_id, "status": f.status,
                "error": f.error, "node": f.node_id,
            })).collect::<Vec<_>>(),
        })
    };
    json!({
        "api": r.api,
        "id": r.id,
        "canary": r.canary,
        "stable": r.stable,
        "phase": r.phase,
        "step": r.step,
        "canary_weight": weight(r),
        "steps": r.steps.iter().map(|s| json!({"weight": s.weight, "min_ms": s.min_ms, "min_requests": s.min_requests})).collect::<Vec<_>>(),
        "level": r.level,
        "metrics": r.metrics,
        "on_fail": r.on_fail,
        "on_pass": r.on_pass,
        "evidence": r.evidence.as_ref().map(evidence),
        "decisions": r.decisions.iter().map(|d| json!({
            "at": time_text(d.at_ms * 1000),
            "action": d.action,
            "step": d.step,
            "canary_weight": d.weight,
            "by": d.by,
            "reason": d.reason,
            "log_index": d.log_index,
            "evidence": d.evidence.as_ref().map(evidence),
        })).collect::<Vec<_>>(),
    })
}

fn show(reply: &cp::RolloutReply, json: bool) {
    let Some(r) = &reply.rollout else { return };
    if json {
        println!("{}", rollout_json(r));
    } else {
        print!("{}", render(r, reply.now_ms));
    }
}

pub async fn rollout(cmd: RolloutCommand) -> anyhow::Result<()> {
    match cmd {
        RolloutCommand::Start {
            api,
            canary,
            stable,
            steps,
            step_min_time,
            step_min_requests,
            level,
            metrics,
            on_fail,
            on_pass,
            webhook,
            conn,
        } => {
            let reply = conn
                .client()?
                .start_rollout(
                    &api,
                    state::StartRollout {
                        canary,
                        stable,
                        steps: steps
                            .into_iter()
                            .map(|weight| state::RolloutStep {
                                weight,
                                min_ms: step_min_time.as_millis() as u64,
                                min_requests: step_min_requests,
                            })
                            .collect(),
                        level,
                        metrics,
                        on_fail,
                        on_pass,
                        webhook,
                    },
                )
                .await?;
            show(&reply, false);
            println!("\nwatch it with: tollgate rollout status {api} --watch");
            Ok(())
        }
        RolloutCommand::Status {
            api,
            watch,
            json,
            conn,
        } => {
            let client = conn.client()?;
            if !watch {
                show(&client.get_rollout(&api).await?, json);
                return Ok(());
            }
            loop {
                let reply = client.get_rollout(&api).await?;
                if !json {
                    // Clear the terminal and draw again.
                    print!("\x1b[2J\x1b[H");
                }
                show(&reply, json);
                let ended = reply
                    .rollout
                    .as_ref()
                    .is_some_and(|r| !matches!(r.phase.as_str(), "running" | "paused"));
                if ended {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        RolloutCommand::Pause { api, reason, conn } => {
            show(
                &conn
                    .client()?
                    .control_rollout(&api, "pause", &reason)
                    .await?,
                false,
            );
            Ok(())
        }
        RolloutCommand::Resume { api, reason, conn } => {
            show(
                &conn
                    .client()?
                    .control_rollout(&api, "resume", &reason)
                    .await?,
                false,
            );
            Ok(())
        }
        RolloutCommand::Abort { api, reason, conn } => {
            show(
                &conn
                    .client()?
                    .control_rollout(&api, "abort", &reason)
                    .await?,
                false,
            );
            Ok(())
        }
    }
}
