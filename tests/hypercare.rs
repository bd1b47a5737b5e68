//! The hypercare loop (docs/hypercare.md): `tollgate analyze` against the rollups.

mod harness;

use std::time::Duration;

use harness::cp::CpProcess;
use harness::{Body, GatewayProcess, Upstream, eventually, full};
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_sdk::{cp, state};

const T: Duration = Duration::from_secs(30);

async fn get(c: &Client<HttpConnector, Body>, url: &str, key: &str) -> u16 {
    let req = Request::get(url)
        .header("x-api-key", key)
        .body(full(""))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    status
}

/// Version 1.1.0 of an API fails a quarter of its calls (a route to a closed port); the
/// analysis by version shows its error rate, its top error, its latency and cost, against
/// 1.0.0 as the baseline, with the same figures the usage and cost reports give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_compares_a_version_with_the_one_before_from_the_rollups() {
    let up = Upstream::start("u").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = GatewayProcess::start_with(
        &harness::allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &["--meter-interval", "100ms"],
    )
    .await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(gw.operator_token());
    cp.create_tenant("acme").await.unwrap();
    cp.create_api(
        "orders",
        "acme",
        Some(state::ApiSettings {
            base_path: "/orders".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let v1 = format!(
        "upstreams: {{ o: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ r: {{ match: {{ path: {{ prefix: / }} }}, upstream: o }} }}\n",
        up.addr
    );
    let v2 = format!(
        "upstreams: {{ o: {{ endpoints: [{{ address: \"{}\" }}] }}, gone: {{ endpoints: [{{ address: \"{closed}\" }}] }} }}\nroutes: {{ bad: {{ match: {{ path: {{ prefix: /bad }} }}, upstream: gone }}, r: {{ match: {{ path: {{ prefix: / }} }}, upstream: o }} }}\n",
        up.addr
    );
    cp.create_version("orders", "1.0.0", &v1).await.unwrap();
    cp.publish("orders", "1.0.0").await.unwrap();
    cp.create_version("orders", "2.0.0", &v2).await.unwrap();
    cp.publish("orders", "2.0.0").await.unwrap();
    cp.put_plan(
        "p",
        state::PlanPrices {
            per_1k_requests: "2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cp.assign_plan("acme", "p").await.unwrap();
    let key = cp.create_key("acme", "a", "").await.unwrap().secret;
    let c: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let url = |path: &str| gw.url(path);
    let k = key.clone();
    eventually("both versions served", T, async || {
        get(&c, &url("/orders/v1/x"), &k).await == 200
            && get(&c, &url("/orders/v2/x"), &k).await == 200
    })
    .await;
    let started = std::time::SystemTime::now();
    // 1.0.0: 40 good calls. 2.0.0: 30 good, 10 to the closed port.
    for i in 0..40 {
        assert_eq!(get(&c, &url(&format!("/orders/v1/{i}")), &key).await, 200);
        let path = if i % 4 == 0 {
            "/orders/v2/bad"
        } else {
            "/orders/v2/ok"
        };
        let status = get(&c, &url(path), &key).await;
        assert_eq!(status == 200, i % 4 != 0, "{path}: {status}");
    }
    // From the minute the calls started (whole minutes), so the warm-up may be in it:
    // compare with the usage report of the same range rather than with the counts sent.
    let since = humantime::format_rfc3339_seconds(started - Duration::from_secs(1)).to_string();
    let query = cp::AnalyzeQuery {
        since: since.clone(),
        ..Default::default()
    };
    let v2_of = |r: &cp::AnalyzeReply| {
        r.groups
            .iter()
            .find(|g| g.api == "orders" && g.version == "2.0.0")
            .cloned()
    };
    eventually("the calls shipped and rolled up", T, async || {
        let r = cp.analyze(query.clone()).await.unwrap();
        v2_of(&r).is_some_and(|g| g.figures.unwrap().errors >= 10)
            && r.groups
                .iter()
                .any(|g| g.version == "1.0.0" && g.figures.as_ref().unwrap().requests >= 40)
    })
    .await;
    let r = cp.analyze(query.clone()).await.unwrap();
    assert_eq!(
        (r.bucket.as_str(), r.baseline.as_str()),
        ("minute", "previous_version")
    );
    let v2 = v2_of(&r).unwrap();
    let f = v2.figures.clone().unwrap();
    assert_eq!(f.errors, 10);
    assert_eq!(f.top_errors[0].code, "upstream_connect_failed");
    assert_eq!(f.top_errors[0].count, 10);
    assert!(f.p50_ms > 0.0 && f.p95_ms >= f.p50_ms && f.p99_ms >= f.p95_ms);
    assert_eq!(v2.baseline_of, "1.0.0");
    let base = v2.baseline.clone().unwrap();
    assert_eq!(base.errors, 0);
    assert!(base.requests >= 40);
    assert!((f.error_rate - 10.0 / f.requests as f64).abs() < 1e-9);
    // The series adds up to the group.
    let total: u64 = v2.series.iter().map(|p| p.requests).sum();
    assert_eq!(total, f.requests);
    // Equal to what the usage and cost reports say of the same range.
    let usage = cp
        .usage(cp::UsageQuery {
            since: since.clone(),
            group_by: "version".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (requests, errors) = usage
        .lines
        .iter()
        .filter(|l| l.group == "orders@2.0.0")
        .map(|l| l.counts.clone().unwrap_or_default())
        .fold((0, 0), |(r, e), c| (r + c.requests, e + c.class_5xx));
    assert_eq!((requests, errors), (f.requests, f.errors));
    let by_tenant = cp
        .analyze(cp::AnalyzeQuery {
            since: since.clone(),
            group_by: "tenant".into(),
            baseline: "none".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let acme = by_tenant
        .groups
        .iter()
        .find(|g| g.tenant == "acme")
        .unwrap();
    let costs = cp
        .costs(cp::CostsQuery {
            range: Some(cp::UsageQuery {
                since: since.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let line = costs.lines.iter().find(|l| l.tenant == "acme").unwrap();
    let figures = acme.figures.clone().unwrap();
    assert_eq!(figures.cost, line.total, "{figures:?} {line:?}");
    assert_eq!(figures.currency, line.currency);
    assert!(acme.baseline.is_none());
    // Asking for what cannot be: a clear refusal.
    let bad = cp
        .analyze(cp::AnalyzeQuery {
            group_by: "tenant".into(),
            baseline: "previous_version".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(tonic::Code::InvalidArgument), "{bad}");
    // The CLI prints the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "analyze", "--since", &since, "--api", "orders", "--output", "json",
        ])
        .args([
            "--cp",
            &cpp.addr.to_string(),
            "--token",
            gw.operator_token(),
        ])
        .env("TOLLGATE_CA", gw.ca_file())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = json["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["version"] == "2.0.0")
        .unwrap();
    assert_eq!(g["figures"]["errors"], 10);
    assert_eq!(g["baseline_of"], "1.0.0");

    // The hypercare report: every section, with the rollups' figures.
    let report = |format: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["report", "--since", &since, "--format", format])
            .args([
                "--cp",
                &cpp.addr.to_string(),
                "--token",
                gw.operator_token(),
            ])
            .env("TOLLGATE_CA", gw.ca_file())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let md = report("md");
    for section in [
        "# Hypercare report",
        "## Summary",
        "## Releases and rollouts",
        "## Versions",
        "## Top errors",
        "## Slowest routes",
        "## Cost",
        "## Alerts",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    let row = md
        .lines()
        .find(|l| l.starts_with("| orders@2.0.0 | "))
        .unwrap_or_else(|| panic!("no row for 2.0.0:\n{md}"));
    let cells: Vec<&str> = row.split(" | ").collect();
    assert_eq!(cells[1], f.requests.to_string(), "{row}");
    assert!(row.contains("upstream_connect_failed 10"), "{row}");
    let errors_row = md
        .lines()
        .find(|l| l.starts_with("| orders@2.0.0 | upstream_connect_failed | 10 |"))
        .unwrap_or_else(|| panic!("no top-error row:\n{md}"));
    assert!(
        errors_row.matches(char::is_alphanumeric).count() > 40,
        "sample calls: {errors_row}"
    );
    let acme_cost = md
        .lines()
        .find(|l| l.starts_with("| acme | "))
        .unwrap_or_else(|| panic!("no cost row for acme:\n{md}"));
    assert!(
        acme_cost.contains(&line.total),
        "{acme_cost} against {}",
        line.total
    );
    let html = report("html");
    assert!(
        html.starts_with("<!doctype html>") && html.contains("<svg"),
        "{html}"
    );
    assert!(
        !html.contains("src=") && !html.contains("href="),
        "no external assets"
    );
}

/// A version at 0% errors that starts failing 30% of its calls is alerted on after the
/// minute is over: through the webhook (a named secret of its tenant), the audit log, with
/// sample calls and the logs command; and only once (the quiet period bounds flapping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_starts_failing_raises_one_alert_with_its_calls() {
    let ok = Upstream::start("ok").await;
    let flaky = Upstream::start("flaky").await;
    // The webhook: a server that keeps what it is sent.
    let (hook_addr, hooked) = harness::webhook_sink().await;
    let gw = GatewayProcess::start_with(
        &harness::allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &["--meter-interval", "100ms"],
    )
    .await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(gw.operator_token());
    cp.create_tenant("acme").await.unwrap();
    gw.sdk()
        .await
        .with_token(Some(gw.operator_token()))
        .unwrap()
        .put_secret(
            "acme.hook",
            format!("http://{hook_addr}/alerts").into_bytes(),
        )
        .await
        .unwrap();
    cp.create_api(
        "orders",
        "acme",
        Some(state::ApiSettings {
            base_path: "/orders".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    // Calls to /e/0 .. /e/29 go to `flaky`, the rest to `ok`.
    let mut routes = String::new();
    for j in 0..30 {
        routes +=
            &format!("  f{j}: {{ match: {{ path: {{ prefix: /e/{j} }} }}, upstream: flaky }}\n");
    }
    let content = format!(
        "upstreams: {{ ok: {{ endpoints: [{{ address: \"{}\" }}] }}, flaky: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes:\n{routes}  rest: {{ match: {{ path: {{ prefix: / }} }}, upstream: ok }}\nalerts: {{ metrics: [errors], baseline: 10m, quiet_for: 1h, webhook_secret: hook }}\n",
        ok.addr, flaky.addr
    );
    cp.create_version("orders", "1.0.0", &content)
        .await
        .unwrap();
    cp.publish("orders", "1.0.0").await.unwrap();
    let key = cp.create_key("acme", "a", "").await.unwrap().secret;
    let c: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let k = key.clone();
    eventually("served", T, async || {
        get(&c, &gw.url("/orders/v1/e/50"), &k).await == 200
    })
    .await;
    // Healthy into the next minute (the history is the complete minutes before the
    // current one), then failing.
    let minute_of = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 60
    };
    let first = minute_of();
    let secs_left = 60
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 60;
    // A history of at least 10 s of healthy calls (about 200).
    let flip_at = if secs_left < 10 { first + 2 } else { first + 1 };
    let mut i = 0u64;
    let mut failing = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        if !failing && minute_of() >= flip_at {
            flaky
                .state
                .fail_with
                .store(503, std::sync::atomic::Ordering::SeqCst);
            failing = true;
        }
        if failing && !hooked.lock().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no alert");
        let _ = get(&c, &gw.url(&format!("/orders/v1/e/{}", i % 100)), &key).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let event = hooked.lock().unwrap()[0].clone();
    assert_eq!(event["kind"], "alert");
    assert_eq!(event["action"], "raise");
    assert_eq!(
        (
            event["api"].as_str(),
            event["version"].as_str(),
            event["metric"].as_str()
        ),
        (Some("orders"), Some("1.0.0"), Some("errors"))
    );
    // Stored with its calls and the command that lists the rest, and audited.
    let mut node = gw
        .sdk()
        .await
        .with_token(Some(gw.operator_token()))
        .unwrap();
    let alerts = node
        .rollouts(tollgate_sdk::node::RolloutsRequest {
            api: "orders".into(),
            local: false,
        })
        .await
        .unwrap()
        .alerts;
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert!(a.firing);
    let raise = a.raise.as_ref().unwrap();
    assert!(raise.statistic >= raise.log_threshold);
    assert!(!raise.calls.is_empty() && raise.calls.iter().all(|c| c.status == 503));
    assert!(
        raise
            .logs_command
            .starts_with("tollgate logs --api orders --api-version 1.0.0"),
        "{}",
        raise.logs_command
    );
    let audit = cp.audit(cp::AuditQuery::default()).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "alert.raise" && e.object == "orders@1.0.0/errors")
    );
    // One alert, however long it keeps failing (the quiet period): a few more seconds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(hooked.lock().unwrap().len(), 1);
}
