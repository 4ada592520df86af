//! `hanse`: the command-line interface and daemon wiring.
//!
//! Exit codes: 0 success, 1 error, 2 placement failure (as Nomad users expect
//! from `job run` and `job plan`).

mod job;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

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
