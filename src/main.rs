//! `hanse`: the command-line interface and daemon wiring.
//!
//! Exit codes: 0 success, 1 error, 2 placement failure (as Nomad users expect
//! from `job run` and `job plan`).

mod acl;
mod agent;
mod dev;
mod federation;
mod job;
mod output;
mod policy;
mod remote;
mod server;
mod simulate;
mod snapshot;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hanse", version, about = "A federated multi-cluster workload orchestrator")]
struct Cli {
    /// A server's HTTP API (any server of the cluster; writes reach the leader).
    #[arg(long, global = true, env = "HANSE_ADDR", default_value = "127.0.0.1:4646", value_name = "HOST:PORT")]
    address: String,
    /// The secret of your ACL token (`hanse acl bootstrap` makes the first;
    /// `hanse dev` prints one).
    #[arg(long, global = true, env = "HANSE_TOKEN", hide_env_values = true, value_name = "SECRET")]
    token: Option<String>,
    /// The federation's CA certificate, to verify the servers' HTTPS
    /// (`hanse dev` prints one; `pki/ca.pem` from `hanse tls ca create`).
    #[arg(long, global = true, env = "HANSE_CACERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A demo federation in this process: three clusters of three servers
    /// with simulated nodes, real gossip and QUIC, and a burst of jobs that
    /// overflows one of them. Stays up for the other verbs until Ctrl-C.
    Dev {
        /// How many clusters (eu-west, us-east, edge-1, then cloud-4, ...).
        #[arg(long, default_value_t = 3)]
        clusters: usize,
        /// Raft servers per cluster: 1, 3 or 5.
        #[arg(long, default_value_t = 3)]
        servers: u64,
        /// Simulated nodes per cluster.
        #[arg(long, default_value_t = 200)]
        nodes: usize,
        /// Where the servers keep their logs (default: a temporary
        /// directory, removed at exit).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Keep the data directory at exit.
        #[arg(long)]
        keep: bool,
        /// Start the federation only; submit nothing.
        #[arg(long)]
        no_demo: bool,
        /// The first API port: cluster i's server j serves on BASE + 100 i + j.
        #[arg(long, default_value_t = 4646, value_name = "PORT")]
        http_base: u16,
    },
    /// Jobs: run, plan, status, stop, list, validate.
    #[command(subcommand)]
    Job(JobCommand),
    /// Nodes of the cluster: list, status, drain.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Allocations: placed instances.
    #[command(subcommand)]
    Alloc(AllocCommand),
    /// Cluster operations: Raft membership, backups of the state, the audit trail.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Access control: the first token, tokens and policies.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Cluster-wide maintenance: garbage collection.
    #[command(subcommand)]
    System(SystemCommand),
    /// The federation: gossip keys and member clusters.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Federation policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the node agent of this machine: it registers with the cluster's
    /// servers and runs the allocations placed on it.
    Agent {
        /// The agent's config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// One exec task's supervisor (started by `hanse agent`, not by
    /// people): holds the task's whole process tree, keeps its logs, and
    /// kills the tree when the agent stops renewing its deadline.
    #[command(name = "task-supervisor", hide = true)]
    TaskSupervisor,
    /// Certificates: the federation's CA, and one per server and agent.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Print a shell completion script: `source <(hanse completion bash)`,
    /// or save it where your shell loads completions from.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run one server of a cluster (Raft over QUIC with mutual TLS, HTTP API),
    /// or list a running cluster's servers (`server members`).
    #[command(args_conflicts_with_subcommands = true)]
    Server {
        #[command(subcommand)]
        members: Option<ServerCommand>,
        #[command(flatten)]
        run: Option<ServerArgs>,
    },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// The cluster's servers and which one leads.
    Members {
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// The server's config file (TOML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Overrides [server] name.
    #[arg(long)]
    name: Option<String>,
    /// Overrides [server] data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides [server] bind.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Overrides [server] http (the API's address).
    #[arg(long)]
    http: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check policy files; print every problem with file:line:column, and
    /// warn about rules that can never matter.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also warn about peers the federation does not have, asking the
        /// server at this HTTP API address (with --token and --ca-cert).
        #[arg(long, value_name = "HOST:PORT")]
        members: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Every node: status, eligibility, capacity used.
    List {
        #[command(flatten)]
        filter: ListFilter,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// One node and its allocations.
    Status {
        node: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Register a fleet file's nodes and keep them alive until Ctrl-C,
    /// standing in for their agents (heartbeats; allocations run as mocks).
    Simulate {
        /// A fleet file (examples/fleets/).
        #[arg(long, value_name = "FLEET")]
        fleet: PathBuf,
        /// Only the first N nodes of the fleet.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Whether a node takes new work (what runs there keeps running).
    #[command(group(clap::ArgGroup::new("to").required(true).args(["enable", "disable"])))]
    Eligibility {
        node: String,
        #[arg(long)]
        enable: bool,
        #[arg(long)]
        disable: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Move a node's allocations elsewhere: each stops once its replacement
    /// can run on another node (or at the deadline); it takes no new work.
    Drain {
        node: String,
        /// End the drain instead.
        #[arg(long)]
        disable: bool,
        /// Stop the node's work by then (e.g. 30s), whatever the tasks'
        /// kill timeouts.
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<Duration>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum AllocCommand {
    /// One allocation (a000042, 42, or an instance: web.frontend[0]) with
    /// its tasks, or all.
    Status {
        alloc: Option<String>,
        #[command(flatten)]
        filter: ListFilter,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Stop an allocation; its job places the instance again (at-most-once
    /// work once this one has stopped).
    Stop {
        /// a000042, 42, or an instance: web.frontend[0].
        alloc: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Restart an allocation's tasks in place, on the same node: each is
    /// stopped (SIGTERM, then SIGKILL after its kill timeout) and started
    /// again. Not counted against the group's restart policy.
    Restart {
        /// a000042, 42, or an instance: web.frontend[0].
        alloc: String,
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Send a signal to every process of an allocation's tasks.
    Signal {
        /// a000042, 42, or an instance: web.frontend[0].
        alloc: String,
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
        /// SIGHUP, HUP or a number (1 to 64). Without it: SIGKILL, which
        /// ends the tasks (Nomad's default too).
        #[arg(long, short, default_value = "SIGKILL")]
        signal: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A task's output, from the agent of the allocation's node.
    Logs {
        /// a000042, 42, or an instance: web.frontend[0].
        alloc: String,
        /// The task (default: the group's first).
        task: Option<String>,
        /// Standard error instead of standard output.
        #[arg(long)]
        stderr: bool,
        /// Keep printing new output until the task ends (or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N", conflicts_with = "since")]
        tail: Option<u64>,
        /// From this byte of the task's output on (offsets count from its
        /// first byte, across rotations).
        #[arg(long, value_name = "OFFSET")]
        since: Option<u64>,
    },
}

#[derive(Subcommand)]
enum AclCommand {
    /// Create the cluster's first management token (once per cluster).
    Bootstrap {
        /// Use the secret on this file's first line instead of a new one
        /// (to give several clusters the same management secret).
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Tokens: create, list, revoke.
    #[command(subcommand)]
    Token(AclTokenCommand),
    /// Policies: apply, list, delete.
    #[command(subcommand)]
    Policy(AclPolicyCommand),
}

#[derive(Subcommand)]
enum AclTokenCommand {
    /// A new token; prints its secret, once.
    Create {
        /// What it is for (shown in lists and audit records).
        #[arg(long)]
        name: String,
        /// A policy it carries (repeat for several).
        #[arg(long = "policy", value_name = "NAME")]
        policies: Vec<String>,
        /// Grant everything instead.
        #[arg(long)]
        management: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Every token, by accessor (never the secrets).
    List {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Revoke a token by its accessor.
    Revoke {
        accessor: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum AclPolicyCommand {
    /// Create or replace policy NAME from a policy file.
    Apply {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Every policy and its rules.
    List {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete a policy.
    Delete { name: String },
}

/// What a list shows (the servers filter; the CLI follows every page).
/// A filter a list does not know is refused.
#[derive(clap::Args, Default)]
struct ListFilter {
    /// Only these: a job's status (pending, running, blocked, degraded,
    /// complete, failed, stopped), a node's (ready, down), an allocation's
    /// (pending, running, complete, failed, lost).
    #[arg(long)]
    status: Option<String>,
    /// Only jobs or allocations in this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only allocations of this job.
    #[arg(long)]
    job: Option<String>,
    /// Only allocations on this node.
    #[arg(long)]
    node: Option<String>,
    /// Only nodes of this class.
    #[arg(long)]
    class: Option<String>,
}

impl ListFilter {
    /// The query string for `allowed` keys; an error names one given that
    /// this list does not take.
    fn query(&self, list: &str, allowed: &[&str]) -> anyhow::Result<String> {
        let given = [
            ("status", &self.status),
            ("namespace", &self.namespace),
            ("job", &self.job),
            ("node", &self.node),
            ("class", &self.class),
        ];
        let mut pairs = Vec::new();
        for (key, value) in given {
            let Some(v) = value else { continue };
            if !allowed.contains(&key) {
                anyhow::bail!("{list} takes no --{key} (it takes --{})", allowed.join(", --"));
            }
            pairs.push(format!("{key}={}", cluster_core::server::client::encode_query(v)));
        }
        Ok(if pairs.is_empty() { String::new() } else { format!("?{}", pairs.join("&")) })
    }
}

#[derive(Subcommand)]
enum SystemCommand {
    /// Collect now every stopped or finished job (with its allocations and
    /// evaluations) and every down node that holds nothing, whatever the
    /// servers' thresholds.
    Gc {
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    #[command(subcommand)]
    Raft(RaftCommand),
    /// Back up and restore the cluster's whole state.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// The audit trail of the server you talk to: every write it received,
    /// allowed or denied, and every peer offer it decided.
    Audit {
        /// Only what happened in this last while (`30m`, `24h`).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        since: Option<Duration>,
        /// At most this many, the latest.
        #[arg(long, default_value_t = 1_000)]
        limit: u64,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Save the state (jobs, allocations, nodes, evaluations, tokens,
    /// policies) to FILE, read consistently from the leader's log.
    Save {
        file: PathBuf,
        /// Read the server's state as it is, without asking the leader
        /// (works without a leader; may lag).
        #[arg(long)]
        stale: bool,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Check FILE and print its index, term, size and counts per table
    /// (needs no server).
    Inspect {
        file: PathBuf,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Replace the cluster's whole state with FILE's, through its log.
    Restore {
        file: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Restore a file saved from a cluster of another name.
        #[arg(long)]
        other_cluster: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum RaftCommand {
    /// The voters, their addresses, and the leader.
    ListPeers {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Add a server (started with `join = true`) as a voter.
    AddPeer {
        /// Its Raft id.
        #[arg(long)]
        id: u64,
        /// Its QUIC address (the `bind` of its config).
        #[arg(long, value_name = "HOST:PORT")]
        peer_address: String,
    },
    /// Remove a voter.
    RemovePeer {
        #[arg(long)]
        id: u64,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// The federation's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates for servers and agents.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make the CA: DIR/ca.pem and DIR/ca-key.pem (0600); never overwrites.
    Create {
        #[arg(long, default_value = "hanse")]
        federation: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue a certificate naming CLUSTER, ROLE and NAME, signed by the CA:
    /// OUT/CLUSTER-ROLE-NAME.pem and OUT/CLUSTER-ROLE-NAME-key.pem (0600).
    Create {
        #[arg(long)]
        cluster: String,
        /// server or agent.
        #[arg(long, value_parser = parse_role)]
        role: cluster_core::transport::Role,
        #[arg(long)]
        name: String,
        /// Where ca.pem and ca-key.pem are.
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// A DNS name or IP address the server's HTTPS API is reached by,
        /// besides localhost, 127.0.0.1 and ::1 (repeat for several).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// A jurisdiction the server's cluster may claim in gossip (repeat
        /// for several): peers refuse a summary claiming one its
        /// certificate does not allow.
        #[arg(long = "jurisdiction", value_name = "NAME")]
        jurisdictions: Vec<String>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    cluster_core::spec::parse_duration_ms(s).map(Duration::from_millis)
}

fn parse_role(s: &str) -> Result<cluster_core::transport::Role, String> {
    cluster_core::transport::Role::from_word(s).ok_or_else(|| format!("`{s}` is not a role: use server or agent"))
}

#[derive(Subcommand)]
enum KeyCommand {
    /// The keys of the server at --address, and which keys every server of
    /// the federation says it holds (primary first).
    List {
        /// Print only the id of the key the server seals with (for scripts).
        #[arg(long, conflicts_with = "json")]
        primary: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Let the cluster's servers open datagrams sealed with a new key.
    Install {
        /// The key (base64, as `hanse federation keygen` prints). Prefer
        /// --key-file: a command line is visible to other local users.
        #[arg(required_unless_present = "key_file", conflicts_with = "key_file")]
        key: Option<String>,
        /// Read the key from this file's first key line.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Seal with an installed key from now on. Waits until every live
    /// server of the federation says it holds the key.
    Use(KeyStep),
    /// Stop accepting a key. Waits until no live server seals with it.
    Remove(KeyStep),
}

/// A rotation step's key and its safety check.
#[derive(clap::Args)]
struct KeyStep {
    /// The key's id (8 hex digits, from `key list`) or the key.
    key: String,
    /// Skip the wait and the check that every live server is ready.
    #[arg(long)]
    force: bool,
    /// How long to wait for every live server to be ready for the step.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    wait: Duration,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Subcommand)]
enum FederationCommand {
    /// Make a new gossip key (print it, or write it to a new file, mode 0600).
    Keygen {
        /// Write the key to this file instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Rotate the federation's gossip key live: install the new key on
    /// every cluster, then use it on every cluster, then remove the old one.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Delegations of the cluster at --address: outbound (work sent to
    /// peers) and inbound (peers' work running here), with state and progress by instance.
    Delegations {
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List the federation's clusters as gossip sees them: status, leader,
    /// free capacity and the age of each cluster's summary. Asks the
    /// server at --address, or with --seed joins the gossip itself.
    Members {
        /// A server's gossip address to join through (repeatable).
        #[arg(long = "seed", value_name = "ADDR", env = "HANSE_GOSSIP_SEEDS", value_delimiter = ',')]
        seeds: Vec<String>,
        /// The federation's key file (one key a line, the primary first); with --seed.
        #[arg(long, value_name = "FILE", env = "HANSE_GOSSIP_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// The federation's name.
        #[arg(long, default_value = "hanse", env = "HANSE_FEDERATION")]
        federation: String,
        /// The local address to gossip from.
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: SocketAddr,
        /// The longest to wait for the view to settle, in seconds.
        #[arg(long, default_value_t = 5.0)]
        wait: f64,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Check job spec files; print every problem with file:line:column.
    Validate {
        /// Job spec files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Submit a job and wait until it is placed (exit 0), or some instances
    /// cannot be placed (exit 2).
    Run {
        /// The job spec file (TOML).
        file: PathBuf,
        /// Return once the job is registered; do not wait for placement.
        #[arg(long, short)]
        detach: bool,
        /// The longest to wait for placement, in seconds.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A job's allocations and latest evaluation (with why instances are
    /// unplaced); without a job, the list of jobs.
    Status {
        job: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Stop a job's allocations.
    Stop {
        job: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Set how many instances one group of a job runs (a new version that
    /// restarts nothing).
    Scale {
        job: String,
        group: String,
        count: u32,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// The versions of a job the cluster keeps, newest first: which is
    /// current, which are stable, what changed.
    History {
        job: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A version of a job's spec, as it was submitted (with --json: the
    /// text and the spec as the cluster keeps it).
    Inspect {
        job: String,
        /// The version (default: the current one).
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Register a kept version of a job again, as its newest version.
    Revert {
        job: String,
        version: u64,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Promote the canaries of a job's deployment: the rest of the old
    /// version is then replaced.
    Promote {
        job: String,
        /// Only this group's canaries.
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A job's rolling update: its status, or fail it.
    #[command(subcommand)]
    Deployment(DeploymentCommand),
    /// Every job, with its allocations by status.
    List {
        #[command(flatten)]
        filter: ListFilter,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Plan a job without running it: where each instance would go, and why
    /// the others cannot be placed. Against the cluster, or offline with --nodes.
    Plan {
        /// The job spec file (TOML).
        file: PathBuf,
        /// Plan offline against a node inventory file (examples/fleets/).
        #[arg(long, value_name = "FLEET")]
        nodes: Option<PathBuf>,
        /// Seed for candidate sampling; the same seed gives the same plan.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also list every placement, not only the counts per node class.
        #[arg(long, short)]
        verbose: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum DeploymentCommand {
    /// The job's latest deployment: per group, instances placed, healthy
    /// and still of the older version.
    Status {
        job: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Fail the job's running deployment: nothing more is replaced (with
    /// auto_revert, the last stable version is registered again).
    Fail {
        job: String,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Args, Clone, Copy)]
struct OutputArgs {
    /// Print JSON for scripts instead of tables.
    #[arg(long)]
    json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// What a command tells the process to exit with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The input was read but is not acceptable (invalid spec).
    Invalid,
    /// Some instances could not be placed.
    PlacementFailed,
}

fn main() -> ExitCode {
    // `hanse ... | head` ends quietly when head closes the pipe, as other
    // command-line tools do, instead of panicking on a failed print.
    // SAFETY: restoring the default action of a signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Logs to stderr, warnings and up unless RUST_LOG says otherwise
    // (`RUST_LOG=raft=info` shows elections).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Usage errors exit 1, not clap's 2: 2 means a placement failure here.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(1);
        }
        Err(e) => e.exit(),
    };
    let mut client = cluster_core::server::client::Client::new(&cli.address).with_token(cli.token.as_deref());
    if let Some(path) = &cli.ca_cert {
        let ca = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the CA certificate {} (--ca-cert, HANSE_CACERT): {e}", path.display()))
            .and_then(|pem| client.clone().with_ca(&pem).map_err(|e| format!("{}: {e}", path.display())));
        // Not fatal here: only commands that call a server need it, and
        // they say so when they meet its TLS.
        match ca {
            Ok(c) => client = c,
            Err(e) => eprintln!("warning: {e}; commands that call a server cannot verify it"),
        }
    }
    let result = match cli.command {
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "hanse", &mut std::io::stdout());
            Ok(Outcome::Ok)
        }
        Command::Federation(FederationCommand::Keygen { out }) => federation::keygen(out.as_deref()),
        Command::Federation(FederationCommand::Delegations { out }) => remote::delegations(&client, out.json),
        Command::Federation(FederationCommand::Key(k)) => match k {
            KeyCommand::List { primary, out } => federation::key_list(&client, primary, out.json),
            KeyCommand::Install { key, key_file, out } => {
                federation::key_install(&client, key.as_deref(), key_file.as_deref(), out.json)
            }
            KeyCommand::Use(k) => federation::key_use(&client, &k.key, k.force, k.wait, k.out.json),
            KeyCommand::Remove(k) => federation::key_remove(&client, &k.key, k.force, k.wait, k.out.json),
        },
        Command::Tls(TlsCommand::Ca(CaCommand::Create { federation, dir, days })) => {
            tls::ca_create(&federation, &dir, days)
        }
        Command::Tls(TlsCommand::Cert(CertCommand::Create {
            cluster,
            role,
            name,
            ca_dir,
            out_dir,
            days,
            sans,
            jurisdictions,
        })) => tls::cert_create(tls::CertArgs { cluster, role, name, ca_dir, out_dir, days, sans, jurisdictions }),
        Command::Server { members: Some(ServerCommand::Members { out }), .. } => {
            remote::server_members(&client, out.json)
        }
        Command::Server { run: Some(ServerArgs { config, name, data_dir, bind, http }), .. } => {
            server::load_config(&config, server::Overrides { name, data_dir, bind, http })
                .and_then(|c| runtime().and_then(|rt| rt.block_on(server::run(c))))
        }
        Command::Server { .. } => Err(anyhow::anyhow!("give --config FILE to run a server, or `members`")),
        Command::Job(JobCommand::Run { file, detach, timeout, out }) => {
            remote::job_run(&client, &file, detach, Duration::from_secs_f64(timeout.clamp(1.0, 86_400.0)), out.json)
        }
        Command::Job(JobCommand::Status { job, out }) => remote::job_status(&client, job.as_deref(), out.json),
        Command::Job(JobCommand::Stop { job, out }) => remote::job_stop(&client, &job, out.json),
        Command::Job(JobCommand::Scale { job, group, count, out }) => {
            remote::job_scale(&client, &job, &group, count, out.json)
        }
        Command::Alloc(AllocCommand::Stop { alloc, out }) => remote::alloc_stop(&client, &alloc, out.json),
        Command::Alloc(AllocCommand::Restart { alloc, task, out }) => {
            remote::alloc_restart(&client, &alloc, task.as_deref(), out.json)
        }
        Command::Alloc(AllocCommand::Signal { alloc, task, signal, out }) => {
            remote::alloc_signal(&client, &alloc, task.as_deref(), &signal, out.json)
        }
        Command::Job(JobCommand::History { job, out }) => remote::job_history(&client, &job, out.json),
        Command::Job(JobCommand::Inspect { job, version, out }) => {
            remote::job_inspect(&client, &job, version, out.json)
        }
        Command::Job(JobCommand::Revert { job, version, out }) => remote::job_revert(&client, &job, version, out.json),
        Command::Job(JobCommand::Promote { job, group, out }) => {
            remote::job_promote(&client, &job, group.as_deref(), out.json)
        }
        Command::Job(JobCommand::Deployment(DeploymentCommand::Status { job, out })) => {
            remote::deployment_status(&client, &job, out.json)
        }
        Command::Job(JobCommand::Deployment(DeploymentCommand::Fail { job, out })) => {
            remote::deployment_fail(&client, &job, out.json)
        }
        Command::Job(JobCommand::List { filter, out }) => {
            filter.query("job list", &["status", "namespace"]).and_then(|q| remote::job_list(&client, &q, out.json))
        }
        Command::Job(JobCommand::Plan { file, nodes: None, verbose, out, .. }) => {
            remote::job_plan(&client, &file, verbose, out.json)
        }
        Command::Node(NodeCommand::Simulate { fleet, count }) => simulate::simulate(&client, &fleet, count),
        Command::Node(NodeCommand::List { filter, out }) => {
            filter.query("node list", &["status", "class"]).and_then(|q| remote::node_list(&client, &q, out.json))
        }
        Command::Node(NodeCommand::Status { node, out }) => remote::node_status(&client, &node, out.json),
        Command::Node(NodeCommand::Drain { node, disable, deadline, out }) => {
            remote::node_drain(&client, &node, disable, deadline, out.json)
        }
        Command::Node(NodeCommand::Eligibility { node, enable, out, .. }) => {
            remote::node_eligibility(&client, &node, enable, out.json)
        }
        Command::Alloc(AllocCommand::Logs { alloc, task, stderr, follow, tail, since }) => {
            let start = match (tail, since) {
                (Some(n), _) => remote::LogStart::Lines(n),
                (None, Some(o)) => remote::LogStart::Offset(o),
                (None, None) => remote::LogStart::Oldest,
            };
            remote::alloc_logs(&client, &alloc, task.as_deref(), stderr, follow, start)
        }
        Command::Dev { clusters, servers, nodes, data_dir, keep, no_demo, http_base } => runtime().and_then(|rt| {
            rt.block_on(dev::run(dev::DevArgs { clusters, servers, nodes, data_dir, keep, no_demo, http_base }))
        }),
        Command::Agent { config } => {
            // A supervisor that died must be an error on write, not the agent's
            // death by SIGPIPE (tasks start with the default again).
            // SAFETY: setting a signal's action before the runtime starts.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            agent::load_config(&config).and_then(|c| runtime().and_then(|rt| rt.block_on(agent::run(c))))
        }
        Command::TaskSupervisor => {
            let code = cluster_core::agent::supervise::run(std::io::stdin().lock());
            std::process::exit(code)
        }
        Command::Alloc(AllocCommand::Status { alloc, filter, out }) => {
            match filter.query("alloc status", &["status", "namespace", "job", "node"]) {
                Ok(q) if alloc.is_some() && !q.is_empty() => {
                    Err(anyhow::anyhow!("give an allocation, or filters for the list, not both"))
                }
                Ok(q) => remote::alloc_status(&client, alloc.as_deref(), &q, out.json),
                Err(e) => Err(e),
            }
        }
        Command::Acl(a) => match a {
            AclCommand::Bootstrap { secret_file, out } => acl::bootstrap(&client, secret_file.as_deref(), out.json),
            AclCommand::Token(AclTokenCommand::Create { name, policies, management, out }) => {
                acl::token_create(&client, &name, policies, management, out.json)
            }
            AclCommand::Token(AclTokenCommand::List { out }) => acl::token_list(&client, out.json),
            AclCommand::Token(AclTokenCommand::Revoke { accessor, out }) => {
                acl::token_revoke(&client, &accessor, out.json)
            }
            AclCommand::Policy(AclPolicyCommand::Apply { name, file, out }) => {
                acl::policy_apply(&client, &name, &file, out.json)
            }
            AclCommand::Policy(AclPolicyCommand::List { out }) => acl::policy_list(&client, out.json),
            AclCommand::Policy(AclPolicyCommand::Delete { name }) => acl::policy_delete(&client, &name),
        },
        Command::System(SystemCommand::Gc { out }) => remote::system_gc(&client, out.json),
        Command::Operator(OperatorCommand::Audit { since, limit, out }) => {
            remote::operator_audit(&client, since, limit, out.json)
        }
        Command::Operator(OperatorCommand::Snapshot(c)) => match c {
            SnapshotCommand::Save { file, stale, force, out } => snapshot::save(&client, &file, stale, force, out.json),
            SnapshotCommand::Inspect { file, out } => snapshot::inspect(&file, out.json),
            SnapshotCommand::Restore { file, yes, other_cluster, out } => {
                snapshot::restore(&client, &file, yes, other_cluster, out.json)
            }
        },
        Command::Operator(OperatorCommand::Raft(r)) => match r {
            RaftCommand::ListPeers { out } => remote::list_peers(&client, out.json),
            RaftCommand::AddPeer { id, peer_address } => remote::add_peer(&client, id, &peer_address),
            RaftCommand::RemovePeer { id } => remote::remove_peer(&client, id),
            RaftCommand::TransferLeader { id } => remote::transfer_leader(&client, id),
        },
        Command::Federation(FederationCommand::Members { seeds, out, .. }) if seeds.is_empty() => {
            federation::members_from(&client, out.json)
        }
        Command::Federation(FederationCommand::Members { seeds, key_file, federation, bind, wait, out }) => runtime()
            .and_then(|rt| {
                rt.block_on(federation::members(federation::MembersArgs {
                    seeds,
                    key_file,
                    federation,
                    bind,
                    wait: Duration::from_secs_f64(wait.clamp(0.1, 600.0)),
                    json: out.json,
                }))
            }),
        Command::Policy(PolicyCommand::Check { files, members, out }) => {
            let at = members.map(|m| client.clone().at(&m));
            policy::check(&files, out.json, at.as_ref())
        }
        Command::Job(JobCommand::Validate { files, out }) => job::validate(&files, out.json),
        Command::Job(JobCommand::Plan { file, nodes: Some(nodes), seed, verbose, out }) => {
            job::plan_offline(&file, &nodes, seed, verbose, out.json)
        }
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Invalid) => ExitCode::from(1),
        Ok(Outcome::PlacementFailed) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
