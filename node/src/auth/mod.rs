//! Who is calling, on the data plane: API keys and JWTs checked against the node's
//! [`AuthTable`], compiled from the replicated state with the rest of the snapshot. No
//! cluster call is made on a request.

pub mod jwt;
pub mod principal;

use std::collections::HashMap;
use std::sync::Arc;

use crate::state::access::{Access, KEY_PREFIX, split_credential, verify_secret};

/// The keys and subscriptions a node checks callers against.
#[derive(Debug, Default)]
pub struct AuthTable {
    hash_key: Vec<u8>,
    /// Keys that are not revoked, by id. Expiry is checked per request.
    keys: HashMap<String, KeyEntry>,
    /// Keys that are client certificates, by SHA-256 fingerprint (`auth: mtls`).
    certificates: HashMap<[u8; 32], KeyEntry>,
    /// Tenant -> API -> which versions its keys may call.
    subscriptions: HashMap<String, HashMap<String, semver::VersionReq>>,
}

#[derive(Debug)]
struct KeyEntry {
    /// The key's id again, shared: what metering records per request.
    id: Arc<str>,
    tenant: Arc<str>,
    hash: Vec<u8>,
    expires_at_ms: u64,
    /// The LLM models the key may use (empty: all).
    models: Arc<[Arc<str>]>,
}

/// Why a presented key was not let in (401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Unknown,
    Expired,
}

/// The credential of an `Authorization: Bearer <credential>` value (either case of
/// `Bearer`), trimmed; `None` for another scheme.
pub fn strip_bearer(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

impl AuthTable {
    /// `hash_key` is the state's hash key, opened.
    pub fn build(access: &Access, hash_key: &[u8]) -> AuthTable {
        let entry = |k: &crate::state::access::Credential| KeyEntry {
            id: Arc::from(k.id.as_str()),
            tenant: Arc::from(k.tenant.as_str()),
            hash: k.hash.clone(),
            expires_at_ms: k.expires_at_ms,
            models: k.models.iter().map(|m| Arc::from(m.as_str())).collect(),
        };
        AuthTable {
            hash_key: hash_key.to_vec(),
            certificates: access
                .keys
                .values()
                .filter(|k| k.revoked_at_ms == 0 && k.client_certificate)
                .filter_map(|k| Some((k.hash.as_slice().try_into().ok()?, entry(k))))
                .collect(),
            keys: access
                .keys
                .values()
                .filter(|k| k.revoked_at_ms == 0 && !k.client_certificate)
                .map(|k| {
                    (
                        k.id.clone(),
                        KeyEntry {
                            id: Arc::from(k.id.as_str()),
                            tenant: Arc::from(k.tenant.as_str()),
                            hash: k.hash.clone(),
                            expires_at_ms: k.expires_at_ms,
                            models: k.models.iter().map(|m| Arc::from(m.as_str())).collect(),
                        },
                    )
                })
                .collect(),
            subscriptions: access
                .tenants
                .values()
                .map(|t| {
                    let subs = t
                        .subscriptions
                        .iter()
                        .filter_map(|(api, req)| {
                            crate::state::access::parse_requirement(req)
                                .ok()
                                .map(|r| (api.clone(), r))
                        })
                        .collect();
                    (t.name.clone(), subs)
                })
                .collect(),
        }
    }

    /// The tenant of a presented API key, and the key's id.
    pub fn key(&self, presented: &str, now_ms: u64) -> Result<(&Arc<str>, &Arc<str>), AuthError> {
        let (id, secret) = split_credential(KEY_PREFIX, presented).ok_or(AuthError::Unknown)?;
        let entry = self.keys.get(id).ok_or(AuthError::Unknown)?;
        if !verify_secret(&self.hash_key, secret, &entry.hash) {
            return Err(AuthError::Unknown);
        }
        if entry.expires_at_ms != 0 && now_ms >= entry.expires_at_ms {
            return Err(AuthError::Expired);
        }
        Ok((&entry.id, &entry.tenant))
    }

    /// The LLM models key `id` may use; None: every model.
    pub fn models_of(&self, id: &str) -> Option<&[Arc<str>]> {
        self.keys
            .get(id)
            .map(|e| &*e.models)
            .filter(|m| !m.is_empty())
    }

    /// The tenant and key id of a client certificate (its SHA-256 fingerprint), verified
    /// in the TLS handshake.
    pub fn certificate(
        &self,
        fingerprint: &[u8; 32],
        now_ms: u64,
    ) -> Result<(&Arc<str>, &Arc<str>), AuthError> {
        let entry = self
            .certificates
            .get(fingerprint)
            .ok_or(AuthError::Unknown)?;
        if entry.expires_at_ms != 0 && now_ms >= entry.expires_at_ms {
            return Err(AuthError::Expired);
        }
        Ok((&entry.id, &entry.tenant))
    }

    /// Whether `tenant` may call `version` of `api` (owned by `owner`).
    pub fn may_call(
        &self,
        tenant: &str,
        api: &str,
        owner: &str,
        version: &semver::Version,
    ) -> bool {
        tenant == owner
            || self
                .subscriptions
                .get(tenant)
                .and_then(|s| s.get(api))
                .is_some_and(|req| req.matches(version))
    }
}
