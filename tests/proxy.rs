//! End-to-end: route precedence, load balancing, retries and their budget, outlier
//! ejection, health checks, timeouts and every error answer, against a real node process.

mod harness;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::{GatewayProcess, Upstream, eventually, full};
use http::Request;

fn ep(up: &Upstream) -> String {
    format!("{{ address: \"{}\" }}", up.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_specific_route_wins() {
    let up = Upstream::start("a").await;
    let spec = format!(
        r#"
upstreams:
  a: {{ endpoints: [{e}] }}
routes:
  catch_all:     {{ match: {{ path: {{ prefix: / }} }}, upstream: a, response_headers: {{ set: {{ x-route: catch_all }} }} }}
  api:           {{ match: {{ path: {{ prefix: /api }} }}, upstream: a, response_headers: {{ set: {{ x-route: api }} }} }}
  api_users:     {{ match: {{ path: {{ prefix: /api/users }} }}, upstream: a, response_headers: {{ set: {{ x-route: api_users }} }} }}
  user_by_id:    {{ match: {{ path: {{ template: "/api/users/{{id}}" }} }}, upstream: a, response_headers: {{ set: {{ x-route: user_by_id }} }} }}
  user_me:       {{ match: {{ path: {{ exact: /api/users/me }} }}, upstream: a, response_headers: {{ set: {{ x-route: user_me }} }} }}
  users_post:    {{ match: {{ path: {{ prefix: /api/users }}, methods: [POST] }}, upstream: a, response_headers: {{ set: {{ x-route: users_post }} }} }}
  canary:        {{ match: {{ path: {{ prefix: /api }}, headers: [{{ name: x-canary, exact: "1" }}] }}, upstream: a, response_headers: {{ set: {{ x-route: canary }} }} }}
  low:           {{ match: {{ path: {{ prefix: /tie }} }}, priority: 1, upstream: a, response_headers: {{ set: {{ x-route: low }} }} }}
  high:          {{ match: {{ path: {{ prefix: /tie }} }}, priority: 5, upstream: a, response_headers: {{ set: {{ x-route: high }} }} }}
  host_exact:    {{ match: {{ hosts: [api.example.com], path: {{ prefix: / }} }}, upstream: a, response_headers: {{ set: {{ x-route: host_exact }} }} }}
  host_wildcard: {{ match: {{ hosts: ["*.example.com"], path: {{ prefix: / }} }}, upstream: a, response_headers: {{ set: {{ x-route: host_wildcard }} }} }}
  host_only_x:   {{ match: {{ hosts: [only.example.org], path: {{ exact: /x }} }}, upstream: a, response_headers: {{ set: {{ x-route: host_only_x }} }} }}
"#,
        e = ep(&up)
    );
    let gw = GatewayProcess::start(&spec).await;
    // (method, host, path, extra headers, the route that must answer)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("GET", "localhost", "/", &[], "catch_all"),
        ("GET", "localhost", "/apix", &[], "catch_all"),
        ("GET", "localhost", "/api", &[], "api"),
        ("GET", "localhost", "/api/orders/1", &[], "api"),
        ("GET", "localhost", "/api/users", &[], "api_users"),
        ("GET", "localhost", "/api/users/42", &[], "user_by_id"),
        ("GET", "localhost", "/api/users/42/posts", &[], "api_users"),
        ("GET", "localhost", "/api/users/me", &[], "user_me"),
        ("POST", "localhost", "/api/users/7/x", &[], "users_post"),
        (
            "GET",
            "localhost",
            "/api/orders",
            &[("x-canary", "1")],
            "canary",
        ),
        (
            "GET",
            "localhost",
            "/api/orders",
            &[("x-canary", "0")],
            "api",
        ),
        ("GET", "localhost", "/tie/a", &[], "high"),
        ("GET", "api.example.com", "/api/users/42", &[], "host_exact"),
        ("GET", "API.Example.com:8080", "/", &[], "host_exact"),
        ("GET", "www.example.com", "/", &[], "host_wildcard"),
        ("GET", "a.b.example.com", "/", &[], "host_wildcard"),
        ("GET", "example.com", "/", &[], "catch_all"),
        // A host table with no matching path falls through to routes without hosts.
        ("GET", "only.example.org", "/x", &[], "host_only_x"),
        ("GET", "only.example.org", "/y", &[], "catch_all"),
    ];
    for (method, host, path, headers, want) in cases {
        let mut req = Request::builder()
            .method(*method)
            .uri(gw.url(path))
            .header("host", *host);
        for (k, v) in *headers {
            req = req.header(*k, *v);
        }
        let resp = gw.send(req.body(full("")).unwrap()).await;
        assert_eq!(resp.status, 200, "{method} {host}{path}: {:?}", resp.body);
        assert_eq!(
            resp.header("x-route"),
            Some(*want),
            "{method} {host}{path} {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_a_json_404_and_is_counted() {
    let up = Upstream::start("a").await;
    let spec = format!(
        "upstreams: {{ a: {{ endpoints: [{}] }} }}\nroutes: {{ r: {{ match: {{ path: {{ exact: /only }} }}, upstream: a }} }}\n",
        ep(&up)
    );
    let gw = GatewayProcess::start(&spec).await;
    let resp = gw.get("/elsewhere").await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.error_code(), "route_not_found");
    assert_eq!(gw.get("/only").await.status, 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_errors_total{code=\"route_not_found\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_requests_total{route=\"r\",status_class=\"2xx\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_request_duration_seconds_bucket{route=\"r\""));
    assert!(metrics.contains("tollgate_spec_generation 1"));
    assert!(metrics.contains("tollgate_open_connections"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights() {
    let ups = Upstream::start_many(&["a", "b", "c"]).await;
    let spec = format!(
        r#"
upstreams:
  pool:
    endpoints:
      - {{ address: "{}", weight: 1 }}
      - {{ address: "{}", weight: 2 }}
      - {{ address: "{}", weight: 3 }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        ups[0].addr, ups[1].addr, ups[2].addr
    );
    let gw = GatewayProcess::start(&spec).await;
    for _ in 0..600 {
        assert_eq!(gw.get("/").await.status, 200);
    }
    let hits: Vec<usize> = ups.iter().map(|u| u.hits()).collect();
    assert_eq!(hits, vec![100, 200, 300]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_request_avoids_the_busy_endpoint() {
    let slow = Upstream::start("slow").await;
    let fast = Upstream::start("fast").await;
    slow.state.delay_ms.store(300, Ordering::SeqCst);
    let spec = format!(
        r#"
upstreams:
  pool:
    endpoints: [{}, {}]
    load_balancing: {{ policy: least_request }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        ep(&slow),
        ep(&fast)
    );
    let gw = std::sync::Arc::new(GatewayProcess::start(&spec).await);
    // Four clients in parallel, ten requests each.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                assert_eq!(gw.get("/").await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Round robin would send exactly 20 to each; least-request sends most to the idle one.
    assert_eq!(slow.hits() + fast.hits(), 40);
    assert!(
        fast.hits() >= 28,
        "fast {} slow {}",
        fast.hits(),
        slow.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_pins_a_header_value_to_one_endpoint() {
    let ups = Upstream::start_many(&["a", "b", "c"]).await;
    let spec = format!(
        r#"
upstreams:
  pool:
    endpoints: [{}, {}, {}]
    load_balancing: {{ policy: consistent_hash, hash_header: x-user }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        ep(&ups[0]),
        ep(&ups[1]),
        ep(&ups[2])
    );
    let gw = GatewayProcess::start(&spec).await;
    let mut owner: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for user in 0..60 {
            let req = Request::get(gw.url("/"))
                .header("x-user", format!("user-{user}"))
                .body(full(""))
                .unwrap();
            let got = gw.send(req).await.json()["upstream"]
                .as_str()
                .unwrap()
                .to_string();
            if round == 0 {
                owner.insert(format!("user-{user}"), got);
            } else {
                assert_eq!(owner[&format!("user-{user}")], got, "user-{user} moved");
            }
        }
    }
    // Sixty keys spread over all three endpoints.
    for u in &ups {
        assert!(u.hits() >= 20, "{} got {} of 180", u.state.name, u.hits());
    }
}

fn retry_spec(up: &Upstream, attempts: u32, percent: u32, min: u32) -> String {
    format!(
        r#"
upstreams:
  a:
    endpoints: [{}]
    retries: {{ attempts: {attempts}, on: ["503"], budget: {{ percent: {percent}, min_concurrency: {min} }} }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: a }}
"#,
        ep(up)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_by_attempts_and_budget() {
    // Budget allows: a GET is tried 1 + 2 times.
    let up = Upstream::start("a").await;
    up.state.fail_with.store(503, Ordering::SeqCst);
    let gw = GatewayProcess::start(&retry_spec(&up, 2, 20, 3)).await;
    assert_eq!(gw.get("/").await.status, 503);
    assert_eq!(up.hits(), 3);

    // A POST with a body was sent once and is never replayed.
    let req = Request::post(gw.url("/")).body(full("payload")).unwrap();
    assert_eq!(gw.send(req).await.status, 503);
    assert_eq!(up.hits(), 4);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_retries_total{upstream=\"a\"} 2"),
        "{metrics}"
    );
    drop(gw);

    // An empty budget: no retry at all.
    let up = Upstream::start("a").await;
    up.state.fail_with.store(503, Ordering::SeqCst);
    let gw = GatewayProcess::start(&retry_spec(&up, 2, 0, 0)).await;
    assert_eq!(gw.get("/").await.status, 503);
    assert_eq!(up.hits(), 1);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_retry_budget_exhausted_total{upstream=\"a\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_another_endpoint() {
    let live = Upstream::start("live").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap() // closed when `l` drops: connections are refused
    };
    let spec = format!(
        r#"
upstreams:
  a:
    endpoints: [{{ address: "{dead}" }}, {}]
    retries: {{ attempts: 1, on: [connect_failure] }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: a }}
"#,
        ep(&live)
    );
    let gw = GatewayProcess::start(&spec).await;
    for _ in 0..10 {
        let req = Request::post(gw.url("/")).body(full("body")).unwrap();
        assert_eq!(gw.send(req).await.status, 200);
    }
    assert_eq!(live.hits(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_ejected_and_come_back() {
    let bad = Upstream::start("bad").await;
    let good = Upstream::start("good").await;
    bad.state.fail_with.store(500, Ordering::SeqCst);
    let spec = format!(
        r#"
upstreams:
  a:
    endpoints: [{}, {}]
    retries: {{ attempts: 0 }}
    outlier_detection: {{ consecutive_failures: 3, base_ejection_time: 1s, max_ejection_percent: 50 }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: a }}
"#,
        ep(&bad),
        ep(&good)
    );
    let gw = GatewayProcess::start(&spec).await;
    for _ in 0..30 {
        gw.get("/").await;
    }
    // Three failures in a row eject it; everything else goes to the good one.
    assert_eq!(bad.hits(), 3);
    assert_eq!(good.hits(), 27);
    // After the ejection time it gets traffic again (and, still failing, is ejected again).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    bad.state.fail_with.store(0, Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(gw.get("/").await.status, 200);
    }
    assert_eq!(
        bad.hits(),
        8,
        "the recovered endpoint takes its share again"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_outlier_ejections_total{upstream=\"a\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_endpoints_out_and_back() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let spec = format!(
        r#"
upstreams:
  pool:
    endpoints: [{}, {}]
    health_check: {{ path: /healthz, interval: 100ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 2 }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        ep(&a),
        ep(&b)
    );
    let gw = GatewayProcess::start(&spec).await;
    a.state.healthy.store(false, Ordering::SeqCst);
    let checks = a.state.health_checks.load(Ordering::SeqCst);
    eventually("two failed checks", Duration::from_secs(5), async || {
        a.state.health_checks.load(Ordering::SeqCst) >= checks + 3
    })
    .await;
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(gw.get("/").await.status, 200);
    }
    assert_eq!(a.hits(), before, "an unhealthy endpoint gets no traffic");

    // Both down: 503 with the JSON error.
    b.state.healthy.store(false, Ordering::SeqCst);
    eventually("no healthy endpoint", Duration::from_secs(5), async || {
        gw.get("/").await.status == 503
    })
    .await;
    assert_eq!(gw.get("/").await.error_code(), "no_healthy_upstream");

    a.state.healthy.store(true, Ordering::SeqCst);
    eventually("a back in rotation", Duration::from_secs(5), async || {
        gw.get("/").await.status == 200
    })
    .await;
    assert!(a.hits() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeouts_and_failures_get_504_502_503() {
    let up = Upstream::start("a").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let spec = format!(
        r#"
upstreams:
  a:
    endpoints: [{}]
    timeouts: {{ request: 300ms }}
  down:
    endpoints: [{{ address: "{dead}" }}]
    retries: {{ attempts: 0 }}
routes:
  a: {{ match: {{ path: {{ prefix: / }} }}, upstream: a }}
  down: {{ match: {{ path: {{ prefix: /down }} }}, upstream: down }}
"#,
        ep(&up)
    );
    let gw = GatewayProcess::start(&spec).await;
    let started = Instant::now();
    let resp = gw.get("/slow/3000").await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.error_code(), "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(2));

    let resp = gw.get("/down").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.error_code(), "upstream_connect_failed");
    // A failed request is logged with the attempt it made and where.
    let mut line = serde_json::Value::Null;
    eventually(
        "the failure is logged",
        Duration::from_secs(3),
        async || {
            let log = std::fs::read_to_string(&gw.access_log).unwrap_or_default();
            match log.lines().find(|l| l.contains("upstream_connect_failed")) {
                Some(l) => {
                    line = serde_json::from_str(l).unwrap();
                    true
                }
                None => false,
            }
        },
    )
    .await;
    assert_eq!(line["status"], 502);
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["endpoint"], dead.to_string());
    assert_eq!(line["route"], "down");

    // The upstream's own 503 passes through untouched (it is not the gateway's error).
    let resp = gw.get("/status/503").await;
    assert_eq!(resp.status, 503);
    assert_eq!(&resp.body[..], b"a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_rewrite_paths_and_headers() {
    let up = Upstream::start("a").await;
    let spec = format!(
        r#"
upstreams:
  a: {{ endpoints: [{}] }}
routes:
  strip:
    match: {{ path: {{ prefix: /svc }} }}
    upstream: a
    rewrite: {{ strip_prefix: true }}
    request_headers: {{ add: {{ x-added: "1" }}, set: {{ x-set: new }}, remove: [x-secret] }}
    response_headers: {{ set: {{ x-resp: yes }}, remove: [x-powered-by] }}
  replace:
    match: {{ path: {{ prefix: /old/api }} }}
    upstream: a
    rewrite: {{ replace_prefix: /v2 }}
"#,
        ep(&up)
    );
    let gw = GatewayProcess::start(&spec).await;
    let req = Request::get(gw.url("/svc/items/1?q=2"))
        .header("x-set", "old")
        .header("x-secret", "s3cret")
        .header("x-forwarded-for", "10.1.1.1")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .body(full(""))
        .unwrap();
    let resp = gw.send(req).await;
    assert_eq!(resp.header("x-resp"), Some("yes"));
    let v = resp.json();
    assert_eq!(v["path"], "/items/1");
    assert_eq!(v["query"], "q=2");
    let h = &v["headers"];
    assert_eq!(h["x-added"], "1");
    assert_eq!(h["x-set"], "new");
    assert!(h.get("x-secret").is_none());
    assert!(
        h.get("x-hop").is_none(),
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], format!("{}", gw.proxy));

    assert_eq!(gw.get("/svc").await.json()["path"], "/");

    // An absolute-form target names the host; it replaces the Host header upstream.
    let mut conn = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(
        b"GET http://api.example.com/svc/abs HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    let body = &answer[answer.find("\r\n\r\n").expect("a response head") + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["path"], "/abs");
    assert_eq!(v["headers"]["host"], "api.example.com");
    assert_eq!(gw.get("/old/api/users").await.json()["path"], "/v2/users");
    assert_eq!(gw.get("/old/api").await.json()["path"], "/v2");
    assert_eq!(gw.get("/old/api/").await.json()["path"], "/v2/");

    // One JSON access-log line per request, with route, endpoint, status and sizes.
    // Threads buffer and log separately (flushed every 200 ms), so wait for the line itself,
    // not for a count of lines that another thread may have reached first.
    eventually(
        "the first request's line is flushed",
        Duration::from_secs(3),
        async || {
            std::fs::read_to_string(&gw.access_log)
                .unwrap_or_default()
                .contains("\"/svc/items/1\"")
        },
    )
    .await;
    let log = std::fs::read_to_string(&gw.access_log).unwrap();
    let first: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["path"] == "/svc/items/1")
        .expect("the first request is logged");
    assert_eq!(first["route"], "strip");
    assert_eq!(first["upstream"], "a");
    assert_eq!(first["endpoint"], up.addr.to_string());
    assert_eq!(first["status"], 200);
    assert_eq!(first["path"], "/svc/items/1");
    assert!(first["response_bytes"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().is_some());
}
