//! OpenAI's Responses API, stateless (`store: false`): requests read into the gateway's own
//! form, answers and streams written from it. Every provider serves it by translation
//! (docs/llm.md, "The Responses API" lists what is left out).

use serde_json::{Value, json};

use super::ir::*;

/// The top-level fields [`parse`] carries.
const CARRIED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "store",
    "text",
    "user",
];

/// Reads a Responses request. `Err` says what is wrong with it.
pub fn parse(v: &Value) -> Result<ChatRequest, String> {
    let obj = v
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    if opt_bool(v, "store")? == Some(true) {
        return Err("`store`: this gateway keeps no responses; send store: false".into());
    }
    if v.get("previous_response_id").is_some_and(|p| !p.is_null()) {
        return Err(
            "`previous_response_id`: this gateway keeps no responses; send the conversation in `input`"
                .into(),
        );
    }
    let mut req = ChatRequest {
        model: opt_str(v, "model")?
            .ok_or("`model` is required: name one of the models GET /v1/models lists")?
            .to_string(),
        stream: opt_bool(v, "stream")?.unwrap_or(false),
        stream_usage: true,
        max_tokens: opt_u64(v, "max_output_tokens")?,
        temperature: opt_f64(v, "temperature")?,
        top_p: opt_f64(v, "top_p")?,
        parallel_tool_calls: opt_bool(v, "parallel_tool_calls")?,
        user: opt_str(v, "user")?.map(str::to_string),
        ..ChatRequest::default()
    };
    for key in obj.keys() {
        if !CARRIED.contains(&key.as_str()) {
            req.untranslatable.push(key.clone());
        }
    }
    if let Some(i) = opt_str(v, "instructions")? {
        req.system.push(i.to_string());
    }
    match v.get("input") {
        Some(Value::String(s)) => push(&mut req, Role::User, vec![Part::Text(s.clone())]),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                item_into(item, i, &mut req)?;
            }
        }
        _ => return Err("`input` is required: a string or a list of items".into()),
    }
    if req.messages.is_empty() {
        return Err("`input` has no message".into());
    }
    for (i, t) in v
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if t["type"] != "function" {
            req.untranslatable.push(format!("tools[{i}].type"));
            continue;
        }
        let tool =
            super::openai::parse_function(t, &format!("tools[{i}]"), &mut req.untranslatable)?;
        req.tools.push(tool);
    }
    req.tool_choice = match v.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(format!(
                    "`tool_choice` {other:?} is not auto, none or required"
                ));
            }
        }),
        Some(o) if o["type"] == "function" => {
            let name = opt_str(o, "name")?.ok_or("`tool_choice.name` is required")?;
            if !req.tools.iter().any(|t| t.name == name) {
                return Err(format!(
                    "`tool_choice` names function {name:?}, which is not in `tools`"
                ));
            }
            Some(ToolChoice::Named(name.to_string()))
        }
        Some(_) => {
            req.untranslatable.push("tool_choice".into());
            None
        }
    };
    if let Some(text) = v.get("text").filter(|t| !t.is_null()) {
        if let Some(f) = text.get("format").filter(|f| !f.is_null()) {
            req.response_format = Some(match f["type"].as_str() {
                Some("text") => ResponseFormat::Text,
                Some("json_object") => ResponseFormat::JsonObject,
                Some("json_schema") => ResponseFormat::JsonSchema {
                    name: opt_str(f, "name")?.unwrap_or("response").to_string(),
                    schema: f.get("schema").cloned().unwrap_or(json!({})),
                    strict: opt_bool(f, "strict")?.unwrap_or(false),
                },
                _ => {
                    return Err(
                        "`text.format.type` must be text, json_object or json_schema".into(),
                    );
                }
            });
        }
        if text.get("verbosity").is_some() {
            req.untranslatable.push("text.verbosity".into());
        }
    }
    Ok(req)
}

fn push(req: &mut ChatRequest, role: Role, parts: Vec<Part>) {
    if let Some(last) = req.messages.last_mut()
        && last.role == role
    {
        last.parts.extend(parts);
        return;
    }
    req.messages.push(Message { role, parts });
}

fn item_into(item: &Value, i: usize, req: &mut ChatRequest) -> Result<(), String> {
    let at = format!("input[{i}]");
    match item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message")
    {
        "message" => {
            let role = opt_str(item, "role")?.ok_or_else(|| format!("{at}: `role` is required"))?;
            let parts = match item.get("content") {
                Some(Value::String(s)) => vec![Part::Text(s.clone())],
                Some(Value::Array(ps)) => {
                    let mut out = Vec::new();
                    for (j, p) in ps.iter().enumerate() {
                        match p["type"].as_str() {
                            Some("input_text" | "output_text" | "text") => out.push(Part::Text(
                                p["text"].as_str().unwrap_or_default().to_string(),
                            )),
                            Some("input_image") => match p["image_url"].as_str() {
                                Some(url) => out.push(Part::Image(Image::from_url(url))),
                                None => req
                                    .untranslatable
                                    .push(format!("{at}.content[{j}].file_id")),
                            },
                            other => req
                                .untranslatable
                                .push(format!("{at}.content[{j}] (type {})", other.unwrap_or("?"))),
                        }
                    }
                    out
                }
                _ => return Err(format!("{at}.content must be a string or a list of parts")),
            };
            match role {
                "system" | "developer" => {
                    let text: String = parts
                        .iter()
                        .filter_map(|p| match p {
                            Part::Text(t) => Some(t.as_str()),
                            _ => None,
                        })
                        .collect();
                    req.system.push(text);
                }
                "user" => push(req, Role::User, parts),
                "assistant" => push(req, Role::Assistant, parts),
                other => {
                    return Err(format!(
                        "{at}: role {other:?} is not user, assistant, system or developer"
                    ));
                }
            }
        }
        "function_call" => push(
            req,
            Role::Assistant,
            vec![Part::ToolCall {
                id: opt_str(item, "call_id")?
                    .ok_or_else(|| format!("{at}: `call_id` is required"))?
                    .to_string(),
                name: opt_str(item, "name")?
                    .ok_or_else(|| format!("{at}: `name` is required"))?
                    .to_string(),
                arguments: opt_str(item, "arguments")?.unwrap_or("{}").to_string(),
            }],
        ),
        "function_call_output" => {
            let output = match item.get("output") {
                Some(Value::String(s)) => vec![Part::Text(s.clone())],
                Some(Value::Array(ps)) => ps
                    .iter()
                    .filter_map(|p| p["text"].as_str().map(|t| Part::Text(t.to_string())))
                    .collect(),
                _ => return Err(format!("{at}: `output` is required")),
            };
            push(
                req,
                Role::User,
                vec![Part::ToolResult {
                    id: opt_str(item, "call_id")?
                        .ok_or_else(|| format!("{at}: `call_id` is required"))?
                        .to_string(),
                    content: output,
                    is_error: false,
                }],
            );
        }
        // Reasoning items, item references, built-in tools' calls: nothing to carry them.
        other => req.untranslatable.push(format!("{at} (type {other})")),
    }
    Ok(())
}

pub fn render_usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": u.cached_input, "cache_write_tokens": u.cache_write},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning},
        "total_tokens": u.input + u.output,
    })
}

fn resp_id(id: &str) -> String {
    let clean: String = id.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("resp_{clean}")
}

/// The response object's frame: everything but status, output and usage.
fn frame(id: &str, model: &str, created: u64, req: &ChatRequest) -> Value {
    let tools: Vec<Value> = req
        .tools
        .iter()
        .map(|t| json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters, "strict": false}))
        .collect();
    let tool_choice = match &req.tool_choice {
        None | Some(ToolChoice::Auto) => json!("auto"),
        Some(ToolChoice::None) => json!("none"),
        Some(ToolChoice::Required) => json!("required"),
        Some(ToolChoice::Named(n)) => json!({"type": "function", "name": n}),
    };
    let format = match &req.response_format {
        None | Some(ResponseFormat::Text) => json!({"type": "text"}),
        Some(ResponseFormat::JsonObject) => json!({"type": "json_object"}),
        Some(ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        }) => {
            json!({"type": "json_schema", "name": name, "schema": schema, "strict": strict})
        }
    };
    json!({
        "id": resp_id(id), "object": "response", "created_at": created, "status": "in_progress",
        "background": false, "completed_at": null, "error": null, "incomplete_details": null,
        "instructions": if req.system.is_empty() { Value::Null } else { json!(req.system.join("\n\n")) },
        "max_output_tokens": req.max_tokens, "max_tool_calls": null, "model": model, "output": [],
        "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true), "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null}, "service_tier": "default", "store": false,
        "temperature": req.temperature, "text": {"format": format}, "tool_choice": tool_choice,
        "tools": tools, "top_p": req.top_p, "truncation": "disabled", "usage": null,
        "user": req.user, "metadata": {},
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"id": id, "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    let arguments = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    json!({"id": id, "type": "function_call", "status": status, "call_id": call_id, "name": name, "arguments": arguments})
}

/// A finished answer's status and `incomplete_details`.
fn status_of(f: &Finish) -> (&'static str, Value) {
    match f {
        Finish::Length => ("incomplete", json!({"reason": "max_output_tokens"})),
        Finish::ContentFilter => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// The Responses answer for `r`.
pub fn render(r: &ChatResponse, req: &ChatRequest, created: u64) -> Value {
    let mut v = frame(&r.id, &r.model, created, req);
    let mut output = Vec::new();
    let mut text = String::new();
    for p in &r.parts {
        if let Part::Text(t) = p {
            text.push_str(t);
        }
    }
    let (status, incomplete) = status_of(&r.finish);
    if !text.is_empty() {
        output.push(message_item(
            &format!("msg_{}", resp_id(&r.id)),
            &text,
            status,
        ));
    }
    for (i, p) in r.parts.iter().enumerate() {
        if let Part::ToolCall {
            id,
            name,
            arguments,
        } = p
        {
            output.push(call_item(
                &format!("fc_{i}_{}", resp_id(&r.id)),
                id,
                name,
                arguments,
                "completed",
            ));
        }
    }
    v["status"] = json!(status);
    v["incomplete_details"] = incomplete;
    v["completed_at"] = json!(created);
    v["output"] = Value::Array(output);
    v["usage"] = render_usage(&r.usage);
    v
}

enum Open {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        tool: usize,
    },
}

/// Writes deltas as Responses stream events.
pub struct Encoder {
    req: std::sync::Arc<ChatRequest>,
    created: u64,
    seq: u64,
    response: Value,
    id: String,
    /// Items done, for `response.completed`.
    done: Vec<Value>,
    /// Items open, in output order.
    open: Vec<(usize, Open)>,
    next_index: usize,
    finish: Option<Finish>,
    usage: Usage,
    ended: bool,
}

impl Encoder {
    pub fn new(req: std::sync::Arc<ChatRequest>, created: u64) -> Encoder {
        Encoder {
            req,
            created,
            seq: 0,
            response: Value::Null,
            id: String::new(),
            done: Vec::new(),
            open: Vec::new(),
            next_index: 0,
            finish: None,
            usage: Usage::default(),
            ended: false,
        }
    }

    fn event(&mut self, kind: &str, mut v: Value, out: &mut Vec<bytes::Bytes>) {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push(super::sse::write(Some(kind), &v.to_string()));
    }

    fn close_message(&mut self, out: &mut Vec<bytes::Bytes>) {
        let Some(pos) = self
            .open
            .iter()
            .position(|(_, o)| matches!(o, Open::Message { .. }))
        else {
            return;
        };
        let (index, open) = self.open.remove(pos);
        let Open::Message { id, text } = open else {
            return;
        };
        let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        self.event("response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}), out);
        self.event(
            "response.content_part.done",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            out,
        );
        let item = message_item(&id, &text, "completed");
        self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
            out,
        );
        self.done.push(item);
    }

    fn close_calls(&mut self, out: &mut Vec<bytes::Bytes>) {
        let calls: Vec<(usize, Open)> = std::mem::take(&mut self.open);
        for (index, open) in calls {
            if let Open::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } = open
            {
                let arguments = if arguments.trim().is_empty() {
                    "{}".to_string()
                } else {
                    arguments
                };
                self.event("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}), out);
                let item = call_item(&id, &call_id, &name, &arguments, "completed");
                self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                    out,
                );
                self.done.push(item);
            }
        }
    }

    pub fn encode(&mut self, d: &Delta, out: &mut Vec<bytes::Bytes>) {
        if self.ended {
            return;
        }
        match d {
            Delta::Start { id, model } => {
                self.id = resp_id(id);
                self.response = frame(id, model, self.created, &self.req);
                let r = self.response.clone();
                self.event("response.created", json!({"response": r}), out);
                self.event("response.in_progress", json!({"response": r}), out);
            }
            Delta::Text(t) => {
                let open = self.open.iter_mut().find_map(|(i, o)| match o {
                    Open::Message { id, text } => Some((*i, id.clone(), text)),
                    _ => None,
                });
                let (index, id) = match open {
                    Some((i, id, text)) => {
                        text.push_str(t);
                        (i, id)
                    }
                    None => {
                        let index = self.next_index;
                        self.next_index += 1;
                        let id = format!("msg_{index}_{}", self.id);
                        let item = json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []});
                        self.event(
                            "response.output_item.added",
                            json!({"output_index": index, "item": item}),
                            out,
                        );
                        self.event("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}), out);
                        self.open.push((
                            index,
                            Open::Message {
                                id: id.clone(),
                                text: t.clone(),
                            },
                        ));
                        (index, id)
                    }
                };
                self.event("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": []}), out);
            }
            Delta::ToolStart {
                index: tool,
                id: call_id,
                name,
            } => {
                self.close_message(out);
                let index = self.next_index;
                self.next_index += 1;
                let id = format!("fc_{index}_{}", self.id);
                let item = json!({"id": id, "type": "function_call", "status": "in_progress", "call_id": call_id, "name": name, "arguments": ""});
                self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                    out,
                );
                self.open.push((
                    index,
                    Open::Call {
                        id,
                        call_id: call_id.clone(),
                        name: name.clone(),
                        arguments: String::new(),
                        tool: *tool,
                    },
                ));
            }
            Delta::ToolArgs {
                index: tool,
                json: a,
            } => {
                let found = self.open.iter_mut().find_map(|(i, o)| match o {
                    Open::Call {
                        id,
                        arguments,
                        tool: t,
                        ..
                    } if t == tool => {
                        arguments.push_str(a);
                        Some((*i, id.clone()))
                    }
                    _ => None,
                });
                if let Some((index, id)) = found {
                    self.event(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": a}),
                        out,
                    );
                }
            }
            Delta::Finish(f) => self.finish = Some(f.clone()),
            Delta::Usage(u) => self.usage.merge(u),
            Delta::Done => {
                self.close_message(out);
                self.close_calls(out);
                let (status, incomplete) = status_of(self.finish.as_ref().unwrap_or(&Finish::Stop));
                let mut r = self.response.clone();
                r["status"] = json!(status);
                r["incomplete_details"] = incomplete;
                r["completed_at"] = json!(crate::actor::wall_ms() / 1000);
                r["output"] = Value::Array(std::mem::take(&mut self.done));
                r["usage"] = render_usage(&self.usage);
                let kind = if status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                self.event(kind, json!({"response": r}), out);
                self.ended = true;
            }
            Delta::Error { message, .. } => {
                let mut r = self.response.clone();
                r["status"] = json!("failed");
                r["error"] = json!({"code": "server_error", "message": message});
                r["output"] = Value::Array(std::mem::take(&mut self.done));
                self.event("response.failed", json!({"response": r}), out);
                self.ended = true;
            }
        }
    }
}
