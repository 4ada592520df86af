//! Deployments: how a new version of a service job replaces the running
//! one, watched to its end (after Nomad's deployments).
//!
//! A deployment opens when a version of a job whose groups have an
//! `[group.update]` is registered. It is state in the Raft log, so a new
//! leader carries it on: the scheduler reads it to decide how many
//! instances to replace at once, and the state machine moves it on as
//! agents report their instances' health.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::model::node::keyword_enum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentStatus {
    /// Replacing instances; or, with canaries, waiting for them to be
    /// promoted.
    Running,
    /// Every group runs its count of the new version, all healthy, and no
    /// instance of an older version is left. The version is stable.
    Successful,
    /// An instance of the new version became unhealthy, or an operator
    /// failed it (`hanse job deployment fail`): nothing more is replaced.
    Failed,
    /// A newer version of the job, or its stop, took over.
    Cancelled,
}

keyword_enum!(DeploymentStatus {
    Running = "running",
    Successful = "successful",
    Failed = "failed",
    Cancelled = "cancelled",
});

impl DeploymentStatus {
    pub fn is_active(self) -> bool {
        self == DeploymentStatus::Running
    }
}

/// One rollout of one version of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub job: JobId,
    /// The version it rolls out; a job has at most one deployment per
    /// version, so the pair names it.
    pub job_version: u64,
    pub status: DeploymentStatus,
    /// Why it is in its status: "3 of 5 instances healthy", "allocation
    /// 42 unhealthy: task `web` exited with code 1; rolled back to
    /// version 2".
    pub description: String,
    /// The groups that have an `[group.update]`, in the job's order.
    pub groups: Vec<DeploymentGroup>,
    /// The first allocation id it could place: those below it were there
    /// before it opened (carried over unchanged), and are not judged again.
    pub placed_from: crate::ids::AllocId,
}

/// A group's part in a [`Deployment`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentGroup {
    pub name: Arc<str>,
    /// Canaries wanted before the rest (the group's `update.canary`).
    pub canaries: u32,
    /// Whether its canaries were promoted (always, without canaries).
    pub promoted: bool,
}

impl Deployment {
    /// Whether group `name` waits for its canaries to be promoted.
    pub fn awaits_promotion(&self, name: &str) -> bool {
        self.groups.iter().any(|g| &*g.name == name && g.canaries > 0 && !g.promoted)
    }

    pub fn group(&self, name: &str) -> Option<&DeploymentGroup> {
        self.groups.iter().find(|g| &*g.name == name)
    }
}
