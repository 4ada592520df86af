//! The simulator as the test: determinism, planted bugs caught, the
//! review's breaks, and 300 seeds of a faulty federation.

use sim::scenario::{Expect, Scenario};
use sim::{Options, Plant, run};

fn seed(seed: u64) -> sim::Report {
    run(&Options { seed, ..Options::default() })
}

#[test]
fn one_seed_gives_one_trace() {
    let (a, b, other) = (seed(7), seed(7), seed(8));
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.steps, b.steps);
    assert_ne!(a.trace_hash, other.trace_hash, "two seeds should not run alike");
}

#[test]
fn every_planted_bug_is_caught_within_200_seeds() {
    for plant in Plant::ALL {
        let caught =
            (0..200).find(|s| run(&Options { seed: *s, plant: Some(plant), ..Options::default() }).violation.is_some());
        assert!(caught.is_some(), "plant {} was not caught in 200 seeds", plant.name());
    }
}

#[test]
fn every_scenario_shows_what_it_expects() {
    for s in Scenario::ALL {
        let r = run(&Options { seed: 1, scenario: Some(s), ..Options::default() });
        match s.expect() {
            Expect::Pass => assert!(r.violation.is_none(), "{}: {:?}", s.name(), r.violation),
            Expect::KnownBreak(why) => {
                let v = r.violation.unwrap_or_else(|| panic!("{} passes now: {why} may be fixed", s.name()));
                assert!(v.invariant.starts_with("I1"), "{}: {v:?}", s.name());
            }
        }
    }
}

#[test]
fn three_hundred_seeds_keep_every_invariant() {
    for s in 0..300 {
        let r = seed(s);
        assert!(r.violation.is_none(), "seed {s}: {:?}", r.violation);
    }
}

/// The leaders collect garbage as servers do, and the runs above see jobs
/// and their allocations go, and delegation records at both ends: the
/// invariants hold with collection in the loop, not beside it.
#[test]
fn seeds_collect_stopped_jobs_while_the_invariants_hold() {
    let (mut collected, mut records, mut tombstones) = (0, 0, 0);
    for s in 0..40 {
        let r = run(&Options { seed: s, trace: true, ..Options::default() });
        assert!(r.violation.is_none(), "seed {s}: {:?}", r.violation);
        collected += r.trace.iter().filter(|l| l.contains("collected") && !l.contains("collected 0 jobs")).count();
        (records, tombstones) = (records + r.collected_outbound, tombstones + r.collected_inbound);
    }
    assert!(collected > 10, "collections that dropped jobs in 40 seeds: {collected}");
    assert!(records > 10 && tombstones > 10, "delegation records and tombstones collected: {records}, {tombstones}");
}

/// Seeds that once failed, kept as regressions:
/// - 306, 960: an at-most-once instance ran in two targets; the target's
///   lease was per origin and covered a late offer already expired;
/// - 230: an agent restart dropped its unsent reports (simulated agent);
/// - 1344: the origin expired a just-registered delegation at once, from a
///   renewal time long past;
/// - 632: a workload the target's inbound share could never take.
///
/// Found once raft-rs ran in the loop (commits take time, leaders overlap;
/// every seed's run changed then, so the ones above now run differently):
/// - 345, 501, 2152, 2871: a node's heartbeat was answered while the leader
///   was committing it down; its agent started at-most-once work that the
///   cluster placed again elsewhere;
/// - 410, 1060, 2805: a renewal was acked beside the commit that expired
///   its delegation; the target started work the origin placed again.
#[test]
fn pinned_seeds_pass() {
    for s in [230, 306, 345, 410, 501, 632, 960, 1060, 1344, 2152, 2805, 2871, 9236] {
        let r = seed(s);
        assert!(r.violation.is_none(), "seed {s}: {:?}", r.violation);
    }
}

/// Issue 17's rule for delegation records: both ends collect them, and a
/// late copy of the offer, arriving after the target dropped its tombstone,
/// is refused by the origin's floor instead of registering the work again
/// (the planted `tombstones-expire` shows what happens without it).
#[test]
fn a_late_offer_after_collection_is_refused_by_the_floor() {
    let r = run(&Options {
        seed: 1,
        scenario: Some(Scenario::LateOfferAfterCollection),
        trace: true,
        ..Options::default()
    });
    assert!(r.violation.is_none(), "{:?}", r.violation);
    assert!(r.collected_outbound >= 1 && r.collected_inbound >= 1, "{} {}", r.collected_outbound, r.collected_inbound);
    let refused = r.trace.iter().filter(|l| l.contains("Refused") && l.contains("older than anything")).count();
    assert_eq!(refused, 1, "the echoed offer, refused by the floor");
}
