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
        let nodes: Vec<String> = nodes.iter().map(|a| a.to_string()).collect();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["cp", "--listen", "127.0.0.1:0", "--nodes", &nodes.join(",")])
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
            assert!(Instant::now() < deadline, "tollgate cp did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        CpProcess { child, addr, dir }
    }

    /// The raw generated client, sending `token`.
    pub async fn client(&self, token: &str) -> Lifecycle {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ApiLifecycleClient::with_interceptor(channel, Bearer::new(token))
    }

    /// The sdk's client, with `token`.
    pub fn sdk(&self, token: &str) -> tollgate_sdk::ControlPlaneClient {
        tollgate_sdk::ControlPlaneClient::new(&[&self.addr.to_string()])
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
