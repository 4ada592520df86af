//! The federation: what a cluster may hand to its peers, and to whom.
//!
//! - [`policy`]: policy files (`hanse policy check`), read with every
//!   problem located, and the limits they set on delegation.
//! - [`select`]: the pure core that ranks peers for a job's overflow from
//!   their gossip summaries and the policy, and says why each refused
//!   peer was refused.
//! - [`delegation`]: a delegation's states and epochs (pure): offered,
//!   accepted, running, complete, failed, revoked.
//!
//! Nothing here opens a socket or reads a clock: time is an input.

pub mod api;
pub mod delegation;
pub mod keyring;
pub mod local;
pub mod node;
pub mod policy;
pub mod proto;
pub mod protocol;
pub mod publish;
pub mod select;
