//! `hanse`: the command-line interface and daemon wiring.
//!
//! Exit codes: 0 success, 1 error, 2 placement failure (as Nomad users expect
//! from `job run` and `job plan`).

mod federation;
mod job;
mod output;

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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Federation(FederationCommand::Keygen { out }) => federation::keygen(out.as_deref()),
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
