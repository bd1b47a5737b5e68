//! Prometheus metrics, all prefixed `tollgate_`, rendered on the admin address's
//! `/metrics`.
//!
//! The request path never looks a metric up by name: per-route handles are resolved when
//! a snapshot is built ([`RouteMetrics`]), so recording is a few atomic operations.
//! Labels are bounded (route and upstream names from the spec, error codes, status
//! classes); nothing per request becomes a label.

use std::time::Duration;

use metrics::{Counter, Histogram, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds: 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs the process-wide recorder and returns the handle that renders it. Call once,
/// from the binary; a second call fails.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("install the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

/// Histograms keep raw samples until drained; drain them every few seconds so an unscraped
/// node does not grow.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Exports Raft's state as gauges: term, leader, log indexes, replication lag per peer,
/// members by role. Raft's metrics change several times per write; they are exported at
/// most every 100 ms (and at once after a quiet period), which is plenty for a scrape.
pub async fn raft_metrics(
    cluster: std::sync::Arc<crate::raft::cluster::Cluster>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut rx = cluster.raft.metrics();
    let mut known_peers: Vec<u64> = Vec::new();
    loop {
        let m = rx.borrow_and_update().clone();
        metrics::gauge!("tollgate_raft_term").set(m.current_term as f64);
        metrics::gauge!("tollgate_raft_leader").set(m.current_leader.unwrap_or(0) as f64);
        metrics::gauge!("tollgate_raft_is_leader").set(if m.current_leader == Some(cluster.id) {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("tollgate_raft_last_log_index").set(m.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("tollgate_raft_applied_index")
            .set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
        metrics::gauge!("tollgate_raft_committed_index")
            .set(cluster.log.committed_index().unwrap_or(0) as f64);
        metrics::gauge!("tollgate_raft_snapshot_index")
            .set(m.snapshot.map(|l| l.index).unwrap_or(0) as f64);
        metrics::gauge!("tollgate_raft_purged_index")
            .set(m.purged.map(|l| l.index).unwrap_or(0) as f64);
        metrics::gauge!("tollgate_state_generation")
            .set(cluster.state_machine.read(|a| a.state.generation) as f64);
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().count();
        let members = membership.nodes().count();
        metrics::gauge!("tollgate_raft_members", "role" => "voter").set(voters as f64);
        metrics::gauge!("tollgate_raft_members", "role" => "learner")
            .set((members - voters) as f64);
        // Lag per peer, known only on the leader; zeroed for peers no longer replicated to.
        let last = m.last_log_index.unwrap_or(0);
        let mut peers = Vec::new();
        if let Some(replication) = &m.replication {
            for (peer, matched) in replication {
                if *peer == cluster.id {
                    continue;
                }
                let lag = last.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
                metrics::gauge!("tollgate_raft_replication_lag", "peer" => peer.to_string())
                    .set(lag as f64);
                peers.push(*peer);
            }
        }
        for gone in known_peers.iter().filter(|p| !peers.contains(p)) {
            metrics::gauge!("tollgate_raft_replication_lag", "peer" => gone.to_string()).set(0.0);
        }
        known_peers = peers;
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Sets `tollgate_circuit_state{upstream}` for every upstream with a circuit breaker in
/// what the data plane serves (0 closed, 1 open, 2 half-open), from the replicated state
/// as it stands now: read at scrape time because half-open follows the clock, not a write.
pub fn circuit_states(
    routing: &crate::state::snapshot::Routing,
    cluster: &crate::raft::cluster::Cluster,
) {
    use crate::state::circuit::{Phase, phase};
    let now = crate::actor::wall_ms();
    cluster.state_machine.read(|a| {
        for c in routing.clusters.iter().filter(|c| c.circuit.is_some()) {
            let value = match phase(a.state.circuits.get(&*c.name), now) {
                Phase::Closed => 0.0,
                Phase::Open { .. } => 1.0,
                Phase::HalfOpen => 2.0,
            };
            metrics::gauge!("tollgate_circuit_state", "upstream" => c.name.to_string()).set(value);
        }
    });
}

fn describe() {
    describe_gauge!(
        "tollgate_circuit_state",
        "Each upstream circuit as this node sees it: 0 closed, 1 open, 2 half-open"
    );
    describe_gauge!("tollgate_raft_term", "Current Raft term");
    describe_gauge!(
        "tollgate_raft_leader",
        "Id of the leader this node knows (0: none)"
    );
    describe_gauge!("tollgate_raft_is_leader", "1 when this node is the leader");
    describe_gauge!(
        "tollgate_raft_last_log_index",
        "Last index in this node's Raft log"
    );
    describe_gauge!(
        "tollgate_raft_committed_index",
        "Last committed index this node knows"
    );
    describe_gauge!(
        "tollgate_raft_applied_index",
        "Last index applied to this node's state machine"
    );
    describe_gauge!(
        "tollgate_raft_snapshot_index",
        "Last index in this node's latest snapshot"
    );
    describe_gauge!(
        "tollgate_raft_purged_index",
        "Last index compacted out of the log"
    );
    describe_gauge!(
        "tollgate_raft_replication_lag",
        "Entries a peer is behind the leader's log, by peer (leader only)"
    );
    describe_gauge!(
        "tollgate_raft_members",
        "Cluster members by role (voter, learner)"
    );
    describe_gauge!(
        "tollgate_state_generation",
        "Spec generation applied by this node's state machine"
    );
    describe_counter!(
        "tollgate_raft_snapshots_built_total",
        "Snapshots this node built (log compactions)"
    );
    describe_counter!(
        "tollgate_raft_snapshots_installed_total",
        "Snapshots received from a leader and installed"
    );
    describe_histogram!(
        "tollgate_raft_write_seconds",
        "Time for a write to be committed and applied on the leader"
    );
    describe_counter!(
        "tollgate_snapshot_build_failures_total",
        "Applied specs this node could not compile into its data plane"
    );
    describe_counter!(
        "tollgate_requests_total",
        "Requests answered, by route and status class (route `_none` when nothing matched)"
    );
    describe_histogram!(
        "tollgate_request_duration_seconds",
        "Time from receiving the request head to sending the last response byte, by route"
    );
    describe_counter!(
        "tollgate_errors_total",
        "Responses the gateway produced itself, by error code (route_not_found, payload_too_large, ...)"
    );
    describe_counter!(
        "tollgate_upstream_errors_total",
        "Failed upstream attempts, by upstream and kind (connect, connect_timeout, timeout, protocol, status_5xx)"
    );
    describe_counter!(
        "tollgate_retries_total",
        "Retries sent to an upstream, by upstream"
    );
    describe_counter!(
        "tollgate_retry_budget_exhausted_total",
        "Retries refused by the retry budget, by upstream"
    );
    describe_counter!(
        "tollgate_outlier_ejections_total",
        "Endpoints ejected by passive outlier detection, by upstream"
    );
    describe_counter!(
        "tollgate_health_transitions_total",
        "Endpoints changing health-check state, by upstream and new state"
    );
    describe_gauge!(
        "tollgate_open_connections",
        "Client connections open on the proxy port"
    );
    describe_counter!(
        "tollgate_connections_total",
        "Client connections accepted on the proxy port"
    );
    describe_counter!(
        "tollgate_connections_rejected_total",
        "Client connections refused because the node was at its connection cap"
    );
    describe_counter!(
        "tollgate_http_protocol_errors_total",
        "Client connections closed by the HTTP layer, by kind: malformed (answered 400), head_too_large (431), header_read_timeout (no request head in time, including the next one on an idle keep-alive connection)"
    );
    describe_gauge!(
        "tollgate_spec_generation",
        "Generation of the spec the data plane serves (0: none loaded)"
    );
    describe_counter!(
        "tollgate_spec_reloads_total",
        "Spec loads, by result (ok, invalid)"
    );
    describe_counter!(
        "tollgate_call_log_records_total",
        "Call-log records written"
    );
    describe_counter!(
        "tollgate_call_log_dropped_total",
        "Call-log records dropped because the writer was behind or a write failed"
    );
    describe_gauge!(
        "tollgate_call_log_disk_bytes",
        "The call log's size on disk"
    );
}

/// Counts a response the gateway made itself.
pub fn local_error(code: &'static str) {
    metrics::counter!("tollgate_errors_total", "code" => code).increment(1);
}

/// Counts a failed upstream attempt.
pub fn upstream_error(upstream: &str, kind: &'static str) {
    metrics::counter!("tollgate_upstream_errors_total", "upstream" => upstream.to_string(), "kind" => kind)
        .increment(1);
}

/// Pre-resolved handles for one route's request metrics.
#[derive(Debug)]
pub struct RouteMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    pub fn new(route: &str) -> RouteMetrics {
        let route = route.to_string();
        let class = |c: &'static str| metrics::counter!("tollgate_requests_total", "route" => route.clone(), "status_class" => c);
        RouteMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: metrics::histogram!("tollgate_request_duration_seconds", "route" => route.clone()),
        }
    }

    pub fn record(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}
