//! The simulated federation and its step loop. See the crate docs for what
//! is real and what is simulated.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use cluster_core::agent::lease::Lease;
use cluster_core::command::{Command, Effect};
use cluster_core::ids::{AllocId, JobId, NodeId};
use cluster_core::model::alloc::AllocReport;
use cluster_core::model::job::OnDisconnect;
use cluster_core::model::{AllocStatus, DesiredStatus, Environment, ExecutionModel, Job, Node, NodeStatus};
use cluster_core::resources::Resources;
use cluster_core::scheduler::{Rng, SchedulerConfig, schedule};
use cluster_core::server::broker::Broker;
use cluster_core::server::heartbeat::Heartbeats;
use cluster_core::state::ClusterState;
use federation::policy::{Peer, Policy};
use federation::proto::origin::Origin;
use federation::proto::target::{Inbound, Target};
use federation::proto::{Action, Message, Plants, Timing, ToOrigin, ToTarget, inbound_key};
use federation::protocol::{LABEL_DELEGATION, LABEL_ORIGIN, decode};

use crate::check::Checker;

/// One step of simulated time.
pub const STEP_MS: u64 = 100;
/// A node is down after this long without a heartbeat, plus the grace.
pub const NODE_TTL_MS: u64 = 2_000;
pub const NODE_GRACE_MS: u64 = 2_000;
/// The longest a task takes to die once stopped: the kill timeout every
/// simulated task has. A target refuses at-most-once work whose kill
/// timeout is not under half the grace.
pub const KILL_MS_MAX: u64 = 1_000;

/// Known bugs to plant, each of which the checker must catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Plant {
    ReleaseOnTimeout,
    ForgetRegistration,
    LeaseFromAnswer,
    NoGrace,
    SkipEntry,
    SnapshotDropsHolds,
    LeasePerOrigin,
}

impl Plant {
    pub const ALL: [Plant; 7] = [
        Plant::ReleaseOnTimeout,
        Plant::ForgetRegistration,
        Plant::LeaseFromAnswer,
        Plant::NoGrace,
        Plant::SkipEntry,
        Plant::SnapshotDropsHolds,
        Plant::LeasePerOrigin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Plant::ReleaseOnTimeout => "origin-releases-on-timeout",
            Plant::ForgetRegistration => "target-forgets-registration",
            Plant::LeaseFromAnswer => "lease-from-answer",
            Plant::NoGrace => "origin-skips-grace",
            Plant::SkipEntry => "replica-skips-entry",
            Plant::SnapshotDropsHolds => "snapshot-drops-holds",
            Plant::LeasePerOrigin => "lease-per-origin",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Plant::ReleaseOnTimeout => {
                "the origin treats an offer unanswered after half the retry interval as refused (review B1)"
            }
            Plant::ForgetRegistration => {
                "the target registers a re-offered id again instead of answering from its record"
            }
            Plant::LeaseFromAnswer => {
                "the target's lease runs from when the renewal's answer arrived, not when it was sent"
            }
            Plant::NoGrace => "the origin re-places work as the lease ends, without the grace for stopping",
            Plant::SkipEntry => {
                "one replica skips every 40th log entry (applying one twice changes nothing: every command is idempotent)"
            }
            Plant::SnapshotDropsHolds => "a replica restored from its snapshot loses the holds table",
            Plant::LeasePerOrigin => {
                "the target's lease covers every delegation of an origin, even ones it no longer tracks"
            }
        }
    }

    pub fn from_name(name: &str) -> Option<Plant> {
        Plant::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// One run's settings.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub seed: u64,
    pub plant: Option<Plant>,
    /// A scripted run instead of a random one.
    pub scenario: Option<crate::scenario::Scenario>,
    /// Keep the event trace (for `--trace`).
    pub trace: bool,
}

/// The first invariant a run broke.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    pub invariant: &'static str,
    pub step: u64,
    pub at_ms: u64,
    pub detail: String,
}

/// What one run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub sim_ms: u64,
    pub violation: Option<Violation>,
    /// FNV-1a over every trace line: equal for two runs of one seed.
    pub trace_hash: u64,
    pub trace: Vec<String>,
}

/// A cluster as a scenario or the generator describes it.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub name: String,
    pub jurisdictions: Vec<String>,
    pub servers: usize,
    pub nodes: usize,
    pub node_cpu_millis: u64,
    pub inbound_share: f64,
}

/// What happens at a moment of a run: workload or fault.
#[derive(Clone, Debug)]
pub enum Event {
    Submit {
        cluster: usize,
        job: Job,
    },
    /// A spec change other than `count` (a new version).
    Update {
        cluster: usize,
        job: String,
    },
    Scale {
        cluster: usize,
        job: String,
        count: u32,
    },
    Stop {
        cluster: usize,
        job: String,
    },
    /// Messages from `a` to `b` (and back, unless one way) are dropped.
    Partition {
        a: usize,
        b: usize,
        one_way: bool,
        for_ms: u64,
    },
    /// Messages from `a` to `b` take `extra_ms` longer.
    Delay {
        a: usize,
        b: usize,
        extra_ms: u64,
        for_ms: u64,
    },
    KillLeader {
        cluster: usize,
        down_ms: u64,
    },
    KillReplica {
        cluster: usize,
        replica: usize,
        down_ms: u64,
    },
    /// The leader's next commit whose reply is due is followed by its death,
    /// before the reply leaves.
    CrashAfterCommit {
        cluster: usize,
        down_ms: u64,
    },
    CutAgent {
        cluster: usize,
        node: usize,
        for_ms: u64,
    },
    PauseAgent {
        cluster: usize,
        node: usize,
        for_ms: u64,
    },
    /// The machine dies with everything on it, and comes back empty after
    /// `for_ms`: its cluster loses the capacity meanwhile.
    NodeLost {
        cluster: usize,
        node: usize,
        for_ms: u64,
    },
    RestartAgent {
        cluster: usize,
        node: usize,
    },
    /// Steps a cluster's wall clock; nothing under test reads it.
    WallClockJump {
        cluster: usize,
        by_ms: i64,
    },
    /// A message `from` sends without following the protocol.
    Inject {
        from: usize,
        to: usize,
        message: Message,
    },
}

/// The federation a run starts with, and what happens to it.
#[derive(Clone, Debug)]
pub struct Setup {
    pub clusters: Vec<ClusterSpec>,
    pub events: Vec<(u64, Event)>,
    pub duration_ms: u64,
    /// No fault starts after this; the rest of the run must converge.
    pub quiet_from_ms: u64,
    /// Draw faults at random (otherwise only the scripted ones happen).
    pub random_faults: bool,
    /// Lose, duplicate and delay messages at random.
    pub message_faults: bool,
}

pub struct Replica {
    pub state: ClusterState,
    pub applied: usize,
    pub up: bool,
    up_at: u64,
}

pub struct Leader {
    pub replica: usize,
    pub origin: Origin,
    pub target: Target,
    broker: Broker,
    heartbeats: Heartbeats,
    /// When each job last had work offered, so a refused job is not
    /// offered again every step.
    offered: BTreeMap<JobId, u64>,
}

/// An instance, federation-wide: (origin cluster, origin job, group,
/// index in the origin's job).
pub type InstanceKey = (String, String, String, u32);

/// A running instance: the ground truth the checker reads.
#[derive(Clone, Debug)]
pub struct Proc {
    /// (origin cluster, origin job, group, origin index).
    pub key: InstanceKey,
    pub at_most_once: bool,
    /// The delegation whose lease this delegated instance runs under.
    pub lease_of: Option<String>,
    pub started_ms: u64,
    /// A batch instance ends by itself then.
    pub done_ms: Option<u64>,
    /// Stopped: it dies then.
    pub dying_ms: Option<u64>,
    /// At-most-once work: the fence process kills it then unless the agent
    /// renews it (`agent::fence`), even while the agent is paused.
    fence_ms: Option<u64>,
    /// What to report when it ends.
    ends_as: AllocStatus,
}

pub struct SimNode {
    pub id: NodeId,
    pub up: bool,
    pub paused_until: u64,
    pub cut_until: u64,
    /// Until when the machine is gone (see [`Event::NodeLost`]).
    pub lost_until: u64,
    /// When (cluster clock) the agent last heard from its servers.
    last_contact: Option<u64>,
    /// Per delegation id: until when (cluster clock) its at-most-once work
    /// may run, as the leaders granted.
    grants: BTreeMap<String, u64>,
    pub procs: BTreeMap<AllocId, Proc>,
    /// Allocations that ended here: never started again, whatever a sync
    /// that has not yet seen their report says.
    ended: std::collections::BTreeSet<AllocId>,
    reports: Vec<AllocReport>,
}

pub struct Cluster {
    pub name: String,
    pub jurisdictions: Vec<String>,
    pub policy: Policy,
    pub log: Vec<Command>,
    /// The committed log applied in full: what the checker reads.
    pub oracle: ClusterState,
    pub replicas: Vec<Replica>,
    pub leader: Option<Leader>,
    election_at: Option<u64>,
    clock_offset: u64,
    /// This cluster's protocol timers (its policy's `[retry]`).
    pub timing: Timing,
    clock_ppm: i64,
    wall_offset: i64,
    pub nodes: Vec<SimNode>,
    crash_after_commit: Option<u64>,
    /// The last moment (true time) the cluster had no leader.
    pub leaderless_at: u64,
}

impl Cluster {
    /// This cluster's monotonic clock at true time `now`.
    pub fn clock(&self, now: u64) -> u64 {
        self.clock_offset + (now as i128 * (1_000_000 + self.clock_ppm as i128) / 1_000_000) as u64
    }

    fn majority_up(&self) -> bool {
        2 * self.replicas.iter().filter(|r| r.up).count() > self.replicas.len()
    }

    pub fn index_of(clusters: &[Cluster], name: &str) -> Option<usize> {
        clusters.iter().position(|c| c.name == name)
    }
}

struct Flight {
    at: u64,
    seq: u64,
    from: usize,
    to: usize,
    message: Message,
}

pub struct World {
    pub now: u64,
    pub step: u64,
    pub plant: Option<Plant>,
    pub clusters: Vec<Cluster>,
    pub quiet_from_ms: u64,
    duration_ms: u64,
    random_faults: bool,
    message_faults: bool,
    rng: Rng,
    net: Vec<Flight>,
    seq: u64,
    cuts: Vec<(usize, usize, u64)>,
    delays: Vec<(usize, usize, u64, u64)>,
    events: VecDeque<(u64, Event)>,
    keep_trace: bool,
    trace: Vec<String>,
    hash: u64,
    checker: Checker,
}

/// The protocol's timers in the simulator: short, so a run sees many
/// leases come and go.
pub fn sim_timing() -> Timing {
    Timing { lease_ms: 6_000, grace_ms: 3_000, renew_every_ms: 1_000, retry_ms: 500 }
}

/// Runs one seed (or scenario) to its end or its first violation.
pub fn run(options: &Options) -> Report {
    let mut rng = Rng::new(options.seed ^ 0x05ee_d0f4_a45e);
    let setup = match &options.scenario {
        Some(s) => s.setup(),
        None => crate::scenario::random_setup(&mut rng),
    };
    let mut world = World::new(setup, options, rng);
    let violation = world.run_to_end();
    Report {
        seed: options.seed,
        steps: world.step,
        sim_ms: world.now,
        violation,
        trace_hash: world.hash,
        trace: std::mem::take(&mut world.trace),
    }
}

impl World {
    fn new(setup: Setup, options: &Options, mut rng: Rng) -> World {
        let timing = sim_timing();
        let names: Vec<String> = setup.clusters.iter().map(|c| c.name.clone()).collect();
        let clusters = setup
            .clusters
            .iter()
            .map(|spec| {
                let mut policy = Policy::isolated(&spec.name);
                policy.jurisdictions = spec.jurisdictions.clone();
                policy.inbound.max_share_of_capacity = spec.inbound_share;
                policy.overflow.max_remote_share = 1.0;
                for n in names.iter().filter(|n| **n != spec.name) {
                    policy.peers.insert(n.clone(), Peer { delegate_to: true, accept_from: true });
                }
                let nodes: Vec<Node> = (0..spec.nodes).map(|i| sim_node(spec, i)).collect();
                let log: Vec<Command> = nodes.iter().cloned().map(Command::UpsertNode).collect();
                let mut oracle = ClusterState::new();
                for c in &log {
                    oracle.apply(c);
                }
                let replicas = (0..spec.servers)
                    .map(|_| Replica { state: oracle.clone(), applied: log.len(), up: true, up_at: 0 })
                    .collect();
                Cluster {
                    name: spec.name.clone(),
                    jurisdictions: spec.jurisdictions.clone(),
                    policy,
                    log,
                    oracle,
                    replicas,
                    leader: None,
                    election_at: None,
                    clock_offset: 1_000_000 + rng.below(1_000_000_000) as u64,
                    clock_ppm: rng.below(201) as i64 - 100,
                    // Each cluster's own `[retry]`, as its policy would
                    // say: leases and graces that differ between origin
                    // and target (the grace covers the 1 s kill timeout
                    // twice). Scripted scenarios keep one timing.
                    timing: if setup.random_faults {
                        let lease_ms = 4_000 + 500 * rng.below(9) as u64;
                        Timing {
                            lease_ms,
                            grace_ms: 2_000 + 500 * rng.below(5) as u64,
                            renew_every_ms: lease_ms / 5,
                            retry_ms: 300 + 100 * rng.below(5) as u64,
                        }
                    } else {
                        timing.clone()
                    },
                    wall_offset: 0,
                    nodes: nodes
                        .iter()
                        .map(|n| SimNode {
                            id: n.id.clone(),
                            up: true,
                            paused_until: 0,
                            lost_until: 0,
                            cut_until: 0,
                            last_contact: None,
                            grants: BTreeMap::new(),
                            procs: BTreeMap::new(),
                            ended: Default::default(),
                            reports: Vec::new(),
                        })
                        .collect(),
                    crash_after_commit: None,
                    leaderless_at: 0,
                }
            })
            .collect();
        let mut events = setup.events;
        events.sort_by_key(|(t, _)| *t);
        let mut world = World {
            now: 0,
            step: 0,
            plant: options.plant,
            clusters,
            quiet_from_ms: setup.quiet_from_ms,
            duration_ms: setup.duration_ms,
            random_faults: setup.random_faults,
            message_faults: setup.message_faults,
            rng,
            net: Vec::new(),
            seq: 0,
            cuts: Vec::new(),
            delays: Vec::new(),
            events: events.into(),
            keep_trace: options.trace,
            trace: Vec::new(),
            hash: 0xcbf2_9ce4_8422_2325,
            checker: Checker::default(),
        };
        for c in 0..world.clusters.len() {
            world.lead(c, 0);
        }
        world
    }

    /// Until when (true time) messages from cluster `a` to `b` were last
    /// cut; 0 if never.
    pub fn cut_until(&self, a: usize, b: usize) -> u64 {
        self.cuts.iter().filter(|c| c.0 == a && c.1 == b).map(|c| c.2).max().unwrap_or(0)
    }

    /// Until when (true time) messages from `a` to `b` were last delayed.
    pub fn delayed_until(&self, a: usize, b: usize) -> u64 {
        self.delays.iter().filter(|d| d.0 == a && d.1 == b).map(|d| d.3).max().unwrap_or(0)
    }

    /// Adds a line to the event trace (and its hash).
    pub fn note(&mut self, line: String) {
        let line = format!("{:>7}ms {line}", self.now);
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        if self.keep_trace {
            self.trace.push(line);
        }
    }

    fn run_to_end(&mut self) -> Option<Violation> {
        while self.now < self.duration_ms {
            self.now += STEP_MS;
            self.step += 1;
            self.fire_events();
            if self.random_faults && self.now < self.quiet_from_ms {
                self.random_fault();
            }
            self.deliver();
            for c in 0..self.clusters.len() {
                self.servers_step(c);
                for n in 0..self.clusters[c].nodes.len() {
                    self.agent_step(c, n);
                }
            }
            let mut checker = std::mem::take(&mut self.checker);
            let found = checker.after_step(self);
            self.checker = checker;
            if let Some(v) = found {
                self.note(format!("VIOLATION {} {}", v.invariant, v.detail));
                return Some(v);
            }
        }
        let mut checker = std::mem::take(&mut self.checker);
        let found = checker.at_end(self);
        self.checker = checker;
        if let Some(v) = &found {
            self.note(format!("VIOLATION {} {}", v.invariant, v.detail));
        }
        found
    }

    fn fire_events(&mut self) {
        while self.events.front().is_some_and(|(t, _)| *t <= self.now) {
            let (_, e) = self.events.pop_front().expect("checked");
            self.event(e);
        }
    }

    pub(crate) fn event(&mut self, e: Event) {
        match e {
            Event::Submit { cluster, job } => {
                self.note(format!(
                    "{} submit {} ({} instances)",
                    self.clusters[cluster].name,
                    job.id,
                    job.instance_count()
                ));
                self.client_write(cluster, Command::RegisterJob(job));
            }
            Event::Update { cluster, job } => {
                let Some(mut j) = self.clusters[cluster].oracle.job(&JobId::new(&job)).cloned() else { return };
                if j.stopped {
                    return;
                }
                j.priority = j.priority.wrapping_add(1).max(1);
                self.note(format!("{} update {job}", self.clusters[cluster].name));
                self.client_write(cluster, Command::RegisterJob(j));
            }
            Event::Scale { cluster, job, count } => {
                let Some(mut j) = self.clusters[cluster].oracle.job(&JobId::new(&job)).cloned() else { return };
                if j.stopped {
                    return;
                }
                for g in &mut j.groups {
                    g.count = count;
                }
                self.note(format!("{} scale {job} to {count}", self.clusters[cluster].name));
                self.client_write(cluster, Command::RegisterJob(j));
            }
            Event::Stop { cluster, job } => {
                self.note(format!("{} stop {job}", self.clusters[cluster].name));
                if self.client_write(cluster, Command::StopJob(JobId::new(&job))) {
                    self.checker.stopped(cluster, &job, self.now);
                }
            }
            Event::Partition { a, b, one_way, for_ms } => {
                self.note(format!("partition {a}->{b}{} for {for_ms}ms", if one_way { "" } else { " and back" }));
                self.cuts.push((a, b, self.now + for_ms));
                if !one_way {
                    self.cuts.push((b, a, self.now + for_ms));
                }
            }
            Event::Delay { a, b, extra_ms, for_ms } => {
                self.note(format!("delay {a}->{b} by {extra_ms}ms for {for_ms}ms"));
                self.delays.push((a, b, extra_ms, self.now + for_ms));
            }
            Event::KillLeader { cluster, down_ms } => {
                if let Some(r) = self.clusters[cluster].leader.as_ref().map(|l| l.replica) {
                    self.kill_replica(cluster, r, down_ms);
                }
            }
            Event::KillReplica { cluster, replica, down_ms } => {
                if replica < self.clusters[cluster].replicas.len() {
                    self.kill_replica(cluster, replica, down_ms);
                }
            }
            Event::CrashAfterCommit { cluster, down_ms } => {
                self.clusters[cluster].crash_after_commit = Some(down_ms);
            }
            Event::CutAgent { cluster, node, for_ms } => {
                self.note(format!("{} agent {node} cut off for {for_ms}ms", self.clusters[cluster].name));
                self.clusters[cluster].nodes[node].cut_until = self.now + for_ms;
            }
            Event::PauseAgent { cluster, node, for_ms } => {
                self.note(format!("{} agent {node} paused for {for_ms}ms", self.clusters[cluster].name));
                self.clusters[cluster].nodes[node].paused_until = self.now + for_ms;
            }
            Event::NodeLost { cluster, node, for_ms } => {
                self.note(format!("{} node {node} lost for {for_ms}ms", self.clusters[cluster].name));
                let n = &mut self.clusters[cluster].nodes[node];
                n.procs.clear();
                n.last_contact = None;
                n.grants.clear();
                // Its disk survives: what it ended and has yet to report is
                // reported when it is back, as after an agent restart.
                n.lost_until = self.now + for_ms;
            }
            Event::RestartAgent { cluster, node } => {
                self.note(format!("{} agent {node} restarts", self.clusters[cluster].name));
                let n = &mut self.clusters[cluster].nodes[node];
                // Its tasks die with it (they never outlive their agent);
                // what it ended and has yet to report is in its state file.
                n.procs.clear();
                n.last_contact = None;
                n.grants.clear();
            }
            Event::WallClockJump { cluster, by_ms } => {
                self.note(format!("{} wall clock steps {by_ms}ms", self.clusters[cluster].name));
                self.clusters[cluster].wall_offset += by_ms;
            }
            Event::Inject { from, to, message } => {
                self.note(format!("inject {from}->{to} {message:?}"));
                self.push(from, to, message, 1);
            }
        }
    }

    /// A client's write: committed through the leader, or lost when there
    /// is none (the client would retry; the workload moves on).
    fn client_write(&mut self, c: usize, command: Command) -> bool {
        if self.clusters[c].leader.is_none() {
            self.note(format!("{} no leader: write dropped", self.clusters[c].name));
            return false;
        }
        self.commit(c, command);
        true
    }

    fn random_fault(&mut self) {
        // About one fault every 4 s of simulated time.
        if self.rng.below(40) != 0 {
            return;
        }
        let n = self.clusters.len();
        let c = self.rng.below(n);
        // Every fault is over by the time the quiet part of the run begins.
        let left = self.quiet_from_ms.saturating_sub(self.now).max(1);
        let for_ms = (2_000 + self.rng.below(28_000) as u64).min(left);
        let e = match self.rng.below(11) {
            // A link that slows down, then fails the other way: what
            // stretches a lease the most.
            9 => {
                let b = (c + 1 + self.rng.below(n - 1)) % n;
                let extra_ms = (3_000 + self.rng.below(6_000) as u64).min(left);
                self.event(Event::Delay { a: c, b, extra_ms, for_ms: 2_000.min(left) });
                let at = self.now + 1_000 + self.rng.below(3_000) as u64;
                if at < self.quiet_from_ms {
                    let for_ms = (5_000 + self.rng.below(15_000) as u64).min(self.quiet_from_ms - at);
                    self.events.push_back((at, Event::Partition { a: b, b: c, one_way: true, for_ms }));
                    self.events.make_contiguous().sort_by_key(|(t, _)| *t);
                }
                return;
            }
            0 | 1 => {
                let b = (c + 1 + self.rng.below(n - 1)) % n;
                Event::Partition { a: c, b, one_way: self.rng.below(3) == 0, for_ms }
            }
            2 => Event::KillLeader { cluster: c, down_ms: (500 + self.rng.below(15_000) as u64).min(left) },
            3 => {
                let r = self.rng.below(self.clusters[c].replicas.len());
                Event::KillReplica { cluster: c, replica: r, down_ms: (500 + self.rng.below(15_000) as u64).min(left) }
            }
            4 => Event::CrashAfterCommit { cluster: c, down_ms: (500 + self.rng.below(5_000) as u64).min(left) },
            5 => Event::CutAgent { cluster: c, node: self.rng.below(self.clusters[c].nodes.len()), for_ms },
            6 => Event::RestartAgent { cluster: c, node: self.rng.below(self.clusters[c].nodes.len()) },
            10 => Event::NodeLost { cluster: c, node: self.rng.below(self.clusters[c].nodes.len()), for_ms },
            7 => {
                let b = (c + 1 + self.rng.below(n - 1)) % n;
                Event::Delay { a: c, b, extra_ms: (1_000 + self.rng.below(9_000) as u64).min(left), for_ms }
            }
            _ => Event::WallClockJump { cluster: c, by_ms: self.rng.below(240_000) as i64 - 120_000 },
        };
        self.event(e);
    }

    fn kill_replica(&mut self, c: usize, r: usize, down_ms: u64) {
        let cl = &mut self.clusters[c];
        if !cl.replicas[r].up {
            return;
        }
        cl.replicas[r].up = false;
        cl.replicas[r].up_at = self.now + down_ms;
        let was_leader = cl.leader.as_ref().is_some_and(|l| l.replica == r);
        if was_leader {
            cl.leader = None;
        }
        let name = cl.name.clone();
        self.note(format!("{name} server {r} dies{} for {down_ms}ms", if was_leader { " (leader)" } else { "" }));
    }

    /// Sends a message between clusters' leaders through the faulty network.
    fn push(&mut self, from: usize, to: usize, message: Message, copies: usize) {
        for _ in 0..copies {
            let mut delay = 5 + self.rng.below(150) as u64;
            if self.message_faults && self.now < self.quiet_from_ms && self.rng.below(50) == 0 {
                delay += 2_000 + self.rng.below(8_000) as u64;
            }
            delay +=
                self.delays.iter().filter(|d| d.0 == from && d.1 == to && d.3 > self.now).map(|d| d.2).sum::<u64>();
            self.seq += 1;
            self.net.push(Flight { at: self.now + delay, seq: self.seq, from, to, message: message.clone() });
        }
    }

    fn send(&mut self, from: usize, to: &str, message: Message) {
        let Some(to) = Cluster::index_of(&self.clusters, to) else { return };
        if self.cuts.iter().any(|&(a, b, until)| a == from && b == to && until > self.now) {
            return;
        }
        let faulty = self.message_faults && self.now < self.quiet_from_ms;
        if faulty && self.rng.below(33) == 0 {
            return;
        }
        let copies = if faulty && self.rng.below(50) == 0 { 2 } else { 1 };
        self.push(from, to, message, copies);
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due: Vec<Flight> = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].at <= now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|f| (f.at, f.seq));
        for f in due {
            // A partition that started while the message was in flight
            // drops it too.
            if self.cuts.iter().any(|&(a, b, until)| a == f.from && b == f.to && until > now) {
                continue;
            }
            self.receive(f.from, f.to, f.message);
        }
    }

    fn receive(&mut self, from: usize, to: usize, message: Message) {
        let from_name = self.clusters[from].name.clone();
        let line = match &message {
            Message::ToTarget(ToTarget::Offer { id, indices, .. }) => format!("offer {id} {indices:?}"),
            Message::ToTarget(ToTarget::Revoke { id }) => format!("revoke {id}"),
            Message::ToTarget(ToTarget::RenewAck { seq, untracked, .. }) => {
                format!("renew-ack {seq} untracked {untracked:?}")
            }
            Message::ToOrigin(ToOrigin::Outcome { id, outcome }) => format!("outcome {id} {outcome:?}"),
            Message::ToOrigin(ToOrigin::Revoked { id, alive }) => format!("revoked {id} alive {alive}"),
            Message::ToOrigin(ToOrigin::Renew { seq, delegations, .. }) => {
                format!("renew {seq} ({} delegations)", delegations.len())
            }
        };
        self.note(format!("{from_name} -> {}: {line}", self.clusters[to].name));
        let cl = &mut self.clusters[to];
        let now_c = cl.clock(self.now);
        let Some(leader) = cl.leader.as_mut() else { return };
        let state = &cl.replicas[leader.replica].state;
        let actions = match message {
            Message::ToTarget(m) => leader.target.on_message(&cl.policy, state, &from_name, m, now_c),
            Message::ToOrigin(m) => leader.origin.on_message(state, &from_name, m, now_c),
        };
        self.perform(to, actions);
    }

    fn perform(&mut self, c: usize, actions: Vec<Action>) {
        for a in actions {
            if self.clusters[c].leader.is_none() {
                return;
            }
            match a {
                Action::Propose(command) => {
                    self.commit(c, command);
                }
                Action::ProposeThenSend { command, to, reply } => {
                    let effect = self.commit(c, command);
                    if let Some(down_ms) = self.clusters[c].crash_after_commit.take() {
                        let r = self.clusters[c].leader.as_ref().map(|l| l.replica).expect("leader");
                        self.note(format!("{} leader dies between commit and reply", self.clusters[c].name));
                        self.kill_replica(c, r, down_ms);
                        return;
                    }
                    if !matches!(effect, Effect::Refused(_)) {
                        self.send(c, &to, reply);
                    }
                }
                Action::Send { to, message } => self.send(c, &to, message),
            }
        }
    }

    /// Commits a command: appended to the log, applied by the oracle and
    /// by the leader's replica (which has applied everything before it).
    fn commit(&mut self, c: usize, command: Command) -> Effect {
        let describe = describe(&command);
        let cl = &mut self.clusters[c];
        cl.log.push(command.clone());
        cl.oracle.apply(&command);
        let r = cl.leader.as_ref().map(|l| l.replica).expect("only a leader commits");
        let effect = catch_up(cl, r, self.plant);
        let line = format!("{} commit #{} {describe} -> {}", cl.name, cl.log.len(), effect_word(&effect));
        self.note(line);
        effect
    }

    fn servers_step(&mut self, c: usize) {
        let now = self.now;
        let plant = self.plant;
        // Replicas come back up from their own disk (a snapshot of what
        // they had applied), then catch up.
        for r in 0..self.clusters[c].replicas.len() {
            let cl = &mut self.clusters[c];
            let rep = &mut cl.replicas[r];
            if !rep.up && rep.up_at <= now {
                rep.up = true;
                let mut restored = ClusterState::restore(&rep.state.snapshot()).expect("own snapshot restores");
                if plant == Some(Plant::SnapshotDropsHolds) {
                    let holders: Vec<String> = restored.holds().keys().cloned().collect();
                    for h in holders {
                        let record = restored.record(&h).map(<[u8]>::to_vec).unwrap_or_default();
                        restored.release(&h, record);
                    }
                }
                rep.state = restored;
                let name = cl.name.clone();
                self.note(format!("{name} server {r} restarts"));
            }
        }
        // Followers apply at their own pace.
        for r in 0..self.clusters[c].replicas.len() {
            let lag = self.rng.below(4);
            let cl = &mut self.clusters[c];
            if cl.replicas[r].up && cl.leader.as_ref().is_none_or(|l| l.replica != r) {
                let target = cl.log.len().saturating_sub(lag);
                while cl.replicas[r].applied < target {
                    apply_next(cl, r, plant);
                }
            }
        }
        self.election(c);
        if self.clusters[c].leader.is_some() {
            self.leader_step(c);
        } else {
            self.clusters[c].leaderless_at = now;
        }
    }

    fn election(&mut self, c: usize) {
        let now = self.now;
        let cl = &mut self.clusters[c];
        if cl.leader.is_some() && !cl.majority_up() {
            cl.leader = None;
            let name = cl.name.clone();
            self.note(format!("{name} leader steps down: no quorum"));
            return;
        }
        if cl.leader.is_some() || !cl.majority_up() {
            return;
        }
        let at = *cl.election_at.get_or_insert(now + 300 + self.rng.below(1_200) as u64);
        if now < at {
            return;
        }
        cl.election_at = None;
        let up: Vec<usize> = (0..cl.replicas.len()).filter(|r| cl.replicas[*r].up).collect();
        let r = up[self.rng.below(up.len())];
        self.lead(c, r);
    }

    /// Replica `r` of cluster `c` becomes leader: it applies the whole
    /// log first, then builds its leader memory afresh.
    fn lead(&mut self, c: usize, r: usize) {
        let now = self.now;
        let cl = &mut self.clusters[c];
        catch_up(cl, r, self.plant);
        let now_c = cl.clock(now);
        let plants = plants_of(self.plant);
        let mut heartbeats = Heartbeats::new(NODE_TTL_MS, NODE_GRACE_MS);
        for n in cl.replicas[r].state.nodes() {
            heartbeats.beat_if_untimed(&n.id, now_c);
        }
        cl.leader = Some(Leader {
            replica: r,
            origin: Origin::new(&cl.name, cl.timing.clone(), plants.clone(), now_c),
            target: Target::new(cl.timing.clone(), plants, self.rng.next_u64()),
            broker: Broker::default(),
            heartbeats,
            offered: BTreeMap::new(),
        });
        let name = cl.name.clone();
        self.note(format!("{name} server {r} leads"));
    }

    fn leader_step(&mut self, c: usize) {
        let now = self.now;
        let now_c = self.clusters[c].clock(now);
        // Nodes that missed their heartbeats go down.
        let expired = {
            let cl = &mut self.clusters[c];
            let leader = cl.leader.as_mut().expect("leader");
            leader.heartbeats.expired(now_c)
        };
        for node in expired {
            let ready = self.clusters[c]
                .oracle
                .node_idx(&node)
                .is_some_and(|i| self.clusters[c].oracle.node(i).status == NodeStatus::Ready);
            if ready {
                self.commit(c, Command::SetNodeStatus { node, status: NodeStatus::Down, eligible: true });
            }
        }
        // Scheduling: every open evaluation the broker hands out.
        let batch = {
            let cl = &mut self.clusters[c];
            let leader = cl.leader.as_mut().expect("leader");
            leader.broker.next_batch(&cl.replicas[leader.replica].state)
        };
        let seed = self.rng.next_u64();
        for work in &batch {
            if self.clusters[c].leader.is_none() {
                return;
            }
            let cl = &self.clusters[c];
            let state = &cl.replicas[cl.leader.as_ref().expect("leader").replica].state;
            let plan = schedule(state, &work.job, &SchedulerConfig { seed, ..SchedulerConfig::default() });
            if work.retry_blocked && plan.placements.is_empty() && plan.stops.is_empty() {
                continue;
            }
            self.commit(c, Command::ApplyPlans(vec![(work.eval, plan)]));
        }
        if let Some(l) = self.clusters[c].leader.as_mut() {
            l.broker.done(&batch);
        } else {
            return;
        }
        // Delegation: the target's renewals, the origin's duties, and
        // overflow offered to a peer.
        let actions = {
            let cl = &mut self.clusters[c];
            let leader = cl.leader.as_mut().expect("leader");
            let state = &cl.replicas[leader.replica].state;
            let mut a = leader.target.tick(state, now_c);
            a.extend(leader.origin.tick(&cl.policy, state, now_c));
            a
        };
        self.perform(c, actions);
        self.overflow(c, now_c);
    }

    fn overflow(&mut self, c: usize, now_c: u64) {
        let Some(leader) = self.clusters[c].leader.as_ref() else { return };
        let work = Origin::overflow(&self.clusters[c].replicas[leader.replica].state);
        for w in work {
            let cl = &self.clusters[c];
            let Some(leader) = cl.leader.as_ref() else { return };
            if leader.offered.get(&w.job.id).is_some_and(|t| now_c < t + 1_000) {
                continue;
            }
            let allowed = cl.policy.allowed_jurisdictions(&w.job);
            // Targets by what they declare, as gossip would carry it.
            let peers: Vec<String> = self
                .clusters
                .iter()
                .filter(|p| p.name != cl.name && cl.policy.may_delegate_to(&p.name))
                .filter(|p| allowed.as_ref().is_none_or(|a| p.jurisdictions.iter().any(|j| a.contains(j))))
                .map(|p| p.name.clone())
                .collect();
            if peers.is_empty() {
                continue;
            }
            let target = peers[self.rng.below(peers.len())].clone();
            let cl = &mut self.clusters[c];
            let leader = cl.leader.as_mut().expect("leader");
            leader.offered.insert(w.job.id.clone(), now_c);
            let state = &cl.replicas[leader.replica].state;
            let actions = leader.origin.delegate(&cl.policy, state, &w, &target, now_c);
            self.perform(c, actions);
        }
    }

    fn agent_step(&mut self, c: usize, n: usize) {
        let now = self.now;
        let cl = &mut self.clusters[c];
        let now_c = cl.clock(now);
        let node = &mut cl.nodes[n];
        if !node.up || now < node.lost_until {
            return;
        }
        // Tasks end on their own (batch) or finish dying.
        let ended: Vec<(AllocId, AllocStatus)> = node
            .procs
            .iter()
            .filter_map(|(id, p)| match (p.dying_ms, p.done_ms) {
                (Some(d), _) if d <= now => Some((*id, p.ends_as)),
                (None, Some(d)) if d <= now => Some((*id, AllocStatus::Complete)),
                _ => None,
            })
            .collect();
        for (id, status) in ended {
            node.procs.remove(&id);
            node.ended.insert(id);
            node.reports.push(AllocReport::status(id, status));
        }
        // The fence runs beside the agent, paused or not: SIGKILL at once.
        for p in node.procs.values_mut().filter(|p| p.fence_ms.is_some_and(|f| f <= now) && p.dying_ms.is_none()) {
            p.dying_ms = Some(now);
            p.ends_as = AllocStatus::Lost;
        }
        if now < node.paused_until {
            return;
        }
        // The agent renews each at-most-once task's fence: until its own
        // lease would have stopped it, or its delegation's grant ends plus
        // the kill timeout (cluster clock, turned into a duration as the
        // real agent does).
        let lease = Lease { ttl_ms: NODE_TTL_MS, grace_ms: NODE_GRACE_MS };
        let by_lease = node.last_contact.map(|t| t + lease.stop_within_ms());
        for p in node.procs.values_mut().filter(|p| p.at_most_once) {
            let by_grant = p.lease_of.as_ref().map(|d| node.grants.get(d).copied().unwrap_or(0) + KILL_MS_MAX);
            if let Some(until_c) = [by_lease, by_grant].into_iter().flatten().min() {
                p.fence_ms = Some(now + until_c.saturating_sub(now_c));
            }
        }
        let connected = now >= node.cut_until && cl.leader.as_ref().is_some_and(|l| cl.replicas[l.replica].up);
        let kill = |p: &mut Proc, rng: &mut Rng, ends_as: AllocStatus| {
            if p.dying_ms.is_none() {
                p.dying_ms = Some(now + rng.below(KILL_MS_MAX as usize + 1) as u64);
                p.ends_as = ends_as;
            }
        };
        // Delegated at-most-once work lives only as long as its grant.
        for p in node.procs.values_mut() {
            if let Some(origin) = &p.lease_of {
                if p.at_most_once && node.grants.get(origin).is_none_or(|g| *g <= now_c) {
                    kill(p, &mut self.rng, AllocStatus::Lost);
                }
            }
        }
        if !connected {
            // Cut off past its lease, at-most-once work stops, by the
            // agent's own rule (`agent::lease`): it starts stopping when the
            // last answer is a TTL old and has stopped by TTL + grace / 2.
            let lease = Lease { ttl_ms: NODE_TTL_MS, grace_ms: NODE_GRACE_MS };
            let since = node.last_contact.map(|t| now_c.saturating_sub(t));
            if since.is_some_and(|s| !lease.in_contact(s)) {
                let by = node.last_contact.map_or(now, |t| now + (t + lease.stop_within_ms()).saturating_sub(now_c));
                for p in node.procs.values_mut().filter(|p| p.at_most_once && p.dying_ms.is_none()) {
                    p.dying_ms = Some(by.min(now + self.rng.below(KILL_MS_MAX as usize + 1) as u64).max(now));
                    p.ends_as = AllocStatus::Lost;
                }
            }
            return;
        }
        let leader = cl.leader.as_mut().expect("connected");
        let state = &cl.replicas[leader.replica].state;
        // Heartbeat, answered at once: the lease runs from its sending.
        leader.heartbeats.beat(&node.id, now_c);
        node.last_contact = Some(now_c);
        for (r, _) in Target::records(state) {
            let until = now_c + leader.target.lease_remaining(&r.origin, &r.id, now_c);
            let g = node.grants.entry(r.id).or_insert(0);
            *g = (*g).max(until);
        }
        let down = state.node_idx(&node.id).is_some_and(|i| state.node(i).status == NodeStatus::Down);
        // Sync: start what should run, stop what should not.
        let mut wanted: BTreeMap<AllocId, (Proc, bool)> = BTreeMap::new();
        for a in state.allocs_on_node(&node.id).filter(|a| !a.status.is_terminal()) {
            let Some(job) = state.job(&a.job) else { continue };
            let Some(group) = job.group(&a.group) else { continue };
            let at_most_once = group.on_disconnect == OnDisconnect::Stop;
            let run_for = group.tasks.iter().find_map(|t| match t.driver {
                cluster_core::model::job::Driver::Mock { run_for_ms, .. } if run_for_ms > 0 => Some(run_for_ms),
                _ => None,
            });
            let (key, lease_of) = match job.labels.get(LABEL_ORIGIN) {
                Some(origin) => {
                    let id = job.labels.get(LABEL_DELEGATION).cloned().unwrap_or_default();
                    let rec = state.record(&inbound_key(&id)).and_then(|b| decode::<Inbound>(b).ok());
                    let Some(rec) = rec else { continue };
                    let Some(&index) = rec.indices.get(a.index as usize) else { continue };
                    ((origin.clone(), rec.origin_job.clone(), rec.group.clone(), index), Some(id))
                }
                None => ((cl.name.clone(), a.job.to_string(), a.group.to_string(), a.index), None),
            };
            let proc = Proc {
                key,
                at_most_once,
                lease_of,
                started_ms: now,
                done_ms: run_for.map(|d| now + d),
                dying_ms: None,
                fence_ms: None,
                ends_as: AllocStatus::Complete,
            };
            wanted.insert(a.id, (proc, a.desired == DesiredStatus::Run && !down));
        }
        let mut reports = std::mem::take(&mut node.reports);
        for (id, p) in node.procs.iter_mut() {
            match wanted.get(id) {
                Some((_, true)) => {}
                _ => kill(p, &mut self.rng, AllocStatus::Complete),
            }
        }
        for (id, (proc, run)) in wanted {
            if node.procs.contains_key(&id) || node.ended.contains(&id) {
                continue;
            }
            if !run {
                reports.push(AllocReport::status(id, AllocStatus::Complete));
                continue;
            }
            let granted = match &proc.lease_of {
                Some(o) if proc.at_most_once => node.grants.get(o).is_some_and(|g| *g > now_c),
                _ => true,
            };
            if granted {
                node.procs.insert(id, proc);
                reports.push(AllocReport::status(id, AllocStatus::Running));
            }
        }
        let revive =
            down.then(|| Command::SetNodeStatus { node: node.id.clone(), status: NodeStatus::Ready, eligible: true });
        // Reports for allocations already terminal change nothing.
        reports.retain(|r| state.alloc(r.id).is_some_and(|a| !a.status.is_terminal() && a.status != r.status));
        if let Some(cmd) = revive {
            self.commit(c, cmd);
        }
        if !reports.is_empty() {
            self.commit(c, Command::AllocStatus(reports));
        }
    }
}

fn plants_of(plant: Option<Plant>) -> Plants {
    Plants {
        release_on_timeout: plant == Some(Plant::ReleaseOnTimeout),
        forget_registration: plant == Some(Plant::ForgetRegistration),
        lease_from_answer: plant == Some(Plant::LeaseFromAnswer),
        no_grace: plant == Some(Plant::NoGrace),
        lease_per_origin: plant == Some(Plant::LeasePerOrigin),
    }
}

/// Applies replica `r`'s next log entry.
fn apply_next(cl: &mut Cluster, r: usize, plant: Option<Plant>) -> Effect {
    let rep = &mut cl.replicas[r];
    let command = &cl.log[rep.applied];
    rep.applied += 1;
    if plant == Some(Plant::SkipEntry) && r == 1 && rep.applied % 40 == 0 {
        return Effect::Done;
    }
    rep.state.apply(command)
}

/// Applies everything replica `r` has not; the effect of the last entry.
fn catch_up(cl: &mut Cluster, r: usize, plant: Option<Plant>) -> Effect {
    let mut effect = Effect::Done;
    while cl.replicas[r].applied < cl.log.len() {
        effect = apply_next(cl, r, plant);
    }
    effect
}

fn sim_node(spec: &ClusterSpec, i: usize) -> Node {
    Node {
        id: NodeId::new(format!("{}-n{i}", spec.name)),
        class: "sim".into(),
        region: spec.name.as_str().into(),
        zone: "a".into(),
        environment: Environment::Cloud,
        execution_model: ExecutionModel::Container,
        attributes: [("arch".to_string(), "x86_64".to_string())].into(),
        meta: BTreeMap::new(),
        drivers: vec![Arc::from("mock"), Arc::from("exec")],
        jurisdictions: spec.jurisdictions.iter().map(|j| Arc::from(j.as_str())).collect(),
        datasets: Vec::new(),
        capacity: Resources { cpu_millis: spec.node_cpu_millis, memory_bytes: 64 << 30, ..Resources::default() },
        gpus: Vec::new(),
        cost_per_hour: 1.0,
        latency_class: 0,
        status: NodeStatus::Ready,
        eligible: true,
        draining: false,
        drain_deadline_ms: None,
        agent_address: None,
    }
}

fn describe(c: &Command) -> String {
    match c {
        Command::RegisterJob(j) => format!("register {} v{}", j.id, j.version),
        Command::StopJob(j) => format!("stop {j}"),
        Command::ApplyPlans(p) => {
            let placed: usize = p.iter().map(|(_, p)| p.placements.len()).sum();
            let stops: usize = p.iter().map(|(_, p)| p.stops.len()).sum();
            format!("plan {} +{placed} -{stops}", p.first().map_or(String::new(), |(_, p)| p.job.to_string()))
        }
        Command::AllocStatus(r) => format!(
            "status {}",
            r.iter().map(|r| format!("{}={}", r.id.0, r.status.as_str())).collect::<Vec<_>>().join(",")
        ),
        Command::SetNodeStatus { node, status, .. } => format!("node {node} {}", status.as_str()),
        Command::Guarded { holder, expect, then, .. } => {
            let then: Vec<String> = then.iter().map(describe).collect();
            format!(
                "guarded {holder} (expect {}) then [{}]",
                if expect.is_some() { "old" } else { "none" },
                then.join("; ")
            )
        }
        Command::Hold { holder, indices, .. } => format!("hold {holder} {indices:?}"),
        Command::Release { holder, .. } => format!("release {holder}"),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

fn effect_word(e: &Effect) -> String {
    match e {
        Effect::Refused(why) => format!("refused: {why}"),
        Effect::PlansApplied(o) => format!("{} plans", o.len()),
        _ => "ok".into(),
    }
}

/// Messages a peer might forge, for scenarios.
pub fn forged_revoke(id: &str) -> Message {
    Message::ToTarget(ToTarget::Revoke { id: id.to_string() })
}

/// A forged outcome, for scenarios.
pub fn forged_outcome(id: &str) -> Message {
    Message::ToOrigin(ToOrigin::Revoked { id: id.to_string(), alive: 0 })
}
