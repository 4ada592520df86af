//! The fence: each task's deadline, held by its supervisor
//! ([`super::supervise`]), a process beside the agent that kills the task's
//! whole tree when the deadline passes, even if the agent itself cannot act.
//!
//! A frozen agent (SIGSTOP, a debugger, a stuck thread holding its loop) or
//! a dead one enforces nothing, while its tasks, separate processes, run on
//! and the servers replace them after TTL + grace. So the agent renews
//! every running task's deadline through this registry:
//! - at-most-once work (`on_disconnect = "stop"`) until its own lease would
//!   have stopped it (the last answer plus TTL + grace / 2), or its
//!   delegation's grant runs out;
//! - other work by the same lease while in contact, and, cut off, for a
//!   full TTL + grace / 2 from now on every tick: it runs on while the
//!   agent is alive, and dies with a dead agent's lease, before the
//!   servers place its replacement.
//!
//! It is the lease's hard edge: the agent still stops work gracefully
//! (SIGTERM, kill timeout) before it. Orders carry durations, never
//! instants, so the processes share no clock reading.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::supervise::{Control, Order};
use crate::ids::AllocId;

/// The supervisors of every running allocation's tasks, and each
/// allocation's last deadline. Every change and the orders it sends
/// happen under one lock.
#[derive(Debug, Default)]
pub struct Fence {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    allocs: HashMap<AllocId, Watched>,
    /// What a task of an allocation not yet renewed may run: the
    /// at-most-once bound as of the last renewal (milliseconds, at `.0`).
    first: Option<(Instant, u64)>,
}

#[derive(Debug, Default)]
struct Watched {
    tasks: Vec<Arc<Control>>,
    /// When it was last renewed, for how long (milliseconds).
    deadline: Option<(Instant, u64)>,
}

/// Milliseconds left of a renewal made at `at` for `ms`.
fn left_of(deadline: Option<(Instant, u64)>) -> Option<u64> {
    deadline.map(|(at, ms)| ms.saturating_sub(at.elapsed().as_millis() as u64))
}

impl Fence {
    pub fn new() -> Fence {
        Fence::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The deadline (milliseconds from now) a new task of `alloc` starts
    /// with: its allocation's, else the bound for at-most-once work, else
    /// `fallback`.
    pub fn left(&self, alloc: AllocId, fallback: u64) -> u64 {
        let inner = self.lock();
        let of_alloc = inner.allocs.get(&alloc).and_then(|w| left_of(w.deadline));
        of_alloc.or_else(|| left_of(inner.first)).unwrap_or(fallback)
    }

    /// What new work may run until its allocation is renewed: the
    /// at-most-once bound now (milliseconds).
    pub fn set_first(&self, ms: u64) {
        self.lock().first = Some((Instant::now(), ms));
    }

    /// A task of `alloc` runs under `control`: told the allocation's
    /// current deadline at once.
    pub fn register(&self, alloc: AllocId, control: Arc<Control>) {
        let mut inner = self.lock();
        let watched = inner.allocs.entry(alloc).or_default();
        if let Some(ms) = left_of(watched.deadline) {
            let _ = control.send(Order::Renew { ms });
        }
        watched.tasks.push(control);
    }

    /// The task under `control` ended: no more orders for it.
    pub fn forget(&self, alloc: AllocId, control: &Arc<Control>) {
        if let Some(w) = self.lock().allocs.get_mut(&alloc) {
            w.tasks.retain(|c| !Arc::ptr_eq(c, control));
        }
    }

    /// `alloc` may run `ms` more (milliseconds, from now).
    pub fn renew(&self, alloc: AllocId, ms: u64) {
        let mut inner = self.lock();
        let watched = inner.allocs.entry(alloc).or_default();
        watched.deadline = Some((Instant::now(), ms));
        for c in &watched.tasks {
            // Unwritten (a supervisor not reading): its deadline passes,
            // the safe direction.
            let _ = c.send(Order::Renew { ms });
        }
    }

    /// `alloc` is gone from the agent.
    pub fn drop_alloc(&self, alloc: AllocId) {
        self.lock().allocs.remove(&alloc);
    }
}
