//! The origin's end of delegation v2 (pure): it holds instances in its log
//! before offering them, settles every offer by a definite answer, answers
//! its targets' lease renewals, carries stops and updates to every copy,
//! and places work again only when the target's lease has certainly run
//! out or the target said that nothing is alive.
//!
//! The replicated truth is the [`Outbound`] record of each delegation (and
//! its hold) in the origin's state; [`Origin`] keeps only leader memory
//! that is safe to lose: when each target was last heard from, and pacing.
//! A new leader builds a fresh `Origin` after applying the whole log, and
//! gives every target a full lease from that moment (the safe direction:
//! later, never sooner).

use std::collections::{BTreeMap, BTreeSet};

use cluster_core::command::Command;
use cluster_core::ids::JobId;
use cluster_core::model::{DelegateMode, Job};
use cluster_core::state::{ClusterState, settled_key, settled_value};
use serde::{Deserialize, Serialize};

use super::wire::{Floor, IndexState, Outcome, Progress, ToOrigin, ToTarget};
use super::{Action, DelegationId, INCARNATION_KEY, Message, Millis, Plants, Timing, outbound_key};
use crate::policy::Policy;
use crate::protocol::{LABEL_ORIGIN, decode, encode};

/// The origin's record of one delegation, committed in its log; the hold
/// on `indices` lives beside it under the same key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outbound {
    pub id: String,
    pub target: String,
    pub job: String,
    pub group: String,
    /// [`spec_fingerprint`] of the job when offered: a change other than
    /// `count` is an update, which revokes the delegation so the instances
    /// are placed again at the new version.
    pub spec: u64,
    /// The instance indexes held (all offered, then exactly the ones the
    /// target registered).
    pub indices: Vec<u32>,
    pub phase: Phase,
    /// The last state the target reported for each index.
    pub states: Vec<(u32, IndexState)>,
    /// Where the offer said the work may run; a policy or job that now
    /// allows something else revokes the delegation.
    pub jurisdictions: Vec<String>,
    /// Why it ended, for people.
    pub note: String,
    /// The lease and grace (milliseconds) in force when it was offered.
    /// Renewals of it are never answered with a longer lease, and its
    /// expiry never comes sooner than this lease and grace allow, whatever
    /// the policy says later: a policy that shortens the lease cannot cut
    /// short a lease already granted.
    pub lease_ms: u64,
    pub grace_ms: u64,
}

/// Where a delegation is. Moves only forward: Offered, Registered,
/// Revoking, Ended (Offered may go straight to Revoking or Ended).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Held and offered; no definite answer yet.
    Offered,
    /// The target registered `indices` and keeps them running.
    Registered,
    /// The origin asked the target to stop; the hold stays until the target
    /// answers that nothing is alive, or its lease has run out.
    Revoking,
    Ended(End),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum End {
    /// The target refused the offer (and tombstoned the id).
    Refused,
    /// The target confirmed that nothing of it is alive.
    Revoked,
    /// No renewal for a lease plus the grace: the target has stopped
    /// at-most-once work by now; `keep` work is fenced when it renews.
    Expired,
    /// Every instance completed (batch); the hold stays, so they are not
    /// run again.
    Complete,
}

impl Phase {
    /// Whether the record's instances stay held (covered, not placed here).
    pub fn holds(self) -> bool {
        !matches!(self, Phase::Ended(End::Refused | End::Revoked | End::Expired))
    }

    /// The order phases move in; a record never goes to a lower rank.
    pub fn rank(self) -> u8 {
        match self {
            Phase::Offered => 0,
            Phase::Registered => 1,
            Phase::Revoking => 2,
            Phase::Ended(_) => 3,
        }
    }
}

/// Instances of a blocked evaluation that may be offered to a peer.
#[derive(Clone, Debug, PartialEq)]
pub struct Overflowing {
    pub eval: u64,
    pub job: Job,
    pub group: String,
    /// Not running here and not held elsewhere, ascending; at most the
    /// number the evaluation could not place.
    pub indices: Vec<u32>,
    /// Instances of the job other clusters hold now (selection weighs its
    /// remote share by them).
    pub remote: u32,
    /// The peers that refused the job's work, while their refusal is on
    /// record ([`Origin::refused_by`]): left out of its selection.
    pub refused_by: BTreeSet<String>,
}

/// A stable 64-bit fingerprint of a job's spec for one group, `count`,
/// version and stop flag aside ([`Job::group_fingerprint`]).
pub fn spec_fingerprint(job: &Job, group: &str) -> u64 {
    job.group_fingerprint(group)
}

/// FNV-1a, 64 bits.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The part of `job` an offer carries: one group, `count` instances, its
/// jurisdictions narrowed by the policy. `None` when the policy allows no
/// jurisdiction at all: such work goes nowhere (review B10.3).
pub fn offered_job(policy: &Policy, job: &Job, group: &str, count: u32) -> Option<Job> {
    let mut offered = job.clone();
    offered.groups.retain(|g| &*g.name == group);
    offered.groups.first_mut()?.count = count;
    if let Some(allowed) = policy.allowed_jurisdictions(job) {
        if allowed.is_empty() {
            return None;
        }
        offered.jurisdictions = allowed.iter().map(|j| j.as_str().into()).collect();
    }
    Some(offered)
}

/// The origin's leader memory. See the module docs.
#[derive(Debug)]
pub struct Origin {
    cluster: String,
    timing: Timing,
    plants: Plants,
    /// When this leadership began: every target's lease counts from here at
    /// the earliest.
    began: Millis,
    /// When a renewal from each target was last received.
    heard: BTreeMap<String, Millis>,
    /// Per delegation: when this leader first and last sent its offer or
    /// revocation, and how many times.
    sent: BTreeMap<String, Sent>,
    /// Per record key: when a change to it was last proposed, and which
    /// (a fingerprint of the compare-and-swap), so the same change in
    /// flight is not proposed again before `retry_ms`. A different change
    /// (an answer arriving while the hold is in flight) goes at once: the
    /// compare-and-swap lets only one of them apply.
    proposed: BTreeMap<String, (Millis, u64)>,
    /// Per delegation: since when this leader has seen it not running in
    /// full (offered, or an index pending). Past `STUCK_LEASES` leases it
    /// is revoked and its instances placed again (review B2.3, B3).
    stuck: BTreeMap<String, Millis>,
    /// Delegations this leader decided have expired. The decision is final:
    /// renewals that arrive while its commit is in flight, or after a
    /// failed one, name them untracked and never extend their lease
    /// (`hanse-sim`, seed 2805 once raft-rs was in the loop: an ack sent
    /// beside the expiry's commit let the target start work the origin
    /// was placing again).
    ending: BTreeSet<String>,
    /// Delegations this leader proposed, and when, until it sees their
    /// records applied (or for [`PROPOSING_FORGET_MS`]): its floors name
    /// them pending.
    proposing: BTreeMap<String, Millis>,
    /// The floor this leader last sent each target, and when: a renewal
    /// is answered with one only when it changed, or a lease later.
    floors_sent: BTreeMap<String, (Millis, Floor)>,
    /// When this leader last proposed a collection of ended records, and
    /// the records that were collectable then.
    collected: Option<Millis>,
    seen_ended: BTreeSet<String>,
}

/// How long a proposed delegation whose record never applied is still
/// named pending: far past any commit (a proposal outlives no leadership,
/// and a new leader starts with every earlier entry applied).
pub const PROPOSING_FORGET_MS: u64 = 600_000;

/// The most records one collection drops (one log entry).
pub const COLLECT_BATCH_MAX: usize = 1_024;

/// How many leases a delegation may stay offered, or keep an index pending
/// at its target, before the origin takes it back.
pub const STUCK_LEASES: u64 = 4;

#[derive(Clone, Copy, Debug)]
struct Sent {
    first: Millis,
    last: Millis,
    times: u32,
}

impl Origin {
    /// Starts the origin's duties on a leader that has applied the whole log.
    pub fn new(cluster: &str, timing: Timing, plants: Plants, now: Millis) -> Origin {
        Origin {
            cluster: cluster.to_string(),
            timing,
            plants,
            began: now,
            heard: BTreeMap::new(),
            sent: BTreeMap::new(),
            proposed: BTreeMap::new(),
            stuck: BTreeMap::new(),
            ending: BTreeSet::new(),
            proposing: BTreeMap::new(),
            floors_sent: BTreeMap::new(),
            collected: None,
            seen_ended: BTreeSet::new(),
        }
    }

    /// Every delegation record in `state`, with its raw bytes (the value a
    /// compare-and-swap expects).
    pub fn records(state: &ClusterState) -> Vec<(Outbound, Vec<u8>)> {
        state.records("delegation/").filter_map(|(_, v)| Some((decode::<Outbound>(v).ok()?, v.clone()))).collect()
    }

    /// Blocked evaluations' instances that may leave the cluster: the job
    /// allows it, it did not come from another cluster (one hop), and the
    /// scheduler could not place them here.
    ///
    /// `now_ms` (Unix ms, the leader's clock): an instance still waiting
    /// for its reschedule delay is not offered.
    pub fn overflow(state: &ClusterState, now_ms: u64) -> Vec<Overflowing> {
        let mut out = Vec::new();
        for e in state.blocked_evals().filter_map(|e| state.eval(e)) {
            let Some(job) = state.job(&e.job) else { continue };
            if job.stopped || job.labels.contains_key(LABEL_ORIGIN) || job.federation.delegate == DelegateMode::Never {
                continue;
            }
            let work = cluster_core::scheduler::reconcile::reconcile(state, job, Some(now_ms));
            // An index still held (at an older spec, being replaced beside
            // it) is no peer's to take: it is replaced here or not at all.
            let held: BTreeSet<(String, u32)> = state.held_of_job(&job.id).map(|(g, i)| (g.to_string(), i)).collect();
            let remote = state.held_of_job(&job.id).count() as u32;
            let refused_by = Self::refused_by(state, job.id.as_str());
            for (g, w) in job.groups.iter().zip(work.groups) {
                let unplaced = e.unplaced.iter().filter(|u| u.group == g.name).map(|u| u.count).sum::<u32>();
                let indices: Vec<u32> = (w.place.into_iter())
                    .filter(|i| !held.contains(&(g.name.to_string(), *i)))
                    .take(unplaced as usize)
                    .collect();
                if !indices.is_empty() {
                    let (group, refused_by) = (g.name.to_string(), refused_by.clone());
                    out.push(Overflowing { eval: e.id.0, job: job.clone(), group, indices, remote, refused_by });
                }
            }
        }
        out
    }

    /// The origin's floor for `target` (see [`ToTarget::Floor`]): this
    /// cluster's incarnation (0 until its record is committed), the
    /// evaluation sequence of `state` (every id made from it or a later
    /// state is at or above it), and the ids below it that may still be
    /// offered, tracked or revoked: `target`'s records not ended, and the
    /// delegations this leader proposed whose records it has not yet seen
    /// applied (to any target: an id may be proposed to one, then another).
    pub fn floor(&self, state: &ClusterState, target: &str) -> Floor {
        let mut pending: BTreeSet<String> = (Self::records(state).into_iter())
            .filter(|(r, _)| r.target == target && !matches!(r.phase, Phase::Ended(_)))
            .map(|(r, _)| r.id)
            .collect();
        pending.extend(self.proposing.keys().cloned());
        let incarnation = state.record(INCARNATION_KEY).and_then(|b| decode::<u64>(b).ok()).unwrap_or(0);
        Floor { incarnation, floor: state.next_eval_id(), pending: pending.into_iter().collect() }
    }

    /// Records that no longer say anything: delegations that ended and
    /// hold nothing (refused, revoked, expired), at most
    /// [`COLLECT_BATCH_MAX`], as one compare-and-swap each. Their targets
    /// keep refusing them by the floor, and no id is made again: the hold
    /// and the release of every such delegation each opened an
    /// evaluation, so every id made since has a higher sequence. A
    /// completed delegation's record goes with its job instead (its hold
    /// is settled, see `cluster_core::state::settled_key`).
    pub fn collectable(state: &ClusterState) -> Vec<(String, Vec<u8>)> {
        (Self::records(state).into_iter())
            .filter(|(r, _)| matches!(r.phase, Phase::Ended(_)) && !r.phase.holds())
            .take(COLLECT_BATCH_MAX)
            .map(|(r, bytes)| (outbound_key(&r.id), bytes))
            .collect()
    }

    /// Every `Timing::collect_every_ms`, proposes the collection of the
    /// [`Origin::collectable`] records that were collectable at the pass
    /// before as well, so that an ended delegation stays visible (to
    /// `job status`) for at least one interval.
    pub fn collect(&mut self, state: &ClusterState, now: Millis) -> Option<Action> {
        if self.collected.is_some_and(|t| now < t + self.timing.collect_every_ms) {
            return None;
        }
        self.collected = Some(now);
        let now_collectable = Self::collectable(state);
        let due: Vec<(String, Vec<u8>)> =
            now_collectable.iter().filter(|(k, _)| self.seen_ended.contains(k)).cloned().collect();
        self.seen_ended = now_collectable.into_iter().map(|(k, _)| k).collect();
        (!due.is_empty()).then(|| Action::Propose(Command::DropRecords(due)))
    }

    /// The peers that refused `job`'s work and whose refusal is still on
    /// record (until collection takes it: one to two passes of
    /// `collect_every_ms`). The shells leave them out of the next rounds'
    /// selection for that job ([`Overflowing::refused_by`]), so work a
    /// peer keeps refusing (its inbound share is full, whatever its
    /// summary says) goes to the next peer in the ranking instead of back
    /// to it every round.
    pub fn refused_by(state: &ClusterState, job: &str) -> BTreeSet<String> {
        (Self::records(state).into_iter())
            .filter(|(r, _)| r.job == job && r.phase == Phase::Ended(End::Refused))
            .map(|(r, _)| r.target)
            .collect()
    }

    /// Delegates `work` to `target`: commits the record and the hold, and
    /// sends the offer once they are applied. Nothing when the policy lets
    /// the work run nowhere.
    ///
    /// The id is `ORIGIN/JOB/e<SEQ>-<GROUP>-<FIRST>`, where `SEQ` is the
    /// evaluation sequence of `state` (the id its next evaluation gets), so
    /// ids rise with the origin's log and the floor can speak for every id
    /// below it. It gains `-a<N>` (one past the highest attempt recorded)
    /// when an earlier delegation of the same instances from the same
    /// state has a record: a new delegation, never the old one's tombstone.
    pub fn delegate(
        &mut self,
        policy: &Policy,
        state: &ClusterState,
        work: &Overflowing,
        target: &str,
        now: Millis,
    ) -> Vec<Action> {
        let Some(&first) = work.indices.first() else { return Vec::new() };
        let seq = state.next_eval_id();
        let base = format!("{}/{}/e{seq}-{}-{first}", self.cluster, work.job.id, work.group);
        let prefix = outbound_key(&base);
        let attempt = (state.records(&prefix))
            .filter_map(|(k, _)| DelegationId::parse(&k["delegation/".len()..]).filter(|d| d.base == base))
            .map(|d| d.attempt + 1)
            .max()
            .unwrap_or(1);
        let id = if attempt == 1 { base } else { format!("{base}-a{attempt}") };
        let Some(job) = offered_job(policy, &work.job, &work.group, work.indices.len() as u32) else {
            return Vec::new();
        };
        let record = Outbound {
            id: id.clone(),
            target: target.to_string(),
            job: work.job.id.to_string(),
            group: work.group.clone(),
            spec: spec_fingerprint(&work.job, &work.group),
            indices: work.indices.clone(),
            phase: Phase::Offered,
            states: Vec::new(),
            jurisdictions: job.jurisdictions.iter().map(|j| j.to_string()).collect(),
            note: String::new(),
            lease_ms: self.timing.lease_ms,
            grace_ms: self.timing.grace_ms,
        };
        let key = outbound_key(&id);
        self.proposed.insert(key.clone(), (now, 0));
        self.sent.insert(id.clone(), Sent { first: now, last: now, times: 1 });
        self.proposing.insert(id.clone(), now);
        let bytes = encode(&record);
        let hold = Command::Hold {
            holder: key.clone(),
            job: JobId::new(&record.job),
            group: record.group.as_str().into(),
            indices: record.indices.clone(),
            spec: Some(record.spec),
            record: bytes.clone(),
        };
        vec![Action::ProposeThenSend {
            command: Command::Guarded { holder: key, expect: None, record: bytes, then: vec![hold] },
            to: target.to_string(),
            reply: Message::ToTarget(ToTarget::Offer {
                id,
                job,
                indices: work.indices.clone(),
                grace_ms: self.timing.grace_ms,
            }),
        }]
    }

    /// When the origin may treat `record`'s target as stopped: a lease and
    /// the grace after the last renewal heard from the target, this
    /// leadership's start, or this leader's first offer of it, whichever is
    /// latest. (A target that ran nothing of ours before renews nothing, so
    /// its last renewal alone may be long past: found by `hanse-sim`, seed
    /// 1344.) The lease and grace are the longer of the record's and this
    /// term's. Later is always safe; sooner is not.
    fn expires_at(&self, record: &Outbound) -> Millis {
        let heard = self.heard.get(&record.target).copied().unwrap_or(0);
        let from = heard.max(self.began).max(self.sent.get(&record.id).map_or(0, |s| s.first));
        let grace = if self.plants.no_grace { 0 } else { self.timing.grace_ms.max(record.grace_ms) };
        from + self.timing.lease_ms.max(record.lease_ms) + grace
    }

    /// Whether the job still wants this delegation as it is. One whose
    /// group changed since the offer is an update: let go at once, or,
    /// when the group rolls a new version out beside the old
    /// ([`Job::rolls_beside`]), once every index it holds has a healthy
    /// instance of the new version here (the deployment replaced them as
    /// it replaces local ones: `reconcile::stale_held`).
    fn wanted(policy: &Policy, state: &ClusterState, r: &Outbound) -> bool {
        let Some(job) = state.job(&JobId::new(&r.job)) else { return false };
        let Some(group) = job.group(&r.group) else { return false };
        let same_places = offered_job(policy, job, &r.group, 1)
            .is_some_and(|o| o.jurisdictions.iter().map(|j| j.to_string()).eq(r.jurisdictions.iter().cloned()));
        let current = spec_fingerprint(job, &r.group) == r.spec;
        let replaced = |i: &u32| {
            state.allocs_of_job(&job.id).any(|a| {
                a.is_live()
                    && a.job_version == job.version
                    && *a.group == *r.group
                    && a.index == *i
                    && a.health == Some(cluster_core::model::alloc::AllocHealth::Healthy)
            })
        };
        // Only a registered delegation whose hold names the spec it runs
        // (an offer re-sent now would carry the new one); and not while
        // the deployment awaits the promotion of its canaries (a healthy
        // canary at a held index is not yet the version's).
        let holds_spec = state.holds().get(&outbound_key(&r.id)).is_some_and(|h| h.spec == Some(r.spec));
        let awaiting = state
            .active_deployment(&job.id)
            .is_some_and(|d| d.job_version == job.version && d.awaits_promotion(&group.name));
        let rolling = !current
            && r.phase == Phase::Registered
            && holds_spec
            && job.rolls_beside(group)
            && (awaiting || !r.indices.iter().all(replaced));
        !job.stopped
            && (current || rolling)
            && r.indices.iter().all(|i| *i < group.count)
            && policy.may_delegate_to(&r.target)
            && same_places
    }

    fn propose(&mut self, key: &str, change: u64, now: Millis, action: Action) -> Option<Action> {
        if self.proposed.get(key).is_some_and(|(t, c)| *c == change && now < t + self.timing.retry_ms) {
            return None;
        }
        self.proposed.insert(key.to_string(), (now, change));
        Some(action)
    }

    /// A compare-and-swap from `expect` to `next`, releasing the hold when
    /// `next` no longer holds, and re-holding when its indices shrank.
    fn transition(&mut self, old: &Outbound, expect: &[u8], next: &Outbound, now: Millis) -> Option<Action> {
        self.transition_with(old, expect, next, Vec::new(), now)
    }

    /// [`Origin::transition`], with `first` applied before the hold changes
    /// in the same compare-and-swap.
    fn transition_with(
        &mut self,
        old: &Outbound,
        expect: &[u8],
        next: &Outbound,
        first: Vec<Command>,
        now: Millis,
    ) -> Option<Action> {
        let key = outbound_key(&next.id);
        let bytes = encode(next);
        let mut then = first;
        if !next.phase.holds() {
            then.push(Command::Release { holder: key.clone(), record: bytes.clone() });
        } else if next.indices != old.indices {
            then.push(Command::Hold {
                holder: key.clone(),
                job: JobId::new(&next.job),
                group: next.group.as_str().into(),
                indices: next.indices.clone(),
                spec: Some(next.spec),
                record: bytes.clone(),
            });
        }
        let change = fnv(expect) ^ fnv(&bytes).rotate_left(1);
        let command = Command::Guarded { holder: key.clone(), expect: Some(expect.to_vec()), record: bytes, then };
        self.propose(&key, change, now, Action::Propose(command))
    }

    fn due(&self, id: &str, now: Millis) -> bool {
        self.sent.get(id).is_none_or(|s| now >= s.last + self.timing.retry_ms)
    }

    fn mark_sent(&mut self, id: &str, now: Millis) -> u32 {
        let s = self.sent.entry(id.to_string()).or_insert(Sent { first: now, last: now, times: 0 });
        s.last = now;
        s.times += 1;
        s.times
    }

    /// The origin's periodic duties: offers and revocations sent again
    /// until answered, stops and updates carried to targets, expired
    /// leases ended.
    pub fn tick(&mut self, policy: &Policy, state: &ClusterState, now: Millis) -> Vec<Action> {
        let mut actions: Vec<Action> = self.collect(state, now).into_iter().collect();
        let records = Self::records(state);
        // Leader memory of delegations that ended, or whose record never
        // committed, goes; pacing only needs a retry interval's worth.
        let live: BTreeSet<&str> =
            records.iter().filter(|(r, _)| !matches!(r.phase, Phase::Ended(_))).map(|(r, _)| r.id.as_str()).collect();
        let quiet = self.timing.lease_ms + self.timing.grace_ms;
        self.sent.retain(|id, s| live.contains(id.as_str()) || now < s.last + quiet);
        self.proposed.retain(|_, (t, _)| now < *t + self.timing.retry_ms);
        self.proposing.retain(|id, t| state.record(&outbound_key(id)).is_none() && now < *t + PROPOSING_FORGET_MS);
        self.floors_sent.retain(|_, (t, _)| now < *t + self.timing.lease_ms);
        for (r, bytes) in records.iter().cloned() {
            if r.phase == Phase::Ended(End::Complete) && !Self::wanted(policy, state, &r) {
                // Done elsewhere, but the job changed or went: its indexes
                // are this cluster's to place again.
                let note = "complete; the job changed".to_string();
                let next = Outbound { phase: Phase::Ended(End::Revoked), note, ..r.clone() };
                actions.extend(self.transition(&r, &bytes, &next, now));
                continue;
            }
            if matches!(r.phase, Phase::Ended(_)) {
                self.stuck.remove(&r.id);
                self.ending.remove(&r.id);
                continue;
            }
            let live = matches!(r.phase, Phase::Offered | Phase::Registered);
            if live && !Self::wanted(policy, state, &r) {
                let next =
                    Outbound { phase: Phase::Revoking, note: "stopped or updated at the origin".into(), ..r.clone() };
                actions.extend(self.transition(&r, &bytes, &next, now));
                continue;
            }
            let running = r.phase == Phase::Registered
                && r.states.len() == r.indices.len()
                && r.states.iter().all(|(_, s)| {
                    matches!(
                        s,
                        IndexState::Running | IndexState::Complete | IndexState::Failed | IndexState::Rescheduling
                    )
                });
            if live && !running {
                let since = *self.stuck.entry(r.id.clone()).or_insert(now);
                if now >= since + STUCK_LEASES * self.timing.lease_ms {
                    let note = format!("not running at {} after {STUCK_LEASES} leases", r.target);
                    let next = Outbound { phase: Phase::Revoking, note, ..r.clone() };
                    actions.extend(self.transition(&r, &bytes, &next, now));
                    continue;
                }
            } else {
                self.stuck.remove(&r.id);
            }
            if self.ending.contains(&r.id) || now >= self.expires_at(&r) {
                self.ending.insert(r.id.clone());
                let next = Outbound {
                    phase: Phase::Ended(End::Expired),
                    note: "no renewal within the lease".into(),
                    ..r.clone()
                };
                actions.extend(self.transition(&r, &bytes, &next, now));
                continue;
            }
            let first = self.sent.get(&r.id).map_or(now, |s| s.first);
            if self.plants.release_on_timeout && r.phase == Phase::Offered && now >= first + self.timing.retry_ms / 2 {
                let next = Outbound { phase: Phase::Ended(End::Refused), note: "no answer".into(), ..r.clone() };
                actions.extend(self.transition(&r, &bytes, &next, now));
                continue;
            }
            if !self.due(&r.id, now) {
                continue;
            }
            match r.phase {
                Phase::Offered => {
                    self.mark_sent(&r.id, now);
                    let job = state.job(&JobId::new(&r.job));
                    let offer = job.and_then(|j| offered_job(policy, j, &r.group, r.indices.len() as u32));
                    if let Some(job) = offer {
                        let message =
                            ToTarget::Offer { id: r.id.clone(), job, indices: r.indices.clone(), grace_ms: r.grace_ms };
                        actions.push(Action::Send { to: r.target.clone(), message: Message::ToTarget(message) });
                    }
                }
                Phase::Revoking => {
                    self.mark_sent(&r.id, now);
                    let message = Message::ToTarget(ToTarget::Revoke { id: r.id.clone() });
                    actions.push(Action::Send { to: r.target.clone(), message });
                }
                Phase::Registered | Phase::Ended(_) => {}
            }
        }
        actions
    }

    /// A message from the leader of cluster `from` (the cluster its
    /// certificate names). Anything about a delegation `from` is not the
    /// target of is ignored.
    pub fn on_message(&mut self, state: &ClusterState, from: &str, message: ToOrigin, now: Millis) -> Vec<Action> {
        let find = |id: &str| {
            state
                .record(&outbound_key(id))
                .and_then(|b| Some((decode::<Outbound>(b).ok()?, b.to_vec())))
                .filter(|(r, _)| r.target == from)
        };
        match message {
            ToOrigin::Outcome { id, outcome } => {
                let Some((r, bytes)) = find(&id) else { return Vec::new() };
                if r.phase != Phase::Offered {
                    return Vec::new();
                }
                let next = match outcome {
                    Outcome::Registered { indices } if !indices.is_empty() && r.indices.starts_with(&indices) => {
                        let states = indices.iter().map(|i| (*i, IndexState::Pending)).collect();
                        Outbound { phase: Phase::Registered, indices, states, ..r.clone() }
                    }
                    Outcome::Registered { .. } => return Vec::new(),
                    Outcome::Refused { reason, message } => Outbound {
                        phase: Phase::Ended(End::Refused),
                        note: format!("refused ({reason:?}): {message}"),
                        ..r.clone()
                    },
                };
                self.transition(&r, &bytes, &next, now).into_iter().collect()
            }
            ToOrigin::Revoked { id, alive } => {
                let Some((r, bytes)) = find(&id) else { return Vec::new() };
                if r.phase != Phase::Revoking || alive > 0 {
                    return Vec::new();
                }
                let next = Outbound { phase: Phase::Ended(End::Revoked), ..r.clone() };
                self.transition(&r, &bytes, &next, now).into_iter().collect()
            }
            ToOrigin::Renew { session, seq, delegations } => {
                // A renewal naming nothing (a target that keeps only
                // tombstones of ours, asking for the floor) vouches for
                // nothing: it does not put expiries off.
                if !delegations.is_empty() {
                    self.heard.insert(from.to_string(), now);
                }
                let mut actions = Vec::new();
                let mut untracked = Vec::new();
                // Never a longer lease than any delegation named was
                // offered under (see `Outbound::lease_ms`).
                let mut lease_ms = self.timing.lease_ms;
                for p in delegations {
                    match find(&p.id) {
                        Some((r, bytes)) if matches!(r.phase, Phase::Offered | Phase::Registered) => {
                            // Its news still counts (a completion may win
                            // the compare-and-swap against an expiry), but
                            // an expiry decided is never vouched for again.
                            actions.extend(self.progress(state, &r, &bytes, &p, now));
                            if self.ending.contains(&r.id) {
                                untracked.push(p.id);
                            } else {
                                lease_ms = lease_ms.min(r.lease_ms);
                            }
                        }
                        _ => untracked.push(p.id),
                    }
                }
                let ack = ToTarget::RenewAck { session, seq, lease_ms, untracked };
                actions.push(Action::Send { to: from.to_string(), message: Message::ToTarget(ack) });
                let floor = self.floor(state, from);
                if self.floors_sent.get(from).is_none_or(|(_, last)| *last != floor) {
                    self.floors_sent.insert(from.to_string(), (now, floor.clone()));
                    actions.push(Action::Send {
                        to: from.to_string(),
                        message: Message::ToTarget(ToTarget::Floor(floor)),
                    });
                }
                actions
            }
        }
    }

    /// A renewal's news about one tracked delegation: it registered (if
    /// the answer to the offer was lost), its per-index states, and the
    /// indexes it returned, which leave the hold to be placed again.
    fn progress(
        &mut self,
        state: &ClusterState,
        r: &Outbound,
        bytes: &[u8],
        p: &Progress,
        now: Millis,
    ) -> Option<Action> {
        let indices: Vec<u32> = p.indices.iter().map(|(i, _)| *i).collect();
        let mut next = r.clone();
        if r.phase == Phase::Offered {
            if indices.is_empty() || !r.indices.starts_with(&indices) {
                return None;
            }
            next.phase = Phase::Registered;
            next.indices = indices;
        }
        let returned: Vec<u32> =
            p.indices.iter().filter(|(_, s)| *s == IndexState::Returned).map(|(i, _)| *i).collect();
        next.indices.retain(|i| !returned.contains(i));
        next.states = p.indices.iter().filter(|(i, _)| next.indices.contains(i)).copied().collect();
        if next.indices.is_empty() {
            next.phase = Phase::Ended(End::Revoked);
            next.note = format!("{} returned every instance", r.target);
        } else if next.states.len() == next.indices.len() && next.states.iter().all(|(_, s)| *s == IndexState::Complete)
        {
            next.phase = Phase::Ended(End::Complete);
        }
        if next == *r {
            return None;
        }
        if next.phase == Phase::Ended(End::Complete) {
            // Done elsewhere: the hold stays so the instances do not run
            // again, and, while the job stays at this version, no longer
            // keeps the finished job from collection.
            let version = state.job(&JobId::new(&r.job)).map_or(0, |j| j.version);
            let settled = Command::Record { holder: settled_key(&outbound_key(&r.id)), record: settled_value(version) };
            return self.transition_with(r, bytes, &next, vec![settled], now);
        }
        self.transition(r, bytes, &next, now)
    }
}
