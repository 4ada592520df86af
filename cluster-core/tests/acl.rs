//! ACL tokens in front of the HTTP API, on real clusters on loopback:
//! every route refuses a caller without a token or without the capability,
//! and changes nothing; the security review's unauthenticated attacks
//! (rows 1, 2, 4, 5, 6) fail; namespaces bound what a token touches.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster_core::diag::SourceFile;
use cluster_core::model::Node;
use cluster_core::server::ServerOptions;
use cluster_core::server::access::{PolicyApply, TokenCreate, TokenSecret};
use cluster_core::server::client::Client;
use cluster_core::server::local::LocalCluster;
use cluster_core::spec::parse_fleet;
use serde_json::{Value, json};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hanse-acl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn fleet(count: usize) -> Vec<Node> {
    let text = format!(
        "[fleet]\nname = \"t\"\nregion = \"r\"\n[[class]]\nname = \"m\"\ncount = {count}\ncpu = 4\nmemory = \"8GiB\"\n\
         disk = \"10GiB\"\narch = \"x86_64\"\nenvironment = \"cloud\"\nexecution_model = \"container\"\n"
    );
    parse_fleet(&SourceFile::new("f.toml", text)).value.expect("the fleet checks").nodes
}

/// A job of one instance; with the `exec` driver, the review's payload.
fn spec(name: &str, namespace: &str, driver: &str) -> String {
    let payload = match driver {
        "exec" => "command = \"/bin/sh\"\nargs = [\"-c\", \"id > /tmp/hanse-acl-pwned\"]\n",
        _ => "",
    };
    format!(
        "[job]\nname = \"{name}\"\nnamespace = \"{namespace}\"\n[[group]]\nname = \"g\"\ncount = 1\n\
         [[group.task]]\nname = \"t\"\ndriver = \"{driver}\"\n{payload}\
         resources = {{ cpu = \"100m\", memory = \"64MiB\" }}\n"
    )
}

/// A cluster serving plain HTTP: these tests speak raw HTTP to it.
async fn start(name: &str, servers: u64) -> LocalCluster {
    let options = ServerOptions { http_tls: false, ..ServerOptions::new(name, "s") };
    let c = LocalCluster::start(name, &dir(name), servers, options, Duration::from_millis(100))
        .await
        .expect("the cluster starts");
    c.leader(Duration::from_secs(10)).await.expect("a leader");
    c
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("the blocking part does not panic")
}

/// One raw request: (status, JSON body).
fn call(base: &str, token: Option<&str>, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{base}{path}");
    let with = |r: ureq::RequestBuilder<ureq::typestate::WithBody>| match token {
        Some(t) => r.header("x-hanse-token", t),
        None => r,
    };
    let without = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match token {
        Some(t) => r.header("x-hanse-token", t),
        None => r,
    };
    let empty = json!({});
    let r = match method {
        "GET" => without(agent.get(&url)).call(),
        "DELETE" => without(agent.delete(&url)).call(),
        "PUT" => with(agent.put(&url)).send_json(body.unwrap_or(&empty)),
        "POST" => with(agent.post(&url)).send_json(body.unwrap_or(&empty)),
        m => panic!("no method {m}"),
    };
    let mut r = r.expect("the server answers");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The state's bytes, on server 1: equal before and after means nothing changed.
fn state(c: &LocalCluster) -> Vec<u8> {
    c.server(1).expect("server 1 runs").raft().read(|s| s.snapshot())
}

fn policy(c: &Client, name: &str, text: &str) {
    let _: Value = c
        .put(&format!("/v1/acl/policies/{name}"), &PolicyApply { policy: text.into(), source: None })
        .expect("the policy applies");
}

fn token(c: &Client, name: &str, policies: &[&str]) -> TokenSecret {
    let req = TokenCreate {
        name: name.into(),
        policies: policies.iter().map(|p| p.to_string()).collect(),
        management: false,
    };
    c.post("/v1/acl/tokens", &req).expect("the token is created")
}

/// Every route but health and bootstrap: 401 without a token, 403 with a
/// secret no token has, 403 with a token whose policy grants nothing
/// (except the few any token may call), and the state unchanged after all
/// of them. A route added without a check fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_refuses_callers_without_a_token_or_capability_and_changes_nothing() {
    let c = start("routes", 1).await;
    let admin = c.client();
    let base = format!("http://{}", c.http_addrs[&1]);
    let before = blocking(move || {
        admin.register_nodes(&fleet(2)).expect("nodes register");
        let reg = admin.submit(&spec("web", "default", "mock"), "web.toml").expect("a job");
        admin.eval(reg.eval, Duration::from_secs(10)).expect("it is placed");
        policy(&admin, "nothing", "[[namespace]]\nname = \"unused\"\ncapabilities = []\n");
        let nothing = token(&admin, "powerless", &["nothing"]);
        let node = serde_json::to_value(&fleet(1)[0]).unwrap();
        let alloc = admin.allocs().expect("allocations")[0].id;
        (nothing, node, alloc)
    })
    .await;
    let (nothing, node, alloc) = before;
    let snapshot = state(&c);
    let job = json!({"spec": spec("pwn", "default", "exec"), "source": "pwn.toml"});
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/v1/status/peers".into(), None),
        ("GET", "/v1/operator/raft/peers".into(), None),
        ("POST", "/v1/operator/raft/peers".into(), Some(json!({"id": 9, "address": "127.0.0.1:9"}))),
        ("DELETE", "/v1/operator/raft/peers/1".into(), None),
        ("POST", "/v1/operator/raft/transfer-leader".into(), Some(json!({"id": 1}))),
        ("GET", "/v1/jobs".into(), None),
        ("PUT", "/v1/jobs".into(), Some(job.clone())),
        ("POST", "/v1/jobs/plan".into(), Some(job)),
        ("GET", "/v1/jobs/web".into(), None),
        ("DELETE", "/v1/jobs/web".into(), None),
        ("POST", "/v1/jobs/web/scale".into(), Some(json!({"group": "g", "count": 5}))),
        ("GET", "/v1/jobs/web/versions".into(), None),
        ("POST", "/v1/jobs/web/revert".into(), Some(json!({"version": 0}))),
        ("GET", "/v1/jobs/web/deployment".into(), None),
        ("POST", "/v1/jobs/web/deployment/promote".into(), Some(json!({}))),
        ("POST", "/v1/jobs/web/deployment/fail".into(), None),
        ("GET", "/v1/evaluations/1".into(), None),
        ("GET", "/v1/nodes".into(), None),
        ("PUT", "/v1/nodes".into(), Some(node.clone())),
        ("PUT", "/v1/nodes/batch".into(), Some(json!([node]))),
        ("POST", "/v1/nodes/heartbeat".into(), Some(json!({"nodes": ["m-00001"]}))),
        ("GET", "/v1/nodes/m-00001".into(), None),
        ("POST", "/v1/nodes/m-00001/drain".into(), Some(json!({"drain": true}))),
        ("POST", "/v1/nodes/m-00001/eligibility".into(), Some(json!({"eligible": false}))),
        ("GET", "/v1/allocations".into(), None),
        ("POST", "/v1/allocations/status".into(), Some(json!({"updates": [{"id": alloc, "status": "lost"}]}))),
        ("GET", format!("/v1/allocations/{alloc}"), None),
        ("GET", format!("/v1/allocations/{alloc}/logs"), None),
        ("POST", format!("/v1/allocations/{alloc}/stop"), None),
        ("POST", format!("/v1/allocations/{alloc}/restart"), Some(json!({}))),
        ("POST", format!("/v1/allocations/{alloc}/signal"), Some(json!({"signal": "HUP"}))),
        ("GET", "/metrics".into(), None),
        ("GET", "/v1/acl/tokens".into(), None),
        ("POST", "/v1/acl/tokens".into(), Some(json!({"name": "x", "management": true}))),
        ("GET", format!("/v1/acl/tokens/{}", nothing.token.accessor), None),
        ("DELETE", format!("/v1/acl/tokens/{}", nothing.token.accessor), None),
        ("GET", "/v1/acl/policies".into(), None),
        (
            "PUT",
            "/v1/acl/policies/x".into(),
            Some(json!({"policy": "[[namespace]]\nname = \"*\"\ncapabilities = [\"operator\"]\n"})),
        ),
        ("GET", "/v1/acl/policies/nothing".into(), None),
        ("DELETE", "/v1/acl/policies/nothing".into(), None),
        ("GET", "/v1/federation/policy".into(), None),
    ];
    let write_routes = routes.iter().filter(|(method, _, _)| *method != "GET").count();
    let any_token = ["/v1/status/leader", "/v1/acl/token/self"];
    let secret = nothing.secret.clone();
    blocking(move || {
        for (method, path, body) in &routes {
            let (status, answer) = call(&base, None, method, path, body.as_ref());
            assert_eq!(status, 401, "{method} {path} without a token: {answer}");
            assert!(answer["message"].as_str().is_some_and(|m| m.contains("token")), "{method} {path}: {answer}");
            let (status, answer) = call(&base, Some("not-a-secret-of-this-cluster"), method, path, body.as_ref());
            assert_eq!(status, 403, "{method} {path} with an unknown secret: {answer}");
            if path.starts_with("/v1/federation/") {
                continue; // no federation here: 404 past the token check
            }
            let (status, answer) = call(&base, Some(&secret), method, path, body.as_ref());
            assert_eq!(status, 403, "{method} {path} with a token that grants nothing: {answer}");
            assert!(answer["message"].as_str().is_some_and(|m| m.contains("powerless")), "{answer}");
        }
        for path in any_token {
            assert_eq!(call(&base, None, "GET", path, None).0, 401, "{path}");
            assert_eq!(call(&base, Some(&secret), "GET", path, None).0, 200, "{path}");
        }
        assert_eq!(call(&base, None, "GET", "/v1/health", None).0, 200, "health needs no token");
        // Configured with an initial management token: nobody else may
        // bootstrap, not even before the first leader committed it.
        let (status, answer) = call(&base, None, "POST", "/v1/acl/bootstrap", None);
        assert_eq!(status, 400, "a bootstrap: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| m.contains("initial management")), "{answer}");
    })
    .await;
    assert!(state(&c) == snapshot, "a refused request changed the state");
    assert!(!std::path::Path::new("/tmp/hanse-acl-pwned").exists());
    // Every refused write is in the audit trail, with its source, and
    // neither secret is anywhere in its files.
    let admin = c.client();
    let (powerless, accessor) = (nothing.secret.clone(), nothing.token.accessor.clone());
    let trail: Vec<Value> = blocking(move || admin.get("/v1/operator/audit?limit=10000").unwrap()).await;
    let denied = |status: u16, accessor: Option<&str>| {
        trail
            .iter()
            .filter(|r| r["method"] == "PUT" && r["route"] == "/v1/jobs" && r["status"] == status)
            .filter(|r| r["accessor"].as_str() == accessor && r["outcome"] == "denied")
            .filter(|r| r["source"].as_str().is_some_and(|s| s.starts_with("127.0.0.1:")))
            .count()
    };
    assert_eq!(denied(401, None), 1, "{trail:?}");
    assert_eq!(denied(403, None), 1, "an unknown secret");
    assert_eq!(denied(403, Some(&accessor)), 1, "the powerless token, by accessor");
    // Each write route was refused three times: no token, an unknown one,
    // the powerless one.
    let writes = trail.iter().filter(|r| r["outcome"] == "denied").count();
    assert_eq!(writes, 3 * write_routes, "every refused write recorded once");
    let root = c.token().unwrap().to_string();
    let trail_dir = std::env::temp_dir().join(format!("hanse-acl-{}-routes", std::process::id())).join("audit-s1");
    let files: Vec<_> = std::fs::read_dir(&trail_dir).expect("the trail's directory").flatten().collect();
    assert!(!files.is_empty(), "no audit file in {}", trail_dir.display());
    for entry in files {
        let bytes = std::fs::read(entry.path()).unwrap();
        for secret in [&powerless, &root] {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "a secret in {:?}", entry.path());
        }
    }
    c.stop().await;
}

/// The review's unauthenticated attacks, replayed (rows 1 and 2: an exec
/// job from anyone who reaches the port; 4: a Raft peer added; 5: a real
/// node's record replaced; 6: a running allocation reported lost), each
/// without a token and with a deployer's token: refused, and the cluster
/// is as it was and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reviews_unauthenticated_attacks_fail_and_change_nothing() {
    let c = start("attacks", 1).await;
    let admin = c.client();
    let base = format!("http://{}", c.http_addrs[&1]);
    let deployer = blocking(move || {
        admin.register_nodes(&fleet(2)).expect("nodes register");
        let reg = admin.submit(&spec("victim", "default", "mock"), "v.toml").expect("a job");
        admin.eval(reg.eval, Duration::from_secs(10)).expect("placed");
        policy(
            &admin,
            "deployer",
            "[[namespace]]\nname = \"default\"\ncapabilities = [\"read\", \"submit\", \"stop\"]\n",
        );
        (token(&admin, "ci", &["deployer"]).secret, admin.allocs().expect("allocations")[0].id)
    })
    .await;
    let (deployer, alloc) = deployer;
    let before = state(&c);
    let peers_before = c.server(1).unwrap().raft().status().peers.len();
    let mut hijack = fleet(1)[0].clone();
    hijack.capacity.cpu_millis = 512_000_000;
    let attacks: Vec<(&str, &str, Value)> = vec![
        ("PUT", "/v1/jobs", json!({"spec": spec("pwn", "default", "exec")})),
        ("POST", "/v1/operator/raft/peers", json!({"id": 2, "address": "127.0.0.1:9"})),
        ("PUT", "/v1/nodes", serde_json::to_value(&hijack).unwrap()),
        ("POST", "/v1/allocations/status", json!({"updates": [{"id": alloc, "status": "lost"}]})),
    ];
    let d = deployer.clone();
    blocking(move || {
        for (i, (method, path, body)) in attacks.iter().enumerate() {
            assert_eq!(call(&base, None, method, path, Some(body)).0, 401, "{method} {path}");
            // The deployer may submit jobs (the first attack, as a job of
            // its own namespace, is its right); nothing else here.
            if i > 0 {
                let (status, answer) = call(&base, Some(&d), method, path, Some(body));
                assert_eq!(status, 403, "{method} {path} as a deployer: {answer}");
            }
        }
    })
    .await;
    assert!(state(&c) == before, "an attack changed the state");
    assert_eq!(c.server(1).unwrap().raft().status().peers.len(), peers_before);
    let admin = c.client();
    blocking(move || {
        let victim = admin.job("victim").expect("the victim job");
        assert!(victim.allocations.iter().all(|a| a.status != "lost"), "{victim:?}");
        let node = admin.node(&fleet(1)[0].id.to_string()).expect("the node");
        assert_eq!(node.node.cpu_millis, 4_000, "the node's record was replaced");
        // Writes still commit: one request did not break the quorum.
        admin.submit(&spec("after", "default", "mock"), "a.toml").expect("a write after the attacks");
    })
    .await;
    c.stop().await;
}

/// A token of namespace team-a submits, reads and stops team-a's jobs
/// only, sees only them, cannot take a name another namespace holds; a
/// follower accepts a token created a moment ago on the leader; a revoked
/// token opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespaces_bound_what_a_token_touches_and_a_revoked_token_opens_nothing() {
    let c = start("namespaces", 3).await;
    let leader = c.leader(Duration::from_secs(10)).await.unwrap();
    let follower = c.running().find(|id| *id != leader).unwrap();
    let (admin, on_follower) = (c.client_of(leader), c.client_of(follower));
    let follower_base = format!("http://{}", c.http_addrs[&follower]);
    blocking(move || {
        admin.register_nodes(&fleet(2)).expect("nodes register");
        admin.submit(&spec("web", "default", "mock"), "web.toml").expect("a default job");
        policy(
            &admin,
            "team-a",
            "[[namespace]]\nname = \"team-a\"\ncapabilities = [\"read\", \"submit\", \"stop\", \"alloc-logs\"]\n",
        );
        let t = token(&admin, "team-a-ci", &["team-a"]);
        // At once, on a follower: it reads through the leader if it has
        // not applied the token yet.
        let a = Client::new(&follower_base).with_token(Some(&t.secret));
        a.submit(&spec("api", "team-a", "mock"), "api.toml").expect("team-a submits to team-a");
        let denied = a.submit(&spec("other", "default", "mock"), "o.toml").unwrap_err();
        assert_eq!(denied.status(), Some(403), "{denied}");
        assert!(denied.to_string().contains("`submit` in namespace `default`"), "{denied}");
        let seen: Vec<String> = a.jobs().expect("a list").into_iter().map(|j| j.id).collect();
        assert_eq!(seen, ["api"], "only team-a's jobs are listed");
        assert_eq!(a.job("web").unwrap_err().status(), Some(403));
        assert_eq!(a.stop("web").unwrap_err().status(), Some(403));
        // Nodes are listed, but with team-a's allocations only.
        for n in a.nodes().expect("reading in one namespace lists the nodes") {
            let allocs = a.node(&n.id).expect("a node").allocations;
            assert!(allocs.iter().all(|x| x.job == "api"), "another namespace's allocation on {}: {allocs:?}", n.id);
        }
        // A dry run of a name another namespace holds is refused as the
        // submission would be.
        let planned = a.plan(&spec("web", "team-a", "mock"), "web.toml").unwrap_err();
        assert!(planned.to_string().contains("exists in namespace"), "{planned}");
        // A name another namespace holds is not taken over.
        let taken = a.submit(&spec("web", "team-a", "mock"), "web.toml").unwrap_err();
        assert!(taken.to_string().contains("exists in namespace `default`"), "{taken}");
        assert_eq!(on_follower.job("web").expect("still the default job").summary.namespace, "default");
        // A reader sees a job's versions, but not its specs (their `env`
        // may hold what only its submitters should see).
        policy(&admin, "team-a-read", "[[namespace]]\nname = \"team-a\"\ncapabilities = [\"read\"]\n");
        let r = token(&admin, "team-a-reader", &["team-a-read"]);
        let reader = Client::new(&follower_base).with_token(Some(&r.secret));
        let seen = reader.versions("api").expect("a reader lists the versions");
        assert_eq!(seen.versions.len(), 1);
        assert!(seen.versions.iter().all(|v| v.spec.is_none() && v.submitted.is_none()), "{seen:?}");
        let full = a.versions("api").expect("a submitter lists the versions");
        assert!(full.versions[0].spec.is_some() && full.versions[0].submitted.is_some(), "{full:?}");
        assert!(a.stop("api").is_ok(), "team-a stops its own job");
        // Revoked: refused on every server once it applied the revocation.
        let _: Value = admin.delete(&format!("/v1/acl/tokens/{}", t.token.accessor)).expect("revoked");
        let start = Instant::now();
        loop {
            match a.jobs() {
                Err(e) if e.status() == Some(403) => break,
                other => assert!(start.elapsed() < Duration::from_secs(2), "still answered: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await;
    c.stop().await;
}
