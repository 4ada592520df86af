//! `hanse federation ...`: keys and membership of the federation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cluster_core::resources::{fmt_bytes, fmt_cpu};
use gossip::net::UdpNet;
use gossip::transport::unix_ms;
use gossip::{ClusterEntry, FederationView, Key, Keyring, Liveness, Member, MemberConfig, Role};
use serde::Serialize;

use crate::Outcome;
use crate::output::{print_json, table, write_private};

/// Writes a new key, or prints it.
pub fn keygen(out: Option<&Path>) -> anyhow::Result<Outcome> {
    let key = Key::generate();
    match out {
        None => println!("{}", key.to_text()),
        Some(path) => {
            write_private(path, &format!("{}\n", key.to_text()))?;
            eprintln!("wrote key {:08x} to {}", key.id(), path.display());
        }
    }
    Ok(Outcome::Ok)
}

/// Reads a keyring file: one key a line, the first primary; `#` comments.
pub fn read_keyring(path: &Path) -> anyhow::Result<Keyring> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let keys: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    Keyring::from_texts(&keys).with_context(|| format!("{}: bad key file", path.display()))
}

pub struct MembersArgs {
    pub seeds: Vec<String>,
    pub key_file: PathBuf,
    pub federation: String,
    pub bind: SocketAddr,
    pub wait: Duration,
    pub json: bool,
}

#[derive(Serialize)]
struct Row<'a> {
    cluster: &'a str,
    region: &'a str,
    status: Liveness,
    leader: Option<&'a str>,
    servers_live: usize,
    servers: usize,
    free_cpu_millis: Option<u64>,
    free_memory_bytes: Option<u64>,
    free_gpus: Option<u32>,
    summary_age_ms: Option<u64>,
    summary: Option<&'a gossip::ClusterSummary>,
}

/// Joins the federation's gossip as an observer, waits until the view of
/// the federation stops changing (or `wait` passes), prints it, and leaves.
pub async fn members(args: MembersArgs) -> anyhow::Result<Outcome> {
    if args.seeds.is_empty() {
        bail!("give at least one --seed address of a server's gossip port (e.g. --seed 127.0.0.1:7946)");
    }
    let keyring = read_keyring(&args.key_file)?;
    let mut config = MemberConfig::new(&args.federation, "cli", &format!("observer-{}", std::process::id()), args.bind);
    config.role = Role::Observer;
    config.seeds = args.seeds.clone();
    let member = Member::start(config, keyring, Arc::new(UdpNet)).await.context("starting the gossip observer")?;
    let view = settle(&member, args.wait).await;
    member.shutdown().await.ok();
    if view.clusters.is_empty() {
        bail!(
            "no cluster answered within {:?}: check that --seed names a server's gossip address, that the key \
             file holds the federation's key, and that --federation is {:?}",
            args.wait,
            args.federation
        );
    }
    let now = unix_ms();
    let rows: Vec<Row> = view.clusters.values().map(|c| row(c, now)).collect();
    if args.json {
        print_json(&rows)?;
    } else {
        let mut t = table(&[
            "cluster",
            "region",
            "status",
            "leader",
            "servers",
            "free cores",
            "free memory",
            "free gpus",
            "summary age",
        ]);
        for r in &rows {
            let dash = || "-".to_string();
            t.add_row(vec![
                r.cluster.to_string(),
                r.region.to_string(),
                format!("{:?}", r.status).to_lowercase(),
                r.leader.unwrap_or("-").to_string(),
                format!("{}/{}", r.servers_live, r.servers),
                r.free_cpu_millis.map_or_else(dash, fmt_cpu),
                r.free_memory_bytes.map_or_else(dash, fmt_bytes),
                r.free_gpus.map_or_else(dash, |g| g.to_string()),
                r.summary_age_ms.map_or_else(dash, |a| format!("{:.1}s", a as f64 / 1000.0)),
            ]);
        }
        println!("{t}");
    }
    Ok(Outcome::Ok)
}

fn row(c: &ClusterEntry, now: u64) -> Row<'_> {
    let free = c.summary.as_ref().map(|s| s.free());
    Row {
        cluster: &c.cluster,
        region: &c.region,
        status: c.liveness,
        leader: c.leader.as_deref(),
        servers_live: c.servers.values().filter(|s| s.live).count(),
        servers: c.servers.len(),
        free_cpu_millis: free.map(|f| f.cpu_millis),
        free_memory_bytes: free.map(|f| f.memory_bytes),
        free_gpus: c.summary.as_ref().map(|s| s.free_gpus()),
        summary_age_ms: c.summary_age_ms(now),
        summary: c.summary.as_ref(),
    }
}

/// Waits until the set of clusters and their summaries has not changed for
/// a second, or `wait` passes; shows that it is waiting when on a terminal.
async fn settle(member: &Member, wait: Duration) -> Arc<FederationView> {
    let start = Instant::now();
    let mut watch = member.watch();
    let mut last_change = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        let remaining = wait.saturating_sub(start.elapsed());
        let quiet = Duration::from_secs(1).saturating_sub(last_change.elapsed());
        let seen = !member.view().clusters.is_empty();
        if remaining.is_zero() || (seen && quiet.is_zero()) {
            break;
        }
        if tty {
            eprint!("\rwaiting for gossip: {} clusters seen ", member.view().clusters.len());
        }
        let step = remaining.min(if seen { quiet } else { Duration::from_millis(200) });
        if let Ok(Ok(())) = tokio::time::timeout(step, watch.changed()).await {
            last_change = Instant::now();
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
    member.view()
}
