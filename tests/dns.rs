//! End-to-end: an upstream host name re-resolved as its TTL says, against a DNS server the
//! test controls (`--dns-resolver`): every address takes traffic, an address removed
//! under load drains with no failed request, a failing resolver keeps the last answer.

mod harness;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::dns::TestDns;
use harness::{GatewayProcess, Upstream};

/// Two upstreams on one port, at 127.0.0.2 and 127.0.0.3 (a name's addresses share the
/// port the endpoint is written with).
async fn two_on_one_port() -> (Upstream, Upstream, u16) {
    for _ in 0..50 {
        let a = Upstream::start_at("a", "127.0.0.2:0".parse().unwrap()).await;
        let port = a.addr.port();
        let b_addr: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
        if std::net::TcpListener::bind(b_addr).is_ok() {
            let b = Upstream::start_at("b", b_addr).await;
            return (a, b, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_follow_their_ttl_and_a_removed_address_drains_without_a_failed_request() {
    let dns = TestDns::start().await;
    let (a, b, port) = two_on_one_port().await;
    let (ip_a, ip_b) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    dns.set("svc.test", &[ip_a, ip_b], 1);
    let spec = format!(
        "upstreams: {{ s: {{ endpoints: [{{ address: \"svc.test:{port}\" }}], retries: {{ attempts: 0 }} }} }}\nroutes: {{ r: {{ match: {{ path: {{ prefix: / }} }}, upstream: s }} }}\n"
    );
    let node = Arc::new(
        GatewayProcess::start_with(
            &spec,
            &[
                "--dns-resolver",
                &dns.addr.to_string(),
                "--dns-min-ttl",
                "200ms",
            ],
        )
        .await,
    );

    // Load: 4 clients, each request after the last, until told to stop (30 s at most).
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (node, stop, sent, failed) = (node.clone(), stop.clone(), sent.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let resp = node.get("/x").await;
                sent.fetch_add(1, Ordering::Relaxed);
                if resp.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    failures.push(format!(
                        "{} {}",
                        resp.status,
                        String::from_utf8_lossy(&resp.body)
                    ));
                }
            }
            failures
        }));
    }

    // Both addresses of the name take traffic.
    harness::eventually(
        "both addresses take traffic",
        Duration::from_secs(10),
        async || a.hits() > 20 && b.hits() > 20,
    )
    .await;

    // 127.0.0.3 leaves the answer: within its TTL (1 s) and a refresh, no request goes
    // there any more, and its connections close.
    dns.set("svc.test", &[ip_a], 1);
    let removed = Instant::now();
    harness::eventually(
        "the removed address gets no new request",
        Duration::from_secs(5),
        async || {
            let before = b.hits();
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.hits() == before
        },
    )
    .await;
    let took = removed.elapsed();
    harness::eventually(
        "connections to the removed address drain",
        Duration::from_secs(5),
        async || b.open() == 0,
    )
    .await;
    let after_removal = a.hits();

    // The resolver fails: the last answer is kept (and counted), traffic goes on.
    dns.fail(true);
    harness::eventually(
        "failed lookups are counted",
        Duration::from_secs(5),
        async || {
            metric(
                &node.metrics().await,
                "tollgate_dns_lookups_total{result=\"failed\"}",
            ) >= 2.0
        },
    )
    .await;
    assert!(
        a.hits() > after_removal,
        "traffic went on while the resolver failed"
    );
    assert!(node.log().contains("keeping its last answer"));

    // It answers again, with both: the returning address takes traffic again.
    dns.fail(false);
    dns.set("svc.test", &[ip_a, ip_b], 1);
    let b_before = b.hits();
    harness::eventually(
        "the returning address takes traffic",
        Duration::from_secs(5),
        async || b.hits() > b_before + 10,
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        sent.load(Ordering::Relaxed) > 100,
        "{} requests",
        sent.load(Ordering::Relaxed)
    );
    assert!(
        took < Duration::from_secs(3),
        "the removal took {took:?} to be seen"
    );
    assert!(
        dns.queries() >= 4,
        "re-resolved as the TTL says: {} queries",
        dns.queries()
    );
}
