//! `tollgate-node`: parse settings, start logging and metrics, run the node until it has
//! drained after SIGTERM / SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tollgate_node::config::{NodeArgs, Settings};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Tollgate gateway node: the HTTP data plane (and, later, a Raft cluster member).
#[derive(Parser)]
#[command(name = "tollgate-node", version)]
struct Cli {
    #[command(flatten)]
    node: NodeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.node) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tollgate-node: {e:#}");
            return ExitCode::from(2);
        }
    };
    tollgate_node::telemetry::logging::init(settings.log_format);
    let result = tollgate_node::telemetry::metrics::install()
        .and_then(|metrics| tollgate_node::Node::start(settings, metrics))
        .and_then(|node| node.wait());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tollgate-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}
