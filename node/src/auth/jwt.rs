//! JWT validation for APIs with `auth: jwt`: signature against a static JWKS, `exp`,
//! `iss` and `aud` required and checked.
//!
//! Who pays is never read from the token. The issuer and its keys are set in the API's
//! settings by the API's owner, so the issuer is registered to that tenant, and every
//! request a valid token lets in is charged to it (as Kong charges a JWT to the Consumer
//! that owns the credential, whatever the claims say). The tenant claim (`tenant` unless
//! the API names another) is only checked: a token that names another tenant there is
//! refused, since its issuer cannot speak for that tenant (docs/decisions.md).

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Sealing purpose of a JWKS's symmetric keys.
pub const JWKS_PURPOSE: &str = "jwks";

/// The JWKS with every symmetric key (`k`) passed through `f`: sealing them for the state,
/// or opening them for the data plane.
pub fn map_symmetric_keys(
    text: &str,
    f: &dyn Fn(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("jwks is not JSON: {e}"))?;
    let mut changed = false;
    if let Some(keys) = v.get_mut("keys").and_then(|k| k.as_array_mut()) {
        for key in keys {
            if let Some(serde_json::Value::String(k)) = key.get_mut("k") {
                *k = f(k)?;
                changed = true;
            }
        }
    }
    Ok(if changed {
        v.to_string()
    } else {
        text.to_string()
    })
}

/// Whether the JWKS holds a symmetric key in the clear.
pub fn has_clear_symmetric_key(text: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    v.get("keys")
        .and_then(|k| k.as_array())
        .is_some_and(|keys| {
            keys.iter().any(|key| {
                key.get("k")
                    .and_then(|k| k.as_str())
                    .is_some_and(|k| !crate::identity::seal::is_sealed_text(k))
            })
        })
}

/// Parses a JWKS and checks every key is usable (has `alg`, a supported key type). A
/// sealed symmetric key is taken as it is: the leader checked it before sealing it.
pub fn parse_jwks(text: &str) -> Result<JwkSet, String> {
    let set: JwkSet = serde_json::from_str(text)
        .map_err(|e| format!("jwks is not a JSON Web Key Set ({e}); give {{\"keys\": [...]}}"))?;
    if set.keys.is_empty() {
        return Err("jwks has no keys".into());
    }
    for (i, k) in set.keys.iter().enumerate() {
        if k.common.key_algorithm.is_none() || !k.is_supported() {
            return Err(format!(
                "jwks key {i} needs a supported \"alg\" (RS256, ES256, EdDSA, HS256 ...)"
            ));
        }
        if let jsonwebtoken::jwk::AlgorithmParameters::OctetKey(o) = &k.algorithm
            && crate::identity::seal::is_sealed_text(&o.value)
        {
            continue;
        }
        DecodingKey::from_jwk(k).map_err(|e| format!("jwks key {i} is not usable: {e}"))?;
    }
    Ok(set)
}

/// A JWKS with every symmetric secret (`k`) replaced, for listings: an HS256 key is a
/// secret, unlike RSA or EC public keys. To rotate one, give the new key a new `kid`.
pub fn redact_jwks(text: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) else {
        return text.to_string();
    };
    if let Some(keys) = v.get_mut("keys").and_then(|k| k.as_array_mut()) {
        for key in keys {
            if let Some(k) = key.get_mut("k") {
                *k = serde_json::Value::String("(redacted)".into());
            }
        }
    }
    v.to_string()
}

/// The same, on an API's settings (for listings and for comparing with one).
pub fn redact_settings(settings: &mut tollgate_proto::state::v1::ApiSettings) {
    if let Some(jwt) = settings.jwt.as_mut() {
        jwt.jwks = redact_jwks(&jwt.jwks);
    }
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// A compiled validator for one API.
pub struct JwtValidator {
    keys: Vec<Key>,
    /// The claim that, when a token carries it, must name the API's owner.
    tenant_claim: String,
    /// The API's owner: the tenant the issuer is registered to.
    owner: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtRefusal {
    /// Not a valid token of this API's issuer (401).
    Invalid(String),
    /// Valid, but it names another tenant than the one its issuer is registered to (403).
    OtherTenant(String),
}

impl std::fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidator")
            .field("keys", &self.keys.len())
            .field("tenant_claim", &self.tenant_claim)
            .field("owner", &self.owner)
            .finish()
    }
}

impl JwtValidator {
    /// A validator for an API owned by `owner`, whose settings register `issuer`.
    pub fn new(
        jwks: &str,
        issuer: &str,
        audience: &str,
        tenant_claim: &str,
        owner: &str,
    ) -> Result<JwtValidator, String> {
        let set = parse_jwks(jwks)?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for k in &set.keys {
            let alg: Algorithm = k
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok())
                .ok_or("a jwks key has an algorithm that cannot sign tokens")?;
            let mut validation = Validation::new(alg);
            validation.set_issuer(&[issuer]);
            validation.set_audience(&[audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.leeway = 30;
            // A token not valid yet (`nbf` in the future, past the leeway) is refused.
            validation.validate_nbf = true;
            keys.push(Key {
                kid: k.common.key_id.clone(),
                key: DecodingKey::from_jwk(k).map_err(|e| e.to_string())?,
                validation,
            });
        }
        Ok(JwtValidator {
            keys,
            tenant_claim: if tenant_claim.is_empty() {
                "tenant".into()
            } else {
                tenant_claim.to_string()
            },
            owner: owner.to_string(),
        })
    }

    /// Checks a token. A valid one's requests are charged to the API's owner (the tenant
    /// the issuer is registered to), so nothing of the token is returned.
    pub fn verify(&self, token: &str) -> Result<(), JwtRefusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| JwtRefusal::Invalid(format!("malformed JWT: {e}")))?;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => self.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(JwtRefusal::Invalid(
                "the JWT's kid names no key of this API".into(),
            ));
        }
        let mut last = String::from("the JWT's algorithm matches no key of this API");
        for k in candidates {
            if !k.validation.algorithms.contains(&header.alg) {
                continue;
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &k.validation) {
                Ok(data) => return self.check_tenant(&data.claims),
                Err(e) => last = format!("the JWT is not valid: {e}"),
            }
        }
        Err(JwtRefusal::Invalid(last))
    }

    /// A token may leave the tenant claim out, or name the owner in it; anything else asks
    /// to be charged to someone the issuer cannot speak for.
    fn check_tenant(&self, claims: &serde_json::Value) -> Result<(), JwtRefusal> {
        match claims.get(&self.tenant_claim) {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(serde_json::Value::String(t)) if *t == self.owner => Ok(()),
            Some(serde_json::Value::String(t)) => Err(JwtRefusal::OtherTenant(format!(
                "the JWT's {:?} claim names tenant {t:?}, but this API's issuer is registered \
                 to the API's owner, which every request its tokens sign is charged to; a \
                 token cannot name another tenant (leave the claim out, or name the owner)",
                self.tenant_claim
            ))),
            Some(_) => Err(JwtRefusal::Invalid(format!(
                "the JWT's {:?} claim is not a string",
                self.tenant_claim
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn hs_jwks(secret: &[u8]) -> String {
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        format!(r#"{{"keys":[{{"kty":"oct","alg":"HS256","kid":"k1","k":"{k}"}}]}}"#)
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_token_is_checked_for_signature_issuer_audience_and_expiry() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let v =
            JwtValidator::new(&hs_jwks(secret), "https://idp", "orders", "tenant", "acme").unwrap();
        let exp = chrono::Utc::now().timestamp() + 600;
        let good = serde_json::json!({"iss": "https://idp", "aud": "orders", "exp": exp, "tenant": "acme"});
        assert_eq!(v.verify(&token(secret, good.clone())), Ok(()));
        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = "other".into();
        assert!(v.verify(&token(secret, wrong_aud)).is_err());
        let mut expired = good.clone();
        expired["exp"] = (exp - 7200).into();
        assert!(v.verify(&token(secret, expired)).is_err());
        // Not valid yet: `nbf` an hour ahead is refused; within the 30 s leeway it is not.
        let mut early = good.clone();
        early["nbf"] = (exp - 600 + 3600).into();
        assert!(v.verify(&token(secret, early)).is_err());
        let mut now = good.clone();
        now["nbf"] = (exp - 600 + 10).into();
        assert_eq!(v.verify(&token(secret, now)), Ok(()));
        assert!(
            v.verify(&token(b"another-secret-another-secret-xx", good))
                .is_err()
        );
        assert!(v.verify("not.a.jwt").is_err());
    }

    #[test]
    fn a_token_is_charged_to_the_owner_and_cannot_name_another_tenant() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let exp = chrono::Utc::now().timestamp() + 600;
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"iss": "https://idp", "aud": "orders", "exp": exp});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            token(secret, c)
        };
        // The default claim is `tenant`; an API may name another.
        let v = JwtValidator::new(&hs_jwks(secret), "https://idp", "orders", "", "acme").unwrap();
        assert_eq!(v.verify(&claims(serde_json::json!({}))), Ok(()));
        assert_eq!(
            v.verify(&claims(serde_json::json!({"tenant": "acme"}))),
            Ok(())
        );
        let other = v.verify(&claims(serde_json::json!({"tenant": "beta"})));
        assert!(
            matches!(&other, Err(JwtRefusal::OtherTenant(m)) if m.contains("\"beta\"")),
            "{other:?}"
        );
        assert!(matches!(
            v.verify(&claims(serde_json::json!({"tenant": ["beta"]}))),
            Err(JwtRefusal::Invalid(_))
        ));
        let org =
            JwtValidator::new(&hs_jwks(secret), "https://idp", "orders", "org", "acme").unwrap();
        // Only the claim the API names is checked: `tenant` means nothing to this one.
        assert_eq!(
            org.verify(&claims(serde_json::json!({"tenant": "beta"}))),
            Ok(())
        );
        assert!(matches!(
            org.verify(&claims(serde_json::json!({"org": "beta"}))),
            Err(JwtRefusal::OtherTenant(_))
        ));
    }

    #[test]
    fn a_jwks_without_keys_or_alg_is_refused() {
        assert!(parse_jwks(r#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#).is_err());
        assert!(parse_jwks("nope").is_err());
    }
}
