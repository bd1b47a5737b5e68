//! `tollgate report`: the hypercare report for the daily meeting (docs/hypercare.md), in
//! Markdown or self-contained HTML (inline SVG charts, no external asset), on demand or
//! every `--every` to a webhook. Built from the control plane's answers: the analysis of
//! the rollups, the rollouts and alerts in the state, and the call log.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use tollgate_sdk::{ControlPlaneClient, cp, node, state};

use crate::billing::Connection;
use crate::logs::time_text;

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Md,
    Html,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The range: a duration back from now (`24h`) or an RFC 3339 time.
    #[arg(long, default_value = "24h")]
    pub since: String,
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
    /// Write it here instead of stdout.
    #[arg(long, short = 'o')]
    pub out: Option<std::path::PathBuf>,
    /// Make a report every this long (`24h`) and POST it to --webhook, until stopped.
    #[arg(long, value_parser = humantime::parse_duration, requires = "webhook")]
    pub every: Option<Duration>,
    /// Where --every sends each report (its body; Content-Type text/markdown or text/html).
    #[arg(long)]
    pub webhook: Option<String>,
    #[command(flatten)]
    pub conn: Connection,
}

/// What the report says, gathered first and rendered after.
struct Data {
    since: String,
    generated: String,
    by_version: cp::AnalyzeReply,
    by_tenant: cp::AnalyzeReply,
    by_model: cp::AnalyzeReply,
    rollouts: cp::ListRolloutsReply,
    /// (api@version, error code) -> sample calls.
    error_samples: Vec<(String, String, u64, Vec<node::CallRecord>)>,
    slowest: Vec<node::CallRecord>,
}

fn figures(g: &cp::AnalysisGroup) -> cp::AnalysisFigures {
    g.figures.clone().unwrap_or_default()
}

fn in_range(r: &state::RolloutState, since_ms: u64) -> bool {
    r.started_ms >= since_ms || r.ended_ms == 0 || r.ended_ms >= since_ms
}

async fn gather(client: &ControlPlaneClient, since: &str) -> anyhow::Result<Data> {
    let analyze = |by: &str, baseline: &str| cp::AnalyzeQuery {
        since: since.to_string(),
        group_by: by.into(),
        baseline: baseline.into(),
        ..Default::default()
    };
    let by_version = client
        .analyze(analyze("version", "previous_version"))
        .await?;
    let by_tenant = client.analyze(analyze("tenant", "none")).await?;
    let by_model = client.analyze(analyze("model", "none")).await?;
    let rollouts = client.list_rollouts("").await?;
    let since_us = by_version.since_ms * 1000;
    // Sample calls of each version's top errors, with their trace ids.
    let mut error_samples = Vec::new();
    for g in &by_version.groups {
        for e in figures(g).top_errors.iter().take(3) {
            let calls = client
                .query_calls(node::CallQuery {
                    since_us,
                    api: g.api.clone(),
                    version: g.version.clone(),
                    error: if e.code.starts_with("status_") {
                        String::new()
                    } else {
                        e.code.clone()
                    },
                    status: e
                        .code
                        .strip_prefix("status_")
                        .map(str::to_string)
                        .unwrap_or_default(),
                    limit: 3,
                    ..Default::default()
                })
                .await
                .map(|r| r.records)
                .unwrap_or_default();
            error_samples.push((
                format!("{}@{}", g.api, g.version),
                e.code.clone(),
                e.count,
                calls,
            ));
        }
    }
    let slowest = client
        .query_calls(node::CallQuery {
            since_us,
            slowest: 100,
            ..Default::default()
        })
        .await
        .map(|r| r.records)
        .unwrap_or_default();
    Ok(Data {
        since: since.to_string(),
        generated: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        by_version,
        by_tenant,
        by_model,
        rollouts,
        error_samples,
        slowest,
    })
}

/// A table: a header and rows of cells (already escaped for the format).
struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

fn pct(x: f64) -> String {
    format!("{:.3}%", x * 100.0)
}

fn esc_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn esc_md(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The sections, in order: (title, a paragraph, tables).
fn sections(d: &Data) -> Vec<(String, String, Vec<Table>)> {
    let mut out = Vec::new();
    let total: u64 = d
        .by_version
        .groups
        .iter()
        .map(|g| figures(g).requests)
        .sum();
    let errors: u64 = d.by_version.groups.iter().map(|g| figures(g).errors).sum();
    let rollouts: Vec<&state::RolloutState> = d
        .rollouts
        .rollouts
        .iter()
        .chain(&d.rollouts.history)
        .filter(|r| in_range(r, d.by_version.since_ms))
        .collect();
    let alerts: Vec<&state::VersionAlert> = d
        .rollouts
        .alerts
        .iter()
        .filter(|a| a.raised_ms >= d.by_version.since_ms || a.firing)
        .collect();
    let count = |phase: &str| rollouts.iter().filter(|r| r.phase == phase).count();
    out.push((
        "Summary".to_string(),
        format!(
            "{total} requests to API versions, {errors} answered 5xx ({}); {} rollouts ({} promoted, {} rolled back, {} running, {} paused, {} aborted); {} anomaly alerts.",
            if total == 0 { "-".into() } else { pct(errors as f64 / total as f64) },
            rollouts.len(),
            count("promoted"),
            count("rolled_back"),
            count("running"),
            count("paused"),
            count("aborted"),
            alerts.len()
        ),
        Vec::new(),
    ));

    let mut tables = Vec::new();
    for r in &rollouts {
        let mut t = Table {
            head: vec!["time", "action", "step", "canary weight", "by", "reason"],
            rows: Vec::new(),
        };
        for x in &r.decisions {
            t.rows.push(vec![
                time_text(x.at_ms * 1000),
                x.action.clone(),
                (x.step + 1).to_string(),
                format!("{}%", x.weight),
                x.by.clone(),
                x.reason.clone(),
            ]);
        }
        tables.push(t);
        let verdict = r.decisions.iter().rev().find_map(|x| x.evidence.as_ref());
        if let Some(e) = verdict {
            let mut t = Table {
                head: vec![
                    "metric",
                    "canary bad",
                    "stable bad",
                    "worse",
                    "within",
                    "threshold",
                ],
                rows: Vec::new(),
            };
            for m in &e.metrics {
                t.rows.push(vec![
                    m.metric.clone(),
                    format!("{} of {}", m.canary_bad, m.canary_requests),
                    format!("{} of {}", m.stable_bad, m.stable_requests),
                    format!("{:.2}", m.worse_statistic.max(-999.0)),
                    format!("{:.2}", m.within_statistic.max(-999.0)),
                    format!("{:.2}", e.log_threshold),
                ]);
            }
            tables.push(t);
            if !e.failing.is_empty() {
                let mut t = Table {
                    head: vec![
                        "failing call (request id)",
                        "trace id",
                        "status",
                        "error",
                        "node",
                    ],
                    rows: Vec::new(),
                };
                for f in &e.failing {
                    t.rows.push(vec![
                        f.request_id.clone(),
                        f.trace_id.clone(),
                        f.status.to_string(),
                        f.error.clone(),
                        f.node_id.to_string(),
                    ]);
                }
                tables.push(t);
            }
        }
    }
    let text = if rollouts.is_empty() {
        "No rollout in the range.".to_string()
    } else {
        rollouts
            .iter()
            .map(|r| format!("{}: {} against {}, {}.", r.api, r.canary, r.stable, r.phase))
            .collect::<Vec<_>>()
            .join(" ")
    };
    out.push(("Releases and rollouts".into(), text, tables));

    let mut t = Table {
        head: vec![
            "API@version",
            "requests",
            "availability",
            "error rate",
            "vs the version before",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "top errors",
        ],
        rows: Vec::new(),
    };
    for g in &d.by_version.groups {
        let f = figures(g);
        t.rows.push(vec![
            format!("{}@{}", g.api, g.version),
            f.requests.to_string(),
            pct(1.0 - f.error_rate),
            pct(f.error_rate),
            match &g.baseline {
                Some(b) => format!("{}: {}", g.baseline_of, pct(b.error_rate)),
                None => "-".into(),
            },
            format!("{:.2}", f.p50_ms),
            format!("{:.2}", f.p95_ms),
            format!("{:.2}", f.p99_ms),
            f.top_errors
                .iter()
                .map(|e| format!("{} {}", e.code, e.count))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    out.push((
        "Versions".into(),
        "Availability is the share of requests not answered 5xx; latency is request received to last byte sent.".into(),
        vec![t],
    ));

    let mut t = Table {
        head: vec![
            "API@version",
            "error",
            "count",
            "sample calls (request id, trace id)",
        ],
        rows: Vec::new(),
    };
    for (v, code, n, calls) in &d.error_samples {
        t.rows.push(vec![
            v.clone(),
            code.clone(),
            n.to_string(),
            calls
                .iter()
                .map(|c| {
                    if c.trace_id.is_empty() {
                        c.request_id.clone()
                    } else {
                        format!("{} (trace {})", c.request_id, c.trace_id)
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
        ]);
    }
    out.push((
        "Top errors".into(),
        "Each version's most frequent errors, with calls from the call log.".into(),
        vec![t],
    ));

    // Slowest routes: among the 100 slowest calls of the range.
    let mut by_route: std::collections::BTreeMap<String, (u64, u64, String)> = Default::default();
    for c in &d.slowest {
        // A version's routes are named api@version/route already.
        let name = if c.route.is_empty() {
            "(no route)".to_string()
        } else {
            c.route.clone()
        };
        let e = by_route.entry(name).or_insert((0, 0, String::new()));
        e.0 += 1;
        if c.duration_us > e.1 {
            e.1 = c.duration_us;
            e.2 = c.request_id.clone();
        }
    }
    let mut routes: Vec<_> = by_route.into_iter().collect();
    routes.sort_by_key(|r| std::cmp::Reverse(r.1.1));
    let mut t = Table {
        head: vec![
            "route",
            "among the 100 slowest calls",
            "slowest ms",
            "its request id",
        ],
        rows: Vec::new(),
    };
    for (name, (n, us, id)) in routes.into_iter().take(15) {
        t.rows.push(vec![
            name,
            n.to_string(),
            format!("{:.1}", us as f64 / 1000.0),
            id,
        ]);
    }
    out.push((
        "Slowest routes".into(),
        "From the call log of every node.".into(),
        vec![t],
    ));

    let cost_table = |reply: &cp::AnalyzeReply,
                      what: &'static str,
                      name: &dyn Fn(&cp::AnalysisGroup) -> String| {
        let mut t = Table {
            head: vec![what, "requests", "input tokens", "output tokens", "cost"],
            rows: Vec::new(),
        };
        for g in &reply.groups {
            let f = figures(g);
            t.rows.push(vec![
                name(g),
                f.requests.to_string(),
                f.input_tokens.to_string(),
                f.output_tokens.to_string(),
                if f.cost.is_empty() {
                    "-".into()
                } else {
                    format!("{} {}", f.cost, f.currency)
                },
            ]);
        }
        t
    };
    out.push((
        "Cost".into(),
        "At each tenant's prices (tenants on no plan cost nothing here).".into(),
        vec![
            cost_table(&d.by_tenant, "tenant", &|g| {
                if g.tenant.is_empty() {
                    "(none)".into()
                } else {
                    g.tenant.clone()
                }
            }),
            cost_table(&d.by_model, "model", &|g| g.model.clone()),
        ],
    ));

    let mut t = Table {
        head: vec!["raised", "version", "metric", "state", "summary", "calls"],
        rows: Vec::new(),
    };
    for a in &alerts {
        let raise = a.raise.clone().unwrap_or_default();
        t.rows.push(vec![
            time_text(a.raised_ms * 1000),
            format!("{}@{}", a.api, a.version),
            a.metric.clone(),
            if a.firing {
                "firing".into()
            } else {
                "resolved".into()
            },
            raise.summary.clone(),
            raise
                .calls
                .iter()
                .take(3)
                .map(|c| c.request_id.clone())
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    out.push((
        "Alerts".into(),
        if alerts.is_empty() {
            "No anomaly alert in the range.".into()
        } else {
            String::new()
        },
        vec![t],
    ));
    out
}

fn markdown(d: &Data) -> String {
    let mut s = format!(
        "# Hypercare report\n\nFrom {} to {} (--since {}), generated {}.\n",
        time_text(d.by_version.since_ms * 1000),
        time_text(d.by_version.until_ms * 1000),
        d.since,
        d.generated
    );
    for (title, text, tables) in sections(d) {
        let _ = write!(s, "\n## {title}\n\n");
        if !text.is_empty() {
            let _ = writeln!(s, "{text}\n");
        }
        for t in tables {
            if t.rows.is_empty() {
                continue;
            }
            let _ = writeln!(s, "| {} |", t.head.join(" | "));
            let _ = writeln!(s, "|{}", "---|".repeat(t.head.len()));
            for r in &t.rows {
                let cells: Vec<String> = r.iter().map(|c| esc_md(c)).collect();
                let _ = writeln!(s, "| {} |", cells.join(" | "));
            }
            s.push('\n');
        }
    }
    s
}

/// Requests (blue) and 5xx (red) per bucket for one version, as an inline SVG bar chart.
fn chart(g: &cp::AnalysisGroup, bucket: &str) -> String {
    let (w, h, pad) = (480.0, 120.0, 20.0);
    let points = &g.series;
    if points.is_empty() {
        return String::new();
    }
    let max = points.iter().map(|p| p.requests).max().unwrap_or(1).max(1) as f64;
    let slot = (w - 2.0 * pad) / points.len() as f64;
    let bar = |i: usize, v: u64, color: &str| {
        let height = (h - 2.0 * pad) * v as f64 / max;
        format!(
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
            pad + slot * i as f64,
            h - pad - height,
            (slot * 0.8).max(0.5),
            height
        )
    };
    let bars: String = points
        .iter()
        .enumerate()
        .map(|(i, p)| bar(i, p.requests, "#2b6cb0") + &bar(i, p.errors, "#c53030"))
        .collect();
    format!(
        r##"<figure><svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="requests and errors of {name}"><rect width="{w}" height="{h}" fill="#fafafa"/>{bars}<text x="{pad}" y="14" font-size="11">{name}: requests (blue) and 5xx (red) per {bucket}, up to {max}</text></svg></figure>"##,
        name = esc_html(&format!("{}@{}", g.api, g.version)),
        max = max as u64,
    )
}

fn html(d: &Data) -> String {
    let mut s = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Hypercare report</title><style>body{font:14px system-ui,sans-serif;margin:2em;max-width:72em}table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}th{background:#eee}figure{margin:.5em 0}</style></head><body>",
    );
    let _ = write!(
        s,
        "<h1>Hypercare report</h1><p>From {} to {} (--since {}), generated {}.</p>",
        time_text(d.by_version.since_ms * 1000),
        time_text(d.by_version.until_ms * 1000),
        esc_html(&d.since),
        esc_html(&d.generated)
    );
    for (title, text, tables) in sections(d) {
        let _ = write!(s, "<h2>{}</h2>", esc_html(&title));
        if !text.is_empty() {
            let _ = write!(s, "<p>{}</p>", esc_html(&text));
        }
        if title == "Versions" {
            for g in &d.by_version.groups {
                s += &chart(g, &d.by_version.bucket);
            }
        }
        for t in tables {
            if t.rows.is_empty() {
                continue;
            }
            s += "<table><tr>";
            for h in &t.head {
                let _ = write!(s, "<th>{}</th>", esc_html(h));
            }
            s += "</tr>";
            for r in &t.rows {
                s += "<tr>";
                for c in r {
                    let _ = write!(s, "<td>{}</td>", esc_html(c));
                }
                s += "</tr>";
            }
            s += "</table>";
        }
    }
    s += "</body></html>\n";
    s
}

async fn render(client: &ControlPlaneClient, args: &ReportArgs) -> anyhow::Result<String> {
    let d = gather(client, &args.since).await?;
    Ok(match args.format {
        Format::Md => markdown(&d),
        Format::Html => html(&d),
    })
}

pub async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let Some(every) = args.every else {
        let text = render(&client, &args).await?;
        match &args.out {
            Some(path) => std::fs::write(path, text)?,
            None => print!("{text}"),
        }
        return Ok(());
    };
    let webhook = args.webhook.clone().unwrap_or_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let kind = match args.format {
        Format::Md => "text/markdown; charset=utf-8",
        Format::Html => "text/html; charset=utf-8",
    };
    loop {
        match render(&client, &args).await {
            Ok(text) => {
                let sent = http
                    .post(&webhook)
                    .header("content-type", kind)
                    .body(text)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        eprintln!("tollgate report: sent to {webhook}")
                    }
                    Ok(r) => eprintln!("tollgate report: {webhook} answered {}", r.status()),
                    Err(e) => eprintln!("tollgate report: {webhook}: {e}"),
                }
            }
            Err(e) => eprintln!("tollgate report: {e:#}"),
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
