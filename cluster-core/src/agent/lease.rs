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

#[cfg(test)]
mod tests {
    use super::Lease;

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
