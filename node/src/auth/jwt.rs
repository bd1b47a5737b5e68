//! JWT validation for APIs with `auth: jwt`: signature against a static JWKS, `exp`,
//! `iss` and `aud` required and checked, the tenant read from a claim.

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
    tenant_claim: String,
}

impl std::fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtValidator")
            .field("keys", &self.keys.len())
            .field("tenant_claim", &self.tenant_claim)
            .finish()
    }
}

impl JwtValidator {
    pub fn new(
        jwks: &str,
        issuer: &str,
        audience: &str,
        tenant_claim: &str,
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
            tenant_claim: tenant_claim.to_string(),
        })
    }

    /// The tenant a valid token names, or why the token is refused.
    pub fn verify(&self, token: &str) -> Result<String, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("malformed JWT: {e}"))?;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => self.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Err("the JWT's kid names no key of this API".into());
        }
        let mut last = String::from("the JWT's algorithm matches no key of this API");
        for k in candidates {
            if !k.validation.algorithms.contains(&header.alg) {
                continue;
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &k.validation) {
                Ok(data) => {
                    return data
                        .claims
                        .get(&self.tenant_claim)
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| {
                            format!("the JWT has no string claim {:?}", self.tenant_claim)
                        });
                }
                Err(e) => last = format!("the JWT is not valid: {e}"),
            }
        }
        Err(last)
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
        let v = JwtValidator::new(&hs_jwks(secret), "https://idp", "orders", "tenant").unwrap();
        let exp = chrono::Utc::now().timestamp() + 600;
        let good = serde_json::json!({"iss": "https://idp", "aud": "orders", "exp": exp, "tenant": "acme"});
        assert_eq!(v.verify(&token(secret, good.clone())).unwrap(), "acme");
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
        assert_eq!(v.verify(&token(secret, now)).unwrap(), "acme");
        assert!(
            v.verify(&token(b"another-secret-another-secret-xx", good))
                .is_err()
        );
        assert!(v.verify("not.a.jwt").is_err());
    }

    #[test]
    fn a_jwks_without_keys_or_alg_is_refused() {
        assert!(parse_jwks(r#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#).is_err());
        assert!(parse_jwks("nope").is_err());
    }
}
