//! Evaluations: reasons to (re)schedule a job.

use serde::{Deserialize, Serialize};

use crate::ids::{EvalId, JobId, NodeId};
use crate::model::node::keyword_enum;
use crate::model::plan::Unplaced;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalTrigger {
    JobRegister,
    JobStop,
    NodeDown,
    NodeDrain,
    AllocFailed,
    DelegationLost,
    /// Instances went to another cluster.
    Delegated,
    /// An at-most-once instance that was being replaced has stopped, so
    /// its replacement may start now.
    AllocStopped,
    /// A node joined, changed, came back up or became eligible again: the
    /// system jobs look at it.
    NodeUpdate,
    /// An instance of a deployment's version became healthy or unhealthy:
    /// the next ones may be replaced.
    AllocHealth,
    /// A deployment moved on: canaries promoted, failed, or rolled back.
    Deployment,
}

keyword_enum!(EvalTrigger {
    JobRegister = "job-register",
    JobStop = "job-stop",
    NodeDown = "node-down",
    NodeDrain = "node-drain",
    AllocFailed = "alloc-failed",
    DelegationLost = "delegation-lost",
    Delegated = "delegated",
    AllocStopped = "alloc-stopped",
    NodeUpdate = "node-update",
    AllocHealth = "alloc-health",
    Deployment = "deployment",
});

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalStatus {
    /// Waiting for a scheduler worker.
    Pending,
    /// Its plan was committed and placed every instance.
    Complete,
    /// Some instances could not be placed; the evaluation waits for
    /// capacity and is tried again when some frees up.
    Blocked,
}

keyword_enum!(EvalStatus { Pending = "pending", Complete = "complete", Blocked = "blocked" });

impl EvalStatus {
    /// Open evaluations still have work to do; a job has at most one.
    pub fn is_open(self) -> bool {
        matches!(self, EvalStatus::Pending | EvalStatus::Blocked)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub id: EvalId,
    pub job: JobId,
    pub trigger: EvalTrigger,
    /// The node whose change triggered this, if any.
    pub node: Option<NodeId>,
    pub status: EvalStatus,
    /// Instances placed by the plans committed for it.
    pub placed: u32,
    /// What the latest plan could not place, with reasons.
    pub unplaced: Vec<Unplaced>,
    /// A pending evaluation is not handed out before then (Unix ms): the
    /// failed instances it is to place again wait for their reschedule
    /// delay (Nomad's `WaitUntil`).
    pub wait_until_ms: Option<u64>,
}
