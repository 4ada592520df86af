//! The Raft driver's core, without IO: a `RawNode` over a [`LogStore`], the
//! state machine, and the proposers waiting for their commands. The server
//! drives it from a thread with a tick timer and the transport
//! ([`crate::raft::node`]); the simulator drives the same core from its
//! step loop with a [`crate::raft::storage::MemoryStorage`] and a simulated
//! network, so what it checks is what servers run.
//!
//! Each `Ready` is handled in the order raft-rs documents: send messages;
//! persist snapshot, entries and hard state in one write; send persisted
//! messages; apply committed entries; advance; then the light ready's
//! commit index, messages and entries; `advance_apply`. Every
//! `compact_every` applied entries the state is snapshotted and the log
//! compacted.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::codec;
use crate::command::{Command, Effect};
use crate::raft::node::{ENTRY_BYTES_MAX, ProposeError, READS_PENDING_MAX, RaftConfig, RaftId, RaftStatus};
use crate::raft::storage::{LogStore, Persist, StoreError};
use crate::state::{ClusterState, archive};

/// Every voter's transport address, by Raft id.
pub type Peers = BTreeMap<RaftId, SocketAddr>;

/// Where a proposer waits for its command's effect.
pub type Reply = oneshot::Sender<Result<Effect, ProposeError>>;

/// What a Raft snapshot carried before archives (read, never written):
/// the state machine, and every voter's address.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    peers: Vec<(RaftId, SocketAddr)>,
    state: Vec<u8>,
}

/// A Raft snapshot's data: the state as an archive ([`archive`]), which
/// names every voter's address too. Written at `index` (of `term`); the
/// creation time is left out so that replicas write the same bytes.
fn pack_snapshot(peers: &BTreeMap<RaftId, SocketAddr>, state: &ClusterState, index: u64, term: u64) -> Vec<u8> {
    archive::to_vec(state, index, term, peers.iter().map(|(k, v)| (*k, *v)).collect(), 0)
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

/// The voters and the state a snapshot's data holds: an archive, or one
/// of the single-frame layouts earlier versions wrote.
fn unpack_snapshot(bytes: &[u8]) -> Result<(Vec<(RaftId, SocketAddr)>, ClusterState), StoreError> {
    if archive::is_archive(bytes) {
        let (summary, state) = archive::read(bytes).map_err(|e| StoreError::Db(format!("snapshot: {e}")))?;
        return Ok((summary.header.peers, state));
    }
    let bad = |e: crate::codec::CodecError| StoreError::Db(format!("snapshot: {e}"));
    match codec::decode::<SnapshotData>(bytes, codec::DECODE_BYTES_MAX) {
        Ok(data) => Ok((data.peers, ClusterState::restore(&unzstd(&data.state)?).map_err(bad)?)),
        // Written before snapshots carried addresses: the state alone.
        Err(_) => Ok((Vec::new(), ClusterState::restore(bytes).map_err(bad)?)),
    }
}

/// Known bugs the simulator plants in the core to prove it catches them.
/// Always off in servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftPlants {
    /// Skip applying every entry whose index is a multiple of this (0: never).
    pub skip_every: u64,
    /// A server restarted from its snapshot, or installing one, loses the
    /// holds table.
    pub snapshot_drops_holds: bool,
}

/// The planted bug [`RaftPlants::snapshot_drops_holds`].
fn drop_holds(state: &mut ClusterState) {
    let holders: Vec<String> = state.holds().keys().cloned().collect();
    for h in holders {
        let record = state.record(&h).map(<[u8]>::to_vec).unwrap_or_default();
        state.release(&h, record);
    }
}

/// One server's Raft: the `RawNode`, its store and the state machine.
pub struct Core<S: LogStore> {
    raw: RawNode<S>,
    pub config: RaftConfig,
    state: Arc<RwLock<ClusterState>>,
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
    /// Every entry applied, by index, while recording (the simulator's
    /// oracle replays them); `None` in servers.
    recorded: Option<Vec<(u64, Vec<Command>)>>,
    /// Effects applied, for proposers not yet told.
    answers: Vec<(Reply, Effect)>,
    pub plants: RaftPlants,
}

impl<S: LogStore> Core<S> {
    /// Opens the core on `store`: bootstraps a fresh log with the
    /// configured voters (unless joining), restores the state machine from
    /// the last snapshot; raft replays the committed entries after it.
    pub fn open(config: RaftConfig, store: S, logger: &slog::Logger) -> Result<Core<S>, StoreError> {
        Core::open_planted(config, store, logger, RaftPlants::default())
    }

    /// [`Core::open`] with known bugs switched on (the simulator's plants).
    pub fn open_planted(
        config: RaftConfig,
        store: S,
        logger: &slog::Logger,
        plants: RaftPlants,
    ) -> Result<Core<S>, StoreError> {
        let initial = raft::Storage::initial_state(&store).map_err(|e| StoreError::Db(e.to_string()))?;
        if initial.conf_state.voters.is_empty() && !config.join {
            let cs = ConfState::from((config.peers.keys().copied().collect::<Vec<_>>(), vec![]));
            store.persist(Persist { conf_state: Some(&cs), ..Default::default() })?;
        }
        let snap = raft::Storage::snapshot(&store, 0, config.id).ok();
        let mut config = config;
        let (mut state, applied) = match snap {
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
        if plants.snapshot_drops_holds {
            drop_holds(&mut state);
        }
        let raw = RawNode::new(&config.raft(applied), store, logger).map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(Core {
            raw,
            config,
            state: Arc::new(RwLock::new(state)),
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
            answers: Vec::new(),
            recorded: None,
            plants,
        })
    }

    /// Keeps every applied entry's commands for [`Core::take_applied`].
    pub fn record_applied(&mut self) {
        self.recorded.get_or_insert_with(Vec::new);
    }

    /// The entries applied since the last call, as `(index, commands)`
    /// (entries without commands give an empty list).
    pub fn take_applied(&mut self) -> Vec<(u64, Vec<Command>)> {
        self.recorded.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The index of the last entry applied to the state machine.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Starts an election now (a fresh cluster's first leader, without
    /// waiting for an election timeout).
    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
    }

    /// The state machine, shared with readers.
    pub fn state(&self) -> Arc<RwLock<ClusterState>> {
        self.state.clone()
    }

    /// One tick of raft's logical clock (`config.tick` of time).
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Steps a peer's message; a malformed or stale one is dropped.
    pub fn step(&mut self, m: Message) {
        let _ = self.raw.step(m);
    }

    /// Asks for a read index; `reply` gets it once this server has applied
    /// that far. raft-rs drops the request when there is no leader.
    pub fn read_index(&mut self, reply: oneshot::Sender<u64>) {
        self.next_read += 1;
        // The server id in the high bits: the leader drops a read whose
        // context is already pending, whichever server sent it.
        let ctx = (self.config.id << 40) | (self.next_read & ((1 << 40) - 1));
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.reads.insert(ctx, reply);
        if self.reads.len() > READS_PENDING_MAX {
            self.reads.pop_first();
        }
    }

    /// Proposes a membership change (one at a time); `reply` gets the new
    /// configuration once applied here.
    pub fn conf_change(&mut self, cc: ConfChangeV2, reply: oneshot::Sender<Result<ConfState, ProposeError>>) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(ProposeError::NotLeader(self.leader())));
        } else if self.conf_waiter.is_some() || self.raw.raft.has_pending_conf() {
            let _ = reply.send(Err(ProposeError::ChangePending));
        } else if self.raw.propose_conf_change(vec![], cc).is_ok() {
            self.conf_waiter = Some((self.raw.raft.raft_log.last_index(), reply));
        } else {
            let _ = reply.send(Err(ProposeError::ChangePending));
        }
    }

    pub fn transfer_leader(&mut self, to: RaftId) {
        self.raw.transfer_leader(to);
    }

    /// Whether a snapshot sent to `to` arrived.
    pub fn report_snapshot(&mut self, to: RaftId, delivered: bool) {
        self.raw.report_snapshot(to, if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure });
    }

    fn leader(&self) -> Option<RaftId> {
        Some(self.raw.raft.leader_id).filter(|l| *l != 0)
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// Whether raft has this server leading now.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The term in which this server may act as leader: it leads, has
    /// committed an entry of its term, and applied everything committed
    /// (what a ReadIndex on the leader waits for).
    pub fn leading_term(&self) -> Option<u64> {
        let log = &self.raw.raft.raft_log;
        let term = self.raw.raft.term;
        let ours = log.term(log.committed).is_ok_and(|t| t == term);
        (self.is_leader() && ours && self.applied >= log.committed).then_some(term)
    }

    /// Proposes commands, many in one entry, up to [`ENTRY_BYTES_MAX`] each;
    /// each reply gets its command's effect once applied here, or why not.
    pub fn propose(&mut self, proposals: Vec<(Command, Reply)>) {
        if proposals.is_empty() {
            return;
        }
        if !self.is_leader() {
            let leader = self.leader();
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

    /// Handles raft's `Ready`, if any: `send` gets the messages for peers
    /// as soon as they may leave (a leader's appends before its own write),
    /// with every peer's address as this server knows it at that moment.
    pub fn handle_ready(&mut self, send: &mut dyn FnMut(&Peers, Vec<Message>)) -> Result<(), StoreError> {
        if !self.raw.has_ready() {
            self.answer_reads();
            return Ok(());
        }
        let mut rd = self.raw.ready();
        send(&self.config.peers, rd.take_messages());
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
        let persist = Persist {
            snapshot: snapshot.as_ref(),
            entries: &entries,
            hard_state: hs.as_ref(),
            conf_state: None,
            lazy: false,
        };
        // A Ready of messages only writes nothing (and waits for no disk).
        if !persist.is_empty() {
            self.raw.mut_store().persist(persist)?;
        }
        if let (Some(s), Some((peers, mut restored))) = (&snapshot, installed) {
            if self.plants.snapshot_drops_holds {
                drop_holds(&mut restored);
            }
            self.config.peers.extend(peers.into_iter().filter(|(id, _)| *id != self.config.id));
            restored.set_applied_at(s.get_metadata().index, s.get_metadata().term);
            *self.state.write().expect("state lock") = restored;
            self.applied = s.get_metadata().index;
            self.snapshots_installed += 1;
        }
        send(&self.config.peers, rd.take_persisted_messages());
        self.apply(rd.take_committed_entries())?;
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.store().hard_state();
            hs.commit = commit;
            // Without fsync: the entries are durable already, and a restart
            // replays from the snapshot, never past a commit index it lost.
            self.raw.mut_store().persist(Persist { hard_state: Some(&hs), lazy: true, ..Default::default() })?;
        }
        send(&self.config.peers, light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.answer_reads();
        self.release_stale_waiters();
        if self.since_compact >= self.config.compact_every {
            let term = raft::Storage::term(self.raw.store(), self.applied).unwrap_or(0);
            let data = pack_snapshot(&self.config.peers, &self.state.read().expect("state lock"), self.applied, term);
            self.raw.mut_store().compact(self.applied, &data)?;
            self.since_compact = 0;
        }
        Ok(())
    }

    /// Tells the proposers whose commands were applied their effects. The
    /// server calls it after publishing its status: nobody who got an
    /// answer can see a status older than the state it was answered from.
    pub fn answer_proposers(&mut self) {
        for (reply, effect) in self.answers.drain(..) {
            let _ = reply.send(Ok(effect));
        }
    }

    /// Applies committed entries; their proposers are answered by
    /// [`Core::answer_proposers`].
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        let last = entries.last().map(|e| (e.index, e.term));
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
                    if let Some(r) = self.recorded.as_mut() {
                        r.push((e.index, commands.clone()));
                    }
                    let skip = self.plants.skip_every > 0 && e.index % self.plants.skip_every == 0;
                    let effects: Vec<Effect> = if skip {
                        commands.iter().map(|_| Effect::Done).collect()
                    } else {
                        let mut state = self.state.write().expect("state lock");
                        commands.iter().map(|c| state.apply(c)).collect()
                    };
                    if let Some(replies) = self.waiting.remove(&(e.index, e.term)) {
                        self.answers.extend(replies.into_iter().zip(effects));
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
                        self.apply_conf_change_v2(e.index, &cc)?;
                    }
                }
                _ => {}
            }
            if e.get_entry_type() != EntryType::EntryNormal {
                // A snapshot taken before a membership change names the old
                // voters: a server added since refuses it (raft-rs's
                // `restore` wants itself in the snapshot's ConfState), and
                // could never catch up once the log is compacted. So the
                // state is snapshotted again at the end of this turn.
                self.since_compact = self.config.compact_every;
            }
            let recorded = self.recorded.as_ref().and_then(|r| r.last()).is_some_and(|(i, _)| *i == e.index);
            if let (Some(r), false) = (self.recorded.as_mut(), recorded) {
                r.push((e.index, Vec::new()));
            }
            self.applied = e.index;
            self.since_compact = self.since_compact.saturating_add(1);
        }
        if let Some((index, term)) = last {
            self.state.write().expect("state lock").set_applied_at(index, term);
        }
        Ok(())
    }

    fn apply_conf_change_v2(&mut self, index: u64, cc: &ConfChangeV2) -> Result<(), StoreError> {
        use raft::prelude::ConfChangeType;
        let addr = std::str::from_utf8(cc.get_context()).ok().and_then(|a| a.parse::<SocketAddr>().ok());
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
        let cs = self.raw.apply_conf_change(cc);
        let answer = cs.as_ref().map(Clone::clone).map_err(|_| ProposeError::Timeout);
        self.persist_conf_state(cs)?;
        if self.conf_waiter.as_ref().is_some_and(|(i, _)| *i == index) {
            if let Some((_, w)) = self.conf_waiter.take() {
                let _ = w.send(answer);
            }
        }
        Ok(())
    }

    /// Proposers of a term this server no longer leads are told so: their
    /// entries may still commit under the new leader, or be overwritten.
    fn release_stale_waiters(&mut self) {
        // A membership change proposed in an earlier term may have been
        // overwritten; its proposer is told, and the next one may try.
        if self.conf_waiter.is_some() && !self.is_leader() {
            if let Some((_, w)) = self.conf_waiter.take() {
                let _ = w.send(Err(ProposeError::NotLeader(self.leader())));
            }
        }
        if self.waiting.is_empty() || (self.is_leader() && self.raw.raft.term == self.waiting_term) {
            return;
        }
        let leader = self.leader();
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

    /// What the server reports after every turn.
    pub fn status(&mut self) -> RaftStatus {
        let conf = self.raw.raft.prs().conf().voters().ids();
        if conf.len() != self.voters.len() || !conf.iter().all(|id| self.voters.contains_key(&id)) {
            let known = |id: &RaftId| self.config.peers.get(id).map(|a| (*id, *a));
            self.voters = Arc::new(conf.iter().filter_map(|id| known(&id)).collect());
        }
        RaftStatus {
            peers: self.voters.clone(),
            leader: self.leader(),
            term: self.raw.raft.term,
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            snapshots_installed: self.snapshots_installed,
        }
    }
}
