//! Who may call what: tenants, their API keys (data plane) and control-plane tokens, and
//! the subscriptions that let a tenant's keys call another tenant's API.
//!
//! A subscription needs both sides' consent, since the subscribing tenant pays for what
//! its keys call: the API's owner offers and the tenant accepts, or the tenant requests
//! and the owner accepts; the operator grants at once. Who asks is set by the leader from
//! the authenticated caller ([`pb::SubscriptionParty`]), never taken from a client.
//!
//! Secrets are never stored. A credential is `<prefix>_<id>_<secret>`: the id is public
//! and indexes the credential; the state keeps HMAC-SHA256(hash key, secret), where the
//! hash key is 32 random bytes made once at bootstrap and replicated with the state. A
//! leaked state therefore holds no usable key, and checking a presented key is one
//! lookup by id and one constant-time comparison of hashes (`Mac::verify_slice`).

use std::collections::BTreeMap;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tollgate_proto::state::v1 as pb;

use crate::state::lifecycle::{Refusal, check_name};

type HmacSha256 = Hmac<Sha256>;

/// Prefix of an API key (data plane).
pub const KEY_PREFIX: &str = "tgk";
/// Prefix of a control-plane token (operator or tenant).
pub const TOKEN_PREFIX: &str = "tgt";

/// Longest credential label.
pub const MAX_LABEL: usize = 128;

/// Tenants, credentials and subscriptions, as the replicated state holds them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// Credentials are hashed under this; empty until the cluster is bootstrapped. Sealed
    /// (`crate::identity::seal`), or 32 plain bytes in a cluster made before sealing
    /// existed and not yet re-sealed.
    pub hash_key: Vec<u8>,
    /// The cluster CA's certificate (PEM); empty in a cluster made before node identity.
    pub ca_cert_pem: String,
    /// The CA's PKCS#8 key, sealed.
    pub ca_key: Vec<u8>,
    /// Join tokens by id.
    pub join_tokens: BTreeMap<String, Credential>,
    /// Removed nodes: certificates issued to them before the time are refused.
    pub revoked_nodes: BTreeMap<u64, u64>,
    /// Named secrets (`tollgate secret set`), sealed, by name.
    pub secrets: BTreeMap<String, NamedSecret>,
    pub tenants: BTreeMap<String, Tenant>,
    /// API keys by id.
    pub keys: BTreeMap<String, Credential>,
    /// Control-plane tokens by id (the operator's has no tenant).
    pub tokens: BTreeMap<String, Credential>,
}

/// A named secret, sealed (purpose `secret:<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamedSecret {
    pub value: Vec<u8>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tenant {
    pub name: String,
    pub created_at_ms: u64,
    /// API name -> semver requirement of the versions its keys may call: both sides
    /// agreed, or the operator granted it.
    pub subscriptions: BTreeMap<String, String>,
    /// API name -> a subscription one side asked for and the other has not agreed to. An
    /// API is in `subscriptions` or here, never both.
    pub pending: BTreeMap<String, Pending>,
}

/// A subscription waiting for the other side's consent: it lets nothing through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub versions: String,
    /// `Owner` (an offer) or `Subscriber` (a request).
    pub asked_by: pb::SubscriptionParty,
    pub asked_at_ms: u64,
}

/// Who waits for whom, in words: "offered" or "requested".
pub fn pending_status(asked_by: pb::SubscriptionParty) -> &'static str {
    match asked_by {
        pb::SubscriptionParty::Owner => "offered",
        _ => "requested",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Credential {
    pub id: String,
    /// Empty for the operator token.
    pub tenant: String,
    pub name: String,
    pub hash: Vec<u8>,
    pub created_at_ms: u64,
    /// 0: never.
    pub expires_at_ms: u64,
    /// 0: not revoked.
    pub revoked_at_ms: u64,
    /// Join tokens only: how many nodes may use it, how many did, and who.
    pub uses: u32,
    pub used: u32,
    pub used_by: Vec<String>,
    /// An API key that is a client certificate: `hash` is its SHA-256 fingerprint.
    pub client_certificate: bool,
    /// Keys only: the LLM models the key may use (empty: all).
    pub models: Vec<String>,
}

impl Credential {
    /// Whether it lets its holder in at `now_ms`.
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.revoked_at_ms == 0 && (self.expires_at_ms == 0 || now_ms < self.expires_at_ms)
    }

    /// The stored form without its hash (for listings and the audit log).
    pub fn to_public_proto(&self) -> pb::CredentialState {
        pb::CredentialState {
            hash: Vec::new(),
            ..self.to_proto()
        }
    }

    pub fn to_proto(&self) -> pb::CredentialState {
        pb::CredentialState {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            hash: self.hash.clone(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            revoked_at_ms: self.revoked_at_ms,
            uses: self.uses,
            used: self.used,
            used_by: self.used_by.clone(),
            client_certificate: self.client_certificate,
            models: self.models.clone(),
        }
    }

    pub fn from_proto(p: &pb::CredentialState) -> Credential {
        Credential {
            id: p.id.clone(),
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            hash: p.hash.clone(),
            created_at_ms: p.created_at_ms,
            expires_at_ms: p.expires_at_ms,
            revoked_at_ms: p.revoked_at_ms,
            uses: p.uses,
            used: p.used,
            used_by: p.used_by.clone(),
            client_certificate: p.client_certificate,
            models: p.models.clone(),
        }
    }
}

/// A new credential: its id, the whole secret to hand to the caller once, and what the
/// state stores.
pub struct Minted {
    pub id: String,
    pub secret: String,
    pub hash: Vec<u8>,
}

/// Makes a credential: 8 random bytes of id (hex) and 32 of secret (base64url).
pub fn mint(prefix: &str, hash_key: &[u8]) -> Result<Minted, String> {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).map_err(|e| format!("no randomness: {e}"))?;
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness: {e}"))?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    Ok(Minted {
        hash: hash_secret(hash_key, &secret),
        secret: format!("{prefix}_{id}_{secret}"),
        id,
    })
}

/// 32 random bytes for the cluster's hash key.
pub fn new_hash_key() -> Result<Vec<u8>, String> {
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness: {e}"))?;
    Ok(key)
}

fn hash_secret(hash_key: &[u8], secret: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(hash_key).expect("HMAC takes any key length");
    mac.update(secret.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Splits a presented credential into (id, secret) if it has the expected prefix.
pub fn split_credential<'a>(prefix: &str, presented: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = presented.strip_prefix(prefix)?.strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Whether `secret` hashes to `hash` under `hash_key`, compared in constant time.
pub fn verify_secret(hash_key: &[u8], secret: &str, hash: &[u8]) -> bool {
    let Ok(mut mac) = HmacSha256::new_from_slice(hash_key) else {
        return false;
    };
    mac.update(secret.as_bytes());
    mac.verify_slice(hash).is_ok()
}

/// Checks a presented credential against a table: the credential if it is known, its
/// secret matches and it is valid at `now_ms`.
pub fn check<'a>(
    table: &'a BTreeMap<String, Credential>,
    hash_key: &[u8],
    prefix: &str,
    presented: &str,
    now_ms: u64,
) -> Option<&'a Credential> {
    let (id, secret) = split_credential(prefix, presented)?;
    let cred = table.get(id)?;
    (verify_secret(hash_key, secret, &cred.hash) && cred.valid_at(now_ms)).then_some(cred)
}

/// Checks a subscription's version requirement ("2", "^2.1", "*", or empty for all).
pub fn parse_requirement(text: &str) -> Result<semver::VersionReq, Refusal> {
    if text.is_empty() {
        return Ok(semver::VersionReq::STAR);
    }
    semver::VersionReq::parse(text).map_err(|e| {
        Refusal::Invalid(format!(
            "versions {text:?} is not a semver requirement ({e}); write it like 2, ^2.1 or *"
        ))
    })
}

/// What an applied access command did, for the history and the audit log.
pub struct AccessChange {
    pub object: String,
    pub action: &'static str,
    pub before: String,
    pub after: String,
    pub added: bool,
}

fn tenant_json(t: Option<&Tenant>) -> String {
    t.map(|t| {
        let pending: BTreeMap<&String, serde_json::Value> = t
            .pending
            .iter()
            .map(|(api, p)| {
                let v = serde_json::json!({
                    "versions": p.versions,
                    "status": pending_status(p.asked_by),
                });
                (api, v)
            })
            .collect();
        serde_json::json!({
            "name": t.name,
            "subscriptions": t.subscriptions,
            "pending": pending,
        })
        .to_string()
    })
    .unwrap_or_default()
}

fn credential_json(c: Option<&Credential>) -> String {
    c.map(|c| {
        serde_json::json!({
            "id": c.id,
            "tenant": c.tenant,
            "name": c.name,
            "expires_at_ms": c.expires_at_ms,
            "revoked_at_ms": c.revoked_at_ms,
            "models": c.models,
        })
        .to_string()
    })
    .unwrap_or_default()
}

/// Applies one access command. Deterministic; a refusal changes nothing. `api_owner`
/// names an API's owning tenant (None: no such API; subscriptions must name one);
/// `owns_apis` says whether a tenant still owns any (it cannot be deleted then).
pub fn apply_command(
    access: &mut Access,
    cmd: &pb::AccessCommand,
    at_ms: u64,
    api_owner: &dyn Fn(&str) -> Option<String>,
    owns_apis: &dyn Fn(&str) -> bool,
) -> Result<Option<AccessChange>, Refusal> {
    use pb::access_command::Op;
    check_name("tenant", &cmd.tenant)?;
    let Some(op) = &cmd.op else {
        return Err(Refusal::Invalid(
            "the access command has no operation (a newer node's command?)".into(),
        ));
    };
    let tenant = cmd.tenant.as_str();
    if let Op::CreateTenant(_) = op {
        if access.tenants.contains_key(tenant) {
            return Err(Refusal::Precondition(format!(
                "tenant {tenant} already exists"
            )));
        }
        let t = Tenant {
            name: tenant.to_string(),
            created_at_ms: at_ms,
            ..Tenant::default()
        };
        let after = tenant_json(Some(&t));
        access.tenants.insert(tenant.to_string(), t);
        return Ok(Some(AccessChange {
            object: format!("tenant/{tenant}"),
            action: "tenant.create",
            before: String::new(),
            after,
            added: true,
        }));
    }
    let Some(existing) = access.tenants.get(tenant) else {
        return Err(Refusal::NotFound(format!(
            "there is no tenant {tenant}; create it first"
        )));
    };
    let before_tenant = tenant_json(Some(existing));
    match op {
        Op::CreateTenant(_) => unreachable!("handled above"),
        Op::DeleteTenant(_) => {
            if owns_apis(tenant) {
                return Err(Refusal::Precondition(format!(
                    "tenant {tenant} still owns APIs; they must go first"
                )));
            }
            access.tenants.remove(tenant);
            let now = at_ms.max(1);
            for table in [&mut access.keys, &mut access.tokens] {
                for c in table.values_mut().filter(|c| c.tenant == tenant) {
                    if c.revoked_at_ms == 0 {
                        c.revoked_at_ms = now;
                    }
                }
            }
            Ok(Some(AccessChange {
                object: format!("tenant/{tenant}"),
                action: "tenant.delete",
                before: before_tenant,
                after: String::new(),
                added: false,
            }))
        }
        Op::Subscribe(s) => {
            check_name("API", &s.api)?;
            let t = access.tenants.get_mut(tenant).expect("checked above");
            let Some(action) = subscribe(t, s, at_ms, api_owner)? else {
                return Ok(None);
            };
            Ok(Some(AccessChange {
                object: format!("tenant/{tenant}"),
                action,
                before: before_tenant,
                after: tenant_json(Some(t)),
                added: false,
            }))
        }
        Op::Unsubscribe(u) => {
            let t = access.tenants.get_mut(tenant).expect("checked above");
            let action = if t.subscriptions.remove(&u.api).is_some() {
                "subscription.end"
            } else if let Some(p) = t.pending.remove(&u.api) {
                match (p.asked_by, u.party()) {
                    (asked, by) if asked == by => "subscription.withdraw",
                    (_, pb::SubscriptionParty::Owner | pb::SubscriptionParty::Subscriber) => {
                        "subscription.decline"
                    }
                    _ => "subscription.cancel",
                }
            } else {
                return Err(Refusal::NotFound(format!(
                    "tenant {tenant} is not subscribed to API {}, and no subscription to it waits",
                    u.api
                )));
            };
            Ok(Some(AccessChange {
                object: format!("tenant/{tenant}"),
                action,
                before: before_tenant,
                after: tenant_json(Some(t)),
                added: false,
            }))
        }
        Op::CreateKey(c) | Op::CreateToken(c) => {
            let (table, kind) = match op {
                Op::CreateKey(_) => (&mut access.keys, "key"),
                _ => (&mut access.tokens, "token"),
            };
            check_credential(c)?;
            let by_certificate = !c.client_certificate.is_empty();
            if by_certificate && kind != "key" {
                return Err(Refusal::Invalid(
                    "only an API key can be a client certificate".into(),
                ));
            }
            if by_certificate
                && let Some(other) = table
                    .values()
                    .find(|k| k.client_certificate && k.hash == c.hash && k.revoked_at_ms == 0)
            {
                return Err(Refusal::Precondition(format!(
                    "this certificate is key {} of tenant {} already; revoke that one first",
                    other.id, other.tenant
                )));
            }
            if table.contains_key(&c.id) {
                return Err(Refusal::Precondition(format!(
                    "a {kind} with id {} already exists",
                    c.id
                )));
            }
            if c.expires_at_ms != 0 && c.expires_at_ms <= at_ms {
                return Err(Refusal::Invalid(format!(
                    "the {kind} would expire before it is made; give an expiry in the future"
                )));
            }
            let cred = Credential {
                id: c.id.clone(),
                tenant: tenant.to_string(),
                name: c.name.clone(),
                hash: c.hash.clone(),
                created_at_ms: at_ms,
                expires_at_ms: c.expires_at_ms,
                client_certificate: by_certificate,
                models: if kind == "key" {
                    c.models.clone()
                } else {
                    Vec::new()
                },
                ..Credential::default()
            };
            let after = credential_json(Some(&cred));
            table.insert(c.id.clone(), cred);
            Ok(Some(AccessChange {
                object: format!("{kind}/{}", c.id),
                action: if kind == "key" {
                    "key.create"
                } else {
                    "token.create"
                },
                before: String::new(),
                after,
                added: true,
            }))
        }
        Op::RevokeKey(r) | Op::RevokeToken(r) => {
            let (table, kind) = match op {
                Op::RevokeKey(_) => (&mut access.keys, "key"),
                _ => (&mut access.tokens, "token"),
            };
            let Some(cred) = table.get_mut(&r.id).filter(|c| c.tenant == tenant) else {
                return Err(Refusal::NotFound(format!(
                    "tenant {tenant} has no {kind} {}",
                    r.id
                )));
            };
            if cred.revoked_at_ms != 0 {
                return Ok(None);
            }
            let before = credential_json(Some(cred));
            cred.revoked_at_ms = at_ms.max(1);
            Ok(Some(AccessChange {
                object: format!("{kind}/{}", r.id),
                action: if kind == "key" {
                    "key.revoke"
                } else {
                    "token.revoke"
                },
                before,
                after: credential_json(Some(cred)),
                added: false,
            }))
        }
    }
}

/// A subscribe on tenant `t`'s side: what it did (the audit action), or None when it
/// changed nothing.
///
/// - The operator (and a command of an older leader, whose party is unspecified) grants:
///   the subscription is active with the versions asked for, whatever waited.
/// - The API's owner or the tenant itself, when nothing exists yet: it waits (an offer,
///   or a request) and lets nothing through.
/// - The other side then agrees (`accept`, or the same versions): it is active. Other
///   versions replace what waits: a counter-offer, waiting for the first side.
/// - An active subscription's versions are the owner's to change (the tenant already
///   agreed to pay for what its keys call there); the tenant asks the owner instead.
fn subscribe(
    t: &mut Tenant,
    s: &pb::Subscribe,
    at_ms: u64,
    api_owner: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<&'static str>, Refusal> {
    use pb::SubscriptionParty as Party;
    if s.accept && !s.versions.is_empty() {
        return Err(Refusal::Invalid(
            "accept takes the versions the other side asked for: leave versions empty (or \
             give versions without accept to ask for others)"
                .into(),
        ));
    }
    parse_requirement(&s.versions)?;
    let Some(owner) = api_owner(&s.api) else {
        return Err(Refusal::NotFound(format!("there is no API {}", s.api)));
    };
    let (tenant, api) = (t.name.clone(), s.api.as_str());
    if owner == tenant {
        return Err(Refusal::Precondition(format!(
            "tenant {tenant} owns API {api}: its keys call every version without a subscription"
        )));
    }
    let versions = if s.versions.is_empty() {
        "*".to_string()
    } else {
        s.versions.clone()
    };
    let party = s.party();
    let waiting = t.pending.get(api).cloned();
    let activate = |t: &mut Tenant, versions: String| {
        t.pending.remove(api);
        t.subscriptions.insert(api.to_string(), versions);
    };
    if s.accept {
        return match waiting {
            Some(p) if p.asked_by != party => {
                activate(t, p.versions);
                Ok(Some("subscription.accept"))
            }
            Some(p) => Err(Refusal::Precondition(format!(
                "the subscription of tenant {tenant} to API {api} was {} by this side; it waits \
                 for {} to accept",
                pending_status(p.asked_by),
                if p.asked_by == Party::Owner {
                    format!("tenant {tenant}")
                } else {
                    "the API's owner".to_string()
                }
            ))),
            None if t.subscriptions.contains_key(api) => Ok(None),
            None => Err(Refusal::NotFound(format!(
                "nothing waits to be accepted: no subscription of tenant {tenant} to API {api} \
                 was offered or requested"
            ))),
        };
    }
    match party {
        Party::Unspecified | Party::Operator => {
            if waiting.is_none() && t.subscriptions.get(api) == Some(&versions) {
                return Ok(None);
            }
            activate(t, versions);
            Ok(Some("subscription.grant"))
        }
        Party::Owner | Party::Subscriber => {
            if let Some(active) = t.subscriptions.get_mut(api) {
                if *active == versions {
                    return Ok(None);
                }
                if party == Party::Subscriber {
                    return Err(Refusal::Precondition(format!(
                        "tenant {tenant} is subscribed to versions {active} of API {api}; the \
                         API's owner changes them (or unsubscribe, and request again)"
                    )));
                }
                *active = versions;
                return Ok(Some("subscription.change"));
            }
            match waiting {
                Some(p) if p.asked_by != party && p.versions == versions => {
                    activate(t, versions);
                    Ok(Some("subscription.accept"))
                }
                Some(p) if p.asked_by == party && p.versions == versions => Ok(None),
                _ => {
                    t.pending.insert(
                        api.to_string(),
                        Pending {
                            versions,
                            asked_by: party,
                            asked_at_ms: at_ms,
                        },
                    );
                    Ok(Some(if party == Party::Owner {
                        "subscription.offer"
                    } else {
                        "subscription.request"
                    }))
                }
            }
        }
    }
}

/// Most models one key may be limited to.
pub const MAX_KEY_MODELS: usize = 64;

pub(crate) fn check_credential(c: &pb::CreateCredential) -> Result<(), Refusal> {
    if c.id.is_empty() || c.hash.len() != 32 {
        return Err(Refusal::Invalid(
            "a credential is made by the node (id and hash are filled in there)".into(),
        ));
    }
    if c.name.len() > MAX_LABEL || c.name.chars().any(char::is_control) {
        return Err(Refusal::Invalid(format!(
            "the label must be at most {MAX_LABEL} printable characters"
        )));
    }
    if c.models.len() > MAX_KEY_MODELS
        || c.models
            .iter()
            .any(|m| m.is_empty() || m.len() > 256 || !m.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(Refusal::Invalid(format!(
            "a key names at most {MAX_KEY_MODELS} models, each 1-256 printable characters without spaces"
        )));
    }
    Ok(())
}

/// Applies the bootstrap command: the hash key and the operator token, once.
pub fn bootstrap(
    access: &mut Access,
    b: &pb::Bootstrap,
    at_ms: u64,
) -> Result<Option<AccessChange>, Refusal> {
    if !access.hash_key.is_empty() {
        return Ok(None);
    }
    let Some(t) = &b.operator_token else {
        return Err(Refusal::Invalid(
            "the bootstrap has no operator token".into(),
        ));
    };
    if b.hash_key.len() != 32 && !crate::identity::seal::is_sealed(&b.hash_key) {
        return Err(Refusal::Invalid(
            "the hash key must be sealed (or 32 bytes, from an older node)".into(),
        ));
    }
    if !b.ca_key.is_empty() && !crate::identity::seal::is_sealed(&b.ca_key) {
        return Err(Refusal::Invalid("the CA key must be sealed".into()));
    }
    check_credential(t)?;
    access.hash_key = b.hash_key.clone();
    access.ca_cert_pem = b.ca_cert_pem.clone();
    access.ca_key = b.ca_key.clone();
    let cred = Credential {
        id: t.id.clone(),
        tenant: String::new(),
        name: if t.name.is_empty() {
            "operator".into()
        } else {
            t.name.clone()
        },
        hash: t.hash.clone(),
        created_at_ms: at_ms,
        ..Credential::default()
    };
    let after = credential_json(Some(&cred));
    access.tokens.insert(t.id.clone(), cred);
    Ok(Some(AccessChange {
        object: format!("token/{}", t.id),
        action: "cluster.bootstrap",
        before: String::new(),
        after,
        added: true,
    }))
}

impl Access {
    pub fn to_proto(&self, out: &mut pb::StateSnapshot) {
        out.hash_key = self.hash_key.clone();
        out.tenants = self.tenants.values().map(tenant_to_proto).collect();
        out.keys = self.keys.values().map(Credential::to_proto).collect();
        out.tokens = self.tokens.values().map(Credential::to_proto).collect();
        out.ca_cert_pem = self.ca_cert_pem.clone();
        out.ca_key = self.ca_key.clone();
        out.join_tokens = self
            .join_tokens
            .values()
            .map(Credential::to_proto)
            .collect();
        out.revoked_nodes = self
            .revoked_nodes
            .iter()
            .map(|(&node_id, &before_ms)| pb::RevokedNodeState { node_id, before_ms })
            .collect();
        out.secrets = self
            .secrets
            .iter()
            .map(|(name, s)| pb::SecretState {
                name: name.clone(),
                value: s.value.clone(),
                created_at_ms: s.created_at_ms,
                updated_at_ms: s.updated_at_ms,
            })
            .collect();
    }

    pub fn from_proto(p: &pb::StateSnapshot) -> Access {
        Access {
            hash_key: p.hash_key.clone(),
            tenants: p
                .tenants
                .iter()
                .map(|t| (t.name.clone(), tenant_from_proto(t)))
                .collect(),
            keys: p
                .keys
                .iter()
                .map(|c| (c.id.clone(), Credential::from_proto(c)))
                .collect(),
            tokens: p
                .tokens
                .iter()
                .map(|c| (c.id.clone(), Credential::from_proto(c)))
                .collect(),
            ca_cert_pem: p.ca_cert_pem.clone(),
            ca_key: p.ca_key.clone(),
            join_tokens: p
                .join_tokens
                .iter()
                .map(|c| (c.id.clone(), Credential::from_proto(c)))
                .collect(),
            revoked_nodes: p
                .revoked_nodes
                .iter()
                .map(|r| (r.node_id, r.before_ms))
                .collect(),
            secrets: p
                .secrets
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        NamedSecret {
                            value: s.value.clone(),
                            created_at_ms: s.created_at_ms,
                            updated_at_ms: s.updated_at_ms,
                        },
                    )
                })
                .collect(),
        }
    }
}

pub fn tenant_to_proto(t: &Tenant) -> pb::TenantState {
    pb::TenantState {
        name: t.name.clone(),
        created_at_ms: t.created_at_ms,
        subscriptions: t
            .subscriptions
            .iter()
            .map(|(api, versions)| pb::Subscription {
                api: api.clone(),
                versions: versions.clone(),
            })
            .collect(),
        pending: t
            .pending
            .iter()
            .map(|(api, p)| pb::PendingSubscription {
                api: api.clone(),
                versions: p.versions.clone(),
                asked_by: p.asked_by.into(),
                asked_at_ms: p.asked_at_ms,
            })
            .collect(),
    }
}

fn tenant_from_proto(t: &pb::TenantState) -> Tenant {
    Tenant {
        name: t.name.clone(),
        created_at_ms: t.created_at_ms,
        subscriptions: t
            .subscriptions
            .iter()
            .map(|s| (s.api.clone(), s.versions.clone()))
            .collect(),
        pending: t
            .pending
            .iter()
            .map(|p| {
                let pending = Pending {
                    versions: p.versions.clone(),
                    asked_by: p.asked_by(),
                    asked_at_ms: p.asked_at_ms,
                };
                (p.api.clone(), pending)
            })
            .collect(),
    }
}

/// The subscriptions `sees_tenant` lets a caller see, as listings show them: a tenant
/// sees its own and those to the APIs it owns (`owner_of` names an API's owner). The owner
/// of an API is left out of a waiting request the caller made itself: the owner gives
/// its name by answering.
pub fn subscription_views(
    access: &Access,
    viewer: Option<&str>,
    owner_of: &dyn Fn(&str) -> Option<String>,
    tenant: &str,
    api: &str,
) -> Vec<pb::SubscriptionView> {
    let mut out = Vec::new();
    for t in access.tenants.values() {
        if !tenant.is_empty() && t.name != tenant {
            continue;
        }
        let active = t.subscriptions.iter().map(|(a, v)| (a, v, None));
        let waiting = t.pending.iter().map(|(a, p)| (a, &p.versions, Some(p)));
        for (name, versions, pending) in active.chain(waiting) {
            if !api.is_empty() && name != api {
                continue;
            }
            let owner = owner_of(name).unwrap_or_default();
            let (mine, owned) = match viewer {
                None => (true, true),
                Some(v) => (v == t.name, v == owner),
            };
            if !mine && !owned {
                continue;
            }
            let hide_owner =
                !owned && pending.is_some_and(|p| p.asked_by == pb::SubscriptionParty::Subscriber);
            out.push(pb::SubscriptionView {
                tenant: t.name.clone(),
                api: name.clone(),
                owner: if hide_owner { String::new() } else { owner },
                versions: versions.clone(),
                status: pending
                    .map_or("active", |p| pending_status(p.asked_by))
                    .into(),
                asked_at_ms: pending.map_or(0, |p| p.asked_at_ms),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_credential_verifies_and_a_changed_one_does_not() {
        let key = new_hash_key().unwrap();
        let m = mint(KEY_PREFIX, &key).unwrap();
        let mut table = BTreeMap::new();
        table.insert(
            m.id.clone(),
            Credential {
                id: m.id.clone(),
                tenant: "acme".into(),
                hash: m.hash.clone(),
                ..Credential::default()
            },
        );
        assert!(check(&table, &key, KEY_PREFIX, &m.secret, 1).is_some());
        let mut wrong = m.secret.clone();
        wrong.pop();
        wrong.push('x');
        assert!(check(&table, &key, KEY_PREFIX, &wrong, 1).is_none());
        assert!(check(&table, &key, TOKEN_PREFIX, &m.secret, 1).is_none());
        // The stored hash is not the secret, and the secret appears nowhere in it.
        assert!(!String::from_utf8_lossy(&m.hash).contains(&m.secret));
        table.get_mut(&m.id).unwrap().revoked_at_ms = 5;
        assert!(check(&table, &key, KEY_PREFIX, &m.secret, 6).is_none());
    }

    /// Access with tenants acme (owning API orders) and beta, and a subscribe applier.
    fn two_tenants() -> Access {
        let mut a = Access::default();
        for t in ["acme", "beta"] {
            let cmd = pb::AccessCommand {
                tenant: t.into(),
                op: Some(pb::access_command::Op::CreateTenant(pb::CreateTenant {})),
            };
            apply_command(&mut a, &cmd, 1, &|_| None, &|_| false).unwrap();
        }
        a
    }

    fn subscribe(
        a: &mut Access,
        party: pb::SubscriptionParty,
        versions: &str,
        accept: bool,
    ) -> Result<Option<&'static str>, Refusal> {
        let mut s = pb::Subscribe {
            api: "orders".into(),
            versions: versions.into(),
            accept,
            ..Default::default()
        };
        s.set_party(party);
        let cmd = pb::AccessCommand {
            tenant: "beta".into(),
            op: Some(pb::access_command::Op::Subscribe(s)),
        };
        let owner = |api: &str| (api == "orders").then(|| "acme".to_string());
        apply_command(a, &cmd, 7, &owner, &|_| false).map(|c| c.map(|c| c.action))
    }

    fn active(a: &Access) -> Option<&str> {
        a.tenants["beta"]
            .subscriptions
            .get("orders")
            .map(String::as_str)
    }

    #[test]
    fn a_subscription_is_active_only_once_both_sides_agree() {
        use pb::SubscriptionParty::{Operator, Owner, Subscriber, Unspecified};
        // The owner offers: nothing active until beta accepts.
        let mut a = two_tenants();
        assert_eq!(
            subscribe(&mut a, Owner, "^2", false),
            Ok(Some("subscription.offer"))
        );
        assert_eq!(active(&a), None);
        assert_eq!(subscribe(&mut a, Owner, "^2", false), Ok(None), "again");
        // The side that asked cannot accept its own offer.
        assert!(matches!(
            subscribe(&mut a, Owner, "", true),
            Err(Refusal::Precondition(_))
        ));
        assert_eq!(
            subscribe(&mut a, Subscriber, "", true),
            Ok(Some("subscription.accept"))
        );
        assert_eq!(active(&a), Some("^2"));
        assert!(a.tenants["beta"].pending.is_empty());
        // Changing an active one's versions is the owner's; beta asks the owner instead.
        assert!(matches!(
            subscribe(&mut a, Subscriber, "*", false),
            Err(Refusal::Precondition(_))
        ));
        assert_eq!(
            subscribe(&mut a, Owner, "^3", false),
            Ok(Some("subscription.change"))
        );
        assert_eq!(active(&a), Some("^3"));

        // beta requests; a counter-offer with other versions waits for beta; the same
        // versions from the other side make it active.
        let mut a = two_tenants();
        assert_eq!(
            subscribe(&mut a, Subscriber, "*", false),
            Ok(Some("subscription.request"))
        );
        assert_eq!(
            subscribe(&mut a, Owner, "^1", false),
            Ok(Some("subscription.offer"))
        );
        assert_eq!(active(&a), None);
        assert_eq!(
            subscribe(&mut a, Subscriber, "^1", false),
            Ok(Some("subscription.accept"))
        );
        assert_eq!(active(&a), Some("^1"));

        // Nothing to accept; accept with versions is refused; the owner cannot subscribe
        // itself.
        let mut a = two_tenants();
        assert!(matches!(
            subscribe(&mut a, Subscriber, "", true),
            Err(Refusal::NotFound(_))
        ));
        assert!(matches!(
            subscribe(&mut a, Subscriber, "^2", true),
            Err(Refusal::Invalid(_))
        ));
        // The operator grants at once, as a command of an older leader (no party) does.
        assert_eq!(
            subscribe(&mut a, Operator, "^2", false),
            Ok(Some("subscription.grant"))
        );
        assert_eq!(active(&a), Some("^2"));
        let mut a = two_tenants();
        assert_eq!(
            subscribe(&mut a, Unspecified, "", false),
            Ok(Some("subscription.grant"))
        );
        assert_eq!(active(&a), Some("*"));
    }

    #[test]
    fn listings_show_each_side_its_own_and_hide_the_owner_of_a_waiting_request() {
        let mut a = two_tenants();
        let mut s = pb::Subscribe {
            api: "orders".into(),
            ..Default::default()
        };
        s.set_party(pb::SubscriptionParty::Subscriber);
        let cmd = pb::AccessCommand {
            tenant: "beta".into(),
            op: Some(pb::access_command::Op::Subscribe(s)),
        };
        let owner = |api: &str| (api == "orders").then(|| "acme".to_string());
        apply_command(&mut a, &cmd, 9, &owner, &|_| false).unwrap();
        let seen = |viewer: Option<&str>| subscription_views(&a, viewer, &owner, "", "");
        let beta = seen(Some("beta"));
        assert_eq!(
            (
                beta[0].status.as_str(),
                beta[0].owner.as_str(),
                beta[0].asked_at_ms
            ),
            ("requested", "", 9)
        );
        assert_eq!(seen(Some("acme"))[0].owner, "acme");
        assert_eq!(seen(None).len(), 1);
        assert!(seen(Some("gamma")).is_empty());
    }

    #[test]
    fn expiry_is_checked_against_the_time_given() {
        let c = Credential {
            expires_at_ms: 100,
            ..Credential::default()
        };
        assert!(c.valid_at(99));
        assert!(!c.valid_at(100));
    }
}
