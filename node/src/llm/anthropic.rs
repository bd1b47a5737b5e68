//! The Anthropic dialect: Messages API requests, answers and stream events, read into and
//! written from the gateway's own form ([`super::ir`]).

use serde_json::{Value, json};

use super::ir::*;

/// The top-level fields of a Messages request that [`parse_messages`] carries.
const CARRIED: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "metadata",
];

/// The `max_tokens` an OpenAI-dialect request without one gets at an Anthropic provider,
/// which requires it.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Reads a Messages request. `Err` says what is wrong with it.
pub fn parse_messages(v: &Value) -> Result<ChatRequest, String> {
    let obj = v
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    let mut req = ChatRequest {
        model: opt_str(v, "model")?
            .ok_or("model: Field required")?
            .to_string(),
        max_tokens: Some(opt_u64(v, "max_tokens")?.ok_or("max_tokens: Field required")?),
        stream: opt_bool(v, "stream")?.unwrap_or(false),
        temperature: opt_f64(v, "temperature")?,
        top_p: opt_f64(v, "top_p")?,
        ..ChatRequest::default()
    };
    req.stream_usage = true;
    for key in obj.keys() {
        if !CARRIED.contains(&key.as_str()) {
            req.untranslatable.push(key.clone());
        }
    }
    if let Some(m) = v.get("metadata").filter(|m| !m.is_null()) {
        req.user = opt_str(m, "user_id")?.map(str::to_string);
    }
    match v.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => req.system.push(s.clone()),
        Some(Value::Array(blocks)) => {
            for b in blocks {
                req.system.push(
                    b.get("text")
                        .and_then(Value::as_str)
                        .ok_or("system: blocks must be text blocks")?
                        .to_string(),
                );
            }
        }
        Some(_) => return Err("system: must be a string or a list of text blocks".into()),
    }
    if let Some(s) = v.get("stop_sequences").filter(|s| !s.is_null()) {
        req.stop = s
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
            .ok_or("stop_sequences: must be a list of strings")?;
    }
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("messages: Field required")?;
    if messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = match opt_str(m, "role")? {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => {
                return Err(format!(
                    "{at}.role: Input should be 'user' or 'assistant', not {other:?}"
                ));
            }
        };
        let parts = parse_blocks(m.get("content"), &at, &mut req)?;
        match req.messages.last_mut() {
            Some(last) if last.role == role => last.parts.extend(parts),
            _ => req.messages.push(Message { role, parts }),
        }
    }
    if let Some(tools) = v.get("tools").filter(|t| !t.is_null()) {
        for (i, t) in tools
            .as_array()
            .ok_or("tools: must be a list")?
            .iter()
            .enumerate()
        {
            if t.get("type")
                .and_then(Value::as_str)
                .is_some_and(|k| k != "custom")
            {
                // Server tools (web search, code execution ...) run at Anthropic.
                req.untranslatable.push(format!("tools.{i}.type"));
                continue;
            }
            let name =
                opt_str(t, "name")?.ok_or_else(|| format!("tools.{i}.name: Field required"))?;
            check_tool_name(name).map_err(|e| format!("tools.{i}.name: {e}"))?;
            let schema = t
                .get("input_schema")
                .cloned()
                .ok_or_else(|| format!("tools.{i}.input_schema: Field required"))?;
            check_tool_schema(name, &schema).map_err(|e| format!("tools.{i}.input_schema: {e}"))?;
            req.tools.push(Tool {
                name: name.to_string(),
                description: opt_str(t, "description")?.map(str::to_string),
                parameters: schema,
            });
        }
    }
    if let Some(tc) = v.get("tool_choice").filter(|t| !t.is_null()) {
        req.tool_choice = Some(match tc.get("type").and_then(Value::as_str) {
            Some("auto") => ToolChoice::Auto,
            Some("any") => ToolChoice::Required,
            Some("none") => ToolChoice::None,
            Some("tool") => {
                let name = opt_str(tc, "name")?.ok_or("tool_choice.name: Field required")?;
                if !req.tools.iter().any(|t| t.name == name) {
                    return Err(format!("tool_choice.name: tool {name:?} is not in `tools`"));
                }
                ToolChoice::Named(name.to_string())
            }
            _ => return Err("tool_choice.type: must be auto, any, tool or none".into()),
        });
        if let Some(d) = opt_bool(tc, "disable_parallel_tool_use")? {
            req.parallel_tool_calls = Some(!d);
        }
    }
    Ok(req)
}

fn parse_blocks(c: Option<&Value>, at: &str, req: &mut ChatRequest) -> Result<Vec<Part>, String> {
    let blocks = match c {
        Some(Value::String(s)) => return Ok(vec![Part::Text(s.clone())]),
        Some(Value::Array(b)) => b,
        _ => {
            return Err(format!(
                "{at}.content: must be a string or a list of blocks"
            ));
        }
    };
    let mut out = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}.content.{j}");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => out.push(Part::Text(
                opt_str(b, "text")?
                    .ok_or_else(|| format!("{at}.text: Field required"))?
                    .to_string(),
            )),
            Some("image") => out.push(Part::Image(parse_image(b, &at)?)),
            Some("tool_use") => out.push(Part::ToolCall {
                id: opt_str(b, "id")?.unwrap_or_default().to_string(),
                name: opt_str(b, "name")?
                    .ok_or_else(|| format!("{at}.name: Field required"))?
                    .to_string(),
                arguments: b.get("input").cloned().unwrap_or(json!({})).to_string(),
            }),
            Some("tool_result") => {
                let content = match b.get("content") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::String(s)) => vec![Part::Text(s.clone())],
                    Some(Value::Array(inner)) => {
                        let mut parts = Vec::new();
                        for (k, x) in inner.iter().enumerate() {
                            match x.get("type").and_then(Value::as_str) {
                                Some("text") => parts.push(Part::Text(
                                    x["text"].as_str().unwrap_or_default().to_string(),
                                )),
                                Some("image") => parts.push(Part::Image(parse_image(
                                    x,
                                    &format!("{at}.content.{k}"),
                                )?)),
                                _ => req.untranslatable.push(format!("{at}.content.{k}")),
                            }
                        }
                        parts
                    }
                    Some(_) => return Err(format!("{at}.content: must be a string or blocks")),
                };
                out.push(Part::ToolResult {
                    id: opt_str(b, "tool_use_id")?
                        .ok_or_else(|| format!("{at}.tool_use_id: Field required"))?
                        .to_string(),
                    content,
                    is_error: opt_bool(b, "is_error")?.unwrap_or(false),
                });
            }
            // Extended thinking and documents have no counterpart elsewhere.
            Some(other) => req.untranslatable.push(format!("{at} (type {other})")),
            None => return Err(format!("{at}.type: Field required")),
        }
    }
    Ok(out)
}

fn parse_image(b: &Value, at: &str) -> Result<Image, String> {
    let src = b
        .get("source")
        .ok_or_else(|| format!("{at}.source: Field required"))?;
    match src.get("type").and_then(Value::as_str) {
        Some("base64") => Ok(Image::Base64 {
            media_type: opt_str(src, "media_type")?
                .unwrap_or("image/png")
                .to_string(),
            data: opt_str(src, "data")?.unwrap_or_default().to_string(),
        }),
        Some("url") => Ok(Image::Url(
            opt_str(src, "url")?
                .ok_or_else(|| format!("{at}.source.url: Field required"))?
                .to_string(),
        )),
        _ => Err(format!("{at}.source.type: must be base64 or url")),
    }
}

fn image_block(img: &Image) -> Value {
    match img {
        Image::Url(u) => json!({"type": "image", "source": {"type": "url", "url": u}}),
        Image::Base64 { media_type, data } => {
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
        }
    }
}

/// The Messages body for `req`, to `model` at Anthropic.
pub fn build_messages(req: &ChatRequest, model: &str) -> Result<Value, Unsupported> {
    if let Some(field) = req.untranslatable.first() {
        return Err(Unsupported::new(
            field.clone(),
            "it has no counterpart in the Anthropic Messages API",
        ));
    }
    if let Some(rf) = &req.response_format
        && *rf != ResponseFormat::Text
    {
        return Err(Unsupported::new(
            "response_format",
            "Anthropic has no JSON output mode here; ask for JSON in the prompt or use a tool",
        ));
    }
    let mut messages: Vec<Value> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let mut content = Vec::new();
        for p in &m.parts {
            content.push(match p {
                Part::Text(t) => json!({"type": "text", "text": t}),
                Part::Image(img) => image_block(img),
                Part::ToolCall {
                    id,
                    name,
                    arguments,
                } => {
                    let input: Value = serde_json::from_str(arguments).map_err(|_| {
                        Unsupported::new(
                            format!("messages[{i}] (tool call {id})"),
                            "its arguments are not JSON, which Anthropic needs",
                        )
                    })?;
                    json!({"type": "tool_use", "id": id, "name": name, "input": input})
                }
                Part::ToolResult {
                    id,
                    content: result,
                    is_error,
                } => {
                    let inner: Vec<Value> = result
                        .iter()
                        .map(|r| match r {
                            Part::Image(img) => image_block(img),
                            Part::Text(t) => json!({"type": "text", "text": t}),
                            _ => json!({"type": "text", "text": ""}),
                        })
                        .collect();
                    let mut b = json!({"type": "tool_result", "tool_use_id": id, "content": inner});
                    if *is_error {
                        b["is_error"] = json!(true);
                    }
                    b
                }
            });
        }
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        messages.push(json!({"role": role, "content": content}));
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
    });
    let o = body.as_object_mut().expect("an object");
    if !req.system.is_empty() {
        o.insert("system".into(), json!(req.system.join("\n\n")));
    }
    if req.stream {
        o.insert("stream".into(), json!(true));
    }
    if let Some(t) = req.temperature {
        o.insert("temperature".into(), json!(t));
    }
    if let Some(t) = req.top_p {
        o.insert("top_p".into(), json!(t));
    }
    if !req.stop.is_empty() {
        o.insert("stop_sequences".into(), json!(req.stop));
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut x = json!({"name": t.name, "input_schema": t.parameters});
                if let Some(d) = &t.description {
                    x["description"] = json!(d);
                }
                x
            })
            .collect();
        o.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match &req.tool_choice {
        None => None,
        Some(ToolChoice::Auto) => Some(json!({"type": "auto"})),
        Some(ToolChoice::None) => Some(json!({"type": "none"})),
        Some(ToolChoice::Required) => Some(json!({"type": "any"})),
        Some(ToolChoice::Named(n)) => Some(json!({"type": "tool", "name": n})),
    };
    if req.parallel_tool_calls == Some(false) && !req.tools.is_empty() {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        c["disable_parallel_tool_use"] = json!(true);
    }
    if let Some(c) = choice {
        o.insert("tool_choice".into(), c);
    }
    if let Some(u) = &req.user {
        o.insert("metadata".into(), json!({"user_id": u}));
    }
    Ok(body)
}

/// Usage as Anthropic reports it: `input_tokens` excludes what was read from or written
/// to the cache.
pub fn parse_usage(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, read, write) = (
        n("input_tokens"),
        n("cache_read_input_tokens"),
        n("cache_creation_input_tokens"),
    );
    Usage {
        input: input + read + write,
        output: n("output_tokens"),
        cached_input: read,
        cache_write: write,
        reasoning: 0,
    }
}

pub fn render_usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input.saturating_sub(u.cached_input + u.cache_write),
        "output_tokens": u.output,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cached_input,
    })
}

fn parse_stop(reason: &str, seq: Option<&str>) -> Finish {
    match reason {
        "end_turn" => Finish::Stop,
        "max_tokens" => Finish::Length,
        "tool_use" => Finish::ToolCalls,
        "stop_sequence" => Finish::StopSequence(seq.map(str::to_string)),
        "refusal" => Finish::ContentFilter,
        other => Finish::Other(other.to_string()),
    }
}

fn stop_reason(f: &Finish) -> (&str, Option<&str>) {
    match f {
        Finish::Stop => ("end_turn", None),
        Finish::Length => ("max_tokens", None),
        Finish::ToolCalls => ("tool_use", None),
        Finish::StopSequence(s) => ("stop_sequence", s.as_deref()),
        Finish::ContentFilter => ("refusal", None),
        Finish::Other(o) => (o.as_str(), None),
    }
}

/// Reads a Messages answer.
pub fn parse_response(v: &Value) -> Result<ChatResponse, String> {
    let blocks = v["content"]
        .as_array()
        .ok_or("the provider's answer has no content")?;
    let mut parts = Vec::new();
    for b in blocks {
        match b["type"].as_str() {
            Some("text") => parts.push(Part::Text(b["text"].as_str().unwrap_or_default().into())),
            Some("tool_use") => parts.push(Part::ToolCall {
                id: b["id"].as_str().unwrap_or_default().into(),
                name: b["name"].as_str().unwrap_or_default().into(),
                arguments: b.get("input").cloned().unwrap_or(json!({})).to_string(),
            }),
            _ => {}
        }
    }
    Ok(ChatResponse {
        id: v["id"].as_str().unwrap_or_default().into(),
        model: v["model"].as_str().unwrap_or_default().into(),
        parts,
        finish: parse_stop(
            v["stop_reason"].as_str().unwrap_or("end_turn"),
            v["stop_sequence"].as_str(),
        ),
        usage: v.get("usage").map(parse_usage).unwrap_or_default(),
    })
}

/// Tool arguments as the `input` object Anthropic's answers carry. `Err`: they are not a
/// JSON object.
fn tool_input(arguments: &str) -> Result<Value, String> {
    let text = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(format!(
            "the provider's tool call arguments are not a JSON object: {}",
            text.chars().take(200).collect::<String>()
        )),
    }
}

/// The Messages answer for `r`. `Err` when a tool call cannot be written as Anthropic's.
pub fn render_response(r: &ChatResponse) -> Result<Value, String> {
    let mut content = Vec::new();
    for p in &r.parts {
        match p {
            Part::Text(t) => content.push(json!({"type": "text", "text": t})),
            Part::ToolCall {
                id,
                name,
                arguments,
            } => content.push(json!({"type": "tool_use", "id": tool_id(id), "name": name, "input": tool_input(arguments)?})),
            _ => {}
        }
    }
    let called = r.parts.iter().any(|p| matches!(p, Part::ToolCall { .. }));
    let finish = r.finish.clone().with_tools(called);
    let (reason, seq) = stop_reason(&finish);
    Ok(json!({
        "id": msg_id(&r.id),
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": seq,
        "usage": render_usage(&r.usage),
    }))
}

fn msg_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_string()
    } else {
        format!("msg_{id}")
    }
}

fn tool_id(id: &str) -> String {
    if id.starts_with("toolu_") || id.is_empty() {
        id.to_string()
    } else {
        format!("toolu_{id}")
    }
}

/// Reads Messages stream events.
#[derive(Default)]
pub struct Decoder {
    /// Content block index -> (tool-call index, arguments seen), for tool_use blocks.
    blocks: Vec<(usize, usize, bool)>,
    tools: usize,
}

impl Decoder {
    pub fn decode(&mut self, event: &str, data: &str, out: &mut Vec<Delta>) -> Result<(), String> {
        if event == "ping" {
            return Ok(());
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("a stream event is not JSON: {e}"))?;
        let kind = v["type"].as_str().unwrap_or(event);
        match kind {
            "message_start" => {
                let m = &v["message"];
                out.push(Delta::Start {
                    id: m["id"].as_str().unwrap_or_default().into(),
                    model: m["model"].as_str().unwrap_or_default().into(),
                });
                if let Some(u) = m.get("usage") {
                    // Its output count is a placeholder (1): the real one comes with
                    // message_delta, or the stream was not whole.
                    let mut usage = parse_usage(u);
                    usage.output = 0;
                    out.push(Delta::Usage(usage));
                }
            }
            "content_block_start" => {
                let b = &v["content_block"];
                if b["type"] == "tool_use" {
                    let index = self.tools;
                    self.tools += 1;
                    self.blocks
                        .push((v["index"].as_u64().unwrap_or(0) as usize, index, false));
                    out.push(Delta::ToolStart {
                        index,
                        id: b["id"].as_str().unwrap_or_default().into(),
                        name: b["name"].as_str().unwrap_or_default().into(),
                    });
                } else if let Some(t) = b["text"].as_str()
                    && !t.is_empty()
                {
                    out.push(Delta::Text(t.into()));
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => {
                        out.push(Delta::Text(d["text"].as_str().unwrap_or_default().into()))
                    }
                    Some("input_json_delta") => {
                        let block = v["index"].as_u64().unwrap_or(0) as usize;
                        if let Some((_, index, seen)) =
                            self.blocks.iter_mut().find(|(b, _, _)| *b == block)
                        {
                            let json = d["partial_json"].as_str().unwrap_or_default();
                            if !json.is_empty() {
                                *seen = true;
                                out.push(Delta::ToolArgs {
                                    index: *index,
                                    json: json.into(),
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                // A tool called with no arguments streams none: its arguments are `{}`, not
                // the empty text the caller could not parse.
                let block = v["index"].as_u64().unwrap_or(0) as usize;
                if let Some((_, index, seen)) = self.blocks.iter_mut().find(|(b, _, _)| *b == block)
                    && !*seen
                {
                    *seen = true;
                    out.push(Delta::ToolArgs {
                        index: *index,
                        json: "{}".into(),
                    });
                }
            }
            "message_delta" => {
                if let Some(r) = v["delta"]["stop_reason"].as_str() {
                    out.push(Delta::Finish(parse_stop(
                        r,
                        v["delta"]["stop_sequence"].as_str(),
                    )));
                }
                if let Some(u) = v.get("usage") {
                    out.push(Delta::Usage(parse_usage(u)));
                }
            }
            "message_stop" => out.push(Delta::Done),
            "error" => out.push(Delta::Error {
                kind: error_kind(v["error"]["type"].as_str().unwrap_or("")),
                message: v["error"]["message"].as_str().unwrap_or_default().into(),
            }),
            _ => {}
        }
        Ok(())
    }
}

/// Writes deltas as Messages stream events.
#[derive(Default)]
pub struct Encoder {
    /// The next content block's index.
    next_block: usize,
    /// The open text block.
    text_block: Option<usize>,
    /// Tool-call index -> its block.
    tool_blocks: Vec<(usize, usize)>,
    /// Blocks begun and not yet stopped, in order.
    open: Vec<usize>,
    finish: Option<Finish>,
    usage: Usage,
    started: bool,
}

fn event(name: &str, v: Value) -> bytes::Bytes {
    super::sse::write(Some(name), &v.to_string())
}

impl Encoder {
    fn close_all(&mut self, out: &mut Vec<bytes::Bytes>) {
        for b in self.open.drain(..) {
            out.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": b}),
            ));
        }
        self.text_block = None;
    }

    pub fn encode(&mut self, d: &Delta, out: &mut Vec<bytes::Bytes>) {
        match d {
            Delta::Start { id, model } => {
                self.started = true;
                out.push(event(
                    "message_start",
                    json!({"type": "message_start", "message": {
                        "id": msg_id(id), "type": "message", "role": "assistant", "model": model,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": render_usage(&self.usage),
                    }}),
                ));
            }
            Delta::Text(t) => {
                let block = match self.text_block {
                    Some(b) => b,
                    None => {
                        self.close_all(out);
                        let b = self.next_block;
                        self.next_block += 1;
                        self.open.push(b);
                        self.text_block = Some(b);
                        out.push(event("content_block_start", json!({"type": "content_block_start", "index": b, "content_block": {"type": "text", "text": ""}})));
                        b
                    }
                };
                out.push(event("content_block_delta", json!({"type": "content_block_delta", "index": block, "delta": {"type": "text_delta", "text": t}})));
            }
            Delta::ToolStart { index, id, name } => {
                if let Some(t) = self.text_block.take() {
                    self.open.retain(|b| *b != t);
                    out.push(event(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": t}),
                    ));
                }
                let b = self.next_block;
                self.next_block += 1;
                self.open.push(b);
                self.tool_blocks.push((*index, b));
                out.push(event("content_block_start", json!({"type": "content_block_start", "index": b, "content_block": {"type": "tool_use", "id": tool_id(id), "name": name, "input": {}}})));
            }
            Delta::ToolArgs { index, json: a } => {
                if let Some(&(_, b)) = self.tool_blocks.iter().find(|(i, _)| i == index) {
                    out.push(event("content_block_delta", json!({"type": "content_block_delta", "index": b, "delta": {"type": "input_json_delta", "partial_json": a}})));
                }
            }
            Delta::Finish(f) => self.finish = Some(f.clone()),
            Delta::Usage(u) => self.usage.merge(u),
            Delta::Done => {
                self.close_all(out);
                let finish = self
                    .finish
                    .clone()
                    .unwrap_or(Finish::Stop)
                    .with_tools(!self.tool_blocks.is_empty());
                let (reason, seq) = stop_reason(&finish);
                let mut usage = render_usage(&self.usage);
                usage["output_tokens"] = json!(self.usage.output);
                out.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": usage})));
                out.push(event("message_stop", json!({"type": "message_stop"})));
            }
            Delta::Error { kind, message } => out.push(error_event(kind, message)),
        }
    }
}

/// The error event a stream ends with (the SDK raises it as an `APIStatusError`).
pub fn error_event(kind: &str, message: &str) -> bytes::Bytes {
    event(
        "error",
        json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

/// Sets the upstream model on a request passed through to Anthropic.
pub fn patch_passthrough(body: &mut serde_json::Map<String, Value>, model: &str) {
    body.insert("model".into(), Value::String(model.to_string()));
}
