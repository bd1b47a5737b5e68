//! Cluster-wide circuit breakers on a real 3-node cluster: failures seen by one node open
//! the circuit on every node, half-open probes across the cluster stay within the
//! configured number, recovery closes it, and operators force it from the CLI.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::Upstream;
use harness::cluster::TestCluster;

const PROBES: usize = 2;

fn spec(a: &Upstream, b: &Upstream) -> String {
    format!(
        r#"upstreams:
  a:
    endpoints: [{{ address: "{}" }}]
    circuit_breaker: {{ failure_rate: 40, min_calls: 10, consecutive_failures: 1000, window: 5s, open_for: 1s, half_open_probes: {PROBES} }}
  b:
    endpoints: [{{ address: "{}" }}]
    circuit_breaker:
      fallback: {{ status: 200, body: '{{"cached": true}}' }}
routes:
  a: {{ match: {{ path: {{ prefix: /a }} }}, upstream: a, rewrite: {{ replace_prefix: / }} }}
  b: {{ match: {{ path: {{ prefix: /b }} }}, upstream: b }}
"#,
        a.addr, b.addr
    )
}

async fn status(cluster: &TestCluster, id: u64, path: &str) -> (u16, String) {
    let r = cluster.node(id).get(path).await;
    let code = if r.status.as_u16() == 503 {
        r.error_code()
    } else {
        String::new()
    };
    (r.status.as_u16(), code)
}

fn cli(cluster: &TestCluster, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["circuit"])
        .args(args)
        .args(["--node", &cluster.node(2).grpc.to_string()])
        .env("TOLLGATE_CA", cluster.ca_file())
        .env("TOLLGATE_TOKEN", &cluster.token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tollgate circuit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_nodes_failures_open_the_circuit_everywhere_and_probes_close_it() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let cluster = TestCluster::start(3, &spec(&a, &b), &[]).await;

    // Only node 1's traffic fails (its requests ask the upstream for 500s); node 2's
    // succeeds. Ten successes, then seven failures: 6 of 16 is under the 40% threshold
    // and 7 of 17 is over it, so whenever the owner's tick falls, the circuit can open
    // only after the last of these calls, and each of them reaches the upstream.
    for _ in 0..10 {
        assert_eq!(status(&cluster, 2, "/a/ok").await.0, 200);
    }
    let started = Instant::now();
    for _ in 0..7 {
        assert_eq!(status(&cluster, 1, "/a/status/500").await.0, 500);
    }
    // Asking with more failing calls: a success here would pull the rate back under 40%.
    for id in [1, 2, 3] {
        harness::eventually(
            &format!("node {id} to open the circuit"),
            Duration::from_secs(5),
            async || status(&cluster, id, "/a/status/500").await == (503, "circuit_open".into()),
        )
        .await;
    }
    println!(
        "open on every node {:?} after the failures began",
        started.elapsed()
    );
    let r = cluster.node(3).get("/a/ok").await;
    assert!(r.header("retry-after").is_some());
    let list = cli(&cluster, &["list"]);
    assert!(
        list.contains("open") && list.contains("calls failed"),
        "{list}"
    );

    // The upstream is fine again. Every node keeps sending until the circuit closes: only
    // the owner's permits let requests through, at most PROBES across the cluster.
    let hits_before = a.hits();
    let closed = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for id in [1, 2, 3] {
        let url = cluster.node(id).url("/a/ok");
        let closed = closed.clone();
        senders.push(tokio::spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<harness::Body>();
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut through = 0;
            while !closed.load(Ordering::SeqCst) && Instant::now() < deadline {
                let req = http::Request::get(&url).body(harness::full("")).unwrap();
                if let Ok(resp) = client.request(req).await
                    && resp.status() == 200
                {
                    through += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            through
        }));
    }
    // While open, nothing reaches the upstream.
    let mut c = cluster.client(1).await;
    let list = c.list_circuits().await.unwrap();
    let until = list
        .circuits
        .iter()
        .find(|s| s.upstream == "a")
        .unwrap()
        .open_until_ms;
    let open_left = until.saturating_sub(list.now_ms).saturating_sub(100);
    tokio::time::sleep(Duration::from_millis(open_left)).await;
    assert_eq!(
        a.hits(),
        hits_before,
        "requests reached an open circuit's upstream"
    );
    harness::eventually(
        "the owner to close the circuit",
        Duration::from_secs(15),
        async || {
            let list = c.list_circuits().await.unwrap();
            list.circuits.iter().any(|s| s.upstream == "a" && !s.open)
        },
    )
    .await;
    closed.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    // The probes every node let through, by its own count.
    let mut probes = 0;
    for id in [1, 2, 3] {
        let text = cluster.node(id).metrics().await;
        probes += text
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_circuit_probes_total{upstream=\"a\"} "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
    }
    println!("half-open probes across the cluster: {probes}");
    assert!(probes <= PROBES, "{probes} probes, more than {PROBES}");
    assert!(probes >= 1, "it closed without a probe");
    for id in [1, 2, 3] {
        harness::eventually(
            &format!("node {id} to close the circuit"),
            Duration::from_secs(5),
            async || status(&cluster, id, "/a/ok").await.0 == 200,
        )
        .await;
    }

    // An operator holds `b` open from the CLI: once each node has applied it, every node
    // answers with b's fallback and nothing reaches b; `auto` hands it back.
    assert_eq!(status(&cluster, 3, "/b/x").await.0, 200);
    let out = cli(&cluster, &["open", "b", "--reason", "incident 7"]);
    assert!(out.contains("held open"), "{out}");
    let fallback = async |id: u64| {
        let r = cluster.node(id).get("/b/x").await;
        r.status.as_u16() == 200 && r.body.as_ref() == br#"{"cached": true}"#
    };
    for id in [1, 2, 3] {
        harness::eventually(
            &format!("node {id} to take b out"),
            Duration::from_secs(5),
            async || fallback(id).await,
        )
        .await;
    }
    let b_hits = b.hits();
    for id in [1, 2, 3] {
        for _ in 0..5 {
            assert!(fallback(id).await);
        }
        // Held open by hand, it will not try again by itself: no time is promised.
        let held = cluster.node(id).get("/b/x").await;
        assert_eq!(held.header("retry-after"), None, "node {id}");
    }
    assert_eq!(b.hits(), b_hits, "a forced-open upstream got traffic");
    assert!(cli(&cluster, &["list"]).contains("forced-open"));
    cli(&cluster, &["auto", "b"]);
    for id in [1, 2, 3] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before = b.hits();
            let r = cluster.node(id).get("/b/x").await;
            if r.status.as_u16() == 200 && b.hits() > before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} still keeps b out: {} {}; circuits: {}",
                r.status,
                String::from_utf8_lossy(&r.body),
                cli(&cluster, &["list"])
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // The control plane does the same: list, force, hand back.
    let cpp = harness::cp::CpProcess::start(&[cluster.node(1).grpc, cluster.node(2).grpc]).await;
    let cp = cpp.sdk(&cluster.token);
    let listed = cp.list_circuits().await.unwrap();
    assert!(listed.circuits.iter().any(|c| c.upstream == "b"));
    cp.force_circuit(
        "b",
        tollgate_sdk::state::CircuitMode::ForcedOpen,
        "from the cp",
    )
    .await
    .unwrap();
    harness::eventually("b out through the cp", Duration::from_secs(5), async || {
        fallback(3).await
    })
    .await;
    cp.force_circuit("b", tollgate_sdk::state::CircuitMode::Auto, "")
        .await
        .unwrap();
    let err = cp
        .force_circuit("", tollgate_sdk::state::CircuitMode::ForcedOpen, "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("upstream is empty"), "{err}");

    // Bad input: an upstream nobody has; a transition is only the owner's to make.
    let mut c = cluster.client(2).await;
    let err = c
        .force_circuit("nowhere", tollgate_sdk::state::CircuitMode::ForcedOpen, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(err.to_string().contains("no upstream"), "{err}");
    use tollgate_sdk::state;
    let transition = state::Command {
        kind: Some(state::command::Kind::Circuit(state::CircuitCommand {
            upstream: "a".into(),
            op: Some(state::circuit_command::Op::Transition(
                state::CircuitTransition {
                    open: true,
                    open_until_ms: u64::MAX,
                    reason: "not an owner".into(),
                    from_index: 0,
                },
            )),
        })),
        ..state::Command::default()
    };
    let err = c.write(transition).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_neither_stops_the_majority_deciding_nor_leaves_a_circuit_stuck() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let cluster = TestCluster::start(3, &spec(&a, &b), &[]).await;
    cluster.isolate(3, true).await;
    // The majority sees the upstream fail and opens its circuit, whoever owned it before.
    for _ in 0..10 {
        status(&cluster, 1, "/a/status/500").await;
        status(&cluster, 2, "/a/ok").await;
    }
    for id in [1, 2] {
        harness::eventually(
            &format!("node {id} to open the circuit"),
            Duration::from_secs(10),
            async || {
                // Keep failing until it opens (the owner may have moved in between).
                status(&cluster, 1, "/a/status/500").await;
                status(&cluster, id, "/a/ok").await == (503, "circuit_open".into())
            },
        )
        .await;
    }
    // The cut-off node cannot hear the decision: it keeps serving on its last state.
    assert_eq!(status(&cluster, 3, "/a/ok").await.0, 200);
    // Heal. Node 3 catches up, half-open probes go through, and everyone serves again.
    cluster.isolate(3, false).await;
    for id in [1, 2, 3] {
        harness::eventually(
            &format!("node {id} to serve a again"),
            Duration::from_secs(15),
            async || status(&cluster, id, "/a/ok").await.0 == 200,
        )
        .await;
    }
    let mut c = cluster.client(3).await;
    harness::eventually(
        "the circuit to close",
        Duration::from_secs(15),
        async || {
            // Traffic keeps the half-open probes coming.
            for id in [1, 2, 3] {
                status(&cluster, id, "/a/ok").await;
            }
            let list = c.list_circuits().await.unwrap();
            list.circuits.iter().all(|s| !s.open)
        },
    )
    .await;
}
