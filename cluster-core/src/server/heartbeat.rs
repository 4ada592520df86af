//! Node heartbeat timers, held in memory on the leader (pure: time is an
//! input, in milliseconds from any fixed start).
//!
//! Heartbeats never reach the Raft log; only a node going down (its TTL
//! and the grace period passed without a heartbeat) or coming back does.
//! A new leader knows no heartbeat times, so it gives every node a full
//! TTL and grace from the moment it took over.

use std::collections::HashMap;

use crate::ids::NodeId;

#[derive(Debug)]
pub struct Heartbeats {
    /// A node is down once this many milliseconds pass without a heartbeat.
    pub ttl_ms: u64,
    pub grace_ms: u64,
    deadline: HashMap<NodeId, u64>,
}

impl Heartbeats {
    pub fn new(ttl_ms: u64, grace_ms: u64) -> Heartbeats {
        Heartbeats { ttl_ms, grace_ms, deadline: HashMap::new() }
    }

    /// Records a heartbeat; true if the node was not being timed.
    pub fn beat(&mut self, node: &NodeId, now_ms: u64) -> bool {
        let deadline = now_ms + self.ttl_ms + self.grace_ms;
        match self.deadline.get_mut(node) {
            Some(d) => {
                *d = (*d).max(deadline);
                false
            }
            None => {
                self.deadline.insert(node.clone(), deadline);
                true
            }
        }
    }

    /// Starts timing a node not yet timed (one a new leader finds ready in
    /// the state but has not heard from).
    pub fn beat_if_untimed(&mut self, node: &NodeId, now_ms: u64) {
        if !self.deadline.contains_key(node) {
            self.beat(node, now_ms);
        }
    }

    /// Times a node to expire at `at_ms` (to try marking it down again).
    pub fn expire_at(&mut self, node: &NodeId, at_ms: u64) {
        self.deadline.insert(node.clone(), at_ms);
    }

    /// Nodes whose deadline passed; they are no longer timed.
    pub fn expired(&mut self, now_ms: u64) -> Vec<NodeId> {
        let mut gone: Vec<NodeId> =
            self.deadline.iter().filter(|(_, d)| **d <= now_ms).map(|(n, _)| n.clone()).collect();
        gone.sort();
        for n in &gone {
            self.deadline.remove(n);
        }
        gone
    }

    pub fn is_timed(&self, node: &NodeId) -> bool {
        self.deadline.contains_key(node)
    }

    pub fn forget(&mut self, node: &NodeId) {
        self.deadline.remove(node);
    }

    pub fn clear(&mut self) {
        self.deadline.clear();
    }

    pub fn len(&self) -> usize {
        self.deadline.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadline.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_expires_after_ttl_and_grace_and_not_before() {
        let mut h = Heartbeats::new(1_000, 500);
        let n = NodeId::new("n1");
        assert!(h.beat(&n, 0));
        assert!(h.expired(1_499).is_empty());
        assert!(!h.beat(&n, 1_000));
        assert!(h.expired(2_499).is_empty());
        assert_eq!(h.expired(2_500), vec![n.clone()]);
        assert!(h.is_empty(), "an expired node is no longer timed");
        assert!(h.beat(&n, 3_000), "a node heard from again is timed anew");
    }
}
