//! The workload: jobs submitted, updated and stopped through the API of a
//! random cluster, each operation recorded with its answer. Jobs are small
//! real processes that carry their identity in their environment
//! (`CHAOS_JOB`, `CHAOS_VERSION`, and Hanse's `HANSE_*`), which is all the
//! checker reads.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster_core::scheduler::Rng;
use cluster_core::server::client::ClientError;
use serde_json::json;

use crate::history::History;
use crate::sleep_unless;
use crate::world::{AGENT_CPU_MILLIS, AGENTS, CLUSTERS, World};

/// What an operation's answer tells of its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: it happened.
    Acked,
    /// Refused (an answer of 4xx): it did not happen.
    Refused,
    /// No answer, or a server error: it may or may not have happened.
    Unknown,
}

impl Outcome {
    /// Only a request the servers found malformed (400, 422) surely did
    /// nothing: the client sends a write again to the next server when the
    /// first fails mid-way, so any other answer (a 401 from a server whose
    /// ACLs lag, a 404 of a job whose submission is still in flight) may
    /// follow a write that applied.
    fn of<T>(r: &Result<T, ClientError>) -> Outcome {
        match r {
            Ok(_) => Outcome::Acked,
            Err(ClientError::Api(e)) if matches!(e.status, 400 | 422) => Outcome::Refused,
            Err(_) => Outcome::Unknown,
        }
    }

    /// The better known of two outcomes of the same operation sent twice.
    fn merge(self, other: Outcome) -> Outcome {
        match (self, other) {
            (Outcome::Acked, _) | (_, Outcome::Acked) => Outcome::Acked,
            (Outcome::Unknown, _) | (_, Outcome::Unknown) => Outcome::Unknown,
            _ => Outcome::Refused,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Refused => "refused",
            Outcome::Unknown => "unknown",
        }
    }
}

/// One job the workload made, as the workload knows it.
#[derive(Clone, Debug)]
pub struct JobRec {
    pub name: String,
    /// The cluster it was submitted to.
    pub cluster: usize,
    pub batch: bool,
    pub count: u32,
    pub cpu_millis: u64,
    /// `jurisdictions = ["eu"]`: may run only in an EU cluster.
    pub eu_only: bool,
    /// `on_disconnect = "stop"`.
    pub at_most_once: bool,
    /// Each version submitted (1, 2...) and its outcome.
    pub versions: Vec<Outcome>,
    /// The outcome of its stop, if one was sent: the last operation on a
    /// job (nothing is submitted after a stop).
    pub stop: Option<Outcome>,
    /// Acknowledged, then unknown to its cluster once the faults ended (a
    /// stopped job is kept for hours): an acknowledged write lost.
    pub lost: bool,
}

impl JobRec {
    /// Whether the workload may still update or stop it: not stopped (nor
    /// asked to be), and some version maybe accepted.
    pub fn live(&self) -> bool {
        self.stop.is_none() && self.versions.iter().any(|o| *o != Outcome::Refused)
    }

    /// What it must come to once settled, by its last operation (after
    /// [`resolve`], an acknowledged one): `Ok(None)` nothing running,
    /// `Ok(Some(v))` version `v`; `Err` when that operation never got an
    /// answer, so nothing can be said.
    pub fn wanted(&self) -> Result<Option<u32>, &'static str> {
        if self.lost {
            return Err("acknowledged, and then unknown to its cluster: lost");
        }
        match self.stop {
            Some(Outcome::Acked) => return Ok(None),
            Some(_) => return Err("its stop never got an answer"),
            None => {}
        }
        match self.versions.last() {
            Some(Outcome::Unknown) => Err("its last submission never got an answer"),
            // A refused version changed nothing: the one before it runs.
            _ => Ok(self.versions.iter().rposition(|o| *o == Outcome::Acked).map(|i| i as u32 + 1)),
        }
    }
}

/// Every job the workload made.
#[derive(Default)]
pub struct Ledger {
    pub jobs: Mutex<Vec<JobRec>>,
    pub ops_acked: std::sync::atomic::AtomicU64,
}

/// The job spec of version `version` of `job`. `marks`: the directory
/// where batch instances leave a file when they finish.
/// Tasks killed again and again by the faults (a deadline, a kill) are
/// restarted for ever (`mode = "delay"`): the run wants every instance
/// back, not the failure a restart limit would rightly report.
pub fn spec(job: &JobRec, version: u32, run: &str, marks: &str) -> String {
    let kind = if job.batch { "batch" } else { "service" };
    let eu = if job.eu_only { "jurisdictions = [\"eu\"]\nlabels = { data = \"eu-pii\" }\n" } else { "" };
    let on_disconnect = if job.at_most_once { "stop" } else { "keep" };
    let script = if job.batch {
        // The origin's index when the instance runs for another cluster.
        "sleep 6; touch \\\"$CHAOS_MARKS/$CHAOS_JOB.$HANSE_GROUP.${HANSE_ORIGIN_INDEX:-$HANSE_ALLOC_INDEX}\\\""
    } else {
        "exec sleep 100000"
    };
    format!(
        "[job]\nname = \"{name}\"\ntype = \"{kind}\"\n{eu}\n[[group]]\nname = \"g\"\ncount = {count}\non_disconnect = \"{on_disconnect}\"\n\
         restart = {{ delay = \"1s\", mode = \"delay\" }}\n\n\
         [[group.task]]\nname = \"t\"\ndriver = \"exec\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"{script}\"]\n\
         env = {{ CHAOS_RUN = \"{run}\", CHAOS_JOB = \"{name}\", CHAOS_VERSION = \"{version}\", CHAOS_MARKS = \"{marks}\" }}\n\
         resources = {{ cpu = \"{cpu}m\", memory = \"16MiB\" }}\nkill_timeout = \"1s\"\n",
        name = job.name,
        count = job.count,
        cpu = job.cpu_millis,
    )
}

/// Runs the workload until `stop`: an operation every 1-4 s.
pub fn run(world: &World, ledger: &Ledger, history: &History, seed: u64, stop: &AtomicBool) {
    let mut rng = Rng::new(seed ^ 0x0057_0b10_ad00);
    let marks = world.dir.join("marks").display().to_string();
    let mut next = 0u32;
    // What the federation can hold: half of it is the most the live jobs
    // may want, so that after the faults every wanted instance can run.
    let budget = (CLUSTERS.len() * AGENTS) as u64 * AGENT_CPU_MILLIS / 2;
    // EU-only work fits in the two EU clusters, and when it comes from
    // us-east only in what their policies let in (60 % of each): two
    // fifths of the budget keep it placeable whatever else was delegated.
    let eu_budget = budget * 2 / 5;
    while !stop.load(Ordering::Relaxed) && !crate::INTERRUPTED.load(Ordering::Relaxed) {
        sleep_unless(stop, Duration::from_millis(1000 + rng.below(3000) as u64));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let jobs = ledger.jobs.lock().unwrap().clone();
        let live: Vec<&JobRec> = jobs.iter().filter(|j| j.live()).collect();
        let wanted: u64 = live.iter().map(|j| j.cpu_millis * u64::from(j.count)).sum();
        let eu_wanted: u64 = live.iter().filter(|j| j.eu_only).map(|j| j.cpu_millis * u64::from(j.count)).sum();
        let roll = rng.below(10);
        if roll < 5 && !live.is_empty() && (roll < 2 || wanted > budget / 2) {
            // Stop one, or update a service (a new version replaces it).
            let j = live[rng.below(live.len())].clone();
            if j.batch || rng.below(2) == 0 {
                stop_job(world, ledger, history, &j);
            } else {
                submit(world, ledger, history, &j, &marks);
            }
            continue;
        }
        next += 1;
        let large = rng.below(4) == 0;
        let batch = rng.below(3) == 0;
        let (count, cpu) = if large {
            (6 + rng.below(6) as u32, 400)
        } else {
            (1 + rng.below(3) as u32, 100 + 50 * rng.below(3) as u64)
        };
        let eu_only = rng.below(3) == 0;
        let ask = cpu * u64::from(count);
        if wanted + ask > budget || (eu_only && eu_wanted + ask > eu_budget) {
            continue;
        }
        let job = JobRec {
            name: format!("j{next}"),
            cluster: rng.below(CLUSTERS.len()),
            batch,
            count,
            cpu_millis: cpu,
            eu_only,
            at_most_once: rng.below(2) == 0,
            versions: Vec::new(),
            stop: None,
            lost: false,
        };
        ledger.jobs.lock().unwrap().push(job.clone());
        submit(world, ledger, history, &job, &marks);
    }
}

/// Submits the next version of `job`.
fn submit(world: &World, ledger: &Ledger, history: &History, job: &JobRec, marks: &str) {
    let version = job.versions.len() as u32 + 1;
    let text = spec(job, version, &world.run, marks);
    let start = world.now_ms();
    let answer = world.client(job.cluster).submit(&text, &format!("{}.toml", job.name));
    let outcome = Outcome::of(&answer);
    record(world, ledger, history, job, start, "submit", version, outcome, &answer);
    if let Some(j) = ledger.jobs.lock().unwrap().iter_mut().find(|j| j.name == job.name) {
        j.versions.push(outcome);
    }
}

fn stop_job(world: &World, ledger: &Ledger, history: &History, job: &JobRec) {
    let start = world.now_ms();
    let answer = world.client(job.cluster).stop(&job.name);
    let outcome = Outcome::of(&answer);
    record(world, ledger, history, job, start, "stop", job.versions.len() as u32, outcome, &answer);
    if let Some(j) = ledger.jobs.lock().unwrap().iter_mut().find(|j| j.name == job.name) {
        j.stop = Some(j.stop.map_or(outcome, |o| o.merge(outcome)));
    }
}

/// Once healed: sends again each job's last operation that got no answer
/// (its stop, or its last version) until one is acknowledged, or `limit`
/// passes. Operations answered during the faults are left as they are: an
/// acknowledged one that did not stick is what the checker must find.
/// First, every job with an acknowledged submission must still be known
/// to its cluster (stopped jobs are kept for hours): one that is not is
/// lost, and nothing is sent for it (a submission sent again would hide
/// the loss). After the faults, a stop answered "no such job" of a job
/// never acknowledged is done (a submission still in flight would have
/// landed by now).
pub fn resolve(world: &World, ledger: &Ledger, history: &History, limit: Duration) {
    let end = std::time::Instant::now() + limit;
    let marks = world.dir.join("marks").display().to_string();
    let acked: Vec<JobRec> =
        ledger.jobs.lock().unwrap().iter().filter(|j| j.versions.contains(&Outcome::Acked)).cloned().collect();
    for job in acked {
        let known = loop {
            match world.client(job.cluster).job(&job.name) {
                Ok(_) => break true,
                Err(ClientError::Api(e)) if e.status == 404 => break false,
                Err(_) if std::time::Instant::now() < end && !crate::INTERRUPTED.load(Ordering::Relaxed) => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                // No answer in time: the settling check says so.
                Err(_) => break true,
            }
        };
        if !known {
            history.write(json!({ "t_ms": world.now_ms(), "violation": "lost", "job": job.name, "cluster": CLUSTERS[job.cluster].0 }));
            if let Some(j) = ledger.jobs.lock().unwrap().iter_mut().find(|j| j.name == job.name) {
                j.lost = true;
            }
        }
    }
    let pending = |j: &JobRec| {
        !j.lost
            && match j.stop {
                Some(o) => o != Outcome::Acked,
                None => j.versions.last() == Some(&Outcome::Unknown),
            }
    };
    loop {
        let jobs: Vec<JobRec> = ledger.jobs.lock().unwrap().iter().filter(|j| pending(j)).cloned().collect();
        if jobs.is_empty() || std::time::Instant::now() > end || crate::INTERRUPTED.load(Ordering::Relaxed) {
            return;
        }
        for job in jobs {
            if job.stop.is_some() {
                let start = world.now_ms();
                let answer = world.client(job.cluster).stop(&job.name);
                let outcome = match &answer {
                    Err(ClientError::Api(e)) if e.status == 404 => Outcome::Acked,
                    a => Outcome::of(a),
                };
                record(world, ledger, history, &job, start, "stop again", job.versions.len() as u32, outcome, &answer);
                if let Some(j) = ledger.jobs.lock().unwrap().iter_mut().find(|j| j.name == job.name) {
                    j.stop = Some(j.stop.map_or(outcome, |o| o.merge(outcome)));
                }
            } else {
                let version = job.versions.len() as u32;
                let start = world.now_ms();
                let answer = world
                    .client(job.cluster)
                    .submit(&spec(&job, version, &world.run, &marks), &format!("{}.toml", job.name));
                let outcome = Outcome::of(&answer);
                record(world, ledger, history, &job, start, "submit again", version, outcome, &answer);
                if let Some(j) = ledger.jobs.lock().unwrap().iter_mut().find(|j| j.name == job.name) {
                    if let Some(last) = j.versions.last_mut() {
                        *last = last.merge(outcome);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[allow(clippy::too_many_arguments)]
fn record<T>(
    world: &World,
    ledger: &Ledger,
    history: &History,
    job: &JobRec,
    start: u64,
    op: &str,
    version: u32,
    outcome: Outcome,
    answer: &Result<T, ClientError>,
) {
    if outcome == Outcome::Acked && !op.ends_with("again") {
        ledger.ops_acked.fetch_add(1, Ordering::Relaxed);
    }
    history.write(json!({
        "t_ms": start,
        "end_ms": world.now_ms(),
        "op": op,
        "cluster": CLUSTERS[job.cluster].0,
        "job": job.name,
        "version": version,
        "batch": job.batch,
        "count": job.count,
        "cpu_millis": job.cpu_millis,
        "eu_only": job.eu_only,
        "at_most_once": job.at_most_once,
        "outcome": outcome.word(),
        "error": answer.as_ref().err().map(|e| e.to_string()),
    }));
}
