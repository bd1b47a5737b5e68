//! `tollgate tenant|subscription|key|token|audit ...`: tenants, their API keys and
//! control-plane tokens, subscriptions, and the audit log, through the control plane over
//! the sdk.

use clap::Subcommand;
use serde_json::json;
use tollgate_sdk::{cp, state};

use crate::api::{CpArg, client};
use crate::cluster::{Output, print_value};

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant (operator token).
    Create {
        name: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Delete a tenant that owns no API; its keys and tokens are revoked (operator token).
    Delete {
        name: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// List tenants and their subscriptions.
    List {
        #[command(flatten)]
        cp: CpArg,
    },
    /// Let a tenant's keys call versions of an API. With the operator token it is granted;
    /// with the API owner's token it is offered (the tenant accepts with `tollgate
    /// subscription accept`); with the tenant's own token it is requested (the owner
    /// accepts).
    Subscribe {
        tenant: String,
        api: String,
        /// Which versions, as a semver requirement: 2, ^2.1, * (default: all).
        #[arg(long, default_value = "")]
        versions: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// End a subscription, or withdraw or decline one that waits (either side, or the
    /// operator).
    Unsubscribe {
        tenant: String,
        api: String,
        #[command(flatten)]
        cp: CpArg,
    },
}

/// `tollgate subscription ...`: subscriptions between tenants, which both sides agree to.
#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Subscriptions, active and waiting: all (operator), or your tenant's and those to
    /// your APIs (tenant token).
    List {
        /// Only this subscribing tenant's.
        #[arg(long, default_value = "")]
        tenant: String,
        /// Only subscriptions to this API.
        #[arg(long, default_value = "")]
        api: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Accept what the other side asked for: an offer of API to TENANT (with TENANT's
    /// token), or TENANT's request (with the API owner's token).
    Accept {
        tenant: String,
        api: String,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Decline an offer or a request that waits (or withdraw your own).
    Decline {
        tenant: String,
        api: String,
        #[command(flatten)]
        cp: CpArg,
    },
}

/// `key` and `token` take the same subcommands.
#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Make one; the secret is printed this once and stored nowhere.
    Create {
        #[arg(long)]
        tenant: String,
        /// A label, e.g. ci or mobile-app.
        #[arg(long, default_value = "")]
        name: String,
        /// RFC 3339 time it stops working, e.g. 2027-06-30T00:00:00Z (default: never).
        #[arg(long, default_value = "")]
        expires: String,
        /// Print only the secret, for scripts: `KEY=$(tollgate key create --tenant acme -q)`.
        #[arg(short, long)]
        quiet: bool,
        /// Keys only: a client certificate (PEM file) that is the key, for APIs with `auth:
        /// mtls` (docs/tls.md). No secret is made; the key expires with the certificate.
        #[arg(long, value_name = "PEM_FILE")]
        client_cert: Option<std::path::PathBuf>,
        /// Keys only: an LLM model the key may use (repeat it; none: every model).
        #[arg(long = "model", value_name = "MODEL")]
        models: Vec<String>,
        #[command(flatten)]
        cp: CpArg,
    },
    /// List them (never their secrets or hashes).
    List {
        #[arg(long, default_value = "")]
        tenant: String,
        /// Include revoked and expired ones.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        cp: CpArg,
    },
    /// Revoke one: every node refuses it once the change is applied there.
    Revoke {
        #[arg(long)]
        tenant: String,
        id: String,
        #[command(flatten)]
        cp: CpArg,
    },
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Only objects starting with this, e.g. api/orders or key/.
    #[arg(long, default_value = "")]
    object: String,
    /// Only actors starting with this, e.g. tenant/acme or operator/.
    #[arg(long, default_value = "")]
    actor: String,
    /// Only entries at or after this RFC 3339 time.
    #[arg(long, default_value = "")]
    since: String,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Show each entry's object before and after.
    #[arg(long)]
    diff: bool,
    #[command(flatten)]
    cp: CpArg,
}

fn ms_text(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn tenant_json(t: &state::TenantState) -> serde_json::Value {
    json!({
        "name": t.name,
        "created_at": ms_text(t.created_at_ms),
        "subscriptions": t.subscriptions.iter().map(|s| json!({"api": s.api, "versions": s.versions})).collect::<Vec<_>>(),
    })
}

fn subscription_json(s: &state::SubscriptionView) -> serde_json::Value {
    json!({
        "tenant": s.tenant,
        "api": s.api,
        "owner": if s.owner.is_empty() { None } else { Some(&s.owner) },
        "versions": s.versions,
        "status": s.status,
        "asked_at": if s.asked_at_ms == 0 { None } else { Some(ms_text(s.asked_at_ms)) },
    })
}

/// What a subscribe did, in words, with the next step when one side must still agree.
fn subscription_outcome(tenant: &str, api: &str, s: Option<&state::SubscriptionView>) -> String {
    match s {
        Some(s) if s.status == "offered" => format!(
            "offered API {api} (versions {}) to tenant {tenant}; waiting for {tenant} to accept \
             (`tollgate subscription accept {tenant} {api}` with a token of {tenant})",
            s.versions
        ),
        Some(s) if s.status == "requested" => format!(
            "asked for tenant {tenant}'s subscription to API {api} (versions {}); waiting for \
             the API's owner to accept (`tollgate subscription accept {tenant} {api}` with the \
             owner's token)",
            s.versions
        ),
        Some(s) => format!(
            "tenant {tenant} may call versions {} of API {api}",
            s.versions
        ),
        None => format!("the subscription of tenant {tenant} to API {api} was changed"),
    }
}

fn credential_json(c: &state::CredentialState) -> serde_json::Value {
    json!({
        "id": c.id,
        "tenant": c.tenant,
        "name": c.name,
        "created_at": ms_text(c.created_at_ms),
        "expires_at": if c.expires_at_ms == 0 { None } else { Some(ms_text(c.expires_at_ms)) },
        "revoked_at": if c.revoked_at_ms == 0 { None } else { Some(ms_text(c.revoked_at_ms)) },
        "client_certificate": c.client_certificate,
    })
}

pub async fn tenant(cmd: TenantCommand) -> anyhow::Result<()> {
    let (reply, cp) = match cmd {
        TenantCommand::Create { name, cp } => (client(&cp)?.create_tenant(&name).await?, cp),
        TenantCommand::Delete { name, cp } => {
            let r = client(&cp)?.delete_tenant(&name).await?;
            println!("tenant {name} deleted (generation {})", r.generation);
            return Ok(());
        }
        TenantCommand::Subscribe {
            tenant,
            api,
            versions,
            cp,
        } => {
            let r = client(&cp)?.subscribe(&tenant, &api, &versions).await?;
            return show_subscription(&tenant, &api, &r, cp.output);
        }
        TenantCommand::Unsubscribe { tenant, api, cp } => {
            let r = client(&cp)?.unsubscribe(&tenant, &api).await?;
            println!(
                "tenant {tenant} is no longer subscribed to API {api}, and no subscription to \
                 it waits (generation {})",
                r.generation
            );
            return Ok(());
        }
        TenantCommand::List { cp } => {
            let tenants = client(&cp)?.list_tenants().await?;
            if cp.output == Output::Table {
                println!("{:<24} {:<22} SUBSCRIPTIONS", "TENANT", "CREATED");
                for t in &tenants {
                    let subs: Vec<String> = t
                        .subscriptions
                        .iter()
                        .map(|s| format!("{}@{}", s.api, s.versions))
                        .collect();
                    println!(
                        "{:<24} {:<22} {}",
                        t.name,
                        ms_text(t.created_at_ms),
                        if subs.is_empty() {
                            "-".into()
                        } else {
                            subs.join(" ")
                        }
                    );
                }
                return Ok(());
            }
            return print_value(
                &serde_json::Value::Array(tenants.iter().map(tenant_json).collect()),
                cp.output,
            );
        }
    };
    let Some(t) = reply.tenant else {
        anyhow::bail!("the control plane answered without the tenant");
    };
    match cp.output {
        Output::Table => println!(
            "tenant {} created (generation {})",
            t.name, reply.generation
        ),
        other => print_value(&tenant_json(&t), other)?,
    }
    Ok(())
}

fn show_subscription(
    tenant: &str,
    api: &str,
    reply: &cp::TenantReply,
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Table => println!(
            "{} (generation {})",
            subscription_outcome(tenant, api, reply.subscription.as_ref()),
            reply.generation
        ),
        other => print_value(
            &reply
                .subscription
                .as_ref()
                .map(subscription_json)
                .unwrap_or_default(),
            other,
        )?,
    }
    Ok(())
}

pub async fn subscription(cmd: SubscriptionCommand) -> anyhow::Result<()> {
    match cmd {
        SubscriptionCommand::List { tenant, api, cp } => {
            let list = client(&cp)?.list_subscriptions(&tenant, &api).await?;
            if cp.output != Output::Table {
                return print_value(
                    &serde_json::Value::Array(list.iter().map(subscription_json).collect()),
                    cp.output,
                );
            }
            println!(
                "{:<20} {:<20} {:<20} {:<12} {:<10} ASKED",
                "TENANT", "API", "OWNER", "VERSIONS", "STATUS"
            );
            for s in &list {
                println!(
                    "{:<20} {:<20} {:<20} {:<12} {:<10} {}",
                    s.tenant,
                    s.api,
                    if s.owner.is_empty() { "-" } else { &s.owner },
                    s.versions,
                    s.status,
                    ms_text(s.asked_at_ms)
                );
            }
            Ok(())
        }
        SubscriptionCommand::Accept { tenant, api, cp } => {
            let r = client(&cp)?.accept_subscription(&tenant, &api).await?;
            show_subscription(&tenant, &api, &r, cp.output)
        }
        SubscriptionCommand::Decline { tenant, api, cp } => {
            let c = client(&cp)?;
            // Only what waits: an active subscription is ended with `tenant unsubscribe`.
            let listed = c.list_subscriptions(&tenant, &api).await?;
            match listed.first() {
                Some(s) if s.status == "active" => anyhow::bail!(
                    "tenant {tenant}'s subscription to API {api} is active, not waiting; to end \
                     it: tollgate tenant unsubscribe {tenant} {api}"
                ),
                Some(_) => {}
                None => anyhow::bail!(
                    "no subscription of tenant {tenant} to API {api} waits (or this token may \
                     not see it): `tollgate subscription list` shows what does"
                ),
            }
            let r = c.unsubscribe(&tenant, &api).await?;
            println!(
                "the subscription of tenant {tenant} to API {api} no longer waits (generation {})",
                r.generation
            );
            Ok(())
        }
    }
}

/// `kind`: "key" or "token".
pub async fn credential(kind: &str, cmd: CredentialCommand) -> anyhow::Result<()> {
    match cmd {
        CredentialCommand::Create {
            tenant,
            name,
            expires,
            quiet,
            client_cert,
            models,
            cp,
        } => {
            let c = client(&cp)?;
            if !models.is_empty() && (kind != "key" || client_cert.is_some()) {
                anyhow::bail!("--model limits an API key made with a secret; leave it out here");
            }
            let reply = match (kind, client_cert) {
                ("key", None) if !models.is_empty() => {
                    c.create_model_key(&tenant, &name, &expires, &models)
                        .await?
                }
                ("key", Some(file)) => {
                    let pem = std::fs::read_to_string(&file)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
                    c.create_certificate_key(&tenant, &name, &expires, &pem)
                        .await?
                }
                (_, Some(_)) => anyhow::bail!(
                    "--client-cert makes an API key; a control-plane token cannot be a certificate"
                ),
                ("key", None) => c.create_key(&tenant, &name, &expires).await?,
                _ => c.create_token(&tenant, &name, &expires).await?,
            };
            if quiet && reply.secret.is_empty() {
                println!(
                    "{}",
                    reply.credential.as_ref().map_or("", |c| c.id.as_str())
                );
                return Ok(());
            }
            if quiet {
                println!("{}", reply.secret);
                return Ok(());
            }
            show_created(kind, &reply, cp.output)
        }
        CredentialCommand::List { tenant, all, cp } => {
            let c = client(&cp)?;
            let list = if kind == "key" {
                c.list_keys(&tenant, all).await?
            } else {
                c.list_tokens(&tenant, all).await?
            };
            if cp.output != Output::Table {
                return print_value(
                    &serde_json::Value::Array(list.iter().map(credential_json).collect()),
                    cp.output,
                );
            }
            println!(
                "{:<18} {:<16} {:<16} {:<22} {:<22} REVOKED",
                "ID", "TENANT", "NAME", "CREATED", "EXPIRES"
            );
            for k in &list {
                println!(
                    "{:<18} {:<16} {:<16} {:<22} {:<22} {}",
                    k.id,
                    if k.tenant.is_empty() {
                        "(operator)"
                    } else {
                        &k.tenant
                    },
                    if k.name.is_empty() { "-" } else { &k.name },
                    ms_text(k.created_at_ms),
                    ms_text(k.expires_at_ms),
                    ms_text(k.revoked_at_ms)
                );
            }
            Ok(())
        }
        CredentialCommand::Revoke { tenant, id, cp } => {
            let c = client(&cp)?;
            let reply = if kind == "key" {
                c.revoke_key(&tenant, &id).await?
            } else {
                c.revoke_token(&tenant, &id).await?
            };
            match cp.output {
                Output::Table => {
                    println!("{kind} {id} revoked (generation {})", reply.generation)
                }
                other => print_value(
                    &reply
                        .credential
                        .as_ref()
                        .map(credential_json)
                        .unwrap_or_default(),
                    other,
                )?,
            }
            Ok(())
        }
    }
}

fn show_created(kind: &str, reply: &cp::CredentialReply, output: Output) -> anyhow::Result<()> {
    let Some(c) = &reply.credential else {
        anyhow::bail!("the control plane answered without the {kind}");
    };
    match output {
        Output::Table if c.client_certificate => {
            println!(
                "{kind} {} created for tenant {}: the client certificate is the key (it expires {}).",
                c.id,
                c.tenant,
                ms_text(c.expires_at_ms)
            );
        }
        Output::Table => {
            println!("{kind} {} created for tenant {}.", c.id, c.tenant);
            println!();
            println!("  {}", reply.secret);
            println!();
            println!("Keep it now: it is shown this once and stored only as a keyed hash.");
        }
        other => {
            let mut v = credential_json(c);
            v["secret"] = json!(reply.secret);
            print_value(&v, other)?;
        }
    }
    Ok(())
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let query = cp::AuditQuery {
        after_seq: 0,
        limit: args.limit,
        object_prefix: args.object,
        actor: args.actor,
        since: args.since,
    };
    let entries = client(&args.cp)?.audit(query).await?;
    if args.cp.output != Output::Table {
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let parse = |t: &str| -> serde_json::Value {
                    serde_json::from_str(t).unwrap_or(serde_json::Value::Null)
                };
                json!({
                    "seq": e.seq,
                    "at": ms_text(e.at_ms),
                    "actor": e.actor,
                    "action": e.action,
                    "object": e.object,
                    "tenant": e.tenant,
                    "generation": e.generation,
                    "before": parse(&e.before),
                    "after": parse(&e.after),
                })
            })
            .collect();
        return print_value(&serde_json::Value::Array(list), args.cp.output);
    }
    println!(
        "{:<6} {:<21} {:<36} {:<18} OBJECT",
        "SEQ", "AT", "ACTOR", "ACTION"
    );
    for e in &entries {
        println!(
            "{:<6} {:<21} {:<36} {:<18} {}",
            e.seq,
            ms_text(e.at_ms),
            e.actor,
            e.action,
            e.object
        );
        if args.diff {
            println!(
                "       before: {}",
                if e.before.is_empty() { "-" } else { &e.before }
            );
            println!(
                "       after:  {}",
                if e.after.is_empty() { "-" } else { &e.after }
            );
        }
    }
    Ok(())
}
