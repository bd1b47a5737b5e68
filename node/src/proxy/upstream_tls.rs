//! HTTPS to upstreams: the rustls client configs an upstream's `tls` block compiles to
//! (roots, SNI, ALPN, a client certificate), the handshake, and telling a certificate
//! failure from other connect errors (docs/tls.md, "HTTPS upstreams").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use crate::state::spec::UpstreamTlsSpec;

/// An upstream's TLS settings, compiled.
#[derive(Debug)]
pub struct UpstreamTls {
    /// Tells pooled connections of different settings apart (never 0: plain).
    pub id: u64,
    /// ALPN `h2` and `http/1.1` (or `http/1.1` only when `h2: false`).
    any: Arc<rustls::ClientConfig>,
    /// ALPN `http/1.1` only: for upgrades (WebSocket), which HTTP/2 cannot carry here.
    h1: Arc<rustls::ClientConfig>,
    /// SNI and the name checked, for every endpoint; None: each endpoint's host.
    pub server_name: Option<ServerName<'static>>,
    /// Why the settings could not be compiled on this node (every connect fails with it).
    pub broken: Option<String>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The system's trusted roots, read once (an empty set, logged, when there are none).
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!("reading the system's CA certificates: {e}");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no system CA certificates found ({ignored} unusable): HTTPS upstreams \
                     without a `tls.ca` will fail their certificate checks"
                );
            }
            Arc::new(roots)
        })
        .clone()
}

impl UpstreamTls {
    /// Compiles `spec`; `open_secret` opens the client certificate's key. A failure is
    /// kept in `broken`: the spec was checked at apply, so this is local (no sealing key).
    pub fn compile(
        spec: &UpstreamTlsSpec,
        open_secret: &dyn Fn(&str) -> Result<Vec<u8>, String>,
    ) -> UpstreamTls {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let server_name = spec
            .server_name
            .as_deref()
            .and_then(|n| ServerName::try_from(n.to_string()).ok());
        match configs(spec, open_secret) {
            Ok((any, h1)) => UpstreamTls {
                id,
                any,
                h1,
                server_name,
                broken: None,
            },
            Err(e) => {
                // Configs that can never connect, so the error is said on each attempt.
                let empty = Arc::new(
                    rustls::ClientConfig::builder_with_provider(crate::identity::tls::provider())
                        .with_safe_default_protocol_versions()
                        .expect("TLS 1.2 and 1.3")
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                );
                UpstreamTls {
                    id,
                    any: empty.clone(),
                    h1: empty,
                    server_name,
                    broken: Some(e),
                }
            }
        }
    }

    /// Opens TLS on `tcp` to `host` (the endpoint's host, unless `server_name` is set);
    /// `h1_only` offers HTTP/1.1 alone. Says whether HTTP/2 was agreed.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        host: &ServerName<'static>,
        h1_only: bool,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, bool), TlsConnectError> {
        if let Some(e) = &self.broken {
            return Err(TlsConnectError::Other(e.clone()));
        }
        let config = if h1_only { &self.h1 } else { &self.any };
        let name = self.server_name.clone().unwrap_or_else(|| host.clone());
        let stream = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(classify)?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok((stream, h2))
    }
}

/// Why a TLS connection to an endpoint failed.
#[derive(Debug)]
pub enum TlsConnectError {
    /// Its certificate was refused (unknown issuer, wrong name, expired...).
    Certificate(String),
    Other(String),
}

fn classify(e: std::io::Error) -> TlsConnectError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => {
            TlsConnectError::Certificate(format!("its certificate was refused: {c:?}"))
        }
        Some(other) => TlsConnectError::Other(format!("TLS handshake failed: {other}")),
        None => TlsConnectError::Other(format!("TLS handshake failed: {e}")),
    }
}

fn configs(
    spec: &UpstreamTlsSpec,
    open_secret: &dyn Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<(Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>), String> {
    let provider = crate::identity::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if !spec.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
    } else {
        let roots = match &spec.ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in crate::identity::ca::pem_certs(pem)? {
                    roots.add(c).map_err(|e| format!("tls.ca: {e}"))?;
                }
                Arc::new(roots)
            }
            None => system_roots(),
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match &spec.client_certificate {
        Some(c) => {
            let (chain, _) = crate::state::tls::parse_chain(&c.chain)?;
            let key_pem = open_secret(&c.key_secret)?;
            let key = crate::state::tls::parse_key(&key_pem)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate cannot be used: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::in_memory_sessions(256);
    let mut h1 = config.clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.alpn_protocols = if spec.h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok((Arc::new(config), Arc::new(h1)))
}

/// `verify: false`: takes any certificate (signatures are still checked, so the peer
/// holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::identity::tls::tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crate::identity::tls::tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::identity::tls::signature_schemes()
    }
}
