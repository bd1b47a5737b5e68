//! Typed async client for Tollgate's gRPC APIs.
//!
//! [`NodeClient`] speaks the node admin API (`tollgate.node.v1.NodeAdmin`): status, cluster
//! membership, spec writes and reads. Any node accepts writes and forwards them to the
//! leader. [`ControlPlaneClient`] speaks the control plane (`tollgate.cp.v1`): API
//! lifecycle, tenants, keys, tokens and the audit log, over any number of replicas.
//!
//! Calls that read or change the cluster's state need a token ([`NodeClient::with_token`],
//! [`ControlPlaneClient::with_token`]): the operator token made at bootstrap, or a tenant
//! token.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tollgate_sdk::Error> {
//! let mut node = tollgate_sdk::NodeClient::connect("127.0.0.1:7070").await?;
//! let status = node.status().await?;
//! println!("node {} serves spec generation {}", status.node_id, status.spec_generation);
//! # Ok(()) }
//! ```

use std::time::Duration;

use tollgate_proto::node::v1::{
    ApplySpecRequest, AuditRequest, ClusterStatusRequest, HistoryRequest, ListApisRequest,
    ListCredentialsRequest, ListTenantsRequest, ReadSpecRequest, RemoveRequest, SetFaultsRequest,
    StatusRequest, WriteRequest, node_admin_client::NodeAdminClient,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

pub use tollgate_proto::node::v1::{
    ApplySpecResponse, ClusterStatusResponse, Member, ReadSpecResponse, StatusResponse,
};
pub use tollgate_proto::node::v1::{
    AuditResponse, ListApisResponse, ListCredentialsResponse, ListTenantsResponse, WriteResponse,
};
pub use tollgate_proto::state::v1 as state;
pub use tollgate_proto::state::v1::Change;

/// Response metadata naming the leader's gRPC address on UNAVAILABLE answers.
pub const LEADER_METADATA: &str = "x-tollgate-leader";

/// What went wrong talking to a Tollgate API, phrased so the caller knows what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid node address {addr:?}: {reason} (expected HOST:PORT, e.g. 127.0.0.1:7070)")]
    InvalidAddress { addr: String, reason: String },
    #[error(
        "cannot reach node at {addr}: {source} (is tollgate-node running with --grpc-addr {addr}?)"
    )]
    Unreachable {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the token is not usable as a header value; pass it as printed (tgt_...)")]
    InvalidToken,
    #[error("{}", describe(.0))]
    Status(tonic::Status),
}

/// A status as a person reads it: the code, the server's message, and for the codes that
/// mean "fix your credentials" what to do.
fn describe(s: &tonic::Status) -> String {
    let hint = match s.code() {
        tonic::Code::Unauthenticated => {
            " (pass a token: --token or TOLLGATE_TOKEN, the operator token printed at bootstrap or a tenant token)"
        }
        tonic::Code::PermissionDenied => " (use a token allowed to do this: the operator's)",
        _ => "",
    };
    format!("{:?}: {}{hint}", s.code(), s.message())
}

/// Parses a token into the `authorization` header value.
fn bearer(token: &str) -> Result<MetadataValue<Ascii>, Error> {
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| Error::InvalidToken)
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}

impl Error {
    /// The gRPC status code, when the node answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// The leader's gRPC address, when a node answered that it is not the leader.
    pub fn leader_hint(&self) -> Option<String> {
        match self {
            Error::Status(s) => s
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        }
    }
}

/// An endpoint for `addr` (`HOST:PORT`, or a full `http://` URI).
fn endpoint(addr: &str) -> Result<Endpoint, Error> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| Error::InvalidAddress {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    // While a call is in flight, HTTP/2 pings find a peer that stopped answering (paused,
    // or cut off the network) within about two seconds, and the call fails UNAVAILABLE
    // rather than waiting out its whole timeout. A live peer answers pings however long
    // its handler takes, so slow calls are not cut short.
    Ok(endpoint
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1)))
}

/// A client for one node's admin API.
#[derive(Debug, Clone)]
pub struct NodeClient {
    inner: NodeAdminClient<Channel>,
    token: Option<MetadataValue<Ascii>>,
    hook: Option<fn(&mut tonic::metadata::MetadataMap)>,
}

impl NodeClient {
    /// Connects to a node's gRPC address (`HOST:PORT`, or a full `http://` URI).
    pub async fn connect(addr: &str) -> Result<Self, Error> {
        let channel = endpoint(addr)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|source| Error::Unreachable {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Self {
            inner: NodeAdminClient::new(channel),
            token: None,
            hook: None,
        })
    }

    /// The same client, sending `token` (`None`: no token) with every call.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, Error> {
        self.token = token.map(bearer).transpose()?;
        Ok(self)
    }

    /// The same client, sending an already-parsed `authorization` value (for services that
    /// pass their caller's credentials on).
    pub fn with_authorization(mut self, value: Option<MetadataValue<Ascii>>) -> Self {
        self.token = value;
        self
    }

    /// The same client, letting `hook` add metadata to every call (a service that traces
    /// its calls adds the caller's `traceparent` this way).
    pub fn with_metadata_hook(mut self, hook: fn(&mut tonic::metadata::MetadataMap)) -> Self {
        self.hook = Some(hook);
        self
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(hook) = self.hook {
            hook(req.metadata_mut());
        }
        req
    }

    /// A client that connects on first use (and reconnects after failures), for callers
    /// that keep a client per node and must not block on a node that is down.
    pub fn lazy(addr: &str) -> Result<Self, Error> {
        let channel = endpoint(addr)?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            inner: NodeAdminClient::new(channel),
            token: None,
            hook: None,
        })
    }

    /// What the node is and what it serves right now.
    pub async fn status(&mut self) -> Result<StatusResponse, Error> {
        Ok(self.inner.status(StatusRequest {}).await?.into_inner())
    }

    /// Members, roles, leader and term as this node sees them.
    pub async fn cluster_status(&mut self) -> Result<ClusterStatusResponse, Error> {
        Ok(self
            .inner
            .cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner())
    }

    /// Replaces the cluster's spec (or, with `dry_run`, only plans it). `request_id` makes
    /// a retry safe: a write whose id was already applied is not applied again.
    pub async fn apply_spec(
        &mut self,
        spec_yaml: impl Into<String>,
        dry_run: bool,
        request_id: impl Into<String>,
    ) -> Result<ApplySpecResponse, Error> {
        let req = ApplySpecRequest {
            spec_yaml: spec_yaml.into(),
            dry_run,
            request_id: request_id.into(),
        };
        Ok(self.inner.apply_spec(self.req(req)).await?.into_inner())
    }

    /// The cluster's spec: linearizable (through the leader) unless `local`.
    pub async fn read_spec(&mut self, local: bool) -> Result<ReadSpecResponse, Error> {
        Ok(self
            .inner
            .read_spec(self.req(ReadSpecRequest { local }))
            .await?
            .into_inner())
    }

    /// Proposes a state-machine command (the API lifecycle commands); any node forwards it
    /// to the leader. A refused command answers with the status that says why.
    pub async fn write(&mut self, command: state::Command) -> Result<WriteResponse, Error> {
        Ok(self
            .inner
            .write(self.req(WriteRequest {
                command: Some(command),
            }))
            .await?
            .into_inner())
    }

    /// APIs and their versions; linearizable unless `local`; one tenant's when given.
    pub async fn list_apis(
        &mut self,
        local: bool,
        tenant: &str,
    ) -> Result<ListApisResponse, Error> {
        Ok(self
            .inner
            .list_apis(self.req(ListApisRequest {
                local,
                tenant: tenant.to_string(),
            }))
            .await?
            .into_inner())
    }

    /// Tenants and their subscriptions (a tenant token sees its own only).
    pub async fn list_tenants(&mut self, local: bool) -> Result<ListTenantsResponse, Error> {
        Ok(self
            .inner
            .list_tenants(self.req(ListTenantsRequest { local }))
            .await?
            .into_inner())
    }

    /// API keys (`kind` "key") or tokens ("token") of one tenant or all, without hashes.
    pub async fn list_credentials(
        &mut self,
        req: ListCredentialsRequest,
    ) -> Result<ListCredentialsResponse, Error> {
        Ok(self
            .inner
            .list_credentials(self.req(req))
            .await?
            .into_inner())
    }

    /// The audit log, filtered.
    pub async fn audit(&mut self, req: AuditRequest) -> Result<AuditResponse, Error> {
        Ok(self.inner.audit(self.req(req)).await?.into_inner())
    }

    /// Every upstream's circuit breaker as committed (only those that ever changed).
    /// Usage rollups in a range and the billing state (see the node's `Usage` RPC).
    pub async fn usage(
        &mut self,
        req: tollgate_proto::node::v1::UsageRequest,
    ) -> Result<tollgate_proto::node::v1::UsageResponse, Error> {
        Ok(self.inner.usage(self.req(req)).await?.into_inner())
    }

    pub async fn list_circuits(
        &mut self,
    ) -> Result<tollgate_proto::node::v1::ListCircuitsResponse, Error> {
        Ok(self
            .inner
            .list_circuits(self.req(tollgate_proto::node::v1::ListCircuitsRequest {}))
            .await?
            .into_inner())
    }

    /// Forces an upstream's circuit open or closed, or hands it back to detection
    /// (operator token). Every node follows once the change is applied there.
    pub async fn force_circuit(
        &mut self,
        upstream: &str,
        mode: state::CircuitMode,
        reason: &str,
    ) -> Result<WriteResponse, Error> {
        self.write(state::Command {
            kind: Some(state::command::Kind::Circuit(state::CircuitCommand {
                upstream: upstream.to_string(),
                op: Some(state::circuit_command::Op::Force(state::CircuitForce {
                    mode: mode as i32,
                    reason: reason.to_string(),
                })),
            })),
            ..state::Command::default()
        })
        .await
    }

    /// Takes a node out of the cluster.
    pub async fn remove(&mut self, node_id: u64) -> Result<(), Error> {
        self.inner
            .remove(self.req(RemoveRequest { node_id }))
            .await?;
        Ok(())
    }

    /// The recent applied changes on this node, oldest first.
    pub async fn history(&mut self) -> Result<Vec<Change>, Error> {
        Ok(self
            .inner
            .history(self.req(HistoryRequest {}))
            .await?
            .into_inner()
            .changes)
    }

    /// Tests only (the node must run with `--enable-fault-injection`): drop Raft traffic
    /// between this node and `peers`; an empty list heals.
    pub async fn set_faults(&mut self, peers: Vec<u64>) -> Result<(), Error> {
        self.inner
            .set_faults(SetFaultsRequest {
                isolate_from: peers,
            })
            .await?;
        Ok(())
    }
}

pub use tollgate_proto::cp::v1 as cp;
pub use tollgate_proto::node::v1::{
    AuditRequest as NodeAuditRequest, ListCredentialsRequest as NodeListCredentialsRequest,
    UsageRequest as NodeUsageRequest,
};

/// A client for the control plane (`tollgate-cp`): any number of replica addresses; a call
/// that gets UNAVAILABLE or a transport failure moves on to the next replica, backing off,
/// for up to 10 s. Every other answer (INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND,
/// ...) is returned at once: it says what to change.
#[derive(Debug, Clone)]
pub struct ControlPlaneClient {
    replicas: Vec<(String, Channel)>,
    token: Option<MetadataValue<Ascii>>,
}

type Lifecycle = cp::api_lifecycle_client::ApiLifecycleClient<Channel>;
type AccessClient = cp::access_client::AccessClient<Channel>;
type AuditClient = cp::audit_client::AuditClient<Channel>;
type CircuitsClient = cp::circuits_client::CircuitsClient<Channel>;
type BillingClient = cp::billing_client::BillingClient<Channel>;

impl ControlPlaneClient {
    /// `addrs`: `HOST:PORT` of one or more replicas. Connects on first use.
    pub fn new(addrs: &[&str]) -> Result<Self, Error> {
        if addrs.is_empty() {
            return Err(Error::InvalidAddress {
                addr: String::new(),
                reason: "no control-plane address given".into(),
            });
        }
        let mut replicas = Vec::new();
        for addr in addrs {
            let channel = endpoint(addr)?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(20))
                .connect_lazy();
            replicas.push((addr.to_string(), channel));
        }
        Ok(Self {
            replicas,
            token: None,
        })
    }

    /// The same client, sending `token` with every call.
    pub fn with_token(mut self, token: &str) -> Result<Self, Error> {
        self.token = Some(bearer(token)?);
        Ok(self)
    }

    /// Sends `req` with `f`, to the next replica after each UNAVAILABLE.
    async fn call<Req, T, F, Fut>(&self, req: Req, f: F) -> Result<T, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut i = 0;
        loop {
            let channel = self.replicas[i % self.replicas.len()].1.clone();
            let mut request = tonic::Request::new(req.clone());
            if let Some(t) = &self.token {
                request.metadata_mut().insert("authorization", t.clone());
            }
            match f(channel, request).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
                        && started.elapsed() + delay < Duration::from_secs(10) =>
                {
                    i += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(s) => return Err(Error::Status(s)),
            }
        }
    }

    /// A new API owned by `tenant`, mounted as `settings` say (`None`: any host, at `/`,
    /// API keys).
    pub async fn create_api(
        &self,
        name: &str,
        tenant: &str,
        settings: Option<state::ApiSettings>,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::CreateApiRequest {
            name: name.into(),
            tenant: tenant.into(),
            settings,
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).create_api(r).await
        })
        .await
    }

    pub async fn update_api(
        &self,
        name: &str,
        settings: state::ApiSettings,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::UpdateApiRequest {
            name: name.into(),
            settings: Some(settings),
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).update_api(r).await
        })
        .await
    }

    pub async fn get_api(&self, name: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::GetApiRequest { name: name.into() };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).get_api(r).await },
        )
        .await
    }

    /// Every API the token may see, or one tenant's (`tenant` non-empty).
    pub async fn list_apis(&self, tenant: &str) -> Result<Vec<state::ApiState>, Error> {
        let req = cp::ListApisRequest {
            tenant: tenant.into(),
        };
        Ok(self
            .call(
                req,
                |ch, r| async move { Lifecycle::new(ch).list_apis(r).await },
            )
            .await?
            .apis)
    }

    pub async fn create_version(
        &self,
        api: &str,
        version: &str,
        content: &str,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::CreateVersionRequest {
            api: api.into(),
            version: version.into(),
            content: content.into(),
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).create_version(r).await
        })
        .await
    }

    /// Moves a version: `to` is edit, publish, deprecate, retire or discard.
    pub async fn transition(
        &self,
        api: &str,
        version: &str,
        to: state::version_transition::To,
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::TransitionVersionRequest {
            api: api.into(),
            transition: Some(state::VersionTransition {
                version: version.into(),
                to: Some(to),
            }),
        };
        self.call(req, |ch, r| async move {
            Lifecycle::new(ch).transition_version(r).await
        })
        .await
    }

    /// Publishes a draft (the cluster compiles its routes in the same change).
    pub async fn publish(&self, api: &str, version: &str) -> Result<cp::ApiReply, Error> {
        self.transition(
            api,
            version,
            state::version_transition::To::Publish(state::Publish::default()),
        )
        .await
    }

    /// Splits traffic by weight, e.g. `[("1.0.0", 90), ("2.0.0", 10)]`.
    pub async fn set_split(
        &self,
        api: &str,
        weights: &[(&str, u32)],
    ) -> Result<cp::ApiReply, Error> {
        let req = cp::SetSplitRequest {
            api: api.into(),
            weights: weights
                .iter()
                .map(|(v, w)| state::SplitEntry {
                    version: v.to_string(),
                    weight: *w,
                })
                .collect(),
        };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).set_split(r).await },
        )
        .await
    }

    pub async fn promote(&self, api: &str, version: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::PromoteRequest {
            api: api.into(),
            version: version.into(),
        };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).promote(r).await },
        )
        .await
    }

    pub async fn rollback(&self, api: &str) -> Result<cp::ApiReply, Error> {
        let req = cp::RollbackRequest { api: api.into() };
        self.call(
            req,
            |ch, r| async move { Lifecycle::new(ch).rollback(r).await },
        )
        .await
    }

    pub async fn create_tenant(&self, name: &str) -> Result<cp::TenantReply, Error> {
        let req = cp::CreateTenantRequest { name: name.into() };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).create_tenant(r).await
        })
        .await
    }

    pub async fn delete_tenant(&self, name: &str) -> Result<cp::TenantReply, Error> {
        let req = cp::DeleteTenantRequest { name: name.into() };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).delete_tenant(r).await
        })
        .await
    }

    pub async fn list_tenants(&self) -> Result<Vec<state::TenantState>, Error> {
        Ok(self
            .call(cp::ListTenantsRequest {}, |ch, r| async move {
                AccessClient::new(ch).list_tenants(r).await
            })
            .await?
            .tenants)
    }

    /// A new API key; `expires_at` is RFC 3339 or empty. The reply's `secret` is the key,
    /// shown this once.
    pub async fn create_key(
        &self,
        tenant: &str,
        name: &str,
        expires_at: &str,
    ) -> Result<cp::CredentialReply, Error> {
        let req = cp::CreateCredentialRequest {
            tenant: tenant.into(),
            name: name.into(),
            expires_at: expires_at.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).create_key(r).await
        })
        .await
    }

    pub async fn list_keys(
        &self,
        tenant: &str,
        all: bool,
    ) -> Result<Vec<state::CredentialState>, Error> {
        let req = cp::ListCredentialsRequest {
            tenant: tenant.into(),
            all,
        };
        Ok(self
            .call(req, |ch, r| async move {
                AccessClient::new(ch).list_keys(r).await
            })
            .await?
            .credentials)
    }

    pub async fn revoke_key(&self, tenant: &str, id: &str) -> Result<cp::CredentialReply, Error> {
        let req = cp::RevokeRequest {
            tenant: tenant.into(),
            id: id.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).revoke_key(r).await
        })
        .await
    }

    /// A new control-plane token scoped to `tenant`; the reply's `secret` is the token.
    pub async fn create_token(
        &self,
        tenant: &str,
        name: &str,
        expires_at: &str,
    ) -> Result<cp::CredentialReply, Error> {
        let req = cp::CreateCredentialRequest {
            tenant: tenant.into(),
            name: name.into(),
            expires_at: expires_at.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).create_token(r).await
        })
        .await
    }

    pub async fn list_tokens(
        &self,
        tenant: &str,
        all: bool,
    ) -> Result<Vec<state::CredentialState>, Error> {
        let req = cp::ListCredentialsRequest {
            tenant: tenant.into(),
            all,
        };
        Ok(self
            .call(req, |ch, r| async move {
                AccessClient::new(ch).list_tokens(r).await
            })
            .await?
            .credentials)
    }

    pub async fn revoke_token(&self, tenant: &str, id: &str) -> Result<cp::CredentialReply, Error> {
        let req = cp::RevokeRequest {
            tenant: tenant.into(),
            id: id.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).revoke_token(r).await
        })
        .await
    }

    /// Lets `tenant`'s keys call the versions of `api` that match `versions` ("2", "^2.1",
    /// "*"; empty: all).
    pub async fn subscribe(
        &self,
        tenant: &str,
        api: &str,
        versions: &str,
    ) -> Result<cp::TenantReply, Error> {
        let req = cp::SubscribeRequest {
            tenant: tenant.into(),
            api: api.into(),
            versions: versions.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).subscribe(r).await
        })
        .await
    }

    pub async fn unsubscribe(&self, tenant: &str, api: &str) -> Result<cp::TenantReply, Error> {
        let req = cp::UnsubscribeRequest {
            tenant: tenant.into(),
            api: api.into(),
        };
        self.call(req, |ch, r| async move {
            AccessClient::new(ch).unsubscribe(r).await
        })
        .await
    }

    /// The audit log, filtered.
    pub async fn audit(&self, query: cp::AuditQuery) -> Result<Vec<state::AuditEntry>, Error> {
        Ok(self
            .call(
                query,
                |ch, r| async move { AuditClient::new(ch).query(r).await },
            )
            .await?
            .entries)
    }

    /// Upstreams' circuit breakers as committed (only those that ever changed).
    pub async fn list_circuits(&self) -> Result<cp::ListCircuitsReply, Error> {
        self.call(cp::ListCircuitsRequest {}, |ch, r| async move {
            CircuitsClient::new(ch).list_circuits(r).await
        })
        .await
    }

    /// Holds an upstream's circuit open or closed on every node, or hands it back to
    /// detection (operator token). Returns the generation written.
    pub async fn force_circuit(
        &self,
        upstream: &str,
        mode: state::CircuitMode,
        reason: &str,
    ) -> Result<u64, Error> {
        let req = cp::ForceCircuitRequest {
            upstream: upstream.to_string(),
            mode: mode as i32,
            reason: reason.to_string(),
        };
        Ok(self
            .call(req, |ch, r| async move {
                CircuitsClient::new(ch).force_circuit(r).await
            })
            .await?
            .generation)
    }

    /// Adds a plan, or a new immutable version of one (operator token).
    pub async fn put_plan(
        &self,
        name: &str,
        prices: state::PlanPrices,
    ) -> Result<cp::PlanReply, Error> {
        let req = cp::PutPlanRequest {
            name: name.into(),
            prices: Some(prices),
        };
        self.call(req, |ch, r| async move {
            BillingClient::new(ch).put_plan(r).await
        })
        .await
    }

    pub async fn list_plans(&self) -> Result<cp::ListPlansReply, Error> {
        self.call(cp::ListPlansRequest {}, |ch, r| async move {
            BillingClient::new(ch).list_plans(r).await
        })
        .await
    }

    /// Puts a tenant on a plan from now on (empty plan: off any plan).
    pub async fn assign_plan(&self, tenant: &str, plan: &str) -> Result<u64, Error> {
        let req = cp::AssignPlanRequest {
            tenant: tenant.into(),
            plan: plan.into(),
        };
        Ok(self
            .call(req, |ch, r| async move {
                BillingClient::new(ch).assign_plan(r).await
            })
            .await?
            .generation)
    }

    /// Sets (or, with an empty limit, removes) a tenant's monthly budget.
    pub async fn set_budget(&self, budget: state::SetBudget) -> Result<u64, Error> {
        Ok(self
            .call(budget, |ch, r| async move {
                BillingClient::new(ch).set_budget(r).await
            })
            .await?
            .generation)
    }

    pub async fn list_budgets(&self) -> Result<cp::ListBudgetsReply, Error> {
        self.call(cp::ListBudgetsRequest {}, |ch, r| async move {
            BillingClient::new(ch).list_budgets(r).await
        })
        .await
    }

    pub async fn usage(&self, query: cp::UsageQuery) -> Result<cp::UsageReply, Error> {
        self.call(query, |ch, r| async move {
            BillingClient::new(ch).usage(r).await
        })
        .await
    }

    pub async fn costs(&self, query: cp::CostsQuery) -> Result<cp::CostsReply, Error> {
        self.call(query, |ch, r| async move {
            BillingClient::new(ch).costs(r).await
        })
        .await
    }

    pub async fn version_status(
        &self,
        req: cp::VersionStatusRequest,
    ) -> Result<cp::VersionStatusReply, Error> {
        self.call(req, |ch, r| async move {
            BillingClient::new(ch).version_status(r).await
        })
        .await
    }
}
