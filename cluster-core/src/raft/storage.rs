//! raft-rs `Storage` on redb: log entries, hard state, conf state and the
//! latest snapshot, durable (redb commits with fsync).
//!
//! Every change a `Ready` asks for (a snapshot to install, entries to
//! append, hard state, conf state) is written in **one** transaction by
//! [`RedbStorage::persist`], so a crash leaves either all of it or none.
//! Reads come from redb and a small cache of the metadata, which only a
//! committed transaction updates.
//!
//! [`MemoryStorage`] keeps the same contract in memory: the simulator's
//! disk, which survives a simulated crash because every clone shares it.

use std::path::Path;
use std::sync::{Arc, RwLock};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, ReadableTable, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft storage: {0}")]
    Db(String),
    #[error("raft storage holds a malformed {0}")]
    Corrupt(&'static str),
    #[error("cannot compact to {index}: the log holds {first}..={last}")]
    CompactRange { index: u64, first: u64, last: u64 },
}

fn dberr<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

fn to_raft(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

#[derive(Clone, Default)]
struct Meta {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot's index and term: the log starts after it.
    snapshot: SnapshotMetadata,
    /// Highest index held (the snapshot index when no entry follows it).
    last_index: u64,
}

impl Meta {
    /// raft's bounds for `entries(low, high)`: nothing before the snapshot,
    /// nothing past the last index.
    fn check_range(&self, low: u64, high: u64) -> raft::Result<()> {
        if low < self.snapshot.index + 1 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(())
    }

    /// `term(idx)` where the metadata alone answers it: at the snapshot,
    /// before it, or past the log; `None` for an index the log holds.
    fn term_outside_log(&self, idx: u64) -> Option<raft::Result<u64>> {
        if idx == self.snapshot.index {
            return Some(Ok(self.snapshot.term));
        }
        if idx < self.snapshot.index {
            return Some(Err(raft::Error::Store(StorageError::Compacted)));
        }
        if idx > self.last_index {
            return Some(Err(raft::Error::Store(StorageError::Unavailable)));
        }
        None
    }
}

/// What one `Ready` asks to make durable.
#[derive(Default)]
pub struct Persist<'a> {
    pub snapshot: Option<&'a Snapshot>,
    pub entries: &'a [Entry],
    pub hard_state: Option<&'a HardState>,
    pub conf_state: Option<&'a ConfState>,
    /// Commit without waiting for the disk (no fsync): for what a crash may
    /// lose harmlessly, such as a newer commit index, which the leader
    /// tells again and which a restart never needs (replay starts from the
    /// snapshot).
    pub lazy: bool,
}

/// What the Raft driver needs of a log store beyond raft-rs's `Storage`:
/// to make a `Ready` durable, to compact, and the hard state it holds.
pub trait LogStore: raft::Storage {
    /// Makes one `Ready`'s changes durable, all or nothing.
    fn persist(&self, p: Persist<'_>) -> Result<(), StoreError>;
    /// Discards the log up to `index` (applied), keeping `data`, the state
    /// machine's snapshot at `index`. Errors with [`StoreError::CompactRange`]
    /// outside the entries held.
    fn compact(&self, index: u64, data: &[u8]) -> Result<(), StoreError>;
    fn hard_state(&self) -> HardState;
}

impl LogStore for RedbStorage {
    fn persist(&self, p: Persist<'_>) -> Result<(), StoreError> {
        RedbStorage::persist(self, p)
    }
    fn compact(&self, index: u64, data: &[u8]) -> Result<(), StoreError> {
        RedbStorage::compact(self, index, data)
    }
    fn hard_state(&self) -> HardState {
        RedbStorage::hard_state(self)
    }
}

impl Persist<'_> {
    /// Whether this asks for nothing at all (a `Ready` of messages only).
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none() && self.conf_state.is_none()
    }
}

pub struct RedbStorage {
    db: Database,
    meta: RwLock<Meta>,
}

impl RedbStorage {
    /// Opens (or creates) the log at `path`, recovering what was committed.
    pub fn open(path: &Path) -> Result<RedbStorage, StoreError> {
        let db = Database::create(path).map_err(dberr)?;
        // The log holds every job spec, their secrets included.
        crate::private::private_file(path).map_err(dberr)?;
        {
            let tx = db.begin_write().map_err(dberr)?;
            tx.open_table(ENTRIES).map_err(dberr)?;
            tx.open_table(META).map_err(dberr)?;
            tx.commit().map_err(dberr)?;
        }
        let meta = {
            let tx = db.begin_read().map_err(dberr)?;
            let m = tx.open_table(META).map_err(dberr)?;
            let read = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
                Ok(m.get(key).map_err(dberr)?.map(|v| v.value().to_vec()))
            };
            let mut meta = Meta::default();
            if let Some(b) = read(HARD_STATE)? {
                meta.hard_state = HardState::parse_from_bytes(&b).map_err(|_| StoreError::Corrupt("hard state"))?;
            }
            if let Some(b) = read(CONF_STATE)? {
                meta.conf_state = ConfState::parse_from_bytes(&b).map_err(|_| StoreError::Corrupt("conf state"))?;
            }
            if let Some(b) = read(SNAPSHOT_META)? {
                meta.snapshot =
                    SnapshotMetadata::parse_from_bytes(&b).map_err(|_| StoreError::Corrupt("snapshot metadata"))?;
            }
            let entries = tx.open_table(ENTRIES).map_err(dberr)?;
            let last = entries.last().map_err(dberr)?.map(|(k, _)| k.value());
            meta.last_index = last.unwrap_or(0).max(meta.snapshot.index);
            meta
        };
        Ok(RedbStorage { db, meta: RwLock::new(meta) })
    }

    /// Makes one `Ready`'s changes durable in a single transaction.
    pub fn persist(&self, p: Persist<'_>) -> Result<(), StoreError> {
        let mut meta = self.meta.read().expect("raft meta lock").clone();
        let mut tx = self.db.begin_write().map_err(dberr)?;
        if p.lazy {
            tx.set_durability(redb::Durability::Eventual);
        }
        {
            let mut entries = tx.open_table(ENTRIES).map_err(dberr)?;
            let mut m = tx.open_table(META).map_err(dberr)?;
            if let Some(snap) = p.snapshot {
                // A snapshot from the leader replaces the whole log.
                let md = snap.get_metadata();
                entries.retain(|_, _| false).map_err(dberr)?;
                m.insert(SNAPSHOT_META, md.write_to_bytes().map_err(dberr)?.as_slice()).map_err(dberr)?;
                m.insert(SNAPSHOT_DATA, snap.get_data()).map_err(dberr)?;
                m.insert(CONF_STATE, md.get_conf_state().write_to_bytes().map_err(dberr)?.as_slice()).map_err(dberr)?;
                meta.snapshot = md.clone();
                meta.conf_state = md.get_conf_state().clone();
                meta.last_index = md.index;
                if meta.hard_state.commit < md.index {
                    meta.hard_state.commit = md.index;
                    meta.hard_state.term = meta.hard_state.term.max(md.term);
                    m.insert(HARD_STATE, meta.hard_state.write_to_bytes().map_err(dberr)?.as_slice()).map_err(dberr)?;
                }
            }
            if let Some(first) = p.entries.first() {
                // Entries from `first.index` on replace whatever the log held there.
                let from = first.index;
                entries.retain_in(from.., |_, _| false).map_err(dberr)?;
                for e in p.entries {
                    entries.insert(e.index, e.write_to_bytes().map_err(dberr)?.as_slice()).map_err(dberr)?;
                }
                meta.last_index = p.entries.last().map_or(meta.last_index, |e| e.index);
            }
            if let Some(hs) = p.hard_state {
                m.insert(HARD_STATE, hs.write_to_bytes().map_err(dberr)?.as_slice()).map_err(dberr)?;
                meta.hard_state = hs.clone();
            }
            if let Some(cs) = p.conf_state {
                m.insert(CONF_STATE, cs.write_to_bytes().map_err(dberr)?.as_slice()).map_err(dberr)?;
                meta.conf_state = cs.clone();
            }
        }
        tx.commit().map_err(dberr)?;
        *self.meta.write().expect("raft meta lock") = meta;
        Ok(())
    }

    /// Discards the log up to `index` (applied), keeping `data`, the state
    /// machine's snapshot at `index`, for followers that fall behind.
    pub fn compact(&self, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut meta = self.meta.read().expect("raft meta lock").clone();
        let first = meta.snapshot.index + 1;
        if index < first || index > meta.last_index {
            return Err(StoreError::CompactRange { index, first, last: meta.last_index });
        }
        let term = raft::Storage::term(self, index).map_err(|e| StoreError::Db(e.to_string()))?;
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut entries = tx.open_table(ENTRIES).map_err(dberr)?;
            let mut m = tx.open_table(META).map_err(dberr)?;
            entries.retain_in(..=index, |_, _| false).map_err(dberr)?;
            let mut md = SnapshotMetadata { index, term, ..Default::default() };
            md.set_conf_state(meta.conf_state.clone());
            m.insert(SNAPSHOT_META, md.write_to_bytes().map_err(dberr)?.as_slice()).map_err(dberr)?;
            m.insert(SNAPSHOT_DATA, data).map_err(dberr)?;
            meta.snapshot = md;
        }
        tx.commit().map_err(dberr)?;
        *self.meta.write().expect("raft meta lock") = meta;
        Ok(())
    }

    pub fn hard_state(&self) -> HardState {
        self.meta.read().expect("raft meta lock").hard_state.clone()
    }

    fn read_entry(&self, index: u64) -> Result<Option<Entry>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(ENTRIES).map_err(dberr)?;
        match t.get(index).map_err(dberr)? {
            Some(v) => Entry::parse_from_bytes(v.value()).map(Some).map_err(|_| StoreError::Corrupt("log entry")),
            None => Ok(None),
        }
    }
}

impl raft::Storage for RedbStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let m = self.meta.read().expect("raft meta lock");
        Ok(RaftState { hard_state: m.hard_state.clone(), conf_state: m.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.meta.read().expect("raft meta lock").check_range(low, high)?;
        let tx = self.db.begin_read().map_err(|e| to_raft(dberr(e)))?;
        let t = tx.open_table(ENTRIES).map_err(|e| to_raft(dberr(e)))?;
        let mut out = Vec::with_capacity((high - low) as usize);
        for item in t.range(low..high).map_err(|e| to_raft(dberr(e)))? {
            let (_, v) = item.map_err(|e| to_raft(dberr(e)))?;
            out.push(Entry::parse_from_bytes(v.value()).map_err(|_| to_raft(StoreError::Corrupt("log entry")))?);
        }
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if let Some(answer) = self.meta.read().expect("raft meta lock").term_outside_log(idx) {
            return answer;
        }
        match self.read_entry(idx).map_err(to_raft)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.meta.read().expect("raft meta lock").snapshot.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.meta.read().expect("raft meta lock").last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let md = self.meta.read().expect("raft meta lock").snapshot.clone();
        if md.index < request_index {
            // The driver compacts (and so snapshots) as it applies; a newer
            // one will exist soon.
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let tx = self.db.begin_read().map_err(|e| to_raft(dberr(e)))?;
        let m = tx.open_table(META).map_err(|e| to_raft(dberr(e)))?;
        let data = m.get(SNAPSHOT_DATA).map_err(|e| to_raft(dberr(e)))?.map(|v| v.value().to_vec()).unwrap_or_default();
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        snap.set_metadata(md);
        Ok(snap)
    }
}

/// The log in memory, with [`RedbStorage`]'s contract. Clones share one log:
/// the simulator keeps a clone as the server's disk, so a crashed server
/// restarts from what it had persisted.
#[derive(Clone, Default)]
pub struct MemoryStorage {
    inner: Arc<RwLock<MemoryLog>>,
}

#[derive(Default)]
struct MemoryLog {
    meta: Meta,
    /// Entries after the snapshot, the first at `meta.snapshot.index + 1`.
    entries: Vec<Entry>,
    snapshot_data: Vec<u8>,
}

impl MemoryStorage {
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, MemoryLog> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MemoryLog> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl LogStore for MemoryStorage {
    fn persist(&self, p: Persist<'_>) -> Result<(), StoreError> {
        let mut log = self.write();
        if let Some(snap) = p.snapshot {
            let md = snap.get_metadata();
            log.entries.clear();
            log.snapshot_data = snap.get_data().to_vec();
            log.meta.snapshot = md.clone();
            log.meta.conf_state = md.get_conf_state().clone();
            log.meta.last_index = md.index;
            if log.meta.hard_state.commit < md.index {
                log.meta.hard_state.commit = md.index;
                log.meta.hard_state.term = log.meta.hard_state.term.max(md.term);
            }
        }
        if let Some(first) = p.entries.first() {
            let offset = log.meta.snapshot.index + 1;
            if first.index < offset {
                return Err(StoreError::CompactRange { index: first.index, first: offset, last: log.meta.last_index });
            }
            let keep = ((first.index - offset) as usize).min(log.entries.len());
            log.entries.truncate(keep);
            log.entries.extend_from_slice(p.entries);
            log.meta.last_index = p.entries.last().map_or(log.meta.last_index, |e| e.index);
        }
        if let Some(hs) = p.hard_state {
            log.meta.hard_state = hs.clone();
        }
        if let Some(cs) = p.conf_state {
            log.meta.conf_state = cs.clone();
        }
        Ok(())
    }

    fn compact(&self, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut log = self.write();
        let first = log.meta.snapshot.index + 1;
        if index < first || index > log.meta.last_index {
            return Err(StoreError::CompactRange { index, first, last: log.meta.last_index });
        }
        let term = log.entries[(index - first) as usize].term;
        log.entries.drain(..=(index - first) as usize);
        let mut md = SnapshotMetadata { index, term, ..Default::default() };
        md.set_conf_state(log.meta.conf_state.clone());
        log.meta.snapshot = md;
        log.snapshot_data = data.to_vec();
        Ok(())
    }

    fn hard_state(&self) -> HardState {
        self.read().meta.hard_state.clone()
    }
}

impl raft::Storage for MemoryStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let log = self.read();
        Ok(RaftState { hard_state: log.meta.hard_state.clone(), conf_state: log.meta.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let log = self.read();
        log.meta.check_range(low, high)?;
        let first = log.meta.snapshot.index + 1;
        let mut out = log.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let log = self.read();
        if let Some(answer) = log.meta.term_outside_log(idx) {
            return answer;
        }
        Ok(log.entries[(idx - log.meta.snapshot.index - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().meta.snapshot.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().meta.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let log = self.read();
        if log.meta.snapshot.index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let mut snap = Snapshot::default();
        snap.set_data(log.snapshot_data.clone().into());
        snap.set_metadata(log.meta.snapshot.clone());
        Ok(snap)
    }
}
