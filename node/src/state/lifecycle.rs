//! API versions and their lifecycle (docs/architecture.md, decision 9), as the replicated
//! state holds them: pure, deterministic rules that the state machine applies, so two
//! control-plane replicas racing each other cannot break them.
//!
//! ```text
//!   draft ──publish──► published ──deprecate──► deprecated ──retire──► retired
//!     │ (editable)       (immutable)             (sunset, successor)     (410)
//!     └──discard──► (gone)
//! ```
//!
//! Traffic is split by weight between versions that can take traffic (published or
//! deprecated). `promote` sends all traffic to one version; `rollback` restores the split
//! before the last change, in one step. Every refusal says what is allowed instead.
//!
//! Each API is mounted on the data plane at its hosts and base path
//! ([`ApiSettings`]); `crate::state::snapshot` compiles what is published here into
//! routes.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use semver::Version;
use tollgate_proto::state::v1 as pb;

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Editable; takes no traffic.
    Draft,
    /// Immutable; may take traffic.
    Published,
    /// Still takes traffic; answers carry `Deprecation`, `Sunset` and a successor link.
    Deprecated,
    /// Takes no traffic; answers 410.
    Retired,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Draft => "draft",
            Stage::Published => "published",
            Stage::Deprecated => "deprecated",
            Stage::Retired => "retired",
        }
    }

    /// The transitions this stage allows, by name.
    pub fn allowed(self) -> &'static [&'static str] {
        match self {
            Stage::Draft => &["edit", "publish", "discard"],
            Stage::Published => &["deprecate"],
            Stage::Deprecated => &["retire"],
            Stage::Retired => &[],
        }
    }

    /// Whether a version at this stage may be in a traffic split.
    pub fn takes_traffic(self) -> bool {
        matches!(self, Stage::Published | Stage::Deprecated)
    }
}

/// A request to move a version through its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Replace a draft's content.
    Edit {
        content: String,
    },
    /// `compiled`: the content as checked and compiled by the proposing node, from the
    /// draft whose [`content_digest`] is `digest`.
    Publish {
        compiled: String,
        digest: String,
    },
    /// Sunset date (RFC 3339) and, optionally, the version that replaces it.
    Deprecate {
        sunset: Option<String>,
        successor: Option<String>,
    },
    Retire,
    /// Drop a draft.
    Discard,
}

impl Transition {
    pub fn name(&self) -> &'static str {
        match self {
            Transition::Edit { .. } => "edit",
            Transition::Publish { .. } => "publish",
            Transition::Deprecate { .. } => "deprecate",
            Transition::Retire => "retire",
            Transition::Discard => "discard",
        }
    }
}

/// Why a change was refused; the kind says which gRPC status it becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request itself is malformed (INVALID_ARGUMENT).
    Invalid(String),
    /// It names something that does not exist (NOT_FOUND).
    NotFound(String),
    /// It is not allowed in the current state (FAILED_PRECONDITION).
    Precondition(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Invalid(m) | Refusal::NotFound(m) | Refusal::Precondition(m) => f.write_str(m),
        }
    }
}

/// One version of an API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiVersion {
    pub version: Version,
    pub stage: Stage,
    /// The version's routes, upstreams and policies (a spec document).
    pub content: String,
    /// Set when deprecated.
    pub sunset: Option<DateTime<Utc>>,
    pub successor: Option<Version>,
    /// What the data plane serves (see [`Transition::Publish`]); empty while a draft.
    pub compiled: Arc<str>,
    /// Ms since the Unix epoch; 0 until it happens.
    pub published_at_ms: u64,
    pub deprecated_at_ms: u64,
}

/// How callers of an API are let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// An API key of a tenant that owns or subscribes to the API.
    #[default]
    Key,
    /// A JWT from the API's issuer, registered to the API's owner, which is charged.
    Jwt,
    /// A client certificate registered as a key of a tenant that owns or subscribes to the
    /// API, presented in the TLS handshake.
    Mtls,
    /// Anyone.
    None,
}

impl AuthMode {
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Key => "key",
            AuthMode::Jwt => "jwt",
            AuthMode::Mtls => "mtls",
            AuthMode::None => "none",
        }
    }
}

/// JWT validation settings (static key set).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwtSettings {
    pub issuer: String,
    pub audience: String,
    pub jwks: String,
    pub tenant_claim: String,
}

/// Where an API is mounted and who may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// Empty: any host.
    pub hosts: Vec<String>,
    /// `/` or `/a/b` (no trailing slash).
    pub base_path: String,
    pub auth: AuthMode,
    pub sticky: bool,
    pub jwt: Option<JwtSettings>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            hosts: Vec::new(),
            base_path: "/".into(),
            auth: AuthMode::Key,
            sticky: false,
            jwt: None,
        }
    }
}

impl ApiSettings {
    /// Checks settings as a client sent them.
    pub fn from_proto(p: Option<&pb::ApiSettings>) -> Result<ApiSettings, Refusal> {
        let Some(p) = p else {
            return Ok(ApiSettings::default());
        };
        let mut hosts = Vec::with_capacity(p.hosts.len());
        for h in &p.hosts {
            let h = h.to_ascii_lowercase();
            crate::state::spec::check_host(&h).map_err(Refusal::Invalid)?;
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        hosts.sort();
        if hosts.len() > 64 {
            return Err(Refusal::Invalid("an API has at most 64 hosts".into()));
        }
        let base_path = normalize_base_path(&p.base_path)?;
        let auth = match p.auth.as_str() {
            "" | "key" => AuthMode::Key,
            "jwt" => AuthMode::Jwt,
            "mtls" => AuthMode::Mtls,
            "none" => AuthMode::None,
            other => {
                return Err(Refusal::Invalid(format!(
                    "auth {other:?} is not known; use key, jwt, mtls or none"
                )));
            }
        };
        let jwt = match (&p.jwt, auth) {
            (Some(j), AuthMode::Jwt) => {
                if j.issuer.is_empty() || j.audience.is_empty() {
                    return Err(Refusal::Invalid(
                        "jwt needs an issuer and an audience".into(),
                    ));
                }
                crate::auth::jwt::parse_jwks(&j.jwks).map_err(Refusal::Invalid)?;
                Some(JwtSettings {
                    issuer: j.issuer.clone(),
                    audience: j.audience.clone(),
                    jwks: j.jwks.clone(),
                    tenant_claim: if j.tenant_claim.is_empty() {
                        "tenant".into()
                    } else {
                        j.tenant_claim.clone()
                    },
                })
            }
            (None, AuthMode::Jwt) => {
                return Err(Refusal::Invalid(
                    "auth jwt needs jwt settings: issuer, audience and jwks".into(),
                ));
            }
            (Some(_), _) => {
                return Err(Refusal::Invalid(
                    "jwt settings are only used with auth: jwt; remove them or set auth".into(),
                ));
            }
            (None, _) => None,
        };
        Ok(ApiSettings {
            hosts,
            base_path,
            auth,
            sticky: p.sticky,
            jwt,
        })
    }

    pub fn to_proto(&self) -> pb::ApiSettings {
        pb::ApiSettings {
            hosts: self.hosts.clone(),
            base_path: self.base_path.clone(),
            auth: self.auth.name().into(),
            sticky: self.sticky,
            jwt: self.jwt.as_ref().map(|j| pb::JwtSettings {
                issuer: j.issuer.clone(),
                audience: j.audience.clone(),
                jwks: j.jwks.clone(),
                tenant_claim: j.tenant_claim.clone(),
            }),
        }
    }

    /// Whether two APIs could answer the same request: their hosts overlap (any host,
    /// a common name, or a wildcard covering the other) and one base path is the other or
    /// lies below it. Refused, so one tenant cannot mount an API in front of another's.
    fn collides(&self, other: &ApiSettings) -> bool {
        let hosts_overlap = self.hosts.is_empty()
            || other.hosts.is_empty()
            || self
                .hosts
                .iter()
                .any(|a| other.hosts.iter().any(|b| host_overlap(a, b)));
        hosts_overlap && paths_nest(&self.base_path, &other.base_path)
    }
}

/// Whether two host patterns can match one name (`*.example.com` covers
/// `shop.example.com` and `*.shop.example.com`).
fn host_overlap(a: &str, b: &str) -> bool {
    let covers = |pattern: &str, name: &str| {
        pattern
            .strip_prefix('*')
            .is_some_and(|suffix| name.ends_with(suffix))
    };
    a == b || covers(a, b) || covers(b, a)
}

/// Whether one base path equals the other or lies below it, segment-wise.
fn paths_nest(a: &str, b: &str) -> bool {
    let below = |short: &str, long: &str| {
        short == "/"
            || long == short
            || long
                .strip_prefix(short)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    below(a, b) || below(b, a)
}

/// `""` and `/` are the root; otherwise `/seg/seg` of URL-safe characters, with no segment
/// that looks like a version prefix (`v2`), which selects versions below the base path.
fn normalize_base_path(text: &str) -> Result<String, Refusal> {
    let trimmed = text.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".into());
    }
    let bad = || {
        Refusal::Invalid(format!(
            "base path {text:?} must look like /orders or /shop/orders: segments of letters, digits, '-', '_' and '.'"
        ))
    };
    if !trimmed.starts_with('/') || trimmed.len() > 256 {
        return Err(bad());
    }
    for seg in trimmed[1..].split('/') {
        if seg.is_empty()
            || seg == "."
            || seg == ".."
            || !seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad());
        }
        if version_segment(seg).is_some() {
            return Err(Refusal::Invalid(format!(
                "base path {text:?} has a segment {seg:?} that reads as a version; versions are chosen below the base path (/orders/v2)"
            )));
        }
    }
    Ok(trimmed.to_string())
}

/// A digest of a version's content (FNV-1a 64, hex): detects an edit between a publish's
/// check and its apply; not a security boundary.
pub fn content_digest(content: &str) -> String {
    crate::hash::fnv1a_hex(content.as_bytes())
}

/// Highest weight of one version in a split (weights are relative).
pub const MAX_WEIGHT: u32 = 1_000_000;

/// `v2` -> 2: a path segment that selects a major version.
pub fn version_segment(seg: &str) -> Option<u64> {
    let digits = seg.strip_prefix('v')?;
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Traffic weights by version; weights are relative (90/10 and 9/1 are the same split).
pub type Split = BTreeMap<Version, u32>;

/// An API: its versions and how traffic is split between them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Api {
    pub name: String,
    pub tenant: String,
    pub settings: ApiSettings,
    pub versions: BTreeMap<Version, ApiVersion>,
    pub split: Split,
    /// Earlier splits, newest last, for rollback (bounded).
    pub previous_splits: Vec<Split>,
}

/// Splits kept for rollback.
pub const SPLIT_HISTORY: usize = 20;

/// Parses a version name (`2.1.0`; a leading `v` is accepted).
pub fn parse_version(text: &str) -> Result<Version, Refusal> {
    let trimmed = text.strip_prefix('v').unwrap_or(text);
    Version::parse(trimmed).map_err(|e| {
        Refusal::Invalid(format!(
            "version {text:?} is not semantic versioning ({e}); write it like 2.1.0"
        ))
    })
}

impl Api {
    pub fn new(name: &str, tenant: &str) -> Api {
        Api {
            name: name.to_string(),
            tenant: tenant.to_string(),
            ..Api::default()
        }
    }

    /// The API as JSON for the audit log: settings, versions (content by size and digest,
    /// not text) and split.
    pub fn audit_json(&self) -> String {
        let versions: Vec<serde_json::Value> = self
            .versions
            .values()
            .map(|v| {
                serde_json::json!({
                    "version": v.version.to_string(),
                    "stage": v.stage.name(),
                    "content_bytes": v.content.len(),
                    "sunset": v.sunset.map(|s| s.to_rfc3339()),
                    "successor": v.successor.as_ref().map(|s| s.to_string()),
                })
            })
            .collect();
        let split: BTreeMap<String, u32> = self
            .split
            .iter()
            .map(|(v, w)| (v.to_string(), *w))
            .collect();
        serde_json::json!({
            "name": self.name,
            "tenant": self.tenant,
            "hosts": self.settings.hosts,
            "base_path": self.settings.base_path,
            "auth": self.settings.auth.name(),
            "sticky": self.settings.sticky,
            "versions": versions,
            "split": split,
        })
        .to_string()
    }

    /// Adds a new draft version.
    pub fn create_version(&mut self, version: &str, content: String) -> Result<(), Refusal> {
        let v = parse_version(version)?;
        if self.versions.contains_key(&v) {
            return Err(Refusal::Precondition(format!(
                "API {} already has version {v}; a fix to a published version is a new version",
                self.name
            )));
        }
        self.versions.insert(
            v.clone(),
            ApiVersion {
                version: v,
                stage: Stage::Draft,
                content,
                sunset: None,
                successor: None,
                compiled: Arc::from(""),
                published_at_ms: 0,
                deprecated_at_ms: 0,
            },
        );
        Ok(())
    }

    fn version_mut(&mut self, version: &str) -> Result<&mut ApiVersion, Refusal> {
        let v = parse_version(version)?;
        let known: Vec<String> = self.versions.keys().map(|k| k.to_string()).collect();
        let name = self.name.clone();
        self.versions.get_mut(&v).ok_or_else(|| {
            Refusal::NotFound(format!(
                "API {name} has no version {v}; it has [{}]",
                known.join(", ")
            ))
        })
    }

    /// Moves a version through its lifecycle, or says which moves are allowed.
    pub fn transition(&mut self, version: &str, t: Transition, at_ms: u64) -> Result<(), Refusal> {
        let api = self.name.clone();
        let in_split = {
            let v = parse_version(version)?;
            self.split.contains_key(&v)
        };
        let successor = match &t {
            Transition::Deprecate {
                successor: Some(s), ..
            } => {
                let s = parse_version(s)?;
                match self.versions.get(&s) {
                    Some(sv) if sv.stage.takes_traffic() => Some(s),
                    Some(sv) => {
                        return Err(Refusal::Precondition(format!(
                            "successor {s} is {}; a successor must be published",
                            sv.stage.name()
                        )));
                    }
                    None => {
                        return Err(Refusal::NotFound(format!(
                            "successor {s} is not a version of API {api}"
                        )));
                    }
                }
            }
            _ => None,
        };
        let v = self.version_mut(version)?;
        let allowed = v.stage.allowed();
        if !allowed.contains(&t.name()) {
            let options = if allowed.is_empty() {
                "nothing: a retired version is final".to_string()
            } else {
                allowed.join(", ")
            };
            return Err(Refusal::Precondition(format!(
                "version {} of API {api} is {}: it cannot {}; allowed: {options}",
                v.version,
                v.stage.name(),
                t.name()
            )));
        }
        match t {
            Transition::Edit { content } => v.content = content,
            Transition::Publish { compiled, digest } => {
                if compiled.is_empty() || digest != content_digest(&v.content) {
                    return Err(Refusal::Precondition(format!(
                        "version {} of API {api} changed while it was being published; publish it again",
                        v.version
                    )));
                }
                v.stage = Stage::Published;
                v.compiled = Arc::from(compiled);
                v.published_at_ms = at_ms;
            }
            Transition::Deprecate { sunset, .. } => {
                let sunset = sunset
                    .map(|s| {
                        DateTime::parse_from_rfc3339(&s)
                            .map(|d| d.with_timezone(&Utc))
                            .map_err(|e| {
                                Refusal::Invalid(format!(
                                    "sunset {s:?} is not an RFC 3339 time ({e}); write it like 2027-06-30T00:00:00Z"
                                ))
                            })
                    })
                    .transpose()?;
                if successor.as_ref() == Some(&v.version) {
                    return Err(Refusal::Invalid(format!(
                        "version {} cannot be its own successor",
                        v.version
                    )));
                }
                v.stage = Stage::Deprecated;
                v.sunset = sunset;
                v.successor = successor;
                v.deprecated_at_ms = at_ms;
            }
            Transition::Retire => {
                if in_split {
                    return Err(Refusal::Precondition(format!(
                        "version {} of API {api} still takes traffic; move its weight to another version (split or promote) before retiring it",
                        v.version
                    )));
                }
                v.stage = Stage::Retired;
            }
            Transition::Discard => {
                let key = v.version.clone();
                self.versions.remove(&key);
            }
        }
        Ok(())
    }

    /// Sets the traffic split. Every version named must take traffic; weights must not all
    /// be zero.
    pub fn set_split(&mut self, weights: &[(&str, u32)]) -> Result<(), Refusal> {
        let mut split = Split::new();
        for (name, weight) in weights {
            let v = parse_version(name)?;
            let Some(version) = self.versions.get(&v) else {
                return Err(Refusal::NotFound(format!(
                    "API {} has no version {v}",
                    self.name
                )));
            };
            if !version.stage.takes_traffic() {
                return Err(Refusal::Precondition(format!(
                    "version {v} is {}; only published or deprecated versions take traffic",
                    version.stage.name()
                )));
            }
            if *weight > MAX_WEIGHT {
                return Err(Refusal::Invalid(format!(
                    "weight {weight} of version {v} is over {MAX_WEIGHT}; weights are relative, 90 and 10 make a 90/10 split"
                )));
            }
            if split.insert(v.clone(), *weight).is_some() {
                return Err(Refusal::Invalid(format!(
                    "version {v} is named twice in the split"
                )));
            }
        }
        split.retain(|_, w| *w > 0);
        if split.is_empty() {
            return Err(Refusal::Invalid(
                "a split needs at least one version with a weight above 0".into(),
            ));
        }
        if split != self.split {
            let old = std::mem::replace(&mut self.split, split);
            self.previous_splits.push(old);
            if self.previous_splits.len() > SPLIT_HISTORY {
                self.previous_splits.remove(0);
            }
        }
        Ok(())
    }

    /// Sends all traffic to one version.
    pub fn promote(&mut self, version: &str) -> Result<(), Refusal> {
        self.set_split(&[(version, 100)])
    }

    /// Restores the split before the last change.
    pub fn rollback(&mut self) -> Result<(), Refusal> {
        let Some(previous) = self.previous_splits.last().cloned() else {
            return Err(Refusal::Precondition(format!(
                "API {} has no earlier split to roll back to",
                self.name
            )));
        };
        if let Some((v, stage)) = previous.keys().find_map(|v| {
            self.versions
                .get(v)
                .map(|x| x.stage)
                .filter(|s| !s.takes_traffic())
                .map(|s| (v, s))
        }) {
            return Err(Refusal::Precondition(format!(
                "the earlier split sends traffic to version {v}, which is now {}; set a new split instead",
                stage.name()
            )));
        }
        self.previous_splits.pop();
        self.split = previous;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

// === the protobuf form (commands and snapshots) ===

fn split_to_pb(split: &Split) -> Vec<pb::SplitEntry> {
    split
        .iter()
        .map(|(v, w)| pb::SplitEntry {
            version: v.to_string(),
            weight: *w,
        })
        .collect()
}

fn split_from_pb(entries: &[pb::SplitEntry]) -> Split {
    entries
        .iter()
        .filter_map(|e| Version::parse(&e.version).ok().map(|v| (v, e.weight)))
        .collect()
}

fn stage_from_name(name: &str) -> Stage {
    match name {
        "published" => Stage::Published,
        "deprecated" => Stage::Deprecated,
        "retired" => Stage::Retired,
        _ => Stage::Draft,
    }
}

impl Api {
    pub fn to_proto(&self) -> pb::ApiState {
        pb::ApiState {
            name: self.name.clone(),
            tenant: self.tenant.clone(),
            settings: Some(self.settings.to_proto()),
            versions: self
                .versions
                .values()
                .map(|v| pb::VersionState {
                    version: v.version.to_string(),
                    stage: v.stage.name().into(),
                    content: v.content.clone(),
                    sunset: v.sunset.map(|s| s.to_rfc3339()).unwrap_or_default(),
                    successor: v
                        .successor
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    compiled: v.compiled.to_string(),
                    published_at_ms: v.published_at_ms,
                    deprecated_at_ms: v.deprecated_at_ms,
                })
                .collect(),
            split: split_to_pb(&self.split),
            previous_splits: self
                .previous_splits
                .iter()
                .map(|s| pb::Split {
                    weights: split_to_pb(s),
                })
                .collect(),
        }
    }

    /// Reads an API back from a snapshot. Entries this node cannot read (written by a
    /// newer node) are left out rather than failing the whole state.
    pub fn from_proto(p: &pb::ApiState) -> Api {
        let versions = p
            .versions
            .iter()
            .filter_map(|v| {
                let version = Version::parse(&v.version).ok()?;
                Some((
                    version.clone(),
                    ApiVersion {
                        version,
                        stage: stage_from_name(&v.stage),
                        content: v.content.clone(),
                        sunset: DateTime::parse_from_rfc3339(&v.sunset)
                            .ok()
                            .map(|d| d.with_timezone(&Utc)),
                        successor: Version::parse(&v.successor).ok(),
                        compiled: Arc::from(v.compiled.as_str()),
                        published_at_ms: v.published_at_ms,
                        deprecated_at_ms: v.deprecated_at_ms,
                    },
                ))
            })
            .collect();
        Api {
            name: p.name.clone(),
            tenant: p.tenant.clone(),
            // Stored settings were checked when written; a newer node's that this one
            // cannot read fall back to the defaults.
            settings: ApiSettings::from_proto(p.settings.as_ref()).unwrap_or_default(),
            versions,
            split: split_from_pb(&p.split),
            previous_splits: p
                .previous_splits
                .iter()
                .map(|s| split_from_pb(&s.weights))
                .collect(),
        }
    }
}

/// Longest API, tenant or version name.
pub const MAX_NAME: usize = 63;

/// Checks an API or tenant name: 1–63 of `a-z 0-9 - _`, starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Refusal::Invalid(format!(
            "{what} name {name:?} must be 1-{MAX_NAME} characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )))
    }
}

/// Checks a secret's name: a name as [`check_name`] takes it, or `<tenant>.<name>` for a
/// secret the tenant's API versions may use (docs/llm.md, "Provider keys").
pub fn check_secret_name(name: &str) -> Result<(), Refusal> {
    match name.split_once('.') {
        Some((tenant, rest)) => {
            check_name("tenant", tenant)?;
            check_name("secret", rest)
        }
        None => check_name("secret", name),
    }
}

/// Applies one API command to the set of APIs. Deterministic; a refusal changes nothing.
/// Returns the names of what changed (for the history).
pub fn apply_command(
    apis: &mut BTreeMap<String, Api>,
    cmd: &pb::ApiCommand,
    at_ms: u64,
    tenant_exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, Refusal> {
    use pb::api_command::Op;
    check_name("API", &cmd.api)?;
    let Some(op) = &cmd.op else {
        return Err(Refusal::Invalid(
            "the API command has no operation (a newer node's command?)".into(),
        ));
    };
    if let Op::CreateApi(create) = op {
        check_name("tenant", &create.tenant)?;
        let settings = ApiSettings::from_proto(create.settings.as_ref())?;
        if apis.contains_key(&cmd.api) {
            return Err(Refusal::Precondition(format!(
                "API {} already exists",
                cmd.api
            )));
        }
        if !tenant_exists(&create.tenant) {
            return Err(Refusal::NotFound(format!(
                "there is no tenant {}; create it first",
                create.tenant
            )));
        }
        check_mount(apis, &cmd.api, &settings)?;
        let mut api = Api::new(&cmd.api, &create.tenant);
        api.settings = settings;
        apis.insert(cmd.api.clone(), api);
        return Ok(vec![format!("api/{}", cmd.api)]);
    }
    let Some(existing) = apis.get(&cmd.api) else {
        return Err(Refusal::NotFound(format!("there is no API {}", cmd.api)));
    };
    // Work on a copy: a refusal leaves the state exactly as it was.
    let mut api = existing.clone();
    let changed = match op {
        Op::CreateApi(_) => unreachable!("handled above"),
        Op::UpdateApi(u) => {
            let settings = ApiSettings::from_proto(u.settings.as_ref())?;
            check_mount(apis, &cmd.api, &settings)?;
            api.settings = settings;
            format!("api/{}", cmd.api)
        }
        Op::CreateVersion(c) => {
            api.create_version(&c.version, c.content.clone())?;
            format!("api/{}@{}", cmd.api, parse_version(&c.version)?)
        }
        Op::Transition(t) => {
            use pb::version_transition::To;
            let transition = match &t.to {
                Some(To::Edit(content)) => Transition::Edit {
                    content: content.clone(),
                },
                Some(To::Publish(p)) => Transition::Publish {
                    compiled: p.compiled.clone(),
                    digest: p.content_digest.clone(),
                },
                Some(To::Deprecate(d)) => Transition::Deprecate {
                    sunset: (!d.sunset.is_empty()).then(|| d.sunset.clone()),
                    successor: (!d.successor.is_empty()).then(|| d.successor.clone()),
                },
                Some(To::Retire(_)) => Transition::Retire,
                Some(To::Discard(_)) => Transition::Discard,
                None => {
                    return Err(Refusal::Invalid(format!(
                        "say what to do with version {}: edit, publish, deprecate, retire or discard",
                        t.version
                    )));
                }
            };
            api.transition(&t.version, transition, at_ms)?;
            format!("api/{}@{}", cmd.api, parse_version(&t.version)?)
        }
        Op::SetSplit(s) => {
            let weights: Vec<(&str, u32)> = s
                .weights
                .iter()
                .map(|e| (e.version.as_str(), e.weight))
                .collect();
            api.set_split(&weights)?;
            format!("api/{}", cmd.api)
        }
        Op::Promote(p) => {
            api.promote(&p.version)?;
            format!("api/{}", cmd.api)
        }
        Op::Rollback(_) => {
            api.rollback()?;
            format!("api/{}", cmd.api)
        }
    };
    if &api == existing {
        return Ok(Vec::new());
    }
    // Only what adds content is checked: discarding and retiring always go through.
    use pb::version_transition::To as Grow;
    let grows = match op {
        Op::CreateVersion(_) => true,
        Op::Transition(t) => matches!(t.to, Some(Grow::Edit(_) | Grow::Publish(_))),
        _ => false,
    };
    if grows {
        check_caps(apis, &api)?;
    }
    apis.insert(cmd.api.clone(), api);
    Ok(vec![changed])
}

/// Most versions one API keeps (retired ones count: discard drafts, the rest stay).
pub const MAX_VERSIONS_PER_API: usize = 200;
/// Most bytes of version content (and its compiled form) one API holds: every listing of
/// it fits in one gRPC message.
pub const MAX_API_BYTES: usize = 3 << 20;
/// Most drafts a tenant has at once, across its APIs.
pub const MAX_DRAFTS_PER_TENANT: usize = 20;
/// Most bytes of version content a tenant holds, across its APIs.
pub const MAX_TENANT_BYTES: usize = 16 << 20;

fn api_bytes(api: &Api) -> usize {
    api.versions
        .values()
        .map(|v| v.content.len() + v.compiled.len())
        .sum()
}

fn drafts(api: &Api) -> usize {
    api.versions
        .values()
        .filter(|v| v.stage == Stage::Draft)
        .count()
}

/// Refuses a change that would take an API or its tenant past the caps: one tenant's
/// versions cannot crowd out the cluster's state or its listings.
fn check_caps(apis: &BTreeMap<String, Api>, api: &Api) -> Result<(), Refusal> {
    if api.versions.len() > MAX_VERSIONS_PER_API {
        return Err(Refusal::Precondition(format!(
            "API {} would have more than {MAX_VERSIONS_PER_API} versions; discard drafts you \
             do not need",
            api.name
        )));
    }
    let bytes = api_bytes(api);
    if bytes > MAX_API_BYTES {
        return Err(Refusal::Precondition(format!(
            "API {}'s versions would hold {bytes} bytes, over the {MAX_API_BYTES} an API may \
             hold; discard drafts you do not need, or make the content smaller",
            api.name
        )));
    }
    let others = apis
        .values()
        .filter(|a| a.tenant == api.tenant && a.name != api.name);
    let (tenant_drafts, tenant_bytes) = others.fold((drafts(api), bytes), |(d, b), a| {
        (d + drafts(a), b + api_bytes(a))
    });
    if tenant_drafts > MAX_DRAFTS_PER_TENANT {
        return Err(Refusal::Precondition(format!(
            "tenant {} would have more than {MAX_DRAFTS_PER_TENANT} drafts; publish or discard \
             some first",
            api.tenant
        )));
    }
    if tenant_bytes > MAX_TENANT_BYTES {
        return Err(Refusal::Precondition(format!(
            "tenant {}'s versions would hold {tenant_bytes} bytes, over the {MAX_TENANT_BYTES} a \
             tenant may hold; discard drafts or retire versions you do not need",
            api.tenant
        )));
    }
    Ok(())
}

/// Refuses settings that would mount an API where another one already answers.
fn check_mount(
    apis: &BTreeMap<String, Api>,
    name: &str,
    settings: &ApiSettings,
) -> Result<(), Refusal> {
    if apis
        .values()
        .any(|a| a.name != name && a.settings.collides(settings))
    {
        let hosts = if settings.hosts.is_empty() {
            "any host".to_string()
        } else {
            settings.hosts.join(", ")
        };
        // Names neither the other API nor its mount: it may belong to another tenant.
        return Err(Refusal::Precondition(format!(
            "{} on {hosts} overlaps where another API is mounted (the same or a nested base path on an overlapping host); choose another base path or host",
            settings.base_path
        )));
    }
    Ok(())
}
