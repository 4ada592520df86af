//! A 3-server cluster on loopback (QUIC with mutual TLS, redb with fsync,
//! HTTP API), with simulated nodes registered through the API. Every wait
//! is bounded; every cluster stops at the end of its test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_core::diag::SourceFile;
use cluster_core::model::Node;
use cluster_core::server::ServerOptions;
use cluster_core::server::api::AllocUpdate;
use cluster_core::server::client::Client;
use cluster_core::server::http::BODY_BYTES_MAX;
use cluster_core::server::local::LocalCluster;
use cluster_core::spec::parse_fleet;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hanse-server-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `count` nodes of 4 cores and 8 GiB in three zones.
fn fleet(count: usize) -> Vec<Node> {
    let text = format!(
        r#"
[fleet]
name = "test"
region = "eu-west-1"
jurisdictions = ["eu"]

[[class]]
name = "cloud-m"
count = {count}
cpu = 4
memory = "8GiB"
disk = "100GiB"
arch = "x86_64"
environment = "cloud"
execution_model = "container"
zones = ["a", "b", "c"]
cost_per_hour = 0.2
"#
    );
    parse_fleet(&SourceFile::new("test.toml", text)).value.expect("the test fleet checks").nodes
}

fn spec(name: &str, count: u32, cpu: &str) -> String {
    format!(
        r#"
[job]
name = "{name}"
type = "service"

[[group]]
name = "app"
count = {count}

[[group.task]]
name = "main"
driver = "mock"
resources = {{ cpu = "{cpu}", memory = "256MiB" }}
"#
    )
}

/// A 3-server cluster serving plain HTTP: these tests speak raw HTTP to
/// it (HTTPS has its own test).
async fn start(name: &str, ttl: Duration, grace: Duration) -> LocalCluster {
    let options =
        ServerOptions { heartbeat_ttl: ttl, heartbeat_grace: grace, http_tls: false, ..ServerOptions::new(name, "s") };
    let c =
        LocalCluster::start(name, &dir(name), 3, options, Duration::from_millis(100)).await.expect("cluster starts");
    c.leader(Duration::from_secs(10)).await.expect("a leader within 10 s");
    c
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("the blocking part does not panic")
}

/// `GET http://ADDR/PATH` with `token`, whatever the status: the status,
/// the JSON body and the headers (to read what the client hides).
fn raw_get(addr: std::net::SocketAddr, token: &str, path: &str) -> (u16, serde_json::Value, ureq::http::HeaderMap) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut r = agent.get(format!("http://{addr}{path}")).header("x-hanse-token", token).call().unwrap();
    let body: serde_json::Value = r.body_mut().read_json().unwrap();
    (r.status().as_u16(), body, r.headers().clone())
}

/// Waits (5 s at most) until every server has applied `n` allocations.
async fn every_server_holds(c: &LocalCluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts: Vec<usize> =
            c.running().map(|id| c.server(id).unwrap().raft().read(|s| s.allocs().count())).collect();
        if counts.iter().all(|x| *x == n) {
            return;
        }
        assert!(Instant::now() < deadline, "servers disagree: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn follower_of(c: &LocalCluster, leader: u64) -> u64 {
    c.running().find(|id| *id != leader).expect("a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_submitted_through_a_follower_is_placed() {
    let c = start("follower", Duration::from_secs(30), Duration::from_secs(30)).await;
    let leader = c.leader(Duration::from_secs(10)).await.unwrap();
    let follower = follower_of(&c, leader);
    let client = c.client_of(follower);
    let placed = blocking(move || {
        client.register_nodes(&fleet(6)).expect("nodes register through a follower");
        let reg = client.submit(&spec("web", 5, "500m"), "web.toml").expect("submitted");
        let eval = client.eval(reg.eval, Duration::from_secs(10)).expect("the evaluation is known");
        assert_eq!((eval.status.as_str(), eval.placed), ("complete", 5), "{eval:?}");
        let status = client.job("web").expect("job status");
        assert_eq!(status.summary.status, "running");
        status.allocations.iter().map(|a| a.node.clone()).collect::<Vec<_>>()
    })
    .await;
    assert_eq!(placed.len(), 5);
    assert!(
        c.server(follower).unwrap().inner.metrics.writes_forwarded.get() >= 2,
        "the follower forwarded the writes to the leader"
    );
    // Every server applied the same allocations.
    every_server_holds(&c, 5).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_node_has_its_allocations_replaced_within_ttl_grace_and_2_s() {
    let (ttl, grace) = (Duration::from_millis(1_000), Duration::from_millis(1_000));
    let c = start("silent", ttl, grace).await;
    let client = c.client();
    let nodes = fleet(4);
    let ids: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
    let (victim, allocs_on_victim, silent_since) = {
        let client = client.clone();
        let ids = ids.clone();
        blocking(move || {
            client.register_nodes(&nodes).unwrap();
            let reg = client.submit(&spec("spread", 8, "500m"), "spread.toml").unwrap();
            assert_eq!(client.eval(reg.eval, Duration::from_secs(10)).unwrap().placed, 8);
            let allocs = client.job("spread").unwrap().allocations;
            let victim = allocs[0].node.clone();
            let on_victim: BTreeSet<u64> = allocs.iter().filter(|a| a.node == victim).map(|a| a.id).collect();
            // The others keep heartbeating; the victim falls silent now.
            let alive: Vec<String> = ids.iter().filter(|n| **n != victim).cloned().collect();
            let silent_since = Instant::now();
            let c2 = client.clone();
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(10);
                while Instant::now() < end {
                    let _ = c2.heartbeat(&alive);
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
            (victim, on_victim, silent_since)
        })
        .await
    };
    assert!(!allocs_on_victim.is_empty());
    let bound = ttl + grace + Duration::from_secs(2);
    let replaced_after = blocking(move || {
        loop {
            let s = client.job("spread").unwrap();
            let lost = s.allocations.iter().filter(|a| allocs_on_victim.contains(&a.id) && a.status == "lost").count();
            let live_elsewhere =
                s.allocations.iter().filter(|a| a.desired == "run" && a.status != "lost" && a.node != victim).count();
            if lost == allocs_on_victim.len() && live_elsewhere == 8 {
                return silent_since.elapsed();
            }
            assert!(silent_since.elapsed() < bound + Duration::from_secs(3), "not replaced in time: {s:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await;
    assert!(replaced_after <= bound, "replaced after {replaced_after:?}, bound {bound:?}");
    assert!(replaced_after >= ttl, "a node is not down before its TTL: {replaced_after:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_from_8_clients_never_over_commit_a_node() {
    let c = start("overcommit", Duration::from_secs(30), Duration::from_secs(30)).await;
    let addresses = c.addresses();
    let token = c.token().map(str::to_string);
    // 6 nodes of 4 cores: 24 cores. 8 clients ask for 8 x 6 x 3 x 0.75 = 108.
    let submitted = blocking(move || {
        let client = Client::new(&addresses).with_token(token.as_deref());
        client.register_nodes(&fleet(6)).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let client = Client::new(&addresses).with_token(token.as_deref());
                std::thread::spawn(move || {
                    let mut evals = Vec::new();
                    for j in 0..6 {
                        let reg = client.submit(&spec(&format!("c{t}-j{j}"), 3, "750m"), "c.toml").unwrap();
                        evals.push(reg.eval);
                    }
                    for e in evals {
                        let _ = client.eval(e, Duration::from_secs(10));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        client.jobs().unwrap().len()
    })
    .await;
    assert_eq!(submitted, 48);
    // Wait for the queue to drain, then check every server's state.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = c.leader(Duration::from_secs(5)).await.unwrap();
    while c.server(leader).unwrap().raft().read(|s| s.pending_evals().count()) > 0 {
        assert!(Instant::now() < deadline, "evaluations still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in c.running() {
        c.server(id).unwrap().raft().read(|s| {
            let placed = s.allocs().filter(|a| a.holds_resources()).count();
            assert!(placed >= 24, "the cluster was filled: {placed}");
            for (i, usage) in s.recomputed_usage().iter().enumerate() {
                let node = &s.nodes()[i];
                assert!(
                    usage.res.cpu_millis <= node.capacity.cpu_millis,
                    "{} over-committed: {} of {} millicores",
                    node.id,
                    usage.res.cpu_millis,
                    node.capacity.cpu_millis
                );
            }
            assert!(s.blocked_evals().count() > 0, "what did not fit waits for capacity");
        });
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_mid_burst_loses_no_acknowledged_job_and_leaves_none_half_placed() {
    let mut c = start("burst", Duration::from_secs(30), Duration::from_secs(30)).await;
    let addresses = c.addresses();
    let token = c.token().map(str::to_string);
    {
        let client = Client::new(&addresses).with_token(token.as_deref());
        blocking(move || client.register_nodes(&fleet(60)).unwrap()).await;
    }
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_secs(6);
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (addresses, acked, token) = (addresses.clone(), acked.clone(), token.clone());
            std::thread::spawn(move || {
                let client = Client::new(&addresses).with_token(token.as_deref());
                let mut n = 0;
                while Instant::now() < stop_at && n < 150 {
                    let name = format!("b{t}-{n}");
                    // An error is fine mid-failover; only acknowledged jobs count.
                    if let Ok(reg) = client.submit(&spec(&name, 2, "100m"), "b.toml") {
                        acked.lock().unwrap().insert(name, reg.eval);
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    // Kill the leader a quarter of the way into the burst.
    let deadline = Instant::now() + Duration::from_secs(5);
    while acked.lock().unwrap().len() < 150 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let old = c.leader(Duration::from_secs(5)).await.unwrap();
    let acked_before_kill = acked.lock().unwrap().len();
    c.stop_server(old).await;
    blocking(move || clients.into_iter().for_each(|t| t.join().unwrap())).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked_before_kill > 0 && acked.len() > acked_before_kill, "submissions went on: {}", acked.len());
    let new = c.leader(Duration::from_secs(10)).await.expect("a new leader");
    assert_ne!(new, old);
    // Every acknowledged job is known, and ends fully placed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let half: Vec<String> = c.server(new).unwrap().raft().read(|s| {
            acked
                .keys()
                .filter(|name| {
                    let id = cluster_core::ids::JobId::new(name.as_str());
                    assert!(s.job(&id).is_some(), "acknowledged job {name} lost");
                    s.allocs_of_job(&id).filter(|a| a.is_live()).count() != 2
                })
                .cloned()
                .collect()
        });
        if half.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} jobs not fully placed, e.g. {:?}",
            half.len(),
            &half[..half.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_4xx_with_a_message_a_person_can_act_on() {
    let c = start("bad", Duration::from_secs(30), Duration::from_secs(30)).await;
    // Through a follower: errors made on the leader travel back through
    // the forward, and must arrive intact.
    let follower = follower_of(&c, c.leader(Duration::from_secs(5)).await.unwrap());
    let base = format!("http://{}", c.http_addrs[&follower]);
    let token = c.token().expect("ACLs are on").to_string();
    let client = c.client();
    blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let expect = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, status: u16, words: &str| {
            let mut r = r.unwrap();
            let got = r.status().as_u16();
            let body: serde_json::Value = r.body_mut().read_json().expect("errors are JSON");
            assert_eq!(got, status, "expected {status} for `{words}`: {body}");
            let message = body["message"].as_str().expect("a message").to_string();
            assert!(message.contains(words), "`{message}` should say `{words}`");
            body
        };
        expect(
            agent.put(format!("{base}/v1/jobs")).header("x-hanse-token", &token).header("content-type", "application/json").send("not json"),
            400,
            "JSON",
        );
        let body = expect(
            agent
                .put(format!("{base}/v1/jobs")).header("x-hanse-token", &token)
                .send_json(serde_json::json!({"spec": "[job]\nnam = 1\n", "source": "x.toml"})),
            400,
            "does not check",
        );
        assert!(body["diagnostics"].as_array().is_some_and(|d| d.iter().any(|d| d["line"] == 2)), "{body}");
        expect(agent.get(format!("{base}/v1/jobs/nope")).header("x-hanse-token", &token).call(), 404, "no job `nope`");
        expect(agent.get(format!("{base}/v1/nodes/nope")).header("x-hanse-token", &token).call(), 404, "no node");
        expect(agent.get(format!("{base}/v1/allocations/zz")).header("x-hanse-token", &token).call(), 400, "not an allocation id");
        expect(agent.get(format!("{base}/v2/whatever")).header("x-hanse-token", &token).call(), 404, "/v1/");
        expect(agent.get(format!("{base}/v1/evaluations/999?wait=NaN")).header("x-hanse-token", &token).call(), 404, "no evaluation");
        // An oversized body is refused once the limit is passed. Written
        // from a thread of its own: the server stops reading at the limit.
        {
            use std::io::{Read, Write};
            let mut tcp = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut writer = tcp.try_clone().unwrap();
            let len = BODY_BYTES_MAX + 100_000;
            let secret = token.clone();
            std::thread::spawn(move || {
                let head = format!(
                    "PUT /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Hanse-Token: {secret}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
                );
                let _ = writer.write_all(head.as_bytes());
                let _ = writer.write_all(&vec![b'x'; len]);
            });
            let mut answer = vec![0u8; 4096];
            let n = tcp.read(&mut answer).unwrap();
            let answer = String::from_utf8_lossy(&answer[..n]);
            assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
            assert!(answer.contains("over the limit"), "{answer}");
        }
        expect(
            agent
                .post(format!("{base}/v1/allocations/status")).header("x-hanse-token", &token)
                .send_json(serde_json::json!({"updates": [{"id": 1, "status": "fine"}]})),
            400,
            "not a status",
        );
        expect(agent.delete(format!("{base}/v1/operator/raft/peers/9")).header("x-hanse-token", &token).call(), 404, "not a voter");
        expect(agent.post(format!("{base}/v1/nodes/nope/drain")).header("x-hanse-token", &token).send_empty(), 404, "unknown node");
        // The client turns the same into typed errors.
        let e = client.alloc_status(vec![AllocUpdate { id: 1, status: "nope".into() }]).unwrap_err();
        assert_eq!(e.status(), Some(400));
    })
    .await;
    c.stop().await;
}

/// What a web page could make a browser send is refused and changes
/// nothing (security review, row 3): a cross-site "simple" POST (text/plain,
/// a foreign Origin), a foreign Host (DNS rebinding), a body not declared
/// JSON. The CLI's own requests, and names listed in `http_hosts`, pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_a_web_page_could_send_are_refused_and_change_nothing() {
    let options =
        ServerOptions { http_hosts: vec!["hanse.internal".into()], http_tls: false, ..ServerOptions::new("web", "s") };
    let c = LocalCluster::start("web", &dir("web"), 1, options, Duration::from_millis(100)).await.expect("starts");
    c.leader(Duration::from_secs(10)).await.expect("a leader");
    let addr = c.http_addrs[&1];
    let client = c.client_of(1);
    let token = c.token().expect("ACLs are on").to_string();
    blocking(move || {
        client.register_nodes(&fleet(1)).expect("the CLI's own requests pass");
        let node = fleet(1)[0].id.to_string();
        let drain = format!("http://{addr}/v1/nodes/{node}/drain");
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let status = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>| {
            let mut r = r.unwrap();
            let body: serde_json::Value = r.body_mut().read_json().expect("errors are JSON");
            (r.status().as_u16(), body["message"].as_str().unwrap_or_default().to_string())
        };
        let csrf = agent
            .post(&drain)
            .header("x-hanse-token", &token)
            .header("content-type", "text/plain")
            .header("origin", "http://evil.example")
            .send(r#"{"drain": true}"#);
        let (code, message) = status(csrf);
        assert_eq!(code, 403, "{message}");
        assert!(message.contains("evil.example"), "{message}");
        let rebound = agent
            .post(&drain)
            .header("x-hanse-token", &token)
            .header("host", "rebind.evil.example")
            .header("content-type", "application/json")
            .send(r#"{"drain": true}"#);
        let (code, message) = status(rebound);
        assert_eq!(code, 403, "{message}");
        assert!(message.contains("http_hosts"), "{message}");
        let plain = agent
            .post(&drain)
            .header("x-hanse-token", &token)
            .header("content-type", "text/plain")
            .send(r#"{"drain": true}"#);
        assert_eq!(status(plain).0, 415);
        let node_view = client.node(&node).expect("the node");
        assert!(!node_view.node.draining, "a refused request drained the node");
        // Each refusal is in the audit trail, denied or failed, with its token.
        let trail: Vec<serde_json::Value> = client.get("/v1/operator/audit?limit=100").expect("the audit trail");
        let refused: Vec<u64> = trail
            .iter()
            .filter(|r| r["route"].as_str().is_some_and(|x| x.ends_with("/drain")))
            .map(|r| r["status"].as_u64().unwrap())
            .collect();
        assert_eq!(refused, vec![403, 403, 415], "{trail:?}");
        // A listed name passes (and a real drain then happens).
        let named = agent
            .post(&drain)
            .header("x-hanse-token", &token)
            .header("host", format!("hanse.internal:{}", addr.port()))
            .header("content-type", "application/json")
            .send(r#"{"drain": true}"#)
            .unwrap();
        assert_eq!(named.status().as_u16(), 200);
        assert!(client.node(&node).expect("the node").node.draining, "the listed host's drain did not apply");
    })
    .await;
    c.stop().await;
}

/// A client that dribbles its request head is cut off after the header
/// timeout, and one address cannot hold every connection (security review,
/// row 18: 10,300 slow connections exhausted the server's descriptors).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_one_address_holds_a_bounded_share() {
    use cluster_core::server::http::{CONNECTIONS_PER_CLIENT_MAX, HEADER_READ_TIMEOUT};
    use std::io::{Read, Write};
    let options = ServerOptions { http_tls: false, ..ServerOptions::new("slow", "s") };
    let c = LocalCluster::start("slow", &dir("slow"), 1, options, Duration::from_millis(100)).await.expect("starts");
    c.leader(Duration::from_secs(10)).await.expect("a leader");
    let addr = c.http_addrs[&1];
    let client = c.client_of(1);
    blocking(move || {
        // A keep-alive connection left idle after one answer is closed too.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut first = [0u8; 4096];
        let n = idle.read(&mut first).unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..n]));
        let idle_since = Instant::now();
        let started = Instant::now();
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
        slow.set_read_timeout(Some(HEADER_READ_TIMEOUT + Duration::from_secs(10))).unwrap();
        let mut answer = Vec::new();
        // Closed by the server: end of stream (after a 408, or none), or a
        // reset; a read that times out is not a close.
        let reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
        let cut = slow.read_to_end(&mut answer).as_ref().map_or_else(reset, |_| true);
        let waited = started.elapsed();
        assert!(cut, "the slow connection was not closed");
        assert!(waited < HEADER_READ_TIMEOUT + Duration::from_secs(5), "cut off only after {waited:?}");
        assert!(waited + Duration::from_secs(1) >= HEADER_READ_TIMEOUT, "cut off early, after {waited:?}");
        idle.set_read_timeout(Some(HEADER_READ_TIMEOUT + Duration::from_secs(5))).unwrap();
        let closed = match idle.read(&mut first) {
            Ok(n) => n == 0,
            Err(e) => reset(&e),
        };
        assert!(closed, "an idle keep-alive connection was kept open");
        assert!(
            idle_since.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(5),
            "closed after {:?}",
            idle_since.elapsed()
        );

        let held: Vec<std::net::TcpStream> =
            (0..CONNECTIONS_PER_CLIENT_MAX).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        let mut extra = std::net::TcpStream::connect(addr).unwrap();
        extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        let closed = match extra.read(&mut byte) {
            Ok(n) => n == 0,
            Err(e) => reset(&e),
        };
        assert!(closed, "connection {} from one address was served", CONNECTIONS_PER_CLIENT_MAX + 1);
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while client.leader().is_err() {
            assert!(Instant::now() < deadline, "the API did not come back once the held connections closed");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await;
    c.stop().await;
}

/// Security review, row 16: a valid job whose plan is over the log's entry
/// limit (64 groups, long names) was retried forever and no other job was
/// placed. It is now planned in parts: every instance is placed, and a job
/// submitted after it is placed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_plan_is_over_the_entry_limit_is_placed_in_parts_and_blocks_no_one() {
    let c = start("huge", Duration::from_secs(30), Duration::from_secs(30)).await;
    // The leader's: the plans counter counts where the workers run.
    let client = c.client_of(c.leader(Duration::from_secs(5)).await.unwrap());
    blocking(move || {
        let mut nodes = fleet(40);
        for (i, n) in nodes.iter_mut().enumerate() {
            n.id = cluster_core::ids::NodeId::new(format!("{}-{i:05}", "n".repeat(120)));
        }
        client.register_nodes(&nodes).unwrap();
        let mut spec = "[job]\nname = \"huge\"\ntype = \"batch\"\n".to_string();
        for g in 0..64 {
            spec.push_str(&format!(
                "[[group]]\nname = \"{g:0>64}\"\ncount = 400\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\n\
                 run_for = \"1h\"\nresources = {{ cpu = \"1m\", memory = \"1MiB\" }}\n"
            ));
        }
        // A dry run plans one part and says how much it left (row 17: each
        // dry run of such a job held its whole plan in memory).
        let dry = client.plan(&spec, "huge.toml").expect("a dry run");
        assert_eq!(dry.placed, cluster_core::scheduler::PLAN_CHANGES_MAX);
        assert_eq!(dry.placed as u64 + dry.deferred, 64 * 400);
        assert!(dry.placements.len() <= cluster_core::scheduler::PLAN_CHANGES_MAX);
        let huge = client.submit(&spec, "huge.toml").expect("the job registers");
        let small = client.submit(&self::spec("after", 2, "100m"), "after.toml").expect("registers");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (h, s) = (client.eval(huge.eval, Duration::from_secs(5)), client.eval(small.eval, Duration::ZERO));
            let done =
                |e: &Result<cluster_core::server::api::EvalView, _>| e.as_ref().is_ok_and(|e| e.status == "complete");
            if done(&h) && done(&s) {
                break;
            }
            let brief = |e: &Result<cluster_core::server::api::EvalView, _>| {
                e.as_ref().map(|e| format!("{} placed {}", e.status, e.placed)).unwrap_or_default()
            };
            assert!(Instant::now() < deadline, "not placed within 120 s: huge {}, after {}", brief(&h), brief(&s));
        }
        let placed = client.job("huge").unwrap().allocations.len();
        assert_eq!(placed, 64 * 400);
        let metrics = client.get_text("/metrics").unwrap();
        let applied: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("hanse_plans_applied_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the plans counter");
        assert!(applied >= 2.0, "planned in parts: {applied} plans");
    })
    .await;
    c.stop().await;
}

/// The API serves HTTPS by default, with the server's certificate from the
/// federation CA: a client that trusts that CA gets answers; plain HTTP,
/// a client trusting no CA or another CA's get none, with a hint; a client
/// that never completes its TLS handshake is cut off like a slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_speaks_https_signed_by_the_federation_ca() {
    use cluster_core::server::http::HEADER_READ_TIMEOUT;
    use std::io::Read;
    let c =
        LocalCluster::start("https", &dir("https"), 1, ServerOptions::new("https", "s"), Duration::from_millis(100))
            .await
            .expect("starts");
    c.leader(Duration::from_secs(10)).await.expect("a leader");
    let (client, addr, url) = (c.client(), c.http_addrs[&1], c.url(1));
    let token = c.token().unwrap().to_string();
    let other_ca = cluster_core::transport::tls::create_ca("other", 1).unwrap();
    blocking(move || {
        assert!(url.starts_with("https://"), "{url}");
        assert!(client.health().is_ok(), "a client with the CA");
        client.register_nodes(&fleet(1)).expect("a write over HTTPS");
        let plain = Client::new(&format!("http://{addr}")).with_token(Some(&token)).health().unwrap_err();
        assert!(plain.to_string().contains("HANSE_CACERT"), "{plain}");
        let no_ca = Client::new(&url).with_token(Some(&token)).health().unwrap_err();
        assert!(no_ca.to_string().contains("HANSE_CACERT"), "{no_ca}");
        let wrong = Client::new(&url).with_ca(&other_ca.cert_pem).unwrap().health().unwrap_err();
        assert!(wrong.to_string().contains("HANSE_CACERT"), "{wrong}");
        // A TCP connection that never starts its handshake is closed.
        let started = Instant::now();
        let mut silent = std::net::TcpStream::connect(addr).unwrap();
        silent.set_read_timeout(Some(HEADER_READ_TIMEOUT + Duration::from_secs(10))).unwrap();
        let mut byte = [0u8; 1];
        let closed = match silent.read(&mut byte) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed && started.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(5), "{:?}", started.elapsed());
    })
    .await;
    c.stop().await;
}

/// `PUT /v1/system/gc` (`hanse system gc`): a stopped job whose instances
/// ended goes with its allocations on every server, the live one stays;
/// without a token nothing is collected (security review row 19).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn system_gc_drops_a_stopped_job_on_every_server_and_keeps_the_live_one() {
    let c = start("gc", Duration::from_secs(30), Duration::from_secs(30)).await;
    c.leader(Duration::from_secs(10)).await.unwrap();
    let client = c.client();
    let anonymous = c.client().with_token(None);
    blocking(move || {
        client.register_nodes(&fleet(4)).expect("nodes register");
        for name in ["keep", "old"] {
            let reg = client.submit(&spec(name, 3, "500m"), "j.toml").expect("submitted");
            client.eval(reg.eval, Duration::from_secs(10)).expect("placed");
        }
        client.stop("old").expect("stopped");
        let ended = client.job("old").expect("status").allocations;
        let updates = ended
            .iter()
            .map(|a| cluster_core::server::api::AllocUpdate { id: a.id, status: "complete".into() })
            .collect();
        client.alloc_status(updates).expect("reported");
        let denied = anonymous.put::<serde_json::Value>("/v1/system/gc", &serde_json::json!({})).unwrap_err();
        assert_eq!(denied.status(), Some(401));
        assert!(client.job("old").is_ok(), "nothing was collected without a token");
        let counts: cluster_core::state::GcCounts =
            client.put("/v1/system/gc", &serde_json::json!({})).expect("collected");
        assert_eq!((counts.jobs, counts.allocs), (1, 3), "{counts:?}");
        assert_eq!(client.job("old").unwrap_err().status(), Some(404));
        assert_eq!(client.job("keep").expect("kept").allocations.len(), 3);
    })
    .await;
    every_server_holds(&c, 3).await;
    c.stop().await;
}

/// Lists come a page at a time (security review row 19: one answer held
/// every allocation, 21.9 MB): at most 1,000 unless asked, the next token
/// in a header; the client follows the tokens and gets each item once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_are_paged_and_filtered_and_the_client_follows_the_pages() {
    use cluster_core::server::http::{NEXT_TOKEN, PAGE_DEFAULT};
    let c = start("pages", Duration::from_secs(30), Duration::from_secs(30)).await;
    let client = c.client();
    let addr = c.http_addrs[&c.leader(Duration::from_secs(10)).await.unwrap()];
    let token = c.token().expect("ACLs are on").to_string();
    blocking(move || {
        client.register_nodes(&fleet(40)).expect("nodes register");
        let reg = client.submit(&spec("many", 1_001, "100m"), "many.toml").expect("submitted");
        client.eval(reg.eval, Duration::from_secs(30)).expect("placed");
        let reg = client.submit(&spec("few", 3, "100m"), "few.toml").expect("submitted");
        client.eval(reg.eval, Duration::from_secs(10)).expect("placed");

        let get = |path: &str| {
            let (status, body, headers) = raw_get(addr, &token, path);
            (status, body, headers.get(NEXT_TOKEN).map(|v| v.to_str().unwrap().to_string()))
        };
        let (_, first, next) = get("/v1/allocations");
        assert_eq!(first.as_array().unwrap().len(), PAGE_DEFAULT, "unasked, a page is capped");
        assert!(next.is_some(), "and names where the next starts");
        // One page of allocation ids from `token` (none: the first), and the
        // token of the next.
        let page = |per_page: usize, token: &Option<String>| {
            let path = match token {
                Some(t) => format!("/v1/allocations?per_page={per_page}&next_token={t}"),
                None => format!("/v1/allocations?per_page={per_page}"),
            };
            let (_, body, next) = get(&path);
            (body.as_array().unwrap().iter().map(|a| a["id"].as_u64().unwrap()).collect::<Vec<u64>>(), next)
        };
        let (mut seen, mut token, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let (ids, next) = page(300, &token);
            seen.extend(ids);
            pages += 1;
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!((seen.len(), pages), (1_004, 4));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in id order, none twice");
        // Filters, and what is refused.
        let (_, few, next) = get("/v1/allocations?job=few&status=pending");
        assert_eq!((few.as_array().unwrap().len(), next), (3, None));
        let (_, jobs, next) = get("/v1/jobs?per_page=1");
        assert_eq!((jobs[0]["id"].as_str(), next.as_deref()), (Some("few"), Some("many")));
        let (_, down, _) = get("/v1/nodes?status=down");
        assert_eq!(down.as_array().unwrap().len(), 0);
        let (status, body, _) = get("/v1/allocations?per_page=0");
        assert_eq!(status, 400, "{body}");
        // The client pages on its own, and follows the tokens.
        assert_eq!(client.allocs().expect("every allocation").len(), 1_004);
        let small: Vec<serde_json::Value> = client.get_all("/v1/allocations?per_page=97").expect("every page");
        let ids: Vec<u64> = small.iter().map(|a| a["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, seen, "11 pages of 97, in order, each allocation once");
        assert_eq!(client.nodes().expect("every node").len(), 40);

        // While the state changes under it (jobs placed between pages, one
        // stopped and collected, its allocations with it), paging still
        // returns each allocation at most once, in order, and every one
        // that was there throughout.
        let (mut during, mut token, mut round) = (Vec::new(), None::<String>, 0);
        loop {
            let (ids, next) = page(250, &token);
            during.extend(ids);
            let reg = client.submit(&spec(&format!("late{round}"), 2, "100m"), "late.toml").expect("submitted");
            client.eval(reg.eval, Duration::from_secs(10)).expect("placed");
            if round == 1 {
                client.stop("few").expect("stopped");
                let ended = client.job("few").expect("status").allocations;
                let updates = ended.iter().map(|a| AllocUpdate { id: a.id, status: "complete".into() }).collect();
                client.alloc_status(updates).expect("reported");
                let counts: cluster_core::state::GcCounts =
                    client.put("/v1/system/gc", &serde_json::json!({})).expect("collected");
                assert_eq!((counts.jobs, counts.allocs), (1, 3), "{counts:?}");
            }
            round += 1;
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert!(during.windows(2).all(|w| w[0] < w[1]), "an allocation came twice, or out of order");
        let now: Vec<u64> = client.allocs().expect("every allocation").iter().map(|a| a.id).collect();
        let throughout: Vec<&u64> = seen.iter().filter(|id| now.contains(id)).collect();
        assert_eq!(throughout.len(), seen.len() - 3, "only the collected job's three went");
        assert!(throughout.iter().all(|id| during.contains(id)), "an allocation there throughout went missing");
        assert!(during.iter().all(|id| now.contains(id) || seen.contains(id)), "an allocation that never was");
        assert!(during.len() > seen.len(), "the allocations placed meanwhile, after the token, were listed too");
    })
    .await;
    c.stop().await;
}

/// Blocking reads (Nomad's blocking queries): `?index=N` with the index a
/// read answered returns at the next change, not before; with no change it
/// returns after `wait`, at the same index; a bad index is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocking_read_returns_at_the_next_change_and_not_before() {
    use cluster_core::server::http::INDEX;
    let c = start("block", Duration::from_secs(30), Duration::from_secs(30)).await;
    let client = c.client();
    let addr = c.http_addrs[&c.leader(Duration::from_secs(10)).await.unwrap()];
    let token = c.token().expect("ACLs are on").to_string();
    blocking(move || {
        client.register_nodes(&fleet(4)).expect("nodes register");
        let get = move |path: &str| {
            let (status, body, headers) = raw_get(addr, &token, path);
            (status, body, headers.get(INDEX).map_or(0, |v| v.to_str().unwrap().parse::<u64>().unwrap()))
        };
        let (_, jobs, mut index) = get("/v1/jobs");
        assert!(index > 0 && jobs.as_array().unwrap().is_empty());
        // Early only for a change: the cluster may still be writing (the
        // nodes' registrations settle), and then the index says so.
        for attempt in 0.. {
            let started = Instant::now();
            let (_, _, got) = get(&format!("/v1/jobs?index={index}&wait=1s"));
            if got == index {
                assert!(started.elapsed() >= Duration::from_secs(1), "returned before anything changed");
                break;
            }
            assert!(got > index && attempt < 20, "index {index} then {got}: it never settled");
            index = got;
        }
        let waiter = {
            let get = get.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                (get(&format!("/v1/jobs?index={index}&wait=30s")), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        client.submit(&spec("late", 1, "100m"), "late.toml").expect("submitted");
        let ((_, jobs, newer), took) = waiter.join().unwrap();
        assert!(took < Duration::from_secs(10), "the change did not wake it: {took:?}");
        assert!(took >= Duration::from_millis(250), "returned before the change: {took:?}");
        assert!(newer > index && jobs.to_string().contains("late"), "{jobs}");
        let (status, body, _) = get("/v1/jobs/late?index=x");
        assert_eq!(status, 400, "{body}");
    })
    .await;
    c.stop().await;
}

/// Backup and restore: a state saved from one cluster and restored on a
/// fresh one (an empty disk) serves the same jobs, allocations, nodes and
/// tokens, on every server; a body that is not a whole archive, an
/// archive of another cluster without `other_cluster`, or a caller
/// without a management token (an `operator` token included) changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saved_state_restored_on_a_fresh_cluster_serves_the_same_jobs_nodes_and_tokens() {
    use cluster_core::server::http::RestoreReport;
    use cluster_core::state::archive;
    let a = start("snap-a", Duration::from_secs(60), Duration::from_secs(60)).await;
    let client = a.client();
    let (saved, jobs, web, nodes) = blocking(move || {
        client.register_nodes(&fleet(4)).expect("nodes register");
        for (name, count) in [("web", 3), ("api", 2)] {
            let reg = client.submit(&spec(name, count, "500m"), "j.toml").expect("submitted");
            client.eval(reg.eval, Duration::from_secs(10)).expect("placed");
        }
        let saved = client.get_bytes("/v1/operator/snapshot", 1 << 30).expect("saved");
        (saved, client.jobs().unwrap(), client.job("web").unwrap(), client.nodes().unwrap())
    })
    .await;
    let token_a = a.token().unwrap().to_string();
    a.stop().await;
    let summary = archive::inspect(saved.as_slice()).expect("a whole archive");
    let c = summary.header.counts;
    assert_eq!((c.jobs, c.allocations, c.nodes), (2, 5, 4), "{c:?}");
    let h = &summary.header;
    assert!(h.index > 0 && h.term > 0 && h.peers.len() == 3 && h.cluster == "snap-a", "{h:?}");

    let b = start("snap-b", Duration::from_secs(60), Duration::from_secs(60)).await;
    let (client_b, anonymous) = (b.client(), b.client().with_token(None));
    let with_a = b.client().with_token(Some(&token_a));
    let base = b.client();
    blocking(move || {
        use cluster_core::server::access::{PolicyApply, TokenCreate, TokenSecret};
        let policy = "[[namespace]]\nname = \"*\"\ncapabilities = [\"operator\", \"read\"]\n";
        let _: serde_json::Value =
            client_b.put("/v1/acl/policies/ops", &PolicyApply { policy: policy.into(), source: None }).expect("policy");
        let ops: TokenSecret = client_b
            .post(
                "/v1/acl/tokens",
                &TokenCreate { name: "ops".into(), policies: vec!["ops".into()], management: false },
            )
            .expect("token");
        let operator = base.with_token(Some(&ops.secret));
        let path = "/v1/operator/snapshot?other_cluster=true";
        let denied = anonymous.put_bytes::<RestoreReport>(path, &saved).unwrap_err();
        assert_eq!(denied.status(), Some(401));
        let denied = operator.put_bytes::<RestoreReport>(path, &saved).unwrap_err();
        assert_eq!(denied.status(), Some(403), "an operator token restored a state: {denied}");
        let denied = operator.get_bytes("/v1/operator/snapshot", 1 << 30).unwrap_err();
        assert_eq!(denied.status(), Some(403), "an operator token read every token's hash: {denied}");
        let mut cut = saved.clone();
        cut.truncate(saved.len() - 1);
        let bad = client_b.put_bytes::<RestoreReport>(path, &cut).unwrap_err();
        assert_eq!(bad.status(), Some(400), "{bad}");
        assert!(bad.to_string().contains("truncated"), "{bad}");
        let other = client_b.put_bytes::<RestoreReport>("/v1/operator/snapshot", &saved).unwrap_err();
        assert_eq!(other.status(), Some(409), "{other}");
        assert!(other.to_string().contains("snap-a"), "{other}");
        assert!(client_b.jobs().unwrap().is_empty(), "a refused restore changed the state");

        let report: RestoreReport = client_b.put_bytes(path, &saved).expect("restored");
        assert_eq!((report.restored.jobs, report.restored.allocations, report.restored.nodes), (2, 5, 4));
        // The tokens are the saved cluster's now: its secret works, and the
        // fresh cluster's own is gone (a read answered by a follower that
        // has not applied the restore yet still knows it: within 5 s).
        let refused = (0..50).any(|_| {
            let gone = client_b.jobs().is_err_and(|e| e.status() == Some(403));
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            gone
        });
        assert!(refused, "the fresh cluster's token still works 5 s after the restore");
        let ids = |v: &[cluster_core::server::api::JobSummary]| {
            v.iter().map(|j| (j.id.clone(), j.status.clone())).collect::<Vec<_>>()
        };
        assert_eq!(ids(&with_a.jobs().unwrap()), ids(&jobs));
        let back = with_a.job("web").unwrap();
        let allocs = |s: &cluster_core::server::api::JobStatus| {
            s.allocations.iter().map(|x| (x.id, x.node.clone(), x.status.clone())).collect::<Vec<_>>()
        };
        assert_eq!(allocs(&back), allocs(&web));
        let node_ids = |v: &[cluster_core::server::api::NodeView]| {
            v.iter().map(|n| (n.id.clone(), n.status.clone(), n.allocs)).collect::<Vec<_>>()
        };
        assert_eq!(node_ids(&with_a.nodes().unwrap()), node_ids(&nodes));
    })
    .await;
    every_server_holds(&b, 5).await;
    b.stop().await;
}

/// Every static word of every route (read from the routers' sources):
/// a job and a node named after it can be read and stopped or drained at
/// `/v1/jobs/NAME` and `/v1/nodes/NAME`, or the name is refused when it
/// is submitted, with a message saying why. Nothing runs that cannot be
/// reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_job_or_node_name_is_shadowed_by_a_route() {
    use cluster_core::spec::job::{RESERVED_JOB_NAMES, RESERVED_NODE_IDS};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources =
        ["src/server/http.rs", "src/server/access.rs", "../federation/src/api.rs", "../federation/src/keyring.rs"];
    let mut words = std::collections::BTreeSet::new();
    for file in sources {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for route in text.split(".route(\"").skip(1).filter_map(|r| r.split('"').next()) {
            words.extend(
                route.split('/').filter(|w| !w.is_empty() && !w.starts_with('{') && *w != "v1").map(String::from),
            );
        }
    }
    assert!(words.len() >= 25 && words.contains("plan") && words.contains("heartbeat"), "{words:?}");
    let c = start("words", Duration::from_secs(60), Duration::from_secs(60)).await;
    let client = c.client();
    blocking(move || {
        client.register_nodes(&fleet(4)).expect("nodes register");
        for word in &words {
            match client.submit(&spec(word, 1, "50m"), "w.toml") {
                Err(e) => {
                    assert!(RESERVED_JOB_NAMES.contains(&word.as_str()), "job `{word}` refused: {e}");
                    assert!(e.to_string().contains("word of the API"), "{e}");
                }
                Ok(reg) => {
                    assert!(!RESERVED_JOB_NAMES.contains(&word.as_str()), "job `{word}` was taken");
                    client.eval(reg.eval, Duration::from_secs(10)).expect("placed");
                    let status = client.job(word).unwrap_or_else(|e| panic!("job `{word}` cannot be read: {e}"));
                    assert_eq!(status.summary.id, *word);
                    client.stop(word).unwrap_or_else(|e| panic!("job `{word}` cannot be stopped: {e}"));
                    assert_eq!(client.job(word).unwrap().summary.status, "stopped", "job `{word}`");
                }
            }
            let mut node = fleet(1).remove(0);
            node.id = word.as_str().into();
            match client.register_node(&node) {
                Err(e) => {
                    assert!(RESERVED_NODE_IDS.contains(&word.as_str()), "node `{word}` refused: {e}");
                    assert!(e.to_string().contains("word of the API"), "{e}");
                }
                Ok(_) => {
                    assert!(!RESERVED_NODE_IDS.contains(&word.as_str()), "node `{word}` was taken");
                    let n = client.node(word).unwrap_or_else(|e| panic!("node `{word}` cannot be read: {e}"));
                    assert_eq!(n.node.id, *word);
                    client.drain(word, true, None).unwrap_or_else(|e| panic!("node `{word}` cannot be drained: {e}"));
                }
            }
        }
    })
    .await;
    c.stop().await;
}
