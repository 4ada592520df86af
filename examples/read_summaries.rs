//! Reading federation summaries: two gossip members on loopback (an
//! eu-west server and an observer), the server publishing the capacity
//! summary of the example fleet; the observer reads it from its view of
//! the federation, as peer selection does.
//!
//! `cargo run --example read_summaries`

use std::sync::Arc;
use std::time::Duration;

use cluster_core::diag::SourceFile;
use cluster_core::resources::{fmt_bytes, fmt_cpu};
use cluster_core::spec::parse_fleet;
use cluster_core::state::ClusterState;
use gossip::net::UdpNet;
use gossip::transport::unix_ms;
use gossip::{ClusterSummary, Key, Keyring, Member, MemberConfig, Role};

const FLEET: &str = include_str!("fleets/eu-west.toml");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keyring = Keyring::new(Key::generate());
    let server = Member::start(
        MemberConfig::new("example", "eu-west", "s1", "127.0.0.1:0".parse()?),
        keyring.clone(),
        Arc::new(UdpNet),
    )
    .await?;
    let mut config = MemberConfig::new("example", "cli", "observer", "127.0.0.1:0".parse()?);
    config.role = Role::Observer;
    config.seeds = vec![server.local_addr().to_string()];
    let observer = Member::start(config, keyring, Arc::new(UdpNet)).await?;

    let fleet = parse_fleet(&SourceFile::new("fleets/eu-west.toml", FLEET)).value.expect("a valid fleet");
    let state = ClusterState::with_nodes(fleet.nodes)?;
    let summary = ClusterSummary::build("eu-west", "eu-west-1", 1, unix_ms(), &["eu".into()], &state);
    println!("eu-west publishes {} bytes of summary", summary.encode()?.len());
    server.publish_summary(summary, unix_ms()).await?;

    let mut view = observer.watch();
    let entry = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(e) = view.borrow_and_update().cluster("eu-west").filter(|e| e.summary.is_some()) {
                return e.clone();
            }
            view.changed().await.expect("the observer runs");
        }
    })
    .await?;
    let s = entry.summary.as_ref().expect("filtered");
    println!("the observer sees eu-west {:?}: {} nodes ready", entry.liveness, s.nodes_ready);
    println!(
        "  free {} cores, {} memory, {} GPUs",
        fmt_cpu(s.free().cpu_millis),
        fmt_bytes(s.free().memory_bytes),
        s.free_gpus()
    );
    println!("  instances of 2 cores / 4 GiB that single nodes can still take: {}", s.placeable(2_000, 4 << 30));
    observer.shutdown().await?;
    server.shutdown().await?;
    Ok(())
}
