use super::*;

fn counts(requests: u64, bytes: u64) -> UsageCounts {
    UsageCounts {
        requests,
        class_2xx: requests,
        request_bytes: bytes,
        ..UsageCounts::default()
    }
}

fn batch(node_id: u64, journal_id: u64, seq: u64, minute: u64, requests: u64) -> UsageBatch {
    UsageBatch {
        node_id,
        journal_id,
        seq,
        entries: vec![UsageEntry {
            minute,
            tenant: "acme".into(),
            api: "orders".into(),
            version: "1.0.0".into(),
            key: "tg_k1".into(),
            counts: Some(counts(requests, requests * 10)),
            ..UsageEntry::default()
        }],
        latencies: vec![LatencyEntry {
            minute,
            api: "orders".into(),
            version: "1.0.0".into(),
            buckets: [(latency_bucket(1000), requests)].into(),
        }],
        llm: Vec::new(),
    }
}

const NOW: u64 = 30_000_000 * 60_000;

fn total(u: &Usage) -> u64 {
    u.entries(0, u64::MAX)
        .iter()
        .map(|e| e.counts.as_ref().unwrap().requests)
        .sum()
}

#[test]
fn a_retried_batch_is_counted_once() {
    let mut u = Usage::default();
    assert!(u.apply_batch(&batch(1, 7, 1, 30_000_000, 5), NOW));
    assert!(u.apply_batch(&batch(1, 7, 2, 30_000_000, 3), NOW));
    // The answer to seq 2 was lost and it was sent again; seq 1 arrives late again too.
    assert!(!u.apply_batch(&batch(1, 7, 2, 30_000_000, 3), NOW));
    assert!(!u.apply_batch(&batch(1, 7, 1, 30_000_000, 5), NOW));
    assert_eq!(total(&u), 8);
    // Another node's seq 1 is its own.
    assert!(u.apply_batch(&batch(2, 9, 1, 30_000_000, 4), NOW));
    // Node 1's store was wiped: a new journal starts over at 1.
    assert!(u.apply_batch(&batch(1, 8, 1, 30_000_000, 2), NOW));
    assert_eq!(total(&u), 14);
    let h = &u.latencies(0, u64::MAX)[0].buckets;
    assert_eq!(h.values().sum::<u64>(), 14);
}

#[test]
fn old_minutes_fold_into_hours_and_survive_a_snapshot() {
    let mut u = Usage::default();
    let old = 30_000_000 - MINUTE_RETENTION_MINUTES - 200;
    assert!(u.apply_batch(&batch(1, 1, 1, old, 5), NOW - 3 * 86_400_000));
    assert!(u.apply_batch(&batch(1, 1, 2, old + 1, 6), NOW - 3 * 86_400_000));
    assert_eq!(u.minutes.len(), 2);
    assert!(u.apply_batch(&batch(1, 1, 3, 30_000_000, 1), NOW));
    assert_eq!(u.minutes.len(), 1);
    assert_eq!(u.hours.len(), 1, "{:?}", u.hours.keys());
    assert_eq!(total(&u), 12);
    // A late row for a compacted minute goes to its hour.
    assert!(u.apply_batch(&batch(1, 1, 4, old + 2, 1), NOW));
    assert_eq!(u.hours.values().map(|c| c.requests).sum::<u64>(), 12);
    let mut snap = StateSnapshot::default();
    u.to_proto(&mut snap);
    let back = Usage::from_proto(&snap);
    assert_eq!(back, u);
}

#[test]
fn latency_buckets_are_quarter_octaves_and_percentiles_read_from_them() {
    assert_eq!(latency_bucket(0), 0);
    assert_eq!(latency_bucket(1), 0);
    assert_eq!(latency_bucket(1024), 40);
    assert_eq!(latency_bucket(1500), 41);
    assert!(bucket_upper_us(latency_bucket(1500)) >= 1500);
    for us in [16u64, 17, 999, 1000, 65_537, 2_000_000] {
        let b = latency_bucket(us);
        assert!(bucket_upper_us(b) > us, "{us} in {b}");
        assert!(b == 0 || bucket_upper_us(b - 1) <= us, "{us} in {b}");
    }
    let mut h = Histogram::new();
    for us in 1..=100u64 {
        *h.entry(latency_bucket(us * 100)).or_default() += 1;
    }
    let p50 = percentile_us(&h, 0.5).unwrap();
    let p99 = percentile_us(&h, 0.99).unwrap();
    assert!((5_000..=6_500).contains(&p50), "{p50}");
    assert!((9_900..=12_500).contains(&p99), "{p99}");
    assert_eq!(percentile_us(&Histogram::new(), 0.5), None);
}
