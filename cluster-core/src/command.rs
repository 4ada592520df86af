//! Commands: the entries of a cluster's Raft log, and how the state
//! machine applies them.
//!
//! Applying is deterministic: the same commands in the same order give the
//! same state on every server, byte for byte ([`ClusterState::snapshot`]).
//! Heartbeats are not commands: only status changes are logged.

use serde::{Deserialize, Serialize};

use crate::ids::{AllocId, JobId, NodeId, NodeIdx};
use crate::model::alloc::AllocStatus;
use crate::model::job::Job;
use crate::model::node::{Node, NodeStatus};
use crate::model::plan::Plan;
use crate::state::{Applied, ClusterState, StateError};

/// The most allocation updates one command carries.
pub const ALLOC_STATUS_BATCH_MAX: usize = 4_096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Register a node, or update its resources and attributes.
    UpsertNode(Node),
    /// A node leaves: it is marked down and ineligible, and its
    /// allocations are lost (replaced by the next evaluation).
    DeregisterNode(NodeId),
    /// A status change: down after missed heartbeats, back up, draining.
    SetNodeStatus {
        node: NodeId,
        status: NodeStatus,
        eligible: bool,
    },
    /// Register a job or a new version of it.
    RegisterJob(Job),
    StopJob(JobId),
    /// A scheduler's plan; placements are re-checked against current usage.
    ApplyPlan(Plan),
    /// Allocation states reported by agents, batched.
    AllocStatus(Vec<(AllocId, AllocStatus)>),
}

/// What applying a command did, for the proposer waiting on it.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    NodeUpserted(NodeIdx),
    JobRegistered {
        version: u64,
    },
    PlanApplied(Applied),
    Done,
    /// The command was valid to log but could not take effect (an unknown
    /// node, too many GPU models); the state is unchanged.
    Refused(String),
}

impl ClusterState {
    /// Applies one committed command. The only writer of cluster state.
    pub fn apply(&mut self, command: &Command) -> Effect {
        let refused = |e: StateError| Effect::Refused(e.to_string());
        match command {
            Command::UpsertNode(node) => self.upsert_node(node.clone()).map_or_else(refused, Effect::NodeUpserted),
            Command::DeregisterNode(id) => {
                self.set_node_status(id, NodeStatus::Down, false).map_or_else(refused, |()| Effect::Done)
            }
            Command::SetNodeStatus { node, status, eligible } => {
                self.set_node_status(node, *status, *eligible).map_or_else(refused, |()| Effect::Done)
            }
            Command::RegisterJob(job) => Effect::JobRegistered { version: self.upsert_job(job.clone()) },
            Command::StopJob(id) => match self.job(id).cloned() {
                Some(mut job) if !job.stopped => {
                    job.stopped = true;
                    Effect::JobRegistered { version: self.upsert_job(job) }
                }
                Some(job) => Effect::JobRegistered { version: job.version },
                None => Effect::Refused(format!("unknown job {id}")),
            },
            Command::ApplyPlan(plan) => Effect::PlanApplied(self.apply_plan(plan)),
            Command::AllocStatus(updates) => {
                for (id, status) in updates.iter().take(ALLOC_STATUS_BATCH_MAX) {
                    self.set_alloc_status(*id, *status);
                }
                if updates.len() > ALLOC_STATUS_BATCH_MAX {
                    Effect::Refused(format!(
                        "{} updates past the batch limit of {ALLOC_STATUS_BATCH_MAX} ignored",
                        updates.len() - ALLOC_STATUS_BATCH_MAX
                    ))
                } else {
                    Effect::Done
                }
            }
        }
    }
}
