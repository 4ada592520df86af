//! Static feasibility: what can be decided once per computed node class
//! (drivers, jurisdiction, constraints), and the class-level ranking inputs
//! (affinity, data locality, latency, spread values) memoised alongside.

use std::collections::HashMap;

use crate::model::job::{Job, Predicate, TaskGroup};
use crate::model::node::Node;
use crate::model::plan::Reason;
use crate::state::ClusterState;

/// What is known about one computed class for one group.
#[derive(Debug)]
pub(super) struct ClassEval {
    pub verdict: Result<(), Reason>,
    /// Weighted share of matching affinities, in -1..=1.
    pub affinity: f64,
    /// Share of the group's data sets held by the class, in 0..=1.
    pub locality: f64,
    /// Value id per spread block (see [`GroupStatic::spread_values`]); `u32::MAX` if unset.
    pub spread_values: Vec<u32>,
}

/// The static view of a cluster for one group.
pub(super) struct GroupStatic<'j> {
    pub classes: Vec<ClassEval>,
    /// Constraints on per-node values (`${node.id}`), checked per node.
    pub per_node: Vec<&'j Predicate>,
    /// Per spread block: the distinct values seen, by id.
    pub spread_values: Vec<Vec<String>>,
    /// Per spread block: the percent each value that no target names is
    /// owed. When the targets add up to less than 100, the rest is shared
    /// evenly among the unnamed values of the classes the group fits
    /// (Nomad's spread stanza does the same); 0 when the targets take it
    /// all or there is no unnamed value.
    pub implicit_percent: Vec<f64>,
}

impl<'j> GroupStatic<'j> {
    pub fn new(state: &ClusterState, job: &Job, group: &'j TaskGroup) -> Self {
        let (per_node, per_class): (Vec<&Predicate>, Vec<&Predicate>) =
            group.constraints.iter().partition(|c| c.target.is_unique());
        let mut interners: Vec<HashMap<String, u32>> = group.spreads.iter().map(|_| HashMap::new()).collect();
        let mut spread_values: Vec<Vec<String>> = group.spreads.iter().map(|_| Vec::new()).collect();
        let classes = state
            .classes()
            .iter()
            .map(|class| {
                let Some(&exemplar) = class.nodes.first() else {
                    return ClassEval { verdict: Ok(()), affinity: 0.0, locality: 0.0, spread_values: Vec::new() };
                };
                let node = state.node(exemplar);
                let spread_ids = group
                    .spreads
                    .iter()
                    .enumerate()
                    .map(|(i, s)| match node.resolve(&s.target) {
                        Some(v) => {
                            let next = interners[i].len() as u32;
                            *interners[i].entry(v.to_string()).or_insert_with(|| {
                                spread_values[i].push(v.to_string());
                                next
                            })
                        }
                        None => u32::MAX,
                    })
                    .collect();
                ClassEval {
                    verdict: class_verdict(node, job, group, &per_class),
                    affinity: affinity(node, group),
                    locality: locality(node, group),
                    spread_values: spread_ids,
                }
            })
            .collect::<Vec<ClassEval>>();
        let implicit_percent = group
            .spreads
            .iter()
            .enumerate()
            .map(|(i, block)| {
                let named: u32 = block.targets.iter().map(|t| u32::from(t.percent)).sum();
                let mut unnamed: Vec<u32> = classes
                    .iter()
                    .filter(|c| c.verdict.is_ok())
                    .filter_map(|c| c.spread_values.get(i).copied())
                    .filter(|&v| {
                        spread_values[i]
                            .get(v as usize)
                            .is_some_and(|val| block.targets.iter().all(|t| &t.value != val))
                    })
                    .collect();
                unnamed.sort_unstable();
                unnamed.dedup();
                if block.targets.is_empty() || named >= 100 || unnamed.is_empty() {
                    0.0
                } else {
                    f64::from(100 - named) / unnamed.len() as f64
                }
            })
            .collect();
        GroupStatic { classes, per_node, spread_values, implicit_percent }
    }
}

fn class_verdict(node: &Node, job: &Job, group: &TaskGroup, constraints: &[&Predicate]) -> Result<(), Reason> {
    for task in &group.tasks {
        let driver = task.driver_name();
        if !node.drivers.iter().any(|d| &**d == driver) {
            return Err(Reason::Driver(driver.to_string()));
        }
    }
    if !job.jurisdictions.is_empty() && !node.jurisdictions.iter().any(|j| job.jurisdictions.contains(j)) {
        let allowed: Vec<&str> = job.jurisdictions.iter().map(|j| &**j).collect();
        return Err(Reason::Jurisdiction(allowed.join(",")));
    }
    if let Some(gpu) = group.gpu() {
        // Whether any device group could ever hold it; free counts are dynamic.
        if !node.gpus.iter().any(|d| gpu.accepts(&d.model) && d.count >= gpu.count) {
            let model = gpu.model.as_deref().unwrap_or("any");
            return Err(Reason::NoGpu(format!("{}×{model}", gpu.count)));
        }
    }
    match constraints.iter().find(|c| !c.matches(node.resolve(&c.target).as_deref())) {
        Some(c) => Err(Reason::Constraint(c.to_string())),
        None => Ok(()),
    }
}

/// Whether `node` could ever run `group` of `job`: drivers, jurisdiction,
/// GPU models and every constraint (free capacity aside).
pub(super) fn node_fits(node: &Node, job: &Job, group: &TaskGroup) -> Result<(), Reason> {
    let all: Vec<&Predicate> = group.constraints.iter().collect();
    class_verdict(node, job, group, &all)
}

/// Whether `node` passes the per-node constraints.
pub(super) fn node_verdict(node: &Node, per_node: &[&Predicate]) -> Result<(), Reason> {
    match per_node.iter().find(|c| !c.matches(node.resolve(&c.target).as_deref())) {
        Some(c) => Err(Reason::Constraint(c.to_string())),
        None => Ok(()),
    }
}

fn affinity(node: &Node, group: &TaskGroup) -> f64 {
    let total: f64 = group.affinities.iter().map(|a| f64::from(a.weight).abs()).sum();
    if total == 0.0 {
        return 0.0;
    }
    let matched: f64 = group
        .affinities
        .iter()
        .filter(|a| a.predicate.matches(node.resolve(&a.predicate.target).as_deref()))
        .map(|a| f64::from(a.weight))
        .sum();
    matched / total
}

fn locality(node: &Node, group: &TaskGroup) -> f64 {
    if group.datasets.is_empty() {
        return 0.0;
    }
    let held = group.datasets.iter().filter(|d| node.datasets.contains(d)).count();
    held as f64 / group.datasets.len() as f64
}
