//! Three clusters gossiping on this machine, each publishing a capacity
//! summary of the example fleet; a place to try `hanse federation members`.
//!
//! ```sh
//! cargo run --release --example gossip_federation
//! # then, in another terminal, the command it prints
//! ```

use std::sync::Arc;
use std::time::Duration;

use cluster_core::spec::{load, parse_fleet};
use cluster_core::state::ClusterState;
use gossip::net::UdpNet;
use gossip::transport::unix_ms;
use gossip::{ClusterSummary, Key, Keyring, Member, MemberConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let fleet = load(std::path::Path::new("examples/fleets/eu-west.toml"), parse_fleet)?;
    let state = ClusterState::with_nodes(fleet.nodes)?;
    let key = Key::generate();
    let key_file = std::env::temp_dir().join(format!("hanse-example-{}.key", std::process::id()));
    std::fs::write(&key_file, format!("{}\n", key.to_text()))?;

    let clusters = [
        ("eu-west", "eu-west-1", 7946, "eu"),
        ("us-east", "us-east-1", 7947, "us"),
        ("edge-1", "eu-west-1", 7948, "eu"),
    ];
    let mut members = Vec::new();
    for (i, (name, region, port, jurisdiction)) in clusters.into_iter().enumerate() {
        let mut c = MemberConfig::new("hanse", name, "server-1", format!("127.0.0.1:{port}").parse()?);
        c.region = region.into();
        if i > 0 {
            c.seeds = vec!["127.0.0.1:7946".into()];
        }
        let m = Member::start(c, Keyring::new(key.clone()), Arc::new(UdpNet)).await?;
        let summary = ClusterSummary::build(name, region, 1, unix_ms(), &[jurisdiction.to_string()], &state);
        m.publish_summary(summary, unix_ms()).await?;
        members.push(m);
    }
    println!("three clusters gossiping on 127.0.0.1:7946-7948; in another terminal:\n");
    println!("  cargo run --release -- federation members --seed 127.0.0.1:7946 --key-file {}\n", key_file.display());
    println!("Ctrl-C to stop.");
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(10), Duration::from_secs(10));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                let alive = members[0].view().alive().count();
                println!("eu-west sees {alive} live clusters");
            }
        }
    }
    for m in members {
        m.shutdown().await.ok();
    }
    std::fs::remove_file(&key_file).ok();
    Ok(())
}
