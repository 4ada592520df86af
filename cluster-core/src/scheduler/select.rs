//! Candidate selection: pools of feasible nodes, sampled k at a time.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use super::feasibility::{GroupStatic, node_verdict};
use super::rank::{NodeTerms, Ranker};
use super::reconcile::{GroupWork, Replace};
use super::{Rng, SchedulerConfig, objective_slot};
use crate::ids::NodeIdx;
use crate::model::job::{Job, JobType, TaskGroup};
use crate::model::plan::{Placement, Reason, Unplaced};
use crate::resources::{Dimension, GpuAsk, GpuDevices, Resources};
use crate::state::{ClusterState, NodeUsage};

/// Places instances for one evaluation, tracking what earlier placements
/// of the same evaluation took from each node. A clone places on trial.
#[derive(Clone)]
pub(super) struct Placer<'s> {
    state: &'s ClusterState,
    job: &'s Job,
    config: &'s SchedulerConfig,
    rng: Rng,
    /// Usage including this plan's placements, for touched nodes only.
    overlay: FxHashMap<NodeIdx, NodeUsage>,
    placements: Vec<Placement>,
    evaluated: u64,
}

struct Choice {
    node: NodeIdx,
    score: f64,
    gpu_device: Option<usize>,
}

/// Per group: the candidate pools and what ruled the others out.
struct GroupRun<'j> {
    group: &'j TaskGroup,
    statics: GroupStatic<'j>,
    ask: Resources,
    gpu: Option<GpuAsk>,
    /// Binpack only: nodes with work on them, sampled k at a time first.
    used: Vec<NodeIdx>,
    /// Per computed class, the candidates not in `used`: for binpack the
    /// idle nodes, for spread every candidate.
    buckets: Vec<Vec<NodeIdx>>,
    reasons: BTreeMap<Reason, u32>,
    /// Instances of this group per node (kept and placed).
    on_node: FxHashMap<NodeIdx, u32>,
    /// Per spread block, instances per value id.
    spread_counts: Vec<Vec<u32>>,
    ranker: Ranker,
    k: usize,
}

impl<'s> Placer<'s> {
    pub fn new(state: &'s ClusterState, job: &'s Job, config: &'s SchedulerConfig) -> Self {
        let seed = config.seed ^ fnv1a(job.id.as_str().as_bytes()) ^ job.version.rotate_left(32);
        Placer {
            state,
            job,
            config,
            rng: Rng::new(seed),
            overlay: FxHashMap::default(),
            placements: Vec::new(),
            evaluated: 0,
        }
    }

    pub fn finish(self) -> (Vec<Placement>, u64) {
        (self.placements, self.evaluated)
    }

    /// How many placements this plan holds so far.
    pub fn placed_count(&self) -> usize {
        self.placements.len()
    }

    /// Takes the room `scratch` (a clone of this placer) took, not its
    /// placements: what replacements will need once the old instances
    /// have stopped.
    pub fn take_room(&mut self, scratch: &Placer<'s>) {
        self.overlay.clone_from(&scratch.overlay);
    }

    /// The indices of `group` this plan placed so far.
    pub fn placed_indices(&self, group: &str) -> std::collections::HashSet<u32> {
        self.placements.iter().filter(|p| &*p.group == group).map(|p| p.index).collect()
    }

    /// Whether `group`'s new version fits on the node of `old` once `old`
    /// has stopped there (its constraints, and its room with what this
    /// plan placed); if so, that room is taken, so that two replacements
    /// never count on the same space.
    pub fn fits_freed(&mut self, group: &TaskGroup, old: &Replace) -> bool {
        let Some(n) = old.node else { return false };
        if !self.state.is_schedulable(n) {
            return false;
        }
        let node = self.state.node(n);
        if super::feasibility::node_fits(node, self.job, group).is_err() {
            return false;
        }
        let mut usage = self.usage(n);
        usage.sub(old.resources, crate::state::gpu_slot(node, old.gpus.as_ref()));
        let (ask, gpu) = (group.resources(), group.gpu());
        let Ok(device) = usage.fit(node, ask, gpu.as_ref()) else { return false };
        usage.add(ask, device.zip(gpu.as_ref()).map(|(i, g)| (i, g.count)));
        self.overlay.insert(n, usage);
        true
    }

    fn usage(&self, n: NodeIdx) -> NodeUsage {
        self.overlay.get(&n).copied().unwrap_or_else(|| *self.state.usage(n))
    }

    pub fn place_group(&mut self, group: &'s TaskGroup, work: &GroupWork) -> Option<Unplaced> {
        if self.job.job_type != JobType::System && work.place.is_empty() {
            return None;
        }
        let mut run = self.start_group(group, work);
        if self.job.job_type == JobType::System {
            return self.place_system(&mut run, work);
        }
        for (i, &index) in work.place.iter().enumerate() {
            match self.pick(&mut run) {
                Some(choice) => self.commit(&mut run, index, choice),
                None => {
                    return Some(Unplaced {
                        group: group.name.clone(),
                        count: (work.place.len() - i) as u32,
                        reasons: sorted_reasons(run.reasons),
                    });
                }
            }
        }
        None
    }

    fn start_group(&self, group: &'s TaskGroup, work: &GroupWork) -> GroupRun<'s> {
        let state = self.state;
        let statics = GroupStatic::new(state, self.job, group);
        let weights = self.config.weights[objective_slot(self.job.objective)];
        let mut reasons: BTreeMap<Reason, u32> = BTreeMap::new();
        // One pass over the cluster, in node order so that the compact
        // per-node arrays stream through the cache: static verdicts come
        // from the class, then readiness and fit per node. Sampling later
        // sees only nodes that fit. Reasons are tallied in counters and
        // turned into the reason table once at the end.
        let ask = group.resources();
        let gpu = group.gpu();
        let mut on_node: FxHashMap<NodeIdx, u32> = FxHashMap::default();
        for &n in work.kept_on.iter().chain(&work.busy_on) {
            *on_node.entry(n).or_default() += 1;
        }
        let mut used = Vec::new();
        let mut buckets: Vec<Vec<NodeIdx>> = vec![Vec::new(); state.classes().len()];
        let mut filtered_by_class = vec![0u32; state.classes().len()];
        let (mut not_ready, mut distinct) = (0u32, 0u32);
        let mut exhausted: BTreeMap<Dimension, u32> = BTreeMap::new();
        let overlay_empty = self.overlay.is_empty();
        for i in 0..state.nodes().len() {
            let n = NodeIdx(i as u32);
            if !state.is_schedulable(n) {
                not_ready += 1;
                continue;
            }
            let class = state.class_of(n) as usize;
            if statics.classes[class].verdict.is_err() {
                filtered_by_class[class] += 1;
                continue;
            }
            if !statics.per_node.is_empty() {
                if let Err(r) = node_verdict(state.node(n), &statics.per_node) {
                    *reasons.entry(r).or_default() += 1;
                    continue;
                }
            }
            if group.distinct_hosts && on_node.contains_key(&n) {
                distinct += 1;
                continue;
            }
            let usage = if overlay_empty { state.usage(n) } else { &self.usage(n) };
            let fit = match usage.res.exceeds(ask, state.capacity(n)) {
                Some(dim) => Err(dim),
                None if gpu.is_some() => usage.fit(state.node(n), ask, gpu.as_ref()).map(|_| ()),
                None => Ok(()),
            };
            match fit {
                Err(dim) => *exhausted.entry(dim).or_default() += 1,
                Ok(()) if weights.binpack && !usage.is_empty() => used.push(n),
                Ok(()) => buckets[class].push(n),
            }
        }
        for (class, count) in filtered_by_class.into_iter().enumerate().filter(|(_, c)| *c > 0) {
            if let Err(r) = &statics.classes[class].verdict {
                *reasons.entry(r.clone()).or_default() += count;
            }
        }
        let tallies = [(Reason::NotReady, not_ready), (Reason::DistinctHosts, distinct)];
        let exhausted = exhausted.into_iter().map(|(d, c)| (Reason::Exhausted(d), c));
        for (r, c) in tallies.into_iter().chain(exhausted).filter(|(_, c)| *c > 0) {
            *reasons.entry(r).or_default() += c;
        }
        let mut spread_counts: Vec<Vec<u32>> = statics.spread_values.iter().map(|v| vec![0; v.len()]).collect();
        for &n in &work.kept_on {
            count_spread(&mut spread_counts, &statics, state.class_of(n) as usize);
        }
        let feasible = used.len() + buckets.iter().map(Vec::len).sum::<usize>();
        let k = if weights.binpack {
            self.config.binpack_candidates.max(1)
        } else if self.config.spread_candidates > 0 {
            self.config.spread_candidates
        } else {
            (usize::BITS - feasible.max(1).leading_zeros()).clamp(2, 16) as usize
        };
        GroupRun {
            group,
            ask,
            gpu,
            used,
            buckets,
            reasons,
            on_node,
            spread_counts,
            ranker: Ranker {
                weights,
                cost_range: state.cost_range(),
                latency_range: state.latency_range(),
                has_affinities: !group.affinities.is_empty(),
                has_datasets: !group.datasets.is_empty(),
                desired: group.count,
            },
            statics,
            k,
        }
    }

    /// Power of k choices with a quality bound. Binpack draws k fitting
    /// nodes at random from the busy ones and takes the best; only when
    /// none fits does it open an idle node. Opening a node, and every
    /// spread placement, ranks one random node of every computed class
    /// (plus random draws up to k), so no kind of node is overlooked.
    /// Nodes that do not fit are dropped from the pools, counted by reason.
    fn pick(&mut self, run: &mut GroupRun) -> Option<Choice> {
        if run.ranker.weights.binpack {
            if let Some(choice) = self.pick_used(run) {
                return Some(choice);
            }
        }
        self.pick_buckets(run)
    }

    fn pick_used(&mut self, run: &mut GroupRun) -> Option<Choice> {
        let mut best: Option<Choice> = None;
        let mut fits = 0;
        while !run.used.is_empty() && fits < run.k.min(run.used.len()) {
            let i = self.rng.below(run.used.len());
            let n = run.used[i];
            match self.try_node(run, n) {
                Ok(choice) => {
                    fits += 1;
                    if best.as_ref().is_none_or(|b| choice.score > b.score) {
                        best = Some(choice);
                    }
                }
                Err(()) => {
                    run.used.swap_remove(i);
                }
            }
        }
        best
    }

    fn pick_buckets(&mut self, run: &mut GroupRun) -> Option<Choice> {
        let mut best: Option<(Choice, usize, usize)> = None;
        let mut fits = 0;
        let mut tried_all = false;
        let mut b = 0;
        // First pass: one representative per class. Then, while fewer than
        // k fit, random extra draws from random non-empty classes.
        loop {
            let bucket = if !tried_all {
                if b == run.buckets.len() {
                    tried_all = true;
                    continue;
                }
                b += 1;
                b - 1
            } else {
                if fits >= run.k {
                    break;
                }
                let nonempty = run.buckets.iter().filter(|x| !x.is_empty()).count();
                if nonempty == 0 {
                    break;
                }
                let pick = self.rng.below(nonempty);
                run.buckets.iter().enumerate().filter(|(_, x)| !x.is_empty()).nth(pick).map(|(i, _)| i).unwrap_or(0)
            };
            // Draw from this class until one fits or the class is empty.
            while !run.buckets[bucket].is_empty() {
                let i = self.rng.below(run.buckets[bucket].len());
                let n = run.buckets[bucket][i];
                if run.ranker.weights.binpack && !self.usage(n).is_empty() {
                    // Became busy earlier in this plan: it belongs with the busy nodes.
                    run.buckets[bucket].swap_remove(i);
                    run.used.push(n);
                    continue;
                }
                match self.try_node(run, n) {
                    Ok(choice) => {
                        fits += 1;
                        if best.as_ref().is_none_or(|(c, _, _)| choice.score > c.score) {
                            best = Some((choice, bucket, i));
                        }
                        break;
                    }
                    Err(()) => {
                        run.buckets[bucket].swap_remove(i);
                        // The best so far may have been the element swap_remove moved.
                        if let Some((_, bb, pos)) = best.as_mut() {
                            if *bb == bucket && *pos == run.buckets[bucket].len() {
                                *pos = i;
                            }
                        }
                    }
                }
            }
        }
        let (choice, bucket, pos) = best?;
        if run.ranker.weights.binpack {
            // Opening an idle node: from now on it is a busy node.
            debug_assert_eq!(run.buckets[bucket][pos], choice.node);
            run.buckets[bucket].swap_remove(pos);
            run.used.push(choice.node);
        }
        Some(choice)
    }

    /// Checks fit and scores; a node that does not fit is counted under its
    /// reason, and the caller drops it from its pool.
    fn try_node(&mut self, run: &mut GroupRun, n: NodeIdx) -> Result<Choice, ()> {
        self.evaluated += 1;
        match self.fit(run, n) {
            Ok((after, gpu_device)) => Ok(Choice { node: n, score: self.score(run, n, after), gpu_device }),
            Err(reason) => {
                *run.reasons.entry(reason).or_default() += 1;
                Err(())
            }
        }
    }

    fn fit(&self, run: &GroupRun, n: NodeIdx) -> Result<(Resources, Option<usize>), Reason> {
        if run.group.distinct_hosts && run.on_node.get(&n).is_some_and(|c| *c > 0) {
            return Err(Reason::DistinctHosts);
        }
        let usage = self.usage(n);
        let dev = usage.fit(self.state.node(n), run.ask, run.gpu.as_ref()).map_err(Reason::Exhausted)?;
        Ok((usage.res.saturating_add(run.ask), dev))
    }

    fn score(&self, run: &GroupRun, n: NodeIdx, after: Resources) -> f64 {
        let class = &run.statics.classes[self.state.class_of(n) as usize];
        let (mut spread, mut spread_weight) = (0.0, 0.0);
        for (s, block) in run.group.spreads.iter().enumerate() {
            let w = f64::from(block.weight) / 50.0;
            spread_weight += w;
            spread += w * spread_boost(run, s, class.spread_values[s]);
        }
        let terms = NodeTerms {
            affinity: class.affinity,
            locality: class.locality,
            spread,
            spread_weight,
            collisions: run.on_node.get(&n).copied().unwrap_or(0),
        };
        run.ranker.score(self.state.node(n), after, &terms)
    }

    fn commit(&mut self, run: &mut GroupRun, index: u32, choice: Choice) {
        let n = choice.node;
        let node = self.state.node(n);
        let mut usage = self.usage(n);
        let gpus = choice.gpu_device.zip(run.gpu.as_ref()).map(|(i, ask)| {
            usage.gpus[i] += ask.count;
            GpuDevices { model: node.gpus[i].model.clone(), count: ask.count }
        });
        usage.res = usage.res.saturating_add(run.ask);
        self.overlay.insert(n, usage);
        *run.on_node.entry(n).or_default() += 1;
        count_spread(&mut run.spread_counts, &run.statics, self.state.class_of(n) as usize);
        self.placements.push(Placement {
            group: run.group.name.clone(),
            index,
            node: node.id.clone(),
            node_idx: n,
            resources: run.ask,
            gpus,
            score: choice.score,
        });
    }

    /// System jobs: one instance on every feasible node that has none.
    /// Nodes ruled out by readiness or constraints are not meant to run it;
    /// nodes that qualify but lack room are reported as unplaced.
    fn place_system(&mut self, run: &mut GroupRun, work: &GroupWork) -> Option<Unplaced> {
        run.reasons.retain(|r, _| matches!(r, Reason::Exhausted(_)));
        let mut candidates: Vec<NodeIdx> = run.used.iter().chain(run.buckets.iter().flatten()).copied().collect();
        candidates.sort_unstable();
        let mut index = work.kept_on.len() as u32;
        for n in candidates {
            if run.on_node.contains_key(&n) {
                continue;
            }
            if let Ok(choice) = self.try_node(run, n) {
                self.commit(run, index, choice);
                index += 1;
            }
        }
        let failed: u32 = run.reasons.values().sum();
        (failed > 0).then(|| Unplaced {
            group: run.group.name.clone(),
            count: failed,
            reasons: sorted_reasons(std::mem::take(&mut run.reasons)),
        })
    }
}

fn count_spread(counts: &mut [Vec<u32>], statics: &GroupStatic, class: usize) {
    for (s, c) in counts.iter_mut().enumerate() {
        let v = statics.classes[class].spread_values[s];
        if let Some(slot) = c.get_mut(v as usize) {
            *slot += 1;
        }
    }
}

/// How much placing on a node with spread value `v` helps block `s`, in -1..=1.
fn spread_boost(run: &GroupRun, s: usize, v: u32) -> f64 {
    let block = &run.group.spreads[s];
    let counts = &run.spread_counts[s];
    let current = counts.get(v as usize).copied();
    if block.targets.is_empty() {
        // Even spread: the least used value scores 1, the most used -1.
        let Some(current) = current else { return -1.0 };
        let (min, max) = counts.iter().fold((u32::MAX, 0), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        if max == min {
            return 0.0;
        }
        return 2.0 * f64::from(max - current) / f64::from(max - min) - 1.0;
    }
    let Some(value) = current.and_then(|_| run.statics.spread_values[s].get(v as usize)) else { return -1.0 };
    let percent = match block.targets.iter().find(|t| &t.value == value) {
        Some(t) => f64::from(t.percent),
        None => run.statics.implicit_percent[s],
    };
    if percent <= 0.0 {
        return -1.0;
    }
    // How far below its share the value is, counting this instance as
    // half (rounding, as the largest-remainder method does): a value at
    // its share scores below one short of it, and a share under one
    // instance still ranks by size (count 1 at 50 % goes to the target).
    let desired = percent / 100.0 * f64::from(run.ranker.desired.max(1));
    let current = f64::from(current.unwrap_or(0));
    ((desired - current - 0.5) / desired.max(0.5)).clamp(-1.0, 1.0)
}

fn sorted_reasons(reasons: BTreeMap<Reason, u32>) -> Vec<(Reason, u32)> {
    let mut v: Vec<(Reason, u32)> = reasons.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
