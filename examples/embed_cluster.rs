//! Embedding a cluster: three Raft servers in this process (real QUIC with
//! mutual TLS, redb logs, an HTTP API each), 50 simulated nodes, and a job
//! submitted through the same API the CLI uses.
//!
//! `cargo run --example embed_cluster`

use std::time::Duration;

use cluster_core::diag::SourceFile;
use cluster_core::server::ServerOptions;
use cluster_core::server::local::LocalCluster;
use cluster_core::spec::parse_fleet;

const FLEET: &str = include_str!("fleets/eu-west.toml");
const JOB: &str = include_str!("jobs/web.toml");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("hanse-embed-{}", std::process::id()));
    let options = ServerOptions::new("embedded", "s");
    let cluster = LocalCluster::start("embedded", &dir, 3, options, Duration::from_millis(100)).await?;
    let leader = cluster.leader(Duration::from_secs(10)).await.expect("a leader within 10 s");
    println!("3 servers up, s{leader} leads; APIs on {}", cluster.addresses());

    let mut nodes = parse_fleet(&SourceFile::new("fleets/eu-west.toml", FLEET)).value.expect("a valid fleet").nodes;
    nodes.truncate(50);
    let inner = cluster.server(1).expect("server 1 runs").inner.clone();
    let simulated = tokio::spawn(cluster_core::server::sim::run(inner, nodes));

    let client = cluster.client();
    let status = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        while client.nodes().map_or(0, |n| n.len()) < 50 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let job = client.submit(JOB, "jobs/web.toml")?;
        client.eval(job.eval, Duration::from_secs(10))?;
        Ok(client.job(&job.job)?)
    })
    .await??;
    println!("job {}: {} allocations", status.summary.id, status.allocations.len());
    for a in &status.allocations {
        println!("  {} {}.{}[{}] on {} ({})", a.name, a.job, a.group, a.index, a.node, a.status);
    }
    simulated.abort();
    cluster.stop().await;
    Ok(())
}
