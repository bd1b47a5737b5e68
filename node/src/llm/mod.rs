//! The LLM gateway (docs/llm.md): an API version whose content declares `providers` and
//! `models` serves the OpenAI and Anthropic dialects at its base path, picks a deployment
//! for each request, translates between dialects, streams, falls back, and meters every
//! token.
//!
//! A request reaches [`serve`] through the usual pipeline (authenticate, version, quota),
//! as the route of one of the [`Endpoint`]s. Everything here reads the snapshot's compiled
//! [`LlmApi`]; the only network calls are the provider calls.

pub mod anthropic;
pub mod cache;
pub mod gemini;
pub mod guard;
pub mod ir;
pub mod limits;
pub mod openai;
pub mod prompt;
pub mod responses;
pub mod serve;
pub mod spec;
pub mod sse;
pub mod tokens;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::routing::upstream::{BuildCtx, Cluster, EndpointRegistry};
use spec::{ModelKind, ProviderKind, RoutingStrategy};

pub use serve::serve;

/// The caller's dialect, by the path it called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
    /// OpenAI's Responses API (its errors are OpenAI's).
    Responses,
}

/// The paths an LLM API serves below its base path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    Models,
    Responses,
    Messages,
    CountTokens,
    /// A prompt API (`POST <base>/<name>`): not among the fixed endpoints.
    Prompt,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::ChatCompletions,
        Endpoint::Embeddings,
        Endpoint::Models,
        Endpoint::Responses,
        Endpoint::Messages,
        Endpoint::CountTokens,
    ];

    /// The endpoints an LLM version serves now.
    pub const SERVED: [Endpoint; 6] = Endpoint::ALL;

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Models => "/v1/models",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
            Endpoint::CountTokens => "/v1/messages/count_tokens",
            Endpoint::Prompt => "/",
        }
    }

    pub fn method(self) -> http::Method {
        match self {
            Endpoint::Models => http::Method::GET,
            _ => http::Method::POST,
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Dialect::Anthropic,
            Endpoint::Responses => Dialect::Responses,
            _ => Dialect::OpenAi,
        }
    }

    /// `gen_ai.operation.name`.
    pub fn operation(self) -> &'static str {
        match self {
            Endpoint::Embeddings => "embeddings",
            Endpoint::Models | Endpoint::CountTokens => "other",
            _ => "chat",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Models => "models",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Prompt => "prompt",
        }
    }
}

/// The dialect of a path below an LLM API's base path (for errors made before a route
/// was matched).
pub fn dialect_of_path(below: &str) -> Dialect {
    if below.starts_with("/v1/messages") {
        Dialect::Anthropic
    } else if below.starts_with("/v1/responses") {
        Dialect::Responses
    } else {
        Dialect::OpenAi
    }
}

/// A version's compiled `providers` and `models`.
#[derive(Debug)]
pub struct LlmApi {
    pub models: BTreeMap<Arc<str>, Arc<Model>>,
    /// `<api>@<version>/`: what the response cache keys by.
    pub version: Arc<str>,
    pub cache: Option<cache::Settings>,
    /// Secrets and PII in prompts (None: not looked for).
    pub guard: Option<guard::GuardSpec>,
    pub prompts: BTreeMap<Arc<str>, Arc<prompt::Prompt>>,
    /// When the version was compiled (seconds), for `created` in model listings.
    pub created: u64,
}

#[derive(Debug)]
pub struct Model {
    pub name: Arc<str>,
    pub kind: ModelKind,
    pub deployments: Vec<Deployment>,
    pub strategy: RoutingStrategy,
    pub fallbacks: Vec<Arc<str>>,
    pub first_token_timeout: Duration,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub max_output_tokens: u64,
}

impl Model {
    /// The largest context window of its deployments (None: one has none set).
    pub fn context_window(&self) -> Option<u64> {
        let mut max = 0;
        for d in &self.deployments {
            max = max.max(d.context_window?);
        }
        Some(max)
    }
}

#[derive(Debug)]
pub struct Deployment {
    pub name: Arc<str>,
    pub provider: Arc<Provider>,
    /// The provider's model id.
    pub model: Arc<str>,
    pub weight: u32,
    pub priority: u32,
    pub region: Option<Arc<str>>,
    pub context_window: Option<u64>,
    pub tpm: Option<u64>,
    pub rpm: Option<u64>,
    /// The provider's limits as cluster-wide leases (`llm-tpm`, `llm-rpm`), keyed by
    /// `limit_key` (`<api>/<provider>/<provider model>`: the versions of an API share them).
    pub tpm_def: Option<Arc<crate::actor::quotas::QuotaDef>>,
    pub rpm_def: Option<Arc<crate::actor::quotas::QuotaDef>>,
    pub limit_key: Arc<str>,
    /// The calls' upstream cluster: endpoint, TLS, pool and this deployment's circuit.
    pub cluster: Arc<Cluster>,
    pub live: Live,
}

/// What a node learns about a deployment as it calls it.
#[derive(Debug, Default)]
pub struct Live {
    pub in_flight: AtomicUsize,
    /// Time to first token, microseconds, an exponentially weighted average (0: unknown).
    pub ttft_ewma_us: AtomicU64,
    /// Not called before this (ms since the epoch): a 429's `retry-after`.
    pub cooldown_until_ms: AtomicU64,
    /// Passed over until then (ms since the epoch): its provider limit had no headroom.
    pub limited_until_ms: AtomicU64,
}

impl Live {
    pub fn record_ttft(&self, us: u64) {
        let old = self.ttft_ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 4 + us) / 5 };
        self.ttft_ewma_us.store(new.max(1), Ordering::Relaxed);
    }
}

/// How to call a provider.
#[derive(Debug)]
pub struct Provider {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    /// The base URL's path (`/v1`), without a trailing `/`.
    pub path: String,
    /// The `Host` header calls carry.
    pub host: HeaderValue,
    /// The API key header (`authorization`, `api-key`, `x-api-key`, `x-goog-api-key`).
    pub auth: Option<(HeaderName, HeaderValue)>,
    pub api_version: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Why the provider cannot be called on this node (its key's secret cannot be opened).
    pub broken: Option<String>,
}

/// Compiles a spec's `providers` and `models`; None when it has no models. Deployment
/// clusters are named `<prefix>llm/<model>/<deployment>`. `secret_prefix` is what the
/// names of the secrets a tenant's content refers to start with (`<tenant>.`).
pub fn compile(
    spec: &crate::state::spec::Spec,
    prefix: &str,
    secret_prefix: &str,
    registry: &EndpointRegistry,
    ctx: &BuildCtx<'_>,
) -> Option<Arc<LlmApi>> {
    if spec.models.is_empty() {
        return None;
    }
    // The tokenizers load once, off the data plane, on the first node that serves models
    // (tens of MB: nodes without LLM APIs never load them).
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("tollgate-tokenizers".into())
            .spawn(tokens::warm_up);
    });
    let providers: BTreeMap<&str, Arc<Provider>> = spec
        .providers
        .iter()
        .map(|(name, p)| {
            (
                name.as_str(),
                Arc::new(compile_provider(name, p, secret_prefix, ctx)),
            )
        })
        .collect();
    let mut models = BTreeMap::new();
    for (name, m) in &spec.models {
        let deployments = m
            .deployments
            .iter()
            .filter_map(|d| {
                let p = spec.providers.get(&d.provider)?;
                let upstream = p.upstream.as_ref()?;
                let cluster_name = format!("{prefix}llm/{name}/{}", d.name());
                Some(Deployment {
                    name: Arc::from(d.name()),
                    provider: providers.get(d.provider.as_str())?.clone(),
                    model: Arc::from(d.model.as_str()),
                    weight: d.weight,
                    priority: d.priority,
                    region: d.region.as_deref().map(Arc::from),
                    context_window: d.context_window,
                    tpm: d.tpm,
                    rpm: d.rpm,
                    tpm_def: d.tpm.map(|n| {
                        Arc::new(crate::actor::quotas::QuotaDef::provider(
                            "llm-tpm",
                            n,
                            crate::state::spec::QuotaUnit::Tokens,
                        ))
                    }),
                    rpm_def: d.rpm.map(|n| {
                        Arc::new(crate::actor::quotas::QuotaDef::provider(
                            "llm-rpm",
                            n,
                            crate::state::spec::QuotaUnit::Requests,
                        ))
                    }),
                    limit_key: Arc::from(format!(
                        "{}/{}/{}",
                        prefix.split('@').next().unwrap_or(prefix),
                        d.provider,
                        d.model
                    )),
                    cluster: Arc::new(Cluster::build_with(&cluster_name, upstream, registry, ctx)),
                    live: Live::default(),
                })
            })
            .collect();
        models.insert(
            Arc::from(name.as_str()),
            Arc::new(Model {
                name: Arc::from(name.as_str()),
                kind: m.kind,
                deployments,
                strategy: m.routing,
                fallbacks: m.fallbacks.iter().map(|f| Arc::from(f.as_str())).collect(),
                first_token_timeout: m.first_token_timeout,
                timeout: m.timeout,
                max_attempts: m.max_attempts,
                max_output_tokens: m.max_output_tokens.max(1),
            }),
        );
    }
    Some(Arc::new(LlmApi {
        models,
        version: Arc::from(prefix),
        guard: spec.prompt_guard.filter(guard::GuardSpec::is_on),
        cache: spec.response_cache.map(|c| cache::Settings {
            ttl: c.ttl,
            any_temperature: c.any_temperature,
        }),
        prompts: prompt::compile(&spec.prompts),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }))
}

fn compile_provider(
    name: &str,
    p: &spec::ProviderSpec,
    secret_prefix: &str,
    ctx: &BuildCtx<'_>,
) -> Provider {
    let mut broken = None;
    let auth = match &p.api_key_secret {
        None => None,
        Some(secret) => {
            let full = format!("{secret_prefix}{secret}");
            match (ctx.open_secret)(&full).and_then(|v| {
                String::from_utf8(v).map_err(|_| format!("secret {full} is not text"))
            }) {
                Ok(key) => {
                    let key = key.trim();
                    let (header, value) = match p.kind {
                        ProviderKind::Openai => ("authorization", format!("Bearer {key}")),
                        ProviderKind::AzureOpenai => ("api-key", key.to_string()),
                        ProviderKind::Anthropic => ("x-api-key", key.to_string()),
                        ProviderKind::Gemini => ("x-goog-api-key", key.to_string()),
                    };
                    match HeaderValue::from_str(&value) {
                        Ok(mut v) => {
                            v.set_sensitive(true);
                            Some((HeaderName::from_static(header), v))
                        }
                        Err(_) => {
                            broken = Some(format!("secret {full} is not a valid header value"));
                            None
                        }
                    }
                }
                Err(e) => {
                    broken = Some(e);
                    None
                }
            }
        }
    };
    if let Some(e) = &broken {
        tracing::error!("LLM provider {name} cannot be called on this node: {e}");
    }
    let host = p
        .base_url
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().to_string()))
        .and_then(|a| HeaderValue::from_str(&a).ok())
        .unwrap_or(HeaderValue::from_static("localhost"));
    Provider {
        name: Arc::from(name),
        kind: p.kind,
        path: p.path.clone(),
        host,
        auth,
        api_version: p.api_version.clone(),
        headers: p
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect(),
        broken,
    }
}
