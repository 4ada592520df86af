//! Rolling updates through the state machine: deployments pace the
//! replacement of a service's instances by their health, canaries wait for
//! promotion, a failure stops the rollout (and with `auto_revert` rolls it
//! back), and every version of a job is kept for history and revert.
//!
//! Each step runs the scheduler and applies its plan as the leader would,
//! and the agents' reports come in as `Command::AllocStatus`. The checks run
//! after every step, not only at the end: an instance of the service must
//! be serving (running, of the old version or of the new one once healthy)
//! for every index at every moment.

use std::sync::Arc;

use cluster_core::command::{Command, Effect};
use cluster_core::diag::SourceFile;
use cluster_core::ids::{AllocId, JobId};
use cluster_core::model::alloc::{AllocHealth, AllocReport};
use cluster_core::model::deployment::DeploymentStatus;
use cluster_core::model::{AllocStatus, Job};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::{ClusterState, JOB_VERSIONS_KEPT};

fn state(nodes: usize) -> ClusterState {
    let fleet =
        format!("[fleet]\nname = \"t\"\n[[class]]\nname = \"m\"\ncount = {nodes}\ncpu = 16\nmemory = \"64GiB\"\n");
    ClusterState::with_nodes(parse_fleet(&SourceFile::new("f.toml", fleet)).value.unwrap().nodes).unwrap()
}

/// A service `web` of `count` instances; `run_for` tells versions apart.
fn web(count: u32, run_for: &str, update: &str) -> Job {
    let text = format!(
        "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\ncount = {count}\n[group.update]\n{update}\n\
         [[group.task]]\nname = \"t\"\ndriver = \"mock\"\nrun_for = \"{run_for}\"\n\
         resources = {{ cpu = \"100m\", memory = \"64MiB\" }}\n"
    );
    let checked = parse_job(&SourceFile::new("web.toml", text));
    checked.value.unwrap_or_else(|| panic!("{:?}", checked.diagnostics))
}

fn id() -> JobId {
    JobId::new("web")
}

/// Schedules the job's open evaluation, if any, and applies the plan.
fn schedule_once(s: &mut ClusterState) {
    let job = s.job(&id()).unwrap().clone();
    let plan = schedule(s, &job, &SchedulerConfig::default());
    let applied = s.apply_plan(&plan);
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
}

/// Agents report every pending allocation running, and the new ones
/// (not yet judged) `health`.
fn report(s: &mut ClusterState, health: impl Fn(&cluster_core::model::Allocation) -> Option<AllocHealth>) -> Effect {
    let updates: Vec<AllocReport> = s
        .allocs_of_job(&id())
        .filter(|a| !a.status.is_terminal())
        .map(|a| {
            let status = if a.desired == cluster_core::model::DesiredStatus::Stop {
                AllocStatus::Complete
            } else {
                AllocStatus::Running
            };
            AllocReport {
                id: a.id,
                status,
                tasks: Vec::new(),
                health: if a.health.is_none() { health(a) } else { None },
            }
        })
        .collect();
    s.apply(&Command::AllocStatus(updates))
}

/// For every index, an instance serves: old and running, or new and
/// healthy. Returns how many of the job's instances run (any version).
fn check_serving(s: &ClusterState, count: u32) -> usize {
    let version = s.job(&id()).unwrap().version;
    for i in 0..count {
        let serving = s.allocs_of_job(&id()).any(|a| {
            a.index == i
                && a.is_live()
                && (a.job_version < version || a.health == Some(AllocHealth::Healthy))
                && a.status == AllocStatus::Running
        });
        assert!(serving, "instance {i} serves nothing: {:#?}", s.allocs_of_job(&id()).collect::<Vec<_>>());
    }
    s.allocs_of_job(&id()).filter(|a| a.is_live()).count()
}

fn deployment(s: &ClusterState) -> cluster_core::model::deployment::Deployment {
    s.latest_deployment(&id()).expect("a deployment").clone()
}

/// v0 placed, running and healthy: its deployment succeeded.
fn deployed(s: &mut ClusterState, job: Job) {
    s.apply(&Command::RegisterJob(job));
    schedule_once(s);
    report(s, |_| Some(AllocHealth::Healthy));
    assert_eq!(deployment(s).status, DeploymentStatus::Successful, "{:?}", deployment(s));
    assert_eq!(s.job_history(&id()).unwrap().stable, vec![0]);
}

#[test]
fn a_rolling_update_replaces_max_parallel_at_a_time_and_stops_old_only_once_new_is_healthy() {
    let mut s = state(4);
    let update = "max_parallel = 2\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(5, "1h", update));
    let v0: Vec<AllocId> = s.allocs_of_job(&id()).map(|a| a.id).collect();
    s.apply(&Command::RegisterJob(web(5, "2h", update)));
    assert_eq!(deployment(&s).job_version, 1);
    let mut rounds = 0;
    while deployment(&s).status == DeploymentStatus::Running {
        rounds += 1;
        assert!(rounds < 20, "the deployment never ended: {:?}", deployment(&s));
        schedule_once(&mut s);
        // Never more than max_parallel new instances not yet healthy.
        let unhealthy_new = s
            .allocs_of_job(&id())
            .filter(|a| a.is_live() && a.job_version == 1 && a.health != Some(AllocHealth::Healthy))
            .count();
        assert!(unhealthy_new <= 2, "{unhealthy_new} new instances in flight");
        report(&mut s, |_| None);
        let running = check_serving(&s, 5);
        assert!(running <= 5 + 2, "{running} instances run at once");
        report(&mut s, |_| Some(AllocHealth::Healthy));
        check_serving(&s, 5);
    }
    assert_eq!(deployment(&s).status, DeploymentStatus::Successful);
    assert_eq!(rounds, 4, "5 instances, 2 at a time: 3 batches and the last stops");
    let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
    assert_eq!(live.len(), 5);
    assert!(live.iter().all(|a| a.job_version == 1 && !v0.contains(&a.id)));
    assert_eq!(s.job_history(&id()).unwrap().stable, vec![0, 1]);
}

#[test]
fn an_unhealthy_instance_fails_the_deployment_and_auto_revert_rolls_back_without_restarting_the_old() {
    let mut s = state(4);
    let update = "max_parallel = 1\nauto_revert = true\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    let v0: Vec<AllocId> = s.allocs_of_job(&id()).map(|a| a.id).collect();
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    schedule_once(&mut s);
    let effect = report(&mut s, |_| Some(AllocHealth::Unhealthy));
    assert!(matches!(effect, Effect::Evals(ref e) if !e.is_empty()), "{effect:?}");
    let history = s.job_history(&id()).unwrap();
    let failed = history.deployments.iter().find(|d| d.job_version == 1).unwrap();
    assert_eq!(failed.status, DeploymentStatus::Failed);
    assert!(failed.description.contains("unhealthy") && failed.description.contains("rolled back to version 0"));
    // Version 2 is version 0's spec: the old instances carry on as it.
    let job = s.job(&id()).unwrap().clone();
    assert_eq!(job.version, 2);
    assert_eq!(Job { version: 0, ..job.clone() }, web(3, "1h", update));
    schedule_once(&mut s);
    report(&mut s, |_| None);
    let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
    assert_eq!(live.iter().map(|a| a.id).collect::<Vec<_>>(), v0, "the old instances, unrestarted, and only them");
    assert!(live.iter().all(|a| a.job_version == 2));
    assert_eq!(deployment(&s).job_version, 2);
    assert_eq!(deployment(&s).status, DeploymentStatus::Successful);
}

#[test]
fn without_auto_revert_a_failed_deployment_replaces_nothing_more() {
    let mut s = state(4);
    let update = "max_parallel = 1\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    schedule_once(&mut s);
    report(&mut s, |_| Some(AllocHealth::Unhealthy));
    assert_eq!(deployment(&s).status, DeploymentStatus::Failed);
    assert!(
        deployment(&s).description.contains("no stable version") || deployment(&s).description.contains("unhealthy")
    );
    for _ in 0..3 {
        schedule_once(&mut s);
        report(&mut s, |_| None);
        check_serving(&s, 3);
    }
    let old = s.allocs_of_job(&id()).filter(|a| a.is_live() && a.job_version == 0).count();
    assert_eq!(old, 3, "the old version keeps running");
    // An operator fails a deployment by hand the same way.
    s.apply(&Command::RegisterJob(web(3, "3h", update)));
    let fail = Command::FailDeployment { job: id(), namespace: Arc::from("default") };
    assert!(matches!(s.apply(&fail), Effect::Evals(_)));
    assert_eq!(deployment(&s).status, DeploymentStatus::Failed);
    assert!(matches!(s.apply(&fail), Effect::Refused(m) if m.contains("no deployment running")));
}

#[test]
fn canaries_run_beside_the_old_version_until_promoted() {
    let mut s = state(4);
    let update = "max_parallel = 2\ncanary = 1\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(4, "1h", update));
    s.apply(&Command::RegisterJob(web(4, "2h", update)));
    schedule_once(&mut s);
    let canaries: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.job_version == 1).collect();
    assert_eq!(canaries.len(), 1, "one canary first");
    assert!(canaries[0].canary);
    assert!(matches!(s.apply(&promote()), Effect::Refused(m) if m.contains("0 of 1 canaries are healthy")));
    report(&mut s, |_| Some(AllocHealth::Healthy));
    // Healthy, but nothing else moves before the promotion.
    for _ in 0..2 {
        schedule_once(&mut s);
        report(&mut s, |_| Some(AllocHealth::Healthy));
    }
    assert_eq!(s.allocs_of_job(&id()).filter(|a| a.is_live() && a.job_version == 0).count(), 4);
    assert_eq!(deployment(&s).status, DeploymentStatus::Running);
    assert!(matches!(s.apply(&promote()), Effect::Evals(_)));
    for _ in 0..6 {
        schedule_once(&mut s);
        report(&mut s, |_| None);
        check_serving(&s, 4);
        report(&mut s, |_| Some(AllocHealth::Healthy));
    }
    assert_eq!(deployment(&s).status, DeploymentStatus::Successful);
    assert_eq!(s.allocs_of_job(&id()).filter(|a| a.is_live()).count(), 4);
}

/// `canary = count` (a blue/green deployment): a canary at every index,
/// and still nothing old stops before the promotion.
#[test]
fn canaries_at_every_index_wait_for_promotion_too() {
    let mut s = state(4);
    let update = "max_parallel = 1\ncanary = 3\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    for _ in 0..4 {
        schedule_once(&mut s);
        report(&mut s, |_| Some(AllocHealth::Healthy));
        check_serving(&s, 3);
    }
    let canaries: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live() && a.canary).collect();
    assert_eq!(canaries.len(), 3, "one canary per index");
    assert!(canaries.iter().all(|a| a.job_version == 1 && a.health == Some(AllocHealth::Healthy)));
    assert_eq!(s.allocs_of_job(&id()).filter(|a| a.is_live() && a.job_version == 0).count(), 3, "the old ones run on");
    let d = deployment(&s);
    assert!((d.status, d.groups[0].promoted) == (DeploymentStatus::Running, false), "promoted by itself: {d:?}");
    assert!(matches!(s.apply(&promote()), Effect::Evals(_)));
    for _ in 0..4 {
        schedule_once(&mut s);
        report(&mut s, |_| Some(AllocHealth::Healthy));
        check_serving(&s, 3);
    }
    assert_eq!(deployment(&s).status, DeploymentStatus::Successful);
    let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
    assert!(live.len() == 3 && live.iter().all(|a| a.job_version == 1), "{live:?}");
}

/// Runs the scheduler and healthy reports `rounds` times, checking that
/// every index serves after each.
fn rounds(s: &mut ClusterState, count: u32, rounds: usize) {
    for _ in 0..rounds {
        schedule_as_leader(s);
        report(s, |_| Some(AllocHealth::Healthy));
        check_serving(s, count);
    }
}

fn promote() -> Command {
    Command::PromoteDeployment { job: id(), namespace: Arc::from("default"), group: None }
}

/// A revert to a version that was itself deployed with a canary: its
/// instances are carried over as they are, none of them a canary of the
/// revert's deployment, which has nothing to wait for.
#[test]
fn a_revert_to_a_version_once_deployed_with_canaries_waits_for_no_promotion() {
    let mut s = state(4);
    let update = "max_parallel = 1\ncanary = 1\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    rounds(&mut s, 3, 2);
    assert!(matches!(s.apply(&promote()), Effect::Evals(_)));
    rounds(&mut s, 3, 6);
    assert_eq!((deployment(&s).job_version, deployment(&s).status), (1, DeploymentStatus::Successful));
    // Version 2's canary waits; then back to version 1.
    s.apply(&Command::RegisterJob(web(3, "3h", update)));
    rounds(&mut s, 3, 2);
    assert!(deployment(&s).awaits_promotion("g"));
    let revert = Command::RevertJob { job: id(), namespace: Arc::from("default"), version: 1 };
    assert!(matches!(s.apply(&revert), Effect::JobRegistered { version: 3, .. }));
    rounds(&mut s, 3, 3);
    let d = deployment(&s);
    assert_eq!((d.job_version, d.status), (3, DeploymentStatus::Successful), "{d:?}");
    let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
    assert!(live.len() == 3 && live.iter().all(|a| a.job_version == 3 && !a.canary), "{live:?}");
}

/// A scale while a canary waits: the canary is carried over to the new
/// version still a canary, and the wait goes on until the promotion.
#[test]
fn a_scale_while_a_canary_waits_keeps_it_waiting() {
    let mut s = state(4);
    let update = "max_parallel = 1\ncanary = 1\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    rounds(&mut s, 3, 2);
    let canary = s.allocs_of_job(&id()).find(|a| a.canary).map(|a| a.id).expect("a canary");
    s.apply(&Command::RegisterJob(web(4, "2h", update)));
    rounds(&mut s, 3, 3);
    let d = deployment(&s);
    assert!(d.job_version == 2 && d.awaits_promotion("g"), "{d:?}");
    let carried = s.alloc(canary).unwrap();
    assert!(carried.is_live() && carried.canary && carried.job_version == 2, "{carried:?}");
    assert_eq!(s.allocs_of_job(&id()).filter(|a| a.is_live() && a.job_version == 0).count(), 3, "nothing old stopped");
    assert!(matches!(s.apply(&promote()), Effect::Evals(_)));
    rounds(&mut s, 4, 8);
    assert_eq!(deployment(&s).status, DeploymentStatus::Successful);
    let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
    assert!(live.len() == 4 && live.iter().all(|a| a.job_version == 2), "{live:?}");
}

/// More canaries asked for than can run beside an older instance (more
/// than `count`, or new indices of a scale-up): the deployment waits for
/// those that can, and a promotion of them lets the rest follow.
#[test]
fn canaries_are_as_many_as_can_run_beside_the_old_version() {
    for (before, after, canary, want) in [(2, 2, 5, 2), (1, 3, 2, 1)] {
        let mut s = state(4);
        let update = |c: u32| format!("max_parallel = 1\ncanary = {c}\nmin_healthy_time = \"1s\"");
        deployed(&mut s, web(before, "1h", &update(canary)));
        s.apply(&Command::RegisterJob(web(after, "2h", &update(canary))));
        assert_eq!(deployment(&s).groups[0].canaries, want, "{before} -> {after}, canary = {canary}");
        rounds(&mut s, before.min(after), 3);
        assert!(deployment(&s).awaits_promotion("g"), "{before} -> {after}: promoted by itself");
        assert_eq!(s.allocs_of_job(&id()).filter(|a| a.is_live() && a.canary).count(), want as usize);
        assert!(matches!(s.apply(&promote()), Effect::Evals(_)), "{before} -> {after}");
        rounds(&mut s, before.min(after), 8);
        assert_eq!(deployment(&s).status, DeploymentStatus::Successful, "{before} -> {after}: {:?}", deployment(&s));
        let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
        assert!(live.len() == after as usize && live.iter().all(|a| a.job_version == 1), "{live:?}");
    }
}

#[test]
fn auto_promote_promotes_healthy_canaries() {
    let mut s = state(4);
    let update = "canary = 2\nauto_promote = true\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    schedule_once(&mut s);
    assert_eq!(s.allocs_of_job(&id()).filter(|a| a.canary).count(), 2);
    report(&mut s, |_| Some(AllocHealth::Healthy));
    assert!(deployment(&s).groups[0].promoted, "{:?}", deployment(&s));
    for _ in 0..4 {
        schedule_once(&mut s);
        report(&mut s, |_| Some(AllocHealth::Healthy));
        check_serving(&s, 3);
    }
    assert_eq!(deployment(&s).status, DeploymentStatus::Successful);
}

#[test]
fn versions_are_kept_up_to_the_limit_and_any_kept_one_can_be_reverted_to() {
    let mut s = state(2);
    for v in 0..8u64 {
        s.apply(&Command::RegisterJob(web(1, &format!("{}s", v + 1), "")));
    }
    let job = s.job(&id()).unwrap().clone();
    assert_eq!(job.version, 7);
    let older: Vec<u64> = s.job_history(&id()).unwrap().older.iter().map(|j| j.version).collect();
    assert_eq!(older, (8 - JOB_VERSIONS_KEPT as u64..7).collect::<Vec<_>>());
    assert_eq!(s.job_version(&id(), 3).unwrap().groups[0].tasks[0].driver, web(1, "4s", "").groups[0].tasks[0].driver);
    let revert = |v| Command::RevertJob { job: id(), namespace: Arc::from("default"), version: v };
    assert!(matches!(s.apply(&revert(0)), Effect::Refused(m) if m.contains("no version 0")));
    assert!(matches!(s.apply(&revert(7)), Effect::Refused(m) if m.contains("what runs now")));
    let Effect::JobRegistered { version, .. } = s.apply(&revert(3)) else { panic!("reverted") };
    assert_eq!(version, 8);
    assert_eq!(Job { version: 3, ..s.job(&id()).unwrap().clone() }, *s.job_version(&id(), 3).unwrap());
    let other_namespace = Command::RevertJob { job: id(), namespace: Arc::from("other"), version: 4 };
    assert!(matches!(s.apply(&other_namespace), Effect::Refused(m) if m.contains("unknown job")));
}

#[test]
fn history_and_deployments_survive_a_snapshot() {
    let mut s = state(2);
    deployed(&mut s, web(2, "1h", "min_healthy_time = \"1s\""));
    s.apply(&Command::RegisterJob(web(2, "2h", "min_healthy_time = \"1s\"")));
    let restored = ClusterState::restore(&s.snapshot()).unwrap();
    assert_eq!(restored.job_history(&id()), s.job_history(&id()));
    assert_eq!(restored.snapshot(), s.snapshot());
}

/// Plans applied as the leader applies them: through `ApplyPlans`, with
/// the job's open evaluation (none: nothing to do).
fn schedule_as_leader(s: &mut ClusterState) -> Effect {
    let job = s.job(&id()).unwrap().clone();
    let Some(eval) = s.job_eval(&id()).filter(|e| e.status.is_open()).map(|e| e.id) else { return Effect::Done };
    let plan = schedule(s, &job, &SchedulerConfig::default());
    s.apply(&Command::ApplyPlans(vec![(eval, plan)]))
}

#[test]
fn an_instance_that_failed_before_a_deployment_opened_does_not_fail_it() {
    let mut s = state(4);
    let update = "max_parallel = 1\nauto_revert = true\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    // One instance fails after its version proved stable.
    let failed = s.allocs_of_job(&id()).next().unwrap().id;
    s.apply(&Command::AllocStatus(vec![AllocReport::status(failed, AllocStatus::Failed)]));
    schedule_as_leader(&mut s);
    report(&mut s, |_| Some(AllocHealth::Healthy));
    // Scaling down carries the failed one into the new version: the
    // deployment that opens does not judge it, and applying the plan that
    // stops an instance moves nothing it should not.
    let scale = Command::ScaleJob { job: id(), namespace: Arc::from("default"), group: Arc::from("g"), count: 2 };
    assert!(matches!(s.apply(&scale), Effect::JobRegistered { version: 1, .. }));
    let effect = schedule_as_leader(&mut s);
    assert!(matches!(effect, Effect::PlansApplied(_)), "{effect:?}");
    report(&mut s, |_| Some(AllocHealth::Healthy));
    let d = deployment(&s);
    assert_eq!((d.job_version, d.status), (1, DeploymentStatus::Successful), "{d:?}");
    assert_eq!(s.job(&id()).unwrap().version, 1, "nothing was rolled back");
}

#[test]
fn a_version_pushed_during_a_rollout_takes_over_and_finishes() {
    let mut s = state(4);
    let update = "max_parallel = 1\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    schedule_once(&mut s);
    report(&mut s, |_| None);
    // Index 0 now runs versions 0 and 1; version 2 replaces both.
    s.apply(&Command::RegisterJob(web(3, "3h", update)));
    assert_eq!(s.job_history(&id()).unwrap().deployments[1].status, DeploymentStatus::Cancelled);
    for round in 0.. {
        assert!(round < 20, "the deployment never ended: {:?}", deployment(&s));
        if deployment(&s).status != DeploymentStatus::Running {
            break;
        }
        schedule_once(&mut s);
        report(&mut s, |_| None);
        check_serving(&s, 3);
        report(&mut s, |_| Some(AllocHealth::Healthy));
    }
    assert_eq!((deployment(&s).job_version, deployment(&s).status), (2, DeploymentStatus::Successful));
    let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|a| a.job_version == 2));
}

#[test]
fn reverting_while_canaries_wait_ends_the_deployment_it_opens() {
    let mut s = state(4);
    let update = "canary = 1\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    schedule_once(&mut s);
    report(&mut s, |_| Some(AllocHealth::Healthy));
    assert_eq!(deployment(&s).status, DeploymentStatus::Running, "the canary waits for its promotion");
    let revert = Command::RevertJob { job: id(), namespace: Arc::from("default"), version: 0 };
    assert!(matches!(s.apply(&revert), Effect::JobRegistered { version: 2, .. }));
    for _ in 0..3 {
        schedule_as_leader(&mut s);
        report(&mut s, |_| Some(AllocHealth::Healthy));
        check_serving(&s, 3);
    }
    let d = deployment(&s);
    assert_eq!((d.job_version, d.status), (2, DeploymentStatus::Successful), "{d:?}");
    assert!(s.allocs_of_job(&id()).filter(|a| a.is_live()).all(|a| a.job_version == 2 && !a.canary));
}

#[test]
fn the_text_each_version_was_submitted_as_is_kept_with_it() {
    let mut s = state(2);
    let text = |v: u64| format!("# version {v}\n[job]\nname = \"web\"\n");
    for v in 0..8u64 {
        let submitted = Command::RegisterSubmitted { job: web(1, &format!("{}s", v + 1), ""), spec: text(v) };
        assert!(matches!(s.apply(&submitted), Effect::JobRegistered { .. }));
    }
    assert_eq!(s.submitted(&id(), 7), Some(text(7).as_str()));
    assert_eq!(s.submitted(&id(), 2), Some(text(2).as_str()));
    assert_eq!(s.submitted(&id(), 1), None, "gone with its version");
    assert_eq!(s.job_history(&id()).unwrap().submitted.len(), JOB_VERSIONS_KEPT);
    // The same spec again is no new version, and keeps the first text.
    let again = Command::RegisterSubmitted { job: web(1, "8s", ""), spec: "# again".into() };
    assert!(matches!(s.apply(&again), Effect::JobRegistered { version: 7, .. }));
    assert_eq!(s.submitted(&id(), 7), Some(text(7).as_str()));
    // A revert is submitted as what it reverts to.
    let revert = Command::RevertJob { job: id(), namespace: Arc::from("default"), version: 3 };
    assert!(matches!(s.apply(&revert), Effect::JobRegistered { version: 8, .. }));
    assert_eq!(s.submitted(&id(), 8), Some(text(3).as_str()));
    // Registered as a model (by a peer), it has no text.
    s.apply(&Command::RegisterJob(web(1, "9s", "")));
    assert_eq!(s.submitted(&id(), 9), None);
}

#[test]
fn a_drain_of_a_full_cluster_stops_no_healthy_instance_of_a_deployed_group() {
    let mut s = state(1);
    deployed(&mut s, web(2, "1h", "min_healthy_time = \"1s\""));
    let node = s.nodes()[0].id.clone();
    s.apply(&Command::DrainNode { node, drain: true, deadline_ms: None });
    let job = s.job(&id()).unwrap().clone();
    let plan = schedule(&s, &job, &SchedulerConfig::default());
    assert!(plan.stops.is_empty(), "nothing can move, so nothing stops: {:?}", plan.stops);
}

#[test]
fn an_unhealthy_instance_carried_into_a_new_deployment_is_replaced_and_the_deployment_ends() {
    let mut s = state(4);
    let update = "max_parallel = 1\nmin_healthy_time = \"1s\"";
    deployed(&mut s, web(3, "1h", update));
    s.apply(&Command::RegisterJob(web(3, "2h", update)));
    schedule_once(&mut s);
    report(&mut s, |_| None);
    // Scaled while version 1's first instance is in flight: it is carried
    // into version 2, then found unhealthy.
    let scale = Command::ScaleJob { job: id(), namespace: Arc::from("default"), group: Arc::from("g"), count: 3 };
    let _ = s.apply(&scale);
    let scale = Command::ScaleJob { job: id(), namespace: Arc::from("default"), group: Arc::from("g"), count: 4 };
    assert!(matches!(s.apply(&scale), Effect::JobRegistered { version: 2, .. }));
    let carried = s.allocs_of_job(&id()).find(|a| a.is_live() && a.job_version == 2).expect("carried").id;
    let bad = AllocReport {
        id: carried,
        status: AllocStatus::Running,
        tasks: Vec::new(),
        health: Some(AllocHealth::Unhealthy),
    };
    s.apply(&Command::AllocStatus(vec![bad]));
    for round in 0.. {
        assert!(round < 20, "the deployment never ended: {:?}", deployment(&s));
        if deployment(&s).status != DeploymentStatus::Running {
            break;
        }
        schedule_once(&mut s);
        report(&mut s, |_| None);
        report(&mut s, |a| (a.id != carried).then_some(AllocHealth::Healthy));
    }
    assert_eq!((deployment(&s).job_version, deployment(&s).status), (2, DeploymentStatus::Successful));
    let live: Vec<_> = s.allocs_of_job(&id()).filter(|a| a.is_live()).collect();
    assert_eq!(live.len(), 4);
    assert!(live.iter().all(|a| a.job_version == 2 && a.id != carried));
}
