//! Three Raft servers on the in-memory transport: election, replication,
//! a killed leader, and a restarted server catching up from a snapshot.
//! Every wait is bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::command::{Command, Effect};
use cluster_core::diag::SourceFile;
use cluster_core::raft::node::{ProposeError, RaftConfig, RaftHandle, RaftMessage, start};
use cluster_core::raft::storage::RedbStorage;
use cluster_core::spec::parse_fleet;
use cluster_core::transport::mem::MemNetwork;
use cluster_core::transport::quic::{QuicClient, QuicServer};
use cluster_core::transport::tls::{self, PemPair};
use cluster_core::transport::{Identity, Role, Transport};

fn nodes() -> Vec<cluster_core::model::Node> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/fleets/eu-west.toml")).unwrap();
    parse_fleet(&SourceFile::new("eu-west.toml", text)).value.unwrap().nodes
}

struct Server {
    id: u64,
    handle: RaftHandle,
    task: tokio::task::JoinHandle<()>,
}

/// The network the servers talk over.
enum Net {
    Mem(MemNetwork),
    /// QUIC with mutual TLS on loopback; the servers' endpoints by id.
    Quic {
        ca: PemPair,
        endpoints: BTreeMap<u64, QuicServer>,
    },
}

struct Cluster {
    net: Net,
    peers: BTreeMap<u64, SocketAddr>,
    dir: PathBuf,
    compact_every: u64,
    servers: Vec<Server>,
}

impl Cluster {
    fn new(name: &str, compact_every: u64) -> Cluster {
        Self::with_net(name, compact_every, false)
    }

    fn with_net(name: &str, compact_every: u64, quic: bool) -> Cluster {
        let dir = std::env::temp_dir().join(format!("hanse-raft-cluster-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (net, peers) = if quic {
            // Free loopback ports: bind, note, release.
            let peers = (1..=3u64)
                .map(|id| (id, std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()))
                .collect();
            (Net::Quic { ca: tls::create_ca("raft-test", 1).unwrap(), endpoints: BTreeMap::new() }, peers)
        } else {
            let peers = (1..=3u64).map(|id| (id, SocketAddr::from(([127, 0, 0, 1], 9000 + id as u16)))).collect();
            (Net::Mem(MemNetwork::new()), peers)
        };
        let mut c = Cluster { net, peers, dir, compact_every, servers: Vec::new() };
        for id in 1..=3 {
            c.start(id);
        }
        c
    }

    fn start(&mut self, id: u64) {
        self.start_as(id, false);
    }

    fn start_as(&mut self, id: u64, join: bool) {
        let store = RedbStorage::open(&self.dir.join(format!("s{id}.redb"))).unwrap();
        let mut config = RaftConfig::new(id, self.peers.clone());
        config.tick = Duration::from_millis(20);
        config.compact_every = self.compact_every;
        config.join = join;
        let me = Identity::new("eu-west", Role::Server, &format!("s{id}"));
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        match &mut self.net {
            Net::Mem(net) => {
                let transport: Arc<dyn Transport<RaftMessage>> = Arc::new(net.client(me));
                let (handle, task) = start(config, store, transport, &logger).unwrap();
                net.serve::<RaftMessage>(self.peers[&id], Arc::new(handle.clone()));
                self.servers.push(Server { id, handle, task });
            }
            Net::Quic { ca, endpoints } => {
                let pair = tls::issue(ca, &me, 1).unwrap();
                let transport: Arc<dyn Transport<RaftMessage>> =
                    Arc::new(QuicClient::new(&ca.cert_pem, &pair).unwrap());
                let (handle, task) = start(config, store, transport, &logger).unwrap();
                // A restarted server binds its old port: the closed
                // endpoint's socket is released by its driver a moment
                // after the close, so binding is retried for up to 3 s.
                let started = Instant::now();
                let endpoint = loop {
                    match QuicServer::bind::<RaftMessage>(
                        self.peers[&id],
                        &ca.cert_pem,
                        &pair,
                        Arc::new(handle.clone()),
                    ) {
                        Ok(e) => break e,
                        Err(e) if started.elapsed() < Duration::from_secs(3) => {
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => panic!("cannot bind {}: {e}", self.peers[&id]),
                    }
                };
                endpoints.insert(id, endpoint);
                self.servers.push(Server { id, handle, task });
            }
        }
    }

    async fn stop(&mut self, id: u64) {
        let at = self.servers.iter().position(|s| s.id == id).unwrap();
        let s = self.servers.remove(at);
        match &mut self.net {
            Net::Mem(net) => net.stop(self.peers[&id]),
            Net::Quic { endpoints, .. } => drop(endpoints.remove(&id)),
        }
        s.handle.stop().await;
        tokio::time::timeout(Duration::from_secs(5), s.task).await.expect("driver stops").unwrap();
    }

    /// The one leader all running servers agree on.
    async fn leader(&self) -> u64 {
        let start = Instant::now();
        loop {
            let leaders: Vec<Option<u64>> = self.servers.iter().map(|s| s.handle.status().leader).collect();
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l)) && self.servers.iter().any(|s| s.id == *l) {
                    return *l;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn propose(&self, c: Command) -> Effect {
        let start = Instant::now();
        loop {
            let leader = self.leader().await;
            let s = self.servers.iter().find(|s| s.id == leader).unwrap();
            match s.handle.propose(c.clone()).await {
                Ok(e) => return e,
                Err(ProposeError::NotLeader(_)) if start.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("proposal failed: {e}"),
            }
        }
    }

    /// Waits until every running server applied what the leader committed,
    /// then returns their state snapshots.
    async fn settled(&self) -> Vec<Vec<u8>> {
        let start = Instant::now();
        loop {
            let commits: Vec<u64> = self.servers.iter().map(|s| s.handle.status().commit).collect();
            let applied: Vec<u64> = self.servers.iter().map(|s| s.handle.status().applied).collect();
            let top = *commits.iter().max().unwrap();
            if applied.iter().all(|a| *a == top) {
                return self.servers.iter().map(|s| s.handle.read(|st| st.snapshot())).collect();
            }
            assert!(start.elapsed() < Duration::from_secs(15), "not settled: commit {commits:?} applied {applied:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &self.servers {
            s.task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn node_count(h: &RaftHandle) -> usize {
    h.read(|s| s.nodes().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_elect_one_leader_and_apply_the_same_commands() {
    replicate(Cluster::new("replicate", 10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_three_servers_elect_one_leader_and_apply_the_same_commands() {
    replicate(Cluster::with_net("replicate-quic", 10_000, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_a_killed_leader_is_replaced_and_nothing_acknowledged_is_lost() {
    failover(Cluster::with_net("failover-quic", 10_000, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_a_restarted_server_catches_up_from_a_snapshot() {
    catch_up(Cluster::with_net("catchup-quic", 20, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_read_on_a_follower_sees_every_committed_write() {
    let cluster = Cluster::new("read-index", 10_000);
    let leader = cluster.leader().await;
    let follower = cluster.servers.iter().find(|s| s.id != leader).unwrap();
    for (i, n) in nodes().into_iter().take(40).enumerate() {
        cluster.propose(Command::UpsertNode(n)).await;
        // Right after the leader acknowledged write i, a ReadIndex read on
        // the follower sees it: no waiting for replication to settle.
        let seen = follower.handle.read_fresh(|s| s.nodes().len()).await.expect("read");
        assert_eq!(seen, i + 1, "write {i} acknowledged but not visible to a fresh read");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_join_and_leave_and_leadership_moves_on_request() {
    let mut cluster = Cluster::new("membership", 10_000);
    let ns = nodes();
    for n in ns.iter().take(10) {
        cluster.propose(Command::UpsertNode(n.clone())).await;
    }
    // A fourth server joins: it starts empty and learns the cluster (it
    // knows no leader until it is added).
    let leader = cluster.leader().await;
    cluster.peers.insert(4, SocketAddr::from(([127, 0, 0, 1], 9004)));
    cluster.start_as(4, true);
    let h = cluster.servers.iter().find(|s| s.id == leader).unwrap().handle.clone();
    let cs = h.add_peer(4, cluster.peers[&4]).await.expect("add");
    assert_eq!(cs.voters.len(), 4);
    for n in ns.iter().skip(10).take(5) {
        cluster.propose(Command::UpsertNode(n.clone())).await;
    }
    let snaps = cluster.settled().await;
    assert!(snaps.windows(2).all(|w| w[0] == w[1]));
    let four = cluster.servers.iter().find(|s| s.id == 4).unwrap();
    assert_eq!(node_count(&four.handle), 15, "the new server has everything");

    // Leadership moves where asked.
    let target = cluster.servers.iter().map(|s| s.id).find(|id| *id != leader).unwrap();
    h.transfer_leader(target).await.unwrap();
    let start = Instant::now();
    while cluster.leader().await != target {
        assert!(start.elapsed() < Duration::from_secs(10), "leadership did not move to {target}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A server leaves; the other three carry on.
    let leaving = cluster.servers.iter().map(|s| s.id).find(|id| *id != target).unwrap();
    let h = cluster.servers.iter().find(|s| s.id == target).unwrap().handle.clone();
    let cs = h.remove_peer(leaving).await.expect("remove");
    assert_eq!(cs.voters.len(), 3);
    assert!(!cs.voters.contains(&leaving));
    cluster.stop(leaving).await;
    for n in ns.iter().skip(15).take(5) {
        cluster.propose(Command::UpsertNode(n.clone())).await;
    }
    let snaps = cluster.settled().await;
    assert!(snaps.windows(2).all(|w| w[0] == w[1]));
    assert!(cluster.servers.iter().all(|s| node_count(&s.handle) == 20));
}

async fn replicate(cluster: Cluster) {
    cluster.leader().await;
    let ns = nodes();
    let calls: Vec<_> = ns.iter().take(60).cloned().map(|n| cluster.propose(Command::UpsertNode(n))).collect();
    for c in calls {
        assert!(matches!(c.await, Effect::NodeUpserted(_)));
    }
    let snaps = cluster.settled().await;
    assert!(snaps.windows(2).all(|w| w[0] == w[1]), "replicas differ");
    assert!(cluster.servers.iter().all(|s| node_count(&s.handle) == 60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_nothing_acknowledged_is_lost() {
    failover(Cluster::new("failover", 10_000)).await;
}

async fn failover(mut cluster: Cluster) {
    let ns = nodes();
    for n in ns.iter().take(20) {
        cluster.propose(Command::UpsertNode(n.clone())).await;
    }
    let old = cluster.leader().await;
    cluster.stop(old).await;
    let new = cluster.leader().await;
    assert_ne!(new, old);
    for n in ns.iter().skip(20).take(10) {
        cluster.propose(Command::UpsertNode(n.clone())).await;
    }
    let snaps = cluster.settled().await;
    let ids: Vec<Vec<String>> = cluster
        .servers
        .iter()
        .map(|s| s.handle.read(|st| st.nodes().iter().map(|n| n.id.to_string()).collect()))
        .collect();
    let statuses: Vec<_> = cluster.servers.iter().map(|s| (s.id, s.handle.status())).collect();
    let missing: Vec<Vec<&String>> =
        ids.iter().map(|x| ids.iter().flatten().filter(|i| !x.contains(i)).collect()).collect();
    assert!(snaps[0] == snaps[1], "replicas differ: {statuses:?}, missing {missing:?}");
    assert!(
        cluster.servers.iter().all(|s| node_count(&s.handle) == 30),
        "an acknowledged command was lost: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_catches_up_from_a_snapshot_after_compaction() {
    catch_up(Cluster::new("catchup", 20)).await;
}

async fn catch_up(mut cluster: Cluster) {
    let ns = nodes();
    for n in ns.iter().take(5) {
        cluster.propose(Command::UpsertNode(n.clone())).await;
    }
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.stop(follower).await;
    // Enough entries that the others compact past what the follower holds.
    for n in ns.iter().skip(5).take(80) {
        cluster.propose(Command::UpsertNode(n.clone())).await;
    }
    cluster.start(follower);
    let snaps = cluster.settled().await;
    assert!(snaps.windows(2).all(|w| w[0] == w[1]), "the restarted server differs");
    let back = cluster.servers.iter().find(|s| s.id == follower).unwrap();
    assert_eq!(node_count(&back.handle), 85);
    assert!(back.handle.status().snapshots_installed >= 1, "it caught up through a snapshot, not the log");
}

/// A snapshot larger than a transport frame (16 MiB) reaches a server
/// that joins with an empty disk after compaction: it travels in chunks,
/// and the new server installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_joining_with_an_empty_disk_catches_up_through_a_snapshot_larger_than_a_frame() {
    let mut cluster = Cluster::new("bigsnap", 4);
    // Records of random bytes do not compress: 20 of 1 MiB make a
    // snapshot over the frame limit.
    for i in 0..20 {
        let mut record = vec![0u8; 1 << 20];
        getrandom::fill(&mut record).unwrap();
        cluster.propose(Command::Record { holder: format!("test/{i}"), record }).await;
    }
    for _ in 0..8 {
        cluster.propose(Command::UpsertNode(nodes()[0].clone())).await;
    }
    let leader = cluster.leader().await;
    cluster.peers.insert(4, SocketAddr::from(([127, 0, 0, 1], 9004)));
    cluster.start_as(4, true);
    let h = cluster.servers.iter().find(|s| s.id == leader).unwrap().handle.clone();
    h.add_peer(4, cluster.peers[&4]).await.expect("add");
    cluster.propose(Command::UpsertNode(nodes()[1].clone())).await;
    let snaps = cluster.settled().await;
    assert!(snaps[0].len() > cluster_core::transport::FRAME_BYTES_MAX, "the state fits a frame: {}", snaps[0].len());
    assert!(snaps.windows(2).all(|w| w[0] == w[1]), "the new server differs");
    let four = cluster.servers.iter().find(|s| s.id == 4).unwrap();
    assert!(four.handle.status().snapshots_installed >= 1, "it caught up through a snapshot, not the log");
    assert_eq!(four.handle.read(|s| s.records("test/").count()), 20);
}
