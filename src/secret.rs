//! `tollgate secret ...`: named secrets kept sealed in the cluster's state, sealing keys,
//! and their rotation (docs/security.md, "Sealed secrets").

use std::io::Read;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use crate::cluster::{NodeArg, Output, print_value};

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Print a new sealing key (for --sealing-key-file or TOLLGATE_SEALING_KEY). Nothing is
    /// sent anywhere.
    Keygen,
    /// Store a secret under a name. Its value comes from standard input or --from-file,
    /// never from the command line (other users can read process lists).
    Set {
        /// The secret's name: letters, digits, `-` and `_`.
        name: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        from_file: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArg,
    },
    /// List the secrets' names, when each was last set and the key it is sealed with
    /// (never a value).
    List {
        #[command(flatten)]
        node: NodeArg,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a secret.
    Delete {
        name: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Seal every secret of the state again under each node's first sealing key: the
    /// last step of a rotation (docs/security.md, "Rotating the sealing key").
    Rotate {
        #[command(flatten)]
        node: NodeArg,
    },
}

/// Most bytes a secret's value may have.
const MAX_VALUE: u64 = 64 * 1024;

fn read_value(from_file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    let mut value = Vec::new();
    match from_file {
        Some(path) => {
            std::fs::File::open(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
                .take(MAX_VALUE + 1)
                .read_to_end(&mut value)?;
        }
        None => {
            std::io::stdin()
                .take(MAX_VALUE + 1)
                .read_to_end(&mut value)?;
        }
    }
    if value.len() as u64 > MAX_VALUE {
        anyhow::bail!("a secret is at most {MAX_VALUE} bytes");
    }
    // `echo value | tollgate secret set` would keep the newline: the value is the line.
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.is_empty() {
        anyhow::bail!("the secret's value is empty: give it on standard input or with --from-file");
    }
    Ok(value)
}

pub async fn secret(cmd: SecretCommand) -> anyhow::Result<()> {
    match cmd {
        SecretCommand::Keygen => {
            let key = tollgate_node::identity::seal::SealingKey::generate()
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("{}", key.to_text());
        }
        SecretCommand::Set {
            name,
            from_file,
            node,
        } => {
            let value = read_value(from_file.as_ref())?;
            let mut client = node.connect().await?;
            client.put_secret(&name, value).await?;
            println!("Secret {name} stored, sealed.");
        }
        SecretCommand::List { node, output } => {
            let mut client = node.connect().await?;
            let secrets = client.list_secrets().await?;
            let time = |ms: u64| {
                chrono::DateTime::from_timestamp_millis(ms as i64)
                    .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| ms.to_string())
            };
            match output {
                Output::Table => {
                    println!("{:<32} {:<21} SEALED WITH KEY", "NAME", "SET");
                    for s in &secrets {
                        println!("{:<32} {:<21} {}", s.id, time(s.revoked_at_ms), s.name);
                    }
                }
                other => {
                    let list: Vec<_> = secrets
                        .iter()
                        .map(|s| {
                            json!({
                                "name": s.id,
                                "created_at": time(s.created_at_ms),
                                "set_at": time(s.revoked_at_ms),
                                "sealed_with": s.name,
                            })
                        })
                        .collect();
                    print_value(&json!(list), other)?;
                }
            }
        }
        SecretCommand::Delete { name, node } => {
            let mut client = node.connect().await?;
            client.delete_secret(&name).await?;
            println!("Secret {name} deleted.");
        }
        SecretCommand::Rotate { node } => {
            let mut client = node.connect().await?;
            client.reseal().await?;
            println!(
                "Every secret is sealed under the first sealing key now; the old key can be removed from every node."
            );
        }
    }
    Ok(())
}
