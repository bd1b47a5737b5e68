use super::*;

const ONE: &str = "upstreams:\n  a:\n    endpoints: [{address: 127.0.0.1:1}]\nroutes:\n  r:\n    match: {path: {prefix: /}}\n    upstream: a\n";
const TWO: &str = "upstreams:\n  a:\n    endpoints: [{address: 127.0.0.1:2}]\n  b:\n    endpoints: [{address: 127.0.0.1:3}]\n";

fn put(yaml: &str, id: &str) -> Command {
    put_spec_command(&check_spec(yaml, 1 << 20).expect("valid"), id)
}

#[test]
fn each_change_takes_the_next_generation_and_is_planned_per_object() {
    let mut s = ClusterState::default();
    let a = s.apply(3, &put(ONE, "x"));
    assert_eq!(a.generation, 1);
    assert_eq!(a.added, vec!["route/r", "upstream/a"]);
    let b = s.apply(4, &put(TWO, "y"));
    assert_eq!(b.generation, 2);
    assert_eq!(b.added, vec!["upstream/b"]);
    assert_eq!(b.changed, vec!["upstream/a"]);
    assert_eq!(b.removed, vec!["route/r"]);
    assert_eq!(s.history.len(), 2);
    assert_eq!(s.history[1].log_index, 4);
}

#[test]
fn the_same_spec_again_changes_nothing() {
    let mut s = ClusterState::default();
    s.apply(1, &put(ONE, ""));
    let again = s.apply(2, &put(ONE, ""));
    assert_eq!(again.generation, 1);
    assert!(again.added.is_empty() && again.changed.is_empty());
    assert_eq!(s.history.len(), 1);
}

#[test]
fn a_retried_request_id_is_applied_once() {
    let mut s = ClusterState::default();
    s.apply(1, &put(ONE, "req-1"));
    s.apply(2, &put(TWO, "req-2"));
    let retried = s.apply(3, &put(ONE, "req-1"));
    assert_eq!(retried.generation, 1, "the first result is returned");
    assert_eq!(s.generation, 2, "and the state is unchanged");
    assert_eq!(&*s.spec_yaml, TWO);
}

#[test]
fn digests_ignore_key_order_and_formatting() {
    let a = check_spec("upstreams: {a: {endpoints: [{address: 127.0.0.1:1}], load_balancing: {policy: round_robin}}}", 1 << 20).unwrap();
    let b = check_spec("upstreams:\n  a:\n    load_balancing: {policy: round_robin}\n    endpoints:\n      - address: 127.0.0.1:1\n", 1 << 20).unwrap();
    assert_eq!(a.objects, b.objects);
}

#[test]
fn oversized_and_invalid_specs_are_refused_with_every_error() {
    let e = check_spec(ONE, 10).unwrap_err();
    assert!(e.to_string().contains("over the limit"), "{e}");
    let e = check_spec("routes:\n  r:\n    match: {path: {prefix: /}}\n    upstream: nope\n  s:\n    match: {path: {prefix: /s}}\n    upstream: nope\n    bogus: 1\n", 1 << 20).unwrap_err();
    assert!(e.0.len() >= 2, "{e}");
}

#[test]
fn the_state_round_trips_through_its_snapshot_encoding() {
    let mut s = ClusterState::default();
    s.apply(1, &put(ONE, "a"));
    s.apply(2, &put(TWO, "b"));
    assert_eq!(ClusterState::from_proto(s.to_proto()), s);
}

fn api_cmd(api: &str, op: tollgate_proto::state::v1::api_command::Op) -> Command {
    Command {
        request_id: String::new(),
        kind: Some(command::Kind::Api(ApiCommand {
            api: api.into(),
            op: Some(op),
        })),
        ..Command::default()
    }
}

fn create_tenant(name: &str) -> Command {
    use tollgate_proto::state::v1::{self as pb, access_command::Op};
    Command {
        kind: Some(command::Kind::Access(pb::AccessCommand {
            tenant: name.into(),
            op: Some(Op::CreateTenant(pb::CreateTenant {})),
        })),
        actor: "operator/test".into(),
        at_ms: 1_000,
        ..Command::default()
    }
}

#[test]
fn api_commands_take_generations_and_refusals_change_nothing() {
    use tollgate_proto::state::v1::{self as pb, api_command::Op, version_transition::To};
    let mut s = ClusterState::default();
    let missing_tenant = s.apply(
        1,
        &api_cmd(
            "orders",
            Op::CreateApi(pb::CreateApi {
                tenant: "acme".into(),
                settings: None,
            }),
        ),
    );
    assert!(
        matches!(missing_tenant.refusal, Some(Refusal::NotFound(ref m)) if m.contains("no tenant acme")),
        "{missing_tenant:?}"
    );
    assert_eq!(s.apply(1, &create_tenant("acme")).generation, 1);
    let a = s.apply(
        1,
        &api_cmd(
            "orders",
            Op::CreateApi(pb::CreateApi {
                tenant: "acme".into(),
                settings: None,
            }),
        ),
    );
    assert_eq!(
        (a.generation, a.added.clone()),
        (2, vec!["api/orders".to_string()])
    );
    let v = s.apply(
        2,
        &api_cmd(
            "orders",
            Op::CreateVersion(pb::CreateVersion {
                version: "1.0.0".into(),
                content: String::new(),
            }),
        ),
    );
    assert_eq!(
        (v.generation, v.changed.clone()),
        (3, vec!["api/orders@1.0.0".to_string()])
    );

    let before = s.clone();
    let refused = s.apply(
        3,
        &api_cmd(
            "orders",
            Op::Transition(pb::VersionTransition {
                version: "1.0.0".into(),
                to: Some(To::Retire(pb::Empty {})),
            }),
        ),
    );
    assert!(
        matches!(refused.refusal, Some(Refusal::Precondition(ref m)) if m.contains("allowed: edit, publish, discard")),
        "{refused:?}"
    );
    let unknown = s.apply(4, &api_cmd("nope", Op::Rollback(pb::Rollback {})));
    assert!(
        matches!(unknown.refusal, Some(Refusal::NotFound(_))),
        "{unknown:?}"
    );
    let bad_name = s.apply(
        5,
        &api_cmd(
            "Bad Name",
            Op::CreateApi(pb::CreateApi {
                tenant: "acme".into(),
                settings: None,
            }),
        ),
    );
    assert!(
        matches!(bad_name.refusal, Some(Refusal::Invalid(_))),
        "{bad_name:?}"
    );
    assert_eq!(s, before, "refused commands change nothing");

    s.apply(
        6,
        &api_cmd(
            "orders",
            Op::Transition(pb::VersionTransition {
                version: "1.0.0".into(),
                to: Some(To::Publish(pb::Publish {
                    compiled: "{}".into(),
                    content_digest: crate::state::lifecycle::content_digest(""),
                })),
            }),
        ),
    );
    let p = s.apply(
        7,
        &api_cmd(
            "orders",
            Op::Promote(pb::Promote {
                version: "1.0.0".into(),
            }),
        ),
    );
    assert_eq!(p.generation, 5);
    // The same promotion again changes nothing and takes no generation.
    let again = s.apply(
        8,
        &api_cmd(
            "orders",
            Op::Promote(pb::Promote {
                version: "1.0.0".into(),
            }),
        ),
    );
    assert_eq!((again.generation, again.refusal.clone()), (5, None));
    let audit: Vec<&str> = s.audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        audit,
        [
            "tenant.create",
            "api.create",
            "version.create",
            "version.publish",
            "api.promote"
        ],
        "every change is audited, refusals and no-ops are not"
    );
    assert_eq!(s.audit[0].actor, "operator/test");
    assert_eq!(
        ClusterState::from_proto(s.to_proto()),
        s,
        "APIs survive the snapshot encoding"
    );
}
