//! Whole federations of gossip members, over the in-memory network (with
//! links to cut and datagrams to tap and inject) and over real UDP on
//! loopback. Every wait is bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cluster_core::resources::Resources;
use gossip::net::{DatagramNet, MemNet, UdpNet};
use gossip::summary::{ClassCapacity, ClusterSummary};
use gossip::transport::unix_ms;
use gossip::{Key, Keyring, Liveness, Member, MemberConfig};

const FEDERATION: &str = "test-federation";

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)), 7946)
}

fn summary(cluster: &str, term: u64, free_cpu: u64) -> ClusterSummary {
    ClusterSummary {
        cluster: cluster.into(),
        region: "r".into(),
        term,
        generated_at_ms: unix_ms(),
        nodes_ready: 10,
        nodes_down: 0,
        jurisdictions: vec!["eu".into()],
        environments: vec![],
        execution_models: vec![],
        classes: vec![ClassCapacity {
            class: "m".into(),
            nodes: 10,
            total: Resources { cpu_millis: 80_000, memory_bytes: 320 << 30, ..Default::default() },
            free: Resources { cpu_millis: free_cpu, memory_bytes: 100 << 30, ..Default::default() },
            price_per_cpu_hour: 0.05,
        }],
        gpus: vec![],
        shapes: vec![0; 8],
        running_allocs: 0,
        pending_allocs: 0,
        inbound_share: 0.0,
        ..Default::default()
    }
}

fn config(i: usize, cluster: &str, server: &str, listen: SocketAddr, seeds: &[SocketAddr]) -> MemberConfig {
    let mut c = MemberConfig::new(FEDERATION, cluster, server, listen);
    c.seeds = seeds.iter().filter(|s| **s != listen).map(|s| s.to_string()).collect();
    c.region = format!("region-{}", i % 3);
    c.generation = 1;
    c
}

async fn start(net: &Arc<dyn DatagramNet>, ring: &Keyring, n: usize) -> Vec<Member> {
    let seeds: Vec<SocketAddr> = (0..n.min(3)).map(addr).collect();
    let mut members = Vec::new();
    for i in 0..n {
        let c = config(i, &format!("c{i:02}"), "s1", addr(i), &seeds);
        members.push(Member::start(c, ring.clone(), net.clone()).await.expect("start member"));
    }
    members
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// How far a federation got: the fewest and most alive clusters with a
/// summary seen by a member, and what the worst member saw and sent.
fn progress(members: &[Member]) -> String {
    let seen: Vec<usize> = members.iter().map(|m| m.view().alive().filter(|c| c.summary.is_some()).count()).collect();
    let (worst, fewest) = seen.iter().copied().enumerate().min_by_key(|(_, n)| *n).unwrap_or((0, 0));
    let m = &members[worst];
    let v = m.view();
    let x = m.metrics();
    format!(
        "fewest {fewest} (member {worst}: {} clusters, {} alive, {} with summaries; sent {}, received {}, rejected {}, \
         oversize {}, unexpected {}), most {}",
        v.clusters.len(),
        v.alive().count(),
        v.clusters.values().filter(|c| c.summary.is_some()).count(),
        x.datagrams_sent.load(Ordering::Relaxed),
        x.datagrams_received.load(Ordering::Relaxed),
        x.rejected(),
        x.oversize_dropped.load(Ordering::Relaxed),
        x.unexpected_plaintext.load(Ordering::Relaxed),
        seen.iter().max().unwrap_or(&0)
    ) + &format!(
        "; now {} first entry {:?}",
        unix_ms(),
        v.clusters.values().next().map(|c| (
            c.liveness,
            c.servers.values().map(|s| (s.live, s.heartbeat, s.heartbeat_seen_ms)).collect::<Vec<_>>()
        ))
    )
}

fn sees_all(m: &Member, n: usize, free_cpu: Option<u64>) -> bool {
    let v = m.view();
    v.alive().count() == n
        && v.clusters.values().all(|c| {
            c.summary.as_ref().is_some_and(|s| free_cpu.is_none_or(|f| c.cluster != "c07" || s.free().cpu_millis == f))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clusters_converge_and_a_change_reaches_all() {
    let net: Arc<dyn DatagramNet> = Arc::new(MemNet::new());
    let ring = Keyring::new(Key::generate());
    let members = start(&net, &ring, 50).await;
    for (i, m) in members.iter().enumerate() {
        assert!(m.publish_summary(summary(&format!("c{i:02}"), 1, 40_000), unix_ms()).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !members.iter().all(|m| sees_all(m, 50, None)) {
        assert!(Instant::now() < deadline, "not converged in 60 s: {}", progress(&members));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = Instant::now() + Duration::from_secs(60) - deadline;
    eprintln!("50 clusters converged in {took:?}");
    // A change beyond the threshold, one second later (the publish rate limit).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(members[7].publish_summary(summary("c07", 1, 8_000), unix_ms()).await.unwrap());
    let took = wait_until(Duration::from_secs(30), "c07's new free cpu reaches every member", || {
        members.iter().all(|m| sees_all(m, 50, Some(8_000)))
    })
    .await;
    eprintln!("the change reached all 50 in {took:?}");
    for m in members {
        m.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cluster_is_marked_dead_and_a_revived_one_alive_again() {
    let net: Arc<dyn DatagramNet> = Arc::new(MemNet::new());
    let ring = Keyring::new(Key::generate());
    let mut members = start(&net, &ring, 5).await;
    wait_until(Duration::from_secs(30), "5 alive everywhere", || members.iter().all(|m| m.view().alive().count() == 5))
        .await;
    let victim = members.remove(2);
    victim.shutdown().await.unwrap();
    let dead_in = wait_until(Duration::from_secs(30), "c02 dead everywhere", || {
        members.iter().all(|m| m.view().cluster("c02").is_some_and(|c| c.liveness == Liveness::Dead))
    })
    .await;
    eprintln!("c02 dead everywhere after {dead_in:?}");
    // Restarted: the same server with a new generation.
    let mut c = config(2, "c02", "s1", addr(2), &[addr(0)]);
    c.generation = 2;
    members.push(Member::start(c, ring.clone(), net.clone()).await.unwrap());
    wait_until(Duration::from_secs(30), "c02 alive again everywhere", || {
        members.iter().all(|m| m.view().cluster("c02").is_some_and(|c| c.liveness == Liveness::Alive))
    })
    .await;
    let v = members[0].view();
    let c02 = v.cluster("c02").unwrap();
    assert_eq!(c02.servers["s1"].generation, 2, "the newest generation stands for the server");
    for m in members {
        m.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_bit_flipped_and_replayed_datagrams_change_nothing() {
    let mem = MemNet::new();
    let net: Arc<dyn DatagramNet> = Arc::new(mem.clone());
    let ring = Keyring::new(Key::generate());
    let mut tap = mem.tap();
    let members = start(&net, &ring, 3).await;
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.local_addr()).collect();
    members[1].publish_summary(summary("c01", 1, 30_000), unix_ms()).await.unwrap();
    wait_until(Duration::from_secs(30), "3 clusters with c01's summary", || {
        members.iter().all(|m| m.view().alive().count() == 3 && m.view().cluster("c01").unwrap().summary.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    members[1].publish_summary(summary("c01", 2, 5_000), unix_ms()).await.unwrap();
    wait_until(Duration::from_secs(30), "term 2 everywhere", || {
        members.iter().all(|m| m.view().cluster("c01").unwrap().summary.as_ref().unwrap().term == 2)
    })
    .await;
    // The most recent datagrams: inside every receiver's replay window.
    while tap.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut recent = Vec::new();
    while let Ok(d) = tap.try_recv() {
        recent.push(d);
    }
    recent.truncate(30);
    let k = recent.len() as u64;
    assert!(k >= 5, "captured only {k} datagrams");
    let count = |f: fn(&gossip::transport::GossipMetrics) -> &std::sync::atomic::AtomicU64| -> u64 {
        members.iter().map(|m| f(&m.metrics()).load(Ordering::Relaxed)).sum()
    };
    let before = [
        count(|m| &m.rejected_replay),
        count(|m| &m.rejected_misdirected),
        count(|m| &m.rejected_bad_tag),
        count(|m| &m.rejected_unknown_key),
        count(|m| &m.rejected_malformed),
    ];

    let other_ring = Keyring::new(Key::generate());
    let mut attacker = gossip::seal::Sealer::random();
    for d in &recent {
        // Replayed as captured, to its own receiver.
        mem.inject(d.from, d.to, d.bytes.clone());
        // The same datagram to another member.
        let elsewhere = *addrs.iter().find(|a| **a != d.to).unwrap();
        mem.inject(d.from, elsewhere, d.bytes.clone());
        // A bit flipped in the ciphertext.
        let mut flipped = d.bytes.clone();
        flipped[gossip::seal::HEADER_LEN + 1] ^= 0x40;
        mem.inject(d.from, d.to, flipped);
        // Sealed, correctly addressed, under a key the federation does not hold.
        mem.inject(d.from, d.to, attacker.seal(&other_ring, &d.bytes, unix_ms(), d.from, d.to));
        // Noise.
        mem.inject(d.from, d.to, vec![1u8; 80]);
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let after = [
        count(|m| &m.rejected_replay),
        count(|m| &m.rejected_misdirected),
        count(|m| &m.rejected_bad_tag),
        count(|m| &m.rejected_unknown_key),
        count(|m| &m.rejected_malformed),
    ];
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(
        delta,
        vec![k; 5],
        "replay, misdirected, bad tag, unknown key, malformed: each exactly once per capture"
    );
    for m in &members {
        let v = m.view();
        assert_eq!(v.alive().count(), 3);
        assert_eq!(v.cluster("c01").unwrap().summary.as_ref().unwrap().term, 2);
    }
    for m in members {
        m.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_under_traffic_marks_no_one_dead() {
    let net: Arc<dyn DatagramNet> = Arc::new(MemNet::new());
    let old = Key::generate();
    let new = Key::generate();
    let members = start(&net, &Keyring::new(old.clone()), 6).await;
    wait_until(Duration::from_secs(30), "6 alive everywhere", || members.iter().all(|m| m.view().alive().count() == 6))
        .await;
    let all_alive =
        |members: &[Member]| members.iter().all(|m| m.view().clusters.values().all(|c| c.liveness == Liveness::Alive));
    // Each step reaches every member, one at a time, before the next step.
    for step in 0..3 {
        for m in &members {
            {
                let ring = m.keyring();
                let mut ring = ring.write().unwrap();
                match step {
                    0 => ring.install(new.clone()).unwrap(),
                    1 => ring.use_key(new.id()).unwrap(),
                    _ => ring.remove(old.id()).unwrap(),
                }
            }
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(all_alive(&members), "someone looked dead during rotation step {step}");
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(all_alive(&members));
    for m in &members {
        assert_eq!(m.keyring().read().unwrap().ids(), vec![new.id()]);
        assert_eq!(m.metrics().rejected_unknown_key.load(Ordering::Relaxed), 0, "a datagram went unopened");
    }
    for m in members {
        m.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leaders_older_term_summary_never_wins() {
    let net: Arc<dyn DatagramNet> = Arc::new(MemNet::new());
    let ring = Keyring::new(Key::generate());
    let seeds = [addr(0)];
    let watcher = Member::start(config(0, "watcher", "s1", addr(0), &seeds), ring.clone(), net.clone()).await.unwrap();
    let s1 = Member::start(config(1, "eu", "s1", addr(1), &seeds), ring.clone(), net.clone()).await.unwrap();
    let s2 = Member::start(config(2, "eu", "s2", addr(2), &seeds), ring.clone(), net.clone()).await.unwrap();
    s1.publish_summary(summary("eu", 5, 10_000), unix_ms()).await.unwrap();
    wait_until(Duration::from_secs(30), "term 5 seen", || {
        watcher.view().cluster("eu").and_then(|c| c.summary.as_ref().map(|s| s.term)) == Some(5)
    })
    .await;
    // s2 still believes it leads term 4 and publishes later, with more free cpu.
    s2.publish_summary(summary("eu", 4, 70_000), unix_ms() + 5_000).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = watcher.view();
    let eu = v.cluster("eu").unwrap();
    assert_eq!(eu.summary.as_ref().unwrap().term, 5);
    assert_eq!(eu.leader.as_deref(), Some("s1"));
    // s2's gossip does arrive: once it leads a newer term, its summary wins.
    let mut newer = summary("eu", 6, 20_000);
    newer.generated_at_ms = unix_ms() + 10_000;
    s2.publish_summary(newer, unix_ms() + 10_000).await.unwrap();
    wait_until(Duration::from_secs(30), "term 6 from s2 seen", || {
        watcher.view().cluster("eu").and_then(|c| c.summary.as_ref().map(|s| s.term)) == Some(6)
    })
    .await;
    assert_eq!(watcher.view().cluster("eu").unwrap().leader.as_deref(), Some("s2"));
    for m in [watcher, s1, s2] {
        m.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_converge_over_real_udp_on_loopback() {
    let net: Arc<dyn DatagramNet> = Arc::new(UdpNet);
    let ring = Keyring::new(Key::generate());
    // Bind to port 0, then seed everyone from the first member's real port.
    let first = Member::start(config(0, "u0", "s1", "127.0.0.1:0".parse().unwrap(), &[]), ring.clone(), net.clone())
        .await
        .unwrap();
    let seed = first.local_addr();
    assert_ne!(seed.port(), 0);
    let mut members = vec![first];
    for i in 1..4 {
        let c = config(i, &format!("u{i}"), "s1", "127.0.0.1:0".parse().unwrap(), &[seed]);
        members.push(Member::start(c, ring.clone(), net.clone()).await.unwrap());
    }
    members[3].publish_summary(summary("u3", 1, 1_000), unix_ms()).await.unwrap();
    wait_until(Duration::from_secs(30), "4 alive, u3's summary everywhere", || {
        members.iter().all(|m| m.view().alive().count() == 4 && m.view().cluster("u3").unwrap().summary.is_some())
    })
    .await;
    assert!(members.iter().all(|m| m.metrics().datagrams_sent.load(Ordering::Relaxed) > 0));
    assert!(members.iter().all(|m| m.metrics().rejected() == 0));
    for m in members {
        m.shutdown().await.unwrap();
    }
}
