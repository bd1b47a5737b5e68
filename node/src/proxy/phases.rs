//! The request pipeline, as the named stages of docs/architecture.md, "The request path":
//!
//! ```text
//! accept ─► match route ─► authenticate ─► version ─► quota ─► circuit ─► transform ─► forward ─► meter
//!   │            │              │              │          │         │           │            │         │
//!  limits    Snapshot      APIs only: key   /vN, Api-   leases    committed   path and   client.rs  Tail, when the
//!  (431,     matcher       or JWT (401),    Version or  (429)     state       headers                last byte is out
//!   413)     (404)         subscription     split; 410            (503)
//!                          (403), budget    if retired
//!                          cap (402)
//! ```
//!
//! Each request loads the [`Snapshot`] once and reads nothing else shared. Any stage can
//! end the request with a [`ProxyError`], which `respond.rs` turns into the JSON error;
//! the meter stage ([`Tail`]) runs for every request, however it ended. See
//! `docs/request-lifecycle.md`.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::actor::quota::Admit;
use crate::actor::quotas::Quotas;
use crate::actor::wall_ms;
use crate::auth::{AuthError, AuthTable, strip_bearer};
use crate::proxy::body::{BodyStats, MinRate, RequestBody, ResponseBody};
use crate::proxy::client::{self, AttemptLog, Guards, Pool, UpstreamHead};
use crate::proxy::headers;
use crate::proxy::respond::{ProxyError, error_response};
use crate::proxy::{OpenConnection, Shared};
use crate::routing::matcher::Matched;
use crate::state::circuit::{Phase, phase};
use crate::state::lifecycle::{Stage, version_segment};
use crate::state::snapshot::{
    MOUNT_BIT, Mount, MountAuth, Rewrite, Route, Routing, Selection, Snapshot,
};
use crate::state::spec::QuotaScope;
use crate::telemetry::access_log::{AccessLog, Entry};
use crate::telemetry::traces::{ClientSpan, RequestTrace};
use opentelemetry::KeyValue;

/// The W3C trace-context header the upstream gets.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A thread's handle on the shared snapshot: requests clone the non-atomic `Rc`, so they
/// do not bounce the `Arc`'s counter between cores on every request.
#[allow(clippy::redundant_allocation)]
pub type LocalSnapshot = Rc<Arc<Snapshot>>;

/// What one data-plane thread owns.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub pool: Rc<Pool>,
    pub access_log: AccessLog,
    /// The snapshot this thread last saw, shared by its requests through a non-atomic
    /// `Rc`, so requests do not bounce the `Arc`'s counter between cores.
    #[allow(clippy::redundant_allocation)]
    // the point: an Rc, local to this thread, of the shared Arc
    current: RefCell<Rc<Arc<Snapshot>>>,
    /// This thread's usage counts (uncontended but for the journal's drain).
    meter: Option<Arc<std::sync::Mutex<crate::metering::Shard>>>,
    /// This thread's call-log records waiting to be handed to the writer.
    calls: Option<crate::calls::CallBuffer>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The last requests' tails hold the worker: this runs after every one has logged.
        self.flush_logs();
    }
}

impl Worker {
    pub fn new(shared: Arc<Shared>, access_log: AccessLog) -> Worker {
        let current = RefCell::new(Rc::new(shared.snapshot.load_full()));
        let meter = shared.meter.as_ref().map(|m| m.shard());
        let calls = shared.calls.clone().map(crate::calls::CallBuffer::new);
        Worker {
            meter,
            calls,
            shared,
            pool: Rc::new(Pool::default()),
            access_log,
            current,
        }
    }

    /// Writes out the access log's buffer and hands the call log its records.
    pub fn flush_logs(&self) {
        self.access_log.flush();
        if let Some(c) = &self.calls {
            c.flush();
        }
    }

    /// The snapshot to serve a request with: the live one, reusing this thread's handle
    /// while it has not changed.
    fn snapshot(&self) -> LocalSnapshot {
        let live = self.shared.snapshot.load();
        let mut current = self.current.borrow_mut();
        if !Arc::ptr_eq(&current, &live) {
            *current = Rc::new(arc_swap::Guard::into_inner(live));
        }
        current.clone()
    }
}

/// The client end of a connection, worked out once per connection.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address the per-client limit counts this client under.
    pub client: crate::proxy::guard::ClientKey,
    /// The client IP as a header value, for `X-Forwarded-For`.
    pub ip: HeaderValue,
    /// Whether the connection came over TLS (the HTTPS listener).
    pub tls: bool,
    /// The host whose client-certificate rule the TLS handshake applied (by SNI).
    pub tls_host: Option<Arc<str>>,
    /// The client certificate the handshake verified.
    pub client_cert: Option<Arc<crate::state::tls::ClientCert>>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Peer {
            addr,
            client: crate::proxy::guard::ClientKey::of(addr.ip()),
            ip,
            tls: false,
            tls_host: None,
            client_cert: None,
        }
    }
}

/// Serves one request through every stage. Never fails: errors become responses.
pub async fn handle(
    req: Request<Incoming>,
    worker: Rc<Worker>,
    peer: Peer,
) -> Result<Response<ResponseBody>, Infallible> {
    let received = Instant::now();
    let snapshot = worker.snapshot();
    let trace = match &worker.shared.tracing {
        Some(t) => t.start_request(req.headers()),
        None => None,
    };
    let mut tail = Box::new(Tail::new(
        worker.clone(),
        snapshot.clone(),
        &req,
        peer.addr,
        received,
        trace,
    ));
    // HSTS is sent on HTTPS answers only (RFC 6797 §7.2), errors included.
    let hsts = match peer.tls && !snapshot.routing.hosts.is_empty() {
        true => request_host(req.uri(), req.headers(), req.version())
            .ok()
            .and_then(|h| snapshot.routing.hosts.find(h))
            .and_then(|r| r.hsts.clone()),
        false => None,
    };
    let mut resp = match pipeline(req, &snapshot, &worker, &peer, &mut tail).await {
        Ok(resp) => resp,
        Err(err) => {
            tail.error = Some(err.code());
            let mut resp = error_response(&err, worker.shared.limits.max_request_body);
            if let Some(dialect) = tail.llm_dialect {
                crate::llm::serve::into_dialect(dialect, &err, &mut resp);
            }
            resp
        }
    };
    if let Some(hsts) = hsts {
        resp.headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, hsts);
    }
    tail.status = resp.status().as_u16();
    if let Some(id) = &tail.request_id {
        resp.headers_mut().insert(X_REQUEST_ID, id.clone());
    }
    if let Some(c) = &mut tail.capture {
        c.response_headers = c.spec.headers(resp.headers());
    }
    resp.body_mut().set_tail(tail);
    Ok(resp)
}

/// A permanent redirect (308: the method and body are kept) to the same URL over HTTPS
/// on `port` (left out when 443).
fn https_redirect(host: &str, port: u16, uri: &http::Uri) -> Response<ResponseBody> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

async fn pipeline(
    mut req: Request<Incoming>,
    snapshot: &Snapshot,
    worker: &Rc<Worker>,
    peer: &Peer,
    tail: &mut Tail,
) -> Result<Response<ResponseBody>, ProxyError> {
    // accept: the limits that need no route.
    let limits = &worker.shared.limits;
    let host = check_head(
        req.uri(),
        req.headers(),
        req.version(),
        limits.max_header_bytes,
    )?;
    let host_rule = snapshot.routing.hosts.find(host);
    if let Some(rule) = host_rule {
        if !peer.tls
            && rule.https_redirect
            && let Some(port) = worker.shared.https_port
        {
            return Ok(https_redirect(host, port, req.uri()));
        }
        // A host that asks for client certificates is served only on a connection whose
        // handshake applied its rule: not one made for another name (SNI) and reused, as
        // HTTP/2 clients do for every name a certificate covers (RFC 9113 §9.1.1).
        if rule.client_certificates.is_some() {
            if !peer.tls {
                return Err(ProxyError::Forbidden(format!(
                    "host {host} asks for client certificates, so it is served over HTTPS only"
                )));
            }
            if peer.tls_host.as_deref() != Some(&*rule.pattern) {
                return Err(ProxyError::Misdirected(host.to_string()));
            }
        }
    }

    // match route
    let routing = &*snapshot.routing;
    let found = routing
        .matcher
        .lookup(host, req.method(), req.uri().path(), req.headers())
        .ok_or_else(|| ProxyError::NoRoute {
            method: req.method().to_string(),
            host: host.to_string(),
            path: req.uri().path().to_string(),
        })?;
    // An LLM API answers in its callers' dialect from here on, a 413 included.
    if found.route & MOUNT_BIT != 0 && routing.mounts[(found.route & !MOUNT_BIT) as usize].llm {
        let path = req.uri().path();
        let below = &path[found.prefix_len.min(path.len())..];
        tail.llm_dialect = Some(crate::llm::dialect_of_path(below));
    }
    if declared_length(&req)?.is_some_and(|len| len > limits.max_request_body) {
        return Err(ProxyError::BodyTooLarge);
    }
    // A route of the spec, or an API: then its version's route, below the base path.
    let (matched, api) = if found.route & MOUNT_BIT == 0 {
        (found, None)
    } else {
        let index = found.route & !MOUNT_BIT;
        let mount = &routing.mounts[index as usize];
        // Known from here on, even when authentication refuses the request; the caller
        // and the version are added as they become known, so a request refused later
        // (no route in the version, a retired version) is still counted under its tenant.
        let used = tail.api.insert(ApiUse {
            mount: index,
            ..ApiUse::default()
        });
        let (matched, api) = api_route(mount, &req, host, found, snapshot, used, peer)?;
        if let Some(spec) = used
            .version
            .and_then(|v| mount.versions[v as usize].capture.as_ref())
            && tail.request_id.is_some()
        {
            tail.start_capture(spec, req.headers());
        }
        if let Some(tenant) = &api.tenant
            && !snapshot.capped.is_empty()
        {
            budget(&snapshot.capped, tenant, api.key)?;
        }
        (matched, Some(api))
    };
    let route = &routing.routes[matched.route as usize];
    tail.route = Some(matched.route);

    // quota, circuit
    if !route.quotas.is_empty() {
        tail.quota = "refused";
        let waited = quota(&worker.shared.quotas, routing, route, api.as_ref(), peer).await?;
        tail.quota = if waited {
            "admitted_after_wait"
        } else {
            "admitted"
        };
    }
    if let Some((llm, endpoint)) = &route.llm {
        // An LLM route is always a version's: its mount names the API's owner.
        let mount = tail.api.as_ref().map(|u| u.mount as usize);
        let owner = mount.map_or("", |m| &*routing.mounts[m].owner);
        let allowed = api
            .as_ref()
            .and_then(|a| a.key)
            .and_then(|k| snapshot.auth.models_of(k));
        let spending = llm_spending(snapshot, route, api.as_ref(), peer);
        let caller = crate::llm::serve::Caller {
            allowed,
            owner,
            spending,
        };
        return crate::llm::serve(req, worker, snapshot, (llm, *endpoint), caller, tail).await;
    }
    let probe = circuit(snapshot, route, &mut tail.circuit)?;
    // transform
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let below = api.as_ref().map(|a| a.below);
    let mut head = transform_request(parts, route, matched, below, peer, upgrade)?;
    if let Some(headers) = host_rule.and_then(|r| r.client_certificates.as_ref()) {
        headers.apply(&mut head.headers, peer.client_cert.as_deref());
    }
    if let Some(api) = &api {
        api.identify(&mut head.headers);
    }
    // The upstream's logs can name the same request.
    if let Some(id) = &tail.request_id {
        head.headers.insert(X_REQUEST_ID, id.clone());
    }
    // The upstream call continues the trace: a CLIENT span, child of this request's.
    if let Some(trace) = tail.trace.as_deref_mut() {
        let tp = trace.start_client(&head.method);
        head.headers.insert(TRACEPARENT, tp);
    }
    let stats = tail.request_stats.clone();
    // gRPC streams may rightly send nothing for a long time: no minimum rate for them.
    let rate = if is_grpc(&head.headers) {
        None
    } else {
        MinRate::new(limits.min_request_body_rate, limits.request_body_grace)
    };
    let body = RequestBody::new(body, limits.max_request_body, stats.clone(), rate);

    // forward
    let started = Instant::now();
    let forwarded = client::forward(
        &worker.pool,
        &route.cluster,
        head,
        body,
        &stats,
        &mut tail.attempts,
    )
    .await;
    if let Some(breaker) = &route.cluster.circuit {
        let failed = match &forwarded {
            Ok(f) => Some(f.response.status().is_server_error()),
            Err(
                ProxyError::UpstreamConnect { .. }
                | ProxyError::UpstreamCertificate { .. }
                | ProxyError::UpstreamTimeout { .. }
                | ProxyError::UpstreamProtocol { .. }
                | ProxyError::NoHealthyUpstream { .. },
            ) => Some(true),
            // The client's doing (a body too large, one that stalled): not the upstream's.
            Err(_) => None,
        };
        if let Some(failed) = failed {
            breaker.record(failed, started.elapsed(), probe);
        }
    }
    if let Some(client) = tail.trace.as_deref_mut().and_then(RequestTrace::client) {
        client.end();
        let outcome = match &forwarded {
            Ok(f) => Ok(f.response.status().as_u16()),
            Err(e) => Err(e.code()),
        };
        client_span_attributes(client, &route.cluster.name, &tail.attempts, outcome);
    }
    let mut fwd = forwarded?;

    if fwd.response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut fwd.response);
        // hyper lets go of the client connection now; the tunnel keeps it in the counts.
        let slot = OpenConnection::open(worker.shared.clone(), peer.client);
        tokio::task::spawn_local(tunnel(client_upgrade, upstream_upgrade, slot));
        let (parts, _) = fwd.response.into_parts();
        tail.guards = Some(fwd.guards);
        let mut resp = Response::from_parts(parts, ResponseBody::empty());
        route.response_headers.apply(resp.headers_mut());
        return Ok(resp);
    }

    let (mut parts, body) = fwd.response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    route.response_headers.apply(&mut parts.headers);
    if let Some(api) = &api {
        for (name, value) in api.deprecation {
            parts.headers.insert(name.clone(), value.clone());
        }
    }
    tail.guards = Some(fwd.guards);
    Ok(Response::from_parts(
        parts,
        ResponseBody::upstream(body, Some(fwd.conn), route.cluster.request_timeout),
    ))
}

/// What the API stages learned about a request to an API.
struct ApiRequest<'s> {
    /// Where, in the request's path, the path below the base path and version prefix
    /// starts (what the version's routes see and the upstream gets).
    below: usize,
    /// Headers a deprecated version adds to its answers.
    deprecation: &'s [(http::HeaderName, HeaderValue)],
    /// The version, as the `x-tollgate-api-version` value.
    version: &'s HeaderValue,
    /// The caller's tenant, once authenticated.
    tenant: Option<Arc<str>>,
    /// The id of the API key presented (it is not passed on).
    key: Option<&'s Arc<str>>,
}

impl ApiRequest<'_> {
    /// Tells the upstream who called and which version answers; takes the API key out,
    /// so it never reaches upstream logs (a JWT stays: upstreams read its claims).
    fn identify(&self, headers: &mut http::HeaderMap) {
        if self.key.is_some() {
            headers.remove("x-api-key");
            let bearer_key = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("tgk_"));
            if bearer_key {
                headers.remove(header::AUTHORIZATION);
            }
        }
        headers.remove("x-tollgate-tenant");
        if let Some(t) = self
            .tenant
            .as_deref()
            .and_then(|t| HeaderValue::from_str(t).ok())
        {
            headers.insert("x-tollgate-tenant", t);
        }
        headers.insert("x-tollgate-api-version", self.version.clone());
    }
}

/// The API stages: authenticate the caller, pick the version (path prefix, `Api-Version`,
/// or the split), check the caller's subscription, answer 410 for a retired version, and
/// match the version's own routes.
fn api_route<'s>(
    mount: &'s Mount,
    req: &Request<Incoming>,
    host: &str,
    found: Matched,
    snapshot: &'s Snapshot,
    used: &mut ApiUse,
    peer: &Peer,
) -> Result<(Matched, ApiRequest<'s>), ProxyError> {
    let full = req.uri().path();
    let mut below = &full[found.prefix_len.min(full.len())..];
    let mut major = None;
    // An LLM API's `/v1/...` is the dialect's path: its versions go by header or split.
    if let Some(rest) = below.strip_prefix('/').filter(|_| !mount.llm) {
        let (seg, after) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some(m) = version_segment(seg) {
            major = Some(m);
            below = after;
        }
    }
    let caller = authenticate(mount, req, &snapshot.auth, peer)?;
    if let Some(c) = &caller {
        used.tenant = Some(c.tenant.clone());
        used.key = c.key.cloned();
    }
    let header =
        match req.headers().get("api-version") {
            Some(v) if major.is_none() => Some(v.to_str().map_err(|_| {
                ProxyError::BadRequest("the Api-Version header is not ASCII".into())
            })?),
            _ => None,
        };
    let sticky = caller.as_ref().and_then(|c| c.key.map(|k| &**k));
    let may_call = |v: &semver::Version| {
        caller.as_ref().is_none_or(|c| {
            snapshot
                .auth
                .may_call(&c.tenant, &mount.api, &mount.owner, v)
        })
    };
    let not_subscribed = |what: String| {
        let tenant = caller.as_ref().map(|c| &*c.tenant).unwrap_or("");
        ProxyError::Forbidden(format!(
            "tenant {tenant} is not subscribed to {what} of API {}; ask the API's owner for a subscription",
            mount.api
        ))
    };
    // The split picks among the versions the caller may call; a version asked for by
    // prefix or header must be one of them.
    let version = match mount.select(major, header, sticky, &may_call) {
        Ok(v) => v,
        Err(Selection::NotFound(msg)) => return Err(ProxyError::VersionNotFound(msg)),
        Err(Selection::NotSubscribed) => {
            return Err(not_subscribed("any version in the split".into()));
        }
    };
    let version_index = mount
        .versions
        .iter()
        .position(|v| std::ptr::eq(v, version))
        .unwrap_or(0) as u32;
    used.version = Some(version_index);
    if !may_call(&version.version) {
        return Err(not_subscribed(format!("version {}", version.version)));
    }
    if !version.available {
        return Err(ProxyError::VersionUnavailable(format!(
            "version {} of API {} could not be compiled on this node; the operator has the error in its log",
            version.version, mount.api
        )));
    }
    if version.stage == Stage::Retired {
        return Err(ProxyError::VersionRetired(format!(
            "version {} of API {} is retired; use a newer version",
            version.version, mount.api
        )));
    }
    let path = if below.is_empty() { "/" } else { below };
    let matched = version
        .matcher
        .lookup(host, req.method(), path, req.headers())
        .ok_or_else(|| ProxyError::NoRoute {
            method: req.method().to_string(),
            host: host.to_string(),
            path: format!(
                "{} (version {} of API {})",
                path, version.version, mount.api
            ),
        })?;
    Ok((
        matched,
        ApiRequest {
            below: full.len() - below.len(),
            deprecation: &version.deprecation,
            version: &version.label,
            key: caller.as_ref().and_then(|c| c.key),
            tenant: caller.map(|c| c.tenant),
        },
    ))
}

/// Who called an API: the tenant charged, and the key id when an API key was used
/// (borrowed from the snapshot's key table). A JWT's requests are charged to the API's
/// owner, the tenant its issuer is registered to, never to a name the token carries.
struct ApiCaller<'s> {
    tenant: Arc<str>,
    key: Option<&'s Arc<str>>,
}

/// Checks the caller's API key (`x-api-key` or `Authorization: Bearer`) or JWT against
/// this node's snapshot: no cluster call. `None` for an API open to anyone.
fn authenticate<'s>(
    mount: &Mount,
    req: &Request<Incoming>,
    auth: &'s AuthTable,
    peer: &Peer,
) -> Result<Option<ApiCaller<'s>>, ProxyError> {
    let bearer = || {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(strip_bearer)
    };
    match &mount.auth {
        MountAuth::None => Ok(None),
        MountAuth::Broken => Err(ProxyError::VersionUnavailable(format!(
            "API {}'s auth settings could not be compiled on this node; the operator has the error in its log",
            mount.api
        ))),
        MountAuth::Key => {
            let presented = req
                .headers()
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .or_else(bearer)
                .ok_or_else(|| {
                    ProxyError::Unauthorized(format!(
                        "API {} needs an API key: send it in x-api-key or Authorization: Bearer",
                        mount.api
                    ))
                })?;
            match auth.key(presented, wall_ms()) {
                Ok((id, tenant)) => Ok(Some(ApiCaller {
                    tenant: tenant.clone(),
                    key: Some(id),
                })),
                Err(AuthError::Expired) => Err(ProxyError::Unauthorized(
                    "the API key has expired; ask for a new one".into(),
                )),
                Err(_) => Err(ProxyError::Unauthorized(
                    "the API key is not known or was revoked".into(),
                )),
            }
        }
        MountAuth::Mtls => {
            let cert = peer.client_cert.as_ref().ok_or_else(|| {
                ProxyError::Unauthorized(format!(
                    "API {} needs a client certificate registered as an API key: connect over \
                     HTTPS to a host that asks for client certificates, and present it",
                    mount.api
                ))
            })?;
            match auth.certificate(&cert.fingerprint, wall_ms()) {
                Ok((id, tenant)) => Ok(Some(ApiCaller {
                    tenant: tenant.clone(),
                    key: Some(id),
                })),
                Err(AuthError::Expired) => Err(ProxyError::Unauthorized(
                    "the client certificate's key has expired; register a new certificate".into(),
                )),
                Err(_) => Err(ProxyError::Unauthorized(
                    "the client certificate is not registered as an API key (or was revoked)"
                        .into(),
                )),
            }
        }
        MountAuth::Jwt(validator) => {
            let token = bearer().ok_or_else(|| {
                ProxyError::Unauthorized(format!(
                    "API {} needs a JWT: send it in Authorization: Bearer",
                    mount.api
                ))
            })?;
            validator.verify(token).map_err(|e| match e {
                crate::auth::jwt::JwtRefusal::Invalid(m) => ProxyError::Unauthorized(m),
                crate::auth::jwt::JwtRefusal::OtherTenant(m) => ProxyError::Forbidden(m),
            })?;
            Ok(Some(ApiCaller {
                tenant: mount.owner.clone(),
                key: None,
            }))
        }
    }
}

/// Spends one request of every quota that counts the route, from this node's leases: no
/// call leaves the node. A request that finds no token while the owner still had budget
/// waits for the next exchange (two rounds at most), then is admitted or refused. Says
/// whether the request waited.
async fn quota(
    quotas: &Quotas,
    routing: &Routing,
    route: &Route,
    api: Option<&ApiRequest<'_>>,
    peer: &Peer,
) -> Result<bool, ProxyError> {
    let mut waited = false;
    for &i in &route.quotas {
        let def = &routing.quotas[usize::from(i)];
        if def.llm_only() {
            // Counted by the LLM gateway, which knows the model and the tokens.
            continue;
        }
        // Callers without a key or tenant are counted by their IP, like Kong's fallback.
        let ip = || peer.ip.to_str().unwrap_or("-");
        let by_version;
        let value: &str = match def.scope {
            QuotaScope::Key => api.and_then(|a| a.key.map(|k| &**k)).unwrap_or_else(ip),
            QuotaScope::Tenant => api.and_then(|a| a.tenant.as_deref()).unwrap_or_else(ip),
            QuotaScope::Route => route.api.as_deref().unwrap_or(&route.name),
            QuotaScope::ApiVersion => match (&route.api, api) {
                (Some(name), Some(a)) => {
                    by_version = format!("{name}@{}", a.version.to_str().unwrap_or(""));
                    &by_version
                }
                _ => &route.name,
            },
            // Skipped above: counted by the LLM gateway.
            QuotaScope::Model => continue,
        };
        let mut admit = quotas.admit(def, value, wall_ms(), true);
        if admit == Admit::Wait {
            waited = true;
            def.waited.increment(1);
            quotas.wait_rounds(2, QUOTA_WAIT).await;
            admit = quotas.admit(def, value, wall_ms(), false);
        }
        if admit == Admit::Yes {
            def.admitted.increment(1);
        } else {
            def.refused.increment(1);
            return Err(ProxyError::QuotaExceeded {
                quota: def.name.to_string(),
                limit: def.limit,
                window_s: def.window_s(),
                retry_after_s: def.retry_after_s(wall_ms()),
            });
        }
    }
    Ok(waited)
}

/// What an LLM request's spending is limited by: its route's token and model quotas, its
/// tenant's prices and hard-capped budget.
fn llm_spending(
    snapshot: &Snapshot,
    route: &Route,
    api: Option<&ApiRequest<'_>>,
    peer: &Peer,
) -> crate::llm::limits::Spending {
    let routing = &*snapshot.routing;
    let tenant = api.and_then(|a| a.tenant.clone());
    let billing = &snapshot.billing;
    let key = api.and_then(|a| a.key.cloned());
    // The tenant's budget, and its key's if it has one.
    let budgets = match tenant.as_deref() {
        None => Vec::new(),
        Some(t) => [
            Some(Arc::<str>::from(t)),
            key.as_deref()
                .map(|k| Arc::from(crate::state::billing::subject(t, k))),
        ]
        .into_iter()
        .flatten()
        .filter_map(|s| billing.budgets.get(&*s).map(|d| (s, d.clone())))
        .collect(),
    };
    let quotas: Vec<_> = route
        .quotas
        .iter()
        .map(|&i| &routing.quotas[usize::from(i)])
        .filter(|d| d.llm_only())
        .cloned()
        .collect();
    crate::llm::limits::Spending {
        price: tenant
            .as_deref()
            .and_then(|t| billing.prices.get(t).cloned()),
        budgets,
        key,
        api: route.api.clone(),
        // Only quotas read these: made only for them.
        api_version: match (&route.api, api) {
            (Some(name), Some(a)) if !quotas.is_empty() => {
                Some(format!("{name}@{}", a.version.to_str().unwrap_or("")))
            }
            _ => None,
        },
        ip: if quotas.is_empty() {
            String::new()
        } else {
            peer.ip.to_str().unwrap_or("-").to_string()
        },
        quotas,
        tenant,
    }
}

/// A tenant, or an API key, over its budget's hard cap this month is refused (402).
fn budget(
    capped: &std::collections::BTreeMap<String, u64>,
    tenant: &Arc<str>,
    key: Option<&Arc<str>>,
) -> Result<(), ProxyError> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let month = crate::state::billing::month_of_ms(now);
    // A cap holds for the month it was reached in.
    if capped.get(&**tenant) == Some(&month) {
        return Err(ProxyError::BudgetExceeded {
            tenant: tenant.to_string(),
        });
    }
    if let Some(k) = key
        && capped.get(&crate::state::billing::subject(tenant, k)) == Some(&month)
    {
        return Err(ProxyError::BudgetExceeded {
            tenant: format!("{tenant} (API key {k})"),
        });
    }
    Ok(())
}

/// The longest a request waits for its node's lease to be topped up.
const QUOTA_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The upstream's cluster-wide circuit, as committed (a local read): closed passes; open
/// answers 503 (or the configured fallback) with `Retry-After`; half-open lets through only
/// requests that take a probe permit the owner granted this node. Returns whether this
/// request is a probe. Per-endpoint protection works below it: outlier ejection and
/// health checks keep failing endpoints out of `forward`'s choices.
fn circuit(
    snapshot: &Snapshot,
    route: &Route,
    seen: &mut &'static str,
) -> Result<bool, ProxyError> {
    if snapshot.circuits.is_empty() {
        if route.cluster.circuit.is_some() {
            *seen = "closed";
        }
        return Ok(false);
    }
    let cluster = &route.cluster;
    let state = snapshot.circuits.get(&*cluster.name);
    let now = wall_ms();
    let open = |retry_after_ms: Option<u64>| ProxyError::CircuitOpen {
        upstream: cluster.name.to_string(),
        reason: state.map(|s| s.reason.clone()).unwrap_or_default(),
        retry_after_s: retry_after_ms.map(|ms| ms.div_ceil(1000).max(1)),
        fallback: cluster.circuit.as_ref().and_then(|c| c.fallback.clone()),
    };
    let phase = phase(state, now);
    *seen = match phase {
        Phase::Closed if cluster.circuit.is_none() && state.is_none() => "none",
        Phase::Closed => "closed",
        Phase::Open { .. } => "open",
        Phase::HalfOpen => "half_open",
    };
    match phase {
        Phase::Closed => Ok(false),
        // Held open by an operator (`until_ms: None`): no time to promise.
        Phase::Open { until_ms } => Err(open(until_ms.map(|u| u.saturating_sub(now)))),
        Phase::HalfOpen => match (&cluster.circuit, state) {
            (Some(breaker), Some(s)) => {
                if breaker.take_permit(s.since_index, now) {
                    Ok(true)
                } else {
                    Err(open(Some(1000)))
                }
            }
            // The spec no longer sets a breaker for it: nothing decides, so it is closed.
            _ => Ok(false),
        },
    }
}

/// A gRPC request (`content-type: application/grpc`, `application/grpc+proto`, ...).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Splices the client's and the upstream's upgraded connections together.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _slot: OpenConnection,
) {
    let (client, upstream) = match futures::future::try_join(client, upstream).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!("upgraded connection ended: {e}");
    }
}

/// The checks a request head passes before it is routed (431 over `max_header_bytes`,
/// 400 for dot segments and for a Host that is missing, repeated or not a host), and the
/// host it is routed on. Pure, so the fuzz target `request_head` drives it directly.
pub fn check_head<'a>(
    uri: &'a http::Uri,
    headers: &'a http::HeaderMap,
    version: Version,
    max_header_bytes: usize,
) -> Result<&'a str, ProxyError> {
    check_head_size(uri, headers, max_header_bytes)?;
    check_path(uri.path())?;
    request_host(uri, headers, version)
}

fn check_head_size(
    uri: &http::Uri,
    headers: &http::HeaderMap,
    limit: usize,
) -> Result<(), ProxyError> {
    let mut size = uri.path_and_query().map_or(0, |p| p.as_str().len());
    for (name, value) in headers {
        size += name.as_str().len() + value.len() + 4;
    }
    if size > limit {
        return Err(ProxyError::HeadersTooLarge { size, limit });
    }
    Ok(())
}

/// Refuses `.` and `..` segments (also written `%2e`): routes match the path as sent, and
/// an upstream that resolved `/public/../admin` would be reached on a path no route allowed.
fn check_path(path: &str) -> Result<(), ProxyError> {
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return Ok(());
    }
    let dot_segment = path.split('/').any(|seg| {
        let lowered = seg.to_ascii_lowercase().replace("%2e", ".");
        lowered == "." || lowered == ".."
    });
    if dot_segment {
        return Err(ProxyError::BadRequest(
            "the path has `.` or `..` segments; send it normalised".into(),
        ));
    }
    Ok(())
}

fn declared_length(req: &Request<Incoming>) -> Result<Option<u64>, ProxyError> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ProxyError::BadRequest("Content-Length is not a number".into())),
    }
}

/// The host the client asked for, without port: `:authority` (HTTP/2, absolute URIs) or
/// the `Host` header.
fn request_host<'a>(
    uri: &'a http::Uri,
    headers: &'a http::HeaderMap,
    version: Version,
) -> Result<&'a str, ProxyError> {
    // Two Host headers: routed by one, read by an upstream as the other. Refused
    // (RFC 9112 §3.2: a server responds 400 to more than one Host field).
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(ProxyError::BadRequest(
            "the request has more than one Host header; send exactly one".into(),
        ));
    }
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => match headers.get(header::HOST) {
            Some(h) => h
                .to_str()
                .map_err(|_| ProxyError::BadRequest("the Host header is not ASCII".into()))?,
            None if version == Version::HTTP_11 => {
                return Err(ProxyError::BadRequest(
                    "HTTP/1.1 requests need a Host header".into(),
                ));
            }
            None => "",
        },
    };
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        let end = rest
            .find(']')
            .ok_or_else(|| ProxyError::BadRequest(format!("invalid Host {raw:?}")))?;
        &raw[..end + 2]
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return Err(ProxyError::BadRequest(format!("invalid Host {raw:?}"))),
            None => raw,
        }
    };
    let valid = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':'));
    if !valid {
        return Err(ProxyError::BadRequest(format!(
            "invalid Host {raw:?}: use a host name or address, optionally with :port"
        )));
    }
    Ok(host)
}

/// `below`: for an API, where the path below its base path and version prefix starts in
/// the request's path; that part replaces the whole path (`/` when it is empty).
fn transform_request(
    parts: http::request::Parts,
    route: &Route,
    matched: Matched,
    below: Option<usize>,
    peer: &Peer,
    upgrade: bool,
) -> Result<UpstreamHead, ProxyError> {
    let http::request::Parts {
        method,
        uri,
        version,
        mut headers,
        ..
    } = parts;
    if version == Version::HTTP_2 {
        merge_cookies(&mut headers);
    }
    let path = match below.map(|at| &uri.path()[at..]) {
        Some("") => "/",
        Some(p) => p,
        None => uri.path(),
    };
    let rewritten = match &route.rewrite {
        Some(Rewrite::ReplacePrefix(new)) => {
            // `/api` -> `/v2`: `/api/x` becomes `/v2/x`, `/api` becomes `/v2`, and with an
            // empty replacement (strip_prefix) `/api` becomes `/`.
            let rest = &path[matched.prefix_len.min(path.len())..];
            let base = new.trim_end_matches('/');
            let mut p = String::with_capacity(base.len() + rest.len() + 1);
            p.push_str(base);
            if rest.is_empty() {
                if p.is_empty() {
                    p.push('/');
                }
            } else {
                if !rest.starts_with('/') {
                    p.push('/');
                }
                p.push_str(rest);
            }
            Some(p)
        }
        None => below.map(|_| path.to_string()),
    };
    // The upstream gets origin-form (`/path?query`), whatever form the client used.
    let uri = if rewritten.is_none() && uri.authority().is_none() && uri.scheme().is_none() {
        uri
    } else {
        let path = rewritten.as_deref().unwrap_or(path);
        let pq = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        // The authority of an absolute-form target (or HTTP/2's :authority) is the host
        // that was routed on; it replaces any Host header (RFC 9112 §3.2.2).
        if let Some(authority) = uri.authority() {
            let v = HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::BadRequest("invalid :authority".into()))?;
            headers.insert(header::HOST, v);
        }
        Uri::try_from(pq)
            .map_err(|e| ProxyError::BadRequest(format!("cannot rewrite the path: {e}")))?
    };
    let host = headers.get(header::HOST).cloned();
    headers::strip_hop_by_hop(&mut headers, upgrade);
    headers::strip_ours(&mut headers);
    headers::add_forwarded(&mut headers, &peer.ip, host, peer.tls);
    route.request_headers.apply(&mut headers);
    Ok(UpstreamHead {
        method,
        uri,
        headers,
    })
}

/// HTTP/2 may split `cookie` into several fields; an HTTP/1.1 upstream must get one,
/// joined with `; ` (RFC 9113 §8.2.3).
fn merge_cookies(headers: &mut http::HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// The meter stage: runs when the response body is done (or dropped), records the route's
/// metrics and writes the access-log line. Carries what the earlier stages learned.
pub struct Tail {
    worker: Rc<Worker>,
    snapshot: LocalSnapshot,
    received: Instant,
    peer: SocketAddr,
    version: Version,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    pub route: Option<u32>,
    pub status: u16,
    pub error: Option<&'static str>,
    pub attempts: AttemptLog,
    pub request_stats: Rc<BodyStats>,
    response_bytes: u64,
    upstream_failed: bool,
    guards: Option<Guards>,
    /// The API the request reached, and who called it.
    api: Option<ApiUse>,
    /// `tollgate.quota.decision`: none, admitted, admitted_after_wait or refused.
    quota: &'static str,
    /// `tollgate.circuit.state` of the upstream: none, closed, open or half_open.
    circuit: &'static str,
    /// The request's trace, when it is sampled.
    trace: Option<Box<RequestTrace>>,
    /// An LLM request's model, provider and usage.
    pub llm: Option<Rc<RefCell<crate::llm::serve::Record>>>,
    /// The request reached an LLM API: its errors are answered in this dialect.
    pub llm_dialect: Option<crate::llm::Dialect>,
    /// The request's id (`x-request-id`), when the call log is on.
    pub request_id: Option<HeaderValue>,
    /// The caller's trace, when the request is not traced here but carried one.
    carried_trace: Option<u128>,
    /// What the call log keeps beyond the record, when the version asks for it.
    capture: Option<Box<Captured>>,
}

/// Headers and a response body kept for the call log (`call_log:` in the version).
struct Captured {
    spec: Arc<crate::calls::capture::Capture>,
    request_headers: Vec<tollgate_proto::node::v1::CapturedHeader>,
    response_headers: Vec<tollgate_proto::node::v1::CapturedHeader>,
    response_body: Vec<u8>,
}

/// The API a request reached: the mount (an index into the snapshot's mounts), the
/// version (an index into the mount's versions) once chosen, and the caller once known.
#[derive(Default)]
struct ApiUse {
    mount: u32,
    version: Option<u32>,
    tenant: Option<Arc<str>>,
    key: Option<Arc<str>>,
}

impl Tail {
    fn new(
        worker: Rc<Worker>,
        snapshot: LocalSnapshot,
        req: &Request<Incoming>,
        peer: SocketAddr,
        received: Instant,
        trace: Option<Box<RequestTrace>>,
    ) -> Tail {
        let calls = worker.calls.is_some();
        let logging = worker.access_log.enabled() || trace.is_some() || calls;
        let carried_trace = match (&trace, calls) {
            (None, true) => req
                .headers()
                .get("traceparent")
                .and_then(|v| crate::telemetry::traces::parse_traceparent(v.as_bytes()))
                .map(|cx| u128::from_be_bytes(cx.trace_id().to_bytes())),
            _ => None,
        };
        let request_id = calls.then(|| {
            let id = crate::calls::hex_id(crate::calls::new_request_id());
            HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
                .expect("hex digits are a valid header value")
        });
        Tail {
            worker,
            snapshot,
            received,
            peer,
            version: req.version(),
            method: req.method().clone(),
            uri: if logging {
                req.uri().clone()
            } else {
                Uri::default()
            },
            host: if logging {
                req.headers().get(header::HOST).cloned()
            } else {
                None
            },
            route: None,
            status: 0,
            error: None,
            attempts: AttemptLog::default(),
            request_stats: Rc::new(BodyStats::default()),
            response_bytes: 0,
            upstream_failed: false,
            guards: None,
            api: None,
            quota: "none",
            circuit: "none",
            trace,
            llm: None,
            llm_dialect: None,
            request_id,
            carried_trace,
            capture: None,
        }
    }

    /// The request's trace, when it is sampled.
    pub fn trace_mut(&mut self) -> Option<&mut RequestTrace> {
        self.trace.as_deref_mut()
    }

    pub fn add_response_bytes(&mut self, n: u64) {
        self.response_bytes += n;
    }

    /// Keeps the response body's first bytes when the version's call log asks for them.
    pub fn capture_response(&mut self, data: &[u8]) {
        if let Some(c) = &mut self.capture
            && c.spec.bodies
        {
            let n = c
                .spec
                .max_body
                .saturating_sub(c.response_body.len())
                .min(data.len());
            c.response_body.extend_from_slice(&data[..n]);
        }
    }

    /// Starts keeping what the version's call log asks for (its headers, its bodies).
    fn start_capture(&mut self, spec: &Arc<crate::calls::capture::Capture>, h: &http::HeaderMap) {
        if spec.bodies {
            self.request_stats.capture_cap.set(spec.max_body);
        }
        self.capture = Some(Box::new(Captured {
            request_headers: spec.headers(h),
            spec: spec.clone(),
            response_headers: Vec::new(),
            response_body: Vec::new(),
        }));
    }

    pub fn upstream_body_failed(&mut self) {
        self.upstream_failed = true;
    }

    /// The request's host: its `Host` header, else the authority of its URI.
    fn host_text(&self) -> &str {
        self.host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| self.uri.authority().map(|a| a.as_str()))
            .unwrap_or("")
    }

    /// The SERVER span's attributes: the HTTP semantic conventions and `tollgate.*`.
    fn server_span_attributes(&self, attrs: &mut Vec<KeyValue>, route: Option<&Route>) {
        let host = self.host_text();
        let host = host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        attrs.extend([
            KeyValue::new("http.request.method", self.method.as_str().to_string()),
            KeyValue::new("url.path", self.uri.path().to_string()),
            KeyValue::new("url.scheme", "http"),
            KeyValue::new("server.address", host.to_string()),
            KeyValue::new("network.peer.address", self.peer.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(self.peer.port())),
            KeyValue::new(
                "network.protocol.version",
                match self.version {
                    Version::HTTP_2 => "2",
                    Version::HTTP_10 => "1.0",
                    _ => "1.1",
                },
            ),
            KeyValue::new("http.response.status_code", i64::from(self.status)),
            KeyValue::new(
                "http.request.body.size",
                self.request_stats.bytes.get() as i64,
            ),
            KeyValue::new("http.response.body.size", self.response_bytes as i64),
            KeyValue::new("tollgate.quota.decision", self.quota),
            KeyValue::new("tollgate.circuit.state", self.circuit),
        ]);
        let error = self
            .error
            .or(self.upstream_failed.then_some("upstream_body_failed"));
        match error {
            Some(e) => attrs.push(KeyValue::new("error.type", e)),
            None if self.status >= 500 => {
                attrs.push(KeyValue::new("error.type", self.status.to_string()))
            }
            None => {}
        }
        if let Some(r) = route {
            attrs.push(KeyValue::new("http.route", r.http_route.to_string()));
            attrs.push(KeyValue::new("tollgate.route", r.name.to_string()));
        }
        if let Some(api) = &self.api {
            let mount = &self.snapshot.routing.mounts[api.mount as usize];
            attrs.push(KeyValue::new("tollgate.api", mount.api.to_string()));
            if let Some(v) = api.version.and_then(|v| mount.versions.get(v as usize)) {
                attrs.push(KeyValue::new("tollgate.api_version", v.version.to_string()));
            }
            if let Some(t) = &api.tenant {
                attrs.push(KeyValue::new("tollgate.tenant", t.to_string()));
            }
            if let Some(k) = &api.key {
                attrs.push(KeyValue::new("tollgate.key", k.to_string()));
            }
        }
    }
}

/// The CLIENT span's attributes, once the upstream answered (`Ok(status)`) or failed
/// (`Err(error code)`).
fn client_span_attributes(
    client: &mut ClientSpan,
    upstream: &str,
    attempts: &AttemptLog,
    outcome: Result<u16, &'static str>,
) {
    if let Some(ep) = attempts.endpoint {
        client.attributes.extend([
            KeyValue::new("server.address", ep.ip().to_string()),
            KeyValue::new("server.port", i64::from(ep.port())),
            KeyValue::new("network.peer.address", ep.ip().to_string()),
        ]);
    }
    client
        .attributes
        .push(KeyValue::new("tollgate.upstream", upstream.to_string()));
    if attempts.attempts > 1 {
        client.attributes.push(KeyValue::new(
            "http.request.resend_count",
            i64::from(attempts.attempts - 1),
        ));
    }
    match outcome {
        Ok(status) => {
            client.attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 400 {
                client
                    .attributes
                    .push(KeyValue::new("error.type", status.to_string()));
                client.error = true;
            }
        }
        Err(code) => {
            client.attributes.push(KeyValue::new("error.type", code));
            client.error = true;
        }
    }
}

impl Tail {
    /// Counts the request for usage.
    fn meter(
        &self,
        meter: &std::sync::Mutex<crate::metering::Shard>,
        route: Option<&crate::state::snapshot::Route>,
        elapsed: std::time::Duration,
        llm: Option<&crate::metering::LlmSample>,
        cost_nanos: Option<u64>,
    ) {
        let minute = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 60);
        let (api, version, tenant, key) = match &self.api {
            Some(u) => {
                let mount = &self.snapshot.routing.mounts[u.mount as usize];
                let version = u.version.map(|v| &mount.versions[v as usize].name);
                (Some(&mount.api), version, u.tenant.as_ref(), u.key.as_ref())
            }
            None => (route.map(|r| &r.usage_api), None, None, None),
        };
        let sample = crate::metering::Sample {
            minute,
            tenant,
            api,
            version,
            key,
            status: self.status,
            // A cache hit reached no upstream but was answered: priced as cached.
            refused: self.attempts.attempts == 0 && !llm.is_some_and(|l| l.cached),
            request_bytes: self.request_stats.bytes.get(),
            response_bytes: self.response_bytes,
            upstream_us: self
                .attempts
                .upstream_time
                .map_or(0, |d| d.as_micros() as u64),
            latency_us: elapsed.as_micros() as u64,
            error: self
                .error
                .or(self.upstream_failed.then_some("upstream_body_failed")),
            cost_nanos,
            llm,
        };
        if let Ok(mut shard) = meter.lock() {
            shard.record(&sample);
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if self.status == 0 {
            // The client went away before it got an answer (nginx's 499).
            self.status = 499;
            self.error = Some("client_closed");
        }
        let elapsed = self.received.elapsed();
        let capture = self.capture.take();
        let route = self
            .route
            .map(|r| &self.snapshot.routing.routes[r as usize]);
        if self.upstream_failed
            && let Some(r) = route
        {
            crate::telemetry::metrics::upstream_error(&r.cluster.name, "body");
        }
        match route {
            Some(r) => r.metrics.record(self.status, elapsed),
            None => self.worker.shared.unmatched.record(self.status, elapsed),
        }
        let record = self.llm.take();
        let llm = record.as_ref().and_then(|r| {
            let mut r = r.borrow_mut();
            r.settle();
            r.sample()
        });
        let cost_nanos = record
            .as_ref()
            .and_then(|r| {
                r.borrow()
                    .cost()
                    .map(|(attos, _)| (attos / 1_000_000_000) as i64)
            })
            .unwrap_or(0);
        // A running rollout's judge counts its two versions' answers.
        if !self.snapshot.rollout_counters.is_empty()
            && let Some(u) = &self.api
            && let Some(v) = u.version
        {
            let mount = &self.snapshot.routing.mounts[u.mount as usize];
            if let Some(c) = self.snapshot.rollout_counters.get(&mount.api)
                && let Some(counter) = c.of(&mount.versions[v as usize].name)
            {
                counter.record(
                    self.status,
                    elapsed.as_micros() as u64,
                    llm.as_ref().and_then(|l| l.ttft_us),
                    llm.as_ref().map(|_| cost_nanos.max(0) as u64),
                );
            }
        }
        if let Some(s) = &llm {
            crate::llm::serve::record_metrics(s);
        }
        if let Some(meter) = &self.worker.meter {
            let priced = record.as_ref().is_some_and(|r| r.borrow().cost().is_some());
            self.meter(
                meter,
                route,
                elapsed,
                llm.as_ref(),
                priced.then_some(cost_nanos.max(0) as u64),
            );
        }
        // After the usage row: a budget's spend is never followed into a batch before
        // the row it is part of.
        if let Some(r) = record {
            r.borrow_mut()
                .finish_holds(self.worker.shared.meter.as_deref());
        }
        if let Some(trace) = self.trace.take()
            && let Some(tracing) = &self.worker.shared.tracing
        {
            let mut trace = *trace;
            if let Some(l) = &llm
                && l.calls.last().is_some_and(|c| !c.2)
                && let Some(client) = trace.client()
            {
                crate::llm::serve::span_answer(client, l);
            }
            self.server_span_attributes(&mut trace.attributes, route);
            tracing.finish_request(trace, SystemTime::now(), self.status >= 500);
        }
        if let Some(calls) = &self.worker.calls {
            self.record_call(calls, route, elapsed, llm.as_ref(), cost_nanos, capture);
        }
        let log = &self.worker.access_log;
        if !log.enabled() {
            return;
        }
        let host = self.host_text();
        log.write(&Entry {
            time: SystemTime::now(),
            client: self.peer,
            protocol: match self.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            method: self.method.as_str(),
            host,
            path: self.uri.path(),
            route: route.map(|r| &*r.name),
            upstream: match (&llm, route) {
                (Some(l), _) => l.upstream.as_deref(),
                (None, Some(r)) if r.llm.is_none() => Some(&*r.cluster.name),
                _ => None,
            },
            endpoint: self.attempts.endpoint,
            status: self.status,
            error: self
                .error
                .or(self.upstream_failed.then_some("upstream_body_failed")),
            attempts: self.attempts.attempts,
            request_bytes: self.request_stats.bytes.get(),
            response_bytes: self.response_bytes,
            duration_ms: millis(elapsed),
            upstream_ms: self.attempts.upstream_time.map(millis),
            llm: llm
                .as_ref()
                .map(|l| crate::telemetry::access_log::LlmFields {
                    model: &l.model,
                    provider: &l.provider,
                    input_tokens: l.usage.input,
                    output_tokens: l.usage.output,
                    tokens_estimated: l.estimated,
                    stream_incomplete: l.incomplete,
                    response_id: &l.response_id,
                }),
        });
    }
}

impl Tail {
    /// Records the request in the call log.
    fn record_call(
        &self,
        calls: &crate::calls::CallBuffer,
        route: Option<&Route>,
        elapsed: std::time::Duration,
        llm: Option<&crate::metering::LlmSample>,
        cost_nanos: i64,
        capture: Option<Box<Captured>>,
    ) {
        let (api, version, tenant, key) = match &self.api {
            Some(u) => {
                let mount = &self.snapshot.routing.mounts[u.mount as usize];
                let version = u.version.map(|v| &*mount.versions[v as usize].name);
                (&*mount.api, version, u.tenant.as_deref(), u.key.as_deref())
            }
            None => ("", None, None, None),
        };
        let trace_id = self
            .trace
            .as_ref()
            .map(|t| u128::from_be_bytes(t.trace_id.to_bytes()))
            .or(self.carried_trace)
            .unwrap_or(0);
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(crate::calls::store::parse_id)
            .unwrap_or(0);
        let (mut request_body, mut response_body) = ((Vec::new(), false), (Vec::new(), false));
        if let Some(c) = capture.as_ref().filter(|c| c.spec.bodies) {
            let kept = std::mem::take(&mut *self.request_stats.captured.borrow_mut());
            request_body = c.spec.body(&kept, self.request_stats.bytes.get());
            response_body = c.spec.body(&c.response_body, self.response_bytes);
        }
        let (request_headers, response_headers) =
            capture.as_ref().map_or((&[][..], &[][..]), |c| {
                (&c.request_headers[..], &c.response_headers[..])
            });
        calls.push(&crate::calls::Call {
            time_us: crate::calls::now_us(),
            node_id: calls.node_id(),
            request_id,
            trace_id,
            tenant: tenant.unwrap_or(""),
            api,
            version: version.unwrap_or(""),
            key_id: key.unwrap_or(""),
            route: route.map_or("", |r| &r.name),
            method: self.method.as_str(),
            host: self.host_text(),
            path: self.uri.path(),
            protocol: match self.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            status: u32::from(self.status),
            error: self
                .error
                .or(self.upstream_failed.then_some("upstream_body_failed"))
                .unwrap_or(""),
            duration_us: elapsed.as_micros() as u64,
            upstream_us: self.attempts.upstream_time.map(|d| d.as_micros() as u64),
            request_bytes: self.request_stats.bytes.get(),
            response_bytes: self.response_bytes,
            client: Some(self.peer),
            upstream: match (llm, route) {
                (Some(l), _) => l.upstream.as_deref().unwrap_or(""),
                (None, Some(r)) if r.llm.is_none() => &r.cluster.name,
                _ => "",
            },
            attempts: self.attempts.attempts,
            model: llm.map_or("", |l| &l.model),
            provider: llm.map_or("", |l| &l.provider),
            input_tokens: llm.map_or(0, |l| l.usage.input),
            output_tokens: llm.map_or(0, |l| l.usage.output),
            cost_nanos,
            request_headers,
            response_headers,
            request_body: &request_body.0,
            response_body: &response_body.0,
            request_body_truncated: request_body.1,
            response_body_truncated: response_body.1,
        });
    }
}

/// Milliseconds with microsecond precision, as the access log prints them: `0.251`, not
/// the float noise of `as_secs_f64() * 1000.0` (`0.25088699999999997`). Dividing a whole
/// number of microseconds by 1000 gives the double nearest that decimal, which prints as it.
fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_log_milliseconds_print_without_float_noise() {
        let d = std::time::Duration::from_nanos(250_887_123);
        assert_eq!(serde_json::json!(super::millis(d)).to_string(), "250.887");
        let d = std::time::Duration::from_nanos(250_887);
        assert_eq!(serde_json::json!(super::millis(d)).to_string(), "0.25");
    }
}
