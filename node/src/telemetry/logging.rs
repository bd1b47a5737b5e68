//! Process logs (not the access log): `tracing` to stderr, as text or JSON lines, filtered
//! by `RUST_LOG` (default [`NODE_DEFAULT`]: Tollgate's own lines from INFO, the libraries'
//! — openraft, sled, tonic, hyper — from WARN). Colour only when stderr is a terminal and
//! `NO_COLOR` is unset. Called once from a binary's `main`, after
//! [`traces::install`](crate::telemetry::traces::install) when traces are exported: spans
//! with the [`TARGET`] target then also go to the collector.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::telemetry::traces::{self, TARGET};

/// A node's or control plane's default filter: our own crates at INFO, every library at
/// WARN (openraft's INFO lines are its internals: elections, log ids, state dumps), but
/// for openraft's lines that a healthy cluster produces (`RUST_LOG` brings them back): its
/// core logs at WARN only that it ignores a stale message (a vote or membership that has
/// moved on), which every join and election produces; replication logs an ERROR and WARNs
/// for every call to a peer that is restarting. Tollgate itself says once when a peer
/// stays silent (`raft::network::Contact`).
pub const NODE_DEFAULT: &str = "warn,openraft::core::raft_core=error,\
     openraft::replication=off,openraft::engine::handler::replication_handler=error,\
     tollgate=info,tollgate_node=info,tollgate_control_plane=info,tollgate_sdk=info";

/// `tollgate dev`'s default filter: its banner and the access log are the console, so
/// only warnings and errors are logged (`RUST_LOG=info` shows the rest); openraft's
/// routine lines are left out as in [`NODE_DEFAULT`].
pub const DEV_DEFAULT: &str = "warn,openraft::core::raft_core=error,\
     openraft::replication=off,openraft::engine::handler::replication_handler=error";

/// Whether to write ANSI colours: only to a terminal, and never when `NO_COLOR` is set to
/// anything but the empty string (no-color.org).
pub fn colour(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Sets up the process log; `default_filter` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!("RUST_LOG={v:?} is not a valid filter ({e}); using {default_filter:?}");
            EnvFilter::new(default_filter)
        }),
        _ => EnvFilter::new(default_filter),
    };
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // Only our own trace spans are exported, whatever RUST_LOG says about the logs.
    let otel = traces::global().map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.tracer())
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(TARGET, tracing::Level::INFO),
            )
    });
    // A second init (tests that start several nodes in one process) keeps the first.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None));
        assert!(!colour(true, Some("1".into())));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(colour(true, Some("".into())));
    }

    #[test]
    fn the_default_filters_parse() {
        for f in [super::NODE_DEFAULT, super::DEV_DEFAULT] {
            assert!(tracing_subscriber::EnvFilter::try_new(f).is_ok(), "{f}");
        }
    }
}
