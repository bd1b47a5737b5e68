//! A node's side of an upstream's cluster-wide circuit breaker (docs/architecture.md,
//! decision 7): counters of its own outcomes, reported to the circuit's owner every tick,
//! and the half-open probe permits the owner grants. Recording is a few relaxed atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::state::spec::CircuitSpec;

/// The answer while the circuit is open, when the spec sets one.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub status: StatusCode,
    pub body: Bytes,
    pub content_type: HeaderValue,
}

#[derive(Debug)]
pub struct CircuitRuntime {
    pub spec: CircuitSpec,
    /// Digest of `spec`: a changed policy is a new circuit at the owner.
    pub policy: String,
    pub fallback: Option<std::sync::Arc<Fallback>>,
    ok: AtomicU64,
    failed: AtomicU64,
    slow: AtomicU64,
    /// Failures since the last success on this node.
    consecutive: AtomicU64,
    probes_ok: AtomicU64,
    probes_failed: AtomicU64,
    /// Probe permits held, the committed state (since_index) they were granted for, and
    /// until when they are good (ms since the epoch).
    permits: AtomicU64,
    permits_index: AtomicU64,
    permits_until: AtomicU64,
    /// Requests refused while half-open for want of a permit since the last tick.
    want: AtomicU64,
    /// Requests let through as half-open probes.
    probes: metrics::Counter,
}

/// What a node reports to the owner (taken from the counters, which restart at zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    pub ok: u64,
    pub failed: u64,
    pub slow: u64,
    pub consecutive: u64,
    pub probes_ok: u64,
    pub probes_failed: u64,
    pub want_probes: u64,
}

impl Outcomes {
    pub fn is_empty(&self) -> bool {
        self.ok + self.failed + self.slow + self.probes_ok + self.probes_failed + self.want_probes
            == 0
    }
}

impl CircuitRuntime {
    pub fn new(upstream: &str, spec: &CircuitSpec) -> CircuitRuntime {
        let fallback = spec.fallback.as_ref().map(|f| {
            std::sync::Arc::new(Fallback {
                status: StatusCode::from_u16(f.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                body: Bytes::from(f.body.clone()),
                content_type: HeaderValue::from_str(&f.content_type)
                    .unwrap_or(HeaderValue::from_static("application/json")),
            })
        });
        CircuitRuntime {
            policy: format!(
                "{:08x}",
                crate::hash::fnv1a(format!("{spec:?}").as_bytes()) as u32
            ),
            spec: spec.clone(),
            fallback,
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            consecutive: AtomicU64::new(0),
            probes_ok: AtomicU64::new(0),
            probes_failed: AtomicU64::new(0),
            permits: AtomicU64::new(0),
            permits_index: AtomicU64::new(0),
            permits_until: AtomicU64::new(0),
            want: AtomicU64::new(0),
            probes: metrics::counter!("tollgate_circuit_probes_total", "upstream" => upstream.to_string()),
        }
    }

    /// Records one call's outcome: `failed` for a 5xx, a connect error or a timeout;
    /// `elapsed` to the response head; `probe` when it went through on a permit.
    pub fn record(&self, failed: bool, elapsed: Duration, probe: bool) {
        if probe {
            let c = if failed {
                &self.probes_failed
            } else {
                &self.probes_ok
            };
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.consecutive.fetch_add(1, Ordering::Relaxed);
        } else {
            self.ok.fetch_add(1, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.spec.slow_call.is_some_and(|s| elapsed >= s) {
            self.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Half-open: takes a probe permit granted for the state `index`, or notes the demand.
    pub fn take_permit(&self, index: u64, now_ms: u64) -> bool {
        if self.permits_index.load(Ordering::Acquire) == index
            && now_ms < self.permits_until.load(Ordering::Acquire)
            && self
                .permits
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1))
                .is_ok()
        {
            self.probes.increment(1);
            return true;
        }
        self.want.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Adds permits the owner granted for the state `index` at `now_ms` (permits of an
    /// older state are dropped). They are good for [`PERMIT_TTL_MS`]: a node whose traffic
    /// stops does not hold the cluster's probes, since the owner gives them out again
    /// after [`PERMIT_TIMEOUT_MS`], once these have expired.
    pub fn grant_permits(&self, index: u64, probes: u64, now_ms: u64) {
        if self.permits_index.swap(index, Ordering::AcqRel) != index
            || now_ms >= self.permits_until.load(Ordering::Acquire)
        {
            self.permits.store(0, Ordering::Release);
        }
        self.permits_until
            .store(now_ms + PERMIT_TTL_MS, Ordering::Release);
        self.permits.fetch_add(probes, Ordering::AcqRel);
    }

    /// The outcomes since the last call.
    pub fn take(&self) -> Outcomes {
        Outcomes {
            ok: self.ok.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            slow: self.slow.swap(0, Ordering::Relaxed),
            consecutive: self.consecutive.load(Ordering::Relaxed),
            probes_ok: self.probes_ok.swap(0, Ordering::Relaxed),
            probes_failed: self.probes_failed.swap(0, Ordering::Relaxed),
            want_probes: self.want.swap(0, Ordering::Relaxed),
        }
    }

    /// Puts back outcomes whose report did not reach the owner.
    pub fn restore(&self, o: &Outcomes) {
        self.ok.fetch_add(o.ok, Ordering::Relaxed);
        self.failed.fetch_add(o.failed, Ordering::Relaxed);
        self.slow.fetch_add(o.slow, Ordering::Relaxed);
        self.probes_ok.fetch_add(o.probes_ok, Ordering::Relaxed);
        self.probes_failed
            .fetch_add(o.probes_failed, Ordering::Relaxed);
    }

    pub fn open_for(&self) -> Duration {
        self.spec.open_for
    }
}

/// How long a node may use the probe permits it was granted.
pub const PERMIT_TTL_MS: u64 = 300;
/// How long the owner waits for the outcomes of granted permits before it gives them out
/// again (longer than [`PERMIT_TTL_MS`], so the old ones have expired by then).
const PERMIT_TIMEOUT_MS: u64 = 500;

/// The owner's view of one circuit: every node's outcomes over the sliding window, in
/// one-second buckets, and the probes of the current half-open period.
#[derive(Debug, Default)]
pub struct CircuitBook {
    /// (second, ok, failed, slow).
    buckets: std::collections::VecDeque<(u64, u64, u64, u64)>,
    consecutive: u64,
    /// The committed state the probe counts belong to.
    probe_index: u64,
    probes_granted: u64,
    probes_ok: u64,
    probes_failed: u64,
    /// When permits were last granted (ms): permits never used come back after a while.
    granted_at_ms: u64,
    /// A transition proposed for state `.0` at `.1` (ms): not proposed again meanwhile.
    pub pending: Option<(u64, u64)>,
}

/// What the owner decides after a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Stay,
    Open(String),
    Close,
}

impl CircuitBook {
    /// Adds a node's outcomes at `now_ms`.
    pub fn add(&mut self, now_ms: u64, o: &Outcomes, window: Duration) {
        let sec = now_ms / 1000;
        let keep = window.as_secs().max(1);
        while self.buckets.front().is_some_and(|b| b.0 + keep <= sec) {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some(b) if b.0 == sec => {
                b.1 += o.ok;
                b.2 += o.failed;
                b.3 += o.slow;
            }
            _ => self.buckets.push_back((sec, o.ok, o.failed, o.slow)),
        }
        // A run of failures: a success anywhere ends it (the sender's own run is what it
        // says); otherwise the cluster's failures add up.
        if o.ok > 0 {
            self.consecutive = o.consecutive;
        } else {
            self.consecutive += o.failed;
        }
    }

    /// Closed: whether a trigger fires.
    pub fn check_closed(&self, spec: &CircuitSpec) -> Verdict {
        if self.consecutive >= u64::from(spec.consecutive_failures) {
            return Verdict::Open(format!(
                "{} failures in a row across the cluster",
                self.consecutive
            ));
        }
        let (ok, failed, slow) = self
            .buckets
            .iter()
            .fold((0, 0, 0), |a, b| (a.0 + b.1, a.1 + b.2, a.2 + b.3));
        let calls = ok + failed;
        if calls < u64::from(spec.min_calls) || calls == 0 {
            return Verdict::Stay;
        }
        let rate = failed as f64 * 100.0 / calls as f64;
        if rate >= spec.failure_rate {
            return Verdict::Open(format!(
                "{rate:.0}% of {calls} calls failed over {}s",
                spec.window.as_secs()
            ));
        }
        let slow_rate = slow as f64 * 100.0 / calls as f64;
        if spec.slow_call.is_some() && slow_rate >= spec.slow_call_rate {
            return Verdict::Open(format!(
                "{slow_rate:.0}% of {calls} calls were slow over {}s",
                spec.window.as_secs()
            ));
        }
        Verdict::Stay
    }

    /// Half-open (state `index`): takes probe outcomes and grants permits for `want`;
    /// returns the permits granted and the verdict.
    pub fn half_open(
        &mut self,
        now_ms: u64,
        index: u64,
        o: &Outcomes,
        spec: &CircuitSpec,
    ) -> (u64, Verdict) {
        if self.probe_index != index {
            self.probe_index = index;
            self.probes_granted = 0;
            self.probes_ok = 0;
            self.probes_failed = 0;
        }
        // Permits granted to a node that then sent nothing (its traffic stopped, it
        // died) are given out again after a while.
        let settled = self.probes_ok + self.probes_failed;
        if self.probes_granted > settled
            && now_ms.saturating_sub(self.granted_at_ms) > PERMIT_TIMEOUT_MS
        {
            self.probes_granted = settled;
        }
        self.probes_ok += o.probes_ok;
        self.probes_failed += o.probes_failed;
        if self.probes_failed > 0 {
            return (0, Verdict::Open("a half-open probe failed".into()));
        }
        let limit = u64::from(spec.half_open_probes);
        if self.probes_ok >= limit {
            return (0, Verdict::Close);
        }
        // One permit per report: the probes spread over the nodes that have traffic, and
        // one whose traffic stops strands at most one.
        let grant = o
            .want_probes
            .min(1)
            .min(limit.saturating_sub(self.probes_granted));
        if grant > 0 {
            self.probes_granted += grant;
            self.granted_at_ms = now_ms;
        }
        (grant, Verdict::Stay)
    }

    /// Forgets the window (after a transition).
    pub fn reset(&mut self) {
        self.buckets.clear();
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CircuitSpec {
        serde_yaml_ng::from_str(
            "{ consecutive_failures: 5, failure_rate: 50, min_calls: 10, window: 10s, half_open_probes: 2, slow_call: 1s, slow_call_rate: 80 }",
        )
        .expect("a circuit spec")
    }

    fn calls(ok: u64, failed: u64) -> Outcomes {
        Outcomes {
            ok,
            failed,
            consecutive: if ok > 0 { 0 } else { failed },
            ..Outcomes::default()
        }
    }

    #[test]
    fn each_trigger_opens_and_nothing_else_does() {
        let s = spec();
        let mut b = CircuitBook::default();
        b.add(0, &calls(8, 1), s.window);
        assert_eq!(b.check_closed(&s), Verdict::Stay, "under min_calls");
        b.add(100, &calls(0, 4), s.window);
        assert_eq!(
            b.check_closed(&s),
            Verdict::Stay,
            "5 of 13 failed, 4 in a row"
        );
        b.add(200, &calls(0, 1), s.window);
        assert!(matches!(b.check_closed(&s), Verdict::Open(r) if r.contains("in a row")));
        // The rate: every node's calls add up over the window, old seconds drop out.
        let mut b = CircuitBook::default();
        b.add(0, &calls(5, 0), s.window);
        b.add(1_000, &calls(2, 4), s.window);
        b.add(1_100, &calls(0, 4), s.window);
        assert!(matches!(b.check_closed(&s), Verdict::Open(r) if r.contains("failed")));
        let mut b = CircuitBook::default();
        b.add(0, &calls(0, 4), s.window);
        b.add(20_000, &calls(10, 0), s.window);
        assert_eq!(
            b.check_closed(&s),
            Verdict::Stay,
            "old failures left the window"
        );
        // Slow calls.
        let mut b = CircuitBook::default();
        b.add(
            0,
            &Outcomes {
                ok: 10,
                slow: 9,
                ..Outcomes::default()
            },
            s.window,
        );
        assert!(matches!(b.check_closed(&s), Verdict::Open(r) if r.contains("slow")));
    }

    #[test]
    fn half_open_grants_at_most_the_probes_and_decides_on_their_outcomes() {
        let s = spec();
        let want = |n| Outcomes {
            want_probes: n,
            ..Outcomes::default()
        };
        let mut b = CircuitBook::default();
        assert_eq!(b.half_open(0, 7, &want(5), &s), (1, Verdict::Stay));
        assert_eq!(b.half_open(1, 7, &want(5), &s), (1, Verdict::Stay));
        assert_eq!(b.half_open(2, 7, &want(5), &s), (0, Verdict::Stay), "2 out");
        // Permits nobody used come back once they have expired at the nodes.
        let back = PERMIT_TIMEOUT_MS + 10;
        assert_eq!(b.half_open(back, 7, &want(5), &s).0, 1);
        let ok = Outcomes {
            probes_ok: 2,
            ..Outcomes::default()
        };
        assert_eq!(b.half_open(back + 1, 7, &ok, &s), (0, Verdict::Close));
        // A new half-open period starts afresh; one failed probe reopens.
        let failed = Outcomes {
            probes_failed: 1,
            ..Outcomes::default()
        };
        assert_eq!(b.half_open(0, 9, &want(1), &s).0, 1);
        assert!(matches!(b.half_open(1, 9, &failed, &s).1, Verdict::Open(_)));
    }

    #[test]
    fn a_node_spends_only_live_permits_of_the_current_state() {
        let rt = CircuitRuntime::new("a", &spec());
        assert!(!rt.take_permit(3, 0));
        rt.grant_permits(3, 2, 1_000);
        assert!(!rt.take_permit(4, 1_001), "another state's permits");
        assert!(rt.take_permit(3, 1_001));
        assert!(!rt.take_permit(3, 1_000 + PERMIT_TTL_MS), "expired");
        assert_eq!(rt.take().want_probes, 3);
    }
}
