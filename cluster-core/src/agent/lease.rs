//! An agent's lease with its servers (pure: durations in, decisions out),
//! shared by the agent and the simulator so that both stop at-most-once
//! work by the same rule.
//!
//! The servers mark a node down, and replace its work, once TTL + grace
//! have passed since its last heartbeat. The agent's lease runs from the
//! moment an answer arrived (later than the server's heartbeat time), so
//! stopping by TTL + grace / 2 after it leaves grace / 2 for the answer's
//! way back: the old instance ends before the new one starts.

/// The lease a server granted with its last answer, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ttl_ms: u64,
    pub grace_ms: u64,
}

impl Lease {
    /// In contact while the last answer is at most a TTL old.
    pub fn in_contact(&self, since_answer_ms: u64) -> bool {
        since_answer_ms <= self.ttl_ms
    }

    /// How long after the last answer at-most-once work (`on_disconnect =
    /// "stop"`) must have stopped, kill timeouts included.
    pub fn stop_within_ms(&self) -> u64 {
        self.ttl_ms + self.grace_ms / 2
    }
}

/// Grants from the target side of delegation v2: at-most-once work another
/// cluster delegated here runs only while its delegation's lease, which the
/// cluster's leader renews with the origin, covers it. Each heartbeat answer
/// carries, per delegation id, what is left of that lease; the agent adds
/// it to the moment it *sent* the heartbeat, so its deadline is never later
/// than the leader's (leases chained, as in Gray and Cheriton, "Leases",
/// 1989). Times are milliseconds on the caller's monotonic clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Per delegation id: (end of the grant, length of the last grant).
    until: std::collections::BTreeMap<String, (u64, u64)>,
}

impl Grants {
    /// Takes the grants of a heartbeat sent at `sent_ms`: (delegation id,
    /// milliseconds left), after forgetting those that ran out by then. A
    /// grant only ever moves later: a new leader that has not renewed yet
    /// answers 0, and the old leader's grant still bounds the work.
    pub fn update(&mut self, sent_ms: u64, grants: &[(String, u64)]) {
        self.forget_expired(sent_ms);
        for (id, left) in grants {
            let (until, granted) = self.until.entry(id.clone()).or_insert((0, 0));
            let end = sent_ms.saturating_add(*left);
            if end > *until {
                (*until, *granted) = (end, *left);
            }
        }
    }

    /// Whether work of delegation `id` may run at `now_ms`.
    pub fn holds(&self, id: &str, now_ms: u64) -> bool {
        self.until.get(id).is_some_and(|(u, _)| now_ms < *u)
    }

    /// Milliseconds left of the grant of `id` at `now_ms` (0: none).
    pub fn left(&self, id: &str, now_ms: u64) -> u64 {
        self.until.get(id).map_or(0, |(u, _)| u.saturating_sub(now_ms))
    }

    /// Whether the grant of `id` still holds but is past half its length:
    /// time to ask for a fresh one (a heartbeat now) rather than wait for
    /// the next regular one, which may come after it ends when the
    /// delegation's lease is short beside the heartbeat TTL.
    pub fn renew_due(&self, id: &str, now_ms: u64) -> bool {
        self.until.get(id).is_some_and(|(u, granted)| now_ms < *u && u - now_ms < granted / 2)
    }

    /// Forgets grants that ran out before `now_ms` and that no work needs.
    pub fn forget_expired(&mut self, now_ms: u64) {
        self.until.retain(|_, (u, _)| now_ms < *u);
    }
}

#[cfg(test)]
mod tests {
    use super::{Grants, Lease};

    #[test]
    fn a_grant_runs_from_the_heartbeat_sent_and_never_moves_sooner() {
        let mut g = Grants::default();
        assert!(!g.holds("d", 0), "no grant, no work");
        g.update(1_000, &[("d".into(), 5_000)]);
        assert!(g.holds("d", 5_999));
        assert!(!g.holds("d", 6_000));
        // A new leader that has not renewed answers 0: the old grant stands.
        g.update(2_000, &[("d".into(), 0)]);
        assert!(g.holds("d", 5_999));
        g.update(4_000, &[("d".into(), 5_000)]);
        assert!(g.holds("d", 8_999));
        // Past half its length, a grant asks to be renewed.
        assert!(!g.renew_due("d", 6_500));
        assert!(g.renew_due("d", 6_501));
        assert!(!g.renew_due("d", 9_000), "ended: nothing to renew");
        g.forget_expired(9_000);
        assert!(!g.holds("d", 9_000));
    }

    #[test]
    fn work_stops_before_the_servers_replace_it() {
        let lease = Lease { ttl_ms: 10_000, grace_ms: 10_000 };
        assert!(lease.in_contact(10_000));
        assert!(!lease.in_contact(10_001));
        // The servers replace at TTL + grace after their heartbeat time,
        // which is before the answer arrived: the margin is grace / 2.
        assert!(lease.stop_within_ms() + lease.grace_ms / 2 <= lease.ttl_ms + lease.grace_ms);
        assert_eq!(lease.stop_within_ms(), 15_000);
    }
}
