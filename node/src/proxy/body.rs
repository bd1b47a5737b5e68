//! The two body types of the proxy, both streamed frame by frame, never buffered whole.
//!
//! - [`RequestBody`]: the client's body on its way upstream, counted and cut off at the
//!   size limit (the error it raises becomes a 413 when no response has started).
//! - [`ResponseBody`]: what the client receives: an upstream body, or a small body the
//!   gateway made itself. When it finishes (or the client goes away) it hands the
//!   upstream connection back to the pool if that is safe, and runs the request's last
//!   stage (metrics and access log) through its [`Tail`].

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::proxy::client::PooledSender;
use crate::proxy::guard::StreamGuard;
use crate::proxy::phases::Tail;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Raised by [`RequestBody`] when the client sends more than the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Raised by [`RequestBody`] when the client sends slower than the minimum rate.
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived slower than {0} bytes per second")]
pub struct BodyTooSlow(pub u64);

/// What a request body did, shared between it and the request that owns it.
#[derive(Debug, Default)]
pub struct BodyStats {
    pub bytes: Cell<u64>,
    pub too_large: Cell<bool>,
    /// Non-zero: cut off for arriving slower than this many bytes per second.
    pub too_slow: Cell<u64>,
    /// Read to its end (an upstream connection is reusable only after that).
    pub finished: Cell<bool>,
    /// The client's side of the body failed (it went away mid-upload, or sent a bad chunk).
    pub client_error: Cell<bool>,
    /// The call log keeps up to this many of its first bytes (0: none).
    pub capture_cap: Cell<usize>,
    pub captured: std::cell::RefCell<Vec<u8>>,
}

/// The client's request body, streamed upstream with a size limit and a minimum rate.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    /// A body made by the gateway, sent as one frame.
    full: Option<Bytes>,
    limit: u64,
    stats: Rc<BodyStats>,
    rate: Option<Box<MinRate>>,
}

/// The minimum rate a body must arrive at (like Kestrel's `MinRequestBodyDataRate`): after
/// the grace period, the bytes received must keep up with `bytes_per_sec` times the time
/// spent waiting for them. Only time spent waiting on the client counts, so an upstream
/// that reads slowly does not make its client late. Nothing is timed while a body arrives
/// with its head.
#[derive(Debug)]
pub struct MinRate {
    bytes_per_sec: u64,
    grace: Duration,
    /// Time spent waiting for the client so far (not counting the wait in progress).
    waited: Duration,
    wait_started: Option<tokio::time::Instant>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl MinRate {
    pub fn new(bytes_per_sec: u64, grace: Duration) -> Option<Box<MinRate>> {
        (bytes_per_sec > 0).then(|| {
            Box::new(MinRate {
                bytes_per_sec,
                grace,
                waited: Duration::ZERO,
                wait_started: None,
                sleep: None,
            })
        })
    }

    /// The client delivered: the wait in progress ends.
    fn arrived(&mut self) {
        if let Some(started) = self.wait_started.take() {
            self.waited += started.elapsed();
        }
    }

    /// The client has nothing for now: Ready when it has fallen below the rate.
    fn poll_late(&mut self, received: u64, cx: &mut Context<'_>) -> Poll<()> {
        let started = *self
            .wait_started
            .get_or_insert_with(tokio::time::Instant::now);
        let allowed = self.grace.max(Duration::from_secs_f64(
            received as f64 / self.bytes_per_sec as f64,
        ));
        let deadline = started + allowed.saturating_sub(self.waited);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
    }
}

impl RequestBody {
    /// `rate`: the minimum rate it must arrive at (None: any).
    pub fn new(
        inner: Incoming,
        limit: u64,
        stats: Rc<BodyStats>,
        rate: Option<Box<MinRate>>,
    ) -> Self {
        if inner.is_end_stream() {
            stats.finished.set(true);
        }
        Self {
            inner: Some(inner),
            full: None,
            limit,
            stats,
            rate,
        }
    }

    /// An empty body (for requests that had none, and their retries).
    pub fn empty(stats: Rc<BodyStats>) -> Self {
        stats.finished.set(true);
        Self {
            inner: None,
            full: None,
            limit: 0,
            stats,
            rate: None,
        }
    }

    /// A body the gateway made (an LLM provider call).
    pub fn full(bytes: Bytes, stats: Rc<BodyStats>) -> Self {
        stats.finished.set(true);
        Self {
            inner: None,
            full: (!bytes.is_empty()).then_some(bytes),
            limit: u64::MAX,
            stats,
            rate: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(bytes) = this.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(rate) = &mut this.rate {
                    rate.arrived();
                }
                if let Some(data) = frame.data_ref() {
                    let total = this.stats.bytes.get() + data.len() as u64;
                    this.stats.bytes.set(total);
                    let cap = this.stats.capture_cap.get();
                    if cap > 0 {
                        let mut kept = this.stats.captured.borrow_mut();
                        let n = cap.saturating_sub(kept.len()).min(data.len());
                        kept.extend_from_slice(&data[..n]);
                    }
                    if total > this.limit {
                        this.stats.too_large.set(true);
                        this.inner = None;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(this.limit)))));
                    }
                }
                if inner.is_end_stream() {
                    this.stats.finished.set(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.stats.client_error.set(true);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.stats.finished.set(true);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(rate) = &mut this.rate
                    && rate.poll_late(this.stats.bytes.get(), cx).is_ready()
                {
                    let min = rate.bytes_per_sec;
                    this.stats.too_slow.set(min);
                    this.inner = None;
                    return Poll::Ready(Some(Err(Box::new(BodyTooSlow(min)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.full.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(bytes) = &self.full {
            return SizeHint::with_exact(bytes.len() as u64);
        }
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

/// The response body sent to the client.
pub struct ResponseBody {
    kind: Kind,
    /// Boxed: the response is moved several times on its way out, and the tail is large.
    tail: Option<Box<Tail>>,
    /// The request's place on its connection, given back when the body is done.
    stream: Option<StreamGuard>,
}

enum Kind {
    /// An upstream body; the sender goes back to the pool once it has been read to the end.
    Upstream {
        body: Incoming,
        conn: Option<PooledSender>,
        idle: IdleTimer,
    },
    /// A body the gateway made (JSON errors, admin pages).
    Full(Option<Bytes>),
    /// An LLM provider's stream, relayed event by event.
    Llm(Box<crate::llm::serve::Relay>),
}

/// The longest wait for the next piece of an upstream body (nginx's `proxy_read_timeout`).
/// The timer exists only while a read is pending, so bodies that arrive with their head
/// cost nothing.
struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimer {
    /// Called when the body has nothing to give: Ready when it waited too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit;
        self.sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)))
            .as_mut()
            .poll(cx)
    }

    fn progressed(&mut self) {
        if let Some(sleep) = &mut self.sleep {
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limit);
        }
    }
}

/// Raised when an upstream stops sending in the middle of a body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?} in the middle of the response body")]
pub struct UpstreamBodyStalled(pub Duration);

impl ResponseBody {
    /// An upstream body; `idle_limit` bounds the wait for each piece of it.
    pub fn upstream(body: Incoming, conn: Option<PooledSender>, idle_limit: Duration) -> Self {
        Self {
            kind: Kind::Upstream {
                body,
                conn,
                idle: IdleTimer {
                    limit: idle_limit,
                    sleep: None,
                },
            },
            tail: None,
            stream: None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            tail: None,
            stream: None,
        }
    }

    /// The bytes of a whole body made by [`ResponseBody::full`] (None for a stream).
    pub fn full_bytes(&self) -> Option<Bytes> {
        match &self.kind {
            Kind::Full(b) => Some(b.clone().unwrap_or_default()),
            _ => None,
        }
    }

    pub fn llm(relay: Box<crate::llm::serve::Relay>) -> Self {
        Self {
            kind: Kind::Llm(relay),
            tail: None,
            stream: None,
        }
    }

    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
            tail: None,
            stream: None,
        }
    }

    pub fn set_tail(&mut self, tail: Box<Tail>) {
        self.tail = Some(tail);
    }

    pub fn set_stream(&mut self, stream: StreamGuard) {
        self.stream = Some(stream);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(stream) = &this.stream {
            stream.polled();
        }
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Llm(relay) => relay.poll_next(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, conn, idle } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => {
                    if idle.poll_expired(cx).is_ready() {
                        // Give up on it: the connection closes with the dropped sender.
                        conn.take();
                        if let Some(tail) = &mut this.tail {
                            tail.upstream_body_failed();
                        }
                        return Poll::Ready(Some(Err(Box::new(UpstreamBodyStalled(idle.limit)))));
                    }
                    Poll::Pending
                }
                Poll::Ready(Some(Ok(frame))) => {
                    idle.progressed();
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(None) => {
                    // Read to the end: the connection can carry the next request.
                    if let Some(conn) = conn.take() {
                        conn.release();
                    }
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(tail) = &mut this.tail {
                        tail.upstream_body_failed();
                    }
                    Poll::Ready(Some(Err(Box::new(e) as BoxError)))
                }
            },
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            if let Some(tail) = &mut this.tail {
                tail.add_response_bytes(data.len() as u64);
                tail.capture_response(data);
            }
            if let Some(stream) = &this.stream {
                stream.handed_over();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Llm(_) => false,
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Llm(_) => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body that had nothing to read (HEAD, 204, 304) is never polled: its connection is
        // still reusable. One dropped mid-stream is not, and its sender just closes.
        if let Kind::Upstream { body, conn, .. } = &mut self.kind
            && body.is_end_stream()
            && let Some(conn) = conn.take()
        {
            conn.release();
        }
    }
}
