//! The LLM gateway end to end: the official `openai` and `anthropic` Python SDKs (from
//! PyPI, in a venv the harness makes) call an LLM API of a real node, in front of the demo
//! provider (`tollgate llm-demo`), which speaks the OpenAI, Azure OpenAI, Anthropic and
//! Gemini wire formats and misbehaves on request (its model ids' directives).

mod harness;

use std::time::Duration;

use harness::llm::{LlmDemo, llm_api, sdk_case};
use harness::{GatewayProcess, allowing_loopback, eventually};

const T: Duration = Duration::from_secs(20);

/// A spec with no routes of its own (the API is the point), open to loopback upstreams.
fn spec() -> String {
    allowing_loopback("upstreams: {}\nroutes: {}\n")
}

/// Every provider kind and a model on each, plus the models the error cases need.
fn content(demo: &LlmDemo) -> String {
    format!(
        "{}models:
  gpt: {{ deployments: [{{ provider: oai, model: gpt-4o-demo }}] }}
  azure-gpt: {{ deployments: [{{ provider: azure, model: my-deployment }}] }}
  claude: {{ deployments: [{{ provider: claude, model: claude-demo }}] }}
  gemini: {{ deployments: [{{ provider: gem, model: gemini-demo }}] }}
  embed: {{ kind: embedding, deployments: [{{ provider: oai, model: text-embedding-demo }}] }}
  gembed: {{ kind: embedding, deployments: [{{ provider: gem, model: gembed-demo }}] }}
  small: {{ deployments: [{{ provider: oai, model: small-demo, context_window: 1000 }}] }}
  limited: {{ deployments: [{{ provider: oai, model: \"demo+status=429+retry_after=7\" }}] }}
  broken: {{ deployments: [{{ provider: claude, model: \"demo+status=500\" }}] }}
",
        demo.providers()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_chat_stream_and_call_tools_through_every_provider() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&spec()).await;
    let (_cp, key) = llm_api(&gw, &content(&demo)).await;
    let base = gw.url("/llm");
    let out = sdk_case("chat", &base, &key, &[]).await;
    assert_eq!(out.matches(" ok").count(), 4, "{out}");
    let out = sdk_case("messages", &base, &key, &[]).await;
    assert_eq!(out.matches(" ok").count(), 4, "{out}");
    // Tokens by model, provider and kind; time to first token and per output token.
    let metrics = gw.metrics().await;
    for want in [
        "tollgate_llm_tokens_total{model=\"gpt\",provider=\"oai\",type=\"input\"}",
        "tollgate_llm_tokens_total{model=\"claude\",provider=\"claude\",type=\"output\"}",
        "tollgate_llm_time_to_first_token_seconds_count{model=\"gemini\",provider=\"gem\"}",
        "tollgate_llm_time_per_output_token_seconds_count{model=\"azure-gpt\",provider=\"azure\"}",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_models_and_the_responses_api_work_with_the_official_sdk() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&spec()).await;
    let (_cp, key) = llm_api(&gw, &content(&demo)).await;
    let out = sdk_case("embeddings_models_responses", &gw.url("/llm"), &key, &[]).await;
    assert_eq!(out.matches(" ok").count(), 4, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_provider_failures_raise_the_sdks_typed_exceptions() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&spec()).await;
    let (cpp, key) = llm_api(&gw, &content(&demo)).await;
    let cp = cpp.sdk(gw.operator_token());
    let limited = cp
        .create_model_key("acme", "gpt only", "", &["gpt".to_string()])
        .await
        .unwrap()
        .secret;
    let before = demo.stats()["requests"].as_u64().unwrap();
    sdk_case(
        "errors",
        &gw.url("/llm"),
        &key,
        &[("LIMITED_KEY", limited.as_str())],
    )
    .await;
    // Of all the refused requests only the provider failures (429 and 500, each through
    // both SDKs) and the limited key's one good request reached the provider.
    let after = demo.stats()["requests"].as_u64().unwrap();
    assert_eq!(
        after - before,
        5,
        "only the provider failures and one good request reached the provider"
    );
}

/// One provider fault per model: the first deployment fails that way, the second answers.
fn fallback_content(demo: &LlmDemo) -> String {
    let chain = |first: &str| {
        format!(
            "{{ first_token_timeout: 1s, deployments: [{{ provider: oai, model: \"{first}\", name: bad, priority: 0 }}, {{ provider: claude, model: claude-good, name: good, priority: 1 }}], routing: priority }}"
        )
    };
    format!(
        "{}  dead: {{ kind: openai, base_url: \"http://127.0.0.1:1/v1\" }}
models:
  on-429: {}
  on-500: {}
  on-stall: {}
  on-early-error: {}
  on-connect: {{ deployments: [{{ provider: dead, model: x, name: bad }}, {{ provider: claude, model: claude-good, name: good, priority: 1 }}], routing: priority }}
  on-window: {{ deployments: [{{ provider: oai, model: \"demo+window=5\", name: bad, context_window: 5 }}], fallbacks: [big] }}
  big: {{ deployments: [{{ provider: claude, model: claude-big, context_window: 100000 }}] }}
",
        demo.providers(),
        chain("demo+status=429+retry_after=1"),
        chain("demo+status=500"),
        chain("demo+stall=3000"),
        chain("demo+error_at=0"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_fire_on_429_5xx_connect_errors_first_token_timeouts_and_context_windows() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&spec()).await;
    let (_cp, key) = llm_api(&gw, &fallback_content(&demo)).await;
    for model in [
        "on-429",
        "on-500",
        "on-stall",
        "on-early-error",
        "on-connect",
    ] {
        let out = sdk_case("fallback", &gw.url("/llm"), &key, &[("MODEL", model)]).await;
        assert!(out.contains("model claude-good"), "{model}: {out}");
        assert!(out.contains("stream model claude-good"), "{model}: {out}");
    }
    // A prompt over the first model's window goes to the fallback with the larger one.
    let out = sdk_case("fallback", &gw.url("/llm"), &key, &[("MODEL", "on-window")]).await;
    assert!(out.contains("model claude-big"), "{out}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_llm_fallbacks_total{model=\"on-429\",reason=\"rate_limited\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_its_first_token_ends_with_an_error_event() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&spec()).await;
    let content = format!(
        "{}models:\n  cut: {{ deployments: [{{ provider: oai, model: \"demo+cut=3\" }}] }}\n  cut-claude: {{ deployments: [{{ provider: claude, model: \"demo+cut=3\" }}] }}\n",
        demo.providers()
    );
    let (_cp, key) = llm_api(&gw, &content).await;
    for model in ["cut", "cut-claude"] {
        sdk_case("stream_cut", &gw.url("/llm"), &key, &[("MODEL", model)]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_provider_stream_at_once() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&spec()).await;
    let content = format!(
        "{}models:\n  slow: {{ deployments: [{{ provider: oai, model: \"demo+slow=100\" }}] }}\n  slow-claude: {{ deployments: [{{ provider: claude, model: \"demo+slow=100\" }}] }}\n",
        demo.providers()
    );
    let (_cp, key) = llm_api(&gw, &content).await;
    for (i, model) in ["slow", "slow-claude"].into_iter().enumerate() {
        sdk_case("disconnect", &gw.url("/llm"), &key, &[("MODEL", model)]).await;
        // 50 words at 100 ms: 5 s if nobody stopped it. The provider's stream is dropped
        // well before that.
        eventually(
            "the provider's stream is cancelled",
            Duration::from_secs(2),
            async || {
                let s = demo.stats();
                s["cancelled"].as_u64() == Some(i as u64 + 1)
                    && s["open_streams"].as_u64() == Some(0)
            },
        )
        .await;
    }
    let _ = T;
}

/// A chat request to `model` on `gw`: the status and the body.
async fn chat(gw: &GatewayProcess, key: &str, model: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .send(
            http::Request::post(gw.url("/llm/v1/chat/completions"))
                .header("authorization", format!("Bearer {key}"))
                .body(harness::full(body.to_string()))
                .unwrap(),
        )
        .await;
    let json = serde_json::from_slice(&r.body).unwrap_or_default();
    (r.status.as_u16(), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_keys_are_the_tenants_secrets_and_a_rotation_reaches_every_node() {
    let demo = LlmDemo::start_with(&["--api-key", "first-key"]);
    let cluster = harness::cluster::TestCluster::start(2, &spec(), &[]).await;
    let leader = cluster.leader(T).await;
    let mut admin = cluster.client(leader).await;
    admin
        .put_secret("acme.provider-key", b"first-key".to_vec())
        .await
        .unwrap();
    // Another tenant's secret of the same name, and the operator's own: never used here.
    admin
        .put_secret("provider-key", b"operator-key".to_vec())
        .await
        .unwrap();
    let a = demo.addr;
    let content = format!(
        "providers:\n  oai: {{ kind: openai, base_url: \"http://{a}/v1\", api_key_secret: provider-key }}\n  claude: {{ kind: anthropic, base_url: \"http://{a}\", api_key_secret: provider-key }}\nmodels:\n  gpt: {{ deployments: [{{ provider: oai, model: gpt-demo }}] }}\n  claude: {{ deployments: [{{ provider: claude, model: claude-demo }}] }}\n"
    );
    let gw1 = cluster.node(1);
    let (_cp, key) = llm_api(gw1, &content).await;
    for id in cluster.ids() {
        let gw = cluster.node(id);
        eventually(
            "every node calls the provider with acme's key",
            T,
            async || {
                chat(gw, &key, "gpt").await.0 == 200 && chat(gw, &key, "claude").await.0 == 200
            },
        )
        .await;
    }
    // The provider's key changes: the provider refuses the old one, and the new secret
    // reaches every node without a restart.
    drop(demo);
    let demo = LlmDemo::start_at(&a.to_string(), &["--api-key", "second-key"]);
    let (status, body) = chat(cluster.node(2), &key, "gpt").await;
    assert_eq!(status, 502, "the provider refused the old key: {body}");
    admin
        .put_secret("acme.provider-key", b"second-key".to_vec())
        .await
        .unwrap();
    for id in cluster.ids() {
        let gw = cluster.node(id);
        eventually("every node uses the rotated key", T, async || {
            chat(gw, &key, "gpt").await.0 == 200 && chat(gw, &key, "claude").await.0 == 200
        })
        .await;
    }
    // The key is never in the state as text, nor in a node's logs or access log.
    for id in cluster.ids() {
        let log = cluster.node(id).log();
        assert!(
            !log.contains("second-key") && !log.contains("first-key"),
            "{log}"
        );
    }
    let state = admin.list_secrets().await.unwrap();
    assert!(
        state.iter().all(|s| s.hash.is_empty()),
        "secret listings carry no value"
    );
    drop(demo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_in_a_real_collector_shows_each_provider_call_with_the_genai_attributes() {
    let col = harness::collector::Collector::start().await;
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start_with(&spec(), &["--otlp-endpoint", &col.grpc_url()]).await;
    let content = format!(
        "{}models:\n  chat: {{ routing: priority, deployments: [{{ provider: oai, model: \"demo+status=503\", name: down }}, {{ provider: claude, model: claude-demo, name: up, priority: 1 }}] }}\n",
        demo.providers()
    );
    let (_cp, key) = llm_api(&gw, &content).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = serde_json::json!({"model": "chat", "stream": true, "temperature": 0.5,
        "messages": [{"role": "user", "content": "a secret prompt"}]});
    let s = harness::llm::stream(
        &gw,
        "/llm/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {key}")),
            ("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01")),
        ],
        body,
    )
    .await;
    assert_eq!(s.status, 200);
    let spans = col
        .wait_for("the server span and both provider calls", |spans| {
            spans.iter().filter(|s| s.trace_id == trace).count() >= 3
        })
        .await;
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let server = ours.iter().find(|s| s.kind == "SPAN_KIND_SERVER").unwrap();
    assert_eq!(
        server.parent_id, "00f067aa0ba902b7",
        "the client's span is the parent"
    );
    let calls: Vec<_> = ours
        .iter()
        .filter(|s| s.kind == "SPAN_KIND_CLIENT")
        .collect();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    for c in &calls {
        assert_eq!(c.parent_id, server.id);
        assert_eq!(c.attr("gen_ai.operation.name"), "chat");
        assert_eq!(c.attr("gen_ai.request.stream"), "true");
        assert_eq!(c.attr("gen_ai.request.temperature"), "0.5");
        assert_eq!(c.attr("tollgate.llm.model"), "chat");
    }
    let failed = calls
        .iter()
        .find(|c| c.attr("tollgate.llm.deployment") == "down")
        .unwrap();
    assert_eq!(failed.name, "chat demo+status=503");
    assert_eq!(failed.attr("gen_ai.provider.name"), "openai");
    assert_eq!(failed.attr("error.type"), "server_error");
    let answered = calls
        .iter()
        .find(|c| c.attr("tollgate.llm.deployment") == "up")
        .unwrap();
    assert_eq!(answered.name, "chat claude-demo");
    assert_eq!(answered.attr("gen_ai.provider.name"), "anthropic");
    assert_eq!(answered.attr("gen_ai.request.model"), "claude-demo");
    assert_eq!(answered.attr("gen_ai.response.model"), "claude-demo");
    assert!(
        answered.attr("gen_ai.response.id").starts_with("msg_demo"),
        "{answered:#?}"
    );
    assert!(
        answered
            .attr("gen_ai.response.finish_reasons")
            .contains("stop"),
        "{answered:#?}"
    );
    assert_eq!(answered.attr("gen_ai.usage.input_tokens"), "3");
    assert_eq!(answered.attr("gen_ai.usage.output_tokens"), "5");
    // No prompt or completion text unless the operator turns capture on.
    for s in &ours {
        assert!(
            !format!("{:?}", s.attributes).contains("secret prompt"),
            "{s:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_answers_reach_traces_only_when_the_operator_captures_them() {
    let col = harness::collector::Collector::start().await;
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start_with(
        &spec(),
        &[
            "--otlp-endpoint",
            &col.grpc_url(),
            "--llm-capture-content",
            "on",
        ],
    )
    .await;
    let content = format!(
        "{}models:\n  chat: {{ deployments: [{{ provider: gem, model: gemini-demo }}] }}\n",
        demo.providers()
    );
    let (_cp, key) = llm_api(&gw, &content).await;
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let body = serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": "captured words"}]});
    let r = gw
        .send(
            http::Request::post(gw.url("/llm/v1/chat/completions"))
                .header("authorization", format!("Bearer {key}"))
                .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
                .body(harness::full(body.to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    let spans = col
        .wait_for("the provider call", |spans| {
            spans
                .iter()
                .any(|s| s.trace_id == trace && s.kind == "SPAN_KIND_CLIENT")
        })
        .await;
    let call = spans
        .iter()
        .find(|s| s.trace_id == trace && s.kind == "SPAN_KIND_CLIENT")
        .unwrap();
    assert!(
        call.attr("gen_ai.input.messages")
            .contains("captured words"),
        "{call:#?}"
    );
    assert!(
        call.attr("gen_ai.output.messages")
            .contains("You said: captured words"),
        "{call:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deployment_opens_its_own_cluster_wide_circuit_and_is_passed_over() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&spec()).await;
    let a = demo.addr;
    let content = format!(
        "{}  flaky: {{ kind: openai, base_url: \"http://{a}/v1\", circuit_breaker: {{ consecutive_failures: 3, open_for: 60s }} }}
models:
  chat: {{ routing: priority, deployments: [{{ provider: flaky, model: \"demo+status=500\", name: bad }}, {{ provider: claude, model: claude-demo, name: good, priority: 1 }}] }}
",
        demo.providers()
    );
    let (cpp, key) = llm_api(&gw, &content).await;
    let to_bad = || {
        demo.requests()
            .iter()
            .filter(|r| r["body"]["model"] == "demo+status=500")
            .count()
    };
    // Every request is answered (by the fallback); the failures open bad's circuit.
    for _ in 0..3 {
        assert_eq!(chat(&gw, &key, "chat").await.0, 200);
    }
    let cluster_name = "llm@1.0.0/llm/chat/bad";
    eventually("bad's circuit is committed open", T, async || {
        let mut sdk = gw.sdk().await;
        sdk.list_circuits()
            .await
            .unwrap()
            .circuits
            .iter()
            .any(|c| c.upstream == cluster_name && c.open)
    })
    .await;
    let before = to_bad();
    for _ in 0..10 {
        assert_eq!(chat(&gw, &key, "chat").await.0, 200);
    }
    assert_eq!(
        to_bad(),
        before,
        "an open circuit's deployment is not called"
    );
    // `tollgate models list` (the control plane's Models service) shows it.
    let cp = cpp.sdk(gw.operator_token());
    let models = cp
        .list_models(tollgate_sdk::cp::ListModelsRequest::default())
        .await
        .unwrap()
        .models;
    let bad = models.iter().find(|m| m.deployment == "bad").unwrap();
    let good = models.iter().find(|m| m.deployment == "good").unwrap();
    assert_eq!(bad.circuit, "open", "{models:?}");
    assert_eq!(good.circuit, "closed");
    eventually("the calls are metered", T, async || {
        let models = cp
            .list_models(tollgate_sdk::cp::ListModelsRequest::default())
            .await
            .unwrap()
            .models;
        let bad = models.iter().find(|m| m.deployment == "bad").unwrap();
        let good = models.iter().find(|m| m.deployment == "good").unwrap();
        bad.calls == 3 && bad.error_rate == 1.0 && good.calls == 13 && good.ttft_p99_ms > 0.0
    })
    .await;
    // The version's health has its time to first token and tokens too.
    let status = cp
        .version_status(tollgate_sdk::cp::VersionStatusRequest {
            api: "llm".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let v = &status.versions[0];
    assert!(
        v.ttft_p50_ms > 0.0
            && v.ttft_p99_ms >= v.ttft_p50_ms
            && v.input_tokens > 0
            && v.output_tokens > 0,
        "{v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_over_https_have_their_certificates_checked() {
    use tollgate_node::identity::ca::EdgeCa;
    let demo = LlmDemo::start();
    // A provider behind TLS: a second node terminating HTTPS in front of the demo.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ca = EdgeCa::generate("provider-ca", now).unwrap();
    let other = EdgeCa::generate("someone-else", now).unwrap();
    let cert = ca
        .issue(&["localhost"], now - 3_600_000, now + 86_400_000)
        .unwrap();
    let edge = GatewayProcess::start_with("", &["--https-addr", "127.0.0.1:0"]).await;
    let mut sdk = edge.sdk().await;
    sdk.put_secret("provider-tls-key", cert.key_pem.clone().into_bytes())
        .await
        .unwrap();
    let chain: String = cert
        .chain_pem
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    let edge_spec = format!(
        "upstreams: {{ demo: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: demo }} }}\ncertificates:\n  c:\n    key_secret: provider-tls-key\n    default: true\n    chain: |\n{chain}",
        demo.addr
    );
    sdk.apply_spec(&edge_spec, false, "").await.unwrap();
    let port = edge.https.unwrap().port();
    let block = |pem: &str| -> String { pem.lines().map(|l| format!("        {l}\n")).collect() };
    let gw = GatewayProcess::start(&spec()).await;
    let content = format!(
        "providers:
  trusted:
    kind: openai
    base_url: \"https://localhost:{port}/v1\"
    tls:
      ca: |
{}  untrusted:
    kind: openai
    base_url: \"https://localhost:{port}/v1\"
    tls:
      ca: |
{}models:
  good: {{ deployments: [{{ provider: trusted, model: demo-over-tls }}] }}
  bad: {{ deployments: [{{ provider: untrusted, model: demo-over-tls }}] }}
",
        block(&ca.cert_pem),
        block(&other.cert_pem)
    );
    let (_cp, key) = llm_api(&gw, &content).await;
    eventually("the provider over HTTPS answers", T, async || {
        chat(&gw, &key, "good").await.0 == 200
    })
    .await;
    let (status, body) = chat(&gw, &key, "good").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "demo-over-tls");
    // A certificate from another CA: refused, nothing reaches the provider.
    let (status, body) = chat(&gw, &key, "bad").await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
}
