//! Cluster-wide quota benchmarks against real node processes (release build) on loopback.
//!
//! ```text
//! cargo bench --bench quotas -- [--windows 30] [--redis-port 6399]
//! ```
//! (`benches/quotas.sh` starts Redis and runs this.)
//!
//! 1. Accuracy: 3 nodes, traffic 70/20/10 across them (1,050 + 300 + 150 requests/s
//!    offered, open loop), a limit of 1,000 requests/s, `--windows` one-second windows;
//!    admitted per window, side by side in the same run, for:
//!    - Tollgate's cluster-wide quota (GCRA, the default for a second; and window counters),
//!    - a naive per-node split: 3 separate single-node gateways with 333/s each,
//!    - a central counter in Redis: one INCR per request before it is sent.
//! 2. Requests/s (closed loop, the same client for all, interleaved rounds, medians):
//!    without a quota, with a quota that admits everything, and with Redis INCR first.
//! 3. A day quota of 10,000 across 3 nodes, 15,000 requests offered: admitted, and the
//!    exported over-admission bound (its largest sum over the nodes during the run).
//! 4. kill -9 of the owner of the quota key mid-run (its traffic moves to the others): the
//!    windows after, until back within 3%.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use common::{arg, median, pct};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use harness::cluster::TestCluster;
use harness::{Body, GatewayProcess, NodeOpts, Upstream, full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type Http = Client<HttpConnector, Body>;
/// Where traffic goes: (url, requests/s).
type Targets = Vec<(String, u64)>;
/// A fault run when a window starts; it returns where traffic goes from then on.
type Fault = (u64, Box<dyn FnOnce() -> Targets + Send>);

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const LIMIT: u64 = 1000;
/// Half-open probes allowed across the cluster (circuit benchmark).
const PROBES: u64 = 3;
const RATES: [u64; 3] = [1050, 300, 150];

fn spec(up: &Upstream, limit: u64) -> String {
    format!(
        r#"upstreams:
  a: {{ endpoints: [{{ address: "{addr}" }}] }}
  c:
    endpoints: [{{ address: "{addr}" }}]
    circuit_breaker: {{ failure_rate: 25, min_calls: 10, consecutive_failures: 1000, window: 5s, open_for: 2s, half_open_probes: {PROBES} }}
routes:
  q: {{ match: {{ path: {{ prefix: /q }} }}, upstream: a }}
  w: {{ match: {{ path: {{ prefix: /w }} }}, upstream: a }}
  d: {{ match: {{ path: {{ prefix: /d }} }}, upstream: a }}
  big: {{ match: {{ path: {{ prefix: /big }} }}, upstream: a }}
  free: {{ match: {{ path: {{ prefix: /free }} }}, upstream: a }}
  c: {{ match: {{ path: {{ prefix: /c }} }}, upstream: c, rewrite: {{ replace_prefix: / }} }}
quotas:
  gcra: {{ scope: route, limit: {limit}, window: second, routes: [q] }}
  window: {{ scope: route, limit: {limit}, window: second, algorithm: window, routes: [w] }}
  day: {{ scope: route, limit: 10000, window: day, routes: [d] }}
  big: {{ scope: route, limit: 1000000000, window: second, routes: [big] }}
"#,
        addr = up.addr
    )
}

/// A central counter: INCR of the window's key, one round trip per request.
#[derive(Clone)]
struct Redis(redis::aio::MultiplexedConnection);

impl Redis {
    async fn admit(&mut self, window: u64, limit: u64) -> bool {
        let key = format!("q:{window}");
        let n: u64 = redis::cmd("INCR")
            .arg(&key)
            .query_async(&mut self.0)
            .await
            .expect("redis INCR");
        if n == 1 {
            let _: () = redis::cmd("EXPIRE")
                .arg(&key)
                .arg(10)
                .query_async(&mut self.0)
                .await
                .expect("redis EXPIRE");
        }
        n <= limit
    }
}

async fn get(http: &Http, url: &str) -> u16 {
    let req = http::Request::get(url).body(full("")).unwrap();
    match tokio::time::timeout(Duration::from_secs(5), http.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            status
        }
        _ => 0,
    }
}

/// Open loop: `targets` (url, requests/s) from the next whole second for `windows`
/// seconds; `redis` gates each request first. Admitted per window, by send time.
/// `at_window`: run once when that window starts (a fault), and may move traffic.
async fn paced(
    http: &Http,
    targets: Targets,
    windows: u64,
    redis: Option<Redis>,
    at_window: Option<Fault>,
) -> Vec<u64> {
    let start_s = wall_ms() / 1000 + 1;
    tokio::time::sleep(Duration::from_millis(start_s * 1000 - wall_ms())).await;
    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..windows).map(|_| AtomicU64::new(0)).collect());
    let mut targets = targets;
    let mut sent: Vec<u64> = vec![0; targets.len()];
    let mut fault = at_window;
    let began = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let now = wall_ms();
        let w = now / 1000 - start_s;
        if w >= windows {
            break;
        }
        if fault.as_ref().is_some_and(|(at, _)| *at == w) {
            let (_, f) = fault.take().unwrap();
            targets = f();
            let elapsed = began.elapsed().as_secs_f64();
            sent = targets
                .iter()
                .map(|(_, rate)| (elapsed * *rate as f64) as u64)
                .collect();
        }
        let elapsed = began.elapsed().as_secs_f64();
        for (i, (url, rate)) in targets.iter().enumerate() {
            let due = (elapsed * *rate as f64) as u64;
            while sent[i] < due {
                sent[i] += 1;
                let (http, url, admitted) = (http.clone(), url.clone(), admitted.clone());
                let mut redis = redis.clone();
                tasks.spawn(async move {
                    let window = wall_ms() / 1000;
                    let w = (window - start_s) as usize;
                    if let Some(r) = redis.as_mut()
                        && !r.admit(window, LIMIT).await
                    {
                        return;
                    }
                    if get(&http, &url).await == 200 && w < admitted.len() {
                        admitted[w].fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while tasks.join_next().await.is_some() {}
    admitted.iter().map(|a| a.load(Ordering::Relaxed)).collect()
}

/// Closed loop: `workers` tasks, each sending one request after another for `secs`;
/// requests per second.
async fn closed(http: &Http, url: &str, redis: Option<Redis>, workers: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (http, url, done) = (http.clone(), url.to_string(), done.clone());
        let mut redis = redis.clone();
        tasks.spawn(async move {
            while Instant::now() < deadline {
                if let Some(r) = redis.as_mut() {
                    r.admit(wall_ms() / 1000, u64::MAX).await;
                }
                if get(&http, &url).await == 200 {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    done.load(Ordering::Relaxed) as f64 / secs
}

fn error_pct(a: u64) -> f64 {
    (a as f64 - LIMIT as f64) / LIMIT as f64 * 100.0
}

/// Per-window rows, and the worst error after the first window.
fn report(columns: &[(&str, &[u64])]) {
    print!("| window |");
    for (name, _) in columns {
        print!(" {name} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(columns.len()));
    let n = columns[0].1.len();
    for w in 0..n {
        print!("| {w} |");
        for (_, xs) in columns {
            print!(" {} ({:+.1}%) |", xs[w], error_pct(xs[w]));
        }
        println!();
    }
    print!("| worst after the first |");
    for (_, xs) in columns {
        let worst = xs[1..]
            .iter()
            .map(|a| error_pct(*a).abs())
            .fold(0.0, f64::max);
        let within = xs[1..]
            .iter()
            .filter(|a| error_pct(**a).abs() <= 3.0)
            .count();
        print!(" {worst:.1}% ({within}/{} within 3%) |", xs.len() - 1);
    }
    println!();
}

async fn gauge_sum(nodes: &[&GatewayProcess], name: &str, quota: &str) -> f64 {
    let prefix = format!("{name}{{quota=\"{quota}\"}} ");
    let mut sum = 0.0;
    for n in nodes {
        sum += n
            .metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    sum
}

fn main() {
    let windows = arg("--windows", 30);
    let redis_port = arg("--redis-port", 6399);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let http: Http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build_http();
        let redis = redis::Client::open(format!("redis://127.0.0.1:{redis_port}/"))
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .map(Redis)
            .unwrap_or_else(|e| {
                panic!("Redis on 127.0.0.1:{redis_port} ({e}); benches/quotas.sh starts one")
            });
        let up = Upstream::start("a").await;
        let mut cluster = TestCluster::start(3, &spec(&up, LIMIT), &[]).await;
        if std::env::args().any(|a| a == "circuits") {
            circuits(&http, &cluster, arg("--n", 10)).await;
            return;
        }
        let naive: Vec<GatewayProcess> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(GatewayProcess::launch(NodeOpts::single(&spec(&up, LIMIT / 3), &[])).await);
            }
            v
        };
        let urls = |path: &str| -> Vec<(String, u64)> {
            (1..=3)
                .map(|id| (cluster.node(id).url(path), RATES[id as usize - 1]))
                .collect()
        };
        // `kill`: only the owner-kill run.
        if !std::env::args().any(|a| a == "kill") {
        let only_throughput = std::env::args().any(|a| a == "throughput");
        if !only_throughput {
        println!(
            "## Accuracy: limit {LIMIT}/s, offered {:?} requests/s (70/20/10), {windows} windows\n",
            RATES
        );
        let gcra = paced(&http, urls("/q"), windows, None, None).await;
        let window = paced(&http, urls("/w"), windows, None, None).await;
        let naive_targets = naive
            .iter()
            .zip(RATES)
            .map(|(n, r)| (n.url("/q"), r))
            .collect();
        let naive_split = paced(&http, naive_targets, windows, None, None).await;
        let central = paced(&http, urls("/free"), windows, Some(redis.clone()), None).await;
        report(&[
            ("tollgate gcra", &gcra),
            ("tollgate window", &window),
            ("naive limit/3 per node", &naive_split),
            ("redis INCR", &central),
        ]);

        }
        println!(
            "\n## Requests/s, closed loop, 16 workers to node 1, 9 rounds of 2 s (order rotated each round), medians\n"
        );
        let (mut free, mut quota, mut central) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..9 {
            for k in 0..3 {
                match (round + k) % 3 {
                    0 => free.push(closed(&http, &cluster.node(1).url("/free"), None, 16, 2.0).await),
                    1 => quota.push(closed(&http, &cluster.node(1).url("/big"), None, 16, 2.0).await),
                    _ => central.push(
                        closed(&http, &cluster.node(1).url("/free"), Some(redis.clone()), 16, 2.0)
                            .await,
                    ),
                }
            }
        }
        // Per-round ratios too: neighbouring runs share the machine's mood.
        let ratios: Vec<f64> = quota.iter().zip(&free).map(|(q, f)| q / f).collect();
        println!("quota/no-quota per round: {:?}\n", ratios.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>());
        let (free, quota, central) = (median(free), median(quota), median(central));
        println!("| client | requests/s | vs no quota |\n|---|---|---|");
        println!("| no quota | {free:.0} | 1.00 |");
        println!(
            "| tollgate quota (admits all) | {quota:.0} | {:.3} |",
            quota / free
        );
        println!(
            "| redis INCR, then the request | {central:.0} | {:.3} |",
            central / free
        );
        if only_throughput {
            if std::env::var("BENCH_DEBUG").is_ok() {
                for l in cluster.node(1).metrics().await.lines() {
                    if l.starts_with("tollgate_quota_waits_total")
                        || l.starts_with("tollgate_quota_requests_total")
                    {
                        eprintln!("{l}");
                    }
                }
            }
            return;
        }

        println!("\n## A day quota of 10,000 across 3 nodes, 15,000 requests offered\n");
        let nodes: Vec<&GatewayProcess> = (1..=3).map(|id| cluster.node(id)).collect();
        let admitted = Arc::new(AtomicU64::new(0));
        let mut max_bound: f64 = 0.0;
        for chunk in 0..15 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..1000u64 {
                // 70/20/10 by request number.
                let node = match i % 10 {
                    0..=6 => 0,
                    7 | 8 => 1,
                    _ => 2,
                };
                let (http, url, admitted) = (http.clone(), nodes[node].url("/d"), admitted.clone());
                tasks.spawn(async move {
                    if get(&http, &url).await == 200 {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                });
                if i % 50 == 49 {
                    while tasks.join_next().await.is_some() {}
                }
            }
            while tasks.join_next().await.is_some() {}
            let bound = gauge_sum(&nodes, "tollgate_quota_overadmission_bound", "day").await;
            max_bound = max_bound.max(bound);
            if chunk == 14 {
                break;
            }
        }
        let admitted = admitted.load(Ordering::Relaxed);
        println!("| offered | admitted | limit | largest exported bound | within limit + bound |");
        println!("|---|---|---|---|---|");
        println!(
            "| 15000 | {admitted} | 10000 | {max_bound} | {} |",
            admitted as f64 <= 10_000.0 + max_bound
        );
        }

        println!("\n## kill -9 of the owner of the `window` key at window 4 (its traffic moves)\n");
        // A request makes node 1 hold a lease again (idle ones are dropped); the next
        // tick names its owner.
        let mut owner = None;
        for _ in 0..100 {
            get(&http, &cluster.node(1).url("/w")).await;
            owner = cluster.node(1).admin_get("/quotas").await.json()["leases"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["quota"] == "window")
                .and_then(|l| l["owner"].as_u64());
            if owner.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let owner = owner.expect("an owner for the window key");
        let survivors: Vec<u64> = (1..=3).filter(|id| *id != owner).collect();
        let moved: Vec<(String, u64)> = {
            // The killed node's share goes to the first survivor.
            let mut v: Vec<(String, u64)> = survivors
                .iter()
                .map(|id| (cluster.node(*id).url("/w"), RATES[*id as usize - 1]))
                .collect();
            v[0].1 += RATES[owner as usize - 1];
            v
        };
        let pid = cluster.node(owner).pid();
        let kill_windows = 12;
        let after = paced(
            &http,
            urls("/w"),
            kill_windows,
            None,
            Some((
                4,
                Box::new(move || {
                    let _ = std::process::Command::new("kill")
                        .args(["-9", &pid.to_string()])
                        .status();
                    moved
                }),
            )),
        )
        .await;
        cluster.kill9(owner);
        println!("owner was node {owner}\n");
        report(&[("tollgate window", &after)]);
        let back = after[4..].iter().position(|a| error_pct(*a).abs() <= 3.0);
        println!(
            "\nwindows from the kill until within 3% (0: the window it happened in): {}",
            back.map(|b| b.to_string()).unwrap_or("never".into())
        );
    });
}

fn row(name: &str, mut xs: Vec<f64>) -> String {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
        xs.len(),
        pct(&xs, 50.0),
        pct(&xs, 99.0),
        xs.last().copied().unwrap_or(f64::NAN)
    )
}

/// One task per node sending `/c/ok` until the node answers `circuit_open`; the time from
/// `start` to each node's first refusal (ms), or None past `limit`.
async fn until_open(
    http: &Http,
    cluster: &TestCluster,
    start: Instant,
    limit: Duration,
) -> Vec<Option<f64>> {
    let mut tasks = Vec::new();
    for id in 1..=3 {
        let (http, url) = (http.clone(), cluster.node(id).url("/c/ok"));
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < limit {
                if get(&http, &url).await == 503 {
                    return Some(start.elapsed().as_secs_f64() * 1000.0);
                }
            }
            None
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn probes_total(cluster: &TestCluster) -> u64 {
    let mut sum = 0;
    for id in 1..=3 {
        sum += cluster
            .node(id)
            .metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_circuit_probes_total{upstream=\"c\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    sum
}

/// Circuits: detection (one node's traffic fails), half-open probes and recovery, and an
/// operator's force-open, each repeated `n` times.
async fn circuits(http: &Http, cluster: &TestCluster, n: u64) {
    use tollgate_sdk::state::CircuitMode;
    let mut client = cluster.client(1).await;
    let reset = async |client: &mut tollgate_sdk::NodeClient| {
        client
            .force_circuit("c", CircuitMode::Auto, "bench reset")
            .await
            .expect("reset the circuit");
        for id in 1..=3 {
            let url = cluster.node(id).url("/c/ok");
            let deadline = Instant::now() + Duration::from_secs(5);
            while get(http, &url).await != 200 && Instant::now() < deadline {}
        }
    };
    let (mut detect, mut recover, mut probes, mut forced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut missed = 0;
    for _ in 0..n {
        reset(&mut client).await;
        // Node 1's traffic fails (4 senders asking for 500s); every node also sends
        // successes. The clock starts with the first failure.
        let start = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut failing = Vec::new();
        for _ in 0..4 {
            let (http, url, stop) = (
                http.clone(),
                cluster.node(1).url("/c/status/500"),
                stop.clone(),
            );
            failing.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(10) {
                    get(&http, &url).await;
                }
            }));
        }
        let opened = until_open(http, cluster, start, Duration::from_secs(10)).await;
        stop.store(true, Ordering::Relaxed);
        for f in failing {
            let _ = f.await;
        }
        match opened.iter().copied().collect::<Option<Vec<f64>>>() {
            Some(times) => detect.push(times.into_iter().fold(0.0, f64::max)),
            None => {
                missed += 1;
                continue;
            }
        }
        // Recovery: the upstream is fine; every node keeps sending until it serves again.
        let before = probes_total(cluster).await;
        let list = client.list_circuits().await.expect("list circuits");
        let until = list
            .circuits
            .iter()
            .find(|c| c.upstream == "c")
            .map(|c| c.open_until_ms)
            .unwrap_or(0);
        let half_open_in = Duration::from_millis(until.saturating_sub(list.now_ms));
        let half_open_at = Instant::now() + half_open_in;
        let mut tasks = Vec::new();
        for id in 1..=3 {
            let (http, url) = (http.clone(), cluster.node(id).url("/c/ok"));
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                // Served twice in a row: closed, not a lucky probe.
                let mut served = 0;
                while served < 2 && Instant::now() < deadline {
                    let t = Instant::now();
                    let code = get(&http, &url).await;
                    if std::env::var("BENCH_DEBUG").is_ok()
                        && t.elapsed() > Duration::from_millis(500)
                    {
                        eprintln!("node {id}: {code} after {:?}", t.elapsed());
                    }
                    if code == 200 {
                        served += 1;
                    } else {
                        served = 0;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Instant::now()
            }));
        }
        let mut last = Instant::now();
        for t in tasks {
            last = last.max(t.await.unwrap());
        }
        recover.push(last.saturating_duration_since(half_open_at).as_secs_f64() * 1000.0);
        if std::env::var("BENCH_DEBUG").is_ok() && recover.last().is_some_and(|r| *r > 1000.0) {
            eprintln!("slow recovery; half-open was due at {half_open_in:?} after the list");
            for id in 1..=3 {
                for l in
                    cluster.node(id).log().lines().filter(|l| {
                        l.contains("DEBUGCIRCUIT") || l.contains("changed for the whole")
                    })
                {
                    eprintln!("node {id}: {l}");
                }
            }
        }
        probes.push((probes_total(cluster).await - before) as f64);
    }
    for _ in 0..2 * n {
        reset(&mut client).await;
        let start = Instant::now();
        let watch = until_open(http, cluster, start, Duration::from_secs(5));
        let force = client.force_circuit("c", CircuitMode::ForcedOpen, "bench");
        let (opened, forced_ok) = tokio::join!(watch, force);
        forced_ok.expect("force open");
        match opened.iter().copied().collect::<Option<Vec<f64>>>() {
            Some(times) => forced.push(times.into_iter().fold(0.0, f64::max)),
            None => missed += 1,
        }
    }
    reset(&mut client).await;
    println!("## Circuits: 3 nodes, upstream failing for node 1's traffic only\n");
    println!("| measure | n | p50 | p99 | max |\n|---|---|---|---|---|");
    println!(
        "{}",
        row("first failure -> every node refuses (open)", detect)
    );
    println!(
        "{}",
        row("half-open -> every node serves again (closed)", recover)
    );
    println!("{}", row("force-open sent -> every node refuses", forced));
    let most = probes.iter().copied().fold(0.0, f64::max);
    println!(
        "\nhalf-open probes per recovery (limit {PROBES}): {:?}, most {most}; missed runs: {missed}",
        probes
    );
}
