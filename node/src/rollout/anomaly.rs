//! Anomaly alerts: each API version with `alerts:` in its content is judged by the leader
//! against its own recent history (docs/hypercare.md): every 5 s, the calls its rollups
//! gained since the last look against the complete minutes before. The test is the judge's
//! kind: a mixture likelihood ratio of the new calls' bad-event rate against a tolerance
//! above the history's, valid at every look; it runs in one-hour epochs (a new test each
//! hour), so a healthy version is alerted on with probability at most `level` per hour and
//! metric. Raising and resolving are committed through Raft (audited, told by
//! the leader through the webhook, counted in metrics).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tollgate_proto::state::v1::{
    AlertCommand, AlertRaise, AlertResolve, UsageCounts, alert_command,
};

use super::sprt::log_mean_exp;
use crate::state::usage::{Histogram, add_counts, latency_bucket, percentile_us};

/// `alerts:` in an API version's content.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSpec {
    /// errors, latency, and for LLM APIs tokens and cost per request (default errors and
    /// latency).
    #[serde(default = "default_metrics")]
    pub metrics: Vec<String>,
    /// The significance level per hour and metric (default 0.001).
    #[serde(default = "default_level")]
    pub level: f64,
    /// The history each minute is compared with (default 1h, from 10m to 24h).
    #[serde(default = "default_baseline", with = "humantime_serde_compat")]
    pub baseline: Duration,
    /// No new alert of a metric for this long after one (default 15m): flapping is bounded.
    #[serde(default = "default_quiet", with = "humantime_serde_compat")]
    pub quiet_for: Duration,
    /// A named secret of the API's tenant that holds the webhook URL.
    #[serde(default)]
    pub webhook_secret: String,
}

fn default_metrics() -> Vec<String> {
    vec!["errors".into(), "latency".into()]
}
fn default_level() -> f64 {
    0.001
}
fn default_baseline() -> Duration {
    Duration::from_secs(3600)
}
fn default_quiet() -> Duration {
    Duration::from_secs(900)
}

mod humantime_serde_compat {
    use serde::Deserialize;
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}; write it like 15m")))
    }
}

impl AlertSpec {
    /// Errors: (field path below `alerts`, message).
    pub fn check(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        for (i, m) in self.metrics.iter().enumerate() {
            if !matches!(m.as_str(), "errors" | "latency" | "tokens" | "cost") {
                errors.push((
                    format!("metrics[{i}]"),
                    format!("{m:?} is not errors, latency, tokens or cost"),
                ));
            }
        }
        if self.metrics.is_empty() {
            errors.push((
                "metrics".into(),
                "name at least one of errors, latency, tokens, cost".into(),
            ));
        }
        if !(self.level > 0.0 && self.level <= 0.1) {
            errors.push((
                "level".into(),
                format!("{} is not above 0 and at most 0.1", self.level),
            ));
        }
        if self.baseline < Duration::from_secs(600) || self.baseline > Duration::from_secs(86_400) {
            errors.push(("baseline".into(), "from 10m to 24h".into()));
        }
        if self.quiet_for > Duration::from_secs(86_400) {
            errors.push(("quiet_for".into(), "at most 24h".into()));
        }
        if self.webhook_secret.len() > 128 {
            errors.push((
                "webhook_secret".into(),
                "a secret name, at most 128 bytes".into(),
            ));
        }
        errors
    }
}

/// Rates the test mixes over, as multiples of the tolerance.
const ALTERNATIVES: [f64; 5] = [1.5, 2.0, 3.0, 5.0, 10.0];
const EPOCH_MINUTES: u64 = 60;
/// History requests a metric needs before it is judged.
const MIN_HISTORY: u64 = 100;

/// One version's test of one metric.
#[derive(Debug, Clone)]
pub struct Detector {
    raise: [f64; ALTERNATIVES.len()],
    /// While firing: evidence the rate is back within tolerance.
    resolve: [f64; 3],
    epoch_started: u64,
}

impl Detector {
    fn new(minute: u64) -> Detector {
        Detector {
            raise: [0.0; ALTERNATIVES.len()],
            resolve: [0.0; 3],
            epoch_started: minute,
        }
    }

    /// One minute: `n` requests, `k` bad, against the tolerance.
    pub fn observe(&mut self, n: u64, k: u64, tol: f64, minute: u64) {
        if minute >= self.epoch_started + EPOCH_MINUTES {
            *self = Detector::new(minute);
        }
        if n == 0 || !(tol > 0.0 && tol < 1.0) {
            return;
        }
        let k = k.min(n);
        for (l, a) in self.raise.iter_mut().zip(ALTERNATIVES) {
            let r = (a * tol).min(0.999);
            *l += k as f64 * (r / tol).ln() + (n - k) as f64 * ((1.0 - r) / (1.0 - tol)).ln();
        }
        for (l, rho) in self.resolve.iter_mut().zip([0.25, 0.5, 0.75]) {
            let r = rho * tol;
            *l += k as f64 * (r / tol).ln() + (n - k) as f64 * ((1.0 - r) / (1.0 - tol)).ln();
        }
    }

    pub fn raised(&self) -> f64 {
        log_mean_exp(&self.raise)
    }

    pub fn resolved(&self) -> f64 {
        log_mean_exp(&self.resolve)
    }
}

/// The tolerance for a metric given the history's bad-event rate.
pub fn tolerance(metric: &str, history_rate: f64) -> f64 {
    match metric {
        "errors" => (history_rate * 2.0).max(history_rate + 0.01),
        _ => (history_rate * 1.5).max(history_rate + 0.05),
    }
    .min(0.99)
}

/// (requests, bad) of `recent` for `metric`, and the history's rate, from rollup counts.
pub fn bad_counts(
    metric: &str,
    recent: &UsageCounts,
    history: &UsageCounts,
) -> Option<(u64, u64, f64)> {
    if history.requests < MIN_HISTORY {
        return None;
    }
    match metric {
        "errors" => Some((
            recent.requests,
            recent.class_5xx,
            history.class_5xx as f64 / history.requests as f64,
        )),
        other => {
            // "Bad": above the history's 95th percentile of duration, tokens or cost per
            // request.
            let (recent_h, history_h) = match other {
                "tokens" => (&recent.tokens_per_request, &history.tokens_per_request),
                "cost" => (&recent.cost_per_request, &history.cost_per_request),
                _ => (&recent.latency, &history.latency),
            };
            let h: Histogram = history_h.iter().map(|(&b, &n)| (b, n)).collect();
            let total: u64 = h.values().sum();
            if total < MIN_HISTORY {
                return None;
            }
            let threshold = latency_bucket(percentile_us(&h, 0.95)?);
            let above =
                |c: &BTreeMap<u32, u64>| c.range(threshold + 1..).map(|(_, n)| n).sum::<u64>();
            let recent_total: u64 = recent_h.values().sum();
            Some((
                recent_total,
                above(recent_h),
                above(history_h) as f64 / total as f64,
            ))
        }
    }
}

/// What a version's rows held when last looked at, to judge only what came since.
#[derive(Debug, Clone, Default)]
struct Seen {
    minute: u64,
    counts: UsageCounts,
}

/// `a - b` for what the detectors read: requests, 5xx and the latency histogram.
fn minus(a: &UsageCounts, b: &UsageCounts) -> UsageCounts {
    let sub = |a: &BTreeMap<u32, u64>, b: &BTreeMap<u32, u64>| {
        let mut out = a.clone();
        for (k, n) in b {
            if let Some(v) = out.get_mut(k) {
                *v = v.saturating_sub(*n);
            }
        }
        out.retain(|_, n| *n > 0);
        out
    };
    UsageCounts {
        requests: a.requests.saturating_sub(b.requests),
        class_5xx: a.class_5xx.saturating_sub(b.class_5xx),
        latency: sub(&a.latency, &b.latency),
        tokens_per_request: sub(&a.tokens_per_request, &b.tokens_per_request),
        cost_per_request: sub(&a.cost_per_request, &b.cost_per_request),
        ..Default::default()
    }
}

/// The leader's loop: every 5 s, each version with alert rules, on the calls its rollups
/// gained since the last look (as the nodes ship them), against the complete minutes
/// before the current one.
pub async fn run(
    cluster: Arc<crate::raft::cluster::Cluster>,
    shared: Arc<crate::proxy::Shared>,
    stop: CancellationToken,
) {
    let mut detectors: HashMap<(String, String, String), Detector> = HashMap::new();
    let mut seen: HashMap<(String, String), Seen> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let leader = cluster.raft.metrics().borrow().current_leader == Some(cluster.id);
        if !leader {
            detectors.clear();
            seen.clear();
            continue;
        }
        let minute = crate::raft::service::now_ms() / 60_000;
        let snapshot = shared.snapshot.load_full();
        for mount in &snapshot.routing.mounts {
            for v in &mount.versions {
                let Some(spec) = &v.alerts else { continue };
                let baseline_min = spec.baseline.as_secs() / 60;
                let version_key = (mount.api.to_string(), v.name.to_string());
                let last = seen.get(&version_key).cloned();
                let (now_counts, last_minute_counts, history, alerts) =
                    cluster.state_machine.read(|a| {
                        let sum = |from: u64, to: u64| {
                            let mut c = UsageCounts::default();
                            for e in a.state.usage.entries(from, to) {
                                if *e.api == *mount.api && *e.version == *v.name {
                                    add_counts(
                                        &mut c,
                                        e.counts.as_ref().unwrap_or(&Default::default()),
                                    );
                                }
                            }
                            c
                        };
                        let alerts: HashMap<String, bool> = a
                            .state
                            .alerts
                            .values()
                            .filter(|x| *x.api == *mount.api && *x.version == *v.name)
                            .map(|x| (x.metric.clone(), x.firing))
                            .collect();
                        let last_minute = last
                            .as_ref()
                            .filter(|l| l.minute < minute)
                            .map(|l| sum(l.minute, l.minute + 1));
                        (
                            sum(minute, minute + 1),
                            last_minute,
                            sum(minute.saturating_sub(baseline_min), minute),
                            alerts,
                        )
                    });
                // New calls since the last look: the rest of a minute that ended, and
                // the current minute's so far.
                let mut fresh = match &last {
                    Some(l) if l.minute == minute => minus(&now_counts, &l.counts),
                    _ => now_counts.clone(),
                };
                if let (Some(l), Some(ended)) = (&last, &last_minute_counts) {
                    add_counts(&mut fresh, &minus(ended, &l.counts));
                }
                seen.insert(
                    version_key.clone(),
                    Seen {
                        minute,
                        counts: now_counts,
                    },
                );
                if last.is_none() {
                    // The first look only sets where counting starts.
                    continue;
                }
                let threshold = (spec.metrics.len() as f64 / spec.level).ln();
                for metric in &spec.metrics {
                    let Some((n, k, rate)) = bad_counts(metric, &fresh, &history) else {
                        continue;
                    };
                    if n == 0 {
                        continue;
                    }
                    let tol = tolerance(metric, rate);
                    let key = (version_key.0.clone(), version_key.1.clone(), metric.clone());
                    let d = detectors
                        .entry(key.clone())
                        .or_insert_with(|| Detector::new(minute));
                    d.observe(n, k, tol, minute);
                    let firing = alerts.get(metric).copied().unwrap_or(false);
                    let what = match metric.as_str() {
                        "errors" => "5xx",
                        "latency" => "slower than the history's p95",
                        "tokens" => "with more tokens than the history's p95",
                        _ => "costlier than the history's p95",
                    };
                    let summary = format!(
                        "{}@{} {metric}: {k} of the last {n} calls {what} ({:.2}%) against {:.2}% over the {} minutes before (tolerance {:.2}%)",
                        mount.api,
                        v.name,
                        k as f64 * 100.0 / n as f64,
                        rate * 100.0,
                        baseline_min,
                        tol * 100.0
                    );
                    let op = if !firing && d.raised() >= threshold {
                        let statistic = d.raised();
                        *d = Detector::new(minute);
                        let calls = crate::calls::sample(
                            shared.calls.clone(),
                            &mount.api,
                            &v.name,
                            minute.saturating_sub(1) * 60_000_000,
                            metric,
                        )
                        .await;
                        Some(alert_command::Op::Raise(AlertRaise {
                            minute,
                            summary,
                            statistic,
                            log_threshold: threshold,
                            calls,
                            logs_command: format!(
                                "tollgate logs --api {} --api-version {} --since {} {}",
                                mount.api,
                                v.name,
                                humantime::format_rfc3339_seconds(
                                    std::time::UNIX_EPOCH
                                        + Duration::from_secs(minute.saturating_sub(1) * 60)
                                ),
                                if metric == "errors" {
                                    "--status 5xx"
                                } else {
                                    "--slowest 20"
                                }
                            ),
                            quiet_ms: spec.quiet_for.as_millis() as u64,
                            webhook_secret: spec.webhook_secret.clone(),
                        }))
                    } else if firing && d.resolved() >= threshold {
                        *d = Detector::new(minute);
                        Some(alert_command::Op::Resolve(AlertResolve { summary }))
                    } else {
                        None
                    };
                    let Some(op) = op else { continue };
                    let cmd = tollgate_proto::state::v1::Command {
                        request_id: format!(
                            "alert/{}/{}/{metric}/{}",
                            key.0,
                            key.1,
                            crate::raft::service::now_ms()
                        ),
                        kind: Some(tollgate_proto::state::v1::command::Kind::Alert(
                            AlertCommand {
                                api: key.0.clone(),
                                version: key.1.clone(),
                                metric: metric.clone(),
                                op: Some(op),
                            },
                        )),
                        ..Default::default()
                    };
                    let req = tollgate_proto::node::v1::WriteRequest { command: Some(cmd) };
                    if let Err(e) = cluster
                        .write_command(req, false, &crate::auth::principal::Caller::Node)
                        .await
                    {
                        tracing::info!(api = %key.0, version = %key.1, "alert not committed: {}", e.message());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens per request: "bad" is above the history's p95, so a version whose answers
    /// grow counts most of its calls as bad against about 5% before.
    #[test]
    fn tokens_and_cost_are_judged_against_the_historys_p95() {
        let hist = |pairs: &[(u64, u64)]| -> BTreeMap<u32, u64> {
            pairs
                .iter()
                .map(|&(tokens, n)| (latency_bucket(tokens), n))
                .collect()
        };
        let history = UsageCounts {
            requests: 1000,
            tokens_per_request: hist(&[(200, 950), (400, 50)]),
            cost_per_request: hist(&[(2_000, 1000)]),
            ..Default::default()
        };
        let recent = UsageCounts {
            requests: 100,
            tokens_per_request: hist(&[(200, 10), (2_000, 90)]),
            cost_per_request: hist(&[(2_000, 100)]),
            ..Default::default()
        };
        let (n, k, rate) = bad_counts("tokens", &recent, &history).unwrap();
        assert_eq!((n, k), (100, 90));
        assert!(rate <= 0.05, "{rate}");
        let (n, k, _) = bad_counts("cost", &recent, &history).unwrap();
        assert_eq!((n, k), (100, 0), "the same cost per request: nothing bad");
        assert!(bad_counts("tokens", &recent, &UsageCounts::default()).is_none());
    }

    /// A version at 1% errors is alerted on when it jumps to 10%, within a few minutes at
    /// 10 requests a second, and never in a day of its usual rate.
    #[test]
    fn a_jump_is_found_and_a_steady_rate_is_left_alone() {
        let mut rng = fastrand::Rng::with_seed(5);
        let threshold = (2.0f64 / 0.001).ln();
        let draw = |rng: &mut fastrand::Rng, n: u64, p: f64| {
            (0..n).filter(|_| rng.f64() < p).count() as u64
        };
        let mut d = Detector::new(0);
        let mut raised = 0;
        for minute in 0..1440 {
            let k = draw(&mut rng, 600, 0.01);
            d.observe(600, k, tolerance("errors", 0.01), minute);
            if d.raised() >= threshold {
                raised += 1;
                d = Detector::new(minute);
            }
        }
        assert_eq!(raised, 0, "a steady version is never alerted on");
        let mut d = Detector::new(0);
        let found = (0..10).find(|&m| {
            let k = draw(&mut rng, 600, 0.10);
            d.observe(600, k, tolerance("errors", 0.01), m);
            d.raised() >= threshold
        });
        assert!(found.is_some_and(|m| m <= 1), "{found:?}");
    }
}
