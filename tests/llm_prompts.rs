//! Prompt APIs (docs/llm.md, "Prompt APIs") with the official `openai` SDK: a version's
//! prompts answer `POST <base>/<name>`, check their variables and their output, stream on
//! request, and are versioned like any API: a new prompt is canaried and rolled back.

mod harness;

use harness::llm::{LlmDemo, llm_api, sdk_case};
use harness::{GatewayProcess, allowing_loopback};

fn content(demo: &LlmDemo, greeting: &str) -> String {
    format!(
        "{}models:
  gpt: {{ deployments: [{{ provider: oai, model: gpt-4o-demo }}] }}
  claude: {{ deployments: [{{ provider: claude, model: claude-demo }}] }}
prompts:
  greet:
    model: gpt
    parameters: {{ temperature: 0, max_tokens: 50 }}
    messages:
      - {{ role: system, content: \"Be brief.\" }}
      - {{ role: user, content: \"{greeting} {{{{ name }}}} in {{{{ language }}}}\" }}
    input_schema:
      type: object
      required: [name]
      properties:
        name: {{ type: string, maxLength: 40 }}
        language: {{ type: string, default: English }}
  score:
    model: claude
    messages: [{{ role: user, content: \"Score this: {{{{ text }}}}\" }}]
    input_schema: {{ type: object, required: [text], properties: {{ text: {{ type: string }} }} }}
    output_schema: {{ type: object, required: [score, reason], properties: {{ score: {{ type: integer }}, reason: {{ type: string }} }} }}
  score-gpt:
    model: gpt
    messages: [{{ role: user, content: \"Score this: {{{{ text }}}}\" }}]
    output_schema: {{ type: object, required: [score, reason], properties: {{ score: {{ type: integer }}, reason: {{ type: string }} }} }}
",
        demo.providers()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_api_renders_checks_and_answers_json_through_the_official_sdk() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&allowing_loopback("upstreams: {}\nroutes: {}\n")).await;
    let (_cp, key) = llm_api(&gw, &content(&demo, "Greet")).await;
    let before = demo.stats()["requests"].as_u64().unwrap();
    let out = sdk_case("prompts", &gw.url("/llm"), &key, &[]).await;
    assert!(out.contains("prompts ok"), "{out}");
    // The four bad calls never reached the provider: 3 answers, 2 scores, 1 stream.
    let after = demo.stats()["requests"].as_u64().unwrap();
    assert_eq!(after - before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_prompt_version_is_canaried_and_rolled_back() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&allowing_loopback("upstreams: {}\nroutes: {}\n")).await;
    let (cpp, key) = llm_api(&gw, &content(&demo, "Greet")).await;
    let cp = cpp.sdk(gw.operator_token());
    cp.create_version("llm", "1.1.0", &content(&demo, "Welcome"))
        .await
        .unwrap();
    cp.publish("llm", "1.1.0").await.unwrap();
    cp.set_split("llm", &[("1.0.0", 50), ("1.1.0", 50)])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let counts = |out: &str| -> serde_json::Value {
        serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap()
    };
    let canary = counts(&sdk_case("prompt_versions", &gw.url("/llm"), &key, &[("N", "60")]).await);
    let (old, new) = (
        canary["You said: Greet Ada in English"]
            .as_u64()
            .unwrap_or(0),
        canary["You said: Welcome Ada in English"]
            .as_u64()
            .unwrap_or(0),
    );
    assert_eq!(old + new, 60, "{canary}");
    assert!(
        old >= 10 && new >= 10,
        "both versions answer a 50/50 split: {canary}"
    );
    cp.rollback("llm").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after = counts(&sdk_case("prompt_versions", &gw.url("/llm"), &key, &[("N", "20")]).await);
    assert_eq!(
        after,
        serde_json::json!({"You said: Greet Ada in English": 20}),
        "after the rollback only the old prompt answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_guard_masks_pii_and_refuses_secrets_before_any_provider_sees_them() {
    let demo = LlmDemo::start();
    let gw = GatewayProcess::start(&allowing_loopback("upstreams: {}\nroutes: {}\n")).await;
    let content = format!(
        "{}prompt_guard: {{ secrets: refuse, card: refuse, email: mask, phone: mask }}\n",
        content(&demo, "Greet")
    );
    let (_cp, key) = llm_api(&gw, &content).await;
    let before = demo.stats()["requests"].as_u64().unwrap();
    sdk_case("guard", &gw.url("/llm"), &key, &[]).await;
    // Only the masked request reached the provider, and without what was masked.
    let after = demo.stats()["requests"].as_u64().unwrap();
    assert_eq!(after - before, 1);
    let sent = demo.requests().last().unwrap()["body"].to_string();
    assert!(
        !sent.contains("ada@example.com") && !sent.contains("7946") && sent.contains("[EMAIL]"),
        "{sent}"
    );
    let metrics = gw.metrics().await;
    for want in [
        "tollgate_llm_guard_total{class=\"email\",action=\"mask\"} 1",
        "tollgate_llm_guard_total{class=\"secret\",action=\"refuse\"} 2",
        "tollgate_llm_guard_total{class=\"card\",action=\"refuse\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
}
