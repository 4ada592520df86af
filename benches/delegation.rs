//! `cargo bench --bench delegation`: three clusters in this process (one
//! server each: real QUIC with mutual TLS, redb with fsync, UDP gossip,
//! simulated nodes), `eu-west` small, `eu-central` and `us-east` large.
//! A burst of jobs totalling 10,000 instances overflows `eu-west`:
//! - offer-to-running latency per delegation: from the origin's record
//!   (holding the instances) to its record saying the target registered
//!   exactly which indexes, through both Raft logs (sampled every 5 ms; the
//!   nodes are simulated: registered and placed is as far as they go),
//! - the time from the burst's start until every job is fully placed,
//! - delegated instances per second over the burst,
//! - the time from `us-east`'s death to its work running again elsewhere
//!   (the policy's lease is 5 s and its grace 2 s), and the most copies
//!   of one instance beyond the first, sampled every 10 ms across the
//!   origin and the surviving target through that phase.
//!
//! Ends with `name: value` lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_core::transport::tls;
use federation::local::{Gossiping, Setup, alive_with_nodes, nodes, start};
use federation::proto::origin::{End, Phase};
use gossip::Key;

mod common;
use common::percentile;

const JOBS: usize = 100;
const INSTANCES: u32 = 100;

fn policy(name: &str, peers: &[&str]) -> String {
    let mut text = format!("[cluster]\nname = \"{name}\"\njurisdictions = [\"eu\"]\n");
    for p in peers {
        text.push_str(&format!("\n[[peer]]\ncluster = \"{p}\"\ndelegate_to = true\naccept_from = true\n"));
    }
    text.push_str("\n[overflow]\nmax_remote_share = 1.0\n\n[inbound]\nmax_share_of_capacity = 1.0\n\n[retry]\nlease = \"5s\"\ngrace = \"2s\"\nbackoff = \"200ms\"\n");
    text
}

fn spec(name: &str) -> String {
    format!(
        "[job]\nname = \"{name}\"\n[[group]]\nname = \"g\"\ncount = {INSTANCES}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"100m\", memory = \"128MiB\" }}\n"
    )
}

/// Instances of each job registered remotely, by job, from the origin's records.
fn remote_running(origin: &federation::node::Federation) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for r in origin.outbound() {
        if r.phase == Phase::Registered {
            *out.entry(r.job.clone()).or_default() += r.indices.len() as u32;
        }
    }
    out
}

/// Live copies of each (job, index) beyond the first, at most: across
/// the origin's own allocations and those `targets` run for it.
fn duplicates(origin: &Gossiping, targets: &[&Gossiping]) -> usize {
    let mut copies: BTreeMap<(String, u32), usize> = BTreeMap::new();
    let read = |g: &Gossiping| g.cluster.server(g.cluster.running().next()?).map(|s| s.raft().read(|s| s.clone()));
    if let Some(s) = read(origin) {
        for j in s.jobs() {
            for a in s.allocs_of_job(&j.id).filter(|a| a.is_live()) {
                *copies.entry((j.id.to_string(), a.index)).or_default() += 1;
            }
        }
    }
    for t in targets {
        let Some(s) = read(t) else { continue };
        for (r, _) in federation::proto::target::Target::records(&s) {
            for a in s.allocs_of_job(&cluster_core::ids::JobId::new(&r.job)).filter(|a| a.is_live()) {
                if let Some(&i) = r.indices.get(a.index as usize) {
                    *copies.entry((r.origin_job.clone(), i)).or_default() += 1;
                }
            }
        }
    }
    copies.values().map(|n| n.saturating_sub(1)).max().unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let key = Key::generate();
        let ca = tls::create_ca("bench", 1).unwrap();
        let setup =
            |name: &'static str, seeds: Vec<String>, policy: String| Setup::single(name, &key, &ca, seeds, policy);
        let origin = start(setup("eu-west", Vec::new(), policy("eu-west", &["eu-central", "us-east"]))).await;
        let seed = vec![origin.servers[0].member.local_addr().to_string()];
        let central = start(setup("eu-central", seed.clone(), policy("eu-central", &["eu-west"]))).await;
        let us = start(setup("us-east", seed, policy("us-east", &["eu-west"]))).await;
        let register = |g: &Gossiping, prefix: &'static str, count: usize, cpu: u32| {
            let c = g.cluster.client();
            std::thread::spawn(move || {
                for chunk in nodes(prefix, count, cpu).chunks(500) {
                    c.register_nodes(chunk).unwrap();
                }
            })
        };
        for t in [register(&origin, "small", 4, 8), register(&central, "big", 200, 16), register(&us, "big", 200, 16)] {
            t.join().unwrap();
        }
        let view = origin.servers[0].member.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(alive_with_nodes(&view.view(), "eu-central", 200) && alive_with_nodes(&view.view(), "us-east", 200)) {
            assert!(Instant::now() < deadline, "the peers' summaries did not arrive");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let fed = origin.leader_federation().await;

        // The burst: 100 jobs of 100 instances, submitted by 4 clients.
        let started = Instant::now();
        let base = origin.cluster.client();
        let submitted: Vec<(String, Instant)> = tokio::task::spawn_blocking(move || {
            let threads: Vec<_> = (0..4)
                .map(|c| {
                    let client = base.clone();
                    std::thread::spawn(move || {
                        (c..JOBS)
                            .step_by(4)
                            .map(|j| {
                                let name = format!("burst-{j:03}");
                                client.submit(&spec(&name), "burst.toml").unwrap();
                                (name, Instant::now())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
        })
        .await
        .unwrap();
        let submitted: BTreeMap<String, Instant> = submitted.into_iter().collect();
        let local =
            |job: &str| {
                origin.cluster.server(1).unwrap().raft().read(|s| {
                    s.allocs_of_job(&cluster_core::ids::JobId::new(job)).filter(|a| a.is_live()).count() as u32
                })
            };
        let mut done: BTreeMap<String, f64> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        // Offer to registered, per delegation id: first seen, registered.
        let mut seen: BTreeMap<String, (Instant, Option<Instant>)> = BTreeMap::new();
        let mut last_poll = Instant::now();
        while done.len() < JOBS {
            for r in fed.outbound() {
                let e = seen.entry(r.id.clone()).or_insert((Instant::now(), None));
                if e.1.is_none() && r.phase != Phase::Offered {
                    e.1 = Some(Instant::now());
                }
            }
            if last_poll.elapsed() < Duration::from_millis(20) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            last_poll = Instant::now();
            let remote = remote_running(&fed);
            for (job, at) in &submitted {
                if done.contains_key(job) {
                    continue;
                }
                let r = remote.get(job).copied().unwrap_or(0);
                if r + local(job) == INSTANCES {
                    done.insert(job.clone(), at.elapsed().as_secs_f64() * 1e3);
                }
            }
            assert!(Instant::now() < deadline, "only {} of {JOBS} jobs fully running after 120 s", done.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let burst_s = started.elapsed().as_secs_f64();
        let delegated: u32 = remote_running(&fed).values().sum();
        let latencies: Vec<f64> =
            seen.values().filter_map(|(a, b)| Some(b.as_ref()?.duration_since(*a).as_secs_f64() * 1e3)).collect();
        let job_latencies: Vec<f64> = done.values().copied().collect();
        println!(
            "{delegated} of {} instances delegated; every job fully running after {burst_s:.2} s",
            JOBS as u32 * INSTANCES
        );

        // The peer with the most work dies: it must run again elsewhere.
        let mut per_peer: BTreeMap<String, u32> = BTreeMap::new();
        for r in fed.outbound().iter().filter(|r| r.phase == Phase::Registered) {
            *per_peer.entry(r.target.clone()).or_default() += r.indices.len() as u32;
        }
        let (dead, on_us) = per_peer.iter().max_by_key(|(_, n)| **n).map(|(c, n)| (c.clone(), *n)).unwrap();
        let killed = Instant::now();
        let survivor = if dead == "us-east" {
            us.stop().await;
            central
        } else {
            central.stop().await;
            us
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut duplicate_max = 0;
        let mut last_check = Instant::now();
        loop {
            duplicate_max = duplicate_max.max(duplicates(&origin, &[&survivor]));
            if last_check.elapsed() < Duration::from_millis(100) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            last_check = Instant::now();
            let remote = remote_running(&fed);
            let us_left = fed
                .outbound()
                .iter()
                .any(|r| r.target == dead && r.phase.holds() && r.phase != Phase::Ended(End::Complete));
            let whole = submitted.keys().all(|j| remote.get(j).copied().unwrap_or(0) + local(j) == INSTANCES);
            if !us_left && whole {
                break;
            }
            if Instant::now() > deadline {
                let mut states: BTreeMap<(String, String), u32> = BTreeMap::new();
                for r in fed.outbound() {
                    *states.entry((r.target.clone(), format!("{:?}", r.phase))).or_default() += 1;
                }
                let short: Vec<_> =
                    submitted.keys().filter(|j| remote.get(*j).copied().unwrap_or(0) + local(j) != INSTANCES).collect();
                panic!(
                    "{dead}'s work not running again after 120 s: {states:?}; {} jobs short, e.g. {:?}",
                    short.len(),
                    short.first()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let replaced_ms = killed.elapsed().as_secs_f64() * 1e3;
        println!("{on_us} instances ran on {dead}; running again elsewhere {replaced_ms:.0} ms after it died");
        origin.stop().await;
        survivor.stop().await;

        let mut figures: BTreeMap<&str, String> = BTreeMap::new();
        figures.insert("instances", (JOBS as u32 * INSTANCES).to_string());
        figures.insert("delegated_instances", delegated.to_string());
        figures.insert("offer_to_running_p50_ms", format!("{:.1}", percentile(&latencies, 0.5)));
        figures.insert("offer_to_running_p99_ms", format!("{:.1}", percentile(&latencies, 0.99)));
        figures.insert("delegated_per_sec", format!("{:.0}", f64::from(delegated) / burst_s));
        figures.insert("burst_s", format!("{burst_s:.2}"));
        figures.insert("job_fully_placed_p50_ms", format!("{:.1}", percentile(&job_latencies, 0.5)));
        figures.insert("job_fully_placed_p99_ms", format!("{:.1}", percentile(&job_latencies, 0.99)));
        figures.insert("instances_on_dead_target", on_us.to_string());
        figures.insert("replace_after_target_death_ms", format!("{replaced_ms:.0}"));
        figures.insert("grace_ms", "2000".into());
        figures.insert("lease_ms", "5000".into());
        figures.insert("duplicate_instances_max", duplicate_max.to_string());
        for (k, v) in figures {
            println!("{k}: {v}");
        }
    });
}
