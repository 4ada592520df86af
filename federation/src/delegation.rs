//! What both ends of a delegation check, whatever the other said (pure):
//! the target's own checks of an offer ([`check_offer`]), why it refuses
//! one ([`Rejection`]), and the origin's circuit breaker per peer
//! ([`Breaker`]). The protocol itself is [`crate::proto`].

use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Retry};

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
    if offer.inbound_cpu_millis.saturating_add(offer.ask_cpu_millis) as f64 > limit {
        return Err(Rejection::InboundShare);
    }
    Ok(())
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
