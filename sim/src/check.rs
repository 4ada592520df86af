//! The invariants, checked after every step of a run (transient overlaps
//! are the bugs), and convergence once the faults have stopped.
//!
//! Numbering follows the simulator's issue: (I1) at most one live copy of
//! an at-most-once instance, federation-wide, at every instant; (I3) no
//! orphan past a lease bound; (I4) no node over-committed, usage exact;
//! (I5) replicas that applied the same log hold the same bytes; (I6) no
//! instance outside its job's jurisdictions; (I7) a stop reaches every
//! copy within a bound; (I8) once faults stop, every wanted instance runs
//! exactly once, or is reported unplaceable with a reason (I2). From the review's section 3: (R4) an origin record never
//! moves back, and holds exist exactly while records hold; (R4b) no index
//! is both held and live here, or held twice.

use std::collections::{BTreeMap, BTreeSet};

use cluster_core::ids::{AllocId, JobId};
use cluster_core::model::{AllocStatus, JobType};
use cluster_core::state::ClusterState;
use federation::proto::origin::{End, Origin, Outbound, Phase};
use federation::proto::target::{InPhase, Target};
use federation::proto::{IndexState, Timing, outbound_key};
use federation::protocol::LABEL_ORIGIN;

use crate::world::{InstanceKey, KILL_MS_MAX, Violation, World};

/// How long after the protocol's lease and grace a target may still run
/// work its origin no longer tracks, or a stopped job's copy: a retry, a
/// commit, an agent sync and a kill.
pub const FENCE_SLACK_MS: u64 = 3_000;

#[derive(Default)]
pub struct Checker {
    /// When each (origin cluster, delegation id) was first seen revoking.
    revoking: BTreeMap<(usize, String), u64>,
    /// When each (cluster, job) stop was acknowledged, and every cluster's
    /// time without a leader until then.
    stopped: BTreeMap<(usize, String), (u64, Vec<u64>)>,
    /// The last phase rank seen for each (origin cluster, delegation id).
    ranks: BTreeMap<(usize, String), u8>,
    /// Since when each (cluster, allocation) has run untracked by its origin.
    untracked: BTreeMap<(usize, AllocId), u64>,
    /// Every origin record seen, as last seen, by (cluster, id); those
    /// collected since stay here, so the fences still cover them.
    outbound: BTreeMap<(usize, String), Outbound>,
    /// Origin records collected, and target records (inbound) seen and
    /// collected, by (cluster, id).
    outbound_gone: BTreeSet<(usize, String)>,
    inbound: BTreeSet<(usize, String)>,
    inbound_gone: BTreeSet<(usize, String)>,
}

fn violation(w: &World, invariant: &'static str, detail: String) -> Option<Violation> {
    Some(Violation { invariant, step: w.step, at_ms: w.now, detail })
}

impl Checker {
    /// Origin records the run saw collected.
    pub fn collected_outbound(&self) -> u64 {
        self.outbound_gone.len() as u64
    }

    /// Target records (tombstones) the run saw collected.
    pub fn collected_inbound(&self) -> u64 {
        self.inbound_gone.len() as u64
    }

    pub fn stopped(&mut self, cluster: usize, job: &str, now: u64, leaderless_ms: Vec<u64>) {
        self.stopped.entry((cluster, job.to_string())).or_insert((now, leaderless_ms));
    }

    /// The longest lease, grace and retry of any cluster, and the time to
    /// kill: past it, news of a stop has reached a target.
    fn fence_bound(w: &World) -> u64 {
        let most = |f: fn(&Timing) -> u64| w.clusters.iter().map(|c| f(&c.timing)).max().unwrap_or(0);
        most(|t| t.lease_ms) + most(|t| t.grace_ms) + most(|t| t.retry_ms) + KILL_MS_MAX + FENCE_SLACK_MS
    }

    pub fn after_step(&mut self, w: &World) -> Option<Violation> {
        self.collected(w)
            .or_else(|| self.fences(w))
            .or_else(|| self.copies(w))
            .or_else(|| self.jurisdictions(w))
            .or_else(|| self.orphans(w))
            .or_else(|| self.records(w))
            .or_else(|| self.usage(w))
            .or_else(|| self.replicas(w))
    }

    /// I1 (its cause, from the review's section 3): once the origin has
    /// given instances back (its record ended other than complete), none of
    /// them runs at the target any more. Strict for at-most-once work;
    /// `keep` work may outlive it only through a partition, a slow link, a
    /// target without a leader, or a cut-off node, while its renewals
    /// cannot arrive.
    fn fences(&mut self, w: &World) -> Option<Violation> {
        let bound = Self::fence_bound(w);
        for (o, origin) in w.clusters.iter().enumerate() {
            // I7 for updates and scale-downs: a revocation is carried out
            // within the fence bound, like a stop.
            for (r, _) in Origin::records(&origin.oracle).into_iter().filter(|(r, _)| r.phase == Phase::Revoking) {
                let since = *self.revoking.entry((o, r.id.clone())).or_insert(w.now);
                let Some(t) = w.clusters.iter().position(|c| c.name == r.target) else { continue };
                for node in &w.clusters[t].nodes {
                    let running = node.procs.values().any(|p| p.lease_of.as_deref() == Some(r.id.as_str()));
                    if running && w.now > since + bound && !Self::keep_excused(w, o, t, node) {
                        return violation(
                            w,
                            "I7 a revocation reaches every copy",
                            format!(
                                "{} revoked {} ({}) {}ms ago; it still runs in {}",
                                origin.name,
                                r.id,
                                r.note,
                                w.now - since,
                                r.target
                            ),
                        );
                    }
                }
            }
            // Given back whole, or an index of it (returned by the target);
            // a collected record as it was last seen (ended).
            for r in self.outbound.range((o, String::new())..).take_while(|((c, _), _)| *c == o).map(|(_, r)| r) {
                let Some(t) = w.clusters.iter().position(|c| c.name == r.target) else { continue };
                let target = &w.clusters[t];
                let given_back = |i: u32| !r.phase.holds() || !r.indices.contains(&i);
                for node in &target.nodes {
                    let of_it = |p: &&crate::world::Proc| p.lease_of.as_deref() == Some(r.id.as_str());
                    for p in node.procs.values().filter(of_it).filter(|p| given_back(p.key.3)) {
                        if p.at_most_once || !Self::keep_excused(w, o, t, node) {
                            return violation(
                                w,
                                "I1 fence before re-place",
                                format!(
                                    "{} gave back {} ({:?}, {}) but {}[{}] still runs in {}",
                                    origin.name, r.id, r.phase, r.note, p.key.1, p.key.3, target.name
                                ),
                            );
                        }
                    }
                }
            }
        }
        None
    }

    /// I1: at most one live copy of every at-most-once instance.
    fn copies(&self, w: &World) -> Option<Violation> {
        let mut seen: BTreeMap<&InstanceKey, (usize, usize, AllocId)> = BTreeMap::new();
        for (c, cl) in w.clusters.iter().enumerate() {
            for (n, node) in cl.nodes.iter().enumerate() {
                for (id, p) in node.procs.iter().filter(|(_, p)| p.at_most_once) {
                    if let Some((c0, n0, id0)) = seen.insert(&p.key, (c, n, *id)) {
                        let (o, j, g, i) = &p.key;
                        return violation(
                            w,
                            "I1 at most one copy",
                            format!(
                                "{o}/{j}.{g}[{i}] runs on {}/{} (allocation {}) and on {}/{} (allocation {})",
                                w.clusters[c0].name, w.clusters[c0].nodes[n0].id, id0.0, cl.name, node.id, id.0
                            ),
                        );
                    }
                }
            }
        }
        None
    }

    /// I6: every instance runs where its origin's policy and job allow.
    fn jurisdictions(&self, w: &World) -> Option<Violation> {
        for cl in &w.clusters {
            for p in cl.nodes.iter().flat_map(|n| n.procs.values()) {
                let Some(origin) = w.clusters.iter().find(|o| o.name == p.key.0) else { continue };
                let Some(job) = origin.oracle.job(&JobId::new(&p.key.1)) else { continue };
                if let Some(allowed) = origin.policy.allowed_jurisdictions(job) {
                    if !cl.jurisdictions.iter().any(|j| allowed.contains(j)) {
                        return violation(
                            w,
                            "I6 jurisdiction",
                            format!(
                                "{}/{}[{}] may run in {allowed:?} but runs in {}",
                                p.key.0, p.key.1, p.key.3, cl.name
                            ),
                        );
                    }
                }
            }
        }
        None
    }

    /// Whether `keep` work of origin `o` on `node` of target `t` may run on
    /// untracked now: news between the two could not flow within the
    /// fence bound (a partition or a slow link between the clusters, an
    /// origin or target without a leader, a node cut off from its servers
    /// or paused). Edge autonomy: such work runs on and is fenced after.
    fn keep_excused(w: &World, o: usize, t: usize, node: &crate::world::SimNode) -> bool {
        let bound = Self::fence_bound(w);
        let slow = [(o, t), (t, o)].iter().any(|&(a, b)| w.cut_until(a, b).max(w.delayed_until(a, b)) + bound > w.now);
        // Either end without a leader: nobody answers or sends renewals
        // (seed 9236: the origin's only server was down as the partition
        // healed). A node's own cluster without a leader is counted where
        // it matters instead: a stop's deadline moves by that time.
        let leaderless = o != t && [o, t].iter().any(|&c| w.clusters[c].leaderless_at + bound > w.now);
        slow || leaderless || node.cut_until.max(node.paused_until) + bound > w.now
    }

    /// I3 and I7: work a target runs is tracked by its origin, and a
    /// stopped job's copies end, within the fence bound.
    fn orphans(&mut self, w: &World) -> Option<Violation> {
        let bound = Self::fence_bound(w);
        let mut running: BTreeSet<(usize, AllocId)> = BTreeSet::new();
        for (c, cl) in w.clusters.iter().enumerate() {
            for (node, id, p) in cl.nodes.iter().flat_map(|n| n.procs.iter().map(move |(id, p)| (n, id, p))) {
                let Some(o) = w.clusters.iter().position(|o| o.name == p.key.0) else { continue };
                // `keep` work runs on through a partition, between clusters
                // or between an agent and its servers; it is fenced when
                // the partition heals.
                let excused = !p.at_most_once && Self::keep_excused(w, o, c, node);
                if let Some((since, leaderless)) = self.stopped.get(&(o, p.key.1.clone())) {
                    // Nobody tells an agent of a stop while its cluster has
                    // no leader (seed 245: the leader died just after the
                    // stop committed): the bound waits that long more.
                    let waited = w.clusters[c].leaderless_ms.saturating_sub(leaderless[c]);
                    if w.now > since + bound + waited && !excused {
                        return violation(
                            w,
                            "I7 a stop reaches every copy",
                            format!(
                                "{}/{}[{}] still runs in {} {}ms after its stop",
                                p.key.0,
                                p.key.1,
                                p.key.3,
                                cl.name,
                                w.now - since
                            ),
                        );
                    }
                }
                if p.lease_of.is_none() {
                    continue;
                }
                running.insert((c, *id));
                let tracked = Origin::records(&w.clusters[o].oracle).iter().any(|(r, _)| {
                    p.lease_of.as_deref() == Some(r.id.as_str())
                        && r.target == cl.name
                        && r.indices.contains(&p.key.3)
                        && matches!(r.phase, Phase::Offered | Phase::Registered)
                });
                if tracked || excused {
                    self.untracked.remove(&(c, *id));
                    continue;
                }
                let since = *self.untracked.entry((c, *id)).or_insert(w.now);
                if w.now > since + bound {
                    return violation(
                        w,
                        "I3 no orphan",
                        format!(
                            "{} runs {}/{}[{}] untracked by its origin for {}ms",
                            cl.name,
                            p.key.0,
                            p.key.1,
                            p.key.3,
                            w.now - since
                        ),
                    );
                }
            }
        }
        self.untracked.retain(|k, _| running.contains(k));
        None
    }

    /// R6: a delegation id whose record was collected never comes back: at
    /// its origin (a new delegation reusing it), at a target (a late offer
    /// that registers it again).
    fn collected(&mut self, w: &World) -> Option<Violation> {
        for (c, cl) in w.clusters.iter().enumerate() {
            let now: BTreeMap<String, Outbound> =
                Origin::records(&cl.oracle).into_iter().map(|(r, _)| (r.id.clone(), r)).collect();
            let gone: Vec<(usize, String)> =
                (self.outbound.keys()).filter(|(o, id)| *o == c && !now.contains_key(id)).cloned().collect();
            self.outbound_gone.extend(gone);
            for (id, r) in now {
                if self.outbound_gone.contains(&(c, id.clone())) {
                    return violation(
                        w,
                        "R6 collected ids stay gone",
                        format!("{} made {id} again after collecting it", cl.name),
                    );
                }
                self.outbound.insert((c, id), r);
            }
            let now: BTreeMap<String, bool> = (Target::records(&cl.oracle).into_iter())
                .map(|(r, _)| (r.id, r.phase == InPhase::Registered))
                .collect();
            let gone: Vec<(usize, String)> =
                (self.inbound.iter()).filter(|(t, id)| *t == c && !now.contains_key(id)).cloned().collect();
            for k in gone {
                self.inbound.remove(&k);
                self.inbound_gone.insert(k);
            }
            // A revocation asked again may leave a tombstone again; a
            // registration never comes back.
            for (id, registered) in now {
                if registered && self.inbound_gone.contains(&(c, id.clone())) {
                    return violation(
                        w,
                        "R6 collected ids stay gone",
                        format!(
                            "{} recorded {id} again after collecting its tombstone: a late message came through",
                            cl.name
                        ),
                    );
                }
                self.inbound.insert((c, id));
            }
        }
        None
    }

    /// R4 and R4b on every cluster's committed state.
    fn records(&mut self, w: &World) -> Option<Violation> {
        for (c, cl) in w.clusters.iter().enumerate() {
            let s = &cl.oracle;
            for (r, _) in Origin::records(s) {
                let rank = r.phase.rank();
                let last = self.ranks.insert((c, r.id.clone()), rank).unwrap_or(0);
                if rank < last {
                    return violation(w, "R4 records move forward", format!("{} went back to {:?}", r.id, r.phase));
                }
                let held = s.holds().get(&outbound_key(&r.id));
                if held.is_some() != r.phase.holds() {
                    return violation(
                        w,
                        "R4 hold while the record holds",
                        format!("{} is {:?}, held: {}", r.id, r.phase, held.is_some()),
                    );
                }
            }
            if let Some(v) = held_exclusive(s) {
                return violation(w, "R4b held is not live", format!("{}: {v}", cl.name));
            }
        }
        None
    }

    /// I4: usage is what the live allocations add up to, and never more
    /// than a node has.
    fn usage(&self, w: &World) -> Option<Violation> {
        for cl in &w.clusters {
            let s = &cl.oracle;
            let recomputed = s.recomputed_usage();
            for (i, node) in s.nodes().iter().enumerate() {
                let idx = cluster_core::ids::NodeIdx(i as u32);
                if *s.usage(idx) != recomputed[i] {
                    return violation(w, "I4 usage", format!("{}: usage drifted from its allocations", node.id));
                }
                if s.usage(idx).res.exceeds(Default::default(), node.capacity).is_some() {
                    return violation(w, "I4 no over-commit", format!("{} is over-committed", node.id));
                }
            }
        }
        None
    }

    /// I5: every replica that applied the whole log holds the same bytes,
    /// and a snapshot restores to the same bytes.
    fn replicas(&self, w: &World) -> Option<Violation> {
        if w.step % 10 != 0 {
            return None;
        }
        for cl in &w.clusters {
            let truth = cl.oracle.snapshot();
            for (r, server) in cl.servers.iter().enumerate() {
                let Some(core) = server.core.as_ref() else { continue };
                if core.applied() == cl.oracle_applied && server.state().read().expect("state").snapshot() != truth {
                    return violation(
                        w,
                        "I5 replicas identical",
                        format!("{} server {r} differs at entry {}", cl.name, core.applied()),
                    );
                }
            }
            if w.step % 50 == 0 {
                let restored = ClusterState::restore(&truth).map(|s| s.snapshot());
                if restored.as_ref() != Ok(&truth) {
                    return violation(w, "I5 replicas identical", format!("{}: a restored snapshot differs", cl.name));
                }
            }
        }
        None
    }

    /// I8: once the faults have stopped, every wanted instance of every
    /// job runs exactly once (a batch instance: runs or has completed).
    pub fn at_end(&mut self, w: &World) -> Option<Violation> {
        if let Some(v) = self.after_step(w) {
            return Some(v);
        }
        let mut live: BTreeMap<InstanceKey, u32> = BTreeMap::new();
        for p in w.clusters.iter().flat_map(|c| c.nodes.iter()).flat_map(|n| n.procs.values()) {
            if p.dying_ms.is_none() {
                *live.entry(p.key.clone()).or_default() += 1;
            }
        }
        for cl in &w.clusters {
            let s = &cl.oracle;
            for job in s.jobs().filter(|j| !j.stopped && !j.labels.contains_key(LABEL_ORIGIN)) {
                for g in &job.groups {
                    for i in 0..g.count {
                        let key = (cl.name.clone(), job.id.to_string(), g.name.to_string(), i);
                        let n = live.get(&key).copied().unwrap_or(0);
                        let done = job.job_type == JobType::Batch && batch_done(s, &job.id, &g.name, i, job.version);
                        if n > 1 || (n == 0 && !done && !reported_unplaceable(s, &job.id, &g.name, i)) {
                            // What the origin's log says of it, for whoever
                            // reads the failure.
                            let allocs: Vec<String> = (s.allocs_of_job(&job.id))
                                .filter(|a| a.group == g.name && a.index == i)
                                .map(|a| format!("{}:{:?}/{:?}@{}", a.id.0, a.status, a.desired, a.node))
                                .collect();
                            return violation(
                                w,
                                "I8 converges",
                                format!(
                                    "{}/{}.{}[{i}] runs {n} times {}s after the faults stopped (allocations here: [{}])",
                                    cl.name,
                                    job.id,
                                    g.name,
                                    (w.now - w.quiet_from_ms) / 1000,
                                    allocs.join(", ")
                                ),
                            );
                        }
                    }
                }
            }
        }
        None
    }
}

/// Whether instance `i` is reported unplaceable with a reason (I2): its
/// job's evaluation is blocked with the group unplaced, and no delegation
/// holds the index. Work that no cluster may take (an EU-only job when the
/// EU is full of work that could run anywhere) waits there, visibly.
fn reported_unplaceable(s: &ClusterState, job: &JobId, group: &str, i: u32) -> bool {
    let records: Vec<_> = Origin::records(s)
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r| r.job == job.as_str() && r.group == group && r.indices.contains(&i))
        .collect();
    let held = records.iter().any(|r| r.phase.holds());
    let offered_again = records.iter().any(|r| r.phase == Phase::Offered);
    let refused = records.iter().any(|r| r.phase == Phase::Ended(End::Refused));
    let blocked = s
        .blocked_evals()
        .filter_map(|e| s.eval(e))
        .any(|e| e.job == *job && e.unplaced.iter().any(|u| &*u.group == group && u.count > 0));
    // Blocked here and held nowhere; or offered again after a refusal: the
    // retry queue at work.
    (blocked && !held) || (refused && offered_again && records.iter().filter(|r| r.phase.holds()).count() == 1)
}

/// Whether instance `i` of a batch group completed, here or at a target.
fn batch_done(s: &ClusterState, job: &JobId, group: &str, i: u32, version: u64) -> bool {
    let here = s
        .allocs_of_job(job)
        .any(|a| &*a.group == group && a.index == i && a.status == AllocStatus::Complete && a.job_version == version);
    here || Origin::records(s).iter().any(|(r, _)| {
        r.job == job.as_str()
            && r.group == group
            && r.indices.contains(&i)
            && (r.phase == Phase::Ended(End::Complete)
                || r.states.iter().any(|(x, st)| *x == i && *st == IndexState::Complete))
    })
}

/// R4b: no index of a job is held and live here, or held twice.
fn held_exclusive(s: &ClusterState) -> Option<String> {
    let mut held: BTreeMap<(String, String, u32), &str> = BTreeMap::new();
    for (holder, h) in s.holds() {
        for i in &h.indices {
            if let Some(other) = held.insert((h.job.to_string(), h.group.to_string(), *i), holder) {
                return Some(format!("{}.{}[{i}] held by {other} and {holder}", h.job, h.group));
            }
        }
    }
    for a in s.allocs().filter(|a| a.is_live()) {
        if let Some(holder) = held.get(&(a.job.to_string(), a.group.to_string(), a.index)) {
            return Some(format!("{} runs here and is held by {holder}", a.name()));
        }
    }
    None
}
