//! `tollgate-node`: a gateway node. Everything happens in [`tollgate_node::run_from_args`].

use std::process::ExitCode;

use clap::Parser;
use tollgate_node::config::NodeArgs;

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
    tollgate_node::run_from_args(Cli::parse().node)
}
