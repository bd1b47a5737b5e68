//! The response cache (docs/llm.md, "Response cache"): an API version with a
//! `response_cache` keeps its answers on each node, in memory, for its `ttl`, within the
//! node's `--llm-cache-bytes`. The key is exact: the tenant, the version, the endpoint,
//! whether the answer streams, and the request as parsed and written back in a canonical
//! order (so key order and spacing do not matter) without the fields that do not change the
//! answer (`user`, `metadata`, `stream_options`). Only deterministic requests are cached
//! (temperature 0) unless the version opts in for any temperature; a caller's
//! `Cache-Control: no-cache` or `no-store` bypasses it. A hit is answered on the node and
//! never reaches a provider; it is metered as a cached request at its own price.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The largest answer one entry keeps (a larger one is not cached).
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// A version's `response_cache`, compiled.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub ttl: Duration,
    pub any_temperature: bool,
}

/// One cached answer: the bytes the caller got, as it got them.
#[derive(Debug)]
pub struct Entry {
    pub body: Bytes,
    pub content_type: HeaderValue,
    ttl: Duration,
}

struct PerEntry;

impl moka::Expiry<[u8; 32], Arc<Entry>> for PerEntry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A node's cache of LLM answers, bounded in bytes.
pub struct ResponseCache {
    entries: moka::sync::Cache<[u8; 32], Arc<Entry>>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl ResponseCache {
    pub fn new(max_bytes: u64) -> ResponseCache {
        ResponseCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k, v: &Arc<Entry>| (v.body.len() + 128).try_into().unwrap_or(u32::MAX))
                .expire_after(PerEntry)
                .build(),
        }
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<Entry>> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: [u8; 32], body: Bytes, content_type: HeaderValue, ttl: Duration) {
        if body.len() <= MAX_ENTRY_BYTES {
            self.entries.insert(
                key,
                Arc::new(Entry {
                    body,
                    content_type,
                    ttl,
                }),
            );
        }
    }
}

/// Whether a request may be answered from the cache: a version that caches, a caller that
/// did not say `no-cache`/`no-store`, and a deterministic request (temperature 0) unless
/// the version caches any temperature.
pub fn cacheable(settings: &Settings, doc: &Value, headers: &http::HeaderMap) -> bool {
    let bypass = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',').any(|d| {
                matches!(
                    d.trim().to_ascii_lowercase().as_str(),
                    "no-cache" | "no-store"
                )
            })
        });
    if bypass {
        return false;
    }
    // More than one choice is asked for variety.
    if doc.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return false;
    }
    settings.any_temperature || doc.get("temperature").and_then(Value::as_f64) == Some(0.0)
}

/// The exact key of a request: tenant, version, endpoint, stream or not, and the request in
/// canonical form without `user`, `metadata` and `stream_options`.
pub fn key(tenant: &str, version: &str, endpoint: &str, stream: bool, doc: &Value) -> [u8; 32] {
    let mut doc = doc.clone();
    if let Some(o) = doc.as_object_mut() {
        for k in ["user", "metadata", "stream_options", "stream"] {
            o.remove(k);
        }
    }
    let mut h = Sha256::new();
    for part in [
        tenant,
        version,
        endpoint,
        if stream { "stream" } else { "whole" },
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    // serde_json's maps are ordered by key: the same request always writes the same text.
    h.update(doc.to_string().as_bytes());
    h.finalize().into()
}

/// A replayed stream's bytes without the cost the answer that filled the cache carried
/// (`"tollgate":{"cost":..,"currency":..},`): a hit costs what a cached request costs.
pub fn without_cost(body: &[u8]) -> Bytes {
    const MARK: &[u8] = b"\"tollgate\":{\"cost\":";
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.windows(MARK.len()).position(|w| w == MARK) {
        out.extend_from_slice(&rest[..at]);
        let after = &rest[at..];
        // The object ends at the first `}` and is followed by a comma.
        match after.iter().position(|b| *b == b'}') {
            Some(end) if after.get(end + 1) == Some(&b',') => rest = &after[end + 2..],
            _ => {
                out.extend_from_slice(after);
                rest = &[];
            }
        }
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_key_is_exact_and_ignores_order_and_who_the_end_user_is() {
        let a = json!({"model": "gpt", "temperature": 0, "messages": [{"role": "user", "content": "hi"}], "user": "u1"});
        let b: Value = serde_json::from_str(
            r#"{"messages":[{"content":"hi","role":"user"}],"user":"u2","temperature":0,"model":"gpt"}"#,
        )
        .unwrap();
        assert_eq!(
            key("acme", "llm@1", "chat", false, &a),
            key("acme", "llm@1", "chat", false, &b)
        );
        let c = json!({"model": "gpt", "temperature": 0, "messages": [{"role": "user", "content": "hi!"}]});
        assert_ne!(
            key("acme", "llm@1", "chat", false, &a),
            key("acme", "llm@1", "chat", false, &c)
        );
        // Another tenant, version, endpoint or mode is another entry.
        let k = key("acme", "llm@1", "chat", false, &a);
        assert_ne!(k, key("globex", "llm@1", "chat", false, &a));
        assert_ne!(k, key("acme", "llm@2", "chat", false, &a));
        assert_ne!(k, key("acme", "llm@1", "messages", false, &a));
        assert_ne!(k, key("acme", "llm@1", "chat", true, &a));
    }

    #[test]
    fn only_deterministic_requests_are_cacheable_unless_opted_in() {
        let s = Settings {
            ttl: Duration::from_secs(60),
            any_temperature: false,
        };
        let h = http::HeaderMap::new();
        assert!(cacheable(&s, &json!({"temperature": 0}), &h));
        assert!(!cacheable(&s, &json!({"temperature": 0.7}), &h));
        assert!(
            !cacheable(&s, &json!({}), &h),
            "the provider's default temperature is not 0"
        );
        assert!(!cacheable(&s, &json!({"temperature": 0, "n": 2}), &h));
        let any = Settings {
            any_temperature: true,
            ..s
        };
        assert!(cacheable(&any, &json!({"temperature": 1}), &h));
        let mut no = http::HeaderMap::new();
        no.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, no-cache"),
        );
        assert!(!cacheable(&any, &json!({"temperature": 0}), &no));
    }

    #[test]
    fn entries_expire_and_the_cache_stays_within_its_bytes() {
        let c = ResponseCache::new(10_000);
        let ct = HeaderValue::from_static("application/json");
        c.insert(
            [1; 32],
            Bytes::from_static(b"one"),
            ct.clone(),
            Duration::from_millis(50),
        );
        assert_eq!(&c.get(&[1; 32]).unwrap().body[..], b"one");
        std::thread::sleep(Duration::from_millis(120));
        assert!(c.get(&[1; 32]).is_none(), "expired");
        for i in 0..100u8 {
            c.insert(
                [i; 32],
                Bytes::from(vec![0u8; 500]),
                ct.clone(),
                Duration::from_secs(60),
            );
        }
        c.entries.run_pending_tasks();
        assert!(
            c.entries.weighted_size() <= 10_000,
            "{}",
            c.entries.weighted_size()
        );
        assert!(c.entries.entry_count() < 100);
    }

    #[test]
    fn a_replayed_stream_loses_the_cost_of_the_answer_that_filled_it() {
        let body = b"data: {\"tollgate\":{\"cost\":\"0.01\",\"currency\":\"USD\"},\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert_eq!(
            &without_cost(body)[..],
            b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n"
        );
    }
}
