//! Calls as a data-plane thread records them: each one encoded once, by hand, straight into
//! the thread's buffer as a protobuf `CallRecord` without its time. The request path
//! allocates nothing per field and frees nothing on another thread; the writer stamps each
//! record's time and copies bytes.

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tollgate_proto::node::v1::{CallRecord, CapturedHeader};

/// One call, borrowed from the request that made it. Empty strings and zeros are left out of
/// the record (as protobuf leaves out defaults).
#[derive(Default)]
pub struct Call<'a> {
    /// When the response's last byte went out, microseconds since the epoch.
    pub time_us: u64,
    pub node_id: u64,
    /// 0 when the request has none.
    pub request_id: u128,
    pub trace_id: u128,
    pub tenant: &'a str,
    pub api: &'a str,
    pub version: &'a str,
    pub key_id: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u32,
    pub error: &'a str,
    pub duration_us: u64,
    pub upstream_us: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub client: Option<std::net::SocketAddr>,
    pub upstream: &'a str,
    pub attempts: u32,
    pub model: &'a str,
    pub provider: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_nanos: i64,
    pub request_headers: &'a [CapturedHeader],
    pub response_headers: &'a [CapturedHeader],
    pub request_body: &'a [u8],
    pub response_body: &'a [u8],
    pub request_body_truncated: bool,
    pub response_body_truncated: bool,
}

/// What the writer needs of a record without reading it: its time, for the key and the
/// order; its duration, for the minute's slowest; its ids, for the id blocks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meta {
    /// Where the record's bytes end in its batch.
    end: u32,
    pub time_us: u64,
    pub duration_us: u64,
    pub request_id: u128,
    pub trace_id: u128,
}

/// Encoded calls, handed to the writer together.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    calls: Vec<Meta>,
}

impl Batch {
    pub fn with_capacity(calls: usize) -> Batch {
        Batch {
            bytes: Vec::with_capacity(calls * 256),
            calls: Vec::with_capacity(calls),
        }
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Bytes it can hold without growing.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Empties it, keeping its memory.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.calls.clear();
    }

    /// Bytes held, for handing over before a batch of large records grows too big.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn push(&mut self, c: &Call<'_>) {
        let b = &mut self.bytes;
        varint(b, 2, c.node_id);
        hex(b, 3, c.request_id);
        hex(b, 4, c.trace_id);
        text(b, 5, c.tenant.as_bytes());
        text(b, 6, c.api.as_bytes());
        text(b, 7, c.version.as_bytes());
        text(b, 8, c.key_id.as_bytes());
        text(b, 9, c.route.as_bytes());
        text(b, 10, c.method.as_bytes());
        text(b, 11, c.host.as_bytes());
        text(b, 12, c.path.as_bytes());
        text(b, 13, c.protocol.as_bytes());
        varint(b, 14, u64::from(c.status));
        text(b, 15, c.error.as_bytes());
        varint(b, 16, c.duration_us);
        if let Some(us) = c.upstream_us {
            // Optional: present even when 0.
            encode_key(17, WireType::Varint, b);
            encode_varint(us, b);
        }
        varint(b, 18, c.request_bytes);
        varint(b, 19, c.response_bytes);
        if let Some(addr) = c.client {
            match addr.ip() {
                std::net::IpAddr::V4(ip) => text(b, 20, &ip.octets()),
                std::net::IpAddr::V6(ip) => text(b, 20, &ip.octets()),
            }
            varint(b, 34, u64::from(addr.port()));
        }
        text(b, 21, c.upstream.as_bytes());
        varint(b, 22, u64::from(c.attempts));
        text(b, 23, c.model.as_bytes());
        text(b, 24, c.provider.as_bytes());
        varint(b, 25, c.input_tokens);
        varint(b, 26, c.output_tokens);
        // int64: a negative value is its two's complement, ten bytes.
        varint(b, 27, c.cost_nanos as u64);
        for h in c.request_headers {
            prost::encoding::message::encode(28, h, b);
        }
        for h in c.response_headers {
            prost::encoding::message::encode(29, h, b);
        }
        text(b, 30, c.request_body);
        text(b, 31, c.response_body);
        varint(b, 32, u64::from(c.request_body_truncated));
        varint(b, 33, u64::from(c.response_body_truncated));
        self.calls.push(Meta {
            end: b.len() as u32,
            time_us: c.time_us,
            duration_us: c.duration_us,
            request_id: c.request_id,
            trace_id: c.trace_id,
        });
    }

    /// A record already built (tests and benchmarks).
    pub fn push_record(&mut self, r: &CallRecord) {
        let id = |t: &str| super::store::parse_id(t).unwrap_or(0);
        let meta = Meta {
            end: 0,
            time_us: r.time_us,
            duration_us: r.duration_us,
            request_id: id(&r.request_id),
            trace_id: id(&r.trace_id),
        };
        let mut r = r.clone();
        r.time_us = 0;
        r.encode(&mut self.bytes)
            .expect("a Vec grows to hold what is encoded");
        self.calls.push(Meta {
            end: self.bytes.len() as u32,
            ..meta
        });
    }

    /// Each record: what the writer needs of it, and its bytes.
    pub(super) fn records(&self) -> impl Iterator<Item = (&Meta, &[u8])> {
        let mut start = 0;
        self.calls.iter().map(move |m| {
            let body = &self.bytes[start..m.end as usize];
            start = m.end as usize;
            (m, body)
        })
    }
}

fn varint(b: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, b);
        encode_varint(v, b);
    }
}

/// A string or bytes field.
fn text(b: &mut Vec<u8>, tag: u32, v: &[u8]) {
    if !v.is_empty() {
        encode_key(tag, WireType::LengthDelimited, b);
        encode_varint(v.len() as u64, b);
        b.extend_from_slice(v);
    }
}

/// An id as 32 lowercase hex digits.
fn hex(b: &mut Vec<u8>, tag: u32, id: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    if id != 0 {
        encode_key(tag, WireType::LengthDelimited, b);
        encode_varint(32, b);
        for byte in id.to_be_bytes() {
            b.push(DIGITS[(byte >> 4) as usize]);
            b.push(DIGITS[(byte & 15) as usize]);
        }
    }
}

/// Appends a stored record: its length, its time (field 1; the body never holds one), then
/// its body. The store's chunks are such records back to back.
pub(super) fn append_stored(out: &mut Vec<u8>, time_us: u64, body: &[u8]) {
    let len = 1 + encoded_len_varint(time_us) + body.len();
    encode_varint(len as u64, out);
    encode_key(1, WireType::Varint, out);
    encode_varint(time_us, out);
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of the hand encoder lands where prost reads it.
    #[test]
    fn a_call_reads_back_as_the_record_it_describes() {
        let headers = [CapturedHeader {
            name: "accept".into(),
            value: "text/plain".into(),
        }];
        let back = [CapturedHeader {
            name: "content-type".into(),
            value: "application/json".into(),
        }];
        let call = Call {
            time_us: 1_765_000_000_000_001,
            node_id: 3,
            request_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            trace_id: 0xfeed,
            tenant: "acme",
            api: "orders",
            version: "1.1.0",
            key_id: "k1",
            route: "orders-get",
            method: "GET",
            host: "api.example.com",
            path: "/orders/7",
            protocol: "HTTP/2",
            status: 503,
            error: "upstream_unavailable",
            duration_us: 12_345,
            upstream_us: Some(0),
            request_bytes: 10,
            response_bytes: 20,
            client: Some("[2001:db8::1]:4431".parse().unwrap()),
            upstream: "orders-v2",
            attempts: 2,
            model: "gpt-x",
            provider: "oai",
            input_tokens: 11,
            output_tokens: 22,
            cost_nanos: -5,
            request_headers: &headers,
            response_headers: &back,
            request_body: b"{\"a\":1}",
            response_body: b"[]",
            request_body_truncated: true,
            response_body_truncated: false,
        };
        let mut batch = Batch::default();
        batch.push(&call);
        batch.push(&Call {
            client: Some("10.0.0.2:80".parse().unwrap()),
            ..Default::default()
        });
        let mut stored = Vec::new();
        for (m, body) in batch.records() {
            append_stored(&mut stored, m.time_us + 7, body);
        }
        let mut v = &stored[..];
        let first = CallRecord::decode_length_delimited(&mut v).unwrap();
        let second = CallRecord::decode_length_delimited(&mut v).unwrap();
        assert!(v.is_empty());
        assert_eq!(
            first,
            CallRecord {
                time_us: call.time_us + 7,
                node_id: 3,
                request_id: "0123456789abcdef0011223344556677".into(),
                trace_id: "0000000000000000000000000000feed".into(),
                tenant: "acme".into(),
                api: "orders".into(),
                version: "1.1.0".into(),
                key_id: "k1".into(),
                route: "orders-get".into(),
                method: "GET".into(),
                host: "api.example.com".into(),
                path: "/orders/7".into(),
                protocol: "HTTP/2".into(),
                status: 503,
                error: "upstream_unavailable".into(),
                duration_us: 12_345,
                upstream_us: Some(0),
                request_bytes: 10,
                response_bytes: 20,
                client_ip: "2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
                    .to_vec(),
                client_port: 4431,
                upstream: "orders-v2".into(),
                attempts: 2,
                model: "gpt-x".into(),
                provider: "oai".into(),
                input_tokens: 11,
                output_tokens: 22,
                cost_nanos: -5,
                request_headers: headers.to_vec(),
                response_headers: back.to_vec(),
                request_body: b"{\"a\":1}".to_vec(),
                response_body: b"[]".to_vec(),
                request_body_truncated: true,
                response_body_truncated: false,
            }
        );
        assert_eq!(
            second,
            CallRecord {
                time_us: 7,
                client_ip: vec![10, 0, 0, 2],
                client_port: 80,
                ..Default::default()
            }
        );
        // And a record built by hand goes through the same way.
        let mut again = Batch::default();
        again.push_record(&first);
        let (m, body) = again.records().next().unwrap();
        assert_eq!((m.request_id, m.trace_id), (call.request_id, 0xfeed));
        let mut out = Vec::new();
        append_stored(&mut out, m.time_us, body);
        assert_eq!(
            CallRecord::decode_length_delimited(&out[..]).unwrap(),
            first
        );
    }
}
