//! The demo LLM upstream of `tollgate dev` (and the provider the tests and benchmarks call):
//! one server that speaks the OpenAI (and Azure OpenAI), Anthropic and Gemini wire formats,
//! answers deterministically, streams word by word and reports usage, with each format's
//! own bodies, server-sent events, error bodies and rate-limit headers.
//!
//! A token here is a word. The answer repeats the last user message after a fixed opening;
//! a request with tools gets a call to each of them (or the named one). The model id may
//! carry directives after `+` that make it misbehave, for tests: `status=429`,
//! `retry_after=2`, `stall=500` (ms before the first token), `slow=20` (ms between tokens),
//! `cut=3` (drop the connection after 3 tokens), `cut_pct=5` (so for 5% of streams, at a
//! random token), `error_at=2` (an error event after 2 tokens), `window=100` (a context
//! window, in words), `no_usage`, `words=500` (answer 500 words, up to max_tokens, whatever
//! the prompt). `POST /_demo/fail {"count": n, "status": s}` makes the
//! next n requests fail; `GET /_demo/log` lists what each request was told it used.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

/// The most request bytes read.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Log entries kept.
const MAX_LOG: usize = 200_000;

#[derive(Default)]
struct Demo {
    /// The key callers must present, when set.
    api_key: Option<String>,
    seq: AtomicU64,
    /// Every provider request received (the `/_demo/` ones aside).
    received: AtomicU64,
    /// (remaining, status) of `/_demo/fail`.
    fail: Mutex<(u64, u16)>,
    log: Mutex<VecDeque<Value>>,
    /// Streams being sent, and those whose client went away before their end.
    open_streams: AtomicU64,
    cancelled: AtomicU64,
    /// What answered requests were charged for: input tokens, and output tokens actually
    /// sent (a cancelled stream's count stops where it was cancelled).
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    /// Models with a `tpm` directive: this minute's tokens received (answered or not), the
    /// most received in any minute, and the requests refused 429.
    tpm: Mutex<std::collections::HashMap<String, TpmWindow>>,
    /// Answers given as they are, to the next requests (`POST /_demo/script`).
    scripts: Mutex<VecDeque<Script>>,
    /// The last requests: path and body (`GET /_demo/requests`).
    requests: Mutex<VecDeque<Value>>,
}

/// An answer to send byte for byte: a status, a content type, and pieces written one by
/// one, `delay_ms` apart; the body ends after the last.
#[derive(Debug, Clone, serde::Deserialize)]
struct Script {
    #[serde(default = "ok")]
    status: u16,
    #[serde(default = "event_stream")]
    content_type: String,
    pieces: Vec<String>,
    #[serde(default)]
    delay_ms: u64,
}

fn ok() -> u16 {
    200
}
fn event_stream() -> String {
    "text/event-stream".into()
}

/// Requests kept for `/_demo/requests`.
const MAX_REQUESTS: usize = 100;

/// Binds the demo LLM upstream and serves it on a thread of its own. Returns its address.
pub fn spawn(
    addr: SocketAddr,
    api_key: Option<String>,
    threads: usize,
) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| tollgate_node::listen_error("demo LLM upstream", addr, "--listen", e))?;
    listener.set_nonblocking(true)?;
    serve(listener, api_key, threads)
}

pub fn serve(
    listener: std::net::TcpListener,
    api_key: Option<String>,
    threads: usize,
) -> anyhow::Result<SocketAddr> {
    let local = listener.local_addr()?;
    let demo = Arc::new(Demo {
        api_key,
        ..Demo::default()
    });
    std::thread::Builder::new()
        .name("tollgate-llm-demo".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()
                .expect("a runtime builds");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("listener registers");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let demo = demo.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| handle(demo.clone(), req));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })?;
    Ok(local)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    OpenAi,
    Anthropic,
    Gemini,
}

#[derive(Default, Debug, Clone, Copy)]
struct TpmWindow {
    minute: u64,
    received: u64,
    max_received: u64,
    refused: u64,
}

/// What the model id's directives ask for.
#[derive(Default, Debug)]
struct Directives {
    status: Option<u16>,
    retry_after: Option<u64>,
    stall_ms: u64,
    slow_ms: u64,
    cut: Option<usize>,
    cut_pct: u32,
    error_at: Option<usize>,
    window: Option<usize>,
    no_usage: bool,
    /// Answer this many words (up to max_tokens) instead of echoing.
    words: Option<usize>,
    /// Tokens per minute (a window per calendar minute): past it, 429 with retry-after.
    tpm: Option<u64>,
}

fn directives(model: &str) -> Directives {
    let mut d = Directives::default();
    for part in model.split('+').skip(1) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let n = v.parse::<u64>().unwrap_or(0);
        match k {
            "status" => d.status = Some(n as u16),
            "retry_after" => d.retry_after = Some(n),
            "stall" => d.stall_ms = n,
            "slow" => d.slow_ms = n,
            "cut" => d.cut = Some(n as usize),
            "cut_pct" => d.cut_pct = n as u32,
            "error_at" => d.error_at = Some(n as usize),
            "window" => d.window = Some(n as usize),
            "no_usage" => d.no_usage = true,
            "words" => d.words = Some(n as usize),
            "tpm" => d.tpm = Some(n),
            _ => {}
        }
    }
    d
}

fn full(status: StatusCode, body: Value, extra: &[(&str, String)]) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

/// An error body in the format's own shape.
fn error(format: Format, status: u16, message: &str, retry_after: Option<u64>) -> Response<Body> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match format {
        Format::OpenAi => {
            let (kind, c) = match status {
                400 => ("invalid_request_error", Value::Null),
                401 => ("invalid_request_error", json!("invalid_api_key")),
                404 => ("invalid_request_error", json!("model_not_found")),
                429 => ("requests", json!("rate_limit_exceeded")),
                _ => ("server_error", Value::Null),
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": c}})
        }
        Format::Anthropic => {
            let kind = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Format::Gemini => {
            let s = match status {
                400 => "INVALID_ARGUMENT",
                401 | 403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                _ => "INTERNAL",
            };
            json!({"error": {"code": status, "message": message, "status": s}})
        }
    };
    let mut extra = Vec::new();
    if let Some(s) = retry_after {
        extra.push(("retry-after", s.to_string()));
        match format {
            Format::OpenAi => {
                extra.push(("x-ratelimit-limit-requests", "60".into()));
                extra.push(("x-ratelimit-remaining-requests", "0".into()));
                extra.push(("x-ratelimit-reset-requests", format!("{s}s")));
            }
            Format::Anthropic => {
                extra.push(("anthropic-ratelimit-requests-limit", "60".into()));
                extra.push(("anthropic-ratelimit-requests-remaining", "0".into()));
            }
            Format::Gemini => {}
        }
    }
    full(code, body, &extra)
}

async fn handle(demo: Arc<Demo>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let headers = req.headers().clone();
    let format = if path.contains("/v1beta/")
        || path.contains(":generateContent")
        || path.contains(":streamGenerateContent")
    {
        Format::Gemini
    } else if path.ends_with("/messages") || path.ends_with("/messages/count_tokens") {
        Format::Anthropic
    } else {
        Format::OpenAi
    };
    if path == "/_demo/stats" {
        let v = json!({
            "requests": demo.received.load(Ordering::Relaxed),
            "answered": demo.seq.load(Ordering::Relaxed),
            "open_streams": demo.open_streams.load(Ordering::Relaxed),
            "cancelled": demo.cancelled.load(Ordering::Relaxed),
            "input_tokens": demo.input_tokens.load(Ordering::Relaxed),
            "output_tokens": demo.output_tokens.load(Ordering::Relaxed),
            "tpm": demo.tpm.lock().expect("tpm").iter().map(|(m, w)| {
                (m.clone(), json!({"max_received": w.max_received, "refused": w.refused}))
            }).collect::<serde_json::Map<String, Value>>(),
        });
        return Ok(full(StatusCode::OK, v, &[]));
    }
    if path == "/_demo/log" {
        let log: Vec<Value> = demo.log.lock().expect("log").iter().cloned().collect();
        return Ok(full(StatusCode::OK, json!(log), &[]));
    }
    if !path.starts_with("/_demo/") {
        demo.received.fetch_add(1, Ordering::Relaxed);
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(error(format, 413, "the request body is too large", None)),
    };
    if path == "/_demo/script" {
        let s: Vec<Script> = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => {
                return Ok(error(
                    format,
                    400,
                    &format!("a script is a list of answers: {e}"),
                    None,
                ));
            }
        };
        demo.scripts.lock().expect("scripts").extend(s);
        return Ok(full(StatusCode::OK, json!({"ok": true}), &[]));
    }
    if path == "/_demo/requests" {
        let r: Vec<Value> = demo
            .requests
            .lock()
            .expect("requests")
            .iter()
            .cloned()
            .collect();
        return Ok(full(StatusCode::OK, json!(r), &[]));
    }
    if !path.starts_with("/_demo/") {
        let mut r = demo.requests.lock().expect("requests");
        if r.len() >= MAX_REQUESTS {
            r.pop_front();
        }
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        r.push_back(json!({"path": path, "query": query, "body": parsed}));
    }
    let script = if path.starts_with("/_demo/") {
        None
    } else {
        demo.scripts.lock().expect("scripts").pop_front()
    };
    if let Some(s) = script {
        return Ok(scripted(s));
    }
    if path == "/_demo/fail" {
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        *demo.fail.lock().expect("fail") = (
            v["count"].as_u64().unwrap_or(1),
            v["status"].as_u64().unwrap_or(500) as u16,
        );
        return Ok(full(StatusCode::OK, json!({"ok": true}), &[]));
    }
    // Authentication, as each provider asks for it.
    if let Some(key) = &demo.api_key {
        let presented = match format {
            Format::OpenAi => headers
                .get("api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| {
                    headers
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .map(str::to_string)
                }),
            Format::Anthropic => headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            Format::Gemini => headers
                .get("x-goog-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        };
        if presented.as_deref() != Some(key.as_str()) {
            return Ok(error(format, 401, "invalid x-api-key", None));
        }
    }
    if format == Format::Anthropic && !headers.contains_key("anthropic-version") {
        return Ok(error(
            format,
            400,
            "anthropic-version: header is required",
            None,
        ));
    }
    if method == Method::GET && path.ends_with("/models") {
        return Ok(full(
            StatusCode::OK,
            json!({"object": "list", "data": [{"id": "demo", "object": "model", "created": 0, "owned_by": "tollgate"}]}),
            &[],
        ));
    }
    {
        let mut f = demo.fail.lock().expect("fail");
        if f.0 > 0 {
            f.0 -= 1;
            let status = f.1;
            drop(f);
            return Ok(error(
                format,
                status,
                "injected failure",
                (status == 429).then_some(1),
            ));
        }
    }
    let Ok(doc) = serde_json::from_slice::<Value>(&body) else {
        return Ok(error(format, 400, "the body is not JSON", None));
    };
    let model = match format {
        Format::Gemini => path
            .rsplit('/')
            .next()
            .and_then(|m| m.split(':').next())
            .unwrap_or("demo")
            .to_string(),
        _ if path.contains("/deployments/") => path
            .split("/deployments/")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or("demo")
            .to_string(),
        _ => doc["model"].as_str().unwrap_or("").to_string(),
    };
    if model.is_empty() {
        return Ok(error(format, 400, "model: Field required", None));
    }
    let d = directives(&model);
    if let Some(status) = d.status {
        return Ok(error(
            format,
            status,
            &format!("the demo model {model} was told to answer {status}"),
            d.retry_after.or((status == 429).then_some(1)),
        ));
    }
    if path.ends_with("/embeddings") {
        return Ok(embeddings(&demo, &model, &doc));
    }
    if path.ends_with(":batchEmbedContents") {
        let texts: Vec<Value> = doc["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["content"]["parts"][0]["text"].clone())
            .collect();
        let resp = embeddings(&demo, &model, &json!({"input": texts}));
        let (_, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let embeddings: Vec<Value> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| json!({"values": d["embedding"]}))
            .collect();
        return Ok(full(StatusCode::OK, json!({"embeddings": embeddings}), &[]));
    }
    let input = count_words(&doc);
    if let Some(w) = d.window
        && input > w
    {
        let msg = match format {
            Format::OpenAi => format!(
                "This model's maximum context length is {w} tokens. However, your messages resulted in {input} tokens. Please reduce the length of the messages."
            ),
            Format::Anthropic => format!("prompt is too long: {input} tokens > {w} maximum"),
            Format::Gemini => format!(
                "The input token count ({input}) exceeds the maximum number of tokens allowed ({w})."
            ),
        };
        let mut resp = error(format, 400, &msg, None);
        if format == Format::OpenAi {
            *resp.body_mut() = Full::new(Bytes::from(json!({"error": {"message": msg, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}).to_string())).boxed();
        }
        return Ok(resp);
    }
    if path.ends_with("/count_tokens") {
        return Ok(full(StatusCode::OK, json!({"input_tokens": input}), &[]));
    }
    let seq = demo.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let mut answer = Answer::of(&doc, format, &model, input);
    if let Some(n) = d.words
        && answer.tools.is_empty()
    {
        let max = match format {
            Format::Gemini => doc["generationConfig"]["maxOutputTokens"].as_u64(),
            _ => doc["max_completion_tokens"]
                .as_u64()
                .or(doc["max_tokens"].as_u64()),
        }
        .map_or(n, |m| m as usize);
        answer.truncated = n > max;
        answer.words = vec!["word".to_string(); n.min(max)];
    }
    // Asked for JSON of a schema (structured output, or told so in the system prompt):
    // an instance of it, as a compliant model would answer.
    if answer.tools.is_empty()
        && let Some(schema) = asked_schema(&doc)
    {
        answer.words = vec![args_for(&schema).to_string()];
    }
    if let Some(limit) = d.tpm {
        // What a provider's limiter sees: every request's tokens, answered or refused.
        let tokens = (input + answer.output_tokens()) as u64;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_millis() as u64);
        let minute = now_ms / 60_000;
        let mut all = demo.tpm.lock().expect("tpm");
        let w = all.entry(model.clone()).or_default();
        if w.minute != minute {
            (w.minute, w.received) = (minute, 0);
        }
        w.received += tokens;
        w.max_received = w.max_received.max(w.received);
        if w.received > limit {
            w.refused += 1;
            let retry = ((minute + 1) * 60_000 - now_ms).div_ceil(1000);
            drop(all);
            return Ok(error(
                format,
                429,
                "Rate limit reached for tokens per minute",
                Some(retry),
            ));
        }
    }
    demo.input_tokens.fetch_add(input as u64, Ordering::Relaxed);
    let stream = match format {
        Format::Gemini => path.contains(":streamGenerateContent"),
        _ => doc["stream"].as_bool().unwrap_or(false),
    };
    let _ = query;
    if !stream {
        if d.stall_ms > 0 {
            tokio::time::sleep(Duration::from_millis(d.stall_ms)).await;
        }
        demo.record(json!({"id": answer.id(format, seq), "model": model, "stream": false, "input_tokens": input, "output_tokens": answer.output_tokens(), "reported": !d.no_usage, "cut": false}));
        demo.output_tokens
            .fetch_add(answer.output_tokens() as u64, Ordering::Relaxed);
        // What is left this minute, as OpenAI's headers say it.
        let left: Vec<(&str, String)> = match d.tpm {
            Some(limit) => {
                let w = demo.tpm.lock().expect("tpm").get(&model).copied();
                let used = w.map_or(0, |w| w.received);
                vec![
                    ("x-ratelimit-limit-tokens", limit.to_string()),
                    (
                        "x-ratelimit-remaining-tokens",
                        limit.saturating_sub(used).to_string(),
                    ),
                ]
            }
            None => Vec::new(),
        };
        return Ok(full(StatusCode::OK, answer.whole(format, seq, &d), &left));
    }
    let include_usage = doc["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    Ok(stream_answer(
        demo,
        answer,
        format,
        seq,
        d,
        include_usage,
        model,
    ))
}

impl Demo {
    fn record(&self, entry: Value) {
        let mut log = self.log.lock().expect("log");
        if log.len() >= MAX_LOG {
            log.pop_front();
        }
        log.push_back(entry);
    }
}

/// Words in every string of the request's prompt parts.
fn count_words(doc: &Value) -> usize {
    fn walk(v: &Value, n: &mut usize) {
        match v {
            Value::String(s) => *n += s.split_whitespace().count(),
            Value::Array(a) => a.iter().for_each(|x| walk(x, n)),
            Value::Object(o) => {
                for (k, x) in o {
                    if !matches!(
                        k.as_str(),
                        "type"
                            | "role"
                            | "model"
                            | "tool_call_id"
                            | "tool_use_id"
                            | "id"
                            | "media_type"
                            | "data"
                            | "url"
                    ) {
                        walk(x, n);
                    }
                }
            }
            _ => {}
        }
    }
    let mut n = 0;
    for field in [
        "system",
        "messages",
        "contents",
        "systemInstruction",
        "tools",
        "input",
    ] {
        if let Some(v) = doc.get(field) {
            walk(v, &mut n);
        }
    }
    n.max(1)
}

/// The answer a request gets: words of text, or tool calls.
struct Answer {
    model: String,
    input: usize,
    words: Vec<String>,
    /// (name, argument fragments)
    tools: Vec<(String, Vec<String>)>,
    truncated: bool,
}

impl Answer {
    fn of(doc: &Value, format: Format, model: &str, input: usize) -> Answer {
        let max = match format {
            Format::Gemini => doc["generationConfig"]["maxOutputTokens"].as_u64(),
            _ => doc["max_completion_tokens"]
                .as_u64()
                .or(doc["max_tokens"].as_u64()),
        }
        .unwrap_or(64) as usize;
        let (last_text, last_is_tool_result) = last_user(doc, format);
        let tools = tool_names(doc, format);
        let mut answer = Answer {
            model: model.to_string(),
            input,
            words: Vec::new(),
            tools: Vec::new(),
            truncated: false,
        };
        if !tools.is_empty() && !last_is_tool_result {
            for (name, schema) in tools {
                let args = args_for(&schema).to_string();
                // Streamed in pieces, as providers do.
                let cut = args.len() / 2;
                let cut = (0..=cut)
                    .rev()
                    .find(|i| args.is_char_boundary(*i))
                    .unwrap_or(0);
                answer
                    .tools
                    .push((name, vec![args[..cut].to_string(), args[cut..].to_string()]));
            }
            return answer;
        }
        let opening = if last_is_tool_result {
            "The tool said:"
        } else {
            "You said:"
        };
        let mut words: Vec<String> = opening.split(' ').map(str::to_string).collect();
        words.extend(last_text.split_whitespace().map(str::to_string));
        if words.len() > max {
            words.truncate(max);
            answer.truncated = true;
        }
        answer.words = words;
        answer
    }

    fn output_tokens(&self) -> usize {
        if self.tools.is_empty() {
            self.words.len()
        } else {
            self.tools
                .iter()
                .map(|(_, a)| a.concat().split_whitespace().count().max(1) + 1)
                .sum()
        }
    }

    fn text(&self) -> String {
        self.words.join(" ")
    }

    fn id(&self, format: Format, seq: u64) -> String {
        match format {
            Format::OpenAi => format!("chatcmpl-demo{seq}"),
            Format::Anthropic => format!("msg_demo{seq}"),
            Format::Gemini => format!("demo{seq}"),
        }
    }

    fn finish(&self, format: Format) -> &'static str {
        match (format, !self.tools.is_empty(), self.truncated) {
            (Format::OpenAi, true, _) => "tool_calls",
            (Format::OpenAi, _, true) => "length",
            (Format::OpenAi, _, _) => "stop",
            (Format::Anthropic, true, _) => "tool_use",
            (Format::Anthropic, _, true) => "max_tokens",
            (Format::Anthropic, _, _) => "end_turn",
            (Format::Gemini, _, true) => "MAX_TOKENS",
            (Format::Gemini, _, _) => "STOP",
        }
    }

    fn usage(&self, format: Format) -> Value {
        let (i, o) = (self.input, self.output_tokens());
        match format {
            Format::OpenAi => {
                json!({"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o,
                "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}})
            }
            Format::Anthropic => {
                json!({"input_tokens": i, "output_tokens": o, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
            }
            Format::Gemini => {
                json!({"promptTokenCount": i, "candidatesTokenCount": o, "totalTokenCount": i + o})
            }
        }
    }

    fn whole(&self, format: Format, seq: u64, d: &Directives) -> Value {
        let id = self.id(format, seq);
        let mut v = match format {
            Format::OpenAi => {
                let calls: Vec<Value> = self
                    .tools
                    .iter()
                    .enumerate()
                    .map(|(i, (name, args))| {
                        json!({
                    "id": format!("call_demo{seq}_{i}"), "type": "function",
                    "function": {"name": name, "arguments": args.concat()}})
                    })
                    .collect();
                let mut message = json!({"role": "assistant", "content": if calls.is_empty() { json!(self.text()) } else { Value::Null }, "refusal": null});
                if !calls.is_empty() {
                    message["tool_calls"] = json!(calls);
                }
                json!({"id": id, "object": "chat.completion", "created": 1_700_000_000, "model": self.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": self.finish(format), "logprobs": null}],
                    "usage": self.usage(format), "system_fingerprint": "fp_demo"})
            }
            Format::Anthropic => {
                let mut content: Vec<Value> = Vec::new();
                if self.tools.is_empty() {
                    content.push(json!({"type": "text", "text": self.text()}));
                }
                for (i, (name, args)) in self.tools.iter().enumerate() {
                    let input: Value = serde_json::from_str(&args.concat()).unwrap_or(json!({}));
                    content.push(json!({"type": "tool_use", "id": format!("toolu_demo{seq}_{i}"), "name": name, "input": input}));
                }
                json!({"id": id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                    "stop_reason": self.finish(format), "stop_sequence": null, "usage": self.usage(format)})
            }
            Format::Gemini => {
                let mut parts: Vec<Value> = Vec::new();
                if self.tools.is_empty() {
                    parts.push(json!({"text": self.text()}));
                }
                for (name, args) in &self.tools {
                    let a: Value = serde_json::from_str(&args.concat()).unwrap_or(json!({}));
                    parts.push(json!({"functionCall": {"name": name, "args": a}}));
                }
                json!({"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": self.finish(format), "index": 0}],
                    "usageMetadata": self.usage(format), "modelVersion": self.model, "responseId": id})
            }
        };
        if d.no_usage
            && let Some(o) = v.as_object_mut()
        {
            o.remove("usage");
            o.remove("usageMetadata");
        }
        v
    }
}

/// The last user turn's text, and whether it was a tool result.
fn last_user(doc: &Value, format: Format) -> (String, bool) {
    let key = if format == Format::Gemini {
        "contents"
    } else {
        "messages"
    };
    let Some(last) = doc[key].as_array().and_then(|m| m.last()) else {
        return (String::new(), false);
    };
    let mut text = String::new();
    let mut tool = false;
    if last["role"] == "tool" {
        tool = true;
    }
    let mut walk = |v: &Value| {
        if let Some(s) = v.as_str() {
            text.push_str(s);
            text.push(' ');
        }
    };
    match (&last["content"], &last["parts"]) {
        (Value::String(s), _) => walk(&json!(s)),
        (Value::Array(parts), _) | (_, Value::Array(parts)) => {
            for p in parts {
                match p["type"].as_str() {
                    Some("tool_result") => {
                        tool = true;
                        match &p["content"] {
                            Value::String(s) => walk(&json!(s)),
                            Value::Array(inner) => inner.iter().for_each(|x| walk(&x["text"])),
                            _ => {}
                        }
                    }
                    _ => {
                        if p.get("functionResponse").is_some() {
                            tool = true;
                            walk(&json!(p["functionResponse"]["response"].to_string()));
                        }
                        walk(&p["text"]);
                    }
                }
            }
        }
        _ => {}
    }
    (text.trim().to_string(), tool)
}

/// The tools to call: (name, parameters schema).
fn tool_names(doc: &Value, format: Format) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    match format {
        Format::OpenAi => {
            if doc["tool_choice"] == "none" {
                return out;
            }
            let named = doc["tool_choice"]["function"]["name"].as_str();
            for t in doc["tools"].as_array().into_iter().flatten() {
                let name = t["function"]["name"].as_str().unwrap_or("tool");
                if named.is_none_or(|n| n == name) {
                    out.push((name.to_string(), t["function"]["parameters"].clone()));
                }
            }
            if doc["parallel_tool_calls"] == false {
                out.truncate(1);
            }
        }
        Format::Anthropic => {
            if doc["tool_choice"]["type"] == "none" {
                return out;
            }
            let named = doc["tool_choice"]["name"].as_str();
            for t in doc["tools"].as_array().into_iter().flatten() {
                let name = t["name"].as_str().unwrap_or("tool");
                if named.is_none_or(|n| n == name) {
                    out.push((name.to_string(), t["input_schema"].clone()));
                }
            }
            if doc["tool_choice"]["disable_parallel_tool_use"] == true {
                out.truncate(1);
            }
        }
        Format::Gemini => {
            let config = &doc["toolConfig"]["functionCallingConfig"];
            if config["mode"] == "NONE" {
                return out;
            }
            let allowed: Vec<&str> = config["allowedFunctionNames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for t in doc["tools"].as_array().into_iter().flatten() {
                for f in t["functionDeclarations"].as_array().into_iter().flatten() {
                    let schema = f.get("parametersJsonSchema").unwrap_or(&f["parameters"]);
                    let name = f["name"].as_str().unwrap_or("tool");
                    if !allowed.is_empty() && !allowed.contains(&name) {
                        continue;
                    }
                    out.push((
                        f["name"].as_str().unwrap_or("tool").to_string(),
                        schema.clone(),
                    ));
                }
            }
        }
    }
    out
}

/// Arguments that fit a schema: "demo" for strings, 1 for numbers, true for booleans.
/// The JSON Schema a request asks its answer to satisfy: OpenAI's `response_format`,
/// Gemini's `responseJsonSchema`, or one given in the system prompt after "JSON Schema: ".
fn asked_schema(doc: &Value) -> Option<Value> {
    if let Some(s) = doc["response_format"]["json_schema"].get("schema") {
        return Some(s.clone());
    }
    if let Some(s) = doc["generationConfig"].get("responseJsonSchema") {
        return Some(s.clone());
    }
    let system = match &doc["system"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    let (_, rest) = system.split_once("JSON Schema: ")?;
    serde_json::Deserializer::from_str(rest)
        .into_iter::<Value>()
        .next()?
        .ok()
}

fn args_for(schema: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(props) = schema["properties"].as_object() {
        for (k, p) in props {
            let v = match p["type"].as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("integer") | Some("number") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("demo"),
            };
            out.insert(k.clone(), v);
        }
    }
    Value::Object(out)
}

fn embeddings(demo: &Demo, model: &str, doc: &Value) -> Response<Body> {
    let inputs: Vec<String> = match &doc["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect(),
        _ => vec![String::new()],
    };
    let mut tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += text.split_whitespace().count().max(1);
            let h = tollgate_node::hash::fnv1a(text.as_bytes());
            let v: Vec<f64> = (0..8)
                .map(|k| (((h >> (k * 8)) & 0xff) as f64) / 255.0)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    demo.record(
        json!({"model": model, "embedding": true, "input_tokens": tokens, "reported": true}),
    );
    full(
        StatusCode::OK,
        json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
        &[],
    )
}

/// A scripted answer, piece by piece.
fn scripted(s: Script) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for (i, p) in s.pieces.into_iter().enumerate() {
            if i > 0 && s.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
            }
            if tx.send(Ok(Frame::data(Bytes::from(p)))).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )));
    *resp.status_mut() = StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK);
    if let Ok(v) = HeaderValue::from_str(&s.content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// One SSE event.
fn sse(event: Option<&str>, data: &Value) -> Bytes {
    match event {
        Some(e) => Bytes::from(format!("event: {e}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// The events of a streamed answer: (events before the first token, one per token, the end).
fn stream_events(
    a: &Answer,
    format: Format,
    seq: u64,
    include_usage: bool,
    no_usage: bool,
) -> (Vec<Bytes>, Vec<Bytes>, Vec<Bytes>) {
    let id = a.id(format, seq);
    let (mut head, mut tokens, mut end) = (Vec::new(), Vec::new(), Vec::new());
    match format {
        Format::OpenAi => {
            let chunk = |delta: Value, finish: Option<&str>| {
                let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": a.model,
                    "system_fingerprint": "fp_demo",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]});
                if include_usage {
                    c["usage"] = Value::Null;
                }
                sse(None, &c)
            };
            head.push(chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                None,
            ));
            for (i, w) in a.words.iter().enumerate() {
                let text = if i == 0 { w.clone() } else { format!(" {w}") };
                tokens.push(chunk(json!({"content": text}), None));
            }
            for (i, (name, args)) in a.tools.iter().enumerate() {
                tokens.push(chunk(json!({"tool_calls": [{"index": i, "id": format!("call_demo{seq}_{i}"), "type": "function", "function": {"name": name, "arguments": ""}}]}), None));
                for frag in args {
                    tokens.push(chunk(
                        json!({"tool_calls": [{"index": i, "function": {"arguments": frag}}]}),
                        None,
                    ));
                }
            }
            end.push(chunk(json!({}), Some(a.finish(format))));
            if include_usage && !no_usage {
                end.push(sse(None, &json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": a.model, "choices": [], "usage": a.usage(format)})));
            }
            end.push(Bytes::from_static(b"data: [DONE]\n\n"));
        }
        Format::Anthropic => {
            let mut start_usage = json!({"input_tokens": a.input, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
            if no_usage {
                start_usage = json!({"input_tokens": 0, "output_tokens": 0});
            }
            head.push(sse(Some("message_start"), &json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
                "model": a.model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}})));
            let mut index = 0;
            if a.tools.is_empty() {
                head.push(sse(Some("content_block_start"), &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
                head.push(sse(Some("ping"), &json!({"type": "ping"})));
                for (i, w) in a.words.iter().enumerate() {
                    let text = if i == 0 { w.clone() } else { format!(" {w}") };
                    tokens.push(sse(Some("content_block_delta"), &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})));
                }
                end.push(sse(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": 0}),
                ));
            }
            for (i, (name, args)) in a.tools.iter().enumerate() {
                tokens.push(sse(Some("content_block_start"), &json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": format!("toolu_demo{seq}_{i}"), "name": name, "input": {}}})));
                for frag in args {
                    tokens.push(sse(Some("content_block_delta"), &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": frag}})));
                }
                tokens.push(sse(
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": index}),
                ));
                index += 1;
            }
            let usage = if no_usage {
                json!({"output_tokens": 0})
            } else {
                json!({"output_tokens": a.output_tokens()})
            };
            end.push(sse(Some("message_delta"), &json!({"type": "message_delta", "delta": {"stop_reason": a.finish(format), "stop_sequence": null}, "usage": usage})));
            end.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
        }
        Format::Gemini => {
            let chunk = |parts: Value, finish: Option<&str>, usage: bool| {
                let mut c = json!({"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}], "modelVersion": a.model, "responseId": id});
                if let Some(f) = finish {
                    c["candidates"][0]["finishReason"] = json!(f);
                }
                if usage && !no_usage {
                    c["usageMetadata"] = a.usage(format);
                }
                sse(None, &c)
            };
            for (i, w) in a.words.iter().enumerate() {
                let text = if i == 0 { w.clone() } else { format!(" {w}") };
                tokens.push(chunk(json!([{"text": text}]), None, false));
            }
            for (name, args) in &a.tools {
                let v: Value = serde_json::from_str(&args.concat()).unwrap_or(json!({}));
                tokens.push(chunk(
                    json!([{"functionCall": {"name": name, "args": v}}]),
                    None,
                    false,
                ));
            }
            end.push(chunk(json!([{"text": ""}]), Some(a.finish(format)), true));
        }
    }
    (head, tokens, end)
}

fn stream_answer(
    demo: Arc<Demo>,
    a: Answer,
    format: Format,
    seq: u64,
    d: Directives,
    include_usage: bool,
    model: String,
) -> Response<Body> {
    let (head, tokens, end) = stream_events(&a, format, seq, include_usage, d.no_usage);
    let cut_at = d.cut.or_else(|| {
        (d.cut_pct > 0 && fastrand::u32(..100) < d.cut_pct)
            .then(|| fastrand::usize(..tokens.len().max(1)))
    });
    let reported = !d.no_usage && (format != Format::OpenAi || include_usage);
    demo.record(json!({"id": a.id(format, seq), "model": model, "stream": true, "input_tokens": a.input,
        "output_tokens": a.output_tokens(), "reported": reported && cut_at.is_none(), "cut": cut_at.is_some(),
        "input_reported": format == Format::Anthropic && !d.no_usage}));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    demo.open_streams.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        struct Open(Arc<Demo>, bool);
        impl Drop for Open {
            fn drop(&mut self) {
                self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
                if !self.1 {
                    self.0.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Counts as cancelled unless it ends as it meant to (whole, cut or failed).
        let mut open = Open(demo.clone(), false);
        let send = |b: Bytes| tx.send(Ok(Frame::data(b)));
        for b in head {
            if send(b).await.is_err() {
                return;
            }
        }
        if d.stall_ms > 0 {
            tokio::time::sleep(Duration::from_millis(d.stall_ms)).await;
        }
        for (i, b) in tokens.into_iter().enumerate() {
            if cut_at == Some(i) {
                open.1 = true;
                return; // the connection ends without the stream's end
            }
            if d.error_at == Some(i) {
                let err = match format {
                    Format::Anthropic => sse(
                        Some("error"),
                        &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                    ),
                    _ => sse(
                        None,
                        &json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}}),
                    ),
                };
                let _ = send(err).await;
                open.1 = true;
                return;
            }
            if d.slow_ms > 0 && i > 0 {
                tokio::time::sleep(Duration::from_millis(d.slow_ms)).await;
            }
            if send(b).await.is_err() {
                return;
            }
            if a.tools.is_empty() {
                demo.output_tokens.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !a.tools.is_empty() {
            demo.output_tokens
                .fetch_add(a.output_tokens() as u64, Ordering::Relaxed);
        }
        for b in end {
            if send(b).await.is_err() {
                return;
            }
        }
        open.1 = true;
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
