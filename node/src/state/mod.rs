//! The state the data plane serves: the declarative spec ([`spec`]) and the immutable
//! [`snapshot::Snapshot`] compiled from it. The replicated state machine (Raft) joins
//! here when the cluster lands; it will produce the same snapshots.

pub mod snapshot;
pub mod spec;
