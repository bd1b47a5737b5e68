//! Counting tokens where a provider reports none: a stream the provider cut, a client
//! that left, `count_tokens` for a model that is not Anthropic's, and a prompt checked
//! against the context windows before any call.
//!
//! OpenAI's models are counted with their own encodings (o200k_base for the GPT-4o, 4.1,
//! 5 and o-series families, cl100k_base for GPT-4, GPT-3.5 and the text-embedding-3
//! models). Other providers do not publish their tokenizers: their counts are o200k_base
//! counts, an estimate (docs/llm.md, "Exact usage"). A count made here is always marked
//! estimated in the usage records.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use super::ir::{ChatRequest, Part};

static O200K: OnceLock<CoreBPE> = OnceLock::new();
static CL100K: OnceLock<CoreBPE> = OnceLock::new();

fn o200k() -> &'static CoreBPE {
    O200K.get_or_init(|| tiktoken_rs::o200k_base().expect("the bundled o200k_base encoding loads"))
}

fn cl100k() -> &'static CoreBPE {
    CL100K
        .get_or_init(|| tiktoken_rs::cl100k_base().expect("the bundled cl100k_base encoding loads"))
}

/// Loads the encodings (a few hundred ms), so the first count on a data-plane thread does
/// not pay for it. Call once, off the data plane.
pub fn warm_up() {
    o200k();
    cl100k();
}

/// The encoding for a provider's model id.
fn encoding(model: &str) -> &'static CoreBPE {
    let m = model.rsplit('/').next().unwrap_or(model);
    if m.starts_with("gpt-4o")
        || m.starts_with("gpt-4.1")
        || m.starts_with("gpt-5")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4")
        || m.starts_with("chatgpt-4o")
    {
        return o200k();
    }
    if m.starts_with("gpt-4") || m.starts_with("gpt-3.5") || m.starts_with("text-embedding") {
        return cl100k();
    }
    o200k()
}

/// Tokens in `text` for `model`.
pub fn count(model: &str, text: &str) -> u64 {
    encoding(model).encode_ordinary(text).len() as u64
}

/// Tokens an image is counted as (OpenAI's low-detail figure; the real count depends on
/// its size, which the gateway does not decode).
const IMAGE_TOKENS: u64 = 85;

/// The prompt tokens of a request, as OpenAI counts chat messages: each message adds 3,
/// the reply's priming 3 more; tool definitions are counted as their JSON.
pub fn count_prompt(model: &str, req: &ChatRequest) -> u64 {
    let bpe = encoding(model);
    prompt_size(req, &|t: &str| bpe.encode_ordinary(t).len() as u64)
}

/// A prompt's size with `text` the size of a piece of text: 3 per message and 3 for the
/// reply, tools counted as their JSON.
fn prompt_size(req: &ChatRequest, text: &dyn Fn(&str) -> u64) -> u64 {
    let mut n = 3;
    for s in &req.system {
        n += 3 + text(s);
    }
    for m in &req.messages {
        n += 3;
        for p in &m.parts {
            n += part_tokens(p, text);
        }
    }
    for t in &req.tools {
        n += text(&t.name)
            + text(t.description.as_deref().unwrap_or(""))
            + text(&t.parameters.to_string());
    }
    n
}

/// Prompts whose bound is at most this are reserved at the bound, not counted.
pub const SHORT_PROMPT: u64 = 1024;

/// What a prompt's tokens are reserved at: [`count_prompt`]'s count for a long prompt; for
/// a short one (bound at most [`SHORT_PROMPT`]), the bound itself, which [`count_prompt`]
/// never exceeds (every token is at least a byte) and which costs no tokenizer pass. What
/// the reservation holds over the count comes back when the request ends.
pub fn reserve_prompt(model: &str, req: &ChatRequest) -> u64 {
    let bound = prompt_bound(req);
    if bound <= SHORT_PROMPT {
        bound
    } else {
        count_prompt(model, req)
    }
}

/// [`count_prompt`] with every token a byte: an upper bound of it.
pub fn prompt_bound(req: &ChatRequest) -> u64 {
    prompt_size(req, &|t: &str| t.len() as u64)
}

fn part_tokens(p: &Part, text: &dyn Fn(&str) -> u64) -> u64 {
    match p {
        Part::Text(t) => text(t),
        Part::Image(_) => IMAGE_TOKENS,
        Part::ToolCall {
            name, arguments, ..
        } => text(name) + text(arguments),
        Part::ToolResult { content, .. } => content.iter().map(|c| part_tokens(c, text)).sum(),
    }
}

/// A bound no request's prompt can exceed in tokens, from its size: a token is at least
/// one byte. Counting is skipped when even this fits every window.
pub fn upper_bound(body_bytes: usize) -> u64 {
    body_bytes as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn openai_encodings_count_as_tiktoken_does() {
        // "hello world" is two tokens in both encodings.
        assert_eq!(super::count("gpt-4o", "hello world"), 2);
        assert_eq!(super::count("gpt-3.5-turbo", "hello world"), 2);
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;
    use crate::llm::ir::{Message, Role};

    #[test]
    fn a_short_prompt_is_reserved_at_a_bound_no_count_exceeds() {
        let req = ChatRequest {
            system: vec!["Be brief.".into()],
            messages: vec![Message {
                role: Role::User,
                parts: vec![Part::Text("hello there, how are you? 12345 ünïcödé".into())],
            }],
            ..ChatRequest::default()
        };
        for model in ["gpt-4o", "gpt-4", "claude-x"] {
            assert!(prompt_bound(&req) >= count_prompt(model, &req));
        }
        assert_eq!(reserve_prompt("gpt-4o", &req), prompt_bound(&req));
        let long = ChatRequest {
            messages: vec![Message {
                role: Role::User,
                parts: vec![Part::Text("word ".repeat(400))],
            }],
            ..ChatRequest::default()
        };
        assert_eq!(
            reserve_prompt("gpt-4o", &long),
            count_prompt("gpt-4o", &long)
        );
    }
}
