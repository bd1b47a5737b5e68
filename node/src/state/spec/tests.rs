use super::*;

// === helpers ===

/// Parses a spec that must be valid.
fn parse(yaml: &str) -> Spec {
    match Spec::from_yaml(yaml) {
        Ok(spec) => spec,
        Err(errors) => panic!("the spec should be valid, but {errors}"),
    }
}

/// Parses a spec that must be refused and returns its errors.
fn errors(yaml: &str) -> Vec<SpecError> {
    match Spec::from_yaml(yaml) {
        Ok(spec) => panic!("the spec should be refused, but it parsed as {spec:#?}"),
        Err(errors) => errors.0,
    }
}

/// Parses a spec that must be refused with exactly one error, at `path`, whose message
/// contains `needle`.
fn assert_one_error(yaml: &str, path: &str, needle: &str) -> SpecError {
    let errors = errors(yaml);
    let [error] = errors.as_slice() else {
        panic!(
            "expected one error at {path}, got {}: {errors:#?}",
            errors.len()
        );
    };
    assert_eq!(error.path, path, "{error}");
    assert!(error.message.contains(needle), "{error} lacks {needle:?}");
    error.clone()
}

/// A spec with one upstream `u` (one endpoint plus `extra`, indented under it) and one
/// route `r` (any path under `/`, plus `extra_route`) that forwards to it.
fn spec_with(extra_upstream: &str, extra_route: &str) -> String {
    format!(
        "upstreams:\n  u:\n    endpoints:\n      - address: 127.0.0.1:9001\n{}\
         routes:\n  r:\n    upstream: u\n{}",
        indent(extra_upstream, 4),
        indent(extra_route, 4),
    )
}

/// A spec with only the upstream `u`, with `extra` added (no route refers to it, so an
/// error in it is reported once; see `a_broken_upstream_is_not_reported_as_missing`).
fn upstream_with(extra: &str) -> String {
    format!(
        "upstreams:\n  u:\n    endpoints:\n      - address: 127.0.0.1:9001\n{}",
        indent(extra, 4)
    )
}

/// A spec whose route `r` has `extra` (which must include `match`) added.
fn route_with(extra: &str) -> String {
    spec_with("", extra)
}

fn indent(block: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{pad}{l}\n"))
        .collect()
}

const FULL_SPEC: &str = r#"
upstreams:
  users:
    endpoints:
      - address: 127.0.0.1:9001
        weight: 3
      - address: 127.0.0.1:9002
    load_balancing:
      policy: least_request
    timeouts:
      connect: 500ms
      request: 10s
      idle: 1m
    pool:
      max_idle_per_endpoint: 64
    retries:
      attempts: 2
      on: [connect_failure, "502", "503", timeout]
      budget:
        percent: 12.5
        min_concurrency: 1
    outlier_detection:
      consecutive_failures: 4
      base_ejection_time: 10s
      max_ejection_percent: 25
    health_check:
      path: /healthz
      interval: 2s
      timeout: 2s
      healthy_threshold: 1
      unhealthy_threshold: 4
      expected_statuses: [200, 204]
      host: users.internal
  sessions:
    endpoints:
      - address: 127.0.0.1:9101
      - address: "[::1]:9102"
    load_balancing:
      policy: consistent_hash
      hash_header: X-Session-Id
  legacy:
    endpoints:
      - address: 127.0.0.1:9201
routes:
  user-by-id:
    match:
      hosts: [api.example.com, "*.example.com"]
      path: { template: "/users/{id}" }
      methods: [GET, HEAD]
    upstream: users
  users-beta:
    match:
      path: { prefix: /users }
      headers:
        - { name: x-beta, present: true }
        - { name: x-canary, exact: "1" }
        - { name: user-agent, prefix: "acme-app/" }
    upstream: users
    priority: -10
    request_headers:
      add: { x-route: users-beta }
      set: { x-api-version: "2" }
      remove: [cookie]
    response_headers:
      remove: [server]
  sessions:
    match:
      path: { prefix: /sessions }
    upstream: sessions
    rewrite: { strip_prefix: true }
  api-v1:
    match:
      path: { prefix: /api/v1 }
    upstream: legacy
    rewrite: { replace_prefix: /v2 }
  status:
    match:
      path: { exact: /status }
    upstream: legacy
"#;

// === valid specs ===

#[test]
fn a_full_spec_parses_every_field() {
    let spec = parse(FULL_SPEC);
    assert_eq!(
        spec.upstreams.keys().collect::<Vec<_>>(),
        ["legacy", "sessions", "users"]
    );
    assert_eq!(
        spec.routes.keys().collect::<Vec<_>>(),
        ["api-v1", "sessions", "status", "user-by-id", "users-beta"]
    );

    let users = &spec.upstreams["users"];
    assert_eq!(
        users.endpoints,
        [
            EndpointSpec {
                address: "127.0.0.1:9001".into(),
                weight: 3,
                resolved: Some("127.0.0.1:9001".parse().expect("an address")),
                scheme: None,
                host: "127.0.0.1".into(),
            },
            EndpointSpec {
                address: "127.0.0.1:9002".into(),
                weight: 1,
                resolved: Some("127.0.0.1:9002".parse().expect("an address")),
                scheme: None,
                host: "127.0.0.1".into(),
            },
        ]
    );
    assert_eq!(users.load_balancing.policy, LbPolicy::LeastRequest);
    assert_eq!(
        users.timeouts,
        TimeoutsSpec {
            connect: Duration::from_millis(500),
            request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    );
    assert_eq!(users.pool.max_idle_per_endpoint, 64);
    assert_eq!(
        users.retries,
        RetrySpec {
            attempts: 2,
            on: vec![
                RetryOn::ConnectFailure,
                RetryOn::Status502,
                RetryOn::Status503,
                RetryOn::Timeout
            ],
            budget: RetryBudgetSpec {
                percent: 12.5,
                min_concurrency: 1
            },
        }
    );
    assert_eq!(
        users.outlier_detection,
        Some(OutlierSpec {
            consecutive_failures: 4,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 25.0,
        })
    );
    let hc = users
        .health_check
        .as_ref()
        .expect("users has a health check");
    assert_eq!(hc.path, "/healthz");
    assert_eq!(
        (hc.interval, hc.timeout),
        (Duration::from_secs(2), Duration::from_secs(2))
    );
    assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (1, 4));
    assert_eq!(hc.expected_statuses, [200, 204]);
    assert_eq!(hc.host.as_deref(), Some("users.internal"));

    let sessions = &spec.upstreams["sessions"];
    assert_eq!(sessions.load_balancing.policy, LbPolicy::ConsistentHash);
    assert_eq!(
        sessions.load_balancing.hash_header.as_deref(),
        Some("X-Session-Id")
    );

    let by_id = &spec.routes["user-by-id"];
    assert_eq!(by_id.upstream, "users");
    assert_eq!(by_id.matches.hosts, ["api.example.com", "*.example.com"]);
    assert_eq!(
        by_id.matches.path.kind(),
        Some(PathKind::Template("/users/{id}"))
    );
    assert_eq!(by_id.matches.methods, ["GET", "HEAD"]);

    let beta = &spec.routes["users-beta"];
    assert_eq!(beta.priority, -10);
    assert_eq!(beta.matches.headers.len(), 3);
    assert_eq!(beta.matches.headers[0].present, Some(true));
    assert_eq!(beta.matches.headers[1].exact.as_deref(), Some("1"));
    assert_eq!(beta.matches.headers[2].prefix.as_deref(), Some("acme-app/"));
    assert_eq!(beta.request_headers.remove, ["cookie"]);
    assert_eq!(beta.request_headers.set["x-api-version"], "2");
    assert_eq!(beta.request_headers.add["x-route"], "users-beta");
    assert_eq!(beta.response_headers.remove, ["server"]);

    assert_eq!(
        spec.routes["sessions"].rewrite,
        Some(RewriteSpec {
            strip_prefix: true,
            replace_prefix: None
        })
    );
    assert_eq!(
        spec.routes["api-v1"].rewrite,
        Some(RewriteSpec {
            strip_prefix: false,
            replace_prefix: Some("/v2".into())
        })
    );
    assert_eq!(
        spec.routes["status"].matches.path.kind(),
        Some(PathKind::Exact("/status"))
    );
}

#[test]
fn omitted_fields_take_their_defaults() {
    let spec = parse(FULL_SPEC);
    let legacy = &spec.upstreams["legacy"];
    assert_eq!(legacy.endpoints[0].weight, 1);
    assert_eq!(legacy.load_balancing, LoadBalancingSpec::default());
    assert_eq!(legacy.load_balancing.policy, LbPolicy::RoundRobin);
    assert_eq!(legacy.timeouts.connect, Duration::from_secs(2));
    assert_eq!(legacy.timeouts.request, Duration::from_secs(30));
    assert_eq!(legacy.timeouts.idle, Duration::from_secs(60));
    assert_eq!(legacy.pool.max_idle_per_endpoint, 128);
    assert_eq!(legacy.retries.attempts, 1);
    assert_eq!(legacy.retries.on, [RetryOn::ConnectFailure]);
    assert_eq!(legacy.retries.budget.percent, 20.0);
    assert_eq!(legacy.retries.budget.min_concurrency, 3);
    assert_eq!(legacy.outlier_detection, None);
    assert_eq!(legacy.health_check, None);

    let status = &spec.routes["status"];
    assert_eq!(status.priority, 0);
    assert_eq!(status.rewrite, None);
    assert!(status.matches.hosts.is_empty());
    assert!(status.matches.methods.is_empty());
    assert!(status.matches.headers.is_empty());
    assert_eq!(status.request_headers, HeaderOpsSpec::default());
    assert_eq!(status.response_headers, HeaderOpsSpec::default());
}

#[test]
fn empty_policy_objects_take_their_defaults() {
    let spec = parse(&upstream_with(
        "timeouts: {}\npool: {}\nretries: { budget: {} }\noutlier_detection: {}\nhealth_check: { path: /ready }",
    ));
    let u = &spec.upstreams["u"];
    assert_eq!(u.timeouts, TimeoutsSpec::default());
    assert_eq!(u.pool, PoolSpec::default());
    assert_eq!(u.retries, RetrySpec::default());
    assert_eq!(
        u.outlier_detection,
        Some(OutlierSpec {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50.0,
        })
    );
    assert_eq!(
        u.health_check,
        Some(HealthCheckSpec {
            path: "/ready".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_statuses: Vec::new(),
            host: None,
        })
    );
}

#[test]
fn an_empty_document_is_an_empty_spec() {
    for yaml in [
        "",
        "\n",
        "# nothing yet\n",
        "---\n",
        "upstreams:\nroutes:\n",
    ] {
        assert_eq!(
            Spec::from_yaml(yaml),
            Ok(Spec::default()),
            "document {yaml:?}"
        );
    }
}

// === whole-document errors ===

#[test]
fn every_error_is_listed_with_its_path() {
    let yaml = r#"
upstreams:
  zero-weight:
    endpoints:
      - address: 127.0.0.1:9001
        weight: 0
  bad-timeout:
    endpoints:
      - address: 127.0.0.1:9002
    timeouts:
      connect: soon
routes:
  to-nowhere:
    match: { path: { prefix: / } }
    upstream: missing
  lowercase-method:
    match:
      path: { exact: /a }
      methods: [GET, post]
    upstream: zero-weight
  bad-template:
    match: { path: { template: "/users/{id" } }
    upstream: zero-weight
"#;
    let mut found: Vec<(String, String)> = errors(yaml)
        .into_iter()
        .map(|e| (e.path, e.message))
        .collect();
    found.sort();
    let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "routes.bad-template.match.path.template",
            "routes.lowercase-method.match.methods[1]",
            "routes.to-nowhere.upstream",
            "upstreams.bad-timeout.timeouts.connect",
            "upstreams.zero-weight.endpoints[0].weight",
        ],
        "{found:#?}"
    );
}

#[test]
fn unknown_fields_are_refused_where_they_are() {
    assert_one_error(
        "upstream:\n  u:\n    endpoints: []\n",
        "spec",
        "unknown field `upstream`",
    );
    assert_one_error(
        &upstream_with("retry: { attempts: 2 }"),
        "upstreams.u.retry",
        "unknown field `retry`",
    );
    assert_one_error(
        &route_with("match: { path: { prefix: / }, method: [GET] }"),
        "routes.r.match.method",
        "unknown field `method`",
    );
}

#[test]
fn text_that_is_not_yaml_is_refused() {
    let error = assert_one_error("routes: [unclosed\n", "spec", "not valid YAML");
    assert!(!error.message.is_empty());
    assert_one_error("upstreams: {a: 1\n", "spec", "not valid YAML");
}

#[test]
fn a_document_that_is_not_a_mapping_is_refused() {
    assert_one_error("- upstreams\n", "spec", "expected a mapping");
    assert_one_error("just a string\n", "spec", "expected a mapping");
    assert_one_error(
        "routes: [a, b]\n",
        "routes",
        "expected a mapping of name -> object",
    );
}

// === durations ===

#[test]
fn a_bad_duration_explains_the_format() {
    for bad in ["soon", "5 parsecs", "-1s", "1.5.2s"] {
        let error = assert_one_error(
            &upstream_with(&format!("timeouts: {{ request: \"{bad}\" }}")),
            "upstreams.u.timeouts.request",
            "write it like 250ms, 5s or 1m",
        );
        assert!(error.message.contains(bad), "{error}");
    }
}

#[test]
fn a_zero_duration_is_refused() {
    assert_one_error(
        &upstream_with("timeouts: { idle: 0s }"),
        "upstreams.u.timeouts.idle",
        "must be greater than zero",
    );
    assert_one_error(
        &upstream_with("outlier_detection: { base_ejection_time: 0ms }"),
        "upstreams.u.outlier_detection.base_ejection_time",
        "must be greater than zero",
    );
}

#[test]
fn durations_accept_the_documented_forms() {
    let spec = parse(&upstream_with(
        "timeouts: { connect: 250ms, request: 1m 30s, idle: \" 2h \" }",
    ));
    let t = spec.upstreams["u"].timeouts;
    assert_eq!(t.connect, Duration::from_millis(250));
    assert_eq!(t.request, Duration::from_secs(90));
    assert_eq!(t.idle, Duration::from_secs(7_200));
}

// === references and names ===

// An upstream that fails to decode (a bad duration, an unknown field...) is still
// declared: routes that use it get no second, false "no upstream named" error.
#[test]
fn a_broken_upstream_is_not_reported_as_missing() {
    assert_one_error(
        &spec_with(
            "timeouts: { connect: soon }",
            "match: { path: { prefix: / } }",
        ),
        "upstreams.u.timeouts.connect",
        "write it like 250ms, 5s or 1m",
    );
}

#[test]
fn a_route_to_a_missing_upstream_names_the_defined_ones() {
    let yaml = r#"
upstreams:
  beta: { endpoints: [ { address: "127.0.0.1:9002" } ] }
  alpha: { endpoints: [ { address: "127.0.0.1:9001" } ] }
routes:
  r:
    match: { path: { prefix: / } }
    upstream: gamma
"#;
    assert_one_error(
        yaml,
        "routes.r.upstream",
        r#"no upstream named "gamma"; defined: [alpha, beta]"#,
    );
}

#[test]
fn object_names_are_checked() {
    let yaml = r#"
upstreams:
  "bad name": { endpoints: [ { address: "127.0.0.1:9001" } ] }
"#;
    assert_one_error(yaml, "upstreams.bad name", "names are 1-128 characters");
}

#[test]
fn endpoints_need_a_port_and_a_weight_in_range() {
    assert_one_error(
        "upstreams:\n  u:\n    endpoints: []\n",
        "upstreams.u.endpoints",
        "at least one endpoint",
    );
    assert_one_error(
        "upstreams:\n  u:\n    endpoints: [ { address: 127.0.0.1 } ]\n",
        "upstreams.u.endpoints[0].address",
        "needs a port",
    );
    assert_one_error(
        "upstreams:\n  u:\n    endpoints: [ { address: \"127.0.0.1:1\", weight: 10001 } ]\n",
        "upstreams.u.endpoints[0].weight",
        "between 1 and 10000",
    );
}

// === headers and methods ===

#[test]
fn header_names_are_validated_everywhere() {
    assert_one_error(
        &route_with(
            "match:\n  path: { prefix: / }\n  headers: [ { name: \"x bad\", present: true } ]",
        ),
        "routes.r.match.headers[0].name",
        "\"x bad\" is not a valid header name",
    );
    assert_one_error(
        &route_with(
            "match: { path: { prefix: / } }\nrequest_headers: { set: { \"bad:name\": v } }",
        ),
        "routes.r.request_headers.set.bad:name",
        "not a valid header name",
    );
    assert_one_error(
        &route_with("match: { path: { prefix: / } }\nresponse_headers: { remove: [ok, \"\"] }"),
        "routes.r.response_headers.remove[1]",
        "not a valid header name",
    );
    assert_one_error(
        &upstream_with("load_balancing: { policy: consistent_hash, hash_header: \"x(session)\" }"),
        "upstreams.u.load_balancing.hash_header",
        "not a valid header name",
    );
    // Header names are case-insensitive: capitals are fine.
    parse(&route_with(
        "match:\n  path: { prefix: / }\n  headers: [ { name: X-Tenant, exact: acme } ]\nrequest_headers: { add: { X-Added: v1 } }",
    ));
}

#[test]
fn header_values_to_add_are_validated() {
    assert_one_error(
        &route_with(
            "match: { path: { prefix: / } }\nrequest_headers: { add: { x-a: \"line\\nbreak\" } }",
        ),
        "routes.r.request_headers.add.x-a",
        "characters not allowed in a header",
    );
}

// The value of an `exact` header condition must be a valid header value (a line break,
// say, is refused rather than turned into something else).
#[test]
fn header_match_values_are_validated() {
    let errors = errors(&route_with(
        "match:\n  path: { prefix: / }\n  headers: [ { name: x-a, exact: \"a\\nb\" } ]",
    ));
    assert!(
        errors
            .iter()
            .all(|e| e.path.starts_with("routes.r.match.headers[0]")),
        "{errors:#?}"
    );
}

#[test]
fn methods_must_be_capitalised_http_methods() {
    parse(&route_with(
        "match: { path: { prefix: / }, methods: [GET, POST, PATCH, OPTIONS] }",
    ));
    for (bad, index) in [("[get]", 0), ("[GET, Post]", 1), ("[\"GE T\"]", 0)] {
        assert_one_error(
            &route_with(&format!(
                "match: {{ path: {{ prefix: / }}, methods: {bad} }}"
            )),
            &format!("routes.r.match.methods[{index}]"),
            "write it in capitals, like GET",
        );
    }
}

// === load balancing ===

#[test]
fn consistent_hash_needs_a_hash_header() {
    assert_one_error(
        &upstream_with("load_balancing: { policy: consistent_hash }"),
        "upstreams.u.load_balancing.hash_header",
        "consistent_hash needs the name of the header",
    );
}

#[test]
fn hash_header_is_only_for_consistent_hash() {
    for policy in ["round_robin", "least_request"] {
        assert_one_error(
            &upstream_with(&format!(
                "load_balancing: {{ policy: {policy}, hash_header: x-user }}"
            )),
            "upstreams.u.load_balancing.hash_header",
            "only used by policy consistent_hash",
        );
    }
    // The default policy is round_robin.
    assert_one_error(
        &upstream_with("load_balancing: { hash_header: x-user }"),
        "upstreams.u.load_balancing.hash_header",
        "only used by policy consistent_hash",
    );
}

#[test]
fn an_unknown_policy_is_refused() {
    assert_one_error(
        &upstream_with("load_balancing: { policy: random }"),
        "upstreams.u.load_balancing.policy",
        "unknown variant `random`",
    );
}

// === rewrites ===

#[test]
fn rewrites_need_a_prefix_route() {
    for path in ["exact: /a", "template: \"/a/{id}\""] {
        assert_one_error(
            &route_with(&format!(
                "match: {{ path: {{ {path} }} }}\nrewrite: {{ strip_prefix: true }}"
            )),
            "routes.r.rewrite",
            "prefix rewrites need a `prefix` path match",
        );
    }
}

#[test]
fn a_rewrite_is_either_strip_or_replace() {
    assert_one_error(
        &route_with(
            "match: { path: { prefix: /a } }\nrewrite: { strip_prefix: true, replace_prefix: /b }",
        ),
        "routes.r.rewrite",
        "not both",
    );
    assert_one_error(
        &route_with("match: { path: { prefix: /a } }\nrewrite: {}"),
        "routes.r.rewrite",
        "set `strip_prefix: true` or `replace_prefix: /new`",
    );
    assert_one_error(
        &route_with("match: { path: { prefix: /a } }\nrewrite: { replace_prefix: b }"),
        "routes.r.rewrite.replace_prefix",
        "must start with `/`",
    );
}

// === health checks ===

#[test]
fn a_health_check_timeout_must_not_exceed_its_interval() {
    assert_one_error(
        &upstream_with("health_check: { path: /healthz, interval: 2s, timeout: 3s }"),
        "upstreams.u.health_check.timeout",
        "must not exceed the interval",
    );
    // The default timeout (1s) is longer than this interval.
    assert_one_error(
        &upstream_with("health_check: { path: /healthz, interval: 500ms }"),
        "upstreams.u.health_check.timeout",
        "must not exceed the interval",
    );
    parse(&upstream_with(
        "health_check: { path: /healthz, interval: 3s, timeout: 3s }",
    ));
}

#[test]
fn health_check_fields_are_checked() {
    assert_one_error(
        &upstream_with("health_check: { path: healthz }"),
        "upstreams.u.health_check.path",
        "must start with `/`",
    );
    assert_one_error(
        &upstream_with("health_check: { path: /h, unhealthy_threshold: 0 }"),
        "upstreams.u.health_check",
        "thresholds must be at least 1",
    );
    assert_one_error(
        &upstream_with("health_check: { path: /h, expected_statuses: [200, 99] }"),
        "upstreams.u.health_check.expected_statuses[1]",
        "must be an HTTP status",
    );
}

// === exactly one of ===

#[test]
fn a_path_match_sets_exactly_one_kind() {
    for path in [
        "{}",
        "{ exact: /a, prefix: /a }",
        "{ prefix: /a, template: \"/a/{id}\" }",
    ] {
        assert_one_error(
            &route_with(&format!("match: {{ path: {path} }}")),
            "routes.r.match.path",
            "set exactly one of `exact`, `prefix` or `template`",
        );
    }
    assert_one_error(
        &route_with("match: { path: { exact: a } }"),
        "routes.r.match.path.exact",
        "must start with `/`",
    );
}

#[test]
fn a_header_condition_sets_exactly_one_test() {
    for condition in [
        "{ name: x-a }",
        "{ name: x-a, exact: \"1\", present: true }",
        "{ name: x-a, prefix: a, exact: ab }",
    ] {
        assert_one_error(
            &route_with(&format!(
                "match:\n  path: {{ prefix: / }}\n  headers: [ {{ name: x-ok, present: false }}, {condition} ]"
            )),
            "routes.r.match.headers[1]",
            "needs exactly one of `exact`, `prefix` or `present`",
        );
    }
}

#[test]
fn hosts_are_names_or_wildcards_without_ports() {
    parse(&route_with(
        "match: { hosts: [api.example.com, \"*.example.com\", localhost], path: { prefix: / } }",
    ));
    for bad in [
        "api.example.com:8080",
        "*",
        "a..b",
        "*.*.example.com",
        "example.com.",
    ] {
        assert_one_error(
            &route_with(&format!(
                "match: {{ hosts: [\"{bad}\"], path: {{ prefix: / }} }}"
            )),
            "routes.r.match.hosts[0]",
            "is not a host name",
        );
    }
}

#[test]
fn retry_statuses_may_be_written_as_numbers() {
    let spec = Spec::from_yaml(
        "upstreams:\n  u:\n    endpoints: [{ address: \"127.0.0.1:1\" }]\n    retries: { on: [503, \"502\", timeout] }\n",
    )
    .expect("numbers and strings both parse");
    assert_eq!(
        spec.upstreams["u"].retries.on,
        [RetryOn::Status503, RetryOn::Status502, RetryOn::Timeout]
    );
    let errors = Spec::from_yaml(
        "upstreams:\n  u:\n    endpoints: [{ address: \"127.0.0.1:1\" }]\n    retries: { on: [500] }\n",
    )
    .expect_err("500 is not a retry condition");
    assert!(
        errors
            .to_string()
            .contains("use connect_failure, timeout, 502 or 503"),
        "{errors}"
    );
}

#[test]
fn names_starting_with_an_underscore_are_reserved() {
    let errors = Spec::from_yaml(
        "upstreams:\n  _u: { endpoints: [{ address: \"127.0.0.1:1\" }] }\n  u: { endpoints: [{ address: \"127.0.0.1:1\" }] }\nroutes:\n  _none: { match: { path: { prefix: / } }, upstream: u }\n",
    )
    .expect_err("reserved names");
    let text = errors.to_string();
    assert!(
        text.contains("upstreams._u: names starting with `_` are reserved"),
        "{text}"
    );
    assert!(
        text.contains("routes._none: names starting with `_` are reserved"),
        "{text}"
    );
}

// === quotas ===

fn with_quota(quota: &str) -> String {
    format!(
        "{}quotas:\n  q:\n{}",
        route_with("match: { path: { prefix: / } }\n"),
        indent(quota, 4)
    )
}

#[test]
fn a_quota_parses_with_its_defaults() {
    let spec = parse(&with_quota(
        "scope: key\nlimit: 1000\nwindow: second\nroutes: [r]",
    ));
    let q = &spec.quotas["q"];
    assert_eq!(
        (q.scope, q.limit, q.window),
        (QuotaScope::Key, 1000, QuotaWindow::Second)
    );
    assert_eq!(q.algorithm(), QuotaAlgorithm::Gcra);
    assert_eq!((q.fail, q.per), (FailMode::Open, QuotaPer::Global));
    let day = parse(&with_quota(
        "scope: tenant\nlimit: 10000\nwindow: day\nfail: closed\nper: region",
    ));
    assert_eq!(day.quotas["q"].algorithm(), QuotaAlgorithm::Window);
    assert_eq!(q.burst(), 100, "a tenth of the limit");
    let minute = parse(&with_quota("scope: key\nlimit: 10\nwindow: minute"));
    assert_eq!(minute.quotas["q"].algorithm(), QuotaAlgorithm::Window);
}

#[test]
fn bad_quotas_are_refused_at_their_field() {
    assert_one_error(
        &with_quota("scope: key\nlimit: 0\nwindow: second"),
        "quotas.q.limit",
        "at least 1",
    );
    assert_one_error(
        &with_quota("scope: key\nlimit: -5\nwindow: second"),
        "quotas.q.limit",
        "at least 1",
    );
    assert_one_error(
        &with_quota("scope: key\nlimit: 10\nwindow: fortnight"),
        "quotas.q.window",
        "unknown variant",
    );
    assert_one_error(
        &with_quota("scope: everyone\nlimit: 10\nwindow: second"),
        "quotas.q.scope",
        "unknown variant",
    );
    assert_one_error(
        &with_quota("scope: key\nlimit: 10\nwindow: second\nroutes: [nowhere]"),
        "quotas.q.routes[0]",
        "no route named",
    );
    assert_one_error(
        &with_quota("scope: key\nlimit: 10\nwindow: month\nalgorithm: gcra"),
        "quotas.q.algorithm",
        "use `window`",
    );
    assert_one_error(
        &with_quota("scope: key\nlimit: 10\nwindow: second\nburst: 50"),
        "quotas.q.burst",
        "between 1 and the limit",
    );
    assert_one_error(
        &with_quota("scope: key\nlimit: 10\nwindow: hour\nburst: 5"),
        "quotas.q.burst",
        "applies to gcra",
    );
    assert_one_error(
        &with_quota("scope: key\nlimit: 10\nwindow: second\ncolor: red"),
        "quotas.q.color",
        "unknown field",
    );
}

// === circuit breakers ===

#[test]
fn a_circuit_breaker_parses_with_its_defaults() {
    let spec = parse(&upstream_with("circuit_breaker: {}"));
    let c = spec.upstreams["u"].circuit_breaker.as_ref().unwrap();
    assert_eq!(
        (c.consecutive_failures, c.min_calls, c.half_open_probes),
        (20, 20, 3)
    );
    assert_eq!((c.failure_rate, c.slow_call_rate), (50.0, 100.0));
    assert_eq!(c.open_for, std::time::Duration::from_secs(30));
    assert!(c.slow_call.is_none() && c.fallback.is_none());
    let spec = parse(&upstream_with(
        "circuit_breaker:\n  slow_call: 2s\n  fallback: { status: 200, body: '[]' }",
    ));
    let c = spec.upstreams["u"].circuit_breaker.as_ref().unwrap();
    assert_eq!(c.slow_call, Some(std::time::Duration::from_secs(2)));
    let f = c.fallback.as_ref().unwrap();
    assert_eq!(
        (f.status, f.body.as_str(), f.content_type.as_str()),
        (200, "[]", "application/json")
    );
}

#[test]
fn bad_circuit_breakers_are_refused_at_their_field() {
    let at = "upstreams.u.circuit_breaker";
    assert_one_error(
        &upstream_with("circuit_breaker: { failure_rate: 0 }"),
        &format!("{at}.failure_rate"),
        "percentage",
    );
    assert_one_error(
        &upstream_with("circuit_breaker: { slow_call_rate: 150 }"),
        &format!("{at}.slow_call_rate"),
        "percentage",
    );
    assert_one_error(
        &upstream_with("circuit_breaker: { half_open_probes: 0 }"),
        &format!("{at}.half_open_probes"),
        "between 1 and 1000",
    );
    assert_one_error(
        &upstream_with("circuit_breaker: { consecutive_failures: 0 }"),
        &format!("{at}.consecutive_failures"),
        "at least 1",
    );
    assert_one_error(
        &upstream_with("circuit_breaker: { window: 2h }"),
        &format!("{at}.window"),
        "between 1s and 1h",
    );
    assert_one_error(
        &upstream_with("circuit_breaker: { fallback: { status: 99 } }"),
        &format!("{at}.fallback.status"),
        "HTTP status",
    );
    assert_one_error(
        &upstream_with("circuit_breaker: { open_for: soon }"),
        &format!("{at}.open_for"),
        "invalid duration",
    );
}

#[test]
fn deep_nesting_is_refused_before_parsing_and_fast() {
    let started = std::time::Instant::now();
    let flow = format!("routes: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let e = parse_yaml(&flow).unwrap_err().to_string();
    assert!(e.contains("nest deeper than 64"), "{e}");
    let maps = format!("routes: {}x{}", "{a: ".repeat(100_000), "}".repeat(100_000));
    assert!(parse_yaml(&maps).is_err());
    let mut block = String::new();
    for i in 0..200 {
        block.push_str(&" ".repeat(i));
        block.push_str("a:\n");
    }
    let e = parse_yaml(&block).unwrap_err().to_string();
    assert!(e.contains("line 65"), "{e}");
    let dashes = format!("routes:\n  {}x\n", "- ".repeat(100));
    assert!(parse_yaml(&dashes).is_err());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // What real specs look like passes: every example of the docs, and brackets or `#`
    // inside quotes or comments.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        check_nesting(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    check_nesting("a: \"[[[[\" # {{{{\nb: '{'\n").unwrap();
}

#[test]
fn endpoint_addresses_take_a_scheme_and_its_port() {
    use crate::state::spec::Scheme;
    let split = EndpointSpec::split_address;
    assert_eq!(
        split("https://api.example.com"),
        ("api.example.com:443".into(), Some(Scheme::Https))
    );
    assert_eq!(
        split("https://api.example.com:8443/"),
        ("api.example.com:8443".into(), Some(Scheme::Https))
    );
    assert_eq!(
        split("http://10.0.0.1"),
        ("10.0.0.1:80".into(), Some(Scheme::Http))
    );
    assert_eq!(
        split("https://[::1]"),
        ("[::1]:443".into(), Some(Scheme::Https))
    );
    assert_eq!(
        split("https://[::1]:9443"),
        ("[::1]:9443".into(), Some(Scheme::Https))
    );
    assert_eq!(split("10.0.0.1:80"), ("10.0.0.1:80".into(), None));
}

#[test]
fn mixed_schemes_and_bad_tls_blocks_are_refused() {
    let errs = Spec::from_yaml(
        "upstreams:\n  u:\n    endpoints: [{ address: \"https://127.0.0.1:1\" }, { address: \"127.0.0.1:2\" }]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(errs.contains("upstreams.u.endpoints"), "{errs}");
    let errs = Spec::from_yaml(
        "upstreams:\n  u:\n    endpoints: [{ address: \"http://127.0.0.1:1\" }]\n    tls: { ca: nope, server_name: \"a b\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(errs.contains("an http:// endpoint"), "{errs}");
    assert!(errs.contains("upstreams.u.tls.ca"), "{errs}");
    assert!(errs.contains("upstreams.u.tls.server_name"), "{errs}");
}
