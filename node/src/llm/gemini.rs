//! The Gemini provider (Google's Generative Language API, v1beta): `generateContent`,
//! `streamGenerateContent?alt=sse` and `batchEmbedContents`, written from and read into
//! the gateway's own form. Callers never speak Gemini: it is a provider only.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::ir::*;

/// A function call's id carries Gemini's `thoughtSignature` through the caller's
/// dialect (clients send tool call ids back; Gemini 3 refuses a history without it).
const SIGNED: &str = "tgsig_";

fn call_id(index: usize, f: &Value, part: &Value) -> String {
    if let Some(sig) = part.get("thoughtSignature").and_then(Value::as_str) {
        return format!("{SIGNED}{index}_{sig}");
    }
    f["id"]
        .as_str()
        .map_or_else(|| format!("call_{index}"), str::to_string)
}

fn signature(id: &str) -> Option<&str> {
    id.strip_prefix(SIGNED)?.split_once('_').map(|(_, sig)| sig)
}

/// The `generateContent` body for `req`.
pub fn build(req: &ChatRequest) -> Result<Value, Unsupported> {
    if let Some(field) = req.untranslatable.first() {
        return Err(Unsupported::new(
            field.clone(),
            "it has no counterpart in the Gemini API",
        ));
    }
    // Gemini answers a function call by name; the caller's dialects by call id.
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut contents = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let mut parts = Vec::new();
        for p in &m.parts {
            match p {
                Part::Text(t) => parts.push(json!({"text": t})),
                Part::Image(img) => parts.push(image(img)),
                Part::ToolCall {
                    id,
                    name,
                    arguments,
                } => {
                    names.insert(id, name);
                    let args: Value = serde_json::from_str(if arguments.trim().is_empty() {
                        "{}"
                    } else {
                        arguments
                    })
                    .map_err(|_| {
                        Unsupported::new(
                            format!("messages[{i}] (tool call {id})"),
                            "its arguments are not JSON, which Gemini needs",
                        )
                    })?;
                    let mut part = json!({"functionCall": {"name": name, "args": args}});
                    if let Some(sig) = signature(id) {
                        part["thoughtSignature"] = json!(sig);
                    }
                    parts.push(part);
                }
                Part::ToolResult {
                    id,
                    content,
                    is_error,
                } => {
                    let name = names.get(id.as_str()).ok_or_else(|| {
                        Unsupported::new(
                            format!("messages[{i}] (tool result {id})"),
                            "it answers no tool call of the conversation, and Gemini needs the tool's name",
                        )
                    })?;
                    let mut text = String::new();
                    for c in content {
                        match c {
                            Part::Text(t) => text.push_str(t),
                            _ => {
                                return Err(Unsupported::new(
                                    format!("messages[{i}] (an image in a tool result)"),
                                    "Gemini function responses carry JSON only",
                                ));
                            }
                        }
                    }
                    let key = if *is_error { "error" } else { "result" };
                    let value = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
                    parts.push(
                        json!({"functionResponse": {"name": name, "response": {key: value}}}),
                    );
                }
            }
        }
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "model",
        };
        contents.push(json!({"role": role, "parts": parts}));
    }
    let mut body = json!({"contents": contents});
    let o = body.as_object_mut().expect("an object");
    if !req.system.is_empty() {
        let parts: Vec<Value> = req.system.iter().map(|s| json!({"text": s})).collect();
        o.insert("systemInstruction".into(), json!({"parts": parts}));
    }
    let mut config = serde_json::Map::new();
    if let Some(n) = req.max_tokens {
        config.insert("maxOutputTokens".into(), json!(n));
    }
    if let Some(t) = req.temperature {
        config.insert("temperature".into(), json!(t));
    }
    if let Some(t) = req.top_p {
        config.insert("topP".into(), json!(t));
    }
    if !req.stop.is_empty() {
        config.insert("stopSequences".into(), json!(req.stop));
    }
    match &req.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            config.insert("responseMimeType".into(), json!("application/json"));
            config.insert("responseJsonSchema".into(), schema.clone());
        }
    }
    if !config.is_empty() {
        o.insert("generationConfig".into(), Value::Object(config));
    }
    if !req.tools.is_empty() {
        let decls: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut d = json!({"name": t.name, "parametersJsonSchema": t.parameters});
                if let Some(desc) = &t.description {
                    d["description"] = json!(desc);
                }
                d
            })
            .collect();
        o.insert("tools".into(), json!([{"functionDeclarations": decls}]));
    }
    if let Some(tc) = &req.tool_choice {
        let config = match tc {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::Named(n) => json!({"mode": "ANY", "allowedFunctionNames": [n]}),
        };
        o.insert(
            "toolConfig".into(),
            json!({"functionCallingConfig": config}),
        );
    }
    if req.parallel_tool_calls == Some(false) {
        return Err(Unsupported::new(
            "parallel_tool_calls",
            "Gemini has no switch for parallel function calls",
        ));
    }
    Ok(body)
}

fn image(img: &Image) -> Value {
    match img {
        Image::Base64 { media_type, data } => {
            json!({"inlineData": {"mimeType": media_type, "data": data}})
        }
        Image::Url(u) => {
            let lower = u.to_ascii_lowercase();
            let mime = if lower.ends_with(".png") {
                "image/png"
            } else if lower.ends_with(".webp") {
                "image/webp"
            } else if lower.ends_with(".gif") {
                "image/gif"
            } else {
                "image/jpeg"
            };
            json!({"fileData": {"mimeType": mime, "fileUri": u}})
        }
    }
}

/// Usage as Gemini reports it: the prompt count includes cached tokens; output is the
/// candidates' tokens plus the thinking ones.
pub fn parse_usage(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let thoughts = n("thoughtsTokenCount");
    Usage {
        input: n("promptTokenCount") + n("toolUsePromptTokenCount"),
        output: n("candidatesTokenCount") + thoughts,
        cached_input: n("cachedContentTokenCount"),
        cache_write: 0,
        reasoning: thoughts,
    }
}

fn parse_finish(reason: &str, called: bool) -> Finish {
    match reason {
        "STOP" if called => Finish::ToolCalls,
        "STOP" => Finish::Stop,
        "MAX_TOKENS" => Finish::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            Finish::ContentFilter
        }
        other => Finish::Other(other.to_ascii_lowercase()),
    }
}

/// Reads a `generateContent` answer (its first candidate).
pub fn parse_response(v: &Value) -> Result<ChatResponse, String> {
    let cand = v
        .pointer("/candidates/0")
        .ok_or("the provider's answer has no candidates")?;
    let mut parts = Vec::new();
    let mut calls = 0;
    for p in cand["content"]["parts"].as_array().into_iter().flatten() {
        if p.get("thought").is_some_and(|t| t == true) {
            continue;
        }
        if let Some(t) = p.get("text").and_then(Value::as_str) {
            if !t.is_empty() {
                parts.push(Part::Text(t.to_string()));
            }
        } else if let Some(f) = p.get("functionCall") {
            parts.push(Part::ToolCall {
                id: call_id(calls, f, p),
                name: f["name"].as_str().unwrap_or_default().to_string(),
                arguments: f.get("args").cloned().unwrap_or(json!({})).to_string(),
            });
            calls += 1;
        }
    }
    Ok(ChatResponse {
        id: v["responseId"].as_str().unwrap_or_default().to_string(),
        model: v["modelVersion"].as_str().unwrap_or_default().to_string(),
        parts,
        finish: parse_finish(cand["finishReason"].as_str().unwrap_or("STOP"), calls > 0),
        usage: v.get("usageMetadata").map(parse_usage).unwrap_or_default(),
    })
}

/// Reads `streamGenerateContent?alt=sse` chunks. Gemini's stream has no end marker: it is
/// complete when a chunk carried a finish reason and the body then ended.
#[derive(Default)]
pub struct Decoder {
    started: bool,
    tools: usize,
    finish: Option<String>,
}

impl Decoder {
    pub fn decode(&mut self, data: &str, out: &mut Vec<Delta>) -> Result<(), String> {
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("a stream chunk is not JSON: {e}"))?;
        if let Some(err) = v.get("error") {
            out.push(Delta::Error {
                kind: error_kind(err["status"].as_str().unwrap_or("")),
                message: err["message"].as_str().unwrap_or_default().to_string(),
            });
            return Ok(());
        }
        if !self.started {
            self.started = true;
            out.push(Delta::Start {
                id: v["responseId"].as_str().unwrap_or_default().to_string(),
                model: v["modelVersion"].as_str().unwrap_or_default().to_string(),
            });
        }
        if let Some(cand) = v.pointer("/candidates/0") {
            for p in cand["content"]["parts"].as_array().into_iter().flatten() {
                if p.get("thought").is_some_and(|t| t == true) {
                    continue;
                }
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    if !t.is_empty() {
                        out.push(Delta::Text(t.to_string()));
                    }
                } else if let Some(f) = p.get("functionCall") {
                    let index = self.tools;
                    self.tools += 1;
                    out.push(Delta::ToolStart {
                        index,
                        id: call_id(index, f, p),
                        name: f["name"].as_str().unwrap_or_default().to_string(),
                    });
                    out.push(Delta::ToolArgs {
                        index,
                        json: f.get("args").cloned().unwrap_or(json!({})).to_string(),
                    });
                }
            }
            if let Some(r) = cand["finishReason"].as_str() {
                self.finish = Some(r.to_string());
            }
        }
        if let Some(u) = v.get("usageMetadata") {
            out.push(Delta::Usage(parse_usage(u)));
        }
        Ok(())
    }

    /// At the end of the body: the finish and `Done` when the stream was complete.
    pub fn end(&mut self, out: &mut Vec<Delta>) -> bool {
        match self.finish.take() {
            Some(r) => {
                out.push(Delta::Finish(parse_finish(&r, self.tools > 0)));
                out.push(Delta::Done);
                true
            }
            None => false,
        }
    }
}

/// The `batchEmbedContents` body for an OpenAI embeddings request's `input`.
pub fn build_embeddings(model: &str, input: &Value) -> Result<Value, String> {
    let texts: Vec<&str> = match input {
        Value::String(s) => vec![s],
        Value::Array(a) => a
            .iter()
            .map(Value::as_str)
            .collect::<Option<_>>()
            .ok_or("`input` must be text (a string or a list of strings) for a Gemini model")?,
        _ => return Err("`input` must be a string or a list of strings".into()),
    };
    let requests: Vec<Value> = texts
        .iter()
        .map(|t| json!({"model": format!("models/{model}"), "content": {"parts": [{"text": t}]}}))
        .collect();
    Ok(json!({"requests": requests}))
}

/// A `batchEmbedContents` answer as OpenAI's embeddings list.
pub fn embeddings_answer(v: &Value, model: &str, input_tokens: u64) -> Value {
    let data: Vec<Value> = v["embeddings"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e["values"]}))
        .collect();
    json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens}})
}
