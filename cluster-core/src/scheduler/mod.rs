//! The scheduler: `(cluster state, job, config) -> Plan`, pure and
//! deterministic for a given seed.
//!
//! Stages, per task group:
//! 1. [`reconcile`]: which instances to keep, stop and place.
//! 2. [`feasibility`]: static checks once per computed node class.
//! 3. [`select`]: for each instance, sample candidates (power of k choices),
//!    check that they fit, rank them with [`rank`], take the best.
//!
//! Nodes that cannot take an instance are dropped from the group's
//! candidate pool as they are found, each counted under its reason, so an
//! unplaceable instance comes back with "memory exhausted on 812 nodes"
//! and no placement re-scans the cluster.

mod feasibility;
pub mod rank;
pub mod reconcile;
mod select;

use crate::model::job::{Job, Objective};
use crate::model::plan::Plan;
use crate::state::ClusterState;

pub use rank::Weights;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Seeds candidate sampling; the same seed, state and job give the same plan.
    pub seed: u64,
    /// Fitting candidates ranked per placement when packing.
    pub binpack_candidates: usize,
    /// Fitting candidates ranked per placement when spreading; 0 means
    /// log2 of the feasible nodes, between 2 and 16.
    pub spread_candidates: usize,
    /// Ranking weights per objective, indexed by [`objective_slot`].
    pub weights: [Weights; 4],
    /// Hold back the instances of `delegate = "prefer-remote"` jobs until
    /// the federation has offered them to peers (see
    /// [`ClusterState::peers_asked`]): on in a cluster that may delegate.
    pub defer_prefer_remote: bool,
    /// The most placements and stops one plan carries; a job that needs
    /// more is planned in parts, one per round (see [`Plan::deferred`]), so
    /// no plan outgrows a Raft entry and no job holds the scheduler for
    /// long (security review, row 16).
    pub max_changes_per_plan: usize,
    /// When (Unix ms) the plan is made: a failed instance whose
    /// reschedule delay runs past it is held back ([`Plan::wait_until_ms`]).
    /// `None` waits for no delay (a plan made without a clock).
    pub now_ms: Option<u64>,
}

/// The default of [`SchedulerConfig::max_changes_per_plan`]: with the
/// longest names a spec and a node may have, such a plan encodes to about
/// 2.5 MB, under the log's 4 MiB entry limit (a test checks).
pub const PLAN_CHANGES_MAX: usize = 10_000;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            seed: 0,
            binpack_candidates: 4,
            spread_candidates: 0,
            weights: [Objective::Latency, Objective::Cost, Objective::Throughput, Objective::Balanced]
                .map(Weights::for_objective),
            defer_prefer_remote: false,
            max_changes_per_plan: PLAN_CHANGES_MAX,
            now_ms: None,
        }
    }
}

/// Where an objective's weights sit in [`SchedulerConfig::weights`].
pub fn objective_slot(o: Objective) -> usize {
    match o {
        Objective::Latency => 0,
        Objective::Cost => 1,
        Objective::Throughput => 2,
        Objective::Balanced => 3,
    }
}

/// Plans `job` against `state`. Reads only; the plan takes effect when
/// [`ClusterState::apply_plan`] commits it.
pub fn schedule(state: &ClusterState, job: &Job, config: &SchedulerConfig) -> Plan {
    let mut work = reconcile::reconcile(state, job, config.now_ms);
    // Planned in parts: stops first, then placements in group order, up to
    // the cap; the rest is left for the next round of the same evaluation.
    let cap = config.max_changes_per_plan.max(1);
    let mut deferred = work.stops.len().saturating_sub(cap) as u64;
    work.stops.truncate(cap);
    let mut budget = cap - work.stops.len();
    if job.job_type != crate::model::JobType::System {
        for w in &mut work.groups {
            if w.place.len() > budget {
                deferred += (w.place.len() - budget) as u64;
                w.place.truncate(budget);
            }
            budget -= w.place.len();
        }
    }
    let mut placer = select::Placer::new(state, job, config);
    let mut unplaced = Vec::new();
    // Peers first: what the plan would place waits, blocked, until the
    // federation has offered it and committed `PeersAsked` for this
    // version; it then places what no peer holds.
    // System jobs run on every node of their own cluster: never deferred.
    let defer = config.defer_prefer_remote
        && job.job_type != crate::model::JobType::System
        && job.federation.delegate == crate::model::DelegateMode::PreferRemote
        && !job.labels.contains_key(crate::model::job::LABEL_ORIGIN)
        && state.peers_asked(&job.id).is_none_or(|v| v < job.version);
    for (group, w) in job.groups.iter().zip(&work.groups) {
        if defer {
            let count = w.place.len() as u32;
            if count > 0 {
                let reasons = vec![(crate::model::plan::Reason::OfferedToPeers, count)];
                unplaced.push(crate::model::plan::Unplaced { group: group.name.clone(), count, reasons });
            }
            continue;
        }
        if let Some(u) = placer.place_group(group, w) {
            unplaced.push(u);
        }
    }
    let mut stops = work.stops;
    // What the cap leaves for stops that come without a placement.
    let mut left = cap.saturating_sub(stops.len() + placer.placed_count());
    for (group, w) in job.groups.iter().zip(&work.groups) {
        let mut out = Replaced { stops: &mut stops, unplaced: &mut unplaced, left: &mut left, deferred: &mut deferred };
        replace_old(&mut placer, group, w, defer, &mut out);
    }
    let (placements, nodes_evaluated) = placer.finish();
    Plan {
        job: job.id.clone(),
        job_version: job.version,
        placements,
        stops,
        unplaced,
        nodes_evaluated,
        deferred,
        wait_until_ms: work.wait_until_ms,
        made_at_ms: config.now_ms,
    }
}

/// Where [`replace_old`] puts what it decides.
struct Replaced<'a> {
    stops: &'a mut Vec<crate::model::plan::Stop>,
    unplaced: &'a mut Vec<crate::model::plan::Unplaced>,
    /// Stops without a placement this plan may still carry.
    left: &'a mut usize,
    deferred: &'a mut u64,
}

/// Stops the instances of `group` to replace (an older version, or on a
/// draining node) whose replacement can run: it was placed in this plan,
/// or it fits where the old one runs once that one has stopped (never on
/// a draining node, which takes no work). At-most-once work never runs
/// beside its replacement, so a trial placement (not kept) says whether
/// the new version fits now. The others keep running, counted unplaced
/// with the reasons, until capacity changes: an update that fits nowhere
/// takes nothing down (Nomad's destructive updates behave the same). Work
/// offered to peers first (`defer`) is replaced at once, as before: the
/// peers' answer is not known here.
fn replace_old<'s>(
    placer: &mut select::Placer<'s>,
    group: &'s crate::model::job::TaskGroup,
    w: &reconcile::GroupWork,
    defer: bool,
    out: &mut Replaced<'_>,
) {
    use crate::model::plan::{Stop, Unplaced};
    if w.replace.is_empty() {
        return;
    }
    let stop = |r: &reconcile::Replace| Stop { alloc: r.alloc, reason: r.reason };
    let at_most_once = group.on_disconnect == crate::model::job::OnDisconnect::Stop;
    // Over the cap: left for the next part (a stop without a placement,
    // or an index the cap kept out of `place`, already counted).
    let take = |out: &mut Replaced<'_>, r: &reconcile::Replace| {
        if *out.left == 0 {
            *out.deferred += 1;
            return false;
        }
        *out.left -= 1;
        out.stops.push(stop(r));
        true
    };
    if defer {
        for r in &w.replace {
            take(out, r);
        }
        return;
    }
    // One scratch placer for the trial and the freed room, so that no
    // check counts on room another took; its room (not its placements)
    // becomes the plan's, for the next groups to see.
    let mut scratch = placer.clone();
    let (placed, trial_unplaced) = if at_most_once {
        let indices = w.replace.iter().map(|r| r.index).take(*out.left).collect();
        let tw = reconcile::GroupWork { place: indices, kept_on: w.kept_on.clone(), ..Default::default() };
        let u = scratch.place_group(group, &tw);
        (scratch.placed_indices(&group.name), u)
    } else {
        (placer.placed_indices(&group.name), None)
    };
    let mut kept = 0;
    for r in &w.replace {
        if !at_most_once && placed.contains(&r.index) {
            // Its replacement is in this plan: the stop goes with it.
            out.stops.push(stop(r));
        } else if !at_most_once && !w.place.contains(&r.index) {
            // Its index waits for the next part (counted deferred).
        } else if placed.contains(&r.index) || scratch.fits_freed(group, r) {
            if !take(out, r) && at_most_once {
                kept += 1;
            }
        } else if at_most_once {
            kept += 1;
        }
    }
    placer.take_room(&scratch);
    // Non-at-most-once instances kept are already counted: their indices
    // were placed, and failed, above.
    if kept > 0 {
        match out.unplaced.iter_mut().find(|u| u.group == group.name) {
            Some(u) => u.count += kept,
            None => out.unplaced.push(Unplaced {
                group: group.name.clone(),
                count: kept,
                reasons: trial_unplaced.map(|u| u.reasons).unwrap_or_default(),
            }),
        }
    }
}

/// SplitMix64: small, fast, and stable across releases, so a seed printed
/// by a failing test reproduces the same plan forever.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}
