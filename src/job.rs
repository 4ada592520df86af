//! `hanse job ...`: validate and plan job specs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cluster_core::diag::{DiagnosticRecord, Severity};
use cluster_core::model::Job;
use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::server::api::PlanReport;
use cluster_core::spec::{self, parse_fleet, parse_job};
use cluster_core::state::ClusterState;
use serde::Serialize;

use crate::Outcome;
use crate::output::{load, plural, print_json};

#[derive(Serialize)]
struct Validated {
    file: String,
    valid: bool,
    diagnostics: Vec<DiagnosticRecord>,
}

pub fn validate(files: &[PathBuf], json: bool) -> anyhow::Result<Outcome> {
    check_files(files, json, parse_job, describe, |_, _| Vec::new())
}

/// Checks files with `parse`, and what parses with `more` (warnings that
/// need more than the file, such as the federation's members): every
/// problem with file:line:column on stderr and a verdict a file on
/// stdout, or JSON records; exit 1 if any file does not check. `hanse job
/// validate` and `hanse policy check`.
pub fn check_files<T>(
    files: &[PathBuf],
    json: bool,
    parse: impl Fn(&cluster_core::diag::SourceFile) -> spec::Checked<T>,
    describe: impl Fn(&T) -> String,
    more: impl Fn(&cluster_core::diag::SourceFile, &T) -> Vec<cluster_core::diag::Diagnostic>,
) -> anyhow::Result<Outcome> {
    let mut results = Vec::new();
    for path in files {
        let file = spec::read_source(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut checked = parse(&file);
        if let Some(v) = &checked.value {
            let extra = more(&file, v);
            checked.diagnostics.extend(extra);
        }
        if !json {
            eprint!("{}", file.render(&checked.diagnostics));
            let count = |sev: Severity| checked.diagnostics.iter().filter(|d| d.severity == sev).count() as u64;
            match &checked.value {
                Some(v) => {
                    let warnings = count(Severity::Warning);
                    let tail = if warnings > 0 { format!(", {}", plural(warnings, "warning")) } else { String::new() };
                    println!("{}: ok: {}{tail}", file.name, describe(v));
                }
                None => println!("{}: invalid: {}", file.name, plural(count(Severity::Error), "error")),
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

pub fn plan_offline(file: &Path, fleet_path: &Path, seed: u64, verbose: bool, json: bool) -> anyhow::Result<Outcome> {
    let job = load(file, parse_job)?;
    let fleet = load(fleet_path, parse_fleet)?;
    let state = ClusterState::with_nodes(fleet.nodes).context("building the cluster state from the fleet")?;
    // On this machine, for this user alone: the whole job in one plan.
    let config = SchedulerConfig { seed, max_changes_per_plan: usize::MAX, ..SchedulerConfig::default() };
    let plan = schedule(&state, &job, &config);
    let report = PlanReport::of(&state, &job, &plan, &format!("fleet {}", fleet.name), seed);
    if json {
        print_json(&report)?;
    } else {
        crate::remote::print_plan(&report, verbose);
    }
    Ok(if plan.is_complete() { Outcome::Ok } else { Outcome::PlacementFailed })
}
