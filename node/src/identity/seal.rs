//! Sealing: every secret the replicated state holds (the credential hash key, the cluster
//! CA's private key, HS256 JWT keys, webhook URLs) is stored encrypted under a sealing key
//! that never enters the state. A copy of the state, a snapshot, a Raft log or a backup
//! therefore holds nothing usable without the key.
//!
//! The cipher is AES-256-GCM with a fresh random 96-bit nonce per seal, and the secret's
//! purpose (`"hash-key"`, `"ca-key"`, ...) as associated data, so a sealed value cannot be
//! moved to another field. A sealed value is
//!
//! ```text
//! "tgs1" | key id (4 bytes) | nonce (12 bytes) | ciphertext | tag (16 bytes)
//! ```
//!
//! A node reads its keys (a [`Keyring`]) from a file or from `TOLLGATE_SEALING_KEY`: one
//! key per line, `tgsk1_` then 32 bytes in base64url. The first key seals; every key opens
//! what it sealed, which is how the key is rotated (docs/security.md).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use sha2::{Digest, Sha256};

/// The text form of a sealing key starts with this.
pub const KEY_PREFIX: &str = "tgsk1_";
/// A sealed value starts with this.
const MAGIC: &[u8; 4] = b"tgs1";
const NONCE: usize = 12;
const TAG: usize = 16;
const HEADER: usize = MAGIC.len() + 4 + NONCE;

/// One sealing key and its id (the first 4 bytes of its SHA-256, which names it in
/// sealed values and in `tollgate secret` listings without revealing it).
#[derive(Clone)]
pub struct SealingKey {
    id: [u8; 4],
    cipher: Aes256Gcm,
    raw: [u8; 32],
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingKey({})", self.id_hex())
    }
}

impl SealingKey {
    pub fn from_bytes(raw: [u8; 32]) -> SealingKey {
        let digest = Sha256::digest(raw);
        SealingKey {
            id: [digest[0], digest[1], digest[2], digest[3]],
            cipher: Aes256Gcm::new(&raw.into()),
            raw,
        }
    }

    /// A new random key.
    pub fn generate() -> Result<SealingKey, String> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
        Ok(SealingKey::from_bytes(raw))
    }

    /// Parses `tgsk1_<base64url of 32 bytes>`.
    pub fn parse(text: &str) -> Result<SealingKey, String> {
        let body = text.trim().strip_prefix(KEY_PREFIX).ok_or_else(|| {
            format!(
                "a sealing key starts with {KEY_PREFIX} (make one with `tollgate secret keygen`)"
            )
        })?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| "a sealing key is tgsk1_ and 43 base64url characters".to_string())?;
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "a sealing key is 32 bytes (43 base64url characters)".to_string())?;
        Ok(SealingKey::from_bytes(raw))
    }

    /// The text form, as a keyring file holds it.
    pub fn to_text(&self) -> String {
        format!(
            "{KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.raw)
        )
    }

    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("it is not a sealed value")]
    NotSealed,
    #[error(
        "it was sealed with key {0}, which this node does not have (add it to the node's sealing keys)"
    )]
    UnknownKey(String),
    #[error("it does not open with key {0}: it was altered, or sealed for another purpose")]
    Corrupt(String),
}

/// The sealing keys a node holds: the first seals, every one opens.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<SealingKey>,
}

impl Keyring {
    pub fn new(keys: Vec<SealingKey>) -> Result<Keyring, String> {
        if keys.is_empty() {
            return Err("a keyring needs at least one sealing key".into());
        }
        Ok(Keyring { keys })
    }

    /// Parses a keyring file's text: one key per line (blank lines and `#` comments
    /// skipped; commas separate keys too, for an environment variable).
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let keys = text
            .split(['\n', ','])
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .enumerate()
            .map(|(i, l)| SealingKey::parse(l).map_err(|e| format!("key {}: {e}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        Keyring::new(keys)
    }

    /// The text of a keyring file.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for k in &self.keys {
            out.push_str(&k.to_text());
            out.push('\n');
        }
        out
    }

    /// The key that seals.
    pub fn primary(&self) -> &SealingKey {
        &self.keys[0]
    }

    pub fn keys(&self) -> &[SealingKey] {
        &self.keys
    }

    /// Seals `plain` for `purpose` under the primary key.
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> Result<Vec<u8>, String> {
        let key = self.primary();
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let sealed = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: purpose.as_bytes(),
                },
            )
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = Vec::with_capacity(HEADER + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a value sealed for `purpose` under any key of this ring.
    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let id = sealed_key_id(sealed).ok_or(OpenError::NotSealed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| OpenError::UnknownKey(hex(&id)))?;
        let nonce = &sealed[MAGIC.len() + 4..HEADER];
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: &sealed[HEADER..],
                    aad: purpose.as_bytes(),
                },
            )
            .map_err(|_| OpenError::Corrupt(key.id_hex()))
    }

    /// Seals text kept in a string field: `sealed:` and the sealed bytes in base64url.
    pub fn seal_text(&self, purpose: &str, plain: &str) -> Result<String, String> {
        let sealed = self.seal(purpose, plain.as_bytes())?;
        Ok(format!(
            "{TEXT_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed)
        ))
    }

    /// Opens text sealed by [`Keyring::seal_text`].
    pub fn open_text(&self, purpose: &str, text: &str) -> Result<String, OpenError> {
        let body = text.strip_prefix(TEXT_PREFIX).ok_or(OpenError::NotSealed)?;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| OpenError::NotSealed)?;
        let plain = self.open(purpose, &sealed)?;
        String::from_utf8(plain).map_err(|_| OpenError::Corrupt(self.primary().id_hex()))
    }

    /// Whether the value is sealed under this ring's primary key (a rotation re-seals the
    /// ones that are not).
    pub fn sealed_by_primary(&self, sealed: &[u8]) -> bool {
        sealed_key_id(sealed) == Some(self.primary().id)
    }
}

/// Sealed text (in a string field) starts with this.
pub const TEXT_PREFIX: &str = "sealed:";

/// Whether `text` is sealed text ([`Keyring::seal_text`]).
pub fn is_sealed_text(text: &str) -> bool {
    text.starts_with(TEXT_PREFIX)
}

/// Whether `value` has the form of a sealed value.
pub fn is_sealed(value: &[u8]) -> bool {
    sealed_key_id(value).is_some()
}

/// The id of the key a sealed value was sealed with, as hex (for listings).
pub fn key_id_of(value: &[u8]) -> Option<String> {
    sealed_key_id(value).map(|id| hex(&id))
}

fn sealed_key_id(value: &[u8]) -> Option<[u8; 4]> {
    if value.len() < HEADER + TAG || &value[..MAGIC.len()] != MAGIC {
        return None;
    }
    let mut id = [0u8; 4];
    id.copy_from_slice(&value[MAGIC.len()..MAGIC.len() + 4]);
    Some(id)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_purpose() {
        let ring = Keyring::new(vec![SealingKey::generate().unwrap()]).unwrap();
        let sealed = ring.seal("hash-key", b"the secret").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(10).any(|w| w == b"the secret"));
        assert_eq!(ring.open("hash-key", &sealed).unwrap(), b"the secret");
        assert!(matches!(
            ring.open("ca-key", &sealed),
            Err(OpenError::Corrupt(_))
        ));
        let other = Keyring::new(vec![SealingKey::generate().unwrap()]).unwrap();
        assert!(matches!(
            other.open("hash-key", &sealed),
            Err(OpenError::UnknownKey(_))
        ));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            ring.open("hash-key", &altered),
            Err(OpenError::Corrupt(_))
        ));
        assert_eq!(ring.open("x", b"plain"), Err(OpenError::NotSealed));
    }

    #[test]
    fn a_rotated_ring_opens_old_values_and_seals_with_the_new_key() {
        let old = SealingKey::generate().unwrap();
        let new = SealingKey::generate().unwrap();
        let before = Keyring::new(vec![old.clone()]).unwrap();
        let sealed = before.seal("p", b"v").unwrap();
        let after =
            Keyring::parse(&format!("{}\n# old\n{}\n", new.to_text(), old.to_text())).unwrap();
        assert_eq!(after.open("p", &sealed).unwrap(), b"v");
        assert!(!after.sealed_by_primary(&sealed));
        let resealed = after.seal("p", b"v").unwrap();
        assert!(after.sealed_by_primary(&resealed));
        assert_eq!(key_id_of(&resealed).unwrap(), new.id_hex());
    }

    #[test]
    fn sealed_text_round_trips() {
        let ring = Keyring::new(vec![SealingKey::generate().unwrap()]).unwrap();
        let text = ring.seal_text("jwks", "c2VjcmV0").unwrap();
        assert!(is_sealed_text(&text) && !text.contains("c2VjcmV0"));
        assert_eq!(ring.open_text("jwks", &text).unwrap(), "c2VjcmV0");
        assert!(ring.open_text("webhook", &text).is_err());
        assert_eq!(ring.open_text("jwks", "plain"), Err(OpenError::NotSealed));
    }

    #[test]
    fn key_text_round_trips_and_bad_keys_say_why() {
        let k = SealingKey::generate().unwrap();
        assert_eq!(
            SealingKey::parse(&k.to_text()).unwrap().id_hex(),
            k.id_hex()
        );
        assert!(SealingKey::parse("abc").unwrap_err().contains("tgsk1_"));
        assert!(
            SealingKey::parse("tgsk1_AAAA")
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(Keyring::parse("# nothing\n").is_err());
    }
}
