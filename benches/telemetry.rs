//! What traces and metering cost on the request path, against real node processes
//! (release build) on loopback, side by side in the same run.
//!
//! ```text
//! cargo bench --bench telemetry -- [--rounds 9] [--secs 2] [--workers 16]
//! ```
//!
//! Four single-node gateways on one upstream, each serving the same route:
//! - `base`: `--metering off --call-log off`, no traces;
//! - `metering`: metering on (the default), no call log, no traces;
//! - `traces`: `--metering off --call-log off`, every request traced (ratio 1) and exported
//!   over OTLP/gRPC to a real collector (rotel, receiving and dropping);
//! - `calls`: `--metering off`, the call log on (the default), no traces.
//!
//! 1. Requests/s, closed loop, `--workers` clients, `--rounds` rounds of `--secs`, the order
//!    rotated each round; the ratios to `base` per round and their medians.
//! 2. The collector killed mid-run: traffic to `traces` for 6 s, rotel killed -9 after 2 s;
//!    failed requests, p50/p99 per second, and the spans the node counted as dropped.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/harness/mod.rs"]
mod harness;

use common::{arg, cpu_seconds, median, pct};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::collector::Collector;
use harness::{Body, GatewayProcess, Upstream, full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type Http = Client<HttpConnector, Body>;

fn spec(up: &Upstream) -> String {
    format!(
        "upstreams:\n  u: {{ endpoints: [{{ address: \"{}\" }}] }}\nroutes:\n  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }}\n",
        up.addr
    )
}

async fn get(http: &Http, url: &str) -> Option<u16> {
    let req = http::Request::get(url).body(full("")).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), http.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?;
    Some(status)
}

/// Closed loop for `secs`: (answered 200 per second, failures, (seconds since start,
/// latency) of every request).
async fn closed(http: &Http, url: &str, workers: usize, secs: f64) -> (f64, u64, Vec<(f64, f64)>) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let samples: Arc<Mutex<Vec<(f64, f64, bool)>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (http, url, samples) = (http.clone(), url.to_string(), samples.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = get(&http, &url).await == Some(200);
                mine.push((
                    t.duration_since(started).as_secs_f64(),
                    t.elapsed().as_secs_f64() * 1000.0,
                    ok,
                ));
            }
            samples.lock().unwrap().extend(mine);
        });
    }
    while tasks.join_next().await.is_some() {}
    let samples = samples.lock().unwrap().clone();
    let ok = samples.iter().filter(|s| s.2).count() as f64;
    let failed = samples.iter().filter(|s| !s.2).count() as u64;
    (
        ok / secs,
        failed,
        samples.into_iter().map(|(at, ms, _)| (at, ms)).collect(),
    )
}

async fn metric(gw: &GatewayProcess, line_prefix: &str) -> f64 {
    gw.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn main() {
    let rounds = arg("--rounds", 9usize);
    let secs = arg("--secs", 2.0f64);
    let workers = arg("--workers", 16usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let http: Http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build_http();
        let up = Upstream::start("u").await;
        let mut collector = Collector::start_quiet().await;
        let endpoint = collector.grpc_url();
        let base =
            GatewayProcess::start_with(&spec(&up), &["--metering", "off", "--call-log", "off"])
                .await;
        let metering = GatewayProcess::start_with(&spec(&up), &["--call-log", "off"]).await;
        let traces = GatewayProcess::start_with(
            &spec(&up),
            &[
                "--metering",
                "off",
                "--call-log",
                "off",
                "--otlp-endpoint",
                &endpoint,
                "--trace-sample-ratio",
                "1",
            ],
        )
        .await;
        let calls = GatewayProcess::start_with(&spec(&up), &["--metering", "off"]).await;
        let contenders = [
            ("base", &base),
            ("metering", &metering),
            ("traces", &traces),
            ("calls", &calls),
        ];
        let n = contenders.len();
        // `hold NAME`: only load NAME for 20 s (to profile it), printing its pid.
        if let Some(i) = std::env::args().position(|a| a == "hold") {
            let name = std::env::args().nth(i + 1).unwrap_or_else(|| "traces".into());
            let (_, gw) = contenders
                .iter()
                .find(|(n, _)| *n == name)
                .expect("base, metering, traces or calls");
            println!("holding {name}: pid {}, collector pid {}", gw.pid(), collector.pid());
            let (r, failed, _) = closed(&http, &gw.url("/x"), workers, 20.0).await;
            println!("{r:.0}/s, {failed} failed");
            return;
        }
        for (_, gw) in &contenders {
            // Warm up: connections, the upstream pool, the collector's channel.
            closed(&http, &gw.url("/warm"), workers, 1.0).await;
        }
        println!(
            "## Requests/s, closed loop, {workers} workers, {rounds} rounds of {secs} s (order rotated each round)\n"
        );
        let mut rps: Vec<Vec<f64>> = vec![Vec::new(); n];
        // Node CPU seconds and requests per contender, and the collector's CPU while
        // `traces` ran: what each costs apart from the others on this shared machine.
        let mut cpu = vec![0.0f64; n];
        let mut served = vec![0.0f64; n];
        let mut collector_cpu = 0.0;
        for round in 0..rounds {
            for k in 0..n {
                let i = (round + k) % n;
                let (node_before, col_before) =
                    (cpu_seconds(contenders[i].1.pid()), cpu_seconds(collector.pid()));
                let (r, failed, _) = closed(&http, &contenders[i].1.url("/x"), workers, secs).await;
                assert_eq!(failed, 0, "{} failed {failed} requests", contenders[i].0);
                cpu[i] += cpu_seconds(contenders[i].1.pid()) - node_before;
                served[i] += r * secs;
                if i == 2 {
                    collector_cpu += cpu_seconds(collector.pid()) - col_before;
                }
                rps[i].push(r);
            }
        }
        println!(
            "| round | base | metering | traces 100% | call log | metering / base | traces / base | call log / base |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for r in 0..rounds {
            let v = |i: usize| rps[i].get(r).copied().unwrap_or(f64::NAN);
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} |",
                r + 1,
                v(0),
                v(1),
                v(2),
                v(3),
                v(1) / v(0),
                v(2) / v(0),
                v(3) / v(0)
            );
        }
        let ratio = |i: usize| median((0..rounds).map(|r| rps[i][r] / rps[0][r]).collect());
        println!(
            "\nmedians: base {:.0}/s, metering {:.0}/s, traces {:.0}/s, call log {:.0}/s; median per-round ratio metering/base {:.3} (target >= 0.97), traces/base {:.3} (target >= 0.85), call log/base {:.3} (target >= 0.95); ratio of medians {:.3}, {:.3} and {:.3}",
            median(rps[0].clone()),
            median(rps[1].clone()),
            median(rps[2].clone()),
            median(rps[3].clone()),
            ratio(1),
            ratio(2),
            ratio(3),
            median(rps[1].clone()) / median(rps[0].clone()),
            median(rps[2].clone()) / median(rps[0].clone()),
            median(rps[3].clone()) / median(rps[0].clone()),
        );
        let us = |i: usize| cpu[i] / served[i] * 1e6;
        println!(
            "node CPU per request: base {:.1} us, metering {:.1} us ({:+.1}%), traces {:.1} us ({:+.1}%), call log {:.1} us ({:+.1}%); the collector used {:.1} us per traced request",
            us(0),
            us(1),
            (us(1) / us(0) - 1.0) * 100.0,
            us(2),
            (us(2) / us(0) - 1.0) * 100.0,
            us(3),
            (us(3) / us(0) - 1.0) * 100.0,
            collector_cpu / served[2] * 1e6
        );
        let recorded = metric(&calls, "tollgate_call_log_records_total").await;
        let lost = metric(&calls, "tollgate_call_log_dropped_total").await;
        println!("call log: {recorded} records written, {lost} dropped");
        let exported = metric(&traces, "tollgate_trace_spans_total{outcome=\"exported\"}").await;
        let dropped = metric(&traces, "tollgate_trace_spans_total{outcome=\"dropped").await;
        println!("spans so far: {exported} exported, {dropped} dropped");

        println!("\n## The collector killed -9 2 s into a 6 s run to `traces`\n");
        let dropped_before = metric(&traces, "tollgate_trace_spans_total{outcome=\"dropped").await;
        let kill = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            collector.kill();
        });
        let (_, failed, samples) = closed(&http, &traces.url("/x"), workers, 6.0).await;
        kill.await.unwrap();
        // The node's export timeout and drop counting settle after the run.
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!("| second | requests | p50 ms | p99 ms |");
        println!("|---|---|---|---|");
        for s in 0..6 {
            let mut ms: Vec<f64> = samples
                .iter()
                .filter(|(at, _)| *at >= s as f64 && *at < (s + 1) as f64)
                .map(|(_, ms)| *ms)
                .collect();
            ms.sort_by(f64::total_cmp);
            println!(
                "| {}{} | {} | {:.2} | {:.2} |",
                s + 1,
                if s == 2 { " (collector gone)" } else { "" },
                ms.len(),
                pct(&ms, 50.0),
                pct(&ms, 99.0)
            );
        }
        let dropped_after = metric(&traces, "tollgate_trace_spans_total{outcome=\"dropped").await;
        let failures = metric(&traces, "tollgate_trace_export_failures_total").await;
        println!(
            "\nfailed requests: {failed}; spans counted dropped during the run: {}; export failures: {failures}",
            dropped_after - dropped_before
        );
    });
}
