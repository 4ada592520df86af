//! Carrying typed requests between servers and agents.
//!
//! A request type implements [`Rpc`]: its reply type, and which roles may
//! send it. A [`Transport`] carries one request and its reply over a
//! connection whose peer is known by its certificate ([`tls::Identity`]);
//! a [`Handler`] answers. Frames are a 4-byte length and a codec body; a
//! length over [`FRAME_BYTES_MAX`] is refused before anything is
//! allocated for it. Two transports implement the same contract: QUIC with
//! mutual TLS ([`quic`]) and an in-memory network for tests and simulation
//! ([`mem`]).

pub mod mem;
pub mod quic;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec;
pub use tls::{Identity, Role};

/// The largest frame either side accepts: room for a batch of Raft
/// entries or a snapshot chunk, and a bound on what a peer can make us
/// allocate.
pub const FRAME_BYTES_MAX: usize = 16 << 20;

/// A request, with its reply type and who may send it.
pub trait Rpc: Serialize + DeserializeOwned + Send + Sync + 'static {
    type Reply: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Roles whose certificates may send this request.
    fn allowed(&self) -> &'static [Role];
}

/// Answers requests; `from` is who the caller's certificate says it is.
#[async_trait]
pub trait Handler<R: Rpc>: Send + Sync + 'static {
    async fn handle(&self, from: Identity, request: R) -> R::Reply;
}

#[async_trait]
pub trait Transport<R: Rpc>: Send + Sync + 'static {
    /// Sends `request` to the server at `to` and waits for its reply.
    async fn call(&self, to: SocketAddr, request: R) -> Result<R::Reply, TransportError>;

    /// Like [`Transport::call`], but first shows `check` who answers at
    /// `to`, by the certificate of the very connection the request then
    /// goes over (`None`: the transport cannot tell). When `check` says no,
    /// nothing is sent and the call fails with [`TransportError::Refused`].
    async fn call_checked(
        &self,
        to: SocketAddr,
        request: R,
        check: &IdentityCheck<'_>,
    ) -> Result<R::Reply, TransportError> {
        check(None).map_err(|why| TransportError::Refused(to, why))?;
        self.call(to, request).await
    }
}

/// What a caller accepts as the server it speaks to (see
/// [`Transport::call_checked`]): `Err` carries why not, for people.
pub type IdentityCheck<'a> = dyn Fn(Option<&Identity>) -> Result<(), String> + Send + Sync + 'a;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("nothing answers at {0}")]
    Unreachable(SocketAddr),
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("{0} refused the connection: {1}")]
    Refused(SocketAddr, String),
    #[error("{0}: a {1} may not send this request")]
    Forbidden(SocketAddr, Role),
    #[error("frame of {0} bytes is over the limit of {FRAME_BYTES_MAX}")]
    FrameTooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("{0} did not answer in time")]
    Timeout(SocketAddr),
    #[error("connection to {0} lost: {1}")]
    Closed(SocketAddr, String),
}

/// What a server sends back for one request.
#[derive(Serialize, Deserialize)]
enum Answer<T> {
    Reply(T),
    Forbidden(Role),
    Malformed(String),
}

/// A frame: 4-byte big-endian length, then the codec body.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, TransportError> {
    let body = codec::encode(value);
    if body.len() > FRAME_BYTES_MAX {
        return Err(TransportError::FrameTooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// The body length a frame header announces, refused if over the limit.
pub fn frame_len(header: [u8; 4]) -> Result<usize, TransportError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX { Err(TransportError::FrameTooLarge(len)) } else { Ok(len) }
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, TransportError> {
    codec::decode(body, FRAME_BYTES_MAX).map_err(|e| TransportError::Malformed(e.to_string()))
}

/// The server side of one request, shared by every transport: decode,
/// check the caller's role, handle, encode the answer.
pub(crate) async fn serve_frame<R: Rpc>(handler: &Arc<dyn Handler<R>>, from: Identity, body: &[u8]) -> Vec<u8> {
    let answer: Answer<R::Reply> = match decode_body::<R>(body) {
        Err(e) => Answer::Malformed(e.to_string()),
        Ok(request) if !request.allowed().contains(&from.role) => Answer::Forbidden(from.role),
        Ok(request) => Answer::Reply(handler.handle(from, request).await),
    };
    // A reply too large to frame is a server bug; say so rather than hang.
    encode_frame(&answer).unwrap_or_else(|e| {
        encode_frame(&Answer::<R::Reply>::Malformed(format!("reply not sent: {e}"))).expect("a short answer frames")
    })
}

/// The client side: turn an answer body into the reply or an error.
pub(crate) fn read_answer<R: Rpc>(to: SocketAddr, body: &[u8]) -> Result<R::Reply, TransportError> {
    match decode_body::<Answer<R::Reply>>(body)? {
        Answer::Reply(r) => Ok(r),
        Answer::Forbidden(role) => Err(TransportError::Forbidden(to, role)),
        Answer::Malformed(m) => Err(TransportError::Malformed(m)),
    }
}
