//! The lease protocol of a cluster-wide quota (docs/architecture.md, decision 6), as pure
//! state: the owner's [`Ledger`] and a node's [`Lease`]. No clock, no I/O: callers pass the
//! time (ms) in, which makes the protocol testable on its own (see the simulations in the
//! tests).
//!
//! - A node admits a request when it holds a token, with no call on the request path. Every
//!   tick it sends the owner a [`Report`] (what it admitted, holds and wants) and gets a
//!   [`Grant`] back.
//! - **Window counters** (hour, day, month; or when asked): each window allows `limit`
//!   requests across the cluster. The owner accounts, per node, what the node last said it
//!   used and holds plus what it granted since; it never grants past the limit. A new owner
//!   (after a member left) learns the window's usage from the first reports, so a move costs
//!   at most one tick of blind grants.
//! - **GCRA** (second windows, or when asked): the owner is a generic-cell-rate bucket that
//!   releases a token every `window / limit` and holds at most `burst`; so any stretch of one
//!   window's length admits at most `limit + burst`, and a steady overload exactly `limit`.
//!   Tokens it grants are good for [`LEASE_TTL_MS`] and come back when they expire unspent.
//! - **Demand-sized shares**: a node asks for two ticks of its recent demand (plus one
//!   token while it has any demand); when the owner cannot cover every recent ask it grants
//!   each in proportion to what it asked.
//! - **Without a lease**: a key's first requests on a node are admitted on a small credit
//!   (a tick's share of the limit) until the owner first answers; while the owner cannot be
//!   reached, the quota's fail mode decides: `open` admits up to the node's share of the
//!   limit (limit / members) per window, `closed` only what the lease covers. Either way the
//!   node reports what it admitted without a token and the owner debits it.

use std::collections::{BTreeMap, HashMap, HashSet};

/// How often nodes exchange with owners.
pub const TICK_MS: u64 = 25;
/// How long GCRA tokens stay good once granted.
pub const LEASE_TTL_MS: u64 = 250;
/// An ask older than this no longer counts towards the shares.
const ASK_STALE_MS: u64 = 3 * TICK_MS;
/// Ticks without a request after which a node gives its tokens back.
const QUIET_TICKS: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Window,
    Gcra,
}

/// How time is cut into windows: fixed lengths aligned to the epoch (so days start at
/// 00:00 UTC), or calendar months (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Fixed(u64),
    Month,
}

impl Span {
    /// The window holding `now_ms`: (index, start, end).
    pub fn window(self, now_ms: u64) -> (u64, u64, u64) {
        match self {
            Span::Fixed(len) => {
                let len = len.max(1);
                let i = now_ms / len;
                (i, i * len, (i + 1) * len)
            }
            Span::Month => {
                use chrono::{Datelike, TimeZone, Utc};
                let t = Utc
                    .timestamp_millis_opt(now_ms as i64)
                    .single()
                    .unwrap_or_default();
                let (y, m) = (t.year(), t.month());
                let start = |y: i32, m: u32| {
                    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                        .single()
                        .map(|d| d.timestamp_millis() as u64)
                        .unwrap_or(0)
                };
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let index = (y as u64) * 12 + u64::from(m - 1);
                (index, start(y, m), start(ny, nm))
            }
        }
    }

    /// The nominal length (a month counts 30 days), for rates and retry hints.
    pub fn nominal_ms(self) -> u64 {
        match self {
            Span::Fixed(len) => len.max(1),
            Span::Month => 30 * 86_400_000,
        }
    }
}

/// What a node tells a key's owner each tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Window counters: the window (index) this report is about, and when it ends.
    pub window: u64,
    pub window_end_ms: u64,
    /// Admitted in `window` (GCRA: over the last window's length).
    pub used: u64,
    /// Tokens held, unspent.
    pub held: u64,
    /// GCRA: tokens that expired unspent, given back.
    pub returned: u64,
    /// Admitted without a token since the last answered report.
    pub unleased: u64,
    pub want: u64,
    /// The limit as the sender has it, and (budgets) the Raft log index it was computed
    /// at: a window ledger takes the limit of the most advanced sender (0: its own).
    pub limit: u64,
    pub applied_index: u64,
}

/// The owner's answer to one report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    pub window: u64,
    pub tokens: u64,
    /// GCRA: when the tokens stop being good (window counters: the window's end).
    pub valid_until_ms: u64,
    /// What the owner has left to grant.
    pub remaining: u64,
    /// The window is overdrawn: what is held for it must not be spent.
    pub revoke: bool,
}

/// The recent asks of every node, for demand-sized shares.
#[derive(Debug, Clone, Default)]
struct Asks(HashMap<u64, (u64, u64)>);

impl Asks {
    /// Records `node`'s ask and returns its share of `budget`: all of it when the recent
    /// asks fit, else in proportion (rounded, never past the budget).
    fn share(&mut self, now_ms: u64, node: u64, want: u64, budget: u64) -> u64 {
        self.0.insert(node, (want, now_ms));
        self.0
            .retain(|_, (_, at)| at.saturating_add(ASK_STALE_MS) >= now_ms);
        let total: u64 = self.0.values().map(|(w, _)| *w).sum();
        if total <= budget {
            return want;
        }
        let exact =
            (u128::from(budget) * u128::from(want) + u128::from(total) / 2) / u128::from(total);
        (exact as u64).min(budget)
    }
}

/// The owner's ledger for one quota key.
#[derive(Debug, Clone)]
pub enum Ledger {
    Window(WindowLedger),
    Gcra(GcraLedger),
}

impl Ledger {
    /// `burst`: GCRA only, the most tokens the bucket holds (at least 1).
    pub fn new(
        algorithm: Algorithm,
        limit: u64,
        burst: u64,
        window_ms: u64,
        now_ms: u64,
    ) -> Ledger {
        match algorithm {
            Algorithm::Window => Ledger::Window(WindowLedger {
                limit,
                books: BTreeMap::new(),
            }),
            Algorithm::Gcra => {
                let interval_us = (window_ms.max(1) * 1000 / limit.max(1)).max(1);
                Ledger::Gcra(GcraLedger {
                    burst: burst.clamp(1, limit.max(1)),
                    interval_us,
                    tat_us: now_ms * 1000,
                    seen: HashSet::new(),
                    asks: Asks::default(),
                    held: HashMap::new(),
                })
            }
        }
    }

    /// Takes `node`'s report and answers it with a grant.
    pub fn exchange(&mut self, now_ms: u64, node: u64, r: &Report) -> Grant {
        match self {
            Ledger::Window(l) => l.exchange(now_ms, node, r),
            Ledger::Gcra(l) => l.exchange(now_ms, node, r),
        }
    }

    /// Tokens granted and, as far as the owner knows, not yet spent: what nodes could
    /// still admit if this owner vanished (the over-admission bound of this key).
    pub fn outstanding(&self, now_ms: u64) -> u64 {
        match self {
            Ledger::Window(l) => l
                .books
                .values()
                .filter(|b| b.end_ms > now_ms)
                .flat_map(|b| b.nodes.values())
                .map(|n| n.held + n.granted)
                .sum(),
            Ledger::Gcra(l) => l
                .held
                .values()
                .filter(|(_, until)| *until > now_ms)
                .map(|(n, _)| n)
                .sum(),
        }
    }

    /// Whether the ledger holds nothing worth keeping (its windows are over; the bucket is
    /// full again).
    pub fn expired(&self, now_ms: u64) -> bool {
        match self {
            Ledger::Window(l) => l.books.values().all(|b| b.end_ms <= now_ms),
            Ledger::Gcra(l) => l.tat_us <= now_ms * 1000 && l.outstanding_until(now_ms) == 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WindowLedger {
    limit: u64,
    books: BTreeMap<u64, Book>,
}

#[derive(Debug, Clone, Default)]
struct Book {
    end_ms: u64,
    nodes: HashMap<u64, NodeBook>,
    asks: Asks,
    /// Budgets: the limit reported at the highest applied log index, and that index.
    limit_at: Option<(u64, u64)>,
}

/// One node in a window, as the owner last heard: used and held by its report, plus what
/// was granted in answer to it.
#[derive(Debug, Clone, Copy, Default)]
struct NodeBook {
    used: u64,
    held: u64,
    granted: u64,
}

impl WindowLedger {
    fn exchange(&mut self, now_ms: u64, node: u64, r: &Report) -> Grant {
        self.books.retain(|_, b| b.end_ms > now_ms);
        let refused = Grant {
            window: r.window,
            ..Grant::default()
        };
        // A window that is over, or a report far ahead of this owner's clock.
        if r.window_end_ms <= now_ms || self.books.range(r.window + 2..).next().is_some() {
            return refused;
        }
        let book = self.books.entry(r.window).or_insert_with(|| Book {
            end_ms: r.window_end_ms,
            ..Book::default()
        });
        book.nodes.insert(
            node,
            NodeBook {
                used: r.used,
                held: r.held,
                granted: 0,
            },
        );
        if r.applied_index > 0 && book.limit_at.is_none_or(|(i, _)| r.applied_index >= i) {
            book.limit_at = Some((r.applied_index, r.limit));
        }
        let limit = book.limit_at.map_or(self.limit, |(_, l)| l);
        let accounted: u64 = book
            .nodes
            .values()
            .map(|n| n.used + n.held + n.granted)
            .sum();
        let remaining = limit.saturating_sub(accounted);
        let tokens = book.asks.share(now_ms, node, r.want, remaining);
        book.nodes.get_mut(&node).expect("inserted above").granted = tokens;
        // Spent (not merely held) past the limit: nothing held may be spent any more.
        let spent: u64 = book.nodes.values().map(|n| n.used).sum();
        Grant {
            window: r.window,
            tokens,
            valid_until_ms: book.end_ms,
            remaining: remaining - tokens,
            revoke: spent > limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GcraLedger {
    burst: u64,
    /// One token per `interval_us`.
    interval_us: u64,
    /// The theoretical arrival time: the bucket is full when it is not after now.
    tat_us: u64,
    /// Nodes whose first report this owner has taken (it carries their recent usage).
    seen: HashSet<u64>,
    asks: Asks,
    /// Per node: tokens held plus granted, and until when they are good.
    held: HashMap<u64, (u64, u64)>,
}

impl GcraLedger {
    fn outstanding_until(&self, now_ms: u64) -> u64 {
        self.held
            .values()
            .filter(|(_, until)| *until > now_ms)
            .map(|(n, _)| n)
            .sum()
    }

    fn exchange(&mut self, now_ms: u64, node: u64, r: &Report) -> Grant {
        let now = now_ms * 1000;
        let t = self.interval_us;
        let capacity = self.burst * t;
        // A node's first report says what it admitted lately: a new owner starts its
        // bucket there, not full. Afterwards only what it admitted without a token counts.
        let spent = if self.seen.insert(node) {
            r.used.max(r.unleased)
        } else {
            r.unleased
        };
        self.tat_us = self.tat_us.max(now) + spent * t;
        if r.returned > 0 && self.tat_us > now {
            self.tat_us = self.tat_us.saturating_sub(r.returned * t).max(now);
        }
        self.tat_us = self.tat_us.min(now + capacity);
        let available = (now + capacity - self.tat_us.max(now)) / t;
        let tokens = self.asks.share(now_ms, node, r.want, available);
        self.tat_us = self.tat_us.max(now) + tokens * t;
        let until = now_ms + LEASE_TTL_MS;
        self.held.insert(node, (r.held + tokens, until));
        self.held.retain(|_, (_, u)| *u > now_ms);
        Grant {
            window: 0,
            tokens,
            valid_until_ms: until,
            remaining: available - tokens,
            revoke: false,
        }
    }
}

/// Where a node stands with a key's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The owner has not answered yet: the first requests spend a small credit.
    New,
    /// The owner answers.
    Leased,
    /// The owner cannot be reached: the fail mode decides.
    Cutoff,
}

/// What the data plane does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Refused: the quota is spent (or cannot be confirmed, for a fail-closed quota).
    No,
    /// No token here, but the owner had budget left: wait for the next exchange.
    Wait,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    window: u64,
    /// The tokens cannot be spent from this time on.
    until_ms: u64,
    tokens: u64,
}

/// A node's lease on one quota key.
#[derive(Debug, Clone)]
pub struct Lease {
    pub algorithm: Algorithm,
    pub limit: u64,
    pub span: Span,
    pub fail_open: bool,
    pub standing: Standing,
    /// This node's share of the limit per window while the owner is unreachable.
    pub share: u64,
    /// Requests a new key may admit before the owner first answers.
    credit: u64,
    held: Vec<Held>,
    /// The window `used` counts in, and the previous window's count.
    window: u64,
    used: u64,
    prev_used: u64,
    /// Requests seen (admitted or not) since the last tick; demand per tick, smoothed.
    seen: u64,
    rate: f64,
    quiet: u32,
    returned: u64,
    unleased: u64,
    /// The owner's budget left, as of its last answer.
    remaining: u64,
    /// `roll` has nothing to do before this time (ms).
    checked_until: u64,
}

impl Lease {
    /// A lease for a cluster of `members` nodes (for the credit and the fallback share).
    pub fn new(
        algorithm: Algorithm,
        limit: u64,
        span: Span,
        fail_open: bool,
        members: u64,
    ) -> Lease {
        let members = members.max(1);
        // A tick's worth of the limit, spread over the members: at least one request.
        let per_tick = u128::from(limit) * u128::from(TICK_MS)
            / u128::from(span.nominal_ms())
            / u128::from(members);
        Lease {
            algorithm,
            limit,
            span,
            fail_open,
            standing: Standing::New,
            share: limit.div_ceil(members),
            credit: (per_tick as u64).max(1),
            held: Vec::new(),
            window: 0,
            used: 0,
            prev_used: 0,
            seen: 0,
            rate: 0.0,
            quiet: 0,
            returned: 0,
            unleased: 0,
            remaining: 0,
            checked_until: 0,
        }
    }

    /// Moves `used` to the window holding `now_ms`, and drops tokens that are no longer
    /// good (GCRA tokens that expired are given back).
    fn roll(&mut self, now_ms: u64) {
        if now_ms < self.checked_until {
            return;
        }
        let (w, _, end) = self.span.window(now_ms);
        if w != self.window {
            self.prev_used = if w == self.window + 1 { self.used } else { 0 };
            self.used = 0;
            self.window = w;
        }
        let gcra = self.algorithm == Algorithm::Gcra;
        let mut returned = 0;
        self.held.retain(|h| {
            let keep = h.until_ms > now_ms && h.tokens > 0;
            if !keep && gcra {
                returned += h.tokens;
            }
            keep
        });
        self.returned += returned;
        // Nothing changes before the window ends or the first token expires.
        let first_expiry = self
            .held
            .iter()
            .map(|h| h.until_ms)
            .min()
            .unwrap_or(u64::MAX);
        self.checked_until = end.min(first_expiry);
    }

    /// Whether a request at `now_ms` is admitted. On the request path: no call, no lock
    /// beyond the caller's. `may_wait` false turns [`Admit::Wait`] into [`Admit::No`].
    pub fn admit(&mut self, now_ms: u64, may_wait: bool) -> Admit {
        self.admit_n(now_ms, 1, may_wait)
    }

    /// Tokens held that can be spent now.
    fn spendable(&self) -> u64 {
        let (window, algorithm) = (self.window, self.algorithm);
        self.held
            .iter()
            .filter(|h| algorithm == Algorithm::Gcra || h.window == window)
            .map(|h| h.tokens)
            .sum()
    }

    /// Adds `n` tokens good until `until_ms` in `window` to what is held: to the entry of
    /// the same window and expiry when there is one (a window counter's tokens all expire
    /// at the window's end), so the list stays a few entries long however many requests
    /// give tokens back.
    fn hold(&mut self, window: u64, until_ms: u64, n: u64) {
        match self
            .held
            .iter_mut()
            .find(|h| h.window == window && h.until_ms == until_ms)
        {
            Some(h) => h.tokens += n,
            None => {
                self.held.push(Held {
                    window,
                    until_ms,
                    tokens: n,
                });
                self.held.sort_by_key(|h| h.until_ms);
                self.checked_until = self.checked_until.min(until_ms);
            }
        }
    }

    /// Spends `n` held tokens, soonest to expire first (the caller checked there are).
    fn spend_held(&mut self, mut n: u64) {
        let (window, algorithm) = (self.window, self.algorithm);
        for h in self
            .held
            .iter_mut()
            .filter(|h| algorithm == Algorithm::Gcra || h.window == window)
        {
            let take = h.tokens.min(n);
            h.tokens -= take;
            n -= take;
            if n == 0 {
                break;
            }
        }
    }

    /// Admits `n` units at once (an LLM request's reserved tokens or money), all or none.
    pub fn admit_n(&mut self, now_ms: u64, n: u64, may_wait: bool) -> Admit {
        self.roll(now_ms);
        self.seen += n;
        if self.spendable() >= n {
            self.spend_held(n);
            self.used += n;
            return Admit::Yes;
        }
        let unleased = match self.standing {
            Standing::New => self.unleased + n <= self.credit,
            Standing::Leased => false,
            Standing::Cutoff => self.fail_open && self.used + n <= self.share,
        };
        if unleased {
            self.used += n;
            self.unleased += n;
            return Admit::Yes;
        }
        let waiting = match self.standing {
            Standing::New => true,
            Standing::Leased => self.remaining + self.spendable() >= n,
            Standing::Cutoff => false,
        };
        if waiting && may_wait {
            Admit::Wait
        } else {
            Admit::No
        }
    }

    /// Takes as much of `n` as can be had now, without waiting: at least `min`, or
    /// nothing. For a reservation that may be smaller than its worst case.
    pub fn admit_up_to(&mut self, now_ms: u64, min: u64, n: u64) -> u64 {
        self.roll(now_ms);
        let take = n.min(self.spendable());
        if take >= min.max(1) {
            self.seen += take;
            self.spend_held(take);
            self.used += take;
            return take;
        }
        0
    }

    /// Counts `n` units spent whether or not tokens cover them (tokens a provider already
    /// sent): from what is held first, the rest reported to the owner as spent unleased.
    pub fn force(&mut self, now_ms: u64, n: u64) {
        self.roll(now_ms);
        self.seen += n;
        let covered = n.min(self.spendable());
        self.spend_held(covered);
        self.used += n;
        self.unleased += n - covered;
    }

    /// Gives back `n` units a request reserved in `window` and did not spend: they are
    /// held again (for a window counter; GCRA tokens go back to the owner). A window that
    /// has ended gets nothing back.
    pub fn give_back(&mut self, now_ms: u64, window: u64, n: u64) {
        self.roll(now_ms);
        if n == 0 || (self.algorithm == Algorithm::Window && window != self.window) {
            return;
        }
        self.used = self.used.saturating_sub(n);
        match self.algorithm {
            Algorithm::Gcra => self.returned += n,
            Algorithm::Window => self.hold(window, self.span.window(now_ms).2, n),
        }
    }

    /// Budgets: `n` units of this window's spend are now in the committed spend the
    /// limit is computed from, so they no longer count as used here.
    pub fn settled(&mut self, n: u64) {
        self.used = self.used.saturating_sub(n);
    }

    /// What this node could still admit without waiting, plus what the owner said it has
    /// left: the lease's view of the headroom.
    pub fn headroom(&mut self, now_ms: u64) -> u64 {
        self.roll(now_ms);
        self.spendable() + self.remaining
    }

    /// The window (index) the lease counts in now.
    pub fn window_now(&mut self, now_ms: u64) -> u64 {
        self.roll(now_ms);
        self.window
    }

    /// Whether the owner said it has nothing left to grant and nothing is held here: a
    /// stream debiting this budget must end.
    pub fn exhausted(&mut self, now_ms: u64) -> bool {
        self.roll(now_ms);
        self.spendable() == 0
            && match self.standing {
                Standing::Leased => self.remaining == 0,
                Standing::Cutoff => !self.fail_open || self.used >= self.share,
                Standing::New => self.unleased >= self.credit,
            }
    }

    /// Once per tick: what to tell the owner. Two ticks of recent demand (and one token
    /// while there is any demand) less what is held; for a window counter also the next
    /// window when it starts within two ticks. The reports take the tokens returned and
    /// the requests admitted without a token: [`Lease::unanswered`] puts them back.
    pub fn reports(&mut self, now_ms: u64) -> Vec<Report> {
        self.roll(now_ms);
        let seen = std::mem::take(&mut self.seen);
        self.quiet = if seen == 0 { self.quiet + 1 } else { 0 };
        self.rate = if self.rate == 0.0 {
            seen as f64
        } else {
            0.5 * self.rate + 0.5 * seen as f64
        };
        let want = if self.quiet >= QUIET_TICKS && self.standing != Standing::Cutoff {
            // Idle: give the tokens back so busier nodes can have them (kept while cut off:
            // nobody could take them, and a fail-closed key still spends them).
            if self.algorithm == Algorithm::Gcra {
                self.returned += self.held();
            }
            self.held.clear();
            self.rate = 0.0;
            0
        } else {
            // Two ticks of demand; four while the owner has more than ten times four ticks
            // left, so a busy key far from its limit does not run dry between exchanges.
            let two = (self.rate * 2.0).ceil() as u64 + 1;
            if self.remaining > 20 * two {
                2 * two
            } else {
                two
            }
        };
        let held_in = |held: &[Held], w: u64| -> u64 {
            held.iter()
                .filter(|h| h.window == w)
                .map(|h| h.tokens)
                .sum()
        };
        let (window, start, end) = self.span.window(now_ms);
        let returned = std::mem::take(&mut self.returned);
        let unleased = std::mem::take(&mut self.unleased);
        match self.algorithm {
            Algorithm::Gcra => {
                let held = self.held();
                // Usage over the last window's length, estimated from the current and
                // previous windows (a sliding-window approximation).
                let len = self.span.nominal_ms() as f64;
                let into = (now_ms - start) as f64 / len;
                let recent = self.used + (self.prev_used as f64 * (1.0 - into)) as u64;
                vec![Report {
                    window: 0,
                    window_end_ms: 0,
                    used: recent,
                    held,
                    returned,
                    unleased,
                    want: want.saturating_sub(held),
                    limit: self.limit,
                    applied_index: 0,
                }]
            }
            Algorithm::Window => {
                let held = held_in(&self.held, window);
                let mut out = vec![Report {
                    window,
                    window_end_ms: end,
                    used: self.used,
                    held,
                    returned,
                    unleased,
                    want: want.saturating_sub(held),
                    limit: self.limit,
                    applied_index: 0,
                }];
                if end.saturating_sub(now_ms) <= 2 * TICK_MS && want > 0 {
                    let (next, _, next_end) = self.span.window(end);
                    let held = held_in(&self.held, next);
                    out.push(Report {
                        window: next,
                        window_end_ms: next_end,
                        used: 0,
                        held,
                        returned: 0,
                        unleased: 0,
                        want: want.saturating_sub(held),
                        limit: self.limit,
                        applied_index: 0,
                    });
                }
                out
            }
        }
    }

    /// The owner could not be reached: its reports are kept for the next one, and the
    /// fail mode decides until an owner answers (`members` sizes the share).
    pub fn unanswered(&mut self, reports: &[Report], members: u64) {
        for r in reports {
            self.returned += r.returned;
            self.unleased += r.unleased;
        }
        self.cut_off(members);
    }

    /// No owner can be reached for this key (this node is cut off from a majority).
    pub fn cut_off(&mut self, members: u64) {
        self.standing = Standing::Cutoff;
        self.share = self.limit.div_ceil(members.max(1));
    }

    /// Takes the owner's answer.
    pub fn granted(&mut self, grant: Grant) {
        self.checked_until = 0;
        self.standing = Standing::Leased;
        self.remaining = grant.remaining;
        if grant.revoke {
            self.held.retain(|h| h.window != grant.window);
        }
        if grant.tokens > 0 {
            self.hold(grant.window, grant.valid_until_ms, grant.tokens);
        }
    }

    /// Tokens held now (for the metrics).
    pub fn held(&self) -> u64 {
        self.held.iter().map(|h| h.tokens).sum()
    }

    /// Admitted in the current window.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// What this node could still admit that no owner has counted: its unspent fallback
    /// share while cut off (fail open), or its unspent credit while new.
    pub fn unaccounted_allowance(&self) -> u64 {
        match self.standing {
            Standing::New => self.credit.saturating_sub(self.unleased),
            Standing::Leased => 0,
            Standing::Cutoff if self.fail_open => self.share.saturating_sub(self.used),
            Standing::Cutoff => 0,
        }
    }

    /// Whether the lease can be dropped: idle, holding nothing, and (window counters)
    /// nothing admitted in a window that is still running.
    pub fn idle(&self) -> bool {
        self.quiet >= QUIET_TICKS
            && self.held.is_empty()
            && self.returned == 0
            && self.unleased == 0
            && self.used == 0
            && (self.algorithm == Algorithm::Window || self.prev_used == 0)
    }
}

#[cfg(test)]
mod tests;
