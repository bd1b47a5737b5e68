//! LLM spend under control (docs/llm.md, "Spend and token limits"), with the official
//! `openai` and `anthropic` SDKs: token prices and the cost each answer carries, budgets
//! held before dispatch and mid-stream, token rate limits.

mod harness;

use std::time::Duration;

use harness::llm::{LlmDemo, llm_api, sdk_case};
use harness::{GatewayProcess, allowing_loopback, eventually};
use tollgate_sdk::{cp, state};

fn content(demo: &LlmDemo) -> String {
    format!(
        "{}models:
  gpt: {{ deployments: [{{ provider: oai, model: gpt-4o-demo }}] }}
  azure-gpt: {{ deployments: [{{ provider: azure, model: my-deployment }}] }}
  claude: {{ deployments: [{{ provider: claude, model: claude-demo }}] }}
  gemini: {{ deployments: [{{ provider: gem, model: gemini-demo }}] }}
  long: {{ deployments: [{{ provider: oai, model: \"demo+words=3000+slow=2\" }}] }}
",
        demo.providers()
    )
}

/// Every model's tokens at `input` and `output` per 10^6, and `per_1k` per 1,000 requests.
fn prices(input: &str, output: &str, per_1k: &str) -> state::PlanPrices {
    state::PlanPrices {
        per_1k_requests: per_1k.into(),
        llm: [(
            "*".to_string(),
            state::TokenPrices {
                input: input.into(),
                output: output.into(),
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn meter_flags() -> [&'static str; 2] {
    ["--meter-interval", "100ms"]
}

/// A node (metering every 100 ms) serving `content` as API `llm` of tenant `acme`, with
/// acme on plan `llm` at `plan` when given: the node, its control plane, an SDK client of
/// it, and an API key of acme's.
async fn priced(
    content: &str,
    plan: Option<state::PlanPrices>,
) -> (
    GatewayProcess,
    harness::cp::CpProcess,
    tollgate_sdk::ControlPlaneClient,
    String,
) {
    let gw = GatewayProcess::start_with(
        &allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &meter_flags(),
    )
    .await;
    let (cpp, key) = llm_api(&gw, content).await;
    let cp = cpp.sdk(gw.operator_token());
    if let Some(plan) = plan {
        cp.put_plan("llm", plan).await.unwrap();
        cp.assign_plan("acme", "llm").await.unwrap();
    }
    (gw, cpp, cp, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_its_cost_and_the_report_by_model_adds_up_to_it() {
    let demo = LlmDemo::start();
    let (gw, cpp, cp, key) = priced(&content(&demo), Some(prices("2.50", "10", "0.40"))).await;
    // The node prices with what it applied: wait for the plan to be there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = sdk_case(
        "costs",
        &gw.url("/llm"),
        &key,
        &[("IN", "2.50"), ("OUT", "10"), ("PER_1K", "0.40")],
    )
    .await;
    let total = out
        .lines()
        .find_map(|l| l.strip_prefix("costs total "))
        .unwrap_or_else(|| panic!("no total in {out}"))
        .trim()
        .to_string();
    // The cost report, by model, prices the metered rows to the same sum.
    let report = async || {
        cp.costs(cp::CostsQuery {
            range: Some(cp::UsageQuery {
                group_by: "model".into(),
                tenant: "acme".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
    };
    eventually("the report adds up", Duration::from_secs(10), async || {
        report().await.totals.get("USD") == Some(&total)
    })
    .await;
    let lines = report().await.lines;
    for model in ["gpt/oai", "azure-gpt/azure", "claude/claude", "gemini/gem"] {
        let line = lines.iter().find(|l| l.group == model);
        assert!(line.is_some_and(|l| l.tokens > 0), "{model}: {lines:?}");
    }
    // The CLI shows the same report.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["costs", "--by", "model", "--cp"])
        .arg(cpp.addr.to_string())
        .args(["--token", gw.operator_token()])
        .env("TOLLGATE_CA", gw.ca_file())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(
        text.contains(&format!("Total: {total} USD")),
        "{text}\n{}",
        String::from_utf8_lossy(&cli.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refuses_402_before_dispatch_and_cuts_a_stream_where_it_ends() {
    let demo = LlmDemo::start();
    // 10 per 10^6 tokens: 10,000 nanos a token; a budget of 0.001 is 100 tokens.
    let (gw, _cpp, cp, key) = priced(&content(&demo), Some(prices("10", "10", "0"))).await;
    cp.set_budget(state::SetBudget {
        tenant: "acme".into(),
        monthly_limit: "0.001".into(),
        hard_cap: true,
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = demo.stats();
    let out = sdk_case("budget", &gw.url("/llm"), &key, &[("BIG", "500")]).await;
    let words: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("streamed words "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let after = demo.stats();
    // Only the stream reached the provider.
    let reached = after["requests"].as_u64().unwrap() - before["requests"].as_u64().unwrap();
    assert_eq!(reached, 1, "{before} {after}");
    // What the provider charged for: its own count of the tokens it sent.
    let sent = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let charged_nanos = (sent("input_tokens") + sent("output_tokens")) * 10_000;
    let bound_nanos = (64 + 64) * 10_000;
    println!(
        "the stream got {words} words; the provider charged {charged_nanos} nanos of a 1,000,000 budget (bound {bound_nanos})"
    );
    assert!(words > 50, "the stream ran on the budget it had: {words}");
    assert!(
        charged_nanos <= 1_000_000 + bound_nanos,
        "{charged_nanos} nanos charged"
    );
    // The committed spend says the same: the budget was spent, within its bound.
    let spent = async || -> f64 {
        let b = cp.list_budgets().await.unwrap();
        b.budgets[0].spent.parse().unwrap()
    };
    eventually(
        "the spend is committed",
        Duration::from_secs(10),
        async || spent().await * 1e9 >= 900_000.0,
    )
    .await;
    let spent = spent().await;
    println!("committed spend {spent}");
    assert!(spent * 1e9 <= 1_000_000.0 + bound_nanos as f64, "{spent}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_budget_reservations_total{result=\"refused\",tenant=\"acme\"}")
            || metrics
                .contains("tollgate_budget_reservations_total{tenant=\"acme\",result=\"refused\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_budget_overshoot_bound_nanos"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_quota_answers_429_with_retry_after_before_the_provider_is_called() {
    // An hour's window: the test must not straddle its end.
    loop {
        let into = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 3600;
        if into < 3600 - 30 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let demo = LlmDemo::start();
    let (gw, _cpp, _cp, key) = priced(&content(&demo), None).await;
    // The quota names the API, so it comes once the API is there.
    let spec = allowing_loopback(
        "upstreams: {}\nroutes: {}\nquotas:\n  tpm: { scope: tenant, limit: 300, window: hour, unit: tokens, apis: [llm] }\n",
    );
    gw.sdk().await.apply_spec(spec, false, "tpm").await.unwrap();
    let before = demo.stats()["requests"].as_u64().unwrap();
    // Two requests that each may use ~110 tokens and use ~10; then one that may use ~295
    // (fits the limit, not what is left of it).
    sdk_case(
        "token_limit",
        &gw.url("/llm"),
        &key,
        &[("FITS", "100"), ("OVER", "285")],
    )
    .await;
    let after = demo.stats()["requests"].as_u64().unwrap();
    assert_eq!(
        after - before,
        2,
        "only the two that fit reached the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_cache_answers_repeats_without_the_provider_and_meters_them_as_cached() {
    let demo = LlmDemo::start();
    let content = format!("{}response_cache: {{ ttl: 3s }}\n", content(&demo));
    let mut plan = prices("2.50", "10", "0.40");
    plan.per_1k_cached_requests = "0.10".into();
    let (gw, _cpp, cp, key) = priced(&content, Some(plan)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = demo.stats()["requests"].as_u64().unwrap();
    // A hit costs 0.10 per 1,000: 0.0001.
    sdk_case("cache", &gw.url("/llm"), &key, &[("CACHED_COST", "0.0001")]).await;
    let after = demo.stats()["requests"].as_u64().unwrap();
    // Misses and bypasses only: whole, stream, two bypasses, Anthropic's miss.
    assert_eq!(after - before, 5);
    // Metered as cached requests, at their own price.
    eventually(
        "the hits are metered",
        Duration::from_secs(10),
        async || {
            let u = cp
                .usage(cp::UsageQuery {
                    tenant: "acme".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            u.lines
                .iter()
                .map(|l| l.counts.as_ref().map_or(0, |c| c.cached_requests))
                .sum::<u64>()
                == 3
        },
    )
    .await;
    // Past the ttl the entry is gone: the next repeat reaches the provider.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let r = gw
        .send(
            http::Request::post(gw.url("/llm/v1/chat/completions"))
                .header("authorization", format!("Bearer {key}"))
                .body(harness::full(
                    serde_json::json!({"model": "gpt", "temperature": 0,
                        "messages": [{"role": "user", "content": "cache me please"}]})
                    .to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(
        r.headers
            .get("x-tollgate-cache")
            .map(|v| v.to_str().unwrap()),
        Some("miss")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_keys_budget_holds_for_that_key_alone() {
    let demo = LlmDemo::start();
    let (gw, _cpp, cp, _) = priced(&content(&demo), Some(prices("10", "10", "0"))).await;
    let limited = cp.create_key("acme", "limited", "").await.unwrap();
    let limited_id = limited.credential.clone().unwrap().id;
    let other = cp.create_key("acme", "other", "").await.unwrap().secret;
    // The tenant's budget is large; this key's is 100 tokens' worth.
    for (key, limit) in [("", "1000"), (limited_id.as_str(), "0.001")] {
        cp.set_budget(state::SetBudget {
            tenant: "acme".into(),
            key: key.into(),
            monthly_limit: limit.into(),
            hard_cap: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The limited key: 402 before dispatch, a stream cut where its budget ends.
    sdk_case(
        "budget",
        &gw.url("/llm"),
        &limited.secret,
        &[("BIG", "500")],
    )
    .await;
    // Another key of the same tenant is not held by it.
    let r = gw
        .send(
            http::Request::post(gw.url("/llm/v1/chat/completions"))
                .header("authorization", format!("Bearer {other}"))
                .body(harness::full(
                    serde_json::json!({"model": "gpt", "max_tokens": 500,
                        "messages": [{"role": "user", "content": "hello"}]})
                    .to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The key's budget is spent (its committed spend near its limit); the tenant's, with
    // the other key's request in it too, is far from its own.
    eventually(
        "the key's spend is committed",
        Duration::from_secs(10),
        async || {
            let b = cp.list_budgets().await.unwrap();
            let used = |key: &str| {
                b.budgets
                    .iter()
                    .find(|v| v.budget.as_ref().is_some_and(|s| s.key == key))
                    .map_or(0.0, |v| v.used_percent)
            };
            used(&limited_id) >= 90.0 && used("") < 1.0
        },
    )
    .await;
}
