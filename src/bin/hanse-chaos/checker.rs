//! The checker trusts nothing Hanse says: it reads `/proc`. Every task of
//! the run carries `CHAOS_RUN`, `CHAOS_JOB`, `CHAOS_VERSION` and Hanse's
//! `HANSE_*` in its environment, and the namespace it runs in says which
//! cluster's agent started it. A *copy* is one allocation's processes
//! (the shell and what it started), keyed by cluster and allocation id; an
//! *instance* is (job, group, index at the job's origin).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde_json::json;

use crate::history::History;
use crate::workload::{JobRec, Outcome};
use crate::world::{AGENTS, CLUSTERS, SERVERS, World, ns_inode};

/// One live copy of an instance.
#[derive(Clone, Debug)]
pub struct Copy {
    pub cluster: usize,
    pub node: usize,
    pub alloc: String,
    pub job: String,
    pub group: String,
    pub index: u32,
    pub version: u32,
    pub pids: Vec<i32>,
}

impl Copy {
    fn instance(&self) -> (String, String, u32) {
        (self.job.clone(), self.group.clone(), self.index)
    }
}

/// The run's live copies, read from `/proc`.
pub fn sample(world: &World) -> Vec<Copy> {
    let mut copies: BTreeMap<(usize, String), Copy> = BTreeMap::new();
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
        let index = get("HANSE_ORIGIN_INDEX").or_else(|| get("HANSE_ALLOC_INDEX")).and_then(|i| i.parse().ok());
        let version = get("CHAOS_VERSION").and_then(|v| v.parse().ok()).unwrap_or(0);
        let cluster = node / (SERVERS + AGENTS);
        let copy = copies.entry((cluster, alloc.clone())).or_insert_with(|| Copy {
            cluster,
            node,
            alloc,
            job,
            group,
            index: index.unwrap_or(u32::MAX),
            version,
            pids: Vec::new(),
        });
        copy.pids.push(pid);
    }
    copies.into_values().collect()
}

/// What the checker counts while faults happen.
#[derive(Default)]
pub struct Checker {
    /// At-most-once instances seen with two copies or more right now.
    overlapping: BTreeSet<(String, String, u32)>,
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
    /// Checks one sample: an at-most-once instance alive twice, or EU-only
    /// work alive outside an EU cluster, is a violation the moment it is
    /// seen (written to `history`), whatever happens later.
    pub fn observe(&mut self, copies: &[Copy], jobs: &[JobRec], history: &History, now_ms: u64) {
        self.samples += 1;
        let by_name: BTreeMap<&str, &JobRec> = jobs.iter().map(|j| (j.name.as_str(), j)).collect();
        let remote =
            copies.iter().filter(|c| by_name.get(c.job.as_str()).is_some_and(|j| j.cluster != c.cluster)).count();
        self.copies_max = self.copies_max.max(copies.len());
        self.remote_copies_max = self.remote_copies_max.max(remote);
        let mut per_instance: BTreeMap<(String, String, u32), Vec<&Copy>> = BTreeMap::new();
        for c in copies {
            let Some(job) = by_name.get(c.job.as_str()) else { continue };
            if job.at_most_once {
                per_instance.entry(c.instance()).or_default().push(c);
            }
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
        }
        let now: BTreeSet<(String, String, u32)> =
            per_instance.iter().filter(|(_, cs)| cs.len() > 1).map(|(k, _)| k.clone()).collect();
        for key in now.difference(&self.overlapping) {
            self.at_most_once_overlaps += 1;
            let cs = &per_instance[key];
            history.write(json!({
                "t_ms": now_ms,
                "violation": "at_most_once_overlap",
                "job": key.0,
                "group": key.1,
                "index": key.2,
                "copies": cs.iter().map(|c| json!({
                    "cluster": CLUSTERS[c.cluster].0,
                    "node": c.node,
                    "alloc": c.alloc,
                    "version": c.version,
                    "pids": c.pids,
                })).collect::<Vec<_>>(),
            }));
        }
        self.overlapping = now;
    }

    pub fn forbidden_placements(&self) -> u64 {
        self.forbidden.len() as u64
    }
}

/// Why the federation is not settled: for every job, what should run
/// runs exactly once at a version it may have, what should not run does
/// not, and each finished batch instance left its mark in `marks`. Empty
/// when all holds. Each problem names its job first.
pub fn unsettled(copies: &[Copy], jobs: &[JobRec], marks: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut per_job: BTreeMap<&str, Vec<&Copy>> = BTreeMap::new();
    for c in copies {
        per_job.entry(c.job.as_str()).or_default().push(c);
    }
    for job in jobs {
        let cs = per_job.remove(job.name.as_str()).unwrap_or_default();
        let mut problem = |p: String| out.push((job.name.clone(), p));
        let acked = job.versions.contains(&Outcome::Acked);
        if !job.live() || !job.versions.iter().any(|o| *o != Outcome::Refused) {
            if !cs.is_empty() {
                problem(format!("{} copies run, none should (stopped or never accepted)", cs.len()));
            }
            continue;
        }
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
        let maybe_stopped = job.stop == Some(Outcome::Unknown);
        if !acked || (maybe_stopped && cs.is_empty()) {
            continue;
        }
        let versions = job.settled_versions();
        for i in 0..job.count {
            let mark = marks.join(format!("{}.g.{i}", job.name));
            let copy = per_index.get(&i).and_then(|cs| cs.first());
            if job.batch {
                if !mark.exists() {
                    problem(format!("batch index {i} has not finished"));
                }
            } else {
                match copy {
                    None => problem(format!("index {i} does not run")),
                    Some(c) if !versions.contains(&c.version) => {
                        problem(format!("index {i} runs version {}, not {versions:?}", c.version))
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
        }
    }

    fn copy(cluster: usize, alloc: &str, job: &str, index: u32, version: u32) -> Copy {
        Copy {
            cluster,
            node: 0,
            alloc: alloc.into(),
            job: job.into(),
            group: "g".into(),
            index,
            version,
            pids: vec![1],
        }
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
        // Index 0 once here and once delegated: fine. Then index 1 twice,
        // in two clusters, for three samples: one overlap.
        c.observe(&[copy(0, "1", "a", 0, 1), copy(1, "7", "a", 1, 1)], &jobs, &h, 0);
        for t in 1..4 {
            c.observe(&[copy(0, "1", "a", 0, 1), copy(0, "2", "a", 1, 1), copy(1, "7", "a", 1, 1)], &jobs, &h, t);
        }
        assert_eq!(c.at_most_once_overlaps, 1);
        assert_eq!((c.copies_max, c.remote_copies_max), (3, 1));
        // It ends, and comes back: a second overlap.
        c.observe(&[copy(0, "2", "a", 1, 1)], &jobs, &h, 5);
        c.observe(&[copy(0, "2", "a", 1, 1), copy(2, "9", "a", 1, 2)], &jobs, &h, 6);
        assert_eq!(c.at_most_once_overlaps, 2);
        // Work that may run twice (on_disconnect = "keep") is no overlap.
        let keep = [JobRec { at_most_once: false, ..job("a", 2) }];
        let mut c = Checker::default();
        c.observe(&[copy(0, "2", "a", 1, 1), copy(2, "9", "a", 1, 1)], &keep, &h, 0);
        assert_eq!(c.at_most_once_overlaps, 0);
        h.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().filter(|l| l.contains("at_most_once_overlap")).count(), 2, "{text}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn eu_only_work_outside_the_eu_is_counted_once_per_copy() {
        let (h, path) = history();
        let jobs = [JobRec { eu_only: true, ..job("e", 1) }];
        let mut c = Checker::default();
        let us = CLUSTERS.iter().position(|(_, j)| *j == "us").unwrap();
        c.observe(&[copy(0, "1", "e", 0, 1)], &jobs, &h, 0);
        assert_eq!(c.forbidden_placements(), 0, "eu-west is in the EU");
        c.observe(&[copy(us, "4", "e", 0, 1)], &jobs, &h, 1);
        c.observe(&[copy(us, "4", "e", 0, 1)], &jobs, &h, 2);
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
        // Version 2 acknowledged: a copy of version 1 is stale; a third
        // version whose outcome is unknown may be what runs.
        let updated = [JobRec { versions: vec![Outcome::Acked, Outcome::Acked, Outcome::Unknown], ..job("s", 1) }];
        assert_eq!(unsettled(&[copy(0, "1", "s", 0, 1)], &updated, &marks).len(), 1);
        assert!(unsettled(&[copy(0, "1", "s", 0, 2)], &updated, &marks).is_empty());
        assert!(unsettled(&[copy(0, "1", "s", 0, 3)], &updated, &marks).is_empty());
        // Stopped: nothing may run. A stop of unknown outcome: all or nothing.
        let stopped = [JobRec { stop: Some(Outcome::Acked), ..job("s", 1) }];
        assert_eq!(unsettled(&[copy(0, "1", "s", 0, 1)], &stopped, &marks).len(), 1);
        let maybe = [JobRec { stop: Some(Outcome::Unknown), ..job("s", 1) }];
        assert!(unsettled(&[], &maybe, &marks).is_empty());
        assert!(unsettled(&[copy(0, "1", "s", 0, 1)], &maybe, &marks).is_empty());
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
