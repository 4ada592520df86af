//! The target's end of delegation v2 (pure): it answers offers from its
//! log (registering exactly the indexes it takes, or a tombstone), renews a
//! lease with every origin it runs work for, pushes per-index progress in
//! those renewals, and stops what an origin revokes or no longer tracks.
//!
//! The replicated truth is the [`Inbound`] record of each delegation id in
//! the target's state. [`Target`] keeps leader memory only: the leases,
//! which a new leader does not inherit. It starts with none, so until its
//! first renewal is answered it grants its agents no time for at-most-once
//! work; the grants the old leader made still bound them (see
//! [`Target::lease_remaining`]).

use std::collections::BTreeMap;

use cluster_core::command::Command;
use cluster_core::ids::JobId;
use cluster_core::model::job::Driver;
use cluster_core::model::job::OnDisconnect;
use cluster_core::model::{AllocStatus, Job};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::state::ClusterState;
use serde::{Deserialize, Serialize};

use super::wire::{Floor, IndexState, Outcome, Progress, ToOrigin, ToTarget};
use super::{Action, DelegationId, Message, Millis, Plants, Timing, floor_key, inbound_key};
use crate::delegation::{OfferCheck, Rejection, check_offer};
use crate::node::{free_cpu, inbound_cpu, inbound_unplaced_cpu, total_cpu};
use crate::policy::Policy;
use crate::protocol::{LABEL_DELEGATION, LABEL_ORIGIN, decode, encode, target_job_id};

/// The most renewals one origin may leave unanswered before the oldest are
/// forgotten (an answer to a forgotten one extends nothing).
pub const RENEWALS_IN_FLIGHT_MAX: usize = 64;
/// The least time between two renewals pushed because progress changed.
pub const PUSH_INTERVAL_MS: u64 = 100;
/// How many leases an index may wait here for a node that fits it before
/// it is given back to its origin.
pub const RETURN_AFTER_LEASES: u64 = 1;

/// The target's record of one delegation id, committed before any answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    pub id: String,
    pub origin: String,
    pub origin_job: String,
    pub group: String,
    /// The job it runs here (`target_job_id(id)`); local index `j` is the
    /// origin's index `indices[j]`.
    pub job: String,
    pub indices: Vec<u32>,
    pub phase: InPhase,
    pub at_most_once: bool,
    /// Origin indexes given back (a subset of `indices`): this cluster
    /// could not keep them, stopped them, and holds their local indexes
    /// (under this record's key) so they never run here again.
    pub returned: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InPhase {
    Registered,
    /// A tombstone: refused, and refused again on every re-offer.
    Refused {
        reason: Rejection,
        message: String,
    },
    /// Stopped for its origin; a tombstone too.
    Revoked,
}

impl Inbound {
    fn outcome(&self) -> Outcome {
        match &self.phase {
            InPhase::Registered => Outcome::Registered { indices: self.indices.clone() },
            InPhase::Refused { reason, message } => {
                Outcome::Refused { reason: reason.clone(), message: message.clone() }
            }
            InPhase::Revoked => Outcome::Refused { reason: Rejection::NotAccepted, message: "revoked".into() },
        }
    }
}

/// The target's renewals with one origin, and the lease of each
/// delegation they named.
#[derive(Clone, Debug, Default)]
struct Lease {
    /// Per delegation id: its at-most-once work may run until then (this
    /// leader's clock). Only a renewal that named the id, answered without
    /// calling it untracked, extends it: the origin vouches for each
    /// delegation, not for everything from this target.
    until: BTreeMap<String, Millis>,
    /// Renewals sent and not yet answered: sequence number to send time
    /// and the ids they named.
    sent: BTreeMap<u64, (Millis, Vec<String>)>,
    next_seq: u64,
    last_sent: Option<Millis>,
    last_progress: Vec<Progress>,
}

/// The target's leader memory. See the module docs.
#[derive(Debug)]
pub struct Target {
    timing: Timing,
    plants: Plants,
    leases: BTreeMap<String, Lease>,
    /// Per record key: when a change was last proposed.
    proposed: BTreeMap<String, Millis>,
    /// Seeds the dry run that sizes an offer.
    seed: u64,
    /// This leadership's renewal session (see [`ToOrigin::Renew`]).
    session: u64,
    /// Registrations proposed and not yet applied: id to (when, cpu in
    /// millicores). Offers decided before the last one applied count it as
    /// taken, so a batch of offers is not sized against the same room.
    admitting: BTreeMap<String, (Millis, u64)>,
    /// Per (delegation, local index): since when this leader has seen it
    /// with nothing alive and its job blocked for want of a node.
    unplaced: BTreeMap<(String, u32), Millis>,
    /// For [`Plants::tombstones_expire`] only: when each tombstone was
    /// first seen.
    tombstones_seen: BTreeMap<String, Millis>,
}

/// The allocations of `job` not yet terminal: what still runs, or may.
pub fn alive(state: &ClusterState, job: &str) -> u32 {
    state.allocs_of_job(&JobId::new(job)).filter(|a| !a.status.is_terminal()).count() as u32
}

impl Target {
    pub fn new(timing: Timing, plants: Plants, seed: u64) -> Target {
        // The session comes from the seed, which the shell draws afresh
        // for every leadership.
        let session = seed.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
        Target {
            timing,
            plants,
            leases: BTreeMap::new(),
            proposed: BTreeMap::new(),
            seed,
            session,
            admitting: BTreeMap::new(),
            unplaced: BTreeMap::new(),
            tombstones_seen: BTreeMap::new(),
        }
    }

    /// Every inbound record in `state`, with its raw bytes.
    pub fn records(state: &ClusterState) -> Vec<(Inbound, Vec<u8>)> {
        state.records("inbound/").filter_map(|(_, v)| Some((decode::<Inbound>(v).ok()?, v.clone()))).collect()
    }

    /// The highest floor `origin` sent that this cluster committed, with
    /// its raw bytes (none yet: floor 0).
    pub fn floor(state: &ClusterState, origin: &str) -> (Floor, Option<Vec<u8>>) {
        let bytes = state.record(&floor_key(origin));
        (bytes.and_then(|b| decode::<Floor>(b).ok()).unwrap_or_default(), bytes.map(<[u8]>::to_vec))
    }

    /// Why an offer or revocation of `id` is answered from the log without
    /// a record: its id is not one an origin makes, or the origin's floor
    /// covers it (its tombstone may be collected). A floor only rises, so
    /// the answer is as definite as a tombstone.
    fn settled_by_floor(&self, state: &ClusterState, from: &str, id: &str) -> Option<String> {
        if DelegationId::parse(id).is_none() {
            return Some(format!("{id} is not a delegation id"));
        }
        // Its registration is in flight here: the record will answer.
        if self.admitting.contains_key(id) && state.record(&inbound_key(id)).is_none() {
            return None;
        }
        let (floor, _) = Self::floor(state, from);
        (!self.plants.tombstones_expire && floor.covers(id))
            .then(|| format!("{id} is older than anything {from} still offers (its sequence is below {})", floor.floor))
    }

    /// `origin`'s tombstones that `floor` covers, as (key, bytes) for
    /// `Command::DropRecords`: refused ones, and revoked ones with nothing
    /// alive (a revocation asked again is answered "nothing alive" by the
    /// floor).
    fn covered(state: &ClusterState, origin: &str, floor: &Floor) -> Vec<(String, Vec<u8>)> {
        (Self::records(state).into_iter())
            .filter(|(r, _)| r.origin == origin && r.phase != InPhase::Registered)
            .filter(|(r, _)| floor.covers(&r.id))
            .filter(|(r, _)| r.phase != InPhase::Revoked || alive(state, &r.job) == 0)
            .take(super::origin::COLLECT_BATCH_MAX)
            .map(|(r, bytes)| (inbound_key(&r.id), bytes))
            .collect()
    }

    fn find(state: &ClusterState, id: &str) -> Option<(Inbound, Vec<u8>)> {
        let bytes = state.record(&inbound_key(id))?;
        Some((decode::<Inbound>(bytes).ok()?, bytes.to_vec()))
    }

    /// How long, from `now`, this leader lets at-most-once work for
    /// `origin` run: what is left of its lease. An agent adds this to the
    /// moment it *sent* the heartbeat this answers, so its own deadline
    /// ends no later than the lease (leases chained as in Gray and
    /// Cheriton's "Leases", 1989).
    pub fn lease_remaining(&self, origin: &str, id: &str, now: Millis) -> Millis {
        self.leases.get(origin).and_then(|l| l.until.get(id)).map_or(0, |u| u.saturating_sub(now))
    }

    fn propose(&mut self, key: &str, now: Millis) -> bool {
        if self.proposed.get(key).is_some_and(|t| now < t + self.timing.retry_ms) {
            return false;
        }
        self.proposed.insert(key.to_string(), now);
        true
    }

    /// A message from the leader of cluster `from` (the cluster its
    /// certificate names).
    pub fn on_message(
        &mut self,
        policy: &Policy,
        state: &ClusterState,
        from: &str,
        message: ToTarget,
        now: Millis,
    ) -> Vec<Action> {
        // An id names its origin first: nobody acts on another's work
        // (review B16).
        let owned = |id: &str| id.split('/').next() == Some(from);
        match message {
            ToTarget::Offer { id, job, indices, grace_ms } => {
                if !owned(&id) {
                    let refused = Outcome::Refused {
                        reason: Rejection::NotAccepted,
                        message: format!("{id} is not a delegation of {from}"),
                    };
                    return vec![reply(from, ToOrigin::Outcome { id, outcome: refused })];
                }
                self.on_offer(policy, state, from, id, job, &indices, grace_ms, now)
            }
            ToTarget::Floor(floor) => self.on_floor(state, from, floor, now),
            ToTarget::Revoke { id } => {
                if !owned(&id) {
                    return Vec::new();
                }
                self.on_revoke(state, from, &id, now)
            }
            ToTarget::RenewAck { session, .. } if session != self.session => Vec::new(),
            ToTarget::RenewAck { seq, untracked, lease_ms, .. } => {
                let lease_ms = self.timing.lease_ms.min(lease_ms);
                let answer_time = self.plants.lease_from_answer;
                let lease = self.leases.entry(from.to_string()).or_default();
                if let Some((sent, mut ids)) = lease.sent.remove(&seq) {
                    let start = if answer_time { now } else { sent };
                    if self.plants.lease_per_origin {
                        let all = Self::records(state).into_iter().filter(|(r, _)| r.origin == from);
                        ids = all.map(|(r, _)| r.id).collect();
                    }
                    let per_origin = self.plants.lease_per_origin;
                    for id in ids.into_iter().filter(|id| per_origin || !untracked.contains(id)) {
                        let until = lease.until.entry(id).or_insert(0);
                        *until = (*until).max(start + lease_ms);
                    }
                    lease.sent.retain(|s, _| *s > seq);
                }
                let mut actions = Vec::new();
                for id in untracked.iter().filter(|id| owned(id)) {
                    if let Some((r, bytes)) = Self::find(state, id) {
                        if r.phase == InPhase::Registered && r.origin == from {
                            actions.extend(self.revoke(&r, bytes, now));
                        }
                    }
                }
                actions
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_offer(
        &mut self,
        policy: &Policy,
        state: &ClusterState,
        from: &str,
        id: String,
        job: Job,
        indices: &[u32],
        grace_ms: u64,
        now: Millis,
    ) -> Vec<Action> {
        let key = inbound_key(&id);
        let known = Self::find(state, &id);
        if let Some((r, _)) = &known {
            if !self.plants.forget_registration {
                return vec![reply(from, ToOrigin::Outcome { id, outcome: r.outcome() })];
            }
        }
        if known.is_none() {
            if let Some(message) = self.settled_by_floor(state, from, &id) {
                let refused = Outcome::Refused { reason: Rejection::NotAccepted, message };
                return vec![reply(from, ToOrigin::Outcome { id, outcome: refused })];
            }
        }
        if !self.propose(&key, now) {
            return Vec::new();
        }
        let expect = known.map(|(_, b)| b);
        let group = job.groups.first().map(|g| g.name.to_string()).unwrap_or_default();
        let mut record = Inbound {
            id: id.clone(),
            origin: from.to_string(),
            origin_job: id.split('/').nth(1).unwrap_or_default().to_string(),
            group,
            job: target_job_id(&id),
            indices: Vec::new(),
            phase: InPhase::Registered,
            at_most_once: job.groups.first().is_some_and(|g| g.on_disconnect == OnDisconnect::Stop),
            returned: Vec::new(),
        };
        self.admitting.retain(|id, (t, _)| state.record(&inbound_key(id)).is_none() && now < *t + self.timing.retry_ms);
        let decided = self.decide(policy, state, from, &id, &job, indices, grace_ms);
        let (then, outcome) = match decided {
            Ok((local, taken)) => {
                let cpu = local.groups[0].resources().cpu_millis * u64::from(local.groups[0].count);
                self.admitting.insert(id.clone(), (now, cpu));
                record.indices = taken.clone();
                (vec![Command::RegisterJob(local)], Outcome::Registered { indices: taken })
            }
            Err((reason, message)) => {
                record.phase = InPhase::Refused { reason: reason.clone(), message: message.clone() };
                (Vec::new(), Outcome::Refused { reason, message })
            }
        };
        let command = Command::Guarded { holder: key, expect, record: encode(&record), then };
        let answer = Message::ToOrigin(ToOrigin::Outcome { id, outcome });
        vec![Action::ProposeThenSend { command, to: from.to_string(), reply: answer }]
    }

    /// Every check an offered job goes through, whatever the origin said:
    /// the spec's own limits, the policy, the inbound share, and a dry run
    /// of the scheduler. The job to register and the indexes it takes.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        policy: &Policy,
        state: &ClusterState,
        from: &str,
        id: &str,
        offered: &Job,
        indices: &[u32],
        origin_grace_ms: u64,
    ) -> Result<(Job, Vec<u32>), (Rejection, String)> {
        let malformed = |m: String| Err((Rejection::NotAccepted, m));
        let [group] = offered.groups.as_slice() else {
            return malformed(format!("an offer carries one group, not {}", offered.groups.len()));
        };
        // The names the HTTP path's checker refuses (agents build paths
        // from them): security review, row 10.
        if !cluster_core::spec::job::is_valid_name(&group.name) {
            return malformed(format!("`{}` is not a valid group name", group.name));
        }
        if let Some(bad) = group.tasks.iter().find(|t| !cluster_core::spec::job::is_valid_task_name(&t.name)) {
            return malformed(format!("`{}` is not a valid task name", bad.name));
        }
        if !group.reschedule.within_limits() {
            return malformed(format!("group `{}` has a reschedule policy past a spec's limits", group.name));
        }
        // Users are this cluster's own accounts: a peer does not name them.
        if let Some(t) = group.tasks.iter().find(|t| matches!(&t.driver, Driver::Exec { user: Some(_), .. })) {
            return malformed(format!(
                "task `{}` names a user to run as; delegated work runs as the target's task_user",
                t.name
            ));
        }
        if offered.job_type == cluster_core::model::JobType::System {
            return malformed("system jobs run on every node of their own cluster; they are not delegated".into());
        }
        if let Some(j) = state.job(&JobId::new(target_job_id(id))) {
            if j.labels.get(LABEL_DELEGATION).map(String::as_str) != Some(id) {
                return malformed(format!("job {} exists here and is not delegation {id}", j.id));
            }
        }
        // The origin waits its grace past the lease, this cluster stops by
        // its own: the kill timeout must fit half of the shorter.
        let grace_ms = self.timing.grace_ms.min(origin_grace_ms);
        let kill_ms = group.tasks.iter().map(|t| t.kill_timeout_ms).max().unwrap_or(0);
        if group.on_disconnect == OnDisconnect::Stop && kill_ms > grace_ms / 2 {
            return malformed(format!(
                "at-most-once work must stop within half the grace ({} ms), but its kill timeout is {kill_ms} ms: shorten `kill_timeout`",
                grace_ms / 2
            ));
        }
        let mut unique = indices.to_vec();
        unique.sort_unstable();
        unique.dedup();
        if indices.is_empty() || unique.len() != indices.len() || group.count as usize != indices.len() {
            return malformed("the offered indexes do not match the group's count".into());
        }
        if i64::from(group.count) > cluster_core::spec::job::GROUP_COUNT_MAX {
            return malformed(format!("{} instances are more than a group may run", group.count));
        }
        let allowed: Option<Vec<String>> =
            (!offered.jurisdictions.is_empty()).then(|| offered.jurisdictions.iter().map(|j| j.to_string()).collect());
        let per = group.resources().cpu_millis.max(1);
        // Taken already: offers this leader decided that have not applied,
        // and registered work not yet placed.
        let admitting: u64 =
            self.admitting.values().map(|(_, cpu)| cpu).sum::<u64>().saturating_add(inbound_unplaced_cpu(state));
        let (inbound, total) = (inbound_cpu(state).saturating_add(admitting), total_cpu(state));
        let check = OfferCheck {
            origin: from,
            allowed: allowed.as_deref(),
            ask_cpu_millis: per,
            inbound_cpu_millis: inbound,
            total_cpu_millis: total,
            hops: 0,
        };
        if let Err(reason) = check_offer(policy, &check) {
            let message = match reason {
                Rejection::InboundShare => format!(
                    "work from other clusters uses {inbound} of {total} millicores here, and {per} more would pass the {:.0}% limit",
                    100.0 * policy.inbound.max_share_of_capacity
                ),
                Rejection::Jurisdiction => format!(
                    "the work may run in [{}]; this cluster is in [{}]",
                    allowed.unwrap_or_default().join(", "),
                    policy.jurisdictions.join(", ")
                ),
                _ => format!("{reason:?}"),
            };
            return Err((reason, message));
        }
        let share_room = ((policy.inbound.max_share_of_capacity * total as f64) as u64).saturating_sub(inbound);
        let by_share = u32::try_from(share_room / per).unwrap_or(u32::MAX);
        let mut local = offered.clone();
        local.id = JobId::new(target_job_id(id));
        local.version = 0;
        local.stopped = false;
        local.labels.insert(LABEL_ORIGIN.into(), from.to_string());
        local.labels.insert(LABEL_DELEGATION.into(), id.to_string());
        local.groups[0].count = group.count.min(by_share);
        let config = SchedulerConfig { seed: self.seed, ..SchedulerConfig::default() };
        let fits = schedule(state, &local, &config).placements.len() as u32;
        // What earlier offers of this leader took and has not applied yet
        // is not free, whatever the dry run saw.
        let by_room = u32::try_from(free_cpu(state).saturating_sub(admitting) / per).unwrap_or(u32::MAX);
        let k = group.count.min(by_share).min(fits).min(by_room);
        if k == 0 {
            return Err((Rejection::NoCapacity, "no node fits an instance".into()));
        }
        local.groups[0].count = k;
        let taken = indices[..k as usize].to_vec();
        let origin_job = offered.id.to_string();
        cluster_core::model::job::mark_delegated(&mut local, from, &origin_job, &taken);
        Ok((local, taken))
    }

    fn on_revoke(&mut self, state: &ClusterState, from: &str, id: &str, now: Millis) -> Vec<Action> {
        match Self::find(state, id) {
            // Nothing can register it any more: nothing to record.
            None if self.settled_by_floor(state, from, id).is_some() => {
                vec![reply(from, ToOrigin::Revoked { id: id.to_string(), alive: 0 })]
            }
            None => {
                if !self.propose(&inbound_key(id), now) {
                    return Vec::new();
                }
                // Revoked before it ever arrived: a tombstone, so a late
                // offer can never register it (review B11).
                let record = Inbound {
                    id: id.to_string(),
                    origin: from.to_string(),
                    origin_job: id.split('/').nth(1).unwrap_or_default().to_string(),
                    group: String::new(),
                    job: target_job_id(id),
                    indices: Vec::new(),
                    phase: InPhase::Revoked,
                    at_most_once: false,
                    returned: Vec::new(),
                };
                let command = Command::Guarded {
                    holder: inbound_key(id),
                    expect: None,
                    record: encode(&record),
                    then: Vec::new(),
                };
                let answer = Message::ToOrigin(ToOrigin::Revoked { id: id.to_string(), alive: 0 });
                vec![Action::ProposeThenSend { command, to: from.to_string(), reply: answer }]
            }
            Some((r, _)) if r.origin != from => Vec::new(),
            Some((r, bytes)) if r.phase == InPhase::Registered => self.revoke(&r, bytes, now),
            Some((r, _)) => vec![reply(from, ToOrigin::Revoked { id: id.to_string(), alive: alive(state, &r.job) })],
        }
    }

    /// `from`'s floor: one above the floor committed is committed, in one
    /// compare-and-swap with the drop of the tombstones it covers; with
    /// one not above, the tombstones the committed floor covers go (work
    /// revoked since it was committed). Nothing is logged when nothing
    /// would go.
    fn on_floor(&mut self, state: &ClusterState, from: &str, floor: Floor, now: Millis) -> Vec<Action> {
        if self.plants.tombstones_expire {
            return Vec::new();
        }
        let (committed, expect) = Self::floor(state, from);
        let mut floor = floor;
        floor.pending.sort_unstable();
        floor.pending.dedup();
        // A floor only rises within an incarnation, and what one covered
        // stays covered: the origin may have collected it since, and no
        // longer knows to leave it out of `pending`. A new incarnation (the
        // origin rebuilt on empty disks) starts its own.
        // An origin that has not drawn its incarnation yet (0) resets
        // nothing.
        if floor.incarnation == 0 && committed.incarnation != 0 {
            return Vec::new();
        }
        let same = floor.incarnation == committed.incarnation;
        let raise = !same || floor.floor > committed.floor;
        if same {
            floor.pending.retain(|id| !committed.covers(id));
        }
        let by = if raise { &floor } else { &committed };
        let covered = Self::covered(state, from, by);
        // A new incarnation replaces a committed floor at once: the old
        // one's would refuse its first offers.
        let reset = expect.is_some() && !same;
        if (covered.is_empty() && !reset) || !self.propose(&floor_key(from), now) {
            return Vec::new();
        }
        let drop = (!covered.is_empty()).then(|| Command::DropRecords(covered));
        let command = match raise {
            true => Command::Guarded {
                holder: floor_key(from),
                expect,
                record: encode(&floor),
                then: drop.into_iter().collect(),
            },
            false => drop.expect("something covered"),
        };
        vec![Action::Propose(command)]
    }

    /// The planted bug [`Plants::tombstones_expire`]: every tombstone goes
    /// a retry interval after this leader first saw it.
    fn expire_tombstones(&mut self, state: &ClusterState, now: Millis) -> Vec<Action> {
        let tombstones: Vec<(String, Vec<u8>)> = (Self::records(state).into_iter())
            .filter(|(r, _)| r.phase != InPhase::Registered)
            .map(|(r, bytes)| (inbound_key(&r.id), bytes))
            .collect();
        let ttl = self.timing.retry_ms;
        let old: Vec<(String, Vec<u8>)> = (tombstones.into_iter())
            .filter(|(k, _)| now >= *self.tombstones_seen.entry(k.clone()).or_insert(now) + ttl)
            .collect();
        if old.is_empty() { Vec::new() } else { vec![Action::Propose(Command::DropRecords(old))] }
    }

    /// Moves a registered delegation to Revoked and stops its job.
    fn revoke(&mut self, r: &Inbound, expect: Vec<u8>, now: Millis) -> Vec<Action> {
        let key = inbound_key(&r.id);
        if !self.propose(&key, now) {
            return Vec::new();
        }
        let next = Inbound { phase: InPhase::Revoked, ..r.clone() };
        let command = Command::Guarded {
            holder: key,
            expect: Some(expect),
            record: encode(&next),
            then: vec![Command::StopJob(JobId::new(&r.job))],
        };
        vec![Action::Propose(command)]
    }

    /// Renewals, each carrying the progress of every delegation this
    /// cluster runs for that origin: every `renew_every_ms`, and at once
    /// (at most every [`PUSH_INTERVAL_MS`]) when progress changed.
    pub fn tick(&mut self, state: &ClusterState, now: Millis) -> Vec<Action> {
        // Pacing only needs what was proposed within a retry interval; a
        // registration whose record applied is no longer in flight.
        self.proposed.retain(|_, t| now < *t + self.timing.retry_ms);
        self.admitting.retain(|id, (t, _)| state.record(&inbound_key(id)).is_none() && now < *t + self.timing.retry_ms);
        let mut actions = self.give_back(state, now);
        if self.plants.tombstones_expire {
            actions.extend(self.expire_tombstones(state, now));
        }
        let mut by_origin: BTreeMap<String, Vec<Progress>> = BTreeMap::new();
        let mut floors: BTreeMap<String, Floor> = BTreeMap::new();
        for (r, _) in Self::records(state) {
            if r.phase == InPhase::Registered {
                let p = progress(state, &r);
                by_origin.entry(r.origin.clone()).or_default().push(p);
                continue;
            }
            // A tombstone its origin's committed floor does not cover yet:
            // that origin hears a renewal every lease even when this
            // cluster runs nothing for it (naming nothing), and answers
            // with its floor.
            let floor = floors.entry(r.origin.clone()).or_insert_with(|| Self::floor(state, &r.origin).0);
            if !floor.covers(&r.id) && DelegationId::parse(&r.id).is_some() {
                by_origin.entry(r.origin.clone()).or_default();
            }
        }
        for (origin, delegations) in by_origin {
            let every = if delegations.is_empty() { self.timing.lease_ms } else { self.timing.renew_every_ms };
            let lease = self.leases.entry(origin.clone()).or_default();
            let due = lease.last_sent.is_none_or(|t| {
                now >= t + every || (delegations != lease.last_progress && now >= t + PUSH_INTERVAL_MS)
            });
            if !due {
                continue;
            }
            let seq = lease.next_seq;
            lease.next_seq += 1;
            lease.sent.insert(seq, (now, delegations.iter().map(|p| p.id.clone()).collect()));
            // A lease is per delegation: one this renewal no longer names
            // has none left to extend (the planted bug holds one lease
            // per origin, and keeps it).
            if !self.plants.lease_per_origin {
                lease.until.retain(|id, _| delegations.iter().any(|p| p.id == *id));
            }
            while lease.sent.len() > RENEWALS_IN_FLIGHT_MAX {
                lease.sent.pop_first();
            }
            lease.last_sent = Some(now);
            lease.last_progress = delegations.clone();
            let message = Message::ToOrigin(ToOrigin::Renew { session: self.session, seq, delegations });
            actions.push(Action::Send { to: origin, message });
        }
        actions
    }
}

impl Target {
    /// Gives back the indexes this cluster cannot keep: those with nothing
    /// alive, not complete or failed, while their job waits blocked for a
    /// node, for [`RETURN_AFTER_LEASES`] leases. One compare-and-swap
    /// records them and holds their local indexes, so they are never placed
    /// here again (a hold is refused while an index is alive); the next
    /// renewal reports them `Returned`, and the origin places them again.
    fn give_back(&mut self, state: &ClusterState, now: Millis) -> Vec<Action> {
        let blocked: std::collections::BTreeSet<(JobId, String)> = state
            .blocked_evals()
            .filter_map(|e| state.eval(e))
            .flat_map(|e| e.unplaced.iter().filter(|u| u.count > 0).map(|u| (e.job.clone(), u.group.to_string())))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut actions = Vec::new();
        for (r, bytes) in Self::records(state).into_iter().filter(|(r, _)| r.phase == InPhase::Registered) {
            if !blocked.contains(&(JobId::new(&r.job), r.group.clone())) {
                continue;
            }
            let alive: std::collections::BTreeSet<u32> = (state.allocs_of_job(&JobId::new(&r.job)))
                .filter(|a| !a.status.is_terminal())
                .map(|a| a.index)
                .collect();
            let states = progress(state, &r).indices;
            let mut give = Vec::new();
            for (j, (i, st)) in states.iter().enumerate() {
                if *st != IndexState::Pending || alive.contains(&(j as u32)) {
                    continue;
                }
                let key = (r.id.clone(), j as u32);
                let since = *self.unplaced.entry(key.clone()).or_insert(now);
                seen.insert(key);
                if now >= since + RETURN_AFTER_LEASES * self.timing.lease_ms {
                    give.push(*i);
                }
            }
            if give.is_empty() || !self.propose(&inbound_key(&r.id), now) {
                continue;
            }
            let mut next = r.clone();
            next.returned.extend(give);
            let held: Vec<u32> = (r.indices.iter().enumerate())
                .filter(|(_, i)| next.returned.contains(i))
                .map(|(j, _)| j as u32)
                .collect();
            let record = encode(&next);
            let hold = Command::Hold {
                holder: inbound_key(&r.id),
                job: JobId::new(&r.job),
                group: r.group.as_str().into(),
                indices: held,
                spec: None,
                record: record.clone(),
            };
            let command =
                Command::Guarded { holder: inbound_key(&r.id), expect: Some(bytes), record, then: vec![hold] };
            actions.push(Action::Propose(command));
        }
        self.unplaced.retain(|k, _| seen.contains(k));
        actions
    }
}

/// Per origin index: what the target's allocations for it are doing.
pub fn progress(state: &ClusterState, r: &Inbound) -> Progress {
    let mut states: Vec<(u32, IndexState)> = r.indices.iter().map(|i| (*i, IndexState::Pending)).collect();
    let job = state.job(&JobId::new(&r.job));
    // Failed instances wait for their reschedule delay while the job's
    // evaluation is pending with a wait (not blocked for room).
    let waiting = state
        .job_eval(&JobId::new(&r.job))
        .is_some_and(|e| e.status == cluster_core::model::EvalStatus::Pending && e.wait_until_ms.is_some());
    let mut allocs: Vec<_> = state.allocs_of_job(&JobId::new(&r.job)).collect();
    allocs.sort_by_key(|a| a.id);
    for a in allocs {
        let Some(slot) = states.get_mut(a.index as usize) else { continue };
        match a.status {
            AllocStatus::Complete if a.is_live() || a.desired == cluster_core::model::DesiredStatus::Run => {
                slot.1 = IndexState::Complete;
            }
            AllocStatus::Running if a.is_live() => slot.1 = IndexState::Running,
            // Placed again (after a failure, a lost node): not yet running.
            AllocStatus::Pending if a.is_live() && slot.1 != IndexState::Complete => slot.1 = IndexState::Pending,
            // Allocations come oldest first: a replacement placed after
            // a failure says what the index does now.
            AllocStatus::Failed => {
                let policy = job.filter(|j| j.version == a.job_version).and_then(|j| j.group(&a.group));
                let final_ = match policy {
                    Some(g) => cluster_core::scheduler::reconcile::failed_for_good(&g.reschedule, a),
                    None => a.unrunnable(),
                };
                let wanted = a.desired == cluster_core::model::DesiredStatus::Run;
                if wanted && slot.1 != IndexState::Complete {
                    slot.1 = if final_ {
                        IndexState::Failed
                    } else if waiting {
                        IndexState::Rescheduling
                    } else {
                        // Its delay is over (or it fits nowhere): pending,
                        // so it is given back when it cannot be placed.
                        IndexState::Pending
                    };
                }
            }
            _ => {}
        }
    }
    for slot in states.iter_mut().filter(|(i, _)| r.returned.contains(i)) {
        slot.1 = IndexState::Returned;
    }
    Progress { id: r.id.clone(), indices: states }
}

fn reply(to: &str, message: ToOrigin) -> Action {
    Action::Send { to: to.to_string(), message: Message::ToOrigin(message) }
}
