//! One test per LLM-gateway bug reported against other gateways (LiteLLM, Portkey, APISIX,
//! Kong): each reproduces the reported situation against Tollgate and shows what it does.
//! The provider is the demo (`tollgate llm-demo`): its directives for faults, and scripted
//! answers (exact bytes) where a bug needs a wire shape of its own.

mod harness;

use std::time::Duration;

use harness::llm::{LlmDemo, Streamed, llm_api, llm_rows, sse, stream};
use harness::{GatewayProcess, allowing_loopback, eventually};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn setup(models: &str) -> (LlmDemo, GatewayProcess, harness::cp::CpProcess, String) {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start_with(
        &allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &["--meter-interval", "200ms"],
    )
    .await;
    let content = format!("{}models:\n{models}", demo.providers());
    let (cp, key) = llm_api(&gw, &content).await;
    (demo, gw, cp, key)
}

const BASIC: &str = "  gpt: { deployments: [{ provider: oai, model: gpt-demo }] }
  claude: { deployments: [{ provider: claude, model: claude-demo }] }
  gemini: { deployments: [{ provider: gem, model: gemini-demo }] }
";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// An OpenAI-dialect streamed chat.
async fn openai_stream(gw: &GatewayProcess, key: &str, body: Value) -> Streamed {
    stream(
        gw,
        "/llm/v1/chat/completions",
        &[
            ("authorization", &bearer(key)),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

/// An Anthropic-dialect streamed message.
async fn anthropic_stream(gw: &GatewayProcess, key: &str, body: Value) -> Streamed {
    stream(
        gw,
        "/llm/v1/messages",
        &[("x-api-key", key), ("anthropic-version", "2023-06-01")],
        body,
    )
    .await
}

/// The named events of an Anthropic stream: (event, data).
fn anthropic_events(s: &Streamed) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut event = String::new();
    for line in s.text().lines() {
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((
                event.clone(),
                serde_json::from_str(d).unwrap_or(Value::Null),
            ));
        }
    }
    out
}

fn msgs(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Waits until the usage rows satisfy `f`.
async fn rows_where(
    gw: &GatewayProcess,
    what: &str,
    f: impl Fn(&[tollgate_proto::state::v1::UsageEntry]) -> bool,
) -> Vec<tollgate_proto::state::v1::UsageEntry> {
    let mut last = Vec::new();
    eventually(what, T, async || {
        last = llm_rows(gw).await;
        f(&last)
    })
    .await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_37923_a_streamed_request_is_metered_and_priced_like_the_same_request_unstreamed() {
    let (_demo, gw, cpp, _) = setup(BASIC).await;
    let cp = cpp.sdk(gw.operator_token());
    let plain = cp.create_key("acme", "plain", "").await.unwrap().secret;
    let streamed = cp.create_key("acme", "streamed", "").await.unwrap().secret;
    cp.put_plan(
        "tokens",
        tollgate_sdk::state::PlanPrices {
            per_1k_tokens: [("*".to_string(), "2.00".to_string())].into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cp.assign_plan("acme", "tokens").await.unwrap();
    for model in ["gpt", "claude", "gemini"] {
        let body = json!({"model": model, "max_tokens": 64, "messages": msgs("nine words of prompt to be priced right here")});
        let r = gw
            .send(
                http::Request::post(gw.url("/llm/v1/messages"))
                    .header("x-api-key", &plain)
                    .body(harness::full(body.to_string()))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 200);
        let mut body = body;
        body["stream"] = json!(true);
        let s = anthropic_stream(&gw, &streamed, body).await;
        assert_eq!(s.status, 200);
    }
    let key_of = |k: &str| k.split('_').nth(1).unwrap().to_string();
    let (plain_id, streamed_id) = (key_of(&plain), key_of(&streamed));
    let rows = rows_where(&gw, "both keys' requests are metered", |rows| {
        rows.iter().filter(|r| r.key.contains(&plain_id)).count() == 3
            && rows.iter().filter(|r| r.key.contains(&streamed_id)).count() == 3
    })
    .await;
    for model in ["gpt", "claude", "gemini"] {
        let of = |id: &str| {
            rows.iter()
                .find(|r| r.key.contains(id) && r.model == model)
                .and_then(|r| r.counts.clone())
                .unwrap()
        };
        let (a, b) = (of(&plain_id), of(&streamed_id));
        assert!(a.input_tokens > 0 && a.output_tokens > 0, "{model}: {a:?}");
        assert_eq!(
            (a.input_tokens, a.output_tokens, a.estimated),
            (b.input_tokens, b.output_tokens, b.estimated),
            "{model}: streamed and not, the same tokens"
        );
        assert_eq!(a.tokens, b.tokens, "{model}: the same tokens to price");
    }
    // And the same cost, not zero.
    let costs = cp
        .costs(tollgate_sdk::cp::CostsQuery {
            range: Some(tollgate_sdk::cp::UsageQuery {
                group_by: "key".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let cost = |id: &str| {
        costs
            .lines
            .iter()
            .find(|l| l.group.contains(id))
            .map(|l| l.tokens_cost.clone())
            .unwrap()
    };
    assert_eq!(cost(&plain_id), cost(&streamed_id));
    assert_ne!(cost(&plain_id).trim_start_matches(['0', '.']), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_36168_usage_on_a_final_chunk_that_has_choices_is_kept() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    let chunk = |delta: Value, finish: Value| {
        sse(
            None,
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    };
    let usage_chunk = sse(
        None,
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek",
        "choices": [{"index": 0, "delta": {}}],
        "usage": {"completion_tokens": 2, "prompt_tokens": 16111, "total_tokens": 16113,
            "completion_tokens_details": {"reasoning_tokens": 0},
            "prompt_tokens_details": {"cached_tokens": 15872}}}),
    );
    let script = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hi"}), Value::Null),
        chunk(json!({}), json!("stop")),
        usage_chunk,
        "data: [DONE]\n\n".to_string(),
    ];
    demo.script(&[(200, script.clone(), 0), (200, script, 0)]);
    // The OpenAI client that asked for usage gets the provider's counts, cached ones too.
    let s = openai_stream(
        &gw,
        &key,
        json!({"model": "gpt", "stream": true, "stream_options": {"include_usage": true}, "messages": msgs("x")}),
    )
    .await;
    let with_usage: Vec<Value> = s
        .json()
        .into_iter()
        .filter(|c| !c["usage"].is_null())
        .collect();
    assert_eq!(with_usage.len(), 1, "{}", s.text());
    let u = &with_usage[0]["usage"];
    assert_eq!(u["prompt_tokens"], 16111);
    assert_eq!(u["completion_tokens"], 2);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 15872);
    // An Anthropic client of the same provider: input without the cache reads, which are
    // counted apart.
    let s = anthropic_stream(
        &gw,
        &key,
        json!({"model": "gpt", "max_tokens": 10, "stream": true, "messages": msgs("x")}),
    )
    .await;
    let delta = anthropic_events(&s)
        .into_iter()
        .find(|(e, _)| e == "message_delta")
        .unwrap()
        .1;
    assert_eq!(delta["usage"]["input_tokens"], 16111 - 15872, "{delta}");
    assert_eq!(delta["usage"]["cache_read_input_tokens"], 15872, "{delta}");
    assert_eq!(delta["usage"]["output_tokens"], 2, "{delta}");
    let rows = rows_where(&gw, "both metered", |rows| {
        rows.iter()
            .map(|r| r.counts.as_ref().unwrap().requests)
            .sum::<u64>()
            == 2
    })
    .await;
    let c = rows[0].counts.clone().unwrap();
    assert_eq!(
        (c.input_tokens, c.cached_input_tokens, c.output_tokens),
        (2 * 16111, 2 * 15872, 4)
    );
    assert_eq!(c.estimated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_8349_stream_usage_holds_on_every_dialect_and_provider_path() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    for model in ["gpt", "claude", "gemini"] {
        // Asked for: exactly one usage chunk, with no choices, just before [DONE].
        let s = openai_stream(
            &gw,
            &key,
            json!({"model": model, "stream": true,
            "stream_options": {"include_usage": true}, "messages": msgs("one two three")}),
        )
        .await;
        let data = s.data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{model}");
        let with_usage: Vec<Value> = s
            .json()
            .into_iter()
            .filter(|c| !c["usage"].is_null() && c.get("usage").is_some())
            .collect();
        assert_eq!(with_usage.len(), 1, "{model}: {}", s.text());
        let u = &with_usage[0];
        assert_eq!(u["choices"], json!([]), "{model}");
        let usage = &u["usage"];
        assert!(
            usage["prompt_tokens"].as_u64() > Some(0)
                && usage["completion_tokens"].as_u64() > Some(0),
            "{model}: {usage}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );
        // Not asked for: no usage at all in the stream.
        let s = openai_stream(
            &gw,
            &key,
            json!({"model": model, "stream": true, "messages": msgs("one two three")}),
        )
        .await;
        assert!(!s.text().contains("\"usage\""), "{model}: {}", s.text());
        // The Anthropic dialect: output tokens in message_delta, whatever the provider.
        let s = anthropic_stream(&gw, &key, json!({"model": model, "max_tokens": 20, "stream": true, "messages": msgs("one two three")})).await;
        let delta = anthropic_events(&s)
            .into_iter()
            .find(|(e, _)| e == "message_delta")
            .unwrap()
            .1;
        assert!(
            delta["usage"]["output_tokens"].as_u64() > Some(0),
            "{model}: {delta}"
        );
    }
    // The OpenAI provider was asked for usage in every stream, asked for or not.
    let streams: Vec<Value> = demo
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/v1/chat/completions" && r["body"]["stream"] == true)
        .collect();
    assert_eq!(streams.len(), 3);
    assert!(
        streams
            .iter()
            .all(|r| r["body"]["stream_options"]["include_usage"] == true)
    );
    // And metering has every request's tokens, none estimated.
    let rows = rows_where(&gw, "all 9 metered", |rows| {
        rows.iter()
            .map(|r| r.counts.as_ref().unwrap().requests)
            .sum::<u64>()
            == 9
    })
    .await;
    for r in &rows {
        let c = r.counts.as_ref().unwrap();
        assert!(
            c.input_tokens > 0 && c.output_tokens > 0 && c.estimated == 0,
            "{r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_34692_a_streamed_tool_call_that_ends_with_stop_is_tool_use() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    let chunk = |delta: Value, finish: Value| {
        sse(
            None,
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "qwen",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    };
    demo.script(&[(
        200,
        vec![
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "Write", "arguments": ""}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"path\":"}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"a.txt\"}"}}]}), Value::Null),
            chunk(json!({}), json!("stop")),
            "data: [DONE]\n\n".to_string(),
        ],
        0,
    )]);
    let tools = json!([{"name": "Write", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]);
    let s = anthropic_stream(&gw, &key, json!({"model": "gpt", "max_tokens": 100, "stream": true, "tools": tools, "messages": msgs("write it")})).await;
    let events = anthropic_events(&s);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(e, _)| e == "content_block_start")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        starts.len(),
        1,
        "one block, no empty text block before the tool: {}",
        s.text()
    );
    assert_eq!(starts[0]["content_block"]["type"], "tool_use");
    assert_eq!(starts[0]["index"], 0);
    let json: String = events
        .iter()
        .filter(|(e, d)| e == "content_block_delta" && d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json).unwrap(),
        json!({"path": "a.txt"})
    );
    let delta = events.iter().find(|(e, _)| e == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use", "{}", s.text());
    // `length` stays max_tokens.
    demo.script(&[(
        200,
        vec![
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "partial"}), Value::Null),
            chunk(json!({}), json!("length")),
            "data: [DONE]\n\n".to_string(),
        ],
        0,
    )]);
    let s = anthropic_stream(
        &gw,
        &key,
        json!({"model": "gpt", "max_tokens": 1, "stream": true, "messages": msgs("x")}),
    )
    .await;
    let delta = anthropic_events(&s)
        .into_iter()
        .find(|(e, _)| e == "message_delta")
        .unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_25669_tool_history_in_anthropic_blocks_survives_translation() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    let tools = json!([
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
    ]);
    let history = json!([
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_A", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_B", "content": "no clock", "is_error": true}]}
    ]);
    for model in ["gpt", "gemini"] {
        let body = json!({"model": model, "max_tokens": 50, "tools": tools, "messages": history});
        let r = gw
            .send(
                http::Request::post(gw.url("/llm/v1/messages"))
                    .header("x-api-key", &key)
                    .body(harness::full(body.to_string()))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            r.status,
            200,
            "{model}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let reqs = demo.requests();
    let openai = &reqs
        .iter()
        .find(|r| r["path"] == "/v1/chat/completions")
        .unwrap()["body"];
    let m = openai["messages"].as_array().unwrap();
    let assistant = m.iter().find(|x| x["role"] == "assistant").unwrap();
    let calls = assistant["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{openai}");
    assert_eq!(calls[0]["id"], "toolu_A");
    assert_eq!(
        serde_json::from_str::<Value>(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"city": "Paris"})
    );
    let results: Vec<&Value> = m.iter().filter(|x| x["role"] == "tool").collect();
    assert_eq!(results.len(), 2, "{openai}");
    assert_eq!(
        (
            results[0]["tool_call_id"].as_str(),
            results[1]["tool_call_id"].as_str()
        ),
        (Some("toolu_A"), Some("toolu_B"))
    );
    assert!(results[1]["content"].as_str().unwrap().contains("no clock"));
    let gemini = &reqs
        .iter()
        .find(|r| r["path"].as_str().unwrap().contains(":generateContent"))
        .unwrap()["body"];
    let parts: Vec<&Value> = gemini["contents"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["parts"].as_array().unwrap())
        .collect();
    let calls: Vec<&Value> = parts.iter().filter_map(|p| p.get("functionCall")).collect();
    let responses: Vec<&Value> = parts
        .iter()
        .filter_map(|p| p.get("functionResponse"))
        .collect();
    assert_eq!(calls.len(), 2, "{gemini}");
    assert_eq!(responses.len(), 2, "{gemini}");
    assert_eq!(responses[0]["name"], "get_weather");
    assert_eq!(responses[1]["name"], "get_time");
    assert_eq!(responses[1]["response"]["error"], "no clock");
    // The reverse, OpenAI's tool messages to Anthropic: one user turn with both results.
    let body = json!({"model": "claude", "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}], "messages": [
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "warm"},
        {"role": "tool", "tool_call_id": "call_2", "content": "cold"}]});
    let r = gw
        .send(
            http::Request::post(gw.url("/llm/v1/chat/completions"))
                .header("authorization", bearer(&key))
                .body(harness::full(body.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let sent = &demo
        .requests()
        .into_iter()
        .rev()
        .find(|r| r["path"] == "/v1/messages")
        .unwrap()["body"];
    let m = sent["messages"].as_array().unwrap();
    assert_eq!(
        m.len(),
        3,
        "user, assistant with two tool_use, one user with both results: {sent}"
    );
    let results: Vec<&Value> = m[2]["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "tool_result")
        .collect();
    assert_eq!(results.len(), 2);
    assert_eq!(
        (
            results[0]["tool_use_id"].as_str(),
            results[1]["tool_use_id"].as_str()
        ),
        (Some("call_1"), Some("call_2"))
    );
    // Anthropic-style blocks in an OpenAI request to another dialect: refused, named.
    let body = json!({"model": "claude", "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "y"}]}]});
    let r = gw
        .send(
            http::Request::post(gw.url("/llm/v1/chat/completions"))
                .header("authorization", bearer(&key))
                .body(harness::full(body.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 400, "never dropped silently");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].content[0]"),
        "{}",
        r.json()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_24443_every_tool_choice_is_carried_across_dialects() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    let atools = json!([{"name": "f", "input_schema": {"type": "object", "properties": {}}}]);
    let send = async |path: &str, body: Value| {
        let req = http::Request::post(gw.url(path))
            .header("authorization", bearer(&key))
            .header("anthropic-version", "2023-06-01")
            .body(harness::full(body.to_string()))
            .unwrap();
        gw.send(req).await
    };
    let choices = [
        (
            json!({"type": "none"}),
            json!("none"),
            json!({"mode": "NONE"}),
        ),
        (
            json!({"type": "auto"}),
            json!("auto"),
            json!({"mode": "AUTO"}),
        ),
        (
            json!({"type": "any"}),
            json!("required"),
            json!({"mode": "ANY"}),
        ),
        (
            json!({"type": "tool", "name": "f"}),
            json!({"type": "function", "function": {"name": "f"}}),
            json!({"mode": "ANY", "allowedFunctionNames": ["f"]}),
        ),
    ];
    for (choice, openai, gemini) in &choices {
        for model in ["gpt", "gemini", "claude"] {
            let r = send("/llm/v1/messages", json!({"model": model, "max_tokens": 10, "tools": atools, "tool_choice": choice, "messages": msgs("x")})).await;
            assert_eq!(
                r.status,
                200,
                "{model} {choice}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let last = demo.requests().pop().unwrap()["body"].clone();
            match model {
                "gpt" => assert_eq!(&last["tool_choice"], openai, "{choice}"),
                "gemini" => assert_eq!(
                    &last["toolConfig"]["functionCallingConfig"], gemini,
                    "{choice}"
                ),
                _ => assert_eq!(&last["tool_choice"], choice, "passed through"),
            }
        }
    }
    // disable_parallel_tool_use to OpenAI: parallel_tool_calls false.
    let r = send("/llm/v1/messages", json!({"model": "gpt", "max_tokens": 10, "tools": atools, "tool_choice": {"type": "auto", "disable_parallel_tool_use": true}, "messages": msgs("x")})).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        demo.requests().pop().unwrap()["body"]["parallel_tool_calls"],
        false
    );
    // The mirror: OpenAI's choices to Anthropic.
    let otools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    for (openai, anthropic) in [
        (json!("none"), json!({"type": "none"})),
        (json!("auto"), json!({"type": "auto"})),
        (json!("required"), json!({"type": "any"})),
        (
            json!({"type": "function", "function": {"name": "f"}}),
            json!({"type": "tool", "name": "f"}),
        ),
    ] {
        let r = send("/llm/v1/chat/completions", json!({"model": "claude", "tools": otools, "tool_choice": openai, "messages": msgs("x")})).await;
        assert_eq!(r.status, 200, "{openai}");
        assert_eq!(
            demo.requests().pop().unwrap()["body"]["tool_choice"],
            anthropic
        );
    }
    // An unknown choice is the caller's mistake, named: never a 5xx.
    let r = send("/llm/v1/messages", json!({"model": "gpt", "max_tokens": 10, "tools": atools, "tool_choice": {"type": "sometimes"}, "messages": msgs("x")})).await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("tool_choice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_22296_a_stream_falls_back_on_a_429_before_its_first_token() {
    // One model per case: a deployment that answered 429 cools down for its retry-after.
    let chain = |i: usize| {
        format!(
            "  primary{i}: {{ routing: priority, deployments: [{{ provider: gem, model: gem-primary, priority: 0 }}, {{ provider: oai, model: gpt-fallback, priority: 1 }}] }}\n"
        )
    };
    let models = format!(
        "{}{}{}  alone: {{ deployments: [{{ provider: gem, model: \"gem+status=429+retry_after=9\" }}] }}\n",
        chain(0),
        chain(1),
        chain(2)
    );
    let models = models.as_str();
    let (demo, gw, _cp, key) = setup(models).await;
    let rate_limited = json!({"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}});
    // 1. An HTTP 429; 2. a 200 stream whose first event is the 429; 3. an Anthropic-style
    // overloaded error first (as a Gemini stream's error).
    let scripts = [
        (429, vec![rate_limited.to_string()]),
        (200, vec![sse(None, rate_limited.clone())]),
        (
            200,
            vec![sse(
                None,
                json!({"error": {"code": 503, "message": "Overloaded", "status": "UNAVAILABLE"}}),
            )],
        ),
    ];
    for (i, (status, pieces)) in scripts.into_iter().enumerate() {
        demo.script(&[(status, pieces, 0)]);
        let before = demo.requests().len();
        let model = format!("primary{i}");
        let s = openai_stream(
            &gw,
            &key,
            json!({"model": model, "stream": true, "messages": msgs("fall back")}),
        )
        .await;
        assert_eq!(s.status, 200);
        let text: String = s
            .json()
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(
            text,
            "You said: fall back",
            "the fallback's whole answer: {}",
            s.text()
        );
        assert_eq!(s.data().last().map(String::as_str), Some("[DONE]"));
        assert!(
            !s.text().contains("RESOURCE_EXHAUSTED") && !s.text().contains("Overloaded"),
            "nothing of the failure leaks"
        );
        let reqs = demo.requests();
        assert_eq!(
            reqs.len() - before,
            2,
            "the primary once, the fallback once"
        );
        assert!(reqs.last().unwrap()["path"] == "/v1/chat/completions");
    }
    // The usage rows name the provider that answered.
    let rows = rows_where(&gw, "metered", |rows| {
        rows.iter()
            .map(|r| r.counts.as_ref().unwrap().requests)
            .sum::<u64>()
            == 3
    })
    .await;
    assert!(rows.iter().all(|r| r.provider == "oai"), "{rows:?}");
    // No fallback: the 429 itself, with Retry-After, not a 500 or a 200.
    let s = openai_stream(
        &gw,
        &key,
        json!({"model": "alone", "stream": true, "messages": msgs("x")}),
    )
    .await;
    assert_eq!(s.status, 429, "{}", s.text());
    assert_eq!(s.headers.get("retry-after").unwrap(), "9");
    let s = anthropic_stream(
        &gw,
        &key,
        json!({"model": "alone", "max_tokens": 5, "stream": true, "messages": msgs("x")}),
    )
    .await;
    assert_eq!(s.status, 429);
    assert_eq!(
        serde_json::from_str::<Value>(&s.text()).unwrap()["error"]["type"],
        "rate_limit_error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_26015_a_429_mid_stream_ends_the_stream_at_once_and_nothing_else_stalls() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    let chunk = |t: &str| {
        sse(
            None,
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": t}]}, "index": 0}]}),
        )
    };
    let script = vec![
        chunk("one"),
        chunk(" two"),
        chunk(" three"),
        sse(
            None,
            json!({"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}}),
        ),
    ];
    demo.script(&[(200, script.clone(), 50), (200, script, 50)]);
    let before = demo.requests().len();
    let started = std::time::Instant::now();
    let s = openai_stream(
        &gw,
        &key,
        json!({"model": "gemini", "stream": true, "messages": msgs("x")}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "ended at once: {:?}",
        started.elapsed()
    );
    let last = s.json().pop().unwrap();
    assert_eq!(last["error"]["type"], "rate_limit_error", "{}", s.text());
    assert!(!s.text().contains("[DONE]"));
    let s = anthropic_stream(
        &gw,
        &key,
        json!({"model": "gemini", "max_tokens": 10, "stream": true, "messages": msgs("x")}),
    )
    .await;
    let events = anthropic_events(&s);
    assert_eq!(events.last().unwrap().0, "error", "{}", s.text());
    assert_eq!(
        events.last().unwrap().1["error"]["type"],
        "rate_limit_error"
    );
    assert!(!events.iter().any(|(e, _)| e == "message_stop"));
    assert_eq!(
        demo.requests().len() - before,
        2,
        "one provider call per request: no retry storm"
    );
    // The node still answers at once.
    let t = std::time::Instant::now();
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
    let s = openai_stream(
        &gw,
        &key,
        json!({"model": "gpt", "stream": true, "messages": msgs("still here")}),
    )
    .await;
    assert_eq!(s.status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// The events reach the client as the provider sends them: spread over the stream.
fn assert_not_buffered(s: &Streamed, what: &str) {
    assert_eq!(s.status, 200, "{what}");
    assert!(
        s.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{what}"
    );
    assert_eq!(
        s.headers
            .get("x-accel-buffering")
            .map(|v| v.to_str().unwrap()),
        Some("no"),
        "{what}"
    );
    assert_eq!(
        s.headers.get("cache-control").map(|v| v.to_str().unwrap()),
        Some("no-cache"),
        "{what}"
    );
    assert!(
        s.headers.get("content-length").is_none() && s.headers.get("content-encoding").is_none(),
        "{what}"
    );
    let first = s.pieces.first().unwrap().0;
    let last = s.pieces.last().unwrap().0;
    assert!(s.pieces.len() >= 8, "{what}: {} pieces", s.pieces.len());
    assert!(
        last - first >= Duration::from_millis(1500),
        "{what}: the events came in a burst ({first:?}..{last:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_28384_anthropic_streams_are_not_buffered() {
    let models = "  slow-claude: { deployments: [{ provider: claude, model: \"demo+slow=200\" }] }
  slow-gpt: { deployments: [{ provider: oai, model: \"demo+slow=200\" }] }
  slow-gemini: { deployments: [{ provider: gem, model: \"demo+slow=200\" }] }
";
    let (_demo, gw, _cp, key) = setup(models).await;
    let words = "a b c d e f g h i j";
    for model in ["slow-claude", "slow-gpt", "slow-gemini"] {
        let s = stream(
            &gw,
            "/llm/v1/messages",
            &[
                ("x-api-key", &key),
                ("anthropic-version", "2023-06-01"),
                ("accept-encoding", "gzip"),
            ],
            json!({"model": model, "max_tokens": 64, "stream": true, "messages": msgs(words)}),
        )
        .await;
        assert_not_buffered(&s, model);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kong_14425_streams_are_not_buffered_on_any_provider_or_after_a_stall() {
    let models = "  slow-claude: { deployments: [{ provider: claude, model: \"demo+slow=200\" }] }
  slow-gpt: { deployments: [{ provider: oai, model: \"demo+slow=200\" }] }
  slow-gemini: { deployments: [{ provider: gem, model: \"demo+slow=200\" }] }
  stalled: { deployments: [{ provider: oai, model: \"demo+stall=2000+slow=200\" }] }
";
    let (_demo, gw, _cp, key) = setup(models).await;
    let words = "a b c d e f g h i j";
    for model in ["slow-gpt", "slow-claude", "slow-gemini", "stalled"] {
        let s = openai_stream(&gw, &key, json!({"model": model, "stream": true, "stream_options": {"include_usage": true}, "messages": msgs(words)})).await;
        assert_not_buffered(&s, model);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portkey_1797_a_stream_cut_mid_answer_is_never_a_clean_200() {
    let models = "  cut: { routing: priority, deployments: [{ provider: oai, model: \"demo+cut=3\", name: a }, { provider: claude, model: claude-b, name: b, priority: 1 }] }
  cut-early: { routing: priority, deployments: [{ provider: oai, model: \"demo+cut=0\", name: a }, { provider: claude, model: claude-b, name: b, priority: 1 }] }
";
    let (demo, gw, _cp, key) = setup(models).await;
    let before = demo.requests().len();
    let s = openai_stream(
        &gw,
        &key,
        json!({"model": "cut", "stream": true, "messages": msgs("one two three four five six")}),
    )
    .await;
    assert_eq!(s.status, 200);
    let json = s.json();
    let text: String = json
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        text, "You said: one",
        "the three tokens sent before the cut"
    );
    assert!(!s.text().contains("[DONE]"), "no clean end: {}", s.text());
    assert!(
        !json
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string()),
        "no invented finish_reason"
    );
    assert!(
        json.last().unwrap().get("error").is_some(),
        "a terminal error: {}",
        s.text()
    );
    assert_eq!(
        demo.requests().len() - before,
        1,
        "b is not spliced in after content was sent"
    );
    let s = anthropic_stream(&gw, &key, json!({"model": "cut", "max_tokens": 64, "stream": true, "messages": msgs("one two three four five six")})).await;
    let events = anthropic_events(&s);
    assert_eq!(events.last().unwrap().0, "error");
    assert!(!events.iter().any(|(e, _)| e == "message_stop"));
    // Cut before any content: b answers, whole.
    let s = openai_stream(
        &gw,
        &key,
        json!({"model": "cut-early", "stream": true, "messages": msgs("whole")}),
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.data().last().map(String::as_str), Some("[DONE]"));
    // The cut ones are counted as incomplete, their tokens estimated.
    let rows = rows_where(&gw, "metered", |rows| {
        rows.iter()
            .map(|r| r.counts.as_ref().unwrap().requests)
            .sum::<u64>()
            == 3
    })
    .await;
    let cut: u64 = rows
        .iter()
        .filter(|r| r.provider == "oai")
        .map(|r| r.counts.as_ref().unwrap().estimated)
        .sum();
    assert_eq!(cut, 2, "{rows:?}");
    let mut sdk = gw.sdk().await;
    let llm = sdk
        .usage(tollgate_proto::node::v1::UsageRequest::default())
        .await
        .unwrap()
        .llm;
    let incomplete: u64 = llm.iter().map(|e| e.incomplete).sum();
    assert_eq!(incomplete, 2, "{llm:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portkey_1275_parallel_anthropic_tool_calls_keep_their_own_indexes() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    let ev = |e: &str, v: Value| sse(Some(e), v);
    let block_start = |i: u64, b: Value| {
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": b}),
        )
    };
    let delta = |i: u64, d: Value| {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": i, "delta": d}),
        )
    };
    let stop = |i: u64| {
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        )
    };
    let script = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ),
        block_start(0, json!({"type": "text", "text": ""})),
        delta(0, json!({"type": "text_delta", "text": "Let me check."})),
        stop(0),
        block_start(
            1,
            json!({"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}),
        ),
        delta(
            1,
            json!({"type": "input_json_delta", "partial_json": "{\"city\":"}),
        ),
        delta(
            1,
            json!({"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
        ),
        stop(1),
        block_start(
            2,
            json!({"type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}),
        ),
        delta(
            2,
            json!({"type": "input_json_delta", "partial_json": "{\"tz\":\"UTC\"}"}),
        ),
        stop(2),
        block_start(
            3,
            json!({"type": "tool_use", "id": "toolu_C", "name": "noop", "input": {}}),
        ),
        stop(3),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 30}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ];
    demo.script(&[(200, script, 0)]);
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]);
    let s = openai_stream(
        &gw,
        &key,
        json!({"model": "claude", "stream": true, "tools": tools, "messages": msgs("go")}),
    )
    .await;
    let mut calls: std::collections::BTreeMap<u64, (String, String, String)> = Default::default();
    let mut text = String::new();
    let mut finish = None;
    for c in s.json() {
        let d = &c["choices"][0]["delta"];
        text.push_str(d["content"].as_str().unwrap_or(""));
        for t in d["tool_calls"].as_array().into_iter().flatten() {
            let e = calls.entry(t["index"].as_u64().unwrap()).or_default();
            e.0.push_str(t["id"].as_str().unwrap_or(""));
            e.1.push_str(t["function"]["name"].as_str().unwrap_or(""));
            e.2.push_str(t["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(text, "Let me check.");
    assert_eq!(
        calls.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "{}",
        s.text()
    );
    let want = [
        ("toolu_A", "get_weather", json!({"city": "Paris"})),
        ("toolu_B", "get_time", json!({"tz": "UTC"})),
        ("toolu_C", "noop", json!({})),
    ];
    for (i, (id, name, args)) in want.iter().enumerate() {
        let got = &calls[&(i as u64)];
        assert_eq!((got.0.as_str(), got.1.as_str()), (*id, *name));
        assert_eq!(
            serde_json::from_str::<Value>(&got.2).unwrap(),
            *args,
            "{name}: {:?}",
            got.2
        );
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apisix_13662_streamed_anthropic_usage_is_input_plus_output() {
    let (demo, gw, _cp, key) = setup(BASIC).await;
    let ev = |e: &str, v: Value| sse(Some(e), v);
    let answer = |start_usage: Value, delta_usage: Value| {
        vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [], "usage": start_usage}}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ]
    };
    // A: input at the start, output at the end. B: the newer cumulative form, cache reads
    // at both ends. C: everything at the end.
    let cases = [
        (
            json!({"input_tokens": 100, "output_tokens": 1}),
            json!({"output_tokens": 50}),
            100,
            0,
        ),
        (
            json!({"input_tokens": 100, "cache_read_input_tokens": 20, "output_tokens": 1}),
            json!({"input_tokens": 100, "cache_read_input_tokens": 20, "output_tokens": 50}),
            120,
            20,
        ),
        (
            json!({}),
            json!({"input_tokens": 100, "output_tokens": 50}),
            100,
            0,
        ),
    ];
    for (start, end, input, cached) in cases {
        demo.script(&[(200, answer(start.clone(), end.clone()), 0)]);
        let s = openai_stream(&gw, &key, json!({"model": "claude", "stream": true, "stream_options": {"include_usage": true}, "messages": msgs("x")})).await;
        let u = s
            .json()
            .into_iter()
            .find(|c| c["usage"].is_object())
            .unwrap()["usage"]
            .clone();
        assert_eq!(u["prompt_tokens"], input, "{start} {end}: {u}");
        assert_eq!(u["completion_tokens"], 50);
        assert_eq!(u["total_tokens"], input + 50, "total = input + output");
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], cached);
    }
    let rows = rows_where(&gw, "metered", |rows| {
        rows.iter()
            .map(|r| r.counts.as_ref().unwrap().requests)
            .sum::<u64>()
            == 3
    })
    .await;
    let c = rows[0].counts.clone().unwrap();
    assert_eq!(
        (
            c.input_tokens,
            c.output_tokens,
            c.cached_input_tokens,
            c.estimated
        ),
        (320, 150, 20, 0)
    );
}
