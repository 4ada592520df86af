//! Sealing gossip datagrams: authenticated encryption under the keyring,
//! with replay protection. Pure: the caller passes the time.
//!
//! A datagram is `header || ciphertext || tag`, the header authenticated as
//! associated data:
//!
//! ```text
//! version u8 | key id u32 | sender [u8; 16] | counter u64 | unix ms u64 | from addr | to addr
//! ```
//!
//! Addresses are 16 bytes of IPv6 (IPv4 mapped) and a port. `to` binds a
//! datagram to its receiver, so a capture cannot be replayed to another
//! member; `from` is the sender's gossip address, which the receiver
//! answers instead of the (unauthenticated) UDP source.
//!
//! The XChaCha20-Poly1305 nonce is `sender || counter`: the sender is 128
//! random bits chosen when a socket opens and the counter rises with every
//! datagram, so a nonce is never reused under a key. The receiver keeps,
//! per sender, the highest counter and a 64-wide window below it, and drops
//! a datagram whose counter it has seen, or whose time is further from its
//! own clock than the skew it tolerates ([`FRESHNESS_MS`] unless
//! configured; the bound on replays across a receiver restart, when its
//! windows are empty). Such a datagram is refused as
//! [`Reject::Skewed`], naming the sender and its clock's offset, so the
//! member can say whose clock is off instead of losing it in silence.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::keyring::Keyring;

pub const SEAL_VERSION: u8 = 2;
const ADDR_LEN: usize = 18;
pub const HEADER_LEN: usize = 1 + 4 + 16 + 8 + 8 + 2 * ADDR_LEN;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed datagram adds to its plaintext.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// How far a datagram's time may be from the receiver's clock, unless
/// configured otherwise ([`Opener::with_max_skew`]).
pub const FRESHNESS_MS: u64 = 60_000;
/// Senders whose replay windows are kept; the least recently heard is
/// forgotten first (the freshness bound still holds for it).
pub const SENDERS_MAX: usize = 4_096;
const WINDOW: u64 = 64;

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Too short, or an unknown format version.
    Malformed,
    /// Sealed with a key this ring does not hold.
    UnknownKey,
    /// The tag does not verify: forged or corrupted.
    BadTag,
    /// Seen before.
    Replay,
    /// Its time is further from ours than the skew tolerated: the
    /// sender's clock is off by `offset_ms` (positive: ahead), or it is a
    /// replay from long ago. `from` is its authenticated gossip address.
    Skewed { offset_ms: i64, from: SocketAddr },
    /// Sealed for another member.
    Misdirected,
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn get_addr(bytes: &[u8]) -> SocketAddr {
    let octets: [u8; 16] = bytes[..16].try_into().expect("16 bytes");
    let ip = Ipv6Addr::from(octets);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([bytes[16], bytes[17]]))
}

/// Seals datagrams from one sender to one receiver (a fresh sender id per
/// receiver keeps each receiver's counters consecutive, so its replay
/// window tolerates reordering).
pub struct Sealer {
    sender: [u8; 16],
    counter: u64,
}

impl Sealer {
    /// `sender` must be random and fresh for every sealer.
    pub fn new(sender: [u8; 16]) -> Sealer {
        Sealer { sender, counter: 0 }
    }

    pub fn random() -> Sealer {
        let mut sender = [0u8; 16];
        getrandom::fill(&mut sender).expect("the OS random source is available");
        Sealer::new(sender)
    }

    pub fn seal(
        &mut self,
        keyring: &Keyring,
        plaintext: &[u8],
        now_ms: u64,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Vec<u8> {
        self.counter += 1;
        let key = keyring.primary();
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&key.id().to_be_bytes());
        out.extend_from_slice(&self.sender);
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        put_addr(&mut out, from);
        put_addr(&mut out, to);
        let cipher = XChaCha20Poly1305::new(key.bytes().into());
        let sealed = cipher
            .encrypt(&nonce(&self.sender, self.counter), Payload { msg: plaintext, aad: &out })
            .expect("XChaCha20-Poly1305 seals any length a datagram can have");
        out.extend_from_slice(&sealed);
        out
    }
}

fn nonce(sender: &[u8; 16], counter: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(sender);
    n[16..].copy_from_slice(&counter.to_be_bytes());
    n.into()
}

#[derive(Clone, Copy, Debug)]
struct ReplayWindow {
    highest: u64,
    /// Bit i set: counter `highest - i` was seen.
    seen: u64,
    last_heard_ms: u64,
}

impl ReplayWindow {
    fn fresh(&self, counter: u64) -> bool {
        if counter > self.highest {
            return true;
        }
        let age = self.highest - counter;
        age < WINDOW && self.seen & (1 << age) == 0
    }

    fn mark(&mut self, counter: u64) {
        if counter > self.highest {
            let shift = counter - self.highest;
            self.seen = if shift >= WINDOW { 0 } else { self.seen << shift };
            self.highest = counter;
            self.seen |= 1;
        } else {
            self.seen |= 1 << (self.highest - counter);
        }
    }
}

pub struct Opener {
    windows: HashMap<[u8; 16], ReplayWindow>,
    max_skew_ms: u64,
}

impl Default for Opener {
    fn default() -> Self {
        Opener::with_max_skew(FRESHNESS_MS)
    }
}

impl Opener {
    pub fn new() -> Opener {
        Opener::default()
    }

    /// An opener that tolerates clocks up to `max_skew_ms` from its own.
    pub fn with_max_skew(max_skew_ms: u64) -> Opener {
        Opener { windows: HashMap::new(), max_skew_ms }
    }

    /// Verifies and decrypts a datagram addressed to `me`; returns the
    /// plaintext and the sender's gossip address. Replay state changes only
    /// for a datagram that authenticates, so forgeries cannot disturb it.
    pub fn open(
        &mut self,
        keyring: &Keyring,
        datagram: &[u8],
        now_ms: u64,
        me: SocketAddr,
    ) -> Result<(Vec<u8>, SocketAddr), Reject> {
        if datagram.len() < SEAL_OVERHEAD || datagram[0] != SEAL_VERSION {
            return Err(Reject::Malformed);
        }
        let (header, sealed) = datagram.split_at(HEADER_LEN);
        let key_id = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
        let sender: [u8; 16] = header[5..21].try_into().expect("16 bytes");
        let counter = u64::from_be_bytes(header[21..29].try_into().expect("8 bytes"));
        let sent_ms = u64::from_be_bytes(header[29..37].try_into().expect("8 bytes"));
        let from = get_addr(&header[37..37 + ADDR_LEN]);
        let to = get_addr(&header[37 + ADDR_LEN..]);
        let key = keyring.get(key_id).ok_or(Reject::UnknownKey)?;
        let cipher = XChaCha20Poly1305::new(key.bytes().into());
        let plaintext = cipher
            .decrypt(&nonce(&sender, counter), Payload { msg: sealed, aad: header })
            .map_err(|_| Reject::BadTag)?;
        // A counter seen before is a replay, whatever its time: only a new
        // datagram's time says something about its sender's clock.
        if self.windows.get(&sender).is_some_and(|w| !w.fresh(counter)) {
            return Err(Reject::Replay);
        }
        if sent_ms.abs_diff(now_ms) > self.max_skew_ms {
            let offset_ms = (i128::from(sent_ms) - i128::from(now_ms)).clamp(i64::MIN.into(), i64::MAX.into()) as i64;
            return Err(Reject::Skewed { offset_ms, from });
        }
        if to != me {
            return Err(Reject::Misdirected);
        }
        if let Some(w) = self.windows.get(&sender) {
            if !w.fresh(counter) {
                return Err(Reject::Replay);
            }
        } else if self.windows.len() >= SENDERS_MAX {
            let oldest = self.windows.iter().min_by_key(|(_, w)| w.last_heard_ms).map(|(s, _)| *s);
            if let Some(s) = oldest {
                self.windows.remove(&s);
            }
        }
        let w = self.windows.entry(sender).or_insert(ReplayWindow { highest: 0, seen: 0, last_heard_ms: now_ms });
        w.mark(counter);
        w.last_heard_ms = now_ms;
        Ok((plaintext, from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Key;

    fn ring() -> Keyring {
        Keyring::new(Key::from_bytes([7; 32]))
    }

    const A: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)), 7001);
    const B: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)), 7002);

    #[test]
    fn seals_and_opens() {
        let ring = ring();
        let mut s = Sealer::random();
        let mut o = Opener::new();
        let d = s.seal(&ring, b"hello", 1_000, A, B);
        assert_eq!(d.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(o.open(&ring, &d, 1_000, B).unwrap(), (b"hello".to_vec(), A));
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        let d = s.seal(&ring, b"six", 1_000, v6, B);
        assert_eq!(o.open(&ring, &d, 1_000, B).unwrap().1, v6);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let ring = ring();
        let mut s = Sealer::random();
        let d = s.seal(&ring, b"gossip payload", 1_000, A, B);
        for bit in 0..d.len() * 8 {
            let mut bad = d.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let r = Opener::new().open(&ring, &bad, 1_000, B);
            assert!(r.is_err(), "bit {bit} flipped and still accepted");
        }
    }

    #[test]
    fn forgeries_and_other_keys_are_refused() {
        let ring = ring();
        let mut o = Opener::new();
        assert_eq!(o.open(&ring, b"short", 0, B), Err(Reject::Malformed));
        let mut forged = vec![SEAL_VERSION];
        forged.extend_from_slice(&ring.primary().id().to_be_bytes());
        forged.extend_from_slice(&[0u8; HEADER_LEN - 5 + 40]);
        assert_eq!(o.open(&ring, &forged, 0, B), Err(Reject::BadTag));
        let other = Keyring::new(Key::from_bytes([8; 32]));
        let d = Sealer::random().seal(&other, b"x", 0, A, B);
        assert_eq!(o.open(&ring, &d, 0, B), Err(Reject::UnknownKey));
    }

    #[test]
    fn replays_are_refused_and_reordering_is_not() {
        let ring = ring();
        let mut s = Sealer::random();
        let mut o = Opener::new();
        let d: Vec<Vec<u8>> = (0..100).map(|i| s.seal(&ring, &[i as u8], 5_000, A, B)).collect();
        // Out of order within the window is fine.
        for i in [5usize, 3, 9, 4, 0] {
            assert!(o.open(&ring, &d[i], 5_000, B).is_ok(), "{i}");
        }
        assert_eq!(o.open(&ring, &d[3], 5_000, B), Err(Reject::Replay));
        assert!(o.open(&ring, &d[99], 5_000, B).is_ok());
        // Now 1..=35 are more than 64 behind 99: too old to tell, so refused.
        assert_eq!(o.open(&ring, &d[20], 5_000, B), Err(Reject::Replay));
        assert!(o.open(&ring, &d[60], 5_000, B).is_ok());
        assert_eq!(o.open(&ring, &d[99], 5_000, B), Err(Reject::Replay));
    }

    #[test]
    fn stale_datagrams_are_refused_even_by_a_fresh_receiver() {
        let ring = ring();
        let d = Sealer::random().seal(&ring, b"old", 1_000, A, B);
        let late = 1_000 + FRESHNESS_MS + 1;
        assert_eq!(
            Opener::new().open(&ring, &d, late, B),
            Err(Reject::Skewed { offset_ms: -(FRESHNESS_MS as i64) - 1, from: A })
        );
        assert!(Opener::new().open(&ring, &d, 1_000 + FRESHNESS_MS, B).is_ok());
        assert!(Opener::with_max_skew(FRESHNESS_MS + 1).open(&ring, &d, late, B).is_ok(), "the bound is configured");
    }

    #[test]
    fn a_datagram_for_one_member_is_refused_by_another() {
        let ring = ring();
        let d = Sealer::random().seal(&ring, b"for B", 0, A, B);
        assert_eq!(Opener::new().open(&ring, &d, 0, A), Err(Reject::Misdirected));
    }

    #[test]
    fn a_rotated_ring_opens_both_keys() {
        let mut ring = ring();
        let old = Sealer::random().seal(&ring, b"old", 0, A, B);
        let new_key = Key::from_bytes([9; 32]);
        ring.install(new_key.clone()).unwrap();
        ring.use_key(new_key.id()).unwrap();
        let new = Sealer::random().seal(&ring, b"new", 0, A, B);
        let mut o = Opener::new();
        assert!(o.open(&ring, &old, 0, B).is_ok());
        assert!(o.open(&ring, &new, 0, B).is_ok());
    }
}
