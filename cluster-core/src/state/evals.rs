//! Evaluations in the replicated state: created by the commands that give
//! a job work to do, closed by the plan committed for them.
//!
//! A job has at most one open evaluation: a new one supersedes the open
//! one (which is dropped), so a worker still planning the old one gets its
//! plan refused and the new one, made from the newer job, does the work.
//! Closed evaluations are kept only as each job's latest, for `job status`.

use std::collections::BTreeSet;

use super::{Applied, ClusterState};
use crate::ids::{EvalId, JobId, NodeId};
use crate::model::alloc::AllocStatus;
use crate::model::eval::{EvalStatus, EvalTrigger, Evaluation};
use crate::model::plan::Plan;

/// The record marking a system job whose open evaluation must run once
/// more when it closes: nodes joined or changed while it was open.
pub fn system_rerun_key(job: &JobId) -> String {
    format!("system-rerun/{job}")
}

/// The record holding when (Unix ms) a system job's rolling update last
/// began a set of nodes (see `UpdateStrategy::stagger_ms`).
pub fn system_set_key(job: &JobId) -> String {
    format!("system-set/{job}")
}

/// What became of one evaluation's plan.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanOutcome {
    /// Committed. Refused placements (the node filled up since the plan was
    /// made) leave the evaluation pending, to be planned again.
    Applied(Applied),
    /// The evaluation is no longer open, or the job changed since the plan
    /// was made: nothing was applied.
    Superseded,
}

impl ClusterState {
    /// Opens an evaluation for `job`, superseding the job's open one.
    /// The job's open evaluation, if any.
    pub fn open_eval_of(&self, job: &JobId) -> Option<EvalId> {
        self.open_eval.get(job).copied()
    }

    pub fn create_eval(&mut self, job: &JobId, trigger: EvalTrigger, node: Option<NodeId>) -> EvalId {
        if let Some(old) = self.open_eval.remove(job) {
            self.pending.remove(&old);
            self.blocked.remove(&old);
            self.evals.remove(&old);
        }
        let id = EvalId(self.next_eval);
        self.next_eval += 1;
        let eval = Evaluation {
            id,
            job: job.clone(),
            trigger,
            node,
            status: EvalStatus::Pending,
            placed: 0,
            unplaced: Vec::new(),
            wait_until_ms: None,
        };
        self.index_eval(&eval);
        self.evals.insert(id, eval);
        id
    }

    /// Adds an evaluation to the indexes (a new one, or one restored).
    pub(super) fn index_eval(&mut self, eval: &Evaluation) {
        match eval.status {
            EvalStatus::Pending => {
                self.pending.insert(eval.id);
                self.open_eval.insert(eval.job.clone(), eval.id);
            }
            EvalStatus::Blocked => {
                self.blocked.insert(eval.id);
                self.open_eval.insert(eval.job.clone(), eval.id);
            }
            EvalStatus::Complete => {
                self.closed_eval.insert(eval.job.clone(), eval.id);
            }
        }
    }

    /// Commits `plan` for evaluation `id` and moves the evaluation on:
    /// complete when everything was placed, blocked when some instances
    /// fit nowhere, still pending when placements were refused or the
    /// plan was one part of more (`Plan::deferred`), or pending until
    /// `Plan::wait_until_ms` when failed instances wait to be placed again
    /// (blocked, when some also fit nowhere, with the wait kept: the broker
    /// tries it again then, or when capacity changes).
    pub fn apply_eval_plan(&mut self, id: EvalId, plan: &Plan) -> PlanOutcome {
        let current = self.evals.get(&id).filter(|e| e.status.is_open() && e.job == plan.job);
        let job_version = self.jobs.get(&plan.job).map(|j| j.version);
        if current.is_none() || job_version != Some(plan.job_version) {
            return PlanOutcome::Superseded;
        }
        let applied = self.apply_plan(plan);
        // A part that placed or stopped something: the next part follows.
        // One that did neither waits for capacity like any other.
        let progressed = !applied.placed.is_empty() || !applied.stopped.is_empty();
        let retry_now = !applied.refused.is_empty() || (plan.is_partial() && progressed);
        // Failed instances wait for their reschedule delay: planned again
        // then (capacity for the rest, if any, is looked at too).
        // One also blocked for capacity stays blocked (capacity retries it,
        // and peers may take it), and is tried again at that time too.
        let wait_until_ms = plan.wait_until_ms.filter(|_| !retry_now);
        let status = if retry_now {
            EvalStatus::Pending
        } else if plan.unplaced_count() > 0 || plan.is_partial() {
            EvalStatus::Blocked
        } else if wait_until_ms.is_some() {
            EvalStatus::Pending
        } else {
            EvalStatus::Complete
        };
        let eval = self.evals.get_mut(&id).expect("checked above");
        eval.placed += applied.placed.len() as u32;
        eval.unplaced = plan.unplaced.clone();
        eval.wait_until_ms = wait_until_ms;
        let old = std::mem::replace(&mut eval.status, status);
        if old != status {
            let eval = eval.clone();
            self.pending.remove(&id);
            self.blocked.remove(&id);
            if !status.is_open() {
                self.open_eval.remove(&eval.job);
                if let Some(prev) = self.closed_eval.insert(eval.job.clone(), id) {
                    self.evals.remove(&prev);
                }
            }
            self.index_eval(&eval);
            // Nodes changed while it was open: the system job looks again.
            if status != EvalStatus::Pending && self.records.remove(&system_rerun_key(&eval.job)).is_some() {
                self.create_eval(&eval.job, EvalTrigger::NodeUpdate, None);
            }
        }
        // What the plan placed or stopped may end the job's deployment.
        self.advance_deployment(&plan.job);
        PlanOutcome::Applied(applied)
    }

    /// A node went down: its live allocations are lost, and every job that
    /// had one gets an evaluation to replace them.
    pub(crate) fn node_lost(&mut self, node: &NodeId) -> Vec<EvalId> {
        let lost: Vec<_> = self
            .allocs
            .values()
            .filter(|a| a.node == *node && !a.status.is_terminal())
            .map(|a| (a.id, a.job.clone()))
            .collect();
        let mut jobs = BTreeSet::new();
        for (id, job) in lost {
            self.set_alloc_status(id, AllocStatus::Lost);
            jobs.insert(job);
        }
        for j in &jobs {
            // The evaluation below follows whatever this moved.
            self.deployment_moved(j);
        }
        jobs.into_iter().map(|j| self.create_eval(&j, EvalTrigger::NodeDown, Some(node.clone()))).collect()
    }

    /// Every job with a live allocation on `node` gets an evaluation.
    pub(crate) fn jobs_on_node(&self, node: &NodeId) -> BTreeSet<JobId> {
        self.allocs.values().filter(|a| a.node == *node && a.is_live()).map(|a| a.job.clone()).collect()
    }

    pub fn eval(&self, id: EvalId) -> Option<&Evaluation> {
        self.evals.get(&id)
    }

    pub fn evals(&self) -> impl Iterator<Item = &Evaluation> {
        self.evals.values()
    }

    /// Pending evaluations, oldest first.
    pub fn pending_evals(&self) -> impl Iterator<Item = EvalId> + '_ {
        self.pending.iter().copied()
    }

    pub fn blocked_evals(&self) -> impl Iterator<Item = EvalId> + '_ {
        self.blocked.iter().copied()
    }

    /// The id the next evaluation will get: every evaluation ever created
    /// here has a lower one (ids only rise, across collection and restore).
    pub fn next_eval_id(&self) -> u64 {
        self.next_eval
    }

    /// The job's open evaluation, or else its latest closed one.
    pub fn job_eval(&self, job: &JobId) -> Option<&Evaluation> {
        let id = self.open_eval.get(job).or_else(|| self.closed_eval.get(job))?;
        self.evals.get(id)
    }

    /// See the field: rises when capacity may have appeared.
    pub fn capacity_epoch(&self) -> u64 {
        self.capacity_epoch
    }
}
