//! Scheduler cases as data: each directory under `tests/cases/` holds a
//! `fleet.toml`, a `job.toml` and an `expect.toml` saying what the plan must
//! be. Add a case by adding a directory.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use cluster_core::scheduler::{SchedulerConfig, schedule};
use cluster_core::spec::{load, parse_fleet, parse_job};
use cluster_core::state::ClusterState;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    seed: u64,
    placed: usize,
    #[serde(default)]
    unplaced: u64,
    /// Distinct nodes used by the placements.
    nodes_used: Option<usize>,
    /// Exact instances per node class; unlisted classes get none.
    by_class: Option<BTreeMap<String, usize>>,
    /// Exact instances per zone.
    by_zone: Option<BTreeMap<String, usize>>,
    /// Each must appear in the explanation of some unplaced group.
    #[serde(default)]
    reasons: Vec<String>,
}

fn run_case(dir: &Path) -> Result<(), String> {
    let fleet = load(&dir.join("fleet.toml"), parse_fleet).map_err(|e| e.to_string())?;
    let job = load(&dir.join("job.toml"), parse_job).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(dir.join("expect.toml")).map_err(|e| e.to_string())?;
    let expect: Expect = toml::from_str(&text).map_err(|e| format!("expect.toml: {e}"))?;
    let state = ClusterState::with_nodes(fleet.nodes).map_err(|e| e.to_string())?;
    let plan = schedule(&state, &job, &SchedulerConfig { seed: expect.seed, ..Default::default() });

    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    check(
        plan.placements.len() == expect.placed,
        format!("placed {}, expected {}", plan.placements.len(), expect.placed),
    );
    check(
        plan.unplaced_count() == expect.unplaced,
        format!("unplaced {}, expected {}", plan.unplaced_count(), expect.unplaced),
    );
    let nodes: HashSet<_> = plan.placements.iter().map(|p| p.node_idx).collect();
    if let Some(n) = expect.nodes_used {
        check(nodes.len() == n, format!("used {} nodes, expected {n}", nodes.len()));
    }
    let tally = |key: &dyn Fn(usize) -> String| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for p in &plan.placements {
            *m.entry(key(p.node_idx.get())).or_default() += 1;
        }
        m
    };
    if let Some(by_class) = &expect.by_class {
        let got = tally(&|i| state.nodes()[i].class.to_string());
        check(&got == by_class, format!("by class {got:?}, expected {by_class:?}"));
    }
    if let Some(by_zone) = &expect.by_zone {
        let got = tally(&|i| state.nodes()[i].zone.to_string());
        check(&got == by_zone, format!("by zone {got:?}, expected {by_zone:?}"));
    }
    let explained: Vec<String> = plan.unplaced.iter().map(|u| u.explain()).collect();
    for r in &expect.reasons {
        check(explained.iter().any(|e| e.contains(r.as_str())), format!("reason {r:?} not in {explained:?}"));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n    ")) }
}

#[test]
fn scheduler_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut dirs: Vec<_> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    assert!(dirs.len() >= 10, "expected the case directories under {}", root.display());
    let failures: Vec<String> = dirs
        .iter()
        .filter_map(|d| run_case(d).err().map(|e| format!("{}:\n    {e}", d.file_name().unwrap().to_string_lossy())))
        .collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), dirs.len(), failures.join("\n"));
}
