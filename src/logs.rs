//! `tollgate logs`: the call log of every node, through the control plane (docs/calls.md).

use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tollgate_sdk::cp;
use tollgate_sdk::node::CallQuery;

use crate::billing::Connection;

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum LogsOutput {
    #[default]
    Table,
    /// One JSON object per line.
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Start: an RFC 3339 time or a duration back from now (`1h`, `30m`) [default: 24h;
    /// with --trace-id or --request-id: as far back as the log goes]
    #[arg(long, default_value = "")]
    pub since: String,
    /// End: the same forms [default: now]
    #[arg(long, default_value = "")]
    pub until: String,
    #[arg(long, default_value = "")]
    pub api: String,
    /// An API version, e.g. 1.1.0.
    #[arg(long = "api-version", default_value = "")]
    pub version: String,
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// An API key's id (as `tollgate key list` shows it).
    #[arg(long, default_value = "")]
    pub key: String,
    /// An LLM model, as callers name it.
    #[arg(long, default_value = "")]
    pub model: String,
    /// A status (`404`) or a status class (`5xx`).
    #[arg(long, default_value = "")]
    pub status: String,
    /// The gateway's error code (`upstream_timeout`, `quota_exceeded`, ...).
    #[arg(long, default_value = "")]
    pub error: String,
    /// All calls of one W3C trace (32 hex digits).
    #[arg(long, default_value = "")]
    pub trace_id: String,
    /// One call, by the `x-request-id` the gateway answered with.
    #[arg(long, default_value = "")]
    pub request_id: String,
    /// Only calls that took at least this long, e.g. `250ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_duration: Option<Duration>,
    /// The N slowest calls instead of the newest.
    #[arg(long)]
    pub slowest: Option<u32>,
    /// Most calls to show [default: 100]
    #[arg(long)]
    pub limit: Option<u32>,
    /// Keep printing new calls as the nodes record them (Ctrl-C stops).
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: LogsOutput,
    #[command(flatten)]
    pub conn: Connection,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `24h` back from now, or an RFC 3339 time, in microseconds since the epoch.
fn parse_time(what: &str, text: &str) -> anyhow::Result<u64> {
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(now_us().saturating_sub(d.as_micros() as u64));
    }
    match humantime::parse_rfc3339_weak(text) {
        Ok(t) => Ok(t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)),
        Err(_) => anyhow::bail!(
            "--{what} {text:?}: give a duration back from now (1h, 30m) or an RFC 3339 time (2026-12-07T10:00:00Z)"
        ),
    }
}

impl LogsArgs {
    fn query(&self) -> anyhow::Result<CallQuery> {
        let by_id = !self.trace_id.is_empty() || !self.request_id.is_empty();
        let since = match (self.since.as_str(), by_id || self.follow) {
            ("", true) => 0,
            ("", false) => now_us() - 24 * 3_600_000_000,
            (s, _) => parse_time("since", s)?,
        };
        let until = match self.until.as_str() {
            "" => 0,
            s => parse_time("until", s)?,
        };
        Ok(CallQuery {
            since_us: since,
            until_us: until,
            api: self.api.clone(),
            version: self.version.clone(),
            tenant: self.tenant.clone(),
            key_id: self.key.clone(),
            model: self.model.clone(),
            status: self.status.clone(),
            error: self.error.clone(),
            trace_id: self.trace_id.to_ascii_lowercase(),
            request_id: self.request_id.to_ascii_lowercase(),
            min_duration_us: self.min_duration.map_or(0, |d| d.as_micros() as u64),
            slowest: self.slowest.unwrap_or(0),
            limit: self.limit.unwrap_or(0),
            follow: false,
            after: 0,
        })
    }
}

pub fn time_text(us: u64) -> String {
    humantime::format_rfc3339_micros(SystemTime::UNIX_EPOCH + Duration::from_micros(us)).to_string()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A record as JSON (and the CSV columns, in this order).
fn record_json(r: &tollgate_sdk::node::CallRecord) -> Value {
    let mut v = json!({
        "time": time_text(r.time_us),
        "node": r.node_id,
        "request_id": r.request_id,
        "trace_id": r.trace_id,
        "tenant": r.tenant,
        "api": r.api,
        "version": r.version,
        "key": r.key_id,
        "route": r.route,
        "method": r.method,
        "host": r.host,
        "path": r.path,
        "protocol": r.protocol,
        "status": r.status,
        "error": r.error,
        "duration_ms": ms(r.duration_us),
        "upstream_ms": r.upstream_us.map(ms),
        "request_bytes": r.request_bytes,
        "response_bytes": r.response_bytes,
        "client": tollgate_node::calls::client_text(r),
        "upstream": r.upstream,
        "attempts": r.attempts,
        "model": r.model,
        "provider": r.provider,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cost": tollgate_node::state::billing::format_atto(r.cost_nanos.max(0) as u128 * 1_000_000_000),
    });
    let headers = |h: &[tollgate_sdk::node::CapturedHeader]| {
        Value::Array(h.iter().map(|h| json!([h.name, h.value])).collect())
    };
    if !r.request_headers.is_empty() || !r.response_headers.is_empty() {
        v["request_headers"] = headers(&r.request_headers);
        v["response_headers"] = headers(&r.response_headers);
    }
    if !r.request_body.is_empty() || !r.response_body.is_empty() {
        v["request_body"] = String::from_utf8_lossy(&r.request_body).into();
        v["request_body_truncated"] = r.request_body_truncated.into();
        v["response_body"] = String::from_utf8_lossy(&r.response_body).into();
        v["response_body_truncated"] = r.response_body_truncated.into();
    }
    v
}

const CSV_COLUMNS: &[&str] = &[
    "time",
    "node",
    "request_id",
    "trace_id",
    "tenant",
    "api",
    "version",
    "key",
    "route",
    "method",
    "host",
    "path",
    "protocol",
    "status",
    "error",
    "duration_ms",
    "upstream_ms",
    "request_bytes",
    "response_bytes",
    "client",
    "upstream",
    "attempts",
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "cost",
];

struct Printer {
    output: LogsOutput,
    csv: Option<csv::Writer<std::io::Stdout>>,
    header_done: bool,
}

impl Printer {
    fn new(output: LogsOutput) -> Printer {
        Printer {
            output,
            csv: (output == LogsOutput::Csv).then(|| csv::Writer::from_writer(std::io::stdout())),
            header_done: false,
        }
    }

    fn print(&mut self, records: &[tollgate_sdk::node::CallRecord]) -> anyhow::Result<()> {
        match self.output {
            LogsOutput::Json => {
                for r in records {
                    println!("{}", record_json(r));
                }
            }
            LogsOutput::Csv => {
                let w = self.csv.as_mut().expect("a CSV writer");
                if !self.header_done {
                    w.write_record(CSV_COLUMNS)?;
                    self.header_done = true;
                }
                for r in records {
                    let v = record_json(r);
                    w.write_record(CSV_COLUMNS.iter().map(|c| match &v[*c] {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    }))?;
                }
                w.flush()?;
            }
            LogsOutput::Table => {
                if !self.header_done {
                    println!(
                        "{:<27} {:>4} {:>6} {:>10}  {:<6} {:<32} {:<20} {:<12} {:<22} REQUEST ID",
                        "TIME",
                        "NODE",
                        "STATUS",
                        "DURATION",
                        "METHOD",
                        "PATH",
                        "API@VERSION",
                        "TENANT",
                        "ERROR"
                    );
                    self.header_done = true;
                }
                for r in records {
                    let api = match (r.api.as_str(), r.version.as_str()) {
                        ("", _) => format!("route {}", r.route),
                        (a, "") => a.to_string(),
                        (a, v) => format!("{a}@{v}"),
                    };
                    println!(
                        "{:<27} {:>4} {:>6} {:>8.1}ms  {:<6} {:<32} {:<20} {:<12} {:<22} {}",
                        time_text(r.time_us),
                        r.node_id,
                        r.status,
                        ms(r.duration_us),
                        r.method,
                        cut(&r.path, 32),
                        cut(&api, 20),
                        cut(&r.tenant, 12),
                        cut(&r.error, 22),
                        r.request_id
                    );
                }
            }
        }
        Ok(())
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut out: String = s.chars().take(n - 1).collect();
    out.push('…');
    out
}

/// Says on stderr what the merged answer left out, so it never reads as complete when it
/// is not.
fn warn(reply: &cp::CallsReply) {
    for m in &reply.missing {
        eprintln!("tollgate logs: not included, {m}");
    }
    if reply.truncated {
        eprintln!(
            "tollgate logs: a node stopped after looking at its scan bound; narrow --since/--until or ask by --trace-id or --request-id"
        );
    }
    if reply.missed > 0 {
        eprintln!(
            "tollgate logs: {} calls were recorded faster than they could be followed and are not shown (query them with --since)",
            reply.missed
        );
    }
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let q = args.query()?;
    let mut printer = Printer::new(args.output);
    if !args.follow {
        let reply = client.query_calls(q).await?;
        if reply.records.is_empty() && args.output == LogsOutput::Table {
            eprintln!("no calls match (asked {} nodes)", reply.nodes);
        } else {
            printer.print(&reply.records)?;
        }
        if reply.dropped > 0 {
            eprintln!(
                "tollgate logs: the nodes dropped {} records since they started (their writers fell behind; see tollgate_call_log_dropped_total)",
                reply.dropped
            );
        }
        warn(&reply);
        return Ok(());
    }
    let mut stream = client.follow_calls(q).await?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            next = stream.message() => match next {
                Ok(Some(reply)) => {
                    printer.print(&reply.records)?;
                    warn(&reply);
                }
                Ok(None) => return Ok(()),
                Err(s) => anyhow::bail!("following stopped: {}", s.message()),
            }
        }
    }
}
