//! An agent obeys only its own cluster's servers, and serves its logs only
//! to them (security review, rows 8 and 12): any other certificate of the
//! federation's CA (an agent's, another cluster's server) gets nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cluster_core::agent::driver::Drivers;
use cluster_core::agent::logs::Rotation;
use cluster_core::agent::rpc::{AgentReply, AgentService, AgentServiceReply};
use cluster_core::agent::{Agent, AgentOptions};
use cluster_core::diag::SourceFile;
use cluster_core::ids::AllocId;
use cluster_core::server::rpc::{ServerReply, ServerRpc};
use cluster_core::spec::parse_fleet;
use cluster_core::transport::quic::{QuicClient, QuicServer};
use cluster_core::transport::tls::{self, Identity, PemPair, Role};
use cluster_core::transport::{Handler, Transport};

/// A "server" that counts what agents ask it.
#[derive(Default)]
struct Counting {
    asked: AtomicU64,
}

#[async_trait]
impl Handler<ServerRpc> for Counting {
    async fn handle(&self, _from: Identity, _request: ServerRpc) -> ServerReply {
        self.asked.fetch_add(1, Ordering::SeqCst);
        ServerReply::Agent(AgentReply::Error { status: 400, message: "counted".into() })
    }
}

fn node() -> cluster_core::model::Node {
    let text = "[fleet]\nname = \"lab\"\n[[class]]\nname = \"n\"\ncount = 1\ncpu = 2\nmemory = \"2GiB\"\n";
    parse_fleet(&SourceFile::new("f.toml", text.to_string())).value.unwrap().nodes.remove(0)
}

/// Runs a `lab` agent against a server presenting `cert` for 1.5 s; how
/// many requests reached it.
async fn asked_by_agent(ca: &PemPair, cert: &PemPair, dir: &std::path::Path) -> u64 {
    let handler = Arc::new(Counting::default());
    let server =
        QuicServer::bind::<ServerRpc>("127.0.0.1:0".parse().unwrap(), &ca.cert_pem, cert, handler.clone()).unwrap();
    let own = tls::issue(ca, &Identity::new("lab", Role::Agent, "node-a"), 1).unwrap();
    let client: Arc<dyn Transport<ServerRpc>> = Arc::new(QuicClient::new(&ca.cert_pem, &own).unwrap());
    let options = AgentOptions {
        cluster: "lab".into(),
        node: node(),
        servers: vec![server.local_addr()],
        data_dir: dir.to_path_buf(),
        rotation: Rotation::default(),
        drivers: Drivers::new(None),
        supervisor: None,
        gc: Default::default(),
    };
    let agent = Agent::new(options, client);
    let _ = agent.run(tokio::time::sleep(Duration::from_millis(1_500))).await;
    handler.asked.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_talks_only_to_a_server_certificate_of_its_own_cluster() {
    let ca = tls::create_ca("lab", 1).unwrap();
    let base = std::env::temp_dir().join(format!("hanse-agent-identity-{}", std::process::id()));
    let cases = [
        ("a server of lab", Identity::new("lab", Role::Server, "s1"), true),
        ("an agent of lab", Identity::new("lab", Role::Agent, "rogue"), false),
        ("a server of evil", Identity::new("evil", Role::Server, "x1"), false),
    ];
    for (i, (what, identity, obeyed)) in cases.into_iter().enumerate() {
        let cert = tls::issue(&ca, &identity, 1).unwrap();
        let dir = base.join(i.to_string());
        let asked = asked_by_agent(&ca, &cert, &dir).await;
        if obeyed {
            assert!(asked > 0, "{what}: the agent never called its own server (the test could not fail)");
        } else {
            assert_eq!(asked, 0, "{what}: the agent sent it {asked} requests");
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test]
async fn an_agent_serves_logs_only_to_its_own_clusters_servers() {
    let dir = std::env::temp_dir().join(format!("hanse-agent-logs-{}", std::process::id()));
    let logs = dir.join("allocs").join(AllocId(7).to_string()).join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("t.stdout.0"), b"SECRET=hunter2\n").unwrap();
    let options = AgentOptions {
        cluster: "lab".into(),
        node: node(),
        servers: vec!["127.0.0.1:1".parse().unwrap()],
        data_dir: dir.clone(),
        rotation: Rotation::default(),
        drivers: Drivers::new(None),
        supervisor: None,
        gc: Default::default(),
    };
    let ca = tls::create_ca("lab", 1).unwrap();
    let own = tls::issue(&ca, &Identity::new("lab", Role::Agent, "node-a"), 1).unwrap();
    let agent = Agent::new(options, Arc::new(QuicClient::new(&ca.cert_pem, &own).unwrap()));
    let service = agent.log_service();
    let ask = |cluster: &str| {
        let from = Identity::new(cluster, Role::Server, "s1");
        let request =
            AgentService::Logs { alloc: AllocId(7), task: "t".into(), stderr: false, offset: 0, max: 1 << 20 };
        let service = service.clone();
        async move { service.handle(from, request).await }
    };
    match ask("evil").await {
        AgentServiceReply::Error(e) => assert!(e.contains("not a server of cluster lab"), "{e}"),
        other => panic!("another cluster's server read the logs: {other:?}"),
    }
    match ask("lab").await {
        AgentServiceReply::Logs(chunk) => assert_eq!(chunk.data, b"SECRET=hunter2\n"),
        other => panic!("its own server could not read the logs: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
