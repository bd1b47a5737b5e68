//! `tollgate.cp.v1.Analysis`: what the usage rollups say over a range, per API, version,
//! key, tenant or model, bucket by bucket, against a baseline (the version published before,
//! or the same range a day or a week earlier). Everything comes from the rollups a node
//! returns (`Usage`), priced with the node crate's exact cost arithmetic.

use std::collections::BTreeMap;

use tollgate_node::state::billing::{self, Billing as BillingState};
use tollgate_node::state::usage::{Histogram, add_counts, percentile_us};
use tollgate_proto::cp::v1 as cp;
use tollgate_proto::cp::v1::analysis_server::Analysis;
use tollgate_proto::node::v1::UsageRequest;
use tollgate_proto::state::v1 as state;
use tonic::{Request, Response, Status};

use crate::billing::{billing_of, now_ms, parse_range};
use crate::{Service, Token, check_size, token};

/// Most points in one group's series.
const MAX_POINTS: u64 = 1_500;
const TOP_ERRORS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    Api,
    Version,
    Key,
    Tenant,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Baseline {
    PreviousVersion,
    Day,
    Week,
    None,
}

/// A group's identity: (api, version, tenant, key, model), the fields `By` keeps.
type GroupKey = (String, String, String, String, String);

fn group_key(by: By, e: &state::UsageEntry) -> GroupKey {
    let s = String::new;
    match by {
        By::Api => (e.api.clone(), s(), s(), s(), s()),
        By::Version => (e.api.clone(), e.version.clone(), s(), s(), s()),
        By::Key => (s(), s(), e.tenant.clone(), e.key.clone(), s()),
        By::Tenant => (s(), s(), e.tenant.clone(), s(), s()),
        By::Model => (s(), s(), s(), s(), e.model.clone()),
    }
}

/// What a group adds up to: its counts, cost (attos) and currency, per bucket too.
#[derive(Default)]
struct Acc {
    counts: state::UsageCounts,
    cost: u128,
    /// None: no row priced yet; Some(""): rows in several currencies.
    currency: Option<String>,
    series: BTreeMap<u64, (state::UsageCounts, u128)>,
}

impl Acc {
    fn add(&mut self, e: &state::UsageEntry, bucket_ms: u64, billing: &BillingState) {
        let c = e.counts.clone().unwrap_or_default();
        add_counts(&mut self.counts, &c);
        let mut cost = 0;
        if let Ok(Some((_, v))) = billing.price_at(&e.tenant, e.minute * 60_000 + 59_999, None) {
            cost = v.prices.metered_entry(e).total();
            self.currency = match self.currency.take() {
                None => Some(v.prices.currency.clone()),
                Some(c) if c == v.prices.currency => Some(c),
                Some(_) => Some(String::new()),
            };
        }
        self.cost += cost;
        let start = e.minute * 60_000 / bucket_ms * bucket_ms;
        let point = self.series.entry(start).or_default();
        add_counts(&mut point.0, &c);
        point.1 += cost;
    }

    fn figures(&self) -> cp::AnalysisFigures {
        let c = &self.counts;
        let h: Histogram = c.latency.iter().map(|(&b, &n)| (b, n)).collect();
        let ms = |q: f64| percentile_us(&h, q).map_or(0.0, |us| us as f64 / 1000.0);
        let mut errors: Vec<(&String, &u64)> = c.errors.iter().collect();
        errors.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        cp::AnalysisFigures {
            requests: c.requests,
            errors: c.class_5xx,
            client_errors: c.class_4xx,
            error_rate: if c.requests == 0 {
                0.0
            } else {
                c.class_5xx as f64 / c.requests as f64
            },
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            cost: match &self.currency {
                None => String::new(),
                Some(_) => billing::format_atto(self.cost),
            },
            currency: match &self.currency {
                None => String::new(),
                Some(c) if c.is_empty() => "mixed".into(),
                Some(c) => c.clone(),
            },
            top_errors: errors
                .into_iter()
                .take(TOP_ERRORS)
                .map(|(code, &count)| cp::ErrorCount {
                    code: code.clone(),
                    count,
                })
                .collect(),
        }
    }
}

/// The rows of a range, grouped.
fn grouped(
    entries: &[state::UsageEntry],
    by: By,
    q: &cp::AnalyzeQuery,
    bucket_ms: u64,
    billing: &BillingState,
    keep_versions: bool,
) -> BTreeMap<GroupKey, Acc> {
    let mut out: BTreeMap<GroupKey, Acc> = BTreeMap::new();
    let want = |filter: &str, have: &str| filter.is_empty() || filter == have;
    for e in entries {
        // Requests refused before a version was chosen belong to no version.
        if by == By::Version && e.version.is_empty() {
            continue;
        }
        if by == By::Model && e.model.is_empty() {
            continue;
        }
        if !(want(&q.api, &e.api)
            && (keep_versions || want(&q.version, &e.version))
            && want(&q.tenant, &e.tenant)
            && want(&q.key, &e.key)
            && want(&q.model, &e.model))
        {
            continue;
        }
        out.entry(group_key(by, e))
            .or_default()
            .add(e, bucket_ms, billing);
    }
    out
}

/// The version of `api` published before `version` (the highest lower one), if any.
fn previous_version(apis: &[state::ApiState], api: &str, version: &str) -> Option<String> {
    let this = semver::Version::parse(version).ok()?;
    apis.iter()
        .find(|a| a.name == api)?
        .versions
        .iter()
        .filter(|v| v.stage != "draft")
        .filter_map(|v| semver::Version::parse(&v.version).ok())
        .filter(|v| *v < this)
        .max()
        .map(|v| v.to_string())
}

impl Service {
    async fn usage_between(
        &self,
        t: &Token,
        since_ms: u64,
        until_ms: u64,
        tenant: &str,
    ) -> Result<tollgate_proto::node::v1::UsageResponse, Status> {
        self.node_usage(
            t,
            UsageRequest {
                since_ms,
                until_ms,
                tenant: tenant.to_string(),
                local: false,
            },
        )
        .await
    }
}

#[tonic::async_trait]
impl Analysis for Service {
    async fn analyze(
        &self,
        req: Request<cp::AnalyzeQuery>,
    ) -> Result<Response<cp::AnalyzeReply>, Status> {
        let t = token(&req);
        let q = req.into_inner();
        for (what, v) in [
            ("the API name", &q.api),
            ("the version", &q.version),
            ("the tenant name", &q.tenant),
            ("the key", &q.key),
            ("the model", &q.model),
        ] {
            check_size(what, v, 256)?;
        }
        let by = match q.group_by.as_str() {
            "" | "version" => By::Version,
            "api" => By::Api,
            "key" => By::Key,
            "tenant" => By::Tenant,
            "model" => By::Model,
            other => {
                return Err(Status::invalid_argument(format!(
                    "group_by {other:?} is not one of api, version, key, tenant, model"
                )));
            }
        };
        let (since_ms, until_ms) = parse_range(
            &q.since,
            &q.until,
            std::time::Duration::from_secs(3_600),
            now_ms(),
        )?;
        let span = until_ms - since_ms;
        let bucket_ms = match q.bucket.as_str() {
            "" if span <= 6 * 3_600_000 => 60_000,
            "" | "hour" => 3_600_000,
            "minute" => 60_000,
            other => {
                return Err(Status::invalid_argument(format!(
                    "bucket {other:?} is not minute or hour"
                )));
            }
        };
        if span / bucket_ms > MAX_POINTS {
            return Err(Status::invalid_argument(format!(
                "{} buckets of a {} in this range, more than {MAX_POINTS}: ask for bucket hour or a shorter range",
                span / bucket_ms,
                if bucket_ms == 60_000 {
                    "minute"
                } else {
                    "hour"
                }
            )));
        }
        let baseline = match q.baseline.as_str() {
            "" if by == By::Version => Baseline::PreviousVersion,
            "" | "day" => Baseline::Day,
            "previous_version" | "previous-version" => Baseline::PreviousVersion,
            "week" => Baseline::Week,
            "none" => Baseline::None,
            other => {
                return Err(Status::invalid_argument(format!(
                    "baseline {other:?} is not previous_version, day, week or none"
                )));
            }
        };
        if baseline == Baseline::PreviousVersion && by != By::Version {
            return Err(Status::invalid_argument(
                "baseline previous_version compares versions: use it with group_by version, or ask for day or week",
            ));
        }
        let resp = self
            .usage_between(&t, since_ms, until_ms, &q.tenant)
            .await?;
        let billing_state = billing_of(&resp);
        // Grouped by version, every version is kept here (the previous one is a baseline)
        // and the filter applied to the answer.
        let groups = grouped(
            &resp.entries,
            by,
            &q,
            bucket_ms,
            &billing_state,
            by == By::Version,
        );
        let earlier = match baseline {
            Baseline::Day => Some((86_400_000, "a day earlier")),
            Baseline::Week => Some((7 * 86_400_000, "a week earlier")),
            _ => None,
        };
        let before = match earlier {
            Some((back, _)) => {
                let r = self
                    .usage_between(
                        &t,
                        since_ms.saturating_sub(back),
                        until_ms.saturating_sub(back),
                        &q.tenant,
                    )
                    .await?;
                let b = billing_of(&r);
                grouped(&r.entries, by, &q, bucket_ms, &b, false)
            }
            None => BTreeMap::new(),
        };
        let apis = match baseline {
            Baseline::PreviousVersion => self.list(&t, "").await?.apis,
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        for (key, acc) in &groups {
            let (api, version, tenant, k, model) = key;
            if by == By::Version && !q.version.is_empty() && *version != q.version {
                continue;
            }
            let (base, base_of) = match baseline {
                Baseline::PreviousVersion => match previous_version(&apis, api, version) {
                    Some(prev) => {
                        let k = (
                            api.clone(),
                            prev.clone(),
                            String::new(),
                            String::new(),
                            String::new(),
                        );
                        let figures = groups
                            .get(&k)
                            .map_or_else(|| Acc::default().figures(), |a| a.figures());
                        (Some(figures), prev)
                    }
                    None => (None, String::new()),
                },
                Baseline::Day | Baseline::Week => (
                    Some(
                        before
                            .get(key)
                            .map_or_else(|| Acc::default().figures(), |a| a.figures()),
                    ),
                    earlier.map(|e| e.1.to_string()).unwrap_or_default(),
                ),
                Baseline::None => (None, String::new()),
            };
            let series = acc
                .series
                .iter()
                .map(|(&start, (c, cost))| {
                    let h: Histogram = c.latency.iter().map(|(&b, &n)| (b, n)).collect();
                    cp::AnalysisPoint {
                        start_ms: start,
                        requests: c.requests,
                        errors: c.class_5xx,
                        p95_ms: percentile_us(&h, 0.95).map_or(0.0, |us| us as f64 / 1000.0),
                        tokens: c.input_tokens + c.output_tokens,
                        cost: if acc.currency.is_some() {
                            billing::format_atto(*cost)
                        } else {
                            String::new()
                        },
                    }
                })
                .collect();
            out.push(cp::AnalysisGroup {
                api: api.clone(),
                version: version.clone(),
                tenant: tenant.clone(),
                key: k.clone(),
                model: model.clone(),
                figures: Some(acc.figures()),
                baseline: base,
                baseline_of: base_of,
                series,
            });
        }
        Ok(Response::new(cp::AnalyzeReply {
            groups: out,
            bucket: if bucket_ms == 60_000 {
                "minute"
            } else {
                "hour"
            }
            .into(),
            baseline: match baseline {
                Baseline::PreviousVersion => "previous_version",
                Baseline::Day => "day",
                Baseline::Week => "week",
                Baseline::None => "none",
            }
            .into(),
            since_ms,
            until_ms,
        }))
    }
}
