//! `hanse agent`: the node agent of one machine.
//!
//! ```toml
//! [agent]
//! name = "node-a"                 # the node's id; its certificate's name
//! cluster = "eu-west"
//! data_dir = "data/node-a"        # allocations, logs, the agent's state
//! servers = ["127.0.0.1:4701"]    # the servers' QUIC addresses (their `bind`)
//! bind = "127.0.0.1:4801"         # QUIC, for the servers (logs); default any port
//! class = "edge-arm"              # what the operator says of the machine:
//! region = "eu-west-1"
//! zone = "a"
//! environment = "edge"            # cloud | edge | onprem
//! execution_model = "process"     # container | serverless | process | baremetal
//! cost_per_hour = 0.12
//! power_budget = "60W"
//! latency_class = 1             # 0 (nearest the users) to 9
//! datasets = ["clickstream"]
//! jurisdictions = ["eu"]
//! meta = { rack = "r12" }
//! cpu = 4                         # optional: instead of the fingerprinted
//! memory = "8GiB"                 #   cores and memory
//! cgroups = true                  # limit tasks with cgroups v2 when offered
//! drivers = ["exec", "mock"]      # the drivers it runs (default: mock only)
//! task_user = "nobody"            # exec tasks run as this user (default: nobody
//!                                 #   when the agent is root, else the agent's user)
//! allowed_users = ["www-data"]    # users a task's `user` may name (default: none)
//!
//! [logs]
//! max_file = "10MiB"              # each task's stdout and stderr rotate at this
//! max_files = 3                   # and keep this many files
//!
//! [gc]                            # directories (and logs) of ended allocations:
//! interval = "1m"                 # looked at this often,
//! retention = "4h"                # removed this long after they ended,
//! max_allocs = 50                 # beyond this many, oldest first,
//! disk_usage_threshold = 80       # and while the disk is fuller (percent)
//!
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/eu-west-agent-node-a.pem"
//! key = "pki/eu-west-agent-node-a-key.pem"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use cluster_core::agent::cgroups::Cgroups;
use cluster_core::agent::driver::{Account, DRIVER_NAMES, Drivers, TaskUsers};
use cluster_core::agent::fingerprint::fingerprint;
use cluster_core::agent::gc::GcPolicy;
use cluster_core::agent::logs::Rotation;
use cluster_core::agent::rpc::AgentService;
use cluster_core::agent::{Agent, AgentOptions};
use cluster_core::diag::Diagnostics;
use cluster_core::ids::NodeId;
use cluster_core::model::node::{Environment, ExecutionModel, Node, NodeStatus};
use cluster_core::resources;
use cluster_core::server::rpc::ServerRpc;
use cluster_core::spec;
use cluster_core::spec::fleet::{read_cost_per_hour, read_latency_class};
use cluster_core::spec::read::{self, keyword};
use cluster_core::transport::quic::{QuicClient, QuicServer};
use cluster_core::transport::tls;
use cluster_core::transport::{Identity, Role, Transport};

use crate::Outcome;
use crate::server::{addr, read_label, read_tls};

pub struct AgentConfig {
    pub name: String,
    pub cluster: String,
    pub data_dir: PathBuf,
    pub servers: Vec<SocketAddr>,
    pub bind: SocketAddr,
    /// The node as configured; the fingerprint fills in the rest.
    pub node: Node,
    /// Overrides of the fingerprint.
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub cgroups: bool,
    /// Whom exec tasks run as.
    pub task_users: TaskUsers,
    pub rotation: Rotation,
    pub gc: GcPolicy,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read_config(file: &cluster_core::diag::SourceFile) -> spec::Checked<AgentConfig> {
    read::checked(file, |top, d| {
        let base = Path::new(&file.name).parent().unwrap_or(Path::new("."));
        let rel = |p: &str| -> PathBuf { if Path::new(p).is_absolute() { p.into() } else { base.join(p) } };
        let mut a = top.table(d, "agent").or_else(|| {
            d.error_hint(
                0..0,
                "missing [agent] table",
                "start the file with [agent] and name, cluster, data_dir, servers",
            );
            None
        })?;
        a.path = "[agent]".into();
        let name = read_label(&mut a, d, "name", "\"node-a\"");
        let cluster = read_label(&mut a, d, "cluster", "\"eu-west\"");
        let data_dir = a.required_str(d, "data_dir", "\"data/node-a\"").map(|(p, _)| rel(p));
        let servers: Vec<SocketAddr> = match a.str_list(d, "servers") {
            Some(list) if !list.is_empty() => list.into_iter().filter_map(|v| addr(d, Some(v))).collect(),
            _ => {
                a.missing(d, "servers", "[\"127.0.0.1:4701\"]");
                Vec::new()
            }
        };
        let bind = match a.str(d, "bind") {
            Some(v) => addr(d, Some(v)),
            None => Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        };
        let str_or = |d: &mut Diagnostics, t: &mut read::Table, key: &'static str, default: &str| {
            t.str(d, key).map_or_else(|| default.to_string(), |(v, _)| v.to_string())
        };
        let class = str_or(d, &mut a, "class", "default");
        let region = str_or(d, &mut a, "region", "");
        let zone = str_or(d, &mut a, "zone", "default");
        let environment = a.str(d, "environment").map_or(Some(Environment::Onprem), |w| {
            keyword(d, "environment", w, Environment::WORDS, Environment::from_word)
        });
        let execution_model = a.str(d, "execution_model").map_or(Some(ExecutionModel::Process), |w| {
            keyword(d, "execution model", w, ExecutionModel::WORDS, ExecutionModel::from_word)
        });
        let cost_per_hour = read_cost_per_hour(&mut a, d);
        let power_watts = a.str(d, "power_budget").map_or(0, |(t, s)| {
            resources::parse_watts(t).unwrap_or_else(|h| {
                d.error_hint(s, format!("invalid power_budget `{t}`"), h);
                0
            })
        });
        let latency_class = read_latency_class(&mut a, d);
        // Secure by default: a command runner only where the operator
        // asks for one (Nomad leaves its raw_exec off likewise).
        let drivers: Vec<String> = match a.str_list(d, "drivers") {
            None => vec!["mock".into()],
            Some(list) => {
                let names: Vec<String> = list
                    .into_iter()
                    .filter_map(|w| {
                        keyword(d, "driver", w, DRIVER_NAMES, |n| DRIVER_NAMES.contains(&n).then(|| n.to_string()))
                    })
                    .collect();
                if names.is_empty() {
                    d.error_hint(a.span.clone(), "no driver enabled", "list at least one: drivers = [\"exec\"]");
                }
                names
            }
        };
        let task_users = read_task_users(&mut a, d);
        let list = |d: &mut Diagnostics, t: &mut read::Table, key: &'static str| -> Vec<Arc<str>> {
            t.str_list(d, key).unwrap_or_default().into_iter().map(|(v, _)| Arc::from(v)).collect()
        };
        let datasets = list(d, &mut a, "datasets");
        let jurisdictions = list(d, &mut a, "jurisdictions");
        let meta = a.str_map(d, "meta").into_iter().map(|(k, v, _)| (k.to_string(), v.to_string())).collect();
        let cpu_millis = a.scalar_text(d, "cpu").and_then(|(t, _, s)| {
            resources::parse_cpu(&t).map_err(|h| d.error_hint(s, format!("invalid cpu `{t}`"), h)).ok()
        });
        let memory_bytes = a.str(d, "memory").and_then(|(t, s)| {
            resources::parse_bytes(t).map_err(|h| d.error_hint(s, format!("invalid memory `{t}`"), h)).ok()
        });
        let cgroups = a.bool(d, "cgroups").is_none_or(|(b, _)| b);
        a.finish(d);
        let mut rotation = Rotation::default();
        if let Some(mut l) = top.table(d, "logs") {
            l.path = "[logs]".into();
            if let Some((t, s)) = l.str(d, "max_file") {
                match resources::parse_bytes(t) {
                    Ok(b) if b >= 1024 => rotation.file_bytes = b,
                    Ok(_) => {
                        d.error_hint(s, format!("max_file `{t}` is too small"), "use 1KiB or more, e.g. \"10MiB\"")
                    }
                    Err(h) => d.error_hint(s, format!("invalid max_file `{t}`"), h),
                }
            }
            match l.int(d, "max_files") {
                Some((n, _)) if (1..=100).contains(&n) => rotation.files = n as usize,
                Some((n, s)) => d.error_hint(s, format!("max_files = {n}"), "keep 1 to 100 files"),
                None => {}
            }
            l.finish(d);
        }
        let gc = read_gc(top, d);
        let (ca, cert, key) = read_tls(top, d, &rel, "agent-node-a");
        let name = name?;
        let node = Node {
            id: NodeId::new(&name),
            class: class.into(),
            region: region.into(),
            zone: zone.into(),
            environment: environment?,
            execution_model: execution_model?,
            attributes: Default::default(),
            meta,
            drivers: drivers.iter().map(|n| Arc::from(n.as_str())).collect(),
            jurisdictions,
            datasets,
            capacity: resources::Resources { power_watts, ..Default::default() },
            gpus: Vec::new(),
            cost_per_hour,
            latency_class,
            status: NodeStatus::Ready,
            eligible: true,
            draining: false,
            drain_deadline_ms: None,
            agent_address: None,
        };
        if servers.is_empty() {
            return None;
        }
        Some(AgentConfig {
            name,
            cluster: cluster?,
            data_dir: data_dir?,
            servers,
            bind: bind?,
            node,
            cpu_millis,
            memory_bytes,
            cgroups,
            task_users: task_users?,
            rotation,
            gc,
            ca: ca?,
            cert: cert?,
            key: key?,
        })
    })
}

/// The `[gc]` table: when the agent removes ended allocations' directories.
fn read_gc(top: &mut read::Table, d: &mut Diagnostics) -> GcPolicy {
    let mut policy = GcPolicy::default();
    let Some(mut g) = top.table(d, "gc") else { return policy };
    g.path = "[gc]".into();
    let duration =
        |d: &mut Diagnostics, g: &mut read::Table, key: &'static str, min_ms: u64, into: &mut std::time::Duration| {
            if let Some((text, span)) = g.str(d, key) {
                match spec::parse_duration_ms(text) {
                    Ok(ms) if ms >= min_ms => *into = std::time::Duration::from_millis(ms),
                    Ok(_) => {
                        d.error_hint(span, format!("{key} `{text}` is too short"), format!("use {min_ms}ms or more"))
                    }
                    Err(e) => d.error_hint(span, format!("{key} `{text}` is not a duration"), e),
                }
            }
        };
    duration(d, &mut g, "interval", 1_000, &mut policy.interval);
    duration(d, &mut g, "retention", 0, &mut policy.retention);
    match g.int(d, "max_allocs") {
        Some((n, _)) if (0..=1_000_000).contains(&n) => policy.max_allocs = n as usize,
        Some((n, s)) => d.error_hint(s, format!("max_allocs = {n}"), "keep 0 to 1000000 ended allocations"),
        None => {}
    }
    match g.int(d, "disk_usage_threshold") {
        Some((n, _)) if (1..=100).contains(&n) => policy.disk_usage_threshold_pct = n as u8,
        Some((n, s)) => {
            d.error_hint(s, format!("disk_usage_threshold = {n}"), "a percentage, 1 to 100 (100: never for disk)")
        }
        None => {}
    }
    g.finish(d);
    policy
}

/// `task_user` and `allowed_users`. An agent running as root runs tasks
/// as `nobody` unless `task_user` names another account; one that is not
/// root runs them as itself and cannot be told otherwise.
fn read_task_users(a: &mut read::Table, d: &mut Diagnostics) -> Option<TaskUsers> {
    let me = Account::current();
    let root = me.uid == 0;
    let mut ok = true;
    let account = |d: &mut Diagnostics, name: &str, span: cluster_core::diag::Span| -> Option<Account> {
        match Account::lookup(name) {
            Ok(acc) if !root && acc.uid != me.uid => {
                d.error_hint(
                    span,
                    format!(
                        "tasks cannot run as `{name}`: the agent runs as uid {} and only root switches users",
                        me.uid
                    ),
                    "run the agent as root, or remove the setting to run tasks as the agent's user",
                );
                None
            }
            Ok(acc) => Some(acc),
            Err(e) => {
                d.error_hint(span, e, "name an account of this machine (see /etc/passwd)");
                None
            }
        }
    };
    let default = match a.str(d, "task_user") {
        Some((name, span)) => {
            let found = account(d, name, span);
            ok &= found.is_some();
            found
        }
        None if root => match Account::lookup(DEFAULT_TASK_USER) {
            Ok(acc) => Some(acc),
            Err(e) => {
                d.error_hint(
                    a.span.clone(),
                    format!("tasks run as `{DEFAULT_TASK_USER}` by default, but {e}"),
                    "set task_user to an unprivileged account of this machine",
                );
                ok = false;
                None
            }
        },
        None => None,
    };
    let mut allowed = Vec::new();
    for (name, span) in a.str_list(d, "allowed_users").unwrap_or_default() {
        if !cluster_core::spec::job::is_valid_user(name) {
            d.error_hint(span, format!("invalid user `{name}`"), "a user name as `useradd` takes: `www-data`");
            ok = false;
        } else {
            match account(d, name, span.clone()) {
                Some(acc) if acc.uid == 0 && name != "root" => {
                    d.error_hint(
                        span,
                        format!("`{name}` is uid 0: a task that names it runs as root"),
                        "list `root` itself if that is meant",
                    );
                    ok = false;
                }
                Some(acc) => allowed.push(acc),
                None => ok = false,
            }
        }
    }
    ok.then_some(TaskUsers { default, allowed })
}

/// Whom an agent running as root runs tasks as when its config says nothing.
pub const DEFAULT_TASK_USER: &str = "nobody";

pub fn load_config(path: &Path) -> anyhow::Result<AgentConfig> {
    crate::output::load(path, read_config)
}

pub async fn run(mut c: AgentConfig) -> anyhow::Result<Outcome> {
    cluster_core::private::private_dir(&c.data_dir)
        .with_context(|| format!("cannot create data_dir {} (0700)", c.data_dir.display()))?;
    // Every path a task is given (`HANSE_ALLOC_DIR`, `HANSE_TASK_DIR`) is
    // absolute, whatever the agent's working directory and config path:
    // a task runs in its own directory, where a relative one means nothing.
    c.data_dir = std::fs::canonicalize(&c.data_dir)
        .with_context(|| format!("cannot resolve data_dir {}", c.data_dir.display()))?;
    let ca = std::fs::read_to_string(&c.ca).with_context(|| format!("cannot read [tls] ca {}", c.ca.display()))?;
    let pair = tls::read_pair(&c.cert, &c.key)?;
    let me = Identity::new(&c.cluster, Role::Agent, &c.name);
    let mut node = c.node.clone();
    let found = fingerprint(&c.data_dir);
    node.capacity.cpu_millis = c.cpu_millis.unwrap_or(found.resources.cpu_millis);
    node.capacity.memory_bytes = c.memory_bytes.unwrap_or(found.resources.memory_bytes);
    node.capacity.disk_bytes = found.resources.disk_bytes;
    node.gpus = found.gpus;
    node.attributes = found.attributes;
    let cgroups = if c.cgroups {
        match Cgroups::detect(&c.cluster, &c.name) {
            Ok(cg) => Some(cg),
            Err(why) => {
                eprintln!("warning: {why}: tasks run without cpu and memory limits");
                None
            }
        }
    } else {
        None
    };
    if node.drivers.iter().any(|d| &**d == "exec") {
        if c.task_users.default.as_ref().is_some_and(|a| a.uid == 0) {
            eprintln!("warning: task_user is root: every exec task can do anything on this machine");
        }
        if c.task_users.allowed.iter().any(|a| a.uid == 0) {
            eprintln!("warning: allowed_users lists root: a task that names it can do anything on this machine");
        }
    }
    let client = Arc::new(QuicClient::new(&ca, &pair)?);
    let transport: Arc<dyn Transport<ServerRpc>> = client.clone();
    let options = AgentOptions {
        cluster: c.cluster.clone(),
        node: node.clone(),
        servers: c.servers.clone(),
        data_dir: c.data_dir.clone(),
        rotation: c.rotation,
        drivers: Drivers::only(
            cgroups.clone(),
            &node.drivers.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            c.task_users.clone(),
        ),
        supervisor: std::env::current_exe().ok(),
        gc: c.gc,
    };
    let mut agent = Agent::new(options, transport);
    let endpoint = QuicServer::bind::<AgentService>(c.bind, &ca, &pair, agent.log_service())
        .with_context(|| format!("cannot listen on {}", c.bind))?;
    // The node registers with the address its logs are served on.
    agent.advertise(endpoint.local_addr());
    let gpus: Vec<String> = node.gpus.iter().map(|g| format!("{} x {}", g.count, g.model)).collect();
    println!(
        "agent {me}: {} cores, {} memory, {} disk, gpus [{}], arch {}; servers {}; logs served on {}; cgroups {}; data in {}",
        resources::fmt_cpu(node.capacity.cpu_millis),
        resources::fmt_bytes(node.capacity.memory_bytes),
        resources::fmt_bytes(node.capacity.disk_bytes),
        gpus.join(", "),
        node.attributes.get("arch").map_or("?", String::as_str),
        c.servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        endpoint.local_addr(),
        if cgroups.is_some() { "on" } else { "off" },
        c.data_dir.display(),
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let result = agent.run(shutdown).await;
    endpoint.close();
    client.close();
    result.map_err(|e| anyhow::anyhow!(e))?;
    println!("agent stopped");
    Ok(Outcome::Ok)
}
