//! Typed async client for Tollgate's gRPC APIs.
//!
//! [`NodeClient`] speaks the node admin API (`tollgate.node.v1.NodeAdmin`): status, cluster
//! membership, spec writes and reads. Any node accepts writes and forwards them to the
//! leader. [`ControlPlaneClient`] speaks the control plane (`tollgate.cp.v1`): API
//! lifecycle, tenants, keys, tokens and the audit log, over any number of replicas.
//!
//! Calls that read or change the cluster's state need a token ([`NodeClient::with_token`],
//! [`ControlPlaneClient::with_token`]): the operator token made at bootstrap, or a tenant
//! token.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tollgate_sdk::Error> {
//! let tls = tollgate_sdk::Tls::ca_file("tollgate-data/cluster-ca.pem".as_ref())?;
//! let mut node = tollgate_sdk::NodeClient::connect("127.0.0.1:7070", &tls).await?;
//! let status = node.status().await?;
//! println!("node {} serves spec generation {}", status.node_id, status.spec_generation);
//! # Ok(()) }
//! ```

use std::time::Duration;

use tollgate_proto::node::v1::{
    ApplySpecRequest, AuditRequest, ClusterStatusRequest, HistoryRequest, ListApisRequest,
    ListCredentialsRequest, ListTenantsRequest, ReadSpecRequest, RemoveRequest, SetFaultsRequest,
    StatusRequest, WriteRequest, node_admin_client::NodeAdminClient,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

pub use tollgate_proto::node::v1::{
    ApplySpecResponse, ClusterStatusResponse, Member, ReadSpecResponse, StatusResponse,
};
pub use tollgate_proto::node::v1::{
    AuditResponse, ListApisResponse, ListCredentialsResponse, ListTenantsResponse, WriteResponse,
};
pub use tollgate_proto::state::v1 as state;
pub use tollgate_proto::state::v1::Change;

/// Response metadata naming the leader's gRPC address on UNAVAILABLE answers.
pub const LEADER_METADATA: &str = "x-tollgate-leader";

/// Which Tollgate server a client expected at an address: named in errors, so a client
/// pointed at the wrong port is told which one it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// A node's gRPC port (`tollgate.node.v1.NodeAdmin`), 127.0.0.1:7070 by default.
    Node,
    /// The control plane (`tollgate.cp.v1`), 127.0.0.1:7080 by default.
    ControlPlane,
}

impl Server {
    /// What a person calls it.
    pub fn name(self) -> &'static str {
        match self {
            Server::Node => "a Tollgate node's gRPC port",
            Server::ControlPlane => "a Tollgate control plane",
        }
    }

    /// What to point a client at instead.
    fn wanted(self) -> &'static str {
        match self {
            Server::Node => "a node's gRPC address",
            Server::ControlPlane => "the control plane's address",
        }
    }

    /// Where `tollgate dev` serves it.
    pub fn default_addr(self) -> &'static str {
        match self {
            Server::Node => "127.0.0.1:7070",
            Server::ControlPlane => "127.0.0.1:7080",
        }
    }
}

/// What went wrong talking to a Tollgate API, phrased so the caller knows what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid address {addr:?}: {reason} (expected HOST:PORT, e.g. 127.0.0.1:7070)")]
    InvalidAddress { addr: String, reason: String },
    /// Nothing answered: the connection was refused, timed out or could not be made.
    #[error(
        "cannot reach {} at {addr}: {reason}. Is it running there? (`tollgate dev` serves one at {})",
        .server.name(),
        .server.default_addr()
    )]
    Unreachable {
        addr: String,
        server: Server,
        reason: String,
    },
    /// Something answered, but not the server the client speaks to (another port of a
    /// node, another program, plain HTTP).
    #[error(
        "{addr} is not {}: {answer}. Use {} instead ({} under `tollgate dev`)",
        .server.name(),
        .server.wanted(),
        .server.default_addr()
    )]
    WrongServer {
        addr: String,
        server: Server,
        answer: String,
    },
    #[error("the token is not usable as a header value; pass it as printed (tgt_...)")]
    InvalidToken,
    /// A credential of another kind where a token was expected.
    #[error("{0}")]
    WrongCredential(&'static str),
    #[error("{}", describe(.0))]
    Status(tonic::Status),
}

/// A status as a person reads it: the code, the server's message, and for the codes that
/// mean "fix your credentials" what to do.
fn describe(s: &tonic::Status) -> String {
    let hint = match s.code() {
        tonic::Code::Unauthenticated => {
            " (pass a token: --token or TOLLGATE_TOKEN, the operator token printed at bootstrap or a tenant token)"
        }
        tonic::Code::PermissionDenied => " (use a token allowed to do this: the operator's)",
        _ => "",
    };
    format!("{:?}: {}{hint}", s.code(), s.message())
}

/// Parses a token into the `authorization` header value; refuses, without a call, the
/// credentials that are not tokens.
fn bearer(token: &str) -> Result<MetadataValue<Ascii>, Error> {
    let token = token.trim();
    if token.starts_with("tgk_") {
        return Err(Error::WrongCredential(
            "the token given (--token or TOLLGATE_TOKEN) is a data-plane API key (tgk_...): \
             applications send it to the proxy in `x-api-key`. Admin and control-plane calls \
             take the operator token (printed at bootstrap, in tollgate-data/operator-token \
             under `tollgate dev`) or a tenant token (tgt_..., from `tollgate token create`)",
        ));
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| Error::InvalidToken)
}

/// Checks that `token` can be sent as a token (not an API key, nothing a header cannot
/// carry) before any connection is made.
pub fn check_token(token: &str) -> Result<(), Error> {
    bearer(token).map(drop)
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}

impl Error {
    /// The gRPC status code: the server's answer, or UNAVAILABLE when nothing answered
    /// (as gRPC reports a connection that cannot be made).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            Error::Unreachable { .. } => Some(tonic::Code::Unavailable),
            _ => None,
        }
    }

    /// The leader's gRPC address, when a node answered that it is not the leader.
    pub fn leader_hint(&self) -> Option<String> {
        match self {
            Error::Status(s) => s
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        }
    }

    /// Sorts a failed call to `addr` into what the caller must change: nothing answered
    /// ([`Error::Unreachable`]), something that is not `server` answered
    /// ([`Error::WrongServer`]), or the server's own answer ([`Error::Status`]).
    pub fn classify(status: tonic::Status, addr: &str, server: Server) -> Error {
        if let Some(reason) = transport_failure(&status) {
            return Error::Unreachable {
                addr: addr.to_string(),
                server,
                reason,
            };
        }
        if let Some(answer) = foreign_answer(&status, server) {
            return Error::WrongServer {
                addr: addr.to_string(),
                server,
                answer,
            };
        }
        Error::Status(status)
    }

    /// The same error, saying what to change when TLS (or its absence) is the likely
    /// reason nothing answered.
    pub fn with_tls_hint(self, tls_used: bool) -> Error {
        match self {
            Error::Unreachable {
                addr,
                server,
                reason,
            } => Error::Unreachable {
                addr,
                server,
                reason: tls_hint(reason, tls_used),
            },
            other => other,
        }
    }

    /// Whether nothing answered (so another replica, or a later try, may).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }
}

/// Why a connection could not be made, when `status` is a local transport failure rather
/// than a server's answer.
fn transport_failure(status: &tonic::Status) -> Option<String> {
    use std::error::Error as _;
    let mut source = status.source();
    let mut transport = status.message() == "tcp connect error";
    while let Some(e) = source {
        transport |= e.is::<tonic::transport::Error>() || e.is::<std::io::Error>();
        source = e.source();
    }
    transport.then(|| failure_reason(status.message(), status.source()))
}

/// A failure's reason from its error chain: the I/O error in it, said plainly, or else the
/// chain's messages joined (each once).
fn failure_reason(top: &str, first: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut chain = vec![top.to_string()];
    let mut source = first;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_reason(io);
        }
        let text = e.to_string();
        if !chain.iter().any(|c| c.contains(&text)) {
            chain.push(text);
        }
        source = e.source();
    }
    chain.join(": ")
}

fn io_reason(io: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match io.kind() {
        ConnectionRefused => "connection refused (nothing listens on that port)".into(),
        TimedOut => "no answer to the connection attempt (a firewall, or the wrong host?)".into(),
        AddrNotAvailable | HostUnreachable | NetworkUnreachable => {
            format!("the address cannot be reached from here ({io})")
        }
        _ => io.to_string(),
    }
}

/// What a server that is not a Tollgate `server` did, when `status` shows one answered:
/// UNIMPLEMENTED (a gRPC server without this service: another Tollgate port says which
/// it is), or an HTTP answer that is not gRPC at all.
fn foreign_answer(status: &tonic::Status, server: Server) -> Option<String> {
    let msg = status.message();
    // The HTTP status of an answer that is not gRPC, as tonic reports it.
    let http_status = msg
        .strip_prefix("grpc-status header missing, mapped from HTTP status code ")
        .or_else(|| {
            msg.split_once("while receiving response with status: ")
                .map(|(_, s)| s)
        });
    match status.code() {
        _ if http_status.is_some() => Some(format!(
            "it answered plain HTTP ({}), not gRPC: a web server, or Tollgate's proxy port?",
            http_status.unwrap_or_default().trim()
        )),
        tonic::Code::Unimplemented if msg.is_empty() => Some(format!(
            "it is a gRPC server without the {} services",
            match server {
                Server::Node => "tollgate.node.v1",
                Server::ControlPlane => "tollgate.cp.v1",
            }
        )),
        tonic::Code::Unimplemented => Some(msg.to_string()),
        tonic::Code::Internal | tonic::Code::Unknown
            if msg.contains("protocol error")
                || msg.contains("compression flag")
                || msg.contains("content-type") =>
        {
            Some(format!("it does not speak gRPC ({msg})"))
        }
        _ => None,
    }
}

/// How a client reaches a server: over TLS, verifying it with the cluster's CA (a secure
/// cluster's nodes and control planes serve TLS with certificates from it), or in plain
/// text (a node run with `--insecure-cluster`).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    ca_pem: Option<std::sync::Arc<str>>,
    /// The name the server's certificate must carry, when it is not the dialled host
    /// (a container dialled by its IP address, say).
    server_name: Option<std::sync::Arc<str>>,
}

impl Tls {
    /// Plain text: for nodes run with `--insecure-cluster` only.
    pub fn plaintext() -> Tls {
        Tls::default()
    }

    /// TLS, trusting the cluster CA's certificate (PEM).
    pub fn ca_pem(pem: &str) -> Tls {
        Tls {
            ca_pem: Some(pem.into()),
            server_name: None,
        }
    }

    /// The same, expecting the server's certificate to carry `name` rather than the host
    /// dialled.
    pub fn with_server_name(mut self, name: &str) -> Tls {
        self.server_name = Some(name.into());
        self
    }

    /// TLS, trusting the CA certificate in `path` (`<data dir>/cluster-ca.pem` of the node
    /// that bootstrapped the cluster).
    pub fn ca_file(path: &std::path::Path) -> Result<Tls, Error> {
        let pem = std::fs::read_to_string(path).map_err(|e| Error::InvalidAddress {
            addr: path.display().to_string(),
            reason: format!("cannot read the cluster CA certificate: {e}"),
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(Error::InvalidAddress {
                addr: path.display().to_string(),
                reason: "it holds no PEM certificate (pass <data dir>/cluster-ca.pem)".into(),
            });
        }
        Ok(Tls::ca_pem(&pem))
    }

    /// The CA certificate (PEM) it trusts, if it uses TLS.
    pub fn ca_pem_text(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.ca_pem.is_some()
    }
}

/// An endpoint for `addr` (`HOST:PORT`, or a full `http://` / `https://` URI).
fn endpoint(addr: &str, tls: &Tls) -> Result<Endpoint, Error> {
    let scheme = if tls.is_tls() { "https" } else { "http" };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let invalid = |e: &dyn std::fmt::Display| Error::InvalidAddress {
        addr: addr.to_string(),
        reason: e.to_string(),
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(&e))?;
    if let Some(pem) = &tls.ca_pem {
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem.as_bytes()));
        if let Some(name) = &tls.server_name {
            config = config.domain_name(name.to_string());
        }
        endpoint = endpoint.tls_config(config).map_err(|e| invalid(&e))?;
    }
    // While a call is in flight, HTTP/2 pings find a peer that stopped answering (paused,
    // or cut off the network) within about two seconds, and the call fails UNAVAILABLE
    // rather than waiting out its whole timeout. A live peer answers pings however long
    // its handler takes, so slow calls are not cut short.
    Ok(endpoint
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1)))
}

/// A client for one node's admin API.
#[derive(Debug, Clone)]
pub struct NodeClient {
    inner: NodeAdminClient<Channel>,
    addr: std::sync::Arc<str>,
    tls: Tls,
    token: Option<MetadataValue<Ascii>>,
    hook: Option<fn(&mut tonic::metadata::MetadataMap)>,
}

/// Why a connection to `addr` failed, from the transport error's chain.
fn connect_error(e: tonic::transport::Error, addr: &str, server: Server) -> Error {
    use std::error::Error as _;
    Error::Unreachable {
        addr: addr.to_string(),
        server,
        reason: failure_reason(&e.to_string(), e.source()),
    }
}

/// Whether a TLS handshake failed because the server answered in plain text.
fn plaintext_answer(reason: &str) -> bool {
    let lower = reason.to_ascii_lowercase();
    lower.contains("invalidcontenttype") || lower.contains("corrupt message")
}

/// What plain text at `addr` is, when a TLS client was answered in plain text: another
/// server (a node's HTTP admin or proxy port, a program that is not Tollgate), said as
/// [`Error::WrongServer`]; or a Tollgate server run without TLS. `None` when the probe
/// tells nothing.
async fn probe_plaintext(addr: &str, server: Server) -> Option<Error> {
    let channel = endpoint(addr, &Tls::plaintext())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let answer = match server {
        Server::Node => NodeAdminClient::new(channel)
            .status(StatusRequest {})
            .await
            .map(drop),
        Server::ControlPlane => cp::audit_client::AuditClient::new(channel)
            .query(cp::AuditQuery::default())
            .await
            .map(drop),
    };
    if let Err(s) = answer {
        match Error::classify(s, addr, server) {
            wrong @ Error::WrongServer { .. } => return Some(wrong),
            Error::Unreachable { .. } => return None,
            // A Tollgate server answered, in plain text.
            _ => {}
        }
    }
    Some(Error::Unreachable {
        addr: addr.to_string(),
        server,
        reason: "it answers in plain text, without TLS: it runs with --insecure-cluster \
                 (or --insecure); talk to it with --insecure instead of --ca"
            .into(),
    })
}

/// An error with what to change: a TLS client (`tls_used`) answered in plain text learns
/// what answered (another port, another program, a server run without TLS); other
/// transport failures say whether TLS, or its absence, is the likely cause.
pub async fn explain(err: Error, addr: &str, server: Server, tls_used: bool) -> Error {
    if let Error::Unreachable { reason, .. } = &err
        && tls_used
        && plaintext_answer(reason)
        && let Some(better) = probe_plaintext(addr, server).await
    {
        return better;
    }
    err.with_tls_hint(tls_used)
}

/// A reason with what to change when TLS is the likely cause: a plain-text client at a
/// TLS server is hung up on; a TLS client at a plain-text server gets no handshake.
pub fn tls_hint(reason: String, tls_used: bool) -> String {
    let lower = reason.to_ascii_lowercase();
    let hung_up = [
        "connection reset",
        "broken pipe",
        "connection closed",
        "unexpected eof",
        "h2 protocol error",
        "frame with invalid size",
        "connection error",
    ]
    .iter()
    .any(|m| lower.contains(m));
    if !tls_used && hung_up {
        return format!(
            "{reason}. Tollgate nodes and control planes serve TLS: pass the cluster's CA \
             certificate with --ca <data dir>/cluster-ca.pem (or TOLLGATE_CA)"
        );
    }
    let tls_failed = [
        "invalid peer certificate",
        "unknownissuer",
        "unknown issuer",
        "notvalidforname",
        "not valid for name",
        "invalidcontenttype",
        "corrupt message",
        "handshake",
    ]
    .iter()
    .any(|m| lower.contains(m));
    if tls_used && tls_failed {
        return format!(
            "{reason}. Check that --ca (TOLLGATE_CA) is this cluster's cluster-ca.pem and that \
             you dial a name the node's certificate carries (its advertised host, localhost, \
             127.0.0.1); a node run with --insecure-cluster serves plain text (drop --ca)"
        );
    }
    reason
}

impl NodeClient {
    /// Connects to a node's gRPC address (`HOST:PORT`, or a full URI).
    pub async fn connect(addr: &str, tls: &Tls) -> Result<Self, Error> {
        let channel = endpoint(addr, tls)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await;
        match channel {
            Ok(channel) => Ok(Self::over(channel, addr, tls)),
            Err(e) => Err(explain(
                connect_error(e, addr, Server::Node),
                addr,
                Server::Node,
                tls.is_tls(),
            )
            .await),
        }
    }

    fn over(channel: Channel, addr: &str, tls: &Tls) -> Self {
        Self {
            inner: NodeAdminClient::new(channel),
            addr: addr.into(),
            tls: tls.clone(),
            token: None,
            hook: None,
        }
    }

    /// The address this client calls.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The same client, sending `token` (`None`: no token) with every call.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, Error> {
        self.token = token.map(bearer).transpose()?;
        Ok(self)
    }

    /// The same client, sending an already-parsed `authorization` value (for services that
    /// pass their caller's credentials on).
    pub fn with_authorization(mut self, value: Option<MetadataValue<Ascii>>) -> Self {
        self.token = value;
        self
    }

    /// The same client, letting `hook` add metadata to every call (a service that traces
    /// its calls adds the caller's `traceparent` this way).
    pub fn with_metadata_hook(mut self, hook: fn(&mut tonic::metadata::MetadataMap)) -> Self {
        self.hook = Some(hook);
        self
    }

    /// A client that connects on first use (and reconnects after failures), for callers
    /// that keep a client per node and must not block on a node that is down.
    pub fn lazy(addr: &str, tls: &Tls) -> Result<Self, Error> {
        let channel = endpoint(addr, tls)?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self::over(channel, addr, tls))
    }

    /// Every call: `msg` with the token and the hook's metadata, sent by `f`; a failure
    /// sorted by [`Error::classify`].
    async fn unary<Req, T, F, Fut>(&self, msg: Req, f: F) -> Result<T, Error>
    where
        F: FnOnce(NodeAdminClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(hook) = self.hook {
            hook(req.metadata_mut());
        }
        match f(self.inner.clone(), req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(explain(
                Error::classify(s, &self.addr, Server::Node),
                &self.addr,
                Server::Node,
                self.tls.is_tls(),
            )
            .await),
        }
    }

    /// What the node is and what it serves right now.
    pub async fn status(&mut self) -> Result<StatusResponse, Error> {
        self.unary(
            StatusRequest {},
            |mut c, r| async move { c.status(r).await },
        )
        .await
    }

    /// Members, roles, leader and term as this node sees them.
    pub async fn cluster_status(&mut self) -> Result<ClusterStatusResponse, Error> {
        self.unary(ClusterStatusRequest {}, |mut c, r| async move {
            c.cluster_status(r).await
        })
        .await
    }

    /// Replaces the cluster's spec (or, with `dry_run`, only plans it). `request_id` makes
    /// a retry safe: a write whose id was already applied is not applied again.
    pub async fn apply_spec(
        &mut self,
        spec_yaml: impl Into<String>,
        dry_run: bool,
        request_id: impl Into<String>,
    ) -> Result<ApplySpecResponse, Error> {
        let req = ApplySpecRequest {
            spec_yaml: spec_yaml.into(),
            dry_run,
            request_id: request_id.into(),
        };
        self.unary(req, |mut c, r| async move { c.apply_spec(r).await })
            .await
    }

    /// The cluster's spec: linearizable (through the leader) unless `local`.
    pub async fn read_spec(&mut self, local: bool) -> Result<ReadSpecResponse, Error> {
        self.unary(ReadSpecRequest { local }, |mut c, r| async move {
            c.read_spec(r).await
        })
        .await
    }

    /// Proposes a state-machine command (the API lifecycle commands); any node forwards it
    /// to the leader. A refused command answers with the status that says why.
    pub async fn write(&mut self, command: state::Command) -> Result<WriteResponse, Error> {
        let req = WriteRequest {
            command: Some(command),
        };
        self.unary(req, |mut c, r| async move { c.write(r).await })
            .await
    }

    /// A join token good for `uses` new nodes (or control planes) until `ttl` from now
    /// (operator only). The text returned is shown once: the cluster keeps only its hash.
    pub async fn create_join_token(
        &mut self,
        name: &str,
        ttl: Duration,
        uses: u32,
    ) -> Result<String, Error> {
        use state::identity_command::Op;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let command = state::Command {
            kind: Some(state::command::Kind::Identity(state::IdentityCommand {
                op: Some(Op::CreateJoinToken(state::CreateJoinToken {
                    name: name.to_string(),
                    expires_at_ms: (now + ttl).as_millis() as u64,
                    uses,
                    ..Default::default()
                })),
            })),
            ..Default::default()
        };
        Ok(self.write(command).await?.secret)
    }

    /// The cluster's join tokens (without their hashes): valid ones, or all with `all`.
    pub async fn list_join_tokens(
        &mut self,
        all: bool,
    ) -> Result<Vec<state::CredentialState>, Error> {
        let req = ListCredentialsRequest {
            kind: "join-token".into(),
            all,
            ..Default::default()
        };
        Ok(self.list_credentials(req).await?.credentials)
    }

    /// Stores a named secret (operator only); the leader seals it before writing it.
    pub async fn put_secret(&mut self, name: &str, value: Vec<u8>) -> Result<WriteResponse, Error> {
        self.identity(state::identity_command::Op::PutSecret(state::PutSecret {
            name: name.to_string(),
            value,
        }))
        .await
    }

    /// Deletes a named secret.
    pub async fn delete_secret(&mut self, name: &str) -> Result<WriteResponse, Error> {
        self.identity(state::identity_command::Op::DeleteSecret(state::Revoke {
            id: name.to_string(),
        }))
        .await
    }

    /// Re-seals every secret of the state under the primary sealing key (after every node
    /// was given the new key first).
    pub async fn reseal(&mut self) -> Result<WriteResponse, Error> {
        self.identity(state::identity_command::Op::Reseal(Default::default()))
            .await
    }

    /// The named secrets: `id` is the name, `name` the id of the key it is sealed with,
    /// `revoked_at_ms` when it was last set. Never a value.
    pub async fn list_secrets(&mut self) -> Result<Vec<state::CredentialState>, Error> {
        let req = ListCredentialsRequest {
            kind: "secret".into(),
            all: true,
            ..Default::default()
        };
        Ok(self.list_credentials(req).await?.credentials)
    }

    async fn identity(&mut self, op: state::identity_command::Op) -> Result<WriteResponse, Error> {
        let command = state::Command {
            kind: Some(state::command::Kind::Identity(state::IdentityCommand {
                op: Some(op),
            })),
            ..Default::default()
        };
        self.write(command).await
    }

    /// Revokes a join token by its id: no node enrolls with it from now on.
    pub async fn revoke_join_token(&mut self, id: &str) -> Result<WriteResponse, Error> {
        self.identity(state::identity_command::Op::RevokeJoinToken(
            state::Revoke { id: id.to_string() },
        ))
        .await
    }

    /// APIs and their versions; linearizable unless `local`; one tenant's when given.
    pub async fn list_apis(
        &mut self,
        local: bool,
        tenant: &str,
    ) -> Result<ListApisResponse, Error> {
        let mut all = ListApisResponse::default();
        loop {
            let page = self.list_apis_page(local, tenant, &all.next).await?;
            all.apis.extend(page.apis);
            all.generation = page.generation;
            all.next = page.next;
            if all.next.is_empty() {
                return Ok(all);
            }
        }
    }

    /// One page of [`NodeClient::list_apis`]: the APIs after `after` (by name), and in
    /// `next` where the next page starts (empty: this was the last).
    pub async fn list_apis_page(
        &mut self,
        local: bool,
        tenant: &str,
        after: &str,
    ) -> Result<ListApisResponse, Error> {
        let req = ListApisRequest {
            local,
            tenant: tenant.to_string(),
            after: after.to_string(),
        };
        self.unary(req, |mut c, r| async move { c.list_apis(r).await })
            .await
    }

    /// Tenants and their subscriptions (a tenant token sees its own only).
    pub async fn list_tenants(&mut self, local: bool) -> Result<ListTenantsResponse, Error> {
        self.unary(ListTenantsRequest { local }, |mut c, r| async move {
            c.list_tenants(r).await
        })
        .await
    }

    /// Subscriptions, active and waiting for consent (a tenant token sees its tenant's
    /// and those to the APIs it owns).
    pub async fn list_subscriptions(
        &mut self,
        req: NodeListSubscriptionsRequest,
    ) -> Result<ListSubscriptionsResponse, Error> {
        self.unary(req, |mut c, r| async move { c.list_subscriptions(r).await })
            .await
    }

    /// API keys (`kind` "key") or tokens ("token") of one tenant or all, without hashes.
    pub async fn list_credentials(
        &mut self,
        req: ListCredentialsRequest,
    ) -> Result<ListCredentialsResponse, Error> {
        self.unary(req, |mut c, r| async move { c.list_credentials(r).await })
            .await
    }

    /// The audit log, filtered.
    pub async fn audit(&mut self, req: AuditRequest) -> Result<AuditResponse, Error> {
        self.unary(req, |mut c, r| async move { c.audit(r).await })
            .await
    }

    /// Usage rollups in a range and the billing state (see the node's `Usage` RPC).
    pub async fn usage(
        &mut self,
        req: tollgate_proto::node::v1::UsageRequest,
    ) -> Result<tollgate_proto::node::v1::UsageResponse, Error> {
        self.unary(req, |mut c, r| async move { c.usage(r).await })
            .await
    }

    /// Canary rollouts (see the node's `Rollouts` RPC).
    pub async fn rollouts(
        &mut self,
        req: tollgate_proto::node::v1::RolloutsRequest,
    ) -> Result<tollgate_proto::node::v1::RolloutsResponse, Error> {
        self.unary(req, |mut c, r| async move { c.rollouts(r).await })
            .await
    }

    /// This node's call log (see the node's `QueryCalls` RPC).
    pub async fn query_calls(
        &mut self,
        req: tollgate_proto::node::v1::CallQuery,
    ) -> Result<tollgate_proto::node::v1::CallQueryResponse, Error> {
        self.unary(req, |mut c, r| async move { c.query_calls(r).await })
            .await
    }

    /// Every upstream's circuit breaker as committed (only those that ever changed).
    pub async fn list_circuits(
        &mut self,
    ) -> Result<tollgate_proto::node::v1::ListCircuitsResponse, Error> {
        let req = tollgate_proto::node::v1::ListCircuitsRequest {};
        self.unary(req, |mut c, r| async move { c.list_circuits(r).await })
            .await
    }

    /// Forces an upstream's circuit open or closed, or hands it back to detection
    /// (operator token). Every node follows once the change is applied there.
    pub async fn force_circuit(
        &mut self,
        upstream: &str,
        mode: state::CircuitMode,
        reason: &str,
    ) -> Result<WriteResponse, Error> {
        self.write(state::Command {
            kind: Some(state::command::Kind::Circuit(state::CircuitCommand {
                upstream: upstream.to_string(),
                op: Some(state::circuit_command::Op::Force(state::CircuitForce {
                    mode: mode as i32,
                    reason: reason.to_string(),
                })),
            })),
            ..state::Command::default()
        })
        .await
    }

    /// Takes a node out of the cluster.
    pub async fn remove(&mut self, node_id: u64) -> Result<(), Error> {
        self.unary(RemoveRequest { node_id }, |mut c, r| async move {
            c.remove(r).await
        })
        .await
        .map(drop)
    }

    /// The recent applied changes on this node, oldest first.
    pub async fn history(&mut self) -> Result<Vec<Change>, Error> {
        self.unary(
            HistoryRequest {},
            |mut c, r| async move { c.history(r).await },
        )
        .await
        .map(|h| h.changes)
    }

    /// Tests only (the node must run with `--enable-fault-injection`): drop Raft traffic
    /// between this node and `peers`; an empty list heals.
    pub async fn set_faults(&mut self, peers: Vec<u64>) -> Result<(), Error> {
        let req = SetFaultsRequest {
            isolate_from: peers,
        };
        self.unary(req, |mut c, r| async move { c.set_faults(r).await })
            .await
            .map(drop)
    }
}

pub use tollgate_proto::cp::v1 as cp;
pub use tollgate_proto::node::v1 as node;
pub use tollgate_proto::node::v1::{
    AuditRequest as NodeAuditRequest, ListCredentialsRequest as NodeListCredentialsRequest,
    ListSubscriptionsRequest as NodeListSubscriptionsRequest, ListSubscriptionsResponse,
    UsageRequest as NodeUsageRequest,
};

/// A client for the control plane (`tollgate-cp`): any number of replica addresses; a call
/// that gets UNAVAILABLE or a transport failure moves on to the next replica, backing off,
/// for up to 10 s. Every other answer (INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND,
/// ...) is returned at once: it says what to change.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    replicas: Vec<(String, Channel)>,
    tls: Tls,
    token: Option<MetadataValue<Ascii>>,
}

type Lifecycle = cp::api_lifecycle_client::ApiLifecycleClient<Channel>;
type AccessClient = cp::access_client::AccessClient<Channel>;
type AuditClient = cp::audit_client::AuditClient<Channel>;
type CircuitsClient = cp::circuits_client::CircuitsClient<Channel>;
type BillingClient = cp::billing_client::BillingClient<Channel>;

impl ControlPlaneClient {
    /// `addrs`: `HOST:PORT` of one or more replicas. Connects on first use.
    pub fn new(addrs: &[&str], tls: &Tls) -> Result<Self, Error> {
        if addrs.is_empty() {
            return Err(Error::InvalidAddress {
                addr: String::new(),
                reason: "no control-plane address given".into(),
            });
        }
        let mut replicas = Vec::new();
        for addr in addrs {
            let channel = endpoint(addr, tls)?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(20))
                .connect_lazy();
            replicas.push((addr.to_string(), channel));
        }
        Ok(Self {
            replicas,
            tls: tls.clone(),
            token: None,
        })
    }

    /// The same client, sending `token` with every call.
    pub fn with_token(mut self, token: &str) -> Result<Self, Error> {
        self.token = Some(bearer(token)?);
        Ok(self)
    }

    /// Sends `req` with `f`, to the next replica after each UNAVAILABLE (backing off, for
    /// up to 10 s). When no replica can even be connected to in a whole round, the call
    /// fails at once: nothing is running there, and waiting will not change that.
    async fn call<Req, T, F, Fut>(&self, req: Req, f: F) -> Result<T, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut i = 0;
        // Replicas in a row that could not be connected to.
        let mut unreachable = 0;
        loop {
            let (addr, channel) = &self.replicas[i % self.replicas.len()];
            let mut request = tonic::Request::new(req.clone());
            if let Some(t) = &self.token {
                request.metadata_mut().insert("authorization", t.clone());
            }
            let s = match f(channel.clone(), request).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            let err = explain(
                Error::classify(s, addr, Server::ControlPlane),
                addr,
                Server::ControlPlane,
                self.tls.is_tls(),
            )
            .await;
            // Another replica (or a later try) may answer; a wrong server never will.
            let retry = match &err {
                Error::Unreachable { .. } => true,
                Error::Status(s) => {
                    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
                }
                _ => false,
            };
            unreachable = if err.is_unreachable() {
                unreachable + 1
            } else {
                0
            };
            if !retry
                || unreachable >= self.replicas.len()
                || started.elapsed() + delay >= Duration::from_secs(10)
            {
                return Err(err);
            }
            i += 1;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// A new API owned by `tenant`, mounted as `settings` say (`None`: any host, at `/`,
    /// API keys).
    pub async fn create_api(
        &self,
        name: &str,
        tenant: &str,
        settings: Option<state::ApiSettings>,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::CreateApiRequest {
            name: name.into(),
            tenant: tenant.into(),
            settings,
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).create_api(r).await
        })
        .await
    }

    pub async fn update_api(
        &self,
        name: &str,
        settings: state::ApiSettings,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::UpdateApiRequest {
            name: name.into(),
            settings: Some(settings),
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).update_api(r).await
        })
        .await
    }

    pub async fn get_api(&self, name: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::GetApiRequest { name: name.into() };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).get_api(r).await },
        )
        .await
    }

    /// Every API the token may see, or one tenant's (`tenant` non-empty).
    pub async fn list_apis(&self, tenant: &str) -> Result<Vec<state::ApiState>, Error> {
        let mut apis = Vec::new();
        let mut after = String::new();
        loop {
            let req = cp::ListApisRequest {
                tenant: tenant.into(),
                after: after.clone(),
            };
            let page = self
                .call(
                    req,
                    |ch, r| async move { Lifecycle::new(ch).list_apis(r).await },
                )
                .await?;
            apis.extend(page.apis);
            if page.next.is_empty() {
                return Ok(apis);
            }
            after = page.next;
        }
    }

    pub async fn create_version(
        &self,
        api: &str,
        version: &str,
        content: &str,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::CreateVersionRequest {
            api: api.into(),
            version: version.into(),
            content: content.into(),
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).create_version(r).await
        })
        .await
    }

    /// Moves a version: `to` is edit, publish, deprecate, retire or discard.
    pub async fn transition(
        &self,
        api: &str,
        version: &str,
        to: state::version_transition::To,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::TransitionVersionRequest {
            api: api.into(),
            transition: Some(state::VersionTransition {
                version: version.into(),
                to: Some(to),
            }),
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).transition_version(r).await
        })
        .await
    }

    /// Publishes a draft (the cluster compiles its routes in the same change).
    pub async fn publish(&self, api: &str, version: &str) -> Result<cp::ApiReply, Error> {
        self.transition(
            api,
            version,
            state::version_transition::To::Publish(state::Publish::default()),
        )
        .await
    }

    /// Splits traffic by weight, e.g. `[("1.0.0", 90), ("2.0.0", 10)]`.
    pub async fn set_split(
        &self,
        api: &str,
        weights: &[(&str, u32)],
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::SetSplitRequest {
            api: api.into(),
            weights: weights
                .iter()
                .map(|(v, w)| state::SplitEntry {
                    version: v.to_string(),
                    weight: *w,
                })
                .collect(),
        };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).set_split(r).await },
        )
        .await
    }

    pub async fn promote(&self, api: &str, version: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::PromoteRequest {
            api: api.into(),
            version: version.into(),
        };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).promote(r).await },
        )
        .await
    }

    pub async fn rollback(&self, api: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::RollbackRequest { api: api.into() };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).rollback(r).await },
        )
        .await
    }

    pub async fn create_tenant(&self, name: &str) -> Result<cp::TenantReply, Error> {
        let req = cp::CreateTenantRequest { name: name.into() };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).create_tenant(r).await
        })
        .await
    }

    pub async fn delete_tenant(&self, name: &str) -> Result<cp::TenantReply, Error> {
        let req = cp::DeleteTenantRequest { name: name.into() };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).delete_tenant(r).await
        })
        .await
    }

    pub async fn list_tenants(&self) -> Result<Vec<state::TenantState>, Error> {
        Ok(self
            .call(cp::ListTenantsRequest {}, |ch, r| async move {
                AccessClient::new(ch).list_tenants(r).await
            })
            .await?
            .tenants)
    }

    /// A new API key; `expires_at` is RFC 3339 or empty. The reply's `secret` is the key,
    /// shown this once.
    pub async fn create_key(
        &self,
        tenant: &str,
        name: &str,
        expires_at: &str,
    ) -> Result<cp::CredentialReply, Error> {
        self.create_model_key(tenant, name, expires_at, &[]).await
    }

    /// A new API key that may use only `models` of LLM APIs (empty: every model;
    /// docs/llm.md); the reply's `secret` is the key, shown this once.
    pub async fn create_model_key(
        &self,
        tenant: &str,
        name: &str,
        expires_at: &str,
        models: &[String],
    ) -> Result<cp::CredentialReply, Error> {
        let req = cp::CreateCredentialRequest {
            tenant: tenant.into(),
            name: name.into(),
            expires_at: expires_at.into(),
            client_certificate: String::new(),
            models: models.to_vec(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).create_key(r).await
        })
        .await
    }

    pub async fn list_keys(
        &self,
        tenant: &str,
        all: bool,
    ) -> Result<Vec<state::CredentialState>, Error> {
        let req = cp::ListCredentialsRequest {
            tenant: tenant.into(),
            all,
        };
        Ok(self
            .call(req, |ch, r| async move {
                AccessClient::new(ch).list_keys(r).await
            })
            .await?
            .credentials)
    }

    pub async fn revoke_key(&self, tenant: &str, id: &str) -> Result<cp::CredentialReply, Error> {
        let req = cp::RevokeRequest {
            tenant: tenant.into(),
            id: id.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).revoke_key(r).await
        })
        .await
    }

    /// A new API key that is a client certificate (PEM), for APIs with `auth: mtls`: the
    /// caller proves it holds the certificate's key in the TLS handshake, so the reply
    /// has no secret. It expires with the certificate at the latest.
    pub async fn create_certificate_key(
        &self,
        tenant: &str,
        name: &str,
        expires_at: &str,
        certificate_pem: &str,
    ) -> Result<cp::CredentialReply, Error> {
        let req = cp::CreateCredentialRequest {
            tenant: tenant.into(),
            name: name.into(),
            expires_at: expires_at.into(),
            client_certificate: certificate_pem.into(),
            models: Vec::new(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).create_key(r).await
        })
        .await
    }

    /// A new control-plane token scoped to `tenant`; the reply's `secret` is the token.
    pub async fn create_token(
        &self,
        tenant: &str,
        name: &str,
        expires_at: &str,
    ) -> Result<cp::CredentialReply, Error> {
        let req = cp::CreateCredentialRequest {
            tenant: tenant.into(),
            name: name.into(),
            expires_at: expires_at.into(),
            client_certificate: String::new(),
            models: Vec::new(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).create_token(r).await
        })
        .await
    }

    pub async fn list_tokens(
        &self,
        tenant: &str,
        all: bool,
    ) -> Result<Vec<state::CredentialState>, Error> {
        let req = cp::ListCredentialsRequest {
            tenant: tenant.into(),
            all,
        };
        Ok(self
            .call(req, |ch, r| async move {
                AccessClient::new(ch).list_tokens(r).await
            })
            .await?
            .credentials)
    }

    pub async fn revoke_token(&self, tenant: &str, id: &str) -> Result<cp::CredentialReply, Error> {
        let req = cp::RevokeRequest {
            tenant: tenant.into(),
            id: id.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).revoke_token(r).await
        })
        .await
    }

    /// Asks for `tenant`'s keys to call the versions of `api` that match `versions`
    /// ("2", "^2.1", "*"; empty: all). With the operator token it is granted at once; with
    /// a token of the API's owner it is an offer `tenant` must accept, with a token of
    /// `tenant` a request the owner must accept ([`Self::accept_subscription`]). The
    /// reply's `subscription.status` says which: "active", "offered" or "requested".
    pub async fn subscribe(
        &self,
        tenant: &str,
        api: &str,
        versions: &str,
    ) -> Result<cp::TenantReply, Error> {
        let req = cp::SubscribeRequest {
            tenant: tenant.into(),
            api: api.into(),
            versions: versions.into(),
            accept: false,
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).subscribe(r).await
        })
        .await
    }

    /// Accepts the subscription of `tenant` to `api` that the other side asked for: an
    /// offer (with a token of `tenant`) or a request (with a token of the API's owner).
    pub async fn accept_subscription(
        &self,
        tenant: &str,
        api: &str,
    ) -> Result<cp::TenantReply, Error> {
        let req = cp::SubscribeRequest {
            tenant: tenant.into(),
            api: api.into(),
            versions: String::new(),
            accept: true,
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).subscribe(r).await
        })
        .await
    }

    /// Subscriptions, active and waiting for consent, that the token may see (its
    /// tenant's and those to its APIs); `tenant` and `api` narrow them (empty: all).
    pub async fn list_subscriptions(
        &self,
        tenant: &str,
        api: &str,
    ) -> Result<Vec<state::SubscriptionView>, Error> {
        let req = cp::ListSubscriptionsRequest {
            tenant: tenant.into(),
            api: api.into(),
        };
        Ok(self
            .call(req, |ch, r| async move {
                AccessClient::new(ch).list_subscriptions(r).await
            })
            .await?
            .subscriptions)
    }

    pub async fn unsubscribe(&self, tenant: &str, api: &str) -> Result<cp::TenantReply, Error> {
        let req = cp::UnsubscribeRequest {
            tenant: tenant.into(),
            api: api.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).unsubscribe(r).await
        })
        .await
    }

    /// The audit log, filtered.
    pub async fn audit(&self, query: cp::AuditQuery) -> Result<Vec<state::AuditEntry>, Error> {
        Ok(self
            .call(
                query,
                |ch, r| async move { AuditClient::new(ch).query(r).await },
            )
            .await?
            .entries)
    }

    /// Upstreams' circuit breakers as committed (only those that ever changed).
    pub async fn list_circuits(&self) -> Result<cp::ListCircuitsReply, Error> {
        self.call(cp::ListCircuitsRequest {}, |ch, r| async move {
            CircuitsClient::new(ch).list_circuits(r).await
        })
        .await
    }

    /// Holds an upstream's circuit open or closed on every node, or hands it back to
    /// detection (operator token). Returns the generation written.
    pub async fn force_circuit(
        &self,
        upstream: &str,
        mode: state::CircuitMode,
        reason: &str,
    ) -> Result<u64, Error> {
        let req = cp::ForceCircuitRequest {
            upstream: upstream.to_string(),
            mode: mode as i32,
            reason: reason.to_string(),
        };
        Ok(self
            .call(req, |ch, r| async move {
                CircuitsClient::new(ch).force_circuit(r).await
            })
            .await?
            .generation)
    }

    /// Adds a plan, or a new immutable version of one (operator token).
    pub async fn put_plan(
        &self,
        name: &str,
        prices: state::PlanPrices,
    ) -> Result<cp::PlanReply, Error> {
        let req = cp::PutPlanRequest {
            name: name.into(),
            prices: Some(prices),
        };
        self.call(req, |ch, r| async move {
            BillingClient::new(ch).put_plan(r).await
        })
        .await
    }

    pub async fn list_plans(&self) -> Result<cp::ListPlansReply, Error> {
        self.call(cp::ListPlansRequest {}, |ch, r| async move {
            BillingClient::new(ch).list_plans(r).await
        })
        .await
    }

    /// Puts a tenant on a plan from now on (empty plan: off any plan).
    pub async fn assign_plan(&self, tenant: &str, plan: &str) -> Result<u64, Error> {
        let req = cp::AssignPlanRequest {
            tenant: tenant.into(),
            plan: plan.into(),
        };
        Ok(self
            .call(req, |ch, r| async move {
                BillingClient::new(ch).assign_plan(r).await
            })
            .await?
            .generation)
    }

    /// Sets (or, with an empty limit, removes) a tenant's monthly budget.
    pub async fn set_budget(&self, budget: state::SetBudget) -> Result<u64, Error> {
        Ok(self
            .call(budget, |ch, r| async move {
                BillingClient::new(ch).set_budget(r).await
            })
            .await?
            .generation)
    }

    pub async fn list_budgets(&self) -> Result<cp::ListBudgetsReply, Error> {
        self.call(cp::ListBudgetsRequest {}, |ch, r| async move {
            BillingClient::new(ch).list_budgets(r).await
        })
        .await
    }

    pub async fn usage(&self, query: cp::UsageQuery) -> Result<cp::UsageReply, Error> {
        self.call(query, |ch, r| async move {
            BillingClient::new(ch).usage(r).await
        })
        .await
    }

    pub async fn costs(&self, query: cp::CostsQuery) -> Result<cp::CostsReply, Error> {
        self.call(query, |ch, r| async move {
            BillingClient::new(ch).costs(r).await
        })
        .await
    }

    pub async fn version_status(
        &self,
        req: cp::VersionStatusRequest,
    ) -> Result<cp::VersionStatusReply, Error> {
        self.call(req, |ch, r| async move {
            BillingClient::new(ch).version_status(r).await
        })
        .await
    }

    /// Starts a canary rollout of `api` (docs/hypercare.md).
    pub async fn start_rollout(
        &self,
        api: &str,
        rollout: state::StartRollout,
    ) -> Result<cp::RolloutReply, Error> {
        let req = cp::StartRolloutRequest {
            api: api.into(),
            rollout: Some(rollout),
        };
        self.call(req, |ch, r| async move {
            cp::rollouts_client::RolloutsClient::new(ch)
                .start_rollout(r)
                .await
        })
        .await
    }

    /// The API's current or last rollout, with its decisions and evidence.
    pub async fn get_rollout(&self, api: &str) -> Result<cp::RolloutReply, Error> {
        let req = cp::GetRolloutRequest { api: api.into() };
        self.call(req, |ch, r| async move {
            cp::rollouts_client::RolloutsClient::new(ch)
                .get_rollout(r)
                .await
        })
        .await
    }

    /// Every API's current or last rollout, the finished ones, and the anomaly alerts.
    pub async fn list_rollouts(&self, api: &str) -> Result<cp::ListRolloutsReply, Error> {
        let req = cp::GetRolloutRequest { api: api.into() };
        self.call(req, |ch, r| async move {
            cp::rollouts_client::RolloutsClient::new(ch)
                .list_rollouts(r)
                .await
        })
        .await
    }

    /// pause, resume or abort the API's rollout.
    pub async fn control_rollout(
        &self,
        api: &str,
        action: &str,
        reason: &str,
    ) -> Result<cp::RolloutReply, Error> {
        let req = cp::ControlRolloutRequest {
            api: api.into(),
            action: action.into(),
            reason: reason.into(),
        };
        self.call(req, |ch, r| async move {
            cp::rollouts_client::RolloutsClient::new(ch)
                .control_rollout(r)
                .await
        })
        .await
    }

    /// What the usage rollups say per API, version, key, tenant or model over a range,
    /// bucket by bucket, against a baseline (docs/hypercare.md).
    pub async fn analyze(&self, q: cp::AnalyzeQuery) -> Result<cp::AnalyzeReply, Error> {
        self.call(q, |ch, r| async move {
            cp::analysis_client::AnalysisClient::new(ch)
                .analyze(r)
                .await
        })
        .await
    }

    /// The call log of every node, merged: newest first, or slowest first (docs/calls.md).
    pub async fn query_calls(
        &self,
        q: tollgate_proto::node::v1::CallQuery,
    ) -> Result<cp::CallsReply, Error> {
        self.call(q, |ch, r| async move {
            cp::calls_client::CallsClient::new(ch).query_calls(r).await
        })
        .await
    }

    /// New call-log records from every node as they are written, until the stream is
    /// dropped.
    pub async fn follow_calls(
        &self,
        q: tollgate_proto::node::v1::CallQuery,
    ) -> Result<tonic::Streaming<cp::CallsReply>, Error> {
        self.call(q, |ch, r| async move {
            cp::calls_client::CallsClient::new(ch).follow_calls(r).await
        })
        .await
    }

    /// The LLM APIs' models and deployments: calls, error rate, time to first token,
    /// tokens per minute and each deployment's circuit (docs/llm.md).
    pub async fn list_models(
        &self,
        req: cp::ListModelsRequest,
    ) -> Result<cp::ListModelsReply, Error> {
        self.call(req, |ch, r| async move {
            cp::models_client::ModelsClient::new(ch)
                .list_models(r)
                .await
        })
        .await
    }
}
