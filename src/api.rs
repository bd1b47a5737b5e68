//! `tollgate api ...` and `tollgate version ...`: the API lifecycle, through the control
//! plane (`tollgate-cp`), over the sdk.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use tollgate_sdk::ControlPlaneClient;
use tollgate_sdk::state::{self, version_transition::To};

use crate::cluster::{Output, print_value};

#[derive(Debug, Args)]
pub struct CpArg {
    /// Control-plane address(es), comma-separated (any replica).
    #[arg(
        long = "cp",
        env = "TOLLGATE_CP",
        value_delimiter = ',',
        default_value = "127.0.0.1:7080"
    )]
    pub cp: Vec<String>,
    /// The operator token (printed at bootstrap) or a tenant token.
    #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub ca: crate::cluster::CaArg,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Create an API owned by a tenant, mounted at hosts and a base path.
    Create {
        name: String,
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Change where an API is mounted and how callers are let in.
    Update {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
        #[command(flatten)]
        cp: CpArg,
    },
    /// List APIs (one tenant's with --tenant).
    List {
        #[arg(long, default_value = "")]
        tenant: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Show one API: versions, stages, the traffic split.
    Get {
        name: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Split traffic between versions by weight: `tollgate api split orders 1.0.0=90 2.0.0=10`.
    Split {
        name: String,
        /// VERSION=WEIGHT pairs.
        #[arg(required = true)]
        weights: Vec<String>,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Send all traffic to one version.
    Promote {
        name: String,
        version: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Restore the split before the last change.
    Rollback {
        name: String,
        #[command(flatten)]
        cp: CpArg,
    },
}

#[derive(Debug, Args)]
pub struct SettingsArgs {
    /// A host the API answers on (repeat for more; none: any host).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// The path the API is mounted at, e.g. /orders (default: /).
    #[arg(long, default_value = "/")]
    pub base_path: String,
    /// How callers are let in: key (API keys), jwt, mtls (client certificates registered
    /// as keys) or none.
    #[arg(long, default_value = "key")]
    pub auth: String,
    /// Keep each API key on one version of a split.
    #[arg(long)]
    pub sticky: bool,
    /// For --auth jwt: the issuer, audience and a file with the JWKS.
    #[arg(long, default_value = "")]
    pub jwt_issuer: String,
    #[arg(long, default_value = "")]
    pub jwt_audience: String,
    #[arg(long)]
    pub jwt_jwks: Option<PathBuf>,
    /// For --auth jwt: a claim a token may leave out or set to the API's owner (a token
    /// naming another tenant there is refused). Requests are always charged to the owner.
    #[arg(long, default_value = "tenant")]
    pub jwt_tenant_claim: String,
}

impl SettingsArgs {
    fn to_proto(&self) -> anyhow::Result<state::ApiSettings> {
        let jwt = match &self.jwt_jwks {
            Some(path) => Some(state::JwtSettings {
                issuer: self.jwt_issuer.clone(),
                audience: self.jwt_audience.clone(),
                jwks: read(path)?,
                tenant_claim: self.jwt_tenant_claim.clone(),
            }),
            None => None,
        };
        Ok(state::ApiSettings {
            hosts: self.hosts.clone(),
            base_path: self.base_path.clone(),
            auth: self.auth.clone(),
            sticky: self.sticky,
            jwt,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum VersionCommand {
    /// Create a draft version from a file with its routes, upstreams and policies.
    Create {
        api: String,
        version: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Replace a draft's content.
    Edit {
        api: String,
        version: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Publish a draft (it becomes immutable and may take traffic).
    Publish {
        api: String,
        version: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Deprecate a published version.
    Deprecate {
        api: String,
        version: String,
        /// RFC 3339 sunset time, e.g. 2027-06-30T00:00:00Z.
        #[arg(long, default_value = "")]
        sunset: String,
        /// The version that replaces it.
        #[arg(long, default_value = "")]
        successor: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Retire a deprecated version (it answers 410).
    Retire {
        api: String,
        version: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Drop a draft.
    Discard {
        api: String,
        version: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Health of an API's versions over a recent window: requests, error rate, p50, p99.
    Status {
        api: String,
        /// One version (default: every version).
        version: Option<String>,
        /// Start: an RFC 3339 time or a duration back from now [default: 1h]
        #[arg(long, default_value = "")]
        since: String,
        #[arg(long, default_value = "")]
        until: String,
        #[arg(long, value_enum, default_value_t)]
        output: crate::billing::ReportOutput,
        #[command(flatten)]
        conn: crate::billing::Connection,
    },
}

pub fn client(cp: &CpArg) -> anyhow::Result<ControlPlaneClient> {
    let addrs: Vec<&str> = cp.cp.iter().map(String::as_str).collect();
    let client = ControlPlaneClient::new(&addrs, &cp.ca.tls()?)?;
    Ok(match &cp.token {
        Some(t) => client.with_token(t)?,
        None => client,
    })
}

pub fn read(file: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))
}

pub async fn api(cmd: ApiCommand) -> anyhow::Result<()> {
    match cmd {
        ApiCommand::Create {
            name,
            tenant,
            settings,
            cp,
        } => show(
            &client(&cp)?
                .create_api(&name, &tenant, Some(settings.to_proto()?))
                .await?
                .api,
            cp.output,
        ),
        ApiCommand::Update { name, settings, cp } => show(
            &client(&cp)?
                .update_api(&name, settings.to_proto()?)
                .await?
                .api,
            cp.output,
        ),
        ApiCommand::Get { name, cp } => show(&client(&cp)?.get_api(&name).await?.api, cp.output),
        ApiCommand::List { tenant, cp } => {
            let apis = client(&cp)?.list_apis(&tenant).await?;
            match cp.output {
                Output::Table => {
                    println!(
                        "{:<24} {:<16} {:<24} {:<9} SPLIT",
                        "API", "TENANT", "MOUNT", "VERSIONS"
                    );
                    for a in &apis {
                        println!(
                            "{:<24} {:<16} {:<24} {:<9} {}",
                            a.name,
                            a.tenant,
                            mount_text(a),
                            a.versions.len(),
                            split_text(&a.split)
                        );
                    }
                    Ok(())
                }
                other => print_value(
                    &serde_json::Value::Array(apis.iter().map(api_json).collect()),
                    other,
                ),
            }
        }
        ApiCommand::Split { name, weights, cp } => {
            let mut pairs = Vec::new();
            for w in &weights {
                let Some((v, weight)) = w.split_once('=') else {
                    anyhow::bail!("{w:?}: write each weight as VERSION=WEIGHT, e.g. 2.0.0=10");
                };
                let weight: u32 = weight
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{w:?}: the weight must be a whole number"))?;
                pairs.push((v, weight));
            }
            show(&client(&cp)?.set_split(&name, &pairs).await?.api, cp.output)
        }
        ApiCommand::Promote { name, version, cp } => {
            show(&client(&cp)?.promote(&name, &version).await?.api, cp.output)
        }
        ApiCommand::Rollback { name, cp } => {
            show(&client(&cp)?.rollback(&name).await?.api, cp.output)
        }
    }
}

pub async fn version(cmd: VersionCommand) -> anyhow::Result<()> {
    let (api, version, to, cp) = match cmd {
        VersionCommand::Status {
            api,
            version,
            since,
            until,
            output,
            conn,
        } => {
            return crate::billing::version_status(api, version, since, until, output, conn).await;
        }
        VersionCommand::Create {
            api,
            version,
            file,
            cp,
        } => {
            let content = read(&file)?;
            let reply = client(&cp)?
                .create_version(&api, &version, &content)
                .await?;
            return show(&reply.api, cp.output);
        }
        VersionCommand::Edit {
            api,
            version,
            file,
            cp,
        } => (api, version, To::Edit(read(&file)?), cp),
        VersionCommand::Publish { api, version, cp } => {
            (api, version, To::Publish(state::Publish::default()), cp)
        }
        VersionCommand::Deprecate {
            api,
            version,
            sunset,
            successor,
            cp,
        } => (
            api,
            version,
            To::Deprecate(state::Deprecate { sunset, successor }),
            cp,
        ),
        VersionCommand::Retire { api, version, cp } => {
            (api, version, To::Retire(state::Empty {}), cp)
        }
        VersionCommand::Discard { api, version, cp } => {
            (api, version, To::Discard(state::Empty {}), cp)
        }
    };
    let reply = client(&cp)?.transition(&api, &version, to).await?;
    show(&reply.api, cp.output)
}

fn split_text(split: &[state::SplitEntry]) -> String {
    if split.is_empty() {
        return "-".into();
    }
    split
        .iter()
        .map(|e| format!("{}={}", e.version, e.weight))
        .collect::<Vec<_>>()
        .join(" ")
}

fn mount_text(a: &state::ApiState) -> String {
    let Some(s) = &a.settings else {
        return "-".into();
    };
    let hosts = if s.hosts.is_empty() {
        "*".to_string()
    } else {
        s.hosts.join(",")
    };
    format!("{hosts}{} ({})", s.base_path, s.auth)
}

fn api_json(a: &state::ApiState) -> serde_json::Value {
    let s = a.settings.clone().unwrap_or_default();
    json!({
        "name": a.name,
        "tenant": a.tenant,
        "hosts": s.hosts,
        "base_path": s.base_path,
        "auth": s.auth,
        "sticky": s.sticky,
        "versions": a.versions.iter().map(|v| json!({
            "version": v.version,
            "stage": v.stage,
            "sunset": if v.sunset.is_empty() { None } else { Some(&v.sunset) },
            "successor": if v.successor.is_empty() { None } else { Some(&v.successor) },
        })).collect::<Vec<_>>(),
        "split": a.split.iter().map(|e| json!({"version": e.version, "weight": e.weight})).collect::<Vec<_>>(),
    })
}

fn show(api: &Option<state::ApiState>, output: Output) -> anyhow::Result<()> {
    let Some(a) = api else {
        anyhow::bail!("the control plane answered without the API");
    };
    match output {
        Output::Json | Output::Yaml => print_value(&api_json(a), output)?,
        Output::Table => {
            println!(
                "API {} (tenant {}, {})   split: {}",
                a.name,
                a.tenant,
                mount_text(a),
                split_text(&a.split)
            );
            println!(
                "{:<14} {:<11} {:<26} SUCCESSOR",
                "VERSION", "STAGE", "SUNSET"
            );
            for v in &a.versions {
                println!(
                    "{:<14} {:<11} {:<26} {}",
                    v.version,
                    v.stage,
                    if v.sunset.is_empty() { "-" } else { &v.sunset },
                    if v.successor.is_empty() {
                        "-"
                    } else {
                        &v.successor
                    }
                );
            }
        }
    }
    Ok(())
}
