//! Virtual actors (DESIGN.md decision 6): every live counter (a quota key, an upstream's
//! circuit) has one owner node, chosen by rendezvous hashing over the cluster's current
//! membership. Any node computes the same owner from the same membership, with no lookup
//! table to replicate; when a member leaves, only the keys it owned move, and they spread
//! evenly over the others.
//!
//! This is the first part of the quotas-and-circuits issue: ownership. Mailboxes, leases and
//! the batched gRPC calls between owners and the other nodes build on it.

pub mod ownership;
