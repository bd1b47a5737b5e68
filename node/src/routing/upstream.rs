//! Upstream clusters as the data plane uses them: endpoints with their live state,
//! load balancing, the retry budget and passive outlier ejection.
//!
//! A [`Cluster`] is part of an immutable snapshot, but the state that must outlive a spec
//! reload (in-flight counts, health, ejections) sits in [`EndpointState`]s that the
//! [`EndpointRegistry`] hands out again for the same (cluster, address) when the next
//! snapshot is built. The request path only touches atomics here.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::state::spec::{
    HealthCheckSpec, LbPolicy, OutlierSpec, RetryBudgetSpec, RetryOn, UpstreamSpec,
};

/// Milliseconds on a process-wide monotonic clock, for timestamps kept in atomics.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The live state of one endpoint; shared by every snapshot that contains it.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// Requests sent and not yet answered in full.
    pub in_flight: AtomicUsize,
    /// Active health checks' verdict (true when no health check is configured).
    pub healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    fn available(&self, now: u64) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.is_ejected(now)
    }
}

/// Hands out the same [`EndpointState`] for the same (cluster, address) across snapshots.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    states: Mutex<HashMap<(String, SocketAddr), Arc<EndpointState>>>,
}

impl EndpointRegistry {
    fn get(&self, cluster: &str, addr: SocketAddr) -> Arc<EndpointState> {
        let mut states = self.states.lock().expect("registry lock poisoned");
        states
            .entry((cluster.to_string(), addr))
            .or_insert_with(|| Arc::new(EndpointState::new(addr)))
            .clone()
    }

    /// Forgets endpoints that are not in the latest spec.
    pub fn retain(&self, keep: &dyn Fn(&str, SocketAddr) -> bool) {
        let mut states = self.states.lock().expect("registry lock poisoned");
        states.retain(|(cluster, addr), _| keep(cluster, *addr));
    }
}

#[derive(Debug)]
pub struct Endpoint {
    pub weight: u32,
    pub state: Arc<EndpointState>,
    /// The endpoint's host as written (a DNS name or an IP address), for TLS.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// A compiled upstream cluster.
#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    pub policy: LbPolicy,
    pub hash_header: Option<http::HeaderName>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    pub retry_attempts: u32,
    pub retry_on: Vec<RetryOn>,
    budget: RetryBudgetSpec,
    outlier: Option<OutlierSpec>,
    pub health_check: Option<HealthCheckSpec>,
    /// The cluster-wide circuit breaker's local side, when the spec sets one.
    pub circuit: Option<crate::routing::circuit::CircuitRuntime>,
    /// HTTPS to the endpoints, when the spec says so.
    pub tls: Option<Arc<crate::proxy::upstream_tls::UpstreamTls>>,
    /// Smooth weighted round-robin order of endpoint indexes.
    schedule: Vec<u32>,
    /// Consistent-hash ring: (point, endpoint index), sorted by point.
    ring: Vec<(u64, u32)>,
    cursor: AtomicUsize,
    /// Requests and retries in flight, for the retry budget.
    active_requests: AtomicUsize,
    active_retries: AtomicUsize,
}

/// What compiling a cluster needs from the node beyond the spec.
pub struct BuildCtx<'a> {
    /// Opens the named secrets the spec refers to (an upstream client certificate's key).
    pub open_secret: &'a dyn Fn(&str) -> Result<Vec<u8>, String>,
    /// Every address an endpoint has now (a host name's current DNS answer); empty: the
    /// address it was checked with.
    pub addresses: &'a dyn Fn(&crate::state::spec::EndpointSpec) -> Vec<std::net::SocketAddr>,
}

impl BuildCtx<'static> {
    /// No secrets; each endpoint at the address it was checked with.
    pub fn plain() -> BuildCtx<'static> {
        BuildCtx {
            open_secret: &|s| Err(format!("secret {s} is not available here")),
            addresses: &|_| Vec::new(),
        }
    }
}

impl Cluster {
    pub fn build(name: &str, spec: &UpstreamSpec, registry: &EndpointRegistry) -> Cluster {
        Cluster::build_with(name, spec, registry, &BuildCtx::plain())
    }

    /// The same, with the node's secrets and DNS answers.
    pub fn build_with(
        name: &str,
        spec: &UpstreamSpec,
        registry: &EndpointRegistry,
        ctx: &BuildCtx<'_>,
    ) -> Cluster {
        let open_secret = ctx.open_secret;
        let https = spec.tls.clone().or_else(|| {
            spec.endpoints
                .iter()
                .any(|e| e.scheme == Some(crate::state::spec::Scheme::Https))
                .then_some(crate::state::spec::UpstreamTlsSpec {
                    ca: None,
                    server_name: None,
                    verify: true,
                    h2: true,
                    client_certificate: None,
                })
        });
        let tls = https.map(|t| {
            if !t.verify {
                tracing::warn!(
                    upstream = name,
                    "upstream {name} does not verify its endpoints' certificates (tls.verify: false)"
                );
            }
            Arc::new(crate::proxy::upstream_tls::UpstreamTls::compile(&t, open_secret))
        });
        if let Some(e) = tls.as_ref().and_then(|t| t.broken.as_ref()) {
            tracing::error!("upstream {name}: TLS cannot be set up on this node: {e}");
        }
        let endpoints: Vec<Endpoint> = spec
            .endpoints
            .iter()
            .flat_map(|e| {
                let checked = e
                    .resolved
                    .expect("Spec::from_yaml resolves every endpoint it accepts");
                let mut addrs = (ctx.addresses)(e);
                if addrs.is_empty() {
                    addrs.push(checked);
                }
                addrs.into_iter().map(move |addr| (e, addr))
            })
            .map(|(e, addr)| {
                let state = registry.get(name, addr);
                if spec.health_check.is_none() {
                    // No checks any more: a verdict from an earlier spec must not linger.
                    state.healthy.store(true, Ordering::Relaxed);
                }
                Endpoint {
                    weight: e.weight,
                    state,
                    server_name: server_name(&e.host, addr),
                }
            })
            .collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let ring = if spec.load_balancing.policy == LbPolicy::ConsistentHash {
            build_ring(&endpoints)
        } else {
            Vec::new()
        };
        Cluster {
            tls,
            circuit: spec
                .circuit_breaker
                .as_ref()
                .map(|c| crate::routing::circuit::CircuitRuntime::new(name, c)),
            name: Arc::from(name),
            schedule: smooth_wrr(&weights),
            ring,
            endpoints,
            policy: spec.load_balancing.policy,
            hash_header: spec
                .load_balancing
                .hash_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            connect_timeout: spec.timeouts.connect,
            request_timeout: spec.timeouts.request,
            idle_timeout: spec.timeouts.idle,
            max_idle_per_endpoint: spec.pool.max_idle_per_endpoint,
            retry_attempts: spec.retries.attempts,
            retry_on: spec.retries.on.clone(),
            budget: spec.retries.budget.clone(),
            outlier: spec.outlier_detection.clone(),
            health_check: spec.health_check.clone(),
            cursor: AtomicUsize::new(0),
            active_requests: AtomicUsize::new(0),
            active_retries: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint for a request, skipping unhealthy and ejected ones and, when
    /// possible, the ones in `avoid` (endpoints that already failed this request).
    /// `None` when no endpoint is available.
    pub fn select(&self, hash_key: Option<&[u8]>, avoid: &[usize]) -> Option<usize> {
        let now = now_ms();
        let usable = |i: usize| self.endpoints[i].state.available(now);
        let preferred = |i: usize| usable(i) && !avoid.contains(&i);
        self.pick(hash_key, &preferred)
            .or_else(|| self.pick(hash_key, &usable))
    }

    fn pick(&self, hash_key: Option<&[u8]>, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        match (self.policy, hash_key) {
            (LbPolicy::ConsistentHash, Some(key)) if !self.ring.is_empty() => {
                let h = hash64(key);
                let start = self.ring.partition_point(|(p, _)| *p < h);
                (0..self.ring.len())
                    .map(|k| self.ring[(start + k) % self.ring.len()].1 as usize)
                    .find(|&i| ok(i))
            }
            (LbPolicy::LeastRequest, _) => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<(usize, u64)> = None;
                for k in 0..n {
                    let i = (start + k) % n;
                    if !ok(i) {
                        continue;
                    }
                    let e = &self.endpoints[i];
                    // Compare load per unit of weight: (in_flight + 1) / weight.
                    let load = (e.state.in_flight.load(Ordering::Relaxed) as u64 + 1) * 10_000
                        / e.weight as u64;
                    if best.is_none_or(|(_, b)| load < b) {
                        best = Some((i, load));
                    }
                }
                best.map(|(i, _)| i)
            }
            _ => {
                // Each skipped slot is taken from the shared cursor, so an unavailable
                // endpoint's turns are spread over the others instead of all going to
                // the one after it in the schedule.
                let len = self.schedule.len();
                (0..len)
                    .map(|_| {
                        let slot = self.cursor.fetch_add(1, Ordering::Relaxed);
                        self.schedule[slot % len] as usize
                    })
                    .find(|&i| ok(i))
            }
        }
    }

    /// Counts a request in flight for the retry budget until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> ActiveGuard {
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            cluster: self.clone(),
            retry: false,
        }
    }

    /// Takes a place in the retry budget, or says no.
    pub fn try_begin_retry(self: &Arc<Self>) -> Option<ActiveGuard> {
        let active = self.active_requests.load(Ordering::Relaxed);
        let allowed = ((active as f64 * self.budget.percent / 100.0) as usize)
            .max(self.budget.min_concurrency as usize);
        let retries = self.active_retries.fetch_add(1, Ordering::Relaxed);
        if retries >= allowed {
            self.active_retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ActiveGuard {
            cluster: self.clone(),
            retry: true,
        })
    }

    /// Records the outcome of one attempt on an endpoint for passive outlier detection.
    /// Returns true when this failure ejected the endpoint.
    pub fn record_outcome(&self, endpoint: usize, failed: bool) -> bool {
        let state = &self.endpoints[endpoint].state;
        if !failed {
            state.consecutive_failures.store(0, Ordering::Relaxed);
            return false;
        }
        let Some(outlier) = &self.outlier else {
            return false;
        };
        let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures {
            return false;
        }
        let now = now_ms();
        if state.is_ejected(now) {
            return false;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.state.is_ejected(now))
            .count();
        let max = ((self.endpoints.len() as f64 * outlier.max_ejection_percent / 100.0) as usize)
            .max(usize::from(outlier.max_ejection_percent > 0.0));
        if ejected >= max {
            return false;
        }
        let times = (state.ejections.fetch_add(1, Ordering::Relaxed) + 1).min(10);
        let duration = outlier.base_ejection_time.as_millis() as u64 * times as u64;
        state.ejected_until.store(now + duration, Ordering::Relaxed);
        state.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }
}

/// Holds a request (or retry) in the cluster's budget counts.
#[derive(Debug)]
pub struct ActiveGuard {
    cluster: Arc<Cluster>,
    retry: bool,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let counter = if self.retry {
            &self.cluster.active_retries
        } else {
            &self.cluster.active_requests
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

fn hash64(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Nginx's smooth weighted round-robin, unrolled into one period. Weights whose sum
/// passes 10,000 are scaled down first (each keeps at least 1), so the period stays
/// short and every endpoint keeps a place in it.
fn smooth_wrr(weights: &[u32]) -> Vec<u32> {
    const MAX_PERIOD: u64 = 10_000;
    let gcd = weights.iter().copied().fold(0, gcd).max(1);
    let mut reduced: Vec<i64> = weights.iter().map(|w| (*w / gcd) as i64).collect();
    let sum: u64 = reduced.iter().map(|w| *w as u64).sum();
    if sum > MAX_PERIOD {
        for w in &mut reduced {
            *w = ((*w as u64 * MAX_PERIOD / sum) as i64).max(1);
        }
    }
    let total: i64 = reduced.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total.max(1) as usize);
    for _ in 0..total.max(1) {
        let mut best = 0;
        for i in 0..current.len() {
            current[i] += reduced[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A ketama-style ring: 100 points per unit of weight (at most 10,000 per endpoint).
/// The name TLS checks an endpoint's certificate against: its host as written, or its
/// address when that is not a DNS name.
fn server_name(host: &str, addr: std::net::SocketAddr) -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| rustls_pki_types::ServerName::IpAddress(addr.ip().into()))
}

fn build_ring(endpoints: &[Endpoint]) -> Vec<(u64, u32)> {
    let mut ring = Vec::new();
    for (i, e) in endpoints.iter().enumerate() {
        let points = (e.weight as usize * 100).min(10_000);
        let key = e.state.addr.to_string();
        for p in 0..points {
            ring.push((hash64(format!("{key}#{p}").as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

#[cfg(test)]
mod tests;
