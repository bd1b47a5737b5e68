//! The immutable view of the cluster state that the data plane reads: compiled routes,
//! upstream clusters and their policies, plus the generation they came from.
//!
//! A snapshot is built off the request path (from a spec today, from the Raft state
//! machine later) and published through an `ArcSwap`; a request loads it once and reads
//! nothing else. Building one never fails halfway: either the whole spec compiles or the
//! errors are returned and the running snapshot stays.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};

use crate::routing::matcher::{HeaderCondition, HeaderTest, Matcher, PathMatch, RouteMatch};
use crate::routing::upstream::{Cluster, EndpointRegistry};
use crate::state::spec::{HeaderOpsSpec, PathKind, Spec, SpecErrors};
use crate::telemetry::metrics::RouteMetrics;

/// What the data plane serves. Cheap to share, never mutated.
#[derive(Debug)]
pub struct Snapshot {
    /// 0 for the empty snapshot a node starts with, then +1 per accepted spec.
    pub generation: u64,
    pub matcher: Matcher,
    pub routes: Vec<Route>,
    pub clusters: Vec<Arc<Cluster>>,
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
            matcher: Matcher::default(),
            routes: Vec::new(),
            clusters: Vec::new(),
        }
    }

    /// Compiles a checked spec. Fails only on what needs the whole table to see (two
    /// templates that conflict); such errors name the routes.
    pub fn build(
        spec: &Spec,
        generation: u64,
        registry: &EndpointRegistry,
    ) -> Result<Snapshot, SpecErrors> {
        let clusters: HashMap<&str, Arc<Cluster>> = spec
            .upstreams
            .iter()
            .map(|(name, up)| (name.as_str(), Arc::new(Cluster::build(name, up, registry))))
            .collect();
        let mut matches = Vec::with_capacity(spec.routes.len());
        let mut routes = Vec::with_capacity(spec.routes.len());
        for (id, (name, r)) in spec.routes.iter().enumerate() {
            let m = &r.matches;
            matches.push(RouteMatch {
                id: id as u32,
                name: name.clone(),
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
                        name: HeaderName::from_bytes(h.name.as_bytes())
                            .expect("checked by the spec"),
                        test: match (&h.exact, &h.prefix, h.present) {
                            (Some(v), _, _) => HeaderTest::Exact(
                                HeaderValue::from_str(v).expect("checked by the spec"),
                            ),
                            (_, Some(p), _) => HeaderTest::Prefix(p.clone()),
                            (_, _, present) => HeaderTest::Present(present.unwrap_or(true)),
                        },
                    })
                    .collect(),
                priority: r.priority,
            });
            let rewrite = r
                .rewrite
                .as_ref()
                .map(|rw| Rewrite::ReplacePrefix(rw.replace_prefix.clone().unwrap_or_default()));
            routes.push(Route {
                name: Arc::from(name.as_str()),
                cluster: clusters[r.upstream.as_str()].clone(),
                rewrite,
                request_headers: HeaderOps::compile(&r.request_headers),
                response_headers: HeaderOps::compile(&r.response_headers),
                metrics: RouteMetrics::new(name),
            });
        }
        let matcher = Matcher::build(&matches).map_err(|errs| {
            let mut out = SpecErrors::default();
            for (route, msg) in errs {
                out.push(format!("routes.{route}.match.path"), msg);
            }
            out
        })?;
        let mut clusters: Vec<Arc<Cluster>> = clusters.into_values().collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        registry.retain(&|cluster, addr| {
            clusters
                .iter()
                .any(|c| &*c.name == cluster && c.endpoints.iter().any(|e| e.state.addr == addr))
        });
        Ok(Snapshot {
            generation,
            matcher,
            routes,
            clusters,
        })
    }
}
