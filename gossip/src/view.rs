//! The federation as one member sees it: per cluster, its servers, whether
//! it is alive, and its latest capacity summary. Pure: built from a
//! snapshot of gossip state and the time.

use std::collections::BTreeMap;

use serde::Serialize;

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
    /// Set (to "1") by a server that is stopping cleanly: it has left,
    /// and is not to be waited for.
    pub const LEFT: &str = "left";
}

/// One gossip member's state, borrowed from chitchat for one update.
#[derive(Clone, Debug)]
pub struct MemberState<'a> {
    pub node_id: &'a str,
    pub generation: u64,
    /// chitchat's phi-accrual verdict.
    pub live: bool,
    /// The member's heartbeat counter, which rises every gossip round it runs.
    pub heartbeat: u64,
    /// Its key-values, the summary aside.
    pub values: Vec<(&'a str, &'a str)>,
    /// Its summary with the version chitchat gave it: the text is decoded
    /// only when the version changes.
    pub summary: Option<(u64, &'a str)>,
}

impl<'a> MemberState<'a> {
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
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterEntry {
    pub cluster: String,
    pub region: String,
    pub liveness: Liveness,
    pub servers: BTreeMap<String, ServerEntry>,
    /// The server whose summary is the newest (the leader, as far as gossip knows).
    pub leader: Option<String>,
    pub summary: Option<ClusterSummary>,
    /// When this member last saw a server of the cluster live.
    pub last_live_ms: u64,
}

impl ClusterEntry {
    pub fn summary_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.summary.as_ref().map(|s| now_ms.saturating_sub(s.generated_at_ms))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FederationView {
    pub clusters: BTreeMap<String, ClusterEntry>,
    /// Summaries refused as undecodable, by cluster.
    pub bad_summaries: u64,
    #[serde(skip)]
    suspect_ms: u64,
    /// The summary version last decoded per gossip member, so an unchanged
    /// summary is not decoded again on every update.
    #[serde(skip)]
    decoded: BTreeMap<(String, u64), u64>,
}

impl FederationView {
    /// `suspect_ms`: how long a live server may go without a new heartbeat
    /// before its cluster is suspect.
    pub fn new(suspect_ms: u64) -> Self {
        FederationView { clusters: BTreeMap::new(), bad_summaries: 0, suspect_ms, decoded: BTreeMap::new() }
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterEntry> {
        self.clusters.get(name)
    }

    pub fn alive(&self) -> impl Iterator<Item = &ClusterEntry> {
        self.clusters.values().filter(|c| c.liveness == Liveness::Alive)
    }

    /// Folds a new snapshot in, and says whether anything a reader acts on
    /// changed (membership, liveness, a server's address or term, a
    /// summary); rising heartbeats alone do not count. A summary is
    /// replaced only by one that supersedes it (newer term, or same term
    /// and later), so a lagging server's old summary never wins; servers
    /// are tracked at their newest generation, so a restarted server does
    /// not count twice.
    pub fn update(&mut self, members: &[MemberState<'_>], now_ms: u64) -> bool {
        let mut changed = false;
        let mut seen: BTreeMap<&str, Vec<&MemberState>> = BTreeMap::new();
        for m in members {
            if m.get(keys::ROLE) == Some("observer") {
                continue;
            }
            if let Some(cluster) = m.get(keys::CLUSTER) {
                seen.entry(cluster).or_default().push(m);
            }
        }
        for entry in self.clusters.values_mut() {
            // A server gossip no longer reports (forgotten after death) is not live.
            for server in entry.servers.values_mut() {
                server.was_live = server.live;
                server.live = false;
            }
        }
        for (cluster, ms) in seen {
            let entry = self.clusters.entry(cluster.to_string()).or_insert_with(|| {
                changed = true;
                ClusterEntry {
                    cluster: cluster.to_string(),
                    region: String::new(),
                    liveness: Liveness::Suspect,
                    servers: BTreeMap::new(),
                    leader: None,
                    summary: None,
                    last_live_ms: now_ms,
                }
            });
            // Servers may disagree (or not say): the smallest region named
            // wins, so the view does not flap between them.
            if let Some(region) = ms.iter().filter_map(|m| m.get(keys::REGION)).filter(|r| !r.is_empty()).min() {
                if entry.region != region {
                    entry.region = region.to_string();
                    changed = true;
                }
            }
            for m in ms {
                let name = m.get(keys::SERVER).unwrap_or(m.node_id).to_string();
                let mut server = ServerEntry {
                    name: name.clone(),
                    generation: m.generation,
                    live: m.live,
                    rpc_addr: m.get(keys::RPC_ADDR).map(str::to_string),
                    raft_term: m.get(keys::RAFT_TERM).and_then(|t| t.parse().ok()).unwrap_or(0),
                    heartbeat: m.heartbeat,
                    heartbeat_seen_ms: now_ms,
                    keys: m.get(keys::KEYS).map(parse_key_ids).unwrap_or_default(),
                    state: Liveness::Alive,
                    left: m.get(keys::LEFT).is_some_and(|v| v == "1"),
                    was_live: false,
                };
                match entry.servers.get_mut(&name) {
                    Some(s) if s.generation > server.generation => {}
                    Some(s) => {
                        if s.generation == server.generation && s.heartbeat >= server.heartbeat {
                            server.heartbeat_seen_ms = s.heartbeat_seen_ms;
                        }
                        server.was_live = s.was_live;
                        server.state = s.state;
                        changed |= s.generation != server.generation
                            || s.rpc_addr != server.rpc_addr
                            || s.raft_term != server.raft_term
                            || s.keys != server.keys
                            || s.left != server.left;
                        *s = server;
                    }
                    None => {
                        changed = true;
                        entry.servers.insert(name.clone(), server);
                    }
                }
                let Some((version, text)) = m.summary else { continue };
                let key = (m.node_id.to_string(), m.generation);
                if self.decoded.get(&key) == Some(&version) {
                    continue;
                }
                self.decoded.insert(key, version);
                match ClusterSummary::decode(text) {
                    Ok(s) if s.cluster == cluster => {
                        if entry.summary.as_ref().is_none_or(|old| s.supersedes(old)) {
                            entry.summary = Some(s);
                            entry.leader = Some(name.clone());
                            changed = true;
                        }
                    }
                    _ => self.bad_summaries += 1,
                }
            }
            if entry.servers.values().any(|s| s.live) {
                entry.last_live_ms = now_ms;
            }
        }
        let suspect_ms = self.suspect_ms;
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
        let summary = s.map(|s| (s.term * 1_000_000 + s.generated_at_ms, leak(s.encode().unwrap())));
        MemberState { node_id: leak(format!("{cluster}/{server}")), generation, live, heartbeat: 0, values, summary }
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

    #[test]
    fn observers_are_not_clusters() {
        let mut v = FederationView::new(1_000);
        let mut m = member("cli", "x", 1, true, None);
        m.values.push((keys::ROLE, "observer"));
        v.update(&[m], 0);
        assert!(v.clusters.is_empty());
    }
}
