//! Node settings, from three sources: flags, `TOLLGATE_*` environment variables and a TOML
//! file (`--config`). A flag beats its environment variable (clap does that), which beats
//! the file, which beats the default.
//!
//! Two types, as usual: [`NodeArgs`] / [`FileSettings`] say what was written, every field
//! optional; [`Settings`] is the checked result the node runs with. Documented in
//! `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::raft::RaftSettings;
use crate::telemetry::traces::{self, TraceArgs, TraceConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How the kernel schedules the data-plane threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuScheduling {
    /// SCHED_OTHER, like every other process.
    Normal,
    /// SCHED_BATCH: the threads are not preempted as soon as they wake a peer (the client,
    /// the upstream), so they do more work per time slice: more requests per second and
    /// less CPU per request on a busy host (docs/benchmarks.md). Needs no privilege.
    #[default]
    Batch,
}

/// Whether a node takes itself out of the membership when it shuts down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaveOnShutdown {
    /// A learner leaves; a voter stays (a restart keeps it a voter).
    #[default]
    Auto,
    /// Leave whatever the role (a voter only when a learner can take its place).
    Always,
    /// Stay a member (an operator removes it, or the leader evicts it).
    Never,
}

/// The node's settings as flags (each also read from its `TOLLGATE_*` variable).
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML file with any of these settings (flags and environment override it).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's identity in the cluster [default: 1]
    #[arg(long, env = "TOLLGATE_ID")]
    pub id: Option<u64>,
    /// Where the node keeps its state [default: ./tollgate-data]
    #[arg(long, env = "TOLLGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Proxy listener, HTTP/1.1 and h2c [default: 127.0.0.1:8080]
    #[arg(long, env = "TOLLGATE_PROXY_ADDR")]
    pub proxy_addr: Option<SocketAddr>,
    /// HTTPS proxy listener (HTTP/1.1 and h2 by ALPN), serving the spec's certificates
    /// [default: none]
    #[arg(long, env = "TOLLGATE_HTTPS_ADDR")]
    pub https_addr: Option<SocketAddr>,
    /// DNS servers for upstream host names, `ip:port`, comma-separated [default: the
    /// system's, from /etc/resolv.conf]
    #[arg(long, env = "TOLLGATE_DNS_RESOLVER", value_delimiter = ',')]
    pub dns_resolver: Option<Vec<SocketAddr>>,
    /// Re-resolve an upstream host name no sooner than this, whatever its TTL [default: 1s]
    #[arg(long, env = "TOLLGATE_DNS_MIN_TTL", value_parser = parse_duration)]
    pub dns_min_ttl: Option<Duration>,
    /// Re-resolve an upstream host name at least this often, whatever its TTL [default: 5m]
    #[arg(long, env = "TOLLGATE_DNS_MAX_TTL", value_parser = parse_duration)]
    pub dns_max_ttl: Option<Duration>,
    /// Node gRPC listener (node admin API and Raft) [default: 127.0.0.1:7070]
    #[arg(long, env = "TOLLGATE_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP admin listener: /healthz, /readyz, /metrics [default: 127.0.0.1:7071]
    #[arg(long, env = "TOLLGATE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// The node's region [default: default]
    #[arg(long, env = "TOLLGATE_REGION")]
    pub region: Option<String>,
    /// Spec file (YAML) applied when this node bootstraps a new cluster, and again on SIGHUP.
    #[arg(long, env = "TOLLGATE_SPEC")]
    pub spec: Option<PathBuf>,
    /// Process log format [default: text]
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Access log: `stdout`, `off` or a file path [default: stdout]
    #[arg(long, env = "TOLLGATE_ACCESS_LOG")]
    pub access_log: Option<String>,
    /// Data-plane threads; 0 means one per CPU [default: 0]
    #[arg(long, env = "TOLLGATE_WORKERS")]
    pub workers: Option<usize>,
    /// Kernel scheduling policy of the data-plane threads [default: batch]
    #[arg(long, env = "TOLLGATE_CPU_SCHEDULING", value_enum)]
    pub cpu_scheduling: Option<CpuScheduling>,
    /// Most client connections open at once; more are answered 503 and closed [default: 10000]
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connection slots one client address may hold (`/64` for IPv6; an HTTP/2
    /// stream beside another on its connection takes a slot too); 0: no per-client limit.
    /// Behind a load balancer that hides client addresses, set 0 [default: 1000]
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<usize>,
    /// Close a client connection with no request in flight for this long, e.g. `60s` [default: 60s]
    #[arg(long, env = "TOLLGATE_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Close a client connection that takes nothing of a response for this long (a client
    /// that stopped reading, or an HTTP/2 window held at zero), e.g. `30s` [default: 30s]
    #[arg(long, env = "TOLLGATE_SEND_TIMEOUT", value_parser = parse_duration)]
    pub send_timeout: Option<Duration>,
    /// Slowest average rate, in bytes per second, a request body may arrive at once its
    /// grace period is over; slower gets 408 (gRPC bodies are exempt); 0: off [default: 256]
    #[arg(long, env = "TOLLGATE_MIN_REQUEST_BODY_RATE")]
    pub min_request_body_rate: Option<u64>,
    /// How long a request body may take before its rate is held to
    /// --min-request-body-rate, e.g. `10s` [default: 10s]
    #[arg(long, env = "TOLLGATE_REQUEST_BODY_GRACE", value_parser = parse_duration)]
    pub request_body_grace: Option<Duration>,
    /// Largest request body in bytes; larger ones get 413 [default: 10485760]
    #[arg(long, env = "TOLLGATE_MAX_REQUEST_BODY")]
    pub max_request_body: Option<u64>,
    /// Largest request head (request line and headers) in bytes; larger get 431 [default: 32768]
    #[arg(long, env = "TOLLGATE_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// How long a client may take to send a request head, e.g. `10s` [default: 10s]
    #[arg(long, env = "TOLLGATE_HEADER_READ_TIMEOUT", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// On SIGTERM, how long in-flight requests may finish, e.g. `30s` [default: 30s]
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// On SIGTERM, how long to keep accepting while /readyz already says "draining", so
    /// load balancers stop sending first, e.g. `5s` [default: 0s]
    #[arg(long, env = "TOLLGATE_SHUTDOWN_DELAY", value_parser = parse_duration)]
    pub shutdown_delay: Option<Duration>,
    /// Write the bound addresses as JSON to this file once listening (for scripts and tests).
    #[arg(long, env = "TOLLGATE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Start a new cluster with this node as its first voter (ignored once the data
    /// directory holds a cluster's state).
    #[arg(long, env = "TOLLGATE_BOOTSTRAP")]
    pub bootstrap: bool,
    /// Join the cluster through this member's gRPC address (HOST:PORT).
    #[arg(long, env = "TOLLGATE_JOIN")]
    pub join: Option<String>,
    /// The join token a new node enrolls with (`tollgate cluster join-token create`); only
    /// needed the first time a node joins: it then holds its certificate.
    #[arg(long, env = "TOLLGATE_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Read the join token from this file, waiting up to 2 minutes for it to appear (a
    /// mounted secret, or the file a bootstrapping node writes with
    /// --bootstrap-join-token-file).
    #[arg(long, env = "TOLLGATE_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// On the bootstrapping node: when it makes the cluster, also make a join token (good
    /// for --bootstrap-join-token-uses enrollments within a day) and write it to this file
    /// (mode 0600), for nodes and control planes started beside it (see deploy/).
    #[arg(long, env = "TOLLGATE_BOOTSTRAP_JOIN_TOKEN_FILE")]
    pub bootstrap_join_token_file: Option<PathBuf>,
    /// How many enrollments the bootstrap join token is good for [default: 10]
    #[arg(long, env = "TOLLGATE_BOOTSTRAP_JOIN_TOKEN_USES")]
    pub bootstrap_join_token_uses: Option<u32>,
    /// The cluster's voter policy, on the node that leads: a joining node becomes a voter
    /// while the cluster has fewer voters than this, else stays a learner [default: 3]
    #[arg(long, env = "TOLLGATE_VOTERS")]
    pub voters: Option<u32>,
    /// The file holding the sealing keys that open the cluster's secrets (made by a
    /// bootstrapping node, written by an enrolling one) [default: <data-dir>/sealing-key].
    /// TOLLGATE_SEALING_KEY gives the keys themselves instead.
    #[arg(long, env = "TOLLGATE_SEALING_KEY_FILE")]
    pub sealing_key_file: Option<PathBuf>,
    /// How long node certificates this node issues are valid, e.g. `30d` (they are renewed
    /// when a third of that is left) [default: 30d]
    #[arg(long, env = "TOLLGATE_CERT_LIFETIME", value_parser = parse_duration)]
    pub cert_lifetime: Option<Duration>,
    /// Run without node identity: plain gRPC between nodes, no certificates, every caller
    /// that can reach the gRPC port trusted. For tests and trusted networks only.
    #[arg(long, env = "TOLLGATE_INSECURE_CLUSTER")]
    pub insecure_cluster: bool,
    /// The gRPC address peers dial to reach this node, `IP:PORT` or `HOST:PORT` (a DNS
    /// name, e.g. a StatefulSet pod's) [default: the bound --grpc-addr]
    #[arg(long, env = "TOLLGATE_ADVERTISE_ADDR", value_parser = parse_peer_addr)]
    pub advertise_addr: Option<String>,
    /// Raft heartbeat interval, e.g. `75ms` [default: 75ms]
    #[arg(long, env = "TOLLGATE_RAFT_HEARTBEAT", value_parser = parse_duration)]
    pub raft_heartbeat: Option<Duration>,
    /// Raft election timeout (the lower bound; the upper is twice it), e.g. `300ms` [default: 300ms]
    #[arg(long, env = "TOLLGATE_RAFT_ELECTION_TIMEOUT", value_parser = parse_duration)]
    pub raft_election_timeout: Option<Duration>,
    /// Snapshot the state and compact the log every N entries [default: 5000]
    #[arg(long, env = "TOLLGATE_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot for slow followers [default: 1000]
    #[arg(long, env = "TOLLGATE_KEEP_LOGS")]
    pub keep_logs: Option<u64>,
    /// Largest spec a write may carry, in bytes [default: 1048576]
    #[arg(long, env = "TOLLGATE_MAX_SPEC_BYTES")]
    pub max_spec_bytes: Option<usize>,
    /// Export traces over OTLP to this collector, e.g. `http://collector:4317` (else
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; none: no traces)
    #[arg(long, env = "TOLLGATE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: `grpc` or `http/protobuf` (else OTEL_EXPORTER_OTLP_PROTOCOL) [default: grpc]
    #[arg(long, env = "TOLLGATE_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Share of new traces to keep, 0 to 1; requests with a `traceparent` follow their
    /// caller (else OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG) [default: 1]
    #[arg(long, env = "TOLLGATE_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
    /// `deployment.environment` of this node's traces [default: production]
    #[arg(long, env = "TOLLGATE_ENVIRONMENT")]
    pub environment: Option<String>,
    /// Count usage per tenant, API, version and key for costs and `tollgate usage`: `on` or
    /// `off` [default: on]
    #[arg(long, env = "TOLLGATE_METERING", value_parser = parse_on_off)]
    pub metering: Option<bool>,
    /// How often counted usage is journaled to disk and shipped to the cluster: what a
    /// node killed outright can lose, e.g. `1s` [default: 1s]
    #[arg(long, env = "TOLLGATE_METER_INTERVAL", value_parser = parse_duration)]
    pub meter_interval: Option<Duration>,
    /// Put LLM prompts and answers in the provider calls' spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`): `on` or `off` [default: off]
    #[arg(long, env = "TOLLGATE_LLM_CAPTURE_CONTENT", value_parser = parse_on_off)]
    pub llm_capture_content: Option<bool>,
    /// Bytes of LLM answers this node keeps for API versions with a `response_cache`
    /// (0: none) [default: 67108864, 64 MiB]
    #[arg(long, env = "TOLLGATE_LLM_CACHE_BYTES")]
    pub llm_cache_bytes: Option<u64>,
    /// Record every request this node serves in its call log (`tollgate logs`): `on` or
    /// `off` [default: on]
    #[arg(long, env = "TOLLGATE_CALL_LOG", value_parser = parse_on_off)]
    pub call_log: Option<bool>,
    /// Keep call-log records this long, e.g. `7d` or `12h` [default: 7d]
    #[arg(long, env = "TOLLGATE_CALL_LOG_RETENTION", value_parser = parse_duration)]
    pub call_log_retention: Option<Duration>,
    /// Most bytes of call-log records this node keeps on disk; the oldest go first (the
    /// indexes add up to about a quarter more) [default: 1073741824, 1 GiB]
    #[arg(long, env = "TOLLGATE_CALL_LOG_MAX_BYTES")]
    pub call_log_max_bytes: Option<u64>,
    /// On the leader: remove a member that has not answered for this long, e.g. `30s`
    /// (a voter only when a learner takes its place); `0s`: never [default: 30s]
    #[arg(long, env = "TOLLGATE_EVICT_AFTER", value_parser = parse_duration)]
    pub evict_after: Option<Duration>,
    /// On SIGTERM, after draining: `auto` (a learner leaves the membership, a voter stays),
    /// `always` or `never` [default: auto]
    #[arg(long, env = "TOLLGATE_LEAVE_ON_SHUTDOWN")]
    pub leave_on_shutdown: Option<LeaveOnShutdown>,
    /// Accept SetFaults admin calls that cut Raft traffic to chosen peers (tests only).
    #[arg(long, env = "TOLLGATE_ENABLE_FAULT_INJECTION", hide = true)]
    pub enable_fault_injection: bool,
}

/// The same settings in a TOML file; unknown keys are an error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub proxy_addr: Option<SocketAddr>,
    pub https_addr: Option<SocketAddr>,
    pub dns_resolver: Option<Vec<SocketAddr>>,
    #[serde(default, with = "opt_duration")]
    pub dns_min_ttl: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub dns_max_ttl: Option<Duration>,
    pub grpc_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub region: Option<String>,
    pub spec: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub access_log: Option<String>,
    pub workers: Option<usize>,
    pub cpu_scheduling: Option<CpuScheduling>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    #[serde(default, with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub send_timeout: Option<Duration>,
    pub min_request_body_rate: Option<u64>,
    #[serde(default, with = "opt_duration")]
    pub request_body_grace: Option<Duration>,
    pub max_request_body: Option<u64>,
    pub max_header_bytes: Option<usize>,
    #[serde(default, with = "opt_duration")]
    pub header_read_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub shutdown_delay: Option<Duration>,
    pub addr_file: Option<PathBuf>,
    pub bootstrap: Option<bool>,
    pub join: Option<String>,
    pub join_token: Option<String>,
    pub join_token_file: Option<PathBuf>,
    pub bootstrap_join_token_file: Option<PathBuf>,
    pub bootstrap_join_token_uses: Option<u32>,
    pub voters: Option<u32>,
    pub sealing_key_file: Option<PathBuf>,
    #[serde(default, with = "opt_duration")]
    pub cert_lifetime: Option<Duration>,
    pub insecure_cluster: Option<bool>,
    pub advertise_addr: Option<String>,
    #[serde(default, with = "opt_duration")]
    pub raft_heartbeat: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub raft_election_timeout: Option<Duration>,
    pub snapshot_every: Option<u64>,
    pub keep_logs: Option<u64>,
    pub max_spec_bytes: Option<usize>,
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: Option<String>,
    pub trace_sample_ratio: Option<f64>,
    pub environment: Option<String>,
    pub metering: Option<bool>,
    #[serde(default, with = "opt_duration")]
    pub meter_interval: Option<Duration>,
    pub llm_capture_content: Option<bool>,
    pub llm_cache_bytes: Option<u64>,
    pub call_log: Option<bool>,
    #[serde(default, with = "opt_duration")]
    pub call_log_retention: Option<Duration>,
    pub call_log_max_bytes: Option<u64>,
    #[serde(default, with = "opt_duration")]
    pub evict_after: Option<Duration>,
    pub leave_on_shutdown: Option<LeaveOnShutdown>,
}

/// What the node runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub id: u64,
    pub data_dir: PathBuf,
    pub proxy_addr: SocketAddr,
    pub https_addr: Option<SocketAddr>,
    /// How upstream host names are resolved.
    pub dns: crate::routing::dns::DnsSettings,
    /// Named secrets a bootstrapping node stores before it applies its first spec (`tollgate
    /// dev`'s certificate key); never from flags.
    pub bootstrap_secrets: Vec<(String, Vec<u8>)>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub region: String,
    pub spec: Option<PathBuf>,
    pub log_format: LogFormat,
    pub access_log: String,
    pub workers: usize,
    pub cpu_scheduling: CpuScheduling,
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
    pub shutdown_delay: Duration,
    pub addr_file: Option<PathBuf>,
    pub bootstrap: bool,
    pub join: Option<String>,
    pub join_token: Option<String>,
    pub join_token_file: Option<PathBuf>,
    pub bootstrap_join_token_file: Option<PathBuf>,
    pub bootstrap_join_token_uses: u32,
    pub voters: u32,
    /// None: `<data dir>/sealing-key`.
    pub sealing_key_file: Option<PathBuf>,
    /// The sealing keys themselves, from `TOLLGATE_SEALING_KEY` (never a flag: argv is
    /// visible to every user of the machine).
    pub sealing_key: Option<String>,
    pub cert_lifetime: Duration,
    pub insecure_cluster: bool,
    pub advertise_addr: Option<String>,
    pub raft: RaftSettings,
    pub max_spec_bytes: usize,
    /// Trace export, resolved with the `OTEL_*` environment (`None`: off).
    pub traces: Option<TraceConfig>,
    pub environment: String,
    pub metering: bool,
    pub meter_interval: Duration,
    /// LLM prompts and answers in traces (off: never).
    pub llm_capture_content: bool,
    /// The response cache's size on this node (0: off).
    pub llm_cache_bytes: u64,
    pub call_log: crate::calls::CallLogSettings,
    pub evict_after: Duration,
    pub leave_on_shutdown: LeaveOnShutdown,
    pub enable_fault_injection: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            id: 1,
            data_dir: PathBuf::from("./tollgate-data"),
            proxy_addr: ([127, 0, 0, 1], 8080).into(),
            https_addr: None,
            dns: crate::routing::dns::DnsSettings::default(),
            bootstrap_secrets: Vec::new(),
            grpc_addr: ([127, 0, 0, 1], 7070).into(),
            admin_addr: ([127, 0, 0, 1], 7071).into(),
            region: "default".into(),
            spec: None,
            log_format: LogFormat::Text,
            access_log: "stdout".into(),
            workers: 0,
            cpu_scheduling: CpuScheduling::Batch,
            max_connections: 10_000,
            max_connections_per_client: 1000,
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            min_request_body_rate: 256,
            request_body_grace: Duration::from_secs(10),
            max_request_body: 10 * 1024 * 1024,
            max_header_bytes: 32 * 1024,
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            addr_file: None,
            bootstrap: false,
            join: None,
            join_token: None,
            join_token_file: None,
            bootstrap_join_token_file: None,
            bootstrap_join_token_uses: 10,
            voters: 3,
            sealing_key_file: None,
            sealing_key: None,
            cert_lifetime: Duration::from_secs(30 * 24 * 3600),
            insecure_cluster: false,
            advertise_addr: None,
            raft: RaftSettings::default(),
            max_spec_bytes: 1024 * 1024,
            traces: None,
            environment: "production".into(),
            metering: true,
            meter_interval: Duration::from_secs(1),
            llm_capture_content: false,
            llm_cache_bytes: 64 * 1024 * 1024,
            call_log: crate::calls::CallLogSettings::default(),
            evict_after: Duration::from_secs(30),
            leave_on_shutdown: LeaveOnShutdown::Auto,
            enable_fault_injection: false,
        }
    }
}

impl Settings {
    /// Merges flags/environment over the `--config` file over defaults, and checks the result.
    pub fn load(args: NodeArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        Settings::merge(args, file)
    }

    pub fn merge(args: NodeArgs, file: FileSettings) -> anyhow::Result<Settings> {
        let d = Settings::default();
        let s = Settings {
            id: args.id.or(file.id).unwrap_or(d.id),
            data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            proxy_addr: args.proxy_addr.or(file.proxy_addr).unwrap_or(d.proxy_addr),
            https_addr: args.https_addr.or(file.https_addr),
            dns: crate::routing::dns::DnsSettings {
                servers: args
                    .dns_resolver
                    .or(file.dns_resolver)
                    .unwrap_or(d.dns.servers),
                min_ttl: args
                    .dns_min_ttl
                    .or(file.dns_min_ttl)
                    .unwrap_or(d.dns.min_ttl),
                max_ttl: args
                    .dns_max_ttl
                    .or(file.dns_max_ttl)
                    .unwrap_or(d.dns.max_ttl),
            },
            bootstrap_secrets: Vec::new(),
            grpc_addr: args.grpc_addr.or(file.grpc_addr).unwrap_or(d.grpc_addr),
            admin_addr: args.admin_addr.or(file.admin_addr).unwrap_or(d.admin_addr),
            region: args.region.or(file.region).unwrap_or(d.region),
            spec: args.spec.or(file.spec),
            log_format: args.log_format.or(file.log_format).unwrap_or(d.log_format),
            access_log: args.access_log.or(file.access_log).unwrap_or(d.access_log),
            workers: args.workers.or(file.workers).unwrap_or(d.workers),
            cpu_scheduling: args
                .cpu_scheduling
                .or(file.cpu_scheduling)
                .unwrap_or(d.cpu_scheduling),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_connections_per_client: args
                .max_connections_per_client
                .or(file.max_connections_per_client)
                .unwrap_or(d.max_connections_per_client),
            idle_timeout: args
                .idle_timeout
                .or(file.idle_timeout)
                .unwrap_or(d.idle_timeout),
            send_timeout: args
                .send_timeout
                .or(file.send_timeout)
                .unwrap_or(d.send_timeout),
            min_request_body_rate: args
                .min_request_body_rate
                .or(file.min_request_body_rate)
                .unwrap_or(d.min_request_body_rate),
            request_body_grace: args
                .request_body_grace
                .or(file.request_body_grace)
                .unwrap_or(d.request_body_grace),
            max_request_body: args
                .max_request_body
                .or(file.max_request_body)
                .unwrap_or(d.max_request_body),
            max_header_bytes: args
                .max_header_bytes
                .or(file.max_header_bytes)
                .unwrap_or(d.max_header_bytes),
            header_read_timeout: args
                .header_read_timeout
                .or(file.header_read_timeout)
                .unwrap_or(d.header_read_timeout),
            drain_timeout: args
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(d.drain_timeout),
            shutdown_delay: args
                .shutdown_delay
                .or(file.shutdown_delay)
                .unwrap_or(d.shutdown_delay),
            addr_file: args.addr_file.or(file.addr_file),
            bootstrap: args.bootstrap || file.bootstrap.unwrap_or(false),
            join: args.join.or(file.join),
            join_token: args.join_token.or(file.join_token),
            join_token_file: args.join_token_file.or(file.join_token_file),
            bootstrap_join_token_file: args
                .bootstrap_join_token_file
                .or(file.bootstrap_join_token_file),
            bootstrap_join_token_uses: args
                .bootstrap_join_token_uses
                .or(file.bootstrap_join_token_uses)
                .unwrap_or(d.bootstrap_join_token_uses),
            voters: args.voters.or(file.voters).unwrap_or(d.voters),
            sealing_key_file: args.sealing_key_file.or(file.sealing_key_file),
            sealing_key: std::env::var("TOLLGATE_SEALING_KEY")
                .ok()
                .filter(|k| !k.trim().is_empty()),
            cert_lifetime: args
                .cert_lifetime
                .or(file.cert_lifetime)
                .unwrap_or(d.cert_lifetime),
            insecure_cluster: args.insecure_cluster || file.insecure_cluster.unwrap_or(false),
            advertise_addr: match args.advertise_addr {
                Some(a) => Some(a),
                None => file
                    .advertise_addr
                    .as_deref()
                    .map(parse_peer_addr)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("invalid node settings: advertise_addr {e}"))?,
            },
            raft: RaftSettings {
                heartbeat_interval: args
                    .raft_heartbeat
                    .or(file.raft_heartbeat)
                    .unwrap_or(d.raft.heartbeat_interval),
                election_timeout: args
                    .raft_election_timeout
                    .or(file.raft_election_timeout)
                    .unwrap_or(d.raft.election_timeout),
                snapshot_every: args
                    .snapshot_every
                    .or(file.snapshot_every)
                    .unwrap_or(d.raft.snapshot_every),
                keep_logs: args
                    .keep_logs
                    .or(file.keep_logs)
                    .unwrap_or(d.raft.keep_logs),
            },
            max_spec_bytes: args
                .max_spec_bytes
                .or(file.max_spec_bytes)
                .unwrap_or(d.max_spec_bytes),
            traces: traces::resolve(
                &TraceArgs {
                    endpoint: args.otlp_endpoint.or(file.otlp_endpoint),
                    protocol: args.otlp_protocol.or(file.otlp_protocol),
                    sample_ratio: args.trace_sample_ratio.or(file.trace_sample_ratio),
                },
                &|k| std::env::var(k).ok(),
            )
            .map_err(|e| anyhow::anyhow!("invalid node settings: {e}"))?,
            environment: args
                .environment
                .or(file.environment)
                .unwrap_or(d.environment),
            metering: args.metering.or(file.metering).unwrap_or(d.metering),
            meter_interval: args
                .meter_interval
                .or(file.meter_interval)
                .unwrap_or(d.meter_interval),
            llm_capture_content: args
                .llm_capture_content
                .or(file.llm_capture_content)
                .unwrap_or(d.llm_capture_content),
            llm_cache_bytes: args
                .llm_cache_bytes
                .or(file.llm_cache_bytes)
                .unwrap_or(d.llm_cache_bytes),
            call_log: crate::calls::CallLogSettings {
                enabled: args
                    .call_log
                    .or(file.call_log)
                    .unwrap_or(d.call_log.enabled),
                retention: args
                    .call_log_retention
                    .or(file.call_log_retention)
                    .unwrap_or(d.call_log.retention),
                max_bytes: args
                    .call_log_max_bytes
                    .or(file.call_log_max_bytes)
                    .unwrap_or(d.call_log.max_bytes),
            },
            evict_after: args
                .evict_after
                .or(file.evict_after)
                .unwrap_or(d.evict_after),
            leave_on_shutdown: args
                .leave_on_shutdown
                .or(file.leave_on_shutdown)
                .unwrap_or(d.leave_on_shutdown),
            enable_fault_injection: args.enable_fault_injection,
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.max_connections == 0 {
            problems.push("max_connections must be at least 1");
        }
        if self.max_header_bytes < 1024 {
            problems.push("max_header_bytes must be at least 1024");
        }
        if self.region.is_empty() {
            problems.push("region must not be empty");
        }
        if self.call_log.retention < Duration::from_secs(1) {
            problems.push("call_log_retention must be at least 1s");
        }
        if self.call_log.max_bytes < 1 << 20 {
            problems.push("call_log_max_bytes must be at least 1048576 (1 MiB)");
        }
        if self.header_read_timeout.is_zero() {
            problems.push("header_read_timeout must be greater than zero");
        }
        if self.dns.min_ttl.is_zero() || self.dns.min_ttl > self.dns.max_ttl {
            problems.push("dns_min_ttl must be greater than zero and at most dns_max_ttl");
        }
        if self.idle_timeout.is_zero() || self.send_timeout.is_zero() {
            problems.push("idle_timeout and send_timeout must be greater than zero");
        }
        if self.id == 0 {
            problems.push("id must be at least 1");
        }
        if self.bootstrap && self.join.is_some() {
            problems.push("--bootstrap and --join exclude each other: bootstrap the first node, join the others to it");
        }
        if self.voters == 0 {
            problems.push("voters must be at least 1");
        }
        if self.cert_lifetime < Duration::from_secs(30) {
            problems.push("cert_lifetime must be at least 30s");
        }
        if self.bootstrap_join_token_uses == 0 || self.bootstrap_join_token_uses > 1000 {
            problems.push("bootstrap_join_token_uses must be 1 to 1000");
        }
        if self.insecure_cluster && self.join_token.is_some() {
            problems.push(
                "--join-token is for a secure cluster; --insecure-cluster nodes join without one",
            );
        }
        if self.raft.heartbeat_interval.is_zero()
            || self.raft.election_timeout <= self.raft.heartbeat_interval * 2
        {
            problems.push(
                "raft_election_timeout must be more than twice raft_heartbeat (and neither zero)",
            );
        }
        if self.raft.snapshot_every == 0 {
            problems.push("snapshot_every must be at least 1");
        }
        if self.environment.is_empty() {
            problems.push("environment must not be empty");
        }
        if self.meter_interval < Duration::from_millis(10)
            || self.meter_interval > Duration::from_secs(60)
        {
            problems.push("meter_interval must be from 10ms to 60s");
        }
        if self.max_spec_bytes < 1024 {
            problems.push("max_spec_bytes must be at least 1024");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid node settings: {}", problems.join("; "))
        }
    }

    /// Data-plane threads to run: the setting, or one per CPU.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
}

/// A peer address: `IP:PORT`, or `HOST:PORT` with a DNS name (resolved each time a peer
/// connects, so a pod that comes back on another IP keeps its name).
pub fn parse_peer_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr.to_string());
    }
    let bad = || {
        format!(
            "{s:?} is not IP:PORT or HOST:PORT; write it like 10.0.0.2:7070 or tollgate-0.tollgate-peers:7070"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if !port_ok || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(s.to_string())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; write it like 500ms, 10s or 1m"))
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| super::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_are_ip_or_dns_names_with_a_port() {
        for ok in [
            "10.0.0.2:7070",
            "[::1]:7070",
            "tollgate-0.tollgate-peers.default.svc.cluster.local:7070",
            "node1:7070",
        ] {
            assert!(parse_peer_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "node1",
            "node1:0",
            "node1:http",
            "-node:7070",
            "no_underscores:7070",
            "a..b:7070",
            ":7070",
            "http://node1:7070",
        ] {
            let e = parse_peer_addr(bad).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
        let file: FileSettings = toml::from_str("advertise_addr = \"bad host:1\"").unwrap();
        let e = Settings::merge(NodeArgs::default(), file).unwrap_err();
        assert!(e.to_string().contains("advertise_addr"), "{e}");
    }

    #[test]
    fn flags_beat_file_beat_defaults() {
        let args = NodeArgs {
            id: Some(7),
            ..Default::default()
        };
        let file: FileSettings = toml::from_str(
            "id = 3\nregion = \"eu\"\nheader_read_timeout = \"2s\"\nproxy_addr = \"127.0.0.1:9000\"",
        )
        .unwrap();
        let s = Settings::merge(args, file).unwrap();
        assert_eq!(s.id, 7);
        assert_eq!(s.region, "eu");
        assert_eq!(s.header_read_timeout, Duration::from_secs(2));
        assert_eq!(s.proxy_addr.port(), 9000);
        assert_eq!(s.admin_addr.port(), 7071);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let err = toml::from_str::<FileSettings>("proxy_adr = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("proxy_adr"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        let args = NodeArgs {
            max_connections: Some(0),
            ..Default::default()
        };
        let err = Settings::merge(args, FileSettings::default()).unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
    }
}
