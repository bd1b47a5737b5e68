//! End-to-end: bodies stream through the gateway without being buffered (100 MB each
//! way with bounded memory, server-sent events one by one), WebSocket upgrades, and h2c.

mod harness;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use harness::{GatewayProcess, Upstream, full};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};

const MB: usize = 1024 * 1024;

fn spec(up: &Upstream, extra: &str) -> String {
    harness::one_route_spec(up, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_with_bounded_memory() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start_with(&spec(&up, ""), &["--max-request-body", "200000000"]).await;
    let idle = gw.rss();

    // Upload: a 100 MB chunked body, generated as it is sent.
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let chunks = (100 * MB) / chunk.len();
    let stream = futures::stream::iter(
        (0..chunks).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let req = Request::post(gw.url("/upload"))
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let resp = gw.send(req).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["bytes"], (100 * MB) as u64);

    // Download: 100 MB, counted as it arrives, never held.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .request(
            Request::get(gw.url(&format!("/bytes/{}", 100 * MB)))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut got = 0usize;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(got, 100 * MB);

    let peak = gw.peak_rss();
    eprintln!(
        "node RSS idle {} MB, peak {} MB",
        idle / MB as u64,
        peak / MB as u64
    );
    assert!(
        peak < idle + 40 * MB as u64,
        "memory grew with the body: idle {idle} B, peak {peak} B"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_one_by_one() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&spec(&up, "")).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let resp = client
        .request(Request::get(gw.url("/sse/4/300")).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            text.push_str(std::str::from_utf8(d).unwrap());
            arrivals.push(started.elapsed());
        }
    }
    assert_eq!(
        text,
        "data: event 0\n\ndata: event 1\n\ndata: event 2\n\ndata: event 3\n\n"
    );
    assert_eq!(
        arrivals.len(),
        4,
        "each event is its own chunk: {arrivals:?}"
    );
    // The first event is there long before the last one is even sent.
    // The events are 3 x 300 ms apart at the source; a buffering proxy would deliver them
    // together.
    assert!(
        arrivals[3] - arrivals[0] >= Duration::from_millis(600),
        "{arrivals:?}"
    );
    assert!(arrivals[3] >= Duration::from_millis(850), "{arrivals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&spec(&up, "")).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.proxy))
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        let msg = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo within 5s")
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), msg);
    }
    // The tunnel still counts as an open connection after hyper let go of it.
    assert!(
        gw.metrics().await.contains("tollgate_open_connections 1\n"),
        "{}",
        gw.metrics().await
    );
    ws.close(None).await.unwrap();
    drop(ws);
    harness::eventually("the tunnel is closed", Duration::from_secs(5), async || {
        gw.metrics().await.contains("tollgate_open_connections 0\n")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_on_the_same_port() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start_with(&spec(&up, ""), &["--max-request-body", "1000"]).await;
    let stream = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    // Several concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut s = sender.clone();
        let uri = format!("http://{}/h2/{i}", gw.proxy);
        tasks.push(tokio::spawn(async move {
            let resp = s
                .send_request(Request::get(uri).body(full("")).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["path"], format!("/h2/{i}"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // HTTP/2 cookie fields are joined into one for the HTTP/1.1 upstream.
    let resp = sender
        .send_request(
            Request::get(format!("http://{}/cookies", gw.proxy))
                .header("cookie", "a=1")
                .header("cookie", "b=2")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["headers"]["cookie"], "a=1; b=2");

    // The upstream got HTTP/1.1 with a Host header made from :authority.
    assert_eq!(
        *up.state.last_version.lock().unwrap(),
        Some(http::Version::HTTP_11)
    );
    let headers = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(headers["host"], gw.proxy.to_string());

    // A gateway error over h2 is the same JSON.
    let resp = sender
        .send_request(
            Request::post(format!("http://{}/upload", gw.proxy))
                .body(full(vec![b'x'; 2000]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_body_is_cut_off() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&spec(&up, ", timeouts: { request: 300ms }")).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let resp = client
        .request(Request::get(gw.url("/stall/5/10")).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let result = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the body ends within 5s");
    assert!(
        result.is_err(),
        "the client sees the body fail, not a short success"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    harness::eventually(
        "counted as an upstream failure",
        Duration::from_secs(3),
        async || {
            gw.metrics()
                .await
                .contains("tollgate_upstream_errors_total{upstream=\"a\",kind=\"body\"} 1")
        },
    )
    .await;
}
