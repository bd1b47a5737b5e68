//! The HTTP data plane: listeners and threads ([`server`]), the request pipeline
//! ([`phases`]), the upstream pool and forwarding ([`client`]), bodies ([`body`]),
//! header rules ([`headers`]) and error answers ([`respond`]).

pub mod body;
pub mod client;
pub mod guard;
pub mod headers;
pub mod phases;
pub mod respond;
pub mod server;
pub mod tls;
pub mod upstream_tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::actor::quotas::Quotas;
use crate::state::snapshot::Snapshot;
use crate::telemetry::metrics::RouteMetrics;
use crate::telemetry::traces::Tracing;

/// Spawns `!Send` futures (our services and bodies hold `Rc`s) on the data-plane thread's
/// `LocalSet`: hyper's executor for client connections and HTTP/2 streams.
#[derive(Clone, Copy, Debug)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Limits every data-plane thread enforces (from the node settings).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub min_request_body_rate: u64,
    pub request_body_grace: Duration,
    pub max_request_body: u64,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
}

/// What the data-plane threads share: the snapshot they serve and a few counters.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub limits: Limits,
    pub open_connections: AtomicUsize,
    /// Slots held per client address (`--max-connections-per-client`).
    pub clients: guard::ClientSlots,
    /// Connections being refused right now (over the cap).
    pub refusing: AtomicUsize,
    /// False while draining on shutdown.
    pub ready: AtomicBool,
    /// Set once the data plane serves what the cluster had applied (or there is nothing to
    /// serve yet): until then /readyz says "starting".
    pub synced: AtomicBool,
    pub unmatched: RouteMetrics,
    pub open_gauge: ::metrics::Gauge,
    /// The quota leases requests are admitted from.
    pub quotas: Arc<Quotas>,
    /// Trace export, when the node exports traces.
    pub tracing: Option<Arc<Tracing>>,
    /// Usage counting, unless `--metering off`.
    pub meter: Option<Arc<crate::metering::Meter>>,
    /// Certificates and session tickets for the HTTPS listener.
    pub tls: Arc<tls::EdgeTls>,
    /// The HTTPS port, for redirects (`--https-addr`); none without it.
    pub https_port: Option<u16>,
    /// The node's region: LLM deployments of the same region are preferred.
    pub region: Option<Arc<str>>,
    /// LLM prompts and answers go into the provider calls' spans.
    pub llm_capture: bool,
    /// Answers of LLM API versions with a `response_cache` (None: the node keeps none).
    pub llm_cache: Option<Arc<crate::llm::cache::ResponseCache>>,
    /// The call log (None: off).
    pub calls: Option<Arc<crate::calls::CallLog>>,
}

impl Shared {
    pub fn new(limits: Limits, quotas: Arc<Quotas>) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            clients: guard::ClientSlots::new(limits.max_connections_per_client),
            limits,
            open_connections: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            ready: AtomicBool::new(true),
            synced: AtomicBool::new(false),
            unmatched: RouteMetrics::new("_none"),
            open_gauge: ::metrics::gauge!("tollgate_open_connections"),
            quotas,
            tracing: crate::telemetry::traces::global().cloned(),
            meter: None,
            tls: Arc::new(tls::EdgeTls::new()),
            https_port: None,
            region: None,
            llm_capture: false,
            llm_cache: None,
            calls: None,
        }
    }
}

impl Shared {
    /// Takes one slot for `client`, unless the node's (`max_connections`) or the client's
    /// (`max_connections_per_client`) are all taken.
    pub fn take_slot(&self, client: guard::ClientKey) -> Result<(), guard::Refused> {
        use std::sync::atomic::Ordering::Relaxed;
        let max = self.limits.max_connections;
        if self.open_connections.fetch_add(1, Relaxed) + 1 > max {
            self.open_connections.fetch_sub(1, Relaxed);
            return Err(guard::Refused::Node(max));
        }
        if !self.clients.try_take(client) {
            self.open_connections.fetch_sub(1, Relaxed);
            return Err(guard::Refused::Client(self.clients.limit()));
        }
        Ok(())
    }

    /// Gives back a slot taken with [`take_slot`](Self::take_slot) (or forced).
    pub fn release_slot(&self, client: guard::ClientKey) {
        self.open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.clients.release(client);
    }
}

/// One open client connection in the counts (`open_connections`, its client's slots, the
/// gauge), for as long as it lives. An upgraded connection (WebSocket) takes a new one
/// when hyper lets go of it.
pub struct OpenConnection {
    shared: Arc<Shared>,
    client: guard::ClientKey,
}

impl OpenConnection {
    /// Counts a connection whose slots were already taken in `open_connections` and for
    /// its client (the accept loop takes them first, to compare with the limits).
    pub fn counted(shared: Arc<Shared>, client: guard::ClientKey) -> OpenConnection {
        shared.open_gauge.increment(1.0);
        OpenConnection { shared, client }
    }

    /// Takes the slots (even past the limits: the connection it replaces just gave its
    /// own back) and counts them.
    pub fn open(shared: Arc<Shared>, client: guard::ClientKey) -> OpenConnection {
        shared
            .open_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shared.clients.take(client);
        OpenConnection::counted(shared, client)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.shared.release_slot(self.client);
        self.shared.open_gauge.decrement(1.0);
    }
}
