use super::*;

// === helpers ===

/// A route with no hosts, methods or header conditions; refine it with [`RouteExt`].
fn route(name: &str, path: PathMatch) -> RouteMatch {
    RouteMatch {
        id: 0, // assigned by `Table::build`
        name: name.to_string(),
        hosts: Vec::new(),
        path,
        methods: Vec::new(),
        headers: Vec::new(),
        priority: 0,
    }
}

fn exact(name: &str, path: &str) -> RouteMatch {
    route(name, PathMatch::Exact(path.to_string()))
}

fn prefix(name: &str, path: &str) -> RouteMatch {
    route(name, PathMatch::Prefix(path.to_string()))
}

fn template(name: &str, path: &str) -> RouteMatch {
    route(name, PathMatch::Template(path.to_string()))
}

fn header_exact(name: &'static str, value: &'static str) -> HeaderCondition {
    HeaderCondition {
        name: HeaderName::from_static(name),
        test: HeaderTest::Exact(HeaderValue::from_static(value)),
    }
}

fn header_prefix(name: &'static str, value: &str) -> HeaderCondition {
    HeaderCondition {
        name: HeaderName::from_static(name),
        test: HeaderTest::Prefix(value.to_string()),
    }
}

fn header_present(name: &'static str, present: bool) -> HeaderCondition {
    HeaderCondition {
        name: HeaderName::from_static(name),
        test: HeaderTest::Present(present),
    }
}

trait RouteExt {
    fn hosts(self, hosts: &[&str]) -> Self;
    fn methods(self, methods: &[Method]) -> Self;
    fn header(self, condition: HeaderCondition) -> Self;
    fn priority(self, priority: i32) -> Self;
}

impl RouteExt for RouteMatch {
    fn hosts(mut self, hosts: &[&str]) -> Self {
        self.hosts = hosts.iter().map(|h| h.to_string()).collect();
        self
    }
    fn methods(mut self, methods: &[Method]) -> Self {
        self.methods = methods.to_vec();
        self
    }
    fn header(mut self, condition: HeaderCondition) -> Self {
        self.headers.push(condition);
        self
    }
    fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

/// A compiled matcher that answers with route names instead of ids.
struct Table {
    matcher: Matcher,
    names: Vec<String>,
}

impl Table {
    /// Numbers the routes in the order given and compiles them.
    fn build(routes: impl IntoIterator<Item = RouteMatch>) -> Table {
        let routes: Vec<RouteMatch> = routes
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                r.id = RouteId::try_from(i).expect("test tables have fewer than 2^32 routes");
                r
            })
            .collect();
        let names = routes.iter().map(|r| r.name.clone()).collect();
        let matcher = match Matcher::build(&routes) {
            Ok(m) => m,
            Err(errors) => panic!("the test routes should compile, got {errors:?}"),
        };
        Table { matcher, names }
    }

    fn lookup_full(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<(&str, usize)> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header names are valid"),
                HeaderValue::from_str(value).expect("test header values are valid"),
            );
        }
        self.matcher
            .lookup(host, method, path, &map)
            .map(|m| (self.names[m.route as usize].as_str(), m.prefix_len))
    }

    fn lookup(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<&str> {
        self.lookup_full(host, method, path, headers)
            .map(|(name, _)| name)
    }
}

/// One row of a table test: a request and the route it must reach (`None`: no route).
struct Case {
    host: &'static str,
    method: Method,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    expect: Option<&'static str>,
}

/// `GET` on any host without headers, the common case.
fn get(path: &'static str, expect: Option<&'static str>) -> Case {
    Case {
        host: "example.org",
        method: Method::GET,
        path,
        headers: &[],
        expect,
    }
}

fn on_host(host: &'static str, path: &'static str, expect: Option<&'static str>) -> Case {
    Case {
        host,
        ..get(path, expect)
    }
}

fn with_method(method: Method, path: &'static str, expect: Option<&'static str>) -> Case {
    Case {
        method,
        ..get(path, expect)
    }
}

fn with_headers(
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    expect: Option<&'static str>,
) -> Case {
    Case {
        headers,
        ..get(path, expect)
    }
}

/// Runs every case and reports all mismatches at once.
fn check(table: &Table, cases: &[Case]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let got = table.lookup(c.host, &c.method, c.path, c.headers);
            (got != c.expect).then(|| {
                format!(
                    "{} {}{} headers={:?}: expected {:?}, got {:?}",
                    c.method, c.host, c.path, c.headers, c.expect, got
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} lookups went wrong:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

// === path kinds ===

#[test]
fn exact_beats_template_beats_prefix() {
    let table = Table::build([
        prefix("users-prefix", "/users"),
        prefix("users-5-prefix", "/users/5"),
        template("user-by-id", "/users/{id}"),
        template("user-posts", "/users/{id}/posts"),
        exact("users-me", "/users/me"),
    ]);
    check(
        &table,
        &[
            get("/users/me", Some("users-me")),
            // A template beats a prefix, even a longer one.
            get("/users/5", Some("user-by-id")),
            get("/users/42", Some("user-by-id")),
            get("/users/42/posts", Some("user-posts")),
            get("/users/5/x", Some("users-5-prefix")),
            get("/users/42/comments", Some("users-prefix")),
            get("/users/me/settings", Some("users-prefix")),
            get("/users", Some("users-prefix")),
            get("/users/", Some("users-prefix")),
            get("/other", None),
        ],
    );
}

#[test]
fn exact_paths_match_only_themselves() {
    let table = Table::build([exact("status", "/status")]);
    check(
        &table,
        &[
            get("/status", Some("status")),
            get("/status/", None),
            get("/status/x", None),
            get("/statusx", None),
            get("/Status", None),
        ],
    );
}

#[test]
fn the_longest_prefix_wins() {
    let table = Table::build([
        prefix("root", "/"),
        prefix("api", "/api"),
        prefix("v1", "/api/v1"),
        prefix("admin", "/api/v1/admin"),
    ]);
    check(
        &table,
        &[
            get("/", Some("root")),
            get("/x", Some("root")),
            get("/api", Some("api")),
            get("/api/v2/users", Some("api")),
            get("/api/v1", Some("v1")),
            get("/api/v1/users", Some("v1")),
            get("/api/v1/admin", Some("admin")),
            get("/api/v1/admin/users/7", Some("admin")),
            get("/api/v1/administrator", Some("v1")),
        ],
    );
}

#[test]
fn prefixes_end_at_segment_boundaries() {
    let table = Table::build([prefix("api", "/api"), prefix("docs", "/docs/")]);
    check(
        &table,
        &[
            get("/api", Some("api")),
            get("/api/", Some("api")),
            get("/api/x", Some("api")),
            get("/api/x/y", Some("api")),
            get("/apix", None),
            get("/apix/y", None),
            get("/ap", None),
            get("/", None),
            get("/docs/", Some("docs")),
            get("/docs/guide", Some("docs")),
            get("/docsx", None),
        ],
    );
}

#[test]
fn the_root_prefix_matches_every_path() {
    let table = Table::build([prefix("all", "/")]);
    check(
        &table,
        &[
            get("/", Some("all")),
            get("/a", Some("all")),
            get("/apix", Some("all")),
            get("/deeply/nested/path/", Some("all")),
            get("//double", Some("all")),
        ],
    );
}

#[test]
fn prefix_matches_report_how_much_of_the_path_they_covered() {
    let table = Table::build([
        prefix("root", "/"),
        prefix("api", "/api"),
        template("user", "/users/{id}"),
        exact("status", "/status"),
    ]);
    let cases = [
        ("/api", ("api", 4)),
        ("/api/", ("api", 4)),
        ("/api/users/7", ("api", 4)),
        ("/other", ("root", 0)),
        ("/users/7", ("user", 0)),
        ("/status", ("status", 0)),
    ];
    for (path, expect) in cases {
        assert_eq!(
            table.lookup_full("h", &Method::GET, path, &[]),
            Some(expect),
            "path {path}"
        );
    }
}

// === hosts ===

#[test]
fn hosts_exact_then_longest_wildcard_then_any() {
    let table = Table::build([
        prefix("api-host", "/").hosts(&["api.example.com"]),
        prefix("shop-host", "/").hosts(&["Shop.Example.COM"]),
        prefix("wild", "/").hosts(&["*.example.com"]),
        prefix("wild-eu", "/").hosts(&["*.eu.example.com"]),
        prefix("any", "/"),
    ]);
    check(
        &table,
        &[
            on_host("api.example.com", "/x", Some("api-host")),
            // Host names compare without case, on both sides.
            on_host("API.Example.COM", "/x", Some("api-host")),
            on_host("shop.example.com", "/x", Some("shop-host")),
            // A trailing dot (fully qualified name) is ignored.
            on_host("api.example.com.", "/x", Some("api-host")),
            on_host("WWW.EXAMPLE.COM.", "/x", Some("wild")),
            on_host("www.example.com", "/x", Some("wild")),
            on_host("a.b.example.com", "/x", Some("wild")),
            // The longest wildcard suffix wins.
            on_host("fr.eu.example.com", "/x", Some("wild-eu")),
            on_host("a.b.eu.example.com", "/x", Some("wild-eu")),
            // `*.eu.example.com` needs a label before `.eu`.
            on_host("eu.example.com", "/x", Some("wild")),
            // `*.example.com` does not cover `example.com` itself.
            on_host("example.com", "/x", Some("any")),
            on_host("notexample.com", "/x", Some("any")),
            on_host("api.example.com.evil.org", "/x", Some("any")),
            on_host("other.org", "/x", Some("any")),
            on_host("", "/x", Some("any")),
        ],
    );
}

#[test]
fn hosts_never_include_a_port() {
    // The caller strips the port; a host with one left on is just another name.
    let table = Table::build([prefix("api", "/").hosts(&["api.example.com"])]);
    check(
        &table,
        &[
            on_host("api.example.com", "/", Some("api")),
            on_host("api.example.com:8080", "/", None),
        ],
    );
}

#[test]
fn a_host_table_without_a_match_falls_through() {
    let table = Table::build([
        exact("api-admin", "/admin").hosts(&["api.example.com"]),
        exact("api-post-only", "/submit")
            .hosts(&["api.example.com"])
            .methods(&[Method::POST]),
        exact("wild-w", "/w").hosts(&["*.example.com"]),
        exact("status", "/status"),
        exact("submit", "/submit"),
        prefix("fallback", "/"),
    ]);
    check(
        &table,
        &[
            on_host("api.example.com", "/admin", Some("api-admin")),
            // No path in the exact-host table: the wildcard table, then the any-host one.
            on_host("api.example.com", "/w", Some("wild-w")),
            on_host("api.example.com", "/status", Some("status")),
            on_host("api.example.com", "/else", Some("fallback")),
            on_host("www.example.com", "/admin", Some("fallback")),
            // A path that matches but a method that does not also falls through.
            Case {
                method: Method::POST,
                ..on_host("api.example.com", "/submit", Some("api-post-only"))
            },
            on_host("api.example.com", "/submit", Some("submit")),
        ],
    );
}

#[test]
fn a_more_specific_host_wins_over_a_more_specific_path() {
    // The first host table with any matching route wins, however loose its path is.
    let table = Table::build([
        prefix("api-all", "/").hosts(&["api.example.com"]),
        prefix("wild-all", "/").hosts(&["*.example.com"]),
        exact("status", "/status"),
    ]);
    check(
        &table,
        &[
            on_host("api.example.com", "/status", Some("api-all")),
            on_host("www.example.com", "/status", Some("wild-all")),
            on_host("example.net", "/status", Some("status")),
        ],
    );
}

#[test]
fn a_route_with_several_hosts_is_reachable_on_each() {
    let table = Table::build([template("user", "/users/{id}").hosts(&[
        "a.example.com",
        "A.EXAMPLE.com",
        "*.b.org",
    ])]);
    check(
        &table,
        &[
            on_host("a.example.com", "/users/1", Some("user")),
            on_host("x.b.org", "/users/1", Some("user")),
            on_host("b.org", "/users/1", None),
            on_host("c.example.com", "/users/1", None),
        ],
    );
}

// === methods and headers ===

#[test]
fn method_lists_restrict_and_beat_routes_without_one() {
    let table = Table::build([
        // Priority does not lift a route over one that asks for more.
        exact("items-any", "/items").priority(100),
        exact("items-read", "/items").methods(&[Method::GET, Method::HEAD]),
        exact("items-create", "/items").methods(&[Method::POST]),
        exact("only-put", "/put").methods(&[Method::PUT]),
    ]);
    check(
        &table,
        &[
            with_method(Method::GET, "/items", Some("items-read")),
            with_method(Method::HEAD, "/items", Some("items-read")),
            with_method(Method::POST, "/items", Some("items-create")),
            with_method(Method::DELETE, "/items", Some("items-any")),
            with_method(Method::PUT, "/put", Some("only-put")),
            with_method(Method::GET, "/put", None),
        ],
    );
}

#[test]
fn header_conditions_exact_prefix_and_presence() {
    let table = Table::build([
        exact("plain", "/h"),
        exact("canary", "/h").header(header_exact("x-canary", "1")),
        exact("mobile", "/h").header(header_prefix("user-agent", "acme-app/")),
        exact("beta", "/h").header(header_present("x-beta", true)),
        exact("not-legacy", "/l").header(header_present("x-legacy", false)),
        exact("legacy-fallback", "/l"),
    ]);
    check(
        &table,
        &[
            with_headers("/h", &[], Some("plain")),
            with_headers("/h", &[("x-canary", "1")], Some("canary")),
            with_headers("/h", &[("x-canary", "10")], Some("plain")),
            with_headers(
                "/h",
                &[("x-canary", "0"), ("x-canary", "1")],
                Some("canary"),
            ),
            with_headers("/h", &[("user-agent", "acme-app/2.1")], Some("mobile")),
            with_headers(
                "/h",
                &[("user-agent", "curl/8 acme-app/2.1")],
                Some("plain"),
            ),
            with_headers("/h", &[("x-beta", "")], Some("beta")),
            with_headers("/h", &[("x-beta", "no")], Some("beta")),
            // Header names compare without case (HeaderMap lowercases them).
            with_headers("/h", &[("X-Canary", "1")], Some("canary")),
            with_headers("/l", &[], Some("not-legacy")),
            with_headers("/l", &[("x-legacy", "1")], Some("legacy-fallback")),
        ],
    );
}

#[test]
fn more_header_conditions_win_over_fewer() {
    let table = Table::build([
        prefix("one", "/").header(header_exact("x-tenant", "acme")),
        prefix("two", "/")
            .header(header_exact("x-tenant", "acme"))
            .header(header_present("x-debug", true)),
        // One header condition plus a method list still loses to two header conditions.
        prefix("one-and-method", "/")
            .header(header_exact("x-tenant", "acme"))
            .methods(&[Method::GET])
            .priority(50),
        prefix("none", "/").priority(1_000),
    ]);
    check(
        &table,
        &[
            with_headers("/", &[("x-tenant", "acme"), ("x-debug", "1")], Some("two")),
            with_headers("/", &[("x-tenant", "acme")], Some("one-and-method")),
            Case {
                method: Method::POST,
                ..with_headers("/", &[("x-tenant", "acme")], Some("one"))
            },
            with_headers("/", &[("x-debug", "1")], Some("none")),
            get("/", Some("none")),
        ],
    );
}

// === ties ===

#[test]
fn priority_breaks_ties_between_equally_specific_routes() {
    let table = Table::build([
        exact("low", "/x").priority(1),
        exact("high", "/x").priority(5),
        exact("negative", "/x").priority(-3),
        prefix("p-default", "/p"),
        prefix("p-negative", "/p").priority(-1),
        template("t-low", "/t/{a}").priority(-1),
        template("t-high", "/t/{b}").priority(2),
    ]);
    check(
        &table,
        &[
            get("/x", Some("high")),
            get("/p/y", Some("p-default")),
            get("/t/1", Some("t-high")),
        ],
    );
}

#[test]
fn name_breaks_remaining_ties_whatever_the_input_order() {
    let routes = [
        exact("zeta", "/same"),
        exact("alpha", "/same"),
        exact("mid", "/same"),
        exact("b-canary", "/h").header(header_exact("x-a", "1")),
        exact("a-beta", "/h").header(header_present("x-b", true)),
    ];
    let both_headers: &[(&str, &str)] = &[("x-a", "1"), ("x-b", "1")];
    let forward = Table::build(routes.clone());
    let backward = Table::build(routes.into_iter().rev());
    for table in [&forward, &backward] {
        assert_eq!(table.lookup("h", &Method::GET, "/same", &[]), Some("alpha"));
        assert_eq!(
            table.lookup("h", &Method::GET, "/h", both_headers),
            Some("a-beta")
        );
    }
}

// === templates ===

#[test]
fn templates_of_the_same_shape_share_an_entry() {
    let table = Table::build([
        template("get-user", "/users/{id}").methods(&[Method::GET]),
        template("delete-user", "/users/{user_id}").methods(&[Method::DELETE]),
        template("any-user", "/users/{uid}"),
        template("user-posts", "/users/{user}/posts/{post}"),
        template("org-repo", "/{org}/{repo}"),
        template("org-repo-issues", "/{owner}/{name}/issues").priority(1),
    ]);
    check(
        &table,
        &[
            with_method(Method::GET, "/users/7", Some("get-user")),
            with_method(Method::DELETE, "/users/7", Some("delete-user")),
            with_method(Method::PUT, "/users/7", Some("any-user")),
            get("/users/7/posts/9", Some("user-posts")),
            get("/users/7/posts", None),
            get("/acme/widgets", Some("org-repo")),
            get("/acme/widgets/issues", Some("org-repo-issues")),
            // A parameter is one whole, non-empty segment.
            get("/users/", None),
            get("/users/7/", None),
        ],
    );
}

#[test]
fn normalize_template_accepts_whole_segment_parameters() {
    let cases = [
        ("/users/{id}", "/users/{p0}"),
        ("/users/{id}/posts", "/users/{p0}/posts"),
        ("/users/{user_id}/posts/{post_id}", "/users/{p0}/posts/{p1}"),
        ("/{a}", "/{p0}"),
        ("/v1/{Org_2}/x/", "/v1/{p0}/x/"),
    ];
    for (input, expect) in cases {
        assert_eq!(normalize_template(input).as_deref(), Ok(expect), "{input}");
    }
    // Different parameter names, same shape.
    assert_eq!(
        normalize_template("/users/{id}"),
        normalize_template("/users/{name}")
    );
}

#[test]
fn normalize_template_rejects_malformed_parameters() {
    let cases = [
        ("/users/{id", "whole segment"),
        ("/users/id}", "whole segment"),
        ("/a{b}", "whole segment"),
        ("/users/{id}x", "whole segment"),
        ("/users/x{id}", "whole segment"),
        ("/users/{}", "letters, digits"),
        ("/users/{a-b}", "letters, digits"),
        ("/users/{*rest}", "letters, digits"),
        ("/users/{{id}}", "letters, digits"),
        ("/users/{a}{b}", "letters, digits"),
        ("/x", "at least one {parameter}"),
        ("/", "at least one {parameter}"),
        ("", "at least one {parameter}"),
    ];
    for (input, needle) in cases {
        match normalize_template(input) {
            Ok(shape) => panic!("{input:?} should be rejected, got {shape:?}"),
            Err(msg) => assert!(msg.contains(needle), "{input:?}: {msg:?} lacks {needle:?}"),
        }
    }
}

#[test]
fn build_reports_bad_templates_by_route_name() {
    let routes = [
        template("good", "/users/{id}"),
        template("no-params", "/x"),
        template("broken", "/users/{id"),
    ];
    let mut errors = match Matcher::build(&routes) {
        Ok(m) => panic!("bad templates should not compile, got {m:?}"),
        Err(errors) => errors,
    };
    errors.sort();
    let names: Vec<&str> = errors.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["broken", "no-params"]);
}

// === scale ===

#[test]
fn ten_thousand_routes_still_match_correctly() {
    const N: usize = 10_000;
    let routes = (0..N).map(|i| {
        let name = format!("r{i}");
        let r = match i % 3 {
            0 => exact(&name, &format!("/svc{i}/exact")),
            1 => template(&name, &format!("/svc{i}/items/{{id}}")),
            _ => prefix(&name, &format!("/svc{i}")),
        };
        // Every seventh route belongs to its own tenant host.
        if i % 7 == 0 {
            r.hosts(&[&format!("tenant{i}.example.com")])
        } else {
            r
        }
    });
    let table = Table::build(routes);
    assert_eq!(table.matcher.len(), N);
    assert!(!table.matcher.is_empty());

    let host = "example.org";
    let cases: &[(&str, &str, Option<&str>)] = &[
        (host, "/svc3/exact", Some("r3")),
        (host, "/svc3/exact/more", None),
        (host, "/svc1/items/42", Some("r1")),
        (host, "/svc1/items", None),
        (host, "/svc2", Some("r2")),
        (host, "/svc2/deep/path", Some("r2")),
        (host, "/svc2x", None),
        (host, "/svc9999/exact", Some("r9999")),
        (host, "/svc9998/anything", Some("r9998")),
        (host, "/svc9997/items/abc", Some("r9997")),
        (host, "/svc10000", None),
        // Route 7 is a template on tenant7's host only.
        (host, "/svc7/items/1", None),
        ("tenant7.example.com", "/svc7/items/1", Some("r7")),
        ("tenant7.example.com", "/svc8/x", Some("r8")),
        ("tenant14.example.com", "/svc14/a/b", Some("r14")),
        ("tenant21.example.com", "/svc21/exact", Some("r21")),
    ];
    for &(host, path, expect) in cases {
        assert_eq!(
            table.lookup(host, &Method::GET, path, &[]),
            expect,
            "{host}{path}"
        );
    }
}

#[test]
fn an_empty_matcher_matches_nothing() {
    let matcher = Matcher::default();
    assert!(matcher.is_empty());
    assert_eq!(
        matcher.lookup("example.com", &Method::GET, "/", &HeaderMap::new()),
        None
    );
}
