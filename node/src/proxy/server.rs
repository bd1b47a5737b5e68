//! The data-plane threads: one current-thread tokio runtime per core, each with its own
//! `SO_REUSEPORT` listener on the proxy address, its own upstream pool and its own
//! access-log buffer. Nothing on the request path crosses threads except the `ArcSwap`
//! snapshot load and a few atomics.
//!
//! Each connection speaks HTTP/1.1 or h2c (prior knowledge), chosen from its first bytes.
//! A connection that has not delivered a first request within `header_read_timeout` is
//! dropped (this covers protocol detection and HTTP/2), and hyper's own header read timeout
//! covers every HTTP/1.1 request head after that. The limits of [`guard`](super::guard)
//! apply to every connection: slots past `max_connections` are answered 503 (JSON), past
//! the client's share 429; idle connections and those whose client stopped reading are
//! closed; HTTP/2 control-frame floods end the connection.
//!
//! On shutdown a thread stops accepting, asks its connections to finish (HTTP/1.1 closes
//! after the response in flight, HTTP/2 sends GOAWAY), and waits for them until the drain
//! deadline.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CpuScheduling;
use crate::proxy::body::ResponseBody;
use crate::proxy::guard::{ClientKey, ConnState, FrameGuard, Refused, Verdict};
use crate::proxy::phases::{self, Worker};
use crate::proxy::respond::{ProxyError, error_response};
use crate::proxy::{LocalExec, OpenConnection, Shared};
use crate::telemetry::access_log::{AccessLog, Sink};

/// Most streams one HTTP/2 connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 128;

/// Most connections answered "too many connections" at once; past this they are just
/// closed, so a flood cannot make the refusals themselves unbounded.
const MAX_REFUSING: usize = 256;

/// Binds `count` listeners on one address with `SO_REUSEPORT`, so the kernel spreads new
/// connections across the data-plane threads. Port 0 picks one free port for all.
/// `what` and `flag` name the listener in errors ("proxy", "--proxy-addr").
pub fn bind_listeners(
    addr: SocketAddr,
    count: usize,
    what: &str,
    flag: &str,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    // SO_REUSEPORT would let this process share a port another Tollgate holds the same
    // way (a second `tollgate dev`), splitting its traffic silently. A plain socket
    // cannot bind a port anyone holds: bind one first to find out, then let it go.
    let mut addr = {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        probe
            .bind(&addr.into())
            .map_err(|e| crate::listen_error(what, addr, flag, e))?;
        let bound = probe.local_addr()?.as_socket();
        bound.unwrap_or(addr)
    };
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&addr.into())
            .map_err(|e| crate::listen_error(what, addr, flag, e))?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Starts one data-plane thread per plain listener; thread `i` also serves HTTPS
/// listener `i`, when there are HTTPS listeners (as many).
pub fn spawn_workers(
    listeners: Vec<std::net::TcpListener>,
    https: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    sink: Sink,
    scheduling: CpuScheduling,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    let mut https = https.into_iter();
    for (i, listener) in listeners.into_iter().enumerate() {
        let tls_listener = https.next();
        let shared = shared.clone();
        let sink = sink.clone();
        let shutdown = shutdown.clone();
        let handle = std::thread::Builder::new()
            .name(format!("tollgate-proxy-{i}"))
            .spawn(move || {
                set_scheduling(scheduling);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime builds");
                let local = tokio::task::LocalSet::new();
                local.block_on(
                    &rt,
                    run_worker(listener, tls_listener, shared, sink, shutdown),
                );
            })?;
        threads.push(handle);
    }
    Ok(threads)
}

/// Applies the configured scheduling policy to the calling thread (nice value 0).
fn set_scheduling(scheduling: CpuScheduling) {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityOsValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let policy = match scheduling {
        CpuScheduling::Normal => return,
        CpuScheduling::Batch => NormalThreadSchedulePolicy::Batch,
    };
    if let Err(e) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Os(ThreadPriorityOsValue::default()),
        ThreadSchedulePolicy::Normal(policy),
    ) {
        tracing::warn!(
            "could not set the data-plane thread's scheduling policy to {scheduling:?}: {e:?}"
        );
    }
}

/// What every connection of one data-plane thread shares.
struct ThreadCtx {
    worker: Rc<Worker>,
    builder: auto::Builder<LocalExec>,
    connections: TaskTracker,
    shutdown: CancellationToken,
}

async fn run_worker(
    listener: std::net::TcpListener,
    tls_listener: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    sink: Sink,
    shutdown: CancellationToken,
) {
    let register = |l: std::net::TcpListener| match TcpListener::from_std(l) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!("failed to register a proxy listener: {e}");
            None
        }
    };
    let Some(listener) = register(listener) else {
        return;
    };
    let tls_listener = tls_listener.and_then(register);
    let worker = Rc::new(Worker::new(shared.clone(), AccessLog::new(sink)));
    let limits = shared.limits.clone();

    /// Most header lines an HTTP/1.1 request may have (hyper's default is 100, which real
    /// browsers behind a few proxies reach; Envoy allows 100, nginx counts bytes only).
    /// The bytes are bounded by --max-header-bytes either way.
    const MAX_REQUEST_HEADERS: usize = 200;
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Room for our own 431 check (with its JSON answer) before hyper's bare one.
        .max_buf_size((limits.max_header_bytes * 2).max(16 * 1024))
        .max_headers(MAX_REQUEST_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Find dead HTTP/2 peers (an HTTP/1.1 idle connection ends at the header timeout).
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_header_list_size((limits.max_header_bytes * 2).min(u32::MAX as usize) as u32)
        // nginx's default; each stream past the first also takes a --max-connections slot.
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);

    let ctx = Rc::new(ThreadCtx {
        worker: worker.clone(),
        builder,
        connections: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    let housekeeping = tokio::task::spawn_local(housekeeping(worker.clone()));

    loop {
        let (stream, peer, tls) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, p)) => (s, p, false),
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            accepted = accept_opt(tls_listener.as_ref()) => match accepted {
                Ok((s, p)) => (s, p, true),
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let client = ClientKey::of(peer.ip());
        if let Err(refused) = shared.take_slot(client) {
            if tls {
                // Past a limit before any handshake: closed (an answer would cost one).
                count_refused(refused);
            } else {
                refuse(stream, shared.clone(), refused);
            }
            continue;
        }
        ::metrics::counter!("tollgate_connections_total").increment(1);
        let slot = OpenConnection::counted(shared.clone(), client);
        let ctx2 = ctx.clone();
        ctx.connections.spawn_local(async move {
            let _slot = slot;
            let ctx = ctx2;
            let state = ConnState::new(ctx.worker.shared.clone(), client);
            let mut peer = phases::Peer::new(peer);
            if !tls {
                serve(&ctx, stream, peer, state).await;
                return;
            }
            let handshake = tokio::time::timeout(
                ctx.worker.shared.limits.header_read_timeout,
                handshake(&ctx.worker.shared, stream),
            );
            let (stream, host) = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tls_failed("refused");
                        tracing::debug!(peer = %peer.addr, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tls_failed("timeout");
                        return;
                    }
                },
                _ = ctx.shutdown.cancelled() => return,
            };
            let conn = stream.get_ref().1;
            let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            ::metrics::counter!("tollgate_tls_handshakes_total",
                "resumed" => if resumed { "true" } else { "false" })
            .increment(1);
            peer.tls_host = host;
            peer.client_cert = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::state::tls::ClientCert::of(c))
                .map(Arc::new);
            peer.tls = true;
            serve(&ctx, stream, peer, state).await;
        });
    }

    drop(listener);
    drop(tls_listener);
    ctx.connections.close();
    tokio::select! {
        _ = ctx.connections.wait() => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("drain deadline passed with connections still open; closing them");
        }
    }
    housekeeping.abort();
    worker.pool.clear();
    worker.flush_logs();
}

/// The TLS handshake, with the config the client's SNI asks for (some hosts ask for a
/// client certificate); also says which host's client-certificate rule it applied.
async fn handshake(
    shared: &Shared,
    stream: TcpStream,
) -> std::io::Result<(tokio_rustls::server::TlsStream<TcpStream>, Option<Arc<str>>)> {
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    let (config, host) = shared.tls.config_for(start.client_hello().server_name());
    Ok((start.into_stream(config).await?, host))
}

/// Accepts on the listener, or waits forever without one.
async fn accept_opt(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Out of file descriptors and the like: back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn tls_failed(reason: &'static str) {
    ::metrics::counter!("tollgate_tls_handshake_failures_total", "reason" => reason).increment(1);
}

/// Serves one connection (plain or after its TLS handshake) until it ends, under the
/// limits of [`guard`](super::guard).
async fn serve<I>(ctx: &ThreadCtx, io: I, peer: phases::Peer, state: Rc<ConnState>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let (w, state) = (ctx.worker.clone(), state.clone());
        service_fn(move |req| {
            let stream = state.start_stream();
            let (w, peer) = (w.clone(), peer.clone());
            async move {
                match stream {
                    Ok(stream) => {
                        let mut resp = phases::handle(req, w, peer).await?;
                        resp.body_mut().set_stream(stream);
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                    Err(refused) => {
                        count_refused(refused);
                        Ok(refused_response(refused, &w.shared))
                    }
                }
            }
        })
    };
    let io = TokioIo::new(FrameGuard::new(io));
    let conn = ctx.builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let every = ConnState::check_every(state.limits());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => break Some(result),
            _ = ctx.shutdown.cancelled(), if !closing => {
                // HTTP/1.1 closes after the response in flight, HTTP/2 sends GOAWAY.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tick.tick() => match state.check(std::time::Instant::now()) {
                Verdict::Keep => {}
                Verdict::NoFirstRequest => {
                    // Covers protocol detection and HTTP/2, which hyper's header
                    // read timeout does not.
                    protocol_error("header_read_timeout");
                    break None;
                }
                Verdict::ClientNotReading => {
                    protocol_error("send_timeout");
                    break None;
                }
                // Asked to close once already and still here: close it now.
                Verdict::Idle if closing => break None,
                Verdict::Idle => {
                    ::metrics::counter!("tollgate_connections_idle_closed_total").increment(1);
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            },
        }
    };
    if let Some(Err(e)) = result {
        count_protocol_error(&*e);
    }
}

fn protocol_error(kind: &'static str) {
    ::metrics::counter!("tollgate_http_protocol_errors_total", "kind" => kind).increment(1);
}

/// The answer to a connection or stream past a limit.
fn refused_response(refused: Refused, shared: &Shared) -> http::Response<ResponseBody> {
    let err = match refused {
        Refused::Node(limit) => ProxyError::TooManyConnections(limit),
        Refused::Client(limit) => ProxyError::TooManyClientConnections(limit),
    };
    error_response(&err, shared.limits.max_request_body)
}

/// Counts a connection or stream refused for a limit.
fn count_refused(refused: Refused) {
    let reason = match refused {
        Refused::Node(_) => "node",
        Refused::Client(_) => "client",
    };
    ::metrics::counter!("tollgate_connections_rejected_total", "reason" => reason).increment(1);
}

/// Flushes the access log and closes expired pooled connections, on a timer.
async fn housekeeping(worker: Rc<Worker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut n = 0u32;
    loop {
        tick.tick().await;
        worker.flush_logs();
        n += 1;
        if n.is_multiple_of(5) {
            worker
                .pool
                .sweep(&worker.shared.snapshot.load().routing.addrs);
        }
    }
}

/// Answers every request on a connection past a limit (503 for the node's, 429 for the
/// client's) and closes it.
fn refuse(stream: TcpStream, shared: Arc<Shared>, refused: Refused) {
    count_refused(refused);
    if shared.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        shared.refusing.fetch_sub(1, Ordering::Relaxed);
        return; // dropping the stream closes it
    }
    tokio::task::spawn_local(async move {
        let answer = shared.clone();
        let service = service_fn(move |_req| {
            let resp = refused_response(refused, &answer);
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        // HTTP/2 clients get their answer over HTTP/2 too.
        let mut builder = auto::Builder::new(LocalExec);
        builder
            .http1()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(2));
        builder.http2().max_concurrent_streams(1);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        shared.refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Counts connections that hyper closed on a protocol error (hyper answers those itself:
/// 400 for a malformed request, 431 for a head past its buffer, or just closes on a
/// header read timeout).
fn count_protocol_error(e: &(dyn std::error::Error + 'static)) {
    let Some(e) = e.downcast_ref::<hyper::Error>() else {
        return;
    };
    let kind = if e.is_parse_too_large() {
        "head_too_large"
    } else if e.is_parse() {
        "malformed"
    } else if e.is_timeout() {
        "header_read_timeout"
    } else {
        return;
    };
    ::metrics::counter!("tollgate_http_protocol_errors_total", "kind" => kind).increment(1);
}
