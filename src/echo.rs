//! The demo upstream of `tollgate dev`: answers every request with a JSON description of
//! what it received (method, path, query, headers, body), so you can see what the gateway
//! changed on the way. Bodies are echoed up to 1 MiB; larger ones are counted, not kept.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const MAX_ECHOED: usize = 1024 * 1024;

/// Binds the echo server's listener (`flag` names the setting that moves it, for the
/// error when the address is taken).
pub fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| tollgate_node::listen_error("demo echo upstream", addr, flag, e))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Binds the echo server and serves it on a thread of its own. Returns the bound address.
pub fn spawn(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    serve(bind(addr, "--listen")?)
}

/// Serves the echo server on `listener`, on a thread of its own. Returns its address.
pub fn serve(listener: std::net::TcpListener) -> anyhow::Result<SocketAddr> {
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("tollgate-dev-echo".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("listener registers");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service_fn(echo))
                            .await;
                    });
                }
            });
        })?;
    Ok(local)
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            total += data.len();
            if kept.len() < MAX_ECHOED {
                let room = MAX_ECHOED - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let body = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&kept),
        "body_bytes": total,
    });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&body).expect("JSON serializes"),
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
