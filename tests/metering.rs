//! Metering and costs end to end: usage counted on every node, journaled, shipped through
//! Raft and rolled up exactly, across a node killed -9 and restarted mid-run; a cost report
//! for two tenants on two plans equal to the hand computation (through the control plane
//! and the CLI); a budget's hard cap answered 402 by every node within 5 s; per-version
//! health.

mod harness;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::cluster::TestCluster;
use harness::cp::CpProcess;
use harness::{Body, Upstream, full};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_sdk::{ControlPlaneClient, cp, state};

const T: Duration = Duration::from_secs(30);

/// The cluster's spec: one plain route; loopback opened to API versions, which send
/// requests to test upstreams on 127.0.0.1 (`harness::allowing_loopback`).
fn spec(up: &Upstream) -> String {
    harness::allowing_loopback(&format!(
        "upstreams:\n  u: {{ endpoints: [{{ address: \"{}\" }}] }}\nroutes:\n  plain: {{ match: {{ path: {{ prefix: /plain }} }}, upstream: u }}\n",
        up.addr
    ))
}

/// API `name` of tenant acme at `/<name>`, version 1.0.0 published: one route, paths
/// starting with `prefix`, onto `up`.
async fn publish_api(cp: &ControlPlaneClient, name: &str, prefix: &str, up: &Upstream) {
    cp.create_api(
        name,
        "acme",
        Some(state::ApiSettings {
            base_path: format!("/{name}"),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let content = format!(
        "upstreams: {{ o: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ r: {{ match: {{ path: {{ prefix: {prefix} }} }}, upstream: o }} }}\n",
        up.addr
    );
    cp.create_version(name, "1.0.0", &content).await.unwrap();
    cp.publish(name, "1.0.0").await.unwrap();
}

/// Two tenants with a key each, on an API `orders` 1.0.0 served by `up`.
async fn two_tenants(cp: &ControlPlaneClient, up: &Upstream) -> (String, String) {
    publish_api(cp, "orders", "/", up).await;
    cp.subscribe("globex", "orders", "*").await.unwrap();
    let acme = cp.create_key("acme", "a", "").await.unwrap().secret;
    let globex = cp.create_key("globex", "g", "").await.unwrap().secret;
    (acme, globex)
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request; the answer's status and the bytes of its body, or None when none came.
async fn send(
    c: &Client<HttpConnector, Body>,
    method: &str,
    url: &str,
    key: &str,
    body: &'static str,
) -> Option<(u16, u64)> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("x-api-key", key)
        .body(full(body))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let bytes = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    Some((status, bytes.len() as u64))
}

async fn total_usage(cp: &ControlPlaneClient) -> u64 {
    cp.usage(cp::UsageQuery {
        since: "1h".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .lines
    .iter()
    .map(|l| l.counts.as_ref().unwrap().requests)
    .sum()
}

/// Usage once it stops changing (two reads 2.5 s apart agree: more than two journal
/// intervals).
async fn settled_usage(cp: &ControlPlaneClient) -> u64 {
    let mut last = total_usage(cp).await;
    let deadline = Instant::now() + T;
    loop {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let now = total_usage(cp).await;
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_every_answered_request_across_a_node_killed_and_restarted() {
    let up = Upstream::start("u").await;
    let mut cluster = TestCluster::start(3, &spec(&up), &[]).await;
    let addrs: Vec<_> = cluster
        .up_ids()
        .iter()
        .map(|&i| cluster.node(i).grpc)
        .collect();
    let cpp = CpProcess::start(&addrs).await;
    let cp = cpp.sdk(&cluster.token);
    cp.create_tenant("acme").await.unwrap();
    cp.create_tenant("globex").await.unwrap();
    let (acme, _) = two_tenants(&cp, &up).await;
    let leader = cluster.leader(T).await;
    let victim = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let urls: Vec<(u64, String)> = cluster
        .ids()
        .into_iter()
        .map(|i| (i, cluster.node(i).url("/orders/v1/items")))
        .collect();
    for (_, url) in &urls {
        let url = url.clone();
        let key = acme.clone();
        harness::eventually("every node to serve the API", T, async || {
            send(&client(), "GET", &url, &key, "").await.map(|r| r.0) == Some(200)
        })
        .await;
    }
    // The warm-up requests counted before the run starts.
    let before = settled_usage(&cp).await;

    // Traffic through every node, from 6 clients, for about 6 s; the victim is killed -9
    // 2.5 s in and restarted 1.5 s later.
    let answered: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let started = Instant::now();
    let run = Duration::from_secs(6);
    let mut tasks = Vec::new();
    for t in 0..6usize {
        let (urls, key, answered) = (urls.clone(), acme.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut i = t;
            let mut sent = 0u64;
            while started.elapsed() < run && sent < 20_000 {
                let (node, url) = &urls[i % urls.len()];
                i += 1;
                sent += 1;
                if let Some((200, _)) = send(&c, "GET", url, &key, "").await {
                    answered.lock().unwrap().push((*node, Instant::now()));
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let killed_at = Instant::now();
    cluster.kill9(victim);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.restart(victim).await;
    for t in tasks {
        t.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let total = answered.len() as u64;
    // What the victim can have lost: its answers in the last journal interval (1 s, and
    // the journal's own write) before it died.
    let window = answered
        .iter()
        .filter(|(n, at)| {
            *n == victim
                && *at <= killed_at
                && killed_at.duration_since(*at) < Duration::from_millis(1200)
        })
        .count() as u64;

    // Every node ships its journal within a second or two; the restarted one replays its own.
    let counted = settled_usage(&cp).await - before;
    println!(
        "metering: {total} answered, {counted} counted, {} lost; the killed node answered {window} in its last journal window",
        total - counted.min(total)
    );
    assert!(counted <= total, "counted {counted} > answered {total}");
    assert!(
        total - counted <= window,
        "lost {} > the killed node's journal window {window}",
        total - counted
    );
    assert!(total > 500, "too little traffic to say anything: {total}");
}

/// Parses exact decimal text into attos.
fn atto(text: &str) -> u128 {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    whole.parse::<u128>().unwrap() * 10u128.pow(18)
        + format!("{frac:0<18}").parse::<u128>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_report_for_two_tenants_on_two_plans_equals_the_hand_computation() {
    let up = Upstream::start("u").await;
    let cluster = TestCluster::start(1, &spec(&up), &[]).await;
    let gw = cluster.node(1);
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(&cluster.token);
    cp.create_tenant("acme").await.unwrap();
    cp.create_tenant("globex").await.unwrap();
    let (acme, globex) = two_tenants(&cp, &up).await;
    // Bad prices are refused with the field, and nothing is made.
    let err = cp
        .put_plan(
            "bad",
            state::PlanPrices {
                per_gb: "-0.10".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("per_gb") && err.contains("negative"), "{err}");
    assert!(cp.list_plans().await.unwrap().plans.is_empty());
    cp.put_plan(
        "starter",
        state::PlanPrices {
            per_1k_requests: "0.50".into(),
            per_gb: "0.10".into(),
            monthly: "20".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cp.put_plan(
        "pro",
        state::PlanPrices {
            per_1k_requests: "0.25".into(),
            per_gb: "1000".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cp.assign_plan("acme", "starter").await.unwrap();
    cp.assign_plan("globex", "pro").await.unwrap();
    let url = gw.url("/orders/v1/items");
    harness::eventually("the API to serve", T, async || {
        send(&client(), "GET", &url, &acme, "").await.map(|r| r.0) == Some(200)
    })
    .await;
    // Wait for the warm-up request to be counted, then take the baseline.
    tokio::time::sleep(Duration::from_millis(2000)).await;

    // Each tenant: requests with a body of known size; the bodies that came back are
    // counted by the client.
    let c = client();
    let mut sent = [(0u64, 0u64), (0u64, 0u64)]; // (requests, bytes in and out)
    for (i, (key, n)) in [(&acme, 37u64), (&globex, 23u64)].into_iter().enumerate() {
        for _ in 0..n {
            let (status, body) = send(&c, "POST", &url, key, "0123456789").await.unwrap();
            assert_eq!(status, 200);
            sent[i].0 += 1;
            sent[i].1 += 10 + body;
        }
    }
    // acme's requests in the 24 h window include the warm-up one(s): count them from usage
    // of the minutes before, by asking usage itself for the totals and checking ours are in.
    let usage = |tenant: &'static str| {
        let cp = cp.clone();
        async move {
            cp.usage(cp::UsageQuery {
                since: "1h".into(),
                tenant: tenant.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .lines
            .into_iter()
            .map(|l| l.counts.unwrap())
            .fold(state::UsageCounts::default(), |mut a, c| {
                a.requests += c.requests;
                a.refused += c.refused;
                a.request_bytes += c.request_bytes;
                a.response_bytes += c.response_bytes;
                a
            })
        }
    };
    harness::eventually("globex's requests to be counted", T, async || {
        usage("globex").await.requests == sent[1].0
    })
    .await;
    let g = usage("globex").await;
    assert_eq!(
        g.request_bytes + g.response_bytes,
        sent[1].1,
        "globex's bytes"
    );
    let a = usage("acme").await;
    // acme also made the warm-up requests (GET, no body): the POSTs are ours exactly.
    let warmups = a.requests - sent[0].0;
    assert!(warmups >= 1 && a.request_bytes == 10 * sent[0].0, "{a:?}");

    // By hand, in attos (10^-18): starter 0.50 per 1k requests, 0.10 per GB, 20 a month;
    // pro 0.25 per 1k requests, 1000 per GB.
    let acme_expected: u128 = u128::from(a.requests) * 500_000_000 * 1_000_000
        + u128::from(a.request_bytes + a.response_bytes) * 100_000_000
        + 20 * 10u128.pow(18);
    let globex_expected: u128 =
        u128::from(sent[1].0) * 250_000_000 * 1_000_000 + u128::from(sent[1].1) * 1_000_000_000_000;
    let costs = cp
        .costs(cp::CostsQuery {
            range: Some(cp::UsageQuery {
                since: "1h".into(),
                ..Default::default()
            }),
            price_version: String::new(),
        })
        .await
        .unwrap();
    let line = |t: &str| costs.lines.iter().find(|l| l.tenant == t).unwrap().clone();
    assert_eq!(
        atto(&line("acme").total),
        acme_expected,
        "{:?}",
        line("acme")
    );
    assert_eq!(
        atto(&line("globex").total),
        globex_expected,
        "{:?}",
        line("globex")
    );
    assert_eq!(line("acme").price_versions, ["starter@1"]);
    assert_eq!(line("globex").price_versions, ["pro@1"]);
    assert_eq!(atto(&costs.totals["USD"]), acme_expected + globex_expected);

    // The CLI prints the same figures, as JSON and CSV.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .args(["--cp", &cpp.addr.to_string(), "--token", &cluster.token])
            .env("TOLLGATE_CA", cluster.ca_file())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value =
        serde_json::from_str(&cli(&["costs", "--since", "1h", "--output", "json"])).unwrap();
    let globex_json = json
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["tenant"] == "globex")
        .unwrap();
    assert_eq!(
        atto(globex_json["total"].as_str().unwrap()),
        globex_expected
    );
    let csv = cli(&["usage", "--since", "1h", "--by", "key", "--output", "csv"]);
    assert!(csv.starts_with("TENANT,KEY,REQUESTS"), "{csv}");
    assert!(csv.contains("\nglobex,"), "{csv}");
    let table = cli(&["version", "status", "orders", "--since", "1h"]);
    assert!(
        table.contains("1.0.0") && table.contains("published"),
        "{table}"
    );

    // Per-version health: every request, no errors, a p99 at or above the p50.
    let health = cp
        .version_status(cp::VersionStatusRequest {
            api: "orders".into(),
            since: "1h".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let v = &health.versions[0];
    assert_eq!(v.requests, a.requests + g.requests);
    assert_eq!(v.error_rate, 0.0);
    assert!(v.p50_ms > 0.0 && v.p99_ms >= v.p50_ms, "{v:?}");

    // Prices go up: history stays at what it was billed, unless re-rated.
    cp.put_plan(
        "pro",
        state::PlanPrices {
            per_1k_requests: "0.50".into(),
            per_gb: "2000".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rerated = cp
        .costs(cp::CostsQuery {
            range: Some(cp::UsageQuery {
                since: "1h".into(),
                tenant: "globex".into(),
                ..Default::default()
            }),
            price_version: "pro@2".into(),
        })
        .await
        .unwrap();
    assert_eq!(atto(&rerated.lines[0].total), 2 * globex_expected);
    let err = cp
        .costs(cp::CostsQuery {
            range: None,
            price_version: "pro@9".into(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no price version 9"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_cap_is_answered_402_by_every_node_within_5_s() {
    let up = Upstream::start("u").await;
    let cluster = TestCluster::start(3, &spec(&up), &[]).await;
    let addrs: Vec<_> = cluster
        .ids()
        .iter()
        .map(|&i| cluster.node(i).grpc)
        .collect();
    let cpp = CpProcess::start(&addrs).await;
    let cp = cpp.sdk(&cluster.token);
    cp.create_tenant("acme").await.unwrap();
    cp.create_tenant("globex").await.unwrap();
    let (acme, globex) = two_tenants(&cp, &up).await;
    // 1.00 per request; a budget of 5.00 with a hard cap.
    cp.put_plan(
        "metered",
        state::PlanPrices {
            per_1k_requests: "1000".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cp.assign_plan("acme", "metered").await.unwrap();
    let err = cp
        .set_budget(state::SetBudget {
            tenant: "acme".into(),
            monthly_limit: "-5".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("negative"), "{err}");
    let hook = Upstream::start("hook").await;
    cp.set_budget(state::SetBudget {
        tenant: "acme".into(),
        monthly_limit: "5".into(),
        thresholds: vec![50, 100],
        hard_cap: true,
        webhook: format!("http://{}/budget", hook.addr),
        ..Default::default()
    })
    .await
    .unwrap();
    let urls: Vec<String> = cluster
        .ids()
        .iter()
        .map(|&i| cluster.node(i).url("/orders/v1/items"))
        .collect();
    for url in &urls {
        let url = url.clone();
        let key = globex.clone();
        harness::eventually("every node to serve the API", T, async || {
            send(&client(), "GET", &url, &key, "").await.map(|r| r.0) == Some(200)
        })
        .await;
    }
    // Five requests spend the budget.
    let c = client();
    for i in 0..5 {
        let r = send(&c, "GET", &urls[i % 3], &acme, "").await.unwrap();
        assert_eq!(r.0, 200);
    }
    let spent_at = Instant::now();
    let mut capped_on = vec![None; urls.len()];
    while spent_at.elapsed() < Duration::from_secs(10) && capped_on.iter().any(Option::is_none) {
        for (i, url) in urls.iter().enumerate() {
            if capped_on[i].is_none() {
                let req = Request::get(url)
                    .header("x-api-key", &acme)
                    .body(full(""))
                    .unwrap();
                let resp = c.request(req).await.unwrap();
                if resp.status() == 402 {
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(json["error"]["code"], "budget_exceeded", "{json}");
                    capped_on[i] = Some(spent_at.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slowest = capped_on
        .iter()
        .map(|c| c.expect("every node capped within 10 s"))
        .max()
        .unwrap();
    println!("budget cap: 402 on every node {slowest:?} after the budget was spent");
    assert!(slowest <= Duration::from_secs(5), "{capped_on:?}");
    // Another tenant is not touched.
    assert_eq!(send(&c, "GET", &urls[0], &globex, "").await.unwrap().0, 200);
    let budgets = cp.list_budgets().await.unwrap();
    let alerted: Vec<u32> = budgets.alerts.iter().map(|a| a.threshold).collect();
    assert_eq!(alerted, [50, 100]);
    assert!(budgets.budgets[0].budget.as_ref().unwrap().capped);
    // The leader told each alert once: a POST to the webhook, and its counter.
    harness::eventually("both alerts at the webhook", T, async || hook.hits() == 2).await;
    let content_type =
        hook.state.last_headers.lock().unwrap().as_ref().unwrap()["content-type"].clone();
    assert_eq!(content_type, "application/json");
    let leader = cluster.leader(T).await;
    let metrics = cluster.node(leader).metrics().await;
    assert!(
        metrics.contains("tollgate_budget_alerts_total{tenant=\"acme\",threshold=\"100\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("budget"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Raising the budget lifts the cap everywhere.
    cp.set_budget(state::SetBudget {
        tenant: "acme".into(),
        monthly_limit: "1000".into(),
        hard_cap: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for url in &urls {
        let url = url.clone();
        let key = acme.clone();
        harness::eventually("the cap to be lifted", T, async || {
            send(&client(), "GET", &url, &key, "").await.map(|r| r.0) == Some(200)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_inside_an_api_version_is_counted_under_the_callers_tenant() {
    let up = Upstream::start("u").await;
    let cluster = TestCluster::start(1, &spec(&up), &["--meter-interval", "200ms"]).await;
    let cpp = CpProcess::start(&[cluster.node(1).grpc]).await;
    let cp = cpp.sdk(&cluster.token);
    cp.create_tenant("acme").await.unwrap();
    // A version whose only route is /items: /shop/v1/nothing is a 404 inside it.
    publish_api(&cp, "shop", "/items", &up).await;
    let key = cp.create_key("acme", "k", "").await.unwrap().secret;
    let c = client();
    let url = |path: &str| cluster.node(1).url(path);
    harness::eventually("the version to be served", T, async || {
        send(&c, "GET", &url("/shop/v1/items/1"), &key, "")
            .await
            .map(|r| r.0)
            == Some(200)
    })
    .await;
    for _ in 0..3 {
        let r = send(&c, "GET", &url("/shop/v1/nothing"), &key, "").await;
        assert_eq!(r.map(|r| r.0), Some(404));
    }
    let lines = || async {
        cp.usage(cp::UsageQuery {
            since: "1h".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .lines
    };
    harness::eventually("the 404s to be counted", T, async || {
        lines()
            .await
            .iter()
            .any(|l| l.tenant == "acme" && l.counts.as_ref().is_some_and(|c| c.class_4xx >= 3))
    })
    .await;
    let anonymous: Vec<_> = lines()
        .await
        .into_iter()
        .filter(|l| l.tenant != "acme")
        .collect();
    assert!(
        anonymous.is_empty(),
        "counted without the caller's tenant: {anonymous:?}"
    );
}
