//! The HTTP/JSON API every server serves (axum). Writes go to the leader
//! (forwarded by followers); reads are linearizable (ReadIndex) unless the
//! query says `?stale=true`. Every error is JSON: `{"status", "message"}`,
//! plus `diagnostics` for a job spec that does not check.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Inner;
use super::access::{Who, need, need_management, need_somewhere};
use super::api::*;
use super::metrics::Scraped;
use super::rpc::{Write, WriteReply};
use crate::acl::Capability;
use crate::diag::{Severity, SourceFile};
use crate::ids::{AllocId, EvalId, JobId, NodeId};
use crate::model::alloc::{AllocReport, AllocStatus};
use crate::model::job::Job;
use crate::model::node::Node;
use crate::model::plan::Plan;
use crate::scheduler::schedule;
use crate::spec::parse_job;
use crate::state::ClusterState;

/// The largest request body: a job spec's own limit plus room for JSON.
pub const BODY_BYTES_MAX: usize = crate::spec::read::FILE_BYTES_MAX + 64 * 1024;
/// The longest a client may wait on an evaluation in one request.
pub const WAIT_MAX: Duration = Duration::from_secs(60);

type Srv = State<Arc<Inner>>;
type Q = Query<HashMap<String, String>>;

pub fn router(server: Arc<Inner>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/status/leader", get(leader))
        .route("/v1/status/peers", get(peers))
        .route("/v1/operator/raft/peers", get(raft_peers).post(add_peer))
        .route("/v1/operator/raft/peers/{id}", delete(remove_peer))
        .route("/v1/operator/raft/transfer-leader", post(transfer_leader))
        .route("/v1/operator/audit", get(audit))
        .route("/v1/system/gc", axum::routing::put(system_gc))
        .route(
            "/v1/operator/snapshot",
            get(snapshot_save).put(snapshot_restore).layer(DefaultBodyLimit::max(RESTORE_BYTES_MAX)),
        )
        .route("/v1/jobs", get(jobs).put(submit))
        .route("/v1/jobs/plan", post(plan))
        .route("/v1/jobs/{id}", get(job).delete(stop_job))
        .route("/v1/jobs/{id}/scale", post(scale_job))
        .route("/v1/jobs/{id}/versions", get(job_versions))
        .route("/v1/jobs/{id}/revert", post(revert_job))
        .route("/v1/jobs/{id}/deployment", get(deployment))
        .route("/v1/jobs/{id}/deployment/promote", post(promote))
        .route("/v1/jobs/{id}/deployment/fail", post(fail_deployment))
        .route("/v1/evaluations/{id}", get(evaluation))
        .route("/v1/nodes", get(nodes).put(register_node))
        .route("/v1/nodes/batch", axum::routing::put(register_nodes))
        .route("/v1/nodes/heartbeat", post(heartbeat))
        .route("/v1/nodes/{id}", get(node))
        .route("/v1/nodes/{id}/drain", post(drain))
        .route("/v1/nodes/{id}/eligibility", post(eligibility))
        .route("/v1/allocations", get(allocs))
        .route("/v1/allocations/status", post(alloc_status))
        .route("/v1/allocations/{id}", get(alloc))
        .route("/v1/allocations/{id}/stop", post(stop_alloc))
        .route("/v1/allocations/{id}/restart", post(restart_alloc))
        .route("/v1/allocations/{id}/signal", post(signal_alloc))
        .route("/v1/allocations/{id}/logs", get(logs))
        .route("/metrics", get(metrics))
        .merge(super::access::router())
        .fallback(|| async { ApiError::not_found("no such endpoint; the API lives under /v1/ (see `hanse --help`)") })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(server)
}

/// Serves the API on `addr` until the task is aborted, over TLS with `tls`
/// (HTTPS; `None`: plain HTTP, which the server warns about); returns the
/// bound address (useful with port 0).
pub async fn serve(
    server: Arc<Inner>,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(server, addr, Router::new(), tls).await
}

/// [`serve`], with more routes (the federation's) beside the cluster's.
pub async fn serve_with(
    server: Arc<Inner>,
    addr: SocketAddr,
    extra: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let hosts = Arc::new(server.options.http_hosts.clone());
    if !server.options.acl.enabled {
        tracing::warn!(%bound, "ACLs are disabled ([acl] enabled = false): anyone who reaches this API may do anything");
    }
    let auth = server.clone();
    // The token check (which audits every write) wraps the browser guard,
    // so a write the guard refuses is in the audit trail too.
    let app = extra
        .merge(router(server))
        .layer(axum::middleware::from_fn(move |r, n| browser_guard(hosts.clone(), r, n)))
        .layer(axum::middleware::from_fn(move |r, n| super::access::authenticate(auth.clone(), r, n)));
    if tls.is_none() {
        tracing::warn!(%bound, "the API serves plain HTTP: tokens and answers cross the network unencrypted");
    }
    let task = tokio::spawn(accept(listener, app, tls.map(tokio_rustls::TlsAcceptor::from)));
    Ok((bound, task))
}

/// A client that sends no complete request head within this is cut off
/// (slowloris, security review row 18); hyper starts the same timer when a
/// keep-alive connection goes idle after an answer, so it is also the
/// idle timeout (`tests/server_api.rs` checks both).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; past it a new one is closed at once.
pub const CONNECTIONS_MAX: usize = 4_096;
/// Connections served at once for one client address.
pub const CONNECTIONS_PER_CLIENT_MAX: usize = 256;

/// Serves every connection `listener` accepts, within the caps above, each
/// with [`HEADER_READ_TIMEOUT`]. The connections belong to this task:
/// aborting it (a server stopping) closes them all, so clients move on to
/// another server at once.
async fn accept(listener: tokio::net::TcpListener, app: Router, tls: Option<tokio_rustls::TlsAcceptor>) {
    let total = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let per_client: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = total.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, "HTTP connection refused: {CONNECTIONS_MAX} already open");
            continue;
        };
        {
            let mut counts = per_client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = counts.entry(peer.ip()).or_default();
            if *n >= CONNECTIONS_PER_CLIENT_MAX {
                tracing::warn!(client = %peer, "HTTP connection refused: {CONNECTIONS_PER_CLIENT_MAX} already open from it");
                continue;
            }
            *n += 1;
        }
        let (app, tls) = (app.clone(), tls.clone());
        let per_client = per_client.clone();
        connections.spawn(async move {
            match tls {
                // The handshake gets the header timeout too (a slow TLS
                // client is a slowloris as well).
                Some(tls) => match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, app, peer).await,
                    Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(client = %peer, "TLS handshake too slow"),
                },
                None => serve_connection(stream, app, peer).await,
            }
            drop(permit);
            let mut counts = per_client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = counts.get_mut(&peer.ip()) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&peer.ip());
                }
            }
        });
    }
}

/// Serves one connection's requests with [`HEADER_READ_TIMEOUT`].
async fn serve_connection<I>(io: I, app: Router, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tower::Service;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        // Who is calling, for the audit trail.
        request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        app.clone().call(request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let _ = connection.await;
}

/// Refuses what a web page could make a browser send (security review,
/// row 3): a `Host` that is neither an IP address, `localhost`, nor one of
/// the server's `http_hosts` (DNS rebinding: a page's own name resolving
/// to this address); an `Origin` other than the API's own (a cross-site
/// request); and a write whose body is not declared JSON (the "simple"
/// cross-site POST a form can send without asking first; a restore's
/// archive is `application/octet-stream`). 403 or 415,
/// with a JSON message; nothing runs.
async fn browser_guard(
    hosts: Arc<Vec<String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let text = |name| headers.get(name).and_then(|v: &axum::http::HeaderValue| v.to_str().ok());
    let host = text(header::HOST);
    if let Some(h) = host.filter(|h| !allowed_host(h, &hosts)) {
        return ApiError::new(
            403,
            format!(
                "Host `{h}` is not this server's: use its IP address or localhost, or list the name in [server] http_hosts"
            ),
        )
        .into_response();
    }
    if let Some(origin) = text(header::ORIGIN) {
        let own = host.is_some_and(|h| origin == format!("http://{h}") || origin == format!("https://{h}"));
        if !own {
            return ApiError::new(403, format!("requests from the web page at `{origin}` are refused")).into_response();
        }
    }
    let writes = super::access::writes(request.method());
    let has_body =
        text(header::CONTENT_LENGTH).is_some_and(|l| l != "0") || headers.contains_key(header::TRANSFER_ENCODING);
    let kind = text(header::CONTENT_TYPE).map(|t| t.trim().to_ascii_lowercase()).unwrap_or_default();
    // A restore's archive is bytes; a form cannot send that type without
    // the browser asking first (it is not a CORS "simple" type).
    let archive = request.uri().path() == "/v1/operator/snapshot" && kind.starts_with("application/octet-stream");
    if writes && has_body && !kind.starts_with("application/json") && !archive {
        return ApiError::new(415, "the body must be JSON, sent with `Content-Type: application/json`").into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header (with or without its port) names this server:
/// an IP address, `localhost`, or one of `names`.
fn allowed_host(host: &str, names: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => return v6.split(']').next().is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(host, |(n, _)| n),
    };
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self)).into_response()
    }
}

type Reply<T> = Result<axum::Json<T>, ApiError>;

fn ok<T: Serialize>(v: T) -> Reply<T> {
    Ok(axum::Json(v))
}

/// A JSON body, with errors a person can act on.
pub(crate) fn body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status().as_u16();
        if status == 413 {
            ApiError::new(413, format!("request body over the limit of {BODY_BYTES_MAX} bytes"))
        } else {
            ApiError::new(status, format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not the JSON this endpoint takes: {e}")))
}

fn stale(q: &Q) -> bool {
    q.get("stale").is_some_and(|v| v != "false")
}

async fn health(State(s): Srv) -> Reply<serde_json::Value> {
    let st = s.raft.status();
    ok(serde_json::json!({
        "ok": true,
        "cluster": s.options.cluster,
        "server": s.options.name,
        "id": s.id,
        "leader": st.leader,
    }))
}

/// Any valid token may ask (clients find the leader with it).
async fn leader(State(s): Srv) -> Reply<LeaderView> {
    let st = s.raft.status();
    ok(LeaderView {
        leader: st.leader,
        address: st.leader.and_then(|l| st.peers.get(&l)).map(|a| a.to_string()),
        term: st.term,
        commit: st.commit,
        applied: st.applied,
    })
}

async fn peers(State(s): Srv, Extension(who): Who) -> Reply<Vec<PeerView>> {
    need_somewhere(&who, Capability::Read)?;
    peer_views(&s)
}

async fn raft_peers(State(s): Srv, Extension(who): Who) -> Reply<Vec<PeerView>> {
    need(&who, Capability::Operator, "*")?;
    peer_views(&s)
}

fn peer_views(s: &Inner) -> Reply<Vec<PeerView>> {
    let st = s.raft.status();
    ok(st
        .peers
        .iter()
        .map(|(id, a)| PeerView { id: *id, address: a.to_string(), leader: st.leader == Some(*id) })
        .collect())
}

async fn add_peer(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<WriteReply> {
    need(&who, Capability::Operator, "*")?;
    let req: AddPeer = body(b)?;
    let addr = req
        .address
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{}` is not an address; write IP:PORT", req.address)))?;
    if req.id == 0 {
        return Err(ApiError::bad_request("Raft ids start at 1"));
    }
    ok(s.write(Write::AddPeer { id: req.id, addr }).await?)
}

async fn remove_peer(State(s): Srv, Extension(who): Who, Path(id): Path<u64>) -> Reply<WriteReply> {
    need(&who, Capability::Operator, "*")?;
    let known = s.raft.status().peers.contains_key(&id);
    if !known {
        return Err(ApiError::not_found(format!("server {id} is not a voter (see `hanse operator raft list-peers`)")));
    }
    ok(s.write(Write::RemovePeer(id)).await?)
}

async fn transfer_leader(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<WriteReply> {
    need(&who, Capability::Operator, "*")?;
    let req: TransferLeader = body(b)?;
    if !s.raft.status().peers.contains_key(&req.id) {
        return Err(ApiError::not_found(format!("server {} is not a voter", req.id)));
    }
    ok(s.write(Write::TransferLeader(req.id)).await?)
}

/// `PUT /v1/system/gc`: collects every stopped or finished job (with its
/// allocations and evaluations) and every down node that holds nothing,
/// now, whatever the thresholds; answers what went. Needs `operator`.
async fn system_gc(State(s): Srv, Extension(who): Who) -> Reply<crate::state::GcCounts> {
    need(&who, Capability::Operator, "*")?;
    match s.write(Write::Collect).await? {
        WriteReply::Collected(c) => ok(c),
        other => Err(ApiError::new(500, format!("unexpected reply {other:?}"))),
    }
}

/// The largest archive `PUT /v1/operator/snapshot` takes (it is held in
/// memory while checked and logged).
pub const RESTORE_BYTES_MAX: usize = 1 << 30;
/// The bytes of an archive in one `RestoreChunk` entry: well inside a Raft
/// entry ([`crate::raft::node::ENTRY_BYTES_MAX`]).
pub const RESTORE_CHUNK_BYTES: usize = 1 << 20;

/// A snapshot holds every token's hash and a restore replaces every
/// token: only a management token may take or put one (an `operator`
/// token could otherwise restore an archive naming a management token of
/// its own).
const SNAPSHOTS_NEED_MANAGEMENT: &str =
    "a snapshot holds, and a restore replaces, every token, so only a management token may save or restore one";

/// `GET /v1/operator/snapshot`: the whole state as an archive
/// ([`crate::state::archive`]), `application/octet-stream`, read after
/// a ReadIndex (consistent; `?stale=true` skips it). The state is copied
/// under its lock and encoded outside it, so Raft is held up only for the
/// copy. The archive's index and `x-hanse-index` are those of the last
/// entry the driver had recorded as applied: the state holds every entry
/// up to it. Needs a management token.
async fn snapshot_save(State(s): Srv, Extension(who): Who, q: Q) -> Result<Response, ApiError> {
    need_management(&who, SNAPSHOTS_NEED_MANAGEMENT)?;
    s.read(stale(&q), |_| ()).await?;
    let raft = s.raft.clone();
    let peers: Vec<(u64, std::net::SocketAddr)> = s.raft.status().peers.iter().map(|(k, v)| (*k, *v)).collect();
    let cluster = s.options.cluster.clone();
    // Copying and encoding a large state take a while: off the runtime's threads.
    let (bytes, index) = tokio::task::spawn_blocking(move || {
        let state = raft.read(Clone::clone);
        let (index, term) = state.applied_at();
        let mut out = Vec::new();
        crate::state::archive::write(&state, cluster, index, term, peers, super::unix_ms(), &mut out)
            .map(|_| (out, index))
    })
    .await
    .map_err(|e| ApiError::new(500, format!("writing the snapshot failed: {e}")))?
    .map_err(|e| ApiError::new(500, format!("writing the snapshot failed: {e}")))?;
    let r = ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response();
    Ok(indexed(r, index))
}

/// What `PUT /v1/operator/snapshot` did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RestoreReport {
    /// The archive's own header (the cluster, index and term it was saved at).
    pub archive: crate::state::archive::ArchiveHeader,
    pub bytes: u64,
    pub sha256: String,
    /// What the state holds now.
    pub restored: crate::state::archive::TableCounts,
}

/// `PUT /v1/operator/snapshot[?other_cluster=true]`: replaces the whole
/// state with the archive in the body, through the log (so every server
/// does, and a new leader carries it), once the archive read back whole
/// here: pieces of [`RESTORE_CHUNK_BYTES`], then one `Restore`. The
/// pieces are logged by a task of their own, so a client that goes away
/// does not stop a restore half way; one that could not log every piece
/// ends with the `Restore` anyway, which then drops them. Needs a
/// management token. Errors: 400 for a body that is not a whole archive,
/// 409 for an archive of another cluster without `other_cluster=true`,
/// 413 over [`RESTORE_BYTES_MAX`].
async fn snapshot_restore(
    State(s): Srv,
    Extension(who): Who,
    q: Q,
    b: Result<Bytes, BytesRejection>,
) -> Reply<RestoreReport> {
    need_management(&who, SNAPSHOTS_NEED_MANAGEMENT)?;
    let bytes = b.map_err(|e| match e.status().as_u16() {
        413 => ApiError::new(413, format!("a snapshot over {RESTORE_BYTES_MAX} bytes cannot be restored")),
        status => ApiError::new(status, format!("cannot read the snapshot: {e}")),
    })?;
    let checked = bytes.clone();
    // Read whole, state and all, before anything is logged: a restore
    // that could fail on the servers never starts.
    let summary = tokio::task::spawn_blocking(move || crate::state::archive::read(checked.as_ref()).map(|(s, _)| s))
        .await
        .map_err(|e| ApiError::new(500, format!("checking the snapshot failed: {e}")))?
        .map_err(|e| ApiError::bad_request(format!("not restored: {e}")))?;
    let from = &summary.header.cluster;
    if !from.is_empty() && *from != s.options.cluster && q.get("other_cluster").map(String::as_str) != Some("true") {
        return Err(ApiError::new(
            409,
            format!(
                "not restored: the snapshot was saved from cluster {from}, and this is {}; to restore it here anyway, pass --other-cluster",
                s.options.cluster
            ),
        ));
    }
    let id = getrandom::u64().map_err(|e| ApiError::new(500, format!("no randomness: {e}")))?;
    let server = s.clone();
    let logged = tokio::spawn(async move {
        let mut chunks = 0u32;
        let mut failed = None;
        for piece in bytes.chunks(RESTORE_CHUNK_BYTES) {
            if let Err(e) = server.write(Write::RestoreChunk { id, seq: chunks, bytes: piece.to_vec() }).await {
                failed = Some(e);
                break;
            }
            chunks += 1;
        }
        // Sent even after a failure: a `Restore` short of pieces drops
        // those that were logged.
        let restored = server.write(Write::Restore { id, chunks }).await;
        match failed {
            Some(e) => Err(e),
            None => restored,
        }
    });
    let reply = logged.await.map_err(|e| ApiError::new(500, format!("the restore task failed: {e}")))??;
    match reply {
        WriteReply::Restored(restored) => {
            tracing::warn!(index = summary.header.index, bytes = summary.bytes, "the state was replaced by a restore");
            ok(RestoreReport { archive: summary.header, bytes: summary.bytes, sha256: summary.sha256, restored })
        }
        other => Err(ApiError::new(500, format!("unexpected reply {other:?}"))),
    }
}

/// `GET /v1/operator/audit?since_ms=T&limit=N`: this server's audit
/// trail from unix millisecond T (default: all kept), the latest N (1,000
/// by default, at most 10,000), oldest first.
async fn audit(State(s): Srv, Extension(who): Who, q: Q) -> Reply<Vec<super::audit::AuditRecord>> {
    need(&who, Capability::Operator, "*")?;
    let number = |k: &str, default: u64| match q.get(k) {
        Some(v) => v.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{k} `{v}` is not a number"))),
        None => Ok(default),
    };
    let (since, limit) = (number("since_ms", 0)?, number("limit", 1_000)?);
    let server = s.clone();
    let records = tokio::task::spawn_blocking(move || server.audit.read(since, limit as usize))
        .await
        .map_err(|e| ApiError::new(500, format!("reading the audit trail failed: {e}")))?;
    ok(records)
}

/// Checks a file sent in a request body with `parse` (job specs here,
/// policies in the federation); every problem comes back with its line
/// and column.
pub fn check_submitted<T>(
    source: Option<String>,
    default_name: &str,
    text: String,
    parse: impl Fn(&SourceFile) -> crate::spec::Checked<T>,
) -> Result<T, ApiError> {
    let file = SourceFile::new(source.unwrap_or_else(|| default_name.into()), text);
    let checked = parse(&file);
    checked.value.ok_or_else(|| {
        let errors = checked.diagnostics.iter().filter(|d| d.severity == Severity::Error).count();
        ApiError {
            status: 400,
            message: format!("{} does not check: {errors} error(s)\n{}", file.name, file.render(&checked.diagnostics)),
            diagnostics: file.records(&checked.diagnostics),
        }
    })
}

fn parse(req: JobSubmit) -> Result<crate::model::job::Job, ApiError> {
    check_submitted(req.source, "job.toml", req.spec, parse_job)
}

/// Plans `job` as if it were registered, on a copy of the state taken
/// under the lock and planned outside it, on a blocking thread: a changed
/// spec gets its new version, and unchanged instances stay. Returns the
/// job as registered, its plan and the report.
pub async fn dry_run(server: &Inner, job: Job) -> Result<(Job, Plan, PlanReport), ApiError> {
    // Owned, and moved into the planning thread: a client that goes away
    // does not free the turn of a dry run still running.
    let turn = server
        .dry_runs
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    let config = server.options.scheduler.clone();
    let cluster = server.options.cluster.clone();
    let copy = server.read(false, ClusterState::clone).await?;
    // As the log would refuse it: a name another namespace holds.
    if let Some(old) = copy.job(&job.id).filter(|j| j.namespace != job.namespace) {
        return Err(ApiError::bad_request(format!(
            "a job `{}` exists in namespace `{}`; job names are unique across namespaces",
            job.id, old.namespace
        )));
    }
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut copy = copy;
        copy.upsert_job(job.clone());
        let job = copy.job(&job.id).cloned().unwrap_or(job);
        let plan = schedule(&copy, &job, &config);
        let report = PlanReport::of(&copy, &job, &plan, &cluster, config.seed);
        (job, plan, report)
    })
    .await
    .map_err(|e| ApiError::new(500, format!("planning failed: {e}")))
}

async fn submit(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Response {
    let mut job_named = None;
    let mut answer = async {
        let req: JobSubmit = body(b)?;
        let spec = req.spec.clone();
        let job = parse(req)?;
        job_named = Some(format!("job {}/{}", job.namespace, job.id));
        need(&who, Capability::Submit, &job.namespace)?;
        let id = job.id.to_string();
        job_reply(id, s.write(Write::SubmitJob { job, spec: Some(spec) }).await?)
    }
    .await
    .into_response();
    if let Some(o) = job_named {
        answer.extensions_mut().insert(super::access::AuditObject(o));
    }
    answer
}

async fn plan(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<PlanReport> {
    let job = parse(body(b)?)?;
    need(&who, Capability::Submit, &job.namespace)?;
    ok(dry_run(&s, job).await?.2)
}

/// The jobs of the namespaces the caller may read.
/// `GET /v1/jobs`, a page at a time ([`page`]); filters: `namespace`,
/// `status` (as `job list` shows it). The next token is a job id.
async fn jobs(State(s): Srv, Extension(who): Who, q: Q) -> Result<Response, ApiError> {
    need_somewhere(&who, Capability::Read)?;
    let per_page = per_page(&q)?;
    let at = block(&s, &q).await?;
    let from = q.get("next_token").cloned().unwrap_or_default();
    let (namespace, status) = (q.get("namespace").cloned(), q.get("status").cloned());
    let (items, next) = s
        .read(stale(&q), move |st| {
            let wanted = st
                .jobs_from(&JobId::new(&from))
                .filter(|j| who.allows(Capability::Read, &j.namespace))
                .filter(|j| namespace.as_deref().is_none_or(|n| *j.namespace == *n))
                .map(|j| JobSummary::of(st, j))
                .filter(|j| status.as_deref().is_none_or(|x| j.status == x));
            page(wanted, per_page, |j| j.id.clone())
        })
        .await?;
    Ok(indexed(paged(items, next), at))
}

/// `GET /v1/jobs/{id}`: the job, its evaluation and allocations; a
/// blocking read with `?index=N` (see [`INDEX`]).
async fn job(State(s): Srv, Extension(who): Who, Path(id): Path<String>, q: Q) -> Result<Response, ApiError> {
    // Nobody who may read nothing waits.
    need_somewhere(&who, Capability::Read)?;
    let at = block(&s, &q).await?;
    let found = s
        .read(stale(&q), |st| {
            let job = st.job(&JobId::new(&id))?;
            if let Err(e) = need(&who, Capability::Read, &job.namespace) {
                return Some(Err(e));
            }
            let mut allocations: Vec<AllocView> = st.allocs_of_job(&job.id).map(|a| AllocView::of(st, a)).collect();
            allocations.sort_by_key(|a| a.id);
            Some(Ok(JobStatus {
                summary: JobSummary::of(st, job),
                eval: st.job_eval(&job.id).map(EvalView::of),
                allocations,
            }))
        })
        .await?;
    let status = found.ok_or_else(|| ApiError::not_found(format!("no job `{id}` (see `hanse job list`)")))??;
    Ok(indexed(axum::Json(status).into_response(), at))
}

async fn stop_job(State(s): Srv, Extension(who): Who, Path(id): Path<String>) -> Reply<JobRegistered> {
    let namespace = job_namespace(&s, &id).await?;
    need(&who, Capability::Stop, &namespace)?;
    let reply = s.write(Write::StopJob(JobId::new(&id))).await?;
    job_reply(id, reply)
}

/// A write that registered a version of job `id`, as `{job, version, eval}`.
fn job_reply(id: String, reply: WriteReply) -> Reply<JobRegistered> {
    match reply {
        WriteReply::Job { version, eval } => ok(JobRegistered { job: id, version, eval: eval.0 }),
        other => Err(ApiError::new(500, format!("unexpected reply {other:?}"))),
    }
}

/// The namespace of job `id`, read on the leader; 404 when there is none.
async fn job_namespace(s: &Inner, id: &str) -> Result<Arc<str>, ApiError> {
    let namespace = s.read(false, |st| st.job(&JobId::new(id)).map(|j| j.namespace.clone())).await?;
    namespace.ok_or_else(|| ApiError::not_found(format!("no job `{id}` (see `hanse job list`)")))
}

/// `POST /v1/jobs/ID/scale` with [`Scale`]: needs `submit` in the job's
/// namespace.
async fn scale_job(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<JobRegistered> {
    let namespace = job_namespace(&s, &id).await?;
    need(&who, Capability::Submit, &namespace)?;
    let req: super::api::Scale = body(b)?;
    let w = Write::ScaleJob { job: JobId::new(&id), namespace, group: req.group.as_str().into(), count: req.count };
    job_reply(id, s.write(w).await?)
}

/// `GET /v1/jobs/ID/versions`: every version kept, newest first, with
/// what changed from the one before. Needs `read` in the job's namespace;
/// the specs themselves (their `env` may hold what a reader should not
/// see) only to a caller who may also `submit` there.
async fn job_versions(State(s): Srv, Extension(who): Who, Path(id): Path<String>) -> Reply<super::api::JobVersions> {
    need_somewhere(&who, Capability::Read)?;
    let found = s
        .read(false, |st| {
            let job = st.job(&JobId::new(&id))?;
            if let Err(e) = need(&who, Capability::Read, &job.namespace) {
                return Some(Err(e));
            }
            let h = st.job_history(&job.id);
            let mut all: Vec<&crate::model::Job> = h.map(|h| h.older.iter().collect()).unwrap_or_default();
            all.push(job);
            let deployment = |v: u64| st.deployment_of(&job.id, v).map(|d| d.status.to_string());
            let stable = |v: u64| h.is_some_and(|h| h.stable.contains(&v));
            let specs = who.allows(Capability::Submit, &job.namespace);
            let mut versions: Vec<super::api::JobVersionView> = all
                .iter()
                .enumerate()
                .map(|(i, j)| super::api::JobVersionView {
                    version: j.version,
                    current: j.version == job.version,
                    stable: stable(j.version),
                    deployment: deployment(j.version),
                    changes: i.checked_sub(1).map(|p| super::api::job_changes(all[p], j)).unwrap_or_default(),
                    submitted: st.submitted(&job.id, j.version).filter(|_| specs).map(str::to_string),
                    spec: specs.then(|| (*j).clone()),
                })
                .collect();
            versions.reverse();
            Some(Ok(super::api::JobVersions { job: id.clone(), versions }))
        })
        .await?;
    ok(found.ok_or_else(|| ApiError::not_found(format!("no job `{id}` (see `hanse job list`)")))??)
}

/// `POST /v1/jobs/ID/revert` with [`super::api::Revert`]: registers that
/// version again, as a new one. Needs `submit` in the job's namespace.
async fn revert_job(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<JobRegistered> {
    let namespace = job_namespace(&s, &id).await?;
    need(&who, Capability::Submit, &namespace)?;
    let req: super::api::Revert = body(b)?;
    let reply = s.write(Write::RevertJob { job: JobId::new(&id), namespace, version: req.version }).await?;
    job_reply(id, reply)
}

/// `GET /v1/jobs/ID/deployment[?version=N]`: the job's latest deployment,
/// or that of version N; 404 when there is none. Needs `read` in the
/// job's namespace.
async fn deployment(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    q: Q,
) -> Reply<super::api::DeploymentView> {
    need_somewhere(&who, Capability::Read)?;
    let version: Option<u64> = match q.get("version") {
        Some(v) => Some(v.parse().map_err(|_| ApiError::bad_request(format!("version `{v}` is not a number")))?),
        None => None,
    };
    let found = s
        .read(false, |st| {
            let job = st.job(&JobId::new(&id))?;
            if let Err(e) = need(&who, Capability::Read, &job.namespace) {
                return Some(Err(e));
            }
            let d = match version {
                None => st.latest_deployment(&job.id),
                Some(v) => st.deployment_of(&job.id, v),
            };
            Some(Ok(d.map(|d| super::api::DeploymentView::of(st, d))))
        })
        .await?;
    let found = found.ok_or_else(|| ApiError::not_found(format!("no job `{id}` (see `hanse job list`)")))??;
    ok(found.ok_or_else(|| {
        ApiError::not_found(format!("job `{id}` has had no deployment (only service groups with [group.update] have)"))
    })?)
}

/// `POST /v1/jobs/ID/deployment/promote` with [`super::api::Promote`].
/// Needs `submit` in the job's namespace.
async fn promote(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<super::api::EvalOpened> {
    let namespace = job_namespace(&s, &id).await?;
    need(&who, Capability::Submit, &namespace)?;
    let req: super::api::Promote =
        if matches!(&b, Ok(bytes) if bytes.is_empty()) { Default::default() } else { body(b)? };
    let w = Write::PromoteDeployment { job: JobId::new(&id), namespace, group: req.group.map(|g| g.as_str().into()) };
    evals_reply(s.write(w).await?)
}

/// `POST /v1/jobs/ID/deployment/fail`: needs `submit` in the job's
/// namespace.
async fn fail_deployment(State(s): Srv, Extension(who): Who, Path(id): Path<String>) -> Reply<super::api::EvalOpened> {
    let namespace = job_namespace(&s, &id).await?;
    need(&who, Capability::Submit, &namespace)?;
    evals_reply(s.write(Write::FailDeployment { job: JobId::new(&id), namespace }).await?)
}

/// A write that opened evaluations, as `{eval}` (its first).
fn evals_reply(reply: WriteReply) -> Reply<super::api::EvalOpened> {
    match reply {
        WriteReply::Evals(evals) => ok(super::api::EvalOpened { eval: evals.first().map(|e| e.0) }),
        other => Err(ApiError::new(500, format!("unexpected reply {other:?}"))),
    }
}

/// An allocation id as a path gives it: `a000042` or `42`; 400 otherwise.
fn alloc_id(id: &str) -> Result<u64, ApiError> {
    id.trim_start_matches('a')
        .parse()
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not an allocation id (a000042 or 42)")))
}

/// `POST /v1/allocations/ID/stop`: needs `stop` in its job's namespace.
async fn stop_alloc(State(s): Srv, Extension(who): Who, Path(id): Path<String>) -> Reply<super::api::AllocStopped> {
    let n = alloc_id(&id)?;
    let namespace = s.read(false, |st| st.alloc(AllocId(n)).map(|a| st.namespace_of(&a.job))).await?;
    let namespace = namespace.ok_or_else(|| ApiError::not_found(format!("no allocation {id}")))?;
    need(&who, Capability::Stop, &namespace)?;
    match s.write(Write::StopAlloc(AllocId(n))).await? {
        WriteReply::Evals(evals) => ok(super::api::AllocStopped { alloc: n, eval: evals.first().map(|e| e.0) }),
        other => Err(ApiError::new(500, format!("unexpected reply {other:?}"))),
    }
}

/// `POST /v1/allocations/ID/restart` with [`super::api::AllocRestart`]:
/// its agent stops its tasks and starts them again in place. Needs
/// `stop` in its job's namespace.
async fn restart_alloc(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<super::api::AllocOpDone> {
    let (n, node) = running_alloc(&s, &who, &id).await?;
    let req: super::api::AllocRestart =
        if matches!(&b, Ok(bytes) if bytes.is_empty()) { Default::default() } else { body(b)? };
    let request = crate::agent::rpc::AgentService::Restart { alloc: AllocId(n), task: req.task };
    ok(super::api::AllocOpDone { alloc: n, done: s.agent_op(&node, request).await? })
}

/// `POST /v1/allocations/ID/signal` with [`super::api::AllocSignal`]: its
/// agent signals its tasks. Needs `stop` in its job's namespace.
async fn signal_alloc(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<super::api::AllocOpDone> {
    let (n, node) = running_alloc(&s, &who, &id).await?;
    let req: super::api::AllocSignal = body(b)?;
    let signal = super::api::parse_signal(&req.signal).map_err(ApiError::bad_request)?;
    let request = crate::agent::rpc::AgentService::Signal { alloc: AllocId(n), task: req.task, signal };
    ok(super::api::AllocOpDone { alloc: n, done: s.agent_op(&node, request).await? })
}

/// Allocation `id` and its node, once the caller may `stop` in its job's
/// namespace; 409 when it does not run (ended, or stopping).
async fn running_alloc(s: &Inner, who: &crate::acl::Caller, id: &str) -> Result<(u64, NodeId), ApiError> {
    let n = alloc_id(id)?;
    let found = s
        .read(false, |st| st.alloc(AllocId(n)).map(|a| (a.clone(), st.namespace_of(&a.job))))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no allocation {id}")))?;
    let (alloc, namespace) = found;
    need(who, Capability::Stop, &namespace)?;
    if !alloc.is_live() {
        return Err(ApiError::new(
            409,
            format!("allocation {id} is {} ({}): nothing runs", alloc.status, alloc.desired),
        ));
    }
    Ok((n, alloc.node.clone()))
}

/// An evaluation; with `?wait=SECONDS`, answered once it is no longer
/// pending (placed, or blocked for lack of capacity) or the wait is over.
async fn evaluation(State(s): Srv, Extension(who): Who, Path(id): Path<u64>, q: Q) -> Reply<EvalView> {
    let namespace = s.read(true, |st| st.eval(EvalId(id)).and_then(|e| st.job(&e.job)).map(|j| j.namespace.clone()));
    match namespace.await? {
        Some(ns) => need(&who, Capability::Read, &ns)?,
        None => need_somewhere(&who, Capability::Read)?,
    }
    let wait = q.get("wait").and_then(|w| w.parse::<f64>().ok()).filter(|w| w.is_finite()).unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs_f64(wait.clamp(0.0, WAIT_MAX.as_secs_f64()));
    let read = |st: &crate::state::ClusterState| st.eval(EvalId(id)).map(EvalView::of);
    let mut status = s.raft.watch_status();
    let mut view = s.read(stale(&q), read).await?;
    while view.as_ref().is_some_and(|v| v.status == "pending") && next_change(&mut status, deadline).await {
        view = s.raft.read(read);
    }
    view.map(axum::Json).ok_or_else(|| {
        ApiError::not_found(format!(
            "no evaluation e{id:06}: a newer evaluation of its job superseded it, or it never existed; \
             see the job's status"
        ))
    })
}

/// `GET /v1/nodes`, a page at a time ([`page`]), by id; filters: `status`
/// (ready, down), `class`. The next token is a node id.
async fn nodes(State(s): Srv, Extension(who): Who, q: Q) -> Result<Response, ApiError> {
    need_somewhere(&who, Capability::Read)?;
    let per_page = per_page(&q)?;
    let at = block(&s, &q).await?;
    let from = q.get("next_token").cloned().unwrap_or_default();
    let (status, class) = (q.get("status").cloned(), q.get("class").cloned());
    let (items, next) = s
        .read(stale(&q), move |st| {
            let mut chosen: Vec<&crate::model::node::Node> = st
                .nodes()
                .iter()
                .filter(|n| n.id.as_str() >= from.as_str())
                .filter(|n| class.as_deref().is_none_or(|c| *n.class == *c))
                .collect();
            chosen.sort_by(|a, b| a.id.cmp(&b.id));
            let mut count: HashMap<&NodeId, u64> = HashMap::new();
            for a in st.allocs().filter(|a| a.holds_resources()) {
                *count.entry(&a.node).or_default() += 1;
            }
            let views = chosen
                .into_iter()
                .map(|n| NodeView::of(st, n, count.get(&n.id).copied().unwrap_or(0)))
                .filter(|n| status.as_deref().is_none_or(|x| n.status == x));
            page(views, per_page, |n| n.id.clone())
        })
        .await?;
    Ok(indexed(paged(items, next), at))
}

async fn node(State(s): Srv, Extension(who): Who, Path(id): Path<String>, q: Q) -> Reply<NodeStatusView> {
    need_somewhere(&who, Capability::Read)?;
    let found = s
        .read(stale(&q), |st| {
            let node = st.node(st.node_idx(&NodeId::new(&id))?);
            // Only the allocations of jobs the caller may read.
            let allocations: Vec<AllocView> = st
                .allocs_on_node(&node.id)
                .filter(|a| a.holds_resources() && readable(st, &who, a))
                .map(|a| AllocView::of(st, a))
                .collect();
            Some(NodeStatusView { node: NodeView::of(st, node, allocations.len() as u64), allocations })
        })
        .await?;
    found.map(axum::Json).ok_or_else(|| ApiError::not_found(format!("no node `{id}` (see `hanse node list`)")))
}

/// The most nodes one batch registration carries.
pub const NODE_BATCH_MAX: usize = 1_000;

/// Checks a node an agent registers, and sets what only the cluster
/// decides: a node registering is ready; eligibility and draining are
/// kept from the cluster's record when it has one (see `Command::UpsertNode`).
pub(crate) fn check_node(node: &mut Node) -> Result<(), ApiError> {
    node.status = crate::model::NodeStatus::Ready;
    node.eligible = true;
    node.draining = false;
    match crate::spec::job::node_id_problem(node.id.as_str()) {
        Some(why) => Err(ApiError::bad_request(why)),
        None => Ok(()),
    }
}

async fn register_node(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<HeartbeatReply> {
    need(&who, Capability::NodeWrite, "*")?;
    let mut node: Node = body(b)?;
    check_node(&mut node)?;
    heartbeat_reply(s.write(Write::RegisterNodes(vec![node])).await?)
}

async fn register_nodes(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<HeartbeatReply> {
    need(&who, Capability::NodeWrite, "*")?;
    let mut nodes: Vec<Node> = body(b)?;
    if nodes.len() > NODE_BATCH_MAX {
        return Err(ApiError::bad_request(format!("{} nodes; send at most {NODE_BATCH_MAX} at once", nodes.len())));
    }
    nodes.iter_mut().try_for_each(check_node)?;
    heartbeat_reply(s.write(Write::RegisterNodes(nodes)).await?)
}

async fn heartbeat(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<HeartbeatReply> {
    need(&who, Capability::NodeWrite, "*")?;
    let req: Heartbeat = body(b)?;
    heartbeat_reply(s.write(Write::Heartbeat(req.nodes.iter().map(NodeId::new).collect())).await?)
}

fn heartbeat_reply(r: WriteReply) -> Reply<HeartbeatReply> {
    match r {
        WriteReply::Heartbeat { ttl_ms, unknown, .. } => {
            ok(HeartbeatReply { ttl_ms, unknown: unknown.iter().map(|n| n.to_string()).collect() })
        }
        other => Err(ApiError::new(500, format!("unexpected reply {other:?}"))),
    }
}

async fn drain(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<WriteReply> {
    need(&who, Capability::NodeWrite, "*")?;
    let req: Drain = match b {
        Ok(bytes) if bytes.is_empty() => Drain { drain: true, deadline_ms: None },
        other => body(other)?,
    };
    let deadline = req.deadline_ms.map(Duration::from_millis);
    ok(s.write(Write::DrainNode { node: NodeId::new(&id), drain: req.drain, deadline }).await?)
}

/// `POST /v1/nodes/ID/eligibility` with [`super::api::Eligibility`]:
/// needs `node-write`.
async fn eligibility(
    State(s): Srv,
    Extension(who): Who,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<WriteReply> {
    need(&who, Capability::NodeWrite, "*")?;
    let req: super::api::Eligibility = body(b)?;
    ok(s.write(Write::NodeEligibility { node: NodeId::new(&id), eligible: req.eligible }).await?)
}

/// Whether `who` may read allocation `a`: its job is here, in a
/// namespace it may read.
fn readable(st: &ClusterState, who: &crate::acl::Caller, a: &crate::model::alloc::Allocation) -> bool {
    st.job(&a.job).is_some_and(|j| who.allows(Capability::Read, &j.namespace))
}

/// The allocations of the jobs the caller may read.
/// `GET /v1/allocations`, a page at a time ([`page`]), by id; filters:
/// `job`, `node`, `status`, `namespace`. The next token is an id.
async fn allocs(State(s): Srv, Extension(who): Who, q: Q) -> Result<Response, ApiError> {
    need_somewhere(&who, Capability::Read)?;
    let per_page = per_page(&q)?;
    let from: u64 = match q.get("next_token") {
        Some(t) => t
            .trim_start_matches('a')
            .parse()
            .map_err(|_| ApiError::bad_request(format!("`{t}` is not a next token")))?,
        None => 0,
    };
    let at = block(&s, &q).await?;
    let job = q.get("job").map(JobId::new);
    let (node, status, namespace) = (q.get("node").cloned(), q.get("status").cloned(), q.get("namespace").cloned());
    let (items, next) = s
        .read(stale(&q), move |st| {
            let readable = |a: &&crate::model::alloc::Allocation| readable(st, &who, a);
            let wanted = |a: &&crate::model::alloc::Allocation| {
                a.id.0 >= from
                    && node.as_deref().is_none_or(|n| a.node.as_str() == n)
                    && status.as_deref().is_none_or(|x| a.status.to_string() == x)
                    && namespace.as_deref().is_none_or(|n| *st.namespace_of(&a.job) == *n)
            };
            match &job {
                Some(j) => {
                    let mut of: Vec<_> = st.allocs_of_job(j).filter(wanted).filter(readable).collect();
                    of.sort_by_key(|a| a.id);
                    page(of.into_iter().map(|a| AllocView::of(st, a)), per_page, |a| a.id.to_string())
                }
                None => page(
                    st.allocs_from(AllocId(from)).filter(wanted).filter(readable).map(|a| AllocView::of(st, a)),
                    per_page,
                    |a| a.id.to_string(),
                ),
            }
        })
        .await?;
    Ok(indexed(paged(items, next), at))
}

/// Blocking reads (Nomad's blocking queries): with `?index=N`, a list or
/// status read waits until this server has applied past log index N (any
/// change to the cluster's state, not only to what the read returns), or
/// `wait` has passed (seconds, or a duration such as `30s`; 60 s unless
/// given, at most [`BLOCK_WAIT_MAX`]). Every such answer carries the log
/// index it was read at in [`INDEX`]: passed back as `index`, the next
/// read returns at the next change instead of polling.
pub const INDEX: &str = "x-hanse-index";
pub const BLOCK_WAIT_MAX: Duration = Duration::from_secs(300);
const BLOCK_WAIT_DEFAULT: Duration = Duration::from_secs(60);

/// Waits as `?index=N&wait=D` asks (see [`INDEX`]); returns the applied
/// index to report, taken before the read so no change after it is missed.
async fn block(s: &Inner, q: &Q) -> Result<u64, ApiError> {
    let Some(text) = q.get("index") else { return Ok(s.raft.status().applied) };
    let index: u64 = text.parse().map_err(|_| ApiError::bad_request(format!("index `{text}` is not a log index")))?;
    let wait = match q.get("wait") {
        None => BLOCK_WAIT_DEFAULT,
        Some(w) => match w.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs.min(1e6)),
            _ => Duration::from_millis(
                crate::spec::parse_duration_ms(w)
                    .map_err(|h| ApiError::bad_request(format!("wait `{w}` is not a duration: {h}")))?,
            ),
        },
    }
    .min(BLOCK_WAIT_MAX);
    // At most BLOCKING_READS_MAX reads wait at once; past that they answer
    // at once, so watchers cannot hold every connection the server has.
    let Some(_waiting) = Waiting::enter() else { return Ok(s.raft.status().applied) };
    let deadline = Instant::now() + wait;
    let mut status = s.raft.watch_status();
    while status.borrow_and_update().applied <= index && next_change(&mut status, deadline).await {}
    Ok(s.raft.status().applied)
}

/// Waits for this server to apply something more, until `deadline`:
/// false once the deadline has passed or the Raft driver is gone (the
/// caller then answers with what there is).
async fn next_change(
    status: &mut tokio::sync::watch::Receiver<crate::raft::node::RaftStatus>,
    deadline: Instant,
) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    !left.is_zero() && matches!(tokio::time::timeout(left, status.changed()).await, Ok(Ok(())))
}

/// Blocking reads waiting at once, in this process.
pub const BLOCKING_READS_MAX: usize = 512;
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One blocking read's place among [`BLOCKING_READS_MAX`], given back on drop.
struct Waiting;

impl Waiting {
    fn enter() -> Option<Waiting> {
        use std::sync::atomic::Ordering::SeqCst;
        WAITING.fetch_update(SeqCst, SeqCst, |n| (n < BLOCKING_READS_MAX).then_some(n + 1)).ok().map(|_| Waiting)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn indexed(mut r: Response, index: u64) -> Response {
    r.headers_mut().insert(INDEX, axum::http::HeaderValue::from(index));
    r
}

/// Items a list answers per page unless `per_page` says otherwise, and the
/// most it may ask for: a list is never one unbounded answer (security
/// review row 19: 21.9 MB for every allocation).
pub const PAGE_DEFAULT: usize = 1_000;
pub const PAGE_MAX: usize = 10_000;
/// The answer header naming where the next page starts (`next_token`);
/// absent on the last page. Nomad's `X-Nomad-NextToken`, likewise.
pub const NEXT_TOKEN: &str = "x-hanse-next-token";

fn per_page(q: &Q) -> Result<usize, ApiError> {
    match q.get("per_page") {
        None => Ok(PAGE_DEFAULT),
        Some(t) => match t.parse::<usize>() {
            Ok(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!("per_page `{t}`: give 1 to {PAGE_MAX}"))),
        },
    }
}

/// The first `per_page` of `items` (in token order), and the token of the
/// one after them, if any.
fn page<T>(items: impl Iterator<Item = T>, per_page: usize, token: impl Fn(&T) -> String) -> (Vec<T>, Option<String>) {
    let mut out: Vec<T> = Vec::with_capacity(per_page.min(1_024));
    for item in items {
        if out.len() == per_page {
            return (out, Some(token(&item)));
        }
        out.push(item);
    }
    (out, None)
}

fn paged<T: Serialize>(items: Vec<T>, next: Option<String>) -> Response {
    let mut r = axum::Json(items).into_response();
    if let Some(t) = next.and_then(|t| axum::http::HeaderValue::from_str(&t).ok()) {
        r.headers_mut().insert(NEXT_TOKEN, t);
    }
    r
}

async fn alloc(State(s): Srv, Extension(who): Who, Path(id): Path<String>, q: Q) -> Reply<AllocView> {
    let n = alloc_id(&id)?;
    let found = s
        .read(stale(&q), |st| {
            let a = st.alloc(AllocId(n))?;
            Some((AllocView::of(st, a), st.namespace_of(&a.job)))
        })
        .await?;
    let (view, namespace) = found.ok_or_else(|| ApiError::not_found(format!("no allocation {id}")))?;
    need(&who, Capability::Read, &namespace)?;
    ok(view)
}

/// `GET /v1/allocations/ID/logs?task=T&stderr=true&offset=N&limit=L`: up
/// to `L` raw bytes (at most [`crate::agent::rpc::LOG_CHUNK_MAX`], the
/// default) from byte `N` of the task's output (`offset=end`: from its
/// end, so `limit=0` asks where the end is). Headers say where the next
/// read starts (`x-hanse-next`), the oldest byte kept (`x-hanse-oldest`;
/// older ones were rotated away), and whether the task is done
/// (`x-hanse-done`).
async fn logs(State(s): Srv, Extension(who): Who, Path(id): Path<String>, q: Q) -> Result<Response, ApiError> {
    let n = alloc_id(&id)?;
    let found = s.read(true, |st| st.alloc(AllocId(n)).map(|a| (a.clone(), st.namespace_of(&a.job)))).await?;
    let (alloc, namespace) = found.ok_or_else(|| ApiError::not_found(format!("no allocation {id}")))?;
    need(&who, Capability::AllocLogs, &namespace)?;
    let task = match q.get("task") {
        Some(t) => t.clone(),
        None => s
            .read(true, |st| {
                st.job(&alloc.job)
                    .and_then(|j| j.group(&alloc.group))
                    .and_then(|g| g.tasks.first())
                    .map(|t| t.name.to_string())
            })
            .await?
            .ok_or_else(|| ApiError::not_found(format!("allocation {id} has no task")))?,
    };
    let offset = match q.get("offset").map(String::as_str) {
        Some("end") => u64::MAX,
        Some(o) => o.parse().map_err(|_| ApiError::bad_request(format!("offset `{o}` is not a number or `end`")))?,
        None => 0,
    };
    let max = match q.get("limit") {
        Some(l) => l.parse::<u64>().map_err(|_| ApiError::bad_request(format!("limit `{l}` is not a number")))?,
        None => crate::agent::rpc::LOG_CHUNK_MAX,
    };
    let stderr = q.get("stderr").is_some_and(|v| v == "true" || v == "1");
    let request = crate::agent::rpc::AgentService::Logs {
        alloc: alloc.id,
        task,
        stderr,
        offset,
        max: max.min(crate::agent::rpc::LOG_CHUNK_MAX),
    };
    let chunk = s.agent_logs(&alloc.node, request).await?;
    Ok((
        [
            ("x-hanse-next", chunk.next.to_string()),
            ("x-hanse-oldest", chunk.oldest.to_string()),
            ("x-hanse-done", chunk.done.to_string()),
            (header::CONTENT_TYPE.as_str(), "application/octet-stream".to_string()),
        ],
        chunk.data,
    )
        .into_response())
}

async fn alloc_status(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<WriteReply> {
    need(&who, Capability::NodeWrite, "*")?;
    let req: AllocUpdates = body(b)?;
    if req.updates.len() > crate::command::ALLOC_STATUS_BATCH_MAX {
        return Err(ApiError::bad_request(format!(
            "{} updates; send at most {} at once",
            req.updates.len(),
            crate::command::ALLOC_STATUS_BATCH_MAX
        )));
    }
    let mut updates = Vec::with_capacity(req.updates.len());
    for u in req.updates {
        let status = AllocStatus::from_word(&u.status).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`{}` is not a status: use one of {}",
                u.status,
                AllocStatus::WORDS.join(", ")
            ))
        })?;
        updates.push(AllocReport::status(AllocId(u.id), status));
    }
    ok(s.write(Write::AllocStatus(updates)).await?)
}

async fn metrics(State(s): Srv, Extension(who): Who) -> Response {
    if let Err(e) = need_somewhere(&who, Capability::Read) {
        return e.into_response();
    }
    let scraped = s.raft.read(|st| Scraped {
        raft: s.raft.status(),
        me: s.id,
        pending: st.pending_evals().count(),
        blocked: st.blocked_evals().count(),
        nodes: st.nodes().len(),
        allocs_live: st.allocs().filter(|a| a.is_live()).count(),
    });
    let text = s.metrics.render(&scraped);
    ([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text).into_response()
}
