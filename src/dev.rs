//! `tollgate dev`: one process with a gateway node bootstrapped as a single-node cluster
//! (state in `./tollgate-data`, kept across restarts), a demo upstream (the echo server)
//! and a sample spec applied on first start. Prints what to try.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use tollgate_node::Node;
use tollgate_node::config::{LogFormat, Settings};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    proxy_addr: SocketAddr,
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
/// header transforms.
fn sample_spec(echo: SocketAddr) -> String {
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
"#
    )
}

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
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        access_log: args.access_log.clone(),
        bootstrap: true,
        traces,
        environment: "dev".into(),
        ..Settings::default()
    };
    tollgate_node::start_traces(&settings)?;
    tollgate_node::telemetry::logging::init(LogFormat::Text);
    let metrics = tollgate_node::telemetry::metrics::install()?;
    std::fs::create_dir_all(&args.data_dir)?;
    let echo = crate::echo::spawn(args.echo_addr)?;
    let spec_path = args.data_dir.join("dev-spec.yaml");
    if !spec_path.exists() {
        std::fs::write(&spec_path, sample_spec(echo))?;
    }

    let settings = Settings {
        spec: Some(spec_path.clone()),
        ..settings
    };
    let token_file = args.data_dir.join(tollgate_node::OPERATOR_TOKEN_FILE);
    let had_token = token_file.exists();
    let node = Node::start(settings, metrics)?;
    let a = node.addrs();
    let token = match (had_token, std::fs::read_to_string(&token_file)) {
        (false, Ok(t)) => format!(
            "{}\n               shown this once; also in {} (delete it when you have kept it)",
            t.trim(),
            token_file.display()
        ),
        _ => format!(
            "made on the first start (it was written to {}); the cluster keeps only its hash",
            token_file.display()
        ),
    };
    // The control plane, in this process, talking to this node.
    let cp_args = tollgate_control_plane::CpArgs {
        listen: args.cp_addr,
        nodes: vec![a.grpc.to_string()],
        addr_file: None,
        // The node's export serves this process's control plane too.
        otlp_endpoint: None,
        otlp_protocol: None,
        trace_sample_ratio: None,
        environment: "dev".into(),
    };
    std::thread::Builder::new()
        .name("tollgate-cp".into())
        .spawn(move || {
            if let Err(e) = tollgate_control_plane::run(cp_args) {
                tracing::error!("the control plane stopped: {e:#}");
            }
        })?;
    eprintln!(
        r#"
Tollgate dev is running (pid {pid}): a single-node cluster with its state in {data}.

  proxy        http://{proxy}   (HTTP/1.1 and h2c)
  admin        http://{admin}/healthz  /readyz  /metrics
  node gRPC    {grpc}
  control plane {cp}   (gRPC: tollgate.cp.v1 ApiLifecycle, Access, Audit; health, reflection)
  operator token {token}
  demo echo    http://{echo}   (answers with what it received, as JSON)
  spec         {spec}

Try:
  curl -s http://{proxy}/echo/hello
  curl -s http://{proxy}/api/users/42       # the template route: path unchanged
  curl -s http://{proxy}/api/orders/7       # the /api prefix route: goes up as /v1/orders/7
  curl -s -X POST http://{proxy}/api/orders -H 'content-type: application/json' -d '{{"item": "tea"}}'
  curl -s http://{proxy}/nowhere            # a JSON 404
  curl -s http://{admin}/metrics | grep tollgate_requests_total

  tollgate cluster status --node {grpc}
  export TOLLGATE_TOKEN=<the operator token>
  tollgate tenant create acme && tollgate api create orders --tenant acme --base-path /orders
  tollgate key create --tenant acme         # an API key for the data plane, shown once
Edit the spec and apply it: tollgate apply -f {spec} --node {grpc}   (add --dry-run to see the plan)
Docs: README.md, docs/spec.md (every spec field), docs/configuration.md. Ctrl-C stops (after draining).
"#,
        pid = std::process::id(),
        proxy = a.proxy,
        admin = a.admin,
        grpc = a.grpc,
        echo = echo,
        spec = spec_path.display(),
        data = args.data_dir.display(),
        cp = args.cp_addr,
        token = token,
    );
    node.wait()
}
