//! Circuit breakers in the replicated state (docs/architecture.md, decision 7): transitions
//! decided by a circuit's owner node and operators' forced states, applied deterministically.
//!
//! Only circuits that changed at least once have an entry; any other upstream's circuit
//! is closed. An open circuit whose `open_until_ms` has passed is half-open: every node
//! derives that from the committed state and its clock, with no extra write.

use std::collections::BTreeMap;

use tollgate_proto::state::v1::{CircuitCommand, CircuitMode, CircuitState, circuit_command::Op};

use super::lifecycle::Refusal;

pub type Circuits = BTreeMap<String, CircuitState>;

/// What a circuit command changed: the audit action and the state before and after.
pub struct CircuitChange {
    pub action: &'static str,
    pub before: Option<CircuitState>,
    pub after: CircuitState,
}

/// Applies `cmd` (taken from log entry `log_index`, proposed at `at_ms` by `actor`).
pub fn apply(
    circuits: &mut Circuits,
    cmd: &CircuitCommand,
    log_index: u64,
    at_ms: u64,
    actor: &str,
) -> Result<CircuitChange, Refusal> {
    if cmd.upstream.is_empty() {
        return Err(Refusal::Invalid(
            "upstream is empty; name the upstream".into(),
        ));
    }
    let before = circuits.get(&cmd.upstream).cloned();
    let mut next = before.clone().unwrap_or_else(|| CircuitState {
        upstream: cmd.upstream.clone(),
        ..CircuitState::default()
    });
    let action = match &cmd.op {
        Some(Op::Transition(t)) => {
            if t.from_index != next.since_index {
                return Err(Refusal::Precondition(format!(
                    "the circuit of {} changed at index {} since this transition was decided (from {})",
                    cmd.upstream, next.since_index, t.from_index
                )));
            }
            if next.mode != CircuitMode::Auto as i32 {
                return Err(Refusal::Precondition(format!(
                    "the circuit of {} is forced by an operator",
                    cmd.upstream
                )));
            }
            next.open = t.open;
            next.open_until_ms = if t.open { t.open_until_ms } else { 0 };
            next.reason = t.reason.clone();
            if t.open {
                "circuit.open"
            } else {
                "circuit.close"
            }
        }
        Some(Op::Force(f)) => {
            let mode = CircuitMode::try_from(f.mode).map_err(|_| {
                Refusal::Invalid(format!(
                    "unknown circuit mode {}; use auto, forced open or forced closed",
                    f.mode
                ))
            })?;
            next.mode = mode as i32;
            next.reason = f.reason.clone();
            // Back to detection starts closed: the operator saw the upstream recover.
            next.open = false;
            next.open_until_ms = 0;
            match mode {
                CircuitMode::Auto => "circuit.auto",
                CircuitMode::ForcedOpen => "circuit.force_open",
                CircuitMode::ForcedClosed => "circuit.force_close",
            }
        }
        None => {
            return Err(Refusal::Invalid(
                "the circuit command has no operation; set transition or force".into(),
            ));
        }
    };
    next.since_index = log_index;
    next.changed_by = actor.to_string();
    next.changed_at_ms = at_ms;
    circuits.insert(cmd.upstream.clone(), next.clone());
    Ok(CircuitChange {
        action,
        before,
        after: next,
    })
}

/// How a circuit stands at `now_ms`, for the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Closed,
    /// Refusing; half-open from `until_ms` (`None`: held open by an operator).
    Open {
        until_ms: Option<u64>,
    },
    /// Only requests holding a probe permit from the owner go through.
    HalfOpen,
}

pub fn phase(state: Option<&CircuitState>, now_ms: u64) -> Phase {
    let Some(s) = state else {
        return Phase::Closed;
    };
    match CircuitMode::try_from(s.mode).unwrap_or(CircuitMode::Auto) {
        CircuitMode::ForcedOpen => Phase::Open { until_ms: None },
        CircuitMode::ForcedClosed => Phase::Closed,
        CircuitMode::Auto if !s.open => Phase::Closed,
        CircuitMode::Auto if now_ms < s.open_until_ms => Phase::Open {
            until_ms: Some(s.open_until_ms),
        },
        CircuitMode::Auto => Phase::HalfOpen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_proto::state::v1::{CircuitForce, CircuitTransition};

    fn transition(open: bool, from_index: u64) -> CircuitCommand {
        CircuitCommand {
            upstream: "a".into(),
            op: Some(Op::Transition(CircuitTransition {
                open,
                open_until_ms: 5_000,
                reason: "r".into(),
                from_index,
            })),
        }
    }

    #[test]
    fn transitions_follow_the_committed_state_and_forcing_wins() {
        let mut c = Circuits::new();
        assert_eq!(phase(c.get("a"), 0), Phase::Closed);
        apply(&mut c, &transition(true, 0), 7, 1_000, "node/1").unwrap();
        assert_eq!(
            phase(c.get("a"), 1_000),
            Phase::Open {
                until_ms: Some(5_000)
            }
        );
        assert_eq!(phase(c.get("a"), 5_000), Phase::HalfOpen);
        // A transition decided on the state before index 7 is stale.
        assert!(matches!(
            apply(&mut c, &transition(false, 0), 8, 1_000, "node/2"),
            Err(Refusal::Precondition(_))
        ));
        apply(&mut c, &transition(false, 7), 9, 6_000, "node/1").unwrap();
        assert_eq!(phase(c.get("a"), 6_000), Phase::Closed);
        let force = |mode: CircuitMode| CircuitCommand {
            upstream: "a".into(),
            op: Some(Op::Force(CircuitForce {
                mode: mode as i32,
                reason: "incident 42".into(),
            })),
        };
        let change = apply(
            &mut c,
            &force(CircuitMode::ForcedOpen),
            10,
            7_000,
            "operator/x",
        )
        .unwrap();
        assert_eq!(change.action, "circuit.force_open");
        assert_eq!(phase(c.get("a"), u64::MAX), Phase::Open { until_ms: None });
        // Detection cannot undo an operator's decision.
        assert!(apply(&mut c, &transition(false, 10), 11, 7_000, "node/1").is_err());
        apply(&mut c, &force(CircuitMode::Auto), 12, 8_000, "operator/x").unwrap();
        assert_eq!(phase(c.get("a"), 8_000), Phase::Closed);
    }
}
