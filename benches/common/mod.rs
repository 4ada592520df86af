//! What the cluster-scale benchmarks share: percentiles, the process's
//! memory, and simulated nodes. (Each bench uses a part; `dead_code` is
//! allowed per item for the rest.)

use cluster_core::model::Node;
use cluster_core::spec::{load, parse_fleet};

/// The `p` quantile (0..=1) of `v`, nearest rank; NaN for no values.
#[allow(dead_code)]
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// A `/proc/self/status` field in MiB (`VmHWM`: peak resident, `VmRSS`:
/// resident now); NaN where there is no /proc.
fn status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    kb / 1024.0
}

/// The most memory this process has held resident, in MiB.
#[allow(dead_code)]
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// The memory this process holds resident now, in MiB.
#[allow(dead_code)]
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

/// `count` nodes cycling through the classes of `examples/fleets/eu-west.toml`,
/// named `sim-00000` on.
#[allow(dead_code)]
pub fn sim_nodes(count: usize) -> Vec<Node> {
    let path = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fleets/eu-west.toml"));
    let fleet = load(&path, parse_fleet).expect("the example fleet loads");
    (0..count)
        .map(|i| {
            let mut n = fleet.nodes[i % fleet.nodes.len()].clone();
            n.id = format!("sim-{i:05}").as_str().into();
            n
        })
        .collect()
}

/// Heartbeats for `nodes` through `client` every 3 s (a TTL of 10 s) on a
/// thread of its own, until `done` is set; join the handle to wait for it.
#[allow(dead_code)]
pub fn heartbeat_until(
    client: &cluster_core::server::client::Client,
    nodes: &[Node],
    done: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    let (client, done) = (client.clone(), done.clone());
    let ids: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            for chunk in ids.chunks(5_000) {
                let _ = client.heartbeat(chunk);
            }
            for _ in 0..30 {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    })
}

/// Submits `jobs` job specs (`spec(j)` for j in 0..jobs) from `clients`
/// HTTP clients at once, each with a thread waiting on its evaluations (60
/// s at most each). Returns each job's milliseconds from submission to its
/// evaluation closing, and the instances the evaluations placed.
#[allow(dead_code)]
pub fn submit_and_wait(
    client: &cluster_core::server::client::Client,
    jobs: usize,
    clients: usize,
    spec: fn(usize) -> String,
) -> (Vec<f64>, u64) {
    use std::time::{Duration, Instant};
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let base = client.clone();
            std::thread::spawn(move || {
                let (tx, rx) = std::sync::mpsc::channel::<(u64, Instant)>();
                let waiter = {
                    let client = base.clone();
                    std::thread::spawn(move || {
                        let (mut latencies, mut placed) = (Vec::new(), 0u64);
                        for (eval, submitted) in rx {
                            let e = client.eval(eval, Duration::from_secs(60)).expect("evaluation");
                            assert_ne!(e.status, "pending", "evaluation {eval} still pending after 60 s");
                            latencies.push(submitted.elapsed().as_secs_f64() * 1e3);
                            placed += u64::from(e.placed);
                        }
                        (latencies, placed)
                    })
                };
                for j in (c..jobs).step_by(clients) {
                    let submitted = Instant::now();
                    let reg = base.submit(&spec(j), "bench.toml").expect("submitted");
                    tx.send((reg.eval, submitted)).unwrap();
                }
                drop(tx);
                waiter.join().unwrap()
            })
        })
        .collect();
    let (mut latencies, mut placed) = (Vec::new(), 0);
    for t in threads {
        let (l, p) = t.join().unwrap();
        latencies.extend(l);
        placed += p;
    }
    (latencies, placed)
}
