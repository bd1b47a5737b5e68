//! `tollgate circuit ...`: see and force upstreams' cluster-wide circuit breakers, through
//! any node (writes are forwarded to the leader).

use clap::Subcommand;
use serde_json::json;
use tollgate_node::state::circuit::{Phase, phase};
use tollgate_sdk::state::{CircuitMode, CircuitState};

use crate::cluster::{NodeArg, Output, print_value};

#[derive(Debug, Subcommand)]
pub enum CircuitCommand {
    /// Every circuit that has changed: open, half-open or closed, why, and who set it.
    List {
        #[command(flatten)]
        node: NodeArg,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Hold an upstream's circuit open on every node (take it out during an incident).
    Open {
        /// The upstream: a spec upstream, or an API version's as api@version/upstream.
        upstream: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Hold it closed: traffic flows whatever the outcomes.
    Close {
        upstream: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Hand it back to detection (it starts closed).
    Auto {
        upstream: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        node: NodeArg,
    },
}

pub async fn circuit(cmd: CircuitCommand) -> anyhow::Result<()> {
    let (upstream, reason, node, mode) = match cmd {
        CircuitCommand::List { node, output } => {
            let mut client = node.connect().await?;
            let list = client.list_circuits().await?;
            return print_list(&list.circuits, list.now_ms, output);
        }
        CircuitCommand::Open {
            upstream,
            reason,
            node,
        } => (upstream, reason, node, CircuitMode::ForcedOpen),
        CircuitCommand::Close {
            upstream,
            reason,
            node,
        } => (upstream, reason, node, CircuitMode::ForcedClosed),
        CircuitCommand::Auto {
            upstream,
            reason,
            node,
        } => (upstream, reason, node, CircuitMode::Auto),
    };
    let mut client = node.connect().await?;
    let w = client.force_circuit(&upstream, mode, &reason).await?;
    let what = match mode {
        CircuitMode::ForcedOpen => "held open",
        CircuitMode::ForcedClosed => "held closed",
        CircuitMode::Auto => "back to detection",
    };
    println!(
        "Circuit of {upstream} {what} (generation {}, log index {}).",
        w.generation, w.log_index
    );
    Ok(())
}

/// `closed`, `open`, `half-open`, `forced-open` or `forced-closed` at `now_ms`.
fn state_name(c: &CircuitState, now_ms: u64) -> &'static str {
    let forced = CircuitMode::try_from(c.mode).unwrap_or(CircuitMode::Auto);
    match (forced, phase(Some(c), now_ms)) {
        (CircuitMode::ForcedOpen, _) => "forced-open",
        (CircuitMode::ForcedClosed, _) => "forced-closed",
        (_, Phase::Closed) => "closed",
        (_, Phase::Open { .. }) => "open",
        (_, Phase::HalfOpen) => "half-open",
    }
}

fn print_list(circuits: &[CircuitState], now_ms: u64, output: Output) -> anyhow::Result<()> {
    if output != Output::Table {
        let rows: Vec<_> = circuits
            .iter()
            .map(|c| {
                json!({
                    "upstream": c.upstream,
                    "state": state_name(c, now_ms),
                    "open_until_ms": c.open_until_ms,
                    "reason": c.reason,
                    "changed_by": c.changed_by,
                    "changed_at_ms": c.changed_at_ms,
                })
            })
            .collect();
        return print_value(&json!(rows), output);
    }
    if circuits.is_empty() {
        println!("No circuit has changed: every upstream's is closed.");
        return Ok(());
    }
    println!(
        "{:<32} {:<14} {:<24} REASON",
        "UPSTREAM", "STATE", "CHANGED BY"
    );
    for c in circuits {
        println!(
            "{:<32} {:<14} {:<24} {}",
            c.upstream,
            state_name(c, now_ms),
            c.changed_by,
            c.reason
        );
    }
    Ok(())
}
