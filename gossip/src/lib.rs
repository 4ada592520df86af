//! Federation membership and capacity summaries over chitchat.
//!
//! # Layout
//!
//! - [`summary`]: `ClusterSummary`, what a cluster tells the federation, and `Publisher`, when.
//! - [`keyring`]: the federation keys and their rotation.
//! - [`identity`]: what a server signs with its certificate, and checking it (pure).
//! - [`seal`]: sealing and opening datagrams, with replay protection (pure).
//! - [`net`]: datagram networks: UDP, and an in-memory one for tests.
//! - [`transport`]: chitchat's `Transport`, sealing every datagram.
//! - [`view`]: the federation as one member sees it (pure).
//! - [`member`]: a running member: chitchat, the sealed transport, the view task.
//!
//! This crate knows nothing of scheduling: it carries summaries, it does not
//! act on them.

pub mod identity;
pub mod keyring;
pub mod member;
pub mod net;
pub mod seal;
pub mod summary;
pub mod transport;
pub mod view;

pub use keyring::{Key, KeyError, Keyring, parse_key_id};
pub use member::{Member, MemberConfig, Role};
pub use summary::ClusterSummary;
pub use view::{ClusterEntry, FederationView, Liveness};
