//! `tollgate.cp.v1.Billing`: plans, tenants on plans and budgets are written to the cluster
//! like every other change; usage, costs and version health are computed here from the
//! rollups a node returns (`Usage`), with the node crate's exact cost arithmetic.

use std::collections::BTreeMap;

use tollgate_node::state::billing::{self, Billing as BillingState, GroupBy, group_of};
use tollgate_node::state::usage::{Histogram, add_counts, add_histogram, percentile_us};
use tollgate_proto::cp::v1 as cp;
use tollgate_proto::cp::v1::billing_server::Billing;
use tollgate_proto::node::v1::{UsageRequest, UsageResponse};
use tollgate_proto::state::v1 as state;
use tonic::{Request, Response, Status};

use crate::{Service, Token, check_size, token};

/// A query's range in ms since the epoch. `since`/`until`: RFC 3339, or a duration back
/// from `now` ("24h"); empty since: `default_back` ago; empty until: now.
pub fn parse_range(
    since: &str,
    until: &str,
    default_back: std::time::Duration,
    now_ms: u64,
) -> Result<(u64, u64), Status> {
    let at = |what: &str, text: &str| -> Result<u64, Status> {
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
            return Ok(t.timestamp_millis().max(0) as u64);
        }
        humantime::parse_duration(text)
            .map(|d| now_ms.saturating_sub(d.as_millis() as u64))
            .map_err(|_| {
                Status::invalid_argument(format!(
                    "{what} {text:?} is neither an RFC 3339 time nor a duration; write it like \
                     2026-11-29T00:00:00Z or 24h"
                ))
            })
    };
    let since_ms = match since {
        "" => now_ms.saturating_sub(default_back.as_millis() as u64),
        t => at("since", t)?,
    };
    let until_ms = match until {
        "" => now_ms,
        t => at("until", t)?,
    };
    if until_ms <= since_ms {
        return Err(Status::invalid_argument(format!(
            "the range is empty: since ({since:?}) must be before until ({until:?})"
        )));
    }
    Ok((since_ms, until_ms))
}

fn group_by(text: &str) -> Result<GroupBy, Status> {
    match text {
        "" | "tenant" => Ok(GroupBy::Tenant),
        "api" => Ok(GroupBy::Api),
        "version" => Ok(GroupBy::Version),
        "key" => Ok(GroupBy::Key),
        "model" => Ok(GroupBy::Model),
        other => Err(Status::invalid_argument(format!(
            "group_by {other:?} is not one of tenant, api, version, key, model"
        ))),
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The billing state as a node returned it.
pub(crate) fn billing_of(resp: &UsageResponse) -> BillingState {
    BillingState::from_proto(&state::StateSnapshot {
        plans: resp.plans.clone(),
        plan_assignments: resp.assignments.clone(),
        budgets: resp.budgets.clone(),
        budget_alerts: resp.alerts.clone(),
        spend: resp.spend.clone(),
        ..state::StateSnapshot::default()
    })
}

impl Service {
    pub(crate) async fn node_usage(
        &self,
        t: &Token,
        req: UsageRequest,
    ) -> Result<UsageResponse, Status> {
        self.inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(t.clone());
                let r = req.clone();
                async move { c.usage(r).await }
            })
            .await
    }

    /// The billing state alone (an empty range's rows: none).
    async fn billing_state(&self, t: &Token) -> Result<UsageResponse, Status> {
        self.node_usage(
            t,
            UsageRequest {
                since_ms: 0,
                until_ms: 1,
                ..UsageRequest::default()
            },
        )
        .await
    }

    async fn billing_command(
        &self,
        t: &Token,
        op: state::billing_command::Op,
    ) -> Result<u64, Status> {
        let kind = state::command::Kind::Billing(state::BillingCommand { op: Some(op) });
        Ok(self.command(t, kind).await?.generation)
    }

    async fn usage_range(
        &self,
        t: &Token,
        q: &cp::UsageQuery,
    ) -> Result<(UsageResponse, u64, u64), Status> {
        check_size("the tenant name", &q.tenant, 256)?;
        let (since_ms, until_ms) = parse_range(
            &q.since,
            &q.until,
            std::time::Duration::from_secs(86_400),
            now_ms(),
        )?;
        let resp = self
            .node_usage(
                t,
                UsageRequest {
                    since_ms,
                    until_ms,
                    tenant: q.tenant.clone(),
                    local: false,
                },
            )
            .await?;
        Ok((resp, since_ms, until_ms))
    }
}

#[tonic::async_trait]
impl Billing for Service {
    async fn put_plan(
        &self,
        req: Request<cp::PutPlanRequest>,
    ) -> Result<Response<cp::PlanReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the plan name", &r.name, 128)?;
        // Checked here too, so the answer names the field before anything is written.
        billing::Prices::from_proto(&r.prices.clone().unwrap_or_default())
            .map_err(Status::invalid_argument)?;
        let op = state::billing_command::Op::PutPlan(state::PutPlan {
            name: r.name.clone(),
            prices: r.prices,
        });
        let generation = self.billing_command(&t, op).await?;
        let plan = self
            .billing_state(&t)
            .await?
            .plans
            .into_iter()
            .find(|p| p.name == r.name);
        Ok(Response::new(cp::PlanReply { plan, generation }))
    }

    async fn list_plans(
        &self,
        req: Request<cp::ListPlansRequest>,
    ) -> Result<Response<cp::ListPlansReply>, Status> {
        let t = token(&req);
        let resp = self.billing_state(&t).await?;
        Ok(Response::new(cp::ListPlansReply {
            plans: resp.plans,
            assignments: resp.assignments,
        }))
    }

    async fn assign_plan(
        &self,
        req: Request<cp::AssignPlanRequest>,
    ) -> Result<Response<cp::AssignPlanReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the tenant name", &r.tenant, 256)?;
        check_size("the plan name", &r.plan, 128)?;
        let op = state::billing_command::Op::AssignPlan(state::AssignPlan {
            tenant: r.tenant,
            plan: r.plan,
        });
        let generation = self.billing_command(&t, op).await?;
        Ok(Response::new(cp::AssignPlanReply { generation }))
    }

    async fn set_budget(
        &self,
        req: Request<state::SetBudget>,
    ) -> Result<Response<cp::BudgetReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the tenant name", &r.tenant, 256)?;
        check_size("the key id", &r.key, 256)?;
        check_size("the webhook", &r.webhook, 2048)?;
        if !r.monthly_limit.trim().is_empty() {
            billing::parse_amount("monthly_limit", &r.monthly_limit)
                .map_err(Status::invalid_argument)?;
        }
        let generation = self
            .billing_command(&t, state::billing_command::Op::SetBudget(r))
            .await?;
        Ok(Response::new(cp::BudgetReply { generation }))
    }

    async fn list_budgets(
        &self,
        req: Request<cp::ListBudgetsRequest>,
    ) -> Result<Response<cp::ListBudgetsReply>, Status> {
        let t = token(&req);
        let resp = self.billing_state(&t).await?;
        let b = billing_of(&resp);
        let month = billing::month_of_ms(resp.now_ms);
        let budgets = resp
            .budgets
            .iter()
            .map(|budget| {
                let spent = b.spent(&billing::subject(&budget.tenant, &budget.key), month);
                let limit = billing::parse_amount("limit", &budget.monthly_limit).unwrap_or(0);
                let used_percent = if limit == 0 {
                    0.0
                } else {
                    // attos over nanos x 10^9
                    spent as f64 / (limit as f64 * 1e9) * 100.0
                };
                cp::BudgetView {
                    budget: Some(budget.clone()),
                    spent: billing::format_atto(spent),
                    used_percent,
                }
            })
            .collect();
        Ok(Response::new(cp::ListBudgetsReply {
            budgets,
            alerts: resp.alerts,
        }))
    }

    async fn usage(
        &self,
        req: Request<cp::UsageQuery>,
    ) -> Result<Response<cp::UsageReply>, Status> {
        let t = token(&req);
        let q = req.into_inner();
        let by = group_by(&q.group_by)?;
        let (resp, since_ms, until_ms) = self.usage_range(&t, &q).await?;
        let mut lines: BTreeMap<(String, String), state::UsageCounts> = BTreeMap::new();
        for e in &resp.entries {
            if by == GroupBy::Model && e.model.is_empty() {
                continue;
            }
            let counts = lines
                .entry((e.tenant.clone(), group_of(by, e)))
                .or_default();
            add_counts(counts, e.counts.as_ref().unwrap_or(&Default::default()));
        }
        Ok(Response::new(cp::UsageReply {
            lines: lines
                .into_iter()
                .map(|((tenant, group), counts)| cp::UsageLine {
                    tenant,
                    group,
                    counts: Some(counts),
                })
                .collect(),
            since_ms,
            until_ms,
        }))
    }

    async fn costs(
        &self,
        req: Request<cp::CostsQuery>,
    ) -> Result<Response<cp::CostsReply>, Status> {
        let t = token(&req);
        let q = req.into_inner();
        let range = q.range.unwrap_or_default();
        let by = group_by(&range.group_by)?;
        let rerate = match q.price_version.as_str() {
            "" => None,
            text => {
                let parsed = text
                    .split_once('@')
                    .and_then(|(plan, v)| Some((plan, v.parse::<u32>().ok()?)));
                Some(parsed.ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "price_version {text:?} is not plan@version; write it like starter@2"
                    ))
                })?)
            }
        };
        let (resp, since_ms, until_ms) = self.usage_range(&t, &range).await?;
        let b = billing_of(&resp);
        let report = billing::cost_report(&b, &resp.entries, since_ms, until_ms, by, rerate)
            .map_err(Status::invalid_argument)?;
        let mut totals: BTreeMap<String, u128> = BTreeMap::new();
        let lines = report
            .into_iter()
            .filter(|l| range.tenant.is_empty() || l.tenant == range.tenant)
            .map(|l| {
                if !l.currency.is_empty() {
                    *totals.entry(l.currency.clone()).or_default() += l.total();
                }
                let c = &l.counts;
                cp::CostLine {
                    tenant: l.tenant.clone(),
                    group: l.group.clone(),
                    plans: l.plans.iter().cloned().collect(),
                    price_versions: l.price_versions.iter().cloned().collect(),
                    currency: l.currency.clone(),
                    requests: c.requests,
                    billed_requests: billing::billed_requests(c),
                    bytes: c.request_bytes + c.response_bytes,
                    tokens: c.tokens.values().sum(),
                    requests_cost: billing::format_atto(l.cost.requests),
                    bytes_cost: billing::format_atto(l.cost.bytes),
                    tokens_cost: billing::format_atto(l.cost.tokens),
                    monthly_fee: billing::format_atto(l.monthly),
                    total: billing::format_atto(l.total()),
                }
            })
            .collect();
        Ok(Response::new(cp::CostsReply {
            lines,
            totals: totals
                .into_iter()
                .map(|(c, v)| (c, billing::format_atto(v)))
                .collect(),
            since_ms,
            until_ms,
        }))
    }

    async fn version_status(
        &self,
        req: Request<cp::VersionStatusRequest>,
    ) -> Result<Response<cp::VersionStatusReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        check_size("the version", &r.version, 128)?;
        let api = self.get(&t, &r.api).await?.api.unwrap_or_default();
        let (since_ms, until_ms) = parse_range(
            &r.since,
            &r.until,
            std::time::Duration::from_secs(3_600),
            now_ms(),
        )?;
        let resp = self
            .node_usage(
                &t,
                UsageRequest {
                    since_ms,
                    until_ms,
                    ..UsageRequest::default()
                },
            )
            .await?;
        let mut counts: BTreeMap<String, state::UsageCounts> = BTreeMap::new();
        let mut latency: BTreeMap<String, Histogram> = BTreeMap::new();
        for v in &api.versions {
            counts.entry(v.version.clone()).or_default();
        }
        for e in resp.entries.iter().filter(|e| e.api == r.api) {
            add_counts(
                counts.entry(e.version.clone()).or_default(),
                e.counts.as_ref().unwrap_or(&Default::default()),
            );
        }
        for l in resp.latencies.iter().filter(|l| l.api == r.api) {
            add_histogram(latency.entry(l.version.clone()).or_default(), &l.buckets);
        }
        // LLM calls: time to first token and tokens, per version.
        let mut llm: BTreeMap<String, state::LlmEntry> = BTreeMap::new();
        for e in resp.llm.iter().filter(|e| e.api == r.api) {
            tollgate_node::state::usage::add_llm(llm.entry(e.version.clone()).or_default(), e);
        }
        let stage = |v: &str| {
            api.versions
                .iter()
                .find(|x| x.version == v)
                .map(|x| x.stage.clone())
                .unwrap_or_default()
        };
        let ms = |h: Option<&Histogram>, q: f64| {
            h.and_then(|h| percentile_us(h, q))
                .map_or(0.0, |us| us as f64 / 1000.0)
        };
        let versions = counts
            .into_iter()
            // Requests refused before a version was chosen have none.
            .filter(|(v, _)| !v.is_empty())
            .filter(|(v, _)| r.version.is_empty() || *v == r.version)
            .map(|(v, c)| {
                let l = llm.get(&v).cloned().unwrap_or_default();
                let ttft: Histogram = l.ttft.iter().map(|(&b, &n)| (b, n)).collect();
                cp::VersionHealth {
                    ttft_p50_ms: ms(Some(&ttft), 0.5),
                    ttft_p99_ms: ms(Some(&ttft), 0.99),
                    input_tokens: l.input_tokens,
                    output_tokens: l.output_tokens,
                    output_tokens_per_s: if l.output_us == 0 {
                        0.0
                    } else {
                        l.streamed_output_tokens as f64 * 1e6 / l.output_us as f64
                    },
                    requests: c.requests,
                    errors_5xx: c.class_5xx,
                    client_errors_4xx: c.class_4xx,
                    error_rate: if c.requests == 0 {
                        0.0
                    } else {
                        c.class_5xx as f64 / c.requests as f64
                    },
                    p50_ms: ms(latency.get(&v), 0.5),
                    p99_ms: ms(latency.get(&v), 0.99),
                    stage: stage(&v),
                    version: v,
                }
            })
            .collect();
        Ok(Response::new(cp::VersionStatusReply {
            api: r.api,
            versions,
            since_ms,
            until_ms,
        }))
    }
}
