//! `hanse job ...`: validate and plan job specs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cluster_core::diag::{DiagnosticRecord, Severity};
use cluster_core::model::{Job, Plan};
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{self, LoadError, parse_fleet, parse_job};
use cluster_core::state::ClusterState;
use serde::Serialize;

use crate::Outcome;
use crate::output::{plural, print_json, table};

#[derive(Serialize)]
struct Validated {
    file: String,
    valid: bool,
    diagnostics: Vec<DiagnosticRecord>,
}

pub fn validate(files: &[PathBuf], json: bool) -> anyhow::Result<Outcome> {
    let mut results = Vec::new();
    for path in files {
        let file = spec::read_source(path).with_context(|| format!("cannot read {}", path.display()))?;
        let checked = parse_job(&file);
        if !json {
            eprint!("{}", file.render(&checked.diagnostics));
            match &checked.value {
                Some(job) => println!("{}: ok: {}", file.name, describe(job)),
                None => {
                    let errors = checked.diagnostics.iter().filter(|d| d.severity == Severity::Error).count();
                    println!("{}: invalid: {}", file.name, plural(errors as u64, "error"));
                }
            }
        }
        results.push(Validated {
            file: file.name.clone(),
            valid: checked.value.is_some(),
            diagnostics: file.records(&checked.diagnostics),
        });
    }
    if json {
        print_json(&results)?;
    }
    Ok(if results.iter().all(|r| r.valid) { Outcome::Ok } else { Outcome::Invalid })
}

fn describe(job: &Job) -> String {
    format!(
        "job {} ({}, objective {}), {}, {}",
        job.id,
        job.job_type,
        job.objective,
        plural(job.groups.len() as u64, "group"),
        plural(job.instance_count(), "instance")
    )
}

/// Loads a spec, turning an invalid one into an error that shows every
/// diagnostic.
fn load<T>(path: &Path, parse: impl Fn(&cluster_core::diag::SourceFile) -> spec::Checked<T>) -> anyhow::Result<T> {
    spec::load(path, parse).map_err(|e| match e {
        LoadError::Invalid(inv) => anyhow::anyhow!("{inv}"),
        io => anyhow::anyhow!("{io}"),
    })
}

#[derive(Serialize)]
struct PlanReport<'a> {
    job: &'a str,
    job_type: String,
    objective: String,
    fleet: &'a str,
    nodes: usize,
    seed: u64,
    placed: usize,
    unplaced: u64,
    by_class: BTreeMap<String, ClassCount>,
    placements: Vec<PlacementRow>,
    unplaced_groups: Vec<UnplacedRow>,
}

#[derive(Serialize, Default)]
struct ClassCount {
    instances: u64,
    nodes: u64,
}

#[derive(Serialize)]
struct PlacementRow {
    group: String,
    index: u32,
    node: String,
    class: String,
    score: f64,
}

#[derive(Serialize)]
struct UnplacedRow {
    group: String,
    count: u32,
    explanation: String,
    reasons: Vec<ReasonRow>,
}

#[derive(Serialize)]
struct ReasonRow {
    reason: String,
    nodes: u32,
}

pub fn plan_offline(file: &Path, fleet_path: &Path, seed: u64, verbose: bool, json: bool) -> anyhow::Result<Outcome> {
    let job = load(file, parse_job)?;
    let fleet = load(fleet_path, parse_fleet)?;
    let nodes = fleet.nodes.len();
    let state = ClusterState::with_nodes(fleet.nodes).context("building the cluster state from the fleet")?;
    let config = SchedulerConfig { seed, ..SchedulerConfig::default() };
    let plan = schedule(&state, &job, &config);
    let report = report(&state, &job, &plan, &fleet.name, nodes, seed);
    if json {
        print_json(&report)?;
    } else {
        print_plan(&report, verbose);
    }
    Ok(if plan.is_complete() { Outcome::Ok } else { Outcome::PlacementFailed })
}

fn report<'a>(
    state: &ClusterState,
    job: &'a Job,
    plan: &Plan,
    fleet: &'a str,
    nodes: usize,
    seed: u64,
) -> PlanReport<'a> {
    let mut by_class: BTreeMap<String, ClassCount> = BTreeMap::new();
    let mut seen_nodes = std::collections::HashSet::new();
    let placements = plan
        .placements
        .iter()
        .map(|p| {
            let class = state.node(p.node_idx).class.to_string();
            let entry = by_class.entry(class.clone()).or_default();
            entry.instances += 1;
            if seen_nodes.insert(p.node_idx) {
                entry.nodes += 1;
            }
            PlacementRow { group: p.group.to_string(), index: p.index, node: p.node.to_string(), class, score: p.score }
        })
        .collect();
    PlanReport {
        job: job.id.as_str(),
        job_type: job.job_type.to_string(),
        objective: job.objective.to_string(),
        fleet,
        nodes,
        seed,
        placed: plan.placements.len(),
        unplaced: plan.unplaced_count(),
        by_class,
        placements,
        unplaced_groups: plan
            .unplaced
            .iter()
            .map(|u| UnplacedRow {
                group: u.group.to_string(),
                count: u.count,
                explanation: u.explain(),
                reasons: u.reasons.iter().map(|(r, n)| ReasonRow { reason: r.to_string(), nodes: *n }).collect(),
            })
            .collect(),
    }
}

fn print_plan(r: &PlanReport, verbose: bool) {
    println!(
        "{} ({}, objective {}): {} on fleet {} ({})",
        r.job,
        r.job_type,
        r.objective,
        plural(r.placed as u64 + r.unplaced, "instance"),
        r.fleet,
        plural(r.nodes as u64, "node")
    );
    println!("  placed {}, unplaced {}", r.placed, r.unplaced);
    if !r.by_class.is_empty() {
        let mut t = table(&["node class", "instances", "nodes"]);
        for (class, c) in &r.by_class {
            t.add_row(vec![class.clone(), c.instances.to_string(), c.nodes.to_string()]);
        }
        println!("\n{t}");
    }
    if verbose && !r.placements.is_empty() {
        let mut t = table(&["instance", "node", "class", "score"]);
        for p in &r.placements {
            t.add_row(vec![
                format!("{}.{}[{}]", r.job, p.group, p.index),
                p.node.clone(),
                p.class.clone(),
                format!("{:.3}", p.score),
            ]);
        }
        println!("\n{t}");
    }
    for u in &r.unplaced_groups {
        println!("\nunplaced: {} of group {}", plural(u.count.into(), "instance"), u.group);
        for reason in &u.reasons {
            println!("  {:>6} nodes  {}", reason.nodes, reason.reason);
        }
    }
}
