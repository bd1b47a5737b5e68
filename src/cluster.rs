//! `tollgate apply` and `tollgate cluster ...`: the cluster commands, over the sdk.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use tollgate_sdk::{ClusterStatusResponse, NodeClient};

use crate::declare::{self, Declared};

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints a value as JSON or YAML (`Table` is the caller's to print).
pub fn print_value(value: &serde_json::Value, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        _ => println!("{value}"),
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct NodeArg {
    /// A node's gRPC address (any member: writes are forwarded to the leader).
    #[arg(long, env = "TOLLGATE_NODE", default_value = "127.0.0.1:7070")]
    pub node: String,
    /// The operator token (printed at bootstrap) for calls that change the cluster.
    #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub ca: CaArg,
}

/// How the CLI verifies the servers it calls.
#[derive(Debug, Clone, Args)]
pub struct CaArg {
    /// The cluster CA's certificate, to verify nodes and control planes with
    /// (`<data dir>/cluster-ca.pem` of the bootstrapping node) [default:
    /// ./tollgate-data/cluster-ca.pem when it exists]
    #[arg(long, env = "TOLLGATE_CA")]
    pub ca: Option<PathBuf>,
    /// Talk plain text, for nodes run with --insecure-cluster.
    #[arg(long, env = "TOLLGATE_INSECURE", conflicts_with = "ca")]
    pub insecure: bool,
    /// The name the server's certificate must carry, when you dial it by another (a
    /// container's IP address: its certificate names its host name).
    #[arg(long, env = "TOLLGATE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

impl CaArg {
    pub fn tls(&self) -> anyhow::Result<tollgate_sdk::Tls> {
        if self.insecure {
            return Ok(tollgate_sdk::Tls::plaintext());
        }
        let default = PathBuf::from("tollgate-data/cluster-ca.pem");
        let tls = match &self.ca {
            Some(path) => tollgate_sdk::Tls::ca_file(path)?,
            None if default.exists() => tollgate_sdk::Tls::ca_file(&default)?,
            None => return Ok(tollgate_sdk::Tls::plaintext()),
        };
        Ok(match &self.tls_server_name {
            Some(name) => tls.with_server_name(name),
            None => tls,
        })
    }
}

impl NodeArg {
    pub async fn connect(&self) -> anyhow::Result<NodeClient> {
        if let Some(t) = &self.token {
            tollgate_sdk::check_token(t)?;
        }
        Ok(NodeClient::connect(&self.node, &self.ca.tls()?)
            .await?
            .with_token(self.token.as_deref())?)
    }
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The spec file (YAML); `-` reads standard input.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    #[command(flatten)]
    pub node: NodeArg,
    /// Show the plan without applying it.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, roles, the leader, the term and each member's applied index.
    Status {
        #[command(flatten)]
        node: NodeArg,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Take a node out of the cluster (stop its process afterwards); its certificates are
    /// revoked.
    Remove {
        /// The node's id.
        id: u64,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Join tokens: what a new node (or control plane) enrolls with.
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Make a join token; prints it alone (or `{"token": ...}` with --output json). It is
    /// shown once: the cluster keeps only its hash.
    Create {
        /// How long it can be used, e.g. 10m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many nodes (or control planes) may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// A label, e.g. the hosts it is for.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        node: NodeArg,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List join tokens (never their secrets): valid ones, or all with --all.
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        node: NodeArg,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a join token by its id: no one enrolls with it from now on.
    Revoke {
        id: String,
        #[command(flatten)]
        node: NodeArg,
    },
}

/// What a file for `tollgate apply` may have at its top: the spec's parts, then the
/// tenants and APIs the CLI turns into control-plane steps.
const TOP_LEVEL_KEYS: [&str; 8] = [
    "upstreams",
    "routes",
    "quotas",
    "tenant_upstreams",
    "certificates",
    "hosts",
    "tenants",
    "apis",
];

/// Splits a file into its spec part (upstreams, routes; `None` when it has neither) and
/// its `tenants`/`apis` part (`None` when it has neither).
pub fn split_file(text: &str) -> anyhow::Result<(Option<String>, Option<Declared>)> {
    let Ok(serde_yaml_ng::Value::Mapping(mut top)) = serde_yaml_ng::from_str(text) else {
        // Not a mapping: the node says what is wrong with it.
        return Ok((Some(text.to_string()), None));
    };
    let unknown: Vec<String> = top
        .keys()
        .filter(|k| !k.as_str().is_some_and(|k| TOP_LEVEL_KEYS.contains(&k)))
        .map(|k| match k.as_str() {
            Some(s) => format!("`{s}`"),
            None => format!("{k:?}"),
        })
        .collect();
    if !unknown.is_empty() {
        anyhow::bail!(
            "the file was refused, nothing was applied: unknown top-level field(s) {}; \
             expected `upstreams`, `routes`, `quotas`, `tenant_upstreams`, `certificates`, \
             `hosts`, `tenants` or `apis` \
             (docs/spec.md)",
            unknown.join(", ")
        );
    }
    let mut declared = serde_yaml_ng::Mapping::new();
    for key in ["tenants", "apis"] {
        if let Some(v) = top.remove(key) {
            declared.insert(key.into(), v);
        }
    }
    if declared.is_empty() {
        return Ok((Some(text.to_string()), None));
    }
    let declared: Declared =
        serde_path_to_error::deserialize(serde_yaml_ng::Value::Mapping(declared)).map_err(|e| {
            anyhow::anyhow!(
                "the file was refused, nothing was applied: {}: {}",
                e.path(),
                e.inner()
            )
        })?;
    let spec = (!top.is_empty())
        .then(|| serde_yaml_ng::to_string(&serde_yaml_ng::Value::Mapping(top)))
        .transpose()?;
    Ok((spec, Some(declared)))
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?
    };
    let (spec, declared) = split_file(&text)?;
    // One id for every attempt: a retry after an ambiguous failure is applied once.
    let request_id = format!(
        "cli-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let mut client = args.node.connect().await?;
    // The tenants and APIs are planned (and every error in them found) before anything
    // is applied.
    let steps = match &declared {
        Some(d) => Some(declare::plan_against(&mut client, d).await?),
        None => None,
    };
    if let Some(spec) = spec {
        apply_spec(&mut client, spec, &args, &request_id).await?;
    }
    let Some(steps) = steps else { return Ok(()) };
    let generation = if args.dry_run || steps.is_empty() {
        None
    } else {
        Some(declare::run(&mut client, &steps, &format!("{request_id}-s")).await?)
    };
    match args.output {
        Output::Table => {
            println!("Tenants and APIs: {} change(s).", steps.len());
            for s in &steps {
                println!("  {} {}", s.mark, s.what);
            }
            match generation {
                None if args.dry_run => println!("Dry run: nothing applied."),
                None => println!("No changes."),
                Some(g) => println!("Applied: generation {g}."),
            }
        }
        other => print_value(
            &json!({
                "dry_run": args.dry_run,
                "steps": steps.iter().map(|s| format!("{} {}", s.mark, s.what)).collect::<Vec<_>>(),
                "generation": generation,
            }),
            other,
        )?,
    }
    Ok(())
}

async fn apply_spec(
    client: &mut NodeClient,
    text: String,
    args: &ApplyArgs,
    request_id: &str,
) -> anyhow::Result<()> {
    let mut attempt = 0;
    let resp = loop {
        match client
            .apply_spec(text.clone(), args.dry_run, request_id.to_string())
            .await
        {
            Ok(r) => break r,
            Err(e) if e.code() == Some(tonic::Code::Unavailable) && attempt < 4 => {
                attempt += 1;
                eprintln!("{e}; retrying ({attempt}/4)");
                tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    match args.output {
        Output::Json | Output::Yaml => print_value(
            &json!({
                "dry_run": resp.dry_run,
                "generation": resp.generation,
                "log_index": resp.log_index,
                "added": resp.added,
                "changed": resp.changed,
                "removed": resp.removed,
                "warnings": resp.warnings,
            }),
            args.output,
        )?,
        Output::Table => {
            println!(
                "Plan: {} to add, {} to change, {} to remove.",
                resp.added.len(),
                resp.changed.len(),
                resp.removed.len()
            );
            for (mark, list) in [
                ("+", &resp.added),
                ("~", &resp.changed),
                ("-", &resp.removed),
            ] {
                for name in list {
                    println!("  {mark} {name}");
                }
            }
            if resp.dry_run {
                println!(
                    "Dry run: nothing applied (the cluster is at generation {}).",
                    resp.generation
                );
            } else if resp.added.is_empty() && resp.changed.is_empty() && resp.removed.is_empty() {
                println!(
                    "No changes: the cluster is at generation {}.",
                    resp.generation
                );
            } else {
                println!(
                    "Applied: generation {} (log index {}).",
                    resp.generation, resp.log_index
                );
            }
        }
    }
    Ok(())
}

pub async fn cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status { node, output } => {
            let mut client = node.connect().await?;
            let status = client.cluster_status().await?;
            let applied = members_applied(&status, &node.ca.tls()?).await;
            print_status(&status, &applied, output);
        }
        ClusterCommand::Remove { id, node } => {
            let mut client = node.connect().await?;
            client.remove(id).await?;
            println!(
                "Node {id} removed from the cluster and its certificates revoked; stop its process now."
            );
        }
        ClusterCommand::JoinToken(cmd) => join_token(cmd).await?,
    }
    Ok(())
}

async fn join_token(cmd: JoinTokenCommand) -> anyhow::Result<()> {
    match cmd {
        JoinTokenCommand::Create {
            ttl,
            uses,
            name,
            node,
            output,
        } => {
            let mut client = node.connect().await?;
            let token = client.create_join_token(&name, ttl, uses).await?;
            match output {
                Output::Table => println!("{token}"),
                other => print_value(&json!({ "token": token }), other)?,
            }
        }
        JoinTokenCommand::List { all, node, output } => {
            let mut client = node.connect().await?;
            let tokens = client.list_join_tokens(all).await?;
            let time = |ms: u64| {
                if ms == 0 {
                    return "-".to_string();
                }
                chrono::DateTime::from_timestamp_millis(ms as i64)
                    .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| ms.to_string())
            };
            match output {
                Output::Table => {
                    println!(
                        "{:<18} {:<16} {:<6} {:<21} {:<21} USED BY",
                        "ID", "NAME", "USED", "EXPIRES", "REVOKED"
                    );
                    for t in &tokens {
                        println!(
                            "{:<18} {:<16} {:<6} {:<21} {:<21} {}",
                            t.id,
                            t.name,
                            format!("{}/{}", t.used, t.uses),
                            time(t.expires_at_ms),
                            time(t.revoked_at_ms),
                            t.used_by.join(",")
                        );
                    }
                }
                other => {
                    let list: Vec<_> = tokens
                        .iter()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "name": t.name,
                                "uses": t.uses,
                                "used": t.used,
                                "used_by": t.used_by,
                                "created_at": time(t.created_at_ms),
                                "expires_at": time(t.expires_at_ms),
                                "revoked_at": if t.revoked_at_ms == 0 { None } else { Some(time(t.revoked_at_ms)) },
                            })
                        })
                        .collect();
                    print_value(&json!(list), other)?;
                }
            }
        }
        JoinTokenCommand::Revoke { id, node } => {
            let mut client = node.connect().await?;
            client.revoke_join_token(&id).await?;
            println!("Join token {id} revoked.");
        }
    }
    Ok(())
}

/// Each member's applied index, asked of the member itself (null when it does not answer
/// within a second; then the leader's replication progress, if this view has it).
async fn members_applied(
    status: &ClusterStatusResponse,
    tls: &tollgate_sdk::Tls,
) -> Vec<(Option<u64>, String)> {
    let mut out = Vec::new();
    for m in &status.members {
        let own = async {
            let mut c = NodeClient::connect(&m.addr, tls).await?;
            c.cluster_status().await
        };
        match tokio::time::timeout(Duration::from_secs(1), own).await {
            Ok(Ok(s)) => out.push((s.applied_index, s.state)),
            _ => out.push((m.applied_index, "unreachable".into())),
        }
    }
    out
}

fn print_status(status: &ClusterStatusResponse, applied: &[(Option<u64>, String)], output: Output) {
    match output {
        Output::Json | Output::Yaml => {
            let members: Vec<_> = status
                .members
                .iter()
                .zip(applied)
                .map(|(m, (index, state))| {
                    json!({
                        "id": m.id,
                        "addr": m.addr,
                        "role": m.role,
                        "region": m.region,
                        "applied_index": index,
                        "state": state,
                        "proxy_addr": m.proxy_addr,
                        "admin_addr": m.admin_addr,
                        "silent_s": m.silent_ms as f64 / 1000.0,
                    })
                })
                .collect();
            let v = json!({
                "leader": status.leader,
                "term": status.term,
                "members": members,
                "asked_node": status.node_id,
                "generation": status.generation,
                "committed_index": status.committed_index,
                "joint": status.joint,
                "degraded": if status.degraded.is_empty() { None } else { Some(&status.degraded) },
            });
            if let Err(e) = print_value(&v, output) {
                eprintln!("tollgate: {e}");
            }
        }
        Output::Table => {
            match status.leader {
                Some(l) => println!(
                    "leader: node {l}   term: {}   generation: {}",
                    status.term, status.generation
                ),
                None => println!(
                    "leader: none   term: {}   generation: {}",
                    status.term, status.generation
                ),
            }
            if status.joint {
                println!(
                    "a membership change is in progress (joint consensus): writes need a majority of the old and the new voters"
                );
            }
            if !status.degraded.is_empty() {
                println!(
                    "degraded (as seen by node {}): {}",
                    status.node_id, status.degraded
                );
            }
            println!(
                "{:<6} {:<22} {:<8} {:<10} {:<9} STATE",
                "ID", "ADDR", "ROLE", "REGION", "APPLIED"
            );
            for (m, (index, state)) in status.members.iter().zip(applied) {
                let silent = match m.silent_ms {
                    0 => String::new(),
                    ms => format!(" (silent {} s to node {})", ms / 1000, status.node_id),
                };
                println!(
                    "{:<6} {:<22} {:<8} {:<10} {:<9} {state}{silent}",
                    m.id,
                    m.addr,
                    m.role,
                    m.region,
                    index.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                );
            }
        }
    }
}
