//! Mutual TLS between nodes, on rustls with the ring provider.
//!
//! One server config serves the node's gRPC port: it presents the node's certificate
//! (swapped in place when the node enrolls or renews) and asks for a client certificate
//! without requiring one, because clients (the CLI, SDKs, grpcurl) authenticate with a
//! token instead. A client certificate, when sent, must chain to the cluster CA; which
//! calls need one, and for which node, is decided per call ([`super::peer`]).
//!
//! One client config dials peers: it presents the node's certificate and verifies the
//! peer's against the cluster CA and the host it dialled. Before a joining node has the
//! CA, it verifies the peer against the CA fingerprint in its join token instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::ca::fingerprint;

/// The crypto provider every TLS config here uses (ring; no aws-lc in the build), made
/// once: handshakes verify signatures with it.
/// rustls 0.23.48 marks ring's provider deprecated for lacking post-quantum key exchange;
/// aws-lc (which has it) needs cmake and is kept out of the build (docs/security.md).
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Signature checks both verifiers below do the same way, with [`provider`]'s algorithms.
pub(crate) fn tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

pub(crate) fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

pub(crate) fn signature_schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Makes ring rustls's process-wide provider, for the clients that take the default
/// (reqwest: webhooks, the OTLP HTTP exporter). Call once at start; later calls do nothing.
#[allow(deprecated)]
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a node trusts and presents, swapped in place as it enrolls and renews.
#[derive(Default)]
pub struct TlsState {
    /// This node's certificate chain (leaf, CA) and key.
    certified: ArcSwapOption<CertifiedKey>,
    /// Verifiers for the cluster CA, once this node has it.
    trust: ArcSwapOption<Trust>,
    /// Before the CA is known: the fingerprint a join token pins it by.
    pin: Mutex<Option<String>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("certified", &self.certified.load().is_some())
            .field("trust", &self.trust.load().is_some())
            .finish()
    }
}

struct Trust {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| format!("the cluster CA certificate is not usable: {e}"))?;
    }
    Ok(Arc::new(roots))
}

fn server_verifier(ca: &[CertificateDer<'static>]) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| e.to_string())
}

impl TlsState {
    /// Trusts `ca` (the cluster CA's certificate) from now on.
    pub fn trust(&self, ca: &[CertificateDer<'static>]) -> Result<(), String> {
        let client = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| e.to_string())?;
        self.trust.store(Some(Arc::new(Trust {
            client,
            server: server_verifier(ca)?,
        })));
        Ok(())
    }

    /// Until the CA is trusted, accepts a server whose chain holds a CA with this
    /// fingerprint (from a join token).
    pub fn pin(&self, ca_fingerprint: &str) {
        *self.pin.lock().expect("pin lock") = Some(ca_fingerprint.to_string());
    }

    /// Presents `chain` (leaf first) with `key` (PKCS#8 DER) from now on.
    pub fn present(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key_der: Vec<u8>,
    ) -> Result<(), String> {
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key_der.into());
        let certified = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| format!("the node certificate and key do not go together: {e}"))?;
        self.certified.store(Some(Arc::new(certified)));
        Ok(())
    }

    pub fn has_certificate(&self) -> bool {
        self.certified.load().is_some()
    }

    /// The server config for the node's gRPC port.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(Clients(self.clone())))
            .with_cert_resolver(Arc::new(Presents(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client config for calls to peers.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Servers(self.clone())))
            .with_client_cert_resolver(Arc::new(Presents(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // A resumed session keeps the client authentication of the one it resumes: one
        // made before this node enrolled (no certificate), or with a certificate it has
        // since renewed. Connections between nodes are few and long-lived; every one
        // does a full handshake.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// Presents the node's current certificate, as a server and as a client.
#[derive(Debug)]
struct Presents(Arc<TlsState>);

impl ResolvesServerCert for Presents {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }
}

impl ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.has_certificate()
    }
}

/// Client certificates are optional; one that is sent must chain to the cluster CA.
#[derive(Debug)]
struct Clients(Arc<TlsState>);

impl ClientCertVerifier for Clients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.0.trust.load().as_ref() {
            Some(t) => t.client.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General(
                "this node has no cluster CA yet".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_schemes()
    }
}

/// A peer's server certificate must chain to the cluster CA (or, before this node has
/// it, to the CA its join token pins) and name the host dialled.
#[derive(Debug)]
struct Servers(Arc<TlsState>);

impl ServerCertVerifier for Servers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(t) = self.0.trust.load().as_ref() {
            return t
                .server
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        let pin = self.0.pin.lock().expect("pin lock").clone();
        let Some(pin) = pin else {
            return Err(rustls::Error::General(
                "this node has no cluster CA to verify peers with (start it with --join-token)"
                    .into(),
            ));
        };
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == pin) else {
            return Err(rustls::Error::General(
                "the peer's certificate is not from the cluster CA the join token names \
                 (a different cluster, or someone in between)"
                    .into(),
            ));
        };
        server_verifier(&[ca.clone().into_owned()])
            .map_err(rustls::Error::General)?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_schemes()
    }
}

/// A TLS connection to a peer.
pub type ClientStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Dials peers over TLS for tonic (`Endpoint::connect_with_connector_lazy`).
#[derive(Clone)]
pub struct Connector {
    pub config: Arc<rustls::ClientConfig>,
}

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<ClientStream>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid =
                |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
            let host = uri
                .host()
                .ok_or_else(|| invalid("the peer address has no host"))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid("the peer address has no port"))?;
            let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
                .map_err(|_| invalid("the peer's host is not a valid name"))?
                .to_owned();
            let tcp = tokio::net::TcpStream::connect((
                host.trim_start_matches('[').trim_end_matches(']'),
                port,
            ))
            .await?;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Most TLS handshakes in progress at once on one listener; more connections wait in the
/// kernel's accept queue.
pub const MAX_HANDSHAKES: usize = 256;

/// Accepts TCP connections on `listener` and completes their TLS handshakes (each within
/// [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at once), yielding the connections
/// that finished, for tonic's `serve_with_incoming`. Failed handshakes are counted and
/// dropped; they never stop the listener.
pub fn incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("node gRPC accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("tollgate_grpc_tls_handshake_failures_total", "reason" => "refused").increment(1);
                        tracing::debug!(%peer, "TLS handshake on the node gRPC port failed: {e}");
                    }
                    Err(_) => {
                        metrics::counter!("tollgate_grpc_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                        tracing::debug!(%peer, "TLS handshake on the node gRPC port timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
