//! What keeps one client from holding the data plane.
//!
//! - Slots: every open connection takes one slot of `--max-connections`, and so does every
//!   HTTP/2 stream past the first that a connection has open at once (each can hold an
//!   upstream socket). Slots are also counted per client address (`/64` for IPv6), against
//!   `--max-connections-per-client`.
//! - [`ConnState`]: per connection, the requests in flight, when it went idle, and for each
//!   response whether the client has stopped taking it. The connection task reads it on a
//!   coarse timer to close idle connections (`--idle-timeout`) and those whose client stopped
//!   reading (`--send-timeout`, like nginx's `send_timeout`).
//! - [`FrameGuard`]: reads the frame headers of an HTTP/2 connection as they pass and closes
//!   the connection when SETTINGS or PING frames arrive faster than a token bucket allows.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::Shared;

/// A client address as the per-client limit counts it: an IPv4 address, or the `/64`
/// an IPv6 address is in (one host usually holds a whole `/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey(u32::from(v4) as u128),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(u32::from(v4) as u128),
                None => ClientKey((u128::from(v6) & !((1u128 << 64) - 1)) | (1 << 32)),
            },
        }
    }
}

/// Slots taken per client address.
#[derive(Debug, Default)]
pub struct ClientSlots {
    limit: usize,
    taken: Mutex<HashMap<ClientKey, usize>>,
}

impl ClientSlots {
    /// `limit` 0: no per-client limit.
    pub fn new(limit: usize) -> ClientSlots {
        ClientSlots {
            limit,
            taken: Mutex::default(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes a slot for `client` unless it holds its limit already.
    pub fn try_take(&self, client: ClientKey) -> bool {
        if self.limit == 0 {
            return true;
        }
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let n = taken.entry(client).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    /// Takes a slot even past the limit (a connection handing its slot on to a tunnel).
    pub fn take(&self, client: ClientKey) {
        if self.limit != 0 {
            *self
                .taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(client)
                .or_insert(0) += 1;
        }
    }

    pub fn release(&self, client: ClientKey) {
        if self.limit == 0 {
            return;
        }
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = taken.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                taken.remove(&client);
            }
        }
    }

    /// Slots `client` holds now.
    #[cfg(test)]
    pub fn held(&self, client: ClientKey) -> usize {
        let taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.get(&client).copied().unwrap_or(0)
    }
}

/// Why a new stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The node's slots (`--max-connections`) are all taken.
    Node(usize),
    /// This client address holds its share (`--max-connections-per-client`).
    Client(usize),
}

/// One connection's requests in flight and how they are doing.
pub struct ConnState {
    shared: Arc<Shared>,
    client: ClientKey,
    accepted: Instant,
    first_request: Cell<bool>,
    active: Cell<u32>,
    /// When the last request in flight ended (or the connection was accepted).
    idle_since: Cell<Instant>,
    /// Per response in flight: since when it has been waiting for the client to take what
    /// it was given (`None`: not waiting on the client).
    waits: RefCell<slab::Slab<Option<Instant>>>,
}

/// What the connection task should do after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// No first request within the header read timeout: drop it.
    NoFirstRequest,
    /// Nothing in flight for the idle timeout: close it gracefully.
    Idle,
    /// A response has waited for the client longer than the send timeout: drop it.
    ClientNotReading,
}

impl ConnState {
    pub fn new(shared: Arc<Shared>, client: ClientKey) -> Rc<ConnState> {
        let now = Instant::now();
        Rc::new(ConnState {
            shared,
            client,
            accepted: now,
            first_request: Cell::new(false),
            active: Cell::new(0),
            idle_since: Cell::new(now),
            waits: RefCell::new(slab::Slab::new()),
        })
    }

    pub fn limits(&self) -> &crate::proxy::Limits {
        &self.shared.limits
    }

    /// Starts a request on this connection. The first one in flight rides on the
    /// connection's own slot; each one beside it takes a slot of its own.
    pub fn start_stream(self: &Rc<Self>) -> Result<StreamGuard, Refused> {
        self.first_request.set(true);
        let extra = self.active.get() > 0;
        if extra {
            self.shared.take_slot(self.client)?;
        }
        self.active.set(self.active.get() + 1);
        let key = self.waits.borrow_mut().insert(None);
        Ok(StreamGuard {
            conn: self.clone(),
            key,
            extra,
        })
    }

    /// Looks at the connection at `now`.
    pub fn check(&self, now: Instant) -> Verdict {
        let limits = &self.shared.limits;
        if !self.first_request.get() {
            return if now.duration_since(self.accepted) >= limits.header_read_timeout {
                Verdict::NoFirstRequest
            } else {
                Verdict::Keep
            };
        }
        if self.active.get() == 0 {
            return if now.duration_since(self.idle_since.get()) >= limits.idle_timeout {
                Verdict::Idle
            } else {
                Verdict::Keep
            };
        }
        let stalled =
            self.waits.borrow().iter().any(|(_, w)| {
                w.is_some_and(|since| now.duration_since(since) >= limits.send_timeout)
            });
        if stalled {
            Verdict::ClientNotReading
        } else {
            Verdict::Keep
        }
    }

    /// How often the connection task should [`check`](Self::check): often enough that
    /// every limit is enforced within a quarter of itself (at most 5 s late).
    pub fn check_every(limits: &crate::proxy::Limits) -> Duration {
        (limits
            .idle_timeout
            .min(limits.send_timeout)
            .min(limits.header_read_timeout)
            / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// A request in flight, from its head to the end of its response (it rides in the
/// response body). Gives back the slot it took when dropped.
pub struct StreamGuard {
    conn: Rc<ConnState>,
    key: usize,
    extra: bool,
}

impl StreamGuard {
    /// The response body is being asked for more: the client is taking it.
    #[inline]
    pub fn polled(&self) {
        if let Some(w) = self.conn.waits.borrow_mut().get_mut(self.key) {
            *w = None;
        }
    }

    /// The response body handed over a piece: until it is asked again, the response
    /// waits for the client.
    #[inline]
    pub fn handed_over(&self) {
        if let Some(w) = self.conn.waits.borrow_mut().get_mut(self.key) {
            *w = Some(Instant::now());
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.waits.borrow_mut().try_remove(self.key);
        let active = conn.active.get().saturating_sub(1);
        conn.active.set(active);
        if active == 0 {
            conn.idle_since.set(Instant::now());
        }
        if self.extra {
            conn.shared.release_slot(conn.client);
        }
    }
}

/// Most SETTINGS and PING frames (not acknowledgements) a client may send in a burst,
/// and how many per second refill it. A real client sends a handful; h2 would answer a
/// flood one by one, so past this the connection is closed.
const CONTROL_FRAME_BURST: f64 = 200.0;
const CONTROL_FRAMES_PER_SEC: f64 = 50.0;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The frame reader's position in the byte stream.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// Comparing the first bytes with the HTTP/2 preface; this many matched so far.
    Preface(usize),
    /// Not HTTP/2: nothing to look at.
    Off,
    /// Inside the frame stream: `have` bytes of the next 9-byte frame header are in
    /// `head`, after skipping `skip` more payload bytes.
    Frames { skip: usize, have: usize },
}

/// A client connection whose HTTP/2 control frames are counted as they are read.
pub struct FrameGuard<S> {
    inner: S,
    scan: Scan,
    head: [u8; 9],
    tokens: f64,
    refilled: Option<Instant>,
}

impl<S> FrameGuard<S> {
    pub fn new(inner: S) -> FrameGuard<S> {
        FrameGuard {
            inner,
            scan: Scan::Preface(0),
            head: [0; 9],
            tokens: CONTROL_FRAME_BURST,
            refilled: None,
        }
    }

    /// Reads the frame headers in `bytes`; false when the client floods control frames.
    fn inspect(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match self.scan {
                Scan::Off => return true,
                Scan::Preface(matched) => {
                    let n = (H2_PREFACE.len() - matched).min(bytes.len());
                    if bytes[..n] != H2_PREFACE[matched..matched + n] {
                        self.scan = Scan::Off;
                        return true;
                    }
                    bytes = &bytes[n..];
                    self.scan = if matched + n == H2_PREFACE.len() {
                        Scan::Frames { skip: 0, have: 0 }
                    } else {
                        Scan::Preface(matched + n)
                    };
                }
                Scan::Frames { skip, have } if skip > 0 => {
                    let n = skip.min(bytes.len());
                    bytes = &bytes[n..];
                    self.scan = Scan::Frames {
                        skip: skip - n,
                        have,
                    };
                }
                Scan::Frames { have, .. } => {
                    let n = (9 - have).min(bytes.len());
                    self.head[have..have + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if have + n < 9 {
                        self.scan = Scan::Frames {
                            skip: 0,
                            have: have + n,
                        };
                        continue;
                    }
                    let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                    let (kind, flags) = (self.head[3], self.head[4]);
                    const SETTINGS: u8 = 0x4;
                    const PING: u8 = 0x6;
                    const ACK: u8 = 0x1;
                    if (kind == SETTINGS || kind == PING) && flags & ACK == 0 && !self.take_token()
                    {
                        return false;
                    }
                    self.scan = Scan::Frames {
                        skip: len as usize,
                        have: 0,
                    };
                }
            }
        }
        true
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        if let Some(last) = self.refilled {
            let refill = now.duration_since(last).as_secs_f64() * CONTROL_FRAMES_PER_SEC;
            self.tokens = (self.tokens + refill).min(CONTROL_FRAME_BURST);
        }
        self.refilled = Some(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && !matches!(this.scan, Scan::Off)
            && !this.inspect(&buf.filled()[before..])
        {
            ::metrics::counter!("tollgate_http_protocol_errors_total", "kind" => "control_frame_flood")
                .increment(1);
            return Poll::Ready(Err(io::Error::other(
                "the client sent SETTINGS or PING frames faster than allowed",
            )));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let len = (payload as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.extend(std::iter::repeat_n(0u8, payload));
        f
    }

    #[test]
    fn http1_is_not_looked_at() {
        let mut g = FrameGuard::new(());
        assert!(g.inspect(b"GET / HTTP/1.1\r\n"));
        assert!(matches!(g.scan, Scan::Off));
    }

    #[test]
    fn a_ping_flood_is_caught_across_split_reads_and_acks_are_free() {
        let mut g = FrameGuard::new(());
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 12)); // SETTINGS
        bytes.extend(frame(0x0, 0, 70_000)); // DATA, payload skipped
        for _ in 0..1000 {
            bytes.extend(frame(0x6, 0x1, 8)); // PING acks do not count
        }
        for chunk in bytes.chunks(7) {
            assert!(g.inspect(chunk));
        }
        let mut pings = Vec::new();
        for _ in 0..CONTROL_FRAME_BURST as usize + 10 {
            pings.extend(frame(0x6, 0, 8));
        }
        let flagged = pings.chunks(5).any(|c| !g.inspect(c));
        assert!(flagged, "a burst past the bucket is a flood");
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::of(a), ClientKey::of(b));
        assert_ne!(ClientKey::of(a), ClientKey::of(c));
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(ClientKey::of(v4), ClientKey::of(mapped));
        let slots = ClientSlots::new(2);
        let k = ClientKey::of(v4);
        assert!(slots.try_take(k) && slots.try_take(k));
        assert!(!slots.try_take(k));
        slots.release(k);
        assert!(slots.try_take(k));
        assert_eq!(slots.held(k), 2);
    }
}
