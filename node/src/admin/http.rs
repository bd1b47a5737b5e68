//! The node's HTTP admin endpoints (default 127.0.0.1:7071):
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 while the data plane accepts traffic; 503 while draining, and while
//!   starting (until it serves what the cluster had applied, or there is nothing yet). The body
//!   says which spec generation is served and whether the cluster side is `ok` or
//!   `degraded` (and why): a node cut off from its leader stays ready, because it keeps
//!   serving its last Snapshot (docs/architecture.md, decision 5).
//! - `GET /metrics`: Prometheus text.
//!
//! Served on the cluster-side runtime, never on the data-plane threads.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::Shared;
use crate::raft::cluster::Cluster;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    cluster: Option<Arc<Cluster>>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let metrics = metrics.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&req, &shared, cluster.as_deref(), &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A gRPC client pointed here (a CLI given the admin port instead of the gRPC one) gets a
/// gRPC answer it can show: UNIMPLEMENTED, saying which port this is and which it needs.
fn wrong_port_for_grpc() -> Response<Full<Bytes>> {
    let message = crate::admin::grpc::percent_encode(
        "this is a Tollgate node's HTTP admin port (/healthz, /readyz, /metrics), not gRPC; \
         the node's gRPC API is on its --grpc-addr (127.0.0.1:7070 under `tollgate dev`), the \
         control plane on 127.0.0.1:7080",
    );
    let mut resp = Response::new(Full::new(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", header::HeaderValue::from_static("12"));
    if let Ok(v) = header::HeaderValue::from_str(&message) {
        h.insert("grpc-message", v);
    }
    resp
}

fn route(
    req: &Request<Incoming>,
    shared: &Shared,
    cluster: Option<&Cluster>,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return wrong_port_for_grpc();
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": {"code": "method_not_allowed", "message": "admin endpoints take GET"}}),
        );
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => {
            let generation = shared.snapshot.load().generation;
            let degraded = cluster.and_then(|c| c.degraded());
            let mut body = serde_json::json!({
                "spec_generation": generation,
                "cluster": if degraded.is_some() { "degraded" } else { "ok" },
            });
            if let Some(reason) = degraded {
                body["reason"] = reason.into();
            }
            let synced = shared.synced.load(Ordering::Relaxed)
                || cluster.is_none_or(|c| {
                    c.is_member() && c.state_machine.read(|a| a.state.generation) == 0
                });
            if !synced {
                body["status"] = "starting".into();
                body["reason"] = "catching up with the cluster: no spec served yet".into();
                json(StatusCode::SERVICE_UNAVAILABLE, body)
            } else if shared.ready.load(Ordering::Relaxed) {
                body["status"] = "ready".into();
                json(StatusCode::OK, body)
            } else {
                body["status"] = "draining".into();
                json(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        "/quotas" => json(
            StatusCode::OK,
            serde_json::json!({
                "node": shared.quotas.node,
                "leases": shared.quotas.leases(),
            }),
        ),
        "/metrics" => {
            if let Some(c) = cluster {
                crate::telemetry::metrics::circuit_states(&shared.snapshot.load().routing, c);
            }
            let mut resp = Response::new(Full::new(Bytes::from(metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        other => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": {"code": "not_found", "message": format!("no admin endpoint {other}; try /healthz, /readyz, /metrics or /quotas")}}),
        ),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
