//! A whole cluster in one process, on loopback: N servers with real QUIC
//! (mutual TLS from a CA made on the spot), real redb logs with fsync, and
//! an HTTP API each. For tests, benchmarks and demos; servers can be
//! stopped and started again on the same data and ports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::rpc::ServerRpc;
use super::{Server, ServerOptions, http};
use crate::raft::node::RaftConfig;
use crate::raft::storage::RedbStorage;
use crate::transport::quic::{QuicClient, QuicServer};
use crate::transport::tls::{self, PemPair};
use crate::transport::{Identity, Role, Transport};

pub struct LocalServer {
    pub server: Server,
    quic: QuicServer,
    http_task: tokio::task::JoinHandle<()>,
    /// Routes under `/v1/federation/` added after the server started.
    late: LateRoutes,
}

type LateRoutes = Arc<std::sync::RwLock<Option<axum::Router>>>;

/// Answers `/v1/federation/*` from routes set later, on the listener the
/// server already has: serving them again on a new listener would free the
/// port for a moment, for any other test to take.
fn late_routes(late: LateRoutes) -> axum::Router {
    use axum::response::IntoResponse;
    use tower::ServiceExt;
    let dispatch = move |req: axum::extract::Request| {
        let routes = late.read().expect("late routes").clone();
        async move {
            match routes {
                Some(r) => r.oneshot(req).await.unwrap_or_else(|e| match e {}),
                None => super::api::ApiError::not_found("this server takes no part in a federation").into_response(),
            }
        }
    };
    axum::Router::new().route("/v1/federation/{*rest}", axum::routing::any(dispatch))
}

pub struct LocalCluster {
    pub name: String,
    pub ca: PemPair,
    /// QUIC (Raft) and HTTP addresses by Raft id; kept across restarts.
    pub raft_addrs: BTreeMap<u64, SocketAddr>,
    pub http_addrs: BTreeMap<u64, SocketAddr>,
    pub options: ServerOptions,
    pub raft_tick: Duration,
    dir: PathBuf,
    servers: BTreeMap<u64, LocalServer>,
    /// Servers added by [`LocalCluster::join_server`]: they restart as
    /// joiners, never bootstrapping a configuration of their own.
    joined: std::collections::BTreeSet<u64>,
}

fn free_udp() -> std::io::Result<SocketAddr> {
    std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

fn free_tcp() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

impl LocalCluster {
    /// Starts `servers` servers of cluster `name`, their logs under `dir`.
    pub async fn start(
        name: &str,
        dir: &Path,
        servers: u64,
        options: ServerOptions,
        raft_tick: Duration,
    ) -> anyhow::Result<LocalCluster> {
        Self::start_with_ca(name, dir, servers, options, raft_tick, None).await
    }

    /// As [`LocalCluster::start`], with the federation's CA (clusters that
    /// talk to each other share one); a new one when `None`.
    pub async fn start_with_ca(
        name: &str,
        dir: &Path,
        servers: u64,
        options: ServerOptions,
        raft_tick: Duration,
        ca: Option<PemPair>,
    ) -> anyhow::Result<LocalCluster> {
        Self::start_at(name, dir, servers, options, raft_tick, ca, &[]).await
    }

    /// As [`LocalCluster::start_with_ca`], the servers' HTTP APIs on the
    /// given addresses (free ports for servers past the list's end).
    pub async fn start_at(
        name: &str,
        dir: &Path,
        servers: u64,
        options: ServerOptions,
        raft_tick: Duration,
        ca: Option<PemPair>,
        http: &[SocketAddr],
    ) -> anyhow::Result<LocalCluster> {
        // Free ports are picked before the servers bind them, and tests
        // running side by side may take one in between: pick again (in a
        // fresh directory) when that happens, unless the caller chose.
        let mut attempt = 0;
        loop {
            let here = if attempt == 0 { dir.to_path_buf() } else { dir.join(format!("retry-{attempt}")) };
            match Self::try_start(name, &here, servers, options.clone(), raft_tick, ca.clone(), http).await {
                Err(e) if http.is_empty() && attempt < 4 && addr_in_use(&e) => {
                    tracing::debug!(attempt, "a picked port was taken before it was bound: {e:#}");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_start(
        name: &str,
        dir: &Path,
        servers: u64,
        options: ServerOptions,
        raft_tick: Duration,
        ca: Option<PemPair>,
        http: &[SocketAddr],
    ) -> anyhow::Result<LocalCluster> {
        crate::private::private_dir(dir)?;
        let mut options = options;
        if options.acl.enabled && options.acl.initial_management.is_none() {
            options.acl.initial_management = Some(crate::acl::new_secret());
        }
        let mut raft_addrs = BTreeMap::new();
        let mut http_addrs = BTreeMap::new();
        for id in 1..=servers {
            raft_addrs.insert(id, free_udp()?);
            let addr = match http.get(id as usize - 1) {
                Some(a) => *a,
                None => free_tcp()?,
            };
            http_addrs.insert(id, addr);
        }
        let mut c = LocalCluster {
            name: name.into(),
            ca: match ca {
                Some(ca) => ca,
                None => tls::create_ca("hanse-local", 30)?,
            },
            raft_addrs,
            http_addrs,
            options,
            raft_tick,
            dir: dir.to_path_buf(),
            servers: BTreeMap::new(),
            joined: Default::default(),
        };
        for id in 1..=servers {
            if let Err(e) = c.start_server(id).await {
                c.stop().await;
                return Err(e);
            }
        }
        Ok(c)
    }

    /// Starts server `id` (again) on its data directory and addresses.
    pub async fn start_server(&mut self, id: u64) -> anyhow::Result<()> {
        self.start_server_as(id, self.joined.contains(&id)).await
    }

    /// Starts a new server with an empty disk and adds it as a voter
    /// through the leader (`hanse operator raft add-peer`); returns its
    /// id. It catches up from the leader, by snapshot once the log was
    /// compacted. Errors: no leader, or the membership change failed.
    pub async fn join_server(&mut self) -> anyhow::Result<u64> {
        // Asked first: the new server knows no leader until it is added.
        let leader = self.leader(Duration::from_secs(10)).await.ok_or_else(|| anyhow::anyhow!("no leader"))?;
        let handle = self.servers[&leader].server.raft().clone();
        let id = self.raft_addrs.keys().max().map_or(1, |m| m + 1);
        self.raft_addrs.insert(id, free_udp()?);
        self.http_addrs.insert(id, free_tcp()?);
        let added = match self.start_server_as(id, true).await {
            Ok(()) => {
                handle.add_peer(id, self.raft_addrs[&id]).await.map_err(|e| anyhow::anyhow!("adding server {id}: {e}"))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = added {
            // A server that is not a member would stop the others ever
            // agreeing on a leader here: it goes, with its addresses.
            if self.servers.contains_key(&id) {
                self.stop_server(id).await;
            }
            self.raft_addrs.remove(&id);
            self.http_addrs.remove(&id);
            return Err(e);
        }
        self.joined.insert(id);
        Ok(id)
    }

    async fn start_server_as(&mut self, id: u64, join: bool) -> anyhow::Result<()> {
        let me = Identity::new(&self.name, Role::Server, &format!("s{id}"));
        let pair = tls::issue(&self.ca, &me, 30)?;
        let store = RedbStorage::open(&self.dir.join(format!("s{id}.redb")))?;
        let mut config = RaftConfig::new(id, self.raft_addrs.clone());
        config.tick = self.raft_tick;
        config.join = join;
        let transport: Arc<dyn Transport<ServerRpc>> = Arc::new(QuicClient::new(&self.ca.cert_pem, &pair)?);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let options = ServerOptions {
            name: format!("s{id}"),
            audit_dir: Some(self.dir.join(format!("audit-s{id}"))),
            ..self.options.clone()
        };
        let server = Server::start(config, store, transport, options, &logger)?;
        // A server that cannot bind its addresses stops again, so that its
        // database is free for the next try.
        let serving = async {
            let quic = QuicServer::bind::<ServerRpc>(self.raft_addrs[&id], &self.ca.cert_pem, &pair, server.handler())?;
            let late = LateRoutes::default();
            let tls = match self.options.http_tls {
                true => Some(Arc::new(tls::http_server_config(&pair)?)),
                false => None,
            };
            let (_, http_task) =
                http::serve_with(server.inner.clone(), self.http_addrs[&id], late_routes(late.clone()), tls).await?;
            anyhow::Ok((quic, http_task, late))
        };
        match serving.await {
            Ok((quic, http_task, late)) => {
                self.servers.insert(id, LocalServer { server, quic, http_task, late });
                Ok(())
            }
            Err(e) => {
                server.stop().await;
                Err(e)
            }
        }
    }

    /// Adds the federation's routes (under `/v1/federation/`) to server
    /// `id`'s API, once the federation exists.
    pub fn add_federation_routes(&self, id: u64, routes: axum::Router) -> anyhow::Result<()> {
        let Some(s) = self.servers.get(&id) else { anyhow::bail!("server {id} is not running") };
        *s.late.write().expect("late routes") = Some(routes);
        Ok(())
    }

    /// Stops server `id` as a crash would look to the others: its sockets
    /// close at once and it answers nothing more.
    pub async fn stop_server(&mut self, id: u64) {
        if let Some(s) = self.servers.remove(&id) {
            s.http_task.abort();
            s.quic.close();
            s.server.stop().await;
        }
    }

    pub fn server(&self, id: u64) -> Option<&Server> {
        self.servers.get(&id).map(|s| &s.server)
    }

    pub fn running(&self) -> impl Iterator<Item = u64> + '_ {
        self.servers.keys().copied()
    }

    /// Every server's API as a URL (`https://127.0.0.1:PORT`, or `http://`
    /// when the options turned TLS off), comma-separated (for a client).
    pub fn addresses(&self) -> String {
        self.http_addrs.keys().map(|id| self.url(*id)).collect::<Vec<_>>().join(",")
    }

    /// Server `id`'s API as a URL.
    pub fn url(&self, id: u64) -> String {
        let scheme = if self.options.http_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addrs[&id])
    }

    /// The secret of the cluster's management token (its initial
    /// management secret, drawn at start unless the options named one);
    /// `None` with ACLs disabled.
    pub fn token(&self) -> Option<&str> {
        self.options.acl.initial_management.as_deref().filter(|_| self.options.acl.enabled)
    }

    /// A client of every server's API, with the management token.
    pub fn client(&self) -> super::client::Client {
        self.with_credentials(super::client::Client::new(&self.addresses()))
    }

    fn with_credentials(&self, c: super::client::Client) -> super::client::Client {
        let c = c.with_token(self.token());
        if self.options.http_tls { c.with_ca(&self.ca.cert_pem).expect("the cluster's own CA") } else { c }
    }

    /// A client of server `id`'s API only, with the management token.
    pub fn client_of(&self, id: u64) -> super::client::Client {
        self.with_credentials(super::client::Client::new(&self.url(id)))
    }

    /// The leader every running server agrees on, waiting up to `timeout`.
    pub async fn leader(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let leaders: Vec<Option<u64>> = self.servers.values().map(|s| s.server.raft().status().leader).collect();
            if let Some(Some(l)) = leaders.first() {
                if self.servers.contains_key(l) && leaders.iter().all(|x| *x == Some(*l)) {
                    return Some(*l);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Stops every server and removes the data directory.
    pub async fn stop(self) {
        self.shutdown(true).await;
    }

    /// Stops every server; `remove` removes the data directory too.
    pub async fn shutdown(mut self, remove: bool) {
        let ids: Vec<u64> = self.servers.keys().copied().collect();
        for id in ids {
            self.stop_server(id).await;
        }
        if remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether `e` (or what caused it) is a bind to an address in use.
fn addr_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
            || c.to_string().contains("Address already in use")
    })
}
