//! Identities bound to certificates, checked by the view (pure): anyone
//! holding the federation's gossip key could publish any cluster's name,
//! capacity and jurisdictions, and a second server under a taken name was
//! merged. Now a member is shown only if its certificate, from the
//! federation's CA, names the cluster and server it claims, and a summary
//! counts only if that certificate signed it and allows its jurisdictions.

use std::net::SocketAddr;
use std::sync::Arc;

use cluster_core::transport::tls::{self, Identity, PemPair, Role, Signer, Trust};
use gossip::identity::{Claim, identity_value, signed_left, signed_summary};
use gossip::summary::ClusterSummary;
use gossip::view::{FederationView, Liveness, MemberState, keys};

const FED: &str = "hanse";

struct Server {
    signer: Signer,
    cluster: &'static str,
    node_id: String,
    addr: SocketAddr,
}

impl Server {
    fn new(ca: &PemPair, cluster: &'static str, jurisdictions: &[&str], port: u16) -> Server {
        let js: Vec<String> = jurisdictions.iter().map(|j| j.to_string()).collect();
        let pair = tls::issue_server(ca, &Identity::new(cluster, Role::Server, "s1"), 1, &[], &js).unwrap();
        Server {
            signer: Signer::new(&pair).unwrap(),
            cluster,
            node_id: format!("{cluster}/s1"),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    fn claim(&self) -> Claim<'_> {
        Claim {
            federation: FED,
            node_id: &self.node_id,
            generation: 1,
            addr: self.addr,
            cluster: self.cluster,
            server: "s1",
            rpc_addr: None,
            region: "r",
        }
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The member `server` gossips, claiming `claims` as its cluster, signed
/// by `server`'s certificate, with `summary` (signed, or tampered after).
fn member(server: &Server, claims: &'static str, summary: Option<&str>) -> MemberState<'static> {
    let node_id = leak(format!("{claims}/s1"));
    let claim = Claim { node_id, cluster: claims, ..server.claim() };
    let values = vec![
        (keys::CLUSTER, claims),
        (keys::SERVER, "s1"),
        (keys::REGION, "r"),
        (keys::IDENTITY, leak(identity_value(&server.signer, &claim))),
    ];
    MemberState {
        node_id,
        generation: 1,
        addr: server.addr,
        live: true,
        heartbeat: 1,
        values,
        version: None,
        summary: summary.map(|s| (1, leak(s.to_string()))),
    }
}

fn summary(cluster: &str, jurisdictions: &[&str]) -> String {
    ClusterSummary {
        cluster: cluster.into(),
        term: 1,
        version: 1,
        nodes_ready: 6,
        jurisdictions: jurisdictions.iter().map(|j| j.to_string()).collect(),
        ..Default::default()
    }
    .encode()
    .unwrap()
}

fn view(ca: &PemPair) -> FederationView {
    FederationView::new(1_000).with_trust(FED, Arc::new(Trust::new(&ca.cert_pem).unwrap()))
}

/// Certificates are checked against the time: now.
fn now() -> u64 {
    gossip::transport::unix_ms()
}

#[test]
fn a_member_with_its_own_certificate_is_shown_with_its_signed_summary() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let us = Server::new(&ca, "us-east", &["us"], 7001);
    let text = signed_summary(&us.signer, &us.claim(), &summary("us-east", &["us"]));
    let mut v = view(&ca);
    v.update(&[member(&us, "us-east", Some(&text))], now());
    assert!(v.refused.is_empty(), "{:?}", v.refused);
    let c = v.cluster("us-east").unwrap();
    assert_eq!(c.liveness, Liveness::Alive);
    assert_eq!(c.summary.as_ref().unwrap().nodes_ready, 6);
}

/// Puts into `m`'s values the identity `signer` signs for `m`'s claim: a
/// forgery with another cluster's key.
fn forge_identity(m: &mut MemberState<'static>, signer: &Server) {
    let claims = m.values.iter().find(|(k, _)| *k == keys::CLUSTER).unwrap().1;
    let forged = member(signer, claims, None);
    let identity = forged.values.iter().find(|(k, _)| *k == keys::IDENTITY).unwrap().1;
    for (k, value) in m.values.iter_mut() {
        if *k == keys::IDENTITY {
            *value = identity;
        }
    }
}

#[test]
fn an_identity_is_checked_again_when_the_members_values_move() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let us = Server::new(&ca, "us-east", &["us"], 7001);
    let eu = Server::new(&ca, "eu-west", &["eu"], 7002);
    let mut m = member(&us, "us-east", None);
    m.version = Some((0, 3));
    let mut v = view(&ca);
    v.update(std::slice::from_ref(&m), now());
    assert!(v.refused.is_empty(), "{:?}", v.refused);
    // The member's values move to an identity signed by another cluster's
    // key (chitchat gives them a new version): refused at once.
    forge_identity(&mut m, &eu);
    m.version = Some((0, 4));
    v.update(std::slice::from_ref(&m), now());
    assert_eq!(v.refused.len(), 1, "{:?}", v.refused);
    assert!(v.cluster("us-east").is_none_or(|c| c.servers.values().all(|s| !s.live)));
}

#[test]
fn a_member_forgotten_and_learnt_again_at_its_old_version_is_checked_again() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let us = Server::new(&ca, "us-east", &["us"], 7001);
    let eu = Server::new(&ca, "eu-west", &["eu"], 7002);
    let mut m = member(&us, "us-east", None);
    m.version = Some((2, 9));
    let mut v = view(&ca);
    v.update(std::slice::from_ref(&m), now());
    assert!(v.refused.is_empty(), "{:?}", v.refused);
    // It dies; chitchat forgets it and learns it again from a peer with
    // the gossip key, refilled up to the same version with an identity
    // another cluster signed.
    m.live = false;
    v.update(std::slice::from_ref(&m), now());
    forge_identity(&mut m, &eu);
    m.live = true;
    v.update(std::slice::from_ref(&m), now());
    assert_eq!(v.refused.len(), 1, "the old check is not reused: {:?}", v.refused);
}

#[test]
fn an_impostor_with_another_clusters_certificate_is_refused_never_merged() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let us = Server::new(&ca, "us-east", &["us"], 7001);
    let eu = Server::new(&ca, "eu-west", &["eu"], 7002);
    let real = signed_summary(&us.signer, &us.claim(), &summary("us-east", &["us"]));
    // eu-west's server claims to be us-east/s1, signing with its own key.
    let impostor = member(&eu, "us-east", None);
    let mut v = view(&ca);
    v.update(&[member(&us, "us-east", Some(&real)), impostor], now());
    assert_eq!(v.refused.len(), 1, "{:?}", v.refused);
    assert!(v.refused[0].reason.contains("names eu-west/server/s1"), "{:?}", v.refused);
    assert_eq!(v.refused[0].addr, eu.addr, "the impostor is named by its address");
    assert_eq!(v.refused_total, 1);
    assert_eq!(v.cluster("us-east").unwrap().servers.len(), 1);
    assert!(v.conflicts.is_empty(), "a refused member is no contender");
}

#[test]
fn a_member_without_a_signed_identity_or_from_another_ca_is_refused() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let other_ca = tls::create_ca(FED, 1).unwrap();
    let stranger = Server::new(&other_ca, "us-east", &["us"], 7003);
    let mut bare = member(&stranger, "us-east", None);
    bare.values.retain(|(k, _)| *k != keys::IDENTITY);
    let mut v = view(&ca);
    v.update(&[bare], now());
    assert!(v.clusters.is_empty());
    assert!(v.refused[0].reason.contains("no signed identity"), "{:?}", v.refused);
    let mut v = view(&ca);
    v.update(&[member(&stranger, "us-east", None)], now());
    assert!(v.clusters.is_empty());
    assert!(v.refused[0].reason.contains("certificate"), "{:?}", v.refused);
}

#[test]
fn a_summary_is_counted_only_if_signed_by_its_member_and_within_its_jurisdictions() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let us = Server::new(&ca, "us-east", &["us"], 7001);
    // Claims the EU: its certificate allows only us.
    let overreach = signed_summary(&us.signer, &us.claim(), &summary("us-east", &["us", "eu"]));
    let mut v = view(&ca);
    v.update(&[member(&us, "us-east", Some(&overreach))], now());
    assert!(v.cluster("us-east").unwrap().summary.is_none());
    assert!(v.refused[0].reason.contains("jurisdictions [\"eu\"]"), "{:?}", v.refused);

    // Signed for another summary, or not signed at all.
    let signed = signed_summary(&us.signer, &us.claim(), &summary("us-east", &["us"]));
    let (_, sig) = signed.split_once('.').unwrap();
    let swapped = format!("{}.{sig}", summary("us-east", &[]));
    let unsigned = summary("us-east", &["us"]);
    for bad in [swapped, unsigned] {
        let mut v = view(&ca);
        v.update(&[member(&us, "us-east", Some(&bad))], now());
        assert!(v.cluster("us-east").unwrap().summary.is_none());
        assert!(v.refused[0].reason.contains("signature does not verify"), "{:?}", v.refused);
    }
}

#[test]
fn only_a_signed_left_is_believed() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let us = Server::new(&ca, "us-east", &["us"], 7001);
    let mut forged = member(&us, "us-east", None);
    forged.values.push((keys::LEFT, "1"));
    let mut v = view(&ca);
    v.update(&[forged], now());
    assert_eq!(v.cluster("us-east").unwrap().liveness, Liveness::Alive, "an unsigned left is ignored");
    let mut signed = member(&us, "us-east", None);
    signed.values.push((keys::LEFT, leak(signed_left(&us.signer, &us.claim()))));
    let mut v = view(&ca);
    v.update(&[signed], now());
    assert_eq!(v.cluster("us-east").unwrap().liveness, Liveness::Left);
}

#[test]
fn a_role_forged_onto_a_server_does_not_hide_it() {
    let ca = tls::create_ca(FED, 1).unwrap();
    let us = Server::new(&ca, "us-east", &["us"], 7001);
    let mut m = member(&us, "us-east", None);
    m.values.push((keys::ROLE, "observer"));
    let mut v = view(&ca);
    v.update(&[m], now());
    assert_eq!(v.cluster("us-east").map(|c| c.liveness), Some(Liveness::Alive), "a verified identity is a server");
}
