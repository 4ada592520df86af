//! What servers say to each other over the one QUIC endpoint each has:
//! Raft's messages, and writes a follower forwards to its leader.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::api::ApiError;
use crate::agent::rpc::{AgentReply, AgentRequest};
use crate::ids::{EvalId, JobId, NodeId};
use crate::model::alloc::AllocReport;
use crate::model::job::Job;
use crate::model::node::Node;
use crate::raft::node::{RaftHandle, RaftMessage};
use crate::transport::{Handler, Identity, Role, Rpc, Transport, TransportError};

/// A change to the cluster; only the leader carries one out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Write {
    /// A job and, when it came as a file, its text (kept for `job
    /// inspect`).
    SubmitJob {
        job: Job,
        spec: Option<String>,
    },
    StopJob(JobId),
    /// Nodes to register or update (an agent sends one; a simulator many).
    RegisterNodes(Vec<Node>),
    Heartbeat(Vec<NodeId>),
    DrainNode {
        node: NodeId,
        drain: bool,
        /// How long the node's work has to stop, from when the leader
        /// carries the drain out.
        deadline: Option<std::time::Duration>,
    },
    AllocStatus(Vec<AllocReport>),
    /// A record among the state's opaque records (the federation's policy).
    Record {
        holder: String,
        record: Vec<u8>,
    },
    /// Collects all garbage now (`hanse system gc`): thresholds of 0.
    Collect,
    /// A piece of an archive being restored ([`crate::command::Command::RestoreChunk`]).
    RestoreChunk {
        id: u64,
        seq: u32,
        bytes: Vec<u8>,
    },
    /// Replaces the state with restore `id`'s archive.
    Restore {
        id: u64,
        chunks: u32,
    },
    /// A compare-and-swap on a holder's record: `record` replaces it only
    /// if it is byte for byte `expect` (`None`: absent); otherwise 409, and
    /// the caller reads again. Two changes built on one read cannot both
    /// apply.
    Swap {
        holder: String,
        expect: Option<Vec<u8>>,
        record: Vec<u8>,
    },
    /// A change to the API's tokens and policies.
    Acl(crate::acl::AclCommand),
    AddPeer {
        id: u64,
        addr: SocketAddr,
    },
    RemovePeer(u64),
    TransferLeader(u64),
    /// `hanse job scale` ([`crate::command::Command::ScaleJob`]).
    ScaleJob {
        job: JobId,
        namespace: Arc<str>,
        group: Arc<str>,
        count: u32,
    },
    /// `hanse alloc stop` ([`crate::command::Command::StopAlloc`]).
    StopAlloc(crate::ids::AllocId),
    /// `hanse node eligibility` ([`crate::command::Command::NodeEligibility`]).
    NodeEligibility {
        node: NodeId,
        eligible: bool,
    },
    /// `hanse job promote` ([`crate::command::Command::PromoteDeployment`]).
    PromoteDeployment {
        job: JobId,
        namespace: Arc<str>,
        group: Option<Arc<str>>,
    },
    /// `hanse job deployment fail` ([`crate::command::Command::FailDeployment`]).
    FailDeployment {
        job: JobId,
        namespace: Arc<str>,
    },
    /// `hanse job revert` ([`crate::command::Command::RevertJob`]).
    RevertJob {
        job: JobId,
        namespace: Arc<str>,
        version: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WriteReply {
    Job {
        version: u64,
        eval: EvalId,
    },
    /// `grants`: delegation leases for the nodes' at-most-once delegated
    /// work (see [`crate::agent::lease::Grants`]).
    Heartbeat {
        ttl_ms: u64,
        unknown: Vec<NodeId>,
        grants: Vec<(String, u64)>,
    },
    Evals(Vec<EvalId>),
    Done,
    /// What `Write::Collect` dropped.
    Collected(crate::state::GcCounts),
    /// What the state holds after `Write::Restore`.
    Restored(crate::state::archive::TableCounts),
}

/// Every request between servers. `Raft` and `Forward` come only from
/// servers of the same cluster; `Peer` is another cluster's (the
/// federation's messages, opaque here).
#[derive(Serialize, Deserialize)]
pub enum ServerRpc {
    Raft(RaftMessage),
    Forward(Write),
    Peer(Vec<u8>),
    /// From an agent of this cluster, about its own node.
    Agent(AgentRequest),
}

#[derive(Serialize, Deserialize)]
pub enum ServerReply {
    /// `Err`: why the message was not taken (see [`RaftMessage`]).
    Raft(Result<(), String>),
    Forward(Result<WriteReply, ApiError>),
    Peer(Vec<u8>),
    Agent(AgentReply),
    /// The caller may not send this (a server of another cluster sending
    /// Raft messages or writes, or peer messages nobody here handles).
    Refused(String),
}

/// Answers messages from other clusters' servers (the federation).
#[async_trait]
pub trait PeerHandler: Send + Sync + 'static {
    async fn handle(&self, from: Identity, request: Vec<u8>) -> Vec<u8>;
}

impl Rpc for ServerRpc {
    type Reply = ServerReply;
    fn allowed(&self) -> &'static [Role] {
        match self {
            ServerRpc::Agent(_) => &[Role::Agent],
            _ => &[Role::Server],
        }
    }
}

/// Raft's transport, carried as [`ServerRpc::Raft`] on the server endpoint.
pub struct RaftOver(pub Arc<dyn Transport<ServerRpc>>);

#[async_trait]
impl Transport<RaftMessage> for RaftOver {
    async fn call(&self, to: SocketAddr, request: RaftMessage) -> Result<Result<(), String>, TransportError> {
        match self.0.call(to, ServerRpc::Raft(request)).await? {
            ServerReply::Raft(answer) => Ok(answer),
            ServerReply::Refused(why) => Err(TransportError::Malformed(why)),
            _ => Err(TransportError::Malformed("a reply of another kind to a raft message".into())),
        }
    }
}

/// The server endpoint's handler: Raft to the driver, forwarded writes to
/// this server (which must be the leader, or says who is).
pub struct ServerHandler {
    pub raft: RaftHandle,
    pub server: std::sync::Weak<super::Inner>,
    pub cluster: String,
    pub peers: std::sync::RwLock<Option<Arc<dyn PeerHandler>>>,
}

#[async_trait]
impl Handler<ServerRpc> for ServerHandler {
    async fn handle(&self, from: Identity, request: ServerRpc) -> ServerReply {
        let same_cluster = from.cluster == self.cluster;
        match request {
            ServerRpc::Raft(_) | ServerRpc::Forward(_) if !same_cluster => {
                tracing::warn!(from = %from, "a server of another cluster sent a Raft message or a write; refused");
                ServerReply::Refused(format!("{from} is not a server of {}", self.cluster))
            }
            ServerRpc::Peer(m) => {
                let handler = self.peers.read().expect("peer handler lock").clone();
                match handler {
                    Some(h) => ServerReply::Peer(h.handle(from, m).await),
                    None => ServerReply::Refused(format!("{} does not take part in a federation", self.cluster)),
                }
            }
            ServerRpc::Raft(m) => ServerReply::Raft(self.raft.handle(from, m).await),
            ServerRpc::Agent(r) => ServerReply::Agent(match self.server.upgrade() {
                Some(s) => super::agents::handle(&s, &from, r).await,
                None => AgentReply::Error { status: 503, message: "the server is shutting down".into() },
            }),
            ServerRpc::Forward(w) => ServerReply::Forward(match self.server.upgrade() {
                Some(s) => s.execute(w).await,
                None => Err(ApiError::unavailable("the server is shutting down")),
            }),
        }
    }
}
