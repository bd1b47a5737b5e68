//! OpenTelemetry traces against a real collector (rotel, from PyPI): a request's trace
//! crosses client -> gateway -> upstream with one trace id, with the HTTP semantic
//! conventions, `tollgate.*` attributes and the node's resource; OTLP over gRPC and
//! http/protobuf; a control-plane call followed onto every node that applies it; and bad
//! input (malformed `traceparent`, invalid endpoints and samplers).

mod harness;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use harness::cluster::TestCluster;
use harness::collector::{Collector, ReceivedSpan};
use harness::cp::CpProcess;
use harness::{GatewayProcess, TestResponse, Upstream, full};
use http::Request;
use tollgate_sdk::state;

const T: Duration = Duration::from_secs(20);
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The cluster's spec, with loopback opened to API versions: the traced API's version
/// sends requests to a test upstream on 127.0.0.1 (`harness::allowing_loopback`).
fn spec(up: &Upstream) -> String {
    harness::allowing_loopback(&format!(
        r#"
upstreams:
  u: {{ endpoints: [{{ address: "{addr}" }}] }}
routes:
  plain: {{ match: {{ path: {{ prefix: /plain }} }}, upstream: u, rewrite: {{ strip_prefix: true }} }}
  limited: {{ match: {{ path: {{ prefix: /limited }} }}, upstream: u }}
quotas:
  one: {{ scope: key, limit: 1, window: minute, routes: [limited] }}
"#,
        addr = up.addr
    ))
}

async fn get(gw: &GatewayProcess, path: &str, headers: &[(&str, &str)]) -> TestResponse {
    let mut req = Request::get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    gw.send(req.body(full("")).unwrap()).await
}

fn by_path<'a>(spans: &'a [ReceivedSpan], path: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.kind == "SPAN_KIND_SERVER" && s.attr("url.path") == path)
}

fn child_of<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.parent_id == parent.id && s.trace_id == parent.trace_id)
}

/// The traceparent the upstream got last.
fn upstream_traceparent(up: &Upstream) -> String {
    up.state
        .last_headers
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_traced_from_client_through_gateway_to_upstream() {
    let col = Collector::start().await;
    let up = Upstream::start("u").await;
    let gw = GatewayProcess::start_with(
        &spec(&up),
        &[
            "--otlp-endpoint",
            &col.grpc_url(),
            "--region",
            "eu",
            "--environment",
            "staging",
        ],
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
    let content = format!(
        "upstreams: {{ o: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ items: {{ match: {{ path: {{ template: \"/items/{{id}}\" }} }}, upstream: o }} }}\n",
        up.addr
    );
    cp.create_version("orders", "1.0.0", &content)
        .await
        .unwrap();
    cp.publish("orders", "1.0.0").await.unwrap();
    let key = cp.create_key("acme", "t", "").await.unwrap().secret;
    harness::eventually("the API to serve", T, async || {
        get(&gw, "/orders/v1/items/0", &[("x-api-key", &key)])
            .await
            .status
            == 200
    })
    .await;

    // A caller's unsampled trace: nothing is exported, and the upstream gets the header as
    // it came.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = format!("00-{unsampled_trace}-b7ad6b7169203331-00");
    let r = get(&gw, "/plain/unsampled", &[("traceparent", &unsampled)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(upstream_traceparent(&up), unsampled);

    // The caller's trace continues through the gateway to the upstream.
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let r = get(
        &gw,
        "/orders/v1/items/7",
        &[
            ("x-api-key", &key),
            ("traceparent", &tp),
            ("tracestate", "vendor=x"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let sent = upstream_traceparent(&up);
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", CLIENT_TRACE, "01"),
        "the upstream continues the caller's trace: {sent}"
    );
    assert_ne!(parts[2], CLIENT_SPAN, "with the gateway's span as parent");
    let state = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(state.get("tracestate").unwrap(), "vendor=x");

    // The quota's refusal, and an upstream failure.
    assert_eq!(get(&gw, "/limited/a", &[]).await.status, 200);
    let refused = get(&gw, "/limited/b", &[]).await;
    assert_eq!(refused.status, 429);
    assert_eq!(get(&gw, "/plain/status/503", &[]).await.status, 503);

    // Malformed traceparents start a new trace; the upstream gets a valid one.
    let bad = [
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ];
    for (i, b) in bad.iter().enumerate() {
        let r = get(&gw, &format!("/plain/bad-{i}"), &[("traceparent", b)]).await;
        assert_eq!(r.status, 200, "traceparent {b:?}");
        let sent = upstream_traceparent(&up);
        assert!(
            sent.len() == 55 && sent.starts_with("00-") && !sent.contains(CLIENT_TRACE),
            "traceparent {b:?} became {sent:?}"
        );
    }

    let spans = col
        .wait_for("every request's spans", |s| {
            by_path(s, "/orders/v1/items/7").is_some()
                && by_path(s, "/limited/b").is_some()
                && by_path(s, "/plain/status/503").is_some()
                && (0..bad.len()).all(|i| by_path(s, &format!("/plain/bad-{i}")).is_some())
        })
        .await;

    // SERVER span: the caller's span is its parent, with the HTTP conventions and ours.
    let server = by_path(&spans, "/orders/v1/items/7").unwrap();
    assert_eq!(server.trace_id, CLIENT_TRACE);
    assert_eq!(server.parent_id, CLIENT_SPAN);
    assert_eq!(server.name, "GET /items/{id}");
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", "/orders/v1/items/7"),
        ("http.route", "/items/{id}"),
        ("http.response.status_code", "200"),
        ("server.address", "127.0.0.1"),
        ("network.peer.address", "127.0.0.1"),
        ("tollgate.tenant", "acme"),
        ("tollgate.api", "orders"),
        ("tollgate.api_version", "1.0.0"),
        ("tollgate.route", "orders@1.0.0/items"),
        ("tollgate.quota.decision", "none"),
        ("tollgate.circuit.state", "none"),
    ] {
        assert_eq!(server.attr(k), v, "{k} in {:#?}", server.attributes);
    }
    assert!(!server.attributes.contains_key("error.type"));
    for (k, v) in [
        ("service.name", "tollgate-node"),
        ("service.version", env!("CARGO_PKG_VERSION")),
        ("service.instance.id", "node-1"),
        ("cloud.region", "eu"),
        ("deployment.environment", "staging"),
    ] {
        assert_eq!(
            server.resource.get(k).map(String::as_str),
            Some(v),
            "resource {k}: {:#?}",
            server.resource
        );
    }

    // CLIENT span: child of the SERVER span, and the parent the upstream was given.
    let client = child_of(&spans, server).expect("a CLIENT span under the SERVER span");
    assert_eq!(client.kind, "SPAN_KIND_CLIENT");
    assert_eq!(
        client.id, parts[2],
        "the upstream's parent is the CLIENT span"
    );
    assert_eq!(client.attr("server.address"), "127.0.0.1");
    assert_eq!(client.attr("server.port"), up.addr.port().to_string());
    assert_eq!(client.attr("http.response.status_code"), "200");

    // The refusal and the failure say why; the refusal never reached an upstream.
    let refused = by_path(&spans, "/limited/b").unwrap();
    assert_eq!(refused.attr("tollgate.quota.decision"), "refused");
    assert_eq!(refused.attr("error.type"), "quota_exceeded");
    assert_eq!(refused.attr("http.response.status_code"), "429");
    assert!(child_of(&spans, refused).is_none());
    assert_eq!(
        by_path(&spans, "/limited/a")
            .unwrap()
            .attr("tollgate.quota.decision"),
        "admitted"
    );
    let failed = by_path(&spans, "/plain/status/503").unwrap();
    assert_eq!(failed.status, "STATUS_CODE_ERROR");
    assert_eq!(failed.attr("error.type"), "503");
    assert_eq!(child_of(&spans, failed).unwrap().attr("error.type"), "503");

    // Malformed traceparents: roots of new traces.
    for i in 0..bad.len() {
        let s = by_path(&spans, &format!("/plain/bad-{i}")).unwrap();
        assert!(s.parent_id.is_empty(), "{s:#?}");
        assert_ne!(s.trace_id, CLIENT_TRACE);
    }
    assert!(
        spans.iter().all(|s| s.trace_id != unsampled_trace),
        "a trace its caller did not sample is not exported"
    );

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_trace_spans_total{outcome=\"exported\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_also_go_over_http_protobuf() {
    let col = Collector::start().await;
    let up = Upstream::start("u").await;
    let gw = GatewayProcess::start_with(
        &spec(&up),
        &[
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-endpoint",
            &col.http_url(),
        ],
    )
    .await;
    assert_eq!(get(&gw, "/plain/over-http", &[]).await.status, 200);
    let spans = col
        .wait_for("the span sent over http/protobuf", |s| {
            by_path(s, "/plain/over-http").is_some()
        })
        .await;
    let s = by_path(&spans, "/plain/over-http").unwrap();
    assert_eq!(s.resource["service.name"], "tollgate-node");
    assert!(child_of(&spans, s).is_some());
}

/// Adds the operator token and a traceparent to every call of a generated client.
#[derive(Clone)]
struct TokenAndTrace(String, String);

impl tonic::service::Interceptor for TokenAndTrace {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let m = req.metadata_mut();
        m.insert(
            "authorization",
            format!("Bearer {}", self.0).parse().unwrap(),
        );
        m.insert("traceparent", self.1.parse().unwrap());
        Ok(req)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_call_is_followed_onto_every_node_that_applies_it() {
    let col = Collector::start().await;
    let up = Upstream::start("u").await;
    let url = col.grpc_url();
    let cluster = TestCluster::start(3, &spec(&up), &["--otlp-endpoint", &url]).await;
    // The control plane talks to a follower, so the write is forwarded to the leader.
    let leader = cluster.leader(T).await;
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let cpp =
        CpProcess::start_with(&[cluster.node(follower).grpc], &["--otlp-endpoint", &url]).await;
    let token = cluster.node(1).operator_token().to_string();
    let trace = "5b8efff798038103d269b633813fc60c";
    let caller = "eee19b7ec3c1b174";
    let channel = cpp.channel().await;
    let mut access = tollgate_proto::cp::v1::access_client::AccessClient::with_interceptor(
        channel,
        TokenAndTrace(token, format!("00-{trace}-{caller}-01")),
    );
    access
        .create_tenant(tollgate_proto::cp::v1::CreateTenantRequest {
            name: "traced".into(),
        })
        .await
        .unwrap();

    let in_trace = |s: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        s.iter().filter(|x| x.trace_id == trace).cloned().collect()
    };
    let spans = col
        .wait_for("the call's spans from the CP and all 3 nodes", |s| {
            let t = in_trace(s);
            let appliers: HashSet<&str> = t
                .iter()
                .filter(|x| x.name == "raft.apply")
                .map(|x| x.resource["service.instance.id"].as_str())
                .collect();
            appliers.len() == 3
                && t.iter().any(|x| x.name == "forward to leader")
                && t.iter()
                    .any(|x| x.name == "tollgate.cp.v1.Access/CreateTenant")
        })
        .await;
    let t = in_trace(&spans);
    let find = |name: &str, instance: &str| {
        t.iter()
            .find(|x| x.name == name && x.resource["service.instance.id"].as_str() == instance)
            .unwrap_or_else(|| panic!("no {name} span from {instance}: {t:#?}"))
    };
    let cp_span = t
        .iter()
        .find(|x| x.name == "tollgate.cp.v1.Access/CreateTenant")
        .unwrap();
    assert_eq!(cp_span.resource["service.name"], "tollgate-cp");
    assert_eq!(cp_span.kind, "SPAN_KIND_SERVER");
    assert_eq!(cp_span.parent_id, caller);
    assert_eq!(cp_span.attr("rpc.system"), "grpc");
    let call = child_of(&t, cp_span).expect("the CP's call to a node");
    assert_eq!(call.name, "call node");
    assert_eq!(call.kind, "SPAN_KIND_CLIENT");
    let on_follower = find(
        "tollgate.node.v1.NodeAdmin/Write",
        &format!("node-{follower}"),
    );
    assert_eq!(on_follower.parent_id, call.id);
    let forward = find("forward to leader", &format!("node-{follower}"));
    assert_eq!(forward.parent_id, on_follower.id);
    let on_leader = find(
        "tollgate.node.v1.NodeAdmin/Write",
        &format!("node-{leader}"),
    );
    assert_eq!(on_leader.parent_id, forward.id);
    let write = find("raft.write", &format!("node-{leader}"));
    assert_eq!(write.parent_id, on_leader.id);
    for id in cluster.ids() {
        let apply = find("raft.apply", &format!("node-{id}"));
        assert_eq!(apply.parent_id, write.id, "node {id}'s apply");
        assert_eq!(apply.attr("tollgate.command"), "access");
    }
}

/// Runs `tollgate <args>` with `env` and returns (exit code, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("tollgate-traces-bad-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .args(if args[0] == "node" {
            vec!["--data-dir".to_string(), dir.display().to_string()]
        } else {
            vec![]
        })
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_trace_settings_stop_the_process_with_what_to_write() {
    for (args, env, says) in [
        (
            &["node", "--otlp-endpoint", "localhost:4317"][..],
            &[][..],
            "it has no scheme",
        ),
        (
            &["node", "--otlp-endpoint", "ftp://c:21"][..],
            &[][..],
            "neither http nor https",
        ),
        (
            &["node"][..],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317/v1/traces")][..],
            "a gRPC endpoint has no path",
        ),
        (
            &["node", "--otlp-endpoint", "http://c:4317"][..],
            &[("OTEL_TRACES_SAMPLER", "sometimes")][..],
            "parentbased_traceidratio",
        ),
        (
            &[
                "node",
                "--otlp-endpoint",
                "http://c:4317",
                "--trace-sample-ratio",
                "2",
            ][..],
            &[][..],
            "from 0",
        ),
        (
            &["cp", "--otlp-endpoint", "http//c:4317"][..],
            &[][..],
            "invalid OTLP endpoint",
        ),
        (
            &[
                "cp",
                "--otlp-endpoint",
                "http://c:4317",
                "--otlp-protocol",
                "http/json",
            ][..],
            &[][..],
            "grpc or http/protobuf",
        ),
    ] {
        let (code, err) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(says), "{args:?} {env:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
