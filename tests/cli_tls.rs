//! `hanse tls ca create` and `hanse tls cert create` write files that carry
//! a real mutual-TLS call, and refuse what they should.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use async_trait::async_trait;
use cluster_core::transport::quic::{QuicClient, QuicServer};
use cluster_core::transport::tls::{Identity, Role, read_pair};
use cluster_core::transport::{Handler, Rpc, Transport};
use serde::{Deserialize, Serialize};

fn hanse(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hanse")).args(args).output().expect("run hanse")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("hanse-cli-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    fn s(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Serialize, Deserialize)]
struct WhoAmI;

impl Rpc for WhoAmI {
    type Reply = Identity;
    fn allowed(&self) -> &'static [Role] {
        &[Role::Agent, Role::Server]
    }
}

struct Echo;

#[async_trait]
impl Handler<WhoAmI> for Echo {
    async fn handle(&self, from: Identity, _: WhoAmI) -> Identity {
        from
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_cli_carry_a_mutual_tls_call() {
    let dir = TempDir::new("pki");
    let ok = |out: std::process::Output| {
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    };
    ok(hanse(&["tls", "ca", "create", "--federation", "demo", "--dir", dir.s()]));
    ok(hanse(&[
        "tls",
        "cert",
        "create",
        "--cluster",
        "eu-west",
        "--role",
        "server",
        "--name",
        "s1",
        "--ca-dir",
        dir.s(),
        "--out-dir",
        dir.s(),
    ]));
    ok(hanse(&[
        "tls",
        "cert",
        "create",
        "--cluster",
        "eu-west",
        "--role",
        "agent",
        "--name",
        "n1",
        "--ca-dir",
        dir.s(),
        "--out-dir",
        dir.s(),
    ]));
    let d = &dir.0;
    assert_eq!(mode(&d.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&d.join("eu-west-server-s1-key.pem")), 0o600);
    let ca = std::fs::read_to_string(d.join("ca.pem")).unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "PEM an operator can read with openssl");

    let server_pair = read_pair(&d.join("eu-west-server-s1.pem"), &d.join("eu-west-server-s1-key.pem")).unwrap();
    let agent_pair = read_pair(&d.join("eu-west-agent-n1.pem"), &d.join("eu-west-agent-n1-key.pem")).unwrap();
    let server = QuicServer::bind::<WhoAmI>("127.0.0.1:0".parse().unwrap(), &ca, &server_pair, Arc::new(Echo)).unwrap();
    let client = QuicClient::new(&ca, &agent_pair).unwrap();
    let me = Transport::<WhoAmI>::call(&client, server.local_addr(), WhoAmI).await.unwrap();
    assert_eq!(me, Identity::new("eu-west", Role::Agent, "n1"));

    // Nothing is overwritten; bad names and roles are refused with exit 1.
    let again = hanse(&["tls", "ca", "create", "--dir", dir.s()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    assert_eq!(std::fs::read_to_string(d.join("ca.pem")).unwrap(), ca);
    let bad = hanse(&[
        "tls",
        "cert",
        "create",
        "--cluster",
        "eu west",
        "--role",
        "server",
        "--name",
        "s",
        "--ca-dir",
        dir.s(),
        "--out-dir",
        dir.s(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let bad =
        hanse(&["tls", "cert", "create", "--cluster", "eu", "--role", "admin", "--name", "s", "--ca-dir", dir.s()]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use server or agent"));
    let no_ca = TempDir::new("empty");
    let bad = hanse(&[
        "tls",
        "cert",
        "create",
        "--cluster",
        "eu",
        "--role",
        "agent",
        "--name",
        "s",
        "--ca-dir",
        no_ca.s(),
        "--out-dir",
        no_ca.s(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("hanse tls ca create"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
