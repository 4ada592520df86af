//! Which peers get a job's overflow (pure): from the instances the local
//! scheduler could not place, the peers' gossip summaries and the policy,
//! offers ranked by fit and cost, and for every peer passed over, why.
//!
//! Summaries can be stale, so an offer is a guess the target re-checks;
//! the shape histogram keeps the guess honest about fragmentation (a
//! peer with 40% free in slivers is not offered a 20-cpu instance).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cluster_core::model::{DelegateMode, Job};
use gossip::summary::ClusterSummary;
use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// What the origin knows of one peer cluster.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub cluster: String,
    /// How alive gossip says it is: only an `Alive` peer gets new work.
    pub liveness: gossip::Liveness,
    pub summary: Option<ClusterSummary>,
    /// The origin's circuit breaker for this peer is open.
    pub breaker_open: bool,
    /// Measured round-trip time to its servers, when known.
    pub rtt_ms: Option<f64>,
}

/// Instances of one group the local scheduler could not place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub group: String,
    pub count: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OfferPlan {
    pub peer: String,
    pub group: String,
    pub count: u32,
}

/// Why a peer gets none of the work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Refusal {
    /// The policy does not delegate to it.
    NotAllowed,
    /// A rule (or the job) limits where the work may run, and the peer is
    /// in none of those places.
    Jurisdiction {
        allowed: Vec<String>,
        peer: Vec<String>,
    },
    Dead,
    /// Live by the detector, but silent: paused or overloaded. No new
    /// work until it is heard again (nothing is revoked for it either).
    Suspect,
    /// Its servers stopped cleanly.
    Left,
    NoSummary,
    CircuitOpen,
    TooExpensive {
        price: f64,
        ceiling: f64,
    },
    /// Its nodes cannot fit one instance (by the shape histogram and GPUs).
    NoFit {
        group: String,
    },
    /// The job's remote share was used up by better peers.
    ShareLimit {
        share: f64,
    },
    /// Better peers took all the overflow.
    NotNeeded,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotAllowed => write!(f, "the policy does not delegate to it"),
            Refusal::Jurisdiction { allowed, peer } => {
                write!(f, "the work may run in [{}]; the cluster is in [{}]", allowed.join(", "), peer.join(", "))
            }
            Refusal::Dead => write!(f, "dead by gossip"),
            Refusal::Suspect => write!(f, "suspect by gossip (not heard for a while): no new work until it is"),
            Refusal::Left => write!(f, "it left the federation (its servers stopped cleanly)"),
            Refusal::NoSummary => write!(f, "no capacity summary yet"),
            Refusal::CircuitOpen => write!(f, "circuit open after repeated failures"),
            Refusal::TooExpensive { price, ceiling } => {
                write!(f, "{price:.3}/cpu-hour is above the ceiling of {ceiling:.3}")
            }
            Refusal::NoFit { group } => write!(f, "no node fits an instance of group {group}"),
            Refusal::ShareLimit { share } => write!(f, "the job may run at most {:.0}% remotely", share * 100.0),
            Refusal::NotNeeded => write!(f, "better peers took the overflow"),
        }
    }
}

/// The selection for one job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub offers: Vec<OfferPlan>,
    /// Every peer given nothing, with why.
    pub refused: Vec<(String, Refusal)>,
    /// Instances left unplaced: past the job's remote share, or no peer fits.
    pub left: u32,
    /// The jurisdictions the delegated work is limited to (travels with
    /// each offer), if any.
    pub allowed_jurisdictions: Option<Vec<String>>,
}

impl Selection {
    pub fn delegated(&self) -> u32 {
        self.offers.iter().map(|o| o.count).sum()
    }
}

/// The cheapest cpu-hour price among a summary's classes with free cpu.
pub fn price(summary: &ClusterSummary) -> f64 {
    summary.classes.iter().filter(|c| c.free.cpu_millis > 0).map(|c| c.price_per_cpu_hour).fold(f64::INFINITY, f64::min)
}

/// Chooses peers for `overflow`. `total` is the job's instance count and
/// `remote` how many already run remotely: together with the policy's
/// (and the job's) remote share they bound what may be offered.
pub fn select(
    policy: &Policy,
    job: &Job,
    overflow: &[Overflow],
    total: u32,
    remote: u32,
    peers: &[PeerInfo],
) -> Selection {
    let wanted: u32 = overflow.iter().map(|o| o.count).sum();
    let allowed = policy.allowed_jurisdictions(job);
    let mut out = Selection {
        allowed_jurisdictions: allowed.as_ref().map(|a| a.iter().cloned().collect()),
        ..Default::default()
    };
    let budget = if job.federation.delegate == DelegateMode::Never {
        0
    } else {
        ((f64::from(total) * policy.remote_share(job)).floor() as u32).saturating_sub(remote)
    };
    let ceiling = policy.cost_ceiling(job);

    // Peers that may take work, best first: more room for the largest
    // ask, then cheaper, then by name (a deterministic order).
    let mut candidates: Vec<(&PeerInfo, &ClusterSummary, f64)> = Vec::new();
    for p in peers.iter().filter(|p| p.cluster != policy.cluster) {
        let refuse = |r: Refusal| Some((p.cluster.clone(), r));
        let refusal = if !policy.may_delegate_to(&p.cluster) {
            refuse(Refusal::NotAllowed)
        } else if p.liveness != gossip::Liveness::Alive {
            refuse(match p.liveness {
                gossip::Liveness::Suspect => Refusal::Suspect,
                gossip::Liveness::Left => Refusal::Left,
                _ => Refusal::Dead,
            })
        } else if p.breaker_open {
            refuse(Refusal::CircuitOpen)
        } else if let Some(s) = &p.summary {
            let in_place = allowed.as_ref().is_none_or(|a| s.jurisdictions.iter().any(|j| a.contains(j)));
            let cost = price(s);
            if !in_place {
                refuse(Refusal::Jurisdiction {
                    allowed: allowed.iter().flatten().cloned().collect(),
                    peer: s.jurisdictions.clone(),
                })
            } else if let Some(c) = ceiling.filter(|c| cost > *c) {
                refuse(Refusal::TooExpensive { price: cost, ceiling: c })
            } else {
                candidates.push((p, s, cost));
                None
            }
        } else {
            refuse(Refusal::NoSummary)
        };
        out.refused.extend(refusal);
    }

    let mut room: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
    for (p, s, _) in &candidates {
        let per_group = overflow
            .iter()
            .filter_map(|o| job.group(&o.group).map(|g| (o.group.as_str(), g)))
            .map(|(name, g)| {
                let r = g.resources();
                let mut fit = s.placeable(r.cpu_millis, r.memory_bytes);
                if let Some(gpu) = g.gpu() {
                    let free = match &gpu.model {
                        Some(m) => s.free_gpus_of(m),
                        None => s.free_gpus(),
                    };
                    fit = fit.min(free / gpu.count.max(1));
                }
                (name, fit)
            })
            .collect();
        room.insert(p.cluster.as_str(), per_group);
    }
    // Best first: room for more of the overflow (peers that can take all
    // of it tie), then a score of price, inbound load and latency (lower
    // is better), then by name (a deterministic order).
    let score = |(p, s, price): &(&PeerInfo, &ClusterSummary, f64)| {
        let rtt = p.rtt_ms.unwrap_or(50.0).min(1_000.0);
        // A cent per cpu-hour weighs as much as 10% more inbound load or
        // 20 ms of round trip.
        price * 100.0 + s.inbound_share * 10.0 + rtt / 20.0
    };
    candidates.sort_by(|a, b| {
        let takes = |c: &str| room[c].values().copied().max().unwrap_or(0).min(wanted);
        takes(&b.0.cluster)
            .cmp(&takes(&a.0.cluster))
            .then(score(a).total_cmp(&score(b)))
            .then(a.0.cluster.cmp(&b.0.cluster))
    });

    let mut left_budget = budget;
    let mut used: BTreeSet<String> = BTreeSet::new();
    for o in overflow {
        let mut need = o.count.min(left_budget);
        for (p, _, _) in &candidates {
            if need == 0 {
                break;
            }
            let fit = room.get_mut(p.cluster.as_str()).and_then(|r| r.get_mut(o.group.as_str()));
            let Some(fit) = fit else { continue };
            let n = need.min(*fit);
            if n == 0 {
                continue;
            }
            *fit -= n;
            need -= n;
            left_budget -= n;
            used.insert(p.cluster.clone());
            match out.offers.iter_mut().find(|x| x.peer == p.cluster && x.group == o.group) {
                Some(x) => x.count += n,
                None => out.offers.push(OfferPlan { peer: p.cluster.clone(), group: o.group.clone(), count: n }),
            }
        }
    }
    let short_of_budget = left_budget == 0 && out.delegated() < wanted;
    for (p, _, _) in &candidates {
        if used.contains(&p.cluster) {
            continue;
        }
        let fits_nothing = room[p.cluster.as_str()].values().all(|n| *n == 0);
        let why = if fits_nothing {
            Refusal::NoFit { group: overflow.first().map(|o| o.group.clone()).unwrap_or_default() }
        } else if short_of_budget {
            Refusal::ShareLimit { share: policy.remote_share(job) }
        } else {
            Refusal::NotNeeded
        };
        out.refused.push((p.cluster.clone(), why));
    }
    out.refused.sort_by(|a, b| a.0.cmp(&b.0));
    out.left = wanted - out.delegated();
    out
}
