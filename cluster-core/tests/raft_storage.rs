//! The redb-backed raft-rs log: raft's storage contract, durability across
//! reopening, compaction and installed snapshots, and a real RawNode
//! running on it.

use std::path::PathBuf;

use cluster_core::raft::storage::{LogStore, MemoryStorage, Persist, RedbStorage};
use protobuf::Message as _;
use raft::prelude::*;
use raft::{GetEntriesContext, StateRole, Storage, StorageError};

struct TempDb(PathBuf);

impl TempDb {
    fn new(name: &str) -> TempDb {
        let p = std::env::temp_dir().join(format!("hanse-raft-{}-{name}.redb", std::process::id()));
        let _ = std::fs::remove_file(&p);
        TempDb(p)
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    let mut e = Entry { index, term, ..Default::default() };
    e.set_data(data.to_vec().into());
    e
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn terms<S: LogStore>(s: &S, low: u64, high: u64) -> Vec<u64> {
    s.entries(low, high, None, ctx()).unwrap().iter().map(|e| e.term).collect()
}

/// The storage contract both stores keep: appends, reads, conflicts.
fn appends_reads_and_replaces<S: LogStore>(s: &S) {
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
    let first: Vec<Entry> = (1..=10).map(|i| entry(i, 1, b"x")).collect();
    s.persist(Persist { entries: &first, ..Default::default() }).unwrap();
    assert_eq!(s.last_index().unwrap(), 10);
    assert_eq!(terms(s, 3, 7), vec![1; 4]);
    assert_eq!(s.term(5).unwrap(), 1);
    // A new leader's entries from 6 on replace the old tail.
    let second: Vec<Entry> = (6..=8).map(|i| entry(i, 2, b"y")).collect();
    s.persist(Persist { entries: &second, ..Default::default() }).unwrap();
    assert_eq!(s.last_index().unwrap(), 8);
    assert_eq!(terms(s, 4, 9), vec![1, 1, 2, 2, 2]);
    assert!(matches!(s.term(9), Err(raft::Error::Store(StorageError::Unavailable))));
    assert!(s.entries(5, 10, None, ctx()).is_err(), "past the last index");
}

fn max_size_limits<S: LogStore>(s: &S) {
    let es: Vec<Entry> = (1..=10).map(|i| entry(i, 1, &[7u8; 1024])).collect();
    s.persist(Persist { entries: &es, ..Default::default() }).unwrap();
    assert_eq!(s.entries(1, 11, Some(1), ctx()).unwrap().len(), 1);
    assert_eq!(s.entries(1, 11, Some(3 * 1100), ctx()).unwrap().len(), 3);
    assert_eq!(s.entries(1, 11, None, ctx()).unwrap().len(), 10);
}

#[test]
fn everything_persisted_survives_reopening() {
    let db = TempDb::new("reopen");
    {
        let s = RedbStorage::open(&db.0).unwrap();
        let es: Vec<Entry> = (1..=5).map(|i| entry(i, 3, b"z")).collect();
        let hs = HardState { term: 3, vote: 2, commit: 4, ..Default::default() };
        let cs = ConfState::from((vec![1, 2, 3], vec![]));
        s.persist(Persist { entries: &es, hard_state: Some(&hs), conf_state: Some(&cs), ..Default::default() })
            .unwrap();
    }
    let s = RedbStorage::open(&db.0).unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (3, 2, 4));
    assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(s.last_index().unwrap(), 5);
    assert_eq!(terms(&s, 1, 6), vec![3; 5]);
}

fn compaction_keeps_the_snapshot<S: LogStore>(s: &S) {
    let es: Vec<Entry> = (1..=10).map(|i| entry(i, if i < 4 { 1 } else { 2 }, b"e")).collect();
    s.persist(Persist { entries: &es, ..Default::default() }).unwrap();
    s.compact(5, b"state at 5").unwrap();
    assert_eq!(s.first_index().unwrap(), 6);
    assert_eq!(s.term(5).unwrap(), 2, "the snapshot's term is kept");
    assert!(matches!(s.entries(3, 8, None, ctx()), Err(raft::Error::Store(StorageError::Compacted))));
    assert!(matches!(s.term(4), Err(raft::Error::Store(StorageError::Compacted))));
    let snap = s.snapshot(5, 2).unwrap();
    assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (5, 2));
    assert_eq!(snap.get_data(), b"state at 5");
    assert!(matches!(s.snapshot(8, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))));
    assert!(s.compact(3, b"older").is_err(), "cannot compact what is gone");
    assert!(s.compact(11, b"future").is_err(), "cannot compact past the log");
}

#[test]
fn compaction_keeps_the_snapshot_and_refuses_what_it_dropped() {
    let db = TempDb::new("compact");
    let s = RedbStorage::open(&db.0).unwrap();
    compaction_keeps_the_snapshot(&s);
    drop(s);
    let s = RedbStorage::open(&db.0).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (6, 10));
    assert_eq!(s.snapshot(5, 2).unwrap().get_data(), b"state at 5");
}

fn installed_snapshot_replaces<S: LogStore>(s: &S) {
    let es: Vec<Entry> = (1..=3).map(|i| entry(i, 1, b"old")).collect();
    s.persist(Persist { entries: &es, ..Default::default() }).unwrap();
    let mut snap = Snapshot::default();
    snap.set_data(b"leader state".to_vec().into());
    let md = snap.mut_metadata();
    md.index = 20;
    md.term = 3;
    md.set_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
    s.persist(Persist { snapshot: Some(&snap), ..Default::default() }).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 20));
    assert_eq!(s.term(20).unwrap(), 3);
    assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    assert!(s.hard_state().commit >= 20);
    let next = [entry(21, 3, b"new")];
    s.persist(Persist { entries: &next, ..Default::default() }).unwrap();
    assert_eq!(terms(s, 21, 22), vec![3]);
}

#[test]
fn appends_reads_and_replaces_conflicting_entries() {
    let db = TempDb::new("append");
    appends_reads_and_replaces(&RedbStorage::open(&db.0).unwrap());
    appends_reads_and_replaces(&MemoryStorage::new());
}

#[test]
fn max_size_limits_but_returns_at_least_one_entry() {
    let db = TempDb::new("size");
    max_size_limits(&RedbStorage::open(&db.0).unwrap());
    max_size_limits(&MemoryStorage::new());
}

#[test]
fn an_installed_snapshot_replaces_the_log() {
    let db = TempDb::new("install");
    installed_snapshot_replaces(&RedbStorage::open(&db.0).unwrap());
    installed_snapshot_replaces(&MemoryStorage::new());
}

#[test]
fn memory_storage_compacts_and_its_clones_share_one_log() {
    let disk = MemoryStorage::new();
    compaction_keeps_the_snapshot(&disk.clone());
    // The clone the server held is gone (a crash); the disk kept it all.
    assert_eq!((disk.first_index().unwrap(), disk.last_index().unwrap()), (6, 10));
    assert_eq!(disk.snapshot(5, 2).unwrap().get_data(), b"state at 5");
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Handles every Ready in the order raft-rs documents: snapshot, entries
/// and hard state persisted (one transaction), committed entries applied,
/// advance; then the light ready's commit and entries.
fn drive(node: &mut RawNode<RedbStorage>, applied: &mut Vec<Vec<u8>>) {
    let apply = |entries: Vec<Entry>, applied: &mut Vec<Vec<u8>>| {
        for e in entries {
            if e.get_entry_type() == EntryType::EntryNormal && !e.get_data().is_empty() {
                applied.push(e.get_data().to_vec());
            }
        }
    };
    while node.has_ready() {
        let mut rd = node.ready();
        let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
        let entries = rd.entries().clone();
        let hs = rd.hs().cloned();
        node.mut_store()
            .persist(Persist {
                snapshot: snapshot.as_ref(),
                entries: &entries,
                hard_state: hs.as_ref(),
                conf_state: None,
                lazy: false,
            })
            .unwrap();
        apply(rd.take_committed_entries(), applied);
        let mut light = node.advance(rd);
        if let Some(commit) = light.commit_index() {
            let mut hs = node.store().hard_state();
            hs.commit = commit;
            node.mut_store().persist(Persist { hard_state: Some(&hs), ..Default::default() }).unwrap();
        }
        apply(light.take_committed_entries(), applied);
        node.advance_apply();
    }
}

#[test]
fn a_raw_node_elects_itself_commits_and_recovers_on_redb() {
    let db = TempDb::new("rawnode");
    let config = Config { id: 1, election_tick: 10, heartbeat_tick: 3, ..Default::default() };
    let mut applied = Vec::new();
    {
        let store = RedbStorage::open(&db.0).unwrap();
        // Bootstrap a one-voter cluster.
        let cs = ConfState::from((vec![1], vec![]));
        store.persist(Persist { conf_state: Some(&cs), ..Default::default() }).unwrap();
        let mut node = RawNode::new(&config, store, &logger()).unwrap();
        node.campaign().unwrap();
        drive(&mut node, &mut applied);
        assert_eq!(node.raft.state, StateRole::Leader);
        for i in 0..20u8 {
            node.propose(vec![], vec![i; 3]).unwrap();
        }
        drive(&mut node, &mut applied);
        assert_eq!(applied.len(), 20);
        assert_eq!(applied[19], vec![19; 3]);
    }
    // Restart on the same file: the commit index and log are there; with
    // `applied` set from what was applied, RawNode starts without replay.
    let store = RedbStorage::open(&db.0).unwrap();
    let commit = store.hard_state().commit;
    assert!(commit >= 21, "20 proposals and the leader's empty entry, commit {commit}");
    let config = Config { applied: commit, ..config };
    let mut node = RawNode::new(&config, store, &logger()).unwrap();
    node.campaign().unwrap();
    let mut again = Vec::new();
    drive(&mut node, &mut again);
    assert_eq!(node.raft.state, StateRole::Leader);
    node.propose(vec![], b"after restart".to_vec()).unwrap();
    drive(&mut node, &mut again);
    assert_eq!(again, vec![b"after restart".to_vec()], "nothing applied twice, the new entry applied once");
}

#[test]
fn stored_entries_are_raft_protobuf() {
    let db = TempDb::new("proto");
    let s = RedbStorage::open(&db.0).unwrap();
    let e = entry(1, 1, b"payload");
    s.persist(Persist { entries: std::slice::from_ref(&e), ..Default::default() }).unwrap();
    let back = &s.entries(1, 2, None, ctx()).unwrap()[0];
    assert_eq!(back.write_to_bytes().unwrap(), e.write_to_bytes().unwrap());
}
