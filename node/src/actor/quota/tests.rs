use super::*;

/// A cluster of nodes offered `rates` requests/s each (evenly spaced, node `i` ticking
/// `i * 7` ms after node 0, so exchanges are not in step), against one owner ledger.
/// `owner_lost_at`: at that second the ledger is replaced by a fresh one (the owner died
/// and another node took over). Returns the requests admitted in each second.
fn simulate(
    algorithm: Algorithm,
    rates: &[u64],
    limit: u64,
    seconds: u64,
    owner_lost_at: Option<u64>,
) -> Vec<u64> {
    let n = rates.len() as u64;
    let burst = (limit / 10).max(1);
    let mut ledger = Ledger::new(algorithm, limit, burst, 1000, 0);
    let mut leases: Vec<Lease> = (0..n)
        .map(|_| Lease::new(algorithm, limit, Span::Fixed(1000), true, n))
        .collect();
    let mut admitted = vec![0u64; seconds as usize];
    let mut next_at: Vec<u64> = vec![0; rates.len()];
    // Requests that waited for the next exchange, per node.
    let mut waiting: Vec<u64> = vec![0; rates.len()];
    for now_us in 0..seconds * 1_000_000 {
        let now_ms = now_us / 1000;
        if now_us % 1000 == 0 {
            if owner_lost_at.is_some_and(|s| now_ms == s * 1000) {
                ledger = Ledger::new(algorithm, limit, burst, 1000, now_ms);
            }
            for (i, lease) in leases.iter_mut().enumerate() {
                if (now_ms + 1000 - i as u64 * 7).is_multiple_of(TICK_MS) {
                    for r in lease.reports(now_ms) {
                        let g = ledger.exchange(now_ms, i as u64, &r);
                        lease.granted(g);
                    }
                    // Requests that waited are decided once the answer is in.
                    for _ in 0..std::mem::take(&mut waiting[i]) {
                        if lease.admit(now_ms, false) == Admit::Yes {
                            admitted[(now_ms / 1000) as usize] += 1;
                        }
                    }
                }
            }
        }
        for i in 0..rates.len() {
            if rates[i] > 0 && now_us >= next_at[i] {
                next_at[i] += 1_000_000 / rates[i];
                match leases[i].admit(now_ms, true) {
                    Admit::Yes => admitted[(now_ms / 1000) as usize] += 1,
                    Admit::Wait => waiting[i] += 1,
                    Admit::No => {}
                }
            }
        }
    }
    admitted
}

fn within(admitted: &[u64], limit: u64, tolerance: f64) {
    for (w, a) in admitted.iter().enumerate().skip(1) {
        let err = (*a as f64 - limit as f64).abs() / limit as f64;
        assert!(err <= tolerance, "window {w}: {a} admitted ({admitted:?})");
    }
}

#[test]
fn a_70_20_10_overload_is_held_to_the_limit_in_every_window() {
    // 1,500 requests/s offered against a limit of 1,000/s.
    let admitted = simulate(Algorithm::Window, &[1050, 300, 150], 1000, 30, None);
    within(&admitted, 1000, 0.03);
    assert!(admitted.iter().all(|a| *a <= 1000), "{admitted:?}");
    let admitted = simulate(Algorithm::Gcra, &[1050, 300, 150], 1000, 30, None);
    within(&admitted, 1000, 0.03);
}

#[test]
fn under_the_limit_everything_is_admitted() {
    for algorithm in [Algorithm::Window, Algorithm::Gcra] {
        let admitted = simulate(algorithm, &[350, 100, 50], 1000, 10, None);
        for (w, a) in admitted.iter().enumerate().skip(1) {
            assert!((495..=500).contains(a), "{algorithm:?} window {w}: {a}");
        }
    }
}

#[test]
fn a_slow_key_is_not_refused_for_want_of_a_token() {
    // 10 requests/s on one node of three, against 100/s: bursts of the odd request must
    // not be refused because the node's lease is small.
    for algorithm in [Algorithm::Window, Algorithm::Gcra] {
        let admitted = simulate(algorithm, &[10, 0, 0], 100, 5, None);
        assert_eq!(admitted, vec![10; 5], "{algorithm:?}");
    }
}

#[test]
fn a_new_owner_learns_the_window_from_the_first_reports() {
    for algorithm in [Algorithm::Window, Algorithm::Gcra] {
        let admitted = simulate(algorithm, &[1050, 300, 150], 1000, 10, Some(5));
        // The move costs at most a tick of blind grants; the next window is exact again.
        let moved = admitted[5] as f64;
        assert!(moved <= 1000.0 * 1.06, "{algorithm:?}: {admitted:?}");
        within(&admitted[6..], 1000, 0.03);
    }
}

#[test]
fn the_owner_never_grants_past_the_limit_and_shares_by_demand() {
    let mut l = Ledger::new(Algorithm::Window, 100, 0, 1000, 0);
    let ask = |want| Report {
        window: 0,
        window_end_ms: 1000,
        want,
        ..Report::default()
    };
    assert_eq!(l.exchange(0, 1, &ask(30)).tokens, 30);
    // Node 2 asks for 210: 70 are left and the recent asks total 240.
    let g = l.exchange(1, 2, &ask(210));
    assert_eq!((g.tokens, g.remaining), (61, 9));
    // Node 1 reports the 30 it holds and asks for 30 more: 9 are left.
    let g = l.exchange(
        2,
        1,
        &Report {
            held: 30,
            ..ask(30)
        },
    );
    assert!(g.tokens <= 9);
    assert_eq!(l.outstanding(2), 30 + g.tokens + 61);
    // Usage that nobody was granted is debited too (a new key's credit).
    let mut l = Ledger::new(Algorithm::Window, 100, 0, 1000, 0);
    let g = l.exchange(
        0,
        1,
        &Report {
            used: 95,
            ..ask(50)
        },
    );
    assert_eq!(g.tokens, 5);
    // A window that is over gets nothing.
    assert_eq!(l.exchange(1500, 1, &ask(5)).tokens, 0);
}

#[test]
fn gcra_releases_tokens_at_the_rate_and_takes_back_what_expired() {
    // 100 per second: one token per 10 ms, at most 100 at once.
    let mut l = Ledger::new(Algorithm::Gcra, 100, 100, 1000, 0);
    let ask = |want| Report {
        want,
        ..Report::default()
    };
    assert_eq!(l.exchange(0, 1, &ask(150)).tokens, 100);
    assert_eq!(l.exchange(0, 1, &ask(10)).tokens, 0);
    assert_eq!(l.exchange(100, 1, &ask(50)).tokens, 10);
    // 10 tokens expired unspent and come back.
    let g = l.exchange(
        100,
        1,
        &Report {
            returned: 10,
            ..ask(50)
        },
    );
    assert_eq!(g.tokens, 10);
    assert_eq!(g.valid_until_ms, 100 + LEASE_TTL_MS);
}

#[test]
fn a_lease_follows_the_fail_mode_when_the_owner_is_gone() {
    let mut open = Lease::new(Algorithm::Window, 90, Span::Fixed(1000), true, 3);
    open.cut_off(3);
    let admitted = (0..100)
        .filter(|_| open.admit(10, true) == Admit::Yes)
        .count();
    assert_eq!(admitted, 30, "a third of the limit");
    assert_eq!(open.unaccounted_allowance(), 0);
    let mut closed = Lease::new(Algorithm::Window, 90, Span::Fixed(1000), false, 3);
    closed.granted(Grant {
        window: 0,
        tokens: 5,
        valid_until_ms: 1000,
        remaining: 50,
        revoke: false,
    });
    closed.cut_off(3);
    let admitted = (0..100)
        .filter(|_| closed.admit(10, true) == Admit::Yes)
        .count();
    assert_eq!(admitted, 5, "only what the lease covers");
}

#[test]
fn a_new_key_spends_a_small_credit_then_waits() {
    let mut l = Lease::new(Algorithm::Window, 10_000, Span::Fixed(86_400_000), true, 3);
    assert_eq!(l.admit(0, true), Admit::Yes);
    assert_eq!(l.admit(0, true), Admit::Wait);
    assert_eq!(l.admit(0, false), Admit::No);
    let r = l.reports(25);
    assert_eq!((r[0].used, r[0].unleased), (1, 1));
}

#[test]
fn calendar_months_have_their_own_lengths() {
    // 2026-02-10 UTC: February 2026 has 28 days.
    let feb = 1_770_681_600_000;
    let (i, start, end) = Span::Month.window(feb);
    assert_eq!(end - start, 28 * 86_400_000);
    let (j, _, _) = Span::Month.window(end);
    assert_eq!(j, i + 1);
    let (_, s, e) = Span::Fixed(86_400_000).window(feb + 5);
    assert_eq!((s, e), (feb, feb + 86_400_000));
}

fn leased(limit: u64, tokens: u64, remaining: u64) -> Lease {
    let mut l = Lease::new(Algorithm::Window, limit, Span::Fixed(60_000), false, 1);
    l.granted(Grant {
        window: 0,
        tokens,
        valid_until_ms: 60_000,
        remaining,
        revoke: false,
    });
    l
}

#[test]
fn amounts_are_taken_whole_or_not_at_all_and_corrected_afterwards() {
    let mut l = leased(1_000, 100, 0);
    assert_eq!(l.admit_n(10, 60, true), Admit::Yes);
    // 40 held, nothing left at the owner: 50 can be neither had nor waited for.
    assert_eq!(l.admit_n(10, 50, true), Admit::No);
    assert_eq!(l.used(), 60);
    // A stream may start on part of its worst case, never below its minimum.
    assert_eq!(l.admit_up_to(10, 41, 50), 0);
    assert_eq!(l.admit_up_to(10, 10, 50), 40);
    assert_eq!(l.held(), 0);
    assert!(l.exhausted(10));
    // Tokens already sent are counted even with nothing held.
    l.force(10, 30);
    assert_eq!(l.used(), 130);
    // An answer shorter than its reservation gives the rest back, to be spent again.
    l.give_back(10, 0, 20);
    assert_eq!((l.used(), l.held()), (110, 20));
    assert!(!l.exhausted(10));
    // Never into a window that has ended.
    l.give_back(70_000, 0, 20);
    assert_eq!(l.used(), 0);
    let r = l.reports(70_000);
    assert_eq!(r[0].used, 0);
}

#[test]
fn while_the_owner_has_budget_left_a_large_ask_waits_for_it() {
    let mut l = leased(1_000, 10, 500);
    assert_eq!(l.admit_n(0, 300, true), Admit::Wait);
    assert_eq!(l.admit_n(0, 600, true), Admit::No);
    // The wait is counted as demand: the next report asks for it.
    let r = l.reports(25);
    assert!(r[0].want >= 300, "{r:?}");
}

#[test]
fn a_budget_ledger_takes_the_limit_of_the_most_advanced_reporter() {
    let mut ledger = Ledger::new(Algorithm::Window, 1, 0, 1000, 0);
    let report = |used, held, want, limit, applied_index| Report {
        window: 0,
        window_end_ms: 10_000,
        used,
        held,
        want,
        limit,
        applied_index,
        ..Report::default()
    };
    // Node 1 has applied up to index 10: 1,000 left.
    let g = ledger.exchange(0, 1, &report(0, 0, 600, 1_000, 10));
    assert_eq!(g.tokens, 600);
    // Node 2 lags (index 5): its higher limit is not believed.
    let g = ledger.exchange(100, 2, &report(0, 0, 600, 1_200, 5));
    assert_eq!(g.tokens, 400, "{g:?}");
    // Node 1 spent 500 of its 600 and its batch was committed at index 12: it no longer
    // counts the 500 as used, and its limit is 500 lower. Nothing is lost or counted twice.
    let g = ledger.exchange(200, 1, &report(0, 100, 0, 500, 12));
    assert_eq!((g.tokens, g.remaining), (0, 0), "{g:?}");
    // Node 2 gives its 400 back: they can be granted again, and no more.
    let g = ledger.exchange(300, 2, &report(0, 0, 0, 1_200, 6));
    assert_eq!(g.remaining, 400);
    let g = ledger.exchange(400, 1, &report(0, 100, 1_000, 500, 12));
    assert_eq!(g.tokens, 400);
}
