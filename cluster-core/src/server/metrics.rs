//! The server's metrics, in OpenMetrics text at `/metrics`, all through one
//! `prometheus-client` registry.
//!
//! Counters and histograms are updated where things happen; gauges of
//! Raft and the queue are read when scraped. Other parts of the server
//! (the federation, gossip) register a [`Collector`] that reads their own
//! counters at each scrape ([`Metrics::add_collector`], [`counters`]).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::raft::node::RaftStatus;

pub struct Metrics {
    registry: std::sync::RwLock<Registry>,
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
}

/// The content type of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
            registry: std::sync::RwLock::new(registry),
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
        encode(&mut out, &self.registry.read().expect("metrics lock")).expect("writing to a String cannot fail");
        out
    }

    /// Registers `collector`: it encodes its own metrics (`hanse_` is
    /// prefixed) at every scrape.
    pub fn add_collector(&self, collector: impl Collector) {
        self.registry.write().expect("metrics lock").register_collector(Box::new(collector));
    }
}

/// A metric a [`counters`] collector reads at scrape time: a counter or a
/// gauge, with or without labels.
pub enum Reading {
    Counter {
        name: &'static str,
        help: &'static str,
        value: u64,
    },
    Gauge {
        name: &'static str,
        help: &'static str,
        value: i64,
    },
    /// One counter family: a value per label set.
    Labelled {
        name: &'static str,
        help: &'static str,
        values: Vec<(Vec<(String, String)>, u64)>,
    },
}

/// A collector from a function that reads the figures at each scrape
/// (returning nothing once what it reads is gone).
pub fn counters(read: impl Fn() -> Vec<Reading> + Send + Sync + 'static) -> impl Collector {
    ReadingCollector(Box::new(read))
}

/// `text` with every character but letters, digits, `_`, `-`, `.` and `:`
/// replaced by `_`.
fn plain(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':') { c } else { '_' })
        .collect()
}

struct ReadingCollector(Box<dyn Fn() -> Vec<Reading> + Send + Sync>);

impl std::fmt::Debug for ReadingCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadingCollector")
    }
}

impl Collector for ReadingCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for reading in (self.0)() {
            match reading {
                Reading::Counter { name, help, value } => {
                    let c = ConstCounter::new(value);
                    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
                }
                Reading::Gauge { name, help, value } => {
                    let g = ConstGauge::new(value);
                    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
                }
                Reading::Labelled { name, help, values } => {
                    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                    for (labels, value) in values {
                        // The library writes label values as they are: keep
                        // to characters that need no escaping.
                        let labels: Vec<(String, String)> = labels.into_iter().map(|(k, v)| (k, plain(&v))).collect();
                        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_are_encoded_with_the_registrys_prefix_in_openmetrics() {
        let m = Metrics::default();
        m.add_collector(counters(|| {
            vec![
                Reading::Counter { name: "things", help: "Things", value: 3 },
                Reading::Gauge { name: "level", help: "A level", value: -2 },
                Reading::Labelled {
                    name: "refusals",
                    help: "Refusals by reason",
                    values: vec![
                        (vec![("reason".into(), "full".into())], 5),
                        (vec![("reason".into(), "a\"b\nc".into())], 1),
                    ],
                },
            ]
        }));
        let scraped = Scraped { raft: RaftStatus::default(), me: 1, pending: 0, blocked: 0, nodes: 0, allocs_live: 0 };
        let text = m.render(&scraped);
        for line in
            ["hanse_things_total 3", "hanse_level -2", "hanse_refusals_total{reason=\"full\"} 5", "hanse_raft_term 0"]
        {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
