//! What an API version's calls keep beyond the record itself: request and response headers
//! and bodies, off unless the version's content turns them on (`call_log:`), and always
//! redacted before they are stored.
//!
//! Redaction: credential headers (`authorization`, `cookie`, `x-api-key`, ...) and the
//! version's `redact_headers` keep their name with the value `[redacted]`; in a body, the
//! value of any JSON member or form field named in `redact_fields` or the default list
//! (`password`, `secret`, `token`, `api_key`, ...) becomes `"[redacted]"`, and anything that
//! looks like a secret (the prompt guard's patterns: provider keys, tokens, private keys)
//! becomes `[SECRET]`. Bodies are cut at `max_body_bytes` first, so redaction also works on
//! a cut JSON document (it matches text, not a parse).

use regex::Regex;
use serde::Deserialize;
use tollgate_proto::node::v1::CapturedHeader;

/// Headers whose values are never stored.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-auth-token",
    "x-amz-security-token",
];

/// Body fields whose values are never stored.
const SECRET_FIELDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "api_key",
    "apikey",
    "authorization",
];

pub const MAX_BODY_BYTES: u32 = 64 * 1024;
pub const REDACTED: &str = "[redacted]";

/// `call_log:` in an API version's content.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallLogSpec {
    /// Keep request and response headers.
    #[serde(default)]
    pub headers: bool,
    /// Keep request and response bodies, up to `max_body_bytes` each.
    #[serde(default)]
    pub bodies: bool,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u32,
    /// More headers whose values are replaced by `[redacted]`.
    #[serde(default)]
    pub redact_headers: Vec<String>,
    /// More JSON members or form fields whose values are replaced by `"[redacted]"`.
    #[serde(default)]
    pub redact_fields: Vec<String>,
}

fn default_max_body() -> u32 {
    4096
}

impl CallLogSpec {
    /// Checks the spec; errors are (field path below `call_log`, message).
    pub fn check(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_BYTES {
            errors.push((
                "max_body_bytes".into(),
                format!(
                    "must be 1 to {MAX_BODY_BYTES}, found {}",
                    self.max_body_bytes
                ),
            ));
        }
        for (i, h) in self.redact_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                errors.push((
                    format!("redact_headers[{i}]"),
                    format!("{h:?} is not a header name"),
                ));
            }
        }
        for (i, f) in self.redact_fields.iter().enumerate() {
            if f.is_empty() || f.len() > 128 || f.contains(['"', '=', '&']) {
                errors.push((
                    format!("redact_fields[{i}]"),
                    format!("{f:?}: a field name, 1 to 128 bytes, without quotes, = or &"),
                ));
            }
        }
        errors
    }

    /// What the data plane applies; `None` when nothing beyond the record is kept.
    pub fn compile(&self) -> Option<Capture> {
        if !self.headers && !self.bodies {
            return None;
        }
        let mut headers: Vec<String> = CREDENTIAL_HEADERS.iter().map(|h| h.to_string()).collect();
        headers.extend(self.redact_headers.iter().map(|h| h.to_ascii_lowercase()));
        let mut fields: Vec<String> = SECRET_FIELDS.iter().map(|f| regex::escape(f)).collect();
        fields.extend(self.redact_fields.iter().map(|f| regex::escape(f)));
        let names = fields.join("|");
        let json = Regex::new(&format!(
            r#"(?i)("(?:{names})"\s*:\s*)(?:"(?:[^"\\]|\\.)*"?|[^,}}\]\s]+)"#
        ))
        .expect("escaped names compile");
        let form = Regex::new(&format!(r"(?i)(^|[&?])((?:{names})=)[^&]*"))
            .expect("escaped names compile");
        Some(Capture {
            headers: self.headers,
            bodies: self.bodies,
            max_body: self.max_body_bytes as usize,
            redact_headers: headers,
            json,
            form,
        })
    }
}

/// A version's capture settings, compiled.
#[derive(Debug)]
pub struct Capture {
    pub headers: bool,
    pub bodies: bool,
    pub max_body: usize,
    redact_headers: Vec<String>,
    json: Regex,
    form: Regex,
}

impl Capture {
    /// The headers as stored: every one, credentials and listed ones redacted.
    pub fn headers(&self, h: &http::HeaderMap) -> Vec<CapturedHeader> {
        if !self.headers {
            return Vec::new();
        }
        h.iter()
            .map(|(name, value)| CapturedHeader {
                name: name.as_str().to_string(),
                value: if self.redact_headers.iter().any(|r| r == name.as_str()) {
                    REDACTED.into()
                } else {
                    String::from_utf8_lossy(value.as_bytes()).into_owned()
                },
            })
            .collect()
    }

    /// A body as stored: cut at the cap, then redacted. Returns (bytes, cut).
    pub fn body(&self, body: &[u8], total: u64) -> (Vec<u8>, bool) {
        let cut = total > body.len() as u64 || body.len() > self.max_body;
        let body = &body[..body.len().min(self.max_body)];
        let Ok(text) = std::str::from_utf8(body) else {
            // Binary, or UTF-8 cut mid-character: redact what decodes.
            let text = String::from_utf8_lossy(body);
            return (self.redact(&text).into_bytes(), cut);
        };
        (self.redact(text).into_bytes(), cut)
    }

    fn redact(&self, text: &str) -> String {
        let text = self.json.replace_all(text, |c: &regex::Captures| {
            format!("{}\"{REDACTED}\"", &c[1])
        });
        let text = self.form.replace_all(&text, |c: &regex::Captures| {
            format!("{}{}{REDACTED}", &c[1], &c[2])
        });
        let secrets = crate::llm::guard::find(crate::llm::guard::Class::Secret, &text);
        if secrets.is_empty() {
            return text.into_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for r in secrets {
            if r.start < at {
                continue;
            }
            out.push_str(&text[at..r.start]);
            out.push_str("[SECRET]");
            at = r.end;
        }
        out.push_str(&text[at..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(fields: &[&str]) -> Capture {
        CallLogSpec {
            headers: true,
            bodies: true,
            max_body_bytes: 64,
            redact_headers: vec!["X-Customer".into()],
            redact_fields: fields.iter().map(|f| f.to_string()).collect(),
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn credentials_and_listed_headers_are_redacted() {
        let c = capture(&[]);
        let mut h = http::HeaderMap::new();
        h.insert(
            "authorization",
            "Bearer tgk_abc_0123456789abcdef".parse().unwrap(),
        );
        h.insert("x-customer", "acme".parse().unwrap());
        h.insert("accept", "application/json".parse().unwrap());
        let got = c.headers(&h);
        let value = |n: &str| got.iter().find(|h| h.name == n).unwrap().value.clone();
        assert_eq!(value("authorization"), REDACTED);
        assert_eq!(value("x-customer"), REDACTED);
        assert_eq!(value("accept"), "application/json");
    }

    #[test]
    fn body_fields_secrets_and_the_cap() {
        let c = capture(&["ssn"]);
        let (b, cut) = c.body(br#"{"user":"ann","password":"hunter2","ssn":123}"#, 45);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            r#"{"user":"ann","password":"[redacted]","ssn":"[redacted]"}"#
        );
        assert!(!cut);
        // Cut mid-value: the open string is still redacted.
        let long =
            br#"{"a":"0123456789012345678901234567890123456789012","token":"abcdefghijklmnop"}"#;
        let (b, cut) = c.body(long, long.len() as u64);
        let b = String::from_utf8(b).unwrap();
        assert!(cut);
        assert!(!b.contains("abcd"), "{b}");
        let (b, _) = c.body(b"user=ann&password=x&n=1", 23);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "user=ann&password=[redacted]&n=1"
        );
        let (b, _) = c.body(b"key sk-proj-abcdefghijklmnopqrstuvwx", 36);
        assert_eq!(String::from_utf8(b).unwrap(), "key [SECRET]");
    }

    #[test]
    fn nothing_kept_unless_asked_and_bad_specs_are_named() {
        let off = CallLogSpec {
            headers: false,
            bodies: false,
            max_body_bytes: 4096,
            redact_headers: vec![],
            redact_fields: vec![],
        };
        assert!(off.compile().is_none());
        let bad = CallLogSpec {
            max_body_bytes: 1 << 20,
            redact_headers: vec!["bad header".into()],
            redact_fields: vec!["a=b".into()],
            ..off
        };
        let errors: Vec<String> = bad.check().into_iter().map(|e| e.0).collect();
        assert_eq!(
            errors,
            ["max_body_bytes", "redact_headers[0]", "redact_fields[0]"]
        );
    }
}
