//! A `tollgate cp` process for tests, and clients that send a token.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tollgate_proto::cp::v1::api_lifecycle_client::ApiLifecycleClient;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(20);

/// A `tollgate cp` process, killed when dropped.
pub struct CpProcess {
    child: Child,
    pub addr: SocketAddr,
    pub dir: std::path::PathBuf,
    /// How clients verify it: the cluster CA (plain text before an insecure cluster).
    pub tls: tollgate_sdk::Tls,
}

impl CpProcess {
    pub async fn start(nodes: &[SocketAddr]) -> CpProcess {
        Self::start_with(nodes, &[]).await
    }

    /// With extra flags.
    pub async fn start_with(nodes: &[SocketAddr], extra: &[&str]) -> CpProcess {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-cp-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let addr_file = dir.join("addr");
        // A control plane of a secure cluster enrolls with a join token of its own.
        let trust = super::trust(nodes[0]);
        let join_token = match &trust {
            Some(_) => Some(super::join_token(nodes[0], 1).await),
            None => None,
        };
        let tls = match &trust {
            Some(t) => tollgate_sdk::Tls::ca_pem(&t.ca_pem),
            None => tollgate_sdk::Tls::plaintext(),
        };
        let nodes: Vec<String> = nodes.iter().map(|a| a.to_string()).collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["cp", "--listen", "127.0.0.1:0", "--nodes", &nodes.join(",")]);
        match &join_token {
            Some(t) => cmd.env("TOLLGATE_JOIN_TOKEN", t),
            None => cmd.arg("--insecure"),
        };
        let child = cmd
            .arg("--addr-file")
            .arg(&addr_file)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("cp.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + T;
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && let Ok(a) = text.trim().parse()
            {
                break a;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("cp.log")).unwrap_or_default();
                panic!("tollgate cp did not start; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        CpProcess {
            child,
            addr,
            dir,
            tls,
        }
    }

    /// A channel to it, over TLS with the cluster CA when it serves TLS.
    pub async fn channel(&self) -> Channel {
        super::channel(self.addr, &self.tls).await
    }

    /// The raw generated client, sending `token`.
    pub async fn client(&self, token: &str) -> Lifecycle {
        ApiLifecycleClient::with_interceptor(self.channel().await, Bearer::new(token))
    }

    /// The sdk's client, with `token`.
    pub fn sdk(&self, token: &str) -> tollgate_sdk::ControlPlaneClient {
        tollgate_sdk::ControlPlaneClient::new(&[&self.addr.to_string()], &self.tls)
            .unwrap()
            .with_token(token)
            .unwrap()
    }
}

/// Adds `authorization: Bearer <token>` to every call of a generated client.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Bearer {
        Bearer(format!("Bearer {token}").parse().unwrap())
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub type Lifecycle =
    ApiLifecycleClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

impl Drop for CpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
