//! HTTPS on the proxy: the certificates the spec declares, chosen by SNI, swapped in place
//! when the spec or a key changes; session tickets under keys the cluster shares; and the
//! per-host rules (redirect to HTTPS, HSTS). docs/tls.md says what clients see.
//!
//! One rustls server config serves every handshake. Its certificate resolver reads the
//! current [`CertIndex`] through an `ArcSwap`, so `tollgate apply` of a new certificate is
//! served by the next handshake on every node, and a connection in progress keeps the
//! certificate it was made with. The protocol choices are the Mozilla "intermediate"
//! profile as rustls has it: TLS 1.2 and 1.3; AES-GCM and ChaCha20-Poly1305 with ECDHE
//! only; X25519, P-256 and P-384.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::identity::seal::Keyring;
use crate::state::access::NamedSecret;
use crate::state::tls::{CertificateSpec, ClientCertSpec, HostSpec};

/// The named secret that holds the session-ticket keys (written by the leader).
pub const TICKET_SECRET: &str = "tollgate-tls-session-tickets";
/// How often the leader makes a new ticket key. Tickets under the previous key still
/// resume; older ones do not (forward secrecy for resumed TLS 1.2 sessions is bounded by
/// this, twice).
pub const TICKET_ROTATION_MS: u64 = 12 * 3600 * 1000;
/// One ticket key in the secret: an 8-byte id, then the 32-byte AES-256-GCM key.
const TICKET_KEY_BYTES: usize = 8 + 32;
/// Keys kept: the current one and the one before.
const TICKET_KEYS_KEPT: usize = 2;

/// The certificates, by the names they serve.
#[derive(Default)]
pub struct CertIndex {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is kept under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// By certificate name: what it was compiled from (to reuse it) and the key.
    compiled: BTreeMap<String, Compiled>,
}

#[derive(Clone)]
struct Compiled {
    spec: CertificateSpec,
    sealed_key: Vec<u8>,
    key: Arc<CertifiedKey>,
    not_after_ms: i64,
}

impl CertIndex {
    /// The certificate for an SNI name (or for none): exact names first, then a wildcard
    /// one label up, then the default.
    pub fn find(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            // rustls hands over SNI lowercased and checked as a DNS name.
            if let Some(c) = self.exact.get(name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(c) = self.wildcard.get(parent)
            {
                return Some(c.clone());
            }
        }
        self.default.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.compiled.is_empty()
    }
}

impl std::fmt::Debug for CertIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertIndex")
            .field("certificates", &self.compiled.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug)]
struct Resolver(Arc<ArcSwap<CertIndex>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = self.0.load().find(hello.server_name());
        if found.is_none() {
            ::metrics::counter!("tollgate_tls_handshake_failures_total", "reason" => "no_certificate")
                .increment(1);
        }
        found
    }
}

/// Session tickets sealed under keys every node shares (the leader rotates them through
/// the replicated state), so a client resumes on any node.
pub struct ClusterTickets {
    keys: ArcSwap<Vec<TicketKey>>,
}

struct TicketKey {
    id: [u8; 8],
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for ClusterTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterTickets({} keys)", self.keys.load().len())
    }
}

impl ClusterTickets {
    fn new() -> ClusterTickets {
        ClusterTickets {
            keys: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Takes the keys of the ticket secret's value (newest first).
    fn set(&self, value: &[u8]) {
        let keys: Vec<TicketKey> = value
            .chunks_exact(TICKET_KEY_BYTES)
            .map(|k| TicketKey {
                id: k[..8].try_into().expect("8 bytes"),
                cipher: Aes256Gcm::new_from_slice(&k[8..]).expect("a 32-byte key"),
            })
            .collect();
        self.keys.store(Arc::new(keys));
    }
}

/// The ticket secret's next value: a new key first, then the newest one kept.
pub fn rotate_ticket_keys(current: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; TICKET_KEY_BYTES];
    getrandom::fill(&mut out).map_err(|e| format!("no randomness: {e}"))?;
    let kept = current.len() / TICKET_KEY_BYTES * TICKET_KEY_BYTES;
    let kept = kept.min((TICKET_KEYS_KEPT - 1) * TICKET_KEY_BYTES);
    out.extend_from_slice(&current[..kept]);
    Ok(out)
}

impl ProducesTickets for ClusterTickets {
    fn enabled(&self) -> bool {
        !self.keys.load().is_empty()
    }

    fn lifetime(&self) -> u32 {
        (TICKET_ROTATION_MS / 1000) as u32
    }

    /// `id (8) | nonce (12) | AES-256-GCM(plain) with the id as associated data`.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.load();
        let key = keys.first()?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).ok()?;
        let sealed = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                aes_gcm::aead::Payload {
                    msg: plain,
                    aad: &key.id,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(8 + 12 + sealed.len());
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 8 + 12 + 16 {
            return None;
        }
        let (id, rest) = cipher.split_at(8);
        let (nonce, sealed) = rest.split_at(12);
        let keys = self.keys.load();
        let key = keys.iter().find(|k| k.id == id)?;
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                aes_gcm::aead::Payload {
                    msg: sealed,
                    aad: id,
                },
            )
            .ok()
    }
}

/// The proxy's TLS side, shared by every data-plane thread.
pub struct EdgeTls {
    certs: Arc<ArcSwap<CertIndex>>,
    tickets: Arc<ClusterTickets>,
    /// For every host without its own client-certificate rule.
    config: Arc<rustls::ServerConfig>,
    /// Hosts that ask for client certificates, each with its own config (by SNI).
    mutual: ArcSwap<MutualHosts>,
    ticket_value: Mutex<Vec<u8>>,
}

/// The hosts with `client_certificates`, by SNI name (wildcards one label up).
#[derive(Default)]
struct MutualHosts {
    exact: HashMap<String, Arc<MutualHost>>,
    wildcard: HashMap<String, Arc<MutualHost>>,
    specs: BTreeMap<String, ClientCertSpec>,
}

struct MutualHost {
    /// The host as the spec names it (`*.example.com` for a wildcard).
    pattern: Arc<str>,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for EdgeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeTls")
            .field("certs", &self.certs.load())
            .field("tickets", &self.tickets)
            .finish()
    }
}

impl Default for EdgeTls {
    fn default() -> Self {
        EdgeTls::new()
    }
}

impl EdgeTls {
    pub fn new() -> EdgeTls {
        let certs = Arc::new(ArcSwap::from_pointee(CertIndex::default()));
        let tickets = Arc::new(ClusterTickets::new());
        let config = server_config(&certs, &tickets, None);
        EdgeTls {
            certs,
            tickets,
            config,
            mutual: ArcSwap::from_pointee(MutualHosts::default()),
            ticket_value: Mutex::new(Vec::new()),
        }
    }

    /// The server config for a handshake that names `sni`, and the host pattern whose
    /// client-certificate rule it applies (None: no client certificate asked for).
    pub fn config_for(&self, sni: Option<&str>) -> (Arc<rustls::ServerConfig>, Option<Arc<str>>) {
        let mutual = self.mutual.load();
        let found = sni.and_then(|name| {
            mutual.exact.get(name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                mutual.wildcard.get(parent)
            })
        });
        match found {
            Some(h) => (h.config.clone(), Some(h.pattern.clone())),
            None => (self.config.clone(), None),
        }
    }

    /// Builds a config per host with `client_certificates` (when they changed).
    pub fn update_hosts(&self, hosts: &BTreeMap<String, HostSpec>) {
        let specs: BTreeMap<String, ClientCertSpec> = hosts
            .iter()
            .filter_map(|(h, s)| Some((h.clone(), s.client_certificates.clone()?)))
            .collect();
        if self.mutual.load().specs == specs {
            return;
        }
        let mut next = MutualHosts::default();
        for (host, spec) in &specs {
            let verifier = match crate::state::tls::client_verifier(spec) {
                Ok(v) => v,
                Err(e) => {
                    // Checked at apply: only a change in this build could get here.
                    tracing::error!("host {host}: client certificates cannot be checked: {e}");
                    continue;
                }
            };
            let h = Arc::new(MutualHost {
                pattern: Arc::from(host.as_str()),
                config: server_config(&self.certs, &self.tickets, Some(verifier)),
            });
            match host.strip_prefix("*.") {
                Some(parent) => next.wildcard.insert(parent.to_string(), h),
                None => next.exact.insert(host.clone(), h),
            };
        }
        next.specs = specs;
        self.mutual.store(Arc::new(next));
    }

    /// Whether any certificate is served.
    pub fn has_certificates(&self) -> bool {
        !self.certs.load().is_empty()
    }

    /// The certificate a handshake with this SNI gets (for tests and tools).
    pub fn find(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.certs.load().find(sni)
    }

    /// Brings the served certificates and ticket keys up to the state: the spec's
    /// certificates with their keys from the named secrets. A certificate whose key does not
    /// open or match here keeps what it served before (if anything), and says so: a bad
    /// key must not take a working certificate down. Cheap when nothing changed.
    pub fn update(
        &self,
        specs: &BTreeMap<String, CertificateSpec>,
        secrets: &BTreeMap<String, NamedSecret>,
        ring: Option<&Keyring>,
        now_ms: u64,
    ) {
        self.update_tickets(secrets, ring);
        let current = self.certs.load();
        let unchanged = current.compiled.len() == specs.len()
            && specs.iter().all(|(name, spec)| {
                current.compiled.get(name).is_some_and(|c| {
                    c.spec == *spec
                        && secrets
                            .get(&spec.key_secret)
                            .is_some_and(|s| s.value == c.sealed_key)
                })
            });
        if unchanged {
            return;
        }
        let mut compiled = BTreeMap::new();
        for (name, spec) in specs {
            let sealed = secrets.get(&spec.key_secret).map(|s| s.value.clone());
            if let Some(c) = current.compiled.get(name)
                && c.spec == *spec
                && sealed.as_deref() == Some(&c.sealed_key[..])
            {
                compiled.insert(name.clone(), c.clone());
                continue;
            }
            match compile(spec, sealed.as_deref(), ring) {
                Ok((key, not_after_ms)) => {
                    compiled.insert(
                        name.clone(),
                        Compiled {
                            spec: spec.clone(),
                            sealed_key: sealed.unwrap_or_default(),
                            key: Arc::new(key),
                            not_after_ms,
                        },
                    );
                }
                Err(e) => {
                    ::metrics::counter!("tollgate_tls_certificate_errors_total").increment(1);
                    match current.compiled.get(name) {
                        Some(old) => {
                            tracing::error!(
                                "certificate {name} cannot be served as applied ({e}); still serving the one before"
                            );
                            compiled.insert(name.clone(), old.clone());
                        }
                        None => {
                            tracing::error!("certificate {name} cannot be served on this node: {e}")
                        }
                    }
                }
            }
        }
        let index = index(compiled);
        for (name, c) in &index.compiled {
            ::metrics::gauge!("tollgate_tls_certificate_expiry_timestamp_seconds", "certificate" => name.clone())
                .set((c.not_after_ms / 1000) as f64);
        }
        for name in current.compiled.keys() {
            if !index.compiled.contains_key(name) {
                ::metrics::gauge!("tollgate_tls_certificate_expiry_timestamp_seconds", "certificate" => name.clone())
                    .set(f64::NAN);
            }
        }
        self.certs.store(Arc::new(index));
        self.warn_expiring(now_ms);
    }

    /// Logs a warning for each certificate that expires within 30 days (or has).
    pub fn warn_expiring(&self, now_ms: u64) {
        let now = now_ms as i64;
        for (name, c) in &self.certs.load().compiled {
            let left = c.not_after_ms - now;
            if left <= 0 {
                tracing::error!(
                    certificate = %name,
                    "certificate {name} expired at {}; clients refuse it until it is renewed",
                    crate::state::tls::format_ms(c.not_after_ms)
                );
            } else if left < crate::state::tls::EXPIRY_WARNING_MS as i64 {
                tracing::warn!(
                    certificate = %name,
                    "certificate {name} expires at {} (in {} days); renew it",
                    crate::state::tls::format_ms(c.not_after_ms),
                    left / (24 * 3600 * 1000)
                );
            }
        }
    }

    fn update_tickets(&self, secrets: &BTreeMap<String, NamedSecret>, ring: Option<&Keyring>) {
        let sealed = secrets
            .get(TICKET_SECRET)
            .map(|s| s.value.clone())
            .unwrap_or_default();
        let mut last = self.ticket_value.lock().expect("lock");
        if *last == sealed {
            return;
        }
        let plain = match (sealed.is_empty(), ring) {
            (true, _) => Ok(Vec::new()),
            (false, Some(ring)) => ring
                .open(&crate::identity::secret_purpose(TICKET_SECRET), &sealed)
                .map_err(|e| e.to_string()),
            (false, None) => Err("this node has no sealing key".to_string()),
        };
        match plain {
            Ok(plain) => {
                self.tickets.set(&plain);
                *last = sealed;
            }
            Err(e) => tracing::error!(
                "the session-ticket keys cannot be opened ({e}): clients resume on this node only"
            ),
        }
    }
}

/// A server config on the shared certificates and tickets; `verifier` asks for client
/// certificates. Each config has its own session cache: a session is resumed only under
/// the config (and so the client-certificate rule) it was made with.
fn server_config(
    certs: &Arc<ArcSwap<CertIndex>>,
    tickets: &Arc<ClusterTickets>,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(crate::identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Resolver(certs.clone())));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = tickets.clone();
    // Stateful resumption on this node too, for clients that do not take tickets.
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(32 * 1024);
    Arc::new(config)
}

fn compile(
    spec: &CertificateSpec,
    sealed: Option<&[u8]>,
    ring: Option<&Keyring>,
) -> Result<(CertifiedKey, i64), String> {
    let sealed = sealed.ok_or_else(|| format!("there is no secret {}", spec.key_secret))?;
    let ring = ring.ok_or("this node has no sealing key")?;
    let key = ring
        .open(&crate::identity::secret_purpose(&spec.key_secret), sealed)
        .map_err(|e| format!("secret {} cannot be opened: {e}", spec.key_secret))?;
    let (chain, leaf) = crate::state::tls::parse_chain(&spec.chain)?;
    let key = crate::state::tls::certified_key(chain, &key)?;
    Ok((key, leaf.not_after_ms))
}

fn index(compiled: BTreeMap<String, Compiled>) -> CertIndex {
    let mut out = CertIndex::default();
    for c in compiled.values() {
        let names = match crate::state::tls::parse_chain(&c.spec.chain) {
            Ok((_, leaf)) => crate::state::tls::served_names(&c.spec, &leaf),
            Err(_) => Vec::new(),
        };
        for n in names {
            match n.strip_prefix("*.") {
                Some(parent) => out.wildcard.insert(parent.to_string(), c.key.clone()),
                None => out.exact.insert(n, c.key.clone()),
            };
        }
        if c.spec.default {
            out.default = Some(c.key.clone());
        }
    }
    out.compiled = compiled;
    out
}

/// The per-host rules of the spec's `hosts`, compiled for the request path.
#[derive(Debug, Default)]
pub struct HostRules {
    exact: HashMap<String, HostRule>,
    wildcard: HashMap<String, HostRule>,
}

#[derive(Debug, Clone)]
pub struct HostRule {
    /// The host as the spec names it.
    pub pattern: Arc<str>,
    pub https_redirect: bool,
    pub hsts: Option<HeaderValue>,
    /// Set when the host asks for client certificates.
    pub client_certificates: Option<CertHeaders>,
}

/// Where a host passes its verified client certificate upstream.
#[derive(Debug, Clone)]
pub struct CertHeaders {
    pub subject: Option<http::HeaderName>,
    pub san: Option<http::HeaderName>,
}

impl CertHeaders {
    /// Replaces the named headers with the connection's certificate (a client's own
    /// values are never passed on).
    pub fn apply(
        &self,
        headers: &mut http::HeaderMap,
        cert: Option<&crate::state::tls::ClientCert>,
    ) {
        for (name, value) in [
            (&self.subject, cert.map(|c| c.subject.as_str())),
            (&self.san, cert.map(|c| c.sans.as_str())),
        ] {
            let Some(name) = name else { continue };
            headers.remove(name);
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(name.clone(), v);
            }
        }
    }
}

impl HostRules {
    pub fn build(hosts: &BTreeMap<String, HostSpec>) -> HostRules {
        let mut out = HostRules::default();
        for (name, h) in hosts {
            let rule = HostRule {
                pattern: Arc::from(name.as_str()),
                https_redirect: h.https_redirect,
                hsts: h
                    .hsts
                    .as_ref()
                    .and_then(|s| HeaderValue::from_str(&s.header_value()).ok()),
                client_certificates: h.client_certificates.as_ref().map(|c| CertHeaders {
                    subject: c
                        .subject_header
                        .as_ref()
                        .and_then(|n| http::HeaderName::from_bytes(n.as_bytes()).ok()),
                    san: c
                        .san_header
                        .as_ref()
                        .and_then(|n| http::HeaderName::from_bytes(n.as_bytes()).ok()),
                }),
            };
            match name.strip_prefix("*.") {
                Some(parent) => out.wildcard.insert(parent.to_string(), rule),
                None => out.exact.insert(name.clone(), rule),
            };
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The rule for a request's host (without its port), exact first, then a wildcard.
    pub fn find(&self, host: &str) -> Option<&HostRule> {
        if self.is_empty() {
            return None;
        }
        let host = host.to_ascii_lowercase();
        if let Some(r) = self.exact.get(&host) {
            return Some(r);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_under_the_current_and_previous_key_only() {
        let t = ClusterTickets::new();
        assert!(!t.enabled());
        let first = rotate_ticket_keys(&[]).unwrap();
        t.set(&first);
        let old = t.encrypt(b"session").unwrap();
        let second = rotate_ticket_keys(&first).unwrap();
        assert_eq!(second.len(), 2 * TICKET_KEY_BYTES);
        t.set(&second);
        assert_eq!(t.decrypt(&old).unwrap(), b"session");
        let newer = t.encrypt(b"again").unwrap();
        assert_ne!(newer[..8], old[..8]);
        let third = rotate_ticket_keys(&second).unwrap();
        assert_eq!(third.len(), 2 * TICKET_KEY_BYTES);
        t.set(&third);
        assert!(t.decrypt(&old).is_none(), "a key two rotations old is gone");
        assert_eq!(t.decrypt(&newer).unwrap(), b"again");
        let mut tampered = newer.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(t.decrypt(&tampered).is_none());
        assert!(t.decrypt(&[0u8; 10]).is_none());
    }
}
