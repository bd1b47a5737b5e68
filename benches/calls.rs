//! The call log's store at scale: write throughput, disk per million records, and query
//! times with 10 million records on one node (docs/calls.md, docs/benchmarks.md).
//!
//! ```text
//! cargo bench --bench calls -- [--records 10000000] [--queries 20]
//! ```
//!
//! Records are made like a node's (20 tenants, 10 APIs of 2 versions, 200 keys, 1% 5xx, a
//! third traced), spread evenly over the last two hours, and handed to a real `CallLog`
//! (its writer thread, its fjall store under the temp directory) in the data-plane
//! threads' batches of 128. Then each query is asked `--queries` times, with ids picked
//! from what was written: the median and the slowest are printed.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{arg, median, pct};
use tollgate_node::calls::{Batch, CallLog, CallLogSettings, now_us};
use tollgate_proto::node::v1::{CallQuery, CallRecord};

fn record(i: u64, time_us: u64) -> CallRecord {
    let r = fastrand::u64(..);
    let api = r % 10;
    CallRecord {
        time_us,
        node_id: 1,
        request_id: format!("{:032x}", fastrand::u128(1..)),
        trace_id: if r.is_multiple_of(3) {
            format!("{:032x}", fastrand::u128(1..))
        } else {
            String::new()
        },
        tenant: format!("tenant-{}", r % 20),
        api: format!("api-{api}"),
        version: ["1.0.0", "1.1.0"][(r >> 8) as usize % 2].into(),
        key_id: format!("k{:06}", (r >> 16) % 200),
        route: format!("api-{api}@1.0.0/r"),
        method: ["GET", "POST"][(r >> 24) as usize % 2].into(),
        host: "api.example.com".into(),
        path: format!("/api-{api}/v1/items/{i}"),
        protocol: "HTTP/1.1".into(),
        status: if (r >> 44).is_multiple_of(100) {
            503
        } else {
            200
        },
        error: if (r >> 44).is_multiple_of(100) {
            "upstream_unavailable".into()
        } else {
            String::new()
        },
        // A long tail: most calls a few ms, some seconds.
        duration_us: 500
            + (r >> 32) % 5_000
            + if r % 1000 == 7 {
                (r >> 40) % 3_000_000
            } else {
                0
            },
        upstream_us: Some(400),
        request_bytes: 120,
        response_bytes: 2048,
        client_ip: vec![10, 0, ((r >> 12) % 256) as u8, ((r >> 20) % 256) as u8],
        client_port: (30000 + (r >> 28) % 30000) as u32,
        upstream: format!("api-{api}@1.0.0/o"),
        attempts: 1,
        ..Default::default()
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64() * 1000.0)
}

fn main() {
    let n = arg("--records", 10_000_000u64);
    let queries = arg("--queries", 20usize);
    let dir = std::env::temp_dir().join(format!("tollgate-calls-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let settings = CallLogSettings {
        enabled: true,
        retention: Duration::from_secs(7 * 86_400),
        max_bytes: 64 << 30,
    };
    let log = CallLog::open(&dir, 1, &settings).unwrap();
    let now = now_us();
    let span = 2 * 3_600_000_000u64;
    let start = now - span;
    let mut request_ids = Vec::new();
    let mut trace_ids = Vec::new();
    let t = Instant::now();
    let mut batch = Batch::with_capacity(128);
    for i in 0..n {
        let r = record(i, start + i * span / n);
        if i % (n / 1000).max(1) == 0 {
            request_ids.push(r.request_id.clone());
            if !r.trace_id.is_empty() {
                trace_ids.push(r.trace_id.clone());
            }
        }
        batch.push_record(&r);
        if batch.len() == 128 {
            log.hand_over(std::mem::replace(&mut batch, Batch::with_capacity(128)));
            // Keep the queue short: this measures what the writer sustains, not drops.
            if i % (128 * 64) == 127 {
                log.wait_written(Duration::from_secs(60));
            }
        }
    }
    log.hand_over(batch);
    log.wait_written(Duration::from_secs(60));
    let fill = t.elapsed().as_secs_f64();
    log.close();
    assert_eq!(log.dropped(), 0, "records were dropped while filling");
    let disk = log.disk_bytes() as f64;
    println!("## Call log: {n} records on one node\n");
    println!(
        "written in {fill:.1} s: {:.0} records/s (making the records included); {:.1} MB on disk, {:.1} MB per million records\n",
        n as f64 / fill,
        disk / 1e6,
        disk / 1e6 / (n as f64 / 1e6)
    );
    println!("| query | median ms | slowest ms | records returned |");
    println!("|---|---|---|---|");
    let hour_ago = now_us() - 3_600_000_000;
    let run = |name: &str, make: &dyn Fn(usize) -> CallQuery| {
        let mut times = Vec::new();
        let mut returned = 0;
        for k in 0..queries {
            let q = make(k);
            let (r, ms) = timed(|| log.query(&q).unwrap());
            returned = r.records.len();
            times.push(ms);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.2} | {:.2} | {returned} |",
            median(times.clone()),
            pct(&times, 100.0)
        );
    };
    run("one trace id", &|k| CallQuery {
        trace_id: trace_ids[(k * 37) % trace_ids.len()].clone(),
        ..Default::default()
    });
    run("one request id", &|k| CallQuery {
        request_id: request_ids[(k * 53) % request_ids.len()].clone(),
        ..Default::default()
    });
    run("the slowest 50 of the last hour", &|_| CallQuery {
        since_us: hour_ago,
        slowest: 50,
        ..Default::default()
    });
    run("the newest 100", &|_| CallQuery::default());
    run("newest 100 of one API's 5xx, last hour", &|k| CallQuery {
        since_us: hour_ago,
        api: format!("api-{}", k % 10),
        status: "5xx".into(),
        ..Default::default()
    });
    run("slowest 10 of one tenant, last 10 minutes", &|k| {
        CallQuery {
            since_us: now_us() - 600_000_000,
            tenant: format!("tenant-{}", k % 20),
            slowest: 10,
            ..Default::default()
        }
    });
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}
