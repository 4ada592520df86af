//! The checker trusts nothing Hanse says: it reads `/proc`. Every task of
//! the run carries `CHAOS_RUN`, `CHAOS_JOB`, `CHAOS_VERSION` and Hanse's
//! `HANSE_*` in its environment, and the namespace it runs in says which
//! cluster's agent started it. A *copy* is one start of an allocation:
//! its processes on one node in one session (every task start calls
//! `setsid`, so the session id is the pid of the task's first process and
//! survives its exit and any reparenting), so the same allocation started
//! twice, on two nodes or twice on one, is two copies. An *instance* is
//! (job, group, index at the job's origin).
//!
//! A scan of `/proc` is not instantaneous, and two copies may overlap for
//! less than a sample: an at-most-once copy overlaps another when the
//! other was read alive after the new one's start (from `/proc/PID/stat`,
//! in clock ticks since boot; each process's reading is timed on the same
//! clock), which neither invents an overlap from a copy that died during
//! the scan nor misses one between samples as long as the older copy was
//! read after the newer one started.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde_json::json;

use crate::history::History;
use crate::workload::JobRec;
use crate::world::{AGENTS, CLUSTERS, SERVERS, World, ns_inode};

/// One live copy of an instance.
#[derive(Clone, Debug)]
pub struct Copy {
    pub cluster: usize,
    pub node: usize,
    pub alloc: String,
    /// Its session id: the pid of the task's first process.
    pub session: i32,
    /// When its first process started, in ms since boot.
    pub start_ms: u64,
    /// The latest moment a process of it was read alive, in ms since boot.
    pub seen_ms: u64,
    pub job: String,
    pub group: String,
    pub index: u32,
    pub version: u32,
    pub pids: Vec<i32>,
}

impl Copy {
    fn instance(&self) -> Instance {
        (self.job.clone(), self.group.clone(), self.index)
    }

    /// What tells it from every other copy: where, which allocation, and
    /// which start of it (its session).
    fn id(&self) -> CopyId {
        (self.node, self.alloc.clone(), self.session)
    }
}

/// Milliseconds since boot (`CLOCK_BOOTTIME`, the clock of `/proc`'s
/// process start times).
pub fn boot_ms() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}

/// A process's session and its start in ms since boot, from
/// `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(i32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state, ppid, pgrp,
    // session, ...; starttime is the 22nd field of the line, the 20th
    // after the parenthesis.
    let rest: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let session = rest.get(3)?.parse().ok()?;
    let ticks: u64 = rest.get(19)?.parse().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((session, ticks * 1000 / hz))
}

/// One process of the run's tasks.
struct Seen {
    pid: i32,
    session: i32,
    start_ms: u64,
    /// When it was read alive (ms since boot).
    seen_ms: u64,
    node: usize,
    alloc: String,
    job: String,
    group: String,
    index: u32,
    version: u32,
}

/// The run's live copies, read from `/proc`, each with the latest moment
/// one of its processes was read alive.
pub fn sample(world: &World) -> Vec<Copy> {
    let mut procs = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Some(node) = ns_inode(pid).and_then(|i| world.net.node_of_inode(i)) else { continue };
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else { continue };
        let env: BTreeMap<&[u8], &[u8]> = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let at = kv.iter().position(|b| *b == b'=')?;
                Some((&kv[..at], &kv[at + 1..]))
            })
            .collect();
        let get = |k: &str| env.get(k.as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned());
        if get("CHAOS_RUN").as_deref() != Some(world.run.as_str()) {
            continue;
        }
        let (Some(alloc), Some(job), Some(group)) = (get("HANSE_ALLOC_ID"), get("CHAOS_JOB"), get("HANSE_GROUP"))
        else {
            continue;
        };
        let Some((session, start_ms)) = stat(pid) else { continue };
        // Read after its environment: it was alive then.
        let seen_ms = boot_ms();
        let index = get("HANSE_ORIGIN_INDEX").or_else(|| get("HANSE_ALLOC_INDEX")).and_then(|i| i.parse().ok());
        let version = get("CHAOS_VERSION").and_then(|v| v.parse().ok()).unwrap_or(0);
        procs.push(Seen {
            pid,
            session,
            start_ms,
            seen_ms,
            node,
            alloc,
            job,
            group,
            index: index.unwrap_or(u32::MAX),
            version,
        });
    }
    copies_of(procs)
}

/// Groups processes into copies: by node, allocation and session.
fn copies_of(procs: Vec<Seen>) -> Vec<Copy> {
    let mut copies: BTreeMap<CopyId, Copy> = BTreeMap::new();
    for p in procs {
        let copy = copies.entry((p.node, p.alloc.clone(), p.session)).or_insert_with(|| Copy {
            cluster: p.node / (SERVERS + AGENTS),
            node: p.node,
            alloc: p.alloc.clone(),
            session: p.session,
            start_ms: p.start_ms,
            seen_ms: p.seen_ms,
            job: p.job.clone(),
            group: p.group.clone(),
            index: p.index,
            version: p.version,
            pids: Vec::new(),
        });
        // The session's leader started first; it may have exited.
        copy.start_ms = copy.start_ms.min(p.start_ms);
        copy.seen_ms = copy.seen_ms.max(p.seen_ms);
        copy.pids.push(p.pid);
    }
    copies.into_values().collect()
}

/// How far apart two times must be to be told apart: `/proc` counts
/// process starts in clock ticks (10 ms).
const TICK_MS: u64 = 10;

/// An instance: (job, group, index at the job's origin).
type Instance = (String, String, u32);
/// A copy: (node, allocation, session); see [`Copy::id`].
type CopyId = (usize, String, i32);

/// What the checker counts while faults happen.
#[derive(Default)]
pub struct Checker {
    /// Per at-most-once instance, each copy seen lately: the latest time
    /// it was certainly alive (ms since boot).
    alive: BTreeMap<Instance, BTreeMap<CopyId, u64>>,
    pub at_most_once_overlaps: u64,
    /// Copies of EU-only work seen outside the EU, by cluster and alloc.
    forbidden: BTreeSet<(usize, String)>,
    pub samples: u64,
    /// The most copies seen in one sample, and of those the most that ran
    /// in another cluster than their job's (delegated work): a run whose
    /// checker never saw a task, or never a delegated one, proves little.
    pub copies_max: usize,
    pub remote_copies_max: usize,
}

impl Checker {
    /// Checks one sample: an at-most-once
    /// instance alive twice, or EU-only work alive outside an EU cluster,
    /// is a violation the moment it is seen (written to `history`),
    /// whatever happens later.
    pub fn observe(&mut self, copies: &[Copy], jobs: &[JobRec], history: &History, now_ms: u64) {
        self.samples += 1;
        let by_name: BTreeMap<&str, &JobRec> = jobs.iter().map(|j| (j.name.as_str(), j)).collect();
        let remote =
            copies.iter().filter(|c| by_name.get(c.job.as_str()).is_some_and(|j| j.cluster != c.cluster)).count();
        self.copies_max = self.copies_max.max(copies.len());
        self.remote_copies_max = self.remote_copies_max.max(remote);
        let mut fresh: BTreeMap<Instance, Vec<&Copy>> = BTreeMap::new();
        for c in copies {
            let Some(job) = by_name.get(c.job.as_str()) else { continue };
            if job.eu_only && CLUSTERS[c.cluster].1 != "eu" && self.forbidden.insert((c.cluster, c.alloc.clone())) {
                history.write(json!({
                    "t_ms": now_ms,
                    "violation": "forbidden_placement",
                    "job": c.job,
                    "index": c.index,
                    "cluster": CLUSTERS[c.cluster].0,
                    "alloc": c.alloc,
                    "pids": c.pids,
                }));
            }
            if !job.at_most_once {
                continue;
            }
            // Every copy's sighting first, then the new ones' checks: the
            // order of one scan must not decide.
            let seen = self.alive.entry(c.instance()).or_default();
            if !seen.contains_key(&c.id()) {
                fresh.entry(c.instance()).or_default().push(c);
            }
            let last = seen.entry(c.id()).or_insert(0);
            *last = (*last).max(c.seen_ms);
        }
        for (instance, new) in fresh {
            let seen = &self.alive[&instance];
            let overlapping: Vec<(&Copy, Vec<_>)> = (new.iter())
                .map(|c| {
                    (
                        *c,
                        seen.iter()
                            .filter(|(id, last)| **id != c.id() && **last > c.start_ms + TICK_MS)
                            .collect::<Vec<_>>(),
                    )
                })
                .filter(|(_, others)| !others.is_empty())
                .collect();
            if overlapping.is_empty() {
                continue;
            }
            self.at_most_once_overlaps += 1;
            history.write(json!({
                "t_ms": now_ms,
                "violation": "at_most_once_overlap",
                "job": instance.0,
                "group": instance.1,
                "index": instance.2,
                "copies": overlapping.iter().map(|(c, others)| json!({
                    "cluster": CLUSTERS[c.cluster].0, "node": c.node, "alloc": c.alloc, "version": c.version,
                    "pids": c.pids, "started_boot_ms": c.start_ms,
                    "alive_after_its_start": others.iter().map(|((node, alloc, session), last)| json!({
                        "node": node, "alloc": alloc, "session": session, "last_seen_boot_ms": last,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }));
        }
        // Copies not seen for two minutes before this sample's latest
        // sighting cannot overlap anything new.
        let latest = copies.iter().map(|c| c.seen_ms).max().unwrap_or(0);
        for seen in self.alive.values_mut() {
            seen.retain(|_, last| *last + 120_000 > latest);
        }
        self.alive.retain(|_, seen| !seen.is_empty());
    }

    pub fn forbidden_placements(&self) -> u64 {
        self.forbidden.len() as u64
    }
}

/// Why the federation is not settled: every job runs exactly what its
/// last operation asks (see [`JobRec::wanted`]): each index once at that
/// version, or nothing; each batch instance left its mark in `marks`; and
/// no copy runs of a job the workload never made. Empty when all holds.
/// Each problem names its job first.
pub fn unsettled(copies: &[Copy], jobs: &[JobRec], marks: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut per_job: BTreeMap<&str, Vec<&Copy>> = BTreeMap::new();
    for c in copies {
        per_job.entry(c.job.as_str()).or_default().push(c);
    }
    for job in jobs {
        let cs = per_job.remove(job.name.as_str()).unwrap_or_default();
        let mut problem = |p: String| out.push((job.name.clone(), p));
        let version = match job.wanted() {
            Err(why) => {
                problem(why.to_string());
                continue;
            }
            Ok(None) => {
                if !cs.is_empty() {
                    problem(format!("{} copies run, none should (stopped, or never accepted)", cs.len()));
                }
                continue;
            }
            Ok(Some(v)) => v,
        };
        let mut per_index: BTreeMap<u32, Vec<&Copy>> = BTreeMap::new();
        for c in &cs {
            per_index.entry(c.index).or_default().push(c);
        }
        for (i, cs) in &per_index {
            if *i >= job.count {
                problem(format!("a copy of index {i} runs; the job has {}", job.count));
            } else if cs.len() > 1 {
                problem(format!("index {i} runs {} times", cs.len()));
            }
        }
        for i in 0..job.count {
            let copy = per_index.get(&i).and_then(|cs| cs.first());
            if job.batch {
                if !marks.join(format!("{}.g.{i}", job.name)).exists() {
                    problem(format!("batch index {i} has not finished"));
                }
            } else {
                match copy {
                    None => problem(format!("index {i} does not run")),
                    Some(c) if c.version != version => {
                        problem(format!("index {i} runs version {}, not {version}", c.version))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    for (name, cs) in per_job {
        out.push((name.to_string(), format!("{} copies of a job the workload never made", cs.len())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Outcome;

    fn job(name: &str, count: u32) -> JobRec {
        JobRec {
            name: name.into(),
            cluster: 0,
            batch: false,
            count,
            cpu_millis: 100,
            eu_only: false,
            at_most_once: true,
            versions: vec![Outcome::Acked],
            stop: None,
            lost: false,
        }
    }

    fn copy(cluster: usize, alloc: &str, job: &str, index: u32, version: u32) -> Copy {
        Copy {
            cluster,
            node: cluster * (SERVERS + AGENTS) + SERVERS,
            alloc: alloc.into(),
            session: 1,
            start_ms: 0,
            seen_ms: 0,
            job: job.into(),
            group: "g".into(),
            index,
            version,
            pids: vec![1],
        }
    }

    /// `c`, started at `start_ms` (ms since boot).
    fn at(start_ms: u64, c: Copy) -> Copy {
        Copy { start_ms, ..c }
    }

    /// `copies` as read alive at `t`.
    fn read(t: u64, copies: &[Copy]) -> Vec<Copy> {
        copies.iter().map(|c| Copy { seen_ms: t.max(c.start_ms), ..c.clone() }).collect()
    }

    fn history() -> (History, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "hanse-chaos-checker-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        (History::create(&path).unwrap(), path)
    }

    #[test]
    fn an_at_most_once_instance_alive_twice_is_one_overlap_however_long_it_lasts() {
        let (h, path) = history();
        let jobs = [job("a", 2)];
        let mut c = Checker::default();
        // Index 0 here and index 1 delegated: fine. Then a second copy of
        // index 1, started while the first lives, for three samples: one
        // overlap.
        let (a, b) = (at(100, copy(0, "1", "a", 0, 1)), at(200, copy(1, "7", "a", 1, 1)));
        c.observe(&read(1_000, &[a.clone(), b.clone()]), &jobs, &h, 0);
        let second = at(1_050, copy(0, "2", "a", 1, 1));
        for t in [1_100, 1_200, 1_300] {
            c.observe(&read(t, &[a.clone(), second.clone(), b.clone()]), &jobs, &h, t);
        }
        assert_eq!(c.at_most_once_overlaps, 1);
        assert_eq!((c.copies_max, c.remote_copies_max), (3, 1));
        // A copy that starts after the last one ended is a replacement.
        c.observe(&read(1_400, std::slice::from_ref(&a)), &jobs, &h, 0);
        c.observe(&read(1_500, &[a.clone(), at(1_450, copy(2, "9", "a", 1, 2))]), &jobs, &h, 0);
        assert_eq!(c.at_most_once_overlaps, 1, "index 1's copies were last seen at 1 300");
        // One seen at 1 600 while the next had started at 1 580: an
        // overlap, though no sample saw both.
        c.observe(&read(1_600, &[a.clone(), at(1_450, copy(2, "9", "a", 1, 2))]), &jobs, &h, 0);
        c.observe(&read(1_700, &[a.clone(), at(1_580, copy(2, "10", "a", 1, 2))]), &jobs, &h, 0);
        assert_eq!(c.at_most_once_overlaps, 2);
        // Work that may run twice (on_disconnect = "keep") is no overlap.
        let keep = [JobRec { at_most_once: false, ..job("a", 2) }];
        let mut c = Checker::default();
        c.observe(&read(10, &[at(0, copy(0, "2", "a", 1, 1)), at(0, copy(2, "9", "a", 1, 1))]), &keep, &h, 0);
        assert_eq!(c.at_most_once_overlaps, 0);
        h.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().filter(|l| l.contains("at_most_once_overlap")).count(), 2, "{text}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn one_allocation_started_twice_is_two_copies_and_its_own_children_are_one() {
        let seen = |pid, session, node, alloc: &str| Seen {
            pid,
            session,
            start_ms: pid as u64,
            seen_ms: 100,
            node,
            alloc: alloc.into(),
            job: "a".into(),
            group: "g".into(),
            index: 0,
            version: 1,
        };
        // Session 11: the task's shell (gone) left its sleep 12 and a
        // grandchild 13 (adopted, or not). Session 21: a second start of
        // the same allocation. The same allocation on another node.
        let copies =
            copies_of(vec![seen(12, 11, 3, "5"), seen(13, 11, 3, "5"), seen(21, 21, 3, "5"), seen(31, 31, 4, "5")]);
        let mut shapes: Vec<(usize, i32, u64, usize)> =
            copies.iter().map(|c| (c.node, c.session, c.start_ms, c.pids.len())).collect();
        shapes.sort();
        assert_eq!(shapes, [(3, 11, 12, 2), (3, 21, 21, 1), (4, 31, 31, 1)]);
    }

    #[test]
    fn eu_only_work_outside_the_eu_is_counted_once_per_copy() {
        let (h, path) = history();
        let jobs = [JobRec { eu_only: true, ..job("e", 1) }];
        let mut c = Checker::default();
        let us = CLUSTERS.iter().position(|(_, j)| *j == "us").unwrap();
        c.observe(&read(0, &[copy(0, "1", "e", 0, 1)]), &jobs, &h, 0);
        assert_eq!(c.forbidden_placements(), 0, "eu-west is in the EU");
        c.observe(&read(1, &[copy(us, "4", "e", 0, 1)]), &jobs, &h, 1);
        c.observe(&read(2, &[copy(us, "4", "e", 0, 1)]), &jobs, &h, 2);
        assert_eq!(c.forbidden_placements(), 1);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn settled_means_each_wanted_instance_once_at_a_version_it_may_have_and_nothing_else() {
        let marks = std::env::temp_dir();
        let jobs = [job("s", 2)];
        assert!(unsettled(&[copy(0, "1", "s", 0, 1), copy(1, "5", "s", 1, 1)], &jobs, &marks).is_empty());
        let missing = unsettled(&[copy(0, "1", "s", 0, 1)], &jobs, &marks);
        assert_eq!(missing, [("s".to_string(), "index 1 does not run".to_string())]);
        let twice =
            unsettled(&[copy(0, "1", "s", 0, 1), copy(0, "2", "s", 1, 1), copy(1, "5", "s", 1, 1)], &jobs, &marks);
        assert_eq!(twice.len(), 1, "{twice:?}");
        // Version 2 acknowledged last: a copy of version 1 is stale. A
        // refused version 3 changed nothing.
        let updated = [JobRec { versions: vec![Outcome::Acked, Outcome::Acked, Outcome::Refused], ..job("s", 1) }];
        assert_eq!(unsettled(&[copy(0, "1", "s", 0, 1)], &updated, &marks).len(), 1);
        assert!(unsettled(&[copy(0, "1", "s", 0, 2)], &updated, &marks).is_empty());
        // A last operation without an answer settles nothing: it is a
        // problem whatever runs (`resolve` sends it again until answered).
        let unanswered = [JobRec { versions: vec![Outcome::Acked, Outcome::Unknown], ..job("s", 1) }];
        assert_eq!(unsettled(&[copy(0, "1", "s", 0, 2)], &unanswered, &marks).len(), 1);
        let maybe = [JobRec { stop: Some(Outcome::Unknown), ..job("s", 1) }];
        assert_eq!(unsettled(&[], &maybe, &marks).len(), 1);
        // Stopped: nothing may run.
        let stopped = [JobRec { stop: Some(Outcome::Acked), ..job("s", 1) }];
        assert_eq!(unsettled(&[copy(0, "1", "s", 0, 1)], &stopped, &marks).len(), 1);
        assert!(unsettled(&[], &stopped, &marks).is_empty());
        // A refused submission runs nothing; a job nobody made is noticed.
        let refused = [JobRec { versions: vec![Outcome::Refused], ..job("s", 1) }];
        assert_eq!(unsettled(&[copy(0, "1", "s", 0, 1)], &refused, &marks).len(), 1);
        assert_eq!(unsettled(&[copy(0, "1", "x", 0, 1)], &[], &marks).len(), 1);
    }

    #[test]
    fn a_batch_instance_is_settled_by_its_mark_not_by_running() {
        let marks = std::env::temp_dir().join(format!("hanse-chaos-marks-{}", std::process::id()));
        std::fs::create_dir_all(&marks).unwrap();
        let jobs = [JobRec { batch: true, ..job("b", 2) }];
        assert_eq!(unsettled(&[copy(0, "1", "b", 0, 1)], &jobs, &marks).len(), 2);
        std::fs::write(marks.join("b.g.0"), "").unwrap();
        std::fs::write(marks.join("b.g.1"), "").unwrap();
        assert!(unsettled(&[], &jobs, &marks).is_empty());
        let _ = std::fs::remove_dir_all(&marks);
    }
}
