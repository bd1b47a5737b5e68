//! Rollout transitions told once by the leader: a log line, the
//! `tollgate_rollout_transitions_total` counter and, when the rollout names one, a webhook
//! POST of the event as JSON. Delivery is at least once, as for budget alerts: a new leader
//! tells the events of the last [`REPLAY`] it has not told itself.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_proto::state::v1::RolloutEvent;

use crate::metering::alerts::{open_webhook, origin};
use crate::raft::cluster::Cluster;

pub const REPLAY: Duration = Duration::from_secs(30);

pub async fn run(cluster: Arc<Cluster>, stop: CancellationToken) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok();
    let mut told = cluster.state_machine.read(|a| a.state.rollout_event_seq);
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let leader = cluster.raft.metrics().borrow().current_leader == Some(cluster.id);
        let now = crate::raft::service::now_ms();
        let pending: Vec<RolloutEvent> = cluster.state_machine.read(|a| {
            a.state
                .rollout_events
                .iter()
                .filter(|e| e.seq > told)
                .cloned()
                .collect()
        });
        for event in pending {
            if !leader {
                if now.saturating_sub(event.at_ms) > REPLAY.as_millis() as u64 {
                    told = event.seq;
                }
                continue;
            }
            told = event.seq;
            let webhook = open_webhook(&cluster.identity, &event.webhook);
            tell(&event, &webhook, client.as_ref()).await;
        }
    }
}

/// The event as its webhook receives it.
pub fn event_json(e: &RolloutEvent) -> serde_json::Value {
    serde_json::json!({
        "kind": "rollout",
        "seq": e.seq,
        "at_ms": e.at_ms,
        "api": e.api,
        "rollout": e.rollout,
        "action": e.action,
        "step": e.step,
        "canary_weight": e.weight,
        "canary": e.canary,
        "stable": e.stable,
        "reason": e.reason,
    })
}

async fn tell(e: &RolloutEvent, webhook: &str, client: Option<&reqwest::Client>) {
    tracing::warn!(
        api = %e.api,
        action = %e.action,
        canary = %e.canary,
        weight = e.weight,
        "rollout of {} to {}: {} ({})",
        e.api,
        e.canary,
        e.action,
        e.reason
    );
    metrics::counter!(
        "tollgate_rollout_transitions_total",
        "api" => e.api.clone(),
        "action" => e.action.clone()
    )
    .increment(1);
    let (Some(client), false) = (client, webhook.is_empty()) else {
        return;
    };
    let sent = client
        .post(webhook)
        .header("content-type", "application/json")
        .body(event_json(e).to_string())
        .send()
        .await;
    let outcome = match sent {
        Ok(r) if r.status().is_success() => "delivered",
        Ok(r) => {
            tracing::warn!(webhook = %origin(webhook), status = %r.status(), "rollout webhook refused the event");
            "refused"
        }
        Err(err) => {
            tracing::warn!(webhook = %origin(webhook), "rollout webhook failed: {err}");
            "failed"
        }
    };
    metrics::counter!("tollgate_rollout_webhooks_total", "outcome" => outcome).increment(1);
}
