//! The one word a job's status shows (`job list`, `job status`): never
//! more than is true. Cases from bug reports of other orchestrators: a
//! batch job whose instances all failed read `running`; one where a group
//! completed and another failed for good read `complete`.

use cluster_core::diag::SourceFile;
use cluster_core::model::alloc::{TaskPhase, TaskState};
use cluster_core::model::{AllocStatus, Job};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::{ClusterState, JobState, progress};

fn state() -> ClusterState {
    let fleet = "[fleet]\nname = \"t\"\n[[class]]\nname = \"m\"\ncount = 4\ncpu = 8\nmemory = \"16GiB\"\n";
    ClusterState::with_nodes(parse_fleet(&SourceFile::new("f.toml", fleet.to_string())).value.unwrap().nodes).unwrap()
}

/// A job of `kind` with one group per count in `groups`.
fn job(kind: &str, groups: &[u32]) -> Job {
    job_cpu(kind, groups, "1")
}

/// As [`job`], each task asking for `cpu`.
fn job_cpu(kind: &str, groups: &[u32], cpu: &str) -> Job {
    let mut text = format!("[job]\nname = \"j\"\ntype = \"{kind}\"\n");
    for (i, count) in groups.iter().enumerate() {
        let count = if kind == "system" { String::new() } else { format!("count = {count}\n") };
        // Services are placed again forever by default: these give up.
        let limit = if kind == "service" { "reschedule = { attempts = 3, interval = \"1h\" }\n" } else { "" };
        text.push_str(&format!(
            "[[group]]\nname = \"g{i}\"\n{count}{limit}[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"{cpu}\", memory = \"1GiB\" }}\n"
        ));
    }
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

/// Ends allocation `id` as failed, its task reported `unrunnable` (its
/// program cannot run), as an agent does.
fn fail_unrunnable(s: &mut ClusterState, id: cluster_core::ids::AllocId) {
    let task = TaskState {
        name: "t".into(),
        state: TaskPhase::Unrunnable,
        restarts: 0,
        exit_code: None,
        signal: None,
        message: "command `x` is not a program this node can run (exec format error)".into(),
        checks: Vec::new(),
    };
    s.set_task_states(id, &[task]);
    s.set_alloc_status(id, AllocStatus::Failed);
}

/// Ends every live allocation of group `group` as [`fail_unrunnable`] does.
fn end_unrunnable(s: &mut ClusterState, group: &str) {
    let ids: Vec<_> = s.allocs().filter(|a| a.is_live() && &*a.group == group).map(|a| a.id).collect();
    for id in ids {
        fail_unrunnable(s, id);
    }
}

/// Schedules the job once and applies the plan.
fn schedule_once(s: &mut ClusterState, job: &Job) {
    let job = s.job(&job.id).unwrap().clone();
    let plan = schedule(s, &job, &SchedulerConfig::default());
    assert!(s.apply_plan(&plan).refused.is_empty());
}

/// Ends every live allocation of group `group` with `status`.
fn end(s: &mut ClusterState, group: &str, status: AllocStatus) {
    let ids: Vec<_> = s.allocs().filter(|a| a.is_live() && &*a.group == group).map(|a| a.id).collect();
    for id in ids {
        s.set_alloc_status(id, status);
    }
}

/// Fails group `group`'s instances until the scheduler gives up on them:
/// the first run and as many reschedules as its policy allows (batch: 1
/// a day; the services here: 3 an hour).
fn fail_for_good(s: &mut ClusterState, j: &Job, group: &str) {
    let allowed = j.group(group).unwrap().reschedule.attempts;
    for _ in 0..=allowed {
        end(s, group, AllocStatus::Failed);
        schedule_once(s, j);
    }
    assert!(s.allocs().all(|a| !(a.is_live() && &*a.group == group)), "nothing of {group} is placed again");
}

fn word(s: &ClusterState, j: &Job) -> JobState {
    progress(s, s.job(&j.id).unwrap()).state
}

#[test]
fn a_batch_job_all_of_whose_instances_failed_for_good_is_failed() {
    let mut s = state();
    let j = job("batch", &[2]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    assert_eq!(word(&s, &j), JobState::Running);
    end(&mut s, "g0", AllocStatus::Failed);
    assert_eq!(word(&s, &j), JobState::Running, "failed once: it is placed again");
    fail_for_good(&mut s, &j, "g0");
    assert_eq!(word(&s, &j), JobState::Failed);
    let p = progress(&s, s.job(&j.id).unwrap());
    assert_eq!(p.instances.get("failed"), Some(&2), "{p:?}");
}

#[test]
fn a_batch_job_with_a_group_complete_and_one_failed_is_failed_not_complete() {
    let mut s = state();
    let j = job("batch", &[1, 1]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    end(&mut s, "g0", AllocStatus::Complete);
    assert_eq!(word(&s, &j), JobState::Running, "g1 still runs");
    fail_for_good(&mut s, &j, "g1");
    assert_eq!(word(&s, &j), JobState::Failed);
}

#[test]
fn a_batch_job_is_complete_only_when_every_instance_completed() {
    let mut s = state();
    let j = job("batch", &[2, 1]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    end(&mut s, "g0", AllocStatus::Complete);
    assert_eq!(word(&s, &j), JobState::Running);
    end(&mut s, "g1", AllocStatus::Complete);
    assert_eq!(word(&s, &j), JobState::Complete);
}

#[test]
fn a_batch_job_runs_while_a_failed_instance_is_replaced_or_another_runs() {
    let mut s = state();
    let j = job("batch", &[1, 1]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    fail_for_good(&mut s, &j, "g0");
    assert_eq!(word(&s, &j), JobState::Running, "g1 still runs: the job is not over");
}

#[test]
fn a_service_with_some_instances_failed_for_good_is_degraded_and_with_all_failed() {
    let mut s = state();
    let j = job("service", &[1, 2]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    assert_eq!(word(&s, &j), JobState::Running);
    fail_for_good(&mut s, &j, "g0");
    assert_eq!(word(&s, &j), JobState::Degraded);
    fail_for_good(&mut s, &j, "g1");
    assert_eq!(word(&s, &j), JobState::Failed);
}

#[test]
fn a_new_version_starts_over_and_a_stopped_job_is_stopped() {
    let mut s = state();
    let j = job("batch", &[1]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    fail_for_good(&mut s, &j, "g0");
    assert_eq!(word(&s, &j), JobState::Failed);
    // A real change (its resources): every instance starts over.
    let changed = job_cpu("batch", &[1], "2");
    s.upsert_job(changed.clone());
    assert_eq!(s.job(&j.id).unwrap().version, 1);
    let p = progress(&s, s.job(&j.id).unwrap());
    assert_eq!(p.instances.get("failed"), None, "the new version has not failed: {p:?}");
    schedule_once(&mut s, &changed);
    assert_eq!(word(&s, &changed), JobState::Running);
    let mut stopped = s.job(&j.id).unwrap().clone();
    stopped.stopped = true;
    s.upsert_job(stopped);
    assert_eq!(word(&s, &j), JobState::Stopped);
}

#[test]
fn an_instance_whose_program_cannot_run_fails_for_good_at_once_and_is_not_placed_again() {
    let mut s = state();
    let j = job("batch", &[1]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    end_unrunnable(&mut s, "g0");
    assert_eq!(word(&s, &j), JobState::Failed);
    schedule_once(&mut s, &j);
    assert_eq!(s.allocs().count(), 1, "placed once: another node would fail the same");
}

#[test]
fn a_system_job_is_not_placed_again_where_its_program_cannot_run() {
    let mut s = state();
    let j = job("system", &[0]);
    s.upsert_job(j.clone());
    schedule_once(&mut s, &j);
    assert_eq!(s.allocs().filter(|a| a.is_live()).count(), 4, "one per node");
    let first = s.allocs().next().unwrap().id;
    fail_unrunnable(&mut s, first);
    schedule_once(&mut s, &j);
    assert_eq!(s.allocs().count(), 4, "not placed again on that node");
    assert_eq!(word(&s, &j), JobState::Degraded);
    end_unrunnable(&mut s, "g0");
    assert_eq!(word(&s, &j), JobState::Failed);
}

#[test]
fn a_service_scaled_to_zero_has_not_failed() {
    let mut s = state();
    let j = job("service", &[0]);
    s.upsert_job(j.clone());
    assert_eq!(word(&s, &j), JobState::Running);
    let b = job("batch", &[0]);
    s.upsert_job(b.clone());
    assert_eq!(word(&s, &b), JobState::Complete, "nothing wanted, nothing left to do");
}
