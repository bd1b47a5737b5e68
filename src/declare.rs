//! The declarative half of `tollgate apply -f` beyond routes and upstreams: `tenants` and
//! `apis` (with their versions, stages and split), in the same file. The file says what
//! should exist; apply reads the cluster, plans the commands that get it there, prints the
//! plan, and (unless `--dry-run`) sends them in order through a node. See docs/spec.md.
//!
//! Apply adds and changes; it never deletes a tenant or an API that the file leaves out
//! (that is `tollgate tenant delete` / a version `discard` or `retire`). Keys and tokens
//! are never in a file: their secrets are shown once.

use std::collections::BTreeMap;

use serde::Deserialize;
use tollgate_node::state::lifecycle::{ApiSettings, Stage, parse_version};
use tollgate_sdk::NodeClient;
use tollgate_sdk::state::{self, access_command, api_command, version_transition::To};

/// The `tenants` and `apis` sections of a file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declared {
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantDecl>,
    #[serde(default)]
    pub apis: BTreeMap<String, ApiDecl>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantDecl {
    /// API name -> semver requirement; when given, exactly these subscriptions. With a
    /// tenant's token they are asked for (the API's owner accepts); with the operator's,
    /// granted. Offers and requests still waiting that the file leaves out are left alone.
    #[serde(default)]
    pub subscriptions: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiDecl {
    pub tenant: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub base_path: String,
    #[serde(default)]
    pub auth: String,
    #[serde(default)]
    pub sticky: bool,
    #[serde(default)]
    pub jwt: Option<JwtDecl>,
    #[serde(default)]
    pub versions: BTreeMap<String, VersionDecl>,
    /// Version -> weight; when given, the split.
    #[serde(default)]
    pub split: Option<BTreeMap<String, u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtDecl {
    pub issuer: String,
    pub audience: String,
    /// The JWKS as JSON text.
    pub jwks: String,
    #[serde(default)]
    pub tenant_claim: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionDecl {
    /// draft (default), published, deprecated or retired.
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub sunset: String,
    #[serde(default)]
    pub successor: String,
    /// The version's routes and upstreams (a spec document).
    #[serde(default)]
    pub spec: serde_yaml_ng::Value,
}

impl ApiDecl {
    fn settings(&self) -> state::ApiSettings {
        state::ApiSettings {
            hosts: self.hosts.clone(),
            base_path: self.base_path.clone(),
            auth: self.auth.clone(),
            sticky: self.sticky,
            jwt: self.jwt.as_ref().map(|j| state::JwtSettings {
                issuer: j.issuer.clone(),
                audience: j.audience.clone(),
                jwks: j.jwks.clone(),
                tenant_claim: j.tenant_claim.clone(),
            }),
        }
    }
}

/// Settings as a listing shows them (symmetric JWT keys redacted), to compare with one.
fn redacted(s: &state::ApiSettings) -> state::ApiSettings {
    let mut s = s.clone();
    tollgate_node::auth::jwt::redact_settings(&mut s);
    s
}

/// One planned change: what it touches, how it reads in the plan, and the command.
pub struct Step {
    pub mark: char,
    pub what: String,
    pub command: state::command::Kind,
}

fn stage_of(name: &str) -> Result<Stage, String> {
    match name {
        "draft" => Ok(Stage::Draft),
        "published" => Ok(Stage::Published),
        "deprecated" => Ok(Stage::Deprecated),
        "retired" => Ok(Stage::Retired),
        other => Err(format!(
            "stage {other:?} is not one of draft, published, deprecated, retired"
        )),
    }
}

fn api_cmd(api: &str, op: api_command::Op) -> state::command::Kind {
    state::command::Kind::Api(state::ApiCommand {
        api: api.into(),
        op: Some(op),
    })
}

fn access_cmd(tenant: &str, op: access_command::Op) -> state::command::Kind {
    state::command::Kind::Access(state::AccessCommand {
        tenant: tenant.into(),
        op: Some(op),
    })
}

fn transition(api: &str, version: &str, to: To) -> state::command::Kind {
    api_cmd(
        api,
        api_command::Op::Transition(state::VersionTransition {
            version: version.into(),
            to: Some(to),
        }),
    )
}

/// What it takes to go from the cluster's state to the declared one. Every problem in the
/// file is listed before anything is sent.
pub fn plan(
    declared: &Declared,
    tenants: &[state::TenantState],
    apis: &[state::ApiState],
) -> Result<Vec<Step>, Vec<String>> {
    // Sent in phases, so no step waits on a later one: tenants, APIs, versions up to
    // published, splits, deprecations (their successors exist by then), retirements (their
    // traffic has moved by then), subscriptions (the APIs exist by then).
    let mut phases: [Vec<Step>; 7] = Default::default();
    const TENANTS: usize = 0;
    const APIS: usize = 1;
    const VERSIONS: usize = 2;
    const SPLITS: usize = 3;
    const DEPRECATIONS: usize = 4;
    const RETIREMENTS: usize = 5;
    const SUBSCRIPTIONS: usize = 6;
    let mut errors = Vec::new();
    for name in declared.tenants.keys() {
        let current = tenants.iter().find(|x| &x.name == name);
        if current.is_none() {
            phases[TENANTS].push(Step {
                mark: '+',
                what: format!("tenant/{name}"),
                command: access_cmd(name, access_command::Op::CreateTenant(Default::default())),
            });
        }
    }
    for (name, a) in &declared.apis {
        let at = format!("apis.{name}");
        let normalized = match ApiSettings::from_proto(Some(&a.settings())) {
            Ok(s) => s.to_proto(),
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        let current = apis.iter().find(|x| &x.name == name);
        match current {
            None => phases[APIS].push(Step {
                mark: '+',
                what: format!("api/{name}"),
                command: api_cmd(
                    name,
                    api_command::Op::CreateApi(state::CreateApi {
                        tenant: a.tenant.clone(),
                        settings: Some(normalized.clone()),
                    }),
                ),
            }),
            Some(c) if c.tenant != a.tenant => errors.push(format!(
                "{at}.tenant: the API belongs to {}; an API cannot change owner",
                c.tenant
            )),
            Some(c) if c.settings.as_ref() != Some(&redacted(&normalized)) => {
                phases[APIS].push(Step {
                    mark: '~',
                    what: format!("api/{name} (settings)"),
                    command: api_cmd(
                        name,
                        api_command::Op::UpdateApi(state::UpdateApi {
                            settings: Some(normalized.clone()),
                        }),
                    ),
                })
            }
            Some(_) => {}
        }
        for (v, decl) in &a.versions {
            let at = format!("{at}.versions.{v}");
            let version = match parse_version(v) {
                Ok(version) => version.to_string(),
                Err(e) => {
                    errors.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let want = match stage_of(decl.stage.as_deref().unwrap_or("draft")) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("{at}.stage: {e}"));
                    continue;
                }
            };
            let content = match &decl.spec {
                serde_yaml_ng::Value::Null => String::new(),
                value => match serde_yaml_ng::to_string(value) {
                    Ok(text) => text,
                    Err(e) => {
                        errors.push(format!("{at}.spec: {e}"));
                        continue;
                    }
                },
            };
            if let Err(e) = tollgate_node::state::spec::Spec::from_yaml(&content) {
                for err in e.0 {
                    errors.push(format!("{at}.spec.{}: {}", err.path, err.message));
                }
                continue;
            }
            let existing = current.and_then(|c| c.versions.iter().find(|x| x.version == version));
            let have = match existing {
                None => {
                    phases[VERSIONS].push(Step {
                        mark: '+',
                        what: format!("api/{name}@{version}"),
                        command: api_cmd(
                            name,
                            api_command::Op::CreateVersion(state::CreateVersion {
                                version: version.clone(),
                                content: content.clone(),
                            }),
                        ),
                    });
                    Stage::Draft
                }
                Some(x) => {
                    let have = stage_of(&x.stage).unwrap_or(Stage::Draft);
                    let same = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&x.content).ok()
                        == serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&content).ok();
                    if !same && have == Stage::Draft {
                        phases[VERSIONS].push(Step {
                            mark: '~',
                            what: format!("api/{name}@{version} (edit)"),
                            command: transition(name, &version, To::Edit(content.clone())),
                        });
                    } else if !same {
                        errors.push(format!(
                            "{at}.spec: version {version} is {} and cannot change; declare a new version",
                            x.stage
                        ));
                        continue;
                    }
                    have
                }
            };
            if want < have {
                errors.push(format!(
                    "{at}.stage: version {version} is already {}; a version never moves back (roll back the split instead)",
                    have.name()
                ));
                continue;
            }
            let mut stage = have;
            while stage < want {
                let (to, next, phase) = match stage {
                    Stage::Draft => (
                        To::Publish(state::Publish::default()),
                        Stage::Published,
                        VERSIONS,
                    ),
                    Stage::Published => (
                        To::Deprecate(state::Deprecate {
                            sunset: decl.sunset.clone(),
                            successor: decl.successor.clone(),
                        }),
                        Stage::Deprecated,
                        DEPRECATIONS,
                    ),
                    _ => (To::Retire(state::Empty {}), Stage::Retired, RETIREMENTS),
                };
                phases[phase].push(Step {
                    mark: '~',
                    what: format!("api/{name}@{version} ({})", next.name()),
                    command: transition(name, &version, to),
                });
                stage = next;
            }
        }
        if let Some(split) = &a.split {
            let mut want: Vec<(String, u32)> = Vec::new();
            for (v, w) in split {
                match parse_version(v) {
                    Ok(version) => want.push((version.to_string(), *w)),
                    Err(e) => errors.push(format!("{at}.split: {e}")),
                }
            }
            want.retain(|(_, w)| *w > 0);
            want.sort();
            let mut have: Vec<(String, u32)> = current
                .map(|c| {
                    c.split
                        .iter()
                        .map(|e| (e.version.clone(), e.weight))
                        .collect()
                })
                .unwrap_or_default();
            have.sort();
            if want != have {
                let text: Vec<String> = want.iter().map(|(v, w)| format!("{v}={w}")).collect();
                phases[SPLITS].push(Step {
                    mark: '~',
                    what: format!("api/{name} (split {})", text.join(" ")),
                    command: api_cmd(
                        name,
                        api_command::Op::SetSplit(state::SetSplit {
                            weights: want
                                .into_iter()
                                .map(|(version, weight)| state::SplitEntry { version, weight })
                                .collect(),
                        }),
                    ),
                });
            }
        }
    }
    // Subscriptions last: they name APIs that the steps above may create.
    for (name, t) in &declared.tenants {
        let Some(subs) = &t.subscriptions else {
            continue;
        };
        let found = tenants.iter().find(|x| &x.name == name);
        let current: BTreeMap<String, String> = found
            .map(|x| {
                x.subscriptions
                    .iter()
                    .map(|s| (s.api.clone(), s.versions.clone()))
                    .collect()
            })
            .unwrap_or_default();
        // Asked for already by this tenant, waiting for the API's owner: asking again with
        // a tenant's token changes nothing, and the operator's grants it; the plan says so.
        let requested = |api: &str, versions: &str| {
            found.is_some_and(|x| {
                x.pending.iter().any(|p| {
                    p.api == api
                        && p.versions == versions
                        && p.asked_by() == state::SubscriptionParty::Subscriber
                })
            })
        };
        for (api, versions) in subs {
            let versions = if versions.is_empty() { "*" } else { versions };
            if current.get(api).map(String::as_str) != Some(versions) {
                let waits = if requested(api, versions) {
                    "; requested, not accepted yet"
                } else {
                    ""
                };
                phases[SUBSCRIPTIONS].push(Step {
                    mark: '~',
                    what: format!("tenant/{name} (subscribe {api} {versions}{waits})"),
                    command: access_cmd(
                        name,
                        access_command::Op::Subscribe(state::Subscribe {
                            api: api.clone(),
                            versions: versions.to_string(),
                            ..Default::default()
                        }),
                    ),
                });
            }
        }
        for api in current.keys().filter(|a| !subs.contains_key(*a)) {
            phases[SUBSCRIPTIONS].push(Step {
                mark: '-',
                what: format!("tenant/{name} (subscription to {api})"),
                command: access_cmd(
                    name,
                    access_command::Op::Unsubscribe(state::Unsubscribe {
                        api: api.clone(),
                        ..Default::default()
                    }),
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(phases.into_iter().flatten().collect())
    } else {
        Err(errors)
    }
}

/// Reads the cluster's tenants and APIs (linearizably) and plans.
pub async fn plan_against(
    client: &mut NodeClient,
    declared: &Declared,
) -> anyhow::Result<Vec<Step>> {
    let tenants = client.list_tenants(false).await?.tenants;
    let apis = client.list_apis(false, "").await?.apis;
    plan(declared, &tenants, &apis).map_err(|errors| {
        anyhow::anyhow!(
            "the file has {} error(s), nothing was applied:\n  - {}",
            errors.len(),
            errors.join("\n  - ")
        )
    })
}

/// Sends the steps in order; stops at the first refusal, saying what was applied.
pub async fn run(client: &mut NodeClient, steps: &[Step], request_id: &str) -> anyhow::Result<u64> {
    let mut generation = 0;
    for (i, step) in steps.iter().enumerate() {
        let cmd = state::Command {
            request_id: format!("{request_id}-{i}"),
            kind: Some(step.command.clone()),
            ..Default::default()
        };
        match client.write(cmd).await {
            Ok(r) => generation = generation.max(r.generation),
            Err(e) => anyhow::bail!(
                "step {} of {} ({}) was refused: {e}\n{} step(s) before it were applied; fix the file and apply it again",
                i + 1,
                steps.len(),
                step.what,
                i
            ),
        }
    }
    Ok(generation)
}
