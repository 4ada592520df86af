//! `cargo bench --bench c1m`: a million allocations on one machine. A
//! 3-server cluster in this process (QUIC with mutual TLS over loopback,
//! redb logs with fsync, HTTP APIs), 10,000 simulated nodes registered and
//! heartbeating through the API, and batch jobs totalling 1,000,000
//! allocations submitted by 8 HTTP clients. The nodes are simulated: they
//! heartbeat but run nothing, and the bench reports every allocation
//! complete through the API, as agents would.
//!
//! In order: placement (timed until every evaluation closed); a fourth
//! server joins with an empty disk and catches up by snapshot while the
//! million allocations are live (the harder case: after collection there
//! is little to send); a backup is saved and restored; all work
//! completes; `PUT /v1/system/gc` collects.
//! Ends with `name: value` lines. Nomad's C1M ran 1,000,000 containers on
//! 5,000 real hosts; this runs no containers.
//!
//! What the figures are: `allocs_per_sec` is allocations over the time
//! from the first submission until every evaluation closed;
//! `eval_latency_p99_ms` runs from a job's submission to its evaluation
//! closing, with all jobs submitted at once (so it includes the wait
//! behind the backlog); `bytes_per_alloc_per_replica` is the growth of the
//! process's resident memory while placing, over allocations times 3
//! replicas (state, logs cached by redb, buffers: all of it);
//! `snapshot_bytes` is the archive of the placed state, as a Raft snapshot
//! writes it; `snapshot_install_s` runs from adding the fourth server to
//! it having applied what the leader had committed, by snapshot;
//! `backup_s` and `restore_s` time `hanse operator snapshot save` of the
//! million and its restore through the log, until every server applied
//! it; `gc_s` is the time of `PUT /v1/system/gc`. `peak_rss_mb` is the
//! process's peak before the restore (placing, a server joining);
//! `peak_rss_mb_with_restore` is the peak of the whole run, the restore
//! (which holds the old and the new state on all four replicas at once)
//! and the collection after it included.
//!
//! `HANSE_C1M_JOBS` scales the run (1,000 jobs of 1,000 by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster_core::server::ServerOptions;
use cluster_core::server::api::AllocUpdate;
use cluster_core::server::local::LocalCluster;

mod common;
use common::{heartbeat_until, peak_rss_mb, percentile, rss_mb, sim_nodes, submit_and_wait};

const NODES: usize = 10_000;
const INSTANCES_PER_JOB: usize = 1_000;
const CLIENTS: usize = 8;

fn spec(name: &str) -> String {
    format!(
        r#"
[job]
name = "{name}"
type = "batch"

[[group]]
name = "work"
count = {INSTANCES_PER_JOB}

[[group.task]]
name = "main"
driver = "mock"
resources = {{ cpu = "50m", memory = "32MiB" }}
"#
    )
}

/// Counts the bytes written to it, keeping none.
struct Counted(u64);

impl std::io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() {
    let jobs: usize = std::env::var("HANSE_C1M_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(1_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = std::env::temp_dir().join(format!("hanse-c1m-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let nodes = sim_nodes(NODES);
    let options = ServerOptions { gc_interval: None, ..ServerOptions::new("c1m", "s") };
    let mut cluster = rt
        .block_on(LocalCluster::start("c1m", &dir, 3, options, Duration::from_millis(100)))
        .expect("the cluster starts");
    let leader = rt.block_on(cluster.leader(Duration::from_secs(10))).expect("a leader");
    let client = cluster.client();
    let mut figures: Vec<(&str, String)> = Vec::new();

    for chunk in nodes.chunks(500) {
        client.register_nodes(chunk).expect("nodes register");
    }
    // Heartbeats for all nodes, every 3 s (the TTL is 10 s), until the end.
    let done = Arc::new(AtomicBool::new(false));
    let beats = heartbeat_until(&client, &nodes, &done);
    let rss_before = rss_mb();

    let start = Instant::now();
    let (latencies, _) = submit_and_wait(&client, jobs, CLIENTS, |j| spec(&format!("job-{j:04}")));
    let total = start.elapsed().as_secs_f64();
    let want = jobs * INSTANCES_PER_JOB;
    let leader_raft = cluster.server(leader).unwrap().raft().clone();
    let live = leader_raft.read(|s| s.allocs().filter(|a| a.is_live()).count());
    println!("{live} allocations placed in {total:.1} s");
    assert_eq!(live, want, "every allocation placed");
    // Every replica holds them before memory is read.
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.running().any(|id| cluster.server(id).unwrap().raft().read(|s| s.allocs().count()) < want) {
        assert!(Instant::now() < deadline, "the followers did not catch up in 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_placed = rss_mb();
    figures.push(("allocs_total", want.to_string()));
    figures.push(("allocs_per_sec", format!("{:.0}", want as f64 / total)));
    figures.push(("eval_latency_p99_ms", format!("{:.0}", percentile(&latencies, 0.99))));
    figures.push((
        "bytes_per_alloc_per_replica",
        format!("{:.0}", (rss_placed - rss_before) * 1024.0 * 1024.0 / (want as f64 * 3.0)),
    ));
    let snapshot_bytes = leader_raft.read(|s| {
        let mut sink = Counted(0);
        cluster_core::state::archive::write(s, String::new(), 0, 0, Vec::new(), 0, &mut sink)
            .expect("counting never fails");
        sink.0
    });
    figures.push(("snapshot_bytes", snapshot_bytes.to_string()));

    // A fourth server with an empty disk: caught up once it applied what
    // the leader had committed when it joined.
    let joined = Instant::now();
    let target = leader_raft.status().commit;
    let new = rt.block_on(cluster.join_server()).expect("a fourth server joins");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let st = cluster.server(new).unwrap().raft().status();
        if st.applied >= target && st.snapshots_installed >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the new server did not catch up in 300 s: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let install = joined.elapsed().as_secs_f64();
    let held = cluster.server(new).unwrap().raft().read(|s| s.allocs().count());
    assert!(held >= want, "the new server holds {held} of {want}");
    println!("server {new} joined and caught up by snapshot in {install:.1} s");
    figures.push(("snapshot_install_s", format!("{install:.1}")));

    // The issue's flow (placement, a server joining, collection) peaks
    // before the restore: a restore holds the old and the new state on
    // every replica at once, so its peak is reported on its own.
    let peak_before_restore = peak_rss_mb();
    // A backup of the million, and a restore of it through the log: timed
    // until every server applied it.
    let t = Instant::now();
    let saved = client.get_bytes("/v1/operator/snapshot", 1 << 30).expect("saved");
    figures.push(("backup_s", format!("{:.2}", t.elapsed().as_secs_f64())));
    figures.push(("backup_bytes", saved.len().to_string()));
    let t = Instant::now();
    let report: cluster_core::server::http::RestoreReport =
        client.put_bytes("/v1/operator/snapshot", &saved).expect("restored");
    assert_eq!(report.restored.allocations as usize, want);
    let target = leader_raft.status().commit;
    while cluster.running().any(|id| cluster.server(id).unwrap().raft().status().applied < target) {
        assert!(t.elapsed() < Duration::from_secs(300), "the servers did not apply the restore in 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    figures.push(("restore_s", format!("{:.2}", t.elapsed().as_secs_f64())));

    // All work completes, reported as agents would, then collection.
    let ids: Vec<u64> = leader_raft.read(|s| s.allocs().map(|a| a.id.0).collect());
    let reporters: Vec<_> = ids
        .chunks(ids.len().div_ceil(CLIENTS).max(1))
        .map(|part| {
            let (client, part) = (client.clone(), part.to_vec());
            std::thread::spawn(move || {
                for batch in part.chunks(cluster_core::command::ALLOC_STATUS_BATCH_MAX) {
                    let updates = batch.iter().map(|id| AllocUpdate { id: *id, status: "complete".into() }).collect();
                    client.alloc_status(updates).expect("reported");
                }
            })
        })
        .collect();
    for r in reporters {
        r.join().unwrap();
    }
    let gc = Instant::now();
    let counts: cluster_core::state::GcCounts = client.put("/v1/system/gc", &serde_json::json!({})).expect("collected");
    let gc_s = gc.elapsed().as_secs_f64();
    let after = leader_raft.read(|s| s.allocs().count());
    figures.push(("gc_allocs_collected", counts.allocs.to_string()));
    figures.push(("gc_s", format!("{gc_s:.2}")));
    figures.push(("state_allocs_after_gc", after.to_string()));
    figures.push(("peak_rss_mb", format!("{peak_before_restore:.0}")));
    figures.push(("peak_rss_mb_with_restore", format!("{:.0}", peak_rss_mb())));
    done.store(true, Ordering::Relaxed);
    beats.join().unwrap();
    rt.block_on(cluster.stop());
    let _ = std::fs::remove_dir_all(&dir);
    for (k, v) in figures {
        println!("{k}: {v}");
    }
}
