//! Tollgate's control plane: API lifecycle (draft, published, canary, deprecated, retired,
//! rollback), tenants, keys and per-tenant costs, served over gRPC.
//!
//! Not built yet: it needs the replicated cluster state (Raft) to store into, which lands
//! first. Until then this crate only says so; nothing here pretends to serve requests.

/// Why `tollgate-cp` cannot run in this build, for the binary to print.
pub const NOT_AVAILABLE: &str = "tollgate-cp: the control plane is not part of this build yet; \
it arrives once the Raft cluster state it stores into has landed. \
Use `tollgate-node --spec FILE` (or `tollgate dev`) to run the data plane.";
