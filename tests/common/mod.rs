//! Helpers the CLI tests share: running `hanse` against a server with a
//! token, bootstrapping a server they started, and bounded waits.
#![allow(dead_code)] // each test file uses its own part

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cluster_core::server::client::Client;
use serde_json::Value;

/// The management secret every cluster a test starts is bootstrapped with.
pub const TOKEN: &str = "hanse-test-management-0000";

/// The CA each test server's API certificate comes from, by address.
static CAS: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Says which CA signed the servers at `address` (one or several,
/// comma-separated): [`hanse`] and [`bootstrap`] then verify their HTTPS.
pub fn trust(address: &str, ca: &Path) {
    let mut cas = CAS.lock().unwrap();
    let cas = cas.get_or_insert_with(HashMap::new);
    for a in address.split(',') {
        cas.insert(a.to_string(), ca.to_path_buf());
    }
}

fn ca_of(address: &str) -> Option<PathBuf> {
    CAS.lock().unwrap().as_ref()?.get(address.split(',').next()?).cloned()
}

/// Runs `hanse ARGS` against `address` with [`TOKEN`] (and the CA given
/// to [`trust`]).
pub fn hanse(address: &str, args: &[&str]) -> Output {
    hanse_as(address, Some(TOKEN), args)
}

/// Runs `hanse ARGS` against `address` with `token` (or none).
pub fn hanse_as(address: &str, token: Option<&str>, args: &[&str]) -> Output {
    hanse_with(address, token, ca_of(address).as_deref(), args)
}

/// Runs `hanse ARGS` against `address` with `token` and `ca` (or none).
pub fn hanse_with(address: &str, token: Option<&str>, ca: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hanse"));
    c.env("HANSE_ADDR", address).env_remove("HANSE_TOKEN").env_remove("HANSE_CACERT").args(args);
    if let Some(t) = token {
        c.env("HANSE_TOKEN", t);
    }
    if let Some(ca) = ca {
        c.env("HANSE_CACERT", ca);
    }
    c.output().expect("run hanse")
}

/// A client of `address` with [`TOKEN`] and the CA given to [`trust`].
pub fn client(address: &str) -> Client {
    let c = Client::new(address).with_token(Some(TOKEN));
    match ca_of(address) {
        Some(ca) => c.with_ca(&std::fs::read_to_string(ca).expect("the CA file")).expect("a CA"),
        None => c,
    }
}

/// stdout and stderr, for messages.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The JSON a successful `--json` command printed.
pub fn json(o: &Output) -> Value {
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
    serde_json::from_slice(&o.stdout).expect("--json prints JSON")
}

/// Waits until `check` holds, failing the test after `limit`.
pub fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the cluster at `address` to have a leader, and bootstraps
/// its ACLs with [`TOKEN`] (a cluster bootstrapped already is fine).
pub fn bootstrap(address: &str, limit: Duration) {
    let c = client(address).with_token(None);
    eventually(limit, &format!("{address} elects a leader and is bootstrapped"), || {
        let led = c.health().is_ok_and(|h| !h["leader"].is_null());
        led && match c.bootstrap(Some(TOKEN)) {
            Ok(_) => true,
            Err(e) => e.to_string().contains("bootstrapped already"),
        }
    });
}

/// A process killed (SIGKILL) when the test ends, with its process group:
/// a wrapper such as `faketime` forks the program it runs, which must not
/// outlive the test either.
pub struct Bg(pub Child);

impl Bg {
    pub fn kill9(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on the process group this test started
            // (`spawn_command` makes the child lead its own).
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        // What a `faketime` wrapper killed so could not remove (names by
        // its pid; nothing when the child was no wrapper).
        let _ = std::fs::remove_file(format!("/dev/shm/faketime_shm_{}", self.pid()));
        let _ = std::fs::remove_file(format!("/dev/shm/sem.faketime_sem_{}", self.pid()));
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, SIGTERM...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), signal) };
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL too.
        self.kill9();
    }
}

/// Starts `hanse ARGS` in `dir`, its output appended to `NAME.log`.
pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Bg {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hanse"));
    command.args(args);
    spawn_command(dir, name, command)
}

/// Starts `command` in `dir`, its output appended to `NAME.log`.
pub fn spawn_command(dir: &Path, name: &str, mut command: Command) -> Bg {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).unwrap();
    use std::os::unix::process::CommandExt;
    Bg(command
        .process_group(0)
        .current_dir(dir)
        .env("RUST_LOG", "cluster_core::agent=info,warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("start hanse"))
}
