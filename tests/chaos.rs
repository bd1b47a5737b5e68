//! A randomized fault run against a 3-node cluster of real processes: kill -9 and restart,
//! partitions of followers and of the leader, while one client keeps applying specs
//! through random nodes. At the end every acknowledged apply must be present, in order,
//! on every node. Bounded: `TOLLGATE_CHAOS_SECS` (default 60) of faults, then convergence.

mod harness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::Upstream;
use harness::cluster::{TestCluster, tagged_spec};
use tollgate_sdk::NodeClient;

/// xorshift64*: enough randomness for choosing faults, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

#[derive(Default)]
struct Outcomes {
    /// (request id, generation) in acknowledgement order.
    acked: Vec<(String, u64)>,
    failed: u64,
    unclear: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_fault_run_loses_no_acknowledged_apply() {
    let secs: u64 = std::env::var("TOLLGATE_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::env::var("TOLLGATE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos: {secs}s of faults, seed {seed} (TOLLGATE_CHAOS_SEED to replay)");
    let mut rng = Rng(seed);
    let up = Upstream::start("a").await;
    let mut c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    // gRPC ports survive restarts, so the writer can keep these addresses.
    let addrs: Vec<SocketAddr> = c.ids().iter().map(|id| c.node(*id).grpc).collect();

    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (outcomes, stop, upstream) = (outcomes.clone(), stop.clone(), up.addr);
        let (token, tls) = (c.token.clone(), c.tls.clone());
        let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let addr = addrs[rng.below(addrs.len() as u64) as usize].to_string();
                let id = format!("chaos-{seq}");
                let attempt = async {
                    let mut client = NodeClient::connect(&addr, &tls)
                        .await?
                        .with_token(Some(&token))?;
                    client
                        .apply_spec(tagged_spec(upstream, &seq.to_string()), false, id.clone())
                        .await
                };
                let result = tokio::time::timeout(Duration::from_secs(15), attempt).await;
                {
                    let mut o = outcomes.lock().unwrap();
                    match result {
                        Ok(Ok(resp)) => o.acked.push((id, resp.generation)),
                        Ok(Err(e)) => {
                            o.failed += 1;
                            // A clear error names what happened; an empty message is not one.
                            if e.to_string().trim().ends_with(':') {
                                o.unclear.push(e.to_string());
                            }
                        }
                        Err(_) => o.unclear.push(format!("{id}: no answer within 15s")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut faults = Vec::new();
    while Instant::now() < deadline {
        let ids = c.ids();
        let victim = match rng.below(2) {
            0 => c.leader(Duration::from_secs(10)).await,
            _ => ids[rng.below(ids.len() as u64) as usize],
        };
        match rng.below(2) {
            0 => {
                faults.push(format!("kill -9 node {victim}"));
                c.kill9(victim);
                tokio::time::sleep(rng.millis(300, 2500)).await;
                c.restart(victim).await;
            }
            _ => {
                faults.push(format!("partition node {victim}"));
                c.isolate(victim, true).await;
                tokio::time::sleep(rng.millis(300, 2500)).await;
                c.isolate(victim, false).await;
            }
        }
        tokio::time::sleep(rng.millis(200, 1500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    // Converge: every node applies the same last generation.
    let leader = c.leader(Duration::from_secs(20)).await;
    let last = c
        .client(leader)
        .await
        .read_spec(false)
        .await
        .expect("linearizable read after the faults")
        .generation;
    c.wait_serving(last, Duration::from_secs(30)).await;

    let o = std::mem::take(&mut *outcomes.lock().unwrap());
    let mut lost = Vec::new();
    let mut histories = Vec::new();
    for id in c.ids() {
        let h = c.client(id).await.history().await.unwrap();
        histories.push(h.clone());
        let mut previous = 0;
        for (request_id, generation) in &o.acked {
            match h.iter().find(|c| &c.request_id == request_id) {
                Some(change) if change.generation == *generation && *generation > previous => {
                    previous = *generation;
                }
                Some(change) => lost.push(format!(
                    "node {id}: {request_id} acknowledged as generation {generation}, found as {} (previous {previous})",
                    change.generation
                )),
                None => lost.push(format!("node {id}: {request_id} (generation {generation}) is missing")),
            }
        }
    }
    let same = histories.windows(2).all(|w| w[0] == w[1]);
    eprintln!("chaos faults: {}", faults.join(", "));
    eprintln!(
        "chaos result: {} faults; acknowledged {}, failed with a clear error {}, unclear {}, lost {}; \
         every node at generation {last}; histories identical: {same}",
        faults.len(),
        o.acked.len(),
        o.failed,
        o.unclear.len(),
        lost.len() / c.ids().len().max(1),
    );
    assert!(
        lost.is_empty(),
        "acknowledged applies lost:\n{}",
        lost.join("\n")
    );
    assert!(
        o.unclear.is_empty(),
        "failures without a clear error: {:?}",
        o.unclear
    );
    assert!(same, "nodes disagree on the history");
    assert!(
        o.acked.len() >= 20,
        "too few applies were acknowledged to mean anything: {}",
        o.acked.len()
    );
    assert!(faults.len() >= 10, "too few faults: {faults:?}");
}
