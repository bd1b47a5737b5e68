//! Route matching cost at 10, 1,000 and 10,000 routes (target: under 1 µs at 10,000).
//!
//! The tables mix exact paths, templates and prefixes over a few hosts, like a gateway
//! fronting many services. Each iteration looks up one request; the request set cycles
//! through hits on every kind of route and a miss.
//!
//! `cargo bench --bench route_match`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use tollgate_node::routing::matcher::{Matcher, PathMatch, RouteMatch};

fn routes(n: usize) -> Vec<RouteMatch> {
    (0..n)
        .map(|i| {
            let svc = i / 4;
            let (path, hosts) = match i % 4 {
                0 => (PathMatch::Prefix(format!("/svc{svc}")), vec![]),
                1 => (
                    PathMatch::Template(format!("/svc{svc}/items/{{id}}")),
                    vec![],
                ),
                2 => (PathMatch::Exact(format!("/svc{svc}/health")), vec![]),
                _ => (
                    PathMatch::Prefix(format!("/svc{svc}/admin")),
                    vec![format!("tenant{}.example.com", svc % 50)],
                ),
            };
            RouteMatch {
                id: i as u32,
                name: format!("r{i}"),
                hosts,
                path,
                methods: if i % 3 == 0 {
                    vec![Method::GET]
                } else {
                    vec![]
                },
                headers: vec![],
                priority: 0,
            }
        })
        .collect()
}

/// The naive alternative: test every route in order (what a spec-order router does).
fn scan<'a>(routes: &'a [RouteMatch], path: &str) -> Option<&'a RouteMatch> {
    routes.iter().find(|r| match &r.path {
        PathMatch::Exact(p) => p == path,
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Template(_) => false,
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_match");
    let headers = HeaderMap::new();
    for n in [10usize, 1_000, 10_000] {
        let rs = routes(n);
        let matcher = Matcher::build(&rs).expect("routes compile");
        let last = n / 4 - 1;
        let requests: Vec<(String, String)> = vec![
            ("api.example.com".into(), format!("/svc{last}/items/42")),
            ("api.example.com".into(), format!("/svc{last}/health")),
            (
                "api.example.com".into(),
                format!("/svc{last}/orders/7/lines"),
            ),
            (
                format!("tenant{}.example.com", last % 50),
                format!("/svc{last}/admin/users"),
            ),
            ("api.example.com".into(), "/nowhere/at/all".into()),
        ];
        // Every request above must resolve as intended, or the numbers mean nothing.
        assert!(
            matcher
                .lookup(&requests[0].0, &Method::GET, &requests[0].1, &headers)
                .is_some()
        );
        assert!(
            matcher
                .lookup(&requests[4].0, &Method::GET, &requests[4].1, &headers)
                .is_none()
        );
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("matcher", n), &n, |b, _| {
            b.iter(|| {
                let (host, path) = &requests[i % requests.len()];
                i += 1;
                black_box(matcher.lookup(black_box(host), &Method::GET, black_box(path), &headers))
            })
        });
        if n <= 1_000 {
            let mut i = 0usize;
            group.bench_with_input(BenchmarkId::new("linear_scan", n), &n, |b, _| {
                b.iter(|| {
                    let (_, path) = &requests[i % requests.len()];
                    i += 1;
                    black_box(scan(&rs, black_box(path)))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
