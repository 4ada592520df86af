//! `hanse policy check`: a federation policy file's problems, each with
//! file:line:column and a hint; warnings for rules that can never matter.

use std::path::PathBuf;

use federation::policy::{Policy, parse_policy};

use crate::Outcome;
use crate::output::plural;

pub fn check(files: &[PathBuf], json: bool) -> anyhow::Result<Outcome> {
    crate::job::check_files(files, json, parse_policy, |p: &Policy| {
        format!(
            "cluster {}, {}, {}",
            p.cluster,
            plural(p.peers.len() as u64, "peer"),
            plural(p.rules.len() as u64, "rule")
        )
    })
}
