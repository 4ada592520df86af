//! Datagram networks the sealed transport runs over: real UDP, or an
//! in-memory network whose links tests can cut, tap and inject into.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

/// The largest datagram either network carries (the UDP payload limit).
pub const DATAGRAM_BYTES_MAX: usize = 65_507;

#[async_trait]
pub trait DatagramNet: Send + Sync + 'static {
    async fn bind(&self, addr: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>>;
}

#[async_trait]
pub trait DatagramSocket: Send + Sync + 'static {
    fn local_addr(&self) -> SocketAddr;
    async fn send_to(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()>;
    /// One receiver at a time.
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
}

/// Real UDP.
pub struct UdpNet;

#[async_trait]
impl DatagramNet for UdpNet {
    async fn bind(&self, addr: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>> {
        let socket = tokio::net::UdpSocket::bind(addr).await?;
        let local = socket.local_addr()?;
        Ok(Arc::new(UdpSock { socket, local }))
    }
}

struct UdpSock {
    socket: tokio::net::UdpSocket,
    local: SocketAddr,
}

#[async_trait]
impl DatagramSocket for UdpSock {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn send_to(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
        self.socket.send_to(bytes, to).await.map(|_| ())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }
}

/// Datagrams queued per in-memory socket before further ones are dropped,
/// as a full UDP receive buffer would.
pub const MEM_QUEUE_MAX: usize = 1_024;

/// A datagram seen on the in-memory network.
#[derive(Clone, Debug)]
pub struct Captured {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// An in-memory datagram network. Cloning shares the network.
#[derive(Clone, Default)]
pub struct MemNet {
    inner: Arc<Mutex<MemInner>>,
}

type Queue = mpsc::Sender<(SocketAddr, Vec<u8>)>;

#[derive(Default)]
struct MemInner {
    sockets: HashMap<SocketAddr, Queue>,
    /// Hosts cut off from everyone.
    isolated: HashSet<IpAddr>,
    tap: Option<mpsc::UnboundedSender<Captured>>,
}

impl MemNet {
    pub fn new() -> MemNet {
        MemNet::default()
    }

    /// Drops every datagram to or from `host` until [`MemNet::heal`].
    pub fn isolate(&self, host: IpAddr) {
        self.inner.lock().expect("mem net lock").isolated.insert(host);
    }

    pub fn heal(&self, host: IpAddr) {
        self.inner.lock().expect("mem net lock").isolated.remove(&host);
    }

    /// Every datagram delivered from now on is copied to the receiver.
    pub fn tap(&self) -> mpsc::UnboundedReceiver<Captured> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.lock().expect("mem net lock").tap = Some(tx);
        rx
    }

    /// Delivers `bytes` to `to` as if `from` had sent them.
    pub fn inject(&self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.deliver(from, to, bytes, false);
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>, tap: bool) {
        let inner = self.inner.lock().expect("mem net lock");
        if inner.isolated.contains(&from.ip()) || inner.isolated.contains(&to.ip()) {
            return;
        }
        if let Some(queue) = inner.sockets.get(&to) {
            if tap {
                if let Some(t) = &inner.tap {
                    let _ = t.send(Captured { from, to, bytes: bytes.clone() });
                }
            }
            // A full queue drops, like a full receive buffer.
            let _ = queue.try_send((from, bytes));
        }
    }
}

#[async_trait]
impl DatagramNet for MemNet {
    async fn bind(&self, mut addr: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>> {
        let mut inner = self.inner.lock().expect("mem net lock");
        if addr.port() == 0 {
            let port = (1024..=u16::MAX)
                .find(|p| !inner.sockets.contains_key(&SocketAddr::new(addr.ip(), *p)))
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free port"))?;
            addr.set_port(port);
        }
        if inner.sockets.contains_key(&addr) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{addr} is bound")));
        }
        let (tx, rx) = mpsc::channel(MEM_QUEUE_MAX);
        inner.sockets.insert(addr, tx);
        Ok(Arc::new(MemSocket { net: self.clone(), local: addr, rx: tokio::sync::Mutex::new(rx) }))
    }
}

struct MemSocket {
    net: MemNet,
    local: SocketAddr,
    rx: tokio::sync::Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
}

impl Drop for MemSocket {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.net.inner.lock() {
            inner.sockets.remove(&self.local);
        }
    }
}

#[async_trait]
impl DatagramSocket for MemSocket {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn send_to(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
        if bytes.len() > DATAGRAM_BYTES_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "datagram too large"));
        }
        self.net.deliver(self.local, to, bytes.to_vec(), true);
        Ok(())
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (from, bytes) = self
            .rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "mem net closed"))?;
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok((n, from))
    }
}
