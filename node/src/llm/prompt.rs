//! Prompt APIs (docs/llm.md, "Prompt APIs"): an API version's content may name prompts, each
//! a template of messages over variables, a model of the same content, parameters, a JSON
//! schema for the variables and optionally one for the answer. `POST <base>/<name>` with the
//! variables as a JSON object answers the model's output as JSON (or streams it as chat
//! completion chunks when the caller accepts `text/event-stream`).
//!
//! The variables are checked against the input schema before anything is rendered (a 400
//! names the field); the answer is checked against the output schema whether or not the
//! provider enforced it (it is asked to where it can: OpenAI's and Gemini's structured
//! output; Anthropic's models get the schema as an instruction).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::state::spec::SpecErrors;

/// Names a prompt may not take (they are the OpenAI and Anthropic endpoints' first segment).
const RESERVED: [&str; 1] = ["v1"];
/// Request parameters a prompt may set (the rest of a chat request is the template's).
const PARAMETERS: [&str; 7] = [
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// A model of the same content (its name, as callers of the chat endpoints use it).
    pub model: String,
    pub messages: Vec<PromptMessage>,
    /// Chat request parameters: temperature, top_p, max_tokens, stop, seed, penalties.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// A JSON Schema the variables must satisfy (its `default`s fill in absent properties).
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// A JSON Schema the answer must satisfy: the answer is then JSON.
    #[serde(default)]
    pub output_schema: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptMessage {
    pub role: PromptRole,
    /// A template: `{{ name }}` is a variable (minijinja syntax).
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptRole {
    System,
    User,
    Assistant,
}

impl PromptRole {
    fn as_str(self) -> &'static str {
        match self {
            PromptRole::System => "system",
            PromptRole::User => "user",
            PromptRole::Assistant => "assistant",
        }
    }
}

/// A compiled prompt.
#[derive(Debug)]
pub struct Prompt {
    pub name: Arc<str>,
    pub model: Arc<str>,
    templates: minijinja::Environment<'static>,
    roles: Vec<PromptRole>,
    parameters: Map<String, Value>,
    input: Option<(Value, jsonschema::Validator)>,
    output: Option<(Value, jsonschema::Validator)>,
}

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // A variable the template names must be given (or defaulted by the schema).
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

/// Checks `prompts` against the models of the same content.
pub fn check(
    prompts: &BTreeMap<String, PromptSpec>,
    models: &BTreeMap<String, super::spec::ModelSpec>,
    errors: &mut SpecErrors,
) {
    for (name, p) in prompts {
        let at = format!("prompts.{name}");
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !RESERVED.contains(&name.as_str());
        if !ok {
            errors.push(
                &at,
                "prompt names are 1-64 letters, digits, `-` or `_` (not `v1`): they are a path segment",
            );
        }
        match models.get(&p.model) {
            None => errors.push(
                format!("{at}.model"),
                format!("no model {:?} in `models`", p.model),
            ),
            Some(m) if m.kind == super::spec::ModelKind::Embedding => errors.push(
                format!("{at}.model"),
                format!(
                    "{:?} is an embedding model; a prompt needs a chat model",
                    p.model
                ),
            ),
            Some(_) => {}
        }
        if p.messages.is_empty() {
            errors.push(format!("{at}.messages"), "needs at least one message");
        }
        let mut env = environment();
        for (i, m) in p.messages.iter().enumerate() {
            if let Err(e) = env.add_template_owned(i.to_string(), m.content.clone()) {
                errors.push(format!("{at}.messages[{i}].content"), e.to_string());
            }
        }
        for key in p.parameters.keys() {
            if !PARAMETERS.contains(&key.as_str()) {
                errors.push(
                    format!("{at}.parameters.{key}"),
                    format!(
                        "not a parameter a prompt may set; use {}",
                        PARAMETERS.join(", ")
                    ),
                );
            }
        }
        for (field, schema) in [
            ("input_schema", &p.input_schema),
            ("output_schema", &p.output_schema),
        ] {
            if let Some(s) = schema
                && let Err(e) = jsonschema::validator_for(s)
            {
                errors.push(
                    format!("{at}.{field}"),
                    format!("not a valid JSON Schema: {e}"),
                );
            }
        }
    }
}

/// Compiles checked prompts (one that no longer compiles, never written by `check`, is
/// left out).
pub fn compile(prompts: &BTreeMap<String, PromptSpec>) -> BTreeMap<Arc<str>, Arc<Prompt>> {
    let mut out = BTreeMap::new();
    for (name, p) in prompts {
        let mut templates = environment();
        let ok = p.messages.iter().enumerate().all(|(i, m)| {
            templates
                .add_template_owned(i.to_string(), m.content.clone())
                .is_ok()
        });
        let schema = |s: &Option<Value>| -> Result<Option<(Value, jsonschema::Validator)>, ()> {
            match s {
                None => Ok(None),
                Some(s) => jsonschema::validator_for(s)
                    .map(|v| Some((s.clone(), v)))
                    .map_err(|_| ()),
            }
        };
        let (Ok(input), Ok(output)) = (schema(&p.input_schema), schema(&p.output_schema)) else {
            continue;
        };
        if !ok {
            continue;
        }
        out.insert(
            Arc::from(name.as_str()),
            Arc::new(Prompt {
                name: Arc::from(name.as_str()),
                model: Arc::from(p.model.as_str()),
                templates,
                roles: p.messages.iter().map(|m| m.role).collect(),
                parameters: p.parameters.clone(),
                input,
                output,
            }),
        );
    }
    out
}

/// Why a prompt call was refused: the field at fault and what is wrong with it.
#[derive(Debug)]
pub struct BadInput {
    pub field: String,
    pub message: String,
}

impl Prompt {
    /// The chat request (OpenAI's form) the variables render into. `native_schema`: the
    /// model's providers take a JSON Schema for the answer (else it is an instruction).
    pub fn render(
        &self,
        variables: Value,
        stream: bool,
        native_schema: bool,
    ) -> Result<Value, BadInput> {
        let Value::Object(mut vars) = variables else {
            return Err(BadInput {
                field: String::new(),
                message: "the body must be a JSON object of the prompt's variables".into(),
            });
        };
        if let Some((schema, validator)) = &self.input {
            let instance = Value::Object(vars.clone());
            if let Some(e) = validator.iter_errors(&instance).next() {
                let path = e.instance_path().to_string();
                let field = match e.kind() {
                    jsonschema::error::ValidationErrorKind::Required { property } => {
                        property.as_str().unwrap_or_default().to_string()
                    }
                    _ => path.trim_start_matches('/').replace('/', "."),
                };
                return Err(BadInput {
                    message: format!("variable `{field}`: {e}"),
                    field,
                });
            }
            // Absent properties take their schema's default.
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, p) in props {
                    if let Some(d) = p.get("default")
                        && !vars.contains_key(k)
                    {
                        vars.insert(k.clone(), d.clone());
                    }
                }
            }
        }
        let ctx = minijinja::Value::from_serialize(&vars);
        let mut messages = Vec::new();
        for (i, role) in self.roles.iter().enumerate() {
            let t = self
                .templates
                .get_template(&i.to_string())
                .map_err(|e| BadInput {
                    field: String::new(),
                    message: e.to_string(),
                })?;
            // A variable the template names and the body does not give.
            let mut missing: Vec<String> = t
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !vars.contains_key(v))
                .collect();
            missing.sort();
            if let Some(field) = missing.into_iter().next() {
                return Err(BadInput {
                    message: format!("variable `{field}` is required by the prompt's template"),
                    field,
                });
            }
            let content = t.render(&ctx).map_err(|e| BadInput {
                field: String::new(),
                message: format!("the prompt could not be rendered with these variables: {e}"),
            })?;
            messages.push(json!({"role": role.as_str(), "content": content}));
        }
        let mut doc = Map::new();
        doc.insert("model".into(), Value::String(self.model.to_string()));
        for (k, v) in &self.parameters {
            doc.insert(k.clone(), v.clone());
        }
        if let Some((schema, _)) = &self.output {
            if native_schema {
                doc.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {"name": self.name.to_string(), "schema": schema, "strict": false}}),
                );
            } else {
                messages.insert(
                    0,
                    json!({"role": "system", "content": format!(
                        "Answer with a single JSON value and nothing else. It must satisfy this JSON Schema: {schema}"
                    )}),
                );
            }
        }
        doc.insert("messages".into(), Value::Array(messages));
        if stream {
            doc.insert("stream".into(), Value::Bool(true));
        }
        Ok(Value::Object(doc))
    }

    /// The answer's text as the prompt's output: JSON satisfying the output schema (a
    /// fenced code block is unwrapped), or the text itself when there is no schema.
    pub fn output(&self, text: &str) -> Result<Value, String> {
        let Some((_, validator)) = &self.output else {
            return Ok(Value::String(text.to_string()));
        };
        let trimmed = text.trim();
        let body = trimmed
            .strip_prefix("```json")
            .or_else(|| trimmed.strip_prefix("```"))
            .and_then(|b| b.strip_suffix("```"))
            .unwrap_or(trimmed)
            .trim();
        let v: Value = serde_json::from_str(body)
            .map_err(|e| format!("the model's answer is not JSON ({e})"))?;
        if let Some(e) = validator.iter_errors(&v).next() {
            return Err(format!(
                "the model's answer does not satisfy the output schema: {} at `{}`",
                e,
                e.instance_path()
            ));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(yaml: &str) -> Arc<Prompt> {
        let specs: BTreeMap<String, PromptSpec> = serde_yaml_ng::from_str(yaml).unwrap();
        compile(&specs).into_values().next().unwrap()
    }

    #[test]
    fn variables_are_checked_defaulted_and_rendered() {
        let p = prompt(
            r#"
summarize:
  model: gpt
  parameters: { temperature: 0, max_tokens: 50 }
  messages:
    - { role: system, content: "Write in {{ language }}." }
    - { role: user, content: "Summarize: {{ text }}" }
  input_schema:
    type: object
    required: [text]
    properties:
      text: { type: string, maxLength: 100 }
      language: { type: string, default: English }
"#,
        );
        let doc = p.render(json!({"text": "a b c"}), false, true).unwrap();
        assert_eq!(doc["messages"][0]["content"], "Write in English.");
        assert_eq!(doc["messages"][1]["content"], "Summarize: a b c");
        assert_eq!(doc["temperature"], 0);
        let e = p
            .render(json!({"language": "French"}), false, true)
            .unwrap_err();
        assert_eq!(e.field, "text", "{}", e.message);
        let e = p.render(json!({"text": 5}), false, true).unwrap_err();
        assert_eq!(e.field, "text", "{}", e.message);
        let e = p.render(json!(["text"]), false, true).unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
    }

    #[test]
    fn a_variable_without_a_schema_must_still_be_given() {
        let p = prompt("p: { model: gpt, messages: [{ role: user, content: 'Hi {{ who }}' }] }");
        let e = p.render(json!({}), false, true).unwrap_err();
        assert_eq!(e.field, "who", "{}", e.message);
    }

    #[test]
    fn the_answer_is_held_to_the_output_schema() {
        let p = prompt(
            r#"
p:
  model: gpt
  messages: [{ role: user, content: "x" }]
  output_schema: { type: object, required: [score], properties: { score: { type: integer } } }
"#,
        );
        assert_eq!(
            p.output("```json\n{\"score\": 3}\n```").unwrap(),
            json!({"score": 3})
        );
        assert!(
            p.output("{\"score\": \"high\"}")
                .unwrap_err()
                .contains("output schema")
        );
        assert!(p.output("three").unwrap_err().contains("not JSON"));
        // Asked natively where the providers can; as an instruction elsewhere.
        let native = p.render(json!({}), false, true).unwrap();
        assert_eq!(native["response_format"]["type"], "json_schema");
        let told = p.render(json!({}), false, false).unwrap();
        assert!(
            told["messages"][0]["content"]
                .as_str()
                .unwrap()
                .contains("JSON Schema")
        );
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn bad_prompts_are_refused_with_where_and_why() {
        let models: BTreeMap<String, super::super::spec::ModelSpec> = serde_yaml_ng::from_str(
            "gpt: { deployments: [{ provider: p, model: m }] }\nemb: { kind: embedding, deployments: [{ provider: p, model: e }] }",
        )
        .unwrap();
        let prompts: BTreeMap<String, PromptSpec> = serde_yaml_ng::from_str(
            r#"
v1: { model: gpt, messages: [{ role: user, content: "x" }] }
bad-template: { model: gpt, messages: [{ role: user, content: "{{ unclosed" }] }
no-model: { model: nope, messages: [{ role: user, content: "x" }] }
embeds: { model: emb, messages: [{ role: user, content: "x" }] }
bad-schema: { model: gpt, messages: [{ role: user, content: "x" }], input_schema: { type: 12 } }
bad-param: { model: gpt, messages: [{ role: user, content: "x" }], parameters: { tools: [] } }
"#,
        )
        .unwrap();
        let mut errors = SpecErrors::default();
        check(&prompts, &models, &mut errors);
        let text = errors.to_string();
        for want in [
            "prompts.v1",
            "prompts.bad-template.messages[0].content",
            "prompts.no-model.model",
            "prompts.embeds.model",
            "prompts.bad-schema.input_schema",
            "prompts.bad-param.parameters.tools",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
    }
}
