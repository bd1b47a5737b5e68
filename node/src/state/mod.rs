//! The cluster's state and what the data plane serves from it: the declarative spec
//! ([`spec`]), the replicated state machine it lives in ([`machine`], applied by Raft), and
//! the immutable [`snapshot::Snapshot`] every node compiles from it.

pub mod access;
pub mod billing;
pub mod circuit;
pub mod egress;
pub mod identity;
pub mod lifecycle;
pub mod machine;
pub mod snapshot;
pub mod spec;
pub mod tls;
pub mod usage;
