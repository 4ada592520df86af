//! Delegation between in-process clusters on loopback: real QUIC with
//! mutual TLS (one federation CA), redb, HTTP and UDP gossip.

mod common;

use std::time::Duration;

use cluster_core::ids::JobId;
use cluster_core::server::client::Client;
use cluster_core::transport::tls;
use common::{Gossiping, Setup, alive_with_nodes, nodes, nodes_in, start, until};
use federation::delegation::{Rejection, State};
use federation::protocol::{Offer, PeerReply, PeerRequest, decode, encode, target_job_id};
use gossip::Key;

fn policy(name: &str, jurisdictions: &str, peers: &[(&str, bool, bool)], extra: &str) -> String {
    let mut text = format!("[cluster]\nname = \"{name}\"\njurisdictions = [{jurisdictions}]\n");
    for (peer, to, from) in peers {
        text.push_str(&format!("\n[[peer]]\ncluster = \"{peer}\"\ndelegate_to = {to}\naccept_from = {from}\n"));
    }
    text.push_str(&format!(
        "\n[overflow]\nmax_remote_share = 1.0\n\n[inbound]\nmax_share_of_capacity = 1.0\n\n[retry]\nlease = \"30s\"\ngrace = \"1s\"\n{extra}"
    ));
    text
}

fn spec(name: &str, count: u32, extra: &str) -> String {
    format!(
        "[job]\nname = \"{name}\"\n{extra}\n[[group]]\nname = \"g\"\ncount = {count}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = 1, memory = \"1GiB\" }}\n"
    )
}

/// eu-west and eu-central, each delegating to and accepting from the other.
async fn eu_pair() -> Federation2 {
    two(
        "eu-central",
        &["eu"],
        policy("eu-west", "\"eu\"", &[("eu-central", true, true)], ""),
        policy("eu-central", "\"eu\"", &[("eu-west", true, true)], ""),
    )
    .await
}

async fn submit(g: &Gossiping, job: String) {
    let client = Client::new(&g.cluster.addresses());
    tokio::task::spawn_blocking(move || client.submit(&job, "job.toml").unwrap()).await.unwrap();
}

struct Federation2 {
    origin: Gossiping,
    target: Gossiping,
}

/// eu-west (2 nodes of 4 cores) delegates to `target` (10 nodes of 8).
async fn two(target: &str, target_jurisdictions: &[&str], origin_policy: String, target_policy: String) -> Federation2 {
    let key = Key::generate();
    let ca = tls::create_ca("test", 1).unwrap();
    let origin = start(Setup {
        name: "eu-west",
        servers: 3,
        key: &key,
        ca: Some(&ca),
        seeds: Vec::new(),
        jurisdictions: &["eu"],
        policy: Some(origin_policy),
        http: Vec::new(),
        data_dir: None,
        region: None,
    })
    .await;
    let seed = origin.servers[0].member.local_addr().to_string();
    let target = start(Setup {
        name: target,
        servers: 1,
        key: &key,
        ca: Some(&ca),
        seeds: vec![seed],
        jurisdictions: target_jurisdictions,
        policy: Some(target_policy),
        http: Vec::new(),
        data_dir: None,
        region: None,
    })
    .await;
    let (o, t) = (Client::new(&origin.cluster.addresses()), Client::new(&target.cluster.addresses()));
    let place = target_jurisdictions[0].to_string();
    tokio::task::spawn_blocking(move || {
        o.register_nodes(&nodes("small", 2, 4)).unwrap();
        t.register_nodes(&nodes_in(&place, "big", 10, 8)).unwrap();
    })
    .await
    .unwrap();
    let name = target.cluster.name.clone();
    let watcher = origin.servers[0].member.clone();
    until(Duration::from_secs(15), "the origin sees the target's nodes", || {
        alive_with_nodes(&watcher.view(), &name, 10)
    })
    .await;
    Federation2 { origin, target }
}

fn live(g: &Gossiping, job: &str) -> usize {
    let id = g.cluster.running().next().unwrap();
    g.cluster.server(id).unwrap().raft().read(|s| s.allocs_of_job(&JobId::new(job)).filter(|a| a.is_live()).count())
}

fn target_jobs(g: &Gossiping) -> Vec<String> {
    let id = g.cluster.running().next().unwrap();
    g.cluster.server(id).unwrap().raft().read(|s| s.jobs().filter(|j| !j.stopped).map(|j| j.id.to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overflow_from_a_full_cluster_runs_on_the_peer_and_comes_back_when_the_peer_dies() {
    let f = eu_pair().await;
    // 20 one-core instances: 8 fit locally, 12 overflow.
    submit(&f.origin, spec("burst", 20, "")).await;
    let fed = f.origin.leader_federation().await;
    until(Duration::from_secs(20), "12 instances run on eu-central", || {
        target_jobs(&f.target).len() == 1 && live(&f.target, &target_jobs(&f.target)[0]) == 12
    })
    .await;
    assert_eq!(live(&f.origin, "burst"), 8, "8 local");
    until(Duration::from_secs(10), "the origin recorded the acceptance", || {
        fed.records().iter().all(|r| matches!(r.delegation.state, State::Accepted | State::Running))
    })
    .await;
    let records = fed.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].indices.len(), 12);
    // Nothing is left unplaced on the origin: the held instances count.
    let origin_id = f.origin.cluster.running().next().unwrap();
    until(Duration::from_secs(5), "the origin's job is no longer blocked", || {
        f.origin.cluster.server(origin_id).unwrap().raft().read(|s| {
            s.job_eval(&JobId::new("burst")).is_some_and(|e| e.status == cluster_core::model::EvalStatus::Complete)
        })
    })
    .await;

    // The target dies: past the grace period the delegation is revoked and
    // the work placed again (here: locally, once capacity appears).
    let Federation2 { mut origin, target } = f;
    target.stop().await;
    let client = Client::new(&origin.cluster.addresses());
    tokio::task::spawn_blocking(move || client.register_nodes(&nodes("more", 2, 8)).unwrap()).await.unwrap();
    until(Duration::from_secs(30), "revoked and re-placed locally", || {
        let r = fed.records();
        r.iter().all(|r| r.delegation.state == State::Revoked) && live(&origin, "burst") == 20
    })
    .await;
    assert_eq!(fed.records()[0].note, "target dead");
    let _ = &mut origin;
    origin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eu_only_work_never_lands_in_the_us_even_when_the_origin_policy_allows_it() {
    // The origin's policy (wrongly) has no rule for eu-pii; the job itself
    // says eu only. The US target refuses it.
    let f = two(
        "us-east",
        &["us"],
        policy("eu-west", "\"eu\"", &[("us-east", true, true)], ""),
        policy("us-east", "\"us\"", &[("eu-west", true, true)], ""),
    )
    .await;
    submit(&f.origin, spec("pii", 20, "jurisdictions = [\"eu\"]\nlabels = { data = \"eu-pii\" }")).await;
    let fed = f.origin.leader_federation().await;
    // The selection already passes over the US peer; force an offer the
    // way a wrong origin would, straight to the target, to see it refuse.
    until(Duration::from_secs(10), "the origin placed what fits", || live(&f.origin, "pii") == 8).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fed.records().is_empty(), "no offer to a US cluster: {:?}", fed.records());
    assert!(target_jobs(&f.target).is_empty());
    let job = f.origin.cluster.server(f.origin.cluster.running().next().unwrap()).unwrap().raft().read(|s| {
        let mut j = s.job(&JobId::new("pii")).unwrap().clone();
        j.groups[0].count = 4;
        j
    });
    let offer =
        PeerRequest::Offer(Offer { id: "eu-west/pii/forced".into(), origin: "eu-west".into(), epoch: 1, job, hops: 0 });
    let addr = f.target.cluster.raft_addrs[&1];
    let reply = fed.server.call_peer(addr, encode(&offer)).await.unwrap();
    match decode::<PeerReply>(&reply).unwrap() {
        PeerReply::Rejected { reason: Rejection::Jurisdiction, message } => {
            assert!(message.contains("[us]"), "{message}")
        }
        other => panic!("expected a jurisdiction refusal, got {other:?}"),
    }
    assert!(target_jobs(&f.target).is_empty(), "nothing registered on the target");
    f.origin.stop().await;
    f.target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_offer_is_accepted_once_and_a_peer_not_accepted_from_is_refused() {
    let f = two(
        "eu-central",
        &["eu"],
        // The origin does not delegate on its own here; the test offers.
        policy("eu-west", "\"eu\"", &[("eu-central", false, true)], ""),
        policy("eu-central", "\"eu\"", &[("eu-west", true, true)], ""),
    )
    .await;
    let fed = f.origin.leader_federation().await;
    submit(&f.origin, spec("dup", 2, "")).await;
    until(Duration::from_secs(10), "placed", || live(&f.origin, "dup") == 2).await;
    let job = f.origin.cluster.server(f.origin.cluster.running().next().unwrap()).unwrap().raft().read(|s| {
        let mut j = s.job(&JobId::new("dup")).unwrap().clone();
        j.groups[0].count = 5;
        j
    });
    let offer = encode(&PeerRequest::Offer(Offer {
        id: "eu-west/dup/e1-g-0".into(),
        origin: "eu-west".into(),
        epoch: 1,
        job: job.clone(),
        hops: 0,
    }));
    let addr = f.target.cluster.raft_addrs[&1];
    for _ in 0..3 {
        let reply = decode::<PeerReply>(&fed.server.call_peer(addr, offer.clone()).await.unwrap()).unwrap();
        assert_eq!(reply, PeerReply::Accepted { placed: 5 });
    }
    assert_eq!(target_jobs(&f.target), vec![target_job_id("eu-west/dup/e1-g-0")], "one job for three offers");
    assert_eq!(live(&f.target, &target_job_id("eu-west/dup/e1-g-0")), 5);
    // An offer claiming to come from a cluster the certificate does not
    // name is refused; so is a second hop.
    let forged = encode(&PeerRequest::Offer(Offer {
        id: "us-east/x/1".into(),
        origin: "us-east".into(),
        epoch: 1,
        job: job.clone(),
        hops: 0,
    }));
    let reply = decode::<PeerReply>(&fed.server.call_peer(addr, forged).await.unwrap()).unwrap();
    assert!(matches!(reply, PeerReply::Rejected { reason: Rejection::NotAccepted, .. }), "{reply:?}");
    let hop = encode(&PeerRequest::Offer(Offer {
        id: "eu-west/x/2".into(),
        origin: "eu-west".into(),
        epoch: 1,
        job,
        hops: 1,
    }));
    let reply = decode::<PeerReply>(&fed.server.call_peer(addr, hop).await.unwrap()).unwrap();
    assert!(matches!(reply, PeerReply::Rejected { reason: Rejection::HopLimit, .. }), "{reply:?}");
    // Revoked: the target stops the work of the old epoch.
    let revoke = encode(&PeerRequest::Revoke { id: "eu-west/dup/e1-g-0".into(), epoch: 2 });
    let reply = decode::<PeerReply>(&fed.server.call_peer(addr, revoke).await.unwrap()).unwrap();
    assert_eq!(reply, PeerReply::Revoked);
    assert!(target_jobs(&f.target).is_empty(), "the fenced job is stopped");
    f.origin.stop().await;
    f.target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_refuses_an_origin_its_policy_does_not_accept_from() {
    let f = two(
        "eu-central",
        &["eu"],
        policy("eu-west", "\"eu\"", &[("eu-central", true, true)], ""),
        policy("eu-central", "\"eu\"", &[("eu-west", false, false), ("edge-1", false, true)], ""),
    )
    .await;
    submit(&f.origin, spec("no", 20, "")).await;
    let fed = f.origin.leader_federation().await;
    until(Duration::from_secs(15), "the offer was refused", || {
        fed.records().iter().any(|r| r.delegation.state == State::Failed && r.note.contains("NotAccepted"))
    })
    .await;
    assert!(target_jobs(&f.target).is_empty());
    assert_eq!(live(&f.origin, "no"), 8, "only what fits locally runs");
    f.origin.stop().await;
    f.target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_origin_leader_killed_mid_delegation_loses_nothing_and_doubles_nothing() {
    let f = eu_pair().await;
    let Federation2 { mut origin, target } = f;
    let leader = origin.cluster.leader(Duration::from_secs(10)).await.unwrap();
    let fed = origin.leader_federation().await;
    submit(&origin, spec("mid", 20, "")).await;
    // Kill the origin's leader as soon as the hold is in its log.
    until(Duration::from_secs(15), "the instances are held", || !fed.records().is_empty()).await;
    origin.stop_server(leader).await;
    drop(fed);
    let new = origin.leader_federation().await;
    assert_ne!(new.server.id, leader);
    until(Duration::from_secs(30), "12 run on the target, 8 here, one delegation", || {
        let jobs = target_jobs(&target);
        jobs.len() == 1
            && live(&target, &jobs[0]) == 12
            && live(&origin, "mid") == 8
            && new.records().len() == 1
            && matches!(new.records()[0].delegation.state, State::Accepted | State::Running)
    })
    .await;
    // And it stays so: nothing placed twice on either side.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(target_jobs(&target).len(), 1);
    assert_eq!(live(&target, &target_jobs(&target)[0]) + live(&origin, "mid"), 20);
    origin.stop().await;
    target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_that_comes_back_stops_what_it_ran_for_a_revoked_delegation() {
    let f = eu_pair().await;
    let Federation2 { origin, mut target } = f;
    submit(&origin, spec("back", 20, "")).await;
    let fed = origin.leader_federation().await;
    until(Duration::from_secs(20), "running on the target", || {
        fed.records().first().is_some_and(|r| r.delegation.state == State::Running)
    })
    .await;
    let job = target_jobs(&target)[0].clone();
    // The target goes away long enough to be revoked...
    target.stop_server(1).await;
    until(Duration::from_secs(30), "revoked", || fed.records()[0].delegation.state == State::Revoked).await;
    assert!(!fed.records()[0].fenced);
    // ...and comes back with its log: it is told, and stops the job.
    target.restart_server(1).await;
    until(Duration::from_secs(30), "fenced", || fed.records()[0].fenced).await;
    let stopped = target.cluster.server(1).unwrap().raft().read(|s| s.job(&JobId::new(&job)).map(|j| j.stopped));
    assert_eq!(stopped, Some(true), "the revoked work is stopped on the target");
    origin.stop().await;
    target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_committed_through_the_log_is_the_one_every_server_applies() {
    let f = eu_pair().await;
    let leader = f.origin.cluster.leader(Duration::from_secs(10)).await.unwrap();
    let feds: Vec<_> = f.origin.servers.iter().filter_map(|s| s.federation.clone()).collect();
    let follower = f.origin.servers.iter().find(|s| s.id != leader).and_then(|s| s.federation.clone()).unwrap();
    // A new policy, given to a follower: no peer to delegate to.
    let text = policy("eu-west", "\"eu\"", &[("eu-central", false, true)], "");
    let new = federation::policy::parse_policy(&cluster_core::diag::SourceFile::new("p.toml", text)).value.unwrap();
    follower.commit_policy(new.clone()).await.unwrap();
    until(Duration::from_secs(5), "every server applies it", || feds.iter().all(|f| f.policy() == new)).await;
    // A policy for another cluster is refused.
    let other = federation::policy::Policy::isolated("us-east");
    assert!(follower.commit_policy(other).await.unwrap_err().contains("for cluster us-east"));
    // And it is in force: the overflow stays here.
    submit(&f.origin, spec("stay", 20, "")).await;
    until(Duration::from_secs(10), "placed what fits", || live(&f.origin, "stay") == 8).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(f.origin.leader_federation().await.records().is_empty(), "nothing offered");
    f.origin.stop().await;
    f.target.stop().await;
}
