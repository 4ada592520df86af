//! Scheduling a job that already has allocations: keep, stop, replace.

use cluster_core::diag::SourceFile;
use cluster_core::model::{AllocStatus, Job, NodeStatus, StopReason};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::ClusterState;

fn state(nodes: usize) -> ClusterState {
    let fleet =
        format!("[fleet]\nname = \"t\"\n[[class]]\nname = \"m\"\ncount = {nodes}\ncpu = 4\nmemory = \"16GiB\"\n");
    ClusterState::with_nodes(parse_fleet(&SourceFile::new("f.toml", fleet)).value.unwrap().nodes).unwrap()
}

fn job(kind: &str, count: u32, cpu: &str) -> Job {
    let text = format!(
        "[job]\nname = \"j\"\ntype = \"{kind}\"\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"{cpu}\", memory = \"1GiB\" }}\n"
    );
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

/// Registers the job, schedules and applies; returns the stored job.
fn run(state: &mut ClusterState, job: Job) -> Job {
    state.upsert_job(job.clone());
    let job = state.job(&job.id).unwrap().clone();
    let plan = schedule(state, &job, &SchedulerConfig::default());
    let applied = state.apply_plan(&plan);
    assert!(applied.refused.is_empty());
    job
}

fn live(state: &ClusterState, job: &Job) -> usize {
    state.allocs_of_job(&job.id).filter(|a| a.is_live()).count()
}

#[test]
fn a_placed_job_needs_nothing_more() {
    let mut s = state(4);
    let j = run(&mut s, job("service", 5, "1"));
    let again = schedule(&s, &j, &SchedulerConfig::default());
    assert!(again.placements.is_empty() && again.stops.is_empty(), "{again:?}");
}

#[test]
fn scaling_down_stops_the_highest_instances_in_place() {
    let mut s = state(4);
    run(&mut s, job("service", 5, "1"));
    let before: Vec<_> = s.allocs().map(|a| a.id).collect();
    s.upsert_job(job("service", 3, "1"));
    let j = s.job(&"j".into()).unwrap().clone();
    assert_eq!(j.version, 1, "a changed spec is a new version");
    let plan = schedule(&s, &j, &SchedulerConfig::default());
    assert!(plan.placements.is_empty(), "a count change restarts nothing");
    let mut stopped: Vec<u32> = plan.stops.iter().map(|st| s.alloc(st.alloc).unwrap().index).collect();
    stopped.sort();
    assert_eq!(stopped, vec![3, 4]);
    assert!(plan.stops.iter().all(|st| st.reason == StopReason::ScaledDown));
    s.apply_plan(&plan);
    assert_eq!(live(&s, &j), 3);
    assert!(s.allocs().filter(|a| a.is_live()).all(|a| before.contains(&a.id)));
}

#[test]
fn scaling_up_adds_only_the_new_instances() {
    let mut s = state(4);
    run(&mut s, job("service", 2, "1"));
    s.upsert_job(job("service", 5, "1"));
    let j = s.job(&"j".into()).unwrap().clone();
    let plan = schedule(&s, &j, &SchedulerConfig::default());
    assert!(plan.stops.is_empty());
    let mut placed: Vec<u32> = plan.placements.iter().map(|p| p.index).collect();
    placed.sort();
    assert_eq!(placed, vec![2, 3, 4]);
}

#[test]
fn registering_the_same_spec_again_keeps_the_version() {
    let mut s = state(2);
    run(&mut s, job("service", 2, "1"));
    assert_eq!(s.upsert_job(job("service", 2, "1")), 0);
}

#[test]
fn instances_on_a_down_node_are_replaced_elsewhere() {
    let mut s = state(4);
    let j = run(&mut s, job("service", 6, "1"));
    let victim = s.allocs_of_job(&j.id).next().unwrap().node.clone();
    let lost: Vec<u32> = s.allocs_of_job(&j.id).filter(|a| a.node == victim).map(|a| a.index).collect();
    s.set_node_status(&victim, NodeStatus::Down, true).unwrap();
    let plan = schedule(&s, &j, &SchedulerConfig::default());
    assert_eq!(plan.stops.len(), lost.len());
    assert!(plan.stops.iter().all(|st| st.reason == StopReason::NodeLost));
    let mut replaced: Vec<u32> = plan.placements.iter().map(|p| p.index).collect();
    replaced.sort();
    assert_eq!(replaced, lost, "the lost instances, by index, are placed again");
    assert!(plan.placements.iter().all(|p| p.node != victim));
}

#[test]
fn a_new_version_replaces_every_instance() {
    let mut s = state(4);
    run(&mut s, job("service", 3, "1"));
    let v2 = job("service", 3, "500m");
    s.upsert_job(v2.clone());
    let j = s.job(&v2.id).unwrap().clone();
    let plan = schedule(&s, &j, &SchedulerConfig::default());
    assert_eq!(plan.stops.len(), 3);
    assert!(plan.stops.iter().all(|st| st.reason == StopReason::Updated));
    assert_eq!(plan.placements.len(), 3);
    assert!(plan.placements.iter().all(|p| p.resources.cpu_millis == 500));
}

#[test]
fn completed_batch_instances_are_not_run_again_but_failed_ones_are() {
    let mut s = state(2);
    let j = run(&mut s, job("batch", 3, "1"));
    let ids: Vec<_> = s.allocs_of_job(&j.id).map(|a| a.id).collect();
    s.set_alloc_status(ids[0], AllocStatus::Complete);
    s.set_alloc_status(ids[1], AllocStatus::Failed);
    let failed_index = s.alloc(ids[1]).unwrap().index;
    let plan = schedule(&s, &j, &SchedulerConfig::default());
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].index, failed_index);
}

#[test]
fn a_stopped_job_stops_everything() {
    let mut s = state(2);
    let mut j = run(&mut s, job("service", 3, "1"));
    j.stopped = true;
    let plan = schedule(&s, &j, &SchedulerConfig::default());
    assert_eq!(plan.stops.len(), 3);
    assert!(plan.placements.is_empty());
}

#[test]
fn terminal_allocations_free_their_resources() {
    let mut s = state(1);
    let j = run(&mut s, job("batch", 4, "1"));
    let idx = s.node_idx(&s.nodes()[0].id.clone()).unwrap();
    assert_eq!(s.usage(idx).res.cpu_millis, 4000);
    let ids: Vec<_> = s.allocs_of_job(&j.id).map(|a| a.id).collect();
    for id in ids {
        s.set_alloc_status(id, AllocStatus::Complete);
    }
    assert_eq!(s.usage(idx).res.cpu_millis, 0);
    assert_eq!(s.recomputed_usage()[0], *s.usage(idx));
}

#[test]
fn a_stale_plan_cannot_over_commit() {
    let mut s = state(1);
    let a = job("service", 3, "1");
    let mut b = job("service", 3, "1");
    b.id = "other".into();
    s.upsert_job(a.clone());
    s.upsert_job(b.clone());
    // Both planned against the same empty state: each fits alone.
    let pa = schedule(&s, &a, &SchedulerConfig::default());
    let pb = schedule(&s, &b, &SchedulerConfig::default());
    assert_eq!(s.apply_plan(&pa).placed.len(), 3);
    let second = s.apply_plan(&pb);
    assert_eq!(second.placed.len(), 1, "only one cpu was left");
    assert_eq!(second.refused.len(), 2);
    assert!(s.usage(cluster_core::ids::NodeIdx(0)).res.cpu_millis <= 4000);
}

fn at_most_once(mut j: Job) -> Job {
    j.groups[0].on_disconnect = cluster_core::model::job::OnDisconnect::Stop;
    j
}

/// A public report of another orchestrator, replayed: an update no node
/// can fit stopped every instance of the old version.
#[test]
fn an_update_that_fits_nowhere_takes_nothing_down() {
    for make in [|j: Job| j, at_most_once] {
        let mut s = state(5);
        let v1 = run(&mut s, make(job("service", 3, "500m")));
        s.upsert_job(make(job("service", 3, "500")));
        let v2 = s.job(&v1.id).unwrap().clone();
        assert_eq!(v2.version, v1.version + 1);
        let plan = schedule(&s, &v2, &SchedulerConfig::default());
        assert!(plan.stops.is_empty(), "the old version keeps running: {plan:?}");
        assert!(plan.placements.is_empty());
        assert_eq!(plan.unplaced_count(), 3, "the new version is reported unplaceable");
        let reasons = plan.unplaced.iter().map(|u| u.explain()).collect::<Vec<_>>().join("; ");
        assert!(reasons.contains("cpu"), "{reasons}");
        s.apply_plan(&plan);
        assert_eq!(live(&s, &v1), 3);
    }
}

/// On a full cluster, an update that fits only where the old instances run
/// stops them (the replacements follow once they have stopped).
#[test]
fn an_update_that_fits_once_the_old_instances_stop_goes_ahead() {
    for make in [|j: Job| j, at_most_once] {
        let mut s = state(2);
        let v1 = run(&mut s, make(job("service", 2, "4")));
        s.upsert_job(make(job("service", 2, "3")));
        let v2 = s.job(&v1.id).unwrap().clone();
        let plan = schedule(&s, &v2, &SchedulerConfig::default());
        assert_eq!(plan.stops.len(), 2, "{plan:?}");
        assert!(plan.stops.iter().all(|st| st.reason == StopReason::Updated));
        assert!(plan.placements.is_empty(), "no room until they stop");
    }
}

/// Two old instances on one node with room for one new one: only one is
/// stopped, never both on the strength of the same freed room.
#[test]
fn replacements_never_count_on_the_same_freed_room() {
    let mut s = state(1);
    let v1 = run(&mut s, job("service", 2, "1"));
    s.upsert_job(job("service", 2, "3"));
    let v2 = s.job(&v1.id).unwrap().clone();
    let plan = schedule(&s, &v2, &SchedulerConfig::default());
    assert_eq!(plan.stops.len(), 1, "{plan:?}");
    assert_eq!(plan.unplaced_count(), 2);
}

/// `hanse job scale`: the count changes and nothing running restarts;
/// an unknown group is refused with the job's groups named.
#[test]
fn scaling_by_command_restarts_nothing() {
    use cluster_core::command::{Command, Effect};
    let mut s = state(4);
    let j = run(&mut s, job("service", 2, "1"));
    let before: Vec<_> = s.allocs_of_job(&j.id).map(|a| a.id).collect();
    let scale = |group: &str, count| Command::ScaleJob {
        job: j.id.clone(),
        namespace: j.namespace.clone(),
        group: group.into(),
        count,
    };
    let Effect::JobRegistered { version, .. } = s.apply(&scale("g", 4)) else { panic!("not scaled") };
    assert_eq!(version, j.version + 1);
    let now = s.job(&j.id).unwrap().clone();
    assert_eq!(now.groups[0].count, 4);
    let plan = schedule(&s, &now, &SchedulerConfig::default());
    assert!(plan.stops.is_empty(), "{plan:?}");
    assert_eq!(plan.placements.iter().map(|p| p.index).collect::<Vec<_>>(), vec![2, 3]);
    assert!(s.allocs_of_job(&j.id).all(|a| before.contains(&a.id) && a.job_version == version));
    assert_eq!(s.apply(&scale("nope", 1)), Effect::Refused("job j has no group `nope` (its groups: g)".into()));
    let elsewhere = Command::ScaleJob { job: j.id.clone(), namespace: "other".into(), group: "g".into(), count: 1 };
    assert_eq!(s.apply(&elsewhere), Effect::Refused("unknown job j".into()));
}

/// `hanse alloc stop`: the allocation stops and its index is placed again;
/// at-most-once work only once it has stopped.
#[test]
fn a_stopped_allocation_is_placed_again() {
    use cluster_core::command::{Command, Effect};
    for once in [false, true] {
        let mut s = state(4);
        let spec = job("service", 2, "1");
        let j = run(&mut s, if once { at_most_once(spec) } else { spec });
        let victim = s.allocs_of_job(&j.id).find(|a| a.index == 0).unwrap().id;
        let Effect::Evals(evals) = s.apply(&Command::StopAlloc(victim)) else { panic!("not stopped") };
        assert_eq!(evals.len(), 1);
        assert!(!s.alloc(victim).unwrap().is_live());
        let plan = schedule(&s, &j, &SchedulerConfig::default());
        let placed: Vec<u32> = plan.placements.iter().map(|p| p.index).collect();
        assert_eq!(placed, if once { vec![] } else { vec![0] }, "at most once: {once}");
        s.set_alloc_status(victim, AllocStatus::Complete);
        let plan = schedule(&s, &j, &SchedulerConfig::default());
        assert_eq!(plan.placements.iter().map(|p| p.index).collect::<Vec<_>>(), vec![0]);
        // Again: nothing changes.
        assert_eq!(s.apply(&Command::StopAlloc(victim)), Effect::Evals(Vec::new()));
    }
}

/// A drained instance stops only once it can move: replaced on another
/// node in the same plan (at-most-once work: a node that fits it exists);
/// with nowhere to go it runs on, counted unplaced, until the deadline.
#[test]
fn a_drain_moves_what_can_move_and_keeps_the_rest_until_its_deadline() {
    use cluster_core::command::{Command, Effect};
    for once in [false, true] {
        let mut s = state(2);
        let spec = job("service", 2, "3");
        let j = run(&mut s, if once { at_most_once(spec) } else { spec });
        let victim = s.allocs_of_job(&j.id).find(|a| a.index == 0).unwrap().clone();
        let drain = Command::DrainNode { node: victim.node.clone(), drain: true, deadline_ms: Some(1) };
        assert!(matches!(s.apply(&drain), Effect::Evals(e) if e.len() == 1));
        // The other node has 1 core free: nowhere to go.
        let plan = schedule(&s, &j, &SchedulerConfig::default());
        assert!(plan.stops.is_empty(), "once: {once}: {plan:?}");
        assert_eq!(plan.unplaced_count(), 1);
        // A new node: it moves.
        let fleet = "[fleet]\nname = \"t\"\n[[class]]\nname = \"n\"\ncount = 1\ncpu = 4\nmemory = \"16GiB\"\n";
        let extra = parse_fleet(&SourceFile::new("f.toml", fleet)).value.unwrap().nodes;
        s.apply(&Command::UpsertNode(extra[0].clone()));
        let plan = schedule(&s, &j, &SchedulerConfig::default());
        assert_eq!(plan.stops.len(), 1, "once: {once}: {plan:?}");
        assert_eq!(plan.stops[0].reason, StopReason::Drained);
        // At most once: placed only once the old one has stopped.
        assert_eq!(plan.placements.len(), usize::from(!once));
        // The deadline stops whatever is left, once.
        let Effect::Evals(evals) = s.apply(&Command::DrainDeadline(victim.node.clone())) else { panic!() };
        assert_eq!(evals.len(), 1);
        assert!(!s.alloc(victim.id).unwrap().is_live());
        assert_eq!(s.apply(&Command::DrainDeadline(victim.node.clone())), Effect::Evals(Vec::new()));
    }
}

/// `hanse node eligibility`: an ineligible node takes no new work and
/// keeps what it runs; a draining one is not made eligible behind the
/// drain's back.
#[test]
fn an_ineligible_node_takes_no_new_work_and_keeps_its_own() {
    use cluster_core::command::{Command, Effect};
    let mut s = state(1);
    let j = run(&mut s, job("service", 1, "1"));
    let node = s.nodes()[0].id.clone();
    s.apply(&Command::NodeEligibility { node: node.clone(), eligible: false });
    assert!(!s.nodes()[0].schedulable());
    assert_eq!(live(&s, &j), 1);
    let more = job("service", 2, "1");
    s.upsert_job(more.clone());
    let plan = schedule(&s, s.job(&more.id).unwrap(), &SchedulerConfig::default());
    assert!(plan.placements.is_empty() && plan.stops.is_empty(), "{plan:?}");
    s.apply(&Command::NodeEligibility { node: node.clone(), eligible: true });
    assert!(s.nodes()[0].schedulable());
    s.apply(&Command::DrainNode { node: node.clone(), drain: true, deadline_ms: None });
    let refused = s.apply(&Command::NodeEligibility { node: node.clone(), eligible: true });
    assert!(matches!(&refused, Effect::Refused(m) if m.contains("is draining")), "{refused:?}");
    let unknown = s.apply(&Command::NodeEligibility { node: "nope".into(), eligible: true });
    assert_eq!(unknown, Effect::Refused("unknown node nope".into()));
}

/// At-most-once replacements never count twice on the same room: the
/// trial's placement and the room freed where an old instance runs are
/// checked on one scratch plan (review of the first version).
#[test]
fn at_most_once_replacements_never_count_twice_on_one_room() {
    let fleet = "[fleet]\nname = \"t\"\n[[class]]\nname = \"x\"\ncount = 1\ncpu = 4\nmemory = \"16GiB\"\n\
                 [[class]]\nname = \"y\"\ncount = 1\ncpu = 10\nmemory = \"16GiB\"\n";
    let nodes = parse_fleet(&SourceFile::new("f.toml", fleet)).value.unwrap().nodes;
    let mut s = ClusterState::with_nodes(nodes).unwrap();
    let spread = |cpu: &str| {
        let mut j = at_most_once(job("service", 2, cpu));
        j.groups[0].distinct_hosts = true;
        j
    };
    let v1 = run(&mut s, spread("4"));
    s.upsert_job(spread("6"));
    let v2 = s.job(&v1.id).unwrap().clone();
    let plan = schedule(&s, &v2, &SchedulerConfig::default());
    // Room for one new instance (on y): one old one stops, the other runs on.
    assert_eq!(plan.stops.len(), 1, "{plan:?}");
    assert_eq!(plan.unplaced_count(), 1);
}

/// Replacement stops keep to the plan's cap: a stop goes with its
/// placement, and what the cap left out waits for the next part.
#[test]
fn replacements_keep_to_the_plan_cap() {
    let mut s = state(10);
    let v1 = run(&mut s, job("service", 5, "1"));
    s.upsert_job(job("service", 5, "2"));
    let v2 = s.job(&v1.id).unwrap().clone();
    let config = SchedulerConfig { max_changes_per_plan: 3, ..Default::default() };
    let plan = schedule(&s, &v2, &config);
    assert_eq!(plan.placements.len(), 3, "{plan:?}");
    let placed: Vec<u32> = plan.placements.iter().map(|p| p.index).collect();
    assert_eq!(plan.stops.len(), 3);
    assert!(plan.stops.iter().all(|st| placed.contains(&s.alloc(st.alloc).unwrap().index)));
    assert_eq!(plan.deferred, 2);
}
