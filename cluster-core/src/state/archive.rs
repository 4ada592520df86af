//! The snapshot archive: a cluster's whole state as a stream, for Raft
//! snapshots sent to lagging or new servers and for operator backups
//! (`hanse operator snapshot save|inspect|restore`).
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! "HANSESNP"  u32 format  u32 header-len  header (codec: ArchiveHeader)
//! { u32 chunk-len  chunk (zstd frame of items) }*   u32 0
//! sha256 of every byte before it (32 bytes)
//! ```
//!
//! A chunk holds about [`CHUNK_RAW_BYTES`] of items, each a `u32` length and
//! a codec-encoded [`Item`]. Writing and reading hold one chunk at a time,
//! never the state twice: [`read`] builds the state item by item. The
//! header's counts are checked against what the body held, and the digest
//! against the bytes, so a truncated or altered file is refused, never half
//! applied. Where chunked, checksummed snapshots come from: etcd's and
//! Consul's snapshot files (`etcdctl snapshot save`, `consul snapshot`).

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ClusterState, GcObject, Held};
use crate::codec;
use crate::ids::JobId;
use crate::model::alloc::Allocation;
use crate::model::eval::Evaluation;
use crate::model::job::Job;
use crate::model::node::Node;

/// The first bytes of every archive.
pub const MAGIC: &[u8; 8] = b"HANSESNP";
/// The layout version this build writes and reads.
pub const FORMAT: u32 = 1;
/// Items are gathered into chunks of about this many bytes before
/// compression (a chunk exceeds it by at most one item).
pub const CHUNK_RAW_BYTES: usize = 1 << 20;
/// The largest header or compressed chunk a reader accepts.
const PART_BYTES_MAX: usize = codec::DECODE_BYTES_MAX;

/// What an archive says of itself, before its body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveHeader {
    /// The cluster it was saved from (empty in Raft snapshots).
    pub cluster: String,
    /// The Raft index the state includes every entry up to (it may hold a
    /// few more), and that index's term (0 when unknown).
    pub index: u64,
    pub term: u64,
    /// Every voter's Raft id and transport address when it was written.
    pub peers: Vec<(u64, SocketAddr)>,
    /// Unix milliseconds when it was written.
    pub created_ms: u64,
    pub counts: TableCounts,
}

/// Objects per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCounts {
    pub nodes: u64,
    pub jobs: u64,
    pub allocations: u64,
    pub evaluations: u64,
    pub holds: u64,
    pub records: u64,
    pub acl_tokens: u64,
    pub acl_policies: u64,
    pub gc_marks: u64,
}

/// What [`write`] wrote or [`inspect`] found: the header, the archive's
/// size in bytes and its sha256 (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ArchiveSummary {
    pub header: ArchiveHeader,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("reading the snapshot: {0}")]
    Io(#[from] io::Error),
    #[error("not a Hanse snapshot (it does not start with `HANSESNP`)")]
    NotAnArchive,
    #[error("snapshot format {0} is not known (this build reads format {FORMAT})")]
    UnknownFormat(u32),
    #[error("the snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("the snapshot is truncated (it ends before its checksum)")]
    Truncated,
    #[error("the snapshot's checksum does not match its contents: it was altered or damaged")]
    Checksum,
}

/// One object of the state, in the order [`write`] puts them: counters
/// and ACL first, nodes before anything placed on them.
#[derive(Serialize, Deserialize)]
pub(super) enum Item {
    Counters {
        next_alloc: u64,
        next_eval: u64,
    },
    Acl(crate::acl::AclState),
    Node(Node),
    Job(Job),
    /// Boxed as the state keeps it (the encoding is the same).
    Alloc(Box<Allocation>),
    Eval(Evaluation),
    Hold(String, Held),
    Record(String, Vec<u8>),
    GcMark(GcObject, u64),
    History(JobId, super::JobHistory),
}

/// The table counts of `state`.
pub fn counts(state: &ClusterState) -> TableCounts {
    let (acl_tokens, acl_policies) = state.acl.counts();
    TableCounts {
        nodes: state.nodes.len() as u64,
        jobs: state.jobs.len() as u64,
        allocations: state.allocs.len() as u64,
        evaluations: state.evals.len() as u64,
        holds: state.holds.len() as u64,
        records: state.records.len() as u64,
        acl_tokens: acl_tokens as u64,
        acl_policies: acl_policies as u64,
        gc_marks: state.gc_marks.len() as u64,
    }
}

/// A writer that hashes what passes through and counts it.
struct Hashed<W> {
    inner: W,
    digest: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Gathers items into one raw chunk and writes it compressed when full.
struct Chunker<'a, W: Write> {
    out: &'a mut Hashed<W>,
    raw: Vec<u8>,
}

impl<W: Write> Chunker<'_, W> {
    fn push(&mut self, item: &Item) -> io::Result<()> {
        let body = codec::encode(item);
        self.raw.extend_from_slice(&(body.len() as u32).to_be_bytes());
        self.raw.extend_from_slice(&body);
        if self.raw.len() >= CHUNK_RAW_BYTES { self.flush_chunk() } else { Ok(()) }
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let packed = zstd::bulk::compress(&self.raw, 1)?;
        self.out.write_all(&(packed.len() as u32).to_be_bytes())?;
        self.out.write_all(&packed)?;
        self.raw.clear();
        Ok(())
    }
}

/// Writes `state` to `out` as an archive whose header names the
/// `cluster` it comes from (empty in Raft snapshots), `index`, `term` and
/// `peers`. Two servers that applied the same log write the same body.
/// Errors: only `out`'s.
pub fn write<W: Write>(
    state: &ClusterState,
    cluster: String,
    index: u64,
    term: u64,
    peers: Vec<(u64, SocketAddr)>,
    created_ms: u64,
    out: W,
) -> io::Result<ArchiveSummary> {
    let header = ArchiveHeader { cluster, index, term, peers, created_ms, counts: counts(state) };
    let mut out = Hashed { inner: out, digest: Sha256::new(), bytes: 0 };
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT.to_be_bytes())?;
    let head = codec::encode(&header);
    out.write_all(&(head.len() as u32).to_be_bytes())?;
    out.write_all(&head)?;
    let mut chunks = Chunker { out: &mut out, raw: Vec::with_capacity(CHUNK_RAW_BYTES + 4096) };
    chunks.push(&Item::Counters { next_alloc: state.next_alloc, next_eval: state.next_eval })?;
    chunks.push(&Item::Acl(state.acl.clone()))?;
    // Items are encoded from clones one at a time: the archive never holds
    // more than a chunk of them.
    for n in &state.nodes {
        chunks.push(&Item::Node(n.clone()))?;
    }
    for j in state.jobs.values() {
        chunks.push(&Item::Job(j.clone()))?;
    }
    for a in state.allocs.values() {
        chunks.push(&Item::Alloc(a.clone()))?;
    }
    for e in state.evals.values() {
        chunks.push(&Item::Eval(e.clone()))?;
    }
    for (k, h) in &state.holds {
        chunks.push(&Item::Hold(k.clone(), h.clone()))?;
    }
    for (k, r) in &state.records {
        chunks.push(&Item::Record(k.clone(), r.clone()))?;
    }
    for (o, at) in &state.gc_marks {
        chunks.push(&Item::GcMark(o.clone(), *at))?;
    }
    for (j, h) in &state.histories {
        chunks.push(&Item::History(j.clone(), h.clone()))?;
    }
    chunks.flush_chunk()?;
    out.write_all(&0u32.to_be_bytes())?;
    let digest: [u8; 32] = out.digest.clone().finalize().into();
    out.inner.write_all(&digest)?;
    out.flush()?;
    Ok(ArchiveSummary { header, bytes: out.bytes + 32, sha256: hex(&digest) })
}

/// [`write`] into memory, naming no cluster (a Raft snapshot).
pub fn to_vec(state: &ClusterState, index: u64, term: u64, peers: Vec<(u64, SocketAddr)>, created_ms: u64) -> Vec<u8> {
    let mut out = Vec::new();
    write(state, String::new(), index, term, peers, created_ms, &mut out).expect("writing to memory does not fail");
    out
}

/// Whether `bytes` start like an archive.
pub fn is_archive(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader that hashes what it yields.
struct Hashing<R> {
    inner: R,
    digest: Sha256,
    bytes: u64,
}

impl<R: Read> Hashing<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), ArchiveError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ArchiveError::Truncated,
            _ => ArchiveError::Io(e),
        })?;
        self.digest.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, ArchiveError> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn part(&mut self, what: &str) -> Result<Vec<u8>, ArchiveError> {
        let len = self.u32()? as usize;
        if len > PART_BYTES_MAX {
            return Err(ArchiveError::Corrupt(format!(
                "a {what} of {len} bytes is over the limit of {PART_BYTES_MAX}"
            )));
        }
        let mut buf = vec![0u8; len];
        self.exact(&mut buf)?;
        Ok(buf)
    }
}

/// Reads an archive's body item by item, handing each to `each`; checks
/// the counts and the digest at the end. Errors: see [`ArchiveError`].
fn scan<R: Read>(
    input: R,
    mut each: impl FnMut(Item) -> Result<(), ArchiveError>,
) -> Result<ArchiveSummary, ArchiveError> {
    let mut r = Hashing { inner: input, digest: Sha256::new(), bytes: 0 };
    let mut magic = [0u8; 8];
    r.exact(&mut magic)
        .map_err(|e| if matches!(e, ArchiveError::Truncated) { ArchiveError::NotAnArchive } else { e })?;
    if &magic != MAGIC {
        return Err(ArchiveError::NotAnArchive);
    }
    let format = r.u32()?;
    if format != FORMAT {
        return Err(ArchiveError::UnknownFormat(format));
    }
    let header: ArchiveHeader =
        codec::decode(&r.part("header")?, PART_BYTES_MAX).map_err(|e| ArchiveError::Corrupt(format!("header: {e}")))?;
    let mut seen = TableCounts::default();
    loop {
        let chunk = r.part("chunk")?;
        if chunk.is_empty() {
            break;
        }
        let raw = zstd::bulk::decompress(&chunk, PART_BYTES_MAX)
            .map_err(|e| ArchiveError::Corrupt(format!("a chunk does not decompress: {e}")))?;
        let mut rest = raw.as_slice();
        while !rest.is_empty() {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return Err(ArchiveError::Corrupt("a chunk ends inside an item's length".into()));
            };
            let len = u32::from_be_bytes(*len) as usize;
            if len > tail.len() {
                return Err(ArchiveError::Corrupt("a chunk ends inside an item".into()));
            }
            let item: Item = codec::decode(&tail[..len], PART_BYTES_MAX)
                .map_err(|e| ArchiveError::Corrupt(format!("an item: {e}")))?;
            count(&mut seen, &item);
            each(item)?;
            rest = &tail[len..];
        }
    }
    let digest: [u8; 32] = r.digest.clone().finalize().into();
    let mut stored = [0u8; 32];
    r.inner.read_exact(&mut stored).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ArchiveError::Truncated,
        _ => ArchiveError::Io(e),
    })?;
    if stored != digest {
        return Err(ArchiveError::Checksum);
    }
    if r.inner.read(&mut [0u8; 1])? != 0 {
        return Err(ArchiveError::Corrupt("bytes follow the checksum".into()));
    }
    let (mut want, mut got) = (header.counts, seen);
    // Tokens and policies are counted from the ACL item, not one by one.
    (want.acl_tokens, want.acl_policies, got.acl_tokens, got.acl_policies) = (0, 0, 0, 0);
    if want != got {
        return Err(ArchiveError::Corrupt(format!("the header counts {want:?}, the body holds {got:?}")));
    }
    Ok(ArchiveSummary { header, bytes: r.bytes + 32, sha256: hex(&digest) })
}

fn count(c: &mut TableCounts, item: &Item) {
    match item {
        Item::Counters { .. } | Item::Acl(_) => {}
        Item::Node(_) => c.nodes += 1,
        Item::Job(_) => c.jobs += 1,
        Item::Alloc(_) => c.allocations += 1,
        Item::Eval(_) => c.evaluations += 1,
        Item::Hold(..) => c.holds += 1,
        Item::Record(..) => c.records += 1,
        Item::GcMark(..) => c.gc_marks += 1,
        Item::History(..) => {}
    }
}

/// Checks a whole archive (format, counts, checksum) without building
/// its state: what `hanse operator snapshot inspect` prints.
pub fn inspect<R: Read>(input: R) -> Result<ArchiveSummary, ArchiveError> {
    scan(input, |_| Ok(()))
}

/// Builds the state an archive holds, item by item. The state is only
/// returned once the checksum matched.
pub fn read<R: Read>(input: R) -> Result<(ArchiveSummary, ClusterState), ArchiveError> {
    let mut build = Builder::default();
    let summary = scan(input, |item| build.add(item).map_err(ArchiveError::Corrupt))?;
    Ok((summary, build.finish()))
}

/// Where [`Command::RestoreChunk`]s are kept, among the records.
///
/// [`Command::RestoreChunk`]: crate::command::Command::RestoreChunk
pub const RESTORE_PREFIX: &str = "restore/";
/// The record naming the last restore applied, so that a `Restore`
/// retried after a lost answer is answered again, not refused.
const RESTORE_LAST: &str = "restore-last";
/// Records a restore keeps from the running cluster rather than take
/// from the archive: the federation's gossip keyring, so that a backup
/// never brings back a key removed since it was made; this cluster's
/// incarnation as a delegation origin, so that a backup restored into a
/// cluster rebuilt on empty disks is the new incarnation, whose floors
/// peers take; and the floors peers promised (a promise holds whatever
/// this cluster's state), so that tombstones the backup predates stay
/// replaced by them.
pub const RESTORE_KEEPS: &[&str] = &["gossip/", "federation/incarnation", "inbound-floor/"];

fn restore_key(id: u64, seq: u32) -> String {
    format!("{RESTORE_PREFIX}{id:016x}/{seq:08x}")
}

impl ClusterState {
    /// Keeps piece `seq` of restore `id`; piece 0 drops every other
    /// restore's pieces (one restore at a time).
    pub(crate) fn stage_restore(&mut self, id: u64, seq: u32, bytes: &[u8]) {
        if seq == 0 {
            self.records.retain(|k, _| !k.starts_with(RESTORE_PREFIX));
        }
        self.records.insert(restore_key(id, seq), bytes.to_vec());
    }

    /// Replaces the state with the archive that restore `id`'s `chunks`
    /// pieces make, and drops the pieces either way. Kept from the running
    /// state: the allocation and evaluation counters where higher (an id
    /// an agent still knows is never given again), the [`RESTORE_KEEPS`]
    /// records, and the ACL's bootstrapped flag (a backup from before
    /// bootstrap must not open it again). Refused, with the rest of the
    /// state unchanged, when a piece is missing or the archive does not
    /// read back whole; the restore must then be sent again. Every replica
    /// decides the same: the bytes are in the log.
    pub fn restore_archive(&mut self, id: u64, chunks: u32) -> crate::command::Effect {
        use crate::command::Effect;
        if self.records.get(RESTORE_LAST).is_some_and(|r| *r == id.to_be_bytes()) {
            return Effect::Restored(counts(self));
        }
        let prefix = format!("{RESTORE_PREFIX}{id:016x}/");
        let keys: Vec<String> = self.records(&prefix).map(|(k, _)| k.clone()).collect();
        let whole =
            keys.len() == chunks as usize && keys.iter().enumerate().all(|(i, k)| *k == restore_key(id, i as u32));
        let mut bytes = Vec::new();
        for k in &keys {
            if let Some(piece) = self.records.remove(k) {
                bytes.extend_from_slice(&piece);
            }
        }
        if !whole {
            return Effect::Refused(format!(
                "restore {id:016x}: the pieces logged ({}) do not make the {chunks} announced; send the snapshot again",
                keys.len()
            ));
        }
        let mut new = match read(bytes.as_slice()) {
            Ok((_, new)) => new,
            Err(e) => return Effect::Refused(format!("restore {id:016x}: {e}")),
        };
        new.next_alloc = new.next_alloc.max(self.next_alloc);
        new.next_eval = new.next_eval.max(self.next_eval);
        new.records.retain(|k, _| !k.starts_with(RESTORE_PREFIX) && !RESTORE_KEEPS.iter().any(|p| k.starts_with(p)));
        for keep in RESTORE_KEEPS {
            new.records.extend(self.records(keep).map(|(k, v)| (k.clone(), v.clone())));
        }
        new.records.insert(RESTORE_LAST.into(), id.to_be_bytes().to_vec());
        new.acl.keep_bootstrapped(self.acl.bootstrapped());
        new.applied_at = self.applied_at;
        // Capacity may have changed everywhere: blocked work is tried again.
        new.capacity_epoch = self.capacity_epoch + 1;
        *self = new;
        Effect::Restored(counts(self))
    }
}

/// A state rebuilt from its items, indexes included.
#[derive(Default)]
pub(super) struct Builder {
    state: ClusterState,
    /// Whether nodes are complete (and the cost ranges computed).
    nodes_done: bool,
}

impl Builder {
    pub(super) fn add(&mut self, item: Item) -> Result<(), String> {
        let s = &mut self.state;
        if !matches!(item, Item::Node(_) | Item::Counters { .. } | Item::Acl(_)) && !self.nodes_done {
            s.refresh_ranges();
            self.nodes_done = true;
        }
        match item {
            Item::Counters { next_alloc, next_eval } => {
                s.next_alloc = next_alloc;
                s.next_eval = next_eval;
            }
            Item::Acl(mut acl) => {
                acl.reindex();
                s.acl = acl;
            }
            Item::Node(node) => {
                if self.nodes_done {
                    return Err(format!("node {} comes after the nodes", node.id));
                }
                s.insert_node(node).map_err(|e| e.to_string())?;
            }
            Item::Job(job) => {
                s.jobs.insert(job.id.clone(), job);
            }
            Item::Alloc(alloc) => s.insert_restored_alloc(alloc),
            Item::Eval(eval) => {
                s.index_eval(&eval);
                s.evals.insert(eval.id, eval);
            }
            Item::Hold(k, h) => {
                s.holds.insert(k, h);
            }
            Item::Record(k, r) => {
                s.records.insert(k, r);
            }
            Item::GcMark(o, at) => {
                s.gc_marks.insert(o, at);
            }
            Item::History(j, h) => {
                s.histories.insert(j, h);
            }
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> ClusterState {
        if !self.nodes_done {
            self.state.refresh_ranges();
        }
        self.state
    }
}
