//! How fast a faulty canary is rolled back, and what the Flagger-style threshold rule does
//! on the same traffic (docs/benchmarks.md, "Rollouts").
//!
//! ```text
//! cargo bench --bench rollouts -- [--runs 1000] [--cluster-runs 5]
//! ```
//!
//! 1. The judge (`tollgate_node::rollout::judge::Book`, the code the owner node runs) fed
//!    the reports three nodes send every 25 ms, on simulated traffic: 100 requests a
//!    second, the canary at 10% failing 5% of calls, the stable 1%. `--runs` rollouts: the
//!    time to the verdict and the canary's failed requests until then.
//! 2. The same on a real 3-node cluster (`--cluster-runs` times): from the rollout's start
//!    to the stable version alone on every node, polled every 100 ms.
//! 3. Flagger's default analysis on the same simulated traffic: every 1-minute interval, a
//!    check of the canary's success rate against 99%, rollback after 5 failed checks;
//!    its time to roll back, and how often it rolls back a healthy canary (1% errors, like
//!    the stable) at low traffic, against the judge on the same traffic.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use common::{arg, pct};
use tollgate_node::rollout::judge::{Action, Book};
use tollgate_proto::actor::v1::{RolloutReport, VersionCounts};
use tollgate_proto::state::v1 as state;

fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
    (0..n).filter(|_| rng.f64() < p).count() as u64
}

fn poisson(rng: &mut fastrand::Rng, mean: f64) -> u64 {
    if mean > 30.0 {
        // A binomial of the same mean: close enough for a minute's requests.
        return binomial(rng, (mean * 2.0) as u64, 0.5);
    }
    // Knuth's method: fine for the small means of one 25 ms report.
    let l = (-mean).exp();
    let (mut k, mut p) = (0, 1.0);
    loop {
        p *= rng.f64();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

fn rollout(min_ms: u64) -> state::RolloutState {
    state::RolloutState {
        api: "shop".into(),
        id: 1,
        canary: "2.0.0".into(),
        stable: "1.0.0".into(),
        steps: vec![state::RolloutStep {
            weight: 10,
            min_ms,
            min_requests: 100,
        }],
        phase: "running".into(),
        level: 0.001,
        metrics: vec!["errors".into(), "latency".into()],
        ..Default::default()
    }
}

/// One simulated rollout: the judge's first verdict (pass?), when (s), and the canary's
/// failed requests until then.
fn simulate(
    rng: &mut fastrand::Rng,
    rps: f64,
    weight: f64,
    stable_rate: f64,
    canary_rate: f64,
    limit_s: u64,
) -> Option<(bool, f64, u64)> {
    let r = rollout(u64::MAX);
    let mut book = Book::new(&r, 0, 1);
    let mut canary_failed = 0;
    let tick = 25;
    let mut now = 0;
    while now < limit_s * 1000 {
        now += tick;
        for _ in 0..3 {
            let n = poisson(rng, rps / 3.0 * tick as f64 / 1000.0);
            let nc = binomial(rng, n, weight);
            let ns = n - nc;
            let (kc, ks) = (
                binomial(rng, nc, canary_rate),
                binomial(rng, ns, stable_rate),
            );
            canary_failed += kc;
            // Latencies alike: a few buckets around 1 ms.
            let lat = |rng: &mut fastrand::Rng, n: u64| {
                let mut h = std::collections::BTreeMap::new();
                for _ in 0..n {
                    *h.entry(40 + rng.u32(0..4)).or_default() += 1;
                }
                h
            };
            let report = RolloutReport {
                api: "shop".into(),
                rollout: 1,
                step: 0,
                versions: vec![
                    VersionCounts {
                        version: "2.0.0".into(),
                        requests: nc,
                        errors: kc,
                        latency: lat(rng, nc),
                        ..Default::default()
                    },
                    VersionCounts {
                        version: "1.0.0".into(),
                        requests: ns,
                        errors: ks,
                        latency: lat(rng, ns),
                        ..Default::default()
                    },
                ],
            };
            book.observe(&report, &r, now);
        }
        if let Action::Verdict { pass, .. } = book.evaluate(&r, now) {
            return Some((pass, now as f64 / 1000.0, canary_failed));
        }
    }
    None
}

/// Flagger's rule on the same traffic: each `interval_s`, the canary's success rate over
/// the interval against `min_success`; rollback after `threshold` failed checks, within
/// `checks` intervals. (Time of the rollback, or None.)
fn flagger(
    rng: &mut fastrand::Rng,
    rps: f64,
    weight: f64,
    canary_rate: f64,
    checks: u32,
) -> Option<f64> {
    // Flagger's documented example: a 1-minute interval, threshold 5, success rate >= 99%.
    let (interval_s, threshold, min_success) = (60.0, 5, 0.99);
    let mut failed = 0;
    for i in 1..=checks {
        let total = poisson(rng, rps * interval_s);
        let n = binomial(rng, total, weight);
        let errors = binomial(rng, n, canary_rate);
        // No traffic: Flagger's NaN; counted as a failed check here, as its default
        // Prometheus query with no samples reads (flagger#1035).
        let success = if n == 0 {
            f64::NAN
        } else {
            1.0 - errors as f64 / n as f64
        };
        if success.is_nan() || success < min_success {
            failed += 1;
        }
        if failed >= threshold {
            return Some(i as f64 * interval_s);
        }
    }
    None
}

fn main() {
    let runs = arg("--runs", 1000usize);
    let cluster_runs = arg("--cluster-runs", 5usize);
    let mut rng = fastrand::Rng::with_seed(21);

    println!(
        "## The judge on simulated traffic: 100 requests/s, canary 10% failing 5%, stable 1%\n"
    );
    let mut times = Vec::new();
    let mut failed = Vec::new();
    let mut wrong = 0;
    for _ in 0..runs {
        match simulate(&mut rng, 100.0, 0.1, 0.01, 0.05, 600) {
            Some((false, t, f)) => {
                times.push(t);
                failed.push(f as f64);
            }
            _ => wrong += 1,
        }
    }
    times.sort_by(f64::total_cmp);
    failed.sort_by(f64::total_cmp);
    println!(
        "{runs} rollouts: verdict `worse` in {} (other or none: {wrong}); time to the verdict p50 {:.1} s, p95 {:.1} s, max {:.1} s; the canary's failed requests until then p50 {:.0}, p95 {:.0}",
        times.len(),
        pct(&times, 50.0),
        pct(&times, 95.0),
        pct(&times, 100.0),
        pct(&failed, 50.0),
        pct(&failed, 95.0)
    );

    println!(
        "\n## Flagger's default rule on the same traffic (1-minute interval, threshold 5, success rate >= 99%)\n"
    );
    let mut ftimes: Vec<f64> = (0..runs)
        .filter_map(|_| flagger(&mut rng, 100.0, 0.1, 0.05, 30))
        .collect();
    ftimes.sort_by(f64::total_cmp);
    println!(
        "time to roll back p50 {:.0} s, p95 {:.0} s ({} of {runs} rolled back within 30 minutes); the canary fails about {:.0} requests meanwhile (5% of 10 a second)",
        pct(&ftimes, 50.0),
        pct(&ftimes, 95.0),
        ftimes.len(),
        pct(&ftimes, 50.0) * 10.0 * 0.05
    );

    println!(
        "\n## A healthy canary (1% errors, like the stable) at low traffic: rolled back by mistake\n"
    );
    println!("| requests/s | Flagger rule | the judge (level 0.001), 30 minutes |");
    println!("|---|---|---|");
    let healthy_runs = (runs / 5).max(50);
    for rps in [0.5, 2.0, 10.0, 50.0] {
        let fl = (0..healthy_runs)
            .filter(|_| flagger(&mut rng, rps, 0.1, 0.01, 10).is_some())
            .count();
        let judged = (0..healthy_runs)
            .filter(|_| {
                matches!(
                    simulate(&mut rng, rps, 0.1, 0.01, 0.01, 1800),
                    Some((false, ..))
                )
            })
            .count();
        println!(
            "| {rps} | {fl} of {healthy_runs} ({:.1}%) | {judged} of {healthy_runs} ({:.1}%) |",
            fl as f64 * 100.0 / healthy_runs as f64,
            judged as f64 * 100.0 / healthy_runs as f64
        );
    }

    if cluster_runs == 0 {
        return;
    }
    println!("\n## On a real 3-node cluster: start to the stable version alone on every node\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut flips = Vec::new();
        for run in 0..cluster_runs {
            let t = cluster_run(run).await;
            println!("run {}: {:.1} s", run + 1, t);
            flips.push(t);
        }
        flips.sort_by(f64::total_cmp);
        println!(
            "\n{cluster_runs} runs: p50 {:.1} s, p95 {:.1} s, max {:.1} s (target p95 < 60 s)",
            pct(&flips, 50.0),
            pct(&flips, 95.0),
            pct(&flips, 100.0)
        );
    });
}

/// One faulty rollout on a fresh 3-node cluster: seconds from the start to the stable
/// version alone on every node.
async fn cluster_run(run: usize) -> f64 {
    use harness::cluster::TestCluster;
    use harness::cp::CpProcess;
    use harness::{Body, Upstream, full};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    let up = Upstream::start("u").await;
    let cluster = TestCluster::start(
        3,
        &harness::allowing_loopback("upstreams: {}\nroutes: {}\n"),
        &["--call-log", "off"],
    )
    .await;
    let grpc: Vec<_> = (1..=3).map(|id| cluster.node(id).grpc).collect();
    let cpp = CpProcess::start(&grpc).await;
    let cp = cpp.sdk(&cluster.token);
    let content = |bad: usize| {
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
    };
    cp.create_tenant("acme").await.unwrap();
    cp.create_api(
        "shop",
        "acme",
        Some(state::ApiSettings {
            base_path: "/shop".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    cp.create_version("shop", "1.0.0", &content(1))
        .await
        .unwrap();
    cp.publish("shop", "1.0.0").await.unwrap();
    cp.create_version("shop", "2.0.0", &content(5))
        .await
        .unwrap();
    cp.publish("shop", "2.0.0").await.unwrap();
    cp.set_split("shop", &[("1.0.0", 100)]).await.unwrap();
    let key = cp.create_key("acme", "k", "").await.unwrap().secret;
    let proxies: Vec<_> = (1..=3).map(|id| cluster.node(id).proxy).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let load = tokio::spawn(async move {
        let c: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut i: u64 = fastrand::u64(..100);
        while !s.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            tick.tick().await;
            let req = http::Request::get(format!(
                "http://{}/shop/e/{}",
                proxies[i as usize % 3],
                i % 100
            ))
            .header("x-api-key", &key)
            .body(full(""))
            .unwrap();
            let c = c.clone();
            tokio::spawn(async move {
                if let Ok(Ok(r)) =
                    tokio::time::timeout(Duration::from_secs(5), c.request(req)).await
                {
                    let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                }
            });
            i += 1;
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    cp.start_rollout(
        "shop",
        state::StartRollout {
            canary: "2.0.0".into(),
            steps: vec![state::RolloutStep {
                weight: 10,
                min_ms: 600_000,
                min_requests: 100,
            }],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut clients = Vec::new();
    for id in 1..=3 {
        clients.push(cluster.client(id).await);
    }
    let took = loop {
        let rolled_back = cp
            .get_rollout("shop")
            .await
            .ok()
            .and_then(|r| r.rollout)
            .is_some_and(|r| r.phase == "rolled_back");
        let mut all = rolled_back;
        for c in &mut clients {
            let apis = c.list_apis(true, "").await.unwrap();
            let a = apis.apis.iter().find(|a| a.name == "shop").unwrap();
            all &= a.split.len() == 1 && a.split[0].version == "1.0.0";
        }
        if all {
            break started.elapsed().as_secs_f64();
        }
        assert!(
            Instant::now() < deadline,
            "run {run}: no rollback within 240 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.await;
    took
}
