//! The fence: a small process beside the agent that kills at-most-once
//! work when its lease runs out, even if the agent itself cannot act.
//!
//! The agent stops `on_disconnect = "stop"` work by its lease (see
//! [`super::lease`]), but a frozen agent (SIGSTOP, a debugger, a stuck
//! thread holding its loop) enforces nothing, while its tasks, separate
//! processes, run on and the servers replace them after TTL + grace. So
//! the agent tells a second process, `hanse agent-fence`, the deadline of
//! every at-most-once task's process group, and renews it while it may
//! run; the fence sends SIGKILL to a group whose deadline passes. It is
//! the lease's hard edge: the agent still stops work gracefully (SIGTERM,
//! kill timeout) before it.
//!
//! The protocol is lines on the fence's stdin, durations rather than
//! instants so that the two processes share no clock reading:
//! `kill PGID AFTER_MS` (kill the group unless told again within
//! `AFTER_MS`) and `forget PGID` (it ended; never touch it). When its stdin
//! closes (the agent died: its tasks die with it by `PR_SET_PDEATHSIG`) the
//! fence exits.
//!
//! A group id is reused only once every process of the group is gone and
//! the pid space has wrapped around; a task that ends while the agent is
//! frozen stays a zombie (unreaped) until the agent runs again, which
//! keeps its id taken.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ids::AllocId;

/// The agent's end: the fence process and the groups it watches. Every
/// change and the line that tells the fence of it happen under one lock,
/// so a `forget` can never be overtaken by a stale `kill` for the same
/// group.
pub struct Fence {
    program: std::path::PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    child: Child,
    stdin: ChildStdin,
    allocs: HashMap<AllocId, Watched>,
}

/// One allocation's tasks' process groups, and how long it may run from
/// when it was last renewed (`None`: not yet renewed).
type Watched = (Vec<i32>, Option<(Instant, u64)>);

/// The most bytes written at once: a pipe write up to `PIPE_BUF` is whole
/// or not at all, so a full pipe never leaves half a line.
const WRITE_MAX: usize = 4_096;

fn spawn(program: &Path) -> std::io::Result<(Child, ChildStdin)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // Its own process group: a signal to the agent's group (Ctrl-Z in a
    // terminal) does not freeze the fence with it.
    let mut child = Command::new(program)
        .arg("agent-fence")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()?;
    let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("the fence has no stdin"))?;
    // Non-blocking: a fence that stops reading must not stall the agent's
    // loop (its deadlines then pass, which is the safe direction).
    // SAFETY: fcntl(2) on a descriptor this process owns.
    unsafe {
        let fd = stdin.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok((child, stdin))
}

impl Inner {
    /// Writes `lines` (whole lines), starting the fence again if it died,
    /// and then telling it every deadline it knew.
    fn send(&mut self, program: &Path, lines: &str) {
        match write_lines(&mut self.stdin, lines) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                let _ = self.child.wait();
                match spawn(program) {
                    Ok((child, stdin)) => {
                        tracing::warn!("the fence process died; started it again");
                        (self.child, self.stdin) = (child, stdin);
                        let all = self.all_deadlines();
                        if let Err(e) = write_lines(&mut self.stdin, &all) {
                            tracing::error!(
                                "the fence does not listen ({e}): a frozen agent could not stop at-most-once work"
                            );
                        }
                    }
                    Err(e) => tracing::error!(
                        "cannot start the fence again ({e}): a frozen agent could not stop at-most-once work"
                    ),
                }
            }
            Err(e) => tracing::warn!("the fence is not reading ({e}); deadlines it has will pass unrenewed"),
        }
    }

    fn all_deadlines(&self) -> String {
        let mut out = String::new();
        for (groups, deadline) in self.allocs.values() {
            if let Some(left) = left_of(deadline) {
                for g in groups {
                    out.push_str(&format!("kill {g} {left}\n"));
                }
            }
        }
        out
    }
}

/// Milliseconds left of a renewal made at `at` for `ms` (`None`: never
/// renewed).
fn left_of(deadline: &Option<(Instant, u64)>) -> Option<u64> {
    deadline.map(|(at, ms)| ms.saturating_sub(at.elapsed().as_millis() as u64))
}

/// Writes whole lines in writes of at most [`WRITE_MAX`] bytes.
fn write_lines(to: &mut ChildStdin, lines: &str) -> std::io::Result<()> {
    let mut chunk = String::new();
    for line in lines.split_inclusive('\n') {
        if chunk.len() + line.len() > WRITE_MAX {
            to.write_all(chunk.as_bytes())?;
            chunk.clear();
        }
        chunk.push_str(line);
    }
    if !chunk.is_empty() {
        to.write_all(chunk.as_bytes())?;
    }
    Ok(())
}

impl Fence {
    /// Starts `program agent-fence` (the `hanse` binary).
    pub fn start(program: &Path) -> std::io::Result<Fence> {
        let (child, stdin) = spawn(program)?;
        Ok(Fence { program: program.to_path_buf(), inner: Mutex::new(Inner { child, stdin, allocs: HashMap::new() }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A task of `alloc` started as process group `pgid`: it is fenced by
    /// the allocation's current deadline at once.
    pub fn register(&self, alloc: AllocId, pgid: i32) {
        let mut inner = self.lock();
        let (groups, deadline) = inner.allocs.entry(alloc).or_default();
        groups.push(pgid);
        if let Some(left) = left_of(deadline) {
            inner.send(&self.program, &format!("kill {pgid} {left}\n"));
        }
    }

    /// The group `pgid` of `alloc` ended: never kill it.
    pub fn forget(&self, alloc: AllocId, pgid: i32) {
        let mut inner = self.lock();
        if let Some((groups, _)) = inner.allocs.get_mut(&alloc) {
            groups.retain(|g| *g != pgid);
        }
        inner.send(&self.program, &format!("forget {pgid}\n"));
    }

    /// `alloc` may run `left` more (milliseconds, from now): its groups'
    /// deadlines move there.
    pub fn renew(&self, alloc: AllocId, left: u64) {
        let mut inner = self.lock();
        let (groups, deadline) = inner.allocs.entry(alloc).or_default();
        *deadline = Some((Instant::now(), left));
        let lines: String = groups.iter().map(|g| format!("kill {g} {left}\n")).collect();
        if !lines.is_empty() {
            inner.send(&self.program, &lines);
        }
    }

    /// `alloc` is gone from the agent.
    pub fn drop_alloc(&self, alloc: AllocId) {
        let mut inner = self.lock();
        let groups = inner.allocs.remove(&alloc);
        let lines: String = groups.into_iter().flat_map(|(g, _)| g).map(|g| format!("forget {g}\n")).collect();
        if !lines.is_empty() {
            inner.send(&self.program, &lines);
        }
    }
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fence")
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = inner.child.kill();
        let _ = inner.child.wait();
    }
}

/// One line of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Order {
    Kill { pgid: i32, after_ms: u64 },
    Forget { pgid: i32 },
}

impl Order {
    /// Reads one line; `None` for anything else (ignored).
    pub fn parse(line: &str) -> Option<Order> {
        let mut words = line.split_whitespace();
        let order = match (words.next()?, words.next()?.parse::<i32>().ok()?) {
            ("kill", pgid) => Order::Kill { pgid, after_ms: words.next()?.parse().ok()? },
            ("forget", pgid) => Order::Forget { pgid },
            _ => return None,
        };
        // Never a group id that means "every process" to kill(2).
        let pgid = match order {
            Order::Kill { pgid, .. } | Order::Forget { pgid } => pgid,
        };
        (pgid > 1 && words.next().is_none()).then_some(order)
    }
}

/// The deadlines the fence keeps (pure: time is an input).
#[derive(Debug, Default)]
pub struct Deadlines {
    by_group: HashMap<i32, Instant>,
}

impl Deadlines {
    pub fn apply(&mut self, order: Order, now: Instant) {
        match order {
            Order::Kill { pgid, after_ms } => {
                self.by_group.insert(pgid, now + Duration::from_millis(after_ms));
            }
            Order::Forget { pgid } => {
                self.by_group.remove(&pgid);
            }
        }
    }

    /// The groups whose deadline has passed at `now`, forgotten as they
    /// are returned.
    pub fn due(&mut self, now: Instant) -> Vec<i32> {
        let due: Vec<i32> = self.by_group.iter().filter(|(_, at)| **at <= now).map(|(g, _)| *g).collect();
        for g in &due {
            self.by_group.remove(g);
        }
        due
    }

    /// The next deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        self.by_group.values().min().copied()
    }
}

/// The fence process's loop (`hanse agent-fence`): reads orders from
/// `input` until it closes, and kills each group whose deadline passes.
pub fn run(input: impl BufRead + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel::<Option<Order>>();
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if let Some(order) = Order::parse(&line) {
                if tx.send(Some(order)).is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(None);
    });
    let mut deadlines = Deadlines::default();
    loop {
        let wait = deadlines.next().map_or(Duration::from_secs(1), |at| at.saturating_duration_since(Instant::now()));
        match rx.recv_timeout(wait) {
            Ok(Some(order)) => deadlines.apply(order, Instant::now()),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        for pgid in deadlines.due(Instant::now()) {
            // SAFETY: kill(2) with a negative id signals one process group;
            // `Order::parse` refuses ids that would mean more.
            let r = unsafe { libc::kill(-pgid, libc::SIGKILL) };
            if r == 0 {
                // Nowhere to tell if stderr is gone: never a panic for it.
                let _ = writeln!(
                    std::io::stderr(),
                    "hanse agent-fence: the agent did not renew the lease of process group {pgid}: killed it"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Deadlines, Order};

    #[test]
    fn orders_parse_and_refuse_what_kill_would_read_as_every_process() {
        assert_eq!(Order::parse("kill 1234 500"), Some(Order::Kill { pgid: 1234, after_ms: 500 }));
        assert_eq!(Order::parse("forget 1234"), Some(Order::Forget { pgid: 1234 }));
        for bad in ["kill 0 5", "kill -1 5", "kill 1 5", "kill 12 x", "kill 12", "forget", "stop 12", "kill 12 5 6"] {
            assert_eq!(Order::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_group_is_due_when_not_renewed_in_time_and_never_once_forgotten() {
        let t = Instant::now();
        let mut d = Deadlines::default();
        d.apply(Order::Kill { pgid: 10, after_ms: 100 }, t);
        d.apply(Order::Kill { pgid: 11, after_ms: 100 }, t);
        d.apply(Order::Kill { pgid: 10, after_ms: 100 }, t + Duration::from_millis(50));
        d.apply(Order::Forget { pgid: 11 }, t + Duration::from_millis(60));
        assert!(d.due(t + Duration::from_millis(149)).is_empty());
        assert_eq!(d.due(t + Duration::from_millis(150)), vec![10]);
        assert!(d.due(t + Duration::from_secs(9)).is_empty(), "killed once, then forgotten");
    }
}
