//! The LLM side of the harness: the demo LLM provider (`tollgate llm-demo`) as a process,
//! a Python with the official `openai` and `anthropic` SDKs, and an LLM API published
//! through the control plane.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::GatewayProcess;
use super::cp::CpProcess;

/// A `tollgate llm-demo` process, killed when dropped.
pub struct LlmDemo {
    child: Child,
    pub addr: SocketAddr,
}

impl LlmDemo {
    pub fn start() -> LlmDemo {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> LlmDemo {
        Self::start_at("127.0.0.1:0", extra)
    }

    /// On a given address (a provider that comes back where it was).
    pub fn start_at(listen: &str, extra: &[&str]) -> LlmDemo {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["llm-demo", "--listen", listen, "--threads", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("llm-demo printed {line:?}"));
        LlmDemo { child, addr }
    }

    /// `GET /_demo/<what>` as JSON.
    pub fn get(&self, what: &str) -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{}/_demo/{what}", self.addr)])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn stats(&self) -> serde_json::Value {
        self.get("stats")
    }

    /// What each request was told it used.
    pub fn log(&self) -> Vec<serde_json::Value> {
        self.get("log").as_array().cloned().unwrap_or_default()
    }

    /// The next `count` requests answer `status`.
    pub fn fail_next(&self, count: u64, status: u16) {
        let body = serde_json::json!({"count": count, "status": status}).to_string();
        let ok = Command::new("curl")
            .args([
                "-s",
                "-X",
                "POST",
                "-d",
                &body,
                &format!("http://{}/_demo/fail", self.addr),
            ])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Providers of every kind at this demo (for a version's content).
    pub fn providers(&self) -> String {
        let a = self.addr;
        format!(
            "providers:\n  oai: {{ kind: openai, base_url: \"http://{a}/v1\" }}\n  \
             azure: {{ kind: azure_openai, base_url: \"http://{a}/openai\", api_version: \"2024-10-21\" }}\n  \
             claude: {{ kind: anthropic, base_url: \"http://{a}\" }}\n  \
             gem: {{ kind: gemini, base_url: \"http://{a}/v1beta\" }}\n"
        )
    }
}

impl Drop for LlmDemo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python with the official SDKs: `TOLLGATE_LLM_PYTHON` if set, else a venv this makes
/// under the target directory (pip from PyPI), once for every test process.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("TOLLGATE_LLM_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("llm-sdk-venv");
    let python = venv.join("bin/python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai, anthropic"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&python) {
        return python;
    }
    // Tests run in parallel processes: one makes the venv, the others wait for it.
    let lock = venv.with_extension("lock");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if std::fs::create_dir(&lock).is_ok() {
            break;
        }
        if ready(&python) {
            return python;
        }
        assert!(
            Instant::now() < deadline,
            "waited 10 min for {}",
            venv.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let made = (|| {
        if ready(&python) {
            return true;
        }
        let _ = std::fs::remove_dir_all(&venv);
        Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "openai", "anthropic"])
                .status()
                .is_ok_and(|s| s.success())
    })();
    let _ = std::fs::remove_dir(&lock);
    assert!(
        made,
        "could not make a venv with openai and anthropic from PyPI"
    );
    python
}

/// Runs a case of `tests/llm_sdk.py` against `base` (the API's URL) with `key`; panics
/// with its output unless it exits 0. Returns its standard output.
pub async fn sdk_case(case: &str, base: &str, key: &str, env: &[(&str, &str)]) -> String {
    let (case, base, key) = (case.to_string(), base.to_string(), key.to_string());
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || run_case(&case, &base, &key, &env))
        .await
        .unwrap()
}

fn run_case(case: &str, base: &str, key: &str, env: &[(String, String)]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/llm_sdk.py");
    let dir = std::env::temp_dir();
    let id = format!("{}-{case}-{}", std::process::id(), fastrand_id());
    let (out_path, err_path) = (
        dir.join(format!("llm-{id}.out")),
        dir.join(format!("llm-{id}.err")),
    );
    let mut child = Command::new(python())
        .arg(script)
        .arg(case)
        .env("BASE", base)
        .env("KEY", key)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    assert!(
        status.is_some_and(|s| s.success()),
        "case {case} failed ({status:?}; none: it ran past 120 s):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    stdout
}

fn fastrand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Tenant `acme` owns API `llm` at `/llm`; version 1.0.0 has `content` and takes all
/// traffic. Returns the control plane and an API key of acme's.
pub async fn llm_api(gw: &GatewayProcess, content: &str) -> (CpProcess, String) {
    let cpp = CpProcess::start(&[gw.grpc]).await;
    let cp = cpp.sdk(gw.operator_token());
    cp.create_tenant("acme").await.unwrap();
    cp.create_api(
        "llm",
        "acme",
        Some(tollgate_sdk::state::ApiSettings {
            base_path: "/llm".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    cp.create_version("llm", "1.0.0", content).await.unwrap();
    cp.publish("llm", "1.0.0").await.unwrap();
    cp.set_split("llm", &[("1.0.0", 100)]).await.unwrap();
    let key = cp.create_key("acme", "test", "").await.unwrap().secret;
    // Served once applied; one request tells.
    wait_served(gw, &[gw.proxy], &key).await;
    (cpp, key)
}

impl LlmDemo {
    /// Answers the next requests with these bytes: each `(status, pieces, delay_ms)`.
    pub fn script(&self, answers: &[(u16, Vec<String>, u64)]) {
        let body: Vec<serde_json::Value> = answers
            .iter()
            .map(|(status, pieces, delay)| {
                serde_json::json!({"status": status, "pieces": pieces, "delay_ms": delay})
            })
            .collect();
        let ok = Command::new("curl")
            .args([
                "-s",
                "-X",
                "POST",
                "-d",
                &serde_json::Value::Array(body).to_string(),
                &format!("http://{}/_demo/script", self.addr),
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// The requests it received (path, query, body), oldest first.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.get("requests").as_array().cloned().unwrap_or_default()
    }
}

/// One SSE event, as a scripted piece.
pub fn sse(event: Option<&str>, data: serde_json::Value) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

/// A streamed answer as the client saw it: status, headers, and each piece of the body
/// with when it arrived (from when the request was sent).
pub struct Streamed {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub pieces: Vec<(Duration, bytes::Bytes)>,
    /// The body ended with an error (not a clean end).
    pub body_error: bool,
}

impl Streamed {
    pub fn text(&self) -> String {
        self.pieces
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    /// The `data:` payloads, in order.
    pub fn data(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    /// The JSON payloads (not `[DONE]`).
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.data()
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }
}

/// POSTs `body` to `path` on `gw` with `headers` and reads the answer piece by piece.
pub async fn stream(
    gw: &GatewayProcess,
    path: &str,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> Streamed {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(path).header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(super::full(body.to_string())).unwrap();
    let sent = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut pieces = Vec::new();
    let mut body_error = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Err(_) => panic!("the stream stalled for 30 s"),
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                body_error = true;
                break;
            }
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    pieces.push((sent.elapsed(), d));
                }
            }
        }
    }
    Streamed {
        status,
        headers,
        pieces,
        body_error,
    }
}

/// The node's usage rows for LLM requests (model non-empty), once metered.
pub async fn llm_rows(gw: &GatewayProcess) -> Vec<tollgate_proto::state::v1::UsageEntry> {
    let mut sdk = gw.sdk().await;
    let resp = sdk
        .usage(tollgate_proto::node::v1::UsageRequest {
            since_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    resp.entries
        .into_iter()
        .filter(|e| !e.model.is_empty())
        .collect()
}

/// Waits until each of `proxies` (nodes' proxy addresses) serves the LLM API at `/llm`
/// to `key`, asking through `gw`'s client.
pub async fn wait_served(gw: &GatewayProcess, proxies: &[SocketAddr], key: &str) {
    for p in proxies {
        super::eventually(
            "every node serves the API",
            Duration::from_secs(20),
            async || {
                let r = gw
                    .send(
                        http::Request::get(format!("http://{p}/llm/v1/models"))
                            .header("authorization", format!("Bearer {key}"))
                            .body(super::full(""))
                            .unwrap(),
                    )
                    .await;
                r.status == 200
            },
        )
        .await;
    }
}

/// A plain HTTP/1.1 client, for many requests and streams at once.
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    super::Body,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}
