//! The state of one cluster: nodes, jobs and allocations, with the indexes
//! the scheduler reads (usage per node, nodes per computed class).
//!
//! The scheduler only reads this; [`ClusterState::apply_plan`] is the one
//! way placements enter it, and it re-checks every placement against the
//! current usage, so a plan made against an older state cannot over-commit
//! a node.

pub mod archive;
mod evals;
mod gc;
mod history;
mod progress;

pub use gc::{GC_RULES, GcCounts, GcObject, GcPolicy, GcThresholds, settled_key, settled_value};

pub use evals::{PlanOutcome, system_rerun_key, system_set_key};
pub use history::{JOB_VERSIONS_KEPT, JobHistory};
pub use progress::{InstanceState, JobState, Progress, progress};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::ids::{AllocId, EvalId, JobId, NodeId, NodeIdx};
use crate::model::alloc::{AllocHealth, AllocStatus, Allocation, DesiredStatus, TaskState};
use crate::model::eval::Evaluation;
use crate::model::job::Job;
use crate::model::node::{ClassSignature, Node};
use crate::model::plan::{Placement, Plan, Reason, StopReason};
use crate::resources::{Dimension, GpuAsk, GpuDevices, Resources};

/// The most GPU models one node may carry; usage keeps a fixed-size array.
pub const NODE_GPU_MODELS_MAX: usize = 4;

/// What a node's live allocations take from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeUsage {
    pub res: Resources,
    /// GPUs taken, parallel to [`Node::gpus`].
    pub gpus: [u32; NODE_GPU_MODELS_MAX],
}

impl NodeUsage {
    pub fn is_empty(&self) -> bool {
        self.res.cpu_millis == 0 && self.res.memory_bytes == 0 && self.gpus.iter().all(|g| *g == 0)
    }

    /// Why `ask` does not fit on `node` on top of this usage, or the GPU
    /// device group it would take from.
    pub fn fit(&self, node: &Node, ask: Resources, gpu: Option<&GpuAsk>) -> Result<Option<usize>, Dimension> {
        if let Some(dim) = self.res.exceeds(ask, node.capacity) {
            return Err(dim);
        }
        let Some(gpu) = gpu else { return Ok(None) };
        node.gpus
            .iter()
            .enumerate()
            .position(|(i, dev)| gpu.accepts(&dev.model) && dev.count.saturating_sub(self.gpus[i]) >= gpu.count)
            .map(Some)
            .ok_or(Dimension::Gpu)
    }

    /// Takes `res` and, when given, `n` GPUs of device group `i`.
    pub(crate) fn add(&mut self, res: Resources, gpu: Option<(usize, u32)>) {
        self.res = self.res.saturating_add(res);
        if let Some((i, n)) = gpu {
            self.gpus[i] += n;
        }
    }

    /// Gives back what [`NodeUsage::add`] took.
    pub(crate) fn sub(&mut self, res: Resources, gpu: Option<(usize, u32)>) {
        self.res = self.res.saturating_sub(res);
        if let Some((i, n)) = gpu {
            self.gpus[i] = self.gpus[i].saturating_sub(n);
        }
    }
}

/// Nodes that are alike for static feasibility (see [`Node::class_signature`]).
#[derive(Clone, Debug)]
pub struct ComputedClass {
    pub nodes: Vec<NodeIdx>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("node {0} has {1} GPU models; at most {NODE_GPU_MODELS_MAX} are supported")]
    TooManyGpuModels(NodeId, usize),
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
}

/// A placement the applier refused, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub placement: Placement,
    pub reason: Reason,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    pub placed: Vec<AllocId>,
    pub refused: Vec<Refused>,
    pub stopped: Vec<AllocId>,
}

#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    nodes: Vec<Node>,
    node_index: HashMap<NodeId, NodeIdx>,
    usage: Vec<NodeUsage>,
    /// Capacity and schedulability per node, kept beside `usage` in compact
    /// arrays: the scheduler checks every node against them once per
    /// evaluation, and at 10,000 nodes that pass must not walk whole `Node`s.
    capacity: Vec<Resources>,
    schedulable: Vec<bool>,
    node_class: Vec<u32>,
    classes: Vec<ComputedClass>,
    class_index: HashMap<ClassSignature, u32>,
    jobs: BTreeMap<JobId, Job>,
    /// Boxed: std's B-tree leaves end half full when keys only grow (as
    /// allocation ids do), and an allocation is 152 bytes; a box halves
    /// what that slack costs (measured: 387 to 224 bytes each, with the
    /// names shared).
    allocs: BTreeMap<AllocId, Box<Allocation>>,
    allocs_by_job: HashMap<JobId, Vec<AllocId>>,
    /// Allocations by node, for agents pulling theirs.
    allocs_by_node: HashMap<NodeId, Vec<AllocId>>,
    next_alloc: u64,
    /// Lowest and highest cost per cpu-hour over all nodes, to normalise.
    cost_range: (f64, f64),
    latency_range: (u8, u8),
    evals: BTreeMap<EvalId, Evaluation>,
    next_eval: u64,
    /// Indexes over `evals`: each job's one open evaluation, its latest
    /// closed one, and the open ones by status, oldest first.
    open_eval: HashMap<JobId, EvalId>,
    closed_eval: HashMap<JobId, EvalId>,
    pending: BTreeSet<EvalId>,
    blocked: BTreeSet<EvalId>,
    /// Instances other clusters run, by holder, and the holders' records.
    holds: BTreeMap<String, Held>,
    records: BTreeMap<String, Vec<u8>>,
    /// Each job's older versions and deployments ([`history`]).
    histories: BTreeMap<JobId, JobHistory>,
    /// Tokens and policies of the HTTP API.
    acl: crate::acl::AclState,
    /// Objects found collectable, with the time of the first collection
    /// that found them so ([`gc`]).
    gc_marks: BTreeMap<GcObject, u64>,
    /// Rises whenever capacity may have freed up or appeared (a node came
    /// up, an allocation ended): the leader's cue to retry blocked
    /// evaluations. Not replicated state, a hint rebuilt at zero.
    capacity_epoch: u64,
    /// The Raft index and term of the last entry applied, as the driver
    /// last set it (it may lag the state by the entries of one turn). Not
    /// replicated; what a backup's header names.
    applied_at: (u64, u64),
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The Raft index and term of the last entry applied (see the field).
    pub fn applied_at(&self) -> (u64, u64) {
        self.applied_at
    }

    /// Set by the Raft driver after it applied entries or installed a
    /// snapshot.
    pub fn set_applied_at(&mut self, index: u64, term: u64) {
        self.applied_at = (index, term);
    }

    /// A state holding `nodes` and nothing else.
    pub fn with_nodes(nodes: impl IntoIterator<Item = Node>) -> Result<Self, StateError> {
        let mut s = Self::new();
        for n in nodes {
            s.upsert_node(n)?;
        }
        Ok(s)
    }

    /// Adds a node, or replaces the one with the same id (keeping its
    /// allocations and index).
    pub fn upsert_node(&mut self, node: Node) -> Result<NodeIdx, StateError> {
        let idx = self.insert_node(node)?;
        self.refresh_ranges();
        Ok(idx)
    }

    /// [`Self::upsert_node`] but for the cost and latency ranges, which
    /// the caller refreshes (once, after many nodes).
    fn insert_node(&mut self, node: Node) -> Result<NodeIdx, StateError> {
        if node.gpus.len() > NODE_GPU_MODELS_MAX {
            return Err(StateError::TooManyGpuModels(node.id.clone(), node.gpus.len()));
        }
        let sig = node.class_signature();
        let next = self.classes.len() as u32;
        let class = *self.class_index.entry(sig).or_insert(next);
        if class == next {
            self.classes.push(ComputedClass { nodes: Vec::new() });
        }
        let idx = match self.node_index.get(&node.id) {
            Some(&idx) => {
                let old = self.node_class[idx.get()];
                if old != class {
                    self.classes[old as usize].nodes.retain(|n| *n != idx);
                    self.classes[class as usize].nodes.push(idx);
                    self.node_class[idx.get()] = class;
                }
                self.capacity[idx.get()] = node.capacity;
                self.schedulable[idx.get()] = node.schedulable();
                self.nodes[idx.get()] = node;
                idx
            }
            None => {
                let idx = NodeIdx(self.nodes.len() as u32);
                self.node_index.insert(node.id.clone(), idx);
                self.capacity.push(node.capacity);
                self.schedulable.push(node.schedulable());
                self.nodes.push(node);
                self.usage.push(NodeUsage::default());
                self.node_class.push(class);
                self.classes[class as usize].nodes.push(idx);
                idx
            }
        };
        self.capacity_epoch += 1;
        Ok(idx)
    }

    fn refresh_ranges(&mut self) {
        let costs = self.nodes.iter().map(Node::cost_per_cpu_hour);
        self.cost_range = costs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| (lo.min(c), hi.max(c)));
        let lat = self.nodes.iter().map(|n| n.latency_class);
        self.latency_range = lat.fold((u8::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
    }

    /// Marks a node ready or down, and eligible or draining.
    pub fn set_node_status(
        &mut self,
        id: &NodeId,
        status: crate::model::NodeStatus,
        eligible: bool,
    ) -> Result<(), StateError> {
        let idx = *self.node_index.get(id).ok_or_else(|| StateError::UnknownNode(id.clone()))?;
        let node = &mut self.nodes[idx.get()];
        node.status = status;
        node.eligible = eligible;
        let was = std::mem::replace(&mut self.schedulable[idx.get()], node.schedulable());
        if !was && self.schedulable[idx.get()] {
            self.capacity_epoch += 1;
        }
        Ok(())
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, idx: NodeIdx) -> &Node {
        &self.nodes[idx.get()]
    }

    pub fn node_idx(&self, id: &NodeId) -> Option<NodeIdx> {
        self.node_index.get(id).copied()
    }

    pub fn usage(&self, idx: NodeIdx) -> &NodeUsage {
        &self.usage[idx.get()]
    }

    pub fn capacity(&self, idx: NodeIdx) -> Resources {
        self.capacity[idx.get()]
    }

    /// Ready and eligible: may receive new work.
    pub fn is_schedulable(&self, idx: NodeIdx) -> bool {
        self.schedulable[idx.get()]
    }

    pub fn classes(&self) -> &[ComputedClass] {
        &self.classes
    }

    pub fn class_of(&self, idx: NodeIdx) -> u32 {
        self.node_class[idx.get()]
    }

    pub fn cost_range(&self) -> (f64, f64) {
        self.cost_range
    }

    pub fn latency_range(&self) -> (u8, u8) {
        self.latency_range
    }

    /// Registers a job or a new version of it. Returns the version stored.
    ///
    /// Instances whose group is unchanged but for `count` are carried to
    /// the new version in place: scaling is not a reason to restart. So
    /// are instances of a kept older version whose spec the new one
    /// repeats (a revert restarts what it reverts to no more). The version
    /// replaced is kept ([`ClusterState::job_history`]); the new one's
    /// deployment opens.
    pub fn upsert_job(&mut self, mut job: Job) -> u64 {
        if let Some(old) = self.jobs.get(&job.id) {
            let mut same = job.clone();
            same.version = old.version;
            if same == *old {
                return old.version;
            }
            job.version = old.version + 1;
            let old = old.clone();
            // Of the current version every allocation, ended or not, so
            // that failures and completed batch work count on; of a kept
            // older one the live ones only (a revert starts no ended work
            // again, and a stopped job run again starts afresh).
            let carried: Vec<AllocId> = self
                .allocs_of_job(&job.id)
                .filter(|a| a.job_version == old.version || a.is_live())
                .filter(|a| {
                    let Some(was) = self.job_version(&job.id, a.job_version) else { return false };
                    let (Some(ga), Some(gb)) = (was.group(&a.group), job.group(&a.group)) else { return false };
                    history::same_instances(was, ga, &job, gb)
                })
                .map(|a| a.id)
                .collect();
            // A carried canary stays one only if it is still awaited: one
            // of the version replaced (a scale while canaries wait), not of
            // a version promoted or given up before (a revert).
            let awaited = self.groups_awaiting_promotion(&job.id, old.version);
            for id in carried {
                if let Some(a) = self.allocs.get_mut(&id) {
                    a.canary &= a.job_version == old.version && awaited.contains(&a.group);
                    a.job_version = job.version;
                }
            }
            self.keep_version(old);
        }
        let (v, id) = (job.version, job.id.clone());
        self.jobs.insert(job.id.clone(), job);
        self.open_deployment(&id);
        v
    }

    /// The namespace of job `id`, for access checks: `*` for a job not
    /// here, so only a caller who may act in every namespace passes.
    pub fn namespace_of(&self, id: &JobId) -> Arc<str> {
        self.job(id).map_or_else(|| Arc::from(crate::acl::ANY_NAMESPACE), |j| j.namespace.clone())
    }

    /// Tokens and policies (see [`crate::acl`]).
    pub fn acl(&self) -> &crate::acl::AclState {
        &self.acl
    }

    pub(crate) fn acl_mut(&mut self) -> &mut crate::acl::AclState {
        &mut self.acl
    }

    pub fn job(&self, id: &JobId) -> Option<&Job> {
        self.jobs.get(id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    pub fn alloc(&self, id: AllocId) -> Option<&Allocation> {
        self.allocs.get(&id).map(|a| &**a)
    }

    pub fn allocs(&self) -> impl Iterator<Item = &Allocation> {
        self.allocs.values().map(|a| &**a)
    }

    /// Whether `id` was ever handed out (it may since have been collected).
    pub fn was_placed(&self, id: AllocId) -> bool {
        id.0 < self.next_alloc
    }

    /// Allocations from `from` on, by id (a page of a list).
    pub fn allocs_from(&self, from: AllocId) -> impl Iterator<Item = &Allocation> {
        self.allocs.range(from..).map(|(_, a)| &**a)
    }

    /// Jobs from `from` on, by id (a page of a list).
    pub fn jobs_from<'a>(&'a self, from: &JobId) -> impl Iterator<Item = &'a Job> + 'a {
        self.jobs.range(from.clone()..).map(|(_, j)| j)
    }

    pub fn allocs_of_job<'a>(&'a self, job: &JobId) -> impl Iterator<Item = &'a Allocation> + 'a {
        self.allocs_by_job.get(job).into_iter().flatten().filter_map(|id| self.allocs.get(id).map(|a| &**a))
    }

    /// Every allocation ever placed on `node`, oldest first.
    pub fn allocs_on_node<'a>(&'a self, node: &NodeId) -> impl Iterator<Item = &'a Allocation> + 'a {
        self.allocs_by_node.get(node).into_iter().flatten().filter_map(|id| self.allocs.get(id).map(|a| &**a))
    }

    /// Records the task states an agent reported (a terminal allocation
    /// keeps its last ones).
    pub fn set_task_states(&mut self, id: AllocId, tasks: &[TaskState]) {
        if let Some(a) = self.allocs.get_mut(&id) {
            if !tasks.is_empty() && !a.status.is_terminal() {
                a.tasks = tasks.to_vec();
            }
        }
    }

    /// Records an allocation's health as its agent decided it: once, and
    /// only while it has not ended. Whether it changed.
    pub fn set_alloc_health(&mut self, id: AllocId, health: AllocHealth) -> bool {
        match self.allocs.get_mut(&id) {
            Some(a) if a.health.is_none() && !a.status.is_terminal() => {
                a.health = Some(health);
                true
            }
            _ => false,
        }
    }

    /// Commits what still fits of `plan`: each placement is checked against
    /// the node's current usage (not the usage the plan was made against),
    /// and refused placements are returned for re-evaluation. The job's
    /// deployment is not moved on here (its caller does, once the plan's
    /// evaluation is settled: moving it may open another).
    pub fn apply_plan(&mut self, plan: &Plan) -> Applied {
        let mut applied = Applied::default();
        for stop in &plan.stops {
            if let Some(a) = self.allocs.get_mut(&stop.alloc) {
                a.desired = DesiredStatus::Stop;
                applied.stopped.push(stop.alloc);
            }
            // No agent is left to report an instance lost with its node.
            if stop.reason == StopReason::NodeLost {
                self.set_alloc_status(stop.alloc, AllocStatus::Lost);
            }
        }
        // A system job's rolling update began a set of nodes: the next
        // waits its stagger from the plan's time (`reconcile`).
        if let Some(at) = plan.made_at_ms {
            let rolling = (self.jobs.get(&plan.job)).is_some_and(|j| {
                j.job_type == crate::model::JobType::System && j.groups.iter().any(|g| g.update.is_some())
            });
            if rolling && plan.stops.iter().any(|s| s.reason == StopReason::Updated) {
                self.records.insert(system_set_key(&plan.job), at.to_string().into_bytes());
            }
        }
        // An instance that is already live is never placed again, whatever
        // plan asks: a plan made from a state that had not yet applied an
        // earlier plan for the same evaluation would otherwise double it.
        // System jobs run one instance per node; others one per index. An
        // older version's instance does not count: its replacement runs
        // beside it until healthy (a deployment), or stops with this plan.
        let system = self.jobs.get(&plan.job).is_some_and(|j| j.job_type == crate::model::JobType::System);
        let key = |group: &Arc<str>, index: u32, node: &NodeId| {
            if system { (group.clone(), 0, Some(node.clone())) } else { (group.clone(), index, None) }
        };
        // Every allocation shares the job's, group's and node's names with
        // the state, rather than the copies the plan was decoded into.
        let job_id = self.jobs.get_key_value(&plan.job).map_or_else(|| plan.job.clone(), |(k, _)| k.clone());
        let group_names: Vec<Arc<str>> =
            self.jobs.get(&plan.job).map(|j| j.groups.iter().map(|g| g.name.clone()).collect()).unwrap_or_default();
        let mut live: HashSet<(Arc<str>, u32, Option<NodeId>)> = self
            .allocs_of_job(&plan.job)
            .filter(|a| a.is_live() && (system || a.job_version >= plan.job_version))
            .map(|a| key(&a.group, a.index, &a.node))
            .collect();
        // Nor is an instance another cluster holds: a plan made before the
        // hold committed would otherwise run it here too (review B9).
        // One held at an older spec, under a deployment, is replaced beside
        // it (`reconcile::stale_held`).
        let stale = (self.jobs.get(&plan.job))
            .filter(|j| !system && j.version == plan.job_version)
            .map(|j| crate::scheduler::reconcile::stale_held(self, j))
            .unwrap_or_default();
        if !system {
            let held = self.held_of_job(&plan.job).filter(|(g, i)| !stale.contains(&(Arc::<str>::from(*g), *i)));
            live.extend(held.map(|(g, i)| (Arc::<str>::from(g), i, None)).collect::<Vec<_>>());
        }
        // What runs of an older version, for canaries (here, or held at an
        // older spec elsewhere): a placement beside one, while its group's
        // deployment awaits promotion, is a canary.
        // Looked for only then: most plans belong to no such deployment.
        let awaiting = self.groups_awaiting_promotion(&plan.job, plan.job_version);
        let older: HashSet<(Arc<str>, u32)> = if awaiting.is_empty() {
            HashSet::new()
        } else {
            (self.allocs_of_job(&plan.job))
                .filter(|a| a.is_live() && a.job_version < plan.job_version)
                .map(|a| (a.group.clone(), a.index))
                .chain(stale.iter().cloned())
                .collect()
        };
        // What each instance's last allocation went through: a new one
        // carries its reschedule history on (system jobs keep none).
        let job = self.jobs.get(&plan.job).filter(|j| !system && j.version == plan.job_version);
        let histories: HashMap<(Arc<str>, u32), Vec<crate::model::job::RescheduleEvent>> = match job {
            Some(job) if !plan.placements.is_empty() => {
                let ended = crate::scheduler::reconcile::latest_ended(self, job);
                (plan.placements.iter())
                    .filter_map(|p| {
                        let before = ended.get(&(&*p.group, p.index))?;
                        let policy = &job.group(&p.group)?.reschedule;
                        let history = crate::scheduler::reconcile::history_after(policy, Some(before));
                        Some(((p.group.clone(), p.index), history))
                    })
                    .collect()
            }
            _ => HashMap::new(),
        };
        for p in &plan.placements {
            if !live.insert(key(&p.group, p.index, &p.node)) {
                applied.refused.push(Refused { placement: p.clone(), reason: Reason::AlreadyPlaced });
                continue;
            }
            match self.check_placement(p) {
                Ok(gpu) => {
                    let id = AllocId(self.next_alloc);
                    self.next_alloc += 1;
                    let idx = p.node_idx;
                    let gpus =
                        gpu.map(|(i, count)| GpuDevices { model: self.nodes[idx.get()].gpus[i].model.clone(), count });
                    self.usage[idx.get()].add(p.resources, gpu);
                    let node = self.nodes[idx.get()].id.clone();
                    let group = group_names.iter().find(|g| **g == p.group).unwrap_or(&p.group).clone();
                    let alloc = Allocation {
                        id,
                        job: job_id.clone(),
                        job_version: plan.job_version,
                        group,
                        index: p.index,
                        node: node.clone(),
                        resources: p.resources,
                        gpus,
                        desired: DesiredStatus::Run,
                        status: AllocStatus::Pending,
                        tasks: Vec::new(),
                        health: None,
                        canary: awaiting.contains(&p.group) && older.contains(&(p.group.clone(), p.index)),
                        failed_at_ms: None,
                        reschedules: histories.get(&(p.group.clone(), p.index)).cloned().unwrap_or_default(),
                    };
                    self.allocs_by_job.entry(job_id.clone()).or_default().push(id);
                    self.allocs_by_node.entry(node).or_default().push(id);
                    self.allocs.insert(id, Box::new(alloc));
                    applied.placed.push(id);
                }
                Err(reason) => applied.refused.push(Refused { placement: p.clone(), reason }),
            }
        }
        applied
    }

    fn check_placement(&self, p: &Placement) -> Result<Option<(usize, u32)>, Reason> {
        let idx = match self.node_index.get(&p.node) {
            Some(&i) if i == p.node_idx => i,
            _ => return Err(Reason::NotReady),
        };
        let node = &self.nodes[idx.get()];
        if !node.schedulable() {
            return Err(Reason::NotReady);
        }
        let ask = p.gpus.as_ref().map(|g| GpuAsk { count: g.count, model: Some(g.model.clone()) });
        let usage = &self.usage[idx.get()];
        match usage.fit(node, p.resources, ask.as_ref()) {
            Ok(dev) => Ok(dev.zip(ask.map(|a| a.count))),
            Err(dim) => Err(Reason::Exhausted(dim)),
        }
    }

    /// Records an allocation's reported status; a terminal status frees its
    /// resources. Terminal is final: a late report after it (an agent that
    /// reconnects with stale news) changes nothing.
    /// Asks allocation `id` to stop (its agent stops it; the usage is
    /// released once it is terminal). Whether it was live.
    pub(crate) fn stop_alloc(&mut self, id: AllocId) -> bool {
        match self.allocs.get_mut(&id) {
            Some(a) if a.is_live() => {
                a.desired = DesiredStatus::Stop;
                true
            }
            _ => false,
        }
    }

    /// Stamps the time (Unix ms) a failure of allocation `id` was logged.
    pub(crate) fn set_failed_at(&mut self, id: AllocId, now_ms: Option<u64>) {
        if let Some(a) = self.allocs.get_mut(&id) {
            a.failed_at_ms = now_ms;
        }
    }

    pub fn set_alloc_status(&mut self, id: AllocId, status: AllocStatus) {
        let Some(a) = self.allocs.get_mut(&id) else { return };
        if a.status.is_terminal() {
            return;
        }
        let was_holding = a.holds_resources();
        a.status = status;
        if was_holding && !a.holds_resources() {
            if let Some(&idx) = self.node_index.get(&a.node) {
                let gpu = gpu_slot(&self.nodes[idx.get()], a.gpus.as_ref());
                self.usage[idx.get()].sub(a.resources, gpu);
            }
            self.capacity_epoch += 1;
        }
    }

    /// Sums usage from the allocations, to check the incremental index.
    pub fn recomputed_usage(&self) -> Vec<NodeUsage> {
        let mut usage = vec![NodeUsage::default(); self.nodes.len()];
        for a in self.allocs.values().filter(|a| a.holds_resources()) {
            if let Some(&idx) = self.node_index.get(&a.node) {
                usage[idx.get()].add(a.resources, gpu_slot(&self.nodes[idx.get()], a.gpus.as_ref()));
            }
        }
        usage
    }
}

/// The node's GPU device group `gpus` (an allocation's) took from, with
/// the count.
pub(crate) fn gpu_slot(node: &Node, gpus: Option<&GpuDevices>) -> Option<(usize, u32)> {
    let g = gpus?;
    node.gpus.iter().position(|d| d.model == g.model).map(|i| (i, g.count))
}

/// Instances of a job held by another cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub job: JobId,
    pub group: Arc<str>,
    pub indices: Vec<u32>,
    /// The group's fingerprint ([`Job::group_fingerprint`]) the held
    /// instances run, when the holder said: once the job's differs, a
    /// group that [`Job::rolls_beside`] has them replaced here beside
    /// them, and the holder lets them go once the replacements are healthy.
    pub spec: Option<u64>,
}

impl ClusterState {
    /// Whether `holder` may hold `indices` of `job`'s `group`: none of them
    /// may be live here or held by another holder (a holder may re-hold
    /// its own, to shrink its hold). Review B9: a hold that raced a local
    /// placement would otherwise cover an instance that also runs here.
    pub fn can_hold(&self, holder: &str, job: &JobId, group: &str, indices: &[u32]) -> Result<(), String> {
        // A delegation decided before its job was collected holds nothing.
        if !self.jobs.contains_key(job) {
            return Err(format!("unknown job {job}"));
        }
        // A stopping at-most-once instance still covers its index (see
        // `reconcile`): it may not be offered before it has ended.
        let at_most_once = self
            .jobs
            .get(job)
            .and_then(|j| j.group(group))
            .is_some_and(|g| g.on_disconnect == crate::model::job::OnDisconnect::Stop);
        // What the holder holds already may stay held (a hold shrinks), even
        // where a deployment placed its replacement here meanwhile.
        let own = self.holds.get(holder).filter(|h| h.job == *job && &*h.group == group);
        let new = |i: u32| own.is_none_or(|h| !h.indices.contains(&i));
        let live = self
            .allocs_of_job(job)
            .filter(|a| &*a.group == group && (a.is_live() || (at_most_once && !a.status.is_terminal())));
        if let Some(a) = live.into_iter().find(|a| indices.contains(&a.index) && new(a.index)) {
            return Err(format!("{job}.{group}[{}] runs here as allocation {}", a.index, a.id.0));
        }
        let others = self.holds.iter().filter(|(h, held)| h.as_str() != holder && held.job == *job);
        for (h, held) in others.filter(|(_, held)| &*held.group == group) {
            if let Some(i) = held.indices.iter().find(|i| indices.contains(i)) {
                return Err(format!("{job}.{group}[{i}] is held by {h}"));
            }
        }
        Ok(())
    }

    /// Holds `indices` for `holder` and stores its record; refused (and
    /// nothing changes) when [`ClusterState::can_hold`] refuses.
    pub fn hold(
        &mut self,
        holder: &str,
        job: &JobId,
        group: &Arc<str>,
        indices: &[u32],
        spec: Option<u64>,
        record: Vec<u8>,
    ) -> Result<(), String> {
        self.can_hold(holder, job, group, indices)?;
        let held = Held { job: job.clone(), group: group.clone(), indices: indices.to_vec(), spec };
        self.holds.insert(holder.to_string(), held);
        self.records.insert(holder.to_string(), record);
        Ok(())
    }

    /// The newest version of `job` whose instances the federation has
    /// offered to peers (`Command::PeersAsked`), if any.
    pub fn peers_asked(&self, job: &JobId) -> Option<u64> {
        std::str::from_utf8(self.record(&crate::command::peers_asked_key(job))?).ok()?.parse().ok()
    }

    /// The record stored under `holder`, if any.
    pub fn record(&self, holder: &str) -> Option<&[u8]> {
        self.records.get(holder).map(Vec::as_slice)
    }

    /// Ends a hold; returns its job, to evaluate again.
    pub fn release(&mut self, holder: &str, record: Vec<u8>) -> Option<JobId> {
        self.records.insert(holder.to_string(), record);
        self.holds.remove(holder).map(|h| h.job)
    }

    pub fn set_record(&mut self, holder: &str, record: Vec<u8>) {
        self.records.insert(holder.to_string(), record);
    }

    /// Instances of `job` held elsewhere, as (group, index).
    pub fn held_of_job<'a>(&'a self, job: &'a JobId) -> impl Iterator<Item = (&'a str, u32)> + 'a {
        self.holds.values().filter(move |h| h.job == *job).flat_map(|h| h.indices.iter().map(move |i| (&*h.group, *i)))
    }

    pub fn holds(&self) -> &BTreeMap<String, Held> {
        &self.holds
    }

    /// Holders' records whose key starts with `prefix`.
    pub fn records<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Vec<u8>)> + 'a {
        self.records.range(prefix.to_string()..).take_while(move |(k, _)| k.starts_with(prefix))
    }
}

/// The replicated part of [`ClusterState`], in canonical order: nodes by
/// index, jobs and allocations by id. Everything else is an index rebuilt
/// from it.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    nodes: Vec<Node>,
    jobs: Vec<Job>,
    /// Boxed as the state keeps them: a collection moves them out and back
    /// without a copy. The encoding is that of `Vec<Allocation>`.
    #[allow(clippy::vec_box)]
    allocs: Vec<Box<Allocation>>,
    next_alloc: u64,
    evals: Vec<Evaluation>,
    next_eval: u64,
    holds: Vec<(String, Held)>,
    records: Vec<(String, Vec<u8>)>,
    acl: crate::acl::AclState,
    gc_marks: Vec<(GcObject, u64)>,
    histories: Vec<(JobId, JobHistory)>,
}

impl ClusterState {
    /// The whole state, encoded through the codec. Two servers that applied
    /// the same log produce the same bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        codec::encode(&Snapshot {
            nodes: self.nodes.clone(),
            jobs: self.jobs.values().cloned().collect(),
            allocs: self.allocs.values().cloned().collect(),
            next_alloc: self.next_alloc,
            evals: self.evals.values().cloned().collect(),
            next_eval: self.next_eval,
            holds: self.holds.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            records: self.records.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            acl: self.acl.clone(),
            gc_marks: self.gc_marks.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            histories: self.histories.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }

    /// The replicated part, moved out (the indexes are dropped).
    fn into_snapshot(self) -> Snapshot {
        Snapshot {
            nodes: self.nodes,
            jobs: self.jobs.into_values().collect(),
            allocs: self.allocs.into_values().collect(),
            next_alloc: self.next_alloc,
            evals: self.evals.into_values().collect(),
            next_eval: self.next_eval,
            holds: self.holds.into_iter().collect(),
            records: self.records.into_iter().collect(),
            acl: self.acl,
            gc_marks: self.gc_marks.into_iter().collect(),
            histories: self.histories.into_iter().collect(),
        }
    }

    /// Rebuilds a state, indexes included, from [`ClusterState::snapshot`].
    pub fn restore(bytes: &[u8]) -> Result<ClusterState, CodecError> {
        ClusterState::from_snapshot(codec::decode(bytes, codec::DECODE_BYTES_MAX)?)
    }

    /// Rebuilds a state, indexes included, from its replicated part.
    fn from_snapshot(snap: Snapshot) -> Result<ClusterState, CodecError> {
        use archive::Item;
        let mut build = archive::Builder::default();
        let items = [Item::Counters { next_alloc: snap.next_alloc, next_eval: snap.next_eval }, Item::Acl(snap.acl)]
            .into_iter()
            .chain(snap.nodes.into_iter().map(Item::Node))
            .chain(snap.jobs.into_iter().map(Item::Job))
            .chain(snap.allocs.into_iter().map(Item::Alloc))
            .chain(snap.evals.into_iter().map(Item::Eval))
            .chain(snap.holds.into_iter().map(|(k, h)| Item::Hold(k, h)))
            .chain(snap.records.into_iter().map(|(k, r)| Item::Record(k, r)))
            .chain(snap.gc_marks.into_iter().map(|(o, at)| Item::GcMark(o, at)))
            .chain(snap.histories.into_iter().map(|(j, h)| Item::History(j, h)));
        for item in items {
            build.add(item).map_err(CodecError::Malformed)?;
        }
        Ok(build.finish())
    }

    /// Adds an allocation read back from a snapshot, with its indexes and
    /// the usage it holds.
    fn insert_restored_alloc(&mut self, mut alloc: Box<Allocation>) {
        // Names shared with the state, as `apply_plan` shares them.
        if let Some((job, j)) = self.jobs.get_key_value(&alloc.job) {
            if let Some(g) = j.groups.iter().find(|g| g.name == alloc.group) {
                alloc.group = g.name.clone();
            }
            alloc.job = job.clone();
        }
        if let Some((node, _)) = self.node_index.get_key_value(&alloc.node) {
            alloc.node = node.clone();
        }
        if alloc.holds_resources() {
            if let Some(&idx) = self.node_index.get(&alloc.node) {
                let gpu = gpu_slot(&self.nodes[idx.get()], alloc.gpus.as_ref());
                self.usage[idx.get()].add(alloc.resources, gpu);
            }
        }
        self.allocs_by_job.entry(alloc.job.clone()).or_default().push(alloc.id);
        self.allocs_by_node.entry(alloc.node.clone()).or_default().push(alloc.id);
        self.allocs.insert(alloc.id, alloc);
    }
}
