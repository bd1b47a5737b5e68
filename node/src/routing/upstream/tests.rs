use super::*;

use crate::state::spec::Spec;

// === helpers ===

/// An upstream spec with one endpoint per weight (`127.0.0.1:9000`, `:9001`, ...) and
/// `extra` YAML (flow style, one field per line) under it, checked by the spec parser.
fn upstream(weights: &[u32], extra: &str) -> UpstreamSpec {
    let endpoints: String = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "      - {{ address: \"127.0.0.1:{}\", weight: {w} }}\n",
                9000 + i
            )
        })
        .collect();
    let extra: String = extra.lines().map(|l| format!("    {l}\n")).collect();
    let yaml = format!("upstreams:\n  u:\n    endpoints:\n{endpoints}{extra}");
    let mut spec = match Spec::from_yaml(&yaml) {
        Ok(spec) => spec,
        Err(errors) => panic!("the test upstream should be valid, but {errors}\n{yaml}"),
    };
    spec.upstreams
        .remove("u")
        .expect("the spec defines upstream `u`")
}

/// A cluster named `u` with its own fresh registry.
fn cluster(weights: &[u32], extra: &str) -> Arc<Cluster> {
    Arc::new(Cluster::build(
        "u",
        &upstream(weights, extra),
        &EndpointRegistry::default(),
    ))
}

/// Picks `n` times without a hash key or anything to avoid.
fn picks(c: &Cluster, n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| c.select(None, &[]).expect("an endpoint is available"))
        .collect()
}

fn counts(picks: &[usize], endpoints: usize) -> Vec<usize> {
    let mut out = vec![0; endpoints];
    for &i in picks {
        out[i] += 1;
    }
    out
}

/// The longest run of the same endpoint in a row.
fn longest_run(picks: &[usize], endpoint: usize) -> usize {
    picks
        .split(|&i| i != endpoint)
        .map(<[usize]>::len)
        .max()
        .unwrap_or(0)
}

fn set_healthy(c: &Cluster, endpoint: usize, healthy: bool) {
    c.endpoints[endpoint]
        .state
        .healthy
        .store(healthy, Ordering::Relaxed);
}

fn set_in_flight(c: &Cluster, in_flight: &[usize]) {
    for (e, n) in c.endpoints.iter().zip(in_flight) {
        e.state.in_flight.store(*n, Ordering::Relaxed);
    }
}

fn is_ejected(c: &Cluster, endpoint: usize) -> bool {
    c.endpoints[endpoint].state.is_ejected(now_ms())
}

/// Fails an endpoint `n` times and returns how many of those failures ejected it.
fn fail(c: &Cluster, endpoint: usize, n: usize) -> usize {
    (0..n).filter(|_| c.record_outcome(endpoint, true)).count()
}

// === round robin ===

#[test]
fn round_robin_gives_exact_proportions_over_one_period() {
    for weights in [
        vec![1, 1, 1],
        vec![3, 2, 1],
        vec![5, 1, 1],
        vec![1, 4],
        vec![7],
    ] {
        let c = cluster(&weights, "");
        let period: u32 = weights.iter().sum();
        let got = counts(&picks(&c, period as usize), weights.len());
        let expect: Vec<usize> = weights.iter().map(|w| *w as usize).collect();
        assert_eq!(got, expect, "weights {weights:?}");
        // And again over several periods.
        let got = counts(&picks(&c, 3 * period as usize), weights.len());
        let expect: Vec<usize> = expect.iter().map(|n| 3 * n).collect();
        assert_eq!(got, expect, "weights {weights:?}, three periods");
    }
}

#[test]
fn round_robin_reduces_weights_by_their_common_divisor() {
    let c = cluster(&[20, 10], "");
    assert_eq!(c.schedule.len(), 3);
    assert_eq!(counts(&picks(&c, 3), 2), [2, 1]);
}

#[test]
fn round_robin_interleaves_heavy_endpoints() {
    let c = cluster(&[5, 1, 1], "");
    let seq = picks(&c, 7 * 4);
    // Never five in a row for the heavy endpoint, even across period boundaries.
    assert!(longest_run(&seq, 0) < 5, "{seq:?}");
    // Every window of one period holds each light endpoint exactly once.
    for window in seq.windows(7) {
        assert_eq!(counts(window, 3), [5, 1, 1], "{window:?} in {seq:?}");
    }
}

#[test]
fn equal_weights_take_turns() {
    let c = cluster(&[2, 2, 2], "");
    let seq = picks(&c, 9);
    for window in seq.windows(3) {
        assert_eq!(counts(window, 3), [1, 1, 1], "{seq:?}");
    }
}

// Weights are scaled down when their sum passes the schedule's length, and every
// endpoint keeps a place in the schedule (10000, 10000, 1, 1 once left the last two out).
#[test]
fn every_endpoint_is_in_the_round_robin_schedule() {
    let c = cluster(&[10_000, 10_000, 1, 1], "");
    for i in 0..3 {
        set_healthy(&c, i, false);
    }
    assert_eq!(c.select(None, &[]), Some(3), "the only healthy endpoint");
    for i in 0..c.endpoints.len() {
        let in_schedule = c.schedule.iter().any(|&e| e as usize == i);
        assert!(in_schedule, "endpoint {i} never gets a turn");
    }
}

// === availability ===

#[test]
fn select_skips_unhealthy_endpoints() {
    let c = cluster(&[1, 1, 1], "");
    set_healthy(&c, 1, false);
    let seq = picks(&c, 30);
    let n = counts(&seq, 3);
    assert!(n[1] == 0 && n[0] > 0 && n[2] > 0, "{n:?} from {seq:?}");

    set_healthy(&c, 0, false);
    assert!(picks(&c, 5).iter().all(|&i| i == 2));

    set_healthy(&c, 2, false);
    assert_eq!(c.select(None, &[]), None);
    assert_eq!(c.select(Some(b"key"), &[0]), None);

    set_healthy(&c, 1, true);
    assert_eq!(c.select(None, &[]), Some(1));
}

#[test]
fn avoid_is_honoured_when_another_endpoint_is_available() {
    let c = cluster(&[1, 1, 1], "");
    for _ in 0..10 {
        let pick = c.select(None, &[0]).expect("endpoints 1 and 2 are up");
        assert_ne!(pick, 0);
    }
    for _ in 0..10 {
        assert_eq!(c.select(None, &[0, 2]), Some(1));
    }
    set_healthy(&c, 1, false);
    for _ in 0..10 {
        assert_eq!(c.select(None, &[0]), Some(2));
    }
}

#[test]
fn avoid_is_ignored_when_nothing_else_is_available() {
    let single = cluster(&[1], "");
    assert_eq!(single.select(None, &[0]), Some(0));

    let c = cluster(&[1, 1, 1], "");
    // Everything avoided: any available endpoint is better than none.
    assert!(c.select(None, &[0, 1, 2]).is_some());
    // The only available endpoint is the avoided one.
    set_healthy(&c, 1, false);
    set_healthy(&c, 2, false);
    for _ in 0..5 {
        assert_eq!(c.select(None, &[0]), Some(0));
    }
}

// === least request ===

#[test]
fn least_request_picks_the_least_loaded_endpoint() {
    let c = cluster(&[1, 1, 1], "load_balancing: { policy: least_request }");
    set_in_flight(&c, &[3, 0, 2]);
    for _ in 0..6 {
        assert_eq!(c.select(None, &[]), Some(1));
    }
    set_in_flight(&c, &[3, 4, 2]);
    for _ in 0..6 {
        assert_eq!(c.select(None, &[]), Some(2));
    }
}

#[test]
fn least_request_weighs_load_by_endpoint_weight() {
    let c = cluster(&[3, 1], "load_balancing: { policy: least_request }");
    // Endpoint 0 has more requests in flight but three times the weight.
    set_in_flight(&c, &[2, 1]);
    for _ in 0..4 {
        assert_eq!(c.select(None, &[]), Some(0));
    }
    set_in_flight(&c, &[6, 1]);
    for _ in 0..4 {
        assert_eq!(c.select(None, &[]), Some(1));
    }
}

#[test]
fn least_request_skips_unavailable_and_avoided_endpoints() {
    let c = cluster(&[1, 1, 1], "load_balancing: { policy: least_request }");
    set_in_flight(&c, &[5, 0, 3]);
    set_healthy(&c, 1, false);
    assert_eq!(c.select(None, &[]), Some(2));
    assert_eq!(c.select(None, &[2]), Some(0));
}

#[test]
fn least_request_spreads_ties() {
    let c = cluster(&[1, 1, 1], "load_balancing: { policy: least_request }");
    assert_eq!(counts(&picks(&c, 9), 3), [3, 3, 3]);
}

// === consistent hash ===

const HASHED: &str = "load_balancing: { policy: consistent_hash, hash_header: x-user }";

fn keys() -> Vec<String> {
    (0..2_000).map(|k| format!("user-{k}")).collect()
}

fn placement(c: &Cluster, keys: &[String]) -> Vec<usize> {
    keys.iter()
        .map(|k| {
            c.select(Some(k.as_bytes()), &[])
                .expect("an endpoint is available")
        })
        .collect()
}

#[test]
fn consistent_hash_maps_a_key_to_the_same_endpoint() {
    let c = cluster(&[1, 1, 1, 1, 1], HASHED);
    assert_eq!(c.hash_header, Some(http::HeaderName::from_static("x-user")));
    let keys = keys();
    let first = placement(&c, &keys);
    assert_eq!(placement(&c, &keys), first, "same cluster, second pass");
    // The ring depends only on the endpoints, so a rebuilt cluster agrees.
    let rebuilt = cluster(&[1, 1, 1, 1, 1], HASHED);
    assert_eq!(placement(&rebuilt, &keys), first, "rebuilt cluster");
    // Every endpoint takes a fair share (400 each on average).
    for (i, n) in counts(&first, 5).into_iter().enumerate() {
        assert!(
            (200..=600).contains(&n),
            "endpoint {i} got {n} of 2000 keys"
        );
    }
}

#[test]
fn consistent_hash_moves_only_the_keys_of_an_unhealthy_endpoint() {
    let c = cluster(&[1, 1, 1, 1, 1], HASHED);
    let keys = keys();
    let before = placement(&c, &keys);
    set_healthy(&c, 2, false);
    let after = placement(&c, &keys);

    let mut moved = 0;
    for ((key, b), a) in keys.iter().zip(&before).zip(&after) {
        if *b == 2 {
            assert_ne!(*a, 2, "{key} still goes to the unhealthy endpoint");
            moved += 1;
        } else {
            assert_eq!(a, b, "{key} moved although its endpoint is healthy");
        }
    }
    assert!(moved > 0 && moved < keys.len() / 2, "{moved} keys moved");
    // The moved keys are spread over the others, not dumped on one.
    let moved_to = counts(
        &after
            .iter()
            .zip(&before)
            .filter(|(_, b)| **b == 2)
            .map(|(a, _)| *a)
            .collect::<Vec<_>>(),
        5,
    );
    assert!(
        moved_to.iter().filter(|n| **n > 0).count() >= 2,
        "{moved_to:?}"
    );

    set_healthy(&c, 2, true);
    assert_eq!(placement(&c, &keys), before, "keys return when it recovers");
}

#[test]
fn consistent_hash_without_a_key_balances_round_robin() {
    let c = cluster(&[1, 1], HASHED);
    assert_eq!(counts(&picks(&c, 4), 2), [2, 2]);
}

// === retry budget ===

#[test]
fn an_empty_retry_budget_refuses_every_retry() {
    let c = cluster(
        &[1],
        "retries: { budget: { percent: 0, min_concurrency: 0 } }",
    );
    assert!(c.try_begin_retry().is_none());
    let _requests: Vec<ActiveGuard> = (0..100).map(|_| c.begin_request()).collect();
    assert!(c.try_begin_retry().is_none());
}

#[test]
fn min_concurrency_retries_are_always_allowed() {
    let c = cluster(
        &[1],
        "retries: { budget: { percent: 0, min_concurrency: 2 } }",
    );
    let first = c.try_begin_retry().expect("first retry fits the budget");
    let second = c.try_begin_retry().expect("second retry fits the budget");
    assert!(c.try_begin_retry().is_none(), "a third retry is refused");
    assert!(c.try_begin_retry().is_none(), "refusals do not leak places");
    drop(first);
    let third = c.try_begin_retry().expect("dropping a guard frees a place");
    assert!(c.try_begin_retry().is_none());
    drop((second, third));
    assert_eq!(c.active_retries.load(Ordering::Relaxed), 0);
}

#[test]
fn the_retry_budget_grows_with_requests_in_flight() {
    let c = cluster(
        &[1],
        "retries: { budget: { percent: 50, min_concurrency: 0 } }",
    );
    let mut requests: Vec<ActiveGuard> = (0..4).map(|_| c.begin_request()).collect();
    let retries: Vec<ActiveGuard> = std::iter::from_fn(|| c.try_begin_retry())
        .take(10)
        .collect();
    assert_eq!(retries.len(), 2, "50% of 4 requests in flight");
    drop(retries);
    requests.truncate(2);
    let retries: Vec<ActiveGuard> = std::iter::from_fn(|| c.try_begin_retry())
        .take(10)
        .collect();
    assert_eq!(retries.len(), 1, "50% of 2 requests in flight");
    drop(retries);
    drop(requests);
    assert_eq!(c.active_requests.load(Ordering::Relaxed), 0);
}

// === outlier ejection ===

#[test]
fn consecutive_failures_eject_an_endpoint_once() {
    let c = cluster(
        &[1, 1],
        "outlier_detection: { consecutive_failures: 3, max_ejection_percent: 100 }",
    );
    assert!(!c.record_outcome(0, true));
    assert!(!c.record_outcome(0, true));
    assert!(!is_ejected(&c, 0));
    assert!(c.record_outcome(0, true), "the third failure ejects");
    assert!(is_ejected(&c, 0));
    assert_eq!(
        fail(&c, 0, 10),
        0,
        "an ejected endpoint is not ejected again"
    );
    assert!(!is_ejected(&c, 1));
    assert!(picks(&c, 10).iter().all(|&i| i == 1));
}

#[test]
fn a_success_resets_the_failure_count() {
    let c = cluster(
        &[1, 1],
        "outlier_detection: { consecutive_failures: 3, max_ejection_percent: 100 }",
    );
    assert_eq!(fail(&c, 0, 2), 0);
    assert!(!c.record_outcome(0, false));
    assert_eq!(fail(&c, 0, 2), 0);
    assert!(!is_ejected(&c, 0));
    assert_eq!(fail(&c, 0, 1), 1);
    assert!(is_ejected(&c, 0));
}

#[test]
fn ejection_lasts_longer_each_time() {
    let c = cluster(
        &[1, 1],
        "outlier_detection: { consecutive_failures: 1, base_ejection_time: 10s, max_ejection_percent: 100 }",
    );
    let state = &c.endpoints[0].state;
    let before = now_ms();
    assert_eq!(fail(&c, 0, 1), 1);
    let until = state.ejected_until.load(Ordering::Relaxed);
    assert!(
        (before + 10_000..=now_ms() + 10_000).contains(&until),
        "{until}"
    );
    // Pretend the ejection ran out.
    state.ejected_until.store(0, Ordering::Relaxed);
    let before = now_ms();
    assert_eq!(fail(&c, 0, 1), 1);
    let until = state.ejected_until.load(Ordering::Relaxed);
    assert!(
        (before + 20_000..=now_ms() + 20_000).contains(&until),
        "{until}"
    );
}

#[test]
fn max_ejection_percent_caps_ejections() {
    let c = cluster(
        &[1, 1, 1, 1],
        "outlier_detection: { consecutive_failures: 2, max_ejection_percent: 50 }",
    );
    let ejected: Vec<usize> = (0..4).map(|i| fail(&c, i, 2)).collect();
    assert_eq!(ejected, [1, 1, 0, 0], "at most half of four endpoints");
    assert!(is_ejected(&c, 0) && is_ejected(&c, 1));
    assert!(!is_ejected(&c, 2) && !is_ejected(&c, 3));
    // Further failures on the spared endpoints still do not eject them.
    assert_eq!(fail(&c, 3, 5), 0);
    assert!(picks(&c, 10).iter().all(|&i| i >= 2));
}

#[test]
fn a_small_max_ejection_percent_still_allows_one_ejection() {
    let c = cluster(
        &[1, 1, 1, 1],
        "outlier_detection: { consecutive_failures: 1, max_ejection_percent: 10 }",
    );
    assert_eq!(fail(&c, 0, 1), 1);
    assert_eq!(fail(&c, 1, 1), 0);

    let none = cluster(
        &[1, 1],
        "outlier_detection: { consecutive_failures: 1, max_ejection_percent: 0 }",
    );
    assert_eq!(fail(&none, 0, 5), 0);
}

#[test]
fn without_outlier_detection_nothing_is_ejected() {
    let c = cluster(&[1, 1], "");
    assert_eq!(fail(&c, 0, 100), 0);
    assert!(!is_ejected(&c, 0));
}

// === registry ===

#[test]
fn the_registry_keeps_endpoint_state_across_builds() {
    let registry = EndpointRegistry::default();
    let first = Cluster::build("u", &upstream(&[1, 1], ""), &registry);
    first.endpoints[0]
        .state
        .in_flight
        .store(7, Ordering::Relaxed);

    // The next spec keeps both endpoints (with new weights) and adds a third.
    let second = Cluster::build("u", &upstream(&[2, 3, 1], ""), &registry);
    for i in 0..2 {
        assert!(
            Arc::ptr_eq(&first.endpoints[i].state, &second.endpoints[i].state),
            "endpoint {i} should keep its state"
        );
    }
    assert_eq!(
        second.endpoints[0].state.in_flight.load(Ordering::Relaxed),
        7
    );
    assert_eq!(
        second.endpoints[2].state.in_flight.load(Ordering::Relaxed),
        0
    );

    // The same address in another cluster is another endpoint.
    let other = Cluster::build("other", &upstream(&[1], ""), &registry);
    assert!(!Arc::ptr_eq(
        &first.endpoints[0].state,
        &other.endpoints[0].state
    ));
}

#[test]
fn cluster_build_copies_the_policies() {
    let c = cluster(
        &[1],
        "timeouts: { connect: 1s, request: 5s, idle: 9s }\npool: { max_idle_per_endpoint: 4 }\nretries: { attempts: 3, on: [\"503\"] }",
    );
    assert_eq!(&*c.name, "u");
    assert_eq!(c.policy, LbPolicy::RoundRobin);
    assert_eq!(c.hash_header, None);
    assert_eq!(c.connect_timeout, Duration::from_secs(1));
    assert_eq!(c.request_timeout, Duration::from_secs(5));
    assert_eq!(c.idle_timeout, Duration::from_secs(9));
    assert_eq!(c.max_idle_per_endpoint, 4);
    assert_eq!(c.retry_attempts, 3);
    assert_eq!(c.retry_on, [RetryOn::Status503]);
    assert_eq!(
        c.endpoints[0].state.addr,
        "127.0.0.1:9000"
            .parse::<SocketAddr>()
            .expect("a literal address")
    );
}

#[test]
fn an_unavailable_endpoints_turns_are_shared_by_the_others() {
    let c = cluster(&[1, 1, 1], "");
    set_healthy(&c, 1, false);
    let seq = picks(&c, 30);
    assert_eq!(counts(&seq, 3), [15, 0, 15], "{seq:?}");
}
