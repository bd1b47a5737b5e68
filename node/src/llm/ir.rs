//! The gateway's own form of a chat request, its answer and its stream: what the OpenAI,
//! Anthropic and Gemini dialects are translated through when the caller and the provider
//! speak different ones. It holds only what all of them can carry; a dialect's parser
//! names every field it met that has no place here ([`ChatRequest::untranslatable`]), so
//! a translation refuses it rather than drop it.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    /// The model the caller asked for (an alias of the version's content).
    pub model: String,
    /// System instructions, in order.
    pub system: Vec<String>,
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// The caller asked for usage in the stream (OpenAI's `stream_options.include_usage`).
    pub stream_usage: bool,
    pub response_format: Option<ResponseFormat>,
    /// An id for the end user, for the provider's abuse monitoring.
    pub user: Option<String>,
    /// Fields of the caller's request that only a provider of the same dialect can take,
    /// by the name the caller used (`logprobs`, `top_k`, ...).
    pub untranslatable: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image(Image),
    /// A call the assistant made; `arguments` is JSON text.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
    /// The answer to a call, in a user turn.
    ToolResult {
        id: String,
        /// Text and images.
        content: Vec<Part>,
        is_error: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Image {
    Url(String),
    Base64 { media_type: String, data: String },
}

impl Image {
    /// A `data:` URL is base64 data; anything else a URL.
    pub fn from_url(url: &str) -> Image {
        if let Some(rest) = url.strip_prefix("data:")
            && let Some((media, data)) = rest.split_once(";base64,")
        {
            return Image::Base64 {
                media_type: media.to_string(),
                data: data.to_string(),
            };
        }
        Image::Url(url.to_string())
    }

    pub fn to_url(&self) -> String {
        match self {
            Image::Url(u) => u.clone(),
            Image::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema object.
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: Value,
        strict: bool,
    },
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Stop,
    /// It hit `max_tokens`.
    Length,
    ToolCalls,
    ContentFilter,
    /// One of the caller's stop sequences (Anthropic says which).
    StopSequence(Option<String>),
    /// A reason with no counterpart, as the provider named it.
    Other(String),
}

impl Finish {
    /// An answer that called tools finished to have them run, whatever the provider said
    /// (OpenAI-compatible servers end tool turns with `stop`; Gemini with `STOP`).
    pub fn with_tools(self, called: bool) -> Finish {
        match self {
            Finish::Stop if called => Finish::ToolCalls,
            other => other,
        }
    }
}

/// Tokens, kept apart by kind. `input` counts every input token (cached and cache
/// writes included); `output` every output token (reasoning included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl Usage {
    /// Takes every count `other` has (non-zero) over this one's: providers report usage
    /// in pieces (Anthropic's input at the start and output at the end).
    pub fn merge(&mut self, other: &Usage) {
        let take = |a: &mut u64, b: u64| {
            if b > 0 {
                *a = b
            }
        };
        take(&mut self.input, other.input);
        take(&mut self.output, other.output);
        take(&mut self.cached_input, other.cached_input);
        take(&mut self.cache_write, other.cache_write);
        take(&mut self.reasoning, other.reasoning);
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub id: String,
    /// The model the provider says answered.
    pub model: String,
    /// Text and tool calls.
    pub parts: Vec<Part>,
    pub finish: Finish,
    pub usage: Usage,
}

/// One step of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Start {
        id: String,
        model: String,
    },
    Text(String),
    /// A tool call begins; `index` counts the answer's tool calls from 0.
    ToolStart {
        index: usize,
        id: String,
        name: String,
    },
    ToolArgs {
        index: usize,
        json: String,
    },
    Finish(Finish),
    Usage(Usage),
    /// The provider's stream says it is complete (`[DONE]`, `message_stop`).
    Done,
    /// The provider sent an error in the stream.
    Error {
        kind: String,
        message: String,
    },
}

/// An error a provider sent in its stream, by the type both callers' dialects know:
/// `rate_limit_error`, `overloaded_error`, `invalid_request_error` or `api_error`.
pub fn error_kind(provider_kind: &str) -> String {
    let k = provider_kind.to_ascii_lowercase();
    let kind = if k.contains("rate_limit")
        || k.contains("resource_exhausted")
        || k == "requests"
        || k.contains("quota")
    {
        "rate_limit_error"
    } else if k.contains("overloaded") || k.contains("unavailable") {
        "overloaded_error"
    } else if k.contains("invalid") {
        "invalid_request_error"
    } else {
        "api_error"
    };
    kind.to_string()
}

/// A request field that the chosen provider cannot take: answered 400, naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub field: String,
    pub why: String,
}

impl Unsupported {
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> Unsupported {
        Unsupported {
            field: field.into(),
            why: why.into(),
        }
    }
}

/// Reads an optional number field.
pub fn opt_f64(v: &Value, field: &str) -> Result<Option<f64>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("`{field}` must be a number")),
    }
}

pub fn opt_u64(v: &Value, field: &str) -> Result<Option<u64>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("`{field}` must be a whole number of at least 0")),
    }
}

pub fn opt_str<'v>(v: &'v Value, field: &str) -> Result<Option<&'v str>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{field}` must be a string")),
    }
}

pub fn opt_bool(v: &Value, field: &str) -> Result<Option<bool>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("`{field}` must be true or false")),
    }
}

/// Checks a tool's parameters: a JSON Schema object whose `type` is `object`.
pub fn check_tool_schema(name: &str, schema: &Value) -> Result<(), String> {
    let Value::Object(map) = schema else {
        return Err(format!(
            "tool {name:?}: its parameters must be a JSON Schema object"
        ));
    };
    match map.get("type") {
        None => Ok(()),
        Some(Value::String(t)) if t == "object" => Ok(()),
        Some(other) => Err(format!(
            "tool {name:?}: its parameters' schema must have type \"object\", not {other}"
        )),
    }
}

/// Tool names as every provider takes them: 1-64 of letters, digits, `_` and `-`.
pub fn check_tool_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tool name {name:?} must be 1-64 letters, digits, `_` or `-`"
        ))
    }
}
