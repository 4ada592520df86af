//! Hanse's deterministic simulator: a whole federation in one thread,
//! driven step by step from a seed, with every invariant checked after
//! every step.
//!
//! # What runs, and what is simulated
//!
//! The code under test is production's: `ClusterState::apply` (the state
//! machine) on every replica, the evaluation broker, the scheduler, the
//! node heartbeat timers, and delegation v2's [`federation::proto`] origin
//! and target cores. What the simulator replaces are the seams:
//! - **network**: messages between clusters' leaders, with loss,
//!   duplication, delay, reordering and partitions (both ways or one way);
//! - **Raft**: each cluster is an ordered log that its replicas apply at
//!   their own pace; a leader needs a majority of live replicas, applies
//!   the whole log before it acts, and may die between a commit and its
//!   reply. (raft-rs itself is not in the loop yet: see ARCHITECTURE.md.)
//! - **clocks**: one monotonic clock per cluster, with its own offset and
//!   rate; nothing reads a wall clock;
//! - **agents**: simulated nodes that heartbeat, sync, run instances as
//!   processes (the ground truth the checker reads), keep a lease with
//!   their servers, and hold the delegated-work grants of
//!   `Target::lease_remaining`;
//! - **randomness**: everything is drawn from one SplitMix64 seeded per run.
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
