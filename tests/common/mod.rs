//! Helpers the CLI tests share: running `hanse` against a server with a
//! token, bootstrapping a server they started, and bounded waits.
#![allow(dead_code)] // each test file uses its own part

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cluster_core::server::client::Client;
use serde_json::Value;

/// The management secret every cluster a test starts is bootstrapped with.
pub const TOKEN: &str = "hanse-test-management-0000";

/// Runs `hanse ARGS` against `address` with [`TOKEN`].
pub fn hanse(address: &str, args: &[&str]) -> Output {
    hanse_as(address, Some(TOKEN), args)
}

/// Runs `hanse ARGS` against `address` with `token` (or none).
pub fn hanse_as(address: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hanse"));
    c.env("HANSE_ADDR", address).env_remove("HANSE_TOKEN").args(args);
    if let Some(t) = token {
        c.env("HANSE_TOKEN", t);
    }
    c.output().expect("run hanse")
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
    let c = Client::new(address);
    eventually(limit, &format!("{address} elects a leader and is bootstrapped"), || {
        let led = c.health().is_ok_and(|h| !h["leader"].is_null());
        led && match c.bootstrap(Some(TOKEN)) {
            Ok(_) => true,
            Err(e) => e.to_string().contains("bootstrapped already"),
        }
    });
}
