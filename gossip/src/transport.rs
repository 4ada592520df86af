//! Encrypted gossip through chitchat's `Transport` trait.
//!
//! chitchat encodes its messages only inside its own UDP socket, so the
//! sealed transport runs that socket on loopback as a codec and relays:
//!
//! ```text
//! chitchat ──envelope──► inner UdpSocket (127.0.0.1) ──plaintext──► stand-in for peer P (127.0.0.1)
//!                                                                     │ compress, seal
//!                                                                     ▼
//!                                            outer socket (the gossip address) ──sealed──► P
//! ```
//!
//! and back: a sealed datagram from P is opened, decompressed and sent to
//! the inner socket from P's stand-in, so chitchat sees P's stand-in as the
//! sender, which [`SealedSocket::recv`] maps back to P. Plaintext never
//! leaves loopback, and the inner socket accepts only stand-ins: anything
//! else that reaches it is dropped and counted.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdp};
use tokio::task::JoinHandle;

use crate::keyring::Keyring;
use crate::net::{DATAGRAM_BYTES_MAX, DatagramNet, DatagramSocket};
use crate::seal::{Opener, Reject, SEAL_OVERHEAD, Sealer};

/// Stand-in sockets kept per member, each a file descriptor; the least
/// recently used goes first. Kept well under common 1,024-descriptor soft
/// limits; a member talks to a few peers per round, so an evicted peer's
/// stand-in is simply made again.
pub const STANDINS_MAX: usize = 512;
/// The most a datagram may decompress to: chitchat's own datagram limit
/// with room to spare, and a bound on a decompression bomb.
pub const PLAINTEXT_BYTES_MAX: usize = 4 * DATAGRAM_BYTES_MAX;
/// zstd's fast mode: a third of level 1's cost on gossip datagrams, which
/// still shrink well (node ids and summaries repeat).
const ZSTD_LEVEL: i32 = -3;
/// Smaller plaintexts are sealed as they are: compressing them costs more
/// CPU than the bytes are worth.
const COMPRESS_ABOVE_BYTES: usize = 1_024;
const RAW: u8 = 0;
const ZSTD: u8 = 1;

pub type SharedKeyring = Arc<RwLock<Keyring>>;

/// Counters of one member's gossip traffic.
#[derive(Debug, Default)]
pub struct GossipMetrics {
    pub datagrams_sent: AtomicU64,
    pub datagrams_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub rejected_malformed: AtomicU64,
    pub rejected_unknown_key: AtomicU64,
    pub rejected_bad_tag: AtomicU64,
    pub rejected_replay: AtomicU64,
    /// Refused for a clock further off than the skew tolerated.
    pub rejected_skewed: AtomicU64,
    pub rejected_misdirected: AtomicU64,
    /// Sealed datagrams over the UDP limit, not sent.
    pub oversize_dropped: AtomicU64,
    /// Datagrams at the inner socket from something other than a stand-in.
    pub unexpected_plaintext: AtomicU64,
    /// Peers whose datagrams were refused for their clock, by gossip
    /// address (at most [`SKEWED_PEERS_MAX`]).
    pub skewed: Mutex<BTreeMap<SocketAddr, SkewedPeer>>,
}

/// A peer whose gossip this member refuses because its clock is further
/// off than the skew tolerated (`[gossip] max_clock_skew`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SkewedPeer {
    /// Its gossip address, from the authenticated header.
    pub addr: SocketAddr,
    /// How far its clock was from this member's at the last datagram, in
    /// milliseconds (positive: ahead).
    pub offset_ms: i64,
    /// Datagrams refused for it since this member started.
    pub datagrams: u64,
    /// When the last one arrived, by this member's clock (unix ms).
    pub last_ms: u64,
    /// The skew tolerated, in milliseconds.
    pub bound_ms: u64,
    #[serde(skip)]
    logged_ms: u64,
}

/// Peers with a clock off that a member remembers; beyond, the least
/// recently heard is forgotten.
pub const SKEWED_PEERS_MAX: usize = 256;
/// How often, at most, a member logs one peer's clock as off.
pub const SKEW_LOG_EVERY_MS: u64 = 60_000;
/// How long a peer stays listed after its last refused datagram.
pub const SKEW_SHOWN_MS: u64 = 60_000;

impl GossipMetrics {
    /// Peers refused for their clock within the last [`SKEW_SHOWN_MS`].
    pub fn skewed_peers(&self, now_ms: u64) -> Vec<SkewedPeer> {
        let table = self.skewed.lock().expect("skew lock");
        table.values().filter(|p| now_ms.saturating_sub(p.last_ms) < SKEW_SHOWN_MS).cloned().collect()
    }

    /// Notes a datagram refused for its clock; logs the peer and its
    /// offset at most once per [`SKEW_LOG_EVERY_MS`] per peer.
    fn skewed(&self, from: SocketAddr, offset_ms: i64, bound_ms: u64, now_ms: u64) {
        let mut table = self.skewed.lock().expect("skew lock");
        if !table.contains_key(&from) && table.len() >= SKEWED_PEERS_MAX {
            let oldest = table.values().min_by_key(|p| p.last_ms).map(|p| p.addr);
            if let Some(a) = oldest {
                table.remove(&a);
            }
        }
        let p = table.entry(from).or_insert(SkewedPeer {
            addr: from,
            offset_ms,
            datagrams: 0,
            last_ms: now_ms,
            bound_ms,
            logged_ms: 0,
        });
        p.offset_ms = offset_ms;
        p.datagrams += 1;
        p.last_ms = now_ms;
        p.bound_ms = bound_ms;
        if p.logged_ms == 0 || now_ms.saturating_sub(p.logged_ms) >= SKEW_LOG_EVERY_MS {
            tracing::warn!(
                peer = %from,
                offset_ms,
                refused = p.datagrams,
                "gossip from {from} is refused: its clock is {} {} this server's, more than the {} tolerated \
                 (`[gossip] max_clock_skew`); fix the clock (NTP) on one side",
                fmt_offset(offset_ms.unsigned_abs()),
                if offset_ms > 0 { "ahead of" } else { "behind" },
                fmt_offset(bound_ms),
            );
            p.logged_ms = now_ms.max(1);
        }
    }
}

/// `7200.0 s`, `1.5 s`: an offset in seconds, for logs and the CLI.
pub fn fmt_offset(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1_000.0)
}

impl GossipMetrics {
    pub fn rejected(&self) -> u64 {
        [
            &self.rejected_malformed,
            &self.rejected_unknown_key,
            &self.rejected_bad_tag,
            &self.rejected_replay,
            &self.rejected_skewed,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    fn count(&self, r: Reject) {
        let c = match r {
            Reject::Malformed => &self.rejected_malformed,
            Reject::UnknownKey => &self.rejected_unknown_key,
            Reject::BadTag => &self.rejected_bad_tag,
            Reject::Replay => &self.rejected_replay,
            Reject::Skewed { .. } => &self.rejected_skewed,
            Reject::Misdirected => &self.rejected_misdirected,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often, at most, a member logs datagrams it could not open.
pub const UNOPENED_LOG_EVERY: Duration = Duration::from_secs(30);

/// Datagrams sealed with a key this member lacks, or that fail to verify,
/// logged at most once per [`UNOPENED_LOG_EVERY`] with the count since:
/// during a botched key rotation a member receives hundreds a second.
#[derive(Default)]
struct Unopened {
    last_logged: Option<Instant>,
    since: u64,
}

impl Unopened {
    fn note(&mut self, r: Reject, source: SocketAddr) {
        self.since += 1;
        if self.last_logged.is_some_and(|t| t.elapsed() < UNOPENED_LOG_EVERY) {
            return;
        }
        let why = match r {
            Reject::UnknownKey => "sealed with a key this member's keyring does not hold",
            _ => "that do not verify with the key they name (forged, corrupted, or another federation's key)",
        };
        tracing::warn!(
            datagrams = self.since,
            last_from = %source,
            "gossip datagrams {why}; if a key rotation is under way, install the new key on every member \
             (`hanse federation key install`) before using it"
        );
        self.last_logged = Some(Instant::now());
        self.since = 0;
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// chitchat's transport, sealing every datagram under `keyring`.
pub struct SealedTransport {
    net: Arc<dyn DatagramNet>,
    keyring: SharedKeyring,
    metrics: Arc<GossipMetrics>,
    /// A socket bound ahead of time (to learn the port behind port 0),
    /// used by the first `open` of its address.
    prebound: Mutex<Option<Arc<dyn DatagramSocket>>>,
    /// The address peers send to, if not the bound one; datagrams are
    /// sealed from it and must be addressed to it.
    advertise: Mutex<Option<SocketAddr>>,
    /// The clock skew tolerated, in milliseconds ([`Opener::with_max_skew`]).
    max_skew_ms: AtomicU64,
}

impl SealedTransport {
    pub fn new(net: Arc<dyn DatagramNet>, keyring: SharedKeyring, metrics: Arc<GossipMetrics>) -> Self {
        SealedTransport {
            net,
            keyring,
            metrics,
            prebound: Mutex::new(None),
            advertise: Mutex::new(None),
            max_skew_ms: AtomicU64::new(crate::seal::FRESHNESS_MS),
        }
    }

    /// Sets the clock skew tolerated for sockets opened from now on.
    pub fn set_max_skew(&self, skew: Duration) {
        self.max_skew_ms.store(skew.as_millis().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub fn set_advertise(&self, addr: SocketAddr) {
        *self.advertise.lock().expect("advertise lock") = Some(addr);
    }

    /// Binds `addr` now and returns the address bound, so that a member
    /// asked to listen on port 0 can advertise its real port.
    pub async fn prebind(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let socket = self.net.bind(addr).await?;
        let local = socket.local_addr();
        *self.prebound.lock().expect("prebound lock") = Some(socket);
        Ok(local)
    }
}

struct StandIn {
    socket: Arc<tokio::net::UdpSocket>,
    local: SocketAddr,
    task: JoinHandle<()>,
    last_used: u64,
}

#[derive(Default)]
struct StandIns {
    by_peer: HashMap<SocketAddr, StandIn>,
    by_local: HashMap<SocketAddr, SocketAddr>,
    tick: u64,
    /// Set when the socket is dropped: no stand-in is made after it, so a
    /// racing inbound datagram cannot keep the relay alive.
    closed: bool,
}

/// State shared by the socket, the outer receive loop and the stand-ins.
struct Relay {
    outer: Arc<dyn DatagramSocket>,
    /// This member's gossip address, as peers know it.
    me: SocketAddr,
    inner_addr: SocketAddr,
    keyring: SharedKeyring,
    metrics: Arc<GossipMetrics>,
    standins: Mutex<StandIns>,
    max_skew_ms: u64,
}

impl Relay {
    /// The stand-in for `peer`, made on first use.
    fn standin(self: &Arc<Self>, peer: SocketAddr) -> std::io::Result<(Arc<tokio::net::UdpSocket>, SocketAddr)> {
        let mut s = self.standins.lock().expect("stand-ins lock");
        if s.closed {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gossip socket closed"));
        }
        s.tick += 1;
        let tick = s.tick;
        if let Some(st) = s.by_peer.get_mut(&peer) {
            st.last_used = tick;
            return Ok((st.socket.clone(), st.local));
        }
        if s.by_peer.len() >= STANDINS_MAX {
            let oldest = s.by_peer.iter().min_by_key(|(_, st)| st.last_used).map(|(p, _)| *p);
            if let Some(p) = oldest.and_then(|p| s.by_peer.remove(&p).map(|st| (p, st))) {
                p.1.task.abort();
                s.by_local.remove(&p.1.local);
            }
        }
        let std_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        std_socket.set_nonblocking(true)?;
        let socket = Arc::new(tokio::net::UdpSocket::from_std(std_socket)?);
        let local = socket.local_addr()?;
        let task = tokio::spawn(self.clone().outbound(socket.clone(), peer));
        s.by_local.insert(local, peer);
        s.by_peer.insert(peer, StandIn { socket: socket.clone(), local, task, last_used: tick });
        Ok((socket, local))
    }

    /// Forgets `peer`'s stand-in (its task ended).
    fn forget(&self, peer: SocketAddr, local: SocketAddr) {
        let mut s = self.standins.lock().expect("stand-ins lock");
        if s.by_peer.get(&peer).is_some_and(|st| st.local == local) {
            s.by_peer.remove(&peer);
            s.by_local.remove(&local);
        }
    }

    /// Plaintext chitchat sent to `peer`'s stand-in: seal it and send it on.
    async fn outbound(self: Arc<Self>, standin: Arc<tokio::net::UdpSocket>, peer: SocketAddr) {
        let mut sealer = Sealer::random();
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        // One compression context per stand-in: making one costs far more
        // than compressing a datagram.
        let Ok(mut compressor) = zstd::bulk::Compressor::new(ZSTD_LEVEL) else { return };
        // The framed datagram (a kind byte, then the payload), written in
        // place: sized once, never zeroed again per datagram.
        let mut framed = vec![0u8; zstd::zstd_safe::compress_bound(DATAGRAM_BYTES_MAX) + 1];
        loop {
            let Ok((n, from)) = standin.recv_from(&mut buf).await else {
                if let Ok(local) = standin.local_addr() {
                    self.forget(peer, local);
                }
                return;
            };
            if from != self.inner_addr {
                self.metrics.unexpected_plaintext.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let len = if n > COMPRESS_ABOVE_BYTES {
                framed[0] = ZSTD;
                match compressor.compress_to_buffer(&buf[..n], &mut framed[1..]) {
                    Ok(len) => 1 + len,
                    Err(_) => continue,
                }
            } else {
                framed[0] = RAW;
                framed[1..=n].copy_from_slice(&buf[..n]);
                1 + n
            };
            let compressed = &framed[..len];
            if compressed.len() + SEAL_OVERHEAD > DATAGRAM_BYTES_MAX {
                self.metrics.oversize_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(bytes = compressed.len(), %peer, "gossip datagram over the UDP limit after compression; dropped");
                continue;
            }
            let sealed = {
                let ring = self.keyring.read().expect("keyring lock");
                sealer.seal(&ring, compressed, unix_ms(), self.me, peer)
            };
            if self.outer.send_to(&sealed, peer).await.is_ok() {
                self.metrics.datagrams_sent.fetch_add(1, Ordering::Relaxed);
                self.metrics.bytes_sent.fetch_add(sealed.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Sealed datagrams from the network: open them and hand them to the
    /// inner socket from the sender's stand-in.
    async fn inbound(self: Arc<Self>) {
        let mut opener = Opener::with_max_skew(self.max_skew_ms);
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX + 1];
        let Ok(mut decompressor) = zstd::bulk::Decompressor::new() else { return };
        // Reused for every datagram: a fresh buffer this size would be an
        // mmap and page faults each time.
        let mut plain: Vec<u8> = Vec::with_capacity(PLAINTEXT_BYTES_MAX);
        let mut unopened = Unopened::default();
        loop {
            let (n, _udp_source) = match self.outer.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return,
                Err(_) => continue,
            };
            let now = unix_ms();
            let opened = {
                let ring = self.keyring.read().expect("keyring lock");
                opener.open(&ring, &buf[..n], now, self.me)
            };
            // The sender is who the sealed header says, not the UDP source:
            // replies go to an authenticated address.
            let (compressed, from) = match opened {
                Ok(p) => p,
                Err(r) => {
                    self.metrics.count(r);
                    match r {
                        Reject::UnknownKey | Reject::BadTag => unopened.note(r, _udp_source),
                        Reject::Skewed { offset_ms, from } => {
                            self.metrics.skewed(from, offset_ms, self.max_skew_ms, now)
                        }
                        _ => {}
                    }
                    continue;
                }
            };
            plain.clear();
            let ok = match compressed.split_first() {
                Some((&RAW, body)) => {
                    plain.extend_from_slice(body);
                    true
                }
                Some((&ZSTD, body)) => decompressor.decompress_to_buffer(body, &mut plain).is_ok(),
                _ => false,
            };
            if !ok {
                self.metrics.count(Reject::Malformed);
                continue;
            }
            self.metrics.datagrams_received.fetch_add(1, Ordering::Relaxed);
            if let Ok((standin, _)) = self.standin(from) {
                let _ = standin.send_to(&plain, self.inner_addr).await;
            }
        }
    }

    fn peer_of(&self, standin: SocketAddr) -> Option<SocketAddr> {
        self.standins.lock().expect("stand-ins lock").by_local.get(&standin).copied()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(s) = self.standins.lock() {
            for st in s.by_peer.values() {
                st.task.abort();
            }
        }
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let prebound = self.prebound.lock().expect("prebound lock").take().filter(|s| s.local_addr() == listen_addr);
        let outer = match prebound {
            Some(s) => s,
            None => self.net.bind(listen_addr).await?,
        };
        let me = self.advertise.lock().expect("advertise lock").unwrap_or_else(|| outer.local_addr());
        let inner = ChitchatUdp::open((Ipv4Addr::LOCALHOST, 0).into()).await?;
        let relay = Arc::new(Relay {
            outer,
            me,
            inner_addr: inner.local_addr()?,
            keyring: self.keyring.clone(),
            metrics: self.metrics.clone(),
            standins: Mutex::new(StandIns::default()),
            max_skew_ms: self.max_skew_ms.load(Ordering::Relaxed),
        });
        let inbound = tokio::spawn(relay.clone().inbound());
        Ok(Box::new(SealedSocket { inner, relay, inbound }))
    }
}

pub struct SealedSocket {
    inner: ChitchatUdp,
    relay: Arc<Relay>,
    inbound: JoinHandle<()>,
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        self.inbound.abort();
        if let Ok(mut s) = self.relay.standins.lock() {
            s.closed = true;
            for (_, st) in s.by_peer.drain() {
                st.task.abort();
            }
        }
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.relay.outer.local_addr())
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let (_, standin) = self.relay.standin(to)?;
        self.inner.send(standin, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let mut outcome = self.inner.recv().await?;
            match self.relay.peer_of(outcome.from_addr) {
                Some(peer) => {
                    outcome.from_addr = peer;
                    return Ok(outcome);
                }
                None => {
                    self.relay.metrics.unexpected_plaintext.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
