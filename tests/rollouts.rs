//! Canary rollouts judged by the cluster (docs/hypercare.md), on three nodes: a faulty
//! canary is rolled back on every node with its evidence; killing the judge mid-rollout
//! loses no decision; a healthy canary is promoted through every step; too little traffic
//! is "not enough evidence"; pause, resume and abort by hand.

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::cluster::TestCluster;
use harness::cp::CpProcess;
use harness::{Body, Upstream, eventually, full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate_sdk::{ControlPlaneClient, state};

const T: Duration = Duration::from_secs(30);

/// A version whose calls to `/e/0` .. `/e/{bad - 1}` answer 503 (the upstream's
/// `/status/503`): `bad` percent of calls spread over `/e/0` .. `/e/99`.
fn content(up: &Upstream, bad: usize) -> String {
    let mut routes = String::new();
    for j in 0..bad {
        routes += &format!(
            "  bad{j}: {{ match: {{ path: {{ prefix: /e/{j} }} }}, upstream: o, rewrite: {{ replace_prefix: /status/503 }} }}\n"
        );
    }
    format!(
        "upstreams: {{ o: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes:\n{routes}  ok: {{ match: {{ path: {{ prefix: / }} }}, upstream: o }}\n",
        up.addr
    )
}

/// API `name` of tenant acme at `/<name>`: 1.0.0 failing `stable_bad`% of calls, 2.0.0
/// `canary_bad`%, all traffic on 1.0.0. Returns a key.
async fn api(
    cp: &ControlPlaneClient,
    up: &Upstream,
    name: &str,
    stable_bad: usize,
    canary_bad: usize,
) -> String {
    if cp.create_tenant("acme").await.is_err() {
        // Made by an earlier API of the same test.
    }
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
    cp.create_version(name, "1.0.0", &content(up, stable_bad))
        .await
        .unwrap();
    cp.publish(name, "1.0.0").await.unwrap();
    cp.create_version(name, "2.0.0", &content(up, canary_bad))
        .await
        .unwrap();
    cp.publish(name, "2.0.0").await.unwrap();
    cp.set_split(name, &[("1.0.0", 100)]).await.unwrap();
    cp.create_key("acme", name, "").await.unwrap().secret
}

/// Requests at `rate` a second, round robin over `proxies`, until stopped: calls to
/// `/<api>/e/0` .. `/e/99` in turn.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn traffic(proxies: Vec<std::net::SocketAddr>, api: &str, key: &str, rate: f64) -> Traffic {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (s, n, api, key) = (stop.clone(), sent.clone(), api.to_string(), key.to_string());
    let task = tokio::spawn(async move {
        let c: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
        let every = Duration::from_secs_f64(1.0 / rate);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut i: u64 = 0;
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            tick.tick().await;
            let addr = proxies[i as usize % proxies.len()];
            let req = http::Request::get(format!("http://{addr}/{api}/e/{}", i % 100))
                .header("x-api-key", &key)
                .body(full(""))
                .unwrap();
            let c = c.clone();
            tokio::spawn(async move {
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(5), c.request(req)).await
                {
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                }
            });
            n.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
    });
    Traffic { stop, sent, task }
}

impl Traffic {
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.sent.load(Ordering::Relaxed)
    }
}

fn steps(weights: &[u32], min_ms: u64, min_requests: u64) -> Vec<state::RolloutStep> {
    weights
        .iter()
        .map(|&weight| state::RolloutStep {
            weight,
            min_ms,
            min_requests,
        })
        .collect()
}

/// Waits for the rollout of `api` to reach `phase`; returns it.
async fn until_phase(
    cp: &ControlPlaneClient,
    api: &str,
    phase: &str,
    limit: Duration,
) -> state::RolloutState {
    let deadline = Instant::now() + limit;
    loop {
        let r = cp.get_rollout(api).await.unwrap().rollout.unwrap();
        if r.phase == phase {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "rollout of {api} still {} after {limit:?}: {:?}",
            r.phase,
            r.evidence.as_ref().map(|e| &e.summary)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The split of `api` as node `id` serves it (its own applied state).
async fn split_on(cluster: &TestCluster, id: u64, api: &str) -> Vec<(String, u32)> {
    let mut c = cluster.client(id).await;
    let apis = c.list_apis(true, "").await.unwrap();
    let a = apis.apis.iter().find(|a| a.name == api).unwrap();
    a.split
        .iter()
        .map(|s| (s.version.clone(), s.weight))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_canary_is_rolled_back_on_every_node_with_its_evidence() {
    let up = Upstream::start("u").await;
    let cluster = TestCluster::start(
        3,
        &harness::allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &[],
    )
    .await;
    let grpc: Vec<_> = (1..=3).map(|id| cluster.node(id).grpc).collect();
    let cpp = CpProcess::start(&grpc).await;
    let cp = cpp.sdk(&cluster.token);
    let key = api(&cp, &up, "shop", 1, 5).await;
    let proxies: Vec<_> = (1..=3).map(|id| cluster.node(id).proxy).collect();
    let (hook, hooked) = harness::webhook_sink().await;
    let load = traffic(proxies, "shop", &key, 100.0);
    // Warm: the stable's latency baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let r = cp
        .start_rollout(
            "shop",
            state::StartRollout {
                canary: "2.0.0".into(),
                steps: steps(&[10, 50], 120_000, 100),
                webhook: format!("http://{hook}/rollouts"),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .rollout
        .unwrap();
    assert_eq!((r.phase.as_str(), r.stable.as_str()), ("running", "1.0.0"));
    assert_eq!(
        split_on(&cluster, 1, "shop").await,
        [("1.0.0".into(), 90), ("2.0.0".into(), 10)]
    );
    let r = until_phase(&cp, "shop", "rolled_back", Duration::from_secs(120)).await;
    let took = started.elapsed();
    load.stop().await;
    eprintln!("rolled back after {took:?}");
    // Every node serves the stable version alone.
    for id in 1..=3 {
        let c = &cluster;
        eventually("the stable version alone on every node", T, async || {
            split_on(c, id, "shop").await == [("1.0.0".to_string(), 100)]
        })
        .await;
    }
    // The decision, with its evidence: the counts, the statistic over time, the
    // threshold, and failing calls with their request ids.
    let d = r.decisions.last().unwrap();
    assert_eq!(
        (d.action.as_str(), d.by.as_str(), d.weight),
        ("rollback", "judge", 0)
    );
    let e = d.evidence.as_ref().unwrap();
    let errors = e.metrics.iter().find(|m| m.metric == "errors").unwrap();
    assert!(errors.worse_statistic >= e.log_threshold, "{e:?}");
    assert!((e.log_threshold - (2.0f64 / 0.001).ln()).abs() < 1e-9);
    assert!(
        errors.canary_bad * 100 > errors.canary_requests * 2,
        "{errors:?}"
    );
    assert!(!e.history.is_empty());
    assert!(!e.failing.is_empty(), "failing calls named");
    assert!(
        e.failing
            .iter()
            .all(|f| f.status == 503 && f.request_id.len() == 32)
    );
    assert!(e.summary.contains("errors is worse"), "{}", e.summary);
    // The failing calls are in the call log.
    let logged = cp
        .query_calls(tollgate_sdk::node::CallQuery {
            request_id: e.failing[0].request_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(logged.records.len(), 1);
    assert_eq!(logged.records[0].version, "2.0.0");
    // Each transition POSTed to the webhook once, by the leader.
    let h = &hooked;
    eventually("the webhook told of both transitions", T, async || {
        h.lock().unwrap().len() >= 2
    })
    .await;
    let events = hooked.lock().unwrap().clone();
    let actions: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["start", "rollback"], "{events:?}");
    assert_eq!(events[1]["kind"], "rollout");
    assert_eq!(events[1]["canary_weight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_judge_mid_rollout_loses_no_decision() {
    let up = Upstream::start("u").await;
    let mut cluster = TestCluster::start(
        3,
        &harness::allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &[],
    )
    .await;
    let grpc: Vec<_> = (1..=3).map(|id| cluster.node(id).grpc).collect();
    let cpp = CpProcess::start(&grpc).await;
    let cp = cpp.sdk(&cluster.token);
    let key = api(&cp, &up, "shop", 1, 5).await;
    let proxies: Vec<_> = (1..=3).map(|id| cluster.node(id).proxy).collect();
    // A trickle until the judge is killed: counts for its checkpoints, far too few for a
    // verdict, so the verdict is the next judge's.
    let load = traffic(proxies.clone(), "shop", &key, 5.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.start_rollout(
        "shop",
        state::StartRollout {
            canary: "2.0.0".into(),
            steps: steps(&[10, 50], 120_000, 100),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The first checkpoint names the judge.
    let judge = {
        let deadline = Instant::now() + T;
        loop {
            let r = cp.get_rollout("shop").await.unwrap().rollout.unwrap();
            if let Some(e) = r.evidence.filter(|e| e.judge != 0) {
                break e.judge;
            }
            assert!(Instant::now() < deadline, "no checkpoint");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    load.stop().await;
    cluster.kill9(judge);
    let alive: Vec<u64> = cluster.up_ids();
    let proxies: Vec<_> = alive.iter().map(|id| cluster.node(*id).proxy).collect();
    // The control plane moves to the nodes left (the judge may have been the leader too).
    let load = traffic(proxies, "shop", &key, 100.0);
    let r = until_phase(&cp, "shop", "rolled_back", Duration::from_secs(120)).await;
    load.stop().await;
    // Start, then the rollback by another judge: nothing lost, nothing decided twice.
    let actions: Vec<&str> = r.decisions.iter().map(|d| d.action.as_str()).collect();
    assert_eq!(actions, ["start", "rollback"]);
    let e = r.decisions[1].evidence.as_ref().unwrap();
    assert_ne!(e.judge, judge, "the new owner judged");
    for id in alive {
        let c = &cluster;
        eventually("the stable version alone", T, async || {
            split_on(c, id, "shop").await == [("1.0.0".to_string(), 100)]
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canaries_are_promoted_little_traffic_waits_and_people_can_pause_and_abort() {
    let up = Upstream::start("u").await;
    let cluster = TestCluster::start(
        3,
        &harness::allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &[],
    )
    .await;
    let grpc: Vec<_> = (1..=3).map(|id| cluster.node(id).grpc).collect();
    let cpp = CpProcess::start(&grpc).await;
    let cp = cpp.sdk(&cluster.token);
    let proxies: Vec<_> = (1..=3).map(|id| cluster.node(id).proxy).collect();

    // Too little traffic: one call a second is no evidence either way.
    let slow_key = api(&cp, &up, "quiet", 0, 0).await;
    let load = traffic(proxies.clone(), "quiet", &slow_key, 1.0);
    cp.start_rollout(
        "quiet",
        state::StartRollout {
            canary: "2.0.0".into(),
            steps: steps(&[10, 50], 1_000, 10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = &cp;
    eventually("a checkpoint that says so", T, async || {
        let r = c.get_rollout("quiet").await.unwrap().rollout.unwrap();
        r.evidence
            .is_some_and(|e| e.summary.starts_with("not enough evidence yet"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r = cp.get_rollout("quiet").await.unwrap().rollout.unwrap();
    assert_eq!(
        (r.phase.as_str(), r.step),
        ("running", 0),
        "no verdict on little traffic"
    );
    assert_eq!(r.decisions.len(), 1);
    load.stop().await;

    // Pause, resume and abort by hand.
    let paused = cp
        .control_rollout("quiet", "pause", "a person looks")
        .await
        .unwrap()
        .rollout
        .unwrap();
    assert_eq!(paused.phase, "paused");
    assert_eq!(
        split_on(&cluster, 2, "quiet").await,
        [("1.0.0".into(), 90), ("2.0.0".into(), 10)]
    );
    let refused = cp.control_rollout("quiet", "pause", "").await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(tonic::Code::FailedPrecondition),
        "{refused}"
    );
    let resumed = cp
        .control_rollout("quiet", "resume", "")
        .await
        .unwrap()
        .rollout
        .unwrap();
    assert_eq!(resumed.phase, "running");
    let aborted = cp
        .control_rollout("quiet", "abort", "not today")
        .await
        .unwrap()
        .rollout
        .unwrap();
    assert_eq!(aborted.phase, "aborted");
    let actions: Vec<&str> = aborted
        .decisions
        .iter()
        .map(|d| d.action.as_str())
        .collect();
    assert_eq!(actions, ["start", "pause", "resume", "abort"]);
    assert!(
        aborted.decisions[3].by.starts_with("operator"),
        "{:?}",
        aborted.decisions[3]
    );
    for id in 1..=3 {
        let c = &cluster;
        eventually("aborted: the stable alone", T, async || {
            split_on(c, id, "quiet").await == [("1.0.0".to_string(), 100)]
        })
        .await;
    }

    // A healthy canary (no errors on either version) passes both steps and is promoted.
    let key = api(&cp, &up, "shop", 0, 0).await;
    let load = traffic(proxies, "shop", &key, 250.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.start_rollout(
        "shop",
        state::StartRollout {
            canary: "2.0.0".into(),
            steps: steps(&[20, 50], 5_000, 100),
            metrics: vec!["errors".into(), "latency".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = until_phase(&cp, "shop", "promoted", Duration::from_secs(240)).await;
    load.stop().await;
    let actions: Vec<&str> = r.decisions.iter().map(|d| d.action.as_str()).collect();
    assert_eq!(actions, ["start", "step", "promote"]);
    for d in &r.decisions[1..] {
        let e = d.evidence.as_ref().unwrap();
        assert!(
            e.metrics
                .iter()
                .all(|m| m.within_statistic >= e.log_threshold),
            "{e:?}"
        );
    }
    for id in 1..=3 {
        let c = &cluster;
        eventually("promoted on every node", T, async || {
            split_on(c, id, "shop").await == [("2.0.0".to_string(), 100)]
        })
        .await;
    }
}
