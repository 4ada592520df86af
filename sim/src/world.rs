//! The simulated federation and its step loop. See the crate docs for what
//! is real and what is simulated.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use cluster_core::agent::lease::Lease;
use cluster_core::command::{Command, Effect};
use cluster_core::ids::{AllocId, JobId, NodeId};
use cluster_core::model::alloc::AllocReport;
use cluster_core::model::job::OnDisconnect;
use cluster_core::model::{AllocStatus, DesiredStatus, Environment, ExecutionModel, Job, Node, NodeStatus};
use cluster_core::raft::core::{Core, RaftPlants};
use cluster_core::raft::node::{ProposeError, RaftConfig};
use cluster_core::raft::storage::MemoryStorage;
use cluster_core::resources::Resources;
use cluster_core::scheduler::{Rng, SchedulerConfig, schedule};
use cluster_core::server::broker::{Broker, Work};
use cluster_core::server::heartbeat::Heartbeats;
use cluster_core::state::ClusterState;
use federation::policy::{Peer, Policy};
use federation::proto::origin::Origin;
use federation::proto::target::{Inbound, Target};
use federation::proto::{Action, Message, Plants, Timing, ToOrigin, ToTarget, inbound_key};
use federation::protocol::{LABEL_DELEGATION, LABEL_ORIGIN, decode};
use federation::select::{Overflow, PeerInfo, select};
use gossip::summary::ClusterSummary;

use crate::check::Checker;

type RaftMessage = raft::prelude::Message;
type Answer = tokio::sync::oneshot::Receiver<Result<Effect, ProposeError>>;

/// One step of simulated time.
pub const STEP_MS: u64 = 100;
/// How often a simulated leader proposes a collection, and the thresholds
/// it gives (production: 5 min; 4 h and 24 h).
pub const COLLECT_EVERY_MS: u64 = 5_000;
pub const COLLECT_AFTER: cluster_core::state::GcPolicy =
    cluster_core::state::GcPolicy { job_ms: 3_000, node_ms: 10_000, allocs_per_job: Some(2) };
/// A node is down after this long without a heartbeat, plus the grace.
pub const NODE_TTL_MS: u64 = 2_000;
pub const NODE_GRACE_MS: u64 = 2_000;
/// The longest a task takes to die once stopped: the kill timeout every
/// simulated task has. A target refuses at-most-once work whose kill
/// timeout is not under half the grace.
pub const KILL_MS_MAX: u64 = 1_000;
/// Rounds of Raft messages within one step: enough for a commit when the
/// servers' links are healthy.
pub const RAFT_ROUNDS_MAX: usize = 8;
/// How long a proposer waits for its commit (`raft::node::PROPOSE_TIMEOUT`).
pub const PROPOSE_TIMEOUT_MS: u64 = 5_000;
/// A leader publishes its cluster's summary this often (gossip).
pub const GOSSIP_EVERY_MS: u64 = 1_000;
/// A peer not heard from by gossip for this long is dead to the origin.
pub const GOSSIP_DEAD_MS: u64 = 3_000;
/// Entries between snapshots: small, so restarts and lagging servers go
/// through snapshots often.
pub const COMPACT_EVERY: u64 = 32;

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
    TombstonesExpire,
}

impl Plant {
    pub const ALL: [Plant; 8] = [
        Plant::ReleaseOnTimeout,
        Plant::ForgetRegistration,
        Plant::LeaseFromAnswer,
        Plant::NoGrace,
        Plant::SkipEntry,
        Plant::SnapshotDropsHolds,
        Plant::LeasePerOrigin,
        Plant::TombstonesExpire,
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
            Plant::TombstonesExpire => "tombstones-expire",
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
            Plant::TombstonesExpire => {
                "the target drops its tombstones soon after making them (a time-to-live), not below the origin's floor"
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
    /// Delegation records collected by origins, and by targets (their
    /// tombstones), as the checker saw them go.
    pub collected_outbound: u64,
    pub collected_inbound: u64,
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
    /// Messages from `a` to `b` arrive, and arrive again `after_ms` later
    /// (a retransmission stuck in a queue).
    Echo {
        a: usize,
        b: usize,
        after_ms: u64,
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
    /// Gossip neither leaves nor reaches `cluster`: peers stop hearing of
    /// it (it is dead to them once [`GOSSIP_DEAD_MS`] passes) and it of them.
    GossipOutage {
        cluster: usize,
        for_ms: u64,
    },
    /// Raft messages between server `server` and its peers are lost (the
    /// agents and other clusters still reach it).
    IsolateServer {
        cluster: usize,
        server: usize,
        for_ms: u64,
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

/// One server of a cluster: production's Raft core on a simulated disk,
/// and the leader's duties while Raft has it leading.
pub struct Server {
    /// `None` while the server is down.
    pub core: Option<Core<MemoryStorage>>,
    /// What the server persisted: it restarts from this.
    disk: MemoryStorage,
    up_at: u64,
    /// Its election timeout, in ticks (raft-rs would draw it from the
    /// thread's random source; here it is drawn from the seed).
    election_tick: usize,
    /// The leader's memory, rebuilt when it starts leading in a term.
    pub shell: Option<Shell>,
    /// Bumped whenever the shell goes: sends of an older one are dropped.
    generation: u64,
    /// Actions waiting for their commits.
    pending: Vec<Pending>,
    /// Raft messages to and from this server are lost until then.
    pub isolated_until: u64,
}

impl Server {
    pub fn up(&self) -> bool {
        self.core.is_some()
    }

    /// The server's applied state (empty while it is down).
    pub fn state(&self) -> Arc<RwLock<ClusterState>> {
        self.core.as_ref().map(Core::state).unwrap_or_default()
    }

    /// Whether Raft still has this server leading in its shell's term
    /// (`federation::node`'s `still_leads`).
    pub fn still_leads(&self) -> bool {
        match (&self.core, &self.shell) {
            (Some(core), Some(shell)) => core.is_leader() && core.term() == shell.term,
            _ => false,
        }
    }
}

/// What a leader runs in memory: `server::Inner`'s broker and heartbeat
/// timers, and `federation::node`'s origin and target cores.
pub struct Shell {
    pub term: u64,
    pub origin: Origin,
    pub target: Target,
    broker: Broker,
    heartbeats: Heartbeats,
    /// When each job last had work offered, so a refused job is not
    /// offered again every step.
    offered: BTreeMap<JobId, u64>,
    /// A batch's plans are being committed: no new batch until then.
    scheduling: bool,
}

/// One proposal of a [`Pending`] group.
struct Wait {
    answer: Answer,
    what: String,
    /// Sent once the command commits (not when the state machine refused it).
    reply: Option<(String, Message)>,
    result: Option<Result<Effect, String>>,
}

/// What follows a group of commits.
enum Then {
    Nothing,
    /// The broker's batch is done.
    Scheduled(Vec<Work>),
    /// A client's stop was acknowledged.
    Stopped(String),
    /// An agent's reports are in (or failed): it may send more.
    Reported(usize),
    /// A node's marking down is committed (or failed: it is timed again).
    MarkedDown(NodeId),
}

/// Actions performed as `federation::node::perform` does: the commits
/// side by side, then every message, unless the shell changed meanwhile.
struct Pending {
    generation: u64,
    waits: Vec<Wait>,
    sends: Vec<(String, Message)>,
    deadline: u64,
    then: Then,
}

/// A Raft message between two servers of one cluster.
struct RaftFlight {
    at: u64,
    seq: u64,
    from: usize,
    to: usize,
    message: RaftMessage,
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
    /// What the agent registers.
    registration: Node,
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
    /// Reports are being committed: the next ones wait.
    reporting: bool,
    /// The applied index of the last state the agent synced from.
    synced: u64,
}

pub struct Cluster {
    pub name: String,
    pub jurisdictions: Vec<String>,
    pub policy: Policy,
    /// Every committed entry applied in index order, from whichever server
    /// applied it first: what the checker reads.
    pub oracle: ClusterState,
    pub oracle_applied: u64,
    /// Entries applied by some server ahead of the oracle's next index.
    ahead: BTreeMap<u64, Vec<Command>>,
    pub servers: Vec<Server>,
    raft_net: Vec<RaftFlight>,
    clock_offset: u64,
    /// This cluster's protocol timers (its policy's `[retry]`).
    pub timing: Timing,
    clock_ppm: i64,
    wall_offset: i64,
    pub nodes: Vec<SimNode>,
    crash_after_commit: Option<u64>,
    /// The last moment (true time) the cluster had no leader.
    pub leaderless_at: u64,
    /// How long (true time) it has been without a leader in all.
    pub leaderless_ms: u64,
    /// What gossip brought of every other cluster: its newest summary and
    /// when (true time) anything of it last arrived.
    gossip: BTreeMap<String, (ClusterSummary, u64)>,
    /// Until when (true time) gossip neither leaves nor reaches it.
    pub gossip_out_until: u64,
    /// When its leader last published a summary.
    published_at: u64,
}

impl Cluster {
    /// This cluster's monotonic clock at true time `now`.
    pub fn clock(&self, now: u64) -> u64 {
        self.clock_offset + (now as i128 * (1_000_000 + self.clock_ppm as i128) / 1_000_000) as u64
    }

    /// Servers Raft has leading, duties running or not (a deposed leader
    /// that has not noticed among them), by index.
    pub fn raft_leaders(&self) -> Vec<usize> {
        (0..self.servers.len()).filter(|&s| self.servers[s].core.as_ref().is_some_and(Core::is_leader)).collect()
    }

    /// Servers that lead with their duties running, by index.
    pub fn leaders(&self) -> Vec<usize> {
        (0..self.servers.len()).filter(|&s| self.servers[s].still_leads()).collect()
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
    /// Summaries on their way: (arrival, from, to, summary).
    gossip_net: Vec<(u64, usize, usize, ClusterSummary)>,
    seq: u64,
    cuts: Vec<(usize, usize, u64)>,
    delays: Vec<(usize, usize, u64, u64)>,
    /// Echo windows: (from, to, after_ms, until).
    echoes: Vec<(usize, usize, u64, u64)>,
    events: VecDeque<(u64, Event)>,
    keep_trace: bool,
    trace: Vec<String>,
    hash: u64,
    checker: Checker,
}

/// The protocol's timers in the simulator: short, so a run sees many
/// leases come and go.
pub fn sim_timing() -> Timing {
    Timing {
        lease_ms: 6_000,
        grace_ms: 3_000,
        renew_every_ms: 1_000,
        retry_ms: 500,
        collect_every_ms: COLLECT_EVERY_MS,
    }
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
        collected_outbound: world.checker.collected_outbound(),
        collected_inbound: world.checker.collected_inbound(),
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
                // Distinct election timeouts (10 to 19 ticks), so that
                // elections end without raft-rs's own random draw.
                let mut ticks: Vec<usize> = (10..20).collect();
                let servers = (0..spec.servers)
                    .map(|_| {
                        let election_tick = ticks.swap_remove(rng.below(ticks.len()));
                        Server {
                            core: None,
                            disk: MemoryStorage::new(),
                            up_at: 0,
                            election_tick,
                            shell: None,
                            generation: 0,
                            pending: Vec::new(),
                            isolated_until: 0,
                        }
                    })
                    .collect();
                Cluster {
                    name: spec.name.clone(),
                    jurisdictions: spec.jurisdictions.clone(),
                    policy,
                    oracle: ClusterState::new(),
                    oracle_applied: 0,
                    ahead: BTreeMap::new(),
                    servers,
                    raft_net: Vec::new(),
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
                            collect_every_ms: COLLECT_EVERY_MS,
                        }
                    } else {
                        timing.clone()
                    },
                    wall_offset: 0,
                    nodes: nodes
                        .iter()
                        .map(|n| SimNode {
                            id: n.id.clone(),
                            registration: n.clone(),
                            up: true,
                            paused_until: 0,
                            lost_until: 0,
                            cut_until: 0,
                            last_contact: None,
                            grants: BTreeMap::new(),
                            procs: BTreeMap::new(),
                            ended: Default::default(),
                            reports: Vec::new(),
                            reporting: false,
                            synced: 0,
                        })
                        .collect(),
                    crash_after_commit: None,
                    leaderless_at: 0,
                    leaderless_ms: 0,
                    gossip: BTreeMap::new(),
                    gossip_out_until: 0,
                    published_at: 0,
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
            gossip_net: Vec::new(),
            seq: 0,
            cuts: Vec::new(),
            delays: Vec::new(),
            echoes: Vec::new(),
            events: events.into(),
            keep_trace: options.trace,
            trace: Vec::new(),
            hash: 0xcbf2_9ce4_8422_2325,
            checker: Checker::default(),
        };
        // Every server starts on an empty disk with the cluster's voters;
        // the first one campaigns at once, so that work can start early.
        for c in 0..world.clusters.len() {
            for r in 0..world.clusters[c].servers.len() {
                world.start_server(c, r);
            }
            if let Some(core) = world.clusters[c].servers[0].core.as_mut() {
                core.campaign();
            }
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
            self.gossip_arrive();
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
                self.client_write(cluster, Command::RegisterJob(job), Then::Nothing);
            }
            Event::Update { cluster, job } => {
                let Some(mut j) = self.clusters[cluster].oracle.job(&JobId::new(&job)).cloned() else { return };
                if j.stopped {
                    return;
                }
                j.priority = j.priority.wrapping_add(1).max(1);
                self.note(format!("{} update {job}", self.clusters[cluster].name));
                self.client_write(cluster, Command::RegisterJob(j), Then::Nothing);
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
                self.client_write(cluster, Command::RegisterJob(j), Then::Nothing);
            }
            Event::Stop { cluster, job } => {
                self.note(format!("{} stop {job}", self.clusters[cluster].name));
                self.client_write(cluster, Command::StopJob(JobId::new(&job)), Then::Stopped(job));
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
            Event::Echo { a, b, after_ms, for_ms } => {
                self.note(format!("echo {a}->{b} after {after_ms}ms for {for_ms}ms"));
                self.echoes.push((a, b, after_ms, self.now + for_ms));
            }
            Event::KillLeader { cluster, down_ms } => {
                for r in self.clusters[cluster].raft_leaders() {
                    self.kill_server(cluster, r, down_ms);
                }
            }
            Event::KillReplica { cluster, replica, down_ms } => {
                if replica < self.clusters[cluster].servers.len() {
                    self.kill_server(cluster, replica, down_ms);
                }
            }
            Event::GossipOutage { cluster, for_ms } => {
                self.note(format!("{} gossip out for {for_ms}ms", self.clusters[cluster].name));
                self.clusters[cluster].gossip_out_until = self.now + for_ms;
            }
            Event::IsolateServer { cluster, server, for_ms } => {
                if server < self.clusters[cluster].servers.len() {
                    self.note(format!(
                        "{} server {server} cut off from its peers for {for_ms}ms",
                        self.clusters[cluster].name
                    ));
                    self.clusters[cluster].servers[server].isolated_until = self.now + for_ms;
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
                n.synced = 0;
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
                n.synced = 0;
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

    /// A client's write, to a server that believes it leads (the API
    /// forwards there); lost when there is none (the client would retry;
    /// the workload moves on). `then` runs once it is committed.
    fn client_write(&mut self, c: usize, command: Command, then: Then) {
        let leading = self.clusters[c].raft_leaders();
        if leading.is_empty() {
            self.note(format!("{} no leader: write dropped", self.clusters[c].name));
            return;
        }
        let r = leading[self.rng.below(leading.len())];
        self.perform(c, r, vec![Action::Propose(command)], then);
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
        let e = match self.rng.below(15) {
            12 => Event::GossipOutage { cluster: c, for_ms },
            13 => Event::PauseAgent {
                cluster: c,
                node: self.rng.below(self.clusters[c].nodes.len()),
                for_ms: (1_000 + self.rng.below(20_000) as u64).min(left),
            },
            // A link that slows down, then fails the other way: what
            // stretches a lease the most. Twice in three draws it hits a
            // live delegation: its origin's answers slow down, then its
            // target's renewals stop.
            9 | 14 => {
                let live: Vec<(usize, usize)> = (0..n)
                    .flat_map(|o| {
                        let records = Origin::records(&self.clusters[o].oracle);
                        let targets: Vec<usize> = (records.iter())
                            .filter(|(r, _)| r.phase == federation::proto::origin::Phase::Registered)
                            .filter_map(|(r, _)| Cluster::index_of(&self.clusters, &r.target))
                            .collect();
                        targets.into_iter().map(move |t| (o, t))
                    })
                    .collect();
                let (c, b) = match self.rng.below(3) {
                    0 | 1 if !live.is_empty() => live[self.rng.below(live.len())],
                    _ => (c, (c + 1 + self.rng.below(n - 1)) % n),
                };
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
                let r = self.rng.below(self.clusters[c].servers.len());
                Event::KillReplica { cluster: c, replica: r, down_ms: (500 + self.rng.below(15_000) as u64).min(left) }
            }
            4 => Event::CrashAfterCommit { cluster: c, down_ms: (500 + self.rng.below(5_000) as u64).min(left) },
            5 => Event::CutAgent { cluster: c, node: self.rng.below(self.clusters[c].nodes.len()), for_ms },
            6 => Event::RestartAgent { cluster: c, node: self.rng.below(self.clusters[c].nodes.len()) },
            11 => {
                let server = self.rng.below(self.clusters[c].servers.len());
                Event::IsolateServer { cluster: c, server, for_ms: (1_000 + self.rng.below(10_000) as u64).min(left) }
            }
            10 => Event::NodeLost { cluster: c, node: self.rng.below(self.clusters[c].nodes.len()), for_ms },
            7 => {
                let b = (c + 1 + self.rng.below(n - 1)) % n;
                Event::Delay { a: c, b, extra_ms: (1_000 + self.rng.below(9_000) as u64).min(left), for_ms }
            }
            _ => Event::WallClockJump { cluster: c, by_ms: self.rng.below(240_000) as i64 - 120_000 },
        };
        self.event(e);
    }

    /// Server `r` of cluster `c` dies: its memory is gone, its disk stays.
    fn kill_server(&mut self, c: usize, r: usize, down_ms: u64) {
        let cl = &mut self.clusters[c];
        let server = &mut cl.servers[r];
        if server.core.is_none() {
            return;
        }
        let was_leader = server.core.as_ref().is_some_and(Core::is_leader);
        server.core = None;
        server.shell = None;
        server.generation += 1;
        server.up_at = self.now + down_ms;
        for p in std::mem::take(&mut server.pending) {
            if let Then::Reported(n) = p.then {
                cl.nodes[n].reporting = false;
            }
        }
        let name = cl.name.clone();
        self.note(format!("{name} server {r} dies{} for {down_ms}ms", if was_leader { " (leader)" } else { "" }));
    }

    /// Starts (or restarts) server `r` of cluster `c` from its disk.
    fn start_server(&mut self, c: usize, r: usize) {
        let cl = &mut self.clusters[c];
        let peers: BTreeMap<u64, SocketAddr> = (0..cl.servers.len())
            .map(|i| (i as u64 + 1, SocketAddr::from(([127, 0, 0, 1], 7_000 + i as u16))))
            .collect();
        let server = &mut cl.servers[r];
        let mut config = RaftConfig::new(r as u64 + 1, peers);
        config.compact_every = COMPACT_EVERY;
        config.min_election_tick = server.election_tick;
        config.max_election_tick = server.election_tick + 1;
        let plants = RaftPlants {
            skip_every: if self.plant == Some(Plant::SkipEntry) && r == 1 { 40 } else { 0 },
            snapshot_drops_holds: self.plant == Some(Plant::SnapshotDropsHolds),
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        match Core::open_planted(config, server.disk.clone(), &logger, plants) {
            Ok(mut core) => {
                core.record_applied();
                server.core = Some(core);
            }
            Err(e) => panic!("a simulated server cannot open its own disk: {e}"),
        }
        if self.now > 0 {
            let name = cl.name.clone();
            self.note(format!("{name} server {r} restarts"));
        }
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
            let echo = self.echoes.iter().find(|e| e.0 == from && e.1 == to && e.3 > self.now).map(|e| e.2);
            if let Some(after_ms) = echo {
                self.seq += 1;
                let at = self.now + delay + after_ms;
                self.net.push(Flight { at, seq: self.seq, from, to, message: message.clone() });
            }
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
            Message::ToTarget(ToTarget::Floor(f)) => format!("floor {} pending {:?}", f.floor, f.pending),
            Message::ToOrigin(ToOrigin::Outcome { id, outcome }) => format!("outcome {id} {outcome:?}"),
            Message::ToOrigin(ToOrigin::Revoked { id, alive }) => format!("revoked {id} alive {alive}"),
            Message::ToOrigin(ToOrigin::Renew { seq, delegations, .. }) => {
                format!("renew {seq} ({} delegations)", delegations.len())
            }
        };
        // To a server that leads, as the sender's address list has it:
        // while a deposed leader has not noticed, it may be that one.
        let leaders = self.clusters[to].leaders();
        if leaders.is_empty() {
            self.note(format!("{from_name} -> {}: {line} (no leader)", self.clusters[to].name));
            return;
        }
        let r = leaders[self.rng.below(leaders.len())];
        self.note(format!("{from_name} -> {} server {r}: {line}", self.clusters[to].name));
        let cl = &mut self.clusters[to];
        let now_c = cl.clock(self.now);
        let state = cl.servers[r].state();
        let state = state.read().expect("state lock");
        let shell = cl.servers[r].shell.as_mut().expect("leads");
        let actions = match message {
            Message::ToTarget(m) => shell.target.on_message(&cl.policy, &state, &from_name, m, now_c),
            Message::ToOrigin(m) => shell.origin.on_message(&state, &from_name, m, now_c),
        };
        drop(state);
        self.perform(to, r, actions, Then::Nothing);
    }

    /// Performs the cores' actions on server `r`: proposals side by side,
    /// then the messages (`federation::node::perform`).
    fn perform(&mut self, c: usize, r: usize, actions: Vec<Action>, then: Then) {
        let mut waits = Vec::new();
        let mut sends = Vec::new();
        for a in actions {
            match a {
                Action::Send { to, message } => sends.push((to, message)),
                Action::Propose(command) => {
                    let answer = self.propose(c, r, &command);
                    waits.push(Wait { answer, what: describe(&command), reply: None, result: None });
                }
                Action::ProposeThenSend { command, to, reply } => {
                    let answer = self.propose(c, r, &command);
                    waits.push(Wait { answer, what: describe(&command), reply: Some((to, reply)), result: None });
                }
            }
        }
        if waits.is_empty() && sends.is_empty() {
            return;
        }
        let server = &mut self.clusters[c].servers[r];
        let generation = server.generation;
        server.pending.push(Pending { generation, waits, sends, deadline: self.now + PROPOSE_TIMEOUT_MS, then });
    }

    /// Proposes a command on server `r`'s Raft core.
    fn propose(&mut self, c: usize, r: usize, command: &Command) -> Answer {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.clusters[c].servers[r].core.as_mut() {
            Some(core) => core.propose(vec![(command.clone(), tx)]),
            None => drop(tx),
        }
        rx
    }

    fn servers_step(&mut self, c: usize) {
        let now = self.now;
        // Servers come back up from their own disk.
        for r in 0..self.clusters[c].servers.len() {
            let server = &self.clusters[c].servers[r];
            if server.core.is_none() && server.up_at <= now {
                self.start_server(c, r);
            }
        }
        for server in self.clusters[c].servers.iter_mut() {
            if let Some(core) = server.core.as_mut() {
                core.tick();
            }
        }
        self.raft_rounds(c);
        self.settle(c);
        self.shells(c);
        let leaders = self.clusters[c].leaders();
        if leaders.is_empty() {
            self.clusters[c].leaderless_at = now;
            self.clusters[c].leaderless_ms += STEP_MS;
        }
        for r in leaders {
            self.leader_step(c, r);
            self.publish(c, r);
        }
    }

    /// Runs cluster `c`'s Raft: every server handles its `Ready`, and their
    /// messages travel, for up to [`RAFT_ROUNDS_MAX`] rounds.
    fn raft_rounds(&mut self, c: usize) {
        let now = self.now;
        for _ in 0..RAFT_ROUNDS_MAX {
            let mut out: Vec<(usize, RaftMessage)> = Vec::new();
            for r in 0..self.clusters[c].servers.len() {
                let cl = &mut self.clusters[c];
                let Some(core) = cl.servers[r].core.as_mut() else { continue };
                let mut sent = Vec::new();
                if let Err(e) = core.handle_ready(&mut |_, m| sent.extend(m)) {
                    panic!("a simulated server's storage failed: {e}");
                }
                core.answer_proposers();
                for (index, commands) in core.take_applied() {
                    if index > cl.oracle_applied {
                        cl.ahead.insert(index, commands);
                    }
                }
                while let Some(commands) = cl.ahead.remove(&(cl.oracle_applied + 1)) {
                    cl.oracle_applied += 1;
                    for command in &commands {
                        cl.oracle.apply(command);
                    }
                }
                out.extend(sent.into_iter().map(|m| (r, m)));
            }
            for (from, m) in out {
                self.raft_send(c, from, m);
            }
            let cl = &mut self.clusters[c];
            let mut due: Vec<RaftFlight> = Vec::new();
            let mut i = 0;
            while i < cl.raft_net.len() {
                if cl.raft_net[i].at <= now {
                    due.push(cl.raft_net.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            if due.is_empty() {
                break;
            }
            due.sort_by_key(|f| (f.at, f.seq));
            for f in due {
                let snapshot = f.message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot;
                let isolated = [f.from, f.to].iter().any(|&r| cl.servers[r].isolated_until > now);
                let delivered = !isolated && cl.servers[f.to].core.is_some();
                if delivered {
                    if let Some(core) = cl.servers[f.to].core.as_mut() {
                        core.step(f.message);
                    }
                }
                if snapshot {
                    if let Some(core) = cl.servers[f.from].core.as_mut() {
                        core.report_snapshot(f.to as u64 + 1, delivered);
                    }
                }
            }
        }
    }

    /// Puts a Raft message on the cluster's network: mostly delivered in
    /// this step, sometimes lost, duplicated or late while faults run.
    fn raft_send(&mut self, c: usize, from: usize, message: RaftMessage) {
        let to = message.to.saturating_sub(1) as usize;
        if to >= self.clusters[c].servers.len() {
            return;
        }
        let faulty = self.message_faults && self.now < self.quiet_from_ms;
        let mut copies = 1;
        if faulty {
            match self.rng.below(100) {
                0 => {
                    // Lost: a snapshot's sender learns it failed, as
                    // production's transport call tells it.
                    if message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                        if let Some(core) = self.clusters[c].servers[from].core.as_mut() {
                            core.report_snapshot(to as u64 + 1, false);
                        }
                    }
                    return;
                }
                1 => copies = 2,
                _ => {}
            }
        }
        for _ in 0..copies {
            let late = faulty && self.rng.below(40) == 0;
            let at = if late { self.now + STEP_MS * (1 + self.rng.below(5) as u64) } else { self.now };
            self.seq += 1;
            self.clusters[c].raft_net.push(RaftFlight { at, seq: self.seq, from, to, message: message.clone() });
        }
    }

    /// Completes the performs whose commits are all answered (or whose
    /// wait ran out): their messages leave, unless the server stopped
    /// leading in that shell's term meanwhile.
    fn settle(&mut self, c: usize) {
        for r in 0..self.clusters[c].servers.len() {
            let now = self.now;
            let server = &mut self.clusters[c].servers[r];
            let mut done = Vec::new();
            let mut i = 0;
            while i < server.pending.len() {
                let p = &mut server.pending[i];
                for w in p.waits.iter_mut().filter(|w| w.result.is_none()) {
                    use tokio::sync::oneshot::error::TryRecvError;
                    w.result = match w.answer.try_recv() {
                        Ok(Ok(effect)) => Some(Ok(effect)),
                        Ok(Err(e)) => Some(Err(e.to_string())),
                        Err(TryRecvError::Closed) => Some(Err("the server stopped".into())),
                        Err(TryRecvError::Empty) => None,
                    };
                }
                if p.waits.iter().all(|w| w.result.is_some()) || p.deadline <= now {
                    done.push(server.pending.remove(i));
                } else {
                    i += 1;
                }
            }
            for p in done {
                self.finish(c, r, p);
            }
        }
    }

    fn finish(&mut self, c: usize, r: usize, p: Pending) {
        let name = self.clusters[c].name.clone();
        let mut sends = p.sends;
        let mut committed = true;
        let mut replies = false;
        for w in p.waits {
            match w.result {
                Some(Ok(effect)) => {
                    self.note(format!("{name} server {r} committed {} -> {}", w.what, effect_word(&effect)));
                    if !matches!(effect, Effect::Refused(_)) && w.reply.is_some() {
                        replies = true;
                        sends.extend(w.reply);
                    }
                }
                Some(Err(e)) => {
                    committed = false;
                    self.note(format!("{name} server {r} not committed: {} ({e})", w.what));
                }
                None => {
                    committed = false;
                    self.note(format!("{name} server {r} not committed in time: {}", w.what));
                }
            }
        }
        if replies && self.clusters[c].servers[r].core.is_some() {
            if let Some(down_ms) = self.clusters[c].crash_after_commit.take() {
                self.note(format!("{name} server {r} dies between commit and reply"));
                self.kill_server(c, r, down_ms);
                return;
            }
        }
        let server = &mut self.clusters[c].servers[r];
        match p.then {
            Then::Nothing => {}
            Then::Scheduled(batch) => {
                if let Some(shell) = server.shell.as_mut().filter(|_| server.generation == p.generation) {
                    shell.broker.done(&batch);
                    shell.scheduling = false;
                }
            }
            Then::Stopped(job) => {
                if committed {
                    let leaderless: Vec<u64> = self.clusters.iter().map(|c| c.leaderless_ms).collect();
                    self.checker.stopped(c, &job, self.now, leaderless);
                }
            }
            Then::Reported(n) => self.clusters[c].nodes[n].reporting = false,
            Then::MarkedDown(node) => {
                let now_c = self.clusters[c].clock(self.now);
                let server = &mut self.clusters[c].servers[r];
                if let Some(shell) = server.shell.as_mut().filter(|_| server.generation == p.generation) {
                    if committed {
                        shell.heartbeats.marked_down(&node);
                    } else {
                        shell.heartbeats.retry_down_at(&node, now_c + 500);
                    }
                }
            }
        }
        if self.clusters[c].servers[r].generation != p.generation {
            return;
        }
        for (to, message) in sends {
            self.send(c, &to, message);
        }
    }

    /// Starts and stops the leaders' duties as Raft's leadership moves
    /// (`server::leadership`, `federation::node::run`): a server leading in
    /// a new term rebuilds them once it has applied its log.
    fn shells(&mut self, c: usize) {
        for r in 0..self.clusters[c].servers.len() {
            let server = &mut self.clusters[c].servers[r];
            let Some(core) = server.core.as_ref() else { continue };
            if server.shell.is_some() && !server.still_leads() {
                server.shell = None;
                server.generation += 1;
                let name = self.clusters[c].name.clone();
                self.note(format!("{name} server {r} no longer leads"));
                continue;
            }
            if server.shell.is_none() {
                if let Some(term) = core.leading_term() {
                    self.lead(c, r, term);
                }
            }
        }
    }

    /// Server `r` of cluster `c` leads in `term`, its log applied: it
    /// builds its leader memory afresh.
    fn lead(&mut self, c: usize, r: usize, term: u64) {
        let now = self.now;
        let seed = self.rng.next_u64();
        let cl = &mut self.clusters[c];
        let now_c = cl.clock(now);
        let plants = plants_of(self.plant);
        let mut heartbeats = Heartbeats::new(NODE_TTL_MS, NODE_GRACE_MS);
        let state = cl.servers[r].state();
        for n in state.read().expect("state lock").nodes() {
            heartbeats.beat_if_untimed(&n.id, now_c);
        }
        let server = &mut cl.servers[r];
        server.generation += 1;
        server.shell = Some(Shell {
            term,
            origin: Origin::new(&cl.name, cl.timing.clone(), plants.clone(), now_c),
            target: Target::new(cl.timing.clone(), plants, seed),
            broker: Broker::default(),
            heartbeats,
            offered: BTreeMap::new(),
            scheduling: false,
        });
        let name = cl.name.clone();
        self.note(format!("{name} server {r} leads in term {term}"));
    }

    fn leader_step(&mut self, c: usize, r: usize) {
        let now = self.now;
        let now_c = self.clusters[c].clock(now);
        let state = self.clusters[c].servers[r].state();
        // Nodes that missed their heartbeats go down.
        let expired = {
            let shell = self.clusters[c].servers[r].shell.as_mut().expect("leads");
            shell.heartbeats.expired(now_c)
        };
        for node in expired {
            let ready = {
                let s = state.read().expect("state lock");
                s.node_idx(&node).is_some_and(|i| s.node(i).status == NodeStatus::Ready)
            };
            if ready {
                let down = Command::SetNodeStatus { node: node.clone(), status: NodeStatus::Down, eligible: true };
                self.perform(c, r, vec![Action::Propose(down)], Then::MarkedDown(node));
            } else if let Some(shell) = self.clusters[c].servers[r].shell.as_mut() {
                shell.heartbeats.marked_down(&node);
            }
        }
        // Scheduling: a batch from the broker, planned on a copy of the
        // state one plan after another (`server::work`), committed as one
        // command that the state machine re-checks.
        let seed = self.rng.next_u64();
        let plans = {
            let shell = self.clusters[c].servers[r].shell.as_mut().expect("leads");
            if shell.scheduling {
                None
            } else {
                let s = state.read().expect("state lock");
                let batch = shell.broker.next_batch(&s, now_c);
                let mut scratch = (batch.len() > 1).then(|| s.clone());
                let mut plans = Vec::new();
                for work in &batch {
                    let config =
                        SchedulerConfig { seed: seed ^ work.eval.0, now_ms: Some(now_c), ..SchedulerConfig::default() };
                    let plan = schedule(scratch.as_ref().unwrap_or(&s), &work.job, &config);
                    if let Some(scratch) = scratch.as_mut() {
                        scratch.apply_plan(&plan);
                    }
                    if work.retry_blocked
                        && plan.placements.is_empty()
                        && plan.stops.is_empty()
                        && plan.wait_until_ms == work.wait_until_ms
                    {
                        continue;
                    }
                    plans.push((work.eval, plan));
                }
                if plans.is_empty() {
                    shell.broker.done(&batch);
                    None
                } else {
                    shell.scheduling = true;
                    Some((batch, plans))
                }
            }
        };
        if let Some((batch, plans)) = plans {
            self.perform(c, r, vec![Action::Propose(Command::ApplyPlans(plans))], Then::Scheduled(batch));
        }
        // Delegation: the target's renewals, the origin's duties, and
        // overflow offered to a peer.
        let actions = {
            let cl = &mut self.clusters[c];
            let shell = cl.servers[r].shell.as_mut().expect("leads");
            let s = state.read().expect("state lock");
            let mut a = shell.target.tick(&s, now_c);
            a.extend(shell.origin.tick(&cl.policy, &s, now_c));
            a
        };
        self.perform(c, r, actions, Then::Nothing);
        self.overflow(c, r, now_c);
        // Garbage collection, as `server::collect_garbage` proposes it, with
        // short thresholds so that runs see jobs and nodes go.
        if now % COLLECT_EVERY_MS == 0 {
            let collect = Command::Gc { now_ms: now_c, policy: COLLECT_AFTER, rules: cluster_core::state::GC_RULES };
            self.perform(c, r, vec![Action::Propose(collect)], Then::Nothing);
        }
    }

    /// Publishes leader `r`'s summary of its cluster (`federation::publish`)
    /// every [`GOSSIP_EVERY_MS`]; it reaches each peer within 1.5 s unless
    /// gossip is out at either end.
    fn publish(&mut self, c: usize, r: usize) {
        let now = self.now;
        let cl = &self.clusters[c];
        if now < cl.published_at + GOSSIP_EVERY_MS {
            return;
        }
        let Some(shell) = cl.servers[r].shell.as_ref() else { return };
        let wall_ms = (cl.clock(now) as i64 + cl.wall_offset).max(0) as u64;
        let state = cl.servers[r].state();
        let mut summary = ClusterSummary::build(
            &cl.name,
            &cl.name,
            shell.term,
            wall_ms,
            &cl.jurisdictions,
            &state.read().expect("state lock"),
        );
        // The leader's per-term counter (`gossip::summary::Publisher`):
        // simulated time only grows, as the counter does.
        summary.version = now;
        self.clusters[c].published_at = now;
        if now < self.clusters[c].gossip_out_until {
            return;
        }
        for to in (0..self.clusters.len()).filter(|&to| to != c) {
            let at = now + 100 + self.rng.below(1_400) as u64;
            self.gossip_net.push((at, c, to, summary.clone()));
        }
    }

    /// Delivers the summaries due: the newest (by incarnation, term and
    /// version, never a clock) wins,
    /// and any arrival tells the peer is alive.
    fn gossip_arrive(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gossip_net).into_iter().partition(|f| f.0 <= now);
        self.gossip_net = later;
        for (_, from, to, summary) in due {
            if now < self.clusters[to].gossip_out_until || now < self.clusters[from].gossip_out_until {
                continue;
            }
            let name = self.clusters[from].name.clone();
            let entry = self.clusters[to].gossip.entry(name).or_insert_with(|| (summary.clone(), now));
            let newer = summary.order() >= entry.0.order();
            if newer {
                entry.0 = summary;
            }
            entry.1 = now;
        }
    }

    /// Overflow offered to peers chosen by production's `select` from
    /// what gossip brought (`federation::node::delegate_overflow`, without
    /// its triggers: work is offered as soon as it waits, once a second).
    fn overflow(&mut self, c: usize, r: usize, now_c: u64) {
        let now = self.now;
        let state = self.clusters[c].servers[r].state();
        let work = Origin::overflow(&state.read().expect("state lock"), now_c);
        let peers: Vec<PeerInfo> = (self.clusters[c].gossip.iter())
            .map(|(name, (summary, heard))| PeerInfo {
                cluster: name.clone(),
                liveness: if now < heard + GOSSIP_DEAD_MS { gossip::Liveness::Alive } else { gossip::Liveness::Dead },
                summary: Some(summary.clone()),
                breaker_open: false,
                rtt_ms: None,
            })
            .collect();
        for w in work {
            let cl = &self.clusters[c];
            // As `federation::node` does: a peer whose refusal of this job
            // is on record is not asked again meanwhile.
            let peers: Vec<PeerInfo> = peers.iter().filter(|p| !w.refused_by.contains(&p.cluster)).cloned().collect();
            let Some(shell) = cl.servers[r].shell.as_ref() else { return };
            if shell.offered.get(&w.job.id).is_some_and(|t| now_c < t + 1_000) {
                continue;
            }
            let overflow = [Overflow { group: w.group.clone(), count: w.indices.len() as u32 }];
            let selection = select(&cl.policy, &w.job, &overflow, w.job.instance_count() as u32, w.remote, &peers);
            let cl = &mut self.clusters[c];
            let shell = cl.servers[r].shell.as_mut().expect("leads");
            shell.offered.insert(w.job.id.clone(), now_c);
            let mut rest = w.indices.as_slice();
            let mut actions = Vec::new();
            for offer in selection.offers {
                let n = (offer.count as usize).min(rest.len());
                if n == 0 {
                    continue;
                }
                let part = federation::proto::origin::Overflowing { indices: rest[..n].to_vec(), ..w.clone() };
                rest = &rest[n..];
                let s = state.read().expect("state lock");
                actions.extend(shell.origin.delegate(&cl.policy, &s, &part, &offer.peer, now_c));
            }
            self.perform(c, r, actions, Then::Nothing);
        }
    }

    fn agent_step(&mut self, c: usize, n: usize) {
        let now = self.now;
        let leaders = self.clusters[c].leaders();
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
        for p in node.procs.values_mut().filter(|p| p.at_most_once) {
            p.fence_ms = fence_deadline(node.last_contact, &node.grants, p, now, now_c);
        }
        // The agent talks to a server that leads (while a deposed leader
        // has not noticed, it may be that one).
        // A leader marking the node down refuses its heartbeats.
        let refused = |r: &usize| cl.servers[*r].shell.as_ref().is_some_and(|s| s.heartbeats.marking_down(&node.id));
        let leaders: Vec<usize> = leaders.into_iter().filter(|r| !refused(r)).collect();
        let connected = now >= node.cut_until && !leaders.is_empty();
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
        let r = leaders[self.rng.below(leaders.len())];
        let state_lock = cl.servers[r].state();
        let state = state_lock.read().expect("state lock");
        let shell = cl.servers[r].shell.as_mut().expect("leads");
        // A node the state does not know registers first (the agent's
        // first call); it runs nothing until then.
        if state.node_idx(&node.id).is_none() {
            let register = Command::UpsertNode(node.registration.clone());
            drop(state);
            if !node.reporting {
                node.reporting = true;
                self.perform(c, r, vec![Action::Propose(register)], Then::Reported(n));
            }
            return;
        }
        // Heartbeat, answered at once: the lease runs from its sending.
        shell.heartbeats.beat(&node.id, now_c);
        node.last_contact = Some(now_c);
        for (rec, _) in Target::records(&state) {
            let until = now_c + shell.target.lease_remaining(&rec.origin, &rec.id, now_c);
            let g = node.grants.entry(rec.id).or_insert(0);
            *g = (*g).max(until);
        }
        // A sync answered from a state older than one already seen (a
        // deposed leader that lags) is dropped, as the agent's `syncs` does.
        let index = cl.servers[r].core.as_ref().map_or(0, Core::applied);
        if index < node.synced {
            return;
        }
        node.synced = index;
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
                // Fenced from its first process on (`Agent::start`).
                let mut proc = proc;
                if proc.at_most_once {
                    proc.fence_ms = fence_deadline(node.last_contact, &node.grants, &proc, now, now_c);
                }
                node.procs.insert(id, proc);
                reports.push(AllocReport::status(id, AllocStatus::Running));
            }
        }
        // Reports the state already holds (or for allocations already
        // terminal) are done with; the rest are kept until it does.
        reports.retain(|r| state.alloc(r.id).is_some_and(|a| !a.status.is_terminal() && a.status != r.status));
        let mut dedup: BTreeMap<AllocId, AllocReport> = BTreeMap::new();
        for report in reports {
            dedup.insert(report.id, report);
        }
        node.reports = dedup.into_values().collect();
        drop(state);
        if node.reporting {
            return;
        }
        let mut commands = Vec::new();
        if down {
            commands.push(Command::SetNodeStatus { node: node.id.clone(), status: NodeStatus::Ready, eligible: true });
        }
        if !node.reports.is_empty() {
            commands.push(Command::AllocReports { now_ms: now_c, reports: node.reports.clone() });
        }
        if !commands.is_empty() {
            node.reporting = true;
            self.perform(c, r, commands.into_iter().map(Action::Propose).collect(), Then::Reported(n));
        }
    }
}

/// When (true time) the fence kills at-most-once `p`, as the agent last
/// renewed it at `now` (cluster clock `now_c`): when its own lease would
/// have stopped it, or its delegation's grant ends plus the kill timeout.
fn fence_deadline(
    last_contact: Option<u64>,
    grants: &BTreeMap<String, u64>,
    p: &Proc,
    now: u64,
    now_c: u64,
) -> Option<u64> {
    let lease = Lease { ttl_ms: NODE_TTL_MS, grace_ms: NODE_GRACE_MS };
    let by_lease = last_contact.map(|t| t + lease.stop_within_ms());
    let by_grant = p.lease_of.as_ref().map(|d| grants.get(d).copied().unwrap_or(0) + KILL_MS_MAX);
    let until_c = [by_lease, by_grant].into_iter().flatten().min()?;
    Some(now + until_c.saturating_sub(now_c))
}

fn plants_of(plant: Option<Plant>) -> Plants {
    Plants {
        release_on_timeout: plant == Some(Plant::ReleaseOnTimeout),
        forget_registration: plant == Some(Plant::ForgetRegistration),
        lease_from_answer: plant == Some(Plant::LeaseFromAnswer),
        no_grace: plant == Some(Plant::NoGrace),
        lease_per_origin: plant == Some(Plant::LeasePerOrigin),
        tombstones_expire: plant == Some(Plant::TombstonesExpire),
    }
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
        Command::AllocStatus(r) | Command::AllocReports { reports: r, .. } => format!(
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
        Command::Collect { now_ms, .. } | Command::CollectGarbage { now_ms, .. } | Command::Gc { now_ms, .. } => {
            format!("collect at {now_ms}")
        }
        Command::DropRecords(r) => format!("drop {} records", r.len()),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

fn effect_word(e: &Effect) -> String {
    match e {
        Effect::Refused(why) => format!("refused: {why}"),
        Effect::PlansApplied(o) => format!("{} plans", o.len()),
        Effect::Collected(c) => format!("collected {} jobs, {} allocations, {} nodes", c.jobs, c.allocs, c.nodes),
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
