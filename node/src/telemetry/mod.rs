//! Telemetry: process logs ([`logging`]), Prometheus metrics ([`metrics`]) and the
//! per-request access log ([`access_log`]). OpenTelemetry trace export ([`traces`]).

pub mod access_log;
pub mod logging;
pub mod metrics;
pub mod traces;
