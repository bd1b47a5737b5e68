//! Budget alerts: raised by the state machine when a tenant's spend crosses a threshold
//! (deterministically, on every node), and told once by the leader: a log line, the
//! `tollgate_budget_alerts_total` counter and, when the budget names one, a webhook POST.
//!
//! Delivery is at least once. A node that becomes leader tells the alerts of the last
//! [`REPLAY`] it has not told itself, so an alert raised just before a leader change is not
//! lost; it may then be told twice.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_proto::state::v1::BudgetAlert;

use crate::raft::cluster::Cluster;

/// How far back a new leader looks for alerts to tell.
pub const REPLAY: Duration = Duration::from_secs(30);

pub async fn run(cluster: Arc<Cluster>, stop: CancellationToken) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok();
    let c = cluster.clone();
    leader_tells(
        cluster,
        stop,
        Duration::from_millis(500),
        |s| s.billing.alert_seq,
        |s, told| {
            s.billing
                .alerts
                .iter()
                .filter(|x| x.seq > told)
                .map(|x| (x.seq, x.at_ms, x.clone()))
                .collect()
        },
        |alert: BudgetAlert| {
            let webhook = open_webhook(&c.identity, &alert.webhook);
            let client = client.clone();
            async move { tell(&alert, &webhook, client.as_ref()).await }
        },
    )
    .await
}

/// What the leader tells of the state's events (budget alerts, rollout transitions):
/// every `every`, the events after the last one told, each once, by the leader only. A
/// node that is not the leader keeps up with them, so when it becomes leader it tells
/// only those of the last [`REPLAY`] (an event raised just before a leader change may then
/// be told twice: at least once).
pub async fn leader_tells<T, Fut>(
    cluster: Arc<Cluster>,
    stop: CancellationToken,
    every: Duration,
    last_seq: impl Fn(&crate::state::machine::ClusterState) -> u64,
    pending: impl Fn(&crate::state::machine::ClusterState, u64) -> Vec<(u64, u64, T)>,
    tell: impl Fn(T) -> Fut,
) where
    Fut: std::future::Future<Output = ()>,
{
    let mut told = cluster.state_machine.read(|a| last_seq(&a.state));
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let leader = cluster.raft.metrics().borrow().current_leader == Some(cluster.id);
        let now = crate::raft::service::now_ms();
        let events = cluster.state_machine.read(|a| pending(&a.state, told));
        for (seq, at_ms, event) in events {
            if !leader {
                // Another node tells it; stop looking at it once it is past the replay
                // window a new leader would cover.
                if now.saturating_sub(at_ms) > REPLAY.as_millis() as u64 {
                    told = seq;
                }
                continue;
            }
            told = seq;
            tell(event).await;
        }
    }
}

/// The webhook URL of an alert, opened (the state keeps it sealed); empty when there is
/// none or it cannot be opened (said once per alert).
pub fn open_webhook(identity: &crate::identity::Identity, text: &str) -> String {
    if !crate::identity::seal::is_sealed_text(text) {
        return text.to_string();
    }
    let opened = identity
        .keyring()
        .ok_or_else(|| "this node has no sealing key".to_string())
        .and_then(|ring| {
            ring.open_text(crate::identity::WEBHOOK, text)
                .map_err(|e| e.to_string())
        });
    opened.unwrap_or_else(|e| {
        tracing::warn!("a budget alert's webhook cannot be opened: {e}");
        String::new()
    })
}

/// The scheme and host of a URL, for logs (its path and query may hold a secret).
pub fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find(['/', '?', '#']) {
        Some(end) => &url[..after + end],
        None => url,
    }
}

async fn tell(alert: &BudgetAlert, webhook: &str, client: Option<&reqwest::Client>) {
    tracing::warn!(
        tenant = %alert.tenant,
        threshold = alert.threshold,
        spent = %alert.spent,
        limit = %alert.limit,
        "budget alert: tenant {} has spent {}% of its monthly budget",
        alert.tenant,
        alert.threshold
    );
    metrics::counter!(
        "tollgate_budget_alerts_total",
        "tenant" => alert.tenant.clone(),
        "threshold" => alert.threshold.to_string()
    )
    .increment(1);
    let (Some(client), false) = (client, webhook.is_empty()) else {
        return;
    };
    let body = serde_json::json!({
        "kind": "budget_alert",
        "seq": alert.seq,
        "at_ms": alert.at_ms,
        "tenant": alert.tenant,
        "threshold_percent": alert.threshold,
        "spent": alert.spent,
        "limit": alert.limit,
    });
    let sent = client
        .post(webhook)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    let outcome = match sent {
        Ok(r) if r.status().is_success() => "delivered",
        Ok(r) => {
            tracing::warn!(webhook = %origin(webhook), status = %r.status(), "budget alert webhook refused the alert");
            "refused"
        }
        Err(e) => {
            tracing::warn!(webhook = %origin(webhook), "budget alert webhook failed: {e}");
            "failed"
        }
    };
    metrics::counter!("tollgate_budget_webhooks_total", "outcome" => outcome).increment(1);
}
