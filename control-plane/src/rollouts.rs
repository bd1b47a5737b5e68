//! `tollgate.cp.v1.Rollouts`: start a canary rollout, read it with its decisions and
//! evidence, pause, resume or abort it. The judging itself happens in the cluster (an owner
//! node per rollout, docs/hypercare.md); this only writes and reads the state.

use tollgate_proto::cp::v1 as cp;
use tollgate_proto::cp::v1::rollouts_server::Rollouts;
use tollgate_proto::node::v1::RolloutsRequest;
use tollgate_proto::state::v1 as state;
use tonic::{Request, Response, Status};

use crate::{Service, Token, check_size, token};

impl Service {
    async fn rollout_reply(
        &self,
        t: &Token,
        api: &str,
        log_index: u64,
    ) -> Result<cp::RolloutReply, Status> {
        let resp = self
            .inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(t.clone());
                let req = RolloutsRequest {
                    api: api.to_string(),
                    local: false,
                };
                async move { c.rollouts(req).await }
            })
            .await?;
        let Some(rollout) = resp.rollouts.into_iter().next() else {
            return Err(Status::not_found(format!(
                "API {api} has had no rollout; start one with `tollgate rollout start {api} --canary VERSION`"
            )));
        };
        Ok(cp::RolloutReply {
            rollout: Some(rollout),
            history: resp.history,
            now_ms: resp.now_ms,
            log_index,
        })
    }

    async fn rollout_command(
        &self,
        t: &Token,
        api: &str,
        op: state::rollout_command::Op,
    ) -> Result<cp::RolloutReply, Status> {
        let kind = state::command::Kind::Rollout(state::RolloutCommand {
            api: api.to_string(),
            op: Some(op),
        });
        let written = self.command(t, kind).await?;
        self.rollout_reply(t, api, written.log_index).await
    }
}

#[tonic::async_trait]
impl Rollouts for Service {
    async fn start_rollout(
        &self,
        req: Request<cp::StartRolloutRequest>,
    ) -> Result<Response<cp::RolloutReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        let start = r.rollout.unwrap_or_default();
        check_size("the webhook", &start.webhook, 2048)?;
        Ok(Response::new(
            self.rollout_command(&t, &r.api, state::rollout_command::Op::Start(start))
                .await?,
        ))
    }

    async fn get_rollout(
        &self,
        req: Request<cp::GetRolloutRequest>,
    ) -> Result<Response<cp::RolloutReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        Ok(Response::new(self.rollout_reply(&t, &r.api, 0).await?))
    }

    async fn list_rollouts(
        &self,
        req: Request<cp::GetRolloutRequest>,
    ) -> Result<Response<cp::ListRolloutsReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        let resp = self
            .inner
            .nodes
            .call(|c| {
                let mut c = c.with_authorization(t.clone());
                let req = RolloutsRequest {
                    api: r.api.clone(),
                    local: false,
                };
                async move { c.rollouts(req).await }
            })
            .await?;
        Ok(Response::new(cp::ListRolloutsReply {
            rollouts: resp.rollouts,
            history: resp.history,
            alerts: resp.alerts,
            now_ms: resp.now_ms,
        }))
    }

    async fn control_rollout(
        &self,
        req: Request<cp::ControlRolloutRequest>,
    ) -> Result<Response<cp::RolloutReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        check_size("the reason", &r.reason, 1024)?;
        if !matches!(r.action.as_str(), "pause" | "resume" | "abort") {
            return Err(Status::invalid_argument(format!(
                "action {:?} is not pause, resume or abort",
                r.action
            )));
        }
        let control = state::RolloutControl {
            rollout: 0,
            action: r.action,
            reason: r.reason,
        };
        Ok(Response::new(
            self.rollout_command(&t, &r.api, state::rollout_command::Op::Control(control))
                .await?,
        ))
    }
}
