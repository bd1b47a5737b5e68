//! `tollgate analyze`: requests, errors, latency, tokens and cost per API, version, key,
//! tenant or model over a range, against a baseline (docs/hypercare.md).

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tollgate_sdk::cp;

use crate::billing::Connection;

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum AnalyzeOutput {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum AnalyzeBy {
    Api,
    #[default]
    Version,
    Key,
    Tenant,
    Model,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BaselineArg {
    /// The version published before (with --by version).
    PreviousVersion,
    /// The same range a day earlier.
    Day,
    /// The same range a week earlier.
    Week,
    None,
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Start: an RFC 3339 time or a duration back from now [default: 1h]
    #[arg(long, default_value = "")]
    pub since: String,
    /// End: the same forms [default: now]
    #[arg(long, default_value = "")]
    pub until: String,
    #[arg(long, value_enum, default_value_t)]
    pub by: AnalyzeBy,
    #[arg(long, default_value = "")]
    pub api: String,
    #[arg(long = "api-version", default_value = "")]
    pub version: String,
    #[arg(long, default_value = "")]
    pub tenant: String,
    #[arg(long, default_value = "")]
    pub key: String,
    #[arg(long, default_value = "")]
    pub model: String,
    /// Series buckets: minute or hour [default: minute up to 6 hours, else hour]
    #[arg(long, default_value = "")]
    pub bucket: String,
    /// What to compare with [default: previous-version with --by version, else day]
    #[arg(long, value_enum)]
    pub baseline: Option<BaselineArg>,
    /// Print each group's series too (table output).
    #[arg(long)]
    pub series: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: AnalyzeOutput,
    #[command(flatten)]
    pub conn: Connection,
}

fn figures_json(f: &cp::AnalysisFigures) -> Value {
    json!({
        "requests": f.requests,
        "errors": f.errors,
        "client_errors": f.client_errors,
        "error_rate": f.error_rate,
        "p50_ms": f.p50_ms,
        "p90_ms": f.p90_ms,
        "p95_ms": f.p95_ms,
        "p99_ms": f.p99_ms,
        "input_tokens": f.input_tokens,
        "output_tokens": f.output_tokens,
        "cost": f.cost,
        "currency": f.currency,
        "top_errors": f.top_errors.iter().map(|e| json!({"code": e.code, "count": e.count})).collect::<Vec<_>>(),
    })
}

fn name(g: &cp::AnalysisGroup) -> String {
    let parts: Vec<&str> = [&g.api, &g.version, &g.tenant, &g.key, &g.model]
        .into_iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    match (g.api.is_empty(), g.version.is_empty()) {
        (false, false) => format!("{}@{}", g.api, g.version),
        _ if parts.is_empty() => "(none)".into(),
        _ => parts.join("/"),
    }
}

/// "+12.0%" or "+0.8 pts" against the baseline, "" when there is none.
fn change(now: f64, base: f64, points: bool) -> String {
    if points {
        return format!("{:+.2} pts", (now - base) * 100.0);
    }
    if base == 0.0 {
        return if now == 0.0 { "=".into() } else { "new".into() };
    }
    format!("{:+.1}%", (now / base - 1.0) * 100.0)
}

pub async fn analyze(args: AnalyzeArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let by = match args.by {
        AnalyzeBy::Api => "api",
        AnalyzeBy::Version => "version",
        AnalyzeBy::Key => "key",
        AnalyzeBy::Tenant => "tenant",
        AnalyzeBy::Model => "model",
    };
    let baseline = match args.baseline {
        None => "",
        Some(BaselineArg::PreviousVersion) => "previous_version",
        Some(BaselineArg::Day) => "day",
        Some(BaselineArg::Week) => "week",
        Some(BaselineArg::None) => "none",
    };
    let reply = client
        .analyze(cp::AnalyzeQuery {
            since: args.since.clone(),
            until: args.until.clone(),
            group_by: by.into(),
            api: args.api.clone(),
            version: args.version.clone(),
            tenant: args.tenant.clone(),
            key: args.key.clone(),
            model: args.model.clone(),
            bucket: args.bucket.clone(),
            baseline: baseline.into(),
        })
        .await?;
    if args.output == AnalyzeOutput::Json {
        let groups: Vec<Value> = reply
            .groups
            .iter()
            .map(|g| {
                json!({
                    "api": g.api, "version": g.version, "tenant": g.tenant, "key": g.key, "model": g.model,
                    "figures": g.figures.as_ref().map(figures_json),
                    "baseline": g.baseline.as_ref().map(figures_json),
                    "baseline_of": g.baseline_of,
                    "series": g.series.iter().map(|p| json!({
                        "start": crate::logs::time_text(p.start_ms * 1000),
                        "requests": p.requests, "errors": p.errors, "p95_ms": p.p95_ms,
                        "tokens": p.tokens, "cost": p.cost,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "since": crate::logs::time_text(reply.since_ms * 1000),
                "until": crate::logs::time_text(reply.until_ms * 1000),
                "bucket": reply.bucket,
                "baseline": reply.baseline,
                "groups": groups,
            }))?
        );
        return Ok(());
    }
    if reply.groups.is_empty() {
        eprintln!("no requests in the range");
        return Ok(());
    }
    println!(
        "{:<28} {:>9} {:>8} {:>12} {:>9} {:>9} {:>9} {:>10} {:>12}  TOP ERRORS",
        by.to_ascii_uppercase(),
        "REQUESTS",
        "ERR %",
        "vs BASE",
        "P50 MS",
        "P95 MS",
        "P99 MS",
        "vs BASE",
        "COST"
    );
    for g in &reply.groups {
        let f = g.figures.clone().unwrap_or_default();
        let (err_change, p95_change) = match &g.baseline {
            Some(b) => (
                change(f.error_rate, b.error_rate, true),
                change(f.p95_ms, b.p95_ms, false),
            ),
            None => (String::new(), String::new()),
        };
        let errors: Vec<String> = f
            .top_errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.count))
            .collect();
        println!(
            "{:<28} {:>9} {:>8.2} {:>12} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>12}  {}",
            name(g),
            f.requests,
            f.error_rate * 100.0,
            err_change,
            f.p50_ms,
            f.p95_ms,
            f.p99_ms,
            p95_change,
            if f.cost.is_empty() {
                "-".to_string()
            } else {
                format!("{} {}", f.cost, f.currency)
            },
            errors.join(", ")
        );
        if let Some(b) = &g.baseline {
            println!(
                "  baseline ({}): {} requests, {:.2}% errors, p95 {:.2} ms{}",
                g.baseline_of,
                b.requests,
                b.error_rate * 100.0,
                b.p95_ms,
                if b.cost.is_empty() {
                    String::new()
                } else {
                    format!(", {} {}", b.cost, b.currency)
                }
            );
        }
        if args.series {
            for p in &g.series {
                println!(
                    "    {}  {:>8} requests {:>6} errors  p95 {:>8.2} ms  {:>8} tokens  {}",
                    crate::logs::time_text(p.start_ms * 1000),
                    p.requests,
                    p.errors,
                    p.p95_ms,
                    p.tokens,
                    p.cost
                );
            }
        }
    }
    Ok(())
}
