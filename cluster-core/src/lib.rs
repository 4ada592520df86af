//! One Hanse cluster: the data model, the files people write (job specs,
//! node fleets), the cluster state and the scheduler, and the server that
//! replicates and serves them.
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
//! - [`transport`]: typed requests over QUIC with mutual TLS, or in memory.
//! - [`raft`]: the Raft driver and its redb storage.
//! - [`server`]: the cluster server: evaluations, workers, heartbeats, HTTP API.
//! - [`agent`]: the node agent and its task drivers (`exec`, `mock`).
//!
//! The model, specs, state, commands and scheduler open no socket, read no
//! clock and draw no unseeded randomness; `transport`, `raft`, `server`
//! and `agent` are the IO around them.

pub mod acl;
pub mod agent;
pub mod codec;
pub mod command;
pub mod diag;
pub mod ids;
pub mod model;
pub mod private;
pub mod raft;
pub mod resources;
pub mod scheduler;
pub mod server;
pub mod spec;
pub mod state;
pub mod transport;
