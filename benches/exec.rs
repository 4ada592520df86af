//! `cargo bench --bench exec`: real `hanse server` and `hanse agent`
//! processes on loopback, with real child processes.
//!
//! 1. Batch throughput: 2,000 one-shot batch jobs, each running `true`
//!    through the exec driver on one agent, submitted by 8 clients as fast
//!    as the API takes them; timed from the first submission until every
//!    job's allocation is complete.
//! 2. Node loss: a service runs on one of two agents; the agent is killed
//!    with `kill -9`; timed until the service runs on the other agent.
//!    Five rounds (the killed agent is restarted between them); TTL 1 s,
//!    grace 1 s. Per round also: when the node read `down`, how long the
//!    server had heard nothing from it when it marked it down (its log
//!    says; never less than TTL + grace), and so how long before the kill
//!    its last heartbeat was.
//!
//! Ends with `name: value` lines.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cluster_core::server::client::Client;
use cluster_core::transport::tls::{self, Identity, PemPair, Role};

const JOBS: usize = 2_000;
const CLIENTS: usize = 8;
const LOSS_ROUNDS: usize = 5;

struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> Bg {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Bg(Command::new(env!("CARGO_BIN_EXE_hanse"))
        .current_dir(dir)
        .args(args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("start hanse"))
}

fn write_pair(dir: &Path, ca: &PemPair, id: &Identity, stem: &str) {
    let pair = tls::issue(ca, id, 1).unwrap();
    std::fs::write(dir.join(format!("pki/{stem}.pem")), &pair.cert_pem).unwrap();
    std::fs::write(dir.join(format!("pki/{stem}-key.pem")), &pair.key_pem).unwrap();
}

fn agent_config(dir: &Path, ca: &PemPair, name: &str, server: SocketAddr) -> String {
    write_pair(dir, ca, &Identity::new("bench", Role::Agent, name), name);
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[agent]\nname = \"{name}\"\ncluster = \"bench\"\ndata_dir = \"data/{name}\"\nservers = [\"{server}\"]\ndrivers = [\"exec\"]\ncpu = 64\nmemory = \"64GiB\"\ncgroups = false\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/{name}.pem\"\nkey = \"pki/{name}-key.pem\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each `silent_ms` of the server's "marking it down" lines for `node`.
fn silences_in_log(log: &Path, node: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("marking it down") && l.contains(&format!("node={node}")))
        .filter_map(|l| l.split("silent_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

fn ready(c: &Client, node: &str) -> bool {
    c.node(node).is_ok_and(|n| n.node.status == "ready")
}

fn main() {
    let dir = std::env::temp_dir().join(format!("hanse-bench-exec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pki")).unwrap();
    let _cleanup = Dir(dir.clone());
    let ca = tls::create_ca("bench", 1).unwrap();
    std::fs::write(dir.join("pki/ca.pem"), &ca.cert_pem).unwrap();
    write_pair(&dir, &ca, &Identity::new("bench", Role::Server, "s1"), "s1");
    let quic: SocketAddr =
        format!("127.0.0.1:{}", UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).parse().unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    std::fs::write(
        dir.join("s1.toml"),
        format!(
            "[server]\nname = \"s1\"\ncluster = \"bench\"\nid = 1\ndata_dir = \"data/s1\"\nbind = \"{quic}\"\nhttp = \"{http}\"\nheartbeat_ttl = \"1s\"\nheartbeat_grace = \"1s\"\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/s1.pem\"\nkey = \"pki/s1-key.pem\"\n"
        ),
    )
    .unwrap();
    let _server = spawn(&dir, "s1", &["server", "--config", "s1.toml"]);
    let anonymous = Client::new(&http).with_ca(&ca.cert_pem).unwrap();
    wait_for(Duration::from_secs(30), "a leader", || anonymous.health().is_ok_and(|h| !h["leader"].is_null()));
    let token = anonymous.bootstrap(None).expect("the ACLs bootstrap").secret;
    let c = anonymous.clone().with_token(Some(&token));
    let a_config = agent_config(&dir, &ca, "node-a", quic);
    let mut a = Some(spawn(&dir, "node-a", &["agent", "--config", &a_config]));
    wait_for(Duration::from_secs(30), "node-a ready", || ready(&c, "node-a"));

    // 1. Batch throughput.
    let spec = |i: usize| {
        format!(
            "[job]\nname = \"batch-{i}\"\ntype = \"batch\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\ncommand = \"true\"\nresources = {{ cpu = \"10m\", memory = \"1MiB\" }}\n"
        )
    };
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let submitters: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (c, next) = (c.clone(), next.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= JOBS {
                        return;
                    }
                    c.submit(&spec(i), "bench.toml").expect("submit");
                }
            })
        })
        .collect();
    for s in submitters {
        s.join().unwrap();
    }
    let submitted = start.elapsed();
    let mut complete = 0;
    wait_for(Duration::from_secs(600), "every batch job complete", || {
        complete = c
            .jobs()
            .map(|jobs| jobs.iter().filter(|j| j.allocs.get("complete").copied().unwrap_or(0) >= 1).count())
            .unwrap_or(0);
        complete == JOBS
    });
    let all_done = start.elapsed();
    let failed = c.jobs().unwrap().iter().map(|j| j.allocs.get("failed").copied().unwrap_or(0)).sum::<u64>();
    assert_eq!(failed, 0, "batch jobs failed");

    // 2. Node loss, five rounds.
    let b_config = agent_config(&dir, &ca, "node-b", quic);
    let mut b = Some(spawn(&dir, "node-b", &["agent", "--config", &b_config]));
    wait_for(Duration::from_secs(30), "node-b ready", || ready(&c, "node-b"));
    c.submit(
        "[job]\nname = \"svc\"\ntype = \"service\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\ncommand = \"sleep\"\nargs = [\"3600\"]\n",
        "svc.toml",
    )
    .unwrap();
    let running_on = |c: &Client| -> Option<String> {
        c.job("svc")
            .ok()?
            .allocations
            .iter()
            .find(|x| x.status == "running" && x.desired == "run")
            .map(|x| x.node.clone())
    };
    let mut replaced = Vec::new();
    // Per round: when the node read `down` after the kill, and how long the
    // server had heard nothing from it when it marked it down (its log).
    let (mut down_after_kill, mut silences) = (Vec::new(), Vec::new());
    for _ in 0..LOSS_ROUNDS {
        wait_for(Duration::from_secs(30), "svc running", || running_on(&c).is_some());
        let on = running_on(&c).unwrap();
        let (victim, config) = if on == "node-a" { (&mut a, &a_config) } else { (&mut b, &b_config) };
        let marked_before = silences_in_log(&dir.join("s1.log"), &on).len();
        let killed = Instant::now();
        drop(victim.take()); // SIGKILL
        let mut down = None;
        wait_for(Duration::from_secs(30), "svc replaced", || {
            if down.is_none() && c.node(&on).is_ok_and(|n| n.node.status == "down") {
                down = Some(killed.elapsed().as_secs_f64() * 1e3);
            }
            running_on(&c).is_some_and(|n| n != on)
        });
        replaced.push(killed.elapsed().as_secs_f64() * 1e3);
        wait_for(Duration::from_secs(30), "the node down", || {
            down.is_some() || c.node(&on).is_ok_and(|n| n.node.status == "down")
        });
        down_after_kill.push(down.unwrap_or(killed.elapsed().as_secs_f64() * 1e3));
        wait_for(Duration::from_secs(5), "the server's line marking it down", || {
            silences_in_log(&dir.join("s1.log"), &on).len() > marked_before
        });
        silences.push(*silences_in_log(&dir.join("s1.log"), &on).last().unwrap());
        *victim = Some(spawn(&dir, &on, &["agent", "--config", config]));
        wait_for(Duration::from_secs(30), "the killed agent back", || ready(&c, &on));
    }

    println!("jobs: {JOBS}");
    println!("submit_s: {:.2}", submitted.as_secs_f64());
    println!("total_s: {:.2}", all_done.as_secs_f64());
    println!("batch_jobs_per_sec: {:.0}", JOBS as f64 / all_done.as_secs_f64());
    println!("replace_after_agent_kill_ms_median: {:.0}", median(replaced.clone()));
    println!(
        "replace_after_agent_kill_ms_all: {}",
        replaced.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" ")
    );
    let all = |v: &[f64]| v.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" ");
    println!("node_down_after_agent_kill_ms_all: {}", all(&down_after_kill));
    println!("silence_when_marked_down_ms_all: {}", all(&silences));
    println!("silence_when_marked_down_ms_min: {:.0}", silences.iter().copied().fold(f64::MAX, f64::min));
    // How long before its kill the server had last heard from the agent:
    // a replacement sooner than TTL + grace after the kill is one whose
    // heartbeats had stopped before it.
    let before: Vec<f64> = silences.iter().zip(&down_after_kill).map(|(s, d)| (s - d).max(0.0)).collect();
    println!("last_heartbeat_before_kill_ms_all: {}", all(&before));
    println!("heartbeat_ttl_ms: 1000");
    println!("heartbeat_grace_ms: 1000");
}
