//! Rollout transitions told once by the leader: a log line, the
//! `tollgate_rollout_transitions_total` counter and, when the rollout names one, a webhook
//! POST of the event as JSON. Delivery is at least once, as for budget alerts
//! ([`crate::metering::alerts::leader_tells`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_proto::state::v1::RolloutEvent;

use crate::metering::alerts::{open_webhook, origin};
use crate::raft::cluster::Cluster;

pub async fn run(cluster: Arc<Cluster>, stop: CancellationToken) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok();
    let c = cluster.clone();
    crate::metering::alerts::leader_tells(
        cluster,
        stop,
        Duration::from_millis(250),
        |s| s.rollout_event_seq,
        |s, told| {
            s.rollout_events
                .iter()
                .filter(|e| e.seq > told)
                .map(|e| (e.seq, e.at_ms, e.clone()))
                .collect()
        },
        |event: RolloutEvent| {
            let webhook = if event.kind == "alert" {
                open_named(&c, &event.tenant, &event.webhook_secret)
            } else {
                open_webhook(&c.identity, &event.webhook)
            };
            let client = client.clone();
            async move { tell(&event, &webhook, client.as_ref()).await }
        },
    )
    .await
}

/// An alert's webhook: the URL in the tenant's named secret (empty when none, or when it
/// cannot be opened, which is said).
fn open_named(cluster: &Cluster, tenant: &str, name: &str) -> String {
    if name.is_empty() {
        return String::new();
    }
    let full = format!("{tenant}.{name}");
    let sealed = cluster
        .state_machine
        .read(|a| a.state.access.secrets.get(&full).map(|s| s.value.clone()));
    let opened = match (sealed, cluster.identity.keyring()) {
        (Some(value), Some(ring)) => ring
            .open(&crate::identity::secret_purpose(&full), &value)
            .map_err(|e| e.to_string())
            .and_then(|v| String::from_utf8(v).map_err(|e| e.to_string())),
        (None, _) => Err(format!("there is no secret {full}")),
        (_, None) => Err("this node has no sealing key".into()),
    };
    opened.unwrap_or_else(|e| {
        tracing::warn!("an alert's webhook cannot be opened: {e}");
        String::new()
    })
}

/// The event as its webhook receives it.
pub fn event_json(e: &RolloutEvent) -> serde_json::Value {
    if e.kind == "alert" {
        return serde_json::json!({
            "kind": "alert",
            "seq": e.seq,
            "at_ms": e.at_ms,
            "api": e.api,
            "version": e.canary,
            "metric": e.stable,
            "action": e.action,
            "summary": e.reason,
        });
    }
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
    if e.kind == "alert" {
        tracing::warn!(api = %e.api, version = %e.canary, metric = %e.stable, action = %e.action, "anomaly alert: {}", e.reason);
        metrics::counter!(
            "tollgate_alerts_total",
            "api" => e.api.clone(),
            "version" => e.canary.clone(),
            "metric" => e.stable.clone(),
            "action" => e.action.clone()
        )
        .increment(1);
        metrics::gauge!(
            "tollgate_alert_firing",
            "api" => e.api.clone(),
            "version" => e.canary.clone(),
            "metric" => e.stable.clone()
        )
        .set(if e.action == "raise" { 1.0 } else { 0.0 });
        post(e, webhook, client).await;
        return;
    }
    // A rollback is worth a look; the other transitions are the rollout going as planned.
    if e.action == "rollback" {
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
    } else {
        tracing::info!(
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
    }
    metrics::counter!(
        "tollgate_rollout_transitions_total",
        "api" => e.api.clone(),
        "action" => e.action.clone()
    )
    .increment(1);
    post(e, webhook, client).await;
}

async fn post(e: &RolloutEvent, webhook: &str, client: Option<&reqwest::Client>) {
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
