//! Ranking: how well a feasible node suits an instance, as a weighted mean
//! of terms in -1..=1. The job's objective picks the weights.

use crate::model::job::Objective;
use crate::model::node::Node;
use crate::resources::Resources;

/// The weight of each ranking term. A weight of 0 turns a term off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Pack onto busy nodes (true) or spread onto idle ones (false).
    pub binpack: bool,
    /// How full (binpack) or empty (spread) the node is after placement.
    pub fit: f64,
    /// Cheap cores per hour.
    pub cost: f64,
    /// Low network latency class.
    pub latency: f64,
    /// Power budget left after placement.
    pub power: f64,
    /// The job's soft affinities.
    pub affinity: f64,
    /// The group's data sets present on the node.
    pub locality: f64,
    /// Avoid nodes already running instances of the same group.
    pub anti_affinity: f64,
}

impl Weights {
    /// The defaults: batch and cost pack onto cheap nodes; latency spreads
    /// over near nodes holding the data; throughput spreads for headroom.
    pub fn for_objective(objective: Objective) -> Weights {
        let base = Weights {
            binpack: true,
            fit: 1.0,
            cost: 0.0,
            latency: 0.0,
            power: 0.0,
            affinity: 1.0,
            locality: 1.0,
            anti_affinity: 0.5,
        };
        match objective {
            Objective::Cost => Weights { cost: 2.0, anti_affinity: 0.0, ..base },
            Objective::Latency => Weights {
                binpack: false,
                fit: 0.5,
                cost: 0.25,
                latency: 2.0,
                locality: 1.5,
                anti_affinity: 1.0,
                ..base
            },
            Objective::Throughput => Weights { binpack: false, power: 1.0, cost: 0.25, ..base },
            Objective::Balanced => Weights { cost: 0.5, latency: 0.5, power: 0.5, ..base },
        }
    }
}

/// Nomad-style bin-packing fitness: 1 when cpu and memory are both full
/// after placement, 0 when both are empty.
pub fn binpack_fit(after: Resources, capacity: Resources) -> f64 {
    let free = |used: u64, cap: u64| if cap == 0 { 0.0 } else { 1.0 - (used as f64 / cap as f64).min(1.0) };
    let total = 10f64.powf(free(after.cpu_millis, capacity.cpu_millis))
        + 10f64.powf(free(after.memory_bytes, capacity.memory_bytes));
    (20.0 - total) / 18.0
}

/// The per-node inputs of a score that do not depend on the instance.
pub struct NodeTerms {
    pub affinity: f64,
    pub locality: f64,
    /// Boosts from spread blocks, each with its weight.
    pub spread: f64,
    pub spread_weight: f64,
    /// Instances of this group already on the node.
    pub collisions: u32,
}

/// The normalising ranges of the cluster, and which terms apply to a group.
pub struct Ranker {
    pub weights: Weights,
    pub cost_range: (f64, f64),
    pub latency_range: (u8, u8),
    pub has_affinities: bool,
    pub has_datasets: bool,
    /// The group's desired count, to scale the anti-affinity penalty.
    pub desired: u32,
}

impl Ranker {
    pub fn score(&self, node: &Node, after: Resources, t: &NodeTerms) -> f64 {
        let w = &self.weights;
        let mut total = 0.0;
        let mut weight = 0.0;
        let mut add = |wt: f64, value: f64| {
            if wt > 0.0 {
                total += wt * value;
                weight += wt;
            }
        };
        let fit = binpack_fit(after, node.capacity);
        add(w.fit, if w.binpack { fit } else { 1.0 - fit });
        let (lo, hi) = self.cost_range;
        if hi > lo {
            add(w.cost, 1.0 - (node.cost_per_cpu_hour() - lo) / (hi - lo));
        }
        let (llo, lhi) = self.latency_range;
        if lhi > llo {
            add(w.latency, 1.0 - f64::from(node.latency_class - llo) / f64::from(lhi - llo));
        }
        if node.capacity.power_watts > 0 {
            add(w.power, 1.0 - (after.power_watts as f64 / node.capacity.power_watts as f64).min(1.0));
        } else {
            add(w.power, 1.0);
        }
        if self.has_affinities {
            add(w.affinity, t.affinity);
        }
        if self.has_datasets {
            add(w.locality, t.locality);
        }
        if t.spread_weight > 0.0 {
            add(t.spread_weight, t.spread / t.spread_weight);
        }
        if self.desired > 1 {
            let penalty =
                if t.collisions == 0 { 0.0 } else { -(f64::from(t.collisions) + 1.0) / f64::from(self.desired) };
            add(w.anti_affinity, penalty.max(-1.0));
        }
        if weight == 0.0 { 0.0 } else { total / weight }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binpack_fit_rises_with_utilisation() {
        let cap = Resources { cpu_millis: 1000, memory_bytes: 1000, ..Default::default() };
        let empty = binpack_fit(Resources::default(), cap);
        let half = binpack_fit(Resources { cpu_millis: 500, memory_bytes: 500, ..Default::default() }, cap);
        let full = binpack_fit(cap, cap);
        assert!(empty.abs() < 1e-9 && (full - 1.0).abs() < 1e-9, "{empty} {full}");
        assert!(empty < half && half < full);
    }

    #[test]
    fn objectives_choose_the_strategy() {
        assert!(Weights::for_objective(Objective::Cost).binpack);
        assert!(!Weights::for_objective(Objective::Latency).binpack);
        assert!(Weights::for_objective(Objective::Cost).cost > Weights::for_objective(Objective::Latency).cost);
    }
}
