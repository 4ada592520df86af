//! The Raft driver: one thread per server owns the [`Core`] (the
//! `RawNode`, the durable log and the cluster state) and is the only writer
//! of that state.
//!
//! Each turn of the loop: tick on time, step peers' messages, propose the
//! commands waiting (many commands in one entry), then let the core handle
//! `Ready` (see [`crate::raft::core`]), publish the status, and answer the
//! proposers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::{Command, Effect};
use crate::raft::core::{Core, Reply};
use crate::raft::storage::{RedbStorage, StoreError};
use crate::state::ClusterState;
use crate::transport::{Handler, Identity, Role, Rpc, Transport};

pub type RaftId = u64;

/// Commands proposed in one log entry at most.
pub const PROPOSAL_BATCH_MAX: usize = 1_024;
/// The most bytes of commands in one log entry: an append of one entry
/// always fits a transport frame.
pub const ENTRY_BYTES_MAX: usize = 4 << 20;
/// Inputs queued for the driver before callers wait.
pub const INPUT_QUEUE_MAX: usize = 4_096;
/// How long a proposal may wait for its commit.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// raft-rs drops a ReadIndex request silently when there is no leader, or
/// the leader has not committed in its term yet: each attempt waits this
/// long, and a read tries `READ_ATTEMPTS` times.
pub const READ_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
pub const READ_ATTEMPTS: usize = 6;
/// Reads waiting for their read index at once; the oldest is dropped past it.
pub const READS_PENDING_MAX: usize = 4_096;

/// A Raft message between servers: raft-rs's protobuf bytes.
#[derive(Serialize, Deserialize)]
pub struct RaftMessage(pub Vec<u8>);

impl Rpc for RaftMessage {
    type Reply = ();
    fn allowed(&self) -> &'static [Role] {
        &[Role::Server]
    }
}

#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub id: RaftId,
    /// Every voter's transport address, this server's included.
    pub peers: BTreeMap<RaftId, SocketAddr>,
    pub tick: Duration,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub compact_every: u64,
    /// Election timeouts are drawn from `[min, max)` ticks; 0 means raft's
    /// default (`election_tick` to twice that). raft-rs draws them from the
    /// thread's random source: the simulator sets `max = min + 1` to keep a
    /// run a function of its seed.
    pub min_election_tick: usize,
    pub max_election_tick: usize,
    /// A server joining an existing cluster: it does not bootstrap a
    /// configuration of its own, and learns it from the leader.
    pub join: bool,
}

impl RaftConfig {
    pub fn new(id: RaftId, peers: BTreeMap<RaftId, SocketAddr>) -> RaftConfig {
        RaftConfig {
            id,
            peers,
            tick: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 2,
            compact_every: 10_000,
            min_election_tick: 0,
            max_election_tick: 0,
            join: false,
        }
    }

    pub(crate) fn raft(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
            min_election_tick: self.min_election_tick,
            max_election_tick: self.max_election_tick,
            applied,
            // The default, 0, sends one entry per append: batching is the
            // point of batching proposals.
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            // A partitioned server rejoining must not depose a healthy
            // leader (pre-vote), and a leader cut off from its quorum must
            // step down (check quorum) so clients find the real one.
            pre_vote: true,
            check_quorum: true,
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader; the leader is {0:?}")]
    NotLeader(Option<RaftId>),
    #[error("not committed in time")]
    Timeout,
    #[error("another membership change is still in progress")]
    ChangePending,
    #[error("the server is shutting down")]
    Stopped,
    #[error("a command of {0} bytes is over the entry limit of {ENTRY_BYTES_MAX}")]
    TooLarge(usize),
}

/// What the driver reports after every turn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub leader: Option<RaftId>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// Snapshots received from a leader and installed since start.
    pub snapshots_installed: u64,
    /// Every voter's transport address as this server knows it.
    pub peers: Arc<BTreeMap<RaftId, SocketAddr>>,
}

enum Input {
    Message(Message),
    Propose(Command, Reply),
    ReadIndex(oneshot::Sender<u64>),
    ConfChange(ConfChangeV2, oneshot::Sender<Result<ConfState, ProposeError>>),
    TransferLeader(RaftId),
    SnapshotSent(RaftId, bool),
    Stop,
}

/// The handle callers and the RPC handler hold.
#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Input>,
    status: watch::Receiver<RaftStatus>,
    state: Arc<RwLock<ClusterState>>,
}

impl RaftHandle {
    /// Proposes a command and waits until it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<Effect, ProposeError> {
        self.ask(|tx| Input::Propose(command, tx)).await
    }

    /// Sends the driver an input carrying a reply channel, and waits for
    /// the reply up to [`PROPOSE_TIMEOUT`].
    async fn ask<T>(
        &self,
        input: impl FnOnce(oneshot::Sender<Result<T, ProposeError>>) -> Input,
    ) -> Result<T, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(input(tx)).await.map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// A linearizable read: waits until this server has applied everything
    /// the leader had committed when the read began (ReadIndex), then reads.
    /// Works on followers too; retries while there is no leader.
    pub async fn read_fresh<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> Result<T, ProposeError> {
        for _ in 0..READ_ATTEMPTS {
            let (tx, rx) = oneshot::channel();
            self.tx.send(Input::ReadIndex(tx)).await.map_err(|_| ProposeError::Stopped)?;
            match tokio::time::timeout(READ_ATTEMPT_TIMEOUT, rx).await {
                Ok(Ok(_index)) => return Ok(self.read(f)),
                Ok(Err(_)) => return Err(ProposeError::Stopped),
                Err(_) => continue,
            }
        }
        Err(ProposeError::Timeout)
    }

    /// Adds a voter at `addr` (ConfChangeV2, committed through the log);
    /// returns the new configuration once applied here. Call on the leader.
    pub async fn add_peer(&self, id: RaftId, addr: SocketAddr) -> Result<ConfState, ProposeError> {
        self.conf_change(id, ConfChangeType::AddNode, Some(addr)).await
    }

    pub async fn remove_peer(&self, id: RaftId) -> Result<ConfState, ProposeError> {
        self.conf_change(id, ConfChangeType::RemoveNode, None).await
    }

    async fn conf_change(
        &self,
        id: RaftId,
        kind: ConfChangeType,
        addr: Option<SocketAddr>,
    ) -> Result<ConfState, ProposeError> {
        let mut single = ConfChangeSingle { node_id: id, ..Default::default() };
        single.set_change_type(kind);
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        // Every server learns the new member's address from the entry.
        cc.set_context(addr.map(|a| a.to_string().into_bytes()).unwrap_or_default().into());
        self.ask(|tx| Input::ConfChange(cc, tx)).await
    }

    /// Asks the leader to hand leadership to `to` (a caught-up voter).
    pub async fn transfer_leader(&self, to: RaftId) -> Result<(), ProposeError> {
        self.tx.send(Input::TransferLeader(to)).await.map_err(|_| ProposeError::Stopped)
    }

    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// Reads the applied state (a snapshot of it under a short lock).
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.read().expect("state lock"))
    }

    pub async fn stop(&self) {
        let _ = self.tx.send(Input::Stop).await;
    }
}

#[async_trait::async_trait]
impl Handler<RaftMessage> for RaftHandle {
    async fn handle(&self, _from: Identity, request: RaftMessage) {
        if let Ok(m) = Message::parse_from_bytes(&request.0) {
            // A full queue drops the message; Raft retransmits.
            let _ = self.tx.try_send(Input::Message(m));
        }
    }
}

/// Starts a server's Raft driver on `store`, bootstrapping a fresh log with
/// the configured voters.
pub fn start(
    config: RaftConfig,
    store: RedbStorage,
    transport: Arc<dyn Transport<RaftMessage>>,
    logger: &slog::Logger,
) -> Result<(RaftHandle, tokio::task::JoinHandle<()>), StoreError> {
    let mut core = Core::open(config, store, logger)?;
    let (tx, rx) = mpsc::channel(INPUT_QUEUE_MAX);
    let (status_tx, status_rx) = watch::channel(core.status());
    let handle = RaftHandle { tx: tx.clone(), status: status_rx, state: core.state() };
    // The driver has a thread of its own: every `Ready` ends in an fsync,
    // which must not stall the runtime that serves the API and the
    // transport (or, in one process, the other servers' drivers). Sends to
    // peers still run on the caller's runtime.
    let runtime = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    // Aborting (or dropping) the returned task stops the driver at its next
    // turn, without a clean shutdown: what a crash looks like to the peers.
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = Driver { core, transport, status: status_tx, inputs: tx, runtime: None, killed: killed.clone() };
    let thread = std::thread::Builder::new().name(format!("raft-{}", driver.core.config.id)).spawn(move || {
        let local = tokio::runtime::Builder::new_current_thread().enable_all().build();
        match local {
            Ok(local) => local.block_on(driver.run(rx, runtime)),
            Err(e) => tracing::error!(error = %e, "cannot start the raft driver's runtime"),
        }
        let _ = done_tx.send(());
    });
    if let Err(e) = thread {
        return Err(StoreError::Db(format!("cannot start the raft driver's thread: {e}")));
    }
    struct Kill(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Kill {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let kill = Kill(killed);
    Ok((
        handle,
        tokio::spawn(async move {
            let _kill = kill;
            let _ = done_rx.await;
        }),
    ))
}

/// The IO around a [`Core`]: its input queue, tick timer, transport and
/// status channel.
struct Driver {
    core: Core<RedbStorage>,
    transport: Arc<dyn Transport<RaftMessage>>,
    status: watch::Sender<RaftStatus>,
    /// For send tasks to report snapshot delivery.
    inputs: mpsc::Sender<Input>,
    /// Where sends to peers run (the caller's runtime).
    runtime: Option<tokio::runtime::Handle>,
    /// Set when the driver's task is aborted: stop now, as in a crash.
    killed: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, runtime: tokio::runtime::Handle) {
        self.runtime = Some(runtime);
        let mut tick = tokio::time::interval(self.core.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.killed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let mut proposals: Vec<(Command, Reply)> = Vec::new();
            tokio::select! {
                _ = tick.tick() => { self.core.tick(); }
                input = rx.recv() => {
                    let Some(input) = input else { return };
                    if !self.take(input, &mut proposals) { return }
                    // Drain what else is queued: one turn, one Ready.
                    while proposals.len() < PROPOSAL_BATCH_MAX {
                        match rx.try_recv() {
                            Ok(input) => if !self.take(input, &mut proposals) { return },
                            Err(_) => break,
                        }
                    }
                }
            }
            self.core.propose(proposals);
            let (transport, inputs, runtime) = (&self.transport, &self.inputs, &self.runtime);
            let mut send = |peers: &_, messages: Vec<Message>| send(peers, transport, inputs, runtime, messages);
            if let Err(e) = self.core.handle_ready(&mut send) {
                tracing::error!(error = %e, "raft storage failed; this server stops");
                return;
            }
            let status = self.core.status();
            self.status.send_if_modified(|old| {
                let changed = *old != status;
                *old = status;
                changed
            });
            self.core.answer_proposers();
        }
    }

    /// Steps or queues one input; false means stop.
    fn take(&mut self, input: Input, proposals: &mut Vec<(Command, Reply)>) -> bool {
        match input {
            Input::Message(m) => self.core.step(m),
            Input::Propose(c, reply) => proposals.push((c, reply)),
            Input::ReadIndex(reply) => self.core.read_index(reply),
            Input::ConfChange(cc, reply) => self.core.conf_change(cc, reply),
            Input::TransferLeader(to) => self.core.transfer_leader(to),
            Input::SnapshotSent(to, ok) => self.core.report_snapshot(to, ok),
            Input::Stop => return false,
        }
        true
    }
}

/// Sends raft's messages to their peers, each in a task of `runtime`; a
/// snapshot's delivery is reported back through `inputs`.
fn send(
    peers: &BTreeMap<RaftId, SocketAddr>,
    transport: &Arc<dyn Transport<RaftMessage>>,
    inputs: &mpsc::Sender<Input>,
    runtime: &Option<tokio::runtime::Handle>,
    messages: Vec<Message>,
) {
    for m in messages {
        let Some(&addr) = peers.get(&m.to) else { continue };
        let is_snapshot = m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
        let to = m.to;
        let Ok(bytes) = m.write_to_bytes() else { continue };
        let transport = transport.clone();
        let inputs = inputs.clone();
        let runtime = runtime.clone().unwrap_or_else(tokio::runtime::Handle::current);
        runtime.spawn(async move {
            let ok = transport.call(addr, RaftMessage(bytes)).await.is_ok();
            if is_snapshot {
                let _ = inputs.send(Input::SnapshotSent(to, ok)).await;
            }
        });
    }
}
