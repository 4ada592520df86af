//! Jobs, task groups, tasks, and the placement rules a job carries.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::model::node::keyword_enum;
use crate::resources::{GpuAsk, Resources};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// Long-running; replaced when it exits.
    Service,
    /// Runs to completion; a successful instance is not replaced.
    Batch,
    /// One instance on every feasible node; `count` is ignored.
    System,
}

/// What a job's placements should optimise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Near users and data, spread for availability.
    Latency,
    /// Packed onto the cheapest feasible nodes.
    Cost,
    /// Spread for headroom: free cores and power.
    Throughput,
    /// Packed, with every other term at a moderate weight.
    Balanced,
}

/// Whether a job's unplaced instances may run in a peer cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DelegateMode {
    Never,
    Overflow,
    PreferRemote,
}

keyword_enum!(JobType { Service = "service", Batch = "batch", System = "system" });
keyword_enum!(Objective {
    Latency = "latency",
    Cost = "cost",
    Throughput = "throughput",
    Balanced = "balanced",
});
keyword_enum!(DelegateMode { Never = "never", Overflow = "overflow", PreferRemote = "prefer-remote" });

impl JobType {
    /// The objective a job of this type gets when its spec names none.
    pub fn default_objective(self) -> Objective {
        match self {
            JobType::Batch => Objective::Cost,
            JobType::Service => Objective::Latency,
            JobType::System => Objective::Balanced,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// Whose job it is, for access control (see [`crate::acl`]):
    /// `default` unless the spec names one. Job ids stay unique across
    /// namespaces.
    pub namespace: Arc<str>,
    pub job_type: JobType,
    /// 1..=100; higher is scheduled first.
    pub priority: u8,
    pub objective: Objective,
    pub labels: BTreeMap<String, String>,
    /// Jurisdictions this job may run in; empty means anywhere.
    pub jurisdictions: Vec<Arc<str>>,
    pub federation: FederationSpec,
    /// Constraints and affinities written at job level apply to every group.
    pub groups: Vec<TaskGroup>,
    /// Bumped by the cluster on every update of the spec.
    pub version: u64,
    pub stopped: bool,
}

impl Job {
    pub fn group(&self, name: &str) -> Option<&TaskGroup> {
        self.groups.iter().find(|g| &*g.name == name)
    }

    /// The delegation whose lease `group`'s instances run under: set for
    /// at-most-once work (`on_disconnect = "stop"`) that another cluster
    /// delegated here, `None` for everything else.
    pub fn delegation_lease(&self, group: &TaskGroup) -> Option<&str> {
        (group.on_disconnect == OnDisconnect::Stop).then(|| self.labels.get(LABEL_DELEGATION).map(String::as_str))?
    }

    /// A stable 64-bit fingerprint of what `group` runs: the job with only
    /// that group, its `count`, reschedule policy, version and stop flag
    /// aside (FNV-1a over the codec's bytes). Two versions with the same
    /// fingerprint run the same instances; a delegation records the one
    /// it was offered.
    pub fn group_fingerprint(&self, group: &str) -> u64 {
        let mut j = self.clone();
        j.version = 0;
        j.stopped = false;
        j.groups.retain(|g| &*g.name == group);
        for g in &mut j.groups {
            g.count = 0;
            g.reschedule = ReschedulePolicy::for_type(self.job_type);
        }
        let bytes = crate::codec::encode(&j);
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// Whether a new version of `group` is placed beside the instances of
    /// an older one until each replacement is healthy, as a deployment
    /// does (`[group.update]` on a service whose instances may run twice
    /// at once), rather than after they stopped. Instances another
    /// cluster holds are replaced so too.
    pub fn rolls_beside(&self, group: &TaskGroup) -> bool {
        self.job_type == JobType::Service && group.update.is_some() && group.on_disconnect == OnDisconnect::Keep
    }

    /// Total instances the job asks for (system jobs: 0, decided per node).
    pub fn instance_count(&self) -> u64 {
        self.groups.iter().map(|g| u64::from(g.count)).sum()
    }
}

/// The job's own federation limits; they may narrow the cluster's policy,
/// never widen it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FederationSpec {
    pub delegate: DelegateMode,
    pub max_remote_share: Option<f64>,
    pub max_cost_per_cpu_hour: Option<f64>,
}

impl Default for FederationSpec {
    fn default() -> Self {
        FederationSpec { delegate: DelegateMode::Overflow, max_remote_share: None, max_cost_per_cpu_hour: None }
    }
}

/// The unit of placement: `count` instances, each running all `tasks`
/// together on one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskGroup {
    pub name: Arc<str>,
    pub count: u32,
    pub constraints: Vec<Predicate>,
    pub affinities: Vec<Affinity>,
    pub spreads: Vec<Spread>,
    /// At most one instance of this group per node.
    pub distinct_hosts: bool,
    /// Data sets the group reads; nodes holding them rank higher.
    pub datasets: Vec<Arc<str>>,
    pub tasks: Vec<Task>,
    /// What the agent does when a task exits or fails.
    pub restart: RestartPolicy,
    /// What the agent does with the group's instances while it cannot
    /// reach its servers.
    pub on_disconnect: OnDisconnect,
    /// `[group.update]`: how a new version replaces the running one. None
    /// replaces every instance at once, each as soon as its replacement is
    /// placed.
    pub update: Option<UpdateStrategy>,
    /// `[group.reschedule]`: how often and how soon a failed instance is
    /// placed again; [`ReschedulePolicy::for_type`] when the spec says
    /// nothing. System jobs ignore it (see
    /// [`crate::scheduler::reconcile::SYSTEM_FAILURES_MAX`]).
    pub reschedule: ReschedulePolicy,
}

/// A group's `[group.reschedule]`: once an instance failed (its restarts
/// on its node used up), how often and how soon the cluster places it
/// again, wherever one fits (the same node is not ruled out). After Nomad's `reschedule`
/// block; [`ReschedulePolicy::for_type`] gives Nomad's defaults.
///
/// The `n`-th reschedule in a row (from 0) waits `delay_function(n)`
/// after the failure, at most `max_delay_ms`; an instance that ran longer
/// than `max_delay_ms` before it failed starts the series again at
/// `delay_ms`. Without `unlimited`, at most `attempts` reschedules fall
/// within any `interval_ms`; a failure past that is final until the job
/// changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReschedulePolicy {
    /// Reschedules within `interval_ms` (ignored when `unlimited`).
    pub attempts: u32,
    pub interval_ms: u64,
    /// The wait (ms) before the first reschedule of a series.
    pub delay_ms: u64,
    pub delay_function: DelayFunction,
    /// The longest wait (ms) a growing delay reaches.
    pub max_delay_ms: u64,
    pub unlimited: bool,
}

/// How the wait grows from one reschedule of an instance to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DelayFunction {
    /// `delay` every time.
    Constant,
    /// `delay`, 2 `delay`, 4 `delay`, ...
    Exponential,
    /// `delay`, `delay`, 2 `delay`, 3 `delay`, 5 `delay`, ...
    Fibonacci,
}

keyword_enum!(DelayFunction { Constant = "constant", Exponential = "exponential", Fibonacci = "fibonacci" });

impl ReschedulePolicy {
    /// Nomad's defaults: a service is placed again forever, after 30 s
    /// doubling up to 1 h; a batch instance once a day, after 5 s.
    pub fn for_type(job_type: JobType) -> ReschedulePolicy {
        const HOUR_MS: u64 = 3_600_000;
        match job_type {
            JobType::Batch => ReschedulePolicy {
                attempts: 1,
                interval_ms: 24 * HOUR_MS,
                delay_ms: 5_000,
                delay_function: DelayFunction::Constant,
                max_delay_ms: HOUR_MS,
                unlimited: false,
            },
            JobType::Service | JobType::System => ReschedulePolicy {
                attempts: 0,
                interval_ms: 0,
                delay_ms: 30_000,
                delay_function: DelayFunction::Exponential,
                max_delay_ms: HOUR_MS,
                unlimited: true,
            },
        }
    }

    /// Whether every field is within what a spec may say (see
    /// `spec::job`): offers from peers are checked against it.
    pub fn within_limits(&self) -> bool {
        const DAY_MS: u64 = 86_400_000;
        self.attempts <= 1_000
            && self.interval_ms <= 365 * DAY_MS
            && self.delay_ms <= 7 * DAY_MS
            && self.max_delay_ms <= 7 * DAY_MS
    }

    /// The wait (ms) before the reschedule at `step` of a series (from 0).
    pub fn delay_at(&self, step: u32) -> u64 {
        let d = match self.delay_function {
            DelayFunction::Constant => self.delay_ms,
            DelayFunction::Exponential => self.delay_ms.saturating_mul(1u64.checked_shl(step).unwrap_or(u64::MAX)),
            DelayFunction::Fibonacci => {
                let (mut a, mut b) = (1u64, 1u64);
                // Past the 93rd term it no longer fits 64 bits.
                for _ in 0..step.min(93) {
                    (a, b) = (b, a.saturating_add(b));
                    if self.delay_ms.saturating_mul(a) >= self.max_delay_ms {
                        break;
                    }
                }
                self.delay_ms.saturating_mul(a)
            }
        };
        d.min(self.max_delay_ms.max(self.delay_ms))
    }

    /// The next reschedule of an instance that failed at `failed_at_ms`,
    /// after the reschedules in `history` (oldest first): its step in the
    /// series and its wait. `None`: no reschedule is left (see the type).
    pub fn next(&self, history: &[RescheduleEvent], failed_at_ms: u64) -> Option<RescheduleEvent> {
        if !self.unlimited {
            let recent = history.iter().filter(|e| e.failed_at_ms.saturating_add(self.interval_ms) > failed_at_ms);
            if recent.count() >= self.attempts as usize {
                return None;
            }
        }
        let step = match history.last() {
            // It ran long enough since its last reschedule: start over.
            Some(e) if failed_at_ms.saturating_sub(e.failed_at_ms.saturating_add(e.delay_ms)) > self.max_delay_ms => 0,
            Some(e) => e.step.saturating_add(1),
            None => 0,
        };
        Some(RescheduleEvent { failed_at_ms, delay_ms: self.delay_at(step), step })
    }

    /// How many of `history` [`ReschedulePolicy::next`] needs: those
    /// within the interval of the newest, and the newest.
    pub fn keep(&self, history: &mut Vec<RescheduleEvent>) {
        let Some(newest) = history.last().map(|e| e.failed_at_ms) else { return };
        let keep_from = if self.unlimited {
            history.len() - 1
        } else {
            let within = |e: &RescheduleEvent| e.failed_at_ms.saturating_add(self.interval_ms) > newest;
            history.iter().position(within).unwrap_or(history.len() - 1).min(history.len() - 1)
        };
        history.drain(..keep_from);
    }
}

/// One reschedule of an instance: the failure it answered and the wait
/// before the replacement could be placed (Nomad's reschedule events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescheduleEvent {
    /// Unix ms at which the cluster logged the failure (0: not known).
    pub failed_at_ms: u64,
    pub delay_ms: u64,
    /// Its place in its series of growing delays, from 0.
    pub step: u32,
}

/// A group's `[group.update]`: a new version of a service replaces the
/// old one a few instances at a time, each old instance stopping only once
/// its replacement is healthy, watched by a deployment
/// ([`crate::model::deployment::Deployment`]). After Nomad's `update`
/// block, whose defaults these are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStrategy {
    /// Instances replaced at once: new ones placed but not yet healthy. At
    /// least 1.
    pub max_parallel: u32,
    /// How long (ms) every task of an instance must have run, its checks
    /// passing, before the instance is healthy.
    pub min_healthy_time_ms: u64,
    /// By when (ms after it was started) an instance must be healthy;
    /// after that it is unhealthy and the deployment fails.
    pub healthy_deadline_ms: u64,
    /// New instances placed beside the old ones first; the rest follows
    /// only once they are promoted (`hanse job promote`, or on their own
    /// when healthy with `auto_promote`).
    pub canary: u32,
    pub auto_promote: bool,
    /// A failed deployment registers the job's last stable version again
    /// (a version whose deployment succeeded).
    pub auto_revert: bool,
    /// System jobs: the wait (ms) between one set of `max_parallel`
    /// nodes updated and the next (Nomad's `stagger`). A service's
    /// deployment is paced by health instead.
    pub stagger_ms: u64,
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        UpdateStrategy {
            max_parallel: 1,
            min_healthy_time_ms: 10_000,
            healthy_deadline_ms: 300_000,
            canary: 0,
            auto_promote: false,
            auto_revert: false,
            stagger_ms: 30_000,
        }
    }
}

/// A health check the agent runs for a task (`[[group.task.check]]`),
/// every `interval_ms`, each run given `timeout_ms`. An instance is healthy
/// only while every check of its tasks passes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: Arc<str>,
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

/// What a [`Check`] does; every address is the agent's own loopback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// Passes when a TCP connection to `127.0.0.1:port` opens.
    Tcp { port: u16 },
    /// Passes when `GET http://127.0.0.1:port{path}` answers 2xx.
    Http { port: u16, path: String },
    /// Passes when `command args...` exits 0. Runs as the task's user, in
    /// the task's directory.
    Script { command: String, args: Vec<String> },
}

impl CheckKind {
    pub fn word(&self) -> &'static str {
        match self {
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Script { .. } => "script",
        }
    }
}

/// Restarts an agent makes on its own, before the allocation counts as
/// failed (and the cluster places it again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub attempts: u32,
    pub delay_ms: u64,
    pub mode: RestartMode,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { attempts: 2, delay_ms: 1_000, mode: RestartMode::Fail }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// After `attempts` restarts the allocation fails.
    Fail,
    /// Restart forever, `delay` apart.
    Delay,
}

/// An agent cut off from its servers keeps its work running (the default)
/// or, for work that must run at most once, stops it when its lease (the
/// heartbeat TTL) lapses: the servers replace it only after TTL + grace,
/// so the old instance is gone before the new one starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDisconnect {
    Keep,
    Stop,
}

keyword_enum!(RestartMode { Fail = "fail", Delay = "delay" });
keyword_enum!(OnDisconnect { Keep = "keep", Stop = "stop" });

impl TaskGroup {
    /// What one instance of the group takes from a node: its tasks' sum.
    pub fn resources(&self) -> Resources {
        self.tasks.iter().fold(Resources::default(), |acc, t| acc.saturating_add(t.resources))
    }

    /// The group's GPU demand: the tasks' counts added; the model is the one
    /// model they name (the parser refuses groups naming two).
    pub fn gpu(&self) -> Option<GpuAsk> {
        let mut ask: Option<GpuAsk> = None;
        for g in self.tasks.iter().filter_map(|t| t.gpu.as_ref()) {
            let a = ask.get_or_insert(GpuAsk { count: 0, model: None });
            a.count = a.count.saturating_add(g.count);
            if a.model.is_none() {
                a.model = g.model.clone();
            }
        }
        ask.filter(|a| a.count > 0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub name: Arc<str>,
    pub driver: Driver,
    pub resources: Resources,
    pub gpu: Option<GpuAsk>,
    /// Between SIGTERM and SIGKILL when the task is stopped.
    pub kill_timeout_ms: u64,
    /// Health checks, run by the agent while the task runs.
    pub checks: Vec<Check>,
}

/// The label naming the cluster a delegated job came from (set by the
/// target of a delegation on the job it registers).
pub const LABEL_ORIGIN: &str = "hanse.origin";
/// The label naming the delegation a job runs for, on its target.
pub const LABEL_DELEGATION: &str = "hanse.delegation";

/// The environment variables a delegated instance's exec tasks get at
/// their target, naming the instance at its origin: `HANSE_ORIGIN` (the
/// cluster), `HANSE_ORIGIN_JOB`, and `HANSE_ORIGIN_INDEXES` (the origin's
/// index of each instance here, comma-separated: instance `i` of the
/// target's job is the `i`-th), from which the agent gives each task its
/// own `HANSE_ORIGIN_INDEX`. A sharded batch job's shard is its origin
/// index, not the index the target gave it.
pub const ENV_ORIGIN: &str = "HANSE_ORIGIN";
/// See [`ENV_ORIGIN`].
pub const ENV_ORIGIN_JOB: &str = "HANSE_ORIGIN_JOB";
/// See [`ENV_ORIGIN`].
pub const ENV_ORIGIN_INDEXES: &str = "HANSE_ORIGIN_INDEXES";
/// See [`ENV_ORIGIN`].
pub const ENV_ORIGIN_INDEX: &str = "HANSE_ORIGIN_INDEX";

/// Marks `job`, registered at a target for `origin`'s job `origin_job`,
/// whose instance `i` is the origin's `indexes[i]`: see [`ENV_ORIGIN`].
pub fn mark_delegated(job: &mut Job, origin: &str, origin_job: &str, indexes: &[u32]) {
    let list = indexes.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    for task in job.groups.iter_mut().flat_map(|g| g.tasks.iter_mut()) {
        if let Driver::Exec { env, .. } = &mut task.driver {
            env.insert(ENV_ORIGIN.into(), origin.into());
            env.insert(ENV_ORIGIN_JOB.into(), origin_job.into());
            env.insert(ENV_ORIGIN_INDEXES.into(), list.clone());
        }
    }
}

/// The default [`Task::kill_timeout_ms`].
pub const KILL_TIMEOUT_MS: u64 = 5_000;

impl Task {
    pub fn driver_name(&self) -> &'static str {
        match self.driver {
            Driver::Exec { .. } => "exec",
            Driver::Mock { .. } => "mock",
        }
    }
}

/// How a task runs, with the driver's own settings. Externally tagged (the
/// serde default): the codec's bincode cannot read internally tagged enums.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A real child process. `user`: the account it runs as, which the
    /// agent must allow (`allowed_users`); `None`: the agent's `task_user`.
    Exec { command: String, args: Vec<String>, env: BTreeMap<String, String>, user: Option<String> },
    /// No process: "runs" for `run_for_ms` and exits with `exit_code`.
    Mock { run_for_ms: u64, exit_code: i32 },
}

/// What a constraint or affinity reads from a node (`${attr.arch}`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    NodeId,
    NodeClass,
    Region,
    Zone,
    Environment,
    ExecutionModel,
    Datasets,
    Jurisdictions,
    Drivers,
    GpuModels,
    Attr(String),
    Meta(String),
}

impl Target {
    /// The `${node.*}` names, for parsing and for "did you mean" hints.
    pub const NODE_FIELDS: &'static [&'static str] = &[
        "id",
        "class",
        "region",
        "zone",
        "environment",
        "execution_model",
        "datasets",
        "jurisdictions",
        "drivers",
        "gpu_models",
    ];

    /// Parses `${node.class}`, `${attr.arch}`, `${meta.team}`.
    pub fn parse(text: &str) -> Result<Target, String> {
        let inner = text.strip_prefix("${").and_then(|t| t.strip_suffix('}')).ok_or_else(|| {
            format!("an attribute is written `${{attr.NAME}}`, `${{node.FIELD}}` or `${{meta.KEY}}`, not `{text}`")
        })?;
        let (scope, name) = inner
            .split_once('.')
            .ok_or_else(|| format!("`{text}` names no scope: write `${{attr.{inner}}}` or `${{node.{inner}}}`"))?;
        if name.is_empty() {
            return Err(format!("`{text}` names no attribute after `{scope}.`"));
        }
        match scope {
            "attr" => Ok(Target::Attr(name.to_string())),
            "meta" => Ok(Target::Meta(name.to_string())),
            "node" => match name {
                "id" | "name" => Ok(Target::NodeId),
                "class" => Ok(Target::NodeClass),
                "region" => Ok(Target::Region),
                "zone" => Ok(Target::Zone),
                "environment" => Ok(Target::Environment),
                "execution_model" => Ok(Target::ExecutionModel),
                "datasets" => Ok(Target::Datasets),
                "jurisdictions" => Ok(Target::Jurisdictions),
                "drivers" => Ok(Target::Drivers),
                "gpu_models" => Ok(Target::GpuModels),
                other => Err(match crate::resources::closest(other, Self::NODE_FIELDS.iter().copied()) {
                    Some(c) => format!("unknown node field `{other}`: did you mean `${{node.{c}}}`?"),
                    None => format!("unknown node field `{other}`; known: {}", Self::NODE_FIELDS.join(", ")),
                }),
            },
            other => Err(match crate::resources::closest(other, ["attr", "node", "meta"]) {
                Some(c) => format!("unknown scope `{other}`: did you mean `${{{c}.{name}}}`?"),
                None => format!("unknown scope `{other}`; use `attr`, `node` or `meta`"),
            }),
        }
    }

    /// True when the value differs from node to node within a class, so a
    /// predicate on it cannot be decided once per class.
    pub fn is_unique(&self) -> bool {
        matches!(self, Target::NodeId) || matches!(self, Target::Attr(k) | Target::Meta(k) if k.starts_with("unique."))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::NodeId => f.write_str("${node.id}"),
            Target::NodeClass => f.write_str("${node.class}"),
            Target::Region => f.write_str("${node.region}"),
            Target::Zone => f.write_str("${node.zone}"),
            Target::Environment => f.write_str("${node.environment}"),
            Target::ExecutionModel => f.write_str("${node.execution_model}"),
            Target::Datasets => f.write_str("${node.datasets}"),
            Target::Jurisdictions => f.write_str("${node.jurisdictions}"),
            Target::Drivers => f.write_str("${node.drivers}"),
            Target::GpuModels => f.write_str("${node.gpu_models}"),
            Target::Attr(k) => write!(f, "${{attr.{k}}}"),
            Target::Meta(k) => write!(f, "${{meta.{k}}}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operator {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Regexp,
    Version,
    SetContains,
    SetContainsAny,
    IsSet,
    IsNotSet,
}

impl Operator {
    /// The words a spec may use, `distinct_hosts` included (a group flag).
    pub const WORDS: &'static [&'static str] = &[
        "=",
        "==",
        "!=",
        "<",
        "<=",
        ">",
        ">=",
        "regexp",
        "version",
        "set_contains",
        "set_contains_any",
        "is_set",
        "is_not_set",
        "distinct_hosts",
    ];

    pub fn from_word(word: &str) -> Option<Operator> {
        Some(match word {
            "=" | "==" | "is" => Operator::Eq,
            "!=" | "not" => Operator::Ne,
            "<" => Operator::Lt,
            "<=" => Operator::Le,
            ">" => Operator::Gt,
            ">=" => Operator::Ge,
            "regexp" => Operator::Regexp,
            "version" => Operator::Version,
            "set_contains" | "set_contains_all" => Operator::SetContains,
            "set_contains_any" => Operator::SetContainsAny,
            "is_set" => Operator::IsSet,
            "is_not_set" => Operator::IsNotSet,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Eq => "=",
            Operator::Ne => "!=",
            Operator::Lt => "<",
            Operator::Le => "<=",
            Operator::Gt => ">",
            Operator::Ge => ">=",
            Operator::Regexp => "regexp",
            Operator::Version => "version",
            Operator::SetContains => "set_contains",
            Operator::SetContainsAny => "set_contains_any",
            Operator::IsSet => "is_set",
            Operator::IsNotSet => "is_not_set",
        }
    }

    /// Whether the operator compares against a value (`is_set` does not).
    pub fn takes_value(self) -> bool {
        !matches!(self, Operator::IsSet | Operator::IsNotSet)
    }
}

/// `target op value`, with the value compiled once (regex, semver range).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "PredicateRepr", into = "PredicateRepr")]
pub struct Predicate {
    pub target: Target,
    pub op: Operator,
    pub value: String,
    matcher: Matcher,
}

#[derive(Clone, Debug)]
enum Matcher {
    Plain,
    Regex(regex::Regex),
    Version(semver::VersionReq),
}

impl PartialEq for Predicate {
    fn eq(&self, o: &Self) -> bool {
        self.target == o.target && self.op == o.op && self.value == o.value
    }
}

#[derive(Serialize, Deserialize)]
struct PredicateRepr {
    target: Target,
    op: Operator,
    value: String,
}

impl TryFrom<PredicateRepr> for Predicate {
    type Error = String;
    fn try_from(r: PredicateRepr) -> Result<Self, String> {
        Predicate::new(r.target, r.op, r.value)
    }
}

impl From<Predicate> for PredicateRepr {
    fn from(p: Predicate) -> Self {
        PredicateRepr { target: p.target, op: p.op, value: p.value }
    }
}

impl Predicate {
    /// Compiles the value for the operator; the error says what is wrong with it.
    pub fn new(target: Target, op: Operator, value: String) -> Result<Predicate, String> {
        let matcher = match op {
            Operator::Regexp => {
                Matcher::Regex(regex::Regex::new(&value).map_err(|e| format!("invalid regular expression: {e}"))?)
            }
            Operator::Version => Matcher::Version(
                semver::VersionReq::parse(&value)
                    .map_err(|e| format!("invalid version range `{value}`: {e}; write e.g. \">= 5.15, < 7\""))?,
            ),
            _ => Matcher::Plain,
        };
        Ok(Predicate { target, op, value, matcher })
    }

    /// Whether a node whose target resolves to `actual` satisfies this.
    pub fn matches(&self, actual: Option<&str>) -> bool {
        match (self.op, actual) {
            (Operator::IsSet, a) => a.is_some(),
            (Operator::IsNotSet, a) => a.is_none(),
            // A node without the attribute is not equal to any value.
            (Operator::Ne, None) => true,
            (_, None) => false,
            (Operator::Eq, Some(a)) => a == self.value,
            (Operator::Ne, Some(a)) => a != self.value,
            (Operator::Lt | Operator::Le | Operator::Gt | Operator::Ge, Some(a)) => {
                let ord = match (a.parse::<f64>(), self.value.parse::<f64>()) {
                    (Ok(x), Ok(y)) => x.partial_cmp(&y),
                    _ => Some(a.cmp(self.value.as_str())),
                };
                let Some(ord) = ord else { return false };
                match self.op {
                    Operator::Lt => ord.is_lt(),
                    Operator::Le => ord.is_le(),
                    Operator::Gt => ord.is_gt(),
                    _ => ord.is_ge(),
                }
            }
            (Operator::Regexp, Some(a)) => match &self.matcher {
                Matcher::Regex(r) => r.is_match(a),
                _ => false,
            },
            (Operator::Version, Some(a)) => match (&self.matcher, lenient_version(a)) {
                (Matcher::Version(req), Some(v)) => req.matches(&v),
                _ => false,
            },
            (Operator::SetContains, Some(a)) => {
                let have: Vec<&str> = a.split(',').map(str::trim).collect();
                self.value.split(',').map(str::trim).all(|w| have.contains(&w))
            }
            (Operator::SetContainsAny, Some(a)) => {
                let have: Vec<&str> = a.split(',').map(str::trim).collect();
                self.value.split(',').map(str::trim).any(|w| have.contains(&w))
            }
        }
    }
}

impl fmt::Display for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op.takes_value() {
            write!(f, "{} {} {}", self.target, self.op.as_str(), self.value)
        } else {
            write!(f, "{} {}", self.target, self.op.as_str())
        }
    }
}

/// Reads `6.1`, `6.1.0-13-amd64` or `v1.2.3` as a semantic version. Only
/// the numeric core counts: a kernel's `-13-amd64` is a build, not a
/// pre-release that would fall outside every range.
fn lenient_version(text: &str) -> Option<semver::Version> {
    let t = text.trim().trim_start_matches('v');
    let core: String = t.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let mut parts: Vec<&str> = core.split('.').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return None;
    }
    parts.truncate(3);
    while parts.len() < 3 {
        parts.push("0");
    }
    semver::Version::parse(&parts.join(".")).ok()
}

/// A soft preference: nodes matching `predicate` gain (or lose, if negative)
/// `weight` in -100..=100.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Affinity {
    pub predicate: Predicate,
    pub weight: i8,
}

/// Spread a group's instances over the values of an attribute, evenly or
/// by the percentages given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub target: Target,
    /// 1..=100, relative to other ranking terms.
    pub weight: u8,
    pub targets: Vec<SpreadTarget>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpreadTarget {
    pub value: String,
    pub percent: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(op: Operator, value: &str) -> Predicate {
        Predicate::new(Target::Attr("x".into()), op, value.into()).unwrap()
    }

    /// The failures of an instance that keeps failing `ran_ms` after each
    /// replacement could start, from t = 0: each reschedule's wait.
    fn waits(policy: &ReschedulePolicy, failures: usize, ran_ms: u64) -> Vec<Option<u64>> {
        let (mut history, mut t, mut out) = (Vec::new(), 0u64, Vec::new());
        for _ in 0..failures {
            let next = policy.next(&history, t);
            out.push(next.map(|e| e.delay_ms));
            let Some(e) = next else { break };
            history.push(e);
            policy.keep(&mut history);
            t += e.delay_ms + ran_ms;
        }
        out
    }

    #[test]
    fn reschedule_delays_grow_by_their_function_up_to_the_ceiling() {
        let mut p = ReschedulePolicy::for_type(JobType::Service);
        let s = |ms: u64| Some(ms * 1_000);
        assert_eq!(waits(&p, 9, 0), [s(30), s(60), s(120), s(240), s(480), s(960), s(1920), s(3600), s(3600)]);
        p.delay_function = DelayFunction::Fibonacci;
        p.delay_ms = 10_000;
        p.max_delay_ms = 100_000;
        assert_eq!(waits(&p, 9, 0), [s(10), s(10), s(20), s(30), s(50), s(80), s(100), s(100), s(100)]);
        p.delay_function = DelayFunction::Constant;
        assert_eq!(waits(&p, 3, 0), [s(10), s(10), s(10)]);
        // Far past the 64-bit terms: still the ceiling, at once.
        assert_eq!(p.delay_at(u32::MAX), 10_000);
        p.delay_function = DelayFunction::Fibonacci;
        assert_eq!(p.delay_at(u32::MAX), 100_000);
    }

    #[test]
    fn an_instance_that_ran_longer_than_the_ceiling_starts_the_series_again() {
        let p = ReschedulePolicy::for_type(JobType::Service);
        let hour = 3_600_000;
        assert_eq!(waits(&p, 3, hour + 1), [Some(30_000), Some(30_000), Some(30_000)]);
        assert_eq!(waits(&p, 3, hour), [Some(30_000), Some(60_000), Some(120_000)]);
    }

    #[test]
    fn limited_reschedules_count_only_within_their_interval() {
        // Batch: once a day.
        let p = ReschedulePolicy::for_type(JobType::Batch);
        assert_eq!(waits(&p, 3, 60_000), [Some(5_000), None]);
        // A day later, once more.
        let day = 86_400_000;
        assert_eq!(waits(&p, 3, day), [Some(5_000), Some(5_000), Some(5_000)]);
        let history = [RescheduleEvent { failed_at_ms: 1_000, delay_ms: 5_000, step: 0 }];
        assert_eq!(p.next(&history, 1_000 + day - 1), None);
        assert!(p.next(&history, 1_000 + day).is_some());
        // Zero attempts: never placed again.
        let none = ReschedulePolicy { attempts: 0, ..p };
        assert_eq!(waits(&none, 1, 0), [None]);
        // What is kept is what the limit reads.
        let mut three = (0..10).map(|i| RescheduleEvent { failed_at_ms: i * 1_000, delay_ms: 0, step: 0 }).collect();
        ReschedulePolicy { attempts: 3, interval_ms: 2_500, ..p }.keep(&mut three);
        assert_eq!(three.iter().map(|e| e.failed_at_ms).collect::<Vec<_>>(), [7_000, 8_000, 9_000]);
        let mut last: Vec<_> = three.clone();
        ReschedulePolicy::for_type(JobType::Service).keep(&mut last);
        assert_eq!(last.len(), 1);
    }

    #[test]
    fn comparison_is_numeric_when_both_sides_are_numbers() {
        assert!(pred(Operator::Gt, "9").matches(Some("10")));
        assert!(!pred(Operator::Gt, "9").matches(Some("8.5")));
        assert!(pred(Operator::Lt, "b").matches(Some("a")));
    }

    #[test]
    fn version_reads_kernel_strings() {
        let p = pred(Operator::Version, ">= 5.15, < 7");
        assert!(p.matches(Some("6.1.0-13-amd64")));
        assert!(p.matches(Some("6.1")));
        assert!(!p.matches(Some("5.10")));
        assert!(!p.matches(Some("banana")));
    }

    #[test]
    fn sets_and_presence() {
        assert!(pred(Operator::SetContains, "eu, gdpr").matches(Some("eu,gdpr,de")));
        assert!(!pred(Operator::SetContains, "eu,us").matches(Some("eu,gdpr")));
        assert!(pred(Operator::SetContainsAny, "eu,us").matches(Some("eu,gdpr")));
        assert!(pred(Operator::IsSet, "").matches(Some("")));
        assert!(pred(Operator::IsNotSet, "").matches(None));
        assert!(pred(Operator::Ne, "a").matches(None));
        assert!(!pred(Operator::Eq, "a").matches(None));
    }

    #[test]
    fn targets_parse_with_hints() {
        assert_eq!(Target::parse("${attr.arch}"), Ok(Target::Attr("arch".into())));
        assert_eq!(Target::parse("${node.environment}"), Ok(Target::Environment));
        assert!(Target::parse("${node.enviroment}").unwrap_err().contains("${node.environment}"));
        assert!(Target::parse("${atr.arch}").unwrap_err().contains("${attr.arch}"));
        assert!(Target::parse("arch").is_err());
    }

    #[test]
    fn predicate_survives_a_round_trip_with_its_matcher() {
        let p = pred(Operator::Regexp, "^x86");
        let text = toml::to_string(&p).unwrap();
        let back: Predicate = toml::from_str(&text).unwrap();
        assert_eq!(back, p);
        assert!(back.matches(Some("x86_64")));
        assert!(!back.matches(Some("arm64")));
    }
}
