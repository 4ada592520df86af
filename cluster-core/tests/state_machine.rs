//! The replicated state machine: the same log gives byte-identical state on
//! every replica, and a snapshot restores to byte-identical state that goes
//! on behaving the same.

use cluster_core::codec;
use cluster_core::command::{Command, Effect};
use cluster_core::diag::SourceFile;
use cluster_core::model::alloc::{AllocHealth, AllocReport, TaskPhase, TaskState};
use cluster_core::model::{AllocStatus, NodeStatus};
use cluster_core::scheduler::{Rng, SchedulerConfig, schedule};
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::ClusterState;
use proptest::prelude::*;

fn fleet_commands() -> Vec<Command> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/fleets/eu-west.toml")).unwrap();
    let nodes = parse_fleet(&SourceFile::new("eu-west.toml", text)).value.unwrap().nodes;
    nodes.into_iter().step_by(3).map(Command::UpsertNode).collect()
}

fn job(name: &str, kind: &str, count: u32, cpu: &str) -> cluster_core::model::Job {
    let text = format!(
        "[job]\nname = \"{name}\"\ntype = \"{kind}\"\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"{cpu}\", memory = \"1GiB\" }}\n"
    );
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

/// A leader's log: what a cluster would commit while scheduling `rounds`
/// rounds of work, with agents reporting and nodes failing in between.
fn leader_log(seed: u64, rounds: usize) -> (ClusterState, Vec<Command>) {
    let mut rng = Rng::new(seed);
    let mut leader = ClusterState::new();
    let mut log = Vec::new();
    let commit = |leader: &mut ClusterState, log: &mut Vec<Command>, c: Command| {
        let effect = leader.apply(&c);
        log.push(c);
        effect
    };
    for c in fleet_commands() {
        commit(&mut leader, &mut log, c);
    }
    for round in 0..rounds {
        let kind = ["service", "batch"][rng.below(2)];
        let cpu = ["250m", "1", "2", "4"][rng.below(4)];
        let j = job(&format!("job-{}", rng.below(6)), kind, 1 + rng.below(40) as u32, cpu);
        let registered = commit(&mut leader, &mut log, Command::RegisterJob(j.clone()));
        let stored = leader.job(&j.id).unwrap().clone();
        let plan = schedule(&leader, &stored, &SchedulerConfig { seed: seed ^ round as u64, ..Default::default() });
        // Half the plans close their evaluation (so their jobs can be
        // collected), half leave it open.
        match registered {
            Effect::JobRegistered { eval, .. } if rng.below(2) == 0 => {
                commit(&mut leader, &mut log, Command::ApplyPlans(vec![(eval, plan)]))
            }
            _ => commit(&mut leader, &mut log, Command::ApplyPlan(plan)),
        };
        let allocs: Vec<_> = leader.allocs().map(|a| a.id).collect();
        let n = if allocs.is_empty() { 0 } else { rng.below(20) };
        let updates = (0..n)
            .map(|_| {
                let status = [AllocStatus::Running, AllocStatus::Complete, AllocStatus::Failed][rng.below(3)];
                let task = TaskState {
                    name: "t".into(),
                    state: TaskPhase::Dead,
                    restarts: rng.below(3) as u32,
                    exit_code: Some(rng.below(4) as i32),
                    signal: None,
                    message: "exited".into(),
                    checks: Vec::new(),
                };
                let health = [None, Some(AllocHealth::Healthy), Some(AllocHealth::Unhealthy)][rng.below(3)];
                AllocReport { id: allocs[rng.below(allocs.len())], status, tasks: vec![task], health }
            })
            .collect();
        commit(&mut leader, &mut log, Command::AllocStatus(updates));
        if rng.below(4) == 0 {
            let node = leader.nodes()[rng.below(leader.nodes().len())].id.clone();
            commit(&mut leader, &mut log, Command::SetNodeStatus { node, status: NodeStatus::Down, eligible: true });
        }
        if rng.below(8) == 0 {
            commit(&mut leader, &mut log, Command::StopJob(j.id.clone()));
            // Its agents stop its instances and say so.
            let ended = leader.allocs_of_job(&j.id).map(|a| AllocReport::status(a.id, AllocStatus::Complete)).collect();
            commit(&mut leader, &mut log, Command::AllocStatus(ended));
        }
        if rng.below(2) == 0 {
            // The workers catch up: every open evaluation is planned.
            let open: Vec<_> = leader.pending_evals().collect();
            for eval in open {
                let Some(job) = leader.eval(eval).and_then(|e| leader.job(&e.job)).cloned() else { continue };
                let plan = schedule(&leader, &job, &SchedulerConfig { seed: seed ^ eval.0, ..Default::default() });
                commit(&mut leader, &mut log, Command::ApplyPlans(vec![(eval, plan)]));
            }
        }
        if rng.below(3) == 0 {
            // Short thresholds, so that objects are marked and dropped
            // between the other commands.
            let thresholds = cluster_core::state::GcThresholds { job_ms: 2_000, node_ms: 4_000 };
            commit(&mut leader, &mut log, Command::Collect { now_ms: round as u64 * 1_000, thresholds });
        }
    }
    (leader, log)
}

/// Applies `log` as a follower would: each entry decoded from the bytes
/// Raft carried.
fn replay(log: &[Command]) -> ClusterState {
    let mut s = ClusterState::new();
    for c in log {
        let entry = codec::encode(c);
        let c: Command = codec::decode(&entry, codec::DECODE_BYTES_MAX).expect("a logged command decodes");
        s.apply(&c);
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_same_log_gives_the_same_bytes_on_every_replica(seed in any::<u64>()) {
        let (leader, log) = leader_log(seed, 12);
        let a = replay(&log);
        let b = replay(&log);
        prop_assert_eq!(a.snapshot(), b.snapshot());
        prop_assert_eq!(a.snapshot(), leader.snapshot());
        // The incremental usage index agrees with a recount, on every node.
        let recount = a.recomputed_usage();
        for (i, u) in recount.iter().enumerate() {
            prop_assert_eq!(u, a.usage(cluster_core::ids::NodeIdx(i as u32)), "node {}", i);
        }
    }
}

/// The logs the property above replays do collect jobs, allocations and
/// nodes: it is not checking an idle collector.
#[test]
fn the_replayed_logs_collect_jobs_allocations_and_nodes() {
    let mut dropped = cluster_core::state::GcCounts::default();
    for seed in 0..16 {
        let (_, log) = leader_log(seed, 40);
        let mut s = ClusterState::new();
        for c in &log {
            if let Effect::Collected(c) = s.apply(c) {
                dropped.jobs += c.jobs;
                dropped.allocs += c.allocs;
                dropped.nodes += c.nodes;
            }
        }
    }
    assert!(dropped.jobs > 0 && dropped.allocs > 0 && dropped.nodes > 0, "{dropped:?}");
}

#[test]
fn a_restored_snapshot_is_byte_identical_and_schedules_the_same() {
    let (leader, _) = leader_log(7, 20);
    let bytes = leader.snapshot();
    let restored = ClusterState::restore(&bytes).unwrap();
    assert_eq!(restored.snapshot(), bytes, "byte-identical");
    assert!(leader.allocs().count() > 20, "the log placed work");
    for i in 0..leader.nodes().len() {
        let idx = cluster_core::ids::NodeIdx(i as u32);
        assert_eq!(restored.usage(idx), leader.usage(idx), "usage index of node {i}");
        assert_eq!(restored.class_of(idx), leader.class_of(idx), "computed class of node {i}");
    }
    // The same next decisions: indexes were rebuilt, not just the tables.
    let (mut a, mut b) = (leader, restored);
    for (n, j) in [job("after-a", "service", 30, "1"), job("after-b", "batch", 50, "2")].into_iter().enumerate() {
        a.apply(&Command::RegisterJob(j.clone()));
        b.apply(&Command::RegisterJob(j.clone()));
        let config = SchedulerConfig { seed: n as u64, ..Default::default() };
        let pa = schedule(&a, a.job(&j.id).unwrap(), &config);
        let pb = schedule(&b, b.job(&j.id).unwrap(), &config);
        assert_eq!(pa, pb);
        let ea = a.apply(&Command::ApplyPlan(pa));
        let eb = b.apply(&Command::ApplyPlan(pb));
        assert_eq!(ea, eb);
        assert!(matches!(ea, Effect::PlanApplied(ref ap) if !ap.placed.is_empty()));
    }
    assert_eq!(a.snapshot(), b.snapshot());
}

#[test]
fn commands_refuse_what_cannot_take_effect_without_changing_state() {
    let (mut s, _) = leader_log(3, 3);
    let before = s.snapshot();
    let e = s.apply(&Command::SetNodeStatus { node: "no-such-node".into(), status: NodeStatus::Down, eligible: false });
    assert!(matches!(e, Effect::Refused(ref m) if m.contains("no-such-node")), "{e:?}");
    assert!(matches!(s.apply(&Command::StopJob("no-such-job".into())), Effect::Refused(_)));
    assert_eq!(s.snapshot(), before);
}

#[test]
fn a_corrupt_snapshot_is_refused() {
    let (s, _) = leader_log(5, 2);
    let mut bytes = s.snapshot();
    bytes.truncate(bytes.len() / 2);
    assert!(ClusterState::restore(&bytes).is_err());
    assert!(ClusterState::restore(&[]).is_err());
}
