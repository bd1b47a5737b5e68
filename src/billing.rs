//! `tollgate usage`, `tollgate costs`, `tollgate plan ...`, `tollgate budget ...` and
//! `tollgate version status`, through the control plane.

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tollgate_sdk::{cp, state};

use crate::api::{CpArg, client};
use crate::cluster::{Output, print_value};

/// How reports are printed.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum ReportOutput {
    #[default]
    Table,
    Json,
    Csv,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum By {
    #[default]
    Tenant,
    Api,
    Version,
    Key,
    /// LLM requests, by model and the provider that answered.
    Model,
}

impl By {
    fn name(self) -> &'static str {
        match self {
            By::Tenant => "tenant",
            By::Api => "api",
            By::Version => "version",
            By::Key => "key",
            By::Model => "model",
        }
    }
}

#[derive(Debug, Args)]
pub struct Connection {
    /// Control-plane address(es), comma-separated (any replica).
    #[arg(
        long = "cp",
        env = "TOLLGATE_CP",
        value_delimiter = ',',
        default_value = "127.0.0.1:7080"
    )]
    pub cp: Vec<String>,
    /// The operator token, or a tenant token (which sees its own tenant only).
    #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub ca: crate::cluster::CaArg,
}

impl Connection {
    pub(crate) fn client(&self) -> anyhow::Result<tollgate_sdk::ControlPlaneClient> {
        client(&CpArg {
            cp: self.cp.clone(),
            token: self.token.clone(),
            ca: self.ca.clone(),
            output: Output::Table,
        })
    }
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Start: an RFC 3339 time or a duration back from now (`24h`, `30m`) [default: 24h]
    #[arg(long, default_value = "")]
    pub since: String,
    /// End: the same forms [default: now]
    #[arg(long, default_value = "")]
    pub until: String,
    /// One line per tenant, or per tenant and API, version or key.
    #[arg(long, value_enum, default_value_t)]
    pub by: By,
    /// Only this tenant.
    #[arg(long, default_value = "")]
    pub tenant: String,
    #[arg(long, value_enum, default_value_t)]
    pub output: ReportOutput,
    #[command(flatten)]
    pub conn: Connection,
}

impl ReportArgs {
    fn query(&self) -> cp::UsageQuery {
        cp::UsageQuery {
            since: self.since.clone(),
            until: self.until.clone(),
            group_by: self.by.name().into(),
            tenant: self.tenant.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct CostsArgs {
    #[command(flatten)]
    pub report: ReportArgs,
    /// Re-rate with another price version of a plan, `plan@version` (default: every row at
    /// the prices it was billed at).
    #[arg(long, default_value = "")]
    pub price_version: String,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Add a plan, or a new version of it (versions never change once made).
    Put {
        name: String,
        /// Price per 1,000 requests that reached an upstream, e.g. 0.40.
        #[arg(long, default_value = "0")]
        per_1k_requests: String,
        /// Price per 10^9 bytes of request and response bodies.
        #[arg(long, default_value = "0")]
        per_gb: String,
        /// Price per 1,000 LLM requests answered from the response cache.
        #[arg(long, default_value = "0")]
        per_1k_cached_requests: String,
        /// Price per 1,000 LLM tokens of a model, `MODEL=PRICE` (`*` for any other model);
        /// repeat for several.
        #[arg(long = "per-1k-tokens", value_parser = model_price)]
        per_1k_tokens: Vec<(String, String)>,
        /// LLM token prices per 1,000,000 tokens of a model (or `MODEL/DEPLOYMENT`, or `*`),
        /// by kind: `MODEL=input:2.50,output:10,cached_input:1.25,cache_write:3.75,reasoning:10`
        /// (unnamed cached and cache-write prices are the input price, reasoning the output
        /// price); repeat for several.
        #[arg(long = "llm", value_parser = llm_price)]
        llm: Vec<(String, state::TokenPrices)>,
        /// Flat fee per calendar month on the plan.
        #[arg(long, default_value = "0")]
        monthly: String,
        /// ISO 4217 currency code.
        #[arg(long, default_value = "USD")]
        currency: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Plans with their versions and prices, and which tenant is on which.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: ReportOutput,
        #[command(flatten)]
        conn: Connection,
    },
    /// Put a tenant on a plan from now on (`-` for no plan).
    Assign {
        tenant: String,
        plan: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
    /// Set a tenant's monthly budget (or, with --key, one of its API keys').
    Set {
        tenant: String,
        /// The budget of this API key of the tenant (its public id), beside the tenant's.
        #[arg(long, default_value = "")]
        key: String,
        /// The limit per calendar month (UTC), in the tenant's plan currency.
        #[arg(long)]
        monthly_limit: String,
        /// Percentages of the limit that raise an alert, e.g. 50,80,100.
        #[arg(long, value_delimiter = ',')]
        thresholds: Vec<u32>,
        /// At 100%, refuse the tenant's requests (402) until the month ends; LLM requests
        /// reserve their worst case against what is left, cluster-wide, and streams end
        /// when it is spent.
        #[arg(long)]
        hard_cap: bool,
        /// While a node cannot reach the budget's owner, let it spend its share of what is
        /// left (default: refuse what its lease does not cover).
        #[arg(long)]
        fail_open: bool,
        /// POST each alert as JSON to this http(s) URL.
        #[arg(long, default_value = "")]
        webhook: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove a tenant's budget (or, with --key, a key's), and lift its cap.
    Remove {
        tenant: String,
        #[arg(long, default_value = "")]
        key: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Budgets, this month's spend against them, and recent alerts.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: ReportOutput,
        #[command(flatten)]
        conn: Connection,
    },
}

fn llm_price(s: &str) -> Result<(String, state::TokenPrices), String> {
    let usage = "write it like gpt-4o=input:2.50,output:10 (kinds: input, output, cached_input, cache_write, reasoning)";
    let (model, kinds) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not MODEL=KIND:PRICE,...; {usage}"))?;
    let mut p = state::TokenPrices::default();
    for part in kinds.split(',').filter(|k| !k.trim().is_empty()) {
        let (kind, price) = part
            .split_once(':')
            .ok_or_else(|| format!("{part:?} in {s:?} is not KIND:PRICE; {usage}"))?;
        let slot = match kind.trim() {
            "input" => &mut p.input,
            "output" => &mut p.output,
            "cached_input" => &mut p.cached_input,
            "cache_write" => &mut p.cache_write,
            "reasoning" => &mut p.reasoning,
            other => return Err(format!("{other:?} is not a token kind; {usage}")),
        };
        *slot = price.trim().to_string();
    }
    Ok((model.to_string(), p))
}

fn model_price(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .ok_or_else(|| format!("{s:?} is not MODEL=PRICE; write it like gpt-4o=0.005"))
}

/// Prints rows (first row: the header) as an aligned table, CSV, or JSON objects.
fn print_rows(rows: &[Vec<String>], output: ReportOutput) -> anyhow::Result<()> {
    let Some((header, body)) = rows.split_first() else {
        return Ok(());
    };
    match output {
        ReportOutput::Json => {
            let objects: Vec<Value> = body
                .iter()
                .map(|r| {
                    Value::Object(
                        header
                            .iter()
                            .zip(r)
                            .map(|(h, v)| {
                                let value = v
                                    .parse::<u64>()
                                    .map(Value::from)
                                    .unwrap_or_else(|_| Value::from(v.clone()));
                                (h.to_lowercase().replace(' ', "_"), value)
                            })
                            .collect(),
                    )
                })
                .collect();
            print_value(&json!(objects), Output::Json)
        }
        ReportOutput::Csv => {
            let mut w = csv::Writer::from_writer(std::io::stdout());
            for r in rows {
                w.write_record(r)?;
            }
            w.flush()?;
            Ok(())
        }
        ReportOutput::Table => {
            let widths: Vec<usize> = (0..header.len())
                .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
                .collect();
            for r in rows {
                let line: Vec<String> = r
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect();
                println!("{}", line.join("  ").trim_end());
            }
            Ok(())
        }
    }
}

fn group_header(by: By) -> &'static str {
    match by {
        By::Tenant => "",
        By::Api => "API",
        By::Version => "VERSION",
        By::Key => "KEY",
        By::Model => "MODEL/PROVIDER",
    }
}

fn with_group(by: By, mut row: Vec<String>, group: &str) -> Vec<String> {
    if by != By::Tenant {
        row.insert(1, group.to_string());
    }
    row
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

pub async fn usage(args: ReportArgs) -> anyhow::Result<()> {
    let reply = args.conn.client()?.usage(args.query()).await?;
    let llm = args.by == By::Model;
    let mut header: Vec<String> = [
        "TENANT",
        "REQUESTS",
        "2XX",
        "3XX",
        "4XX",
        "5XX",
        "REFUSED",
        "REQ BYTES",
        "RESP BYTES",
        "UPSTREAM MS",
    ]
    .map(String::from)
    .to_vec();
    if llm {
        header.truncate(7);
        header.extend(
            [
                "INPUT TOK",
                "OUTPUT TOK",
                "CACHED TOK",
                "REASONING TOK",
                "ESTIMATED",
            ]
            .map(String::from),
        );
    }
    let mut rows = vec![with_group(args.by, header, group_header(args.by))];
    for l in &reply.lines {
        let c = l.counts.clone().unwrap_or_default();
        let mut row = vec![
            or_dash(&l.tenant),
            c.requests.to_string(),
            c.class_2xx.to_string(),
            c.class_3xx.to_string(),
            c.class_4xx.to_string(),
            c.class_5xx.to_string(),
            c.refused.to_string(),
        ];
        if llm {
            row.extend([
                c.input_tokens.to_string(),
                c.output_tokens.to_string(),
                c.cached_input_tokens.to_string(),
                c.reasoning_tokens.to_string(),
                c.estimated.to_string(),
            ]);
        } else {
            row.extend([
                c.request_bytes.to_string(),
                c.response_bytes.to_string(),
                (c.upstream_us / 1000).to_string(),
            ]);
        }
        rows.push(with_group(args.by, row, &or_dash(&l.group)));
    }
    if args.output == ReportOutput::Table && reply.lines.is_empty() {
        println!("No usage in this range.");
        return Ok(());
    }
    print_rows(&rows, args.output)
}

pub async fn costs(args: CostsArgs) -> anyhow::Result<()> {
    let r = &args.report;
    let reply = r
        .conn
        .client()?
        .costs(cp::CostsQuery {
            range: Some(r.query()),
            price_version: args.price_version.clone(),
        })
        .await?;
    let mut rows = vec![with_group(
        r.by,
        [
            "TENANT",
            "PLAN",
            "PRICES",
            "REQUESTS",
            "BILLED",
            "BYTES",
            "TOKENS",
            "REQUESTS COST",
            "BYTES COST",
            "TOKENS COST",
            "MONTHLY",
            "TOTAL",
            "CURRENCY",
        ]
        .map(String::from)
        .to_vec(),
        group_header(r.by),
    )];
    for l in &reply.lines {
        rows.push(with_group(
            r.by,
            vec![
                or_dash(&l.tenant),
                or_dash(&l.plans.join(" ")),
                or_dash(&l.price_versions.join(" ")),
                l.requests.to_string(),
                l.billed_requests.to_string(),
                l.bytes.to_string(),
                l.tokens.to_string(),
                l.requests_cost.clone(),
                l.bytes_cost.clone(),
                l.tokens_cost.clone(),
                l.monthly_fee.clone(),
                l.total.clone(),
                or_dash(&l.currency),
            ],
            &or_dash(&l.group),
        ));
    }
    print_rows(&rows, r.output)?;
    if r.output == ReportOutput::Table {
        for (currency, total) in &reply.totals {
            println!("Total: {total} {currency}");
        }
    }
    Ok(())
}

/// `model=input:2.50,output:10,...` for each model priced (kinds left at their default
/// are not shown).
fn llm_prices(llm: &std::collections::BTreeMap<String, state::TokenPrices>) -> Vec<String> {
    let mut out: Vec<String> = llm
        .iter()
        .map(|(m, p)| {
            let kinds = [
                ("input", &p.input),
                ("output", &p.output),
                ("cached_input", &p.cached_input),
                ("cache_write", &p.cache_write),
                ("reasoning", &p.reasoning),
            ];
            let text: Vec<String> = kinds
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            format!("{m}={}", text.join(","))
        })
        .collect();
    out.sort();
    out
}

pub async fn plan(cmd: PlanCommand) -> anyhow::Result<()> {
    match cmd {
        PlanCommand::Put {
            name,
            per_1k_requests,
            per_gb,
            per_1k_cached_requests,
            per_1k_tokens,
            llm,
            monthly,
            currency,
            conn,
        } => {
            let prices = state::PlanPrices {
                per_1k_requests,
                per_1k_cached_requests,
                per_gb,
                per_1k_tokens: per_1k_tokens.into_iter().collect(),
                llm: llm.into_iter().collect(),
                monthly,
                currency,
            };
            let reply = conn.client()?.put_plan(&name, prices).await?;
            let version = reply
                .plan
                .and_then(|p| p.versions.last().map(|v| v.version))
                .unwrap_or(0);
            println!(
                "Plan {name} version {version} (generation {}).",
                reply.generation
            );
        }
        PlanCommand::List { output, conn } => {
            let reply = conn.client()?.list_plans().await?;
            let mut rows = vec![
                [
                    "PLAN",
                    "VERSION",
                    "PER 1K REQUESTS",
                    "PER GB",
                    "PER 1K TOKENS",
                    "LLM PER 1M TOKENS",
                    "MONTHLY",
                    "CURRENCY",
                    "TENANTS",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for p in &reply.plans {
                // A tenant is on the plan of its last assignment.
                let mut on: std::collections::BTreeMap<&str, &str> = Default::default();
                for a in &reply.assignments {
                    on.insert(&a.tenant, &a.plan);
                }
                let tenants: Vec<&str> = on
                    .iter()
                    .filter(|(_, plan)| **plan == p.name)
                    .map(|(t, _)| *t)
                    .collect();
                for v in &p.versions {
                    let prices = v.prices.clone().unwrap_or_default();
                    let tokens: Vec<String> = prices
                        .per_1k_tokens
                        .iter()
                        .map(|(m, x)| format!("{m}={x}"))
                        .collect();
                    rows.push(vec![
                        p.name.clone(),
                        v.version.to_string(),
                        prices.per_1k_requests,
                        prices.per_gb,
                        or_dash(&tokens.join(" ")),
                        or_dash(&llm_prices(&prices.llm).join(" ")),
                        prices.monthly,
                        prices.currency,
                        or_dash(&tenants.join(" ")),
                    ]);
                }
            }
            print_rows(&rows, output)?;
        }
        PlanCommand::Assign { tenant, plan, conn } => {
            let plan = if plan == "-" { String::new() } else { plan };
            let generation = conn.client()?.assign_plan(&tenant, &plan).await?;
            match plan.as_str() {
                "" => println!("Tenant {tenant} is on no plan (generation {generation})."),
                p => println!("Tenant {tenant} is on plan {p} from now (generation {generation})."),
            }
        }
    }
    Ok(())
}

/// "acme", or "acme's key k1".
fn whose(tenant: &str, key: &str) -> String {
    if key.is_empty() {
        tenant.to_string()
    } else {
        format!("{tenant}'s key {key}")
    }
}

pub async fn budget(cmd: BudgetCommand) -> anyhow::Result<()> {
    match cmd {
        BudgetCommand::Set {
            tenant,
            monthly_limit,
            thresholds,
            key,
            hard_cap,
            fail_open,
            webhook,
            conn,
        } => {
            if monthly_limit.trim().is_empty() {
                anyhow::bail!(
                    "--monthly-limit is empty; to remove a budget use `tollgate budget remove`"
                );
            }
            let generation = conn
                .client()?
                .set_budget(state::SetBudget {
                    tenant: tenant.clone(),
                    monthly_limit: monthly_limit.clone(),
                    thresholds,
                    hard_cap,
                    webhook,
                    fail_open,
                    key: key.clone(),
                })
                .await?;
            let cap = if hard_cap { ", hard cap" } else { "" };
            let whose = whose(&tenant, &key);
            println!(
                "Budget of {whose}: {monthly_limit} per month{cap} (generation {generation})."
            );
        }
        BudgetCommand::Remove { tenant, key, conn } => {
            let generation = conn
                .client()?
                .set_budget(state::SetBudget {
                    tenant: tenant.clone(),
                    key: key.clone(),
                    ..state::SetBudget::default()
                })
                .await?;
            let whose = whose(&tenant, &key);
            println!("Budget of {whose} removed (generation {generation}).");
        }
        BudgetCommand::List { output, conn } => {
            let reply = conn.client()?.list_budgets().await?;
            let mut rows = vec![
                [
                    "TENANT",
                    "KEY",
                    "MONTHLY LIMIT",
                    "SPENT",
                    "USED %",
                    "THRESHOLDS",
                    "ALERTED",
                    "HARD CAP",
                    "CAPPED",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for b in &reply.budgets {
                let s = b.budget.clone().unwrap_or_default();
                let list = |v: &[u32]| {
                    or_dash(&v.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
                };
                rows.push(vec![
                    s.tenant.clone(),
                    or_dash(&s.key),
                    s.monthly_limit.clone(),
                    b.spent.clone(),
                    format!("{:.1}", b.used_percent),
                    list(&s.thresholds),
                    list(&s.alerted),
                    s.hard_cap.to_string(),
                    s.capped.to_string(),
                ]);
            }
            print_rows(&rows, output)?;
        }
    }
    Ok(())
}

pub async fn version_status(
    api: String,
    version: Option<String>,
    since: String,
    until: String,
    output: ReportOutput,
    conn: Connection,
) -> anyhow::Result<()> {
    let reply = conn
        .client()?
        .version_status(cp::VersionStatusRequest {
            api,
            version: version.unwrap_or_default(),
            since,
            until,
        })
        .await?;
    // LLM versions get their time to first token and tokens too.
    let llm = reply
        .versions
        .iter()
        .any(|v| v.input_tokens + v.output_tokens > 0 || v.ttft_p99_ms > 0.0);
    let mut header = [
        "VERSION",
        "STAGE",
        "REQUESTS",
        "5XX",
        "4XX",
        "ERROR RATE",
        "P50 MS",
        "P99 MS",
    ]
    .map(String::from)
    .to_vec();
    if llm {
        header.extend(
            [
                "TTFT P50 MS",
                "TTFT P99 MS",
                "INPUT TOK",
                "OUTPUT TOK",
                "OUT TOK/S",
            ]
            .map(String::from),
        );
    }
    let mut rows = vec![header];
    for v in &reply.versions {
        let mut row = vec![
            v.version.clone(),
            or_dash(&v.stage),
            v.requests.to_string(),
            v.errors_5xx.to_string(),
            v.client_errors_4xx.to_string(),
            format!("{:.4}", v.error_rate),
            format!("{:.3}", v.p50_ms),
            format!("{:.3}", v.p99_ms),
        ];
        if llm {
            row.extend([
                format!("{:.3}", v.ttft_p50_ms),
                format!("{:.3}", v.ttft_p99_ms),
                v.input_tokens.to_string(),
                v.output_tokens.to_string(),
                format!("{:.1}", v.output_tokens_per_s),
            ]);
        }
        rows.push(row);
    }
    print_rows(&rows, output)
}

/// `tollgate models list`.
pub async fn list_models(
    api: String,
    since: String,
    until: String,
    output: ReportOutput,
    conn: Connection,
) -> anyhow::Result<()> {
    let reply = conn
        .client()?
        .list_models(cp::ListModelsRequest { api, since, until })
        .await?;
    let mut rows = vec![
        [
            "API",
            "VERSION",
            "MODEL",
            "DEPLOYMENT",
            "PROVIDER",
            "CALLS",
            "ERROR RATE",
            "TTFT P50 MS",
            "TTFT P99 MS",
            "TOKENS/MIN",
            "CIRCUIT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for m in &reply.models {
        rows.push(vec![
            m.api.clone(),
            m.version.clone(),
            m.model.clone(),
            m.deployment.clone(),
            or_dash(&m.provider),
            m.calls.to_string(),
            format!("{:.4}", m.error_rate),
            format!("{:.3}", m.ttft_p50_ms),
            format!("{:.3}", m.ttft_p99_ms),
            format!("{:.1}", m.tokens_per_min),
            m.circuit.clone(),
        ]);
    }
    if output == ReportOutput::Table && reply.models.is_empty() {
        println!("No LLM API has models yet.");
        return Ok(());
    }
    print_rows(&rows, output)
}

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Per model and deployment of each LLM API version: calls, error rate, time to first
    /// token, tokens per minute and circuit state.
    List {
        /// Only this API.
        #[arg(long, default_value = "")]
        api: String,
        /// Start: an RFC 3339 time or a duration back from now [default: 1h]
        #[arg(long, default_value = "")]
        since: String,
        /// End: the same forms [default: now]
        #[arg(long, default_value = "")]
        until: String,
        #[arg(long, value_enum, default_value_t)]
        output: ReportOutput,
        #[command(flatten)]
        conn: Connection,
    },
}

pub async fn models(cmd: ModelsCommand) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::List {
            api,
            since,
            until,
            output,
            conn,
        } => list_models(api, since, until, output, conn).await,
    }
}
