//! `hanse policy check`: a federation policy file's problems, each with
//! file:line:column and a hint; warnings for rules that can never matter.

use std::path::PathBuf;

use federation::api::MemberRow;
use federation::policy::{Policy, member_warnings, parse_policy};

use crate::Outcome;
use crate::output::plural;

/// `hanse policy check FILE... [--members ADDR]`: with `members` (a
/// client of a server of the federation), also warns about peers the
/// federation does not have, at their line, with the likely spelling.
pub fn check(
    files: &[PathBuf],
    json: bool,
    members: Option<&cluster_core::server::client::Client>,
) -> anyhow::Result<Outcome> {
    let known: Option<Vec<String>> = match members {
        Some(c) => {
            let rows: Vec<MemberRow> = c.get("/v1/federation/members").map_err(|e| match e.status() {
                Some(404) => anyhow::anyhow!("the server at {} takes no part in a federation", c.address()),
                _ => anyhow::anyhow!("cannot ask {} for the federation's members: {e}", c.address()),
            })?;
            Some(rows.into_iter().map(|r| r.cluster).collect())
        }
        None => None,
    };
    let describe = |p: &Policy| {
        format!(
            "cluster {}, {}, {}",
            p.cluster,
            plural(p.peers.len() as u64, "peer"),
            plural(p.rules.len() as u64, "rule")
        )
    };
    crate::job::check_files(files, json, parse_policy, describe, |file, p: &Policy| match &known {
        Some(names) => {
            // The cluster itself is a member, whatever gossip says of it.
            let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
            names.push(&p.cluster);
            member_warnings(file, p, &names)
        }
        None => Vec::new(),
    })
}
