use super::*;

fn sample<'a>(
    tenant: &'a Arc<str>,
    api: &'a Arc<str>,
    version: &'a Arc<str>,
    key: &'a Arc<str>,
    status: u16,
) -> Sample<'a> {
    Sample {
        minute: 100,
        tenant: Some(tenant),
        api: Some(api),
        version: Some(version),
        key: Some(key),
        status,
        refused: status == 429,
        request_bytes: 10,
        response_bytes: 100,
        upstream_us: if status == 429 { 0 } else { 500 },
        latency_us: 1_000,
        error: (status == 429).then_some("quota_exceeded"),
        cost_nanos: None,
        llm: None,
    }
}

#[test]
fn threads_count_apart_and_drain_merged_by_row() {
    let meter = Meter::default();
    let (a, b) = (meter.shard(), meter.shard());
    let acme: Arc<str> = "acme".into();
    let globex: Arc<str> = "globex".into();
    let orders: Arc<str> = "orders".into();
    let v1: Arc<str> = "1.0.0".into();
    let k1: Arc<str> = "tg_1".into();
    let k2: Arc<str> = "tg_2".into();
    for status in [200, 200, 503, 429] {
        a.lock()
            .unwrap()
            .record(&sample(&acme, &orders, &v1, &k1, status));
    }
    b.lock()
        .unwrap()
        .record(&sample(&acme, &orders, &v1, &k1, 201));
    b.lock()
        .unwrap()
        .record(&sample(&globex, &orders, &v1, &k2, 404));
    // A request outside any API: no tenant, version or key.
    b.lock().unwrap().record(&Sample {
        tenant: None,
        version: None,
        key: None,
        ..sample(&acme, &orders, &v1, &k1, 200)
    });
    let crate::metering::Drained {
        entries, latencies, ..
    } = meter.drain();
    assert_eq!(entries.len(), 3);
    let acme_row = entries
        .iter()
        .find(|e| e.tenant == "acme")
        .and_then(|e| e.counts.clone())
        .unwrap();
    assert_eq!(acme_row.requests, 5);
    assert_eq!(acme_row.class_2xx, 3);
    assert_eq!(acme_row.class_4xx, 1);
    assert_eq!(acme_row.class_5xx, 1);
    assert_eq!(acme_row.refused, 1);
    assert_eq!(acme_row.request_bytes, 50);
    assert_eq!(acme_row.response_bytes, 500);
    assert_eq!(acme_row.upstream_us, 2_000);
    // Errors by kind: the gateway's code, else the upstream's status.
    assert_eq!(
        acme_row.errors,
        [
            ("quota_exceeded".to_string(), 1),
            ("status_503".to_string(), 1)
        ]
        .into()
    );
    // Each row's own latency: five requests of 1 ms.
    assert_eq!(acme_row.latency.values().sum::<u64>(), 5);
    let anonymous = entries.iter().find(|e| e.tenant.is_empty()).unwrap();
    assert_eq!(
        (anonymous.version.as_str(), anonymous.key.as_str()),
        ("", "")
    );
    // One histogram per (minute, api, version): the anonymous request has no version.
    assert_eq!(latencies.len(), 2);
    let total: u64 = latencies.iter().flat_map(|l| l.buckets.values()).sum();
    assert_eq!(total, 7);
    // Drained: the next drain starts from zero.
    assert_eq!(meter.drain().entries.len(), 0);
}

#[test]
fn budget_spend_is_settled_only_once_its_batch_is_applied_here() {
    let spend = Spend::default();
    let acme: Arc<str> = Arc::from("acme");
    spend.record(&acme, 5);
    spend.journaled(Some(3));
    // Recorded after that drain: its row is in a later batch.
    spend.record(&acme, 7);
    spend.journaled(Some(4));
    spend.shipped(3, 100);
    assert!(spend.settle(99).is_empty());
    assert_eq!(spend.settle(100).get("acme"), Some(&5));
    assert!(spend.settle(1_000).is_empty(), "batch 4 is not shipped yet");
    spend.shipped(4, 101);
    assert_eq!(spend.settle(101).get("acme"), Some(&7));
    // A cost whose row went in a batch already shipped settles at the last index.
    spend.record(&acme, 2);
    spend.journaled(None);
    assert_eq!(spend.settle(101).get("acme"), Some(&2));
}
