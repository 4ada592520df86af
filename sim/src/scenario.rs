//! Workloads: a random one per seed, and the delegation review's suspected
//! breaks (`../shared/reviews/delegation-review.md`, B1-B18) as scripted
//! scenarios that set up each one's interleaving.

use cluster_core::diag::SourceFile;
use cluster_core::model::Job;
use cluster_core::scheduler::Rng;
use cluster_core::spec::job::parse_job;

use crate::world::{ClusterSpec, Event, Setup, forged_outcome, forged_revoke};

/// Node size in every simulated cluster, in millicores.
const NODE_CPU_MILLIS: u64 = 4_000;

/// What a job of the workload looks like.
#[derive(Clone, Copy, Debug)]
pub struct JobShape {
    pub service: bool,
    pub count: u32,
    pub cpu_millis: u64,
    pub at_most_once: bool,
    pub eu_only: bool,
    /// Batch instances run this long.
    pub run_for_s: u64,
}

/// A job spec, written as a user would and read by the real parser.
pub fn job(name: &str, shape: JobShape) -> Job {
    let JobShape { service, count, cpu_millis, at_most_once, eu_only, run_for_s } = shape;
    let kind = if service { "service" } else { "batch" };
    let jurisdictions = if eu_only { "jurisdictions = [\"eu\"]\n" } else { "" };
    let on_disconnect = if at_most_once { "stop" } else { "keep" };
    let run_for = if service { String::new() } else { format!("run_for = \"{run_for_s}s\"\n") };
    let text = format!(
        "[job]\nname = \"{name}\"\ntype = \"{kind}\"\n{jurisdictions}\n[[group]]\nname = \"g\"\ncount = {count}\n\
         on_disconnect = \"{on_disconnect}\"\n\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nkill_timeout = \"1s\"\n{run_for}\
         resources = {{ cpu = \"{cpu_millis}m\", memory = \"64MiB\" }}\n"
    );
    let checked = parse_job(&SourceFile::new(format!("{name}.toml"), text));
    checked.value.unwrap_or_else(|| panic!("the simulator's job spec must parse: {:?}", checked.diagnostics))
}

fn cluster(name: &str, jurisdiction: &str, servers: usize, nodes: usize) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        jurisdictions: vec![jurisdiction.into()],
        servers,
        nodes,
        node_cpu_millis: NODE_CPU_MILLIS,
        inbound_share: 0.6,
    }
}

/// One seed's federation and workload: 2-4 clusters of 1, 3 or 5 servers,
/// services and batch jobs (some EU-only, some at-most-once, some too
/// large for their cluster), updates, scale-downs and stops, with faults
/// drawn as the run goes. Demand stays within half of the capacity (a
/// quarter of the EU's for EU-only work), so that every seed can converge.
pub fn random_setup(rng: &mut Rng) -> Setup {
    let n = 2 + rng.below(3);
    let names = ["eu-west", "eu-central", "us-east", "ap-south"];
    let places = ["eu", "eu", "us", "ap"];
    // The inbound share never binds here, so that every seed can converge
    // (the share is exercised by the `b3-partial-acceptance` scenario).
    let clusters: Vec<ClusterSpec> = (0..n)
        .map(|i| ClusterSpec {
            inbound_share: 1.0,
            ..cluster(names[i], places[i], [1, 3, 5][rng.below(3)], 2 + rng.below(3))
        })
        .collect();
    let cap = |eu: bool| -> u64 {
        clusters.iter().filter(|c| !eu || c.jurisdictions[0] == "eu").map(|c| c.nodes as u64 * NODE_CPU_MILLIS).sum()
    };
    let (mut demand, mut demand_eu) = (0u64, 0u64);
    let mut events = Vec::new();
    let jobs = 4 + rng.below(7);
    for k in 0..jobs {
        let c = rng.below(n);
        let local = clusters[c].nodes as u64 * NODE_CPU_MILLIS;
        let cpu_millis = [500, 1_000, 2_000][rng.below(3)];
        let large = rng.below(3) == 0;
        let count = if large { (local / cpu_millis) as u32 + 1 + rng.below(3) as u32 } else { 1 + rng.below(4) as u32 };
        let eu_only = clusters[c].jurisdictions[0] == "eu" && rng.below(3) == 0;
        let ask = u64::from(count) * cpu_millis;
        // EU-only work competes for the EU clusters' inbound share with
        // everything else delegated there: a quarter of their capacity.
        if demand + ask > cap(false) / 2 || (eu_only && demand_eu + ask > cap(true) / 4) {
            continue;
        }
        demand += ask;
        if eu_only {
            demand_eu += ask;
        }
        let shape = JobShape {
            service: rng.below(4) != 0,
            count,
            cpu_millis,
            at_most_once: rng.below(2) == 0,
            eu_only,
            run_for_s: 3 + rng.below(15) as u64,
        };
        let name = format!("job{k}");
        let at = 1_000 + rng.below(60_000) as u64;
        events.push((at, Event::Submit { cluster: c, job: job(&name, shape) }));
        match rng.below(6) {
            0 => events.push((at + 5_000 + rng.below(20_000) as u64, Event::Update { cluster: c, job: name })),
            1 if count > 1 => {
                let to = 1 + rng.below(count as usize - 1) as u32;
                events.push((at + 5_000 + rng.below(20_000) as u64, Event::Scale { cluster: c, job: name, count: to }));
            }
            2 => events.push((at + 5_000 + rng.below(20_000) as u64, Event::Stop { cluster: c, job: name })),
            _ => {}
        }
    }
    Setup { clusters, events, duration_ms: 150_000, quiet_from_ms: 90_000, random_faults: true, message_faults: true }
}

/// What a scenario is expected to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Every invariant holds.
    Pass,
    /// A break that is real and not yet fixed; the issue that fixes it.
    /// The test suite checks that it still fails, so a fix is noticed.
    KnownBreak(&'static str),
}

/// The review's breaks, one scripted run each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    B1LostAnswer,
    B1CrashBeforeReply,
    B2TargetLosesANode,
    B3PartialAcceptance,
    B4Partition,
    B5Stop,
    B5UpdateAndScaleDown,
    B6LeaderFlap,
    B7TargetLeadersReplaced,
    B8UpdateOfAtMostOnce,
    B9HoldRacesPlacement,
    B10Jurisdiction,
    B11LateOffer,
    B12ClockSteps,
    B13AgentPaused,
    B14AgentRestarts,
    B15AgentKilled,
    B16ForgedRevoke,
    B17NodeReregisters,
    B18StaleAnswers,
    LateOfferAfterCollection,
}

impl Scenario {
    pub const ALL: [Scenario; 21] = [
        Scenario::B1LostAnswer,
        Scenario::B1CrashBeforeReply,
        Scenario::B2TargetLosesANode,
        Scenario::B3PartialAcceptance,
        Scenario::B4Partition,
        Scenario::B5Stop,
        Scenario::B5UpdateAndScaleDown,
        Scenario::B6LeaderFlap,
        Scenario::B7TargetLeadersReplaced,
        Scenario::B8UpdateOfAtMostOnce,
        Scenario::B9HoldRacesPlacement,
        Scenario::B10Jurisdiction,
        Scenario::B11LateOffer,
        Scenario::B12ClockSteps,
        Scenario::B13AgentPaused,
        Scenario::B14AgentRestarts,
        Scenario::B15AgentKilled,
        Scenario::B16ForgedRevoke,
        Scenario::B17NodeReregisters,
        Scenario::B18StaleAnswers,
        Scenario::LateOfferAfterCollection,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::B1LostAnswer => "b1-lost-answer",
            Scenario::B1CrashBeforeReply => "b1-crash-before-reply",
            Scenario::B2TargetLosesANode => "b2-target-loses-a-node",
            Scenario::B3PartialAcceptance => "b3-partial-acceptance",
            Scenario::B4Partition => "b4-partition",
            Scenario::B5Stop => "b5-stop",
            Scenario::B5UpdateAndScaleDown => "b5-update-and-scale-down",
            Scenario::B6LeaderFlap => "b6-leader-flap",
            Scenario::B7TargetLeadersReplaced => "b7-target-leaders-replaced",
            Scenario::B8UpdateOfAtMostOnce => "b8-update-of-at-most-once",
            Scenario::B9HoldRacesPlacement => "b9-hold-races-placement",
            Scenario::B10Jurisdiction => "b10-jurisdiction",
            Scenario::B11LateOffer => "b11-late-offer",
            Scenario::B12ClockSteps => "b12-clock-steps",
            Scenario::B13AgentPaused => "b13-agent-paused",
            Scenario::B14AgentRestarts => "b14-agent-restarts",
            Scenario::B15AgentKilled => "b15-agent-killed",
            Scenario::B16ForgedRevoke => "b16-forged-revoke",
            Scenario::B17NodeReregisters => "b17-node-reregisters",
            Scenario::B18StaleAnswers => "b18-stale-answers",
            Scenario::LateOfferAfterCollection => "late-offer-after-collection",
        }
    }

    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Scenario::B1LostAnswer => "the target's answers to an offer are lost for 8 s; the origin asks again by id",
            Scenario::B1CrashBeforeReply => {
                "the target's leader dies after committing the registration, before answering"
            }
            Scenario::B2TargetLosesANode => {
                "a target node is cut off; its delegated instances are lost and replaced there"
            }
            Scenario::B3PartialAcceptance => "two origins offer at once to a target that fits part of each",
            Scenario::B4Partition => "origin and target are partitioned for 40 s, then heal",
            Scenario::B5Stop => "the origin stops a job whose instances run on a target",
            Scenario::B5UpdateAndScaleDown => "the origin updates, then scales down, a delegated job",
            Scenario::B6LeaderFlap => "the origin's leadership moves away and back within a lease",
            Scenario::B7TargetLeadersReplaced => {
                "the target's servers die one after another; messages follow its leader"
            }
            Scenario::B8UpdateOfAtMostOnce => {
                "an at-most-once job is updated while the node of its instance is cut off"
            }
            Scenario::B9HoldRacesPlacement => "batch work completes locally while overflow is being held and offered",
            Scenario::B10Jurisdiction => "EU-only overflow in a federation whose roomiest peer is in the US",
            Scenario::B11LateOffer => {
                "an offer is delayed 15 s; the origin stops the job meanwhile, then the offer arrives"
            }
            Scenario::B12ClockSteps => "the origin's and target's wall clocks step by an hour, forward and back",
            Scenario::B13AgentPaused => {
                "a target agent running delegated at-most-once work is paused (SIGSTOP) for 25 s"
            }
            Scenario::B14AgentRestarts => "a target agent restarts with its wall clock set back while cut off",
            Scenario::B15AgentKilled => "a target agent is killed and restarted; its tasks die with it",
            Scenario::B16ForgedRevoke => {
                "a third cluster sends a Revoke, and a forged answer, for another origin's delegation"
            }
            Scenario::B17NodeReregisters => "a node re-registers while it runs work",
            Scenario::B18StaleAnswers => "duplicated and reordered answers around a revocation",
            Scenario::LateOfferAfterCollection => {
                "the offer arrives again 40 s late, after the job was stopped and both ends collected their records"
            }
        }
    }

    /// What the scenario shows today. Kept beside the scenario, so that a
    /// fix that makes a known break pass is noticed (its test fails).
    pub fn expect(self) -> Expect {
        // B13 was a known break until the fence (`agent::fence`): a paused
        // agent enforces nothing, and its tasks outlived their grants.
        Expect::Pass
    }

    /// The federation and the script.
    pub fn setup(self) -> Setup {
        let big = |name: &str, at_most_once: bool| {
            let shape =
                JobShape { service: true, count: 8, cpu_millis: 1_000, at_most_once, eu_only: true, run_for_s: 0 };
            job(name, shape)
        };
        // An origin with one node (4 cores) and a roomy target: a job of 8
        // one-core instances runs 4 here and 4 there.
        let mut clusters = vec![cluster("origin", "eu", 3, 1), cluster("target", "eu", 3, 4)];
        let submit = |job: Job| (500, Event::Submit { cluster: 0, job });
        let mut events = vec![submit(big("web", true))];
        let (o, t) = (0usize, 1usize);
        match self {
            Scenario::B1LostAnswer => {
                events.push((1_000, Event::Partition { a: t, b: o, one_way: true, for_ms: 8_000 }));
            }
            Scenario::B1CrashBeforeReply => {
                events.push((600, Event::CrashAfterCommit { cluster: t, down_ms: 5_000 }));
            }
            Scenario::B2TargetLosesANode => {
                events.push((10_000, Event::CutAgent { cluster: t, node: 0, for_ms: 20_000 }));
                events.push((10_000, Event::CutAgent { cluster: t, node: 1, for_ms: 20_000 }));
            }
            Scenario::B3PartialAcceptance => {
                // Each origin overflows 4 one-core instances; the target has
                // room for 4 in all, so at least one offer is taken in part.
                // A spare cluster takes what the target could not.
                clusters = vec![
                    cluster("origin", "eu", 3, 1),
                    cluster("origin-b", "eu", 1, 1),
                    cluster("target", "eu", 3, 1),
                    cluster("spare", "eu", 1, 2),
                ];
                clusters[2].inbound_share = 1.0;
                events.push((500, Event::Submit { cluster: 1, job: big("batch", false) }));
            }
            Scenario::B4Partition => {
                events.push((10_000, Event::Partition { a: o, b: t, one_way: false, for_ms: 40_000 }));
            }
            Scenario::B5Stop => {
                events.push((15_000, Event::Stop { cluster: o, job: "web".into() }));
            }
            Scenario::B5UpdateAndScaleDown => {
                events.push((15_000, Event::Update { cluster: o, job: "web".into() }));
                events.push((35_000, Event::Scale { cluster: o, job: "web".into(), count: 3 }));
            }
            Scenario::B6LeaderFlap => {
                events.push((10_000, Event::KillLeader { cluster: o, down_ms: 2_000 }));
                events.push((13_000, Event::KillLeader { cluster: o, down_ms: 2_000 }));
            }
            Scenario::B7TargetLeadersReplaced => {
                events.push((10_000, Event::KillReplica { cluster: t, replica: 0, down_ms: 60_000 }));
                events.push((14_000, Event::KillReplica { cluster: t, replica: 1, down_ms: 3_000 }));
                events.push((20_000, Event::KillLeader { cluster: t, down_ms: 3_000 }));
            }
            Scenario::B8UpdateOfAtMostOnce => {
                clusters = vec![cluster("origin", "eu", 1, 3)];
                let shape = JobShape {
                    service: true,
                    count: 1,
                    cpu_millis: 1_000,
                    at_most_once: true,
                    eu_only: false,
                    run_for_s: 0,
                };
                events = vec![(500, Event::Submit { cluster: 0, job: job("web", shape) })];
                for n in 0..3 {
                    events.push((10_000, Event::CutAgent { cluster: 0, node: n, for_ms: 1_500 }));
                }
                events.push((10_200, Event::Update { cluster: 0, job: "web".into() }));
            }
            Scenario::B9HoldRacesPlacement => {
                for k in 0..6 {
                    let shape = JobShape {
                        service: false,
                        count: 3,
                        cpu_millis: 1_000,
                        at_most_once: k % 2 == 0,
                        eu_only: false,
                        run_for_s: 2 + k,
                    };
                    events.push((600 + 300 * k, Event::Submit { cluster: o, job: job(&format!("batch{k}"), shape) }));
                }
            }
            Scenario::B10Jurisdiction => {
                clusters =
                    vec![cluster("origin", "eu", 3, 1), cluster("us-east", "us", 3, 6), cluster("target", "eu", 1, 2)];
            }
            Scenario::B11LateOffer => {
                events.push((400, Event::Delay { a: o, b: t, extra_ms: 15_000, for_ms: 2_000 }));
                events.push((5_000, Event::Stop { cluster: o, job: "web".into() }));
            }
            Scenario::B12ClockSteps => {
                events.push((10_000, Event::WallClockJump { cluster: o, by_ms: 3_600_000 }));
                events.push((12_000, Event::WallClockJump { cluster: t, by_ms: -3_600_000 }));
                events.push((20_000, Event::WallClockJump { cluster: o, by_ms: -3_600_000 }));
            }
            Scenario::B13AgentPaused => {
                // The origin has room again once a batch job ends, so it
                // may place the work itself when the target's lease is out.
                clusters[0].nodes = 2;
                let filler = JobShape {
                    service: false,
                    count: 4,
                    cpu_millis: 1_000,
                    at_most_once: false,
                    eu_only: false,
                    run_for_s: 8,
                };
                events.insert(0, (300, Event::Submit { cluster: o, job: job("filler", filler) }));
                for n in 0..4 {
                    events.push((10_000, Event::PauseAgent { cluster: t, node: n, for_ms: 25_000 }));
                }
                events.push((10_000, Event::Partition { a: o, b: t, one_way: false, for_ms: 25_000 }));
            }
            Scenario::B14AgentRestarts => {
                events.push((10_000, Event::CutAgent { cluster: t, node: 0, for_ms: 15_000 }));
                events.push((12_000, Event::RestartAgent { cluster: t, node: 0 }));
                events.push((12_000, Event::WallClockJump { cluster: t, by_ms: -50_000 }));
            }
            Scenario::B15AgentKilled => {
                // The simulator's tasks have no children; that grandchildren
                // outlive a killed agent is for the chaos checker (issue 18),
                // which reads /proc. Here: the restart starts no second copy.
                events.push((10_000, Event::RestartAgent { cluster: t, node: 0 }));
                events.push((10_000, Event::RestartAgent { cluster: t, node: 1 }));
            }
            Scenario::B16ForgedRevoke => {
                // No node: never a target itself, only a third party.
                clusters.push(cluster("intruder", "eu", 1, 0));
                // The first delegation's id is deterministic: origin/web/e<eval>-g-<first>.
                for e in 0..12 {
                    let id = format!("origin/web/e{e}-g-4");
                    events.push((8_000, Event::Inject { from: 2, to: t, message: forged_revoke(&id) }));
                    events.push((8_000, Event::Inject { from: 2, to: o, message: forged_outcome(&id) }));
                }
            }
            Scenario::B17NodeReregisters => {
                // The simulator's nodes have no GPUs, so the positional GPU
                // usage of the review is not reached here; the state machine's
                // property tests cover usage against recomputation. What runs:
                // a node cut off past its TTL comes back and is revived.
                events.push((10_000, Event::CutAgent { cluster: t, node: 2, for_ms: 6_000 }));
            }
            Scenario::B18StaleAnswers => {
                events.push((9_000, Event::Delay { a: t, b: o, extra_ms: 3_000, for_ms: 6_000 }));
                events.push((10_000, Event::Stop { cluster: o, job: "web".into() }));
            }
            Scenario::LateOfferAfterCollection => {
                events.push((400, Event::Echo { a: o, b: t, after_ms: 40_000, for_ms: 2_000 }));
                events.push((5_000, Event::Stop { cluster: o, job: "web".into() }));
            }
        }
        Setup {
            clusters,
            events,
            duration_ms: 120_000,
            quiet_from_ms: 60_000,
            random_faults: false,
            message_faults: false,
        }
    }
}
