//! Garbage collection through the log: a stopped or finished job, with its
//! allocations and evaluations, and a node down for long, are dropped by a
//! committed [`crate::command::Command::Gc`] (or an older collection
//! command), so every replica drops the same things (Nomad runs its job,
//! eval and node GC as core jobs on the leader; here the leader proposes
//! the command and the log decides).
//!
//! Collection is two-phase, so that it needs no clock inside the state
//! machine: the first collection that finds an object collectable marks it
//! with the command's time; a later one whose time is past the mark by the
//! threshold drops it. An object that stops being collectable (a stopped
//! job submitted again, a node back up) loses its mark. With a threshold
//! of 0 (`hanse system gc`) one command marks and drops.
//!
//! Kept whatever the age: a job with a live or pending allocation, an open
//! evaluation, or instances another cluster holds for it (a delegation not
//! settled); a job another cluster delegated here until it is stopped
//! (revoked); a node with an allocation that still holds resources. A
//! job's ended allocations are capped instead (`GcPolicy::allocs_per_job`,
//! the most recently placed kept), and dropped in place, without a
//! rebuild: what goes is what its scheduling no longer reads (older
//! versions, indexes past the count, completed or lost service work, a
//! system job's); the latest failure of each instance of its current
//! version (it carries the instance's reschedule history) and completed
//! batch instances (they say their index is done) stay while the job does. A job keeps at most one open and one
//! closed evaluation, so evaluations need no rule.
//!
//! A hold is *settled* when its holder wrote the marker
//! [`settled_key`] naming the job's current version: the instances
//! completed elsewhere, and the hold stays only so they are not run again. A batch job whose holds are all settled
//! is finished like one whose instances all completed here; it goes with
//! its holds, their records and markers. Delegation records and tombstones
//! otherwise have their own rule, in the federation (`Command::DropRecords`
//! against a floor the origin promises), so that a late re-offer is still
//! refused after collection.
//!
//! A batch job collected after it finished runs again if the same spec is
//! submitted again (before, an identical resubmission changed nothing), as
//! in Nomad. A node collected and registering again starts eligible.
//!
//! A job registered again, or a node whose status changes, loses its mark
//! at once, so the threshold counts from when it last became collectable.
//!
//! The rules are versioned by the command that carries them ([`GC_RULES`]):
//! 0 for `Collect` (jobs and nodes only, delegated jobs and held ones
//! kept), 1 for `CollectGarbage` (and the cap), 2 for `Gc` with rules 2
//! (and delegated jobs once stopped, and settled holds), 3 (of a current
//! version's failures only each instance's latest stays: it carries the
//! instance's reschedule history, so an instance that keeps failing no
//! longer keeps every failure).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::ClusterState;
use crate::command::peers_asked_key;
use crate::ids::{AllocId, JobId, NodeId};
use crate::model::AllocStatus;
use crate::model::JobType;
use crate::model::job::LABEL_DELEGATION;
use crate::model::node::NodeStatus;

/// The collection rules a leader proposes now (see the module docs).
pub const GC_RULES: u16 = 3;

/// The record that marks `holder`'s hold settled: its instances completed
/// elsewhere (see the module docs). Its value is [`settled_value`] of the
/// job's version then: a job updated since is not finished by it.
pub fn settled_key(holder: &str) -> String {
    format!("settled/{holder}")
}

/// The value of a [`settled_key`] record: the job version, in decimal.
pub fn settled_value(version: u64) -> Vec<u8> {
    version.to_string().into_bytes()
}

/// How long an object stays collectable before it is dropped, in
/// milliseconds: what the older `Collect` command carries (entries
/// already in logs); the leader now proposes a [`GcPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcThresholds {
    pub job_ms: u64,
    pub node_ms: u64,
}

/// What [`crate::command::Command::CollectGarbage`] collects, and when:
/// jobs and nodes past their threshold, in milliseconds (Nomad's
/// defaults: a job 4 h, a node 24 h), and a cap on the ended allocations
/// each job keeps that its scheduling no longer reads. Evaluations need
/// no rule of their own: a job has at most one open and one closed
/// evaluation (a newer one replaces them), and they go with their job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcPolicy {
    pub job_ms: u64,
    pub node_ms: u64,
    /// Ended allocations of a job that its scheduling no longer reads
    /// (those of an older version or past its count, completed or lost
    /// service work, a system job's), beyond the most recently placed this
    /// many (`None`: no cap). Dropped at once, by count, not by age.
    pub allocs_per_job: Option<u32>,
}

impl GcPolicy {
    pub const DEFAULT: GcPolicy = GcPolicy { job_ms: 4 * 3_600_000, node_ms: 24 * 3_600_000, allocs_per_job: Some(50) };
    /// Everything collectable, now (`hanse system gc`).
    pub const NOW: GcPolicy = GcPolicy { job_ms: 0, node_ms: 0, allocs_per_job: Some(0) };
}

impl GcThresholds {
    /// What a [`crate::command::Command::Collect`] (the command before
    /// [`GcPolicy`]) collects: jobs and nodes only, as it did, so that an
    /// old entry replayed gives the state it gave then.
    pub fn as_policy(self) -> GcPolicy {
        GcPolicy { job_ms: self.job_ms, node_ms: self.node_ms, allocs_per_job: None }
    }
}

/// What one collection dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcCounts {
    pub jobs: u64,
    pub allocs: u64,
    pub evals: u64,
    pub nodes: u64,
}

/// An object marked collectable, with the time of the mark.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GcObject {
    Job(JobId),
    Node(NodeId),
}

/// Whether `job`'s reconciliation (`scheduler::reconcile`) reads the
/// ended allocation `a`: a failure of the current version within the
/// group's count (it counts toward the reschedule limit; a system job
/// counts none), or a completed batch instance of the current version
/// (its index is done). Every other ended allocation is history only.
fn read_by_reconcile(job: &crate::model::Job, a: &crate::model::Allocation) -> bool {
    let in_range = job.group(&a.group).is_some_and(|g| a.index < g.count);
    a.job_version == job.version
        && in_range
        && match (job.job_type, a.status) {
            (JobType::System, _) => false,
            (_, AllocStatus::Failed) => true,
            (JobType::Batch, AllocStatus::Complete) => true,
            _ => false,
        }
}

impl ClusterState {
    /// Whether `job` could go: stopped, or a batch job whose instances have
    /// all ended (here, or settled elsewhere); nothing of it live, open or
    /// held unsettled. `held` has the jobs with an unsettled hold,
    /// `settled` those with a settled one; `rules` as in the module docs.
    fn job_collectable(&self, id: &JobId, held: &BTreeSet<&JobId>, settled: &BTreeSet<&JobId>, rules: u16) -> bool {
        let Some(job) = self.job(id) else { return false };
        let delegated_here = job.labels.contains_key(LABEL_DELEGATION);
        if (delegated_here && (rules < 2 || !job.stopped)) || self.open_eval.contains_key(id) || held.contains(id) {
            return false;
        }
        let mut allocs = self.allocs_of_job(id).peekable();
        let some = allocs.peek().is_some() || settled.contains(id);
        let all_ended = allocs.all(|a| a.status.is_terminal());
        match (job.stopped, job.job_type) {
            (true, _) => all_ended,
            (false, JobType::Batch) => some && all_ended,
            (false, _) => false,
        }
    }

    /// Drops each record that is still byte for byte the one given, with
    /// its hold and settled marker (`Command::DropRecords`). The jobs that
    /// lost a hold and still run are evaluated again.
    pub(crate) fn drop_records(&mut self, records: &[(String, Vec<u8>)]) -> Vec<crate::ids::EvalId> {
        let mut jobs = BTreeSet::new();
        for (holder, bytes) in records {
            if self.records.get(holder) != Some(bytes) {
                continue;
            }
            self.records.remove(holder);
            self.records.remove(&settled_key(holder));
            if let Some(h) = self.holds.remove(holder) {
                jobs.insert(h.job);
            }
        }
        let live: Vec<JobId> = jobs.into_iter().filter(|j| self.job(j).is_some_and(|j| !j.stopped)).collect();
        live.iter().map(|j| self.create_eval(j, crate::model::eval::EvalTrigger::DelegationLost, None)).collect()
    }

    fn node_collectable(&self, id: &NodeId) -> bool {
        let Some(idx) = self.node_idx(id) else { return false };
        self.node(idx).status == NodeStatus::Down
            && self.allocs_by_node.get(id).is_none_or(|ids| ids.iter().all(|a| !self.allocs[a].holds_resources()))
    }

    /// Ended allocations past `cap` per job, oldest placed first, among
    /// those its reconciliation no longer reads (see [`read_by_reconcile`];
    /// from rules 3, of each instance only its latest ended allocation).
    /// Jobs delegated here keep theirs (their origin follows them).
    fn allocs_past_cap(&self, cap: u32, rules: u16) -> BTreeSet<AllocId> {
        let mut out = BTreeSet::new();
        for job in self.jobs.values().filter(|j| !j.labels.contains_key(LABEL_DELEGATION)) {
            // Each instance's newest allocation of the current version, if
            // it ended: a live newer one carries the history on instead.
            let latest: BTreeSet<AllocId> = if rules >= 3 {
                let newest = crate::scheduler::reconcile::newest_by_instance(self, job, |_| true);
                newest.values().filter(|a| a.status.is_terminal()).map(|a| a.id).collect()
            } else {
                BTreeSet::new()
            };
            // Rules 3: an instance's latest ended allocation stays while it
            // failed or carries a reschedule history (a new one carries it
            // on), whatever ended it; older failures go.
            let in_range = |a: &crate::model::Allocation| job.group(&a.group).is_some_and(|g| a.index < g.count);
            let read = |a: &crate::model::Allocation| {
                if rules < 3 {
                    return read_by_reconcile(job, a);
                }
                let carries = a.status == AllocStatus::Failed || !a.reschedules.is_empty();
                (read_by_reconcile(job, a) && a.status == AllocStatus::Complete)
                    || (job.job_type != JobType::System && latest.contains(&a.id) && carries && in_range(a))
            };
            let spent: Vec<AllocId> = self
                .allocs_of_job(&job.id)
                .filter(|a| a.status.is_terminal() && !a.holds_resources() && !read(a))
                .map(|a| a.id)
                .collect();
            // `allocs_of_job` gives ids in the order they were placed.
            let keep = (cap as usize).min(spent.len());
            out.extend(spent[..spent.len() - keep].iter().copied());
        }
        out
    }

    /// Drops ended allocations (they hold no resources) and their index
    /// entries, in place: a cap trims a few at a time, often, and must not
    /// rebuild the state each time.
    fn drop_spent(&mut self, spent: &BTreeSet<AllocId>) {
        let mut jobs = BTreeSet::new();
        let mut nodes = BTreeSet::new();
        for id in spent {
            if let Some(a) = self.allocs.remove(id) {
                jobs.insert(a.job.clone());
                nodes.insert(a.node.clone());
            }
        }
        for j in jobs {
            if let Some(ids) = self.allocs_by_job.get_mut(&j) {
                ids.retain(|id| !spent.contains(id));
            }
        }
        for n in nodes {
            if let Some(ids) = self.allocs_by_node.get_mut(&n) {
                ids.retain(|id| !spent.contains(id));
            }
        }
    }

    /// Applies [`crate::command::Command::Gc`] (and the older commands, as
    /// rules 0 and 1): marks what became
    /// collectable at `now_ms`, unmarks what no longer is, drops what was
    /// marked at least its threshold ago, and drops the ended allocations
    /// past the cap. Deterministic: the same state and command drop the same
    /// things on every replica.
    pub fn collect(&mut self, now_ms: u64, t: GcPolicy, rules: u16) -> GcCounts {
        let is_settled = |holder: &String, job: &JobId| {
            let version = self.jobs.get(job).map(|j| settled_value(j.version));
            rules >= 2 && version.is_some() && self.records.get(&settled_key(holder)) == version.as_ref()
        };
        let held: BTreeSet<&JobId> =
            self.holds.iter().filter(|(k, h)| !is_settled(k, &h.job)).map(|(_, h)| &h.job).collect();
        let settled: BTreeSet<&JobId> =
            self.holds.iter().filter(|(k, h)| is_settled(k, &h.job)).map(|(_, h)| &h.job).collect();
        let jobs: Vec<JobId> =
            self.jobs.keys().filter(|j| self.job_collectable(j, &held, &settled, rules)).cloned().collect();
        let nodes: Vec<NodeId> = self.nodes.iter().map(|n| n.id.clone()).filter(|n| self.node_collectable(n)).collect();
        let spent = t.allocs_per_job.map(|cap| self.allocs_past_cap(cap, rules)).unwrap_or_default();
        let now: BTreeSet<GcObject> =
            jobs.into_iter().map(GcObject::Job).chain(nodes.into_iter().map(GcObject::Node)).collect();
        self.gc_marks.retain(|o, _| now.contains(o));
        for o in &now {
            self.gc_marks.entry(o.clone()).or_insert(now_ms);
        }
        let due = |o: &GcObject, at: u64| {
            let after = match o {
                GcObject::Job(_) => t.job_ms,
                GcObject::Node(_) => t.node_ms,
            };
            now_ms.saturating_sub(at) >= after
        };
        let drop: BTreeSet<GcObject> =
            self.gc_marks.iter().filter(|(o, at)| due(o, **at)).map(|(o, _)| o.clone()).collect();
        let mut counts = GcCounts { allocs: spent.len() as u64, ..GcCounts::default() };
        self.drop_spent(&spent);
        if drop.is_empty() {
            return counts;
        }
        // Rebuilt from its replicated part without what goes: every index
        // is made again the way a restore makes it. A collection drops
        // many objects at once, rarely, so one pass over the state is the
        // simple price.
        let (epoch, applied_at) = (self.capacity_epoch, self.applied_at);
        let mut snap = std::mem::take(self).into_snapshot();
        let gone_job = |j: &JobId| drop.contains(&GcObject::Job(j.clone()));
        let before = (snap.jobs.len(), snap.allocs.len(), snap.evals.len(), snap.nodes.len());
        snap.jobs.retain(|j| !gone_job(&j.id));
        snap.allocs.retain(|a| !gone_job(&a.job));
        snap.evals.retain(|e| !gone_job(&e.job));
        snap.histories.retain(|(j, _)| !gone_job(j));
        snap.nodes.retain(|n| !drop.contains(&GcObject::Node(n.id.clone())));
        let asked: BTreeSet<String> = drop
            .iter()
            .filter_map(|o| {
                if let GcObject::Job(j) = o { Some([peers_asked_key(j), super::system_set_key(j)]) } else { None }
            })
            .flatten()
            .collect();
        // A collected job's holds are all settled (see `job_collectable`):
        // they go with it, with their records and markers.
        let holders: BTreeSet<String> =
            snap.holds.iter().filter(|(_, h)| gone_job(&h.job)).map(|(k, _)| k.clone()).collect();
        snap.holds.retain(|(k, _)| !holders.contains(k));
        let settled: BTreeSet<String> = holders.iter().map(|h| settled_key(h)).collect();
        snap.records.retain(|(k, _)| !asked.contains(k) && !holders.contains(k) && !settled.contains(k));
        snap.gc_marks.retain(|(o, _)| !drop.contains(o));
        counts.jobs = (before.0 - snap.jobs.len()) as u64;
        counts.allocs += (before.1 - snap.allocs.len()) as u64;
        counts.evals = (before.2 - snap.evals.len()) as u64;
        counts.nodes = (before.3 - snap.nodes.len()) as u64;
        *self = ClusterState::from_snapshot(snap).expect("a state rebuilt from its own parts is valid");
        // The hint only ever rises; what went held no capacity.
        self.capacity_epoch = epoch;
        self.applied_at = applied_at;
        counts
    }

    /// Drops the mark of what `command` brings back to life (a job
    /// registered again, a node whose status or record changes).
    pub(crate) fn unmark(&mut self, command: &crate::command::Command) {
        use crate::command::Command as C;
        if self.gc_marks.is_empty() {
            return;
        }
        match command {
            C::RegisterJob(job) => {
                self.gc_marks.remove(&GcObject::Job(job.id.clone()));
            }
            C::RevertJob { job, .. } => {
                self.gc_marks.remove(&GcObject::Job(job.clone()));
            }
            C::UpsertNode(node) => {
                self.gc_marks.remove(&GcObject::Node(node.id.clone()));
            }
            C::SetNodeStatus { node, .. } | C::DrainNode { node, .. } | C::DeregisterNode(node) => {
                self.gc_marks.remove(&GcObject::Node(node.clone()));
            }
            _ => {}
        }
    }

    /// When `job` was marked collectable, if it is.
    pub fn gc_mark(&self, object: &GcObject) -> Option<u64> {
        self.gc_marks.get(object).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_nomads() {
        assert_eq!(GcPolicy::DEFAULT.job_ms, 4 * 60 * 60 * 1000);
        assert_eq!(GcPolicy::DEFAULT.node_ms, 24 * 60 * 60 * 1000);
    }

    #[test]
    fn a_state_without_marks_collects_nothing() {
        let mut s = ClusterState::new();
        assert_eq!(s.collect(1_000, GcPolicy::NOW, GC_RULES), GcCounts::default());
    }
}
