//! Virtual actors (DESIGN.md decision 6): every live counter (a quota key, an upstream's
//! circuit) has one owner node, chosen by rendezvous hashing over the cluster's current
//! membership. Any node computes the same owner from the same membership, with no lookup
//! table to replicate; when a member leaves, only the keys it owned move, and they spread
//! evenly over the others.
//!
//! What exists so far (the quotas-and-circuits issue, first steps): ownership
//! ([`ownership`]) and the lease protocol of a window-counter quota as pure state
//! ([`quota`]), checked by a simulation. Mailboxes, the batched gRPC calls between owners
//! and the other nodes, and enforcement on the data plane build on them.

pub mod ownership;
pub mod quota;
