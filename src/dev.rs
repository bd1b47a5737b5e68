//! `tollgate dev`: one process with a gateway node bootstrapped as a single-node cluster
//! (state in `./tollgate-data`, kept across restarts), a demo upstream (the echo server)
//! and a sample spec applied on first start. Prints what to try.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use tollgate_node::Node;
use tollgate_node::config::{LogFormat, Settings};
use tollgate_node::telemetry::logging;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    proxy_addr: SocketAddr,
    /// HTTPS proxy listener, with a certificate for `localhost` from a development CA
    /// (written to `<data dir>/dev-ca.pem`).
    #[arg(long, default_value = "127.0.0.1:8443")]
    https_addr: SocketAddr,
    /// Node gRPC listener.
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc_addr: SocketAddr,
    /// HTTP admin listener (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:7071")]
    admin_addr: SocketAddr,
    /// Control-plane gRPC listener (run in this process).
    #[arg(long, default_value = "127.0.0.1:7080")]
    cp_addr: SocketAddr,
    /// Demo upstream listener. A fixed port, so the applied spec still points at it after
    /// a restart.
    #[arg(long, default_value = "127.0.0.1:7090")]
    echo_addr: SocketAddr,
    /// Demo LLM upstream listener (the OpenAI, Anthropic and Gemini wire formats), behind
    /// the sample LLM API `ai` at /ai. A fixed port, like the echo server's.
    #[arg(long, default_value = "127.0.0.1:7091")]
    llm_addr: SocketAddr,
    /// Where the node keeps its state and the sample spec.
    #[arg(long, default_value = "./tollgate-data")]
    data_dir: PathBuf,
    /// Access log: `stdout`, `off` or a file path.
    #[arg(long, default_value = "stdout")]
    access_log: String,
    /// Export traces over OTLP to this collector, e.g. `http://127.0.0.1:4317` (the
    /// `OTEL_*` variables work too).
    #[arg(long, env = "TOLLGATE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// The sample spec: three routes onto the echo server that show matching, rewrites and
/// header transforms, and the development certificate for `localhost` (`chain`, PEM).
fn sample_spec(echo: SocketAddr, chain: &str) -> String {
    let chain = chain
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect::<String>();
    format!(
        r#"# Tollgate sample spec, written by `tollgate dev` and applied on its first start.
# Edit it, then apply it with
#   tollgate apply -f tollgate-data/dev-spec.yaml
# Every field is described in docs/spec.md.
upstreams:
  echo:
    endpoints:
      - address: {echo}
    health_check:
      path: /healthz
      interval: 5s
      timeout: 1s
    retries:
      attempts: 2
      on: [connect_failure, "503"]

routes:
  # GET /echo/anything -> the echo server, path unchanged.
  echo:
    match:
      path: {{ prefix: /echo }}
    upstream: echo
    response_headers:
      set: {{ x-served-by: tollgate-dev }}

  # /api/orders -> /v1/orders upstream, with a header added.
  api:
    match:
      path: {{ prefix: /api }}
      methods: [GET, POST, PUT, DELETE]
    upstream: echo
    rewrite: {{ replace_prefix: /v1 }}
    request_headers:
      set: {{ x-tollgate-route: api }}

  # A template route: /api/users/{{id}} (any id) is more specific than the /api prefix,
  # so GET /api/users/42 comes here and goes up unchanged.
  user:
    match:
      path: {{ template: "/api/users/{{id}}" }}
      methods: [GET]
    upstream: echo
    request_headers:
      set: {{ x-tollgate-route: user }}

# Where tenants' API versions may send requests (docs/security.md). Loopback is closed to
# them by default; this dev box runs its demo upstream (and the README tour's API) on
# 127.0.0.1, so loopback is opened here. The node's own ports stay closed whatever this says.
tenant_upstreams:
  allow: [127.0.0.0/8, "::1"]

# HTTPS on the proxy (docs/tls.md): a certificate for localhost from this dev box's own CA
# ({DEV_CA_FILE} beside this file). Its private key is the sealed secret {DEV_KEY_SECRET}.
certificates:
  localhost:
    key_secret: {DEV_KEY_SECRET}
    default: true
    chain: |
{chain}"#
    )
}

/// The development CA's certificate, in the data directory.
const DEV_CA_FILE: &str = "dev-ca.pem";
/// The named secret that holds the `localhost` certificate's key.
const DEV_KEY_SECRET: &str = "dev-localhost-key";

/// A development CA and a certificate it signs for localhost (valid for ten years): the CA
/// is written to `ca_path`, the certificate goes into the sample spec, and its key into the
/// cluster as a sealed secret. The CA's own key is thrown away.
fn dev_certificate(ca_path: &Path) -> anyhow::Result<tollgate_node::identity::ca::EdgeCert> {
    use tollgate_node::identity::ca::EdgeCa;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let ca = EdgeCa::generate("Tollgate dev CA", now).map_err(|e| anyhow::anyhow!(e))?;
    let ten_years = 10 * 365 * 24 * 3600 * 1000;
    let cert = ca
        .issue(
            &["localhost", "127.0.0.1", "::1"],
            now - 3600 * 1000,
            now + ten_years,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
    std::fs::write(ca_path, &ca.cert_pem)?;
    Ok(cert)
}

/// The tour's version content (README.md step 5), written beside the spec so the
/// banner's commands work from any directory. Its echo address follows `--echo-addr`.
const ORDERS_V1: &str = include_str!("../docs/examples/orders-v1.yaml");

/// The tenant and API the banner's hints make: not the README's `acme` and `orders`, so the
/// hints and the README's tour work in either order on the same `dev`.
const TOUR_TENANT: &str = "demo";
const TOUR_API: &str = "demo";

/// The sample LLM API (docs/examples/llm-v1.yaml, against the demo LLM upstream), its
/// tenant, and the file that keeps its API key for the banner (readable by you only).
const LLM_V1: &str = include_str!("../docs/examples/llm-v1.yaml");
const LLM_TENANT: &str = "ai";
const LLM_API: &str = "ai";
const LLM_KEY_FILE: &str = "ai-api-key";

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let traces = tollgate_node::telemetry::traces::resolve(
        &tollgate_node::telemetry::traces::TraceArgs {
            endpoint: args.otlp_endpoint.clone(),
            ..Default::default()
        },
        &|k| std::env::var(k).ok(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let settings = Settings {
        data_dir: args.data_dir.clone(),
        proxy_addr: args.proxy_addr,
        https_addr: Some(args.https_addr),
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        access_log: args.access_log.clone(),
        bootstrap: true,
        traces,
        environment: "dev".into(),
        ..Settings::default()
    };
    tollgate_node::start_traces(&settings)?;
    logging::init(LogFormat::Text, logging::DEV_DEFAULT);
    let metrics = tollgate_node::telemetry::metrics::install()?;
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the data directory {} ({e}); choose another with --data-dir",
            args.data_dir.display()
        )
    })?;
    let spec_path = args.data_dir.join("dev-spec.yaml");
    let ca_path = args.data_dir.join(DEV_CA_FILE);
    let mut bootstrap_secrets = Vec::new();
    if !spec_path.exists() {
        let cert = dev_certificate(&ca_path)?;
        std::fs::write(&spec_path, sample_spec(args.echo_addr, &cert.chain_pem))?;
        bootstrap_secrets.push((DEV_KEY_SECRET.to_string(), cert.key_pem.into_bytes()));
    }
    let orders_path = args.data_dir.join("orders-v1.yaml");
    if !orders_path.exists() {
        let content = ORDERS_V1.replace("127.0.0.1:7090", &args.echo_addr.to_string());
        std::fs::write(&orders_path, content)?;
    }
    // Every listener is opened before anything serves, but reported after the node's own
    // start: a second `tollgate dev` on the same data directory is told that first.
    let echo_listener = crate::echo::bind(args.echo_addr, "--echo-addr");
    let llm_listener = std::net::TcpListener::bind(args.llm_addr).map_err(|e| {
        tollgate_node::listen_error("demo LLM upstream", args.llm_addr, "--llm-addr", e)
    });
    let cp_listener = tollgate_control_plane::bind(args.cp_addr, "--cp-addr");
    let settings = Settings {
        spec: Some(spec_path.clone()),
        bootstrap_secrets,
        ..settings
    };
    let token_file = args.data_dir.join(tollgate_node::OPERATOR_TOKEN_FILE);
    let had_token = token_file.exists();
    let node = Node::start(settings, metrics)?;
    let echo = crate::echo::serve(echo_listener?)?;
    let llm_listener = llm_listener?;
    llm_listener.set_nonblocking(true)?;
    let llm = crate::llm_demo::serve(llm_listener, None, 1)?;
    let cp_listener = cp_listener?;
    let cp_addr = cp_listener.local_addr()?;
    let a = node.addrs();
    // The control plane, in this process, talking to this node, with a certificate from
    // the cluster CA.
    let (cert_chain_pem, key_der, ca_pem) =
        node.issue_control_plane_certificate(&[cp_addr.ip().to_string()])?;
    let cp_args = tollgate_control_plane::CpArgs {
        listen: cp_addr,
        nodes: vec![a.grpc.to_string()],
        addr_file: None,
        // The node's export serves this process's control plane too.
        otlp_endpoint: None,
        otlp_protocol: None,
        trace_sample_ratio: None,
        environment: "dev".into(),
        join_token: None,
        join_token_file: None,
        cert_names: Vec::new(),
        insecure: false,
        identity: Some(tollgate_control_plane::CpIdentity {
            cert_chain_pem,
            key_der,
            ca_pem,
        }),
    };
    std::thread::Builder::new()
        .name("tollgate-cp".into())
        .spawn(move || {
            if let Err(e) = tollgate_control_plane::run_on(cp_args, cp_listener) {
                tracing::error!("the control plane stopped: {e:#}");
            }
        })?;
    let llm_key = sample_llm_api(&args.data_dir, cp_addr, &token_file, llm)?;
    let tour = node.read_state(|s| Tour {
        tenant: s.access.tenants.contains_key(TOUR_TENANT),
        api: s.apis.contains_key(TOUR_API),
        version: s
            .apis
            .get(TOUR_API)
            .is_some_and(|a| a.versions.keys().any(|v| v.major == 1)),
    });
    let banner = Banner {
        data: &args.data_dir,
        proxy: a.proxy,
        https: a.https,
        ca: &ca_path,
        admin: a.admin,
        grpc: a.grpc,
        cp: cp_addr,
        echo,
        llm,
        llm_key,
        spec: &spec_path,
        orders: &orders_path,
        token_file: &token_file,
        new_token: if had_token {
            None
        } else {
            std::fs::read_to_string(&token_file).ok()
        },
        tour,
    };
    eprint!("{}", banner.render());
    node.wait()
}

/// What the tour has already done in this data directory (so a restart does not suggest
/// commands that would now fail, like creating a tenant that exists).
struct Tour {
    tenant: bool,
    api: bool,
    version: bool,
}

/// Publishes the sample LLM API on the first start (tenant `ai`, API `ai` at /ai, the demo
/// LLM upstream behind it) and makes it an API key, kept in the data directory. Returns
/// the key (None when it could not be made; the banner then leaves the LLM lines out).
fn sample_llm_api(
    data: &Path,
    cp: SocketAddr,
    token_file: &Path,
    llm: SocketAddr,
) -> anyhow::Result<Option<String>> {
    let key_file = data.join(LLM_KEY_FILE);
    if let Ok(key) = std::fs::read_to_string(&key_file) {
        return Ok(Some(key.trim().to_string()));
    }
    let Ok(token) = std::fs::read_to_string(token_file) else {
        return Ok(None);
    };
    let ca = std::fs::read_to_string(data.join("cluster-ca.pem"))?;
    let content = LLM_V1.replace("127.0.0.1:7091", &llm.to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let made = rt.block_on(async {
        let c = tollgate_sdk::ControlPlaneClient::new(
            &[&cp.to_string()],
            &tollgate_sdk::Tls::ca_pem(&ca),
        )?
        .with_token(token.trim())?;
        // The control plane is starting beside us: give it a few seconds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match c.create_tenant(LLM_TENANT).await {
                Ok(_) => break,
                Err(e) if e.to_string().contains("exists") => break,
                Err(e) if std::time::Instant::now() > deadline => return Err(anyhow::anyhow!(e)),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
        let settings = tollgate_sdk::state::ApiSettings {
            base_path: format!("/{LLM_API}"),
            ..Default::default()
        };
        if let Err(e) = c.create_api(LLM_API, LLM_TENANT, Some(settings)).await
            && !e.to_string().contains("exists")
        {
            return Err(anyhow::anyhow!(e));
        }
        c.create_version(LLM_API, "1.0.0", &content).await?;
        c.publish(LLM_API, "1.0.0").await?;
        c.set_split(LLM_API, &[("1.0.0", 100)]).await?;
        let key = c.create_key(LLM_TENANT, "dev", "").await?.secret;
        anyhow::Ok(key)
    });
    match made {
        Ok(key) => {
            write_private(&key_file, &key)?;
            Ok(Some(key))
        }
        Err(e) => {
            tracing::warn!("the sample LLM API could not be set up: {e:#}");
            Ok(None)
        }
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}

struct Banner<'a> {
    data: &'a Path,
    proxy: SocketAddr,
    https: Option<SocketAddr>,
    /// The development CA's certificate.
    ca: &'a Path,
    admin: SocketAddr,
    grpc: SocketAddr,
    cp: SocketAddr,
    echo: SocketAddr,
    /// The demo LLM upstream, and the sample LLM API's key.
    llm: SocketAddr,
    llm_key: Option<String>,
    spec: &'a Path,
    orders: &'a Path,
    token_file: &'a Path,
    /// The operator token, when this start made it.
    new_token: Option<String>,
    tour: Tour,
}

/// A path as a shell reads it back: absolute, quoted when it needs to be.
fn shell_path(p: &Path) -> String {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let text = abs.display().to_string();
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@".contains(&b));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

impl Banner<'_> {
    fn render(&self) -> String {
        use std::fmt::Write;
        let node_services = short_names(&tollgate_node::admin::grpc::SERVICES);
        let cp_services = short_names(&tollgate_control_plane::SERVICES);
        let standard = "health, reflection";
        let token = match &self.new_token {
            Some(t) => format!(
                "{}   (made now; also in {})",
                t.trim(),
                shell_path(self.token_file)
            ),
            None if self.token_file.exists() => {
                format!("in {}", shell_path(self.token_file))
            }
            None => "shown on the first start (its file has been deleted)".into(),
        };
        let rows = [
            (
                "proxy",
                format!("http://{}", self.proxy),
                "HTTP/1.1 and h2c".to_string(),
            ),
            (
                "https",
                self.https
                    .map(|a| format!("https://localhost:{}", a.port()))
                    .unwrap_or_default(),
                "HTTP/1.1 and h2 (ALPN); a dev CA signs its certificate".to_string(),
            ),
            (
                "admin",
                format!("http://{}", self.admin),
                "/healthz /readyz /metrics".into(),
            ),
            (
                "node gRPC",
                self.grpc.to_string(),
                format!("{node_services}; {standard}"),
            ),
            (
                "control plane",
                self.cp.to_string(),
                format!("gRPC {cp_services}; {standard}"),
            ),
            (
                "demo echo",
                format!("http://{}", self.echo),
                "answers with what it received, as JSON".into(),
            ),
            (
                "demo LLM",
                format!("http://{}", self.llm),
                "OpenAI, Anthropic and Gemini formats; behind the API at /ai".into(),
            ),
        ];
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nTollgate dev is running (pid {}): a single-node cluster with its state in {}.\n",
            std::process::id(),
            shell_path(self.data)
        );
        for (name, addr, what) in &rows {
            let _ = writeln!(out, "  {name:<15}{addr:<28}{what}");
        }
        let _ = writeln!(out, "  {:<15}{}", "spec", shell_path(self.spec));
        let _ = writeln!(out, "  {:<15}{token}", "operator token");

        let proxy = self.proxy;
        let mut tryit = vec![
            format!("curl -s http://{proxy}/echo/hello"),
            format!(
                "curl -s http://{proxy}/api/users/42        # the template route: path unchanged"
            ),
            format!(
                "curl -s http://{proxy}/api/orders/7        # the /api prefix route: goes up as /v1/orders/7"
            ),
            format!("curl -s http://{proxy}/nowhere             # a JSON 404"),
        ];
        if let Some(https) = self.https {
            tryit.push(format!(
                "curl -s --cacert {} https://localhost:{}/echo/hello   # over HTTPS",
                shell_path(self.ca),
                https.port()
            ));
        }
        tryit.extend([format!(
            "curl -s http://{}/metrics | grep tollgate_requests_total",
            self.admin
        )]);
        // The CLI: this binary, the token, and the addresses when they are not the defaults.
        let bin = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(shell_path))
            .unwrap_or_else(|| "target/release".into());
        let mut env = format!("export PATH={bin}:\"$PATH\"");
        if self.token_file.exists() {
            env.push_str(&format!(
                " TOLLGATE_TOKEN=\"$(cat {})\"",
                shell_path(self.token_file)
            ));
        }
        if self.grpc.to_string() != tollgate_sdk::Server::Node.default_addr() {
            env.push_str(&format!(" TOLLGATE_NODE={}", self.grpc));
        }
        if self.cp.to_string() != tollgate_sdk::Server::ControlPlane.default_addr() {
            env.push_str(&format!(" TOLLGATE_CP={}", self.cp));
        }
        tryit.push(String::new());
        tryit.push(env);
        tryit.push("tollgate cluster status".into());
        tryit.push(format!(
            "tollgate apply -f {} --dry-run      # edit the spec, then apply without --dry-run",
            shell_path(self.spec)
        ));
        if !self.tour.tenant {
            tryit.push(format!("tollgate tenant create {TOUR_TENANT}"));
        }
        if !self.tour.api {
            tryit.push(format!(
                "tollgate api create {TOUR_API} --tenant {TOUR_TENANT} --base-path /{TOUR_API}"
            ));
        }
        if !self.tour.version {
            tryit.push(format!(
                "tollgate version create {TOUR_API} 1.0.0 -f {}",
                shell_path(self.orders)
            ));
            tryit.push(format!(
                "tollgate version publish {TOUR_API} 1.0.0 && tollgate api promote {TOUR_API} 1.0.0"
            ));
        }
        tryit.push(format!(
            "KEY=$(tollgate key create --tenant {TOUR_TENANT} --quiet)   # an API key, shown once"
        ));
        tryit.push(format!(
            "curl -s http://{proxy}/{TOUR_API}/v1/hello -H \"x-api-key: $KEY\""
        ));
        if let Some(key) = &self.llm_key {
            // The LLM API, as the official SDKs see it: these two lines are all they need.
            tryit.push(String::new());
            tryit.push(format!(
                "export OPENAI_BASE_URL=http://{proxy}/{LLM_API}/v1 OPENAI_API_KEY={key}"
            ));
            tryit.push(format!(
                "export ANTHROPIC_BASE_URL=http://{proxy}/{LLM_API} ANTHROPIC_API_KEY={key}"
            ));
            tryit.push(
                "curl -s $OPENAI_BASE_URL/chat/completions -H \"authorization: Bearer $OPENAI_API_KEY\" -d '{\"model\":\"demo-chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}'"
                .to_string(),
            );
            tryit.push(
                "python3 -m venv /tmp/tollgate-sdk && /tmp/tollgate-sdk/bin/pip install -q openai anthropic   # the official SDKs"
                    .into(),
            );
            tryit.push(
                "/tmp/tollgate-sdk/bin/python -c 'from openai import OpenAI; print(OpenAI().chat.completions.create(model=\"demo-chat\", messages=[{\"role\": \"user\", \"content\": \"hello\"}]).choices[0].message.content)'"
                    .into(),
            );
            tryit.push(
                "/tmp/tollgate-sdk/bin/python -c 'import anthropic; print(anthropic.Anthropic().messages.create(model=\"demo-claude\", max_tokens=64, messages=[{\"role\": \"user\", \"content\": \"hello\"}]).content[0].text)'"
                    .into(),
            );
            tryit.push("tollgate models list".into());
        }
        let _ = writeln!(out, "\nTry, in another shell:");
        for line in tryit {
            if line.is_empty() {
                out.push('\n');
            } else {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(
            out,
            "\nLogs: warnings and errors only (RUST_LOG=info shows more); the access log goes to stdout.\n\
             Docs: README.md and docs/. Ctrl-C stops (after draining).\n"
        );
        out
    }
}

/// `tollgate.cp.v1.ApiLifecycle` -> `ApiLifecycle`, joined.
fn short_names(services: &[&str]) -> String {
    services
        .iter()
        .map(|s| s.rsplit('.').next().unwrap_or(s))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The banner at the default addresses, for a data directory in the state `tour` says.
    fn render(dir: &Path, token_file: &str, new_token: Option<&str>, tour: Tour) -> String {
        Banner {
            data: dir,
            proxy: "127.0.0.1:8080".parse().unwrap(),
            https: Some("127.0.0.1:8443".parse().unwrap()),
            ca: &dir.join("dev-ca.pem"),
            admin: "127.0.0.1:7071".parse().unwrap(),
            grpc: "127.0.0.1:7070".parse().unwrap(),
            cp: "127.0.0.1:7080".parse().unwrap(),
            echo: "127.0.0.1:7090".parse().unwrap(),
            llm: "127.0.0.1:7091".parse().unwrap(),
            llm_key: Some("tgk_ai_key".into()),
            spec: &dir.join("dev-spec.yaml"),
            orders: &dir.join("orders-v1.yaml"),
            token_file: &dir.join(token_file),
            new_token: new_token.map(str::to_string),
            tour,
        }
        .render()
    }

    #[test]
    fn the_banner_names_every_service_the_servers_register() {
        let none_done = Tour {
            tenant: false,
            api: false,
            version: false,
        };
        let banner = render(
            &std::env::temp_dir(),
            "operator-token",
            Some("tgt_x_y"),
            none_done,
        );
        for service in tollgate_control_plane::SERVICES
            .iter()
            .chain(&tollgate_node::admin::grpc::SERVICES)
        {
            let short = service.rsplit('.').next().unwrap();
            assert!(banner.contains(short), "{short} missing from:\n{banner}");
        }
        assert!(banner.contains("tgt_x_y"));
        assert!(
            banner.contains(
                "export OPENAI_BASE_URL=http://127.0.0.1:8080/ai/v1 OPENAI_API_KEY=tgk_ai_key"
            ),
            "{banner}"
        );
        assert!(
            banner.contains(
                "export ANTHROPIC_BASE_URL=http://127.0.0.1:8080/ai ANTHROPIC_API_KEY=tgk_ai_key"
            ),
            "{banner}"
        );
        assert!(banner.contains("tollgate tenant create demo"));
        assert!(banner.contains("--cacert"), "{banner}");
        assert!(
            banner.contains("https://localhost:8443/echo/hello"),
            "{banner}"
        );
    }

    #[test]
    fn after_the_tour_a_restart_does_not_suggest_creating_what_exists() {
        let all_done = Tour {
            tenant: true,
            api: true,
            version: true,
        };
        let banner = render(&std::env::temp_dir(), "no-such-token-file", None, all_done);
        assert!(!banner.contains("tenant create"), "{banner}");
        assert!(!banner.contains("api create"), "{banner}");
        assert!(!banner.contains("version create"), "{banner}");
        assert!(banner.contains("key create --tenant demo"), "{banner}");
    }

    #[test]
    fn paths_are_quoted_for_the_shell_when_they_need_it() {
        assert_eq!(shell_path(Path::new("/tmp/a-b_c.d")), "/tmp/a-b_c.d");
        assert_eq!(shell_path(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(shell_path(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }
}
