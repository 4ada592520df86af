//! `cargo bench --bench cluster`: the C1M-style run at a tenth of the
//! scale. A 3-server cluster in this process (QUIC with mutual TLS over
//! loopback, redb logs with fsync, HTTP APIs), 10,000 simulated nodes
//! registered and heartbeating through the API, and jobs totalling 100,000
//! allocations submitted by 8 HTTP clients as fast as the API takes them.
//! Timed until every evaluation has closed; then every allocation is
//! counted in the state. The nodes are simulated: they heartbeat but run
//! nothing. Ends with `name: value` lines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster_core::server::ServerOptions;
use cluster_core::server::local::LocalCluster;

mod common;
use common::{heartbeat_until, peak_rss_mb, percentile, sim_nodes, submit_and_wait};

const NODES: usize = 10_000;
const JOBS: usize = 1_000;
const INSTANCES_PER_JOB: usize = 100;
const CLIENTS: usize = 8;

fn spec(name: &str) -> String {
    format!(
        r#"
[job]
name = "{name}"
type = "service"
objective = "cost"

[[group]]
name = "app"
count = {INSTANCES_PER_JOB}

[[group.task]]
name = "main"
driver = "mock"
resources = {{ cpu = "100m", memory = "64MiB" }}
"#
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = std::env::temp_dir().join(format!("hanse-cluster-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let nodes = sim_nodes(NODES);
    // HANSE_BENCH_WORKERS: scheduler workers on the leader (default: the
    // server's, half the cores).
    let workers = std::env::var("HANSE_BENCH_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(cluster_core::server::default_workers);
    let options = ServerOptions { workers, ..ServerOptions::new("bench", "s") };
    let cluster = rt
        .block_on(LocalCluster::start("bench", &dir, 3, options, Duration::from_millis(100)))
        .expect("the cluster starts");
    let leader = rt.block_on(cluster.leader(Duration::from_secs(10))).expect("a leader");
    let client = cluster.client();
    let mut figures: BTreeMap<&str, String> = BTreeMap::new();

    let t = Instant::now();
    for chunk in nodes.chunks(500) {
        client.register_nodes(chunk).expect("nodes register");
    }
    let register_s = t.elapsed().as_secs_f64();
    println!("registered {NODES} nodes in {register_s:.2} s");
    // Heartbeats for all nodes, every 3 s (the TTL is 10 s), until the end.
    let done = Arc::new(AtomicBool::new(false));
    let beats = heartbeat_until(&client, &nodes, &done);

    let start = Instant::now();
    let (latencies, placed) = submit_and_wait(&client, JOBS, CLIENTS, |j| spec(&format!("job-{j:04}")));
    let total = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    beats.join().unwrap();

    let server = cluster.server(leader).unwrap();
    let committed = server.raft().read(|s| s.allocs().filter(|a| a.is_live()).count());
    let status = server.raft().status();
    let m = &server.inner.metrics;
    println!(
        "{committed} allocations committed in {total:.2} s; {} plans applied, {} rejected, {} placements refused; raft applied index {}",
        m.plans_applied.get(),
        m.plans_rejected.get(),
        m.placements_refused.get(),
        status.applied
    );
    assert_eq!(committed, JOBS * INSTANCES_PER_JOB, "every allocation committed");
    assert_eq!(placed as usize, committed, "the evaluations placed them");
    figures.insert("nodes", NODES.to_string());
    figures.insert("workers", workers.to_string());
    figures.insert("plans_rejected", m.plans_rejected.get().to_string());
    figures.insert("placements_refused", m.placements_refused.get().to_string());
    figures.insert("allocations", committed.to_string());
    figures.insert("register_nodes_s", format!("{register_s:.2}"));
    figures.insert("total_time_s", format!("{total:.2}"));
    figures.insert("allocs_per_sec", format!("{:.0}", committed as f64 / total));
    figures.insert("eval_latency_p50_ms", format!("{:.1}", percentile(&latencies, 0.5)));
    figures.insert("eval_latency_p99_ms", format!("{:.1}", percentile(&latencies, 0.99)));
    figures.insert("raft_entries", status.applied.to_string());
    figures.insert("peak_rss_mb", format!("{:.0}", peak_rss_mb()));
    rt.block_on(cluster.stop());
    let _ = std::fs::remove_dir_all(&dir);
    for (k, v) in figures {
        println!("{k}: {v}");
    }
}
