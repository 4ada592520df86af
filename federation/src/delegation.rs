//! A delegation's life (pure), as both ends keep it.
//!
//! The origin offers N instances of a group to a target under an id that
//! names the origin, the job and a sequence number, so a retried offer is
//! the same offer. The target accepts each id at most once. The origin
//! holds a lease: when the target is dead by gossip past the grace period,
//! or the lease lapses without news, it revokes the delegation by bumping
//! its epoch and places the work again; reports carrying an older epoch
//! are ignored, and a target that comes back learns the new epoch and stops
//! the fenced allocations. Time is an input, in milliseconds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Retry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Offered,
    Accepted,
    Running,
    Complete,
    Failed,
    /// Taken back by the origin; the target must stop what it runs for it.
    Revoked,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(self, State::Complete | State::Failed | State::Revoked)
    }
}

/// The origin's record of one delegation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delegation {
    /// `ORIGIN/JOB/SEQ`.
    pub id: String,
    pub target: String,
    pub job: String,
    pub group: String,
    pub count: u32,
    pub epoch: u64,
    pub state: State,
    pub created_ms: u64,
    /// Without news from the target by then, the delegation is revoked.
    pub lease_until_ms: u64,
    pub running: u32,
    pub complete: u32,
    pub failed: u32,
    /// When the target answered that it placed the instances.
    pub accepted_ms: Option<u64>,
}

/// What the target says about a delegation's allocations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub epoch: u64,
    pub running: u32,
    pub complete: u32,
    pub failed: u32,
}

impl Delegation {
    pub fn offer(id: String, target: &str, job: &str, group: &str, count: u32, now_ms: u64, retry: &Retry) -> Self {
        Delegation {
            id,
            target: target.into(),
            job: job.into(),
            group: group.into(),
            count,
            epoch: 1,
            state: State::Offered,
            created_ms: now_ms,
            lease_until_ms: now_ms + retry.lease_ms,
            running: 0,
            complete: 0,
            failed: 0,
            accepted_ms: None,
        }
    }

    pub fn accepted(&mut self, now_ms: u64, retry: &Retry) {
        if self.state == State::Offered {
            self.state = State::Accepted;
            self.accepted_ms = Some(now_ms);
        }
        self.lease_until_ms = self.lease_until_ms.max(now_ms + retry.lease_ms);
    }

    /// Applies a report; false (and nothing changes) if it is for an older
    /// epoch or the delegation is final.
    pub fn report(&mut self, r: &Report, now_ms: u64, retry: &Retry) -> bool {
        if r.epoch != self.epoch || self.state.is_final() {
            return false;
        }
        self.running = r.running;
        self.complete = r.complete;
        self.failed = r.failed;
        self.lease_until_ms = now_ms + retry.lease_ms;
        self.state = if r.complete + r.failed >= self.count {
            if r.failed > 0 { State::Failed } else { State::Complete }
        } else if r.running > 0 {
            State::Running
        } else {
            self.state
        };
        true
    }

    /// Whether the origin must take the work back now: the lease lapsed, or
    /// the target has been dead by gossip for longer than the grace period.
    pub fn must_revoke(&self, now_ms: u64, target_dead_since_ms: Option<u64>, retry: &Retry) -> bool {
        !self.state.is_final()
            && (now_ms >= self.lease_until_ms
                || target_dead_since_ms.is_some_and(|since| now_ms.saturating_sub(since) >= retry.grace_ms))
    }

    /// Takes the work back: a new epoch fences every report and allocation
    /// of the old one.
    pub fn revoke(&mut self) {
        if !self.state.is_final() {
            self.epoch += 1;
            self.state = State::Revoked;
        }
    }
}

/// Why a target refuses an offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// Its policy does not accept work from the origin.
    NotAccepted,
    /// None of its jurisdictions is one the work may run in.
    Jurisdiction,
    /// Taking it would pass its inbound share of capacity.
    InboundShare,
    /// Its scheduler cannot place the instances.
    NoCapacity,
    /// The work was already delegated once (hop limit).
    HopLimit,
}

/// The target's view of an offer, before it schedules anything.
pub struct OfferCheck<'a> {
    pub origin: &'a str,
    /// The jurisdictions the work may run in; `None` means anywhere.
    pub allowed: Option<&'a [String]>,
    /// Cpu the offer asks for, and what inbound work already uses, in
    /// millicores, against the cluster's total.
    pub ask_cpu_millis: u64,
    pub inbound_cpu_millis: u64,
    pub total_cpu_millis: u64,
    /// How many clusters the work has passed through already.
    pub hops: u32,
}

/// The checks a target makes itself, whatever the origin's policy said.
pub fn check_offer(policy: &Policy, offer: &OfferCheck) -> Result<(), Rejection> {
    if offer.hops >= 1 {
        return Err(Rejection::HopLimit);
    }
    if !policy.accepts_from(offer.origin) {
        return Err(Rejection::NotAccepted);
    }
    if let Some(allowed) = offer.allowed {
        if !policy.jurisdictions.iter().any(|j| allowed.contains(j)) {
            return Err(Rejection::Jurisdiction);
        }
    }
    let limit = policy.inbound.max_share_of_capacity * offer.total_cpu_millis as f64;
    if (offer.inbound_cpu_millis + offer.ask_cpu_millis) as f64 > limit {
        return Err(Rejection::InboundShare);
    }
    Ok(())
}

/// A target's memory of what it accepted: one acceptance per id, and the
/// epoch it runs under.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    by_id: BTreeMap<String, u64>,
}

impl Accepted {
    /// Records an acceptance; `false` if this id was accepted before (a
    /// retried offer), which must change nothing.
    pub fn accept(&mut self, id: &str, epoch: u64) -> bool {
        if self.by_id.contains_key(id) {
            return false;
        }
        self.by_id.insert(id.to_string(), epoch);
        true
    }

    /// The origin revoked `id` at `epoch`: true if the target must stop it.
    pub fn fence(&mut self, id: &str, epoch: u64) -> bool {
        match self.by_id.get_mut(id) {
            Some(e) if *e < epoch => {
                *e = epoch;
                true
            }
            _ => false,
        }
    }

    pub fn epoch(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }
}

/// A circuit breaker per peer: opens after `breaker_failures` failures in
/// a row, for `breaker_cooldown`; a success closes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Breaker {
    failures: u32,
    open_until_ms: Option<u64>,
    last_failure_ms: u64,
}

impl Breaker {
    pub fn failure(&mut self, now_ms: u64, retry: &Retry) {
        self.failures += 1;
        self.last_failure_ms = now_ms;
        if self.failures >= retry.breaker_failures {
            self.open_until_ms = Some(now_ms + retry.breaker_cooldown_ms);
        }
    }

    pub fn success(&mut self) {
        *self = Breaker::default();
    }

    pub fn is_open(&self, now_ms: u64) -> bool {
        self.open_until_ms.is_some_and(|t| now_ms < t)
    }

    /// Whether the peer may be tried now: closed, and the backoff since
    /// the last failure is over.
    pub fn ready(&self, now_ms: u64, retry: &Retry) -> bool {
        !self.is_open(now_ms) && (self.failures == 0 || now_ms >= self.last_failure_ms + self.backoff_ms(retry) / 2)
    }

    /// How long to wait before the next try: doubling from `backoff`, at
    /// most `backoff_max`.
    pub fn backoff_ms(&self, retry: &Retry) -> u64 {
        let doubled = retry.backoff_ms.saturating_mul(1u64 << self.failures.min(20));
        doubled.min(retry.backoff_max_ms)
    }
}
