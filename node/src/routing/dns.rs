//! Upstream host names, resolved as their DNS records say.
//!
//! Every host name an endpoint is written with is looked up when the spec is checked and
//! compiled, then again when its answer's TTL runs out (kept between `--dns-min-ttl` and
//! `--dns-max-ttl`). Every address of the answer becomes an endpoint of the upstream; when
//! the answer changes, the node compiles its routing again, so new addresses take traffic
//! and connections to the ones that went away drain (in-flight requests finish, idle
//! connections close). A lookup that fails keeps the last good answer, is counted, and is
//! tried again after the minimum interval.
//!
//! Lookups go to the system's resolvers (`/etc/resolv.conf`, `/etc/hosts`), or to the
//! servers `--dns-resolver` names.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Most host names kept (each is one entry; a spec names far fewer).
const MAX_NAMES: usize = 10_000;

/// The resolver settings of a node.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Name servers (`ip:port`); empty: the system's.
    pub servers: Vec<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            servers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// The node's upstream DNS: a cache of answers refreshed as their TTLs say.
pub struct Dns {
    resolver: TokioResolver,
    runtime: tokio::runtime::Handle,
    settings: DnsSettings,
    entries: Mutex<HashMap<String, Entry>>,
    /// Bumped when an answer changes: the node compiles its routing again.
    changed: watch::Sender<u64>,
    /// Wakes the refresh loop when a new name is added.
    wake: Notify,
}

#[derive(Debug, Clone)]
struct Entry {
    addrs: Vec<IpAddr>,
    refresh_at: Instant,
}

static GLOBAL: Mutex<Option<Arc<Dns>>> = Mutex::new(None);

/// The node's resolver, once [`install`]ed (spec checks use it through
/// [`Dns::resolve_blocking`]).
pub fn global() -> Option<Arc<Dns>> {
    GLOBAL.lock().expect("lock").clone()
}

/// Makes `dns` the process's resolver for spec checks (the last node started in a process
/// wins; a process runs one node but in tests).
pub fn install(dns: Arc<Dns>) {
    *GLOBAL.lock().expect("lock") = Some(dns);
}

impl Dns {
    /// A resolver on `runtime` (lookups and the refresh loop run there).
    pub fn new(settings: DnsSettings, runtime: tokio::runtime::Handle) -> anyhow::Result<Arc<Dns>> {
        let mut builder = if settings.servers.is_empty() {
            TokioResolver::builder_tokio().unwrap_or_else(|e| {
                // No /etc/resolv.conf (a bare container): IP addresses and /etc/hosts
                // still work; a host name fails its check, saying why.
                tracing::warn!(
                    "cannot read the system's DNS settings ({e}); upstream host names will not \
                     resolve unless --dns-resolver names a server"
                );
                TokioResolver::builder_with_config(
                    ResolverConfig::new(),
                    TokioConnectionProvider::default(),
                )
            })
        } else {
            let mut config = ResolverConfig::new();
            for server in &settings.servers {
                config.add_name_server(NameServerConfig::new(*server, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*server, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        let options: &mut ResolverOpts = builder.options_mut();
        // Answers are cached here, with their TTLs; the resolver asks every time.
        options.cache_size = 0;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        let resolver = builder.build();
        Ok(Arc::new(Dns {
            resolver,
            runtime,
            settings,
            entries: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            wake: Notify::new(),
        }))
    }

    /// Changes of any answer, for the node to compile its routing again.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The addresses `host` has now, from the cache (None: never resolved).
    pub fn cached(&self, host: &str) -> Option<Vec<IpAddr>> {
        self.entries
            .lock()
            .expect("lock")
            .get(&host.to_ascii_lowercase())
            .map(|e| e.addrs.clone())
    }

    /// Forgets the names no endpoint uses any more.
    pub fn retain(&self, used: &HashSet<String>) {
        self.entries
            .lock()
            .expect("lock")
            .retain(|host, _| used.contains(host));
    }

    /// Looks `host` up now and caches the answer (a failure keeps what was cached).
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let host = host.to_ascii_lowercase();
        let now = Instant::now();
        let answer = tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup_ip(host.as_str()))
            .await
            .map_err(|_| format!("no answer within {LOOKUP_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let mut entries = self.entries.lock().expect("lock");
        match answer {
            Ok(lookup) => {
                let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    return Err(format!("{host} has no address"));
                }
                let ttl = lookup.valid_until().saturating_duration_since(now);
                let ttl = ttl.clamp(self.settings.min_ttl, self.settings.max_ttl);
                ::metrics::counter!("tollgate_dns_lookups_total", "result" => "ok").increment(1);
                let changed = entries.get(&host).is_some_and(|e| e.addrs != addrs);
                if entries.len() < MAX_NAMES || entries.contains_key(&host) {
                    entries.insert(
                        host.clone(),
                        Entry {
                            addrs: addrs.clone(),
                            refresh_at: now + ttl,
                        },
                    );
                }
                drop(entries);
                if changed {
                    tracing::info!(host = %host, addresses = ?addrs, "an upstream host name has new addresses");
                    self.changed.send_modify(|v| *v += 1);
                }
                Ok(addrs)
            }
            Err(e) => {
                ::metrics::counter!("tollgate_dns_lookups_total", "result" => "failed")
                    .increment(1);
                if let Some(entry) = entries.get_mut(&host) {
                    entry.refresh_at = now + self.settings.min_ttl;
                    tracing::warn!(
                        host = %host,
                        "cannot resolve an upstream host name ({e}); keeping its last answer {:?}",
                        entry.addrs
                    );
                }
                Err(format!("cannot resolve {host}: {e}"))
            }
        }
    }

    /// Looks up every name in `hosts` not cached yet (at most [`LOOKUP_TIMEOUT`] each, in
    /// parallel), so a compile can read them all from the cache.
    pub async fn ensure(&self, hosts: &HashSet<String>) {
        let missing: Vec<String> = {
            let entries = self.entries.lock().expect("lock");
            hosts
                .iter()
                .filter(|h| !entries.contains_key(*h))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let lookups = missing.iter().map(|h| self.lookup(h));
        let _ = futures::future::join_all(lookups).await;
        self.wake.notify_one();
    }

    /// The address `host:port` is written as, resolved for a check: the cached answer's
    /// first address, else a lookup now. Blocks: call it off the async threads.
    pub fn resolve_blocking(self: &Arc<Self>, host: &str, port: u16) -> Result<SocketAddr, String> {
        if let Some(addrs) = self.cached(host)
            && let Some(ip) = addrs.first()
        {
            return Ok(SocketAddr::new(*ip, port));
        }
        let (dns, name) = (self.clone(), host.to_string());
        // A thread of its own: `block_on` cannot run on a thread that drives a runtime.
        let found = std::thread::spawn(move || dns.runtime.block_on(dns.lookup(&name)))
            .join()
            .map_err(|_| "the DNS lookup failed".to_string())??;
        self.wake.notify_one();
        Ok(SocketAddr::new(found[0], port))
    }

    /// Refreshes each name when its TTL runs out, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let now = Instant::now();
            let (due, next): (Vec<String>, Option<Instant>) = {
                let entries = self.entries.lock().expect("lock");
                let due = entries
                    .iter()
                    .filter(|(_, e)| e.refresh_at <= now)
                    .map(|(h, _)| h.clone())
                    .collect();
                let next = entries
                    .values()
                    .map(|e| e.refresh_at)
                    .filter(|t| *t > now)
                    .min();
                (due, next)
            };
            let lookups = due.iter().map(|h| self.lookup(h));
            let _ = futures::future::join_all(lookups).await;
            if !due.is_empty() {
                continue;
            }
            let wait = next
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(self.settings.max_ttl);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// Whether an endpoint host is a name to resolve (not an IP address).
pub fn is_name(host: &str) -> bool {
    !host.is_empty() && host.parse::<IpAddr>().is_err()
}
