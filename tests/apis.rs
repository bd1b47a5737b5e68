//! APIs on the data plane, set up through the control plane: version selection (path
//! prefix, `Api-Version`, split, sticky), deprecation headers, 410 for retired versions,
//! API keys (401/403), subscriptions, JWT, rollback and key revocation on every node of a
//! 3-node cluster, and tenant isolation on every control-plane call.
//!
//! The versions published here send requests to test upstreams on 127.0.0.1, which API
//! versions may not reach by default: every node here opens loopback to them
//! (`harness::allowing_loopback`, as `tollgate dev` does).

mod harness;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use harness::cluster::{TestCluster, tagged_spec};
use harness::cp::CpProcess;
use harness::{GatewayProcess, TestResponse, Upstream, allowing_loopback, full};
use http::Request;
use tollgate_sdk::{ControlPlaneClient, cp, state};

const T: Duration = Duration::from_secs(20);

/// A version's content: every path to upstream `addr`.
fn content(addr: std::net::SocketAddr) -> String {
    format!(
        "upstreams: {{ u: {{ endpoints: [{{ address: \"{addr}\" }}] }} }}\nroutes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }} }}\n"
    )
}

fn settings(base: &str) -> state::ApiSettings {
    state::ApiSettings {
        base_path: base.into(),
        ..Default::default()
    }
}

/// GET `path` on `gw` with headers.
async fn get(gw: &GatewayProcess, path: &str, headers: &[(&str, &str)]) -> TestResponse {
    let mut req = Request::get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    gw.send(req.body(full("")).unwrap()).await
}

/// Which upstream answered.
fn upstream(r: &TestResponse) -> String {
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["upstream"].as_str().unwrap().to_string()
}

/// Two published versions of `orders` (v1 -> `a`, v2 -> `b`) owned by acme, split as given.
async fn two_versions(cp: &ControlPlaneClient, a: &Upstream, b: &Upstream, split: &[(&str, u32)]) {
    cp.create_tenant("acme").await.unwrap();
    cp.create_api("orders", "acme", Some(settings("/orders")))
        .await
        .unwrap();
    cp.create_version("orders", "1.0.0", &content(a.addr))
        .await
        .unwrap();
    cp.create_version("orders", "2.0.0", &content(b.addr))
        .await
        .unwrap();
    cp.publish("orders", "1.0.0").await.unwrap();
    cp.publish("orders", "2.0.0").await.unwrap();
    cp.set_split("orders", split).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_chosen_by_prefix_header_and_split_and_callers_by_key() {
    let (a, b, plain) = (
        Upstream::start("v1").await,
        Upstream::start("v2").await,
        Upstream::start("plain").await,
    );
    let gw = GatewayProcess::start(&allowing_loopback(&tagged_spec(plain.addr, "spec"))).await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(gw.operator_token());
    two_versions(&cp, &a, &b, &[("1.0.0", 90), ("2.0.0", 10)]).await;
    let key = cp.create_key("acme", "test", "").await.unwrap();
    assert!(key.secret.starts_with("tgk_"), "{}", key.secret);
    let k = key.secret.as_str();

    // The spec's own routes are untouched by the API.
    assert_eq!(upstream(&get(&gw, "/elsewhere", &[]).await), "plain");

    // Who may call: no key 401, an unknown key 401, a good key in either header.
    let none = get(&gw, "/orders/v1/items", &[]).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.error_code(), "unauthorized");
    assert!(none.header("www-authenticate").is_some());
    let bad = get(&gw, "/orders/v1/items", &[("x-api-key", "tgk_00_nope")]).await;
    assert_eq!(bad.status, 401);
    let mut forged = k.to_string();
    forged.pop();
    forged.push(if k.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        get(&gw, "/orders/v1/items", &[("x-api-key", &forged)])
            .await
            .status,
        401,
        "a key with one character changed"
    );
    let bearer = format!("Bearer {k}");
    let r = get(&gw, "/orders/v1/items/7", &[("authorization", &bearer)]).await;
    assert_eq!(upstream(&r), "v1");
    assert_eq!(
        r.json()["path"],
        "/items/7",
        "the upstream gets the path below the base path and version"
    );
    let seen = a.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen.get("x-tollgate-tenant").unwrap(), "acme");
    assert_eq!(seen.get("x-tollgate-api-version").unwrap(), "1.0.0");
    assert!(
        seen.get("authorization").is_none() && seen.get("x-api-key").is_none(),
        "the API key is not passed to the upstream: {seen:?}"
    );

    // Selection by prefix and by header; the prefix wins over the header.
    assert_eq!(
        upstream(&get(&gw, "/orders/v2/items", &[("x-api-key", k)]).await),
        "v2"
    );
    for (h, want) in [("2", "v2"), ("1.0.0", "v1"), ("v2.0", "v2")] {
        let r = get(
            &gw,
            "/orders/items",
            &[("x-api-key", k), ("api-version", h)],
        )
        .await;
        assert_eq!(upstream(&r), want, "Api-Version: {h}");
    }
    let r = get(
        &gw,
        "/orders/v1/items",
        &[("x-api-key", k), ("api-version", "2")],
    )
    .await;
    assert_eq!(upstream(&r), "v1");
    let missing = get(&gw, "/orders/v7/items", &[("x-api-key", k)]).await;
    assert_eq!(
        (missing.status.as_u16(), missing.error_code().as_str()),
        (404, "version_not_found")
    );
    let garbled = get(
        &gw,
        "/orders/items",
        &[("x-api-key", k), ("api-version", "two")],
    )
    .await;
    assert_eq!(garbled.status, 404);

    // A 90/10 canary over 10,000 requests lands within ±2 points.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let n = 10_000;
    let mut tasks = Vec::new();
    for part in 0..4 {
        let (url, k) = (gw.url("/orders/items"), k.to_string());
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<harness::Body>();
        tasks.push(tokio::spawn(async move {
            let mut local: HashMap<String, usize> = HashMap::new();
            for _ in 0..n / 4 {
                let req = Request::get(&url)
                    .header("x-api-key", &k)
                    .body(full(""))
                    .unwrap();
                let resp = TestResponse::read(client.request(req).await.unwrap()).await;
                *local.entry(upstream(&resp)).or_default() += 1;
            }
            let _ = part;
            local
        }));
    }
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    let canary = counts.get("v2").copied().unwrap_or(0) as f64 / n as f64;
    eprintln!(
        "90/10 canary over {n} requests: {counts:?} ({:.2}% to v2)",
        canary * 100.0
    );
    assert!((0.08..=0.12).contains(&canary), "{counts:?}");

    // Another tenant's key: 403 until subscribed, then only the versions subscribed.
    cp.create_tenant("beta").await.unwrap();
    let beta = cp.create_key("beta", "", "").await.unwrap().secret;
    let denied = get(&gw, "/orders/v2/items", &[("x-api-key", &beta)]).await;
    assert_eq!(
        (denied.status.as_u16(), denied.error_code().as_str()),
        (403, "forbidden")
    );
    cp.subscribe("beta", "orders", "^2").await.unwrap();
    harness::eventually("the subscription to reach the data plane", T, async || {
        get(&gw, "/orders/v2/items", &[("x-api-key", &beta)])
            .await
            .status
            == 200
    })
    .await;
    // The 90/10 split, for a caller who may only call 2.x: always 2.x, never a 403.
    for _ in 0..50 {
        assert_eq!(
            upstream(&get(&gw, "/orders/items", &[("x-api-key", &beta)]).await),
            "v2"
        );
    }
    assert_eq!(
        get(&gw, "/orders/v1/items", &[("x-api-key", &beta)])
            .await
            .status,
        403
    );

    // Deprecation: Deprecation, Sunset and the successor link; then retired: 410.
    cp.transition(
        "orders",
        "1.0.0",
        state::version_transition::To::Deprecate(state::Deprecate {
            sunset: "2027-06-30T00:00:00Z".into(),
            successor: "2.0.0".into(),
        }),
    )
    .await
    .unwrap();
    let r = get(&gw, "/orders/v1/items", &[("x-api-key", k)]).await;
    assert_eq!(upstream(&r), "v1");
    let dep = r.header("deprecation").unwrap();
    assert!(
        dep.starts_with('@') && dep[1..].parse::<u64>().is_ok(),
        "{dep}"
    );
    assert_eq!(r.header("sunset"), Some("Wed, 30 Jun 2027 00:00:00 GMT"));
    assert_eq!(
        r.header("link"),
        Some("</orders/v2>; rel=\"successor-version\"")
    );
    assert!(
        get(&gw, "/orders/v2/items", &[("x-api-key", k)])
            .await
            .header("deprecation")
            .is_none()
    );
    cp.promote("orders", "2.0.0").await.unwrap();
    cp.transition(
        "orders",
        "1.0.0",
        state::version_transition::To::Retire(state::Empty {}),
    )
    .await
    .unwrap();
    let gone = get(&gw, "/orders/v1/items", &[("x-api-key", k)]).await;
    assert_eq!(
        (gone.status.as_u16(), gone.error_code().as_str()),
        (410, "version_retired")
    );
    assert_eq!(
        upstream(&get(&gw, "/orders/items", &[("x-api-key", k)]).await),
        "v2"
    );

    // Sticky: each key stays on one version of a 50/50 split.
    cp.create_version("orders", "3.0.0", &content(a.addr))
        .await
        .unwrap();
    cp.publish("orders", "3.0.0").await.unwrap();
    cp.set_split("orders", &[("2.0.0", 50), ("3.0.0", 50)])
        .await
        .unwrap();
    cp.update_api(
        "orders",
        state::ApiSettings {
            sticky: true,
            ..settings("/orders")
        },
    )
    .await
    .unwrap();
    for key in [k, beta.as_str()] {
        // beta may call ^2 only, so the sticky pick must land it on 2.0.0 or it gets 403:
        // either way, the same answer every time.
        // Every request has its own x-request-id: the rest of the answer is the same.
        let without_id = |body: &[u8]| -> serde_json::Value {
            let mut v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            if let Some(h) = v.get_mut("headers").and_then(|h| h.as_object_mut()) {
                h.remove("x-request-id");
            }
            v
        };
        let first = get(&gw, "/orders/items", &[("x-api-key", key)]).await;
        for _ in 0..30 {
            let again = get(&gw, "/orders/items", &[("x-api-key", key)]).await;
            assert_eq!(again.status, first.status);
            assert_eq!(without_id(&again.body), without_id(&first.body));
        }
    }

    // An expired key is refused with its own message.
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let short = cp.create_key("acme", "short", &soon).await.unwrap().secret;
    assert_eq!(
        get(&gw, "/orders/v2/x", &[("x-api-key", &short)])
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = get(&gw, "/orders/v2/x", &[("x-api-key", &short)]).await;
    assert_eq!(expired.status, 401);
    assert!(
        expired.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_with_jwt_auth_takes_tokens_from_its_issuer_only() {
    use base64::Engine;
    let (a, plain) = (Upstream::start("v1").await, Upstream::start("plain").await);
    let gw = GatewayProcess::start(&allowing_loopback(&tagged_spec(plain.addr, "spec"))).await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(gw.operator_token());
    cp.create_tenant("acme").await.unwrap();
    let secret = b"0123456789abcdef0123456789abcdef";
    let jwks = format!(
        r#"{{"keys":[{{"kty":"oct","alg":"HS256","kid":"k1","k":"{}"}}]}}"#,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let jwt_settings = state::ApiSettings {
        base_path: "/pay".into(),
        auth: "jwt".into(),
        jwt: Some(state::JwtSettings {
            issuer: "https://idp.test".into(),
            audience: "pay".into(),
            jwks,
            tenant_claim: String::new(),
        }),
        ..Default::default()
    };
    cp.create_api("pay", "acme", Some(jwt_settings))
        .await
        .unwrap();
    let listed = cp.get_api("pay").await.unwrap().api.unwrap();
    let shown = &listed.settings.unwrap().jwt.unwrap().jwks;
    assert!(
        shown.contains("(redacted)")
            && !shown.contains(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)),
        "a symmetric JWT key is a secret: {shown}"
    );
    cp.create_version("pay", "1.0.0", &content(a.addr))
        .await
        .unwrap();
    cp.publish("pay", "1.0.0").await.unwrap();
    cp.promote("pay", "1.0.0").await.unwrap();
    let sign = |claims: serde_json::Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        let key = jsonwebtoken::EncodingKey::from_secret(secret).unwrap();
        format!(
            "Bearer {}",
            jsonwebtoken::encode(&h, &claims, &key).unwrap()
        )
    };
    let exp = chrono::Utc::now().timestamp() + 600;
    let good = sign(
        serde_json::json!({"iss": "https://idp.test", "aud": "pay", "exp": exp, "tenant": "acme"}),
    );
    assert_eq!(
        upstream(&get(&gw, "/pay/charge", &[("authorization", &good)]).await),
        "v1"
    );
    let wrong_aud = sign(
        serde_json::json!({"iss": "https://idp.test", "aud": "else", "exp": exp, "tenant": "acme"}),
    );
    assert_eq!(
        get(&gw, "/pay/charge", &[("authorization", &wrong_aud)])
            .await
            .status,
        401
    );
    let other_tenant = sign(
        serde_json::json!({"iss": "https://idp.test", "aud": "pay", "exp": exp, "tenant": "beta"}),
    );
    assert_eq!(
        get(&gw, "/pay/charge", &[("authorization", &other_tenant)])
            .await
            .status,
        403,
        "a valid token naming another tenant than acme, which the issuer is registered to"
    );
    assert_eq!(get(&gw, "/pay/charge", &[]).await.status, 401);
    // A JWKS that is not one is refused when the API is changed, and nothing changes.
    let err = cp
        .update_api(
            "pay",
            state::ApiSettings {
                base_path: "/pay".into(),
                auth: "jwt".into(),
                jwt: Some(state::JwtSettings {
                    issuer: "i".into(),
                    audience: "a".into(),
                    jwks: "{}".into(),
                    tenant_claim: String::new(),
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert_eq!(
        upstream(&get(&gw, "/pay/charge", &[("authorization", &good)]).await),
        "v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_key_revocation_reach_every_node_of_a_cluster() {
    let (a, b, plain) = (
        Upstream::start("v1").await,
        Upstream::start("v2").await,
        Upstream::start("plain").await,
    );
    let c = TestCluster::start(3, &allowing_loopback(&tagged_spec(plain.addr, "spec")), &[]).await;
    let nodes: Vec<std::net::SocketAddr> = c.ids().iter().map(|id| c.node(*id).grpc).collect();
    let cpp = CpProcess::start(&nodes).await;
    let cp = cpp.sdk(&c.token);
    two_versions(&cp, &a, &b, &[("1.0.0", 90), ("2.0.0", 10)]).await;
    let key = cp.create_key("acme", "ci", "").await.unwrap();
    cp.promote("orders", "2.0.0").await.unwrap();

    // One call restores the canary; every node then splits 90/10 again.
    let rolled = cp.rollback("orders").await.unwrap();
    let want: Vec<(String, u32)> = vec![("1.0.0".into(), 90), ("2.0.0".into(), 10)];
    let split = |api: &state::ApiState| -> Vec<(String, u32)> {
        api.split
            .iter()
            .map(|e| (e.version.clone(), e.weight))
            .collect()
    };
    assert_eq!(split(rolled.api.as_ref().unwrap()), want);
    for id in c.ids() {
        let gw = c.node(id);
        let k = key.secret.clone();
        harness::eventually(&format!("node {id} to split 90/10"), T, async || {
            let mut v1 = 0;
            for _ in 0..200 {
                if upstream(&get(gw, "/orders/items", &[("x-api-key", &k)]).await) == "v1" {
                    v1 += 1;
                }
            }
            (160..200).contains(&v1)
        })
        .await;
        let local = c
            .client(id)
            .await
            .list_apis(true, "acme")
            .await
            .unwrap()
            .apis;
        assert_eq!(split(&local[0]), want, "node {id}'s own state");
    }

    // The state holds no plaintext key: not in any node's files.
    // `tgk_<id>_<secret>`: the secret is base64url, which may itself hold a `_`.
    let secret = key
        .secret
        .splitn(3, '_')
        .nth(2)
        .unwrap()
        .as_bytes()
        .to_vec();
    assert_eq!(secret.len(), 43, "{}", key.secret);
    for id in c.ids() {
        let dir = c.node(id).dir.join("data");
        for entry in harness::walk(&dir) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{} holds the key's secret",
                entry.display()
            );
        }
    }

    // Revocation: time from the acknowledged revoke until every node refuses the key.
    let k = key.secret.clone();
    for id in c.ids() {
        assert_eq!(
            get(c.node(id), "/orders/v2/x", &[("x-api-key", &k)])
                .await
                .status,
            200
        );
    }
    let id = key.credential.unwrap().id;
    let started = Instant::now();
    cp.revoke_key("acme", &id).await.unwrap();
    let acked = started.elapsed();
    let mut last = Duration::ZERO;
    for node in c.ids() {
        let gw = c.node(node);
        loop {
            if get(gw, "/orders/v2/x", &[("x-api-key", &k)]).await.status == 401 {
                break;
            }
            assert!(
                started.elapsed() < T,
                "node {node} still takes a revoked key"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        last = last.max(started.elapsed());
    }
    eprintln!(
        "key revocation: acknowledged after {:.1} ms; refused on all 3 nodes after {:.1} ms",
        acked.as_secs_f64() * 1000.0,
        last.as_secs_f64() * 1000.0
    );
}

/// Each case: what was called, and its result (only the status matters).
type Case = (&'static str, Result<(), tollgate_sdk::Error>);

fn ok<T>(r: Result<T, tollgate_sdk::Error>) -> Result<(), tollgate_sdk::Error> {
    r.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_sees_and_changes_only_its_own_tenant() {
    use state::version_transition::To;
    let plain = Upstream::start("plain").await;
    let gw = GatewayProcess::start(&allowing_loopback(&tagged_spec(plain.addr, "spec"))).await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let op = cpp.sdk(gw.operator_token());
    op.create_tenant("acme").await.unwrap();
    op.create_tenant("beta").await.unwrap();
    let acme_token = op.create_token("acme", "ops", "").await.unwrap().secret;
    let beta_token = op.create_token("beta", "ops", "").await.unwrap().secret;
    let acme = cpp.sdk(&acme_token);
    let beta = cpp.sdk(&beta_token);

    // acme, with its own token, runs its API.
    acme.create_api("orders", "acme", Some(settings("/orders")))
        .await
        .unwrap();
    acme.create_version("orders", "1.0.0", &content(plain.addr))
        .await
        .unwrap();
    acme.publish("orders", "1.0.0").await.unwrap();
    acme.promote("orders", "1.0.0").await.unwrap();
    acme.create_version("orders", "2.0.0", &content(plain.addr))
        .await
        .unwrap();
    let acme_key = acme.create_key("acme", "k", "").await.unwrap();
    let acme_key_id = acme_key.credential.unwrap().id;
    let acme_token_id = acme.list_tokens("", false).await.unwrap()[0].id.clone();
    let audit_before = op.audit(cp::AuditQuery::default()).await.unwrap().len();
    let apis_before = op.list_apis("").await.unwrap();

    // beta tries every control-plane call on acme's objects.
    let cases: Vec<Case> = vec![
        ("GetApi", ok(beta.get_api("orders").await)),
        (
            "CreateApi for acme",
            ok(beta.create_api("x", "acme", None).await),
        ),
        (
            "UpdateApi",
            ok(beta.update_api("orders", settings("/stolen")).await),
        ),
        (
            "CreateVersion",
            ok(beta.create_version("orders", "9.0.0", "").await),
        ),
        (
            "TransitionVersion edit",
            ok(beta
                .transition("orders", "2.0.0", To::Edit("routes: {}".into()))
                .await),
        ),
        (
            "TransitionVersion publish",
            ok(beta.publish("orders", "2.0.0").await),
        ),
        (
            "TransitionVersion discard",
            ok(beta
                .transition("orders", "2.0.0", To::Discard(state::Empty {}))
                .await),
        ),
        (
            "SetSplit",
            ok(beta.set_split("orders", &[("1.0.0", 1)]).await),
        ),
        ("Promote", ok(beta.promote("orders", "1.0.0").await)),
        ("Rollback", ok(beta.rollback("orders").await)),
        ("CreateTenant", ok(beta.create_tenant("gamma").await)),
        ("DeleteTenant", ok(beta.delete_tenant("acme").await)),
        (
            "CreateKey for acme",
            ok(beta.create_key("acme", "", "").await),
        ),
        ("ListKeys of acme", ok(beta.list_keys("acme", true).await)),
        (
            "RevokeKey of acme",
            ok(beta.revoke_key("acme", &acme_key_id).await),
        ),
        (
            "RevokeKey of acme, as beta's",
            ok(beta.revoke_key("beta", &acme_key_id).await),
        ),
        (
            "CreateToken for acme",
            ok(beta.create_token("acme", "", "").await),
        ),
        (
            "ListTokens of acme",
            ok(beta.list_tokens("acme", true).await),
        ),
        (
            "RevokeToken of acme",
            ok(beta.revoke_token("acme", &acme_token_id).await),
        ),
        // beta may ask for a subscription of its own (acme then accepts or not: see
        // tests/security.rs), never subscribe another tenant to an API it does not own.
        (
            "Subscribe acme to acme's API",
            ok(beta.subscribe("acme", "orders", "").await),
        ),
        (
            "Unsubscribe acme from acme's API",
            ok(beta.unsubscribe("acme", "orders").await),
        ),
    ];
    for (what, result) in cases {
        let err = result.expect_err(what);
        let code = err.code().unwrap();
        assert!(
            matches!(code, tonic::Code::PermissionDenied | tonic::Code::NotFound),
            "{what}: {err}"
        );
        let msg = err.to_string();
        for secret in [acme_key_id.as_str(), acme_token_id.as_str()] {
            assert!(
                !msg.contains(secret) || what.contains("Revoke"),
                "{what} leaks an id: {msg}"
            );
        }
    }
    // Lists show only beta's own things, and no counts of anyone else's.
    assert!(beta.list_apis("").await.unwrap().is_empty());
    assert!(beta.list_apis("acme").await.unwrap().is_empty());
    let tenants: Vec<String> = beta
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(tenants, ["beta"]);
    assert!(beta.list_keys("", true).await.unwrap().is_empty());
    assert!(
        beta.list_tokens("", true)
            .await
            .unwrap()
            .iter()
            .all(|t| t.tenant == "beta")
    );
    let beta_audit = beta.audit(cp::AuditQuery::default()).await.unwrap();
    assert!(
        beta_audit.iter().all(|e| e.tenant == "beta"),
        "{beta_audit:?}"
    );
    assert!(!beta_audit.is_empty(), "beta sees its own entries");

    // Nothing changed, and the operator sees everything.
    assert_eq!(op.list_apis("").await.unwrap(), apis_before);
    let audit = op.audit(cp::AuditQuery::default()).await.unwrap();
    assert_eq!(audit.len(), audit_before, "refused calls are not changes");
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str()))
        .collect();
    assert!(
        actions
            .iter()
            .any(|(a, x)| a.starts_with("tenant/acme/") && *x == "version.publish"),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|(a, x)| a.starts_with("operator/") && *x == "tenant.create"),
        "{actions:?}"
    );
    let publish = audit
        .iter()
        .find(|e| e.action == "version.publish")
        .unwrap();
    assert!(publish.before.contains("draft") && publish.after.contains("published"));
    assert!(
        audit.iter().all(|e| !e.after.contains(&acme_key.secret)),
        "no secret in the audit log"
    );

    // No token, or a revoked one: UNAUTHENTICATED.
    let anon = ControlPlaneClient::new(&[&cpp.addr.to_string()], &cpp.tls).unwrap();
    assert_eq!(
        anon.list_apis("").await.unwrap_err().code(),
        Some(tonic::Code::Unauthenticated)
    );
    op.revoke_token("beta", &beta.list_tokens("", false).await.unwrap()[0].id)
        .await
        .unwrap();
    assert_eq!(
        beta.list_apis("").await.unwrap_err().code(),
        Some(tonic::Code::Unauthenticated)
    );

    // `tollgate audit` shows who did what.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "audit",
            "--cp",
            &cpp.addr.to_string(),
            "--object",
            "api/orders",
        ])
        .env("TOLLGATE_CA", gw.ca_file())
        .env("TOLLGATE_TOKEN", gw.operator_token())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("version.publish") && text.contains("tenant/acme/"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_tenants_keys_and_audit_is_refused_and_changes_nothing() {
    use tonic::Code::{FailedPrecondition, InvalidArgument, NotFound};
    let plain = Upstream::start("plain").await;
    let gw = GatewayProcess::start(&allowing_loopback(&tagged_spec(plain.addr, "spec"))).await;
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let op = cpp.sdk(gw.operator_token());
    op.create_tenant("acme").await.unwrap();
    op.create_api("orders", "acme", None).await.unwrap();
    let before = op.audit(cp::AuditQuery::default()).await.unwrap().len();
    let long = "x".repeat(300);
    let cases: Vec<(&str, Result<(), tollgate_sdk::Error>, tonic::Code)> = vec![
        (
            "empty tenant",
            ok(op.create_tenant("").await),
            InvalidArgument,
        ),
        (
            "bad tenant name",
            ok(op.create_tenant("Acme Inc").await),
            InvalidArgument,
        ),
        (
            "oversized tenant",
            ok(op.create_tenant(&long).await),
            InvalidArgument,
        ),
        (
            "tenant exists",
            ok(op.create_tenant("acme").await),
            FailedPrecondition,
        ),
        (
            "delete unknown",
            ok(op.delete_tenant("nope").await),
            NotFound,
        ),
        (
            "delete a tenant that owns APIs",
            ok(op.delete_tenant("acme").await),
            FailedPrecondition,
        ),
        (
            "key for unknown tenant",
            ok(op.create_key("nope", "", "").await),
            NotFound,
        ),
        (
            "key with a bad expiry",
            ok(op.create_key("acme", "", "tomorrow").await),
            InvalidArgument,
        ),
        (
            "key expiring in the past",
            ok(op.create_key("acme", "", "2001-01-01T00:00:00Z").await),
            InvalidArgument,
        ),
        (
            "oversized label",
            ok(op.create_key("acme", &long, "").await),
            InvalidArgument,
        ),
        (
            "revoke unknown key",
            ok(op.revoke_key("acme", "0000").await),
            NotFound,
        ),
        (
            "subscribe to unknown API",
            ok(op.subscribe("acme", "nope", "").await),
            NotFound,
        ),
        (
            "subscribe with bad semver",
            ok(op.subscribe("acme", "orders", "two-ish").await),
            InvalidArgument,
        ),
        (
            "unsubscribe when not subscribed",
            ok(op.unsubscribe("acme", "orders").await),
            NotFound,
        ),
        (
            "audit since garbage",
            ok(op
                .audit(cp::AuditQuery {
                    since: "yesterday".into(),
                    ..Default::default()
                })
                .await),
            InvalidArgument,
        ),
        (
            "api with a bad base path",
            ok(op.create_api("x", "acme", Some(settings("no-slash"))).await),
            InvalidArgument,
        ),
        (
            "api with a version-like base path",
            ok(op.create_api("x", "acme", Some(settings("/v2"))).await),
            InvalidArgument,
        ),
        (
            "api mounted where another is",
            ok(op.create_api("x", "acme", None).await),
            FailedPrecondition,
        ),
        (
            "api with an unknown auth",
            ok(op
                .create_api(
                    "x",
                    "acme",
                    Some(state::ApiSettings {
                        auth: "magic".into(),
                        ..settings("/x")
                    }),
                )
                .await),
            InvalidArgument,
        ),
        (
            "version content that is not a spec",
            ok(op.create_version("orders", "1.0.0", "routes: [1, 2]").await),
            InvalidArgument,
        ),
        (
            "version content that sets quotas (the cluster's spec does)",
            ok(op
                .create_version(
                    "orders",
                    "1.0.1",
                    &format!(
                        "{}quotas: {{ q: {{ scope: key, limit: 5, window: minute }} }}\n",
                        content("127.0.0.1:9".parse().unwrap())
                    ),
                )
                .await),
            InvalidArgument,
        ),
    ];
    for (what, result, code) in cases {
        let err = result.expect_err(what);
        assert_eq!(err.code(), Some(code), "{what}: {err}");
        assert!(err.to_string().len() > 20, "{what}: {err}");
    }
    assert_eq!(
        op.audit(cp::AuditQuery::default()).await.unwrap().len(),
        before,
        "state unchanged"
    );

    // A create-key retried with the same request id is applied once, and the retry is told
    // its secret went to the first attempt instead of getting a secret that was never
    // stored. Another caller's command with the same id is its own.
    let mut node = gw.sdk().await;
    let make_key = || state::Command {
        request_id: "retried-1".into(),
        kind: Some(state::command::Kind::Access(state::AccessCommand {
            tenant: "acme".into(),
            op: Some(state::access_command::Op::CreateKey(Default::default())),
        })),
        ..Default::default()
    };
    let first = node.write(make_key()).await.unwrap();
    assert!(first.secret.starts_with("tgk_"));
    let again = node.write(make_key()).await.unwrap_err();
    assert_eq!(again.code(), Some(tonic::Code::AlreadyExists), "{again}");
    assert!(again.to_string().contains(&first.credential_id), "{again}");
    let acme_token = op.create_token("acme", "", "").await.unwrap().secret;
    let mut as_acme = gw.sdk().await.with_token(Some(&acme_token)).unwrap();
    let other = as_acme.write(make_key()).await.unwrap();
    assert_ne!(other.credential_id, first.credential_id, "not swallowed");
    assert_eq!(op.list_keys("acme", false).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_takes_tenants_apis_versions_subscriptions_and_splits_from_one_file() {
    let (a, b, plain) = (
        Upstream::start("v1").await,
        Upstream::start("v2").await,
        Upstream::start("plain").await,
    );
    let gw = GatewayProcess::start(&allowing_loopback(&tagged_spec(plain.addr, "spec"))).await;
    let file = gw.dir.join("all.yaml");
    let write = |v2_stage: &str, split: &str| {
        let text = format!(
            r#"upstreams:
  a: {{ endpoints: [{{ address: "{plain}" }}] }}
routes:
  r: {{ match: {{ path: {{ prefix: / }} }}, upstream: a }}
# The file's spec replaces the cluster's: it opens loopback to the versions below itself.
tenant_upstreams: {{ allow: [127.0.0.0/8] }}
tenants:
  acme: {{}}
  beta:
    subscriptions: {{ orders: "^2" }}
apis:
  orders:
    tenant: acme
    base_path: /orders
    versions:
      1.0.0:
        stage: published
        spec: {{ upstreams: {{ u: {{ endpoints: [{{ address: "{a}" }}] }} }}, routes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }} }} }}
      2.0.0:
        stage: {v2_stage}
        spec: {{ upstreams: {{ u: {{ endpoints: [{{ address: "{b}" }}] }} }}, routes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }} }} }}
    split: {split}
"#,
            plain = plain.addr,
            a = a.addr,
            b = b.addr,
        );
        std::fs::write(&file, text).unwrap();
    };
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .args(["--node", &gw.grpc.to_string()])
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
    let path = file.to_str().unwrap().to_string();
    write("published", "{ 1.0.0: 90, 2.0.0: 10 }");
    let (code, out, err) = cli(&["apply", "-f", &path, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "+ tenant/acme",
        "+ api/orders",
        "+ api/orders@1.0.0",
        "~ api/orders@2.0.0 (published)",
        "~ api/orders (split 1.0.0=90 2.0.0=10)",
        "~ tenant/beta (subscribe orders ^2)",
        "Dry run: nothing applied.",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    let (code, out, err) = cli(&["apply", "-f", &path]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("Applied: generation"), "{out}");
    // The file's objects are served: the split, and beta's subscription.
    let mut client = gw.sdk().await;
    let apis = client.list_apis(false, "").await.unwrap().apis;
    assert_eq!(apis[0].split.len(), 2);
    let (code, out, _) = cli(&["apply", "-f", &path]);
    assert_eq!(code, Some(0));
    assert!(out.contains("Tenants and APIs: 0 change(s)."), "{out}");

    // Promote in the file; a bad file lists every error and applies nothing.
    write("deprecated", "{ 2.0.0: 1 }");
    let (code, out, err) = cli(&["apply", "-f", &path]);
    assert_eq!(code, Some(0), "{out}{err}");
    let apis = client.list_apis(false, "").await.unwrap().apis;
    let stages: Vec<&str> = apis[0].versions.iter().map(|v| v.stage.as_str()).collect();
    assert_eq!(stages, ["published", "deprecated"]);
    write("draft", "{ 9.x: 1 }");
    let before = client.list_apis(false, "").await.unwrap();
    let (code, _, err) = cli(&["apply", "-f", &path]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("never moves back") && err.contains("apis.orders.split"),
        "{err}"
    );
    assert_eq!(client.list_apis(false, "").await.unwrap(), before);

    // One file that needs its steps in order: a new 3.0.0 takes the traffic before 2.0.0
    // (which has it now) is retired, and 1.0.0 is deprecated towards it, then retired.
    let spec_of = |addr: std::net::SocketAddr| {
        format!(
            "{{ upstreams: {{ u: {{ endpoints: [{{ address: \"{addr}\" }}] }} }}, routes: {{ all: {{ match: {{ path: {{ prefix: / }} }}, upstream: u }} }} }}"
        )
    };
    let text = format!(
        "apis:\n  orders:\n    tenant: acme\n    base_path: /orders\n    versions:\n      1.0.0: {{ stage: retired, successor: 3.0.0, spec: {v1} }}\n      2.0.0: {{ stage: retired, spec: {v2} }}\n      3.0.0: {{ stage: published, spec: {v2} }}\n    split: {{ 3.0.0: 1 }}\n",
        v1 = spec_of(a.addr),
        v2 = spec_of(b.addr),
    );
    std::fs::write(&file, text).unwrap();
    let (code, out, err) = cli(&["apply", "-f", &path]);
    assert_eq!(code, Some(0), "{out}{err}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("  ")).collect();
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
    assert!(at("@3.0.0 (published)") < at("(split 3.0.0=1)"), "{out}");
    assert!(at("(split 3.0.0=1)") < at("@2.0.0 (retired)"), "{out}");
    assert!(at("@1.0.0 (deprecated)") < at("@1.0.0 (retired)"), "{out}");
    let apis = client.list_apis(false, "").await.unwrap().apis;
    let stages: Vec<&str> = apis[0].versions.iter().map(|v| v.stage.as_str()).collect();
    assert_eq!(stages, ["retired", "retired", "published"]);
}
