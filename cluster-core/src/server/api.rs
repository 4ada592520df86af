//! What the HTTP API sends and receives, shared by the server and its
//! client: plain serde structs, JSON on the wire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::diag::DiagnosticRecord;
use crate::model::alloc::Allocation;
use crate::model::eval::Evaluation;
use crate::model::job::Job;
use crate::model::node::Node;
use crate::model::plan::{Plan, Unplaced};
use crate::state::ClusterState;

/// Every error the API returns: a message a person can act on, and, for a
/// job spec that does not check, every problem with its line and column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status it travels with.
    pub status: u16,
    pub message: String,
    /// Also travels through the codec (a forwarded write's answer), so no
    /// field may be skipped when empty: bincode would then misread it.
    #[serde(default)]
    pub diagnostics: Vec<DiagnosticRecord>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), diagnostics: Vec::new() }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, message)
    }

    pub fn no_leader() -> ApiError {
        ApiError::new(503, "the cluster has no leader right now; retry in a few seconds")
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, message)
    }
}

/// `PUT /v1/jobs` and `POST /v1/jobs/plan`: a job spec's TOML text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSubmit {
    pub spec: String,
    /// The file name, for error messages.
    #[serde(default)]
    pub source: Option<String>,
}

/// `POST /v1/jobs/ID/scale`: group `group` now wants `count` instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scale {
    pub group: String,
    pub count: u32,
}

/// `POST /v1/nodes/ID/eligibility`: whether the node takes new work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eligibility {
    pub eligible: bool,
}

/// `POST /v1/allocations/ID/stop`: the evaluation that places it again
/// (none when it was already stopping or ended).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocStopped {
    pub alloc: u64,
    pub eval: Option<u64>,
}

/// `POST /v1/allocations/ID/restart`: restart its tasks (or only `task`)
/// in place.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocRestart {
    #[serde(default)]
    pub task: Option<String>,
}

/// `POST /v1/allocations/ID/signal`: send `signal` (`SIGHUP`, `HUP` or a
/// number) to its tasks (or only `task`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocSignal {
    #[serde(default)]
    pub task: Option<String>,
    pub signal: String,
}

/// What a restart or a signal did, as the agent said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocOpDone {
    pub alloc: u64,
    pub done: String,
}

/// The signals `hanse alloc signal` takes by name, with their numbers on
/// Linux.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("ALRM", 14),
    ("TERM", 15),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("WINCH", 28),
];

/// A signal as an operator writes it: `SIGUSR1`, `usr1` or `10` (1 to 64).
pub fn parse_signal(text: &str) -> Result<i32, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<i32>() {
        return if (1..=64).contains(&n) { Ok(n) } else { Err(format!("signal {n} is out of range (1 to 64)")) };
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).ok_or_else(|| {
        let names: Vec<String> = SIGNALS.iter().map(|(n, _)| format!("SIG{n}")).collect();
        format!("unknown signal `{t}`: use a number (1 to 64) or one of {}", names.join(", "))
    })
}

/// A write whose effect an evaluation carries out (a promotion, a failed
/// deployment): that evaluation, if it opened one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalOpened {
    pub eval: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRegistered {
    pub job: String,
    pub version: u64,
    /// The evaluation that places it; `GET /v1/evaluations/ID?wait=30`.
    pub eval: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalView {
    pub id: u64,
    pub job: String,
    pub trigger: String,
    pub status: String,
    pub placed: u32,
    pub unplaced: Vec<UnplacedView>,
    /// Pending until then (Unix ms): failed instances wait for their
    /// reschedule delay.
    #[serde(default)]
    pub wait_until_ms: Option<u64>,
}

impl EvalView {
    pub fn of(e: &Evaluation) -> EvalView {
        EvalView {
            id: e.id.0,
            job: e.job.to_string(),
            trigger: e.trigger.to_string(),
            status: e.status.to_string(),
            placed: e.placed,
            unplaced: e.unplaced.iter().map(UnplacedView::of).collect(),
            wait_until_ms: e.wait_until_ms,
        }
    }

    pub fn is_open(&self) -> bool {
        self.status == "pending" || self.status == "blocked"
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnplacedView {
    pub group: String,
    pub count: u32,
    /// One line: "memory exhausted on 812 nodes; ...".
    pub explanation: String,
    pub reasons: Vec<ReasonView>,
}

impl UnplacedView {
    pub fn of(u: &Unplaced) -> UnplacedView {
        UnplacedView {
            group: u.group.to_string(),
            count: u.count,
            explanation: u.explain(),
            reasons: u.reasons.iter().map(|(r, n)| ReasonView { reason: r.to_string(), nodes: *n }).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReasonView {
    pub reason: String,
    pub nodes: u32,
}

/// One job, summarised for `job list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub namespace: String,
    pub job_type: String,
    pub objective: String,
    pub version: u64,
    /// One of [`crate::state::JobState`]: pending, running, blocked,
    /// degraded, complete, failed, stopped (see [`crate::state::progress`]).
    pub status: String,
    /// Instances wanted, over all groups.
    pub desired: u64,
    /// Allocations by their status (pending, running, complete, failed, lost).
    pub allocs: BTreeMap<String, u64>,
    /// Wanted instances by where they are (running, waiting, complete,
    /// failed: failed for good, not placed again until its group changes).
    #[serde(default)]
    pub instances: BTreeMap<String, u64>,
}

impl JobSummary {
    pub fn of(state: &ClusterState, job: &Job) -> JobSummary {
        let mut allocs: BTreeMap<String, u64> = BTreeMap::new();
        for a in state.allocs_of_job(&job.id).filter(|a| a.job_version == job.version || !a.status.is_terminal()) {
            *allocs.entry(a.status.to_string()).or_default() += 1;
        }
        let progress = crate::state::progress(state, job);
        JobSummary {
            id: job.id.to_string(),
            namespace: job.namespace.to_string(),
            job_type: job.job_type.to_string(),
            objective: job.objective.to_string(),
            version: job.version,
            status: progress.state.to_string(),
            desired: if job.stopped { 0 } else { job.instance_count() },
            allocs,
            instances: progress.instances.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }
}

/// `GET /v1/jobs/ID`: the job, its latest evaluation and its allocations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub summary: JobSummary,
    pub eval: Option<EvalView>,
    pub allocations: Vec<AllocView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocView {
    pub id: u64,
    /// `a000042`.
    pub name: String,
    pub job: String,
    pub job_version: u64,
    pub group: String,
    pub index: u32,
    pub node: String,
    pub desired: String,
    pub status: String,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: Option<String>,
    /// As the agent last reported them.
    pub tasks: Vec<TaskView>,
    /// `healthy` or `unhealthy` once its agent decided; absent before.
    #[serde(default)]
    pub health: Option<String>,
    /// Placed as a canary of a deployment.
    #[serde(default)]
    pub canary: bool,
    /// When (Unix ms) the cluster logged its failure.
    #[serde(default)]
    pub failed_at_ms: Option<u64>,
    /// A failure of the job's current version: when (Unix ms) its
    /// instance may be placed again, by its group's reschedule policy
    /// (absent when it is not placed again at all; see
    /// `reschedule_final`).
    #[serde(default)]
    pub reschedule_at_ms: Option<u64>,
    /// A failure of the current version after which its instance is not
    /// placed again: the group's reschedule limit is reached, or a task
    /// could not start at all.
    #[serde(default)]
    pub reschedule_final: bool,
    /// The earlier reschedules of its instance, as kept: `(failed at (Unix
    /// ms), waited (ms))`, oldest first.
    #[serde(default)]
    pub reschedules: Vec<(u64, u64)>,
}

/// A piece of a task's log, as the CLI reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogsChunk {
    pub data: Vec<u8>,
    pub next: u64,
    pub oldest: u64,
    pub done: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub name: String,
    /// pending, running, dead, unrunnable (it could not start and will
    /// not be placed again: `message` says why).
    pub state: String,
    pub restarts: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: String,
    /// Its health checks' last results.
    #[serde(default)]
    pub checks: Vec<CheckView>,
}

/// A health check's last result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckView {
    pub name: String,
    /// tcp, http or script.
    pub kind: String,
    /// pending (not run yet), passing or critical.
    pub status: String,
    pub output: String,
}

impl AllocView {
    /// `a` as the API shows it: an allocation of a stopped job reads
    /// `desired stop`, whatever it ended as (one that had ended before the
    /// stop keeps its record as it was).
    pub fn of(state: &ClusterState, a: &Allocation) -> AllocView {
        let job = state.job(&a.job);
        let stopped = job.is_some_and(|j| j.stopped);
        // A wanted failure of what runs now: what its instance's policy says.
        let policy = job
            .filter(|j| j.version == a.job_version && j.job_type != crate::model::JobType::System && !j.stopped)
            .and_then(|j| j.group(&a.group))
            .map(|g| g.reschedule);
        let failed = a.status == crate::model::AllocStatus::Failed && a.desired == crate::model::DesiredStatus::Run;
        // Only the latest allocation of its instance says what comes next.
        let latest = || !state.allocs_of_job(&a.job).any(|b| b.group == a.group && b.index == a.index && b.id > a.id);
        let reschedule =
            (policy.filter(|_| failed && latest())).map(|p| crate::scheduler::reconcile::reschedule_due(&p, a));
        AllocView {
            id: a.id.0,
            name: a.id.to_string(),
            job: a.job.to_string(),
            job_version: a.job_version,
            group: a.group.to_string(),
            index: a.index,
            node: a.node.to_string(),
            desired: if stopped { "stop".to_string() } else { a.desired.to_string() },
            status: a.status.to_string(),
            cpu_millis: a.resources.cpu_millis,
            memory_bytes: a.resources.memory_bytes,
            gpus: a.gpus.as_ref().map(|g| format!("{} x {}", g.count, g.model)),
            tasks: a
                .tasks
                .iter()
                .map(|t| TaskView {
                    name: t.name.to_string(),
                    state: t.state.to_string(),
                    restarts: t.restarts,
                    exit_code: t.exit_code,
                    signal: t.signal,
                    message: t.message.clone(),
                    checks: t
                        .checks
                        .iter()
                        .map(|c| CheckView {
                            name: c.name.to_string(),
                            kind: c.kind.to_string(),
                            status: c.status.to_string(),
                            output: c.output.clone(),
                        })
                        .collect(),
                })
                .collect(),
            health: a.health.map(|h| h.to_string()),
            canary: a.canary,
            failed_at_ms: a.failed_at_ms,
            reschedule_at_ms: reschedule.flatten(),
            reschedule_final: reschedule.is_some_and(|r| r.is_none()),
            reschedules: a.reschedules.iter().map(|e| (e.failed_at_ms, e.delay_ms)).collect(),
        }
    }
}

/// `GET /v1/jobs/ID/versions`: the versions kept, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobVersions {
    pub job: String,
    pub versions: Vec<JobVersionView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobVersionView {
    pub version: u64,
    /// The one the cluster runs now.
    pub current: bool,
    /// Its deployment succeeded: `auto_revert` rolls back to it.
    pub stable: bool,
    /// Its deployment's status, if it had one.
    pub deployment: Option<String>,
    /// What changed from the version before ("count of web 3 -> 5",
    /// "task server of web"), when that one is kept.
    pub changes: Vec<String>,
    /// The text it was submitted as (`hanse job run FILE`), when kept.
    #[serde(default)]
    pub submitted: Option<String>,
    /// The spec, as the cluster keeps it (only to a caller who may
    /// `submit` in its namespace, as is `submitted`).
    #[serde(default)]
    pub spec: Option<crate::model::Job>,
}

/// `POST /v1/jobs/ID/revert`: register version `version` again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revert {
    pub version: u64,
}

/// `POST /v1/jobs/ID/deployment/promote`: promote the canaries of every
/// group, or only of `group`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Promote {
    #[serde(default)]
    pub group: Option<String>,
}

/// `GET /v1/jobs/ID/deployment`: the job's latest deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub job: String,
    pub job_version: u64,
    /// running, successful, failed or cancelled.
    pub status: String,
    pub description: String,
    pub groups: Vec<DeploymentGroupView>,
}

/// One group of a deployment, counted over its instances now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentGroupView {
    pub name: String,
    /// The group's count.
    pub desired: u32,
    pub canaries: u32,
    pub promoted: bool,
    /// Live instances of the deployment's version.
    pub placed: u32,
    pub healthy: u32,
    pub unhealthy: u32,
    /// Live instances of older versions, still to be replaced.
    pub older: u32,
    pub max_parallel: u32,
    pub auto_revert: bool,
}

impl DeploymentView {
    pub fn of(state: &ClusterState, d: &crate::model::deployment::Deployment) -> DeploymentView {
        use crate::model::alloc::AllocHealth;
        let spec = state.job_version(&d.job, d.job_version);
        let groups = d
            .groups
            .iter()
            .map(|g| {
                let update = spec.and_then(|j| j.group(&g.name)).and_then(|s| s.update).unwrap_or_default();
                let mut v = DeploymentGroupView {
                    name: g.name.to_string(),
                    desired: spec.and_then(|j| j.group(&g.name)).map_or(0, |s| s.count),
                    canaries: g.canaries,
                    promoted: g.promoted,
                    placed: 0,
                    healthy: 0,
                    unhealthy: 0,
                    older: 0,
                    max_parallel: update.max_parallel,
                    auto_revert: update.auto_revert,
                };
                for a in state.allocs_of_job(&d.job).filter(|a| a.group == g.name) {
                    if a.job_version == d.job_version {
                        v.placed += u32::from(a.is_live());
                        v.healthy += u32::from(a.health == Some(AllocHealth::Healthy) && a.is_live());
                        v.unhealthy += u32::from(a.health == Some(AllocHealth::Unhealthy));
                    } else if a.is_live() && a.job_version < d.job_version {
                        v.older += 1;
                    }
                }
                v
            })
            .collect();
        DeploymentView {
            job: d.job.to_string(),
            job_version: d.job_version,
            status: d.status.to_string(),
            description: d.description.clone(),
            groups,
        }
    }
}

/// What changed from `old` to `new`, in words an operator reads: counts,
/// tasks and the rest of each group, groups added or removed, and the job's
/// own settings.
pub fn job_changes(old: &crate::model::Job, new: &crate::model::Job) -> Vec<String> {
    use crate::model::job::TaskGroup;
    let mut out = Vec::new();
    let bare = |j: &crate::model::Job| crate::model::Job { groups: Vec::new(), version: 0, ..j.clone() };
    if bare(old) != bare(new) {
        out.push(if old.stopped != new.stopped {
            if new.stopped { "stopped".to_string() } else { "started again".to_string() }
        } else {
            "job settings".to_string()
        });
    }
    for g in &new.groups {
        let Some(o) = old.group(&g.name) else {
            out.push(format!("group {} added", g.name));
            continue;
        };
        if o.count != g.count {
            out.push(format!("count of {} {} -> {}", g.name, o.count, g.count));
        }
        for t in &g.tasks {
            match o.tasks.iter().find(|x| x.name == t.name) {
                Some(x) if x == t => {}
                Some(_) => out.push(format!("task {} of {}", t.name, g.name)),
                None => out.push(format!("task {} of {} added", t.name, g.name)),
            }
        }
        let rest = |x: &TaskGroup| TaskGroup { count: 0, tasks: Vec::new(), ..x.clone() };
        if rest(o) != rest(g) {
            out.push(format!("settings of {}", g.name));
        }
    }
    for o in old.groups.iter().filter(|o| new.group(&o.name).is_none()) {
        out.push(format!("group {} removed", o.name));
    }
    out
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub class: String,
    pub region: String,
    pub zone: String,
    pub environment: String,
    pub status: String,
    pub eligible: bool,
    pub draining: bool,
    pub cpu_millis: u64,
    pub cpu_used_millis: u64,
    pub memory_bytes: u64,
    pub memory_used_bytes: u64,
    pub allocs: u64,
}

impl NodeView {
    pub fn of(state: &ClusterState, n: &Node, allocs: u64) -> NodeView {
        let used = state.node_idx(&n.id).map(|i| state.usage(i).res).unwrap_or_default();
        NodeView {
            id: n.id.to_string(),
            class: n.class.to_string(),
            region: n.region.to_string(),
            zone: n.zone.to_string(),
            environment: n.environment.to_string(),
            status: format!("{:?}", n.status).to_lowercase(),
            eligible: n.eligible,
            draining: n.draining,
            cpu_millis: n.capacity.cpu_millis,
            cpu_used_millis: used.cpu_millis,
            memory_bytes: n.capacity.memory_bytes,
            memory_used_bytes: used.memory_bytes,
            allocs,
        }
    }
}

/// `GET /v1/nodes/ID`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatusView {
    pub node: NodeView,
    pub allocations: Vec<AllocView>,
}

/// `POST /v1/nodes/heartbeat`: the nodes an agent (or a simulator) speaks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// Heartbeat again within this many milliseconds.
    pub ttl_ms: u64,
    /// Nodes the cluster does not know: register them first.
    pub unknown: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Drain {
    /// false ends a drain.
    #[serde(default = "yes")]
    pub drain: bool,
    /// Milliseconds the node's work has to stop; without one each task
    /// gets its own kill timeout.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// `POST /v1/allocations/status`: agents' reports, batched.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllocUpdates {
    pub updates: Vec<AllocUpdate>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllocUpdate {
    pub id: u64,
    /// pending, running, complete, failed, lost.
    pub status: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub id: u64,
    pub address: String,
    pub leader: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaderView {
    pub leader: Option<u64>,
    pub address: Option<String>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
}

/// `POST /v1/operator/raft/peers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddPeer {
    pub id: u64,
    pub address: String,
}

/// `POST /v1/operator/raft/transfer-leader`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferLeader {
    pub id: u64,
}

/// A dry run of a job: where it would go, and why the rest cannot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    pub job: String,
    pub job_type: String,
    pub objective: String,
    /// The fleet file planned against, or the cluster's name.
    pub fleet: String,
    pub nodes: usize,
    pub seed: u64,
    pub placed: usize,
    pub unplaced: u64,
    pub stops: usize,
    /// Placements and stops this plan left for later parts: one plan
    /// carries at most `SchedulerConfig::max_changes_per_plan`; a running
    /// job gets the rest in the next rounds, a dry run does not plan them.
    #[serde(default)]
    pub deferred: u64,
    /// Live instances of an older version this plan leaves running,
    /// because their replacement cannot be placed yet: an update takes
    /// down only what it can replace.
    #[serde(default)]
    pub kept_older: u64,
    /// Live instances of an older version left for the job's deployment
    /// to replace, a few at a time ([`crate::model::job::UpdateStrategy`]):
    /// this plan starts the first of them.
    #[serde(default)]
    pub rolling: u64,
    pub by_class: BTreeMap<String, ClassCount>,
    pub placements: Vec<PlacementRow>,
    pub unplaced_groups: Vec<UnplacedView>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassCount {
    pub instances: u64,
    pub nodes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementRow {
    pub group: String,
    pub index: u32,
    pub node: String,
    pub class: String,
    pub score: f64,
}

impl PlanReport {
    pub fn of(state: &ClusterState, job: &Job, plan: &Plan, fleet: &str, seed: u64) -> PlanReport {
        let mut by_class: BTreeMap<String, ClassCount> = BTreeMap::new();
        let mut seen_nodes = std::collections::HashSet::new();
        let placements = plan
            .placements
            .iter()
            .map(|p| {
                let class = state.node(p.node_idx).class.to_string();
                let entry = by_class.entry(class.clone()).or_default();
                entry.instances += 1;
                if seen_nodes.insert(p.node_idx) {
                    entry.nodes += 1;
                }
                PlacementRow {
                    group: p.group.to_string(),
                    index: p.index,
                    node: p.node.to_string(),
                    class,
                    score: p.score,
                }
            })
            .collect();
        let stopped: std::collections::HashSet<_> = plan.stops.iter().map(|s| s.alloc).collect();
        let rolled = |a: &Allocation| {
            job.job_type == crate::model::JobType::Service
                && !job.stopped
                && job.group(&a.group).is_some_and(|g| g.update.is_some())
        };
        let (mut kept_older, mut rolling) = (0, 0);
        for a in state.allocs_of_job(&job.id) {
            if a.is_live() && a.job_version < job.version && !stopped.contains(&a.id) {
                if rolled(a) { rolling += 1 } else { kept_older += 1 }
            }
        }
        PlanReport {
            job: job.id.to_string(),
            job_type: job.job_type.to_string(),
            objective: job.objective.to_string(),
            fleet: fleet.to_string(),
            nodes: state.nodes().len(),
            seed,
            placed: plan.placements.len(),
            unplaced: plan.unplaced_count(),
            stops: plan.stops.len(),
            deferred: plan.deferred,
            kept_older,
            rolling,
            by_class,
            placements,
            unplaced_groups: plan.unplaced.iter().map(UnplacedView::of).collect(),
        }
    }
}
