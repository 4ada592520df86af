//! Simulated nodes in the server's own process: registered through the
//! server, kept alive, and running what is placed on them as the `mock`
//! driver would (no process): an allocation runs once placed; one whose
//! tasks are all mocks with a `run_for` ends after it with the largest
//! exit code; a stopped one completes. `exec` tasks "run" until stopped.
//! Delegated at-most-once work keeps the agent's rule: it runs only under
//! its delegation's grant ([`crate::agent::lease::Grants`]). A service
//! instance under a deployment is healthy once it ran its group's
//! `min_healthy_time` (no check runs).
//! For `hanse dev` and in-process demos.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Inner;
use super::rpc::{Write, WriteReply};
use crate::agent::lease::Grants;
use crate::ids::{AllocId, NodeId};
use crate::model::alloc::{AllocHealth, AllocReport, AllocStatus, DesiredStatus};
use crate::model::job::{Driver, JobType};
use crate::model::node::Node;

/// Nodes per registration.
const REGISTER_BATCH: usize = 500;
/// How often the simulated agents look at their allocations.
const POLL: Duration = Duration::from_millis(200);

/// Runs `nodes` through `server` until the task is aborted.
pub async fn run(server: Arc<Inner>, nodes: Vec<Node>) {
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
    for chunk in nodes.chunks(REGISTER_BATCH) {
        while let Err(e) = server.write(Write::RegisterNodes(chunk.to_vec())).await {
            tracing::debug!("simulated nodes not registered yet: {}", e.message);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let beat = server.options.heartbeat_ttl / 3;
    let mut last_beat = Instant::now();
    let mut started: HashMap<AllocId, Instant> = HashMap::new();
    let base = Instant::now();
    let mono_ms = || base.elapsed().as_millis() as u64;
    let mut grants = Grants::default();
    let mut awaiting = false;
    loop {
        tokio::time::sleep(POLL).await;
        if last_beat.elapsed() >= beat || awaiting {
            let sent = mono_ms();
            if let Ok(WriteReply::Heartbeat { grants: g, .. }) = server.write(Write::Heartbeat(ids.clone())).await {
                last_beat = Instant::now();
                grants.update(sent, &g);
            }
        }
        let now = mono_ms();
        awaiting = false;
        let reports = server.raft.read(|s| {
            let mut out = Vec::new();
            for id in &ids {
                for a in s.allocs_on_node(id).filter(|a| !a.status.is_terminal()) {
                    if a.desired == DesiredStatus::Stop {
                        out.push(AllocReport::status(a.id, AllocStatus::Complete));
                        continue;
                    }
                    let job = s.job(&a.job);
                    let group = job.and_then(|j| j.group(&a.group));
                    let lease = job.zip(group).and_then(|(j, g)| j.delegation_lease(g));
                    // A grant past half its length asks for a heartbeat now.
                    awaiting |= lease.as_ref().is_some_and(|id| grants.renew_due(id, now));
                    if let Some(id) = lease.filter(|id| !grants.holds(id, now)) {
                        if a.status == AllocStatus::Pending {
                            awaiting = true;
                        } else {
                            started.remove(&a.id);
                            out.push(AllocReport::status(a.id, AllocStatus::Lost));
                            tracing::debug!(alloc = %a.id, delegation = %id, "grant ran out: lost");
                        }
                        continue;
                    }
                    let since = *started.entry(a.id).or_insert_with(Instant::now);
                    if a.status == AllocStatus::Pending {
                        out.push(AllocReport::status(a.id, AllocStatus::Running));
                    }
                    // No check runs here: an instance a deployment waits
                    // for is healthy once it ran the group's min_healthy_time.
                    let update =
                        group.and_then(|g| g.update).filter(|_| job.is_some_and(|j| j.job_type == JobType::Service));
                    if let Some(u) = update.filter(|_| a.health.is_none()) {
                        if since.elapsed() >= Duration::from_millis(u.min_healthy_time_ms) {
                            let healthy = Some(AllocHealth::Healthy);
                            out.push(AllocReport {
                                health: healthy,
                                ..AllocReport::status(a.id, AllocStatus::Running)
                            });
                        }
                    }
                    let mocks: Option<Vec<(u64, i32)>> = group.map(|g| {
                        g.tasks
                            .iter()
                            .map(|t| match t.driver {
                                Driver::Mock { run_for_ms, exit_code } if run_for_ms > 0 => {
                                    Some((run_for_ms, exit_code))
                                }
                                _ => None,
                            })
                            .collect::<Option<Vec<_>>>()
                            .unwrap_or_default()
                    });
                    let Some(mocks) = mocks.filter(|m| !m.is_empty()) else { continue };
                    let run_for = mocks.iter().map(|m| m.0).max().unwrap_or(0);
                    if since.elapsed() >= Duration::from_millis(run_for) {
                        let code = mocks.iter().map(|m| m.1).max().unwrap_or(0);
                        let status = if code == 0 { AllocStatus::Complete } else { AllocStatus::Failed };
                        out.push(AllocReport::status(a.id, status));
                    }
                }
            }
            out
        });
        for r in &reports {
            if r.status.is_terminal() {
                started.remove(&r.id);
            }
        }
        for chunk in reports.chunks(crate::command::ALLOC_STATUS_BATCH_MAX) {
            if let Err(e) = server.write(Write::AllocStatus(chunk.to_vec())).await {
                tracing::debug!("simulated reports not taken: {}", e.message);
            }
        }
    }
}
