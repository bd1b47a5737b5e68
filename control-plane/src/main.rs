//! `tollgate-cp`: the control-plane service (see the library's docs).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tollgate-cp",
    version,
    about = "Tollgate's control plane (API lifecycle)"
)]
struct Cli {
    #[command(flatten)]
    args: tollgate_control_plane::CpArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tollgate_control_plane::start_traces(&cli.args) {
        eprintln!("tollgate-cp: {e:#}");
        return ExitCode::from(2);
    }
    tollgate_node::telemetry::logging::init(
        tollgate_node::config::LogFormat::Text,
        tollgate_node::telemetry::logging::NODE_DEFAULT,
    );
    match tollgate_control_plane::run(cli.args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-cp: {e:#}");
            ExitCode::FAILURE
        }
    }
}
