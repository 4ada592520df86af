//! The snapshot archive (Raft snapshots and operator backups): a state
//! comes back exactly; any altered or cut byte is refused; a large state
//! spans many chunks.

use cluster_core::command::{Command, Effect};
use cluster_core::diag::SourceFile;
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::ClusterState;
use cluster_core::state::archive::{self, ArchiveError};

/// `nodes` nodes and `jobs` service jobs of `count` small instances each,
/// placed.
fn state(nodes: u32, jobs: u32, count: u32) -> ClusterState {
    let fleet =
        format!("[fleet]\nname = \"f\"\n[[class]]\nname = \"m\"\ncount = {nodes}\ncpu = 64\nmemory = \"256GiB\"\n");
    let mut s = ClusterState::new();
    for n in parse_fleet(&SourceFile::new("f.toml", fleet)).value.unwrap().nodes {
        s.apply(&Command::UpsertNode(n));
    }
    for j in 0..jobs {
        place(&mut s, j, count);
    }
    s
}

fn place(s: &mut ClusterState, j: u32, count: u32) {
    let text = format!(
        "[job]\nname = \"web{j}\"\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"10m\", memory = \"16MiB\" }}\n"
    );
    let job = parse_job(&SourceFile::new("j.toml", text)).value.unwrap();
    let Effect::JobRegistered { eval, .. } = s.apply(&Command::RegisterJob(job.clone())) else {
        panic!("not registered")
    };
    let plan = schedule(s, s.job(&job.id).unwrap(), &SchedulerConfig::default());
    s.apply(&Command::ApplyPlans(vec![(eval, plan)]));
    assert_eq!(s.allocs_of_job(&job.id).count() as u32, count, "the job did not place");
}

#[test]
fn a_state_comes_back_byte_for_byte() {
    let state = state(3, 1, 5);
    let bytes = archive::to_vec(&state, 42, 7, vec![(1, "127.0.0.1:4647".parse().unwrap())], 1);
    let (summary, back) = archive::read(bytes.as_slice()).unwrap();
    assert_eq!(back.snapshot(), state.snapshot());
    assert_eq!((summary.header.index, summary.header.term), (42, 7));
    assert_eq!(summary.bytes, bytes.len() as u64);
    assert_eq!(summary.header.counts, archive::counts(&state));
    assert_eq!((summary.header.counts.nodes, summary.header.counts.allocations), (3, 5));
    assert_eq!(archive::inspect(bytes.as_slice()).unwrap(), summary);
}

#[test]
fn every_flipped_byte_and_every_cut_is_refused() {
    let bytes = archive::to_vec(&state(2, 1, 3), 1, 1, vec![], 0);
    for at in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        assert!(archive::read(bad.as_slice()).is_err(), "a flip at byte {at} of {} went unnoticed", bytes.len());
    }
    for len in 0..bytes.len() {
        assert!(archive::inspect(&bytes[..len]).is_err(), "a cut at {len} went unnoticed");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(archive::inspect(longer.as_slice()).is_err());
    assert!(matches!(archive::inspect(&b"{\"jobs\": []}"[..]), Err(ArchiveError::NotAnArchive)));
    assert!(matches!(archive::inspect(&b""[..]), Err(ArchiveError::NotAnArchive)));
}

#[test]
fn a_large_state_spans_many_chunks() {
    let state = state(50, 8, 10_000);
    let bytes = archive::to_vec(&state, 1, 1, vec![], 0);
    let (summary, back) = archive::read(bytes.as_slice()).unwrap();
    assert_eq!(back.snapshot(), state.snapshot());
    assert_eq!(summary.header.counts.allocations, 80_000);
    // The first chunk's length, read after the header, is not all the rest.
    let head = u32::from_be_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let first = u32::from_be_bytes(bytes[16 + head..20 + head].try_into().unwrap()) as usize;
    assert!(20 + head + first + 4 + 32 < bytes.len(), "one chunk held everything: {first} of {}", bytes.len());
}

/// A restore through the log: pieces, then `Restore`; a missing piece is
/// refused with the state unchanged; a `Restore` applied twice (a retry)
/// answers the same and changes nothing more; ids already handed out are
/// never handed out again.
#[test]
fn a_restore_replaces_the_state_only_when_every_piece_arrived() {
    let backup = state(2, 1, 3);
    let bytes = archive::to_vec(&backup, 10, 2, vec![], 0);
    let pieces: Vec<&[u8]> = bytes.chunks(bytes.len() / 3 + 1).collect();
    assert_eq!(pieces.len(), 3);
    let mut live = state(4, 2, 5);
    let before = live.snapshot();
    for (seq, piece) in pieces.iter().enumerate().filter(|(seq, _)| *seq != 1) {
        live.apply(&Command::RestoreChunk { id: 7, seq: seq as u32, bytes: piece.to_vec() });
    }
    let Effect::Refused(why) = live.apply(&Command::Restore { id: 7, chunks: 3 }) else { panic!("restored") };
    assert!(why.contains("(2) do not make the 3"), "{why}");
    assert_eq!(live.snapshot(), before, "a refused restore left something behind");

    for (seq, piece) in pieces.iter().enumerate() {
        live.apply(&Command::RestoreChunk { id: 8, seq: seq as u32, bytes: piece.to_vec() });
    }
    let Effect::Restored(counts) = live.apply(&Command::Restore { id: 8, chunks: 3 }) else { panic!("refused") };
    assert_eq!((counts.jobs, counts.allocations, counts.nodes), (1, 3, 2));
    let after = live.snapshot();
    assert_eq!(live.apply(&Command::Restore { id: 8, chunks: 3 }), Effect::Restored(counts));
    assert_eq!(live.snapshot(), after, "a retried restore changed the state");
    // The live state had handed out 10 allocation ids; the backup 3.
    let highest = state(4, 2, 5).allocs().map(|a| a.id).max().unwrap();
    place_more(&mut live);
    assert!(live.allocs().all(|a| a.id > highest || backup.alloc(a.id).is_some()), "an allocation id was reused");
}

fn place_more(s: &mut ClusterState) {
    place(s, 9, 2);
}
