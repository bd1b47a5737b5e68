//! A canary with the control plane: an API with two published versions, 10% of traffic
//! to the new one, then a one-step rollback. Run it against `tollgate dev`:
//!
//! ```sh
//! cargo run --release -- dev            # in another terminal; it prints the operator token
//! TOLLGATE_TOKEN=tgt_... cargo run -p tollgate-sdk --example canary -- 127.0.0.1:7080
//! ```
//!
//! It verifies the control plane with the cluster CA in `TOLLGATE_CA` (default:
//! `tollgate-data/cluster-ca.pem`, where `tollgate dev` writes it).
//!
//! Errors say what to change; for example, running it twice answers FAILED_PRECONDITION
//! because the API already exists.

use tollgate_sdk::ControlPlaneClient;

#[tokio::main]
async fn main() -> Result<(), tollgate_sdk::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7080".into());
    let token = std::env::var("TOLLGATE_TOKEN").unwrap_or_default();
    let ca = std::env::var("TOLLGATE_CA").unwrap_or_else(|_| "tollgate-data/cluster-ca.pem".into());
    let tls = tollgate_sdk::Tls::ca_file(ca.as_ref())?;
    let cp = ControlPlaneClient::new(&[&addr], &tls)?.with_token(&token)?;
    cp.create_tenant("acme").await?;
    cp.create_api("orders", "acme", None).await?;
    for version in ["1.0.0", "2.0.0"] {
        cp.create_version("orders", version, "routes: {}\n").await?;
        cp.publish("orders", version).await?;
    }
    cp.promote("orders", "1.0.0").await?;
    let canary = cp
        .set_split("orders", &[("1.0.0", 90), ("2.0.0", 10)])
        .await?;
    println!("canary: {:?}", canary.api.map(|a| a.split));
    let back = cp.rollback("orders").await?;
    println!("after rollback: {:?}", back.api.map(|a| a.split));
    Ok(())
}
