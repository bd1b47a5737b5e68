//! The cluster's own certificate authority, and the certificates it issues.
//!
//! The node that bootstraps a cluster makes the CA (ECDSA P-256, ten years). Its
//! certificate is public: it is in the state and in `<data dir>/cluster-ca.pem`, and
//! clients verify nodes with it. Its private key is in the state only sealed.
//!
//! A certificate names who holds it with a URI SAN: `spiffe://tollgate/node/<id>` for a
//! node, `spiffe://tollgate/control-plane` for a control plane. A peer speaks only for the
//! identity its certificate names. DNS and IP SANs carry the names clients dial (the
//! node's advertised host, `localhost`, the loopback addresses), so standard TLS clients
//! (grpcurl, grpcio, the CLI) verify a node the usual way.
//!
//! A serial number starts with the time the certificate was issued, so revoking a node
//! (`tollgate cluster remove`) is one entry, "node N, before time T", that refuses every
//! certificate issued to N until then, without a list of serials.

use std::time::Duration;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

/// How long the CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are valid from this long before they were issued, so a peer whose clock
/// is a little behind accepts a new one at once.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// URI SAN prefix of a node certificate.
const NODE_URI: &str = "spiffe://tollgate/node/";
/// URI SAN of a control-plane certificate.
const CONTROL_PLANE_URI: &str = "spiffe://tollgate/control-plane";
/// Serial numbers start with this byte, then the issue time in ms (8 bytes), then 7
/// random bytes.
const SERIAL_TAG: u8 = 0x01;

/// Who a certificate speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Node(u64),
    ControlPlane,
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Node(id) => write!(f, "node {id}"),
            Subject::ControlPlane => f.write_str("a control plane"),
        }
    }
}

/// What a verified peer certificate says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCert {
    pub subject: Subject,
    pub issued_at_ms: u64,
    pub not_after_ms: u64,
}

/// The CA: its certificate and its key (in memory only, opened from the sealed state).
pub struct Ca {
    pub cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn time_at(ms: u64) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).map_err(err)
}

/// A self-signed CA named `common_name` (organization Tollgate), valid for
/// [`CA_LIFETIME`]: its certificate in PEM and its key.
fn self_signed_ca(common_name: &str, now_ms: u64) -> Result<(String, KeyPair), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tollgate");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time_at(now_ms.saturating_sub(BACKDATE.as_millis() as u64))?;
    params.not_after = time_at(now_ms + CA_LIFETIME.as_millis() as u64)?;
    params.serial_number = Some(serial(now_ms)?.into());
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key))
}

impl Ca {
    /// A new CA for a new cluster.
    pub fn generate(now_ms: u64) -> Result<Ca, String> {
        let (cert_pem, key) = self_signed_ca("Tollgate cluster CA", now_ms)?;
        Ok(Ca { cert_pem, key })
    }

    /// The CA from its certificate and its private key (PKCS#8 DER, as opened from the
    /// state).
    pub fn from_parts(cert_pem: &str, key_der: &[u8]) -> Result<Ca, String> {
        let key = KeyPair::try_from(key_der).map_err(|e| format!("the CA key: {e}"))?;
        let ca = Ca {
            cert_pem: cert_pem.to_string(),
            key,
        };
        ca.issuer()?;
        Ok(ca)
    }

    /// The private key as PKCS#8 DER (to be sealed into the state).
    pub fn key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, String> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(|e| format!("the CA: {e}"))
    }

    /// Issues a certificate for `subject` to the key that signed `csr_pem` (the CSR's own
    /// names and extensions are ignored: the CA decides them), valid for `lifetime`, with
    /// `names` (host names or IP addresses) as DNS and IP SANs.
    pub fn issue(
        &self,
        subject: Subject,
        csr_pem: &str,
        names: &[String],
        now_ms: u64,
        lifetime: Duration,
    ) -> Result<String, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("the certificate signing request is not valid: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tollgate");
        dn.push(
            DnType::CommonName,
            match subject {
                Subject::Node(id) => format!("tollgate node {id}"),
                Subject::ControlPlane => "tollgate control plane".to_string(),
            },
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = time_at(now_ms.saturating_sub(BACKDATE.as_millis() as u64))?;
        params.not_after = time_at(now_ms + lifetime.as_millis() as u64)?;
        params.serial_number = Some(serial(now_ms)?.into());
        params.use_authority_key_identifier_extension = true;
        let uri = match subject {
            Subject::Node(id) => format!("{NODE_URI}{id}"),
            Subject::ControlPlane => CONTROL_PLANE_URI.to_string(),
        };
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().map_err(err)?));
        let mut seen = std::collections::BTreeSet::new();
        for name in names {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            if name.is_empty() || !seen.insert(name.to_string()) {
                continue;
            }
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.to_string()
                        .try_into()
                        .map_err(|e| format!("{name:?} is not a host name: {e}"))?,
                ),
            });
        }
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(err)?;
        Ok(cert.pem())
    }
}

/// A certificate authority for HTTPS on the proxy where no public one is at hand
/// (`tollgate dev`, tests): its own CA and the server certificates it signs.
pub struct EdgeCa {
    pub cert_pem: String,
    key: KeyPair,
}

/// A server certificate and its key, in PEM.
pub struct EdgeCert {
    pub chain_pem: String,
    pub key_pem: String,
}

impl EdgeCa {
    /// A new CA named `common_name`, valid for ten years.
    pub fn generate(common_name: &str, now_ms: u64) -> Result<EdgeCa, String> {
        let (cert_pem, key) = self_signed_ca(common_name, now_ms)?;
        Ok(EdgeCa { cert_pem, key })
    }

    /// A server certificate for `names` (DNS names, wildcards or IP addresses), valid from
    /// `not_before_ms` to `not_after_ms`, chained to this CA.
    pub fn issue(
        &self,
        names: &[&str],
        not_before_ms: u64,
        not_after_ms: u64,
    ) -> Result<EdgeCert, String> {
        self.issue_for(
            names,
            not_before_ms,
            not_after_ms,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate (for mutual TLS) with `names` as its SANs (DNS names, IP
    /// addresses, or `spiffe://...` URIs) and the first as its common name.
    pub fn issue_client(
        &self,
        names: &[&str],
        not_before_ms: u64,
        not_after_ms: u64,
    ) -> Result<EdgeCert, String> {
        self.issue_for(
            names,
            not_before_ms,
            not_after_ms,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue_for(
        &self,
        names: &[&str],
        not_before_ms: u64,
        not_after_ms: u64,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<EdgeCert, String> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("tollgate"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.not_before = time_at(not_before_ms)?;
        params.not_after = time_at(not_after_ms)?;
        params.serial_number = Some(serial(not_before_ms)?.into());
        params.use_authority_key_identifier_extension = true;
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if name.contains("://") => {
                    SanType::URI(name.to_string().try_into().map_err(err)?)
                }
                Err(_) => SanType::DnsName(
                    name.to_string()
                        .try_into()
                        .map_err(|e| format!("{name:?} is not a host name: {e}"))?,
                ),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(err)?;
        let cert = params.signed_by(&key, &issuer).map_err(err)?;
        Ok(EdgeCert {
            // The leaf only: clients hold the CA itself (`curl --cacert`).
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A new key pair and a CSR for it (the CA fills in everything but the key).
pub fn new_key_and_csr() -> Result<(KeyPair, String), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(err)?
        .pem()
        .map_err(err)?;
    Ok((key, csr))
}

fn serial(now_ms: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(16);
    out.push(SERIAL_TAG);
    out.extend_from_slice(&now_ms.to_be_bytes());
    let mut random = [0u8; 7];
    getrandom::fill(&mut random).map_err(|e| format!("no randomness: {e}"))?;
    out.extend_from_slice(&random);
    Ok(out)
}

/// The SHA-256 of a DER certificate, base64url (43 characters): how a join token pins
/// the cluster's CA.
pub fn fingerprint(der: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(der))
}

/// The DER certificates of a PEM bundle.
pub fn pem_certs(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

/// Reads who a certificate (already verified against the CA) speaks for.
pub fn parse_peer(der: &[u8]) -> Result<PeerCert, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
    let mut subject = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if *uri == CONTROL_PLANE_URI {
                    subject = Some(Subject::ControlPlane);
                } else if let Some(id) = uri.strip_prefix(NODE_URI) {
                    subject = id.parse().ok().map(Subject::Node);
                }
            }
        }
    }
    let subject = subject.ok_or("the certificate names no Tollgate node or control plane")?;
    let raw = cert.raw_serial();
    let raw = if raw.len() == 17 && raw[0] == 0 {
        &raw[1..]
    } else {
        raw
    };
    let issued_at_ms = match raw {
        [SERIAL_TAG, rest @ ..] if rest.len() == 15 => {
            u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"))
        }
        _ => return Err("the certificate's serial number is not one this cluster issues".into()),
    };
    let not_after_ms = (cert.validity().not_after.timestamp().max(0) as u64) * 1000;
    Ok(PeerCert {
        subject,
        issued_at_ms,
        not_after_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_subject_and_issue_time() {
        let now = 1_800_000_000_000;
        let ca = Ca::generate(now).unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let pem = ca
            .issue(
                Subject::Node(7),
                &csr,
                &["tollgate-7".into(), "127.0.0.1".into(), "[::1]".into()],
                now + 5,
                Duration::from_secs(3600),
            )
            .unwrap();
        let der = pem_certs(&pem).unwrap().remove(0);
        let peer = parse_peer(&der).unwrap();
        assert_eq!(peer.subject, Subject::Node(7));
        assert_eq!(peer.issued_at_ms, now + 5);
        assert_eq!(peer.not_after_ms, (now + 5) / 1000 * 1000 + 3_600_000);
        let cp = ca
            .issue(
                Subject::ControlPlane,
                &csr,
                &[],
                now,
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(
            parse_peer(&pem_certs(&cp).unwrap()[0]).unwrap().subject,
            Subject::ControlPlane
        );
        // The CA round-trips through its sealed form's plain text.
        let again = Ca::from_parts(&ca.cert_pem, &ca.key_der()).unwrap();
        again
            .issue(Subject::Node(1), &csr, &[], now, Duration::from_secs(60))
            .unwrap();
        assert!(
            ca.issue(
                Subject::Node(1),
                "not a csr",
                &[],
                now,
                Duration::from_secs(60)
            )
            .unwrap_err()
            .contains("signing request")
        );
    }
}
