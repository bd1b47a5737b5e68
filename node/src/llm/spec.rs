//! The LLM part of a version's content (`providers` and `models`), as written, and its
//! checks. Documented field by field in `docs/llm.md`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::state::spec::{
    CircuitSpec, EndpointSpec, SpecErrors, TimeoutsSpec, UpstreamSpec, UpstreamTlsSpec,
};

/// A provider: where its API is and how to call it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    pub kind: ProviderKind,
    /// `https://api.openai.com/v1`, `https://api.anthropic.com`, `http://127.0.0.1:8000/v1`
    /// (vLLM), `https://<resource>.openai.azure.com/openai`. The path is kept in front of
    /// every call.
    pub base_url: String,
    /// The named secret that holds the API key (`tollgate secret set`); for a tenant's API
    /// the secret `<tenant>.<name>`. None: no key is sent (a local server).
    #[serde(default)]
    pub api_key_secret: Option<String>,
    /// Azure OpenAI's `api-version`; Anthropic's `anthropic-version` (default 2023-06-01).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Extra headers sent on every call (an organization or project id).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub tls: Option<UpstreamTlsSpec>,
    #[serde(default = "provider_timeouts")]
    pub timeouts: TimeoutsSpec,
    /// Each deployment on this provider gets its own cluster-wide circuit breaker with
    /// these settings.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitSpec>,
    /// The upstream cluster the calls go to, made from `base_url` (never written).
    #[serde(skip)]
    pub upstream: Option<UpstreamSpec>,
    /// The path of `base_url`, without a trailing `/`.
    #[serde(skip)]
    pub path: String,
}

fn provider_timeouts() -> TimeoutsSpec {
    TimeoutsSpec {
        connect: Duration::from_secs(5),
        // Time to the response head: a whole non-streamed answer can take minutes.
        request: Duration::from_secs(600),
        idle: Duration::from_secs(90),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI, and every server that speaks its API (vLLM, llama.cpp, Ollama ...).
    Openai,
    AzureOpenai,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::AzureOpenai => "azure_openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    /// `gen_ai.provider.name` (OpenTelemetry GenAI conventions).
    pub fn otel_name(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::AzureOpenai => "azure.ai.openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gcp.gemini",
        }
    }
}

/// A model name callers use, over the deployments that serve it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub kind: ModelKind,
    pub deployments: Vec<DeploymentSpec>,
    #[serde(default)]
    pub routing: RoutingStrategy,
    /// Other models of the same content to try, in order, when every deployment of this
    /// one failed (a context-window error goes only to those with a larger window).
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// The longest wait for the first token (or a whole non-streamed answer's head).
    #[serde(
        default = "first_token_timeout",
        deserialize_with = "crate::state::spec::duration"
    )]
    pub first_token_timeout: Duration,
    /// The longest a whole answer may take, stream included.
    #[serde(
        default = "total_timeout",
        deserialize_with = "crate::state::spec::duration"
    )]
    pub timeout: Duration,
    /// The most provider calls one request makes, fallbacks included (default 3).
    #[serde(default = "max_attempts")]
    pub max_attempts: u32,
    /// The most output tokens one answer can have when the request sets no `max_tokens`:
    /// what a budget reserves for its output (default 4096).
    #[serde(default = "max_output_tokens")]
    pub max_output_tokens: u64,
}

/// A version's `response_cache` (docs/llm.md, "Response cache").
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseCacheSpec {
    /// How long an answer is kept (default 5m).
    #[serde(
        default = "cache_ttl",
        deserialize_with = "crate::state::spec::duration"
    )]
    pub ttl: Duration,
    /// Cache requests of any temperature, not only temperature 0 (default false).
    #[serde(default)]
    pub any_temperature: bool,
}

fn cache_ttl() -> Duration {
    Duration::from_secs(300)
}

fn max_output_tokens() -> u64 {
    4096
}

fn first_token_timeout() -> Duration {
    Duration::from_secs(30)
}
fn total_timeout() -> Duration {
    Duration::from_secs(600)
}
fn max_attempts() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    #[default]
    Chat,
    Embedding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingStrategy {
    /// By `weight`.
    #[default]
    Weighted,
    /// The deployment with the fewest requests in flight on this node.
    LeastInFlight,
    /// The faster to first token of two picked at random (an average over recent calls).
    LowestLatency,
    /// The lowest `priority` first; the next only when it fails or is unavailable.
    Priority,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// A provider of the same content.
    pub provider: String,
    /// The provider's model id (Azure: the deployment name).
    pub model: String,
    /// Default: the provider's name (names are unique within a model).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub priority: u32,
    /// Tried first by nodes of the same region; after the deployments of no region by
    /// nodes of another.
    #[serde(default)]
    pub region: Option<String>,
    /// Tokens the model takes in one request; a prompt that cannot fit is not sent here.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// The provider's limits for this deployment: tokens and requests per minute. A node
    /// passes over a deployment that has used its share for the minute.
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub rpm: Option<u64>,
}

fn one() -> u32 {
    1
}

impl DeploymentSpec {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.provider)
    }
}

impl ProviderSpec {
    /// Makes the upstream cluster the provider's calls go to, resolving its address (so
    /// call it off the request path). Errors are pushed at `providers.<name>`.
    pub fn resolve(&mut self, name: &str, errors: &mut SpecErrors) {
        let at = format!("providers.{name}");
        let url = match self.base_url.parse::<http::Uri>() {
            Ok(u) => u,
            Err(e) => {
                errors.push(format!("{at}.base_url"), format!("not a URL: {e}"));
                return;
            }
        };
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                errors.push(
                    format!("{at}.base_url"),
                    "must start with https:// (or http:// for a server on a network you trust)",
                );
                return;
            }
        };
        let Some(authority) = url.authority() else {
            errors.push(format!("{at}.base_url"), "needs a host");
            return;
        };
        if url.query().is_some() {
            errors.push(
                format!("{at}.base_url"),
                "must not have a query (`api_version` sets Azure's)",
            );
        }
        self.path = url.path().trim_end_matches('/').to_string();
        let scheme = if https { "https" } else { "http" };
        let mut endpoint = EndpointSpec {
            address: format!("{scheme}://{authority}"),
            weight: 1,
            resolved: None,
            scheme: None,
            host: String::new(),
        };
        let (address, scheme) = EndpointSpec::split_address(&endpoint.address);
        endpoint.scheme = scheme;
        endpoint.host = url
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        match crate::state::spec::resolve(&address) {
            Ok(a) => endpoint.resolved = Some(a),
            Err(msg) => errors.push(format!("{at}.base_url"), msg),
        }
        if !https && self.tls.is_some() {
            errors.push(
                format!("{at}.tls"),
                "an http:// base_url has no TLS; write https://",
            );
        }
        if let Some(tls) = &self.tls {
            if tls.client_certificate.is_some() {
                errors.push(
                    format!("{at}.tls.client_certificate"),
                    "providers present no client certificate",
                );
            }
            crate::state::tls::check_upstream_tls(tls, &format!("{at}.tls"), errors);
        }
        for (h, v) in &self.headers {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                errors.push(format!("{at}.headers.{h}"), "not a valid header");
            }
        }
        if self.kind == ProviderKind::AzureOpenai && self.api_version.is_none() {
            errors.push(
                format!("{at}.api_version"),
                "Azure OpenAI needs its api-version, like 2024-10-21",
            );
        }
        self.upstream = Some(UpstreamSpec {
            endpoints: vec![endpoint],
            load_balancing: Default::default(),
            timeouts: self.timeouts,
            pool: Default::default(),
            retries: crate::state::spec::RetrySpec::none(),
            outlier_detection: None,
            health_check: None,
            circuit_breaker: self.circuit_breaker.clone(),
            tls: self.tls.clone().or(https.then_some(UpstreamTlsSpec {
                ca: None,
                server_name: None,
                verify: true,
                h2: true,
                client_certificate: None,
            })),
        });
    }
}

/// Checks `providers` and `models` together.
pub fn check(
    providers: &BTreeMap<String, ProviderSpec>,
    models: &BTreeMap<String, ModelSpec>,
    errors: &mut SpecErrors,
) {
    for name in providers.keys() {
        crate::state::spec::check_name(name, &format!("providers.{name}"), errors);
    }
    for (name, m) in models {
        let at = format!("models.{name}");
        let ok = !name.is_empty()
            && name.len() <= 256
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
        if !ok {
            errors.push(
                &at,
                "model names are 1-256 printable characters without spaces or quotes",
            );
        }
        if m.deployments.is_empty() {
            errors.push(format!("{at}.deployments"), "needs at least one deployment");
        }
        let mut seen = Vec::new();
        for (i, d) in m.deployments.iter().enumerate() {
            let at = format!("{at}.deployments[{i}]");
            match providers.get(&d.provider) {
                None => errors.push(
                    format!("{at}.provider"),
                    format!("no provider {:?} in `providers`", d.provider),
                ),
                Some(p) => {
                    let embeds = matches!(
                        p.kind,
                        ProviderKind::Openai | ProviderKind::AzureOpenai | ProviderKind::Gemini
                    );
                    if m.kind == ModelKind::Embedding && !embeds {
                        errors.push(
                            format!("{at}.provider"),
                            format!("{} has no embeddings API", p.kind.name()),
                        );
                    }
                }
            }
            if d.model.is_empty() {
                errors.push(format!("{at}.model"), "the provider's model id is required");
            }
            if d.weight == 0 || d.weight > 10_000 {
                errors.push(format!("{at}.weight"), "must be between 1 and 10000");
            }
            crate::state::spec::check_name(d.name(), &format!("{at}.name"), errors);
            if seen.contains(&d.name()) {
                errors.push(
                    format!("{at}.name"),
                    format!("two deployments are named {:?}; give them names", d.name()),
                );
            }
            seen.push(d.name());
        }
        for (i, f) in m.fallbacks.iter().enumerate() {
            match models.get(f) {
                None => errors.push(
                    format!("{at}.fallbacks[{i}]"),
                    format!("no model {f:?} in `models`"),
                ),
                Some(other) if other.kind != m.kind => errors.push(
                    format!("{at}.fallbacks[{i}]"),
                    "a fallback must be the same kind of model",
                ),
                Some(_) if f == name => errors.push(
                    format!("{at}.fallbacks[{i}]"),
                    "a model cannot fall back to itself",
                ),
                Some(_) => {}
            }
        }
        if m.max_attempts == 0 || m.max_attempts > 10 {
            errors.push(format!("{at}.max_attempts"), "must be between 1 and 10");
        }
        if m.first_token_timeout > m.timeout {
            errors.push(
                format!("{at}.first_token_timeout"),
                "must not be longer than `timeout`",
            );
        }
    }
}
