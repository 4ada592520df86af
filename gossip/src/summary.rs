//! A cluster's capacity summary: what a peer needs to decide whether to
//! offer it work, small enough to gossip to hundreds of clusters.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use cluster_core::codec;
use cluster_core::model::{AllocStatus, Environment, ExecutionModel};
use cluster_core::resources::Resources;
use cluster_core::state::ClusterState;
use serde::{Deserialize, Serialize};

/// The most bytes an encoded summary may take (before base64). chitchat
/// carries a member's whole state in 65,507-byte datagrams; a few KB per
/// cluster leaves room for hundreds of clusters in one delta.
pub const SUMMARY_BYTES_MAX: usize = 4096;
/// Bounds that keep any summary under [`SUMMARY_BYTES_MAX`]; the largest
/// classes (by node count) are kept, the rest folded into `other`.
pub const SUMMARY_CLASSES_MAX: usize = 24;
pub const SUMMARY_GPU_MODELS_MAX: usize = 8;
pub const SUMMARY_TAGS_MAX: usize = 16;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Shapes (cpu millicores, memory bytes) whose placeable counts a summary
/// carries: a histogram of what single nodes can still fit, so a peer with
/// 40% free but fragmented capacity is not offered a 20-cpu instance.
pub const PROBE_SHAPES: [(u64, u64); 8] = [
    (250, 512 * MIB),
    (500, GIB),
    (1_000, 2 * GIB),
    (2_000, 4 * GIB),
    (4_000, 8 * GIB),
    (8_000, 32 * GIB),
    (16_000, 64 * GIB),
    (32_000, 128 * GIB),
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub cluster: String,
    pub region: String,
    /// The Raft term of the leader that made it; an older term never wins.
    pub term: u64,
    /// Unix milliseconds at generation, as the leader saw it.
    pub generated_at_ms: u64,
    pub nodes_ready: u32,
    pub nodes_down: u32,
    pub jurisdictions: Vec<String>,
    pub environments: Vec<Environment>,
    pub execution_models: Vec<ExecutionModel>,
    pub classes: Vec<ClassCapacity>,
    pub gpus: Vec<GpuCapacity>,
    /// Parallel to [`PROBE_SHAPES`]: instances of each shape that fit.
    pub shapes: Vec<u32>,
    pub running_allocs: u64,
    pub pending_allocs: u64,
    /// The share of the cluster's cpu that other clusters' work takes
    /// (set by the federation; 0 without one).
    pub inbound_share: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassCapacity {
    pub class: String,
    pub nodes: u32,
    pub total: Resources,
    pub free: Resources,
    /// Mean price of one core for an hour on this class.
    pub price_per_cpu_hour: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuCapacity {
    pub model: String,
    pub total: u32,
    pub free: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error("summary is {0} bytes; the limit is {SUMMARY_BYTES_MAX}")]
    TooLarge(usize),
    #[error("summary is not valid base64")]
    Base64,
    #[error("summary does not decode: {0}")]
    Codec(#[from] codec::CodecError),
}

impl ClusterSummary {
    /// Summarises `state` as the leader of `cluster` sees it at `now_ms`.
    pub fn build(
        cluster: &str,
        region: &str,
        term: u64,
        now_ms: u64,
        jurisdictions: &[String],
        state: &ClusterState,
    ) -> ClusterSummary {
        let mut classes: BTreeMap<&str, (ClassCapacity, f64)> = BTreeMap::new();
        let mut gpus: BTreeMap<&str, GpuCapacity> = BTreeMap::new();
        let mut shapes = vec![0u64; PROBE_SHAPES.len()];
        let (mut ready, mut down) = (0u32, 0u32);
        let mut environments = Vec::new();
        let mut execution_models = Vec::new();
        for (i, node) in state.nodes().iter().enumerate() {
            let idx = cluster_core::ids::NodeIdx(i as u32);
            if !state.is_schedulable(idx) {
                down += 1;
                continue;
            }
            ready += 1;
            let usage = state.usage(idx);
            let free = node.capacity.saturating_sub(usage.res);
            let entry = classes.entry(&node.class).or_insert_with(|| {
                (
                    ClassCapacity {
                        class: node.class.to_string(),
                        nodes: 0,
                        total: Resources::default(),
                        free: Resources::default(),
                        price_per_cpu_hour: 0.0,
                    },
                    0.0,
                )
            });
            entry.0.nodes += 1;
            entry.0.total = entry.0.total.saturating_add(node.capacity);
            entry.0.free = entry.0.free.saturating_add(free);
            entry.1 += node.cost_per_cpu_hour();
            for (d, dev) in node.gpus.iter().enumerate() {
                let g = gpus.entry(&dev.model).or_insert_with(|| GpuCapacity {
                    model: dev.model.to_string(),
                    total: 0,
                    free: 0,
                });
                g.total += dev.count;
                g.free += dev.count.saturating_sub(usage.gpus[d]);
            }
            for (slot, (cpu, mem)) in shapes.iter_mut().zip(PROBE_SHAPES) {
                *slot += (free.cpu_millis / cpu).min(free.memory_bytes / mem);
            }
            if !environments.contains(&node.environment) {
                environments.push(node.environment);
            }
            if !execution_models.contains(&node.execution_model) {
                execution_models.push(node.execution_model);
            }
        }
        let mut classes: Vec<ClassCapacity> = classes
            .into_values()
            .map(|(mut c, price_sum)| {
                c.price_per_cpu_hour = price_sum / f64::from(c.nodes.max(1));
                c
            })
            .collect();
        if classes.len() > SUMMARY_CLASSES_MAX {
            classes.sort_by(|a, b| b.nodes.cmp(&a.nodes).then_with(|| a.class.cmp(&b.class)));
            let rest = classes.split_off(SUMMARY_CLASSES_MAX - 1);
            let mut other = ClassCapacity {
                class: "other".into(),
                nodes: 0,
                total: Resources::default(),
                free: Resources::default(),
                price_per_cpu_hour: 0.0,
            };
            for c in rest {
                other.price_per_cpu_hour += c.price_per_cpu_hour * f64::from(c.nodes);
                other.nodes += c.nodes;
                other.total = other.total.saturating_add(c.total);
                other.free = other.free.saturating_add(c.free);
            }
            other.price_per_cpu_hour /= f64::from(other.nodes.max(1));
            classes.push(other);
        }
        let (mut running, mut pending) = (0, 0);
        for a in state.allocs().filter(|a| a.is_live()) {
            match a.status {
                AllocStatus::Running => running += 1,
                _ => pending += 1,
            }
        }
        environments.sort();
        execution_models.sort();
        ClusterSummary {
            cluster: cluster.to_string(),
            region: region.to_string(),
            term,
            generated_at_ms: now_ms,
            nodes_ready: ready,
            nodes_down: down,
            jurisdictions: jurisdictions.iter().take(SUMMARY_TAGS_MAX).cloned().collect(),
            environments,
            execution_models,
            classes,
            gpus: gpus.into_values().take(SUMMARY_GPU_MODELS_MAX).collect(),
            shapes: shapes.into_iter().map(|n| n.min(u64::from(u32::MAX)) as u32).collect(),
            running_allocs: running,
            pending_allocs: pending,
            inbound_share: 0.0,
        }
    }

    /// The summary as a gossip value: codec bytes (with version byte) in base64.
    pub fn encode(&self) -> Result<String, SummaryError> {
        let bytes = codec::encode(self);
        if bytes.len() > SUMMARY_BYTES_MAX {
            return Err(SummaryError::TooLarge(bytes.len()));
        }
        Ok(STANDARD_NO_PAD.encode(bytes))
    }

    pub fn decode(text: &str) -> Result<ClusterSummary, SummaryError> {
        // base64 is 4/3 of the bytes: refuse oversized text before decoding it.
        if text.len() > SUMMARY_BYTES_MAX * 4 / 3 + 4 {
            return Err(SummaryError::TooLarge(text.len() * 3 / 4));
        }
        let bytes = STANDARD_NO_PAD.decode(text).map_err(|_| SummaryError::Base64)?;
        Ok(codec::decode(&bytes, SUMMARY_BYTES_MAX)?)
    }

    /// Whether this summary should replace `other`: a newer term always
    /// does, and within a term a later generation does.
    pub fn supersedes(&self, other: &ClusterSummary) -> bool {
        (self.term, self.generated_at_ms) > (other.term, other.generated_at_ms)
    }

    pub fn healthy(&self) -> bool {
        self.nodes_ready > 0
    }

    pub fn total(&self) -> Resources {
        self.classes.iter().fold(Resources::default(), |acc, c| acc.saturating_add(c.total))
    }

    pub fn free(&self) -> Resources {
        self.classes.iter().fold(Resources::default(), |acc, c| acc.saturating_add(c.free))
    }

    /// Saturating: the numbers come from peers.
    pub fn free_gpus(&self) -> u32 {
        self.gpus.iter().fold(0u32, |acc, g| acc.saturating_add(g.free))
    }

    /// How many instances of (`cpu_millis`, `memory_bytes`) this cluster can
    /// likely fit, from the smallest probe shape that covers the ask. An ask
    /// larger than every probe shape counts single nodes with that much free
    /// only through the largest shape, so it may be underestimated, never
    /// over.
    pub fn placeable(&self, cpu_millis: u64, memory_bytes: u64) -> u32 {
        PROBE_SHAPES
            .iter()
            .zip(&self.shapes)
            .find(|((cpu, mem), _)| *cpu >= cpu_millis && *mem >= memory_bytes)
            .map_or(0, |(_, n)| *n)
    }

    /// Whether this differs from `last` enough to be worth republishing:
    /// membership, health, term or tags changed, or any class's free cpu or
    /// memory, or any GPU model's free count, moved by more than `threshold`
    /// (a share of that class's total), or the pending count moved by more
    /// than `threshold` of the running count (at least one).
    pub fn differs_beyond(&self, last: &ClusterSummary, threshold: f64) -> bool {
        if self.term != last.term
            || self.nodes_ready != last.nodes_ready
            || self.nodes_down != last.nodes_down
            || self.jurisdictions != last.jurisdictions
            || self.environments != last.environments
            || self.execution_models != last.execution_models
            || self.classes.len() != last.classes.len()
            || self.gpus.len() != last.gpus.len()
        {
            return true;
        }
        let moved = |a: u64, b: u64, total: u64| a.abs_diff(b) as f64 > threshold * total as f64;
        let classes = self.classes.iter().zip(&last.classes).any(|(a, b)| {
            a.class != b.class
                || moved(a.free.cpu_millis, b.free.cpu_millis, a.total.cpu_millis)
                || moved(a.free.memory_bytes, b.free.memory_bytes, a.total.memory_bytes)
        });
        let gpus = self
            .gpus
            .iter()
            .zip(&last.gpus)
            .any(|(a, b)| a.model != b.model || moved(a.free.into(), b.free.into(), a.total.into()));
        let pending = self.pending_allocs.abs_diff(last.pending_allocs) as f64
            > (threshold * self.running_allocs as f64).max(0.5);
        classes || gpus || pending
    }
}

/// Decides when a leader republishes: at most once per `interval_ms`, and
/// only when the summary moved beyond `threshold` since the last one
/// published. Pure: time is an input.
#[derive(Debug)]
pub struct Publisher {
    interval_ms: u64,
    threshold: f64,
    last: Option<(ClusterSummary, u64)>,
}

/// At most one summary a second, as the design asks.
pub const PUBLISH_INTERVAL_MS: u64 = 1_000;
/// Changes below 5% of a class's capacity are not worth a gossip round.
pub const PUBLISH_THRESHOLD: f64 = 0.05;

impl Default for Publisher {
    fn default() -> Self {
        Publisher::new(PUBLISH_INTERVAL_MS, PUBLISH_THRESHOLD)
    }
}

impl Publisher {
    pub fn new(interval_ms: u64, threshold: f64) -> Self {
        Publisher { interval_ms, threshold, last: None }
    }

    /// Whether `summary` should be published now. A clock that stepped
    /// back counts as no time passed, and is not a reason to wait for it.
    pub fn due(&self, summary: &ClusterSummary, now_ms: u64) -> bool {
        match &self.last {
            None => true,
            Some((last, at)) => {
                let elapsed = now_ms.saturating_sub(*at);
                (elapsed >= self.interval_ms || now_ms < *at) && summary.differs_beyond(last, self.threshold)
            }
        }
    }

    /// Notes that `summary` went out at `now_ms`; call it only once it has.
    pub fn record(&mut self, summary: ClusterSummary, now_ms: u64) {
        self.last = Some((summary, now_ms));
    }

    /// [`Publisher::due`] and [`Publisher::record`] together.
    pub fn offer(&mut self, summary: ClusterSummary, now_ms: u64) -> Option<ClusterSummary> {
        if !self.due(&summary, now_ms) {
            return None;
        }
        self.record(summary.clone(), now_ms);
        Some(summary)
    }

    /// Forget the last publication (after losing leadership), so the next
    /// leader term publishes at once.
    pub fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_core::diag::SourceFile;
    use cluster_core::spec::parse_fleet;

    fn state() -> ClusterState {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/fleets/eu-west.toml")).unwrap();
        let nodes = parse_fleet(&SourceFile::new("eu-west.toml", text)).value.unwrap().nodes;
        ClusterState::with_nodes(nodes).unwrap()
    }

    fn summary() -> ClusterSummary {
        ClusterSummary::build("eu-west", "eu-west-1", 3, 1_000, &["eu".into(), "gdpr".into()], &state())
    }

    #[test]
    fn summarises_the_example_fleet() {
        let s = summary();
        assert_eq!(s.nodes_ready, 540);
        assert_eq!(s.classes.len(), 7);
        assert_eq!(
            s.gpus.iter().map(|g| (g.model.as_str(), g.total)).collect::<Vec<_>>(),
            vec![("nvidia-a100", 128), ("nvidia-l4", 48)]
        );
        assert_eq!(s.free(), s.total(), "nothing runs yet");
        assert!(s.environments.contains(&Environment::Edge));
        // An edge node (4 cpu, 2 GiB) fits one 1cpu/2GiB shape and no 2cpu/4GiB one.
        assert!(s.placeable(1_000, 2 * GIB) > s.placeable(2_000, 4 * GIB));
        assert_eq!(s.placeable(64_000, GIB), 0, "no probe shape covers 64 cpus");
    }

    #[test]
    fn encodes_small_and_round_trips() {
        let s = summary();
        let text = s.encode().unwrap();
        assert!(text.len() < SUMMARY_BYTES_MAX, "{} bytes", text.len());
        assert_eq!(ClusterSummary::decode(&text).unwrap(), s);
        assert_eq!(ClusterSummary::decode("!!!"), Err(SummaryError::Base64));
        assert!(ClusterSummary::decode(&"A".repeat(SUMMARY_BYTES_MAX * 2)).is_err());
    }

    #[test]
    fn many_classes_fold_into_other_and_stay_under_the_limit() {
        let mut text = String::from("[fleet]\nname = \"big\"\n");
        for i in 0..200 {
            text.push_str(&format!("[[class]]\nname = \"class-with-a-long-name-{i:04}\"\ncount = {}\ncpu = 8\nmemory = \"32GiB\"\ngpus = {{ model = \"gpu-model-{}\", count = 2 }}\n", 1 + i % 7, i % 20));
        }
        let nodes = parse_fleet(&SourceFile::new("big.toml", text)).value.unwrap().nodes;
        let state = ClusterState::with_nodes(nodes).unwrap();
        let s = ClusterSummary::build("big", "r", 1, 0, &[], &state);
        assert_eq!(s.classes.len(), SUMMARY_CLASSES_MAX);
        assert_eq!(s.classes.iter().map(|c| c.nodes).sum::<u32>(), s.nodes_ready, "no node lost in folding");
        assert!(s.encode().is_ok());
    }

    #[test]
    fn an_older_term_never_supersedes() {
        let new = summary();
        let mut old = new.clone();
        old.term = 2;
        old.generated_at_ms = 9_999;
        assert!(new.supersedes(&old));
        assert!(!old.supersedes(&new));
    }

    #[test]
    fn publisher_limits_rate_and_skips_small_changes() {
        let mut p = Publisher::default();
        let s = summary();
        assert!(p.offer(s.clone(), 0).is_some(), "the first is always published");
        let mut busy = s.clone();
        let c = &mut busy.classes[0];
        c.free.cpu_millis -= c.total.cpu_millis / 2;
        assert!(p.offer(busy.clone(), 500).is_none(), "at most once a second");
        assert!(p.offer(s.clone(), 1_500).is_none(), "unchanged");
        let mut tiny = s.clone();
        tiny.classes[0].free.cpu_millis -= 1;
        assert!(p.offer(tiny, 1_600).is_none(), "below the threshold");
        assert!(p.offer(busy, 1_700).is_some());
        p.reset();
        assert!(p.offer(s, 1_800).is_some(), "a new leader publishes at once");
    }
}
