//! The findings of the security review, each performed as an attacker on the nodes'
//! network would, and shown refused (docs/security.md). Calls an attacker makes go over
//! TLS (the nodes speak nothing else), without a client certificate or with one of
//! another node's, with the generated gRPC clients.

mod harness;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::cluster::{TestCluster, tagged_spec};
use harness::{GatewayProcess, NodeOpts, Upstream, eventually};
use tollgate_proto::actor::v1 as actor;
use tollgate_proto::node::v1 as node;
use tollgate_proto::raft::v1 as raft;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const T: Duration = Duration::from_secs(20);

/// A TLS channel to `addr` trusting `ca`, presenting `identity` when given (a node's
/// certificate and key, as an attacker that stole them, or a node itself, would).
async fn channel(addr: SocketAddr, ca: &str, identity: Option<Identity>) -> Channel {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("a TLS connection")
}

/// Node `id`'s certificate and key, from its data directory.
fn node_identity(c: &TestCluster, id: u64) -> Identity {
    let dir = c.node(id).dir.join("data");
    Identity::from_pem(
        std::fs::read(dir.join("node.pem")).unwrap(),
        std::fs::read(dir.join("node.key")).unwrap(),
    )
}

fn ca(c: &TestCluster) -> String {
    std::fs::read_to_string(c.ca_file()).unwrap()
}

fn vote(term: u64, node_id: u64) -> Option<raft::Vote> {
    Some(raft::Vote {
        leader_id: Some(raft::LeaderId { term, node_id }),
        committed: true,
    })
}

/// Every node's applied generation.
async fn generations(c: &TestCluster) -> Vec<u64> {
    let mut out = Vec::new();
    for id in c.up_ids() {
        out.push(
            c.client(id)
                .await
                .status()
                .await
                .unwrap()
                .applied_generation,
        );
    }
    out
}

/// Waits until every node serves the generation the leader has now; returns it.
async fn served_everywhere(c: &TestCluster, leader: u64) -> u64 {
    let want = c
        .client(leader)
        .await
        .read_spec(false)
        .await
        .unwrap()
        .generation;
    c.wait_serving(want, T).await;
    want
}

/// The state's hash key and CA key, read from a stopped node's data directory (its last
/// snapshot) and opened with its sealing key.
fn opened_secrets(data: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let ring = tollgate_node::identity::seal::Keyring::parse(
        &std::fs::read_to_string(data.join("sealing-key")).unwrap(),
    )
    .unwrap();
    let db = tollgate_node::raft::open_db(data).unwrap();
    let state = tollgate_node::raft::state_machine::StateMachineStore::open(&db).unwrap();
    let (hash_key, ca_key) = state.read(|a| {
        (
            a.state.access.hash_key.clone(),
            a.state.access.ca_key.clone(),
        )
    });
    (
        ring.open(tollgate_node::identity::HASH_KEY, &hash_key)
            .unwrap(),
        ring.open(tollgate_node::identity::CA_KEY, &ca_key).unwrap(),
    )
}

/// No file of `data` but the sealing key holds any of `secrets`.
fn assert_nowhere_in_clear(data: &std::path::Path, secrets: &[(&str, Vec<u8>)]) {
    for file in harness::walk(data)
        .iter()
        .filter(|f| !f.ends_with("sealing-key"))
    {
        let bytes = std::fs::read(file).unwrap_or_default();
        for (what, secret) in secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{} holds {what} in the clear",
                file.display()
            );
        }
    }
}

/// A write through `via`, acknowledged within 5 s.
async fn writes(c: &TestCluster, via: u64, up: SocketAddr, tag: &str) -> bool {
    let mut client = c.client(via).await;
    let apply = client.apply_spec(tagged_spec(up, tag), false, "");
    matches!(
        tokio::time::timeout(Duration::from_secs(5), apply).await,
        Ok(Ok(_))
    )
}

/// A node process joining `seed` with `token`: its exit status and log when it did not
/// start within `within`, and the process when it did.
async fn try_join(
    seed: SocketAddr,
    id: u64,
    token: Option<&str>,
    within: Duration,
) -> (
    Option<std::process::ExitStatus>,
    String,
    Option<GatewayProcess>,
) {
    let opts = NodeOpts {
        id,
        dir: None,
        grpc_port: 0,
        bootstrap: false,
        join: Some(seed),
        join_token: token.map(str::to_string),
        spec: None,
        extra: vec![],
    };
    match GatewayProcess::try_launch(opts, within).await {
        Ok(n) => (None, String::new(), Some(n)),
        Err((status, log)) => (status, log, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_one_joins_without_a_valid_join_token() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(1, &tagged_spec(up.addr, "0"), &[]).await;
    let seed = c.node(1).grpc;

    // No token: the node stops at once and says what to pass.
    let (status, log, _n) = try_join(seed, 4, None, T).await;
    assert!(status.is_some_and(|s| !s.success()), "{log}");
    assert!(log.contains("--join-token"), "{log}");

    // A token of the right shape and CA, whose secret the cluster never made.
    let real = harness::join_token(seed, 1).await;
    let forged = format!("{}{}{}", &real[..21], "A".repeat(43), &real[64..]);
    assert_ne!(forged, real);
    let (status, log, _n) = try_join(seed, 5, Some(&forged), T).await;
    assert!(status.is_some_and(|s| !s.success()), "{log}");
    assert!(log.contains("join token is not known"), "{log}");

    // A real token of another cluster: its CA fingerprint is not this cluster's, so the
    // joiner refuses the node before sending anything.
    let other = TestCluster::start(1, &tagged_spec(up.addr, "0"), &[]).await;
    let theirs = harness::join_token(other.node(1).grpc, 1).await;
    let (status, log, _n) = try_join(seed, 6, Some(&theirs), T).await;
    assert!(status.is_some_and(|s| !s.success()), "{log}");
    assert!(
        log.contains("not from the cluster CA the join token names"),
        "{log}"
    );

    // A token good for one node enrolls one.
    let (status, log, first) = try_join(seed, 2, Some(&real), T).await;
    assert!(status.is_none(), "the first use joins: {log}");
    let (status, log, _n) = try_join(seed, 3, Some(&real), T).await;
    assert!(status.is_some_and(|s| !s.success()), "{log}");
    assert!(
        log.contains("used up") || log.contains("not known"),
        "{log}"
    );

    // A revoked token enrolls no one.
    let mut client = c.client(1).await;
    let revoked = harness::join_token(seed, 5).await;
    let id = &revoked[4..20];
    client.revoke_join_token(id).await.unwrap();
    let (status, log, _n) = try_join(seed, 7, Some(&revoked), T).await;
    assert!(status.is_some_and(|s| !s.success()), "{log}");

    // Only the one legitimate node is a member.
    let members: Vec<u64> = client
        .cluster_status()
        .await
        .unwrap()
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(members, vec![1, 2]);
    let listed = client.list_join_tokens(true).await.unwrap();
    let used = listed.iter().find(|t| real.contains(&t.id)).unwrap();
    assert_eq!(
        (used.used, used.uses, used.used_by.clone()),
        (1, 1, vec!["node/2".to_string()])
    );
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_join_cannot_move_or_promote_another_member() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let (ca, leader) = (ca(&c), c.leader(T).await);
    let victim = c.ids().into_iter().find(|id| *id != leader).unwrap();
    let before = c
        .client(leader)
        .await
        .cluster_status()
        .await
        .unwrap()
        .members;
    let join = |node_id: u64| node::JoinRequest {
        node_id,
        grpc_addr: "127.0.0.1:1".into(),
        region: "default".into(),
        max_voters: 9,
        ..Default::default()
    };
    // Without a certificate.
    let mut anon = node::node_admin_client::NodeAdminClient::new(
        channel(c.node(leader).grpc, &ca, None).await,
    );
    let err = anon.join(join(victim)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // With another member's certificate: it speaks for itself only.
    let other = c
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != victim)
        .unwrap();
    let mut impostor = node::node_admin_client::NodeAdminClient::new(
        channel(c.node(leader).grpc, &ca, Some(node_identity(&c, other))).await,
    );
    let err = impostor.join(join(victim)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("speaks only for itself"),
        "{}",
        err.message()
    );
    // A new id from a member's certificate is refused too.
    let err = impostor.join(join(42)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    let after = c
        .client(leader)
        .await
        .cluster_status()
        .await
        .unwrap()
        .members;
    assert_eq!(after, before, "no member moved, none added");
    assert!(writes(&c, victim, up.addr, "after").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_traffic_is_refused_and_the_replicas_stay_equal() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let (ca, leader) = (ca(&c), c.leader(T).await);
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap();
    let third = c
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != follower)
        .unwrap();
    let term = c.client(leader).await.cluster_status().await.unwrap().term;

    // An AppendEntries with a higher vote, carrying a command, to a follower.
    let forged = raft::AppendEntriesRequest {
        vote: vote(term + 5, leader),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let mut anon =
        raft::raft_client::RaftClient::new(channel(c.node(follower).grpc, &ca, None).await);
    let err = anon.append_entries(forged.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // From a member's certificate, claiming to be another node (the leader).
    let mut impostor = raft::raft_client::RaftClient::new(
        channel(c.node(follower).grpc, &ca, Some(node_identity(&c, third))).await,
    );
    let err = impostor.append_entries(forged).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // A vote storm (term + 1 every 50 ms for 2 s) without a certificate: writes go on.
    let storm = {
        let ch = channel(c.node(follower).grpc, &ca, None).await;
        tokio::spawn(async move {
            let mut client = raft::raft_client::RaftClient::new(ch);
            let mut refused = 0;
            for i in 0..40 {
                let req = raft::VoteRequest {
                    vote: Some(raft::Vote {
                        leader_id: Some(raft::LeaderId {
                            term: term + 10 + i,
                            node_id: 9,
                        }),
                        committed: false,
                    }),
                    last_log_id: None,
                };
                if client
                    .vote(req)
                    .await
                    .is_err_and(|e| e.code() == tonic::Code::Unauthenticated)
                {
                    refused += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            refused
        })
    };
    let mut acked = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        if writes(&c, leader, up.addr, &format!("w{acked}")).await {
            acked += 1;
        }
    }
    assert_eq!(storm.await.unwrap(), 40, "every forged vote refused");
    assert!(acked >= 5, "writes went on during the storm: {acked}");
    assert_eq!(c.leader(T).await, leader, "no election");

    // Every node applied the same: no divergence.
    let want = served_everywhere(&c, leader).await;
    assert_eq!(generations(&c).await, vec![want; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_declaring_a_gibibyte_is_refused_before_it_is_read() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let (ca, leader) = (ca(&c), c.leader(T).await);
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap();
    let target = c.node(follower);
    let rss_before = target.rss();
    let header = |term: u64, node_id: u64| raft::SnapshotChunk {
        part: Some(raft::snapshot_chunk::Part::Header(raft::SnapshotHeader {
            vote: vote(term, node_id),
            meta: Some(raft::SnapshotMeta {
                last_log_id: None,
                last_membership: None,
                snapshot_id: "forged".into(),
            }),
            total_bytes: 1 << 30,
        })),
    };
    let junk = || raft::SnapshotChunk {
        part: Some(raft::snapshot_chunk::Part::Chunk(vec![7u8; 1 << 20])),
    };
    // Three streams without a certificate, each declaring 1 GiB and sending 8 MiB.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let ch = channel(target.grpc, &ca, None).await;
        streams.push(tokio::spawn(async move {
            let mut client = raft::raft_client::RaftClient::new(ch);
            let chunks: Vec<_> = std::iter::once(header(1000, 1))
                .chain((0..8).map(|_| junk()))
                .collect();
            client.install_snapshot(tokio_stream::iter(chunks)).await
        }));
    }
    for s in streams {
        let err = s.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }
    // From a member, but with a vote behind the cluster's: answered with the node's vote,
    // the data never read.
    let leader_id = leader;
    let mut stale = raft::raft_client::RaftClient::new(
        channel(target.grpc, &ca, Some(node_identity(&c, leader_id))).await,
    );
    let chunks: Vec<_> = std::iter::once(header(0, leader_id))
        .chain((0..8).map(|_| junk()))
        .collect();
    let resp = stale.install_snapshot(tokio_stream::iter(chunks)).await;
    match resp {
        Ok(r) => {
            let v = r.into_inner().vote.unwrap();
            assert!(v.leader_id.unwrap().term >= 1, "the node's own vote");
        }
        // The stream may be cut off mid-send once the node has answered.
        Err(e) => assert_ne!(e.code(), tonic::Code::Ok),
    }
    let grown = target.rss().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
    assert!(writes(&c, follower, up.addr, "after").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_outcomes_are_taken_only_from_the_node_that_reports_them() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let ca = ca(&c);
    let report = |from: u64| actor::ExchangeRequest {
        from,
        quotas: vec![actor::QuotaReport {
            key: "victim-key".into(),
            limit: 30,
            window_ms: 60_000,
            used: 1000,
            ..Default::default()
        }],
        circuits: vec![],
        rollouts: vec![],
    };
    let mut anon =
        actor::actors_client::ActorsClient::new(channel(c.node(1).grpc, &ca, None).await);
    let err = anon.exchange(report(2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let mut impostor = actor::actors_client::ActorsClient::new(
        channel(c.node(1).grpc, &ca, Some(node_identity(&c, 2))).await,
    );
    let err = impostor.exchange(report(3)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_nodes_certificate_opens_no_door() {
    let up = Upstream::start("a").await;
    let mut c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let ca = ca(&c);
    let leader = c.leader(T).await;
    let gone = c.ids().into_iter().find(|id| *id != leader).unwrap();
    let identity = node_identity(&c, gone);
    c.client(leader).await.remove(gone).await.unwrap();
    c.kill9(gone);
    let survivor = c.ids().into_iter().find(|id| *id != gone).unwrap();
    let mut client = actor::actors_client::ActorsClient::new(
        channel(c.node(survivor).grpc, &ca, Some(identity)).await,
    );
    let err = client
        .exchange(actor::ExchangeRequest {
            from: gone,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("revoked"), "{}", err.message());
    // The audit log says so.
    let audit = c
        .client(leader)
        .await
        .audit(node::AuditRequest {
            object_prefix: format!("node/{gone}"),
            ..Default::default()
        })
        .await
        .unwrap()
        .entries;
    assert!(audit.iter().any(|e| e.action == "node.revoke"), "{audit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_renew_before_they_expire() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &["--cert-lifetime", "30s"]).await;
    let issued: Vec<Vec<u8>> = c
        .ids()
        .iter()
        .map(|id| std::fs::read(c.node(*id).dir.join("data/node.pem")).unwrap())
        .collect();
    // A third of 30 s is left after 20 s: every node has renewed by then, and the cluster
    // writes past the first certificates' expiry.
    for id in c.ids() {
        let node = c.node(id);
        eventually(
            &format!("node {id} to renew its certificate"),
            Duration::from_secs(40),
            async || {
                node.metrics()
                    .await
                    .contains("tollgate_node_certificate_renewals_total")
            },
        )
        .await;
        assert_ne!(
            std::fs::read(node.dir.join("data/node.pem")).unwrap(),
            issued[(id - 1) as usize]
        );
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let leader = c.leader(T).await;
    for id in c.ids() {
        assert!(
            writes(&c, id, up.addr, &format!("late-{id}")).await,
            "a write through node {id}"
        );
    }
    served_everywhere(&c, leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_the_state_holds_no_usable_secret() {
    let up = Upstream::start("a").await;
    // A snapshot after every entry: the state's latest copy is in one, where the test
    // reads it back (and scans it like every other file).
    let gw =
        GatewayProcess::start_with(&tagged_spec(up.addr, "0"), &["--snapshot-every", "1"]).await;
    let mut client = gw.sdk().await;
    let token = client
        .create_join_token("scan", Duration::from_secs(600), 1)
        .await
        .unwrap();
    client.write(harness::create_tenant("acme")).await.unwrap();
    let key = client
        .write(tollgate_sdk::state::Command {
            kind: Some(tollgate_sdk::state::command::Kind::Access(
                tollgate_sdk::state::AccessCommand {
                    tenant: "acme".into(),
                    op: Some(tollgate_sdk::state::access_command::Op::CreateKey(
                        Default::default(),
                    )),
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .secret;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let opts = gw.kill9();
    let data = opts.dir.clone().unwrap().join("data");
    // What the state holds, opened with the node's sealing key.
    let (hash_key, ca_key) = opened_secrets(&data);
    assert_eq!(hash_key.len(), 32);
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("the hash key", hash_key),
        // The CA's private scalar sits in the last 32 bytes of... any 32 bytes of its
        // PKCS#8 encoding would do: the whole encoding is looked for.
        ("the CA key", ca_key),
        ("the join token's secret", token.as_bytes()[21..64].to_vec()),
        ("the API key's secret", key.as_bytes()[21..].to_vec()),
    ];
    let files = harness::walk(&data);
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains("raft")),
        "{files:?}"
    );
    assert_nowhere_in_clear(&data, &secrets);
}

/// An HS256 key set, with its key's bytes.
fn hs256_jwks() -> (String, Vec<u8>) {
    use base64::Engine;
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    let jwks = format!(
        r#"{{"keys":[{{"kty":"oct","alg":"HS256","kid":"k1","k":"{}"}}]}}"#,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&secret)
    );
    (jwks, secret)
}

fn jwt_settings(jwks: &str) -> tollgate_sdk::state::ApiSettings {
    tollgate_sdk::state::ApiSettings {
        base_path: "/pay".into(),
        auth: "jwt".into(),
        jwt: Some(tollgate_sdk::state::JwtSettings {
            issuer: "https://idp.test".into(),
            audience: "pay".into(),
            jwks: jwks.into(),
            tenant_claim: String::new(),
        }),
        ..Default::default()
    }
}

fn signed(secret: &[u8]) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("k1".into());
    let exp = chrono::Utc::now().timestamp() + 600;
    let claims =
        serde_json::json!({"iss": "https://idp.test", "aud": "pay", "exp": exp, "tenant": "acme"});
    let key = jsonwebtoken::EncodingKey::from_secret(secret).unwrap();
    format!(
        "Bearer {}",
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    )
}

/// Every kind of secret the state holds, made on a fresh node: a named secret, an API
/// whose JWT keys are symmetric, a budget webhook. Returns what a scan must not find.
async fn every_kind_of_secret(
    gw: &GatewayProcess,
    up: SocketAddr,
) -> (harness::cp::CpProcess, Vec<(&'static str, Vec<u8>)>) {
    let cpp = harness::cp::CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(gw.operator_token());
    cp.create_tenant("acme").await.unwrap();
    let (jwks, jwt_key) = hs256_jwks();
    cp.create_api("pay", "acme", Some(jwt_settings(&jwks)))
        .await
        .unwrap();
    let content = format!(
        "upstreams: {{ u: {{ endpoints: [{{ address: \"{up}\" }}] }} }}\nroutes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }} }}\n"
    );
    cp.create_version("pay", "1.0.0", &content).await.unwrap();
    cp.publish("pay", "1.0.0").await.unwrap();
    cp.promote("pay", "1.0.0").await.unwrap();
    let webhook = "https://hooks.example.test/services/T000/B000/XXXXSECRETXXXX";
    cp.set_budget(tollgate_sdk::state::SetBudget {
        tenant: "acme".into(),
        monthly_limit: "100".into(),
        webhook: webhook.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut node = gw.sdk().await;
    let provider_key = b"sk-provider-0123456789-SECRET".to_vec();
    node.put_secret("provider", provider_key.clone())
        .await
        .unwrap();
    let key = cp.create_key("acme", "ci", "").await.unwrap().secret;
    use base64::Engine;
    let jwt_text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&jwt_key);
    (
        cpp,
        vec![
            ("the JWT key", jwt_key),
            ("the JWT key's text", jwt_text.into_bytes()),
            ("the webhook", b"XXXXSECRETXXXX".to_vec()),
            ("the named secret", provider_key),
            ("the API key's secret", key.as_bytes()[21..].to_vec()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_secret_is_sealed_in_every_file() {
    let up = Upstream::start("v1").await;
    // The JWT API's version sends requests to the test upstream on loopback: opened.
    let spec = harness::allowing_loopback(&tagged_spec(up.addr, "0"));
    let gw = GatewayProcess::start_with(&spec, &["--snapshot-every", "1"]).await;
    let (_cpp, mut secrets) = every_kind_of_secret(&gw, up.addr).await;
    // The JWT API answers with its sealed key opened on the data plane.
    let (_, jwt_key) = hs256_jwks();
    let req = http::Request::get(gw.url("/pay/charge"))
        .header("authorization", signed(&jwt_key))
        .body(harness::full(""))
        .unwrap();
    assert_eq!(gw.send(req).await.status, 200);
    // Listings show no secret: the webhook by its host only.
    let usage = gw.sdk().await.usage(Default::default()).await.unwrap();
    assert_eq!(
        usage.budgets[0].webhook,
        "https://hooks.example.test/… (sealed)"
    );
    let listed = gw.sdk().await.list_secrets().await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["provider"]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let data = gw.dir.join("data");
    let opts = gw.kill9();
    let (hash_key, _) = opened_secrets(&data);
    secrets.push(("the hash key", hash_key));
    assert_nowhere_in_clear(&data, &secrets);
    drop(opts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sealing_key_rotates_and_the_old_one_can_go() {
    let up = Upstream::start("v1").await;
    // The JWT API's version sends requests to the test upstream on loopback: opened.
    let gw = GatewayProcess::start(&harness::allowing_loopback(&tagged_spec(up.addr, "0"))).await;
    let (cpp, _) = every_kind_of_secret(&gw, up.addr).await;
    drop(cpp);
    let data = gw.dir.join("data");
    let old = std::fs::read_to_string(data.join("sealing-key")).unwrap();
    let new = tollgate_node::identity::seal::SealingKey::generate().unwrap();
    // Rotating before the nodes have the new key changes nothing (it is not the first).
    let mut node = gw.sdk().await;
    node.reseal().await.unwrap();
    // 1. Every node gets the new key first, the old one after it; SIGHUP reads it again.
    std::fs::write(
        data.join("sealing-key"),
        format!("{}\n{old}", new.to_text()),
    )
    .unwrap();
    gw.signal("HUP");
    eventually("the node to read its keys again", T, async || {
        gw.log().contains("sealing keys read again")
    })
    .await;
    // 2. Rotate: everything sealed again under the new key.
    node.reseal().await.unwrap();
    let listed = node.list_secrets().await.unwrap();
    assert_eq!(listed[0].name, new.id_hex(), "sealed with the new key");
    // 3. The old key goes; the node restarts with the new one alone and opens everything.
    std::fs::write(data.join("sealing-key"), new.to_text()).unwrap();
    let token = gw.operator_token().to_string();
    let opts = gw.kill9();
    let gw = GatewayProcess::launch(opts).await;
    let mut node = gw.sdk().await.with_token(Some(&token)).unwrap();
    assert_eq!(
        node.list_secrets().await.unwrap().len(),
        1,
        "the operator token still opens"
    );
    let (_, jwt_key) = hs256_jwks();
    eventually(
        "the JWT API to answer with the re-sealed key",
        T,
        async || {
            let req = http::Request::get(gw.url("/pay/charge"))
                .header("authorization", signed(&jwt_key))
                .body(harness::full(""))
                .unwrap();
            gw.send(req).await.status == 200
        },
    )
    .await;
    let usage = node.usage(Default::default()).await.unwrap();
    assert_eq!(
        usage.budgets[0].webhook,
        "https://hooks.example.test/… (sealed)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_calls_without_credentials_are_refused_before_their_body_is_read() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(1, &tagged_spec(up.addr, "0"), &[]).await;
    let (ca, gw) = (ca(&c), c.node(1));
    let rss_before = gw.rss();
    // Twelve 60 MiB specs at once, without a token.
    let spec = "# ".to_string() + &"x".repeat(60 << 20);
    let mut calls = Vec::new();
    for _ in 0..12 {
        let ch = channel(gw.grpc, &ca, None).await;
        let spec = spec.clone();
        calls.push(tokio::spawn(async move {
            let mut client = node::node_admin_client::NodeAdminClient::new(ch)
                .max_encoding_message_size(usize::MAX);
            client
                .apply_spec(node::ApplySpecRequest {
                    spec_yaml: spec,
                    ..Default::default()
                })
                .await
        }));
    }
    let mut unauthenticated = 0;
    for call in calls {
        match call.await.unwrap() {
            Err(e) if e.code() == tonic::Code::Unauthenticated => unauthenticated += 1,
            // The node answered at the headers and hung up on the body: fine too.
            Err(_) => {}
            Ok(_) => panic!("applied without a token"),
        }
    }
    assert!(unauthenticated >= 1, "none said UNAUTHENTICATED");
    let grown = gw.rss().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
    // With the operator token, a spec over --max-spec-bytes is refused by size.
    let mut client = c.client(1).await;
    let err = client
        .apply_spec("# ".to_string() + &"x".repeat(8 << 20), false, "")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(
                tonic::Code::OutOfRange
                    | tonic::Code::InvalidArgument
                    | tonic::Code::ResourceExhausted
            )
        ),
        "{err}"
    );
    assert!(writes(&c, 1, up.addr, "after").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_quota_keys_from_a_member_are_refused_and_memory_stays_bounded() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(2, &tagged_spec(up.addr, "0"), &[]).await;
    let ca = ca(&c);
    let target = c.node(1);
    let rss_before = target.rss();
    // Even a member's certificate (a compromised member) cannot make the owner keep state
    // for quotas its spec does not have: 10 exchanges of 20,000 unique keys each.
    let mut member = actor::actors_client::ActorsClient::new(
        channel(target.grpc, &ca, Some(node_identity(&c, 2))).await,
    );
    for round in 0..10 {
        let quotas = (0..20_000)
            .map(|i| actor::QuotaReport {
                key: format!("junk#{round:04}{i:08}/victim-{i}"),
                limit: 30,
                window_ms: 60_000,
                used: 1000,
                want: 10,
                ..Default::default()
            })
            .collect();
        let resp = member
            .exchange(actor::ExchangeRequest {
                from: 2,
                quotas,
                circuits: vec![],
                rollouts: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            resp.grants.iter().all(|g| g.tokens == 0),
            "nothing granted for junk"
        );
    }
    // One report too many in one exchange is refused whole.
    let too_many = (0..20_001)
        .map(|i| actor::QuotaReport {
            key: format!("k{i}"),
            ..Default::default()
        })
        .collect();
    let err = member
        .exchange(actor::ExchangeRequest {
            from: 2,
            quotas: too_many,
            circuits: vec![],
            rollouts: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let m = target.metrics().await;
    let refused: f64 = m
        .lines()
        .filter(|l| l.starts_with("tollgate_actor_reports_refused_total{reason=\"unknown_quota\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 200_000.0, "{m}");
    let grown = target.rss().saturating_sub(rss_before);
    assert!(grown < 96 << 20, "RSS grew by {} MiB", grown >> 20);
}

/// Sends raw bytes to `addr` and reads the answer until the server closes.
async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_refuses_two_hosts_strips_our_headers_and_takes_realistic_header_counts() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&harness::one_route_spec(&up, "")).await;
    // Two Host headers: 400, nothing sent upstream.
    let hits = up.hits();
    let answer = raw_http(
        gw.proxy,
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("more than one Host"), "{answer}");
    assert_eq!(up.hits(), hits);
    // Client-sent x-tollgate-* headers never reach the upstream of a spec route.
    let req = http::Request::get(gw.url("/x"))
        .header("x-tollgate-tenant", "victim")
        .header("x-tollgate-api-version", "9.9.9")
        .header("x-other", "kept")
        .body(harness::full(""))
        .unwrap();
    assert_eq!(gw.send(req).await.status, 200);
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert!(!seen.contains_key("x-tollgate-tenant"), "{seen:?}");
    assert!(!seen.contains_key("x-tollgate-api-version"), "{seen:?}");
    assert_eq!(seen["x-other"], "kept");
    // 150 header lines (a browser behind a few proxies) pass; 250 get 431.
    let many = |n: usize| {
        let mut r = http::Request::get(gw.url("/x"));
        for i in 0..n {
            r = r.header(format!("x-h{i}"), "v");
        }
        r.body(harness::full("")).unwrap()
    };
    assert_eq!(gw.send(many(150)).await.status, 200);
    let answer = {
        let mut text = String::from("GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for i in 0..250 {
            text.push_str(&format!("x-h{i}: v\r\n"));
        }
        text.push_str("\r\n");
        raw_http(gw.proxy, text.as_bytes()).await
    };
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_yaml_is_refused_at_once_and_the_leader_stays() {
    let up = Upstream::start("a").await;
    let c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    let leader = c.leader(T).await;
    let cpp = harness::cp::CpProcess::start(&[c.node(leader).grpc]).await;
    let cp = cpp.sdk(&c.token);
    cp.create_tenant("acme").await.unwrap();
    cp.create_api("deep", "acme", None).await.unwrap();
    let started = Instant::now();
    // 100,000 levels: under the 1 MiB limit, and what took the parser 20 s before.
    let deep = format!("routes: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let err = cp.create_version("deep", "1.0.0", &deep).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("nest deeper"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let spec = format!("routes: {}{}", "{a: ".repeat(100_000), "}".repeat(100_000));
    let err = c
        .client(leader)
        .await
        .apply_spec(spec, false, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert_eq!(c.leader(T).await, leader, "the leader kept its leadership");
    assert!(writes(&c, leader, up.addr, "after").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_drafts_are_capped_and_listings_page_past_the_message_limit() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&tagged_spec(up.addr, "0")).await;
    let cpp = harness::cp::CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(gw.operator_token());
    cp.create_tenant("acme").await.unwrap();
    let padded = |kib: usize| format!("routes: {{}}\n# {}\n", "x".repeat(kib * 1024));
    // Three APIs of 5 drafts of 600 KiB each: 9 MB in all, over the 4 MiB a gRPC message
    // may hold, under the caps.
    for api in ["big-a", "big-b", "big-c"] {
        cp.create_api(
            api,
            "acme",
            Some(tollgate_sdk::state::ApiSettings {
                base_path: format!("/{api}"),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        for v in 1..=5 {
            cp.create_version(api, &format!("{v}.0.0"), &padded(600))
                .await
                .unwrap();
        }
    }
    // The sixth 600 KiB draft would take big-a past the 3 MiB an API may hold.
    let err = cp
        .create_version("big-a", "6.0.0", &padded(600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("an API may hold"), "{err}");
    // Small drafts: the tenant's 21st is refused.
    cp.create_api(
        "small",
        "acme",
        Some(tollgate_sdk::state::ApiSettings {
            base_path: "/small".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    for v in 1..=5 {
        cp.create_version("small", &format!("{v}.0.0"), "routes: {}\n")
            .await
            .unwrap();
    }
    let err = cp
        .create_version("small", "6.0.0", "routes: {}\n")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("more than 20 drafts"), "{err}");
    // Every listing still works: through the control plane, the node, and the CLI.
    let listed = cp.list_apis("").await.unwrap();
    assert_eq!(listed.len(), 4);
    let node = gw.sdk().await.list_apis(false, "").await.unwrap();
    assert_eq!(node.apis.len(), 4);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["api", "list", "--cp", &cpp.addr.to_string()])
        .env("TOLLGATE_CA", gw.ca_file())
        .env("TOLLGATE_TOKEN", gw.operator_token())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Discarding is never capped.
    cp.transition(
        "small",
        "5.0.0",
        tollgate_sdk::state::version_transition::To::Discard(Default::default()),
    )
    .await
    .unwrap();
    cp.create_version("small", "6.0.0", "routes: {}\n")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_create_prints_the_token_alone_or_as_json() {
    let up = Upstream::start("a").await;
    let gw = GatewayProcess::start(&tagged_spec(up.addr, "0")).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["cluster", "join-token"])
            .args(args)
            .args(["--node", &gw.grpc.to_string()])
            .env("TOLLGATE_CA", gw.ca_file())
            .env("TOLLGATE_TOKEN", gw.operator_token())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let alone = cli(&["create", "--ttl", "10m", "--uses", "2"]);
    assert!(
        tollgate_node::identity::JoinToken::parse(alone.trim()).is_ok(),
        "{alone:?}"
    );
    assert_eq!(alone.lines().count(), 1, "the token alone: {alone:?}");
    let json: serde_json::Value =
        serde_json::from_str(&cli(&["create", "--output", "json"])).unwrap();
    let token = json["token"].as_str().unwrap();
    assert!(tollgate_node::identity::JoinToken::parse(token).is_ok());
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["list", "--output", "json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let id = &token[4..20];
    cli(&["revoke", id]);
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["list", "--output", "json"])).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "a revoked token is not listed without --all"
    );
}

// === tenant boundaries ===

/// `tollgate ARGS` against the control plane at `cp` with `token`: (success, stdout,
/// stderr).
fn tollgate(cp: SocketAddr, ca: &std::path::Path, token: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .args(["--cp", &cp.to_string()])
        .env("TOLLGATE_CA", ca)
        .env("TOLLGATE_TOKEN", token)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// GET `path` through `gw` with an API key; the status.
async fn with_key(gw: &GatewayProcess, path: &str, key: &str) -> u16 {
    let req = http::Request::get(gw.url(path))
        .header("x-api-key", key)
        .body(harness::full(""))
        .unwrap();
    gw.send(req).await.status.as_u16()
}

/// A version's content: every path to `addr` (written as given: an address or a name).
fn onto(addr: &str) -> String {
    format!(
        "upstreams: {{ u: {{ endpoints: [{{ address: \"{addr}\" }}] }} }}\nroutes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }} }}\n"
    )
}

fn mounted_at(base: &str) -> Option<tollgate_sdk::state::ApiSettings> {
    Some(tollgate_sdk::state::ApiSettings {
        base_path: base.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_subscribe_another_without_its_consent() {
    use tollgate_sdk::state::{self, SubscriptionParty};
    let up = Upstream::start("orders").await;
    // acme's API sends requests to the test upstream on loopback: opened.
    let gw = GatewayProcess::start(&harness::allowing_loopback(&tagged_spec(up.addr, "0"))).await;
    let cpp = harness::cp::CpProcess::start(&[gw.grpc]).await;
    let op = cpp.sdk(gw.operator_token());
    let mut tokens = std::collections::HashMap::new();
    let mut keys = std::collections::HashMap::new();
    for t in ["acme", "beta", "gamma", "delta"] {
        op.create_tenant(t).await.unwrap();
        tokens.insert(t, op.create_token(t, "ops", "").await.unwrap().secret);
        keys.insert(t, op.create_key(t, "k", "").await.unwrap().secret);
    }
    let acme = cpp.sdk(&tokens["acme"]);
    acme.create_api("orders", "acme", mounted_at("/orders"))
        .await
        .unwrap();
    acme.create_version("orders", "1.0.0", &onto(&up.addr.to_string()))
        .await
        .unwrap();
    acme.publish("orders", "1.0.0").await.unwrap();
    acme.promote("orders", "1.0.0").await.unwrap();
    eventually("acme's API to be served", T, async || {
        with_key(&gw, "/orders/x", &keys["acme"]).await == 200
    })
    .await;

    // The attack: acme subscribes beta with its own token, even through a raw write that
    // claims to come from the operator. Both are an offer, which lets nothing through.
    let mut forged = state::Subscribe {
        api: "orders".into(),
        ..Default::default()
    };
    forged.set_party(SubscriptionParty::Operator);
    let mut raw = gw.sdk().await.with_token(Some(&tokens["acme"])).unwrap();
    raw.write(state::Command {
        kind: Some(state::command::Kind::Access(state::AccessCommand {
            tenant: "beta".into(),
            op: Some(state::access_command::Op::Subscribe(forged)),
        })),
        ..Default::default()
    })
    .await
    .unwrap();
    let offered = acme.subscribe("beta", "orders", "").await.unwrap();
    let view = offered.subscription.unwrap();
    assert_eq!(
        (view.status.as_str(), view.owner.as_str()),
        ("offered", "acme")
    );
    // Nothing reached the data plane: beta's key is still refused once every change is in.
    let generation = offered.generation;
    eventually("the offer to be served", T, async || {
        gw.sdk().await.status().await.unwrap().spec_generation >= generation
    })
    .await;
    assert_eq!(with_key(&gw, "/orders/x", &keys["beta"]).await, 403);
    let audit = op
        .audit(tollgate_sdk::cp::AuditQuery {
            object_prefix: "tenant/beta".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"subscription.offer") && !actions.contains(&"subscription.grant"),
        "{actions:?}"
    );

    // beta sees the offer and accepts it with its own token (the CLI, as a user would).
    let (ok, listed) = tollgate(
        cpp.addr,
        &gw.ca_file(),
        &tokens["beta"],
        &["subscription", "list"],
    );
    assert!(
        ok && listed.contains("offered") && listed.contains("acme"),
        "{listed}"
    );
    let (ok, out) = tollgate(
        cpp.addr,
        &gw.ca_file(),
        &tokens["beta"],
        &["subscription", "accept", "beta", "orders"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("tenant beta may call versions * of API orders"),
        "{out}"
    );
    eventually(
        "beta's consented subscription to be served",
        T,
        async || with_key(&gw, "/orders/x", &keys["beta"]).await == 200,
    )
    .await;

    // The other way round: gamma asks; acme accepts. gamma does not learn the owner's
    // name from its own waiting request.
    let gamma = cpp.sdk(&tokens["gamma"]);
    let asked = gamma.subscribe("gamma", "orders", "^1").await.unwrap();
    let view = asked.subscription.unwrap();
    assert_eq!(
        (view.status.as_str(), view.owner.as_str()),
        ("requested", "")
    );
    assert_eq!(with_key(&gw, "/orders/x", &keys["gamma"]).await, 403);
    // gamma cannot accept its own request.
    let err = gamma
        .accept_subscription("gamma", "orders")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    let seen = acme.list_subscriptions("gamma", "").await.unwrap();
    assert_eq!(seen[0].status, "requested");
    acme.accept_subscription("gamma", "orders").await.unwrap();
    eventually("gamma's subscription to be served", T, async || {
        with_key(&gw, "/orders/x", &keys["gamma"]).await == 200
    })
    .await;

    // An offer delta declines never lets delta's key in; the CLI says who must act.
    let (ok, out) = tollgate(
        cpp.addr,
        &gw.ca_file(),
        &tokens["acme"],
        &["tenant", "subscribe", "delta", "orders"],
    );
    assert!(ok && out.contains("waiting for delta to accept"), "{out}");
    let (ok, out) = tollgate(
        cpp.addr,
        &gw.ca_file(),
        &tokens["delta"],
        &["subscription", "decline", "delta", "orders"],
    );
    assert!(ok, "{out}");
    assert!(
        op.list_subscriptions("delta", "").await.unwrap().is_empty(),
        "nothing left"
    );
    let err = cpp
        .sdk(&tokens["delta"])
        .accept_subscription("delta", "orders")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert_eq!(with_key(&gw, "/orders/x", &keys["delta"]).await, 403);

    // A tenant cannot subscribe a third tenant to an API it does not own.
    let err = gamma.subscribe("beta", "orders", "").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    // The operator grants at once.
    let granted = op.subscribe("delta", "orders", "").await.unwrap();
    assert_eq!(granted.subscription.unwrap().status, "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_naming_another_tenant_never_bills_it() {
    use tollgate_sdk::{cp, state};
    let up = Upstream::start("pay").await;
    // The APIs' versions send requests to the test upstream on loopback: opened.
    let gw = GatewayProcess::start_with(
        &harness::allowing_loopback(&tagged_spec(up.addr, "0")),
        &["--meter-interval", "200ms"],
    )
    .await;
    let cpp = harness::cp::CpProcess::start(&[gw.grpc]).await;
    let op = cpp.sdk(gw.operator_token());
    for t in ["acme", "beta"] {
        op.create_tenant(t).await.unwrap();
    }
    // beta pays 1.00 a request, with a hard cap at 5.00, and has an API of its own.
    op.put_plan(
        "metered",
        state::PlanPrices {
            per_1k_requests: "1000".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    op.assign_plan("beta", "metered").await.unwrap();
    op.set_budget(state::SetBudget {
        tenant: "beta".into(),
        monthly_limit: "5".into(),
        hard_cap: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let beta_key = op.create_key("beta", "k", "").await.unwrap().secret;
    op.create_api("shop", "beta", mounted_at("/shop"))
        .await
        .unwrap();
    op.create_version("shop", "1.0.0", &onto(&up.addr.to_string()))
        .await
        .unwrap();
    op.publish("shop", "1.0.0").await.unwrap();
    op.promote("shop", "1.0.0").await.unwrap();

    // acme, with its own token, runs a JWT API whose issuer (and HS256 key) it chose.
    let acme = cpp.sdk(&op.create_token("acme", "ops", "").await.unwrap().secret);
    let (jwks, secret) = hs256_jwks();
    acme.create_api("pay", "acme", Some(jwt_settings(&jwks)))
        .await
        .unwrap();
    acme.create_version("pay", "1.0.0", &onto(&up.addr.to_string()))
        .await
        .unwrap();
    acme.publish("pay", "1.0.0").await.unwrap();
    acme.promote("pay", "1.0.0").await.unwrap();
    // Even a subscription beta agreed to changes nothing below.
    acme.subscribe("beta", "pay", "").await.unwrap();
    cpp.sdk(&op.create_token("beta", "ops", "").await.unwrap().secret)
        .accept_subscription("beta", "pay")
        .await
        .unwrap();
    let jwt = |claims: serde_json::Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        let key = jsonwebtoken::EncodingKey::from_secret(&secret).unwrap();
        format!(
            "Bearer {}",
            jsonwebtoken::encode(&h, &claims, &key).unwrap()
        )
    };
    let exp = chrono::Utc::now().timestamp() + 600;
    let base = serde_json::json!({"iss": "https://idp.test", "aud": "pay", "exp": exp});
    let mut naming_beta = base.clone();
    naming_beta["tenant"] = "beta".into();
    let (naming_beta, plain) = (jwt(naming_beta), jwt(base));
    let call = async |token: &str| {
        let req = http::Request::get(gw.url("/pay/charge"))
            .header("authorization", token)
            .body(harness::full(""))
            .unwrap();
        gw.send(req).await
    };
    eventually("acme's API to be served", T, async || {
        call(&plain).await.status == 200
    })
    .await;

    // The attack of the review: 80 requests with JWTs naming beta. Refused, every one.
    for _ in 0..80 {
        let r = call(&naming_beta).await;
        assert_eq!(
            (r.status.as_u16(), r.error_code().as_str()),
            (403, "forbidden")
        );
    }
    // acme's tokens are acme's to pay for; beta's own key is beta's.
    for _ in 0..4 {
        assert_eq!(call(&plain).await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(with_key(&gw, "/shop/x", &beta_key).await, 200);
    }

    // Metered: beta pays for its 3 requests to its own API only; acme for every request
    // its issuer's tokens made (the warm-up included).
    let usage = async || {
        op.usage(cp::UsageQuery {
            since: "1h".into(),
            group_by: "api".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .lines
    };
    let requests = |lines: &[cp::UsageLine], tenant: &str, api: &str| -> u64 {
        lines
            .iter()
            .filter(|l| l.tenant == tenant && l.group == api)
            .map(|l| l.counts.as_ref().unwrap().requests)
            .sum()
    };
    eventually("the requests to be metered", T, async || {
        let lines = usage().await;
        requests(&lines, "beta", "shop") == 3 && requests(&lines, "acme", "pay") >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = usage().await;
    assert_eq!(requests(&lines, "beta", "pay"), 0, "{lines:?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.tenant == "beta")
            .map(|l| l.counts.as_ref().unwrap().requests)
            .sum::<u64>(),
        3,
        "beta is billed for its own requests only: {lines:?}"
    );
    // beta's budget (5.00) holds: its key keeps working.
    let budgets = op.list_budgets().await.unwrap();
    assert!(
        !budgets.budgets[0].budget.as_ref().unwrap().capped,
        "{budgets:?}"
    );
    assert_eq!(with_key(&gw, "/shop/x", &beta_key).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_upstream_cannot_reach_the_nodes_or_loopback() {
    use tonic::Code::{InvalidArgument, PermissionDenied};
    let up = Upstream::start("inside").await;
    // The operator's own spec points at loopback: the operator's to choose.
    let gw = GatewayProcess::start(&tagged_spec(up.addr, "0")).await;
    let cpp = harness::cp::CpProcess::start(&[gw.grpc]).await;
    let op = cpp.sdk(gw.operator_token());
    op.create_tenant("acme").await.unwrap();
    let acme = cpp.sdk(&op.create_token("acme", "ops", "").await.unwrap().secret);
    acme.create_api(
        "evil",
        "acme",
        Some(tollgate_sdk::state::ApiSettings {
            base_path: "/evil".into(),
            auth: "none".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let refused = async |target: &str, code: tonic::Code, says: &[&str]| {
        let err = acme
            .create_version("evil", "1.0.0", &onto(target))
            .await
            .expect_err(target);
        assert_eq!(err.code(), Some(code), "{target}: {err}");
        for s in says {
            assert!(err.to_string().contains(s), "{target}: {err}");
        }
    };
    let at = "upstreams.u.endpoints[0].address";
    // The review's attack: the node's admin port (its /metrics and /quotas), then the
    // others, then loopback, a name for loopback, and the cloud metadata address.
    refused(
        &gw.admin.to_string(),
        PermissionDenied,
        &[at, "admin port of node 1"],
    )
    .await;
    refused(
        &gw.grpc.to_string(),
        PermissionDenied,
        &["gRPC port of node 1"],
    )
    .await;
    refused(
        &gw.proxy.to_string(),
        PermissionDenied,
        &["proxy port of node 1"],
    )
    .await;
    let port = up.addr.port();
    refused(
        &up.addr.to_string(),
        PermissionDenied,
        &["loopback", "tenant_upstreams.allow"],
    )
    .await;
    refused(
        &format!("localhost:{port}"),
        PermissionDenied,
        &["localhost", "resolves to", "loopback"],
    )
    .await;
    refused("169.254.169.254:80", PermissionDenied, &["link-local"]).await;
    refused("0.0.0.0:80", PermissionDenied, &["unspecified"]).await;
    // A version cannot open the list for itself.
    let own_list = format!(
        "{}tenant_upstreams: {{ allow: [0.0.0.0/0] }}\n",
        onto("10.9.9.9:80")
    );
    let err = acme
        .create_version("evil", "1.0.0", &own_list)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(InvalidArgument), "{err}");

    // The operator's spec may point anywhere, the node's admin port included.
    let admin_route = format!(
        "{}upstreams: {{ admin: {{ endpoints: [{{ address: \"{}\" }}] }} }}\nroutes: {{ metrics: {{ match: {{ path: {{ exact: /metrics }} }}, upstream: admin }} }}\n",
        "", gw.admin
    );
    let mut node = gw.sdk().await;
    node.apply_spec(admin_route, false, "").await.unwrap();
    eventually("the operator's route to the admin port", T, async || {
        gw.get("/metrics").await.status == 200
    })
    .await;

    // The operator opens loopback (but 127.0.0.2) to tenants: loopback upstreams are
    // taken, the node's own ports still never.
    let opened = format!(
        "{}tenant_upstreams: {{ allow: [127.0.0.0/8], deny: [127.0.0.2] }}\n",
        tagged_spec(up.addr, "1")
    );
    node.apply_spec(opened, false, "").await.unwrap();
    refused(
        &gw.admin.to_string(),
        PermissionDenied,
        &["admin port of node 1"],
    )
    .await;
    refused(
        &format!("127.0.0.2:{port}"),
        PermissionDenied,
        &["127.0.0.2/32", "tenant_upstreams.deny"],
    )
    .await;
    acme.create_version("evil", "1.0.0", &onto(&up.addr.to_string()))
        .await
        .unwrap();
    acme.publish("evil", "1.0.0").await.unwrap();
    acme.promote("evil", "1.0.0").await.unwrap();
    eventually(
        "the tenant's loopback upstream to be served",
        T,
        async || gw.get("/evil/x").await.status == 200,
    )
    .await;

    // Every node checks again what it compiles, against the address a name resolves to
    // then: with loopback closed again, the published version is not served (a name
    // that turned into a loopback address later is caught the same way).
    node.apply_spec(tagged_spec(up.addr, "2"), false, "")
        .await
        .unwrap();
    eventually("the version to be taken out", T, async || {
        let r = gw.get("/evil/x").await;
        r.status == 503 && r.error_code() == "version_unavailable"
    })
    .await;
    let log = gw.log();
    assert!(
        log.contains("version 1.0.0 of API evil") && log.contains("loopback"),
        "{log}"
    );
    let hits = up.hits();
    assert_eq!(gw.get("/evil/x").await.status, 503);
    assert_eq!(up.hits(), hits, "nothing reached the upstream");
}
