//! `hanse policy check`: a federation policy file's problems, each with
//! file:line:column and a hint; warnings for rules that can never matter.

use std::path::PathBuf;

use anyhow::Context;
use cluster_core::diag::{DiagnosticRecord, Severity};
use cluster_core::spec;
use federation::policy::parse_policy;
use serde::Serialize;

use crate::Outcome;
use crate::output::{plural, print_json};

#[derive(Serialize)]
struct Checked {
    file: String,
    valid: bool,
    peers: usize,
    rules: usize,
    diagnostics: Vec<DiagnosticRecord>,
}

pub fn check(files: &[PathBuf], json: bool) -> anyhow::Result<Outcome> {
    let mut results = Vec::new();
    for path in files {
        let file = spec::read_source(path).with_context(|| format!("cannot read {}", path.display()))?;
        let checked = parse_policy(&file);
        let warnings = checked.diagnostics.iter().filter(|d| d.severity == Severity::Warning).count() as u64;
        if !json {
            eprint!("{}", file.render(&checked.diagnostics));
            match &checked.value {
                Some(p) => println!(
                    "{}: ok: cluster {}, {}, {}{}",
                    file.name,
                    p.cluster,
                    plural(p.peers.len() as u64, "peer"),
                    plural(p.rules.len() as u64, "rule"),
                    if warnings > 0 { format!(", {}", plural(warnings, "warning")) } else { String::new() }
                ),
                None => {
                    let errors = checked.diagnostics.iter().filter(|d| d.severity == Severity::Error).count();
                    println!("{}: invalid: {}", file.name, plural(errors as u64, "error"));
                }
            }
        }
        results.push(Checked {
            file: file.name.clone(),
            valid: checked.value.is_some(),
            peers: checked.value.as_ref().map_or(0, |p| p.peers.len()),
            rules: checked.value.as_ref().map_or(0, |p| p.rules.len()),
            diagnostics: file.records(&checked.diagnostics),
        });
    }
    if json {
        print_json(&results)?;
    }
    Ok(if results.iter().all(|r| r.valid) { Outcome::Ok } else { Outcome::Invalid })
}
