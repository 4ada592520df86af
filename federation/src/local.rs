//! Clusters in one process, on loopback, that gossip and (with a policy)
//! delegate: real QUIC with mutual TLS (one CA for the federation), redb,
//! HTTP and UDP gossip. For tests, benchmarks and demos.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::node::Federation;
use crate::policy::parse_policy;
use crate::publish::{Identity, publish};
use cluster_core::diag::SourceFile;
use cluster_core::server::ServerOptions;
use cluster_core::server::local::LocalCluster;
use cluster_core::spec::parse_fleet;
use cluster_core::transport::tls::PemPair;
use gossip::net::UdpNet;
use gossip::{FederationView, Key, Keyring, Liveness, Member, MemberConfig};

pub struct Server {
    pub id: u64,
    pub member: Arc<Member>,
    pub federation: Option<Arc<Federation>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub struct Gossiping {
    pub cluster: LocalCluster,
    pub servers: Vec<Server>,
    /// Tasks that live as long as the cluster (simulated nodes).
    background: Vec<tokio::task::JoinHandle<()>>,
    key: Key,
    seeds: Vec<String>,
    jurisdictions: Vec<String>,
    policy: Option<crate::policy::Policy>,
    region: String,
}

pub struct Setup<'a> {
    pub name: &'a str,
    pub servers: u64,
    pub key: &'a Key,
    pub ca: Option<&'a PemPair>,
    pub seeds: Vec<String>,
    pub jurisdictions: &'a [&'a str],
    /// A policy file's text: the cluster delegates and accepts by it.
    pub policy: Option<String>,
    /// The servers' HTTP addresses; free ports when empty.
    pub http: Vec<std::net::SocketAddr>,
    /// Where the servers keep their logs; a fresh temporary directory
    /// when `None`.
    pub data_dir: Option<std::path::PathBuf>,
    /// The region gossip names; `NAME-1` when `None`.
    pub region: Option<String>,
    /// The secret of the cluster's management token; drawn when `None`
    /// (see `LocalCluster::token`).
    pub token: Option<String>,
}

impl<'a> Setup<'a> {
    /// One server in the EU, on free ports and a fresh directory, that
    /// delegates and accepts by `policy` (a policy file's text).
    pub fn single(name: &'a str, key: &'a Key, ca: &'a PemPair, seeds: Vec<String>, policy: String) -> Setup<'a> {
        Setup {
            name,
            servers: 1,
            key,
            ca: Some(ca),
            seeds,
            jurisdictions: &["eu"],
            policy: Some(policy),
            http: Vec::new(),
            data_dir: None,
            region: None,
            token: None,
        }
    }
}

/// Starts a cluster of `s.servers` servers and joins each to the gossip.
pub async fn start(s: Setup<'_>) -> Gossiping {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = match &s.data_dir {
        Some(d) => d.clone(),
        None => {
            let d = std::env::temp_dir().join(format!("hanse-fed-{}-{n}-{}", std::process::id(), s.name));
            let _ = std::fs::remove_dir_all(&d);
            d
        }
    };
    let mut options = ServerOptions::new(s.name, "s");
    options.acl.initial_management = s.token.clone();
    let cluster =
        LocalCluster::start_at(s.name, &dir, s.servers, options, Duration::from_millis(100), s.ca.cloned(), &s.http)
            .await
            .expect("the cluster starts");
    let policy = s.policy.as_ref().map(|text| {
        let file = SourceFile::new(format!("{}.toml", s.name), text.clone());
        let checked = parse_policy(&file);
        checked.value.unwrap_or_else(|| panic!("{}", file.render(&checked.diagnostics)))
    });
    let mut g = Gossiping {
        cluster,
        servers: Vec::new(),
        background: Vec::new(),
        key: s.key.clone(),
        seeds: s.seeds.clone(),
        jurisdictions: s.jurisdictions.iter().map(|j| j.to_string()).collect(),
        policy,
        region: s.region.clone().unwrap_or_else(|| format!("{}-1", s.name)),
    };
    for id in g.cluster.running().collect::<Vec<_>>() {
        g.join(id).await;
    }
    g
}

impl Gossiping {
    /// Gossip (and, with a policy, federation) for server `id`.
    async fn join(&mut self, id: u64) {
        let name = self.cluster.name.clone();
        let mut config = MemberConfig::new("test", &name, &format!("s{id}"), "127.0.0.1:0".parse().unwrap());
        config.region = self.region.clone();
        config.seeds = self.seeds.clone();
        config.seeds.extend(self.servers.first().map(|x| x.member.local_addr().to_string()));
        config.rpc_addr = Some(self.cluster.raft_addrs[&id].to_string());
        let inner = self.cluster.server(id).unwrap().inner.clone();
        // A restarted server seals with what its cluster committed, if anything.
        let ring = crate::keyring::committed(&inner).unwrap_or_else(|| Keyring::new(self.key.clone()));
        let member = Arc::new(Member::start(config, ring, Arc::new(UdpNet)).await.unwrap());
        let me = Identity { region: self.region.clone(), jurisdictions: self.jurisdictions.clone() };
        let keys = crate::keyring::Keys::new(inner.clone(), member.clone());
        let mut tasks =
            vec![tokio::spawn(publish(inner.clone(), member.clone(), me)), tokio::spawn(keys.clone().follow())];
        crate::keyring::export_metrics(&inner, &member);
        let federation = self.policy.clone().map(|p| {
            let fed = Federation::new(inner.clone(), member.clone(), p);
            self.cluster.server(id).unwrap().set_peer_handler(fed.clone());
            tasks.push(tokio::spawn(crate::node::run(fed.clone())));
            fed
        });
        let mut routes = crate::keyring::router(keys);
        if let Some(fed) = &federation {
            routes = routes.merge(crate::api::router(fed.clone()));
        }
        self.cluster.add_federation_routes(id, routes).expect("the server runs");
        self.servers.push(Server { id, member, federation, tasks });
    }

    /// Starts server `id` again on its data and addresses (waiting, up to
    /// 10 s, for the stopped server's sockets and database to be let go).
    pub async fn restart_server(&mut self, id: u64) {
        // The stopped server's sockets close as its tasks wind down.
        let start = Instant::now();
        loop {
            match self.cluster.start_server(id).await {
                Ok(()) => break,
                Err(e) if start.elapsed() < Duration::from_secs(10) && winding_down(&format!("{e:#}")) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the server starts again: {e:#}"),
            }
        }
        self.join(id).await;
    }

    pub async fn stop_server(&mut self, id: u64) {
        if let Some(at) = self.servers.iter().position(|s| s.id == id) {
            let s = self.servers.remove(at);
            for t in &s.tasks {
                t.abort();
            }
            for t in s.tasks {
                let _ = t.await;
            }
            self.cluster.stop_server(id).await;
            // Other holders (the federation's API, tasks being dropped)
            // may still share the member: it stops all the same.
            let _ = s.member.shutdown().await;
        }
    }

    pub async fn stop(self) {
        self.shutdown(true).await;
    }

    /// Stops every server and background task; `remove` removes the data.
    pub async fn shutdown(mut self, remove: bool) {
        for t in self.background.drain(..) {
            t.abort();
        }
        for id in self.servers.iter().map(|s| s.id).collect::<Vec<_>>() {
            self.stop_server(id).await;
        }
        self.cluster.shutdown(remove).await;
    }

    /// Runs `task` until the cluster stops.
    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.background.push(tokio::spawn(task));
    }

    pub fn view(&self) -> Arc<FederationView> {
        self.servers[0].member.view()
    }

    pub async fn leader_federation(&self) -> Arc<Federation> {
        let leader = self.cluster.leader(Duration::from_secs(10)).await.expect("a leader");
        self.servers.iter().find(|s| s.id == leader).and_then(|s| s.federation.clone()).expect("federated")
    }
}

/// An error from starting a server whose previous run still holds its
/// address or database (its last connections are closing).
fn winding_down(error: &str) -> bool {
    error.contains("in use") || error.contains("already open")
}

/// Waits until `check` holds; panics after `limit` (tests and benches).
pub async fn until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `count` nodes of `cpu` cores, in the given jurisdiction.
pub fn nodes_in(jurisdiction: &str, prefix: &str, count: usize, cpu: u32) -> Vec<cluster_core::model::Node> {
    let text = format!(
        "[fleet]\nname = \"{prefix}\"\njurisdictions = [\"{jurisdiction}\"]\n[[class]]\nname = \"{prefix}\"\ncount = {count}\ncpu = {cpu}\nmemory = \"64GiB\"\ncost_per_hour = {}\n",
        0.04 * f64::from(cpu)
    );
    parse_fleet(&SourceFile::new("f.toml", text)).value.unwrap().nodes
}

/// `count` nodes of `cpu` cores, in the EU.
pub fn nodes(prefix: &str, count: usize, cpu: u32) -> Vec<cluster_core::model::Node> {
    nodes_in("eu", prefix, count, cpu)
}

pub fn alive_with_nodes(view: &FederationView, cluster: &str, n: u32) -> bool {
    view.cluster(cluster)
        .is_some_and(|e| e.liveness == Liveness::Alive && e.summary.as_ref().is_some_and(|s| s.nodes_ready == n))
}
