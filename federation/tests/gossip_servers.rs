//! Cluster servers in the federation's gossip: two clusters on loopback
//! (real QUIC, redb, HTTP and UDP gossip); each leader publishes its
//! cluster's summary; the other cluster sees it, and sees the next
//! leader's summary after the first one stops.

mod common;

use std::time::Duration;

use common::{Setup, alive_with_nodes, nodes, start, until};
use gossip::Key;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_leader_publishes_its_cluster_and_the_next_leader_takes_over() {
    let key = Key::generate();
    let setup = |name, servers, seeds, jurisdictions| Setup {
        name,
        servers,
        key: &key,
        ca: None,
        seeds,
        jurisdictions,
        policy: None,
        http: Vec::new(),
        data_dir: None,
        region: None,
        token: None,
    };
    let mut eu = start(setup("eu-west", 3, Vec::new(), &["eu"])).await;
    let seed = eu.servers[0].member.local_addr().to_string();
    let us = start(setup("us-east", 1, vec![seed], &["us"])).await;
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
