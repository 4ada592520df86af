//! The cluster data model.

pub mod alloc;
pub mod deployment;
pub mod eval;
pub mod job;
pub mod node;
pub mod plan;

pub use alloc::{AllocStatus, Allocation, DesiredStatus};
pub use eval::{EvalStatus, EvalTrigger, Evaluation};
pub use job::{
    Affinity, DelegateMode, Driver, FederationSpec, Job, JobType, Objective, Operator, Predicate, Spread, SpreadTarget,
    Target, Task, TaskGroup,
};
pub use node::{Environment, ExecutionModel, Node, NodeStatus};
pub use plan::{Placement, Plan, Reason, Stop, StopReason, Unplaced};
