//! `hanse-sim`: runs Hanse's deterministic simulator (the `sim` crate).
//!
//! ```text
//! hanse-sim --seeds 300                 seeds 0..300; one line per failing seed
//! hanse-sim --seed 7 --trace            one seed's event trace
//! hanse-sim --plant NAME --seeds 200    with a known bug planted: must fail
//! hanse-sim --scenario all              the review's breaks, scripted
//! ```
//! Ends with `name: value` lines; exits 1 on any violation (for a known
//! break, on any outcome other than the one expected).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use sim::scenario::{Expect, Scenario};
use sim::{Options, Plant, run};

#[derive(Parser)]
#[command(name = "hanse-sim", about = "Hanse's deterministic simulator: a federation under seeded faults")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run this one seed (with --trace, print its event trace).
    #[arg(long)]
    seed: Option<u64>,
    /// Print the event trace of the run (with --seed or --scenario NAME).
    #[arg(long)]
    trace: bool,
    /// Plant a known bug (see --list-plants).
    #[arg(long)]
    plant: Option<String>,
    #[arg(long)]
    list_plants: bool,
    /// Run a scripted scenario by name, or `all`.
    #[arg(long)]
    scenario: Option<String>,
    #[arg(long)]
    list_scenarios: bool,
}

fn main() -> ExitCode {
    // Piped into `head`, end quietly as other command-line tools do.
    // SAFETY: restoring a signal's default action before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = Args::parse();
    if args.list_plants {
        for p in Plant::ALL {
            println!("{:<32} {}", p.name(), p.describe());
        }
        return ExitCode::SUCCESS;
    }
    if args.list_scenarios {
        for s in Scenario::ALL {
            let expect = match s.expect() {
                Expect::Pass => "passes".to_string(),
                Expect::KnownBreak(why) => format!("known break ({why})"),
            };
            println!("{:<30} {} [{expect}]", s.name(), s.describe());
        }
        return ExitCode::SUCCESS;
    }
    let plant = match args.plant.as_deref().map(|n| (n, Plant::from_name(n))) {
        None => None,
        Some((_, Some(p))) => Some(p),
        Some((n, None)) => {
            eprintln!("error: no plant named `{n}`; `hanse-sim --list-plants` lists them");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let (mut runs, mut violations, mut steps, mut sim_ms, mut unexpected) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut collected_outbound, mut collected_inbound) = (0u64, 0u64);
    let mut tally = |r: &sim::Report, label: String, expect: Expect| {
        runs += 1;
        collected_outbound += r.collected_outbound;
        collected_inbound += r.collected_inbound;
        steps += r.steps;
        sim_ms += r.sim_ms;
        if let Some(v) = &r.violation {
            violations += 1;
            println!("{label}: {} at step {} ({} ms): {}", v.invariant, v.step, v.at_ms, v.detail);
        }
        let ok = match expect {
            Expect::Pass => r.violation.is_none(),
            Expect::KnownBreak(_) => r.violation.is_some(),
        };
        if !ok {
            unexpected += 1;
            if r.violation.is_none() {
                println!("{label}: expected to fail ({expect:?}) but passed");
            }
        }
        if args.trace {
            for line in &r.trace {
                println!("{line}");
            }
            println!("trace_hash: {:016x}", r.trace_hash);
        }
    };
    if let Some(name) = args.scenario.as_deref() {
        let chosen: Vec<Scenario> = if name == "all" {
            Scenario::ALL.to_vec()
        } else if let Some(s) = Scenario::from_name(name) {
            vec![s]
        } else {
            eprintln!("error: no scenario named `{name}`; `hanse-sim --list-scenarios` lists them");
            return ExitCode::from(2);
        };
        for s in chosen {
            let seed = args.seed.unwrap_or(1);
            let r = run(&Options { seed, plant, scenario: Some(s), trace: args.trace });
            tally(&r, format!("scenario {}", s.name()), s.expect());
        }
    } else {
        let seeds: Vec<u64> = match args.seed {
            Some(s) => vec![s],
            None => (args.start..args.start + args.seeds).collect(),
        };
        for seed in seeds {
            let r = run(&Options { seed, plant, scenario: None, trace: args.trace });
            tally(&r, format!("seed {seed}"), Expect::Pass);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    println!("seeds_run: {runs}");
    println!("violations: {violations}");
    println!("steps_total: {steps}");
    println!("sim_seconds_total: {:.0}", sim_ms as f64 / 1e3);
    println!("wall_seconds: {wall:.2}");
    println!("seeds_per_second: {:.1}", runs as f64 / wall.max(1e-9));
    println!("delegation_records_collected: {collected_outbound}");
    println!("tombstones_collected: {collected_inbound}");
    if unexpected > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
