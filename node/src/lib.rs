//! A Tollgate gateway node.
//!
//! Layout (one folder per concern, see DESIGN.md):
//!
//! - [`config`]: node settings (file, `TOLLGATE_*` environment, flags).
//! - [`state`]: the declarative spec and the immutable [`state::snapshot::Snapshot`] the
//!   data plane serves.
//! - [`routing`]: the compiled route matcher, upstream clusters, health checks.
//! - [`proxy`]: the HTTP data plane (thread per core, hyper 1).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` and the node admin gRPC service.
//! - [`telemetry`]: logs, metrics, access log.
//!
//! Threads: the data plane runs one current-thread runtime per core ([`proxy::server`]);
//! everything else (admin endpoints, gRPC, health checks, spec reloads, signals) runs on a
//! small separate runtime, and hands the data plane new snapshots through an `ArcSwap`.
//!
//! [`Node::start`] binds every listener and returns once the node serves; [`Node::wait`]
//! blocks until it has shut down (SIGTERM / SIGINT, drained) .

pub mod admin;
pub mod config;
pub mod proxy;
pub mod routing;
pub mod state;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::proxy::{Limits, Shared};
use crate::routing::upstream::EndpointRegistry;
use crate::state::snapshot::Snapshot;
use crate::state::spec::{Spec, SpecErrors};
use crate::telemetry::access_log::Sink;

/// The addresses a running node listens on (ports resolved when 0 was asked for).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BoundAddrs {
    pub proxy: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

/// A running node.
pub struct Node {
    runtime: tokio::runtime::Runtime,
    workers: Vec<JoinHandle<()>>,
    control: CancellationToken,
    addrs: BoundAddrs,
    specs: Arc<SpecLoader>,
}

impl Node {
    /// Loads the spec, binds every listener, starts every thread. Fails (listing every
    /// spec error) without serving anything if the spec is invalid.
    pub fn start(settings: Settings, metrics: PrometheusHandle) -> anyhow::Result<Node> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-cluster")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared::new(Limits {
            max_connections: settings.max_connections,
            max_request_body: settings.max_request_body,
            max_header_bytes: settings.max_header_bytes,
            header_read_timeout: settings.header_read_timeout,
            drain_timeout: settings.drain_timeout,
        }));
        let specs = Arc::new(SpecLoader {
            path: settings.spec.clone(),
            shared: shared.clone(),
            registry: EndpointRegistry::default(),
            health_checks: Mutex::new(CancellationToken::new()),
            reloading: Mutex::new(()),
            runtime: runtime.handle().clone(),
        });
        if settings.spec.is_some() {
            specs.reload().map_err(|e| anyhow::anyhow!("{e}"))?;
        }

        let sink = Sink::open(&settings.access_log)?;
        let listeners =
            proxy::server::bind_listeners(settings.proxy_addr, settings.worker_threads())?;
        let proxy_addr = listeners[0].local_addr()?;
        let (admin_listener, grpc_listener) = runtime.block_on(async {
            let admin = tokio::net::TcpListener::bind(settings.admin_addr)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("bind the admin address {}: {e}", settings.admin_addr)
                })?;
            let grpc = tokio::net::TcpListener::bind(settings.grpc_addr)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("bind the gRPC address {}: {e}", settings.grpc_addr)
                })?;
            anyhow::Ok((admin, grpc))
        })?;
        let addrs = BoundAddrs {
            proxy: proxy_addr,
            admin: admin_listener.local_addr()?,
            grpc: grpc_listener.local_addr()?,
        };

        // `shutdown` stops the data plane; `control` stops the admin side once the data
        // plane has drained, so /readyz can say "draining" meanwhile.
        let shutdown = CancellationToken::new();
        let control = CancellationToken::new();
        runtime.spawn(admin::http::serve(
            admin_listener,
            shared.clone(),
            metrics.clone(),
            control.clone(),
        ));
        let service = admin::grpc::AdminService {
            shared: shared.clone(),
            node_id: settings.id,
            region: settings.region.clone(),
            proxy_addr: addrs.proxy.to_string(),
            admin_addr: addrs.admin.to_string(),
        };
        let grpc_shutdown = control.clone();
        runtime.spawn(async move {
            if let Err(e) = admin::grpc::serve(grpc_listener, service, grpc_shutdown).await {
                tracing::error!("node gRPC server failed: {e:#}");
            }
        });
        runtime.spawn(telemetry::metrics::upkeep(metrics));
        let handlers = {
            let _context = runtime.enter();
            Signals::register()?
        };
        runtime.spawn(signals(
            handlers,
            settings.shutdown_delay,
            sink.clone(),
            specs.clone(),
            shared.clone(),
            shutdown.clone(),
        ));

        let workers = proxy::server::spawn_workers(
            listeners,
            shared,
            sink,
            settings.cpu_scheduling,
            shutdown,
        )?;
        if let Some(path) = &settings.addr_file {
            write_addr_file(path, &addrs)?;
        }
        tracing::info!(
            node = settings.id,
            region = %settings.region,
            proxy = %addrs.proxy,
            admin = %addrs.admin,
            grpc = %addrs.grpc,
            workers = workers.len(),
            "tollgate node serving"
        );
        Ok(Node {
            runtime,
            workers,
            control,
            addrs,
            specs,
        })
    }

    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// Blocks until the node has shut down and its data-plane threads have drained.
    pub fn wait(self) -> anyhow::Result<()> {
        for w in self.workers {
            if w.join().is_err() {
                anyhow::bail!("a data-plane thread panicked");
            }
        }
        self.specs.health_checks.lock().expect("lock").cancel();
        self.control.cancel();
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(2));
        tracing::info!("tollgate node stopped");
        Ok(())
    }
}

/// Loads the spec file into a new snapshot and swaps it in.
struct SpecLoader {
    path: Option<PathBuf>,
    shared: Arc<Shared>,
    registry: EndpointRegistry,
    health_checks: Mutex<CancellationToken>,
    reloading: Mutex<()>,
    runtime: tokio::runtime::Handle,
}

impl SpecLoader {
    fn reload(&self) -> Result<u64, SpecErrors> {
        let result = self.try_reload();
        let label = if result.is_ok() { "ok" } else { "invalid" };
        metrics::counter!("tollgate_spec_reloads_total", "result" => label).increment(1);
        result
    }

    fn try_reload(&self) -> Result<u64, SpecErrors> {
        // One reload at a time: each takes the generation after the one it replaces.
        let _one_at_a_time = self.reloading.lock().expect("reload lock poisoned");
        let Some(path) = &self.path else {
            let mut e = SpecErrors::default();
            e.push("spec", "no spec file was given (--spec FILE)");
            return Err(e);
        };
        let spec = read_spec(path)?;
        let generation = self.shared.snapshot.load().generation + 1;
        let snapshot = Arc::new(Snapshot::build(&spec, generation, &self.registry)?);
        let checks = routing::health::spawn_checks(&snapshot.clusters, &self.runtime);
        self.shared.snapshot.store(snapshot.clone());
        let old = std::mem::replace(&mut *self.health_checks.lock().expect("lock"), checks);
        old.cancel();
        metrics::gauge!("tollgate_spec_generation").set(generation as f64);
        tracing::info!(
            generation,
            routes = snapshot.routes.len(),
            upstreams = snapshot.clusters.len(),
            spec = %path.display(),
            "spec loaded"
        );
        Ok(generation)
    }
}

/// Runs a node from its flags until it has shut down: what `tollgate-node` and
/// `tollgate node` do. Errors are printed; the exit code says how it ended.
pub fn run_from_args(args: config::NodeArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let settings = match Settings::load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tollgate-node: {e:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::logging::init(settings.log_format);
    let result = telemetry::metrics::install()
        .and_then(|metrics| Node::start(settings, metrics))
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

/// Reads and checks a spec file.
pub fn read_spec(path: &Path) -> Result<Spec, SpecErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let mut errors = SpecErrors::default();
        errors.push("spec", format!("cannot read {}: {e}", path.display()));
        errors
    })?;
    Spec::from_yaml(&text)
}

/// The signals a node handles, registered before the node reports itself started: until
/// then SIGHUP or SIGTERM would still kill the process outright.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must run inside the runtime's context.
    fn register() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let register = |kind: SignalKind| {
            signal(kind).map_err(|e| anyhow::anyhow!("install a signal handler: {e}"))
        };
        Ok(Signals {
            hup: register(SignalKind::hangup())?,
            term: register(SignalKind::terminate())?,
            int: register(SignalKind::interrupt())?,
        })
    }
}

async fn signals(
    signals: Signals,
    shutdown_delay: std::time::Duration,
    access_log: Sink,
    specs: Arc<SpecLoader>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // After log rotation: new lines go to a new file under the same path.
                if let Err(e) = access_log.reopen() {
                    tracing::error!("SIGHUP: could not reopen the access log: {e:#}");
                }
                // Reading and resolving the spec blocks (DNS): off the runtime's threads, and
                // not awaited here, so a SIGTERM during a slow reload is handled at once.
                let specs = specs.clone();
                tokio::task::spawn_blocking(move || match specs.reload() {
                    Ok(generation) => tracing::info!(generation, "SIGHUP: spec reloaded"),
                    Err(errors) => tracing::error!("SIGHUP: spec refused, still serving the previous one. {errors}"),
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = shutdown.cancelled() => break,
        }
    }
    shared.ready.store(false, Ordering::Relaxed);
    if !shutdown_delay.is_zero() && !shutdown.is_cancelled() {
        // Load balancers see /readyz fail and stop sending; until then, keep serving. A
        // second SIGTERM or Ctrl-C skips the wait.
        tracing::info!(
            ?shutdown_delay,
            "shutting down: /readyz reports draining, still accepting"
        );
        tokio::select! {
            _ = tokio::time::sleep(shutdown_delay) => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    shutdown.cancel();
}

fn write_addr_file(path: &Path, addrs: &BoundAddrs) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(addrs)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
