//! The upstream side: a per-thread pool of upstream connections (HTTP/1.1 keep-alive, or
//! one shared HTTP/2 connection per endpoint when an HTTPS upstream agrees to h2 in
//! ALPN) and the forwarding loop with timeouts, retries and outlier bookkeeping.
//!
//! Each data-plane thread owns its pool outright (`Rc<RefCell<..>>`, no lock): a
//! connection is only ever used by the thread that opened it. A connection goes back to
//! the pool when its response body has been read to the end ([`PooledSender::release`]);
//! one abandoned mid-body is closed.
//!
//! Retries never buffer a body: a request is retried after it was sent only when it had
//! no body and its method is idempotent; a connect failure (nothing sent) is retried for
//! any request. Every retry must fit the upstream's retry budget.

use rustc_hash::FxHashMap as HashMap;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::proxy::LocalExec;
use crate::proxy::body::{BodyStats, RequestBody};
use crate::proxy::respond::ProxyError;
use crate::routing::upstream::{ActiveGuard, Cluster};
use crate::state::spec::{LbPolicy, RetryOn};
use crate::telemetry::metrics;

type H1Sender = SendRequest<RequestBody>;
type H2Sender = http2::SendRequest<RequestBody>;

/// A connection to an upstream endpoint: HTTP/1.1 (one request at a time, lent out and
/// given back) or HTTP/2 (shared by every request of the thread).
enum Sender {
    H1(H1Sender),
    H2(H2Sender),
}

/// Connections are pooled by endpoint and by how they were made: plain, or TLS under
/// one upstream's settings (`UpstreamTls::id`), with HTTP/1.1 alone for upgrades.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    addr: SocketAddr,
    tls: u64,
    h1_only: bool,
}

struct Idle {
    sender: H1Sender,
    expires: Instant,
}

/// One thread's idle upstream connections, by endpoint.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<PoolKey, Vec<Idle>>>,
    /// HTTP/2 connections, one per endpoint, used by many requests at once.
    shared: RefCell<HashMap<PoolKey, H2Sender>>,
}

impl Pool {
    fn checkout(&self, key: PoolKey) -> Option<Sender> {
        if key.tls != 0 && !key.h1_only {
            let mut shared = self.shared.borrow_mut();
            match shared.get(&key) {
                Some(s) if !s.is_closed() => return Some(Sender::H2(s.clone())),
                Some(_) => {
                    shared.remove(&key);
                }
                None => {}
            }
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&key)?;
        let now = Instant::now();
        // Most recently used first: its peer is least likely to have timed it out.
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() && conn.expires > now {
                return Some(Sender::H1(conn.sender));
            }
        }
        None
    }

    fn put(&self, key: PoolKey, sender: H1Sender, max_idle: usize, idle_timeout: Duration) {
        if sender.is_closed() || max_idle == 0 {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(key).or_default();
        if list.len() < max_idle {
            list.push(Idle {
                sender,
                expires: Instant::now() + idle_timeout,
            });
        }
    }

    /// Closes connections idle past their upstream's idle timeout, and those to addresses
    /// no upstream has any more (`live`: a host name's answer changed, an endpoint was
    /// removed). Requests in flight on them finish first: they hold their connection.
    pub fn sweep(&self, live: &std::collections::HashSet<SocketAddr>) {
        let mut idle = self.idle.borrow_mut();
        let now = Instant::now();
        for list in idle.values_mut() {
            list.retain(|c| !c.sender.is_closed() && c.expires > now);
        }
        idle.retain(|key, list| !list.is_empty() && live.contains(&key.addr));
        self.shared
            .borrow_mut()
            .retain(|key, s| !s.is_closed() && live.contains(&key.addr));
    }

    /// Drops every idle connection (on shutdown).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
        self.shared.borrow_mut().clear();
    }
}

/// An upstream connection lent to one response; see [`PooledSender::release`].
pub struct PooledSender {
    pool: Rc<Pool>,
    key: PoolKey,
    sender: Sender,
    max_idle: usize,
    idle_timeout: Duration,
    /// The request sent on it: the connection is reusable only once its body was sent
    /// whole (an upstream may answer before it has read an upload).
    request: Rc<BodyStats>,
}

impl PooledSender {
    /// Gives the connection back to its pool, if it can carry another request. Call once
    /// the response was read to the end.
    pub fn release(self) {
        // An HTTP/2 connection stays in the pool the whole time.
        if let Sender::H1(sender) = self.sender
            && self.request.finished.get()
        {
            self.pool
                .put(self.key, sender, self.max_idle, self.idle_timeout);
        }
    }
}

/// What a successful forward returns.
pub struct Forwarded {
    pub response: Response<Incoming>,
    pub conn: PooledSender,
    /// Held until the response is finished, for the retry budget and least-request.
    pub guards: Guards,
}

/// What `forward` did, kept up to date as it goes so that failed requests are logged
/// with their attempts too.
#[derive(Debug, Default)]
pub struct AttemptLog {
    pub attempts: u32,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
    /// Request sent to response head received, on the last attempt that sent one.
    pub upstream_time: Option<Duration>,
}

/// Connections found closed when a request was about to go out on them, before
/// `forward` gives up on the upstream (a peer that accepts and hangs up at once).
const MAX_STALE_CONNECTIONS: u32 = 4;

/// Counts a request as in flight (cluster-wide for the retry budget, per endpoint for
/// least-request) for as long as it lives.
pub struct Guards {
    _active: ActiveGuard,
    _in_flight: Option<InFlight>,
}

struct InFlight {
    cluster: Arc<Cluster>,
    endpoint: usize,
}

impl InFlight {
    fn new(cluster: &Arc<Cluster>, endpoint: usize) -> Self {
        cluster.endpoints[endpoint]
            .state
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            cluster: cluster.clone(),
            endpoint,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.cluster.endpoints[self.endpoint]
            .state
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The parts of the upstream request that are rebuilt for each attempt.
pub struct UpstreamHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Sends a request to one of the cluster's endpoints, retrying as the cluster allows.
pub async fn forward(
    pool: &Rc<Pool>,
    cluster: &Arc<Cluster>,
    mut head: UpstreamHead,
    body: RequestBody,
    stats: &Rc<BodyStats>,
    log: &mut AttemptLog,
) -> Result<Forwarded, ProxyError> {
    let active = cluster.begin_request();
    let hash_key = cluster
        .hash_header
        .as_ref()
        .and_then(|h| head.headers.get(h))
        .map(|v| v.as_bytes().to_vec());
    // A request without a body can be sent again as is; one with a body only while it was
    // never sent.
    let replayable = http_body::Body::is_end_stream(&body) && idempotent(&head.method);
    let may_retry_sent = replayable
        && cluster.retry_attempts > 0
        && cluster
            .retry_on
            .iter()
            .any(|r| *r != RetryOn::ConnectFailure);
    let mut body = Some(body);
    // HTTP/2 here carries no upgrade (WebSocket): those go over HTTP/1.1.
    let h1_only = crate::proxy::headers::is_upgrade(&head.headers);
    let tls_id = cluster.tls.as_ref().map_or(0, |t| t.id);
    let mut avoid: Vec<usize> = Vec::new();
    let mut attempts = 0u32;
    let mut _retry: Option<ActiveGuard> = None;
    let mut stale_conns = 0u32;

    loop {
        attempts += 1;
        let Some(ep) = cluster.select(hash_key.as_deref(), &avoid) else {
            return Err(ProxyError::NoHealthyUpstream {
                upstream: cluster.name.to_string(),
            });
        };
        let addr = cluster.endpoints[ep].state.addr;
        let key = PoolKey {
            addr,
            tls: tls_id,
            h1_only,
        };
        log.attempts = attempts;
        log.endpoint = Some(addr);
        // Only least-request reads per-endpoint counts; others skip the shared atomics.
        let in_flight =
            (cluster.policy == LbPolicy::LeastRequest).then(|| InFlight::new(cluster, ep));

        // 1. A connection: pooled, or new.
        let mut pooled = None;
        if stale_conns < 2 {
            while let Some(mut s) = pool.checkout(key) {
                // A connection just released may need its task to run once before it
                // takes the next request; a closed one errors here and is dropped.
                let ready = match &mut s {
                    Sender::H1(s) => s.ready().await.is_ok(),
                    Sender::H2(s) => s.ready().await.is_ok(),
                };
                if ready {
                    pooled = Some(s);
                    break;
                }
            }
        }
        let mut sender = match pooled {
            Some(s) => s,
            None => match connect(cluster, ep, cluster.connect_timeout, h1_only).await {
                Ok(s) => {
                    if let Sender::H2(h2) = &s {
                        pool.shared.borrow_mut().insert(key, h2.clone());
                    }
                    s
                }
                Err(e) => {
                    metrics::upstream_error(&cluster.name, e.kind());
                    eject_if_failing(cluster, ep, true);
                    avoid.push(ep);
                    if cluster.retry_on.contains(&RetryOn::ConnectFailure)
                        && let Some(g) = retry_allowed(cluster, attempts)
                    {
                        _retry = Some(g);
                        continue;
                    }
                    return Err(e.into_proxy_error(&cluster.name, addr));
                }
            },
        };

        // 2. Send it, keeping a copy of the head if a sent request may be retried.
        let copy = may_retry_sent.then(|| UpstreamHead {
            method: head.method.clone(),
            uri: head.uri.clone(),
            headers: head.headers.clone(),
        });
        let req_body = body
            .take()
            .unwrap_or_else(|| RequestBody::empty(stats.clone()));
        let mut req = Request::new(req_body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.headers_mut() = head.headers;
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(http::header::HOST) {
            // An HTTP/1.0 client may send none; HTTP/1.1 upstreams require one.
            if let Ok(v) = http::HeaderValue::from_str(&addr.to_string()) {
                req.headers_mut().insert(http::header::HOST, v);
            }
        }

        let started = Instant::now();
        let send = match &mut sender {
            Sender::H1(s) => futures::future::Either::Left(s.try_send_request(req)),
            Sender::H2(s) => {
                as_http2(&mut req);
                futures::future::Either::Right(s.try_send_request(req))
            }
        };
        tokio::pin!(send);
        // `timeouts.request` runs from the end of the upload: while the client is still
        // sending (and making progress), the upstream is not late.
        let mut uploaded = stats.bytes.get();
        let sent = loop {
            match tokio::time::timeout(cluster.request_timeout, &mut send).await {
                Err(_) if !stats.finished.get() && stats.bytes.get() > uploaded => {
                    uploaded = stats.bytes.get();
                }
                Err(_) if !stats.finished.get() => {
                    return Err(ProxyError::RequestBodyStalled {
                        after: cluster.request_timeout,
                    });
                }
                other => break other,
            }
        };
        log.upstream_time = Some(started.elapsed());
        let failure = match sent {
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                let retry_status = match status {
                    502 => cluster.retry_on.contains(&RetryOn::Status502),
                    503 => cluster.retry_on.contains(&RetryOn::Status503),
                    _ => false,
                };
                eject_if_failing(cluster, ep, status >= 500);
                if status >= 500 {
                    metrics::upstream_error(&cluster.name, "status_5xx");
                }
                if retry_status
                    && let Some(h) = copy
                    && let Some(g) = retry_allowed(cluster, attempts)
                {
                    _retry = Some(g);
                    avoid.push(ep);
                    head = h;
                    continue;
                }
                return Ok(Forwarded {
                    response,
                    conn: PooledSender {
                        pool: pool.clone(),
                        key,
                        sender,
                        max_idle: cluster.max_idle_per_endpoint,
                        idle_timeout: cluster.idle_timeout,
                        request: stats.clone(),
                    },
                    guards: Guards {
                        _active: active,
                        _in_flight: in_flight,
                    },
                });
            }
            Ok(Err(mut e)) => {
                if let Some(req) = e.take_message() {
                    // Never written: a pooled connection the upstream had closed. Try again
                    // on another connection; this is not a retry.
                    let (mut parts, b) = req.into_parts();
                    if parts.version == Version::HTTP_2 {
                        from_http2(&mut parts);
                    }
                    head = UpstreamHead {
                        method: parts.method,
                        uri: parts.uri,
                        headers: parts.headers,
                    };
                    body = Some(b);
                    attempts -= 1;
                    stale_conns += 1;
                    if stale_conns > MAX_STALE_CONNECTIONS {
                        metrics::upstream_error(&cluster.name, "protocol");
                        return Err(ProxyError::UpstreamProtocol {
                            upstream: cluster.name.to_string(),
                            detail: format!(
                                "{stale_conns} connections closed before the request could be sent"
                            ),
                        });
                    }
                    continue;
                }
                if stats.too_large.get() {
                    return Err(ProxyError::BodyTooLarge);
                }
                if stats.too_slow.get() > 0 {
                    return Err(ProxyError::RequestBodyTooSlow {
                        min_rate: stats.too_slow.get(),
                    });
                }
                if stats.client_error.get() {
                    // The client's upload failed, not the upstream: no ejection, no retry.
                    return Err(ProxyError::BadRequest(
                        "the request body could not be read to its end".into(),
                    ));
                }
                let err = e.into_error();
                tracing::debug!(upstream = %cluster.name, endpoint = %addr, "upstream request failed: {err:?}");
                metrics::upstream_error(&cluster.name, "protocol");
                (
                    ProxyError::UpstreamProtocol {
                        upstream: cluster.name.to_string(),
                        detail: err.to_string(),
                    },
                    false,
                )
            }
            Err(_elapsed) => {
                metrics::upstream_error(&cluster.name, "timeout");
                (
                    ProxyError::UpstreamTimeout {
                        upstream: cluster.name.to_string(),
                        after: cluster.request_timeout,
                    },
                    cluster.retry_on.contains(&RetryOn::Timeout),
                )
            }
        };
        let (err, retry_this) = failure;
        eject_if_failing(cluster, ep, true);
        avoid.push(ep);
        if retry_this
            && let Some(h) = copy
            && let Some(g) = retry_allowed(cluster, attempts)
        {
            _retry = Some(g);
            head = h;
            continue;
        }
        return Err(err);
    }
}

/// Whether one more attempt may go out: attempts left and room in the budget.
fn retry_allowed(cluster: &Arc<Cluster>, attempts: u32) -> Option<ActiveGuard> {
    if attempts > cluster.retry_attempts {
        return None;
    }
    match cluster.try_begin_retry() {
        Some(g) => {
            ::metrics::counter!("tollgate_retries_total", "upstream" => cluster.name.to_string())
                .increment(1);
            Some(g)
        }
        None => {
            ::metrics::counter!("tollgate_retry_budget_exhausted_total", "upstream" => cluster.name.to_string())
                .increment(1);
            None
        }
    }
}

fn eject_if_failing(cluster: &Cluster, endpoint: usize, failed: bool) {
    if cluster.record_outcome(endpoint, failed) {
        tracing::warn!(
            upstream = %cluster.name,
            endpoint = %cluster.endpoints[endpoint].state.addr,
            "endpoint ejected after consecutive failures"
        );
        ::metrics::counter!("tollgate_outlier_ejections_total", "upstream" => cluster.name.to_string())
            .increment(1);
    }
}

enum ConnectError {
    Refused(std::io::Error),
    TimedOut(Duration),
    Handshake(hyper::Error),
    Certificate(String),
    Tls(String),
}

impl ConnectError {
    fn kind(&self) -> &'static str {
        match self {
            ConnectError::TimedOut(_) => "connect_timeout",
            ConnectError::Certificate(_) => "certificate",
            _ => "connect",
        }
    }

    fn into_proxy_error(self, upstream: &str, addr: SocketAddr) -> ProxyError {
        let detail = match self {
            ConnectError::Refused(e) => e.to_string(),
            ConnectError::TimedOut(d) => format!("no connection within {d:?}"),
            ConnectError::Handshake(e) => e.to_string(),
            ConnectError::Tls(e) => e,
            ConnectError::Certificate(detail) => {
                return ProxyError::UpstreamCertificate {
                    upstream: upstream.to_string(),
                    endpoint: addr,
                    detail,
                };
            }
        };
        ProxyError::UpstreamConnect {
            upstream: upstream.to_string(),
            endpoint: addr,
            detail,
        }
    }
}

/// A request for an HTTP/2 connection: the authority in the URI (from `Host`, which
/// HTTP/2 does not use), the `https` scheme.
fn as_http2(req: &mut Request<RequestBody>) {
    *req.version_mut() = Version::HTTP_2;
    let authority = req.headers_mut().remove(http::header::HOST).and_then(|h| {
        h.to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
    });
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTPS);
    if let Some(a) = authority {
        parts.authority = Some(a);
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Undoes [`as_http2`] for a request that goes out again on another connection.
fn from_http2(parts: &mut http::request::Parts) {
    if let Some(a) = parts.uri.authority()
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    if let Some(pq) = parts.uri.path_and_query()
        && let Ok(uri) = pq.as_str().parse()
    {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_11;
}

/// A new connection to endpoint `ep`: TCP, then TLS when the upstream has it (HTTP/2 if
/// both sides agree, unless `h1_only`), all within `timeout`.
async fn connect(
    cluster: &Cluster,
    ep: usize,
    timeout: Duration,
    h1_only: bool,
) -> Result<Sender, ConnectError> {
    match tokio::time::timeout(timeout, connect_inner(cluster, ep, h1_only)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::TimedOut(timeout)),
    }
}

async fn connect_inner(
    cluster: &Cluster,
    ep: usize,
    h1_only: bool,
) -> Result<Sender, ConnectError> {
    let endpoint = &cluster.endpoints[ep];
    let stream = TcpStream::connect(endpoint.state.addr)
        .await
        .map_err(ConnectError::Refused)?;
    let _ = stream.set_nodelay(true);
    let Some(tls) = &cluster.tls else {
        return h1(stream).await;
    };
    let (stream, h2) = tls
        .connect(stream, &endpoint.server_name, h1_only)
        .await
        .map_err(|e| match e {
            crate::proxy::upstream_tls::TlsConnectError::Certificate(d) => {
                ConnectError::Certificate(d)
            }
            crate::proxy::upstream_tls::TlsConnectError::Other(d) => ConnectError::Tls(d),
        })?;
    if !h2 {
        return h1(stream).await;
    }
    let (sender, conn) = http2::Builder::new(LocalExec)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream HTTP/2 connection ended: {e}");
        }
    });
    Ok(Sender::H2(sender))
}

async fn h1<S>(stream: S) -> Result<Sender, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(Sender::H1(sender))
}
