//! `hanse-chaos`: the real binaries under real faults, as Jepsen does it.
//!
//! ```text
//! cargo build --release && cargo run --release --bin hanse-chaos -- --duration 120s --seed 7
//! hanse-chaos --cleanup RUN      removes what an interrupted (SIGKILLed) run RUN left
//! ```
//!
//! Root on Linux, with `ip` (iproute2), `nft` (nftables) and `faketime`.
//! It starts three clusters (eu-west, eu-central, us-east) of three
//! `hanse server`s and two `hanse agent`s each, every process in its own
//! network namespace ([`net`]); drives a workload through their APIs
//! ([`workload`]); injects faults drawn from the seed ([`nemesis`]) for
//! `--duration`; heals everything and waits for the federation to settle;
//! and checks, from `/proc` only ([`checker`]), every 100 ms:
//! - no at-most-once instance ever alive twice;
//! - no EU-only instance ever alive outside an EU cluster;
//! - once healed, every wanted instance runs exactly once within
//!   `--settle`, and no acknowledged job is lost;
//! - no server or agent ended by itself (a panic, an abort).
//!
//! It ends with `name: value` lines (`ops_acked`, `ops_lost`,
//! `faults_injected`, `at_most_once_overlaps`, `forbidden_placements`,
//! `convergence_s`, `crashes`) and exits 1 on any violation, naming the
//! seed and the history file (`DIR/history.jsonl`: every operation with its
//! answer, every fault, every violation). Everything the run made outside
//! its directory (processes, namespaces, task cgroups) is removed by the
//! run's id when it ends, also on Ctrl-C; the directory is kept when the
//! run failed or with `--keep`.

mod checker;
mod history;
mod nemesis;
mod net;
mod workload;
mod world;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;

use crate::checker::Checker;
use crate::history::History;
use crate::nemesis::Nemesis;
use crate::workload::{Ledger, Outcome};
use crate::world::World;

#[derive(Parser)]
#[command(name = "hanse-chaos", about = "Hanse's real processes under seeded faults, checked from /proc (root, Linux)")]
struct Args {
    /// How long faults are injected, e.g. 120s or 30m; then all is healed.
    #[arg(long, default_value = "120s", value_parser = duration)]
    duration: Duration,
    /// The seed faults and workload are drawn from (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How long the federation may take to settle once healed.
    #[arg(long, default_value = "90s", value_parser = duration)]
    settle: Duration,
    /// The longest SIGSTOP of a process.
    #[arg(long, default_value = "30s", value_parser = duration)]
    max_pause: Duration,
    /// The `hanse` binary to run (default: the one beside this program).
    #[arg(long)]
    hanse: Option<PathBuf>,
    /// Where configs, data, logs and the history go (default: /tmp/hanse-chaos-RUN).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the directory even when the run passed.
    #[arg(long)]
    keep: bool,
    /// Remove what run RUN left (its processes, namespaces and task
    /// cgroups), e.g. after it was killed with SIGKILL, and exit.
    #[arg(long, value_name = "RUN")]
    cleanup: Option<String>,
}

fn duration(text: &str) -> Result<Duration, String> {
    cluster_core::spec::parse_duration_ms(text).map(Duration::from_millis)
}

/// Set by SIGINT and SIGTERM: the run stops, cleans up, and exits 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
    // A second one ends the program at once (the run's id, printed at
    // its start, is what `--cleanup` needs then).
    // SAFETY: signal(2) is async-signal-safe.
    unsafe { libc::signal(signal, libc::SIG_DFL) };
}

/// Runs its closure when dropped: on a thread's normal end and on a panic.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Removes everything the run made outside its directory when dropped:
/// on every way out of [`run`], a panic in any of its threads included.
struct CleanUp<'a>(&'a str);

impl Drop for CleanUp<'_> {
    fn drop(&mut self) {
        world::clean_up(self.0);
    }
}

/// Sleeps `span`, waking early when `stop` is set.
pub fn sleep_unless(stop: &AtomicBool, span: Duration) {
    let end = Instant::now() + span;
    while !stop.load(Ordering::Relaxed) && !INTERRUPTED.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(run) = &args.cleanup {
        world::clean_up(run);
        eprintln!("removed what run {run} left");
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if INTERRUPTED.load(Ordering::Relaxed) { 130 } else { 2 })
        }
    }
}

/// The figures of a run.
struct Figures {
    ops_acked: u64,
    ops_lost: u64,
    /// Jobs not running what their last operation asks when the run ended.
    unsettled: u64,
    faults_injected: u64,
    at_most_once_overlaps: u64,
    forbidden_placements: u64,
    /// From the heal to a settled federation; `None`: not within the bound.
    convergence: Option<Duration>,
    crashes: u64,
    copies_max: usize,
    remote_copies_max: usize,
}

/// The `hanse` binary and libfaketime, or what is missing.
fn preflight(args: &Args) -> anyhow::Result<(PathBuf, PathBuf)> {
    if !cfg!(target_os = "linux") {
        bail!("hanse-chaos runs on Linux only (network namespaces, nftables, /proc)");
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("hanse-chaos needs root: it creates network namespaces and nftables rules");
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = std::process::Command::new(tool).arg("--version").output().is_ok();
        if !found {
            bail!("`{tool}` is missing: apt-get install {package}");
        }
    }
    let Some(libfaketime) = world::find_libfaketime() else {
        bail!("libfaketime is missing (clock faults preload it): apt-get install faketime");
    };
    let hanse = match &args.hanse {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("hanse"),
    };
    if !hanse.is_file() {
        bail!("no hanse binary at {}: build it (cargo build --release) or pass --hanse PATH", hanse.display());
    }
    Ok((std::path::absolute(hanse)?, libfaketime))
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let (hanse, libfaketime) = preflight(args)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64 % 1_000_000)
    });
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let run = format!("{:06x}", (u64::from(nonce) ^ u64::from(std::process::id()) << 8) & 0xff_ffff);
    let dir = args.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("hanse-chaos-{run}")));
    // A directory of its own: a passing run removes it, and a run on an
    // earlier run's data or marks would check nothing.
    let empty = std::fs::read_dir(&dir).map(|mut d| d.next().is_none());
    if matches!(empty, Ok(false)) {
        bail!("{} is not empty: give --dir a new directory (a passing run removes it)", dir.display());
    }
    std::fs::create_dir_all(dir.join("marks")).with_context(|| format!("create {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    // Tasks run as `nobody` under a root agent: they leave their marks
    // here (sticky: one cannot remove another's).
    std::fs::set_permissions(dir.join("marks"), std::fs::Permissions::from_mode(0o1777))?;
    let dir = std::path::absolute(dir)?;
    eprintln!("hanse-chaos: run {run}, seed {seed}, in {} (interrupted: hanse-chaos --cleanup {run})", dir.display());
    // SAFETY: installing async-signal-safe handlers (one atomic store)
    // before any thread starts.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let net = net::Net::create(&run, &world::node_names())?;
    let clean_up = CleanUp(&run);
    eprintln!("hanse-chaos: {} namespaces up; starting 9 servers and 6 agents", net.nodes.len() + 1);
    let world = World::start(&dir, &hanse, &libfaketime, &run, net, Duration::from_secs(90))
        .with_context(|| format!("starting the federation (logs in {})", dir.join("logs").display()))?;
    let history = History::create(&dir.join("history.jsonl"))?;
    history.write(json!({ "run": run, "seed": seed, "duration_ms": args.duration.as_millis() as u64 }));
    let figures = drive(args, &world, &history, seed);
    history.flush();
    world.stop_all();
    drop(clean_up);
    let figures = figures?;
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; everything the run made is removed, its directory kept: {}", dir.display());
    }
    println!("seed: {seed}");
    println!("ops_acked: {}", figures.ops_acked);
    println!("ops_lost: {}", figures.ops_lost);
    println!("faults_injected: {}", figures.faults_injected);
    println!("at_most_once_overlaps: {}", figures.at_most_once_overlaps);
    println!("forbidden_placements: {}", figures.forbidden_placements);
    match figures.convergence {
        Some(c) => println!("convergence_s: {:.1}", c.as_secs_f64()),
        None => println!("convergence_s: {:.1} (not settled: the bound)", args.settle.as_secs_f64()),
    }
    println!("crashes: {}", figures.crashes);
    println!("unsettled_jobs: {}", figures.unsettled);
    println!("copies_max: {}", figures.copies_max);
    println!("remote_copies_max: {}", figures.remote_copies_max);
    let passed = figures.ops_lost == 0
        && figures.at_most_once_overlaps == 0
        && figures.forbidden_placements == 0
        && figures.convergence.is_some()
        && figures.crashes == 0;
    if passed {
        if !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    } else {
        eprintln!(
            "hanse-chaos: FAILED with seed {seed}; history in {}, logs in {}; again: hanse-chaos --seed {seed} --duration {}s",
            dir.join("history.jsonl").display(),
            dir.join("logs").display(),
            args.duration.as_secs()
        );
    }
    Ok(passed)
}

/// Runs the workload and the nemesis for `--duration` while checking,
/// then heals and waits for the federation to settle.
fn drive(args: &Args, world: &World, history: &History, seed: u64) -> anyhow::Result<Figures> {
    let ledger = Ledger::default();
    let nemesis = Nemesis::new(world, history, args.max_pause);
    let mut checker = Checker::default();
    let stop = AtomicBool::new(false);
    let healed_at = AtomicU64::new(u64::MAX);
    let mut crashes = 0u64;
    let marks = world.dir.join("marks");
    let mut convergence = None;
    let mut unsettled = Vec::new();
    std::thread::scope(|s| -> anyhow::Result<()> {
        // Whatever ends this closure, a panic too, the threads stop: the
        // scope joins them.
        let _stop = Defer(|| stop.store(true, Ordering::Relaxed));
        let workload = s.spawn(|| {
            workload::run(world, &ledger, history, seed, &stop);
            // Once healed, settle what no answer settled (see `resolve`).
            while healed_at.load(Ordering::Relaxed) == u64::MAX && !INTERRUPTED.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            workload::resolve(world, &ledger, history, args.settle);
        });
        let faults = s.spawn(|| {
            // Healed or panicked, the workload must not wait for ever.
            let _healed = Defer(|| healed_at.store(world.now_ms(), Ordering::Relaxed));
            nemesis.run(seed, &stop)
        });
        let start = Instant::now();
        let mut last_report = Instant::now();
        let mut settled_since: Option<u64> = None;
        let mut interrupted_at: Option<Instant> = None;
        loop {
            let tick = Instant::now();
            if start.elapsed() >= args.duration || INTERRUPTED.load(Ordering::Relaxed) {
                stop.store(true, Ordering::Relaxed);
            }
            let now = world.now_ms();
            let copies = checker::sample(world);
            let jobs = ledger.jobs.lock().unwrap().clone();
            checker.observe(&copies, &jobs, history, now);
            for c in world.crashes() {
                crashes += 1;
                history.write(json!({ "t_ms": now, "violation": "crash", "process": c.name, "status": c.status, "log_tail": c.log_tail }));
                eprintln!("hanse-chaos: {} ended by itself ({})", c.name, c.status);
            }
            if INTERRUPTED.load(Ordering::Relaxed) {
                let since = *interrupted_at.get_or_insert_with(Instant::now);
                if (faults.is_finished() && workload.is_finished()) || since.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
            // Healed (or the nemesis ended otherwise, a panic), and every
            // operation's outcome settled: wait for the federation.
            let healed = match healed_at.load(Ordering::Relaxed) {
                u64::MAX if faults.is_finished() => now,
                h => h,
            };
            if faults.is_finished() && workload.is_finished() {
                unsettled = checker::unsettled(&copies, &jobs, &marks);
                if unsettled.is_empty() {
                    let since = *settled_since.get_or_insert(now);
                    // Settled, and still so 3 s later.
                    if now - since >= 3000 {
                        convergence = Some(Duration::from_millis(since.saturating_sub(healed)));
                        break;
                    }
                } else {
                    settled_since = None;
                }
                if now.saturating_sub(healed) > args.settle.as_millis() as u64 {
                    break;
                }
            }
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = Instant::now();
                let phase = if healed == u64::MAX { "faults" } else { "settling" };
                eprintln!(
                    "hanse-chaos: {:>4}s {phase}: {} faults, {} ops acked, {} copies running, {} overlaps, {} forbidden, {} crashes{}",
                    start.elapsed().as_secs(),
                    nemesis.injected.load(Ordering::Relaxed),
                    ledger.ops_acked.load(Ordering::Relaxed),
                    copies.len(),
                    checker.at_most_once_overlaps,
                    checker.forbidden_placements(),
                    crashes,
                    if unsettled.is_empty() { String::new() } else { format!(", {} unsettled", unsettled.len()) },
                );
            }
            std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
        }
        stop.store(true, Ordering::Relaxed);
        workload.join().map_err(|_| anyhow::anyhow!("the workload thread panicked"))?;
        faults.join().map_err(|_| anyhow::anyhow!("the nemesis thread panicked"))?
    })?;
    let jobs = ledger.jobs.lock().unwrap().clone();
    for (job, problem) in &unsettled {
        history.write(json!({ "violation": "unsettled", "job": job, "problem": problem }));
        eprintln!("hanse-chaos: not settled: {job}: {problem}");
    }
    // Lost: an acknowledged job its cluster no longer knows, or an
    // acknowledged stop whose copies still run. (Work that is merely slow
    // to come back counts as unsettled, not lost.)
    let unsettled_jobs: std::collections::BTreeSet<&str> = unsettled.iter().map(|(j, _)| j.as_str()).collect();
    let lost = (jobs.iter())
        .filter(|j| j.lost || (j.stop == Some(Outcome::Acked) && unsettled_jobs.contains(j.name.as_str())))
        .count();
    for line in world.panics() {
        crashes += 1;
        history.write(json!({ "violation": "panic", "line": line }));
        eprintln!("hanse-chaos: {line}");
    }
    Ok(Figures {
        ops_acked: ledger.ops_acked.load(Ordering::Relaxed),
        ops_lost: lost as u64,
        unsettled: unsettled_jobs.len() as u64,
        faults_injected: nemesis.injected.load(Ordering::Relaxed),
        at_most_once_overlaps: checker.at_most_once_overlaps,
        forbidden_placements: checker.forbidden_placements(),
        convergence,
        crashes,
        copies_max: checker.copies_max,
        remote_copies_max: checker.remote_copies_max,
    })
}
