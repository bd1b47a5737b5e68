//! The data-plane threads: one current-thread tokio runtime per core, each with its own
//! `SO_REUSEPORT` listener on the proxy address, its own upstream pool and its own
//! access-log buffer. Nothing on the request path crosses threads except the `ArcSwap`
//! snapshot load and a few atomics.
//!
//! Each connection speaks HTTP/1.1 or h2c (prior knowledge), chosen from its first bytes.
//! A connection that has not delivered a first request within `header_read_timeout` is
//! dropped (this covers protocol detection and HTTP/2), and hyper's own header read timeout
//! covers every HTTP/1.1 request head after that. Connections past
//! `max_connections` are answered 503 (JSON) and closed.
//!
//! On shutdown a thread stops accepting, asks its connections to finish (HTTP/1.1 closes
//! after the response in flight, HTTP/2 sends GOAWAY), and waits for them until the drain
//! deadline.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::CpuScheduling;
use crate::proxy::body::ResponseBody;
use crate::proxy::phases::{self, Worker};
use crate::proxy::respond::{ProxyError, error_response};
use crate::proxy::{OpenConnection, Shared};
use crate::telemetry::access_log::{AccessLog, Sink};

/// Most connections answered "too many connections" at once; past this they are just
/// closed, so a flood cannot make the refusals themselves unbounded.
const MAX_REFUSING: usize = 256;

/// Binds `count` listeners on one address with `SO_REUSEPORT`, so the kernel spreads new
/// connections across the data-plane threads. Port 0 picks one free port for all.
pub fn bind_listeners(
    addr: SocketAddr,
    count: usize,
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
            .map_err(|e| crate::listen_error("proxy", addr, "--proxy-addr", e))?;
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
            .map_err(|e| crate::listen_error("proxy", addr, "--proxy-addr", e))?;
        socket.listen(4096)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Starts one data-plane thread per listener.
pub fn spawn_workers(
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    sink: Sink,
    scheduling: CpuScheduling,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
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
                local.block_on(&rt, run_worker(listener, shared, sink, shutdown));
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

/// Spawns `!Send` futures (our services hold `Rc`s) on the thread's `LocalSet`.
#[derive(Clone, Copy, Debug)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

async fn run_worker(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    sink: Sink,
    shutdown: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("failed to register the proxy listener: {e}");
            return;
        }
    };
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
        .max_header_list_size((limits.max_header_bytes * 2).min(u32::MAX as usize) as u32);

    let builder = Rc::new(builder);
    let graceful = GracefulShutdown::new();
    let housekeeping = tokio::task::spawn_local(housekeeping(worker.clone()));

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let open = shared.open_connections.fetch_add(1, Ordering::Relaxed) + 1;
        if open > limits.max_connections {
            shared.open_connections.fetch_sub(1, Ordering::Relaxed);
            ::metrics::counter!("tollgate_connections_rejected_total").increment(1);
            refuse(stream, shared.clone());
            continue;
        }
        ::metrics::counter!("tollgate_connections_total").increment(1);
        let guard = OpenConnection::counted(shared.clone());

        let w = worker.clone();
        let peer = phases::Peer::new(peer);
        // Set by the first request: until then the connection is on a deadline.
        let first_request = Rc::new(Cell::new(false));
        let seen = first_request.clone();
        let service = service_fn(move |req| {
            seen.set(true);
            phases::handle(req, w.clone(), peer.clone())
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_request_timeout = limits.header_read_timeout;
        tokio::task::spawn_local(async move {
            let _guard = guard;
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let conn = watcher.watch(conn);
            tokio::pin!(conn);
            // hyper's header read timeout only starts once HTTP/1 is chosen. A client that
            // sends nothing, part of the HTTP/2 preface, or no first request is dropped here.
            let result = tokio::select! {
                result = &mut conn => result,
                _ = tokio::time::sleep(first_request_timeout) => {
                    if first_request.get() {
                        conn.await
                    } else {
                        ::metrics::counter!("tollgate_http_protocol_errors_total", "kind" => "header_read_timeout")
                            .increment(1);
                        return;
                    }
                }
            };
            if let Err(e) = result {
                count_protocol_error(&*e);
            }
        });
    }

    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("drain deadline passed with connections still open; closing them");
        }
    }
    housekeeping.abort();
    worker.pool.clear();
    worker.access_log.flush();
}

/// Flushes the access log and closes expired pooled connections, on a timer.
async fn housekeeping(worker: Rc<Worker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut n = 0u32;
    loop {
        tick.tick().await;
        worker.access_log.flush();
        n += 1;
        if n.is_multiple_of(5) {
            worker.pool.sweep();
        }
    }
}

/// Answers every request on an over-the-cap connection with 503 and closes it.
fn refuse(stream: TcpStream, shared: Arc<Shared>) {
    if shared.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        shared.refusing.fetch_sub(1, Ordering::Relaxed);
        return; // dropping the stream closes it
    }
    let limit = shared.limits.max_connections;
    let body_limit = shared.limits.max_request_body;
    tokio::task::spawn_local(async move {
        let service = service_fn(move |_req| async move {
            let resp: http::Response<ResponseBody> =
                error_response(&ProxyError::TooManyConnections(limit), body_limit);
            Ok::<_, std::convert::Infallible>(resp)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(2))
            .serve_connection(TokioIo::new(stream), service);
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
