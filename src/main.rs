//! `hanse`: the command-line interface and daemon wiring.
//!
//! Exit codes: 0 success, 1 error, 2 placement failure (as Nomad users expect
//! from `job run` and `job plan`).

mod federation;
mod job;
mod output;
mod server;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hanse", version, about = "A federated multi-cluster workload orchestrator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with jobs: validate specs, plan placements.
    #[command(subcommand)]
    Job(JobCommand),
    /// The federation: gossip keys and member clusters.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Certificates: the federation's CA, and one per server and agent.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Run one Raft server of a cluster (QUIC with mutual TLS).
    Server {
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
    },
}

fn parse_role(s: &str) -> Result<cluster_core::transport::Role, String> {
    cluster_core::transport::Role::from_word(s).ok_or_else(|| format!("`{s}` is not a role: use server or agent"))
}

#[derive(Subcommand)]
enum FederationCommand {
    /// Make a new gossip key (print it, or write it to a new file, mode 0600).
    Keygen {
        /// Write the key to this file instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List the federation's clusters as gossip sees them: status, leader,
    /// free capacity and the age of each cluster's summary.
    Members {
        /// A server's gossip address to join through (repeatable).
        #[arg(long = "seed", value_name = "ADDR", env = "HANSE_GOSSIP_SEEDS", value_delimiter = ',')]
        seeds: Vec<String>,
        /// The federation's key file (one key a line, the primary first).
        #[arg(long, value_name = "FILE", env = "HANSE_GOSSIP_KEY_FILE")]
        key_file: PathBuf,
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
    /// Plan a job without running it: where each instance would go, and why
    /// the others cannot be placed.
    Plan {
        /// The job spec file (TOML).
        file: PathBuf,
        /// Plan offline against a node inventory file (examples/fleets/).
        #[arg(long, value_name = "FLEET")]
        nodes: PathBuf,
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
    let result = match cli.command {
        Command::Federation(FederationCommand::Keygen { out }) => federation::keygen(out.as_deref()),
        Command::Tls(TlsCommand::Ca(CaCommand::Create { federation, dir, days })) => {
            tls::ca_create(&federation, &dir, days)
        }
        Command::Tls(TlsCommand::Cert(CertCommand::Create { cluster, role, name, ca_dir, out_dir, days })) => {
            tls::cert_create(tls::CertArgs { cluster, role, name, ca_dir, out_dir, days })
        }
        Command::Server { config, name, data_dir, bind } => {
            server::load_config(&config, server::Overrides { name, data_dir, bind })
                .and_then(|c| runtime().and_then(|rt| rt.block_on(server::run(c))))
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
        Command::Job(JobCommand::Validate { files, out }) => job::validate(&files, out.json),
        Command::Job(JobCommand::Plan { file, nodes, seed, verbose, out }) => {
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
