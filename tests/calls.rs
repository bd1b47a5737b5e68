//! The call log end to end (docs/calls.md): requests served by three nodes are found
//! through the control plane and the CLI, by id, trace, status, slowness and tenant; what
//! a version captures is redacted, and nothing beyond the record is kept by default; a
//! tenant sees its own calls only; a node that is down is named, not silently left out;
//! `--follow` prints new calls as they are served.

mod harness;

use std::io::BufRead;
use std::time::Duration;

use harness::cluster::TestCluster;
use harness::cp::CpProcess;
use harness::{Body, Upstream, eventually, full};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_sdk::node::{CallQuery, CallRecord};
use tollgate_sdk::state;

const T: Duration = Duration::from_secs(30);

fn spec(up: &Upstream) -> String {
    harness::allowing_loopback(&format!(
        "upstreams:\n  u: {{ endpoints: [{{ address: \"{}\" }}] }}\nroutes:\n  plain: {{ match: {{ path: {{ prefix: /plain }} }}, upstream: u }}\n",
        up.addr
    ))
}

/// Sends a request; returns its status and the `x-request-id` it was answered with.
async fn send(c: &Client<HttpConnector, Body>, req: Request<Body>) -> (u16, String) {
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let _ = resp.into_body().collect().await;
    (status, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_every_node_are_found_by_id_trace_status_and_slowness() {
    let up = Upstream::start("u").await;
    let mut cluster = TestCluster::start(3, &spec(&up), &[]).await;
    let grpc: Vec<_> = (1..=3).map(|id| cluster.node(id).grpc).collect();
    let cpp = CpProcess::start(&grpc).await;
    let cp = cpp.sdk(&cluster.token);
    // API `orders` of acme: its version keeps headers and bodies (64 bytes), `ssn` redacted.
    cp.create_tenant("acme").await.unwrap();
    cp.create_tenant("globex").await.unwrap();
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
    let content = format!(
        "upstreams: {{ o: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ r: {{ match: {{ path: {{ prefix: / }} }}, upstream: o }} }}\ncall_log: {{ headers: true, bodies: true, max_body_bytes: 64, redact_fields: [ssn] }}\n",
        up.addr
    );
    cp.create_version("orders", "1.0.0", &content)
        .await
        .unwrap();
    cp.publish("orders", "1.0.0").await.unwrap();
    cp.subscribe("globex", "orders", "*").await.unwrap();
    let acme = cp.create_key("acme", "a", "").await.unwrap().secret;
    let globex = cp.create_key("globex", "g", "").await.unwrap().secret;
    let c: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let url = |id: u64, path: &str| format!("http://{}{path}", cluster.node(id).proxy);
    // Served everywhere before the test's own requests.
    for id in 1..=3 {
        let key = acme.clone();
        let u = url(id, "/orders/v1/ready");
        eventually("orders served", T, async || {
            let req = Request::get(&u)
                .header("x-api-key", &key)
                .body(full(""))
                .unwrap();
            send(&c, req).await.0 == 200
        })
        .await;
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;

    // 20 requests on each node: plain ones, API calls of both tenants, and 404s.
    let mut sent: Vec<(u64, u16, String)> = Vec::new();
    for id in 1..=3u64 {
        for i in 0..20 {
            let req = match i % 4 {
                0 => Request::get(url(id, &format!("/plain/{i}"))).body(full("")),
                1 => Request::get(url(id, &format!("/orders/v1/{i}")))
                    .header("x-api-key", &acme)
                    .body(full("")),
                2 => Request::get(url(id, &format!("/orders/v1/{i}")))
                    .header("x-api-key", &globex)
                    .body(full("")),
                _ => Request::get(url(id, &format!("/nowhere/{i}"))).body(full("")),
            }
            .unwrap();
            let (status, rid) = send(&c, req).await;
            assert_eq!(rid.len(), 32, "every answer names its request id");
            sent.push((id, status, rid));
        }
    }
    // One traced call, and one with a body to redact.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (_, traced) = send(
        &c,
        Request::post(url(2, "/orders/v1/pay"))
            .header("x-api-key", &acme)
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
            .header("x-customer", "visible")
            .body(full(
                r#"{"amount":5,"password":"hunter2","ssn":"078-05-1120"}"#,
            ))
            .unwrap(),
    )
    .await;
    let total = sent.len() + 1;

    let all = async |q: CallQuery| cp.query_calls(q).await.unwrap();
    let since = CallQuery {
        since_us: started,
        limit: 1000,
        ..Default::default()
    };
    eventually("every call recorded", T, async || {
        all(since.clone()).await.records.len() == total
    })
    .await;
    let reply = all(since.clone()).await;
    assert_eq!(reply.nodes, 3);
    assert!(reply.missing.is_empty(), "{:?}", reply.missing);
    let on = |n: u64| reply.records.iter().filter(|r| r.node_id == n).count();
    assert_eq!((on(1), on(2), on(3)), (20, 21, 20));
    assert!(
        reply
            .records
            .windows(2)
            .all(|w| w[0].time_us >= w[1].time_us),
        "newest first"
    );

    // By request id: exactly that call, from the node that served it.
    for (node, status, rid) in [&sent[5], &sent[33], &sent[59]] {
        let r = all(CallQuery {
            request_id: rid.clone(),
            ..Default::default()
        })
        .await;
        assert_eq!(r.records.len(), 1, "{rid}");
        assert_eq!(r.records[0].node_id, *node);
        assert_eq!(r.records[0].status, u32::from(*status));
    }
    // By trace: the traced call, with what its version keeps, redacted.
    let r = all(CallQuery {
        trace_id: trace.into(),
        ..Default::default()
    })
    .await;
    assert_eq!(r.records.len(), 1);
    let pay: &CallRecord = &r.records[0];
    assert_eq!(pay.request_id, traced);
    assert_eq!(
        (pay.api.as_str(), pay.version.as_str(), pay.tenant.as_str()),
        ("orders", "1.0.0", "acme")
    );
    assert!(
        !pay.key_id.is_empty() && pay.key_id != acme,
        "the key's id, never its secret"
    );
    let body = String::from_utf8_lossy(&pay.request_body);
    assert!(body.contains(r#""amount":5"#), "{body}");
    assert!(
        !body.contains("hunter2") && !body.contains("078-05"),
        "{body}"
    );
    let header = |name: &str| {
        pay.request_headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.clone())
    };
    assert_eq!(header("x-api-key").as_deref(), Some("[redacted]"));
    assert_eq!(header("x-customer").as_deref(), Some("visible"));
    assert!(!pay.response_headers.is_empty());
    // A route with no call_log keeps the record only.
    let plain = reply.records.iter().find(|r| r.route == "plain").unwrap();
    assert!(plain.request_headers.is_empty() && plain.request_body.is_empty());
    assert!(plain.response_body.is_empty());

    // By status, and the slowest.
    let r = all(CallQuery {
        since_us: started,
        status: "404".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(r.records.len(), 15);
    assert!(
        r.records
            .iter()
            .all(|r| r.status == 404 && r.error == "route_not_found")
    );
    let r = all(CallQuery {
        since_us: started,
        slowest: 5,
        ..Default::default()
    })
    .await;
    assert_eq!(r.records.len(), 5);
    assert!(
        r.records
            .windows(2)
            .all(|w| w[0].duration_us >= w[1].duration_us)
    );
    let slowest_all = reply.records.iter().map(|r| r.duration_us).max().unwrap();
    assert_eq!(r.records[0].duration_us, slowest_all);

    // A tenant token sees its own tenant's calls, and may not ask for another's.
    let acme_token = cp.create_token("acme", "t", "").await.unwrap().secret;
    let as_acme = cpp.sdk(&acme_token);
    let r = as_acme.query_calls(since.clone()).await.unwrap();
    assert_eq!(r.records.len(), 16, "acme's 15 calls and the traced one");
    assert!(r.records.iter().all(|r| r.tenant == "acme"));
    let refused = as_acme
        .query_calls(CallQuery {
            tenant: "globex".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(tonic::Code::PermissionDenied),
        "{refused}"
    );
    let bad = cp
        .query_calls(CallQuery {
            status: "6xx".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(tonic::Code::InvalidArgument), "{bad}");

    // The CLI: one call by id as JSON, the log as CSV, and --follow.
    let cli = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("logs")
            .args(["--cp", &cpp.addr.to_string(), "--token", &cluster.token])
            .env("TOLLGATE_CA", cluster.ca_file());
        cmd
    };
    let out = cli()
        .args(["--request-id", &traced, "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(line["request_id"], traced);
    assert_eq!(line["trace_id"], trace);
    assert_eq!(line["status"], 200);
    let out = cli()
        .args(["--since", "10m", "--status", "4xx", "--output", "csv"])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.starts_with("time,node,request_id,"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 15, "{csv}");
    let mut follow = cli()
        .args(["--follow", "--output", "json", "--api", "orders"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    // The follower starts from each node's current end; what is sent after it is printed.
    let mut new_ids = Vec::new();
    let deadline = std::time::Instant::now() + T;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "follow printed {seen:?} of {new_ids:?}"
        );
        if new_ids.len() < 3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let id = new_ids.len() as u64 + 1;
            let req = Request::get(url(id, "/orders/v1/followed"))
                .header("x-api-key", &acme)
                .body(full(""))
                .unwrap();
            new_ids.push(send(&c, req).await.1);
        }
        while let Ok(line) = lines_rx.try_recv() {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["api"], "orders");
            if let Some(id) = v["request_id"].as_str()
                && new_ids.iter().any(|n| n == id)
            {
                seen.insert(id.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = follow.kill();
    let _ = follow.wait();

    // A node that is down is named; the others' calls are still returned.
    cluster.kill9(3);
    let r = all(since.clone()).await;
    assert_eq!(r.missing.len(), 1, "{:?}", r.missing);
    assert!(r.missing[0].starts_with("node 3 "), "{:?}", r.missing);
    assert!(r.records.iter().all(|r| r.node_id != 3));
    assert!(r.records.len() >= 41);
}
