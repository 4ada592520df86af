//! Nodes: the machines agents register, with everything the scheduler may
//! filter or rank on.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::model::job::Target;
use crate::resources::{GpuDevices, Resources};

/// Where a node runs; a hard constraint or affinity can name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Cloud,
    Edge,
    Onprem,
}

/// How workloads execute on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionModel {
    Container,
    Serverless,
    Process,
    Baremetal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Heartbeating; may receive work if eligible.
    Ready,
    /// Missed its heartbeat TTL and grace; its allocations are lost.
    Down,
}

macro_rules! keyword_enum {
    ($ty:ident { $($variant:ident = $word:literal),* $(,)? }) => {
        impl $ty {
            pub const WORDS: &'static [&'static str] = &[$($word),*];

            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $word),* }
            }

            pub fn from_word(word: &str) -> Option<Self> {
                match word { $($word => Some($ty::$variant),)* _ => None }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use keyword_enum;

keyword_enum!(Environment { Cloud = "cloud", Edge = "edge", Onprem = "onprem" });
keyword_enum!(ExecutionModel {
    Container = "container",
    Serverless = "serverless",
    Process = "process",
    Baremetal = "baremetal",
});
keyword_enum!(NodeStatus { Ready = "ready", Down = "down" });

/// A machine in a cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    /// Operator-chosen class (`gpu-a100`, `edge-arm`); nodes of a class are alike.
    pub class: Arc<str>,
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub environment: Environment,
    pub execution_model: ExecutionModel,
    /// Fingerprinted and operator attributes: `arch`, `os`, `kernel`, ...
    pub attributes: BTreeMap<String, String>,
    /// Free-form operator metadata, `${meta.KEY}` in constraints.
    pub meta: BTreeMap<String, String>,
    /// Task drivers this node's agent runs (`exec`, `mock`).
    pub drivers: Vec<Arc<str>>,
    /// Jurisdictions whose rules the node's location satisfies (`eu`, `gdpr`).
    pub jurisdictions: Vec<Arc<str>>,
    /// Data sets held locally, for data-locality ranking.
    pub datasets: Vec<Arc<str>>,
    pub capacity: Resources,
    pub gpus: Vec<GpuDevices>,
    pub cost_per_hour: f64,
    /// 0 is nearest to the users this cluster serves; larger is farther.
    pub latency_class: u8,
    pub status: NodeStatus,
    /// False while ineligible or draining: receives no new work.
    pub eligible: bool,
    /// Draining: its allocations move to other nodes.
    #[serde(default)]
    pub draining: bool,
    /// When a drain must be done (Unix milliseconds): the agent stops the
    /// node's work by then, whatever the tasks' kill timeouts.
    pub drain_deadline_ms: Option<u64>,
    /// Where the node's agent answers the servers (logs), over QUIC.
    pub agent_address: Option<String>,
}

impl Node {
    /// Whether the scheduler may place new work here.
    pub fn schedulable(&self) -> bool {
        self.status == NodeStatus::Ready && self.eligible
    }

    pub fn cores(&self) -> f64 {
        self.capacity.cpu_millis as f64 / 1000.0
    }

    /// Cost of one core for an hour on this node.
    pub fn cost_per_cpu_hour(&self) -> f64 {
        if self.capacity.cpu_millis == 0 { 0.0 } else { self.cost_per_hour / self.cores() }
    }

    /// The value a constraint target resolves to on this node. Set-valued
    /// targets resolve to a comma-separated list.
    pub fn resolve(&self, target: &Target) -> Option<Cow<'_, str>> {
        fn join(items: &[Arc<str>]) -> Option<Cow<'_, str>> {
            (!items.is_empty()).then(|| Cow::Owned(items.iter().map(|s| &**s).collect::<Vec<_>>().join(",")))
        }
        match target {
            Target::NodeId => Some(Cow::Borrowed(self.id.as_str())),
            Target::NodeClass => Some(Cow::Borrowed(&self.class)),
            Target::Region => Some(Cow::Borrowed(&self.region)),
            Target::Zone => Some(Cow::Borrowed(&self.zone)),
            Target::Environment => Some(Cow::Borrowed(self.environment.as_str())),
            Target::ExecutionModel => Some(Cow::Borrowed(self.execution_model.as_str())),
            Target::Datasets => join(&self.datasets),
            Target::Jurisdictions => join(&self.jurisdictions),
            Target::Drivers => join(&self.drivers),
            Target::GpuModels => {
                let models: Vec<Arc<str>> = self.gpus.iter().map(|g| g.model.clone()).collect();
                join(&models).map(|c| Cow::Owned(c.into_owned()))
            }
            Target::Attr(key) => self.attributes.get(key).map(|v| Cow::Borrowed(v.as_str())),
            Target::Meta(key) => self.meta.get(key).map(|v| Cow::Borrowed(v.as_str())),
        }
    }

    /// Everything that static feasibility and static ranking read, without
    /// the node's identity: nodes with equal signatures are interchangeable
    /// for every constraint that does not name `${node.id}`.
    pub fn class_signature(&self) -> ClassSignature {
        ClassSignature {
            class: self.class.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            environment: self.environment,
            execution_model: self.execution_model,
            attributes: self.attributes.clone(),
            meta: self.meta.clone(),
            drivers: self.drivers.clone(),
            jurisdictions: self.jurisdictions.clone(),
            datasets: self.datasets.clone(),
            gpu_models: self.gpus.iter().map(|g| g.model.clone()).collect(),
            latency_class: self.latency_class,
        }
    }
}

/// See [`Node::class_signature`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClassSignature {
    class: Arc<str>,
    region: Arc<str>,
    zone: Arc<str>,
    environment: Environment,
    execution_model: ExecutionModel,
    attributes: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
    drivers: Vec<Arc<str>>,
    jurisdictions: Vec<Arc<str>>,
    datasets: Vec<Arc<str>>,
    gpu_models: Vec<Arc<str>>,
    latency_class: u8,
}
