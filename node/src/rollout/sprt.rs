//! The rollout judge's sequential tests: valid however often they are looked at.
//!
//! A metric is a kind of *bad event* (an error, a call slower than the stable version's
//! 95th percentile, ...). Each interval the judge gets, per version, the requests and the
//! bad events among them. Two tests run side by side, each a mixture of likelihood ratios
//! (a mixture sequential probability ratio test), which is a non-negative supermartingale
//! under its null hypothesis; by Ville's inequality it ever reaches 1/α with probability at
//! most α, at whatever moments it is checked:
//!
//! - **Worse** (null: the canary's bad-event rate is at most the stable's). Given how many
//!   bad events an interval had in all, each is the canary's with probability `p` (the
//!   canary's share of the interval's requests) when the rates are equal, and with
//!   `θp / (θp + 1 - p)` when the canary's rate is θ times the stable's. The statistic mixes
//!   θ over [`WORSE_GRID`]. (Conditioning on the interval's counts: the canary's bad events
//!   are then hypergeometric, which the binomial bounds in convex order, so the mixture's
//!   expectation stays at most 1.)
//! - **Within tolerance** (null: the canary's bad-event rate is at least the tolerance, the
//!   larger of `margin` times the stable's rate and the stable's rate plus `slack`). Each
//!   canary request is bad with probability ρ·tolerance under the alternatives, ρ mixed over
//!   [`WITHIN_GRID`]; the tolerance of an interval is fixed from the stable's counts before
//!   the canary's are looked at.
//!
//! A metric fails when the first reaches `metrics / α` (Bonferroni over the metrics) and
//! passes when the second does. Too few events move neither: "not enough evidence".

/// Relative risks the "worse" test mixes over, equally weighted.
pub const WORSE_GRID: [f64; 6] = [1.5, 2.0, 3.0, 5.0, 10.0, 20.0];
/// Rates, as fractions of the tolerance, the "within tolerance" test mixes over.
pub const WITHIN_GRID: [f64; 4] = [0.0, 0.25, 0.5, 0.75];

/// ln of the mean of exp(x) over `xs`, without overflow.
pub(crate) fn log_mean_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + (xs.iter().map(|x| (x - m).exp()).sum::<f64>() / xs.len() as f64).ln()
}

/// What one interval brought for one metric.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub canary_requests: u64,
    pub canary_bad: u64,
    pub stable_requests: u64,
    pub stable_bad: u64,
}

/// How far a rate may exceed the stable's and still pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// The canary may have up to this many times the stable's rate...
    pub margin: f64,
    /// ...or the stable's rate plus this, whichever is larger.
    pub slack: f64,
}

/// Both tests of one metric, and the totals they saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Judge {
    worse: [f64; WORSE_GRID.len()],
    within: [f64; WITHIN_GRID.len()],
    pub totals: Counts,
}

impl Default for Judge {
    fn default() -> Self {
        Judge {
            worse: [0.0; WORSE_GRID.len()],
            within: [0.0; WITHIN_GRID.len()],
            totals: Counts::default(),
        }
    }
}

/// Where a metric stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Worse,
    Within,
    Undecided,
}

impl Judge {
    /// The stable's bad-event rate so far (before this interval is added): what the
    /// tolerance is fixed from.
    fn stable_rate(&self) -> Option<f64> {
        (self.totals.stable_requests > 0)
            .then(|| self.totals.stable_bad as f64 / self.totals.stable_requests as f64)
    }

    pub fn tolerance(&self, t: Tolerance) -> Option<f64> {
        self.stable_rate()
            .map(|r| (r * t.margin).max(r + t.slack).min(1.0))
    }

    /// Adds an interval.
    pub fn observe(&mut self, c: Counts, t: Tolerance) {
        // The "within" test's tolerance comes from the stable's counts before this
        // interval: fixed before the canary's outcomes in it are seen.
        let tolerance = self.tolerance(t);
        let (nc, kc, ns, ks) = (
            c.canary_requests,
            c.canary_bad.min(c.canary_requests),
            c.stable_requests,
            c.stable_bad.min(c.stable_requests),
        );
        if nc > 0 && ns > 0 && kc + ks > 0 {
            let p = nc as f64 / (nc + ns) as f64;
            for (l, theta) in self.worse.iter_mut().zip(WORSE_GRID) {
                let pi = theta * p / (theta * p + 1.0 - p);
                *l += kc as f64 * (pi / p).ln() + ks as f64 * ((1.0 - pi) / (1.0 - p)).ln();
            }
        }
        if let Some(tol) = tolerance
            && tol > 0.0
            && tol < 1.0
            && nc > 0
        {
            for (l, rho) in self.within.iter_mut().zip(WITHIN_GRID) {
                let bad = if kc == 0 {
                    0.0
                } else if rho == 0.0 {
                    f64::NEG_INFINITY
                } else {
                    kc as f64 * rho.ln()
                };
                *l += bad + (nc - kc) as f64 * ((1.0 - rho * tol) / (1.0 - tol)).ln();
            }
        }
        self.totals.canary_requests += nc;
        self.totals.canary_bad += kc;
        self.totals.stable_requests += ns;
        self.totals.stable_bad += ks;
    }

    /// The mixture's components (log-likelihood ratios), to store and resume.
    pub fn components(&self) -> (Vec<f64>, Vec<f64>) {
        (self.worse.to_vec(), self.within.to_vec())
    }

    /// Resumes stored components (ignored unless they have the mixtures' sizes).
    pub fn restore(&mut self, worse: &[f64], within: &[f64], totals: Counts) {
        if worse.len() == self.worse.len() && within.len() == self.within.len() {
            self.worse.copy_from_slice(worse);
            self.within.copy_from_slice(within);
            self.totals = totals;
        }
    }

    /// ln of the "worse" statistic.
    pub fn worse(&self) -> f64 {
        log_mean_exp(&self.worse)
    }

    /// ln of the "within tolerance" statistic.
    pub fn within(&self) -> f64 {
        log_mean_exp(&self.within)
    }

    /// The verdict at threshold ln(1/level).
    pub fn verdict(&self, log_threshold: f64) -> Verdict {
        if self.worse() >= log_threshold {
            Verdict::Worse
        } else if self.within() >= log_threshold {
            Verdict::Within
        } else {
            Verdict::Undecided
        }
    }

    /// Seconds until one test would reach the threshold if traffic and rates stay as
    /// they have been (`per_second`: canary requests a second, stable requests a second);
    /// None when neither is moving toward it.
    pub fn eta_seconds(
        &self,
        log_threshold: f64,
        per_second: (f64, f64),
        t: Tolerance,
    ) -> Option<f64> {
        let c = &self.totals;
        if c.canary_requests == 0 || c.stable_requests == 0 {
            return None;
        }
        let rc = c.canary_bad as f64 / c.canary_requests as f64;
        let rs = c.stable_bad as f64 / c.stable_requests as f64;
        let (nc, ns) = per_second;
        let mut best: Option<f64> = None;
        let mut consider = |gain_per_second: f64, now: f64| {
            if gain_per_second > 1e-12 {
                let s = ((log_threshold - now) / gain_per_second).max(0.0);
                best = Some(best.map_or(s, |b: f64| b.min(s)));
            }
        };
        // "Worse": the expected log-likelihood gain per second at the best grid point.
        let events = nc * rc + ns * rs;
        if events > 0.0 {
            let p = nc / (nc + ns);
            let q = nc * rc / events;
            let gain = WORSE_GRID
                .iter()
                .map(|theta| {
                    let pi = theta * p / (theta * p + 1.0 - p);
                    events * (q * (pi / p).ln() + (1.0 - q) * ((1.0 - pi) / (1.0 - p)).ln())
                })
                .fold(f64::NEG_INFINITY, f64::max);
            consider(gain, self.worse());
        }
        if let Some(tol) = self.tolerance(t)
            && tol > 0.0
            && tol < 1.0
        {
            let gain = WITHIN_GRID
                .iter()
                .filter(|rho| **rho > 0.0 || rc == 0.0)
                .map(|rho| {
                    let bad = if rc > 0.0 { rc * rho.ln() } else { 0.0 };
                    nc * (bad + (1.0 - rc) * ((1.0 - rho * tol) / (1.0 - tol)).ln())
                })
                .fold(f64::NEG_INFINITY, f64::max);
            consider(gain, self.within());
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERRORS: Tolerance = Tolerance {
        margin: 2.0,
        slack: 0.01,
    };

    /// Binomial draws without a statistics crate: n Bernoulli(p) trials.
    fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| rng.f64() < p).count() as u64
    }

    /// One simulated rollout: `seconds` one-second intervals at `rps` requests a second,
    /// `weight` of them to the canary; the first verdict and when.
    fn run(
        rng: &mut fastrand::Rng,
        seconds: u32,
        rps: f64,
        weight: f64,
        stable_rate: f64,
        canary_rate: f64,
        level: f64,
    ) -> (Verdict, u32) {
        let mut j = Judge::default();
        let threshold = (1.0 / level).ln();
        for s in 1..=seconds {
            let n = binomial(rng, (rps * 2.0) as u64, 0.5);
            let nc = binomial(rng, n, weight);
            let ns = n - nc;
            j.observe(
                Counts {
                    canary_requests: nc,
                    canary_bad: binomial(rng, nc, canary_rate),
                    stable_requests: ns,
                    stable_bad: binomial(rng, ns, stable_rate),
                },
                ERRORS,
            );
            match j.verdict(threshold) {
                Verdict::Undecided => {}
                v => return (v, s),
            }
        }
        (Verdict::Undecided, seconds)
    }

    #[test]
    fn a_faulty_canary_is_found_within_a_minute_and_a_healthy_one_passes() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut times = Vec::new();
        for _ in 0..200 {
            let (v, s) = run(&mut rng, 600, 100.0, 0.1, 0.01, 0.05, 0.001);
            assert_eq!(v, Verdict::Worse);
            times.push(s);
        }
        times.sort_unstable();
        let p95 = times[times.len() * 95 / 100];
        assert!(p95 < 60, "p95 {p95} s");
        for _ in 0..50 {
            let (v, _) = run(&mut rng, 3600, 100.0, 0.1, 0.01, 0.01, 0.001);
            assert_eq!(v, Verdict::Within);
        }
    }

    #[test]
    fn too_little_traffic_decides_nothing() {
        let mut rng = fastrand::Rng::with_seed(11);
        // One request a minute, for ten minutes.
        let mut j = Judge::default();
        for _ in 0..10 {
            j.observe(
                Counts {
                    canary_requests: 0,
                    canary_bad: 0,
                    stable_requests: 1,
                    stable_bad: binomial(&mut rng, 1, 0.01),
                },
                ERRORS,
            );
        }
        assert_eq!(j.verdict((1000f64).ln()), Verdict::Undecided);
        // At the current rate a decision is far off, and is said so.
        let eta = j.eta_seconds((1000f64).ln(), (0.01, 0.1), ERRORS);
        assert!(eta.is_none_or(|s| s > 600.0), "{eta:?}");
    }

    /// 1,000 healthy rollouts (the canary exactly as good as the stable) at the default
    /// level: the share wrongly found worse is at most the level, with room for chance.
    #[test]
    fn healthy_rollouts_are_rarely_failed() {
        let mut rng = fastrand::Rng::with_seed(2026);
        let level = 0.001;
        let mut failed = 0;
        for i in 0..1000 {
            // Traffic from a trickle to busy; error rates from none to high.
            let rps = [2.0, 20.0, 100.0][i % 3];
            let rate = [0.0, 0.01, 0.05, 0.2][i % 4];
            let (v, _) = run(&mut rng, 300, rps, 0.1, rate, rate, level);
            if v == Verdict::Worse {
                failed += 1;
            }
        }
        // At most the stated rate: 1 in 1,000.
        assert!(failed <= 1, "{failed} of 1000 healthy rollouts failed");
    }
}
