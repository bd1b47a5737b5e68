//! `tollgate`: the command-line tool. `tollgate dev` runs a whole gateway in one process;
//! `tollgate node` runs a gateway node; `tollgate validate` checks a spec file. Cluster commands (apply, cluster, api, tenant,
//! ...) arrive with the cluster and control-plane issues.

mod dev;
mod echo;

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
    /// Check a spec file and list every problem in it (nothing is applied).
    Validate {
        /// The spec file (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => match dev::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate dev: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Node(args) => tollgate_node::run_from_args(*args),
        Command::Validate { file } => match tollgate_node::read_spec(&file) {
            Ok(spec) => {
                println!(
                    "{}: valid ({} routes, {} upstreams)",
                    file.display(),
                    spec.routes.len(),
                    spec.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {errors}", file.display());
                ExitCode::from(1)
            }
        },
    }
}
