//! Gossip liveness with real `hanse server` processes on loopback, seen by
//! an observer member in this test: a server paused with SIGSTOP (a GC
//! pause, a stalled VM) is suspect, never dead (it was declared dead in
//! 0.5-1.2 s); one killed with SIGKILL is dead within the bound; one
//! stopped cleanly (SIGTERM) has left at once. Sampled every 50 ms: one
//! sample that says dead during a pause is the bug.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::transport::tls::{self, Identity, Role};
use common::{Bg, spawn};
use gossip::net::UdpNet;
use gossip::{Keyring, Liveness, Member, MemberConfig};

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Single-server clusters `names`, gossiping with one another.
struct Federation {
    dir: PathBuf,
    servers: Vec<(String, Bg)>,
    /// Each server's HTTP API address, by cluster.
    http: Vec<(String, SocketAddr)>,
    /// Each server's gossip address, in the order of `servers`.
    gossip: Vec<SocketAddr>,
    /// The federation's CA (with its key: tests issue impostors' certificates).
    ca: tls::PemPair,
    seed: SocketAddr,
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.servers.clear();
        if std::env::var_os("HANSE_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Federation {
    /// `policies`: (cluster, policy text) for the clusters that have one.
    fn start(test: &str, names: &[&str], policies: &[(&str, &str)]) -> Federation {
        Federation::start_with(test, names, policies, &[])
    }

    /// [`Federation::start`], with clusters whose clock is off: (cluster,
    /// a `faketime` offset such as "+2h").
    fn start_with(test: &str, names: &[&str], policies: &[(&str, &str)], clocks: &[(&str, &str)]) -> Federation {
        let dir = std::env::temp_dir().join(format!("hanse-cli-gossip-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pki")).unwrap();
        let ca = tls::create_ca("test", 1).unwrap();
        std::fs::write(dir.join("pki/ca.pem"), &ca.cert_pem).unwrap();
        let keygen = common::hanse_with(
            "127.0.0.1:1",
            None,
            None,
            &["federation", "keygen", "--out", dir.join("federation.key").to_str().unwrap()],
        );
        assert!(keygen.status.success(), "{}", common::text(&keygen));
        let gossip: Vec<SocketAddr> = names.iter().map(|_| free_udp()).collect();
        let mut servers = Vec::new();
        let mut http = Vec::new();
        for (name, at) in names.iter().zip(&gossip) {
            let pair = tls::issue(&ca, &Identity::new(name, Role::Server, "s1"), 1).unwrap();
            std::fs::write(dir.join(format!("pki/{name}.pem")), &pair.cert_pem).unwrap();
            std::fs::write(dir.join(format!("pki/{name}-key.pem")), &pair.key_pem).unwrap();
            let config = dir.join(format!("{name}.toml"));
            let api = free_tcp();
            http.push((name.to_string(), api));
            let policy = match policies.iter().find(|(c, _)| c == name) {
                Some((_, text)) => {
                    std::fs::write(dir.join(format!("policy-{name}.toml")), text).unwrap();
                    format!("\n[federation]\npolicy = \"policy-{name}.toml\"\n")
                }
                None => String::new(),
            };
            std::fs::write(
                &config,
                format!(
                    "[server]\nname = \"s1\"\ncluster = \"{name}\"\nid = 1\ndata_dir = \"data/{name}\"\n\
                     bind = \"{}\"\nhttp = \"{}\"\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/{name}.pem\"\n\
                     key = \"pki/{name}-key.pem\"\n\n[gossip]\nbind = \"{at}\"\nseeds = [\"{}\"]\n\
                     key_file = \"federation.key\"\n{policy}",
                    free_udp(),
                    api,
                    gossip[0]
                ),
            )
            .unwrap();
            let clock = clocks.iter().find(|(c, _)| c == name).map(|(_, o)| *o);
            servers.push((name.to_string(), server(&dir, name, clock)));
        }
        Federation { dir, servers, http, seed: gossip[0], gossip, ca }
    }

    /// Kills `name`'s server (SIGKILL) and starts it again from the same
    /// configuration: on its old data, or on an empty data directory
    /// (`rebuilt`), and with its clock off by `clock` (faketime) if given.
    fn restart(&mut self, name: &str, rebuilt: bool, clock: Option<&str>) {
        let at = self.servers.iter().position(|(n, _)| n == name).unwrap();
        self.servers[at].1.kill9();
        if rebuilt {
            std::fs::remove_dir_all(self.dir.join("data").join(name)).unwrap();
        }
        self.servers[at].1 = server(&self.dir, name, clock);
    }

    /// `cluster`'s API address, trusted and bootstrapped.
    fn api(&self, cluster: &str) -> String {
        let at = self.http.iter().find(|(n, _)| n == cluster).unwrap().1.to_string();
        common::trust(&at, &self.dir.join("pki/ca.pem"));
        common::bootstrap(&at, Duration::from_secs(20));
        at
    }

    fn server(&self, name: &str) -> &Bg {
        &self.servers.iter().find(|(n, _)| n == name).unwrap().1
    }

    /// An observer of the federation's gossip, in this process.
    /// It checks identities against the federation's CA, as servers do.
    async fn observer(&self) -> Member {
        let mut config = MemberConfig::new("hanse", "test-observer", "observer", "127.0.0.1:0".parse().unwrap());
        config.role = gossip::member::Role::Observer;
        config.seeds = vec![self.seed.to_string()];
        config.trust = Some(Arc::new(tls::Trust::new(&self.ca.cert_pem).unwrap()));
        Member::start(config, self.keyring(), Arc::new(UdpNet)).await.unwrap()
    }

    /// The federation's gossip keyring: whoever holds it can gossip.
    fn keyring(&self) -> Keyring {
        let text = std::fs::read_to_string(self.dir.join("federation.key")).unwrap();
        let keys: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        Keyring::from_texts(&keys).expect("the federation's key file")
    }

    /// A second server with `of`'s configuration and certificate (a copied
    /// config): its own ports and data; returns its API address.
    fn twin(&mut self, of: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{of}.toml"))).unwrap();
        let at = self.servers.iter().position(|(n, _)| n == of).unwrap();
        let api = free_tcp();
        let text = text
            .replace(&format!("data/{of}\""), &format!("data/{of}-twin\""))
            .replace(&self.http[at].1.to_string(), &api.to_string())
            .replace(&format!("bind = \"{}\"", self.gossip[at]), &format!("bind = \"{}\"", free_udp()));
        let raft = text.lines().find(|l| l.starts_with("bind = ")).unwrap().to_string();
        let text = text.replacen(&raft, &format!("bind = \"{}\"", free_udp()), 1);
        let name = format!("{of}-twin");
        std::fs::write(self.dir.join(format!("{name}.toml")), text).unwrap();
        self.servers.push((name.clone(), server(&self.dir, &name, None)));
        common::trust(&api.to_string(), &self.dir.join("pki/ca.pem"));
        api.to_string()
    }
}

/// Starts cluster `name`'s server from its configuration in `dir`, under
/// `faketime -f CLOCK` if given (the monotonic clock left alone).
fn server(dir: &std::path::Path, name: &str, clock: Option<&str>) -> Bg {
    let config = dir.join(format!("{name}.toml"));
    let Some(offset) = clock else { return spawn(dir, name, &["server", "--config", config.to_str().unwrap()]) };
    let faketime = std::process::Command::new("faketime").arg("--version").output();
    assert!(faketime.is_ok(), "this test needs faketime (`apt-get install faketime`; .ci/run installs it)");
    let mut c = std::process::Command::new("faketime");
    c.args(["-f", offset, env!("CARGO_BIN_EXE_hanse"), "server", "--config", config.to_str().unwrap()]);
    c.env("DONT_FAKE_MONOTONIC", "1");
    common::spawn_command(dir, name, c)
}

/// The tests here run one at a time: a pause's margins are a few hundred
/// milliseconds, which a second federation starting beside it can eat.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What `observer` says of `cluster` every 50 ms for `span`: every level seen.
async fn sample(observer: &Member, cluster: &str, span: Duration) -> Vec<Liveness> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < span {
        if let Some(l) = observer.view().cluster(cluster).map(|c| c.liveness) {
            if seen.last() != Some(&l) {
                seen.push(l);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// Until `observer` says `cluster` is `want`, at most `limit`: how long.
async fn until(observer: &Member, cluster: &str, want: Liveness, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if observer.view().cluster(cluster).is_some_and(|c| c.liveness == want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{cluster} not {want:?} within {limit:?}: {:?}",
            observer.view().cluster(cluster)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_paused_server_is_suspect_never_dead_a_killed_one_dead_and_a_stopped_one_left() {
    let _alone = one_at_a_time();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(levels());
}

async fn levels() {
    let f = Federation::start("levels", &["paused", "killed", "stopped"], &[]);
    let observer = f.observer().await;
    for c in ["paused", "killed", "stopped"] {
        until(&observer, c, Liveness::Alive, Duration::from_secs(30)).await;
    }

    // Paused for 1.5 s (the field case), then 2.5 s: suspect at most, and
    // alive after. (The detector allows 3 s; a loaded test machine may add
    // half a second before the resumed server is heard again.)
    for pause in [Duration::from_millis(1_500), Duration::from_millis(2_500)] {
        // Stopped and continued by a thread of its own, on time whatever
        // this runtime is busy with; sampled meanwhile, and after until
        // the server is heard again.
        let pid = f.server("paused").pid();
        let pauser = std::thread::spawn(move || {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            let start = Instant::now();
            std::thread::sleep(pause);
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            start.elapsed()
        });
        let mut seen = sample(&observer, "paused", pause).await;
        let paused_for = pauser.join().unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) && seen.last() != Some(&Liveness::Alive) {
            seen.extend(sample(&observer, "paused", Duration::from_millis(100)).await);
        }
        assert!(!seen.contains(&Liveness::Dead), "paused {paused_for:?}: {seen:?}");
        if pause >= Duration::from_millis(2_500) {
            assert!(seen.contains(&Liveness::Suspect), "paused {paused_for:?}, never suspect: {seen:?}");
        }
        until(&observer, "paused", Liveness::Alive, Duration::from_secs(5)).await;
    }

    // Killed: dead within 3 s + 2 s (and a second of slack for this machine).
    let start = Instant::now();
    f.servers.iter().find(|(n, _)| n == "killed").unwrap().1.signal(libc::SIGKILL);
    until(&observer, "killed", Liveness::Dead, Duration::from_secs(6)).await;
    let dead_after = start.elapsed();
    assert!(dead_after > Duration::from_secs(3), "dead after {dead_after:?}: a 3 s pause would be taken for death");

    // Stopped cleanly: left, at once, never dead.
    let start = Instant::now();
    f.server("stopped").signal(libc::SIGTERM);
    until(&observer, "stopped", Liveness::Left, Duration::from_secs(3)).await;
    let left_after = start.elapsed();
    let later = sample(&observer, "stopped", Duration::from_secs(2)).await;
    assert_eq!(later, vec![Liveness::Left], "left stays left");
    println!("dead after {dead_after:?}, left after {left_after:?}");
    observer.shutdown().await.unwrap();
}

/// A policy naming a peer that does not exist (`us-eats`) checked clean and
/// ran without a word; the work waited silently. Now `policy check
/// --members` warns at its line with the likely spelling, the server logs
/// it, and `job status` names it where the work waits.
#[test]
fn a_policy_naming_a_peer_that_is_not_in_the_federation_is_said() {
    let _alone = one_at_a_time();
    let policy = "[cluster]\nname = \"home\"\n\n[[peer]]\ncluster = \"us-east\"\ndelegate_to = true\n\n\
                  [[peer]]\ncluster = \"us-eats\"\ndelegate_to = true\n\n[overflow]\nwhen = [\"unplaceable\"]\n\
                  max_remote_share = 1.0\n";
    let f = Federation::start("policy", &["home", "us-east"], &[("home", policy)]);
    let home = f.api("home");
    common::eventually(Duration::from_secs(30), "home's gossip meets us-east", || {
        let o = common::hanse(&home, &["federation", "members", "--json"]);
        o.status.success() && common::text(&o).contains("\"us-east\"")
    });
    let file = f.dir.join("policy-home.toml");
    let out = common::hanse(&home, &["policy", "check", file.to_str().unwrap(), "--members", &home]);
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(0), "a warning, not an error: {text}");
    assert!(
        text.contains("peer `us-eats` is not in the federation") && text.contains("did you mean `us-east`"),
        "{text}"
    );
    assert!(text.contains("policy-home.toml:9:"), "at its line: {text}");
    assert!(!text.contains("peer `us-east`"), "{text}");

    // A job no node here can take waits for a peer: us-eats is named.
    let job = f.dir.join("job.toml");
    std::fs::write(
        &job,
        "[job]\nname = \"big\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\n\
         resources = { cpu = \"1\", memory = \"1GiB\" }\n",
    )
    .unwrap();
    let run = common::hanse(&home, &["job", "run", "--detach", job.to_str().unwrap()]);
    assert!(run.status.success(), "{}", common::text(&run));
    common::eventually(Duration::from_secs(30), "job status names the missing peer", || {
        let o = common::hanse(&home, &["job", "status", "big"]);
        common::text(&o).contains("us-eats: not in the federation; did you mean us-east?")
    });
    // And the server logs it, once gossip had its time.
    common::eventually(Duration::from_secs(30), "the server logs the unknown peer", || {
        let log = std::fs::read_to_string(f.dir.join("home.log")).unwrap_or_default();
        log.contains("names peers gossip does not know: us-eats (did you mean us-east?)")
    });
}

/// Until `observer` shows `cluster`'s summary with `nodes` nodes ready,
/// at most 30 s: that summary.
async fn until_nodes(observer: &Member, cluster: &str, nodes: u32) -> gossip::ClusterSummary {
    let start = Instant::now();
    loop {
        let summary = observer.view().cluster(cluster).and_then(|c| c.summary.clone());
        if let Some(s) = summary.filter(|s| s.nodes_ready == nodes) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{nodes} nodes of {cluster} not shown: {:?}",
            observer.view().cluster(cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The nodes ready in `observer`'s summary of `cluster`.
fn shown(observer: &Member, cluster: &str) -> Option<u32> {
    Some(observer.view().cluster(cluster)?.summary.as_ref()?.nodes_ready)
}

/// Simulated nodes from the example fleet registered with `api`.
fn nodes(f: &Federation, name: &str, api: &str, count: u32) -> Bg {
    nodes_of(f, name, api, concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fleets/eu-west.toml"), count)
}

/// Simulated nodes of `fleet` (a fleet file) registered with `api`.
fn nodes_of(f: &Federation, name: &str, api: &str, fleet: &str, count: u32) -> Bg {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hanse"));
    c.env("HANSE_ADDR", api).env("HANSE_TOKEN", common::TOKEN).env("HANSE_CACERT", f.dir.join("pki/ca.pem")).args([
        "node",
        "simulate",
        "--fleet",
        fleet,
        "--count",
        &count.to_string(),
    ]);
    common::spawn_command(&f.dir, &format!("{name}-nodes"), c)
}

/// Clocks do not order gossip. A server 2 h ahead disappeared from every
/// view without a word: now its peers refuse it and say so (log line with
/// its address and offset, `/metrics`, `federation members`). A server
/// restarted with its clock stepped back 50 s stayed dead in every view,
/// its own included: now it is alive. A cluster rebuilt on empty disks
/// with a smaller fleet kept its old, larger summary: now its new
/// incarnation's summary is shown.
#[test]
fn clocks_do_not_order_gossip_and_a_rebuilt_cluster_is_shown_as_it_is() {
    let _alone = one_at_a_time();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(clocks());
}

async fn clocks() {
    // The federation's API routes come with a policy.
    let policies = [("home", "[cluster]\nname = \"home\"\n"), ("back", "[cluster]\nname = \"back\"\n")];
    let mut f = Federation::start_with("clocks", &["home", "ahead", "back", "rebuilt"], &policies, &[("ahead", "+2h")]);
    let observer = f.observer().await;
    for c in ["home", "back", "rebuilt"] {
        until(&observer, c, Liveness::Alive, Duration::from_secs(30)).await;
    }
    let home = f.api("home");

    // 2 h ahead: refused, and said.
    let ahead_at = f.gossip[1];
    common::eventually(Duration::from_secs(20), "home logs the clock that is ahead", || {
        let log = std::fs::read_to_string(f.dir.join("home.log")).unwrap_or_default();
        log.lines().any(|l| {
            l.contains(&format!("gossip from {ahead_at} is refused: its clock is 720")) && l.contains("ahead of")
        })
    });
    let metrics = common::client(&home).get_text("/metrics").unwrap();
    let skew = metrics
        .lines()
        .find(|l| l.starts_with("hanse_gossip_datagrams_rejected_total{reason=\"clock_skew\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(skew.is_some_and(|n| n > 0), "{metrics}");
    assert!(metrics.lines().any(|l| l == "hanse_gossip_peers_clock_skewed 1"), "{metrics}");
    let members = common::hanse(&home, &["federation", "members"]);
    let text = common::text(&members);
    assert!(members.status.success(), "{text}");
    assert!(text.contains(&format!("warning: gossip from {ahead_at} is refused: its clock is 720")), "{text}");
    assert!(observer.view().cluster("ahead").is_none_or(|c| c.liveness != Liveness::Alive));

    // Restarted with its clock 50 s back: alive again, and stays so.
    let back = f.api("back");
    f.restart("back", false, Some("-50s"));
    let back_again = until(&observer, "back", Liveness::Alive, Duration::from_secs(15)).await;
    let seen = sample(&observer, "back", Duration::from_secs(3)).await;
    assert_eq!(seen, vec![Liveness::Alive], "after {back_again:?}");
    common::eventually(Duration::from_secs(20), "back shows itself alive", || {
        let o = common::hanse(&back, &["federation", "members", "--json"]);
        o.status.success()
            && common::json(&o).as_array().unwrap().iter().any(|r| r["cluster"] == "back" && r["status"] == "alive")
    });

    // Rebuilt on an empty disk, with 2 nodes instead of 12.
    let rebuilt = f.api("rebuilt");
    let mut big = nodes(&f, "rebuilt", &rebuilt, 12);
    until_nodes(&observer, "rebuilt", 12).await;
    big.kill9();
    f.restart("rebuilt", true, None);
    common::bootstrap(&rebuilt, Duration::from_secs(20));
    let _small = nodes(&f, "rebuilt", &rebuilt, 2);
    let summary = until_nodes(&observer, "rebuilt", 2).await;
    assert!(summary.incarnation >= 1, "{summary:?}");
    common::eventually(Duration::from_secs(20), "home shows the rebuilt cluster as it is", || {
        let o = common::hanse(&home, &["federation", "members", "--json"]);
        o.status.success()
            && common::json(&o)
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["cluster"] == "rebuilt" && r["summary"]["nodes_ready"] == 2)
    });
    observer.shutdown().await.unwrap();
}

/// Identities bound to certificates. Anyone holding the federation's key
/// could publish any cluster's name (overflow work ran on an impostor), and
/// two servers named `us-east/s1` took turns in every view. Now a member
/// whose certificate names another cluster is refused and reported, and of
/// two servers with one name and a valid certificate (a copied config), the
/// first keeps it: the other's summary is never shown, sampled every 50 ms.
#[test]
fn an_impostor_is_refused_and_a_second_server_under_a_taken_name_is_never_merged() {
    let _alone = one_at_a_time();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(impostors());
}

async fn impostors() {
    let policies = [("home", "[cluster]\nname = \"home\"\n")];
    let mut f = Federation::start("impostors", &["home", "us-east"], &policies);
    let observer = f.observer().await;
    for c in ["home", "us-east"] {
        until(&observer, c, Liveness::Alive, Duration::from_secs(30)).await;
    }
    let home = f.api("home");
    let us = f.api("us-east");
    let _six = nodes(&f, "us-east", &us, 6);
    until_nodes(&observer, "us-east", 6).await;

    // An impostor holding the gossip key and a certificate for another
    // cluster, claiming to be us-east/s1 with 960 cores in the EU.
    let mallory = tls::issue(&f.ca, &Identity::new("mallory", Role::Server, "s1"), 1).unwrap();
    let mut config = MemberConfig::new("hanse", "us-east", "s1", "127.0.0.1:0".parse().unwrap());
    config.seeds = vec![f.seed.to_string()];
    config.signer = Some(Arc::new(tls::Signer::new(&mallory).unwrap()));
    let impostor = Member::start(config, f.keyring(), Arc::new(UdpNet)).await.unwrap();
    let fake = gossip::ClusterSummary {
        cluster: "us-east".into(),
        incarnation: 9,
        term: 99,
        nodes_ready: 60,
        jurisdictions: vec!["eu".into()],
        ..Default::default()
    };
    impostor.publish_summary(fake, gossip::transport::unix_ms()).await.unwrap();
    let impostor_at = impostor.local_addr();

    // A copied configuration: us-east/s1 again, with its valid certificate
    // and a cluster of its own, of 1 node.
    let twin = f.twin("us-east");
    common::bootstrap(&twin, Duration::from_secs(20));
    let _one = nodes(&f, "us-east-twin", &twin, 1);

    // Sampled every 50 ms for 8 s: us-east is its 6 nodes throughout.
    let start = Instant::now();
    let mut samples = 0;
    while start.elapsed() < Duration::from_secs(8) {
        assert_eq!(shown(&observer, "us-east"), Some(6), "after {:?}", start.elapsed());
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(samples > 100, "{samples} samples");

    // home (a real server) refused the impostor and reports the twin.
    common::eventually(Duration::from_secs(20), "home logs the impostor and the name claimed twice", || {
        let log = std::fs::read_to_string(f.dir.join("home.log")).unwrap_or_default();
        log.contains(&format!(
            "gossip member us-east/s1 at {impostor_at} is refused: its certificate names mallory/server/s1"
        )) && log.contains("two live gossip members claim the server name us-east/s1")
    });
    let metrics = common::client(&home).get_text("/metrics").unwrap();
    let counter = |name: &str| {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert!(counter("hanse_gossip_members_refused_total").is_some_and(|n| n >= 1), "{metrics}");
    assert!(counter("hanse_gossip_name_conflicts_total").is_some_and(|n| n >= 1), "{metrics}");
    let members = common::hanse(&home, &["federation", "members", "--json"]);
    let rows = common::json(&members);
    let row = rows.as_array().unwrap().iter().find(|r| r["cluster"] == "us-east").unwrap().clone();
    assert_eq!(row["summary"]["nodes_ready"], 6, "{row}");
    assert_eq!(row["summary"]["jurisdictions"], serde_json::json!([]), "{row}");
    let said = common::text(&common::hanse(&home, &["federation", "members"]));
    assert!(said.contains("server name us-east/s1 is claimed by 2 live members"), "{said}");
    assert!(said.contains(&format!("gossip member us-east/s1 at {impostor_at} is refused")), "{said}");
    impostor.shutdown().await.unwrap();
    observer.shutdown().await.unwrap();
}

/// Summaries that fit. A fleet of 12 GPU models was summarised as 8 (64 of
/// 96 GPUs), and one of 30 long class names made a summary over the 4 KB
/// bound: never republished, an error every 500 ms, peers kept the first,
/// empty one. Now every node and GPU is counted, all 12 models are named,
/// the cut names are flagged, and the server warns once.
#[test]
fn a_varied_fleet_is_summarised_whole_with_one_warning() {
    let _alone = one_at_a_time();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(varied());
}

async fn varied() {
    let f = Federation::start("varied", &["varied"], &[]);
    let observer = f.observer().await;
    until(&observer, "varied", Liveness::Alive, Duration::from_secs(30)).await;
    let api = f.api("varied");
    let mut fleet = String::from("[fleet]\nname = \"varied\"\n");
    for i in 0..30 {
        fleet.push_str(&format!(
            "[[class]]\nname = \"{}-{i:02}\"\ncount = 1\ncpu = 16\nmemory = \"64GiB\"\n\
             gpus = {{ model = \"accelerator-model-{:02}\", count = 8 }}\n",
            "a-rack-class-with-a-name-far-longer-than-gossip-wants".repeat(2),
            i % 12
        ));
    }
    let file = f.dir.join("varied-fleet.toml");
    std::fs::write(&file, fleet).unwrap();
    let _nodes = nodes_of(&f, "varied", &api, file.to_str().unwrap(), 30);
    let summary = until_nodes(&observer, "varied", 30).await;
    assert!(gossip::summary::ClusterSummary::decode(&summary.encode().unwrap()).is_ok());
    assert_eq!(summary.gpus.len(), 12, "every model named: {:?}", summary.gpus);
    assert_eq!(summary.free_gpus(), 240, "every GPU counted");
    assert!(summary.free_gpus_of("accelerator-model-11") >= 8);
    assert_eq!(summary.total().cpu_millis, 30 * 16_000);
    assert_eq!(summary.folded.names_cut, 30, "{}", summary.folded);
    // A few more publications' time: one warning, no error.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::read_to_string(f.dir.join("varied.log")).unwrap();
    assert_eq!(log.matches("does not fit a 4096-byte summary").count(), 1, "{log}");
    assert!(!log.contains("cannot publish the cluster's summary"), "{log}");
    observer.shutdown().await.unwrap();
}
