//! Commands: the entries of a cluster's Raft log, and how the state
//! machine applies them.
//!
//! Applying is deterministic: the same commands in the same order give the
//! same state on every server, byte for byte ([`ClusterState::snapshot`]).
//! Heartbeats are not commands: only status changes are logged.

use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::ids::{AllocId, EvalId, JobId, NodeId, NodeIdx};
use crate::model::alloc::{AllocReport, AllocStatus, DesiredStatus};
use crate::model::eval::EvalTrigger;
use crate::model::job::{Job, OnDisconnect};
use crate::model::node::{Node, NodeStatus};
use crate::model::plan::Plan;
use crate::state::{Applied, ClusterState, PlanOutcome, StateError};

/// The most allocation updates one command carries.
pub const ALLOC_STATUS_BATCH_MAX: usize = 4_096;
/// The most plans one command carries.
pub const PLAN_BATCH_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Register a node, or update its resources and attributes.
    UpsertNode(Node),
    /// A node leaves: it is marked down and ineligible, and its
    /// allocations are lost (replaced by the next evaluation).
    DeregisterNode(NodeId),
    /// A status change: down after missed heartbeats (its allocations are
    /// lost and replaced), back up, eligible or not.
    SetNodeStatus {
        node: NodeId,
        status: NodeStatus,
        eligible: bool,
    },
    /// Start (or end) draining a node: it takes no new work and its
    /// allocations move elsewhere.
    DrainNode {
        node: NodeId,
        drain: bool,
        /// Unix milliseconds by which the node's work must be stopped.
        deadline_ms: Option<u64>,
    },
    /// Register a job or a new version of it.
    RegisterJob(Job),
    StopJob(JobId),
    /// A scheduler's plan; placements are re-checked against current usage.
    ApplyPlan(Plan),
    /// Plans for evaluations, batched: each is re-checked, and closes its
    /// evaluation unless it was superseded or partly refused.
    ApplyPlans(Vec<(EvalId, Plan)>),
    /// Allocation states reported by agents, batched.
    AllocStatus(Vec<AllocReport>),
    /// Instances of a job that another cluster runs: the scheduler leaves
    /// them alone while held. `record` is the holder's own bookkeeping
    /// (opaque here), stored under the holder's key.
    Hold {
        holder: String,
        job: JobId,
        group: Arc<str>,
        indices: Vec<u32>,
        /// The group's fingerprint the held instances run, if the holder
        /// knows it (see [`crate::state::Held::spec`]).
        spec: Option<u64>,
        record: Vec<u8>,
    },
    /// The holder gives the instances back (revoked, refused, finished
    /// elsewhere): the job is evaluated again. The record stays, updated.
    Release {
        holder: String,
        record: Vec<u8>,
    },
    /// Updates the holder's record only.
    Record {
        holder: String,
        record: Vec<u8>,
    },
    /// A compare-and-swap on a holder's record: applies only when the
    /// record under `holder` is byte for byte `expect` (`None`: absent).
    /// Then `record` replaces it and the commands in `then` apply in
    /// order; otherwise nothing changes and the effect is `Refused`.
    ///
    /// It makes a decision taken on a read of the state atomic with the
    /// write that carries it out, whoever proposed what in between:
    /// delegation v2 registers an offer, leaves a tombstone, and moves a
    /// record from one phase to the next only through it, so a re-offer,
    /// a stale leader or a reordered proposal can never apply twice or
    /// take a record back (review B1, B11, B18). `then` is checked before
    /// anything applies: a `Hold` in it that would be refused refuses the
    /// whole command.
    Guarded {
        holder: String,
        expect: Option<Vec<u8>>,
        record: Vec<u8>,
        then: Vec<Command>,
    },
    /// The federation offered the instances of `job` (a `delegate =
    /// "prefer-remote"` job) at `version` to its peers: the scheduler
    /// now places here what no peer holds. Opens an evaluation.
    PeersAsked {
        job: JobId,
        version: u64,
    },
    /// A change to the API's tokens and policies (see [`crate::acl`]).
    Acl(crate::acl::AclCommand),
    /// Garbage collection at the proposer's `now_ms` (Unix ms) of jobs and
    /// nodes only: marks what became collectable, drops what was marked at
    /// least the thresholds ago ([`crate::state::GcThresholds`]). No longer
    /// proposed (see `CollectGarbage`); applied as it always was.
    Collect {
        now_ms: u64,
        thresholds: crate::state::GcThresholds,
    },
    /// One piece, `seq` from 0, of an archive that `hanse operator
    /// snapshot restore` replaces the state with: kept in the state until
    /// the [`Command::Restore`] with the same `id`. A piece 0 drops what an
    /// unfinished restore left.
    RestoreChunk {
        id: u64,
        seq: u32,
        bytes: Vec<u8>,
    },
    /// Replaces the whole state with the archive `id`'s `chunks` pieces
    /// make (see [`ClusterState::restore_archive`]).
    Restore {
        id: u64,
        chunks: u32,
    },
    /// Garbage collection at the proposer's `now_ms` (Unix ms) under
    /// `policy` ([`crate::state::GcPolicy`]): jobs and nodes past their
    /// thresholds, ended allocations past the cap per job, by rules 1 (see
    /// [`Command::Gc`]). No longer proposed; applied as it always was.
    CollectGarbage {
        now_ms: u64,
        policy: crate::state::GcPolicy,
    },
    /// Drops each holder's record, and its hold, when the record is still
    /// byte for byte the one given (read before the proposal); a record
    /// that changed since is left alone, for its holder to look at again.
    /// Delegation v2 collects its records and tombstones with it.
    DropRecords(Vec<(String, Vec<u8>)>),
    /// Garbage collection at the proposer's `now_ms` (Unix ms) under
    /// `policy`, by the rules of `rules` ([`crate::state::GC_RULES`] when
    /// proposed now). The rules are in the entry, not in the binary that
    /// applies it, so that a replica replaying an older entry after an
    /// upgrade drops what the others dropped when they applied it.
    Gc {
        now_ms: u64,
        policy: crate::state::GcPolicy,
        rules: u16,
    },
    /// `hanse job scale`: group `group` of `job` now wants `count`
    /// instances, whatever the version (a count change restarts nothing).
    /// Refused for an unknown or stopped job or group, or a count over
    /// [`crate::spec::job::GROUP_COUNT_MAX`].
    ScaleJob {
        job: JobId,
        /// The namespace the caller was allowed to write: a job re-made in
        /// another namespace meanwhile is not scaled.
        namespace: Arc<str>,
        group: Arc<str>,
        count: u32,
    },
    /// `hanse alloc stop`: the allocation stops and, like any instance the
    /// job still wants, is placed again (at-most-once work once it has
    /// stopped). Refused for an unknown allocation; one already stopping
    /// or ended changes nothing.
    StopAlloc(AllocId),
    /// The deadline of `node`'s drain passed (the leader proposes it, by
    /// its clock, while the node still runs work): every allocation left
    /// there stops, whether or not it could move. Changes nothing on a
    /// node that is not draining with a deadline.
    DrainDeadline(NodeId),
    /// `hanse node eligibility`: whether `node` takes new work. What runs
    /// there keeps running. Refused for an unknown node, and for making a
    /// draining node eligible (end the drain instead).
    NodeEligibility {
        node: NodeId,
        eligible: bool,
    },
    /// `hanse job promote`: the canaries of `job`'s running deployment
    /// (of every group, or only `group`) are promoted, and the rest of the
    /// old version is replaced. Refused when no deployment runs, none of
    /// its canaries waits, or one is not yet healthy.
    PromoteDeployment {
        job: JobId,
        /// The namespace the caller was allowed to write (see `ScaleJob`).
        namespace: Arc<str>,
        group: Option<Arc<str>>,
    },
    /// `hanse job deployment fail`: `job`'s running deployment fails
    /// (with `auto_revert`, its last stable version is registered again).
    /// Refused when none runs.
    FailDeployment {
        job: JobId,
        namespace: Arc<str>,
    },
    /// `hanse job revert`: `job`'s kept `version` is registered again, as
    /// a new version. Refused for an unknown job or version, or a version
    /// whose spec is the current one.
    RevertJob {
        job: JobId,
        namespace: Arc<str>,
        version: u64,
    },
    /// [`Command::RegisterJob`] of a spec submitted as text (`hanse job
    /// run`): the text is kept beside the version it made, for `hanse job
    /// inspect` (see [`crate::state::JobHistory::submitted`]).
    RegisterSubmitted {
        job: Job,
        spec: String,
    },
    /// [`Command::AllocStatus`] with the proposer's clock, `now_ms` (Unix
    /// ms): an allocation that failed is stamped with it, and its
    /// instance's reschedule delay runs from then
    /// ([`crate::model::job::ReschedulePolicy`]).
    AllocReports {
        now_ms: u64,
        reports: Vec<AllocReport>,
    },
}

/// The record key under which [`Command::PeersAsked`] keeps its version.
pub fn peers_asked_key(job: &JobId) -> String {
    format!("peers-asked/{job}")
}

/// What applying a command did, for the proposer waiting on it.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    NodeUpserted(NodeIdx),
    JobRegistered {
        version: u64,
        /// The evaluation that will place it; none when an identical spec
        /// was submitted again while its evaluation is still open.
        eval: EvalId,
    },
    PlanApplied(Applied),
    PlansApplied(Vec<PlanOutcome>),
    /// Evaluations the command opened (a node went down, a drain began).
    Evals(Vec<EvalId>),
    Done,
    /// What a [`Command::Gc`] (or an older collection) dropped.
    Collected(crate::state::GcCounts),
    /// What the state holds after a [`Command::Restore`].
    Restored(crate::state::archive::TableCounts),
    /// The command was valid to log but could not take effect (an unknown
    /// node, too many GPU models); the state is unchanged.
    Refused(String),
}

impl ClusterState {
    /// Applies one committed command. The only writer of cluster state.
    pub fn apply(&mut self, command: &Command) -> Effect {
        let refused = |e: StateError| Effect::Refused(e.to_string());
        self.unmark(command);
        match command {
            Command::UpsertNode(node) => {
                // What the cluster decided about a known node (down,
                // draining, ineligible) survives its agent registering again;
                // coming back up is a heartbeat's `SetNodeStatus`.
                let mut node = node.clone();
                // A node that is new, or comes with other attributes, gets
                // the system jobs' attention (it may now fit one, or no
                // longer fit one it runs). Only what feasibility reads
                // counts: an agent's new port or free disk at each start
                // changes nothing.
                let changed = match self.node_idx(&node.id).map(|i| self.node(i)) {
                    Some(old) => {
                        node.status = old.status;
                        node.eligible = old.eligible;
                        node.draining = old.draining;
                        node.drain_deadline_ms = old.drain_deadline_ms;
                        old.gpus != node.gpus || old.class_signature() != node.class_signature()
                    }
                    None => true,
                };
                let id = node.id.clone();
                match self.upsert_node(node) {
                    Ok(idx) => {
                        if changed {
                            self.evaluate_system_jobs(&id);
                        }
                        Effect::NodeUpserted(idx)
                    }
                    Err(e) => refused(e),
                }
            }
            Command::DeregisterNode(id) => self.node_status(id, NodeStatus::Down, false).unwrap_or_else(refused),
            Command::SetNodeStatus { node, status, eligible } => {
                self.node_status(node, *status, *eligible).unwrap_or_else(refused)
            }
            Command::DrainNode { node, drain, deadline_ms } => {
                self.drain(node, *drain, *deadline_ms).unwrap_or_else(refused)
            }
            Command::RegisterJob(job) => self.register_new(job),
            Command::RegisterSubmitted { job, spec } => {
                let before = self.job(&job.id).map(|j| j.version);
                let effect = self.register_new(job);
                if let Effect::JobRegistered { version, .. } = effect {
                    if before != Some(version) {
                        self.keep_submitted(&job.id, version, spec);
                    }
                }
                effect
            }
            Command::ScaleJob { job, namespace, group, count } => {
                let Some(mut j) = self.job(job).cloned().filter(|j| j.namespace == *namespace) else {
                    return Effect::Refused(format!("unknown job {job}"));
                };
                if j.stopped {
                    return Effect::Refused(format!("job {job} is stopped: run it again to scale it"));
                }
                if j.job_type == crate::model::JobType::System {
                    return Effect::Refused(format!("job {job} is a system job: it runs one instance per node"));
                }
                if let Some(origin) = j.labels.get(crate::model::job::LABEL_ORIGIN) {
                    return Effect::Refused(format!(
                        "job {job} runs here for cluster {origin}: scale it there, where it was submitted"
                    ));
                }
                if i64::from(*count) > crate::spec::job::GROUP_COUNT_MAX {
                    return Effect::Refused(format!(
                        "a group runs at most {} instances",
                        crate::spec::job::GROUP_COUNT_MAX
                    ));
                }
                let names: Vec<String> = j.groups.iter().map(|g| g.name.to_string()).collect();
                let Some(g) = j.groups.iter_mut().find(|g| g.name == *group) else {
                    return Effect::Refused(format!(
                        "job {job} has no group `{group}` (its groups: {})",
                        names.join(", ")
                    ));
                };
                g.count = *count;
                let before = Some(j.version);
                self.register(j, before)
            }
            Command::StopAlloc(id) => {
                let Some(job) = self.alloc(*id).map(|a| a.job.clone()) else {
                    return Effect::Refused(format!("unknown allocation {id}"));
                };
                if !self.stop_alloc(*id) {
                    return Effect::Evals(Vec::new());
                }
                Effect::Evals(vec![self.create_eval(&job, EvalTrigger::AllocStopped, None)])
            }
            Command::NodeEligibility { node, eligible } => {
                let Some(idx) = self.node_idx(node) else { return Effect::Refused(format!("unknown node {node}")) };
                let n = self.node(idx);
                if n.draining && *eligible {
                    return Effect::Refused(format!(
                        "node {node} is draining: end the drain instead (`hanse node drain {node} --disable`)"
                    ));
                }
                let status = n.status;
                self.node_status(node, status, *eligible).unwrap_or_else(refused)
            }
            Command::DrainDeadline(node) => {
                let Some(idx) = self.node_idx(node) else { return Effect::Refused(format!("unknown node {node}")) };
                if !self.node(idx).draining || self.node(idx).drain_deadline_ms.is_none() {
                    return Effect::Evals(Vec::new());
                }
                let left: Vec<(AllocId, JobId)> =
                    self.allocs_on_node(node).filter(|a| a.is_live()).map(|a| (a.id, a.job.clone())).collect();
                let mut jobs = BTreeSet::new();
                for (id, job) in left {
                    self.stop_alloc(id);
                    jobs.insert(job);
                }
                Effect::Evals(self.evaluate_for_drain(node, jobs))
            }
            Command::PromoteDeployment { job, namespace, group } => {
                if let Err(why) = self.own_job(job, namespace) {
                    return Effect::Refused(why);
                }
                match self.promote(job, group.as_deref()) {
                    Ok(()) => Effect::Evals(vec![self.create_eval(job, EvalTrigger::Deployment, None)]),
                    Err(why) => Effect::Refused(why),
                }
            }
            Command::FailDeployment { job, namespace } => {
                if let Err(why) = self.own_job(job, namespace) {
                    return Effect::Refused(why);
                }
                match self.fail_deployment(job, "failed by an operator".into()) {
                    Ok(_) => Effect::Evals(vec![self.create_eval(job, EvalTrigger::Deployment, None)]),
                    Err(why) => Effect::Refused(why),
                }
            }
            Command::RevertJob { job, namespace, version } => {
                if let Err(why) = self.own_job(job, namespace) {
                    return Effect::Refused(why);
                }
                let current = self.job(job).expect("checked above").clone();
                let Some(old) = self.job_version(job, *version).cloned() else {
                    let h = self.job_history(job);
                    let kept: Vec<String> = h
                        .into_iter()
                        .flat_map(|h| h.older.iter().map(|j| j.version.to_string()))
                        .chain([current.version.to_string()])
                        .collect();
                    return Effect::Refused(format!("job {job} has no version {version} (kept: {})", kept.join(", ")));
                };
                let back = Job { version: current.version, stopped: false, ..old };
                if back == current {
                    return Effect::Refused(format!(
                        "version {version} of job {job} is what runs now; nothing to revert"
                    ));
                }
                let before = Some(current.version);
                let effect = self.register(back, before);
                if let Effect::JobRegistered { version: new, .. } = effect {
                    if let Some(text) = self.submitted(job, *version).map(str::to_string) {
                        self.keep_submitted(job, new, &text);
                    }
                }
                effect
            }
            Command::StopJob(id) => match self.job(id).cloned() {
                Some(mut job) if !job.stopped => {
                    job.stopped = true;
                    let version = self.upsert_job(job);
                    Effect::JobRegistered { version, eval: self.create_eval(id, EvalTrigger::JobStop, None) }
                }
                Some(job) => match self.job_eval(id) {
                    Some(e) => Effect::JobRegistered { version: job.version, eval: e.id },
                    None => Effect::JobRegistered {
                        version: job.version,
                        eval: self.create_eval(id, EvalTrigger::JobStop, None),
                    },
                },
                None => Effect::Refused(format!("unknown job {id}")),
            },
            Command::ApplyPlan(plan) => {
                let applied = self.apply_plan(plan);
                self.advance_deployment(&plan.job);
                Effect::PlanApplied(applied)
            }
            Command::ApplyPlans(plans) => Effect::PlansApplied(
                plans.iter().take(PLAN_BATCH_MAX).map(|(eval, plan)| self.apply_eval_plan(*eval, plan)).collect(),
            ),
            Command::Hold { holder, job, group, indices, spec, record } => {
                if let Err(why) = self.hold(holder, job, group, indices, *spec, record.clone()) {
                    return Effect::Refused(why);
                }
                // Evaluated again, so its status no longer shows as
                // unplaced what another cluster now runs.
                match self.job(job) {
                    Some(_) => Effect::Evals(vec![self.create_eval(job, EvalTrigger::Delegated, None)]),
                    None => Effect::Evals(Vec::new()),
                }
            }
            Command::Guarded { holder, expect, record, then } => {
                if self.record(holder) != expect.as_deref() {
                    return Effect::Refused(format!("record {holder} changed since it was read"));
                }
                for c in then {
                    if let Command::Hold { holder, job, group, indices, .. } = c {
                        if let Err(why) = self.can_hold(holder, job, group, indices) {
                            return Effect::Refused(why);
                        }
                    }
                }
                self.set_record(holder, record.clone());
                let mut evals = Vec::new();
                for c in then {
                    match self.apply(c) {
                        Effect::Evals(e) => evals.extend(e),
                        Effect::JobRegistered { eval, .. } => evals.push(eval),
                        _ => {}
                    }
                }
                Effect::Evals(evals)
            }
            Command::Release { holder, record } => match self.release(holder, record.clone()) {
                Some(job) => Effect::Evals(vec![self.create_eval(&job, EvalTrigger::DelegationLost, None)]),
                None => Effect::Evals(Vec::new()),
            },
            Command::Record { holder, record } => {
                self.set_record(holder, record.clone());
                Effect::Done
            }
            Command::Acl(c) => self.acl_mut().apply(c).map_or_else(Effect::Refused, |()| Effect::Done),
            Command::Collect { now_ms, thresholds } => {
                Effect::Collected(self.collect(*now_ms, thresholds.as_policy(), 0))
            }
            Command::CollectGarbage { now_ms, policy } => Effect::Collected(self.collect(*now_ms, *policy, 1)),
            Command::Gc { rules, .. } if *rules > crate::state::GC_RULES => {
                Effect::Refused(format!("garbage collection rules {rules} are newer than this server's"))
            }
            Command::Gc { now_ms, policy, rules } => Effect::Collected(self.collect(*now_ms, *policy, *rules)),
            Command::DropRecords(records) => Effect::Evals(self.drop_records(records)),
            Command::RestoreChunk { id, seq, bytes } => {
                self.stage_restore(*id, *seq, bytes);
                Effect::Done
            }
            Command::Restore { id, chunks } => self.restore_archive(*id, *chunks),
            Command::PeersAsked { job, version } => {
                if self.peers_asked(job).is_some_and(|v| v >= *version) || self.job(job).is_none() {
                    return Effect::Done;
                }
                self.set_record(&peers_asked_key(job), version.to_string().into_bytes());
                Effect::Evals(vec![self.create_eval(job, EvalTrigger::Delegated, None)])
            }
            Command::AllocStatus(updates) => self.alloc_reports(updates, None),
            Command::AllocReports { now_ms, reports } => self.alloc_reports(reports, Some(*now_ms)),
        }
    }

    /// Applies agents' reports on allocations, logged at `now_ms` (Unix
    /// ms) when known, and opens the evaluations they call for.
    fn alloc_reports(&mut self, updates: &[AllocReport], now_ms: Option<u64>) -> Effect {
        let mut failed = BTreeSet::new();
        let mut stopped = BTreeSet::new();
        // Jobs whose deployment may move on, and those of them
        // where an instance's health changed.
        let mut deploying = BTreeSet::new();
        let mut health_changed = BTreeSet::new();
        for AllocReport { id, status, tasks, health } in updates.iter().take(ALLOC_STATUS_BATCH_MAX) {
            let was = self.alloc(*id).map(|a| a.status);
            self.set_task_states(*id, tasks);
            let newly_healthy = health.is_some_and(|h| self.set_alloc_health(*id, h));
            self.set_alloc_status(*id, *status);
            if *status == AllocStatus::Failed && was.is_some_and(|w| !w.is_terminal()) {
                self.set_failed_at(*id, now_ms);
            }
            let Some(a) = self.alloc(*id) else { continue };
            if self.active_deployment(&a.job).is_some() {
                if newly_healthy {
                    health_changed.insert(a.job.clone());
                }
                if newly_healthy || (a.status.is_terminal() && was != Some(a.status)) {
                    deploying.insert(a.job.clone());
                }
            }
            if a.status == AllocStatus::Failed && was != Some(AllocStatus::Failed) {
                failed.insert(a.job.clone());
            } else if a.status.is_terminal() && !was.is_some_and(AllocStatus::is_terminal) {
                // The replacement of an at-most-once instance waits
                // for it to end (see `reconcile`): now it may start.
                // So does an instance its agent reports lost (it
                // stopped it when its lease ran out): place it again.
                let job = self.job(&a.job).filter(|j| !j.stopped);
                let group = job.and_then(|j| j.group(&a.group));
                let at_most_once = group.is_some_and(|g| g.on_disconnect == OnDisconnect::Stop);
                let lost = a.status == AllocStatus::Lost && a.desired == DesiredStatus::Run;
                // A system job's next instance on a node waits for
                // the one stopping there (see `reconcile`).
                let system = job.is_some_and(|j| j.job_type == crate::model::JobType::System);
                let waited_for = a.desired == DesiredStatus::Stop && (at_most_once || system);
                if job.is_some() && (lost || waited_for) {
                    stopped.insert(a.job.clone());
                }
            }
        }
        let mut evals: Vec<EvalId> =
            failed.iter().map(|j| self.create_eval(j, EvalTrigger::AllocFailed, None)).collect();
        for j in stopped.difference(&failed) {
            evals.push(self.create_eval(j, EvalTrigger::AllocStopped, None));
        }
        for j in &deploying {
            match self.advance_deployment(j) {
                Some(e) => evals.push(e),
                None if health_changed.contains(j) && !failed.contains(j) && !stopped.contains(j) => {
                    evals.push(self.create_eval(j, EvalTrigger::AllocHealth, None));
                }
                None => {}
            }
        }
        if updates.len() > ALLOC_STATUS_BATCH_MAX {
            Effect::Refused(format!(
                "{} updates past the batch limit of {ALLOC_STATUS_BATCH_MAX} ignored",
                updates.len() - ALLOC_STATUS_BATCH_MAX
            ))
        } else {
            Effect::Evals(evals)
        }
    }

    /// A node's status changes; going down loses its allocations and opens
    /// an evaluation for each job that had one there.
    fn node_status(&mut self, node: &NodeId, status: NodeStatus, eligible: bool) -> Result<Effect, StateError> {
        let idx = self.node_idx(node).ok_or_else(|| StateError::UnknownNode(node.clone()))?;
        let (was, was_eligible) = (self.node(idx).status, self.node(idx).eligible);
        self.set_node_status(node, status, eligible)?;
        if status == NodeStatus::Down && was != NodeStatus::Down {
            return Ok(Effect::Evals(self.node_lost(node)));
        }
        // Back up, or eligible again: the system jobs may run on it again.
        if status == NodeStatus::Ready && eligible && (was == NodeStatus::Down || !was_eligible) {
            return Ok(Effect::Evals(self.evaluate_system_jobs(node)));
        }
        Ok(Effect::Evals(Vec::new()))
    }

    /// Opens an evaluation for every system job that is not stopped, for
    /// `node`'s sake (a system job runs on every node that fits it). A job
    /// whose evaluation is open keeps it, marked to run once more when it
    /// closes ([`crate::state::system_rerun_key`]): superseding it would
    /// throw away a plan being made, and nodes registering one after the
    /// other would keep a system job from ever being placed.
    fn evaluate_system_jobs(&mut self, node: &NodeId) -> Vec<EvalId> {
        let jobs: Vec<JobId> = self
            .jobs()
            .filter(|j| j.job_type == crate::model::JobType::System && !j.stopped)
            .map(|j| j.id.clone())
            .collect();
        let mut opened = Vec::new();
        for j in jobs {
            if self.open_eval_of(&j).is_some() {
                self.set_record(&crate::state::system_rerun_key(&j), Vec::new());
            } else {
                opened.push(self.create_eval(&j, EvalTrigger::NodeUpdate, Some(node.clone())));
            }
        }
        opened
    }

    fn drain(&mut self, node: &NodeId, drain: bool, deadline_ms: Option<u64>) -> Result<Effect, StateError> {
        let idx = self.node_idx(node).ok_or_else(|| StateError::UnknownNode(node.clone()))?;
        let mut n = self.node(idx).clone();
        let deadline_ms = deadline_ms.filter(|_| drain);
        if n.draining == drain && n.drain_deadline_ms == deadline_ms {
            return Ok(Effect::Evals(Vec::new()));
        }
        let started = drain && !n.draining;
        let ended = !drain && n.draining;
        n.draining = drain;
        n.drain_deadline_ms = deadline_ms;
        n.eligible = !drain;
        self.upsert_node(n)?;
        if ended {
            // Eligible again: the system jobs may run on it again.
            return Ok(Effect::Evals(self.evaluate_system_jobs(node)));
        }
        if !started {
            return Ok(Effect::Evals(Vec::new()));
        }
        let jobs = self.jobs_on_node(node);
        Ok(Effect::Evals(self.evaluate_for_drain(node, jobs)))
    }

    /// Registers `job` unless a job of that name is in another namespace:
    /// names are unique across namespaces, and the submitter was allowed
    /// to write only its own.
    fn register_new(&mut self, job: &Job) -> Effect {
        if let Some(old) = self.job(&job.id).filter(|j| j.namespace != job.namespace) {
            return Effect::Refused(format!(
                "a job `{}` exists in namespace `{}`; job names are unique across namespaces",
                job.id, old.namespace
            ));
        }
        let before = self.job(&job.id).map(|j| j.version);
        self.register(job.clone(), before)
    }

    /// Whether `job` is in `namespace` and was submitted here: one another
    /// cluster delegated is changed at its origin, never here.
    fn own_job(&self, job: &JobId, namespace: &str) -> Result<(), String> {
        let j = self.job(job).filter(|j| &*j.namespace == namespace).ok_or_else(|| format!("unknown job {job}"))?;
        match j.labels.get(crate::model::job::LABEL_ORIGIN) {
            Some(origin) => {
                Err(format!("job {job} runs here for cluster {origin}: change it there, where it was submitted"))
            }
            None => Ok(()),
        }
    }

    /// An evaluation for each of `jobs`, for `node`'s drain.
    fn evaluate_for_drain(&mut self, node: &NodeId, jobs: BTreeSet<JobId>) -> Vec<EvalId> {
        jobs.into_iter().map(|j| self.create_eval(&j, EvalTrigger::NodeDrain, Some(node.clone()))).collect()
    }

    /// Stores `job` (a new version when it changed) and gives the
    /// evaluation that places it: the open one when the spec is the same
    /// as `before` (a retried submission changes nothing), else a new one.
    fn register(&mut self, job: Job, before: Option<u64>) -> Effect {
        let id = job.id.clone();
        let version = self.upsert_job(job);
        // A version that replaces nothing (a revert to what runs) may be
        // deployed already; the evaluation below follows what this moved.
        self.deployment_moved(&id);
        let open = self.job_eval(&id).filter(|e| e.status.is_open()).map(|e| e.id);
        let eval = match open {
            Some(e) if before == Some(version) => e,
            _ => self.create_eval(&id, EvalTrigger::JobRegister, None),
        };
        Effect::JobRegistered { version, eval }
    }
}
