//! `hanse node simulate`: registers a fleet file's nodes with a running
//! cluster and keeps them alive, standing in for their agents: heartbeats
//! within the TTL, allocations reported running when placed and complete
//! when stopped (a mock driver). For demos, tests and benchmarks.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use cluster_core::server::api::AllocUpdate;
use cluster_core::server::client::Client;
use cluster_core::spec::parse_fleet;

use crate::Outcome;

/// Nodes per registration request.
const REGISTER_BATCH: usize = 500;

pub fn simulate(c: &Client, fleet: &Path, count: Option<usize>) -> anyhow::Result<Outcome> {
    let fleet = crate::output::load(fleet, parse_fleet)?;
    let mut nodes = fleet.nodes;
    if let Some(n) = count {
        nodes.truncate(n);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
    let mut ttl = Duration::from_secs(10);
    for chunk in nodes.chunks(REGISTER_BATCH) {
        let r = c.register_nodes(chunk).map_err(|e| anyhow::anyhow!("{e}")).context("registering nodes")?;
        ttl = Duration::from_millis(r.ttl_ms);
    }
    println!(
        "registered {} nodes of fleet {} with {}; heartbeating every {:?}",
        ids.len(),
        fleet.name,
        c.address(),
        ttl / 3
    );
    let mine: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc_flag(move || stop.store(true, std::sync::atomic::Ordering::SeqCst));
    }
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for chunk in ids.chunks(5_000) {
            match c.heartbeat(chunk) {
                Ok(r) if !r.unknown.is_empty() => eprintln!("the cluster forgot {} nodes", r.unknown.len()),
                Ok(r) => ttl = Duration::from_millis(r.ttl_ms),
                Err(e) => eprintln!("heartbeat failed: {e}"),
            }
        }
        if let Ok(allocs) = c.get_all::<cluster_core::server::api::AllocView>("/v1/allocations?stale=true") {
            let updates: Vec<AllocUpdate> = allocs
                .iter()
                .filter(|a| mine.contains(a.node.as_str()))
                .filter_map(|a| match (a.desired.as_str(), a.status.as_str()) {
                    ("run", "pending") => Some(AllocUpdate { id: a.id, status: "running".into() }),
                    ("stop", "pending" | "running") => Some(AllocUpdate { id: a.id, status: "complete".into() }),
                    _ => None,
                })
                .collect();
            for chunk in updates.chunks(4_096) {
                if let Err(e) = c.alloc_status(chunk.to_vec()) {
                    eprintln!("reporting allocations failed: {e}");
                }
            }
        }
        std::thread::sleep((ttl / 3).max(Duration::from_millis(100)));
    }
    Ok(Outcome::Ok)
}

/// Calls `f` on Ctrl-C or SIGTERM, from a small runtime of its own.
fn ctrlc_flag(f: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        });
        f();
    });
    Ok(())
}
