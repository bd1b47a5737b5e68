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
