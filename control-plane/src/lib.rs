//! Tollgate's control plane (`tollgate-cp`): API lifecycle over the cluster's state.
//!
//! It stores nothing (docs/architecture.md, decision 3). Every call becomes a node admin
//! call: writes are `Write` commands carrying a request id, reads are linearizable
//! `ListApis`. The [`Nodes`] pool tries the node that answered last, follows the
//! `x-tollgate-leader` hint, moves on to the next address on UNAVAILABLE, and backs off,
//! within a deadline. A retried write keeps its request id, so the cluster applies it once.
//! Several replicas may run.
//!
//! It serves the API lifecycle (`tollgate.cp.v1.ApiLifecycle`), tenants, keys, tokens and
//! subscriptions (`Access`) and the audit log (`Audit`), with `grpc.health.v1` and server
//! reflection. It passes each caller's `authorization` metadata on to the node, which
//! authenticates it and scopes what the caller sees (docs/security.md): the control plane
//! holds no secret and makes no access decision of its own.

mod analysis;
mod billing;
mod calls;
mod models;
mod rollouts;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_node::telemetry::traces;
use tollgate_proto::cp::v1 as cp;
use tollgate_proto::cp::v1::access_server::{Access, AccessServer};
use tollgate_proto::cp::v1::api_lifecycle_server::{ApiLifecycle, ApiLifecycleServer};
use tollgate_proto::cp::v1::audit_server::{Audit, AuditServer};
use tollgate_proto::cp::v1::billing_server::BillingServer;
use tollgate_proto::cp::v1::circuits_server::{Circuits, CircuitsServer};
use tollgate_proto::state::v1 as state;
use tollgate_sdk::NodeClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// How long one control-plane call may spend finding a node that can take it.
const DEADLINE: Duration = Duration::from_secs(10);

/// The nodes the control plane talks to, with a client per address.
pub struct Nodes {
    tls: tollgate_sdk::Tls,
    addrs: Mutex<Vec<String>>,
    clients: Mutex<Vec<(String, NodeClient)>>,
    /// Index (into `addrs`) of the node that answered last.
    preferred: AtomicUsize,
}

impl Nodes {
    pub fn new(addrs: &[String], tls: &tollgate_sdk::Tls) -> Result<Nodes, String> {
        if addrs.is_empty() {
            return Err("give at least one node address (--nodes HOST:PORT,...)".into());
        }
        let mut clients = Vec::new();
        for a in addrs {
            clients.push((
                a.clone(),
                NodeClient::lazy(a, tls).map_err(|e| e.to_string())?,
            ));
        }
        Ok(Nodes {
            tls: tls.clone(),
            addrs: Mutex::new(addrs.to_vec()),
            clients: Mutex::new(clients),
            preferred: AtomicUsize::new(0),
        })
    }

    fn client(&self, addr: &str) -> Result<NodeClient, Status> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some((_, c)) = clients.iter().find(|(a, _)| a == addr) {
            return Ok(c.clone());
        }
        // A leader hint naming a node we were not given: remember it.
        let c = NodeClient::lazy(addr, &self.tls).map_err(|e| Status::internal(e.to_string()))?;
        clients.push((addr.to_string(), c.clone()));
        self.addrs
            .lock()
            .expect("addrs lock")
            .push(addr.to_string());
        Ok(c)
    }

    /// Runs `call` against a node, moving to another one (the leader's, when named) on
    /// UNAVAILABLE or a transport failure, with backoff, until `DEADLINE`.
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(NodeClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, tollgate_sdk::Error>>,
    {
        let started = Instant::now();
        let mut delay = Duration::from_millis(25);
        let mut next: Option<String> = None;
        loop {
            let addr = match next.take() {
                Some(a) => a,
                None => {
                    let addrs = self.addrs.lock().expect("addrs lock");
                    addrs[self.preferred.load(Ordering::Relaxed) % addrs.len()].clone()
                }
            };
            let client = self.client(&addr)?.with_metadata_hook(traces::inject);
            let span = tracing::info_span!(
                target: traces::TARGET,
                "call node",
                otel.kind = "client",
                rpc.system = "grpc",
                server.address = %addr,
            );
            let result = call(client).instrument(span).await;
            let err = match result {
                Ok(v) => {
                    let addrs = self.addrs.lock().expect("addrs lock");
                    if let Some(i) = addrs.iter().position(|a| *a == addr) {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let retry = err.is_unreachable()
                || matches!(
                    err.code(),
                    Some(tonic::Code::Unavailable) | Some(tonic::Code::Cancelled)
                );
            if !retry {
                return Err(match err {
                    tollgate_sdk::Error::Status(s) => s,
                    // --nodes names something that is not a node's gRPC port: the
                    // operator's to fix, and no retry will.
                    tollgate_sdk::Error::WrongServer { .. } => Status::failed_precondition(
                        format!("the control plane's --nodes is wrong: {err}"),
                    ),
                    other => Status::internal(other.to_string()),
                });
            }
            if started.elapsed() + delay > DEADLINE {
                return Err(Status::unavailable(format!(
                    "no node could take the call within {DEADLINE:?}; last answer from {addr}: {err}"
                )));
            }
            match err.leader_hint() {
                Some(leader) if leader != addr => next = Some(leader),
                _ => {
                    let n = self.addrs.lock().expect("addrs lock").len();
                    let current = self.preferred.load(Ordering::Relaxed);
                    self.preferred.store((current + 1) % n, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// The control plane's services (`ApiLifecycle`, `Access`, `Audit`), sharing one node pool.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Nodes,
    /// Distinguishes this replica's request ids from another's.
    replica: String,
    counter: AtomicU64,
}

/// The caller's `authorization` metadata, passed on to the node, which decides.
type Token = Option<MetadataValue<Ascii>>;

fn token<T>(req: &Request<T>) -> Token {
    req.metadata().get("authorization").cloned()
}

impl Service {
    pub fn new(nodes: Nodes) -> Service {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Service {
            inner: Arc::new(Inner {
                nodes,
                replica: format!("cp-{}-{nanos}", std::process::id()),
                counter: AtomicU64::new(0),
            }),
        }
    }

    /// Writes one command (retried with the same request id) as the caller.
    async fn command(
        &self,
        token: &Token,
        kind: state::command::Kind,
    ) -> Result<tollgate_sdk::WriteResponse, Status> {
        let command = state::Command {
            request_id: format!(
                "{}-{}",
                self.inner.replica,
                self.inner.counter.fetch_add(1, Ordering::Relaxed)
            ),
            kind: Some(kind),
            ..Default::default()
        };
        self.inner
            .nodes
            .call(|c| {
                let command = command.clone();
                let c = c.with_authorization(token.clone());
                async move { c.clone().write(command).await }
            })
            .await
    }

    /// Writes one API command and returns the API as it is afterwards.
    async fn write(
        &self,
        token: &Token,
        api: &str,
        op: state::api_command::Op,
    ) -> Result<cp::ApiReply, Status> {
        let kind = state::command::Kind::Api(state::ApiCommand {
            api: api.to_string(),
            op: Some(op),
        });
        let written = self.command(token, kind).await?;
        let mut reply = self.get(token, api).await?;
        reply.generation = reply.generation.max(written.generation);
        Ok(reply)
    }

    /// Every circuit as committed (a node's answer).
    pub(crate) async fn circuits(
        &self,
        t: &Token,
    ) -> Result<tollgate_proto::node::v1::ListCircuitsResponse, Status> {
        self.inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(t.clone());
                async move { c.list_circuits().await }
            })
            .await
    }

    pub(crate) async fn list(
        &self,
        token: &Token,
        tenant: &str,
    ) -> Result<tollgate_sdk::ListApisResponse, Status> {
        self.inner
            .nodes
            .call(|c| {
                let tenant = tenant.to_string();
                let mut c = c.with_authorization(token.clone());
                async move { c.list_apis(false, &tenant).await }
            })
            .await
    }

    async fn get(&self, token: &Token, name: &str) -> Result<cp::ApiReply, Status> {
        let list = self.list(token, "").await?;
        let api = list
            .apis
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| Status::not_found(format!("there is no API {name}")))?;
        Ok(cp::ApiReply {
            api: Some(api),
            generation: list.generation,
        })
    }

    /// Writes one access command for `tenant`.
    async fn access(
        &self,
        token: &Token,
        tenant: &str,
        op: state::access_command::Op,
    ) -> Result<tollgate_sdk::WriteResponse, Status> {
        check_size("the tenant name", tenant, 256)?;
        let kind = state::command::Kind::Access(state::AccessCommand {
            tenant: tenant.to_string(),
            op: Some(op),
        });
        self.command(token, kind).await
    }

    async fn tenant(
        &self,
        token: &Token,
        name: &str,
        generation: u64,
    ) -> Result<cp::TenantReply, Status> {
        let list = self
            .inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(token.clone());
                async move { c.list_tenants(false).await }
            })
            .await?;
        Ok(cp::TenantReply {
            tenant: list.tenants.into_iter().find(|t| t.name == name),
            generation: generation.max(list.generation),
            subscription: None,
        })
    }

    /// The subscriptions the token may see, of `tenant` to `api` (empty: all).
    async fn subscriptions(
        &self,
        token: &Token,
        tenant: &str,
        api: &str,
    ) -> Result<Vec<state::SubscriptionView>, Status> {
        let req = tollgate_sdk::NodeListSubscriptionsRequest {
            local: false,
            tenant: tenant.to_string(),
            api: api.to_string(),
        };
        Ok(self
            .inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(token.clone());
                let req = req.clone();
                async move { c.list_subscriptions(req).await }
            })
            .await?
            .subscriptions)
    }

    async fn credentials(
        &self,
        token: &Token,
        kind: &str,
        tenant: &str,
        all: bool,
    ) -> Result<Vec<state::CredentialState>, Status> {
        check_size("the tenant name", tenant, 256)?;
        let req = tollgate_sdk::NodeListCredentialsRequest {
            local: false,
            tenant: tenant.to_string(),
            kind: kind.to_string(),
            all,
        };
        Ok(self
            .inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(token.clone());
                let req = req.clone();
                async move { c.list_credentials(req).await }
            })
            .await?
            .credentials)
    }

    async fn credential(
        &self,
        token: &Token,
        kind: &str,
        tenant: &str,
        id: &str,
        written: tollgate_sdk::WriteResponse,
    ) -> Result<cp::CredentialReply, Status> {
        let credential = self
            .credentials(token, kind, tenant, true)
            .await?
            .into_iter()
            .find(|c| c.id == id);
        Ok(cp::CredentialReply {
            credential,
            secret: written.secret,
            generation: written.generation,
        })
    }

    async fn create_credential(
        &self,
        token: &Token,
        kind: &str,
        r: cp::CreateCredentialRequest,
    ) -> Result<cp::CredentialReply, Status> {
        check_size("the label", &r.name, 128)?;
        let expires_at_ms = match r.expires_at.as_str() {
            "" => 0,
            text => chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "expires_at {text:?} is not an RFC 3339 time ({e}); write it like 2027-06-30T00:00:00Z"
                    ))
                })?
                .timestamp_millis()
                .max(1) as u64,
        };
        check_size(
            "the client certificate",
            &r.client_certificate,
            tollgate_node::state::tls::MAX_CLIENT_CERTIFICATE_BYTES,
        )?;
        if !r.client_certificate.is_empty() && kind != "key" {
            return Err(Status::invalid_argument(
                "only an API key can be a client certificate; leave client_certificate empty",
            ));
        }
        if !r.models.is_empty() && kind != "key" {
            return Err(Status::invalid_argument(
                "only an API key can be limited to models; leave models empty",
            ));
        }
        let cred = state::CreateCredential {
            name: r.name,
            expires_at_ms,
            client_certificate: r.client_certificate,
            models: r.models,
            ..Default::default()
        };
        let op = if kind == "key" {
            state::access_command::Op::CreateKey(cred)
        } else {
            state::access_command::Op::CreateToken(cred)
        };
        let written = self.access(token, &r.tenant, op).await?;
        let id = written.credential_id.clone();
        self.credential(token, kind, &r.tenant, &id, written).await
    }

    async fn revoke(
        &self,
        token: &Token,
        kind: &str,
        r: cp::RevokeRequest,
    ) -> Result<cp::CredentialReply, Status> {
        check_size("the id", &r.id, 64)?;
        let revoke = state::Revoke { id: r.id.clone() };
        let op = if kind == "key" {
            state::access_command::Op::RevokeKey(revoke)
        } else {
            state::access_command::Op::RevokeToken(revoke)
        };
        let written = self.access(token, &r.tenant, op).await?;
        self.credential(token, kind, &r.tenant, &r.id, written)
            .await
    }
}

fn check_size(what: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes, over the limit of {max}",
            value.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl ApiLifecycle for Service {
    async fn create_api(
        &self,
        req: Request<cp::CreateApiRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.name, 256)?;
        check_size("the tenant name", &r.tenant, 256)?;
        let op = state::api_command::Op::CreateApi(state::CreateApi {
            tenant: r.tenant,
            settings: r.settings,
        });
        Ok(Response::new(self.write(&t, &r.name, op).await?))
    }

    async fn update_api(
        &self,
        req: Request<cp::UpdateApiRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.name, 256)?;
        let Some(settings) = r.settings else {
            return Err(Status::invalid_argument(
                "give the settings: hosts, base_path, auth, sticky",
            ));
        };
        let op = state::api_command::Op::UpdateApi(state::UpdateApi {
            settings: Some(settings),
        });
        Ok(Response::new(self.write(&t, &r.name, op).await?))
    }

    async fn get_api(
        &self,
        req: Request<cp::GetApiRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.name, 256)?;
        Ok(Response::new(self.get(&t, &r.name).await?))
    }

    async fn list_apis(
        &self,
        req: Request<cp::ListApisRequest>,
    ) -> Result<Response<cp::ListApisReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the tenant name", &r.tenant, 256)?;
        check_size("after", &r.after, 256)?;
        // One page at a time: a whole listing may not fit in one message.
        let page = self
            .inner
            .nodes
            .call(|c| {
                let (tenant, after) = (r.tenant.clone(), r.after.clone());
                let mut c = c.with_authorization(t.clone());
                async move { c.list_apis_page(false, &tenant, &after).await }
            })
            .await?;
        Ok(Response::new(cp::ListApisReply {
            apis: page.apis,
            next: page.next,
        }))
    }

    async fn create_version(
        &self,
        req: Request<cp::CreateVersionRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the version", &r.version, 256)?;
        let op = state::api_command::Op::CreateVersion(state::CreateVersion {
            version: r.version,
            content: r.content,
        });
        Ok(Response::new(self.write(&t, &r.api, op).await?))
    }

    async fn transition_version(
        &self,
        req: Request<cp::TransitionVersionRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        let Some(transition) = r.transition else {
            return Err(Status::invalid_argument(
                "say which transition: edit, publish, deprecate, retire or discard",
            ));
        };
        let op = state::api_command::Op::Transition(transition);
        Ok(Response::new(self.write(&t, &r.api, op).await?))
    }

    async fn set_split(
        &self,
        req: Request<cp::SetSplitRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        let op = state::api_command::Op::SetSplit(state::SetSplit { weights: r.weights });
        Ok(Response::new(self.write(&t, &r.api, op).await?))
    }

    async fn promote(
        &self,
        req: Request<cp::PromoteRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        let op = state::api_command::Op::Promote(state::Promote { version: r.version });
        Ok(Response::new(self.write(&t, &r.api, op).await?))
    }

    async fn rollback(
        &self,
        req: Request<cp::RollbackRequest>,
    ) -> Result<Response<cp::ApiReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        let op = state::api_command::Op::Rollback(state::Rollback {});
        Ok(Response::new(self.write(&t, &r.api, op).await?))
    }
}

#[tonic::async_trait]
impl Access for Service {
    async fn create_tenant(
        &self,
        req: Request<cp::CreateTenantRequest>,
    ) -> Result<Response<cp::TenantReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        let op = state::access_command::Op::CreateTenant(state::CreateTenant {});
        let written = self.access(&t, &r.name, op).await?;
        Ok(Response::new(
            self.tenant(&t, &r.name, written.generation).await?,
        ))
    }

    async fn delete_tenant(
        &self,
        req: Request<cp::DeleteTenantRequest>,
    ) -> Result<Response<cp::TenantReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        let op = state::access_command::Op::DeleteTenant(state::DeleteTenant {});
        let written = self.access(&t, &r.name, op).await?;
        Ok(Response::new(cp::TenantReply {
            tenant: None,
            generation: written.generation,
            subscription: None,
        }))
    }

    async fn list_tenants(
        &self,
        req: Request<cp::ListTenantsRequest>,
    ) -> Result<Response<cp::ListTenantsReply>, Status> {
        let t = token(&req);
        let list = self
            .inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(t.clone());
                async move { c.list_tenants(false).await }
            })
            .await?;
        Ok(Response::new(cp::ListTenantsReply {
            tenants: list.tenants,
        }))
    }

    async fn create_key(
        &self,
        req: Request<cp::CreateCredentialRequest>,
    ) -> Result<Response<cp::CredentialReply>, Status> {
        let t = token(&req);
        Ok(Response::new(
            self.create_credential(&t, "key", req.into_inner()).await?,
        ))
    }

    async fn list_keys(
        &self,
        req: Request<cp::ListCredentialsRequest>,
    ) -> Result<Response<cp::ListCredentialsReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        Ok(Response::new(cp::ListCredentialsReply {
            credentials: self.credentials(&t, "key", &r.tenant, r.all).await?,
        }))
    }

    async fn revoke_key(
        &self,
        req: Request<cp::RevokeRequest>,
    ) -> Result<Response<cp::CredentialReply>, Status> {
        let t = token(&req);
        Ok(Response::new(
            self.revoke(&t, "key", req.into_inner()).await?,
        ))
    }

    async fn create_token(
        &self,
        req: Request<cp::CreateCredentialRequest>,
    ) -> Result<Response<cp::CredentialReply>, Status> {
        let t = token(&req);
        Ok(Response::new(
            self.create_credential(&t, "token", req.into_inner())
                .await?,
        ))
    }

    async fn list_tokens(
        &self,
        req: Request<cp::ListCredentialsRequest>,
    ) -> Result<Response<cp::ListCredentialsReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        Ok(Response::new(cp::ListCredentialsReply {
            credentials: self.credentials(&t, "token", &r.tenant, r.all).await?,
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<cp::RevokeRequest>,
    ) -> Result<Response<cp::CredentialReply>, Status> {
        let t = token(&req);
        Ok(Response::new(
            self.revoke(&t, "token", req.into_inner()).await?,
        ))
    }

    async fn subscribe(
        &self,
        req: Request<cp::SubscribeRequest>,
    ) -> Result<Response<cp::TenantReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        check_size("the versions", &r.versions, 256)?;
        // Who asks (the operator, the API's owner, the tenant) is the node's to say, from
        // the token: never sent from here.
        let op = state::access_command::Op::Subscribe(state::Subscribe {
            api: r.api.clone(),
            versions: r.versions,
            accept: r.accept,
            ..Default::default()
        });
        let written = self.access(&t, &r.tenant, op).await?;
        let subscription = self
            .subscriptions(&t, &r.tenant, &r.api)
            .await?
            .into_iter()
            .next();
        Ok(Response::new(cp::TenantReply {
            // The API's owner may not see the subscribing tenant itself.
            tenant: None,
            generation: written.generation,
            subscription,
        }))
    }

    async fn list_subscriptions(
        &self,
        req: Request<cp::ListSubscriptionsRequest>,
    ) -> Result<Response<cp::ListSubscriptionsReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the tenant name", &r.tenant, 256)?;
        check_size("the API name", &r.api, 256)?;
        Ok(Response::new(cp::ListSubscriptionsReply {
            subscriptions: self.subscriptions(&t, &r.tenant, &r.api).await?,
        }))
    }

    async fn unsubscribe(
        &self,
        req: Request<cp::UnsubscribeRequest>,
    ) -> Result<Response<cp::TenantReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        let op = state::access_command::Op::Unsubscribe(state::Unsubscribe {
            api: r.api,
            ..Default::default()
        });
        let written = self.access(&t, &r.tenant, op).await?;
        Ok(Response::new(cp::TenantReply {
            tenant: None,
            generation: written.generation,
            subscription: None,
        }))
    }
}

#[tonic::async_trait]
impl Audit for Service {
    async fn query(
        &self,
        req: Request<cp::AuditQuery>,
    ) -> Result<Response<cp::AuditReply>, Status> {
        let t = token(&req);
        let q = req.into_inner();
        check_size("the object prefix", &q.object_prefix, 512)?;
        check_size("the actor", &q.actor, 512)?;
        let since_ms = match q.since.as_str() {
            "" => 0,
            text => chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "since {text:?} is not an RFC 3339 time ({e}); write it like 2026-11-29T00:00:00Z"
                    ))
                })?
                .timestamp_millis()
                .max(0) as u64,
        };
        let node_req = tollgate_sdk::NodeAuditRequest {
            local: false,
            after_seq: q.after_seq,
            limit: q.limit,
            object_prefix: q.object_prefix,
            actor: q.actor,
            since_ms,
        };
        let resp = self
            .inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(t.clone());
                let r = node_req.clone();
                async move { c.audit(r).await }
            })
            .await?;
        Ok(Response::new(cp::AuditReply {
            entries: resp.entries,
        }))
    }
}

#[tonic::async_trait]
impl Circuits for Service {
    async fn list_circuits(
        &self,
        req: Request<cp::ListCircuitsRequest>,
    ) -> Result<Response<cp::ListCircuitsReply>, Status> {
        let resp = self.circuits(&token(&req)).await?;
        Ok(Response::new(cp::ListCircuitsReply {
            circuits: resp.circuits,
            now_ms: resp.now_ms,
        }))
    }

    async fn force_circuit(
        &self,
        req: Request<cp::ForceCircuitRequest>,
    ) -> Result<Response<cp::ForceCircuitReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the upstream", &r.upstream, 512)?;
        check_size("the reason", &r.reason, 4096)?;
        if r.upstream.is_empty() {
            return Err(Status::invalid_argument(
                "upstream is empty; name a spec upstream or api@version/upstream",
            ));
        }
        let kind = state::command::Kind::Circuit(state::CircuitCommand {
            upstream: r.upstream,
            op: Some(state::circuit_command::Op::Force(state::CircuitForce {
                mode: r.mode,
                reason: r.reason,
            })),
        });
        let written = self.command(&t, kind).await?;
        Ok(Response::new(cp::ForceCircuitReply {
            generation: written.generation,
        }))
    }
}

/// The control plane's own gRPC services, as registered: reflection lists them, their
/// calls are traced, and `tollgate dev`'s banner names them from this list.
pub const SERVICES: [&str; 9] = [
    <ApiLifecycleServer<Service> as NamedService>::NAME,
    <AccessServer<Service> as NamedService>::NAME,
    <AuditServer<Service> as NamedService>::NAME,
    <CircuitsServer<Service> as NamedService>::NAME,
    <BillingServer<Service> as NamedService>::NAME,
    <tollgate_proto::cp::v1::models_server::ModelsServer<Service> as NamedService>::NAME,
    <tollgate_proto::cp::v1::calls_server::CallsServer<Service> as NamedService>::NAME,
    <tollgate_proto::cp::v1::analysis_server::AnalysisServer<Service> as NamedService>::NAME,
    <tollgate_proto::cp::v1::rollouts_server::RolloutsServer<Service> as NamedService>::NAME,
];

pub use tollgate_node::admin::grpc::STANDARD_SERVICES;

/// This server, as named in its UNIMPLEMENTED answers.
const THIS: &str = "the Tollgate control plane (tollgate.cp.v1: ApiLifecycle, Access, Audit, \
     Circuits, Billing, Models, Calls, Analysis, Rollouts)";

/// Serves the control plane on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    nodes: Nodes,
    tls: Option<Arc<tollgate_node::identity::tls::TlsState>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let service = Service::new(nodes);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ApiLifecycleServer<Service>>().await;
    health.set_serving::<AccessServer<Service>>().await;
    health.set_serving::<AuditServer<Service>>().await;
    health.set_serving::<CircuitsServer<Service>>().await;
    health.set_serving::<BillingServer<Service>>().await;
    health
        .set_serving::<tollgate_proto::cp::v1::calls_server::CallsServer<Service>>()
        .await;
    health
        .set_serving::<tollgate_proto::cp::v1::analysis_server::AnalysisServer<Service>>()
        .await;
    health
        .set_serving::<tollgate_proto::cp::v1::rollouts_server::RolloutsServer<Service>>()
        .await;
    // Reflection lists exactly what this server serves; v1alpha too, since grpcurl and
    // Python's grpcio-reflection still ask for it.
    let reflection = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tollgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in SERVICES.into_iter().chain(STANDARD_SERVICES) {
            b = b.with_service_name(name);
        }
        b
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;
    let server = tonic::transport::Server::builder()
        .trace_fn(|req| traces::grpc_server_span(req, &SERVICES))
        .layer(tollgate_node::admin::grpc::SayWhatToChange::layer(THIS))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha);
    // Exactly the servers SERVICES names.
    let server = server
        .add_service(ApiLifecycleServer::new(service.clone()))
        .add_service(AccessServer::new(service.clone()))
        .add_service(AuditServer::new(service.clone()))
        .add_service(CircuitsServer::new(service.clone()))
        .add_service(BillingServer::new(service.clone()))
        .add_service(tollgate_proto::cp::v1::calls_server::CallsServer::new(
            service.clone(),
        ))
        .add_service(tollgate_proto::cp::v1::analysis_server::AnalysisServer::new(service.clone()))
        .add_service(tollgate_proto::cp::v1::rollouts_server::RolloutsServer::new(service.clone()))
        .add_service(tollgate_proto::cp::v1::models_server::ModelsServer::new(
            service,
        ));
    match tls {
        Some(tls) => {
            let config = tls.server_config().map_err(|e| anyhow::anyhow!(e))?;
            let incoming =
                tollgate_node::identity::tls::incoming(listener, config, shutdown.clone());
            server
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await?
        }
        None => {
            server
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown.cancelled_owned(),
                )
                .await?
        }
    }
    Ok(())
}

/// `tollgate-cp`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CpArgs {
    /// Where to serve the control-plane gRPC API.
    #[arg(long, env = "TOLLGATE_CP_ADDR", default_value = "127.0.0.1:7080")]
    pub listen: SocketAddr,
    /// Node gRPC addresses to read and write the cluster through (comma-separated; any
    /// members: writes are forwarded to the leader).
    #[arg(
        long,
        env = "TOLLGATE_NODES",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    pub nodes: Vec<String>,
    /// Write the bound address here once listening (for scripts and tests).
    #[arg(long, env = "TOLLGATE_CP_ADDR_FILE")]
    pub addr_file: Option<std::path::PathBuf>,
    /// Export traces over OTLP to this collector, e.g. `http://collector:4317` (else
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; none: no traces).
    #[arg(long, env = "TOLLGATE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: `grpc` or `http/protobuf` (else OTEL_EXPORTER_OTLP_PROTOCOL).
    #[arg(long, env = "TOLLGATE_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Share of new traces to keep, 0 to 1 (else OTEL_TRACES_SAMPLER[_ARG]).
    #[arg(long, env = "TOLLGATE_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
    /// `deployment.environment` of the traces.
    #[arg(long, env = "TOLLGATE_ENVIRONMENT", default_value = "production")]
    pub environment: String,
    /// A join token (`tollgate cluster join-token create`): the control plane enrolls with
    /// it at start, gets a certificate from the cluster CA and serves TLS with it, and
    /// verifies nodes with the CA the token names.
    #[arg(long, env = "TOLLGATE_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Read the join token from this file, waiting up to 2 minutes for it to appear.
    #[arg(long, env = "TOLLGATE_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<std::path::PathBuf>,
    /// Names clients reach this control plane by (host names or IP addresses,
    /// comma-separated), put in its certificate beside localhost and the loopback
    /// addresses [default: the --listen host when it is not 0.0.0.0]
    #[arg(long = "cert-name", env = "TOLLGATE_CERT_NAMES", value_delimiter = ',')]
    pub cert_names: Vec<String>,
    /// Plain text to nodes and to clients, for a cluster run with --insecure-cluster.
    #[arg(long, env = "TOLLGATE_INSECURE")]
    pub insecure: bool,
    /// A certificate already issued (`tollgate dev` runs a node in the same process).
    #[arg(skip)]
    pub identity: Option<CpIdentity>,
}

/// A control plane's certificate chain (leaf, CA), its key (PKCS#8 DER) and the CA.
#[derive(Clone)]
pub struct CpIdentity {
    pub cert_chain_pem: String,
    pub key_der: Vec<u8>,
    pub ca_pem: String,
}

impl std::fmt::Debug for CpIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpIdentity").finish_non_exhaustive()
    }
}

/// The names a control plane's certificate carries.
fn cert_names(args: &CpArgs) -> Vec<String> {
    let mut names = args.cert_names.clone();
    if !args.listen.ip().is_unspecified() {
        names.push(args.listen.ip().to_string());
    }
    names
}

/// Enrolls this control plane with its join token through the first node that answers.
async fn enroll(args: &CpArgs, token: &str) -> anyhow::Result<CpIdentity> {
    use tollgate_node::identity::{JoinToken, ca, request_certificate, tls::TlsState};
    let parsed = JoinToken::parse(token).map_err(|e| anyhow::anyhow!("--join-token: {e}"))?;
    let tls = Arc::new(TlsState::default());
    tls.pin(&parsed.ca_fingerprint);
    let (key, csr) = ca::new_key_and_csr().map_err(|e| anyhow::anyhow!(e))?;
    let req = tollgate_proto::node::v1::EnrollRequest {
        join_token: token.trim().to_string(),
        node_id: 0,
        control_plane: true,
        csr_pem: csr,
        names: cert_names(args),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut last = String::new();
        for addr in &args.nodes {
            match request_certificate(&tls, addr, req.clone()).await {
                Ok(resp) => {
                    tracing::info!(
                        node = addr,
                        "enrolled: serving TLS with a certificate from the cluster CA"
                    );
                    return Ok(CpIdentity {
                        cert_chain_pem: resp.cert_chain_pem,
                        key_der: key.serialize_der(),
                        ca_pem: resp.ca_cert_pem,
                    });
                }
                Err(s)
                    if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown =>
                {
                    last = format!("{addr}: {}", s.message());
                }
                Err(s) => anyhow::bail!("enrolling through {addr} was refused: {}", s.message()),
            }
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("could not enroll within 120s; last: {last}");
        }
        tracing::info!("not enrolled yet, retrying: {last}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads a join token from a file, waiting (up to 2 minutes) for it to appear.
async fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match tokio::fs::read_to_string(path).await {
            Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot read the join token at {}: {e}", path.display()),
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "no join token appeared at {} within 2 minutes (--join-token-file)",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Renews the control plane's certificate with itself (no token) once a third of its
/// life is left.
async fn keep_certificate(
    tls: Arc<tollgate_node::identity::tls::TlsState>,
    args: CpArgs,
    mut not_after_ms: u64,
    mut issued_at_ms: u64,
    stop: CancellationToken,
) {
    use tollgate_node::identity::{ca, request_certificate};
    loop {
        let life = not_after_ms.saturating_sub(issued_at_ms);
        let due = not_after_ms.saturating_sub(life / 3);
        let now = tollgate_node::raft::service::now_ms();
        let wait = Duration::from_millis(due.saturating_sub(now).max(1000));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Ok((key, csr)) = ca::new_key_and_csr() else {
            continue;
        };
        let req = tollgate_proto::node::v1::EnrollRequest {
            control_plane: true,
            csr_pem: csr,
            names: cert_names(&args),
            ..Default::default()
        };
        for addr in &args.nodes {
            match request_certificate(&tls, addr, req.clone()).await {
                Ok(resp) => {
                    let chain = ca::pem_certs(&resp.cert_chain_pem).unwrap_or_default();
                    let Some(leaf) = chain.first().and_then(|c| ca::parse_peer(c).ok()) else {
                        break;
                    };
                    if tls.present(chain, key.serialize_der()).is_ok() {
                        (not_after_ms, issued_at_ms) = (leaf.not_after_ms, leaf.issued_at_ms);
                        tracing::info!("renewed the control plane's certificate");
                    }
                    break;
                }
                Err(s) => tracing::warn!(
                    node = addr,
                    "cannot renew the control plane's certificate: {}",
                    s.message()
                ),
            }
        }
    }
}

/// Starts trace export when the flags or the `OTEL_*` environment ask for it; call before
/// the log is set up. A bad setting is an error that says what to write.
pub fn start_traces(args: &CpArgs) -> anyhow::Result<()> {
    let config = traces::resolve(
        &traces::TraceArgs {
            endpoint: args.otlp_endpoint.clone(),
            protocol: args.otlp_protocol.clone(),
            sample_ratio: args.trace_sample_ratio,
        },
        &|k| std::env::var(k).ok(),
    )
    .map_err(|e| anyhow::anyhow!("invalid control-plane settings: {e}"))?;
    if let Some(config) = config {
        traces::install(
            &config,
            &traces::Identity {
                service: "tollgate-cp",
                instance: if args.listen.port() == 0 {
                    format!("cp-pid-{}", std::process::id())
                } else {
                    format!("cp-{}", args.listen)
                },
                region: None,
                environment: args.environment.clone(),
            },
        )?;
    }
    Ok(())
}

/// Opens the control plane's listener, with an error that says what to do when the
/// address is taken.
pub fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| tollgate_node::listen_error("control plane", addr, flag, e))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Runs the control plane until SIGTERM or Ctrl-C.
pub fn run(args: CpArgs) -> anyhow::Result<()> {
    let listener = bind(args.listen, "--listen")?;
    run_on(args, listener)
}

/// Runs the control plane on a listener already open (see [`bind`]) until SIGTERM or
/// Ctrl-C.
pub fn run_on(args: CpArgs, listener: std::net::TcpListener) -> anyhow::Result<()> {
    tollgate_node::identity::tls::install_default_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (tls, node_tls) = if args.insecure {
            tracing::warn!("INSECURE: --insecure is set: plain text to nodes and to clients");
            (None, tollgate_sdk::Tls::plaintext())
        } else {
            let token = match (&args.join_token, &args.join_token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(file)) => Some(read_token_file(file).await?),
                (None, None) => None,
            };
            let identity = match (&args.identity, &token) {
                (Some(i), _) => i.clone(),
                (None, Some(token)) => enroll(&args, token).await?,
                (None, None) => anyhow::bail!(
                    "the control plane serves TLS with a certificate from the cluster CA: give it \
                     a join token with --join-token (TOLLGATE_JOIN_TOKEN; make one with \
                     `tollgate cluster join-token create`), or run it with --insecure for a \
                     cluster run with --insecure-cluster"
                ),
            };
            use tollgate_node::identity::{ca, tls::TlsState};
            let state = Arc::new(TlsState::default());
            let chain = ca::pem_certs(&identity.cert_chain_pem).map_err(|e| anyhow::anyhow!(e))?;
            let leaf = ca::parse_peer(&chain[0]).map_err(|e| anyhow::anyhow!(e))?;
            state
                .trust(&ca::pem_certs(&identity.ca_pem).map_err(|e| anyhow::anyhow!(e))?)
                .map_err(|e| anyhow::anyhow!(e))?;
            state
                .present(chain, identity.key_der.clone())
                .map_err(|e| anyhow::anyhow!(e))?;
            tokio::spawn(keep_certificate(
                state.clone(),
                args.clone(),
                leaf.not_after_ms,
                leaf.issued_at_ms,
                shutdown.clone(),
            ));
            (Some(state), tollgate_sdk::Tls::ca_pem(&identity.ca_pem))
        };
        let nodes = Nodes::new(&args.nodes, &node_tls).map_err(|e| anyhow::anyhow!(e))?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        if let Some(path) = &args.addr_file {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, addr.to_string())?;
            std::fs::rename(&tmp, path)?;
        }
        tracing::info!(%addr, nodes = ?args.nodes, tls = tls.is_some(), "tollgate-cp serving");
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            }
            stop.cancel();
        });
        serve(listener, nodes, tls, shutdown).await
    })?;
    traces::shutdown(Duration::from_secs(3));
    Ok(())
}
