//! Prints the cluster as one node sees it, and the spec generation it serves.
//!
//! ```sh
//! cargo run -p tollgate-sdk --example cluster_status -- 127.0.0.1:7070
//! ```
//!
//! It verifies the node with the cluster CA in `TOLLGATE_CA` (default:
//! `tollgate-data/cluster-ca.pem`, where `tollgate dev` writes it).

#[tokio::main]
async fn main() -> Result<(), tollgate_sdk::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7070".into());
    let ca = std::env::var("TOLLGATE_CA").unwrap_or_else(|_| "tollgate-data/cluster-ca.pem".into());
    let tls = tollgate_sdk::Tls::ca_file(ca.as_ref())?;
    let mut node = tollgate_sdk::NodeClient::connect(&addr, &tls).await?;
    let status = node.status().await?;
    let cluster = node.cluster_status().await?;
    println!(
        "node {} serves spec generation {}; leader: {:?}, term {}",
        status.node_id, status.spec_generation, cluster.leader, cluster.term
    );
    for m in &cluster.members {
        println!(
            "  node {} at {} is a {} in {}",
            m.id, m.addr, m.role, m.region
        );
    }
    if !cluster.degraded.is_empty() {
        println!("degraded: {}", cluster.degraded);
    }
    Ok(())
}
