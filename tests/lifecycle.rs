//! End-to-end: request limits (413, 431, 400, slow clients, the connection cap), spec
//! reloads on SIGHUP, and draining on SIGTERM.

mod harness;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{GatewayProcess, Upstream, eventually, full};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn spec(up: &Upstream) -> String {
    harness::one_route_spec(up, "")
}

/// `spec` with one more response header: a real change, so applying it takes a generation.
fn changed_spec(up: &Upstream) -> String {
    spec(up).replace(
        "upstream: a",
        "upstream: a, response_headers: { set: { x-changed: \"1\" } }",
    )
}

/// Sends raw bytes on a new connection and reads until the server closes (or 5 s).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_clear_errors() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start_with(
        &spec(&up),
        &["--max-request-body", "1000", "--max-header-bytes", "4096"],
    )
    .await;

    // 413 from Content-Length, before anything reaches the upstream.
    let req = Request::post(gw.url("/upload"))
        .body(full(vec![b'x'; 2000]))
        .unwrap();
    let resp = gw.send(req).await;
    assert_eq!(resp.status, 413);
    assert_eq!(resp.error_code(), "payload_too_large");
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000")
    );
    assert_eq!(up.hits(), 0);

    // 413 for a chunked body that passes the limit mid-stream.
    let chunks = futures::stream::iter(
        (0..10).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'y'; 500])))),
    );
    let req = Request::post(gw.url("/upload"))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let resp = gw.send(req).await;
    assert_eq!(resp.status, 413);
    assert_eq!(resp.error_code(), "payload_too_large");

    // 431 with the JSON body for headers over the limit.
    let req = Request::get(gw.url("/"))
        .header("x-big", "z".repeat(5000))
        .body(full(""))
        .unwrap();
    let resp = gw.send(req).await;
    assert_eq!(resp.status, 431);
    assert_eq!(resp.error_code(), "headers_too_large");

    // 400 with the JSON body for a request the gateway cannot route (bad Host).
    let answer = raw(
        gw.proxy,
        b"GET / HTTP/1.1\r\nHost: bad host!\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\":\"bad_request\""), "{answer}");

    // 400 for dot segments, which the upstream would resolve past the route's prefix.
    let hits = up.hits();
    for path in ["/public/../admin", "/public/%2E%2e/admin", "/./x"] {
        let answer = raw(
            gw.proxy,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("normalised"), "{path}: {answer}");
    }
    assert_eq!(
        up.hits(),
        hits,
        "no dot-segment request reached the upstream"
    );

    // An HTTP/1.0 request without Host reaches the upstream with one.
    let answer = raw(gw.proxy, b"GET /old-client HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["host"], up.addr.to_string());

    // 400 from the HTTP parser for bytes that are not HTTP at all (counted in a metric).
    let answer = raw(gw.proxy, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // The protocol error is counted when its connection's task ends, which may be just
    // after the client has read the 400.
    let malformed = "tollgate_http_protocol_errors_total{kind=\"malformed\"} 1";
    harness::eventually(
        "the malformed request to be counted",
        Duration::from_secs(5),
        async || gw.metrics().await.contains(malformed),
    )
    .await;
    let metrics = gw.metrics().await;
    for line in [
        "tollgate_errors_total{code=\"payload_too_large\"} 2",
        "tollgate_errors_total{code=\"headers_too_large\"} 1",
        "tollgate_errors_total{code=\"bad_request\"} 4",
        malformed,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    // The node is still fine.
    assert_eq!(gw.get("/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start_with(&spec(&up), &["--header-read-timeout", "500ms"]).await;

    // Connects and says nothing.
    let started = Instant::now();
    let mut silent = TcpStream::connect(gw.proxy).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed within 5s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(400));

    // Sends half a request head, then stalls.
    let started = Instant::now();
    let mut slow = TcpStream::connect(gw.proxy).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out))
        .await
        .expect("closed within 5s")
        .ok();
    assert!(started.elapsed() < Duration::from_secs(3));
    // Sends the first byte of the HTTP/2 preface, then nothing.
    let started = Instant::now();
    let mut half_h2 = TcpStream::connect(gw.proxy).await.unwrap();
    half_h2.write_all(b"P").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), half_h2.read_to_end(&mut out))
        .await
        .expect("closed within 5s")
        .ok();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start_with(&spec(&up), &["--max-connections", "2"]).await;
    // Two keep-alive connections that stay open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let answer = raw(gw.proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("\"code\":\"too_many_connections\""),
        "{answer}"
    );
    drop(held);
    eventually("a slot frees up", Duration::from_secs(5), async || {
        raw(
            gw.proxy,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_spec_and_keeps_the_old_one_on_a_bad_one() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&spec(&up)).await;
    assert_eq!(gw.get("/x").await.status, 200);

    // A spec with two mistakes: both are reported, nothing changes.
    std::fs::write(
        &gw.spec_path,
        "upstreams: { a: { endpoints: [] } }\nroutes: { r: { match: { path: { prefix: nope } }, upstream: missing } }\n",
    )
    .unwrap();
    gw.signal("HUP");
    eventually(
        "the refusal is logged",
        Duration::from_secs(5),
        async || gw.log().contains("spec refused"),
    )
    .await;
    let log = gw.log();
    assert!(log.contains("upstreams.a.endpoints"), "{log}");
    assert!(log.contains("routes.r.upstream"), "{log}");
    assert!(log.contains("routes.r.match.path.prefix"), "{log}");
    assert_eq!(
        gw.get("/x").await.status,
        200,
        "still serving the old routes"
    );
    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.json()["spec_generation"], 1);

    // A good one is swapped in whole.
    std::fs::write(
        &gw.spec_path,
        format!(
            "upstreams: {{ a: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ only_new: {{ match: {{ path: {{ prefix: /new }} }}, upstream: a }} }}\n",
            up.addr
        ),
    )
    .unwrap();
    gw.signal("HUP");
    eventually("generation 2", Duration::from_secs(5), async || {
        gw.admin_get("/readyz").await.json()["spec_generation"] == 2
    })
    .await;
    assert_eq!(gw.get("/new/thing").await.status, 200);
    assert_eq!(gw.get("/x").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let up = Upstream::start("a").await;
    let mut gw = GatewayProcess::start(&spec(&up)).await;
    let url = gw.url("/slow/1500");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<harness::Body>();
    let in_flight = tokio::spawn(async move {
        let resp = client
            .request(Request::get(url).body(full("")).unwrap())
            .await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    });
    eventually(
        "the slow request reached the upstream",
        Duration::from_secs(5),
        async || up.hits() == 1,
    )
    .await;
    gw.signal("TERM");
    // No new connections once draining.
    eventually("the listener closes", Duration::from_secs(3), async || {
        TcpStream::connect(gw.proxy).await.is_err()
    })
    .await;
    // The in-flight request completes.
    let (status, body) = in_flight.await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"a");
    let exit = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("node exits");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_spec_at_startup_is_refused_with_every_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["validate", "-f"])
        .arg({
            let p = std::env::temp_dir().join(format!("bad-spec-{}.yaml", std::process::id()));
            std::fs::write(
                &p,
                "upstreams:\n  a: { endpoints: [{ address: \"127.0.0.1\" }], colour: red }\n  b: { endpoints: [{ address: \"127.0.0.1:1\", weight: 0 }], load_balancing: { policy: consistent_hash } }\nroutes:\n  r: { match: { path: { template: \"/users/{id\" } }, upstream: b, rewrite: { strip_prefix: true } }\n",
            )
            .unwrap();
            p
        })
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "upstreams.a.colour: unknown field `colour`",
        "upstreams.b.endpoints[0].weight",
        "upstreams.b.load_balancing.hash_header",
        "routes.r.match.path.template",
        "routes.r.rewrite",
    ] {
        assert!(err.contains(path), "missing {path:?} in:\n{err}");
    }
    let _ = Instant::now();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_right_after_start_reloads_instead_of_killing() {
    let up = Upstream::start("a").await;
    let mut gw = GatewayProcess::start(&spec(&up)).await;
    // The node has just written its address file; its handlers must already be in place.
    std::fs::write(&gw.spec_path, changed_spec(&up)).unwrap();
    gw.signal("HUP");
    eventually("generation 2", Duration::from_secs(5), async || {
        gw.admin_get("/readyz").await.json()["spec_generation"] == 2
    })
    .await;
    assert!(gw.wait_exit(Duration::from_millis(100)).await.is_none());
    assert_eq!(gw.get("/x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_reads_node_status_over_grpc() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start_with(&spec(&up), &["--id", "7", "--region", "eu-west"]).await;
    let mut node = tollgate_sdk::NodeClient::connect(&gw.grpc.to_string(), &gw.tls)
        .await
        .expect("connect to the node's gRPC address");
    let status = node.status().await.expect("status");
    assert_eq!(status.node_id, 7);
    assert_eq!(status.region, "eu-west");
    assert_eq!(status.spec_generation, 1);
    assert_eq!((status.routes, status.upstreams), (1, 1));
    assert!(status.ready);
    assert_eq!(status.proxy_addr, gw.proxy.to_string());

    // A node that is not there: an error that says where it looked.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = tollgate_sdk::NodeClient::connect(&dead.to_string(), &tollgate_sdk::Tls::plaintext())
        .await
        .expect_err("nothing listens there");
    assert!(err.to_string().contains(&dead.to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_abandons_its_upload_does_not_count_against_the_upstream() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&harness::one_route_spec(
        &up,
        ", outlier_detection: { consecutive_failures: 1, base_ejection_time: 30s }",
    ))
    .await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.proxy).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gw.get("/after").await.status,
        200,
        "the endpoint was not ejected"
    );
    let metrics = gw.metrics().await;
    assert!(
        !metrics.contains("tollgate_outlier_ejections_total"),
        "{metrics}"
    );
    assert!(!metrics.contains("kind=\"protocol\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_gets_408_and_a_closed_client_is_logged_499() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&harness::one_route_spec(
        &up,
        ", timeouts: { request: 300ms }",
    ))
    .await;
    // Starts a body, then sends nothing more while keeping the connection open.
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer within 5s")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");

    // Asks for something slow, then hangs up before the answer.
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(b"GET /slow/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    eventually(
        "the abandoned request is logged",
        Duration::from_secs(5),
        async || {
            std::fs::read_to_string(&gw.access_log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("\"status\":499") && l.contains("client_closed"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_uploading_is_not_reused() {
    let up = Upstream::start("a").await;
    // One data-plane thread: both requests share one pool.
    let gw = GatewayProcess::start_with(&spec(&up), &["--workers", "1"]).await;
    // The upstream answers 401 at once, without reading the upload that is still coming.
    let mut uploader = TcpStream::connect(gw.proxy).await.unwrap();
    uploader
        .write_all(
            b"POST /early/401 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nfirst-bytes",
        )
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), uploader.read(&mut buf))
        .await
        .expect("the early answer")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"));
    // The next request must not wait for that upload to finish.
    let resp = tokio::time::timeout(Duration::from_secs(3), gw.get("/next"))
        .await
        .expect("the next request is not stuck behind the upload");
    assert_eq!(resp.status, 200);
    drop(uploader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_access_log_after_rotation() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&spec(&up)).await;
    assert_eq!(gw.get("/before").await.status, 200);
    eventually(
        "the first line is written",
        Duration::from_secs(3),
        async || std::fs::read_to_string(&gw.access_log).is_ok_and(|l| l.contains("/before")),
    )
    .await;
    // What logrotate does: move the file away, then signal.
    let rotated = gw.access_log.with_extension("log.1");
    std::fs::rename(&gw.access_log, &rotated).unwrap();
    // A changed spec, so the reload shows as a new generation once the handler has run.
    std::fs::write(&gw.spec_path, changed_spec(&up)).unwrap();
    gw.signal("HUP");
    eventually("the reload is done", Duration::from_secs(5), async || {
        gw.admin_get("/readyz").await.json()["spec_generation"] == 2
    })
    .await;
    assert_eq!(gw.get("/after").await.status, 200);
    eventually(
        "the new line goes to a new file",
        Duration::from_secs(3),
        async || std::fs::read_to_string(&gw.access_log).is_ok_and(|l| l.contains("/after")),
    )
    .await;
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("/before") && !old.contains("/after"), "{old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_delay_reports_draining_while_still_serving() {
    let up = Upstream::start("a").await;
    let mut gw = GatewayProcess::start_with(&spec(&up), &["--shutdown-delay", "1s"]).await;
    gw.signal("TERM");
    eventually("readyz says draining", Duration::from_secs(3), async || {
        gw.admin_get("/readyz").await.status == 503
    })
    .await;
    assert_eq!(gw.admin_get("/readyz").await.json()["status"], "draining");
    // Load balancers have not caught up yet: requests are still served.
    assert_eq!(gw.get("/still-here").await.status, 200);
    eventually(
        "the listener closes after the delay",
        Duration::from_secs(5),
        async || TcpStream::connect(gw.proxy).await.is_err(),
    )
    .await;
    let exit = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("node exits");
    assert!(exit.success(), "{exit:?}");
}
