//! How far a job has come, instance by instance, and the one word that
//! says it: what `job list`, `job status` and `job run` show.
//!
//! The words are Nomad's job summary states, told per instance (Nomad's
//! `JobSummary`: queued, starting, running, complete, failed, lost) and
//! folded into one job state that never claims more than is true: a batch
//! job is `complete` only when every instance completed, `failed` when
//! nothing runs or will and an instance failed for good, `running` only
//! while something runs or will; a service with instances failed for good
//! is `degraded` while others run, `failed` when none do.

use std::collections::BTreeMap;

use crate::model::alloc::AllocStatus;
use crate::model::alloc::DesiredStatus;
use crate::model::eval::EvalStatus;
use crate::model::job::{Job, JobType};
use crate::model::node::keyword_enum;
use crate::scheduler::reconcile::{completed_batch, failed_for_good, latest_ended, system_failed_for_good};

use super::{ClusterState, settled_key, settled_value};

/// A job's state, one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Its evaluation has not run yet, and instances wait for it.
    Pending,
    /// Something runs, or will (placed, restarting, to be placed again).
    Running,
    /// Instances wait for capacity no node has now.
    Blocked,
    /// A service some of whose instances failed for good while others run.
    Degraded,
    /// Every instance completed (batch only).
    Complete,
    /// Nothing runs or will, and instances failed for good.
    Failed,
    /// Stopped by its user.
    Stopped,
}

keyword_enum!(JobState {
    Pending = "pending",
    Running = "running",
    Blocked = "blocked",
    Degraded = "degraded",
    Complete = "complete",
    Failed = "failed",
    Stopped = "stopped",
});

/// Where one wanted instance (`group[index]` of the job's version) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum InstanceState {
    /// A live allocation has it (any version, here), or a peer holds it
    /// and has not said it completed.
    Running,
    /// Nothing has it now; it will be placed (again).
    Waiting,
    /// It completed (a batch instance, here or at a peer).
    Complete,
    /// It failed and its group's reschedule policy places it no more (or
    /// it could not start at all): nothing will run it until the job
    /// changes.
    Failed,
}

keyword_enum!(InstanceState { Running = "running", Waiting = "waiting", Complete = "complete", Failed = "failed" });

/// A job's state and its instances by [`InstanceState`] (word → count;
/// system jobs, which have no fixed instances, count live allocations as
/// running and those that failed for good on their node as failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub state: JobState,
    pub instances: BTreeMap<&'static str, u64>,
}

/// The progress of `job` in `state` (see the module docs).
pub fn progress(state: &ClusterState, job: &Job) -> Progress {
    let mut instances: BTreeMap<&'static str, u64> = BTreeMap::new();
    if job.stopped {
        return Progress { state: JobState::Stopped, instances };
    }
    let eval = state.job_eval(&job.id).map(|e| e.status);
    if job.job_type == JobType::System {
        // One instance per node: live ones run; one that failed for good
        // on its node is not placed there again.
        let live = state.allocs_of_job(&job.id).filter(|a| a.is_live()).count() as u64;
        let failed = system_failed_for_good(state, job).len() as u64;
        for (word, n) in [(InstanceState::Running, live), (InstanceState::Failed, failed)] {
            if n > 0 {
                instances.insert(word.as_str(), n);
            }
        }
        let word = match eval {
            Some(EvalStatus::Blocked) => JobState::Blocked,
            Some(EvalStatus::Pending) if live == 0 => JobState::Pending,
            _ if failed > 0 && live == 0 => JobState::Failed,
            _ if failed > 0 => JobState::Degraded,
            _ => JobState::Running,
        };
        return Progress { state: word, instances };
    }
    let each = per_instance(state, job);
    for s in each.iter().flatten() {
        *instances.entry(s.as_str()).or_default() += 1;
    }
    let n = |s: InstanceState| instances.get(s.as_str()).copied().unwrap_or(0);
    let (running, waiting, failed) = (n(InstanceState::Running), n(InstanceState::Waiting), n(InstanceState::Failed));
    let word = if running == 0 && waiting == 0 {
        // Nothing runs or will: it failed, or it is done (a batch job
        // whose every instance completed). A service scaled to zero runs
        // what it wants: nothing.
        if failed > 0 {
            JobState::Failed
        } else if job.job_type == JobType::Batch {
            JobState::Complete
        } else {
            JobState::Running
        }
    } else if waiting > 0 && eval == Some(EvalStatus::Blocked) {
        JobState::Blocked
    } else if waiting > 0 && running == 0 && eval == Some(EvalStatus::Pending) {
        JobState::Pending
    } else if failed > 0 && job.job_type == JobType::Service {
        JobState::Degraded
    } else {
        JobState::Running
    };
    Progress { state: word, instances }
}

/// Every wanted instance's state: `[group][index]`.
fn per_instance(state: &ClusterState, job: &Job) -> Vec<Vec<InstanceState>> {
    let mut out: Vec<Vec<InstanceState>> =
        job.groups.iter().map(|g| vec![InstanceState::Waiting; g.count as usize]).collect();
    let group_of = |name: &str| job.groups.iter().position(|g| &*g.name == name);
    // Most telling first: a live allocation beats a completion or failure
    // on record (a replacement runs), a completion beats failures.
    let mut raise = |g: usize, i: u32, s: InstanceState| {
        if let Some(slot) = out[g].get_mut(i as usize) {
            let rank = |s: InstanceState| match s {
                InstanceState::Running => 3,
                InstanceState::Complete => 2,
                InstanceState::Failed => 1,
                InstanceState::Waiting => 0,
            };
            if rank(s) > rank(*slot) {
                *slot = s;
            }
        }
    };
    for (holder, held) in state.holds().iter().filter(|(_, h)| h.job == job.id) {
        let Some(g) = group_of(&held.group) else { continue };
        let settled = state.record(&settled_key(holder)) == Some(settled_value(job.version).as_slice());
        for &i in &held.indices {
            raise(g, i, if settled { InstanceState::Complete } else { InstanceState::Running });
        }
    }
    for a in state.allocs_of_job(&job.id) {
        let Some(g) = group_of(&a.group) else { continue };
        if a.is_live() {
            raise(g, a.index, InstanceState::Running);
        } else if completed_batch(job, a) {
            raise(g, a.index, InstanceState::Complete);
        }
    }
    for ((group, index), a) in latest_ended(state, job) {
        let Some(g) = group_of(group) else { continue };
        if a.status == AllocStatus::Failed
            && a.desired == DesiredStatus::Run
            && failed_for_good(&job.groups[g].reschedule, a)
        {
            raise(g, index, InstanceState::Failed);
        }
    }
    out
}
