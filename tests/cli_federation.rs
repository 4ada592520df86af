//! `hanse federation keygen` and `members` against gossip members running
//! in this test process on loopback.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gossip::net::UdpNet;
use gossip::transport::unix_ms;
use gossip::{ClusterSummary, Key, Keyring, Member, MemberConfig};

fn hanse(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hanse")).args(args).output().expect("run hanse")
}

/// Runs hanse off the async runtime, so the in-process members keep gossiping.
async fn hanse_async(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hanse")).args(&args).output().expect("run hanse")
    })
    .await
    .unwrap()
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hanse-cli-fed-{}-{name}", std::process::id()))
}

#[test]
fn keygen_prints_a_key_or_writes_a_private_file() {
    let out = hanse(&["federation", "keygen"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(Key::from_text(text.trim()).is_ok(), "{text}");

    let path = temp_path("keygen.key");
    let _ = std::fs::remove_file(&path);
    let out = hanse(&["federation", "keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(Key::from_text(written.trim()).is_ok());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let again = hanse(&["federation", "keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "an existing key file is never overwritten");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written);
    std::fs::remove_file(&path).unwrap();
}

fn summary(cluster: &str) -> ClusterSummary {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fleets/eu-west.toml")).unwrap();
    let nodes = cluster_core::spec::parse_fleet(&cluster_core::diag::SourceFile::new("f", text)).value.unwrap().nodes;
    let state = cluster_core::state::ClusterState::with_nodes(nodes).unwrap();
    ClusterSummary::build(cluster, "eu-west-1", 3, unix_ms(), &["eu".to_string()], &state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_lists_the_clusters_gossip_knows() {
    let key = Key::generate();
    let ring = Keyring::new(key.clone());
    let mut members = Vec::new();
    let mut seed = None;
    for name in ["eu-west", "us-east", "edge-1"] {
        let mut c = MemberConfig::new("cli-test", name, "server-1", "127.0.0.1:0".parse().unwrap());
        c.region = format!("{name}-region");
        c.seeds = seed.iter().map(|s: &std::net::SocketAddr| s.to_string()).collect();
        let m = Member::start(c, ring.clone(), Arc::new(UdpNet)).await.unwrap();
        seed.get_or_insert(m.local_addr());
        members.push(m);
    }
    members[0].publish_summary(summary("eu-west"), unix_ms()).await.unwrap();
    for _ in 0..200 {
        if members.iter().all(|m| m.view().alive().count() == 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key_file = temp_path("members.key");
    std::fs::write(&key_file, format!("# the federation key\n{}\n", key.to_text())).unwrap();
    let seed = seed.unwrap().to_string();
    let args = [
        "federation",
        "members",
        "--seed",
        &seed,
        "--key-file",
        key_file.to_str().unwrap(),
        "--federation",
        "cli-test",
        "--wait",
        "10",
        "--json",
    ];
    let out = hanse_async(&args).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["cluster"].as_str().unwrap()).collect();
    assert_eq!(names, ["edge-1", "eu-west", "us-east"], "the CLI observer is not listed");
    assert!(rows.iter().all(|r| r["status"] == "alive"), "{rows:?}");
    let eu = &rows[1];
    assert_eq!(eu["region"], "eu-west-region");
    assert_eq!(eu["leader"], "server-1");
    assert!(eu["free_cpu_millis"].as_u64().unwrap() > 0);
    assert_eq!(eu["free_gpus"], 176);
    assert!(rows[0]["summary"].is_null(), "edge-1 published no summary");

    // The table for people names the same clusters.
    let args = [
        "federation",
        "members",
        "--seed",
        &seed,
        "--key-file",
        key_file.to_str().unwrap(),
        "--federation",
        "cli-test",
    ];
    let out = hanse_async(&args).await;
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("eu-west") && table.contains("alive") && table.contains("176"), "{table}");

    // With the wrong key nobody answers, and the error says what to check.
    let wrong = temp_path("wrong.key");
    std::fs::write(&wrong, Key::generate().to_text()).unwrap();
    let args = [
        "federation",
        "members",
        "--seed",
        &seed,
        "--key-file",
        wrong.to_str().unwrap(),
        "--federation",
        "cli-test",
        "--wait",
        "2",
    ];
    let out = hanse_async(&args).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no cluster answered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [&key_file, &wrong] {
        std::fs::remove_file(p).unwrap();
    }
    for m in members {
        m.shutdown().await.unwrap();
    }
}
