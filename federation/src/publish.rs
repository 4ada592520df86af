//! A server's part in the federation's gossip: while it leads its
//! cluster, it publishes the cluster's capacity summary (at most once a
//! second, and only on a change worth telling); when it stops leading, it
//! withdraws its summary, and peers keep the last one until a newer term
//! supersedes it. Every server gossips its Raft term.

use std::sync::Arc;
use std::time::Duration;

use cluster_core::server::Inner;
use gossip::Member;
use gossip::summary::ClusterSummary;
use gossip::transport::unix_ms;

/// How often the leader rebuilds its summary; the publisher decides
/// whether it is worth sending.
pub const SUMMARY_INTERVAL: Duration = Duration::from_millis(500);

/// What a cluster says about itself beyond its state.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub region: String,
    pub jurisdictions: Vec<String>,
}

/// Runs until the task is aborted.
pub async fn publish(server: Arc<Inner>, member: Arc<Member>, me: Identity) {
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut leading, mut term) = (false, 0);
    loop {
        tick.tick().await;
        let status = server.raft.status();
        if status.term != term {
            term = status.term;
            member.set_raft_term(term).await;
        }
        let now = status.leader == Some(server.id);
        if now {
            let summary = server.raft.read(|s| {
                let mut summary =
                    ClusterSummary::build(&server.options.cluster, &me.region, term, unix_ms(), &me.jurisdictions, s);
                let total = crate::node::total_cpu(s);
                summary.inbound_share =
                    if total == 0 { 0.0 } else { crate::node::inbound_cpu(s) as f64 / total as f64 };
                summary
            });
            if let Err(e) = member.publish_summary(summary, unix_ms()).await {
                tracing::warn!(error = %e, "cannot publish the cluster's summary");
            }
        } else if leading {
            member.withdraw_summary().await;
        }
        leading = now;
    }
}
