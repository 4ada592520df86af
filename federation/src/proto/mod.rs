//! Delegation v2: the protocol's two ends as pure state machines.
//!
//! [`origin::Origin`] runs on the leader of the cluster that hands work
//! away, [`target::Target`] on the leader of the cluster that takes it.
//! Neither owns a socket, a clock or a thread: each takes the cluster's
//! applied state, a message or a tick, and `now` (milliseconds on the
//! leader's *monotonic* clock), and returns [`Action`]s: commands to commit
//! through the cluster's Raft log and messages to send. The shell (the
//! server's federation task, or the simulator) performs them. This is
//! raft-rs's `RawNode` shape, and it is what lets `hanse-sim` run the very
//! code production runs under a seeded schedule of faults.
//!
//! The guarantees (DESIGN.md section 7; ARCHITECTURE.md states the bounds):
//! - **Everything in the log first.** The origin commits its hold before
//!   an offer leaves; the target commits its registration (the exact
//!   instance indexes it took) or a tombstone before it answers. Both go
//!   through [`Command::Guarded`], a compare-and-swap on the record, so a
//!   re-offer or a stale leader can never register twice or take a record
//!   back.
//! - **Definite outcomes only.** The origin releases instances only on an
//!   answer that settles them ("refused", tombstoned; "revoked, none
//!   alive") or once the target's lease has certainly run out. A timeout
//!   is never an answer: the origin asks again by id.
//! - **A lease held by the target.** The target renews with each origin;
//!   its lease runs from the moment it *sent* a renewal the origin
//!   answered, on its own clock; the origin's copy runs from the moment it
//!   *received* that renewal, plus a grace. At-most-once work stops at the
//!   target before the origin may place it again; no lease reads a wall
//!   clock.
//! - **Counts by index.** Offers, answers and progress name instance
//!   indexes of the origin's job.

pub mod origin;
pub mod target;
pub mod wire;

use cluster_core::command::Command;

pub use wire::{Floor, IndexState, Outcome, ToOrigin, ToTarget};

/// Milliseconds on one leader's monotonic clock. Two clusters' values are
/// never compared: only durations travel.
pub type Millis = u64;

/// The protocol's timers, in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long one answered renewal lets the target keep at-most-once
    /// work running, from the moment the target sent it.
    pub lease_ms: u64,
    /// What the origin waits past `lease_ms`, from the moment it received
    /// the last renewal, before it may place the work again. It covers the
    /// target's stopping latency (a commit and its agents' next sync) and
    /// clock rate drift.
    pub grace_ms: u64,
    /// How often the target renews with each origin it runs work for.
    pub renew_every_ms: u64,
    /// How often an unanswered offer or revocation is sent again.
    pub retry_ms: u64,
    /// How often the origin collects the records of delegations that
    /// ended (see [`origin::Origin::collect`]).
    pub collect_every_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { lease_ms: 10_000, grace_ms: 5_000, renew_every_ms: 2_000, retry_ms: 1_000, collect_every_ms: 60_000 }
    }
}

/// Known bugs the simulator can switch on, to prove that its checker
/// catches them (FoundationDB's BUGGIFY, kept to named cases). All off in
/// production; nothing but `hanse-sim --plant` sets them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plants {
    /// Origin: an offer unanswered after half the retry interval counts
    /// as refused and its instances are placed again (review B1).
    pub release_on_timeout: bool,
    /// Target: a re-offered id is registered again instead of answered
    /// from its record (review B1.2, B3.2).
    pub forget_registration: bool,
    /// Target: the lease runs from the moment the answer to a renewal
    /// arrived, not from when the renewal was sent (lease on the wrong
    /// clock reading).
    pub lease_from_answer: bool,
    /// Origin: the instances are placed again when the lease runs out,
    /// without the grace that covers the target's stopping.
    pub no_grace: bool,
    /// Target: an answered renewal extends the lease of every delegation
    /// from that origin, not just the ones it named and the origin still
    /// tracks (the bug `hanse-sim` found in seeds 306 and 960).
    pub lease_per_origin: bool,
    /// Target: tombstones are dropped a retry interval after they are made, and
    /// the origin's floor is ignored (a time-to-live in place of the
    /// floor's promise).
    pub tombstones_expire: bool,
}

/// What a protocol end asks its shell to do.
// Actions live for one step and come a few at a time: boxing the command
// would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Commit a command through this cluster's log.
    Propose(Command),
    /// Commit a command; once it has applied (and was not refused), send
    /// `reply` to `to`. A refused command sends nothing: the peer asks
    /// again and gets the answer from the committed record.
    ProposeThenSend { command: Command, to: String, reply: Message },
    /// Send a message to a peer cluster.
    Send { to: String, message: Message },
}

/// A message between two clusters' leaders, either way.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Message {
    ToTarget(ToTarget),
    ToOrigin(ToOrigin),
}

/// The key of an origin's record (and hold) for delegation `id`.
pub fn outbound_key(id: &str) -> String {
    format!("delegation/{id}")
}

/// The key of a target's record for delegation `id`.
pub fn inbound_key(id: &str) -> String {
    format!("inbound/{id}")
}

/// The record of this cluster's incarnation as an origin (see
/// [`ToTarget::Floor`]): a random `u64`, committed by its first leader.
pub const INCARNATION_KEY: &str = "federation/incarnation";

/// The key of a target's record of `origin`'s floor (see [`ToTarget::Floor`]).
pub fn floor_key(origin: &str) -> String {
    format!("inbound-floor/{origin}")
}

/// A delegation id's parts: `ORIGIN/JOB/e<EVAL>-<GROUP>-<FIRST>`, with
/// `-a<ATTEMPT>` when it is not the first attempt at the same instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelegationId<'a> {
    pub origin: &'a str,
    /// The origin's evaluation that overflowed: ids rise with it.
    pub eval: u64,
    /// The id without its attempt: the same for every attempt at one set
    /// of instances from one evaluation.
    pub base: &'a str,
    /// 1 for the first attempt.
    pub attempt: u32,
}

impl<'a> DelegationId<'a> {
    /// Parses an id `Origin::delegate` made; `None` for anything else.
    pub fn parse(id: &'a str) -> Option<DelegationId<'a>> {
        let (origin, rest) = id.split_once('/')?;
        let (_job, tail) = rest.rsplit_once('/')?;
        let (eval, after) = tail.strip_prefix('e')?.split_once('-')?;
        let eval = eval.parse().ok().filter(|_| eval.bytes().all(|b| b.is_ascii_digit()))?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        // `<GROUP>-<FIRST>` or `<GROUP>-<FIRST>-a<N>`: the first index is
        // digits, an attempt is `a` and digits, a group may hold either.
        let (base, attempt) = match after.rsplit_once('-') {
            Some((before, last)) if last.starts_with('a') && digits(&last[1..]) => {
                let (_, first) = before.rsplit_once('-')?;
                if !digits(first) {
                    return None;
                }
                (&id[..id.len() - last.len() - 1], last[1..].parse().ok()?)
            }
            Some((_, first)) if digits(first) => (id, 1),
            _ => return None,
        };
        if origin.is_empty() || attempt < 1 {
            return None;
        }
        Some(DelegationId { origin, eval, base, attempt })
    }
}
