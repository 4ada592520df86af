//! What clusters say to each other, over their servers' QUIC endpoints
//! (mutual TLS: the caller's certificate names its cluster), through the
//! one codec.

use cluster_core::codec;
use cluster_core::model::Job;
use serde::{Deserialize, Serialize};

use crate::delegation::{Delegation, Rejection, Report};

/// Labels a delegated job carries on its target.
pub const LABEL_ORIGIN: &str = "hanse.origin";
pub const LABEL_DELEGATION: &str = "hanse.delegation";
pub const LABEL_EPOCH: &str = "hanse.epoch";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    Offer(Offer),
    Status {
        id: String,
    },
    Revoke {
        id: String,
        epoch: u64,
    },
    /// The allocations a delegation's work has on the target.
    Allocations {
        id: String,
    },
}

/// N instances of one group: the job as the target will register it (one
/// group, its count the instances offered, its jurisdictions narrowed to
/// where the work may run).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Offer {
    pub id: String,
    pub origin: String,
    pub epoch: u64,
    pub job: Job,
    /// Clusters the work passed through before this one.
    pub hops: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerReply {
    Accepted { placed: u32 },
    Rejected { reason: Rejection, message: String },
    Report(Report),
    Revoked,
    Unknown,
    Allocations(Vec<cluster_core::server::api::AllocView>),
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v)
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    codec::decode(bytes, codec::DECODE_BYTES_MAX).map_err(|e| e.to_string())
}

/// The job id a delegation's work has on its target.
pub fn target_job_id(delegation: &str) -> String {
    delegation.replace('/', ".")
}

/// What the origin keeps, in its Raft log, for each delegation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub delegation: Delegation,
    /// The instances (of `delegation.group`) it covers.
    pub indices: Vec<u32>,
    /// The target's servers, as gossip named them when it was offered.
    pub target_addrs: Vec<std::net::SocketAddr>,
    /// Set once the target confirmed a revocation.
    pub fenced: bool,
    /// Why it ended, if it ended badly.
    pub note: String,
}

/// The key a delegation's record and hold have in the origin's state.
pub fn holder(id: &str) -> String {
    format!("delegation/{id}")
}
