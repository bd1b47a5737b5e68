//! Raft cluster benchmarks against real node processes (release build) on loopback.
//!
//! ```text
//! cargo bench --bench raft_cluster -- propagation [--n 200]
//! cargo bench --bench raft_cluster -- latency [--n 500] [--blocks 10]
//! cargo bench --bench raft_cluster -- failover [--iterations 5]
//! cargo bench --bench raft_cluster -- revoke [--n 50]
//! cargo bench --bench raft_cluster -- mtls [--rounds 3] [--n 200] [--iterations 3]
//! ```
//!
//! - propagation: for each of N sequential applies, the time from its acknowledgement to
//!   every node's data plane serving the new generation (each node polled over gRPC in a
//!   tight loop by its own task).
//! - latency: N sequential applies (one in flight) through the leader and through a
//!   follower, interleaved in blocks; the payload is a spec of a fixed size (printed, so
//!   the etcd comparison can use the same value size).
//! - failover: kill -9 of the leader, then an apply fired at a survivor every 20 ms (each
//!   with a 2 s deadline); the time to the first acknowledged one, and to a new leader.
//!
//! - revoke: N API keys, each revoked after every node has served it; the time from the
//!   revoke being sent to its acknowledgement, and to every node's data plane refusing
//!   the key (one task per node sending requests with it in a tight loop).
//!
//! `benches/raft_vs_etcd.sh` runs these beside the 3-member etcd of benches/baseline.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use common::{arg, cpu_seconds, pct};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::Upstream;
use harness::cluster::{TestCluster, tagged_spec};
use tollgate_sdk::NodeClient;

fn summary(name: &str, mut xs: Vec<f64>) -> String {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    format!(
        "| {name} | {} | {mean:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        xs.len(),
        pct(&xs, 50.0),
        pct(&xs, 90.0),
        pct(&xs, 99.0),
        xs.last().copied().unwrap_or(f64::NAN)
    )
}

/// user + system CPU seconds of a process so far.
const HEADER: &str =
    "| measure | n | mean | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|";

/// A spec of exactly `size` bytes (padded with a YAML comment), tagged `tag`.
fn sized_spec(up: std::net::SocketAddr, tag: &str, size: usize) -> String {
    let mut s = tagged_spec(up, tag);
    if s.len() + 3 < size {
        s.push_str("# ");
        s.push_str(&"x".repeat(size - s.len() - 1));
        s.push('\n');
    }
    s
}

/// What one node's watcher saw: the latest generation served, and when each appeared.
type Watched = (AtomicU64, std::sync::Mutex<Vec<(u64, Instant)>>);

async fn propagation(n: usize) {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let mut client = c.client(leader).await;
    // One watcher per node: the latest generation it has seen served, and when.
    let seen: Vec<Arc<Watched>> = c
        .ids()
        .iter()
        .map(|_| Arc::new((AtomicU64::new(0), std::sync::Mutex::new(Vec::new()))))
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut watchers = Vec::new();
    for (i, id) in c.ids().into_iter().enumerate() {
        let addr = c.node(id).grpc.to_string();
        let (seen, stop, tls) = (seen[i].clone(), stop.clone(), c.tls.clone());
        watchers.push(tokio::spawn(async move {
            let mut nc = NodeClient::connect(&addr, &tls).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = nc.status().await {
                    let g = s.spec_generation;
                    if g > seen.0.load(Ordering::Relaxed) {
                        seen.0.store(g, Ordering::Relaxed);
                        seen.1.lock().unwrap().push((g, Instant::now()));
                    }
                }
            }
        }));
    }
    let mut acks = Vec::new();
    for i in 1..=n {
        let r = client
            .apply_spec(tagged_spec(up.addr, &i.to_string()), false, "")
            .await
            .unwrap();
        acks.push((r.generation, Instant::now()));
        // Wait until every node serves it before the next apply (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen
            .iter()
            .any(|s| s.0.load(Ordering::Relaxed) < r.generation)
        {
            assert!(
                Instant::now() < deadline,
                "generation {} not served everywhere within 10s",
                r.generation
            );
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in watchers {
        let _ = w.await;
    }
    let mut all = Vec::new();
    let mut slowest_follower = Vec::new();
    for (g, acked) in &acks {
        let times: Vec<Instant> = seen
            .iter()
            .map(|s| {
                s.1.lock()
                    .unwrap()
                    .iter()
                    .find(|(sg, _)| sg >= g)
                    .map(|(_, t)| *t)
                    .unwrap()
            })
            .collect();
        let last = times.iter().max().unwrap();
        all.push(last.saturating_duration_since(*acked).as_secs_f64() * 1000.0);
        slowest_follower.push(last.saturating_duration_since(*acked).as_secs_f64() * 1000.0);
    }
    println!("## propagation: acknowledgement -> every node serving the new generation\n");
    println!("3 nodes, {n} sequential applies through the leader; each node polled over gRPC.\n");
    println!("{HEADER}");
    println!("{}", summary("ack -> served on all 3 nodes", all));
}

async fn latency(
    n: usize,
    blocks: usize,
    nodes: u64,
    flags: &[&str],
    print: bool,
) -> [Vec<f64>; 2] {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(nodes, &tagged_spec(up.addr, "0"), flags).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = c
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .unwrap_or(leader);
    let size = sized_spec(up.addr, "00000000", 256).len();
    let mut clients = [
        ("leader", c.client(leader).await),
        ("follower", c.client(follower).await),
    ];
    let mut seq = 0u64;
    for (_, cl) in clients.iter_mut() {
        for _ in 0..20 {
            seq += 1;
            cl.apply_spec(sized_spec(up.addr, &format!("{seq:08}"), 256), false, "")
                .await
                .unwrap();
        }
    }
    let mut lat: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let per_block = (n / blocks).max(1);
    let pids: Vec<u32> = c.ids().iter().map(|id| c.node(*id).pid()).collect();
    let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    for b in 0..blocks {
        for k in 0..2 {
            let k = (k + b) % 2;
            for _ in 0..per_block {
                seq += 1;
                let spec = sized_spec(up.addr, &format!("{seq:08}"), 256);
                let t0 = Instant::now();
                clients[k].1.apply_spec(spec, false, "").await.unwrap();
                lat[k].push(t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    let cpu = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu_before;
    let writes = (lat[0].len() + lat[1].len()) as f64;
    if !print {
        return lat;
    }
    println!("## write latency: sequential applies, one in flight\n");
    println!(
        "CPU (user+sys) of all {nodes} node processes per write: {:.2} ms",
        cpu * 1000.0 / writes
    );
    println!(
        "{nodes} nodes; spec payload {size} bytes; {} applies per path, interleaved in {blocks} blocks.\n",
        per_block * blocks
    );
    println!("{HEADER}");
    println!(
        "{}",
        summary("apply via leader", std::mem::take(&mut lat[0]))
    );
    println!(
        "{}",
        summary(
            "apply via follower (forwarded)",
            std::mem::take(&mut lat[1])
        )
    );
    lat
}

async fn failover(iterations: usize, flags: &[&str], print: bool) -> [Vec<f64>; 2] {
    let up = Upstream::start("a").await;
    let mut c = TestCluster::start(3, &tagged_spec(up.addr, "0"), flags).await;
    let mut first_ok = Vec::new();
    let mut new_leader = Vec::new();
    let mut seq = 0u64;
    for it in 0..iterations {
        let old = c.leader(Duration::from_secs(20)).await;
        let survivor = c.ids().into_iter().find(|id| *id != old).unwrap();
        let addr = c.node(survivor).grpc.to_string();
        let mut probe = NodeClient::connect(&addr, &c.tls)
            .await
            .unwrap()
            .with_token(Some(&c.token))
            .unwrap();
        probe
            .apply_spec(tagged_spec(up.addr, &format!("warm-{it}")), false, "")
            .await
            .unwrap();
        let t0 = Instant::now();
        c.kill9(old);
        let done = Arc::new(std::sync::Mutex::new(None::<Duration>));
        let mut probes = Vec::new();
        while done.lock().unwrap().is_none() && t0.elapsed() < Duration::from_secs(30) {
            seq += 1;
            let (mut p, done, spec) = (
                probe.clone(),
                done.clone(),
                tagged_spec(up.addr, &format!("fo-{seq}")),
            );
            probes.push(tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_secs(2), p.apply_spec(spec, false, ""))
                    .await;
                if let Ok(Ok(_)) = r {
                    let mut d = done.lock().unwrap();
                    let t = t0.elapsed();
                    if d.is_none_or(|x| t < x) {
                        *d = Some(t);
                    }
                }
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ok = done
            .lock()
            .unwrap()
            .expect("an acknowledged apply within 30s");
        let mut poll = NodeClient::connect(&addr, &c.tls).await.unwrap();
        let leader_at = loop {
            if let Ok(s) = poll.cluster_status().await
                && s.leader.is_some_and(|l| l != old)
            {
                break t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        for p in probes {
            p.abort();
        }
        first_ok.push(ok.as_secs_f64() * 1000.0);
        new_leader.push(leader_at.as_secs_f64() * 1000.0);
        eprintln!("failover {it}: first acknowledged apply after {ok:?}");
        c.restart(old).await;
        // Settle: every node serves the latest generation again.
        let g = probe
            .read_spec(false)
            .await
            .map(|r| r.generation)
            .unwrap_or(0);
        c.wait_serving(g, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if !print {
        return [first_ok, new_leader];
    }
    println!("## failover: kill -9 of the leader\n");
    println!(
        "3 nodes, {iterations} iterations; applies fired at a survivor every 20 ms, 2 s deadline each.\n"
    );
    println!("{HEADER}");
    println!(
        "{}",
        summary("first acknowledged apply after the kill", first_ok.clone())
    );
    println!(
        "{}",
        summary(
            "(new leader known by the survivor, polled after)",
            new_leader.clone()
        )
    );
    [first_ok, new_leader]
}

/// The status of a GET with an API key.
async fn status_with_key(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        harness::Body,
    >,
    url: &str,
    key: &str,
) -> u16 {
    let req = http::Request::get(url)
        .header("x-api-key", key)
        .body(harness::full(""))
        .unwrap();
    match client.request(req).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = http_body_util::BodyExt::collect(r.into_body()).await;
            status
        }
        Err(_) => 0,
    }
}

async fn revoke(n: usize) {
    use tollgate_sdk::state::{self as pb, access_command, api_command, version_transition::To};
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let mut client = c.client(leader).await;
    let write = async |client: &mut NodeClient, kind: pb::command::Kind| {
        client
            .write(pb::Command {
                kind: Some(kind),
                ..Default::default()
            })
            .await
            .unwrap()
    };
    let api = |op| {
        pb::command::Kind::Api(pb::ApiCommand {
            api: "orders".into(),
            op: Some(op),
        })
    };
    let access = |op| {
        pb::command::Kind::Access(pb::AccessCommand {
            tenant: "acme".into(),
            op: Some(op),
        })
    };
    let content = format!(
        "upstreams: {{ u: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }} }}\n",
        up.addr
    );
    write(
        &mut client,
        access(access_command::Op::CreateTenant(Default::default())),
    )
    .await;
    for op in [
        api_command::Op::CreateApi(pb::CreateApi {
            tenant: "acme".into(),
            settings: Some(pb::ApiSettings {
                base_path: "/orders".into(),
                ..Default::default()
            }),
        }),
        api_command::Op::CreateVersion(pb::CreateVersion {
            version: "1.0.0".into(),
            content,
        }),
        api_command::Op::Transition(pb::VersionTransition {
            version: "1.0.0".into(),
            to: Some(To::Publish(Default::default())),
        }),
        api_command::Op::Promote(pb::Promote {
            version: "1.0.0".into(),
        }),
    ] {
        write(&mut client, api(op)).await;
    }
    let urls: Vec<String> = c
        .ids()
        .iter()
        .map(|id| c.node(*id).url("/orders/x"))
        .collect();
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<harness::Body>();
    let (mut acked, mut everywhere) = (Vec::new(), Vec::new());
    for i in 0..n {
        let made = write(
            &mut client,
            access(access_command::Op::CreateKey(pb::CreateCredential {
                name: format!("k{i}"),
                ..Default::default()
            })),
        )
        .await;
        let key = made.secret;
        // Every node takes the key before it is revoked.
        for url in &urls {
            let deadline = Instant::now() + Duration::from_secs(10);
            while status_with_key(&http, url, &key).await != 200 {
                assert!(Instant::now() < deadline, "{url} never took the key");
            }
        }
        let pollers: Vec<_> = urls
            .iter()
            .map(|url| {
                let (http, url, key) = (http.clone(), url.clone(), key.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        if status_with_key(&http, &url, &key).await == 401 {
                            return Instant::now();
                        }
                        assert!(Instant::now() < deadline, "{url} still takes a revoked key");
                    }
                })
            })
            .collect();
        let t0 = Instant::now();
        write(
            &mut client,
            access(access_command::Op::RevokeKey(pb::Revoke {
                id: made.credential_id,
            })),
        )
        .await;
        acked.push(t0.elapsed().as_secs_f64() * 1000.0);
        let mut last = t0;
        for p in pollers {
            last = last.max(p.await.unwrap());
        }
        everywhere.push((last - t0).as_secs_f64() * 1000.0);
    }
    println!("## key revocation on a 3-node cluster\n");
    println!("{n} keys; each revoked through the leader once every node served it.\n");
    println!("{HEADER}");
    println!("{}", summary("revoke acknowledged", acked));
    println!(
        "{}",
        summary("refused by all 3 nodes' data planes", everywhere)
    );
}

/// Mutual TLS between nodes against `--insecure-cluster`, in the same run: write latency
/// (through the leader and through a follower) and failover, the two modes alternating
/// round by round so the machine's noise falls on both.
async fn mtls(rounds: usize, n: usize, iterations: usize) {
    const MODES: [(&str, &[&str]); 2] = [("mTLS", &[]), ("plain", &["--insecure-cluster"])];
    let mut samples: [[Vec<f64>; 4]; 2] = Default::default();
    for round in 0..rounds {
        for k in 0..2 {
            // Alternate which mode goes first.
            let m = (k + round) % 2;
            let (name, flags) = MODES[m];
            eprintln!("round {round}: {name}");
            let [leader, follower] = latency(n, 10, 3, flags, false).await;
            let [first_ok, _] = failover(iterations, flags, false).await;
            samples[m][0].extend(leader);
            samples[m][1].extend(follower);
            samples[m][2].extend(first_ok);
        }
    }
    println!("## mutual TLS between nodes against --insecure-cluster\n");
    println!(
        "3 nodes each; {rounds} rounds, each mode once per round (order alternating); per round \
         {n} sequential applies per path and {iterations} leader kills.\n"
    );
    println!("| measure | mTLS p50 | plain p50 | ratio | mTLS p99 | plain p99 |");
    println!("|---|---|---|---|---|---|");
    for (i, what) in [
        "apply via leader",
        "apply via follower (forwarded)",
        "failover: first acknowledged apply",
    ]
    .iter()
    .enumerate()
    {
        let mut a = samples[0][i].clone();
        let mut b = samples[1][i].clone();
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        let (a50, b50) = (pct(&a, 50.0), pct(&b, 50.0));
        println!(
            "| {what} | {a50:.2} ms | {b50:.2} ms | {:.3} | {:.2} ms | {:.2} ms |",
            a50 / b50,
            pct(&a, 99.0),
            pct(&b, 99.0)
        );
    }
}

fn main() {
    let mode = std::env::args()
        .skip(1)
        .find(|a| ["propagation", "latency", "failover", "revoke", "mtls"].contains(&a.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match mode.as_deref() {
            Some("propagation") => propagation(arg("--n", 200)).await,
            Some("latency") => {
                latency(
                    arg("--n", 500),
                    arg("--blocks", 10),
                    arg("--nodes", 3) as u64,
                    &[],
                    true,
                )
                .await;
            }
            Some("failover") => {
                failover(arg("--iterations", 5), &[], true).await;
            }
            Some("mtls") => mtls(arg("--rounds", 3), arg("--n", 200), arg("--iterations", 3)).await,
            Some("revoke") => revoke(arg("--n", 50)).await,
            // `cargo bench` with no mode (e.g. all benches): a short propagation run.
            _ => propagation(50).await,
        }
    });
}
