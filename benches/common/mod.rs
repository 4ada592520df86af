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
