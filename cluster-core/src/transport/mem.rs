//! An in-memory network with the same contract as QUIC: frames are encoded
//! and limited the same way, callers carry an identity as a certificate
//! would, and servers check roles the same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Handler, Identity, Rpc, Transport, TransportError, encode_frame, frame_len, read_answer, serve_frame};

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

type Server = Arc<dyn Fn(Identity, Vec<u8>) -> BoxFuture<Vec<u8>> + Send + Sync>;

/// Servers by address. Cloning shares the network.
#[derive(Clone, Default)]
pub struct MemNetwork {
    servers: Arc<Mutex<HashMap<SocketAddr, Server>>>,
}

impl MemNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `handler` at `addr` until [`MemNetwork::stop`].
    pub fn serve<R: Rpc>(&self, addr: SocketAddr, handler: Arc<dyn Handler<R>>) {
        let server: Server = Arc::new(move |from, body| {
            let handler = handler.clone();
            Box::pin(async move { serve_frame(&handler, from, &body).await })
        });
        self.servers.lock().expect("mem network lock").insert(addr, server);
    }

    pub fn stop(&self, addr: SocketAddr) {
        self.servers.lock().expect("mem network lock").remove(&addr);
    }

    /// A client that calls as `identity`.
    pub fn client(&self, identity: Identity) -> MemTransport {
        MemTransport { net: self.clone(), identity }
    }
}

pub struct MemTransport {
    net: MemNetwork,
    identity: Identity,
}

#[async_trait]
impl<R: Rpc> Transport<R> for MemTransport {
    async fn call(&self, to: SocketAddr, request: R) -> Result<R::Reply, TransportError> {
        let frame = encode_frame(&request)?;
        let server = self.net.servers.lock().expect("mem network lock").get(&to).cloned();
        let server = server.ok_or(TransportError::Unreachable(to))?;
        let len = frame_len(frame[..4].try_into().expect("4 bytes"))?;
        let answer = server(self.identity.clone(), frame[4..4 + len].to_vec()).await;
        let len = frame_len(answer[..4].try_into().expect("4 bytes"))?;
        read_answer::<R>(to, &answer[4..4 + len])
    }
}
