//! A server's part in delegation: the thin async shell around the pure
//! cores of [`crate::proto`]. While the server leads its cluster, and only
//! once it has applied its whole log as leader, it keeps an [`Origin`] and
//! a [`Target`] (leader memory, built afresh for every term), ticks them,
//! feeds them what peer clusters' leaders send, and performs what they
//! ask: commits through the cluster's Raft log, and messages to peer
//! leaders at the addresses gossip gives at the time of sending (never
//! frozen at offer time). All that must survive a leader is in the log.
//!
//! ```text
//! tick (100 ms) ─► target.tick + origin.tick ─┐
//! round (500 ms) ─► overflow ─► origin.delegate ├─► perform: propose (Raft) ─► send ─► peer leader
//! peer call (QUIC, mTLS) ─► on_message ────────┘                        ◄── its answers (inbox)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cluster_core::command::{Command, Effect};
use cluster_core::ids::{JobId, NodeIdx};
use cluster_core::model::Job;
use cluster_core::server::Inner;
use cluster_core::server::rpc::{PeerHandler, Write};
use cluster_core::state::ClusterState;
use cluster_core::transport::{Identity, Role};
use gossip::Member;
use tokio::sync::{Semaphore, mpsc};

use crate::delegation::Breaker;
use crate::policy::Policy;
use crate::proto::origin::{Origin, Outbound, Overflowing};
use crate::proto::target::{InPhase, Inbound, Target};
use crate::proto::{Action, INCARNATION_KEY, Message, Millis, Outcome, Plants, Timing, ToOrigin, ToTarget};
use crate::protocol::{LABEL_ORIGIN, PeerReply, PeerRequest, decode, encode, target_job_id};
use crate::select::{Overflow, PeerInfo, select};

/// How often the leader ticks its delegation cores (renewals, retries,
/// expiries).
pub const TICK: Duration = Duration::from_millis(100);
/// How often the leader looks for overflow to delegate.
pub const ROUND: Duration = Duration::from_millis(500);
/// Message batches to peer clusters in flight at once.
pub const SENDS_IN_FLIGHT_MAX: usize = 32;
/// The key of the committed policy among the state's records.
pub const POLICY_RECORD: &str = "federation/policy";
/// How long a peer that refused a floor gets none (see `Federation::send`).
const FLOORLESS_FOR: Duration = Duration::from_secs(600);
/// How long one peer server has to answer a batch of messages.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters for `/metrics` and the CLI.
#[derive(Debug, Default)]
pub struct Counters {
    /// Delegations this cluster offered (each id once).
    pub offers: AtomicU64,
    /// Answers received: registered, refused.
    pub registered: AtomicU64,
    pub refused: AtomicU64,
    /// Inbound decisions this cluster committed: registered, refused.
    pub inbound_registered: AtomicU64,
    pub inbound_refused: AtomicU64,
    /// Message batches no server of the peer took.
    pub undelivered: AtomicU64,
    /// Refusals by reason, both ways: ("outbound" | "inbound", reason).
    pub rejected_by: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Counters {
    fn refused(&self, way: &'static str, reason: &str) {
        *self.rejected_by.lock().expect("counters lock").entry((way, reason.to_string())).or_default() += 1;
    }
}

/// Answers from a peer cluster: (cluster, messages, generation sent in).
type Answers = (String, Vec<Message>, u64);

/// The cores while this server leads, for one term.
struct Leading {
    term: u64,
    origin: Origin,
    target: Target,
}

pub struct Federation {
    pub server: Arc<Inner>,
    pub member: Arc<Member>,
    pub policy: RwLock<Policy>,
    pub counters: Counters,
    leading: Mutex<Option<Leading>>,
    /// Bumped whenever leadership is won or lost: sends and answers of an
    /// earlier generation are dropped (a round in flight is cancelled).
    generation: AtomicU64,
    breakers: Mutex<BTreeMap<String, Breaker>>,
    /// Overflow no peer took, by job, with each peer's reason: tried again
    /// every round, so as soon as summaries change.
    pub waiting: Mutex<BTreeMap<String, Waiting>>,
    /// Round-trip time to each peer server, smoothed, in milliseconds.
    rtt: Mutex<BTreeMap<SocketAddr, f64>>,
    /// The server of each peer cluster that last took messages as leader.
    leaders: Mutex<BTreeMap<String, SocketAddr>>,
    /// Leader memory: when this leader first saw each evaluation blocked
    /// with overflow (for `queue_wait` triggers).
    blocked_since: Mutex<BTreeMap<u64, Millis>>,
    /// Peers that refused a floor, and when (see `Federation::send`).
    floorless: Mutex<BTreeMap<String, Instant>>,
    sends: Arc<Semaphore>,
    /// Answers from peers, for the run loop: (cluster, messages, generation).
    inbox: mpsc::UnboundedSender<Answers>,
    inbox_rx: Mutex<Option<mpsc::UnboundedReceiver<Answers>>>,
    started: Instant,
    /// The policy's peers gossip did not know when last checked, as
    /// logged (see [`Federation::check_peers_known`]).
    unknown_peers: Mutex<Option<crate::policy::UnknownPeers>>,
    me: std::sync::Weak<Federation>,
}

/// How long after start the policy's peers may be unknown to gossip
/// before the server says so (gossip needs a few rounds to meet them).
pub const PEERS_KNOWN_WITHIN: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Waiting {
    pub instances: u32,
    pub refused: Vec<(String, String)>,
}

/// The protocol's timers from a policy's `[retry]`: the lease and grace as
/// written; renewals five per lease (100 ms to 5 s apart); unanswered
/// offers and revocations sent again every `backoff` (100 ms to 5 s).
pub fn timing(policy: &Policy) -> Timing {
    let r = &policy.retry;
    Timing {
        lease_ms: r.lease_ms,
        grace_ms: r.grace_ms,
        renew_every_ms: (r.lease_ms / 5).clamp(100, 5_000),
        retry_ms: r.backoff_ms.clamp(100, 5_000),
        collect_every_ms: Timing::default().collect_every_ms,
    }
}

impl Federation {
    pub fn new(server: Arc<Inner>, member: Arc<Member>, policy: Policy) -> Arc<Federation> {
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let fed = Arc::new_cyclic(|me| Federation {
            server,
            member,
            policy: RwLock::new(policy),
            counters: Counters::default(),
            leading: Mutex::new(None),
            generation: AtomicU64::new(0),
            breakers: Mutex::default(),
            waiting: Mutex::default(),
            unknown_peers: Mutex::default(),
            rtt: Mutex::default(),
            leaders: Mutex::default(),
            blocked_since: Mutex::default(),
            floorless: Mutex::default(),
            sends: Arc::new(Semaphore::new(SENDS_IN_FLIGHT_MAX)),
            inbox,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            started: Instant::now(),
            me: me.clone(),
        });
        let weak = Arc::downgrade(&fed);
        fed.server.set_grant_source(Arc::new(move || weak.upgrade().map(|f| f.grants()).unwrap_or_default()));
        fed
    }

    /// Milliseconds on this server's monotonic clock: what every lease and
    /// timer of the cores is measured in.
    pub fn now_ms(&self) -> Millis {
        self.started.elapsed().as_millis() as u64
    }

    /// The policy in force: the one committed through the cluster's log,
    /// so every server applies the same; until one is, this server's file.
    pub fn policy(&self) -> Policy {
        let committed = self.server.raft.read(|s| s.record(POLICY_RECORD).and_then(|v| decode::<Policy>(v).ok()));
        committed.unwrap_or_else(|| self.policy.read().expect("policy lock").clone())
    }

    /// Commits `policy` through the cluster's log (from any server).
    pub async fn commit_policy(&self, policy: Policy) -> Result<(), String> {
        if policy.cluster != self.server.options.cluster {
            return Err(format!(
                "the policy is for cluster {}, this is {}",
                policy.cluster, self.server.options.cluster
            ));
        }
        *self.policy.write().expect("policy lock") = policy.clone();
        let w = Write::Record { holder: POLICY_RECORD.into(), record: encode(&policy) };
        self.server.write(w).await.map(|_| ()).map_err(|e| e.message)
    }

    /// Every delegation this cluster made (origin side), from its state.
    pub fn outbound(&self) -> Vec<Outbound> {
        self.server.raft.read(|s| Origin::records(s).into_iter().map(|(r, _)| r).collect())
    }

    /// Every delegation other clusters made to this one (target side).
    pub fn inbound(&self) -> Vec<Inbound> {
        self.server.raft.read(|s| Target::records(s).into_iter().map(|(r, _)| r).collect())
    }

    /// Whether this server runs the cores now (it leads, and has applied
    /// its log as leader).
    pub fn is_leading(&self) -> bool {
        self.leading.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }

    /// Per registered at-most-once delegation: milliseconds of lease left,
    /// for heartbeat answers. Empty unless this server leads.
    fn grants(&self) -> Vec<(String, u64)> {
        let now = self.now_ms();
        let leading = self.leading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(l) = leading.as_ref().filter(|l| self.still_leads(l)) else { return Vec::new() };
        self.server.raft.read(|s| {
            Target::records(s)
                .into_iter()
                .filter(|(r, _)| r.phase == InPhase::Registered && r.at_most_once)
                .map(|(r, _)| {
                    let left = l.target.lease_remaining(&r.origin, &r.id, now);
                    (r.id, left)
                })
                .collect()
        })
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Starts the cores for `term`: after the log is applied, so that they
    /// start from everything committed before.
    fn lead(&self, term: u64, policy: &Policy) {
        let now = self.now_ms();
        let t = timing(policy);
        let seed = rand_seed();
        let cluster = &self.server.options.cluster;
        *self.leading.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Leading {
            term,
            origin: Origin::new(cluster, t.clone(), Plants::default(), now),
            target: Target::new(t, Plants::default(), seed),
        });
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.blocked_since.lock().expect("blocked lock").clear();
        tracing::info!(cluster = %cluster, term, "delegation: origin and target running on this leader");
        // The cores skip records they cannot read: say so, once a term.
        let unreadable: Vec<String> = self.server.raft.read(|s| {
            let outbound = s.records("delegation/").filter(|(_, v)| decode::<Outbound>(v).is_err());
            let inbound = s.records("inbound/").filter(|(_, v)| decode::<Inbound>(v).is_err());
            outbound.chain(inbound).map(|(k, _)| k.clone()).collect()
        });
        if !unreadable.is_empty() {
            tracing::error!(
                count = unreadable.len(),
                first = %unreadable[0],
                "delegation records this version cannot read (written by another version?): they are ignored, and an outbound one keeps its instances held"
            );
        }
    }

    fn step_down(&self) {
        if self.leading.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take().is_some() {
            self.generation.fetch_add(1, Ordering::SeqCst);
            tracing::info!("delegation: no longer leading; rounds in flight dropped");
        }
    }

    fn leading_term(&self) -> Option<u64> {
        self.leading.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(|l| l.term)
    }

    /// Whether Raft still has this server leading in the cores' term. The
    /// run loop notices a lost leadership within a tick; this closes that
    /// window for every message and grant in between (raft-rs runs with
    /// `check_quorum`, so a leader cut off from its majority steps down
    /// within an election timeout).
    fn still_leads(&self, l: &Leading) -> bool {
        self.leads_in(l.term)
    }

    /// Whether Raft has this server leading in `term` now.
    fn leads_in(&self, term: u64) -> bool {
        let status = self.server.raft.status();
        status.leader == Some(self.server.id) && status.term == term
    }

    /// Runs `f` on the cores and the applied state; `None` unless this
    /// server leads in the cores' term.
    fn with_cores<T>(&self, f: impl FnOnce(&mut Leading, &ClusterState) -> T) -> Option<T> {
        let mut leading = self.leading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let l = leading.as_mut().filter(|l| self.still_leads(l))?;
        Some(self.server.raft.read(|s| f(l, s)))
    }

    /// Feeds one message from cluster `from`'s leader to the right core.
    fn step_message(&self, from: &str, message: Message) -> Option<Vec<Action>> {
        let policy = self.policy();
        let now = self.now_ms();
        match &message {
            Message::ToOrigin(ToOrigin::Outcome { outcome: Outcome::Registered { .. }, .. }) => {
                self.counters.registered.fetch_add(1, Ordering::Relaxed);
            }
            Message::ToOrigin(ToOrigin::Outcome { outcome: Outcome::Refused { reason, .. }, .. }) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                self.counters.refused("outbound", &format!("{reason:?}"));
            }
            _ => {}
        }
        self.with_cores(|l, s| match message {
            Message::ToTarget(m) => l.target.on_message(&policy, s, from, m, now),
            Message::ToOrigin(m) => l.origin.on_message(s, from, m, now),
        })
    }

    /// Performs the cores' actions: commits (side by side), then messages.
    /// Messages to `reply_to` are returned (the answer to its call); the
    /// rest are sent.
    async fn perform(self: &Arc<Self>, actions: Vec<Action>, reply_to: Option<&str>) -> Vec<Message> {
        let generation = self.generation();
        let mut inline = Vec::new();
        let mut out: BTreeMap<String, Vec<Message>> = BTreeMap::new();
        let mut route = |to: String, m: Message| {
            if reply_to == Some(to.as_str()) {
                inline.push(m);
            } else {
                out.entry(to).or_default().push(m);
            }
        };
        let mut commits = tokio::task::JoinSet::new();
        let mut floors = Vec::new();
        for a in actions {
            match a {
                // Floors travel on their own, never beside an answer: a
                // peer of an earlier release cannot read one, and must
                // not lose the answer with it.
                Action::Send { to, message: m @ Message::ToTarget(ToTarget::Floor(_)) } => floors.push((to, m)),
                Action::Send { to, message } => route(to, message),
                Action::Propose(command) => {
                    let raft = self.server.raft.clone();
                    commits.spawn(async move {
                        if let Err(e) = raft.propose(command).await {
                            tracing::debug!(error = %e, "delegation change not committed; the cores retry");
                        }
                        None
                    });
                }
                Action::ProposeThenSend { command, to, reply } => {
                    self.count_decision(&reply);
                    let raft = self.server.raft.clone();
                    let server = self.server.clone();
                    commits.spawn(async move {
                        match raft.propose(command).await {
                            Ok(Effect::Refused(why)) => {
                                tracing::debug!(%why, "delegation change refused; nothing sent");
                                None
                            }
                            Ok(_) => {
                                audit_decision(&server, &to, &reply);
                                Some((to, reply))
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "delegation change not committed; nothing sent");
                                None
                            }
                        }
                    });
                }
            }
        }
        while let Some(done) = commits.join_next().await {
            if let Ok(Some((to, m))) = done {
                route(to, m);
            }
        }
        for (to, messages) in out {
            self.send(to, messages, generation, false);
        }
        for (to, floor) in floors {
            self.send(to, vec![floor], generation, true);
        }
        inline
    }

    fn count_decision(&self, reply: &Message) {
        let c = &self.counters;
        match reply {
            Message::ToTarget(ToTarget::Offer { .. }) => {
                c.offers.fetch_add(1, Ordering::Relaxed);
            }
            Message::ToOrigin(ToOrigin::Outcome { outcome: Outcome::Registered { .. }, .. }) => {
                c.inbound_registered.fetch_add(1, Ordering::Relaxed);
            }
            Message::ToOrigin(ToOrigin::Outcome { outcome: Outcome::Refused { reason, .. }, .. }) => {
                c.inbound_refused.fetch_add(1, Ordering::Relaxed);
                c.refused("inbound", &format!("{reason:?}"));
            }
            _ => {}
        }
    }

    /// The QUIC addresses of `cluster`'s live servers as gossip has them
    /// now, the one that last answered as leader first.
    fn addresses(&self, cluster: &str) -> Vec<SocketAddr> {
        let view = self.member.view();
        let mut addrs: Vec<SocketAddr> = view
            .cluster(cluster)
            // A server that left is not waited for; a suspect one is still
            // tried (it may answer, and nothing is revoked for its silence).
            .map(|c| {
                (c.servers.values().filter(|s| s.live && !s.left))
                    .filter_map(|s| s.rpc_addr.as_ref()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(leader) = self.leaders.lock().expect("leaders lock").get(cluster) {
            if let Some(i) = addrs.iter().position(|a| a == leader) {
                addrs[..=i].rotate_right(1);
            }
        }
        addrs
    }

    /// Sends `messages` to `to`'s leader, in the background; its answers
    /// come back through the inbox. Lost when no server takes them: the
    /// cores send again. `advisory` messages (floors) count against no
    /// breaker when lost, and a peer that refuses them (one of an earlier
    /// release cannot read them) gets none for [`FLOORLESS_FOR`].
    fn send(self: &Arc<Self>, to: String, messages: Vec<Message>, generation: u64, advisory: bool) {
        let floorless = |f: &BTreeMap<String, Instant>| f.get(&to).is_some_and(|t| t.elapsed() < FLOORLESS_FOR);
        if advisory && floorless(&self.floorless.lock().expect("floorless lock")) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = me.sends.clone().acquire_owned().await else { return };
            let bytes = encode(&PeerRequest::Deliver(messages));
            for a in me.addresses(&to) {
                if me.generation() != generation {
                    return;
                }
                let sent = Instant::now();
                let call = me.server.call_cluster(&to, a, bytes.clone());
                let reply = match tokio::time::timeout(SEND_TIMEOUT, call).await {
                    Ok(Ok(reply)) => decode::<PeerReply>(&reply),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer in {SEND_TIMEOUT:?}")),
                };
                match reply {
                    Ok(PeerReply::Delivered(answers)) => {
                        let ms = sent.elapsed().as_secs_f64() * 1e3;
                        let mut rtt = me.rtt.lock().expect("rtt lock");
                        let e = rtt.entry(a).or_insert(ms);
                        *e = 0.8 * *e + 0.2 * ms;
                        drop(rtt);
                        me.leaders.lock().expect("leaders lock").insert(to.clone(), a);
                        me.breakers.lock().expect("breakers lock").entry(to.clone()).or_default().success();
                        if !answers.is_empty() {
                            let _ = me.inbox.send((to, answers, generation));
                        }
                        return;
                    }
                    Ok(PeerReply::NotLeader) => {}
                    Ok(PeerReply::Refused(why)) if advisory => {
                        tracing::info!(peer = %to, %why, "a peer does not take delegation floors (an earlier release?): it keeps its tombstones");
                        me.floorless.lock().expect("floorless lock").insert(to, Instant::now());
                        return;
                    }
                    Ok(other) => {
                        tracing::warn!(to = %to, at = %a, answer = ?other, "a peer refused delegation messages");
                        return;
                    }
                    Err(e) => tracing::debug!(to = %to, at = %a, error = %e, "peer server did not take the messages"),
                }
            }
            if advisory {
                return;
            }
            me.counters.undelivered.fetch_add(1, Ordering::Relaxed);
            let retry = me.policy().retry;
            me.breakers.lock().expect("breakers lock").entry(to).or_default().failure(me.now_ms(), &retry);
        });
    }

    /// One tick of the cores while leading.
    async fn tick(self: &Arc<Self>) {
        let policy = self.policy();
        let now = self.now_ms();
        let actions = self.with_cores(|l, s| {
            let mut a = l.target.tick(s, now);
            a.extend(l.origin.tick(&policy, s, now));
            a
        });
        if let Some(actions) = actions {
            self.perform(actions, None).await;
        }
    }

    /// Logs the policy's peers that gossip does not know (a typo, or a
    /// cluster not yet joined): once [`PEERS_KNOWN_WITHIN`] after start,
    /// then whenever that set changes (a warning while any are missing,
    /// a line when none are left).
    pub fn check_peers_known(&self, policy: &Policy) {
        if self.started.elapsed() < PEERS_KNOWN_WITHIN {
            return;
        }
        let view = self.member.view();
        let mut members: Vec<&str> = view.clusters.keys().map(String::as_str).collect();
        members.push(&policy.cluster);
        let unknown = policy.unknown_peers(&members);
        let mut last = self.unknown_peers.lock().expect("unknown peers lock");
        if last.as_ref() == Some(&unknown) {
            return;
        }
        if !unknown.is_empty() {
            let named: Vec<String> = (unknown.iter())
                .map(|(p, near)| match near {
                    Some(m) => format!("{p} (did you mean {m}?)"),
                    None => p.clone(),
                })
                .collect();
            tracing::warn!(
                "the federation policy names peers gossip does not know: {}; the federation has: {}",
                named.join(", "),
                members.join(", ")
            );
        } else if last.as_ref().is_some_and(|l| !l.is_empty()) {
            tracing::info!("every peer the federation policy names is now known to gossip");
        }
        *last = Some(unknown);
    }

    /// Offers the overflow of blocked evaluations to peers, once one of the
    /// policy's triggers fires for it, as the policy ranks the peers; what
    /// no peer takes waits in [`Federation::waiting`].
    async fn delegate_overflow(self: &Arc<Self>) {
        let policy = self.policy();
        let now = self.now_ms();
        let peers = self.peers(&policy, now, &self.member.view());
        let unknown = if self.started.elapsed() >= PEERS_KNOWN_WITHIN {
            let mut names: Vec<&str> = peers.iter().map(|p| p.cluster.as_str()).collect();
            names.push(&policy.cluster);
            policy.unknown_peers(&names)
        } else {
            Vec::new()
        };
        let (work, utilization): (Vec<Overflowing>, f64) =
            self.server.raft.read(|s| (Origin::overflow(s, cluster_core::server::unix_ms()), utilization(s)));
        let work: Vec<Overflowing> = {
            let mut since = self.blocked_since.lock().expect("blocked lock");
            since.retain(|eval, _| work.iter().any(|w| w.eval == *eval));
            work.into_iter()
                .filter(|w| {
                    let blocked = now.saturating_sub(*since.entry(w.eval).or_insert(now));
                    prefers_peers(&w.job) || policy.overflow.fires(blocked, utilization)
                })
                .collect()
        };
        // `prefer-remote` jobs held back for peers: once this round's offers
        // hold what peers take, the rest is released to the scheduler here.
        let mut asked = Vec::new();
        let mut waiting: BTreeMap<String, Waiting> = BTreeMap::new();
        let mut actions = Vec::new();
        for w in work {
            if prefers_peers(&w.job) && !asked.iter().any(|(j, _)| *j == w.job.id) {
                asked.push((w.job.id.clone(), w.job.version));
            }
            let overflow = [Overflow { group: w.group.clone(), count: w.indices.len() as u32 }];
            let peers: Vec<PeerInfo> = peers.iter().filter(|p| !w.refused_by.contains(&p.cluster)).cloned().collect();
            let selection = select(&policy, &w.job, &overflow, w.job.instance_count() as u32, w.remote, &peers);
            if selection.left > 0 {
                let entry =
                    waiting.entry(w.job.id.to_string()).or_insert(Waiting { instances: 0, refused: Vec::new() });
                entry.instances += selection.left;
                entry.refused = selection.refused.iter().map(|(c, r)| (c.clone(), r.to_string())).collect();
                // Peers the policy names that gossip has not heard of once
                // it had its time: a typo waits silently otherwise.
                for (name, near) in &unknown {
                    if policy.may_delegate_to(name) {
                        let hint = near.as_ref().map_or(String::new(), |m| format!("; did you mean {m}?"));
                        entry.refused.push((name.clone(), format!("not in the federation{hint}")));
                    }
                }
                entry.refused.sort();
            }
            let mut rest = w.indices.as_slice();
            for offer in selection.offers {
                let n = (offer.count as usize).min(rest.len());
                if n == 0 {
                    continue;
                }
                let part = Overflowing { indices: rest[..n].to_vec(), ..w.clone() };
                rest = &rest[n..];
                let delegated = self.with_cores(|l, s| l.origin.delegate(&policy, s, &part, &offer.peer, now));
                actions.extend(delegated.unwrap_or_default());
            }
        }
        *self.waiting.lock().expect("waiting lock") = waiting;
        self.perform(actions, None).await;
        let asked: Vec<Action> =
            (asked.into_iter()).map(|(job, version)| Action::Propose(Command::PeersAsked { job, version })).collect();
        if !asked.is_empty() && self.with_cores(|_, _| ()).is_some() {
            self.perform(asked, None).await;
        }
    }

    /// Every other cluster as gossip and this leader know it: liveness,
    /// summary, measured round trip, and whether its breaker lets it be
    /// tried now (`now` on [`Federation::now_ms`]).
    pub fn peers(&self, policy: &Policy, now: u64, view: &gossip::FederationView) -> Vec<PeerInfo> {
        let rtt = self.rtt.lock().expect("rtt lock");
        let breakers = self.breakers.lock().expect("breakers lock");
        view.clusters
            .values()
            .filter(|c| c.cluster != policy.cluster)
            .map(|c| PeerInfo {
                cluster: c.cluster.clone(),
                liveness: c.liveness,
                summary: c.summary.clone(),
                rtt_ms: c
                    .servers
                    .values()
                    .filter_map(|s| rtt.get(&s.rpc_addr.as_ref()?.parse().ok()?))
                    .copied()
                    .reduce(f64::min),
                breaker_open: breakers.get(&c.cluster).is_some_and(|b| !b.ready(now, &policy.retry)),
            })
            .collect()
    }

    /// Asks `cluster` for the allocations of delegation `id` (origin side).
    pub async fn remote_allocations(
        &self,
        cluster: &str,
        id: &str,
    ) -> Option<Vec<cluster_core::server::api::AllocView>> {
        let bytes = encode(&PeerRequest::Allocations { id: id.to_string() });
        for a in self.addresses(cluster) {
            let call = self.server.call_cluster(cluster, a, bytes.clone());
            if let Ok(Ok(reply)) = tokio::time::timeout(SEND_TIMEOUT, call).await {
                if let Ok(PeerReply::Allocations(allocs)) = decode::<PeerReply>(&reply) {
                    return Some(allocs);
                }
            }
        }
        None
    }
}

/// Whether `job` is offered to peers before it is placed here (`delegate =
/// "prefer-remote"`): its overflow leaves at once, whatever the triggers.
fn prefers_peers(job: &Job) -> bool {
    job.federation.delegate == cluster_core::model::DelegateMode::PreferRemote
}

/// The jobs other clusters delegated here, not stopped.
fn inbound_jobs(s: &ClusterState) -> impl Iterator<Item = &Job> {
    s.jobs().filter(|j| j.labels.contains_key(LABEL_ORIGIN) && !j.stopped)
}

/// The cpu of a job's live allocations that came from other clusters.
pub(crate) fn inbound_cpu(s: &ClusterState) -> u64 {
    inbound_jobs(s).flat_map(|j| s.allocs_of_job(&j.id)).filter(|a| a.is_live()).map(|a| a.resources.cpu_millis).sum()
}

/// The cpu that registered work from other clusters will take once it is
/// placed: its instances neither live, complete (batch) nor held
/// (returned), in millicores.
pub(crate) fn inbound_unplaced_cpu(s: &ClusterState) -> u64 {
    inbound_jobs(s)
        .flat_map(|j| j.groups.iter().map(move |g| (j, g)))
        .map(|(j, g)| {
            let done = |a: &&cluster_core::model::Allocation| {
                a.is_live() || a.status == cluster_core::model::AllocStatus::Complete
            };
            let placed: std::collections::BTreeSet<u32> =
                s.allocs_of_job(&j.id).filter(|a| a.group == g.name).filter(done).map(|a| a.index).collect();
            let held = s.held_of_job(&j.id).filter(|(group, _)| *group == &*g.name).count() as u64;
            u64::from(g.count).saturating_sub(placed.len() as u64 + held) * g.resources().cpu_millis
        })
        .sum()
}

/// Per schedulable node: (cpu capacity, cpu its live allocations use), in
/// millicores, from the usage the state keeps per node.
fn schedulable_cpu(s: &ClusterState) -> impl Iterator<Item = (u64, u64)> + '_ {
    (s.nodes().iter().enumerate())
        .filter(|(_, n)| n.schedulable())
        .map(|(i, n)| (n.capacity.cpu_millis, s.usage(NodeIdx(i as u32)).res.cpu_millis))
}

/// The share of the schedulable nodes' cpu that live allocations use, 0
/// to 1.
fn utilization(s: &ClusterState) -> f64 {
    let used: u64 = schedulable_cpu(s).map(|(_, used)| used).sum();
    used as f64 / total_cpu(s).max(1) as f64
}

/// The cpu no live allocation uses on the schedulable nodes, in millicores.
pub(crate) fn free_cpu(s: &ClusterState) -> u64 {
    schedulable_cpu(s).map(|(capacity, used)| capacity.saturating_sub(used)).sum()
}

pub(crate) fn total_cpu(s: &ClusterState) -> u64 {
    schedulable_cpu(s).map(|(capacity, _)| capacity).sum()
}

/// A seed for the target's renewal session: distinct per leadership.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

#[async_trait]
impl PeerHandler for Federation {
    async fn handle(&self, from: Identity, request: Vec<u8>) -> Vec<u8> {
        let Some(me) = self.me.upgrade() else { return encode(&PeerReply::NotLeader) };
        let reply = if from.role != Role::Server {
            PeerReply::Refused(format!("{from} is not a server: only servers speak for a cluster"))
        } else {
            match decode::<PeerRequest>(&request) {
                Ok(PeerRequest::Deliver(messages)) => me.deliver(&from.cluster, messages).await,
                Ok(PeerRequest::Allocations { id }) => {
                    if id.split('/').next() != Some(from.cluster.as_str()) {
                        PeerReply::Refused(format!("{id} is not a delegation of {}", from.cluster))
                    } else {
                        let job = JobId::new(target_job_id(&id));
                        PeerReply::Allocations(self.server.raft.read(|s| {
                            let ours = s.job(&job).is_some_and(|j| {
                                j.labels.get(LABEL_ORIGIN).map(String::as_str) == Some(from.cluster.as_str())
                            });
                            if !ours {
                                return Vec::new();
                            }
                            s.allocs_of_job(&job).map(|a| cluster_core::server::api::AllocView::of(s, a)).collect()
                        }))
                    }
                }
                Err(e) => PeerReply::Refused(format!("malformed: {e}")),
            }
        };
        encode(&reply)
    }
}

impl Federation {
    /// Messages from `from`'s leader: each goes to a core, its actions are
    /// performed, and the answers to `from` go back in the reply.
    async fn deliver(self: &Arc<Self>, from: &str, messages: Vec<Message>) -> PeerReply {
        if from == self.server.options.cluster {
            return PeerReply::Refused("a cluster does not delegate to itself".into());
        }
        // Every message is stepped first and the commits then go side by
        // side: each is a compare-and-swap on its own record, so their
        // order does not matter, and a batch of offers costs one round of
        // Raft instead of one per offer.
        let mut actions = Vec::new();
        for m in messages {
            let Some(a) = self.step_message(from, m) else { return PeerReply::NotLeader };
            actions.extend(a);
        }
        PeerReply::Delivered(self.perform(actions, Some(from)).await)
    }
}

/// Runs the delegation shell for `fed`'s server until aborted: the cores
/// start when it leads and has applied its log, and stop when it does not.
pub async fn run(fed: Arc<Federation>) {
    let Some(mut inbox) = fed.inbox_rx.lock().expect("inbox lock").take() else {
        tracing::error!("the delegation shell runs once per federation");
        return;
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_round = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((from, messages, generation)) = inbox.recv() => {
                if generation == fed.generation() {
                    let actions: Vec<Action> =
                        messages.into_iter().filter_map(|m| fed.step_message(&from, m)).flatten().collect();
                    fed.perform(actions, None).await;
                }
                continue;
            }
        }
        let policy = fed.policy();
        fed.check_peers_known(&policy);
        let may_delegate = policy.peers.values().any(|p| p.delegate_to);
        fed.server.set_prefer_peers(may_delegate);
        let status = fed.server.raft.status();
        if status.leader != Some(fed.server.id) {
            fed.step_down();
            continue;
        }
        if fed.leading_term() != Some(status.term) {
            fed.step_down();
            // Leader memory is rebuilt only after the log is applied.
            if fed.server.raft.read_fresh(|_| ()).await.is_err() {
                continue;
            }
            // Still leading in that term once the log is applied?
            if !fed.leads_in(status.term) {
                continue;
            }
            // The first leader draws the cluster's incarnation as an origin
            // (see `ToTarget::Floor`); a compare-and-swap, so a second
            // leader racing it changes nothing.
            if fed.server.raft.read(|s| s.record(INCARNATION_KEY).is_none()) {
                let draw = Command::Guarded {
                    holder: INCARNATION_KEY.into(),
                    expect: None,
                    record: encode(&rand_seed()),
                    then: Vec::new(),
                };
                if let Err(e) = fed.server.raft.propose(draw).await {
                    tracing::warn!(error = %e, "could not commit this cluster's incarnation; retrying");
                    continue;
                }
            }
            let committed = fed.server.raft.read(|s| s.record(POLICY_RECORD).is_some());
            if !committed {
                let local = fed.policy.read().expect("policy lock").clone();
                if let Err(e) = fed.commit_policy(local).await {
                    tracing::warn!(error = %e, "could not commit this server's policy; retrying");
                    continue;
                }
            }
            fed.lead(status.term, &fed.policy());
        }
        fed.tick().await;
        if last_round.elapsed() >= ROUND {
            last_round = Instant::now();
            fed.delegate_overflow().await;
        }
    }
}

/// Records a peer's offer this cluster decided on (committed, so once) in
/// the server's audit trail, naming the origin cluster.
fn audit_decision(server: &Inner, origin: &str, reply: &Message) {
    let Message::ToOrigin(ToOrigin::Outcome { id, outcome }) = reply else { return };
    let (status, object) = match outcome {
        Outcome::Registered { indices } => (200, format!("registered {} instances", indices.len())),
        Outcome::Refused { reason, message } => (409, format!("refused ({reason:?}): {message}")),
    };
    server.audit.record(cluster_core::server::audit::AuditRecord {
        time_ms: cluster_core::server::unix_ms(),
        server: format!("{}/{}", server.options.cluster, server.options.name),
        source: None,
        accessor: None,
        token: "peer server certificate".into(),
        method: "OFFER".into(),
        route: format!("delegation {id}"),
        object: Some(object),
        status,
        outcome: cluster_core::server::audit::AuditRecord::outcome_of(status).into(),
        origin: Some(origin.to_string()),
    });
}
