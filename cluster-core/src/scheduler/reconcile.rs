//! Which instances of a job to keep, stop and place, given its allocations.

use crate::ids::{AllocId, NodeIdx};
use crate::model::alloc::{AllocStatus, Allocation, DesiredStatus};
use std::collections::HashMap;
use std::sync::Arc;

use crate::model::job::{Job, JobType, OnDisconnect, RescheduleEvent, ReschedulePolicy};

use crate::model::node::NodeStatus;
use crate::model::plan::{Stop, StopReason};
use crate::resources::{GpuDevices, Resources};
use crate::state::ClusterState;

/// The reconciler's answer for one group.
#[derive(Debug, Default)]
pub struct GroupWork {
    /// Instance indices to place, ascending.
    pub place: Vec<u32>,
    /// Nodes already running an instance that stays, one entry per instance.
    pub kept_on: Vec<NodeIdx>,
    /// System jobs: nodes whose instance is stopping but still runs; the
    /// next one there waits for it to end (an evaluation opens then).
    pub busy_on: Vec<NodeIdx>,
    /// Instances of an older version, or on a draining node, to replace.
    /// Each is stopped only once its replacement can run (see
    /// [`super::schedule`]): an update or a drain that fits nowhere takes
    /// nothing down. Other work's indices are also in `place` (the new
    /// instance starts beside the old one); at-most-once work's are not
    /// (its replacement waits until the old one has stopped).
    pub replace: Vec<Replace>,
}

/// A live instance to be replaced: of an older version of the job
/// (`Updated`), or on a draining node (`Drained`).
#[derive(Clone, Debug)]
pub struct Replace {
    pub index: u32,
    pub alloc: AllocId,
    pub reason: StopReason,
    /// Its node, while the node is known.
    pub node: Option<NodeIdx>,
    pub resources: Resources,
    pub gpus: Option<GpuDevices>,
}

#[derive(Debug, Default)]
pub struct Reconciled {
    pub stops: Vec<Stop>,
    /// Parallel to `job.groups`.
    pub groups: Vec<GroupWork>,
    /// The earliest time (Unix ms) a failed instance held back by its
    /// reschedule delay may be placed; none is held back when `None`.
    pub wait_until_ms: Option<u64>,
}

/// How many times a system job's instance is placed again on its node
/// after it failed there, before the scheduler gives up on that node
/// (until the job changes). Other jobs follow their group's
/// [`ReschedulePolicy`]. An allocation that failed because a task could
/// not start at all ([`crate::model::alloc::TaskPhase::Unrunnable`]) is
/// not placed again.
pub const SYSTEM_FAILURES_MAX: u32 = 3;

/// How much one failed allocation of a system job counts toward
/// [`SYSTEM_FAILURES_MAX`]: 1, or past the limit at once when a task of
/// it could not start at all (an unrunnable program fails the same on
/// the next try).
pub fn failure_weight(a: &Allocation) -> u32 {
    if a.unrunnable() { SYSTEM_FAILURES_MAX + 1 } else { 1 }
}

/// Whether the failed allocation `a`, the latest of its instance (see
/// [`latest_ended`]), is final: a task of it could not start at all, or
/// `policy` allows no further reschedule. Reconciliation, job states and
/// a delegation target's per-index report all decide so.
pub fn failed_for_good(policy: &ReschedulePolicy, a: &Allocation) -> bool {
    a.unrunnable() || policy.next(&a.reschedules, a.failed_at_ms.unwrap_or(0)).is_none()
}

/// When (Unix ms) the instance whose latest allocation `a` failed may be
/// placed again under `policy`: its failure's time plus the reschedule's
/// delay (a failure logged without a time: at once). `None` when it is
/// final ([`failed_for_good`]).
pub fn reschedule_due(policy: &ReschedulePolicy, a: &Allocation) -> Option<u64> {
    reschedule_wait(policy, a).map(|(due, _)| due)
}

/// [`reschedule_due`], with the delay it adds to the failure's time.
fn reschedule_wait(policy: &ReschedulePolicy, a: &Allocation) -> Option<(u64, u64)> {
    if a.unrunnable() {
        return None;
    }
    let next = policy.next(&a.reschedules, a.failed_at_ms.unwrap_or(0))?;
    Some((a.failed_at_ms.map_or(0, |t| t.saturating_add(next.delay_ms)), next.delay_ms))
}

/// The reschedule history a new allocation of an instance carries, given
/// the instance's latest ended allocation `before` (see [`latest_ended`]):
/// its history, and its failure when it failed while wanted.
pub fn history_after(policy: &ReschedulePolicy, before: Option<&Allocation>) -> Vec<RescheduleEvent> {
    let Some(a) = before else { return Vec::new() };
    let mut history = a.reschedules.clone();
    if a.status == AllocStatus::Failed && a.desired == DesiredStatus::Run {
        if let Some(e) = policy.next(&history, a.failed_at_ms.unwrap_or(0)) {
            history.push(e);
        }
    }
    policy.keep(&mut history);
    history
}

/// Each instance's latest ended allocation of `job`'s current version,
/// by `(group, index)`: the one a new allocation of the instance follows.
pub fn latest_ended<'s>(state: &'s ClusterState, job: &Job) -> HashMap<(&'s str, u32), &'s Allocation> {
    newest_by_instance(state, job, |a| a.status.is_terminal())
}

/// Each instance's newest allocation (the highest id) of `job`'s current
/// version among those `which` keeps, by `(group, index)`.
pub fn newest_by_instance<'s>(
    state: &'s ClusterState,
    job: &Job,
    which: impl Fn(&Allocation) -> bool,
) -> HashMap<(&'s str, u32), &'s Allocation> {
    let mut out: HashMap<(&str, u32), &Allocation> = HashMap::new();
    for a in state.allocs_of_job(&job.id).filter(|a| a.job_version == job.version && which(a)) {
        let slot = out.entry((&*a.group, a.index)).or_insert(a);
        if a.id > slot.id {
            *slot = a;
        }
    }
    out
}

/// Whether `a` is a batch instance of `job`'s version that ran to its end
/// (not one stopped by a drain or an update, which also ends `complete`).
pub fn completed_batch(job: &Job, a: &Allocation) -> bool {
    job.job_type == JobType::Batch
        && a.status == AllocStatus::Complete
        && a.desired == DesiredStatus::Run
        && a.job_version == job.version
}

/// A system job's (group, node) pairs where its current version failed
/// for good: more failures there than [`SYSTEM_FAILURES_MAX`] (by
/// [`failure_weight`]). Nothing is placed there again until the job
/// changes; job states count each as a failed instance.
pub fn system_failed_for_good(state: &ClusterState, job: &Job) -> Vec<(usize, NodeIdx)> {
    let mut tries: std::collections::BTreeMap<(usize, NodeIdx), u32> = std::collections::BTreeMap::new();
    for a in state.allocs_of_job(&job.id) {
        if a.status != AllocStatus::Failed || a.job_version != job.version {
            continue;
        }
        let (Some(g), Some(n)) = (job.groups.iter().position(|g| g.name == a.group), state.node_idx(&a.node)) else {
            continue;
        };
        *tries.entry((g, n)).or_default() += failure_weight(a);
    }
    tries.into_iter().filter(|(_, t)| *t > SYSTEM_FAILURES_MAX).map(|(k, _)| k).collect()
}

/// What to do with `job`'s instances at `now_ms` (Unix ms): a failed
/// instance whose reschedule delay runs past it is held back, and
/// [`Reconciled::wait_until_ms`] says until when. `None` waits for no
/// delay (a caller without a clock).
pub fn reconcile(state: &ClusterState, job: &Job, now_ms: Option<u64>) -> Reconciled {
    let mut out = Reconciled {
        stops: Vec::new(),
        groups: job.groups.iter().map(|_| GroupWork::default()).collect(),
        wait_until_ms: None,
    };
    // covered[g][i]: instance i of group g is kept (or, for batch, done).
    let mut covered: Vec<Vec<bool>> = job.groups.iter().map(|g| vec![false; g.count as usize]).collect();
    // ended[g][i]: instance i's latest ended allocation of this version.
    let mut ended: Vec<Vec<Option<&Allocation>>> = job.groups.iter().map(|g| vec![None; g.count as usize]).collect();
    // Instances another cluster runs are covered here, unless they run an
    // older spec that a deployment replaces beside them.
    let stale = stale_held(state, job);
    for (group, index) in state.held_of_job(&job.id) {
        if stale.contains(&(Arc::from(group), index)) {
            continue;
        }
        if let Some(g) = job.groups.iter().position(|x| &*x.name == group) {
            if let Some(c) = covered[g].get_mut(index as usize) {
                *c = true;
            }
        }
    }
    let mut allocs: Vec<&Allocation> = state.allocs_of_job(&job.id).collect();
    allocs.sort_by_key(|a| a.id);
    // A system group with an `update`: its older instances, to stop a set
    // at a time, and those of a set still stopping.
    let mut older: Vec<Vec<(AllocId, Option<NodeIdx>)>> = job.groups.iter().map(|_| Vec::new()).collect();
    let mut older_stopping: Vec<u32> = vec![0; job.groups.len()];
    let system_failed = if job.job_type == JobType::System { system_failed_for_good(state, job) } else { Vec::new() };
    for a in allocs {
        let group = job.groups.iter().position(|g| g.name == a.group);
        let node = state.node_idx(&a.node);
        let node_down = node.is_none_or(|i| state.node(i).status == NodeStatus::Down);
        let draining = node.is_some_and(|i| state.node(i).draining);
        let stop = |reason| Stop { alloc: a.id, reason };
        match group {
            _ if job.stopped => {
                if a.is_live() {
                    out.stops.push(stop(StopReason::JobStopped));
                }
            }
            None => {
                if a.is_live() {
                    out.stops.push(stop(StopReason::Updated));
                }
            }
            Some(g) => {
                let in_range = (a.index as usize) < covered[g].len();
                let done_batch = completed_batch(job, a);
                if done_batch && in_range {
                    covered[g][a.index as usize] = true;
                    continue;
                }
                if a.status.is_terminal() && in_range && a.job_version == job.version {
                    ended[g][a.index as usize] = Some(a);
                }
                if !a.is_live() {
                    // An at-most-once instance being stopped still covers
                    // its index: the replacement is placed only once it is
                    // terminal, so the two never run at once (review B8).
                    let stopping = a.desired == DesiredStatus::Stop && !a.status.is_terminal();
                    // So does a system job's on its node, whatever the group;
                    // and one that failed there for good (until the job
                    // changes: else it would be placed there again and again).
                    let failed_here = node.is_some_and(|i| system_failed.contains(&(g, i)));
                    if stopping && a.job_version != job.version {
                        older_stopping[g] += 1;
                    }
                    if (stopping || failed_here) && job.job_type == JobType::System && !node_down {
                        if let Some(i) = node {
                            out.groups[g].busy_on.push(i);
                        }
                    }
                    let at_most_once = job.groups[g].on_disconnect == OnDisconnect::Stop;
                    if stopping && at_most_once && in_range && job.job_type != JobType::System {
                        covered[g][a.index as usize] = true;
                    }
                    continue;
                }
                if job.job_type == JobType::System {
                    // One per node: keep it while the node is up and the version current.
                    if node_down {
                        out.stops.push(stop(StopReason::NodeLost));
                    } else if draining {
                        out.stops.push(stop(StopReason::Drained));
                    } else if a.job_version != job.version && job.groups[g].update.is_some() {
                        older[g].push((a.id, node));
                    } else if a.job_version != job.version {
                        out.stops.push(stop(StopReason::Updated));
                    } else if let Some(i) = node {
                        // A node whose attributes changed may no longer fit.
                        if super::feasibility::node_fits(state.node(i), job, &job.groups[g]).is_err() {
                            out.stops.push(stop(StopReason::NodeUnfit));
                        } else {
                            out.groups[g].kept_on.push(i);
                        }
                    }
                    continue;
                }
                let duplicate = in_range && covered[g][a.index as usize];
                if !in_range || duplicate {
                    out.stops.push(stop(StopReason::ScaledDown));
                } else if node_down {
                    out.stops.push(stop(StopReason::NodeLost));
                } else if draining || a.job_version != job.version {
                    // A drained instance too stops only once it can move:
                    // its replacement placed elsewhere, or the drain's
                    // deadline (`Command::DrainDeadline`).
                    out.groups[g].replace.push(Replace {
                        index: a.index,
                        alloc: a.id,
                        reason: if draining { StopReason::Drained } else { StopReason::Updated },
                        node,
                        resources: a.resources,
                        gpus: a.gpus.clone(),
                    });
                    // Its replacement waits until it has stopped (see above).
                    if job.groups[g].on_disconnect == OnDisconnect::Stop {
                        covered[g][a.index as usize] = true;
                    }
                } else {
                    covered[g][a.index as usize] = true;
                    if let Some(i) = node {
                        out.groups[g].kept_on.push(i);
                    }
                }
            }
        }
    }
    if !job.stopped && job.job_type == JobType::System {
        // A rolling system job: at most `max_parallel` nodes' instances
        // stopping at once, a set `stagger` after the one before began
        // (`system_set_key`, stamped by the plan that stopped it). The
        // rest keep running where they are. A set's start further off than
        // the stagger itself was stamped by a clock ahead: not waited for.
        let last = state.record(&crate::state::system_set_key(&job.id));
        let last = last.and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok());
        for (g, group) in job.groups.iter().enumerate() {
            let (Some(u), olds) = (group.update, std::mem::take(&mut older[g])) else { continue };
            let due = last.map(|t| t.saturating_add(u.stagger_ms));
            let wait = due.filter(|due| now_ms.is_some_and(|now| now < *due && due - now <= u.stagger_ms));
            let budget = if wait.is_some() { 0 } else { u.max_parallel.saturating_sub(older_stopping[g]) };
            // What is left waits for the next set, a stagger after this
            // one (a set still stopping moves things on when it ends).
            let starts_set = budget > 0 && u.stagger_ms > 0;
            let next = match (wait, now_ms) {
                (Some(due), _) => Some(due),
                (None, Some(now)) if starts_set && olds.len() as u32 > budget => Some(now.saturating_add(u.stagger_ms)),
                _ => None,
            };
            if let (Some(due), false) = (next, olds.is_empty()) {
                out.wait_until_ms = Some(out.wait_until_ms.map_or(due, |w| w.min(due)));
            }
            for (n, (alloc, node)) in olds.into_iter().enumerate() {
                if (n as u32) < budget {
                    out.stops.push(Stop { alloc, reason: StopReason::Updated });
                } else if let Some(i) = node {
                    out.groups[g].kept_on.push(i);
                }
            }
        }
    }
    if !job.stopped && job.job_type != JobType::System {
        // An instance whose latest allocation failed waits for its
        // reschedule's delay, or is not placed again at all.
        for (g, group) in job.groups.iter().enumerate() {
            for (i, a) in ended[g].iter().enumerate() {
                let Some(a) = a.filter(|a| a.status == AllocStatus::Failed && a.desired == DesiredStatus::Run) else {
                    continue;
                };
                if covered[g][i] {
                    continue;
                }
                // A due time further off than the delay itself was stamped
                // by a clock ahead of this one: no longer waited for, so a
                // skewed server can delay an instance by its delay at most.
                match reschedule_wait(&group.reschedule, a) {
                    None => covered[g][i] = true,
                    Some((due, delay)) if now_ms.is_some_and(|now| now < due && due - now <= delay) => {
                        covered[g][i] = true;
                        out.wait_until_ms = Some(out.wait_until_ms.map_or(due, |w| w.min(due)));
                    }
                    Some(_) => {}
                }
            }
        }
        for (g, cov) in covered.iter().enumerate() {
            out.groups[g].place = cov.iter().enumerate().filter(|(_, c)| !**c).map(|(i, _)| i as u32).collect();
        }
    }
    if !job.stopped && job.job_type == JobType::Service {
        for (g, group) in job.groups.iter().enumerate() {
            if let Some(update) = &group.update {
                let held: Vec<u32> = stale.iter().filter(|(n, _)| *n == group.name).map(|(_, i)| *i).collect();
                roll(state, job, group, update, &held, &mut out.groups[g], &mut out.stops);
            }
        }
    }
    out
}

/// Instances of `job` another cluster holds at an older spec of their
/// group ([`crate::state::Held::spec`]) that a deployment replaces here,
/// beside them ([`Job::rolls_beside`]), as `(group, index)`. Each stays
/// held until its holder lets it go, which it does once every index it
/// holds has a healthy replacement of the current version here.
pub fn stale_held(state: &ClusterState, job: &Job) -> std::collections::BTreeSet<(Arc<str>, u32)> {
    let mut out = std::collections::BTreeSet::new();
    if job.stopped {
        return out;
    }
    for held in state.holds().values().filter(|h| h.job == job.id) {
        let Some(group) = job.group(&held.group).filter(|g| job.rolls_beside(g)) else { continue };
        if held.spec.is_some_and(|s| s != job.group_fingerprint(&group.name)) {
            out.extend(held.indices.iter().filter(|i| **i < group.count).map(|i| (held.group.clone(), *i)));
        }
    }
    out
}

/// Paces the replacement of `group`'s older instances by its deployment
/// (see [`crate::model::deployment`]): a new instance is placed beside an
/// old one, at most `max_parallel` at once not yet healthy (or first the
/// canaries, until promoted), and the old one stops only once its
/// replacement is healthy. With no deployment running (failed, or none)
/// nothing more is replaced; an old instance whose replacement is healthy
/// still stops. Instances missing for another reason (a lost node, a
/// larger count) are placed at once, as without a deployment.
///
/// `held`: the group's indices another cluster holds at an older spec
/// ([`stale_held`]): each is replaced here as an older instance is, within
/// the same pace; its holder, not this plan, stops the old one.
fn roll(
    state: &ClusterState,
    job: &Job,
    group: &crate::model::job::TaskGroup,
    update: &crate::model::job::UpdateStrategy,
    held: &[u32],
    w: &mut GroupWork,
    stops: &mut Vec<Stop>,
) {
    use crate::model::alloc::AllocHealth;
    let deployment = state.latest_deployment(&job.id).filter(|d| d.job_version == job.version);
    let active = deployment.is_some_and(|d| d.status.is_active());
    let awaiting = active && deployment.is_some_and(|d| d.awaits_promotion(&group.name));
    let at_most_once = group.on_disconnect == OnDisconnect::Stop;
    // The current version's live instances, by index, with their health.
    let mut news: std::collections::BTreeMap<u32, Option<AllocHealth>> = Default::default();
    let (mut canaries, mut stopping) = (0u32, 0u32);
    // Instances carried over from before the deployment opened (a scale, a
    // revert) that were found unhealthy: replaced afresh, as a new
    // version's instance would be, within the same pace.
    let placed_from = deployment.map_or(crate::ids::AllocId(0), |d| d.placed_from);
    let mut stale = Vec::new();
    for a in state.allocs_of_job(&job.id).filter(|a| a.group == group.name) {
        if a.job_version == job.version && a.is_live() {
            if a.health == Some(AllocHealth::Unhealthy) && a.id < placed_from {
                stale.push((a.index, a.id));
                continue;
            }
            news.insert(a.index, a.health);
            canaries += u32::from(a.canary);
        } else if a.job_version != job.version && a.desired == DesiredStatus::Stop && !a.status.is_terminal() {
            stopping += 1;
        }
    }
    let unhealthy_new = news.values().filter(|h| **h != Some(AllocHealth::Healthy)).count() as u32;
    let updated = |r: &Replace| r.reason == StopReason::Updated;
    // Drained instances of the current version move as drains move them;
    // an older one on a draining node is replaced as the deployment goes.
    let older = |r: &Replace| state.alloc(r.alloc).is_some_and(|a| a.job_version != job.version);
    let mut budget = if active && !awaiting { update.max_parallel.saturating_sub(unhealthy_new) } else { 0 };
    for (index, id) in stale {
        if budget == 0 {
            break;
        }
        budget -= 1;
        stops.push(Stop { alloc: id, reason: StopReason::Updated });
        if !at_most_once && !w.place.contains(&index) {
            // At-most-once work waits for it to end (it covers its index).
            w.place.push(index);
            w.place.sort_unstable();
        }
    }
    if at_most_once {
        // The old instance stops first, its replacement placed once it has
        // ended: those stopping and those not yet healthy are in flight.
        let allowed = budget.saturating_sub(stopping);
        let mut taken = 0;
        w.replace.retain(|r| {
            if !updated(r) {
                return true;
            }
            taken += 1;
            taken <= allowed
        });
        return;
    }
    // Indices to replace, once each (two older versions may run at one).
    let mut candidates = std::collections::BTreeSet::new();
    let mut settled = Vec::new();
    for r in w.replace.iter().filter(|r| older(r)) {
        match news.get(&r.index) {
            // Its replacement is healthy: it goes (a drained one too).
            Some(Some(AllocHealth::Healthy)) if !awaiting || !updated(r) => {
                stops.push(Stop { alloc: r.alloc, reason: r.reason });
            }
            // Its replacement runs, not yet healthy (or a canary awaiting
            // promotion): it keeps running meanwhile.
            Some(_) => {}
            None if updated(r) => {
                candidates.insert(r.index);
            }
            // A drained one with no replacement yet moves as drains do.
            None => continue,
        }
        settled.push(r.alloc);
    }
    w.replace.retain(|r| !settled.contains(&r.alloc));
    candidates.extend(held.iter().filter(|i| !news.contains_key(i)));
    let allowed = if awaiting && active {
        deployment.and_then(|d| d.group(&group.name)).map_or(0, |d| d.canaries).saturating_sub(canaries)
    } else {
        budget
    };
    let held_back: Vec<u32> = candidates.into_iter().skip(allowed as usize).collect();
    w.place.retain(|i| !held_back.contains(i));
}
