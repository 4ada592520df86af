//! Typed identifiers.
//!
//! Names that cross a process boundary (nodes, jobs) are `Arc<str>` newtypes:
//! a plan carries a node id per placement, and cloning one must cost a counter
//! increment, not an allocation. Ids that a cluster assigns itself (allocations,
//! evaluations) are integers handed out by the state machine, so every replica
//! assigns the same ids from the same log.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(Arc::from(name.as_ref()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl From<&str> for $name {
            fn from(name: &str) -> Self {
                Self::new(name)
            }
        }
    };
}

name_id!(
    /// A machine registered by an agent, unique within its cluster.
    NodeId
);
name_id!(
    /// A job, unique within its cluster (the job's `name`).
    JobId
);
name_id!(
    /// A cluster, unique within the federation (`eu-west`).
    ClusterId
);

macro_rules! seq_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{:06}"), self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl $name {
            /// The id `text` names exactly as it is displayed
            /// (`a000042`), or `None`.
            pub fn parse(text: &str) -> Option<Self> {
                let digits = text.strip_prefix($prefix)?;
                if !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let id = $name(digits.parse().ok()?);
                (id.to_string() == text).then_some(id)
            }
        }
    };
}

seq_id!(
    /// One placed instance of a task group; assigned when a plan is applied.
    AllocId,
    "a"
);
seq_id!(
    /// One reason to (re)schedule a job.
    EvalId,
    "e"
);

/// A node's position in [`crate::state::ClusterState`]'s node table.
///
/// The scheduler works on indices, not names: at 10,000 nodes a placement
/// touches a handful of candidates and must not hash a string for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeIdx(pub u32);

impl NodeIdx {
    pub fn get(self) -> usize {
        self.0 as usize
    }
}
