//! A cluster of real node processes on loopback, for the Raft tests.

use std::time::{Duration, Instant};

use tollgate_sdk::NodeClient;

use super::{GatewayProcess, NodeOpts, eventually};

/// Flags every cluster-test node gets: fault injection on (partitions).
pub const CLUSTER_FLAGS: &[&str] = &["--enable-fault-injection"];

/// Nodes by id (index id - 1); a killed node's slot keeps how to restart it.
pub struct TestCluster {
    pub nodes: Vec<Slot>,
    /// The operator token node 1 made when it bootstrapped the cluster.
    pub token: String,
    /// A join token new nodes enroll with (None for an --insecure-cluster).
    pub join_token: Option<String>,
    /// How clients verify the nodes (the cluster CA).
    pub tls: tollgate_sdk::Tls,
}

pub enum Slot {
    Up(Box<GatewayProcess>),
    Down(NodeOpts),
}

impl TestCluster {
    /// `n` nodes: node 1 bootstraps with `spec`, the others join it (as voters while
    /// there are fewer than 3). Returns once every node is a member.
    pub async fn start(n: u64, spec: &str, extra: &[&str]) -> TestCluster {
        let mut flags: Vec<String> = CLUSTER_FLAGS.iter().map(|s| s.to_string()).collect();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let first = GatewayProcess::launch(NodeOpts {
            id: 1,
            dir: None,
            grpc_port: 0,
            bootstrap: true,
            join: None,
            join_token: None,
            spec: Some(spec.to_string()),
            extra: flags.clone(),
        })
        .await;
        let seed = first.grpc;
        let token = first.operator_token().to_string();
        let join_token = match first.tls.is_tls() {
            true => Some(super::join_token(seed, 100).await),
            false => None,
        };
        let mut cluster = TestCluster {
            tls: first.tls.clone(),
            nodes: vec![Slot::Up(Box::new(first))],
            token,
            join_token,
        };
        for id in 2..=n {
            cluster.add(id, seed, &flags).await;
        }
        let want = n as usize;
        let voters = want.min(3);
        // Every node a member, and the membership changes finished: killing a node while
        // one is half done (joint consensus) can stop the cluster by design.
        cluster
            .wait_all("every node to be a member", Duration::from_secs(30), |s| {
                s.members.len() == want
                    && s.leader.is_some()
                    && !s.joint
                    && s.members.iter().filter(|m| m.role == "voter").count() == voters
            })
            .await;
        cluster
    }

    /// Starts node `id` joining through `seed`, with `flags` (e.g. `--voters 5`).
    pub async fn add(&mut self, id: u64, seed: std::net::SocketAddr, flags: &[String]) {
        let node = GatewayProcess::launch(NodeOpts {
            id,
            dir: None,
            grpc_port: 0,
            bootstrap: false,
            join: Some(seed),
            join_token: self.join_token.clone(),
            spec: None,
            extra: flags.to_vec(),
        })
        .await;
        self.nodes.push(Slot::Up(Box::new(node)));
    }

    /// The cluster CA's certificate file (node 1's copy).
    pub fn ca_file(&self) -> std::path::PathBuf {
        match &self.nodes[0] {
            Slot::Up(n) => n.ca_file(),
            Slot::Down(o) => o
                .dir
                .clone()
                .expect("a node that ran")
                .join("data/cluster-ca.pem"),
        }
    }

    pub fn node(&self, id: u64) -> &GatewayProcess {
        match &self.nodes[(id - 1) as usize] {
            Slot::Up(n) => n,
            Slot::Down(_) => panic!("node {id} is down"),
        }
    }

    pub fn is_up(&self, id: u64) -> bool {
        matches!(self.nodes[(id - 1) as usize], Slot::Up(_))
    }

    pub fn ids(&self) -> Vec<u64> {
        (1..=self.nodes.len() as u64).collect()
    }

    pub fn up_ids(&self) -> Vec<u64> {
        self.ids()
            .into_iter()
            .filter(|id| self.is_up(*id))
            .collect()
    }

    /// A client for node `id` with the operator token.
    pub async fn client(&self, id: u64) -> NodeClient {
        self.node(id)
            .sdk()
            .await
            .with_token(Some(&self.token))
            .expect("a usable token")
    }

    /// The leader as a majority of the running nodes report it, once there is one.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut votes = std::collections::HashMap::new();
            for id in self.up_ids() {
                if let Ok(mut c) =
                    NodeClient::connect(&self.node(id).grpc.to_string(), &self.tls).await
                    && let Ok(s) = c.cluster_status().await
                    && let Some(l) = s.leader
                    && self.up_ids().contains(&l)
                {
                    *votes.entry(l).or_insert(0) += 1;
                }
            }
            if let Some((l, n)) = votes.into_iter().max_by_key(|(_, n)| *n)
                && n * 2 > self.up_ids().len()
            {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `cond` holds for every running node's cluster status.
    pub async fn wait_all(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&tollgate_sdk::ClusterStatusResponse) -> bool,
    ) {
        let ids = self.up_ids();
        for id in ids {
            let addr = self.node(id).grpc.to_string();
            let what = format!("{what} (node {id})");
            eventually(&what, timeout, async || {
                match NodeClient::connect(&addr, &self.tls).await {
                    Ok(mut c) => c.cluster_status().await.is_ok_and(|s| cond(&s)),
                    Err(_) => false,
                }
            })
            .await;
        }
    }

    /// Waits until every running node's data plane serves `generation` or later.
    pub async fn wait_serving(&self, generation: u64, timeout: Duration) {
        for id in self.up_ids() {
            let addr = self.node(id).grpc.to_string();
            eventually(
                &format!("node {id} to serve generation {generation}"),
                timeout,
                async || match NodeClient::connect(&addr, &self.tls).await {
                    Ok(mut c) => c
                        .status()
                        .await
                        .is_ok_and(|s| s.spec_generation >= generation),
                    Err(_) => false,
                },
            )
            .await;
        }
    }

    pub fn kill9(&mut self, id: u64) {
        let slot = &mut self.nodes[(id - 1) as usize];
        let Slot::Up(_) = slot else { return };
        let Slot::Up(node) = std::mem::replace(slot, Slot::Down(NodeOpts::single("", &[]))) else {
            unreachable!()
        };
        *slot = Slot::Down(node.kill9());
    }

    /// Stops node `id` with SIGTERM (a graceful shutdown) and waits for it to exit; its
    /// data directory is kept for a restart. Returns whether it exited cleanly.
    pub async fn stop(&mut self, id: u64) -> bool {
        let slot = &mut self.nodes[(id - 1) as usize];
        let Slot::Up(node) = slot else { return false };
        node.signal("TERM");
        let status = node.wait_exit(Duration::from_secs(60)).await;
        let Slot::Up(node) = std::mem::replace(slot, Slot::Down(NodeOpts::single("", &[]))) else {
            unreachable!()
        };
        *slot = Slot::Down(node.kill9());
        status.is_some_and(|s| s.success())
    }

    pub async fn restart(&mut self, id: u64) {
        let slot = &mut self.nodes[(id - 1) as usize];
        let Slot::Down(opts) = slot else { return };
        let node = GatewayProcess::launch(opts.clone()).await;
        *slot = Slot::Up(Box::new(node));
    }

    /// Cuts node `id` off from every other node (both directions), or heals it.
    pub async fn isolate(&self, id: u64, cut: bool) {
        for other in self.up_ids() {
            let peers = if other == id {
                if cut {
                    self.ids().into_iter().filter(|p| *p != id).collect()
                } else {
                    vec![]
                }
            } else if cut {
                vec![id]
            } else {
                vec![]
            };
            let mut c = self.client(other).await;
            c.set_faults(peers).await.expect("set faults");
        }
    }
}

/// A spec with one upstream and one route whose response carries `x-generation-tag: tag`.
pub fn tagged_spec(upstream: std::net::SocketAddr, tag: &str) -> String {
    format!(
        "upstreams: {{ a: {{ endpoints: [{{ address: \"{upstream}\" }}] }} }}\nroutes: {{ r: {{ match: {{ path: {{ prefix: / }} }}, upstream: a, response_headers: {{ set: {{ x-tag: \"{tag}\" }} }} }} }}\n"
    )
}
