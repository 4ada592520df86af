//! `hanse dev --no-demo` in a subprocess: three clusters come up and see
//! each other; a job too big for eu-west runs partly in a peer cluster;
//! SIGTERM stops it all and removes its data.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{hanse_with, json, text};

struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A base port whose cluster ports (base + 100 i + j) are all free now.
fn free_base() -> u16 {
    let start = 20_000 + (std::process::id() % 200) as u16 * 100;
    (0..50u16)
        .map(|k| start.wrapping_add(k * 7) % 40_000 + 20_000)
        .find(|b| (0..3u16).all(|i| std::net::TcpListener::bind(("127.0.0.1", b + 100 * i)).is_ok()))
        .expect("a free port range")
}

#[test]
fn dev_runs_a_federation_whose_overflow_lands_in_a_peer() {
    let base = free_base().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hanse"))
        .args(["dev", "--no-demo", "--servers", "1", "--nodes", "20", "--http-base", &base])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hanse dev");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut dev = Bg(child);

    // The printed lines: the data directory, one HANSE_ADDR per cluster,
    // then the management token to export.
    let mut data_dir = None;
    let mut addrs: Vec<(String, String)> = Vec::new();
    let (mut token, mut ca) = (None, None);
    let start = Instant::now();
    while addrs.len() < 3 || token.is_none() || ca.is_none() {
        let left = Duration::from_secs(90).saturating_sub(start.elapsed());
        let line = rx.recv_timeout(left).expect("hanse dev printed its clusters within 90 s");
        if let Some(d) = line.split("data in ").nth(1) {
            data_dir = Some(std::path::PathBuf::from(d.trim()));
        }
        if let Some(a) = line.split("HANSE_ADDR=").nth(1).filter(|_| !line.contains("export")) {
            addrs.push((line.split_whitespace().next().unwrap().to_string(), a.trim().to_string()));
        }
        if let Some(t) = line.split("export HANSE_TOKEN=").nth(1) {
            token = t.split_whitespace().next().map(str::to_string);
        }
        if let Some(c) = line.split("export HANSE_CACERT=").nth(1) {
            ca = c.split_whitespace().next().map(std::path::PathBuf::from);
        }
    }
    let (token, ca) = (token.unwrap(), ca.unwrap());
    let hanse = |address: &str, args: &[&str]| hanse_with(address, Some(&token), Some(&ca), args);
    let names: Vec<&str> = addrs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["eu-west", "us-east", "edge-1"]);
    let data_dir = data_dir.expect("the data directory is printed");
    assert!(data_dir.exists());
    let eu = addrs[0].1.clone();
    // Secure by default, dev included: no token, no answer.
    let anonymous = hanse_with(&eu, None, Some(&ca), &["job", "list"]);
    assert_eq!(anonymous.status.code(), Some(1), "{}", text(&anonymous));
    assert!(text(&anonymous).contains("needs an ACL token"), "{}", text(&anonymous));

    let members = json(&hanse(&eu, &["federation", "members", "--json"]));
    let alive: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"] == "alive")
        .map(|m| m["cluster"].as_str().unwrap())
        .collect();
    assert_eq!(alive.len(), 3, "three live clusters: {members}");

    // 20 eu-west nodes cannot run 300 instances of 4 cores.
    let spec = std::env::temp_dir().join(format!("hanse-dev-test-{}.toml", std::process::id()));
    std::fs::write(
        &spec,
        "[job]\nname = \"big\"\ntype = \"batch\"\n\n[job.federation]\nmax_remote_share = 0.9\n\n[[group]]\nname = \"g\"\ncount = 300\n\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nrun_for = \"10m\"\nresources = { cpu = 4, memory = \"1GiB\" }\n",
    )
    .unwrap();
    let run = hanse(&eu, &["job", "run", spec.to_str().unwrap(), "--detach"]);
    let _ = std::fs::remove_file(&spec);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    // Delegated, and running in the peer it was delegated to.
    let limit = Instant::now() + Duration::from_secs(60);
    let (target, job) = loop {
        let d = json(&hanse(&eu, &["federation", "delegations", "--json"]));
        let running =
            d["outbound"].as_array().unwrap().iter().find(|o| o["state"] == "registered" && o["job"] == "big");
        if let Some(o) = running {
            let id = o["id"].as_str().unwrap().to_string();
            break (o["target"].as_str().unwrap().to_string(), id);
        }
        assert!(Instant::now() < limit, "nothing of `big` delegated within 60 s: {d}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let peer = &addrs.iter().find(|(n, _)| *n == target).expect("a known cluster").1;
    // Registered there before it is placed and its nodes report it
    // running: wait for that.
    let limit = Instant::now() + Duration::from_secs(20);
    let here = loop {
        let inbound = json(&hanse(peer, &["federation", "delegations", "--json"]));
        let here = inbound["inbound"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == job.as_str())
            .expect("inbound there")
            .clone();
        if here["running"].as_u64().unwrap() > 0 {
            break here;
        }
        assert!(Instant::now() < limit, "registered in {target} but nothing running there within 20 s: {inbound}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let peer_job = here["job"].as_str().unwrap();
    let status = json(&hanse(peer, &["job", "status", peer_job, "--json"]));
    let running = status["allocations"].as_array().unwrap().iter().filter(|a| a["status"] == "running").count();
    assert!(running > 0, "the delegated instances run in {target}: {status}");

    // SIGTERM: a clean stop, the temporary data removed.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dev.0.id() as i32, libc::SIGTERM) };
    let limit = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = dev.0.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < limit, "hanse dev did not stop within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(0));
    assert!(!data_dir.exists(), "{} is left behind", data_dir.display());
}
