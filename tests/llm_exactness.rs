//! Usage exactness under load (docs/llm.md, "Exact usage"): 10,000 streamed requests
//! through a 3-node cluster, clients leaving at random points, the provider cutting 5% of
//! its streams, one node killed (-9) in the middle. Request by request, the tokens metered
//! are the tokens the provider reported wherever it reported them; the rest are marked
//! estimated; nothing is counted twice.

mod harness;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::cluster::TestCluster;
use harness::llm::{LlmDemo, llm_api, wait_served};
use harness::{allowing_loopback, full};
use http_body_util::BodyExt;
use serde_json::{Value, json};

const REQUESTS: usize = 10_000;
const CONCURRENCY: usize = 24;

/// What a client did with one request.
#[derive(Default, Debug)]
struct Outcome {
    /// The node could not be reached (killed).
    unreached: bool,
    status: u16,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_meter_exactly_what_the_provider_reported() {
    let demo = LlmDemo::start();
    let mut cluster = TestCluster::start(
        3,
        &allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &["--meter-interval", "200ms"],
    )
    .await;
    let content = format!(
        "{}models:\n  gpt: {{ deployments: [{{ provider: oai, model: \"gpt+cut_pct=5\" }}] }}\n  claude: {{ deployments: [{{ provider: claude, model: \"claude+cut_pct=5\" }}] }}\n",
        demo.providers()
    );
    let (cpp, _) = llm_api(cluster.node(1), &content).await;
    let cp = cpp.sdk(&cluster.token);
    let mut keys = Vec::new();
    for id in 1..=3u64 {
        keys.push(
            cp.create_key("acme", &format!("node{id}"), "")
                .await
                .unwrap()
                .secret,
        );
    }
    let proxies: Vec<std::net::SocketAddr> = (1..=3).map(|id| cluster.node(id).proxy).collect();
    for (i, p) in proxies.iter().enumerate() {
        wait_served(cluster.node(i as u64 + 1), &[*p], &keys[i]).await;
    }

    let client = harness::llm::client();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::channel::<()>(1);
    for _ in 0..CONCURRENCY {
        let (client, next, keys, kill_tx, proxies) = (
            client.clone(),
            next.clone(),
            keys.clone(),
            kill_tx.clone(),
            proxies.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<(usize, Outcome)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= REQUESTS {
                    return out;
                }
                if i == REQUESTS / 2 {
                    let _ = kill_tx.try_send(());
                }
                let node = i % 3;
                let anthropic = i % 2 == 0;
                let (path, body) = if anthropic {
                    ("/llm/v1/messages", json!({"model": if i % 4 == 0 { "claude" } else { "gpt" }, "max_tokens": 64, "stream": true,
                        "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}))
                } else {
                    ("/llm/v1/chat/completions", json!({"model": if i % 3 == 0 { "claude" } else { "gpt" }, "stream": true,
                        "stream_options": {"include_usage": i % 5 == 0},
                        "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}))
                };
                let req = http::Request::post(format!("http://{}{path}", proxies[node]))
                    .header("authorization", format!("Bearer {}", keys[node]))
                    .header("anthropic-version", "2023-06-01")
                    .body(full(body.to_string()))
                    .unwrap();
                let mut o = Outcome::default();
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) => {
                        o.status = resp.status().as_u16();
                        // One client in ten leaves after a few pieces.
                        let leave_after = fastrand_like(i).is_multiple_of(10).then(|| 1 + fastrand_like(i * 7) % 6);
                        let mut body = resp.into_body();
                        let mut n = 0;
                        while let Ok(Some(Ok(_))) =
                            tokio::time::timeout(Duration::from_secs(10), body.frame()).await
                        {
                            n += 1;
                            if leave_after == Some(n) {
                                break;
                            }
                        }
                    }
                    _ => o.unreached = true,
                }
                out.push((i, o));
            }
        }));
    }
    drop(kill_tx);
    // Kill -9 node 3 half way through.
    if kill_rx.recv().await.is_some() {
        cluster.kill9(3);
    }
    let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let sent_to = |node: usize| {
        outcomes
            .iter()
            .filter(|(i, o)| i % 3 == node && !o.unreached)
            .count() as u64
    };
    println!(
        "{REQUESTS} requests in {elapsed:?}; reached: node1 {}, node2 {}, node3 {}",
        sent_to(0),
        sent_to(1),
        sent_to(2)
    );
    let to_1_and_2 = (0..REQUESTS).filter(|i| i % 3 != 2).count() as u64;
    assert_eq!(
        sent_to(0) + sent_to(1),
        to_1_and_2,
        "nodes 1 and 2 took every request sent to them"
    );
    // Node 3 comes back and ships what it had journaled.
    cluster.restart(3).await;

    // The provider's own record of each stream: what it reported, and whether it cut it.
    let demo_log: HashMap<String, Value> = demo
        .log()
        .into_iter()
        .map(|e| (e["id"].as_str().unwrap_or_default().to_string(), e))
        .collect();
    let cut = demo_log.values().filter(|e| e["cut"] == true).count();
    println!("the provider cut {cut} of {} streams", demo_log.len());
    assert!(
        cut > REQUESTS / 40 && cut < REQUESTS / 10,
        "about 5% cut: {cut}"
    );

    // Metering settles: the rows stop changing.
    let key_ids: Vec<String> = keys
        .iter()
        .map(|k| k.split('_').nth(1).unwrap().to_string())
        .collect();
    let rows_by_key = async || {
        let mut sdk = cluster.client(1).await;
        let rows = sdk
            .usage(tollgate_proto::node::v1::UsageRequest::default())
            .await
            .unwrap()
            .entries;
        let mut by: HashMap<usize, (u64, u64, u64, u64)> = HashMap::new();
        for r in rows.iter().filter(|r| !r.model.is_empty()) {
            let node = key_ids
                .iter()
                .position(|k| r.key.contains(k.as_str()))
                .unwrap();
            let c = r.counts.as_ref().unwrap();
            let e = by.entry(node).or_default();
            e.0 += c.requests;
            e.1 += c.input_tokens;
            e.2 += c.output_tokens;
            e.3 += c.estimated;
        }
        by
    };
    let mut last = HashMap::new();
    let settle = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rows_by_key().await;
        if now == last && now.len() == 3 {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(60),
            "metering never settled: {now:?}"
        );
        last = now;
    }

    // The access logs of the nodes that lived: flushed by a clean stop.
    let mut lines: HashMap<usize, Vec<Value>> = HashMap::new();
    for id in [1u64, 2] {
        let harness::cluster::Slot::Up(gw) = &mut cluster.nodes[id as usize - 1] else {
            unreachable!("nodes 1 and 2 are up")
        };
        gw.signal("TERM");
        let path = gw.access_log.clone();
        assert!(
            gw.wait_exit(Duration::from_secs(20)).await.is_some(),
            "node {id} did not stop"
        );
        lines.insert(
            id as usize - 1,
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|l| {
                    l["path"].as_str().is_some_and(|p| {
                        p.ends_with("/chat/completions") || p.ends_with("/messages")
                    })
                })
                .collect(),
        );
    }
    let mut exact = 0;
    let mut estimated = 0;
    for node in [0usize, 1] {
        let log = &lines[&node];
        let (requests, input, output, est) = last[&node];
        // Nothing lost, nothing twice: the rows are the access log's requests and tokens.
        assert_eq!(requests, log.len() as u64, "node {}: requests", node + 1);
        let sum = |f: &str| log.iter().map(|l| l[f].as_u64().unwrap()).sum::<u64>();
        assert_eq!(
            (input, output),
            (sum("input_tokens"), sum("output_tokens")),
            "node {}: tokens",
            node + 1
        );
        assert_eq!(
            est,
            log.iter().filter(|l| l["tokens_estimated"] == true).count() as u64
        );
        // Request by request, against what the provider said it used.
        for l in log {
            if l["status"] != 200 {
                // No answer (a stream cut before its first token, with no other
                // deployment): nothing is metered as used.
                assert_eq!(
                    (l["input_tokens"].as_u64(), l["output_tokens"].as_u64()),
                    (Some(0), Some(0)),
                    "{l}"
                );
                continue;
            }
            let id = l["response_id"].as_str().unwrap();
            let Some(p) = demo_log.get(id) else {
                panic!(
                    "node {}: an answer the provider does not know: {l}",
                    node + 1
                );
            };
            if l["tokens_estimated"] == false {
                assert_eq!(p["reported"], true, "only reported usage is exact: {l} {p}");
                assert_eq!(
                    (l["input_tokens"].as_u64(), l["output_tokens"].as_u64()),
                    (p["input_tokens"].as_u64(), p["output_tokens"].as_u64()),
                    "{l} {p}"
                );
                exact += 1;
            } else {
                estimated += 1;
                if p["cut"] == true {
                    assert_eq!(l["stream_incomplete"], true, "{l}");
                }
            }
            if p["cut"] == true {
                assert_eq!(
                    l["tokens_estimated"], true,
                    "a cut stream is never exact: {l} {p}"
                );
            }
        }
    }
    println!("nodes 1 and 2: {exact} requests metered exactly as reported, {estimated} estimated");
    assert!(exact > estimated * 3, "most streams end whole");
    // The killed node: at most what reached it, never more (a batch retried after the
    // restart is applied once).
    let (requests3, ..) = last[&2];
    println!(
        "node 3: {requests3} of {} requests that reached it were metered (the rest were in its last interval before the kill)",
        sent_to(2)
    );
    assert!(
        requests3 <= sent_to(2),
        "node 3 counted {requests3} of {}",
        sent_to(2)
    );
    // What it had not journaled when killed is lost: its last interval (200 ms here) and
    // the streams in flight.
    let lost = sent_to(2) - requests3;
    assert!(
        lost <= 100.max(sent_to(2) / 10),
        "node 3 lost {lost}: its journal shipped after the restart"
    );
}

/// A cheap deterministic spread of request numbers (no RNG state to share).
fn fastrand_like(i: usize) -> usize {
    (i.wrapping_mul(2654435761)) >> 7
}
