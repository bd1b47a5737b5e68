//! Process logs (not the access log): `tracing` to stderr, as text or JSON lines, filtered
//! by `RUST_LOG` (default `info`). Called once from a binary's `main`, after
//! [`traces::install`](crate::telemetry::traces::install) when traces are exported: spans
//! with the [`TARGET`] target then also go to the collector.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::telemetry::traces::{self, TARGET};

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
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
