//! The one codec seam: every wire and disk encoding in Hanse goes through
//! here, as a version byte followed by the body.
//!
//! The body is bincode 2.0.1 (pinned: bincode is unmaintained and 3.0.0 is
//! only a compile error). Swapping it is a change to this file alone, with a
//! new [`VERSION`] so that old and new encodings can be told apart.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The encoding of everything [`encode`] writes. 2: jobs carry a
/// namespace, the state its ACL tokens and policies, a plan its deferred
/// count; a log or peer of version 1 is refused by name, not misread.
/// 3: an exec task may name the `user` it runs as. 4: the state keeps its
/// garbage-collection marks; writes carry `Swap` and `Collect`. 5: groups
/// carry `update`, tasks `checks`; allocations their health and checks;
/// the state keeps job versions and deployments. 6: groups carry
/// `reschedule`; allocations their failure time and reschedule history;
/// evaluations and plans a `wait_until_ms`.
pub const VERSION: u8 = 6;

/// The largest body [`decode`] will ever look at, whatever the caller's
/// limit: a bound on what a corrupt length prefix can make it allocate.
pub const DECODE_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty input")]
    Empty,
    #[error("encoding version {0} is not known (this build reads version {VERSION})")]
    UnknownVersion(u8),
    #[error("{len} bytes exceed the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("{0} bytes left over after the value")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_BYTES_MAX>,
> {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Encodes `value` with the version byte first.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Encoding into a Vec fails only for types serde cannot represent
    // (e.g. maps with non-string keys are fine; unsized sequences are not),
    // which is a bug in the type, not an input error.
    let body = bincode::serde::encode_to_vec(value, config()).expect("every Hanse wire type is encodable");
    out.extend_from_slice(&body);
    out
}

/// Decodes what [`encode`] wrote, refusing input over `limit` bytes before
/// reading it, unknown versions, and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    if bytes.len() > limit.min(DECODE_BYTES_MAX) {
        return Err(CodecError::TooLarge { len: bytes.len(), limit: limit.min(DECODE_BYTES_MAX) });
    }
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    let (value, read) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != body.len() {
        return Err(CodecError::Trailing(body.len() - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Plan;
    use crate::resources::Resources;

    #[test]
    fn round_trip_with_version_byte() {
        let r = Resources { cpu_millis: 1500, memory_bytes: 1 << 30, disk_bytes: 0, power_watts: 12 };
        let bytes = encode(&r);
        assert_eq!(bytes[0], VERSION);
        assert_eq!(decode::<Resources>(&bytes, 1024), Ok(r));
    }

    #[test]
    fn refuses_what_it_should() {
        let bytes = encode(&(1u64, "x".to_string()));
        assert_eq!(decode::<(u64, String)>(&bytes, 2), Err(CodecError::TooLarge { len: bytes.len(), limit: 2 }));
        assert_eq!(decode::<u64>(&[], 10), Err(CodecError::Empty));
        assert_eq!(decode::<u64>(&[9, 1], 10), Err(CodecError::UnknownVersion(9)));
        let mut long = encode(&7u64);
        long.push(0);
        assert_eq!(decode::<u64>(&long, 10), Err(CodecError::Trailing(1)));
        assert!(matches!(decode::<Plan>(&[VERSION, 0xff, 0xff, 0xff], 10), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn a_huge_length_prefix_does_not_allocate() {
        // A string claiming 2^60 bytes: refused by the limit, not by running out of memory.
        let mut bytes = vec![VERSION, 253];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<String>(&bytes, 100).is_err());
    }
}
