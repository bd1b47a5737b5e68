//! A real OpenTelemetry collector for tests: `rotel` (from PyPI, installed into a venv
//! under the target directory on first use), listening for OTLP over gRPC and HTTP on free
//! loopback ports, printing every span it receives (`--debug-log traces`). The spans are
//! read back from that log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One span as the collector received it, with its resource's attributes.
#[derive(Debug, Clone, Default)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub parent_id: String,
    pub id: String,
    pub name: String,
    /// `SPAN_KIND_SERVER`, `SPAN_KIND_CLIENT`, `SPAN_KIND_INTERNAL`...
    pub kind: String,
    pub status: String,
    pub attributes: HashMap<String, String>,
    pub resource: HashMap<String, String>,
}

impl ReceivedSpan {
    pub fn attr(&self, k: &str) -> &str {
        self.attributes.get(k).map(String::as_str).unwrap_or("")
    }
}

/// A running `rotel-agent`, killed when dropped.
pub struct Collector {
    child: Child,
    out: PathBuf,
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `rotel-agent` binary: `TOLLGATE_ROTEL` if set, else from a venv this makes under
/// the target directory (pip from PyPI).
fn rotel_agent() -> PathBuf {
    if let Ok(p) = std::env::var("TOLLGATE_ROTEL") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rotel-venv");
    let find = || {
        std::fs::read_dir(venv.join("lib"))
            .ok()?
            .flatten()
            .map(|d| d.path().join("site-packages/rotel/rotel-agent"))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return p;
    }
    // Test processes run at once and may all get here: each installs into a directory of
    // its own, then renames it into place; the first rename wins and the others use it.
    // (Only the rotel-agent binary is used, so the venv need not stay where it was made.)
    let mine = venv.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&mine);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&mine)
        .status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "python3 -m venv failed: install python3-venv"
    );
    let pip = Command::new(mine.join("bin/pip"))
        .args(["install", "-q", "rotel==0.0.1a15"])
        .status();
    assert!(
        pip.is_ok_and(|s| s.success()),
        "pip could not install rotel from PyPI"
    );
    if std::fs::rename(&mine, &venv).is_err() {
        if find().is_none() {
            // What is there is left from a failed run: replace it.
            let _ = std::fs::remove_dir_all(&venv);
            let _ = std::fs::rename(&mine, &venv);
        }
        let _ = std::fs::remove_dir_all(&mine);
    }
    find().expect("the rotel package ships rotel-agent")
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Collector {
    /// Starts a collector and waits until it takes OTLP over gRPC.
    pub async fn start() -> Collector {
        Collector::launch(true).await
    }

    /// A collector that receives and drops spans without printing them (for benchmarks,
    /// where printing would cost more than receiving).
    #[allow(dead_code)] // used by benches/telemetry.rs, not by every test binary
    pub async fn start_quiet() -> Collector {
        Collector::launch(false).await
    }

    async fn launch(print: bool) -> Collector {
        let agent = tokio::task::spawn_blocking(rotel_agent).await.unwrap();
        let dir = super::test_dir();
        let out = dir.join("rotel.out");
        let (grpc, http) = (free_port(), free_port());
        let mut cmd = Command::new(&agent);
        cmd.args(["start", "--otlp-grpc-endpoint", &grpc.to_string()])
            .args(["--otlp-http-endpoint", &http.to_string()])
            .args(["--exporter", "blackhole"]);
        if print {
            cmd.args(["--debug-log", "traces", "--debug-log-verbosity", "detailed"]);
        }
        let child = cmd
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("rotel.err")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("start rotel-agent");
        let c = Collector {
            child,
            out,
            grpc,
            http,
        };
        super::eventually("rotel to listen", Duration::from_secs(20), async || {
            tokio::net::TcpStream::connect(c.grpc).await.is_ok()
                && tokio::net::TcpStream::connect(c.http).await.is_ok()
        })
        .await;
        c
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    #[allow(dead_code)] // used by benches/telemetry.rs
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the collector (kill -9) to see what a node does without one.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        parse(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }

    /// Waits until `cond` holds for the spans received, and returns them.
    pub async fn wait_for(
        &self,
        what: &str,
        mut cond: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if cond(&spans) {
                return spans;
            }
            if std::time::Instant::now() > deadline {
                let names: Vec<_> = spans
                    .iter()
                    .map(|s| format!("{} {} {}", s.trace_id, s.kind, s.name))
                    .collect();
                panic!("the collector did not get {what} within 20s; it has:\n{names:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Reads rotel's detailed debug log: `ResourceSpans #n` blocks with `Resource attributes:`
/// and `Span #n` entries (`Trace ID : ...`, `Attributes:` with `-> key: Type(value)` lines).
fn parse(text: &str) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    let mut resource: HashMap<String, String> = HashMap::new();
    let mut current: Option<ReceivedSpan> = None;
    let mut in_resource = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            resource.clear();
            in_resource = false;
        } else if t == "Resource attributes:" {
            in_resource = true;
        } else if t.starts_with("ScopeSpans #") {
            in_resource = false;
        } else if t.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(ReceivedSpan {
                resource: resource.clone(),
                ..Default::default()
            });
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            // `Str(x)`, `Int(5)`: keep what is inside the parentheses.
            let v = v
                .split_once('(')
                .map(|(_, rest)| rest.strip_suffix(')').unwrap_or(rest))
                .unwrap_or(v);
            if in_resource {
                resource.insert(k.to_string(), v.to_string());
            } else if let Some(s) = current.as_mut() {
                s.attributes.insert(k.to_string(), v.to_string());
            }
        } else if let (Some(s), Some((k, v))) = (current.as_mut(), t.split_once(':')) {
            let v = v.trim().to_string();
            match k.trim() {
                "Trace ID" => s.trace_id = v,
                "Parent ID" => s.parent_id = v,
                "ID" => s.id = v,
                "Name" => s.name = v,
                "Kind" => s.kind = v,
                "Status code" => s.status = v,
                _ => {}
            }
        }
    }
    spans.extend(current);
    spans
}
