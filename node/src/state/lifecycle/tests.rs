use super::*;

/// A publish as a node makes it, for a draft whose content is `content`.
fn publish_of(content: &str) -> Transition {
    Transition::Publish {
        compiled: "{}".into(),
        digest: content_digest(content),
    }
}

/// A publish of a draft whose content is `routes: {}` (what these tests create).
fn publish() -> Transition {
    publish_of("routes: {}")
}

fn stage_of(api: &Api, v: &str) -> Option<Stage> {
    api.versions
        .get(&parse_version(v).unwrap())
        .map(|x| x.stage)
}

/// An API with version 1.0.0 at `stage` and a published 2.0.0 (a possible successor).
fn api_at(stage: Stage) -> Api {
    let mut api = Api::new("orders", "acme");
    api.create_version("2.0.0", "routes: {}".into()).unwrap();
    api.transition("2.0.0", publish(), 1).unwrap();
    api.create_version("1.0.0", "routes: {}".into()).unwrap();
    let path: &[Transition] = match stage {
        Stage::Draft => &[],
        Stage::Published => &[publish()],
        Stage::Deprecated => &[
            publish(),
            Transition::Deprecate {
                sunset: None,
                successor: None,
            },
        ],
        Stage::Retired => &[
            publish(),
            Transition::Deprecate {
                sunset: None,
                successor: None,
            },
            Transition::Retire,
        ],
    };
    for t in path {
        api.transition("1.0.0", t.clone(), 1).unwrap();
    }
    assert_eq!(stage_of(&api, "1.0.0"), Some(stage));
    api
}

fn all_transitions() -> Vec<Transition> {
    vec![
        Transition::Edit {
            content: "routes: {changed: {}}".into(),
        },
        publish(),
        Transition::Deprecate {
            sunset: Some("2027-06-30T00:00:00Z".into()),
            successor: Some("2.0.0".into()),
        },
        Transition::Retire,
        Transition::Discard,
    ]
}

#[test]
fn every_transition_from_every_stage() {
    use Stage::*;
    // (from, transition) -> the stage after, None for "gone", or Err for refused.
    let expected = |from: Stage, t: &str| -> Result<Option<Stage>, ()> {
        match (from, t) {
            (Draft, "edit") => Ok(Some(Draft)),
            (Draft, "publish") => Ok(Some(Published)),
            (Draft, "discard") => Ok(None),
            (Published, "deprecate") => Ok(Some(Deprecated)),
            (Deprecated, "retire") => Ok(Some(Retired)),
            _ => Err(()),
        }
    };
    let mut checked = 0;
    for from in [Draft, Published, Deprecated, Retired] {
        for t in all_transitions() {
            let mut api = api_at(from);
            let before = api.clone();
            let name = t.name();
            let result = api.transition("1.0.0", t, 1);
            match expected(from, name) {
                Ok(after) => {
                    assert!(result.is_ok(), "{} -> {name}: {result:?}", from.name());
                    assert_eq!(stage_of(&api, "1.0.0"), after, "{} -> {name}", from.name());
                }
                Err(()) => {
                    let Err(Refusal::Precondition(msg)) = result else {
                        panic!(
                            "{} -> {name} should be refused as a precondition: {result:?}",
                            from.name()
                        );
                    };
                    assert!(msg.contains(&format!("is {}", from.name())), "{msg}");
                    assert!(
                        msg.contains("allowed: "),
                        "the refusal names what is allowed: {msg}"
                    );
                    for allowed in from.allowed() {
                        assert!(msg.contains(allowed), "{msg}");
                    }
                    assert_eq!(api, before, "a refused transition changes nothing");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
}

#[test]
fn an_edit_changes_a_draft_and_publishing_freezes_it() {
    let mut api = api_at(Stage::Draft);
    api.transition(
        "1.0.0",
        Transition::Edit {
            content: "v2 content".into(),
        },
        1,
    )
    .unwrap();
    assert_eq!(
        api.versions[&parse_version("1.0.0").unwrap()].content,
        "v2 content"
    );
    // A publish compiled from the content before the edit is refused: what was checked
    // is what is served.
    let stale = api.transition("1.0.0", publish(), 1).unwrap_err();
    assert!(
        matches!(stale, Refusal::Precondition(ref m) if m.contains("changed while")),
        "{stale:?}"
    );
    api.transition("1.0.0", publish_of("v2 content"), 1)
        .unwrap();
    let err = api
        .transition(
            "1.0.0",
            Transition::Edit {
                content: "x".into(),
            },
            1,
        )
        .unwrap_err();
    assert!(err.to_string().contains("allowed: deprecate"), "{err}");
}

#[test]
fn deprecation_records_sunset_and_successor_and_checks_them() {
    let mut api = api_at(Stage::Published);
    let bad_date = api.transition(
        "1.0.0",
        Transition::Deprecate {
            sunset: Some("next tuesday".into()),
            successor: None,
        },
        1,
    );
    assert!(
        matches!(bad_date, Err(Refusal::Invalid(ref m)) if m.contains("RFC 3339")),
        "{bad_date:?}"
    );
    let unknown = api.transition(
        "1.0.0",
        Transition::Deprecate {
            sunset: None,
            successor: Some("9.0.0".into()),
        },
        1,
    );
    assert!(matches!(unknown, Err(Refusal::NotFound(_))), "{unknown:?}");
    api.create_version("3.0.0-beta.1", String::new()).unwrap();
    let draft_successor = api.transition(
        "1.0.0",
        Transition::Deprecate {
            sunset: None,
            successor: Some("3.0.0-beta.1".into()),
        },
        1,
    );
    assert!(
        matches!(draft_successor, Err(Refusal::Precondition(ref m)) if m.contains("draft")),
        "{draft_successor:?}"
    );
    assert_eq!(
        stage_of(&api, "1.0.0"),
        Some(Stage::Published),
        "refusals change nothing"
    );

    api.transition(
        "1.0.0",
        Transition::Deprecate {
            sunset: Some("2027-06-30T00:00:00Z".into()),
            successor: Some("v2.0.0".into()),
        },
        1,
    )
    .unwrap();
    let v = &api.versions[&parse_version("1.0.0").unwrap()];
    assert_eq!(v.sunset.unwrap().to_rfc3339(), "2027-06-30T00:00:00+00:00");
    assert_eq!(v.successor, Some(parse_version("2.0.0").unwrap()));
}

#[test]
fn versions_are_semver_and_unique() {
    let mut api = Api::new("orders", "acme");
    for bad in ["", "two", "1.0", "1.0.0.0", "v", "1.0.0 "] {
        let err = api.create_version(bad, String::new()).unwrap_err();
        assert!(
            matches!(err, Refusal::Invalid(ref m) if m.contains("semantic versioning")),
            "{bad:?}: {err:?}"
        );
    }
    api.create_version("v1.2.3", String::new()).unwrap();
    let again = api.create_version("1.2.3", String::new()).unwrap_err();
    assert!(matches!(again, Refusal::Precondition(_)), "{again:?}");
    let missing = api.transition("4.0.0", publish(), 1).unwrap_err();
    assert!(
        matches!(missing, Refusal::NotFound(ref m) if m.contains("1.2.3")),
        "{missing:?}"
    );
}

#[test]
fn splits_take_only_versions_that_take_traffic() {
    let mut api = api_at(Stage::Published); // 1.0.0 and 2.0.0 published
    api.create_version("3.0.0", String::new()).unwrap(); // a draft
    api.set_split(&[("1.0.0", 90), ("2.0.0", 10)]).unwrap();
    let draft = api.set_split(&[("1.0.0", 90), ("3.0.0", 10)]).unwrap_err();
    assert!(
        matches!(draft, Refusal::Precondition(ref m) if m.contains("draft")),
        "{draft:?}"
    );
    let unknown = api.set_split(&[("7.0.0", 1)]).unwrap_err();
    assert!(matches!(unknown, Refusal::NotFound(_)), "{unknown:?}");
    let zero = api.set_split(&[("1.0.0", 0)]).unwrap_err();
    assert!(matches!(zero, Refusal::Invalid(_)), "{zero:?}");
    let twice = api.set_split(&[("1.0.0", 1), ("v1.0.0", 1)]).unwrap_err();
    assert!(matches!(twice, Refusal::Invalid(_)), "{twice:?}");
    assert_eq!(api.split.len(), 2, "refused splits change nothing");
}

#[test]
fn rollback_restores_the_previous_split_in_one_step() {
    let mut api = api_at(Stage::Published);
    assert!(
        matches!(api.rollback(), Err(Refusal::Precondition(_))),
        "nothing to roll back to"
    );
    api.promote("1.0.0").unwrap();
    api.set_split(&[("1.0.0", 90), ("2.0.0", 10)]).unwrap();
    let canary = api.split.clone();
    api.promote("2.0.0").unwrap();
    api.rollback().unwrap();
    assert_eq!(api.split, canary);
    api.rollback().unwrap();
    assert_eq!(
        api.split,
        Split::from([(parse_version("1.0.0").unwrap(), 100)])
    );
}

#[test]
fn a_version_with_traffic_cannot_be_retired_and_rollback_will_not_revive_one() {
    let mut api = api_at(Stage::Published);
    api.set_split(&[("1.0.0", 90), ("2.0.0", 10)]).unwrap();
    api.transition(
        "1.0.0",
        Transition::Deprecate {
            sunset: None,
            successor: Some("2.0.0".into()),
        },
        1,
    )
    .unwrap();
    let err = api.transition("1.0.0", Transition::Retire, 1).unwrap_err();
    assert!(
        matches!(err, Refusal::Precondition(ref m) if m.contains("still takes traffic")),
        "{err:?}"
    );
    api.promote("2.0.0").unwrap();
    api.transition("1.0.0", Transition::Retire, 1).unwrap();
    let err = api.rollback().unwrap_err();
    assert!(
        matches!(err, Refusal::Precondition(ref m) if m.contains("retired")),
        "{err:?}"
    );
    assert_eq!(
        api.split,
        Split::from([(parse_version("2.0.0").unwrap(), 100)])
    );
}

#[test]
fn mounts_that_could_answer_the_same_request_collide() {
    let s = |hosts: &[&str], base: &str| {
        ApiSettings::from_proto(Some(&pb::ApiSettings {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            base_path: base.into(),
            ..Default::default()
        }))
        .unwrap()
    };
    let shop = s(&["shop.example.com"], "/orders");
    for (other, collides) in [
        (s(&["shop.example.com"], "/orders"), true),
        (s(&["shop.example.com"], "/orders/special"), true),
        (s(&["shop.example.com"], "/"), true),
        (s(&["*.example.com"], "/orders"), true),
        (s(&["*.com"], "/"), true),
        (s(&[], "/orders/x"), true),
        (s(&["shop.example.com"], "/ordersx"), false),
        (s(&["other.example.com"], "/orders"), false),
        (s(&["*.other.com"], "/"), false),
        (s(&[], "/payments"), false),
    ] {
        assert_eq!(
            shop.collides(&other),
            collides,
            "{:?} {}",
            other.hosts,
            other.base_path
        );
        assert_eq!(other.collides(&shop), collides, "symmetric");
    }
}
