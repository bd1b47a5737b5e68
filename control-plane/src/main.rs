//! `tollgate-cp`: the control-plane service. Refuses to start until it exists, rather than
//! pretending to serve.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("{}", tollgate_control_plane::NOT_AVAILABLE);
    ExitCode::from(2)
}
