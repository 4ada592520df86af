//! The federation under test: three clusters of three `hanse server`s and
//! two `hanse agent`s each, every process in its own namespace, with real
//! certificates, gossip, QUIC and policies; and the processes' lives
//! (started, killed, frozen, restarted under a skewed clock).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cluster_core::server::client::Client;
use cluster_core::transport::tls::{self, Identity, Role};

use crate::net::{self, Net};

/// The clusters: name and jurisdiction.
pub const CLUSTERS: [(&str, &str); 3] = [("eu-west", "eu"), ("eu-central", "eu"), ("us-east", "us")];
pub const SERVERS: usize = 3;
pub const AGENTS: usize = 2;
/// Each agent's capacity: a cluster has twice this.
pub const AGENT_CPU_MILLIS: u64 = 2000;
const RAFT_PORT: u16 = 4700;
const HTTP_PORT: u16 = 4646;
const GOSSIP_PORT: u16 = 7946;
/// The management secret every cluster is bootstrapped with.
pub const TOKEN: &str = "hanse-chaos-management-secret";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server { id: u64 },
    Agent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    Running,
    Frozen,
    /// Killed by the nemesis, to be started again.
    Down,
}

/// One `hanse` process of the federation.
pub struct Proc {
    /// `CLUSTER/s1` or `CLUSTER/a1`.
    pub name: String,
    pub cluster: usize,
    pub kind: Kind,
    /// Its namespace (index into [`Net::nodes`]).
    pub node: usize,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub life: Life,
    /// The `faketime` offset it runs under, if any.
    pub clock: Option<String>,
}

/// A process that ended without the nemesis killing it.
pub struct Crash {
    pub name: String,
    pub status: String,
    pub log_tail: String,
}

pub struct World {
    pub dir: PathBuf,
    pub hanse: PathBuf,
    /// libfaketime, preloaded into a process whose clock is skewed.
    pub libfaketime: PathBuf,
    pub run: String,
    pub net: Net,
    pub procs: Mutex<Vec<Proc>>,
    ca_pem: String,
    /// Each cluster's API addresses (its three servers), comma-separated.
    pub apis: Vec<String>,
    pub started: Instant,
}

/// The names of the run's nodes, in node order: each cluster's servers,
/// then its agents.
pub fn node_names() -> Vec<String> {
    let mut out = Vec::new();
    for (c, _) in CLUSTERS {
        out.extend((1..=SERVERS).map(|i| format!("{c}-s{i}")));
        out.extend((1..=AGENTS).map(|i| format!("{c}-a{i}")));
    }
    out
}

fn node_index(cluster: usize, kind: Kind, i: usize) -> usize {
    let base = cluster * (SERVERS + AGENTS);
    match kind {
        Kind::Server { .. } => base + i,
        Kind::Agent => base + SERVERS + i,
    }
}

impl World {
    /// Writes the federation's certificates, key, policies and configs in
    /// `dir`, starts every server and agent in its namespace, and waits
    /// (up to `limit`) until each cluster has a leader, its ACLs are
    /// bootstrapped and its agents are ready.
    pub fn start(
        dir: &Path,
        hanse: &Path,
        libfaketime: &Path,
        run: &str,
        net: Net,
        limit: Duration,
    ) -> anyhow::Result<World> {
        fs::create_dir_all(dir.join("pki"))?;
        fs::create_dir_all(dir.join("logs"))?;
        let ca = tls::create_ca("hanse", 2)?;
        fs::write(dir.join("pki/ca.pem"), &ca.cert_pem)?;
        let keygen = std::process::Command::new(hanse)
            .args(["federation", "keygen", "--out"])
            .arg(dir.join("federation.key"))
            .output()
            .context("run hanse federation keygen")?;
        if !keygen.status.success() {
            bail!("hanse federation keygen: {}", String::from_utf8_lossy(&keygen.stderr));
        }
        let addr = |c: usize, kind: Kind, i: usize| net.nodes[node_index(c, kind, i)].addr;
        let seeds: Vec<String> =
            (0..CLUSTERS.len()).map(|c| format!("\"{}:{GOSSIP_PORT}\"", addr(c, Kind::Server { id: 1 }, 0))).collect();
        let mut procs = Vec::new();
        let mut apis = Vec::new();
        for (c, (cluster, jurisdiction)) in CLUSTERS.iter().enumerate() {
            fs::write(dir.join(format!("policy-{cluster}.toml")), policy(cluster, jurisdiction))?;
            let raft: Vec<String> =
                (0..SERVERS).map(|i| format!("{}:{RAFT_PORT}", addr(c, Kind::Server { id: 0 }, i))).collect();
            let mut api = Vec::new();
            for i in 0..SERVERS {
                let id = i as u64 + 1;
                let me = addr(c, Kind::Server { id }, i);
                let name = format!("s{id}");
                let pair = tls::issue_server(
                    &ca,
                    &Identity::new(cluster, Role::Server, &name),
                    2,
                    &[me.to_string()],
                    &[jurisdiction.to_string()],
                )?;
                let cert = format!("pki/{cluster}-{name}.pem");
                let key = format!("pki/{cluster}-{name}-key.pem");
                fs::write(dir.join(&cert), &pair.cert_pem)?;
                fs::write(dir.join(&key), &pair.key_pem)?;
                let mut text = format!(
                    "[server]\nname = \"{name}\"\ncluster = \"{cluster}\"\nid = {id}\ndata_dir = \"data/{cluster}-{name}\"\n\
                     bind = \"{me}:{RAFT_PORT}\"\nhttp = \"{me}:{HTTP_PORT}\"\nheartbeat_ttl = \"3s\"\nheartbeat_grace = \"3s\"\n\n\
                     [tls]\nca = \"pki/ca.pem\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
                     [gossip]\nbind = \"{me}:{GOSSIP_PORT}\"\nseeds = [{}]\nkey_file = \"federation.key\"\njurisdictions = [\"{jurisdiction}\"]\n\n\
                     [federation]\npolicy = \"policy-{cluster}.toml\"\n",
                    seeds.join(", ")
                );
                for (j, at) in raft.iter().enumerate().filter(|(j, _)| *j != i) {
                    text.push_str(&format!("\n[[peer]]\nid = {}\naddress = \"{at}\"\n", j + 1));
                }
                let config = dir.join(format!("{cluster}-{name}.toml"));
                fs::write(&config, text)?;
                api.push(format!("{me}:{HTTP_PORT}"));
                procs.push(Proc::new(
                    format!("{cluster}/{name}"),
                    c,
                    Kind::Server { id },
                    node_index(c, Kind::Server { id }, i),
                    config,
                    dir,
                ));
            }
            apis.push(api.join(","));
            for i in 0..AGENTS {
                // Agent names carry the run's id: their task cgroups are
                // named after them, and cleaning up goes by that name.
                let name = format!("a{}-{run}", i + 1);
                let pair = tls::issue(&ca, &Identity::new(cluster, Role::Agent, &name), 2)?;
                let cert = format!("pki/{cluster}-{name}.pem");
                let key = format!("pki/{cluster}-{name}-key.pem");
                fs::write(dir.join(&cert), &pair.cert_pem)?;
                fs::write(dir.join(&key), &pair.key_pem)?;
                let servers: Vec<String> = raft.iter().map(|a| format!("\"{a}\"")).collect();
                let text = format!(
                    "[agent]\nname = \"{name}\"\ncluster = \"{cluster}\"\ndata_dir = \"data/{cluster}-{name}\"\n\
                     servers = [{}]\ndrivers = [\"exec\"]\ncpu = \"{AGENT_CPU_MILLIS}m\"\nmemory = \"4GiB\"\n\
                     jurisdictions = [\"{jurisdiction}\"]\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
                    servers.join(", ")
                );
                let config = dir.join(format!("{cluster}-{name}.toml"));
                fs::write(&config, text)?;
                let short = format!("{cluster}/a{}", i + 1);
                procs.push(Proc::new(short, c, Kind::Agent, node_index(c, Kind::Agent, i), config, dir));
            }
        }
        let world = World {
            dir: dir.to_path_buf(),
            hanse: hanse.to_path_buf(),
            libfaketime: libfaketime.to_path_buf(),
            run: run.to_string(),
            net,
            procs: Mutex::new(procs),
            ca_pem: ca.cert_pem.clone(),
            apis,
            started: Instant::now(),
        };
        {
            let mut procs = world.procs.lock().unwrap();
            for p in procs.iter_mut().filter(|p| matches!(p.kind, Kind::Server { .. })) {
                p.start(&world)?;
            }
        }
        world.until_ready(limit)?;
        Ok(world)
    }

    fn until_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        for (c, (cluster, _)) in CLUSTERS.iter().enumerate() {
            let client = self.client(c).with_token(None);
            loop {
                let led = client.health().is_ok_and(|h| !h["leader"].is_null());
                let done = led
                    && match client.bootstrap(Some(TOKEN)) {
                        Ok(_) => true,
                        Err(e) => e.to_string().contains("bootstrapped already"),
                    };
                if done {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "cluster {cluster} has no leader within {limit:?} (logs in {})",
                        self.dir.join("logs").display()
                    );
                }
                if crate::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                    bail!("interrupted while starting");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        {
            let mut procs = self.procs.lock().unwrap();
            for p in procs.iter_mut().filter(|p| p.kind == Kind::Agent) {
                p.start(self)?;
            }
        }
        for (c, (cluster, _)) in CLUSTERS.iter().enumerate() {
            let client = self.client(c);
            loop {
                let ready = client.nodes().map(|n| n.iter().filter(|n| n.status == "ready").count()).unwrap_or(0);
                if ready == AGENTS {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{cluster} has {ready} of {AGENTS} agents ready after {limit:?}");
                }
                if crate::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                    bail!("interrupted while starting");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// A client of cluster `c`'s servers, with the management token, that
    /// gives up on a request after 10 s.
    pub fn client(&self, c: usize) -> Client {
        Client::new(&self.apis[c])
            .with_ca(&self.ca_pem)
            .expect("the run's CA")
            .with_token(Some(TOKEN))
            .with_timeout(Duration::from_secs(10))
    }

    /// A client of the one server `server` (a process index) only.
    pub fn server_client(&self, server: usize) -> Client {
        let node = self.procs.lock().unwrap()[server].node;
        self.client(0).at(&format!("{}:{HTTP_PORT}", self.net.nodes[node].addr)).with_timeout(Duration::from_secs(2))
    }

    /// The process index of cluster `c`'s leader, as one of its servers
    /// says (`None` when none answers or none leads).
    pub fn leader(&self, c: usize) -> Option<usize> {
        let servers: Vec<(usize, u64)> = (self.procs.lock().unwrap().iter().enumerate())
            .filter(|(_, p)| p.cluster == c && p.life == Life::Running)
            .filter_map(|(i, p)| match p.kind {
                Kind::Server { id } => Some((i, id)),
                Kind::Agent => None,
            })
            .collect();
        for (i, _) in &servers {
            if let Some(l) = self.server_client(*i).health().ok().and_then(|h| h["leader"].as_u64()) {
                return servers.iter().find(|(_, id)| *id == l).map(|(i, _)| *i);
            }
        }
        None
    }

    /// Milliseconds since the federation was up.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Kills process `i` (SIGKILL, with its process group).
    pub fn kill(&self, i: usize) {
        self.procs.lock().unwrap()[i].kill();
    }

    /// Starts process `i` again from its data, under `clock` if given.
    pub fn restart(&self, i: usize, clock: Option<String>) -> anyhow::Result<()> {
        let mut procs = self.procs.lock().unwrap();
        procs[i].kill();
        procs[i].clock = clock;
        procs[i].start(self)
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) to process `i`.
    pub fn freeze(&self, i: usize, frozen: bool) {
        let mut procs = self.procs.lock().unwrap();
        let p = &mut procs[i];
        if let Some(pid) = p.pid() {
            // SAFETY: kill(2) on the process group of a child we started.
            unsafe { libc::kill(-pid, if frozen { libc::SIGSTOP } else { libc::SIGCONT }) };
            if p.life != Life::Down {
                p.life = if frozen { Life::Frozen } else { Life::Running };
            }
        }
    }

    /// The processes that ended by themselves since the last call; each
    /// is started again (on its clock) so the run goes on.
    pub fn crashes(&self) -> Vec<Crash> {
        let mut out = Vec::new();
        let mut procs = self.procs.lock().unwrap();
        for p in procs.iter_mut() {
            let Some(status) = p.exited() else { continue };
            out.push(Crash { name: p.name.clone(), status: describe(status), log_tail: tail(&p.log, 2000) });
            if let Err(e) = p.start(self) {
                eprintln!("warning: {} could not be started again: {e:#}", p.name);
            }
        }
        out
    }

    /// Brings every process back: thawed, started if down, on the true clock.
    pub fn heal_processes(&self) -> anyhow::Result<()> {
        let mut procs = self.procs.lock().unwrap();
        for p in procs.iter_mut() {
            if p.life == Life::Frozen {
                if let Some(pid) = p.pid() {
                    // SAFETY: as in `freeze`.
                    unsafe { libc::kill(-pid, libc::SIGCONT) };
                }
                p.life = Life::Running;
            }
            if p.life == Life::Down || p.clock.is_some() {
                p.kill();
                p.clock = None;
                p.start(self)?;
            }
        }
        Ok(())
    }

    /// Kills every process of the run: the ones it started, then whatever
    /// is left in its namespaces (task supervisors and tasks outlive their
    /// agents by design), found by namespace inode in `/proc`.
    pub fn stop_all(&self) {
        for p in self.procs.lock().unwrap().iter_mut() {
            p.kill();
        }
        kill_in_namespaces(&self.net.nodes.iter().map(|n| n.inode).collect::<Vec<_>>());
    }

    /// Log lines that say a server or agent panicked, with their file.
    pub fn panics(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.procs.lock().unwrap().iter() {
            let text = fs::read_to_string(&p.log).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("panicked at")) {
                out.push(format!("{}: {}", p.name, line.trim()));
            }
        }
        out
    }
}

impl Proc {
    fn new(name: String, cluster: usize, kind: Kind, node: usize, config: PathBuf, dir: &Path) -> Proc {
        let log = dir.join("logs").join(format!("{}.log", name.replace('/', "-")));
        Proc { name, cluster, kind, node, config, log, child: None, life: Life::Down, clock: None }
    }

    fn start(&mut self, world: &World) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        use std::io::Write;
        let mut l = &log;
        let _ = writeln!(l, "=== hanse-chaos: started at {} ms, clock {:?}", world.now_ms(), self.clock);
        let role = if self.kind == Kind::Agent { "agent" } else { "server" };
        let hanse = world.hanse.to_str().context("hanse's path")?;
        let mut c = world.net.command(self.node, hanse);
        if let Some(offset) = &self.clock {
            // libfaketime itself, not the `faketime` wrapper: killed with
            // SIGKILL, the wrapper leaves a semaphore named by its pid in
            // /dev/shm, and a later wrapper given the same pid fails to
            // start ("sem_open: File exists"). The monotonic clock, which
            // leases run on, is left alone.
            c.env("LD_PRELOAD", &world.libfaketime).env("FAKETIME", offset).env("DONT_FAKE_MONOTONIC", "1");
        }
        use std::os::unix::process::CommandExt;
        c.arg(role)
            .arg("--config")
            .arg(&self.config)
            .current_dir(&world.dir)
            .process_group(0)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(c.spawn().with_context(|| format!("start {}", self.name))?);
        self.life = Life::Running;
        Ok(())
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                // SAFETY: kill(2) on the process group of a child we
                // started (it leads its own group).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.life = Life::Down;
    }

    /// How it ended, if it ended while it should be running.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.life == Life::Down {
            return None;
        }
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.life = Life::Down;
        Some(status)
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

fn tail(path: &Path, bytes: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&text[text.len().saturating_sub(bytes)..]).into_owned()
}

/// The policy of `cluster`: delegate to and accept from both others,
/// personal data only in the EU, short leases so a run sees them expire.
fn policy(cluster: &str, jurisdiction: &str) -> String {
    let mut text = format!("[cluster]\nname = \"{cluster}\"\njurisdictions = [\"{jurisdiction}\"]\n");
    for (peer, _) in CLUSTERS.iter().filter(|(p, _)| *p != cluster) {
        text.push_str(&format!("\n[[peer]]\ncluster = \"{peer}\"\ndelegate_to = true\naccept_from = true\n"));
    }
    text.push_str(
        "\n[overflow]\nwhen = [\"unplaceable\"]\nmax_remote_share = 1.0\n\n[inbound]\nmax_share_of_capacity = 0.6\n\n\
         [[rule]]\nmatch = { data = \"eu-pii\" }\njurisdictions = [\"eu\"]\n\n\
         [retry]\nbackoff = \"1s\"\nbackoff_max = \"5s\"\nbreaker_failures = 5\nbreaker_cooldown = \"10s\"\nlease = \"6s\"\ngrace = \"4s\"\n",
    );
    text
}

/// Where Debian's `faketime` package puts libfaketime, for any machine.
pub fn find_libfaketime() -> Option<PathBuf> {
    let lib = fs::read_dir("/usr/lib").ok()?;
    let mut places: Vec<PathBuf> = lib.flatten().map(|e| e.path().join("faketime/libfaketime.so.1")).collect();
    places.push("/usr/lib/faketime/libfaketime.so.1".into());
    places.into_iter().find(|p| p.is_file())
}

/// SIGKILLs every process in the namespaces with inodes `inodes`, and
/// waits up to 5 s until none is left.
pub fn kill_in_namespaces(inodes: &[u64]) {
    for _ in 0..50 {
        let pids = pids_in(inodes);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            kill_if_in(pid, inodes);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILLs `pid` if it is (still) in one of the namespaces `inodes`:
/// through a pidfd, checked after it is open, so a pid reused meanwhile by
/// a process elsewhere is never hit.
fn kill_if_in(pid: i32, inodes: &[u64]) {
    // SAFETY: pidfd_open(2) with no flags; the fd is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        // No pidfds (a kernel before 5.3, or a seccomp filter): kill(2)
        // after the check, with its small window, beats leaving it.
        let errno = std::io::Error::last_os_error().raw_os_error();
        if matches!(errno, Some(libc::ENOSYS | libc::EPERM)) && ns_inode(pid).is_some_and(|i| inodes.contains(&i)) {
            // SAFETY: kill(2) on a process just seen in the run's namespaces.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        return;
    }
    if ns_inode(pid).is_some_and(|i| inodes.contains(&i)) {
        // SAFETY: pidfd_send_signal(2) on the pidfd we hold.
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0)
        };
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
}

/// The processes whose network namespace is one of `inodes`.
pub fn pids_in(inodes: &[u64]) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id() as i32;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && ns_inode(*pid).is_some_and(|i| inodes.contains(&i)))
        .collect()
}

/// The inode of process `pid`'s network namespace.
pub fn ns_inode(pid: i32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Removes the run's task cgroups (`/sys/fs/cgroup/hanse/CLUSTER.a1-RUN.*`),
/// which its agents name after the run's id, once they are empty.
/// A cgroup whose last process is exiting is busy a moment longer: each
/// is killed (`cgroup.kill`) and tried again for up to 2 s.
pub fn remove_cgroups(run: &str) {
    let marks: Vec<String> = (1..=AGENTS).map(|i| format!(".a{i}-{run}.")).collect();
    for _ in 0..20 {
        let Ok(dir) = fs::read_dir("/sys/fs/cgroup/hanse") else { return };
        let ours: Vec<PathBuf> = (dir.flatten())
            .filter(|e| marks.iter().any(|m| e.file_name().to_string_lossy().contains(m.as_str())))
            .map(|e| e.path())
            .collect();
        if ours.is_empty() {
            return;
        }
        for path in ours {
            if fs::remove_dir(&path).is_err() {
                let _ = fs::write(path.join("cgroup.kill"), "1");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything a run made outside its directory, removed by the run's id:
/// its processes (by namespace), namespaces and cgroups.
pub fn clean_up(run: &str) {
    let names = net::names(run, &node_names());
    // The nodes' namespaces, not the control one this program runs in.
    kill_in_namespaces(&net::inodes(&names[..names.len() - 1]));
    net::remove(&names);
    remove_cgroups(run);
}
