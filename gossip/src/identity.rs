//! Gossip identities bound to certificates. A server signs, with its
//! certificate's key, what it gossips that others act on: its identity
//! (cluster, server, generation, gossip address, RPC address, region),
//! each summary, and its `left`. Every member verifies them against the
//! federation's CA ([`Trust`]): the certificate must name the cluster and
//! server the member claims, and a summary may claim only the
//! jurisdictions the certificate allows. Holding the federation's gossip
//! key is then not enough to speak for a cluster.
//!
//! Values (pure functions; the view verifies, the member signs):
//! - `identity` ([`crate::view::keys::IDENTITY`]) holds base64 of the codec's [`IdentityRecord`];
//! - `summary` ([`crate::view::keys::SUMMARY`]) holds `SUMMARY.SIGNATURE`, both base64 (no `.` in either);
//! - `left` ([`crate::view::keys::LEFT`]) holds `1.SIGNATURE`.
//!
//! Each signature covers a domain tag, the federation, the member's node
//! id and generation, so none can be replayed under another member or for
//! another purpose.

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use cluster_core::codec;
use cluster_core::transport::tls::{Role, Signer, Trust, Verified};
use serde::{Deserialize, Serialize};

/// The most bytes an identity record may take (a certificate with a few
/// names and jurisdictions is under 1 KB).
pub const IDENTITY_BYTES_MAX: usize = 4096;

/// A member's certificate and its signature of who it says it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The certificate, DER.
    pub cert: Vec<u8>,
    /// The TLS signature scheme of every signature this member makes.
    pub scheme: u16,
    /// Over [`identity_message`].
    pub signature: Vec<u8>,
}

/// Who a member says it is; what its identity signature covers.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub federation: &'a str,
    pub node_id: &'a str,
    pub generation: u64,
    /// Its gossip address (in its chitchat id).
    pub addr: SocketAddr,
    pub cluster: &'a str,
    pub server: &'a str,
    pub rpc_addr: Option<&'a str>,
    pub region: &'a str,
}

fn message(tag: &str, parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(tag.as_bytes());
    for p in parts {
        out.push(0);
        out.extend_from_slice(p.as_bytes());
    }
    out
}

pub fn identity_message(c: &Claim<'_>) -> Vec<u8> {
    let (generation, addr) = (c.generation.to_string(), c.addr.to_string());
    let parts = [c.federation, c.node_id, &generation, &addr, c.cluster, c.server, c.rpc_addr.unwrap_or(""), c.region];
    message("hanse-gossip-identity-v1", &parts)
}

fn summary_message(c: &Claim<'_>, text: &str) -> Vec<u8> {
    message("hanse-gossip-summary-v1", &[c.federation, c.node_id, &c.generation.to_string(), text])
}

fn left_message(c: &Claim<'_>) -> Vec<u8> {
    message("hanse-gossip-left-v1", &[c.federation, c.node_id, &c.generation.to_string()])
}

/// The [`crate::view::keys::IDENTITY`] value `signer` publishes for `claim`.
pub fn identity_value(signer: &Signer, claim: &Claim<'_>) -> String {
    let record = IdentityRecord {
        cert: signer.cert_der().to_vec(),
        scheme: signer.scheme(),
        signature: signer.sign(&identity_message(claim)),
    };
    STANDARD_NO_PAD.encode(codec::encode(&record))
}

/// `text` (an encoded summary) with `signer`'s signature appended.
pub fn signed_summary(signer: &Signer, claim: &Claim<'_>, text: &str) -> String {
    format!("{text}.{}", STANDARD_NO_PAD.encode(signer.sign(&summary_message(claim, text))))
}

/// The [`crate::view::keys::LEFT`] value: `1`, signed.
pub fn signed_left(signer: &Signer, claim: &Claim<'_>) -> String {
    format!("1.{}", STANDARD_NO_PAD.encode(signer.sign(&left_message(claim))))
}

/// A signed value's text and signature (base64), if it has one.
pub fn split(value: &str) -> (&str, Option<&str>) {
    match value.split_once('.') {
        Some((text, sig)) => (text, Some(sig)),
        None => (value, None),
    }
}

/// A member whose identity verified: its certificate and what it allows.
#[derive(Clone, Debug)]
pub struct Known {
    pub record: IdentityRecord,
    pub verified: Verified,
}

/// Verifies a member's [`crate::view::keys::IDENTITY`] value against `claim`: the
/// certificate chains to the CA and is valid at `now_ms`, names a server
/// of the claimed cluster by the claimed name, and signed the claim.
/// Errors say why, for an operator.
pub fn verify_identity(trust: &Trust, value: Option<&str>, claim: &Claim<'_>, now_ms: u64) -> Result<Known, String> {
    let value = value.ok_or("it gossips no signed identity (not a Hanse server of this release)")?;
    if value.len() > IDENTITY_BYTES_MAX * 4 / 3 + 4 {
        return Err("its identity record is over the size bound".into());
    }
    let bytes = STANDARD_NO_PAD.decode(value).map_err(|_| "its identity record is not base64")?;
    let record: IdentityRecord =
        codec::decode(&bytes, IDENTITY_BYTES_MAX).map_err(|e| format!("its identity record does not decode: {e}"))?;
    let verified = trust.verify_cert(&record.cert, now_ms).map_err(|e| format!("its certificate: {e}"))?;
    let id = &verified.identity;
    if id.role != Role::Server || id.cluster != claim.cluster || id.name != claim.server {
        return Err(format!("its certificate names {id}, not {}/server/{}", claim.cluster, claim.server));
    }
    if !trust.verify_signature(&record.cert, record.scheme, &identity_message(claim), &record.signature) {
        return Err("its identity signature does not verify".into());
    }
    Ok(Known { record, verified })
}

/// Whether `sig` (base64) is `known`'s signature of summary `text`.
pub fn verify_summary(trust: &Trust, known: &Known, claim: &Claim<'_>, text: &str, sig: Option<&str>) -> bool {
    verify(trust, known, &summary_message(claim, text), sig)
}

/// Whether a [`crate::view::keys::LEFT`] value is `known`'s signed `1`.
pub fn verify_left(trust: &Trust, known: &Known, claim: &Claim<'_>, value: &str) -> bool {
    let (text, sig) = split(value);
    text == "1" && verify(trust, known, &left_message(claim), sig)
}

fn verify(trust: &Trust, known: &Known, message: &[u8], sig: Option<&str>) -> bool {
    let Some(sig) = sig.and_then(|s| STANDARD_NO_PAD.decode(s).ok()) else { return false };
    trust.verify_signature(&known.record.cert, known.record.scheme, message, &sig)
}
