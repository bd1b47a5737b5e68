//! The control plane (`tollgate cp`) against a real 3-node cluster: API lifecycle calls,
//! two replicas at once with a leader kill in between, health, refusals.

mod harness;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use harness::Upstream;
use harness::cluster::{TestCluster, tagged_spec};
use harness::cp::CpProcess;
use tollgate_proto::cp::v1 as cp;
use tollgate_proto::state::v1 as state;

const T: Duration = Duration::from_secs(20);

fn transition(
    api: &str,
    version: &str,
    to: state::version_transition::To,
) -> cp::TransitionVersionRequest {
    cp::TransitionVersionRequest {
        api: api.into(),
        transition: Some(state::VersionTransition {
            version: version.into(),
            to: Some(to),
        }),
    }
}

fn split(api: &cp::ApiReply) -> Vec<(String, u32)> {
    api.api
        .as_ref()
        .unwrap()
        .split
        .iter()
        .map(|e| (e.version.clone(), e.weight))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_the_lifecycle_through_a_leader_kill_and_lose_nothing() {
    use state::version_transition::To;
    let up = Upstream::start("a").await;
    let mut c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let nodes: Vec<SocketAddr> = c.ids().iter().map(|id| c.node(*id).grpc).collect();
    let (one, two) = (
        CpProcess::start(&nodes).await,
        CpProcess::start(&nodes).await,
    );
    let (mut a, mut b) = (one.client(&c.token).await, two.client(&c.token).await);
    one.sdk(&c.token).create_tenant("acme").await.unwrap();

    // grpc.health.v1 says SERVING.
    let channel = one.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    a.create_api(cp::CreateApiRequest {
        name: "orders".into(),
        tenant: "acme".into(),
        settings: None,
    })
    .await
    .unwrap();
    b.create_version(cp::CreateVersionRequest {
        api: "orders".into(),
        version: "1.0.0".into(),
        content: "routes: {}".into(),
    })
    .await
    .unwrap();
    a.transition_version(transition(
        "orders",
        "1.0.0",
        To::Publish(state::Publish::default()),
    ))
    .await
    .unwrap();
    b.promote(cp::PromoteRequest {
        api: "orders".into(),
        version: "1.0.0".into(),
    })
    .await
    .unwrap();
    a.create_version(cp::CreateVersionRequest {
        api: "orders".into(),
        version: "2.0.0".into(),
        content: "routes: {}".into(),
    })
    .await
    .unwrap();

    // The leader dies; both replicas carry on (their node pools move to the survivors).
    let leader = c.leader(T).await;
    c.kill9(leader);
    b.transition_version(transition(
        "orders",
        "2.0.0",
        To::Publish(state::Publish::default()),
    ))
    .await
    .unwrap();
    let canary = a
        .set_split(cp::SetSplitRequest {
            api: "orders".into(),
            weights: vec![
                state::SplitEntry {
                    version: "1.0.0".into(),
                    weight: 90,
                },
                state::SplitEntry {
                    version: "2.0.0".into(),
                    weight: 10,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        split(&canary),
        vec![("1.0.0".into(), 90), ("2.0.0".into(), 10)]
    );
    b.promote(cp::PromoteRequest {
        api: "orders".into(),
        version: "2.0.0".into(),
    })
    .await
    .unwrap();
    let rolled = a
        .rollback(cp::RollbackRequest {
            api: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        split(&rolled),
        vec![("1.0.0".into(), 90), ("2.0.0".into(), 10)],
        "rollback in one call"
    );

    // Every acknowledged change is there, seen through either replica.
    c.restart(leader).await;
    for client in [&mut a, &mut b] {
        let got = client
            .get_api(cp::GetApiRequest {
                name: "orders".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let api = got.api.clone().unwrap();
        assert_eq!(api.tenant, "acme");
        let stages: Vec<(String, String)> = api
            .versions
            .iter()
            .map(|v| (v.version.clone(), v.stage.clone()))
            .collect();
        assert_eq!(
            stages,
            vec![
                ("1.0.0".into(), "published".into()),
                ("2.0.0".into(), "published".into())
            ]
        );
        assert_eq!(
            split(&got),
            vec![("1.0.0".into(), 90), ("2.0.0".into(), 10)]
        );
    }

    // A move the lifecycle forbids: FAILED_PRECONDITION naming what is allowed.
    let err = b
        .transition_version(transition("orders", "1.0.0", To::Retire(state::Empty {})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("allowed: deprecate"),
        "{}",
        err.message()
    );
    let err = a
        .get_api(cp::GetApiRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = a
        .create_version(cp::CreateVersionRequest {
            api: "orders".into(),
            version: "not-semver".into(),
            content: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = a
        .create_api(cp::CreateApiRequest {
            name: "x".repeat(300),
            tenant: "acme".into(),
            settings: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let listed = a
        .list_apis(cp::ListApisRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.apis.len(), 1);
}

/// A leader that stops answering (SIGSTOP: its sockets stay open, nothing reads them) is
/// the hard case for a client: no connection error comes. The control plane's call to it
/// fails within about two seconds (HTTP/2 pings), the follower it tries next gives up its
/// forward to the silent leader as soon as it knows of a new one, and the write lands
/// there, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_holds_writes_for_an_election_not_a_timeout() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let leader = c.leader(T).await;
    // The leader first, so the control plane's call goes to it.
    let mut ids = vec![leader];
    ids.extend(c.ids().into_iter().filter(|id| *id != leader));
    let nodes: Vec<SocketAddr> = ids.iter().map(|id| c.node(*id).grpc).collect();
    let cp = CpProcess::start(&nodes).await;
    let sdk = cp.sdk(&c.token);
    sdk.create_tenant("before").await.unwrap();

    c.node(leader).signal("STOP");
    // Straight to a follower, before it has noticed: it forwards to the paused leader, and
    // answers as soon as an election gives it another leader to name (it used to hold the
    // call for its 10 s forward timeout).
    let follower = ids[1];
    let mut direct = c.client(follower).await;
    let paused_addr = c.node(leader).grpc.to_string();
    let started = std::time::Instant::now();
    let answer = direct.write(harness::create_tenant("direct")).await;
    let took = started.elapsed();
    println!("write to a follower with the leader paused: {took:?}, {answer:?}");
    if let Err(e) = &answer {
        assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
        let hint = e.leader_hint().expect("the new leader named");
        assert_ne!(hint, paused_addr, "{e}");
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let started = std::time::Instant::now();
    let written = sdk.create_tenant("during").await;
    let took = started.elapsed();
    c.node(leader).signal("CONT");
    println!("write through the control plane with the leader paused: {took:?}");
    written.expect("the write goes through a new leader");
    // Before: the call waited out the channel's 15 s timeout on the paused leader and
    // failed. Pings (2 s) plus an election is the budget now.
    assert!(took < Duration::from_secs(6), "took {took:?}");

    // Applied once, and every node has it, the old leader too once it runs again.
    for id in c.ids() {
        let mut client = c.client(id).await;
        harness::eventually(&format!("node {id} to list the tenant"), T, async || {
            client
                .list_tenants(true)
                .await
                .is_ok_and(|r| r.tenants.iter().filter(|t| t.name == "during").count() == 1)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_the_lifecycle_and_says_what_is_allowed() {
    let up = Upstream::start("a").await;
    let gw = harness::GatewayProcess::start(&tagged_spec(up.addr, "0")).await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let file = cpp.dir.join("v.yaml");
    std::fs::write(&file, "routes: {}\n").unwrap();
    let file = file.to_str().unwrap().to_string();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .args(["--cp", &cpp.addr.to_string()])
            .env("TOLLGATE_CA", gw.ca_file())
            .env("TOLLGATE_TOKEN", gw.operator_token())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for args in [
        vec!["tenant", "create", "acme"],
        vec!["api", "create", "orders", "--tenant", "acme"],
        vec!["version", "create", "orders", "1.0.0", "-f", &file],
        vec!["version", "publish", "orders", "1.0.0"],
        vec!["version", "create", "orders", "2.0.0", "-f", &file],
        vec!["version", "publish", "orders", "2.0.0"],
        vec!["api", "split", "orders", "1.0.0=90", "2.0.0=10"],
        vec!["api", "promote", "orders", "2.0.0"],
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
    let (code, out, _) = cli(&["api", "rollback", "orders", "--output", "json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["split"],
        serde_json::json!([{"version": "1.0.0", "weight": 90}, {"version": "2.0.0", "weight": 10}])
    );
    let (code, out, _) = cli(&[
        "version",
        "deprecate",
        "orders",
        "1.0.0",
        "--sunset",
        "2027-06-30T00:00:00Z",
        "--successor",
        "2.0.0",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("deprecated") && out.contains("2027-06-30"),
        "{out}"
    );
    let (code, _, err) = cli(&["version", "retire", "orders", "1.0.0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("still takes traffic"), "{err}");
    let (code, _, err) = cli(&["version", "publish", "orders", "1.0.0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("FailedPrecondition") && err.contains("allowed: retire"),
        "{err}"
    );
    let (code, out, _) = cli(&["api", "list", "--tenant", "acme"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("orders") && out.contains("1.0.0=90 2.0.0=10"),
        "{out}"
    );
}

/// A Python with grpcio, grpcio-reflection and grpcio-health-checking: `TOLLGATE_PYTHON`
/// if set, else a venv this test makes under the target directory (pip from PyPI).
fn python_with_grpcio() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("TOLLGATE_PYTHON") {
        return p.into();
    }
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpcio-venv");
    let python = venv.join("bin/python");
    let ready = |py: &std::path::Path| {
        Command::new(py)
            .args(["-c", "import grpc, grpc_reflection, grpc_health"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready(&python) {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv failed: install python3-venv"
        );
        let pip = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "-q",
                "grpcio",
                "grpcio-reflection",
                "grpcio-health-checking",
            ])
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "pip could not install grpcio from PyPI"
        );
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_grpc_client_lists_the_services_and_sees_serving() {
    let python = tokio::task::spawn_blocking(python_with_grpcio)
        .await
        .unwrap();
    let up = Upstream::start("a").await;
    let gw = harness::GatewayProcess::start(&tagged_spec(up.addr, "0")).await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/generic_client.py");
    for (addr, service) in [
        (cpp.addr, "tollgate.cp.v1.ApiLifecycle"),
        (gw.grpc, "tollgate.node.v1.NodeAdmin"),
    ] {
        let out = Command::new(&python)
            .arg(script)
            .arg(addr.to_string())
            .arg(gw.ca_file())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let services: Vec<&str> = v["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s.as_str())
            .collect();
        assert!(services.contains(&service), "{service} not in {services:?}");
        if service == "tollgate.cp.v1.ApiLifecycle" {
            for also in ["tollgate.cp.v1.Access", "tollgate.cp.v1.Audit"] {
                assert!(services.contains(&also), "{also} not in {services:?}");
            }
        }
        let others = ["tollgate.cp.v1.ApiLifecycle", "tollgate.node.v1.NodeAdmin"];
        assert!(
            others
                .iter()
                .all(|o| *o == service || !services.contains(o)),
            "a server lists only what it serves: {services:?}"
        );
        assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
        assert_eq!(v["health"], "SERVING");
    }
}

type CallResult = Result<tonic::Response<cp::ApiReply>, tonic::Status>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_lifecycle_call_is_refused_and_changes_nothing() {
    use state::version_transition::To;
    use tonic::Code::{FailedPrecondition, InvalidArgument, NotFound};
    let up = Upstream::start("a").await;
    let gw = harness::GatewayProcess::start_with(
        &tagged_spec(up.addr, "0"),
        &["--max-spec-bytes", "65536"],
    )
    .await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let mut c = cpp.client(gw.operator_token()).await;
    cpp.sdk(gw.operator_token())
        .create_tenant("acme")
        .await
        .unwrap();
    c.create_api(cp::CreateApiRequest {
        name: "orders".into(),
        tenant: "acme".into(),
        settings: None,
    })
    .await
    .unwrap();
    c.create_version(cp::CreateVersionRequest {
        api: "orders".into(),
        version: "1.0.0".into(),
        content: String::new(),
    })
    .await
    .unwrap();
    let before = c
        .get_api(cp::GetApiRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let long = "x".repeat(300);
    let huge = "#".repeat(70_000);
    let split = |weights: Vec<(&str, u32)>| cp::SetSplitRequest {
        api: "orders".into(),
        weights: weights
            .into_iter()
            .map(|(v, w)| state::SplitEntry {
                version: v.into(),
                weight: w,
            })
            .collect(),
    };
    let results: Vec<(&str, CallResult, tonic::Code)> = vec![
        (
            "create_api: empty name",
            c.create_api(cp::CreateApiRequest {
                name: String::new(),
                tenant: "acme".into(),
                settings: None,
            })
            .await,
            InvalidArgument,
        ),
        (
            "create_api: empty tenant",
            c.create_api(cp::CreateApiRequest {
                name: "x".into(),
                tenant: String::new(),
                settings: None,
            })
            .await,
            InvalidArgument,
        ),
        (
            "create_api: oversized name",
            c.create_api(cp::CreateApiRequest {
                name: long.clone(),
                tenant: "acme".into(),
                settings: None,
            })
            .await,
            InvalidArgument,
        ),
        (
            "create_api: exists",
            c.create_api(cp::CreateApiRequest {
                name: "orders".into(),
                tenant: "acme".into(),
                settings: None,
            })
            .await,
            FailedPrecondition,
        ),
        (
            "get_api: unknown",
            c.get_api(cp::GetApiRequest {
                name: "nope".into(),
            })
            .await,
            NotFound,
        ),
        (
            "get_api: oversized",
            c.get_api(cp::GetApiRequest { name: long.clone() }).await,
            InvalidArgument,
        ),
        (
            "create_version: malformed semver",
            c.create_version(cp::CreateVersionRequest {
                api: "orders".into(),
                version: "1.0".into(),
                content: String::new(),
            })
            .await,
            InvalidArgument,
        ),
        (
            "create_version: unknown api",
            c.create_version(cp::CreateVersionRequest {
                api: "nope".into(),
                version: "1.0.0".into(),
                content: String::new(),
            })
            .await,
            NotFound,
        ),
        (
            "create_version: oversized content",
            c.create_version(cp::CreateVersionRequest {
                api: "orders".into(),
                version: "9.0.0".into(),
                content: huge,
            })
            .await,
            InvalidArgument,
        ),
        (
            "transition: none",
            c.transition_version(cp::TransitionVersionRequest {
                api: "orders".into(),
                transition: None,
            })
            .await,
            InvalidArgument,
        ),
        (
            "transition: no target",
            c.transition_version(cp::TransitionVersionRequest {
                api: "orders".into(),
                transition: Some(state::VersionTransition {
                    version: "1.0.0".into(),
                    to: None,
                }),
            })
            .await,
            InvalidArgument,
        ),
        (
            "transition: unknown version",
            c.transition_version(transition(
                "orders",
                "7.0.0",
                To::Publish(state::Publish::default()),
            ))
            .await,
            NotFound,
        ),
        (
            "transition: retire a draft",
            c.transition_version(transition("orders", "1.0.0", To::Retire(state::Empty {})))
                .await,
            FailedPrecondition,
        ),
        (
            "split: empty",
            c.set_split(split(vec![])).await,
            InvalidArgument,
        ),
        (
            "split: draft",
            c.set_split(split(vec![("1.0.0", 1)])).await,
            FailedPrecondition,
        ),
        (
            "split: unknown version",
            c.set_split(split(vec![("5.0.0", 1)])).await,
            NotFound,
        ),
        (
            "split: malformed",
            c.set_split(split(vec![("five", 1)])).await,
            InvalidArgument,
        ),
        (
            "promote: unknown api",
            c.promote(cp::PromoteRequest {
                api: "nope".into(),
                version: "1.0.0".into(),
            })
            .await,
            NotFound,
        ),
        (
            "rollback: nothing to roll back",
            c.rollback(cp::RollbackRequest {
                api: "orders".into(),
            })
            .await,
            FailedPrecondition,
        ),
        (
            "list: oversized tenant",
            c.list_apis(cp::ListApisRequest {
                tenant: long,
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(cp::ApiReply::default())),
            InvalidArgument,
        ),
    ];
    for (what, result, code) in results {
        let err = result.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(
            err.message().len() > 10,
            "{what}: the message says what to change: {:?}",
            err.message()
        );
    }
    let after = c
        .get_api(cp::GetApiRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.api, before.api, "nothing changed");
    assert_eq!(after.generation, before.generation);
    assert_eq!(
        c.list_apis(cp::ListApisRequest::default())
            .await
            .unwrap()
            .into_inner()
            .apis
            .len(),
        1
    );
}
