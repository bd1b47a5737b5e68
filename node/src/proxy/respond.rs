//! The one place that turns a data-plane error into an HTTP response.
//!
//! Every answer the gateway makes itself has the body
//! `{"error": {"code": "...", "message": "..."}}`, a status that says whose fault it is
//! (4xx: the client's, 502/503/504: the upstream's), and is counted in
//! `tollgate_errors_total{code}`. Messages say what to change where the client can.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::proxy::body::ResponseBody;
use crate::telemetry::metrics;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches {method} {host}{path}")]
    NoRoute {
        method: String,
        host: String,
        path: String,
    },
    #[error("the request body is larger than this gateway accepts")]
    BodyTooLarge,
    #[error("the request headers total {size} bytes; the limit is {limit} bytes")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("upstream {upstream:?} has no healthy endpoint")]
    NoHealthyUpstream { upstream: String },
    #[error("could not connect to upstream {upstream:?} at {endpoint}: {detail}")]
    UpstreamConnect {
        upstream: String,
        endpoint: SocketAddr,
        detail: String,
    },
    #[error("upstream {upstream:?} at {endpoint}: {detail}")]
    UpstreamCertificate {
        upstream: String,
        endpoint: SocketAddr,
        detail: String,
    },
    #[error("upstream {upstream:?} did not answer within {after:?}")]
    UpstreamTimeout { upstream: String, after: Duration },
    #[error("upstream {upstream:?} failed: {detail}")]
    UpstreamProtocol { upstream: String, detail: String },
    #[error("this node is at its limit of {0} open connections; retry shortly")]
    TooManyConnections(usize),
    #[error("the request body stopped arriving for {after:?}")]
    RequestBodyStalled { after: Duration },
    #[error("the request body arrived slower than the minimum of {min_rate} bytes per second")]
    RequestBodyTooSlow { min_rate: u64 },
    #[error("this client address holds its limit of {0} connections and streams; retry shortly")]
    TooManyClientConnections(usize),
    #[error(
        "host {0} needs a TLS connection made for it (its SNI): this connection was made for another host; connect again"
    )]
    Misdirected(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    VersionNotFound(String),
    #[error("{0}")]
    VersionRetired(String),
    #[error("{0}")]
    VersionUnavailable(String),
    #[error(
        "quota {quota} allows {limit} requests per {window_s} s and they are spent; retry in {retry_after_s} s"
    )]
    QuotaExceeded {
        quota: String,
        limit: u64,
        window_s: u64,
        retry_after_s: u64,
    },
    #[error(
        "tenant {tenant} has reached its monthly budget and its requests are refused until the month ends (UTC) or the operator raises the budget"
    )]
    BudgetExceeded { tenant: String },
    /// An LLM endpoint's own answer (docs/llm.md, "Errors").
    #[error("{message}")]
    Llm {
        status: StatusCode,
        code: &'static str,
        message: String,
        /// The request field at fault.
        param: Option<String>,
        retry_after_s: Option<u64>,
    },
    #[error("{}", circuit_message(upstream, reason, *retry_after_s))]
    CircuitOpen {
        upstream: String,
        reason: String,
        /// `None`: held open by an operator, so no time can be promised.
        retry_after_s: Option<u64>,
        fallback: Option<std::sync::Arc<crate::routing::circuit::Fallback>>,
    },
}

fn circuit_message(upstream: &str, reason: &str, retry_after_s: Option<u64>) -> String {
    match retry_after_s {
        Some(s) => {
            format!("the circuit breaker of upstream {upstream} is open ({reason}); retry in {s} s")
        }
        None => format!(
            "the circuit breaker of upstream {upstream} is held open by an operator ({reason}); \
             it stays open until an operator closes it or hands it back to detection"
        ),
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoHealthyUpstream { .. } | ProxyError::TooManyConnections(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamProtocol { .. }
            | ProxyError::UpstreamCertificate { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestBodyStalled { .. } | ProxyError::RequestBodyTooSlow { .. } => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::TooManyClientConnections(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::VersionNotFound(_) => StatusCode::NOT_FOUND,
            ProxyError::VersionRetired(_) => StatusCode::GONE,
            ProxyError::VersionUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BudgetExceeded { .. } => StatusCode::PAYMENT_REQUIRED,
            ProxyError::Llm { status, .. } => *status,
        }
    }

    /// The stable, machine-readable code of the JSON error.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "route_not_found",
            ProxyError::BodyTooLarge => "payload_too_large",
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NoHealthyUpstream { .. } => "no_healthy_upstream",
            ProxyError::UpstreamConnect { .. } => "upstream_connect_failed",
            ProxyError::UpstreamCertificate { .. } => "upstream_certificate_invalid",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::UpstreamProtocol { .. } => "upstream_error",
            ProxyError::TooManyConnections(_) => "too_many_connections",
            ProxyError::RequestBodyStalled { .. } | ProxyError::RequestBodyTooSlow { .. } => {
                "request_timeout"
            }
            ProxyError::TooManyClientConnections(_) => "too_many_client_connections",
            ProxyError::Misdirected(_) => "misdirected_request",
            ProxyError::Unauthorized(_) => "unauthorized",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::VersionNotFound(_) => "version_not_found",
            ProxyError::VersionRetired(_) => "version_retired",
            ProxyError::VersionUnavailable(_) => "version_unavailable",
            ProxyError::QuotaExceeded { .. } => "quota_exceeded",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::BudgetExceeded { .. } => "budget_exceeded",
            ProxyError::Llm { code, .. } => code,
        }
    }

    fn message(&self, body_limit: u64) -> String {
        match self {
            ProxyError::BodyTooLarge => {
                format!("the request body is larger than the limit of {body_limit} bytes")
            }
            other => other.to_string(),
        }
    }
}

/// Builds the JSON error response for `err` and counts it.
pub fn error_response(err: &ProxyError, body_limit: u64) -> Response<ResponseBody> {
    metrics::local_error(err.code());
    if let ProxyError::CircuitOpen {
        retry_after_s,
        fallback: Some(f),
        ..
    } = err
    {
        let mut resp = Response::new(ResponseBody::full(f.body.clone()));
        *resp.status_mut() = f.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, f.content_type.clone());
        if let Some(s) = retry_after_s {
            h.insert(header::RETRY_AFTER, HeaderValue::from(*s));
        }
        return resp;
    }
    let mut resp = json_error(err.status(), err.code(), &err.message(body_limit));
    if let ProxyError::CircuitOpen { retry_after_s, .. } = err {
        // A circuit held open by hand promises no time: no Retry-After at all.
        match retry_after_s {
            Some(s) => resp
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*s)),
            None => resp.headers_mut().remove(header::RETRY_AFTER),
        };
    }
    if let ProxyError::Llm {
        retry_after_s: Some(s),
        ..
    } = err
    {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*s));
    }
    if let ProxyError::QuotaExceeded {
        quota,
        limit,
        window_s,
        retry_after_s,
    } = err
    {
        // draft-ietf-httpapi-ratelimit-headers: the policy (quota, window) and the state
        // (remaining, seconds until it resets), as structured fields.
        let h = resp.headers_mut();
        let name = quota.replace(['"', '\\'], "");
        let pairs = [
            (header::RETRY_AFTER.as_str(), retry_after_s.to_string()),
            (
                "ratelimit-policy",
                format!("\"{name}\";q={limit};w={window_s}"),
            ),
            ("ratelimit", format!("\"{name}\";r=0;t={retry_after_s}")),
        ];
        for (k, v) in pairs {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        }
    }
    resp
}

/// A JSON error response in the shape of docs/error-handling.md ("The JSON error body").
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut bytes = serde_json::to_vec(&body).expect("a JSON value always serializes");
    bytes.push(b'\n');
    let mut resp = Response::new(ResponseBody::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tollgate\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_quota_answers_429_with_the_ratelimit_fields() {
        let err = ProxyError::QuotaExceeded {
            quota: "per-key".into(),
            limit: 1000,
            window_s: 1,
            retry_after_s: 1,
        };
        let resp = error_response(&err, 0);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = resp.headers();
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["ratelimit-policy"], "\"per-key\";q=1000;w=1");
        assert_eq!(h["ratelimit"], "\"per-key\";r=0;t=1");
        assert_eq!(h["content-type"], "application/json");
    }

    #[test]
    fn a_circuit_held_open_by_hand_promises_no_retry_time() {
        let open = |retry_after_s| ProxyError::CircuitOpen {
            upstream: "echo".into(),
            reason: "drill".into(),
            retry_after_s,
            fallback: None,
        };
        let held = error_response(&open(None), 0);
        assert_eq!(held.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(held.headers().get("retry-after").is_none());
        assert!(open(None).to_string().contains("held open by an operator"));
        let tripped = error_response(&open(Some(30)), 0);
        assert_eq!(tripped.headers()["retry-after"], "30");
    }
}
