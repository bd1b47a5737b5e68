//! The lease protocol of a window-counter quota (DESIGN.md decision 6), as pure state: the
//! owner's ledger ([`Ledger`]) and a node's lease ([`Lease`]). No clock, no I/O: callers
//! pass the time (ms) in, which makes the protocol testable on its own (see the
//! simulation in the tests) before it is wired to actors and gRPC.
//!
//! - Time is cut into windows of `window_ms`; each window allows `limit` requests across
//!   the cluster.
//! - The owner never grants more than the window's limit in total: tokens granted and not
//!   yet used are the only over-admission a partition can cause (they are spent where they
//!   are), and that sum is what the owner exports as the bound.
//! - A node asks every `tick` for enough tokens to cover its recent demand for two ticks;
//!   a request is admitted when the node holds a token, with no call on the request path.
//!   Near the end of a window it also asks for the next window, so a new window does not
//!   start empty.
//! - When the remaining budget cannot cover every node's ask, the owner grants in
//!   proportion to what each asked (demand-sized shares).

use std::collections::{BTreeMap, HashMap};

/// The owner's ledger for one quota key.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub limit: u64,
    pub window_ms: u64,
    /// Tokens granted per window (only the current and the next are kept).
    granted: BTreeMap<u64, u64>,
    /// Per window, what each node asked for in the current round of asks.
    asks: BTreeMap<u64, HashMap<u64, u64>>,
}

/// A grant: `tokens` for window `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub window: u64,
    pub tokens: u64,
}

impl Ledger {
    pub fn new(limit: u64, window_ms: u64) -> Ledger {
        Ledger {
            limit,
            window_ms: window_ms.max(1),
            granted: BTreeMap::new(),
            asks: BTreeMap::new(),
        }
    }

    pub fn window_of(&self, now_ms: u64) -> u64 {
        now_ms / self.window_ms
    }

    /// Tokens not yet granted in `window`.
    pub fn remaining(&self, window: u64) -> u64 {
        self.limit
            .saturating_sub(self.granted.get(&window).copied().unwrap_or(0))
    }

    /// Records `node`'s ask for `want` tokens of `window` (a past window gets nothing).
    /// Asks are granted together by [`Ledger::grant_round`], so that a short budget is
    /// shared by demand, not by who asked first.
    pub fn ask(&mut self, now_ms: u64, node: u64, window: u64, want: u64) {
        let current = self.window_of(now_ms);
        if window < current || window > current + 1 || want == 0 {
            return;
        }
        *self
            .asks
            .entry(window)
            .or_default()
            .entry(node)
            .or_default() += want;
    }

    /// Grants the asks gathered since the last round: in full while the window's budget
    /// lasts, else in proportion to each ask (largest remainders get the odd tokens).
    pub fn grant_round(&mut self, now_ms: u64) -> Vec<(u64, Grant)> {
        let current = self.window_of(now_ms);
        self.granted.retain(|w, _| *w >= current);
        let asks = std::mem::take(&mut self.asks);
        let mut out = Vec::new();
        for (window, by_node) in asks {
            if window < current {
                continue;
            }
            let remaining = self.remaining(window);
            let total: u64 = by_node.values().sum();
            let mut nodes: Vec<(u64, u64)> = by_node.into_iter().collect();
            nodes.sort();
            let shares: Vec<(u64, u64)> = if total <= remaining {
                nodes
            } else {
                proportional(&nodes, total, remaining)
            };
            for (node, tokens) in shares {
                if tokens > 0 {
                    *self.granted.entry(window).or_default() += tokens;
                    out.push((node, Grant { window, tokens }));
                }
            }
        }
        out
    }
}

/// Splits `budget` across `asks` in proportion (largest remainder method).
fn proportional(asks: &[(u64, u64)], total: u64, budget: u64) -> Vec<(u64, u64)> {
    let mut shares: Vec<(u64, u64, u64)> = asks
        .iter()
        .map(|(node, ask)| {
            let exact = u128::from(*ask) * u128::from(budget);
            let share = (exact / u128::from(total)) as u64;
            let rem = (exact % u128::from(total)) as u64;
            (*node, share, rem)
        })
        .collect();
    let mut left = budget - shares.iter().map(|s| s.1).sum::<u64>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(shares[i].2), shares[i].0));
    for i in order {
        if left == 0 {
            break;
        }
        shares[i].1 += 1;
        left -= 1;
    }
    shares.into_iter().map(|(n, s, _)| (n, s)).collect()
}

/// A node's lease on one quota key.
#[derive(Debug, Clone)]
pub struct Lease {
    pub window_ms: u64,
    /// Tokens held, by window (the current one and, near its end, the next).
    tokens: BTreeMap<u64, u64>,
    /// Requests seen (admitted or not) since the last tick: the demand estimate.
    seen: u64,
    /// Demand per tick, smoothed.
    rate: f64,
}

impl Lease {
    pub fn new(window_ms: u64) -> Lease {
        Lease {
            window_ms: window_ms.max(1),
            tokens: BTreeMap::new(),
            seen: 0,
            rate: 0.0,
        }
    }

    /// Whether a request at `now_ms` is admitted (it spends a token). On the request path:
    /// no call, no lock beyond the caller's.
    pub fn admit(&mut self, now_ms: u64) -> bool {
        self.seen += 1;
        let window = now_ms / self.window_ms;
        self.tokens.retain(|w, _| *w >= window);
        match self.tokens.get_mut(&window) {
            Some(t) if *t > 0 => {
                *t -= 1;
                true
            }
            _ => false,
        }
    }

    /// Once per tick: what to ask the owner for, as (window, tokens) pairs: two ticks of
    /// recent demand less what is held, and the same for the next window when it starts
    /// within two ticks.
    pub fn asks(&mut self, now_ms: u64, tick_ms: u64) -> Vec<(u64, u64)> {
        let seen = std::mem::take(&mut self.seen) as f64;
        self.rate = if self.rate == 0.0 {
            seen
        } else {
            0.5 * self.rate + 0.5 * seen
        };
        let want = (self.rate * 2.0).ceil() as u64;
        let window = now_ms / self.window_ms;
        let mut out = Vec::new();
        let held = self.tokens.get(&window).copied().unwrap_or(0);
        if want > held {
            out.push((window, want - held));
        }
        let next_start = (window + 1) * self.window_ms;
        if next_start.saturating_sub(now_ms) <= 2 * tick_ms {
            let held = self.tokens.get(&(window + 1)).copied().unwrap_or(0);
            if want > held {
                out.push((window + 1, want - held));
            }
        }
        out
    }

    /// Adds a grant from the owner.
    pub fn add(&mut self, grant: Grant) {
        *self.tokens.entry(grant.window).or_default() += grant.tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 nodes offered `rates` requests/s each (evenly spaced), a limit of `limit`/s, asks
    /// every `tick` ms; returns the requests admitted in each one-second window.
    fn simulate(rates: [u64; 3], limit: u64, tick: u64, seconds: u64) -> Vec<u64> {
        let mut ledger = Ledger::new(limit, 1000);
        let mut leases: Vec<Lease> = (0..3).map(|_| Lease::new(1000)).collect();
        let mut admitted = vec![0u64; seconds as usize];
        // Requests per node are spread over each second at their rate (in µs steps).
        let mut next_at: Vec<u64> = vec![0; 3];
        for now_us in 0..seconds * 1_000_000 {
            let now_ms = now_us / 1000;
            if now_us % (tick * 1000) == 0 {
                for (i, lease) in leases.iter_mut().enumerate() {
                    for (w, want) in lease.asks(now_ms, tick) {
                        ledger.ask(now_ms, i as u64, w, want);
                    }
                }
                for (node, grant) in ledger.grant_round(now_ms) {
                    leases[node as usize].add(grant);
                }
            }
            for i in 0..3 {
                if rates[i] > 0 && now_us >= next_at[i] {
                    next_at[i] += 1_000_000 / rates[i];
                    if leases[i].admit(now_ms) {
                        admitted[(now_ms / 1000) as usize] += 1;
                    }
                }
            }
        }
        admitted
    }

    #[test]
    fn a_70_20_10_overload_is_held_to_the_limit_in_every_window() {
        // 1,500 requests/s offered against a limit of 1,000/s.
        let admitted = simulate([1050, 300, 150], 1000, 25, 30);
        for (w, a) in admitted.iter().enumerate().skip(1) {
            let err = (*a as f64 - 1000.0).abs() / 1000.0;
            assert!(err <= 0.03, "window {w}: {a} admitted ({admitted:?})");
            assert!(*a <= 1000, "window {w}: over the limit: {a}");
        }
    }

    #[test]
    fn under_the_limit_everything_is_admitted() {
        let admitted = simulate([350, 100, 50], 1000, 25, 10);
        for (w, a) in admitted.iter().enumerate().skip(1) {
            assert!((495..=500).contains(a), "window {w}: {a}");
        }
    }

    #[test]
    fn the_owner_never_grants_more_than_the_limit_and_shares_by_demand() {
        let mut l = Ledger::new(100, 1000);
        l.ask(0, 1, 0, 300);
        l.ask(0, 2, 0, 100);
        let grants = l.grant_round(0);
        let got: HashMap<u64, u64> = grants.iter().map(|(n, g)| (*n, g.tokens)).collect();
        assert_eq!(got[&1] + got[&2], 100);
        assert_eq!((got[&1], got[&2]), (75, 25));
        assert_eq!(l.remaining(0), 0);
        l.ask(10, 1, 0, 5);
        assert!(l.grant_round(10).is_empty(), "the window's budget is spent");
        // A past window gets nothing, nor one beyond the next; each has its own budget.
        l.ask(1500, 1, 0, 5);
        l.ask(1500, 1, 3, 5);
        assert!(l.grant_round(1500).is_empty());
        l.ask(1500, 1, 1, 7);
        assert_eq!(
            l.grant_round(1500),
            vec![(
                1,
                Grant {
                    window: 1,
                    tokens: 7
                }
            )]
        );
    }
}
