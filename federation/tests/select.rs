//! Choosing peers for a job's overflow, and a delegation's life: pure,
//! from gossip summaries of example fleets.

use cluster_core::diag::SourceFile;
use cluster_core::model::Job;
use cluster_core::spec::{parse_fleet, parse_job};
use cluster_core::state::ClusterState;
use federation::delegation::{Breaker, OfferCheck, Rejection, check_offer};
use federation::policy::{Policy, parse_policy};
use federation::select::{Overflow, PeerInfo, Refusal, select};
use gossip::summary::ClusterSummary;

fn policy(name: &str) -> Policy {
    let path = format!("{}/../examples/policies/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    parse_policy(&SourceFile::new(name, std::fs::read_to_string(path).unwrap())).value.unwrap()
}

/// A summary of a cluster of `count` nodes of `cpu` cores at `price`.
fn summary(cluster: &str, jurisdictions: &[&str], count: u32, cpu: u32, price: f64) -> ClusterSummary {
    let text = format!(
        "[fleet]\nname = \"{cluster}\"\n[[class]]\nname = \"m\"\ncount = {count}\ncpu = {cpu}\nmemory = \"{}GiB\"\ncost_per_hour = {}\n",
        cpu * 4,
        price * f64::from(cpu)
    );
    let nodes = parse_fleet(&SourceFile::new("f.toml", text)).value.unwrap().nodes;
    let state = ClusterState::with_nodes(nodes).unwrap();
    let js: Vec<String> = jurisdictions.iter().map(|j| j.to_string()).collect();
    ClusterSummary::build(cluster, "r", 1, 0, &js, &state)
}

fn peer(s: ClusterSummary) -> PeerInfo {
    PeerInfo {
        cluster: s.cluster.clone(),
        liveness: gossip::Liveness::Alive,
        summary: Some(s),
        breaker_open: false,
        rtt_ms: None,
    }
}

fn job(labels: &str, count: u32, cpu: u32) -> Job {
    let text = format!(
        "[job]\nname = \"j\"\nlabels = {{ {labels} }}\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = {cpu}, memory = \"1GiB\" }}\n"
    );
    parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
}

fn overflow(n: u32) -> Vec<Overflow> {
    vec![Overflow { group: "g".into(), count: n }]
}

#[test]
fn overflow_goes_to_the_cheapest_peer_that_can_take_it() {
    let p = policy("eu-west");
    let peers = vec![peer(summary("eu-central", &["eu"], 10, 8, 0.03)), peer(summary("us-east", &["us"], 10, 8, 0.05))];
    let s = select(&p, &job("team = \"web\"", 40, 1), &overflow(12), 40, 0, &peers);
    assert_eq!(s.delegated(), 12);
    assert_eq!(s.offers.len(), 1);
    assert_eq!(s.offers[0].peer, "eu-central", "both fit; the cheaper wins");
    assert_eq!(s.refused, vec![("us-east".to_string(), Refusal::NotNeeded)]);
    assert_eq!(s.left, 0);
}

#[test]
fn eu_only_work_is_never_offered_outside_the_eu() {
    let p = policy("eu-west");
    let peers = vec![peer(summary("us-east", &["us"], 100, 8, 0.01))];
    let s = select(&p, &job("data = \"eu-pii\"", 40, 1), &overflow(10), 40, 0, &peers);
    assert_eq!(s.delegated(), 0);
    assert!(matches!(&s.refused[..], [(c, Refusal::Jurisdiction { .. })] if c == "us-east"), "{:?}", s.refused);
    assert_eq!(s.left, 10);
    assert_eq!(s.allowed_jurisdictions, Some(vec!["eu".to_string()]));
    // And the target refuses it too, even if an origin's policy offered it.
    let target = policy("us-east");
    let offer = OfferCheck {
        origin: "eu-west",
        allowed: Some(&["eu".to_string()]),
        ask_cpu_millis: 1_000,
        inbound_cpu_millis: 0,
        total_cpu_millis: 1_000_000,
        hops: 0,
    };
    assert_eq!(check_offer(&target, &offer), Err(Rejection::Jurisdiction));
}

#[test]
fn dead_open_unknown_and_disallowed_peers_are_passed_over_with_reasons() {
    let p = policy("eu-west");
    let mut dead = peer(summary("eu-central", &["eu"], 10, 8, 0.03));
    dead.liveness = gossip::Liveness::Dead;
    let mut open = peer(summary("us-east", &["us"], 10, 8, 0.03));
    open.breaker_open = true;
    let edge = peer(summary("edge-1", &["eu"], 10, 8, 0.03));
    let stranger = peer(summary("ap-south", &["in"], 10, 8, 0.03));
    let s = select(&p, &job("", 10, 1), &overflow(5), 10, 0, &[dead, open, edge, stranger]);
    assert_eq!(s.delegated(), 0);
    let reasons: Vec<(&str, &Refusal)> = s.refused.iter().map(|(c, r)| (c.as_str(), r)).collect();
    assert_eq!(
        reasons,
        vec![
            ("ap-south", &Refusal::NotAllowed),
            ("edge-1", &Refusal::NotAllowed),
            ("eu-central", &Refusal::Dead),
            ("us-east", &Refusal::CircuitOpen)
        ]
    );
    // A paused peer (suspect) and one whose servers left get no new work either, and say why.
    let mut paused = peer(summary("eu-central", &["eu"], 10, 8, 0.03));
    paused.liveness = gossip::Liveness::Suspect;
    let s = select(&p, &job("", 10, 1), &overflow(5), 10, 0, &[paused.clone()]);
    assert_eq!((s.delegated(), s.refused.first().map(|(_, r)| r)), (0, Some(&Refusal::Suspect)));
    paused.liveness = gossip::Liveness::Left;
    let s = select(&p, &job("", 10, 1), &overflow(5), 10, 0, &[paused]);
    assert_eq!(s.refused.first().map(|(_, r)| r), Some(&Refusal::Left));
}

#[test]
fn the_remote_share_caps_what_is_offered_and_fragmented_peers_are_not_offered_big_instances() {
    let p = policy("eu-west"); // max_remote_share 0.5
    let peers = vec![peer(summary("eu-central", &["eu"], 50, 8, 0.03)), peer(summary("us-east", &["us"], 50, 8, 0.04))];
    let s = select(&p, &job("", 40, 1), &overflow(30), 40, 0, &peers);
    assert_eq!((s.delegated(), s.left), (20, 10), "half of 40 may run remotely");
    let s = select(&p, &job("", 40, 1), &overflow(30), 40, 15, &peers);
    assert_eq!(s.delegated(), 5, "15 run remotely already");
    // Nodes of 2 cores cannot take a 4-core instance however many there are.
    let small = vec![peer(summary("eu-central", &["eu"], 500, 2, 0.01))];
    let s = select(&p, &job("", 4, 4), &overflow(2), 4, 0, &small);
    assert_eq!(s.delegated(), 0);
    assert_eq!(s.refused, vec![("eu-central".to_string(), Refusal::NoFit { group: "g".into() })]);
}

#[test]
fn a_cost_ceiling_passes_over_expensive_peers() {
    let p = policy("eu-west"); // ceiling 0.08 per cpu-hour
    let peers = vec![peer(summary("us-east", &["us"], 10, 8, 0.20))];
    let s = select(&p, &job("", 10, 1), &overflow(5), 10, 0, &peers);
    assert!(matches!(&s.refused[..], [(_, Refusal::TooExpensive { .. })]), "{:?}", s.refused);
}

#[test]
fn a_peer_that_keeps_failing_opens_its_breaker_and_backs_off() {
    let retry = policy("eu-west").retry; // 5 failures, 60 s cooldown, backoff 1 s..30 s
    let mut b = Breaker::default();
    assert_eq!(b.backoff_ms(&retry), 1_000);
    for _ in 0..4 {
        b.failure(0, &retry);
    }
    assert!(!b.is_open(0));
    assert_eq!(b.backoff_ms(&retry), 16_000);
    b.failure(0, &retry);
    assert!(b.is_open(59_999) && !b.is_open(60_000));
    assert_eq!(b.backoff_ms(&retry), 30_000, "capped");
    b.success();
    assert!(!b.is_open(0));
}

#[test]
fn a_target_checks_origin_share_and_hops_itself() {
    let target = policy("eu-west"); // accepts from eu-central and edge-1, 25% inbound
    let offer = |origin, ask, inbound, hops| OfferCheck {
        origin,
        allowed: None,
        ask_cpu_millis: ask,
        inbound_cpu_millis: inbound,
        total_cpu_millis: 100_000,
        hops,
    };
    assert_eq!(check_offer(&target, &offer("edge-1", 10_000, 0, 0)), Ok(()));
    assert_eq!(check_offer(&target, &offer("us-east", 10_000, 0, 0)), Err(Rejection::NotAccepted));
    assert_eq!(check_offer(&target, &offer("edge-1", 10_000, 20_000, 0)), Err(Rejection::InboundShare));
    assert_eq!(check_offer(&target, &offer("edge-1", 1_000, 0, 1)), Err(Rejection::HopLimit));
}

#[test]
fn among_equal_prices_the_less_loaded_and_nearer_peer_wins() {
    let p = policy("eu-west");
    let mut busy = summary("eu-central", &["eu"], 10, 8, 0.03);
    busy.inbound_share = 0.6;
    let calm = summary("us-east", &["us"], 10, 8, 0.03);
    let s = select(&p, &job("", 10, 1), &overflow(5), 10, 0, &[peer(busy.clone()), peer(calm.clone())]);
    assert_eq!(s.offers[0].peer, "us-east", "less inbound load wins at the same price");
    let mut far = peer(calm);
    far.rtt_ms = Some(400.0);
    let mut near = peer(busy);
    near.rtt_ms = Some(1.0);
    let s = select(&p, &job("", 10, 1), &overflow(5), 10, 0, &[near, far]);
    assert_eq!(s.offers[0].peer, "eu-central", "400 ms away outweighs 60% inbound load");
}

/// A peer with 12 GPU models, and one with so many (long-named) models
/// that its summary folds them: work that needs the 11th model is offered
/// to both, never refused "no node fits" (it was: summaries kept 8 models).
#[test]
fn work_for_any_gpu_model_a_peer_has_is_offered_even_when_its_summary_folds_models() {
    let fleet = |cluster: &str, models: usize, name: &dyn Fn(usize) -> String| {
        let mut text = format!("[fleet]\nname = \"{cluster}\"\n");
        for i in 0..models {
            text.push_str(&format!(
                "[[class]]\nname = \"c{i}\"\ncount = 1\ncpu = 16\nmemory = \"64GiB\"\ncost_per_hour = 1.0\n\
                 gpus = {{ model = \"{}\", count = 8 }}\n",
                name(i)
            ));
        }
        let nodes = parse_fleet(&SourceFile::new("f.toml", text)).value.unwrap().nodes;
        ClusterSummary::build(cluster, "r", 1, 0, &["eu".to_string()], &ClusterState::with_nodes(nodes).unwrap())
    };
    // eu-west's policy lets it delegate to eu-central.
    let twelve = fleet("eu-central", 12, &|i| format!("model-{i:02}"));
    assert_eq!((twelve.gpus.len(), twelve.free_gpus()), (12, 96), "all 96 GPUs of 12 models named");
    let long = |i: usize| format!("an-accelerator-model-with-a-long-name-{i:03}");
    let folded = fleet("eu-central", 200, &long);
    assert!(folded.folded.gpu_models > 0, "{:?}", folded.folded);
    assert_eq!(folded.free_gpus(), 1_600, "totals stay exact");
    let wanted = |model: &str| {
        let text = format!(
            "[job]\nname = \"j\"\n[[group]]\nname = \"g\"\ncount = 2\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\n\
             resources = {{ cpu = 1, memory = \"1GiB\", gpu = {{ count = 2, model = \"{model}\" }} }}\n"
        );
        parse_job(&SourceFile::new("j.toml", text)).value.unwrap()
    };
    let p = policy("eu-west");
    for (peer_summary, model) in [(twelve, "model-10".to_string()), (folded, long(150))] {
        let cluster = peer_summary.cluster.clone();
        let folded = peer_summary.folded;
        let s = select(&p, &wanted(&model), &overflow(2), 4, 0, &[peer(peer_summary)]);
        assert_eq!(s.delegated(), 2, "{cluster} ({folded}), {model}: {:?}", s.refused);
    }
}
