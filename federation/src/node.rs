//! A server's part in delegation: the target side answers other clusters'
//! offers (checking everything itself, committing through its own Raft log
//! before it answers); the origin side, while the server leads, offers
//! what its cluster cannot place, follows what it delegated, and takes it
//! back when the target is gone. All origin state is in the origin's log
//! (holds and records), so a new leader carries on where the old one was.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cluster_core::command::{Command, Effect};
use cluster_core::ids::JobId;
use cluster_core::model::{DelegateMode, EvalStatus, Job};
use cluster_core::server::Inner;
use cluster_core::server::rpc::{PeerHandler, Write, WriteReply};
use cluster_core::state::ClusterState;
use cluster_core::transport::Identity;
use gossip::{Liveness, Member};

use crate::delegation::{Breaker, Delegation, OfferCheck, Rejection, Report, State, check_offer};
use crate::policy::{Policy, Trigger};
use crate::proto::origin::offered_job;
use crate::protocol::{
    LABEL_DELEGATION, LABEL_EPOCH, LABEL_ORIGIN, Offer, PeerReply, PeerRequest, Record, decode, encode, holder,
    target_job_id,
};
use crate::select::{Overflow, PeerInfo, select};

/// How often the origin looks for work to delegate and follows its
/// delegations.
pub const ROUND: Duration = Duration::from_millis(500);
/// Offers one origin leader has in flight at once.
pub const OFFERS_IN_FLIGHT_MAX: usize = 16;
/// The key of the committed policy among the state's records.
pub const POLICY_RECORD: &str = "federation/policy";
/// How long the origin waits for a status or revocation answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a target waits for its scheduler before answering an offer.
const PLACE_WAIT: Duration = Duration::from_secs(5);

/// Counters for `/metrics` and the CLI.
#[derive(Debug, Default)]
pub struct Counters {
    pub offers: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub revoked: AtomicU64,
    pub inbound_accepted: AtomicU64,
    pub inbound_rejected: AtomicU64,
    /// Refusals by reason, both ways: ("outbound" | "inbound", reason).
    pub rejected_by: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Counters {
    fn refused(&self, way: &'static str, reason: &str) {
        *self.rejected_by.lock().expect("counters lock").entry((way, reason.to_string())).or_default() += 1;
    }
}

pub struct Federation {
    pub server: Arc<Inner>,
    pub member: Arc<Member>,
    pub policy: RwLock<Policy>,
    pub counters: Counters,
    breakers: Mutex<BTreeMap<String, Breaker>>,
    /// Origin, in memory on the leader: when each delegation was last heard
    /// from, and when each target was first seen dead.
    heard: Mutex<BTreeMap<String, u64>>,
    dead_since: Mutex<BTreeMap<String, u64>>,
    /// Overflow no peer took, by job, with each peer's reason: the retry
    /// queue (tried again every round, so as soon as summaries change).
    pub waiting: Mutex<BTreeMap<String, Waiting>>,
    /// Round-trip time to each peer cluster, smoothed, in milliseconds.
    rtt: Mutex<BTreeMap<SocketAddr, f64>>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Waiting {
    pub instances: u32,
    pub refused: Vec<(String, String)>,
}

impl Federation {
    pub fn new(server: Arc<Inner>, member: Arc<Member>, policy: Policy) -> Arc<Federation> {
        Arc::new(Federation {
            server,
            member,
            policy: RwLock::new(policy),
            counters: Counters::default(),
            breakers: Mutex::default(),
            heard: Mutex::default(),
            dead_since: Mutex::default(),
            waiting: Mutex::default(),
            rtt: Mutex::default(),
        })
    }

    /// Wall-clock milliseconds: delegation records carry times that other
    /// leaders (and people) read.
    pub fn now_ms(&self) -> u64 {
        gossip::transport::unix_ms()
    }

    /// The policy in force: the one committed through the cluster's log,
    /// so every server applies the same; until one is, this server's file.
    pub fn policy(&self) -> Policy {
        let committed = self.server.raft.read(|s| {
            s.records(POLICY_RECORD)
                .find(|(k, _)| k.as_str() == POLICY_RECORD)
                .and_then(|(_, v)| decode::<Policy>(v).ok())
        });
        committed.unwrap_or_else(|| self.policy.read().expect("policy lock").clone())
    }

    /// Commits `policy` through the cluster's log (from any server).
    pub async fn commit_policy(&self, policy: Policy) -> Result<(), String> {
        if policy.cluster != self.server.options.cluster {
            return Err(format!(
                "the policy is for cluster {}, this is {}",
                policy.cluster, self.server.options.cluster
            ));
        }
        *self.policy.write().expect("policy lock") = policy.clone();
        let w = Write::Record { holder: POLICY_RECORD.into(), record: encode(&policy) };
        self.server.write(w).await.map(|_| ()).map_err(|e| e.message)
    }

    /// Every delegation record in the state (origin side).
    pub fn records(&self) -> Vec<Record> {
        self.server.raft.read(|s| s.records("delegation/").filter_map(|(_, v)| decode::<Record>(v).ok()).collect())
    }
}

/// The cpu of a job's live allocations that came from other clusters.
pub(crate) fn inbound_cpu(s: &ClusterState) -> u64 {
    let inbound: Vec<&Job> = s.jobs().filter(|j| j.labels.contains_key(LABEL_ORIGIN) && !j.stopped).collect();
    inbound.iter().flat_map(|j| s.allocs_of_job(&j.id)).filter(|a| a.is_live()).map(|a| a.resources.cpu_millis).sum()
}

pub(crate) fn total_cpu(s: &ClusterState) -> u64 {
    s.nodes().iter().filter(|n| n.schedulable()).map(|n| n.capacity.cpu_millis).sum()
}

#[async_trait]
impl PeerHandler for Federation {
    async fn handle(&self, from: Identity, request: Vec<u8>) -> Vec<u8> {
        let reply = match decode::<PeerRequest>(&request) {
            Ok(PeerRequest::Offer(offer)) => self.on_offer(&from, offer).await,
            Ok(PeerRequest::Status { id }) => self.on_status(&id).await,
            Ok(PeerRequest::Revoke { id, epoch }) => self.on_revoke(&id, epoch).await,
            Ok(PeerRequest::Allocations { id }) => {
                let job = JobId::new(target_job_id(&id));
                PeerReply::Allocations(
                    self.server
                        .raft
                        .read(|s| s.allocs_of_job(&job).map(cluster_core::server::api::AllocView::of).collect()),
                )
            }
            Err(e) => PeerReply::Rejected { reason: Rejection::NotAccepted, message: format!("malformed: {e}") },
        };
        encode(&reply)
    }
}

impl Federation {
    /// The target's side of an offer: every check is its own.
    async fn on_offer(&self, from: &Identity, offer: Offer) -> PeerReply {
        let policy = self.policy();
        let reject = |reason: Rejection, message: String| {
            self.counters.inbound_rejected.fetch_add(1, Ordering::Relaxed);
            self.counters.refused("inbound", &format!("{reason:?}"));
            tracing::info!(offer = %offer.id, ?reason, %message, "offer rejected");
            PeerReply::Rejected { reason, message }
        };
        if from.cluster != offer.origin {
            return reject(
                Rejection::NotAccepted,
                format!("the certificate names {}, not {}", from.cluster, offer.origin),
            );
        }
        let mut job = offer.job.clone();
        job.id = JobId::new(target_job_id(&offer.id));
        job.version = 0;
        job.labels.insert(LABEL_ORIGIN.into(), offer.origin.clone());
        job.labels.insert(LABEL_DELEGATION.into(), offer.id.clone());
        job.labels.insert(LABEL_EPOCH.into(), offer.epoch.to_string());
        // A retried offer: the job is there already.
        let known = self.server.raft.read(|s| {
            s.job(&job.id).map(|j| (j.stopped, s.allocs_of_job(&j.id).filter(|a| a.is_live()).count() as u32))
        });
        if let Some((stopped, placed)) = known {
            return if stopped {
                reject(Rejection::NotAccepted, "revoked".into())
            } else {
                PeerReply::Accepted { placed }
            };
        }
        let allowed: Option<Vec<String>> =
            (!job.jurisdictions.is_empty()).then(|| job.jurisdictions.iter().map(|j| j.to_string()).collect());
        // An offer larger than the inbound share allows is taken in part,
        // as one larger than the free capacity is: the origin offers the
        // rest elsewhere. Refused only when not one instance fits the share.
        let per: u64 = job.groups.iter().map(|g| g.resources().cpu_millis).sum::<u64>().max(1);
        let (inbound, total) = self.server.raft.read(|s| (inbound_cpu(s), total_cpu(s)));
        let share_room = ((policy.inbound.max_share_of_capacity * total as f64) as u64).saturating_sub(inbound);
        if let Some(g) = job.groups.first_mut() {
            g.count = g.count.min(u32::try_from(share_room / per).unwrap_or(u32::MAX).max(1));
        }
        let check = OfferCheck {
            origin: &offer.origin,
            allowed: allowed.as_deref(),
            ask_cpu_millis: per,
            inbound_cpu_millis: inbound,
            total_cpu_millis: total,
            hops: offer.hops,
        };
        if let Err(reason) = check_offer(&policy, &check) {
            let message = match reason {
                Rejection::Jurisdiction => format!(
                    "the work may run in [{}]; {} is in [{}]",
                    allowed.unwrap_or_default().join(", "),
                    policy.cluster,
                    policy.jurisdictions.join(", ")
                ),
                Rejection::InboundShare => format!(
                    "work from other clusters already uses {:.0}% of {}'s cpu, its limit is {:.0}%",
                    100.0 * inbound as f64 / total.max(1) as f64,
                    policy.cluster,
                    100.0 * policy.inbound.max_share_of_capacity
                ),
                _ => format!("{reason:?}"),
            };
            return reject(reason, message);
        }
        // How many would fit, by a dry run; offer those.
        let fits = match cluster_core::server::http::dry_run(&self.server, job.clone()).await {
            Ok((_, plan, _)) => plan.placements.len() as u32,
            Err(e) => return reject(Rejection::NoCapacity, e.message),
        };
        if fits == 0 {
            return reject(Rejection::NoCapacity, "no node fits an instance".into());
        }
        if let Some(g) = job.groups.first_mut() {
            g.count = g.count.min(fits);
        }
        let eval = match self.server.write(Write::SubmitJob(job)).await {
            Ok(WriteReply::Job { eval, .. }) => eval,
            Ok(other) => return reject(Rejection::NoCapacity, format!("unexpected {other:?}")),
            Err(e) => return reject(Rejection::NoCapacity, e.message),
        };
        let deadline = Instant::now() + PLACE_WAIT;
        loop {
            let status = self.server.raft.read(|s| s.eval(eval).map(|e| (e.status, e.placed)));
            match status {
                Some((EvalStatus::Pending, _)) | None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some((_, placed)) => {
                    self.counters.inbound_accepted.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(offer = %offer.id, placed, "offer accepted");
                    return PeerReply::Accepted { placed };
                }
                None => return PeerReply::Accepted { placed: 0 },
            }
        }
    }

    async fn on_status(&self, id: &str) -> PeerReply {
        let job = JobId::new(target_job_id(id));
        let report = self.server.raft.read(|s| {
            let j = s.job(&job)?;
            let epoch = j.labels.get(LABEL_EPOCH).and_then(|e| e.parse().ok()).unwrap_or(1);
            let allocs: Vec<_> = s.allocs_of_job(&job).collect();
            let count = |st: cluster_core::model::AllocStatus| allocs.iter().filter(|a| a.status == st).count() as u32;
            Some(Report {
                id: id.to_string(),
                epoch,
                running: allocs.iter().filter(|a| a.is_live()).count() as u32,
                complete: count(cluster_core::model::AllocStatus::Complete),
                failed: count(cluster_core::model::AllocStatus::Failed),
            })
        });
        report.map_or(PeerReply::Unknown, PeerReply::Report)
    }

    async fn on_revoke(&self, id: &str, epoch: u64) -> PeerReply {
        let job = JobId::new(target_job_id(id));
        let current = self.server.raft.read(|s| {
            s.job(&job).map(|j| (j.stopped, j.labels.get(LABEL_EPOCH).and_then(|e| e.parse::<u64>().ok()).unwrap_or(1)))
        });
        match current {
            Some((false, e)) if e < epoch => match self.server.write(Write::StopJob(job)).await {
                Ok(_) => {
                    tracing::info!(delegation = %id, epoch, "revoked by its origin: stopped");
                    PeerReply::Revoked
                }
                Err(e) => PeerReply::Rejected { reason: Rejection::NoCapacity, message: e.message },
            },
            _ => PeerReply::Revoked,
        }
    }
}

/// A blocked evaluation whose job may send work away: what overflowed,
/// and the instances free to offer, by group.
struct Blocked {
    eval: u64,
    job: Job,
    overflow: Vec<Overflow>,
    free: BTreeMap<String, Vec<u32>>,
    remote: u32,
}

/// The origin's duties; run while the server leads (see [`run`]).
impl Federation {
    async fn round(self: &Arc<Self>) {
        // The first leader to run commits its file's policy, if none is.
        let committed = self.server.raft.read(|s| s.records(POLICY_RECORD).next().is_some());
        if !committed {
            let local = self.policy.read().expect("policy lock").clone();
            if let Err(e) = self.commit_policy(local).await {
                tracing::warn!(error = %e, "cannot commit the federation policy");
            }
        }
        let policy = self.policy();
        let now = self.now_ms();
        let view = self.member.view();
        // Targets dead by gossip, and since when.
        {
            let mut dead = self.dead_since.lock().expect("dead lock");
            for c in view.clusters.values() {
                if c.liveness == Liveness::Dead {
                    dead.entry(c.cluster.clone()).or_insert(now);
                } else {
                    dead.remove(&c.cluster);
                }
            }
        }
        self.follow(&policy, now, &view).await;
        if policy.overflow.triggers.contains(&Trigger::Unplaceable) {
            self.delegate(&policy, now, &view).await;
        }
    }

    /// Every other cluster as gossip and this leader know it: liveness,
    /// summary, measured round trip, and whether its breaker lets it be
    /// tried now.
    pub fn peers(&self, policy: &Policy, now: u64, view: &gossip::FederationView) -> Vec<PeerInfo> {
        let rtt = self.rtt.lock().expect("rtt lock");
        let breakers = self.breakers.lock().expect("breakers");
        view.clusters
            .values()
            .filter(|c| c.cluster != policy.cluster)
            .map(|c| PeerInfo {
                cluster: c.cluster.clone(),
                alive: c.liveness == Liveness::Alive,
                summary: c.summary.clone(),
                rtt_ms: c
                    .servers
                    .values()
                    .filter_map(|s| rtt.get(&s.rpc_addr.as_ref()?.parse().ok()?))
                    .copied()
                    .reduce(f64::min),
                breaker_open: breakers.get(&c.cluster).is_some_and(|b| !b.ready(now, &policy.retry)),
            })
            .collect()
    }

    /// Offers the overflow of blocked evaluations to peers.
    async fn delegate(self: &Arc<Self>, policy: &Policy, now: u64, view: &gossip::FederationView) {
        let peers = self.peers(policy, now, view);
        let addrs = |cluster: &str| -> Vec<SocketAddr> {
            view.cluster(cluster)
                .map(|c| {
                    c.servers.values().filter(|s| s.live).filter_map(|s| s.rpc_addr.as_ref()?.parse().ok()).collect()
                })
                .unwrap_or_default()
        };
        // Blocked evaluations of jobs that may leave, with their free indices.
        let work: Vec<Blocked> = self.server.raft.read(|s| {
            s.blocked_evals()
                .filter_map(|e| s.eval(e))
                .filter_map(|e| {
                    let job = s.job(&e.job)?;
                    if job.stopped
                        || job.labels.contains_key(LABEL_ORIGIN)
                        || job.federation.delegate == DelegateMode::Never
                    {
                        return None;
                    }
                    // The instances the scheduler still has to place (not
                    // running here, not held elsewhere), as it decides them.
                    let work = cluster_core::scheduler::reconcile::reconcile(s, job);
                    let free: BTreeMap<String, Vec<u32>> =
                        job.groups.iter().zip(work.groups).map(|(g, w)| (g.name.to_string(), w.place)).collect();
                    let remote = s.held_of_job(&job.id).count() as u32;
                    let overflow: Vec<Overflow> = e
                        .unplaced
                        .iter()
                        .map(|u| Overflow {
                            group: u.group.to_string(),
                            count: u.count.min(free.get(&*u.group).map_or(0, |f| f.len() as u32)),
                        })
                        .filter(|o| o.count > 0)
                        .collect();
                    (!overflow.is_empty()).then(|| Blocked { eval: e.id.0, job: job.clone(), overflow, free, remote })
                })
                .collect()
        });
        let mut waiting = BTreeMap::new();
        let mut offers = tokio::task::JoinSet::new();
        for Blocked { eval, job, overflow, mut free, remote } in work {
            let total = job.instance_count() as u32;
            let selection = select(policy, &job, &overflow, total, remote, &peers);
            if selection.left > 0 {
                let refused = selection.refused.iter().map(|(c, r)| (c.clone(), r.to_string())).collect();
                waiting.insert(job.id.to_string(), Waiting { instances: selection.left, refused });
            }
            for offer in selection.offers {
                let indices: Vec<u32> = free.get_mut(&offer.group).map_or_else(Vec::new, |f| {
                    let n = (offer.count as usize).min(f.len());
                    f.drain(..n).collect()
                });
                if indices.is_empty() {
                    continue;
                }
                // Unique per set of instances: a retry of this offer reuses it.
                let id = format!("{}/{}/e{eval}-{}-{}", policy.cluster, job.id, offer.group, indices[0]);
                // No jurisdiction allowed means nowhere, never anywhere.
                let Some(delegated) = offered_job(policy, &job, &offer.group, indices.len() as u32) else {
                    continue;
                };
                let record = Record {
                    delegation: Delegation::offer(
                        id.clone(),
                        &offer.peer,
                        job.id.as_str(),
                        &offer.group,
                        indices.len() as u32,
                        now,
                        &policy.retry,
                    ),
                    indices: indices.clone(),
                    target_addrs: addrs(&offer.peer),
                    fenced: false,
                    note: String::new(),
                };
                // Offers go out side by side, a bounded number at a time.
                while offers.len() >= OFFERS_IN_FLIGHT_MAX {
                    offers.join_next().await;
                }
                let (me, policy) = (self.clone(), policy.clone());
                offers.spawn(async move { me.offer(&policy, record, delegated).await });
            }
        }
        while offers.join_next().await.is_some() {}
        *self.waiting.lock().expect("waiting lock") = waiting;
    }

    /// Holds the instances (in the log, before anything is sent), then
    /// offers them.
    async fn offer(&self, policy: &Policy, record: Record, job: Job) {
        let hold = Command::Hold {
            holder: holder(&record.delegation.id),
            job: JobId::new(&record.delegation.job),
            group: record.delegation.group.as_str().into(),
            indices: record.indices.clone(),
            record: encode(&record),
        };
        // Refused when an index started running here, or another holder
        // took it, since the round read the state: nothing is offered.
        match self.server.raft.propose(hold).await {
            Ok(Effect::Refused(why)) => {
                tracing::debug!(delegation = %record.delegation.id, %why, "hold refused; not offered");
                return;
            }
            Err(_) => return,
            Ok(_) => {}
        }
        self.send_offer(policy, record, job).await;
    }

    /// Sends an offer (again, after a leader change: the id makes it
    /// idempotent) and records the answer.
    async fn send_offer(&self, policy: &Policy, mut record: Record, job: Job) {
        let id = record.delegation.id.clone();
        self.counters.offers.fetch_add(1, Ordering::Relaxed);
        let request = PeerRequest::Offer(Offer {
            id: id.clone(),
            origin: policy.cluster.clone(),
            epoch: record.delegation.epoch,
            job,
            hops: 0,
        });
        let reply = self.ask(&record.target_addrs, &request).await;
        let now = self.now_ms();
        let target = record.delegation.target.clone();
        match reply {
            Some(PeerReply::Accepted { placed }) if placed > 0 => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                self.breakers.lock().expect("breakers").entry(target).or_default().success();
                record.delegation.accepted(now, &policy.retry);
                let keep = (placed as usize).min(record.indices.len());
                record.indices.truncate(keep);
                record.delegation.count = keep as u32;
                self.heard.lock().expect("heard").insert(id.clone(), now);
                // The hold shrinks to what the target placed; the rest is
                // evaluated again.
                let _ = self
                    .server
                    .raft
                    .propose(Command::Hold {
                        holder: holder(&id),
                        job: JobId::new(&record.delegation.job),
                        group: record.delegation.group.as_str().into(),
                        indices: record.indices.clone(),
                        record: encode(&record),
                    })
                    .await;
                tracing::info!(delegation = %id, placed, "delegated");
            }
            other => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                self.breakers.lock().expect("breakers").entry(target).or_default().failure(now, &policy.retry);
                record.delegation.state = State::Failed;
                let reason = match &other {
                    Some(PeerReply::Rejected { reason, .. }) => format!("{reason:?}"),
                    Some(_) => "Unexpected".into(),
                    None => "NoAnswer".into(),
                };
                self.counters.refused("outbound", &reason);
                record.note = match other {
                    Some(PeerReply::Rejected { message, reason }) => format!("rejected ({reason:?}): {message}"),
                    Some(r) => format!("unexpected answer {r:?}"),
                    None => "no answer".into(),
                };
                tracing::info!(delegation = %id, note = %record.note, "offer not taken");
                let _ =
                    self.server.raft.propose(Command::Release { holder: holder(&id), record: encode(&record) }).await;
            }
        }
    }

    /// Sends `request` to the first of `addrs` that answers.
    pub async fn ask(&self, addrs: &[SocketAddr], request: &PeerRequest) -> Option<PeerReply> {
        let bytes = encode(request);
        // Offers wait for the target's scheduler; the rest answer at once.
        let limit = if matches!(request, PeerRequest::Offer(_)) { PLACE_WAIT * 2 } else { ASK_TIMEOUT };
        for a in addrs {
            let sent = Instant::now();
            match tokio::time::timeout(limit, self.server.call_peer(*a, bytes.clone())).await {
                Ok(Ok(reply)) => {
                    if !matches!(request, PeerRequest::Offer(_)) {
                        let ms = sent.elapsed().as_secs_f64() * 1e3;
                        let mut rtt = self.rtt.lock().expect("rtt lock");
                        let e = rtt.entry(*a).or_insert(ms);
                        *e = 0.8 * *e + 0.2 * ms;
                    }
                    return decode::<PeerReply>(&reply).ok();
                }
                Ok(Err(e)) => tracing::debug!(to = %a, error = %e, "peer did not answer"),
                Err(_) => tracing::debug!(to = %a, "peer did not answer in time"),
            }
        }
        None
    }

    /// Follows active delegations: reports renew the lease; a target dead
    /// past the grace period, or a lease that lapsed, revokes; revoked
    /// delegations are fenced once the target hears of it.
    async fn follow(&self, policy: &Policy, now: u64, view: &gossip::FederationView) {
        // Targets that did not answer this round are not asked again in it:
        // a dead target costs one timeout a round, not one per delegation.
        let mut silent: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for mut record in self.records() {
            let id = record.delegation.id.clone();
            let target = record.delegation.target.clone();
            let reachable =
                !silent.contains(&target) && view.cluster(&target).is_none_or(|c| c.liveness != Liveness::Dead);
            match record.delegation.state {
                State::Accepted | State::Running | State::Offered => {
                    let heard = *self.heard.lock().expect("heard").entry(id.clone()).or_insert(now);
                    let mut d = record.delegation.clone();
                    d.lease_until_ms = heard + policy.retry.lease_ms;
                    let dead = self.dead_since.lock().expect("dead lock").get(&target).copied();
                    if d.must_revoke(now, dead, &policy.retry) {
                        record.delegation.revoke();
                        record.note = if dead.is_some() { "target dead".into() } else { "lease lapsed".into() };
                        self.counters.revoked.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(delegation = %id, note = %record.note, "revoked; the work is placed again");
                        let _ = self
                            .server
                            .raft
                            .propose(Command::Release { holder: holder(&id), record: encode(&record) })
                            .await;
                        continue;
                    }
                    if !reachable {
                        continue;
                    }
                    let status = self.ask(&record.target_addrs, &PeerRequest::Status { id: id.clone() }).await;
                    if status.is_none() {
                        silent.insert(target.clone());
                    }
                    if let (Some(PeerReply::Unknown), State::Offered) = (&status, record.delegation.state) {
                        // Held, but the offer never arrived (the leader
                        // that held it stopped): offer it again.
                        let job = self.server.raft.read(|s| s.job(&JobId::new(&record.delegation.job)).cloned());
                        let n = record.indices.len() as u32;
                        // A policy that now allows no jurisdiction sends it
                        // nowhere (review B10.3): the lease ends the record.
                        if let Some(delegated) = job.and_then(|j| offered_job(policy, &j, &record.delegation.group, n))
                        {
                            self.send_offer(policy, record, delegated).await;
                        }
                        continue;
                    }
                    if let Some(PeerReply::Report(r)) = status {
                        self.heard.lock().expect("heard").insert(id.clone(), now);
                        let before = record.delegation.clone();
                        record.delegation.report(&r, now, &policy.retry);
                        let (b, a) = (&before, &record.delegation);
                        if (b.state, b.running, b.complete, b.failed) != (a.state, a.running, a.complete, a.failed) {
                            let command = if a.state == State::Failed {
                                Command::Release { holder: holder(&id), record: encode(&record) }
                            } else {
                                Command::Record { holder: holder(&id), record: encode(&record) }
                            };
                            let _ = self.server.raft.propose(command).await;
                        }
                    }
                }
                State::Revoked if !record.fenced && reachable => {
                    let revoke = PeerRequest::Revoke { id: id.clone(), epoch: record.delegation.epoch };
                    let answer = self.ask(&record.target_addrs, &revoke).await;
                    if answer.is_none() {
                        silent.insert(target.clone());
                    }
                    if let Some(PeerReply::Revoked) = answer {
                        record.fenced = true;
                        let _ = self
                            .server
                            .raft
                            .propose(Command::Record { holder: holder(&id), record: encode(&record) })
                            .await;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Runs the origin's rounds while `fed`'s server leads; until aborted.
pub async fn run(fed: Arc<Federation>) {
    let mut tick = tokio::time::interval(ROUND);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if fed.server.is_leader() {
            fed.round().await;
        }
    }
}
