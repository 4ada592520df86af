//! Plans: what the scheduler decided for one evaluation.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{AllocId, JobId, NodeId, NodeIdx};
use crate::resources::{Dimension, GpuDevices, Resources};

/// The scheduler's output for one evaluation. Nothing in it has happened
/// yet: the plan applier checks it against the latest state and commits what
/// still fits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub job: JobId,
    pub job_version: u64,
    pub placements: Vec<Placement>,
    pub stops: Vec<Stop>,
    pub unplaced: Vec<Unplaced>,
    /// Candidate nodes checked for fit, a measure of the work done.
    pub nodes_evaluated: u64,
    /// Placements and stops left for later parts: more were needed than
    /// one plan carries (`SchedulerConfig::max_changes_per_plan`). While
    /// any are left the evaluation stays pending and the next round plans
    /// the next part; 0 for a whole plan.
    pub deferred: u64,
    /// Failed instances are held back until then (Unix ms), their
    /// reschedule delay not yet over: the evaluation stays pending and is
    /// planned again at that time ([`crate::model::job::ReschedulePolicy`]).
    pub wait_until_ms: Option<u64>,
    /// When (Unix ms, by the planner's clock) it was made, if the planner
    /// had one: a system job's rolling update records it as the start of
    /// the set of nodes it updates (see `UpdateStrategy::stagger_ms`).
    pub made_at_ms: Option<u64>,
}

impl Plan {
    pub fn unplaced_count(&self) -> u64 {
        self.unplaced.iter().map(|u| u64::from(u.count)).sum()
    }

    /// Whether it is one part of more (see [`Plan::deferred`]).
    pub fn is_partial(&self) -> bool {
        self.deferred > 0
    }

    pub fn is_complete(&self) -> bool {
        self.unplaced.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub group: Arc<str>,
    pub index: u32,
    pub node: NodeId,
    /// Where `node` was in the state the plan was made against; the applier
    /// re-checks that it is still the same node.
    pub node_idx: NodeIdx,
    pub resources: Resources,
    pub gpus: Option<GpuDevices>,
    /// The winning node's normalised score, in -1..=1.
    pub score: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop {
    pub alloc: AllocId,
    pub reason: StopReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    JobStopped,
    /// The group's count went down.
    ScaledDown,
    /// The job's spec changed; a new instance replaces it.
    Updated,
    /// The instance was lost with its node and is replaced.
    NodeLost,
    /// Its node is draining; a new instance starts elsewhere.
    Drained,
    /// A system job's node no longer meets the job's constraints (its
    /// attributes changed, or the job's did).
    NodeUnfit,
}

/// Instances of a group the scheduler could not place, with why: each
/// reason with the number of nodes it ruled out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unplaced {
    pub group: Arc<str>,
    pub count: u32,
    /// Most frequent first.
    pub reasons: Vec<(Reason, u32)>,
}

impl Unplaced {
    /// "memory exhausted on 812 nodes; constraint ${attr.arch} = arm64 filtered 40 nodes"
    pub fn explain(&self) -> String {
        if self.reasons.is_empty() {
            return "no nodes registered".into();
        }
        self.reasons.iter().map(|(r, n)| r.describe(*n)).collect::<Vec<_>>().join("; ")
    }
}

/// Why a node could not take an instance. Externally tagged (the serde
/// default): plans travel through the codec, whose bincode cannot read
/// adjacently tagged enums.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Down, or draining.
    NotReady,
    /// A hard constraint, as written (`${attr.arch} = arm64`).
    Constraint(String),
    /// The task's driver is not on the node.
    Driver(String),
    /// The node's jurisdictions are not among those the job allows.
    Jurisdiction(String),
    /// The node has no GPUs of the model (or count) asked for, even idle.
    NoGpu(String),
    /// Not enough of a resource left.
    Exhausted(Dimension),
    /// The node already runs an instance of a `distinct_hosts` group.
    DistinctHosts,
    /// The applier refused a placement of an instance that is already
    /// live (a plan made from a state behind an earlier plan).
    AlreadyPlaced,
    /// Held back for peer clusters first (`delegate = "prefer-remote"`);
    /// counted in instances, not nodes.
    OfferedToPeers,
}

impl Reason {
    pub fn describe(&self, nodes: u32) -> String {
        let n = if nodes == 1 { "1 node".to_string() } else { format!("{nodes} nodes") };
        match self {
            Reason::NotReady => format!("{n} down or draining"),
            Reason::Constraint(c) => format!("constraint {c} filtered {n}"),
            Reason::Driver(d) => format!("driver {d} missing on {n}"),
            Reason::Jurisdiction(allowed) => format!("jurisdictions [{allowed}] filtered {n}"),
            Reason::NoGpu(m) => format!("no {m} GPUs on {n}"),
            Reason::Exhausted(d) => format!("{d} exhausted on {n}"),
            Reason::DistinctHosts => format!("distinct_hosts filtered {n}"),
            Reason::AlreadyPlaced => format!("already placed ({n})"),
            Reason::OfferedToPeers => format!("{nodes} offered to peer clusters first (prefer-remote)"),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotReady => f.write_str("node down or draining"),
            Reason::Constraint(c) => write!(f, "constraint {c}"),
            Reason::Driver(d) => write!(f, "driver {d} missing"),
            Reason::Jurisdiction(a) => write!(f, "jurisdictions [{a}]"),
            Reason::NoGpu(m) => write!(f, "no {m} GPUs"),
            Reason::Exhausted(d) => write!(f, "{d} exhausted"),
            Reason::DistinctHosts => f.write_str("distinct_hosts"),
            Reason::AlreadyPlaced => f.write_str("already placed"),
            Reason::OfferedToPeers => f.write_str("offered to peer clusters first"),
        }
    }
}
