//! Canary rollouts judged where the traffic is (docs/hypercare.md): each node counts the
//! two versions' requests ([`counters`]), the rollout's owner node runs the sequential
//! tests ([`sprt`], [`judge`]) and commits each verdict through Raft, where it is applied
//! ([`state`]) and told ([`notify`]).

pub mod anomaly;
pub mod counters;
pub mod judge;
pub mod notify;
pub mod sprt;
pub mod state;
