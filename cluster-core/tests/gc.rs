//! Garbage collection through the log (security review row 19: finished
//! allocations, stopped jobs and dead nodes were never removed): what is
//! collectable is marked by one `Collect` and dropped by a later one past
//! the threshold; nothing live goes; every replica drops the same.

use cluster_core::codec;
use cluster_core::command::{Command, Effect};
use cluster_core::diag::SourceFile;
use cluster_core::ids::{EvalId, JobId};
use cluster_core::model::alloc::AllocReport;
use cluster_core::model::{AllocStatus, NodeStatus};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::{ClusterState, GC_RULES, GcCounts, GcObject, GcPolicy, settled_key, settled_value};

const HOUR: u64 = 3_600_000;

fn job(name: &str, kind: &str, count: u32) -> cluster_core::model::Job {
    let text = format!(
        "[job]\nname = \"{name}\"\ntype = \"{kind}\"\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"250m\", memory = \"256MiB\" }}\n"
    );
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

/// A state and the log that made it, every command through the codec.
struct Log {
    state: ClusterState,
    commands: Vec<Command>,
}

impl Log {
    fn new() -> Log {
        let text = "[fleet]\nname = \"f\"\n[[class]]\nname = \"m\"\ncount = 4\ncpu = 8\nmemory = \"32GiB\"\n";
        let nodes = parse_fleet(&SourceFile::new("f.toml", text.to_string())).value.unwrap().nodes;
        let mut log = Log { state: ClusterState::new(), commands: Vec::new() };
        for n in nodes {
            log.commit(Command::UpsertNode(n));
        }
        log
    }

    fn commit(&mut self, c: Command) -> Effect {
        let c: Command = codec::decode(&codec::encode(&c), codec::DECODE_BYTES_MAX).unwrap();
        self.commands.push(c.clone());
        self.state.apply(&c)
    }

    /// Registers and places `job` as a leader would, closing its evaluation.
    fn run(&mut self, j: cluster_core::model::Job) {
        let Effect::JobRegistered { eval, .. } = self.commit(Command::RegisterJob(j.clone())) else { panic!() };
        let stored = self.state.job(&j.id).unwrap().clone();
        let plan = schedule(&self.state, &stored, &SchedulerConfig::default());
        self.commit(Command::ApplyPlans(vec![(eval, plan)]));
    }

    /// Plans every open evaluation, as the leader's workers would.
    fn settle(&mut self) {
        let open: Vec<EvalId> = self.state.pending_evals().collect();
        for eval in open {
            let job = self.state.eval(eval).unwrap().job.clone();
            let stored = self.state.job(&job).unwrap().clone();
            let plan = schedule(&self.state, &stored, &SchedulerConfig::default());
            self.commit(Command::ApplyPlans(vec![(eval, plan)]));
        }
    }

    fn report(&mut self, job: &str, status: AllocStatus) {
        let ids: Vec<_> = self.state.allocs_of_job(&JobId::new(job)).map(|a| a.id).collect();
        let reports = ids.into_iter().map(|id| AllocReport::status(id, status)).collect();
        self.commit(Command::AllocStatus(reports));
        self.settle();
    }

    fn commit_settled(&mut self, c: Command) {
        self.commit(c);
        self.settle();
    }

    fn collect(&mut self, now_ms: u64, thresholds: GcPolicy) -> GcCounts {
        self.collect_by(now_ms, thresholds, GC_RULES)
    }

    /// A collection by the rules `rules` (1: the `CollectGarbage` of
    /// older logs).
    fn collect_by(&mut self, now_ms: u64, policy: GcPolicy, rules: u16) -> GcCounts {
        let command = match rules {
            1 => Command::CollectGarbage { now_ms, policy },
            _ => Command::Gc { now_ms, policy, rules },
        };
        match self.commit(command) {
            Effect::Collected(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn has_job(&self, name: &str) -> bool {
        self.state.job(&JobId::new(name)).is_some()
    }
}

#[test]
fn finished_and_stopped_jobs_and_dead_nodes_go_after_their_thresholds_and_nothing_live_does() {
    let mut log = Log::new();
    log.run(job("web", "service", 3));
    log.run(job("report", "batch", 4));
    log.run(job("old", "service", 2));
    log.report("report", AllocStatus::Complete);
    log.commit_settled(Command::StopJob(JobId::new("old")));
    // A stopped job whose instances still run is kept until they end.
    log.report("old", AllocStatus::Running);
    let dead = log.state.nodes()[3].id.clone();
    log.commit(Command::SetNodeStatus { node: dead.clone(), status: NodeStatus::Down, eligible: false });

    let t0 = 1_000_000;
    assert_eq!(log.collect(t0, GcPolicy::DEFAULT), GcCounts::default(), "the first pass only marks");
    assert_eq!(log.state.gc_mark(&GcObject::Job(JobId::new("report"))), Some(t0));
    assert_eq!(log.state.gc_mark(&GcObject::Job(JobId::new("old"))), None, "its instances still run");
    log.report("old", AllocStatus::Complete);
    log.collect(t0 + HOUR, GcPolicy::DEFAULT);
    assert_eq!(log.collect(t0 + 4 * HOUR - 1, GcPolicy::DEFAULT), GcCounts::default(), "not yet 4 h");

    let before = log.state.allocs().count();
    let c = log.collect(t0 + 4 * HOUR, GcPolicy::DEFAULT);
    assert_eq!((c.jobs, c.allocs, c.nodes), (1, 4, 0), "the finished batch job, 4 h after its mark: {c:?}");
    assert!(!log.has_job("report") && log.has_job("old") && log.has_job("web"));
    assert_eq!(log.state.allocs().count(), before - 4);
    assert!(log.state.allocs_of_job(&JobId::new("report")).next().is_none());
    let c = log.collect(t0 + 5 * HOUR, GcPolicy::DEFAULT);
    assert_eq!((c.jobs, c.allocs), (1, 2), "the stopped job, 4 h after its instances ended: {c:?}");
    assert!(log.state.node_idx(&dead).is_some(), "a node goes after 24 h");
    let c = log.collect(t0 + 24 * HOUR, GcPolicy::DEFAULT);
    assert_eq!(c.nodes, 1, "{c:?}");
    assert!(log.state.node_idx(&dead).is_none());
    // The live service keeps its job, allocations and usage.
    assert!(log.has_job("web"));
    assert_eq!(log.state.allocs_of_job(&JobId::new("web")).filter(|a| a.is_live()).count(), 3);
    let recount = log.state.recomputed_usage();
    for (i, u) in recount.iter().enumerate() {
        assert_eq!(u, log.state.usage(cluster_core::ids::NodeIdx(i as u32)), "node {i}");
    }

    // Every replica that applies the same log holds the same bytes, and a
    // snapshot restores them.
    let mut replica = ClusterState::new();
    for c in &log.commands {
        replica.apply(c);
    }
    assert_eq!(replica.snapshot(), log.state.snapshot());
    assert_eq!(ClusterState::restore(&log.state.snapshot()).unwrap().snapshot(), log.state.snapshot());

    // A collected name can be used again; ids are never reused.
    let highest = log.state.allocs().map(|a| a.id).max().unwrap();
    log.run(job("report", "batch", 2));
    assert!(log.state.allocs_of_job(&JobId::new("report")).all(|a| a.id > highest));
}

#[test]
fn a_job_that_comes_back_loses_its_mark_and_gc_now_takes_everything_collectable() {
    let mut log = Log::new();
    log.run(job("svc", "service", 2));
    log.commit_settled(Command::StopJob(JobId::new("svc")));
    log.report("svc", AllocStatus::Complete);
    log.collect(0, GcPolicy::DEFAULT);
    assert_eq!(log.state.gc_mark(&GcObject::Job(JobId::new("svc"))), Some(0));
    // Submitted again before the threshold: live again, unmarked, kept.
    log.run(job("svc", "service", 2));
    log.collect(HOUR, GcPolicy::DEFAULT);
    assert_eq!(log.state.gc_mark(&GcObject::Job(JobId::new("svc"))), None);
    assert_eq!(log.collect(10 * HOUR, GcPolicy::DEFAULT).jobs, 0);
    // `hanse system gc`: thresholds of 0 mark and drop in one pass.
    log.commit_settled(Command::StopJob(JobId::new("svc")));
    log.report("svc", AllocStatus::Complete);
    let c = log.collect(10 * HOUR + 1, GcPolicy::NOW);
    assert_eq!((c.jobs, c.allocs), (1, 4), "{c:?}");
    assert!(log.state.evals().all(|e| e.job != JobId::new("svc")), "its evaluations went too");
    assert!(log.state.eval(EvalId(0)).is_none());
}

/// What other clusters depend on stays: a job with instances held by a
/// delegation, and a job delegated here; a delegation decided before its
/// job was collected holds nothing; a report about a collected allocation
/// is recognisable as such (the agent's report is acknowledged).
#[test]
fn delegations_keep_their_jobs_and_cannot_hold_a_collected_one() {
    let mut log = Log::new();
    log.run(job("held", "batch", 2));
    let mut delegated = job("guest", "batch", 2);
    delegated.labels.insert(cluster_core::model::job::LABEL_DELEGATION.into(), "eu/guest/e1-g-0".into());
    log.run(delegated);
    log.run(job("done", "batch", 2));
    for j in ["held", "guest", "done"] {
        log.report(j, AllocStatus::Complete);
    }
    let hold = |job: &str| Command::Hold {
        holder: format!("out/{job}"),
        job: JobId::new(job),
        group: "g".into(),
        indices: vec![7],
        spec: None,
        record: Vec::new(),
    };
    assert!(!matches!(log.commit(hold("held")), Effect::Refused(_)));
    log.settle();
    let done_alloc = log.state.allocs_of_job(&JobId::new("done")).next().unwrap().id;
    let c = log.collect(0, GcPolicy::NOW);
    assert_eq!(c.jobs, 1, "{c:?}");
    assert!(log.has_job("held") && log.has_job("guest") && !log.has_job("done"));
    assert!(log.state.alloc(done_alloc).is_none() && log.state.was_placed(done_alloc));
    assert!(matches!(log.commit(hold("done")), Effect::Refused(_)), "a hold on a collected job");
    // Released, the held job goes at the next pass.
    log.commit_settled(Command::Release { holder: "out/held".into(), record: Vec::new() });
    assert_eq!(log.collect(1, GcPolicy::NOW).jobs, 1);
    assert!(!log.has_job("held") && log.has_job("guest"));
}

/// Of an instance that keeps failing no failure need stay: its newest
/// allocation carries the instance's reschedule history, so what the
/// scheduler does next is the same after, and the limit still holds.
#[test]
fn an_instance_that_keeps_failing_keeps_its_history_without_its_failures() {
    let mut log = Log::new();
    let mut j = job("flaky", "service", 1);
    let policy = &mut j.groups[0].reschedule;
    (policy.unlimited, policy.attempts, policy.interval_ms) = (false, 5, HOUR);
    log.run(j);
    let flaky = JobId::new("flaky");
    for _ in 0..4 {
        log.report("flaky", AllocStatus::Failed);
    }
    let failed = |log: &Log| log.state.allocs_of_job(&flaky).filter(|a| a.status == AllocStatus::Failed).count();
    let live = |log: &Log| log.state.allocs_of_job(&flaky).filter(|a| a.is_live()).map(|a| a.id).collect::<Vec<_>>();
    assert_eq!((failed(&log), live(&log).len()), (4, 1));
    assert_eq!(log.state.alloc(live(&log)[0]).unwrap().reschedules.len(), 4, "four reschedules so far");
    let plan = log.plan_of("flaky");
    let c = log.collect(0, GcPolicy { allocs_per_job: Some(0), ..GcPolicy::DEFAULT });
    assert_eq!((c.allocs, failed(&log)), (4, 0), "the running one carries the history: {c:?}");
    assert_eq!(log.plan_of("flaky"), plan);
    // The fifth failure is placed again; the sixth is past the limit.
    log.report("flaky", AllocStatus::Failed);
    assert_eq!(live(&log).len(), 1, "five reschedules an hour");
    log.report("flaky", AllocStatus::Failed);
    assert!(live(&log).is_empty(), "the sixth failure is final");
}

fn job_cpu(name: &str, kind: &str, count: u32, cpu: &str) -> cluster_core::model::Job {
    let text = format!(
        "[job]\nname = \"{name}\"\ntype = \"{kind}\"\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"{cpu}\", memory = \"256MiB\" }}\n"
    );
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

impl Log {
    /// Reports every allocation of `job` asked to stop as complete, as
    /// its agent would once it stopped.
    fn end_stopped(&mut self, job: &str) {
        let ids: Vec<_> = self
            .state
            .allocs_of_job(&JobId::new(job))
            .filter(|a| a.desired == cluster_core::model::DesiredStatus::Stop && !a.status.is_terminal())
            .map(|a| a.id)
            .collect();
        let reports = ids.into_iter().map(|id| AllocReport::status(id, AllocStatus::Complete));
        self.commit(Command::AllocStatus(reports.collect()));
        self.settle();
    }

    /// What the scheduler would do for `job` now: placements and stops.
    fn plan_of(&self, job: &str) -> (usize, usize) {
        let stored = self.state.job(&JobId::new(job)).unwrap();
        let plan = schedule(&self.state, stored, &SchedulerConfig::default());
        (plan.placements.len(), plan.stops.len())
    }
}

/// The cap on ended allocations per live job: what goes is what the
/// scheduler no longer reads (older versions, completed service work),
/// oldest first; a failed or completed batch instance of the current
/// version stays, and what the scheduler would do is the same after.
#[test]
fn ended_allocations_past_the_cap_go_oldest_first_and_scheduling_is_unchanged() {
    let mut log = Log::new();
    log.run(job_cpu("web", "service", 2, "250m"));
    for cpu in ["300m", "350m", "400m", "450m"] {
        log.commit_settled(Command::RegisterJob(job_cpu("web", "service", 2, cpu)));
        log.end_stopped("web");
    }
    let web = JobId::new("web");
    let ended: Vec<_> = log.state.allocs_of_job(&web).filter(|a| a.status.is_terminal()).map(|a| a.id).collect();
    assert_eq!(ended.len(), 8, "four versions replaced, two instances each");
    log.run(job("report", "batch", 3));
    log.report("report", AllocStatus::Complete);
    log.run(job("flaky", "service", 1));
    log.report("flaky", AllocStatus::Failed);
    let failed = log.state.allocs_of_job(&JobId::new("flaky")).filter(|a| a.status == AllocStatus::Failed).count();
    assert!(failed >= 1);
    let plans = (log.plan_of("web"), log.plan_of("report"), log.plan_of("flaky"));

    let policy = GcPolicy { allocs_per_job: Some(3), ..GcPolicy::DEFAULT };
    let c = log.collect(1_000, policy);
    assert_eq!(c.allocs, 5, "{c:?}");
    let left: Vec<_> = log.state.allocs_of_job(&web).filter(|a| a.status.is_terminal()).map(|a| a.id).collect();
    assert_eq!(left, ended[5..], "the newest three stay");
    assert_eq!(log.state.allocs_of_job(&web).filter(|a| a.is_live()).count(), 2);
    let zero = GcPolicy { allocs_per_job: Some(0), ..GcPolicy::DEFAULT };
    assert_eq!(log.collect(2_000, zero).allocs, 4, "web's three, and the failure flaky's replacement carries on");
    assert_eq!(log.state.allocs_of_job(&JobId::new("report")).count(), 3, "completed batch work says it is done");
    let still = log.state.allocs_of_job(&JobId::new("flaky")).filter(|a| a.status == AllocStatus::Failed).count();
    assert_eq!(still, 0, "the running replacement carries the failure on, in its reschedule history");
    assert_eq!((log.plan_of("web"), log.plan_of("report"), log.plan_of("flaky")), plans);

    let mut replica = ClusterState::new();
    for c in &log.commands {
        replica.apply(c);
    }
    assert_eq!(replica.snapshot(), log.state.snapshot());
    // Dropped in place, the indexes are those a rebuild makes.
    let rebuilt = ClusterState::restore(&log.state.snapshot()).unwrap();
    for j in ["web", "report", "flaky"] {
        let ids = |s: &ClusterState| s.allocs_of_job(&JobId::new(j)).map(|a| a.id).collect::<Vec<_>>();
        assert_eq!(ids(&log.state), ids(&rebuilt), "{j}");
    }
    for n in log.state.nodes() {
        let ids = |s: &ClusterState| s.allocs_on_node(&n.id).map(|a| a.id).collect::<Vec<_>>();
        assert_eq!(ids(&log.state), ids(&rebuilt), "{}", n.id);
    }
}

/// A system job that keeps failing counts no attempts (one instance per
/// node, placed again each time): its failures are history, and capped.
#[test]
fn a_crash_looping_system_job_does_not_grow_without_bound() {
    let mut log = Log::new();
    log.run(job("agentd", "system", 1));
    let agentd = JobId::new("agentd");
    let live = log.state.allocs_of_job(&agentd).filter(|a| a.is_live()).count();
    assert_eq!(live, 4, "one per node");
    for _ in 0..3 {
        log.report("agentd", AllocStatus::Failed);
    }
    let failed = log.state.allocs_of_job(&agentd).filter(|a| a.status == AllocStatus::Failed).count();
    assert!(failed >= 8, "{failed}");
    let plan = log.plan_of("agentd");
    let zero = GcPolicy { allocs_per_job: Some(0), ..GcPolicy::DEFAULT };
    assert_eq!(log.collect(1_000, zero).allocs as usize, failed);
    assert_eq!(log.plan_of("agentd"), plan);
}

/// The older `Collect`, replayed from a log, caps nothing, as it never
/// did; evaluations stay bounded without a rule: one open and one closed
/// per job, however often it changes.
#[test]
fn the_old_command_caps_nothing_and_evaluations_stay_two_per_job() {
    let mut log = Log::new();
    log.run(job_cpu("web", "service", 2, "250m"));
    for cpu in ["300m", "350m", "400m"] {
        log.commit_settled(Command::RegisterJob(job_cpu("web", "service", 2, cpu)));
        log.end_stopped("web");
    }
    let web = JobId::new("web");
    assert!(log.state.evals().filter(|e| e.job == web).count() <= 2);
    let allocs = log.state.allocs().count();
    assert_eq!(allocs, 8);
    let old = cluster_core::state::GcThresholds { job_ms: 0, node_ms: 0 };
    log.commit(Command::Collect { now_ms: 0, thresholds: old });
    log.commit(Command::Collect { now_ms: 10 * HOUR, thresholds: old });
    assert_eq!(log.state.allocs().count(), allocs, "the old command took ended allocations of a live job");
    assert_eq!(log.collect(11 * HOUR, GcPolicy::NOW).allocs, 6);
}

/// Rules 2: a job delegated here goes once its delegation stopped it, and
/// a batch job whose holds are all settled (its instances completed in
/// another cluster) goes like a finished one, with its holds, their records
/// and markers. A log's older `CollectGarbage` (rules 1) keeps both, as it
/// did, so a replica replaying it drops what the others dropped.
#[test]
fn revoked_guests_and_settled_holds_are_collected_by_rules_2_only() {
    let mut log = Log::new();
    let mut guest = job("guest", "service", 1);
    guest.labels.insert(cluster_core::model::job::LABEL_DELEGATION.into(), "eu/guest/e1-g-0".into());
    log.run(guest);
    log.commit_settled(Command::StopJob(JobId::new("guest")));
    log.report("guest", AllocStatus::Complete);
    log.run(job("split", "batch", 2));
    log.report("split", AllocStatus::Complete);
    let holder = "delegation/eu/split/e9-g-1".to_string();
    let hold = Command::Hold {
        holder: holder.clone(),
        job: JobId::new("split"),
        group: "g".into(),
        indices: vec![1],
        spec: None,
        record: b"complete elsewhere".to_vec(),
    };
    assert!(!matches!(log.commit(hold), Effect::Refused(_)));
    log.settle();
    assert_eq!(log.collect_by(0, GcPolicy::NOW, 1).jobs, 0, "rules 1 keep both");
    let c = log.collect_by(1, GcPolicy::NOW, 2);
    assert_eq!(c.jobs, 1, "{c:?}");
    assert!(!log.has_job("guest"), "stopped by its delegation: it goes");
    assert!(log.has_job("split"), "a hold not settled keeps its job");
    let version = log.state.job(&JobId::new("split")).unwrap().version;
    log.commit(Command::Record { holder: settled_key(&holder), record: settled_value(version + 1) });
    assert_eq!(log.collect_by(2, GcPolicy::NOW, 2).jobs, 0, "settled at another version of the job");
    log.commit(Command::Record { holder: settled_key(&holder), record: settled_value(version) });
    assert_eq!(log.collect_by(2, GcPolicy::NOW, 1).jobs, 0, "rules 1 know nothing of settled holds");
    assert_eq!(log.collect_by(3, GcPolicy::NOW, 2).jobs, 1);
    assert!(!log.has_job("split"));
    assert!(log.state.holds().is_empty());
    assert_eq!(log.state.record(&holder), None);
    assert_eq!(log.state.record(&settled_key(&holder)), None);
}

/// `DropRecords` drops a record, its hold and its marker only while the
/// record is what the proposer read; a job that lost a hold and still runs
/// is evaluated again.
#[test]
fn drop_records_takes_only_records_unchanged_since_they_were_read() {
    let mut log = Log::new();
    log.run(job("web", "service", 1));
    let hold = |record: &[u8]| Command::Hold {
        holder: "delegation/x".into(),
        job: JobId::new("web"),
        group: "g".into(),
        indices: vec![5],
        spec: None,
        record: record.to_vec(),
    };
    log.commit(hold(b"v1"));
    log.settle();
    let stale = Command::DropRecords(vec![("delegation/x".into(), b"v0".to_vec())]);
    assert_eq!(log.commit(stale), Effect::Evals(Vec::new()));
    assert!(log.state.record("delegation/x").is_some() && !log.state.holds().is_empty());
    let Effect::Evals(evals) = log.commit(Command::DropRecords(vec![("delegation/x".into(), b"v1".to_vec())])) else {
        panic!()
    };
    assert_eq!(evals.len(), 1, "the job is evaluated again");
    assert!(log.state.record("delegation/x").is_none() && log.state.holds().is_empty());
}
