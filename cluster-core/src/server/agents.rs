//! The server's side of the agent protocol ([`crate::agent::rpc`]): every
//! server answers agents; writes go to the leader like any other.

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use super::api::ApiError;
use super::rpc::{Write, WriteReply};
use crate::agent::rpc::{AgentAlloc, AgentReply, AgentRequest, NodeAllocs, SYNC_WAIT_MAX_MS};
use crate::ids::NodeId;
use crate::model::alloc::AllocReport;
use crate::state::ClusterState;
use crate::transport::Identity;

pub(crate) async fn handle(server: &Inner, from: &Identity, request: AgentRequest) -> AgentReply {
    let node = match &request {
        AgentRequest::Register(n) => &n.id,
        AgentRequest::Heartbeat(n) | AgentRequest::Sync { node: n, .. } | AgentRequest::Report { node: n, .. } => n,
    };
    if from.cluster != server.options.cluster || from.name != node.as_str() {
        tracing::warn!(from = %from, node = %node, "an agent spoke for a node that is not its own; refused");
        return error(ApiError::new(
            403,
            format!("{from} may speak only for node {} of cluster {}", from.name, from.cluster),
        ));
    }
    let result = match request {
        AgentRequest::Register(mut n) => match super::http::check_node(&mut n) {
            Ok(()) => server.write(Write::RegisterNodes(vec![*n])).await.map(|r| alive(server, r)),
            Err(e) => Err(e),
        },
        AgentRequest::Heartbeat(n) => server.write(Write::Heartbeat(vec![n])).await.map(|r| alive(server, r)),
        AgentRequest::Sync { node, after, wait_ms } => return sync(server, node, after, wait_ms).await,
        AgentRequest::Report { node, reports } => report(server, &node, reports).await,
    };
    result.unwrap_or_else(error)
}

fn alive(server: &Inner, r: WriteReply) -> AgentReply {
    let grace_ms = server.options.heartbeat_grace.as_millis() as u64;
    match r {
        WriteReply::Heartbeat { ttl_ms, unknown, grants } => {
            AgentReply::Alive { ttl_ms, grace_ms, known: unknown.is_empty(), grants }
        }
        other => AgentReply::Error { status: 500, message: format!("unexpected reply {other:?}") },
    }
}

fn error(e: ApiError) -> AgentReply {
    AgentReply::Error { status: e.status, message: e.message }
}

/// Waits until the state is past `after` (or `wait_ms` passed), then
/// answers with the node's live allocations, read locally: an agent may
/// lag its leader by a moment, never miss a change for long.
async fn sync(server: &Inner, node: NodeId, after: u64, wait_ms: u64) -> AgentReply {
    let mut status = server.raft.watch_status();
    let wait = Duration::from_millis(wait_ms.min(SYNC_WAIT_MAX_MS));
    let _ = tokio::time::timeout(wait, async {
        while status.borrow_and_update().applied <= after {
            if status.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let index = server.raft.status().applied;
    let allocs = server.raft.read(|s| node_allocs(s, &node, index));
    AgentReply::Sync(allocs)
}

/// The node's allocations that are not terminal, with what to run.
pub fn node_allocs(state: &ClusterState, node: &NodeId, index: u64) -> NodeAllocs {
    let allocs = state
        .allocs_on_node(node)
        .filter(|a| !a.status.is_terminal())
        .filter_map(|a| {
            let job = state.job(&a.job)?;
            let group = job.group(&a.group)?;
            Some(AgentAlloc {
                id: a.id,
                job: a.job.clone(),
                job_type: job.job_type,
                index: a.index,
                group: Arc::new(group.clone()),
                desired: a.desired,
                status: a.status,
                lease: job.delegation_lease(group).map(str::to_string),
            })
        })
        .collect();
    let drain_deadline_ms = state.node_idx(node).and_then(|i| state.node(i).drain_deadline_ms);
    NodeAllocs { index, allocs, drain_deadline_ms }
}

/// Reports about allocations on other nodes are dropped: an agent speaks
/// for its own node only.
async fn report(server: &Inner, node: &NodeId, reports: Vec<AllocReport>) -> Result<AgentReply, ApiError> {
    let (mine, unknown) = server.raft.read(|s| {
        let mut unknown = 0;
        let mine: Vec<AllocReport> = reports
            .into_iter()
            .filter(|r| match s.alloc(r.id) {
                Some(a) => &a.node == node,
                // Placed once, gone now: collected (it had ended), so the
                // report is moot and acknowledged, or the agent would send
                // it, and everything queued behind it, forever.
                None if s.was_placed(r.id) => false,
                None => {
                    unknown += 1;
                    false
                }
            })
            .collect();
        (mine, unknown)
    });
    for chunk in mine.chunks(crate::command::ALLOC_STATUS_BATCH_MAX) {
        server.write(Write::AllocStatus(chunk.to_vec())).await?;
    }
    if unknown > 0 {
        // This server may lag the one the agent synced with: the agent
        // sends these again.
        return Err(ApiError::unavailable(format!("{unknown} allocations not known here yet")));
    }
    Ok(AgentReply::Done)
}
