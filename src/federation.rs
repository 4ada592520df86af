//! `hanse federation ...`: keys and membership of the federation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cluster_core::resources::{fmt_bytes, fmt_cpu};
use cluster_core::server::client::Client;
use federation::api::{GossipTrouble, MemberRow};
use federation::keyring::{KeyChange, KeyOp, KeyringView};
use gossip::net::UdpNet;
use gossip::{FederationView, Key, Keyring, Member, MemberConfig, Role};

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

const KEYRING: &str = "/v1/federation/keyring";

fn keyring_error(e: cluster_core::server::client::ClientError) -> anyhow::Error {
    match e.status() {
        Some(404) => anyhow::anyhow!(
            "this server has no keyring API: it takes no part in gossip (no [gossip] section in its config), \
             or runs an older Hanse"
        ),
        _ => anyhow::anyhow!("{e}"),
    }
}

/// `hanse federation key list`.
pub fn key_list(c: &Client, primary: bool, json: bool) -> anyhow::Result<Outcome> {
    let v: KeyringView = c.get(KEYRING).map_err(keyring_error)?;
    if primary {
        println!("{}", v.keys.first().map_or("", String::as_str));
        return Ok(Outcome::Ok);
    }
    show_keyring(&v, json)
}

fn show_keyring(v: &KeyringView, json: bool) -> anyhow::Result<Outcome> {
    if json {
        print_json(v)?;
        return Ok(Outcome::Ok);
    }
    let source = if v.source == "log" { "committed to the cluster's log" } else { "from its key file" };
    println!("{}/{}: {} ({source})", v.cluster, v.server, marked(&v.keys));
    let mut t = table(&["server", "live", "keys (* seals)"]);
    for m in &v.members {
        t.add_row(vec![m.name(), if m.live { "yes" } else { "no" }.into(), marked(&m.keys)]);
    }
    println!("{t}");
    Ok(Outcome::Ok)
}

/// Key ids, the primary marked.
fn marked(ids: &[String]) -> String {
    if ids.is_empty() {
        return "(not said)".into();
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| if i == 0 { format!("{id}*") } else { id.clone() })
        .collect::<Vec<_>>()
        .join(" ")
}

fn key_change(c: &Client, op: KeyOp, key: String, force: bool, json: bool) -> anyhow::Result<Outcome> {
    let v: KeyringView = c.post(KEYRING, &KeyChange { op, key, force }).map_err(keyring_error)?;
    show_keyring(&v, json)
}

/// `hanse federation key install`.
pub fn key_install(c: &Client, key: Option<&str>, file: Option<&Path>, json: bool) -> anyhow::Result<Outcome> {
    let key = match (key, file) {
        (Some(k), _) => Key::from_text(k).context("the key given")?,
        (None, Some(path)) => read_keyring(path)?.primary().clone(),
        (None, None) => bail!("give the key, or --key-file"),
    };
    if !json {
        eprintln!("installing key {:08x}", key.id());
    }
    key_change(c, KeyOp::Install, key.to_text(), false, json)
}

/// Asks the server until `pending` names no server (or `wait` ends),
/// saying once whom it waits for; `pending` may refuse at once.
fn wait_until(
    c: &Client,
    wait: Duration,
    json: bool,
    what: &str,
    pending: impl Fn(&KeyringView) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        let v: KeyringView = c.get(KEYRING).map_err(keyring_error)?;
        let waiting = pending(&v)?;
        if waiting.is_empty() || Instant::now() >= deadline {
            return Ok(());
        }
        if !said && !json {
            eprintln!("waiting up to {}s for {} {what}", wait.as_secs(), waiting.join(", "));
            said = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `hanse federation key use`: waits (up to `wait`) until every live
/// server holds the key, then asks for it.
pub fn key_use(c: &Client, key: &str, force: bool, wait: Duration, json: bool) -> anyhow::Result<Outcome> {
    let id = gossip::parse_key_id(key)?;
    if !force {
        wait_until(c, wait, json, &format!("to hold key {id:08x}"), |v| {
            if !v.keys.contains(&format!("{id:08x}")) {
                bail!("key {id:08x} is not installed on {}: `hanse federation key install` it first", v.cluster);
            }
            Ok(v.lacking(id))
        })?;
    }
    key_change(c, KeyOp::Use, format!("{id:08x}"), force, json)
}

/// `hanse federation key remove`: waits (up to `wait`) until no live
/// server seals with the key, then asks for its removal.
pub fn key_remove(c: &Client, key: &str, force: bool, wait: Duration, json: bool) -> anyhow::Result<Outcome> {
    let id = gossip::parse_key_id(key)?;
    if !force {
        wait_until(c, wait, json, "to seal with another key", |v| {
            // The server's own primary: refused at once, no use waiting.
            Ok(if v.keys.first() == Some(&format!("{id:08x}")) { Vec::new() } else { v.sealing_with(id) })
        })?;
    }
    key_change(c, KeyOp::Remove, format!("{id:08x}"), force, json)
}

/// Reads a keyring file: one key a line, the first primary; `#` comments.
pub fn read_keyring(path: &Path) -> anyhow::Result<Keyring> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    let keys: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    Keyring::from_texts(&keys).with_context(|| format!("{}: bad key file", path.display()))
}

pub struct MembersArgs {
    pub seeds: Vec<String>,
    pub key_file: Option<PathBuf>,
    pub federation: String,
    pub bind: SocketAddr,
    pub wait: Duration,
    pub json: bool,
}

/// The federation's clusters as a server's gossip sees them (its API).
pub fn members_from(c: &cluster_core::server::client::Client, json: bool) -> anyhow::Result<Outcome> {
    let rows: Vec<MemberRow> = c.get("/v1/federation/members").map_err(|e| match e.status() {
        Some(404) => anyhow::anyhow!(
            "the server at {} takes no part in a federation; or ask the gossip with --seed and --key-file",
            c.address()
        ),
        _ => anyhow::anyhow!("{e}"),
    })?;
    // A server of an earlier release has no such route: nothing to add.
    let trouble: GossipTrouble = c.get("/v1/federation/gossip").unwrap_or_default();
    print_members(&rows, &trouble, json)
}

/// Joins the federation's gossip as an observer, waits until the view of
/// the federation stops changing (or `wait` passes), prints it, and leaves.
pub async fn members(args: MembersArgs) -> anyhow::Result<Outcome> {
    if args.seeds.is_empty() {
        bail!("give at least one --seed address of a server's gossip port (e.g. --seed 127.0.0.1:7946)");
    }
    let Some(key_file) = &args.key_file else {
        bail!("--seed needs --key-file, the federation's key file (`hanse federation keygen`)");
    };
    let keyring = read_keyring(key_file)?;
    let mut config = MemberConfig::new(&args.federation, "cli", &format!("observer-{}", std::process::id()), args.bind);
    config.role = Role::Observer;
    config.seeds = args.seeds.clone();
    let member = Member::start(config, keyring, Arc::new(UdpNet)).await.context("starting the gossip observer")?;
    let view = settle(&member, args.wait).await;
    let trouble = GossipTrouble::of(&member);
    member.shutdown().await.ok();
    if view.clusters.is_empty() {
        bail!(
            "no cluster answered within {:?}: check that --seed names a server's gossip address, that the key \
             file holds the federation's key, and that --federation is {:?}",
            args.wait,
            args.federation
        );
    }
    print_members(&MemberRow::all(&view), &trouble, args.json)
}

/// The table (or JSON rows) on stdout; what gossip refuses, on stderr.
fn print_members(rows: &[MemberRow], trouble: &GossipTrouble, json: bool) -> anyhow::Result<Outcome> {
    for line in trouble.lines() {
        eprintln!("warning: {line}");
    }
    if json {
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
        for r in rows {
            let dash = || "-".to_string();
            t.add_row(vec![
                r.cluster.to_string(),
                r.region.to_string(),
                format!("{:?}", r.status).to_lowercase(),
                r.leader.as_deref().unwrap_or("-").to_string(),
                servers_cell(r),
                r.free_cpu_millis.map_or_else(dash, fmt_cpu),
                r.free_memory_bytes.map_or_else(dash, fmt_bytes),
                r.free_gpus.map_or_else(dash, |g| g.to_string()),
                r.summary_age_ms.map_or_else(dash, |a| format!("{:.1}s", a as f64 / 1000.0)),
            ]);
        }
        println!("{t}");
        for r in rows {
            if let Some(s) = r.summary.as_ref().filter(|s| s.folded.any()) {
                println!("{}: summary detail folded to fit gossip ({})", r.cluster, s.folded);
            }
        }
    }
    Ok(Outcome::Ok)
}

/// "live/all", and the servers not alive by name: `2/3 (s3 left)`.
fn servers_cell(r: &MemberRow) -> String {
    let odd: Vec<String> = (r.server_states.iter())
        .filter(|(_, s)| **s != gossip::Liveness::Alive)
        .map(|(n, s)| format!("{n} {}", format!("{s:?}").to_lowercase()))
        .collect();
    let count = format!("{}/{}", r.servers_live, r.servers);
    if odd.is_empty() { count } else { format!("{count} ({})", odd.join(", ")) }
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
