//! What two clusters' leaders say to each other in delegation v2. Every
//! message names a delegation by its id, `ORIGIN/JOB/e<SEQ>-<GROUP>-<FIRST>`,
//! which is unique per set of instances; the sender's cluster is the one in
//! its certificate, never a field of the message.

use cluster_core::model::Job;
use serde::{Deserialize, Serialize};

use super::DelegationId;
use crate::delegation::Rejection;

/// Origin to target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToTarget {
    /// Take these instance indexes of the origin's job. `job` carries the
    /// one group, its count the number of indexes, its jurisdictions
    /// narrowed to where the work may run. Sent again, unchanged, until
    /// the answer is definite; the target answers a re-offer from its
    /// record. `grace_ms` is the origin's grace for this delegation: the
    /// target checks at-most-once work's kill timeout against the shorter
    /// of it and its own.
    Offer { id: String, job: Job, indices: Vec<u32>, grace_ms: u64 },
    /// Stop everything of this delegation, and never register it after.
    Revoke { id: String },
    /// The origin answers renewal `seq`: the target's lease runs from when
    /// it sent it, for `lease_ms` at most (the origin's lease, which its
    /// expiry is measured against; the target takes the shorter of it and
    /// its own). `untracked` names delegations in the renewal that the
    /// origin does not (or no longer) track: the target stops them.
    RenewAck { session: u64, seq: u64, lease_ms: u64, untracked: Vec<String> },
    /// The origin's promise (see [`Floor`]), sent beside a `RenewAck`
    /// when it changed, or a lease after the last. An origin of an earlier
    /// release sends none, and its targets keep their tombstones.
    Floor(Floor),
}

/// An origin's promise: of the delegations whose sequence (the `e<SEQ>`
/// of the id, see `Origin::delegate`) is below `floor`, it will offer,
/// track or revoke none but `pending` again (the records it has not
/// ended, and the ones it is committing). The target keeps the highest
/// floor in its log, refuses any other id below it without
/// a record, and so can drop its tombstones below it: the floor refuses a
/// late re-offer in their place. `floor` rises with the origin's log, so
/// a late one (lower or equal) is ignored. `incarnation` is drawn once
/// per origin cluster (kept across restores, new when it is rebuilt on
/// empty disks): a floor of a new incarnation replaces the old one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Floor {
    pub incarnation: u64,
    pub floor: u64,
    /// Sorted (the origin sends it so; the target sorts what it keeps).
    pub pending: Vec<String>,
}

impl Floor {
    /// Whether the promise covers delegation `id`: below the floor and not
    /// pending, so never to be offered, tracked or revoked again.
    pub fn covers(&self, id: &str) -> bool {
        DelegationId::parse(id).is_some_and(|d| d.eval < self.floor)
            && self.pending.binary_search_by(|p| p.as_str().cmp(id)).is_err()
    }
}

/// Target to origin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToOrigin {
    /// The definite answer to an offer, from the target's record.
    Outcome { id: String, outcome: Outcome },
    /// How many allocations of a revoked delegation are not yet terminal
    /// on the target; 0 is the definite "nothing alive".
    Revoked { id: String, alive: u32 },
    /// A lease renewal, carrying the per-index state of every delegation
    /// this target runs for the origin (status is pushed, not polled).
    ///
    /// `session` is drawn by each new target leader, so that an answer to
    /// an earlier leader's renewal `seq` can never extend this one's.
    Renew { session: u64, seq: u64, delegations: Vec<Progress> },
}

/// What a target did with an offer; recorded in its log before it is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// It registered exactly these instance indexes (a prefix of the ones
    /// offered), and keeps them running.
    Registered { indices: Vec<u32> },
    /// It refused the id for good: a tombstone is in its log.
    Refused { reason: Rejection, message: String },
}

/// One delegation's instances on its target, by the origin's index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub id: String,
    pub indices: Vec<(u32, IndexState)>,
}

/// One delegated instance, as its target reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexState {
    /// Registered, not yet running (being placed, or replaced).
    Pending,
    Running,
    /// A batch instance that finished; it is not run again anywhere.
    Complete,
    /// Failed past its restarts and reschedules.
    Failed,
    /// Given back: the target could not keep it (no node fits it there
    /// any more), has stopped it, and holds its index so it never runs
    /// there again. The origin places it again.
    Returned,
    /// Failed, and placed again at the target once its reschedule delay
    /// is over (its group's `[group.reschedule]`; the job's evaluation
    /// waits for it): not stuck. Once the wait is over and it still is
    /// not placed, it is `Pending` again.
    Rescheduling,
}
