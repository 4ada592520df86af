//! The gossip keyring of a running federation, rotated without restarts.
//!
//! A server starts with the keys of its `[gossip] key_file`. A change
//! (`hanse federation key install|use|remove`, or a SIGHUP after the key
//! file was edited) is committed to the cluster's log as one record, the
//! whole ring, primary first; every server of the cluster follows the
//! record, so a server that was down, or joins by snapshot, gets the same
//! ring. The record holds the keys themselves: it lives where the rest of
//! the cluster's secrets live (`raft.redb`, 0600).
//!
//! Each gossip member publishes the ids of the keys it holds
//! ([`gossip::view::keys::KEYS`]). A rotation is Serf's three steps, each
//! done on every cluster before the next: install the new key, use it,
//! remove the old one. `use` is refused while a live member of the
//! federation does not hold the key yet, and `remove` while one still seals
//! with it, so no step leaves a member unable to open what it receives.
//! Source: Serf's keyring (`serf keys`), the procedure Consul and Nomad
//! document for `operator keyring`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::routing::get;
use cluster_core::acl::Capability;
use cluster_core::server::Inner;
use cluster_core::server::access::{Who, need};
use cluster_core::server::api::ApiError;
use cluster_core::server::rpc::Write;
use gossip::{Key, KeyError, Keyring, Member};
use serde::{Deserialize, Serialize};

/// The record under which a cluster's log holds its gossip keyring: JSON
/// `{"keys": ["<base64 key>", ...]}`, primary first.
pub const KEYRING_RECORD: &str = "gossip/keyring";

#[derive(Serialize, Deserialize)]
struct Stored {
    keys: Vec<String>,
}

/// The ring this cluster committed, if any change was ever committed.
pub fn committed(server: &Inner) -> Option<Keyring> {
    let bytes = server.raft.read(|s| s.record(KEYRING_RECORD).map(<[u8]>::to_vec))?;
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Option<Keyring> {
    let stored: Stored = serde_json::from_slice(bytes).ok()?;
    Keyring::from_texts(&stored.keys).ok()
}

/// Commits `ring` as the cluster's gossip keyring; every server of the
/// cluster seals and opens with it once it applies the entry.
pub async fn commit(server: &Inner, ring: &Keyring) -> Result<(), ApiError> {
    let stored = Stored { keys: ring.keys().iter().map(Key::to_text).collect() };
    let record = serde_json::to_vec(&stored).expect("a keyring encodes");
    server.write(Write::Record { holder: KEYRING_RECORD.into(), record }).await.map(|_| ())
}

/// Keeps `member`'s keyring equal to the cluster's committed one, from
/// start (a server restarted after a rotation) and on every change. Runs
/// until the server stops.
pub async fn follow(server: Arc<Inner>, member: Arc<Member>) {
    let mut status = server.raft.watch_status();
    let mut last: Option<Vec<u8>> = None;
    loop {
        let now = server.raft.read(|s| s.record(KEYRING_RECORD).map(<[u8]>::to_vec));
        if now.is_some() && now != last {
            match now.as_deref().and_then(parse) {
                Some(ring) => {
                    let held = member.keyring().read().expect("keyring lock").ids();
                    if ring.ids() != held {
                        tracing::info!(
                            keys = ring.ids().len(),
                            primary = format!("{:08x}", ring.primary().id()),
                            "gossip keyring changed by the cluster's log"
                        );
                        member.set_keyring(ring).await;
                    }
                }
                None => tracing::error!("the cluster's committed gossip keyring does not parse; the old ring stays"),
            }
            last = now;
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// What `GET /v1/federation/keyring` answers: the keys by id only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyringView {
    pub cluster: String,
    pub server: String,
    /// The ids of the keys this server holds, primary first.
    pub keys: Vec<String>,
    /// Whether the ring comes from the cluster's log (`log`) or, before any
    /// change was committed, from this server's key file (`key_file`).
    pub source: String,
    /// Every server the federation's gossip knows, with the ids of the keys
    /// it says it holds, primary first.
    pub members: Vec<KeyHolder>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyHolder {
    pub cluster: String,
    pub server: String,
    pub live: bool,
    pub keys: Vec<String>,
}

impl KeyringView {
    /// Live members that do not hold `id`.
    pub fn lacking(&self, id: u32) -> Vec<String> {
        let id = format!("{id:08x}");
        self.members.iter().filter(|m| m.live && !m.keys.contains(&id)).map(KeyHolder::name).collect()
    }

    /// Live members that seal with `id`.
    pub fn sealing_with(&self, id: u32) -> Vec<String> {
        let id = format!("{id:08x}");
        self.members.iter().filter(|m| m.live && m.keys.first() == Some(&id)).map(KeyHolder::name).collect()
    }
}

impl KeyHolder {
    pub fn name(&self) -> String {
        format!("{}/{}", self.cluster, self.server)
    }
}

/// A rotation step, the body of `POST /v1/federation/keyring`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyChange {
    pub op: KeyOp,
    /// The key (base64) to install; the key or its id for `use` and `remove`.
    pub key: String,
    /// Skips the check that every live member holds the key (`use`) or no
    /// longer seals with it (`remove`).
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOp {
    Install,
    Use,
    Remove,
}

struct Keys {
    server: Arc<Inner>,
    member: Arc<Member>,
    /// One change at a time from this server: each reads the committed
    /// ring and commits the next.
    changing: tokio::sync::Mutex<()>,
}

/// `GET` and `POST /v1/federation/keyring`, for a server that gossips.
/// Both need `federation-admin`.
pub fn router(server: Arc<Inner>, member: Arc<Member>) -> Router {
    let keys = Arc::new(Keys { server, member, changing: tokio::sync::Mutex::new(()) });
    Router::new().route("/v1/federation/keyring", get(list).post(change)).with_state(keys)
}

fn view(k: &Keys) -> KeyringView {
    let ring = k.member.keyring().read().expect("keyring lock").clone();
    let from_log = k.server.raft.read(|s| s.record(KEYRING_RECORD).is_some());
    let keys: Vec<String> = ring.ids().iter().map(|id| format!("{id:08x}")).collect();
    let me = (k.member.config().cluster.as_str(), k.member.config().server.as_str());
    let mut members = Vec::new();
    for c in k.member.view().clusters.values() {
        for s in c.servers.values() {
            // This server's own entry is its ring now, not gossip's echo of it.
            let mine = (c.cluster.as_str(), s.name.as_str()) == me;
            members.push(KeyHolder {
                cluster: c.cluster.clone(),
                server: s.name.clone(),
                live: s.live,
                keys: if mine { keys.clone() } else { s.keys.clone() },
            });
        }
    }
    KeyringView {
        cluster: k.server.options.cluster.clone(),
        server: k.server.options.name.clone(),
        keys,
        source: if from_log { "log" } else { "key_file" }.into(),
        members,
    }
}

async fn list(State(k): State<Arc<Keys>>, Extension(who): Who) -> Result<axum::Json<KeyringView>, ApiError> {
    need(&who, Capability::FederationAdmin, "*")?;
    Ok(axum::Json(view(&k)))
}

async fn change(
    State(k): State<Arc<Keys>>,
    Extension(who): Who,
    body: Bytes,
) -> Result<axum::Json<KeyringView>, ApiError> {
    need(&who, Capability::FederationAdmin, "*")?;
    let req: KeyChange = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not the JSON this endpoint takes: {e}")))?;
    let _one = k.changing.lock().await;
    let mut ring = committed(&k.server).unwrap_or_else(|| k.member.keyring().read().expect("keyring lock").clone());
    let refused = |e: KeyError| ApiError::new(409, e.to_string());
    match req.op {
        KeyOp::Install => {
            let key = Key::from_text(&req.key).map_err(|e| ApiError::bad_request(e.to_string()))?;
            ring.install(key).map_err(refused)?;
        }
        KeyOp::Use => {
            let id = gossip::parse_key_id(&req.key).map_err(|e| ApiError::bad_request(e.to_string()))?;
            ring.get(id).ok_or(KeyError::Unknown(id)).map_err(refused)?;
            let lacking = view(&k).lacking(id);
            if !req.force && !lacking.is_empty() {
                return Err(ApiError::new(
                    409,
                    format!(
                        "key {id:08x} is not yet held by {}: they could not open what is sealed with it. \
                         Install it on their clusters first (`hanse federation key install`), or use --force",
                        lacking.join(", ")
                    ),
                ));
            }
            ring.use_key(id).map_err(refused)?;
        }
        KeyOp::Remove => {
            let id = gossip::parse_key_id(&req.key).map_err(|e| ApiError::bad_request(e.to_string()))?;
            ring.remove(id).map_err(refused)?;
            let sealing = view(&k).sealing_with(id);
            if !req.force && !sealing.is_empty() {
                return Err(ApiError::new(
                    409,
                    format!(
                        "key {id:08x} still seals what {} send: use another key on their clusters first, or use --force",
                        sealing.join(", ")
                    ),
                ));
            }
        }
    }
    commit(&k.server, &ring).await?;
    // This server follows at once; the others as they apply the entry.
    if k.member.keyring().read().expect("keyring lock").ids() != ring.ids() {
        k.member.set_keyring(ring).await;
    }
    Ok(axum::Json(view(&k)))
}

/// Adds the member's gossip counters to the server's `/metrics`:
/// `hanse_gossip_datagrams_{sent,received}_total`,
/// `hanse_gossip_datagrams_rejected_total{reason}` (a member that cannot
/// open what it receives: `unknown_key`, `bad_tag`, ...) and
/// `hanse_gossip_keyring_keys`.
pub fn export_metrics(server: &Inner, member: &Arc<Member>) {
    let weak = Arc::downgrade(member);
    server.metrics.add_text(move || {
        let Some(m) = weak.upgrade() else { return String::new() };
        let c = m.metrics();
        let mut out = String::new();
        for (name, help, v) in [
            ("gossip_datagrams_sent", "Sealed gossip datagrams sent", &c.datagrams_sent),
            ("gossip_datagrams_received", "Gossip datagrams opened", &c.datagrams_received),
        ] {
            out.push_str(&format!(
                "# HELP hanse_{name} {help}.\n# TYPE hanse_{name} counter\nhanse_{name}_total {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out.push_str("# HELP hanse_gossip_datagrams_rejected Gossip datagrams that could not be opened, by reason.\n");
        out.push_str("# TYPE hanse_gossip_datagrams_rejected counter\n");
        for (reason, v) in [
            ("unknown_key", &c.rejected_unknown_key),
            ("bad_tag", &c.rejected_bad_tag),
            ("replay", &c.rejected_replay),
            ("stale", &c.rejected_stale),
            ("misdirected", &c.rejected_misdirected),
            ("malformed", &c.rejected_malformed),
        ] {
            out.push_str(&format!(
                "hanse_gossip_datagrams_rejected_total{{reason=\"{reason}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        let keys = m.keyring().read().expect("keyring lock").ids().len();
        out.push_str(&format!(
            "# HELP hanse_gossip_keyring_keys Keys in this server's gossip keyring.\n\
             # TYPE hanse_gossip_keyring_keys gauge\nhanse_gossip_keyring_keys {keys}\n"
        ));
        out
    });
}
