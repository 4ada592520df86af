//! What clusters say to each other, over their servers' QUIC endpoints
//! (mutual TLS: the caller's certificate names its cluster), through the
//! one codec.

use cluster_core::codec;
use serde::{Deserialize, Serialize};

use crate::proto::Message;

/// Labels a delegated job carries on its target.
pub use cluster_core::model::job::{LABEL_DELEGATION, LABEL_ORIGIN};

/// A call from another cluster's server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Delegation v2 messages from the leader of the caller's cluster (the
    /// cluster its certificate names), for this cluster's leader.
    Deliver(Vec<Message>),
    /// The allocations a delegation's work has on the target; only its
    /// origin may ask.
    Allocations { id: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerReply {
    /// This cluster's leader took the messages; its answers to the caller.
    Delivered(Vec<Message>),
    /// This server does not lead its cluster (or has not yet applied its
    /// log as leader): send to another of its servers.
    NotLeader,
    Allocations(Vec<cluster_core::server::api::AllocView>),
    /// Refused, with the reason (malformed, or not the caller's to ask).
    Refused(String),
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
