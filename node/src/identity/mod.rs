//! Who a node is and what it holds: its certificate from the cluster CA, the CA it trusts,
//! and the sealing keys that open the secrets in the replicated state
//! (docs/architecture.md, decision 12; docs/security.md).
//!
//! Files in the data directory:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `cluster-ca.pem` | the cluster CA's certificate (public: clients verify nodes with it) | 0644 |
//! | `node.pem` | this node's certificate, then the CA's | 0644 |
//! | `node.key` | this node's private key (PKCS#8 PEM) | 0600 |
//! | `sealing-key` | the sealing keys, unless given by `--sealing-key-file` or `TOLLGATE_SEALING_KEY` | 0600 |
//!
//! With `--insecure-cluster` none of this is used: nodes talk plain gRPC and trust any
//! caller that can reach them (tests that need it say why).

pub mod ca;
pub mod seal;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls_pki_types::CertificateDer;
use tonic::Status;

use self::ca::{Ca, PeerCert, Subject};
use self::seal::Keyring;
use self::tls::TlsState;
use crate::state::access::Access;

/// The CA certificate's file in the data directory.
pub const CA_FILE: &str = "cluster-ca.pem";
/// This node's certificate chain.
pub const CERT_FILE: &str = "node.pem";
/// This node's private key.
pub const KEY_FILE: &str = "node.key";
/// The default sealing-key file.
pub const SEALING_KEY_FILE: &str = "sealing-key";

/// Sealing purposes (the associated data of each kind of sealed secret).
pub const HASH_KEY: &str = "hash-key";
pub const CA_KEY: &str = "ca-key";
pub const WEBHOOK: &str = "webhook";

/// The sealing purpose of the named secret `name`.
pub fn secret_purpose(name: &str) -> String {
    format!("secret:{name}")
}

/// Prefix of a join token.
pub const JOIN_TOKEN_PREFIX: &str = "tgj";

/// Where the sealing keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `TOLLGATE_SEALING_KEY` (never written anywhere by the node).
    Env(String),
    /// A file (`--sealing-key-file`, or `<data dir>/sealing-key`).
    File(PathBuf),
}

/// A parsed join token: `tgj_<id>_<secret>_<CA fingerprint>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `tgj_<id>_<secret>`: the credential part, checked like other credentials.
    pub credential: String,
    pub id: String,
    /// The SHA-256 of the cluster CA's certificate, base64url.
    pub ca_fingerprint: String,
}

impl JoinToken {
    pub fn parse(text: &str) -> Result<JoinToken, String> {
        const SHAPE: &str = "a join token is tgj_, 16 hex digits, _, 43 characters, _, 43 \
                             characters, as `tollgate cluster join-token create` prints it";
        let text = text.trim();
        let rest = text.strip_prefix("tgj_").ok_or_else(|| SHAPE.to_string())?;
        if rest.len() != 16 + 1 + 43 + 1 + 43 || !rest.is_ascii() {
            return Err(SHAPE.into());
        }
        let (id, secret, fp) = (&rest[..16], &rest[17..60], &rest[61..]);
        if &rest[16..17] != "_"
            || &rest[60..61] != "_"
            || !id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(SHAPE.into());
        }
        Ok(JoinToken {
            credential: format!("tgj_{id}_{secret}"),
            id: id.to_string(),
            ca_fingerprint: fp.to_string(),
        })
    }

    /// The text handed to the operator: the credential and the CA's fingerprint.
    pub fn text(credential: &str, ca_fingerprint: &str) -> String {
        format!("{credential}_{ca_fingerprint}")
    }
}

/// A sealed value and what it opened to.
struct Opened {
    sealed: Vec<u8>,
    plain: Arc<[u8]>,
}

/// A node's identity and secrets.
pub struct Identity {
    pub node: u64,
    /// False with `--insecure-cluster`.
    pub secure: bool,
    pub tls: Arc<TlsState>,
    keyring: ArcSwapOption<Keyring>,
    key_source: KeySource,
    dir: PathBuf,
    /// Names (host names, IPs) this node's certificate carries.
    pub names: Vec<String>,
    /// How long certificates this node issues are valid.
    pub cert_lifetime: Duration,
    /// What this node's own certificate says (for renewal).
    current: Mutex<Option<PeerCert>>,
    /// The last hash key opened.
    opened: Mutex<Option<Opened>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(e.to_string())
}

impl Identity {
    /// Loads what the data directory holds (certificate, CA, sealing keys); a node that
    /// has not enrolled yet has none of them.
    pub fn load(
        node: u64,
        secure: bool,
        dir: &Path,
        key_source: KeySource,
        names: Vec<String>,
        cert_lifetime: Duration,
    ) -> anyhow::Result<Identity> {
        let keyring = match &key_source {
            KeySource::Env(text) => Some(
                Keyring::parse(text).map_err(|e| anyhow::anyhow!("TOLLGATE_SEALING_KEY: {e}"))?,
            ),
            KeySource::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some(
                    Keyring::parse(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => anyhow::bail!("cannot read the sealing keys at {}: {e}", path.display()),
            },
        };
        let identity = Identity {
            node,
            secure,
            tls: Arc::default(),
            keyring: ArcSwapOption::new(keyring.map(Arc::new)),
            key_source,
            dir: dir.to_path_buf(),
            names,
            cert_lifetime,
            current: Mutex::default(),
            opened: Mutex::default(),
        };
        if secure {
            identity.load_files()?;
        }
        Ok(identity)
    }

    fn load_files(&self) -> anyhow::Result<()> {
        let ca = match std::fs::read_to_string(self.dir.join(CA_FILE)) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => anyhow::bail!("cannot read {}: {e}", self.dir.join(CA_FILE).display()),
        };
        let ca = ca::pem_certs(&ca).map_err(|e| anyhow::anyhow!("{CA_FILE}: {e}"))?;
        self.tls
            .trust(&ca)
            .map_err(|e| anyhow::anyhow!("{CA_FILE}: {e}"))?;
        let (Ok(chain), Ok(key)) = (
            std::fs::read_to_string(self.dir.join(CERT_FILE)),
            std::fs::read_to_string(self.dir.join(KEY_FILE)),
        ) else {
            return Ok(());
        };
        let chain = ca::pem_certs(&chain).map_err(|e| anyhow::anyhow!("{CERT_FILE}: {e}"))?;
        let key = pem_key(&key).map_err(|e| anyhow::anyhow!("{KEY_FILE}: {e}"))?;
        self.present(chain, key)
            .map_err(|e| anyhow::anyhow!("{CERT_FILE}: {e}"))
    }

    fn present(&self, chain: Vec<CertificateDer<'static>>, key: Vec<u8>) -> Result<(), String> {
        let peer = ca::parse_peer(&chain[0])?;
        if peer.subject != Subject::Node(self.node) {
            return Err(format!(
                "the certificate is {}'s, but this is node {}",
                peer.subject, self.node
            ));
        }
        self.tls.present(chain, key)?;
        *self.current.lock().expect("identity lock") = Some(peer);
        Ok(())
    }

    /// Whether this node holds a certificate.
    pub fn enrolled(&self) -> bool {
        self.tls.has_certificate()
    }

    /// What this node's certificate says, if it has one.
    pub fn current(&self) -> Option<PeerCert> {
        *self.current.lock().expect("identity lock")
    }

    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.keyring.load_full()
    }

    fn require_keyring(&self) -> Result<Arc<Keyring>, Status> {
        self.keyring().ok_or_else(|| {
            unavailable(format!(
                "node {} has no sealing key, so it cannot open the cluster's secrets; give it \
                 the cluster's key with --sealing-key-file or TOLLGATE_SEALING_KEY",
                self.node
            ))
        })
    }

    /// Makes and stores the sealing key of a new cluster, unless this node has one.
    pub fn ensure_keyring(&self) -> anyhow::Result<Arc<Keyring>> {
        if let Some(k) = self.keyring() {
            return Ok(k);
        }
        let ring = Keyring::new(vec![
            seal::SealingKey::generate().map_err(|e| anyhow::anyhow!(e))?,
        ])
        .map_err(|e| anyhow::anyhow!(e))?;
        self.store_keyring(&ring)?;
        Ok(self.keyring().expect("just stored"))
    }

    /// Takes the cluster's sealing keys (from an enrollment). A node given its own keys
    /// must hold the cluster's primary one.
    pub fn adopt_keyring(&self, text: &str) -> anyhow::Result<()> {
        let ring = Keyring::parse(text).map_err(|e| anyhow::anyhow!("the sealing keys: {e}"))?;
        if let Some(mine) = self.keyring() {
            let primary = ring.primary().id_hex();
            if mine.keys().iter().any(|k| k.id_hex() == primary) {
                return Ok(());
            }
            anyhow::bail!(
                "this node's sealing keys do not include the cluster's (key {primary}); remove \
                 --sealing-key-file / TOLLGATE_SEALING_KEY to take the cluster's, or give its key"
            );
        }
        self.store_keyring(&ring)
    }

    fn store_keyring(&self, ring: &Keyring) -> anyhow::Result<()> {
        if let KeySource::File(path) = &self.key_source {
            write_private(path, &ring.to_text())?;
        }
        self.keyring.store(Some(Arc::new(ring.clone())));
        Ok(())
    }

    /// Replaces the keyring (a rotation read the file again).
    pub fn reload_keyring(&self) -> anyhow::Result<Arc<Keyring>> {
        let KeySource::File(path) = &self.key_source else {
            anyhow::bail!(
                "the sealing keys come from TOLLGATE_SEALING_KEY: restart to change them"
            );
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let ring = Keyring::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        self.keyring.store(Some(Arc::new(ring)));
        Ok(self.keyring().expect("just stored"))
    }

    /// Seals a secret under the primary key.
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> Result<Vec<u8>, Status> {
        self.require_keyring()?
            .seal(purpose, plain)
            .map_err(Status::internal)
    }

    /// The state's hash key, opened (cached while the sealed value is unchanged). A
    /// cluster made before sealing holds it plain (32 bytes) until it is re-sealed.
    pub fn hash_key(&self, sealed: &[u8]) -> Result<Arc<[u8]>, Status> {
        if sealed.is_empty() {
            return Err(Status::failed_precondition(
                "the cluster has no hash key yet (it is made at bootstrap); retry shortly",
            ));
        }
        if let Some(o) = self.opened.lock().expect("identity lock").as_ref()
            && o.sealed == sealed
        {
            return Ok(o.plain.clone());
        }
        let opened: Arc<[u8]> = if seal::is_sealed(sealed) {
            self.require_keyring()?
                .open(HASH_KEY, sealed)
                .map_err(|e| unavailable(format!("the cluster's hash key cannot be opened: {e}")))?
                .into()
        } else {
            sealed.into()
        };
        *self.opened.lock().expect("identity lock") = Some(Opened {
            sealed: sealed.to_vec(),
            plain: opened.clone(),
        });
        Ok(opened)
    }

    /// The cluster CA, opened from the state.
    pub fn ca(&self, access: &Access) -> Result<Ca, Status> {
        if access.ca_cert_pem.is_empty() {
            return Err(Status::failed_precondition(
                "the cluster has no CA yet (it is made at bootstrap)",
            ));
        }
        let key = self
            .require_keyring()?
            .open(CA_KEY, &access.ca_key)
            .map_err(|e| unavailable(format!("the cluster CA's key cannot be opened: {e}")))?;
        Ca::from_parts(&access.ca_cert_pem, &key).map_err(Status::internal)
    }

    /// The names a certificate for this node carries: its advertised host and the
    /// loopback names.
    pub fn cert_names(advertised: &[String]) -> Vec<String> {
        let mut names: Vec<String> = advertised.to_vec();
        for n in ["localhost", "127.0.0.1", "::1"] {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
        names
    }

    /// Issues this node a certificate from the CA in `access` and starts presenting it
    /// (at bootstrap, after a lost certificate, and to renew).
    pub fn issue_self(&self, access: &Access, now_ms: u64) -> Result<(), Status> {
        let ca = self.ca(access)?;
        let (key, csr) = ca::new_key_and_csr().map_err(Status::internal)?;
        let cert = ca
            .issue(
                Subject::Node(self.node),
                &csr,
                &Self::cert_names(&self.names),
                now_ms,
                self.cert_lifetime,
            )
            .map_err(Status::internal)?;
        self.install(&cert, &key.serialize_der(), &ca.cert_pem)
            .map_err(|e| Status::internal(format!("{e:#}")))
    }

    /// Stores and starts using a certificate (PEM, leaf first), its key (PKCS#8 DER) and
    /// the CA (PEM).
    pub fn install(&self, cert_pem: &str, key_der: &[u8], ca_pem: &str) -> anyhow::Result<()> {
        let ca = ca::pem_certs(ca_pem).map_err(|e| anyhow::anyhow!("the CA: {e}"))?;
        let mut chain =
            ca::pem_certs(cert_pem).map_err(|e| anyhow::anyhow!("the certificate: {e}"))?;
        chain.truncate(1);
        chain.extend(ca.iter().cloned());
        let chain_pem = format!("{}{ca_pem}", cert_pem.trim_end().to_string() + "\n");
        let key_pem = rcgen::KeyPair::try_from(key_der)
            .map_err(|e| anyhow::anyhow!("the node key: {e}"))?
            .serialize_pem();
        write_public(&self.dir.join(CA_FILE), ca_pem)?;
        write_public(&self.dir.join(CERT_FILE), &chain_pem)?;
        write_private(&self.dir.join(KEY_FILE), &key_pem)?;
        self.tls.trust(&ca).map_err(|e| anyhow::anyhow!(e))?;
        self.present(chain, key_der.to_vec())
            .map_err(|e| anyhow::anyhow!(e))
    }

    /// Whether this node's certificate should be renewed now: a third of its life is
    /// left (or it has none).
    pub fn renewal_due(&self, now_ms: u64) -> bool {
        match self.current() {
            None => true,
            Some(c) => {
                let life = c.not_after_ms.saturating_sub(c.issued_at_ms);
                now_ms + life / 3 >= c.not_after_ms
            }
        }
    }

    /// Who the caller of a node-to-node RPC is, by its certificate: a node or a control
    /// plane whose certificate is not revoked. UNAUTHENTICATED without one.
    pub fn peer(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        access: &Access,
    ) -> Result<Subject, Status> {
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return Err(Status::unauthenticated(
                "node-to-node calls need the caller's cluster certificate (mutual TLS); \
                 none was presented",
            ));
        };
        let peer = ca::parse_peer(leaf).map_err(Status::unauthenticated)?;
        // Checked at the handshake, and again per call: a connection outlives the
        // certificate it was opened with.
        if peer.not_after_ms <= crate::raft::service::now_ms() {
            return Err(Status::unauthenticated(format!(
                "{}'s certificate has expired; it reconnects with its renewed one",
                peer.subject
            )));
        }
        if let Subject::Node(id) = peer.subject
            && crate::state::identity::revoked(access, id, peer.issued_at_ms)
        {
            return Err(Status::permission_denied(format!(
                "node {id}'s certificate was revoked (the node was removed); a node that \
                 comes back joins again with a new join token"
            )));
        }
        Ok(peer.subject)
    }

    /// Checks that the caller is node `claimed` (by certificate); with
    /// `--insecure-cluster`, every caller is taken at its word.
    pub fn require_node(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        access: &Access,
        claimed: u64,
        what: &str,
    ) -> Result<(), Status> {
        if !self.secure {
            return Ok(());
        }
        match self.peer(certs, access)? {
            Subject::Node(id) if id == claimed => Ok(()),
            other => Err(Status::permission_denied(format!(
                "{what} claims to come from node {claimed}, but the caller's certificate is \
                 {other}'s: a node speaks only for itself"
            ))),
        }
    }
}

/// The private key of a PEM file (PKCS#8), as DER.
pub fn pem_key(pem: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map(|k| k.secret_pkcs8_der().to_vec())
        .map_err(|e| format!("not a PKCS#8 PEM private key: {e}"))
}

/// Writes a file only its owner can read, atomically.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    write_file(path, text, 0o600)
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    write_file(path, text, 0o644)
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(mode);
    let write = || -> std::io::Result<()> {
        let mut f = options.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Asks the node at `addr` for a certificate (an enrollment with a join token, or a
/// renewal with the certificate `tls` presents), verifying the node with what `tls`
/// trusts (the CA, or the fingerprint a join token pins).
pub async fn request_certificate(
    tls: &Arc<TlsState>,
    addr: &str,
    req: tollgate_proto::node::v1::EnrollRequest,
) -> Result<tollgate_proto::node::v1::EnrollResponse, Status> {
    let config = tls.client_config().map_err(Status::internal)?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::invalid_argument(format!("invalid node address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15));
    let channel = endpoint.connect_with_connector_lazy(tls::Connector { config });
    let mut client = tollgate_proto::node::v1::node_admin_client::NodeAdminClient::new(channel);
    client.enroll(req).await.map(|r| r.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_parse_only_in_their_shape() {
        let fp = "A".repeat(43);
        let cred = format!("tgj_{}_{}", "0123456789abcdef", "b".repeat(43));
        let token = JoinToken::parse(&JoinToken::text(&cred, &fp)).unwrap();
        assert_eq!(token.credential, cred);
        assert_eq!(token.id, "0123456789abcdef");
        assert_eq!(token.ca_fingerprint, fp);
        for bad in ["", "tgt_x", &cred, &format!("{cred}_{}", "A".repeat(42))] {
            assert!(
                JoinToken::parse(bad).unwrap_err().contains("join token"),
                "{bad}"
            );
        }
    }
}
