//! The OpenAI dialect: Chat Completions requests, answers and stream chunks, read into and
//! written from the gateway's own form ([`super::ir`]).

use serde_json::{Map, Value, json};

use super::ir::*;

/// The top-level fields of a Chat Completions request that [`parse_chat`] carries.
const CARRIED: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "user",
];

/// A function tool's definition (`name`, `description`, `parameters`, `strict`) at `at`:
/// Chat Completions nests it under `function`, the Responses API writes it flat. `strict`
/// is carried only between OpenAI dialects (it lands in `untranslatable`).
pub(crate) fn parse_function(
    f: &Value,
    at: &str,
    untranslatable: &mut Vec<String>,
) -> Result<Tool, String> {
    let name = opt_str(f, "name")?.ok_or_else(|| format!("{at}: `name` is required"))?;
    check_tool_name(name).map_err(|e| format!("{at}.name: {e}"))?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p) => p.clone(),
    };
    check_tool_schema(name, &parameters).map_err(|e| format!("{at}.parameters: {e}"))?;
    if f.get("strict").is_some_and(|s| s == true) {
        untranslatable.push(format!("{at}.strict"));
    }
    Ok(Tool {
        name: name.to_string(),
        description: opt_str(f, "description")?.map(str::to_string),
        parameters,
    })
}

/// A tool call as Chat Completions writes it.
fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// Reads a Chat Completions request. `Err` says what is wrong with it.
pub fn parse_chat(v: &Value) -> Result<ChatRequest, String> {
    let obj = v
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    let mut req = ChatRequest {
        model: opt_str(v, "model")?
            .ok_or("`model` is required: name one of the models GET /v1/models lists")?
            .to_string(),
        stream: opt_bool(v, "stream")?.unwrap_or(false),
        max_tokens: opt_u64(v, "max_completion_tokens")?.or(opt_u64(v, "max_tokens")?),
        temperature: opt_f64(v, "temperature")?,
        top_p: opt_f64(v, "top_p")?,
        parallel_tool_calls: opt_bool(v, "parallel_tool_calls")?,
        user: opt_str(v, "user")?.map(str::to_string),
        ..ChatRequest::default()
    };
    if let Some(so) = v.get("stream_options").filter(|s| !s.is_null()) {
        req.stream_usage = opt_bool(so, "include_usage")?.unwrap_or(false);
        if so.as_object().is_some_and(|o| o.len() > 1) {
            req.untranslatable.push("stream_options".into());
        }
    }
    for key in obj.keys() {
        if !CARRIED.contains(&key.as_str()) {
            req.untranslatable.push(key.clone());
        }
    }
    req.stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("`stop` must be a string or a list of strings")?,
        Some(_) => return Err("`stop` must be a string or a list of strings".into()),
    };
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` is required: a list of messages")?;
    if messages.is_empty() {
        return Err("`messages` must have at least one message".into());
    }
    for (i, m) in messages.iter().enumerate() {
        parse_message(m, i, &mut req)?;
    }
    if let Some(tools) = v.get("tools").filter(|t| !t.is_null()) {
        let tools = tools.as_array().ok_or("`tools` must be a list")?;
        for (i, t) in tools.iter().enumerate() {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("function");
            if kind != "function" {
                req.untranslatable.push(format!("tools[{i}].type"));
                continue;
            }
            let f = t
                .get("function")
                .ok_or_else(|| format!("tools[{i}]: `function` is required"))?;
            let tool = parse_function(f, &format!("tools[{i}].function"), &mut req.untranslatable)?;
            req.tools.push(tool);
        }
    }
    req.tool_choice = match v.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(format!(
                    "`tool_choice` {other:?} is not one of auto, none, required or a named function"
                ));
            }
        }),
        Some(obj) => {
            let name = obj
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or("`tool_choice` names a function as {\"type\":\"function\",\"function\":{\"name\":...}}")?;
            if !req.tools.iter().any(|t| t.name == name) {
                return Err(format!(
                    "`tool_choice` names function {name:?}, which is not in `tools`"
                ));
            }
            Some(ToolChoice::Named(name.to_string()))
        }
    };
    if matches!(req.tool_choice, Some(ToolChoice::Required)) && req.tools.is_empty() {
        return Err("`tool_choice` is \"required\" but `tools` is empty".into());
    }
    req.response_format = match v.get("response_format") {
        None | Some(Value::Null) => None,
        Some(rf) => Some(match rf.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => ResponseFormat::Text,
            "json_object" => ResponseFormat::JsonObject,
            "json_schema" => {
                let js = rf
                    .get("json_schema")
                    .ok_or("`response_format.json_schema` is required for type json_schema")?;
                ResponseFormat::JsonSchema {
                    name: opt_str(js, "name")?.unwrap_or("response").to_string(),
                    schema: js.get("schema").cloned().unwrap_or(json!({})),
                    strict: opt_bool(js, "strict")?.unwrap_or(false),
                }
            }
            other => {
                return Err(format!(
                    "`response_format.type` {other:?} is not text, json_object or json_schema"
                ));
            }
        }),
    };
    Ok(req)
}

fn parse_message(m: &Value, i: usize, req: &mut ChatRequest) -> Result<(), String> {
    let at = format!("messages[{i}]");
    let role = opt_str(m, "role")?.ok_or_else(|| format!("{at}: `role` is required"))?;
    let content = m.get("content").filter(|c| !c.is_null());
    match role {
        "system" | "developer" => {
            let text = match content {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        text.push_str(p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            format!("{at}: a system message's parts must be text")
                        })?);
                    }
                    text
                }
                _ => return Err(format!("{at}: a system message needs text `content`")),
            };
            req.system.push(text);
        }
        "user" => {
            let parts = parse_content(content, &at, req)?;
            push(req, Role::User, parts);
        }
        "assistant" => {
            let mut parts = match content {
                Some(c) => parse_content(Some(c), &at, req)?,
                None => Vec::new(),
            };
            if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
                for (j, c) in calls
                    .as_array()
                    .ok_or_else(|| format!("{at}.tool_calls must be a list"))?
                    .iter()
                    .enumerate()
                {
                    let f = c
                        .get("function")
                        .ok_or_else(|| format!("{at}.tool_calls[{j}]: `function` is required"))?;
                    parts.push(Part::ToolCall {
                        id: opt_str(c, "id")?.unwrap_or_default().to_string(),
                        name: opt_str(f, "name")?
                            .ok_or_else(|| {
                                format!("{at}.tool_calls[{j}].function: `name` is required")
                            })?
                            .to_string(),
                        arguments: opt_str(f, "arguments")?.unwrap_or("{}").to_string(),
                    });
                }
            }
            for extra in ["refusal", "audio", "function_call"] {
                if m.get(extra).is_some_and(|x| !x.is_null()) {
                    req.untranslatable.push(format!("{at}.{extra}"));
                }
            }
            push(req, Role::Assistant, parts);
        }
        "tool" => {
            let id = opt_str(m, "tool_call_id")?
                .ok_or_else(|| format!("{at}: a tool message needs `tool_call_id`"))?;
            let result = parse_content(content, &at, req)?;
            push(
                req,
                Role::User,
                vec![Part::ToolResult {
                    id: id.to_string(),
                    content: result,
                    is_error: false,
                }],
            );
        }
        "function" => req.untranslatable.push(format!("{at}.role")),
        other => {
            return Err(format!(
                "{at}: role {other:?} is not system, developer, user, assistant or tool"
            ));
        }
    }
    Ok(())
}

/// Appends parts to the last message when it has the same role (tool results that follow
/// one another are one user turn), else as a new message.
fn push(req: &mut ChatRequest, role: Role, parts: Vec<Part>) {
    if let Some(last) = req.messages.last_mut()
        && last.role == role
    {
        last.parts.extend(parts);
        return;
    }
    req.messages.push(Message { role, parts });
}

fn parse_content(c: Option<&Value>, at: &str, req: &mut ChatRequest) -> Result<Vec<Part>, String> {
    match c {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![Part::Text(s.clone())]),
        Some(Value::Array(parts)) => {
            let mut out = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => out.push(Part::Text(
                        opt_str(p, "text")?
                            .ok_or_else(|| format!("{at}.content[{j}]: `text` is required"))?
                            .to_string(),
                    )),
                    Some("image_url") => {
                        let url = p
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                format!("{at}.content[{j}]: `image_url.url` is required")
                            })?;
                        if p.get("image_url").and_then(|u| u.get("detail")).is_some() {
                            req.untranslatable
                                .push(format!("{at}.content[{j}].image_url.detail"));
                        }
                        out.push(Part::Image(Image::from_url(url)));
                    }
                    Some(other) => req
                        .untranslatable
                        .push(format!("{at}.content[{j}] (type {other})")),
                    None => return Err(format!("{at}.content[{j}]: `type` is required")),
                }
            }
            Ok(out)
        }
        Some(_) => Err(format!("{at}.content must be a string or a list of parts")),
    }
}

/// The Chat Completions body for `req`, to `model` at an OpenAI-compatible provider.
pub fn build_chat(req: &ChatRequest, model: &str) -> Result<Value, Unsupported> {
    if let Some(field) = req.untranslatable.first() {
        return Err(Unsupported::new(
            field.clone(),
            "it has no counterpart in the OpenAI dialect",
        ));
    }
    let mut messages = Vec::new();
    for s in &req.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    for (i, m) in req.messages.iter().enumerate() {
        match m.role {
            Role::User => {
                let mut content = Vec::new();
                for p in &m.parts {
                    match p {
                        Part::Text(t) => content.push(json!({"type": "text", "text": t})),
                        Part::Image(img) => content
                            .push(json!({"type": "image_url", "image_url": {"url": img.to_url()}})),
                        Part::ToolResult {
                            id,
                            content: result,
                            is_error,
                        } => {
                            let mut text = String::new();
                            for r in result {
                                match r {
                                    Part::Text(t) => text.push_str(t),
                                    _ => {
                                        return Err(Unsupported::new(
                                            format!("messages[{i}] (an image in a tool result)"),
                                            "OpenAI tool results carry text only",
                                        ));
                                    }
                                }
                            }
                            if *is_error {
                                text = format!("Error: {text}");
                            }
                            messages
                                .push(json!({"role": "tool", "tool_call_id": id, "content": text}));
                        }
                        Part::ToolCall { .. } => {
                            return Err(Unsupported::new(
                                format!("messages[{i}]"),
                                "a tool call in a user turn",
                            ));
                        }
                    }
                }
                if !content.is_empty() {
                    let content = match content.as_slice() {
                        [only] if only["type"] == "text" => only["text"].clone(),
                        _ => Value::Array(content),
                    };
                    messages.push(json!({"role": "user", "content": content}));
                }
            }
            Role::Assistant => {
                let mut text = String::new();
                let mut calls = Vec::new();
                for p in &m.parts {
                    match p {
                        Part::Text(t) => text.push_str(t),
                        Part::ToolCall {
                            id,
                            name,
                            arguments,
                        } => calls.push(tool_call(id, name, arguments)),
                        _ => {
                            return Err(Unsupported::new(
                                format!("messages[{i}]"),
                                "an image or tool result in an assistant turn",
                            ));
                        }
                    }
                }
                let mut msg = json!({"role": "assistant"});
                msg["content"] = if text.is_empty() && !calls.is_empty() {
                    Value::Null
                } else {
                    Value::String(text)
                };
                if !calls.is_empty() {
                    msg["tool_calls"] = Value::Array(calls);
                }
                messages.push(msg);
            }
        }
    }
    let mut body = json!({"model": model, "messages": messages});
    let o = body.as_object_mut().expect("an object");
    if req.stream {
        o.insert("stream".into(), json!(true));
        o.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(n) = req.max_tokens {
        o.insert("max_tokens".into(), json!(n));
    }
    if let Some(t) = req.temperature {
        o.insert("temperature".into(), json!(t));
    }
    if let Some(t) = req.top_p {
        o.insert("top_p".into(), json!(t));
    }
    if !req.stop.is_empty() {
        o.insert("stop".into(), json!(req.stop));
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.name, "parameters": t.parameters});
                if let Some(d) = &t.description {
                    f["description"] = json!(d);
                }
                json!({"type": "function", "function": f})
            })
            .collect();
        o.insert("tools".into(), Value::Array(tools));
    }
    if let Some(tc) = &req.tool_choice {
        o.insert(
            "tool_choice".into(),
            match tc {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Named(n) => json!({"type": "function", "function": {"name": n}}),
            },
        );
    }
    if let Some(p) = req.parallel_tool_calls {
        o.insert("parallel_tool_calls".into(), json!(p));
    }
    if let Some(rf) = &req.response_format {
        o.insert("response_format".into(), response_format(rf));
    }
    if let Some(u) = &req.user {
        o.insert("user".into(), json!(u));
    }
    Ok(body)
}

fn response_format(rf: &ResponseFormat) -> Value {
    match rf {
        ResponseFormat::Text => json!({"type": "text"}),
        ResponseFormat::JsonObject => json!({"type": "json_object"}),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => {
            json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}})
        }
    }
}

/// Usage as OpenAI reports it (`prompt_tokens` includes cached ones, `completion_tokens`
/// reasoning ones).
pub fn parse_usage(u: &Value) -> Usage {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    Usage {
        input: n(u.get("prompt_tokens")),
        output: n(u.get("completion_tokens")),
        cached_input: n(u.pointer("/prompt_tokens_details/cached_tokens")),
        cache_write: 0,
        reasoning: n(u.pointer("/completion_tokens_details/reasoning_tokens")),
    }
}

pub fn render_usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cached_input},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning},
    })
}

fn parse_finish(s: &str) -> Finish {
    match s {
        "stop" => Finish::Stop,
        "length" => Finish::Length,
        "tool_calls" | "function_call" => Finish::ToolCalls,
        "content_filter" => Finish::ContentFilter,
        other => Finish::Other(other.to_string()),
    }
}

fn finish_name(f: &Finish) -> &str {
    match f {
        Finish::Stop | Finish::StopSequence(_) => "stop",
        Finish::Length => "length",
        Finish::ToolCalls => "tool_calls",
        Finish::ContentFilter => "content_filter",
        Finish::Other(o) => o,
    }
}

/// Reads a Chat Completions answer (its first choice).
pub fn parse_response(v: &Value) -> Result<ChatResponse, String> {
    let choice = v
        .pointer("/choices/0")
        .ok_or("the provider's answer has no choices")?;
    let msg = choice.get("message").ok_or("the choice has no message")?;
    let mut parts = Vec::new();
    if let Some(t) = msg.get("content").and_then(Value::as_str)
        && !t.is_empty()
    {
        parts.push(Part::Text(t.to_string()));
    }
    if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
        for c in calls {
            parts.push(Part::ToolCall {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                name: c["function"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                arguments: c["function"]["arguments"]
                    .as_str()
                    .unwrap_or("{}")
                    .to_string(),
            });
        }
    }
    Ok(ChatResponse {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        model: v["model"].as_str().unwrap_or_default().to_string(),
        parts,
        finish: parse_finish(choice["finish_reason"].as_str().unwrap_or("stop")),
        usage: v.get("usage").map(parse_usage).unwrap_or_default(),
    })
}

/// The Chat Completions answer for `r`.
pub fn render_response(r: &ChatResponse, created: u64) -> Value {
    let called = r.parts.iter().any(|p| matches!(p, Part::ToolCall { .. }));
    let finish = r.finish.clone().with_tools(called);
    let mut text = String::new();
    let mut calls = Vec::new();
    for p in &r.parts {
        match p {
            Part::Text(t) => text.push_str(t),
            Part::ToolCall {
                id,
                name,
                arguments,
            } => calls.push(tool_call(id, name, arguments)),
            _ => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": chat_id(&r.id),
        "object": "chat.completion",
        "created": created,
        "model": r.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_name(&finish), "logprobs": null}],
        "usage": render_usage(&r.usage),
    })
}

/// An id in OpenAI's form.
fn chat_id(id: &str) -> String {
    if id.starts_with("chatcmpl-") {
        id.to_string()
    } else {
        format!("chatcmpl-{id}")
    }
}

/// Reads Chat Completions stream chunks.
#[derive(Default)]
pub struct Decoder {
    started: bool,
    /// The tool-call indexes begun so far.
    tools: Vec<usize>,
}

impl Decoder {
    /// One event's `data`, as deltas.
    pub fn decode(&mut self, data: &str, out: &mut Vec<Delta>) -> Result<(), String> {
        if data.trim() == "[DONE]" {
            out.push(Delta::Done);
            return Ok(());
        }
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("a stream chunk is not JSON: {e}"))?;
        if let Some(err) = v.get("error") {
            out.push(Delta::Error {
                kind: error_kind(err["code"].as_str().or(err["type"].as_str()).unwrap_or("")),
                message: err["message"].as_str().unwrap_or("").to_string(),
            });
            return Ok(());
        }
        if !self.started {
            self.started = true;
            out.push(Delta::Start {
                id: v["id"].as_str().unwrap_or_default().to_string(),
                model: v["model"].as_str().unwrap_or_default().to_string(),
            });
        }
        if let Some(choice) = v.pointer("/choices/0") {
            let delta = &choice["delta"];
            if let Some(t) = delta.get("content").and_then(Value::as_str)
                && !t.is_empty()
            {
                out.push(Delta::Text(t.to_string()));
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for c in calls {
                    let index = c["index"].as_u64().unwrap_or(0) as usize;
                    if !self.tools.contains(&index) {
                        self.tools.push(index);
                        out.push(Delta::ToolStart {
                            index,
                            id: c["id"].as_str().unwrap_or_default().to_string(),
                            name: c["function"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        });
                    }
                    if let Some(a) = c["function"]["arguments"].as_str()
                        && !a.is_empty()
                    {
                        out.push(Delta::ToolArgs {
                            index,
                            json: a.to_string(),
                        });
                    }
                }
            }
            if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
                out.push(Delta::Finish(parse_finish(f)));
            }
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            out.push(Delta::Usage(parse_usage(u)));
        }
        Ok(())
    }
}

/// Writes deltas as Chat Completions chunks.
pub struct Encoder {
    id: String,
    model: String,
    created: u64,
    /// The caller asked for usage in the stream.
    usage_asked: bool,
    usage: Usage,
    started: bool,
    /// A tool call was written.
    tools: bool,
}

impl Encoder {
    pub fn new(created: u64, usage_asked: bool) -> Encoder {
        Encoder {
            id: String::new(),
            model: String::new(),
            created,
            usage_asked,
            usage: Usage::default(),
            started: false,
            tools: false,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if self.usage_asked {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The SSE bytes for one delta (none for some).
    pub fn encode(&mut self, d: &Delta, out: &mut Vec<bytes::Bytes>) {
        let data = |v: Value| super::sse::write(None, &v.to_string());
        match d {
            Delta::Start { id, model } => {
                self.id = chat_id(id);
                self.model = model.clone();
                self.started = true;
                out.push(data(
                    self.chunk(json!({"role": "assistant", "content": ""}), None),
                ));
            }
            Delta::Text(t) => out.push(data(self.chunk(json!({"content": t}), None))),
            Delta::ToolStart { index, id, name } => {
                self.tools = true;
                out.push(data(self.chunk(
                json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                None,
            )))
            }
            Delta::ToolArgs { index, json: a } => out.push(data(self.chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": a}}]}),
                None,
            ))),
            Delta::Finish(f) => {
                let f = f.clone().with_tools(self.tools);
                out.push(data(self.chunk(json!({}), Some(finish_name(&f)))))
            }
            Delta::Usage(u) => self.usage.merge(u),
            Delta::Done => {
                if self.usage_asked {
                    out.push(data(json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": render_usage(&self.usage),
                    })));
                }
                out.push(super::sse::write(None, "[DONE]"));
            }
            Delta::Error { kind, message } => out.push(error_event(kind, message)),
        }
    }
}

/// The error a stream ends with (the SDKs raise it as an `APIError`).
pub fn error_event(kind: &str, message: &str) -> bytes::Bytes {
    super::sse::write(
        None,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": kind}})
            .to_string(),
    )
}

/// A passed-through chunk without what the gateway added for itself: when the caller did
/// not ask for usage, the usage-only chunk goes and the `"usage": null` of the others.
/// `None`: drop the chunk. The bytes are those of the provider unless something was
/// taken out.
pub fn strip_added_usage(data: &str) -> Option<Option<String>> {
    if !data.contains("\"usage\"") {
        return Some(None);
    }
    // OpenAI writes the null as the chunk's last field: cut it off without parsing.
    if let Some(head) = data.strip_suffix(",\"usage\":null}") {
        return Some(Some(format!("{head}}}")));
    }
    let Ok(mut v) = serde_json::from_str::<Value>(data) else {
        return Some(None);
    };
    let Some(o) = v.as_object_mut() else {
        return Some(None);
    };
    let usage_only = o.get("usage").is_some_and(|u| !u.is_null())
        && o.get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| c.is_empty());
    if usage_only {
        return None;
    }
    // `"usage": null` on every chunk, or usage on a chunk that also has choices (some
    // servers put it on the last one): the caller asked for neither.
    if o.get("usage").is_some() {
        o.remove("usage");
        return Some(Some(Value::Object(std::mem::take(o)).to_string()));
    }
    Some(None)
}

/// Sets the upstream model and asks for usage in the stream, on a request passed through
/// to an OpenAI-compatible provider. Says whether the caller had asked for usage itself.
pub fn patch_passthrough(body: &mut Map<String, Value>, model: &str, stream: bool) {
    body.insert("model".into(), Value::String(model.to_string()));
    if stream {
        let so = body.entry("stream_options").or_insert_with(|| json!({}));
        if !so.is_object() {
            *so = json!({});
        }
        so["include_usage"] = json!(true);
    }
}
