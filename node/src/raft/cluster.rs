//! What a node does as a cluster member, for the node admin API, startup and signals:
//! bootstrap and join, writes (forwarded to the leader), linearizable reads, removal,
//! status and health.
//!
//! Errors are gRPC statuses phrased for the caller: INVALID_ARGUMENT lists every problem in
//! a spec; UNAVAILABLE says there is no leader (with the leader's address in the
//! `x-tollgate-leader` metadata when it is known) or that a write was not committed in time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio_util::sync::CancellationToken;
use tollgate_proto::node::v1 as api;
use tollgate_proto::node::v1::node_admin_client::NodeAdminClient;
use tracing::Instrument;

use crate::telemetry::traces;
use tollgate_proto::state::v1::Change;
use tonic::Status;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::log_store::LogStore;
use super::network::{Faults, MAX_MESSAGE_BYTES, Network, Peers};
use super::service::{RaftService, now_ms};
use super::state_machine::StateMachineStore;
use super::{NodeId, NodeInfo, Raft, RaftSettings};
use crate::auth::principal::{Caller, Principal, authenticate, authorize, stamp};
use crate::identity::ca::{Ca, Subject};
use crate::identity::{self, Identity, JoinToken};
use crate::state::access::{self, KEY_PREFIX, TOKEN_PREFIX, mint, new_hash_key, tenant_to_proto};
use crate::state::egress::{Member, OwnAddrs, TenantUpstreams, members_need_dns};
use crate::state::lifecycle::{Stage, content_digest, parse_version};
use crate::state::machine::{Applied, CheckedSpec, check_parsed, parse_checked, put_spec_command};
use crate::state::spec::needs_dns;
use tollgate_proto::state::v1::identity_command::Op as IdentityOp;

mod elastic;
pub use elastic::Liveness;

/// Metadata key naming the leader's gRPC address on UNAVAILABLE answers.
pub const LEADER_METADATA: &str = "x-tollgate-leader";
/// Metadata key marking a request one node forwarded to another (never forwarded twice).
/// Honoured only from a node's certificate.
pub const FORWARDED_METADATA: &str = "x-tollgate-forwarded-by";
/// Metadata key of a node's own write (no token): the leader takes the node's identity
/// from its certificate, and refuses the key from anyone else.
pub const AS_NODE_METADATA: &str = "x-tollgate-as-node";

/// The most bytes of APIs one ListApis page holds (under gRPC's 4 MiB default, with room;
/// an API holds at most 3 MiB of versions, so one always fits).
const LIST_PAGE_BYTES: usize = 3_500_000;

/// How long a write may wait for a leader to be elected before UNAVAILABLE.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// How long a write may wait to be committed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a join may take to add and catch up a learner.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// For this long after a node starts, a failed join attempt is logged at INFO: nodes
/// started together wait for each other, and that is not worth a warning.
const JOIN_QUIET: Duration = Duration::from_secs(30);

pub struct Cluster {
    pub id: NodeId,
    pub info: NodeInfo,
    pub raft: Raft,
    pub state_machine: StateMachineStore,
    pub log: LogStore,
    pub peers: Arc<Peers>,
    pub settings: RaftSettings,
    pub max_spec_bytes: usize,
    /// When this node last heard from a leader (ms since the epoch); start time until then.
    pub last_leader_contact_ms: Arc<AtomicU64>,
    /// Held by a join or a removal on the leader from its first membership change to its
    /// last: openraft refuses a change while another is in flight, and two joins that both
    /// counted the voters before either promoted would grow the cluster past `--voters`.
    membership: tokio::sync::Mutex<()>,
    /// Calls into Raft in flight: [`Cluster::shutdown`] refuses new ones and lets these
    /// finish before it stops Raft.
    pub gate: Arc<Gate>,
    /// This node's certificate, the CA it trusts, and its sealing keys.
    pub identity: Arc<Identity>,
    /// The data directory (incoming snapshots are written there while they arrive).
    pub data_dir: std::path::PathBuf,
    receiving: Arc<tokio::sync::Mutex<()>>,
    /// The cluster's voter policy as this node holds it (`--voters`): a leader promotes a
    /// joining node while there are fewer voters than this.
    pub voters: u32,
    /// Which peers have stopped answering (the actor exchanges keep it).
    pub liveness: elastic::Liveness,
    /// Dead voters this leader has said it cannot replace (said once per outage).
    stranded: std::sync::Mutex<BTreeSet<NodeId>>,
}

/// Counts the calls into Raft in flight (writes, linearizable reads, membership changes,
/// peers' Raft RPCs), and refuses new ones once the node is shutting down. A call cut off
/// by the stop would fail for nothing (and openraft logs it as an error).
#[derive(Debug, Default)]
pub struct Gate {
    calls: AtomicUsize,
    closing: AtomicBool,
}

/// One call into Raft, counted while it runs.
pub struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// Counts a call; refused once the node is shutting down.
    pub fn enter(&self, node: NodeId) -> Result<InFlight<'_>, Status> {
        self.calls.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self);
        if self.closing.load(Ordering::Acquire) {
            return Err(Status::unavailable(format!(
                "node {node} is shutting down; send this to another node"
            )));
        }
        Ok(guard)
    }

    /// Refuses new calls, then waits (at most `wait`) for those in flight.
    async fn close(&self, wait: Duration) {
        self.closing.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + wait;
        while self.calls.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Where a request that must run on the leader goes.
enum Target {
    Local,
    /// The leader this node knows of, and a client for it.
    Leader(NodeId, NodeAdminClient<Channel>),
}

/// How a node runs as a cluster member (from its settings).
pub struct Options {
    pub raft: RaftSettings,
    /// `--enable-fault-injection` (tests only).
    pub fault_injection: bool,
    pub max_spec_bytes: usize,
    /// `--voters`: the cluster's voter policy when this node leads.
    pub voters: u32,
    /// The data directory (incoming snapshots are written there).
    pub data_dir: std::path::PathBuf,
}

impl Cluster {
    pub async fn start(
        id: NodeId,
        info: NodeInfo,
        db: &sled::Db,
        options: Options,
        identity: Arc<Identity>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let Options {
            raft: settings,
            fault_injection,
            max_spec_bytes,
            voters,
            data_dir,
        } = options;
        let log = LogStore::open(db)?;
        let state_machine = StateMachineStore::open(db)?;
        let tls = if identity.secure {
            Some(
                identity
                    .tls
                    .client_config()
                    .map_err(|e| anyhow::anyhow!(e))?,
            )
        } else {
            None
        };
        let peers = Arc::new(Peers::new(Faults::new(fault_injection), tls));
        let config = Arc::new(settings.openraft_config()?);
        let raft = Raft::new(
            id,
            config,
            Network {
                peers: peers.clone(),
            },
            log.clone(),
            state_machine.clone(),
        )
        .await?;
        let persist = log.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Err(e) = persist.persist_committed() {
                    tracing::warn!("cannot record the committed index: {e:#}");
                }
            }
        });
        Ok(Arc::new(Cluster {
            id,
            info,
            raft,
            state_machine,
            log,
            peers,
            settings,
            max_spec_bytes,
            last_leader_contact_ms: Arc::new(AtomicU64::new(now_ms())),
            membership: tokio::sync::Mutex::new(()),
            gate: Arc::default(),
            identity,
            voters,
            data_dir,
            receiving: Arc::default(),
            liveness: Liveness::default(),
            stranded: Default::default(),
        }))
    }

    pub fn raft_service(&self) -> RaftService {
        RaftService {
            raft: self.raft.clone(),
            peers: self.peers.clone(),
            gate: self.gate.clone(),
            id: self.id,
            last_leader_contact_ms: self.last_leader_contact_ms.clone(),
            identity: self.identity.clone(),
            state_machine: self.state_machine.clone(),
            snapshot_dir: self.data_dir.clone(),
            receiving: self.receiving.clone(),
        }
    }

    /// Starts a new single-voter cluster with this node, unless this node's store already
    /// belongs to one (a restart must never initialize again: a second `initialize()` can
    /// cause election loops or a split brain; docs/architecture.md, decision 10).
    pub async fn bootstrap(&self) -> anyhow::Result<bool> {
        if self.raft.is_initialized().await? {
            return Ok(false);
        }
        let members = BTreeMap::from([(self.id, self.info.clone())]);
        self.raft.initialize(members).await?;
        Ok(true)
    }

    /// Keeps asking `peer` to let this node join until it has (a restarted member asks
    /// too: joining is idempotent and may promote it).
    pub fn spawn_join(self: &Arc<Self>, peer: String, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut delay = Duration::from_millis(200);
            loop {
                match this.join_via(&peer).await {
                    Ok(resp) => {
                        tracing::info!(peer, role = %resp.role, leader = resp.leader, "joined the cluster");
                        return;
                    }
                    // Peers starting together wait for each other for a while: normal.
                    Err(e) if started.elapsed() < JOIN_QUIET => {
                        tracing::info!(peer, "not joined yet, retrying in {delay:?}: {e}")
                    }
                    Err(e) => tracing::warn!(peer, "join failed, retrying in {delay:?}: {e}"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Whether `peer` is a Tollgate node's gRPC port. `Err` says what it is instead when
    /// something else answered (a node's admin or proxy port, another program): retrying
    /// would never join. Nothing answering is not an error: the peer may be starting.
    pub async fn check_peer(&self, peer: &str) -> Result<(), String> {
        let mut client = NodeAdminClient::new(self.peers.channel(peer)?);
        let mut req = tonic::Request::new(api::StatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        let Err(s) = client.status(req).await else {
            return Ok(());
        };
        let server = tollgate_sdk::Server::Node;
        let err = tollgate_sdk::Error::classify(s, peer, server);
        match tollgate_sdk::explain(err, peer, server, self.identity.secure).await {
            tollgate_sdk::Error::WrongServer { answer, .. } => Err(format!(
                "--join {peer} is not a Tollgate node's gRPC port ({answer}). Join through a \
                 member's gRPC address: its --grpc-addr, 127.0.0.1:7070 by default"
            )),
            _ => Ok(()),
        }
    }

    async fn join_via(&self, peer: &str) -> Result<api::JoinResponse, String> {
        let channel = self.peers.channel(peer)?;
        let mut client = NodeAdminClient::new(channel);
        let mut req = tonic::Request::new(api::JoinRequest {
            node_id: self.id,
            grpc_addr: self.info.grpc_addr.clone(),
            region: self.info.region.clone(),
            proxy_addr: self.info.proxy_addr.clone(),
            admin_addr: self.info.admin_addr.clone(),
            max_voters: 0,
        });
        req.set_timeout(JOIN_TIMEOUT + Duration::from_secs(5));
        client
            .join(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }

    /// Waits (briefly) for a leader and says where a leader-only request must go.
    async fn target(&self, forwarded: bool) -> Result<Target, Status> {
        let metrics = self
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "no leader: node {} has not seen an elected leader within {LEADER_WAIT:?}; \
                     the cluster may have lost its quorum. Retry, or check `tollgate cluster status`",
                    self.id
                ))
            })?;
        let leader = metrics.current_leader.expect("waited for a leader");
        if leader == self.id {
            return Ok(Target::Local);
        }
        let addr = grpc_addr(&metrics, leader);
        if forwarded {
            return Err(not_leader(self.id, leader, &addr));
        }
        if self.peers.faults.is_isolated(leader) {
            return Err(with_leader(
                Status::unavailable(format!(
                    "node {} cannot reach the leader (node {leader})",
                    self.id
                )),
                &addr,
            ));
        }
        let channel = self
            .peers
            .channel(&addr)
            .map_err(|e| with_leader(Status::unavailable(e), &addr))?;
        Ok(Target::Leader(
            leader,
            NodeAdminClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
    }

    /// Runs `call` on the leader when this node is not it and returns the leader's answer;
    /// `None` when this node leads and does the work itself.
    async fn on_leader<Req, Resp, F, Fut>(
        &self,
        req: &Req,
        forwarded: bool,
        caller: &Caller,
        call: F,
    ) -> Result<Option<Resp>, Status>
    where
        Req: Clone,
        F: FnOnce(NodeAdminClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let Target::Leader(leader, client) = self.target(forwarded).await? else {
            return Ok(None);
        };
        let span = tracing::info_span!(
            target: traces::TARGET,
            "forward to leader",
            otel.kind = "client",
            rpc.system = "grpc",
            tollgate.node = self.id,
        );
        let forward = async { call(client, self.forward(req.clone(), caller)).await };
        // A leader cut off from the cluster answers nothing until its link comes back (up to
        // the forward's timeout). Once this node knows of another leader, waiting on the old
        // one is pointless: the caller is told where to go instead.
        let replaced = self.leader_replaced(leader);
        tokio::select! {
            resp = forward.instrument(span) => Ok(Some(resp.map_err(in_transit)?.into_inner())),
            (new, addr) = replaced => Err(with_leader(
                Status::unavailable(format!(
                    "node {new} was elected leader while this call was forwarded to node \
                     {leader}; it may still have been applied there. Retry on node {new} (a \
                     write with the same request id is applied once)"
                )),
                &addr,
            )),
        }
    }

    /// Resolves once this node knows of a leader other than `old`: its id and gRPC address.
    async fn leader_replaced(&self, old: NodeId) -> (NodeId, String) {
        let mut metrics = self.raft.metrics();
        loop {
            let new = {
                let m = metrics.borrow_and_update();
                m.current_leader
                    .filter(|l| *l != old)
                    .map(|l| (l, grpc_addr(&m, l)))
            };
            if let Some(found) = new {
                return found;
            }
            if metrics.changed().await.is_err() {
                // Raft is shutting down: the forward decides.
                std::future::pending::<()>().await;
            }
        }
    }

    /// A read that must see every acknowledged write: the leader's answer when this node
    /// is not the leader; `None` once this node, the leader, has confirmed its read index.
    async fn read_on_leader<Req, Resp, F, Fut>(
        &self,
        req: &Req,
        forwarded: bool,
        caller: &Caller,
        call: F,
    ) -> Result<Option<Resp>, Status>
    where
        Req: Clone,
        F: FnOnce(NodeAdminClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        if let Some(resp) = self.on_leader(req, forwarded, caller, call).await? {
            return Ok(Some(resp));
        }
        self.linearizable().await?;
        Ok(None)
    }

    /// A request to the leader on a caller's behalf: marked as forwarded, with the
    /// caller's token (the leader authenticates it against its own state).
    fn forward<T>(&self, msg: T, caller: &Caller) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert(FORWARDED_METADATA, MetadataValue::from(self.id));
        traces::inject(req.metadata_mut());
        match caller {
            Caller::Remote(Some(token)) => {
                req.metadata_mut().insert("authorization", token.clone());
            }
            // This node's own write: the leader knows it by its certificate.
            Caller::Node => {
                req.metadata_mut()
                    .insert(AS_NODE_METADATA, MetadataValue::from(self.id));
            }
            // A peer's write is forwarded by that peer only, never by another node.
            Caller::Peer(_) | Caller::Remote(None) => {}
        }
        req.set_timeout(COMMIT_TIMEOUT + LEADER_WAIT + Duration::from_secs(2));
        req
    }

    /// Validates a spec and replaces the cluster's spec with it (or only plans, on a dry
    /// run). Runs on the leader; elsewhere it is forwarded there.
    pub async fn apply_spec(
        &self,
        req: api::ApplySpecRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::ApplySpecResponse, Status> {
        if req.dry_run {
            // A plan needs no leader: this node's applied state.
            self.principal(caller)?
                .require_operator("planning a spec")?;
            let checked = check_text(req.spec_yaml, self.max_spec_bytes, "the spec").await?;
            self.check_quota_apis(&checked)?;
            let warnings = self.check_certificates(&checked)?;
            let (plan, generation) = self
                .state_machine
                .read(|a| (a.state.plan(&checked.objects), a.state.generation));
            return Ok(api::ApplySpecResponse {
                added: plan.added,
                changed: plan.changed,
                removed: plan.removed,
                generation,
                log_index: 0,
                dry_run: true,
                warnings,
            });
        }
        // Forwarded unchecked: the leader checks it, checking here too would only add latency.
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.apply_spec(r).await };
        if let Some(resp) = self.on_leader(&req, forwarded, caller, forward).await? {
            return Ok(resp);
        }
        let principal = self.principal(caller)?;
        principal.require_operator("applying the spec")?;
        let checked = check_text(req.spec_yaml, self.max_spec_bytes, "the spec").await?;
        self.check_quota_apis(&checked)?;
        let warnings = self.check_certificates(&checked)?;
        let mut cmd = put_spec_command(&checked, &req.request_id);
        cmd.actor = principal.actor();
        cmd.at_ms = now_ms();
        let applied = self.write(cmd).await?;
        // The first certificate: ticket keys now rather than at the next identity tick, so
        // clients resume across nodes from the start.
        if let Err(e) = self.rotate_ticket_keys().await {
            tracing::warn!(
                "could not make the TLS session-ticket keys: {}",
                e.message()
            );
        }
        Ok(api::ApplySpecResponse {
            added: applied.added,
            changed: applied.changed,
            removed: applied.removed,
            generation: applied.generation,
            log_index: applied.log_index,
            dry_run: false,
            warnings,
        })
    }

    /// The checks of the spec's certificates that need the time and the keys (the rest are
    /// the spec's own): each key opens and matches its certificate, and each certificate
    /// is valid now. Returns the warnings (expiring soon).
    fn check_certificates(&self, checked: &CheckedSpec) -> Result<Vec<String>, Status> {
        if checked.spec.certificates.is_empty()
            && checked.spec.upstreams.values().all(|u| u.tls.is_none())
        {
            return Ok(Vec::new());
        }
        let secrets = self.state_machine.read(|a| a.state.access.secrets.clone());
        let ring = self.identity.keyring();
        let open = |name: &str| -> Result<Vec<u8>, String> {
            let secret = secrets.get(name).ok_or_else(|| {
                format!(
                    "there is no secret {name}: store the key first with \
                     `tollgate secret set {name} --from-file key.pem`"
                )
            })?;
            let ring = ring.as_ref().ok_or("this node has no sealing key")?;
            ring.open(&identity::secret_purpose(name), &secret.value)
                .map_err(|e| format!("secret {name} cannot be opened here: {e}"))
        };
        let mut errors = crate::state::spec::SpecErrors::default();
        let mut notes = crate::state::tls::check_at_apply(
            &checked.spec.certificates,
            now_ms(),
            &open,
            &mut errors,
        );
        crate::state::tls::check_upstreams_at_apply(
            &checked.spec.upstreams,
            &open,
            &mut errors,
            &mut notes,
        );
        if errors.is_empty() {
            Ok(notes.warnings)
        } else {
            Err(Status::invalid_argument(format!(
                "the spec was refused, nothing was applied. {errors}"
            )))
        }
    }

    /// A quota may only name APIs that exist (the spec alone cannot tell).
    fn check_quota_apis(&self, checked: &CheckedSpec) -> Result<(), Status> {
        // An LLM endpoint is an API (docs/llm.md): its models live in a version's content.
        for (field, present) in [
            ("providers", !checked.spec.providers.is_empty()),
            ("models", !checked.spec.models.is_empty()),
            ("prompts", !checked.spec.prompts.is_empty()),
            ("response_cache", checked.spec.response_cache.is_some()),
            ("prompt_guard", checked.spec.prompt_guard.is_some()),
            ("call_log", checked.spec.call_log.is_some()),
            ("alerts", checked.spec.alerts.is_some()),
        ] {
            if present && matches!(field, "call_log" | "alerts") {
                return Err(Status::invalid_argument(format!(
                    "{field}: this is set per API version: put it in an API version's content \
                     (tollgate version create ... -f content.yaml), not in the cluster's spec \
                     (docs/calls.md, docs/hypercare.md)"
                )));
            }
            if present {
                return Err(Status::invalid_argument(format!(
                    "{field}: LLM providers and models are served as an API: put them in an \
                     API version's content (tollgate version create ... -f content.yaml), \
                     not in the cluster's spec (docs/llm.md)"
                )));
            }
        }
        let mut errors = crate::state::spec::SpecErrors::default();
        self.state_machine.read(|a| {
            for (name, q) in &checked.spec.quotas {
                for (i, api) in q.apis.iter().enumerate() {
                    if !a.state.apis.contains_key(api) {
                        errors.push(
                            format!("quotas.{name}.apis[{i}]"),
                            format!("there is no API {api}"),
                        );
                    }
                }
            }
        });
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "the spec was refused, nothing was applied. {errors}"
            )))
        }
    }

    /// Proposes a state-machine command (not a spec: those are validated by `apply_spec`),
    /// on the leader, for an authorized caller. The leader fills in what a client must not
    /// choose: the actor and time, a new credential's id and hash, a publish's compiled
    /// routes.
    pub async fn write_command(
        &self,
        req: api::WriteRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::WriteResponse, Status> {
        use tollgate_proto::state::v1::command::Kind;
        let Some(mut cmd) = req.command.clone() else {
            return Err(Status::invalid_argument("the write has no command"));
        };
        match &cmd.kind {
            None => return Err(Status::invalid_argument("the command has no kind")),
            Some(Kind::PutSpec(_)) => {
                return Err(Status::invalid_argument(
                    "a spec is written with ApplySpec, which checks it first",
                ));
            }
            Some(_) => {}
        }
        let size = prost::Message::encoded_len(&cmd);
        if size > self.max_spec_bytes {
            return Err(Status::invalid_argument(format!(
                "the command is {size} bytes, over the limit of {} bytes (--max-spec-bytes)",
                self.max_spec_bytes
            )));
        }
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.write(r).await };
        if let Some(resp) = self.on_leader(&req, forwarded, caller, forward).await? {
            return Ok(resp);
        }
        let principal = self.principal(caller)?;
        self.state_machine.read(|a| {
            authorize(&principal, &cmd, &a.state)?;
            stamp(&principal, &mut cmd, &a.state);
            Ok::<_, Status>(())
        })?;
        let secret = self.fill_in(&mut cmd).await?;
        cmd.actor = principal.actor();
        cmd.at_ms = now_ms();
        let applied = self.write(cmd).await?;
        if let Some(refusal) = applied.refusal {
            use crate::state::lifecycle::Refusal;
            return Err(match refusal {
                Refusal::Invalid(m) => Status::invalid_argument(m),
                Refusal::NotFound(m) => Status::not_found(m),
                Refusal::Precondition(m) => Status::failed_precondition(m),
            });
        }
        if secret.is_some() && applied.deduplicated {
            // The first attempt made the credential; its secret went to that attempt only.
            return Err(Status::already_exists(format!(
                "this request was already applied: it made {}. Its secret was shown only to the \
                 first attempt; if that answer was lost, revoke it and make a new one",
                applied.added.join(", ")
            )));
        }
        let (credential_id, secret) = secret.unwrap_or_default();
        Ok(api::WriteResponse {
            generation: applied.generation,
            log_index: applied.log_index,
            added: applied.added,
            changed: applied.changed,
            credential_id,
            secret,
        })
    }

    /// Completes a command on the leader: mints a credential (returning its id and secret,
    /// for the caller only), checks version content, compiles a version being published.
    async fn fill_in(
        &self,
        cmd: &mut tollgate_proto::state::v1::Command,
    ) -> Result<Option<(String, String)>, Status> {
        use tollgate_proto::state::v1::access_command::Op as AccessOp;
        use tollgate_proto::state::v1::api_command::Op as ApiOp;
        use tollgate_proto::state::v1::command::Kind;
        use tollgate_proto::state::v1::version_transition::To;
        match &mut cmd.kind {
            Some(Kind::Access(a)) => {
                let (cred, prefix) = match &mut a.op {
                    Some(AccessOp::CreateKey(c)) => (c, KEY_PREFIX),
                    Some(AccessOp::CreateToken(c)) => (c, TOKEN_PREFIX),
                    _ => return Ok(None),
                };
                if !cred.client_certificate.is_empty() {
                    let (fingerprint, not_after_ms) =
                        crate::state::tls::client_certificate_key(&cred.client_certificate)
                            .map_err(|e| {
                                Status::invalid_argument(format!("client_certificate: {e}"))
                            })?;
                    cred.id = fingerprint[..8]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    cred.hash = fingerprint.to_vec();
                    if cred.expires_at_ms == 0 || cred.expires_at_ms > not_after_ms {
                        cred.expires_at_ms = not_after_ms;
                    }
                    return Ok(Some((cred.id.clone(), String::new())));
                }
                let minted = mint(prefix, &self.hash_key()?).map_err(Status::internal)?;
                cred.id = minted.id.clone();
                cred.hash = minted.hash;
                Ok(Some((minted.id, minted.secret)))
            }
            Some(Kind::Identity(i)) => self.fill_in_identity(i),
            Some(Kind::Rollout(r)) => {
                use tollgate_proto::state::v1::rollout_command::Op as RolloutOp;
                if let Some(RolloutOp::Start(s)) = &mut r.op
                    && !s.webhook.is_empty()
                {
                    if !(s.webhook.starts_with("http://") || s.webhook.starts_with("https://")) {
                        return Err(Status::invalid_argument(
                            "webhook: an http:// or https:// URL",
                        ));
                    }
                    s.webhook = self.seal_webhook(&s.webhook)?;
                }
                Ok(None)
            }
            Some(Kind::Billing(b)) => {
                use tollgate_proto::state::v1::billing_command::Op as BillingOp;
                if let Some(BillingOp::SetBudget(budget)) = &mut b.op
                    && !budget.webhook.is_empty()
                {
                    budget.webhook = self.seal_webhook(&budget.webhook)?;
                }
                Ok(None)
            }
            Some(Kind::Api(a)) => {
                let api_name = a.api.clone();
                let settings = match &mut a.op {
                    Some(ApiOp::CreateApi(c)) => c.settings.as_mut(),
                    Some(ApiOp::UpdateApi(u)) => u.settings.as_mut(),
                    _ => None,
                };
                if let Some(jwt) = settings.and_then(|s| s.jwt.as_mut()) {
                    jwt.jwks = self.seal_jwks(&jwt.jwks)?;
                }
                match &mut a.op {
                    Some(ApiOp::CreateVersion(c)) => {
                        let egress = self.egress().await?;
                        check_version_content(&c.content, self.max_spec_bytes, &egress).await?;
                    }
                    Some(ApiOp::Transition(t)) => match &mut t.to {
                        Some(To::Edit(content)) => {
                            let egress = self.egress().await?;
                            check_version_content(content, self.max_spec_bytes, &egress).await?;
                        }
                        Some(To::Publish(p)) => {
                            // The draft may have been written through an earlier leader:
                            // read it only once this leader has applied all it committed.
                            self.linearizable().await?;
                            let version = t.version.clone();
                            let content = self.state_machine.read(|s| {
                                let v = parse_version(&version).ok()?;
                                let api = s.state.apis.get(&api_name)?;
                                let found = api.versions.get(&v)?;
                                (found.stage == Stage::Draft).then(|| found.content.clone())
                            });
                            // Never what the client sent. No draft: left empty, and the
                            // state machine refuses it with the reason.
                            p.compiled.clear();
                            p.content_digest.clear();
                            if let Some(content) = content {
                                let egress = self.egress().await?;
                                p.compiled =
                                    check_version_content(&content, self.max_spec_bytes, &egress)
                                        .await?;
                                p.content_digest = content_digest(&content);
                            }
                        }
                        _ => {}
                    },
                    _ => {}
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Every member's listeners as the membership advertises them, this node's included
    /// (before it is a member too).
    pub fn members(&self) -> Vec<Member> {
        let member = |id: NodeId, n: &NodeInfo| Member {
            id,
            proxy: n.proxy_addr.clone(),
            grpc: n.grpc_addr.clone(),
            admin: n.admin_addr.clone(),
        };
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let mut out: Vec<Member> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| member(*id, n))
            .collect();
        if !out.iter().any(|x| x.id == self.id) {
            out.push(member(self.id, &self.info));
        }
        out
    }

    /// What tenants' API versions may reach, as this node knows it now: the cluster
    /// spec's `tenant_upstreams` and every member's listeners (resolved off the async
    /// threads when a member is known by name).
    async fn egress(&self) -> Result<(TenantUpstreams, OwnAddrs), Status> {
        let policy = self
            .state_machine
            .read(|a| TenantUpstreams::of_spec_yaml(&a.state.spec_yaml));
        let members = self.members();
        let own = if members_need_dns(&members) {
            tokio::task::spawn_blocking(move || OwnAddrs::resolve(&members))
                .await
                .map_err(|e| Status::internal(format!("resolving the members failed: {e}")))?
        } else {
            OwnAddrs::resolve(&members)
        };
        Ok((policy, own))
    }

    /// Who is calling, checked against this node's applied state.
    pub fn principal(&self, caller: &Caller) -> Result<Principal, Status> {
        let now = now_ms();
        if let Caller::Node | Caller::Peer(_) = caller {
            return self
                .state_machine
                .read(|a| authenticate(caller, &a.state, &[], self.id, now));
        }
        let sealed = self.state_machine.read(|a| a.state.access.hash_key.clone());
        if sealed.is_empty() {
            return Err(Status::unauthenticated(
                "the cluster is not bootstrapped yet: it has no tokens; retry shortly",
            ));
        }
        let hash_key = self.identity.hash_key(&sealed)?;
        self.state_machine
            .read(|a| authenticate(caller, &a.state, &hash_key, self.id, now))
    }

    /// The state's hash key, opened.
    pub fn hash_key(&self) -> Result<Arc<[u8]>, Status> {
        let sealed = self.state_machine.read(|a| a.state.access.hash_key.clone());
        self.identity.hash_key(&sealed)
    }

    /// Makes the cluster's hash key, operator token and CA if the cluster has none yet
    /// (the first start of the bootstrapping node, or a retry after it crashed in
    /// between), and gives this node its certificate. Returns the operator token when
    /// this call made it: it is shown once.
    pub async fn bootstrap_access(&self) -> Result<Option<String>, Status> {
        // Made already (this node's own state has the key): nothing to ask anyone.
        if self
            .state_machine
            .read(|a| !a.state.access.hash_key.is_empty())
        {
            return Ok(None);
        }
        let metrics = match self
            .raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
        {
            Ok(m) => m,
            // Restarted into a cluster of several voters that has no leader yet: the first
            // start, as the only voter, made the token.
            Err(_)
                if self
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .voter_ids()
                    .count()
                    > 1 =>
            {
                return Ok(None);
            }
            Err(_) => return Err(Status::unavailable("no leader elected")),
        };
        // A restarted bootstrap node that is not the leader belongs to a cluster that grew
        // past it, so its first start got as far as this (it was then the only voter).
        if metrics.current_leader != Some(self.id) {
            return Ok(None);
        }
        self.linearizable().await?;
        if self
            .state_machine
            .read(|a| !a.state.access.hash_key.is_empty())
        {
            return Ok(None);
        }
        let hash_key = new_hash_key().map_err(Status::internal)?;
        let minted = mint(TOKEN_PREFIX, &hash_key).map_err(Status::internal)?;
        let ca = Ca::generate(now_ms()).map_err(Status::internal)?;
        let cmd = tollgate_proto::state::v1::Command {
            kind: Some(tollgate_proto::state::v1::command::Kind::Bootstrap(
                tollgate_proto::state::v1::Bootstrap {
                    hash_key: self.identity.seal(identity::HASH_KEY, &hash_key)?,
                    operator_token: Some(tollgate_proto::state::v1::CreateCredential {
                        id: minted.id,
                        hash: minted.hash,
                        name: "operator".into(),
                        expires_at_ms: 0,
                        client_certificate: String::new(),
                        models: Vec::new(),
                    }),
                    ca_cert_pem: ca.cert_pem.clone(),
                    ca_key: self.identity.seal(identity::CA_KEY, &ca.key_der())?,
                },
            )),
            actor: Principal::Node(self.id).actor(),
            at_ms: now_ms(),
            ..Default::default()
        };
        let applied = self.write(cmd).await?;
        if self.identity.secure {
            self.state_machine
                .read(|a| self.identity.issue_self(&a.state.access, now_ms()))?;
        }
        Ok((!applied.added.is_empty()).then_some(minted.secret))
    }

    /// Keeps this node's identity current, every `every`: a certificate when it has none
    /// or a third of its life is left (issued by itself from the CA in the state, which
    /// every member can open); on the leader of a cluster made before node identity, a CA
    /// and the sealing of secrets stored in the clear.
    pub async fn keep_identity(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            if let Err(e) = self.identity_tick().await {
                tracing::warn!("node identity: {}", e.message());
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    async fn identity_tick(&self) -> Result<(), Status> {
        let (has_ca, plain_hash_key) = self.state_machine.read(|a| {
            let access = &a.state.access;
            (
                !access.ca_cert_pem.is_empty(),
                !access.hash_key.is_empty() && !identity::seal::is_sealed(&access.hash_key),
            )
        });
        let leader = self.raft.metrics().borrow().current_leader == Some(self.id);
        if leader && self.identity.keyring().is_some() {
            if !has_ca
                && self
                    .state_machine
                    .read(|a| !a.state.access.hash_key.is_empty())
            {
                let ca = Ca::generate(now_ms()).map_err(Status::internal)?;
                let op = IdentityOp::SetCa(tollgate_proto::state::v1::SetCa {
                    ca_cert_pem: ca.cert_pem.clone(),
                    ca_key: self.identity.seal(identity::CA_KEY, &ca.key_der())?,
                });
                self.identity_write(op).await?;
                tracing::info!(
                    "made the cluster CA (this cluster had none: it was made by an older version)"
                );
            }
            if plain_hash_key {
                self.identity_write(IdentityOp::Reseal(self.reseal()?))
                    .await?;
                tracing::info!(
                    "sealed the cluster's hash key (an older version stored it in the clear)"
                );
            }
            self.rotate_ticket_keys().await?;
        }
        if self.identity.secure
            && self.identity.keyring().is_some()
            && self.identity.renewal_due(now_ms())
            && self
                .state_machine
                .read(|a| !a.state.access.ca_cert_pem.is_empty())
        {
            let renewing = self.identity.current().is_some();
            self.state_machine
                .read(|a| self.identity.issue_self(&a.state.access, now_ms()))?;
            self.peers.reconnect();
            if renewing {
                metrics::counter!("tollgate_node_certificate_renewals_total").increment(1);
                tracing::info!(node = self.id, "renewed this node's certificate");
            } else {
                tracing::info!(
                    node = self.id,
                    "issued this node's certificate from the cluster CA"
                );
            }
        }
        Ok(())
    }

    /// Proposes an identity command as this node (on the leader).
    /// On the leader, while the spec has certificates: makes the first session-ticket key,
    /// then a new one every [`TICKET_ROTATION_MS`](crate::proxy::tls::TICKET_ROTATION_MS)
    /// (keeping the one before), in a sealed secret every node serves from.
    async fn rotate_ticket_keys(&self) -> Result<(), Status> {
        use crate::proxy::tls::{TICKET_ROTATION_MS, TICKET_SECRET, rotate_ticket_keys};
        let (has_certificates, current) = self.state_machine.read(|a| {
            (
                a.state
                    .objects
                    .keys()
                    .any(|k| k.starts_with("certificate/")),
                a.state.access.secrets.get(TICKET_SECRET).cloned(),
            )
        });
        let due = current
            .as_ref()
            .is_none_or(|s| now_ms().saturating_sub(s.updated_at_ms) >= TICKET_ROTATION_MS);
        if !has_certificates || !due {
            return Ok(());
        }
        let purpose = identity::secret_purpose(TICKET_SECRET);
        // Keys that cannot be opened (sealed under a key since removed) are replaced.
        let old = match (current, self.identity.keyring()) {
            (Some(s), Some(ring)) => ring.open(&purpose, &s.value).unwrap_or_default(),
            _ => Vec::new(),
        };
        let value = rotate_ticket_keys(&old).map_err(Status::internal)?;
        let op = IdentityOp::PutSecret(tollgate_proto::state::v1::PutSecret {
            name: TICKET_SECRET.to_string(),
            value: self.identity.seal(&purpose, &value)?,
        });
        self.identity_write(op).await?;
        tracing::info!("made a new TLS session-ticket key for the cluster");
        Ok(())
    }

    /// Stores a named secret as this node (`tollgate dev`'s certificate key, before its
    /// first spec). On the leader only.
    pub async fn put_secret_as_node(&self, name: &str, value: &[u8]) -> Result<(), Status> {
        crate::state::lifecycle::check_secret_name(name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let op = IdentityOp::PutSecret(tollgate_proto::state::v1::PutSecret {
            name: name.to_string(),
            value: self.identity.seal(&identity::secret_purpose(name), value)?,
        });
        self.identity_write(op).await.map(|_| ())
    }

    async fn identity_write(&self, op: IdentityOp) -> Result<Applied, Status> {
        let cmd = tollgate_proto::state::v1::Command {
            kind: Some(tollgate_proto::state::v1::command::Kind::Identity(
                tollgate_proto::state::v1::IdentityCommand { op: Some(op) },
            )),
            actor: Principal::Node(self.id).actor(),
            at_ms: now_ms(),
            ..Default::default()
        };
        let applied = self.write(cmd).await?;
        match applied.refusal {
            None => Ok(applied),
            Some(crate::state::lifecycle::Refusal::Invalid(m)) => Err(Status::invalid_argument(m)),
            Some(crate::state::lifecycle::Refusal::NotFound(m)) => Err(Status::not_found(m)),
            Some(crate::state::lifecycle::Refusal::Precondition(m)) => {
                Err(Status::failed_precondition(m))
            }
        }
    }

    /// A JWKS as the state keeps it: checked, then every symmetric key (an HS256 secret)
    /// sealed. A key a client sends already sealed is refused: a client never sees one.
    fn seal_jwks(&self, jwks: &str) -> Result<String, Status> {
        use crate::identity::seal::is_sealed_text;
        let refuse = |m: String| Status::invalid_argument(format!("jwt.jwks: {m}"));
        crate::auth::jwt::map_symmetric_keys(jwks, &|k| {
            if is_sealed_text(k) {
                Err("a key's \"k\" must be the key itself (base64url)".into())
            } else {
                Ok(k.to_string())
            }
        })
        .map_err(refuse)?;
        crate::auth::jwt::parse_jwks(jwks).map_err(refuse)?;
        let ring = self.identity.keyring().ok_or_else(|| {
            Status::failed_precondition("this node has no sealing key, so it cannot store a secret")
        })?;
        crate::auth::jwt::map_symmetric_keys(jwks, &|k| {
            ring.seal_text(crate::auth::jwt::JWKS_PURPOSE, k)
        })
        .map_err(Status::internal)
    }

    /// A webhook URL as the state keeps it: sealed (it often carries a secret, as
    /// Slack's do). Its form is checked first.
    fn seal_webhook(&self, url: &str) -> Result<String, Status> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Status::invalid_argument(format!(
                "webhook {url:?} is not an http(s) URL; write it like https://hooks.example.com/budget"
            )));
        }
        let ring = self.identity.keyring().ok_or_else(|| {
            Status::failed_precondition("this node has no sealing key, so it cannot store a secret")
        })?;
        ring.seal_text(identity::WEBHOOK, url)
            .map_err(Status::internal)
    }

    /// Completes an identity command on the leader: mints a join token (its text, with
    /// the CA's fingerprint, goes to the caller once); re-seals the secrets under the
    /// primary sealing key.
    fn fill_in_identity(
        &self,
        i: &mut tollgate_proto::state::v1::IdentityCommand,
    ) -> Result<Option<(String, String)>, Status> {
        match &mut i.op {
            Some(IdentityOp::CreateJoinToken(c)) => {
                let ca_pem = self
                    .state_machine
                    .read(|a| a.state.access.ca_cert_pem.clone());
                let ca = identity::ca::pem_certs(&ca_pem).map_err(|_| {
                    Status::failed_precondition(
                        "the cluster has no CA yet, so nodes cannot join with a token; retry shortly",
                    )
                })?;
                let minted = mint(identity::JOIN_TOKEN_PREFIX, &self.hash_key()?)
                    .map_err(Status::internal)?;
                c.id = minted.id.clone();
                c.hash = minted.hash;
                let text = JoinToken::text(&minted.secret, &identity::ca::fingerprint(&ca[0]));
                Ok(Some((minted.id, text)))
            }
            Some(IdentityOp::Reseal(r)) => {
                *r = self.reseal()?;
                Ok(None)
            }
            Some(IdentityOp::PutSecret(p)) => {
                crate::state::lifecycle::check_secret_name(&p.name)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                if p.value.len() > crate::state::identity::MAX_SECRET_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "a secret is at most {} bytes",
                        crate::state::identity::MAX_SECRET_BYTES
                    )));
                }
                p.value = self
                    .identity
                    .seal(&identity::secret_purpose(&p.name), &p.value)?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Every sealed secret of the state, opened and sealed again under the primary key.
    fn reseal(&self) -> Result<tollgate_proto::state::v1::Reseal, Status> {
        let ring = self
            .identity
            .keyring()
            .ok_or_else(|| Status::failed_precondition("this node has no sealing key"))?;
        let unopenable = |what: String| {
            move |e: identity::seal::OpenError| {
                Status::failed_precondition(format!(
                    "{what} cannot be opened with this node's keys: {e}. Give every node the \
                     old and the new key (the new one first) before rotating"
                ))
            }
        };
        let seal =
            |purpose: &str, plain: &[u8]| ring.seal(purpose, plain).map_err(Status::internal);
        let (hash_key, ca_key, secrets, apis, budgets) = self.state_machine.read(|a| {
            let s = &a.state;
            let mut billing = tollgate_proto::state::v1::StateSnapshot::default();
            s.billing.to_proto(&mut billing);
            (
                s.access.hash_key.clone(),
                s.access.ca_key.clone(),
                s.access.secrets.clone(),
                s.apis.clone(),
                billing.budgets,
            )
        });
        let mut out = tollgate_proto::state::v1::Reseal::default();
        if !hash_key.is_empty() {
            let plain = if identity::seal::is_sealed(&hash_key) {
                ring.open(identity::HASH_KEY, &hash_key)
                    .map_err(unopenable("the hash key".into()))?
            } else {
                hash_key
            };
            out.hash_key = seal(identity::HASH_KEY, &plain)?;
        }
        if !ca_key.is_empty() {
            let plain = ring
                .open(identity::CA_KEY, &ca_key)
                .map_err(unopenable("the CA key".into()))?;
            out.ca_key = seal(identity::CA_KEY, &plain)?;
        }
        for (name, secret) in secrets {
            let purpose = identity::secret_purpose(&name);
            let plain = ring
                .open(&purpose, &secret.value)
                .map_err(unopenable(format!("secret {name}")))?;
            out.secrets.insert(name, seal(&purpose, &plain)?);
        }
        for (name, api) in apis.iter() {
            let Some(jwt) = &api.settings.jwt else {
                continue;
            };
            if !jwt.jwks.contains(identity::seal::TEXT_PREFIX)
                && !crate::auth::jwt::has_clear_symmetric_key(&jwt.jwks)
            {
                continue;
            }
            let resealed = crate::auth::jwt::map_symmetric_keys(&jwt.jwks, &|k| {
                let plain = if identity::seal::is_sealed_text(k) {
                    ring.open_text(crate::auth::jwt::JWKS_PURPOSE, k)
                        .map_err(|e| format!("API {name}'s JWT key: {e}"))?
                } else {
                    k.to_string()
                };
                ring.seal_text(crate::auth::jwt::JWKS_PURPOSE, &plain)
            })
            .map_err(Status::failed_precondition)?;
            out.jwks.insert(name.clone(), resealed);
        }
        for b in budgets.into_iter().filter(|b| !b.webhook.is_empty()) {
            let plain = if identity::seal::is_sealed_text(&b.webhook) {
                ring.open_text(identity::WEBHOOK, &b.webhook)
                    .map_err(unopenable(format!("tenant {}'s webhook", b.tenant)))?
            } else {
                b.webhook.clone()
            };
            out.webhooks.insert(
                b.tenant.clone(),
                ring.seal_text(identity::WEBHOOK, &plain)
                    .map_err(Status::internal)?,
            );
        }
        Ok(out)
    }

    /// Issues a certificate to a new node (or control plane) that presents a join token:
    /// the token's use is committed first (a token good for one node enrolls one), then
    /// the leader signs the node's key. Runs on the leader; elsewhere it is forwarded.
    ///
    /// Without a token, a caller renews its own certificate: `peer` (who the caller's
    /// certificate says it is) must be the subject asked for. Any member can do that
    /// itself: it holds the CA, and nothing needs committing.
    pub async fn enroll(
        &self,
        req: api::EnrollRequest,
        forwarded: bool,
        peer: Option<Subject>,
    ) -> Result<api::EnrollResponse, Status> {
        if !self.identity.secure {
            // Insecure: the network is trusted, so a joining node gets the sealing keys and
            // no certificate (there are none).
            let keys = self.identity.keyring().ok_or_else(|| {
                Status::failed_precondition("this node has no sealing key yet; retry")
            })?;
            return Ok(api::EnrollResponse {
                sealing_keys: keys.to_text(),
                ..Default::default()
            });
        }
        let subject = match (req.control_plane, req.node_id) {
            (true, 0) => Subject::ControlPlane,
            (false, id) if id > 0 => Subject::Node(id),
            _ => {
                return Err(Status::invalid_argument(
                    "enroll either a node (node_id at least 1) or a control plane",
                ));
            }
        };
        if req.names.len() > 16
            || req
                .names
                .iter()
                .any(|n| n.is_empty() || n.len() > 253 || !n.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(Status::invalid_argument(
                "names: at most 16 host names or IP addresses, each 1 to 253 printable characters",
            ));
        }
        if req.csr_pem.len() > 16 * 1024 {
            return Err(Status::invalid_argument(
                "the certificate request is over 16 KiB",
            ));
        }
        if req.join_token.is_empty() {
            if peer != Some(subject) {
                return Err(Status::unauthenticated(format!(
                    "a certificate for {subject} needs a join token (`tollgate cluster \
                     join-token create`), or, to renew one, {subject}'s own certificate"
                )));
            }
            return self
                .issue(subject, &req)
                .map(|(cert, ca_pem)| api::EnrollResponse {
                    cert_chain_pem: cert,
                    ca_cert_pem: ca_pem,
                    sealing_keys: String::new(),
                });
        }
        let token = JoinToken::parse(&req.join_token).map_err(Status::invalid_argument)?;
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.enroll(r).await };
        if let Some(resp) = self
            .on_leader(&req, forwarded, &Caller::Remote(None), forward)
            .await?
        {
            return Ok(resp);
        }
        let hash_key = self.hash_key()?;
        let refused = || {
            Status::unauthenticated(
                "the join token is not known, or it expired, was used up or was revoked; make \
                 a new one with `tollgate cluster join-token create`",
            )
        };
        let valid = self.state_machine.read(|a| {
            let access = &a.state.access;
            access::check(
                &access.join_tokens,
                &hash_key,
                identity::JOIN_TOKEN_PREFIX,
                &token.credential,
                now_ms(),
            )
            .filter(|t| t.used < t.uses)
            .map(|_| access.ca_cert_pem.clone())
        });
        let Some(ca_pem) = valid else {
            return Err(refused());
        };
        let ca_der = identity::ca::pem_certs(&ca_pem).map_err(Status::internal)?;
        if identity::ca::fingerprint(&ca_der[0]) != token.ca_fingerprint {
            return Err(Status::unauthenticated(
                "the join token names another cluster's CA",
            ));
        }
        if let Subject::Node(id) = subject
            && self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&id)
                .is_some()
        {
            return Err(Status::already_exists(format!(
                "node {id} is a member already, and only it may speak for node {id}: a member \
                 that lost its data directory is removed first (`tollgate cluster remove {id}`), \
                 or the new node takes another --id"
            )));
        }
        let by = match subject {
            Subject::Node(id) => format!("node/{id}"),
            Subject::ControlPlane => "control-plane".to_string(),
        };
        self.identity_write(IdentityOp::UseJoinToken(
            tollgate_proto::state::v1::UseJoinToken {
                id: token.id.clone(),
                by,
            },
        ))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::FailedPrecondition | tonic::Code::NotFound => refused(),
            _ => s,
        })?;
        let (cert_chain_pem, ca_cert_pem) = self.issue(subject, &req)?;
        // A control plane needs no sealing key: it holds no state.
        let sealing_keys = match subject {
            Subject::Node(_) => self
                .identity
                .keyring()
                .ok_or_else(|| Status::failed_precondition("the leader has no sealing key"))?
                .to_text(),
            Subject::ControlPlane => String::new(),
        };
        tracing::info!(%subject, token = token.id, "enrolled with a join token");
        Ok(api::EnrollResponse {
            cert_chain_pem,
            ca_cert_pem,
            sealing_keys,
        })
    }

    /// Signs the key of `req`'s CSR for `subject`: the chain (leaf, CA) and the CA.
    fn issue(
        &self,
        subject: Subject,
        req: &api::EnrollRequest,
    ) -> Result<(String, String), Status> {
        let ca = self
            .state_machine
            .read(|a| self.identity.ca(&a.state.access))?;
        let cert = ca
            .issue(
                subject,
                &req.csr_pem,
                &Identity::cert_names(&req.names),
                now_ms(),
                self.identity.cert_lifetime,
            )
            .map_err(Status::invalid_argument)?;
        let chain = format!("{}\n{}", cert.trim_end(), ca.cert_pem);
        Ok((chain, ca.cert_pem))
    }

    /// With `--insecure-cluster`: takes the sealing keys from `peer`.
    pub async fn fetch_keys(&self, peer: &str) -> Result<(), String> {
        let mut client = NodeAdminClient::new(self.peers.channel(peer)?);
        let mut req = tonic::Request::new(api::EnrollRequest {
            node_id: self.id,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(5));
        let resp = client
            .enroll(req)
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        self.identity
            .adopt_keyring(&resp.sealing_keys)
            .map_err(|e| format!("{e:#}"))
    }

    /// Enrolls this node through `peer` with a join token: verifies the peer against the
    /// CA the token pins, gets a certificate for this node's id, the CA and the sealing
    /// keys, and stores them.
    pub async fn enroll_via(&self, peer: &str, token: &JoinToken) -> Result<(), String> {
        self.identity.tls.pin(&token.ca_fingerprint);
        let (key, csr) = identity::ca::new_key_and_csr()?;
        let host = peer_host(&self.info.grpc_addr);
        let mut client = NodeAdminClient::new(self.peers.channel(peer)?);
        let mut req = tonic::Request::new(api::EnrollRequest {
            join_token: format!("{}_{}", token.credential, token.ca_fingerprint),
            node_id: self.id,
            control_plane: false,
            csr_pem: csr,
            names: vec![host],
        });
        req.set_timeout(COMMIT_TIMEOUT + LEADER_WAIT + Duration::from_secs(5));
        let resp = client
            .enroll(req)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        self.identity
            .adopt_keyring(&resp.sealing_keys)
            .map_err(|e| format!("{e:#}"))?;
        self.identity
            .install(
                &resp.cert_chain_pem,
                &key.serialize_der(),
                &resp.ca_cert_pem,
            )
            .map_err(|e| format!("{e:#}"))?;
        self.peers.reconnect();
        Ok(())
    }

    /// The APIs, linearizable (through the leader) unless `local`; a tenant token sees its
    /// own only.
    pub async fn list_apis(
        &self,
        req: api::ListApisRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::ListApisResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.list_apis(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        let p = self.principal(caller)?;
        Ok(self.state_machine.read(|a| {
            use std::ops::Bound::{Excluded, Unbounded};
            let start = if req.after.is_empty() {
                Unbounded
            } else {
                Excluded(req.after.clone())
            };
            let mut page = api::ListApisResponse {
                generation: a.state.generation,
                ..Default::default()
            };
            let mut bytes = 0;
            for x in a
                .state
                .apis
                .range((start, Unbounded))
                .map(|(_, x)| x)
                .filter(|x| req.tenant.is_empty() || x.tenant == req.tenant)
                .filter(|x| p.sees(&x.tenant))
            {
                let mut api = x.to_proto();
                if let Some(settings) = api.settings.as_mut() {
                    crate::auth::jwt::redact_settings(settings);
                }
                let size = prost::Message::encoded_len(&api);
                if !page.apis.is_empty() && bytes + size > LIST_PAGE_BYTES {
                    page.next = page.apis.last().map(|a| a.name.clone()).unwrap_or_default();
                    break;
                }
                bytes += size;
                page.apis.push(api);
            }
            page
        }))
    }

    /// Tenants and their subscriptions; a tenant token sees its own tenant only.
    pub async fn list_tenants(
        &self,
        req: api::ListTenantsRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::ListTenantsResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.list_tenants(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        let p = self.principal(caller)?;
        Ok(self.state_machine.read(|a| api::ListTenantsResponse {
            tenants: a
                .state
                .access
                .tenants
                .values()
                .filter(|t| p.sees(&t.name))
                .map(tenant_to_proto)
                .collect(),
            generation: a.state.generation,
        }))
    }

    /// Subscriptions, active and waiting for consent; a tenant token sees its tenant's and
    /// those to the APIs it owns.
    pub async fn list_subscriptions(
        &self,
        req: api::ListSubscriptionsRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::ListSubscriptionsResponse, Status> {
        let forward =
            |mut c: NodeAdminClient<Channel>, r| async move { c.list_subscriptions(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        let p = self.principal(caller)?;
        Ok(self.state_machine.read(|a| {
            let apis = &a.state.apis;
            api::ListSubscriptionsResponse {
                subscriptions: crate::state::access::subscription_views(
                    &a.state.access,
                    p.tenant(),
                    &|name| apis.get(name).map(|x| x.tenant.clone()),
                    &req.tenant,
                    &req.api,
                ),
                generation: a.state.generation,
            }
        }))
    }

    /// Keys or tokens (never their hashes); a tenant token sees its own tenant's only.
    pub async fn list_credentials(
        &self,
        req: api::ListCredentialsRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::ListCredentialsResponse, Status> {
        let forward =
            |mut c: NodeAdminClient<Channel>, r| async move { c.list_credentials(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        let p = self.principal(caller)?;
        let now = now_ms();
        self.state_machine.read(|a| {
            let access = &a.state.access;
            let table = match req.kind.as_str() {
                "" | "key" | "keys" => &access.keys,
                "token" | "tokens" => &access.tokens,
                "join-token" | "join-tokens" => {
                    p.require_operator("listing join tokens")?;
                    &access.join_tokens
                }
                "secret" | "secrets" => {
                    p.require_operator("listing secrets")?;
                    // Names, times and the key each is sealed with: never a value.
                    return Ok(api::ListCredentialsResponse {
                        credentials: access
                            .secrets
                            .iter()
                            .map(|(name, s)| tollgate_proto::state::v1::CredentialState {
                                id: name.clone(),
                                name: identity::seal::key_id_of(&s.value).unwrap_or_default(),
                                created_at_ms: s.created_at_ms,
                                expires_at_ms: 0,
                                revoked_at_ms: s.updated_at_ms,
                                ..Default::default()
                            })
                            .collect(),
                        generation: a.state.generation,
                    });
                }
                other => {
                    return Err(Status::invalid_argument(format!(
                        "kind {other:?} is not known; use key, token or join-token"
                    )));
                }
            };
            if !req.tenant.is_empty() && !p.sees(&req.tenant) {
                return Err(Status::not_found(format!(
                    "there is no tenant {}",
                    req.tenant
                )));
            }
            Ok(api::ListCredentialsResponse {
                credentials: table
                    .values()
                    .filter(|c| req.tenant.is_empty() || c.tenant == req.tenant)
                    .filter(|c| p.sees(&c.tenant))
                    .filter(|c| req.all || c.valid_at(now))
                    .map(|c| c.to_public_proto())
                    .collect(),
                generation: a.state.generation,
            })
        })
    }

    /// The audit log, filtered; a tenant token sees its own tenant's entries only.
    pub async fn audit(
        &self,
        req: api::AuditRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::AuditResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.audit(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        let p = self.principal(caller)?;
        let limit = match req.limit {
            0 => 100,
            n => (n as usize).min(crate::state::machine::AUDIT_LIMIT),
        };
        Ok(self.state_machine.read(|a| {
            let mut entries: Vec<_> = a
                .state
                .audit
                .iter()
                .rev()
                .filter(|e| e.seq > req.after_seq && e.at_ms >= req.since_ms)
                .filter(|e| p.sees(&e.tenant))
                .filter(|e| e.object.starts_with(&req.object_prefix))
                .filter(|e| e.actor.starts_with(&req.actor))
                .take(limit)
                .cloned()
                .collect();
            entries.reverse();
            api::AuditResponse {
                entries,
                generation: a.state.generation,
            }
        }))
    }

    async fn write(&self, mut cmd: tollgate_proto::state::v1::Command) -> Result<Applied, Status> {
        let started = std::time::Instant::now();
        // A traced write gets its own span, which each node's apply continues.
        let span = if traces::current_traceparent().is_empty() {
            tracing::Span::none()
        } else {
            tracing::info_span!(target: traces::TARGET, "raft.write", tollgate.leader = self.id)
        };
        cmd.trace_parent = span.in_scope(traces::current_traceparent);
        let _call = self.in_flight()?;
        let result = tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(cmd))
            .instrument(span)
            .await;
        metrics::histogram!("tollgate_raft_write_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Err(_) => Err(Status::unavailable(format!(
                "the write was not committed within {COMMIT_TIMEOUT:?}: this leader may have lost \
                 its quorum. It may still be applied; check the generation before retrying \
                 (a retry with the same request id is applied once)"
            ))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> Status {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => match f.leader_id {
                Some(l) => not_leader(
                    self.id,
                    l,
                    &f.leader_node.map(|n| n.grpc_addr).unwrap_or_default(),
                ),
                None => Status::unavailable(
                    "no leader right now (an election is under way); retry shortly",
                ),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                Status::failed_precondition(format!("membership change refused: {e}"))
            }
            RaftError::Fatal(e) => {
                Status::unavailable(format!("raft on node {} stopped: {e}", self.id))
            }
        }
    }

    /// Adds a node as a learner (waiting for it to catch up) and promotes it to voter while
    /// the cluster has fewer voters than `max_voters`.
    /// `peer` is who the caller's certificate says it is (checked by the gRPC handler):
    /// only node N joins as node N, so no one else can change N's address or role.
    pub async fn join(
        &self,
        req: api::JoinRequest,
        forwarded: bool,
    ) -> Result<api::JoinResponse, Status> {
        if req.node_id == 0 {
            return Err(Status::invalid_argument(
                "node_id must be at least 1 (set --id)",
            ));
        }
        if let Err(e) = crate::config::parse_peer_addr(&req.grpc_addr) {
            return Err(Status::invalid_argument(format!(
                "grpc_addr {e}; set --advertise-addr"
            )));
        }
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.join(r).await };
        // Forwarded as the joining node's request: the leader sees this node's certificate,
        // and trusts it (a member) to have checked the joiner's.
        if let Some(resp) = self
            .on_leader(&req, forwarded, &Caller::Node, forward)
            .await?
        {
            return Ok(resp);
        }
        let _changing = self.membership_turn().await?;
        let node = NodeInfo {
            grpc_addr: req.grpc_addr.clone(),
            region: req.region.clone(),
            proxy_addr: req.proxy_addr.clone(),
            admin_addr: req.admin_addr.clone(),
        };
        let id = req.node_id;
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let known = membership.membership().get_node(&id).cloned();
        let change = match known {
            None => Some(ChangeMembers::AddNodes(BTreeMap::from([(id, node)]))),
            // Same id, new address (a restart on another port or host): update it.
            Some(existing) if existing != node => {
                Some(ChangeMembers::SetNodes(BTreeMap::from([(id, node)])))
            }
            Some(_) => None,
        };
        let added = matches!(change, Some(ChangeMembers::AddNodes(_)));
        if let Some(change) = change {
            self.membership_change(change).await?;
            // Wait until the learner has caught up with the log as it is now.
            let target = self.raft.metrics().borrow().last_log_index;
            let caught_up = self
                .raft
                .wait(Some(JOIN_TIMEOUT))
                .metrics(
                    |m| {
                        m.replication
                            .as_ref()
                            .and_then(|r| r.get(&id))
                            .and_then(|l| l.as_ref())
                            .map(|l| Some(l.index) >= target)
                            .unwrap_or(false)
                    },
                    "the learner to catch up",
                )
                .await;
            if caught_up.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "node {id} was added as a learner but has not caught up within {JOIN_TIMEOUT:?}; \
                     is {} reachable from the leader?",
                    req.grpc_addr
                )));
            }
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.membership().voter_ids().collect();
        let mut role = if voters.contains(&id) {
            "voter"
        } else {
            "learner"
        };
        // The cluster's policy (this leader's --voters), never a number the joiner sends.
        if role == "learner" && (voters.len() as u32) < self.voters.max(1) {
            self.membership_change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
                .await?;
            role = "voter";
        }
        if added {
            self.member_event(id, "join", role, format!("from {}", req.grpc_addr))
                .await;
        }
        Ok(api::JoinResponse {
            role: role.into(),
            leader: self.id,
        })
    }

    /// Counts a call into Raft; refused once the node is shutting down.
    fn in_flight(&self) -> Result<InFlight<'_>, Status> {
        self.gate.enter(self.id)
    }

    /// A linearizable read's barrier: this leader has applied all it committed.
    async fn linearizable(&self) -> Result<(), Status> {
        let _call = self.in_flight()?;
        self.raft
            .ensure_linearizable()
            .await
            .map(drop)
            .map_err(|e| Status::unavailable(format!("linearizable read failed: {e}")))
    }

    /// Stops Raft once the calls in flight have finished (at most `wait`), refusing new
    /// ones meanwhile: a write cut off by the stop would be an error for nothing.
    pub async fn shutdown(&self, wait: Duration) {
        self.gate.close(wait).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.raft.shutdown()).await;
    }

    /// Waits for the membership changes in progress (other joins, a removal) to finish.
    async fn membership_turn(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Status> {
        tokio::time::timeout(JOIN_TIMEOUT, self.membership.lock())
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "another membership change has been in progress for {JOIN_TIMEOUT:?}; retry"
                ))
            })
    }

    async fn membership_change(
        &self,
        change: ChangeMembers<NodeId, NodeInfo>,
    ) -> Result<(), Status> {
        let _call = self.in_flight()?;
        match tokio::time::timeout(JOIN_TIMEOUT, self.raft.change_membership(change, false)).await {
            Err(_) => Err(Status::unavailable(format!(
                "the membership change was not committed within {JOIN_TIMEOUT:?}"
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    /// Takes a node out of the cluster (voter or learner).
    pub async fn remove(
        &self,
        req: api::RemoveRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::RemoveResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.remove(r).await };
        if let Some(resp) = self.on_leader(&req, forwarded, caller, forward).await? {
            return Ok(resp);
        }
        self.principal(caller)?
            .require_operator("removing a node")?;
        let _changing = self.membership_turn().await?;
        let id = req.node_id;
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let m = membership.membership();
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        if m.get_node(&id).is_none() {
            let ids: Vec<String> = m.nodes().map(|(id, _)| id.to_string()).collect();
            return Err(Status::not_found(format!(
                "node {id} is not a member; members are {}",
                ids.join(", ")
            )));
        }
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the only voter; add another voter before removing it"
                )));
            }
            self.membership_change(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
                .await?;
        }
        let still_there = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some();
        if still_there {
            self.membership_change(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
                .await?;
        }
        // Its certificates stop opening any node's door: a node that comes back joins
        // again with a new join token.
        self.identity_write(IdentityOp::RevokeNode(
            tollgate_proto::state::v1::RevokeNode { node_id: id },
        ))
        .await?;
        Ok(api::RemoveResponse {})
    }

    /// The spec and generation; linearizable (read-index on the leader) unless `local`.
    /// Usage rollups and the billing state (see the `Usage` RPC).
    pub async fn usage(
        &self,
        req: api::UsageRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::UsageResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.usage(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        let p = self.principal(caller)?;
        let now = now_ms();
        let until = if req.until_ms == 0 { now } else { req.until_ms };
        if until <= req.since_ms {
            return Err(Status::invalid_argument(format!(
                "the range is empty: since ({}) must be before until ({until})",
                req.since_ms
            )));
        }
        // Whole rows by their start: a minute that started in the range is in it.
        let (since_minute, until_minute) = (req.since_ms / 60_000, until.div_ceil(60_000));
        // A webhook is a secret (sealed in the state): the operator sees where it goes,
        // a tenant nothing.
        let ring = self.identity.keyring();
        let shown = |text: &str| -> String {
            if text.is_empty() || p.tenant().is_some() {
                return String::new();
            }
            let url = match (&ring, crate::identity::seal::is_sealed_text(text)) {
                (Some(ring), true) => match ring.open_text(identity::WEBHOOK, text) {
                    Ok(url) => url,
                    Err(_) => return "(sealed)".into(),
                },
                (None, true) => return "(sealed)".into(),
                (_, false) => text.to_string(),
            };
            format!("{}/… (sealed)", crate::metering::alerts::origin(&url))
        };
        Ok(self.state_machine.read(|a| {
            let s = &a.state;
            let wanted =
                |tenant: &str| (req.tenant.is_empty() || tenant == req.tenant) && p.sees(tenant);
            let owned = |api: &str| p.sees(s.apis.get(api).map_or("", |x| x.tenant.as_str()));
            let mut billing = tollgate_proto::state::v1::StateSnapshot::default();
            s.billing.to_proto(&mut billing);
            api::UsageResponse {
                entries: s
                    .usage
                    .entries(since_minute, until_minute)
                    .into_iter()
                    .filter(|e| wanted(&e.tenant))
                    .collect(),
                latencies: s
                    .usage
                    .latencies(since_minute, until_minute)
                    .into_iter()
                    .filter(|l| owned(&l.api))
                    .collect(),
                llm: s
                    .usage
                    .llm(since_minute, until_minute)
                    .into_iter()
                    .filter(|l| owned(&l.api))
                    .collect(),
                plans: billing.plans,
                assignments: billing
                    .plan_assignments
                    .into_iter()
                    .filter(|x| wanted(&x.tenant))
                    .collect(),
                budgets: billing
                    .budgets
                    .into_iter()
                    .filter(|x| wanted(&x.tenant))
                    .map(|mut x| {
                        x.webhook = shown(&x.webhook);
                        x
                    })
                    .collect(),
                alerts: billing
                    .budget_alerts
                    .into_iter()
                    .filter(|x| wanted(&x.tenant))
                    .map(|mut x| {
                        x.webhook = shown(&x.webhook);
                        x
                    })
                    .collect(),
                spend: billing
                    .spend
                    .into_iter()
                    .filter(|x| wanted(&x.tenant))
                    .collect(),
                now_ms: now,
            }
        }))
    }

    pub async fn read_spec(
        &self,
        req: api::ReadSpecRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::ReadSpecResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.read_spec(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        self.principal(caller)?
            .require_operator("reading the spec")?;
        Ok(self.state_machine.read(|a| api::ReadSpecResponse {
            generation: a.state.generation,
            spec_yaml: a.state.spec_yaml.to_string(),
            applied_index: a.last_applied.map(|l| l.index).unwrap_or(0),
        }))
    }

    /// Canary rollouts (linearizable unless `local`): a tenant token sees its own APIs'.
    /// Webhooks are shown as their origin only.
    pub async fn rollouts(
        &self,
        req: api::RolloutsRequest,
        forwarded: bool,
        caller: &Caller,
    ) -> Result<api::RolloutsResponse, Status> {
        let forward = |mut c: NodeAdminClient<Channel>, r| async move { c.rollouts(r).await };
        if !req.local
            && let Some(resp) = self
                .read_on_leader(&req, forwarded, caller, forward)
                .await?
        {
            return Ok(resp);
        }
        let p = self.principal(caller)?;
        let ring = self.identity.keyring();
        let shown = |mut r: tollgate_proto::state::v1::RolloutState| {
            if !r.webhook.is_empty() {
                r.webhook = match (&ring, crate::identity::seal::is_sealed_text(&r.webhook)) {
                    (Some(ring), true) => ring
                        .open_text(identity::WEBHOOK, &r.webhook)
                        .map(|u| format!("{}/… (sealed)", crate::metering::alerts::origin(&u)))
                        .unwrap_or_else(|_| "(sealed)".into()),
                    _ => "(sealed)".into(),
                };
            }
            r
        };
        let wanted = |r: &tollgate_proto::state::v1::RolloutState| {
            (req.api.is_empty() || r.api == req.api) && p.sees(&r.tenant)
        };
        Ok(self.state_machine.read(|a| api::RolloutsResponse {
            rollouts: a
                .state
                .rollouts
                .values()
                .filter(|r| wanted(r))
                .cloned()
                .map(shown)
                .collect(),
            history: a
                .state
                .rollout_history
                .iter()
                .filter(|r| wanted(r))
                .cloned()
                .map(shown)
                .collect(),
            now_ms: now_ms(),
            alerts: a
                .state
                .alerts
                .values()
                .filter(|x| (req.api.is_empty() || x.api == req.api) && p.sees(&x.tenant))
                .cloned()
                .collect(),
        }))
    }

    pub fn history(&self) -> Vec<Change> {
        self.state_machine
            .read(|a| a.state.history.iter().cloned().collect())
    }

    pub fn status(&self) -> api::ClusterStatusResponse {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| api::Member {
                id: *id,
                addr: n.grpc_addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                region: n.region.clone(),
                applied_index: if *id == self.id {
                    m.last_applied.map(|l| l.index)
                } else {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(id))
                        .and_then(|l| l.map(|l| l.index))
                },
                proxy_addr: n.proxy_addr.clone(),
                admin_addr: n.admin_addr.clone(),
                silent_ms: self
                    .liveness
                    .down_for(*id, now_ms())
                    .map_or(0, |d| d.as_millis() as u64),
            })
            .collect();
        api::ClusterStatusResponse {
            leader: m.current_leader,
            term: m.current_term,
            members,
            node_id: self.id,
            state: state_name(m.state).into(),
            committed_index: self.log.committed_index(),
            applied_index: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            generation: self.state_machine.read(|a| a.state.generation),
            degraded: self.degraded().unwrap_or_default(),
            joint: membership.get_joint_config().len() > 1,
        }
    }

    /// Whether this node's membership config (as it knows it) includes itself.
    pub fn is_member(&self) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.id)
            .is_some()
    }

    /// Why the cluster side of this node is degraded, or None when it hears from a
    /// leader that has a quorum. The data plane serves either way (docs/architecture.md,
    /// decision 5).
    pub fn degraded(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let limit = self.settings.election_timeout.as_millis() as u64 * 3;
        if m.membership_config
            .membership()
            .get_node(&self.id)
            .is_none()
        {
            return Some("not a member of a cluster yet (bootstrapping or joining)".into());
        }
        match m.state {
            ServerState::Leader => match m.millis_since_quorum_ack {
                Some(ms) if ms > limit => Some(format!(
                    "leader without a quorum: no acknowledgement from a majority for {ms} ms"
                )),
                _ => None,
            },
            ServerState::Shutdown => Some("raft has stopped".into()),
            _ => {
                let silent =
                    now_ms().saturating_sub(self.last_leader_contact_ms.load(Ordering::Relaxed));
                match m.current_leader {
                    None => Some(format!(
                        "no leader: an election is under way or this node is cut off (last contact {silent} ms ago)"
                    )),
                    Some(l) if silent > limit => Some(format!(
                        "no contact with the leader (node {l}) for {silent} ms"
                    )),
                    Some(_) => None,
                }
            }
        }
    }
}

/// The host part of `host:port` (brackets kept off an IPv6 address).
fn peer_host(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// A forwarded call that broke in transit (the leader died, the connection was reset) is
/// UNAVAILABLE, so callers retry; what the leader answered itself is passed on as is.
fn in_transit(s: Status) -> Status {
    match s.code() {
        tonic::Code::Cancelled | tonic::Code::Unknown => Status::unavailable(format!(
            "forwarding to the leader failed in transit ({}: {}); retry",
            s.code(),
            s.message()
        )),
        _ => s,
    }
}

/// A member's gRPC address as `metrics` knows it (empty when it is not a member).
fn grpc_addr(metrics: &openraft::RaftMetrics<NodeId, NodeInfo>, id: NodeId) -> String {
    metrics
        .membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.grpc_addr.clone())
        .unwrap_or_default()
}

fn with_leader(mut status: Status, addr: &str) -> Status {
    if let Ok(v) = addr.parse() {
        status.metadata_mut().insert(LEADER_METADATA, v);
    }
    status
}

fn not_leader(me: NodeId, leader: NodeId, addr: &str) -> Status {
    with_leader(
        Status::unavailable(format!(
            "node {me} is not the leader; the leader is node {leader} at {addr}"
        )),
        addr,
    )
}

/// Checks spec text (a whole spec, or a version's content) the way a write does, off the
/// async threads when names must be resolved.
async fn check_text(yaml: String, max: usize, what: &'static str) -> Result<CheckedSpec, Status> {
    let refused = move |errors: crate::state::spec::SpecErrors| {
        Status::invalid_argument(format!("{what} was refused, nothing was applied. {errors}"))
    };
    let doc = parse_checked(&yaml, max).map_err(refused)?;
    if !needs_dns(&doc) {
        // No name to resolve: a check is ~0.1 ms of CPU, cheaper than a thread hop.
        return check_parsed(&yaml, doc).map_err(refused);
    }
    tokio::task::spawn_blocking(move || check_parsed(&yaml, doc))
        .await
        .map_err(|e| Status::internal(format!("spec check failed: {e}")))?
        .map_err(refused)
}

/// Checks a version's content (its routes and upstreams, a spec document) and returns it
/// compiled: canonical JSON of the checked document, what every data plane serves. Its
/// endpoints must be ones tenants' API versions may reach (`egress`: the cluster spec's
/// `tenant_upstreams` and the members' listeners; `state::egress`).
async fn check_version_content(
    content: &str,
    max: usize,
    egress: &(TenantUpstreams, OwnAddrs),
) -> Result<String, Status> {
    let checked = check_text(content.to_string(), max, "the version's content").await?;
    if let Some(name) = checked.spec.quotas.keys().next() {
        return Err(Status::invalid_argument(format!(
            "quotas.{name}: quotas are set in the cluster's spec (name the API in their `apis`), not in a version's content"
        )));
    }
    let doc = crate::state::spec::parse_yaml(content)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Some((name, _)) = checked.spec.upstreams.iter().find(|(_, u)| {
        u.tls
            .as_ref()
            .is_some_and(|t| t.client_certificate.is_some())
    }) {
        return Err(Status::invalid_argument(format!(
            "upstreams.{name}.tls.client_certificate: a client certificate's key is one of the \
             cluster's secrets, so only the operator's spec may present one"
        )));
    }
    for field in ["certificates", "hosts"] {
        if doc.get(field).is_some() {
            return Err(Status::invalid_argument(format!(
                "{field}: TLS at the edge (certificates, HTTPS redirects, HSTS) is set by the \
                 operator in the cluster's spec, not in a version's content"
            )));
        }
    }
    if doc.get("tenant_upstreams").is_some() {
        return Err(Status::invalid_argument(
            "tenant_upstreams: where API versions may send requests is set by the operator in \
             the cluster's spec, not in a version's content",
        ));
    }
    crate::state::snapshot::check_routes(&checked.spec).map_err(|errors| {
        Status::invalid_argument(format!(
            "the version's content was refused, nothing was applied. {errors}"
        ))
    })?;
    crate::state::egress::check_spec(&egress.0, &egress.1, &checked.spec).map_err(|errors| {
        Status::permission_denied(format!(
            "the version's content was refused, nothing was applied: an API version may not \
             send requests there (docs/security.md). {errors}"
        ))
    })?;
    serde_json::to_string(&doc).map_err(|e| {
        Status::invalid_argument(format!("the version's content cannot be compiled: {e}"))
    })
}
