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
/// Jurisdiction tags a summary carries (a cluster's configuration is
/// checked against it, so none is dropped in practice).
pub const SUMMARY_TAGS_MAX: usize = 16;
/// Bytes of a class name a summary keeps; longer names are cut (on a
/// character boundary) and end in `~`, once whole names do not fit.
pub const CLASS_NAME_MAX: usize = 32;
/// Bytes the incarnation and version, set after [`ClusterSummary::fit`],
/// may add to an encoding (two varints of up to 9 bytes each, in place of
/// one-byte zeros): `fit` leaves room for them.
pub const STAMP_BYTES_MAX: usize = 16;
/// The name of the class that stands for the classes folded together.
pub const OTHER_CLASS: &str = "other";

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

/// A cluster's capacity summary, as its leader gossips it.
///
/// Summaries of one cluster are ordered by (`incarnation`, `term`,
/// `version`) (see [`ClusterSummary::supersedes`]), never by a clock.
/// Totals per resource are exact whatever the fleet; detail (classes, GPU
/// models, class names) may be folded to fit [`SUMMARY_BYTES_MAX`], and
/// [`ClusterSummary::folded`] says what was.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub cluster: String,
    pub region: String,
    /// Which life of the cluster made it: a cluster rebuilt on empty disks
    /// starts its Raft terms again, and takes an incarnation above the one
    /// its old summaries carry so that its own win (as SWIM's members
    /// refute a suspicion with a higher incarnation).
    pub incarnation: u64,
    /// The Raft term of the leader that made it; an older term never wins.
    pub term: u64,
    /// Counts the leader's publications within its term, from 1.
    pub version: u64,
    /// Unix milliseconds at generation, as the leader saw it: shown, never
    /// compared (clocks differ).
    pub generated_at_ms: u64,
    pub nodes_ready: u32,
    pub nodes_down: u32,
    pub jurisdictions: Vec<String>,
    pub environments: Vec<Environment>,
    pub execution_models: Vec<ExecutionModel>,
    pub classes: Vec<ClassCapacity>,
    pub gpus: Vec<GpuCapacity>,
    /// The GPUs of models folded out of `gpus` to fit the byte bound
    /// (`model` is empty): any of them may be of a model a job asks for.
    pub other_gpus: GpuCapacity,
    /// What was folded to fit the byte bound; all zero when nothing was.
    pub folded: Folded,
    /// Parallel to [`PROBE_SHAPES`]: instances of each shape that fit.
    pub shapes: Vec<u32>,
    pub running_allocs: u64,
    pub pending_allocs: u64,
    /// The share of the cluster's cpu that other clusters' work takes
    /// (set by the federation; 0 without one).
    pub inbound_share: f64,
}

/// What [`ClusterSummary::fit`] left out to stay under
/// [`SUMMARY_BYTES_MAX`]: totals stay exact, only detail goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folded {
    /// Classes merged into the [`OTHER_CLASS`] class.
    pub classes: u32,
    /// GPU models merged into [`ClusterSummary::other_gpus`].
    pub gpu_models: u32,
    /// Class names cut to [`CLASS_NAME_MAX`] bytes.
    pub names_cut: u32,
}

impl Folded {
    pub fn any(&self) -> bool {
        *self != Folded::default()
    }
}

impl std::fmt::Display for Folded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.classes > 0 {
            parts.push(format!("{} classes folded into `{OTHER_CLASS}`", self.classes));
        }
        if self.gpu_models > 0 {
            parts.push(format!("{} GPU models folded into other GPUs", self.gpu_models));
        }
        if self.names_cut > 0 {
            parts.push(format!("{} class names cut to {CLASS_NAME_MAX} bytes", self.names_cut));
        }
        if parts.is_empty() { f.write_str("whole") } else { f.write_str(&parts.join(", ")) }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassCapacity {
    pub class: String,
    pub nodes: u32,
    pub total: Resources,
    pub free: Resources,
    /// Mean price of one core for an hour on this class.
    pub price_per_cpu_hour: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
        let classes: Vec<ClassCapacity> = classes
            .into_values()
            .map(|(mut c, price_sum)| {
                c.price_per_cpu_hour = price_sum / f64::from(c.nodes.max(1));
                c
            })
            .collect();
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
            incarnation: 0,
            term,
            version: 0,
            generated_at_ms: now_ms,
            nodes_ready: ready,
            nodes_down: down,
            jurisdictions: jurisdictions.iter().take(SUMMARY_TAGS_MAX).cloned().collect(),
            environments,
            execution_models,
            classes,
            gpus: gpus.into_values().collect(),
            other_gpus: GpuCapacity::default(),
            folded: Folded::default(),
            shapes: shapes.into_iter().map(|n| n.min(u64::from(u32::MAX)) as u32).collect(),
            running_allocs: running,
            pending_allocs: pending,
            inbound_share: 0.0,
        }
        .fit()
    }

    /// This summary, with detail folded until it encodes in at most
    /// [`SUMMARY_BYTES_MAX`] bytes: first class names are cut to
    /// [`CLASS_NAME_MAX`] bytes, then the smallest classes (by node count)
    /// merge into [`OTHER_CLASS`], then the GPU models with the fewest
    /// GPUs merge into [`ClusterSummary::other_gpus`]. Node, cpu, memory
    /// and GPU totals stay exact; [`ClusterSummary::folded`] counts what
    /// went. Always fits, with [`STAMP_BYTES_MAX`] to spare for the
    /// stamps set after: the cluster, region and jurisdictions are labels
    /// of at most 63 bytes (the server's configuration is checked) and at
    /// most [`SUMMARY_TAGS_MAX`] tags are kept, so a summary of one class
    /// and no named GPU model is under a quarter of the bound.
    pub fn fit(mut self) -> ClusterSummary {
        let size = |s: &ClusterSummary| codec::encode(s).len() + STAMP_BYTES_MAX;
        if size(&self) <= SUMMARY_BYTES_MAX {
            return self;
        }
        for c in &mut self.classes {
            if c.class.len() > CLASS_NAME_MAX {
                let mut end = CLASS_NAME_MAX - 1;
                while !c.class.is_char_boundary(end) {
                    end -= 1;
                }
                c.class.truncate(end);
                c.class.push('~');
                self.folded.names_cut += 1;
            }
        }
        // Largest first; the folded ones leave from the end, half of what
        // is left each time, so a fleet of thousands of classes takes a
        // dozen encodings.
        self.classes.sort_by(|a, b| b.nodes.cmp(&a.nodes).then_with(|| a.class.cmp(&b.class)));
        let mut other: Option<ClassCapacity> = None;
        while size(&self) > SUMMARY_BYTES_MAX && !self.classes.is_empty() {
            if let Some(o) = &other {
                // Put back below: measured with `other` in place, as sent.
                debug_assert_eq!(self.classes.last().map(|c| &c.class), Some(&o.class));
                self.classes.pop();
            }
            let keep = self.classes.len() / 2;
            let folded = self.classes.split_off(keep);
            let o = other.get_or_insert_with(|| ClassCapacity { class: OTHER_CLASS.into(), ..Default::default() });
            let mut price = o.price_per_cpu_hour * f64::from(o.nodes);
            for c in folded {
                price += c.price_per_cpu_hour * f64::from(c.nodes);
                o.nodes += c.nodes;
                o.total = o.total.saturating_add(c.total);
                o.free = o.free.saturating_add(c.free);
                self.folded.classes += 1;
            }
            o.price_per_cpu_hour = price / f64::from(o.nodes.max(1));
            self.classes.push(o.clone());
            if self.classes.len() == 1 {
                break;
            }
        }
        self.gpus.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.model.cmp(&b.model)));
        while size(&self) > SUMMARY_BYTES_MAX && !self.gpus.is_empty() {
            let keep = self.gpus.len() / 2;
            for g in self.gpus.split_off(keep) {
                self.other_gpus.total = self.other_gpus.total.saturating_add(g.total);
                self.other_gpus.free = self.other_gpus.free.saturating_add(g.free);
                self.folded.gpu_models += 1;
            }
        }
        self.gpus.sort_by(|a, b| a.model.cmp(&b.model));
        self
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

    /// Where this summary stands among its cluster's: (incarnation, term,
    /// version). No clock is in it.
    pub fn order(&self) -> (u64, u64, u64) {
        (self.incarnation, self.term, self.version)
    }

    /// Whether this summary should replace `other`: a later incarnation
    /// always does, then a newer term, then a later version within the
    /// term (one leader per term counts its publications). Clocks play no
    /// part: a leader whose clock is hours off still orders right.
    pub fn supersedes(&self, other: &ClusterSummary) -> bool {
        self.order() > other.order()
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
        self.gpus.iter().fold(self.other_gpus.free, |acc, g| acc.saturating_add(g.free))
    }

    /// Free GPUs that may be of `model`: those named so, and, when models
    /// were folded to fit the bound, every folded one (an upper bound: the
    /// peer's own scheduler decides). So a cluster that has the model free
    /// is never judged to have none.
    pub fn free_gpus_of(&self, model: &str) -> u32 {
        let named = self.gpus.iter().filter(|g| g.model == model).fold(0u32, |acc, g| acc.saturating_add(g.free));
        if self.folded.gpu_models > 0 { named.saturating_add(self.other_gpus.free) } else { named }
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
            || self.incarnation != last.incarnation
            || self.folded != last.folded
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
            .any(|(a, b)| a.model != b.model || moved(a.free.into(), b.free.into(), a.total.into()))
            || moved(self.other_gpus.free.into(), last.other_gpus.free.into(), self.other_gpus.total.into());
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
    /// The term and version of the last publication, kept across
    /// [`Publisher::reset`]: versions only grow within a term.
    stamped: (u64, u64),
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
        Publisher { interval_ms, threshold, last: None, stamped: (0, 0) }
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

    /// `summary` with the version it goes out with: one more than the
    /// last of its term, or 1 in a new term.
    pub fn stamp(&self, mut summary: ClusterSummary) -> ClusterSummary {
        let (term, version) = self.stamped;
        summary.version = if summary.term == term { version + 1 } else { 1 };
        summary
    }

    /// Notes that `summary` (stamped) went out at `now_ms`; call it only
    /// once it has.
    pub fn record(&mut self, summary: ClusterSummary, now_ms: u64) {
        self.stamped = (summary.term, summary.version);
        self.last = Some((summary, now_ms));
    }

    /// [`Publisher::due`], [`Publisher::stamp`] and [`Publisher::record`]
    /// together.
    pub fn offer(&mut self, summary: ClusterSummary, now_ms: u64) -> Option<ClusterSummary> {
        if !self.due(&summary, now_ms) {
            return None;
        }
        let summary = self.stamp(summary);
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

    /// A fleet of `classes` classes named `name(i)`, each of 2 nodes with
    /// 8 cpus and 2 GPUs of model `gpu(i)`, one GPU of each node in use.
    fn fleet(classes: usize, name: impl Fn(usize) -> String, gpu: impl Fn(usize) -> String) -> ClusterState {
        let mut text = String::from("[fleet]\nname = \"big\"\n");
        for i in 0..classes {
            text.push_str(&format!(
                "[[class]]\nname = \"{}\"\ncount = {}\ncpu = 8\nmemory = \"32GiB\"\ngpus = {{ model = \"{}\", count = 2 }}\n",
                name(i),
                2 + i % 3,
                gpu(i)
            ));
        }
        let nodes = parse_fleet(&SourceFile::new("big.toml", text)).value.unwrap().nodes;
        ClusterState::with_nodes(nodes).unwrap()
    }

    fn totals(s: &ClusterSummary) -> (u32, Resources, Resources, u32, u32) {
        let gpus = s.gpus.iter().fold(s.other_gpus.total, |a, g| a + g.total);
        (s.classes.iter().map(|c| c.nodes).sum(), s.total(), s.free(), gpus, s.free_gpus())
    }

    #[test]
    fn twelve_gpu_models_are_all_named() {
        let state = fleet(12, |i| format!("gpu-{i}"), |i| format!("vendor-model-{i:02}"));
        let s = ClusterSummary::build("gpus", "r", 1, 0, &[], &state);
        assert_eq!(s.gpus.len(), 12, "no model dropped while they fit");
        assert_eq!(s.folded, Folded::default());
        assert_eq!(totals(&s).3, state.nodes().iter().map(|n| n.gpus[0].count).sum::<u32>());
        assert_eq!(s.free_gpus_of("vendor-model-11"), s.gpus[11].free);
        assert!(s.free_gpus_of("vendor-model-11") > 0);
        assert_eq!(s.free_gpus_of("no-such-model"), 0);
    }

    #[test]
    fn any_fleet_fits_the_bound_with_exact_totals_and_a_flag() {
        let long = |i: usize| format!("a-class-name-far-longer-than-anyone-would-want-to-read-{i:04}");
        for (classes, models) in [(30, 30), (200, 20), (2_000, 2_000), (1, 1)] {
            let state = fleet(classes, long, |i| format!("gpu-model-with-a-long-name-{:04}", i % models));
            let mut s = ClusterSummary::build("big", "r", 1, 0, &["eu".into()], &state);
            // Stamped with the largest incarnation and version there are.
            (s.incarnation, s.version) = (u64::MAX, u64::MAX);
            let bytes = codec::encode(&s).len();
            assert!(bytes <= SUMMARY_BYTES_MAX, "{classes} classes: {bytes} bytes");
            assert!(s.encode().is_ok());
            let nodes = state.nodes().len() as u32;
            let gpus: u32 = state.nodes().iter().map(|n| n.gpus[0].count).sum();
            let (n, total, free, g, free_gpus) = totals(&s);
            assert_eq!((n, g), (nodes, gpus), "{classes} classes: nodes and GPUs exact");
            assert_eq!(total.cpu_millis, 8_000 * u64::from(nodes));
            assert_eq!(free, total, "nothing runs");
            assert_eq!(free_gpus, gpus);
            if classes > 1 {
                assert!(s.folded.any(), "{classes} classes: the flag says detail went");
                // Every model, named or folded, is still findable.
                for m in 0..models.min(classes) {
                    let model = format!("gpu-model-with-a-long-name-{m:04}");
                    assert!(s.free_gpus_of(&model) > 0, "{model} judged absent");
                }
            }
        }
    }

    #[test]
    fn a_fleet_of_thirty_long_names_keeps_every_class_by_cutting_names() {
        // 30 names of 124 bytes: 3,720 bytes of names alone.
        let state = fleet(30, |i| format!("{}-{i:04}", "long-class-name".repeat(8)), |i| format!("m{}", i % 4));
        let s = ClusterSummary::build("big", "r", 1, 0, &[], &state);
        assert!(codec::encode(&s).len() <= SUMMARY_BYTES_MAX);
        assert_eq!(s.folded.names_cut, 30);
        assert!(s.classes.iter().all(|c| c.class.len() <= CLASS_NAME_MAX && c.class.ends_with('~')));
        assert_eq!(s.classes.len(), 30, "cut names make room for every class");
        assert_eq!(s.gpus.len(), 4);
    }

    #[test]
    fn order_is_incarnation_term_version_and_never_the_clock() {
        let new = summary();
        let mut old = new.clone();
        old.term = 2;
        old.version = 99;
        old.generated_at_ms = 9_999_999;
        assert!(new.supersedes(&old), "an older term loses whatever its clock and version");
        assert!(!old.supersedes(&new));
        let mut next = new.clone();
        next.version += 1;
        next.generated_at_ms = 0;
        assert!(next.supersedes(&new), "a later version of the term wins with a clock stepped back");
        let mut reborn = new.clone();
        reborn.incarnation = 1;
        reborn.term = 1;
        assert!(reborn.supersedes(&new), "a rebuilt cluster's new incarnation wins over a higher term");
        assert!(!new.supersedes(&new.clone()));
    }

    #[test]
    fn publisher_limits_rate_and_skips_small_changes() {
        let mut p = Publisher::default();
        let s = summary();
        assert_eq!(p.offer(s.clone(), 0).map(|s| s.version), Some(1), "the first is always published");
        let mut busy = s.clone();
        let c = &mut busy.classes[0];
        c.free.cpu_millis -= c.total.cpu_millis / 2;
        assert!(p.offer(busy.clone(), 500).is_none(), "at most once a second");
        assert!(p.offer(s.clone(), 1_500).is_none(), "unchanged");
        let mut tiny = s.clone();
        tiny.classes[0].free.cpu_millis -= 1;
        assert!(p.offer(tiny, 1_600).is_none(), "below the threshold");
        assert_eq!(p.offer(busy, 1_700).map(|s| s.version), Some(2));
        p.reset();
        assert_eq!(p.offer(s.clone(), 1_800).map(|s| s.version), Some(3), "versions never go back in a term");
        let mut next_term = s;
        next_term.term += 1;
        assert_eq!(p.offer(next_term, 1_000).map(|s| s.version), Some(1), "a new term counts from 1");
    }
}
