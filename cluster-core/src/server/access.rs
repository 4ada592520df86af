//! Who may call the HTTP API: the token check in front of every route,
//! the capability checks handlers make, and the `/v1/acl/` routes that
//! manage tokens and policies (see [`crate::acl`] for the model).
//!
//! Every request but `GET /v1/health` and `POST /v1/acl/bootstrap` needs a
//! token: none gets 401, one no token has gets 403, both with a JSON
//! message, before any handler runs. Handlers then check the capability
//! their route needs in the namespace of the object it touches; a test
//! calls every route with a token of no capability and expects 403.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};

use super::Inner;
use super::api::ApiError;
use super::rpc::Write;
use crate::acl::{self, AclCommand, Caller, Capability, Policy, Rule, Token};

/// The header a client sends its token's secret in (`Authorization:
/// Bearer SECRET` works too, for tools that only know that one).
pub const TOKEN_HEADER: &str = "x-hanse-token";

/// The caller of a request, as the token check found it.
pub type Who = Extension<Arc<Caller>>;

/// Refuses a request without a known token (401/403, JSON) and hands the
/// [`Caller`] to the handler otherwise. With ACLs disabled every caller
/// may do everything.
pub async fn authenticate(
    server: Arc<Inner>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !writes(request.method()) {
        return check(&server, request, next).await.0;
    }
    // Every write is audited, allowed or denied.
    let time_ms = super::unix_ms();
    let (method, route) = (request.method().to_string(), request.uri().path().to_string());
    let source =
        request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.to_string());
    // Recorded even if the client goes away mid-request (hyper then drops
    // this future): the write may still commit, so it must not go unseen.
    let mut pending = Unfinished(
        server.clone(),
        Some(super::audit::AuditRecord {
            time_ms,
            server: format!("{}/{}", server.options.cluster, server.options.name),
            source,
            accessor: None,
            token: "unknown: the client left before the answer".into(),
            method,
            route,
            object: None,
            status: 499,
            outcome: "abandoned".into(),
            origin: None,
        }),
    );
    let (response, caller) = check(&server, request, next).await;
    if let Some(mut r) = pending.1.take() {
        r.status = response.status().as_u16();
        r.outcome = super::audit::AuditRecord::outcome_of(r.status).into();
        (r.accessor, r.token) = match &caller {
            Some(c) => (c.accessor.clone(), c.name.clone()),
            None => (None, "none or unknown".to_string()),
        };
        r.object = response.extensions().get::<AuditObject>().map(|o| o.0.clone());
        server.audit.record(r);
    }
    response
}

/// A write's audit record, written when dropped unfinished.
struct Unfinished(Arc<Inner>, Option<super::audit::AuditRecord>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(r) = self.1.take() {
            self.0.audit.record(r);
        }
    }
}

/// What a write acted on, when its route does not say: a handler puts it
/// in the response's extensions for the audit trail.
#[derive(Clone, Debug)]
pub struct AuditObject(pub String);

/// The token check; also returns the caller it found.
async fn check(
    server: &Arc<Inner>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> (Response, Option<Arc<Caller>>) {
    let caller = if !server.options.acl.enabled {
        Caller::management("anyone (ACLs are disabled)")
    } else if open_route(request.uri().path()) {
        Caller { accessor: None, name: "anonymous".into(), management: false, rules: Vec::new() }
    } else {
        match secret_of(request.headers()) {
            None => {
                let bootstrapped = server.raft.read(|s| s.acl().bootstrapped());
                let how = if bootstrapped {
                    "send one in the X-Hanse-Token header (the CLI: HANSE_TOKEN or --token)"
                } else {
                    "this cluster has none yet: `hanse acl bootstrap` makes the first"
                };
                let e = ApiError::new(401, format!("this endpoint needs an ACL token; {how}"));
                return (e.into_response(), None);
            }
            Some(secret) => match resolve(server, &secret, writes(request.method())).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    let e = ApiError::new(
                        403,
                        "no token of this cluster has this secret: it was revoked, mistyped, or belongs to \
                         another cluster",
                    );
                    return (e.into_response(), None);
                }
                Err(e) => return (e.into_response(), None),
            },
        }
    };
    let caller = Arc::new(caller);
    request.extensions_mut().insert(caller.clone());
    (next.run(request).await, Some(caller))
}

/// Routes anyone may call: liveness, and the bootstrap that makes the
/// first token (once).
fn open_route(path: &str) -> bool {
    matches!(path, "/v1/health" | "/v1/acl/bootstrap")
}

fn secret_of(headers: &HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v: &axum::http::HeaderValue| v.to_str().ok()).map(str::trim);
    let secret = text(TOKEN_HEADER).or_else(|| {
        let a = text(axum::http::header::AUTHORIZATION.as_str())?;
        a.get(..7).filter(|p| p.eq_ignore_ascii_case("bearer ")).map(|_| &a[7..])
    })?;
    (!secret.is_empty()).then(|| secret.trim().to_string())
}

/// The caller `secret` names. A follower that does not know it yet reads
/// again through the leader (a token created a moment ago). Until the
/// cluster is bootstrapped, the configured initial management secret
/// counts as the token it will become.
///
/// A write on a follower always reads through the leader: a token revoked
/// a moment ago opens no write on a follower that has not applied the
/// revocation yet (writes are forwarded without the caller).
async fn resolve(server: &Inner, secret: &str, write: bool) -> Result<Option<Caller>, ApiError> {
    let leader = server.is_leader();
    let read = |s: &crate::state::ClusterState| (s.acl().resolve(secret), s.acl().bootstrapped());
    let (found, bootstrapped) = if write && !leader { server.read(false, read).await? } else { server.raft.read(read) };
    if found.is_some() {
        return Ok(found);
    }
    let initial = server.options.acl.initial_management.as_deref().map(acl::hash_secret);
    if !bootstrapped && initial.is_some_and(|h| h == acl::hash_secret(secret)) {
        return Ok(Some(Caller::management("initial management")));
    }
    if leader || write {
        return Ok(None);
    }
    server.read(false, |s| s.acl().resolve(secret)).await
}

/// Whether a request may change something (anything but GET and HEAD):
/// what the browser guard and the audit trail look at.
pub(crate) fn writes(method: &axum::http::Method) -> bool {
    !matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD)
}

/// 403 unless `who` holds `capability` in `namespace`.
pub fn need(who: &Caller, capability: Capability, namespace: &str) -> Result<(), ApiError> {
    if who.allows(capability, namespace) {
        return Ok(());
    }
    let scope = if capability.cluster_wide() {
        "(a cluster-wide capability, granted under namespace \"*\")".to_string()
    } else {
        format!("in namespace `{namespace}`")
    };
    Err(ApiError::new(403, format!("{} lacks `{}` {scope}", who.describe(), capability.word())))
}

/// 403 unless `who` holds `capability` in some namespace (node lists,
/// members, cluster status: nothing of one namespace).
pub fn need_somewhere(who: &Caller, capability: Capability) -> Result<(), ApiError> {
    if who.allows_somewhere(capability) {
        return Ok(());
    }
    Err(ApiError::new(403, format!("{} lacks `{}` in every namespace", who.describe(), capability.word())))
}

/// Why the ACL's routes need a management token, for [`need_management`].
const MANAGES_ACL: &str = "only one manages tokens and policies";

/// 403 unless `who` is a management token; `why` tells the caller what
/// needs one.
pub fn need_management(who: &Caller, why: &str) -> Result<(), ApiError> {
    if who.management {
        return Ok(());
    }
    Err(ApiError::new(403, format!("{} is not a management token; {why}", who.describe())))
}

/// `POST /v1/acl/bootstrap` takes an optional secret of the operator's
/// choosing (Nomad's `acl bootstrap FILE`); one is drawn otherwise.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BootstrapRequest {
    #[serde(default)]
    pub secret: Option<String>,
}

/// `POST /v1/acl/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenCreate {
    pub name: String,
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub management: bool,
}

/// A token as lists show it: never its secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    pub accessor: String,
    pub name: String,
    pub policies: Vec<String>,
    pub management: bool,
    /// Unix milliseconds.
    pub created_ms: u64,
}

impl TokenView {
    pub fn of(t: &Token) -> TokenView {
        TokenView {
            accessor: t.accessor.clone(),
            name: t.name.clone(),
            policies: t.policies.clone(),
            management: t.management,
            created_ms: t.created_ms,
        }
    }
}

/// A token just made, with its secret: the only answer that carries one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenSecret {
    #[serde(flatten)]
    pub token: TokenView,
    pub secret: String,
}

/// `PUT /v1/acl/policies/NAME`: the policy file's text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyApply {
    pub policy: String,
    /// The file name, for error messages.
    #[serde(default)]
    pub source: Option<String>,
}

/// A policy as lists show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    pub name: String,
    pub description: String,
    pub rules: Vec<Rule>,
}

type Srv = State<Arc<Inner>>;
type Reply<T> = Result<axum::Json<T>, ApiError>;

/// The `/v1/acl/` routes.
pub fn router() -> Router<Arc<Inner>> {
    Router::new()
        .route("/v1/acl/bootstrap", post(bootstrap))
        .route("/v1/acl/tokens", get(tokens).post(create_token))
        .route("/v1/acl/tokens/{accessor}", get(token).delete(revoke_token))
        .route("/v1/acl/token/self", get(token_self))
        .route("/v1/acl/policies", get(policies))
        .route("/v1/acl/policies/{name}", put(apply_policy).get(policy).delete(delete_policy))
}

/// A body that may be left out: empty reads as the default.
fn optional_body<T: serde::de::DeserializeOwned + Default>(b: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    match b {
        Ok(bytes) if bytes.is_empty() => Ok(T::default()),
        other => super::http::body(other),
    }
}

fn made(secret: String, token: &Token) -> axum::Json<TokenSecret> {
    axum::Json(TokenSecret { token: TokenView::of(token), secret })
}

async fn bootstrap(State(s): Srv, b: Result<Bytes, BytesRejection>) -> Reply<TokenSecret> {
    if !s.options.acl.enabled {
        return Err(ApiError::bad_request("ACLs are disabled in this server's config ([acl] enabled = false)"));
    }
    if s.options.acl.initial_management.is_some() {
        return Err(ApiError::bad_request(
            "this cluster bootstraps with its configured initial management token; ask its operator",
        ));
    }
    // Refused here, not by the log: a refused bootstrap must not cost an
    // entry every server keeps (anyone may call this route).
    if s.read(false, |st| st.acl().bootstrapped()).await? {
        return Err(ApiError::bad_request(acl::BOOTSTRAPPED));
    }
    let req: BootstrapRequest = optional_body(b)?;
    let secret = match req.secret {
        Some(secret) if acl::is_valid_secret(secret.trim()) => secret.trim().to_string(),
        Some(_) => return Err(ApiError::bad_request("a secret is 16 to 128 printable characters without spaces")),
        None => acl::new_secret(),
    };
    let token = Token::new(&secret, "bootstrap management".into(), Vec::new(), true, super::unix_ms());
    s.write(Write::Acl(AclCommand::Bootstrap(token.clone()))).await?;
    tracing::warn!(accessor = %token.accessor, "ACLs bootstrapped: the first management token was handed out");
    Ok(made(secret, &token))
}

async fn tokens(State(s): Srv, Extension(who): Who) -> Reply<Vec<TokenView>> {
    need_management(&who, MANAGES_ACL)?;
    Ok(axum::Json(s.read(false, |st| st.acl().tokens().map(TokenView::of).collect()).await?))
}

async fn create_token(State(s): Srv, Extension(who): Who, b: Result<Bytes, BytesRejection>) -> Reply<TokenSecret> {
    need_management(&who, MANAGES_ACL)?;
    let req: TokenCreate = super::http::body(b)?;
    if req.name.is_empty() || req.name.len() > 256 || req.name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("a token's name is 1 to 256 characters, none of them control characters"));
    }
    if req.policies.len() > acl::LIST_MAX {
        return Err(ApiError::bad_request(format!("at most {} policies per token", acl::LIST_MAX)));
    }
    if req.policies.is_empty() && !req.management {
        return Err(ApiError::bad_request("the token would grant nothing: name a policy (--policy) or --management"));
    }
    let secret = acl::new_secret();
    let token = Token::new(&secret, req.name, req.policies, req.management, super::unix_ms());
    s.write(Write::Acl(AclCommand::UpsertToken(token.clone()))).await?;
    Ok(made(secret, &token))
}

async fn token(State(s): Srv, Extension(who): Who, Path(accessor): Path<String>) -> Reply<TokenView> {
    need_management(&who, MANAGES_ACL)?;
    let found = s.read(false, |st| st.acl().token(&accessor).map(TokenView::of)).await?;
    found.map(axum::Json).ok_or_else(|| ApiError::not_found(format!("unknown token accessor `{accessor}`")))
}

async fn token_self(Extension(who): Who) -> Reply<serde_json::Value> {
    Ok(axum::Json(serde_json::json!({
        "accessor": who.accessor,
        "name": who.name,
        "management": who.management,
        "rules": who.rules,
    })))
}

async fn revoke_token(
    State(s): Srv,
    Extension(who): Who,
    Path(accessor): Path<String>,
) -> Reply<super::rpc::WriteReply> {
    need_management(&who, MANAGES_ACL)?;
    Ok(axum::Json(s.write(Write::Acl(AclCommand::DeleteToken(accessor))).await?))
}

async fn policies(State(s): Srv, Extension(who): Who) -> Reply<Vec<PolicyView>> {
    need_management(&who, MANAGES_ACL)?;
    Ok(axum::Json(s.read(false, |st| st.acl().policies().map(PolicyView::of).collect()).await?))
}

async fn policy(State(s): Srv, Extension(who): Who, Path(name): Path<String>) -> Reply<PolicyView> {
    need_management(&who, MANAGES_ACL)?;
    let found = s.read(false, |st| st.acl().policy(&name).map(PolicyView::of)).await?;
    found.map(axum::Json).ok_or_else(|| ApiError::not_found(format!("unknown policy `{name}`")))
}

impl PolicyView {
    pub fn of(p: &Policy) -> PolicyView {
        PolicyView { name: p.name.clone(), description: p.description.clone(), rules: p.rules.clone() }
    }
}

async fn apply_policy(
    State(s): Srv,
    Extension(who): Who,
    Path(name): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Reply<PolicyView> {
    need_management(&who, MANAGES_ACL)?;
    if !crate::spec::job::is_valid_name(&name) {
        return Err(ApiError::bad_request(format!(
            "invalid policy name `{name}`: use 1 to 64 letters, digits, `-`, `_` or `.`"
        )));
    }
    let req: PolicyApply = super::http::body(b)?;
    let policy = super::http::check_submitted(req.source, "policy.toml", req.policy, |f| acl::parse_policy(f, &name))?;
    s.write(Write::Acl(AclCommand::UpsertPolicy(policy.clone()))).await?;
    Ok(axum::Json(PolicyView::of(&policy)))
}

async fn delete_policy(State(s): Srv, Extension(who): Who, Path(name): Path<String>) -> Reply<super::rpc::WriteReply> {
    need_management(&who, MANAGES_ACL)?;
    Ok(axum::Json(s.write(Write::Acl(AclCommand::DeletePolicy(name))).await?))
}
