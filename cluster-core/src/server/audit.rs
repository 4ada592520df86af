//! The audit trail: one JSON line per write this server received, allowed
//! or denied, and per peer offer it decided: when, who (the token's
//! accessor, never its secret), from where, what, and the outcome. It is
//! the evidence an auditor asks for: who ran what, where, under which
//! token.
//!
//! Lines go to `audit.log` in the server's audit directory (0700, files
//! 0600), rotated at [`FILE_BYTES_MAX`] into `audit.log.1` ..
//! `audit.log.N` ([`FILES_KEPT`]), so the trail takes at most about 40 MiB.
//! Without a directory (in-process clusters may have none) the latest
//! [`RING_MAX`] records are kept in memory. Recording never fails a
//! request: a write error is logged (at most once a minute) and counted.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The size at which `audit.log` is rotated.
pub const FILE_BYTES_MAX: u64 = 8 << 20;
/// Rotated files kept besides the current one.
pub const FILES_KEPT: usize = 4;
/// Records kept in memory when there is no audit directory.
pub const RING_MAX: usize = 10_000;
/// The most records one read returns.
pub const READ_MAX: usize = 10_000;
/// The longest route or object kept in a record, in bytes.
pub const FIELD_BYTES_MAX: usize = 512;
/// Writes without a known token that were not carried out (denied,
/// abandoned) recorded per source address and minute; past it they are only counted ([`AuditLog::suppressed`]), so
/// nobody without a token can roll the trail over and erase it.
pub const ANONYMOUS_PER_MINUTE: u32 = 60;

/// One audited action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The server that received it (`cluster/server`).
    pub server: String,
    /// The client's address, for API requests.
    pub source: Option<String>,
    /// The token's accessor (none: no token, an unknown one, or ACLs off).
    pub accessor: Option<String>,
    /// The token's name, or why there is none.
    pub token: String,
    /// `PUT`, `POST`, `DELETE`; `OFFER` for a peer's delegation offer.
    pub method: String,
    /// The route as requested (`/v1/jobs/web`), or the delegation's id.
    pub route: String,
    /// What it acted on when the route does not say (a submitted job).
    pub object: Option<String>,
    /// The HTTP status answered (200 for a registered offer, 409 refused).
    pub status: u16,
    /// `allowed` (done), `denied` (401/403), or `failed` (refused or an error).
    pub outcome: String,
    /// For delegated work: the cluster that offered it.
    pub origin: Option<String>,
}

impl AuditRecord {
    /// The outcome word for an HTTP status.
    pub fn outcome_of(status: u16) -> &'static str {
        match status {
            401 | 403 => "denied",
            s if s < 400 => "allowed",
            _ => "failed",
        }
    }
}

struct Sink {
    file: Option<std::fs::File>,
    size: u64,
    last_error: Option<Instant>,
}

/// A server's audit trail (see the module docs).
pub struct AuditLog {
    dir: Option<PathBuf>,
    file_bytes_max: u64,
    sink: Mutex<Sink>,
    ring: Mutex<VecDeque<AuditRecord>>,
    /// Anonymous denials recorded this minute, by source address.
    anonymous: Mutex<(u64, std::collections::HashMap<String, u32>)>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl AuditLog {
    /// Opens (creating) the trail in `dir`, or one in memory for `None`.
    pub fn open(dir: Option<&Path>) -> std::io::Result<AuditLog> {
        Self::with_limit(dir, FILE_BYTES_MAX)
    }

    /// [`AuditLog::open`] with another rotation size (for tests).
    pub fn with_limit(dir: Option<&Path>, file_bytes_max: u64) -> std::io::Result<AuditLog> {
        if let Some(d) = dir {
            crate::private::private_dir(d)?;
        }
        let log = AuditLog {
            dir: dir.map(Path::to_path_buf),
            file_bytes_max,
            sink: Mutex::new(Sink { file: None, size: 0, last_error: None }),
            ring: Mutex::new(VecDeque::new()),
            anonymous: Mutex::new((0, std::collections::HashMap::new())),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        };
        Ok(log)
    }

    fn path(dir: &Path, n: usize) -> PathBuf {
        if n == 0 { dir.join("audit.log") } else { dir.join(format!("audit.log.{n}")) }
    }

    /// Anonymous denials not recorded (over [`ANONYMOUS_PER_MINUTE`]).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether an anonymous denial from `source` at `time_ms` is within
    /// its address's allowance.
    fn allowed(&self, source: &str, time_ms: u64) -> bool {
        let ip = source.rsplit_once(':').map_or(source, |(ip, _)| ip).to_string();
        let mut a = self.anonymous.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if a.0 != time_ms / 60_000 {
            *a = (time_ms / 60_000, std::collections::HashMap::new());
        }
        let n = a.1.entry(ip).or_default();
        *n += 1;
        *n <= ANONYMOUS_PER_MINUTE
    }

    /// Appends one record (long fields cut to [`FIELD_BYTES_MAX`]).
    pub fn record(&self, mut r: AuditRecord) {
        if r.accessor.is_none() && r.outcome != "allowed" {
            let source = r.source.clone().unwrap_or_default();
            if !self.allowed(&source, r.time_ms) {
                self.suppressed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
        for field in [Some(&mut r.route), r.object.as_mut()].into_iter().flatten() {
            if field.len() > FIELD_BYTES_MAX {
                let mut end = FIELD_BYTES_MAX;
                while !field.is_char_boundary(end) {
                    end -= 1;
                }
                field.truncate(end);
                field.push_str("...");
            }
        }
        let Some(dir) = &self.dir else {
            let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if ring.len() == RING_MAX {
                ring.pop_front();
            }
            ring.push_back(r);
            return;
        };
        let mut line = serde_json::to_vec(&r).expect("an audit record is JSON");
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = Self::append(dir, &mut sink, &line, self.file_bytes_max) {
            sink.file = None;
            if sink.last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                sink.last_error = Some(Instant::now());
                tracing::error!(error = %e, dir = %dir.display(), "cannot write the audit trail");
            }
        }
    }

    fn append(dir: &Path, sink: &mut Sink, line: &[u8], max: u64) -> std::io::Result<()> {
        if sink.file.is_some() && sink.size + line.len() as u64 > max {
            sink.file = None;
            for n in (0..FILES_KEPT).rev() {
                let from = Self::path(dir, n);
                if from.exists() {
                    std::fs::rename(&from, Self::path(dir, n + 1))?;
                }
            }
        }
        if sink.file.is_none() {
            let path = Self::path(dir, 0);
            let mut o = std::fs::OpenOptions::new();
            o.create(true).append(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let file = o.open(&path)?;
            crate::private::private_file(&path)?;
            sink.size = file.metadata()?.len();
            sink.file = Some(file);
        }
        let file = sink.file.as_mut().expect("opened above");
        file.write_all(line)?;
        sink.size += line.len() as u64;
        Ok(())
    }

    /// Records at or after `since_ms`, oldest first: the latest `limit`
    /// (at most [`READ_MAX`]). Lines that do not parse are skipped.
    pub fn read(&self, since_ms: u64, limit: usize) -> Vec<AuditRecord> {
        let limit = limit.clamp(1, READ_MAX);
        let mut out: VecDeque<AuditRecord> = VecDeque::with_capacity(limit.min(1024));
        let mut keep = |r: AuditRecord| {
            if r.time_ms >= since_ms {
                if out.len() == limit {
                    out.pop_front();
                }
                out.push_back(r);
            }
        };
        match &self.dir {
            None => self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().for_each(keep),
            Some(dir) => {
                // Opened under the lock, so a rotation cannot move a file
                // between two opens; read after it, so writes go on.
                let files: Vec<std::fs::File> = {
                    let _sink = self.sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    (0..=FILES_KEPT).rev().filter_map(|n| std::fs::File::open(Self::path(dir, n)).ok()).collect()
                };
                for file in files {
                    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
                        if let Ok(r) = serde_json::from_str::<AuditRecord>(&line) {
                            keep(r);
                        }
                    }
                }
            }
        }
        out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> AuditRecord {
        AuditRecord {
            time_ms: i,
            server: "c/s1".into(),
            source: Some("127.0.0.1:1".into()),
            accessor: Some("a0".into()),
            token: "ci".into(),
            method: "PUT".into(),
            route: format!("/v1/jobs/{i}"),
            object: None,
            status: 401,
            outcome: "denied".into(),
            origin: None,
        }
    }

    #[test]
    fn the_trail_rotates_within_its_bound_and_reads_back_in_order() {
        let dir = std::env::temp_dir().join(format!("hanse-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = AuditLog::with_limit(Some(&dir), 2_000).unwrap();
        for i in 0..200 {
            log.record(record(i));
        }
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(files.len(), FILES_KEPT + 1, "the current file and {FILES_KEPT} rotated ones");
        for f in &files {
            let meta = f.metadata().unwrap();
            assert!(meta.len() <= 2_000, "{:?} is {} bytes", f.path(), meta.len());
            assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);
        }
        let back = log.read(0, 10_000);
        let times: Vec<u64> = back.iter().map(|r| r.time_ms).collect();
        assert!(times.windows(2).all(|w| w[1] == w[0] + 1), "in order, with no gap: {times:?}");
        assert_eq!(times.last(), Some(&199), "the latest is kept");
        assert_eq!(log.read(190, 10_000).len(), 10);
        assert_eq!(log.read(0, 3).iter().map(|r| r.time_ms).collect::<Vec<_>>(), [197, 198, 199]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn anonymous_denials_are_rate_limited_and_long_routes_cut() {
        let log = AuditLog::open(None).unwrap();
        for i in 0..(ANONYMOUS_PER_MINUTE as u64 + 40) {
            let mut r = record(60_000 + i);
            r.accessor = None;
            r.route = "/v1/".to_string() + &"x".repeat(100_000);
            log.record(r);
        }
        let kept = log.read(0, READ_MAX);
        assert_eq!(kept.len(), ANONYMOUS_PER_MINUTE as usize);
        assert_eq!(log.suppressed(), 40);
        assert!(kept.iter().all(|r| r.route.len() <= FIELD_BYTES_MAX + 3));
        // A token's denials are all kept, and the next minute starts afresh.
        let mut named = record(60_000);
        named.accessor = Some("a1".into());
        log.record(named);
        let mut later = record(120_000);
        later.accessor = None;
        log.record(later);
        assert_eq!(log.read(0, READ_MAX).len(), ANONYMOUS_PER_MINUTE as usize + 2);
    }

    #[test]
    fn without_a_directory_the_latest_are_kept_in_memory() {
        let log = AuditLog::open(None).unwrap();
        for i in 0..(RING_MAX as u64 + 5) {
            log.record(record(i));
        }
        let back = log.read(0, READ_MAX);
        assert_eq!(back.len(), READ_MAX.min(RING_MAX));
        assert_eq!(back.last().unwrap().time_ms, RING_MAX as u64 + 4);
    }
}
