//! QUIC (quinn) with mutual TLS (rustls): one bidirectional stream per
//! request. The server requires a client certificate from the federation's
//! CA and knows its caller by the identity the certificate names.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use tokio::task::JoinHandle;

use super::tls::{self, PemPair, SERVER_NAME, TlsError};
use super::{
    Handler, Identity, IdentityCheck, Rpc, Transport, TransportError, encode_frame, frame_len, read_answer, serve_frame,
};

/// How long a call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection may have in flight.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// A peer silent this long (keep-alives unanswered) is gone: its cached
/// connection closes, and the next call dials again. Short, because a
/// server killed and restarted must be reachable again within an election.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const KEEP_ALIVE: Duration = Duration::from_secs(1);

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into());
    t.max_concurrent_uni_streams(0u8.into());
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("30 s is a valid idle timeout")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    Arc::new(t)
}

/// The identity in the certificate a connection's peer presented.
fn peer_identity(conn: &quinn::Connection) -> Option<Identity> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().and_then(tls::identity_of)
}

/// How much request memory a server holds at once (security review, row
/// 15: 16 streams each announcing a 16 MiB frame and holding its last byte
/// took 256 MiB). A frame's bytes count from its header until it is
/// answered; a frame over budget waits, and after [`BUDGET_WAIT`] is
/// refused unread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameBudget {
    /// Bytes of frames in flight on one connection.
    pub per_connection: usize,
    /// Bytes of frames in flight across every connection.
    pub total: usize,
    /// The largest frame an agent's certificate may send: agents send
    /// heartbeats and batches of reports, never Raft's large frames.
    pub agent_frame: usize,
}

impl Default for FrameBudget {
    fn default() -> Self {
        FrameBudget {
            per_connection: 2 * super::FRAME_BYTES_MAX,
            total: 16 * super::FRAME_BYTES_MAX,
            agent_frame: 4 << 20,
        }
    }
}

/// How long a frame waits for room in its budget.
pub const BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A server: accepts connections and answers each stream with `handler`.
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    task: JoinHandle<()>,
}

impl QuicServer {
    pub fn bind<R: Rpc>(
        addr: SocketAddr,
        ca_pem: &str,
        pair: &PemPair,
        handler: Arc<dyn Handler<R>>,
    ) -> Result<QuicServer, TlsError> {
        QuicServer::bind_with(addr, ca_pem, pair, handler, FrameBudget::default())
    }

    /// [`QuicServer::bind`] with a memory budget of its own.
    pub fn bind_with<R: Rpc>(
        addr: SocketAddr,
        ca_pem: &str,
        pair: &PemPair,
        handler: Arc<dyn Handler<R>>,
        budget: FrameBudget,
    ) -> Result<QuicServer, TlsError> {
        let crypto = QuicServerConfig::try_from(tls::server_config(ca_pem, pair)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport_config());
        let endpoint = quinn::Endpoint::server(config, addr).map_err(|e| TlsError::Io(addr.to_string(), e))?;
        let task = tokio::spawn(accept_loop(endpoint.clone(), handler, budget));
        Ok(QuicServer { endpoint, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("a bound endpoint has an address")
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"server closing");
        self.task.abort();
    }
}

impl Drop for QuicServer {
    fn drop(&mut self) {
        self.close();
    }
}

/// Bytes as semaphore permits (frames are at most [`super::FRAME_BYTES_MAX`]).
fn permits(bytes: usize) -> u32 {
    u32::try_from(bytes.max(1)).unwrap_or(u32::MAX)
}

async fn accept_loop<R: Rpc>(endpoint: quinn::Endpoint, handler: Arc<dyn Handler<R>>, budget: FrameBudget) {
    let total = Arc::new(tokio::sync::Semaphore::new(permits(budget.total) as usize));
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        let total = total.clone();
        tokio::spawn(async move {
            // A refused client certificate ends here: the handshake fails.
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "connection refused");
                    return;
                }
            };
            let Some(from) = peer_identity(&conn) else {
                conn.close(1u32.into(), b"certificate names no Hanse identity");
                return;
            };
            let mine = Arc::new(tokio::sync::Semaphore::new(permits(budget.per_connection) as usize));
            while let Ok((send, recv)) = conn.accept_bi().await {
                let budgets = [mine.clone(), total.clone()];
                tokio::spawn(answer_stream(handler.clone(), from.clone(), send, recv, budgets, budget.agent_frame));
            }
        });
    }
}

async fn answer_stream<R: Rpc>(
    handler: Arc<dyn Handler<R>>,
    from: Identity,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    budgets: [Arc<tokio::sync::Semaphore>; 2],
    agent_frame: usize,
) {
    let mut header = [0u8; 4];
    if recv.read_exact(&mut header).await.is_err() {
        return;
    }
    let refuse = |why: String| encode_frame(&super::Answer::<R::Reply>::Malformed(why)).expect("a short answer frames");
    let answer = match frame_len(header) {
        Ok(len) if from.role == tls::Role::Agent && len > agent_frame => {
            refuse(format!("a frame of {len} bytes is over an agent's limit of {agent_frame}"))
        }
        Ok(len) => {
            // Room in both budgets before a byte of the body is held.
            let [mine, total] = &budgets;
            let room = async {
                let a = mine.clone().acquire_many_owned(permits(len)).await.ok()?;
                let b = total.clone().acquire_many_owned(permits(len)).await.ok()?;
                Some((a, b))
            };
            match tokio::time::timeout(BUDGET_WAIT, room).await {
                Ok(Some(_held)) => {
                    let mut body = vec![0u8; len];
                    if recv.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    serve_frame(&handler, from, &body).await
                }
                _ => refuse(format!("busy: no room for a frame of {len} bytes; try again")),
            }
        }
        // Refused before reading (or allocating) the body.
        Err(e) => encode_frame(&super::Answer::<R::Reply>::Malformed(e.to_string())).expect("a short answer frames"),
    };
    let _ = send.write_all(&answer).await;
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// A client: one connection per server, reused across calls.
pub struct QuicClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    connections: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl QuicClient {
    pub fn new(ca_pem: &str, pair: &PemPair) -> Result<QuicClient, TlsError> {
        Self::with_rustls(tls::client_config(ca_pem, pair)?)
    }

    /// A client from any rustls configuration (tests use one without a
    /// client certificate).
    pub fn with_rustls(rustls_config: rustls::ClientConfig) -> Result<QuicClient, TlsError> {
        let crypto = QuicClientConfig::try_from(rustls_config).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport_config());
        let bind: SocketAddr = (Ipv6Addr::UNSPECIFIED, 0).into();
        let endpoint = quinn::Endpoint::client(bind)
            .or_else(|_| quinn::Endpoint::client((Ipv4Addr::UNSPECIFIED, 0).into()))
            .map_err(|e| TlsError::Io("client endpoint".into(), e))?;
        Ok(QuicClient { endpoint, config, connections: Mutex::new(HashMap::new()) })
    }

    async fn connection(&self, to: SocketAddr) -> Result<quinn::Connection, TransportError> {
        if let Some(c) = self.connections.lock().expect("connections lock").get(&to) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), to, SERVER_NAME)
            .map_err(|e| TransportError::Connect(to, e.to_string()))?;
        let conn = connecting.await.map_err(|e| connection_error(to, e))?;
        self.connections.lock().expect("connections lock").insert(to, conn.clone());
        Ok(conn)
    }

    async fn exchange<R: Rpc>(
        &self,
        to: SocketAddr,
        frame: &[u8],
        check: Option<&IdentityCheck<'_>>,
    ) -> Result<R::Reply, TransportError> {
        let conn = self.connection(to).await?;
        if let Some(check) = check {
            check(peer_identity(&conn).as_ref()).map_err(|why| TransportError::Refused(to, why))?;
        }
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connection_error(to, e))?;
            send.write_all(frame).await.map_err(|e| TransportError::Closed(to, e.to_string()))?;
            send.finish().map_err(|e| TransportError::Closed(to, e.to_string()))?;
            let mut header = [0u8; 4];
            recv.read_exact(&mut header).await.map_err(|e| read_error(to, e))?;
            let mut body = vec![0u8; frame_len(header)?];
            recv.read_exact(&mut body).await.map_err(|e| read_error(to, e))?;
            read_answer::<R>(to, &body)
        }
        .await;
        if matches!(result, Err(TransportError::Closed(..) | TransportError::Refused(..))) {
            self.connections.lock().expect("connections lock").remove(&to);
        }
        result
    }

    fn forget(&self, to: SocketAddr) {
        self.connections.lock().expect("connections lock").remove(&to);
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"client closing");
    }
}

#[async_trait]
impl<R: Rpc> Transport<R> for QuicClient {
    async fn call(&self, to: SocketAddr, request: R) -> Result<R::Reply, TransportError> {
        self.call_on(to, request, None).await
    }

    async fn call_checked(
        &self,
        to: SocketAddr,
        request: R,
        check: &IdentityCheck<'_>,
    ) -> Result<R::Reply, TransportError> {
        self.call_on(to, request, Some(check)).await
    }
}

impl QuicClient {
    async fn call_on<R: Rpc>(
        &self,
        to: SocketAddr,
        request: R,
        check: Option<&IdentityCheck<'_>>,
    ) -> Result<R::Reply, TransportError> {
        let frame = encode_frame(&request)?;
        match tokio::time::timeout(CALL_TIMEOUT, self.exchange::<R>(to, &frame, check)).await {
            Ok(result) => result,
            Err(_) => {
                // A peer that does not answer may have died under a live-
                // looking connection: dial again next time.
                self.forget(to);
                Err(TransportError::Timeout(to))
            }
        }
    }
}

/// TLS refusals arrive as connection errors carrying a crypto alert: under
/// TLS 1.3 a refused client certificate shows on the first use of the
/// connection, not at connect.
fn connection_error(to: SocketAddr, e: quinn::ConnectionError) -> TransportError {
    match e {
        quinn::ConnectionError::TransportError(t)
            if t.code.to_string().contains("crypto") || t.code.to_string().contains("TLS") =>
        {
            TransportError::Refused(to, t.to_string())
        }
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code.to_string().contains("crypto") || c.error_code.to_string().contains("TLS") =>
        {
            TransportError::Refused(to, c.to_string())
        }
        quinn::ConnectionError::TimedOut => TransportError::Timeout(to),
        other => TransportError::Closed(to, other.to_string()),
    }
}

fn read_error(to: SocketAddr, e: quinn::ReadExactError) -> TransportError {
    match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => connection_error(to, c),
        other => TransportError::Closed(to, other.to_string()),
    }
}
