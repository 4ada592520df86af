//! `hanse-chaos` as CI runs it: 90 seconds of seeded faults on three real
//! clusters in network namespaces (root, with iproute2, nftables and
//! faketime, which `.ci/run` installs). The run must break no promise, its
//! checker must have seen real tasks (some of them delegated), and it must
//! leave no namespace, process or cgroup behind. Longer runs are the
//! command itself: `cargo run --release --bin hanse-chaos -- --duration 30m`.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole run's bound: setup, 90 s of faults, the settle bound, cleanup.
const LIMIT: Duration = Duration::from_secs(8 * 60);

#[test]
fn ninety_seconds_of_faults_break_no_promise_and_leave_nothing_behind() {
    // SAFETY: geteuid(2) has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test makes network namespaces: run it as root (CI does)");
    let dir = std::env::temp_dir().join(format!("hanse-chaos-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hanse-chaos"))
        .args(["--hanse", env!("CARGO_BIN_EXE_hanse"), "--duration", "90s", "--seed", "42", "--settle", "120s"])
        .arg("--dir")
        .arg(&dir)
        .arg("--keep")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hanse-chaos");
    let out = std::thread::spawn({
        let mut stdout = child.stdout.take().unwrap();
        move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
            s
        }
    });
    let err = std::thread::spawn({
        let mut stderr = child.stderr.take().unwrap();
        move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
            s
        }
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > LIMIT {
            // SIGTERM: it stops, removes what it made, and exits.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(30));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    if status.is_none() {
        // Whatever the hung run left, by its id.
        if let Some(run) = err.split("hanse-chaos: run ").nth(1).and_then(|r| r.split(',').next()) {
            let _ = Command::new(env!("CARGO_BIN_EXE_hanse-chaos")).args(["--cleanup", run]).output();
        }
    }
    let history = std::fs::read_to_string(dir.join("history.jsonl")).unwrap_or_default();
    let violations: Vec<&str> = history.lines().filter(|l| l.contains("\"violation\"")).collect();
    let context = format!("stdout:\n{out}\nstderr:\n{err}\nviolations:\n{}", violations.join("\n"));
    let status = status.unwrap_or_else(|| panic!("hanse-chaos did not end within {LIMIT:?}\n{context}"));
    let run = err
        .split("hanse-chaos: run ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("the run's id\n{context}"))
        .to_string();

    // Nothing of the run is left: namespaces, processes, task cgroups.
    let namespaces: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<&String> = namespaces.iter().filter(|n| n.starts_with(&format!("hc-{run}-"))).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let mark = format!("CHAOS_RUN={run}");
    let processes: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| {
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            env.split(|b| *b == 0).any(|kv| kv == mark.as_bytes())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(processes.is_empty(), "tasks of the run left: pids {processes:?}");
    // Nor its servers and agents, which ran in its directory.
    let in_dir: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(in_dir.is_empty(), "processes of the run left: pids {in_dir:?}");
    let cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/hanse")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<&String> = cgroups.iter().filter(|c| c.contains(&format!("-{run}."))).collect();
    assert!(left.is_empty(), "task cgroups left: {left:?}");

    assert_eq!(status.code(), Some(0), "the run found violations (its history: {})\n{context}", dir.display());
    let figures: BTreeMap<&str, f64> = out
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k, v.split_whitespace().next()?.parse().ok()?)))
        .collect();
    for zero in ["ops_lost", "at_most_once_overlaps", "forbidden_placements", "crashes", "unsettled_jobs"] {
        assert_eq!(figures.get(zero), Some(&0.0), "{zero}\n{context}");
    }
    // It did something, and saw it: operations answered, faults made,
    // tasks read from /proc, some of them running for another cluster.
    assert!(figures["ops_acked"] >= 10.0, "{context}");
    assert!(figures["faults_injected"] >= 5.0, "{context}");
    assert!(figures["copies_max"] >= 5.0, "{context}");
    assert!(figures["remote_copies_max"] >= 1.0, "{context}");
    assert!(figures["convergence_s"] <= 120.0, "{context}");
    let _ = std::fs::remove_dir_all(&dir);
}
