//! The gossip keyring of a running federation, rotated without restarts.
//!
//! A server starts with the keys of its `[gossip] key_file`, or with the
//! ring its cluster committed if its state holds one. A change (`hanse
//! federation key install|use|remove`, or keys added to the key file and a
//! SIGHUP) is committed to the cluster's log as one record, the whole ring,
//! primary first, by compare-and-swap; every server of the cluster follows
//! the record, so a server that was down, or joins by snapshot, gets the
//! same ring. The record holds the keys themselves: it lives where the rest
//! of the cluster's secrets live (`raft.redb`, 0600); the audit trail and
//! the API name keys by id only.
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
use axum::response::IntoResponse;
use axum::routing::get;
use cluster_core::acl::Capability;
use cluster_core::server::Inner;
use cluster_core::server::access::{AuditObject, Who, need};
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

/// The ring this server's state holds, if a change was ever committed
/// (at start: as of its last snapshot).
pub fn committed(server: &Inner) -> Option<Keyring> {
    let bytes = server.raft.read(|s| s.record(KEYRING_RECORD).map(<[u8]>::to_vec))?;
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Option<Keyring> {
    let stored: Stored = serde_json::from_slice(bytes).ok()?;
    Keyring::from_texts(&stored.keys).ok()
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

    /// Live members that seal with `id`, or do not say what they seal with.
    pub fn sealing_with(&self, id: u32) -> Vec<String> {
        let id = format!("{id:08x}");
        let sealing = |m: &&KeyHolder| m.live && (m.keys.is_empty() || m.keys.first() == Some(&id));
        self.members.iter().filter(sealing).map(KeyHolder::name).collect()
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

/// A server's gossip keyring: the one way it changes, whether the change
/// comes from the API, a SIGHUP or the cluster's log.
pub struct Keys {
    server: Arc<Inner>,
    member: Arc<Member>,
    /// One change at a time from this server.
    changing: tokio::sync::Mutex<()>,
    /// The committed record the member's ring was last set from.
    applied: tokio::sync::Mutex<Option<Vec<u8>>>,
}

impl Keys {
    pub fn new(server: Arc<Inner>, member: Arc<Member>) -> Arc<Keys> {
        Arc::new(Keys { server, member, changing: tokio::sync::Mutex::new(()), applied: tokio::sync::Mutex::new(None) })
    }

    /// Sets the member's ring to the committed one if that changed since
    /// it was last set: always the latest this server has applied.
    async fn sync(&self) {
        let mut applied = self.applied.lock().await;
        let now = self.server.raft.read(|s| s.record(KEYRING_RECORD).map(<[u8]>::to_vec));
        if now.is_none() || now == *applied {
            return;
        }
        match now.as_deref().and_then(parse) {
            Some(ring) => {
                let held = self.member.keyring().read().expect("keyring lock").keys().to_vec();
                if ring.keys() != held.as_slice() {
                    tracing::info!(
                        keys = ring.ids().len(),
                        primary = format!("{:08x}", ring.primary().id()),
                        "gossip keyring set from the cluster's log"
                    );
                    self.member.set_keyring(ring).await;
                }
            }
            None => tracing::error!("the cluster's committed gossip keyring does not parse; the old ring stays"),
        }
        *applied = now;
    }

    /// Keeps the member's ring equal to the cluster's committed one, from
    /// start and on every change. Runs until the server stops.
    pub async fn follow(self: Arc<Self>) {
        let mut status = self.server.raft.watch_status();
        loop {
            self.sync().await;
            if status.changed().await.is_err() {
                return;
            }
        }
    }

    /// Carries out one rotation step on the ring committed now (read
    /// through the leader), checked against what gossip says of every
    /// member, and committed only if nobody changed the ring meanwhile
    /// (else read again, up to 5 times). Returns once this server seals
    /// and opens with the result.
    pub async fn change(&self, req: &KeyChange) -> Result<KeyringView, ApiError> {
        let _one = self.changing.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.server.read(false, |s| s.record(KEYRING_RECORD).map(<[u8]>::to_vec)).await?;
            let ring = match current.as_deref().map(parse) {
                Some(Some(r)) => r,
                Some(None) => return Err(ApiError::new(500, "the cluster's committed gossip keyring does not parse")),
                None => self.member.keyring().read().expect("keyring lock").clone(),
            };
            let next = self.step(ring, req)?;
            let record = serde_json::to_vec(&Stored { keys: next.keys().iter().map(Key::to_text).collect() })
                .expect("a keyring encodes");
            let swap = Write::Swap { holder: KEYRING_RECORD.into(), expect: current, record };
            match self.server.write(swap).await {
                Ok(_) => break,
                Err(e) if e.status == 409 && attempt < 5 => continue,
                Err(e) => return Err(e),
            }
        }
        // A fresh read returns once this server has applied the change.
        self.server.read(false, |_| ()).await?;
        self.sync().await;
        Ok(self.view())
    }

    /// `ring` after the step `req`, or why the step may not be taken.
    fn step(&self, mut ring: Keyring, req: &KeyChange) -> Result<Keyring, ApiError> {
        let refused = |e: KeyError| ApiError::new(409, e.to_string());
        let bad = |e: KeyError| ApiError::bad_request(e.to_string());
        match req.op {
            KeyOp::Install => ring.install(Key::from_text(&req.key).map_err(bad)?).map_err(refused)?,
            KeyOp::Use => {
                let id = gossip::parse_key_id(&req.key).map_err(bad)?;
                ring.use_key(id).map_err(refused)?;
                let lacking = self.view().lacking(id);
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
            }
            KeyOp::Remove => {
                let id = gossip::parse_key_id(&req.key).map_err(bad)?;
                ring.remove(id).map_err(refused)?;
                let sealing = self.view().sealing_with(id);
                if !req.force && !sealing.is_empty() {
                    return Err(ApiError::new(
                        409,
                        format!(
                            "key {id:08x} may still seal what {} send (a server that does not say which keys \
                             it holds counts): use another key on their clusters first, or use --force",
                            sealing.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(ring)
    }

    /// SIGHUP: installs the keys the key file gained since it was last
    /// read (`before`: their ids then). It only installs: which key seals,
    /// and dropping one, are `use` and `remove`, with their checks, so a
    /// key file left behind by a rotation never brings an old key back.
    pub async fn install_new(&self, file: &Keyring, before: &[u32]) -> Result<Vec<u32>, ApiError> {
        let mut installed = Vec::new();
        for key in file.keys().iter().filter(|k| !before.contains(&k.id())) {
            if self.member.keyring().read().expect("keyring lock").get(key.id()) == Some(key) {
                continue;
            }
            let req = KeyChange { op: KeyOp::Install, key: key.to_text(), force: false };
            self.change(&req).await?;
            installed.push(key.id());
        }
        Ok(installed)
    }

    /// This server's keys, and the keys gossip says every member holds.
    pub fn view(&self) -> KeyringView {
        let ring = self.member.keyring().read().expect("keyring lock").clone();
        let from_log = self.server.raft.read(|s| s.record(KEYRING_RECORD).is_some());
        let keys: Vec<String> = ring.ids().iter().map(|id| format!("{id:08x}")).collect();
        let me = (self.member.config().cluster.as_str(), self.member.config().server.as_str());
        let mut members = Vec::new();
        for c in self.member.view().clusters.values() {
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
            cluster: self.server.options.cluster.clone(),
            server: self.server.options.name.clone(),
            keys,
            source: if from_log { "log" } else { "key_file" }.into(),
            members,
        }
    }
}

/// `GET` and `POST /v1/federation/keyring`, for a server that gossips.
/// Both need `federation-admin`.
pub fn router(keys: Arc<Keys>) -> Router {
    Router::new().route("/v1/federation/keyring", get(list).post(change)).with_state(keys)
}

async fn list(State(k): State<Arc<Keys>>, Extension(who): Who) -> Result<axum::Json<KeyringView>, ApiError> {
    need(&who, Capability::FederationAdmin, "*")?;
    Ok(axum::Json(k.view()))
}

async fn change(State(k): State<Arc<Keys>>, Extension(who): Who, body: Bytes) -> axum::response::Response {
    let mut object = None;
    let mut answer = async {
        need(&who, Capability::FederationAdmin, "*")?;
        let req: KeyChange = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not the JSON this endpoint takes: {e}")))?;
        // The audit trail names the step and the key's id, never the key.
        let id = match req.op {
            KeyOp::Install => Key::from_text(&req.key).map(|k| k.id()),
            _ => gossip::parse_key_id(&req.key),
        };
        let step = format!("{:?}", req.op).to_lowercase();
        let force = if req.force { " --force" } else { "" };
        object = Some(match id {
            Ok(id) => format!("gossip key {step} {id:08x}{force}"),
            Err(_) => format!("gossip key {step} (malformed key)"),
        });
        let view = k.change(&req).await?;
        tracing::info!(step, "gossip keyring changed through the API");
        Ok::<_, ApiError>(axum::Json(view))
    }
    .await
    .into_response();
    if let Some(o) = object {
        answer.extensions_mut().insert(AuditObject(o));
    }
    answer
}

/// Registers the member's gossip counters with the server's `/metrics`:
/// `hanse_gossip_datagrams_{sent,received}_total`,
/// `hanse_gossip_datagrams_rejected_total{reason}` (a member that cannot
/// open what it receives: `unknown_key`, `bad_tag`, `clock_skew`, ...),
/// `hanse_gossip_keyring_keys`, `hanse_gossip_peers_clock_skewed`,
/// `hanse_gossip_members_refused_total` and
/// `hanse_gossip_name_conflicts_total`.
pub fn export_metrics(server: &Inner, member: &Arc<Member>) {
    use cluster_core::server::metrics::{Reading, counters};
    let weak = Arc::downgrade(member);
    server.metrics.add_collector(counters(move || {
        let Some(m) = weak.upgrade() else { return Vec::new() };
        let c = m.metrics();
        let rejected = [
            ("unknown_key", &c.rejected_unknown_key),
            ("bad_tag", &c.rejected_bad_tag),
            ("replay", &c.rejected_replay),
            ("clock_skew", &c.rejected_skewed),
            ("misdirected", &c.rejected_misdirected),
            ("malformed", &c.rejected_malformed),
        ]
        .into_iter()
        .map(|(reason, v)| (vec![("reason".to_string(), reason.to_string())], v.load(Ordering::Relaxed)))
        .collect();
        let keys = m.keyring().read().expect("keyring lock").ids().len() as i64;
        vec![
            Reading::Counter {
                name: "gossip_datagrams_sent",
                help: "Sealed gossip datagrams sent",
                value: c.datagrams_sent.load(Ordering::Relaxed),
            },
            Reading::Counter {
                name: "gossip_datagrams_received",
                help: "Gossip datagrams opened",
                value: c.datagrams_received.load(Ordering::Relaxed),
            },
            Reading::Labelled {
                name: "gossip_datagrams_rejected",
                help: "Gossip datagrams that could not be opened, by reason",
                values: rejected,
            },
            Reading::Gauge { name: "gossip_keyring_keys", help: "Keys in this server's gossip keyring", value: keys },
            Reading::Gauge {
                name: "gossip_peers_clock_skewed",
                help: "Peers whose gossip was refused in the last minute because their clock is off by more than \
                       [gossip] max_clock_skew",
                value: c.skewed_peers(gossip::transport::unix_ms()).len() as i64,
            },
            Reading::Counter {
                name: "gossip_members_refused",
                help: "Times a gossip member was refused: an identity or summary its certificate does not back",
                value: m.view().refused_total,
            },
            Reading::Counter {
                name: "gossip_name_conflicts",
                help: "Times a second live member claimed a server name that another holds (refused, not merged)",
                value: m.view().name_conflicts_total,
            },
        ]
    }));
}
