//! `tollgate.cp.v1.Calls`: the call log, asked of every node and merged.
//!
//! Each node keeps the calls it served (docs/calls.md), so a query goes to every member
//! the cluster lists, with the caller's token (each node checks it and scopes a tenant to
//! its own calls). A node that does not answer within [`NODE_TIMEOUT`] is named in the
//! reply's `missing`; the others' records are returned. Following polls every node for
//! what it wrote after its cursor.

use std::time::Duration;

use futures::future::join_all;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_proto::cp::v1 as cp;
use tollgate_proto::cp::v1::calls_server::Calls;
use tollgate_proto::node::v1::{CallQuery, CallQueryResponse, CallRecord};
use tonic::{Request, Response, Status};

use crate::{Service, Token, token};

/// How long one node may take to answer a query.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a follower asks the nodes for new records.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// How often a follower re-reads the membership (nodes added or removed).
const MEMBERS_EVERY: Duration = Duration::from_secs(10);

impl Service {
    /// The members' gRPC addresses, as the cluster lists them.
    async fn members(&self) -> Result<Vec<(u64, String)>, Status> {
        let status = self
            .inner
            .nodes
            .call(|mut c| async move { c.cluster_status().await })
            .await?;
        Ok(status.members.into_iter().map(|m| (m.id, m.addr)).collect())
    }

    /// Sends every member its query (`query` of its id) at once; each answer or why
    /// there is none.
    async fn ask_all(
        &self,
        members: &[(u64, String)],
        t: &Token,
        query: impl Fn(u64) -> CallQuery,
    ) -> Vec<(u64, String, Result<CallQueryResponse, Status>)> {
        let asks = members.iter().map(|(id, addr)| {
            let q = query(*id);
            let client = self.inner.nodes.client(addr);
            async move {
                let answer = match client {
                    Err(e) => Err(e),
                    Ok(c) => {
                        let mut c = c.with_authorization(t.clone());
                        match tokio::time::timeout(NODE_TIMEOUT, c.query_calls(q)).await {
                            Err(_) => Err(Status::deadline_exceeded(format!(
                                "no answer within {NODE_TIMEOUT:?}"
                            ))),
                            Ok(Err(tollgate_sdk::Error::Status(s))) => Err(s),
                            Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
                            Ok(Ok(r)) => Ok(r),
                        }
                    }
                };
                (*id, addr.clone(), answer)
            }
        });
        join_all(asks).await
    }
}

/// Merges the nodes' answers: newest first, or slowest first, cut to the query's limit.
/// When every node refused the query for the same reason (a bad filter, a token that may
/// not ask), that reason is the answer.
fn merge(
    q: &CallQuery,
    answers: Vec<(u64, String, Result<CallQueryResponse, Status>)>,
) -> Result<cp::CallsReply, Status> {
    let mut reply = cp::CallsReply {
        nodes: answers.len() as u32,
        ..Default::default()
    };
    let mut refusals = Vec::new();
    for (id, addr, answer) in answers {
        match answer {
            Ok(r) => {
                reply.examined += r.examined;
                reply.truncated |= r.truncated;
                reply.dropped += r.dropped;
                reply.missed += r.missed;
                reply.records.extend(r.records);
            }
            Err(s) => {
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                ) {
                    refusals.push(s.clone());
                }
                reply
                    .missing
                    .push(format!("node {id} ({addr}): {}", s.message()));
            }
        }
    }
    if reply.missing.len() == reply.nodes as usize
        && let Some(first) = refusals.first()
        && refusals.len() == reply.missing.len()
    {
        return Err(first.clone());
    }
    sort(q, &mut reply.records);
    Ok(reply)
}

fn sort(q: &CallQuery, records: &mut Vec<CallRecord>) {
    let limit = if q.slowest > 0 {
        q.slowest
    } else if q.limit == 0 {
        100
    } else {
        q.limit
    } as usize;
    if q.slowest > 0 {
        records.sort_by_key(|r| std::cmp::Reverse((r.duration_us, r.time_us, r.node_id)));
    } else if q.follow {
        records.sort_by_key(|r| (r.time_us, r.node_id));
    } else {
        records.sort_by_key(|r| std::cmp::Reverse((r.time_us, r.node_id)));
    }
    // A follower gets everything each node returned (their cursors moved past it).
    if !q.follow {
        records.truncate(limit);
    }
}

#[tonic::async_trait]
impl Calls for Service {
    async fn query_calls(
        &self,
        req: Request<CallQuery>,
    ) -> Result<Response<cp::CallsReply>, Status> {
        let t = token(&req);
        let mut q = req.into_inner();
        q.follow = false;
        let members = self.members().await?;
        let answers = self.ask_all(&members, &t, |_| q.clone()).await;
        Ok(Response::new(merge(&q, answers)?))
    }

    type FollowCallsStream = ReceiverStream<Result<cp::CallsReply, Status>>;

    async fn follow_calls(
        &self,
        req: Request<CallQuery>,
    ) -> Result<Response<Self::FollowCallsStream>, Status> {
        let t = token(&req);
        let mut q = req.into_inner();
        q.follow = true;
        q.after = 0;
        let mut members = self.members().await?;
        // Each node's cursor: where it is now. A bad filter or token is refused here.
        let first = self.ask_all(&members, &t, |_| q.clone()).await;
        let mut cursors: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        let mut first_reply = Vec::new();
        for (id, addr, answer) in first {
            if let Ok(r) = &answer {
                cursors.insert(id, r.cursor);
            }
            first_reply.push((
                id,
                addr,
                answer.map(|r| CallQueryResponse {
                    records: Vec::new(),
                    ..r
                }),
            ));
        }
        let reply = merge(&q, first_reply)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // The first message says which nodes are followed (and which are not).
        let _ = tx.send(Ok(reply)).await;
        let service = self.clone();
        tokio::spawn(async move {
            let mut members_at = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                }
                if members_at.elapsed() >= MEMBERS_EVERY {
                    members_at = tokio::time::Instant::now();
                    if let Ok(m) = service.members().await {
                        members = m;
                    }
                }
                let mut reply = cp::CallsReply {
                    nodes: members.len() as u32,
                    ..Default::default()
                };
                // A node seen for the first time: from its current end.
                let answers = service
                    .ask_all(&members, &t, |id| CallQuery {
                        after: cursors.get(&id).copied().unwrap_or(0),
                        ..q.clone()
                    })
                    .await;
                for (id, addr, answer) in answers {
                    match answer {
                        Ok(r) => {
                            cursors.insert(id, r.cursor);
                            reply.missed += r.missed;
                            reply.records.extend(r.records);
                        }
                        Err(s) => reply
                            .missing
                            .push(format!("node {id} ({addr}): {}", s.message())),
                    }
                }
                if reply.records.is_empty() && reply.missing.is_empty() && reply.missed == 0 {
                    continue;
                }
                sort(&q, &mut reply.records);
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
