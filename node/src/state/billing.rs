//! Plans, tenants on plans, budgets and what usage costs (the control plane's billing, kept
//! in the replicated state like everything else: docs/architecture.md, decision 3).
//!
//! Money is exact. Prices are decimal text with at most 9 decimal places, held as integer
//! billionths (nanos) of the currency; costs are integer 10^-18 (attos) in `u128`:
//! `requests x nanos-per-1k` is in picos, `bytes x nanos-per-10^9-bytes` in attos, so
//! nothing is ever rounded until a figure is printed, and sums do not depend on order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use chrono::{Datelike, TimeZone, Utc};
use tollgate_proto::state::v1::{
    AssignPlan, BillingCommand, BudgetAlert, BudgetState, PlanAssignment, PlanPrices, PlanState,
    PlanVersion, PutPlan, SetBudget, StateSnapshot, TenantSpend, TokenPrices, UsageCounts,
    UsageEntry, billing_command::Op,
};

use crate::state::lifecycle::Refusal;

/// How many budget alerts the state keeps (oldest dropped first).
pub const ALERT_LIMIT: usize = 1_000;
/// Months of per-tenant spend the state keeps.
pub const SPEND_MONTHS: u64 = 13;
/// Thresholds when a budget names none.
pub const DEFAULT_THRESHOLDS: [u32; 3] = [50, 80, 100];

const ATTO_PER_NANO: u128 = 1_000_000_000;

/// Parses a non-negative decimal amount ("0.40", "12", "0.000001") into nanos.
pub fn parse_amount(field: &str, text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(0);
    }
    if t.starts_with('-') {
        return Err(format!(
            "{field} is {t:?}: amounts may not be negative; write 0 or more, like \"0.40\""
        ));
    }
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return Err(format!(
            "{field} is {t:?}, not a decimal amount; write it like \"0.40\" (no sign, no currency)"
        ));
    }
    if frac.len() > 9 {
        return Err(format!(
            "{field} is {t:?}: at most 9 decimal places are kept; round it"
        ));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| format!("{field} is {t:?}: too large"))?
    };
    let frac_nanos: u64 = format!("{frac:0<9}").parse().unwrap_or(0);
    whole
        .checked_mul(1_000_000_000)
        .and_then(|w| w.checked_add(frac_nanos))
        .ok_or_else(|| format!("{field} is {t:?}: too large"))
}

/// Nanos as decimal text, with at least two decimals ("0.40", "0.000001").
pub fn format_nanos(nanos: u64) -> String {
    format_atto(u128::from(nanos) * ATTO_PER_NANO)
}

/// Attos as decimal text, exact, with at least two decimals.
pub fn format_atto(atto: u128) -> String {
    let whole = atto / 1_000_000_000_000_000_000;
    let frac = format!("{:018}", atto % 1_000_000_000_000_000_000);
    let trimmed = frac.trim_end_matches('0');
    let frac = if trimmed.len() < 2 {
        &frac[..2]
    } else {
        trimmed
    };
    format!("{whole}.{frac}")
}

/// The calendar month (UTC) of a time: years * 12 + month - 1.
pub fn month_of_ms(ms: u64) -> u64 {
    let t = Utc
        .timestamp_millis_opt(ms as i64)
        .single()
        .unwrap_or_default();
    t.year().max(0) as u64 * 12 + u64::from(t.month0())
}

/// The first millisecond of a month (see [`month_of_ms`]).
pub fn month_start_ms(month: u64) -> u64 {
    Utc.with_ymd_and_hms((month / 12) as i32, (month % 12) as u32 + 1, 1, 0, 0, 0)
        .single()
        .map(|t| t.timestamp_millis().max(0) as u64)
        .unwrap_or(0)
}

/// A plan version's prices, in nanos.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prices {
    pub per_1k_requests: u64,
    pub per_1k_cached_requests: u64,
    pub per_gb: u64,
    pub per_1k_tokens: BTreeMap<String, u64>,
    /// LLM token prices by model (or `model/deployment`; `*` for any model).
    pub llm: BTreeMap<String, TokenPrice>,
    pub monthly: u64,
    pub currency: String,
}

/// Nanos per 1,000,000 tokens of each kind (defaults already filled in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenPrice {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub reasoning: u64,
    /// Which of the above were written (the rest took their defaults), for display.
    pub written: u8,
}

impl TokenPrice {
    fn from_proto(at: &str, p: &TokenPrices) -> Result<TokenPrice, String> {
        let field = |name: &str, text: &str| -> Result<Option<u64>, String> {
            if text.trim().is_empty() {
                Ok(None)
            } else {
                parse_amount(&format!("llm[{at}].{name}"), text).map(Some)
            }
        };
        let input = field("input", &p.input)?;
        let output = field("output", &p.output)?;
        let cached = field("cached_input", &p.cached_input)?;
        let write = field("cache_write", &p.cache_write)?;
        let reasoning = field("reasoning", &p.reasoning)?;
        if input.is_none() && output.is_none() {
            return Err(format!(
                "llm[{at}] names neither an input nor an output price; write at least one, like input=2.50,output=10"
            ));
        }
        let written = [
            input.is_some(),
            output.is_some(),
            cached.is_some(),
            write.is_some(),
            reasoning.is_some(),
        ]
        .iter()
        .enumerate()
        .fold(0u8, |acc, (i, &w)| acc | (u8::from(w) << i));
        let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
        Ok(TokenPrice {
            input,
            output,
            cached_input: cached.unwrap_or(input),
            cache_write: write.unwrap_or(input),
            reasoning: reasoning.unwrap_or(output),
            written,
        })
    }

    fn to_proto(self) -> TokenPrices {
        let show = |bit: u8, v: u64| {
            if self.written & (1 << bit) != 0 || bit < 2 {
                format_nanos(v)
            } else {
                String::new()
            }
        };
        TokenPrices {
            input: show(0, self.input),
            output: show(1, self.output),
            cached_input: show(2, self.cached_input),
            cache_write: show(3, self.cache_write),
            reasoning: show(4, self.reasoning),
        }
    }

    /// What `usage` costs, in attos: n tokens x nanos per 10^6 tokens = n x 10^3 attos.
    pub fn cost(&self, u: &LlmTokens) -> u128 {
        let plain_in = u.input.saturating_sub(u.cached_input + u.cache_write);
        let plain_out = u.output.saturating_sub(u.reasoning);
        let nanos_x_tokens = u128::from(plain_in) * u128::from(self.input)
            + u128::from(u.cached_input) * u128::from(self.cached_input)
            + u128::from(u.cache_write) * u128::from(self.cache_write)
            + u128::from(plain_out) * u128::from(self.output)
            + u128::from(u.reasoning) * u128::from(self.reasoning);
        nanos_x_tokens * 1_000
    }
}

/// Token counts by kind, as usage rows and requests carry them (input includes cached
/// input and cache writes, output includes reasoning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LlmTokens {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl LlmTokens {
    pub fn of_counts(c: &UsageCounts) -> LlmTokens {
        LlmTokens {
            input: c.input_tokens,
            output: c.output_tokens,
            cached_input: c.cached_input_tokens,
            cache_write: c.cache_write_tokens,
            reasoning: c.reasoning_tokens,
        }
    }
}

/// What some usage costs, in attos, by what it is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub requests: u128,
    pub bytes: u128,
    pub tokens: u128,
}

impl Cost {
    pub fn total(&self) -> u128 {
        self.requests + self.bytes + self.tokens
    }

    pub fn add(&mut self, o: &Cost) {
        self.requests += o.requests;
        self.bytes += o.bytes;
        self.tokens += o.tokens;
    }
}

/// Requests that are billed: those that reached an upstream (refused ones are not, and
/// cache hits have a price of their own).
pub fn billed_requests(c: &UsageCounts) -> u64 {
    c.requests.saturating_sub(c.refused + c.cached_requests)
}

impl Prices {
    pub fn from_proto(p: &PlanPrices) -> Result<Prices, String> {
        let mut per_1k_tokens = BTreeMap::new();
        for (model, price) in &p.per_1k_tokens {
            if model.is_empty() {
                return Err("a token price names no model; use \"*\" for any model".into());
            }
            per_1k_tokens.insert(
                model.clone(),
                parse_amount(&format!("per_1k_tokens[{model}]"), price)?,
            );
        }
        let mut llm = BTreeMap::new();
        for (at, price) in &p.llm {
            if at.is_empty() || at.len() > 256 || at.chars().any(char::is_control) {
                return Err(format!(
                    "llm price key {at:?} must name a model, `model/deployment`, or \"*\""
                ));
            }
            llm.insert(at.clone(), TokenPrice::from_proto(at, price)?);
        }
        let currency = if p.currency.is_empty() {
            "USD".to_string()
        } else if p.currency.len() == 3 && p.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            p.currency.clone()
        } else {
            return Err(format!(
                "currency is {:?}: write an ISO 4217 code like USD or EUR",
                p.currency
            ));
        };
        Ok(Prices {
            per_1k_requests: parse_amount("per_1k_requests", &p.per_1k_requests)?,
            per_1k_cached_requests: parse_amount(
                "per_1k_cached_requests",
                &p.per_1k_cached_requests,
            )?,
            per_gb: parse_amount("per_gb", &p.per_gb)?,
            per_1k_tokens,
            llm,
            monthly: parse_amount("monthly", &p.monthly)?,
            currency,
        })
    }

    pub fn to_proto(&self) -> PlanPrices {
        PlanPrices {
            per_1k_requests: format_nanos(self.per_1k_requests),
            per_1k_cached_requests: format_nanos(self.per_1k_cached_requests),
            per_gb: format_nanos(self.per_gb),
            per_1k_tokens: self
                .per_1k_tokens
                .iter()
                .map(|(m, &p)| (m.clone(), format_nanos(p)))
                .collect(),
            llm: self
                .llm
                .iter()
                .map(|(m, p)| (m.clone(), p.to_proto()))
                .collect(),
            monthly: format_nanos(self.monthly),
            currency: self.currency.clone(),
        }
    }

    /// The token price of `model` answered by `deployment`: `model/deployment`, then
    /// `model`, then `*`. None: the plan prices the model's tokens by `per_1k_tokens` (or
    /// not at all).
    pub fn llm_price(&self, model: &str, deployment: &str) -> Option<&TokenPrice> {
        if self.llm.is_empty() || model.is_empty() {
            return None;
        }
        if !deployment.is_empty()
            && let Some(p) = self
                .llm
                .iter()
                .find(|(k, _)| k.split_once('/') == Some((model, deployment)))
        {
            return Some(p.1);
        }
        self.llm.get(model).or_else(|| self.llm.get("*"))
    }

    /// What one LLM request costs, in attos (0 when the plan prices none of it).
    pub fn llm_cost(&self, model: &str, deployment: &str, t: &LlmTokens) -> u128 {
        self.llm_price(model, deployment).map_or(0, |p| p.cost(t))
    }

    /// The most a token of each side (input, output) can cost for this model and
    /// deployment (`upstream`: the provider's model id, for per-1k prices), in nanos per
    /// 10^6 tokens.
    pub fn worst_token_prices(&self, model: &str, deployment: &str, upstream: &str) -> (u64, u64) {
        match self.llm_price(model, deployment) {
            Some(p) => (
                p.input.max(p.cached_input).max(p.cache_write),
                p.output.max(p.reasoning),
            ),
            None => {
                let per_1k = self.per_1k_token(upstream);
                (per_1k * 1000, per_1k * 1000)
            }
        }
    }

    fn per_1k_token(&self, upstream: &str) -> u64 {
        self.per_1k_tokens
            .get(upstream)
            .or_else(|| self.per_1k_tokens.get("*"))
            .copied()
            .unwrap_or(0)
    }

    /// What one LLM request costs, in attos: its tokens (by kind, or at the per-1k price of
    /// the provider's model) and its per-request price. Bytes are billed in the rollups.
    pub fn request_cost(
        &self,
        model: &str,
        deployment: &str,
        upstream: &str,
        t: &LlmTokens,
    ) -> u128 {
        let tokens = match self.llm_price(model, deployment) {
            Some(p) => p.cost(t),
            None => {
                u128::from(t.input + t.output) * u128::from(self.per_1k_token(upstream)) * 1_000_000
            }
        };
        tokens + u128::from(self.per_1k_requests) * 1_000_000
    }

    /// What a usage row costs at these prices (the flat monthly fee is apart).
    pub fn metered_entry(&self, e: &UsageEntry) -> Cost {
        let counts = e.counts.clone().unwrap_or_default();
        let mut cost = self.metered(&counts);
        if let Some(p) = self.llm_price(&e.model, &e.deployment) {
            // Token prices by kind replace the per-1k price of the same tokens.
            cost.tokens = p.cost(&LlmTokens::of_counts(&counts));
        }
        cost
    }

    /// What metered usage costs at these prices (the flat monthly fee is apart), with
    /// tokens at their per-1k prices.
    pub fn metered(&self, c: &UsageCounts) -> Cost {
        // n x nanos-per-1000 = n x picos; x 10^6 = attos.
        let requests = (u128::from(billed_requests(c)) * u128::from(self.per_1k_requests)
            + u128::from(c.cached_requests) * u128::from(self.per_1k_cached_requests))
            * 1_000_000;
        let bytes =
            (u128::from(c.request_bytes) + u128::from(c.response_bytes)) * u128::from(self.per_gb);
        let tokens = c
            .tokens
            .iter()
            .map(|(model, &n)| {
                let price = self
                    .per_1k_tokens
                    .get(model)
                    .or_else(|| self.per_1k_tokens.get("*"))
                    .copied()
                    .unwrap_or(0);
                u128::from(n) * u128::from(price) * 1_000_000
            })
            .sum();
        Cost {
            requests,
            bytes,
            tokens,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: u32,
    pub created_at_ms: u64,
    pub prices: Prices,
}

/// What a budget is for: `tenant`, or `key:<id>` for an API key's.
pub fn subject(tenant: &str, key: &str) -> String {
    if key.is_empty() {
        tenant.to_string()
    } else {
        format!("key:{key}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The tenant it belongs to, and the key for a key's budget.
    pub tenant: String,
    pub key: String,
    pub limit: u64,
    pub thresholds: Vec<u32>,
    pub hard_cap: bool,
    pub webhook: String,
    pub month: u64,
    pub alerted: BTreeSet<u32>,
    pub capped: bool,
    pub set_at_ms: u64,
    pub fail_open: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Billing {
    pub plans: BTreeMap<String, Vec<Version>>,
    /// Oldest first; a tenant's plan at a time is its last assignment at or before it.
    pub assignments: Vec<PlanAssignment>,
    pub budgets: BTreeMap<String, Budget>,
    /// Metered spend by (subject, month), attos: each tenant's, and each API key's
    /// (`key:<id>`).
    pub spend: BTreeMap<(String, u64), u128>,
    pub alerts: VecDeque<BudgetAlert>,
    pub alert_seq: u64,
}

/// What a billing command changed, for the audit log.
pub struct BillingChange {
    pub action: &'static str,
    pub object: String,
    pub tenant: String,
    pub after: String,
}

impl Billing {
    /// The plan and version that priced a tenant's usage at `at_ms`, or with `version`
    /// forced (re-rating). None: the tenant was on no plan then.
    pub fn price_at(
        &self,
        tenant: &str,
        at_ms: u64,
        rerate: Option<(&str, u32)>,
    ) -> Result<Option<(&str, &Version)>, String> {
        let Some(a) = self
            .assignments
            .iter()
            .rev()
            .find(|a| a.tenant == tenant && a.from_ms <= at_ms)
        else {
            return Ok(None);
        };
        if a.plan.is_empty() {
            return Ok(None);
        }
        let Some(versions) = self.plans.get(&a.plan) else {
            return Ok(None);
        };
        let found = match rerate {
            Some((plan, n)) if plan == a.plan => version_of(&a.plan, versions, n)?,
            _ => versions
                .iter()
                .rev()
                .find(|v| v.created_at_ms <= at_ms)
                .unwrap_or(&versions[0]),
        };
        Ok(Some((&a.plan, found)))
    }

    /// Plans a tenant was on at some time in [from_ms, until_ms).
    /// Checks a re-rating (`plan@version`) names a version that exists.
    pub fn check_rerate(&self, rerate: Option<(&str, u32)>) -> Result<(), String> {
        if let Some((plan, n)) = rerate {
            let versions = self
                .plans
                .get(plan)
                .ok_or_else(|| format!("there is no plan {plan} to re-rate with"))?;
            version_of(plan, versions, n)?;
        }
        Ok(())
    }

    pub fn plans_during(&self, tenant: &str, from_ms: u64, until_ms: u64) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut current: Option<&str> = None;
        for a in self.assignments.iter().filter(|a| a.tenant == tenant) {
            if a.from_ms >= until_ms {
                break;
            }
            if a.from_ms > from_ms
                && let Some(p) = current
            {
                out.insert(p.to_string());
            }
            current = (!a.plan.is_empty()).then_some(a.plan.as_str());
        }
        if let Some(p) = current {
            out.insert(p.to_string());
        }
        out
    }

    pub fn apply(&mut self, cmd: &BillingCommand, at_ms: u64) -> Result<BillingChange, Refusal> {
        match &cmd.op {
            Some(Op::PutPlan(p)) => self.put_plan(p, at_ms),
            Some(Op::AssignPlan(a)) => self.assign(a, at_ms),
            Some(Op::SetBudget(b)) => self.set_budget(b, at_ms),
            None => Err(Refusal::Invalid("the billing command has no op".into())),
        }
    }

    fn put_plan(&mut self, p: &PutPlan, at_ms: u64) -> Result<BillingChange, Refusal> {
        check_name("plan name", &p.name)?;
        let prices =
            Prices::from_proto(&p.prices.clone().unwrap_or_default()).map_err(Refusal::Invalid)?;
        let versions = self.plans.entry(p.name.clone()).or_default();
        if let Some(last) = versions.last()
            && last.prices.currency != prices.currency
        {
            return Err(Refusal::Precondition(format!(
                "plan {} is priced in {}; a new version keeps the currency (make a new plan \
                 for {})",
                p.name, last.prices.currency, prices.currency
            )));
        }
        let version = versions.len() as u32 + 1;
        versions.push(Version {
            version,
            created_at_ms: at_ms,
            prices: prices.clone(),
        });
        Ok(BillingChange {
            action: "plan.put",
            object: format!("plan/{}@{version}", p.name),
            tenant: String::new(),
            after: serde_json::json!({ "version": version, "prices": prices_json(&prices) })
                .to_string(),
        })
    }

    fn assign(&mut self, a: &AssignPlan, at_ms: u64) -> Result<BillingChange, Refusal> {
        check_name("tenant", &a.tenant)?;
        if !a.plan.is_empty() && !self.plans.contains_key(&a.plan) {
            return Err(Refusal::NotFound(format!(
                "there is no plan {}; make it first with `tollgate plan put`",
                a.plan
            )));
        }
        // Times never go backwards within a tenant's assignments, so lookups stay ordered.
        let from_ms = self
            .assignments
            .iter()
            .rev()
            .find(|x| x.tenant == a.tenant)
            .map_or(at_ms, |x| x.from_ms.max(at_ms));
        self.assignments.push(PlanAssignment {
            tenant: a.tenant.clone(),
            plan: a.plan.clone(),
            from_ms,
        });
        Ok(BillingChange {
            action: "plan.assign",
            object: format!("tenant/{}", a.tenant),
            tenant: a.tenant.clone(),
            after: serde_json::json!({ "plan": a.plan, "from_ms": from_ms }).to_string(),
        })
    }

    fn set_budget(&mut self, b: &SetBudget, at_ms: u64) -> Result<BillingChange, Refusal> {
        check_name("tenant", &b.tenant)?;
        if !b.key.is_empty() {
            check_name("key", &b.key)?;
        }
        let subject = subject(&b.tenant, &b.key);
        if b.monthly_limit.trim().is_empty() {
            self.budgets.remove(&subject);
            return Ok(BillingChange {
                action: "budget.remove",
                object: format!("budget/{subject}"),
                tenant: b.tenant.clone(),
                after: String::new(),
            });
        }
        let limit = parse_amount("monthly_limit", &b.monthly_limit).map_err(Refusal::Invalid)?;
        let mut thresholds = if b.thresholds.is_empty() {
            DEFAULT_THRESHOLDS.to_vec()
        } else {
            b.thresholds.clone()
        };
        if let Some(t) = thresholds.iter().find(|&&t| t == 0 || t > 1000) {
            return Err(Refusal::Invalid(format!(
                "threshold {t}% is out of range; use percentages from 1 to 1000, like 50,80,100"
            )));
        }
        thresholds.sort_unstable();
        thresholds.dedup();
        // The leader seals the URL before proposing (it was checked then); one in the
        // clear is from a cluster made before sealing.
        let webhook_ok = b.webhook.is_empty()
            || crate::identity::seal::is_sealed_text(&b.webhook)
            || b.webhook.starts_with("http://")
            || b.webhook.starts_with("https://");
        if !webhook_ok {
            return Err(Refusal::Invalid(format!(
                "webhook {:?} is not an http(s) URL; write it like https://hooks.example.com/budget",
                b.webhook
            )));
        }
        let month = month_of_ms(at_ms);
        // Alerts already raised this month stay raised (no repeat on an edit).
        let alerted = self
            .budgets
            .get(&subject)
            .filter(|old| old.month == month)
            .map(|old| old.alerted.clone())
            .unwrap_or_default();
        self.budgets.insert(
            subject.clone(),
            Budget {
                tenant: b.tenant.clone(),
                key: b.key.clone(),
                limit,
                thresholds: thresholds.clone(),
                hard_cap: b.hard_cap,
                webhook: b.webhook.clone(),
                month,
                alerted,
                capped: false,
                set_at_ms: at_ms,
                fail_open: b.fail_open,
            },
        );
        self.check_budget(&subject, at_ms);
        Ok(BillingChange {
            action: "budget.set",
            object: format!("budget/{subject}"),
            tenant: b.tenant.clone(),
            after: serde_json::json!({
                "monthly_limit": format_nanos(limit),
                "thresholds": thresholds,
                "hard_cap": b.hard_cap,
                "fail_open": b.fail_open,
                "webhook": b.webhook,
            })
            .to_string(),
        })
    }

    /// Adds applied usage to the tenants' spend and checks their budgets. True when the set
    /// of capped tenants changed (the data plane must hear of it).
    pub fn add_usage(&mut self, entries: &[UsageEntry], at_ms: u64) -> bool {
        let mut touched = BTreeSet::new();
        for e in entries {
            if e.tenant.is_empty() {
                continue;
            }
            let minute_end = e.minute * 60_000 + 59_999;
            let Ok(Some((_, v))) = self.price_at(&e.tenant, minute_end, None) else {
                continue;
            };
            let cost = v.prices.metered_entry(e).total();
            if cost == 0 {
                continue;
            }
            let month = month_of_ms(e.minute * 60_000);
            *self.spend.entry((e.tenant.clone(), month)).or_default() += cost;
            touched.insert(e.tenant.clone());
            if !e.key.is_empty() {
                let key = subject(&e.tenant, &e.key);
                *self.spend.entry((key.clone(), month)).or_default() += cost;
                touched.insert(key);
            }
        }
        let oldest = month_of_ms(at_ms).saturating_sub(SPEND_MONTHS);
        self.spend.retain(|(_, m), _| *m >= oldest);
        let mut changed = false;
        for tenant in touched {
            changed |= self.check_budget(&tenant, at_ms);
        }
        changed
    }

    /// Raises the alerts a subject's (tenant's or key's) spend has crossed this month and
    /// sets or clears its cap. True when the cap changed.
    fn check_budget(&mut self, subject: &str, at_ms: u64) -> bool {
        let month = month_of_ms(at_ms);
        let spent = self
            .spend
            .get(&(subject.to_string(), month))
            .copied()
            .unwrap_or(0);
        let Some(b) = self.budgets.get_mut(subject) else {
            return false;
        };
        let was = b.capped;
        if b.month != month {
            b.month = month;
            b.alerted.clear();
            b.capped = false;
        }
        let limit = u128::from(b.limit) * ATTO_PER_NANO;
        let mut raised = Vec::new();
        for &t in &b.thresholds {
            if spent * 100 >= limit * u128::from(t) && b.alerted.insert(t) {
                raised.push(t);
            }
        }
        b.capped = b.hard_cap && spent >= limit;
        let (limit_text, webhook) = (format_nanos(b.limit), b.webhook.clone());
        let (tenant, key) = (b.tenant.clone(), b.key.clone());
        let changed = was != b.capped;
        for threshold in raised {
            self.alert_seq += 1;
            self.alerts.push_back(BudgetAlert {
                seq: self.alert_seq,
                at_ms,
                tenant: tenant.clone(),
                threshold,
                spent: format_atto(spent),
                limit: limit_text.clone(),
                webhook: webhook.clone(),
                month,
                key: key.clone(),
            });
            if self.alerts.len() > ALERT_LIMIT {
                self.alerts.pop_front();
            }
        }
        changed
    }

    /// Subjects (tenants, `key:<id>`) whose hard cap is reached, with the month it holds
    /// for.
    pub fn capped(&self) -> BTreeMap<String, u64> {
        self.budgets
            .iter()
            .filter(|(_, b)| b.capped)
            .map(|(t, b)| (t.clone(), b.month))
            .collect()
    }

    /// A subject's (tenant's or `key:<id>`'s) spend in `month`.
    pub fn spent(&self, subject: &str, month: u64) -> u128 {
        self.spend
            .get(&(subject.to_string(), month))
            .copied()
            .unwrap_or(0)
    }

    pub fn to_proto(&self, out: &mut StateSnapshot) {
        out.plans = self
            .plans
            .iter()
            .map(|(name, versions)| PlanState {
                name: name.clone(),
                versions: versions
                    .iter()
                    .map(|v| PlanVersion {
                        version: v.version,
                        created_at_ms: v.created_at_ms,
                        prices: Some(v.prices.to_proto()),
                    })
                    .collect(),
            })
            .collect();
        out.plan_assignments = self.assignments.clone();
        out.budgets = self.budgets.values().map(budget_proto).collect();
        out.spend = self
            .spend
            .iter()
            .map(|((tenant, month), &atto)| TenantSpend {
                tenant: tenant.clone(),
                month: *month,
                atto: atto.to_string(),
            })
            .collect();
        out.budget_alerts = self.alerts.iter().cloned().collect();
        out.budget_alert_seq = self.alert_seq;
    }

    pub fn from_proto(p: &StateSnapshot) -> Billing {
        Billing {
            plans: p
                .plans
                .iter()
                .map(|plan| {
                    let versions = plan
                        .versions
                        .iter()
                        .map(|v| Version {
                            version: v.version,
                            created_at_ms: v.created_at_ms,
                            // Checked when it was put; a price that no longer parses
                            // (never written by this code) prices nothing.
                            prices: Prices::from_proto(&v.prices.clone().unwrap_or_default())
                                .unwrap_or_default(),
                        })
                        .collect();
                    (plan.name.clone(), versions)
                })
                .collect(),
            assignments: p.plan_assignments.clone(),
            budgets: p
                .budgets
                .iter()
                .map(|b| {
                    (
                        subject(&b.tenant, &b.key),
                        Budget {
                            tenant: b.tenant.clone(),
                            key: b.key.clone(),
                            limit: parse_amount("monthly_limit", &b.monthly_limit).unwrap_or(0),
                            thresholds: b.thresholds.clone(),
                            hard_cap: b.hard_cap,
                            webhook: b.webhook.clone(),
                            month: b.month,
                            alerted: b.alerted.iter().copied().collect(),
                            capped: b.capped,
                            set_at_ms: b.set_at_ms,
                            fail_open: b.fail_open,
                        },
                    )
                })
                .collect(),
            spend: p
                .spend
                .iter()
                .map(|s| {
                    (
                        (s.tenant.clone(), s.month),
                        s.atto.parse::<u128>().unwrap_or(0),
                    )
                })
                .collect(),
            alerts: p.budget_alerts.iter().cloned().collect(),
            alert_seq: p.budget_alert_seq,
        }
    }
}

/// What the data plane needs of billing: each tenant's prices now, and the hard-capped
/// budgets its LLM requests reserve against.
#[derive(Debug, Default)]
pub struct BillingView {
    pub prices: std::collections::HashMap<String, Arc<PriceNow>>,
    pub budgets: std::collections::HashMap<String, Arc<crate::actor::quotas::QuotaDef>>,
}

/// Equal when the prices and the budgets' settings are (the states it is part of are
/// compared in tests).
impl PartialEq for BillingView {
    fn eq(&self, o: &BillingView) -> bool {
        self.prices.len() == o.prices.len()
            && self.prices.iter().all(|(k, v)| {
                o.prices
                    .get(k)
                    .is_some_and(|w| w.label == v.label && w.prices == v.prices)
            })
            && self.budgets.len() == o.budgets.len()
            && self
                .budgets
                .iter()
                .all(|(k, v)| o.budgets.get(k).is_some_and(|w| w.fail_open == v.fail_open))
    }
}

/// A tenant's prices in force: `plan@version` and the prices.
#[derive(Debug)]
pub struct PriceNow {
    pub label: String,
    pub prices: Prices,
}

impl Billing {
    /// The data plane's view as of `at_ms`.
    pub fn view(&self, at_ms: u64) -> BillingView {
        let mut view = BillingView::default();
        let tenants: BTreeSet<&str> = self.assignments.iter().map(|a| a.tenant.as_str()).collect();
        for tenant in tenants {
            if let Ok(Some((plan, v))) = self.price_at(tenant, at_ms, None) {
                view.prices.insert(
                    tenant.to_string(),
                    Arc::new(PriceNow {
                        label: format!("{plan}@{}", v.version),
                        prices: v.prices.clone(),
                    }),
                );
            }
        }
        for (tenant, b) in &self.budgets {
            if b.hard_cap {
                view.budgets.insert(
                    tenant.clone(),
                    Arc::new(crate::actor::quotas::QuotaDef::budget(tenant, b.fail_open)),
                );
            }
        }
        view
    }

    /// What is left of a hard-capped budget this month, in nanos (rounded down), by
    /// tenant.
    pub fn budgets_left(&self, at_ms: u64) -> Vec<(String, u64)> {
        let month = month_of_ms(at_ms);
        self.budgets
            .iter()
            .filter(|(_, b)| b.hard_cap)
            .map(|(tenant, b)| {
                let limit = u128::from(b.limit) * ATTO_PER_NANO;
                let left = limit.saturating_sub(self.spent(tenant, month)) / ATTO_PER_NANO;
                (tenant.clone(), left as u64)
            })
            .collect()
    }
}

/// Attos as nanos, rounded up (what a budget lease debits for a cost).
pub fn atto_to_nanos_up(atto: u128) -> u64 {
    atto.div_ceil(ATTO_PER_NANO).min(u128::from(u64::MAX)) as u64
}

pub fn budget_proto(b: &Budget) -> BudgetState {
    BudgetState {
        tenant: b.tenant.clone(),
        key: b.key.clone(),
        monthly_limit: format_nanos(b.limit),
        thresholds: b.thresholds.clone(),
        hard_cap: b.hard_cap,
        webhook: b.webhook.clone(),
        month: b.month,
        alerted: b.alerted.iter().copied().collect(),
        capped: b.capped,
        set_at_ms: b.set_at_ms,
        fail_open: b.fail_open,
    }
}

fn prices_json(p: &Prices) -> serde_json::Value {
    serde_json::json!({
        "per_1k_requests": format_nanos(p.per_1k_requests),
        "per_1k_cached_requests": format_nanos(p.per_1k_cached_requests),
        "per_gb": format_nanos(p.per_gb),
        "per_1k_tokens": p.per_1k_tokens.iter().map(|(m, &n)| (m.clone(), format_nanos(n))).collect::<BTreeMap<_, _>>(),
        "llm": p.llm.iter().map(|(m, t)| {
            let t = t.to_proto();
            (m.clone(), serde_json::json!({
                "input": t.input, "output": t.output, "cached_input": t.cached_input,
                "cache_write": t.cache_write, "reasoning": t.reasoning,
            }))
        }).collect::<BTreeMap<_, _>>(),
        "monthly": format_nanos(p.monthly),
        "currency": p.currency,
    })
}

fn version_of<'a>(plan: &str, versions: &'a [Version], n: u32) -> Result<&'a Version, String> {
    versions.iter().find(|v| v.version == n).ok_or_else(|| {
        format!(
            "plan {plan} has no price version {n} (it has 1 to {})",
            versions.len()
        )
    })
}

fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(Refusal::Invalid(format!(
            "{what} {name:?} must be 1 to 128 printable characters"
        )));
    }
    Ok(())
}

/// How a cost report groups usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Tenant,
    Api,
    Version,
    Key,
    /// LLM requests by the model asked for and the provider that answered
    /// (`model/provider`); other requests fall in "".
    Model,
}

/// The group a usage row falls in: "" by tenant, the API, `api@version` (the API alone
/// for a route counted without a version), or the key id.
pub fn group_of(by: GroupBy, e: &UsageEntry) -> String {
    match by {
        GroupBy::Tenant => String::new(),
        GroupBy::Api => e.api.clone(),
        GroupBy::Version if e.version.is_empty() => e.api.clone(),
        GroupBy::Version => format!("{}@{}", e.api, e.version),
        GroupBy::Key => e.key.clone(),
        GroupBy::Model if e.model.is_empty() => String::new(),
        GroupBy::Model if e.provider.is_empty() => e.model.clone(),
        GroupBy::Model => format!("{}/{}", e.model, e.provider),
    }
}

/// One line of a cost report: one tenant's usage of one group.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CostLine {
    pub tenant: String,
    /// The API, `api@version` or key id; empty when grouped by tenant.
    pub group: String,
    pub plans: BTreeSet<String>,
    /// `plan@version` of every price used.
    pub price_versions: BTreeSet<String>,
    pub currency: String,
    pub counts: UsageCounts,
    pub cost: Cost,
    /// Flat monthly fees (by tenant only; in the other groupings a line of their own with
    /// group "(monthly fee)").
    pub monthly: u128,
}

impl CostLine {
    pub fn total(&self) -> u128 {
        self.cost.total() + self.monthly
    }
}

/// Prices usage rows in [since_ms, until_ms): each row at the plan (and, unless `rerate`
/// names that plan and another of its versions, the price version) in force at the end of
/// its minute, plus
/// each plan's flat fee once for every calendar month the range overlaps in which the
/// tenant was on it.
pub fn cost_report(
    billing: &Billing,
    entries: &[UsageEntry],
    since_ms: u64,
    until_ms: u64,
    by: GroupBy,
    rerate: Option<(&str, u32)>,
) -> Result<Vec<CostLine>, String> {
    billing.check_rerate(rerate)?;
    let mut lines: BTreeMap<(String, String), CostLine> = BTreeMap::new();
    for e in entries {
        let group = group_of(by, e);
        let line = lines.entry((e.tenant.clone(), group.clone())).or_default();
        line.tenant = e.tenant.clone();
        line.group = group;
        let counts = e.counts.clone().unwrap_or_default();
        crate::state::usage::add_counts(&mut line.counts, &counts);
        if let Some((plan, v)) = billing.price_at(&e.tenant, e.minute * 60_000 + 59_999, rerate)? {
            line.plans.insert(plan.to_string());
            line.price_versions.insert(format!("{plan}@{}", v.version));
            line.currency = v.prices.currency.clone();
            line.cost.add(&v.prices.metered_entry(e));
        }
    }
    // Flat fees: every tenant ever assigned a plan.
    let tenants: BTreeSet<&str> = billing
        .assignments
        .iter()
        .map(|a| a.tenant.as_str())
        .collect();
    if until_ms > since_ms {
        let (first, last) = (month_of_ms(since_ms), month_of_ms(until_ms - 1));
        for tenant in tenants {
            for month in first..=last {
                let (from, to) = (month_start_ms(month), month_start_ms(month + 1));
                for plan in billing.plans_during(tenant, from.max(since_ms), to.min(until_ms)) {
                    let Some(versions) = billing.plans.get(&plan) else {
                        continue;
                    };
                    let v = match rerate {
                        Some((p, n)) if p == plan => version_of(&plan, versions, n)?,
                        _ => versions
                            .iter()
                            .rev()
                            .find(|v| v.created_at_ms < to)
                            .unwrap_or(&versions[0]),
                    };
                    if v.prices.monthly == 0 {
                        continue;
                    }
                    let group = match by {
                        GroupBy::Tenant => String::new(),
                        _ => "(monthly fee)".to_string(),
                    };
                    let line = lines
                        .entry((tenant.to_string(), group.clone()))
                        .or_default();
                    line.tenant = tenant.to_string();
                    line.group = group;
                    line.plans.insert(plan.clone());
                    line.price_versions.insert(format!("{plan}@{}", v.version));
                    line.currency = v.prices.currency.clone();
                    line.monthly += u128::from(v.prices.monthly) * ATTO_PER_NANO;
                }
            }
        }
    }
    Ok(lines.into_values().collect())
}

#[cfg(test)]
mod tests;
