//! A budget holds across a cluster (docs/llm.md, "Spend and token limits"): 3 nodes, 50
//! concurrent long streams from one tenant against a budget that covers a fraction of
//! them. In each of 20 rounds, and in 3 more with a node killed (-9) in the middle, what
//! the provider charged for stays within the budget plus the stated overshoot bound.
//!
//! Rounds alternate two kinds of stream: with `max_tokens` (the worst case is known, so
//! whole streams are reserved and none is cut) and without it (the worst case is the
//! model's output cap, larger than the budget: streams start on part of it, take more as
//! they go, and are cut where the budget ends, on whichever node).

mod harness;

use std::time::{Duration, Instant};

use harness::cluster::TestCluster;
use harness::llm::{LlmDemo, llm_api, wait_served};
use harness::{allowing_loopback, full};
use http_body_util::BodyExt;
use serde_json::json;
use tollgate_sdk::state;

const ROUNDS: usize = 20;
const KILL_ROUNDS: usize = 3;
const STREAMS: usize = 50;
/// Output words (tokens, at the demo provider) of each stream.
const WORDS: u64 = 200;
/// The budget of each round, in tokens at 10,000 nanos a token (10 per 10^6 tokens).
const BUDGET_TOKENS: u64 = 2_500;
const NANOS_PER_TOKEN: u64 = 10_000;
/// The bound the gateway states per stream in flight (tollgate_budget_overshoot_bound_nanos):
/// one step ahead and one provider event, 64 tokens each.
const BOUND_TOKENS_PER_STREAM: u64 = 128;
/// The prompt's tokens ("go on", as the demo provider counts them).
const INPUT_TOKENS: u64 = 2;
/// What a stream without max_tokens reserves ahead of its output (limits::STREAM_STEP).
const STREAM_STEP: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_streams_on_three_nodes_never_spend_past_the_budget_and_its_bound() {
    let demo = LlmDemo::start();
    let mut cluster = TestCluster::start(
        3,
        &allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &["--meter-interval", "100ms"],
    )
    .await;
    let content = format!(
        "{}models:\n  long: {{ max_output_tokens: 4096, deployments: [{{ provider: oai, model: \"demo+words={WORDS}+slow=5\" }}] }}\n",
        demo.providers()
    );
    let (cpp, key) = llm_api(cluster.node(1), &content).await;
    let cp = cpp.sdk(&cluster.token);
    cp.put_plan(
        "llm",
        state::PlanPrices {
            llm: [(
                "*".to_string(),
                state::TokenPrices {
                    input: "10".into(),
                    output: "10".into(),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cp.assign_plan("acme", "llm").await.unwrap();
    let mut proxies: Vec<std::net::SocketAddr> = (1..=3).map(|id| cluster.node(id).proxy).collect();
    wait_served(cluster.node(1), &proxies, &key).await;
    let client = harness::llm::client();

    // The committed spend once metering is done shipping: unchanged over a second.
    let settled_spend = async || -> f64 {
        let mut last = f64::NAN;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let b = cp.list_budgets().await.unwrap();
            let now: f64 = b.budgets.first().map_or(0.0, |v| v.spent.parse().unwrap());
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    };

    let mut worst_over: i64 = i64::MIN;
    let mut report = Vec::new();
    for round in 0..ROUNDS + KILL_ROUNDS {
        let killing = round >= ROUNDS;
        let capped = round % 2 == 0;
        // This round's budget: what was spent so far plus BUDGET_TOKENS.
        let spent = settled_spend().await;
        let limit = spent + (BUDGET_TOKENS * NANOS_PER_TOKEN) as f64 / 1e9;
        cp.set_budget(state::SetBudget {
            tenant: "acme".into(),
            monthly_limit: format!("{limit:.9}"),
            hard_cap: true,
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = demo.stats();
        let mut tasks = Vec::new();
        for i in 0..STREAMS {
            let (client, key, proxy) = (client.clone(), key.clone(), proxies[i % 3]);
            tasks.push(tokio::spawn(async move {
                let mut body = json!({"model": "long", "stream": true,
                    "messages": [{"role": "user", "content": "go on"}]});
                if capped {
                    body["max_tokens"] = json!(WORDS);
                }
                let req = http::Request::post(format!("http://{proxy}/llm/v1/chat/completions"))
                    .header("authorization", format!("Bearer {key}"))
                    .body(full(body.to_string()))
                    .unwrap();
                let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(20), client.request(req)).await
                else {
                    return (i % 3 + 1, "unreached");
                };
                if resp.status() != 200 {
                    return (
                        i % 3 + 1,
                        if resp.status() == 402 { "402" } else { "other" },
                    );
                }
                let mut body = resp.into_body();
                let mut text = Vec::new();
                loop {
                    match tokio::time::timeout(Duration::from_secs(20), body.frame()).await {
                        Ok(Some(Ok(f))) => {
                            text.extend_from_slice(f.data_ref().map_or(&[][..], |d| d))
                        }
                        Ok(None) => break,
                        _ => return (i % 3 + 1, "broken"),
                    }
                }
                let text = String::from_utf8_lossy(&text);
                let end = if text.contains("data: [DONE]") {
                    "whole"
                } else if text.contains("insufficient_quota") {
                    "cut"
                } else {
                    "broken"
                };
                (i % 3 + 1, end)
            }));
        }
        // Kill rounds: the node running the budget's streams (the one stating a bound
        // for them) dies half way through.
        let mut killed = None;
        if killing {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut busiest = (0.0, 1);
            for id in 1..=3u64 {
                let bound = gauge(&cluster.node(id).metrics().await);
                if bound > busiest.0 {
                    busiest = (bound, id);
                }
            }
            cluster.kill9(busiest.1);
            killed = Some(busiest.1);
        }
        let mut statuses = std::collections::BTreeMap::new();
        for t in tasks {
            *statuses.entry(t.await.unwrap()).or_insert(0u32) += 1;
        }
        let ended = |how: &str| {
            statuses
                .iter()
                .filter(|((_, e), _)| *e == how)
                .map(|(_, n)| n)
                .sum::<u32>()
        };
        assert!(
            (ended("unreached") + ended("broken") + ended("other") == 0) || killing,
            "every stream was answered, whole, cut at the budget or refused: {statuses:?}"
        );
        // Streams the killed node was serving end when it dies; the provider's count
        // stops there (it notices the connection close).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = demo.stats();
        let charged = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        let tokens = charged("input_tokens") + charged("output_tokens");
        let over = tokens as i64 - BUDGET_TOKENS as i64;
        worst_over = worst_over.max(over);
        // A stream whose node was killed before its answer's head went out may have started
        // at the provider too.
        let unreached = if killing { ended("unreached") } else { 0 };
        let started = u64::from(ended("whole") + ended("cut") + ended("broken") + unreached);
        report.push(format!(
            "round {round} ({}{}): {statuses:?}, {tokens} tokens charged (budget {BUDGET_TOKENS}, over {over})",
            if capped { "max_tokens" } else { "no max_tokens" },
            killed.map_or(String::new(), |id| format!(", node {id} killed"))
        ));
        // The stated bound: what each stream that started may take past the cap.
        assert!(
            tokens <= BUDGET_TOKENS + started * BOUND_TOKENS_PER_STREAM,
            "{}",
            report.join("\n")
        );
        if let Some(id) = killed {
            // Cut mid-stream, or before its first byte (the answer's head goes out with the
            // provider's first event).
            let cut_on_killed = statuses
                .iter()
                .filter(|((node, e), _)| {
                    *node as u64 == id && (*e == "broken" || *e == "unreached")
                })
                .map(|(_, n)| n)
                .sum::<u32>();
            assert!(cut_on_killed > 0, "the kill cut streams: {statuses:?}");
            cluster.restart(id).await;
            cluster
                .wait_all("the node is back", Duration::from_secs(30), |s| {
                    s.members.len() == 3 && s.leader.is_some()
                })
                .await;
            proxies[id as usize - 1] = cluster.node(id).proxy;
        } else {
            // Refused early by at most what the leases can strand: near the end of a
            // budget each of the 3 nodes may hold a piece smaller than one request's
            // reservation (its prompt and max_tokens, or a stream's first step), which no
            // request there can use until it goes back to the owner.
            let reservation = INPUT_TOKENS + if capped { WORDS } else { STREAM_STEP };
            assert!(
                tokens + 3 * reservation >= BUDGET_TOKENS,
                "the budget was spent, not refused early: {}",
                report.join("\n")
            );
        }
    }
    println!("{}", report.join("\n"));
    println!("worst overshoot: {worst_over} tokens");

    // The naive design, for comparison: each node checks the tenant's spend as it knows it
    // (the committed spend plus what it spent itself) before a request, and counts a
    // request's cost when it ends, as gateways that check a budget and increment it later
    // do. Built here, in front of the cluster, with the budget's cap off.
    settled_spend().await;
    cp.set_budget(state::SetBudget {
        tenant: "acme".into(),
        monthly_limit: "1000000".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let limit_tokens = BUDGET_TOKENS;
    let local = std::sync::Arc::new(std::sync::Mutex::new([0u64; 3]));
    let before = demo.stats();
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (client, key, proxy, local) =
            (client.clone(), key.clone(), proxies[i % 3], local.clone());
        // The spend this node knows of: committed (none yet this round) and its own.
        let known = local.lock().unwrap()[i % 3];
        if known >= limit_tokens {
            continue;
        }
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "long", "stream": true, "max_tokens": WORDS,
                "messages": [{"role": "user", "content": "go on"}]});
            let req = http::Request::post(format!("http://{proxy}/llm/v1/chat/completions"))
                .header("authorization", format!("Bearer {key}"))
                .body(full(body.to_string()))
                .unwrap();
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(20), client.request(req)).await
            {
                let mut body = resp.into_body();
                while let Ok(Some(Ok(_))) =
                    tokio::time::timeout(Duration::from_secs(20), body.frame()).await
                {
                }
            }
            // Counted when it ends.
            local.lock().unwrap()[i % 3] += WORDS + 2;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = demo.stats();
    let charged = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    let naive = charged("input_tokens") + charged("output_tokens");
    println!(
        "naive per-node check: {naive} tokens charged against a budget of {limit_tokens} (over by {}); tollgate's worst: over by {worst_over}",
        naive as i64 - limit_tokens as i64
    );
    assert!(
        naive > 2 * limit_tokens,
        "the naive design overspends under concurrency: {naive}"
    );
}

/// A node's `tollgate_budget_overshoot_bound_nanos` for acme (0 when it has none).
fn gauge(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_budget_overshoot_bound_nanos{tenant=\"acme\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
