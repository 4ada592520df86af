//! Access control for the HTTP API: tokens and the policies they carry,
//! replicated through the cluster's Raft log like every other state.
//!
//! The model is Nomad's ACL system, reduced (see Nomad's "ACL System
//! Fundamentals"): a **token** has a public **accessor** (its name in lists
//! and audit records) and a **secret** (what a client sends, in
//! `X-Hanse-Token` or `Authorization: Bearer`). The state keeps only the
//! secret's SHA-256, so a copy of the log, a snapshot or `raft.redb` holds
//! no usable credential. A token is either a **management** token (every
//! capability) or carries named **policies**; a policy grants
//! [`Capability`]s per namespace. `hanse acl bootstrap` creates the first
//! management token, once per cluster.
//!
//! Agents do not use tokens: they authenticate with their certificates
//! (see `transport::tls`).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::diag::{Diagnostics, SourceFile};
use crate::spec::Checked;
use crate::spec::job::is_valid_name;
use crate::spec::read::{self, Table, keyword};

/// Why a second bootstrap is refused.
pub const BOOTSTRAPPED: &str =
    "ACLs were bootstrapped already; ask a holder of a management token for a token (`hanse acl token create`)";
/// A namespace rule naming this grants its capabilities in every namespace.
pub const ANY_NAMESPACE: &str = "*";
/// The namespace of a job whose spec names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The most tokens and policies a cluster keeps (each).
pub const ACL_OBJECTS_MAX: usize = 10_000;
/// The most policies one token carries, and rules one policy has.
pub const LIST_MAX: usize = 64;

/// What a policy may grant.
///
/// Namespaced: `read` (jobs, allocations, evaluations; and, held in any
/// namespace, nodes, members and cluster status), `submit` (register and
/// plan jobs), `stop` (stop jobs), `alloc-logs` (read tasks' output).
/// Cluster-wide, granted only under namespace `"*"`: `node-write`
/// (register nodes, heartbeat and report for simulated nodes, drain),
/// `operator` (Raft membership and leadership), `federation-admin` (the
/// federation policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    Read,
    Submit,
    Stop,
    AllocLogs,
    NodeWrite,
    Operator,
    FederationAdmin,
}

impl Capability {
    pub const WORDS: &'static [&'static str] =
        &["read", "submit", "stop", "alloc-logs", "node-write", "operator", "federation-admin"];

    pub fn from_word(w: &str) -> Option<Capability> {
        Some(match w {
            "read" => Capability::Read,
            "submit" => Capability::Submit,
            "stop" => Capability::Stop,
            "alloc-logs" => Capability::AllocLogs,
            "node-write" => Capability::NodeWrite,
            "operator" => Capability::Operator,
            "federation-admin" => Capability::FederationAdmin,
            _ => return None,
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Submit => "submit",
            Capability::Stop => "stop",
            Capability::AllocLogs => "alloc-logs",
            Capability::NodeWrite => "node-write",
            Capability::Operator => "operator",
            Capability::FederationAdmin => "federation-admin",
        }
    }

    /// Whether it concerns the whole cluster rather than one namespace.
    pub fn cluster_wide(self) -> bool {
        matches!(self, Capability::NodeWrite | Capability::Operator | Capability::FederationAdmin)
    }
}

/// Capabilities granted in one namespace (or in all: [`ANY_NAMESPACE`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub namespace: String,
    pub capabilities: Vec<Capability>,
}

/// A named set of rules, as `hanse acl policy apply NAME FILE` stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub description: String,
    pub rules: Vec<Rule>,
}

/// A token as the state keeps it: the secret only as its SHA-256 (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub accessor: String,
    pub secret_hash: String,
    pub name: String,
    pub policies: Vec<String>,
    pub management: bool,
    /// Unix milliseconds, set by the server that proposed it.
    pub created_ms: u64,
}

impl Token {
    /// A new token for `secret` (kept only as its hash), with a new
    /// accessor; `created_ms` in Unix milliseconds.
    pub fn new(secret: &str, name: String, policies: Vec<String>, management: bool, created_ms: u64) -> Token {
        Token { accessor: new_secret(), secret_hash: hash_secret(secret), name, policies, management, created_ms }
    }
}

/// A change to the ACL state; each is one Raft command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AclCommand {
    /// The first management token; refused once the cluster was
    /// bootstrapped (even if that token was revoked since).
    Bootstrap(Token),
    /// A new token, or new policies or name for an accessor.
    UpsertToken(Token),
    /// Revokes the token with this accessor.
    DeleteToken(String),
    UpsertPolicy(Policy),
    DeletePolicy(String),
}

/// The ACL part of a cluster's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AclState {
    bootstrapped: bool,
    tokens: BTreeMap<String, Token>,
    policies: BTreeMap<String, Policy>,
    /// Accessor by secret hash; rebuilt, never serialized.
    #[serde(skip)]
    by_secret: HashMap<String, String>,
}

impl AclState {
    pub fn bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    pub fn tokens(&self) -> impl Iterator<Item = &Token> {
        self.tokens.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    pub fn token(&self, accessor: &str) -> Option<&Token> {
        self.tokens.get(accessor)
    }

    /// Applies one command, or says why it changes nothing. Messages
    /// starting with "unknown" mean the object does not exist (404).
    pub fn apply(&mut self, command: &AclCommand) -> Result<(), String> {
        match command {
            AclCommand::Bootstrap(token) => {
                // The same bootstrap again (a retried write) changes nothing.
                if self.bootstrapped && self.tokens.get(&token.accessor) == Some(token) {
                    return Ok(());
                }
                if self.bootstrapped {
                    return Err(BOOTSTRAPPED.into());
                }
                self.insert_token(token.clone())?;
                self.bootstrapped = true;
                Ok(())
            }
            AclCommand::UpsertToken(token) => {
                if let Some(p) = token.policies.iter().find(|p| !self.policies.contains_key(*p)) {
                    return Err(format!("unknown policy `{p}` (see `hanse acl policy list`)"));
                }
                self.insert_token(token.clone())
            }
            AclCommand::DeleteToken(accessor) => match self.tokens.remove(accessor) {
                Some(t) => {
                    self.by_secret.remove(&t.secret_hash);
                    Ok(())
                }
                None => Err(format!("unknown token accessor `{accessor}` (see `hanse acl token list`)")),
            },
            AclCommand::UpsertPolicy(policy) => {
                if !self.policies.contains_key(&policy.name) && self.policies.len() >= ACL_OBJECTS_MAX {
                    return Err(format!("the cluster holds {ACL_OBJECTS_MAX} policies already"));
                }
                self.policies.insert(policy.name.clone(), policy.clone());
                Ok(())
            }
            AclCommand::DeletePolicy(name) => match self.policies.remove(name) {
                Some(_) => Ok(()),
                None => Err(format!("unknown policy `{name}` (see `hanse acl policy list`)")),
            },
        }
    }

    fn insert_token(&mut self, token: Token) -> Result<(), String> {
        if let Some(other) = self.by_secret.get(&token.secret_hash).filter(|a| **a != token.accessor) {
            return Err(format!("another token ({other}) has this secret"));
        }
        if !self.tokens.contains_key(&token.accessor) && self.tokens.len() >= ACL_OBJECTS_MAX {
            return Err(format!("the cluster holds {ACL_OBJECTS_MAX} tokens already; revoke some"));
        }
        if let Some(old) = self.tokens.get(&token.accessor) {
            self.by_secret.remove(&old.secret_hash);
        }
        self.by_secret.insert(token.secret_hash.clone(), token.accessor.clone());
        self.tokens.insert(token.accessor.clone(), token);
        Ok(())
    }

    /// Rebuilds the index after a restore.
    /// Marks the ACL bootstrapped if `was` says it was: a restore of a
    /// backup made before bootstrap must not open bootstrap again.
    pub(crate) fn keep_bootstrapped(&mut self, was: bool) {
        self.bootstrapped |= was;
    }

    /// How many tokens and policies there are.
    pub fn counts(&self) -> (usize, usize) {
        (self.tokens.len(), self.policies.len())
    }

    pub fn reindex(&mut self) {
        self.by_secret = self.tokens.values().map(|t| (t.secret_hash.clone(), t.accessor.clone())).collect();
    }

    /// Who sends `secret`, with the rules of its policies as they are now;
    /// `None` for a secret no token has.
    pub fn resolve(&self, secret: &str) -> Option<Caller> {
        let token = self.tokens.get(self.by_secret.get(&hash_secret(secret))?)?;
        Some(Caller {
            accessor: Some(token.accessor.clone()),
            name: token.name.clone(),
            management: token.management,
            rules: token.policies.iter().filter_map(|p| self.policies.get(p)).flat_map(|p| p.rules.clone()).collect(),
        })
    }
}

/// The sender of one request, as its token says.
#[derive(Clone, Debug)]
pub struct Caller {
    /// `None` when ACLs are disabled, or for the configured initial
    /// management secret before the cluster is bootstrapped.
    pub accessor: Option<String>,
    pub name: String,
    pub management: bool,
    pub rules: Vec<Rule>,
}

impl Caller {
    /// Every capability (ACLs disabled, or a management token).
    pub fn management(name: &str) -> Caller {
        Caller { accessor: None, name: name.into(), management: true, rules: Vec::new() }
    }

    /// Whether it holds `capability` in `namespace`. Cluster-wide
    /// capabilities count only from rules for [`ANY_NAMESPACE`].
    pub fn allows(&self, capability: Capability, namespace: &str) -> bool {
        self.management
            || self.rules.iter().any(|r| {
                let here = r.namespace == ANY_NAMESPACE || (!capability.cluster_wide() && r.namespace == namespace);
                here && r.capabilities.contains(&capability)
            })
    }

    /// Whether it holds `capability` in at least one namespace.
    pub fn allows_somewhere(&self, capability: Capability) -> bool {
        self.management || self.rules.iter().any(|r| r.capabilities.contains(&capability))
    }

    /// How it is named in messages: the token's name and accessor.
    pub fn describe(&self) -> String {
        match &self.accessor {
            Some(a) => format!("token `{}` ({a})", self.name),
            None => self.name.clone(),
        }
    }
}

/// A new random secret or accessor: 128 bits from the OS, written as a
/// UUID (8-4-4-4-12 hex digits).
pub fn new_secret() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source is available");
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// The form a secret is stored and looked up in: SHA-256, hex.
pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.trim().as_bytes()).iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `secret` may be a token's secret: 16 to 128 printable ASCII
/// characters, no spaces (what a header and a shell variable carry).
pub fn is_valid_secret(secret: &str) -> bool {
    (16..=128).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads a policy file: an optional `description` and `[[namespace]]`
/// rules, each a `name` (a namespace, or `"*"` for all) and the
/// `capabilities` it grants; every problem with its line and column.
///
/// ```toml
/// description = "CI deploys to team-a"
/// [[namespace]]
/// name = "team-a"
/// capabilities = ["read", "submit", "stop", "alloc-logs"]
/// ```
pub fn parse_policy(file: &SourceFile, name: &str) -> Checked<Policy> {
    read::checked(file, |top, d| read_policy(top, d, name))
}

fn read_policy(top: &mut Table, d: &mut Diagnostics, name: &str) -> Option<Policy> {
    let description = top.str(d, "description").map(|(s, _)| s.to_string()).unwrap_or_default();
    let mut rules = Vec::new();
    let tables = top.tables(d, "namespace");
    if tables.is_empty() && !top.has("namespace") {
        d.error_hint(0..0, "the policy grants nothing", "add a [[namespace]] with name and capabilities");
    }
    if tables.len() > LIST_MAX {
        d.error(top.span.clone(), format!("{} namespace rules; at most {LIST_MAX}", tables.len()));
    }
    for mut t in tables {
        let ns = t.required_str(d, "name", "\"default\" or \"*\"").and_then(|(n, span)| {
            if n == ANY_NAMESPACE || is_valid_name(n) {
                Some((n.to_string(), span))
            } else {
                d.error_hint(
                    span,
                    format!("invalid namespace `{n}`"),
                    "use \"*\" or 1 to 64 letters, digits, `-`, `_` or `.`",
                );
                None
            }
        });
        let words = t.str_list(d, "capabilities");
        if words.is_none() && !t.has("capabilities") {
            t.missing(d, "capabilities", "[\"read\"]");
        }
        let mut capabilities = Vec::new();
        for w in words.unwrap_or_default() {
            let span = w.1.clone();
            let Some(c) = keyword(d, "capability", w, Capability::WORDS, Capability::from_word) else { continue };
            if c.cluster_wide() && ns.as_ref().is_some_and(|(n, _)| n != ANY_NAMESPACE) {
                d.error_hint(
                    span,
                    format!("`{}` concerns the whole cluster, not one namespace", c.word()),
                    "grant it in a [[namespace]] with name = \"*\"",
                );
                continue;
            }
            if !capabilities.contains(&c) {
                capabilities.push(c);
            }
        }
        t.finish(d);
        if let Some((namespace, _)) = ns {
            rules.push(Rule { namespace, capabilities });
        }
    }
    Some(Policy { name: name.to_string(), description, rules })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(accessor: &str, secret: &str, policies: &[&str]) -> Token {
        Token {
            accessor: accessor.into(),
            secret_hash: hash_secret(secret),
            name: accessor.into(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
            management: false,
            created_ms: 0,
        }
    }

    #[test]
    fn bootstrap_happens_once_and_revoked_secrets_stop_resolving() {
        let mut acl = AclState::default();
        let mut root = token("a1", "secret-one-0000000", &[]);
        root.management = true;
        acl.apply(&AclCommand::Bootstrap(root.clone())).unwrap();
        assert!(acl.apply(&AclCommand::Bootstrap(token("a2", "secret-two-0000000", &[]))).is_err());
        assert!(acl.resolve("secret-one-0000000").is_some_and(|c| c.management));
        acl.apply(&AclCommand::DeleteToken("a1".into())).unwrap();
        assert!(acl.resolve("secret-one-0000000").is_none());
        // Revoking the bootstrap token does not open bootstrap again.
        assert!(acl.apply(&AclCommand::Bootstrap(root)).is_err());
    }

    #[test]
    fn policies_grant_per_namespace_and_cluster_wide_only_under_any() {
        let file = SourceFile::new(
            "p.toml",
            "[[namespace]]\nname = \"team-a\"\ncapabilities = [\"read\", \"submit\"]\n\
             [[namespace]]\nname = \"*\"\ncapabilities = [\"node-write\"]\n",
        );
        let policy = parse_policy(&file, "ci").value.unwrap();
        let mut acl = AclState::default();
        acl.apply(&AclCommand::UpsertPolicy(policy)).unwrap();
        acl.apply(&AclCommand::UpsertToken(token("a1", "ci-secret-000000000", &["ci"]))).unwrap();
        let c = acl.resolve("ci-secret-000000000").unwrap();
        assert!(c.allows(Capability::Submit, "team-a"));
        assert!(!c.allows(Capability::Submit, "default"));
        assert!(!c.allows(Capability::Stop, "team-a"));
        assert!(c.allows(Capability::NodeWrite, "default"));
        assert!(!c.allows(Capability::Operator, "team-a"));
        // Deleting the policy takes its grants from the token at once.
        acl.apply(&AclCommand::DeletePolicy("ci".into())).unwrap();
        assert!(!acl.resolve("ci-secret-000000000").unwrap().allows(Capability::Read, "team-a"));
    }

    #[test]
    fn a_policy_file_with_mistakes_says_where() {
        let file =
            SourceFile::new("p.toml", "[[namespace]]\nname = \"team-a\"\ncapabilities = [\"reed\", \"operator\"]\n");
        let checked = parse_policy(&file, "x");
        assert!(checked.value.is_none());
        let text = file.render(&checked.diagnostics);
        assert!(text.contains("did you mean `read`"), "{text}");
        assert!(text.contains("`operator` concerns the whole cluster"), "{text}");
        assert!(text.contains("p.toml:3:"), "{text}");
    }

    #[test]
    fn unknown_policies_are_refused_and_the_index_survives_a_restore() {
        let mut acl = AclState::default();
        assert!(acl.apply(&AclCommand::UpsertToken(token("a1", "s-000000000000000", &["nope"]))).is_err());
        acl.apply(&AclCommand::UpsertToken(token("a1", "s-000000000000000", &[]))).unwrap();
        let bytes = serde_json::to_vec(&acl).unwrap();
        let mut back: AclState = serde_json::from_slice(&bytes).unwrap();
        assert!(back.resolve("s-000000000000000").is_none(), "the index is not serialized");
        back.reindex();
        assert!(back.resolve("s-000000000000000").is_some());
        assert!(!bytes.windows(17).any(|w| w == b"s-000000000000000"), "no secret in the state");
    }
}
