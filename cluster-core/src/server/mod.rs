//! A cluster server: Raft-replicated state, and on the leader the
//! evaluation broker, scheduler workers, plan applier and node heartbeat
//! timers; on every server the HTTP API ([`http`]).
//!
//! ```text
//! HTTP ─► write ─(follower: forward over QUIC)─► leader: propose ─► Raft log ─► apply ─► evaluations
//!                                                                                        │
//!         broker (next batch, one eval per job in flight) ◄──────────────────────────────┘
//!           └─► worker: clone state, schedule each eval, apply to the clone ─► ApplyPlans (one entry)
//!                 └─► state machine re-checks every placement; refused ones leave the eval pending
//! ```

pub mod access;
pub mod agents;
pub mod api;
pub mod audit;
pub mod broker;
pub mod client;
pub mod heartbeat;
pub mod http;
pub mod local;
pub mod metrics;
pub mod rpc;
pub mod sim;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use crate::agent::rpc::{AgentService, AgentServiceReply, LogChunk};
use crate::command::{Command, Effect, PLAN_BATCH_MAX};
use crate::ids::{EvalId, NodeId};
use crate::model::node::NodeStatus;
use crate::model::plan::Plan;
use crate::raft::node::{ProposeError, RaftConfig, RaftHandle, RaftId, start as start_raft};
use crate::raft::storage::{RedbStorage, StoreError};
use crate::scheduler::{SchedulerConfig, schedule};
use crate::state::{ClusterState, PlanOutcome};
use crate::transport::{Handler, Transport};
use api::ApiError;
use broker::{Broker, Work};
use heartbeat::Heartbeats;
use metrics::Metrics;
use rpc::{RaftOver, ServerHandler, ServerReply, ServerRpc, Write, WriteReply};

/// How long a write waits for a leader (an election, a forward that
/// failed) before it is refused.
pub const LEADER_WAIT: Duration = Duration::from_secs(8);
/// How often the leader looks for nodes past their heartbeat deadline.
const HEARTBEAT_SWEEP: Duration = Duration::from_millis(100);
/// The HTTP status a server answers a write with when it is not the
/// leader: the forwarder tries again with the leader it learns of.
const NOT_LEADER: u16 = 421;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub cluster: String,
    pub name: String,
    /// Scheduler workers on the leader.
    pub workers: usize,
    pub heartbeat_ttl: Duration,
    /// Added to the TTL before a silent node is marked down.
    pub heartbeat_grace: Duration,
    pub scheduler: SchedulerConfig,
    /// Host names the HTTP API answers to besides IP addresses and
    /// `localhost` (requests naming any other host are refused).
    pub http_hosts: Vec<String>,
    pub acl: AclOptions,
    /// Whether the API serves HTTPS with the server's certificate (the
    /// default); plain HTTP only when a config says so.
    pub http_tls: bool,
    /// Where the audit trail is written (see [`audit`]); in memory when
    /// `None`.
    pub audit_dir: Option<std::path::PathBuf>,
    /// How often the leader collects garbage (`None`: never on its own),
    /// and what it collects (see [`crate::state::GcPolicy`]).
    pub gc_interval: Option<Duration>,
    pub gc_policy: crate::state::GcPolicy,
}

/// The leader proposes a collection this often by default.
pub const GC_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// How a server checks the API's callers (see [`crate::acl`]).
#[derive(Clone)]
pub struct AclOptions {
    /// On unless a config turns it off (then every caller may do
    /// everything, and the server warns at start).
    pub enabled: bool,
    /// A secret the cluster's first management token takes (Consul's
    /// `initial_management`): the first leader bootstraps with it, and
    /// until then it is honoured as that token. `None`: an operator runs
    /// `hanse acl bootstrap`.
    pub initial_management: Option<String>,
}

impl std::fmt::Debug for AclOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclOptions")
            .field("enabled", &self.enabled)
            .field("initial_management", &self.initial_management.as_ref().map(|_| "(secret)"))
            .finish()
    }
}

impl Default for AclOptions {
    fn default() -> Self {
        AclOptions { enabled: true, initial_management: None }
    }
}

impl ServerOptions {
    pub fn new(cluster: &str, name: &str) -> ServerOptions {
        ServerOptions {
            cluster: cluster.into(),
            name: name.into(),
            workers: default_workers(),
            heartbeat_ttl: Duration::from_secs(10),
            heartbeat_grace: Duration::from_secs(10),
            scheduler: SchedulerConfig::default(),
            http_hosts: Vec::new(),
            acl: AclOptions::default(),
            http_tls: true,
            audit_dir: None,
            gc_interval: Some(GC_INTERVAL),
            gc_policy: crate::state::GcPolicy::DEFAULT,
        }
    }
}

/// Half the cores, at least one. Planning takes turns (see
/// `Inner::planning`), so a second worker only overlaps planning with
/// committing; on 2 cores one worker commits more per second
/// (`cargo bench --bench cluster`: 34,700 against 24,300 allocations/s),
/// because each extra batch costs a copy of the state.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// A worker's plans, by evaluation, with the evaluation's placed count
/// when it was planned.
type Batch = Arc<Vec<(EvalId, Plan, u32)>>;
/// Dry runs served at once; more wait their turn.
pub const DRY_RUNS_MAX: usize = 2;
/// Jobs up to this many instances are planned under the state's read lock
/// instead of on a copy.
const SMALL_JOB: u64 = 1_000;

/// What every part of a server shares.
pub struct Inner {
    pub id: RaftId,
    /// Every write received here, allowed or denied (see [`audit`]).
    pub audit: audit::AuditLog,
    pub options: ServerOptions,
    pub raft: RaftHandle,
    transport: Arc<dyn Transport<ServerRpc>>,
    pub metrics: Metrics,
    heartbeats: Mutex<Heartbeats>,
    /// The term whose leader duties run here, once this leader has applied
    /// its log (0: none). Heartbeats are answered only then: a new leader
    /// whose log still holds a node's marking down, not yet applied, must
    /// not renew that node's lease (found in review).
    duties_term: AtomicU64,
    started: Instant,
    /// Plans made but not yet committed, by batch: a worker planning a new
    /// batch counts them as taken, so concurrent workers rarely pick the
    /// same capacity (the state machine's re-check makes that safe, not
    /// cheap).
    uncommitted: Mutex<BTreeMap<u64, Batch>>,
    next_batch: AtomicU64,
    /// Held while a worker plans: planning is pipelined with committing
    /// rather than run side by side, since two workers planning at once
    /// on the same state pick the same best nodes and one loses.
    planning: Mutex<()>,
    /// Dry runs (`job plan`) at once: each holds a copy of the state and
    /// one plan's worth of placements, so memory stays bounded however
    /// many arrive (security review, row 17).
    pub(crate) dry_runs: Arc<Semaphore>,
    /// Calls agents (for logs); set by whoever wires the server's QUIC.
    agents: std::sync::OnceLock<Arc<dyn Transport<AgentService>>>,
    /// Delegation leases to hand agents with every heartbeat answer; set
    /// by the federation (see [`Inner::set_grant_source`]).
    grants: std::sync::OnceLock<GrantSource>,
    /// Whether `prefer-remote` jobs wait for the federation to offer them
    /// to peers ([`SchedulerConfig::defer_prefer_remote`]); set by the
    /// federation while its policy has a peer to delegate to.
    defer_prefer_remote: std::sync::atomic::AtomicBool,
}

/// How long a heartbeat waits for a new leader to apply its log.
const DUTIES_WAIT: Duration = Duration::from_secs(3);

/// What the leader grants agents for delegated at-most-once work: per
/// delegation id, milliseconds of lease left from now.
pub type GrantSource = Arc<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

/// A running server. Dropping it does not stop it; call [`Server::stop`].
pub struct Server {
    pub inner: Arc<Inner>,
    handler: Arc<ServerHandler>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts Raft on `store` and the leadership watcher. Serve
    /// [`Server::handler`] on the server's QUIC endpoint, and
    /// [`http::router`] on its HTTP address.
    pub fn start(
        config: RaftConfig,
        store: RedbStorage,
        transport: Arc<dyn Transport<ServerRpc>>,
        options: ServerOptions,
        logger: &slog::Logger,
    ) -> Result<Server, StoreError> {
        let id = config.id;
        let audit = audit::AuditLog::open(options.audit_dir.as_deref())
            .map_err(|e| StoreError::Db(format!("cannot open the audit trail in {:?}: {e}", options.audit_dir)))?;
        let (raft, raft_task) = start_raft(config, store, Arc::new(RaftOver(transport.clone())), logger)?;
        let heartbeats =
            Heartbeats::new(options.heartbeat_ttl.as_millis() as u64, options.heartbeat_grace.as_millis() as u64);
        let inner = Arc::new(Inner {
            id,
            audit,
            options,
            raft: raft.clone(),
            transport,
            metrics: Metrics::default(),
            heartbeats: Mutex::new(heartbeats),
            duties_term: AtomicU64::new(0),
            started: Instant::now(),
            uncommitted: Mutex::default(),
            next_batch: AtomicU64::new(0),
            planning: Mutex::new(()),
            dry_runs: Arc::new(Semaphore::new(DRY_RUNS_MAX)),
            agents: std::sync::OnceLock::new(),
            grants: std::sync::OnceLock::new(),
            defer_prefer_remote: std::sync::atomic::AtomicBool::new(false),
        });
        let handler = Arc::new(ServerHandler {
            raft,
            server: Arc::downgrade(&inner),
            cluster: inner.options.cluster.clone(),
            peers: std::sync::RwLock::new(None),
        });
        let tasks = vec![raft_task, tokio::spawn(leadership(inner.clone()))];
        Ok(Server { inner, handler, tasks })
    }

    pub fn handler(&self) -> Arc<dyn Handler<ServerRpc>> {
        self.handler.clone()
    }

    /// Hands other clusters' messages to `handler` (the federation).
    pub fn set_peer_handler(&self, handler: Arc<dyn rpc::PeerHandler>) {
        *self.handler.peers.write().expect("peer handler lock") = Some(handler);
    }

    /// How this server reaches agents (`hanse alloc logs`).
    pub fn set_agent_transport(&self, transport: Arc<dyn Transport<AgentService>>) {
        let _ = self.inner.agents.set(transport);
    }

    pub fn raft(&self) -> &RaftHandle {
        &self.inner.raft
    }

    /// Stops Raft and every task of this server.
    pub async fn stop(self) {
        self.inner.raft.stop().await;
        for t in &self.tasks[1..] {
            t.abort();
        }
        let mut tasks = self.tasks;
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.remove(0)).await;
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn propose_error(e: ProposeError) -> ApiError {
    match e {
        ProposeError::NotLeader(_) => ApiError::new(NOT_LEADER, "this server is not the leader"),
        ProposeError::Timeout => ApiError::unavailable(
            "the change was not committed in time (is a majority of servers up?); \
             retrying is safe, the same request changes nothing twice",
        ),
        ProposeError::ChangePending => {
            ApiError::new(409, "another membership change is in progress; retry when it is done")
        }
        ProposeError::Stopped => ApiError::unavailable("the server is shutting down"),
        ProposeError::TooLarge(n) => ApiError::new(413, format!("the change is {n} bytes, over the log's entry limit")),
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Sends a message to a server of cluster `cluster` at `to`, only if
    /// the certificate of the connection it goes over names a server of
    /// that cluster; otherwise nothing is sent.
    pub async fn call_cluster(
        &self,
        cluster: &str,
        to: std::net::SocketAddr,
        message: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let check = |who: Option<&crate::transport::Identity>| match who {
            Some(id) if id.cluster == cluster && id.role == crate::transport::Role::Server => Ok(()),
            Some(id) => Err(format!("{to} presents the certificate of {id}, not of a server of {cluster}")),
            None => Err(format!("cannot tell who answers at {to}")),
        };
        match self.transport.call_checked(to, ServerRpc::Peer(message), &check).await {
            Ok(ServerReply::Peer(reply)) => Ok(reply),
            Ok(ServerReply::Refused(why)) => Err(why),
            Ok(_) => Err("an answer of another kind".into()),
            Err(crate::transport::TransportError::Refused(_, why)) => Err(why),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends a message to another cluster's server (at its QUIC address).
    pub async fn call_peer(&self, to: std::net::SocketAddr, message: Vec<u8>) -> Result<Vec<u8>, String> {
        match self.transport.call(to, ServerRpc::Peer(message)).await {
            Ok(ServerReply::Peer(reply)) => Ok(reply),
            Ok(ServerReply::Refused(why)) => Err(why),
            Ok(_) => Err("an answer of another kind".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends `request` to the agent of `node`; `serves` says what it is
    /// asked for, in the error when the node has no agent to ask.
    async fn call_agent(
        &self,
        node: &NodeId,
        request: AgentService,
        serves: &str,
    ) -> Result<AgentServiceReply, ApiError> {
        let address = self
            .raft
            .read(|s| s.node_idx(node).and_then(|i| s.node(i).agent_address.clone()))
            .ok_or_else(|| ApiError::not_found(format!("node {node} has no agent that {serves}")))?;
        let address: std::net::SocketAddr = address
            .parse()
            .map_err(|_| ApiError::new(502, format!("node {node} registered a bad agent address `{address}`")))?;
        let transport = self.agents.get().ok_or_else(|| ApiError::unavailable("this server cannot reach agents"))?;
        let reply = transport.call(address, request).await;
        reply.map_err(|e| ApiError::new(502, format!("the agent of node {node} at {address}: {e}")))
    }

    /// Asks the agent of `node` for part of a task's log.
    pub async fn agent_logs(&self, node: &NodeId, request: AgentService) -> Result<LogChunk, ApiError> {
        match self.call_agent(node, request, "serves logs").await? {
            AgentServiceReply::Logs(chunk) => Ok(chunk),
            AgentServiceReply::Error(m) => Err(ApiError::not_found(m)),
            AgentServiceReply::Done(_) => Err(ApiError::new(502, format!("the agent of node {node} sent no logs"))),
        }
    }

    /// Asks the agent of `node` to restart or signal an allocation's tasks
    /// ([`AgentService::Restart`], [`AgentService::Signal`]): what it did.
    pub async fn agent_op(&self, node: &NodeId, request: AgentService) -> Result<String, ApiError> {
        match self.call_agent(node, request, "restarts or signals tasks").await? {
            AgentServiceReply::Done(done) => Ok(done),
            // Nothing of that name: 404; anything else it refused: 409.
            AgentServiceReply::Error(m) if m.starts_with("no task") => Err(ApiError::not_found(m)),
            AgentServiceReply::Error(m) => Err(ApiError::new(409, m)),
            AgentServiceReply::Logs(_) => Err(ApiError::new(502, format!("the agent of node {node} answered logs"))),
        }
    }

    /// Sets where heartbeat answers take their delegation grants from (the
    /// federation's target side); without one they grant nothing, and
    /// delegated at-most-once work does not start.
    pub fn set_grant_source(&self, source: GrantSource) {
        let _ = self.grants.set(source);
    }

    /// Whether `prefer-remote` jobs are offered to peers before they are
    /// placed here (the federation turns it on while it may delegate).
    pub fn set_prefer_peers(&self, on: bool) {
        self.defer_prefer_remote.store(on, Ordering::Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.raft.status().leader == Some(self.id)
    }

    /// Reads the state: linearizably (ReadIndex) unless `stale` is asked for.
    pub async fn read<T>(&self, stale: bool, f: impl FnOnce(&ClusterState) -> T) -> Result<T, ApiError> {
        if stale {
            return Ok(self.raft.read(f));
        }
        self.raft.read_fresh(f).await.map_err(|e| match e {
            ProposeError::Stopped => ApiError::unavailable("the server is shutting down"),
            _ => ApiError::no_leader(),
        })
    }

    /// Carries out a write: here on the leader, or forwarded to it. Waits
    /// up to [`LEADER_WAIT`] through elections and failed forwards.
    pub async fn write(&self, w: Write) -> Result<WriteReply, ApiError> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut status = self.raft.watch_status();
        loop {
            let s = status.borrow_and_update().clone();
            let result = match s.leader {
                Some(l) if l == self.id => self.execute(w.clone()).await,
                Some(l) => match s.peers.get(&l) {
                    Some(addr) => {
                        self.metrics.writes_forwarded.inc();
                        // A leader that dies mid-call answers nothing until the
                        // call times out; a new leader ends the wait early (the
                        // write is tried again there: every write is idempotent).
                        let mut changes = self.raft.watch_status();
                        let new_leader = async move {
                            while changes.changed().await.is_ok() {
                                if changes.borrow().leader != Some(l) {
                                    return;
                                }
                            }
                            std::future::pending::<()>().await
                        };
                        tokio::select! {
                            r = self.transport.call(*addr, ServerRpc::Forward(w.clone())) => match r {
                                Ok(ServerReply::Forward(r)) => r,
                                Ok(ServerReply::Refused(why)) => Err(ApiError::new(403, why)),
                            Ok(_) => Err(ApiError::new(500, "the leader answered out of turn")),
                                Err(e) => Err(ApiError::new(NOT_LEADER, format!("cannot reach the leader at {addr}: {e}"))),
                            },
                            () = new_leader => Err(ApiError::new(NOT_LEADER, format!("leader {l} was replaced"))),
                        }
                    }
                    None => Err(ApiError::new(NOT_LEADER, format!("the leader {l} has no known address"))),
                },
                None => Err(ApiError::new(NOT_LEADER, "no leader")),
            };
            match result {
                Err(e) if e.status == NOT_LEADER => {
                    if Instant::now() >= deadline {
                        let mut err = ApiError::no_leader();
                        err.message = format!("{} (last: {})", err.message, e.message);
                        return Err(err);
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(200), status.changed()).await;
                }
                other => return other,
            }
        }
    }

    /// Carries out a write on this server, which must be the leader.
    pub async fn execute(&self, w: Write) -> Result<WriteReply, ApiError> {
        let propose = |c: Command| async { self.raft.propose(c).await.map_err(propose_error) };
        let refused = |m: String| {
            if m.starts_with("unknown") { ApiError::not_found(m) } else { ApiError::bad_request(m) }
        };
        let effect = match w {
            Write::Heartbeat(nodes) => return self.heartbeat(nodes).await,
            Write::RegisterNodes(nodes) => {
                let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
                // Proposed together, so the driver commits them in one entry.
                let mut proposals = JoinSet::new();
                for node in nodes {
                    let raft = self.raft.clone();
                    proposals.spawn(async move { raft.propose(Command::UpsertNode(node)).await });
                }
                while let Some(r) = proposals.join_next().await {
                    match r {
                        Ok(Ok(Effect::Refused(m))) => return Err(ApiError::bad_request(m)),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(propose_error(e)),
                        Err(e) => return Err(ApiError::new(500, e.to_string())),
                    }
                }
                return self.heartbeat(ids).await;
            }
            Write::AddPeer { id, addr } => {
                self.raft.add_peer(id, addr).await.map_err(propose_error)?;
                return Ok(WriteReply::Done);
            }
            Write::RemovePeer(id) => {
                self.raft.remove_peer(id).await.map_err(propose_error)?;
                return Ok(WriteReply::Done);
            }
            Write::TransferLeader(id) => {
                if !self.is_leader() {
                    return Err(ApiError::new(NOT_LEADER, "not the leader"));
                }
                self.raft.transfer_leader(id).await.map_err(propose_error)?;
                return Ok(WriteReply::Done);
            }
            Write::SubmitJob { job, spec: None } => propose(Command::RegisterJob(job)).await?,
            Write::SubmitJob { job, spec: Some(spec) } => propose(Command::RegisterSubmitted { job, spec }).await?,
            Write::StopJob(job) => propose(Command::StopJob(job)).await?,
            Write::ScaleJob { job, namespace, group, count } => {
                propose(Command::ScaleJob { job, namespace, group, count }).await?
            }
            Write::StopAlloc(id) => propose(Command::StopAlloc(id)).await?,
            Write::PromoteDeployment { job, namespace, group } => {
                propose(Command::PromoteDeployment { job, namespace, group }).await?
            }
            Write::FailDeployment { job, namespace } => propose(Command::FailDeployment { job, namespace }).await?,
            Write::RevertJob { job, namespace, version } => {
                propose(Command::RevertJob { job, namespace, version }).await?
            }
            Write::NodeEligibility { node, eligible } => propose(Command::NodeEligibility { node, eligible }).await?,
            Write::DrainNode { node, drain, deadline } => {
                let deadline_ms = deadline.map(|d| unix_ms() + d.as_millis() as u64);
                propose(Command::DrainNode { node, drain, deadline_ms }).await?
            }
            Write::AllocStatus(reports) => propose(Command::AllocReports { now_ms: unix_ms(), reports }).await?,
            Write::Record { holder, record } => propose(Command::Record { holder, record }).await?,
            Write::Swap { holder, expect, record } => {
                match propose(Command::Guarded { holder, expect, record, then: Vec::new() }).await? {
                    Effect::Refused(m) => return Err(ApiError::new(409, m)),
                    e => e,
                }
            }
            Write::Acl(c) => propose(Command::Acl(c)).await?,
            Write::Collect => {
                propose(Command::Gc {
                    now_ms: unix_ms(),
                    policy: crate::state::GcPolicy::NOW,
                    rules: crate::state::GC_RULES,
                })
                .await?
            }
            Write::RestoreChunk { id, seq, bytes } => propose(Command::RestoreChunk { id, seq, bytes }).await?,
            Write::Restore { id, chunks } => propose(Command::Restore { id, chunks }).await?,
        };
        match effect {
            Effect::JobRegistered { version, eval } => Ok(WriteReply::Job { version, eval }),
            Effect::Evals(evals) => Ok(WriteReply::Evals(evals)),
            Effect::Refused(m) => Err(refused(m)),
            Effect::Collected(c) => Ok(WriteReply::Collected(c)),
            Effect::Restored(c) => Ok(WriteReply::Restored(c)),
            _ => Ok(WriteReply::Done),
        }
    }

    /// Heartbeats, on the leader: restarts each node's timer, brings a node
    /// that was down back up, and names the nodes it does not know.
    async fn heartbeat(&self, nodes: Vec<NodeId>) -> Result<WriteReply, ApiError> {
        if !self.is_leader() {
            return Err(ApiError::new(NOT_LEADER, "not the leader"));
        }
        // A new leader answers once its log is applied (moments after its
        // election): the caller waits that long rather than fail.
        let deadline = Instant::now() + DUTIES_WAIT;
        while self.duties_term.load(Ordering::SeqCst) != self.raft.status().term {
            if !self.is_leader() {
                return Err(ApiError::new(NOT_LEADER, "not the leader"));
            }
            if Instant::now() >= deadline {
                return Err(ApiError::new(503, "the leader is still applying its log; heartbeat again in a moment"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (known, unknown): (Vec<_>, Vec<_>) =
            self.raft.read(|s| nodes.into_iter().partition(|n| s.node_idx(n).is_some()));
        let now = self.now_ms();
        let (ttl_ms, known) = {
            let mut h = self.heartbeats.lock().expect("heartbeats lock");
            // A node being marked down is not answered: the answer would
            // renew its agent's lease while its work is being replaced.
            let (refused, known): (Vec<_>, Vec<_>) = known.into_iter().partition(|n| h.marking_down(n));
            if !refused.is_empty() && known.is_empty() && unknown.is_empty() {
                return Err(ApiError::new(
                    503,
                    format!(
                        "node {} missed its heartbeats and is being marked down; heartbeat again in a moment",
                        refused[0]
                    ),
                ));
            }
            for n in &known {
                h.beat(n, now);
            }
            (h.ttl_ms, known)
        };
        // Nodes that were down come back up, proposed together (one entry);
        // a failure leaves the node down until its next heartbeat.
        let revived: Vec<(NodeId, bool)> = self.raft.read(|s| {
            known
                .iter()
                .filter_map(|n| s.node_idx(n).map(|i| s.node(i)))
                .filter(|n| n.status == NodeStatus::Down)
                .map(|n| (n.id.clone(), !n.draining))
                .collect()
        });
        let mut proposals = JoinSet::new();
        for (node, eligible) in revived {
            let raft = self.raft.clone();
            proposals.spawn(async move {
                let c = Command::SetNodeStatus { node: node.clone(), status: NodeStatus::Ready, eligible };
                if let Err(e) = raft.propose(c).await {
                    tracing::warn!(%node, error = %e, "could not bring the node back up");
                }
            });
        }
        while proposals.join_next().await.is_some() {}
        self.metrics.heartbeats.inc_by(known.len() as u64);
        let grants = self.grants.get().map(|g| g()).unwrap_or_default();
        Ok(WriteReply::Heartbeat { ttl_ms, unknown, grants })
    }
}

/// Splits plans into runs of at most [`PLAN_BATCH_MAX`] whose `size`s add
/// up to at most `budget` (a bigger plan goes alone).
fn entries<T>(plans: &[T], budget: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, p) in plans.iter().enumerate() {
        let size = size(p);
        if i > start && (sum + size > budget || i - start == PLAN_BATCH_MAX) {
            out.push(&plans[start..i]);
            (start, sum) = (i, 0);
        }
        sum += size;
    }
    if start < plans.len() {
        out.push(&plans[start..]);
    }
    out
}

/// Runs the leader's duties while this server leads, and stops them when
/// it does not.
async fn leadership(inner: Arc<Inner>) {
    let mut status = inner.raft.watch_status();
    // The duties and the term they run for: a leader elected again in a
    // newer term (the watch may coalesce the step down) starts afresh.
    let mut duties: Option<(u64, JoinSet<()>)> = None;
    loop {
        let (leading, term) = {
            let s = status.borrow_and_update();
            (s.leader == Some(inner.id), s.term)
        };
        if leading && duties.as_ref().is_none_or(|(t, _)| *t != term) {
            tracing::info!(server = inner.id, term, "leading: broker, workers and heartbeat timers start");
            // The old term's duties end first (dropping the set aborts them).
            drop(duties.take());
            inner.duties_term.store(0, Ordering::SeqCst);
            inner.heartbeats.lock().expect("heartbeats lock").clear();
            let mut set = JoinSet::new();
            let ready = inner.clone();
            set.spawn(async move {
                // Not before this leader has applied everything committed
                // before its term: plans made from an older state could
                // repeat work that is committed but not yet applied here,
                // and a heartbeat answered could renew a node whose
                // marking down is in the log but not yet applied.
                while ready.raft.read_fresh(|_| ()).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                ready.duties_term.store(term, Ordering::SeqCst);
                tokio::join!(
                    dispatch(ready.clone()),
                    watch_heartbeats(ready.clone()),
                    bootstrap_acl(&ready),
                    collect_garbage(&ready),
                    enforce_drain_deadlines(&ready)
                );
            });
            duties = Some((term, set));
        } else if !leading && duties.is_some() {
            tracing::info!(server = inner.id, "no longer leading");
            inner.duties_term.store(0, Ordering::SeqCst);
            duties = None; // dropping the set aborts its tasks
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Proposes a collection every `gc_interval` while this server leads.
async fn collect_garbage(inner: &Inner) {
    let Some(every) = inner.options.gc_interval else { return };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let command = Command::Gc { now_ms: unix_ms(), policy: inner.options.gc_policy, rules: crate::state::GC_RULES };
        match inner.raft.propose(command).await {
            Ok(Effect::Collected(c)) if c != crate::state::GcCounts::default() => {
                tracing::info!(jobs = c.jobs, allocs = c.allocs, evals = c.evals, nodes = c.nodes, "garbage collected");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("garbage collection not committed: {e:?}"),
        }
    }
}

/// Once a drain's deadline passes, stops what still runs on the node
/// (`Command::DrainDeadline`): until then, a drained allocation stops only
/// once its replacement can run elsewhere. Checked every second.
async fn enforce_drain_deadlines(inner: &Inner) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = unix_ms();
        let due: Vec<NodeId> = inner.raft.read(|s| {
            (s.nodes().iter())
                .filter(|n| n.draining && n.drain_deadline_ms.is_some_and(|d| d <= now))
                .filter(|n| s.allocs_on_node(&n.id).any(|a| a.is_live()))
                .map(|n| n.id.clone())
                .collect()
        });
        for node in due {
            match inner.raft.propose(Command::DrainDeadline(node.clone())).await {
                Ok(Effect::Evals(e)) if !e.is_empty() => {
                    tracing::info!(%node, "the drain's deadline passed: what still ran there stops");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%node, error = %e, "could not stop a drained node's work at its deadline"),
            }
        }
    }
}

/// Bootstraps the ACLs with the configured initial management secret,
/// once per cluster (a later leader finds it done).
async fn bootstrap_acl(inner: &Inner) {
    let Some(secret) = inner.options.acl.initial_management.clone() else { return };
    if inner.raft.read(|s| s.acl().bootstrapped()) {
        return;
    }
    let token = crate::acl::Token::new(&secret, "initial management".into(), Vec::new(), true, unix_ms());
    // Until it commits, the configured secret is honoured as this token
    // and `POST /v1/acl/bootstrap` is refused: nobody else can take it.
    loop {
        match inner.raft.propose(Command::Acl(crate::acl::AclCommand::Bootstrap(token.clone()))).await {
            Ok(Effect::Done) => {
                tracing::info!(cluster = %inner.options.cluster, "ACLs bootstrapped with the initial management token");
                return;
            }
            Ok(other) => return tracing::debug!(?other, "ACL bootstrap not needed"),
            Err(e) => tracing::warn!(error = %e, "could not bootstrap the ACLs yet; trying again"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Marks nodes down when their heartbeat deadline passes. Nodes the
/// state holds as ready but this leader never heard from get a full TTL
/// and grace from the first sweep that sees them.
async fn watch_heartbeats(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(HEARTBEAT_SWEEP);
    let mut sweeps = 0u64;
    loop {
        tick.tick().await;
        let now = inner.now_ms();
        if sweeps % 10 == 0 {
            let ready: Vec<NodeId> = inner
                .raft
                .read(|s| s.nodes().iter().filter(|n| n.status == NodeStatus::Ready).map(|n| n.id.clone()).collect());
            let mut h = inner.heartbeats.lock().expect("heartbeats lock");
            for n in &ready {
                h.beat_if_untimed(n, now);
            }
        }
        sweeps += 1;
        let expired: Vec<(NodeId, u64)> = {
            let mut h = inner.heartbeats.lock().expect("heartbeats lock");
            let gone = h.expired(now);
            gone.into_iter().map(|n| (n.clone(), h.silent_ms(&n, now))).collect()
        };
        let mut proposals = JoinSet::new();
        for (node, silent_ms) in expired {
            let ready = inner.raft.read(|s| s.node_idx(&node).map(|i| s.node(i).status == NodeStatus::Ready));
            if ready != Some(true) {
                inner.heartbeats.lock().expect("heartbeats lock").marked_down(&node);
                continue;
            }
            let inner = inner.clone();
            proposals.spawn(async move {
                let (ttl_ms, grace_ms) =
                    (inner.options.heartbeat_ttl.as_millis() as u64, inner.options.heartbeat_grace.as_millis() as u64);
                tracing::warn!(
                    %node,
                    silent_ms,
                    ttl_ms,
                    grace_ms,
                    "node missed its heartbeats: nothing heard for {silent_ms} ms (TTL + grace: {} ms); marking it down",
                    ttl_ms + grace_ms
                );
                let c = Command::SetNodeStatus { node: node.clone(), status: NodeStatus::Down, eligible: true };
                match inner.raft.propose(c).await {
                    Ok(_) => {
                        inner.heartbeats.lock().expect("heartbeats lock").marked_down(&node);
                        inner.metrics.nodes_down.inc();
                    }
                    Err(e) => {
                        // The entry may still commit (a timeout): its
                        // heartbeats stay refused, and it is proposed again.
                        tracing::warn!(%node, error = %e, "could not mark the node down; will retry");
                        inner.heartbeats.lock().expect("heartbeats lock").retry_down_at(&node, inner.now_ms() + 500);
                    }
                };
            });
        }
        while proposals.join_next().await.is_some() {}
    }
}

/// Hands batches of open evaluations to at most `workers` workers at once.
async fn dispatch(inner: Arc<Inner>) {
    let broker = Arc::new(Mutex::new(Broker::default()));
    let permits = Arc::new(Semaphore::new(inner.options.workers.max(1)));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(64);
    let mut status = inner.raft.watch_status();
    loop {
        while let Ok(permit) = permits.clone().try_acquire_owned() {
            let batch = inner.raft.read(|s| broker.lock().expect("broker lock").next_batch(s, unix_ms()));
            if batch.is_empty() {
                break;
            }
            let (inner, broker, done) = (inner.clone(), broker.clone(), done_tx.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                work(&inner, &batch).await;
                inner.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
                broker.lock().expect("broker lock").done(&batch);
                drop(permit);
                let _ = done.send(()).await;
            });
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            _ = done_rx.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Plans a batch and commits the plans in as few Raft entries as fit.
///
/// Each plan is applied to a private copy of the state before the next
/// evaluation is planned, so plans of one batch never compete for the same
/// capacity; plans of concurrent workers may, and the state machine's
/// re-check refuses whatever no longer fits.
async fn work(inner: &Arc<Inner>, batch: &[Work]) {
    let planner = inner.clone();
    let items = batch.to_vec();
    let planned = tokio::task::spawn_blocking(move || {
        let _turn = planner.planning.lock().unwrap_or_else(PoisonError::into_inner);
        let config = &planner.options.scheduler;
        fn planned(w: &Work, plan: Plan, placed: u32) -> (&Work, Plan, u32) {
            (w, plan, placed)
        }
        let plan_one = |state: &ClusterState, w: &Work| {
            let t = Instant::now();
            let defer_prefer_remote = planner.defer_prefer_remote.load(Ordering::Relaxed);
            let now_ms = Some(unix_ms());
            let config =
                SchedulerConfig { seed: config.seed ^ w.eval.0, defer_prefer_remote, now_ms, ..config.clone() };
            let plan = schedule(state, &w.job, &config);
            planner.metrics.scheduler_seconds.observe(t.elapsed().as_secs_f64());
            (plan, state.eval(w.eval).map_or(0, |e| e.placed))
        };
        let others: Vec<Batch> =
            planner.uncommitted.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        let mut plans = Vec::with_capacity(items.len());
        match items.as_slice() {
            // One small job and nothing in flight: planned under the read
            // lock, which a small plan holds for well under a millisecond.
            [w] if others.is_empty() && w.job.instance_count() <= SMALL_JOB => {
                let (plan, placed) = planner.raft.read(|s| plan_one(s, w));
                plans.push(planned(w, plan, placed));
            }
            _ => {
                let mut scratch = planner.raft.read(ClusterState::clone);
                // Uncommitted plans of other workers count as taken, unless
                // the copy already holds them (their evaluation's placed
                // count moved, or it closed).
                for (eval, plan, placed) in others.iter().flat_map(|b| b.iter()) {
                    let pending = scratch.eval(*eval).is_some_and(|e| e.status.is_open() && e.placed == *placed);
                    if pending {
                        scratch.apply_plan(plan);
                    }
                }
                for w in &items {
                    let (plan, placed) = plan_one(&scratch, w);
                    scratch.apply_plan(&plan);
                    plans.push(planned(w, plan, placed));
                }
            }
        }
        planner.metrics.evals_processed.inc_by(plans.len() as u64);
        let plans: Vec<(EvalId, Plan, u32)> = plans
            .into_iter()
            .filter(|(w, p, _)| {
                !(w.retry_blocked
                    && p.placements.is_empty()
                    && p.stops.is_empty()
                    && p.wait_until_ms == w.wait_until_ms)
            })
            .map(|(w, p, placed)| (w.eval, p, placed))
            .collect();
        // Registered before the planning turn ends, so the next worker's
        // turn sees them.
        let plans = Arc::new(plans);
        let id = planner.next_batch.fetch_add(1, Ordering::Relaxed);
        planner.uncommitted.lock().unwrap_or_else(PoisonError::into_inner).insert(id, plans.clone());
        (id, plans)
    })
    .await;
    let (id, plans) = match planned {
        Ok(p) => p,
        Err(e) => {
            // A scheduler bug: say so, and do not hand the same batch out
            // again at once.
            tracing::error!(error = %e, evals = ?batch.iter().map(|w| w.eval).collect::<Vec<_>>(), "planning failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
    };
    let to_commit: Vec<(EvalId, Plan)> = plans.iter().map(|(e, p, _)| (*e, p.clone())).collect();
    commit(inner, to_commit).await;
    inner.uncommitted.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
}

/// What one entry of plans may take, leaving room for the command around
/// them under the log's limit.
const ENTRY_PLANS_BYTES: usize = crate::raft::node::ENTRY_BYTES_MAX - (64 << 10);

/// Commits plans in entries of at most [`PLAN_BATCH_MAX`] plans and
/// [`ENTRY_PLANS_BYTES`] encoded, so no entry outgrows the log's limit. A
/// plan too big alone (its reasons name huge constraints or
/// jurisdictions: its placements and stops are capped) goes without its
/// reasons, counts kept; an evaluation never waits on an entry that can
/// never commit (security review, row 16).
async fn commit(inner: &Arc<Inner>, mut plans: Vec<(EvalId, Plan)>) {
    let size = |p: &(EvalId, Plan)| crate::codec::encode(p).len();
    for p in &mut plans {
        if size(p) > ENTRY_PLANS_BYTES {
            tracing::warn!(job = %p.1.job, "a plan over the entry limit is committed without its reasons");
            p.1.unplaced.iter_mut().for_each(|u| u.reasons.clear());
        }
    }
    for chunk in entries(&plans, ENTRY_PLANS_BYTES, size) {
        match inner.raft.propose(Command::ApplyPlans(chunk.to_vec())).await {
            Ok(Effect::PlansApplied(outcomes)) => {
                for o in outcomes {
                    match o {
                        PlanOutcome::Applied(a) => {
                            inner.metrics.placements.inc_by(a.placed.len() as u64);
                            inner.metrics.placements_refused.inc_by(a.refused.len() as u64);
                            if a.refused.is_empty() {
                                inner.metrics.plans_applied.inc();
                            } else {
                                inner.metrics.plans_rejected.inc();
                            }
                        }
                        PlanOutcome::Superseded => {
                            inner.metrics.plans_rejected.inc();
                        }
                    }
                }
            }
            Ok(_) => {}
            // The evaluations stay open in the log; this leader (or the
            // next) hands them out again.
            Err(e) => tracing::debug!(error = %e, "plans not committed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;

    fn plan(changes: usize) -> (EvalId, Plan) {
        let stops = (0..changes)
            .map(|i| crate::model::plan::Stop {
                alloc: crate::ids::AllocId(i as u64),
                reason: crate::model::plan::StopReason::ScaledDown,
            })
            .collect();
        let plan = Plan {
            job: JobId::new("j"),
            job_version: 1,
            placements: Vec::new(),
            stops,
            unplaced: Vec::new(),
            nodes_evaluated: 0,
            deferred: 0,
            wait_until_ms: None,
            made_at_ms: None,
        };
        (EvalId(0), plan)
    }

    #[test]
    fn entries_keep_within_the_budget_and_the_plan_count() {
        let changes = |p: &(EvalId, Plan)| p.1.stops.len();
        let plans: Vec<_> = [4, 4, 3, 9, 1, 1].into_iter().map(plan).collect();
        let sizes: Vec<usize> = entries(&plans, 8, changes).iter().map(|c| c.len()).collect();
        // 4+4 | 3 | 9 (alone, over the budget) | 1+1
        assert_eq!(sizes, [2, 1, 1, 2]);
        let many: Vec<_> = (0..PLAN_BATCH_MAX + 1).map(|_| plan(0)).collect();
        assert_eq!(entries(&many, 8, changes).iter().map(|c| c.len()).collect::<Vec<_>>(), [PLAN_BATCH_MAX, 1]);
        assert!(entries(&[] as &[(EvalId, Plan)], 8, changes).is_empty());
    }
}
