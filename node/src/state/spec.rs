//! The declarative spec: routes, upstream clusters and their policies, as an operator
//! writes them (YAML). Documented field by field in `docs/spec.md`.
//!
//! Objects are keyed by stable names (`routes.<name>`, `upstreams.<name>`) so that a later
//! `tollgate apply` can diff two specs object by object. Parsing never stops at the first
//! problem: every object is decoded on its own and then checked as a whole, and
//! [`SpecErrors`] lists every error with the path of the offending field.
//!
//! This module only reads and checks; compiling a spec into what the data plane runs is
//! [`crate::state::snapshot`]'s job.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_yaml_ng::Value;

/// A whole spec: everything the data plane routes by.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spec {
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    pub routes: BTreeMap<String, RouteSpec>,
    pub quotas: BTreeMap<String, QuotaSpec>,
    /// Where tenants' API versions may send requests (the cluster's spec only).
    pub tenant_upstreams: crate::state::egress::TenantUpstreams,
    /// Certificates the proxy serves over HTTPS (the cluster's spec only).
    pub certificates: BTreeMap<String, crate::state::tls::CertificateSpec>,
    /// Per host name: HTTPS redirect and HSTS (the cluster's spec only).
    pub hosts: BTreeMap<String, crate::state::tls::HostSpec>,
    /// LLM providers (an API version's content only): docs/llm.md.
    pub providers: BTreeMap<String, crate::llm::spec::ProviderSpec>,
    /// Model names callers use, over the providers' deployments (a version's content only).
    pub models: BTreeMap<String, crate::llm::spec::ModelSpec>,
    /// Prompt APIs over the models (a version's content only).
    pub prompts: BTreeMap<String, crate::llm::prompt::PromptSpec>,
    /// The version's LLM answers are cached on each node (a version's content only).
    pub response_cache: Option<crate::llm::spec::ResponseCacheSpec>,
    /// Secrets and PII in prompts are masked or refused (a version's content only).
    pub prompt_guard: Option<crate::llm::guard::GuardSpec>,
    /// What the call log keeps of the version's calls beyond the record (a version's
    /// content only): docs/calls.md.
    pub call_log: Option<crate::calls::capture::CallLogSpec>,
    /// Anomaly alerts on the version's own history (a version's content only).
    pub alerts: Option<crate::rollout::anomaly::AlertSpec>,
}

// === quotas ===

/// A cluster-wide limit: at most `limit` requests per `window` for each value of `scope`
/// (each API key, each tenant, ...), across every node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// What one counter is kept for.
    pub scope: QuotaScope,
    /// Requests allowed per window, at least 1.
    pub limit: i64,
    pub window: QuotaWindow,
    /// Default: `gcra` for second windows, `window` counters for longer ones.
    #[serde(default)]
    pub algorithm: Option<QuotaAlgorithm>,
    /// GCRA only: the most requests admitted at once above the steady rate (1 to `limit`;
    /// default a tenth of the limit, at least 1).
    #[serde(default)]
    pub burst: Option<i64>,
    /// What a node does while it cannot reach the quota's owner. Default: `open`.
    #[serde(default)]
    pub fail: FailMode,
    /// `global` (default): one limit for the cluster; `region`: one per region.
    #[serde(default)]
    pub per: QuotaPer,
    /// Which requests count: routes of the spec and APIs, by name (both empty: all).
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub apis: Vec<String>,
    /// What the limit counts: requests (default), or an LLM API's tokens (`tokens` for
    /// input and output together, `input_tokens`, `output_tokens`).
    #[serde(default)]
    pub unit: QuotaUnit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaUnit {
    #[default]
    Requests,
    Tokens,
    InputTokens,
    OutputTokens,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    /// Each API key.
    Key,
    /// Each tenant.
    Tenant,
    /// Each route (or API) as a whole.
    Route,
    /// Each version of an API.
    ApiVersion,
    /// Each model of an LLM API (the name callers ask for).
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaWindow {
    Second,
    Minute,
    Hour,
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaAlgorithm {
    /// Generic cell rate (a token bucket without a refill timer): smooth, for short windows.
    Gcra,
    /// A counter per calendar window: for hours, days and months.
    Window,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Admit on the node's last lease and a local share of the limit.
    #[default]
    Open,
    /// Refuse what the node's lease does not cover.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPer {
    #[default]
    Global,
    Region,
}

impl QuotaSpec {
    /// The algorithm that runs: the one set, else the window's default.
    pub fn algorithm(&self) -> QuotaAlgorithm {
        self.algorithm.unwrap_or(match self.window {
            QuotaWindow::Second => QuotaAlgorithm::Gcra,
            _ => QuotaAlgorithm::Window,
        })
    }

    /// The GCRA burst that runs: the one set, else a tenth of the limit (at least 1).
    pub fn burst(&self) -> u64 {
        let limit = self.limit.max(1) as u64;
        match self.burst {
            Some(b) => (b.max(1) as u64).min(limit),
            None => (limit / 10).max(1),
        }
    }

    /// The window's length in ms (a month is a calendar month; this is its nominal 30 days).
    pub fn window_ms(&self) -> u64 {
        match self.window {
            QuotaWindow::Second => 1_000,
            QuotaWindow::Minute => 60_000,
            QuotaWindow::Hour => 3_600_000,
            QuotaWindow::Day => 86_400_000,
            QuotaWindow::Month => 30 * 86_400_000,
        }
    }
}

// === routes ===

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[serde(rename = "match")]
    pub matches: MatchSpec,
    /// The upstream cluster (a key of `upstreams`) this route forwards to.
    pub upstream: String,
    /// Breaks ties between equally specific routes: higher wins.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub rewrite: Option<RewriteSpec>,
    #[serde(default)]
    pub request_headers: HeaderOpsSpec,
    #[serde(default)]
    pub response_headers: HeaderOpsSpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Exact host names or `*.suffix` wildcards; empty means any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub path: PathSpec,
    /// Empty means any method.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatchSpec>,
}

/// Exactly one of the three is set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    /// The path must equal this string.
    #[serde(default)]
    pub exact: Option<String>,
    /// The path is this prefix, or continues it with `/`: `/api` matches `/api` and
    /// `/api/x`, never `/apix`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Segments in braces match one segment each: `/users/{id}/posts`.
    #[serde(default)]
    pub template: Option<String>,
}

/// A path match, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Template(&'a str),
}

impl PathSpec {
    /// The one kind of match that is set (`None` if zero or several are).
    pub fn kind(&self) -> Option<PathKind<'_>> {
        match (&self.exact, &self.prefix, &self.template) {
            (Some(p), None, None) => Some(PathKind::Exact(p)),
            (None, Some(p), None) => Some(PathKind::Prefix(p)),
            (None, None, Some(p)) => Some(PathKind::Template(p)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchSpec {
    pub name: String,
    /// The header must have exactly this value.
    #[serde(default)]
    pub exact: Option<String>,
    /// The header value must start with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `true`: the header must be present; `false`: it must be absent.
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSpec {
    /// Remove the matched prefix (`/api/users` on prefix `/api` goes up as `/users`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the matched prefix with this one.
    #[serde(default)]
    pub replace_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsSpec {
    /// Appended, keeping any value already there.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Replace any value already there.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

// === upstreams ===

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub load_balancing: LoadBalancingSpec,
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    #[serde(default)]
    pub pool: PoolSpec,
    #[serde(default)]
    pub retries: RetrySpec,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    /// The cluster-wide circuit breaker (off when absent).
    #[serde(default)]
    pub circuit_breaker: Option<CircuitSpec>,
    /// HTTPS to the endpoints (also implied by `https://` endpoint addresses).
    #[serde(default)]
    pub tls: Option<UpstreamTlsSpec>,
}

/// How the proxy speaks TLS to an upstream's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSpec {
    /// CAs (PEM) the endpoints' certificates must chain to; default: the system's roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// The name sent in SNI and checked against the certificate; default: each
    /// endpoint's host name (or IP address, then without SNI).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Check the endpoints' certificates (default). `false` takes any certificate, with a
    /// warning at apply and in the logs.
    #[serde(default = "yes")]
    pub verify: bool,
    /// Offer HTTP/2 in ALPN (default); HTTP/1.1 is used when the endpoint does not take it.
    #[serde(default = "yes")]
    pub h2: bool,
    /// A certificate to present to the endpoints (the cluster's spec only).
    #[serde(default)]
    pub client_certificate: Option<UpstreamClientCert>,
}

/// A client certificate for an upstream: its chain and the named secret with its key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamClientCert {
    pub chain: String,
    pub key_secret: String,
}

fn yes() -> bool {
    true
}

/// A circuit breaker shared by every node: each node reports its outcomes, the circuit's
/// owner decides, and the transition is committed through Raft (docs/architecture.md,
/// decision 7).
/// It opens when any trigger fires: `consecutive_failures` in a row across the cluster, or,
/// over the last `window` with at least `min_calls` calls, a failure or slow-call rate at
/// or above its threshold. It stays open for `open_for`, then lets `half_open_probes`
/// requests through (across the cluster): all succeed, it closes; one fails, it reopens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitSpec {
    #[serde(default = "default_circuit_consecutive")]
    pub consecutive_failures: u32,
    /// Percent of calls that failed (5xx, connect errors, timeouts); default 50.
    #[serde(default = "default_circuit_rate")]
    pub failure_rate: f64,
    /// A call slower than this (to the response head) is slow; off when absent.
    #[serde(default, deserialize_with = "opt_duration")]
    pub slow_call: Option<Duration>,
    /// Percent of calls that were slow; default 100 (off unless lowered).
    #[serde(default = "default_circuit_slow_rate")]
    pub slow_call_rate: f64,
    #[serde(default = "default_circuit_min_calls")]
    pub min_calls: u32,
    #[serde(default = "default_circuit_window", deserialize_with = "duration")]
    pub window: Duration,
    #[serde(default = "default_circuit_open_for", deserialize_with = "duration")]
    pub open_for: Duration,
    #[serde(default = "default_circuit_probes")]
    pub half_open_probes: u32,
    /// The answer while open; default the JSON error `circuit_open`, 503.
    #[serde(default)]
    pub fallback: Option<FallbackSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackSpec {
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_fallback_type")]
    pub content_type: String,
}

fn default_circuit_consecutive() -> u32 {
    20
}
fn default_circuit_rate() -> f64 {
    50.0
}
fn default_circuit_slow_rate() -> f64 {
    100.0
}
fn default_circuit_min_calls() -> u32 {
    20
}
fn default_circuit_window() -> Duration {
    Duration::from_secs(10)
}
fn default_circuit_open_for() -> Duration {
    Duration::from_secs(30)
}
fn default_circuit_probes() -> u32 {
    3
}
fn default_fallback_status() -> u16 {
    503
}
fn default_fallback_type() -> String {
    "application/json".into()
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `host:port`; a host name is resolved when the spec is loaded.
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// `address`, resolved once by [`Spec::from_yaml`] (never written in a spec).
    #[serde(skip)]
    pub resolved: Option<SocketAddr>,
    /// The scheme the address was written with (`https://`, `http://`), if any.
    #[serde(skip)]
    pub scheme: Option<Scheme>,
    /// The host part of the address (a name or an IP address), for SNI.
    #[serde(skip)]
    pub host: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl EndpointSpec {
    /// The address without its scheme, with the scheme's port when it had none, and the
    /// scheme: `https://api.example.com` is `api.example.com:443`.
    pub fn split_address(address: &str) -> (String, Option<Scheme>) {
        let (rest, scheme, port) = if let Some(r) = address.strip_prefix("https://") {
            (r, Some(Scheme::Https), 443)
        } else if let Some(r) = address.strip_prefix("http://") {
            (r, Some(Scheme::Http), 80)
        } else {
            return (address.to_string(), None);
        };
        let rest = rest.trim_end_matches('/');
        let has_port = match rest.rsplit_once(':') {
            // [v6]:port, host:port; a bare IPv6 literal is in brackets.
            Some((h, p)) => {
                !h.is_empty() && p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']'))
            }
            None => false,
        };
        if has_port {
            (rest.to_string(), scheme)
        } else {
            (format!("{rest}:{port}"), scheme)
        }
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingSpec {
    #[serde(default)]
    pub policy: LbPolicy,
    /// For `consistent_hash`: the request header whose value picks the endpoint.
    #[serde(default)]
    pub hash_header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSpec {
    #[serde(default = "default_connect", deserialize_with = "duration")]
    pub connect: Duration,
    /// From sending the request until the response headers arrive.
    #[serde(default = "default_request", deserialize_with = "duration")]
    pub request: Duration,
    /// How long an unused pooled connection is kept.
    #[serde(default = "default_idle", deserialize_with = "duration")]
    pub idle: Duration,
}

fn default_connect() -> Duration {
    Duration::from_secs(2)
}
fn default_request() -> Duration {
    Duration::from_secs(30)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}

impl Default for TimeoutsSpec {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            request: default_request(),
            idle: default_idle(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Idle keep-alive connections kept per endpoint, per worker thread.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
}

fn default_max_idle() -> usize {
    128
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            max_idle_per_endpoint: default_max_idle(),
        }
    }
}

/// When a failed attempt is tried again. Written `connect_failure`, `timeout`, `502` or
/// `503` (the statuses quoted or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// The TCP connection could not be made (the request was never sent).
    ConnectFailure,
    /// The upstream answered 502.
    Status502,
    /// The upstream answered 503.
    Status503,
    /// The upstream did not answer within `timeouts.request`.
    Timeout,
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Code(u64),
            Name(String),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected connect_failure, timeout, 502 or 503")
        })?;
        let name = match raw {
            Raw::Code(c) => c.to_string(),
            Raw::Name(n) => n,
        };
        match name.as_str() {
            "connect_failure" => Ok(RetryOn::ConnectFailure),
            "timeout" => Ok(RetryOn::Timeout),
            "502" => Ok(RetryOn::Status502),
            "503" => Ok(RetryOn::Status503),
            other => Err(serde::de::Error::custom(format!(
                "unknown retry condition {other:?}; use connect_failure, timeout, 502 or 503"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Extra attempts after the first (0 turns retries off).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    #[serde(default)]
    pub budget: RetryBudgetSpec,
}

fn default_attempts() -> u32 {
    1
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure]
}

impl RetrySpec {
    /// No retries (an LLM provider's calls: its model's fallbacks decide what is tried next).
    pub fn none() -> RetrySpec {
        RetrySpec {
            attempts: 0,
            on: Vec::new(),
            budget: RetryBudgetSpec::default(),
        }
    }
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            on: default_retry_on(),
            budget: RetryBudgetSpec::default(),
        }
    }
}

/// Envoy's retry budget: retries in flight may be at most `percent` of the requests in
/// flight to the upstream, but `min_concurrency` retries are always allowed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSpec {
    #[serde(default = "default_budget_percent")]
    pub percent: f64,
    #[serde(default = "default_min_concurrency")]
    pub min_concurrency: u32,
}

fn default_budget_percent() -> f64 {
    20.0
}
fn default_min_concurrency() -> u32 {
    3
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self {
            percent: default_budget_percent(),
            min_concurrency: default_min_concurrency(),
        }
    }
}

/// Passive outlier detection: an endpoint that fails `consecutive_failures` times in a row
/// is left out for `base_ejection_time` × (number of times it was ejected, capped at 10).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    #[serde(default = "default_ejection", deserialize_with = "duration")]
    pub base_ejection_time: Duration,
    #[serde(default = "default_max_ejection")]
    pub max_ejection_percent: f64,
}

fn default_consecutive() -> u32 {
    5
}
fn default_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> f64 {
    50.0
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    pub path: String,
    #[serde(default = "default_hc_interval", deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_hc_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
    #[serde(default = "default_unhealthy")]
    pub unhealthy_threshold: u32,
    /// Statuses that count as healthy; empty means any 2xx.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
    /// The Host header of the probe; the endpoint's address when unset.
    #[serde(default)]
    pub host: Option<String>,
}

fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let parsed = humantime::parse_duration(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({e}); write it like 250ms, 5s or 1m"
        ))
    })?;
    if parsed.is_zero() {
        return Err(serde::de::Error::custom(format!(
            "duration {text:?} must be greater than zero"
        )));
    }
    Ok(parsed)
}

// === errors ===

/// One problem in a spec, with the path of the field it is about
/// (`routes.users.match.path`, or `spec` for the whole document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a spec. A spec with any error is refused whole.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(SpecError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the spec has {} error(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

// === parsing ===

/// Whether checking this document would resolve host names (blocking on DNS): true when an
/// endpoint address is not an `ip:port` literal. Callers run the check off the async
/// threads only then.
pub fn needs_dns(doc: &Value) -> bool {
    let provider_names = doc
        .get("providers")
        .and_then(Value::as_mapping)
        .is_some_and(|ps| {
            ps.values().any(|p| {
                p.get("base_url")
                    .and_then(Value::as_str)
                    .and_then(|u| u.parse::<http::Uri>().ok())
                    .and_then(|u| {
                        u.host().map(|h| {
                            h.trim_matches(['[', ']'])
                                .parse::<std::net::IpAddr>()
                                .is_err()
                        })
                    })
                    .unwrap_or(false)
            })
        });
    if provider_names {
        return true;
    }
    let Some(upstreams) = doc.get("upstreams").and_then(Value::as_mapping) else {
        return false;
    };
    upstreams.values().any(|up| {
        up.get("endpoints")
            .and_then(Value::as_sequence)
            .is_some_and(|eps| {
                eps.iter().any(|ep| {
                    ep.get("address")
                        .and_then(Value::as_str)
                        .is_some_and(|a| a.parse::<SocketAddr>().is_err() && a.contains(':'))
                })
            })
    })
}

/// Parses YAML text into a document, or says why it is not YAML.
/// How deep a spec may nest collections (a real spec nests a handful of levels).
pub const MAX_NESTING: usize = 64;

/// Refuses text that nests collections deeper than [`MAX_NESTING`], in one linear pass,
/// before the YAML parser sees it: deeply nested YAML costs the parser time that grows
/// faster than its size (100,000 levels took 20 s), on the leader, before any check.
/// Flow collections (`[`, `{`) count by their brackets outside quotes and comments;
/// block collections by indentation (each deeper indent of a line opens a level).
pub fn check_nesting(text: &str) -> Result<(), String> {
    let too_deep = |line: usize| {
        format!(
            "line {line}: collections nest deeper than {MAX_NESTING} levels; a spec needs far \
             fewer (nothing was parsed)"
        )
    };
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        if flow == 0 && !content.is_empty() && !content.starts_with('#') {
            while indents.last().is_some_and(|&i| i > indent) {
                indents.pop();
            }
            // A list item (`- `) nests one more level inside its indentation.
            let dashes = content.split(' ').take_while(|w| *w == "-").count();
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
            if indents.len() + dashes > MAX_NESTING {
                return Err(too_deep(n + 1));
            }
        }
        let mut quote: Option<char> = None;
        for c in content.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if flow == 0 => break,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow + indents.len() > MAX_NESTING {
                        return Err(too_deep(n + 1));
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

pub fn parse_yaml(text: &str) -> Result<Value, SpecErrors> {
    if let Err(e) = check_nesting(text) {
        let mut errors = SpecErrors::default();
        errors.push("spec", e);
        return Err(errors);
    }
    serde_yaml_ng::from_str(text).map_err(|e| {
        let mut errors = SpecErrors::default();
        errors.push("spec", format!("not valid YAML: {e}"));
        errors
    })
}

impl Spec {
    /// Parses and checks a YAML spec. On failure, every error found is returned.
    ///
    /// Endpoint host names are resolved here (blocking), so call it off the request path.
    pub fn from_yaml(text: &str) -> Result<Spec, SpecErrors> {
        Spec::from_value(parse_yaml(text)?)
    }

    /// The same, from an already parsed YAML document.
    pub fn from_value(doc: Value) -> Result<Spec, SpecErrors> {
        let mut errors = SpecErrors::default();
        let mut spec = Spec::default();
        // Names declared, even where the object itself failed to decode: a route that
        // names a broken upstream has one error (the upstream's), not two.
        let mut declared_upstreams = Vec::new();
        let top = match doc {
            Value::Null => return Ok(spec),
            Value::Mapping(m) => m,
            other => {
                errors.push(
                    "spec",
                    format!(
                        "expected a mapping with `upstreams` and `routes`, found {}",
                        kind(&other)
                    ),
                );
                return Err(errors);
            }
        };
        for (key, value) in top {
            match key.as_str() {
                Some("upstreams") => {
                    spec.upstreams =
                        objects(value, "upstreams", &mut declared_upstreams, &mut errors)
                }
                Some("routes") => {
                    spec.routes = objects(value, "routes", &mut Vec::new(), &mut errors)
                }
                Some("quotas") => {
                    spec.quotas = objects(value, "quotas", &mut Vec::new(), &mut errors)
                }
                Some("certificates") => {
                    spec.certificates =
                        objects(value, "certificates", &mut Vec::new(), &mut errors)
                }
                Some("hosts") => {
                    spec.hosts = objects(value, "hosts", &mut Vec::new(), &mut errors)
                }
                Some("providers") => {
                    spec.providers = objects(value, "providers", &mut Vec::new(), &mut errors)
                }
                Some("models") => {
                    spec.models = objects(value, "models", &mut Vec::new(), &mut errors)
                }
                Some("prompts") => {
                    spec.prompts = objects(value, "prompts", &mut Vec::new(), &mut errors)
                }
                Some("response_cache") => match serde_path_to_error::deserialize(value) {
                    Ok(c) => spec.response_cache = Some(c),
                    Err(e) => errors.push(
                        format!("response_cache.{}", e.path()).trim_end_matches(".."),
                        e.into_inner().to_string(),
                    ),
                },
                Some("prompt_guard") => match serde_path_to_error::deserialize(value) {
                    Ok(g) => spec.prompt_guard = Some(g),
                    Err(e) => errors.push(
                        format!("prompt_guard.{}", e.path()).trim_end_matches(".."),
                        e.into_inner().to_string(),
                    ),
                },
                Some("call_log") => {
                    match serde_path_to_error::deserialize::<_, crate::calls::capture::CallLogSpec>(
                        value,
                    ) {
                        Ok(c) => {
                            for (path, msg) in c.check() {
                                errors.push(format!("call_log.{path}"), msg);
                            }
                            spec.call_log = Some(c);
                        }
                        Err(e) => errors.push(
                            format!("call_log.{}", e.path()).trim_end_matches(".."),
                            e.into_inner().to_string(),
                        ),
                    }
                }
                Some("alerts") => {
                    match serde_path_to_error::deserialize::<_, crate::rollout::anomaly::AlertSpec>(
                        value,
                    ) {
                        Ok(a) => {
                            for (path, msg) in a.check() {
                                errors.push(format!("alerts.{path}"), msg);
                            }
                            spec.alerts = Some(a);
                        }
                        Err(e) => errors.push(
                            format!("alerts.{}", e.path()).trim_end_matches(".."),
                            e.into_inner().to_string(),
                        ),
                    }
                }
                Some("tenant_upstreams") => match serde_path_to_error::deserialize(value) {
                    Ok(t) => spec.tenant_upstreams = t,
                    Err(e) => {
                        let inner = e.path().to_string();
                        let path = if inner == "." || inner.is_empty() {
                            "tenant_upstreams".to_string()
                        } else {
                            format!("tenant_upstreams.{inner}")
                        };
                        errors.push(path, e.into_inner().to_string());
                    }
                },
                _ => errors.push(
                    "spec",
                    format!(
                        "unknown field {}, expected `upstreams`, `routes`, `quotas`, \
                         `certificates`, `hosts`, `tenant_upstreams`, `providers`, `models`, `prompts`, `response_cache`, `prompt_guard`, `call_log` or `alerts` (a file for `tollgate apply` may also have \
                         `tenants` and `apis`)",
                        key_text(&key)
                    ),
                ),
            }
        }
        declared_upstreams.sort();
        spec.resolve_endpoints(&mut errors);
        for (name, p) in &mut spec.providers {
            p.resolve(name, &mut errors);
        }
        crate::llm::spec::check(&spec.providers, &spec.models, &mut errors);
        crate::llm::prompt::check(&spec.prompts, &spec.models, &mut errors);
        spec.check(&declared_upstreams, &mut errors);
        crate::state::tls::check_static(&spec.certificates, &spec.hosts, &mut errors);
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(errors)
        }
    }

    /// Resolves every endpoint address once, so that what was checked is what runs.
    fn resolve_endpoints(&mut self, errors: &mut SpecErrors) {
        for (name, up) in &mut self.upstreams {
            for (i, ep) in up.endpoints.iter_mut().enumerate() {
                let (address, scheme) = EndpointSpec::split_address(&ep.address);
                ep.scheme = scheme;
                ep.host = address
                    .rsplit_once(':')
                    .map_or(address.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                match resolve(&address) {
                    Ok(addr) => ep.resolved = Some(addr),
                    Err(msg) => {
                        errors.push(format!("upstreams.{name}.endpoints[{i}].address"), msg)
                    }
                }
            }
        }
    }

    /// Checks what serde cannot: names, references between objects, value ranges.
    fn check(&self, declared_upstreams: &[String], errors: &mut SpecErrors) {
        for (name, up) in &self.upstreams {
            let at = format!("upstreams.{name}");
            check_name(name, &at, errors);
            if up.endpoints.is_empty() {
                errors.push(format!("{at}.endpoints"), "needs at least one endpoint");
            }
            for (i, ep) in up.endpoints.iter().enumerate() {
                let at = format!("{at}.endpoints[{i}]");
                if ep.weight == 0 || ep.weight > 10_000 {
                    errors.push(format!("{at}.weight"), "must be between 1 and 10000");
                }
            }
            let schemes: Vec<Option<Scheme>> = up.endpoints.iter().map(|e| e.scheme).collect();
            let https = schemes.contains(&Some(Scheme::Https));
            if https && schemes.iter().any(|s| *s != Some(Scheme::Https)) && up.tls.is_none() {
                errors.push(
                    format!("{at}.endpoints"),
                    "some endpoints are https:// and some are not: write them all with https://, or add a `tls` block",
                );
            }
            if up.tls.is_some() && schemes.contains(&Some(Scheme::Http)) {
                errors.push(
                    format!("{at}.endpoints"),
                    "an http:// endpoint in an upstream with `tls`: write it as https:// or host:port",
                );
            }
            if let Some(tls) = &up.tls {
                crate::state::tls::check_upstream_tls(tls, &format!("{at}.tls"), errors);
            }
            let lb = &up.load_balancing;
            match (&lb.policy, &lb.hash_header) {
                (LbPolicy::ConsistentHash, None) => errors.push(
                    format!("{at}.load_balancing.hash_header"),
                    "consistent_hash needs the name of the header to hash on",
                ),
                (LbPolicy::ConsistentHash, Some(h)) => {
                    check_header_name(h, &format!("{at}.load_balancing.hash_header"), errors)
                }
                (_, Some(_)) => errors.push(
                    format!("{at}.load_balancing.hash_header"),
                    "only used by policy consistent_hash; remove it or change the policy",
                ),
                (_, None) => {}
            }
            if up.retries.attempts > 10 {
                errors.push(format!("{at}.retries.attempts"), "must be at most 10");
            }
            let budget = &up.retries.budget;
            if !(0.0..=100.0).contains(&budget.percent) {
                errors.push(
                    format!("{at}.retries.budget.percent"),
                    "must be between 0 and 100",
                );
            }
            if let Some(o) = &up.outlier_detection {
                if o.consecutive_failures == 0 {
                    errors.push(
                        format!("{at}.outlier_detection.consecutive_failures"),
                        "must be at least 1",
                    );
                }
                if !(0.0..=100.0).contains(&o.max_ejection_percent) {
                    errors.push(
                        format!("{at}.outlier_detection.max_ejection_percent"),
                        "must be between 0 and 100",
                    );
                }
            }
            if let Some(c) = &up.circuit_breaker {
                let at = format!("{at}.circuit_breaker");
                if c.consecutive_failures == 0 {
                    errors.push(format!("{at}.consecutive_failures"), "must be at least 1");
                }
                if c.min_calls == 0 {
                    errors.push(format!("{at}.min_calls"), "must be at least 1");
                }
                for (field, v) in [
                    ("failure_rate", c.failure_rate),
                    ("slow_call_rate", c.slow_call_rate),
                ] {
                    if !(v > 0.0 && v <= 100.0) {
                        errors.push(
                            format!("{at}.{field}"),
                            format!("must be a percentage above 0 and at most 100 (got {v})"),
                        );
                    }
                }
                if !(1..=1000).contains(&c.half_open_probes) {
                    errors.push(
                        format!("{at}.half_open_probes"),
                        "must be between 1 and 1000",
                    );
                }
                if c.window < Duration::from_secs(1) || c.window > Duration::from_secs(3600) {
                    errors.push(format!("{at}.window"), "must be between 1s and 1h");
                }
                if let Some(f) = &c.fallback {
                    if !(200..=599).contains(&f.status) {
                        errors.push(
                            format!("{at}.fallback.status"),
                            "must be an HTTP status (200-599)",
                        );
                    }
                    if http::HeaderValue::from_str(&f.content_type).is_err() {
                        errors.push(
                            format!("{at}.fallback.content_type"),
                            "is not a valid header value",
                        );
                    }
                }
            }
            if let Some(hc) = &up.health_check {
                let at = format!("{at}.health_check");
                if !hc.path.starts_with('/') {
                    errors.push(format!("{at}.path"), "must start with `/`");
                }
                if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
                    errors.push(at.clone(), "thresholds must be at least 1");
                }
                if hc.timeout > hc.interval {
                    errors.push(format!("{at}.timeout"), "must not exceed the interval");
                }
                for (i, s) in hc.expected_statuses.iter().enumerate() {
                    if !(100..=599).contains(s) {
                        errors.push(
                            format!("{at}.expected_statuses[{i}]"),
                            "must be an HTTP status (100-599)",
                        );
                    }
                }
            }
        }
        for (name, route) in &self.routes {
            let at = format!("routes.{name}");
            check_name(name, &at, errors);
            if !declared_upstreams.contains(&route.upstream) {
                errors.push(
                    format!("{at}.upstream"),
                    format!(
                        "no upstream named {:?}; defined: [{}]",
                        route.upstream,
                        declared_upstreams.join(", ")
                    ),
                );
            }
            let m = &route.matches;
            for (i, host) in m.hosts.iter().enumerate() {
                if let Err(msg) = check_host(host) {
                    errors.push(format!("{at}.match.hosts[{i}]"), msg);
                }
            }
            match m.path.kind() {
                None => errors.push(
                    format!("{at}.match.path"),
                    "set exactly one of `exact`, `prefix` or `template`",
                ),
                Some(kind) => {
                    let (pattern, field) = match kind {
                        PathKind::Exact(p) => (p, "exact"),
                        PathKind::Prefix(p) => (p, "prefix"),
                        PathKind::Template(p) => (p, "template"),
                    };
                    if !pattern.starts_with('/') {
                        errors.push(format!("{at}.match.path.{field}"), "must start with `/`");
                    } else if let PathKind::Template(t) = kind
                        && let Err(msg) = crate::routing::matcher::normalize_template(t)
                    {
                        errors.push(format!("{at}.match.path.template"), msg);
                    }
                }
            }
            for (i, method) in m.methods.iter().enumerate() {
                if http::Method::from_bytes(method.as_bytes()).is_err()
                    || method.chars().any(|c| c.is_ascii_lowercase())
                {
                    errors.push(
                        format!("{at}.match.methods[{i}]"),
                        format!("{method:?} is not an HTTP method; write it in capitals, like GET"),
                    );
                }
            }
            for (i, h) in m.headers.iter().enumerate() {
                let at = format!("{at}.match.headers[{i}]");
                check_header_name(&h.name, &format!("{at}.name"), errors);
                let set = [h.exact.is_some(), h.prefix.is_some(), h.present.is_some()]
                    .iter()
                    .filter(|x| **x)
                    .count();
                if set != 1 {
                    errors.push(
                        at.clone(),
                        "needs exactly one of `exact`, `prefix` or `present`",
                    );
                }
                if let Some(v) = &h.exact
                    && http::HeaderValue::from_str(v).is_err()
                {
                    errors.push(
                        format!("{at}.exact"),
                        "the value has characters not allowed in a header",
                    );
                }
            }
            if let Some(rw) = &route.rewrite {
                let at = format!("{at}.rewrite");
                if m.path.prefix.is_none() {
                    errors.push(at.clone(), "prefix rewrites need a `prefix` path match");
                }
                match (&rw.strip_prefix, &rw.replace_prefix) {
                    (true, Some(_)) => errors.push(
                        at,
                        "use either `strip_prefix` or `replace_prefix`, not both",
                    ),
                    (false, None) => {
                        errors.push(at, "set `strip_prefix: true` or `replace_prefix: /new`")
                    }
                    (_, Some(p)) if !p.starts_with('/') => {
                        errors.push(format!("{at}.replace_prefix"), "must start with `/`")
                    }
                    _ => {}
                }
            }
            check_header_ops(
                &route.request_headers,
                &format!("{at}.request_headers"),
                errors,
            );
            check_header_ops(
                &route.response_headers,
                &format!("{at}.response_headers"),
                errors,
            );
        }
        for (name, q) in &self.quotas {
            let at = format!("quotas.{name}");
            check_name(name, &at, errors);
            if q.limit < 1 {
                errors.push(
                    format!("{at}.limit"),
                    format!(
                        "must be at least 1 (got {}); to block traffic, remove the route",
                        q.limit
                    ),
                );
            }
            if q.algorithm == Some(QuotaAlgorithm::Gcra)
                && matches!(q.window, QuotaWindow::Day | QuotaWindow::Month)
            {
                errors.push(
                    format!("{at}.algorithm"),
                    "gcra spreads a limit evenly over its window; for a day or a month use `window` (the default)",
                );
            }
            if let Some(burst) = q.burst {
                if q.algorithm() != QuotaAlgorithm::Gcra {
                    errors.push(
                        format!("{at}.burst"),
                        "burst applies to gcra; window counters allow the whole limit at any time in the window",
                    );
                } else if burst < 1 || burst > q.limit {
                    errors.push(
                        format!("{at}.burst"),
                        format!("must be between 1 and the limit ({}); got {burst}", q.limit),
                    );
                }
            }
            for (i, route) in q.routes.iter().enumerate() {
                if !self.routes.contains_key(route) {
                    errors.push(
                        format!("{at}.routes[{i}]"),
                        format!("no route named {route:?} in this spec"),
                    );
                }
            }
            for (i, api) in q.apis.iter().enumerate() {
                if crate::state::lifecycle::check_name("API", api).is_err() {
                    errors.push(
                        format!("{at}.apis[{i}]"),
                        format!("{api:?} is not an API name"),
                    );
                }
            }
            let llm_only = q.unit != QuotaUnit::Requests || q.scope == QuotaScope::Model;
            if llm_only && !q.routes.is_empty() {
                errors.push(
                    format!("{at}.routes"),
                    "token units and the model scope count LLM APIs' requests; name the APIs in `apis` (routes of the spec are not LLM APIs)",
                );
            }
            if q.scope == QuotaScope::ApiVersion && q.apis.is_empty() && !q.routes.is_empty() {
                errors.push(
                    format!("{at}.scope"),
                    "api_version counts requests to APIs; name APIs in `apis`, or use scope route",
                );
            }
        }
    }
}

/// Decodes every entry of a `name: object` mapping on its own, so one bad object does not
/// hide the errors of the others.
fn objects<T: DeserializeOwned>(
    value: Value,
    section: &str,
    declared: &mut Vec<String>,
    errors: &mut SpecErrors,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    let map = match value {
        Value::Null => return out,
        Value::Mapping(m) => m,
        other => {
            errors.push(
                section,
                format!(
                    "expected a mapping of name -> object, found {}",
                    kind(&other)
                ),
            );
            return out;
        }
    };
    for (key, value) in map {
        let Some(name) = key.as_str().map(str::to_string) else {
            errors.push(
                section,
                format!("names must be strings, found {}", key_text(&key)),
            );
            continue;
        };
        declared.push(name.clone());
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(obj) => {
                out.insert(name, obj);
            }
            Err(e) => {
                let inner = e.path().to_string();
                let path = if inner == "." || inner.is_empty() {
                    format!("{section}.{name}")
                } else {
                    format!("{section}.{name}.{inner}")
                };
                errors.push(path, e.into_inner().to_string());
            }
        }
    }
    out
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn key_text(v: &Value) -> String {
    match v.as_str() {
        Some(s) => format!("`{s}`"),
        None => kind(v).to_string(),
    }
}

pub(crate) fn check_name(name: &str, at: &str, errors: &mut SpecErrors) {
    if name.starts_with('_') {
        // `_none` labels unmatched requests in the metrics.
        errors.push(at, "names starting with `_` are reserved");
        return;
    }
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        errors.push(
            at,
            "names are 1-128 characters of letters, digits, `-`, `_` and `.`",
        );
    }
}

fn check_header_name(name: &str, at: &str, errors: &mut SpecErrors) {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        errors.push(at, format!("{name:?} is not a valid header name"));
    }
}

fn check_header_ops(ops: &HeaderOpsSpec, at: &str, errors: &mut SpecErrors) {
    for (section, map) in [("add", &ops.add), ("set", &ops.set)] {
        for (name, value) in map {
            let at = format!("{at}.{section}.{name}");
            check_header_name(name, &at, errors);
            if http::HeaderValue::from_str(value).is_err() {
                errors.push(at, "the value has characters not allowed in a header");
            }
        }
    }
    for (i, name) in ops.remove.iter().enumerate() {
        check_header_name(name, &format!("{at}.remove[{i}]"), errors);
    }
}

pub(crate) fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid {
        return Err(format!(
            "{host:?} is not a host name; use `api.example.com` or `*.example.com` (no port)"
        ));
    }
    Ok(())
}

/// Resolves an endpoint address (`host:port`) to one socket address.
pub(crate) fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !address.contains(':') {
        return Err(format!("{address:?} needs a port, like {address}:8080"));
    }
    // In a node, names go to the node's resolver (`--dns-resolver`), which also keeps them
    // fresh afterwards (routing::dns).
    if let Some(dns) = crate::routing::dns::global()
        && let Some((host, port)) = address.rsplit_once(':')
        && let Ok(port) = port.parse::<u16>()
    {
        return dns
            .resolve_blocking(host, port)
            .map_err(|e| format!("cannot resolve {address:?}: {e}"));
    }
    match address.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{address:?} resolved to no address")),
        Err(e) => Err(format!("cannot resolve {address:?}: {e}")),
    }
}

#[cfg(test)]
mod tests;
