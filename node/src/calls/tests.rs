use std::time::Duration;

use tollgate_proto::node::v1::{CallQuery, CallRecord};

use super::*;

pub(super) fn record(i: u64, time_us: u64) -> CallRecord {
    CallRecord {
        time_us,
        node_id: 1,
        request_id: format!("{:032x}", 0x1000 + i),
        trace_id: if i.is_multiple_of(10) {
            format!("{:032x}", 0xabc0_0000 + i / 100)
        } else {
            String::new()
        },
        tenant: ["acme", "globex"][(i % 2) as usize].into(),
        api: "orders".into(),
        version: ["1.0.0", "1.1.0"][i.is_multiple_of(3) as usize].into(),
        key_id: format!("k{}", i % 4),
        method: "GET".into(),
        path: format!("/orders/{i}"),
        status: if i.is_multiple_of(7) { 503 } else { 200 },
        duration_us: (i * 7919) % 100_000,
        ..Default::default()
    }
}

/// Records encoded as a data-plane thread hands them over.
fn batch<'a>(records: impl IntoIterator<Item = &'a CallRecord>) -> Batch {
    let mut b = Batch::default();
    for r in records {
        b.push_record(r);
    }
    b
}

fn open(dir: &std::path::Path) -> Arc<CallLog> {
    CallLog::open(dir, 1, &CallLogSettings::default()).unwrap()
}

fn query(log: &CallLog, q: CallQuery) -> CallQueryResponse {
    log.query(&q).unwrap()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tollgate-calls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// 20,000 records over the last ten minutes, handed over as data-plane threads do.
fn filled(name: &str) -> (Arc<CallLog>, Vec<CallRecord>, std::path::PathBuf) {
    let dir = tmp(name);
    let log = open(&dir);
    let now = now_us();
    let start = now - 600_000_000;
    let all: Vec<CallRecord> = (0..20_000u64)
        .map(|i| record(i, start + i * 30_000))
        .collect();
    for part in all.chunks(100) {
        log.hand_over(batch(part));
        // The writer keeps up in this test: nothing is dropped.
        assert!(log.wait_written(Duration::from_secs(10)));
    }
    assert_eq!(log.dropped(), 0);
    (log, all, dir)
}

#[test]
fn filters_pick_the_newest_matching_records() {
    let (log, all, dir) = filled("filters");
    let r = query(
        &log,
        CallQuery {
            api: "orders".into(),
            tenant: "acme".into(),
            status: "5xx".into(),
            min_duration_us: 50_000,
            limit: 25,
            ..Default::default()
        },
    );
    let want: Vec<&CallRecord> = all
        .iter()
        .rev()
        .filter(|r| r.tenant == "acme" && r.status >= 500 && r.duration_us >= 50_000)
        .take(25)
        .collect();
    let got: Vec<&str> = r.records.iter().map(|r| r.request_id.as_str()).collect();
    let want: Vec<&str> = want.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(got, want);
    let r = query(
        &log,
        CallQuery {
            status: "404".into(),
            ..Default::default()
        },
    );
    assert!(r.records.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ids_are_found_before_and_after_their_block_is_stored() {
    let (log, all, dir) = filled("ids");
    let by_request = |id: &str| {
        query(
            &log,
            CallQuery {
                request_id: id.into(),
                ..Default::default()
            },
        )
        .records
    };
    let wanted = &all[12_345];
    let got = by_request(&wanted.request_id);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, wanted.path);
    // Ten records share each trace id here.
    let trace = all[5_000].trace_id.clone();
    let r = query(
        &log,
        CallQuery {
            trace_id: trace.clone(),
            ..Default::default()
        },
    );
    assert_eq!(r.records.len(), 10);
    assert!(r.records.iter().all(|r| r.trace_id == trace));
    // Stored as a block, then asked again.
    log.close();
    let got = by_request(&wanted.request_id);
    assert_eq!(got.len(), 1);
    drop(log);
    // And after a restart.
    let log = open(&dir);
    let got = query(
        &log,
        CallQuery {
            request_id: all[3].request_id.clone(),
            ..Default::default()
        },
    );
    assert_eq!(got.records.len(), 1);
    assert!(
        log.query(&CallQuery {
            request_id: "not-an-id".into(),
            ..Default::default()
        })
        .is_err_and(|e| e.code() == tonic::Code::InvalidArgument)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_slowest_match_a_full_sort() {
    let (log, all, dir) = filled("slowest");
    let now = now_us();
    for (since, n) in [
        (now - 3_600_000_000, 50),
        (now - 200_000_000, 20),
        (now - 90_000_000, 1000),
    ] {
        let r = query(
            &log,
            CallQuery {
                since_us: since,
                slowest: n,
                ..Default::default()
            },
        );
        let mut want: Vec<&CallRecord> = all.iter().filter(|r| r.time_us >= since).collect();
        want.sort_by_key(|r| std::cmp::Reverse((r.duration_us, r.time_us)));
        let want: Vec<u64> = want
            .iter()
            .take(n as usize)
            .map(|r| r.duration_us)
            .collect();
        let got: Vec<u64> = r.records.iter().map(|r| r.duration_us).collect();
        assert_eq!(got, want, "slowest {n} since {since}");
    }
    // With a filter: a scan, the same answer.
    let r = query(
        &log,
        CallQuery {
            slowest: 10,
            version: "1.1.0".into(),
            ..Default::default()
        },
    );
    let mut want: Vec<&CallRecord> = all.iter().filter(|r| r.version == "1.1.0").collect();
    want.sort_by_key(|r| std::cmp::Reverse((r.duration_us, r.time_us)));
    let got: Vec<u64> = r.records.iter().map(|r| r.duration_us).collect();
    let want: Vec<u64> = want.iter().take(10).map(|r| r.duration_us).collect();
    assert_eq!(got, want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn followers_get_each_new_record_once_and_are_told_what_they_missed() {
    let dir = tmp("follow");
    let log = open(&dir);
    let first = query(
        &log,
        CallQuery {
            follow: true,
            ..Default::default()
        },
    );
    assert!(first.records.is_empty());
    let now = now_us();
    let first_ten: Vec<CallRecord> = (0..10).map(|i| record(i, now + i)).collect();
    log.hand_over(batch(&first_ten));
    assert!(log.wait_written(Duration::from_secs(5)));
    let next = query(
        &log,
        CallQuery {
            follow: true,
            after: first.cursor,
            ..Default::default()
        },
    );
    assert_eq!(next.records.len(), 10);
    assert_eq!(next.missed, 0);
    let again = query(
        &log,
        CallQuery {
            follow: true,
            after: next.cursor,
            ..Default::default()
        },
    );
    assert!(again.records.is_empty());
    // More than the live window between two polls: the rest is counted as missed.
    for c in 0..(LIVE as u64 / 1000 + 2) {
        let records: Vec<CallRecord> = (0..1000)
            .map(|i| record(i, now + 100 + c * 1000 + i))
            .collect();
        log.hand_over(batch(&records));
        assert!(log.wait_written(Duration::from_secs(5)));
    }
    let late = query(
        &log,
        CallQuery {
            follow: true,
            after: next.cursor,
            limit: MAX_LIMIT,
            ..Default::default()
        },
    );
    // Whole chunks leave the window: it keeps at least LIVE records, less than a chunk more.
    let total = (LIVE as u64 / 1000 + 2) * 1000;
    assert!(
        late.missed <= total - LIVE as u64 && late.missed > total - (LIVE + store::CHUNK) as u64,
        "{} missed of {total}",
        late.missed
    );
    assert_eq!(late.records.len(), MAX_LIMIT as usize);
    // The first record returned is the first not missed, and none is skipped after it.
    for (i, r) in late.records.iter().enumerate() {
        assert_eq!(r.time_us, now + 100 + late.missed + i as u64);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ids_and_addresses_print_as_they_should() {
    for id in [
        1u128,
        0xabc,
        u128::MAX,
        0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
    ] {
        assert_eq!(hex_id(id), format!("{id:032x}"));
    }
    let mut r = CallRecord {
        client_ip: vec![10, 0, 0, 7],
        client_port: 4242,
        ..Default::default()
    };
    assert_eq!(client_text(&r), "10.0.0.7:4242");
    r.client_ip = std::net::Ipv6Addr::LOCALHOST.octets().to_vec();
    assert_eq!(client_text(&r), "[::1]:4242");
    r.client_ip.clear();
    assert_eq!(client_text(&r), "");
}
