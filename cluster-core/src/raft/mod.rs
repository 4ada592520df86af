//! Raft replication of a cluster's state (tikv raft-rs). So far: the
//! durable log storage. The driver loop that ticks, steps and handles
//! `Ready` comes next.

pub mod log;
pub mod node;
pub mod storage;
