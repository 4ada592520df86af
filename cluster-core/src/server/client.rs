//! A blocking client of the HTTP API, for the CLI, tests and benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::api::*;
use super::rpc::WriteReply;

/// The most bytes of one response the client reads (a list of 100,000
/// allocations is about 30 MB of JSON).
const RESPONSE_BYTES_MAX: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{0}")]
    Api(ApiError),
    #[error("cannot reach the Hanse API at {0}: {1} (is a server running there? set --address or HANSE_ADDR)")]
    Connect(String, String),
    /// Reached, but TLS did not agree: the message says what to check.
    #[error("cannot talk to the Hanse API at {0}: {1}")]
    Tls(String, String),
    #[error("unexpected answer from {0}: {1}")]
    Decode(String, String),
}

/// A transport error as the client reports it: a TLS mismatch with what
/// to check, anything else as unreachable.
fn transport_error(base: &str, e: &ureq::Error) -> ClientError {
    let text = e.to_string();
    let tls = text.to_ascii_lowercase().contains("certificate") || matches!(e, ureq::Error::Tls(_));
    if base.starts_with("http://") {
        let why = format!("{text} (if the server serves HTTPS, as it does by default, use https:// and HANSE_CACERT)");
        ClientError::Connect(base.to_string(), why)
    } else if tls {
        let why =
            format!("{text}: is HANSE_CACERT (--ca-cert) the federation CA that signed the server's certificate?");
        ClientError::Tls(base.to_string(), why)
    } else {
        ClientError::Connect(base.to_string(), text)
    }
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api(e) => Some(e.status),
            _ => None,
        }
    }
}

/// The default [`Client::with_timeout`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// A client of one cluster. Given several servers' addresses, it moves on
/// to the next when one cannot be reached.
#[derive(Clone)]
pub struct Client {
    bases: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    agent: ureq::Agent,
    /// The ACL token's secret sent with every request.
    token: Option<Arc<str>>,
    /// The CA the servers' HTTPS is checked against (`None`: the system's).
    tls: Option<ureq::tls::TlsConfig>,
    /// How long one request may take in all.
    timeout: Duration,
}

type HttpResult = Result<ureq::http::Response<ureq::Body>, ureq::Error>;

impl Client {
    /// `addresses` is `HOST:PORT` or a URL (`https://127.0.0.1:4646`), or
    /// several separated by commas. Without a scheme an address is HTTPS:
    /// a token crosses plain HTTP only to an address that says `http://`.
    pub fn new(addresses: &str) -> Client {
        let bases = addresses
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| if a.contains("://") { a.to_string() } else { format!("https://{a}") })
            .map(|a| a.trim_end_matches('/').to_string())
            .collect::<Vec<_>>();
        let agent: ureq::Agent = Self::config(REQUEST_TIMEOUT).build().into();
        Client {
            bases: Arc::new(bases),
            current: Arc::default(),
            agent,
            token: None,
            tls: None,
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same client, trusting only the CA in `ca_pem` for HTTPS (the
    /// federation's, which signed the servers' certificates).
    pub fn with_ca(mut self, ca_pem: &str) -> Result<Client, ClientError> {
        let bad = |e: String| ClientError::Connect(self.address().to_string(), format!("the CA certificate: {e}"));
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(ca_pem.as_bytes())
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM CERTIFICATE in it".into()));
        }
        self.tls =
            Some(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build());
        self.rebuild();
        Ok(self)
    }

    /// The same client, giving up on a request after `limit` in all
    /// (default 90 s; connecting gives up after 3 s or `limit`).
    pub fn with_timeout(mut self, limit: Duration) -> Client {
        self.timeout = limit;
        self.rebuild();
        self
    }

    fn rebuild(&mut self) {
        let config = Self::config(self.timeout);
        self.agent = match &self.tls {
            Some(tls) => config.tls_config(tls.clone()).build().into(),
            None => config.build().into(),
        };
    }

    fn config(timeout: Duration) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3).min(timeout)))
            .timeout_global(Some(timeout))
            // A redirect would carry the token to wherever it points.
            .max_redirects(0)
    }

    /// The same client (its token and CA) for the servers at `addresses`
    /// instead (as [`Client::new`] reads them).
    pub fn at(mut self, addresses: &str) -> Client {
        self.bases = Client::new(addresses).bases;
        self.current = Arc::default();
        self
    }

    /// The same client, sending `secret` as its ACL token (`X-Hanse-Token`).
    pub fn with_token(mut self, secret: Option<&str>) -> Client {
        self.token = secret.map(str::trim).filter(|s| !s.is_empty()).map(Arc::from);
        self
    }

    fn auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => r.header(super::access::TOKEN_HEADER, &**t),
            None => r,
        }
    }

    /// The address in use.
    pub fn address(&self) -> &str {
        self.bases.get(self.current.load(Ordering::Relaxed) % self.bases.len().max(1)).map_or("", String::as_str)
    }

    /// Sends a request to the current server, moving on to the next one
    /// when it cannot be reached.
    fn send(
        &self,
        request: impl Fn(&ureq::Agent, String) -> HttpResult,
        path: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, ClientError> {
        self.send_to(request, path, true)
    }

    /// [`Self::send`]; with `resend` false, a request that may have reached
    /// a server (the connection broke after it was made) is not sent to the
    /// next one: for what must not happen twice.
    fn send_to(
        &self,
        request: impl Fn(&ureq::Agent, String) -> HttpResult,
        path: &str,
        resend: bool,
    ) -> Result<ureq::http::Response<ureq::Body>, ClientError> {
        let mut last = None;
        for _ in 0..self.bases.len().max(1) {
            let base = self.address().to_string();
            match request(&self.agent, format!("{base}{path}")) {
                Ok(r) => return Ok(r),
                Err(e @ ureq::Error::Io(_)) if !resend => return Err(transport_error(&base, &e)),
                Err(e @ (ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound)) => {
                    last = Some(transport_error(&base, &e));
                    self.current.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(transport_error(&base, &e)),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Connect(String::new(), "no address given".into())))
    }

    fn answer<T: DeserializeOwned>(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ClientError>,
    ) -> Result<T, ClientError> {
        let mut r = r?;
        let bytes = self.body(&mut r)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(self.address().to_string(), e.to_string()))
    }

    /// A response's body, or the API error it carries (status 400 and up).
    fn body(&self, r: &mut ureq::http::Response<ureq::Body>) -> Result<Vec<u8>, ClientError> {
        self.body_up_to(r, RESPONSE_BYTES_MAX)
    }

    fn body_up_to(&self, r: &mut ureq::http::Response<ureq::Body>, limit: u64) -> Result<Vec<u8>, ClientError> {
        let status = r.status().as_u16();
        let bytes = r.body_mut().with_config().limit(limit).read_to_vec().map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                ClientError::Decode(self.address().to_string(), format!("the answer is over {limit} bytes"))
            }
            e => ClientError::Connect(self.address().to_string(), format!("the answer was cut off: {e}")),
        })?;
        if status >= 400 {
            let text = String::from_utf8_lossy(&bytes);
            let err = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| ApiError::new(status, text.trim()));
            return Err(ClientError::Api(err));
        }
        Ok(bytes)
    }

    /// Up to `limit` bytes of a task's log from `offset` (`u64::MAX`: from
    /// its end; see `GET /v1/allocations/ID/logs`).
    pub fn logs(
        &self,
        alloc: &str,
        task: Option<&str>,
        stderr: bool,
        offset: u64,
        limit: u64,
    ) -> Result<LogsChunk, ClientError> {
        let from = if offset == u64::MAX { "end".to_string() } else { offset.to_string() };
        let mut path = format!("/v1/allocations/{alloc}/logs?offset={from}&limit={limit}&stderr={stderr}");
        if let Some(t) = task {
            path.push_str(&format!("&task={t}"));
        }
        let mut r = self.send(|a, url| self.auth(a.get(url)).call(), &path)?;
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (next, oldest, done) = (header("x-hanse-next"), header("x-hanse-oldest"), header("x-hanse-done"));
        let data = self.body(&mut r)?;
        let num = |v: Option<String>| v.and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(LogsChunk { data, next: num(next), oldest: num(oldest), done: done.as_deref() == Some("true") })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.answer(self.send(|a, url| self.auth(a.get(url)).call(), path))
    }

    /// Every page of a list (`path` may carry filters and `per_page`):
    /// asks for the largest pages unless told, and follows the next token
    /// until there is none.
    /// Pages are read one after the other, not at one index: an object
    /// that changes meanwhile may show as it was or as it is.
    pub fn get_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ClientError> {
        use super::http::{NEXT_TOKEN, PAGE_MAX};
        let join = if path.contains('?') { '&' } else { '?' };
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // The largest pages, unless the caller chose a size.
            let mut page = match path.contains("per_page=") {
                true => path.to_string(),
                false => format!("{path}{join}per_page={PAGE_MAX}"),
            };
            if let Some(t) = &token {
                page.push_str(&format!("&next_token={}", encode_query(t)));
            }
            let mut r = self.send(|a, url| self.auth(a.get(url)).call(), &page)?;
            let next = r.headers().get(NEXT_TOKEN).and_then(|v| v.to_str().ok()).map(str::to_string);
            let bytes = self.body(&mut r)?;
            let items: Vec<T> = serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Decode(self.address().to_string(), e.to_string()))?;
            all.extend(items);
            match next {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    pub fn put<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, ClientError> {
        self.answer(self.send(|a, url| self.auth(a.put(url)).send_json(body), path))
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, ClientError> {
        self.answer(self.send(|a, url| self.auth(a.post(url)).send_json(body), path))
    }

    /// [`Self::post`] of a request that must not be made twice: one whose
    /// connection broke once made is not sent to the next server.
    pub fn post_once<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, ClientError> {
        self.answer(self.send_to(|a, url| self.auth(a.post(url)).send_json(body), path, false))
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.answer(self.send(|a, url| self.auth(a.delete(url)).call(), path))
    }

    /// The raw bytes of a GET, at most `limit` of them (for snapshots).
    pub fn get_bytes(&self, path: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        let mut r = self.send(|a, url| self.auth(a.get(url)).call(), path)?;
        self.body_up_to(&mut r, limit)
    }

    /// A PUT of raw bytes (`application/octet-stream`), answered in JSON.
    pub fn put_bytes<T: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> Result<T, ClientError> {
        self.answer(
            self.send(
                |a, url| self.auth(a.put(url)).header("content-type", "application/octet-stream").send(bytes),
                path,
            ),
        )
    }

    /// The raw text of a GET (for `/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let mut r = self.send(|a, url| self.auth(a.get(url)).call(), path)?;
        r.body_mut().read_to_string().map_err(|e| ClientError::Connect(self.address().to_string(), e.to_string()))
    }

    pub fn submit(&self, spec: &str, source: &str) -> Result<JobRegistered, ClientError> {
        self.put("/v1/jobs", &JobSubmit { spec: spec.into(), source: Some(source.into()) })
    }

    pub fn plan(&self, spec: &str, source: &str) -> Result<PlanReport, ClientError> {
        self.post("/v1/jobs/plan", &JobSubmit { spec: spec.into(), source: Some(source.into()) })
    }

    pub fn job(&self, id: &str) -> Result<JobStatus, ClientError> {
        self.get(&format!("/v1/jobs/{id}"))
    }

    /// Every job, page by page.
    pub fn jobs(&self) -> Result<Vec<JobSummary>, ClientError> {
        self.get_all("/v1/jobs")
    }

    pub fn stop(&self, id: &str) -> Result<JobRegistered, ClientError> {
        self.delete(&format!("/v1/jobs/{id}"))
    }

    /// `hanse job scale`: group `group` of job `id` wants `count` instances.
    pub fn scale(&self, id: &str, group: &str, count: u32) -> Result<JobRegistered, ClientError> {
        self.post(&format!("/v1/jobs/{id}/scale"), &super::api::Scale { group: group.to_string(), count })
    }

    /// `hanse job history` and `hanse job inspect`: the versions kept,
    /// newest first.
    pub fn versions(&self, id: &str) -> Result<super::api::JobVersions, ClientError> {
        self.get(&format!("/v1/jobs/{id}/versions"))
    }

    /// `hanse job revert`: registers version `version` of job `id` again.
    pub fn revert(&self, id: &str, version: u64) -> Result<JobRegistered, ClientError> {
        self.post(&format!("/v1/jobs/{id}/revert"), &super::api::Revert { version })
    }

    /// `hanse job deployment status`: job `id`'s latest deployment, or
    /// that of `version`.
    pub fn deployment(&self, id: &str, version: Option<u64>) -> Result<super::api::DeploymentView, ClientError> {
        match version {
            Some(v) => self.get(&format!("/v1/jobs/{id}/deployment?version={v}")),
            None => self.get(&format!("/v1/jobs/{id}/deployment")),
        }
    }

    /// `hanse job promote`: promotes the canaries of every group, or of
    /// `group`.
    pub fn promote(&self, id: &str, group: Option<&str>) -> Result<super::api::EvalOpened, ClientError> {
        let req = super::api::Promote { group: group.map(str::to_string) };
        self.post(&format!("/v1/jobs/{id}/deployment/promote"), &req)
    }

    /// `hanse job deployment fail`.
    pub fn fail_deployment(&self, id: &str) -> Result<super::api::EvalOpened, ClientError> {
        self.post(&format!("/v1/jobs/{id}/deployment/fail"), &serde_json::json!({}))
    }

    /// `hanse alloc restart`: allocation `id`'s tasks (or only `task`)
    /// stop and start again in place.
    pub fn restart_alloc(&self, id: &str, task: Option<&str>) -> Result<super::api::AllocOpDone, ClientError> {
        let req = super::api::AllocRestart { task: task.map(str::to_string) };
        self.post_once(&format!("/v1/allocations/{id}/restart"), &req)
    }

    /// `hanse alloc signal`: `signal` to allocation `id`'s tasks (or `task`).
    pub fn signal_alloc(
        &self,
        id: &str,
        task: Option<&str>,
        signal: &str,
    ) -> Result<super::api::AllocOpDone, ClientError> {
        let req = super::api::AllocSignal { task: task.map(str::to_string), signal: signal.to_string() };
        self.post_once(&format!("/v1/allocations/{id}/signal"), &req)
    }

    /// `hanse alloc stop`: stops allocation `id` (`a000042` or `42`); the
    /// job places it again.
    pub fn stop_alloc(&self, id: &str) -> Result<super::api::AllocStopped, ClientError> {
        self.post(&format!("/v1/allocations/{id}/stop"), &serde_json::json!({}))
    }

    /// Waits up to `wait` for the evaluation to leave `pending`.
    pub fn eval(&self, id: u64, wait: Duration) -> Result<EvalView, ClientError> {
        self.get(&format!("/v1/evaluations/{id}?wait={}", wait.as_secs_f64()))
    }

    /// Every node, page by page.
    pub fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        self.get_all("/v1/nodes")
    }

    pub fn node(&self, id: &str) -> Result<NodeStatusView, ClientError> {
        self.get(&format!("/v1/nodes/{id}"))
    }

    pub fn register_node(&self, node: &crate::model::node::Node) -> Result<HeartbeatReply, ClientError> {
        self.put("/v1/nodes", node)
    }

    /// Registers up to 1,000 nodes in one request.
    pub fn register_nodes(&self, nodes: &[crate::model::node::Node]) -> Result<HeartbeatReply, ClientError> {
        self.put("/v1/nodes/batch", &nodes)
    }

    pub fn heartbeat(&self, nodes: &[String]) -> Result<HeartbeatReply, ClientError> {
        self.post("/v1/nodes/heartbeat", &Heartbeat { nodes: nodes.to_vec() })
    }

    /// `hanse node eligibility`: whether `node` takes new work.
    pub fn eligibility(&self, node: &str, eligible: bool) -> Result<WriteReply, ClientError> {
        self.post(&format!("/v1/nodes/{node}/eligibility"), &super::api::Eligibility { eligible })
    }

    pub fn drain(&self, node: &str, drain: bool, deadline: Option<Duration>) -> Result<WriteReply, ClientError> {
        let deadline_ms = deadline.map(|d| d.as_millis() as u64);
        self.post(&format!("/v1/nodes/{node}/drain"), &Drain { drain, deadline_ms })
    }

    /// Every allocation, page by page.
    pub fn allocs(&self) -> Result<Vec<AllocView>, ClientError> {
        self.get_all("/v1/allocations")
    }

    pub fn alloc(&self, id: &str) -> Result<AllocView, ClientError> {
        self.get(&format!("/v1/allocations/{id}"))
    }

    pub fn alloc_status(&self, updates: Vec<AllocUpdate>) -> Result<WriteReply, ClientError> {
        self.post("/v1/allocations/status", &AllocUpdates { updates })
    }

    /// `GET /v1/health`, which needs no token: the server's cluster, name
    /// and Raft id, and the leader it knows (`null`: none yet).
    pub fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/v1/health")
    }

    /// Makes the cluster's first management token (`POST
    /// /v1/acl/bootstrap`), with `secret` or a new one; refused (400) once
    /// the cluster was bootstrapped.
    pub fn bootstrap(&self, secret: Option<&str>) -> Result<super::access::TokenSecret, ClientError> {
        self.post("/v1/acl/bootstrap", &super::access::BootstrapRequest { secret: secret.map(str::to_string) })
    }

    pub fn leader(&self) -> Result<LeaderView, ClientError> {
        self.get("/v1/status/leader")
    }

    pub fn peers(&self) -> Result<Vec<PeerView>, ClientError> {
        self.get("/v1/operator/raft/peers")
    }

    pub fn add_peer(&self, id: u64, address: &str) -> Result<WriteReply, ClientError> {
        self.post("/v1/operator/raft/peers", &AddPeer { id, address: address.into() })
    }

    pub fn remove_peer(&self, id: u64) -> Result<WriteReply, ClientError> {
        self.delete(&format!("/v1/operator/raft/peers/{id}"))
    }

    pub fn transfer_leader(&self, id: u64) -> Result<WriteReply, ClientError> {
        self.post("/v1/operator/raft/transfer-leader", &TransferLeader { id })
    }
}

/// Percent-encodes a query value (ids are plain, but a token is the
/// server's to choose, and a filter the user's).
pub fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
