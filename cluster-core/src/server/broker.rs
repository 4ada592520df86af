//! The leader's evaluation broker (pure): which open evaluations go to a
//! scheduler worker next.
//!
//! The queue itself is the replicated state (pending evaluations, oldest
//! first, and blocked ones), so a new leader starts from exactly what the
//! old one left. The broker only remembers what is in flight, so that a
//! job's evaluations run one at a time and in order while different jobs
//! run in parallel, and when each blocked evaluation was last tried.

use std::collections::{HashMap, HashSet};

use crate::ids::{EvalId, JobId};
use crate::model::job::Job;
use crate::state::ClusterState;

/// The most evaluations one worker plans in one batch (one Raft entry).
pub const EVAL_BATCH_MAX: usize = 128;
/// The most instances one batch may ask to place, so one batch of huge
/// jobs cannot make an entry past Raft's message size.
pub const BATCH_INSTANCES_MAX: u64 = 20_000;

/// One evaluation handed to a worker, with the job as it was when handed.
#[derive(Clone, Debug)]
pub struct Work {
    pub eval: EvalId,
    pub job: Job,
    /// A blocked evaluation tried again: a plan that still places nothing
    /// need not be committed (unless its wait changed).
    pub retry_blocked: bool,
    /// The evaluation's `wait_until_ms` when handed out.
    pub wait_until_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Broker {
    in_flight: HashSet<JobId>,
    /// Blocked evaluations, with the capacity epoch they were last tried at.
    tried: HashMap<EvalId, u64>,
    /// Blocked evaluations tried again once their wait was over, with that
    /// wait: each wait is answered once.
    waited: HashMap<EvalId, u64>,
    /// Waiting evaluations this broker has had planned once: a wait comes
    /// from the clock of the leader that planned it, so a new leader
    /// plans each once by its own (the scheduler bounds a wait by the
    /// delay it serves) before it trusts the wait.
    confirmed: HashSet<EvalId>,
}

impl Broker {
    /// The next batch for a worker: pending evaluations oldest first (those
    /// that already placed a part, a big job planned in parts, after the
    /// fresh ones), then blocked ones not tried since capacity last
    /// changed; never two for one job, and never a job already in flight.
    /// A job counts at most one plan's placements toward the batch.
    ///
    /// A pending evaluation whose `wait_until_ms` is after `now_ms` (Unix
    /// ms) waits, once this broker has had it planned; a blocked one is
    /// tried again when capacity changes and once its wait is over.
    pub fn next_batch(&mut self, state: &ClusterState, now_ms: u64) -> Vec<Work> {
        let mut batch = Vec::new();
        let mut instances = 0u64;
        let epoch = state.capacity_epoch();
        let wait_over = |e: &EvalId, waited: &HashMap<EvalId, u64>| {
            let wait = state.eval(*e).and_then(|ev| ev.wait_until_ms);
            wait.is_some_and(|t| t <= now_ms && waited.get(e) != Some(&t))
        };
        let blocked: Vec<EvalId> = state
            .blocked_evals()
            .filter(|e| self.tried.get(e).is_none_or(|t| *t < epoch) || wait_over(e, &self.waited))
            .collect();
        // A big job's next part waits behind work that has had none yet, so
        // it never holds other jobs back for more than one part.
        let (fresh, continuing): (Vec<EvalId>, Vec<EvalId>) =
            state.pending_evals().partition(|e| state.eval(*e).is_none_or(|ev| ev.placed == 0));
        let candidates =
            fresh.into_iter().chain(continuing).map(|e| (e, false)).chain(blocked.into_iter().map(|e| (e, true)));
        for (id, retry_blocked) in candidates {
            if batch.len() >= EVAL_BATCH_MAX || instances >= BATCH_INSTANCES_MAX {
                break;
            }
            let Some(eval) = state.eval(id) else { continue };
            let waits = !retry_blocked && eval.wait_until_ms.is_some_and(|t| t > now_ms);
            if self.in_flight.contains(&eval.job) || (waits && self.confirmed.contains(&id)) {
                continue;
            }
            let Some(job) = state.job(&eval.job) else { continue };
            if retry_blocked {
                self.tried.insert(id, epoch);
                if let Some(t) = eval.wait_until_ms.filter(|t| *t <= now_ms) {
                    self.waited.insert(id, t);
                }
            }
            if waits {
                self.confirmed.insert(id);
            }
            instances += job.instance_count().min(crate::scheduler::PLAN_CHANGES_MAX as u64);
            self.in_flight.insert(job.id.clone());
            batch.push(Work { eval: id, job: job.clone(), retry_blocked, wait_until_ms: eval.wait_until_ms });
        }
        // Forget evaluations that are closed or superseded.
        if self.tried.len() + self.waited.len() + self.confirmed.len() > 2 * state.blocked_evals().count() + 256 {
            self.tried.retain(|e, _| state.eval(*e).is_some());
            self.waited.retain(|e, _| state.eval(*e).is_some_and(|ev| ev.status.is_open()));
            self.confirmed.retain(|e| state.eval(*e).is_some_and(|ev| ev.status.is_open()));
        }
        batch
    }

    /// A worker finished a batch (committed, refused or failed): its jobs
    /// may be handed out again.
    pub fn done(&mut self, batch: &[Work]) {
        for w in batch {
            self.in_flight.remove(&w.job.id);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}
