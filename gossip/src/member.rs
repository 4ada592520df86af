//! A federation member: one chitchat instance per server, over the sealed
//! transport, with a task that keeps the [`FederationView`] current.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion, spawn_chitchat};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use cluster_core::transport::tls::{Signer, Trust};

use crate::keyring::Keyring;
use crate::net::DatagramNet;
use crate::summary::{ClusterSummary, Publisher, SummaryError};
use crate::transport::{GossipMetrics, SealedTransport, SharedKeyring, unix_ms};
use crate::view::{FederationView, MemberState, keys};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A cluster's Raft server.
    Server,
    /// A short-lived reader (the CLI): gossips, but is no cluster's member.
    Observer,
}

#[derive(Clone, Debug)]
pub struct MemberConfig {
    /// The federation's name; members of other federations are refused.
    pub federation: String,
    pub cluster: String,
    pub server: String,
    pub region: String,
    pub role: Role,
    pub listen_addr: SocketAddr,
    /// What peers should send to, if not `listen_addr`.
    pub advertise_addr: Option<SocketAddr>,
    pub seeds: Vec<String>,
    pub rpc_addr: Option<String>,
    /// Must grow on every restart, or a restarted server lingers as two
    /// members; the default is the start time in unix milliseconds.
    pub generation: u64,
    pub gossip_interval: Duration,
    /// The phi-accrual threshold above which a server is dead.
    pub phi_threshold: f64,
    /// How long a live server may go without a new heartbeat before its
    /// cluster is suspect (dead is the phi-accrual detector's verdict).
    pub suspect_after: Duration,
    /// How long dead members' state is kept before it is forgotten.
    pub dead_forget_after: Duration,
    /// How often the view is recomputed even when chitchat reports no
    /// change: only the suspect timer needs it (phi-accrual deaths arrive as
    /// changes), so a quarter of `suspect_after` is enough.
    pub view_refresh: Duration,
    /// How far a peer's clock may be from this member's before its gossip
    /// is refused (and the peer reported: see
    /// [`crate::transport::SkewedPeer`]). It bounds replays across a
    /// restart; nothing else depends on clocks agreeing.
    pub max_clock_skew: Duration,
    /// Signs this server's identity, summaries and leave with its
    /// certificate's key (see [`crate::identity`]); `None` for observers
    /// and for tests without certificates.
    pub signer: Option<Arc<Signer>>,
    /// The federation's CA: with it, members whose identity or summaries
    /// do not verify are refused. `None` trusts whatever holds the
    /// gossip key (tests, and observers given no CA).
    pub trust: Option<Arc<Trust>>,
}

impl MemberConfig {
    /// The member's chitchat node id: `cluster/server`.
    pub fn node_id(&self) -> String {
        format!("{}/{}", self.cluster, self.server)
    }

    pub fn new(federation: &str, cluster: &str, server: &str, listen_addr: SocketAddr) -> MemberConfig {
        MemberConfig {
            federation: federation.into(),
            cluster: cluster.into(),
            server: server.into(),
            region: String::new(),
            role: Role::Server,
            listen_addr,
            advertise_addr: None,
            seeds: Vec::new(),
            rpc_addr: None,
            generation: unix_ms(),
            gossip_interval: Duration::from_millis(GOSSIP_INTERVAL_MS),
            phi_threshold: PHI_DEAD,
            suspect_after: suspect_after(Duration::from_millis(GOSSIP_INTERVAL_MS)),
            dead_forget_after: Duration::from_secs(3_600),
            view_refresh: suspect_after(Duration::from_millis(GOSSIP_INTERVAL_MS)) / 4,
            max_clock_skew: Duration::from_millis(crate::seal::FRESHNESS_MS),
            signer: None,
            trust: None,
        }
    }
}

/// Default gossip round interval: see ARCHITECTURE.md for the measured
/// trade-off between propagation time and idle CPU.
pub const GOSSIP_INTERVAL_MS: u64 = 250;
/// Peers told at once when a summary changes, ahead of the next round.
/// With f pushes per newly informed member, about e^-f of the members are
/// never pushed to and wait for a round: 5 keeps that under 1%, so the
/// 99th percentile rides the push wave.
pub const PUSH_FANOUT: usize = 5;

/// Heartbeats are seen through gossip, a few rounds late under load: six
/// rounds of silence, and at least 1.5 s, make a server suspect (a pause
/// of a second, a GC or a stalled VM, is at most that).
pub fn suspect_after(gossip_interval: Duration) -> Duration {
    (gossip_interval * 6).max(Duration::from_millis(1_500))
}

/// The phi above which chitchat's detector calls a server dead. chitchat
/// 0.13's phi is the silence over the mean heartbeat interval; that mean
/// is smoothed with a prior of [`DETECTOR_PRIOR`] weighing 5 samples
/// against a window of [`DETECTOR_WINDOW`] real ones, intervals over
/// [`DETECTOR_MAX_INTERVAL`] left out, so it stays between 5·0.6/7 =
/// 0.43 s and (2·1 + 5·0.6)/7 = 0.71 s, and about 0.5 s for the 100-300
/// ms intervals gossip delivers: death comes after at least 3.4 s of
/// silence (about 4 s usually), so a pause of up to 3 s whose end is
/// heard within 0.4 s is at most suspect, and a dead server is known
/// within about 2 s after that bound (`cargo bench --bench gossip`
/// measures it).
pub const PHI_DEAD: f64 = 8.0;
/// Heartbeat intervals longer than this (a pause that ended) are not
/// remembered: the mean, and so the time to death, stays bounded.
pub const DETECTOR_MAX_INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeat intervals the detector remembers (see [`PHI_DEAD`]).
pub const DETECTOR_WINDOW: usize = 2;
/// The detector's prior heartbeat interval (see [`PHI_DEAD`]).
pub const DETECTOR_PRIOR: Duration = Duration::from_millis(600);
/// How long a server that is stopping cleanly keeps gossiping its
/// [`keys::LEFT`] before it goes: a few rounds reach every peer.
pub const LEAVE_ANNOUNCE: Duration = Duration::from_millis(750);
/// A member pushes at most once per this interval, however many summaries
/// change: a bound on the extra traffic when every cluster is busy.
pub const PUSH_COALESCE_MS: u64 = 100;

pub struct Member {
    handle: Arc<ChitchatHandle>,
    push_task: JoinHandle<()>,
    _summary_listener: chitchat::ListenerHandle,
    keyring: SharedKeyring,
    metrics: Arc<GossipMetrics>,
    view: watch::Receiver<Arc<FederationView>>,
    view_task: JoinHandle<()>,
    publisher: Mutex<Publisher>,
    config: MemberConfig,
    local_addr: SocketAddr,
}

impl Member {
    pub async fn start(config: MemberConfig, keyring: Keyring, net: Arc<dyn DatagramNet>) -> anyhow::Result<Member> {
        let keyring: SharedKeyring = Arc::new(RwLock::new(keyring));
        let metrics = Arc::new(GossipMetrics::default());
        let transport = SealedTransport::new(net, keyring.clone(), metrics.clone());
        transport.set_max_skew(config.max_clock_skew);
        let mut config = config;
        config.listen_addr = transport.prebind(config.listen_addr).await?;
        let advertise = config.advertise_addr.unwrap_or(config.listen_addr);
        transport.set_advertise(advertise);
        let node_id = config.node_id();
        // A short memory and a strong prior: death after a bounded silence
        // whatever the heartbeat rate gossip happens to deliver (see
        // [`PHI_DEAD`]).
        let failure_detector_config = FailureDetectorConfig {
            phi_threshold: config.phi_threshold,
            sampling_window_size: DETECTOR_WINDOW,
            max_interval: DETECTOR_MAX_INTERVAL,
            initial_interval: DETECTOR_PRIOR,
            dead_node_grace_period: config.dead_forget_after,
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(node_id.clone(), config.generation, advertise),
            cluster_id: config.federation.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.listen_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config,
            marked_for_deletion_grace_period: config.dead_forget_after,
            catchup_callback: None,
            extra_liveness_predicate: None,
            // V0: the sealed transport compresses whole datagrams already,
            // and V1's per-message digest compression doubled chitchat's
            // CPU in our measurements. V0's digest fits one datagram up to
            // the member count given in ARCHITECTURE.md.
            protocol_version: ProtocolVersion::V0,
        };
        let mut initial = vec![
            (keys::CLUSTER.to_string(), config.cluster.clone()),
            (keys::SERVER.to_string(), config.server.clone()),
            (keys::REGION.to_string(), config.region.clone()),
            (keys::ROLE.to_string(), if config.role == Role::Server { "server" } else { "observer" }.to_string()),
            (keys::KEYS.to_string(), crate::view::key_ids_text(&keyring.read().expect("keyring lock").ids())),
        ];
        if let Some(rpc) = &config.rpc_addr {
            initial.push((keys::RPC_ADDR.to_string(), rpc.clone()));
        }
        if let Some(signer) = &config.signer {
            let claim = claim(&config, &node_id, advertise);
            initial.push((keys::IDENTITY.to_string(), crate::identity::identity_value(signer, &claim)));
        }
        let handle = Arc::new(spawn_chitchat(chitchat_config, initial, &transport).await?);
        let local_addr = {
            let c = handle.chitchat();
            let guard = c.lock().await;
            guard.self_chitchat_id().gossip_advertise_addr
        };
        let new_view = {
            let (suspect_ms, trust, federation) =
                (config.suspect_after.as_millis() as u64, config.trust.clone(), config.federation.clone());
            move || {
                let view = FederationView::new(suspect_ms);
                match &trust {
                    Some(t) => view.with_trust(&federation, t.clone()),
                    None => view,
                }
            }
        };
        let (tx, rx) = watch::channel(Arc::new(new_view()));
        // A new summary is shown at once (within `SUMMARY_SHOWN_WITHIN`),
        // not at the next refresh: placement reads free capacity from it.
        let summary_news = Arc::new(tokio::sync::Notify::new());
        let view_task =
            tokio::spawn(refresh_view(handle.chitchat(), tx, config.view_refresh, new_view(), summary_news.clone()));
        // Rumour spreading for summaries: a member that learns a new summary
        // tells a few peers at once instead of waiting for its next round.
        let (push_tx, push_rx) = tokio::sync::mpsc::channel::<()>(1);
        let summary_listener = handle.chitchat().lock().await.subscribe_event(keys::SUMMARY, move |_| {
            let _ = push_tx.try_send(());
            summary_news.notify_one();
        });
        let push_task = tokio::spawn(push_on_change(handle.clone(), push_rx));
        Ok(Member {
            handle,
            push_task,
            _summary_listener: summary_listener,
            keyring,
            metrics,
            view: rx,
            view_task,
            publisher: Mutex::new(Publisher::default()),
            config,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn config(&self) -> &MemberConfig {
        &self.config
    }

    /// The latest view of the federation.
    pub fn view(&self) -> Arc<FederationView> {
        self.view.borrow().clone()
    }

    /// A stream of views, one per change.
    pub fn watch(&self) -> watch::Receiver<Arc<FederationView>> {
        self.view.clone()
    }

    pub fn keyring(&self) -> SharedKeyring {
        self.keyring.clone()
    }

    /// Replaces the keyring (a rotation step) and tells the federation
    /// which key ids this member now holds ([`keys::KEYS`]), so that an
    /// operator can see every member has a key before sealing with it.
    pub async fn set_keyring(&self, ring: Keyring) {
        let ids = crate::view::key_ids_text(&ring.ids());
        *self.keyring.write().expect("keyring lock") = ring;
        self.handle.with_chitchat(|c| c.self_node_state().set(keys::KEYS, &ids)).await;
    }

    pub fn metrics(&self) -> Arc<GossipMetrics> {
        self.metrics.clone()
    }

    /// Peers whose gossip this member refuses for their clock (see
    /// [`MemberConfig::max_clock_skew`]).
    pub fn skewed_peers(&self) -> Vec<crate::transport::SkewedPeer> {
        self.metrics.skewed_peers(unix_ms())
    }

    pub async fn set_raft_term(&self, term: u64) {
        self.handle.with_chitchat(|c| c.self_node_state().set(keys::RAFT_TERM, term)).await;
    }

    /// Publishes `summary` if the rate limit and change threshold allow
    /// (see [`Publisher`]); returns whether it did. Only a cluster's
    /// leader should call this.
    pub async fn publish_summary(&self, summary: ClusterSummary, now_ms: u64) -> Result<bool, SummaryError> {
        let summary = {
            let publisher = self.publisher.lock().expect("publisher lock");
            if !publisher.due(&summary, now_ms) {
                return Ok(false);
            }
            publisher.stamp(summary)
        };
        let mut text = summary.encode()?;
        if let Some(signer) = &self.config.signer {
            let node_id = self.config.node_id();
            let claim = claim(&self.config, &node_id, self.local_addr);
            text = crate::identity::signed_summary(signer, &claim, &text);
        }
        self.publisher.lock().expect("publisher lock").record(summary, now_ms);
        let peers: Vec<SocketAddr> = self
            .handle
            .with_chitchat(|c| {
                c.self_node_state().set(keys::SUMMARY, &text);
                let me = c.self_chitchat_id().clone();
                c.live_nodes().filter(|id| **id != me).map(|id| id.gossip_advertise_addr).collect()
            })
            .await;
        // Tell a few peers now rather than at the next round.
        for addr in pick(&peers, PUSH_FANOUT, now_ms) {
            let _ = self.handle.gossip(addr);
        }
        Ok(true)
    }

    /// Stops publishing (on losing leadership): peers keep the last
    /// summary until a newer term supersedes it.
    pub async fn withdraw_summary(&self) {
        self.publisher.lock().expect("publisher lock").reset();
        self.handle.with_chitchat(|c| c.self_node_state().delete(keys::SUMMARY)).await;
    }

    /// Announces a clean stop ([`keys::LEFT`]): pushes it to a few peers
    /// at once and keeps gossiping for [`LEAVE_ANNOUNCE`] so every peer
    /// hears it. Peers then show the server `left`, not dead; the caller
    /// stops it (or the process ends) after.
    pub async fn leave(&self) {
        let left = match &self.config.signer {
            Some(signer) => {
                let node_id = self.config.node_id();
                crate::identity::signed_left(signer, &claim(&self.config, &node_id, self.local_addr))
            }
            None => "1".to_string(),
        };
        let peers: Vec<SocketAddr> = self
            .handle
            .with_chitchat(|c| {
                c.self_node_state().set(keys::LEFT, &left);
                let me = c.self_chitchat_id().clone();
                c.live_nodes().filter(|id| **id != me).map(|id| id.gossip_advertise_addr).collect()
            })
            .await;
        for addr in pick(&peers, PUSH_FANOUT, unix_ms()) {
            let _ = self.handle.gossip(addr);
        }
        tokio::time::sleep(LEAVE_ANNOUNCE).await;
    }

    /// Stops at once, saying nothing: peers find the server dead. Takes
    /// `&self` so a member shared behind an `Arc` stops even while other
    /// holders (tasks, APIs) still have it: a stopped server's member
    /// must never go on heartbeating beside its restarted self.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.view_task.abort();
        self.push_task.abort();
        let _ = self.handle.initiate_shutdown();
        self.handle.termination_watcher().await
    }
}

/// Recomputes the view when chitchat reports a change (joins, leaves,
/// new values), and at least every `every` so that suspect clusters turn
/// dead on time; sends it when it changed.
/// How soon a member's view shows a summary it learned: news that comes
/// together (many clusters publishing at once) is folded in one refresh.
pub const SUMMARY_SHOWN_WITHIN: Duration = Duration::from_millis(20);

async fn refresh_view(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    tx: watch::Sender<Arc<FederationView>>,
    every: Duration,
    mut view: FederationView,
    summary_news: Arc<tokio::sync::Notify>,
) {
    let mut changes = chitchat.lock().await.live_nodes_watcher();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
            _ = summary_news.notified() => tokio::time::sleep(SUMMARY_SHOWN_WITHIN).await,
        }
        let changed = {
            let c = chitchat.lock().await;
            let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
            let members: Vec<MemberState> = c
                .node_states()
                .iter()
                .map(|(id, state)| MemberState {
                    node_id: &id.node_id,
                    addr: id.gossip_advertise_addr,
                    generation: id.generation_id,
                    live: live.contains(id),
                    heartbeat: u64::from(state.heartbeat()),
                    values: state.key_values().filter(|(k, _)| *k != keys::SUMMARY).collect(),
                    version: Some(state.monotonic_property()),
                    summary: state
                        .get_versioned(keys::SUMMARY)
                        .filter(|v| !v.is_deleted())
                        .map(|v| (v.version, v.value.as_str())),
                })
                .collect();
            let before = view.conflicts.clone();
            let refused_before = view.refused.clone();
            let changed = view.update(&members, unix_ms());
            for r in view.refused.iter().filter(|r| !refused_before.contains(r)) {
                tracing::warn!(
                    member = ?r.node_id,
                    generation = r.generation,
                    addr = %r.addr,
                    "gossip member {} at {} is refused: {}; it is not shown and nothing it says is used",
                    r.node_id.escape_debug(),
                    r.addr,
                    r.reason.escape_debug()
                );
            }
            for c in view.conflicts.iter().filter(|c| !before.contains(c)) {
                tracing::warn!(
                    cluster = ?c.cluster,
                    server = ?c.server,
                    holder = c.holder,
                    rivals = ?c.rivals,
                    "two live gossip members claim the server name {}/{}: the one first seen keeps it, the \
                     other's summaries are refused; give every server its own name",
                    c.cluster.escape_debug(),
                    c.server.escape_debug()
                );
            }
            changed
        };
        if changed && tx.send(Arc::new(view.clone())).is_err() {
            return;
        }
    }
}

/// What this member signs its values as (see [`crate::identity::Claim`]).
fn claim<'a>(config: &'a MemberConfig, node_id: &'a str, addr: SocketAddr) -> crate::identity::Claim<'a> {
    crate::identity::Claim {
        federation: &config.federation,
        node_id,
        generation: config.generation,
        addr,
        cluster: &config.cluster,
        server: &config.server,
        rpc_addr: config.rpc_addr.as_deref(),
        region: &config.region,
    }
}

/// Rumour spreading for summaries: when this member learns a new summary,
/// it starts gossip rounds with a few random live peers at once (at most
/// once per [`PUSH_COALESCE_MS`]), so a change travels in round trips, not
/// in gossip intervals.
async fn push_on_change(handle: Arc<ChitchatHandle>, mut changes: tokio::sync::mpsc::Receiver<()>) {
    let mut seed = 0u64;
    while changes.recv().await.is_some() {
        let peers: Vec<SocketAddr> = handle
            .with_chitchat(|c| {
                let me = c.self_chitchat_id().clone();
                c.live_nodes().filter(|id| **id != me).map(|id| id.gossip_advertise_addr).collect()
            })
            .await;
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        for addr in pick(&peers, PUSH_FANOUT, seed >> 33) {
            let _ = handle.gossip(addr);
        }
        tokio::time::sleep(Duration::from_millis(PUSH_COALESCE_MS)).await;
    }
}

/// Up to `n` of `peers`, spread over the list from an offset `seed` picks.
fn pick(peers: &[SocketAddr], n: usize, seed: u64) -> Vec<SocketAddr> {
    if peers.is_empty() {
        return Vec::new();
    }
    let step = (peers.len() / n).max(1);
    peers.iter().skip(seed as usize % step).step_by(step).take(n).copied().collect()
}
