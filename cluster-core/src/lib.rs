//! One Hanse cluster, without IO: the data model, the files people write
//! (job specs, node fleets), the cluster state and the scheduler.
//!
//! # Layout
//!
//! - [`codec`]: the one wire and disk encoding, with a version byte.
//! - [`ids`]: typed identifiers (`NodeId`, `JobId`, `AllocId`, `NodeIdx`).
//! - [`resources`]: quantities in every dimension and the units they are written in.
//! - [`model`]: nodes, jobs, allocations, evaluations, plans.
//! - [`diag`]: diagnostics with file, line, column and hint.
//! - [`spec`]: the job spec and fleet file parsers, which report every problem at once.
//! - [`state`]: the cluster state the scheduler reads and plans are applied to.
//! - [`command`]: the Raft log's commands and how the state machine applies them.
//! - [`scheduler`]: `schedule(state, job, config) -> Plan`.
//!
//! Nothing here opens a socket, reads a clock or draws unseeded randomness.

pub mod codec;
pub mod command;
pub mod diag;
pub mod ids;
pub mod model;
pub mod raft;
pub mod resources;
pub mod scheduler;
pub mod server;
pub mod spec;
pub mod state;
pub mod transport;
