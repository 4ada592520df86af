//! Raft replication of a cluster's state (tikv raft-rs): the core that
//! steps raft and applies its log (`core`), the server's driver around it
//! (`node`), and the log stores (`storage`).

pub mod core;
pub mod log;
pub mod node;
pub mod storage;
