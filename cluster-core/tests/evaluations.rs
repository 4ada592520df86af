//! Evaluations in the replicated state, and the leader's broker: which
//! commands open them, how plans close them, and what runs when.

use cluster_core::command::{Command, Effect};
use cluster_core::diag::SourceFile;
use cluster_core::ids::{EvalId, JobId};
use cluster_core::model::alloc::AllocReport;
use cluster_core::model::{AllocStatus, EvalStatus, EvalTrigger, Job, NodeStatus};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::server::broker::Broker;
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::{ClusterState, PlanOutcome};

fn state(nodes: usize) -> ClusterState {
    let fleet =
        format!("[fleet]\nname = \"t\"\n[[class]]\nname = \"m\"\ncount = {nodes}\ncpu = 4\nmemory = \"16GiB\"\n");
    let mut s = ClusterState::new();
    for n in parse_fleet(&SourceFile::new("f.toml", fleet)).value.unwrap().nodes {
        s.apply(&Command::UpsertNode(n));
    }
    s
}

fn job(name: &str, count: u32, cpu: &str) -> Job {
    let text = format!(
        "[job]\nname = \"{name}\"\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"{cpu}\", memory = \"1GiB\" }}\n"
    );
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

fn register(s: &mut ClusterState, j: &Job) -> EvalId {
    match s.apply(&Command::RegisterJob(j.clone())) {
        Effect::JobRegistered { eval, .. } => eval,
        other => panic!("{other:?}"),
    }
}

/// Plans and commits the evaluation as a worker would.
fn work(s: &mut ClusterState, eval: EvalId) -> PlanOutcome {
    let job = s.job(&s.eval(eval).unwrap().job).unwrap().clone();
    let plan = schedule(s, &job, &SchedulerConfig::default());
    match s.apply(&Command::ApplyPlans(vec![(eval, plan)])) {
        Effect::PlansApplied(mut o) => o.remove(0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn registering_opens_an_evaluation_and_its_plan_closes_it() {
    let mut s = state(2);
    let e = register(&mut s, &job("a", 3, "1"));
    assert_eq!(s.pending_evals().collect::<Vec<_>>(), vec![e]);
    assert!(matches!(work(&mut s, e), PlanOutcome::Applied(a) if a.placed.len() == 3));
    let eval = s.eval(e).unwrap();
    assert_eq!((eval.status, eval.placed), (EvalStatus::Complete, 3));
    assert_eq!(s.pending_evals().count(), 0);
}

#[test]
fn the_same_spec_again_changes_nothing_while_its_evaluation_is_open() {
    let mut s = state(2);
    let j = job("a", 3, "1");
    let e1 = register(&mut s, &j);
    let e2 = register(&mut s, &j);
    assert_eq!(e1, e2, "a retried submission is the same evaluation");
    assert_eq!(s.pending_evals().count(), 1);
}

#[test]
fn a_newer_evaluation_supersedes_the_open_one_and_its_late_plan_is_refused() {
    let mut s = state(2);
    let e1 = register(&mut s, &job("a", 3, "1"));
    let stale = schedule(&s, &s.job(&JobId::new("a")).unwrap().clone(), &SchedulerConfig::default());
    let e2 = register(&mut s, &job("a", 4, "1"));
    assert_ne!(e1, e2);
    assert!(s.eval(e1).is_none(), "the superseded evaluation is gone");
    let late = s.apply(&Command::ApplyPlans(vec![(e1, stale)]));
    assert_eq!(late, Effect::PlansApplied(vec![PlanOutcome::Superseded]));
    assert_eq!(s.allocs().count(), 0, "nothing of the stale plan was applied");
    assert!(matches!(work(&mut s, e2), PlanOutcome::Applied(a) if a.placed.len() == 4));
}

#[test]
fn what_does_not_fit_blocks_until_capacity_appears() {
    let mut s = state(1);
    let e = register(&mut s, &job("big", 6, "1"));
    let epoch = s.capacity_epoch();
    work(&mut s, e);
    let eval = s.eval(e).unwrap();
    assert_eq!((eval.status, eval.placed), (EvalStatus::Blocked, 4));
    assert!(eval.unplaced[0].explain().contains("cpu"), "{:?}", eval.unplaced);
    assert_eq!(s.blocked_evals().collect::<Vec<_>>(), vec![e]);
    // A new node is capacity: the hint rises, and the retry places the rest.
    let more = state(2).nodes()[1].clone();
    s.apply(&Command::UpsertNode(more));
    assert!(s.capacity_epoch() > epoch);
    work(&mut s, e);
    assert_eq!(s.eval(e).unwrap().status, EvalStatus::Complete);
    assert_eq!(s.allocs().filter(|a| a.is_live()).count(), 6);
}

#[test]
fn a_node_going_down_loses_its_allocations_and_opens_an_evaluation_per_job() {
    let mut s = state(2);
    for name in ["a", "b"] {
        let e = register(&mut s, &job(name, 2, "1"));
        work(&mut s, e);
    }
    let node = s.allocs().next().unwrap().node.clone();
    let on_node = s.allocs().filter(|a| a.node == node).count();
    let effect = s.apply(&Command::SetNodeStatus { node: node.clone(), status: NodeStatus::Down, eligible: true });
    let Effect::Evals(evals) = effect else { panic!("{effect:?}") };
    assert!(!evals.is_empty());
    assert!(evals.iter().all(|e| s.eval(*e).unwrap().trigger == EvalTrigger::NodeDown));
    assert_eq!(s.allocs().filter(|a| a.node == node && a.status == AllocStatus::Lost).count(), on_node);
    // Down again is not news.
    let again = s.apply(&Command::SetNodeStatus { node, status: NodeStatus::Down, eligible: true });
    assert_eq!(again, Effect::Evals(vec![]));
}

#[test]
fn a_drain_moves_allocations_and_a_failure_is_rescheduled_a_bounded_number_of_times() {
    let mut s = state(3);
    let mut j = job("a", 2, "1");
    let limit =
        "[job]\nname = \"a\"\n[[group]]\nname = \"g\"\ncount = 2\nreschedule = { attempts = 3, interval = \"1h\" }\n";
    j.groups[0].reschedule =
        parse_job(&SourceFile::new("j.toml", format!("{limit}[[group.task]]\nname = \"t\"\ndriver = \"mock\"\n")))
            .value
            .unwrap()
            .groups[0]
            .reschedule;
    let e = register(&mut s, &j);
    work(&mut s, e);
    let node = s.allocs().next().unwrap().node.clone();
    let Effect::Evals(evals) = s.apply(&Command::DrainNode { node: node.clone(), drain: true, deadline_ms: None })
    else {
        panic!()
    };
    assert_eq!(evals.len(), 1);
    work(&mut s, evals[0]);
    assert!(s.allocs().filter(|a| a.is_live()).all(|a| a.node != node), "nothing wanted on the draining node");
    assert_eq!(s.allocs().filter(|a| a.is_live()).count(), 2);

    // An instance that keeps failing is placed again at most 3 times
    // (its policy: 3 an hour; these failures come without a time, so
    // they all count and none waits).
    for round in 0..6 {
        let failing: Vec<_> = s
            .allocs()
            .filter(|a| a.is_live() && a.index == 0)
            .map(|a| AllocReport::status(a.id, AllocStatus::Failed))
            .collect();
        if failing.is_empty() {
            assert!(round > 3, "given up after {round} failures");
            break;
        }
        let Effect::Evals(evals) = s.apply(&Command::AllocStatus(failing)) else { panic!() };
        assert_eq!(s.eval(evals[0]).unwrap().trigger, EvalTrigger::AllocFailed);
        work(&mut s, evals[0]);
    }
    let failed = s.allocs().filter(|a| a.index == 0 && a.status == AllocStatus::Failed).count();
    assert_eq!(failed, 4, "the first run and 3 reschedules");
}

#[test]
fn the_broker_runs_one_evaluation_per_job_at_a_time_oldest_first() {
    let mut s = state(2);
    let a = register(&mut s, &job("a", 1, "1"));
    let b = register(&mut s, &job("b", 1, "1"));
    let mut broker = Broker::default();
    let first = broker.next_batch(&s, 0);
    assert_eq!(first.iter().map(|w| w.eval).collect::<Vec<_>>(), vec![a, b], "oldest first, both jobs at once");
    // A newer evaluation of a job in flight waits for the one in flight.
    let a2 = register(&mut s, &job("a", 2, "1"));
    assert!(broker.next_batch(&s, 0).is_empty(), "job a is in flight; b has nothing new");
    broker.done(&first);
    // Neither was committed: both are handed out again, oldest first.
    assert_eq!(broker.next_batch(&s, 0).iter().map(|w| w.eval).collect::<Vec<_>>(), vec![b, a2]);
}

#[test]
fn a_plan_repeated_from_a_stale_state_never_places_an_instance_twice() {
    // A new leader may plan an evaluation again before it has applied the
    // old leader's plan for it; the second plan must not double anything.
    let mut s = state(1);
    let e = register(&mut s, &job("big", 6, "1"));
    let job = s.job(&JobId::new("big")).unwrap().clone();
    let stale = schedule(&s, &job, &SchedulerConfig::default());
    assert_eq!(stale.placements.len(), 4, "4 fit on the one node");
    s.apply(&Command::ApplyPlans(vec![(e, stale.clone())]));
    assert_eq!(s.eval(e).unwrap().status, EvalStatus::Blocked, "still open: 2 did not fit");
    s.apply(&Command::UpsertNode(state(2).nodes()[1].clone()));
    let again = s.apply(&Command::ApplyPlans(vec![(e, stale)]));
    let Effect::PlansApplied(outcomes) = again else { panic!() };
    let PlanOutcome::Applied(applied) = &outcomes[0] else { panic!("{outcomes:?}") };
    assert!(applied.placed.is_empty(), "{applied:?}");
    assert!(applied.refused.iter().all(|r| r.reason == cluster_core::model::Reason::AlreadyPlaced));
    assert_eq!(s.allocs().filter(|a| a.is_live()).count(), 4);
    let mut indexes: Vec<u32> = s.allocs().map(|a| a.index).collect();
    indexes.dedup();
    assert_eq!(indexes.len(), 4, "no index twice");
}

#[test]
fn a_node_registering_again_keeps_what_the_cluster_decided_about_it() {
    let mut s = state(2);
    let node = s.nodes()[0].clone();
    s.apply(&Command::DrainNode { node: node.id.clone(), drain: true, deadline_ms: None });
    s.apply(&Command::SetNodeStatus { node: node.id.clone(), status: NodeStatus::Down, eligible: false });
    let mut again = node.clone();
    again.status = NodeStatus::Ready;
    again.eligible = true;
    again.draining = false;
    s.apply(&Command::UpsertNode(again));
    let n = s.node(s.node_idx(&node.id).unwrap());
    assert_eq!((n.status, n.eligible, n.draining), (NodeStatus::Down, false, true));
}

/// A job bigger than one plan carries is planned in parts: each part is
/// committed, the evaluation stays pending in between (another job's
/// evaluation is served beside it), and it completes once everything is
/// placed; a stop of the whole job goes in parts too (security review,
/// row 16: one plan over the log's entry limit was retried forever).
#[test]
fn a_job_bigger_than_one_plan_is_planned_in_parts_and_never_stalls() {
    let mut s = state(20);
    let config = SchedulerConfig { max_changes_per_plan: 7, ..SchedulerConfig::default() };
    let plan_and_commit = |s: &mut ClusterState, eval: EvalId| {
        let job = s.job(&s.eval(eval).unwrap().job).unwrap().clone();
        let plan = schedule(s, &job, &config);
        assert!(plan.placements.len() + plan.stops.len() <= 7, "a part over the cap");
        match s.apply(&Command::ApplyPlans(vec![(eval, plan)])) {
            Effect::PlansApplied(mut o) => o.remove(0),
            other => panic!("{other:?}"),
        }
    };
    let big = register(&mut s, &job("big", 30, "100m"));
    let small = register(&mut s, &job("small", 2, "100m"));
    let mut rounds = 0;
    while s.eval(big).unwrap().status == EvalStatus::Pending {
        plan_and_commit(&mut s, big);
        rounds += 1;
        assert!(rounds <= 5, "30 instances in parts of 7 take 5 rounds");
        if rounds == 1 {
            assert_eq!(s.eval(big).unwrap().placed, 7);
            // The other job is not held up by the big one.
            plan_and_commit(&mut s, small);
            assert_eq!(s.eval(small).unwrap().status, EvalStatus::Complete);
        }
    }
    assert_eq!(rounds, 5);
    assert_eq!(s.eval(big).unwrap().status, EvalStatus::Complete);
    assert_eq!(s.allocs_of_job(&JobId::new("big")).filter(|a| a.is_live()).count(), 30);
    // Stopping it: stops in parts of 7, the evaluation pending until done.
    let stop = match s.apply(&Command::StopJob(JobId::new("big"))) {
        Effect::JobRegistered { eval, .. } => eval,
        other => panic!("{other:?}"),
    };
    let mut rounds = 0;
    while s.eval(stop).unwrap().status == EvalStatus::Pending {
        plan_and_commit(&mut s, stop);
        rounds += 1;
        assert!(rounds <= 5);
    }
    assert_eq!(rounds, 5);
    assert!(s.allocs_of_job(&JobId::new("big")).all(|a| a.desired == cluster_core::model::DesiredStatus::Stop));
}

/// A part that places nothing (the cluster is full) blocks the evaluation
/// like any unplaceable work, rather than asking again forever; capacity
/// brings it back.
#[test]
fn a_part_that_places_nothing_blocks_until_capacity_appears() {
    let mut s = state(1);
    let config = SchedulerConfig { max_changes_per_plan: 7, ..SchedulerConfig::default() };
    let big = register(&mut s, &job("big", 30, "4"));
    let job = s.job(&JobId::new("big")).unwrap().clone();
    let first = schedule(&s, &job, &config);
    assert!(first.is_partial());
    s.apply(&Command::ApplyPlans(vec![(big, first)]));
    assert_eq!(s.eval(big).unwrap().status, EvalStatus::Pending, "one placed: the next part follows");
    let second = schedule(&s, &job, &config);
    assert!(second.is_partial() && second.placements.is_empty());
    s.apply(&Command::ApplyPlans(vec![(big, second)]));
    assert_eq!(s.eval(big).unwrap().status, EvalStatus::Blocked, "the cluster is full");
}

/// The longest names a spec and a node may carry, in a plan of the
/// default size, still fit one log entry.
#[test]
fn a_full_plan_with_the_longest_names_fits_one_log_entry() {
    use cluster_core::model::plan::{Placement, Plan};
    use cluster_core::resources::Resources;
    let group: std::sync::Arc<str> = "g".repeat(64).into();
    let placements = (0..cluster_core::scheduler::PLAN_CHANGES_MAX)
        .map(|i| Placement {
            group: group.clone(),
            index: 1_000_000 + i as u32,
            node: cluster_core::ids::NodeId::new("n".repeat(128)),
            node_idx: cluster_core::ids::NodeIdx(50_000),
            resources: Resources { cpu_millis: u64::MAX / 3, memory_bytes: u64::MAX / 3, ..Resources::default() },
            gpus: None,
            score: 0.123,
        })
        .collect();
    let plan = Plan {
        job: JobId::new("j".repeat(64)),
        job_version: u64::MAX,
        placements,
        stops: Vec::new(),
        unplaced: Vec::new(),
        nodes_evaluated: u64::MAX,
        deferred: 1,
        wait_until_ms: Some(u64::MAX),
        made_at_ms: Some(u64::MAX),
    };
    let bytes = cluster_core::codec::encode(&Command::ApplyPlans(vec![(EvalId(u64::MAX), plan)]));
    assert!(bytes.len() < cluster_core::raft::node::ENTRY_BYTES_MAX, "{} bytes", bytes.len());
}

/// A job planned in parts does not hold a newer job back: once it placed
/// a part, a fresh evaluation is handed out before its next part, in the
/// same batch (security review, row 16: a 3-instance job waited behind a
/// huge one).
#[test]
fn a_newer_job_goes_before_the_next_part_of_a_big_one() {
    let mut s = state(20);
    let config = SchedulerConfig { max_changes_per_plan: 7, ..SchedulerConfig::default() };
    let big = register(&mut s, &job("big", 30, "100m"));
    let job_big = s.job(&JobId::new("big")).unwrap().clone();
    let part = schedule(&s, &job_big, &config);
    s.apply(&Command::ApplyPlans(vec![(big, part)]));
    assert_eq!(s.eval(big).unwrap().status, EvalStatus::Pending);
    let small = register(&mut s, &job("small", 2, "100m"));
    let batch = Broker::default().next_batch(&s, 0);
    let order: Vec<EvalId> = batch.iter().map(|w| w.eval).collect();
    assert_eq!(order, [small, big], "the fresh job first, the big one's next part after it");
}

/// Plans every pending evaluation, as the leader's workers would.
fn settle(s: &mut ClusterState) {
    let open: Vec<EvalId> = s.pending_evals().collect();
    for e in open {
        work(s, e);
    }
}

fn system_job(name: &str, constraint: Option<&str>) -> Job {
    let constraint = constraint.map(|c| format!("[[group.constraint]]\n{c}\n")).unwrap_or_default();
    let text = format!(
        "[job]\nname = \"{name}\"\ntype = \"system\"\n[[group]]\nname = \"g\"\n{constraint}[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"100m\", memory = \"64MiB\" }}\n"
    );
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

/// Reports every stopping allocation of `job` ended, as its agent would.
fn end_stopping(s: &mut ClusterState, job: &JobId) {
    let ids: Vec<_> = s
        .allocs_of_job(job)
        .filter(|a| a.desired == cluster_core::model::DesiredStatus::Stop && !a.status.is_terminal())
        .map(|a| a.id)
        .collect();
    s.apply(&Command::AllocStatus(ids.into_iter().map(|id| AllocReport::status(id, AllocStatus::Complete)).collect()));
}

/// Issue 16, item 6: a system job follows its nodes. A node that joins, is
/// changed so that it fits, comes back up or is eligible again runs an
/// instance; one changed so that it no longer fits has its instance
/// stopped; a node's next instance waits for the one stopping there; the
/// instances elsewhere are left alone; an agent's restart (a new port, a
/// new free-disk figure) opens nothing; nodes that change while an
/// evaluation is open do not cancel it, and it runs once more after.
#[test]
fn system_jobs_follow_their_nodes() {
    let mut s = state(2);
    let e =
        register(&mut s, &system_job("logs", Some("attribute = \"${meta.tier}\"\noperator = \"!=\"\nvalue = \"gpu\"")));
    work(&mut s, e);
    let job = JobId::new("logs");
    let on = |s: &ClusterState| {
        let mut v: Vec<String> = s.allocs_of_job(&job).filter(|a| a.is_live()).map(|a| a.node.to_string()).collect();
        v.sort();
        v
    };
    let first: Vec<_> = s.allocs_of_job(&job).map(|a| a.id).collect();
    assert_eq!(on(&s).len(), 2);
    // A node joins.
    let mut extra = s.nodes()[0].clone();
    extra.id = "late-node".into();
    s.apply(&Command::UpsertNode(extra.clone()));
    assert_eq!(s.eval(s.pending_evals().next().expect("an evaluation")).unwrap().trigger, EvalTrigger::NodeUpdate);
    settle(&mut s);
    assert!(on(&s).contains(&"late-node".to_string()), "{:?}", on(&s));
    // It re-registers with an attribute the job's constraint rules out.
    let mut gpu = extra.clone();
    gpu.meta.insert("tier".into(), "gpu".into());
    s.apply(&Command::UpsertNode(gpu));
    let plan = schedule(&s, s.job(&job).unwrap(), &SchedulerConfig::default());
    assert_eq!(
        plan.stops.iter().map(|x| x.reason).collect::<Vec<_>>(),
        [cluster_core::model::plan::StopReason::NodeUnfit]
    );
    settle(&mut s);
    assert!(!on(&s).contains(&"late-node".to_string()), "the unfit node still runs it");
    // And back: it fits again, but its next instance waits for the
    // stopping one to end.
    s.apply(&Command::UpsertNode(extra.clone()));
    settle(&mut s);
    assert!(!on(&s).contains(&"late-node".to_string()), "two instances on one node");
    end_stopping(&mut s, &job);
    settle(&mut s);
    assert!(on(&s).contains(&"late-node".to_string()), "it did not come back once the old one ended");
    // An agent restarting sends another port and free-disk figure: nothing opens.
    let mut restarted = extra.clone();
    restarted.capacity.disk_bytes += 12_345;
    restarted.agent_address = Some("127.0.0.1:40404".into());
    s.apply(&Command::UpsertNode(restarted));
    assert_eq!(s.pending_evals().count(), 0);
    // Down: the instance is lost; back up: it runs again.
    let node = extra.id.clone();
    s.apply(&Command::SetNodeStatus { node: node.clone(), status: NodeStatus::Down, eligible: true });
    settle(&mut s);
    assert!(!on(&s).contains(&"late-node".to_string()));
    s.apply(&Command::SetNodeStatus { node: node.clone(), status: NodeStatus::Ready, eligible: true });
    settle(&mut s);
    assert!(on(&s).contains(&"late-node".to_string()), "it did not come back with its node");
    // Ineligible, then eligible again: it is placed where it is missing.
    s.apply(&Command::DrainNode { node: node.clone(), drain: true, deadline_ms: None });
    settle(&mut s);
    assert!(!on(&s).contains(&"late-node".to_string()));
    end_stopping(&mut s, &job);
    settle(&mut s);
    s.apply(&Command::SetNodeStatus { node: node.clone(), status: NodeStatus::Ready, eligible: true });
    settle(&mut s);
    assert!(on(&s).contains(&"late-node".to_string()), "it did not come back once eligible");
    assert_eq!(on(&s).len(), 3);
    assert!(first.iter().all(|id| s.alloc(*id).is_some_and(|a| a.is_live())), "the first two were left alone");

    // A node joins while the job's evaluation is open: the evaluation is
    // not replaced (its plan would be thrown away), and runs once more.
    let open = s.apply(&Command::RegisterJob(system_job("logs", None)));
    let Effect::JobRegistered { eval, .. } = open else { panic!("{open:?}") };
    let mut another = s.nodes()[0].clone();
    another.id = "later-node".into();
    s.apply(&Command::UpsertNode(another));
    assert!(s.eval(eval).is_some_and(|e| e.status == EvalStatus::Pending), "the open evaluation was replaced");
    work(&mut s, eval);
    assert_eq!(s.pending_evals().count(), 1, "no second look after the nodes changed");
    settle(&mut s);
    end_stopping(&mut s, &job);
    settle(&mut s);
    assert!(on(&s).contains(&"later-node".to_string()), "{:?}", on(&s));
    assert_eq!(on(&s).len(), 4);
}

/// Plans and commits evaluation `eval` at `now_ms`, as a leader's worker
/// does by its clock.
fn work_at(s: &mut ClusterState, eval: EvalId, now_ms: u64) -> cluster_core::model::plan::Plan {
    let job = s.job(&s.eval(eval).unwrap().job).unwrap().clone();
    let plan = schedule(s, &job, &SchedulerConfig { now_ms: Some(now_ms), ..SchedulerConfig::default() });
    s.apply(&Command::ApplyPlans(vec![(eval, plan.clone())]));
    plan
}

/// A failed instance is placed again only once its reschedule delay has
/// passed, from the time its failure was logged: its evaluation waits,
/// pending, and the broker hands it out then; each reschedule's wait
/// grows by the policy's function, and the new allocation carries the
/// history.
#[test]
fn a_failed_instance_waits_for_its_reschedule_delay() {
    let mut s = state(2);
    let mut j = job("w", 1, "1");
    // The service default: 30 s, doubling.
    assert_eq!(j.groups[0].reschedule, cluster_core::model::job::ReschedulePolicy::for_type(j.job_type));
    j.groups[0].reschedule.max_delay_ms = 50_000;
    let e = register(&mut s, &j);
    work(&mut s, e);
    let mut broker = Broker::default();
    let mut t = 1_000_000;
    for (round, wait) in [30_000, 50_000, 50_000].into_iter().enumerate() {
        let live = s.allocs().find(|a| a.is_live()).unwrap().id;
        let fail = Command::AllocReports { now_ms: t, reports: vec![AllocReport::status(live, AllocStatus::Failed)] };
        let Effect::Evals(evals) = s.apply(&fail) else { panic!() };
        assert_eq!(s.alloc(live).unwrap().failed_at_ms, Some(t));
        let plan = work_at(&mut s, evals[0], t + 10);
        assert!(plan.placements.is_empty(), "round {round}: placed before its delay");
        assert_eq!(plan.wait_until_ms, Some(t + wait));
        let eval = s.eval(evals[0]).unwrap();
        assert_eq!((eval.status, eval.wait_until_ms), (EvalStatus::Pending, Some(t + wait)));
        let p = cluster_core::state::progress(&s, s.job(&j.id).unwrap());
        assert_eq!(p.instances.get("waiting"), Some(&1), "{p:?}");
        // A broker that has not had it planned plans it once, by its own
        // clock (a wait comes from another leader's); then it waits.
        let once = broker.next_batch(&s, t + wait - 1);
        assert_eq!(once.iter().map(|w| w.eval).collect::<Vec<_>>(), vec![evals[0]]);
        assert!(work_at(&mut s, evals[0], t + wait - 1).placements.is_empty());
        broker.done(&once);
        assert!(broker.next_batch(&s, t + wait - 1).is_empty(), "handed out before its time");
        let batch = broker.next_batch(&s, t + wait);
        assert_eq!(batch.iter().map(|w| w.eval).collect::<Vec<_>>(), vec![evals[0]]);
        broker.done(&batch);
        let plan = work_at(&mut s, evals[0], t + wait);
        assert_eq!((plan.placements.len(), plan.wait_until_ms), (1, None));
        assert_eq!(s.eval(evals[0]).unwrap().status, EvalStatus::Complete);
        let new = s.allocs().find(|a| a.is_live()).unwrap();
        assert_eq!(new.reschedules.len(), 1, "an unlimited policy keeps the latest only");
        assert_eq!(new.reschedules[0].failed_at_ms, t);
        assert_eq!(new.reschedules[0].delay_ms, wait);
        t += wait + 1_000;
    }
    // A failure stamped by a clock 2 h ahead of the scheduler's: its due
    // time lies further off than its delay, and is not waited for.
    let live = s.allocs().find(|a| a.is_live()).unwrap().id;
    let fail =
        Command::AllocReports { now_ms: t + 7_200_000, reports: vec![AllocReport::status(live, AllocStatus::Failed)] };
    let Effect::Evals(evals) = s.apply(&fail) else { panic!() };
    let plan = work_at(&mut s, evals[0], t);
    assert_eq!((plan.placements.len(), plan.wait_until_ms), (1, None), "a clock ahead delays nothing");
}

/// A system job with `[group.update]` is updated `max_parallel` nodes at
/// a time, each set `stagger` after the one before began (Nomad's system
/// job update); every other node keeps its old instance meanwhile.
#[test]
fn a_system_job_rolls_max_parallel_nodes_at_a_time_stagger_apart() {
    let mut s = state(4);
    let update = "[group.update]\nmax_parallel = 2\nstagger = \"10s\"\n";
    let v1 = system_job("agentd", None);
    let with_update = |job: &Job, memory: &str| {
        let mut j = job.clone();
        let text = format!(
            "[job]\nname = \"agentd\"\ntype = \"system\"\n[[group]]\nname = \"g\"\n{update}[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"100m\", memory = \"{memory}\" }}\n"
        );
        j.groups = parse_job(&SourceFile::new("j.toml", text)).value.unwrap().groups;
        j
    };
    let e = register(&mut s, &with_update(&v1, "64MiB"));
    work_at(&mut s, e, 1_000);
    let job = JobId::new("agentd");
    let live = |s: &ClusterState| s.allocs_of_job(&job).filter(|a| a.is_live()).count();
    let of_version =
        |s: &ClusterState, v: u64| s.allocs_of_job(&job).filter(|a| a.is_live() && a.job_version == v).count();
    assert_eq!(live(&s), 4);
    let Effect::JobRegistered { eval, version } = s.apply(&Command::RegisterJob(with_update(&v1, "96MiB"))) else {
        panic!()
    };
    let t = 100_000;
    let mut broker = Broker::default();
    let mut eval = eval;
    for (set, at) in [(1, t), (2, t + 10_000)] {
        // A set of two is replaced (each new instance beside the old on
        // its node, as a system job's update does); the others run on.
        let plan = work_at(&mut s, eval, at);
        assert_eq!((plan.stops.len(), plan.placements.len()), (2, 2), "set {set}: {plan:?}");
        assert_eq!(of_version(&s, version), 2 * set as usize, "set {set}");
        assert_eq!(live(&s), 4, "set {set}: every node runs one");
        // The old ones end; the next set waits for the stagger.
        end_stopping(&mut s, &job);
        let e = s.pending_evals().next().expect("an evaluation once the old ones ended");
        let plan = work_at(&mut s, e, at + 500);
        assert!(plan.stops.is_empty() && plan.placements.is_empty(), "set {set}: {plan:?}");
        if set == 2 {
            assert_eq!(plan.wait_until_ms, None, "nothing left to update");
            assert_eq!(s.eval(e).unwrap().status, EvalStatus::Complete);
            break;
        }
        assert_eq!(plan.wait_until_ms, Some(at + 10_000));
        let once = broker.next_batch(&s, at + 9_999);
        assert_eq!(once.len(), 1, "planned once by this broker's clock");
        assert!(work_at(&mut s, once[0].eval, at + 9_999).stops.is_empty(), "the stagger is not over");
        broker.done(&once);
        assert!(broker.next_batch(&s, at + 9_999).is_empty(), "handed out before the stagger");
        let batch = broker.next_batch(&s, at + 10_000);
        assert_eq!(batch.len(), 1);
        broker.done(&batch);
        eval = batch[0].eval;
    }
}

/// An evaluation whose plan holds a failed instance back for its delay
/// while another instance fits nowhere is blocked, not pending: capacity
/// retries it (and peers may take the rest), and the broker tries it
/// again once the wait is over, once.
#[test]
fn a_wait_beside_unplaced_work_blocks_and_is_tried_again_when_it_ends() {
    let mut s = state(1);
    let text = "[job]\nname = \"two\"\n[[group]]\nname = \"a\"\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = { cpu = 1, memory = \"1GiB\" }\n[[group]]\nname = \"b\"\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = { cpu = 100, memory = \"1GiB\" }\n";
    let j = parse_job(&SourceFile::new("j.toml", text.to_string())).value.unwrap();
    let e = register(&mut s, &j);
    work_at(&mut s, e, 1_000);
    assert_eq!(s.eval(e).unwrap().status, EvalStatus::Blocked);
    let t = 1_000_000;
    let a = s.allocs().find(|a| a.is_live()).unwrap().id;
    let Effect::Evals(evals) =
        s.apply(&Command::AllocReports { now_ms: t, reports: vec![AllocReport::status(a, AllocStatus::Failed)] })
    else {
        panic!()
    };
    let plan = work_at(&mut s, evals[0], t + 10);
    assert_eq!((plan.placements.len(), plan.unplaced_count(), plan.wait_until_ms), (0, 1, Some(t + 30_000)));
    let eval = s.eval(evals[0]).unwrap();
    assert_eq!((eval.status, eval.wait_until_ms), (EvalStatus::Blocked, Some(t + 30_000)));
    let mut broker = Broker::default();
    // Capacity changed since it was last tried (by this broker: never).
    let first = broker.next_batch(&s, t + 20);
    assert_eq!(first.iter().map(|w| (w.eval, w.retry_blocked)).collect::<Vec<_>>(), vec![(evals[0], true)]);
    broker.done(&first);
    assert!(broker.next_batch(&s, t + 29_999).is_empty(), "nothing changed, the wait is not over");
    let due = broker.next_batch(&s, t + 30_000);
    assert_eq!(due.iter().map(|w| w.eval).collect::<Vec<_>>(), vec![evals[0]]);
    broker.done(&due);
    let plan = work_at(&mut s, evals[0], t + 30_000);
    assert_eq!((plan.placements.len(), plan.wait_until_ms), (1, None));
    assert_eq!(s.eval(evals[0]).unwrap().status, EvalStatus::Blocked, "b still fits nowhere");
    assert!(broker.next_batch(&s, t + 40_000).is_empty(), "each wait is answered once");
}

/// `stagger = "0s"`: the next set follows as soon as the last one ended,
/// and the evaluation sets no wait (one already past would be planned
/// again and again until the set ends).
#[test]
fn a_system_job_without_a_stagger_sets_no_wait() {
    let mut s = state(3);
    let text = |memory: &str| {
        format!(
            "[job]\nname = \"agentd\"\ntype = \"system\"\n[[group]]\nname = \"g\"\n[group.update]\nmax_parallel = 1\nstagger = \"0s\"\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"100m\", memory = \"{memory}\" }}\n"
        )
    };
    let job = |memory: &str| parse_job(&SourceFile::new("j.toml", text(memory))).value.unwrap();
    let e = register(&mut s, &job("64MiB"));
    work_at(&mut s, e, 1_000);
    let Effect::JobRegistered { mut eval, version } = s.apply(&Command::RegisterJob(job("96MiB"))) else { panic!() };
    for set in 1..=3u64 {
        let plan = work_at(&mut s, eval, 10_000 * set);
        assert_eq!((plan.stops.len(), plan.placements.len(), plan.wait_until_ms), (1, 1, None), "set {set}");
        end_stopping(&mut s, &JobId::new("agentd"));
        let Some(next) = s.pending_evals().next() else { break };
        eval = next;
    }
    let new = s.allocs_of_job(&JobId::new("agentd")).filter(|a| a.is_live() && a.job_version == version).count();
    assert_eq!(new, 3);
}
