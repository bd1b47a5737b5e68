//! TLS at the edge, as the cluster's spec declares it: `certificates` (a PEM chain and
//! the name of the sealed secret that holds its private key) and `hosts` (per host name:
//! redirecting plain HTTP to HTTPS, HSTS). Documented in docs/spec.md and docs/tls.md.
//!
//! Two kinds of check. [`check_static`] looks at the spec alone and runs wherever a spec
//! is parsed, so it never depends on the time: the chain parses, its leaf covers every
//! name the certificate is served for, one certificate at most is the default and one at
//! most serves each name. [`check_at_apply`] runs once, on the leader, when a spec is
//! applied: the key opens and matches the certificate, and the certificate is valid now.
//! A certificate that expires later keeps being served (clients refuse it; the expiry
//! metric and the warnings say so for 30 days before).

use std::collections::BTreeMap;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::state::spec::SpecErrors;

/// Warn this long before a certificate expires.
pub const EXPIRY_WARNING_MS: u64 = 30 * 24 * 3600 * 1000;

/// Most certificates one spec may hold (each is compiled on every node).
pub const MAX_CERTIFICATES: usize = 1000;

/// A certificate the proxy serves over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// The chain in PEM: the leaf first, then its intermediates.
    pub chain: String,
    /// The named secret (`tollgate secret set NAME --from-file key.pem`) that holds the
    /// leaf's private key in PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_secret: String,
    /// The SNI names it is served for (exact, or `*.example.com`); empty: every DNS name
    /// of the certificate.
    #[serde(default)]
    pub names: Vec<String>,
    /// Served to clients that send no SNI, or a name no certificate has.
    #[serde(default)]
    pub default: bool,
}

/// What the edge does for one host name (exact, or `*.example.com`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Answer plain-HTTP requests with a permanent redirect (308) to HTTPS.
    #[serde(default)]
    pub https_redirect: bool,
    /// Send `Strict-Transport-Security` on HTTPS responses.
    #[serde(default)]
    pub hsts: Option<HstsSpec>,
    /// Ask HTTPS clients of this host (by SNI) for a certificate.
    #[serde(default)]
    pub client_certificates: Option<ClientCertSpec>,
}

/// Mutual TLS for one host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertSpec {
    /// The CAs (PEM) that client certificates must chain to.
    pub ca: String,
    /// Refuse the handshake without a certificate (default); false: ask, verify when sent.
    #[serde(default = "yes")]
    pub required: bool,
    /// A request header to pass the verified certificate's subject upstream in (RFC 4514).
    #[serde(default)]
    pub subject_header: Option<String>,
    /// A request header to pass its subjectAltNames upstream in (`DNS:a.example, URI:...`).
    #[serde(default)]
    pub san_header: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HstsSpec {
    /// How long browsers remember to use HTTPS only; default one year.
    #[serde(default = "default_hsts_age", deserialize_with = "seconds")]
    pub max_age: u64,
    #[serde(default)]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

fn default_hsts_age() -> u64 {
    365 * 24 * 3600
}

fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim())
        .map(|d| d.as_secs())
        .map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write it like 365d or 6months"
            ))
        })
}

impl HstsSpec {
    /// The header's value.
    pub fn header_value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age);
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

/// What the edge needs to know of a parsed leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// DNS names of its subjectAltName (lowercase; wildcards as written, `*.x.y`).
    pub dns_names: Vec<String>,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// The DER certificates of a chain, and its leaf's names and validity.
pub fn parse_chain(pem: &str) -> Result<(Vec<CertificateDer<'static>>, Leaf), String> {
    use x509_parser::prelude::*;
    let certs = crate::identity::ca::pem_certs(pem)?;
    let (_, cert) = X509Certificate::from_der(&certs[0])
        .map_err(|e| format!("the first certificate of the chain does not parse: {e}"))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                dns_names.push(n.to_ascii_lowercase());
            }
        }
    }
    let validity = cert.validity();
    let leaf = Leaf {
        dns_names,
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
        not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
    };
    Ok((certs, leaf))
}

/// Whether a certificate name (`example.com`, `*.example.com`) covers a served name
/// (which may itself be a wildcard: `*.example.com` covers `*.example.com` only).
/// A wildcard stands for exactly one label, as in RFC 6125 §6.4.3.
pub fn covers(cert_name: &str, name: &str) -> bool {
    let (cert_name, name) = (cert_name.to_ascii_lowercase(), name.to_ascii_lowercase());
    if cert_name == name {
        return true;
    }
    match (cert_name.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => label != "*" && !label.is_empty() && rest == suffix,
        _ => false,
    }
}

/// A served name as SNI may carry it: an exact DNS name or `*.` and one.
pub fn check_host_name(name: &str) -> Result<(), String> {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a host name: write lowercase labels of a-z, 0-9 and '-' \
             (example.com), or `*.` and one (*.example.com)"
        ))
    }
}

/// The names a certificate is served for: its `names`, else its leaf's DNS names.
pub fn served_names(spec: &CertificateSpec, leaf: &Leaf) -> Vec<String> {
    if spec.names.is_empty() {
        leaf.dns_names.clone()
    } else {
        spec.names.iter().map(|n| n.to_ascii_lowercase()).collect()
    }
}

/// The checks that need only the spec (see the module's notes).
pub fn check_static(
    certificates: &BTreeMap<String, CertificateSpec>,
    hosts: &BTreeMap<String, HostSpec>,
    errors: &mut SpecErrors,
) {
    if certificates.len() > MAX_CERTIFICATES {
        errors.push(
            "certificates",
            format!("at most {MAX_CERTIFICATES} certificates"),
        );
    }
    let mut defaults = Vec::new();
    let mut served: BTreeMap<String, &str> = BTreeMap::new();
    for (name, c) in certificates {
        let at = format!("certificates.{name}");
        if let Err(e) = crate::state::lifecycle::check_name("certificate", name) {
            errors.push(at.clone(), e.to_string());
        }
        if let Err(e) = crate::state::lifecycle::check_name("secret", &c.key_secret) {
            errors.push(format!("{at}.key_secret"), e.to_string());
        }
        if c.default {
            defaults.push(name.as_str());
        }
        let leaf = match parse_chain(&c.chain) {
            Ok((_, leaf)) => leaf,
            Err(e) => {
                errors.push(format!("{at}.chain"), e);
                continue;
            }
        };
        if c.names.is_empty() && leaf.dns_names.is_empty() && !c.default {
            errors.push(
                format!("{at}.names"),
                "the certificate has no DNS name: list the names it serves, or make it the default",
            );
        }
        for (i, n) in c.names.iter().enumerate() {
            if let Err(e) = check_host_name(n) {
                errors.push(format!("{at}.names[{i}]"), e);
            } else if !leaf.dns_names.iter().any(|d| covers(d, n)) {
                errors.push(
                    format!("{at}.names[{i}]"),
                    format!(
                        "the certificate does not cover {n:?}: its names are {}",
                        if leaf.dns_names.is_empty() {
                            "none".to_string()
                        } else {
                            leaf.dns_names.join(", ")
                        }
                    ),
                );
            }
        }
        for n in served_names(c, &leaf) {
            if let Some(other) = served.insert(n.clone(), name) {
                errors.push(
                    format!("{at}.names"),
                    format!("{n:?} is served by certificate {other} already"),
                );
            }
        }
    }
    if defaults.len() > 1 {
        errors.push(
            "certificates",
            format!(
                "only one certificate may be the default, found {}",
                defaults.join(", ")
            ),
        );
    }
    for (name, h) in hosts {
        let at = format!("hosts.{name}");
        if let Err(e) = check_host_name(name) {
            errors.push(at.clone(), e);
        }
        if let Some(c) = &h.client_certificates {
            if let Err(e) = client_verifier(c) {
                errors.push(format!("{at}.client_certificates.ca"), e);
            }
            for (field, header) in [
                ("subject_header", &c.subject_header),
                ("san_header", &c.san_header),
            ] {
                if let Some(name) = header
                    && http::HeaderName::from_bytes(name.as_bytes()).is_err()
                {
                    errors.push(
                        format!("{at}.client_certificates.{field}"),
                        format!("{name:?} is not a header name"),
                    );
                }
            }
        }
        if let Some(hsts) = &h.hsts
            && hsts.preload
            && (hsts.max_age < 365 * 24 * 3600 || !hsts.include_subdomains)
        {
            errors.push(
                format!("{at}.hsts.preload"),
                "browsers' preload lists need max_age of at least 1 year and include_subdomains",
            );
        }
    }
}

/// The verifier of a host's client certificates.
pub fn client_verifier(
    spec: &ClientCertSpec,
) -> Result<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::identity::ca::pem_certs(&spec.ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("a CA certificate cannot be used: {e}"))?;
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        crate::identity::tls::provider(),
    );
    let builder = if spec.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|e| format!("{e}"))
}

/// What the edge passes upstream of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the leaf's DER: what `auth: mtls` looks the key up by.
    pub fingerprint: [u8; 32],
    /// The subject, RFC 4514 (`CN=client,O=Acme`).
    pub subject: String,
    /// The subjectAltNames, `DNS:a.example, URI:spiffe://...`.
    pub sans: String,
}

impl ClientCert {
    pub fn of(der: &[u8]) -> Option<ClientCert> {
        use sha2::Digest;
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => sans.push(format!("DNS:{n}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    GeneralName::RFC822Name(m) => sans.push(format!("email:{m}")),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => sans.push(format!(
                            "IP:{}",
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?)
                        )),
                        16 => sans.push(format!(
                            "IP:{}",
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?)
                        )),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Some(ClientCert {
            fingerprint: sha2::Sha256::digest(der).into(),
            subject: cert.subject().to_string(),
            sans: sans.join(", "),
        })
    }
}

/// The static checks of an upstream's `tls` block (`at` is its path).
pub fn check_upstream_tls(
    tls: &crate::state::spec::UpstreamTlsSpec,
    at: &str,
    errors: &mut SpecErrors,
) {
    if let Some(ca) = &tls.ca {
        match crate::identity::ca::pem_certs(ca) {
            Ok(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs {
                    if let Err(e) = roots.add(c) {
                        errors.push(
                            format!("{at}.ca"),
                            format!("a CA certificate cannot be used: {e}"),
                        );
                    }
                }
            }
            Err(e) => errors.push(format!("{at}.ca"), e),
        }
    }
    if let Some(name) = &tls.server_name
        && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        errors.push(
            format!("{at}.server_name"),
            format!("{name:?} is not a DNS name or IP address"),
        );
    }
    if let Some(c) = &tls.client_certificate {
        if let Err(e) = parse_chain(&c.chain) {
            errors.push(format!("{at}.client_certificate.chain"), e);
        }
        if let Err(e) = crate::state::lifecycle::check_name("secret", &c.key_secret) {
            errors.push(format!("{at}.client_certificate.key_secret"), e.to_string());
        }
    }
}

/// What applying the upstreams' `tls` blocks says: a client certificate's key must open
/// and match (an error), and `verify: false` is a warning.
pub fn check_upstreams_at_apply(
    upstreams: &BTreeMap<String, crate::state::spec::UpstreamSpec>,
    open_secret: &dyn Fn(&str) -> Result<Vec<u8>, String>,
    errors: &mut SpecErrors,
    notes: &mut ApplyNotes,
) {
    for (name, up) in upstreams {
        let Some(tls) = &up.tls else { continue };
        if !tls.verify {
            notes.warnings.push(format!(
                "upstream {name} does not verify its endpoints' certificates (tls.verify: false): \
                 anyone on the path can impersonate them"
            ));
        }
        if let Some(c) = &tls.client_certificate {
            let at = format!("upstreams.{name}.tls.client_certificate.key_secret");
            let Ok((chain, _)) = parse_chain(&c.chain) else {
                continue;
            };
            match open_secret(&c.key_secret) {
                Err(e) => errors.push(at, e),
                Ok(key) => {
                    if let Err(e) = certified_key(chain, &key) {
                        errors.push(at, e);
                    }
                }
            }
        }
    }
}

/// A private key from PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    use rustls_pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!("not a PEM private key ({e}); give the key in PEM (BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or BEGIN EC PRIVATE KEY)")
    })
}

/// A certificate ready to serve: the chain with its signing key, checked to match.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key_pem: &[u8],
) -> Result<rustls::sign::CertifiedKey, String> {
    let key = parse_key(key_pem)?;
    rustls::sign::CertifiedKey::from_der(chain, key, &crate::identity::tls::provider()).map_err(
        |e| match e {
            rustls::Error::InconsistentKeys(_) => {
                "the private key does not match the certificate (its public key is another)"
                    .to_string()
            }
            e => format!("the private key cannot be used: {e}"),
        },
    )
}

/// What applying a certificate says beyond yes or no.
#[derive(Debug, Default)]
pub struct ApplyNotes {
    pub warnings: Vec<String>,
}

/// The checks that need the time and the secrets, on the leader at apply (see the module's
/// notes). `open_secret` returns a named secret's value.
pub fn check_at_apply(
    certificates: &BTreeMap<String, CertificateSpec>,
    now_ms: u64,
    open_secret: &dyn Fn(&str) -> Result<Vec<u8>, String>,
    errors: &mut SpecErrors,
) -> ApplyNotes {
    let mut notes = ApplyNotes::default();
    let now = now_ms as i64;
    for (name, c) in certificates {
        let at = format!("certificates.{name}");
        let Ok((chain, leaf)) = parse_chain(&c.chain) else {
            continue; // said by check_static
        };
        if leaf.not_after_ms <= now {
            errors.push(
                format!("{at}.chain"),
                format!(
                    "the certificate expired at {}; renew it",
                    format_ms(leaf.not_after_ms)
                ),
            );
        } else if leaf.not_before_ms > now {
            errors.push(
                format!("{at}.chain"),
                format!(
                    "the certificate is not valid before {}; apply it then, or check the clock",
                    format_ms(leaf.not_before_ms)
                ),
            );
        } else if leaf.not_after_ms - now < EXPIRY_WARNING_MS as i64 {
            notes.warnings.push(format!(
                "certificate {name} expires at {} (in {} days); renew it",
                format_ms(leaf.not_after_ms),
                (leaf.not_after_ms - now) / (24 * 3600 * 1000)
            ));
        }
        match open_secret(&c.key_secret) {
            Err(e) => errors.push(format!("{at}.key_secret"), e),
            Ok(key) => {
                if let Err(e) = certified_key(chain, &key) {
                    errors.push(format!("{at}.key_secret"), e);
                }
            }
        }
    }
    notes
}

/// Most bytes of a client certificate given as a key.
pub const MAX_CLIENT_CERTIFICATE_BYTES: usize = 16 * 1024;

/// The SHA-256 fingerprint of a client certificate given as an API key (PEM, the first
/// certificate), and when it expires (ms); refused when it does not parse or has expired.
pub fn client_certificate_key(pem: &str) -> Result<([u8; 32], u64), String> {
    use sha2::Digest;
    if pem.len() > MAX_CLIENT_CERTIFICATE_BYTES {
        return Err(format!(
            "at most {MAX_CLIENT_CERTIFICATE_BYTES} bytes of PEM"
        ));
    }
    let (chain, leaf) = parse_chain(pem)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    if leaf.not_after_ms <= now {
        return Err(format!(
            "the certificate expired at {}",
            format_ms(leaf.not_after_ms)
        ));
    }
    Ok((
        sha2::Sha256::digest(&chain[0]).into(),
        leaf.not_after_ms.max(1) as u64,
    ))
}

/// RFC 3339, to the second.
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label() {
        assert!(covers("*.example.com", "a.example.com"));
        assert!(covers("*.example.com", "*.example.com"));
        assert!(covers("example.com", "EXAMPLE.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(!covers("a.example.com", "*.example.com"));
    }

    #[test]
    fn host_names_are_checked() {
        assert!(check_host_name("example.com").is_ok());
        assert!(check_host_name("*.example.com").is_ok());
        assert!(check_host_name("localhost").is_ok());
        assert!(check_host_name("Example.com").is_err());
        assert!(check_host_name("a.*.com").is_err());
        assert!(check_host_name("-a.com").is_err());
        assert!(check_host_name("").is_err());
    }

    #[test]
    fn hsts_header() {
        let h = HstsSpec {
            max_age: 60,
            include_subdomains: true,
            preload: false,
        };
        assert_eq!(h.header_value(), "max-age=60; includeSubDomains");
    }
}
