//! Per-task supervision: every exec task runs under its own small
//! supervisor process, `hanse task-supervisor`, started by the agent (the
//! role of Nomad's executor or containerd's shim).
//!
//! The supervisor is a child subreaper (`PR_SET_CHILD_SUBREAPER`): every
//! process the task starts, and every orphan among them (a `setsid`, a
//! double fork, a shell's background job), stays in its tree, so it can
//! find them all in `/proc` and kill them all. It also holds:
//! - the task's output, written to the rotating log files itself, so
//!   output goes on being kept while no agent is there to copy it;
//! - a **deadline**, renewed by the agent over a Unix socket (`renew MS`):
//!   when it passes, the whole tree is killed. The agent renews
//!   at-most-once work only while its lease holds, and other work while
//!   it is alive, so a frozen, crashed or killed agent's tasks never
//!   outlive its lease (review B13, B15): the servers replace them only
//!   after TTL + grace, later than any deadline the agent gives.
//!
//! The supervisor does not die with the agent: an agent restarted within
//! the deadline connects to the socket again and carries on with the
//! running task instead of starting a second copy. When the task ends,
//! the supervisor kills what is left of its tree, writes the exit to a
//! file beside the socket (for an agent that is not there to hear it),
//! tells a connected agent, and exits.
//!
//! The protocol is lines. Agent to supervisor: `renew MS` (kill the tree
//! unless told again within `MS` milliseconds), `stop MS` (SIGTERM to the
//! tree; SIGKILL after `MS`), `kill`. Supervisor to agent: `exit CODE
//! SIGNAL` (`-` for none). Start-up, on the supervisor's stdout: `started
//! PID` or `failed ERRNO`, after one JSON [`Plan`] line on its stdin.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::launch::Launch;
use super::logs::{RotatingWriter, Rotation};

/// Everything a supervisor needs to start its task: one JSON line on its
/// stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub command: String,
    pub args: Vec<String>,
    /// The task's whole environment (the agent's never leaks in).
    pub env: Vec<(String, String)>,
    /// The task's working directory (absolute).
    pub dir: PathBuf,
    /// uid, gid and supplementary groups to switch to; `None`: the
    /// supervisor's own.
    pub ids: Option<(u32, u32, Vec<u32>)>,
    /// The task's cgroup (v2) directory, when it has one.
    pub cgroup: Option<PathBuf>,
    /// The allocation's log directory and the task's name (its logs are
    /// `TASK.stdout.N` and `TASK.stderr.N`).
    pub logs: PathBuf,
    pub task: String,
    pub log_file_bytes: u64,
    pub log_files: usize,
    /// Where to listen for the agent.
    pub socket: PathBuf,
    /// Milliseconds the task may run before the agent's first `renew`.
    pub deadline_ms: u64,
}

/// The exit file beside a supervisor's socket.
pub fn exit_file(socket: &Path) -> PathBuf {
    socket.with_extension("exit")
}

/// The socket of `task` of allocation `alloc` in `dir`: short (16 hex
/// digits of a hash of both) so that the path fits a Unix socket's 108
/// bytes under any reasonable data directory.
pub fn socket_for(dir: &Path, alloc: &str, task: &str) -> PathBuf {
    // FNV-1a, 64 bits: stable across builds and restarts of the agent.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in alloc.bytes().chain([b'/']).chain(task.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    dir.join(format!("{h:016x}.sock"))
}

/// An exit as the protocol and the exit file write it: `CODE SIGNAL`.
pub fn format_exit(code: Option<i32>, signal: Option<i32>) -> String {
    let f = |v: Option<i32>| v.map_or("-".to_string(), |v| v.to_string());
    format!("{} {}", f(code), f(signal))
}

/// Reads what [`format_exit`] wrote; `None` for anything else.
pub fn parse_exit(text: &str) -> Option<(Option<i32>, Option<i32>)> {
    let mut words = text.split_whitespace();
    let f = |w: &str| if w == "-" { Some(None) } else { w.parse().ok().map(Some) };
    let exit = (f(words.next()?)?, f(words.next()?)?);
    words.next().is_none().then_some(exit)
}

/// One order from the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Renew {
        ms: u64,
    },
    Stop {
        grace_ms: u64,
    },
    Kill,
    /// `hanse alloc signal`: the signal goes to every process of the tree.
    Signal {
        signal: i32,
    },
}

impl Order {
    /// Reads one line; `None` for anything else (ignored).
    pub fn parse(line: &str) -> Option<Order> {
        let mut words = line.split_whitespace();
        let order = match (words.next()?, words.next()) {
            ("renew", Some(ms)) => Order::Renew { ms: ms.parse().ok()? },
            ("stop", Some(ms)) => Order::Stop { grace_ms: ms.parse().ok()? },
            ("kill", None) => Order::Kill,
            ("signal", Some(n)) => Order::Signal { signal: n.parse().ok().filter(|n| (1..=64).contains(n))? },
            _ => return None,
        };
        words.next().is_none().then_some(order)
    }
}

/// Set by SIGTERM, SIGINT or SIGHUP sent to the supervisor itself (a
/// service manager stopping everything): it then kills its tree and exits.
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// The parent of process `pid`, from `/proc/PID/stat`, read as bytes: a
/// name (`comm`) need not be UTF-8, and may hold spaces and parentheses.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // `pid (comm) state ppid ...`
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The parent of every process.
fn parents() -> HashMap<i32, i32> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if let Some(ppid) = parent_of(pid) {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Every process below `root`, from a snapshot of `parents`.
pub fn descendants(root: i32, parents: &HashMap<i32, i32>) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, ppid) in parents {
        children.entry(*ppid).or_default().push(*pid);
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut next = vec![root];
    while let Some(p) = next.pop() {
        for c in children.get(&p).into_iter().flatten() {
            if *c != root && seen.insert(*c) {
                out.push(*c);
                next.push(*c);
            }
        }
    }
    out
}

/// Sends `signal` to `pid` only if it is still the process the scan
/// found, below a process of `tree` (or `root`): through a pidfd, taken
/// before its parent is checked again, so a pid reaped and reused by a
/// process elsewhere in between is never signalled. Without pidfds
/// (before Linux 5.3), a plain kill(2).
fn signal_in_tree(pid: i32, signal: i32, root: i32, tree: &std::collections::HashSet<i32>) {
    // SAFETY: pidfd_open(2) returns a new descriptor or -1; it is closed
    // below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        // Only a kernel without pidfds gets a plain kill(2); any other
        // failure (the process gone, its pid free for reuse) none.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            // SAFETY: kill(2) on a process the scan found in this tree.
            unsafe { libc::kill(pid, signal) };
        }
        return;
    }
    if parent_of(pid).is_some_and(|p| p == root || tree.contains(&p)) {
        // SAFETY: pidfd_send_signal(2) on the descriptor opened above.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd, signal, std::ptr::null::<libc::siginfo_t>(), 0) };
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
}

struct Supervisor {
    me: i32,
    task: i32,
    cgroup: Option<PathBuf>,
    /// The task's exit, once reaped.
    exit: Option<(Option<i32>, Option<i32>)>,
}

impl Supervisor {
    /// Reaps every child that ended, noting the task's exit.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) on this process's own children.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if pid == self.task {
                let exit = if libc::WIFEXITED(status) {
                    (Some(libc::WEXITSTATUS(status)), None)
                } else if libc::WIFSIGNALED(status) {
                    (None, Some(libc::WTERMSIG(status)))
                } else {
                    (None, None)
                };
                self.exit = Some(exit);
            }
        }
    }

    /// Signals every process of the tree; whether there was any.
    fn signal_tree(&self, signal: i32) -> bool {
        let all = descendants(self.me, &parents());
        let tree: std::collections::HashSet<i32> = all.iter().copied().collect();
        for pid in &all {
            signal_in_tree(*pid, signal, self.me, &tree);
        }
        !all.is_empty()
    }

    /// Kills every process of the tree, again until none is left (one
    /// could fork between a look and a kill), for at most a second;
    /// whether none is left. The caller calls again until so.
    fn kill_tree(&mut self) -> bool {
        if let Some(cg) = &self.cgroup {
            // cgroups v2 from Linux 5.14: the kernel kills the whole group.
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        }
        for _ in 0..200 {
            if !self.signal_tree(libc::SIGKILL) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
            self.reap();
        }
        false
    }
}

/// How long a supervisor whose task ended goes on killing what is left
/// of its tree before it records the exit all the same.
const UNKILLABLE_AFTER: Duration = Duration::from_secs(30);

/// The most output copied from one pipe per turn of the loop (bytes).
const PUMP_MAX: usize = 1 << 20;

/// One of the task's output pipes (non-blocking) and its log.
struct Output {
    pipe: Option<std::fs::File>,
    log: RotatingWriter,
}

impl Output {
    fn new(pipe: Option<std::os::fd::OwnedFd>, log: RotatingWriter) -> Output {
        let pipe = pipe.map(std::fs::File::from);
        if let Some(p) = &pipe {
            nonblocking(p.as_raw_fd());
        }
        Output { pipe, log }
    }

    /// Copies what is there, up to [`PUMP_MAX`] bytes (a task that writes
    /// without pause must not keep the supervisor from its deadline);
    /// `false` once the pipe is closed.
    fn pump(&mut self) -> bool {
        let mut buf = [0u8; 16 << 10];
        let mut copied = 0;
        while let Some(pipe) = &mut self.pipe {
            if copied >= PUMP_MAX {
                return true;
            }
            match pipe.read(&mut buf) {
                Ok(n) if n > 0 => {
                    copied += n;
                    let _ = self.log.write(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => self.pipe = None,
            }
        }
        false
    }
}

fn nonblocking(fd: i32) {
    // SAFETY: fcntl(2) on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Whether the peer of `stream` runs as this process's user (or root).
fn trusted(stream: &UnixStream) -> bool {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cred`.
    let ok = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    } == 0;
    // SAFETY: geteuid cannot fail.
    ok && (cred.uid == 0 || cred.uid == unsafe { libc::geteuid() })
}

/// `hanse task-supervisor`: reads a [`Plan`] from `input`, starts the task
/// and supervises it until it ends. Returns the process's exit code: 0
/// once the task's exit is recorded, 1 when it could not start.
pub fn run(mut input: impl BufRead) -> i32 {
    let mut line = String::new();
    let plan: Plan = match input
        .read_line(&mut line)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str(&line).map_err(|e| format!("not a plan: {e}")))
    {
        Ok(p) => p,
        Err(e) => {
            let _ =
                writeln!(std::io::stderr(), "hanse task-supervisor: {e} (it is started by `hanse agent`, not by hand)");
            return 1;
        }
    };
    match supervise(&plan) {
        Ok(()) => 0,
        Err(Failure::Exec(e)) => {
            let _ = writeln!(std::io::stdout(), "failed exec {}", e.raw_os_error().unwrap_or(libc::EIO));
            1
        }
        Err(Failure::Setup(e)) => {
            let _ = writeln!(std::io::stderr(), "hanse task-supervisor ({}): {e}", plan.task);
            let _ = writeln!(std::io::stdout(), "failed setup {e}");
            1
        }
    }
}

/// Why a supervisor stopped before its task ended.
enum Failure {
    /// The task's program could not be executed (the errno says why).
    Exec(std::io::Error),
    /// Anything else: its socket, its logs, its exit file.
    Setup(String),
}

/// A [`Failure::Setup`] saying what failed on which path.
fn setup<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Failure + 'a {
    move |e| Failure::Setup(format!("{what} {}: {e}", path.display()))
}

fn supervise(plan: &Plan) -> Result<(), Failure> {
    // SAFETY: process-wide settings made before any thread starts:
    // a session of its own (signals to the agent's group or terminal do
    // not reach it), the subreaper bit, and handlers that set a flag.
    unsafe {
        libc::setsid();
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            return Err(Failure::Setup(format!("cannot become a subreaper: {}", std::io::Error::last_os_error())));
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(s, on_terminate as *const () as libc::sighandler_t);
        }
    }
    let _ = std::fs::remove_file(&plan.socket);
    let listener = UnixListener::bind(&plan.socket)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(setup("cannot listen on", &plan.socket))?;
    let rotation = Rotation { file_bytes: plan.log_file_bytes, files: plan.log_files };
    let log = |stream: &str| {
        RotatingWriter::open(&plan.logs, &format!("{}.{stream}", plan.task), rotation)
            .map_err(setup("cannot open a log in", &plan.logs))
    };
    let (stdout_log, stderr_log) = (log("stdout")?, log("stderr")?);
    let launch = Launch::new(&plan.command, &plan.args, &plan.env, &plan.dir)
        .ok_or_else(|| Failure::Setup("a command, argument or env value holds a NUL byte".into()))?;
    let procs = plan
        .cgroup
        .as_ref()
        .and_then(|d| std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok());
    let ids = plan.ids.clone();
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    let mut cmd = std::process::Command::new(&plan.command);
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `become_task` runs in the child between fork and exec; the
    // task dies with its supervisor, should that be killed.
    unsafe {
        cmd.pre_exec(move || Err(launch.become_task(procs.as_deref(), ids.as_ref(), me)));
    }
    let mut child = cmd.spawn().map_err(Failure::Exec)?;
    // The kernel's OOM killer takes the task, never its supervisor (which
    // would leave the tree unwatched); set after the fork, so the task
    // keeps its own score. Only root may; others go without.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    let task = child.id() as i32;
    let mut outputs = [
        Output::new(child.stdout.take().map(Into::into), stdout_log),
        Output::new(child.stderr.take().map(Into::into), stderr_log),
    ];
    // The child is reaped by `waitpid(-1)` below, never through `child`.
    drop(child);
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "started {task}");
        let _ = out.flush();
    }
    // Nothing more goes to the agent's stdout or stderr: it may be gone
    // soon, or its reader stopped (a write could block, or fail). What the
    // supervisor has to say goes into the task's stderr log.
    // SAFETY: dup2(2) of /dev/null over this process's stdout and stderr.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }

    let mut sv = Supervisor { me, task, cgroup: plan.cgroup.clone(), exit: None };
    let mut agent: Option<(UnixStream, Vec<u8>)> = None;
    let mut deadline = Instant::now() + Duration::from_millis(plan.deadline_ms);
    let mut kill_at: Option<Instant> = None;
    // Killing the tree until the task's exit is reaped.
    let mut killing = false;
    loop {
        let mut fds: Vec<libc::pollfd> =
            vec![libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some((s, _)) = &agent {
            fds.push(libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        for p in outputs.iter().filter_map(|o| o.pipe.as_ref()) {
            fds.push(libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let now = Instant::now();
        let next = [Some(deadline), kill_at].into_iter().flatten().min().unwrap_or(now);
        let wait = next.saturating_duration_since(now).min(Duration::from_millis(100));
        // SAFETY: poll(2) on descriptors this process owns. It wakes for
        // input, a terminating signal, or the timeout (at most 100 ms:
        // children are reaped that often).
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis() as i32) };

        // An agent connecting (again): the newest one is listened to.
        while let Ok((stream, _)) = listener.accept() {
            if trusted(&stream) && stream.set_nonblocking(true).is_ok() {
                agent = Some((stream, Vec::new()));
            }
        }
        let mut orders = Vec::new();
        if let Some((stream, buf)) = &mut agent {
            let mut chunk = [0u8; 1024];
            let gone = loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break true,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break true,
                }
                // A peer that sends no newline is not an agent.
                if buf.len() > 64 << 10 {
                    break true;
                }
            };
            while let Some(at) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=at).collect();
                if let Some(order) = std::str::from_utf8(&line).ok().and_then(Order::parse) {
                    orders.push(order);
                }
            }
            if gone {
                agent = None;
            }
        }
        let now = Instant::now();
        for order in orders {
            match order {
                Order::Renew { ms } => deadline = now + Duration::from_millis(ms),
                Order::Stop { grace_ms } => {
                    if sv.exit.is_none() && kill_at.is_none() {
                        sv.signal_tree(libc::SIGTERM);
                        kill_at = Some(now + Duration::from_millis(grace_ms));
                    }
                }
                Order::Kill => kill_at = Some(now),
                Order::Signal { signal } => {
                    if sv.exit.is_none() {
                        sv.signal_tree(signal);
                    }
                }
            }
        }
        sv.reap();
        if sv.exit.is_none() {
            if !killing && now >= deadline {
                let _ = outputs[1].log.write(b"\nhanse: the agent did not renew this task's lease in time: killed\n");
                killing = true;
            }
            killing |= TERMINATE.load(Ordering::SeqCst) || kill_at.is_some_and(|at| now >= at);
            if killing {
                sv.kill_tree();
            }
        }
        for o in &mut outputs {
            o.pump();
        }
        if sv.exit.is_none() {
            continue;
        }
        // The task ended: what is left of its tree goes with it (as its
        // process group did before), then its output, then its exit. The
        // supervisor never exits while a process of the tree is left.
        let (mut pause, given_up) = (Duration::from_millis(50), Instant::now() + UNKILLABLE_AFTER);
        while !sv.kill_tree() {
            if Instant::now() >= given_up {
                // Stuck in the kernel (a hung mount), or not ours to kill
                // (a setuid program's): said, not waited on for ever.
                let left = descendants(sv.me, &parents());
                let note = format!("\nhanse: processes of this task could not be killed: {left:?}\n");
                let _ = outputs[1].log.write(note.as_bytes());
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        if let Some(cg) = &plan.cgroup {
            let _ = std::fs::remove_dir(cg);
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until && outputs.iter_mut().map(Output::pump).fold(false, |a, b| a | b) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (code, signal) = sv.exit.unwrap_or_default();
        let text = format_exit(code, signal);
        let file = exit_file(&plan.socket);
        let tmp = file.with_extension("exit.tmp");
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &file))
            .map_err(setup("cannot record the exit in", &file))?;
        // No agent attaches from here on: a restart of the task starts a
        // new supervisor rather than reaching this one as it leaves.
        let _ = std::fs::remove_file(&plan.socket);
        drop(listener);
        if let Some((stream, _)) = &mut agent {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = writeln!(stream, "exit {text}");
        }
        return Ok(());
    }
}

/// The agent's end of one supervisor's socket: orders go out through it
/// (never blocking: a supervisor that does not read lets its deadline
/// pass, the safe direction).
#[derive(Debug)]
pub struct Control {
    stream: std::sync::Mutex<UnixStream>,
}

impl Control {
    pub fn new(stream: UnixStream) -> Control {
        Control { stream: std::sync::Mutex::new(stream) }
    }

    /// Sends one order; an error when it could not be written whole.
    pub fn send(&self, order: Order) -> std::io::Result<()> {
        let line = match order {
            Order::Renew { ms } => format!("renew {ms}\n"),
            Order::Stop { grace_ms } => format!("stop {grace_ms}\n"),
            Order::Kill => "kill\n".to_string(),
            Order::Signal { signal } => format!("signal {signal}\n"),
        };
        let mut s = self.stream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::{Order, descendants, format_exit, parse_exit, socket_for};

    #[test]
    fn orders_and_exits_read_back_and_nothing_else_does() {
        assert_eq!(Order::parse("renew 1500\n"), Some(Order::Renew { ms: 1500 }));
        assert_eq!(Order::parse("stop 5000"), Some(Order::Stop { grace_ms: 5000 }));
        assert_eq!(Order::parse("signal 10\n"), Some(Order::Signal { signal: 10 }));
        assert_eq!(Order::parse("signal 0"), None);
        assert_eq!(Order::parse("signal 99"), None);
        assert_eq!(Order::parse("kill"), Some(Order::Kill));
        for bad in ["renew", "renew x", "renew 1 2", "kill 1", "stop", "exit 0 -", ""] {
            assert_eq!(Order::parse(bad), None, "{bad}");
        }
        for exit in [(Some(0), None), (Some(3), None), (None, Some(9)), (None, None)] {
            assert_eq!(parse_exit(&format_exit(exit.0, exit.1)), Some(exit));
        }
        assert_eq!(parse_exit("0"), None);
        assert_eq!(parse_exit("x -"), None);
    }

    #[test]
    fn the_tree_holds_grandchildren_and_nothing_beside_it() {
        // 10 -> 11 -> 12, 10 -> 13; 20 -> 21 is another tree.
        let parents: HashMap<i32, i32> = [(11, 10), (12, 11), (13, 10), (21, 20), (10, 1)].into_iter().collect();
        let mut d = descendants(10, &parents);
        d.sort();
        assert_eq!(d, vec![11, 12, 13]);
        assert!(descendants(12, &parents).is_empty());
    }

    #[test]
    fn sockets_are_short_stable_and_distinct() {
        let a = socket_for(Path::new("/d"), "0b0c-alloc", "web");
        assert_eq!(a, socket_for(Path::new("/d"), "0b0c-alloc", "web"));
        assert_ne!(a, socket_for(Path::new("/d"), "0b0c-alloc", "db"));
        assert_ne!(a, socket_for(Path::new("/d"), "0b0c-allocw", "eb"), "the separator counts");
        assert_eq!(a.file_name().unwrap().len(), 21);
    }
}
