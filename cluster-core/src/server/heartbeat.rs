//! Node heartbeat timers, held in memory on the leader (pure: time is an
//! input, in milliseconds from any fixed start).
//!
//! Heartbeats never reach the Raft log; only a node going down (its TTL
//! and the grace period passed without a heartbeat) or coming back does.
//! A new leader knows no heartbeat times, so it gives every node a full
//! TTL and grace from the moment it took over.
//!
//! Between a node's expiry and the commit that marks it down, its
//! heartbeats are refused ([`Heartbeats::marking_down`]): an answer then
//! would renew the agent's lease while the cluster replaces its
//! at-most-once work, and both copies would run.

use std::collections::{HashMap, HashSet};

use crate::ids::NodeId;

#[derive(Debug)]
pub struct Heartbeats {
    /// A node is down once this many milliseconds pass without a heartbeat.
    pub ttl_ms: u64,
    pub grace_ms: u64,
    deadline: HashMap<NodeId, u64>,
    /// When each timed node was last heard from (or began to be timed).
    heard: HashMap<NodeId, u64>,
    /// Expired nodes whose marking down is not yet committed or failed.
    expiring: HashSet<NodeId>,
}

impl Heartbeats {
    pub fn new(ttl_ms: u64, grace_ms: u64) -> Heartbeats {
        Heartbeats { ttl_ms, grace_ms, deadline: HashMap::new(), heard: HashMap::new(), expiring: HashSet::new() }
    }

    /// Records a heartbeat; true if the node was not being timed.
    pub fn beat(&mut self, node: &NodeId, now_ms: u64) -> bool {
        let deadline = now_ms + self.ttl_ms + self.grace_ms;
        let heard = self.heard.entry(node.clone()).or_insert(now_ms);
        *heard = (*heard).max(now_ms);
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
        if !self.deadline.contains_key(node) && !self.expiring.contains(node) {
            self.beat(node, now_ms);
        }
    }

    /// Nodes whose deadline passed; they are no longer timed, and are
    /// [`Heartbeats::marking_down`] until [`Heartbeats::marked_down`] (or
    /// expire again after [`Heartbeats::retry_down_at`]).
    pub fn expired(&mut self, now_ms: u64) -> Vec<NodeId> {
        let mut gone: Vec<NodeId> =
            self.deadline.iter().filter(|(_, d)| **d <= now_ms).map(|(n, _)| n.clone()).collect();
        gone.sort();
        for n in &gone {
            self.deadline.remove(n);
            self.expiring.insert(n.clone());
        }
        gone
    }

    /// Milliseconds since `node` was last heard from (or began to be
    /// timed, by a new leader) at `now_ms`; 0 for a node never timed. A
    /// node is marked down only once this reaches TTL + grace: the log
    /// line that says so gives it, so an early-looking replacement can be
    /// told from a late heartbeat.
    pub fn silent_ms(&self, node: &NodeId, now_ms: u64) -> u64 {
        self.heard.get(node).map_or(0, |h| now_ms.saturating_sub(*h))
    }

    /// Proposes marking `node` down again at `at_ms` (a commit that failed
    /// may still apply): it expires again then, and its heartbeats stay
    /// refused meanwhile.
    pub fn retry_down_at(&mut self, node: &NodeId, at_ms: u64) {
        self.expiring.insert(node.clone());
        self.deadline.insert(node.clone(), at_ms);
    }

    /// Whether `node` expired and its marking down is in flight: its
    /// heartbeats must be refused, not answered.
    pub fn marking_down(&self, node: &NodeId) -> bool {
        self.expiring.contains(node)
    }

    /// The node's marking down is committed (or was not needed): its next
    /// heartbeat brings it back.
    pub fn marked_down(&mut self, node: &NodeId) {
        self.expiring.remove(node);
    }

    pub fn is_timed(&self, node: &NodeId) -> bool {
        self.deadline.contains_key(node)
    }

    pub fn forget(&mut self, node: &NodeId) {
        self.deadline.remove(node);
        self.heard.remove(node);
        self.expiring.remove(node);
    }

    pub fn clear(&mut self) {
        self.deadline.clear();
        self.heard.clear();
        self.expiring.clear();
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
        assert_eq!(h.silent_ms(&n, 2_600), 1_600, "last heard at 1 000");
        assert!(h.is_empty(), "an expired node is no longer timed");
        assert!(h.beat(&n, 3_000), "a node heard from again is timed anew");
    }

    #[test]
    fn an_expired_node_is_marking_down_until_committed_or_retried() {
        let mut h = Heartbeats::new(1_000, 500);
        let n = NodeId::new("n1");
        h.beat(&n, 0);
        assert_eq!(h.expired(1_500), vec![n.clone()]);
        assert!(h.marking_down(&n));
        h.beat_if_untimed(&n, 1_600);
        assert!(!h.is_timed(&n), "a sweep does not time a node being marked down");
        // A commit that failed may still apply: retried, still refused.
        h.retry_down_at(&n, 2_000);
        assert!(h.marking_down(&n), "heartbeats stay refused while the marking down is retried");
        assert_eq!(h.expired(2_000), vec![n.clone()]);
        h.marked_down(&n);
        assert!(!h.marking_down(&n) && !h.is_timed(&n));
    }
}
