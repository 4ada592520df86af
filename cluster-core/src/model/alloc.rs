//! Allocations: placed instances of task groups.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{AllocId, JobId, NodeId};
use crate::model::node::keyword_enum;
use crate::resources::{GpuDevices, Resources};

/// What the cluster wants of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredStatus {
    Run,
    Stop,
}

/// What the allocation is actually doing, as its agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocStatus {
    Pending,
    Running,
    Complete,
    Failed,
    /// Its node went down; the instance is replaced elsewhere.
    Lost,
}

keyword_enum!(DesiredStatus { Run = "run", Stop = "stop" });
keyword_enum!(AllocStatus {
    Pending = "pending",
    Running = "running",
    Complete = "complete",
    Failed = "failed",
    Lost = "lost",
});

impl AllocStatus {
    /// Terminal allocations hold no resources and never run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, AllocStatus::Complete | AllocStatus::Failed | AllocStatus::Lost)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: AllocId,
    pub job: JobId,
    pub job_version: u64,
    pub group: Arc<str>,
    /// Which of the group's `count` instances this is: `job.group[index]`.
    pub index: u32,
    pub node: NodeId,
    pub resources: Resources,
    /// The GPUs taken, by model.
    pub gpus: Option<GpuDevices>,
    pub desired: DesiredStatus,
    pub status: AllocStatus,
    /// Each task's state as the agent last reported it (empty until then).
    pub tasks: Vec<TaskState>,
    /// Whether it became healthy (see [`AllocHealth`]), as its agent
    /// reported; once set, it stays.
    pub health: Option<AllocHealth>,
    /// Placed as a canary of a deployment: beside the old version, before
    /// the rest (see [`crate::model::job::UpdateStrategy::canary`]).
    pub canary: bool,
    /// Unix ms at which the server that logged its failure learned of it
    /// (`None`: it did not fail, or the report came without a time).
    pub failed_at_ms: Option<u64>,
    /// The reschedules of its instance that led to it, oldest first, as
    /// many as its group's policy still needs (see
    /// [`crate::model::job::ReschedulePolicy::keep`]); empty for a first
    /// placement, and for the first one of a new version.
    pub reschedules: Vec<crate::model::job::RescheduleEvent>,
}

/// Whether an instance became healthy: every task running for the
/// group's `min_healthy_time` with every check passing (`Healthy`), or
/// not by its `healthy_deadline` or failed first (`Unhealthy`). Decided
/// once, by the agent, as Nomad's clients decide an allocation's
/// deployment health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocHealth {
    Healthy,
    Unhealthy,
}

keyword_enum!(AllocHealth { Healthy = "healthy", Unhealthy = "unhealthy" });

/// A health check's last result, as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckState {
    pub name: Arc<str>,
    /// `tcp`, `http` or `script`.
    pub kind: Arc<str>,
    pub status: CheckStatus,
    /// What the last run said: "connection refused", "HTTP 503", the
    /// script's last output line (at most [`CHECK_OUTPUT_MAX`] bytes).
    pub output: String,
}

/// The most bytes of a check's output kept in its state.
pub const CHECK_OUTPUT_MAX: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Not run yet.
    Pending,
    Passing,
    Critical,
}

keyword_enum!(CheckStatus { Pending = "pending", Passing = "passing", Critical = "critical" });

/// One task of a running allocation, as its agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    pub name: Arc<str>,
    pub state: TaskPhase,
    /// Restarts the agent made.
    pub restarts: u32,
    /// The last exit: its code, or the signal that ended it.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why it is in this state, for `hanse alloc status` ("command
    /// `/opt/x` not found", "exited with code 3; restarting in 1s").
    pub message: String,
    /// Its health checks' last results.
    pub checks: Vec<CheckState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskPhase {
    Pending,
    Running,
    /// Exited; `exit_code`/`signal` say how.
    Dead,
    /// Could not start and never will with this spec: its command is
    /// missing, not executable, not a program for this machine, or a spec
    /// no driver takes. `message` says which. Its allocation fails for
    /// good: neither restarted nor placed again until its group's tasks
    /// change (a new version; a change of `count` alone keeps it).
    Unrunnable,
}

keyword_enum!(TaskPhase { Pending = "pending", Running = "running", Dead = "dead", Unrunnable = "unrunnable" });

/// An agent's report on one allocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocReport {
    pub id: AllocId,
    pub status: AllocStatus,
    /// Empty keeps the task states the cluster has.
    pub tasks: Vec<TaskState>,
    /// Set once the agent decided it; `None` keeps what the cluster has.
    pub health: Option<AllocHealth>,
}

impl AllocReport {
    pub fn status(id: AllocId, status: AllocStatus) -> AllocReport {
        AllocReport { id, status, tasks: Vec::new(), health: None }
    }
}

impl Allocation {
    /// Holds node resources: not yet terminal, whatever is desired of it.
    pub fn holds_resources(&self) -> bool {
        !self.status.is_terminal()
    }

    /// Counts towards the group's `count`: wanted and not terminal.
    pub fn is_live(&self) -> bool {
        self.desired == DesiredStatus::Run && !self.status.is_terminal()
    }

    /// Whether a task of it could not start and never will (see
    /// [`TaskPhase::Unrunnable`]): placing it again cannot help.
    pub fn unrunnable(&self) -> bool {
        self.tasks.iter().any(|t| t.state == TaskPhase::Unrunnable)
    }

    pub fn name(&self) -> String {
        format!("{}.{}[{}]", self.job, self.group, self.index)
    }
}
