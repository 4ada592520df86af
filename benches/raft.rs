//! `cargo bench --bench raft`: a 3-server cluster in one process, talking
//! QUIC with mutual TLS over loopback, each server's log on redb with
//! fsync. Committed commands per second for 1 client and for 64 concurrent
//! clients, commit latency, and the time from the leader's abrupt stop
//! (its task aborted and its endpoint dropped: a crash, not a shutdown) to
//! the next committed write, over 5 trials. Ends with `name: value` lines.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::command::Command;
use cluster_core::model::Node;
use cluster_core::raft::node::{RaftConfig, RaftHandle, RaftMessage, start};
use cluster_core::raft::storage::RedbStorage;
use cluster_core::spec::{load, parse_fleet};
use cluster_core::transport::Transport;
use cluster_core::transport::quic::{QuicClient, QuicServer};
use cluster_core::transport::tls::{self, Identity, PemPair, Role};

struct Server {
    id: u64,
    handle: RaftHandle,
    task: tokio::task::JoinHandle<()>,
    _endpoint: QuicServer,
}

struct Cluster {
    servers: Vec<Server>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &self.servers {
            s.task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn cluster(ca: &PemPair, trial: usize) -> Cluster {
    let dir = std::env::temp_dir().join(format!("hanse-raft-bench-{}-{trial}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let peers: BTreeMap<u64, SocketAddr> =
        (1..=3).map(|id| (id, std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap())).collect();
    let logger = cluster_core::raft::log::logger();
    let mut servers = Vec::new();
    for id in 1..=3u64 {
        let pair = tls::issue(ca, &Identity::new("bench", Role::Server, &format!("s{id}")), 1).unwrap();
        let store = RedbStorage::open(&dir.join(format!("s{id}.redb"))).unwrap();
        let transport: Arc<dyn Transport<RaftMessage>> = Arc::new(QuicClient::new(&ca.cert_pem, &pair).unwrap());
        let (handle, task) = start(RaftConfig::new(id, peers.clone()), store, transport, &logger).unwrap();
        let endpoint =
            QuicServer::bind::<RaftMessage>(peers[&id], &ca.cert_pem, &pair, Arc::new(handle.clone())).unwrap();
        servers.push(Server { id, handle, task, _endpoint: endpoint });
    }
    Cluster { servers, dir }
}

async fn leader(c: &Cluster) -> usize {
    loop {
        let ls: Vec<Option<u64>> = c.servers.iter().map(|s| s.handle.status().leader).collect();
        if let Some(Some(l)) = ls.first() {
            if ls.iter().all(|x| *x == Some(*l)) {
                if let Some(i) = c.servers.iter().position(|s| s.id == *l) {
                    return i;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `clients` tasks each committing `per_client` commands one after another.
async fn load_run(h: &RaftHandle, nodes: &[Node], clients: usize, per_client: usize) -> (f64, Vec<f64>) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let h = h.clone();
            let nodes: Vec<Node> = nodes.iter().skip(c).step_by(clients).take(per_client).cloned().collect();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(nodes.len());
                for n in nodes {
                    let t = Instant::now();
                    h.propose(Command::UpsertNode(n)).await.expect("committed");
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let per_sec = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    (per_sec, all)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut figures: BTreeMap<String, String> = BTreeMap::new();
    rt.block_on(async {
        let fleet =
            load(&PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fleets/eu-west.toml")), parse_fleet)
                .unwrap();
        // Distinct nodes to upsert: about 300 bytes each through the codec.
        let nodes: Vec<Node> = (0..20_000)
            .map(|i| {
                let mut n = fleet.nodes[i % fleet.nodes.len()].clone();
                n.id = format!("bench-{i}").as_str().into();
                n
            })
            .collect();
        let entry_bytes = cluster_core::codec::encode(&Command::UpsertNode(nodes[0].clone())).len();
        let ca = tls::create_ca("bench", 1).unwrap();

        let c = cluster(&ca, 0).await;
        let l = leader(&c).await;
        let h = c.servers[l].handle.clone();
        let (one, lat1) = load_run(&h, &nodes, 1, 1_000).await;
        println!("1 client: {one:.0} commits/s");
        let (many, lat64) = load_run(&h, &nodes[1_000..], 64, 200).await;
        println!("64 clients: {many:.0} commits/s");
        figures.insert("command_bytes".into(), entry_bytes.to_string());
        figures.insert("commits_per_sec_1_client".into(), format!("{one:.0}"));
        figures.insert("commit_latency_p50_ms_1_client".into(), format!("{:.2}", percentile(&lat1, 0.5)));
        figures.insert("commits_per_sec_64_clients".into(), format!("{many:.0}"));
        figures.insert("commit_latency_p50_ms".into(), format!("{:.2}", percentile(&lat64, 0.5)));
        figures.insert("commit_latency_p99_ms".into(), format!("{:.2}", percentile(&lat64, 0.99)));
        drop(c);

        let mut failovers = Vec::new();
        for trial in 1..=5 {
            let mut c = cluster(&ca, trial).await;
            let l = leader(&c).await;
            c.servers[l].handle.propose(Command::UpsertNode(nodes[trial].clone())).await.unwrap();
            let crashed = c.servers.remove(l);
            let t = Instant::now();
            crashed.task.abort();
            drop(crashed);
            // The next write that commits, tried on whoever leads.
            let mut k = 0;
            loop {
                k += 1;
                let attempts: Vec<_> = c.servers.iter().map(|s| s.handle.clone()).collect();
                let mut done = false;
                for h in attempts {
                    if h.propose(Command::UpsertNode(nodes[100 + trial * 10 + k % 10].clone())).await.is_ok() {
                        done = true;
                        break;
                    }
                }
                if done || t.elapsed() > Duration::from_secs(30) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let ms = t.elapsed().as_secs_f64() * 1e3;
            println!("failover trial {trial}: {ms:.0} ms");
            failovers.push(ms);
        }
        failovers.sort_by(f64::total_cmp);
        figures.insert("failover_ms_median".into(), format!("{:.0}", percentile(&failovers, 0.5)));
        figures.insert("failover_ms_max".into(), format!("{:.0}", failovers[failovers.len() - 1]));
    });
    println!();
    for (k, v) in &figures {
        println!("{k}: {v}");
    }
}
