//! `hanse server`: one Raft server of a cluster, over QUIC with mutual TLS.
//!
//! ```toml
//! [server]
//! name = "s1"
//! cluster = "eu-west"
//! region = "eu-west-1"
//! id = 1
//! data_dir = "data/s1"
//! bind = "127.0.0.1:4701"     # QUIC: Raft and forwarded writes
//! http = "127.0.0.1:4646"     # the HTTP API (default 127.0.0.1:4646)
//! http_hosts = ["hanse.internal"] # names the API answers to besides IPs and localhost
//! http_tls = true             # the default: HTTPS with [tls] cert; false serves plain HTTP (warned)
//! heartbeat_ttl = "10s"       # nodes heartbeat this often...
//! heartbeat_grace = "10s"     # ...and are down after TTL + grace of silence
//! gc_interval = "5m"          # the leader collects garbage this often:
//! job_gc_threshold = "4h"     #   stopped and finished jobs after this,
//! node_gc_threshold = "24h"   #   nodes down (and holding nothing) after this,
//! terminal_allocs_per_job = 50 #  and ended allocations per job the scheduler no longer reads
//! workers = 1                 # scheduler workers on the leader (default: half the cores)
//! bootstrap = true            # false: join a running cluster (`hanse operator raft add-peer`)
//!
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/eu-west-server-s1.pem"
//! key = "pki/eu-west-server-s1-key.pem"
//!
//! [[peer]]
//! id = 2
//! address = "127.0.0.1:4702"
//!
//! [gossip]                    # optional: join the federation
//! federation = "hanse"
//! bind = "127.0.0.1:7946"
//! seeds = ["127.0.0.1:7956"]  # any other cluster's (or this one's) servers
//! key_file = "federation.key" # `hanse federation keygen`; rotate with `hanse federation key`
//!                             # (a key added to the file is installed on SIGHUP)
//! jurisdictions = ["eu"]      # where this cluster's nodes are
//! max_clock_skew = "60s"      # a peer's clock further off is refused, logged and counted
//!
//! [federation]                # optional, with [gossip]: delegate and accept work
//! policy = "policy.toml"      # `hanse policy check`; reloaded on SIGHUP
//!
//! [acl]                       # optional
//! enabled = true              # default; false lets anyone who reaches the API do anything
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cluster_core::diag::{Diagnostics, SourceFile};
use cluster_core::raft::node::{RaftConfig, RaftStatus};
use cluster_core::raft::storage::RedbStorage;
use cluster_core::server::rpc::ServerRpc;
use cluster_core::server::{Server, ServerOptions, http};
use cluster_core::spec;
use cluster_core::spec::read::{self, Table};
use cluster_core::transport::quic::{QuicClient, QuicServer};
use cluster_core::transport::tls::{self, valid_label};
use cluster_core::transport::{Identity, Role, Transport};

use crate::Outcome;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub cluster: String,
    pub region: String,
    pub id: u64,
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    /// The HTTP API's address.
    pub http: SocketAddr,
    pub heartbeat_ttl: Duration,
    pub heartbeat_grace: Duration,
    /// How often the leader collects garbage, and what.
    pub gc_interval: Duration,
    pub gc_policy: cluster_core::state::GcPolicy,
    pub workers: usize,
    /// Host names the API answers to besides IP addresses and `localhost`.
    pub http_hosts: Vec<String>,
    /// Form the cluster from the configured peers on a fresh data dir;
    /// false to wait to be added to a running cluster.
    pub bootstrap: bool,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Other voters, by Raft id.
    pub peers: BTreeMap<u64, SocketAddr>,
    pub gossip: Option<GossipConfig>,
    /// The federation policy file, when the cluster delegates.
    pub policy: Option<PathBuf>,
    /// Whether the API asks for ACL tokens (`[acl] enabled`, default true).
    pub acl: bool,
    /// Whether the API serves HTTPS (`http_tls`, default true).
    pub http_tls: bool,
}

#[derive(Clone, Debug)]
pub struct GossipConfig {
    pub federation: String,
    pub bind: SocketAddr,
    pub seeds: Vec<String>,
    pub key_file: PathBuf,
    pub jurisdictions: Vec<String>,
    /// How far a peer's clock may be off before its gossip is refused
    /// (and reported); `max_clock_skew`, default 60s.
    pub max_clock_skew: std::time::Duration,
}

/// Flags that override the file.
#[derive(Default)]
pub struct Overrides {
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub bind: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

fn read_config(file: &SourceFile) -> spec::Checked<ServerConfig> {
    read::checked(file, |top, d| {
        let base = Path::new(&file.name).parent().unwrap_or(Path::new("."));
        let rel = |p: &str| -> PathBuf { if Path::new(p).is_absolute() { p.into() } else { base.join(p) } };
        let mut s = top.table(d, "server").or_else(|| {
            d.error_hint(
                0..0,
                "missing [server] table",
                "start the file with [server] and name, cluster, id, data_dir, bind",
            );
            None
        })?;
        s.path = "[server]".into();
        let name = read_label(&mut s, d, "name", "\"s1\"");
        let cluster = read_label(&mut s, d, "cluster", "\"eu-west\"");
        let region = match s.str(d, "region") {
            Some((r, span)) if !valid_label(r) => {
                d.error_hint(span, format!("region `{r}` is not a label"), "use 1 to 63 letters, digits and `-`");
                String::new()
            }
            Some((r, _)) => r.to_string(),
            None => String::new(),
        };
        let http_tls = s.bool(d, "http_tls").is_none_or(|(t, _)| t);
        let id = match s.int(d, "id") {
            Some((n, _)) if n > 0 => Some(n as u64),
            Some((n, span)) => {
                d.error_hint(
                    span,
                    format!("id {n} is not a Raft id"),
                    "use a whole number from 1, unique in the cluster",
                );
                None
            }
            None => {
                s.missing(d, "id", "1");
                None
            }
        };
        let data_dir = s.required_str(d, "data_dir", "\"data/s1\"").map(|(p, _)| rel(p));
        let bind_text = s.required_str(d, "bind", "\"127.0.0.1:4701\"");
        let bind = addr(d, bind_text);
        let http_hosts: Vec<String> =
            s.str_list(d, "http_hosts").unwrap_or_default().into_iter().map(|(h, _)| h.to_string()).collect();
        let http = match s.str(d, "http") {
            Some(v) => addr(d, Some(v)),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 4646))),
        };
        let mut duration = |d: &mut Diagnostics, key: &'static str, default: Duration| match s.str(d, key) {
            Some((text, span)) => match spec::parse_duration_ms(text) {
                Ok(ms) if ms >= 100 => Some(Duration::from_millis(ms)),
                Ok(_) => {
                    d.error_hint(span, format!("{key} `{text}` is too short"), "use 100ms or more, e.g. \"10s\"");
                    None
                }
                Err(e) => {
                    d.error_hint(span, format!("{key} `{text}` is not a duration"), e);
                    None
                }
            },
            None => Some(default),
        };
        let heartbeat_ttl = duration(d, "heartbeat_ttl", Duration::from_secs(10));
        let heartbeat_grace = duration(d, "heartbeat_grace", Duration::from_secs(10));
        let gc_interval = duration(d, "gc_interval", cluster_core::server::GC_INTERVAL);
        let defaults = cluster_core::state::GcPolicy::DEFAULT;
        let job_gc = duration(d, "job_gc_threshold", Duration::from_millis(defaults.job_ms));
        let node_gc = duration(d, "node_gc_threshold", Duration::from_millis(defaults.node_ms));
        let allocs_per_job = match s.int(d, "terminal_allocs_per_job") {
            None => defaults.allocs_per_job,
            Some((n, _)) if (0..=1_000_000).contains(&n) => Some(n as u32),
            Some((n, span)) => {
                d.error_hint(span, format!("terminal_allocs_per_job = {n}"), "use 0 to 1000000");
                defaults.allocs_per_job
            }
        };
        let workers = match s.int(d, "workers") {
            Some((n, _)) if (1..=64).contains(&n) => Some(n as usize),
            Some((n, span)) => {
                d.error_hint(span, format!("workers = {n}"), "use 1 to 64 (about one per core)");
                None
            }
            None => Some(cluster_core::server::default_workers()),
        };
        let bootstrap = s.bool(d, "bootstrap").is_none_or(|(b, _)| b);
        s.finish(d);
        let (ca, cert, key) = read_tls(top, d, &rel, "server-s1");
        let mut peers = BTreeMap::new();
        for mut p in top.tables(d, "peer") {
            let pid = p.int(d, "id").map(|(n, _)| n as u64);
            let addr_text = p.required_str(d, "address", "\"127.0.0.1:4702\"");
            let paddr = addr(d, addr_text);
            if pid.is_none() {
                p.missing(d, "id", "2");
            }
            if let (Some(i), Some(a)) = (pid, paddr) {
                if Some(i) == id || peers.insert(i, a).is_some() {
                    d.error(p.span.clone(), format!("peer id {i} is used twice"));
                }
            }
            p.finish(d);
        }
        let gossip = top.table(d, "gossip").and_then(|mut g| {
            g.path = "[gossip]".into();
            let federation = g.str(d, "federation").map_or_else(|| "hanse".to_string(), |(f, _)| f.to_string());
            let bind_text = g.required_str(d, "bind", "\"127.0.0.1:7946\"");
            let bind = addr(d, bind_text);
            let seeds = g.str_list(d, "seeds").unwrap_or_default().into_iter().map(|(s, _)| s.to_string()).collect();
            let key_file = g.required_str(d, "key_file", "\"federation.key\"").map(|(p, _)| rel(p));
            let listed = g.str_list(d, "jurisdictions").unwrap_or_default();
            for (j, span) in &listed {
                if !valid_label(j) {
                    d.error_hint(
                        span.clone(),
                        format!("jurisdiction `{j}` is not a label"),
                        "use 1 to 63 letters, digits and `-`, as in \"eu\"",
                    );
                }
            }
            if let Some((_, span)) = listed.get(gossip::summary::SUMMARY_TAGS_MAX) {
                d.error(
                    span.clone(),
                    format!("at most {} jurisdictions fit a summary", gossip::summary::SUMMARY_TAGS_MAX),
                );
            }
            let jurisdictions = listed.into_iter().map(|(j, _)| j.to_string()).collect();
            let mut max_clock_skew = std::time::Duration::from_millis(gossip::seal::FRESHNESS_MS);
            if let Some((text, span)) = g.str(d, "max_clock_skew") {
                match cluster_core::spec::parse_duration_ms(text) {
                    Ok(ms) if (1_000..=86_400_000).contains(&ms) => {
                        max_clock_skew = std::time::Duration::from_millis(ms)
                    }
                    Ok(_) => d.error_hint(
                        span,
                        format!("max_clock_skew `{text}` is out of range"),
                        "use 1s to 24h: it bounds how old a replayed datagram may be",
                    ),
                    Err(e) => d.error_hint(span, format!("max_clock_skew `{text}` is not a duration"), e),
                }
            }
            g.finish(d);
            Some(GossipConfig { federation, bind: bind?, seeds, key_file: key_file?, jurisdictions, max_clock_skew })
        });
        let policy = top.table(d, "federation").and_then(|mut f| {
            f.path = "[federation]".into();
            let p = f.required_str(d, "policy", "\"policy.toml\"").map(|(p, _)| rel(p));
            f.finish(d);
            p
        });
        let acl = top.table(d, "acl").is_none_or(|mut a| {
            a.path = "[acl]".into();
            let enabled = a.bool(d, "enabled").is_none_or(|(e, _)| e);
            a.finish(d);
            enabled
        });
        if policy.is_some() && gossip.is_none() {
            d.error_hint(0..0, "[federation] needs [gossip]", "add a [gossip] section: peers are found by gossip");
        }
        Some(ServerConfig {
            name: name?,
            cluster: cluster?,
            region,
            id: id?,
            data_dir: data_dir?,
            bind: bind?,
            http: http?,
            heartbeat_ttl: heartbeat_ttl?,
            heartbeat_grace: heartbeat_grace?,
            gc_interval: gc_interval?,
            gc_policy: cluster_core::state::GcPolicy {
                job_ms: job_gc?.as_millis() as u64,
                node_ms: node_gc?.as_millis() as u64,
                allocs_per_job,
            },
            workers: workers?,
            http_hosts,
            bootstrap,
            ca: ca?,
            cert: cert?,
            key: key?,
            peers,
            gossip,
            policy,
            acl,
            http_tls,
        })
    })
}

/// A required name that certificates carry (`name`, `cluster`): 1 to 63
/// letters, digits and `-`.
pub(crate) fn read_label(t: &mut Table, d: &mut Diagnostics, key: &'static str, example: &str) -> Option<String> {
    t.required_str(d, key, example).and_then(|(v, span)| {
        if valid_label(v) {
            Some(v.to_string())
        } else {
            d.error_hint(span, format!("invalid {key} `{v}`"), "use 1 to 63 letters, digits and `-`");
            None
        }
    })
}

/// This start's gossip generation: the time in unix milliseconds, or one
/// more than the last start's if that is higher (a clock stepped back), so
/// a server's generations only grow and an old one is never taken for the
/// newest. Kept in `DATA_DIR/gossip-generation`.
fn next_generation(data_dir: &std::path::Path) -> anyhow::Result<u64> {
    let path = data_dir.join("gossip-generation");
    let last = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
    let next = gossip::transport::unix_ms().max(last.saturating_add(1));
    let tmp = data_dir.join("gossip-generation.tmp");
    std::fs::write(&tmp, format!("{next}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(next)
}

/// The signer and trust a server gossips with: its certificate must name
/// this cluster and server, and allow every jurisdiction `[gossip]`
/// claims (peers refuse a summary that claims more).
fn gossip_identity(
    c: &ServerConfig,
    g: &GossipConfig,
    ca: &str,
    pair: &tls::PemPair,
) -> anyhow::Result<(Arc<tls::Signer>, Arc<tls::Trust>)> {
    let cert_file = c.cert.display();
    let signer = tls::Signer::new(pair).with_context(|| format!("[tls] cert {cert_file} and key"))?;
    let trust = tls::Trust::new(ca).context("[tls] ca")?;
    let verified = trust
        .verify_cert(signer.cert_der(), gossip::transport::unix_ms())
        .map_err(|e| anyhow::anyhow!("[tls] cert {cert_file}: {e}"))?;
    let want = tls::Identity::new(&c.cluster, tls::Role::Server, &c.name);
    anyhow::ensure!(
        verified.identity == want,
        "[tls] cert {cert_file} names {}, but this is {want}: peers would refuse its gossip. Issue one with \
         `hanse tls cert create --cluster {} --role server --name {}`",
        verified.identity,
        c.cluster,
        c.name
    );
    let missing: Vec<&String> = g.jurisdictions.iter().filter(|j| !verified.jurisdictions.contains(j)).collect();
    if !missing.is_empty() {
        let flags: String = g.jurisdictions.iter().map(|j| format!(" --jurisdiction {j}")).collect();
        anyhow::bail!(
            "[gossip] jurisdictions {missing:?} are not in [tls] cert {cert_file} (it allows {:?}): peers would \
             refuse this cluster's summaries. Issue a certificate that allows them: `hanse tls cert create \
             --cluster {} --role server --name {}{flags}`",
            verified.jurisdictions,
            c.cluster,
            c.name
        );
    }
    Ok((Arc::new(signer), Arc::new(trust)))
}

/// The `[tls]` table of a server's or agent's config: ca, cert and key,
/// relative to the config's directory. `stem` names an example
/// certificate in the hints (`server-s1`, `agent-node-a`).
pub(crate) fn read_tls(
    top: &mut Table,
    d: &mut Diagnostics,
    rel: &dyn Fn(&str) -> PathBuf,
    stem: &str,
) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    let Some(mut t) = top.table(d, "tls") else {
        let role = stem.split('-').next().unwrap_or("server");
        d.error_hint(
            0..0,
            "missing [tls] table",
            format!("add [tls] with ca, cert and key (`hanse tls cert create --role {role}`)"),
        );
        return (None, None, None);
    };
    t.path = "[tls]".into();
    let ca = t.required_str(d, "ca", "\"pki/ca.pem\"").map(|(p, _)| rel(p));
    let cert = t.required_str(d, "cert", &format!("\"pki/eu-west-{stem}.pem\"")).map(|(p, _)| rel(p));
    let key = t.required_str(d, "key", &format!("\"pki/eu-west-{stem}-key.pem\"")).map(|(p, _)| rel(p));
    t.finish(d);
    (ca, cert, key)
}

pub(crate) fn addr(d: &mut Diagnostics, v: Option<(&str, std::ops::Range<usize>)>) -> Option<SocketAddr> {
    let (text, span) = v?;
    text.parse()
        .map_err(|_| {
            d.error_hint(span, format!("`{text}` is not an address"), "write IP:PORT, e.g. \"127.0.0.1:4701\"")
        })
        .ok()
}

pub fn load_config(path: &Path, o: Overrides) -> anyhow::Result<ServerConfig> {
    let mut c = crate::output::load(path, read_config)?;
    if let Some(n) = o.name {
        anyhow::ensure!(valid_label(&n), "--name `{n}`: use 1 to 63 letters, digits and `-`");
        c.name = n;
    }
    if let Some(dd) = o.data_dir {
        c.data_dir = dd;
    }
    if let Some(b) = o.bind {
        c.bind = b;
    }
    if let Some(h) = o.http {
        c.http = h;
    }
    Ok(c)
}

pub async fn run(c: ServerConfig) -> anyhow::Result<Outcome> {
    cluster_core::private::private_dir(&c.data_dir)
        .with_context(|| format!("cannot create data_dir {} (0700)", c.data_dir.display()))?;
    let ca = std::fs::read_to_string(&c.ca).with_context(|| format!("cannot read [tls] ca {}", c.ca.display()))?;
    let pair = tls::read_pair(&c.cert, &c.key)?;
    // What this server gossips, it signs with its certificate's key, and
    // peers check it against the CA: refuse at start what they would.
    let gossip_identity = match &c.gossip {
        Some(g) => Some(gossip_identity(&c, g, &ca, &pair)?),
        None => None,
    };
    let store = RedbStorage::open(&c.data_dir.join("raft.redb"))
        .with_context(|| format!("opening the log in {} (is another server using it?)", c.data_dir.display()))?;
    let mut peers = c.peers.clone();
    peers.insert(c.id, c.bind);
    let client = Arc::new(QuicClient::new(&ca, &pair)?);
    let transport: Arc<dyn Transport<ServerRpc>> = client.clone();
    let logger = cluster_core::raft::log::logger();
    let options = ServerOptions {
        workers: c.workers,
        http_hosts: c.http_hosts.clone(),
        heartbeat_ttl: c.heartbeat_ttl,
        heartbeat_grace: c.heartbeat_grace,
        gc_interval: Some(c.gc_interval),
        gc_policy: c.gc_policy,
        acl: cluster_core::server::AclOptions { enabled: c.acl, initial_management: None },
        audit_dir: Some(c.data_dir.join("audit")),
        http_tls: c.http_tls,
        ..ServerOptions::new(&c.cluster, &c.name)
    };
    let mut raft = RaftConfig::new(c.id, peers);
    raft.join = !c.bootstrap;
    let server = Server::start(raft, store, transport, options, &logger)?;
    server.set_agent_transport(client);
    let endpoint = QuicServer::bind::<ServerRpc>(c.bind, &ca, &pair, server.handler())?;
    let gossip = match &c.gossip {
        Some(g) => {
            // The ring the cluster committed, if any (as of the last
            // snapshot; the log brings it up to date): a key file left
            // behind by a rotation made through the API is not used then.
            let file = crate::federation::read_keyring(&g.key_file);
            let file_ids = file.as_ref().map(|r| r.ids()).unwrap_or_default();
            let keyring = match (federation::keyring::committed(&server.inner), file) {
                (Some(ring), Ok(_)) => ring,
                (Some(ring), Err(e)) => {
                    eprintln!("warning: {e:#}; gossiping with the keyring the cluster committed");
                    ring
                }
                (None, file) => file?,
            };
            let mut mc = gossip::MemberConfig::new(&g.federation, &c.cluster, &c.name, g.bind);
            mc.region = c.region.clone();
            mc.seeds = g.seeds.clone();
            mc.max_clock_skew = g.max_clock_skew;
            mc.generation = next_generation(&c.data_dir)?;
            mc.rpc_addr = Some(c.bind.to_string());
            if let Some((signer, trust)) = &gossip_identity {
                mc.signer = Some(signer.clone());
                mc.trust = Some(trust.clone());
            }
            let member = Arc::new(
                gossip::Member::start(mc, keyring, Arc::new(gossip::net::UdpNet))
                    .await
                    .with_context(|| format!("cannot gossip on {}", g.bind))?,
            );
            let me = federation::publish::Identity { region: c.region.clone(), jurisdictions: g.jurisdictions.clone() };
            println!("gossip on {} (federation {})", member.local_addr(), g.federation);
            federation::keyring::export_metrics(&server.inner, &member);
            let keys = federation::keyring::Keys::new(server.inner.clone(), member.clone());
            tokio::spawn(keys.clone().follow());
            let publish = tokio::spawn(federation::publish::publish(server.inner.clone(), member.clone(), me));
            Some((member, publish, keys, Arc::new(tokio::sync::Mutex::new(file_ids))))
        }
        None => None,
    };
    let mut extra = match &gossip {
        Some((_, _, keys, _)) => federation::keyring::router(keys.clone()),
        None => axum::Router::new(),
    };
    let mut fed_task = None;
    let fed = match (&c.policy, &gossip) {
        (Some(path), Some((member, ..))) => {
            let policy = load_policy(path)?;
            let to: Vec<&str> = policy.peers.iter().filter(|(_, p)| p.delegate_to).map(|(n, _)| n.as_str()).collect();
            println!(
                "federation policy {}: {} peers, delegates to [{}]",
                path.display(),
                policy.peers.len(),
                to.join(", ")
            );
            let fed = federation::node::Federation::new(server.inner.clone(), member.clone(), policy);
            server.set_peer_handler(fed.clone());
            federation::api::export_metrics(&fed);
            extra = extra.merge(federation::api::router(fed.clone()));
            fed_task = Some(tokio::spawn(federation::node::run(fed.clone())));
            Some(fed)
        }
        _ => None,
    };
    let tls = match c.http_tls {
        true => Some(Arc::new(tls::http_server_config(&pair).context("the API's HTTPS with the [tls] certificate")?)),
        false => None,
    };
    let scheme = if c.http_tls { "https" } else { "http" };
    let (api, api_task) = http::serve_with(server.inner.clone(), c.http, extra, tls)
        .await
        .with_context(|| format!("cannot serve the API on {}", c.http))?;
    let me = Identity::new(&c.cluster, Role::Server, &c.name);
    let region = if c.region.is_empty() { String::new() } else { format!(" in {}", c.region) };
    println!(
        "server {me}{region} (raft id {}) listening on {}, API on {scheme}://{api}, data in {}",
        c.id,
        endpoint.local_addr(),
        c.data_dir.display()
    );
    let mut status = server.raft().watch_status();
    let mut last = RaftStatus::default();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // Asked to stop (a clean stop, announced), rather than failing.
    let mut asked = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { asked = true; break }
            _ = term.recv() => { asked = true; break }
            _ = hup.recv() => {
                match (&fed, &c.policy) {
                    (Some(fed), Some(path)) => match load_policy(path) {
                        Ok(p) => match fed.commit_policy(p).await {
                            Ok(()) => println!("federation policy {} reloaded and committed", path.display()),
                            Err(e) => eprintln!("federation policy {} not committed: {e}", path.display()),
                        },
                        Err(e) => eprintln!("federation policy {} not reloaded, the old one stays: {e:#}", path.display()),
                    },
                    _ => println!("SIGHUP: no federation policy to reload"),
                }
                if let (Some(g), Some((_, _, keys, file_ids))) = (&c.gossip, &gossip) {
                    // Off the signal loop: a commit waits for a leader.
                    tokio::spawn(reload_key_file(keys.clone(), g.key_file.clone(), file_ids.clone()));
                }
            }
            changed = status.changed() => {
                if changed.is_err() { break }
                let s = status.borrow().clone();
                if (s.leader, s.term) != (last.leader, last.term) || s.applied / 1000 != last.applied / 1000 {
                    let leader = s.leader.map_or_else(|| "none".to_string(), |l| l.to_string());
                    println!("status: leader={leader} term={} commit={} applied={}", s.term, s.commit, s.applied);
                    last = s;
                }
            }
        }
    }
    println!("shutting down");
    if let Some((member, g, ..)) = gossip {
        g.abort();
        // Peers show this server `left` at once, not dead after a while;
        // a server that fails says nothing and is found dead.
        if asked {
            member.leave().await;
        }
    }
    if let Some(t) = fed_task {
        t.abort();
    }
    api_task.abort();
    server.stop().await;
    endpoint.close();
    Ok(Outcome::Ok)
}

/// SIGHUP: installs, through the cluster's log, the keys the gossip key
/// file gained since it was last read (`file_ids`). Only installs: a key
/// file left behind by a rotation never brings an old key back, and
/// `hanse federation key use|remove` stay the way to seal with a key and
/// to drop one, with their checks.
async fn reload_key_file(
    keys: Arc<federation::keyring::Keys>,
    path: PathBuf,
    file_ids: Arc<tokio::sync::Mutex<Vec<u32>>>,
) {
    let mut before = file_ids.lock().await;
    let file = match crate::federation::read_keyring(&path) {
        Ok(r) => r,
        Err(e) => return eprintln!("gossip key file not reloaded, the keyring stays: {e:#}"),
    };
    match keys.install_new(&file, &before).await {
        Ok(new) if new.is_empty() => println!("gossip key file {}: no new key; the keyring stays", path.display()),
        Ok(new) => {
            let ids: Vec<String> = new.iter().map(|id| format!("{id:08x}")).collect();
            println!(
                "gossip key file {}: installed {} for the cluster; seal with it once every cluster holds it \
                 (`hanse federation key use`)",
                path.display(),
                ids.join(", ")
            );
            *before = file.ids();
        }
        Err(e) => eprintln!("gossip key file {}: not installed: {}", path.display(), e.message),
    }
}

fn load_policy(path: &Path) -> anyhow::Result<federation::policy::Policy> {
    crate::output::load(path, federation::policy::parse_policy)
}
