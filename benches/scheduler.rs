//! `cargo bench --bench scheduler`: placement throughput, evaluation latency
//! and packing quality. Ends with `name: value` lines, one a line.
//!
//! Fleets are the heterogeneous example fleet (examples/fleets/eu-west.toml)
//! repeated to 1,000 and 10,000 nodes, pre-loaded to about 40% of their cpu
//! by earlier jobs, so that candidates are a mix of busy and idle nodes.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use cluster_core::diag::SourceFile;
use cluster_core::ids::NodeId;
use cluster_core::model::{Job, Node};
use cluster_core::resources::Resources;
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{load, parse_fleet, parse_job};
use cluster_core::state::ClusterState;

fn fleet(n: usize) -> Vec<Node> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fleets/eu-west.toml");
    let template = load(&path, parse_fleet).expect("example fleet").nodes;
    (0..n)
        .map(|i| {
            let mut node = template[i % template.len()].clone();
            node.id = NodeId::new(format!("{}-{i}", node.class));
            node
        })
        .collect()
}

fn job(text: &str) -> Job {
    parse_job(&SourceFile::new("bench.toml", text)).value.expect("bench job spec")
}

fn service_job(name: &str, count: usize) -> Job {
    job(&format!(
        r#"[job]
name = "{name}"
type = "service"
objective = "latency"
[[group]]
name = "web"
count = {count}
[[group.constraint]]
attribute = "${{node.environment}}"
operator = "!="
value = "edge"
[[group.affinity]]
attribute = "${{attr.cpu.vendor}}"
value = "amd"
weight = 30
[[group.spread]]
attribute = "${{node.zone}}"
weight = 50
[[group.task]]
name = "server"
driver = "mock"
resources = {{ cpu = "250m", memory = "512MiB" }}
"#
    ))
}

fn batch_job(name: &str, count: usize, cpu: &str, memory: &str) -> Job {
    job(&format!(
        r#"[job]
name = "{name}"
type = "batch"
objective = "cost"
[[group]]
name = "work"
count = {count}
[[group.constraint]]
attribute = "${{attr.arch}}"
value = "x86_64"
[[group.task]]
name = "step"
driver = "mock"
resources = {{ cpu = "{cpu}", memory = "{memory}" }}
"#
    ))
}

/// Fills the cluster with batch work until about `share` of its cpu is used.
fn preload(state: &mut ClusterState, share: f64) {
    let total: u64 = state.nodes().iter().map(|n| n.capacity.cpu_millis).sum();
    let shapes = [("1", "2GiB"), ("2", "8GiB"), ("4", "8GiB"), ("500m", "1GiB")];
    let mut i = 0;
    loop {
        let used: u64 =
            (0..state.nodes().len()).map(|n| state.usage(cluster_core::ids::NodeIdx(n as u32)).res.cpu_millis).sum();
        if used as f64 >= share * total as f64 {
            break;
        }
        let (cpu, mem) = shapes[i % shapes.len()];
        let j = batch_job(&format!("preload-{i}"), 200, cpu, mem);
        state.upsert_job(j.clone());
        let plan = schedule(state, &j, &SchedulerConfig { seed: i as u64, ..Default::default() });
        if plan.placements.is_empty() {
            break;
        }
        state.apply_plan(&plan);
        i += 1;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Measured {
    p50: Duration,
    p99: Duration,
    placements: usize,
    evaluated: u64,
}

fn measure(state: &ClusterState, job: &Job, runs: usize) -> Measured {
    let mut times = Vec::with_capacity(runs);
    let mut placements = 0;
    let mut evaluated = 0;
    for seed in 0..runs as u64 {
        let config = SchedulerConfig { seed, ..Default::default() };
        let start = Instant::now();
        let plan = black_box(schedule(black_box(state), black_box(job), &config));
        times.push(start.elapsed());
        assert!(plan.is_complete(), "bench job {} did not fit: {:?}", job.id, plan.unplaced);
        placements = plan.placements.len();
        evaluated = plan.nodes_evaluated;
    }
    times.sort();
    Measured { p50: percentile(&times, 0.5), p99: percentile(&times, 0.99), placements, evaluated }
}

/// Nodes a best-fit-decreasing packing of `items` needs on identical nodes
/// of `capacity`: the offline bound the online scheduler is held to.
fn best_fit_decreasing(items: &[Resources], capacity: Resources) -> usize {
    let size = |r: &Resources| {
        (r.cpu_millis as f64 / capacity.cpu_millis as f64).max(r.memory_bytes as f64 / capacity.memory_bytes as f64)
    };
    let mut sorted = items.to_vec();
    sorted.sort_by(|a, b| size(b).total_cmp(&size(a)));
    best_fit(&sorted, capacity)
}

/// Exact best fit over every open node, items taken in the order given.
fn best_fit(items: &[Resources], capacity: Resources) -> usize {
    let mut bins: Vec<Resources> = Vec::new();
    for &item in items {
        let best = bins
            .iter()
            .enumerate()
            .filter(|(_, used)| used.exceeds(item, capacity).is_none())
            .min_by(|(_, a), (_, b)| {
                let left = |u: &Resources| {
                    let after = u.saturating_add(item);
                    (capacity.cpu_millis - after.cpu_millis) as f64 / capacity.cpu_millis as f64
                        + (capacity.memory_bytes - after.memory_bytes) as f64 / capacity.memory_bytes as f64
                };
                left(a).total_cmp(&left(b))
            })
            .map(|(i, _)| i);
        match best {
            Some(i) => bins[i] = bins[i].saturating_add(item),
            None => bins.push(item),
        }
    }
    bins.len()
}

/// Online bin-packing of a stream of batch jobs of mixed shapes, in arrival
/// order, against the offline best-fit-decreasing bound.
fn packing_ratio() -> (usize, usize, usize, usize) {
    let text = "[fleet]\nname = \"pack\"\n[[class]]\nname = \"m\"\ncount = 2000\ncpu = 16\nmemory = \"64GiB\"\nzones = [\"a\", \"b\", \"c\"]\n";
    let nodes = parse_fleet(&SourceFile::new("pack.toml", text)).value.unwrap().nodes;
    let capacity = nodes[0].capacity;
    let mut state = ClusterState::with_nodes(nodes).unwrap();
    let shapes =
        [("1", "2GiB"), ("2", "8GiB"), ("4", "4GiB"), ("3", "12GiB"), ("8", "16GiB"), ("6", "30GiB"), ("500m", "6GiB")];
    let mut rng = cluster_core::scheduler::Rng::new(42);
    let mut items = Vec::new();
    for i in 0..60 {
        let (cpu, mem) = shapes[rng.below(shapes.len())];
        let count = 10 + rng.below(50);
        let j = batch_job(&format!("pack-{i}"), count, cpu, mem);
        let plan = schedule(&state, &j, &SchedulerConfig { seed: i, ..Default::default() });
        assert!(plan.is_complete());
        items.extend(plan.placements.iter().map(|p| p.resources));
        state.apply_plan(&plan);
    }
    let used =
        (0..state.nodes().len()).filter(|&n| !state.usage(cluster_core::ids::NodeIdx(n as u32)).is_empty()).count();
    (used, best_fit_decreasing(&items, capacity), best_fit(&items, capacity), items.len())
}

fn main() {
    let mut figures: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |name: String, value: String| {
        println!("  {name} = {value}");
        figures.insert(name, value);
    };
    for nodes in [1_000usize, 10_000] {
        let mut state = ClusterState::with_nodes(fleet(nodes)).unwrap();
        preload(&mut state, 0.4);
        println!("fleet of {nodes} nodes, {} computed classes, preloaded to ~40% cpu", state.classes().len());
        let label = if nodes == 1_000 { "1k" } else { "10k" };
        for instances in [1usize, 100, 1_000] {
            let runs = match instances {
                1 => 3_000,
                100 => 400,
                _ => 60,
            };
            let mut slowest = f64::INFINITY;
            for (kind, job) in
                [("service", service_job("svc", instances)), ("batch", batch_job("batch", instances, "500m", "1GiB"))]
            {
                let m = measure(&state, &job, runs);
                let per_sec = m.placements as f64 / m.p50.as_secs_f64();
                slowest = slowest.min(per_sec);
                let key = format!("{label}_nodes_{instances}_instance{}", if instances == 1 { "" } else { "s" });
                put(format!("placements_per_sec_{key}_{kind}"), format!("{per_sec:.0}"));
                put(format!("eval_latency_p50_us_{key}_{kind}"), format!("{:.1}", m.p50.as_secs_f64() * 1e6));
                put(format!("eval_latency_p99_us_{key}_{kind}"), format!("{:.1}", m.p99.as_secs_f64() * 1e6));
                put(
                    format!("candidates_per_placement_{key}_{kind}"),
                    format!("{:.1}", m.evaluated as f64 / m.placements.max(1) as f64),
                );
            }
            let key = format!("{label}_nodes_{instances}_instance{}", if instances == 1 { "" } else { "s" });
            // The headline is the slower of the two jobs.
            put(format!("placements_per_sec_{key}"), format!("{slowest:.0}"));
        }
        if nodes == 10_000 {
            let svc = measure(&state, &service_job("svc", 1), 3_000);
            let batch = measure(&state, &batch_job("batch", 1, "500m", "1GiB"), 3_000);
            let p99 = svc.p99.max(batch.p99);
            put("eval_latency_p99_us_10k_nodes_1_instance".into(), format!("{:.1}", p99.as_secs_f64() * 1e6));
        }
    }
    let (used, bfd, online, items) = packing_ratio();
    println!("packing {items} instances of 7 shapes from 60 batch jobs on 16-cpu/64GiB nodes");
    put("binpack_nodes_used".into(), used.to_string());
    put("binpack_nodes_bfd_bound".into(), bfd.to_string());
    // Exact best fit in arrival order: what perfect candidate search would
    // reach without the offline sort.
    put("binpack_nodes_online_best_fit".into(), online.to_string());
    put("binpack_nodes_ratio_vs_bfd".into(), format!("{:.3}", used as f64 / bfd as f64));

    println!();
    for (name, value) in &figures {
        println!("{name}: {value}");
    }
}
