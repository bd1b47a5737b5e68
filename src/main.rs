//! `tollgate`: the command-line tool. `tollgate dev` runs a whole gateway in one process;
//! `tollgate node` runs a gateway node; `tollgate validate` checks a spec file;
//! `tollgate apply` and `tollgate cluster` talk to a running cluster; `tollgate cp` runs
//! the control plane; `tollgate api|version|tenant|subscription|key|token|audit|plan|budget|
//! usage|costs` talk to it.

mod access;
mod analyze;
mod api;
mod billing;
mod circuit;
mod cluster;
mod declare;
mod dev;
mod echo;
mod llm_demo;
mod logs;
mod report;
mod rollout;
mod secret;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Tollgate: a clustered API and LLM gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway node with a demo upstream and a sample spec, all in this process.
    Dev(dev::DevArgs),
    /// Run a gateway node (the same as the `tollgate-node` binary).
    Node(Box<tollgate_node::config::NodeArgs>),
    /// APIs: create, list, get, split, promote, rollback (through the control plane).
    #[command(subcommand)]
    Api(api::ApiCommand),
    /// API versions: create, edit, publish, deprecate, retire, discard.
    #[command(subcommand)]
    Version(api::VersionCommand),
    /// Tenants and subscriptions: create, delete, list, subscribe, unsubscribe.
    #[command(subcommand)]
    Tenant(access::TenantCommand),
    /// Subscriptions between tenants: list, accept and decline offers and requests.
    #[command(subcommand)]
    Subscription(access::SubscriptionCommand),
    /// Data-plane API keys: create (shown once), list, revoke.
    #[command(subcommand)]
    Key(access::CredentialCommand),
    /// Control-plane tokens scoped to a tenant: create (shown once), list, revoke.
    #[command(subcommand)]
    Token(access::CredentialCommand),
    /// Who changed what and when (with --diff: the object before and after).
    Audit(access::AuditArgs),
    /// Run the control plane (the same as the `tollgate-cp` binary).
    Cp(tollgate_control_plane::CpArgs),
    /// Apply a spec to the cluster: prints the plan and the generation committed.
    Apply(cluster::ApplyArgs),
    /// Cluster membership: status, remove.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Secrets sealed in the cluster's state: keygen, set, list, delete, rotate.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Upstreams' cluster-wide circuit breakers: list, open, close, auto.
    #[command(subcommand)]
    Circuit(circuit::CircuitCommand),
    /// LLM models and their deployments: calls, errors, time to first token, tokens.
    #[command(subcommand)]
    Models(billing::ModelsCommand),
    /// Requests, status classes, bytes and upstream time per tenant, API, version or key.
    Usage(billing::ReportArgs),
    /// What usage costs per tenant, API, version or key, at the prices it was billed at.
    Costs(billing::CostsArgs),
    /// Every call the nodes served, searchable: by time, API, version, tenant, key, status,
    /// error, trace or request id, duration; --slowest N; --follow.
    Logs(logs::LogsArgs),
    /// Requests, errors, latency, tokens and cost per API, version, key, tenant or model
    /// over a range, bucket by bucket, against a baseline.
    Analyze(analyze::AnalyzeArgs),
    /// Canary rollouts judged by the cluster: start, status (--watch), pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// The hypercare report: rollouts and their verdicts, per-version figures, top errors,
    /// slowest routes, cost per tenant and model, alerts; Markdown or HTML.
    Report(report::ReportArgs),
    /// Plans and their prices: put, list, assign a tenant.
    #[command(subcommand)]
    Plan(billing::PlanCommand),
    /// Tenants' monthly budgets: set, remove, list.
    #[command(subcommand)]
    Budget(billing::BudgetCommand),
    /// Run only the demo echo upstream (what `dev` starts beside the node), e.g. as a test
    /// upstream in a container; stops on SIGTERM or Ctrl-C.
    Echo {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
    /// Run only the demo LLM upstream (what `dev` starts beside the node): it speaks the
    /// OpenAI, Anthropic and Gemini wire formats, answers deterministically and streams
    /// word by word; stops on SIGTERM or Ctrl-C.
    LlmDemo {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: std::net::SocketAddr,
        /// The API key callers must present (in each format's own header); none: any.
        #[arg(long, env = "TOLLGATE_LLM_DEMO_KEY")]
        api_key: Option<String>,
        /// Threads serving requests.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Check a spec file and list every problem in it (nothing is applied).
    Validate {
        /// The spec file (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

/// A client command whose output goes to a pipe that closed (`... | head`) ends quietly,
/// as other command-line tools do, instead of panicking in println!. SIGPIPE stays
/// ignored: a socket the server closed (a TLS server hanging up on a plain-text client,
/// say) is an error to report, never a reason to die silently.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.is_client() {
        quiet_on_closed_stdout();
    }
    match cli.command {
        Command::Dev(args) => match dev::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate dev: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Node(args) => tollgate_node::run_from_args(*args),
        Command::Cp(args) => {
            if let Err(e) = tollgate_control_plane::start_traces(&args) {
                eprintln!("tollgate cp: {e:#}");
                return ExitCode::from(2);
            }
            tollgate_node::telemetry::logging::init(
                tollgate_node::config::LogFormat::Text,
                tollgate_node::telemetry::logging::NODE_DEFAULT,
            );
            match tollgate_control_plane::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate cp: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Apply(args) => run_client(cluster::apply(args)),
        Command::Usage(args) => run_client(billing::usage(args)),
        Command::Costs(args) => run_client(billing::costs(args)),
        Command::Logs(args) => run_client(logs::logs(args)),
        Command::Analyze(args) => run_client(analyze::analyze(args)),
        Command::Rollout(cmd) => run_client(rollout::rollout(cmd)),
        Command::Report(args) => run_client(report::report(args)),
        Command::Plan(cmd) => run_client(billing::plan(cmd)),
        Command::Budget(cmd) => run_client(billing::budget(cmd)),
        Command::Api(cmd) => run_client(api::api(cmd)),
        Command::Version(cmd) => run_client(api::version(cmd)),
        Command::Cluster(cmd) => run_client(cluster::cluster(cmd)),
        Command::Circuit(cmd) => run_client(circuit::circuit(cmd)),
        Command::Models(cmd) => run_client(billing::models(cmd)),
        Command::Secret(cmd) => run_client(secret::secret(cmd)),
        Command::Tenant(cmd) => run_client(access::tenant(cmd)),
        Command::Subscription(cmd) => run_client(access::subscription(cmd)),
        Command::Key(cmd) => run_client(access::credential("key", cmd)),
        Command::Token(cmd) => run_client(access::credential("token", cmd)),
        Command::Audit(args) => run_client(access::audit(args)),
        Command::Echo { listen } => match echo::spawn(listen) {
            Ok(addr) => {
                println!("echo upstream listening on {addr}");
                wait_for_stop();
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate echo: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::LlmDemo {
            listen,
            api_key,
            threads,
        } => match llm_demo::spawn(listen, api_key, threads) {
            Ok(addr) => {
                println!("demo LLM upstream listening on {addr}");
                wait_for_stop();
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tollgate llm-demo: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Validate { file } => validate(&file),
    }
}

/// Checks a file the way `tollgate apply` reads it: the spec part as a node would, the
/// tenants and APIs as the CLI would.
fn validate(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tollgate validate: cannot read {}: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    let (spec, declared) = match cluster::split_file(&text) {
        Ok(parts) => parts,
        Err(e) => {
            eprintln!("{}: {e:#}", file.display());
            return ExitCode::from(1);
        }
    };
    let spec = match spec.map(|s| tollgate_node::state::spec::Spec::from_yaml(&s)) {
        Some(Err(errors)) => {
            eprintln!("{}: {errors}", file.display());
            return ExitCode::from(1);
        }
        Some(Ok(spec)) => Some(spec),
        None => None,
    };
    let mut parts = Vec::new();
    if let Some(spec) = &spec {
        parts.push(format!(
            "{} routes, {} upstreams",
            spec.routes.len(),
            spec.upstreams.len()
        ));
    }
    if let Some(d) = &declared {
        parts.push(format!(
            "{} tenants, {} APIs",
            d.tenants.len(),
            d.apis.len()
        ));
    }
    println!("{}: valid ({})", file.display(), parts.join("; "));
    ExitCode::SUCCESS
}

impl Command {
    /// Commands that print and exit (everything but the long-running servers).
    fn is_client(&self) -> bool {
        !matches!(
            self,
            Command::Dev(_)
                | Command::Node(_)
                | Command::Cp(_)
                | Command::Echo { .. }
                | Command::LlmDemo { .. }
        )
    }
}

/// Runs a client command; errors go to stderr with exit code 1.
fn run_client(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}{}", flag_hint(&e));
            ExitCode::FAILURE
        }
    }
}

/// For an error about where a server is, the setting that says where: the SDK names the
/// address and the server, the CLI knows which flag chose it.
fn flag_hint(e: &anyhow::Error) -> &'static str {
    use tollgate_sdk::{Error, Server};
    let server = e.chain().find_map(|c| match c.downcast_ref::<Error>() {
        Some(Error::Unreachable { server, .. } | Error::WrongServer { server, .. }) => {
            Some(*server)
        }
        _ => None,
    });
    match server {
        Some(Server::Node) => ". The CLI finds the node at --node or TOLLGATE_NODE.",
        Some(Server::ControlPlane) => ". The CLI finds the control plane at --cp or TOLLGATE_CP.",
        _ => "",
    }
}

/// Blocks until SIGTERM or SIGINT.
fn wait_for_stop() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
}
