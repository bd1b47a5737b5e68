//! Translation and routing, unit by unit (the end-to-end tests in tests/llm*.rs use the
//! official SDKs).

use serde_json::json;

use super::ir::*;
use super::{anthropic, gemini, openai, responses};

#[test]
fn an_openai_request_reaches_anthropic_whole() {
    let req = openai::parse_chat(&json!({
        "model": "m", "max_tokens": 100, "temperature": 0.2, "top_p": 0.9, "stop": "END", "user": "u1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "required", "parallel_tool_calls": false,
    }))
    .unwrap();
    let body = anthropic::build_messages(&req, "claude-x").unwrap();
    assert_eq!(body["system"], "Be brief.");
    assert_eq!(body["max_tokens"], 100);
    assert_eq!(body["stop_sequences"], json!(["END"]));
    assert_eq!(body["metadata"]["user_id"], "u1");
    assert_eq!(
        body["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    let m = body["messages"].as_array().unwrap();
    assert_eq!(
        m[0]["content"][1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
    );
    assert_eq!(
        m[0]["content"][2]["source"],
        json!({"type": "url", "url": "https://example.com/a.jpg"})
    );
    assert_eq!(
        m[1]["content"][0],
        json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {"x": 1}})
    );
    assert_eq!(m[2]["content"][0]["type"], "tool_result");
    assert_eq!(m[2]["content"][0]["tool_use_id"], "call_1");
}

#[test]
fn what_a_provider_cannot_take_is_named_never_dropped() {
    let req = openai::parse_chat(
        &json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "logprobs": true, "seed": 3}),
    )
    .unwrap();
    let err = anthropic::build_messages(&req, "c").unwrap_err();
    assert!(err.field == "logprobs" || err.field == "seed", "{err:?}");
    assert!(gemini::build(&req).is_err());
    // The same dialect passes it through (the serve path sends the caller's body).
    let req = anthropic::parse_messages(&json!({"model": "m", "max_tokens": 5, "top_k": 3,
        "messages": [{"role": "user", "content": "x"}]}))
    .unwrap();
    assert_eq!(openai::build_chat(&req, "g").unwrap_err().field, "top_k");
    let req = openai::parse_chat(
        &json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_object"}}),
    )
    .unwrap();
    assert_eq!(
        anthropic::build_messages(&req, "c").unwrap_err().field,
        "response_format"
    );
    assert_eq!(
        gemini::build(&req).unwrap()["generationConfig"]["responseMimeType"],
        "application/json"
    );
}

#[test]
fn bad_requests_are_refused_with_the_field_at_fault() {
    let bad = |v: serde_json::Value| openai::parse_chat(&v).unwrap_err();
    assert!(bad(json!({"messages": []})).contains("model"));
    assert!(bad(json!({"model": "m", "messages": []})).contains("messages"));
    assert!(
        bad(json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}))
            .contains("robot")
    );
    assert!(
        bad(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "a b", "parameters": {}}}]})
        )
        .contains("tool name")
    );
    assert!(bad(json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]})).contains("object"));
    assert!(bad(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"})).contains("tools"));
    assert!(
        anthropic::parse_messages(
            &json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        )
        .unwrap_err()
        .contains("max_tokens")
    );
    assert!(
        responses::parse(&json!({"model": "m", "input": "x", "store": true}))
            .unwrap_err()
            .contains("store")
    );
}

#[test]
fn usage_keeps_cached_and_reasoning_tokens_apart_both_ways() {
    let a = anthropic::parse_usage(
        &json!({"input_tokens": 10, "cache_read_input_tokens": 90, "cache_creation_input_tokens": 5, "output_tokens": 7}),
    );
    assert_eq!(
        a,
        Usage {
            input: 105,
            output: 7,
            cached_input: 90,
            cache_write: 5,
            reasoning: 0
        }
    );
    let o = openai::render_usage(&a);
    assert_eq!(
        (
            o["prompt_tokens"].as_u64(),
            o["prompt_tokens_details"]["cached_tokens"].as_u64()
        ),
        (Some(105), Some(90))
    );
    assert_eq!(anthropic::render_usage(&a)["input_tokens"], 10);
    let g = gemini::parse_usage(
        &json!({"promptTokenCount": 50, "candidatesTokenCount": 10, "thoughtsTokenCount": 30, "cachedContentTokenCount": 20}),
    );
    assert_eq!(
        g,
        Usage {
            input: 50,
            output: 40,
            cached_input: 20,
            cache_write: 0,
            reasoning: 30
        }
    );
}

#[test]
fn an_anthropic_stream_becomes_openai_chunks_and_back() {
    let mut dec = anthropic::Decoder::default();
    let mut deltas = Vec::new();
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 9, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":1}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    for (e, d) in &events {
        dec.decode(e, &d.to_string(), &mut deltas).unwrap();
    }
    let mut enc = openai::Encoder::new(1, true);
    let mut out = Vec::new();
    for d in &deltas {
        enc.encode(d, &mut out);
    }
    let text: String = out
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
    assert!(
        text.contains("\"prompt_tokens\":9") && text.contains("\"completion_tokens\":12"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    // Back to Anthropic events.
    let mut enc = anthropic::Encoder::default();
    let mut out = Vec::new();
    for d in &deltas {
        enc.encode(d, &mut out);
    }
    let text: String = out
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(
        text.contains("\"stop_reason\":\"tool_use\"") && text.contains("event: message_stop"),
        "{text}"
    );
}

mod routing {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use crate::llm::spec::RoutingStrategy;
    use crate::llm::{Deployment, Live, LlmApi, Model, Provider};
    use crate::routing::upstream::{Cluster, EndpointRegistry};
    use crate::state::snapshot::Snapshot;

    fn model(strategy: RoutingStrategy, weights: &[(u32, u32)]) -> Model {
        let registry = EndpointRegistry::default();
        let spec = crate::state::spec::Spec::from_yaml(
            "upstreams: { u: { endpoints: [{ address: \"127.0.0.1:9\" }] } }\nroutes: {}\n",
        )
        .unwrap();
        let up = &spec.upstreams["u"];
        Model {
            name: Arc::from("m"),
            kind: Default::default(),
            deployments: weights
                .iter()
                .enumerate()
                .map(|(i, (w, p))| Deployment {
                    name: Arc::from(format!("d{i}").as_str()),
                    provider: Arc::new(Provider {
                        name: Arc::from("p"),
                        kind: crate::llm::spec::ProviderKind::Openai,
                        path: String::new(),
                        host: http::HeaderValue::from_static("h"),
                        auth: None,
                        api_version: None,
                        headers: Vec::new(),
                        broken: None,
                    }),
                    model: Arc::from("x"),
                    weight: *w,
                    priority: *p,
                    region: None,
                    context_window: None,
                    tpm: None,
                    rpm: None,
                    tpm_def: None,
                    rpm_def: None,
                    limit_key: Arc::from(""),
                    cluster: Arc::new(Cluster::build(&format!("d{i}"), up, &registry)),
                    live: Live::default(),
                })
                .collect(),
            strategy,
            fallbacks: Vec::new(),
            first_token_timeout: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(1),
            max_attempts: 3,
            max_output_tokens: 4096,
        }
    }

    fn first_of(m: &Model, n: usize) -> Vec<usize> {
        first_in(m, n, None)
    }

    fn first_in(m: &Model, n: usize, region: Option<&str>) -> Vec<usize> {
        let api = LlmApi {
            prompts: Default::default(),
            version: Arc::from(""),
            cache: None,
            guard: None,
            models: Default::default(),
            created: 0,
        };
        let snapshot = Snapshot::empty();
        let mut counts = vec![0; m.deployments.len()];
        for _ in 0..n {
            let plan = crate::llm::serve::plan_for_tests(&api, m, &snapshot, region);
            counts[plan[0]] += 1;
        }
        counts
    }

    #[test]
    fn weighted_spreads_by_weight() {
        let m = model(RoutingStrategy::Weighted, &[(3, 0), (1, 0)]);
        let c = first_of(&m, 4000);
        assert!((2700..3300).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn priority_tries_the_lowest_first_and_passes_over_one_cooling_down() {
        let m = model(RoutingStrategy::Priority, &[(1, 2), (1, 0), (1, 1)]);
        assert_eq!(first_of(&m, 50), vec![0, 50, 0]);
        m.deployments[1]
            .live
            .cooldown_until_ms
            .store(crate::actor::wall_ms() + 60_000, Ordering::Relaxed);
        assert_eq!(first_of(&m, 50), vec![0, 0, 50]);
    }

    #[test]
    fn least_in_flight_picks_the_idlest() {
        let m = model(RoutingStrategy::LeastInFlight, &[(1, 0), (1, 0), (1, 0)]);
        m.deployments[0].live.in_flight.store(5, Ordering::Relaxed);
        m.deployments[2].live.in_flight.store(2, Ordering::Relaxed);
        assert_eq!(first_of(&m, 50), vec![0, 50, 0]);
    }

    #[test]
    fn lowest_latency_prefers_the_faster_of_two() {
        let m = model(RoutingStrategy::LowestLatency, &[(1, 0), (1, 0)]);
        m.deployments[0].live.record_ttft(50_000);
        m.deployments[1].live.record_ttft(5_000);
        assert_eq!(first_of(&m, 50), vec![0, 50]);
    }

    #[test]
    fn a_node_prefers_the_deployments_of_its_region() {
        let mut m = model(RoutingStrategy::Weighted, &[(1, 0), (1, 0), (1, 0)]);
        m.deployments[1].region = Some(Arc::from("eu"));
        assert_eq!(first_in(&m, 50, Some("eu")), vec![0, 50, 0]);
        // A node of another region tries it after the deployments of no region.
        let c = first_in(&m, 300, Some("us"));
        assert!(c[1] == 0 && c[0] > 100 && c[2] > 100, "{c:?}");
    }

    #[test]
    fn a_deployment_without_headroom_at_its_provider_goes_last() {
        let m = model(RoutingStrategy::Priority, &[(1, 0), (1, 1)]);
        m.deployments[0]
            .live
            .limited_until_ms
            .store(crate::actor::wall_ms() + 60_000, Ordering::Relaxed);
        assert_eq!(first_of(&m, 10), vec![0, 10]);
    }
}
