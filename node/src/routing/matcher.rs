//! The compiled route matcher: host, then path, then method and headers.
//!
//! ```text
//!   host ──► exact host table ─┐
//!        ──► *.suffix tables ──┼─► PathTable: exact paths (hash) ─► templates (radix tree) ─► prefixes (hash per segment)
//!        ──► any-host table ───┘        each hit is a short list of candidates, most specific first
//! ```
//!
//! A lookup costs a few hash probes per host label and per path segment plus one radix
//! tree walk; it never scans the route list, so its cost does not grow with the number of
//! routes. Host tables are tried from the most specific (exact, then the longest
//! wildcard suffix, then routes without hosts); the first table with a matching route
//! wins. Within a table, exact paths beat templates, templates beat prefixes, and longer
//! prefixes beat shorter ones. Routes on the same path are ordered by how much more they
//! ask for (header conditions, then a method list), then by `priority` (higher first),
//! then by name, so every lookup is deterministic.
//!
//! Tables hash with FxHash: keys come from the spec, so an attacker cannot choose them
//! to collide, and SipHash's cost would show on every request.
//!
//! Pure: no I/O, no clock. The matcher only knows route ids; what a route does lives in
//! [`crate::state::snapshot`].

use rustc_hash::FxHashMap as HashMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// Index of a route in the snapshot's route list.
pub type RouteId = u32;

/// One route's match conditions, as the matcher needs them.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub id: RouteId,
    pub name: String,
    pub hosts: Vec<String>,
    pub path: PathMatch,
    /// Empty: any method.
    pub methods: Vec<Method>,
    pub headers: Vec<HeaderCondition>,
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Template(String),
}

#[derive(Debug, Clone)]
pub struct HeaderCondition {
    pub name: HeaderName,
    pub test: HeaderTest,
}

#[derive(Debug, Clone)]
pub enum HeaderTest {
    Exact(HeaderValue),
    Prefix(String),
    Present(bool),
}

impl HeaderCondition {
    fn holds(&self, headers: &HeaderMap) -> bool {
        match &self.test {
            HeaderTest::Present(want) => headers.contains_key(&self.name) == *want,
            HeaderTest::Exact(v) => headers.get_all(&self.name).iter().any(|h| h == v),
            HeaderTest::Prefix(p) => headers
                .get_all(&self.name)
                .iter()
                .any(|h| h.as_bytes().starts_with(p.as_bytes())),
        }
    }
}

/// A successful lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    pub route: RouteId,
    /// For prefix routes: the length of the request path the prefix covered (for rewrites).
    pub prefix_len: usize,
}

#[derive(Debug, Clone)]
struct Candidate {
    id: RouteId,
    methods: Vec<Method>,
    headers: Vec<HeaderCondition>,
}

impl Candidate {
    fn accepts(&self, method: &Method, headers: &HeaderMap) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|c| c.holds(headers))
    }
}

#[derive(Default)]
struct PathTable {
    exact: HashMap<String, Vec<Candidate>>,
    templates: matchit::Router<Vec<Candidate>>,
    /// Keyed by the prefix without a trailing `/` (`""` for `/`).
    prefixes: HashMap<String, Vec<Candidate>>,
}

impl PathTable {
    fn lookup(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<Matched> {
        fn pick<'a>(
            list: &'a [Candidate],
            method: &Method,
            headers: &HeaderMap,
        ) -> Option<&'a Candidate> {
            list.iter().find(|c| c.accepts(method, headers))
        }
        if let Some(c) = self.exact.get(path).and_then(|l| pick(l, method, headers)) {
            return Some(Matched {
                route: c.id,
                prefix_len: 0,
            });
        }
        if let Ok(m) = self.templates.at(path)
            && let Some(c) = pick(m.value, method, headers)
        {
            return Some(Matched {
                route: c.id,
                prefix_len: 0,
            });
        }
        if self.prefixes.is_empty() {
            return None;
        }
        // Longest prefix first: the whole path, then every shorter segment boundary.
        let mut end = path.len();
        loop {
            if let Some(c) = self
                .prefixes
                .get(&path[..end])
                .and_then(|l| pick(l, method, headers))
            {
                return Some(Matched {
                    route: c.id,
                    prefix_len: end,
                });
            }
            if end == 0 {
                return None;
            }
            end = path[..end].rfind('/').unwrap_or(0);
        }
    }
}

/// The compiled, immutable route table.
#[derive(Default)]
pub struct Matcher {
    exact_hosts: HashMap<String, PathTable>,
    /// Keyed by the suffix with its leading dot: `*.example.com` is `.example.com`.
    wildcard_hosts: HashMap<String, PathTable>,
    any_host: PathTable,
    routes: usize,
}

impl std::fmt::Debug for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matcher")
            .field("routes", &self.routes)
            .field("exact_hosts", &self.exact_hosts.len())
            .field("wildcard_hosts", &self.wildcard_hosts.len())
            .finish()
    }
}

impl Matcher {
    /// Compiles routes into lookup tables. Fails with one message per route that cannot be
    /// placed (a template that conflicts with another, say), tagged with the route's name.
    pub fn build(routes: &[RouteMatch]) -> Result<Matcher, Vec<(String, String)>> {
        let mut errors = Vec::new();
        // Order every candidate list once, globally: more conditions first, then priority,
        // then name. Inserting in this order keeps each list sorted.
        let mut order: Vec<&RouteMatch> = routes.iter().collect();
        order.sort_by(|a, b| {
            (b.headers.len(), !b.methods.is_empty(), b.priority)
                .cmp(&(a.headers.len(), !a.methods.is_empty(), a.priority))
                .then_with(|| a.name.cmp(&b.name))
        });

        // Templates are gathered first so that routes with the same shape share one tree
        // entry (matchit refuses to insert one shape twice).
        #[derive(Default)]
        struct Building {
            exact: HashMap<String, Vec<Candidate>>,
            templates: HashMap<String, (Vec<Candidate>, Vec<String>)>,
            prefixes: HashMap<String, Vec<Candidate>>,
        }
        fn place(
            t: &mut Building,
            r: &RouteMatch,
            cand: &Candidate,
            errors: &mut Vec<(String, String)>,
        ) {
            match &r.path {
                PathMatch::Exact(p) => t.exact.entry(p.clone()).or_default().push(cand.clone()),
                PathMatch::Prefix(p) => t
                    .prefixes
                    .entry(p.trim_end_matches('/').to_string())
                    .or_default()
                    .push(cand.clone()),
                PathMatch::Template(p) => match normalize_template(p) {
                    Ok(shape) => {
                        let (list, names) = t.templates.entry(shape).or_default();
                        list.push(cand.clone());
                        names.push(r.name.clone());
                    }
                    Err(msg) => errors.push((r.name.clone(), msg)),
                },
            }
        }
        let mut exact_hosts: HashMap<String, Building> = HashMap::default();
        let mut wildcard_hosts: HashMap<String, Building> = HashMap::default();
        let mut any_host = Building::default();

        for r in &order {
            let cand = Candidate {
                id: r.id,
                methods: r.methods.clone(),
                headers: r.headers.clone(),
            };
            if r.hosts.is_empty() {
                place(&mut any_host, r, &cand, &mut errors);
            } else {
                let mut seen = rustc_hash::FxHashSet::default();
                for h in &r.hosts {
                    let h = h.to_ascii_lowercase();
                    if !seen.insert(h.clone()) {
                        continue;
                    }
                    let table = match h.strip_prefix('*') {
                        Some(suffix) => wildcard_hosts.entry(suffix.to_string()).or_default(),
                        None => exact_hosts.entry(h).or_default(),
                    };
                    place(table, r, &cand, &mut errors);
                }
            }
        }

        let mut compile = |b: Building| -> PathTable {
            let mut templates = matchit::Router::new();
            for (shape, (list, names)) in b.templates {
                if let Err(e) = templates.insert(shape.clone(), list) {
                    for name in names {
                        errors.push((name, format!("template conflicts with another route: {e}")));
                    }
                }
            }
            PathTable {
                exact: b.exact,
                templates,
                prefixes: b.prefixes,
            }
        };
        let matcher = Matcher {
            exact_hosts: exact_hosts
                .into_iter()
                .map(|(k, v)| (k, compile(v)))
                .collect(),
            wildcard_hosts: wildcard_hosts
                .into_iter()
                .map(|(k, v)| (k, compile(v)))
                .collect(),
            any_host: compile(any_host),
            routes: routes.len(),
        };
        if errors.is_empty() {
            Ok(matcher)
        } else {
            Err(errors)
        }
    }

    /// Finds the route for a request. `host` is the request's host without port, in any
    /// case; `path` is the URI path.
    pub fn lookup(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Matched> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if !self.exact_hosts.is_empty()
            && let Some(m) = self
                .exact_hosts
                .get(host)
                .and_then(|t| t.lookup(method, path, headers))
        {
            return Some(m);
        }
        if !self.wildcard_hosts.is_empty() {
            // `a.b.example.com` tries `.b.example.com`, then `.example.com`, then `.com`.
            for (i, _) in host.match_indices('.') {
                if let Some(m) = self
                    .wildcard_hosts
                    .get(&host[i..])
                    .and_then(|t| t.lookup(method, path, headers))
                {
                    return Some(m);
                }
            }
        }
        self.any_host.lookup(method, path, headers)
    }

    pub fn len(&self) -> usize {
        self.routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }
}

/// Turns `/users/{id}/posts` into the radix tree's syntax with positional parameter names
/// (`/users/{p0}/posts`), so that two routes of the same shape share one entry. Literal
/// braces are not allowed in templates; parameters must be whole segments.
pub fn normalize_template(template: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut params = 0;
    for (i, seg) in template.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let valid =
                !inner.is_empty() && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "parameter {seg:?} must be a name of letters, digits and `_` in braces, like {{id}}"
                ));
            }
            out.push_str(&format!("{{p{params}}}"));
            params += 1;
        } else if seg.contains(['{', '}']) {
            return Err(format!(
                "segment {seg:?}: a parameter must be a whole segment, like /users/{{id}}"
            ));
        } else {
            out.push_str(seg);
        }
    }
    if params == 0 {
        return Err(
            "a template needs at least one {parameter}; use `exact` for a fixed path".into(),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
