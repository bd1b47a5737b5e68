//! What an LLM request holds against its tenant's budget and its token quotas
//! (docs/llm.md, "Spend and token limits"): reserved before any provider is called, taken
//! further as a stream's output arrives, and settled with the provider's final usage.
//!
//! Both go through the virtual-actor leases the request quotas use (`actor::quota`): a
//! token quota's lease counts tokens, a budget's counts nanos of the plan's currency. So a
//! node admits from what it holds, with no call on the request path, and the owner of each
//! key never grants past the limit, whichever nodes ask.

use std::sync::Arc;
use std::time::Duration;

use crate::actor::quota::Admit;
use crate::actor::quotas::{QuotaDef, Quotas};
use crate::actor::wall_ms;
use crate::proxy::respond::ProxyError;
use crate::state::billing::{LlmTokens, PriceNow, atto_to_nanos_up};
use crate::state::spec::{QuotaScope, QuotaUnit};

/// Output tokens a stream takes from its budget at a time, ahead of what it has spent.
pub const STREAM_STEP: u64 = 64;
/// Output tokens one provider event is assumed to carry at most, for the stated bound.
pub const EVENT_TOKENS: u64 = 64;
/// The longest a request waits for its node's lease to be topped up.
const WAIT: Duration = Duration::from_millis(100);

/// Who is asking, and what limits their LLM requests: built by the data plane for each
/// request to an LLM route.
#[derive(Default)]
pub struct Spending {
    pub tenant: Option<Arc<str>>,
    pub key: Option<Arc<str>>,
    /// The API, and `api@version`.
    pub api: Option<Arc<str>>,
    pub api_version: Option<String>,
    /// The caller's address, for quotas of callers without a key or tenant.
    pub ip: String,
    /// The route's quotas that count tokens or models.
    pub quotas: Vec<Arc<QuotaDef>>,
    /// The tenant's prices in force.
    pub price: Option<Arc<PriceNow>>,
    /// The hard-capped budgets the request spends from: the tenant's, and its API key's
    /// (`key:<id>`), each with its lease's definition.
    pub budgets: Vec<(Arc<str>, Arc<QuotaDef>)>,
}

#[derive(Debug)]
pub struct TokenHold {
    def: Arc<QuotaDef>,
    value: String,
    reserved: u64,
    window: u64,
}

#[derive(Debug)]
struct BudgetHold {
    def: Arc<QuotaDef>,
    /// The tenant, or `key:<id>`.
    subject: Arc<str>,
    /// Nanos taken from the lease so far.
    reserved: u64,
    window: u64,
    /// What the input and the request cost at the worst price (attos).
    fixed_atto: u128,
    /// The worst output price (nanos per 10^6 tokens).
    out_price: u64,
    /// Output tokens counted so far (a stream's).
    out_tokens: u64,
    /// This stream's part of the overshoot bound (nanos), added to the gauge.
    bound: u64,
}

/// What one request holds.
#[derive(Debug)]
pub struct Holds {
    quotas: Arc<Quotas>,
    tokens: Vec<TokenHold>,
    budgets: Vec<BudgetHold>,
    /// Of the provider limits of the deployment that answered.
    provider: Vec<TokenHold>,
}

/// The reservation: the prompt's counted tokens and the most output the answer can have.
pub struct Ask<'a> {
    pub model: &'a str,
    pub input: u64,
    pub max_output: u64,
    pub stream: bool,
    /// (model, deployment, provider model id) of every deployment that may answer.
    pub candidates: Vec<(&'a str, &'a str, &'a str)>,
}

fn budget_spent(subject: &str) -> ProxyError {
    let whose = match subject.strip_prefix("key:") {
        Some(key) => format!("API key {key}"),
        None => format!("tenant {subject}"),
    };
    ProxyError::Llm {
        status: http::StatusCode::PAYMENT_REQUIRED,
        code: "insufficient_quota",
        message: format!(
            "{whose} has spent its monthly budget (or what is left of it does not cover this request's worst case: its prompt and max_tokens); lower max_tokens, or ask the operator to raise the budget"
        ),
        param: None,
        retry_after_s: None,
    }
}

impl Holds {
    pub fn new(quotas: &Arc<Quotas>) -> Holds {
        Holds {
            quotas: quotas.clone(),
            tokens: Vec::new(),
            budgets: Vec::new(),
            provider: Vec::new(),
        }
    }

    /// The attempt at a deployment answered: its provider holds are the request's.
    pub fn keep_provider(&mut self, held: Vec<TokenHold>) {
        release(
            &self.quotas,
            std::mem::replace(&mut self.provider, held),
            false,
        );
    }

    /// Takes what the request may spend from every token quota and the budget, waiting
    /// at most two exchange rounds for a lease; refuses with 429 (a quota) or 402 (the
    /// budget) before any provider is called. What was taken is given back if a later
    /// check refuses.
    pub async fn reserve(
        quotas: &Arc<Quotas>,
        who: &Spending,
        ask: &Ask<'_>,
    ) -> Result<Holds, ProxyError> {
        let mut holds = Holds::new(quotas);
        for def in &who.quotas {
            let value = scope_value(def, who, ask.model);
            let n = match def.unit {
                QuotaUnit::Requests => 1,
                QuotaUnit::Tokens => ask.input + ask.max_output,
                QuotaUnit::InputTokens => ask.input,
                QuotaUnit::OutputTokens => ask.max_output,
            }
            .max(1);
            if n > def.limit {
                def.refused.increment(1);
                holds.release();
                return Err(too_large(def, n));
            }
            // One lock for the admission and the window it counts in.
            let take = |may_wait| {
                quotas.with_lease(def, &value, |l| {
                    let now = wall_ms();
                    (l.admit_n(now, n, may_wait), l.window_now(now))
                })
            };
            let (mut admit, mut window) = take(true);
            if admit == Admit::Wait {
                def.waited.increment(1);
                quotas.wait_rounds(2, WAIT).await;
                (admit, window) = take(false);
            }
            if admit != Admit::Yes {
                def.refused.increment(1);
                holds.release();
                return Err(ProxyError::QuotaExceeded {
                    quota: def.name.to_string(),
                    limit: def.limit,
                    window_s: def.window_s(),
                    retry_after_s: retry_after_s(def, n),
                });
            }
            def.admitted.increment(1);
            holds.tokens.push(TokenHold {
                def: def.clone(),
                value,
                reserved: n,
                window,
            });
        }
        let Some(price) = &who.price else {
            return Ok(holds);
        };
        for (subject, def) in &who.budgets {
            let (mut in_price, mut out_price) = (0u64, 0u64);
            for (model, deployment, upstream) in &ask.candidates {
                let (i, o) = price.prices.worst_token_prices(model, deployment, upstream);
                in_price = in_price.max(i);
                out_price = out_price.max(o);
            }
            let per_request = u128::from(price.prices.per_1k_requests) * 1_000_000;
            let fixed_atto = u128::from(ask.input) * u128::from(in_price) * 1_000 + per_request;
            let out_atto = |tokens: u64| u128::from(tokens) * u128::from(out_price) * 1_000;
            let worst = atto_to_nanos_up(fixed_atto + out_atto(ask.max_output));
            if worst > 0 {
                let take = |may_wait| {
                    quotas.with_lease(def, subject, |l| {
                        let now = wall_ms();
                        (l.admit_n(now, worst, may_wait), l.window_now(now))
                    })
                };
                let (mut admit, window) = take(true);
                if admit == Admit::Wait {
                    def.waited.increment(1);
                    quotas.wait_rounds(2, WAIT).await;
                    admit = take(false).0;
                }
                let reserved = match admit {
                    Admit::Yes => worst,
                    // A stream whose worst case does not fit what is left starts on its
                    // input and one step of output, takes a step more at a time as its
                    // output arrives, and ends when none is left: near the end of a
                    // budget, concurrent streams share what is left by what they use
                    // instead of the first one holding all of it.
                    _ if ask.stream => {
                        let min = atto_to_nanos_up(
                            fixed_atto + out_atto(STREAM_STEP.min(ask.max_output)),
                        );
                        quotas.with_lease(def, subject, |l| l.admit_up_to(wall_ms(), min, min))
                    }
                    _ => 0,
                };
                if reserved == 0 {
                    def.refused.increment(1);
                    holds.release();
                    return Err(budget_spent(subject));
                }
                def.admitted.increment(1);
                let bound = if ask.stream {
                    atto_to_nanos_up(out_atto(STREAM_STEP + EVENT_TOKENS))
                } else {
                    0
                };
                if bound > 0 {
                    bound_gauge(subject).increment(bound as f64);
                }
                holds.budgets.push(BudgetHold {
                    def: def.clone(),
                    subject: subject.clone(),
                    reserved,
                    window,
                    fixed_atto,
                    out_price,
                    out_tokens: 0,
                    bound,
                });
            }
        }
        Ok(holds)
    }

    /// Whether the request holds part of a budget (a stream's output is then counted).
    pub fn has_budget(&self) -> bool {
        !self.budgets.is_empty()
    }

    /// A stream's output so far grew by `tokens`: takes more of each budget when what it
    /// holds runs short. False: a budget is spent and the stream must end.
    pub fn on_output(&mut self, tokens: u64) -> bool {
        let mut fine = true;
        for b in &mut self.budgets {
            fine &= Self::take_output(&self.quotas, b, tokens);
        }
        fine
    }

    fn take_output(quotas: &Quotas, b: &mut BudgetHold, tokens: u64) -> bool {
        b.out_tokens += tokens;
        let out = |t: u64| u128::from(t) * u128::from(b.out_price) * 1_000;
        let spent = atto_to_nanos_up(b.fixed_atto + out(b.out_tokens));
        let ahead = atto_to_nanos_up(b.fixed_atto + out(b.out_tokens + STREAM_STEP / 2));
        if ahead <= b.reserved {
            return true;
        }
        let step = atto_to_nanos_up(out(STREAM_STEP)).max(1);
        let now = wall_ms();
        let (got, exhausted) = quotas.with_lease(&b.def, &b.subject, |l| {
            let got = l.admit_up_to(now, 1, step);
            if got == 0 && spent > b.reserved {
                // Tokens the provider already sent are spent, covered or not.
                l.force(now, spent - b.reserved);
                (spent - b.reserved, l.exhausted(now))
            } else {
                (got, false)
            }
        });
        b.reserved += got;
        !exhausted
    }

    /// The request is over: every quota and budget takes its final usage (what was
    /// reserved and not used is given back; what was used past it is counted). Returns
    /// each budget's subject and the nanos spent, to follow into the committed spend.
    pub fn finish(
        mut self,
        model: &str,
        deployment: &str,
        upstream: &str,
        price: Option<&PriceNow>,
        usage: &LlmTokens,
        answered: bool,
    ) -> Vec<(Arc<str>, u64)> {
        let now = wall_ms();
        let mut all = std::mem::take(&mut self.tokens);
        all.append(&mut self.provider);
        for t in all {
            let used = match t.def.unit {
                QuotaUnit::Requests => t.reserved,
                QuotaUnit::Tokens => usage.input + usage.output,
                QuotaUnit::InputTokens => usage.input,
                QuotaUnit::OutputTokens => usage.output,
            };
            self.quotas.with_lease(&t.def, &t.value, |l| {
                if used > t.reserved {
                    l.force(now, used - t.reserved);
                } else {
                    l.give_back(now, t.window, t.reserved - used);
                }
            });
        }
        let cost = match price {
            Some(p) if answered => {
                atto_to_nanos_up(p.prices.request_cost(model, deployment, upstream, usage))
            }
            _ => 0,
        };
        let mut spent = Vec::new();
        for b in std::mem::take(&mut self.budgets) {
            if b.bound > 0 {
                bound_gauge(&b.subject).decrement(b.bound as f64);
            }
            self.quotas.with_lease(&b.def, &b.subject, |l| {
                if cost > b.reserved {
                    l.force(now, cost - b.reserved);
                } else {
                    l.give_back(now, b.window, b.reserved - cost);
                }
            });
            spent.push((b.subject, cost));
        }
        spent
    }

    /// Gives back everything taken (a request refused after its reservation).
    fn release(&mut self) {
        let now = wall_ms();
        release(&self.quotas, std::mem::take(&mut self.tokens), true);
        // A provider call was made: its request counts, its tokens come back.
        release(&self.quotas, std::mem::take(&mut self.provider), false);
        for b in std::mem::take(&mut self.budgets) {
            if b.bound > 0 {
                bound_gauge(&b.subject).decrement(b.bound as f64);
            }
            self.quotas.with_lease(&b.def, &b.subject, |l| {
                l.give_back(now, b.window, b.reserved)
            });
        }
    }
}

impl Drop for Holds {
    /// A request dropped without its usage (never dispatched) gives back what it took.
    fn drop(&mut self) {
        self.release();
    }
}

/// Gives back what `held` reserved (requests too, unless a call was made with them).
pub fn release(quotas: &Quotas, held: Vec<TokenHold>, requests: bool) {
    let now = wall_ms();
    for t in held {
        if t.def.unit == QuotaUnit::Requests && !requests {
            continue;
        }
        quotas.with_lease(&t.def, &t.value, |l| l.give_back(now, t.window, t.reserved));
    }
}

/// Takes a request (and `tokens`, its worst case) from a deployment's provider limits,
/// waiting for the next exchange (two rounds at most) when this node holds too little but
/// the owner has some left. `Err`: seconds until the minute's window ends (the deployment
/// is passed over for the next two exchanges).
pub async fn provider_take(
    quotas: &Quotas,
    d: &super::Deployment,
    tokens: u64,
) -> Result<Vec<TokenHold>, u64> {
    let mut held = Vec::new();
    for (def, n) in [(&d.rpm_def, 1), (&d.tpm_def, tokens.max(1))] {
        let Some(def) = def else { continue };
        let mut admit = quotas.with_lease(def, &d.limit_key, |l| l.admit_n(wall_ms(), n, true));
        if admit == Admit::Wait {
            def.waited.increment(1);
            quotas.wait_rounds(2, WAIT).await;
            admit = quotas.with_lease(def, &d.limit_key, |l| l.admit_n(wall_ms(), n, false));
        }
        let now = wall_ms();
        if admit != Admit::Yes {
            def.refused.increment(1);
            release(quotas, held, true);
            // Passed over for two exchanges: what other requests give back, or the
            // owner grants, makes room again.
            let end = def.span.window(now).2;
            d.live.limited_until_ms.store(
                now + 2 * crate::actor::quota::TICK_MS,
                std::sync::atomic::Ordering::Relaxed,
            );
            return Err(end.saturating_sub(now).div_ceil(1000).max(1));
        }
        def.admitted.increment(1);
        let window = quotas.with_lease(def, &d.limit_key, |l| l.window_now(now));
        held.push(TokenHold {
            def: def.clone(),
            value: d.limit_key.to_string(),
            reserved: n,
            window,
        });
    }
    Ok(held)
}

/// What a provider said of its limits in an answer's headers (OpenAI's
/// `x-ratelimit-remaining-*`, Anthropic's `anthropic-ratelimit-*-remaining`): when it has
/// less left than the cluster's lease thinks, the difference is counted as spent, so the
/// whole cluster slows down to what the provider has (other users of its key included).
pub fn provider_feedback(quotas: &Quotas, d: &super::Deployment, headers: &http::HeaderMap) {
    let read = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| headers.get(*n)?.to_str().ok()?.trim().parse::<u64>().ok())
    };
    let said = [
        (
            &d.tpm_def,
            read(&[
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-input-tokens-remaining",
            ]),
        ),
        (
            &d.rpm_def,
            read(&[
                "x-ratelimit-remaining-requests",
                "anthropic-ratelimit-requests-remaining",
            ]),
        ),
    ];
    let now = wall_ms();
    for (def, remaining) in said {
        let (Some(def), Some(remaining)) = (def, remaining) else {
            continue;
        };
        quotas.with_lease(def, &d.limit_key, |l| {
            let ours = l.headroom(now);
            if remaining < ours {
                l.force(now, ours - remaining);
            }
        });
    }
}

/// The provider answered 429: the cluster stops calling it until the window ends. The
/// whole limit is counted as spent, so the window is overdrawn at the owner, which tells
/// every node to drop what it holds (`revoke`) at its next exchange.
pub fn provider_exhausted(quotas: &Quotas, d: &super::Deployment) {
    let now = wall_ms();
    for def in [&d.tpm_def, &d.rpm_def].into_iter().flatten() {
        quotas.with_lease(def, &d.limit_key, |l| {
            let held = l.headroom(now);
            l.force(now, held.max(def.limit));
        });
    }
}

/// `tollgate_budget_overshoot_bound_nanos{tenant}`: how far this node's running streams
/// could take a budget's spend past its cap (one step ahead and one provider event each);
/// `tenant` is the tenant, or `key:<id>` for a key's budget.
fn bound_gauge(tenant: &str) -> metrics::Gauge {
    metrics::gauge!("tollgate_budget_overshoot_bound_nanos", "tenant" => tenant.to_string())
}

fn scope_value(def: &QuotaDef, who: &Spending, model: &str) -> String {
    let api = who.api.as_deref().unwrap_or("");
    match def.scope {
        QuotaScope::Key => who.key.as_deref().unwrap_or(&who.ip).to_string(),
        QuotaScope::Tenant => who.tenant.as_deref().unwrap_or(&who.ip).to_string(),
        QuotaScope::Route => api.to_string(),
        QuotaScope::ApiVersion => who.api_version.clone().unwrap_or_else(|| api.to_string()),
        QuotaScope::Model => format!("{api}/{model}"),
    }
}

/// Seconds until `n` units may be had again: the window's end for a counter, the time
/// the bucket takes to release `n` for GCRA.
fn retry_after_s(def: &QuotaDef, n: u64) -> u64 {
    match def.algorithm {
        crate::actor::quota::Algorithm::Window => def.retry_after_s(wall_ms()),
        crate::actor::quota::Algorithm::Gcra => {
            let ms = u128::from(def.span.nominal_ms()) * u128::from(n) / u128::from(def.limit);
            (ms as u64).div_ceil(1000).max(1)
        }
    }
}

/// A request that needs more than a quota's whole limit can never be admitted.
fn too_large(def: &QuotaDef, n: u64) -> ProxyError {
    ProxyError::Llm {
        status: http::StatusCode::TOO_MANY_REQUESTS,
        code: "rate_limit_exceeded",
        message: format!(
            "this request may use {n} tokens (its prompt and max_tokens), more than quota {} allows in a whole window ({}); lower max_tokens or shorten the prompt",
            def.name, def.limit
        ),
        param: Some("max_tokens".into()),
        retry_after_s: None,
    }
}
