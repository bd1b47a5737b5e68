//! Active HTTP health checks: one task per endpoint of every upstream that has
//! `health_check` set, probing it each interval and flipping [`EndpointState::healthy`] after
//! `unhealthy_threshold` failures or `healthy_threshold` successes in a row.
//!
//! Endpoints start healthy, so a new spec takes traffic at once; a failing endpoint
//! leaves rotation after its threshold. Probes use a fresh connection each time (they are
//! rare) and run on the cluster-side runtime, never on the data-plane threads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::routing::upstream::{Cluster, EndpointState};
use crate::state::spec::HealthCheckSpec;

/// Starts the health-check tasks of a snapshot's clusters. Dropping or cancelling the
/// returned token stops them (done when the next snapshot replaces this one).
pub fn spawn_checks(
    clusters: &[Arc<Cluster>],
    runtime: &tokio::runtime::Handle,
) -> CancellationToken {
    let token = CancellationToken::new();
    for cluster in clusters {
        let Some(spec) = cluster.health_check.clone() else {
            continue;
        };
        for ep in &cluster.endpoints {
            let state = ep.state.clone();
            let spec = spec.clone();
            let name = cluster.name.clone();
            let token = token.clone();
            let tls = cluster.tls.clone().map(|t| (t, ep.server_name.clone()));
            runtime.spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = check_loop(name, state, spec, tls) => {}
                }
            });
        }
    }
    token
}

/// An HTTPS upstream's settings and the endpoint's name, for probes over TLS.
type ProbeTls = Option<(
    Arc<crate::proxy::upstream_tls::UpstreamTls>,
    rustls_pki_types::ServerName<'static>,
)>;

async fn check_loop(
    cluster: Arc<str>,
    state: Arc<EndpointState>,
    spec: HealthCheckSpec,
    tls: ProbeTls,
) {
    let mut interval = tokio::time::interval(spec.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        interval.tick().await;
        let outcome = tokio::time::timeout(spec.timeout, probe(&state, &spec, &tls)).await;
        let ok = match outcome {
            Ok(Ok(status)) => {
                if spec.expected_statuses.is_empty() {
                    (200..300).contains(&status)
                } else {
                    spec.expected_statuses.contains(&status)
                }
            }
            Ok(Err(_)) | Err(_) => false,
        };
        let healthy = state.healthy.load(Ordering::Relaxed);
        if ok {
            successes += 1;
            failures = 0;
            if !healthy && successes >= spec.healthy_threshold {
                state.healthy.store(true, Ordering::Relaxed);
                info!(upstream = %cluster, endpoint = %state.addr, "endpoint passed its health checks; back in rotation");
                metrics::counter!("tollgate_health_transitions_total", "upstream" => cluster.to_string(), "to" => "healthy").increment(1);
            }
        } else {
            failures += 1;
            successes = 0;
            if healthy && failures >= spec.unhealthy_threshold {
                state.healthy.store(false, Ordering::Relaxed);
                warn!(upstream = %cluster, endpoint = %state.addr, failures, "endpoint failed its health checks; out of rotation");
                metrics::counter!("tollgate_health_transitions_total", "upstream" => cluster.to_string(), "to" => "unhealthy").increment(1);
            }
        }
    }
}

async fn probe(
    state: &EndpointState,
    spec: &HealthCheckSpec,
    tls: &ProbeTls,
) -> anyhow::Result<u16> {
    let stream = TcpStream::connect(state.addr).await?;
    stream.set_nodelay(true)?;
    match tls {
        None => send_probe(stream, state, spec).await,
        Some((tls, name)) => {
            let (stream, _) = tls.connect(stream, name, true).await.map_err(|e| {
                anyhow::anyhow!(match e {
                    crate::proxy::upstream_tls::TlsConnectError::Certificate(d)
                    | crate::proxy::upstream_tls::TlsConnectError::Other(d) => d,
                })
            })?;
            send_probe(stream, state, spec).await
        }
    }
}

async fn send_probe<S>(
    stream: S,
    state: &EndpointState,
    spec: &HealthCheckSpec,
) -> anyhow::Result<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let host = spec.host.clone().unwrap_or_else(|| state.addr.to_string());
    let req = http::Request::get(spec.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "tollgate-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    // The connection is driven here, not in a task of its own, so a probe that times out
    // (and is dropped) takes its connection with it.
    let send = sender.send_request(req);
    tokio::pin!(conn, send);
    let resp = tokio::select! {
        resp = &mut send => resp?,
        // With `Connection: close` the connection may finish in the same poll that
        // delivered the response; the response is then ready (or the error says why not).
        closed = &mut conn => {
            closed?;
            send.await?
        }
    };
    Ok(resp.status().as_u16())
}
