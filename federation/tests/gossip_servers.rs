//! Cluster servers in the federation's gossip: two clusters on loopback
//! (real QUIC, redb, HTTP and UDP gossip); each leader publishes its
//! cluster's summary; the other cluster sees it, and sees the next
//! leader's summary after the first one stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::diag::SourceFile;
use cluster_core::server::ServerOptions;
use cluster_core::server::client::Client;
use cluster_core::server::local::LocalCluster;
use cluster_core::spec::parse_fleet;
use federation::publish::{Identity, publish};
use gossip::net::UdpNet;
use gossip::{FederationView, Key, Keyring, Liveness, Member, MemberConfig};

struct Gossiping {
    cluster: LocalCluster,
    members: Vec<(u64, Arc<Member>, tokio::task::JoinHandle<()>)>,
}

async fn start(name: &str, servers: u64, key: &Key, seeds: Vec<String>, jurisdictions: &[&str]) -> Gossiping {
    let dir = std::env::temp_dir().join(format!("hanse-gossip-servers-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = LocalCluster::start(name, &dir, servers, ServerOptions::new(name, "s"), Duration::from_millis(100))
        .await
        .expect("the cluster starts");
    let mut members: Vec<(u64, Arc<Member>, tokio::task::JoinHandle<()>)> = Vec::new();
    for id in cluster.running().collect::<Vec<_>>() {
        let mut config = MemberConfig::new("test", name, &format!("s{id}"), "127.0.0.1:0".parse().unwrap());
        config.region = format!("{name}-1");
        // Every member knows the given seeds and its cluster's first server.
        config.seeds = seeds.clone();
        config.seeds.extend(members.first().map(|(_, m, _)| m.local_addr().to_string()));
        let member = Arc::new(Member::start(config, Keyring::new(key.clone()), Arc::new(UdpNet)).await.unwrap());
        let me = Identity {
            region: format!("{name}-1"),
            jurisdictions: jurisdictions.iter().map(|j| j.to_string()).collect(),
        };
        let task = tokio::spawn(publish(cluster.server(id).unwrap().inner.clone(), member.clone(), me));
        members.push((id, member, task));
    }
    Gossiping { cluster, members }
}

async fn until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn nodes(count: usize) -> Vec<cluster_core::model::Node> {
    let text =
        format!("[fleet]\nname = \"t\"\n[[class]]\nname = \"m\"\ncount = {count}\ncpu = 8\nmemory = \"32GiB\"\n");
    parse_fleet(&SourceFile::new("f.toml", text)).value.unwrap().nodes
}

fn entry(view: &FederationView, cluster: &str) -> Option<(Liveness, u32, u64)> {
    let e = view.cluster(cluster)?;
    let s = e.summary.as_ref()?;
    Some((e.liveness, s.nodes_ready, s.term))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_leader_publishes_its_cluster_and_the_next_leader_takes_over() {
    let key = Key::generate();
    let mut eu = start("eu-west", 3, &key, Vec::new(), &["eu"]).await;
    let seed = eu.members[0].1.local_addr().to_string();
    let us = start("us-east", 1, &key, vec![seed], &["us"]).await;
    let leader = eu.cluster.leader(Duration::from_secs(10)).await.unwrap();
    let term = eu.cluster.server(leader).unwrap().raft().status().term;

    let client = Client::new(&eu.cluster.addresses());
    tokio::task::spawn_blocking(move || client.register_nodes(&nodes(30)).unwrap()).await.unwrap();
    let watcher = us.members[0].1.clone();
    until(Duration::from_secs(15), "us-east sees eu-west's 30 nodes", || {
        entry(&watcher.view(), "eu-west").is_some_and(|(l, n, t)| l == Liveness::Alive && n == 30 && t == term)
    })
    .await;
    // Only the leader publishes: eu-west's followers carry no summary.
    let view = watcher.view();
    let e = view.cluster("eu-west").unwrap();
    assert_eq!(e.leader.as_deref(), Some(format!("s{leader}").as_str()), "the summary is the leader's");
    // And eu-west sees us-east (no nodes yet).
    let eu_view = eu.members[0].1.clone();
    until(Duration::from_secs(15), "eu-west sees us-east", || {
        entry(&eu_view.view(), "us-east").is_some_and(|(l, n, _)| l == Liveness::Alive && n == 0)
    })
    .await;

    // The leader stops; the next one publishes under its newer term.
    let at = eu.members.iter().position(|(id, _, _)| *id == leader).unwrap();
    let (_, member, task) = eu.members.remove(at);
    task.abort();
    eu.cluster.stop_server(leader).await;
    if let Ok(m) = Arc::try_unwrap(member) {
        let _ = m.shutdown().await;
    }
    let mut seen = None;
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            seen = entry(&watcher.view(), "eu-west");
            if seen.is_some_and(|(l, n, t)| l == Liveness::Alive && n == 30 && t > term) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let new_leader = eu.cluster.leader(Duration::from_secs(1)).await;
    assert!(
        found.is_ok(),
        "the next leader's summary never arrived: last seen {seen:?}, term was {term}, leader now {new_leader:?}, view {:?}",
        watcher.view().cluster("eu-west").map(|e| (e.leader.clone(), e.servers.keys().cloned().collect::<Vec<_>>()))
    );

    for g in [eu, us] {
        for (_, _, task) in &g.members {
            task.abort();
        }
        g.cluster.stop().await;
    }
}
