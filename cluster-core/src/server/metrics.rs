//! The server's metrics, in Prometheus text format at `/metrics`.
//!
//! Counters and histograms are updated where things happen; gauges of
//! Raft and the queue are read when scraped.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::raft::node::RaftStatus;

pub struct Metrics {
    registry: Registry,
    pub evals_processed: Counter,
    pub plans_applied: Counter,
    /// Plans superseded, or with placements the applier refused.
    pub plans_rejected: Counter,
    pub placements: Counter,
    pub placements_refused: Counter,
    pub writes_forwarded: Counter,
    pub heartbeats: Counter,
    pub nodes_down: Counter,
    /// Seconds to plan one evaluation.
    pub scheduler_seconds: Histogram,
    /// Seconds from handing a batch to a worker to its plans committed.
    pub batch_seconds: Histogram,
    term: Gauge,
    commit: Gauge,
    applied: Gauge,
    apply_lag: Gauge,
    leader: Gauge,
    evals_pending: Gauge,
    evals_blocked: Gauge,
    nodes: Gauge,
    allocs_live: Gauge,
    /// Text from other parts of the server (the federation's counters),
    /// in Prometheus text format, appended to every scrape.
    extra: std::sync::RwLock<Vec<Extra>>,
}

type Extra = Box<dyn Fn() -> String + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hanse");
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let evals_processed = counter(&mut registry, "evals_processed", "Evaluations planned by this server's workers");
        let plans_applied = counter(&mut registry, "plans_applied", "Plans committed in full");
        let plans_rejected =
            counter(&mut registry, "plans_rejected", "Plans superseded or partly refused by the plan applier");
        let placements = counter(&mut registry, "placements", "Allocations placed by committed plans");
        let placements_refused =
            counter(&mut registry, "placements_refused", "Placements the applier refused: the node filled up");
        let writes_forwarded =
            counter(&mut registry, "writes_forwarded", "Writes this follower forwarded to the leader");
        let heartbeats = counter(&mut registry, "node_heartbeats", "Node heartbeats received as leader");
        let nodes_down = counter(&mut registry, "nodes_down", "Nodes marked down after TTL and grace");
        let scheduler_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register("scheduler_seconds", "Time to plan one evaluation", scheduler_seconds.clone());
        let batch_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "plan_batch_seconds",
            "Time from a batch handed out to its plans committed",
            batch_seconds.clone(),
        );
        Metrics {
            evals_processed,
            plans_applied,
            plans_rejected,
            placements,
            placements_refused,
            writes_forwarded,
            heartbeats,
            nodes_down,
            scheduler_seconds,
            batch_seconds,
            term: gauge(&mut registry, "raft_term", "Raft term"),
            commit: gauge(&mut registry, "raft_commit_index", "Raft commit index"),
            applied: gauge(&mut registry, "raft_applied_index", "Raft applied index"),
            apply_lag: gauge(&mut registry, "raft_apply_lag", "Committed entries not yet applied"),
            leader: gauge(&mut registry, "raft_is_leader", "1 on the leader"),
            evals_pending: gauge(&mut registry, "evals_pending", "Evaluations waiting for a worker"),
            evals_blocked: gauge(&mut registry, "evals_blocked", "Evaluations waiting for capacity"),
            nodes: gauge(&mut registry, "nodes", "Nodes known to the cluster"),
            allocs_live: gauge(&mut registry, "allocations_live", "Allocations wanted and not finished"),
            extra: std::sync::RwLock::default(),
            registry,
        }
    }
}

/// Figures read from the state at scrape time.
pub struct Scraped {
    pub raft: RaftStatus,
    pub me: u64,
    pub pending: usize,
    pub blocked: usize,
    pub nodes: usize,
    pub allocs_live: usize,
}

impl Metrics {
    pub fn render(&self, s: &Scraped) -> String {
        self.term.set(s.raft.term as i64);
        self.commit.set(s.raft.commit as i64);
        self.applied.set(s.raft.applied as i64);
        self.apply_lag.set(s.raft.commit.saturating_sub(s.raft.applied) as i64);
        self.leader.set(i64::from(s.raft.leader == Some(s.me)));
        self.evals_pending.set(s.pending as i64);
        self.evals_blocked.set(s.blocked as i64);
        self.nodes.set(s.nodes as i64);
        self.allocs_live.set(s.allocs_live as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        // The extra text goes before the closing `# EOF`.
        let eof = out.strip_suffix("# EOF\n").is_some();
        if eof {
            out.truncate(out.len() - "# EOF\n".len());
        }
        for f in self.extra.read().expect("metrics lock").iter() {
            out.push_str(&f());
        }
        if eof {
            out.push_str("# EOF\n");
        }
        out
    }

    /// Adds text to every scrape (Prometheus text format, `hanse_` names).
    pub fn add_text(&self, f: impl Fn() -> String + Send + Sync + 'static) {
        self.extra.write().expect("metrics lock").push(Box::new(f));
    }
}
