//! The immutable view of the cluster state that the data plane reads: compiled routes,
//! upstream clusters and their policies, plus the generation they came from.
//!
//! A snapshot is built off the request path from the Raft state machine's state (the spec,
//! the APIs' published versions, the keys) and published through an `ArcSwap`; a request loads it once and reads
//! nothing else. Building one never fails halfway: either the whole spec compiles or the
//! errors are returned and the running snapshot stays.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method, header};

use crate::actor::quotas::QuotaDef;
use crate::auth::AuthTable;
use crate::auth::jwt::JwtValidator;
use crate::routing::matcher::{HeaderCondition, HeaderTest, Matcher, PathMatch, RouteMatch};
use crate::routing::upstream::{BuildCtx, Cluster, EndpointRegistry};
use crate::state::lifecycle::{Api, ApiVersion, AuthMode, Stage};
use crate::state::spec::{HeaderOpsSpec, PathKind, Spec, SpecErrors};
use crate::telemetry::metrics::RouteMetrics;

/// What the data plane serves. Cheap to share, never mutated.
#[derive(Debug)]
pub struct Snapshot {
    /// 0 for the empty snapshot a node starts with, then the cluster state's generation.
    pub generation: u64,
    /// Routes, API mounts and upstream clusters: rebuilt only when the spec or the APIs
    /// change, shared otherwise.
    pub routing: Arc<Routing>,
    /// API keys and subscriptions.
    pub auth: Arc<AuthTable>,
    /// Circuit breakers as committed, by upstream cluster name.
    pub circuits: Arc<crate::state::circuit::Circuits>,
    /// Tenants over their budget's hard cap, with the month it holds for.
    pub capped: Arc<std::collections::BTreeMap<String, u64>>,
    /// Tenants' prices and hard-capped budgets.
    pub billing: Arc<crate::state::billing::BillingView>,
    /// Each API's current or last canary rollout, and the running ones' counters.
    pub rollouts: Arc<std::collections::BTreeMap<String, tollgate_proto::state::v1::RolloutState>>,
    pub rollout_counters: Arc<crate::rollout::counters::Counters>,
}

/// The compiled route table.
#[derive(Debug)]
pub struct Routing {
    /// The spec's routes and one prefix entry per API mount (ids with [`MOUNT_BIT`]).
    pub matcher: Matcher,
    /// The spec's routes, then every mounted version's routes.
    pub routes: Vec<Route>,
    pub mounts: Vec<Mount>,
    pub clusters: Vec<Arc<Cluster>>,
    /// The spec's quotas; routes name the ones that count them by index.
    pub quotas: Vec<Arc<QuotaDef>>,
    /// LLM deployments' provider limits (`llm-tpm`, `llm-rpm`), which no route counts.
    pub provider_quotas: Vec<Arc<QuotaDef>>,
    /// Every endpoint address of every cluster: pooled connections to any other drain.
    pub addrs: std::collections::HashSet<std::net::SocketAddr>,
    /// The spec's per-host rules (HTTPS redirect, HSTS).
    pub hosts: crate::proxy::tls::HostRules,
    /// The spec's certificates (compiled with their keys by [`crate::proxy::tls::EdgeTls`]).
    pub certificates: std::collections::BTreeMap<String, crate::state::tls::CertificateSpec>,
    /// The spec's `hosts` as written (their client-certificate rules are compiled into
    /// TLS configs by [`crate::proxy::tls::EdgeTls`]).
    pub host_specs: std::collections::BTreeMap<String, crate::state::tls::HostSpec>,
}

/// Set in a matcher id that names a [`Mount`] rather than a route.
pub const MOUNT_BIT: u32 = 1 << 31;

/// An API, mounted at its hosts and base path.
#[derive(Debug)]
pub struct Mount {
    pub api: Arc<str>,
    /// The owning tenant.
    pub owner: Arc<str>,
    pub auth: MountAuth,
    pub sticky: bool,
    /// `/orders`, or empty for the root.
    pub base_path: String,
    /// Published, deprecated and retired versions, oldest first.
    pub versions: Vec<MountedVersion>,
    /// Some version serves LLM endpoints: `/v1/...` is their path, not a version prefix,
    /// and errors are answered in the caller's dialect.
    pub llm: bool,
    /// The split: weight and index into `versions`.
    pub split: Vec<(u32, usize)>,
}

#[derive(Debug)]
pub enum MountAuth {
    Key,
    /// A client certificate registered as a key.
    Mtls,
    Jwt(Box<JwtValidator>),
    None,
    /// The API's auth settings could not be compiled here: every request answers 503.
    Broken,
}

/// One version of a mounted API.
#[derive(Debug)]
pub struct MountedVersion {
    pub version: semver::Version,
    /// `version` as a header value, for `x-tollgate-api-version`.
    pub label: HeaderValue,
    /// `version` as text, for usage rows.
    pub name: Arc<str>,
    pub stage: Stage,
    /// The version's own routes (ids index [`Routing::routes`]), matched against the path
    /// below the base path and version prefix. Empty for a retired version.
    pub matcher: Matcher,
    /// `Deprecation`, `Sunset` and `Link` for a deprecated version.
    pub deprecation: Vec<(HeaderName, HeaderValue)>,
    /// False when its content could not be compiled on this node (a name that does not
    /// resolve here, say): it answers 503 and the rest of the cluster's state is served.
    pub available: bool,
    /// What the call log keeps of its calls beyond the record (`call_log:`).
    pub capture: Option<Arc<crate::calls::capture::Capture>>,
    /// Anomaly alert rules (`alerts:`).
    pub alerts: Option<Arc<crate::rollout::anomaly::AlertSpec>>,
}

impl Mount {
    /// The version for a request: the `/vN` prefix, else the `Api-Version` header, else the
    /// split among the versions the caller `may_call` (by `sticky_key` when the API is
    /// sticky). `Err` says why none fits.
    pub fn select(
        &self,
        path_major: Option<u64>,
        header: Option<&str>,
        sticky_key: Option<&str>,
        may_call: &dyn Fn(&semver::Version) -> bool,
    ) -> Result<&MountedVersion, Selection> {
        let newest = |pick: &dyn Fn(&semver::Version) -> bool| {
            // Prefer a version that takes traffic; a retired one answers 410.
            self.versions
                .iter()
                .filter(|v| pick(&v.version))
                .max_by(|a, b| {
                    (a.stage.takes_traffic(), &a.version)
                        .cmp(&(b.stage.takes_traffic(), &b.version))
                })
        };
        if let Some(major) = path_major {
            return newest(&|v| v.major == major).ok_or_else(|| {
                Selection::NotFound(format!(
                    "API {} has no version {major}; it has {}",
                    self.api,
                    self.majors()
                ))
            });
        }
        if let Some(h) = header {
            let text = h.trim().trim_start_matches('v');
            let req = semver::VersionReq::parse(&format!("={text}")).map_err(|_| {
                Selection::NotFound(format!(
                    "Api-Version {h:?} is not a version; send it like 2, 2.1 or 2.1.0"
                ))
            })?;
            return newest(&|v| req.matches(v)).ok_or_else(|| {
                Selection::NotFound(format!(
                    "API {} has no version matching Api-Version {h:?}; it has {}",
                    self.api,
                    self.majors()
                ))
            });
        }
        if self.split.is_empty() {
            return Err(Selection::NotFound(format!(
                "API {} has no published version taking traffic yet",
                self.api
            )));
        }
        // Weights are at most 1,000,000 each, so a split's sum fits in a u64.
        let allowed = || {
            self.split
                .iter()
                .filter(|(_, i)| may_call(&self.versions[*i].version))
        };
        let total: u64 = allowed().map(|(w, _)| u64::from(*w)).sum();
        if total == 0 {
            return Err(Selection::NotSubscribed);
        }
        let mut ticket = match sticky_key {
            Some(key) if self.sticky => crate::hash::fnv1a(key.as_bytes()) % total,
            _ => fastrand::u64(..total),
        };
        for (w, i) in allowed() {
            if ticket < u64::from(*w) {
                return Ok(&self.versions[*i]);
            }
            ticket -= u64::from(*w);
        }
        unreachable!("the ticket is below the total of the weights it walks")
    }

    fn majors(&self) -> String {
        let mut majors: Vec<String> = self
            .versions
            .iter()
            .map(|v| format!("v{}", v.version.major))
            .collect();
        majors.dedup();
        if majors.is_empty() {
            "none published".into()
        } else {
            majors.join(", ")
        }
    }
}

/// Why no version was selected.
#[derive(Debug)]
pub enum Selection {
    NotFound(String),
    /// The split has versions, but none the caller may call.
    NotSubscribed,
}

/// What a matched route does.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub cluster: Arc<Cluster>,
    pub rewrite: Option<Rewrite>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub metrics: RouteMetrics,
    /// The quotas that count this route's requests (indexes into [`Routing::quotas`]).
    pub quotas: Vec<u16>,
    /// The API the route belongs to, for a mounted version's route.
    pub api: Option<Arc<str>>,
    /// The route's path as its spec wrote it (`/users/{id}`, `/api/*` for a prefix): the
    /// `http.route` of its traces. A version's routes are below the API's base path.
    pub http_route: Arc<str>,
    /// What usage rows name for a request that reached this route outside an API:
    /// `route/<name>`.
    pub usage_api: Arc<str>,
    /// An LLM endpoint of a version's `models` (then `cluster` is only its first
    /// deployment's: each request picks its own).
    pub llm: Option<(Arc<crate::llm::LlmApi>, crate::llm::Endpoint)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Replace the matched prefix with this (empty: strip it).
    ReplacePrefix(String),
}

/// Header edits, in the order remove, set, add.
#[derive(Debug, Default)]
pub struct HeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    fn compile(spec: &HeaderOpsSpec) -> HeaderOps {
        let pair = |(k, v): (&String, &String)| {
            (
                HeaderName::from_bytes(k.as_bytes()).expect("checked by the spec"),
                HeaderValue::from_str(v).expect("checked by the spec"),
            )
        };
        HeaderOps {
            remove: spec
                .remove
                .iter()
                .map(|k| HeaderName::from_bytes(k.as_bytes()).expect("checked by the spec"))
                .collect(),
            set: spec.set.iter().map(pair).collect(),
            add: spec.add.iter().map(pair).collect(),
        }
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl Snapshot {
    /// The snapshot a node serves before any spec is loaded: every request gets 404.
    pub fn empty() -> Snapshot {
        Snapshot {
            generation: 0,
            routing: Arc::new(Routing {
                matcher: Matcher::default(),
                routes: Vec::new(),
                mounts: Vec::new(),
                clusters: Vec::new(),
                quotas: Vec::new(),
                provider_quotas: Vec::new(),
                addrs: Default::default(),
                hosts: Default::default(),
                certificates: Default::default(),
                host_specs: Default::default(),
            }),
            auth: Arc::new(AuthTable::default()),
            circuits: Arc::default(),
            rollouts: Arc::default(),
            rollout_counters: Arc::default(),
            capped: Arc::default(),
            billing: Arc::default(),
        }
    }
}

/// A published API version's routes, parsed from its compiled content.
pub struct VersionSpec<'a> {
    pub api: &'a Api,
    pub version: &'a ApiVersion,
    /// `None` for a retired version (it only answers 410) or one that did not compile.
    pub spec: Option<Spec>,
    /// False when its content did not compile on this node.
    pub available: bool,
}

/// Checks that a spec's routes can be placed in one table (templates that conflict are
/// refused), for a version's content before it is published.
pub fn check_routes(spec: &Spec) -> Result<(), SpecErrors> {
    let matches: Vec<RouteMatch> = spec
        .routes
        .iter()
        .enumerate()
        .map(|(i, (name, r))| route_match(i as u32, name, r))
        .collect();
    matcher_errors(Matcher::build(&matches).err())
}

/// A route's path for `http.route`: the template or exact path as written; a prefix as
/// `prefix/*`.
fn http_route(path: &crate::state::spec::PathSpec) -> String {
    match path.kind() {
        Some(PathKind::Exact(p) | PathKind::Template(p)) => p.to_string(),
        Some(PathKind::Prefix(p)) => format!("{}/*", p.trim_end_matches('/')),
        None => "/*".into(),
    }
}

#[derive(Default)]
struct Builder {
    matches: Vec<RouteMatch>,
    routes: Vec<Route>,
    clusters: Vec<Arc<Cluster>>,
    quotas: Vec<Arc<QuotaDef>>,
}

impl Builder {
    /// Adds a spec's upstreams and routes; names are prefixed with `prefix` (`orders@2.0.0/`
    /// for a version). Returns the routes' matches, ids indexing `self.routes`.
    fn add_spec(
        &mut self,
        spec: &Spec,
        prefix: &str,
        api: Option<&Arc<str>>,
        secret_prefix: &str,
        registry: &EndpointRegistry,
        ctx: &BuildCtx<'_>,
    ) -> Vec<RouteMatch> {
        let clusters: HashMap<&str, Arc<Cluster>> = spec
            .upstreams
            .iter()
            .map(|(name, up)| {
                let full = format!("{prefix}{name}");
                (
                    name.as_str(),
                    Arc::new(Cluster::build_with(&full, up, registry, ctx)),
                )
            })
            .collect();
        let mut matches = Vec::with_capacity(spec.routes.len());
        for (name, r) in &spec.routes {
            let id = self.routes.len() as u32;
            let full = format!("{prefix}{name}");
            matches.push(route_match(id, &full, r));
            let rewrite = r
                .rewrite
                .as_ref()
                .map(|rw| Rewrite::ReplacePrefix(rw.replace_prefix.clone().unwrap_or_default()));
            self.routes.push(Route {
                name: Arc::from(full.as_str()),
                cluster: clusters[r.upstream.as_str()].clone(),
                rewrite,
                request_headers: HeaderOps::compile(&r.request_headers),
                response_headers: HeaderOps::compile(&r.response_headers),
                metrics: RouteMetrics::new(&full),
                quotas: (0..self.quotas.len() as u16)
                    .filter(|i| {
                        let q = &self.quotas[usize::from(*i)];
                        match api {
                            None => q.covers(Some(name), None),
                            Some(a) => q.covers(None, Some(a)),
                        }
                    })
                    .collect(),
                api: api.cloned(),
                http_route: Arc::from(http_route(&r.matches.path).as_str()),
                usage_api: Arc::from(format!("route/{full}")),
                llm: None,
            });
        }
        let llm = crate::llm::compile(spec, prefix, secret_prefix, registry, ctx);
        if let Some(llm) = llm {
            // Each deployment's cluster is a cluster like any other: its circuit, its
            // endpoints' state, its pooled connections.
            self.clusters.extend(
                llm.models
                    .values()
                    .flat_map(|m| m.deployments.iter().map(|d| d.cluster.clone())),
            );
            let first = llm
                .models
                .values()
                .flat_map(|m| m.deployments.first())
                .next()
                .map(|d| d.cluster.clone());
            let prompts = llm
                .prompts
                .keys()
                .map(|name| (crate::llm::Endpoint::Prompt, format!("/{name}")));
            let fixed = crate::llm::Endpoint::SERVED
                .into_iter()
                .map(|e| (e, e.path().to_string()));
            for (endpoint, path) in fixed.chain(prompts) {
                let Some(cluster) = first.clone() else { break };
                let id = self.routes.len() as u32;
                let full = match endpoint {
                    crate::llm::Endpoint::Prompt => format!("{prefix}llm/prompt{path}"),
                    _ => format!("{prefix}llm/{}", endpoint.name()),
                };
                matches.push(RouteMatch {
                    id,
                    name: full.clone(),
                    hosts: Vec::new(),
                    path: PathMatch::Exact(path.clone()),
                    methods: vec![endpoint.method()],
                    headers: Vec::new(),
                    priority: 0,
                });
                self.routes.push(Route {
                    name: Arc::from(full.as_str()),
                    cluster,
                    rewrite: None,
                    request_headers: HeaderOps::default(),
                    response_headers: HeaderOps::default(),
                    metrics: RouteMetrics::new(&full),
                    quotas: (0..self.quotas.len() as u16)
                        .filter(|i| {
                            let q = &self.quotas[usize::from(*i)];
                            api.is_some_and(|a| q.covers(None, Some(a)))
                        })
                        .collect(),
                    api: api.cloned(),
                    http_route: Arc::from(path.as_str()),
                    usage_api: Arc::from(format!("route/{full}")),
                    llm: Some((llm.clone(), endpoint)),
                });
            }
        }
        self.clusters.extend(clusters.into_values());
        if prefix.is_empty() {
            self.matches.extend(matches.iter().cloned());
        }
        matches
    }
}

/// A matcher's placement errors as spec errors, at each route's path.
fn matcher_errors(errs: Option<Vec<(String, String)>>) -> Result<(), SpecErrors> {
    let Some(errs) = errs else { return Ok(()) };
    let mut out = SpecErrors::default();
    for (route, msg) in errs {
        out.push(format!("routes.{route}.match.path"), msg);
    }
    Err(out)
}

fn route_match(id: u32, name: &str, r: &crate::state::spec::RouteSpec) -> RouteMatch {
    let m = &r.matches;
    RouteMatch {
        id,
        name: name.to_string(),
        hosts: m.hosts.clone(),
        path: match m.path.kind().expect("checked by the spec") {
            PathKind::Exact(p) => PathMatch::Exact(p.to_string()),
            PathKind::Prefix(p) => PathMatch::Prefix(p.to_string()),
            PathKind::Template(p) => PathMatch::Template(p.to_string()),
        },
        methods: m
            .methods
            .iter()
            .map(|x| Method::from_bytes(x.as_bytes()).expect("checked by the spec"))
            .collect(),
        headers: m
            .headers
            .iter()
            .map(|h| HeaderCondition {
                name: HeaderName::from_bytes(h.name.as_bytes()).expect("checked by the spec"),
                test: match (&h.exact, &h.prefix, h.present) {
                    (Some(v), _, _) => {
                        HeaderTest::Exact(HeaderValue::from_str(v).expect("checked by the spec"))
                    }
                    (_, Some(p), _) => HeaderTest::Prefix(p.clone()),
                    (_, _, present) => HeaderTest::Present(present.unwrap_or(true)),
                },
            })
            .collect(),
        priority: r.priority,
    }
}

/// Logs and counts a part of an API that cannot be compiled on this node; the part answers
/// 503 and everything else is served (one tenant's API cannot stop a node's updates).
fn broken(path: &str, msg: &str) {
    metrics::counter!("tollgate_snapshot_build_failures_total").increment(1);
    tracing::error!("cannot compile {path} on this node; it answers 503: {msg}");
}

/// `Deprecation` (RFC 9745), `Sunset` (RFC 8594) and the successor `Link` of a
/// deprecated version.
fn deprecation_headers(api: &Api, v: &ApiVersion) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    if v.stage != Stage::Deprecated {
        return out;
    }
    let at = (v.deprecated_at_ms / 1000).to_string();
    out.push((
        HeaderName::from_static("deprecation"),
        HeaderValue::from_str(&format!("@{at}")).expect("digits"),
    ));
    if let Some(sunset) = v.sunset {
        let date = sunset.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        out.push((
            HeaderName::from_static("sunset"),
            HeaderValue::from_str(&date).expect("an HTTP date"),
        ));
    }
    if let Some(successor) = &v.successor {
        let base = api.settings.base_path.trim_end_matches('/');
        let link = format!("<{base}/v{}>; rel=\"successor-version\"", successor.major);
        if let Ok(value) = HeaderValue::from_str(&link) {
            out.push((header::LINK, value));
        }
    }
    out
}

/// Every LLM deployment's provider limits, from the routes that serve them.
fn clusters_quotas(routes: &[Route]) -> Vec<Arc<QuotaDef>> {
    let mut out: Vec<Arc<QuotaDef>> = Vec::new();
    for (llm, _) in routes.iter().filter_map(|r| r.llm.as_ref()) {
        for d in llm.models.values().flat_map(|m| m.deployments.iter()) {
            for def in [&d.tpm_def, &d.rpm_def].into_iter().flatten() {
                if !out.iter().any(|q| q.id == def.id) {
                    out.push(def.clone());
                }
            }
        }
    }
    out
}

impl Routing {
    /// Compiles the spec and the mounted API versions. Fails only on what needs the whole
    /// table to see (two templates that conflict); such errors name the routes.
    /// `open_jwks` opens the sealed symmetric keys of an API's JWT key set.
    pub fn build(
        spec: &Spec,
        versions: &[VersionSpec<'_>],
        registry: &EndpointRegistry,
        open_jwks: &dyn Fn(&str) -> Result<String, String>,
        operator: &BuildCtx<'_>,
        tenants: &BuildCtx<'_>,
    ) -> Result<Routing, SpecErrors> {
        let mut b = Builder {
            quotas: spec
                .quotas
                .iter()
                .map(|(name, q)| Arc::new(QuotaDef::compile(name, q)))
                .collect(),
            ..Builder::default()
        };
        b.add_spec(spec, "", None, "", registry, operator);
        let mut mounts: Vec<Mount> = Vec::new();
        for vs in versions {
            let api = vs.api;
            if mounts.last().is_none_or(|m| *m.api != *api.name) {
                let id = MOUNT_BIT | mounts.len() as u32;
                b.matches.push(RouteMatch {
                    id,
                    name: format!("api/{}", api.name),
                    hosts: api.settings.hosts.clone(),
                    path: PathMatch::Prefix(api.settings.base_path.clone()),
                    methods: Vec::new(),
                    headers: Vec::new(),
                    // On the same host and prefix, the operator's spec routes win.
                    priority: i32::MIN,
                });
                let auth = match (&api.settings.auth, &api.settings.jwt) {
                    (AuthMode::None, _) => MountAuth::None,
                    (AuthMode::Mtls, _) => MountAuth::Mtls,
                    (AuthMode::Jwt, Some(j)) => {
                        let jwks = open_jwks(&j.jwks);
                        let validator = jwks.and_then(|jwks| {
                            JwtValidator::new(
                                &jwks,
                                &j.issuer,
                                &j.audience,
                                &j.tenant_claim,
                                &api.tenant,
                            )
                        });
                        match validator {
                            Ok(v) => MountAuth::Jwt(Box::new(v)),
                            Err(e) => {
                                broken(&format!("apis.{}.jwt", api.name), &e);
                                MountAuth::Broken
                            }
                        }
                    }
                    _ => MountAuth::Key,
                };
                mounts.push(Mount {
                    api: Arc::from(api.name.as_str()),
                    owner: Arc::from(api.tenant.as_str()),
                    auth,
                    sticky: api.settings.sticky,
                    base_path: api.settings.base_path.trim_end_matches('/').to_string(),
                    versions: Vec::new(),
                    split: Vec::new(),
                    llm: false,
                });
            }
            let mount = mounts.last_mut().expect("pushed above");
            let v = vs.version;
            let mut available = vs.available;
            let matcher = match &vs.spec {
                Some(spec) => {
                    let prefix = format!("{}@{}/", api.name, v.version);
                    let api_name = mount.api.clone();
                    let secrets = format!("{}.", api.tenant);
                    if !spec.models.is_empty() {
                        mount.llm = true;
                    }
                    let matches =
                        b.add_spec(spec, &prefix, Some(&api_name), &secrets, registry, tenants);
                    match Matcher::build(&matches) {
                        Ok(m) => m,
                        Err(errs) => {
                            for (route, msg) in errs {
                                broken(
                                    &format!(
                                        "apis.{}.versions.{}.routes.{route}",
                                        api.name, v.version
                                    ),
                                    &msg,
                                );
                            }
                            available = false;
                            Matcher::default()
                        }
                    }
                }
                None => Matcher::default(),
            };
            if let Some(weight) = api.split.get(&v.version) {
                mount.split.push((*weight, mount.versions.len()));
            }
            mount.versions.push(MountedVersion {
                version: v.version.clone(),
                // Semantic versions are digits, letters, '.', '-' and '+': all valid here.
                label: HeaderValue::from_str(&v.version.to_string())
                    .expect("a semantic version is a valid header value"),
                name: Arc::from(v.version.to_string()),
                stage: v.stage,
                matcher,
                deprecation: deprecation_headers(api, v),
                available,
                capture: vs
                    .spec
                    .as_ref()
                    .and_then(|s| s.call_log.as_ref())
                    .and_then(|c| c.compile())
                    .map(Arc::new),
                alerts: vs
                    .spec
                    .as_ref()
                    .and_then(|s| s.alerts.clone())
                    .map(Arc::new),
            });
        }
        let matcher = Matcher::build(&b.matches);
        matcher_errors(matcher.as_ref().err().cloned())?;
        let matcher = matcher.expect("errors returned above");
        let mut clusters = b.clusters;
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        registry.retain(&|cluster, addr| {
            clusters
                .iter()
                .any(|c| &*c.name == cluster && c.endpoints.iter().any(|e| e.state.addr == addr))
        });
        let addrs = clusters
            .iter()
            .flat_map(|c| c.endpoints.iter().map(|e| e.state.addr))
            .collect();
        let provider_quotas = clusters_quotas(&b.routes);
        Ok(Routing {
            provider_quotas,
            addrs,
            matcher,
            routes: b.routes,
            mounts,
            clusters,
            quotas: b.quotas,
            hosts: crate::proxy::tls::HostRules::build(&spec.hosts),
            certificates: spec.certificates.clone(),
            host_specs: spec.hosts.clone(),
        })
    }
}
