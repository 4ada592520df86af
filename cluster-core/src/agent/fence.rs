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

/// The agent's end: the fence process and the groups it watches.
pub struct Fence {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    allocs: Mutex<HashMap<AllocId, Watched>>,
}

/// One allocation's tasks' process groups, and how long it may run from
/// when it was last renewed (`None`: not yet renewed).
type Watched = (Vec<i32>, Option<(Instant, u64)>);

impl Fence {
    /// Starts `program agent-fence` (the `hanse` binary).
    pub fn start(program: &Path) -> std::io::Result<Fence> {
        let mut child = Command::new(program)
            .arg("agent-fence")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("the fence has no stdin"))?;
        Ok(Fence { child: Mutex::new(child), stdin: Mutex::new(stdin), allocs: Mutex::default() })
    }

    fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = stdin.write_all(line.as_bytes()) {
            tracing::error!("the fence process does not listen ({e}): frozen-agent protection is off");
        }
    }

    /// A task of `alloc` started as process group `pgid`: it is fenced by
    /// the allocation's current deadline at once.
    pub fn register(&self, alloc: AllocId, pgid: i32) {
        let mut allocs = self.allocs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (groups, deadline) = allocs.entry(alloc).or_default();
        groups.push(pgid);
        if let Some((at, ms)) = *deadline {
            let left = ms.saturating_sub(at.elapsed().as_millis() as u64);
            drop(allocs);
            self.send(&format!("kill {pgid} {left}\n"));
        }
    }

    /// The group `pgid` of `alloc` ended: never kill it.
    pub fn forget(&self, alloc: AllocId, pgid: i32) {
        let mut allocs = self.allocs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((groups, _)) = allocs.get_mut(&alloc) {
            groups.retain(|g| *g != pgid);
        }
        drop(allocs);
        self.send(&format!("forget {pgid}\n"));
    }

    /// `alloc` may run `left` more (milliseconds, from now): its groups'
    /// deadlines move there.
    pub fn renew(&self, alloc: AllocId, left: u64) {
        let mut allocs = self.allocs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (groups, deadline) = allocs.entry(alloc).or_default();
        *deadline = Some((Instant::now(), left));
        let lines: String = groups.iter().map(|g| format!("kill {g} {left}\n")).collect();
        drop(allocs);
        if !lines.is_empty() {
            self.send(&lines);
        }
    }

    /// `alloc` is gone from the agent.
    pub fn drop_alloc(&self, alloc: AllocId) {
        let groups = self.allocs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&alloc);
        let lines: String = groups.into_iter().flat_map(|(g, _)| g).map(|g| format!("forget {g}\n")).collect();
        if !lines.is_empty() {
            self.send(&lines);
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
        let mut child = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
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
                eprintln!("hanse agent-fence: the agent did not renew the lease of process group {pgid}: killed it");
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
