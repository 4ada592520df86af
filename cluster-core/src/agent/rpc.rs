//! What agents and servers say to each other over QUIC with mutual TLS.
//!
//! Agents call servers ([`AgentRequest`], carried as
//! `ServerRpc::Agent`): register, heartbeat, pull their allocations, report
//! on them. Servers call agents ([`AgentService`]) for what only the node
//! has: task logs. An agent's certificate names its cluster and its node,
//! and a server accepts requests about that node only.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{AllocId, JobId, NodeId};
use crate::model::alloc::{AllocReport, AllocStatus, DesiredStatus};
use crate::model::job::{JobType, TaskGroup};
use crate::model::node::Node;
use crate::transport::{Role, Rpc};

/// The longest a server holds a [`AgentRequest::Sync`] waiting for a change.
pub const SYNC_WAIT_MAX_MS: u64 = 30_000;
/// The most log bytes one [`AgentService::Logs`] answer carries.
pub const LOG_CHUNK_MAX: u64 = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentRequest {
    /// Registers (or updates) the agent's node; answered like a heartbeat.
    Register(Box<Node>),
    Heartbeat(NodeId),
    /// The node's allocations, once the cluster's state is past `after`
    /// (a log index) or `wait_ms` passed: a long poll.
    Sync {
        node: NodeId,
        after: u64,
        wait_ms: u64,
    },
    Report {
        node: NodeId,
        reports: Vec<AllocReport>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentReply {
    /// Heartbeat again within `ttl_ms`; the node is down after `ttl_ms +
    /// grace_ms` of silence. `known` false: register first.
    Alive {
        ttl_ms: u64,
        grace_ms: u64,
        known: bool,
        /// Per delegation id: how many milliseconds, from when the heartbeat
        /// was sent, its at-most-once work may run (delegation v2's target
        /// lease). Empty when nothing here runs under a delegation lease.
        grants: Vec<(String, u64)>,
    },
    Sync(NodeAllocs),
    Done,
    /// The request was refused or failed; retrying may help unless the
    /// status is 4xx.
    Error {
        status: u16,
        message: String,
    },
}

/// What the cluster wants of one node.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeAllocs {
    /// The state's applied index this answer reflects.
    pub index: u64,
    /// Every allocation on the node that is not terminal. One the agent
    /// runs that is missing here was lost or replaced: stop it.
    pub allocs: Vec<AgentAlloc>,
    /// Unix milliseconds by which a drain must be done.
    pub drain_deadline_ms: Option<u64>,
}

/// One allocation as the agent needs it: what to run, and whether to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentAlloc {
    pub id: AllocId,
    pub job: JobId,
    pub job_type: JobType,
    pub index: u32,
    pub group: Arc<TaskGroup>,
    pub desired: DesiredStatus,
    pub status: AllocStatus,
    /// For at-most-once work (`on_disconnect = "stop"`) delegated here by
    /// another cluster: the delegation id whose grant it runs under (see
    /// [`crate::agent::lease::Grants`]). It starts only once granted, and
    /// stops when the grant runs out.
    pub lease: Option<String>,
}

/// Servers' requests to an agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentService {
    /// Up to `max` bytes of a task's stdout or stderr from byte `offset`
    /// (counted from the task's first output, across rotations).
    Logs { alloc: AllocId, task: String, stderr: bool, offset: u64, max: u64 },
    /// `hanse alloc restart`: stops the allocation's tasks (or only
    /// `task`) and starts them again in place, outside their restart
    /// policy.
    Restart { alloc: AllocId, task: Option<String> },
    /// `hanse alloc signal`: `signal` (1 to 64) to every process of the
    /// allocation's tasks (or only `task`).
    Signal { alloc: AllocId, task: Option<String>, signal: i32 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AgentServiceReply {
    Logs(LogChunk),
    Error(String),
    /// What a restart or a signal did.
    Done(String),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogChunk {
    pub data: Vec<u8>,
    /// Where the next read starts.
    pub next: u64,
    /// Bytes before this were rotated away.
    pub oldest: u64,
    /// The task has exited and nothing more will be written.
    pub done: bool,
}

impl Rpc for AgentService {
    type Reply = AgentServiceReply;
    fn allowed(&self) -> &'static [Role] {
        &[Role::Server]
    }
}
