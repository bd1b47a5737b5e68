//! Errors a newcomer meets in the first hour, each answered with the address involved and
//! what to change, within 2 s where the cause is local: the CLI pointed at the wrong kind
//! of port or at a closed one, a credential of the wrong kind, a port or a data directory
//! already in use, a joiner given a port that is not a node's gRPC port.

mod harness;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::{GatewayProcess, Upstream, one_route_spec};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs the CLI; returns its output and how long it took.
fn cli(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .env_remove("TOLLGATE_TOKEN")
        .env_remove("TOLLGATE_CP")
        .env_remove("TOLLGATE_NODE")
        .stdin(Stdio::null())
        .output()
        .expect("run tollgate");
    (out, started.elapsed())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The command failed, quickly, and its message has every one of `needles`.
fn assert_says(what: &str, (out, took): (Output, Duration), needles: &[&str]) {
    let err = stderr(&out);
    assert!(!out.status.success(), "{what}: should fail\n{err}");
    assert!(
        took < Duration::from_secs(2),
        "{what}: took {took:?}\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "{what}: no {n:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{what}: {err}");
}

/// A port nothing listens on (bound, then let go).
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pointed_at_the_wrong_port_says_which_port_it_needs() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&one_route_spec(&up, "")).await;
    let (admin, grpc, proxy) = (
        gw.admin.to_string(),
        gw.grpc.to_string(),
        gw.proxy.to_string(),
    );
    // The CLI as an operator runs it: with the cluster's CA, so it speaks TLS, and a port
    // that answers in plain text is asked what it is.
    let ca = gw.dir.join("data/cluster-ca.pem");
    let ca = ca.to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--ca", ca]);
        cli(&all)
    };

    // Node commands at the HTTP admin port: the admin port answers gRPC callers itself.
    assert_says(
        "cluster status at the admin port",
        cli(&["cluster", "status", "--node", &admin]),
        &[&admin, "HTTP admin port", "--node", "TOLLGATE_NODE", "gRPC"],
    );
    // Control-plane commands at a node's gRPC port: the node names what it is.
    assert_says(
        "tenant list at a node's gRPC port",
        cli(&["tenant", "list", "--cp", &grpc]),
        &[
            &grpc,
            "node's gRPC port",
            "control plane",
            "--cp",
            "127.0.0.1:7080",
        ],
    );
    // At the proxy port: an HTTP answer, not gRPC.
    assert_says(
        "tenant list at the proxy port",
        cli(&["tenant", "list", "--cp", &proxy]),
        &[&proxy, "plain HTTP", "--cp"],
    );
    assert_says(
        "cluster status at the proxy port",
        cli(&["cluster", "status", "--node", &proxy]),
        &[&proxy, "plain HTTP", "--node"],
    );
    // Node commands at the control plane: the control plane names what it is.
    let cp = harness::cp::CpProcess::start(&[gw.grpc]).await;
    let cp_addr = cp.addr.to_string();
    assert_says(
        "cluster status at the control plane",
        cli(&["cluster", "status", "--node", &cp_addr]),
        &[
            &cp_addr,
            "control plane",
            "tollgate.node.v1.NodeAdmin",
            "--node",
        ],
    );
}

#[test]
fn the_cli_pointed_at_a_closed_port_fails_at_once_naming_it() {
    let port = closed_port();
    assert_says(
        "tenant list at a closed port",
        cli(&["tenant", "list", "--cp", &port]),
        &[
            &port,
            "connection refused",
            "control plane",
            "--cp",
            "tollgate dev",
        ],
    );
    assert_says(
        "cluster status at a closed port",
        cli(&["cluster", "status", "--node", &port]),
        &[&port, "connection refused", "--node"],
    );
    // Two replicas, both down: still at once, naming one of them.
    let other = closed_port();
    let both = format!("{port},{other}");
    assert_says(
        "tenant list at two closed ports",
        cli(&["tenant", "list", "--cp", &both]),
        &["connection refused", "--cp"],
    );
}

#[test]
fn an_api_key_given_as_a_token_is_named_for_what_it_is() {
    let port = closed_port();
    assert_says(
        "an API key as --token",
        cli(&[
            "tenant",
            "list",
            "--cp",
            &port,
            "--token",
            "tgk_0123_secret",
        ]),
        &["API key", "x-api-key", "operator token", "tgt_"],
    );
    assert_says(
        "an API key as --token for a node command",
        cli(&[
            "apply",
            "-f",
            "-",
            "--node",
            &port,
            "--token",
            "tgk_0123_secret",
        ]),
        &["API key", "operator token"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_or_data_directory_in_use_is_named_with_the_flag_that_moves_it() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&one_route_spec(&up, "")).await;
    let dir = std::env::temp_dir().join(format!("tollgate-first-hour-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node = |data: &std::path::Path, proxy: &str, grpc: &str, admin: &str| {
        cli(&[
            "node",
            "--id",
            "9",
            "--bootstrap",
            "--data-dir",
            data.to_str().unwrap(),
            "--proxy-addr",
            proxy,
            "--grpc-addr",
            grpc,
            "--admin-addr",
            admin,
            "--access-log",
            "off",
        ])
    };
    let free = "127.0.0.1:0";
    let (proxy, grpc, admin) = (
        gw.proxy.to_string(),
        gw.grpc.to_string(),
        gw.admin.to_string(),
    );
    // Even though the proxy listens with SO_REUSEPORT, a second process is refused.
    assert_says(
        "the proxy port in use",
        node(&dir.join("a"), &proxy, free, free),
        &[&proxy, "already listens", "--proxy-addr"],
    );
    assert_says(
        "the gRPC port in use",
        node(&dir.join("b"), free, &grpc, free),
        &[&grpc, "already listens", "--grpc-addr"],
    );
    assert_says(
        "the admin port in use",
        node(&dir.join("c"), free, free, &admin),
        &[&admin, "already listens", "--admin-addr"],
    );
    // The running node's own data directory.
    let data = gw.dir.join("data");
    assert_says(
        "the data directory in use",
        node(&data, free, free, free),
        &[
            data.to_str().unwrap(),
            "in use by another Tollgate process",
            "--data-dir",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_given_the_admin_port_stops_and_says_which_port_to_use() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&one_route_spec(&up, "")).await;
    let dir = std::env::temp_dir().join(format!("tollgate-joiner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let admin = gw.admin.to_string();
    let token = harness::join_token(gw.grpc, 1).await;
    let (out, took) = cli(&[
        "node",
        "--id",
        "2",
        "--join-token",
        &token,
        "--join",
        &admin,
        "--data-dir",
        dir.to_str().unwrap(),
        "--proxy-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    assert_says(
        "--join at the admin port",
        (out, took),
        &[
            &admin,
            "--join",
            "not a Tollgate node's gRPC port",
            "--grpc-addr",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_top_level_typo_lists_every_key_a_file_may_have() {
    let dir = std::env::temp_dir().join(format!("tollgate-typo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("spec.yaml");
    std::fs::write(&file, "upstreamz: {}\nroutes: {}\n").unwrap();
    let (out, _) = cli(&["validate", "-f", file.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success());
    for key in [
        "`upstreamz`",
        "upstreams",
        "routes",
        "quotas",
        "tenants",
        "apis",
    ] {
        assert!(err.contains(key), "no {key} in: {err}");
    }
    // A file with tenants and APIs validates as `apply` reads it.
    std::fs::write(
        &file,
        "tenants: { acme: {} }\napis: {}\nupstreams: {}\nroutes: {}\n",
    )
    .unwrap();
    let (out, _) = cli(&["validate", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_command_whose_reader_goes_away_ends_quietly() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&one_route_spec(&up, "")).await;
    // `tollgate ... | head -c 1`: the pipe closes after one byte.
    let mut child = Command::new(BIN)
        .args(["cluster", "status", "--output", "json", "--node"])
        .arg(gw.grpc.to_string())
        .arg("--ca")
        .arg(gw.dir.join("data/cluster-ca.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
}
