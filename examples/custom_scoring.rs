//! A custom scoring weight: plan the same job against the example fleet
//! with the default weights, then with cost weighted far above the rest,
//! and compare where the instances land and what they cost per hour.
//!
//! `cargo run --example custom_scoring`

use std::collections::BTreeMap;

use cluster_core::diag::SourceFile;
use cluster_core::model::Objective;
use cluster_core::scheduler::{SchedulerConfig, objective_slot, schedule};
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::ClusterState;

const FLEET: &str = include_str!("fleets/eu-west.toml");
const JOB: &str = include_str!("jobs/web.toml");

fn main() {
    let fleet = parse_fleet(&SourceFile::new("fleets/eu-west.toml", FLEET)).value.expect("a valid fleet");
    let job = parse_job(&SourceFile::new("jobs/web.toml", JOB)).value.expect("a valid job");
    let state = ClusterState::with_nodes(fleet.nodes).expect("distinct node ids");

    let default = SchedulerConfig::default();
    let mut cheap = SchedulerConfig::default();
    // `web` asks for the latency objective: make cost dominate it.
    let w = &mut cheap.weights[objective_slot(Objective::Latency)];
    w.cost = 10.0;
    w.latency = 0.1;

    for (name, config) in [("default weights", &default), ("cost weighted 10x", &cheap)] {
        let plan = schedule(&state, &job, config);
        let mut by_class: BTreeMap<String, u32> = BTreeMap::new();
        let mut cost = 0.0;
        for p in &plan.placements {
            let idx = state.node_idx(&p.node).expect("a placed node exists");
            let node = state.node(idx);
            *by_class.entry(node.class.to_string()).or_default() += 1;
            cost += node.cost_per_cpu_hour() * p.resources.cpu_millis as f64 / 1000.0;
        }
        println!("{name}: {} placed, {cost:.3} per hour", plan.placements.len());
        for (class, n) in by_class {
            println!("  {n:>3} on {class}");
        }
    }
}
