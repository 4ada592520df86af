//! One contract for every transport, run against the in-memory network and
//! against QUIC with mutual TLS on loopback; then what only TLS can refuse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use cluster_core::transport::mem::MemNetwork;
use cluster_core::transport::quic::{QuicClient, QuicServer};
use cluster_core::transport::tls::{self, Identity, PemPair, Role};
use cluster_core::transport::{FRAME_BYTES_MAX, Handler, Rpc, Transport, TransportError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum TestRpc {
    Echo(Vec<u8>),
    WhoAmI,
    /// Only servers may send it, as Raft messages will be.
    ServerOnly,
    /// Echoes after 300 ms, counting how many run at once.
    Slow(Vec<u8>),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum TestReply {
    Echo(Vec<u8>),
    You(Identity),
    Done,
}

impl Rpc for TestRpc {
    type Reply = TestReply;
    fn allowed(&self) -> &'static [Role] {
        match self {
            TestRpc::ServerOnly => &[Role::Server],
            _ => &[Role::Server, Role::Agent],
        }
    }
}

#[derive(Default)]
struct TestHandler {
    handled: AtomicU64,
    running: AtomicU64,
    most_at_once: AtomicU64,
}

#[async_trait]
impl Handler<TestRpc> for TestHandler {
    async fn handle(&self, from: Identity, request: TestRpc) -> TestReply {
        self.handled.fetch_add(1, Ordering::Relaxed);
        match request {
            TestRpc::Echo(b) => TestReply::Echo(b),
            TestRpc::WhoAmI => TestReply::You(from),
            TestRpc::ServerOnly => TestReply::Done,
            TestRpc::Slow(b) => {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_at_once.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                TestReply::Echo(b)
            }
        }
    }
}

fn agent() -> Identity {
    Identity::new("eu-west", Role::Agent, "node-1")
}

fn server() -> Identity {
    Identity::new("eu-west", Role::Server, "s2")
}

/// What every transport must do.
async fn contract(
    to: SocketAddr,
    nobody: SocketAddr,
    as_agent: Arc<dyn Transport<TestRpc>>,
    as_server: Arc<dyn Transport<TestRpc>>,
) {
    let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    assert_eq!(as_agent.call(to, TestRpc::Echo(payload.clone())).await, Ok(TestReply::Echo(payload)));

    assert_eq!(as_agent.call(to, TestRpc::WhoAmI).await, Ok(TestReply::You(agent())), "the server knows its caller");
    assert_eq!(as_server.call(to, TestRpc::WhoAmI).await, Ok(TestReply::You(server())));

    assert_eq!(as_agent.call(to, TestRpc::ServerOnly).await, Err(TransportError::Forbidden(to, Role::Agent)));
    assert_eq!(as_server.call(to, TestRpc::ServerOnly).await, Ok(TestReply::Done));

    let calls: Vec<_> = (0..64u32)
        .map(|i| {
            let t = as_agent.clone();
            tokio::spawn(async move { (i, t.call(to, TestRpc::Echo(i.to_be_bytes().to_vec())).await) })
        })
        .collect();
    for c in calls {
        let (i, reply) = c.await.unwrap();
        assert_eq!(reply, Ok(TestReply::Echo(i.to_be_bytes().to_vec())), "concurrent call {i}");
    }

    let huge = vec![0u8; FRAME_BYTES_MAX + 1];
    assert!(matches!(as_agent.call(to, TestRpc::Echo(huge)).await, Err(TransportError::FrameTooLarge(_))));

    assert!(as_agent.call(nobody, TestRpc::WhoAmI).await.is_err(), "nothing listens there");
}

#[tokio::test]
async fn in_memory_transport_keeps_the_contract() {
    let net = MemNetwork::new();
    let to: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    net.serve::<TestRpc>(to, Arc::new(TestHandler::default()));
    contract(to, "127.0.0.1:7001".parse().unwrap(), Arc::new(net.client(agent())), Arc::new(net.client(server())))
        .await;
}

struct Pki {
    ca: PemPair,
    server: PemPair,
    agent: PemPair,
    caller: PemPair,
}

fn pki() -> Pki {
    let ca = tls::create_ca("test", 1).unwrap();
    Pki {
        server: tls::issue(&ca, &Identity::new("eu-west", Role::Server, "s1"), 1).unwrap(),
        agent: tls::issue(&ca, &agent(), 1).unwrap(),
        caller: tls::issue(&ca, &server(), 1).unwrap(),
        ca,
    }
}

fn serve(pki: &Pki) -> (QuicServer, Arc<TestHandler>) {
    let handler = Arc::new(TestHandler::default());
    let server =
        QuicServer::bind::<TestRpc>("127.0.0.1:0".parse().unwrap(), &pki.ca.cert_pem, &pki.server, handler.clone())
            .unwrap();
    (server, handler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_with_mutual_tls_keeps_the_contract() {
    let pki = pki();
    let (server, _) = serve(&pki);
    // A port nothing listens on: bind and drop a UDP socket.
    let nobody = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let as_agent = Arc::new(QuicClient::new(&pki.ca.cert_pem, &pki.agent).unwrap());
    let as_server = Arc::new(QuicClient::new(&pki.ca.cert_pem, &pki.caller).unwrap());
    contract(server.local_addr(), nobody, as_agent, as_server).await;
}

/// Refusal shows on the first request, not at connect (TLS 1.3), so each
/// case makes one and checks the handler never ran.
async fn refused(server: &QuicServer, handler: &TestHandler, client: QuicClient, what: &str) {
    let before = handler.handled.load(Ordering::Relaxed);
    let result = Transport::<TestRpc>::call(&client, server.local_addr(), TestRpc::WhoAmI).await;
    assert!(
        matches!(result, Err(TransportError::Refused(..) | TransportError::Closed(..))),
        "{what}: expected a refusal, got {result:?}"
    );
    assert_eq!(handler.handled.load(Ordering::Relaxed), before, "{what}: the handler ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_refuses_certificates_from_another_ca_none_or_expired() {
    let pki = pki();
    let (server, handler) = serve(&pki);

    let other_ca = tls::create_ca("other", 1).unwrap();
    let foreign = tls::issue(&other_ca, &agent(), 1).unwrap();
    // The foreign client trusts our CA (so it would accept our server) but
    // presents a certificate our CA did not sign.
    refused(&server, &handler, QuicClient::new(&pki.ca.cert_pem, &foreign).unwrap(), "another CA").await;

    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca.cert_pem.as_bytes()) {
            r.add(c.unwrap()).unwrap();
        }
        r
    };
    let mut no_cert = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    no_cert.alpn_protocols = vec![tls::ALPN.to_vec()];
    refused(&server, &handler, QuicClient::with_rustls(no_cert).unwrap(), "no certificate").await;

    let long_ago = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    let expired = tls::issue_between(&pki.ca, &agent(), long_ago, long_ago + time::Duration::days(1)).unwrap();
    refused(&server, &handler, QuicClient::new(&pki.ca.cert_pem, &expired).unwrap(), "expired").await;

    // And a good client still gets through the same server.
    let good = QuicClient::new(&pki.ca.cert_pem, &pki.agent).unwrap();
    assert_eq!(
        Transport::<TestRpc>::call(&good, server.local_addr(), TestRpc::WhoAmI).await,
        Ok(TestReply::You(agent()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_server_from_another_ca() {
    let pki = pki();
    let other_ca = tls::create_ca("other", 1).unwrap();
    let impostor = tls::issue(&other_ca, &Identity::new("eu-west", Role::Server, "s1"), 1).unwrap();
    let handler = Arc::new(TestHandler::default());
    let server =
        QuicServer::bind::<TestRpc>("127.0.0.1:0".parse().unwrap(), &other_ca.cert_pem, &impostor, handler.clone())
            .unwrap();
    let client = QuicClient::new(&pki.ca.cert_pem, &pki.agent).unwrap();
    let result = Transport::<TestRpc>::call(&client, server.local_addr(), TestRpc::WhoAmI).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(handler.handled.load(Ordering::Relaxed), 0);
}

/// An agent's certificate cannot make a server hold a large frame
/// (security review, row 15: agents' 16 MiB frames held in memory), and a
/// connection's frames wait for room in its budget instead of piling up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_are_held_within_a_memory_budget() {
    use cluster_core::transport::quic::FrameBudget;
    let pki = pki();
    let (server, handler) = serve(&pki);
    let big = vec![7u8; 5 << 20];
    let as_agent = QuicClient::new(&pki.ca.cert_pem, &pki.agent).unwrap();
    let refused = Transport::<TestRpc>::call(&as_agent, server.local_addr(), TestRpc::Echo(big.clone())).await;
    assert!(refused.is_err(), "an agent's 5 MiB frame was served");
    assert_eq!(handler.handled.load(Ordering::Relaxed), 0);
    let as_server = QuicClient::new(&pki.ca.cert_pem, &pki.caller).unwrap();
    let served = Transport::<TestRpc>::call(&as_server, server.local_addr(), TestRpc::Echo(big.clone())).await;
    assert_eq!(served, Ok(TestReply::Echo(big)), "a server's 5 MiB frame is fine");

    // A 1 MiB budget per connection: three 700 KB frames on one connection
    // are answered one after another, never side by side.
    let handler = Arc::new(TestHandler::default());
    let budget = FrameBudget { per_connection: 1 << 20, ..FrameBudget::default() };
    let tight = QuicServer::bind_with::<TestRpc>(
        "127.0.0.1:0".parse().unwrap(),
        &pki.ca.cert_pem,
        &pki.server,
        handler.clone(),
        budget,
    )
    .unwrap();
    let client = Arc::new(QuicClient::new(&pki.ca.cert_pem, &pki.caller).unwrap());
    // One connection for all three: opened first, then reused.
    let warm = Transport::<TestRpc>::call(&*client, tight.local_addr(), TestRpc::WhoAmI).await;
    assert!(warm.is_ok(), "{warm:?}");
    let calls: Vec<_> = (0..3u8)
        .map(|i| {
            let (client, to) = (client.clone(), tight.local_addr());
            tokio::spawn(
                async move { Transport::<TestRpc>::call(&*client, to, TestRpc::Slow(vec![i; 700 << 10])).await },
            )
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), Ok(TestReply::Echo(vec![i as u8; 700 << 10])));
    }
    assert_eq!(handler.most_at_once.load(Ordering::SeqCst), 1, "frames over the budget were held side by side");
}
