//! API versions and their lifecycle (DESIGN.md decision 9), as the replicated state holds
//! them: pure, deterministic rules that the state machine applies, so two control-plane
//! replicas racing each other cannot break them.
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
//! This is the first part of the control-plane issue: the model and its rules. Commands,
//! the control-plane service and the data plane's use of versions build on it.

use std::collections::BTreeMap;
use std::fmt;

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
    Publish,
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
            Transition::Publish => "publish",
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
}

/// Traffic weights by version; weights are relative (90/10 and 9/1 are the same split).
pub type Split = BTreeMap<Version, u32>;

/// An API: its versions and how traffic is split between them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Api {
    pub name: String,
    pub tenant: String,
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
    pub fn transition(&mut self, version: &str, t: Transition) -> Result<(), Refusal> {
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
            Transition::Publish => v.stage = Stage::Published,
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
                    },
                ))
            })
            .collect();
        Api {
            name: p.name.clone(),
            tenant: p.tenant.clone(),
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

/// Applies one API command to the set of APIs. Deterministic; a refusal changes nothing.
/// Returns the names of what changed (for the history).
pub fn apply_command(
    apis: &mut BTreeMap<String, Api>,
    cmd: &pb::ApiCommand,
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
        if apis.contains_key(&cmd.api) {
            return Err(Refusal::Precondition(format!(
                "API {} already exists",
                cmd.api
            )));
        }
        apis.insert(cmd.api.clone(), Api::new(&cmd.api, &create.tenant));
        return Ok(vec![format!("api/{}", cmd.api)]);
    }
    let Some(existing) = apis.get(&cmd.api) else {
        return Err(Refusal::NotFound(format!("there is no API {}", cmd.api)));
    };
    // Work on a copy: a refusal leaves the state exactly as it was.
    let mut api = existing.clone();
    let changed = match op {
        Op::CreateApi(_) => unreachable!("handled above"),
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
                Some(To::Publish(_)) => Transition::Publish,
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
            api.transition(&t.version, transition)?;
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
    apis.insert(cmd.api.clone(), api);
    Ok(vec![changed])
}
