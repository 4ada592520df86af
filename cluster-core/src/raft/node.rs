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

/// The most bytes of a snapshot in one [`RaftMessage::SnapshotChunk`]:
/// a chunk always fits a transport frame.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;
/// The largest snapshot a server accepts from its leader.
pub const SNAPSHOT_BYTES_MAX: u64 = 8 << 30;

/// A Raft message between servers.
///
/// A snapshot does not travel in its `MsgSnapshot` (a frame holds at most
/// 16 MiB): the sender first sends its data as [`RaftMessage::SnapshotChunk`]s,
/// in order, then the message without data. The receiver keeps the chunks
/// of one snapshot and puts them back into the message that names it; a
/// message whose chunks did not all arrive is refused, and the leader tries
/// again (raft-rs's `report_snapshot`). What is sent is the stored archive,
/// whose checksum the receiver checks before installing it.
#[derive(Serialize, Deserialize)]
pub enum RaftMessage {
    /// raft-rs's protobuf bytes.
    Message(Vec<u8>),
    /// `bytes` from `offset` of the `total` bytes of the snapshot at
    /// `index` of `term`.
    SnapshotChunk { index: u64, term: u64, offset: u64, total: u64, bytes: Vec<u8> },
}

impl Rpc for RaftMessage {
    /// `Err`: why the message was not taken (a snapshot that did not
    /// arrive whole, a chunk out of order, a full queue).
    type Reply = Result<(), String>;
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
    /// The snapshot arriving in chunks, at most one at a time.
    incoming: Arc<std::sync::Mutex<Option<Incoming>>>,
}

/// The chunks of one snapshot received so far.
struct Incoming {
    index: u64,
    term: u64,
    total: u64,
    bytes: Vec<u8>,
    /// When the last chunk came: a transfer silent for
    /// [`SNAPSHOT_IDLE_MAX`] is dropped, not kept in memory.
    last: std::time::Instant,
}

/// How long a snapshot being received may wait for its next chunk.
pub const SNAPSHOT_IDLE_MAX: Duration = Duration::from_secs(120);

/// Drops a transfer that stalled (its leader died, or moved on).
fn drop_stale(slot: &mut Option<Incoming>) {
    if slot.as_ref().is_some_and(|i| i.last.elapsed() > SNAPSHOT_IDLE_MAX) {
        *slot = None;
    }
}

/// Adds one chunk to `slot`; a chunk at offset 0 starts a new snapshot.
fn add_chunk(
    slot: &mut Option<Incoming>,
    index: u64,
    term: u64,
    offset: u64,
    total: u64,
    bytes: Vec<u8>,
) -> Result<(), String> {
    if total > SNAPSHOT_BYTES_MAX {
        return Err(format!("a snapshot of {total} bytes is over the limit of {SNAPSHOT_BYTES_MAX}"));
    }
    drop_stale(slot);
    if offset == 0 {
        // Room for the start only: `total` is the sender's word.
        let cap = total.min(64 << 20) as usize;
        *slot = Some(Incoming { index, term, total, bytes: Vec::with_capacity(cap), last: std::time::Instant::now() });
    }
    let Some(inc) = slot.as_mut().filter(|i| (i.index, i.term, i.total) == (index, term, total)) else {
        return Err(format!("a chunk of the snapshot at {index} came without its start"));
    };
    if offset != inc.bytes.len() as u64 || offset + bytes.len() as u64 > total {
        *slot = None;
        return Err(format!("a chunk of the snapshot at {index} came out of order; start again"));
    }
    inc.bytes.extend_from_slice(&bytes);
    inc.last = std::time::Instant::now();
    Ok(())
}

/// The whole snapshot at `index` of `term`, if it all arrived; a transfer
/// of another snapshot stays (a stray message must not cut it short).
fn take_whole(slot: &mut Option<Incoming>, index: u64, term: u64) -> Result<Vec<u8>, String> {
    drop_stale(slot);
    match slot.take_if(|i| (i.index, i.term) == (index, term) && i.bytes.len() as u64 == i.total) {
        Some(inc) => Ok(inc.bytes),
        None => Err(format!("the snapshot at {index} did not arrive whole")),
    }
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
    async fn handle(&self, _from: Identity, request: RaftMessage) -> Result<(), String> {
        let bytes = match request {
            RaftMessage::SnapshotChunk { index, term, offset, total, bytes } => {
                let mut slot = self.incoming.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                return add_chunk(&mut slot, index, term, offset, total, bytes);
            }
            RaftMessage::Message(bytes) => bytes,
        };
        let mut m = Message::parse_from_bytes(&bytes).map_err(|e| format!("malformed raft message: {e}"))?;
        if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
            let md = m.get_snapshot().get_metadata();
            let (index, term) = (md.index, md.term);
            let data =
                take_whole(&mut self.incoming.lock().unwrap_or_else(std::sync::PoisonError::into_inner), index, term)?;
            m.mut_snapshot().set_data(data.into());
            // Refused when the queue is full: the leader sends it again.
            return self.tx.try_send(Input::Message(m)).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => "the raft queue is full".to_string(),
                mpsc::error::TrySendError::Closed(_) => "raft has stopped".to_string(),
            });
        }
        // A full queue drops the message; Raft retransmits.
        let _ = self.tx.try_send(Input::Message(m));
        Ok(())
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
    let handle = RaftHandle { tx: tx.clone(), status: status_rx, state: core.state(), incoming: Arc::default() };
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
    for mut m in messages {
        let Some(&addr) = peers.get(&m.to) else { continue };
        let is_snapshot = m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
        let to = m.to;
        let (index, term) = (m.get_snapshot().get_metadata().index, m.get_snapshot().get_metadata().term);
        let data = if is_snapshot { m.mut_snapshot().take_data() } else { Default::default() };
        let Ok(bytes) = m.write_to_bytes() else { continue };
        let transport = transport.clone();
        let inputs = inputs.clone();
        let runtime = runtime.clone().unwrap_or_else(tokio::runtime::Handle::current);
        runtime.spawn(async move {
            if !is_snapshot {
                let _ = transport.call(addr, RaftMessage::Message(bytes)).await;
                return;
            }
            let sent = send_snapshot(&*transport, addr, index, term, &data, bytes).await;
            if let Err(e) = &sent {
                tracing::info!(to, index, error = %e, "a snapshot did not reach a follower; raft sends it again");
            }
            let _ = inputs.send(Input::SnapshotSent(to, sent.is_ok())).await;
        });
    }
}

/// Sends a snapshot's `data` in chunks, then its message (`bytes`).
async fn send_snapshot(
    transport: &dyn Transport<RaftMessage>,
    addr: SocketAddr,
    index: u64,
    term: u64,
    data: &[u8],
    bytes: Vec<u8>,
) -> Result<(), String> {
    let total = data.len() as u64;
    let mut offset = 0;
    // At least one chunk, so that an empty snapshot arrives too.
    loop {
        let end = (offset + SNAPSHOT_CHUNK_BYTES).min(data.len());
        let chunk =
            RaftMessage::SnapshotChunk { index, term, offset: offset as u64, total, bytes: data[offset..end].to_vec() };
        transport.call(addr, chunk).await.map_err(|e| e.to_string())??;
        offset = end;
        if offset >= data.len() {
            break;
        }
    }
    transport.call(addr, RaftMessage::Message(bytes)).await.map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_must_start_at_zero_and_come_in_order() {
        let mut slot = None;
        assert!(add_chunk(&mut slot, 9, 2, 4, 8, vec![0; 4]).is_err(), "a chunk without its start");
        add_chunk(&mut slot, 9, 2, 0, 8, vec![1; 4]).unwrap();
        assert!(add_chunk(&mut slot, 9, 3, 4, 8, vec![0; 4]).is_err(), "a chunk of another term");
        add_chunk(&mut slot, 9, 2, 0, 8, vec![1; 4]).unwrap();
        assert!(add_chunk(&mut slot, 9, 2, 2, 8, vec![0; 4]).is_err(), "a chunk out of order");
        assert!(slot.is_none(), "an out-of-order chunk drops what came");
        add_chunk(&mut slot, 9, 2, 0, 8, vec![1; 4]).unwrap();
        assert!(add_chunk(&mut slot, 9, 2, 4, 8, vec![0; 5]).is_err(), "past the announced total");
        add_chunk(&mut slot, 9, 2, 0, 8, vec![1; 4]).unwrap();
        add_chunk(&mut slot, 9, 2, 4, 8, vec![2; 4]).unwrap();
        assert_eq!(slot.unwrap().bytes, [1, 1, 1, 1, 2, 2, 2, 2]);
        assert!(add_chunk(&mut None, 1, 1, 0, SNAPSHOT_BYTES_MAX + 1, vec![]).is_err(), "over the limit");
    }

    #[test]
    fn a_snapshot_message_takes_only_its_own_whole_transfer() {
        let mut slot = None;
        add_chunk(&mut slot, 9, 2, 0, 8, vec![1; 4]).unwrap();
        assert!(take_whole(&mut slot, 9, 2).is_err(), "half a snapshot");
        assert!(slot.is_some(), "a message too early drops nothing");
        add_chunk(&mut slot, 9, 2, 4, 8, vec![2; 4]).unwrap();
        assert!(take_whole(&mut slot, 7, 2).is_err(), "another index");
        assert!(take_whole(&mut slot, 9, 1).is_err(), "another term");
        assert_eq!(take_whole(&mut slot, 9, 2).unwrap(), [1, 1, 1, 1, 2, 2, 2, 2]);
        assert!(take_whole(&mut slot, 9, 2).is_err(), "taken once");
    }
}
