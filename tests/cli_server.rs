//! `hanse server` as real processes on loopback: three servers elect a
//! leader; `kill -9` of the leader gets a new one; the killed server,
//! restarted on its data directory, rejoins. Every wait is bounded and
//! every process is killed by its handle when the test ends.

mod common;

use common::{TOKEN, bootstrap, eventually, hanse, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_core::transport::tls::{self, Identity, Role};

struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn start(config: &Path) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hanse"))
            .args(["server", "--config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hanse server");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        // Logs are kept too, and still shown with the test's output.
        let sink = lines.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("{line}");
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, lines }
    }

    /// (leader, term) from the latest status line.
    fn status(&self) -> Option<(Option<u64>, u64)> {
        let lines = self.lines.lock().unwrap();
        let line = lines.iter().rev().find(|l| l.starts_with("status:"))?;
        let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
        let leader = field("leader=")?.parse().ok();
        Some((leader, field("term=")?.parse().ok()?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Configs for three servers, plus a fourth that joins (bootstrap = false),
/// and each server's HTTP address.
fn setup(name: &str) -> (Dir, Vec<PathBuf>, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("hanse-cli-server-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pki")).unwrap();
    let ca = tls::create_ca("test", 1).unwrap();
    std::fs::write(dir.join("pki/ca.pem"), &ca.cert_pem).unwrap();
    let ports: Vec<u16> =
        (0..4).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let http: Vec<String> =
        (0..4).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()).collect();
    let mut configs = Vec::new();
    for i in 1..=4usize {
        let pair =
            tls::issue_server(&ca, &Identity::new("eu-west", Role::Server, &format!("s{i}")), 1, &[], &["eu".into()])
                .unwrap();
        std::fs::write(dir.join(format!("pki/s{i}.pem")), &pair.cert_pem).unwrap();
        std::fs::write(dir.join(format!("pki/s{i}-key.pem")), &pair.key_pem).unwrap();
        let mut text = format!(
            "[server]\nname = \"s{i}\"\ncluster = \"eu-west\"\nid = {i}\ndata_dir = \"data/s{i}\"\nbind = \"127.0.0.1:{}\"\nhttp = \"{}\"\nheartbeat_ttl = \"2s\"\nheartbeat_grace = \"1s\"\nbootstrap = {}\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/s{i}.pem\"\nkey = \"pki/s{i}-key.pem\"\n",
            ports[i - 1],
            http[i - 1],
            i <= 3,
        );
        for j in (1..=3).filter(|j| *j != i) {
            text.push_str(&format!("\n[[peer]]\nid = {j}\naddress = \"127.0.0.1:{}\"\n", ports[j - 1]));
        }
        let path = dir.join(format!("s{i}.toml"));
        std::fs::write(&path, text).unwrap();
        configs.push(path);
    }
    (Dir(dir), configs, http)
}

/// Waits until the given servers agree on a leader; returns it and the term.
fn agreed(procs: &[(usize, &Proc)], limit: Duration, not: Option<u64>) -> (u64, u64) {
    let start = Instant::now();
    loop {
        let s: Vec<_> = procs.iter().map(|(_, p)| p.status()).collect();
        if let Some(Some((Some(l), t))) = s.first() {
            if s.iter().all(|x| *x == Some((Some(*l), *t))) && Some(*l) != not {
                return (*l, *t);
            }
        }
        assert!(start.elapsed() < limit, "no agreed leader within {limit:?}: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn live(procs: &[Option<Proc>]) -> Vec<(usize, &Proc)> {
    procs.iter().enumerate().filter_map(|(i, p)| p.as_ref().map(|p| (i + 1, p))).collect()
}

#[test]
fn three_server_processes_survive_kill_9_of_the_leader() {
    let (_dir, configs, _) = setup("kill");
    let mut procs: Vec<Option<Proc>> = configs[..3].iter().map(|c| Some(Proc::start(c))).collect();
    let (leader, term) = agreed(&live(&procs), Duration::from_secs(20), None);

    // kill -9 the leader (Child::kill sends SIGKILL).
    procs[leader as usize - 1] = None;
    let (next, next_term) = agreed(&live(&procs), Duration::from_secs(20), Some(leader));
    assert_ne!(next, leader);
    assert!(next_term > term, "a new term: {next_term} after {term}");

    // The killed server restarts on its data directory and follows.
    procs[leader as usize - 1] = Some(Proc::start(&configs[leader as usize - 1]));
    let (after, _) = agreed(&live(&procs), Duration::from_secs(20), None);
    assert_ne!(after, 0);
    let back = procs[leader as usize - 1].as_ref().unwrap();
    let (_, back_term) = back.status().unwrap();
    assert!(back_term >= next_term, "recovered its term from disk, then caught up: {back_term} < {next_term}");
}

#[test]
fn a_bad_config_is_refused_with_every_problem_located() {
    let dir = Dir(std::env::temp_dir().join(format!("hanse-cli-server-bad-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nname = \"s 1\"\ncluster = \"eu-west\"\nid = 0\ndata_dir = \"d\"\nbind = \"localhost\"\nbnd = 1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hanse"))
        .args(["server", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for (pos, what) in
        [("2:8", "invalid name"), ("4:6", "not a Raft id"), ("6:8", "not an address"), ("7:1", "did you mean `bind`?")]
    {
        assert!(err.contains(&format!("bad.toml:{pos}:")) && err.contains(what), "{pos} {what} missing in:\n{err}");
    }
    assert!(err.contains("missing [tls] table"), "{err}");
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn example(path: &str) -> String {
    format!("{}/examples/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// A process killed when the test ends.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn jobs_run_through_the_cli_and_no_acknowledged_job_is_lost_to_kill_9_of_the_leader() {
    let (_dir, configs, http) = setup("jobs");
    let mut procs: Vec<Option<Proc>> = configs[..3].iter().map(|c| Some(Proc::start(c))).collect();
    let (leader, _) = agreed(&live(&procs), Duration::from_secs(20), None);
    let all = http[..3].join(",");
    common::trust(&http.join(","), &_dir.0.join("pki/ca.pem"));
    bootstrap(&all, Duration::from_secs(20));
    let _nodes = Bg(Command::new(env!("CARGO_BIN_EXE_hanse"))
        .env("HANSE_ADDR", &all)
        .env("HANSE_TOKEN", TOKEN)
        .env("HANSE_CACERT", _dir.0.join("pki/ca.pem"))
        .args(["node", "simulate", "--fleet", &example("fleets/eu-west.toml"), "--count", "200"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap());
    eventually(Duration::from_secs(20), "200 nodes registered", || {
        hanse(&all, &["node", "list", "--json"]).stdout.len() > 100
            && json(&hanse(&all, &["node", "list", "--json"])).as_array().unwrap().len() == 200
    });

    // job run: exit 0 once placed, with the allocations shown.
    let run = hanse(&all, &["job", "run", &example("jobs/web.toml")]);
    assert_eq!(run.status.code(), Some(0), "{}{}", stdout(&run), String::from_utf8_lossy(&run.stderr));
    assert!(stdout(&run).contains("web.frontend[11]"), "{}", stdout(&run));
    let status = json(&hanse(&all, &["job", "status", "web", "--json"]));
    assert_eq!(status["allocations"].as_array().unwrap().len(), 15);
    assert_eq!(status["eval"]["status"], "complete");
    // A job that cannot fit: exit 2, with the reason.
    let huge = _dir.0.join("huge.toml");
    std::fs::write(
        &huge,
        "[job]\nname = \"huge\"\n\n[[group]]\nname = \"g\"\ncount = 2\n\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = { cpu = 500, memory = \"1GiB\" }\n",
    )
    .unwrap();
    let run = hanse(&all, &["job", "run", huge.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2), "{}", stdout(&run));
    assert!(stdout(&run).contains("cpu exhausted") || stdout(&run).contains("cpu"), "{}", stdout(&run));
    // Lists filtered by the servers: the blocked job apart from the running one.
    let listed = |args: &[&str]| -> Vec<String> {
        let list = json(&hanse(&all, args));
        list.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap_or_default().to_string()).collect()
    };
    assert_eq!(listed(&["job", "list", "--status", "running", "--json"]), vec!["web"]);
    assert_eq!(listed(&["job", "list", "--status", "blocked", "--json"]), vec!["huge"]);
    let allocs = |job: &str| json(&hanse(&all, &["alloc", "status", "--job", job, "--json"])).as_array().unwrap().len();
    assert_eq!((allocs("web"), allocs("huge")), (15, 0));
    // An update that fits nowhere (500 cores an instance) takes nothing
    // down: exit 2 naming the new version; every old instance runs on.
    let web2 = _dir.0.join("web-500-cores.toml");
    let spec = std::fs::read_to_string(example("jobs/web.toml")).unwrap();
    std::fs::write(&web2, spec.replacen("cpu = \"500m\"", "cpu = 500", 1)).unwrap();
    let plan = hanse(&all, &["job", "plan", web2.to_str().unwrap()]);
    assert_eq!(plan.status.code(), Some(2), "{}", stdout(&plan));
    assert!(stdout(&plan).contains("12 instances of the older version keep running"), "{}", stdout(&plan));
    let run = hanse(&all, &["job", "run", web2.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2), "{}", stdout(&run));
    assert!(
        stdout(&run).contains("version 1 cannot be placed yet: 12 instances of the older version keep running"),
        "{}",
        stdout(&run)
    );
    let status = json(&hanse(&all, &["job", "status", "web", "--json"]));
    let live: Vec<&serde_json::Value> =
        status["allocations"].as_array().unwrap().iter().filter(|a| a["desired"] == "run").collect();
    assert_eq!(live.len(), 15, "{status}");
    // The frontends wait at version 0; the caches, which fit, moved on.
    let at = |g: &str, v: u64| live.iter().filter(|a| a["group"] == g && a["job_version"] == v).count();
    assert_eq!((at("frontend", 0), at("cache", 1)), (12, 3), "{status}");

    // Scaling one group changes its count only: nothing else restarts.
    let live_ids = |group: &str| -> Vec<(u32, u64)> {
        let status = json(&hanse(&all, &["job", "status", "web", "--json"]));
        let mut ids: Vec<(u32, u64)> = (status["allocations"].as_array().unwrap().iter())
            .filter(|a| a["desired"] == "run" && a["group"] == group)
            .map(|a| (a["index"].as_u64().unwrap() as u32, a["id"].as_u64().unwrap()))
            .collect();
        ids.sort();
        ids
    };
    let frontends = live_ids("frontend");
    let scaled = hanse(&all, &["job", "scale", "web", "cache", "4"]);
    assert_eq!(scaled.status.code(), Some(0), "{}{}", stdout(&scaled), String::from_utf8_lossy(&scaled.stderr));
    assert!(stdout(&scaled).contains("group cache scaled to 4 instances"), "{}", stdout(&scaled));
    eventually(Duration::from_secs(20), "a fourth cache", || live_ids("cache").len() == 4);
    assert_eq!(live_ids("frontend"), frontends, "scaling the caches restarted a frontend");
    let wrong = hanse(&all, &["job", "scale", "web", "nope", "2"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("has no group `nope` (its groups: frontend, cache)"));
    // Stopping one allocation: the job places its instance again.
    let victim = live_ids("cache")[0];
    let stopped = hanse(&all, &["alloc", "stop", "web.cache[0]"]);
    assert_eq!(stopped.status.code(), Some(0), "{}{}", stdout(&stopped), String::from_utf8_lossy(&stopped.stderr));
    assert!(stdout(&stopped).contains(&format!("allocation a{:06} stopping", victim.1)), "{}", stdout(&stopped));
    eventually(Duration::from_secs(20), "cache[0] placed again", || {
        live_ids("cache").iter().any(|(i, id)| *i == 0 && *id != victim.1)
    });
    assert!(!live_ids("cache").contains(&victim));

    // A drain moves only what can move: a frontend (its new version fits
    // nowhere) stays, and the CLI says so, naming it.
    let status = json(&hanse(&all, &["job", "status", "web", "--json"]));
    let frontend = (status["allocations"].as_array().unwrap().iter())
        .find(|a| a["desired"] == "run" && a["group"] == "frontend")
        .unwrap()
        .clone();
    let node = frontend["node"].as_str().unwrap();
    let drained = hanse(&all, &["node", "drain", node]);
    assert_eq!(drained.status.code(), Some(0), "{}", String::from_utf8_lossy(&drained.stderr));
    let name = frontend["name"].as_str().unwrap();
    assert!(stdout(&drained).contains("cannot move now") && stdout(&drained).contains(name), "{}", stdout(&drained));
    let still = json(&hanse(&all, &["alloc", "status", name, "--json"]));
    assert_eq!((still["desired"].as_str(), still["node"].as_str()), (Some("run"), Some(node)), "{still}");
    // Eligibility: not behind a drain's back; off and on otherwise.
    let on = hanse(&all, &["node", "eligibility", node, "--enable"]);
    assert_eq!(on.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&on.stderr).contains("is draining"), "{}", String::from_utf8_lossy(&on.stderr));
    assert!(hanse(&all, &["node", "drain", node, "--disable"]).status.success());
    let off = hanse(&all, &["node", "eligibility", node, "--disable"]);
    assert_eq!(off.status.code(), Some(0), "{}", String::from_utf8_lossy(&off.stderr));
    let view = json(&hanse(&all, &["node", "status", node, "--json"]));
    assert_eq!(
        (view["node"]["eligible"].as_bool(), view["node"]["draining"].as_bool()),
        (Some(false), Some(false)),
        "{view}"
    );
    assert!(hanse(&all, &["node", "eligibility", node, "--enable"]).status.success());
    // With a deadline, what cannot move stops then (the leader's
    // `Command::DrainDeadline`).
    let drained = hanse(&all, &["node", "drain", node, "--deadline", "1s"]);
    assert_eq!(drained.status.code(), Some(0), "{}", String::from_utf8_lossy(&drained.stderr));
    assert!(stdout(&drained).contains("or for 1s at most"), "{}", stdout(&drained));
    eventually(Duration::from_secs(15), "what could not move stopped at the deadline", || {
        json(&hanse(&all, &["alloc", "status", name, "--json"]))["desired"] == "stop"
    });
    let wrong = hanse(&all, &["node", "list", "--job", "web"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("node list takes no --job"));
    let peers = json(&hanse(&all, &["operator", "raft", "list-peers", "--json"]));
    assert_eq!(peers.as_array().unwrap().len(), 3);
    assert_eq!(peers.as_array().unwrap().iter().filter(|p| p["leader"] == true).count(), 1);

    // A burst of submissions; kill -9 of the leader a third of the way in.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let burst = {
        let (all, acked) = (all.clone(), acked.clone());
        std::thread::spawn(move || {
            let client = common::client(&all);
            let text = std::fs::read_to_string(example("jobs/analytics-eu.toml")).unwrap();
            for n in 0..60 {
                let spec = text.replacen("name = \"clickstream-rollup\"", &format!("name = \"burst-{n}\""), 1);
                if client.submit(&spec, "burst.toml").is_ok() {
                    acked.lock().unwrap().push(format!("burst-{n}"));
                }
            }
        })
    };
    eventually(Duration::from_secs(20), "20 acknowledged", || acked.lock().unwrap().len() >= 20);
    procs[leader as usize - 1] = None; // SIGKILL
    burst.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "submissions went on after the kill: {}", acked.len());
    let survivors: String =
        (1..=3).filter(|i| *i != leader as usize).map(|i| http[i - 1].clone()).collect::<Vec<_>>().join(",");
    let client = common::client(&survivors);
    for name in &acked {
        eventually(Duration::from_secs(30), &format!("{name} known and evaluated"), || {
            client.job(name).is_ok_and(|s| s.eval.is_some_and(|e| e.status != "pending"))
        });
    }
}

#[test]
fn operator_raft_adds_and_removes_a_server() {
    let (_dir, configs, http) = setup("members");
    let procs: Vec<Option<Proc>> = configs[..3].iter().map(|c| Some(Proc::start(c))).collect();
    agreed(&live(&procs), Duration::from_secs(20), None);
    let all = http[..3].join(",");
    common::trust(&http.join(","), &_dir.0.join("pki/ca.pem"));
    bootstrap(&all, Duration::from_secs(20));
    let text = std::fs::read_to_string(&configs[3]).unwrap();
    let bind = text.lines().find_map(|l| l.strip_prefix("bind = ")).unwrap().trim_matches('"').to_string();
    let _fourth = Proc::start(&configs[3]);
    let add = hanse(&all, &["operator", "raft", "add-peer", "--id", "4", "--peer-address", &bind]);
    assert_eq!(add.status.code(), Some(0), "{}", String::from_utf8_lossy(&add.stderr));
    let voters = || json(&hanse(&all, &["operator", "raft", "list-peers", "--json"])).as_array().unwrap().len();
    eventually(Duration::from_secs(10), "four voters", || voters() == 4);
    // The new server gets the log: a job submitted now shows on it.
    let run = hanse(&all, &["job", "run", "--detach", &example("jobs/edge-inference.toml")]);
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
    eventually(Duration::from_secs(10), "the job replicated to the new server", || {
        common::client(&http[3]).get::<Vec<serde_json::Value>>("/v1/jobs?stale=true").is_ok_and(|jobs| jobs.len() == 1)
    });
    let remove = hanse(&all, &["operator", "raft", "remove-peer", "--id", "4"]);
    assert_eq!(remove.status.code(), Some(0), "{}", String::from_utf8_lossy(&remove.stderr));
    eventually(Duration::from_secs(10), "three voters", || voters() == 3);
    // Removing it again names the problem.
    let again = hanse(&all, &["operator", "raft", "remove-peer", "--id", "4"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not a voter"));
}

/// The gossip key rotates on running server processes: `hanse federation
/// key install|use|remove`, sent to any one server, reaches all three
/// (they follow the cluster's log), and an edited key file signalled with
/// SIGHUP is committed the same way. Sampled all along, no server ever
/// fails to open a datagram. A member left with the old key is refused,
/// and the servers say so in their logs and in `/metrics`.
#[test]
fn the_gossip_key_rotates_on_running_servers_through_the_cli_and_sighup() {
    use gossip::Key;
    let (dir, configs, http) = setup("keys");
    let keys: Vec<Key> = (0..3).map(|_| Key::generate()).collect();
    let hex: Vec<String> = keys.iter().map(|k| format!("{:08x}", k.id())).collect();
    let key_file = |name: &str, ks: &[&Key]| {
        let path = dir.0.join(name);
        std::fs::write(&path, ks.iter().map(|k| format!("{}\n", k.to_text())).collect::<String>()).unwrap();
        path.to_str().unwrap().to_string()
    };
    key_file("federation.key", &[&keys[0]]);
    let gossip: Vec<u16> =
        (0..3).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    for (i, c) in configs[..3].iter().enumerate() {
        let mut text = std::fs::read_to_string(c).unwrap();
        text.push_str(&format!(
            "\n[gossip]\nfederation = \"test\"\nbind = \"127.0.0.1:{}\"\nseeds = [\"127.0.0.1:{}\"]\nkey_file = \"federation.key\"\njurisdictions = [\"eu\"]\n",
            gossip[i], gossip[0]
        ));
        std::fs::write(c, text).unwrap();
    }
    let procs: Vec<Option<Proc>> = configs[..3].iter().map(|c| Some(Proc::start(c))).collect();
    agreed(&live(&procs), Duration::from_secs(20), None);
    let all = http[..3].join(",");
    common::trust(&http.join(","), &dir.0.join("pki/ca.pem"));
    bootstrap(&all, Duration::from_secs(20));

    let list = |addr: &str| json(&hanse(addr, &["federation", "key", "list", "--json"]));
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect()
    };
    let everywhere = |want: &[&str]| http[..3].iter().all(|a| ids(&list(a)) == want);
    eventually(Duration::from_secs(20), "gossip says all three servers hold the first key", || {
        let v = list(&http[0]);
        let holding = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["live"] == true && m["keys"] == serde_json::json!([hex[0]]));
        holding.count() == 3
    });
    assert_eq!(list(&http[0])["source"], "key_file");

    // Every server's refusals, sampled every 100 ms while the keys rotate.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, http) = (stop.clone(), http[..3].to_vec());
        std::thread::spawn(move || {
            let mut worst = 0u64;
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for a in &http {
                    if let Ok(m) = common::client(a).get_text("/metrics") {
                        samples += 1;
                        worst = worst.max(rejected(&m, "unknown_key") + rejected(&m, "bad_tag"));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (worst, samples)
        })
    };

    let ok = |o: std::process::Output| assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    let new_key = key_file("new.key", &[&keys[1]]);
    ok(hanse(&all, &["federation", "key", "install", "--key-file", &new_key]));
    eventually(Duration::from_secs(10), "all three hold both keys", || everywhere(&[&hex[0], &hex[1]]));
    // Sent to the third server: it waits until gossip says everyone holds it.
    ok(hanse(&http[2], &["federation", "key", "use", &hex[1]]));
    eventually(Duration::from_secs(10), "all three seal with the new key", || everywhere(&[&hex[1], &hex[0]]));
    let refused = hanse(&http[0], &["federation", "key", "remove", &hex[1]]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(common::text(&refused).contains("primary"), "{}", common::text(&refused));
    let not_installed = hanse(&http[0], &["federation", "key", "use", &hex[2]]);
    assert_eq!(not_installed.status.code(), Some(1));
    assert!(common::text(&not_installed).contains("not installed"), "{}", common::text(&not_installed));
    ok(hanse(&http[1], &["federation", "key", "remove", &hex[0]]));
    eventually(Duration::from_secs(10), "all three hold only the new key", || everywhere(&[&hex[1]]));
    assert_eq!(list(&http[0])["source"], "log");

    // SIGHUP with the key file as it was read at start (the old key only):
    // nothing changes, so a policy reload never undoes a rotation.
    let hup = |p: &Proc| unsafe { libc::kill(p.child.id() as i32, libc::SIGHUP) };
    let said = |p: &Proc, what: &str| p.lines.lock().unwrap().iter().any(|l| l.contains(what));
    let s1 = procs[0].as_ref().unwrap();
    assert_eq!(hup(s1), 0);
    eventually(Duration::from_secs(10), "s1 says its key file has no new key", || said(s1, "no new key"));
    assert!(everywhere(&[&hex[1]]));
    // A third key added to the file, then SIGHUP to one server: the cluster
    // installs it; the removed old key still in the file does not come back.
    key_file("federation.key", &[&keys[0], &keys[1], &keys[2]]);
    assert_eq!(hup(s1), 0);
    eventually(Duration::from_secs(10), "all three hold the new and the added key", || everywhere(&[&hex[1], &hex[2]]));
    assert!(said(s1, &format!("installed {}", hex[2])));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, samples) = sampler.join().unwrap();
    assert!(samples > 10, "the sampler read /metrics {samples} times");
    assert_eq!(worst, 0, "a server could not open gossip datagrams during the rotation");
    let metrics = common::client(&http[0]).get_text("/metrics").unwrap();
    assert!(metrics.contains("hanse_gossip_keyring_keys 2"), "{metrics}");

    // A member that still has only the old key is refused, and told about.
    let old_key = key_file("old.key", &[&keys[0]]);
    let stale = hanse(
        &http[0],
        &[
            "federation",
            "members",
            "--seed",
            &format!("127.0.0.1:{}", gossip[0]),
            "--key-file",
            &old_key,
            "--federation",
            "test",
            "--wait",
            "2",
        ],
    );
    assert_eq!(stale.status.code(), Some(1), "the stale member hears nothing: {}", common::text(&stale));
    eventually(Duration::from_secs(10), "s1 counts datagrams it cannot open", || {
        common::client(&http[0]).get_text("/metrics").is_ok_and(|m| rejected(&m, "unknown_key") > 0)
    });
    assert!(said(s1, "sealed with a key this member's keyring does not hold"), "s1 logs the refusals");
}

/// `hanse_gossip_datagrams_rejected_total{reason=...}` from a scrape.
fn rejected(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("hanse_gossip_datagrams_rejected_total{{reason=\"{reason}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}
