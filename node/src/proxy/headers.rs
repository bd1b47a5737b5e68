//! Header rules every proxied message follows, whatever the route says.
//!
//! - Hop-by-hop headers (RFC 9110 §7.6.1) are removed in both directions: `Connection`,
//!   every header it names, `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`
//!   and `Upgrade`, except that a WebSocket (or other) upgrade keeps `Upgrade` and
//!   `Connection: upgrade` so the upstream can accept it.
//! - `X-Forwarded-For` gets the client address appended; `X-Forwarded-Proto` and
//!   `X-Forwarded-Host` are set to what the client used (`https` when it came over TLS).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection: upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case("upgrade")))
}

fn tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The fixed hop-by-hop headers, in the order of the bits [`present`] reports.
fn fixed() -> [&'static HeaderName; 6] {
    [
        &header::CONNECTION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Which of [`fixed`]'s headers are present, as bits: one pass over the names, no hashing.
fn present(headers: &HeaderMap) -> u8 {
    let fixed = fixed();
    let mut bits = 0u8;
    for name in headers.keys() {
        if let Some(i) = fixed.iter().position(|f| *f == name) {
            bits |= 1 << i;
        }
    }
    bits
}

/// Removes every `x-tollgate-*` header a client sent: upstreams trust those (the tenant,
/// the API version) only from the gateway, which sets its own after this.
pub fn strip_ours(headers: &mut HeaderMap) {
    while let Some(name) = headers
        .keys()
        .find(|k| k.as_str().starts_with("x-tollgate-"))
        .cloned()
    {
        headers.remove(&name);
    }
}

/// Removes hop-by-hop headers; with `upgrade`, keeps what an upgrade needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let bits = present(headers);
    if bits == 0 && !upgrade {
        return; // the common request: nothing to do
    }
    if bits & 1 != 0 {
        // Headers named by Connection. `close` and `keep-alive` (the usual tokens) name
        // nothing else that could be present; other tokens are looked up.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    for (i, name) in fixed().into_iter().enumerate() {
        let keep = upgrade && *name == header::UPGRADE;
        if bits & (1 << i) != 0 && !keep {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Adds the `X-Forwarded-*` headers.
/// `client` is the client's IP address as a header value.
/// `tls` says whether the client connected over TLS.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    host: Option<HeaderValue>,
    tls: bool,
) {
    // Earlier hops may have sent several header lines; keep them all, in order.
    let prior: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let xff = if prior.is_empty() {
        client.clone()
    } else {
        let joined = format!("{}, {}", prior.join(", "), client.to_str().unwrap_or(""));
        HeaderValue::from_str(&joined).unwrap_or_else(|_| client.clone())
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    let proto = if tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        // Never pass on a client's own claim.
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_the_headers_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upgrade_keeps_upgrade_and_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            Some(HeaderValue::from_static("api.example.com")),
            false,
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);

        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");

        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        add_forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"), None, true);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"
        );
    }
}
