//! OpenTelemetry traces, exported over OTLP (gRPC or http/protobuf) to any collector.
//!
//! Two kinds of span reach one export queue:
//!
//! - **Per request** (the data plane): a SERVER span for the request and a CLIENT span for
//!   the upstream call, built here from what the request's [`Tail`](crate::proxy::phases)
//!   recorded, with explicit times, when the response is done. Nothing is allocated for a
//!   request that is not sampled, and nothing waits: the queue is bounded and a full queue
//!   drops the span and counts it.
//! - **Cluster work** (node admin RPCs, leader forwarding, Raft writes and applies, and the
//!   control plane's RPCs): `tracing` spans with target [`TARGET`], turned into OpenTelemetry
//!   spans by `tracing-opentelemetry` and carried across gRPC calls in W3C `traceparent`
//!   metadata, and into Raft log entries, so a control-plane call can be followed onto
//!   every node that applies it.
//!
//! The export thread takes batches off the queue and sends them with its own small tokio
//! runtime, so a slow or stopped collector costs the node nothing but the dropped spans,
//! which `tollgate_trace_spans_total{outcome}` counts (the SDK's own batch processor keeps
//! that count to itself). Settings follow the OpenTelemetry environment variables; see
//! `docs/configuration.md` ("Traces").

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_queue::ArrayQueue;
use http::HeaderValue;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::SamplingDecision;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, ShouldSample, SpanData, SpanEvents, SpanExporter, SpanLinks,
    SpanProcessor,
};

/// The `tracing` target of spans that are exported (everything else stays in the logs).
pub const TARGET: &str = "tollgate_trace";

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Which traces are kept: `ratio` of new traces; with `parent_based`, a request that carries
/// a `traceparent` follows its caller's decision instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub parent_based: bool,
    pub ratio: f64,
}

/// Trace export, resolved from flags and the `OTEL_*` environment.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// The full URL spans are sent to (for http/protobuf, with `/v1/traces`).
    pub endpoint: String,
    pub protocol: Protocol,
    pub sampling: Sampling,
    /// Spans waiting for export; more are dropped and counted.
    pub queue_size: usize,
    /// Spans per export call.
    pub batch_size: usize,
    /// Longest a span waits in the queue before a smaller batch goes.
    pub delay: Duration,
    /// Longest one export call may take.
    pub timeout: Duration,
}

/// What the node's trace settings said, before the environment fills in the rest.
#[derive(Debug, Clone, Default)]
pub struct TraceArgs {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub sample_ratio: Option<f64>,
}

/// Resolves trace export: `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`); none of them, or `OTEL_SDK_DISABLED=true`, means traces
/// are off (`Ok(None)`). Every value is checked: a bad one is an error that says what to
/// write instead.
pub fn resolve(
    flags: &TraceArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<TraceConfig>, String> {
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let protocol = match flags
        .protocol
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
        .map(str::trim)
    {
        None | Some("grpc") => Protocol::Grpc,
        Some("http/protobuf") => Protocol::HttpProtobuf,
        Some(other) => {
            return Err(format!(
                "unknown OTLP protocol {other:?}: use grpc or http/protobuf (http/json is not supported)"
            ));
        }
    };
    // A signal-specific endpoint is the full URL; a general one gets `/v1/traces` for HTTP.
    let (raw, full) = match (
        &flags.endpoint,
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        env("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(e), _, _) => (e.clone(), false),
        (None, Some(e), _) => (e, true),
        (None, None, Some(e)) => (e, false),
        (None, None, None) => return Ok(None),
    };
    let endpoint = check_endpoint(raw.trim(), protocol, full)?;
    let sampling = match flags.sample_ratio {
        Some(r) => Sampling {
            parent_based: true,
            ratio: check_ratio(r, "--trace-sample-ratio")?,
        },
        None => sampler_from_env(
            env("OTEL_TRACES_SAMPLER").as_deref(),
            env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )?,
    };
    let number = |key: &str, default: u64| -> Result<u64, String> {
        match env(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{key}={v:?} is not a whole number above 0")),
        }
    };
    let queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", 8192)? as usize;
    let batch_size = (number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)? as usize).min(queue_size);
    let delay = Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 1000)?);
    let timeout = Duration::from_millis(match env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
        Some(_) => number("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 10_000),
        None => number("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000),
    }?);
    Ok(Some(TraceConfig {
        endpoint,
        protocol,
        sampling,
        queue_size,
        batch_size,
        delay,
        timeout,
    }))
}

fn check_ratio(r: f64, what: &str) -> Result<f64, String> {
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!(
            "{what} is {r}: write a ratio from 0 (no new trace) to 1 (every trace)"
        ))
    }
}

fn sampler_from_env(name: Option<&str>, arg: Option<&str>) -> Result<Sampling, String> {
    let ratio = || -> Result<f64, String> {
        match arg {
            None => Ok(1.0),
            Some(a) => a
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("OTEL_TRACES_SAMPLER_ARG={a:?} is not a number"))
                .and_then(|r| check_ratio(r, "OTEL_TRACES_SAMPLER_ARG")),
        }
    };
    let (parent_based, ratio) = match name.map(str::trim) {
        None | Some("parentbased_always_on") => (true, 1.0),
        Some("parentbased_always_off") => (true, 0.0),
        Some("parentbased_traceidratio") => (true, ratio()?),
        Some("always_on") => (false, 1.0),
        Some("always_off") => (false, 0.0),
        Some("traceidratio") => (false, ratio()?),
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_SAMPLER={other:?} is not supported: use always_on, always_off, \
                 traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
            ));
        }
    };
    Ok(Sampling {
        parent_based,
        ratio,
    })
}

/// Checks an OTLP endpoint: `http://` or `https://`, a host, and (for gRPC) no path.
fn check_endpoint(raw: &str, protocol: Protocol, full: bool) -> Result<String, String> {
    let hint = match protocol {
        Protocol::Grpc => "write it like http://collector:4317",
        Protocol::HttpProtobuf => "write it like http://collector:4318",
    };
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("invalid OTLP endpoint {raw:?} ({e}); {hint}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "invalid OTLP endpoint {raw:?}: the scheme {other:?} is neither http nor https; {hint}"
            ));
        }
        None => {
            return Err(format!(
                "invalid OTLP endpoint {raw:?}: it has no scheme; {hint}"
            ));
        }
    }
    match uri.host() {
        Some(h) if !h.is_empty() => {}
        _ => {
            return Err(format!(
                "invalid OTLP endpoint {raw:?}: it has no host; {hint}"
            ));
        }
    }
    // `Uri::port` hides a port that is not a u16, so read it from the authority.
    let port = uri
        .authority()
        .and_then(|a| a.as_str().rsplit_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.contains(']'));
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(0) => return Err(format!("invalid OTLP endpoint {raw:?}: port 0; {hint}")),
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "invalid OTLP endpoint {raw:?}: the port {port:?} is not a number from 1 to 65535; {hint}"
                ));
            }
        }
    }
    let path = uri.path();
    match protocol {
        Protocol::Grpc if path != "/" && !path.is_empty() => Err(format!(
            "invalid OTLP endpoint {raw:?}: a gRPC endpoint has no path; {hint}"
        )),
        Protocol::Grpc => Ok(raw.trim_end_matches('/').to_string()),
        Protocol::HttpProtobuf if full => Ok(raw.to_string()),
        Protocol::HttpProtobuf => Ok(format!("{}/v1/traces", raw.trim_end_matches('/'))),
    }
}

/// Who exports: the resource every span carries.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub service: &'static str,
    /// `service.instance.id`: the node id, or the control plane's address.
    pub instance: String,
    /// `cloud.region`, when known.
    pub region: Option<String>,
    /// `deployment.environment`.
    pub environment: String,
}

impl Identity {
    fn resource(&self) -> Resource {
        // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours come after,
        // except the service name, which the operator's OTEL_SERVICE_NAME overrides.
        let mut attrs = vec![
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", self.instance.clone()),
            KeyValue::new("deployment.environment", self.environment.clone()),
            KeyValue::new("deployment.environment.name", self.environment.clone()),
        ];
        if let Some(r) = &self.region {
            attrs.push(KeyValue::new("cloud.region", r.clone()));
        }
        let mut builder = Resource::builder().with_attributes(attrs);
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            builder = builder.with_service_name(self.service);
        }
        builder.build()
    }
}

/// A running trace export: the queue, the sampler, and the provider behind `tracing` spans.
pub struct Tracing {
    queue: Arc<SpanQueue>,
    sampling: Sampling,
    root: Sampler,
    scope: InstrumentationScope,
    provider: SdkTracerProvider,
}

static GLOBAL: OnceLock<Arc<Tracing>> = OnceLock::new();

/// The process's trace export, once [`install`]ed.
pub fn global() -> Option<&'static Arc<Tracing>> {
    GLOBAL.get()
}

/// Starts trace export for this process (once; a second call keeps the first) and returns
/// it. Fails when the exporter cannot be built (an endpoint the OTLP client refuses).
pub fn install(config: &TraceConfig, identity: &Identity) -> anyhow::Result<Arc<Tracing>> {
    // The HTTP exporter's client (reqwest) takes rustls's process-wide provider.
    crate::identity::tls::install_default_provider();
    if let Some(t) = GLOBAL.get() {
        return Ok(t.clone());
    }
    let resource = identity.resource();
    let queue = SpanQueue::start(config, resource.clone())?;
    let root = match config.sampling.ratio {
        r if r >= 1.0 => Sampler::AlwaysOn,
        r if r <= 0.0 => Sampler::AlwaysOff,
        r => Sampler::TraceIdRatioBased(r),
    };
    let sampler = if config.sampling.parent_based {
        Sampler::ParentBased(Box::new(root.clone()))
    } else {
        root.clone()
    };
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(sampler)
        .with_span_processor(QueueProcessor(queue.clone()))
        .build();
    let scope = InstrumentationScope::builder(identity.service)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let tracing = Arc::new(Tracing {
        queue,
        sampling: config.sampling,
        root,
        scope,
        provider,
    });
    let _ = GLOBAL.set(tracing.clone());
    tracing::info!(
        endpoint = %config.endpoint,
        protocol = ?config.protocol,
        ratio = config.sampling.ratio,
        parent_based = config.sampling.parent_based,
        "exporting traces over OTLP"
    );
    Ok(GLOBAL.get().cloned().unwrap_or(tracing))
}

/// Sends what is queued (waiting up to `timeout`): called once when the process stops.
pub fn shutdown(timeout: Duration) {
    if let Some(t) = GLOBAL.get() {
        t.queue.flush(timeout);
    }
}

impl Tracing {
    /// The tracer `tracing-opentelemetry` turns `tracing` spans into spans with.
    pub fn tracer(&self) -> opentelemetry_sdk::trace::Tracer {
        self.provider.tracer_with_scope(self.scope.clone())
    }

    /// Starts a request's trace: continues the caller's `traceparent` when it is valid,
    /// and decides sampling. `None` when the request is not sampled (its headers then pass
    /// to the upstream as they came).
    pub fn start_request(&self, headers: &http::HeaderMap) -> Option<Box<RequestTrace>> {
        let parent = headers
            .get("traceparent")
            .and_then(|v| parse_traceparent(v.as_bytes()))
            .map(|p| with_tracestate(p, headers));
        let trace_id = parent
            .as_ref()
            .map(|p| p.trace_id())
            .unwrap_or_else(new_trace_id);
        let sampled = match &parent {
            Some(p) if self.sampling.parent_based => p.is_sampled(),
            _ => {
                self.root
                    .should_sample(None, trace_id, "", &SpanKind::Server, &[], &[])
                    .decision
                    == SamplingDecision::RecordAndSample
            }
        };
        if !sampled {
            return None;
        }
        Some(Box::new(RequestTrace {
            trace_id,
            span_id: new_span_id(),
            parent: parent.as_ref().map(|p| p.span_id()),
            tracestate: parent.and_then(|p| {
                (!p.trace_state().header().is_empty()).then(|| p.trace_state().clone())
            }),
            start: SystemTime::now(),
            clients: Vec::new(),
            attributes: Vec::with_capacity(20),
        }))
    }

    /// Queues a finished request's spans.
    pub fn finish_request(&self, trace: RequestTrace, end: SystemTime, error: bool) {
        let flags = TraceFlags::SAMPLED;
        let state = trace.tracestate.clone().unwrap_or_default();
        let server = SpanContext::new(trace.trace_id, trace.span_id, flags, false, state.clone());
        let name = trace.name();
        for client in trace.clients {
            self.queue.push(SpanData {
                span_context: SpanContext::new(
                    trace.trace_id,
                    client.span_id,
                    flags,
                    false,
                    state.clone(),
                ),
                parent_span_id: trace.span_id,
                parent_span_is_remote: false,
                span_kind: SpanKind::Client,
                name: client.name,
                start_time: client.start,
                end_time: client.end.unwrap_or(end),
                attributes: client.attributes,
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status: if client.error {
                    Status::error("")
                } else {
                    Status::Unset
                },
                instrumentation_scope: self.scope.clone(),
            });
        }
        self.queue.push(SpanData {
            span_context: server,
            parent_span_id: trace.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: trace.parent.is_some(),
            span_kind: SpanKind::Server,
            name: std::borrow::Cow::Owned(name),
            start_time: trace.start,
            end_time: end,
            attributes: trace.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if error {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// One sampled request's trace while it is served.
pub struct RequestTrace {
    pub trace_id: TraceId,
    /// The SERVER span's id.
    pub span_id: SpanId,
    /// The caller's span, when the request carried a valid `traceparent`.
    parent: Option<SpanId>,
    tracestate: Option<TraceState>,
    start: SystemTime,
    /// The upstream calls (more than one for an LLM request that fell back).
    clients: Vec<ClientSpan>,
    /// The SERVER span's attributes (the HTTP conventions and `tollgate.*`).
    pub attributes: Vec<KeyValue>,
}

/// The upstream call of a request.
pub struct ClientSpan {
    span_id: SpanId,
    name: std::borrow::Cow<'static, str>,
    start: SystemTime,
    end: Option<SystemTime>,
    pub attributes: Vec<KeyValue>,
    pub error: bool,
}

impl RequestTrace {
    /// Starts the CLIENT span and returns the `traceparent` the upstream gets (with
    /// `tracestate` passed on unchanged, as the request carried it).
    pub fn start_client(&mut self, method: &http::Method) -> HeaderValue {
        let span_id = new_span_id();
        self.clients.push(ClientSpan {
            span_id,
            name: std::borrow::Cow::Owned(method.as_str().to_string()),
            start: SystemTime::now(),
            end: None,
            attributes: vec![KeyValue::new(
                "http.request.method",
                method.as_str().to_string(),
            )],
            error: false,
        });
        traceparent(self.trace_id, span_id)
    }

    /// The upstream call, once started.
    pub fn client(&mut self) -> Option<&mut ClientSpan> {
        self.clients.last_mut()
    }

    /// The SERVER span's name: `{method} {http.route}` by the HTTP conventions.
    fn name(&self) -> String {
        let get = |k: &str| {
            self.attributes
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.as_str())
        };
        match (get("http.request.method"), get("http.route")) {
            (Some(m), Some(r)) => format!("{m} {r}"),
            (Some(m), None) => m.into_owned(),
            _ => "HTTP".into(),
        }
    }
}

impl ClientSpan {
    /// Names the span (the HTTP conventions name it by method; GenAI calls by operation
    /// and model).
    pub fn rename(&mut self, name: String) {
        self.name = std::borrow::Cow::Owned(name);
    }

    /// Ends the call now (its answer's head arrived, or it failed).
    pub fn end(&mut self) {
        if self.end.is_none() {
            self.end = Some(SystemTime::now());
        }
    }
}

/// A `traceparent` value for a sampled span.
fn traceparent(trace: TraceId, span: SpanId) -> HeaderValue {
    // Written into a stack buffer: this runs for every sampled request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let mut put = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            buf[at + 2 * i] = HEX[usize::from(b >> 4)];
            buf[at + 2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    };
    put(3, &trace.to_bytes());
    put(36, &span.to_bytes());
    HeaderValue::from_bytes(&buf).expect("hex ids make a valid header value")
}

/// Parses a W3C `traceparent` strictly (trace-context level 1): version 00 is exactly
/// `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, with non-zero ids; a later version may add
/// `-...` after those 55 characters; version `ff` is invalid. Anything else is ignored, and
/// the request starts a new trace.
pub fn parse_traceparent(v: &[u8]) -> Option<SpanContext> {
    let hex = |b: &[u8]| {
        b.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (version, trace, span, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    if !hex(version) || version == b"ff" || !hex(trace) || !hex(span) || !hex(flags) {
        return None;
    }
    if version == b"00" && v.len() != 55 {
        return None;
    }
    if version != b"00" && v.len() > 55 && v[55] != b'-' {
        return None;
    }
    fn s(b: &[u8]) -> Option<&str> {
        std::str::from_utf8(b).ok()
    }
    let trace_id = TraceId::from_hex(s(trace)?).ok()?;
    let span_id = SpanId::from_hex(s(span)?).ok()?;
    let flags = u8::from_str_radix(s(flags)?, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    ))
}

/// Adds the request's `tracestate` to a parsed `traceparent` (an invalid one is dropped).
pub fn with_tracestate(cx: SpanContext, headers: &http::HeaderMap) -> SpanContext {
    let state = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<TraceState>().ok());
    match state {
        Some(s) => SpanContext::new(cx.trace_id(), cx.span_id(), cx.trace_flags(), true, s),
        None => cx,
    }
}

fn new_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

fn new_span_id() -> SpanId {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return SpanId::from(id);
        }
    }
}

// ---- gRPC propagation -------------------------------------------------------------------

/// The trace context the current `tracing` span carries, as a `traceparent` value (empty
/// when there is none, or traces are off): what a Raft command records.
pub fn current_traceparent() -> String {
    if GLOBAL.get().is_none() {
        return String::new();
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return String::new();
    }
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Makes `span` a child of the remote span a `traceparent` names (nothing when it is
/// empty or invalid, or traces are off).
pub fn set_parent(span: &tracing::Span, traceparent: &[u8]) {
    if GLOBAL.get().is_none() {
        return;
    }
    if let Some(sc) = parse_traceparent(traceparent) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// Adds the current span's `traceparent` to an outgoing gRPC call's metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let tp = current_traceparent();
    if !tp.is_empty()
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(tp)
    {
        metadata.insert("traceparent", v);
    }
}

/// A span for an incoming gRPC call (for tonic's `Server::trace_fn`), continuing the
/// caller's `traceparent`. Calls that are not `service` (Raft, actors) get no span.
pub fn grpc_server_span(req: &http::Request<()>, services: &[&str]) -> tracing::Span {
    if GLOBAL.get().is_none() {
        return tracing::Span::none();
    }
    let path = req.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    if !services.contains(&service) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "grpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    if let Some(tp) = req.headers().get("traceparent") {
        set_parent(&span, tp.as_bytes());
    }
    span
}

// ---- the export queue -------------------------------------------------------------------

/// A bounded queue in front of one export thread. Pushing never blocks and never wakes
/// the exporter per span (a wakeup per span cost more than the export itself): the thread
/// is woken when a batch is full, and otherwise looks every quarter of the batch delay. A
/// full queue drops the span and counts it.
struct SpanQueue {
    spans: ArrayQueue<SpanData>,
    batch_size: usize,
    exporter: OnceLock<std::thread::Thread>,
    /// Set when the exporter has been woken for a full batch and has not drained yet.
    woken: AtomicBool,
    /// Flushes waiting for the exporter to have exported what was queued before them.
    flushes: Mutex<Vec<SyncSender<()>>>,
    dropped_full: metrics::Counter,
}

impl std::fmt::Debug for SpanQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanQueue")
    }
}

impl SpanQueue {
    fn start(config: &TraceConfig, resource: Resource) -> anyhow::Result<Arc<SpanQueue>> {
        let queue = Arc::new(SpanQueue {
            spans: ArrayQueue::new(config.queue_size.max(1)),
            batch_size: config.batch_size.max(1),
            exporter: OnceLock::new(),
            woken: AtomicBool::new(false),
            flushes: Mutex::new(Vec::new()),
            dropped_full: metrics::counter!("tollgate_trace_spans_total", "outcome" => "dropped_queue_full"),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let config = config.clone();
        let q = queue.clone();
        let handle = std::thread::Builder::new()
            .name("tollgate-otlp".into())
            .spawn(move || export_thread(config, resource, q, ready_tx))?;
        let _ = queue.exporter.set(handle.thread().clone());
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(queue),
            Ok(Err(e)) => anyhow::bail!("cannot start OTLP trace export: {e}"),
            Err(_) => anyhow::bail!("the OTLP export thread stopped while starting"),
        }
    }

    fn push(&self, span: SpanData) {
        if self.spans.push(span).is_err() {
            self.dropped_full.increment(1);
        } else if self.spans.len() >= self.batch_size
            && !self.woken.swap(true, Ordering::AcqRel)
            && let Some(t) = self.exporter.get()
        {
            t.unpark();
        }
    }

    /// Exports what is queued, waiting up to `timeout`.
    fn flush(&self, timeout: Duration) {
        let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
        self.flushes.lock().expect("flush lock").push(ack_tx);
        if let Some(t) = self.exporter.get() {
            t.unpark();
        }
        let _ = ack_rx.recv_timeout(timeout);
    }
}

fn build_exporter(
    config: &TraceConfig,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    match config.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout)
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.endpoint.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(config.timeout)
            .build(),
    }
}

fn export_thread(
    config: TraceConfig,
    resource: Resource,
    queue: Arc<SpanQueue>,
    ready: SyncSender<Result<(), String>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start its runtime: {e}")));
            return;
        }
    };
    // The gRPC client's connection tasks live on this thread's runtime.
    let mut exporter = match runtime.block_on(async { build_exporter(&config) }) {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(format!("{e} (endpoint {})", config.endpoint)));
            return;
        }
    };
    exporter.set_resource(&resource);
    let _ = ready.send(Ok(()));
    let exported = metrics::counter!("tollgate_trace_spans_total", "outcome" => "exported");
    let failed =
        metrics::counter!("tollgate_trace_spans_total", "outcome" => "dropped_export_failed");
    let batches_failed = metrics::counter!("tollgate_trace_export_failures_total");
    let mut batch: Vec<SpanData> = Vec::with_capacity(config.batch_size);
    let mut oldest: Option<Instant> = None;
    let mut last_error_log: Option<Instant> = None;
    let mut send = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = std::mem::replace(batch, Vec::with_capacity(config.batch_size));
        let result = runtime
            .block_on(async { tokio::time::timeout(config.timeout, exporter.export(spans)).await });
        match result {
            Ok(Ok(())) => exported.increment(n),
            Ok(Err(e)) => {
                failed.increment(n);
                batches_failed.increment(1);
                log_export_error(&mut last_error_log, &config.endpoint, &e.to_string());
            }
            Err(_) => {
                failed.increment(n);
                batches_failed.increment(1);
                log_export_error(&mut last_error_log, &config.endpoint, "timed out");
            }
        }
    };
    let look = (config.delay / 4).max(Duration::from_millis(1));
    loop {
        let idle = queue.spans.len() < config.batch_size
            && queue.flushes.lock().expect("flush lock").is_empty();
        if idle {
            std::thread::park_timeout(look);
        }
        queue.woken.store(false, Ordering::Release);
        while let Some(s) = queue.spans.pop() {
            if batch.is_empty() {
                oldest = Some(Instant::now());
            }
            batch.push(s);
            if batch.len() >= config.batch_size {
                send(&mut batch);
                oldest = None;
            }
        }
        let flushes = std::mem::take(&mut *queue.flushes.lock().expect("flush lock"));
        // A partial batch waits for the delay (it is at most a quarter late: it is dated
        // when this thread took it).
        if !flushes.is_empty() || oldest.is_some_and(|t| t.elapsed() + look >= config.delay) {
            send(&mut batch);
            oldest = None;
        }
        for ack in flushes {
            let _ = ack.send(());
        }
    }
}

/// Logs a failed export at most every 10 s: a collector that is down must not flood the log.
fn log_export_error(last: &mut Option<Instant>, endpoint: &str, error: &str) {
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        *last = Some(Instant::now());
        tracing::warn!(
            endpoint,
            "trace export failed: {error}; the batch's spans are dropped and counted in \
             tollgate_trace_spans_total{{outcome=\"dropped_export_failed\"}}"
        );
    }
}

/// Hands the SDK's finished spans (from `tracing`) to the queue.
#[derive(Debug)]
struct QueueProcessor(Arc<SpanQueue>);

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.0.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.flush(Duration::from_secs(5));
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.flush(timeout);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
