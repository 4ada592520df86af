//! Cluster servers in the federation's gossip: two clusters on loopback
//! (real QUIC, redb, HTTP and UDP gossip); each leader publishes its
//! cluster's summary; the other cluster sees it, and sees the next
//! leader's summary after the first one stops.

mod common;

use std::time::Duration;

use common::{Gossiping, Setup, alive_with_nodes, nodes, start, until};
use gossip::Key;

/// eu-west (3 servers) and us-east (1, seeded by eu-west), gossiping
/// with `key`.
async fn two_clusters(key: &Key) -> (Gossiping, Gossiping) {
    let setup = |name, servers, seeds, jurisdictions| Setup {
        name,
        servers,
        key,
        ca: None,
        seeds,
        jurisdictions,
        policy: None,
        http: Vec::new(),
        data_dir: None,
        region: None,
        token: None,
    };
    let eu = start(setup("eu-west", 3, Vec::new(), &["eu"])).await;
    let seed = eu.servers[0].member.local_addr().to_string();
    let us = start(setup("us-east", 1, vec![seed], &["us"])).await;
    (eu, us)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_leader_publishes_its_cluster_and_the_next_leader_takes_over() {
    let key = Key::generate();
    let (mut eu, us) = two_clusters(&key).await;
    let leader = eu.cluster.leader(Duration::from_secs(10)).await.unwrap();
    let term = eu.cluster.server(leader).unwrap().raft().status().term;

    let client = eu.cluster.client();
    tokio::task::spawn_blocking(move || client.register_nodes(&nodes("m", 30, 8)).unwrap()).await.unwrap();
    let watcher = us.servers[0].member.clone();
    until(Duration::from_secs(15), "us-east sees eu-west's 30 nodes", || {
        alive_with_nodes(&watcher.view(), "eu-west", 30)
    })
    .await;
    let view = watcher.view();
    let e = view.cluster("eu-west").unwrap();
    assert_eq!(e.summary.as_ref().unwrap().term, term);
    assert_eq!(e.leader.as_deref(), Some(format!("s{leader}").as_str()), "the summary is the leader's");
    let eu_view = eu.servers[0].member.clone();
    until(Duration::from_secs(15), "eu-west sees us-east", || alive_with_nodes(&eu_view.view(), "us-east", 0)).await;

    // The leader stops; the next one publishes under its newer term.
    eu.stop_server(leader).await;
    until(Duration::from_secs(20), "the next leader's summary arrives", || {
        let v = watcher.view();
        alive_with_nodes(&v, "eu-west", 30) && v.cluster("eu-west").unwrap().summary.as_ref().unwrap().term > term
    })
    .await;
    eu.stop().await;
    us.stop().await;
}

/// A key is used only once every live server of the federation holds it,
/// whichever cluster asks; a server restarted with its old key file takes
/// the ring its cluster committed; and two clusters that rotate step by
/// step never leave a datagram unopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_is_used_only_once_every_cluster_holds_it() {
    use federation::keyring::{KeyChange, KeyOp, KeyringView};
    use std::sync::atomic::Ordering;
    let (old, new) = (Key::generate(), Key::generate());
    let (mut eu, us) = two_clusters(&old).await;
    let watcher = eu.servers[0].member.clone();
    until(Duration::from_secs(15), "eu-west sees us-east", || alive_with_nodes(&watcher.view(), "us-east", 0)).await;
    let change = |cluster: &cluster_core::server::local::LocalCluster, op, key: String| {
        let client = cluster.client();
        async move {
            tokio::task::spawn_blocking(move || {
                client.post::<KeyringView>("/v1/federation/keyring", &KeyChange { op, key, force: false })
            })
            .await
            .unwrap()
        }
    };
    let hex = |k: &Key| format!("{:08x}", k.id());
    let unopened = |g: &Gossiping| {
        g.servers
            .iter()
            .map(|s| {
                let m = s.member.metrics();
                m.rejected_unknown_key.load(Ordering::Relaxed) + m.rejected_bad_tag.load(Ordering::Relaxed)
            })
            .sum::<u64>()
    };
    let before = unopened(&eu) + unopened(&us);

    // Without a token nothing changes.
    let anonymous = eu.cluster.client().with_token(None);
    let key = new.to_text();
    let denied = tokio::task::spawn_blocking(move || {
        anonymous.post::<KeyringView>("/v1/federation/keyring", &KeyChange { op: KeyOp::Install, key, force: false })
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(denied.status(), Some(401), "{denied}");
    change(&eu.cluster, KeyOp::Install, new.to_text()).await.unwrap();
    // Every eu-west server holds it once the entry applies; the trail names
    // the step and the key's id, never the key.
    until(Duration::from_secs(15), "every eu-west server holds the new key", || {
        eu.servers.iter().all(|s| s.member.keyring().read().unwrap().ids() == vec![old.id(), new.id()])
    })
    .await;
    let client = eu.cluster.client();
    let trail: serde_json::Value =
        tokio::task::spawn_blocking(move || client.get("/v1/operator/audit?limit=100")).await.unwrap().unwrap();
    let trail = trail.to_string();
    assert!(trail.contains(&format!("gossip key install {}", hex(&new))), "{trail}");
    assert!(!trail.contains(&new.to_text()), "the audit trail holds the key");
    // us-east does not hold the new key yet: eu-west may not seal with it.
    let refused = change(&eu.cluster, KeyOp::Use, hex(&new)).await.unwrap_err();
    assert_eq!(refused.status(), Some(409), "{refused}");
    assert!(refused.to_string().contains("us-east/s1"), "names who lacks it: {refused}");
    for s in &eu.servers {
        assert_eq!(s.member.keyring().read().unwrap().primary().id(), old.id(), "nothing changed");
    }

    change(&us.cluster, KeyOp::Install, new.to_text()).await.unwrap();
    until(Duration::from_secs(15), "eu-west's gossip says us-east holds the new key", || {
        let v = watcher.view();
        v.cluster("us-east").is_some_and(|c| c.servers.values().all(|s| s.keys.contains(&hex(&new))))
    })
    .await;
    change(&eu.cluster, KeyOp::Use, hex(&new)).await.unwrap();
    until(Duration::from_secs(15), "every eu-west server seals with the new key", || {
        eu.servers.iter().all(|s| s.member.keyring().read().unwrap().primary().id() == new.id())
    })
    .await;

    assert_eq!(unopened(&eu) + unopened(&us), before, "a datagram went unopened while the new key came into use");

    // A server that restarts with the old key file follows the committed ring.
    // Until it has applied its log it cannot open the new key's datagrams,
    // so the count starts again after it has.
    let id = eu.servers[2].id;
    eu.stop_server(id).await;
    eu.restart_server(id).await;
    let back = eu.servers.iter().find(|s| s.id == id).unwrap().member.clone();
    until(Duration::from_secs(15), "the restarted server takes the committed ring", || {
        back.keyring().read().unwrap().ids() == vec![new.id(), old.id()]
    })
    .await;

    let before = unopened(&eu) + unopened(&us);
    // us-east seals with the old key still: eu-west may not drop it yet.
    let refused = change(&eu.cluster, KeyOp::Remove, hex(&old)).await.unwrap_err();
    assert_eq!(refused.status(), Some(409), "{refused}");
    change(&us.cluster, KeyOp::Use, hex(&new)).await.unwrap();
    until(Duration::from_secs(15), "eu-west's gossip says us-east seals with the new key", || {
        let v = watcher.view();
        v.cluster("us-east").is_some_and(|c| c.servers.values().all(|s| s.keys.first() == Some(&hex(&new))))
    })
    .await;
    // The restarted server's gossip said it sealed with the old key until
    // it applied the committed ring: removal, on either cluster, waits
    // until every server's view has heard otherwise.
    until(Duration::from_secs(15), "every server hears that every server seals with the new key", || {
        eu.servers.iter().chain(&us.servers).all(|s| {
            let v = s.member.view();
            ["eu-west", "us-east"]
                .iter()
                .all(|c| v.cluster(c).is_some_and(|c| c.servers.values().all(|s| s.keys.first() == Some(&hex(&new)))))
        })
    })
    .await;
    change(&eu.cluster, KeyOp::Remove, hex(&old)).await.unwrap();
    change(&us.cluster, KeyOp::Remove, hex(&old)).await.unwrap();
    until(Duration::from_secs(15), "each server holds the new key only", || {
        eu.servers.iter().chain(&us.servers).all(|s| s.member.keyring().read().unwrap().ids() == vec![new.id()])
    })
    .await;
    // Still one federation, sealed with the new key only.
    let us_watch = us.servers[0].member.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    until(Duration::from_secs(15), "us-east still sees eu-west", || alive_with_nodes(&us_watch.view(), "eu-west", 0))
        .await;
    assert_eq!(unopened(&eu) + unopened(&us), before, "a datagram went unopened during the rotation");
    eu.stop().await;
    us.stop().await;
}
