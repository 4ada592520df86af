//! Federation policy files: what a cluster may delegate, to whom, and what
//! it accepts from whom. One file per cluster, read with every problem
//! reported at once (line, column, hint), and warnings for rules that can
//! never matter.
//!
//! ```toml
//! [cluster]
//! name = "eu-west"
//! jurisdictions = ["eu", "gdpr"]
//!
//! [[peer]]
//! cluster = "eu-central"
//! delegate_to = true
//! accept_from = true
//!
//! [overflow]
//! when = ["unplaceable", "utilization > 0.9", "queue_wait > 30s"]
//! max_remote_share = 0.3
//! max_cost_per_cpu_hour = 0.06
//!
//! [inbound]
//! max_share_of_capacity = 0.25
//!
//! [[rule]]
//! match = { data = "eu-pii" }
//! jurisdictions = ["eu"]
//!
//! [retry]
//! backoff = "1s"
//! backoff_max = "30s"
//! breaker_failures = 5
//! breaker_cooldown = "60s"
//! lease = "30s"
//! grace = "10s"
//! ```

use std::collections::{BTreeMap, BTreeSet};

use cluster_core::diag::{Diagnostics, SourceFile, Span};
use cluster_core::model::Job;
use cluster_core::spec::read::{self, Table};
use cluster_core::spec::{Checked, parse_duration_ms};
use cluster_core::transport::tls::valid_label;
use serde::{Deserialize, Serialize};

/// The most peers and rules one policy may name.
pub const PEERS_MAX: usize = 256;
pub const RULES_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub cluster: String,
    /// Where this cluster's nodes are, for work whose rules name places.
    pub jurisdictions: Vec<String>,
    pub peers: BTreeMap<String, Peer>,
    pub overflow: Overflow,
    pub inbound: Inbound,
    /// Every rule whose labels match narrows where the work may run.
    pub rules: Vec<Rule>,
    pub retry: Retry,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub delegate_to: bool,
    pub accept_from: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overflow {
    pub triggers: Vec<Trigger>,
    /// The largest share of one job's instances that may run remotely.
    pub max_remote_share: f64,
    /// Peers pricier than this (per cpu-hour) are not offered work.
    pub max_cost_per_cpu_hour: Option<f64>,
}

impl Overflow {
    /// Whether the overflow of a blocked evaluation may leave now: any
    /// trigger fires. `unplaceable` at once; `utilization > x` while the
    /// cluster's live allocations use more than `x` of its schedulable
    /// cpu (`utilization`, 0 to 1); `queue_wait > d` once the evaluation
    /// has been blocked `d` (`blocked_ms`, as this leader measured it).
    pub fn fires(&self, blocked_ms: u64, utilization: f64) -> bool {
        self.triggers.iter().any(|t| match *t {
            Trigger::Unplaceable => true,
            Trigger::Utilization(x) => utilization > x,
            Trigger::QueueWait(d) => blocked_ms >= d,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Trigger {
    /// Instances no local node can take.
    Unplaceable,
    /// Local cpu use above this share of capacity.
    Utilization(f64),
    /// An evaluation blocked longer than this many milliseconds.
    QueueWait(u64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    /// The largest share of local capacity given to other clusters' work.
    pub max_share_of_capacity: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Job labels that must all be present with these values.
    pub labels: BTreeMap<String, String>,
    /// Where matching work may run.
    pub jurisdictions: Vec<String>,
}

/// The least grace that covers a deposed origin leader, in milliseconds:
/// raft-rs's `check_quorum` steps a leader cut off from its majority down
/// within two election timeouts (1 s each at the servers' 100 ms tick),
/// and it may answer renewals until then; its successor is elected no
/// sooner than one election timeout after the cut, and starts its wait
/// only then.
pub const GRACE_MIN_MS: u64 = 2_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retry {
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// Consecutive failures that open a peer's circuit breaker.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// How long a delegation holds without word from its target.
    pub lease_ms: u64,
    /// How long a target may be dead by gossip before its delegations are
    /// revoked and re-placed.
    pub grace_ms: u64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            backoff_ms: 1_000,
            backoff_max_ms: 30_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 60_000,
            lease_ms: 30_000,
            grace_ms: 10_000,
        }
    }
}

impl Policy {
    /// A policy that delegates nothing and accepts nothing.
    pub fn isolated(cluster: &str) -> Policy {
        Policy {
            cluster: cluster.into(),
            jurisdictions: Vec::new(),
            peers: BTreeMap::new(),
            overflow: Overflow {
                triggers: vec![Trigger::Unplaceable],
                max_remote_share: 0.0,
                max_cost_per_cpu_hour: None,
            },
            inbound: Inbound { max_share_of_capacity: 0.0 },
            rules: Vec::new(),
            retry: Retry::default(),
        }
    }

    /// The peers this policy names that are not among `members` (the
    /// clusters gossip knows), each with the member it most likely meant
    /// (at most two edits away, `us-eats` → `us-east`), by name.
    pub fn unknown_peers(&self, members: &[&str]) -> UnknownPeers {
        (self.peers.keys())
            .filter(|p| !members.contains(&p.as_str()))
            .map(|p| {
                let near = members.iter().map(|m| (edit_distance(p, m), *m)).filter(|(d, _)| *d <= 2).min();
                (p.clone(), near.map(|(_, m)| m.to_string()))
            })
            .collect()
    }

    pub fn may_delegate_to(&self, cluster: &str) -> bool {
        self.peers.get(cluster).is_some_and(|p| p.delegate_to)
    }

    pub fn accepts_from(&self, cluster: &str) -> bool {
        self.peers.get(cluster).is_some_and(|p| p.accept_from)
    }

    /// The jurisdictions a job may run in under this policy's rules: every
    /// rule whose labels all match narrows it (their intersection, so an
    /// earlier, wider rule can never shadow a stricter one: review B10.2),
    /// then the job's own list narrows it. `None` means anywhere; an empty
    /// set means nowhere.
    pub fn allowed_jurisdictions(&self, job: &Job) -> Option<BTreeSet<String>> {
        let matching = self.rules.iter().filter(|r| r.labels.iter().all(|(k, v)| job.labels.get(k) == Some(v)));
        let mut allowed: Option<BTreeSet<String>> = None;
        for rule in matching {
            let own: BTreeSet<String> = rule.jurisdictions.iter().cloned().collect();
            allowed = Some(match allowed {
                Some(a) => a.intersection(&own).cloned().collect(),
                None => own,
            });
        }
        if !job.jurisdictions.is_empty() {
            let own: BTreeSet<String> = job.jurisdictions.iter().map(|j| j.to_string()).collect();
            allowed = Some(match allowed {
                Some(a) => a.intersection(&own).cloned().collect(),
                None => own,
            });
        }
        allowed
    }

    /// The largest share of `job` that may run remotely: the policy's,
    /// narrowed (never widened) by the job's own federation block.
    pub fn remote_share(&self, job: &Job) -> f64 {
        use cluster_core::model::DelegateMode;
        if job.federation.delegate == DelegateMode::Never {
            return 0.0;
        }
        let own = job.federation.max_remote_share.unwrap_or(1.0);
        self.overflow.max_remote_share.min(own).clamp(0.0, 1.0)
    }

    /// The cost ceiling per cpu-hour: the lower of the policy's and the job's.
    pub fn cost_ceiling(&self, job: &Job) -> Option<f64> {
        match (self.overflow.max_cost_per_cpu_hour, job.federation.max_cost_per_cpu_hour) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

pub fn parse_policy(file: &SourceFile) -> Checked<Policy> {
    read::checked(file, read_policy)
}

fn share(d: &mut Diagnostics, t: &mut Table, key: &'static str, default: f64) -> Option<f64> {
    match t.float(d, key) {
        Some((v, _)) if (0.0..=1.0).contains(&v) => Some(v),
        Some((v, span)) => {
            d.error_hint(span, format!("{key} = {v} is not a share"), "write a number from 0.0 to 1.0, e.g. 0.3");
            None
        }
        None => Some(default),
    }
}

fn duration(d: &mut Diagnostics, t: &mut Table, key: &'static str, default_ms: u64) -> Option<u64> {
    match t.str(d, key) {
        Some((text, span)) => {
            parse_duration_ms(text).map_err(|e| d.error_hint(span, format!("{key} `{text}` is not a duration"), e)).ok()
        }
        None => Some(default_ms),
    }
}

fn labels(d: &mut Diagnostics, list: Option<Vec<(&str, Span)>>, what: &str) -> Vec<(String, Span)> {
    let mut out = Vec::new();
    for (j, span) in list.unwrap_or_default() {
        if valid_label(j) {
            out.push((j.to_string(), span));
        } else {
            d.error_hint(span, format!("invalid {what} `{j}`"), "use 1 to 63 letters, digits and `-`");
        }
    }
    out
}

fn trigger(d: &mut Diagnostics, text: &str, span: Span) -> Option<Trigger> {
    let t = text.trim();
    if t == "unplaceable" {
        return Some(Trigger::Unplaceable);
    }
    let hint = "write \"unplaceable\", \"utilization > 0.9\" or \"queue_wait > 30s\"";
    let Some((what, value)) = t.split_once('>') else {
        d.error_hint(span, format!("unknown overflow trigger `{t}`"), hint);
        return None;
    };
    let value = value.trim();
    match what.trim() {
        "utilization" => match value.parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Some(Trigger::Utilization(v)),
            _ => {
                d.error_hint(span, format!("utilization `{value}` is not a share"), "write e.g. \"utilization > 0.9\"");
                None
            }
        },
        "queue_wait" => match parse_duration_ms(value) {
            Ok(ms) => Some(Trigger::QueueWait(ms)),
            Err(e) => {
                d.error_hint(span, format!("queue_wait `{value}` is not a duration"), e);
                None
            }
        },
        other => {
            d.error_hint(span, format!("unknown overflow measure `{other}`"), hint);
            None
        }
    }
}

fn read_policy(top: &mut Table, d: &mut Diagnostics) -> Option<Policy> {
    let Some(mut c) = top.table(d, "cluster") else {
        d.error_hint(0..0, "missing [cluster] table", "start the file with [cluster] and its name and jurisdictions");
        return None;
    };
    c.path = "[cluster]".into();
    let name = c.required_str(d, "name", "\"eu-west\"").and_then(|(n, span)| {
        if valid_label(n) {
            Some(n.to_string())
        } else {
            d.error_hint(span, format!("invalid cluster name `{n}`"), "use 1 to 63 letters, digits and `-`");
            None
        }
    });
    let listed = c.str_list(d, "jurisdictions");
    let jurisdictions = labels(d, listed, "jurisdiction");
    c.finish(d);

    let mut peers: BTreeMap<String, Peer> = BTreeMap::new();
    let peer_tables = top.tables(d, "peer");
    if peer_tables.len() > PEERS_MAX {
        d.error(peer_tables[PEERS_MAX].span.clone(), format!("more than {PEERS_MAX} peers"));
    }
    for mut p in peer_tables.into_iter().take(PEERS_MAX) {
        let cluster = p.required_str(d, "cluster", "\"eu-central\"");
        let delegate_to = p.bool(d, "delegate_to").is_some_and(|(b, _)| b);
        let accept_from = p.bool(d, "accept_from").is_some_and(|(b, _)| b);
        if let Some((n, span)) = cluster {
            if !valid_label(n) {
                d.error_hint(span, format!("invalid cluster name `{n}`"), "use 1 to 63 letters, digits and `-`");
            } else if name.as_deref() == Some(n) {
                d.error_hint(span, format!("`{n}` is this cluster"), "a cluster is not its own peer");
            } else if peers.insert(n.to_string(), Peer { delegate_to, accept_from }).is_some() {
                d.error_hint(span, format!("peer `{n}` is listed twice"), "merge the two [[peer]] entries");
            } else if !delegate_to && !accept_from {
                d.warning(
                    p.span.clone(),
                    format!("peer `{n}` is neither delegated to nor accepted from"),
                    Some("set delegate_to or accept_from to true, or remove the entry".into()),
                );
            }
        }
        p.finish(d);
    }

    let mut overflow =
        Overflow { triggers: vec![Trigger::Unplaceable], max_remote_share: 0.5, max_cost_per_cpu_hour: None };
    let mut overflow_span = None;
    if let Some(mut o) = top.table(d, "overflow") {
        o.path = "[overflow]".into();
        overflow_span = Some(o.span.clone());
        if let Some(list) = o.str_list(d, "when") {
            overflow.triggers = list.into_iter().filter_map(|(t, span)| trigger(d, t, span)).collect();
        }
        overflow.max_remote_share = share(d, &mut o, "max_remote_share", 0.5).unwrap_or(0.5);
        overflow.max_cost_per_cpu_hour = match o.float(d, "max_cost_per_cpu_hour") {
            Some((v, _)) if v > 0.0 => Some(v),
            Some((v, span)) => {
                d.error_hint(span, format!("max_cost_per_cpu_hour = {v}"), "write a price above 0, e.g. 0.06");
                None
            }
            None => None,
        };
        o.finish(d);
    }
    let delegates = peers.values().any(|p| p.delegate_to);
    if let Some(span) = overflow_span.clone() {
        if !delegates {
            d.warning(
                span,
                "[overflow] never applies: no peer has delegate_to = true",
                Some("add a [[peer]] with delegate_to = true".into()),
            );
        }
    }

    let mut inbound = Inbound { max_share_of_capacity: 0.25 };
    if let Some(mut i) = top.table(d, "inbound") {
        i.path = "[inbound]".into();
        inbound.max_share_of_capacity = share(d, &mut i, "max_share_of_capacity", 0.25).unwrap_or(0.25);
        i.finish(d);
    }

    let mut rules: Vec<Rule> = Vec::new();
    let rule_tables = top.tables(d, "rule");
    if rule_tables.len() > RULES_MAX {
        d.error(rule_tables[RULES_MAX].span.clone(), format!("more than {RULES_MAX} rules"));
    }
    let local: BTreeSet<&str> = jurisdictions.iter().map(|(j, _)| j.as_str()).collect();
    for mut r in rule_tables.into_iter().take(RULES_MAX) {
        let matched: BTreeMap<String, String> =
            r.str_map(d, "match").into_iter().map(|(k, v, _)| (k.to_string(), v.to_string())).collect();
        if !r.has("match") {
            r.missing(d, "match", "{ data = \"eu-pii\" }");
        } else if matched.is_empty() {
            d.warning(r.span.clone(), "this rule matches every job", Some("name the labels it is for".into()));
        }
        if !r.has("jurisdictions") {
            r.missing(d, "jurisdictions", "[\"eu\"]");
        }
        let listed = r.str_list(d, "jurisdictions");
        let js = labels(d, listed, "jurisdiction");
        let span = r.span.clone();
        r.finish(d);
        // Every matching rule narrows (their intersection): a rule after
        // one that matches every job it does can only narrow further.
        let wider = rules.iter().enumerate().filter(|(_, e)| e.labels.iter().all(|(k, v)| matched.get(k) == Some(v)));
        let mut both: Option<(usize, BTreeSet<&str>)> = None;
        for (n, e) in wider {
            let mine: BTreeSet<&str> = js.iter().map(|(j, _)| j.as_str()).collect();
            let theirs: BTreeSet<&str> = e.jurisdictions.iter().map(String::as_str).collect();
            if theirs.is_subset(&mine) {
                both = Some((n, theirs));
                break;
            }
            if mine.intersection(&theirs).next().is_none() {
                both = Some((n, BTreeSet::new()));
                break;
            }
        }
        if let Some((earlier, allowed)) = both {
            let message = if allowed.is_empty() {
                format!(
                    "matching work may run nowhere: rule {} also matches it, and they share no jurisdiction",
                    earlier + 1
                )
            } else {
                format!(
                    "this rule changes nothing: rule {} also matches every job this one does, and allows less",
                    earlier + 1
                )
            };
            if allowed.is_empty() {
                d.warning(span, message, Some("every matching rule narrows where work may run".into()));
            } else {
                // Shadowed: an error, since whoever wrote it meant it to act.
                d.error_hint(
                    span,
                    message,
                    "every matching rule narrows where work may run: remove this rule, or narrow the earlier one",
                );
            }
        } else if js.is_empty() {
            d.warning(span, "matching work may run nowhere: the rule lists no jurisdiction", None);
        } else if js.iter().all(|(j, _)| !local.contains(j.as_str())) && !delegates {
            d.warning(
                span,
                "matching work can never run: this cluster is in none of the rule's jurisdictions and delegates to no peer",
                Some("add the jurisdiction to [cluster], or a peer to delegate to".into()),
            );
        }
        rules.push(Rule { labels: matched, jurisdictions: js.into_iter().map(|(j, _)| j).collect() });
    }

    let mut retry = Retry::default();
    if let Some(mut t) = top.table(d, "retry") {
        t.path = "[retry]".into();
        retry.backoff_ms = duration(d, &mut t, "backoff", retry.backoff_ms).unwrap_or(retry.backoff_ms);
        retry.backoff_max_ms = duration(d, &mut t, "backoff_max", retry.backoff_max_ms).unwrap_or(retry.backoff_max_ms);
        retry.breaker_cooldown_ms =
            duration(d, &mut t, "breaker_cooldown", retry.breaker_cooldown_ms).unwrap_or(retry.breaker_cooldown_ms);
        retry.lease_ms = duration(d, &mut t, "lease", retry.lease_ms).unwrap_or(retry.lease_ms);
        retry.grace_ms = duration(d, &mut t, "grace", retry.grace_ms).unwrap_or(retry.grace_ms);
        if retry.grace_ms < GRACE_MIN_MS {
            d.warning(
                t.span.clone(),
                format!(
                    "grace = {} ms is under {} s: an origin leader cut off from its majority may answer renewals for up to that long after its successor took over, and at-most-once work could then run twice",
                    retry.grace_ms,
                    GRACE_MIN_MS / 1_000
                ),
                Some(format!("write grace = \"{}s\" or more", GRACE_MIN_MS / 1_000)),
            );
        }
        retry.breaker_failures = match t.int(d, "breaker_failures") {
            Some((n, _)) if (1..=1000).contains(&n) => n as u32,
            Some((n, span)) => {
                d.error_hint(span, format!("breaker_failures = {n}"), "use 1 to 1000");
                retry.breaker_failures
            }
            None => retry.breaker_failures,
        };
        if retry.backoff_max_ms < retry.backoff_ms {
            d.error_hint(t.span.clone(), "backoff_max is shorter than backoff", "make backoff_max at least backoff");
        }
        t.finish(d);
    }
    Some(Policy {
        cluster: name?,
        jurisdictions: jurisdictions.into_iter().map(|(j, _)| j).collect(),
        peers,
        overflow,
        inbound,
        rules,
        retry,
    })
}

/// Peers not in the federation, each with the member it likely meant.
pub type UnknownPeers = Vec<(String, Option<String>)>;

/// Levenshtein distance between two short names (peer names are labels).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb { prev } else { 1 + prev.min(cur).min(row[j]) };
            prev = cur;
        }
    }
    row[b.len()]
}

/// One warning per peer `policy` names that is not among `members`,
/// placed at its `cluster = "…"` line in `file` (`hanse policy check
/// --members`). A policy is checked before it meets gossip, so this is a
/// warning, never an error: a cluster may join later.
pub fn member_warnings(file: &SourceFile, policy: &Policy, members: &[&str]) -> Vec<cluster_core::diag::Diagnostic> {
    let mut d = Diagnostics::default();
    for (peer, near) in policy.unknown_peers(members) {
        let quoted = format!("\"{peer}\"");
        let at = file.text.find(&quoted).map_or(0..0, |i| i..i + quoted.len());
        let listed = if members.is_empty() { "none".to_string() } else { members.join(", ") };
        let hint = match near {
            Some(m) => format!("did you mean `{m}`? the federation has: {listed}"),
            None => format!("the federation has: {listed}; work for it waits until such a cluster joins"),
        };
        d.warning(at, format!("peer `{peer}` is not in the federation"), Some(hint));
    }
    d.items
}

#[cfg(test)]
mod member_tests {
    use super::*;

    #[test]
    fn peers_that_are_not_members_are_named_with_their_likely_spelling() {
        let text = "[cluster]\nname = \"eu-west\"\n[[peer]]\ncluster = \"us-eats\"\ndelegate_to = true\n\
                    [[peer]]\ncluster = \"eu-central\"\ndelegate_to = true\n";
        let file = SourceFile::new("p.toml", text.to_string());
        let policy = parse_policy(&file).value.expect("the policy parses");
        assert_eq!(
            policy.unknown_peers(&["eu-west", "us-east", "eu-central"]),
            vec![("us-eats".to_string(), Some("us-east".to_string()))]
        );
        let w = member_warnings(&file, &policy, &["us-east", "eu-central"]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].severity, cluster_core::diag::Severity::Warning);
        assert_eq!(&text[w[0].span.clone()], "\"us-eats\"");
        assert!(w[0].hint.as_deref().is_some_and(|h| h.contains("did you mean `us-east`")), "{:?}", w[0]);
        assert_eq!(policy.unknown_peers(&["x"]).len(), 2);
        assert_eq!(edit_distance("us-eats", "us-east"), 2);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
