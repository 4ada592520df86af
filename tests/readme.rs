//! The README as a newcomer runs it: every shell block marked
//! `<!-- readme-test -->` runs, in order, with bash (`set -euo pipefail`)
//! from the repository's root, and must exit 0 (or the code the marker
//! names: `<!-- readme-test: exit 2 -->`). Blocks marked `while hanse dev`
//! run while `hanse dev` (its defaults, as the README starts it) is up;
//! in them, a line `export HANSE_TOKEN=...` or `export HANSE_CACERT=...`
//! gets what dev printed, as a reader pastes it, and the `export`s of the blocks before carry
//! over, as in the reader's terminal.
//!
//! The blocks run as written, but on this build's binary: `cargo run
//! --release --` and `target/release/hanse` become it, and `cargo build
//! --release` lines are skipped (the test harness built it already).
//! Each block runs in a process group of its own, killed whole when the
//! block ends: nothing a block starts outlives it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The directories the README's blocks make under /tmp, removed before and after.
const SCRATCH: [&str; 4] = ["/tmp/hanse-cluster", "/tmp/hanse-agents", "/tmp/hanse-rolling", "/tmp/hanse-federation"];

struct Block {
    line: usize,
    code: String,
    with_dev: bool,
    exit: i32,
}

fn marked_blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(marker) = lines[i].trim().strip_prefix("<!-- readme-test").and_then(|m| m.strip_suffix("-->")) {
            assert_eq!(
                lines.get(i + 1).map(|l| l.trim()),
                Some("```sh"),
                "README line {}: a marker not followed by ```sh",
                i + 1
            );
            let start = i + 2;
            let end = start + lines[start..].iter().position(|l| l.trim() == "```").expect("a closed block");
            let exit = marker.split("exit").nth(1).map_or(0, |n| n.trim().parse().expect("exit N"));
            out.push(Block {
                line: start,
                code: lines[start..end].join("\n"),
                with_dev: marker.contains("while hanse dev"),
                exit,
            });
            i = end;
        }
        i += 1;
    }
    out
}

fn as_built(code: &str) -> String {
    code.lines()
        .filter(|l| l.trim() != "cargo build --release")
        .map(|l| {
            l.replace("\"$REPO/target/release/hanse\"", "\"$HANSE\"")
                .replace("target/release/hanse", "\"$HANSE\"")
                .replace("cargo run --release -- ", "\"$HANSE\" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `hanse dev`, the `export` lines it printed (by variable), and the file
/// its stderr goes to.
struct Dev(Child, std::collections::BTreeMap<String, String>, std::path::PathBuf);

impl Dev {
    /// Starts `hanse dev` and waits until its demo is over.
    fn start() -> Dev {
        let err_path = std::env::temp_dir().join(format!("hanse-readme-dev-{}.err", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_hanse"))
            .arg("dev")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("start hanse dev");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut dev = Dev(child, Default::default(), err_path.clone());
        let start = Instant::now();
        loop {
            let left = Duration::from_secs(180).saturating_sub(start.elapsed());
            let Ok(line) = rx.recv_timeout(left) else {
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                let lines: Vec<&str> = err.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                panic!("hanse dev did not finish its demo within 180 s; its stderr ends:\n{tail}");
            };
            if let Some((name, value)) = line.trim().strip_prefix("export ").and_then(|e| e.split_once('=')) {
                dev.1.insert(name.to_string(), value.split_whitespace().next().unwrap_or_default().to_string());
            }
            if line.starts_with("Ctrl-C stops it") {
                for v in ["HANSE_TOKEN", "HANSE_CACERT"] {
                    assert!(dev.1.contains_key(v), "hanse dev printed no {v}");
                }
                return dev;
            }
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; SIGTERM is its clean stop.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = std::fs::remove_file(&self.2);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrub() {
    if let Ok(pids) = std::fs::read_to_string("/tmp/hanse-federation/pids") {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: pids the README's federation script started and wrote down.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for d in SCRATCH {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn the_readme_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = marked_blocks(&readme);
    assert!(blocks.len() >= 6, "the README's tested blocks went missing: {}", blocks.len());
    assert!(blocks.iter().any(|b| b.with_dev), "the tour runs against hanse dev");
    scrub();
    let mut dev: Option<Dev> = None;
    let mut session = String::new();
    for b in &blocks {
        if b.with_dev && dev.is_none() {
            dev = Some(Dev::start());
        } else if !b.with_dev {
            dev = None; // its ports are the README's cluster's
        }
        let mut code = as_built(&b.code);
        if let Some(d) = dev.as_ref().filter(|_| b.with_dev) {
            code = code
                .lines()
                .map(|l| {
                    let pasted = ["HANSE_TOKEN", "HANSE_CACERT"]
                        .into_iter()
                        .find(|v| l.trim_start().starts_with(&format!("export {v}=")));
                    match pasted {
                        Some(v) => format!("export {v}={}", d.1[v]),
                        None => l.to_string(),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            code = format!("{session}{code}");
            for l in code.lines().filter(|l| l.trim_start().starts_with("export ")) {
                if !session.contains(l) {
                    session.push_str(l);
                    session.push('\n');
                }
            }
        }
        let script = format!("set -euo pipefail\n{code}\n");
        let log = std::env::temp_dir().join(format!("hanse-readme-{}-{}", std::process::id(), b.line));
        let (out, err) = (log.with_extension("out"), log.with_extension("err"));
        let mut child = Command::new("bash")
            .args(["-c", &script])
            .current_dir(root)
            .env("HANSE", env!("CARGO_BIN_EXE_hanse"))
            .env("HANSE_BIN", env!("CARGO_BIN_EXE_hanse"))
            .env_remove("HANSE_ADDR")
            .env_remove("HANSE_TOKEN")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .process_group(0)
            .spawn()
            .expect("bash");
        let group = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(240);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // SAFETY: the block's own process group, and only it.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        // Gone, not just signalled: the next block (or `hanse dev`) binds
        // the same ports.
        let gone = Instant::now() + Duration::from_secs(10);
        // SAFETY: signal 0 only asks whether the group still exists.
        while unsafe { libc::kill(-group, 0) } == 0 && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(50));
        }
        scrub();
        let (stdout, stderr) =
            (std::fs::read_to_string(&out).unwrap_or_default(), std::fs::read_to_string(&err).unwrap_or_default());
        let _ = (std::fs::remove_file(&out), std::fs::remove_file(&err));
        let code = status.and_then(|s| s.code());
        assert_eq!(
            code,
            Some(b.exit),
            "README.md line {}: the block exited {code:?}, not {}\n--- block\n{}\n--- stdout\n{}\n--- stderr\n{}",
            b.line,
            b.exit,
            b.code,
            stdout,
            stderr
        );
    }
}
