//! Serving one LLM request: read and check the body, pick deployments, call the provider
//! (falling back while nothing has reached the client), translate the answer or relay the
//! stream, and keep the usage record the meter stage writes.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future as _;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry::KeyValue;
use serde_json::{Value, json};

use super::ir::{ChatRequest, ChatResponse, Delta, Unsupported, Usage};
use super::spec::{ModelKind, ProviderKind, RoutingStrategy};
use super::{
    Deployment, Dialect, Endpoint, Live, LlmApi, Model, anthropic, gemini, openai, responses, sse,
    tokens,
};
use crate::proxy::body::{BodyStats, RequestBody, ResponseBody};
use crate::proxy::client::{self, PooledSender, UpstreamHead};
use crate::proxy::phases::{Tail, Worker};
use crate::proxy::respond::ProxyError;
use crate::state::snapshot::Snapshot;

/// The most bytes of a provider's whole (non-streamed) answer the gateway reads.
const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;
/// The most output text a stream keeps for counting, should the provider report none.
const MAX_COUNTED_TEXT: usize = 64 * 1024;

/// What one LLM request did, for the meter stage (usage rows, metrics, access log, span).
#[derive(Debug, Default)]
pub struct Record {
    /// The model the caller asked for.
    pub model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub deployment: Option<Arc<str>>,
    /// The provider's model id that was called.
    pub upstream_model: Option<Arc<str>>,
    /// The deployment's upstream cluster.
    pub cluster: Option<Arc<str>>,
    /// The model and id the provider's answer named.
    pub response_model: String,
    pub response_id: String,
    pub operation: &'static str,
    pub stream: bool,
    pub usage: Usage,
    pub input_reported: bool,
    pub output_reported: bool,
    /// Some count was made by the gateway, not reported by the provider.
    pub estimated: bool,
    pub ttft: Option<Duration>,
    /// First token to the last.
    pub output_time: Option<Duration>,
    pub finish: Option<String>,
    /// Deployments tried before the one that answered (or all of them).
    pub fallbacks: u32,
    /// Each provider call: (deployment, provider, failed).
    pub calls: Vec<(Arc<str>, Arc<str>, bool)>,
    /// The stream ended without the provider's end (cut, error, client gone).
    pub incomplete: bool,
    /// What the estimate counts from.
    prompt: Option<Arc<ChatRequest>>,
    out_text: String,
    out_bytes: u64,
    /// Content capture is on: the answer's text goes into the span.
    pub capture: bool,
    /// The tenant's prices (for the cost it is told) and what the request holds against
    /// its budget and token quotas.
    pub price: Option<Arc<crate::state::billing::PriceNow>>,
    pub holds: Option<super::limits::Holds>,
    /// Answered from the response cache; or, on a miss, where the answer goes once whole.
    pub cached: bool,
    pub cache_fill: Option<CacheFill>,
}

/// A stream's answer on its way into the response cache (kept only if it ends whole).
#[derive(Debug)]
pub struct CacheFill {
    cache: Arc<super::cache::ResponseCache>,
    key: [u8; 32],
    ttl: std::time::Duration,
    buf: Vec<u8>,
}

/// Token counts as billing takes them.
pub fn llm_tokens(u: &Usage) -> crate::state::billing::LlmTokens {
    crate::state::billing::LlmTokens {
        input: u.input,
        output: u.output,
        cached_input: u.cached_input,
        cache_write: u.cache_write,
        reasoning: u.reasoning,
    }
}

impl Record {
    /// What the request costs at the tenant's prices, as its usage stands (attos), and
    /// the currency. None: the tenant is on no plan.
    pub fn cost(&self) -> Option<(u128, &str)> {
        let p = self.price.as_ref()?;
        if self.cached {
            let cost = u128::from(p.prices.per_1k_cached_requests) * 1_000_000;
            return Some((cost, &p.prices.currency));
        }
        let model = self.model.as_deref()?;
        let cost = p.prices.request_cost(
            model,
            self.deployment.as_deref().unwrap_or(""),
            self.upstream_model.as_deref().unwrap_or(""),
            &llm_tokens(&self.usage),
        );
        Some((cost, &p.prices.currency))
    }

    /// The request is over (its usage settled and metered): its holds take the final
    /// usage; the budget's share is followed into the committed spend.
    pub fn finish_holds(&mut self, meter: Option<&crate::metering::Meter>) {
        let Some(holds) = self.holds.take() else {
            return;
        };
        let answered = self.calls.last().is_some_and(|c| !c.2);
        let spent = holds.finish(
            self.model.as_deref().unwrap_or(""),
            self.deployment.as_deref().unwrap_or(""),
            self.upstream_model.as_deref().unwrap_or(""),
            self.price.as_deref(),
            &llm_tokens(&self.usage),
            answered,
        );
        if let Some(meter) = meter {
            for (subject, nanos) in spent {
                meter.spend.record(&subject, nanos);
            }
        }
    }

    fn observe(&mut self, d: &Delta, since: Instant) {
        match d {
            Delta::Start { id, model } => {
                self.response_id.clone_from(id);
                self.response_model.clone_from(model);
            }
            Delta::Text(t) | Delta::ToolArgs { json: t, .. } => {
                self.first_token(since);
                self.out_bytes += t.len() as u64;
                if self.out_text.len() + t.len() <= MAX_COUNTED_TEXT {
                    self.out_text.push_str(t);
                }
            }
            Delta::ToolStart { name, .. } => {
                self.first_token(since);
                self.out_bytes += name.len() as u64;
                if self.out_text.len() + name.len() <= MAX_COUNTED_TEXT {
                    self.out_text.push_str(name);
                }
            }
            Delta::Finish(f) => self.finish = Some(format!("{f:?}").to_lowercase()),
            Delta::Usage(u) => {
                if u.input > 0 {
                    self.input_reported = true;
                }
                if u.output > 0 {
                    self.output_reported = true;
                }
                self.usage.merge(u);
            }
            Delta::Done | Delta::Error { .. } => {}
        }
    }

    /// An attempt at deployment `d` begins: what the record names is `d`, and what a
    /// failed attempt saw is forgotten (it answered nothing the caller got).
    fn attempt(&mut self, d: &Deployment) {
        self.provider = Some(d.provider.name.clone());
        self.deployment = Some(d.name.clone());
        self.upstream_model = Some(d.model.clone());
        self.cluster = Some(d.cluster.name.clone());
        self.usage = Usage::default();
        self.input_reported = false;
        self.output_reported = false;
        self.estimated = false;
        self.ttft = None;
        self.output_time = None;
        self.finish = None;
        self.incomplete = false;
        self.response_id.clear();
        self.response_model.clear();
        self.out_text.clear();
        self.out_bytes = 0;
    }

    fn first_token(&mut self, since: Instant) {
        if self.ttft.is_none() {
            self.ttft = Some(since.elapsed());
        }
    }

    /// Counts what the provider did not report (called once, at the meter stage).
    pub fn settle(&mut self) {
        let Some(model) = self.upstream_model.clone() else {
            return;
        };
        self.count_missing(&model);
        if !self.capture {
            self.out_text = String::new();
        }
    }

    pub fn count_missing(&mut self, model: &str) {
        if !self.input_reported
            && let Some(req) = &self.prompt
        {
            self.usage.input = tokens::count_prompt(model, req);
            self.estimated = true;
        }
        if !self.output_reported && self.out_bytes > 0 {
            let counted = tokens::count(model, &self.out_text);
            // Past what was kept, in proportion to the bytes.
            let kept = self.out_text.len().max(1) as u64;
            self.usage.output = counted * self.out_bytes / kept;
            self.estimated = true;
        }
        self.prompt = None;
    }

    /// What metering counts, once settled. None when the request named no model.
    pub fn sample(&self) -> Option<crate::metering::LlmSample> {
        let model = self.model.clone()?;
        let answered = self.calls.last().is_some_and(|c| !c.2);
        Some(crate::metering::LlmSample {
            model,
            provider: if answered {
                self.provider.clone().unwrap_or_else(|| Arc::from(""))
            } else {
                Arc::from("")
            },
            deployment: if answered {
                self.deployment.clone().unwrap_or_else(|| Arc::from(""))
            } else {
                Arc::from("")
            },
            upstream_model: self.upstream_model.clone().unwrap_or_else(|| Arc::from("")),
            usage: if answered {
                self.usage
            } else {
                Usage::default()
            },
            estimated: answered && self.estimated,
            calls: self.calls.clone(),
            ttft_us: self.ttft.filter(|_| answered).map(|t| t.as_micros() as u64),
            output_us: self
                .output_time
                .filter(|_| answered && self.stream)
                .map(|t| t.as_micros() as u64),
            incomplete: self.incomplete,
            upstream: self.cluster.clone(),
            response_id: if answered {
                self.response_id.clone()
            } else {
                String::new()
            },
            response_model: self.response_model.clone(),
            finish: self.finish.clone(),
            output_text: self.capture.then(|| self.out_text.clone()),
            cached: self.cached,
        })
    }
}

/// The prompt as the GenAI conventions' `gen_ai.input.messages` (role and text parts),
/// for content capture; at most 64 KiB.
fn input_messages(chat: &ChatRequest) -> String {
    use super::ir::{Part, Role};
    let mut out = Vec::new();
    for s in &chat.system {
        out.push(json!({"role": "system", "parts": [{"type": "text", "content": s}]}));
    }
    for m in &chat.messages {
        let parts: Vec<Value> = m
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => json!({"type": "text", "content": t}),
                Part::Image(_) => json!({"type": "image"}),
                Part::ToolCall {
                    id,
                    name,
                    arguments,
                } => {
                    json!({"type": "tool_call", "id": id, "name": name, "arguments": arguments})
                }
                Part::ToolResult { id, .. } => json!({"type": "tool_call_response", "id": id}),
            })
            .collect();
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        out.push(json!({"role": role, "parts": parts}));
    }
    let mut text = Value::Array(out).to_string();
    if text.len() > 64 * 1024 {
        let mut cut = 64 * 1024;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The answering call's span gets what the answer said (GenAI conventions).
pub fn span_answer(c: &mut crate::telemetry::traces::ClientSpan, s: &crate::metering::LlmSample) {
    c.attributes.extend([
        KeyValue::new("gen_ai.usage.input_tokens", s.usage.input as i64),
        KeyValue::new("gen_ai.usage.output_tokens", s.usage.output as i64),
    ]);
    if !s.response_model.is_empty() {
        c.attributes.push(KeyValue::new(
            "gen_ai.response.model",
            s.response_model.clone(),
        ));
    }
    if !s.response_id.is_empty() {
        c.attributes
            .push(KeyValue::new("gen_ai.response.id", s.response_id.clone()));
    }
    if let Some(f) = &s.finish {
        c.attributes.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(opentelemetry::Array::String(vec![f.clone().into()])),
        ));
    }
    if s.estimated {
        c.attributes
            .push(KeyValue::new("tollgate.llm.usage_estimated", true));
    }
    if let Some(text) = &s.output_text {
        let out = json!([{"role": "assistant", "parts": [{"type": "text", "content": text}]}]);
        c.attributes
            .push(KeyValue::new("gen_ai.output.messages", out.to_string()));
    }
    if s.incomplete {
        c.error = true;
        c.attributes
            .push(KeyValue::new("error.type", "stream_incomplete"));
    }
}

/// The LLM metrics of a finished request (docs/llm.md, "Telemetry").
pub fn record_metrics(s: &crate::metering::LlmSample) {
    if s.provider.is_empty() {
        return;
    }
    let (model, provider) = (s.model.to_string(), s.provider.to_string());
    let u = &s.usage;
    for (kind, n) in [
        ("input", u.input),
        ("output", u.output),
        ("cached_input", u.cached_input),
        ("cache_write", u.cache_write),
        ("reasoning", u.reasoning),
    ] {
        if n > 0 {
            metrics::counter!("tollgate_llm_tokens_total", "model" => model.clone(),
                "provider" => provider.clone(), "type" => kind)
            .increment(n);
        }
    }
    if let Some(t) = s.ttft_us {
        metrics::histogram!("tollgate_llm_time_to_first_token_seconds", "model" => model.clone(),
            "provider" => provider.clone())
        .record(t as f64 / 1e6);
    }
    if let Some(us) = s.output_us
        && u.output > 1
    {
        metrics::histogram!("tollgate_llm_time_per_output_token_seconds", "model" => model,
            "provider" => provider)
        .record(us as f64 / 1e6 / (u.output - 1) as f64);
    }
}

/// An LLM error in the caller's dialect, as a response (status, headers and body).
pub fn dialect_error(
    dialect: Dialect,
    status: StatusCode,
    code: &str,
    message: &str,
    param: Option<&str>,
) -> Bytes {
    let mut body = match dialect {
        Dialect::OpenAi | Dialect::Responses => json!({"error": {
            "message": message,
            "type": openai_type(status),
            "param": param,
            "code": code,
        }}),
        Dialect::Anthropic => json!({"type": "error", "error": {
            "type": anthropic_type(status),
            "message": message,
        }}),
    }
    .to_string();
    body.push('\n');
    Bytes::from(body)
}

fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 404 | 405 | 409 | 410 | 413 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "insufficient_quota",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "api_error",
    }
}

fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Rewrites a gateway error response into the caller's dialect, keeping its status and
/// headers (`Retry-After`, `RateLimit-*`).
pub fn into_dialect(dialect: Dialect, err: &ProxyError, resp: &mut Response<ResponseBody>) {
    let param = match err {
        ProxyError::Llm { param, .. } => param.as_deref(),
        _ => None,
    };
    let message = match err {
        ProxyError::BodyTooLarge => {
            "the request body is larger than this gateway accepts".to_string()
        }
        other => other.to_string(),
    };
    *resp.body_mut() = ResponseBody::full(dialect_error(
        dialect,
        resp.status(),
        err.code(),
        &message,
        param,
    ));
    resp.headers_mut().remove(header::CONTENT_LENGTH);
}

fn bad(message: impl Into<String>) -> ProxyError {
    llm_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        message.into(),
        None,
    )
}

fn llm_error(
    status: StatusCode,
    code: &'static str,
    message: String,
    param: Option<String>,
) -> ProxyError {
    ProxyError::Llm {
        status,
        code,
        message,
        param,
        retry_after_s: None,
    }
}

/// Serves an LLM endpoint. `allowed`: the models the caller's key may use (None: all).
/// Who calls an LLM endpoint: the models their key may use (None: all) and the API's
/// owner (what `/v1/models` names).
pub struct Caller<'a> {
    pub allowed: Option<&'a [Arc<str>]>,
    pub owner: &'a str,
    /// Who pays, and the limits on what they may spend.
    pub spending: super::limits::Spending,
}

pub async fn serve(
    req: Request<Incoming>,
    worker: &Rc<Worker>,
    snapshot: &Snapshot,
    (llm, endpoint): (&LlmApi, Endpoint),
    caller: Caller<'_>,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, ProxyError> {
    let record = Rc::new(RefCell::new(Record {
        operation: endpoint.operation(),
        capture: worker.shared.llm_capture,
        price: caller.spending.price.clone(),
        ..Record::default()
    }));
    tail.llm = Some(record.clone());
    let Caller {
        allowed,
        owner,
        spending,
    } = caller;
    let may_use = |m: &str| allowed.is_none_or(|a| a.iter().any(|x| &**x == m));
    if endpoint == Endpoint::Models {
        let anthropic = req.headers().contains_key("anthropic-version");
        return Ok(list_models(llm, &may_use, owner, anthropic));
    }
    let limits = &worker.shared.limits;
    let path = req.uri().path().to_string();
    let wants_stream = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    // Only what the response cache reads of the headers, and only when it may.
    let cache_headers = llm.cache.and(worker.shared.llm_cache.as_ref()).map(|_| {
        let mut h = http::HeaderMap::new();
        for v in req.headers().get_all(header::CACHE_CONTROL) {
            h.append(header::CACHE_CONTROL, v.clone());
        }
        h
    });
    let body = req.into_body();
    let body = RequestBody::new(
        body,
        limits.max_request_body,
        tail.request_stats.clone(),
        None,
    );
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.is::<crate::proxy::body::BodyTooLarge>() {
                return Err(ProxyError::BodyTooLarge);
            }
            return Err(bad(format!("the request body could not be read: {e}")));
        }
    };
    let dialect = endpoint.dialect();
    let mut doc: Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))?;
    if let Some(g) = &llm.guard
        && endpoint != Endpoint::Prompt
    {
        guard(g, &mut doc)?;
    }
    if endpoint == Endpoint::Prompt {
        let name = path.rsplit('/').next().unwrap_or_default();
        let call = PromptCall {
            name,
            variables: doc,
            stream: wants_stream,
            body_len: bytes.len(),
        };
        return prompt_api(
            worker, snapshot, llm, call, &may_use, &record, &spending, tail,
        )
        .await;
    }
    let model_name = doc
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            llm_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "`model` is required: name one of the models GET /v1/models lists".into(),
                Some("model".into()),
            )
        })?
        .to_string();
    let model = llm.models.get(model_name.as_str()).ok_or_else(|| {
        llm_error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("the model `{model_name}` does not exist here; GET /v1/models lists the models you may use"),
            Some("model".into()),
        )
    })?;
    if !may_use(&model_name) {
        return Err(llm_error(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!(
                "this API key may not use the model `{model_name}`; ask for a key that includes it"
            ),
            Some("model".into()),
        ));
    }
    record.borrow_mut().model = Some(model.name.clone());
    match endpoint {
        Endpoint::Embeddings => {
            if model.kind != ModelKind::Embedding {
                return Err(bad(format!(
                    "`{model_name}` is a chat model, not an embedding model"
                )));
            }
            return embeddings(worker, snapshot, llm, model, doc, &record, tail).await;
        }
        _ if model.kind == ModelKind::Embedding => {
            return Err(bad(format!(
                "`{model_name}` is an embedding model; call /v1/embeddings"
            )));
        }
        _ => {}
    }
    if endpoint == Endpoint::CountTokens
        && let Some(o) = doc.as_object_mut()
    {
        // count_tokens takes no max_tokens; the parser wants one.
        o.entry("max_tokens").or_insert(json!(1));
    }
    let chat = match dialect {
        Dialect::OpenAi => openai::parse_chat(&doc),
        Dialect::Anthropic => anthropic::parse_messages(&doc),
        Dialect::Responses => responses::parse(&doc),
    }
    .map_err(bad)?;
    let chat = Arc::new(chat);
    if endpoint == Endpoint::CountTokens {
        return count_tokens(worker, snapshot, model, &doc, &chat, &record, tail).await;
    }
    let mut miss = None;
    if let (Some(settings), Some(cache), Some(headers)) =
        (llm.cache, &worker.shared.llm_cache, &cache_headers)
    {
        if super::cache::cacheable(&settings, &doc, headers) {
            let tenant = spending.tenant.as_deref().unwrap_or("");
            let key = super::cache::key(tenant, &llm.version, endpoint.name(), chat.stream, &doc);
            if let Some(hit) = cache.get(&key) {
                metrics::counter!("tollgate_llm_cache_total", "result" => "hit").increment(1);
                let mut r = record.borrow_mut();
                (r.cached, r.stream) = (true, chat.stream);
                let body = if chat.stream {
                    super::cache::without_cost(&hit.body)
                } else {
                    hit.body.clone()
                };
                let mut resp = Response::new(ResponseBody::full(body));
                let h = resp.headers_mut();
                h.insert(header::CONTENT_TYPE, hit.content_type.clone());
                h.insert("x-tollgate-cache", HeaderValue::from_static("hit"));
                cost_headers(&r, h);
                return Ok(resp);
            }
            metrics::counter!("tollgate_llm_cache_total", "result" => "miss").increment(1);
            if chat.stream {
                record.borrow_mut().cache_fill = Some(CacheFill {
                    cache: cache.clone(),
                    key,
                    ttl: settings.ttl,
                    buf: Vec::new(),
                });
            }
            miss = Some((cache.clone(), key, settings.ttl));
        } else {
            metrics::counter!("tollgate_llm_cache_total", "result" => "bypass").increment(1);
        }
    }
    let mut resp = dispatch(
        worker,
        snapshot,
        llm,
        model,
        dialect,
        doc,
        bytes.len(),
        chat,
        &record,
        &spending,
        tail,
    )
    .await?;
    // A whole answer goes into the cache now; a stream's once it ended whole (the relay).
    if let Some((cache, key, ttl)) = &miss
        && let Some(whole) = resp.body().full_bytes()
        && resp.status() == StatusCode::OK
        && let Some(ct) = resp.headers().get(header::CONTENT_TYPE)
    {
        cache.insert(*key, whole, ct.clone(), *ttl);
    }
    if cache_headers.is_some() {
        let state = if miss.is_some() { "miss" } else { "bypass" };
        resp.headers_mut()
            .insert("x-tollgate-cache", HeaderValue::from_static(state));
    }
    Ok(resp)
}

/// The version's prompt guard over a request: secrets and PII masked, or a 400 that names
/// the class found.
fn guard(g: &super::guard::GuardSpec, doc: &mut Value) -> Result<(), ProxyError> {
    g.apply(doc).map(|_| ()).map_err(|r| {
        llm_error(
            StatusCode::BAD_REQUEST,
            "sensitive_data",
            r.message(),
            Some(r.class.name().to_string()),
        )
    })
}

/// A call of a prompt API: its name, the caller's variables, whether it streams.
struct PromptCall<'a> {
    name: &'a str,
    variables: Value,
    stream: bool,
    body_len: usize,
}

/// `POST <base>/<name>`: renders the prompt with the variables, calls its model like a
/// chat completion, and answers `{id, model, prompt, output, finish_reason, usage}` (the
/// output checked against the prompt's output schema), or streams chat completion chunks.
#[allow(clippy::too_many_arguments)]
async fn prompt_api(
    worker: &Rc<Worker>,
    snapshot: &Snapshot,
    llm: &LlmApi,
    call: PromptCall<'_>,
    may_use: &dyn Fn(&str) -> bool,
    record: &Rc<RefCell<Record>>,
    spending: &super::limits::Spending,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, ProxyError> {
    let prompt = llm.prompts.get(call.name).ok_or_else(|| {
        llm_error(
            StatusCode::NOT_FOUND,
            "prompt_not_found",
            format!("there is no prompt `{}` in this version", call.name),
            None,
        )
    })?;
    let model = llm.models.get(&prompt.model).ok_or_else(|| {
        llm_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_deployment_available",
            format!("the prompt's model `{}` is not served", prompt.model),
            None,
        )
    })?;
    if !may_use(&model.name) {
        return Err(llm_error(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!(
                "this API key may not use the model `{}` that prompt `{}` calls",
                model.name, prompt.name
            ),
            None,
        ));
    }
    // Structured output where every deployment's provider takes a schema.
    let native = model
        .deployments
        .iter()
        .all(|d| Wire::of(d.provider.kind) != Wire::Anthropic);
    let doc = prompt
        .render(call.variables, call.stream, native)
        .map_err(|e| {
            llm_error(
                StatusCode::BAD_REQUEST,
                "invalid_variable",
                e.message,
                (!e.field.is_empty()).then_some(e.field),
            )
        })?;
    let mut doc = doc;
    if let Some(g) = &llm.guard {
        guard(g, &mut doc)?;
    }
    let chat = openai::parse_chat(&doc).map_err(bad)?;
    record.borrow_mut().model = Some(model.name.clone());
    let resp = dispatch(
        worker,
        snapshot,
        llm,
        model,
        Dialect::OpenAi,
        doc,
        call.body_len,
        Arc::new(chat),
        record,
        spending,
        tail,
    )
    .await?;
    let Some(bytes) = resp.body().full_bytes() else {
        return Ok(resp); // a stream: chat completion chunks
    };
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let output = prompt.output(text).map_err(|why| {
        llm_error(
            StatusCode::BAD_GATEWAY,
            "invalid_output",
            format!("prompt `{}`: {why}", prompt.name),
            None,
        )
    })?;
    let answer = json!({
        "id": v["id"],
        "object": "prompt.result",
        "prompt": prompt.name.to_string(),
        "model": v["model"],
        "output": output,
        "finish_reason": v["choices"][0]["finish_reason"],
        "usage": v["usage"],
    });
    let (parts, _) = resp.into_parts();
    let mut out = Response::from_parts(parts, ResponseBody::full(answer.to_string()));
    out.headers_mut().remove(header::CONTENT_LENGTH);
    Ok(out)
}

fn list_models(
    llm: &LlmApi,
    may_use: &dyn Fn(&str) -> bool,
    owner: &str,
    anthropic: bool,
) -> Response<ResponseBody> {
    let names: Vec<&str> = llm
        .models
        .keys()
        .map(|m| &**m)
        .filter(|m| may_use(m))
        .collect();
    let body = if anthropic {
        let created = chrono::DateTime::from_timestamp(llm.created as i64, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        json!({
            "data": names.iter().map(|m| json!({"type": "model", "id": m, "display_name": m, "created_at": created})).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": names.first(),
            "last_id": names.last(),
        })
    } else {
        json!({
            "object": "list",
            "data": names.iter().map(|m| json!({"id": m, "object": "model", "created": llm.created, "owned_by": owner})).collect::<Vec<_>>(),
        })
    };
    json_response(StatusCode::OK, body.to_string())
}

fn json_response(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Why a provider call failed, as the fallback logic and the metrics see it.
#[derive(Debug)]
struct Failure {
    kind: &'static str,
    status: StatusCode,
    message: String,
    retry_after_s: Option<u64>,
    /// The caller's fault: answered as is, never tried elsewhere.
    caller: bool,
}

impl Failure {
    fn into_error(self) -> ProxyError {
        let code = match self.kind {
            "rate_limited" => "rate_limit_exceeded",
            "context_window" => "context_length_exceeded",
            "timeout" | "first_token_timeout" => "provider_timeout",
            "invalid_request" => "invalid_request",
            "circuit_open" => "no_deployment_available",
            _ => "provider_error",
        };
        ProxyError::Llm {
            status: self.status,
            code,
            message: self.message,
            param: None,
            retry_after_s: self.retry_after_s,
        }
    }
}

/// The deployments to try, in order: the model's by its strategy, then its fallbacks'.
fn plan<'a>(
    llm: &'a LlmApi,
    model: &'a Model,
    snapshot: &Snapshot,
    region: Option<&str>,
) -> Vec<(&'a Model, &'a Deployment)> {
    let mut out = Vec::new();
    order(model, snapshot, region, &mut out);
    for f in &model.fallbacks {
        if let Some(m) = llm.models.get(f) {
            order(m, snapshot, region, &mut out);
        }
    }
    out
}

/// The plan's deployments by index into `model.deployments` (for the unit tests).
#[cfg(test)]
pub(crate) fn plan_for_tests(
    llm: &LlmApi,
    model: &Model,
    snapshot: &Snapshot,
    region: Option<&str>,
) -> Vec<usize> {
    plan(llm, model, snapshot, region)
        .into_iter()
        .map(|(_, d)| {
            model
                .deployments
                .iter()
                .position(|x| std::ptr::eq(x, d))
                .expect("the model's own")
        })
        .collect()
}

fn order<'a>(
    model: &'a Model,
    snapshot: &Snapshot,
    region: Option<&str>,
    out: &mut Vec<(&'a Model, &'a Deployment)>,
) {
    let now = crate::actor::wall_ms();
    let mut ds: Vec<&Deployment> = model.deployments.iter().collect();
    // Usable first: not cooling down after a 429, with headroom at its provider (as the
    // cluster-wide lease last said), circuit not open.
    let usable = |d: &Deployment| {
        d.live.cooldown_until_ms.load(Ordering::Relaxed) <= now
            && d.live.limited_until_ms.load(Ordering::Relaxed) <= now
            && circuit_allows(snapshot, d) != CircuitVerdict::Open
            && d.provider.broken.is_none()
    };
    match model.strategy {
        RoutingStrategy::Priority => ds.sort_by_key(|d| d.priority),
        RoutingStrategy::LeastInFlight => {
            fastrand::shuffle(&mut ds);
            ds.sort_by_key(|d| d.live.in_flight.load(Ordering::Relaxed));
        }
        RoutingStrategy::LowestLatency => {
            fastrand::shuffle(&mut ds);
            if ds.len() >= 2 {
                // Power of two choices: of two at random, the faster first.
                let ttft = |d: &Deployment| match d.live.ttft_ewma_us.load(Ordering::Relaxed) {
                    0 => 0, // unknown: try it
                    t => t,
                };
                if ttft(ds[1]) < ttft(ds[0]) {
                    ds.swap(0, 1);
                }
            }
        }
        RoutingStrategy::Weighted => {
            // Weighted order without replacement (Efraimidis-Spirakis keys).
            let mut keyed: Vec<(f64, &Deployment)> = ds
                .iter()
                .map(|d| (fastrand::f64().powf(1.0 / f64::from(d.weight.max(1))), *d))
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            ds = keyed.into_iter().map(|(_, d)| d).collect();
        }
    }
    if let Some(r) = region {
        // Stable: keeps the strategy's order within each group.
        ds.sort_by_key(|d| match d.region.as_deref() {
            Some(dr) if dr == r => 0,
            None => 1,
            Some(_) => 2,
        });
    }
    ds.sort_by_key(|d| !usable(d));
    out.extend(ds.into_iter().map(|d| (model, d)));
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum CircuitVerdict {
    Closed,
    Open,
    /// Half-open and this node holds a probe permit.
    Probe,
}

fn circuit_allows(snapshot: &Snapshot, d: &Deployment) -> CircuitVerdict {
    use crate::state::circuit::{Phase, phase};
    let state = snapshot.circuits.get(&*d.cluster.name);
    match phase(state, crate::actor::wall_ms()) {
        Phase::Closed => CircuitVerdict::Closed,
        Phase::Open { .. } => CircuitVerdict::Open,
        Phase::HalfOpen => match (&d.cluster.circuit, state) {
            (Some(b), Some(s)) if b.take_permit(s.since_index, crate::actor::wall_ms()) => {
                CircuitVerdict::Probe
            }
            (Some(_), Some(_)) => CircuitVerdict::Open,
            _ => CircuitVerdict::Closed,
        },
    }
}

/// The provider request: path, headers and body, for the caller's request.
fn provider_request(
    d: &Deployment,
    dialect: Dialect,
    doc: &Value,
    chat: &ChatRequest,
    stream: bool,
) -> Result<(String, Bytes), Unsupported> {
    let p = &d.provider;
    let model = &*d.model;
    let (path, body) = match p.kind {
        ProviderKind::Openai | ProviderKind::AzureOpenai => {
            let body = if dialect == Dialect::OpenAi {
                let mut o = doc.as_object().cloned().unwrap_or_default();
                openai::patch_passthrough(&mut o, model, stream);
                if p.kind == ProviderKind::AzureOpenai {
                    o.remove("model");
                }
                Value::Object(o)
            } else {
                let mut b = openai::build_chat(chat, model)?;
                if p.kind == ProviderKind::AzureOpenai
                    && let Some(o) = b.as_object_mut()
                {
                    o.remove("model");
                }
                b
            };
            let path = match p.kind {
                ProviderKind::AzureOpenai => format!(
                    "{}/deployments/{model}/chat/completions?api-version={}",
                    p.path,
                    p.api_version.as_deref().unwrap_or_default()
                ),
                _ => format!("{}/chat/completions", p.path),
            };
            (path, body)
        }
        ProviderKind::Anthropic => {
            let body = if dialect == Dialect::Anthropic {
                let mut o = doc.as_object().cloned().unwrap_or_default();
                anthropic::patch_passthrough(&mut o, model);
                Value::Object(o)
            } else {
                anthropic::build_messages(chat, model)?
            };
            (format!("{}/v1/messages", p.path), body)
        }
        ProviderKind::Gemini => {
            let verb = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            (
                format!("{}/models/{model}:{verb}", p.path),
                gemini::build(chat)?,
            )
        }
    };
    Ok((path, Bytes::from(body.to_string())))
}

fn head_for(
    d: &Deployment,
    path: &str,
    stream: bool,
    tail: &mut Tail,
) -> Result<UpstreamHead, ProxyError> {
    let p = &d.provider;
    let uri: Uri = path
        .parse()
        .map_err(|e| bad(format!("the provider path {path:?} is not valid: {e}")))?;
    let mut headers = http::HeaderMap::new();
    headers.insert(header::HOST, p.host.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::ACCEPT,
        HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    if let Some((name, value)) = &p.auth {
        headers.insert(name.clone(), value.clone());
    }
    if p.kind == ProviderKind::Anthropic {
        let v = p.api_version.as_deref().unwrap_or("2023-06-01");
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert("anthropic-version", v);
        }
    }
    for (k, v) in &p.headers {
        headers.insert(k.clone(), v.clone());
    }
    if let Some(trace) = tail.trace_mut() {
        let tp = trace.start_client(&Method::POST);
        headers.insert("traceparent", tp);
    }
    Ok(UpstreamHead {
        method: Method::POST,
        uri,
        headers,
    })
}

/// Sorts a provider's error answer: whose fault, and whether another deployment may do.
fn classify(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Failure {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| text.trim().chars().take(500).collect());
    let lower = message.to_ascii_lowercase();
    let context = lower.contains("context length")
        || lower.contains("context_length")
        || lower.contains("context window")
        || lower.contains("prompt is too long")
        || lower.contains("maximum context")
        || text.contains("context_length_exceeded");
    // Gemini says when to retry in the body (`RetryInfo.retryDelay`, "15s").
    let retry_after_s = retry_after(headers).or_else(|| {
        let v: Value = serde_json::from_slice(body).ok()?;
        v.pointer("/error/details")?
            .as_array()?
            .iter()
            .find_map(|d| d.get("retryDelay")?.as_str())
            .and_then(|d| humantime::parse_duration(d).ok())
            .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    });
    let (kind, caller) = match status.as_u16() {
        429 => ("rate_limited", false),
        400 | 413 if context => ("context_window", false),
        408 => ("timeout", false),
        400 | 422 => ("invalid_request", true),
        401 | 403 => ("provider_auth", false),
        404 => ("provider_not_found", false),
        s if s >= 500 => ("server_error", false),
        _ => ("provider_error", false),
    };
    // The provider's words are the caller's to act on when the mistake is theirs.
    let message = if caller || kind == "context_window" {
        message
    } else {
        format!("the provider answered {}: {message}", status.as_u16())
    };
    let status = match kind {
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "context_window" | "invalid_request" => StatusCode::BAD_REQUEST,
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    Failure {
        kind,
        status,
        message,
        retry_after_s,
        caller,
    }
}

/// `retry-after` (seconds or an HTTP date) or `retry-after-ms`, in whole seconds.
fn retry_after(headers: &http::HeaderMap) -> Option<u64> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some((ms / 1000.0).ceil().max(1.0) as u64);
    }
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(s);
    }
    let at = httpdate_parse(v)?;
    Some(at.saturating_sub(crate::actor::wall_ms() / 1000).max(1))
}

fn httpdate_parse(v: &str) -> Option<u64> {
    chrono::DateTime::parse_from_rfc2822(v)
        .ok()
        .map(|d| d.timestamp().max(0) as u64)
}

/// Tries the plan's deployments until one answers (or, for a stream, sends its first
/// token); then answers the caller.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    worker: &Rc<Worker>,
    snapshot: &Snapshot,
    llm: &LlmApi,
    model: &Arc<Model>,
    dialect: Dialect,
    doc: Value,
    body_len: usize,
    chat: Arc<ChatRequest>,
    record: &Rc<RefCell<Record>>,
    spending: &super::limits::Spending,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, ProxyError> {
    let started = Instant::now();
    let stream = chat.stream;
    record.borrow_mut().stream = stream;
    let candidates = plan(llm, model, snapshot, worker.shared.region.as_deref());
    // The prompt's size against the windows: counted only when it might not fit.
    let windows: Vec<u64> = candidates
        .iter()
        .filter_map(|(_, d)| d.context_window)
        .collect();
    let mut prompt_tokens = None;
    if windows.len() == candidates.len()
        && !windows.is_empty()
        && tokens::upper_bound(body_len) > *windows.iter().min().expect("not empty")
    {
        let n = tokens::count_prompt(&candidates[0].1.model, &chat);
        let largest = *windows.iter().max().expect("not empty");
        if n > largest {
            return Err(llm_error(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!(
                    "the prompt is about {n} tokens, more than the largest context window of `{}` and its fallbacks ({largest} tokens); shorten it",
                    model.name
                ),
                Some("messages".into()),
            ));
        }
        prompt_tokens = Some(n);
    }
    // Token quotas and the budget: the worst case is taken before any provider is called.
    let limited =
        !spending.quotas.is_empty() || (!spending.budgets.is_empty() && spending.price.is_some());
    let provider_limited = candidates.iter().any(|(_, d)| d.tpm_def.is_some());
    let mut input = 0;
    if (limited || provider_limited)
        && let Some((_, first)) = candidates.first()
    {
        input = match prompt_tokens {
            Some(n) => n,
            None => tokens::reserve_prompt(&first.model, &chat),
        };
    }
    let max_output = chat.max_tokens.unwrap_or(model.max_output_tokens);
    let worst_tokens = input + max_output;
    if limited {
        let ask = super::limits::Ask {
            model: &model.name,
            input,
            max_output,
            stream,
            candidates: candidates
                .iter()
                .map(|(m, d)| (&*m.name, &*d.name, &*d.model))
                .collect(),
        };
        let holds = super::limits::Holds::reserve(&worker.shared.quotas, spending, &ask).await?;
        record.borrow_mut().holds = Some(holds);
    }
    let mut last: Option<Failure> = None;
    let mut unsupported: Option<Unsupported> = None;
    let mut attempts = 0u32;
    // After a context-window error only larger windows are worth trying.
    let mut need_window: Option<u64> = prompt_tokens;
    for (i, (m, d)) in candidates.iter().enumerate() {
        if attempts >= model.max_attempts {
            break;
        }
        if started.elapsed() >= model.timeout {
            break;
        }
        if let (Some(need), Some(w)) = (need_window, d.context_window)
            && w < need
        {
            continue;
        }
        if d.provider.broken.is_some() {
            continue;
        }
        let verdict = circuit_allows(snapshot, d);
        if verdict == CircuitVerdict::Open {
            last.get_or_insert(Failure {
                kind: "circuit_open",
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "the circuit breaker of deployment {} of `{}` is open",
                    d.name, m.name
                ),
                retry_after_s: Some(1),
                caller: false,
            });
            continue;
        }
        let now = crate::actor::wall_ms();
        if d.live.cooldown_until_ms.load(Ordering::Relaxed) > now && i + 1 < candidates.len() {
            continue;
        }
        let (path, body) = match provider_request(d, dialect, &doc, &chat, stream) {
            Ok(x) => x,
            Err(u) => {
                unsupported.get_or_insert(u);
                continue;
            }
        };
        let quotas = &worker.shared.quotas;
        let mut provider_held = Vec::new();
        if d.tpm_def.is_some() || d.rpm_def.is_some() {
            match super::limits::provider_take(quotas, d, worst_tokens).await {
                Ok(held) => provider_held = held,
                Err(retry_after_s) => {
                    last.get_or_insert(Failure {
                        kind: "rate_limited",
                        status: StatusCode::TOO_MANY_REQUESTS,
                        message: format!(
                            "deployment {} of `{}` is at its provider's limit for this minute",
                            d.name, m.name
                        ),
                        retry_after_s: Some(retry_after_s),
                        caller: false,
                    });
                    continue;
                }
            }
        }
        attempts += 1;
        if attempts > 1 {
            record.borrow_mut().fallbacks += 1;
            metrics::counter!("tollgate_llm_fallbacks_total", "model" => model.name.to_string(),
                "reason" => last.as_ref().map_or("unsupported", |f| f.kind))
            .increment(1);
        }
        {
            let mut r = record.borrow_mut();
            r.attempt(d);
            r.prompt = Some(chat.clone());
        }
        let outcome = call(
            worker,
            d,
            m,
            dialect,
            &chat,
            path,
            body,
            verdict == CircuitVerdict::Probe,
            started,
            record,
            tail,
        )
        .await;
        match outcome {
            Ok(resp) => {
                if !provider_held.is_empty() {
                    record
                        .borrow_mut()
                        .holds
                        .get_or_insert_with(|| super::limits::Holds::new(quotas))
                        .keep_provider(provider_held);
                }
                return Ok(resp);
            }
            Err(f) => {
                // The call was made: its request counts, its tokens come back; a 429
                // says the provider has nothing left this window, for the whole cluster.
                super::limits::release(quotas, provider_held, false);
                if f.kind == "rate_limited" {
                    super::limits::provider_exhausted(quotas, d);
                }
                if f.caller {
                    return Err(f.into_error());
                }
                if f.kind == "context_window" {
                    need_window = Some(
                        need_window
                            .unwrap_or(0)
                            .max(d.context_window.map_or(u64::MAX, |w| w + 1)),
                    );
                }
                last = Some(f);
            }
        }
    }
    // Nothing answered.
    {
        let mut r = record.borrow_mut();
        r.prompt = None;
    }
    if let Some(f) = last {
        return Err(f.into_error());
    }
    if let Some(u) = unsupported {
        return Err(llm_error(
            StatusCode::BAD_REQUEST,
            "unsupported_parameter",
            format!(
                "`{}` cannot be sent to any provider of `{}`: {}; remove it",
                u.field, model.name, u.why
            ),
            Some(u.field),
        ));
    }
    if need_window.is_some() {
        return Err(llm_error(
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            format!(
                "the prompt does not fit the context window of any deployment of `{}`",
                model.name
            ),
            Some("messages".into()),
        ));
    }
    Err(llm_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_deployment_available",
        format!("no deployment of `{}` can take a request now", model.name),
        None,
    ))
}

/// One provider call. `Ok`: the caller's answer (the stream has its first token);
/// `Err`: why this deployment failed, before anything reached the caller.
#[allow(clippy::too_many_arguments)]
async fn call(
    worker: &Rc<Worker>,
    d: &Deployment,
    model: &Model,
    dialect: Dialect,
    chat: &Arc<ChatRequest>,
    path: String,
    body: Bytes,
    probe: bool,
    started: Instant,
    record: &Rc<RefCell<Record>>,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, Failure> {
    let stream = chat.stream;
    let head = head_for(d, &path, stream, tail).map_err(|e| Failure {
        kind: "provider_error",
        status: StatusCode::BAD_GATEWAY,
        message: e.to_string(),
        retry_after_s: None,
        caller: false,
    })?;
    let operation = record.borrow().operation;
    if let Some(c) = tail.trace_mut().and_then(|t| t.client()) {
        c.rename(format!("{operation} {}", d.model));
        c.attributes.extend([
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.provider.name", d.provider.kind.otel_name()),
            KeyValue::new("gen_ai.request.model", d.model.to_string()),
            KeyValue::new("gen_ai.request.stream", stream),
            KeyValue::new("tollgate.llm.model", model.name.to_string()),
            KeyValue::new("tollgate.llm.deployment", d.name.to_string()),
            KeyValue::new("tollgate.upstream", d.cluster.name.to_string()),
        ]);
        if let Some(t) = chat.temperature {
            c.attributes
                .push(KeyValue::new("gen_ai.request.temperature", t));
        }
        if let Some(n) = chat.max_tokens {
            c.attributes
                .push(KeyValue::new("gen_ai.request.max_tokens", n as i64));
        }
        if worker.shared.llm_capture {
            c.attributes
                .push(KeyValue::new("gen_ai.input.messages", input_messages(chat)));
        }
    }
    let result = call_inner(
        worker, d, model, dialect, chat, head, body, probe, started, record, tail,
    )
    .await;
    record
        .borrow_mut()
        .calls
        .push((d.name.clone(), d.provider.name.clone(), result.is_err()));
    if let Err(f) = &result {
        metrics::counter!("tollgate_llm_provider_errors_total",
            "provider" => d.provider.name.to_string(), "kind" => f.kind)
        .increment(1);
        if f.kind == "rate_limited" {
            // Not called again on this node before its retry-after.
            let secs = f.retry_after_s.unwrap_or(1).min(300);
            d.live
                .cooldown_until_ms
                .store(crate::actor::wall_ms() + secs * 1000, Ordering::Relaxed);
        }
        if let Some(c) = tail.trace_mut().and_then(|t| t.client()) {
            c.end();
            c.error = true;
            c.attributes.push(KeyValue::new("error.type", f.kind));
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn call_inner(
    worker: &Rc<Worker>,
    d: &Deployment,
    model: &Model,
    dialect: Dialect,
    chat: &Arc<ChatRequest>,
    head: UpstreamHead,
    body: Bytes,
    probe: bool,
    started: Instant,
    record: &Rc<RefCell<Record>>,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, Failure> {
    let stream = chat.stream;
    let stats = Rc::new(BodyStats::default());
    let sent = Instant::now();
    d.live.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(&d.live);
    let remaining = model.timeout.saturating_sub(started.elapsed());
    let wait_head = if stream {
        model.first_token_timeout.min(remaining)
    } else {
        remaining
    };
    let forwarded = tokio::time::timeout(
        wait_head,
        client::forward(
            &worker.pool,
            &d.cluster,
            head,
            RequestBody::full(body, stats.clone()),
            &stats,
            &mut tail.attempts,
        ),
    )
    .await;
    let breaker = d.cluster.circuit.as_ref();
    let fail = |kind: &'static str, status: StatusCode, message: String| {
        if let Some(b) = breaker {
            b.record(true, sent.elapsed(), probe);
        }
        Failure {
            kind,
            status,
            message,
            retry_after_s: None,
            caller: false,
        }
    };
    let fwd = match forwarded {
        Err(_) => {
            return Err(fail(
                if stream {
                    "first_token_timeout"
                } else {
                    "timeout"
                },
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "deployment {} of `{}` did not answer within {wait_head:?}",
                    d.name, model.name
                ),
            ));
        }
        Ok(Err(e)) => {
            let kind = match &e {
                ProxyError::UpstreamTimeout { .. } => "timeout",
                _ => "connect",
            };
            return Err(fail(
                kind,
                e.status(),
                format!("deployment {} of `{}`: {e}", d.name, model.name),
            ));
        }
        Ok(Ok(f)) => f,
    };
    let endpoint = tail.attempts.endpoint;
    if let Some(ep) = endpoint
        && let Some(client) = tail.trace_mut().and_then(|t| t.client())
    {
        client.attributes.extend([
            KeyValue::new("server.address", ep.ip().to_string()),
            KeyValue::new("server.port", i64::from(ep.port())),
        ]);
    }
    let status = fwd.response.status();
    let (parts, incoming) = fwd.response.into_parts();
    if status.is_success() && (d.tpm_def.is_some() || d.rpm_def.is_some()) {
        super::limits::provider_feedback(&worker.shared.quotas, d, &parts.headers);
    }
    if !status.is_success() {
        let body = read_limited(
            incoming,
            64 * 1024,
            remaining.saturating_sub(sent.elapsed()),
        )
        .await
        .unwrap_or_default();
        let f = classify(status, &parts.headers, &body);
        if let Some(b) = breaker {
            // The caller's mistakes and rate limits say nothing of the deployment's health.
            b.record(status.is_server_error(), sent.elapsed(), probe);
        }
        return Err(f);
    }
    if !stream {
        let rest = remaining.saturating_sub(sent.elapsed());
        let bytes = match read_limited(incoming, MAX_ANSWER_BYTES, rest).await {
            Ok(b) => b,
            Err(why) => {
                return Err(fail(
                    "server_error",
                    StatusCode::BAD_GATEWAY,
                    format!("deployment {}: {why}", d.name),
                ));
            }
        };
        fwd.conn.release();
        if let Some(b) = breaker {
            b.record(false, sent.elapsed(), probe);
        }
        d.live.record_ttft(sent.elapsed().as_micros() as u64);
        if record.borrow().operation == "embeddings" {
            return embedded(d, &bytes, started, record);
        }
        return answer(d, dialect, chat, &bytes, started, record);
    }
    // A stream: hold what arrives until the first token, so that a provider that fails
    // before it can still be replaced.
    let mut relay = Relay::new(
        incoming,
        fwd.conn,
        fwd.guards,
        d,
        dialect,
        chat,
        record.clone(),
        started,
        model,
    );
    let first = model.first_token_timeout.saturating_sub(sent.elapsed());
    let outcome =
        tokio::time::timeout(first, std::future::poll_fn(|cx| relay.poll_until_token(cx))).await;
    match outcome {
        Err(_) => Err(fail(
            "first_token_timeout",
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "deployment {} of `{}` sent no token within {:?}",
                d.name, model.name, model.first_token_timeout
            ),
        )),
        Ok(Err(why)) => Err(fail(
            "stream_failed",
            StatusCode::BAD_GATEWAY,
            format!("deployment {}: {why}", d.name),
        )),
        Ok(Ok(())) => {
            if let Some(b) = breaker {
                b.record(false, sent.elapsed(), probe);
            }
            if let Some(t) = record.borrow().ttft {
                d.live.record_ttft(t.as_micros() as u64);
            }
            relay.commit();
            let mut resp = Response::new(ResponseBody::llm(Box::new(relay)));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            Ok(resp)
        }
    }
}

struct InFlight<'a>(&'a Live);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn read_limited(body: Incoming, max: usize, within: Duration) -> Result<Bytes, String> {
    let limited = http_body_util::Limited::new(body, max);
    match tokio::time::timeout(within, limited.collect()).await {
        Err(_) => Err(format!("the answer did not arrive within {within:?}")),
        Ok(Err(e)) => Err(format!("the answer could not be read: {e}")),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// An embeddings answer, as OpenAI's: passed through from an OpenAI-compatible provider,
/// written from Gemini's (which reports no usage: the input is counted here).
fn embedded(
    d: &Deployment,
    bytes: &[u8],
    started: Instant,
    record: &Rc<RefCell<Record>>,
) -> Result<Response<ResponseBody>, Failure> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Failure {
        kind: "bad_answer",
        status: StatusCode::BAD_GATEWAY,
        message: format!(
            "deployment {} answered something that is not JSON: {e}",
            d.name
        ),
        retry_after_s: None,
        caller: false,
    })?;
    let mut r = record.borrow_mut();
    r.ttft = Some(started.elapsed());
    r.response_model = d.model.to_string();
    let body = match Wire::of(d.provider.kind) {
        Wire::Gemini => {
            let input = r.prompt.as_ref().map_or(0, |p| {
                p.messages
                    .iter()
                    .flat_map(|m| &m.parts)
                    .map(|p| match p {
                        super::ir::Part::Text(t) => tokens::count(&d.model, t),
                        _ => 0,
                    })
                    .sum()
            });
            r.usage.input = input;
            r.input_reported = true;
            r.output_reported = true;
            r.estimated = true;
            Bytes::from(gemini::embeddings_answer(&v, &d.model, input).to_string())
        }
        _ => {
            if let Some(u) = v.get("usage") {
                r.usage.input = u["prompt_tokens"].as_u64().unwrap_or(0);
                r.input_reported = true;
            }
            r.output_reported = true;
            Bytes::copy_from_slice(bytes)
        }
    };
    Ok(json_response_bytes(body))
}

fn json_response_bytes(body: Bytes) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A whole answer, in the caller's dialect.
fn answer(
    d: &Deployment,
    dialect: Dialect,
    chat: &ChatRequest,
    bytes: &[u8],
    started: Instant,
    record: &Rc<RefCell<Record>>,
) -> Result<Response<ResponseBody>, Failure> {
    let bad_answer = |why: String| Failure {
        kind: "bad_answer",
        status: StatusCode::BAD_GATEWAY,
        message: format!(
            "deployment {} answered something that is not a chat answer: {why}",
            d.name
        ),
        retry_after_s: None,
        caller: false,
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad_answer(e.to_string()))?;
    let wire = Wire::of(d.provider.kind);
    let parsed: ChatResponse = match wire {
        Wire::OpenAi => openai::parse_response(&v),
        Wire::Anthropic => anthropic::parse_response(&v),
        Wire::Gemini => gemini::parse_response(&v),
    }
    .map_err(bad_answer)?;
    {
        let mut r = record.borrow_mut();
        r.ttft = Some(started.elapsed());
        r.response_id.clone_from(&parsed.id);
        r.response_model.clone_from(&parsed.model);
        r.finish = Some(format!("{:?}", parsed.finish).to_lowercase());
        let reported = v.get("usage").is_some() || v.get("usageMetadata").is_some();
        if reported {
            r.usage = parsed.usage;
            r.input_reported = true;
            r.output_reported = true;
        }
        // The text, to count when the provider reported nothing, or for the trace.
        if !reported || r.capture {
            for p in &parsed.parts {
                if let super::ir::Part::Text(t) | super::ir::Part::ToolCall { arguments: t, .. } = p
                {
                    r.out_bytes += t.len() as u64;
                    if r.out_text.len() + t.len() <= MAX_COUNTED_TEXT {
                        r.out_text.push_str(t);
                    }
                }
            }
        }
    }
    let body = if wire.is(dialect) {
        Bytes::copy_from_slice(bytes)
    } else {
        let created = crate::actor::wall_ms() / 1000;
        let out = match dialect {
            Dialect::OpenAi => openai::render_response(&parsed, created),
            Dialect::Anthropic => anthropic::render_response(&parsed).map_err(bad_answer)?,
            Dialect::Responses => responses::render(&parsed, chat, created),
        };
        Bytes::from(out.to_string())
    };
    let mut resp = Response::new(ResponseBody::full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    {
        let mut r = record.borrow_mut();
        if r.price.is_some() {
            r.count_missing(&d.model);
            cost_headers(&r, resp.headers_mut());
        }
    }
    Ok(resp)
}

/// `x-tollgate-cost` (the request's cost at the tenant's prices, decimal) and
/// `x-tollgate-cost-currency`, when the tenant is on a plan.
fn cost_headers(r: &Record, h: &mut http::HeaderMap) {
    if let Some((cost, currency)) = r.cost()
        && let (Ok(c), Ok(cur)) = (
            HeaderValue::from_str(&crate::state::billing::format_atto(cost)),
            HeaderValue::from_str(currency),
        )
    {
        h.insert("x-tollgate-cost", c);
        h.insert("x-tollgate-cost-currency", cur);
    }
}

/// Adds `"tollgate": {"cost": .., "currency": ..}` to an SSE event's JSON object (the
/// stream's final usage event): SDKs keep fields they do not know.
fn with_cost(event: &[u8], cost: u128, currency: &str) -> Option<Bytes> {
    let at = event.windows(7).position(|w| w == b"data: {")? + 7;
    let ext = format!(
        "\"tollgate\":{{\"cost\":\"{}\",\"currency\":\"{currency}\"}},",
        crate::state::billing::format_atto(cost)
    );
    let mut out = Vec::with_capacity(event.len() + ext.len());
    out.extend_from_slice(&event[..at]);
    out.extend_from_slice(ext.as_bytes());
    out.extend_from_slice(&event[at..]);
    Some(Bytes::from(out))
}

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Wire {
    fn of(kind: ProviderKind) -> Wire {
        match kind {
            ProviderKind::Openai | ProviderKind::AzureOpenai => Wire::OpenAi,
            ProviderKind::Anthropic => Wire::Anthropic,
            ProviderKind::Gemini => Wire::Gemini,
        }
    }

    /// Whether it is the caller's dialect (then answers pass through).
    fn is(self, dialect: Dialect) -> bool {
        matches!(
            (self, dialect),
            (Wire::OpenAi, Dialect::OpenAi) | (Wire::Anthropic, Dialect::Anthropic)
        )
    }
}

enum Decode {
    OpenAi(openai::Decoder),
    Anthropic(anthropic::Decoder),
    Gemini(gemini::Decoder),
}

enum Encode {
    /// Same dialect: the provider's events as sent (less what the gateway asked for itself).
    Passthrough {
        strip_usage: bool,
    },
    OpenAi(openai::Encoder),
    Anthropic(anthropic::Encoder),
    Responses(Box<responses::Encoder>),
}

/// A provider's stream relayed to the caller, event by event, translated when the
/// dialects differ. Reads the provider only as fast as the caller takes the events.
pub struct Relay {
    body: Incoming,
    conn: Option<PooledSender>,
    _guards: client::Guards,
    parser: sse::Parser,
    decode: Decode,
    encode: Encode,
    caller: Dialect,
    queue: VecDeque<Bytes>,
    /// A token (or the end) has been seen: the answer is committed to this deployment.
    token_seen: bool,
    committed: bool,
    /// The provider said the answer is complete.
    done: bool,
    /// Nothing more will be queued.
    ended: bool,
    record: Rc<RefCell<Record>>,
    started: Instant,
    idle_limit: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    total: Duration,
    events: Vec<sse::Event>,
    deltas: Vec<Delta>,
    first_token_at: Option<Instant>,
    /// An error event the provider sent before any token.
    early_error: Option<String>,
    /// The provider said why it finished; the usage that follows is the final one.
    finished: bool,
    /// Usage arrived (some providers send it before they say why they finished).
    usage_seen: bool,
    /// Finished with usage: the event with the final usage gets the request's cost.
    cost_due: bool,
    cost_done: bool,
    /// The budget is spent: the stream ends after this event.
    budget_spent: bool,
    /// Output is debited from a budget as it arrives.
    metered_output: bool,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    fn new(
        body: Incoming,
        conn: PooledSender,
        guards: client::Guards,
        d: &Deployment,
        caller: Dialect,
        chat: &Arc<ChatRequest>,
        record: Rc<RefCell<Record>>,
        started: Instant,
        model: &Model,
    ) -> Relay {
        let usage_asked = chat.stream_usage;
        let metered_output = record
            .borrow()
            .holds
            .as_ref()
            .is_some_and(|h| h.has_budget());
        let wire = Wire::of(d.provider.kind);
        let decode = match wire {
            Wire::OpenAi => Decode::OpenAi(openai::Decoder::default()),
            Wire::Anthropic => Decode::Anthropic(anthropic::Decoder::default()),
            Wire::Gemini => Decode::Gemini(gemini::Decoder::default()),
        };
        let created = crate::actor::wall_ms() / 1000;
        let encode = if wire.is(caller) {
            Encode::Passthrough {
                strip_usage: caller == Dialect::OpenAi && !usage_asked,
            }
        } else {
            match caller {
                Dialect::OpenAi => Encode::OpenAi(openai::Encoder::new(created, usage_asked)),
                Dialect::Anthropic => Encode::Anthropic(anthropic::Encoder::default()),
                Dialect::Responses => {
                    Encode::Responses(Box::new(responses::Encoder::new(chat.clone(), created)))
                }
            }
        };
        let deadline = tokio::time::Instant::from_std(started + model.timeout);
        Relay {
            body,
            conn: Some(conn),
            _guards: guards,
            parser: sse::Parser::default(),
            decode,
            encode,
            caller,
            queue: VecDeque::new(),
            token_seen: false,
            committed: false,
            done: false,
            ended: false,
            record,
            started,
            idle_limit: model.first_token_timeout,
            idle: Box::pin(tokio::time::sleep(model.first_token_timeout)),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            total: model.timeout,
            events: Vec::new(),
            deltas: Vec::new(),
            first_token_at: None,
            early_error: None,
            finished: false,
            usage_seen: false,
            cost_due: false,
            cost_done: false,
            budget_spent: false,
            metered_output,
        }
    }

    /// The first token arrived: from now on the stream is the caller's, and the gap to
    /// the next event is timed from here.
    fn commit(&mut self) {
        self.committed = true;
        let limit = self.idle_limit;
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + limit);
    }

    /// Before the answer is committed: reads until the first token. `Err`: the provider
    /// failed first (nothing reached the caller).
    fn poll_until_token(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        loop {
            if self.token_seen {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.body_ended();
                    if self.token_seen {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(
                        "the provider ended its stream before the first token".into(),
                    ));
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(format!("the provider's stream failed: {e}")));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref()
                        && let Err(e) = self.feed(data)
                    {
                        return Poll::Ready(Err(e));
                    }
                    if let Some(msg) = self.early_error.take() {
                        return Poll::Ready(Err(msg));
                    }
                }
            }
        }
    }

    /// Parses a piece of the provider's stream and queues what the caller gets.
    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        let mut events = std::mem::take(&mut self.events);
        self.parser
            .feed(data, &mut events)
            .map_err(|e| e.to_string())?;
        for ev in events.drain(..) {
            let queued = self.queue.len();
            let mut deltas = std::mem::take(&mut self.deltas);
            let decoded = match &mut self.decode {
                Decode::OpenAi(dec) => dec.decode(&ev.data, &mut deltas),
                Decode::Anthropic(dec) => dec.decode(&ev.event, &ev.data, &mut deltas),
                Decode::Gemini(dec) => dec.decode(&ev.data, &mut deltas),
            };
            decoded?;
            let pass = self.take_deltas(&deltas);
            if pass && let Encode::Passthrough { strip_usage } = self.encode {
                let event = (!ev.event.is_empty()).then_some(ev.event.as_str());
                if strip_usage {
                    match openai::strip_added_usage(&ev.data) {
                        None => {}
                        Some(None) => self.queue.push_back(sse::write(event, &ev.data)),
                        Some(Some(stripped)) => self.queue.push_back(sse::write(event, &stripped)),
                    }
                } else {
                    self.queue.push_back(sse::write(event, &ev.data));
                }
            }
            deltas.clear();
            self.deltas = deltas;
            if self.cost_due && self.add_cost(queued) {
                self.cost_due = false;
                self.cost_done = true;
            }
            if self.budget_spent && !self.ended {
                let kind = match self.caller {
                    Dialect::Anthropic => "billing_error",
                    _ => "insufficient_quota",
                };
                self.terminate(
                    kind,
                    "the monthly budget of this API's tenant is spent; the answer was cut here",
                );
            }
            if self.ended {
                break;
            }
        }
        self.events = events;
        Ok(())
    }

    /// Puts the request's cost into the event queued since `from` that carries the final
    /// usage (an object, not the `null` of other chunks). False: none has been queued yet
    /// (a translated stream sends it at its end).
    fn add_cost(&mut self, from: usize) -> bool {
        let r = self.record.borrow();
        let Some((cost, currency)) = r.cost() else {
            return true;
        };
        let carries_usage = |ev: &[u8]| {
            ev.windows(9).any(|w| w == b"\"usage\":{")
                || ev.windows(10).any(|w| w == b"\"usage\": {")
        };
        for i in (from..self.queue.len()).rev() {
            let ev = &self.queue[i];
            if carries_usage(ev)
                && let Some(with) = with_cost(ev, cost, currency)
            {
                self.queue[i] = with;
                return true;
            }
        }
        false
    }

    /// At the end of the provider's body: a stream whose end is the body's end (Gemini's)
    /// is complete when it said why it finished.
    fn body_ended(&mut self) {
        let mut deltas = Vec::new();
        if let Decode::Gemini(dec) = &mut self.decode
            && dec.end(&mut deltas)
        {
            let queued = self.queue.len();
            self.take_deltas(&deltas);
            if self.cost_due && self.add_cost(queued) {
                self.cost_due = false;
                self.cost_done = true;
            }
        }
    }

    /// Observes decoded deltas and queues their translation. False when the event they
    /// came from must not be passed through (an error before the first token).
    fn take_deltas(&mut self, deltas: &[Delta]) -> bool {
        let mut pass = true;
        let mut saw_usage = false;
        {
            for delta in deltas {
                self.record.borrow_mut().observe(delta, self.started);
                if self.metered_output
                    && let Delta::Text(t) | Delta::ToolArgs { json: t, .. } = delta
                {
                    let mut r = self.record.borrow_mut();
                    let model = r.upstream_model.clone().unwrap_or_else(|| Arc::from(""));
                    let n = tokens::count(&model, t);
                    if let Some(h) = &mut r.holds
                        && !h.on_output(n)
                    {
                        self.budget_spent = true;
                    }
                }
                match delta {
                    Delta::Finish(_) => self.finished = true,
                    Delta::Usage(_) => saw_usage = true,
                    _ => {}
                }
                match delta {
                    Delta::Text(_)
                    | Delta::ToolStart { .. }
                    | Delta::ToolArgs { .. }
                    | Delta::Finish(_) => {
                        if self.first_token_at.is_none() {
                            self.first_token_at = Some(Instant::now());
                        }
                        self.token_seen = true;
                    }
                    Delta::Done => {
                        self.done = true;
                        self.token_seen = true;
                    }
                    Delta::Error { kind, message } if !self.committed && !self.token_seen => {
                        // Before any token: this deployment failed; another may answer.
                        self.early_error =
                            Some(format!("the provider's stream failed ({kind}): {message}"));
                        pass = false;
                    }
                    Delta::Error { .. } => {
                        self.record.borrow_mut().incomplete = true;
                        self.ended = true;
                    }
                    _ => {}
                }
                if let Encode::OpenAi(enc) = &mut self.encode {
                    let mut out = Vec::new();
                    enc.encode(delta, &mut out);
                    self.queue.extend(out);
                } else if let Encode::Anthropic(enc) = &mut self.encode {
                    let mut out = Vec::new();
                    enc.encode(delta, &mut out);
                    self.queue.extend(out);
                } else if let Encode::Responses(enc) = &mut self.encode {
                    let mut out = Vec::new();
                    enc.encode(delta, &mut out);
                    self.queue.extend(out);
                }
            }
        }
        self.usage_seen |= saw_usage;
        if self.usage_seen && self.finished && !self.cost_done {
            self.cost_due = true;
        }
        pass
    }

    /// Ends the caller's stream with an error event in its dialect: never a clean end for
    /// an answer that is not complete.
    fn terminate(&mut self, kind: &str, message: &str) {
        self.record.borrow_mut().incomplete = true;
        let event = match (&mut self.encode, self.caller) {
            (Encode::Responses(enc), _) => {
                let mut out = Vec::new();
                enc.encode(
                    &Delta::Error {
                        kind: kind.to_string(),
                        message: message.to_string(),
                    },
                    &mut out,
                );
                out.into_iter().next().unwrap_or_default()
            }
            (_, Dialect::Anthropic) => anthropic::error_event(kind, message),
            (_, _) => openai::error_event(kind, message),
        };
        self.queue.push_back(event);
        self.ended = true;
        self.conn = None; // closes the provider connection
    }

    /// The next bytes for the caller (`None`: the stream is over).
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                self.fill(&b);
                return Poll::Ready(Some(b));
            }
            if self.ended {
                self.finish_times();
                self.fill_done();
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let limit = self.idle_limit;
                    self.idle
                        .as_mut()
                        .reset(tokio::time::Instant::now() + limit);
                    if let Some(data) = frame.data_ref()
                        && let Err(e) = self.feed(data)
                    {
                        self.terminate(
                            "api_error",
                            &format!("the provider's stream could not be read: {e}"),
                        );
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.terminate("api_error", &format!("the provider's stream failed: {e}"));
                }
                Poll::Ready(None) => {
                    if !self.done {
                        self.body_ended();
                    }
                    if self.done {
                        self.ended = true;
                        if let Some(conn) = self.conn.take() {
                            conn.release();
                        }
                    } else {
                        self.terminate(
                            "api_error",
                            "the provider ended the stream before the answer was complete",
                        );
                    }
                }
                Poll::Pending => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        let total = self.total;
                        self.terminate(
                            "api_error",
                            &format!(
                                "the answer took longer than the model's timeout of {total:?}"
                            ),
                        );
                        continue;
                    }
                    if self.idle.as_mut().poll(cx).is_ready() {
                        let limit = self.idle_limit;
                        self.terminate(
                            "api_error",
                            &format!("the provider sent nothing for {limit:?}"),
                        );
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Keeps what the caller got for the response cache, up to an entry's size.
    fn fill(&mut self, b: &Bytes) {
        let mut r = self.record.borrow_mut();
        if let Some(f) = &mut r.cache_fill {
            if f.buf.len() + b.len() > super::cache::MAX_ENTRY_BYTES {
                r.cache_fill = None;
            } else {
                f.buf.extend_from_slice(b);
            }
        }
    }

    /// The stream is over: a whole answer goes into the response cache.
    fn fill_done(&mut self) {
        let mut r = self.record.borrow_mut();
        let Some(f) = r.cache_fill.take() else { return };
        if self.done && !r.incomplete {
            f.cache.insert(
                f.key,
                Bytes::from(f.buf),
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
                f.ttl,
            );
        }
    }

    fn finish_times(&mut self) {
        if let Some(t) = self.first_token_at {
            let mut r = self.record.borrow_mut();
            if r.output_time.is_none() {
                r.output_time = Some(t.elapsed());
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.committed && !self.ended {
            // The caller left mid-stream: the provider's request is cancelled with the
            // dropped connection (or HTTP/2 stream).
            self.record.borrow_mut().incomplete = true;
        }
        self.finish_times();
    }
}

/// `/v1/embeddings`: passed to an OpenAI-compatible provider as is (the model replaced).
async fn embeddings(
    worker: &Rc<Worker>,
    snapshot: &Snapshot,
    llm: &LlmApi,
    model: &Arc<Model>,
    doc: Value,
    record: &Rc<RefCell<Record>>,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, ProxyError> {
    if doc.get("input").is_none_or(Value::is_null) {
        return Err(llm_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`input` is required".into(),
            Some("input".into()),
        ));
    }
    let started = Instant::now();
    let mut last = None;
    for (i, (m, d)) in plan(llm, model, snapshot, worker.shared.region.as_deref())
        .into_iter()
        .enumerate()
    {
        if i as u32 >= model.max_attempts {
            break;
        }
        let verdict = circuit_allows(snapshot, d);
        if verdict == CircuitVerdict::Open || d.provider.broken.is_some() {
            continue;
        }
        let mut o = doc.as_object().cloned().unwrap_or_default();
        o.insert("model".into(), Value::String(d.model.to_string()));
        let path = match d.provider.kind {
            ProviderKind::AzureOpenai => {
                o.remove("model");
                format!(
                    "{}/deployments/{}/embeddings?api-version={}",
                    d.provider.path,
                    d.model,
                    d.provider.api_version.as_deref().unwrap_or_default()
                )
            }
            ProviderKind::Openai => format!("{}/embeddings", d.provider.path),
            ProviderKind::Gemini => {
                let input = doc.get("input").cloned().unwrap_or_default();
                o = match gemini::build_embeddings(&d.model, &input) {
                    Ok(Value::Object(b)) => b,
                    Ok(_) => continue,
                    Err(e) => return Err(bad(e)),
                };
                format!("{}/models/{}:batchEmbedContents", d.provider.path, d.model)
            }
            ProviderKind::Anthropic => continue,
        };
        {
            let mut r = record.borrow_mut();
            r.attempt(d);
            if i > 0 {
                r.fallbacks += 1;
            }
        }
        let body = Bytes::from(Value::Object(o).to_string());
        // What the estimate counts, should the provider report no usage (Gemini's).
        let texts: Vec<super::ir::Part> = match doc.get("input") {
            Some(Value::String(s)) => vec![super::ir::Part::Text(s.clone())],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(|s| super::ir::Part::Text(s.to_string())))
                .collect(),
            _ => Vec::new(),
        };
        let chat = Arc::new(ChatRequest {
            messages: vec![super::ir::Message {
                role: super::ir::Role::User,
                parts: texts,
            }],
            ..ChatRequest::default()
        });
        record.borrow_mut().prompt = Some(chat.clone());
        let outcome = call(
            worker,
            d,
            m,
            Dialect::OpenAi,
            &chat,
            path,
            body,
            verdict == CircuitVerdict::Probe,
            started,
            record,
            tail,
        )
        .await;
        match outcome {
            Ok(resp) => return Ok(resp),
            Err(f) => {
                if f.caller {
                    return Err(f.into_error());
                }
                last = Some(f);
            }
        }
    }
    Err(last.map(Failure::into_error).unwrap_or_else(|| {
        llm_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_deployment_available",
            format!("no deployment of `{}` can take a request now", model.name),
            None,
        )
    }))
}

/// `/v1/messages/count_tokens`: Anthropic's own count where the model's first deployment
/// is Anthropic's; the gateway's count otherwise.
async fn count_tokens(
    worker: &Rc<Worker>,
    snapshot: &Snapshot,
    model: &Arc<Model>,
    doc: &Value,
    chat: &ChatRequest,
    record: &Rc<RefCell<Record>>,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, ProxyError> {
    let first = model.deployments.first();
    if let Some(d) =
        first.filter(|d| d.provider.kind == ProviderKind::Anthropic && d.provider.broken.is_none())
        && circuit_allows(snapshot, d) != CircuitVerdict::Open
    {
        let mut o = doc.as_object().cloned().unwrap_or_default();
        o.remove("max_tokens");
        o.insert("model".into(), Value::String(d.model.to_string()));
        let path = format!("{}/v1/messages/count_tokens", d.provider.path);
        let head = head_for(d, &path, false, tail)?;
        let stats = Rc::new(BodyStats::default());
        let fwd = tokio::time::timeout(
            model.first_token_timeout,
            client::forward(
                &worker.pool,
                &d.cluster,
                head,
                RequestBody::full(Bytes::from(Value::Object(o).to_string()), stats.clone()),
                &stats,
                &mut tail.attempts,
            ),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout {
            upstream: d.cluster.name.to_string(),
            after: model.first_token_timeout,
        })??;
        let status = fwd.response.status();
        let (parts, incoming) = fwd.response.into_parts();
        let body = read_limited(incoming, 64 * 1024, model.first_token_timeout)
            .await
            .map_err(|e| ProxyError::UpstreamProtocol {
                upstream: d.cluster.name.to_string(),
                detail: e,
            })?;
        if !status.is_success() {
            return Err(classify(status, &parts.headers, &body).into_error());
        }
        fwd.conn.release();
        let mut r = record.borrow_mut();
        r.provider = Some(d.provider.name.clone());
        r.deployment = Some(d.name.clone());
        return Ok(json_response(
            StatusCode::OK,
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    let upstream = first.map_or("gpt-4o", |d| &*d.model);
    let n = tokens::count_prompt(upstream, chat);
    Ok(json_response(
        StatusCode::OK,
        json!({"input_tokens": n}).to_string(),
    ))
}
