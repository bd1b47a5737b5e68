//! Node identity in the replicated state: join tokens, the CA, removed nodes, and the
//! re-sealing of secrets (docs/security.md). Applied deterministically like every command.

use tollgate_proto::state::v1 as pb;

use crate::identity::seal::is_sealed;
use crate::state::access::{Access, AccessChange, Credential, NamedSecret, check_credential};
use crate::state::lifecycle::Refusal;

/// Most join tokens a cluster keeps (used-up and expired ones included, until revoked).
pub const MAX_JOIN_TOKENS: usize = 1000;
/// Most nodes one join token may enroll.
pub const MAX_USES: u32 = 1000;
/// Most named secrets, and the largest one (before sealing).
pub const MAX_SECRETS: usize = 1000;
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

fn token_json(c: &Credential) -> String {
    serde_json::json!({
        "id": c.id,
        "name": c.name,
        "expires_at_ms": c.expires_at_ms,
        "revoked_at_ms": c.revoked_at_ms,
        "uses": c.uses,
        "used": c.used,
        "used_by": c.used_by,
    })
    .to_string()
}

/// Applies one identity command. A refusal changes nothing.
pub fn apply(
    access: &mut Access,
    cmd: &pb::IdentityCommand,
    at_ms: u64,
) -> Result<Option<AccessChange>, Refusal> {
    use pb::identity_command::Op;
    let Some(op) = &cmd.op else {
        return Err(Refusal::Invalid(
            "the identity command has no operation (a newer node's command?)".into(),
        ));
    };
    match op {
        Op::CreateJoinToken(c) => {
            check_credential(&pb::CreateCredential {
                id: c.id.clone(),
                hash: c.hash.clone(),
                name: c.name.clone(),
                expires_at_ms: c.expires_at_ms,
                client_certificate: String::new(),
                models: Vec::new(),
            })?;
            if c.uses == 0 || c.uses > MAX_USES {
                return Err(Refusal::Invalid(format!(
                    "a join token is good for 1 to {MAX_USES} nodes"
                )));
            }
            if c.expires_at_ms <= at_ms {
                return Err(Refusal::Invalid(
                    "the join token would expire before it is made; give a --ttl".into(),
                ));
            }
            if access.join_tokens.len() >= MAX_JOIN_TOKENS {
                return Err(Refusal::Precondition(format!(
                    "the cluster holds {MAX_JOIN_TOKENS} join tokens; revoke unused ones first"
                )));
            }
            if access.join_tokens.contains_key(&c.id) {
                return Err(Refusal::Precondition(format!(
                    "join token {} already exists",
                    c.id
                )));
            }
            let token = Credential {
                id: c.id.clone(),
                name: c.name.clone(),
                hash: c.hash.clone(),
                created_at_ms: at_ms,
                expires_at_ms: c.expires_at_ms,
                uses: c.uses,
                ..Credential::default()
            };
            let after = token_json(&token);
            access.join_tokens.insert(c.id.clone(), token);
            Ok(Some(AccessChange {
                object: format!("join-token/{}", c.id),
                action: "join-token.create",
                before: String::new(),
                after,
                added: true,
            }))
        }
        Op::RevokeJoinToken(r) => {
            let Some(token) = access.join_tokens.get_mut(&r.id) else {
                return Err(Refusal::NotFound(format!(
                    "there is no join token {}",
                    r.id
                )));
            };
            if token.revoked_at_ms != 0 {
                return Ok(None);
            }
            let before = token_json(token);
            token.revoked_at_ms = at_ms;
            Ok(Some(AccessChange {
                object: format!("join-token/{}", r.id),
                action: "join-token.revoke",
                before,
                after: token_json(token),
                added: false,
            }))
        }
        Op::UseJoinToken(u) => {
            let Some(token) = access.join_tokens.get_mut(&u.id) else {
                return Err(Refusal::NotFound(format!(
                    "there is no join token {}",
                    u.id
                )));
            };
            if !token.valid_at(at_ms) {
                return Err(Refusal::Precondition(
                    "the join token has expired or was revoked; make a new one with \
                     `tollgate cluster join-token create`"
                        .into(),
                ));
            }
            if token.used >= token.uses {
                return Err(Refusal::Precondition(format!(
                    "the join token was good for {} node(s) and has been used up; make a new \
                     one with `tollgate cluster join-token create`",
                    token.uses
                )));
            }
            let before = token_json(token);
            token.used += 1;
            token.used_by.push(u.by.chars().take(64).collect());
            Ok(Some(AccessChange {
                object: format!("join-token/{}", u.id),
                action: "join-token.use",
                before,
                after: token_json(token),
                added: false,
            }))
        }
        Op::RevokeNode(r) => {
            let before = access
                .revoked_nodes
                .get(&r.node_id)
                .map(|t| t.to_string())
                .unwrap_or_default();
            access.revoked_nodes.insert(r.node_id, at_ms);
            Ok(Some(AccessChange {
                object: format!("node/{}", r.node_id),
                action: "node.revoke",
                before,
                after: serde_json::json!({ "certificates_before_ms": at_ms }).to_string(),
                added: false,
            }))
        }
        Op::SetCa(ca) => {
            if !access.ca_cert_pem.is_empty() {
                return Ok(None);
            }
            if ca.ca_cert_pem.is_empty() || !is_sealed(&ca.ca_key) {
                return Err(Refusal::Invalid(
                    "a CA needs its certificate and its sealed key".into(),
                ));
            }
            access.ca_cert_pem = ca.ca_cert_pem.clone();
            access.ca_key = ca.ca_key.clone();
            Ok(Some(AccessChange {
                object: "cluster/ca".into(),
                action: "cluster.ca",
                before: String::new(),
                after: serde_json::json!({ "ca": "set" }).to_string(),
                added: true,
            }))
        }
        Op::PutSecret(p) => {
            crate::state::lifecycle::check_secret_name(&p.name)?;
            if !is_sealed(&p.value) || p.value.len() > MAX_SECRET_BYTES + 64 {
                return Err(Refusal::Invalid(
                    "a secret is sealed by the leader before it is written".into(),
                ));
            }
            let before = access.secrets.get(&p.name).cloned();
            if before.is_none() && access.secrets.len() >= MAX_SECRETS {
                return Err(Refusal::Precondition(format!(
                    "the cluster holds {MAX_SECRETS} secrets; delete unused ones first"
                )));
            }
            let created_at_ms = before.as_ref().map_or(at_ms, |b| b.created_at_ms);
            access.secrets.insert(
                p.name.clone(),
                NamedSecret {
                    value: p.value.clone(),
                    created_at_ms,
                    updated_at_ms: at_ms,
                },
            );
            let json =
                |at: u64| serde_json::json!({ "name": p.name, "updated_at_ms": at }).to_string();
            Ok(Some(AccessChange {
                object: format!("secret/{}", p.name),
                action: if before.is_some() {
                    "secret.update"
                } else {
                    "secret.create"
                },
                before: before.map(|b| json(b.updated_at_ms)).unwrap_or_default(),
                after: json(at_ms),
                added: true,
            }))
        }
        Op::MemberEvent(e) => {
            let action = match e.action.as_str() {
                "join" => "node.join",
                "leave" => "node.leave",
                "evict" => "node.evict",
                "promote" => "node.promote",
                other => {
                    return Err(Refusal::Invalid(format!(
                        "unknown membership event {other:?}"
                    )));
                }
            };
            Ok(Some(AccessChange {
                object: format!("node/{}", e.node_id),
                action,
                before: String::new(),
                after: serde_json::json!({ "role": e.role, "reason": e.reason }).to_string(),
                added: false,
            }))
        }
        Op::DeleteSecret(d) => {
            if access.secrets.remove(&d.id).is_none() {
                return Err(Refusal::NotFound(format!("there is no secret {}", d.id)));
            }
            Ok(Some(AccessChange {
                object: format!("secret/{}", d.id),
                action: "secret.delete",
                before: serde_json::json!({ "name": d.id }).to_string(),
                after: String::new(),
                added: false,
            }))
        }
        Op::Reseal(r) => {
            let sealed_or_empty = |v: &[u8]| v.is_empty() || is_sealed(v);
            if !sealed_or_empty(&r.hash_key)
                || !sealed_or_empty(&r.ca_key)
                || !r.secrets.values().all(|v| is_sealed(v))
            {
                return Err(Refusal::Invalid("re-sealed secrets must be sealed".into()));
            }
            for (name, value) in &r.secrets {
                if let Some(s) = access.secrets.get_mut(name) {
                    s.value = value.clone();
                }
            }
            if !r.hash_key.is_empty() {
                if access.hash_key.is_empty() {
                    return Err(Refusal::Precondition("the cluster has no hash key".into()));
                }
                access.hash_key = r.hash_key.clone();
            }
            if !r.ca_key.is_empty() {
                if access.ca_key.is_empty() {
                    return Err(Refusal::Precondition("the cluster has no CA".into()));
                }
                access.ca_key = r.ca_key.clone();
            }
            Ok(Some(AccessChange {
                object: "cluster/secrets".into(),
                action: "secrets.reseal",
                before: String::new(),
                after: serde_json::json!({
                    "hash_key": !r.hash_key.is_empty(),
                    "ca_key": !r.ca_key.is_empty(),
                })
                .to_string(),
                added: false,
            }))
        }
    }
}

/// Whether a certificate issued to `node` at `issued_at_ms` has been revoked.
pub fn revoked(access: &Access, node: u64, issued_at_ms: u64) -> bool {
    access
        .revoked_nodes
        .get(&node)
        .is_some_and(|&before| issued_at_ms < before)
}
