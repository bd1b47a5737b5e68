use super::*;
use tollgate_proto::state::v1::UsageCounts;

const T0: u64 = 1_800_000_000_000; // 2027-01-15

fn put_plan(b: &mut Billing, name: &str, prices: PlanPrices, at: u64) {
    let cmd = BillingCommand {
        op: Some(Op::PutPlan(PutPlan {
            name: name.into(),
            prices: Some(prices),
        })),
    };
    b.apply(&cmd, at).unwrap();
}

fn assign(b: &mut Billing, tenant: &str, plan: &str, at: u64) {
    let cmd = BillingCommand {
        op: Some(Op::AssignPlan(AssignPlan {
            tenant: tenant.into(),
            plan: plan.into(),
        })),
    };
    b.apply(&cmd, at).unwrap();
}

fn entry(tenant: &str, minute: u64, counts: UsageCounts) -> UsageEntry {
    UsageEntry {
        minute,
        tenant: tenant.into(),
        api: "orders".into(),
        version: "1.0.0".into(),
        key: format!("tg_{tenant}"),
        counts: Some(counts),
        ..UsageEntry::default()
    }
}

fn two_plans() -> Billing {
    let mut b = Billing::default();
    put_plan(
        &mut b,
        "starter",
        PlanPrices {
            per_1k_requests: "0.50".into(),
            per_gb: "0.10".into(),
            monthly: "20".into(),
            ..PlanPrices::default()
        },
        T0,
    );
    put_plan(
        &mut b,
        "pro",
        PlanPrices {
            per_1k_requests: "0.25".into(),
            per_gb: "0.08".into(),
            per_1k_tokens: [
                ("gpt-x".into(), "0.002".into()),
                ("*".into(), "0.001".into()),
            ]
            .into(),
            ..PlanPrices::default()
        },
        T0,
    );
    assign(&mut b, "acme", "starter", T0);
    assign(&mut b, "globex", "pro", T0);
    b
}

#[test]
fn a_cost_report_for_two_tenants_on_two_plans_equals_the_hand_computation() {
    let b = two_plans();
    let minute = T0 / 60_000 + 1;
    let entries = [
        entry(
            "acme",
            minute,
            UsageCounts {
                requests: 12_345,
                refused: 100,
                request_bytes: 3_000_000_000,
                response_bytes: 456_789,
                ..UsageCounts::default()
            },
        ),
        entry(
            "globex",
            minute + 5,
            UsageCounts {
                requests: 1_000_001,
                response_bytes: 1,
                tokens: [("gpt-x".into(), 1_500), ("other".into(), 700)].into(),
                ..UsageCounts::default()
            },
        ),
    ];
    let lines = cost_report(&b, &entries, T0, T0 + 3_600_000, GroupBy::Tenant, None).unwrap();
    assert_eq!(lines.len(), 2);
    // acme: 12,245 billed requests x 0.50 / 1000 = 6.1225; 3,000,456,789 bytes x 0.10 / 1e9
    // = 0.3000456789; the month's flat 20.
    let acme = &lines[0];
    assert_eq!(acme.tenant, "acme");
    assert_eq!(format_atto(acme.cost.requests), "6.1225");
    assert_eq!(format_atto(acme.cost.bytes), "0.3000456789");
    assert_eq!(format_atto(acme.monthly), "20.00");
    assert_eq!(format_atto(acme.total()), "26.4225456789");
    assert_eq!(
        acme.price_versions.iter().collect::<Vec<_>>(),
        ["starter@1"]
    );
    // globex: 1,000,001 x 0.25 / 1000 = 250.00025; 1 byte x 0.08 / 1e9 = 0.00000000008;
    // 1,500 gpt-x tokens x 0.002 / 1000 = 0.003; 700 other tokens at "*" 0.001 = 0.0007.
    let globex = &lines[1];
    assert_eq!(format_atto(globex.cost.requests), "250.00025");
    assert_eq!(format_atto(globex.cost.bytes), "0.00000000008");
    assert_eq!(format_atto(globex.cost.tokens), "0.0037");
    assert_eq!(format_atto(globex.total()), "250.00395000008");
}

#[test]
fn history_is_priced_as_billed_unless_re_rated() {
    let mut b = two_plans();
    let minute = T0 / 60_000 + 1;
    let usage = UsageCounts {
        requests: 2_000,
        ..UsageCounts::default()
    };
    // Prices go up an hour later: usage before stays at version 1.
    put_plan(
        &mut b,
        "starter",
        PlanPrices {
            per_1k_requests: "1.00".into(),
            ..PlanPrices::default()
        },
        T0 + 3_600_000,
    );
    let entries = [
        entry("acme", minute, usage.clone()),
        entry("acme", minute + 120, usage.clone()),
    ];
    let by_key = |v| {
        cost_report(&b, &entries, T0, T0 + 7_200_000, GroupBy::Key, v)
            .unwrap()
            .into_iter()
            .find(|l| l.group == "tg_acme")
            .unwrap()
    };
    let billed = by_key(None);
    assert_eq!(format_atto(billed.cost.requests), "3.00"); // 1.00 + 2.00
    assert_eq!(billed.price_versions.len(), 2);
    let rerated = by_key(Some(("starter", 2)));
    assert_eq!(format_atto(rerated.cost.requests), "4.00");
    assert!(by_key_err(&b, &entries).contains("no price version 9"));
}

fn by_key_err(b: &Billing, entries: &[UsageEntry]) -> String {
    cost_report(
        b,
        entries,
        T0,
        T0 + 60_000,
        GroupBy::Key,
        Some(("starter", 9)),
    )
    .unwrap_err()
}

#[test]
fn budgets_alert_at_each_threshold_once_and_cap_at_the_limit() {
    let mut b = two_plans();
    let cmd = BillingCommand {
        op: Some(Op::SetBudget(SetBudget {
            tenant: "acme".into(),
            monthly_limit: "10".into(),
            thresholds: vec![],
            hard_cap: true,
            webhook: String::new(),
            fail_open: false,
            key: String::new(),
        })),
    };
    b.apply(&cmd, T0).unwrap();
    let minute = T0 / 60_000;
    // 4,000 requests at 0.50 per 1,000 = 2.00 each time.
    let two = entry(
        "acme",
        minute,
        UsageCounts {
            requests: 4_000,
            ..UsageCounts::default()
        },
    );
    assert!(!b.add_usage(std::slice::from_ref(&two), T0));
    assert!(b.alerts.is_empty());
    assert!(!b.add_usage(&[two.clone(), two.clone()], T0)); // 6.00: 50%
    assert_eq!(b.alerts.len(), 1);
    assert!(!b.add_usage(std::slice::from_ref(&two), T0)); // 8.00: 80%
    let half = entry(
        "acme",
        minute,
        UsageCounts {
            requests: 1_000,
            ..UsageCounts::default()
        },
    );
    assert!(!b.add_usage(&[half], T0 + 1)); // 8.50: nothing new
    assert_eq!(
        b.alerts.iter().map(|a| a.threshold).collect::<Vec<_>>(),
        [50, 80]
    );
    assert!(
        b.add_usage(std::slice::from_ref(&two), T0 + 2),
        "10.50: capped"
    );
    assert_eq!(b.capped().get("acme"), Some(&month_of_ms(T0)));
    assert_eq!(b.alerts.back().unwrap().threshold, 100);
    assert_eq!(b.alerts.back().unwrap().spent, "10.50");
    // Refused requests are never billed: they cannot push a tenant over.
    let refused = entry(
        "globex",
        minute,
        UsageCounts {
            requests: 50,
            refused: 50,
            ..UsageCounts::default()
        },
    );
    b.add_usage(&[refused], T0);
    assert_eq!(b.spent("globex", month_of_ms(T0)), 0);
    // The next month starts uncapped.
    let next_month = month_start_ms(month_of_ms(T0) + 1);
    assert!(b.add_usage(
        &[entry(
            "acme",
            next_month / 60_000,
            UsageCounts {
                requests: 1,
                ..UsageCounts::default()
            }
        )],
        next_month
    ));
    assert!(b.capped().is_empty());
    let mut snap = StateSnapshot::default();
    b.to_proto(&mut snap);
    assert_eq!(Billing::from_proto(&snap), b);
}

#[test]
fn bad_prices_and_budgets_are_refused_with_what_to_write() {
    let mut b = Billing::default();
    let put = |prices: PlanPrices| BillingCommand {
        op: Some(Op::PutPlan(PutPlan {
            name: "p".into(),
            prices: Some(prices),
        })),
    };
    for (prices, says) in [
        (
            PlanPrices {
                per_1k_requests: "-0.10".into(),
                ..PlanPrices::default()
            },
            "may not be negative",
        ),
        (
            PlanPrices {
                per_gb: "1,5".into(),
                ..PlanPrices::default()
            },
            "not a decimal amount",
        ),
        (
            PlanPrices {
                monthly: "0.0000000001".into(),
                ..PlanPrices::default()
            },
            "at most 9 decimal places",
        ),
        (
            PlanPrices {
                per_1k_tokens: [("m".into(), "-1".into())].into(),
                ..PlanPrices::default()
            },
            "per_1k_tokens[m]",
        ),
        (
            PlanPrices {
                currency: "dollars".into(),
                ..PlanPrices::default()
            },
            "ISO 4217",
        ),
    ] {
        match b.apply(&put(prices), T0) {
            Err(Refusal::Invalid(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("{says}: {:?}", other.map(|c| c.object)),
        }
    }
    assert!(b.plans.is_empty());
    let cmd = BillingCommand {
        op: Some(Op::AssignPlan(AssignPlan {
            tenant: "acme".into(),
            plan: "missing".into(),
        })),
    };
    assert!(matches!(b.apply(&cmd, T0), Err(Refusal::NotFound(_))));
    let cmd = BillingCommand {
        op: Some(Op::SetBudget(SetBudget {
            tenant: "acme".into(),
            monthly_limit: "-5".into(),
            ..SetBudget::default()
        })),
    };
    assert!(matches!(b.apply(&cmd, T0), Err(Refusal::Invalid(m)) if m.contains("negative")));
    assert_eq!(parse_amount("x", "12").unwrap(), 12_000_000_000);
    assert_eq!(parse_amount("x", ".5").unwrap(), 500_000_000);
    assert_eq!(format_nanos(400_000_000), "0.40");
    assert_eq!(format_nanos(1), "0.000000001");
}

#[test]
fn llm_tokens_are_priced_by_kind_per_model_and_deployment_exactly() {
    use tollgate_proto::state::v1::TokenPrices;
    let prices = Prices::from_proto(&PlanPrices {
        per_1k_requests: "0.40".into(),
        llm: [
            (
                "gpt".to_string(),
                TokenPrices {
                    input: "2.50".into(),
                    output: "10".into(),
                    cached_input: "1.25".into(),
                    ..TokenPrices::default()
                },
            ),
            (
                "gpt/azure-eu".to_string(),
                TokenPrices {
                    input: "3".into(),
                    output: "12".into(),
                    ..TokenPrices::default()
                },
            ),
        ]
        .into(),
        ..PlanPrices::default()
    })
    .unwrap();
    let t = LlmTokens {
        input: 1_000,
        cached_input: 200,
        output: 500,
        reasoning: 100,
        ..LlmTokens::default()
    };
    // 800 x 2.50 + 200 x 1.25 + 400 x 10 + 100 x 10 (reasoning at the output price),
    // per 10^6 tokens = 0.00725.
    assert_eq!(format_atto(prices.llm_cost("gpt", "openai", &t)), "0.00725");
    // The deployment's own price; unnamed kinds take the input and output prices.
    assert_eq!(format_atto(prices.llm_cost("gpt", "azure-eu", &t)), "0.009");
    // The request's cost adds its per-request price (0.40 per 1,000).
    assert_eq!(
        format_atto(prices.request_cost("gpt", "openai", "gpt-4o", &t)),
        "0.00765"
    );
    assert_eq!(prices.llm_cost("other", "", &t), 0);
    assert_eq!(
        prices.worst_token_prices("gpt", "openai", "x"),
        (2_500_000_000, 10_000_000_000)
    );
    // A usage row is priced the same way, and the round trip keeps what was written.
    let mut e = entry(
        "acme",
        1,
        UsageCounts {
            requests: 1,
            class_2xx: 1,
            input_tokens: 1_000,
            cached_input_tokens: 200,
            output_tokens: 500,
            reasoning_tokens: 100,
            ..UsageCounts::default()
        },
    );
    e.model = "gpt".into();
    e.deployment = "openai".into();
    assert_eq!(format_atto(prices.metered_entry(&e).total()), "0.00765");
    let back = Prices::from_proto(&prices.to_proto()).unwrap();
    assert_eq!(back, prices);
    assert!(prices.to_proto().llm["gpt"].reasoning.is_empty());
    let err = Prices::from_proto(&PlanPrices {
        llm: [("m".to_string(), TokenPrices::default())].into(),
        ..PlanPrices::default()
    })
    .unwrap_err();
    assert!(err.contains("neither an input nor an output"), "{err}");
}

#[test]
fn an_api_keys_budget_counts_that_keys_spend_alone() {
    let mut b = two_plans();
    for (key, limit) in [("", "100"), ("k1", "1")] {
        b.apply(
            &BillingCommand {
                op: Some(Op::SetBudget(SetBudget {
                    tenant: "acme".into(),
                    key: key.into(),
                    monthly_limit: limit.into(),
                    hard_cap: true,
                    ..SetBudget::default()
                })),
            },
            T0,
        )
        .unwrap();
    }
    let minute = T0 / 60_000;
    // 4,000 requests at 0.50 per 1,000 = 2.00, all with key k1.
    let mut e = entry(
        "acme",
        minute,
        UsageCounts {
            requests: 4_000,
            class_2xx: 4_000,
            ..UsageCounts::default()
        },
    );
    e.key = "k1".into();
    assert!(b.add_usage(&[e], T0 + 1));
    let month = month_of_ms(T0);
    assert_eq!(format_atto(b.spent("acme", month)), "2.00");
    assert_eq!(format_atto(b.spent(&subject("acme", "k1"), month)), "2.00");
    let capped = b.capped();
    assert!(
        capped.contains_key("key:k1") && !capped.contains_key("acme"),
        "{capped:?}"
    );
    // The key's budget survives the state's round trip, as the key's.
    let mut out = StateSnapshot::default();
    b.to_proto(&mut out);
    assert!(
        out.budgets
            .iter()
            .any(|s| s.tenant == "acme" && s.key == "k1")
    );
    assert_eq!(Billing::from_proto(&out), b);
    assert!(b.view(T0).budgets.contains_key("key:k1"));
}
