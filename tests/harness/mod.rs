//! Shared harness for the end-to-end tests: a real `tollgate node` process started on
//! port 0, and real upstream HTTP servers started in the test process.
//!
//! ```no_run
//! let up = Upstream::start("a").await;
//! let node = GatewayProcess::start(&spec_for(&[&up])).await;
//! let resp = node.get("/anything").await;
//! ```
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod collector;
pub mod cp;
pub mod dns;
pub mod llm;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Bounded wait for a condition, polling every 20 ms.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A spec with one upstream `a` (the given server; `upstream_extra` is spliced into its
/// object, e.g. `", timeouts: { request: 300ms }"`) and one route `r` for every path.
pub fn one_route_spec(up: &Upstream, upstream_extra: &str) -> String {
    format!(
        "upstreams: {{ a: {{ endpoints: [{{ address: \"{}\" }}] {upstream_extra} }} }}\nroutes: {{ r: {{ match: {{ path: {{ prefix: / }} }}, upstream: a }} }}\n",
        up.addr
    )
}

/// `spec` (ending in a newline) with loopback opened to tenants' API versions. Every test
/// upstream listens on 127.0.0.1, which API versions may not reach by default (their
/// upstreams are a tenant's to choose, and the node's own ports are on loopback:
/// docs/security.md); a test that publishes API versions onto them opens it, as `tollgate
/// dev` does. The nodes' own ports stay closed whatever the list says.
pub fn allowing_loopback(spec: &str) -> String {
    format!("{spec}tenant_upstreams: {{ allow: [127.0.0.0/8] }}\n")
}

// === the gateway process ===

/// A `tollgate node` child process, killed when dropped.
pub struct GatewayProcess {
    pub child: Child,
    pub dir: PathBuf,
    /// The operator token, when this node bootstrapped the cluster.
    pub token: Option<String>,
    /// How clients verify this node: the cluster CA (plain text for --insecure-cluster).
    pub tls: tollgate_sdk::Tls,
    pub proxy: SocketAddr,
    /// The HTTPS listener, when the node was started with `--https-addr`.
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub grpc: SocketAddr,
    pub spec_path: PathBuf,
    pub access_log: PathBuf,
    pub opts: NodeOpts,
    keep_dir: bool,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Body,
    >,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

fn test_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-test-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// How to start a node process.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub id: u64,
    /// The node's directory (data, logs, spec); a fresh one when None.
    pub dir: Option<PathBuf>,
    /// 0: any free port. A restart passes the port it had, so peers still reach it.
    pub grpc_port: u16,
    pub bootstrap: bool,
    pub join: Option<SocketAddr>,
    pub spec: Option<String>,
    /// The join token a new node enrolls with (joining a secure cluster).
    pub join_token: Option<String>,
    pub extra: Vec<String>,
}

impl NodeOpts {
    pub fn single(spec: &str, extra: &[&str]) -> NodeOpts {
        NodeOpts {
            id: 1,
            dir: None,
            grpc_port: 0,
            bootstrap: true,
            join: None,
            join_token: None,
            spec: Some(spec.to_string()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl GatewayProcess {
    /// A single-node cluster serving `spec`.
    pub async fn start(spec: &str) -> GatewayProcess {
        Self::start_with(spec, &[]).await
    }

    /// A single-node cluster serving `spec`, with extra flags; waits until it listens.
    pub async fn start_with(spec: &str, extra: &[&str]) -> GatewayProcess {
        Self::launch(NodeOpts::single(spec, extra)).await
    }

    /// Starts a node process and waits until it listens.
    pub async fn launch(opts: NodeOpts) -> GatewayProcess {
        match Self::try_launch(opts, Duration::from_secs(20)).await {
            Ok(node) => node,
            Err((status, log)) => {
                panic!("node did not start within 20s ({status:?}); its log:\n{log}")
            }
        }
    }

    /// Starts a node process and waits (at most `within`) until it listens; its exit
    /// status (None: still running, killed now) and log when it does not.
    pub async fn try_launch(
        opts: NodeOpts,
        within: Duration,
    ) -> Result<GatewayProcess, (Option<std::process::ExitStatus>, String)> {
        let dir = opts.dir.clone().unwrap_or_else(test_dir);
        let spec_path = dir.join("spec.yaml");
        if let Some(spec) = &opts.spec {
            std::fs::write(&spec_path, spec).expect("write spec");
        }
        let addr_file = dir.join("addrs.json");
        let _ = std::fs::remove_file(&addr_file);
        let access_log = dir.join("access.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("node");
        if !opts.extra.iter().any(|a| a == "--id") {
            cmd.args(["--id", &opts.id.to_string()]);
        }
        cmd.args(["--proxy-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", &format!("127.0.0.1:{}", opts.grpc_port)])
            .args(if opts.extra.iter().any(|a| a == "--workers") {
                &[][..]
            } else {
                &["--workers", "2"][..]
            })
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--access-log")
            .arg(&access_log)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(&opts.extra)
            .stdout(Stdio::null())
            .stderr(stderr);
        if opts.spec.is_some() {
            cmd.arg("--spec").arg(&spec_path);
        }
        if opts.bootstrap {
            cmd.arg("--bootstrap");
        }
        if let Some(peer) = opts.join {
            cmd.args(["--join", &peer.to_string()]);
        }
        if let Some(token) = &opts.join_token {
            cmd.env("TOLLGATE_JOIN_TOKEN", token);
        }
        let mut child = cmd.spawn().expect("spawn tollgate node");
        let deadline = Instant::now() + within;
        let addrs: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && let Ok(v) = serde_json::from_str(&text)
            {
                break v;
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                if exited.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
                return Err((exited, log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let addr = |k: &str| addrs[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
        let grpc = addr("grpc");
        // The bootstrapping node writes the operator token before it reports started.
        let token = std::fs::read_to_string(dir.join("data/operator-token"))
            .ok()
            .map(|t| t.trim().to_string());
        // A secure node holds the cluster CA once it has started (bootstrapped or enrolled).
        let ca = std::fs::read_to_string(dir.join("data/cluster-ca.pem")).ok();
        let tls = match &ca {
            Some(pem) => tollgate_sdk::Tls::ca_pem(pem),
            None => tollgate_sdk::Tls::plaintext(),
        };
        if let Some(pem) = &ca {
            let mut known = TRUST.lock().unwrap();
            let known = known.get_or_insert_with(HashMap::new);
            let operator = token.clone().or_else(|| {
                known
                    .values()
                    .find(|t| t.ca_pem == *pem)
                    .and_then(|t| t.operator_token.clone())
            });
            known.insert(
                grpc,
                Trust {
                    ca_pem: pem.clone(),
                    operator_token: operator,
                },
            );
        }
        Ok(GatewayProcess {
            tls,
            token,
            child,
            proxy: addr("proxy"),
            https: addrs["https"].as_str().map(|a| a.parse().unwrap()),
            admin: addr("admin"),
            grpc,
            dir: dir.clone(),
            spec_path,
            access_log,
            opts: NodeOpts {
                dir: Some(dir),
                grpc_port: grpc.port(),
                ..opts
            },
            keep_dir: false,
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// kill -9, keeping the node's directory; returns how to start it again.
    pub fn kill9(mut self) -> NodeOpts {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.keep_dir = true;
        let mut opts = self.opts.clone();
        // A restart never bootstraps (the store already holds the cluster) nor re-applies.
        opts.spec = None;
        opts
    }

    /// A client for this node's admin gRPC API, with the operator token when this node
    /// made it (it bootstrapped the cluster).
    pub async fn sdk(&self) -> tollgate_sdk::NodeClient {
        tollgate_sdk::NodeClient::connect(&self.grpc.to_string(), &self.tls)
            .await
            .expect("connect to the node's gRPC address")
            .with_token(self.token.as_deref())
            .expect("a usable token")
    }

    /// The cluster CA's certificate file this node holds (for `--ca` / TOLLGATE_CA).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("data/cluster-ca.pem")
    }

    /// The operator token this node made at bootstrap.
    pub fn operator_token(&self) -> &str {
        self.token
            .as_deref()
            .expect("this node did not bootstrap a cluster, so it made no operator token")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// Sends a request through the gateway and reads the whole response.
    pub async fn send(&self, req: Request<Body>) -> TestResponse {
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .expect("response within 30s")
            .expect("request to the gateway");
        TestResponse::read(resp).await
    }

    pub async fn get(&self, path: &str) -> TestResponse {
        self.send(Request::get(self.url(path)).body(full("")).unwrap())
            .await
    }

    pub async fn admin_get(&self, path: &str) -> TestResponse {
        let req = Request::get(format!("http://{}{}", self.admin, path))
            .body(full(""))
            .unwrap();
        TestResponse::read(self.client.request(req).await.expect("admin request")).await
    }

    /// The node's `/metrics` page.
    pub async fn metrics(&self) -> String {
        String::from_utf8(self.admin_get("/metrics").await.body.to_vec()).expect("metrics are text")
    }

    /// The node's peak resident memory (VmHWM) in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kb(self.pid(), "VmHWM:") * 1024
    }

    pub fn rss(&self) -> u64 {
        proc_status_kb(self.pid(), "VmRSS:") * 1024
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Every file under `dir`, in its subdirectories too.
pub fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// What a test knows of the cluster a node's gRPC address belongs to: its CA and the
/// operator token (to make join tokens for control planes and new nodes).
#[derive(Debug, Clone)]
pub struct Trust {
    pub ca_pem: String,
    pub operator_token: Option<String>,
}

static TRUST: Mutex<Option<HashMap<SocketAddr, Trust>>> = Mutex::new(None);

/// The CA and operator token of the cluster `grpc` is a node of (None: an
/// --insecure-cluster node, or one this process did not start).
pub fn trust(grpc: SocketAddr) -> Option<Trust> {
    TRUST.lock().unwrap().as_ref()?.get(&grpc).cloned()
}

/// How a client verifies the node at `grpc`.
pub fn tls_for(grpc: SocketAddr) -> tollgate_sdk::Tls {
    match trust(grpc) {
        Some(t) => tollgate_sdk::Tls::ca_pem(&t.ca_pem),
        None => tollgate_sdk::Tls::plaintext(),
    }
}

/// A TLS connection (ALPN h2) to the node at `addr`, verified with its cluster's CA, for
/// tests that speak raw HTTP/2 to it.
pub async fn tls_stream(addr: SocketAddr) -> TokioIo<tokio_rustls_stream::TlsStream> {
    use tower::Service;
    let trust = trust(addr).expect("a secure node this test started");
    let state = std::sync::Arc::new(tollgate_node::identity::tls::TlsState::default());
    state
        .trust(&tollgate_node::identity::ca::pem_certs(&trust.ca_pem).unwrap())
        .unwrap();
    let mut connector = tollgate_node::identity::tls::Connector {
        config: state.client_config().unwrap(),
    };
    connector
        .call(format!("http://{addr}").parse().unwrap())
        .await
        .expect("TLS connection to the node")
}

/// The TLS stream type [`tls_stream`] gives.
pub mod tokio_rustls_stream {
    pub type TlsStream = tollgate_node::identity::tls::ClientStream;
}

/// A raw tonic channel to a Tollgate gRPC server at `addr`, verified with the cluster CA
/// when `tls` has one (for tests that use the generated clients).
pub async fn channel(addr: SocketAddr, tls: &tollgate_sdk::Tls) -> tonic::transport::Channel {
    let endpoint = match tls.ca_pem_text() {
        Some(pem) => tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .unwrap(),
        None => tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap(),
    };
    endpoint.connect().await.expect("connect")
}

/// A new join token (good for `uses` nodes or control planes, for an hour) of the cluster
/// `grpc` is a node of.
pub async fn join_token(grpc: SocketAddr, uses: u32) -> String {
    let trust = trust(grpc).expect("a secure node this test started");
    let mut client = tollgate_sdk::NodeClient::connect(&grpc.to_string(), &tls_for(grpc))
        .await
        .expect("connect")
        .with_token(trust.operator_token.as_deref())
        .expect("token");
    client
        .create_join_token("test", Duration::from_secs(3600), uses)
        .await
        .expect("a join token")
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() && !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A whole response, read.
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub async fn read(resp: Response<Incoming>) -> TestResponse {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("read body").to_bytes();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error code of a gateway JSON error.
    pub fn error_code(&self) -> String {
        let v = self.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {v}"
        );
        v["error"]["code"].as_str().expect("error.code").to_string()
    }
}

// === upstreams ===

/// Live knobs and counters of a test upstream.
pub struct UpstreamState {
    pub name: String,
    pub hits: AtomicUsize,
    /// Non-zero: every request (but /healthz) gets this status.
    pub fail_with: AtomicU16,
    /// Every request (but /healthz) waits this long first.
    pub delay_ms: AtomicU64,
    pub healthy: AtomicBool,
    pub health_checks: AtomicUsize,
    pub last_headers: Mutex<Option<http::HeaderMap>>,
    pub last_version: Mutex<Option<http::Version>>,
    /// Connections open to this upstream now.
    pub open: AtomicUsize,
}

/// An HTTP/1.1 upstream server in the test process.
///
/// Paths: `/status/{code}`, `/early/{code}` (answers before reading the body), `/slow/{ms}`, `/sse/{n}/{ms}` (n events, ms apart),
/// `/bytes/{n}` (streams n bytes), `/stall/{sent}/{total}` (stops mid-body), `/upload` (counts the body), `/ws` (WebSocket echo),
/// `/healthz`; anything else answers 200 with `{"upstream": name, "path": ...}`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Upstream::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// One listening on `addr` (another loopback address, a port others share).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            hits: AtomicUsize::new(0),
            fail_with: AtomicU16::new(0),
            delay_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            health_checks: AtomicUsize::new(0),
            last_headers: Mutex::new(None),
            last_version: Mutex::new(None),
            open: AtomicUsize::new(0),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                s.open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let state = s.clone();
                    let svc = service_fn(move |req| serve(req, s.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        // More than hyper's 100 header lines: the gateway's own limit
                        // is what tests look at.
                        .max_headers(500)
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                    state.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Upstream { addr, state, task }
    }

    /// One upstream per name.
    pub async fn start_many(names: &[&str]) -> Vec<Upstream> {
        let mut ups = Vec::with_capacity(names.len());
        for name in names {
            ups.push(Upstream::start(name).await);
        }
        ups
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Connections open to it now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

async fn serve(
    req: Request<Incoming>,
    s: Arc<UpstreamState>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if path == "/healthz" {
        s.health_checks.fetch_add(1, Ordering::SeqCst);
        let ok = s.healthy.load(Ordering::SeqCst);
        return Ok(text(
            if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            "",
        ));
    }
    s.hits.fetch_add(1, Ordering::SeqCst);
    *s.last_headers.lock().unwrap() = Some(req.headers().clone());
    *s.last_version.lock().unwrap() = Some(req.version());
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fail = s.fail_with.load(Ordering::SeqCst);
    if fail != 0 {
        return Ok(text(
            StatusCode::from_u16(fail).unwrap(),
            format!("{} failing", s.name),
        ));
    }
    let resp = match parts.as_slice() {
        ["status", code] => text(
            StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap(),
            s.name.clone(),
        ),
        ["early", code] => {
            // Answers at once and reads the body afterwards, keeping the connection (as
            // nginx does with an early 401 or 413).
            let mut body = req.into_body();
            tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
            text(
                StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap(),
                s.name.clone(),
            )
        }
        ["slow", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            text(StatusCode::OK, s.name.clone())
        }
        ["sse", n, ms] => {
            let n: usize = n.parse().unwrap_or(1);
            let ms: u64 = ms.parse().unwrap_or(100);
            let stream = futures::stream::unfold(0usize, move |i| async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
                Some((Ok::<_, Infallible>(frame), i + 1))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        ["stall", sent, total] => {
            // Promises `total` bytes, sends `sent`, then nothing more (for a while).
            let sent: usize = sent.parse().unwrap_or(0);
            let first = futures::stream::once(async move {
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b's'; sent])))
            });
            let stall = futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, Infallible>(Frame::data(Bytes::new()))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(first.chain(stall))));
            r.headers_mut()
                .insert("content-length", total.parse().unwrap());
            r
        }
        ["bytes", n] => {
            let total: usize = n.parse().unwrap_or(0);
            const CHUNK: usize = 64 * 1024;
            let chunk = Bytes::from(vec![b'x'; CHUNK]);
            let stream = futures::stream::unfold(0usize, move |sent| {
                let chunk = chunk.clone();
                async move {
                    if sent >= total {
                        return None;
                    }
                    let n = CHUNK.min(total - sent);
                    Some((Ok::<_, Infallible>(Frame::data(chunk.slice(..n))), sent + n))
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert("content-length", total.to_string().parse().unwrap());
            r
        }
        ["upload"] => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "body failed")),
                }
            }
            text(
                StatusCode::OK,
                serde_json::json!({ "bytes": n }).to_string(),
            )
        }
        ["ws"] => return Ok(websocket_echo(req)),
        _ => {
            let headers: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            text(
                StatusCode::OK,
                serde_json::json!({
                    "upstream": s.name,
                    "path": path,
                    "query": req.uri().query(),
                    "headers": headers,
                })
                .to_string(),
            )
        }
    };
    Ok(resp)
}

fn websocket_echo(mut req: Request<Incoming>) -> Response<Body> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a websocket request");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                if ws.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(full(""))
        .unwrap()
}

/// The node admin command that creates a tenant.
#[allow(dead_code)] // not every test binary uses it
pub fn create_tenant(name: &str) -> tollgate_sdk::state::Command {
    use tollgate_sdk::state as pb;
    pb::Command {
        kind: Some(pb::command::Kind::Access(pb::AccessCommand {
            tenant: name.into(),
            op: Some(pb::access_command::Op::CreateTenant(pb::CreateTenant {})),
        })),
        ..Default::default()
    }
}

/// Writes a command, retrying (same request id, so it is applied once) while the cluster
/// answers UNAVAILABLE: a leader change on a loaded machine, which callers are expected to
/// ride out. Bounded: 20 attempts over about 10 s.
#[allow(dead_code)] // not every test binary uses it
pub async fn write_retrying(
    client: &mut tollgate_sdk::NodeClient,
    cmd: tollgate_sdk::state::Command,
) -> tollgate_sdk::WriteResponse {
    let mut attempt = 0;
    loop {
        match client.write(cmd.clone()).await {
            Ok(r) => return r,
            Err(e) if e.code() == Some(tonic::Code::Unavailable) && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("write refused: {e}"),
        }
    }
}

/// A webhook receiver on loopback that keeps every JSON body POSTed to it.
#[allow(dead_code)] // not every test binary that includes the harness uses it
pub async fn webhook_sink() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let kept: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let k = kept.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let k = k.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let k = k.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if let Ok(v) = serde_json::from_slice(&body.unwrap_or_default()) {
                            k.lock().unwrap().push(v);
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(full("")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, kept)
}
