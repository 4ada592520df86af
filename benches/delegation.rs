//! `cargo bench --bench delegation`: three clusters in this process (one
//! server each: real QUIC with mutual TLS, redb with fsync, UDP gossip,
//! simulated nodes), `eu-west` small, `eu-central` and `us-east` large.
//! A burst of jobs totalling 10,000 instances overflows `eu-west`:
//! - offer-to-running latency per delegation: from the origin holding the
//!   instances to the target's answer that it placed them, through its own
//!   Raft log (the nodes are simulated: placed is as far as they go),
//! - the time from the burst's start until every job is fully placed,
//! - delegated instances per second over the burst,
//! - the time from `us-east`'s death to its work running again elsewhere
//!   (the policy's grace is 2 s).
//!
//! Ends with `name: value` lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_core::server::client::Client;
use cluster_core::transport::tls;
use federation::delegation::State;
use federation::local::{Gossiping, Setup, alive_with_nodes, nodes, start};
use gossip::Key;

const JOBS: usize = 100;
const INSTANCES: u32 = 100;

fn policy(name: &str, peers: &[&str]) -> String {
    let mut text = format!("[cluster]\nname = \"{name}\"\njurisdictions = [\"eu\"]\n");
    for p in peers {
        text.push_str(&format!("\n[[peer]]\ncluster = \"{p}\"\ndelegate_to = true\naccept_from = true\n"));
    }
    text.push_str("\n[overflow]\nmax_remote_share = 1.0\n\n[inbound]\nmax_share_of_capacity = 1.0\n\n[retry]\nlease = \"30s\"\ngrace = \"2s\"\nbackoff = \"200ms\"\n");
    text
}

fn spec(name: &str) -> String {
    format!(
        "[job]\nname = \"{name}\"\n[[group]]\nname = \"g\"\ncount = {INSTANCES}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = \"100m\", memory = \"128MiB\" }}\n"
    )
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// Instances of each job running remotely, by job, from the origin's records.
fn remote_running(origin: &federation::node::Federation) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for r in origin.records() {
        if matches!(r.delegation.state, State::Running | State::Accepted) {
            *out.entry(r.delegation.job.clone()).or_default() += r.delegation.running;
        }
    }
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let key = Key::generate();
        let ca = tls::create_ca("bench", 1).unwrap();
        let setup = |name: &'static str, seeds: Vec<String>, policy: String| Setup {
            name,
            servers: 1,
            key: &key,
            ca: Some(&ca),
            seeds,
            jurisdictions: &["eu"],
            policy: Some(policy),
            http: Vec::new(),
            data_dir: None,
            region: None,
        };
        let origin = start(setup("eu-west", Vec::new(), policy("eu-west", &["eu-central", "us-east"]))).await;
        let seed = vec![origin.servers[0].member.local_addr().to_string()];
        let central = start(setup("eu-central", seed.clone(), policy("eu-central", &["eu-west"]))).await;
        let us = start(setup("us-east", seed, policy("us-east", &["eu-west"]))).await;
        let register = |g: &Gossiping, prefix: &'static str, count: usize, cpu: u32| {
            let c = Client::new(&g.cluster.addresses());
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
        let addresses = origin.cluster.addresses();
        let submitted: Vec<(String, Instant)> = tokio::task::spawn_blocking(move || {
            let threads: Vec<_> = (0..4)
                .map(|c| {
                    let client = Client::new(&addresses);
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
        while done.len() < JOBS {
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
        let latencies: Vec<f64> = fed
            .records()
            .iter()
            .filter_map(|r| Some(r.delegation.accepted_ms? as f64 - r.delegation.created_ms as f64))
            .collect();
        let job_latencies: Vec<f64> = done.values().copied().collect();
        println!(
            "{delegated} of {} instances delegated; every job fully running after {burst_s:.2} s",
            JOBS as u32 * INSTANCES
        );

        // The peer with the most work dies: it must run again elsewhere.
        let mut per_peer: BTreeMap<String, u32> = BTreeMap::new();
        for r in fed.records().iter().filter(|r| r.delegation.state == State::Running) {
            *per_peer.entry(r.delegation.target.clone()).or_default() += r.delegation.running;
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
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let remote = remote_running(&fed);
            let us_left = fed.records().iter().any(|r| {
                r.delegation.target == dead
                    && matches!(r.delegation.state, State::Offered | State::Accepted | State::Running)
            });
            let whole = submitted.keys().all(|j| remote.get(j).copied().unwrap_or(0) + local(j) == INSTANCES);
            if !us_left && whole {
                break;
            }
            if Instant::now() > deadline {
                let mut states: BTreeMap<(String, String), u32> = BTreeMap::new();
                for r in fed.records() {
                    *states.entry((r.delegation.target.clone(), format!("{:?}", r.delegation.state))).or_default() += 1;
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
        for (k, v) in figures {
            println!("{k}: {v}");
        }
    });
}
