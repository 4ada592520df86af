//! The Raft driver: one task per server owns the `RawNode`, the durable log
//! and the cluster state, and is the only writer of that state.
//!
//! Each turn of the loop: tick on time, step peers' messages, propose the
//! commands waiting (many commands in one entry), then handle `Ready` in
//! the order raft-rs documents: send messages; persist snapshot, entries
//! and hard state in one transaction; send persisted messages; apply
//! committed entries; advance; then the light ready's commit index,
//! messages and entries; `advance_apply`. Every `compact_every` applied
//! entries the state is snapshotted and the log compacted.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec;
use crate::command::{Command, Effect};
use crate::raft::storage::{Persist, RedbStorage, StoreError};
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
            join: false,
        }
    }

    fn raft(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_tick,
            heartbeat_tick: self.heartbeat_tick,
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

/// What a Raft snapshot carries: the state machine, and every voter's
/// address, so that a server restarted after compaction, or one installing
/// a snapshot, can reach members added since its config was written.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    peers: Vec<(RaftId, SocketAddr)>,
    state: Vec<u8>,
}

/// The state machine's bytes are zstd-compressed in a snapshot: they are
/// repetitive (ids, classes), and a snapshot travels as one frame.
fn pack_snapshot(peers: &BTreeMap<RaftId, SocketAddr>, state: &ClusterState) -> Vec<u8> {
    let raw = state.snapshot();
    let state = zstd::encode_all(raw.as_slice(), 1).unwrap_or(raw);
    codec::encode(&SnapshotData { peers: peers.iter().map(|(k, v)| (*k, *v)).collect(), state })
}

/// Decompresses at most `DECODE_BYTES_MAX` bytes.
fn unzstd(bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(bytes)
        .and_then(|d| d.take(codec::DECODE_BYTES_MAX as u64 + 1).read_to_end(&mut out))
        .map_err(|e| StoreError::Db(format!("snapshot: {e}")))?;
    if out.len() > codec::DECODE_BYTES_MAX {
        return Err(StoreError::Db("snapshot: over the size limit".into()));
    }
    Ok(out)
}

fn unpack_snapshot(bytes: &[u8]) -> Result<(Vec<(RaftId, SocketAddr)>, ClusterState), StoreError> {
    let bad = |e: crate::codec::CodecError| StoreError::Db(format!("snapshot: {e}"));
    match codec::decode::<SnapshotData>(bytes, codec::DECODE_BYTES_MAX) {
        Ok(data) => Ok((data.peers, ClusterState::restore(&unzstd(&data.state)?).map_err(bad)?)),
        // Written before snapshots carried addresses: the state alone.
        Err(_) => Ok((Vec::new(), ClusterState::restore(bytes).map_err(bad)?)),
    }
}

/// Where a proposer waits for its command's effect.
type Reply = oneshot::Sender<Result<Effect, ProposeError>>;

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
    let initial = raft::Storage::initial_state(&store).map_err(|e| StoreError::Db(e.to_string()))?;
    if initial.conf_state.voters.is_empty() && !config.join {
        let cs = ConfState::from((config.peers.keys().copied().collect::<Vec<_>>(), vec![]));
        store.persist(Persist { conf_state: Some(&cs), ..Default::default() })?;
    }
    // The state machine starts from the last snapshot; raft replays the
    // committed entries after it.
    let snap = raft::Storage::snapshot(&store, 0, config.id).ok();
    let mut config = config;
    let (state, applied) = match snap {
        Some(s) if !s.get_data().is_empty() => {
            let (peers, state) = unpack_snapshot(s.get_data())?;
            // The config names the servers it knows; the snapshot adds
            // those that joined later.
            for (id, addr) in peers {
                config.peers.entry(id).or_insert(addr);
            }
            (state, s.get_metadata().index)
        }
        _ => (ClusterState::new(), 0),
    };
    let raw = RawNode::new(&config.raft(applied), store, logger).map_err(|e| StoreError::Db(e.to_string()))?;
    let (tx, rx) = mpsc::channel(INPUT_QUEUE_MAX);
    let (status_tx, status_rx) = watch::channel(RaftStatus::default());
    let state = Arc::new(RwLock::new(state));
    let handle = RaftHandle { tx: tx.clone(), status: status_rx, state: state.clone() };
    let driver = Driver {
        raw,
        config,
        transport,
        state,
        status: status_tx,
        inputs: tx,
        waiting: HashMap::new(),
        waiting_term: 0,
        applied,
        since_compact: 0,
        snapshots_installed: 0,
        reads: BTreeMap::new(),
        next_read: 0,
        ready_reads: Vec::new(),
        conf_waiter: None,
        voters: Arc::default(),
        runtime: None,
        killed: Arc::default(),
    };
    // The driver has a thread of its own: every `Ready` ends in an fsync,
    // which must not stall the runtime that serves the API and the
    // transport (or, in one process, the other servers' drivers). Sends to
    // peers still run on the caller's runtime.
    let runtime = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    // Aborting (or dropping) the returned task stops the driver at its next
    // turn, without a clean shutdown: what a crash looks like to the peers.
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = Driver { killed: killed.clone(), ..driver };
    let thread = std::thread::Builder::new().name(format!("raft-{}", driver.config.id)).spawn(move || {
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

struct Driver {
    raw: RawNode<RedbStorage>,
    config: RaftConfig,
    transport: Arc<dyn Transport<RaftMessage>>,
    state: Arc<RwLock<ClusterState>>,
    status: watch::Sender<RaftStatus>,
    /// For send tasks to report snapshot delivery.
    inputs: mpsc::Sender<Input>,
    /// Proposers waiting for their batch, by the (index, term) raft gave
    /// its entry: unique across restarts and leaders, unlike a counter.
    waiting: HashMap<(u64, u64), Vec<Reply>>,
    /// The term the waiters were proposed in; when it changes, they are
    /// told leadership was lost (their command may still commit).
    waiting_term: u64,
    applied: u64,
    since_compact: u64,
    snapshots_installed: u64,
    /// ReadIndex requests sent to raft, by context, oldest first.
    reads: BTreeMap<u64, oneshot::Sender<u64>>,
    next_read: u64,
    /// Reads whose index is known, waiting for `applied` to reach it.
    ready_reads: Vec<(u64, oneshot::Sender<u64>)>,
    /// The membership change in flight (raft allows one at a time), with
    /// the index of its entry.
    conf_waiter: Option<(u64, oneshot::Sender<Result<ConfState, ProposeError>>)>,
    /// The voters and their addresses, rebuilt when the configuration changes.
    voters: Arc<BTreeMap<RaftId, SocketAddr>>,
    /// Where sends to peers run (the caller's runtime).
    runtime: Option<tokio::runtime::Handle>,
    /// Set when the driver's task is aborted: stop now, as in a crash.
    killed: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, runtime: tokio::runtime::Handle) {
        self.runtime = Some(runtime);
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.killed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let mut proposals: Vec<(Command, Reply)> = Vec::new();
            tokio::select! {
                _ = tick.tick() => { self.raw.tick(); }
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
            self.propose(proposals);
            if let Err(e) = self.handle_ready() {
                tracing::error!(error = %e, "raft storage failed; this server stops");
                return;
            }
        }
    }

    /// Steps or queues one input; false means stop.
    fn take(&mut self, input: Input, proposals: &mut Vec<(Command, Reply)>) -> bool {
        match input {
            Input::Message(m) => {
                let _ = self.raw.step(m);
            }
            Input::Propose(c, reply) => proposals.push((c, reply)),
            Input::ReadIndex(reply) => {
                self.next_read += 1;
                // The server id in the high bits: the leader drops a read
                // whose context is already pending, whichever server sent it.
                let ctx = (self.config.id << 40) | (self.next_read & ((1 << 40) - 1));
                self.raw.read_index(ctx.to_be_bytes().to_vec());
                self.reads.insert(ctx, reply);
                if self.reads.len() > READS_PENDING_MAX {
                    self.reads.pop_first();
                }
            }
            Input::ConfChange(cc, reply) => {
                if self.raw.raft.state != StateRole::Leader {
                    let leader = Some(self.raw.raft.leader_id).filter(|l| *l != 0);
                    let _ = reply.send(Err(ProposeError::NotLeader(leader)));
                } else if self.conf_waiter.is_some() || self.raw.raft.has_pending_conf() {
                    let _ = reply.send(Err(ProposeError::ChangePending));
                } else if self.raw.propose_conf_change(vec![], cc).is_ok() {
                    self.conf_waiter = Some((self.raw.raft.raft_log.last_index(), reply));
                } else {
                    let _ = reply.send(Err(ProposeError::ChangePending));
                }
            }
            Input::TransferLeader(to) => self.raw.transfer_leader(to),
            Input::SnapshotSent(to, ok) => {
                self.raw.report_snapshot(to, if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure });
            }
            Input::Stop => return false,
        }
        true
    }

    fn propose(&mut self, proposals: Vec<(Command, Reply)>) {
        if proposals.is_empty() {
            return;
        }
        if self.raw.raft.state != StateRole::Leader {
            let leader = Some(self.raw.raft.leader_id).filter(|l| *l != 0);
            for (_, reply) in proposals {
                let _ = reply.send(Err(ProposeError::NotLeader(leader)));
            }
            return;
        }
        // Commands are grouped into entries of at most ENTRY_BYTES_MAX, so
        // every append fits a transport frame; a command larger than that
        // alone is refused.
        let mut entries: Vec<(Vec<Command>, Vec<Reply>, usize)> = Vec::new();
        for (command, reply) in proposals {
            let size = codec::encode(&command).len();
            if size > ENTRY_BYTES_MAX {
                let _ = reply.send(Err(ProposeError::TooLarge(size)));
                continue;
            }
            match entries.last_mut() {
                Some((cs, rs, bytes)) if *bytes + size <= ENTRY_BYTES_MAX => {
                    cs.push(command);
                    rs.push(reply);
                    *bytes += size;
                }
                _ => entries.push((vec![command], vec![reply], size)),
            }
        }
        for (commands, replies, _) in entries {
            match self.raw.propose(vec![], codec::encode(&commands)) {
                Ok(()) => {
                    let key = (self.raw.raft.raft_log.last_index(), self.raw.raft.term);
                    self.waiting_term = self.raw.raft.term;
                    self.waiting.insert(key, replies);
                }
                Err(_) => {
                    for reply in replies {
                        let _ = reply.send(Err(ProposeError::NotLeader(None)));
                    }
                }
            }
        }
    }

    fn send(&self, messages: Vec<Message>) {
        for m in messages {
            let Some(&addr) = self.config.peers.get(&m.to) else { continue };
            let is_snapshot = m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
            let to = m.to;
            let Ok(bytes) = m.write_to_bytes() else { continue };
            let transport = self.transport.clone();
            let inputs = self.inputs.clone();
            let runtime = self.runtime.clone().unwrap_or_else(tokio::runtime::Handle::current);
            runtime.spawn(async move {
                let ok = transport.call(addr, RaftMessage(bytes)).await.is_ok();
                if is_snapshot {
                    let _ = inputs.send(Input::SnapshotSent(to, ok)).await;
                }
            });
        }
    }

    fn handle_ready(&mut self) -> Result<(), StoreError> {
        if !self.raw.has_ready() {
            self.answer_reads();
            self.publish_status();
            return Ok(());
        }
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        for rs in rd.take_read_states() {
            let ctx = rs.request_ctx.as_slice().try_into().map(u64::from_be_bytes).ok();
            if let Some(reply) = ctx.and_then(|c| self.reads.remove(&c)) {
                self.ready_reads.push((rs.index, reply));
            }
        }
        let snapshot: Option<Snapshot> = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
        // Decoded before it replaces the log: a snapshot that cannot be read
        // must not wipe a log that can.
        let installed = snapshot.as_ref().map(|s| unpack_snapshot(s.get_data())).transpose()?;
        let entries = rd.entries().clone();
        let hs = rd.hs().cloned();
        self.raw.mut_store().persist(Persist {
            snapshot: snapshot.as_ref(),
            entries: &entries,
            hard_state: hs.as_ref(),
            conf_state: None,
            lazy: false,
        })?;
        if let (Some(s), Some((peers, restored))) = (&snapshot, installed) {
            self.config.peers.extend(peers.into_iter().filter(|(id, _)| *id != self.config.id));
            *self.state.write().expect("state lock") = restored;
            self.applied = s.get_metadata().index;
            self.snapshots_installed += 1;
        }
        self.send(rd.take_persisted_messages());
        self.apply(rd.take_committed_entries())?;
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.store().hard_state();
            hs.commit = commit;
            // Without fsync: the entries are durable already, and a restart
            // replays from the snapshot, never past a commit index it lost.
            self.raw.mut_store().persist(Persist { hard_state: Some(&hs), lazy: true, ..Default::default() })?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.answer_reads();
        self.release_stale_waiters();
        if self.since_compact >= self.config.compact_every {
            let data = pack_snapshot(&self.config.peers, &self.state.read().expect("state lock"));
            self.raw.mut_store().compact(self.applied, &data)?;
            self.since_compact = 0;
        }
        self.publish_status();
        Ok(())
    }

    /// Applies committed entries, then publishes the new applied index, and
    /// only then answers the proposers: nobody who got an answer can see a
    /// status older than the state it was answered from.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let mut answers: Vec<(Reply, Effect)> = Vec::new();
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if !e.get_data().is_empty() => {
                    let commands: Vec<Command> = match codec::decode(e.get_data(), codec::DECODE_BYTES_MAX) {
                        Ok(c) => c,
                        Err(err) => {
                            // Every server skips the same entry, so replicas
                            // stay equal; the proposers are told it failed.
                            tracing::error!(index = e.index, error = %err, "a log entry does not decode; skipped");
                            Vec::new()
                        }
                    };
                    let effects: Vec<Effect> = {
                        let mut state = self.state.write().expect("state lock");
                        commands.iter().map(|c| state.apply(c)).collect()
                    };
                    if let Some(replies) = self.waiting.remove(&(e.index, e.term)) {
                        answers.extend(replies.into_iter().zip(effects));
                    }
                }
                EntryType::EntryConfChange => {
                    if let Ok(cc) = ConfChange::parse_from_bytes(e.get_data()) {
                        let cs = self.raw.apply_conf_change(&cc);
                        self.persist_conf_state(cs)?;
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    if let Ok(cc) = ConfChangeV2::parse_from_bytes(e.get_data()) {
                        let addr =
                            std::str::from_utf8(cc.get_context()).ok().and_then(|a| a.parse::<SocketAddr>().ok());
                        for change in cc.get_changes() {
                            match (change.get_change_type(), addr) {
                                (ConfChangeType::AddNode | ConfChangeType::AddLearnerNode, Some(a)) => {
                                    self.config.peers.insert(change.node_id, a);
                                }
                                (ConfChangeType::RemoveNode, _) if change.node_id != self.config.id => {
                                    self.config.peers.remove(&change.node_id);
                                }
                                _ => {}
                            }
                        }
                        let cs = self.raw.apply_conf_change(&cc);
                        let answer = cs.as_ref().map(Clone::clone).map_err(|_| ProposeError::Timeout);
                        self.persist_conf_state(cs)?;
                        if self.conf_waiter.as_ref().is_some_and(|(i, _)| *i == e.index) {
                            if let Some((_, w)) = self.conf_waiter.take() {
                                let _ = w.send(answer);
                            }
                        }
                    }
                }
                _ => {}
            }
            self.applied = e.index;
            self.since_compact += 1;
        }
        if !answers.is_empty() {
            self.publish_status();
            for (reply, effect) in answers {
                let _ = reply.send(Ok(effect));
            }
        }
        Ok(())
    }

    /// Proposers of a term this server no longer leads are told so: their
    /// entries may still commit under the new leader, or be overwritten.
    fn release_stale_waiters(&mut self) {
        // A membership change proposed in an earlier term may have been
        // overwritten; its proposer is told, and the next one may try.
        if self.conf_waiter.is_some() && self.raw.raft.state != StateRole::Leader {
            if let Some((_, w)) = self.conf_waiter.take() {
                let leader = Some(self.raw.raft.leader_id).filter(|l| *l != 0);
                let _ = w.send(Err(ProposeError::NotLeader(leader)));
            }
        }
        if self.waiting.is_empty()
            || (self.raw.raft.state == StateRole::Leader && self.raw.raft.term == self.waiting_term)
        {
            return;
        }
        let leader = Some(self.raw.raft.leader_id).filter(|l| *l != 0);
        for (_, replies) in self.waiting.drain() {
            for reply in replies {
                let _ = reply.send(Err(ProposeError::NotLeader(leader)));
            }
        }
    }

    /// Answers the reads whose read index this server has applied.
    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.ready_reads).into_iter().partition(|(i, _)| *i <= applied);
        self.ready_reads = waiting;
        for (index, reply) in done {
            let _ = reply.send(index);
        }
    }

    fn persist_conf_state(&mut self, cs: raft::Result<ConfState>) -> Result<(), StoreError> {
        if let Ok(cs) = cs {
            self.raw.mut_store().persist(Persist { conf_state: Some(&cs), ..Default::default() })?;
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let conf = self.raw.raft.prs().conf().voters().ids();
        if conf.len() != self.voters.len() || !conf.iter().all(|id| self.voters.contains_key(&id)) {
            let known = |id: &RaftId| self.config.peers.get(id).map(|a| (*id, *a));
            self.voters = Arc::new(conf.iter().filter_map(|id| known(&id)).collect());
        }
        let s = RaftStatus {
            peers: self.voters.clone(),
            leader: Some(self.raw.raft.leader_id).filter(|l| *l != 0),
            term: self.raw.raft.term,
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            snapshots_installed: self.snapshots_installed,
        };
        self.status.send_if_modified(|old| {
            let changed = *old != s;
            *old = s;
            changed
        });
    }
}
