//! Provider limits held by the whole cluster (docs/llm.md, "Provider limits"): a
//! deployment's `tpm` is a cluster-wide lease, so 3 nodes sending 3x a deployment's
//! tokens per minute keep the provider under its limit and move the rest to the next
//! deployment; what the provider says of its limits (`x-ratelimit-remaining-tokens`, a 429)
//! reaches every node.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use harness::cluster::TestCluster;
use harness::llm::{LlmDemo, llm_api, wait_served};
use harness::{allowing_loopback, full};
use http_body_util::BodyExt;
use serde_json::json;

const TPM: u64 = 3_000;
/// What one request may take (its prompt and max_tokens, as the gateway counts them).
const MAX_TOKENS: u64 = 40;

fn content(demo: &LlmDemo) -> String {
    format!(
        "{}models:
  pq: {{ routing: priority, deployments: [{{ provider: oai, model: \"demo+tpm={TPM}\", name: a, tpm: {TPM} }}, {{ provider: claude, model: claude-b, name: b, priority: 1 }}] }}
  fb: {{ routing: priority, deployments: [{{ provider: oai, model: \"demo+tpm=1000\", name: a, tpm: 1000 }}, {{ provider: claude, model: claude-fb, name: b, priority: 1 }}] }}
  hot: {{ routing: priority, deployments: [{{ provider: oai, model: demo-hot, name: a, tpm: 100000 }}, {{ provider: claude, model: claude-hot, name: b, priority: 1 }}] }}
",
        demo.providers()
    )
}

/// Waits until at least `needed` of the current calendar minute is left (the provider's
/// windows and the leases' are calendar minutes).
async fn with_minute_left(needed: Duration) {
    let into = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        % 60_000;
    if 60_000 - into < needed.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(60_000 - into + 200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_a_deployment_under_its_providers_limit_and_move_the_rest_on() {
    let demo = LlmDemo::start();
    let cluster =
        TestCluster::start(3, &allowing_loopback("upstreams: {}\nroutes: {}\n"), &[]).await;
    let (_cpp, key) = llm_api(cluster.node(1), &content(&demo)).await;
    let proxies: Vec<std::net::SocketAddr> = (1..=3).map(|id| cluster.node(id).proxy).collect();
    wait_served(cluster.node(1), &proxies, &key).await;
    let client = harness::llm::client();
    // `n` chat requests for `model` over `nodes`, `at_once` at a time; their statuses.
    let send = async |model: &'static str, n: usize, nodes: &[usize], at_once: usize| -> Vec<u16> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..at_once {
            let (client, key, next) = (client.clone(), key.clone(), next.clone());
            let targets: Vec<std::net::SocketAddr> = nodes.iter().map(|i| proxies[*i]).collect();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return out;
                    }
                    let body = json!({"model": model, "max_tokens": MAX_TOKENS,
                        "messages": [{"role": "user", "content": "how much is left"}]});
                    let req = http::Request::post(format!(
                        "http://{}/llm/v1/chat/completions",
                        targets[i % targets.len()]
                    ))
                    .header("authorization", format!("Bearer {key}"))
                    .body(full(body.to_string()))
                    .unwrap();
                    let status =
                        match tokio::time::timeout(Duration::from_secs(10), client.request(req))
                            .await
                        {
                            Ok(Ok(resp)) => {
                                let s = resp.status().as_u16();
                                let _ = resp.into_body().collect().await;
                                s
                            }
                            _ => 0,
                        };
                    out.push(status);
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    };
    let answered_by = |model: &str| {
        demo.log()
            .iter()
            .filter(|e| e["model"].as_str() == Some(model))
            .count()
    };

    // 1. Three times the deployment's tokens per minute, from three nodes at once (each
    //    request is about 12 tokens at the provider: 750 x 12 = 9,000 = 3 x 3,000).
    with_minute_left(Duration::from_secs(25)).await;
    let statuses = send("pq", 750, &[0, 1, 2], 24).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let tpm = &demo.stats()["tpm"][format!("demo+tpm={TPM}")];
    let (most, refused) = (
        tpm["max_received"].as_u64().unwrap(),
        tpm["refused"].as_u64().unwrap(),
    );
    let (a, b) = (
        answered_by(&format!("demo+tpm={TPM}")),
        answered_by("claude-b"),
    );
    println!(
        "the provider saw at most {most} tokens in a minute (limit {TPM}), refused {refused}; a answered {a}, b {b}"
    );
    // The bound: one request's worst case per node while its lease is new.
    assert!(most <= TPM + 3 * (MAX_TOKENS + 10), "{most}");
    assert_eq!(refused, 0, "the provider never had to refuse");
    assert!(a > 100 && b > 300, "a {a}, b {b}");

    // 2. Another user of the same provider key takes 900 of the 1,000 this minute: the
    //    provider's x-ratelimit-remaining-tokens tells the cluster, which sends the rest on
    //    instead of into the provider's 429s.
    with_minute_left(Duration::from_secs(15)).await;
    let other = json!({"model": "demo+tpm=1000", "max_tokens": 10,
        "messages": [{"role": "user", "content": vec!["word"; 880].join(" ")}]});
    let r = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-d",
            &other.to_string(),
        ])
        .arg(format!("http://{}/v1/chat/completions", demo.addr))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "200");
    let taken = demo.stats()["tpm"]["demo+tpm=1000"]["max_received"]
        .as_u64()
        .unwrap();
    // One at a time: each answer's headers are in before the next request.
    let statuses = send("fb", 40, &[0, 1, 2], 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let fb = &demo.stats()["tpm"]["demo+tpm=1000"];
    println!(
        "after another user took 900: {fb}; b answered {}",
        answered_by("claude-fb")
    );
    assert_eq!(fb["refused"].as_u64(), Some(0), "{fb}");
    // What the other user left fits a few of these requests (at least 8 tokens each at
    // the provider); the rest went to the next deployment.
    let fit = 1000u64.saturating_sub(taken) / 8;
    assert!(
        answered_by("claude-fb") as u64 >= 40 - fit.min(40),
        "the rest went to the next deployment: the other user took {taken}, b answered {}",
        answered_by("claude-fb")
    );

    // 3. A 429 on one node: the other nodes stop calling that deployment too, though
    //    they hold tokens of its lease.
    with_minute_left(Duration::from_secs(10)).await;
    let statuses = send("hot", 30, &[0, 1, 2], 24).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let warm = answered_by("demo-hot");
    assert!(warm >= 10, "the leases are warm: a answered {warm} of 30");
    demo.fail_next(1, 429);
    let statuses = send("hot", 1, &[0], 1).await;
    assert_eq!(statuses, vec![200], "the fallback answered");
    assert_eq!(answered_by("claude-hot"), 30 - warm + 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let statuses = send("hot", 20, &[1, 2], 24).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        answered_by("demo-hot"),
        warm,
        "no node called the deployment again this minute"
    );
}
