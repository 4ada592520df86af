//! Hanse's deterministic simulator: a whole federation in one thread,
//! driven step by step from a seed, with every invariant checked after
//! every step.
//!
//! # What runs, and what is simulated
//!
//! The code under test is production's: the Raft core
//! ([`cluster_core::raft::core`], raft-rs itself with Hanse's `Ready`
//! handling and snapshots) on every server, `ClusterState::apply` (the state
//! machine), the evaluation broker, the scheduler, the node heartbeat
//! timers, and delegation v2's [`federation::proto`] origin and target
//! cores. What the simulator replaces are the seams:
//! - **network**: Raft messages between a cluster's servers, and messages
//!   between clusters' leaders, with loss, duplication, delay, reordering
//!   and partitions (both ways or one way);
//! - **disk**: each server's log on a `MemoryStorage` that survives its
//!   crashes;
//! - **clocks**: one monotonic clock per cluster, with its own offset and
//!   rate; nothing reads a wall clock;
//! - **agents**: simulated nodes that heartbeat, sync, run instances as
//!   processes (the ground truth the checker reads), keep a lease with
//!   their servers, and hold the delegated-work grants of
//!   `Target::lease_remaining`;
//! - **gossip**: each leader's `ClusterSummary` reaches its peers late or,
//!   during an outage, not at all; production's `select` picks targets
//!   from what arrived;
//! - **randomness**: everything is drawn from one SplitMix64 seeded per run
//!   (raft-rs's election timeouts included: fixed per server, from the
//!   seed).
//!
//! The mechanism is a sans-IO step loop (TigerBeetle's VOPR, FoundationDB's
//! simulation): with pure cores there is nothing to intercept, so no
//! runtime (madsim, turmoil) is needed, and a run is a plain function of
//! its seed.
//!
//! # Layout
//! - [`world`]: the federation and its step loop.
//! - [`check`]: the invariants, after every step.
//! - [`scenario`]: the review's breaks as scripted runs.

pub mod check;
pub mod scenario;
pub mod world;

pub use world::{Options, Plant, Report, Violation, run};
