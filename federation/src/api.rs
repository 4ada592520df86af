//! The federation's part of a server's HTTP API: delegations in and out,
//! a federated dry run of a job, and counters for `/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::routing::{get, post};
use cluster_core::acl::Capability;
use cluster_core::server::access::{Who, need, need_somewhere};
use cluster_core::server::api::{ApiError, JobSubmit, PlanReport};
use cluster_core::server::http::{check_submitted, dry_run};
use cluster_core::spec::parse_job;
use serde::{Deserialize, Serialize};

use crate::node::Federation;
use crate::select::{Overflow, select};

/// One delegation this cluster made, as `hanse federation delegations`
/// and `hanse job status` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outbound {
    pub id: String,
    pub target: String,
    pub job: String,
    pub group: String,
    /// The instance indexes it holds (offered, then the ones registered).
    pub indices: Vec<u32>,
    /// `offered` (no definite answer yet), `registered`, `revoking` (a
    /// stop, update or take-back the target has not confirmed yet), or an
    /// end: `refused`, `revoked`, `expired`, `complete`.
    pub state: String,
    /// Per-index states as the target last reported them (pending: not
    /// yet running, or waiting for a reschedule's delay).
    pub pending: u32,
    pub running: u32,
    pub complete: u32,
    pub failed: u32,
    /// Whether its instances are held (not placed here).
    pub holds: bool,
    pub note: String,
}

impl Outbound {
    pub fn of(r: &crate::proto::origin::Outbound) -> Outbound {
        use crate::proto::IndexState as S;
        use crate::proto::origin::{End, Phase};
        let count = |s: S| r.states.iter().filter(|(_, x)| *x == s).count() as u32;
        let state = match r.phase {
            Phase::Offered => "offered",
            Phase::Registered => "registered",
            Phase::Revoking => "revoking",
            Phase::Ended(End::Refused) => "refused",
            Phase::Ended(End::Revoked) => "revoked",
            Phase::Ended(End::Expired) => "expired",
            Phase::Ended(End::Complete) => "complete",
        };
        Outbound {
            id: r.id.clone(),
            target: r.target.clone(),
            job: r.job.clone(),
            group: r.group.clone(),
            indices: r.indices.clone(),
            state: state.into(),
            pending: count(S::Pending) + count(S::Rescheduling),
            running: count(S::Running),
            complete: count(S::Complete),
            failed: count(S::Failed),
            holds: r.phase.holds(),
            note: r.note.clone(),
        }
    }

    /// Whether its work runs (or may run) at the target now.
    pub fn active(&self) -> bool {
        matches!(self.state.as_str(), "offered" | "registered" | "revoking")
    }
}

/// One delegation another cluster made to this one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    pub id: String,
    pub origin: String,
    /// The job's id here.
    pub job: String,
    /// The origin's instance indexes it runs.
    pub indices: Vec<u32>,
    /// `registered`, `refused` or `revoked`.
    pub state: String,
    pub running: u32,
    pub at_most_once: bool,
    /// The origin's indexes this cluster gave back (it could not keep
    /// them); they never run here again.
    pub returned: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delegations {
    pub cluster: String,
    pub outbound: Vec<Outbound>,
    pub inbound: Vec<Inbound>,
    /// Overflow no peer took yet, by job (the retry queue).
    pub waiting: std::collections::BTreeMap<String, crate::node::Waiting>,
}

/// `POST /v1/federation/plan`: the local plan, and where the rest would go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FederatedPlan {
    pub local: PlanReport,
    /// (cluster, group, instances).
    pub delegated: Vec<(String, String, u32)>,
    /// (cluster, why it gets nothing).
    pub refused: Vec<(String, String)>,
    /// Instances neither placed here nor taken by a peer.
    pub left: u32,
}

/// `GET /v1/federation/members`: one row per cluster, as this server's
/// gossip sees it (`hanse federation members`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberRow {
    pub cluster: String,
    pub region: String,
    pub status: gossip::Liveness,
    pub leader: Option<String>,
    pub servers_live: usize,
    pub servers: usize,
    /// Each server's level, by name (alive, suspect, dead, left).
    #[serde(default)]
    pub server_states: std::collections::BTreeMap<String, gossip::Liveness>,
    pub free_cpu_millis: Option<u64>,
    pub free_memory_bytes: Option<u64>,
    pub free_gpus: Option<u32>,
    pub summary_age_ms: Option<u64>,
    pub summary: Option<gossip::ClusterSummary>,
}

impl MemberRow {
    pub fn of(c: &gossip::ClusterEntry, now_unix_ms: u64) -> MemberRow {
        let free = c.summary.as_ref().map(|s| s.free());
        MemberRow {
            cluster: c.cluster.to_string(),
            region: c.region.to_string(),
            status: c.liveness,
            leader: c.leader.as_deref().map(str::to_string),
            servers_live: c.servers.values().filter(|s| s.live).count(),
            servers: c.servers.len(),
            server_states: c.servers.iter().map(|(n, s)| (n.clone(), s.state)).collect(),
            free_cpu_millis: free.map(|f| f.cpu_millis),
            free_memory_bytes: free.map(|f| f.memory_bytes),
            free_gpus: c.summary.as_ref().map(|s| s.free_gpus()),
            summary_age_ms: c.summary_age_ms(now_unix_ms),
            summary: c.summary.clone(),
        }
    }

    /// Every cluster of a view.
    pub fn all(view: &gossip::FederationView) -> Vec<MemberRow> {
        let now = gossip::transport::unix_ms();
        view.clusters.values().map(|c| MemberRow::of(c, now)).collect()
    }
}

/// `GET /v1/federation/gossip`: what this server's gossip refuses, and
/// why: peers whose clock is off, server names claimed twice, members
/// whose certificate or signatures do not verify.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GossipTrouble {
    pub clock_skewed: Vec<gossip::transport::SkewedPeer>,
    pub name_conflicts: Vec<gossip::view::NameConflict>,
    /// Members whose certificate or signatures do not verify.
    #[serde(default)]
    pub refused: Vec<gossip::view::RefusedMember>,
}

impl GossipTrouble {
    pub fn of(member: &gossip::Member) -> GossipTrouble {
        let view = member.view();
        GossipTrouble {
            clock_skewed: member.skewed_peers(),
            name_conflicts: view.conflicts.clone(),
            refused: view.refused.clone(),
        }
    }

    /// One line each, for an operator.
    pub fn lines(&self) -> Vec<String> {
        use gossip::transport::fmt_offset;
        let mut out = Vec::new();
        for p in &self.clock_skewed {
            out.push(format!(
                "gossip from {} is refused: its clock is {} {} this server's (tolerated: {}, `[gossip] max_clock_skew`)",
                p.addr,
                fmt_offset(p.offset_ms.unsigned_abs()),
                if p.offset_ms > 0 { "ahead of" } else { "behind" },
                fmt_offset(p.bound_ms),
            ));
        }
        for r in &self.refused {
            out.push(format!(
                "gossip member {} at {} is refused: {}",
                r.node_id.escape_debug(),
                r.addr,
                r.reason.escape_debug()
            ));
        }
        for c in &self.name_conflicts {
            out.push(format!(
                "server name {}/{} is claimed by {} live members: generation {} holds it, {:?} refused",
                c.cluster.escape_debug(),
                c.server.escape_debug(),
                1 + c.rivals.len(),
                c.holder,
                c.rivals
            ));
        }
        out
    }
}

pub fn router(fed: Arc<Federation>) -> Router {
    Router::new()
        .route("/v1/federation/members", get(members))
        .route("/v1/federation/gossip", get(gossip_trouble))
        .route("/v1/federation/delegations", get(delegations))
        .route("/v1/federation/plan", post(plan))
        .route("/v1/federation/policy", get(get_policy).put(put_policy))
        .route("/v1/federation/jobs/{job}", get(remote_allocations))
        .with_state(fed)
}

async fn members(
    State(fed): State<Arc<Federation>>,
    Extension(who): Who,
) -> Result<axum::Json<Vec<MemberRow>>, ApiError> {
    need_somewhere(&who, Capability::Read)?;
    Ok(axum::Json(MemberRow::all(&fed.member.view())))
}

async fn gossip_trouble(
    State(fed): State<Arc<Federation>>,
    Extension(who): Who,
) -> Result<axum::Json<GossipTrouble>, ApiError> {
    need_somewhere(&who, Capability::Read)?;
    Ok(axum::Json(GossipTrouble::of(&fed.member)))
}

/// The namespace of a local job, for access checks; `*` (only a caller
/// who may read every namespace) for one that is not here.
fn namespace_of(fed: &Federation, job: &str) -> Arc<str> {
    fed.server.raft.read(|s| s.namespace_of(&cluster_core::ids::JobId::new(job)))
}

/// Registers the federation's counters with the server's `/metrics`:
/// `hanse_delegation_{offers,registered,refused,undelivered}_total`,
/// `hanse_delegation_inbound_{registered,refused}_total`, and
/// `hanse_delegation_refusals_total{direction,reason}`.
pub fn export_metrics(fed: &Arc<Federation>) {
    use cluster_core::server::metrics::{Reading, counters};
    let weak = Arc::downgrade(fed);
    fed.server.metrics.add_collector(counters(move || {
        let Some(f) = weak.upgrade() else { return Vec::new() };
        let c = &f.counters;
        let count = |name, help, v: &std::sync::atomic::AtomicU64| Reading::Counter {
            name,
            help,
            value: v.load(Ordering::Relaxed),
        };
        let by = c.rejected_by.lock().expect("counters lock");
        let refusals = by
            .iter()
            .map(|((way, reason), n)| {
                (vec![("direction".into(), way.to_string()), ("reason".into(), reason.clone())], *n)
            })
            .collect();
        vec![
            count("delegation_offers", "Delegations this cluster offered", &c.offers),
            count("delegation_registered", "Answers from peers that registered an offer", &c.registered),
            count("delegation_refused", "Answers from peers that refused an offer", &c.refused),
            count("delegation_undelivered", "Message batches no server of a peer took", &c.undelivered),
            count("delegation_inbound_registered", "Offers from peers registered here", &c.inbound_registered),
            count("delegation_inbound_refused", "Offers from peers refused here", &c.inbound_refused),
            Reading::Labelled {
                name: "delegation_refusals",
                help: "Offers refused, by direction and reason",
                values: refusals,
            },
        ]
    }));
}

/// Delegations of the jobs the caller may read.
async fn delegations(
    State(fed): State<Arc<Federation>>,
    Extension(who): Who,
) -> Result<axum::Json<Delegations>, ApiError> {
    use crate::proto::target::InPhase;
    need_somewhere(&who, Capability::Read)?;
    let readable = |job: &str| who.allows(Capability::Read, &namespace_of(&fed, job));
    let outbound = fed.outbound().iter().filter(|r| readable(&r.job)).map(Outbound::of).collect();
    let inbound: Vec<Inbound> = fed.server.raft.read(|s| {
        crate::proto::target::Target::records(s)
            .into_iter()
            .map(|(r, _)| Inbound {
                running: s
                    .allocs_of_job(&cluster_core::ids::JobId::new(&r.job))
                    .filter(|a| a.is_live() && a.status == cluster_core::model::AllocStatus::Running)
                    .count() as u32,
                state: match r.phase {
                    InPhase::Registered => "registered",
                    InPhase::Refused { .. } => "refused",
                    InPhase::Revoked => "revoked",
                }
                .into(),
                id: r.id,
                origin: r.origin,
                job: r.job,
                indices: r.indices,
                at_most_once: r.at_most_once,
                returned: r.returned,
            })
            .collect()
    });
    let inbound: Vec<Inbound> = inbound.into_iter().filter(|r: &Inbound| readable(&r.job)).collect();
    let mut waiting = fed.waiting.lock().expect("waiting lock").clone();
    waiting.retain(|job, _| readable(job));
    Ok(axum::Json(Delegations { cluster: fed.server.options.cluster.clone(), outbound, inbound, waiting }))
}

async fn plan(
    State(fed): State<Arc<Federation>>,
    Extension(who): Who,
    body: Bytes,
) -> Result<axum::Json<FederatedPlan>, ApiError> {
    let req: JobSubmit = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not the JSON this endpoint takes: {e}")))?;
    let job = check_submitted(req.source, "job.toml", req.spec, parse_job)?;
    need(&who, Capability::Submit, &job.namespace)?;
    let (job, plan, local) = dry_run(&fed.server, job).await?;
    let policy = fed.policy();
    let peers = fed.peers(&policy, fed.now_ms(), &fed.member.view());
    let overflow: Vec<Overflow> =
        plan.unplaced.iter().map(|u| Overflow { group: u.group.to_string(), count: u.count }).collect();
    let s = select(&policy, &job, &overflow, job.instance_count() as u32, 0, &peers);
    Ok(axum::Json(FederatedPlan {
        local,
        delegated: s.offers.iter().map(|o| (o.peer.clone(), o.group.clone(), o.count)).collect(),
        refused: s.refused.iter().map(|(c, r)| (c.clone(), r.to_string())).collect(),
        left: s.left,
    }))
}

/// `GET /v1/federation/policy`: the policy in force.
async fn get_policy(
    State(fed): State<Arc<Federation>>,
    Extension(who): Who,
) -> Result<axum::Json<crate::policy::Policy>, ApiError> {
    need_somewhere(&who, Capability::Read)?;
    Ok(axum::Json(fed.policy()))
}

/// `PUT /v1/federation/policy` with `{"policy": "<toml>", "source": "file"}`:
/// checks it, and commits it through the log so every server applies it.
async fn put_policy(
    State(fed): State<Arc<Federation>>,
    Extension(who): Who,
    body: Bytes,
) -> Result<axum::Json<crate::policy::Policy>, ApiError> {
    need(&who, Capability::FederationAdmin, "*")?;
    #[derive(Deserialize)]
    struct Put {
        policy: String,
        source: Option<String>,
    }
    let req: Put = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not the JSON this endpoint takes: {e}")))?;
    let policy = check_submitted(req.source, "policy.toml", req.policy, crate::policy::parse_policy)?;
    fed.commit_policy(policy.clone()).await.map_err(ApiError::bad_request)?;
    Ok(axum::Json(policy))
}

/// Allocations of a job in another cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteAllocations {
    pub cluster: String,
    pub delegation: String,
    pub allocations: Vec<cluster_core::server::api::AllocView>,
}

/// `GET /v1/federation/jobs/JOB`: the job's allocations in the clusters it
/// was delegated to (asked of each target now; a target that does not
/// answer is listed with none).
async fn remote_allocations(
    State(fed): State<Arc<Federation>>,
    Extension(who): Who,
    axum::extract::Path(job): axum::extract::Path<String>,
) -> Result<axum::Json<Vec<RemoteAllocations>>, ApiError> {
    need(&who, Capability::Read, &namespace_of(&fed, &job))?;
    let mut out = Vec::new();
    for r in fed.outbound().into_iter().filter(|r| r.job == job) {
        use crate::proto::origin::Phase;
        if !matches!(r.phase, Phase::Registered | Phase::Revoking) {
            continue;
        }
        let allocations = fed.remote_allocations(&r.target, &r.id).await.unwrap_or_default();
        out.push(RemoteAllocations { cluster: r.target.clone(), delegation: r.id.clone(), allocations });
    }
    Ok(axum::Json(out))
}
