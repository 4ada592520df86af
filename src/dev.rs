//! `hanse dev`: a whole federation in this process. Three clusters (more
//! with `--clusters`), each of `--servers` Raft servers with real QUIC and
//! mutual TLS (a CA made on the spot), redb logs, an HTTP API on a printed
//! address, gossip over loopback UDP, a federation policy, and `--nodes`
//! simulated nodes of the kinds in `examples/fleets/` that run what is
//! placed on them as the mock driver would. Then, unless `--no-demo`, a
//! burst of the example jobs that overflows `eu-west`, shown as it
//! happens. It stays up for the other verbs until Ctrl-C.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cluster_core::diag::SourceFile;
use cluster_core::model::node::Node;
use cluster_core::resources::{fmt_bytes, fmt_cpu};
use cluster_core::server::api::JobStatus;
use cluster_core::server::client::Client;
use cluster_core::spec::parse_fleet;
use cluster_core::transport::tls;
use federation::api::Delegations;
use federation::local::{Gossiping, Setup, start};
use gossip::{Key, Liveness};
use indicatif::{ProgressBar, ProgressStyle};

use crate::Outcome;
use crate::output::table;

/// The example fleet every cluster's nodes are drawn from.
const FLEET: &str = include_str!("../examples/fleets/eu-west.toml");
/// The example jobs of the demo.
const JOBS: [(&str, &str); 4] = [
    ("web.toml", include_str!("../examples/jobs/web.toml")),
    ("gpu-training.toml", include_str!("../examples/jobs/gpu-training.toml")),
    ("analytics-eu.toml", include_str!("../examples/jobs/analytics-eu.toml")),
    ("edge-inference.toml", include_str!("../examples/jobs/edge-inference.toml")),
];
/// How long the demo watches the burst before it sums up.
const DEMO_WAIT: Duration = Duration::from_secs(45);

pub struct DevArgs {
    pub clusters: usize,
    pub servers: u64,
    pub nodes: usize,
    pub data_dir: Option<PathBuf>,
    pub keep: bool,
    pub no_demo: bool,
    pub http_base: u16,
}

/// One cluster of the demo: its name, kind, where it is, and which of the
/// fleet's node classes it has.
struct Kind {
    name: String,
    environment: &'static str,
    region: String,
    jurisdictions: Vec<&'static str>,
    classes: Vec<&'static str>,
}

fn kinds(n: usize) -> Vec<Kind> {
    let mut out = vec![
        Kind {
            name: "eu-west".into(),
            environment: "cloud",
            region: "eu-west-1".into(),
            jurisdictions: vec!["eu"],
            classes: vec!["cloud-s", "cloud-m", "cloud-l", "gpu-l4", "onprem-rack"],
        },
        Kind {
            name: "us-east".into(),
            environment: "cloud",
            region: "us-east-1".into(),
            jurisdictions: vec!["us"],
            classes: vec!["cloud-m", "cloud-l", "gpu-a100", "gpu-l4"],
        },
        Kind {
            name: "edge-1".into(),
            environment: "edge",
            region: "eu-central-1".into(),
            jurisdictions: vec!["eu"],
            classes: vec!["edge-arm"],
        },
    ];
    for i in 4..=n {
        out.push(Kind {
            name: format!("cloud-{i}"),
            environment: "cloud",
            region: format!("region-{i}"),
            jurisdictions: vec!["eu"],
            classes: vec!["cloud-s", "cloud-m", "cloud-l"],
        });
    }
    out.truncate(n);
    out
}

/// `count` nodes of the kind's classes, taken in turn from each class.
fn fleet(kind: &Kind, count: usize) -> Vec<Node> {
    let parsed =
        parse_fleet(&SourceFile::new("examples/fleets/eu-west.toml", FLEET)).value.expect("the example fleet is valid");
    let mut by_class: BTreeMap<&str, Vec<Node>> = BTreeMap::new();
    for n in parsed.nodes.into_iter().filter(|n| kind.classes.contains(&&*n.class)) {
        by_class.entry(kind.classes.iter().find(|c| **c == &*n.class).expect("filtered")).or_default().push(n);
    }
    let mut out = Vec::with_capacity(count);
    let mut round = 0;
    while out.len() < count {
        let before = out.len();
        for nodes in by_class.values_mut() {
            if let Some(n) = nodes.get(round).cloned() {
                out.push(n);
            }
            if out.len() == count {
                break;
            }
        }
        if out.len() == before {
            break; // every class used up
        }
        round += 1;
    }
    for n in &mut out {
        n.region = kind.region.as_str().into();
        n.jurisdictions = kind.jurisdictions.iter().map(|j| Arc::from(*j)).collect();
    }
    out
}

/// Every cluster delegates to and accepts from every other, within limits;
/// personal data stays in the EU.
fn policy(kind: &Kind, all: &[Kind]) -> String {
    let quote = |v: &[&str]| v.iter().map(|j| format!("\"{j}\"")).collect::<Vec<_>>().join(", ");
    let mut text = format!("[cluster]\nname = \"{}\"\njurisdictions = [{}]\n", kind.name, quote(&kind.jurisdictions));
    for p in all.iter().filter(|p| p.name != kind.name) {
        text.push_str(&format!("\n[[peer]]\ncluster = \"{}\"\ndelegate_to = true\naccept_from = true\n", p.name));
    }
    text.push_str(concat!(
        "\n[overflow]\nmax_remote_share = 0.9\n",
        "\n[inbound]\nmax_share_of_capacity = 0.6\n",
        "\n[[rule]]\nmatch = { data = \"eu-pii\" }\njurisdictions = [\"eu\"]\n",
        "\n[retry]\nbackoff = \"500ms\"\nbackoff_max = \"5s\"\nlease = \"30s\"\ngrace = \"5s\"\n",
    ));
    text
}

pub async fn run(a: DevArgs) -> anyhow::Result<Outcome> {
    anyhow::ensure!((1..=8).contains(&a.clusters), "--clusters {}: use 1 to 8", a.clusters);
    anyhow::ensure!(matches!(a.servers, 1 | 3 | 5), "--servers {}: use 1, 3 or 5", a.servers);
    anyhow::ensure!((1..=5_000).contains(&a.nodes), "--nodes {}: use 1 to 5000 per cluster", a.nodes);
    let began = Instant::now();
    let temp = a.data_dir.is_none();
    let dir = match &a.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("hanse-dev-{}", std::process::id())),
    };
    if temp {
        // A new directory of our own (0700), never one someone else made
        // in advance under the same name with a token of their choosing.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {} (left over from another hanse dev?)", dir.display()))?;
    } else {
        cluster_core::private::private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A temporary directory goes whichever way this ends, an error included.
    let _scratch = Scratch(if temp && !a.keep { Some(dir.clone()) } else { None });
    std::fs::create_dir_all(dir.join("pki")).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = tls::create_ca("hanse-dev", 30)?;
    std::fs::write(dir.join("pki/ca.pem"), &ca.cert_pem)?;
    crate::output::write_private(&dir.join("pki/ca-key.pem"), &ca.key_pem)?;
    let key = Key::generate();
    crate::output::write_private(&dir.join("federation.key"), &format!("{}\n", key.to_text()))?;
    let token = dev_token(&dir.join("token"))?;
    let kinds = kinds(a.clusters);
    println!(
        "hanse dev: {} clusters of {} servers, {} simulated nodes each; data in {}",
        kinds.len(),
        a.servers,
        a.nodes,
        dir.display()
    );
    let progress = spinner("starting the clusters");
    let mut clusters: Vec<Gossiping> = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        progress.set_message(format!("starting {} ({} servers)", kind.name, a.servers));
        let http: Vec<SocketAddr> = (0..a.servers)
            .map(|j| SocketAddr::from(([127, 0, 0, 1], a.http_base + 100 * i as u16 + j as u16)))
            .collect();
        for addr in &http {
            std::net::TcpListener::bind(addr).with_context(|| {
                format!("port {} is taken (another hanse dev?); stop it, or pick others with --http-base", addr.port())
            })?;
        }
        let seeds = clusters.first().map(|c| vec![c.servers[0].member.local_addr().to_string()]).unwrap_or_default();
        let mut g = start(Setup {
            name: &kind.name,
            servers: a.servers,
            key: &key,
            ca: Some(&ca),
            seeds,
            jurisdictions: &kind.jurisdictions,
            policy: Some(policy(kind, &kinds)),
            http,
            data_dir: Some(dir.join(&kind.name)),
            region: Some(kind.region.clone()),
            token: Some(token.clone()),
        })
        .await;
        let inner = g.cluster.server(1).expect("server 1 runs").inner.clone();
        let nodes = fleet(kind, a.nodes);
        g.spawn(cluster_core::server::sim::run(inner, nodes));
        clusters.push(g);
    }
    progress.set_message("waiting for every cluster's summary to reach every other");
    let names: Vec<String> = kinds.iter().map(|k| k.name.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !clusters.iter().all(|g| {
        let view = g.view();
        names.iter().all(|n| {
            view.cluster(n)
                .is_some_and(|e| e.liveness == Liveness::Alive && e.summary.as_ref().is_some_and(|s| s.nodes_ready > 0))
        })
    }) {
        anyhow::ensure!(Instant::now() < deadline, "the clusters did not all see each other within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.finish_and_clear();
    println!("\n{} clusters up, gossiping, each with a federation policy:", clusters.len());
    for (g, kind) in clusters.iter().zip(&kinds) {
        println!(
            "  {:<8} {:<5} {:<13} jurisdictions [{}]   HANSE_ADDR={}",
            kind.name,
            kind.environment,
            kind.region,
            kind.jurisdictions.join(", "),
            g.cluster.addresses()
        );
    }
    let addrs: Vec<String> = clusters.iter().map(|g| g.cluster.addresses()).collect();
    if !a.no_demo {
        let names = names.clone();
        let addrs = addrs.clone();
        let (token, ca) = (token.clone(), ca.cert_pem.clone());
        tokio::task::spawn_blocking(move || demo(&names, &addrs, &token, &ca, began)).await??;
    }
    println!("\nThe federation stays up; in another terminal:");
    println!("  export HANSE_ADDR={}", addrs[0]);
    println!("  export HANSE_TOKEN={token}    # a management token of every cluster here");
    println!("  export HANSE_CACERT={}    # the CA that signed the servers' HTTPS", dir.join("pki/ca.pem").display());
    println!("  hanse federation members");
    println!("  hanse job run examples/jobs/thumbnails.toml   # overflows to a peer");
    println!("  hanse job status thumbnails");
    println!("  hanse federation delegations");
    println!("  hanse job plan examples/jobs/eu-reports.toml  # why each cluster is refused");
    println!("Ctrl-C stops it{}.", if temp && !a.keep { " and removes its data" } else { "" });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("\nstopping {} clusters", clusters.len());
    for g in clusters {
        g.shutdown(!a.keep).await;
    }
    if a.keep {
        println!("data kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Outcome::Ok)
}

/// Removes a directory when dropped.
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The secret of the demo's management token, the same in every cluster:
/// the one kept in `path` (a data directory used before, whose clusters
/// were bootstrapped with it) if this user owns it and nobody else may
/// read it, or a new one written there (0600).
fn dev_token(path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // SAFETY: getuid has no preconditions.
        let mine = meta.is_file() && meta.uid() == unsafe { libc::getuid() } && meta.mode() & 0o077 == 0;
        anyhow::ensure!(mine, "{} is not a private file of yours (0600); remove it", path.display());
        let t = std::fs::read_to_string(path)?.trim().to_string();
        anyhow::ensure!(cluster_core::acl::is_valid_secret(&t), "{} holds no valid secret; remove it", path.display());
        return Ok(t);
    }
    let t = cluster_core::acl::new_secret();
    crate::output::write_private(path, &format!("{t}\n"))?;
    Ok(t)
}

fn spinner(message: &str) -> ProgressBar {
    let p = ProgressBar::new_spinner();
    p.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    p.set_message(message.to_string());
    p.enable_steady_tick(Duration::from_millis(120));
    p
}

/// A batch job sized to overflow the first cluster: a fifth more than its
/// cores, in 4-core instances that the edge's small nodes cannot take.
fn burst_spec(cores: u64) -> String {
    let count = (cores * 6 / 5 / 4).max(1);
    format!(
        "# A render farm burst, sized to overflow eu-west.\n[job]\nname = \"render\"\ntype = \"batch\"\nobjective = \"cost\"\n\n[job.federation]\ndelegate = \"overflow\"\nmax_remote_share = 0.9\n\n[[group]]\nname = \"frames\"\ncount = {count}\n\n[[group.task]]\nname = \"render\"\ndriver = \"mock\"\nrun_for = \"10m\"\nresources = {{ cpu = 4, memory = \"4GiB\" }}\n"
    )
}

/// Submits the burst to the first cluster (the edge job to the edge),
/// prints each placement and delegation as it happens, then sums up.
fn demo(names: &[String], addrs: &[String], token: &str, ca: &str, began: Instant) -> anyhow::Result<()> {
    let clients = addrs
        .iter()
        .map(|a| Client::new(a).with_token(Some(token)).with_ca(ca).map_err(api))
        .collect::<anyhow::Result<Vec<Client>>>()?;
    let home = &clients[0];
    let cores: u64 = home.nodes().map_err(api)?.iter().map(|n| n.cpu_millis / 1000).sum();
    let mut jobs: Vec<(usize, String, String)> = Vec::new(); // (cluster, file, spec)
    for (file, spec) in JOBS {
        let to = if file.starts_with("edge") { names.iter().position(|n| n == "edge-1").unwrap_or(0) } else { 0 };
        jobs.push((to, file.to_string(), spec.to_string()));
    }
    jobs.push((0, "render.toml".into(), burst_spec(cores)));
    println!("\nDemo: a burst of {} jobs; {} has {cores} cores.", jobs.len(), names[0]);
    let mut submitted: Vec<(usize, String)> = Vec::new(); // (cluster, job id)
    let mut wanted = 0u64;
    for (to, file, spec) in &jobs {
        let r = clients[*to].submit(spec, file).map_err(api).with_context(|| format!("submitting {file}"))?;
        let desired = clients[*to].job(&r.job).map_err(api)?.summary.desired;
        wanted += desired;
        println!("  submitted {:<18} {:>5} instances to {}", r.job, desired, names[*to]);
        submitted.push((*to, r.job));
    }
    let bar = ProgressBar::new(wanted);
    bar.set_style(
        ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} instances running or placed ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let mut placed_seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut delegations_seen: BTreeSet<String> = BTreeSet::new();
    let mut waiting_seen: BTreeSet<String> = BTreeSet::new();
    let mut quiet_since = Instant::now();
    loop {
        let mut changed = false;
        let mut running_total = 0;
        for (to, job) in &submitted {
            let Ok(s) = clients[*to].job(job) else { continue };
            let placed = live(&s);
            let seen = placed_seen.entry(job.clone()).or_default();
            if placed > *seen {
                say(
                    &bar,
                    began,
                    format!("  {:<9} placed {:>5} more of {job} ({} in all)", names[*to], placed - *seen, placed),
                );
                *seen = placed;
                changed = true;
            }
            running_total += placed;
        }
        let mut remote = 0;
        if let Ok(d) = home.get::<Delegations>("/v1/federation/delegations") {
            for o in &d.outbound {
                if o.state == "registered" {
                    remote += u64::from(o.running.max(o.indices.len() as u32));
                }
                let state = match o.state.as_str() {
                    "registered" => "running",
                    "refused" => "failed",
                    other => other,
                };
                let key = if state == "failed" {
                    format!("{} {} {}", o.job, o.target, o.note)
                } else {
                    format!("{} {state}", o.id)
                };
                if matches!(state, "running" | "failed") && delegations_seen.insert(key) {
                    let line = if state == "running" {
                        format!(
                            "  {:<9} delegated {:>5} of {}.{} to {}: {} had no room left for them",
                            names[0],
                            o.indices.len(),
                            o.job,
                            o.group,
                            o.target,
                            names[0]
                        )
                    } else {
                        format!(
                            "  {:<9} offered {:>5} of {}.{} to {}, refused: {}",
                            names[0],
                            o.indices.len(),
                            o.job,
                            o.group,
                            o.target,
                            o.note
                        )
                    };
                    say(&bar, began, line);
                    changed = true;
                }
            }
            for (job, w) in &d.waiting {
                let why: Vec<String> = w.refused.iter().map(|(c, r)| format!("{c}: {r}")).collect();
                if w.instances > 0 && waiting_seen.insert(format!("{job} {}", why.join("; "))) {
                    say(
                        &bar,
                        began,
                        format!(
                            "  {:<9} {} instances of {job} wait, no peer takes them ({})",
                            names[0],
                            w.instances,
                            why.join("; ")
                        ),
                    );
                    changed = true;
                }
            }
        }
        bar.set_position((running_total + remote).min(wanted));
        if changed {
            quiet_since = Instant::now();
        }
        let settled = quiet_since.elapsed() > Duration::from_secs(5) && !delegations_seen.is_empty();
        if settled || start.elapsed() > DEMO_WAIT {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bar.finish_and_clear();
    summary(names, &clients, &submitted)
}

/// A line above the progress bar, or on stdout when there is no terminal
/// to draw a bar on.
fn say(bar: &ProgressBar, began: Instant, line: String) {
    let line = format!("{:>6.1}s {line}", began.elapsed().as_secs_f64());
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// Instances of a job placed and not terminal.
fn live(s: &JobStatus) -> u64 {
    s.allocations.iter().filter(|a| a.desired == "run" && matches!(a.status.as_str(), "pending" | "running")).count()
        as u64
}

fn api(e: cluster_core::server::client::ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Per cluster: capacity used, local and delegated instances; then what
/// is still unplaced, and why.
fn summary(names: &[String], clients: &[Client], submitted: &[(usize, String)]) -> anyhow::Result<()> {
    let mut t =
        table(&["cluster", "nodes", "cpu used", "memory used", "local instances", "delegated in", "delegated out"]);
    for (name, c) in names.iter().zip(clients) {
        let nodes = c.nodes().map_err(api)?;
        let (used, total): (u64, u64) =
            nodes.iter().fold((0, 0), |(u, t), n| (u + n.cpu_used_millis, t + n.cpu_millis));
        let (mused, mtotal): (u64, u64) =
            nodes.iter().fold((0, 0), |(u, t), n| (u + n.memory_used_bytes, t + n.memory_bytes));
        let d: Delegations = c.get("/v1/federation/delegations").map_err(api)?;
        let inbound: u64 = d.inbound.iter().map(|i| u64::from(i.running)).sum();
        let outbound: u64 = d.outbound.iter().filter(|o| o.state == "registered").map(|o| o.indices.len() as u64).sum();
        let local: u64 = nodes.iter().map(|n| n.allocs).sum::<u64>().saturating_sub(inbound);
        t.add_row(vec![
            name.clone(),
            nodes.len().to_string(),
            format!("{} of {} ({:.0}%)", fmt_cpu(used), fmt_cpu(total), 100.0 * used as f64 / total.max(1) as f64),
            format!("{} of {}", fmt_bytes(mused), fmt_bytes(mtotal)),
            local.to_string(),
            inbound.to_string(),
            outbound.to_string(),
        ]);
    }
    println!("\n{t}");
    let mut refused = Vec::new();
    for (to, job) in submitted {
        let Ok(s) = clients[*to].job(job) else { continue };
        for u in s.eval.iter().flat_map(|e| e.unplaced.iter()) {
            refused.push(format!("  {job}.{} in {}: {} unplaced: {}", u.group, names[*to], u.count, u.explanation));
        }
    }
    if !refused.is_empty() {
        println!("Refused (placed nowhere, with the reasons):");
        for r in refused {
            println!("{r}");
        }
    }
    Ok(())
}
