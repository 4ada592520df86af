//! Evaluations: reasons to (re)schedule a job.

use serde::{Deserialize, Serialize};

use crate::ids::{EvalId, JobId, NodeId};
use crate::model::node::keyword_enum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalTrigger {
    JobRegister,
    JobStop,
    NodeDown,
    NodeDrain,
    AllocFailed,
    DelegationLost,
}

keyword_enum!(EvalTrigger {
    JobRegister = "job-register",
    JobStop = "job-stop",
    NodeDown = "node-down",
    NodeDrain = "node-drain",
    AllocFailed = "alloc-failed",
    DelegationLost = "delegation-lost",
});

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalStatus {
    Pending,
    Complete,
    /// Some instances could not be placed; the evaluation waits for capacity.
    Blocked,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub id: EvalId,
    pub job: JobId,
    pub trigger: EvalTrigger,
    /// The node whose change triggered this, if any.
    pub node: Option<NodeId>,
    pub status: EvalStatus,
}
