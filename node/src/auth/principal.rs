//! Who is calling the node admin API, and what they may do: the operator token (made at
//! bootstrap) may do everything; a tenant token sees and changes only its tenant's APIs,
//! keys, tokens and audit entries. Decided on the leader, against its applied state.
//!
//! A tenant asking about another tenant's object gets the same NOT_FOUND as for an object
//! that does not exist, so it learns no names and no counts. Asking for something only the
//! operator may do is PERMISSION_DENIED.

use tollgate_proto::state::v1::{Command, access_command, api_command, circuit_command, command};
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};

use crate::state::access::{self, TOKEN_PREFIX};
use crate::state::machine::ClusterState;

/// How a request reached the cluster code: from the node itself (bootstrap spec, SIGHUP),
/// or over gRPC with whatever `authorization` metadata it carried.
#[derive(Debug, Clone)]
pub enum Caller {
    Node,
    /// Another node of the cluster, acting on its own behalf (a write it forwards, such
    /// as a circuit transition it decided), as its certificate says.
    Peer(u64),
    Remote(Option<MetadataValue<Ascii>>),
}

impl Caller {
    pub fn from_metadata(m: &tonic::metadata::MetadataMap) -> Caller {
        Caller::Remote(m.get("authorization").cloned())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Node(u64),
    Operator { token: String },
    Tenant { tenant: String, token: String },
}

impl Principal {
    /// The tenant a tenant token is scoped to; `None` for the operator and the node.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::Tenant { tenant, .. } => Some(tenant),
            _ => None,
        }
    }

    /// How the audit log names it.
    pub fn actor(&self) -> String {
        match self {
            Principal::Node(id) => format!("node/{id}"),
            Principal::Operator { token } => format!("operator/{token}"),
            Principal::Tenant { tenant, token } => format!("tenant/{tenant}/{token}"),
        }
    }

    /// Refuses a tenant token for an operator-level call.
    pub fn require_operator(&self, what: &str) -> Result<(), Status> {
        match self {
            Principal::Tenant { tenant, .. } => Err(Status::permission_denied(format!(
                "{what} needs the operator token; this is a token of tenant {tenant}"
            ))),
            _ => Ok(()),
        }
    }

    /// Whether this caller may see objects of `owner` (a tenant; empty: operator-level).
    pub fn sees(&self, owner: &str) -> bool {
        self.tenant().is_none_or(|t| t == owner)
    }
}

/// Checks the bearer token against the state at `now_ms`; `hash_key` is the state's hash
/// key, opened.
pub fn authenticate(
    caller: &Caller,
    state: &ClusterState,
    hash_key: &[u8],
    node_id: u64,
    now_ms: u64,
) -> Result<Principal, Status> {
    let value = match caller {
        Caller::Node => return Ok(Principal::Node(node_id)),
        Caller::Peer(id) => return Ok(Principal::Node(*id)),
        Caller::Remote(None) => {
            return Err(Status::unauthenticated(
                "this call needs a token: send `authorization: Bearer <token>` (the operator token \
                 printed at bootstrap, or a tenant token from `tollgate token create`)",
            ));
        }
        Caller::Remote(Some(v)) => v,
    };
    let text = value.to_str().unwrap_or_default().trim();
    // The scheme may be left out: the bare token is accepted too.
    let token = super::strip_bearer(text).unwrap_or(text);
    let a = &state.access;
    let Some(cred) = access::check(&a.tokens, hash_key, TOKEN_PREFIX, token, now_ms) else {
        return Err(Status::unauthenticated(
            "the token is not known, or it was revoked or has expired",
        ));
    };
    Ok(if cred.tenant.is_empty() {
        Principal::Operator {
            token: cred.id.clone(),
        }
    } else {
        Principal::Tenant {
            tenant: cred.tenant.clone(),
            token: cred.id.clone(),
        }
    })
}

fn no_api(name: &str) -> Status {
    Status::not_found(format!("there is no API {name}"))
}

/// Whether `p` may propose `cmd` (before it is proposed; the state machine then checks
/// the command itself).
pub fn authorize(p: &Principal, cmd: &Command, state: &ClusterState) -> Result<(), Status> {
    if let Some(command::Kind::Bootstrap(_)) = &cmd.kind
        && !matches!(p, Principal::Node(_))
    {
        return Err(Status::invalid_argument(
            "a bootstrap is made by the node that starts the cluster, not sent",
        ));
    }
    if let Some(command::Kind::Circuit(c)) = &cmd.kind
        && matches!(c.op, Some(circuit_command::Op::Transition(_)))
        && !matches!(p, Principal::Node(_))
    {
        return Err(Status::permission_denied(
            "circuit transitions are decided by the circuit's owner node; force a state with \
             `tollgate circuit open|close|auto` instead",
        ));
    }
    if let Some(command::Kind::Rollout(r)) = &cmd.kind
        && matches!(
            r.op,
            Some(
                tollgate_proto::state::v1::rollout_command::Op::Verdict(_)
                    | tollgate_proto::state::v1::rollout_command::Op::Checkpoint(_)
            )
        )
        && !matches!(p, Principal::Node(_))
    {
        return Err(Status::permission_denied(
            "rollout verdicts are decided by the rollout's judge node; pause, resume or abort \
             it with `tollgate rollout pause|resume|abort` instead",
        ));
    }
    if let Some(command::Kind::Alert(_)) = &cmd.kind
        && !matches!(p, Principal::Node(_))
    {
        return Err(Status::permission_denied(
            "anomaly alerts are raised by the leader's detector, not sent",
        ));
    }
    if let Some(command::Kind::Usage(_)) = &cmd.kind
        && !matches!(p, Principal::Node(_))
    {
        return Err(Status::permission_denied(
            "usage batches are shipped by the nodes that metered the requests, not sent",
        ));
    }
    if let Some(command::Kind::Identity(i)) = &cmd.kind {
        use tollgate_proto::state::v1::identity_command::Op;
        return match (&i.op, p) {
            (_, Principal::Tenant { tenant, .. }) => Err(Status::permission_denied(format!(
                "node identity is managed with the operator token; this is a token of tenant {tenant}"
            ))),
            (
                Some(
                    Op::CreateJoinToken(_)
                    | Op::RevokeJoinToken(_)
                    | Op::Reseal(_)
                    | Op::PutSecret(_)
                    | Op::DeleteSecret(_),
                ),
                _,
            ) => Ok(()),
            (_, Principal::Node(_)) => Ok(()),
            _ => Err(Status::permission_denied(
                "join tokens are used by enrolling nodes, nodes are revoked by `tollgate \
                 cluster remove`, and the CA is made by the cluster: none of these is sent",
            )),
        };
    }
    let Some(tenant) = p.tenant() else {
        return Ok(());
    };
    if let Some(command::Kind::Billing(_)) = &cmd.kind {
        return Err(Status::permission_denied(format!(
            "plans and budgets are set by the operator; a token of tenant {tenant} may read \
             its usage and costs only"
        )));
    }
    let api_owned = |name: &str| {
        state
            .apis
            .get(name)
            .is_some_and(|a| a.tenant == tenant)
            .then_some(())
            .ok_or_else(|| no_api(name))
    };
    match &cmd.kind {
        Some(command::Kind::Rollout(r)) => api_owned(&r.api),
        Some(command::Kind::Api(a)) => match &a.op {
            Some(api_command::Op::CreateApi(c)) if c.tenant != tenant => {
                Err(Status::permission_denied(format!(
                    "a token of tenant {tenant} creates APIs owned by {tenant} only; set tenant to {tenant}"
                )))
            }
            Some(api_command::Op::CreateApi(_)) => Ok(()),
            _ => api_owned(&a.api),
        },
        Some(command::Kind::Access(a)) => match &a.op {
            Some(access_command::Op::CreateTenant(_) | access_command::Op::DeleteTenant(_)) => {
                Err(Status::permission_denied(
                    "tenants are created and deleted with the operator token",
                ))
            }
            // The API's owner offers (or takes back) access to its API; a tenant asks for
            // (or gives up) a subscription of its own. Neither alone makes one active:
            // the state machine waits for the other side's consent (`stamp` says who
            // asks).
            Some(access_command::Op::Subscribe(_) | access_command::Op::Unsubscribe(_))
                if a.tenant == tenant =>
            {
                Ok(())
            }
            Some(access_command::Op::Subscribe(s)) => api_owned(&s.api),
            Some(access_command::Op::Unsubscribe(u)) => api_owned(&u.api),
            _ if a.tenant != tenant => Err(Status::not_found(format!(
                "there is no tenant {}",
                a.tenant
            ))),
            _ => Ok(()),
        },
        Some(command::Kind::Circuit(_)) => Err(Status::permission_denied(
            "circuit breakers are forced with the operator token",
        )),
        _ => Ok(()),
    }
}

/// Fills in what a command carries about who asks, from the authenticated caller (on the
/// leader, after [`authorize`]); whatever a client put there is overwritten. Today: which
/// side of a subscription the caller is.
pub fn stamp(p: &Principal, cmd: &mut Command, state: &ClusterState) {
    use tollgate_proto::state::v1::SubscriptionParty as Party;
    let Some(command::Kind::Access(a)) = &mut cmd.kind else {
        return;
    };
    let api = match &a.op {
        Some(access_command::Op::Subscribe(s)) => s.api.clone(),
        Some(access_command::Op::Unsubscribe(u)) => u.api.clone(),
        _ => return,
    };
    let party = match p.tenant() {
        None => Party::Operator,
        Some(t) if state.apis.get(&api).is_some_and(|x| x.tenant == t) => Party::Owner,
        Some(_) => Party::Subscriber,
    };
    match &mut a.op {
        Some(access_command::Op::Subscribe(s)) => s.set_party(party),
        Some(access_command::Op::Unsubscribe(u)) => u.set_party(party),
        _ => {}
    }
}
