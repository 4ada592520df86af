//! The agent's disk hygiene: directories (with their logs) of allocations
//! that have ended are removed after a retention period, beyond a count,
//! and, oldest first, while the disk under the data directory is fuller
//! than a threshold. Defaults follow Nomad's client GC (`gc_interval` 1m,
//! `gc_max_allocs` 50, `gc_disk_usage_threshold` 80) and its servers'
//! `job_gc_threshold` (4 h: the time an ended allocation is kept).
//!
//! [`choose`] decides from times alone; [`collect`] does the IO. An
//! allocation still running is never collected: the caller passes only
//! ended ones.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::ids::AllocId;

/// When ended allocations' directories go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPolicy {
    /// How often the agent looks.
    pub interval: Duration,
    /// How long an ended allocation's directory is kept.
    pub retention: Duration,
    /// The most ended allocations kept, whatever their age.
    pub max_allocs: usize,
    /// Above this share of the disk under `data_dir` used, in percent,
    /// ended allocations go oldest first until it is below (100: never).
    pub disk_usage_threshold_pct: u8,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            interval: Duration::from_secs(60),
            retention: Duration::from_secs(4 * 60 * 60),
            max_allocs: 50,
            disk_usage_threshold_pct: 80,
        }
    }
}

/// Why an allocation's directory was collected, for `alloc logs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Ended longer ago than the retention.
    Retention,
    /// More ended allocations than `max_allocs`.
    Count,
    /// The disk was fuller than the threshold.
    Disk,
}

impl Why {
    pub fn describe(self) -> &'static str {
        match self {
            Why::Retention => "it ended longer ago than the agent's gc retention",
            Why::Count => "the agent keeps at most gc max_allocs ended allocations",
            Why::Disk => "the disk under the agent's data_dir was fuller than its gc disk_usage_threshold",
        }
    }
}

/// Which ended allocations to collect by age and count: `ended` maps each
/// to how long ago it ended. Oldest first; the rest of `ended`, oldest
/// first, is the order in which disk pressure takes more.
pub fn choose(ended: &BTreeMap<AllocId, Duration>, policy: &GcPolicy) -> (Vec<(AllocId, Why)>, Vec<AllocId>) {
    let mut by_age: Vec<(AllocId, Duration)> = ended.iter().map(|(id, ago)| (*id, *ago)).collect();
    // Oldest first; ids break ties, older ids first.
    by_age.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let over = by_age.len().saturating_sub(policy.max_allocs);
    let mut now = Vec::new();
    let mut later = Vec::new();
    for (i, (id, ago)) in by_age.into_iter().enumerate() {
        if ago >= policy.retention {
            now.push((id, Why::Retention));
        } else if i < over {
            now.push((id, Why::Count));
        } else {
            later.push(id);
        }
    }
    (now, later)
}

/// The share of the file system under `dir` in use, in percent (used over
/// used plus what is available to unprivileged users, as `df` counts).
pub fn disk_usage_pct(dir: &Path) -> Option<u8> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs(3) writes only into `s`; `path` is NUL-terminated.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let used = (s.f_blocks as u128).saturating_sub(s.f_bfree as u128);
    let total = used + s.f_bavail as u128;
    (total > 0).then(|| ((used * 100).div_ceil(total)).min(100) as u8)
}

/// Where an allocation's directory goes while it is removed: out of the
/// way at once (a rename), so that nothing started meanwhile writes into
/// what is being deleted. Not an allocation's name: no pass lists it as one.
pub fn trash(allocs_dir: &Path, id: AllocId) -> std::path::PathBuf {
    allocs_dir.join(format!(".gc-{id}"))
}

/// Moves `id`'s directory to its [`trash`] (over any left by a pass cut
/// short); `Ok(false)` if there is none.
pub fn claim_by_rename(allocs_dir: &Path, id: AllocId) -> std::io::Result<bool> {
    let bin = trash(allocs_dir, id);
    if std::fs::symlink_metadata(&bin).is_ok() {
        remove_tree(&bin)?;
    }
    match std::fs::rename(allocs_dir.join(id.to_string()), bin) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a directory tree without following a link inside it
/// (`remove_dir_all`). An agent that is not root may meet directories a
/// task made read-only (a module cache): it makes its own writable and
/// tries once more.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            writable(dir);
            std::fs::remove_dir_all(dir)
        }
        other => other,
    }
}

/// Gives the directories under `dir` (never through a link) u+rwx, where
/// this process may.
fn writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        writable(&entry.path());
    }
}

/// Removes what [`choose`] picked, then more from `later` while the disk
/// is over the threshold (`usage` reads it: [`disk_usage_pct`] in
/// production). Each directory is first `claim`ed: the caller checks,
/// under its own lock, that the allocation is still ended, moves the
/// directory to its [`trash`] ([`claim_by_rename`]) and notes why it
/// went; `Ok(false)` keeps it. Also removes trash a pass cut short left.
/// Returns what was removed, and why; a directory that cannot be removed
/// is logged and left (in the trash) for the next pass.
pub fn collect(
    allocs_dir: &Path,
    ended: &BTreeMap<AllocId, Duration>,
    policy: &GcPolicy,
    usage: &dyn Fn() -> Option<u8>,
    claim: &dyn Fn(AllocId, Why) -> std::io::Result<bool>,
) -> Vec<(AllocId, Why)> {
    for entry in std::fs::read_dir(allocs_dir).into_iter().flatten().flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(".gc-")) {
            if let Err(e) = remove_tree(&entry.path()) {
                tracing::warn!("cannot remove {}: {e}", entry.path().display());
            }
        }
    }
    let (now, later) = choose(ended, policy);
    let mut done = Vec::new();
    let mut remove = |id: AllocId, why: Why| match claim(id, why) {
        Ok(true) => {
            let dir = trash(allocs_dir, id);
            match remove_tree(&dir) {
                Ok(()) => done.push((id, why)),
                Err(e) => tracing::warn!(alloc = %id, "cannot remove {}: {e}", dir.display()),
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(alloc = %id, "cannot collect its directory: {e}"),
    };
    for (id, why) in now {
        remove(id, why);
    }
    for id in later {
        if usage().is_none_or(|pct| pct <= policy.disk_usage_threshold_pct) {
            break;
        }
        remove(id, Why::Disk);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(ages_s: &[(u64, u64)]) -> BTreeMap<AllocId, Duration> {
        ages_s.iter().map(|(id, s)| (AllocId(*id), Duration::from_secs(*s))).collect()
    }

    #[test]
    fn old_ones_and_those_over_the_count_go_oldest_first() {
        let policy = GcPolicy { retention: Duration::from_secs(100), max_allocs: 2, ..GcPolicy::default() };
        let (now, later) = choose(&ended(&[(1, 500), (2, 50), (3, 60), (4, 70), (5, 10)]), &policy);
        assert_eq!(now, vec![(AllocId(1), Why::Retention), (AllocId(4), Why::Count), (AllocId(3), Why::Count)]);
        assert_eq!(later, vec![AllocId(2), AllocId(5)]);
        let (now, later) = choose(&ended(&[(7, 5)]), &policy);
        assert!(now.is_empty() && later == vec![AllocId(7)]);
    }

    #[test]
    fn disk_pressure_takes_more_until_it_is_below_the_threshold() {
        let dir = std::env::temp_dir().join(format!("hanse-agent-gc-{}", std::process::id()));
        for id in 1..=4 {
            std::fs::create_dir_all(dir.join(AllocId(id).to_string()).join("logs")).unwrap();
        }
        let policy =
            GcPolicy { retention: Duration::from_secs(1_000), disk_usage_threshold_pct: 80, ..GcPolicy::default() };
        // The disk reads 95%, then 85%, then 75% as directories go.
        let left = std::cell::Cell::new(3u8);
        let usage = || {
            let n = left.get();
            left.set(n.saturating_sub(1));
            Some(65 + 10 * n)
        };
        let claim = |id, _| claim_by_rename(&dir, id);
        let done = collect(&dir, &ended(&[(1, 40), (2, 30), (3, 20), (4, 10)]), &policy, &usage, &claim);
        assert_eq!(done, vec![(AllocId(1), Why::Disk), (AllocId(2), Why::Disk)]);
        assert!(!dir.join("a000001").exists() && !dir.join("a000002").exists());
        assert!(dir.join("a000003").exists() && dir.join("a000004").exists());
        assert!(!trash(&dir, AllocId(1)).exists(), "nothing left in the trash");
        // A claim that keeps one (it started meanwhile) keeps it.
        let keep = |_, _| Ok(false);
        assert!(collect(&dir, &ended(&[(3, 2_000)]), &policy, &usage, &keep).is_empty());
        assert!(dir.join("a000003").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(disk_usage_pct(&std::env::temp_dir()).is_some_and(|p| p <= 100));
    }
}
