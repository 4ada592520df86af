//! The node agent: registers its machine with the cluster, heartbeats,
//! pulls the allocations placed on it, runs them through the drivers and
//! reports on them; and keeps them running on its own when its servers
//! are out of reach (edge autonomy).
//!
//! ```text
//!  heartbeat task ── Register / Heartbeat ──► server   (lease: the TTL it answers)
//!  sync task ────── Sync (long poll) ───────► server ──► main loop: start, stop, forget
//!  runners (one per allocation) ── reports ──► main loop ──► local state file
//!                                                      └──► report task ── Report ──► server
//!  log service ◄── Logs ── server (`hanse alloc logs`)
//! ```
//!
//! The agent's local state (`agent.state` in its data directory) holds
//! every allocation it runs; an agent restarted without its servers carries
//! on from it: it attaches to the tasks still running under their
//! supervisors ([`supervise`]) and starts the others again. Work whose
//! group says `on_disconnect = "stop"` runs only while the agent holds its
//! lease: cut off for longer than the TTL,
//! the agent stops it and reports it lost, and the servers, which wait TTL
//! + grace before replacing it, start its replacement only after that.

pub mod cgroups;
pub mod driver;
pub mod fence;
pub mod fingerprint;
pub mod gc;
pub mod health;
pub mod launch;
pub mod lease;
pub mod logs;
pub mod rpc;
pub mod runner;
pub mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::codec;
use crate::ids::{AllocId, NodeId};
use crate::model::alloc::{AllocHealth, AllocReport, AllocStatus, DesiredStatus, TaskState};
use crate::model::job::OnDisconnect;
use crate::model::node::Node;
use crate::server::rpc::{ServerReply, ServerRpc};
use crate::server::unix_ms;
use crate::transport::{Handler, Identity, Role, Transport};
use driver::Drivers;
use logs::Rotation;
use rpc::{AgentAlloc, AgentReply, AgentRequest, AgentService, AgentServiceReply, NodeAllocs};
use runner::Control;

/// How long a server may hold a sync open.
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// Between attempts when no server answers.
const RETRY: Duration = Duration::from_millis(500);
/// How often the agent checks its lease and saves its state.
const TICK: Duration = Duration::from_millis(200);
/// The most reports sent in one request.
const REPORT_BATCH: usize = 1_024;

#[derive(Clone)]
pub struct AgentOptions {
    pub cluster: String,
    /// This machine as the agent registers it (fingerprint and config).
    pub node: Node,
    /// The servers' QUIC addresses; the agent moves on when one fails.
    pub servers: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    pub rotation: Rotation,
    pub drivers: Drivers,
    /// The program each exec task runs under (`PROGRAM task-supervisor`,
    /// see [`supervise`]): the `hanse` binary. `None` (agents inside
    /// tests): tasks are the agent's own children, which a frozen agent
    /// cannot stop and a restarted one cannot find again.
    pub supervisor: Option<PathBuf>,
    /// When the directories of ended allocations are removed.
    pub gc: gc::GcPolicy,
}

/// How many collected allocations the agent remembers, to tell `alloc
/// logs` that one was collected rather than never here.
const COLLECTED_REMEMBERED: usize = 10_000;

/// Allocations whose directories the agent removed: when (unix ms) and why.
type Collected = Arc<Mutex<BTreeMap<AllocId, (u64, gc::Why)>>>;

/// What the agent saves, to start again without its servers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LocalState {
    node: Option<NodeId>,
    /// When a server last answered a heartbeat, on the boot clock (see
    /// [`boot_ms`]) of boot `boot_id`, and the lease it gave. Never the
    /// wall clock: a clock set back must not stretch a lease.
    last_contact_boot_ms: u64,
    boot_id: String,
    ttl_ms: u64,
    grace_ms: u64,
    allocs: Vec<(AgentAlloc, AllocStatus, Vec<TaskState>)>,
}

struct Slot {
    alloc: AgentAlloc,
    status: AllocStatus,
    tasks: Vec<TaskState>,
    health: Option<AllocHealth>,
    /// Operators' requests to its runner, while it has one.
    ops: Option<mpsc::UnboundedSender<runner::Op>>,
    control: Option<watch::Sender<Control>>,
}

/// When a server last answered, and the lease it granted.
#[derive(Clone, Debug)]
struct Contact {
    /// When the last heartbeat's answer came.
    last: Option<Instant>,
    ttl: Duration,
    grace: Duration,
    /// Delegation leases for at-most-once delegated work, on [`mono_ms`].
    grants: lease::Grants,
    /// The main loop has seen the lease run out and stopped at-most-once
    /// work for it. Until then, an answer that comes after the lease ran
    /// out (the agent was frozen, or its loop stalled) renews nothing:
    /// otherwise the first answer after a freeze would renew work the
    /// servers already replaced (found by hanse-chaos). Cleared by the
    /// next answer that renews.
    acted: bool,
}

/// Milliseconds since this boot (`CLOCK_BOOTTIME`: monotonic across
/// process restarts, counting suspend, never set by `date`).
fn boot_ms() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes the timespec it is given.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) } == 0;
    if ok { t.tv_sec as u64 * 1_000 + t.tv_nsec as u64 / 1_000_000 } else { 0 }
}

/// This boot's id (empty when it cannot be read), read once: it tells a
/// reboot apart, after which no saved lease holds.
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
    })
}

/// How long ago, in milliseconds, the saved last contact was; `None` when
/// there was none, or it was in another boot (or the boot cannot be told).
fn since_saved_contact(saved: &LocalState) -> Option<u64> {
    let (id, now) = (boot_id(), boot_ms());
    let same_boot = !id.is_empty() && id == saved.boot_id;
    (same_boot && saved.last_contact_boot_ms > 0 && saved.last_contact_boot_ms <= now)
        .then(|| now - saved.last_contact_boot_ms)
}

impl Contact {
    /// The lease the servers' last answer granted.
    fn lease(&self) -> lease::Lease {
        lease::Lease { ttl_ms: self.ttl.as_millis() as u64, grace_ms: self.grace.as_millis() as u64 }
    }
}

/// Whether the lease saved in `saved` lapsed: past its TTL since the last
/// answer, or with another boot or no contact on record (long gone).
fn lapsed(saved: &LocalState) -> bool {
    since_saved_contact(saved).is_none_or(|since| since > saved.ttl_ms)
}

/// Milliseconds on this process's monotonic clock: what grants are kept in.
fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

struct Link {
    servers: Vec<SocketAddr>,
    current: AtomicUsize,
    transport: Arc<dyn Transport<ServerRpc>>,
    /// The agent's cluster: only its servers are obeyed.
    cluster: String,
}

/// Whether the peer at the other end of an agent's connection may act as
/// its server: a server certificate of the agent's own cluster. Any other
/// certificate of the federation's CA (an agent's, another cluster's
/// server) is refused before anything is sent, as Nomad's
/// `verify_server_hostname` does (security review, row 8).
pub fn check_server(cluster: &str, peer: Option<&Identity>) -> Result<(), String> {
    match peer {
        Some(id) if id.role == Role::Server && id.cluster == cluster => Ok(()),
        Some(id) => Err(format!("{} is not a server of cluster {cluster}", id.uri())),
        // A transport that cannot tell (the in-memory network of tests).
        None => Ok(()),
    }
}

impl Link {
    /// One request to the current server; on failure the next call goes
    /// to the next server.
    async fn call(&self, request: AgentRequest, timeout: Duration) -> Result<AgentReply, String> {
        let i = self.current.load(Ordering::Relaxed);
        let to = self.servers[i % self.servers.len()];
        let next = || {
            let _ = self.current.compare_exchange(i, i.wrapping_add(1), Ordering::Relaxed, Ordering::Relaxed);
        };
        let check = |peer: Option<&Identity>| check_server(&self.cluster, peer);
        let call = self.transport.call_checked(to, ServerRpc::Agent(request), &check);
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(ServerReply::Agent(AgentReply::Error { status, message }))) if status >= 500 => {
                next();
                Err(format!("{to}: {message}"))
            }
            Ok(Ok(ServerReply::Agent(reply))) => Ok(reply),
            Ok(Ok(ServerReply::Refused(why))) => Err(format!("{to} refused: {why}")),
            Ok(Ok(_)) => Err(format!("{to} answered out of turn")),
            Ok(Err(e)) => {
                next();
                Err(e.to_string())
            }
            Err(_) => {
                next();
                Err(format!("{to} did not answer in {timeout:?}"))
            }
        }
    }
}

/// A node agent; [`Agent::run`] until shutdown.
pub struct Agent {
    options: AgentOptions,
    link: Arc<Link>,
    /// Allocation states, for the log service's "done".
    statuses: Arc<Mutex<HashMap<AllocId, AllocStatus>>>,
    collected: Collected,
    /// Operators' requests (restart, signal), from the service to the
    /// main loop, which hands each to its allocation's runner.
    ops_tx: mpsc::UnboundedSender<(AllocId, runner::Op)>,
    ops_rx: Option<mpsc::UnboundedReceiver<(AllocId, runner::Op)>>,
}

impl Agent {
    pub fn new(options: AgentOptions, transport: Arc<dyn Transport<ServerRpc>>) -> Agent {
        let link = Arc::new(Link {
            servers: options.servers.clone(),
            current: AtomicUsize::new(0),
            transport,
            cluster: options.cluster.clone(),
        });
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        Agent { options, link, statuses: Arc::default(), collected: Arc::default(), ops_tx, ops_rx: Some(ops_rx) }
    }

    /// Where the servers reach this agent (its log service).
    pub fn advertise(&mut self, address: SocketAddr) {
        self.options.node.agent_address = Some(address.to_string());
    }

    fn allocs_dir(&self) -> PathBuf {
        self.options.data_dir.join("allocs")
    }

    /// The handler to serve on the agent's QUIC address: task logs, and
    /// operators' restarts and signals.
    pub fn log_service(&self) -> Arc<dyn Handler<AgentService>> {
        Arc::new(LogService {
            allocs_dir: self.allocs_dir(),
            statuses: self.statuses.clone(),
            collected: self.collected.clone(),
            cluster: self.options.cluster.clone(),
            ops: self.ops_tx.clone(),
        })
    }

    /// Runs until `shutdown` resolves. Tasks end with the agent; its local
    /// state lets the next start pick them up again.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
        let mut ops_rx = self.ops_rx.take().expect("an agent runs once");
        let o = &self.options;
        assert!(!o.servers.is_empty(), "an agent needs at least one server");
        // The state file and the tasks' logs hold secrets: owner only. When
        // tasks run as other users they must pass through (0711) to their
        // own directories, but can list nothing; every file on the way is
        // 0600 and every log directory 0700.
        let dirs = if o.drivers.switches_user() { passable_dir } else { crate::private::private_dir };
        dirs(&o.data_dir)
            .and_then(|()| dirs(&self.allocs_dir()))
            .map_err(|e| format!("cannot create {}: {e}", self.allocs_dir().display()))?;
        let state_path = o.data_dir.join("agent.state");
        let saved = load(&state_path)?;
        if saved.node.as_ref().is_some_and(|n| *n != o.node.id) {
            return Err(format!(
                "{} belongs to node {}, not {}: use another data_dir",
                state_path.display(),
                saved.node.as_ref().map_or("", |n| n.as_str()),
                o.node.id
            ));
        }
        // The lease held before a restart still runs out on time: at-most-once
        // work started again from local state stops when it would have.
        let last =
            since_saved_contact(&saved).and_then(|since| Instant::now().checked_sub(Duration::from_millis(since)));
        let contact = Arc::new(Mutex::new(Contact {
            last,
            ttl: Duration::from_millis(saved.ttl_ms.max(1_000)),
            grace: Duration::from_millis(saved.grace_ms),
            grants: lease::Grants::default(),
            acted: false,
        }));
        let beat_now = Arc::new(tokio::sync::Notify::new());
        let (report_tx, report_rx) = mpsc::unbounded_channel::<AllocReport>();
        let (sync_tx, mut sync_rx) = mpsc::channel::<NodeAllocs>(4);
        let (runner_tx, mut runner_rx) = mpsc::unbounded_channel::<AllocReport>();
        let mut background = JoinSet::new();
        let reconnected = Arc::new(tokio::sync::Notify::new());
        background.spawn(heartbeats(
            self.link.clone(),
            o.node.clone(),
            contact.clone(),
            reconnected.clone(),
            beat_now.clone(),
        ));
        background.spawn(syncs(self.link.clone(), o.node.id.clone(), sync_tx, reconnected));
        background.spawn(reports(self.link.clone(), o.node.id.clone(), report_rx));
        let fence = Arc::new(fence::Fence::new());
        let supervision = match &o.supervisor {
            Some(program) => {
                let sockets = o.data_dir.join("supervisors");
                crate::private::private_dir(&sockets)
                    .map_err(|e| format!("cannot create {}: {e}", sockets.display()))?;
                Some(driver::Supervision { program: program.clone(), sockets })
            }
            None => None,
        };
        let drivers = match &supervision {
            Some(s) => o.drivers.supervised(s.clone()),
            None => o.drivers.clone(),
        };
        let env = runner::Env { drivers, allocs_dir: self.allocs_dir(), rotation: o.rotation, fence: fence.clone() };
        let mut main = Main {
            env,
            supervision: supervision.clone(),
            slots: BTreeMap::new(),
            runners: JoinSet::new(),
            runner_tx,
            report_tx,
            statuses: self.statuses.clone(),
            contact,
            connected: true,
            dirty: false,
            last_contact_boot_ms: saved.last_contact_boot_ms,
            saved_contact_boot_ms: saved.last_contact_boot_ms,
            state_path: state_path.clone(),
            node: o.node.id.clone(),
            awaiting: BTreeMap::new(),
            beat_now,
            fence,
            gc: o.gc,
            ended: BTreeMap::new(),
            collected: self.collected.clone(),
            collecting: None,
            last_gc: Instant::now(),
        };
        // At-most-once work whose lease lapsed while the agent was away is
        // reported lost, and replaced at once: what its supervisors still
        // run ends first.
        // Judged once: the kills below and `recover` must agree.
        let lapsed = lapsed(&saved);
        if let Some(supervision) = supervision.filter(|_| lapsed) {
            // Side by side: the other work's supervisors wait for renewal.
            let mut kills = JoinSet::new();
            for (a, status, _) in &saved.allocs {
                if !status.is_terminal() && a.group.on_disconnect == OnDisconnect::Stop {
                    let (supervision, id, tasks) = (supervision.clone(), a.id, a.group.tasks.clone());
                    kills.spawn(async move { supervision.kill_leftovers(id, &tasks).await });
                }
            }
            while kills.join_next().await.is_some() {}
        }
        main.recover(saved, lapsed);
        main.renew_fence();
        let mut tick = tokio::time::interval(TICK);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(allocs) = sync_rx.recv() => main.reconcile(allocs),
                Some(report) = runner_rx.recv() => main.reported(report),
                Some((id, op)) = ops_rx.recv() => main.operate(id, op),
                _ = tick.tick() => {
                    // Finished runners are dropped, not kept until the agent stops.
                    while main.runners.try_join_next().is_some() {}
                    main.check_lease();
                    main.collect_garbage();
                    if main.dirty {
                        main.save();
                    }
                }
            }
        }
        main.save();
        background.abort_all();
        // Dropping the runners kills the processes of unsupervised tasks;
        // supervised ones run on until their deadline, for a restarted
        // agent to attach to again.
        main.runners.abort_all();
        while main.runners.join_next().await.is_some() {}
        Ok(())
    }
}

struct Main {
    env: runner::Env,
    /// Where tasks' supervisors are, when tasks run under them.
    supervision: Option<driver::Supervision>,
    slots: BTreeMap<AllocId, Slot>,
    runners: JoinSet<()>,
    runner_tx: mpsc::UnboundedSender<AllocReport>,
    report_tx: mpsc::UnboundedSender<AllocReport>,
    statuses: Arc<Mutex<HashMap<AllocId, AllocStatus>>>,
    contact: Arc<Mutex<Contact>>,
    connected: bool,
    dirty: bool,
    last_contact_boot_ms: u64,
    /// The contact time the state file holds.
    saved_contact_boot_ms: u64,
    state_path: PathBuf,
    node: NodeId,
    /// Delegated at-most-once allocations waiting for their first grant.
    awaiting: BTreeMap<AllocId, AgentAlloc>,
    /// Asks the heartbeat task for a heartbeat now (to fetch grants).
    beat_now: Arc<tokio::sync::Notify>,
    fence: Arc<fence::Fence>,
    gc: gc::GcPolicy,
    /// When allocations ended, as this agent saw it: when it reported them
    /// ended; one found on disk that it never ran counts from its
    /// directory's last change.
    ended: BTreeMap<AllocId, Instant>,
    collected: Collected,
    /// The collection pass under way, off the main loop.
    collecting: Option<tokio::task::JoinHandle<()>>,
    last_gc: Instant,
}

impl Main {
    /// Every `gc.interval`, removes the directories of ended allocations
    /// as [`gc`] decides, in a blocking task (one at a time).
    fn collect_garbage(&mut self) {
        if self.last_gc.elapsed() < self.gc.interval || self.collecting.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        self.last_gc = Instant::now();
        let dir = self.env.allocs_dir.clone();
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        let now = Instant::now();
        let mut ended = BTreeMap::new();
        let mut present = std::collections::HashSet::new();
        let mut trash = false;
        for entry in entries.flatten() {
            trash |= entry.file_name().to_str().is_some_and(|n| n.starts_with(".gc-"));
            let Some(id) = entry.file_name().to_str().and_then(AllocId::parse) else { continue };
            present.insert(id);
            // Running, starting, or waiting for a grant: never.
            let busy = self.awaiting.contains_key(&id)
                || self.slots.get(&id).is_some_and(|s| s.control.is_some() || !s.status.is_terminal());
            if busy {
                continue;
            }
            // Dated when it was seen to end (`send`, which also touches
            // its directory); found on disk from before: by its last change.
            let at = *self.ended.entry(id).or_insert_with(|| last_change(&entry.path(), now));
            ended.insert(id, now.saturating_duration_since(at));
        }
        self.ended.retain(|id, _| present.contains(id));
        if ended.is_empty() && !trash {
            return;
        }
        let (policy, collected, statuses) = (self.gc, self.collected.clone(), self.statuses.clone());
        self.collecting = Some(tokio::task::spawn_blocking(move || {
            let usage = || gc::disk_usage_pct(&dir);
            // Under the lock `start` takes before its runner exists: an
            // allocation started since the listing keeps its directory.
            let claim = |id: AllocId, why: gc::Why| {
                let statuses = statuses.lock().expect("statuses");
                if statuses.get(&id).is_some_and(|s| !s.is_terminal()) {
                    return Ok(false);
                }
                let taken = gc::claim_by_rename(&dir, id)?;
                if taken {
                    // Said from the moment its logs are out of reach.
                    let mut c = collected.lock().expect("collected");
                    c.insert(id, (unix_ms(), why));
                    while c.len() > COLLECTED_REMEMBERED {
                        c.pop_first();
                    }
                }
                Ok(taken)
            };
            let done = gc::collect(&dir, &ended, &policy, &usage, &claim);
            if !done.is_empty() {
                tracing::info!(allocations = done.len(), "removed the directories of ended allocations");
            }
        }));
    }

    /// Whether `alloc` may run now: anything but delegated at-most-once
    /// work, and that only under a grant.
    fn granted(&self, alloc: &AgentAlloc) -> bool {
        alloc.lease.as_ref().is_none_or(|id| self.contact.lock().expect("contact").grants.holds(id, mono_ms()))
    }

    /// Starts `alloc` now if it may run, or once a heartbeat grants it.
    fn start_when_granted(&mut self, alloc: AgentAlloc) {
        if self.granted(&alloc) {
            self.start(alloc);
        } else {
            let id = alloc.id;
            let slot = self.slots.entry(id).or_insert_with(|| Slot {
                alloc: alloc.clone(),
                status: AllocStatus::Pending,
                tasks: Vec::new(),
                health: None,
                ops: None,
                control: None,
            });
            slot.status = AllocStatus::Pending;
            self.awaiting.insert(id, alloc);
            // Said, so that nobody counts it as running meanwhile.
            self.send(id);
            self.beat_now.notify_one();
        }
    }

    /// Picks up what the last run left: running allocations start again,
    /// except at-most-once ones whose lease has lapsed meanwhile (reported
    /// lost); finished ones are reported again.
    fn recover(&mut self, saved: LocalState, lapsed: bool) {
        let n = saved.allocs.len();
        for (alloc, status, tasks) in saved.allocs {
            let id = alloc.id;
            let restart = !status.is_terminal() && alloc.desired == DesiredStatus::Run;
            if restart && alloc.group.on_disconnect == OnDisconnect::Stop && lapsed {
                self.slots.insert(
                    id,
                    Slot { alloc, status: AllocStatus::Lost, tasks, health: None, ops: None, control: None },
                );
                self.send(id);
            } else if restart {
                // Delegated at-most-once work waits for a fresh grant.
                self.start_when_granted(alloc);
            } else {
                // Ended before the restart: dated by its directory.
                let dir = self.env.allocs_dir.join(id.to_string());
                self.ended.insert(id, last_change(&dir, Instant::now()));
                self.slots.insert(id, Slot { alloc, status, tasks, health: None, ops: None, control: None });
                self.send(id);
            }
        }
        if n > 0 {
            tracing::info!(allocations = n, "recovered the allocations of the last run from local state");
        }
    }

    /// Starts a runner; the caller has saved the allocation in the local
    /// state first, so that a crash right after cannot forget it.
    fn start(&mut self, alloc: AgentAlloc) {
        let (tx, rx) = watch::channel(Control::Run);
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let id = alloc.id;
        // Said before the runner exists: the gc keeps what is starting.
        self.statuses.lock().expect("statuses").insert(id, AllocStatus::Pending);
        self.runners.spawn(runner::run(self.env.clone(), alloc.clone(), rx, self.runner_tx.clone(), ops_rx));
        let slot = Slot {
            alloc,
            status: AllocStatus::Pending,
            tasks: Vec::new(),
            health: None,
            ops: Some(ops_tx),
            control: Some(tx),
        };
        self.slots.insert(id, slot);
        self.dirty = true;
        // Fenced from its first process on.
        self.renew_fence();
    }

    fn stop(&mut self, id: AllocId, deadline: Option<tokio::time::Instant>, status: AllocStatus) {
        if let Some(c) = self.slots.get(&id).and_then(|s| s.control.as_ref()) {
            if *c.borrow() == Control::Run {
                let _ = c.send(Control::Stop { deadline, status });
            }
        }
    }

    /// Ends allocation `id`, which has no runner in this run of the agent
    /// (awaiting its grant, say), and then reports it `status`. Its tasks
    /// may still run under supervisors the agent's last run started, and
    /// the cluster places at-most-once work again as soon as it reads the
    /// end: so what they run is killed first, and the report follows (as
    /// a runner's would). Found by hanse-chaos: an agent restarted while
    /// holding delegated work reported it complete at once when its
    /// origin updated the job, and the new version started beside the old
    /// processes.
    fn end_unstarted(&mut self, id: AllocId, status: AllocStatus) {
        let Some(slot) = self.slots.get(&id) else { return };
        let report = AllocReport { id, status, tasks: slot.tasks.clone(), health: slot.health };
        match self.supervision.clone() {
            Some(supervision) => {
                let tasks = slot.alloc.group.tasks.clone();
                let tx = self.runner_tx.clone();
                self.runners.spawn(async move {
                    supervision.kill_leftovers(id, &tasks).await;
                    let _ = tx.send(report);
                });
            }
            None => self.reported(report),
        }
    }

    /// Sends the slot's state to the servers.
    fn send(&mut self, id: AllocId) {
        if let Some(s) = self.slots.get(&id) {
            let _ = self.report_tx.send(AllocReport { id, status: s.status, tasks: s.tasks.clone(), health: s.health });
            self.statuses.lock().expect("statuses").insert(id, s.status);
            if s.status.is_terminal() && !self.ended.contains_key(&id) {
                // Its gc retention runs from here; the directory's time
                // says so across a restart of the agent.
                self.ended.insert(id, Instant::now());
                let dir = self.env.allocs_dir.join(id.to_string());
                if let Ok(d) = std::fs::File::open(&dir) {
                    let _ = d.set_modified(std::time::SystemTime::now());
                }
            }
        }
        self.dirty = true;
    }

    /// Hands an operator's request to allocation `id`'s runner; answers it
    /// at once when there is none (not here, or ended).
    fn operate(&mut self, id: AllocId, op: runner::Op) {
        let slot = self.slots.get(&id).filter(|s| !s.status.is_terminal() && s.control.is_some());
        let Some(tx) = slot.and_then(|s| s.ops.as_ref()) else {
            let _ = op.reply.send(Err(format!("allocation {id} does not run on this node")));
            return;
        };
        if let Err(mpsc::error::SendError(op)) = tx.send(op) {
            let _ = op.reply.send(Err(format!("allocation {id} has ended")));
        }
    }

    fn reported(&mut self, r: AllocReport) {
        if let Some(s) = self.slots.get_mut(&r.id) {
            s.status = r.status;
            s.tasks = r.tasks;
            s.health = r.health.or(s.health);
            if r.status.is_terminal() {
                s.control = None;
                s.ops = None;
            }
            self.send(r.id);
        }
    }

    /// Brings the node in line with what the cluster wants of it.
    fn reconcile(&mut self, want: NodeAllocs) {
        let deadline = want
            .drain_deadline_ms
            .map(|d| tokio::time::Instant::now() + Duration::from_millis(d.saturating_sub(unix_ms())));
        let mut listed = std::collections::HashSet::new();
        let mut new = Vec::new();
        for a in want.allocs {
            listed.insert(a.id);
            match (self.slots.contains_key(&a.id), a.desired) {
                (false, DesiredStatus::Run) => new.push(a),
                (false, DesiredStatus::Stop) => {
                    // Not running here (lost with an old data dir): done,
                    // once no supervisor left from before runs it.
                    let id = a.id;
                    self.slots.insert(
                        id,
                        Slot {
                            alloc: a,
                            status: AllocStatus::Pending,
                            tasks: Vec::new(),
                            health: None,
                            ops: None,
                            control: None,
                        },
                    );
                    self.end_unstarted(id, AllocStatus::Complete);
                }
                (true, DesiredStatus::Stop) if self.awaiting.remove(&a.id).is_some() => {
                    // Not started by this run of the agent; a supervisor
                    // from its last run may still run it.
                    self.end_unstarted(a.id, AllocStatus::Complete);
                }
                (true, DesiredStatus::Stop) => self.stop(a.id, deadline, AllocStatus::Complete),
                (true, DesiredStatus::Run) => {}
            }
        }
        if !new.is_empty() {
            // Written ahead: saved as pending before any process starts.
            for a in &new {
                self.slots.insert(
                    a.id,
                    Slot {
                        alloc: a.clone(),
                        status: AllocStatus::Pending,
                        tasks: Vec::new(),
                        health: None,
                        ops: None,
                        control: None,
                    },
                );
            }
            self.save();
            for a in new {
                self.start_when_granted(a);
            }
        }
        // Awaiting a grant and no longer wanted: whatever a supervisor
        // from the agent's last run still runs of it ends (the cluster
        // counts it ended already).
        let dropped: Vec<AllocId> = self.awaiting.keys().filter(|id| !listed.contains(id)).copied().collect();
        for id in dropped {
            self.awaiting.remove(&id);
            self.end_unstarted(id, AllocStatus::Complete);
        }
        // Not listed: terminal for the cluster (finished, lost, replaced).
        let gone: Vec<AllocId> = self.slots.keys().filter(|id| !listed.contains(id)).copied().collect();
        for id in gone {
            let running = self.slots.get(&id).is_some_and(|s| s.control.is_some());
            if running {
                tracing::info!(alloc = %id, "the cluster no longer runs this allocation here; stopping it");
                self.stop(id, None, AllocStatus::Complete);
            } else {
                self.slots.remove(&id);
                self.fence.drop_alloc(id);
                self.statuses.lock().expect("statuses").remove(&id);
                self.dirty = true;
            }
        }
    }

    /// Delegated at-most-once work runs only under its grant: it starts
    /// once granted, and stops (reported lost) when the grant runs out.
    fn check_grants(&mut self) {
        let now = mono_ms();
        let grants = self.contact.lock().expect("contact").grants.clone();
        let ready: Vec<AllocId> = self
            .awaiting
            .iter()
            .filter(|(_, a)| a.lease.as_ref().is_some_and(|id| grants.holds(id, now)))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some(a) = self.awaiting.remove(&id) {
                self.start(a);
            }
        }
        let renew = (self.slots.values().filter(|s| s.control.is_some()))
            .filter_map(|s| s.alloc.lease.as_ref())
            .any(|id| grants.renew_due(id, now));
        if !self.awaiting.is_empty() || renew {
            self.beat_now.notify_one();
        }
        let lapsed: Vec<(AllocId, String)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.control.is_some())
            .filter_map(|(id, s)| Some((*id, s.alloc.lease.clone()?)))
            .filter(|(_, lease)| !grants.holds(lease, now))
            .collect();
        for (id, delegation) in lapsed {
            tracing::warn!(alloc = %id, %delegation, "the delegation's lease ran out: stopping its at-most-once work");
            self.stop(id, None, AllocStatus::Lost);
        }
    }

    /// Tells the fence how long each running allocation may still run.
    /// At-most-once work: until the agent's own lease would have stopped
    /// it (the last answer plus TTL + grace / 2) or, for delegated work,
    /// its grant ends plus its kill timeout (the agent's graceful stop
    /// starts when the grant ends; the target allows only kill timeouts
    /// within half the grace), whichever is sooner. Other work: the same
    /// lease while in contact; cut off, TTL + grace / 2 from now, for as
    /// long as the agent is alive to say so.
    fn renew_fence(&self) {
        let fence = &self.fence;
        let c = self.contact.lock().expect("contact").clone();
        let full = c.lease().stop_within_ms();
        let by_lease = c.last.map(|l| full.saturating_sub(l.elapsed().as_millis() as u64));
        if let Some(left) = by_lease {
            fence.set_first(left);
        }
        // In contact, other work too runs by the last answer: the agent may
        // die the next moment, and the servers time it from that answer.
        // Cut off, it runs on from now, as long as the agent lives.
        let in_contact = c.last.is_some_and(|l| c.lease().in_contact(l.elapsed().as_millis() as u64));
        let other = if in_contact { by_lease.unwrap_or(full) } else { full };
        let now = mono_ms();
        for (id, s) in self.slots.iter().filter(|(_, s)| s.control.is_some()) {
            if s.alloc.group.on_disconnect != OnDisconnect::Stop {
                fence.renew(*id, other);
                continue;
            }
            let kill_ms = s.alloc.group.tasks.iter().map(|t| t.kill_timeout_ms).max().unwrap_or(0);
            let by_grant = s.alloc.lease.as_ref().map(|d| c.grants.left(d, now).saturating_add(kill_ms));
            if let Some(left) = [by_lease, by_grant].into_iter().flatten().min() {
                fence.renew(*id, left);
            }
        }
    }

    /// The allocations with `on_disconnect = "stop"` that have a runner.
    fn running_at_most_once(&self) -> impl Iterator<Item = (&AllocId, &Slot)> {
        self.slots.iter().filter(|(_, s)| s.control.is_some() && s.alloc.group.on_disconnect == OnDisconnect::Stop)
    }

    /// Cut off past the lease: at-most-once work stops, the rest runs on.
    fn check_lease(&mut self) {
        self.check_grants();
        self.renew_fence();
        let c = self.contact.lock().expect("contact").clone();
        let lease = c.lease();
        if let Some(last) = c.last {
            let since = last.elapsed();
            self.last_contact_boot_ms = boot_ms().saturating_sub(since.as_millis() as u64);
            // Saved often enough that a restart resumes the lease it held,
            // not one a TTL old (which would count as lapsed).
            let ttl_ms = c.ttl.as_millis() as u64;
            if self.last_contact_boot_ms.saturating_sub(self.saved_contact_boot_ms) > ttl_ms / 4 {
                self.dirty = true;
            }
            let connected = lease.in_contact(since.as_millis() as u64);
            if connected != self.connected {
                self.connected = connected;
                self.dirty = true;
                if connected {
                    tracing::info!("in contact with the servers again");
                } else {
                    let stop =
                        self.slots.values().filter(|s| s.alloc.group.on_disconnect == OnDisconnect::Stop).count();
                    tracing::warn!(
                        "no server answered for {since:?} (lease {:?}): keeping {} allocations running, stopping {stop} with on_disconnect = \"stop\"",
                        c.ttl,
                        self.slots.len() - stop,
                    );
                }
            }
        }
        if !self.connected {
            // Done before the servers replace it: they wait TTL + grace.
            let within = Duration::from_millis(lease.stop_within_ms());
            let deadline = c.last.map(|l| tokio::time::Instant::from_std(l + within));
            let ids: Vec<AllocId> = self.running_at_most_once().map(|(id, _)| *id).collect();
            for id in ids {
                self.stop(id, deadline, AllocStatus::Lost);
            }
            // Stopped: the next answer renews the lease again.
            self.contact.lock().expect("contact").acted = true;
        }
    }

    fn save(&mut self) {
        self.saved_contact_boot_ms = self.last_contact_boot_ms;
        let path = &self.state_path;
        let c = self.contact.lock().expect("contact").clone();
        let state = LocalState {
            node: Some(self.node.clone()),
            last_contact_boot_ms: self.last_contact_boot_ms,
            boot_id: boot_id().to_string(),
            ttl_ms: c.ttl.as_millis() as u64,
            grace_ms: c.grace.as_millis() as u64,
            allocs: self.slots.values().map(|s| (s.alloc.clone(), s.status, s.tasks.clone())).collect(),
        };
        let tmp = path.with_extension("state.tmp");
        let written =
            crate::private::write_private(&tmp, &codec::encode(&state)).and_then(|()| std::fs::rename(&tmp, path));
        match written {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::error!("cannot save the agent's state to {}: {e}", path.display()),
        }
    }
}

fn load(path: &Path) -> Result<LocalState, String> {
    match std::fs::read(path) {
        Ok(bytes) => codec::decode(&bytes, codec::DECODE_BYTES_MAX)
            .map_err(|e| format!("{} is not an agent state file ({e}); move it away to start afresh", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LocalState::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Registers, then heartbeats every TTL / 3; registers again when the
/// cluster has forgotten the node.
async fn heartbeats(
    link: Arc<Link>,
    node: Node,
    contact: Arc<Mutex<Contact>>,
    reconnected: Arc<tokio::sync::Notify>,
    beat_now: Arc<tokio::sync::Notify>,
) {
    let mut registered = false;
    let mut failing = false;
    loop {
        let request = if registered {
            AgentRequest::Heartbeat(node.id.clone())
        } else {
            AgentRequest::Register(Box::new(node.clone()))
        };
        let sent = mono_ms();
        let wait = match link.call(request, Duration::from_secs(3)).await {
            Ok(AgentReply::Alive { ttl_ms, grace_ms, known, grants }) => {
                // The server restarted its timer while answering: the lease
                // runs from the answer (a registration waits for a commit, so
                // the send time would understate it by the commit). The
                // stop deadline's margin, grace / 2, covers the answer's
                // way back.
                let mut c = contact.lock().expect("contact");
                let stop_within = Duration::from_millis(c.lease().stop_within_ms());
                let stale = c.last.is_some_and(|l| l.elapsed() > stop_within);
                // An answer after the lease ran out renews only once the
                // main loop has acted on the lapse (see `Contact::acted`).
                if !stale || c.acted {
                    c.acted = false;
                    c.last = Some(Instant::now());
                    c.ttl = Duration::from_millis(ttl_ms);
                    c.grace = Duration::from_millis(grace_ms);
                    c.grants.update(sent, &grants);
                }
                if failing || !registered {
                    tracing::info!(node = %node.id, "registered with the cluster; heartbeating every {:?}", c.ttl / 3);
                }
                if failing {
                    reconnected.notify_one();
                }
                failing = false;
                registered = known;
                if known { c.ttl / 3 } else { Duration::ZERO }
            }
            Ok(other) => {
                tracing::error!("the cluster refused the node: {other:?}");
                RETRY * 4
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("heartbeat failed: {e}");
                }
                failing = true;
                RETRY
            }
        };
        // Woken early when work waits for a grant, at most every RETRY.
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = async {
                tokio::time::sleep(wait.min(RETRY)).await;
                beat_now.notified().await;
            } => {}
        }
    }
}

/// Long-polls the node's allocations; answers older than one already
/// seen (a lagging server) are dropped. A poll in flight when the servers
/// come back into reach is abandoned for a fresh one.
async fn syncs(link: Arc<Link>, node: NodeId, to: mpsc::Sender<NodeAllocs>, reconnected: Arc<tokio::sync::Notify>) {
    let mut after = 0u64;
    loop {
        let request = AgentRequest::Sync { node: node.clone(), after, wait_ms: SYNC_WAIT.as_millis() as u64 };
        let reply = tokio::select! {
            r = link.call(request, SYNC_WAIT + Duration::from_secs(2)) => r,
            () = reconnected.notified() => continue,
        };
        match reply {
            Ok(AgentReply::Sync(allocs)) if allocs.index >= after => {
                after = allocs.index;
                if to.send(allocs).await.is_err() {
                    return;
                }
            }
            Ok(AgentReply::Sync(_)) => {}
            _ => tokio::time::sleep(RETRY).await,
        }
    }
}

/// Sends reports in batches, the latest per allocation, until each is
/// acknowledged: a report is never dropped for a server being away.
async fn reports(link: Arc<Link>, node: NodeId, mut from: mpsc::UnboundedReceiver<AllocReport>) {
    let mut pending: BTreeMap<AllocId, AllocReport> = BTreeMap::new();
    loop {
        if pending.is_empty() {
            match from.recv().await {
                Some(r) => {
                    pending.insert(r.id, r);
                }
                None => return,
            }
        }
        while let Ok(r) = from.try_recv() {
            pending.insert(r.id, r);
        }
        let batch: Vec<AllocReport> = pending.values().take(REPORT_BATCH).cloned().collect();
        match link
            .call(AgentRequest::Report { node: node.clone(), reports: batch.clone() }, Duration::from_secs(5))
            .await
        {
            Ok(AgentReply::Done) => {
                for r in batch {
                    if pending.get(&r.id) == Some(&r) {
                        pending.remove(&r.id);
                    }
                }
            }
            Ok(AgentReply::Error { status, message }) if status < 500 => {
                tracing::error!("the cluster refused allocation reports: {message}");
                pending.clear();
            }
            _ => tokio::time::sleep(RETRY).await,
        }
    }
}

struct LogService {
    allocs_dir: PathBuf,
    statuses: Arc<Mutex<HashMap<AllocId, AllocStatus>>>,
    collected: Collected,
    /// Only this cluster's servers read the logs (security review, row 12).
    cluster: String,
    ops: mpsc::UnboundedSender<(AllocId, runner::Op)>,
}

/// How long the agent waits for an operator's restart or signal before it
/// answers: under the servers' call timeout
/// ([`crate::transport::quic::CALL_TIMEOUT`]). A restart still under way
/// then (long kill timeouts) goes on; the answer says so.
const OP_WAIT: Duration = Duration::from_secs(8);

#[async_trait]
impl Handler<AgentService> for LogService {
    async fn handle(&self, from: Identity, request: AgentService) -> AgentServiceReply {
        // The transport already refuses roles `AgentService` does not
        // allow; checked again here, as everything it guards runs tasks.
        if from.cluster != self.cluster || from.role != crate::transport::tls::Role::Server {
            return AgentServiceReply::Error(format!(
                "{} is not a server of cluster {}: logs, restarts and signals are for its own servers",
                from.uri(),
                self.cluster
            ));
        }
        let (alloc, task, kind) = match request {
            AgentService::Logs { alloc, task, stderr, offset, max } => {
                return self.logs(alloc, task, stderr, offset, max);
            }
            AgentService::Restart { alloc, task } => (alloc, task, runner::OpKind::Restart),
            AgentService::Signal { alloc, task, signal } => (alloc, task, runner::OpKind::Signal(signal)),
        };
        if let runner::OpKind::Signal(n) = kind {
            if !(1..=64).contains(&n) {
                return AgentServiceReply::Error(format!("{n} is not a signal"));
            }
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.ops.send((alloc, runner::Op { task, kind, reply })).is_err() {
            return AgentServiceReply::Error("the agent is stopping".into());
        }
        match tokio::time::timeout(OP_WAIT, answer).await {
            Ok(Ok(Ok(done))) => AgentServiceReply::Done(done),
            Ok(Ok(Err(why))) => AgentServiceReply::Error(why),
            Ok(Err(_)) => AgentServiceReply::Error(format!("allocation {alloc} ended before it was done")),
            Err(_) => AgentServiceReply::Done(format!(
                "still under way after {OP_WAIT:?} (a task's kill timeout); `hanse alloc status` shows when it is done"
            )),
        }
    }
}

impl LogService {
    /// Up to `max` bytes of `task`'s stdout or stderr from `offset`.
    fn logs(&self, alloc: AllocId, task: String, stderr: bool, offset: u64, max: u64) -> AgentServiceReply {
        if !task.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) || task.is_empty() {
            return AgentServiceReply::Error(format!("`{task}` is not a task name"));
        }
        let dir = self.allocs_dir.join(alloc.to_string()).join("logs");
        if !dir.exists() {
            if let Some((at, why)) = self.collected.lock().expect("collected").get(&alloc) {
                let ago = Duration::from_secs(unix_ms().saturating_sub(*at) / 1_000);
                return AgentServiceReply::Error(format!(
                    "allocation {alloc} ended here and its directory and logs were collected {ago:?} ago: {}",
                    why.describe()
                ));
            }
            return AgentServiceReply::Error(format!(
                "allocation {alloc} has no logs on this node (it never wrote any here, or the agent's gc removed them)"
            ));
        }
        let stem = format!("{task}.{}", if stderr { "stderr" } else { "stdout" });
        let done = self.statuses.lock().expect("statuses").get(&alloc).is_none_or(|s| s.is_terminal());
        match logs::read(&dir, &stem, offset, max.min(rpc::LOG_CHUNK_MAX)) {
            Ok(mut chunk) => {
                chunk.done = done;
                AgentServiceReply::Logs(chunk)
            }
            Err(e) => AgentServiceReply::Error(format!("cannot read the logs of {alloc}: {e}")),
        }
    }
}

/// A directory others may pass through but not list (0711).
fn passable_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

/// When the allocation directory at `dir` last changed (its newest log
/// file, or the directory, which the agent touches when the allocation
/// ends), as an instant: how an agent that just started dates
/// allocations that ended before. Now when it cannot tell.
fn last_change(dir: &Path, now: Instant) -> Instant {
    let mtime = |p: &Path| std::fs::symlink_metadata(p).and_then(|m| m.modified()).ok();
    let logs = std::fs::read_dir(dir.join("logs")).into_iter().flatten().flatten().filter_map(|e| mtime(&e.path()));
    let newest = logs.chain(mtime(dir)).max();
    let ago = newest.and_then(|t| std::time::SystemTime::now().duration_since(t).ok()).unwrap_or_default();
    now.checked_sub(ago).unwrap_or(now)
}
