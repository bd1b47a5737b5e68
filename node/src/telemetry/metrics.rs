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

fn describe() {
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
