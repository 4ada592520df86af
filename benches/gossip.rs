//! `cargo bench --bench gossip`: the federation's gossip on real UDP on
//! loopback, one process, one server per cluster, at 10 and 100 clusters:
//! time until everyone sees everyone, time for a summary change to reach
//! every member (p50, p99), time until a killed member is dead everywhere,
//! idle CPU, and how often a member cut off for 1.5 s (as a paused process
//! is: nothing in, nothing out) was taken for dead by anyone. Ends with
//! `name: value` lines. Every member signs its identity and summaries and
//! checks everyone else's against one CA, as servers do
//! (`HANSE_BENCH_UNSIGNED=1`: none do, to see what that costs).
//!
//! `HANSE_BENCH_GOSSIP_INTERVAL_MS`, `HANSE_BENCH_PHI` and
//! `HANSE_BENCH_VIEW_REFRESH_MS` override the member defaults, to explore
//! the trade-offs they set; `HANSE_BENCH_SIZES=100` runs one size.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_core::resources::Resources;
use cluster_core::transport::tls;
use gossip::net::{DatagramNet, DatagramSocket, UdpNet};
use gossip::summary::{ClassCapacity, ClusterSummary};
use gossip::transport::unix_ms;
use gossip::{Key, Keyring, Liveness, Member, MemberConfig};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Process CPU time (user + system) in milliseconds, from /proc.
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    ticks * 10 // USER_HZ is 100 on Linux
}

fn summary(cluster: &str, free_cpu: u64) -> ClusterSummary {
    ClusterSummary {
        cluster: cluster.into(),
        region: "bench".into(),
        term: 1,
        generated_at_ms: unix_ms(),
        nodes_ready: 100,
        nodes_down: 0,
        jurisdictions: vec!["eu".into()],
        environments: vec![],
        execution_models: vec![],
        classes: (0..6)
            .map(|i| ClassCapacity {
                class: format!("class-{i}"),
                nodes: 16,
                total: Resources { cpu_millis: 128_000, memory_bytes: 512 << 30, ..Default::default() },
                free: Resources { cpu_millis: free_cpu, memory_bytes: 200 << 30, ..Default::default() },
                price_per_cpu_hour: 0.04,
            })
            .collect(),
        gpus: vec![],
        shapes: vec![100; 8],
        running_allocs: 1_000,
        pending_allocs: 0,
        inbound_share: 0.0,
        ..Default::default()
    }
}

/// Real UDP whose members can be paused: a paused member's datagrams, in
/// and out, are dropped, as a SIGSTOPped process neither sends nor reads.
#[derive(Clone, Default)]
struct PausableNet {
    paused: Arc<Mutex<HashSet<SocketAddr>>>,
}

struct PausableSocket {
    inner: Arc<dyn DatagramSocket>,
    paused: Arc<Mutex<HashSet<SocketAddr>>>,
}

#[async_trait::async_trait]
impl DatagramNet for PausableNet {
    async fn bind(&self, addr: SocketAddr) -> std::io::Result<Arc<dyn DatagramSocket>> {
        Ok(Arc::new(PausableSocket { inner: UdpNet.bind(addr).await?, paused: self.paused.clone() }))
    }
}

#[async_trait::async_trait]
impl DatagramSocket for PausableSocket {
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    async fn send_to(&self, bytes: &[u8], to: SocketAddr) -> std::io::Result<()> {
        let cut = {
            let p = self.paused.lock().unwrap();
            p.contains(&self.local_addr()) || p.contains(&to)
        };
        if cut { Ok(()) } else { self.inner.send_to(bytes, to).await }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.inner.recv_from(buf).await?;
            let p = self.paused.lock().unwrap();
            if !p.contains(&self.local_addr()) && !p.contains(&from) {
                return Ok((n, from));
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn wait_all(members: &[Member], limit: Duration, cond: impl Fn(&Member) -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if members.iter().all(&cond) {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(n: usize, figures: &mut BTreeMap<String, String>) {
    let pausable = PausableNet::default();
    let net: Arc<dyn DatagramNet> = Arc::new(pausable.clone());
    let ring = Keyring::new(Key::generate());
    // Signed identities and summaries, checked against the CA, as
    // servers gossip.
    let ca = tls::create_ca("bench", 1).expect("a CA");
    let trust = Arc::new(tls::Trust::new(&ca.cert_pem).expect("trust"));
    let mut members: Vec<Member> = Vec::new();
    let mut seeds: Vec<String> = Vec::new();
    let spawn = Instant::now();
    for i in 0..n {
        let mut c = MemberConfig::new("bench", &format!("cluster-{i:03}"), "server-1", "127.0.0.1:0".parse().unwrap());
        c.seeds = seeds.clone();
        if std::env::var_os("HANSE_BENCH_UNSIGNED").is_none() {
            let id = tls::Identity::new(&c.cluster, tls::Role::Server, &c.server);
            let pair = tls::issue_server(&ca, &id, 1, &[], &["eu".into()]).expect("a cert");
            c.signer = Some(Arc::new(tls::Signer::new(&pair).expect("a signer")));
            c.trust = Some(trust.clone());
        }
        if let Some(ms) = env_u64("HANSE_BENCH_GOSSIP_INTERVAL_MS") {
            c.gossip_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = env_u64("HANSE_BENCH_VIEW_REFRESH_MS") {
            c.view_refresh = Duration::from_millis(ms);
        }
        if let Some(phi) = env_u64("HANSE_BENCH_PHI") {
            c.phi_threshold = phi as f64;
        }
        let m = Member::start(c, ring.clone(), net.clone()).await.expect("start member");
        if seeds.len() < 3 {
            seeds.push(m.local_addr().to_string());
        }
        members.push(m);
    }
    let spawned = spawn.elapsed();
    let interval = members[0].config().gossip_interval;
    let phi = members[0].config().phi_threshold;
    println!("{n} members (gossip every {interval:?}, phi threshold {phi}) started in {spawned:?}");

    let converge = wait_all(&members, Duration::from_secs(60), |m| m.view().alive().count() == n).await;
    let converge_ms = converge.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    figures.insert(format!("convergence_ms_{n}"), format!("{converge_ms:.0}"));

    // Every cluster publishes its summary; wait until all are everywhere.
    for (i, m) in members.iter().enumerate() {
        m.publish_summary(summary(&format!("cluster-{i:03}"), 64_000), unix_ms()).await.unwrap();
    }
    wait_all(&members, Duration::from_secs(60), |m| m.view().clusters.values().all(|c| c.summary.is_some())).await;
    // A member publishes at most once a second.
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    // Propagation: one cluster's free cpu changes; time until each member sees it.
    let trials = n.min(30);
    let mut latencies: Vec<f64> = Vec::new();
    for t in 0..trials {
        let source = (t * 7 + 1) % n;
        let cluster = format!("cluster-{source:03}");
        let marker = 1_000 + t as u64;
        let start = Instant::now();
        members[source].publish_summary(summary(&cluster, marker), unix_ms()).await.unwrap();
        let mut seen = vec![false; n];
        seen[source] = true;
        while start.elapsed() < Duration::from_secs(10) && seen.iter().any(|s| !s) {
            for (i, m) in members.iter().enumerate() {
                if !seen[i] {
                    let v = m.view();
                    let free =
                        v.cluster(&cluster).and_then(|c| c.summary.as_ref()).map(|s| s.classes[0].free.cpu_millis);
                    if free == Some(marker) {
                        seen[i] = true;
                        latencies.push(start.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let missed = seen.iter().filter(|s| !**s).count();
        if missed > 0 {
            println!("  trial {t}: {missed} members did not see the change within 10 s");
            latencies.extend(std::iter::repeat_n(10_000.0, missed));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort_by(f64::total_cmp);
    figures.insert(format!("propagation_p50_ms_{n}"), format!("{:.0}", percentile(&latencies, 0.5)));
    figures.insert(format!("propagation_p99_ms_{n}"), format!("{:.0}", percentile(&latencies, 0.99)));

    // Idle: nothing changes for five seconds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, t0) = (cpu_ms(), Instant::now());
    let sent0: u64 = members.iter().map(|m| m.metrics().datagrams_sent.load(Ordering::Relaxed)).sum();
    let bytes0: u64 = members.iter().map(|m| m.metrics().bytes_sent.load(Ordering::Relaxed)).sum();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cores = (cpu_ms() - cpu0) as f64 / 1e3 / secs;
    let sent: u64 = members.iter().map(|m| m.metrics().datagrams_sent.load(Ordering::Relaxed)).sum::<u64>() - sent0;
    let bytes: u64 = members.iter().map(|m| m.metrics().bytes_sent.load(Ordering::Relaxed)).sum::<u64>() - bytes0;
    figures.insert(format!("idle_cpu_cores_{n}"), format!("{cores:.3}"));
    figures.insert(format!("idle_cpu_millicores_per_member_{n}"), format!("{:.2}", cores * 1e3 / n as f64));
    figures.insert(format!("idle_datagrams_per_sec_{n}"), format!("{:.0}", sent as f64 / secs));
    figures.insert(format!("idle_bytes_per_datagram_{n}"), format!("{:.0}", bytes as f64 / sent.max(1) as f64));
    let rejected: u64 = members.iter().map(|m| m.metrics().rejected()).sum();
    figures.insert(format!("rejected_datagrams_{n}"), rejected.to_string());

    // Paused for 1.5 s, ten times: anyone who took it for dead is a false
    // death (suspect is the right answer); sampled every 20 ms until 3 s
    // after the pause.
    let mut false_dead = 0;
    let mut suspect_seen = 0;
    for t in 0..10 {
        let victim = (t * 3 + 2) % n;
        let cluster = members[victim].config().cluster.clone();
        let addr = members[victim].local_addr();
        pausable.paused.lock().unwrap().insert(addr);
        let start = Instant::now();
        let (mut dead, mut suspect) = (false, false);
        while start.elapsed() < Duration::from_millis(4_500) {
            if start.elapsed() >= Duration::from_millis(1_500) {
                pausable.paused.lock().unwrap().remove(&addr);
            }
            for (i, m) in members.iter().enumerate() {
                if i != victim {
                    match m.view().cluster(&cluster).map(|c| c.liveness) {
                        Some(Liveness::Dead) => dead = true,
                        Some(Liveness::Suspect) => suspect = true,
                        _ => {}
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false_dead += usize::from(dead);
        suspect_seen += usize::from(suspect);
        wait_all(&members, Duration::from_secs(10), |m| {
            m.view().cluster(&cluster).is_some_and(|c| c.liveness == Liveness::Alive)
        })
        .await;
    }
    figures.insert(format!("false_dead_under_pause_1500ms_{n}"), false_dead.to_string());
    // The issue's figure: the worst size's count, out of 10 runs.
    let worst = figures.get("false_dead_under_pause_1500ms").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    figures.insert("false_dead_under_pause_1500ms".into(), worst.max(false_dead).to_string());
    figures.insert(format!("suspect_seen_under_pause_1500ms_{n}"), suspect_seen.to_string());

    // A killed member, three times: until it is dead everywhere.
    let mut dead: Vec<f64> = Vec::new();
    for k in 0..3 {
        let victim = members.remove(n / 2 - k);
        let cluster = victim.config().cluster.clone();
        victim.shutdown().await.unwrap();
        let took = wait_all(&members, Duration::from_secs(60), |m| {
            m.view().cluster(&cluster).is_some_and(|c| c.liveness == Liveness::Dead)
        })
        .await;
        dead.push(took.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3));
    }
    dead.sort_by(f64::total_cmp);
    figures.insert(format!("dead_detect_ms_{n}"), format!("{:.0}", dead[1]));
    figures.insert(format!("dead_detect_max_ms_{n}"), format!("{:.0}", dead[2]));
    for m in members {
        m.shutdown().await.ok();
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut figures = BTreeMap::new();
    rt.block_on(async {
        let sizes: Vec<usize> = std::env::var("HANSE_BENCH_SIZES")
            .ok()
            .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_else(|| vec![10, 100]);
        for n in sizes {
            run(n, &mut figures).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    // The V0 digest carries, per member: id (2-byte length + "cluster-NNN/server-1"),
    // generation (8), IPv4 address (7), heartbeat and two versions (24).
    let per_member = 2 + "cluster-000/server-1".len() + 8 + 7 + 24;
    figures.insert("digest_bytes_per_member".into(), per_member.to_string());
    figures.insert("digest_member_ceiling".into(), ((65_507 - 64) / per_member).to_string());
    // The summary of the 540-node example fleet (7 classes, 2 GPU models), as gossiped.
    let fleet = cluster_core::spec::load(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fleets/eu-west.toml")),
        cluster_core::spec::parse_fleet,
    )
    .expect("example fleet");
    let state = cluster_core::state::ClusterState::with_nodes(fleet.nodes).expect("state");
    let text = ClusterSummary::build("eu-west", "eu-west-1", 1, 0, &["eu".into()], &state).encode().expect("encodes");
    figures.insert("summary_bytes_example_fleet".into(), text.len().to_string());
    println!();
    for (k, v) in &figures {
        println!("{k}: {v}");
    }
}
