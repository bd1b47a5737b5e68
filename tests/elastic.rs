//! Elastic membership (docs/cluster.md, "Nodes that come and go"): voters stay at the
//! cluster's count, learners leave when they shut down, the leader evicts members that stop
//! answering (a learner takes a dead voter's place), and a node that comes back with its id
//! and data joins again.

mod harness;

use std::time::{Duration, Instant};

use harness::Upstream;
use harness::cluster::{CLUSTER_FLAGS, TestCluster, tagged_spec};
use tollgate_sdk::ClusterStatusResponse;

const T: Duration = Duration::from_secs(30);

fn role(s: &ClusterStatusResponse, id: u64) -> Option<&str> {
    s.members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.role.as_str())
}

fn voters(s: &ClusterStatusResponse) -> usize {
    s.members.iter().filter(|m| m.role == "voter").count()
}

async fn add_learner(c: &mut TestCluster, id: u64, extra: &[&str]) {
    let flags: Vec<String> = CLUSTER_FLAGS
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    let seed = c.node(1).grpc;
    c.add(id, seed, &flags).await;
    c.wait_all(&format!("node {id} to be a learner"), T, |s| {
        role(s, id) == Some("learner")
    })
    .await;
}

/// The membership events in the audit trail: (action, object, after).
async fn member_events(c: &TestCluster, on: u64) -> Vec<(String, String, String)> {
    let mut client = c.client(on).await;
    let audit = client
        .audit(tollgate_sdk::NodeAuditRequest {
            object_prefix: "node/".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    audit
        .entries
        .into_iter()
        .map(|e| (e.action, e.object, e.after))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_leaves_when_it_stops_and_a_voter_stays() {
    let up = Upstream::start("a").await;
    let mut c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &[]).await;
    add_learner(&mut c, 4, &[]).await;
    add_learner(&mut c, 5, &[]).await;

    // A learner stops: it drains, leaves the membership and exits cleanly.
    assert!(c.stop(5).await, "node 5 exited with an error:\n");
    c.wait_all("node 5 to have left", T, |s| {
        role(s, 5).is_none() && s.members.len() == 4 && !s.joint
    })
    .await;

    // A voter stops: it stays a voter (a restart keeps it), and comes back as one.
    assert!(c.stop(3).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut client = c.client(1).await;
    let s = client.cluster_status().await.unwrap();
    assert_eq!(role(&s, 3), Some("voter"), "{s:?}");
    c.restart(3).await;
    c.wait_all("node 3 to be back", T, |s| {
        role(s, 3) == Some("voter") && s.members.len() == 4
    })
    .await;

    let events = member_events(&c, 1).await;
    let has =
        |action: &str, object: &str| events.iter().any(|(a, o, _)| a == action && o == object);
    assert!(
        has("node.join", "node/4") && has("node.join", "node/5"),
        "{events:?}"
    );
    assert!(has("node.leave", "node/5"), "{events:?}");
    assert!(!has("node.leave", "node/3"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_evicts_the_dead_and_a_learner_takes_a_dead_voters_place() {
    let up = Upstream::start("a").await;
    let grace = ["--evict-after", "3s"];
    let mut c = TestCluster::start(3, &tagged_spec(up.addr, "0"), &grace).await;
    add_learner(&mut c, 4, &grace).await;
    add_learner(&mut c, 5, &grace).await;

    // A learner dies: it is evicted after the grace period, not before.
    let killed = Instant::now();
    c.kill9(5);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut client = c.client(1).await;
    let s = client.cluster_status().await.unwrap();
    assert_eq!(
        role(&s, 5),
        Some("learner"),
        "evicted before its grace period"
    );
    let silent = s.members.iter().find(|m| m.id == 5).unwrap().silent_ms;
    assert!((1_000..3_000).contains(&silent), "silent for {silent} ms");
    c.wait_all("node 5 to be evicted", Duration::from_secs(15), |s| {
        role(s, 5).is_none()
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3 + 5), "evicted after {took:?}");

    // A voter dies (not the leader, not the seed): the learner takes its place, so the
    // cluster keeps three voters.
    let leader = c.leader(T).await;
    let victim = [2, 3].into_iter().find(|id| *id != leader).unwrap();
    c.kill9(victim);
    c.wait_all("the dead voter to be replaced", T, |s| {
        role(s, victim).is_none() && role(s, 4) == Some("voter") && voters(s) == 3 && !s.joint
    })
    .await;

    // Both come back with their ids and data: they join again, as learners.
    c.restart(5).await;
    c.restart(victim).await;
    c.wait_all("the dead to be back", T, |s| {
        role(s, 5) == Some("learner")
            && role(s, victim) == Some("learner")
            && voters(s) == 3
            && s.members.len() == 5
    })
    .await;
    for id in [5, victim] {
        assert_eq!(
            c.node(id).get("/").await.header("x-tag"),
            Some("0"),
            "node {id}"
        );
    }

    let events = member_events(&c, 1).await;
    let has =
        |action: &str, object: &str| events.iter().any(|(a, o, _)| a == action && o == object);
    assert!(has("node.evict", "node/5"), "{events:?}");
    assert!(has("node.evict", &format!("node/{victim}")), "{events:?}");
    assert!(has("node.promote", "node/4"), "{events:?}");
    let m = c.node(c.leader(T).await).metrics().await;
    assert!(
        m.contains("tollgate_cluster_membership_changes_total{action=\"evict\"}")
            || events.iter().filter(|e| e.0 == "node.evict").count() == 2,
        "{m}"
    );
}
