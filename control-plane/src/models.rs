//! `tollgate.cp.v1.Models`: the LLM APIs' models and deployments, with what the nodes
//! metered of their calls (calls, errors, time to first token, tokens) and each
//! deployment's circuit as committed.

use std::collections::BTreeMap;

use tollgate_node::state::usage::{Histogram, add_llm, percentile_us};
use tollgate_proto::cp::v1 as cp;
use tollgate_proto::cp::v1::models_server::Models;
use tollgate_proto::node::v1::UsageRequest;
use tollgate_proto::state::v1 as state;
use tonic::{Request, Response, Status};

use crate::billing::parse_range;
use crate::{Service, check_size, token};

/// (api, version, model, deployment): its provider, the provider's model id.
type Deployments = BTreeMap<(String, String, String, String), (String, String)>;

/// The deployments the published versions' content declares.
fn declared(apis: &[state::ApiState], only: &str) -> Deployments {
    let mut out = Deployments::new();
    for api in apis.iter().filter(|a| only.is_empty() || a.name == only) {
        for v in api
            .versions
            .iter()
            .filter(|v| !v.compiled.is_empty() && v.stage != "retired")
        {
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&v.compiled) else {
                continue;
            };
            let Some(models) = doc.get("models").and_then(|m| m.as_object()) else {
                continue;
            };
            for (model, m) in models {
                for d in m["deployments"].as_array().into_iter().flatten() {
                    let provider = d["provider"].as_str().unwrap_or_default().to_string();
                    let name = d["name"].as_str().unwrap_or(&provider).to_string();
                    let upstream = d["model"].as_str().unwrap_or_default().to_string();
                    out.insert(
                        (api.name.clone(), v.version.clone(), model.clone(), name),
                        (provider, upstream),
                    );
                }
            }
        }
    }
    out
}

fn circuit_name(c: Option<&state::CircuitState>, now_ms: u64) -> String {
    use tollgate_node::state::circuit::{Phase, phase};
    let Some(c) = c else {
        return "closed".into();
    };
    match state::CircuitMode::try_from(c.mode).unwrap_or(state::CircuitMode::Auto) {
        state::CircuitMode::ForcedOpen => "forced_open".into(),
        state::CircuitMode::ForcedClosed => "forced_closed".into(),
        state::CircuitMode::Auto => match phase(Some(c), now_ms) {
            Phase::Closed => "closed".into(),
            Phase::Open { .. } => "open".into(),
            Phase::HalfOpen => "half_open".into(),
        },
    }
}

#[tonic::async_trait]
impl Models for Service {
    async fn list_models(
        &self,
        req: Request<cp::ListModelsRequest>,
    ) -> Result<Response<cp::ListModelsReply>, Status> {
        let t = token(&req);
        let r = req.into_inner();
        check_size("the API name", &r.api, 256)?;
        let (since_ms, until_ms) = parse_range(
            &r.since,
            &r.until,
            std::time::Duration::from_secs(3_600),
            crate::billing::now_ms(),
        )?;
        let apis = self.list(&t, "").await?.apis;
        if !r.api.is_empty() && !apis.iter().any(|a| a.name == r.api) {
            return Err(Status::not_found(format!("there is no API {}", r.api)));
        }
        let usage = self
            .node_usage(
                &t,
                UsageRequest {
                    since_ms,
                    until_ms,
                    ..UsageRequest::default()
                },
            )
            .await?;
        let circuits = self.circuits(&t).await?;
        let circuits: BTreeMap<&str, &state::CircuitState> = circuits
            .circuits
            .iter()
            .map(|c| (c.upstream.as_str(), c))
            .collect();
        let mut lines: BTreeMap<
            (String, String, String, String),
            (String, String, state::LlmEntry),
        > = declared(&apis, &r.api)
            .into_iter()
            .map(|(k, (p, u))| (k, (p, u, state::LlmEntry::default())))
            .collect();
        for e in usage
            .llm
            .iter()
            .filter(|e| r.api.is_empty() || e.api == r.api)
        {
            let line = lines
                .entry((
                    e.api.clone(),
                    e.version.clone(),
                    e.model.clone(),
                    e.deployment.clone(),
                ))
                .or_insert_with(|| {
                    (
                        e.provider.clone(),
                        String::new(),
                        state::LlmEntry::default(),
                    )
                });
            add_llm(&mut line.2, e);
        }
        let minutes = ((until_ms - since_ms) as f64 / 60_000.0).max(1.0);
        let ms = |h: &Histogram, q: f64| percentile_us(h, q).map_or(0.0, |us| us as f64 / 1000.0);
        let models = lines
            .into_iter()
            .map(
                |((api, version, model, deployment), (provider, upstream_model, e))| {
                    let ttft: Histogram = e.ttft.iter().map(|(&b, &n)| (b, n)).collect();
                    let cluster = format!("{api}@{version}/llm/{model}/{deployment}");
                    cp::ModelLine {
                        circuit: circuit_name(
                            circuits.get(cluster.as_str()).copied(),
                            usage.now_ms,
                        ),
                        error_rate: if e.calls == 0 {
                            0.0
                        } else {
                            e.failures as f64 / e.calls as f64
                        },
                        ttft_p50_ms: ms(&ttft, 0.5),
                        ttft_p99_ms: ms(&ttft, 0.99),
                        tokens_per_min: (e.input_tokens + e.output_tokens) as f64 / minutes,
                        calls: e.calls,
                        failures: e.failures,
                        input_tokens: e.input_tokens,
                        output_tokens: e.output_tokens,
                        api,
                        version,
                        model,
                        deployment,
                        provider,
                        upstream_model,
                    }
                },
            )
            .collect();
        Ok(Response::new(cp::ListModelsReply {
            models,
            since_ms,
            until_ms,
        }))
    }
}
