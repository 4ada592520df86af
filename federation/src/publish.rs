//! A server's part in the federation's gossip: while it leads its
//! cluster, it publishes the cluster's capacity summary (at most once a
//! second, and only on a change worth telling); when it stops leading, it
//! withdraws its summary, and peers keep the last one until a newer one
//! supersedes it. Every server gossips its Raft term.
//!
//! Summaries are ordered by (incarnation, term, version) (see
//! [`ClusterSummary::supersedes`]). The incarnation is a record in the
//! cluster's log ([`INCARNATION_RECORD`]), so every leader of the cluster
//! publishes with it. The first leader of a cluster's life sets it to the
//! time in unix milliseconds, read once (a cluster rebuilt on empty disks,
//! counting terms from 1 again, so starts above its old life), or above
//! what the federation shows for the cluster if that is higher. A leader
//! shown a summary of its cluster that beats its own, from a publisher
//! that is gone, raises it above that summary's (as SWIM's members refute
//! a rumour with a higher incarnation); so no clock is trusted to be right.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_core::server::Inner;
use cluster_core::server::rpc::Write;
use gossip::Member;
use gossip::summary::ClusterSummary;
use gossip::transport::unix_ms;
use gossip::view::ClusterEntry;

/// How often the leader rebuilds its summary; the publisher decides
/// whether it is worth sending.
pub const SUMMARY_INTERVAL: Duration = Duration::from_millis(500);
/// How often, at most, a leader logs that a live server of its cluster's
/// name publishes summaries that beat its own.
pub const RIVAL_LOG_EVERY: Duration = Duration::from_secs(30);

/// What a cluster says about itself beyond its state.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub region: String,
    pub jurisdictions: Vec<String>,
}

/// What the leader does about the summary its cluster is shown with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incarnation {
    /// Ours wins or is what is shown: publish with the incarnation we have.
    Keep,
    /// Publish with this incarnation from now on.
    Take(u64),
    /// A live server under our cluster's name publishes summaries that win
    /// over ours: not ours to override (a leader of a later term of our
    /// own cluster, soon heard from; or a second cluster with our name).
    Rival { server: String },
}

/// Decides the incarnation for a leader of term `term` holding
/// `incarnation`, whose own gossip member is (`server`, `generation`),
/// from how the federation shows its cluster (`shown`). Pure.
pub fn incarnation(
    shown: Option<&ClusterEntry>,
    server: &str,
    generation: u64,
    incarnation: u64,
    term: u64,
) -> Incarnation {
    let Some(entry) = shown else { return Incarnation::Keep };
    let Some(best) = &entry.summary else { return Incarnation::Keep };
    let ours = entry.leader.as_deref() == Some(server) && entry.leader_generation == generation;
    // One leader per term: a summary of our incarnation and term that is
    // not ours comes from another life of the cluster (rebuilt, counting
    // terms from 1 again) or another cluster under its name.
    if ours || (best.incarnation, best.term) < (incarnation, term) {
        return Incarnation::Keep;
    }
    if best.term < term {
        // An earlier leader's, of this life of the cluster or not: our
        // term wins within its incarnation.
        Incarnation::Take(best.incarnation)
    } else if let Some(next) = best.incarnation.checked_add(1).filter(|_| !entry.publisher_present()) {
        Incarnation::Take(next)
    } else {
        Incarnation::Rival { server: entry.leader.clone().unwrap_or_default() }
    }
}

/// The record under which a cluster's log holds its gossip incarnation
/// (a decimal number).
pub const INCARNATION_RECORD: &str = "gossip/incarnation";

/// The incarnation the cluster's log holds, if any.
fn stored_incarnation(server: &Inner) -> Option<u64> {
    server.raft.read(|s| s.record(INCARNATION_RECORD).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()))
}

/// Commits `next` as the incarnation if the log still holds `expect`;
/// says whether it did (a lost race or a lost leadership is retried on
/// the next tick).
async fn store_incarnation(server: &Inner, expect: Option<u64>, next: u64) -> bool {
    let swap = Write::Swap {
        holder: INCARNATION_RECORD.into(),
        expect: expect.map(|i| i.to_string().into_bytes()),
        record: next.to_string().into_bytes(),
    };
    match server.write(swap).await {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "cannot commit the gossip incarnation yet");
            false
        }
    }
}

/// Runs until the task is aborted.
pub async fn publish(server: Arc<Inner>, member: Arc<Member>, me: Identity) {
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut leading, mut term) = (false, 0);
    let mut folded_warned = false;
    let mut rival_logged: Option<Instant> = None;
    let (cluster, name, generation) =
        (member.config().cluster.clone(), member.config().server.clone(), member.config().generation);
    loop {
        tick.tick().await;
        let status = server.raft.status();
        if status.term != term {
            term = status.term;
            member.set_raft_term(term).await;
        }
        let now = status.leader == Some(server.id);
        if now {
            let stored = stored_incarnation(&server);
            let mut current = stored.unwrap_or(0);
            let view = member.view();
            let wanted = match incarnation(view.cluster(&cluster), &name, generation, current, term) {
                Incarnation::Take(i) if i > current => Some(i),
                Incarnation::Rival { server } => {
                    if rival_logged.is_none_or(|t| t.elapsed() >= RIVAL_LOG_EVERY) {
                        tracing::warn!(
                            server = ?server,
                            term,
                            "a live server {server:?} publishes summaries for this cluster's name that win over \
                             this leader's; if it is not a server of this cluster, two clusters share the name \
                             `{cluster}`"
                        );
                        rival_logged = Some(Instant::now());
                    }
                    None
                }
                _ => None,
            };
            // A cluster's first life starts at the time; a shown summary
            // of an older life raises it.
            let next = match (stored, wanted) {
                (None, w) => Some(w.unwrap_or(0).max(unix_ms())),
                (Some(_), w) => w,
            };
            if let Some(next) = next {
                if store_incarnation(&server, stored, next).await {
                    tracing::info!(incarnation = next, term, "this cluster gossips as incarnation {next}");
                    current = next;
                } else {
                    leading = now;
                    continue;
                }
            }
            let mut summary = server.raft.read(|s| {
                let mut summary =
                    ClusterSummary::build(&server.options.cluster, &me.region, term, unix_ms(), &me.jurisdictions, s);
                let total = crate::node::total_cpu(s);
                summary.inbound_share =
                    if total == 0 { 0.0 } else { crate::node::inbound_cpu(s) as f64 / total as f64 };
                summary
            });
            summary.incarnation = current;
            if summary.folded.any() && !folded_warned {
                tracing::warn!(
                    folded = %summary.folded,
                    "the fleet's detail does not fit a {}-byte summary: totals stay exact, peers see that detail \
                     was folded and may offer work a folded class or GPU model could take",
                    gossip::summary::SUMMARY_BYTES_MAX
                );
                folded_warned = true;
            }
            if let Err(e) = member.publish_summary(summary, unix_ms()).await {
                tracing::warn!(error = %e, "cannot publish the cluster's summary");
            }
        } else if leading {
            member.withdraw_summary().await;
        }
        leading = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gossip::view::{FederationView, MemberState, keys};

    fn shown(summary: &ClusterSummary, generation: u64, live: bool) -> FederationView {
        let text = summary.encode().unwrap();
        let mut v = FederationView::new(1_000);
        let m = MemberState {
            node_id: "a/s1",
            generation,
            addr: "127.0.0.1:1".parse().unwrap(),
            live,
            heartbeat: 1,
            values: vec![(keys::CLUSTER, "a"), (keys::SERVER, "s1")],
            version: None,
            summary: Some((1, &text)),
        };
        v.update(&[m], 0);
        v
    }

    fn summary(incarnation: u64, term: u64) -> ClusterSummary {
        ClusterSummary { cluster: "a".into(), incarnation, term, version: 4, ..Default::default() }
    }

    #[test]
    fn a_rebuilt_cluster_takes_the_next_incarnation_once() {
        let old = shown(&summary(0, 7), 1, false);
        assert_eq!(incarnation(old.cluster("a"), "s1", 2, 0, 1), Incarnation::Take(1));
        assert_eq!(incarnation(old.cluster("a"), "s1", 2, 1, 1), Incarnation::Keep, "ours wins now");
        let same_term = shown(&summary(0, 2), 1, false);
        assert_eq!(
            incarnation(same_term.cluster("a"), "s1", 2, 0, 2),
            Incarnation::Take(1),
            "the old life reached the same term: not ours, so ours must win by incarnation"
        );
    }

    #[test]
    fn a_new_leader_adopts_the_incarnation_of_an_earlier_term() {
        let earlier = shown(&summary(3, 2), 1, true);
        assert_eq!(incarnation(earlier.cluster("a"), "s2", 5, 0, 4), Incarnation::Take(3));
        assert_eq!(incarnation(earlier.cluster("a"), "s1", 1, 3, 2), Incarnation::Keep, "its own summary");
    }

    #[test]
    fn a_live_publisher_of_a_later_term_is_a_rival_not_overridden() {
        let later = shown(&summary(0, 9), 1, true);
        assert_eq!(incarnation(later.cluster("a"), "s2", 5, 0, 4), Incarnation::Rival { server: "s1".into() });
        assert_eq!(incarnation(None, "s2", 5, 0, 4), Incarnation::Keep);
    }
}
