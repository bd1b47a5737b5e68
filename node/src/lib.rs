//! A Tollgate gateway node.
//!
//! Layout (one folder per concern, see docs/architecture.md):
//!
//! - [`config`]: node settings (file, `TOLLGATE_*` environment, flags).
//! - [`state`]: the declarative spec and the immutable [`state::snapshot::Snapshot`] the
//!   data plane serves.
//! - [`routing`]: the compiled route matcher, upstream clusters, health checks.
//! - [`proxy`]: the HTTP data plane (thread per core, hyper 1).
//! - [`raft`]: the Raft cluster (openraft + sled + gRPC) that replicates the state.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` and the node admin gRPC service.
//! - [`telemetry`]: logs, metrics, access log.
//!
//! Threads: the data plane runs one current-thread runtime per core ([`proxy::server`]);
//! everything else (Raft, admin endpoints, gRPC, health checks, signals) runs on a small
//! separate runtime, and hands the data plane new snapshots through an `ArcSwap`.
//!
//! [`Node::start`] binds every listener and returns once the node serves; [`Node::wait`]
//! blocks until it has shut down (SIGTERM / SIGINT, drained) .

pub mod actor;
pub mod admin;
pub mod auth;
pub mod calls;
pub mod config;
pub mod hash;
pub mod identity;
pub mod llm;
pub mod metering;
pub mod proxy;
pub mod raft;
pub mod rollout;
pub mod routing;
pub mod state;
pub mod telemetry;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::auth::AuthTable;
use crate::auth::principal::Caller;
use crate::config::Settings;
use crate::proxy::{Limits, Shared};
use crate::raft::NodeInfo;
use crate::raft::cluster::Cluster;
use crate::raft::state_machine::Published;
use crate::routing::upstream::EndpointRegistry;
use crate::state::access::Access;
use crate::state::lifecycle::Api;
use crate::state::snapshot::{Routing, Snapshot};
use crate::state::spec::{Spec, SpecErrors};
use crate::telemetry::access_log::Sink;

/// The addresses a running node listens on (ports resolved when 0 was asked for).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BoundAddrs {
    pub proxy: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https: Option<SocketAddr>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

/// A running node.
pub struct Node {
    runtime: tokio::runtime::Runtime,
    workers: Vec<JoinHandle<()>>,
    control: CancellationToken,
    addrs: BoundAddrs,
    compiler: Arc<Compiler>,
    cluster: Arc<Cluster>,
    journal: Option<Arc<metering::journal::Journal>>,
    /// Stops the journal's periodic shipping (before its last tick at shutdown).
    journal_stop: CancellationToken,
    calls: Option<Arc<calls::CallLog>>,
    leave_on_shutdown: config::LeaveOnShutdown,
}

impl Node {
    /// Opens the node's store, binds every listener, starts Raft and every thread. Fails
    /// (listing every spec error) without serving anything if the `--spec` file is invalid.
    pub fn start(settings: Settings, metrics: PrometheusHandle) -> anyhow::Result<Node> {
        identity::tls::install_default_provider();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-cluster")
            .enable_all()
            .build()?;
        let quotas = Arc::new(actor::quotas::Quotas::new(
            settings.id,
            settings.region.clone(),
        ));
        let mut shared = Shared::new(
            Limits {
                max_connections: settings.max_connections,
                max_connections_per_client: settings.max_connections_per_client,
                idle_timeout: settings.idle_timeout,
                send_timeout: settings.send_timeout,
                min_request_body_rate: settings.min_request_body_rate,
                request_body_grace: settings.request_body_grace,
                max_request_body: settings.max_request_body,
                max_header_bytes: settings.max_header_bytes,
                header_read_timeout: settings.header_read_timeout,
                drain_timeout: settings.drain_timeout,
            },
            quotas.clone(),
        );
        if settings.metering {
            shared.meter = Some(Arc::new(metering::Meter::default()));
        }
        let https_listeners = match settings.https_addr {
            Some(addr) => proxy::server::bind_listeners(
                addr,
                settings.worker_threads(),
                "HTTPS proxy",
                "--https-addr",
            )?,
            None => Vec::new(),
        };
        let https_addr = match https_listeners.first() {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        shared.https_port = https_addr.map(|a| a.port());
        shared.region = Some(Arc::from(settings.region.as_str()));
        shared.llm_capture = settings.llm_capture_content;
        shared.llm_cache = (settings.llm_cache_bytes > 0)
            .then(|| Arc::new(llm::cache::ResponseCache::new(settings.llm_cache_bytes)));
        // The Raft store first: it says so when another process holds the data directory.
        let db = raft::open_db(&settings.data_dir)?;
        if settings.call_log.enabled {
            std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the data directory {} ({e}); choose another with --data-dir",
                    settings.data_dir.display()
                )
            })?;
            shared.calls = Some(calls::CallLog::open(
                &settings.data_dir,
                settings.id,
                &settings.call_log,
            )?);
        }
        let shared = Arc::new(shared);
        let calls = shared.calls.clone();
        // Upstream host names: the bootstrap spec below is checked with this resolver too.
        let dns = {
            let _context = runtime.enter();
            routing::dns::Dns::new(settings.dns.clone(), runtime.handle().clone())?
        };
        routing::dns::install(dns.clone());
        // A bad bootstrap spec stops the node before it serves anything.
        let bootstrap_spec = match &settings.spec {
            Some(path) => Some(
                read_spec_file(path, settings.max_spec_bytes)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            None => None,
        };

        let sink = Sink::open(&settings.access_log)?;
        let listeners = proxy::server::bind_listeners(
            settings.proxy_addr,
            settings.worker_threads(),
            "proxy",
            "--proxy-addr",
        )?;
        let proxy_addr = listeners[0].local_addr()?;
        let (admin_listener, grpc_listener) = runtime.block_on(async {
            let admin = tokio::net::TcpListener::bind(settings.admin_addr)
                .await
                .map_err(|e| listen_error("HTTP admin", settings.admin_addr, "--admin-addr", e))?;
            let grpc = tokio::net::TcpListener::bind(settings.grpc_addr)
                .await
                .map_err(|e| listen_error("gRPC", settings.grpc_addr, "--grpc-addr", e))?;
            anyhow::Ok((admin, grpc))
        })?;
        let addrs = BoundAddrs {
            proxy: proxy_addr,
            https: https_addr,
            admin: admin_listener.local_addr()?,
            grpc: grpc_listener.local_addr()?,
        };
        let advertise = settings
            .advertise_addr
            .clone()
            .unwrap_or_else(|| addrs.grpc.to_string());
        if advertise
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_unspecified())
        {
            anyhow::bail!(
                "the gRPC address {advertise} is not one peers can dial; set --advertise-addr"
            );
        }
        let (proxy_shown, admin_shown) = (
            reachable(addrs.proxy, &advertise),
            reachable(addrs.admin, &advertise),
        );
        if settings.insecure_cluster {
            tracing::warn!(
                "INSECURE CLUSTER: --insecure-cluster is set. Nodes talk plain gRPC, present no \
                 certificates, and trust every caller that can reach the gRPC port {} (anyone \
                 there can join, read the state and act as a node). Use it for tests and \
                 trusted networks only",
                addrs.grpc
            );
        }
        let identity = Arc::new(identity::Identity::load(
            settings.id,
            !settings.insecure_cluster,
            &settings.data_dir,
            match (&settings.sealing_key, &settings.sealing_key_file) {
                (Some(keys), _) => identity::KeySource::Env(keys.clone()),
                (None, Some(file)) => identity::KeySource::File(file.clone()),
                (None, None) => {
                    identity::KeySource::File(settings.data_dir.join(identity::SEALING_KEY_FILE))
                }
            },
            vec![
                advertise
                    .rsplit_once(':')
                    .map_or(advertise.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            ],
            settings.cert_lifetime,
        )?);
        let info = NodeInfo {
            grpc_addr: advertise.clone(),
            region: settings.region.clone(),
            proxy_addr: proxy_shown.clone(),
            admin_addr: admin_shown.clone(),
        };
        let cluster = runtime.block_on(Cluster::start(
            settings.id,
            info,
            &db,
            raft::cluster::Options {
                raft: settings.raft,
                fault_injection: settings.enable_fault_injection,
                max_spec_bytes: settings.max_spec_bytes,
                voters: settings.voters,
                data_dir: settings.data_dir.clone(),
            },
            identity.clone(),
        ))?;
        runtime.block_on(check_sealing(&cluster, settings.bootstrap))?;

        // `shutdown` stops the data plane; `control` stops the admin side once the data
        // plane has drained, so /readyz can say "draining" meanwhile.
        let shutdown = CancellationToken::new();
        let control = CancellationToken::new();
        let members = cluster.clone();
        runtime.spawn(dns.clone().run(control.clone()));
        let compiler = Arc::new(Compiler {
            members: Box::new(move || members.members()),
            identity: identity.clone(),
            shared: shared.clone(),
            registry: EndpointRegistry::default(),
            health_checks: Mutex::new(CancellationToken::new()),
            runtime: runtime.handle().clone(),
            dns: dns.clone(),
            built: Mutex::new(None),
        });
        runtime.spawn(
            compiler
                .clone()
                .follow(cluster.state_machine.subscribe(), control.clone()),
        );
        runtime.spawn(admin::http::serve(
            admin_listener,
            shared.clone(),
            Some(cluster.clone()),
            metrics.clone(),
            control.clone(),
        ));
        let actors = {
            let _context = runtime.enter();
            actor::Actors::start(quotas, shared.clone(), cluster.clone(), control.clone())
        };
        runtime.spawn(actors.clone().run(cluster.clone(), control.clone()));
        let service = admin::grpc::AdminService {
            actors,
            shared: shared.clone(),
            cluster: cluster.clone(),
            region: settings.region.clone(),
            proxy_addr: proxy_shown,
            admin_addr: admin_shown,
            calls: shared.calls.clone(),
        };
        let grpc_shutdown = control.clone();
        runtime.spawn(async move {
            if let Err(e) = admin::grpc::serve(grpc_listener, service, grpc_shutdown).await {
                tracing::error!("node gRPC server failed: {e:#}");
            }
        });
        let journal_stop = control.child_token();
        let journal = match &shared.meter {
            Some(meter) => {
                let journal = Arc::new(metering::journal::Journal::open(
                    &db,
                    settings.id,
                    meter.clone(),
                )?);
                runtime.spawn(journal.clone().run(
                    cluster.clone(),
                    settings.meter_interval,
                    journal_stop.clone(),
                ));
                Some(journal)
            }
            None => None,
        };
        runtime.spawn(metering::alerts::run(cluster.clone(), control.clone()));
        runtime.spawn(tend_membership(
            cluster.clone(),
            settings.evict_after,
            control.clone(),
        ));
        runtime.spawn(rollout::notify::run(cluster.clone(), control.clone()));
        runtime.spawn(rollout::anomaly::run(
            cluster.clone(),
            shared.clone(),
            control.clone(),
        ));
        runtime.spawn(telemetry::metrics::upkeep(metrics));
        // A certificate comes within 30 days of expiring while nothing changes: say so
        // every 12 hours (each compile says so too).
        {
            let (shared, stop) = (shared.clone(), control.clone());
            runtime.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(12 * 3600)) => {
                            shared.tls.warn_expiring(raft::service::now_ms());
                        }
                    }
                }
            });
        }
        runtime.spawn(telemetry::metrics::raft_metrics(
            cluster.clone(),
            control.clone(),
        ));

        if settings.bootstrap {
            runtime.block_on(bootstrap(
                &cluster,
                bootstrap_spec.as_deref(),
                &settings.data_dir,
                &settings.bootstrap_secrets,
            ))?;
            if let Some(file) = &settings.bootstrap_join_token_file {
                runtime.block_on(write_bootstrap_join_token(
                    &cluster,
                    file,
                    settings.bootstrap_join_token_uses,
                ))?;
            }
        } else if bootstrap_spec.is_some() && settings.join.is_some() {
            tracing::warn!(
                "--spec is applied only by the node that bootstraps the cluster; this node joins, so it is ignored"
            );
        }
        // Report started only once the data plane serves what this node had applied (its
        // bootstrap spec, or its state from before a restart).
        let applied = cluster.state_machine.read(|a| a.state.generation);
        if applied > 0 {
            let served = runtime.block_on(async {
                let wait = async {
                    while shared.snapshot.load().generation < applied {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                };
                tokio::time::timeout(std::time::Duration::from_secs(10), wait).await
            });
            if served.is_err() {
                tracing::warn!(
                    applied,
                    "the data plane has not compiled the applied spec within 10s; serving what it has"
                );
            }
        }
        if !settings.bootstrap
            && settings.join.is_none()
            && !runtime.block_on(cluster.raft.is_initialized())?
        {
            tracing::warn!(
                "this node belongs to no cluster and was told neither to start one nor to join one: \
                 it serves nothing until a member adds it. Start the first node with --bootstrap, \
                 the others with --join ADDR"
            );
        }
        if let Some(peer) = &settings.join {
            if identity.secure && !identity.enrolled() {
                let token = match (&settings.join_token, &settings.join_token_file) {
                    (Some(t), _) => Some(t.clone()),
                    (None, Some(file)) => Some(read_token_file(file)?),
                    (None, None) => None,
                };
                let Some(token) = &token else {
                    anyhow::bail!(
                        "this node has no cluster certificate yet, so it joins with a join token: \
                         make one on the cluster with `tollgate cluster join-token create` and \
                         pass it with --join-token (TOLLGATE_JOIN_TOKEN)"
                    );
                };
                let token = identity::JoinToken::parse(token)
                    .map_err(|e| anyhow::anyhow!("--join-token: {e}"))?;
                identity.tls.pin(&token.ca_fingerprint);
                runtime
                    .block_on(cluster.check_peer(peer))
                    .map_err(|e| anyhow::anyhow!(e))?;
                runtime
                    .block_on(enroll(&cluster, peer, &token))
                    .map_err(|e| anyhow::anyhow!(e))?;
            } else {
                if settings.join_token.is_some() && identity.secure {
                    tracing::info!(
                        "this node holds its cluster certificate already; --join-token is not used"
                    );
                }
                if !identity.secure && cluster.identity.keyring().is_none() {
                    runtime
                        .block_on(fetch_keys_insecure(&cluster, peer))
                        .map_err(|e| anyhow::anyhow!(e))?;
                }
                runtime
                    .block_on(cluster.check_peer(peer))
                    .map_err(|e| anyhow::anyhow!(e))?;
            }
            let _context = runtime.enter();
            cluster.spawn_join(peer.clone(), control.clone());
        }
        runtime.spawn(cluster.clone().keep_identity(
            (settings.cert_lifetime / 10).clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(60),
            ),
            control.clone(),
        ));

        let handlers = {
            let _context = runtime.enter();
            Signals::register()?
        };
        runtime.spawn(signals(
            handlers,
            settings.shutdown_delay,
            sink.clone(),
            settings.spec.clone(),
            cluster.clone(),
            shared.clone(),
            shutdown.clone(),
        ));

        let workers = proxy::server::spawn_workers(
            listeners,
            https_listeners,
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
            advertise = %advertise,
            workers = workers.len(),
            "tollgate node serving"
        );
        Ok(Node {
            runtime,
            workers,
            control,
            addrs,
            compiler,
            cluster,
            journal,
            journal_stop,
            calls,
            leave_on_shutdown: settings.leave_on_shutdown,
        })
    }

    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// Issues a control-plane certificate from the cluster CA, for a control plane run in
    /// this process (`tollgate dev`): its chain (PEM), key (PKCS#8 DER), and the CA (PEM).
    pub fn issue_control_plane_certificate(
        &self,
        names: &[String],
    ) -> anyhow::Result<(String, Vec<u8>, String)> {
        let identity = &self.cluster.identity;
        let ca = self
            .cluster
            .state_machine
            .read(|a| identity.ca(&a.state.access))
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        let (key, csr) = identity::ca::new_key_and_csr().map_err(|e| anyhow::anyhow!(e))?;
        let cert = ca
            .issue(
                identity::ca::Subject::ControlPlane,
                &csr,
                &identity::Identity::cert_names(names),
                raft::service::now_ms(),
                identity.cert_lifetime,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok((
            format!("{}\n{}", cert.trim_end(), ca.cert_pem),
            key.serialize_der(),
            ca.cert_pem,
        ))
    }

    /// Reads this node's applied state (a local read: what this node has applied).
    pub fn read_state<T>(&self, f: impl FnOnce(&state::machine::ClusterState) -> T) -> T {
        self.cluster.state_machine.read(|a| f(&a.state))
    }

    /// Blocks until the node has shut down and its data-plane threads have drained.
    pub fn wait(self) -> anyhow::Result<()> {
        for w in self.workers {
            if w.join().is_err() {
                anyhow::bail!("a data-plane thread panicked");
            }
        }
        self.compiler.health_checks.lock().expect("lock").cancel();
        if let Some(calls) = &self.calls {
            // The threads handed over their last records as they ended.
            calls.close();
        }
        if let Some(journal) = &self.journal {
            // Every request has been answered: journal the last counts (and try to ship
            // them; what is not shipped now is shipped at the next start). The periodic
            // shipping stops first; a tick of it in progress finishes before this one.
            self.journal_stop.cancel();
            let cluster = self.cluster.clone();
            let shipped = self.runtime.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(3), journal.tick(&cluster))
                    .await
            });
            if !matches!(shipped, Ok(Ok(()))) {
                tracing::info!(
                    pending = journal.pending(),
                    "usage journaled; it is shipped when this node starts again"
                );
            }
        }
        self.runtime
            .block_on(leave(&self.cluster, self.leave_on_shutdown));
        self.control.cancel();
        self.runtime
            .block_on(self.cluster.shutdown(std::time::Duration::from_secs(2)));
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(2));
        telemetry::traces::shutdown(std::time::Duration::from_secs(3));
        tracing::info!("tollgate node stopped");
        Ok(())
    }
}

/// On the leader, once a second: evictions and promotions (`Cluster::tend`).
async fn tend_membership(
    cluster: Arc<Cluster>,
    evict_after: std::time::Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => cluster.tend(evict_after).await,
        }
    }
}

/// Takes this node out of the membership as it shuts down, as `--leave-on-shutdown` says
/// (its requests are drained by now; at most 10 s).
async fn leave(cluster: &Cluster, policy: config::LeaveOnShutdown) {
    let learner = !cluster
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .any(|id| id == cluster.id);
    let go = match policy {
        config::LeaveOnShutdown::Never => false,
        config::LeaveOnShutdown::Auto => learner && cluster.is_member(),
        config::LeaveOnShutdown::Always => cluster.is_member(),
    };
    if !go {
        return;
    }
    let req = tollgate_proto::node::v1::LeaveRequest {
        node_id: cluster.id,
    };
    let left = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        cluster.leave(req, false, &Caller::Node),
    )
    .await;
    match left {
        Ok(Ok(r)) if r.left => tracing::info!(role = %r.role, "left the cluster"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("leaving the cluster failed: {}", e.message()),
        Err(_) => tracing::warn!(
            "leaving the cluster took more than 10 s; the leader evicts this node later"
        ),
    }
}

/// The address others should use for a listener bound at `bound`: itself, or, when it is
/// bound to every interface (`0.0.0.0`, `[::]`), the advertised gRPC host with its port, so
/// `tollgate cluster status` shows where each node's proxy and admin ports can be reached.
fn reachable(bound: std::net::SocketAddr, advertise: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    match advertise.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{}", bound.port()),
        None => bound.to_string(),
    }
}

/// Reads a join token from a file, waiting (up to 2 minutes) for it to appear: a node
/// started beside the bootstrapping one waits for the token that node writes.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut said = false;
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot read the join token at {}: {e}", path.display()),
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "no join token appeared at {} within 2 minutes (--join-token-file)",
                path.display()
            );
        }
        if !said {
            tracing::info!(file = %path.display(), "waiting for the join token file");
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// On the bootstrapping node, with --bootstrap-join-token-file: makes a join token for the
/// nodes and control planes started beside it and writes it there (once: a restart finds
/// the file and leaves it).
async fn write_bootstrap_join_token(
    cluster: &Cluster,
    file: &Path,
    uses: u32,
) -> anyhow::Result<()> {
    if !cluster.identity.secure || file.exists() {
        return Ok(());
    }
    use tollgate_proto::state::v1 as pb;
    let req = tollgate_proto::node::v1::WriteRequest {
        command: Some(pb::Command {
            kind: Some(pb::command::Kind::Identity(pb::IdentityCommand {
                op: Some(pb::identity_command::Op::CreateJoinToken(
                    pb::CreateJoinToken {
                        name: "bootstrap".into(),
                        expires_at_ms: raft::service::now_ms() + 24 * 3600 * 1000,
                        uses,
                        ..Default::default()
                    },
                )),
            })),
            ..Default::default()
        }),
    };
    let resp = cluster
        .write_command(req, false, &Caller::Node)
        .await
        .map_err(|s| anyhow::anyhow!("cannot make the bootstrap join token: {}", s.message()))?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    identity::write_private(file, &resp.secret)?;
    tracing::info!(file = %file.display(), uses, "wrote a join token for the nodes and control planes started beside this one (valid for a day)");
    Ok(())
}

/// Makes sure this node can open the state's secrets: a bootstrapping node of a new
/// cluster makes the sealing key; any other node must hold the key its state was sealed
/// with (a joining node gets it when it enrolls).
async fn check_sealing(cluster: &Cluster, bootstrap: bool) -> anyhow::Result<()> {
    let sealed = cluster
        .state_machine
        .read(|a| a.state.access.hash_key.clone());
    if sealed.is_empty() {
        if bootstrap {
            let ring = cluster.identity.ensure_keyring()?;
            tracing::info!(key = ring.primary().id_hex(), "sealing key ready");
        }
        return Ok(());
    }
    if !identity::seal::is_sealed(&sealed) {
        if cluster.identity.keyring().is_none() {
            // A cluster made before sealing existed: every node must seal with the same
            // key, so the operator gives one to all of them.
            anyhow::bail!(
                "this node's state comes from an older version, which kept the cluster's \
                 secrets in the clear; to seal them, give every node the same sealing key: make \
                 one with `tollgate secret keygen > sealing-key` and pass it with \
                 --sealing-key-file (or its text in TOLLGATE_SEALING_KEY). See \
                 docs/security.md, \"Upgrading\""
            );
        }
        return Ok(());
    }
    if cluster.identity.keyring().is_none() {
        anyhow::bail!(
            "this node's state is sealed (key {}), and this node has no sealing key: give it \
             the cluster's with --sealing-key-file or TOLLGATE_SEALING_KEY",
            identity::seal::key_id_of(&sealed).unwrap_or_default()
        );
    }
    // The state read back from the last snapshot may predate a rotation that the log
    // holds: the key it was sealed with then may be gone on purpose. Raft applies the log
    // again as it runs; a key that is really missing shows as errors then.
    if let Err(e) = cluster.identity.hash_key(&sealed) {
        tracing::warn!(
            "the cluster's hash key, as this node's last snapshot has it, cannot be opened \
             ({}); if this persists once the node has caught up, it lacks the sealing key \
             its state was sealed with",
            e.message()
        );
    }
    Ok(())
}

/// Enrolls a new node with its join token, retrying while the peer is not reachable (it
/// may be starting too); a refusal (a bad or used-up token, a taken id) is final.
async fn enroll(cluster: &Cluster, peer: &str, token: &identity::JoinToken) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match cluster.enroll_via(peer, token).await {
            Ok(()) => {
                tracing::info!(peer, "enrolled: this node holds its cluster certificate");
                return Ok(());
            }
            // The peer's certificate is not from the CA the token names: retrying will not
            // change that (another cluster's token, or someone in between).
            Err(e) if e.contains("not from the cluster CA") => {
                return Err(format!("enrolling through {peer} was refused: {e}"));
            }
            Err(e)
                if e.starts_with("Unavailable")
                    || e.starts_with("Unknown")
                    || e.starts_with("DeadlineExceeded") =>
            {
                if std::time::Instant::now() > deadline {
                    return Err(format!("could not enroll through {peer} within 120s: {e}"));
                }
                tracing::info!(peer, "not enrolled yet, retrying in {delay:?}: {e}");
            }
            Err(e) => return Err(format!("enrolling through {peer} was refused: {e}")),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

/// With `--insecure-cluster`, a new node takes the sealing keys from the peer it joins
/// (insecure means the network is trusted with them).
async fn fetch_keys_insecure(cluster: &Cluster, peer: &str) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match cluster.fetch_keys(peer).await {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::info!(peer, "no sealing keys from the peer yet, retrying: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("could not get the sealing keys from {peer}: {e}")),
        }
    }
}

/// Starts a new cluster with this node (once: a restart finds it initialized) and applies
/// the bootstrap spec if the cluster has none, as a linearizable read on the leader says.
/// (The local state alone cannot say: after a restart it may not have re-applied its log
/// yet.)
async fn bootstrap(
    cluster: &Cluster,
    spec: Option<&str>,
    data_dir: &Path,
    secrets: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    if cluster.bootstrap().await? {
        tracing::info!(node = cluster.id, "bootstrapped a new cluster");
    }
    match cluster.bootstrap_access().await {
        Ok(Some(token)) => {
            let path = data_dir.join(OPERATOR_TOKEN_FILE);
            write_secret_file(&path, &token)?;
            tracing::info!(
                "made the operator token and wrote it to {} (readable by this user only). It is \
                 stored in the cluster only as a keyed hash: keep it somewhere safe",
                path.display()
            );
        }
        Ok(None) => {}
        Err(e) => tracing::error!(
            "could not make the operator token (a restart retries): {}",
            e.message()
        ),
    }
    let Some(spec) = spec else { return Ok(()) };
    // Right after a restart the leader may not confirm its leadership at once (its peers'
    // connections are new, or the host is busy): an UNAVAILABLE read is asked again, for
    // a bounded time, before the node gives up on knowing.
    let read = tollgate_proto::node::v1::ReadSpecRequest { local: false };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let current = loop {
        match cluster.read_spec(read, false, &Caller::Node).await {
            Err(e)
                if e.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => break other,
        }
    };
    match current {
        Ok(current) if current.generation > 0 => {
            tracing::info!(
                generation = current.generation,
                "the cluster already has a spec; --spec is not applied again (use `tollgate apply`)"
            );
            return Ok(());
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(
                "cannot tell whether the cluster already has a spec, so --spec is not applied: {}",
                e.message()
            );
            return Ok(());
        }
    }
    for (name, value) in secrets {
        cluster
            .put_secret_as_node(name, value)
            .await
            .map_err(|e| anyhow::anyhow!("cannot store secret {name}: {}", e.message()))?;
    }
    let req = tollgate_proto::node::v1::ApplySpecRequest {
        spec_yaml: spec.to_string(),
        dry_run: false,
        request_id: String::new(),
    };
    let resp = cluster
        .apply_spec(req, false, &Caller::Node)
        .await
        .map_err(|s| anyhow::anyhow!("apply the bootstrap spec: {}", s.message()))?;
    tracing::info!(generation = resp.generation, "bootstrap spec applied");
    Ok(())
}

/// Compiles each newly applied state into the data plane's Snapshot, off the Raft task
/// and off the data-plane threads, and swaps it in. Routing is rebuilt only when the spec
/// or the APIs changed; keys and subscriptions alone rebuild only the auth table.
struct Compiler {
    /// Every member's listeners, which tenants' API versions may never reach.
    members: Box<dyn Fn() -> Vec<state::egress::Member> + Send + Sync>,
    /// Opens the state's hash key for the data plane's key checks.
    identity: Arc<identity::Identity>,
    shared: Arc<Shared>,
    registry: EndpointRegistry,
    health_checks: Mutex<CancellationToken>,
    runtime: tokio::runtime::Handle,
    /// Upstream host names and their current answers.
    dns: Arc<routing::dns::Dns>,
    /// What the current routing was built from, compared by pointer.
    built: Mutex<Option<Built>>,
}

struct Built {
    spec_yaml: Arc<str>,
    apis: Arc<BTreeMap<String, Api>>,
    /// The DNS answers' version it was built with.
    dns: u64,
    routing: Arc<Routing>,
    access: Arc<Access>,
    auth: Arc<AuthTable>,
}

type ParsedDoc = Result<serde_yaml_ng::Value, SpecErrors>;

/// The named secrets routing is built with are the same (the session-ticket keys, which
/// rotate every 12 hours, are the HTTPS listener's alone).
fn same_routing_secrets(
    a: &BTreeMap<String, state::access::NamedSecret>,
    b: &BTreeMap<String, state::access::NamedSecret>,
) -> bool {
    let routing = |m: &'_ BTreeMap<String, state::access::NamedSecret>| {
        m.iter()
            .filter(|(k, _)| k.as_str() != proxy::tls::TICKET_SECRET)
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect::<Vec<_>>()
    };
    routing(a) == routing(b)
}

/// The documents of a state, parsed (the spec, then each mounted version's content).
struct Parsed {
    spec: Result<serde_yaml_ng::Value, SpecErrors>,
    /// (API, version, its content; `None` for a retired version).
    versions: Vec<(String, semver::Version, Option<ParsedDoc>)>,
}

impl Parsed {
    fn of(next: &Published) -> Parsed {
        let mut versions = Vec::new();
        for api in next.apis.values() {
            for v in api.versions.values() {
                let doc = match v.stage {
                    state::lifecycle::Stage::Draft => continue,
                    state::lifecycle::Stage::Retired => None,
                    _ => Some(state::spec::parse_yaml(&v.compiled)),
                };
                versions.push((api.name.clone(), v.version.clone(), doc));
            }
        }
        Parsed {
            spec: state::spec::parse_yaml(&next.spec_yaml),
            versions,
        }
    }

    fn needs_dns(&self) -> bool {
        self.spec.as_ref().is_ok_and(state::spec::needs_dns)
            || self.versions.iter().any(|(_, _, d)| {
                d.as_ref()
                    .is_some_and(|d| d.as_ref().is_ok_and(state::spec::needs_dns))
            })
    }
}

impl Compiler {
    /// The data plane's key table. A hash key that cannot be opened (no sealing key) lets
    /// no key in, and says why.
    fn auth_table(&self, access: &Access) -> AuthTable {
        let hash_key = match access.hash_key.is_empty() {
            true => Arc::from(&[][..]),
            false => self
                .identity
                .hash_key(&access.hash_key)
                .unwrap_or_else(|e| {
                    tracing::error!("API keys cannot be checked on this node: {}", e.message());
                    Arc::from(&[][..])
                }),
        };
        AuthTable::build(access, &hash_key)
    }

    async fn follow(
        self: Arc<Self>,
        mut applied: tokio::sync::watch::Receiver<Published>,
        stop: CancellationToken,
    ) {
        let mut answers = self.dns.subscribe();
        loop {
            let next = applied.borrow_and_update().clone();
            let dns_changed = self
                .built
                .lock()
                .expect("lock")
                .as_ref()
                .is_some_and(|b| b.dns != *answers.borrow_and_update());
            let secrets_changed = self
                .built
                .lock()
                .expect("lock")
                .as_ref()
                .is_some_and(|b| b.access.secrets != next.access.secrets);
            if next.generation != self.shared.snapshot.load().generation
                || secrets_changed
                || dns_changed
            {
                let this = self.clone();
                let reuse = self.reusable(&next);
                let parsed = (!reuse).then(|| Parsed::of(&next));
                // Building may resolve endpoint and member names (blocking): then off this
                // thread.
                if parsed.as_ref().is_some_and(|p| {
                    p.needs_dns() || state::egress::members_need_dns(&(self.members)())
                }) {
                    let _ = tokio::task::spawn_blocking(move || this.swap_in(&next, parsed)).await;
                } else {
                    this.swap_in(&next, parsed);
                }
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                changed = answers.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Whether the routing built last still fits `next` (same spec, same APIs, same DNS
    /// answers, same secrets: an upstream's client key or an LLM provider's API key may
    /// have been rotated under its name).
    fn reusable(&self, next: &Published) -> bool {
        let dns = *self.dns.subscribe().borrow();
        self.built.lock().expect("lock").as_ref().is_some_and(|b| {
            Arc::ptr_eq(&b.spec_yaml, &next.spec_yaml)
                && Arc::ptr_eq(&b.apis, &next.apis)
                && b.dns == dns
                && same_routing_secrets(&b.access.secrets, &next.access.secrets)
        })
    }

    /// Fails only when the spec itself does not compile here. A version that does not is
    /// left unavailable (503) and logged: one tenant's content cannot stop this node from
    /// taking everyone else's changes.
    ///
    /// A version's endpoints are checked again here, as they resolve on this node now,
    /// against the cluster spec's `tenant_upstreams` and the members' listeners: one that
    /// may not be reached (a name that resolves somewhere else than when it was checked,
    /// or a list the operator changed since) leaves the version unavailable (503).
    fn build_routing(&self, next: &Published, parsed: Parsed) -> Result<Routing, SpecErrors> {
        let spec = parsed.spec.and_then(Spec::from_value)?;
        let policy = &spec.tenant_upstreams;
        let own = if parsed.versions.is_empty() {
            state::egress::OwnAddrs::default()
        } else {
            state::egress::OwnAddrs::resolve(&(self.members)())
        };
        let mut versions = Vec::with_capacity(parsed.versions.len());
        for (name, version, doc) in parsed.versions {
            let api = &next.apis[&name];
            let v = &api.versions[&version];
            let checked = doc.map(|d| {
                d.and_then(Spec::from_value)
                    .and_then(|s| state::egress::check_spec(policy, &own, &s).map(|()| s))
            });
            let (spec, available) = match checked {
                None => (None, true),
                Some(Ok(spec)) => (Some(spec), true),
                Some(Err(e)) => {
                    metrics::counter!("tollgate_snapshot_build_failures_total").increment(1);
                    tracing::error!(
                        "cannot compile version {version} of API {name} on this node; it answers 503. {e}"
                    );
                    (None, false)
                }
            };
            versions.push(state::snapshot::VersionSpec {
                api,
                version: v,
                spec,
                available,
            });
        }
        let ring = self.identity.keyring();
        let open_jwks = |jwks: &str| -> Result<String, String> {
            auth::jwt::map_symmetric_keys(jwks, &|k| {
                if !identity::seal::is_sealed_text(k) {
                    return Ok(k.to_string());
                }
                let ring = ring.as_ref().ok_or("this node has no sealing key")?;
                ring.open_text(auth::jwt::JWKS_PURPOSE, k)
                    .map_err(|e| format!("a JWT key cannot be opened: {e}"))
            })
        };
        let secrets = &next.access.secrets;
        let open_secret = |name: &str| -> Result<Vec<u8>, String> {
            let s = secrets
                .get(name)
                .ok_or_else(|| format!("there is no secret {name}"))?;
            let ring = ring.as_ref().ok_or("this node has no sealing key")?;
            ring.open(&identity::secret_purpose(name), &s.value)
                .map_err(|e| format!("secret {name} cannot be opened: {e}"))
        };
        // Every address a host name has now; a tenant's only those it may reach (a name
        // may come to resolve somewhere the cluster's spec closes to API versions).
        let dns = &self.dns;
        let answers = |ep: &state::spec::EndpointSpec| -> Vec<std::net::SocketAddr> {
            let Some(checked) = ep.resolved else {
                return Vec::new();
            };
            if !routing::dns::is_name(&ep.host) {
                return Vec::new();
            }
            dns.cached(&ep.host)
                .unwrap_or_default()
                .into_iter()
                .map(|ip| std::net::SocketAddr::new(ip, checked.port()))
                .collect()
        };
        let tenant_answers = |ep: &state::spec::EndpointSpec| -> Vec<std::net::SocketAddr> {
            let (allowed, refused): (Vec<_>, Vec<_>) = answers(ep)
                .into_iter()
                .partition(|a| state::egress::check(policy, &own, *a).is_ok());
            for addr in refused {
                metrics::counter!("tollgate_dns_addresses_refused_total").increment(1);
                tracing::warn!(
                    "{} resolves to {addr}, which API versions may not reach: not used",
                    ep.address
                );
            }
            allowed
        };
        // A tenant's API versions may use only secrets named `<tenant>.<name>`: the
        // snapshot builder puts the version's own tenant in front of every name.
        let tenant_secrets = |name: &str| -> Result<Vec<u8>, String> {
            if !name.contains('.') {
                return Err(format!("an API version may not use secret {name}"));
            }
            open_secret(name)
        };
        let mut used = std::collections::HashSet::new();
        let specs = std::iter::once(&spec).chain(versions.iter().filter_map(|v| v.spec.as_ref()));
        for s in specs {
            let providers = s.providers.values().filter_map(|p| p.upstream.as_ref());
            for up in s.upstreams.values().chain(providers) {
                used.extend(
                    up.endpoints
                        .iter()
                        .filter(|e| routing::dns::is_name(&e.host))
                        .map(|e| e.host.to_ascii_lowercase()),
                );
            }
        }
        self.dns.retain(&used);
        Routing::build(
            &spec,
            &versions,
            &self.registry,
            &open_jwks,
            &routing::upstream::BuildCtx {
                open_secret: &open_secret,
                addresses: &answers,
            },
            &routing::upstream::BuildCtx {
                open_secret: &tenant_secrets,
                addresses: &tenant_answers,
            },
        )
    }

    /// Serves the certificates of `routing`'s spec with the keys of `next`'s state.
    fn update_tls(&self, routing: &Routing, next: &Published) {
        let ring = self.identity.keyring();
        self.shared.tls.update_hosts(&routing.host_specs);
        self.shared.tls.update(
            &routing.certificates,
            &next.access.secrets,
            ring.as_deref(),
            raft::service::now_ms(),
        );
    }

    fn swap_in(&self, next: &Published, parsed: Option<Parsed>) {
        // Taken first: an answer that changes while this builds is built again after.
        let dns_version = *self.dns.subscribe().borrow();
        let (routing, auth) = {
            let built = self.built.lock().expect("lock");
            let auth = built
                .as_ref()
                .filter(|b| Arc::ptr_eq(&b.access, &next.access))
                .map(|b| b.auth.clone());
            let routing = match (&parsed, built.as_ref()) {
                (None, Some(b)) => Some(b.routing.clone()),
                _ => None,
            };
            (routing, auth)
        };
        let new_routing = routing.is_none();
        let routing = match (routing, parsed) {
            (Some(r), _) => r,
            (None, parsed) => {
                let parsed = parsed.unwrap_or_else(|| Parsed::of(next));
                match self.build_routing(next, parsed) {
                    Ok(r) => Arc::new(r),
                    Err(errors) => {
                        // Checked on the leader, so this is local (a name that does not
                        // resolve here): keep serving the previous routes and say so, but
                        // take the new keys (a revocation must not wait for a fix).
                        metrics::counter!("tollgate_snapshot_build_failures_total").increment(1);
                        let current = self.shared.snapshot.load_full();
                        tracing::error!(
                            generation = next.generation,
                            "cannot compile the applied spec on this node; still serving the routes of generation {}. {errors}",
                            current.generation
                        );
                        self.update_tls(&current.routing, next);
                        self.shared.snapshot.store(Arc::new(Snapshot {
                            generation: current.generation,
                            routing: current.routing.clone(),
                            auth: Arc::new(self.auth_table(&next.access)),
                            circuits: next.circuits.clone(),
                            capped: next.capped.clone(),
                            billing: next.billing.clone(),
                            rollouts: next.rollouts.clone(),
                            rollout_counters: Arc::new(rollout::counters::for_rollouts(
                                &next.rollouts,
                                &current.rollout_counters,
                            )),
                        }));
                        return;
                    }
                }
            }
        };
        let auth = auth.unwrap_or_else(|| Arc::new(self.auth_table(&next.access)));
        let counters = rollout::counters::for_rollouts(
            &next.rollouts,
            &self.shared.snapshot.load().rollout_counters,
        );
        let snapshot = Arc::new(Snapshot {
            generation: next.generation,
            routing: routing.clone(),
            auth: auth.clone(),
            circuits: next.circuits.clone(),
            capped: next.capped.clone(),
            billing: next.billing.clone(),
            rollouts: next.rollouts.clone(),
            rollout_counters: Arc::new(counters),
        });
        if new_routing {
            let checks = routing::health::spawn_checks(&routing.clusters, &self.runtime);
            let old = std::mem::replace(&mut *self.health_checks.lock().expect("lock"), checks);
            old.cancel();
        }
        self.update_tls(&routing, next);
        self.shared.snapshot.store(snapshot);
        self.shared.synced.store(true, Ordering::Relaxed);
        *self.built.lock().expect("lock") = Some(Built {
            spec_yaml: next.spec_yaml.clone(),
            apis: next.apis.clone(),
            dns: dns_version,
            routing: routing.clone(),
            access: next.access.clone(),
            auth,
        });
        metrics::gauge!("tollgate_spec_generation").set(next.generation as f64);
        tracing::info!(
            generation = next.generation,
            routes = routing.routes.len(),
            apis = routing.mounts.len(),
            upstreams = routing.clusters.len(),
            rebuilt_routes = new_routing,
            "serving a new generation"
        );
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
    let format = settings.log_format;
    let result = telemetry::metrics::install()
        .and_then(|metrics| {
            start_traces(&settings)?;
            telemetry::logging::init(format, telemetry::logging::NODE_DEFAULT);
            Node::start(settings, metrics)
        })
        .and_then(|node| node.wait());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Once: as a log line where logs are machine-read, else as plain text.
        Err(e) if format == config::LogFormat::Json => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tollgate node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the node's trace export when its settings ask for one (before the log is set
/// up, so `tracing` spans can be exported too).
pub fn start_traces(settings: &Settings) -> anyhow::Result<()> {
    if let Some(config) = &settings.traces {
        telemetry::traces::install(
            config,
            &telemetry::traces::Identity {
                service: "tollgate-node",
                instance: format!("node-{}", settings.id),
                region: Some(settings.region.clone()),
                environment: settings.environment.clone(),
            },
        )?;
    }
    Ok(())
}

/// Reads a spec file and checks it the way a write would.
fn read_spec_file(path: &Path, max_bytes: usize) -> Result<String, SpecErrors> {
    state::machine::check_spec(&read_spec_text(path)?, max_bytes).map(|c| c.yaml)
}

/// Reads and checks a spec file.
pub fn read_spec(path: &Path) -> Result<Spec, SpecErrors> {
    Spec::from_yaml(&read_spec_text(path)?)
}

fn read_spec_text(path: &Path) -> Result<String, SpecErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        let mut errors = SpecErrors::default();
        errors.push("spec", format!("cannot read {}: {e}", path.display()));
        errors
    })
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
    spec: Option<PathBuf>,
    cluster: Arc<Cluster>,
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
                // A sealing key added to the file (a rotation under way) is taken now.
                match cluster.identity.reload_keyring() {
                    Ok(ring) => tracing::info!(
                        keys = ?ring.keys().iter().map(|k| k.id_hex()).collect::<Vec<_>>(),
                        "SIGHUP: sealing keys read again"
                    ),
                    Err(e) => tracing::debug!("SIGHUP: sealing keys not read again: {e:#}"),
                }
                // Re-apply the --spec file through the cluster (forwarded to the leader), not
                // awaited here, so a SIGTERM during a slow apply is handled at once.
                if let Some(path) = spec.clone() {
                    let cluster = cluster.clone();
                    tokio::spawn(async move { reapply(&cluster, &path).await });
                }
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

async fn reapply(cluster: &Cluster, path: &Path) {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("SIGHUP: cannot read {}: {e}", path.display());
            return;
        }
    };
    let req = tollgate_proto::node::v1::ApplySpecRequest {
        spec_yaml: text,
        dry_run: false,
        request_id: String::new(),
    };
    match cluster.apply_spec(req, false, &Caller::Node).await {
        Ok(r) => {
            metrics::counter!("tollgate_spec_reloads_total", "result" => "ok").increment(1);
            tracing::info!(generation = r.generation, added = ?r.added, changed = ?r.changed, removed = ?r.removed, "SIGHUP: spec applied");
        }
        Err(s) => {
            metrics::counter!("tollgate_spec_reloads_total", "result" => "invalid").increment(1);
            tracing::error!(
                "SIGHUP: spec refused, the cluster keeps the previous one. {}",
                s.message()
            );
        }
    }
}

/// Why a listener could not be opened, with what to do about it: for a port in use, that
/// another process (often another `tollgate dev` or node) holds it and which flag moves
/// this one.
pub fn listen_error(what: &str, addr: SocketAddr, flag: &str, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {addr} for the {what}: another process already listens there \
             (another `tollgate dev` or node? `ss -ltnp 'sport = :{port}'` shows which). \
             Stop it, or give this one another address with {flag}",
            port = addr.port()
        ),
        std::io::ErrorKind::AddrNotAvailable => anyhow::anyhow!(
            "cannot listen on {addr} for the {what}: no interface of this machine has that \
             address; pass one it has with {flag} (e.g. 127.0.0.1:{port} or 0.0.0.0:{port})",
            port = addr.port()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot listen on {addr} for the {what}: permission denied (ports below 1024 need \
             privileges); pass a port above 1023 with {flag}"
        ),
        _ => anyhow::anyhow!("cannot listen on {addr} for the {what} ({flag}): {e}"),
    }
}

/// The file in the data dir where the bootstrapping node writes the operator token.
pub const OPERATOR_TOKEN_FILE: &str = "operator-token";

/// Writes a secret to a new file only its owner can read.
fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

fn write_addr_file(path: &Path, addrs: &BoundAddrs) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(addrs)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::reachable;

    #[test]
    fn listeners_on_every_interface_are_shown_at_the_advertised_host() {
        let any = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            reachable(any, "tollgate-0.peers:7070"),
            "tollgate-0.peers:8080"
        );
        assert_eq!(
            reachable("[::]:9090".parse().unwrap(), "[fd00::1]:7070"),
            "[fd00::1]:9090"
        );
        assert_eq!(
            reachable("127.0.0.1:8080".parse().unwrap(), "tollgate-0:7070"),
            "127.0.0.1:8080"
        );
    }
}
