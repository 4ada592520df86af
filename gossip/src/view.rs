//! The federation as one member sees it: per cluster, its servers, whether
//! it is alive, and its latest capacity summary. Pure: built from a
//! snapshot of gossip state and the time.

use std::collections::BTreeMap;
use std::sync::Arc;

use cluster_core::transport::tls::Trust;
use serde::Serialize;

use crate::identity::{self, Claim, Known};
use crate::summary::ClusterSummary;

/// Gossip keys every member publishes about itself.
pub mod keys {
    pub const CLUSTER: &str = "cluster";
    pub const SERVER: &str = "server";
    pub const REGION: &str = "region";
    pub const ROLE: &str = "role";
    pub const RPC_ADDR: &str = "rpc_addr";
    pub const RAFT_TERM: &str = "raft_term";
    /// Only the leader of a cluster publishes one.
    pub const SUMMARY: &str = "summary";
    /// The ids of the keys in the member's keyring, primary first, as
    /// 8-digit hex separated by commas (never the keys).
    pub const KEYS: &str = "keys";
    /// Set (to "1", signed: see [`crate::identity`]) by a server that is
    /// stopping cleanly: it has left, and is not to be waited for.
    pub const LEFT: &str = "left";
    /// A server's certificate and its signature of who it is (see
    /// [`crate::identity`]).
    pub const IDENTITY: &str = "identity";
}

/// One gossip member's state, borrowed from chitchat for one update.
#[derive(Clone, Debug)]
pub struct MemberState<'a> {
    pub node_id: &'a str,
    pub generation: u64,
    /// Its gossip address, as its chitchat id gives it.
    pub addr: std::net::SocketAddr,
    /// chitchat's phi-accrual verdict.
    pub live: bool,
    /// The member's heartbeat counter, which rises every gossip round it runs.
    pub heartbeat: u64,
    /// Its key-values, the summary aside.
    pub values: Vec<(&'a str, &'a str)>,
    /// Where its key-values stand: chitchat's `(last_gc_version,
    /// max_version)`, which every change to them raises (a reset too,
    /// through its GC version, so a peer cannot bring back an old version
    /// with other values). Under one member key, the same version means the
    /// same values, so checks of them are not redone, while the member is
    /// live (see [`FederationView::update`]). `None`: not known, the values
    /// are compared each time.
    pub version: Option<(u64, u64)>,
    /// Its summary with the version chitchat gave it: the text is decoded
    /// only when the version changes.
    pub summary: Option<(u64, &'a str)>,
}

/// A gossip member: its node id, generation and address (chitchat's id).
/// Two processes may claim one node id and generation; not one address.
type MemberKey = (String, u64, std::net::SocketAddr);

impl<'a> MemberState<'a> {
    fn key(&self) -> MemberKey {
        (self.node_id.to_string(), self.generation, self.addr)
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// How alive a server, or a cluster, is, from the phi-accrual detector
/// and the heartbeats seen (the levels are in ARCHITECTURE.md). A server:
/// `Alive` while its heartbeat rose within the suspect window, `Suspect`
/// once it has not (a pause, a loaded machine: no new work goes there, and
/// nothing is revoked for it), `Dead` once the detector says so, `Left`
/// once it announced a clean stop. A cluster: the best of its servers
/// (alive, else suspect), `Left` when all of them left, else `Dead`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// At least one server is live and heartbeating.
    Alive,
    /// Servers are still live by the phi-accrual detector, but none has
    /// heartbeated for the suspect window: an early warning.
    Suspect,
    /// No server is live by the phi-accrual detector.
    Dead,
    /// Every server stopped cleanly and said so.
    Left,
}

/// The key ids a member publishes under [`keys::KEYS`].
pub fn key_ids_text(ids: &[u32]) -> String {
    ids.iter().map(|id| format!("{id:08x}")).collect::<Vec<_>>().join(",")
}

fn parse_key_ids(text: &str) -> Vec<String> {
    text.split(',').filter(|s| !s.is_empty()).take(crate::keyring::KEYRING_KEYS_MAX).map(str::to_string).collect()
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerEntry {
    pub name: String,
    pub generation: u64,
    pub live: bool,
    pub rpc_addr: Option<String>,
    pub raft_term: u64,
    pub heartbeat: u64,
    /// When this member last saw the heartbeat rise.
    pub heartbeat_seen_ms: u64,
    /// The ids of the keys its gossip keyring holds, primary first (8-digit
    /// hex), as it last said.
    pub keys: Vec<String>,
    /// Its own level (see [`Liveness`]).
    pub state: Liveness,
    /// It announced a clean stop ([`keys::LEFT`]).
    pub left: bool,
    /// `live` before the update in progress, to tell a change.
    #[serde(skip)]
    was_live: bool,
    /// The member these values were read from, and its
    /// [`MemberState::version`] then (none: not known).
    #[serde(skip)]
    source: Option<(MemberKey, (u64, u64))>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterEntry {
    pub cluster: String,
    pub region: String,
    pub liveness: Liveness,
    pub servers: BTreeMap<String, ServerEntry>,
    /// The server whose summary is the newest (the leader, as far as gossip knows).
    pub leader: Option<String>,
    /// The gossip generation of the leader's member that published it.
    pub leader_generation: u64,
    pub summary: Option<ClusterSummary>,
    /// When this member took the summary in, by its own clock (the
    /// publisher's clock may be off).
    pub summary_received_ms: u64,
    /// When this member last saw a server of the cluster live.
    pub last_live_ms: u64,
}

impl ClusterEntry {
    /// How long ago, by this member's clock, the summary arrived.
    pub fn summary_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.summary.as_ref().map(|_| now_ms.saturating_sub(self.summary_received_ms))
    }

    /// Whether the member that published the summary is still there and
    /// heard from (alive or suspect): not a server gone, left, or replaced
    /// by a newer generation.
    pub fn publisher_present(&self) -> bool {
        let Some(leader) = &self.leader else { return false };
        self.servers.get(leader).is_some_and(|s| {
            s.generation == self.leader_generation && matches!(s.state, Liveness::Alive | Liveness::Suspect)
        })
    }
}

/// Two gossip members heartbeating under one server name: a second
/// process started with a name that is taken (a copied configuration, or
/// an impostor holding a certificate for it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NameConflict {
    pub cluster: String,
    pub server: String,
    /// The generation that holds the name (shown, its summary merged).
    pub holder: u64,
    /// The generations refused.
    pub rivals: Vec<u64>,
}

impl NameConflict {
    fn same(&self, other: &NameConflict) -> bool {
        self.cluster == other.cluster && self.server == other.server && self.rivals == other.rivals
    }
}

/// A gossip member refused, and why (for a log line and the CLI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RefusedMember {
    /// `cluster/server`, as it claims.
    pub node_id: String,
    pub generation: u64,
    /// Its gossip address.
    pub addr: std::net::SocketAddr,
    pub reason: String,
}

/// Refused members a view lists (and counts) at most.
pub const REFUSED_SHOWN_MAX: usize = 64;

/// How often a verified identity is checked again (a certificate expires).
pub const IDENTITY_RECHECK_MS: u64 = 3_600_000;

/// A member's identity as last verified, and what it was verified from.
#[derive(Clone, Debug)]
struct Checked {
    result: Result<Known, String>,
    message: Vec<u8>,
    value: String,
    checked_ms: u64,
    /// The member's [`MemberState::version`] when checked.
    version: Option<(u64, u64)>,
    /// The last [`FederationView::update`] that saw the member.
    round: u64,
}

fn claim_of<'a>(federation: &'a str, m: &MemberState<'a>, cluster: &'a str, server: &'a str) -> Claim<'a> {
    Claim {
        federation,
        node_id: m.node_id,
        generation: m.generation,
        addr: m.addr,
        cluster,
        server,
        rpc_addr: m.get(keys::RPC_ADDR),
        region: m.get(keys::REGION).unwrap_or(""),
    }
}

/// The trust and `m`'s verified identity, when the view verifies.
fn known<'v>(
    trust: &'v Option<Arc<Trust>>,
    identities: &'v BTreeMap<MemberKey, Checked>,
    key: &MemberKey,
) -> Option<(&'v Trust, &'v Known)> {
    let trust = trust.as_deref()?;
    let c = identities.get(key)?;
    c.result.as_ref().ok().map(|k| (trust, k))
}

/// Heartbeat progress of one gossip member, as this member saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Beat {
    heartbeat: u64,
    /// When the heartbeat last rose (or the member was first seen).
    seen_ms: u64,
    /// When it rose the time before (0: not yet).
    prev_ms: u64,
    /// When the member was first seen.
    first_ms: u64,
    /// The detector has said it is live.
    ever_live: bool,
}

#[derive(Debug, Serialize)]
pub struct FederationView {
    pub clusters: BTreeMap<String, ClusterEntry>,
    /// Summaries refused as undecodable, by cluster.
    pub bad_summaries: u64,
    /// Server names claimed by two live members now (see [`NameConflict`]).
    pub conflicts: Vec<NameConflict>,
    /// Conflicts seen begin, since this view was made.
    pub name_conflicts_total: u64,
    /// Members refused now, and why: an identity that does not verify
    /// against the federation's CA, or a summary its certificate does not
    /// back (see [`crate::identity`]). Only with a [`Trust`].
    pub refused: Vec<RefusedMember>,
    /// Refusals seen begin, since this view was made.
    pub refused_total: u64,
    #[serde(skip)]
    trust: Option<Arc<Trust>>,
    #[serde(skip)]
    federation: String,
    #[serde(skip)]
    identities: BTreeMap<MemberKey, Checked>,
    #[serde(skip)]
    summary_refusals: BTreeMap<MemberKey, String>,
    #[serde(skip)]
    suspect_ms: u64,
    /// Heartbeat progress per member, with the last update that saw it.
    #[serde(skip)]
    beats: BTreeMap<MemberKey, (Beat, u64)>,
    /// The number of updates made (see [`FederationView::update`]).
    #[serde(skip)]
    round: u64,
    /// Members that lost a contest for a name: their summaries are never
    /// merged, not even as last words.
    #[serde(skip)]
    rivals: std::collections::BTreeSet<MemberKey>,
    /// Generations a newer one replaced, uncontested.
    #[serde(skip)]
    retired: std::collections::BTreeSet<MemberKey>,
    /// The summary version last decoded per gossip member, so an unchanged
    /// summary is not decoded again on every update.
    #[serde(skip)]
    decoded: BTreeMap<MemberKey, u64>,
}

/// A copy of what the view shows, for readers: the caches it keeps to
/// update itself stay behind (a reader's copy is not updated), so a copy
/// per change costs what is shown, not every certificate held.
impl Clone for FederationView {
    fn clone(&self) -> Self {
        FederationView {
            clusters: self.clusters.clone(),
            bad_summaries: self.bad_summaries,
            conflicts: self.conflicts.clone(),
            name_conflicts_total: self.name_conflicts_total,
            refused: self.refused.clone(),
            refused_total: self.refused_total,
            ..FederationView::new(self.suspect_ms)
        }
    }
}

/// Views are equal when what they show is: caches and trust aside.
impl PartialEq for FederationView {
    fn eq(&self, other: &Self) -> bool {
        self.clusters == other.clusters
            && self.bad_summaries == other.bad_summaries
            && self.conflicts == other.conflicts
            && self.name_conflicts_total == other.name_conflicts_total
            && self.refused == other.refused
            && self.refused_total == other.refused_total
    }
}

impl FederationView {
    /// `suspect_ms`: how long a live server may go without a new heartbeat
    /// before its cluster is suspect.
    pub fn new(suspect_ms: u64) -> Self {
        FederationView {
            clusters: BTreeMap::new(),
            bad_summaries: 0,
            conflicts: Vec::new(),
            name_conflicts_total: 0,
            refused: Vec::new(),
            refused_total: 0,
            trust: None,
            federation: String::new(),
            identities: BTreeMap::new(),
            summary_refusals: BTreeMap::new(),
            suspect_ms,
            beats: BTreeMap::new(),
            round: 0,
            rivals: Default::default(),
            retired: Default::default(),
            decoded: BTreeMap::new(),
        }
    }

    /// This view, verifying every member's identity and summaries against
    /// `trust` (the federation's CA) for federation `federation`: members
    /// that do not verify are refused ([`FederationView::refused`]).
    pub fn with_trust(mut self, federation: &str, trust: Arc<Trust>) -> Self {
        self.federation = federation.to_string();
        self.trust = Some(trust);
        self
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterEntry> {
        self.clusters.get(name)
    }

    pub fn alive(&self) -> impl Iterator<Item = &ClusterEntry> {
        self.clusters.values().filter(|c| c.liveness == Liveness::Alive)
    }

    /// Folds a new snapshot in, and says whether anything a reader acts on
    /// changed (membership, liveness, a server's address or term, a
    /// summary, a name conflict); rising heartbeats alone do not count.
    ///
    /// A summary is replaced only by one that supersedes it (see
    /// [`ClusterSummary::supersedes`]), so a lagging server's old summary
    /// never wins. Gossip may hold several members under one server name
    /// (a restart leaves the old generation behind for a while; a second
    /// process may claim a name that is taken): the server is the one whose
    /// heartbeat rises, the one already shown first, so that neither a
    /// clock stepped back (a lower generation) nor a rebuilt server hides
    /// a live one. A second member whose heartbeat rises under a name whose
    /// holder's also does is a conflict: reported in
    /// [`FederationView::conflicts`], and its summaries are not merged.
    pub fn update(&mut self, members: &[MemberState<'_>], now_ms: u64) -> bool {
        let mut changed = false;
        let suspect_ms = self.suspect_ms;
        // This update's number: entries of the caches below it does not
        // touch belong to members gossip no longer holds, and go.
        self.round = self.round.wrapping_add(1);
        let round = self.round;
        // Each member's key, built once, and its position in `members`
        // (every `&MemberState` below points into it).
        let member_keys: Vec<MemberKey> = members.iter().map(MemberState::key).collect();
        let at = |m: &MemberState| {
            let i = (std::ptr::from_ref(m) as usize - members.as_ptr() as usize) / size_of::<MemberState>();
            debug_assert!(std::ptr::eq(&members[i], m));
            i
        };
        // Heartbeat progress per member, with whether it is retired.
        let mut progress: Vec<(Beat, bool)> = Vec::with_capacity(members.len());
        for (m, key) in members.iter().zip(&member_keys) {
            let beat = match self.beats.get_mut(key) {
                Some((b, seen)) => {
                    *seen = round;
                    *b = if m.heartbeat > b.heartbeat {
                        Beat {
                            heartbeat: m.heartbeat,
                            seen_ms: now_ms,
                            prev_ms: b.seen_ms,
                            first_ms: b.first_ms,
                            ever_live: b.ever_live || m.live,
                        }
                    } else {
                        Beat { ever_live: b.ever_live || m.live, ..*b }
                    };
                    *b
                }
                None => {
                    let b = Beat {
                        heartbeat: m.heartbeat,
                        seen_ms: now_ms,
                        prev_ms: 0,
                        first_ms: now_ms,
                        ever_live: m.live,
                    };
                    self.beats.insert(key.clone(), (b, round));
                    b
                }
            };
            progress.push((beat, self.retired.contains(key)));
        }
        self.beats.retain(|_, (_, seen)| *seen == round);
        let beat = |m: &MemberState| progress[at(m)].0;
        let retired = |m: &MemberState| progress[at(m)].1;
        let key_of = |m: &MemberState| &member_keys[at(m)];
        // A version is taken only from a live member: chitchat forgets a
        // member long dead and may learn it again from (0, 0), and a peer
        // with the gossip key could then refill it up to the old version
        // with other values. Every cache below holds `None` for a member
        // once it is seen dead, so such a version never matches.
        let version = |m: &MemberState| m.version.filter(|_| m.live);
        // Heartbeating: its heartbeat rose within the suspect window, and
        // the detector has it live or it is new and rose once (the
        // detector needs a few heartbeats before it says live; one it said
        // live before and not now is dead); and it was not replaced by a
        // newer generation (a replay of an old one does not come back).
        let beating = |m: &MemberState| {
            let b = beat(m);
            let new = !b.ever_live && b.seen_ms > b.first_ms && now_ms.saturating_sub(b.first_ms) < suspect_ms;
            now_ms.saturating_sub(b.seen_ms) < suspect_ms && (m.live || new) && !retired(m)
        };

        let mut seen: BTreeMap<&str, BTreeMap<&str, Vec<&MemberState>>> = BTreeMap::new();
        for (m, key) in members.iter().zip(&member_keys) {
            // An observer claims no identity; a member that shows one is
            // checked as a server whatever role it says (a role is not
            // signed, and could be forged onto a server's state).
            let observer = m.get(keys::ROLE) == Some("observer");
            if observer && (self.trust.is_none() || m.get(keys::IDENTITY).is_none()) {
                continue;
            }
            let Some(cluster) = m.get(keys::CLUSTER) else { continue };
            let server = m.get(keys::SERVER).unwrap_or(m.node_id);
            if let Some(trust) = &self.trust {
                let fresh = |c: &Checked| now_ms.saturating_sub(c.checked_ms) < IDENTITY_RECHECK_MS;
                let ok = match self.identities.get_mut(key) {
                    // Values unchanged since the check: nothing to rebuild.
                    Some(c) if version(m).is_some() && c.version == version(m) && fresh(c) => {
                        c.round = round;
                        c.result.is_ok()
                    }
                    cached => {
                        let claim = claim_of(&self.federation, m, cluster, server);
                        let message = identity::identity_message(&claim);
                        let value = m.get(keys::IDENTITY).unwrap_or("");
                        match cached {
                            Some(c) if c.message == message && c.value == value && fresh(c) => {
                                c.version = version(m);
                                c.round = round;
                                c.result.is_ok()
                            }
                            _ => {
                                let checked = Checked {
                                    result: identity::verify_identity(trust, m.get(keys::IDENTITY), &claim, now_ms),
                                    message,
                                    value: value.to_string(),
                                    checked_ms: now_ms,
                                    version: version(m),
                                    round,
                                };
                                let ok = checked.result.is_ok();
                                self.identities.insert(key.clone(), checked);
                                ok
                            }
                        }
                    }
                };
                if !ok {
                    continue;
                }
            }
            seen.entry(cluster).or_default().entry(server).or_default().push(m);
        }
        self.identities.retain(|_, c| c.round == round);
        for entry in self.clusters.values_mut() {
            // A server gossip no longer reports (forgotten after death) is not live.
            for server in entry.servers.values_mut() {
                server.was_live = server.live;
                server.live = false;
            }
        }
        let mut conflicts = Vec::new();
        let mut newly_retired: Vec<MemberKey> = Vec::new();
        for (cluster, by_server) in seen {
            let entry = self.clusters.entry(cluster.to_string()).or_insert_with(|| {
                changed = true;
                ClusterEntry {
                    cluster: cluster.to_string(),
                    region: String::new(),
                    liveness: Liveness::Suspect,
                    servers: BTreeMap::new(),
                    leader: None,
                    leader_generation: 0,
                    summary: None,
                    summary_received_ms: 0,
                    last_live_ms: now_ms,
                }
            });
            // Servers may disagree (or not say): the smallest region named
            // wins, so the view does not flap between them.
            let region =
                by_server.values().flatten().filter_map(|m| m.get(keys::REGION)).filter(|r| !r.is_empty()).min();
            if let Some(region) = region {
                if entry.region != region {
                    entry.region = region.to_string();
                    changed = true;
                }
            }
            for (name, group) in by_server {
                // Two members heartbeating under the name, each heard to
                // rise twice since both were seen: two processes, not a
                // restart (whose old member rises once more at most).
                let contested = |a: &MemberState, b: &MemberState| {
                    let (a, b) = (beat(a), beat(b));
                    let since = a.first_ms.max(b.first_ms);
                    a.prev_ms > since && b.prev_ms > since
                };
                let has_left = |m: &MemberState| {
                    m.get(keys::LEFT).is_some_and(|v| match known(&self.trust, &self.identities, key_of(m)) {
                        Some((trust, known)) => {
                            identity::verify_left(trust, known, &claim_of(&self.federation, m, cluster, name), v)
                        }
                        None => identity::split(v).0 == "1",
                    })
                };
                let live_now: Vec<&MemberState> =
                    group.iter().copied().filter(|m| beating(m) && !has_left(m)).collect();
                // The first seen of a contest holds the name (then the
                // newer generation: a replayed old one never wins a tie);
                // else the newest generation heartbeating (a restart takes
                // over at once); else the newest live.
                let first = |m: &&MemberState| (beat(m).first_ms, std::cmp::Reverse(m.generation));
                let contenders: Vec<&MemberState> = live_now
                    .iter()
                    .copied()
                    .filter(|a| live_now.iter().any(|b| !std::ptr::eq(*a, *b) && contested(a, b)))
                    .collect();
                let m = contenders
                    .iter()
                    .copied()
                    .min_by_key(first)
                    .or_else(|| live_now.iter().copied().max_by_key(|m| m.generation))
                    .or_else(|| group.iter().copied().filter(|m| m.live).max_by_key(|m| m.generation))
                    .or_else(|| group.iter().copied().max_by_key(|m| m.generation))
                    .expect("a group has a member");
                let rivals: Vec<u64> =
                    contenders.iter().filter(|r| !std::ptr::eq(**r, m)).map(|r| r.generation).collect();
                if !rivals.is_empty() {
                    conflicts.push(NameConflict {
                        cluster: cluster.to_string(),
                        server: name.to_string(),
                        holder: m.generation,
                        rivals: rivals.clone(),
                    });
                }
                // A summary is taken from the holder once no other member
                // heartbeats under its name, or it won a contest; from
                // members gone, their last words; never from a rival, nor
                // while a contest is undecided.
                let settled = live_now.iter().all(|o| std::ptr::eq(*o, m)) || !rivals.is_empty();
                let read = || ServerEntry {
                    name: name.to_string(),
                    generation: m.generation,
                    live: m.live,
                    rpc_addr: m.get(keys::RPC_ADDR).map(str::to_string),
                    raft_term: m.get(keys::RAFT_TERM).and_then(|t| t.parse().ok()).unwrap_or(0),
                    heartbeat: m.heartbeat,
                    heartbeat_seen_ms: beat(m).seen_ms,
                    keys: m.get(keys::KEYS).map(parse_key_ids).unwrap_or_default(),
                    state: Liveness::Alive,
                    left: has_left(m),
                    was_live: false,
                    source: version(m).map(|v| (key_of(m).clone(), v)),
                };
                let unchanged = |s: &ServerEntry| {
                    version(m).is_some_and(|v| matches!(&s.source, Some((k, sv)) if k == key_of(m) && *sv == v))
                };
                match entry.servers.get_mut(name) {
                    // The holder's values unchanged since they were read:
                    // only its liveness and heartbeat move.
                    Some(s) if unchanged(s) => {
                        s.live = m.live;
                        s.heartbeat = m.heartbeat;
                        s.heartbeat_seen_ms = beat(m).seen_ms;
                    }
                    Some(s) => {
                        let server = ServerEntry { was_live: s.was_live, state: s.state, ..read() };
                        changed |= s.generation != server.generation
                            || s.rpc_addr != server.rpc_addr
                            || s.raft_term != server.raft_term
                            || s.keys != server.keys
                            || s.left != server.left;
                        *s = server;
                    }
                    None => {
                        changed = true;
                        entry.servers.insert(name.to_string(), read());
                    }
                }
                // The holder's summary, and the last words of members that
                // are gone; never a live rival's.
                for r in contenders.iter().filter(|r| !std::ptr::eq(**r, m)) {
                    self.rivals.insert(r.key());
                }
                // Older generations gone quiet while the holder holds the
                // name uncontested: retired, so a replay of one never holds
                // it again.
                if rivals.is_empty() && beating(m) {
                    let old: Vec<MemberKey> =
                        group.iter().filter(|g| g.generation < m.generation && !beating(g)).map(|g| g.key()).collect();
                    newly_retired.extend(old);
                }
                let rivals_seen = &self.rivals;
                for g in group
                    .iter()
                    .filter(|g| (std::ptr::eq(**g, m) && settled) || (!g.live && !rivals_seen.contains(key_of(g))))
                {
                    let Some((version, text)) = g.summary else { continue };
                    let key = key_of(g);
                    if self.decoded.get(key) == Some(&version) {
                        continue;
                    }
                    self.decoded.insert(key.clone(), version);
                    let (text, sig) = identity::split(text);
                    let decoded = ClusterSummary::decode(text);
                    let refusal = match (&decoded, known(&self.trust, &self.identities, key_of(g))) {
                        (Ok(s), _) if s.cluster != cluster => Some(format!("a summary for cluster {}", s.cluster)),
                        (Ok(s), Some((trust, known))) => {
                            let claim = claim_of(&self.federation, g, cluster, name);
                            let allowed = &known.verified.jurisdictions;
                            let over: Vec<&String> = s.jurisdictions.iter().filter(|j| !allowed.contains(j)).collect();
                            if !identity::verify_summary(trust, known, &claim, text, sig) {
                                Some("a summary whose signature does not verify".to_string())
                            } else if !over.is_empty() {
                                Some(format!(
                                    "a summary claiming jurisdictions {over:?} its certificate does not allow \
                                     (it allows {allowed:?})"
                                ))
                            } else {
                                None
                            }
                        }
                        (Ok(_), None) => None,
                        (Err(e), _) => Some(format!("a summary that does not decode: {e}")),
                    };
                    if let Some(why) = refusal {
                        self.bad_summaries += 1;
                        changed = true;
                        self.summary_refusals.insert(key.clone(), why);
                        continue;
                    }
                    self.summary_refusals.remove(key);
                    let Ok(s) = decoded else { continue };
                    if entry.summary.as_ref().is_none_or(|old| s.supersedes(old)) {
                        entry.summary = Some(s);
                        entry.leader = Some(name.to_string());
                        entry.leader_generation = g.generation;
                        entry.summary_received_ms = now_ms;
                        changed = true;
                    }
                }
            }
            if entry.servers.values().any(|s| s.live) {
                entry.last_live_ms = now_ms;
            }
        }
        self.retired.extend(newly_retired);
        let new = conflicts.iter().filter(|c| !self.conflicts.iter().any(|o| o.same(c))).count();
        self.name_conflicts_total += new as u64;
        changed |= conflicts != self.conflicts;
        self.conflicts = conflicts;
        self.decoded.retain(|key, _| self.beats.contains_key(key));
        self.summary_refusals.retain(|key, _| self.beats.contains_key(key));
        self.rivals.retain(|key| self.beats.contains_key(key));
        self.retired.retain(|key| self.beats.contains_key(key));
        let mut refused: Vec<RefusedMember> = Vec::new();
        for ((node_id, generation, addr), c) in &self.identities {
            if let Err(reason) = &c.result {
                let (node_id, generation, addr, reason) = (node_id.clone(), *generation, *addr, reason.clone());
                refused.push(RefusedMember { node_id, generation, addr, reason });
            }
        }
        for ((node_id, generation, addr), why) in &self.summary_refusals {
            let (node_id, generation, addr) = (node_id.clone(), *generation, *addr);
            refused.push(RefusedMember { node_id, generation, addr, reason: format!("it gossips {why}") });
        }
        // Shown and counted up to a bound: thousands of forged members
        // must not make every update quadratic.
        refused.truncate(REFUSED_SHOWN_MAX);
        self.refused_total += refused.iter().filter(|r| !self.refused.contains(r)).count() as u64;
        changed |= refused != self.refused;
        self.refused = refused;
        for entry in self.clusters.values_mut() {
            changed |= entry.servers.values().any(|s| s.was_live != s.live);
            for s in entry.servers.values_mut() {
                let state = if s.left {
                    Liveness::Left
                } else if !s.live {
                    Liveness::Dead
                } else if now_ms.saturating_sub(s.heartbeat_seen_ms) < suspect_ms {
                    Liveness::Alive
                } else {
                    Liveness::Suspect
                };
                changed |= state != s.state;
                s.state = state;
            }
            let any = |l: Liveness| entry.servers.values().any(|s| s.state == l);
            let liveness = if any(Liveness::Alive) {
                Liveness::Alive
            } else if any(Liveness::Suspect) {
                Liveness::Suspect
            } else if !entry.servers.is_empty() && entry.servers.values().all(|s| s.state == Liveness::Left) {
                Liveness::Left
            } else {
                Liveness::Dead
            };
            changed |= liveness != entry.liveness;
            entry.liveness = liveness;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(cluster: &str, term: u64, at: u64, free_cpu: u64) -> ClusterSummary {
        ClusterSummary {
            cluster: cluster.into(),
            region: "r".into(),
            term,
            generated_at_ms: at,
            nodes_ready: 1,
            nodes_down: 0,
            jurisdictions: vec![],
            environments: vec![],
            execution_models: vec![],
            classes: vec![crate::summary::ClassCapacity {
                class: "m".into(),
                nodes: 1,
                total: cluster_core::resources::Resources { cpu_millis: 8000, ..Default::default() },
                free: cluster_core::resources::Resources { cpu_millis: free_cpu, ..Default::default() },
                price_per_cpu_hour: 0.0,
            }],
            gpus: vec![],
            shapes: vec![0; 8],
            running_allocs: 0,
            pending_allocs: 0,
            inbound_share: 0.0,
            ..Default::default()
        }
    }

    /// Strings the borrowed member states point into, leaked: tests only.
    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn member(
        cluster: &str,
        server: &str,
        generation: u64,
        live: bool,
        s: Option<&ClusterSummary>,
    ) -> MemberState<'static> {
        let values = vec![
            (keys::CLUSTER, leak(cluster.to_string())),
            (keys::SERVER, leak(server.to_string())),
            (keys::REGION, "r1"),
        ];
        // The summary's version: its term and time, enough to tell versions apart here.
        let summary = s.map(|s| (s.incarnation * 1_000_000 + s.term * 1_000 + s.version, leak(s.encode().unwrap())));
        MemberState {
            node_id: leak(format!("{cluster}/{server}")),
            generation,
            addr: "127.0.0.1:1".parse().unwrap(),
            live,
            heartbeat: 0,
            values,
            version: None,
            summary,
        }
    }

    #[test]
    fn values_are_read_again_when_their_version_moves_and_only_then() {
        let mut v = FederationView::new(1_000);
        let at = |version: u64, rpc: &'static str, heartbeat: u64| {
            let mut m = member("a", "s1", 1, true, None);
            m.values.push((keys::RPC_ADDR, rpc));
            m.version = Some((0, version));
            m.heartbeat = heartbeat;
            m
        };
        assert!(v.update(&[at(7, "10.0.0.1:4647", 1)], 0));
        assert!(!v.update(&[at(7, "10.0.0.1:4647", 2)], 100), "a heartbeat alone is no change");
        let s = &v.cluster("a").unwrap().servers["s1"];
        assert_eq!((s.heartbeat, s.heartbeat_seen_ms), (2, 100), "the heartbeat still moves");
        assert!(v.update(&[at(8, "10.0.0.2:4647", 3)], 200), "a new version with a new address is a change");
        assert_eq!(v.cluster("a").unwrap().servers["s1"].rpc_addr.as_deref(), Some("10.0.0.2:4647"));
        // The same version from another member (a restart that counts
        // from scratch) is read again, not taken as the old values.
        let mut restarted = at(8, "10.0.0.3:4647", 1);
        restarted.generation = 2;
        assert!(v.update(&[restarted], 300));
        let s = &v.cluster("a").unwrap().servers["s1"];
        assert_eq!((s.generation, s.rpc_addr.as_deref()), (2, Some("10.0.0.3:4647")));
    }

    #[test]
    fn a_cluster_is_alive_while_any_server_is() {
        let mut v = FederationView::new(1_000);
        let beat = |mut m: MemberState<'static>, hb: u64| {
            m.heartbeat = hb;
            m
        };
        assert!(v.update(&[member("a", "s1", 1, true, None), member("a", "s2", 1, false, None)], 0));
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Alive);
        assert!(
            !v.update(&[beat(member("a", "s1", 1, true, None), 5), member("a", "s2", 1, false, None)], 900),
            "a heartbeat alone is no change"
        );
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Alive, "a rising heartbeat keeps it alive");
        v.update(&[beat(member("a", "s1", 1, true, None), 5), member("a", "s2", 1, false, None)], 1_950);
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Suspect, "live by phi, but silent");
        v.update(&[member("a", "s1", 1, false, None), member("a", "s2", 1, false, None)], 2_000);
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Dead);
        v.update(&[member("a", "s2", 1, true, None)], 2_100);
        assert!(!v.cluster("a").unwrap().servers["s1"].live, "gone from gossip is not live");
        v.update(&[member("a", "s1", 2, true, None), member("a", "s1", 1, false, None)], 2_000);
        let a = v.cluster("a").unwrap();
        assert_eq!(a.liveness, Liveness::Alive, "a restarted server revives its cluster");
        assert_eq!(a.servers["s1"].generation, 2, "the newest generation stands for the server");
    }

    #[test]
    fn an_older_term_summary_never_overwrites_a_newer_one() {
        let mut v = FederationView::new(1_000);
        let new = summary("a", 5, 100, 1000);
        let old = summary("a", 4, 900, 7000);
        v.update(&[member("a", "s1", 1, true, Some(&new))], 0);
        v.update(&[member("a", "s1", 1, true, Some(&new)), member("a", "s2", 1, true, Some(&old))], 10);
        let a = v.cluster("a").unwrap();
        assert_eq!(a.summary.as_ref().unwrap().term, 5);
        assert_eq!(a.leader.as_deref(), Some("s1"));
        // s1 went away with its summary; s2's stale one still does not win.
        v.update(&[member("a", "s2", 1, true, Some(&old))], 20);
        assert_eq!(v.cluster("a").unwrap().summary.as_ref().unwrap().term, 5);
        let newer = summary("a", 6, 50, 3000);
        v.update(&[member("a", "s2", 1, true, Some(&newer))], 30);
        assert_eq!(v.cluster("a").unwrap().summary.as_ref().unwrap().term, 6);
    }

    #[test]
    fn garbage_and_misattributed_summaries_are_refused() {
        let mut v = FederationView::new(1_000);
        let mut m = member("a", "s1", 1, true, None);
        m.summary = Some((1, "garbage"));
        let other = summary("b", 9, 0, 0);
        let m2 = member("a", "s2", 1, true, Some(&other));
        v.update(&[m, m2], 0);
        assert!(v.cluster("a").unwrap().summary.is_none());
        assert_eq!(v.bad_summaries, 2);
    }

    #[test]
    fn a_silent_server_is_suspect_before_dead_and_one_that_left_says_so() {
        let mut v = FederationView::new(1_000);
        let at = |hb: u64, live: bool| {
            let mut m = member("a", "s1", 1, live, None);
            m.heartbeat = hb;
            m
        };
        v.update(&[at(1, true)], 0);
        assert_eq!(v.cluster("a").unwrap().servers["s1"].state, Liveness::Alive);
        // Paused: live by the detector, its heartbeat still.
        assert!(v.update(&[at(1, true)], 1_200), "suspect is a change");
        assert_eq!(v.cluster("a").unwrap().servers["s1"].state, Liveness::Suspect);
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Suspect);
        // Back: alive again, never dead.
        v.update(&[at(2, true)], 1_300);
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Alive);
        v.update(&[at(2, false)], 5_000);
        assert_eq!(v.cluster("a").unwrap().servers["s1"].state, Liveness::Dead);
        // A server that announced its stop has left, live or not.
        let mut left = at(3, true);
        left.values.push((keys::LEFT, "1"));
        let other = member("a", "s2", 1, false, None);
        v.update(&[left.clone(), other.clone()], 5_100);
        assert_eq!(v.cluster("a").unwrap().servers["s1"].state, Liveness::Left);
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Dead, "s2 died: not all left");
        let mut other_left = other;
        other_left.values.push((keys::LEFT, "1"));
        v.update(&[left, other_left], 5_200);
        assert_eq!(v.cluster("a").unwrap().liveness, Liveness::Left);
    }

    fn beat(mut m: MemberState<'static>, hb: u64) -> MemberState<'static> {
        m.heartbeat = hb;
        m
    }

    #[test]
    fn a_server_restarted_with_its_clock_stepped_back_is_shown_alive() {
        let mut v = FederationView::new(1_000);
        // Generation is the start time: the restart's clock is 50 s behind.
        v.update(&[beat(member("a", "s1", 100_000, true, None), 1)], 0);
        v.update(&[beat(member("a", "s1", 100_000, true, None), 2)], 200);
        let old = beat(member("a", "s1", 100_000, true, None), 2);
        let mut t = 300;
        for hb in 1..=10 {
            t += 200;
            v.update(&[old.clone(), beat(member("a", "s1", 50_000, true, None), hb)], t);
        }
        let a = v.cluster("a").unwrap();
        assert_eq!(a.servers["s1"].generation, 50_000, "the heartbeating one holds the name");
        assert_eq!(a.liveness, Liveness::Alive);
        assert!(v.conflicts.is_empty(), "a restart is not a conflict: {:?}", v.conflicts);
        v.update(
            &[beat(member("a", "s1", 100_000, false, None), 2), beat(member("a", "s1", 50_000, true, None), 11)],
            t,
        );
        assert_eq!(v.cluster("a").unwrap().servers["s1"].state, Liveness::Alive);
    }

    #[test]
    fn a_second_live_claim_to_a_name_is_a_conflict_and_never_merged() {
        let mut v = FederationView::new(1_000);
        let real = summary("a", 3, 0, 8_000);
        let mut fake = summary("a", 9, 0, 800);
        fake.version = 5;
        v.update(&[beat(member("a", "s1", 1, true, Some(&real)), 1)], 0);
        let mut t = 0;
        for hb in 2..=6 {
            t += 200;
            v.update(
                &[beat(member("a", "s1", 1, true, Some(&real)), hb), beat(member("a", "s1", 2, true, Some(&fake)), hb)],
                t,
            );
        }
        let a = v.cluster("a").unwrap();
        assert_eq!(a.servers["s1"].generation, 1, "the holder keeps its name");
        assert_eq!(a.summary.as_ref().unwrap().term, 3, "the rival's summary is not merged");
        assert_eq!(v.conflicts.len(), 1);
        assert_eq!((v.conflicts[0].holder, v.conflicts[0].rivals.clone()), (1, vec![2]));
        assert_eq!(v.name_conflicts_total, 1, "one conflict, counted once");
    }

    #[test]
    fn a_rebuilt_cluster_wins_with_a_new_incarnation() {
        let mut v = FederationView::new(1_000);
        let old = summary("a", 7, 0, 96_000);
        v.update(&[member("a", "s1", 1, true, Some(&old))], 0);
        assert!(v.cluster("a").unwrap().publisher_present());
        // Rebuilt on empty disks: term 1 again, smaller.
        let mut young = summary("a", 1, 0, 16_000);
        v.update(&[member("a", "s1", 1, false, Some(&old)), member("a", "s1", 2, true, Some(&young))], 100);
        let a = v.cluster("a").unwrap();
        assert_eq!(a.summary.as_ref().unwrap().term, 7, "term 1 of the same incarnation loses");
        assert!(!a.publisher_present(), "its publisher is gone");
        young.incarnation = 1;
        young.version = 2;
        v.update(&[member("a", "s1", 1, false, Some(&old)), member("a", "s1", 2, true, Some(&young))], 200);
        let a = v.cluster("a").unwrap();
        assert_eq!(a.summary.as_ref().unwrap().free().cpu_millis, 16_000, "the new incarnation wins");
        assert!(a.publisher_present());
    }

    #[test]
    fn a_replayed_old_generation_never_takes_the_name_back() {
        let mut v = FederationView::new(1_000);
        let old = summary("a", 3, 0, 8_000);
        v.update(&[beat(member("a", "s1", 1, true, Some(&old)), 1)], 0);
        // Restarted as generation 2; generation 1 goes quiet and dies.
        let mut t = 0;
        for hb in 2..=12 {
            t += 200;
            let gone = beat(member("a", "s1", 1, t < 1_000, Some(&old)), 1);
            v.update(&[gone, beat(member("a", "s1", 2, true, None), hb)], t);
        }
        assert_eq!(v.cluster("a").unwrap().servers["s1"].generation, 2);
        // Someone with the gossip key replays generation 1, heartbeats and all.
        for hb in 13..=30 {
            t += 200;
            v.update(
                &[beat(member("a", "s1", 1, true, Some(&old)), hb), beat(member("a", "s1", 2, true, None), hb)],
                t,
            );
            assert_eq!(v.cluster("a").unwrap().servers["s1"].generation, 2, "at {t} ms");
        }
        assert!(v.conflicts.is_empty(), "a retired generation is no contender: {:?}", v.conflicts);
    }

    #[test]
    fn a_rivals_last_words_are_never_merged() {
        let mut v = FederationView::new(1_000);
        let real = summary("a", 3, 0, 8_000);
        let mut twin = summary("a", 3, 0, 1_000);
        twin.version = 9;
        v.update(&[beat(member("a", "s1", 1, true, Some(&real)), 1)], 0);
        let mut t = 200;
        for hb in 2..=7 {
            v.update(
                &[beat(member("a", "s1", 1, true, Some(&real)), hb), beat(member("a", "s1", 2, true, Some(&twin)), hb)],
                t,
            );
            t += 200;
        }
        assert_eq!(v.conflicts.len(), 1);
        // The twin stops: dead, its last summary still in gossip.
        v.update(
            &[beat(member("a", "s1", 1, true, Some(&real)), 7), beat(member("a", "s1", 2, false, Some(&twin)), 6)],
            t,
        );
        assert_eq!(v.cluster("a").unwrap().summary.as_ref().unwrap().free().cpu_millis, 8_000);
    }

    #[test]
    fn a_new_observer_does_not_take_a_dead_newer_generation_for_the_server() {
        let mut v = FederationView::new(1_000);
        // Gossip still remembers generation 9 (dead); generation 5 (a
        // restart with the clock stepped back) heartbeats.
        let mut t = 0;
        for hb in 1..=4 {
            v.update(&[member("a", "s1", 9, false, None), beat(member("a", "s1", 5, false, None), hb)], t);
            t += 200;
        }
        let a = v.cluster("a").unwrap();
        assert_eq!(a.servers["s1"].generation, 5, "the heartbeating one, not the dead newer one");
    }

    #[test]
    fn observers_are_not_clusters() {
        let mut v = FederationView::new(1_000);
        let mut m = member("cli", "x", 1, true, None);
        m.values.push((keys::ROLE, "observer"));
        v.update(&[m], 0);
        assert!(v.clusters.is_empty());
    }
}
