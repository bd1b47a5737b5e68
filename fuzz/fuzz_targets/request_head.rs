//! The proxy's request-head handling: bytes parsed as an HTTP/1.1 head the way the server
//! parses them (httparse, what hyper uses), then the checks every request passes before
//! it is routed (size, dot segments, Host).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let Some(Ok(uri)) = req.path.map(|p| p.parse::<http::Uri>()) else {
        return;
    };
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        map.append(name, value);
    }
    let version = if req.version == Some(0) {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    };
    if let Ok(host) = tollgate_node::proxy::phases::check_head(&uri, &map, version, 32 * 1024) {
        // What is routed on is a host name or address, without a port.
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b)),
            "{host:?}"
        );
    }
});
