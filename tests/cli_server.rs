//! `hanse server` as real processes on loopback: three servers elect a
//! leader; `kill -9` of the leader gets a new one; the killed server,
//! restarted on its data directory, rejoins. Every wait is bounded and
//! every process is killed by its handle when the test ends.

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
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hanse server");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
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

fn setup() -> (Dir, Vec<PathBuf>) {
    let dir = std::env::temp_dir().join(format!("hanse-cli-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pki")).unwrap();
    let ca = tls::create_ca("test", 1).unwrap();
    std::fs::write(dir.join("pki/ca.pem"), &ca.cert_pem).unwrap();
    let ports: Vec<u16> =
        (0..3).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let mut configs = Vec::new();
    for i in 1..=3usize {
        let pair = tls::issue(&ca, &Identity::new("eu-west", Role::Server, &format!("s{i}")), 1).unwrap();
        std::fs::write(dir.join(format!("pki/s{i}.pem")), &pair.cert_pem).unwrap();
        std::fs::write(dir.join(format!("pki/s{i}-key.pem")), &pair.key_pem).unwrap();
        let mut text = format!(
            "[server]\nname = \"s{i}\"\ncluster = \"eu-west\"\nid = {i}\ndata_dir = \"data/s{i}\"\nbind = \"127.0.0.1:{}\"\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/s{i}.pem\"\nkey = \"pki/s{i}-key.pem\"\n",
            ports[i - 1]
        );
        for j in (1..=3).filter(|j| *j != i) {
            text.push_str(&format!("\n[[peer]]\nid = {j}\naddress = \"127.0.0.1:{}\"\n", ports[j - 1]));
        }
        let path = dir.join(format!("s{i}.toml"));
        std::fs::write(&path, text).unwrap();
        configs.push(path);
    }
    (Dir(dir), configs)
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
    let (_dir, configs) = setup();
    let mut procs: Vec<Option<Proc>> = configs.iter().map(|c| Some(Proc::start(c))).collect();
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
