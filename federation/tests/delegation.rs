//! Delegation v2 between in-process clusters on loopback: real QUIC with
//! mutual TLS (one federation CA), redb, HTTP and UDP gossip. Each test
//! names the item of the protocol it checks (ARCHITECTURE.md, "Delegation").

mod common;

use std::time::Duration;

use cluster_core::ids::JobId;
use cluster_core::transport::tls;
use common::{Gossiping, Setup, alive_with_nodes, nodes, nodes_in, start, until};
use federation::delegation::Rejection;
use federation::node::Federation;
use federation::proto::origin::{End, Outbound, Phase};
use federation::proto::{IndexState, Message, Outcome, ToOrigin, ToTarget};
use federation::protocol::{PeerReply, PeerRequest, decode, encode, target_job_id};
use gossip::Key;

fn policy(name: &str, jurisdictions: &str, peers: &[(&str, bool, bool)], extra: &str) -> String {
    let mut text = format!("[cluster]\nname = \"{name}\"\njurisdictions = [{jurisdictions}]\n");
    for (peer, to, from) in peers {
        text.push_str(&format!("\n[[peer]]\ncluster = \"{peer}\"\ndelegate_to = {to}\naccept_from = {from}\n"));
    }
    text.push_str(&format!(
        "\n[overflow]\nmax_remote_share = 1.0\n\n[inbound]\nmax_share_of_capacity = 1.0\n\n[retry]\nlease = \"3s\"\ngrace = \"1s\"\nbackoff = \"200ms\"\n{extra}"
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
    let client = g.cluster.client();
    tokio::task::spawn_blocking(move || client.submit(&job, "job.toml").unwrap()).await.unwrap();
}

struct Federation2 {
    origin: Gossiping,
    target: Gossiping,
}

impl Federation2 {
    async fn stop(self) {
        self.origin.stop().await;
        self.target.stop().await;
    }
}

/// eu-west (2 nodes of 4 cores) delegates to `target` (10 simulated nodes
/// of 8 that run what is placed on them).
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
        token: None,
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
        token: None,
    })
    .await;
    let mut target = target;
    let o = origin.cluster.client();
    tokio::task::spawn_blocking(move || o.register_nodes(&nodes("small", 2, 4)).unwrap()).await.unwrap();
    // The target's nodes run what is placed on them (and stop what is
    // stopped), as agents would.
    let inner = target.cluster.server(1).unwrap().inner.clone();
    target.spawn(cluster_core::server::sim::run(inner, nodes_in(target_jurisdictions[0], "big", 10, 8)));
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

/// The origin's delegation records.
fn records(fed: &Federation) -> Vec<Outbound> {
    fed.outbound()
}

/// Sends delegation messages to `addr` as `fed`'s server (its certificate
/// names its cluster), and returns the answer.
async fn deliver(fed: &Federation, addr: std::net::SocketAddr, messages: Vec<Message>) -> PeerReply {
    let bytes = fed.server.call_peer(addr, encode(&PeerRequest::Deliver(messages))).await.unwrap();
    decode::<PeerReply>(&bytes).unwrap()
}

fn outcome(reply: &PeerReply) -> Outcome {
    match reply {
        PeerReply::Delivered(m) => match m.as_slice() {
            [Message::ToOrigin(ToOrigin::Outcome { outcome, .. })] => outcome.clone(),
            other => panic!("not one outcome: {other:?}"),
        },
        other => panic!("not delivered: {other:?}"),
    }
}

/// Jobs on `g` registered for delegation `id`, stopped or not.
fn jobs_for(g: &Gossiping, id: &str) -> usize {
    let server = g.cluster.running().next().unwrap();
    g.cluster.server(server).unwrap().raft().read(|s| {
        s.jobs()
            .filter(|j| j.labels.get(federation::protocol::LABEL_DELEGATION).map(String::as_str) == Some(id))
            .count()
    })
}

fn target_jobs(g: &Gossiping) -> Vec<String> {
    let id = g.cluster.running().next().unwrap();
    g.cluster.server(id).unwrap().raft().read(|s| s.jobs().filter(|j| !j.stopped).map(|j| j.id.to_string()).collect())
}

/// Exact counts by index (item 3): the target registers exactly the
/// indexes it took and the origin holds exactly those; when the target
/// dies, its lease plus the grace ends the delegation and the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overflow_runs_on_the_peer_by_index_and_is_taken_back_when_the_peer_dies() {
    let f = eu_pair().await;
    submit(&f.origin, spec("burst", 20, "")).await;
    let fed = f.origin.leader_federation().await;
    until(Duration::from_secs(20), "registered at the target", || {
        records(&fed).iter().any(|r| r.phase == Phase::Registered)
    })
    .await;
    assert_eq!(live(&f.origin, "burst"), 8, "8 local");
    let r = records(&fed).into_iter().find(|r| r.phase == Phase::Registered).unwrap();
    assert_eq!(r.indices, (8..20).collect::<Vec<u32>>(), "the 12 indexes not placed here, exactly");
    let job = target_job_id(&r.id);
    assert_eq!(live(&f.target, &job), 12, "the target runs exactly what it registered");
    let held = |g: &Gossiping| {
        let id = g.cluster.running().next().unwrap();
        g.cluster.server(id).unwrap().raft().read(|s| s.held_of_job(&JobId::new("burst")).count())
    };
    assert_eq!(held(&f.origin), 12);
    // The target's audit trail names the offer and the cluster it came from.
    let offers: Vec<_> = f
        .target
        .cluster
        .running()
        .flat_map(|id| f.target.cluster.server(id).unwrap().inner.audit.read(0, 100))
        .filter(|a| a.method == "OFFER" && a.route == format!("delegation {}", r.id))
        .collect();
    assert_eq!(offers.len(), 1, "one decision, recorded once: {offers:?}");
    assert_eq!((offers[0].origin.as_deref(), offers[0].outcome.as_str()), (Some("eu-west"), "allowed"));
    // The target dies: after the lease (3 s) and the grace (1 s) without a
    // renewal, the delegation expires and the instances are this
    // cluster's to place again. Not sooner.
    let Federation2 { origin, target } = f;
    let died = std::time::Instant::now();
    target.stop().await;
    until(Duration::from_secs(20), "expired", || records(&fed).iter().any(|r| r.phase == Phase::Ended(End::Expired)))
        .await;
    assert!(died.elapsed() >= Duration::from_secs(3), "expired {:?} after the target died", died.elapsed());
    until(Duration::from_secs(5), "the hold is released", || held(&origin) == 0).await;
    origin.stop().await;
}

/// Exact counts by index (item 3), the other way: an instance the target
/// can no longer keep (its node drained, no room left) is given back by
/// index. The origin holds exactly the rest, and the returned index never
/// runs at the target again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_the_target_cannot_keep_is_returned_and_never_runs_there_again() {
    let f = eu_pair().await;
    submit(&f.origin, spec("burst", 20, "")).await;
    let fed = f.origin.leader_federation().await;
    let running = |r: &Outbound| {
        r.phase == Phase::Registered && r.states.len() == 12 && r.states.iter().all(|(_, s)| *s == IndexState::Running)
    };
    until(Duration::from_secs(20), "running at the target", || records(&fed).iter().any(running)).await;
    let r = records(&fed).into_iter().find(running).unwrap();
    let job = JobId::new(target_job_id(&r.id));
    // Fill every core the delegated work does not use (10 nodes of 8).
    submit(&f.target, spec("fill", 68, "")).await;
    until(Duration::from_secs(20), "the target is full", || live(&f.target, "fill") == 68).await;
    let server = f.target.cluster.server(1).unwrap();
    // Drain a node that runs delegated instances: nowhere else fits them,
    // so they run on until the drain's deadline stops them.
    let (node, on_it) = server.raft().read(|s| {
        let a = s.allocs_of_job(&job).find(|a| a.is_live()).unwrap().clone();
        let local: Vec<u32> =
            s.allocs_of_job(&job).filter(|b| b.is_live() && b.node == a.node).map(|b| b.index).collect();
        (a.node, local)
    });
    let deadline = Some(Duration::from_secs(1));
    let drain = cluster_core::server::rpc::Write::DrainNode { node, drain: true, deadline };
    server.inner.write(drain).await.unwrap();
    let inbound = || fed_inbound(&f.target, &r.id);
    until(Duration::from_secs(20), "given back", || !inbound().returned.is_empty()).await;
    let mut expect: Vec<u32> = on_it.iter().map(|j| r.indices[*j as usize]).collect();
    expect.sort_unstable();
    let mut returned = inbound().returned;
    returned.sort_unstable();
    assert_eq!(returned, expect, "exactly the origin's indexes of the drained node's instances");
    let kept: Vec<u32> = r.indices.iter().copied().filter(|i| !returned.contains(i)).collect();
    until(Duration::from_secs(10), "the origin holds exactly the rest", || {
        records(&fed).iter().any(|o| o.id == r.id && o.indices == kept && o.phase == Phase::Registered)
    })
    .await;
    // Held at the target: however long it waits, the index is not placed
    // there again (sampled for two leases).
    for _ in 0..60 {
        let again = server.raft().read(|s| {
            s.allocs_of_job(&job).filter(|a| !a.status.is_terminal()).filter(|a| on_it.contains(&a.index)).count()
        });
        assert_eq!(again, 0, "a returned index runs at the target again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.stop().await;
}

/// The target's record of delegation `id`.
fn fed_inbound(g: &Gossiping, id: &str) -> federation::proto::target::Inbound {
    let server = g.cluster.running().next().unwrap();
    g.cluster.server(server).unwrap().raft().read(|s| {
        federation::proto::target::Target::records(s).into_iter().map(|(r, _)| r).find(|r| r.id == id).unwrap()
    })
}

/// What the policy says, the code does (item 8): a `prefer-remote` job is
/// offered to the peer first, though it fits here; a plain job of the same
/// size stays here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefer_remote_work_goes_to_the_peer_first() {
    let f = eu_pair().await;
    submit(&f.origin, spec("near", 4, "[job.federation]\ndelegate = \"prefer-remote\"\n")).await;
    let fed = f.origin.leader_federation().await;
    until(Duration::from_secs(20), "registered at the peer", || {
        records(&fed).iter().any(|r| r.job == "near" && r.phase == Phase::Registered && r.indices == [0, 1, 2, 3])
    })
    .await;
    submit(&f.origin, spec("local", 4, "")).await;
    until(Duration::from_secs(10), "the plain job placed here", || live(&f.origin, "local") == 4).await;
    assert_eq!(live(&f.origin, "near"), 0, "the peer took it all: nothing of it runs here");
    assert!(records(&fed).iter().all(|r| r.job != "local"), "a plain job that fits is not delegated");
    f.stop().await;
}

/// ... and what no peer takes runs here, without waiting for a trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefer_remote_work_no_peer_takes_runs_here() {
    let f = two(
        "eu-central",
        &["eu"],
        policy("eu-west", "\"eu\"", &[("eu-central", true, true)], ""),
        policy("eu-central", "\"eu\"", &[("eu-west", false, false)], ""),
    )
    .await;
    submit(&f.origin, spec("near", 4, "[job.federation]\ndelegate = \"prefer-remote\"\n")).await;
    until(Duration::from_secs(20), "placed here once the peer refused", || live(&f.origin, "near") == 4).await;
    let fed = f.origin.leader_federation().await;
    let offered = records(&fed);
    assert!(
        !offered.is_empty() && offered.iter().all(|r| r.phase == Phase::Ended(End::Refused)),
        "offered first, and refused: {:?}",
        records(&fed)
    );
    f.stop().await;
}

/// Definite outcomes (item 2), identities (item 6) and the spec checks
/// (item 10): a re-offer is answered from the log with the first outcome;
/// a revoked id is refused for good; nobody offers or revokes in another
/// cluster's name; a malformed offer is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offers_are_answered_from_the_log_and_a_tombstone_refuses_for_good() {
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
    // Ids far above the origin's evaluation sequence: its floors never
    // cover them (they are no delegation of its own).
    let id = "eu-west/dup/e999999-g-0".to_string();
    let offer = Message::ToTarget(ToTarget::Offer {
        id: id.clone(),
        job: job.clone(),
        indices: vec![0, 1, 2, 3, 4],
        grace_ms: 2_000,
    });
    let addr = f.target.cluster.raft_addrs[&1];
    for _ in 0..3 {
        let reply = deliver(&fed, addr, vec![offer.clone()]).await;
        assert_eq!(outcome(&reply), Outcome::Registered { indices: vec![0, 1, 2, 3, 4] });
    }
    assert_eq!(jobs_for(&f.target, &id), 1, "one job for three offers");
    // An id that names another cluster is refused: the certificate names
    // eu-west.
    let forged = Message::ToTarget(ToTarget::Offer {
        id: "us-east/x/e1-g-0".into(),
        job: job.clone(),
        indices: vec![0],
        grace_ms: 2_000,
    });
    match outcome(&deliver(&fed, addr, vec![forged]).await) {
        Outcome::Refused { reason: Rejection::NotAccepted, message } => {
            assert!(message.contains("us-east"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(jobs_for(&f.target, "us-east/x/e1-g-0"), 0);
    // The origin side: a server whose certificate names another cluster
    // than the one meant is not sent anything.
    let wrong = fed.server.call_cluster("us-east", addr, encode(&PeerRequest::Deliver(Vec::new()))).await;
    assert!(wrong.as_ref().is_err_and(|e| e.contains("not of a server of us-east")), "{wrong:?}");
    // A revocation in another cluster's name changes nothing.
    let reply = deliver(&fed, addr, vec![Message::ToTarget(ToTarget::Revoke { id: "us-east/y/e1-g-0".into() })]).await;
    assert_eq!(reply, PeerReply::Delivered(Vec::new()));
    // Offers go through the spec checks: indexes that do not match the
    // count, a system job.
    let bad = Message::ToTarget(ToTarget::Offer {
        id: "eu-west/dup/e999998-g-0".into(),
        job: job.clone(),
        indices: vec![0],
        grace_ms: 2_000,
    });
    assert!(matches!(outcome(&deliver(&fed, addr, vec![bad]).await), Outcome::Refused { .. }));
    let mut system = job.clone();
    system.job_type = cluster_core::model::JobType::System;
    let bad = Message::ToTarget(ToTarget::Offer {
        id: "eu-west/dup/e999997-g-0".into(),
        job: system,
        indices: vec![0, 1, 2, 3, 4],
        grace_ms: 2_000,
    });
    match outcome(&deliver(&fed, addr, vec![bad]).await) {
        Outcome::Refused { message, .. } => assert!(message.contains("system"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Revoked: the target stops the work and says how much is alive; the
    // id is a tombstone, and a late re-offer is refused.
    let revoke = Message::ToTarget(ToTarget::Revoke { id: id.clone() });
    let mut alive = u32::MAX;
    for _ in 0..100 {
        match deliver(&fed, addr, vec![revoke.clone()]).await {
            PeerReply::Delivered(m) => {
                if let [Message::ToOrigin(ToOrigin::Revoked { alive: a, .. })] = m.as_slice() {
                    alive = *a;
                }
            }
            other => panic!("{other:?}"),
        }
        if alive == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alive, 0, "the revoked work ends at the target");
    match outcome(&deliver(&fed, addr, vec![offer]).await) {
        Outcome::Refused { message, .. } => assert!(message.contains("revoked"), "{message}"),
        other => panic!("a tombstone refuses a re-offer: {other:?}"),
    }
    assert!(target_jobs(&f.target).is_empty(), "the revoked job is stopped");
    f.stop().await;
}

/// Identities (item 6): a target acts only if its policy accepts from the
/// origin; the refusal is definite, and the origin keeps what fits.
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
        records(&fed).iter().any(|r| r.phase == Phase::Ended(End::Refused) && r.note.contains("NotAccepted"))
    })
    .await;
    assert!(target_jobs(&f.target).is_empty());
    assert_eq!(live(&f.origin, "no"), 8, "only what fits locally runs");
    f.stop().await;
}

/// Leadership (item 7): the origin's leader dies right after its hold is
/// committed; the next leader rebuilds its memory from the log, offers
/// the same id again, and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_origin_leader_killed_mid_delegation_loses_nothing_and_doubles_nothing() {
    let f = eu_pair().await;
    let Federation2 { mut origin, target } = f;
    let leader = origin.cluster.leader(Duration::from_secs(10)).await.unwrap();
    let fed = origin.leader_federation().await;
    submit(&origin, spec("mid", 20, "")).await;
    until(Duration::from_secs(15), "the instances are held", || !records(&fed).is_empty()).await;
    origin.stop_server(leader).await;
    drop(fed);
    let new = origin.leader_federation().await;
    assert_ne!(new.server.id, leader);
    until(Duration::from_secs(30), "12 run on the target, 8 here, one delegation", || {
        let jobs = target_jobs(&target);
        let r = records(&new);
        jobs.len() == 1
            && live(&target, &jobs[0]) == 12
            && live(&origin, "mid") == 8
            && r.len() == 1
            && r[0].phase == Phase::Registered
    })
    .await;
    // And it stays so, checked every 50 ms: nothing placed twice.
    for _ in 0..40 {
        let jobs = target_jobs(&target);
        assert_eq!(jobs.len(), 1);
        assert_eq!(live(&target, &jobs[0]) + live(&origin, "mid"), 20);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    origin.stop().await;
    target.stop().await;
}

/// Updates reach every copy (item 5): a stop at the origin is carried to
/// the target, which stops the work and confirms; until it does, the
/// origin shows the delegation as revoking.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_at_the_origin_reaches_the_target_and_is_confirmed() {
    let f = eu_pair().await;
    submit(&f.origin, spec("gone", 20, "")).await;
    let fed = f.origin.leader_federation().await;
    until(Duration::from_secs(20), "registered", || records(&fed).iter().any(|r| r.phase == Phase::Registered)).await;
    let id = records(&fed)[0].id.clone();
    let client = f.origin.cluster.client();
    tokio::task::spawn_blocking(move || client.stop("gone").unwrap()).await.unwrap();
    until(Duration::from_secs(15), "the target confirmed the stop", || {
        records(&fed).iter().all(|r| r.phase == Phase::Ended(End::Revoked))
    })
    .await;
    assert!(target_jobs(&f.target).is_empty(), "stopped at the target");
    assert_eq!(jobs_for(&f.target, &id), 1);
    f.stop().await;
}

/// Target-side leases (item 4) and pushed status (item 9): with nodes
/// that run what is placed, the origin learns of every index running by
/// a pushed renewal; when the origin goes silent, the target's
/// at-most-once work stops within the lease on its own, and `keep` work
/// runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_most_once_work_stops_at_the_target_when_its_lease_runs_out() {
    let key = Key::generate();
    let ca = tls::create_ca("test", 1).unwrap();
    let setup = |name: &'static str, seeds: Vec<String>, policy: String| Setup::single(name, &key, &ca, seeds, policy);
    let origin =
        start(setup("eu-west", Vec::new(), policy("eu-west", "\"eu\"", &[("eu-central", true, true)], ""))).await;
    let seed = vec![origin.servers[0].member.local_addr().to_string()];
    let mut target =
        start(setup("eu-central", seed, policy("eu-central", "\"eu\"", &[("eu-west", true, true)], ""))).await;
    let o = origin.cluster.client();
    tokio::task::spawn_blocking(move || o.register_nodes(&nodes("small", 1, 4)).unwrap()).await.unwrap();
    let inner = target.cluster.server(1).unwrap().inner.clone();
    target.spawn(cluster_core::server::sim::run(inner, nodes("big", 4, 8)));
    let watcher = origin.servers[0].member.clone();
    until(Duration::from_secs(15), "the origin sees the target's nodes", || {
        alive_with_nodes(&watcher.view(), "eu-central", 4)
    })
    .await;
    submit(
        &origin,
        spec("once", 10, "")
            .replace("[[group.task]]", "on_disconnect = \"stop\"\n[[group.task]]")
            .replace("memory = \"1GiB\" }", "memory = \"1GiB\" }\nkill_timeout = \"100ms\""),
    )
    .await;
    submit(&origin, spec("kept", 4, "")).await;
    let fed = origin.leader_federation().await;
    let running = |job: &str| {
        records(&fed)
            .iter()
            .filter(|r| r.job == job && r.phase == Phase::Registered)
            .all(|r| r.states.len() == r.indices.len() && r.states.iter().all(|(_, s)| *s == IndexState::Running))
            && records(&fed).iter().any(|r| r.job == job && r.phase == Phase::Registered)
    };
    until(Duration::from_secs(20), "the origin hears that every delegated index runs", || {
        running("once") && running("kept")
    })
    .await;
    let once = records(&fed).into_iter().find(|r| r.job == "once").unwrap();
    let kept = records(&fed).into_iter().find(|r| r.job == "kept").unwrap();
    let live_at_target = |id: &str| {
        target.cluster.server(1).unwrap().raft().read(|s| {
            s.allocs_of_job(&JobId::new(target_job_id(id)))
                .filter(|a| a.status == cluster_core::model::AllocStatus::Running)
                .count()
        })
    };
    assert_eq!(live_at_target(&once.id), once.indices.len());
    // The origin goes silent: no renewal is answered from now on.
    let silent = std::time::Instant::now();
    origin.stop().await;
    // The lease is 3 s from the last answered renewal; the simulated nodes
    // heartbeat every 200 ms while they wait, and report within 200 ms.
    until(Duration::from_secs(8), "the at-most-once work stopped at the target", || live_at_target(&once.id) == 0)
        .await;
    let stopped = silent.elapsed();
    assert!(stopped <= Duration::from_millis(3_000 + 1_000), "stopped {stopped:?} after the origin went silent");
    assert_eq!(live_at_target(&kept.id), kept.indices.len(), "keep work runs on through the partition");
    target.stop().await;
}

/// Leadership and fencing (items 6, 7): a target that was gone past the
/// lease comes back with its log; the origin no longer tracks the
/// delegation, says so in answer to the target's renewal, and the target
/// stops the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_that_comes_back_stops_what_its_origin_no_longer_tracks() {
    let f = eu_pair().await;
    let Federation2 { origin, mut target } = f;
    submit(&origin, spec("back", 20, "")).await;
    let fed = origin.leader_federation().await;
    until(Duration::from_secs(20), "registered", || {
        records(&fed).first().is_some_and(|r| r.phase == Phase::Registered)
    })
    .await;
    let job = target_jobs(&target)[0].clone();
    target.stop_server(1).await;
    until(Duration::from_secs(30), "expired", || records(&fed)[0].phase == Phase::Ended(End::Expired)).await;
    target.restart_server(1).await;
    until(Duration::from_secs(30), "stopped at the target", || {
        target.cluster.server(1).is_some_and(|s| s.raft().read(|s| s.job(&JobId::new(&job)).is_some_and(|j| j.stopped)))
    })
    .await;
    origin.stop().await;
    target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_committed_through_the_log_is_the_one_every_server_applies() {
    let f = eu_pair().await;
    let leader = f.origin.cluster.leader(Duration::from_secs(10)).await.unwrap();
    let feds: Vec<_> = f.origin.servers.iter().filter_map(|s| s.federation.clone()).collect();
    let follower = f.origin.servers.iter().find(|s| s.id != leader).and_then(|s| s.federation.clone()).unwrap();
    // Through the API, a policy change needs `federation-admin` (security
    // review, row 7): without a token, or with a deployer's, it is refused
    // and the policy in force stays.
    let before = follower.policy();
    let admin = f.origin.cluster.client();
    let open = policy("eu-west", "\"eu\"", &[("eu-central", true, true)], "\n[inbound]\nmax_share_of_capacity = 1.0\n");
    tokio::task::spawn_blocking(move || {
        let body = serde_json::json!({"policy": open, "source": "open.toml"});
        let anonymous = admin.clone().with_token(None);
        let e = anonymous.put::<serde_json::Value>("/v1/federation/policy", &body).unwrap_err();
        assert_eq!(e.status(), Some(401), "{e}");
        let _: serde_json::Value = admin
            .put(
                "/v1/acl/policies/deployer",
                &serde_json::json!({"policy": "[[namespace]]\nname = \"*\"\ncapabilities = [\"read\", \"submit\"]\n"}),
            )
            .unwrap();
        let t: serde_json::Value =
            admin.post("/v1/acl/tokens", &serde_json::json!({"name": "ci", "policies": ["deployer"]})).unwrap();
        let deployer = anonymous.with_token(t["secret"].as_str());
        let e = deployer.put::<serde_json::Value>("/v1/federation/policy", &body).unwrap_err();
        assert_eq!(e.status(), Some(403), "{e}");
        assert!(e.to_string().contains("federation-admin"), "{e}");
    })
    .await
    .unwrap();
    assert!(feds.iter().all(|f| f.policy() == before), "a refused request changed the policy");
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
    assert!(records(&*f.origin.leader_federation().await).is_empty(), "nothing offered");
    f.stop().await;
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
    assert!(records(&fed).is_empty(), "no offer to a US cluster: {:?}", records(&fed));
    assert!(target_jobs(&f.target).is_empty());
    let job = f.origin.cluster.server(f.origin.cluster.running().next().unwrap()).unwrap().raft().read(|s| {
        let mut j = s.job(&JobId::new("pii")).unwrap().clone();
        j.groups[0].count = 4;
        j
    });
    let offer = Message::ToTarget(ToTarget::Offer {
        id: "eu-west/pii/e999999-g-8".into(),
        job,
        indices: vec![8, 9, 10, 11],
        grace_ms: 2_000,
    });
    let addr = f.target.cluster.raft_addrs[&1];
    match outcome(&deliver(&fed, addr, vec![offer]).await) {
        Outcome::Refused { reason: Rejection::Jurisdiction, message } => assert!(message.contains("[us]"), "{message}"),
        other => panic!("expected a jurisdiction refusal, got {other:?}"),
    }
    assert!(target_jobs(&f.target).is_empty(), "nothing registered on the target");
    f.stop().await;
}

/// What the policy says, the code does (item 8): with `queue_wait > 3s` as
/// the only trigger, overflow is offered only once it has waited blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_wait_trigger_holds_overflow_back_until_it_has_waited() {
    let patient = policy("eu-west", "\"eu\"", &[("eu-central", true, true)], "")
        .replace("[overflow]\n", "[overflow]\nwhen = [\"queue_wait > 3s\"]\n");
    let f = two("eu-central", &["eu"], patient, policy("eu-central", "\"eu\"", &[("eu-west", true, true)], "")).await;
    let fed = f.origin.leader_federation().await;
    submit(&f.origin, spec("patient", 20, "")).await;
    until(Duration::from_secs(10), "placed what fits", || live(&f.origin, "patient") == 8).await;
    let blocked = std::time::Instant::now();
    while blocked.elapsed() < Duration::from_secs(1) {
        assert!(records(&fed).is_empty(), "offered before the queue wait: {:?}", records(&fed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until(Duration::from_secs(10), "offered once it waited", || {
        records(&fed).iter().any(|r| r.phase == Phase::Registered)
    })
    .await;
    assert!(blocked.elapsed() >= Duration::from_millis(1_500), "offered {:?} after blocking", blocked.elapsed());
    f.stop().await;
}

/// A service of 6 ("web", 1 GiB each) run 4 at eu-west (one node of 4
/// cores) and 2 at eu-central (4 nodes of 8), delegated; then a spare node
/// at eu-west, room for a new version beside the old, here only.
struct Delegated {
    origin: Gossiping,
    target: Gossiping,
    here: std::sync::Arc<cluster_core::server::Inner>,
    fed: std::sync::Arc<Federation>,
    delegation: Outbound,
}

/// "web" with `update` as its `[group.update]`, each instance `memory`.
fn rolling(update: &str, memory: &str) -> String {
    spec("web", 6, "")
        .replace("1GiB", memory)
        .replace("[[group.task]]", &format!("[group.update]\n{update}\n[[group.task]]"))
}

async fn delegated(update: &str) -> Delegated {
    let key = Key::generate();
    let ca = tls::create_ca("test", 1).unwrap();
    let setup = |name: &'static str, seeds: Vec<String>, policy: String| Setup::single(name, &key, &ca, seeds, policy);
    let mut origin =
        start(setup("eu-west", Vec::new(), policy("eu-west", "\"eu\"", &[("eu-central", true, true)], ""))).await;
    let seed = vec![origin.servers[0].member.local_addr().to_string()];
    let mut target =
        start(setup("eu-central", seed, policy("eu-central", "\"eu\"", &[("eu-west", true, true)], ""))).await;
    let here = origin.cluster.server(1).unwrap().inner.clone();
    origin.spawn(cluster_core::server::sim::run(here.clone(), nodes("small", 1, 4)));
    let inner = target.cluster.server(1).unwrap().inner.clone();
    target.spawn(cluster_core::server::sim::run(inner, nodes("big", 4, 8)));
    let watcher = origin.servers[0].member.clone();
    until(Duration::from_secs(15), "the origin sees the target's nodes", || {
        alive_with_nodes(&watcher.view(), "eu-central", 4)
    })
    .await;
    until(Duration::from_secs(10), "the origin's node registered", || here.raft.read(|s| s.nodes().len() == 1)).await;
    submit(&origin, rolling(update, "1GiB")).await;
    let fed = origin.leader_federation().await;
    let registered = || records(&fed).into_iter().find(|r| r.job == "web" && r.phase == Phase::Registered);
    until(Duration::from_secs(20), "two instances run at the peer", || {
        registered().is_some_and(|r| r.states.iter().filter(|(_, s)| *s == IndexState::Running).count() == 2)
    })
    .await;
    let delegation = registered().unwrap();
    assert_eq!(delegation.indices, vec![4, 5], "4 fit here, the rest went to the peer");
    origin.spawn(cluster_core::server::sim::run(here.clone(), nodes("spare", 1, 8)));
    until(Duration::from_secs(10), "the spare node registered", || {
        here.raft.read(|s| s.nodes().iter().any(|n| n.id.as_str().starts_with("spare")))
    })
    .await;
    Delegated { origin, target, here, fed, delegation }
}

/// One look at both clusters while "web" rolls out.
struct Rollout {
    /// Instances running here and at the peer.
    running: usize,
    /// Each delegated index has a healthy replacement here.
    replaced: bool,
    /// Healthy canaries of the current version here.
    healthy_canaries: usize,
    /// The deployment waits for its canaries to be promoted.
    awaits_promotion: bool,
    /// Instances of the delegation running at the peer.
    there: usize,
    record: Outbound,
    /// Exactly 6 live instances here, all of the current version.
    all_new: bool,
}

impl Delegated {
    fn look(&self) -> Rollout {
        use cluster_core::model::AllocStatus;
        use cluster_core::model::alloc::AllocHealth;
        let id = JobId::new(target_job_id(&self.delegation.id));
        // The peer is read first, then here (not at one instant): an
        // instance handed over between the two reads may count twice.
        let there = self
            .target
            .cluster
            .server(1)
            .unwrap()
            .raft()
            .read(|s| s.allocs_of_job(&id).filter(|a| a.status == AllocStatus::Running).count());
        let mut look = self.here.raft.read(|s| {
            let job = s.job(&JobId::new("web")).unwrap();
            let live: Vec<_> = s.allocs_of_job(&job.id).filter(|a| a.is_live()).collect();
            let new_healthy = |a: &&&cluster_core::model::Allocation| {
                a.job_version == job.version && a.health == Some(AllocHealth::Healthy)
            };
            Rollout {
                running: live.iter().filter(|a| a.status == AllocStatus::Running).count(),
                replaced: self
                    .delegation
                    .indices
                    .iter()
                    .all(|i| live.iter().filter(new_healthy).any(|a| a.index == *i)),
                healthy_canaries: live.iter().filter(new_healthy).filter(|a| a.canary).count(),
                awaits_promotion: s.latest_deployment(&job.id).is_some_and(|d| d.awaits_promotion("g")),
                there: 0,
                record: self.delegation.clone(),
                all_new: live.len() == 6 && live.iter().all(|a| a.job_version == job.version),
            }
        });
        look.running += there;
        look.there = there;
        look.record = records(&self.fed).into_iter().find(|r| r.id == self.delegation.id).unwrap();
        look
    }

    /// What "web" is, for a failure message.
    fn dump(&self) -> String {
        self.here.raft.read(|s| {
            let job = s.job(&JobId::new("web")).unwrap();
            let allocs: Vec<String> = (s.allocs_of_job(&job.id))
                .map(|a| {
                    let canary = if a.canary { " canary" } else { "" };
                    format!(
                        "{}[{}] v{} {:?}/{:?} {:?}{canary}",
                        a.id, a.index, a.job_version, a.desired, a.status, a.health
                    )
                })
                .collect();
            format!(
                "job v{}; deployment {:?}; eval {:?}; holds {:?}; allocs {allocs:#?}",
                job.version,
                s.latest_deployment(&job.id),
                s.job_eval(&job.id),
                s.holds()
            )
        })
    }

    /// Samples every 50 ms until the delegation is revoked and 6 instances
    /// of the new version run here; at every sample, the delegation is
    /// still registered unless each of its indexes has a healthy
    /// replacement. Returns the fewest instances that ran at a sample.
    async fn until_rolled_out(&self) -> usize {
        let started = std::time::Instant::now();
        let mut fewest = usize::MAX;
        loop {
            let look = self.look();
            fewest = fewest.min(look.running);
            if look.record.phase != Phase::Registered {
                assert!(
                    look.replaced,
                    "the delegation was let go before its indexes had healthy replacements: {:?}",
                    look.record
                );
            }
            if look.record.phase == Phase::Ended(End::Revoked) && look.there == 0 && look.all_new {
                return fewest;
            }
            if started.elapsed() >= Duration::from_secs(60) {
                panic!("not rolled out in 60 s: {:?}\n{}", look.record, self.dump());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Delegated instances follow their job's deployment (issue "Deployments
/// without downtime", item 1): a new version of a rolling service is
/// placed at the origin beside what a peer runs of the old one, at the
/// deployment's pace, and the delegation is let go only once each of its
/// indexes has a healthy replacement. Sampled all along: fewer than
/// `count - max_parallel` instances never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delegated_instances_are_replaced_by_the_deployment_before_they_stop() {
    let update = "max_parallel = 1\nmin_healthy_time = \"500ms\"\nhealthy_deadline = \"1m\"";
    let d = delegated(update).await;
    submit(&d.origin, rolling(update, "900MiB")).await;
    let fewest = d.until_rolled_out().await;
    assert!(fewest >= 5, "{fewest} instances ran at one moment; never fewer than count - max_parallel = 5");
    d.origin.stop().await;
    d.target.stop().await;
}

/// A blue/green deployment (`canary = count`) holds the delegation while
/// its canaries await promotion: there is a healthy canary at each
/// delegated index, yet the peer runs its instances of the old version on,
/// and after `job promote` the rollout ends as without canaries. Sampled
/// every 50 ms throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delegation_is_held_while_its_canaries_await_promotion() {
    let update = "max_parallel = 1\ncanary = 6\nmin_healthy_time = \"500ms\"\nhealthy_deadline = \"1m\"";
    let d = delegated(update).await;
    submit(&d.origin, rolling(update, "900MiB")).await;
    let started = std::time::Instant::now();
    let mut healthy_since = None;
    let mut fewest = usize::MAX;
    loop {
        let look = d.look();
        fewest = fewest.min(look.running);
        assert_eq!(look.record.phase, Phase::Registered, "let go while its canaries await promotion\n{}", d.dump());
        assert_eq!(look.there, 2, "the peer stopped an instance before promotion\n{}", d.dump());
        assert!(look.healthy_canaries <= 6, "more canaries than instances\n{}", d.dump());
        if look.healthy_canaries == 6 {
            assert!(look.awaits_promotion, "promoted without `job promote`\n{}", d.dump());
            let since = *healthy_since.get_or_insert_with(std::time::Instant::now);
            // Many times what the origin takes to let go of a replaced
            // index without canaries.
            if since.elapsed() >= Duration::from_secs(3) {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not 6 healthy canaries in 30 s\n{}", d.dump());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fewest >= 6, "{fewest} instances ran before promotion; canaries stop nothing");
    let client = d.origin.cluster.client();
    tokio::task::spawn_blocking(move || client.promote("web", None).unwrap()).await.unwrap();
    let fewest = d.until_rolled_out().await;
    assert!(fewest >= 5, "{fewest} instances ran at one moment after promotion; never fewer than 5");
    d.origin.stop().await;
    d.target.stop().await;
}
