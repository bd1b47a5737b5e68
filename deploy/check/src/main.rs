//! Drives the compose cluster of `deploy/` on real containers and prints what it measured:
//! traffic through every node, spans at the collector, Prometheus scraping every node,
//! then a killed leader, a paused node, a node cut off the network, a rolling restart of
//! every node under steady traffic, and a second region 50 ms away.
//!
//! Run by `deploy/test` (which builds the images first). Every container, volume and
//! network it makes belongs to one compose project that is torn down at the end, even
//! on failure. Traffic goes only to those containers; every loop is bounded in time.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

mod wan;
use tollgate_sdk::{ControlPlaneClient, NodeClient};

const PROJECT: &str = "tollgate-deploy-test";
const NEAR: [&str; 3] = ["tollgate-0", "tollgate-1", "tollgate-2"];
const FAR: [&str; 2] = ["tollgate-3", "tollgate-4"];
const SPEC: &str = r#"
upstreams:
  echo:
    endpoints: [{ address: "echo:9000" }]
    circuit_breaker: {}
  closed-port:
    endpoints: [{ address: "echo:9" }]
routes:
  echo: { match: { path: { prefix: /echo } }, upstream: echo }
  closed: { match: { path: { prefix: /closed } }, upstream: closed-port }
quotas:
  generous: { scope: route, limit: 100000000, window: minute, routes: [echo] }
"#;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.first().map(String::as_str) == Some("wan") {
        return rt.block_on(wan::run(&args[1..]));
    }
    let deploy = PathBuf::from(args.first().map_or("deploy", |s| s.as_str()));
    let compose = Compose::new(&deploy);
    compose.down();
    let started = Instant::now();
    let result = rt.block_on(run(&compose));
    if let Err(e) = &result {
        eprintln!("\ndeploy check FAILED: {e:#}\n");
        for s in NEAR.iter().chain(&FAR) {
            if let Ok(logs) = compose.logs(s) {
                let tail: Vec<&str> = logs.lines().rev().take(15).collect();
                eprintln!("--- last lines of {s}:");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
    compose.down();
    println!("\nwhole run: {:.0} s", started.elapsed().as_secs_f64());
    result
}

// ---- the report ---------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    rows: Vec<[String; 3]>,
    failed: Vec<String>,
}

impl Report {
    /// One measured line; `ok` false marks a missed target (the run then fails).
    fn row(&mut self, what: &str, figure: String, ok: bool) {
        println!("  {} {what}: {figure}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failed.push(format!("{what}: {figure}"));
        }
        self.rows.push([
            what.to_string(),
            figure,
            if ok { "ok" } else { "MISSED" }.to_string(),
        ]);
    }

    fn print(&self) {
        println!("\n| what | measured | target |");
        println!("|---|---|---|");
        for [a, b, c] in &self.rows {
            println!("| {a} | {b} | {c} |");
        }
    }
}

/// The cluster CA's certificate, read from the bootstrapping node's data directory once
/// it has made it: every gRPC client here verifies nodes and control planes with it.
static CA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn load_ca(compose: &Compose) -> Result<()> {
    let t = Instant::now();
    loop {
        match compose.exec("tollgate-0", &["cat", "/data/cluster-ca.pem"]) {
            Ok(pem) if pem.contains("BEGIN CERTIFICATE") => {
                let _ = CA.set(pem);
                return Ok(());
            }
            _ if t.elapsed() > Duration::from_secs(60) => {
                bail!("tollgate-0 wrote no /data/cluster-ca.pem within 60 s")
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// TLS to the container `name` (dialled by IP; its certificate carries its name).
fn tls(name: &str) -> tollgate_sdk::Tls {
    tollgate_sdk::Tls::ca_pem(CA.get().map(String::as_str).unwrap_or_default())
        .with_server_name(name)
}

async fn run(compose: &Compose) -> Result<()> {
    let mut report = Report::default();
    println!("== compose up: 3 nodes, 2 control planes, rotel, prometheus, echo");
    compose.run(&["up", "-d"], false)?;
    load_ca(compose).await?;
    let mut cluster = Cluster::discover(compose, &NEAR).await?;
    let t = Instant::now();
    cluster.wait_members(3, 0, Duration::from_secs(60)).await?;
    report.row(
        "cluster formed (3 voters) after compose up",
        format!("{:.1} s", t.elapsed().as_secs_f64()),
        true,
    );

    println!("== apply a spec, traffic through every node");
    let token = compose.exec("tollgate-0", &["cat", "/data/operator-token"])?;
    cluster.token = token.trim().to_string();
    let mut leader = cluster.leader_client().await?;
    leader
        .apply_spec(SPEC, false, "deploy-check-spec")
        .await
        .context("apply the spec")?;
    for node in &cluster.nodes {
        node.wait_serving("/echo/ready", Duration::from_secs(20))
            .await?;
    }
    let mut ok = 0;
    // What the others got, by node and status (none: no answer), to say which failed how.
    let mut other: std::collections::BTreeMap<(String, Option<u16>), u32> = Default::default();
    for node in &cluster.nodes {
        for i in 0..100 {
            match node.get(&format!("/echo/{i}")).await {
                Some(200) => ok += 1,
                status => *other.entry((node.name.clone(), status)).or_default() += 1,
            }
        }
    }
    report.row(
        "requests through every node (100 each)",
        if other.is_empty() {
            format!("{ok} of 300 answered 200")
        } else {
            format!("{ok} of 300 answered 200; the others: {other:?}")
        },
        ok == 300,
    );

    println!("== telemetry: spans at the collector, Prometheus scraping every node");
    let (spans, instances) = wait_for_spans(compose, &cluster.nodes).await;
    report.row(
        "spans received by rotel (10% sampled)",
        format!("{spans} spans from node ids {instances:?}"),
        spans > 0 && instances.len() == 3,
    );
    // One upstream error per node, so the dashboard's upstream-errors panel has a series.
    for node in &cluster.nodes {
        node.get("/closed/x").await;
    }
    let prom = compose.ip("prometheus")?;
    let up = wait_for_targets(prom, &NEAR).await;
    report.row(
        "Prometheus targets up",
        format!("{} of 3 nodes: {up:?}", up.len()),
        up.len() == 3,
    );
    let missing = dashboard_metrics_missing(compose.dir(), prom).await?;
    report.row(
        "metrics the Grafana dashboard queries, known to Prometheus",
        if missing.is_empty() {
            "all".into()
        } else {
            format!("missing {missing:?}")
        },
        missing.is_empty(),
    );

    // Both replicas' certificates carry the name "cp" (--cert-name in compose.yaml).
    let cp = ControlPlaneClient::new(
        &[
            &format!("{}:7080", compose.ip("cp-0")?),
            &format!("{}:7080", compose.ip("cp-1")?),
        ],
        &tls("cp"),
    )?
    .with_token(&cluster.token)?;
    let cp = Arc::new(cp);

    // ---- failures ----------------------------------------------------------------------
    println!("== kill -9 the leader");
    let victim = cluster.leader_name().await?;
    let fault = held(
        || compose.docker(&["kill", "-s", "KILL", &compose.id(&victim)?]),
        || compose.docker(&["start", &compose.id(&victim)?]),
    );
    let outcome = under_load(&cluster, &cp, "kill", &[&victim], fault).await?;
    cluster = Cluster::discover(compose, &NEAR)
        .await?
        .with_token(&cluster.token);
    settle(
        &cluster,
        &cp,
        &outcome,
        &mut report,
        &format!("leader {victim} killed -9"),
        true,
    )
    .await?;

    println!("== pause a follower (SIGSTOP) for 5 s");
    let victim = cluster.follower_name().await?;
    let fault = held(
        || compose.docker(&["pause", &compose.id(&victim)?]),
        || compose.docker(&["unpause", &compose.id(&victim)?]),
    );
    let outcome = under_load(&cluster, &cp, "pause", &[&victim], fault).await?;
    settle(
        &cluster,
        &cp,
        &outcome,
        &mut report,
        &format!("follower {victim} paused 5 s"),
        true,
    )
    .await?;

    println!("== cut a node off the network for 5 s (iptables DROP in its namespace)");
    let victim = cluster.leader_name().await?;
    let pid = compose.pid(&victim)?;
    let fault = held(|| isolate(pid, true), || isolate(pid, false));
    let outcome = under_load(&cluster, &cp, "cut", &[&victim], fault).await?;
    settle(
        &cluster,
        &cp,
        &outcome,
        &mut report,
        &format!("leader {victim} cut off 5 s"),
        true,
    )
    .await?;

    println!("== rolling restart of every node (SIGTERM, wait ready and caught up, next)");
    let mut order = Vec::new();
    let leader_name = cluster.leader_name().await?;
    order.extend(
        NEAR.iter()
            .filter(|n| **n != leader_name)
            .map(|n| n.to_string()),
    );
    order.push(leader_name);
    let all: Vec<&str> = NEAR.to_vec();
    let outcome = under_load(&cluster, &cp, "roll", &all, async {
        for name in &order {
            let t = Instant::now();
            compose.docker(&["stop", "-t", "40", &compose.id(name)?])?;
            compose.docker(&["start", &compose.id(name)?])?;
            let c = Cluster::discover(compose, &NEAR).await?;
            c.wait_caught_up(Duration::from_secs(60)).await?;
            println!(
                "  {name} restarted and caught up in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })
    .await?;
    cluster = Cluster::discover(compose, &NEAR)
        .await?
        .with_token(&cluster.token);
    settle(
        &cluster,
        &cp,
        &outcome,
        &mut report,
        "rolling restart of 3 nodes",
        false,
    )
    .await?;

    regions(compose, &cluster, &mut report).await?;

    report.print();
    if report.failed.is_empty() {
        Ok(())
    } else {
        bail!("missed: {}", report.failed.join("; "))
    }
}

// ---- docker and compose -------------------------------------------------------------------

struct Compose {
    dir: PathBuf,
}

impl Compose {
    fn new(dir: &Path) -> Compose {
        Compose {
            dir: dir.to_path_buf(),
        }
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    /// `docker-compose -p PROJECT -f compose.yaml [...]`; `regions` adds the second region.
    fn run(&self, args: &[&str], regions: bool) -> Result<String> {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(&self.dir)
            .args(["-p", PROJECT, "-f", "compose.yaml"]);
        if regions {
            cmd.args(["-f", "compose.regions.yaml"]);
        }
        // Host ports no one else uses; the check itself talks to container IPs.
        cmd.env("TOLLGATE_PORT_0", "28080")
            .env("TOLLGATE_PORT_1", "28081")
            .env("TOLLGATE_PORT_2", "28082")
            .env("TOLLGATE_CP_PORT", "27080")
            .env("TOLLGATE_PROMETHEUS_PORT", "29090");
        output(cmd.args(args))
    }

    fn down(&self) {
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"], true);
    }

    fn docker(&self, args: &[&str]) -> Result<String> {
        output(Command::new("docker").args(args))
    }

    fn id(&self, service: &str) -> Result<String> {
        let id = self.run(&["ps", "-q", service], true)?.trim().to_string();
        if id.is_empty() {
            bail!("no container for {service}");
        }
        Ok(id)
    }

    fn ip(&self, service: &str) -> Result<IpAddr> {
        let text = self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.id(service)?,
        ])?;
        text.trim()
            .parse()
            .with_context(|| format!("{service} has no IP address ({text:?})"))
    }

    fn pid(&self, service: &str) -> Result<u32> {
        let text = self.docker(&["inspect", "-f", "{{.State.Pid}}", &self.id(service)?])?;
        Ok(text.trim().parse()?)
    }

    fn exec(&self, service: &str, args: &[&str]) -> Result<String> {
        let id = self.id(service)?;
        let mut all = vec!["exec", id.as_str()];
        all.extend(args);
        self.docker(&all)
    }

    fn logs(&self, service: &str) -> Result<String> {
        let id = self.id(service)?;
        let out = Command::new("docker").args(["logs", &id]).output()?;
        Ok(
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Runs a command inside a container's network namespace (tc and iptables live on the
/// host; the images have neither).
fn in_netns(pid: u32, args: &[&str]) -> Result<()> {
    let pid = pid.to_string();
    let mut all = vec!["-t", pid.as_str(), "-n"];
    all.extend(args);
    output(Command::new("nsenter").args(&all)).map(|_| ())
}

/// Drops every packet in and out of a container but its loopback (or lifts that).
fn isolate(pid: u32, on: bool) -> Result<()> {
    let op = if on { "-I" } else { "-D" };
    in_netns(
        pid,
        &["iptables", op, "INPUT", "!", "-i", "lo", "-j", "DROP"],
    )?;
    in_netns(
        pid,
        &["iptables", op, "OUTPUT", "!", "-o", "lo", "-j", "DROP"],
    )
}

// ---- the cluster as the client sees it ----------------------------------------------------

#[derive(Clone)]
struct Node {
    name: String,
    ip: IpAddr,
    http: reqwest::Client,
}

impl Node {
    fn grpc(&self) -> String {
        format!("{}:7070", self.ip)
    }

    async fn get(&self, path: &str) -> Option<u16> {
        self.http
            .get(format!("http://{}:8080{path}", self.ip))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    async fn ready(&self) -> bool {
        let r = self
            .http
            .get(format!("http://{}:7071/readyz", self.ip))
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        r.is_ok_and(|r| r.status().is_success())
    }

    async fn wait_serving(&self, path: &str, limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.get(path).await == Some(200) {
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bail!("{} did not serve {path} within {limit:?}", self.name)
    }

    async fn status(&self) -> Result<tollgate_proto::node::v1::ClusterStatusResponse> {
        let mut c = NodeClient::connect(&self.grpc(), &tls(&self.name)).await?;
        Ok(tokio::time::timeout(Duration::from_secs(2), c.cluster_status()).await??)
    }
}

struct Cluster {
    nodes: Vec<Node>,
    token: String,
}

impl Cluster {
    async fn discover(compose: &Compose, names: &[&str]) -> Result<Cluster> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(5))
            .build()?;
        let mut nodes = Vec::new();
        for name in names {
            // A restarted container may take a moment to get its address.
            let mut ip = compose.ip(name);
            for _ in 0..50 {
                if ip.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                ip = compose.ip(name);
            }
            nodes.push(Node {
                name: name.to_string(),
                ip: ip?,
                http: http.clone(),
            });
        }
        Ok(Cluster {
            nodes,
            token: String::new(),
        })
    }

    fn with_token(mut self, token: &str) -> Cluster {
        self.token = token.to_string();
        self
    }

    /// Waits until some node sees `voters` voters and `learners` learners and every node
    /// is ready.
    async fn wait_members(&self, voters: usize, learners: usize, limit: Duration) -> Result<()> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < limit {
            let mut all_ready = true;
            for n in &self.nodes {
                all_ready &= n.ready().await;
            }
            if let Ok(s) = self.nodes[0].status().await {
                let v = s.members.iter().filter(|m| m.role == "voter").count();
                let l = s.members.iter().filter(|m| m.role == "learner").count();
                last = format!("{v} voters, {l} learners, leader {:?}", s.leader);
                if v == voters && l == learners && s.leader.is_some() && all_ready {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "the cluster did not reach {voters} voters and {learners} learners, all ready, within {limit:?} (last: {last})"
        )
    }

    async fn leader_id(&self) -> Result<u64> {
        for _ in 0..100 {
            for n in &self.nodes {
                if let Ok(s) = n.status().await
                    && let Some(l) = s.leader
                {
                    return Ok(l);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no node knows a leader")
    }

    /// tollgate-N is node N+1 (deploy/node-entrypoint.sh).
    async fn leader_name(&self) -> Result<String> {
        Ok(format!("tollgate-{}", self.leader_id().await? - 1))
    }

    async fn follower_name(&self) -> Result<String> {
        let leader = self.leader_name().await?;
        self.nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| *n != leader)
            .ok_or_else(|| anyhow!("no follower"))
    }

    async fn leader_client(&self) -> Result<NodeClient> {
        let id = self.leader_id().await?;
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == format!("tollgate-{}", id - 1))
            .ok_or_else(|| anyhow!("leader {id} is not one of ours"))?;
        Ok(NodeClient::connect(&node.grpc(), &tls(&node.name))
            .await?
            .with_token(Some(&self.token))?)
    }

    /// Waits until every node is ready and has applied what the leader has committed.
    async fn wait_caught_up(&self, limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < limit {
            let mut applied = Vec::new();
            let mut committed = 0;
            let mut ready = true;
            for n in &self.nodes {
                ready &= n.ready().await;
                match n.status().await {
                    Ok(s) => {
                        applied.push(s.applied_index.unwrap_or(0));
                        if s.state == "leader" {
                            committed = s.committed_index.unwrap_or(0);
                        }
                    }
                    Err(_) => applied.push(0),
                }
            }
            last = format!("ready {ready}, applied {applied:?}, leader committed {committed}");
            if ready && committed > 0 && applied.iter().all(|a| *a >= committed) {
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("nodes did not catch up within {limit:?} ({last})")
    }
}

// ---- steady traffic and writes around a fault ---------------------------------------------

/// What a run under load saw.
#[derive(Default)]
struct Outcome {
    sent: u64,
    /// Failed requests sent to nodes other than the ones the fault hit.
    failed_healthy: u64,
    /// Failed requests sent to a node the fault hit, before the health checks took it out.
    failed_victim: u64,
    writes_acked: Vec<String>,
    writes_failed: u64,
    /// The longest time between two acknowledged writes.
    write_gap: Duration,
}

impl Outcome {
    /// `victim_failures_allowed`: whether a request a fault cut short counts as a miss (a
    /// node killed outright drops what it was answering; a restart must not).
    fn report(&self, report: &mut Report, what: &str, victim_failures_allowed: bool) {
        report.row(
            &format!("{what}: failed requests to healthy nodes"),
            format!("{} of {} sent", self.failed_healthy, self.sent),
            self.failed_healthy == 0,
        );
        report.row(
            &format!("{what}: failed requests to the node hit, before health checks took it out"),
            self.failed_victim.to_string(),
            victim_failures_allowed || self.failed_victim == 0,
        );
        report.row(
            &format!("{what}: writes (tenant creates through the control plane)"),
            format!(
                "{} acknowledged, {} failed; longest gap between acknowledgements {:.2} s",
                self.writes_acked.len(),
                self.writes_failed,
                self.write_gap.as_secs_f64()
            ),
            !self.writes_acked.is_empty(),
        );
    }
}

/// Sends steady traffic (8 workers, round robin over the nodes a 100 ms `/readyz` check
/// finds ready, as a load balancer would) and one write every 50 ms through the control
/// plane, for 3 s before `fault`, during it, and 3 s after.
/// A fault held for 5 s: `start`, the wait, then `end`.
async fn held<A, B>(
    start: impl FnOnce() -> Result<A>,
    end: impl FnOnce() -> Result<B>,
) -> Result<()> {
    start()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    end()?;
    Ok(())
}

async fn under_load(
    cluster: &Cluster,
    cp: &Arc<ControlPlaneClient>,
    label: &str,
    victims: &[&str],
    fault: impl std::future::Future<Output = Result<()>>,
) -> Result<Outcome> {
    let nodes = Arc::new(cluster.nodes.clone());
    let ready: Arc<Vec<AtomicBool>> =
        Arc::new(nodes.iter().map(|_| AtomicBool::new(true)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let victims: Arc<Vec<String>> = Arc::new(victims.iter().map(|s| s.to_string()).collect());
    let (sent, failed_healthy, failed_victim) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    // Health checks.
    {
        let (nodes, ready, stop) = (nodes.clone(), ready.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (i, n) in nodes.iter().enumerate() {
                    ready[i].store(n.ready().await, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    for w in 0..8usize {
        let (nodes, ready, stop, victims) =
            (nodes.clone(), ready.clone(), stop.clone(), victims.clone());
        let (sent, failed_healthy, failed_victim) =
            (sent.clone(), failed_healthy.clone(), failed_victim.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = w;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pick = (0..nodes.len())
                    .map(|k| (next + k) % nodes.len())
                    .find(|i| ready[*i].load(Ordering::Relaxed));
                next += 1;
                let Some(i) = pick else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                n += 1;
                sent.fetch_add(1, Ordering::Relaxed);
                let status = nodes[i].get(&format!("/echo/{w}/{n}")).await;
                if status != Some(200) {
                    if victims.contains(&nodes[i].name) {
                        failed_victim.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed_healthy.fetch_add(1, Ordering::Relaxed);
                        eprintln!("  request to {} failed: {status:?}", nodes[i].name);
                    }
                }
            }
        }));
    }
    // Writes.
    let writes = Arc::new(Mutex::new((Vec::<String>::new(), 0u64, Duration::ZERO)));
    {
        let (cp, stop, writes, label) =
            (cp.clone(), stop.clone(), writes.clone(), label.to_string());
        tasks.push(tokio::spawn(async move {
            let mut last_ack = Instant::now();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let name = format!("{label}-{i}");
                let r =
                    tokio::time::timeout(Duration::from_secs(15), cp.create_tenant(&name)).await;
                {
                    let mut w = writes.lock().unwrap();
                    match r {
                        Ok(Ok(_)) => {
                            w.2 = w.2.max(last_ack.elapsed());
                            last_ack = Instant::now();
                            w.0.push(name);
                        }
                        _ => w.1 += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fault_result = fault.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    fault_result?;
    let (acked, failed, gap) = writes.lock().unwrap().clone();
    Ok(Outcome {
        sent: sent.load(Ordering::Relaxed),
        failed_healthy: failed_healthy.load(Ordering::Relaxed),
        failed_victim: failed_victim.load(Ordering::Relaxed),
        writes_acked: acked,
        writes_failed: failed,
        write_gap: gap,
    })
}

/// After a fault: waits until every node has caught up, reports what the load saw, and
/// checks every acknowledged write is there.
async fn settle(
    cluster: &Cluster,
    cp: &ControlPlaneClient,
    outcome: &Outcome,
    report: &mut Report,
    what: &str,
    victim_failures_allowed: bool,
) -> Result<()> {
    cluster.wait_caught_up(Duration::from_secs(60)).await?;
    outcome.report(report, what, victim_failures_allowed);
    check_acked(cluster, cp, outcome, report).await
}

/// Every acknowledged write is in the cluster (a linearizable read) and on every node (a
/// local read of each).
async fn check_acked(
    cluster: &Cluster,
    cp: &ControlPlaneClient,
    outcome: &Outcome,
    report: &mut Report,
) -> Result<()> {
    let listed: BTreeSet<String> = cp
        .list_tenants()
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    let missing = outcome
        .writes_acked
        .iter()
        .filter(|n| !listed.contains(*n))
        .count();
    let mut per_node = Vec::new();
    for n in &cluster.nodes {
        let mut c = NodeClient::connect(&n.grpc(), &tls(&n.name))
            .await?
            .with_token(Some(&cluster.token))?;
        let local: BTreeSet<String> = c
            .list_tenants(true)
            .await?
            .tenants
            .into_iter()
            .map(|t| t.name)
            .collect();
        per_node.push(
            outcome
                .writes_acked
                .iter()
                .filter(|x| !local.contains(*x))
                .count(),
        );
    }
    report.row(
        "  every acknowledged write present afterwards",
        format!(
            "{} acknowledged; missing from the cluster: {missing}; missing per node: {per_node:?}",
            outcome.writes_acked.len()
        ),
        missing == 0 && per_node.iter().all(|m| *m == 0),
    );
    Ok(())
}

// ---- telemetry ----------------------------------------------------------------------------

/// Spans rotel printed, and the node ids (service.instance.id) they came from.
async fn wait_for_spans(compose: &Compose, nodes: &[Node]) -> (usize, BTreeSet<String>) {
    let t = Instant::now();
    let mut i = 0;
    loop {
        // Sampled at 10%: send a few more traced requests until every node shows up.
        for n in nodes {
            for _ in 0..20 {
                i += 1;
                let _ = n.get(&format!("/echo/trace/{i}")).await;
            }
        }
        let logs = compose.logs("rotel").unwrap_or_default();
        let spans = logs
            .lines()
            .filter(|l| l.trim().starts_with("Span #"))
            .count();
        let instances: BTreeSet<String> = logs
            .lines()
            .filter_map(|l| l.trim().strip_prefix("-> service.instance.id: Str(node-"))
            .map(|v| v.trim_end_matches(')').to_string())
            .collect();
        if instances.len() >= nodes.len() || t.elapsed() > Duration::from_secs(30) {
            let ids = instances;
            return (spans, ids);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Prometheus targets that are up, among `names` (waits up to 30 s for all).
async fn wait_for_targets(prom: IpAddr, names: &[&str]) -> Vec<String> {
    let http = reqwest::Client::new();
    let t = Instant::now();
    loop {
        let mut up = Vec::new();
        if let Ok(r) = http
            .get(format!("http://{prom}:9090/api/v1/targets"))
            .send()
            .await
            && let Ok(text) = r.text().await
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            for target in v["data"]["activeTargets"].as_array().into_iter().flatten() {
                let instance = target["labels"]["instance"].as_str().unwrap_or("");
                let host = instance.split(':').next().unwrap_or("");
                if names.contains(&host) && target["health"] == "up" {
                    up.push(host.to_string());
                }
            }
        }
        if up.len() == names.len() || t.elapsed() > Duration::from_secs(30) {
            up.sort();
            return up;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Metric names the dashboard's queries use that Prometheus has never seen.
async fn dashboard_metrics_missing(deploy: &Path, prom: IpAddr) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(deploy.join("grafana/tollgate-dashboard.json"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or("");
            for (i, _) in expr.match_indices("tollgate_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                wanted.insert(name);
            }
        }
    }
    let body = reqwest::get(format!("http://{prom}:9090/api/v1/label/__name__/values"))
        .await?
        .text()
        .await?;
    let known: serde_json::Value = serde_json::from_str(&body)?;
    let known: BTreeSet<&str> = known["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    Ok(wanted
        .into_iter()
        .filter(|w| !known.contains(w.as_str()))
        .collect())
}

// ---- two regions --------------------------------------------------------------------------

fn median_max(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:.1} ms, max {:.1} ms (n={})",
        v[v.len() / 2].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        v.len()
    )
}

async fn regions(compose: &Compose, cluster: &Cluster, report: &mut Report) -> Result<()> {
    println!("== a second region: 2 learners behind relays that add 50 ms each way");
    compose.run(&["up", "-d"], true)?;
    let all: Vec<&str> = NEAR.iter().chain(&FAR).copied().collect();
    let both = Cluster::discover(compose, &all)
        .await?
        .with_token(&cluster.token);
    both.wait_members(3, 2, Duration::from_secs(90)).await?;
    both.wait_caught_up(Duration::from_secs(60)).await?;

    // An apply on the leader, then the time until each region serves the new route.
    let mut leader = both.leader_client().await?;
    let near_follower = both.follower_name().await?;
    let near_node = both
        .nodes
        .iter()
        .find(|n| n.name == near_follower)
        .expect("a follower of ours")
        .clone();
    let far_node = both.nodes[3].clone();
    let (mut near_t, mut far_t) = (Vec::new(), Vec::new());
    for i in 0..10 {
        // SPEC plus one route, put where the routes are.
        let spec = SPEC.replace(
            "quotas:",
            &format!(
                "  region{i}: {{ match: {{ path: {{ prefix: /region{i} }} }}, upstream: echo }}\nquotas:"
            ),
        );
        let t = Instant::now();
        leader
            .apply_spec(spec, false, format!("deploy-check-region-{i}"))
            .await?;
        let acked = t.elapsed();
        let path = format!("/region{i}/x");
        let (a, b) = tokio::join!(
            near_node.wait_serving(&path, Duration::from_secs(10)),
            far_node.wait_serving(&path, Duration::from_secs(10))
        );
        near_t.push(a? + acked);
        far_t.push(b? + acked);
    }
    report.row(
        "apply on the leader → served by a near follower",
        median_max(near_t),
        true,
    );
    report.row(
        "apply on the leader → served in the far region (50 ms each way)",
        median_max(far_t),
        true,
    );

    // Cut the far region off (the relays paused): it keeps serving what it has.
    println!("== cut the far region off for 5 s, traffic to it only");
    let relays: Vec<String> = (0..5)
        .map(|i| compose.id(&format!("wan-{i}")))
        .collect::<Result<_>>()?;
    for r in &relays {
        compose.docker(&["pause", r])?;
    }
    let t = Instant::now();
    let (mut sent, mut failed) = (0u64, 0u64);
    while t.elapsed() < Duration::from_secs(5) {
        for n in &both.nodes[3..] {
            sent += 1;
            if n.get(&format!("/echo/far/{sent}")).await != Some(200) {
                failed += 1;
            }
        }
    }
    for r in &relays {
        compose.docker(&["unpause", r])?;
    }
    report.row(
        "far region cut off 5 s: failed requests to it",
        format!("{failed} of {sent}"),
        failed == 0,
    );
    let caught = both.wait_caught_up(Duration::from_secs(60)).await?;
    report.row(
        "far region back: every node caught up with the leader",
        format!("{:.1} s", caught.as_secs_f64()),
        true,
    );
    Ok(())
}
