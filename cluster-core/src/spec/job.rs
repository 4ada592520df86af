//! The job spec: TOML with a `[job]` table and `[[group]]` entries.
//!
//! ```toml
//! [job]
//! name = "web"
//! type = "service"
//!
//! [[group]]
//! name = "frontend"
//! count = 3
//!
//! [[group.task]]
//! name = "server"
//! driver = "exec"
//! command = "/usr/bin/python3"
//! args = ["-m", "http.server"]
//! resources = { cpu = "500m", memory = "256MiB" }
//! kill_timeout = "5s"           # SIGTERM, then SIGKILL after this
//! user = "www-data"             # optional: needs the agent's `allowed_users`
//! ```
//!
//! A group may also say `restart = { attempts = 2, delay = "1s", mode =
//! "fail" }`, `on_disconnect = "keep" | "stop"`, how a new version
//! replaces the old (`[group.update]`, [`UpdateStrategy`]) and how a
//! failed instance is placed again (`[group.reschedule]`, with `attempts`,
//! `interval`, `delay`, `delay_function`, `max_delay`, `unlimited`:
//! [`ReschedulePolicy`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::diag::{Diagnostics, SourceFile, Span};
use crate::ids::JobId;
use crate::model::job::*;
use crate::resources::{self, GpuAsk, Resources};
use crate::spec::read::{self, Table, keyword};
use crate::spec::{Checked, parse_duration_ms};

/// The most instances one group may ask for.
pub const GROUP_COUNT_MAX: i64 = 100_000;
/// The most groups in one job, and tasks in one group.
pub const GROUPS_MAX: usize = 64;
pub const TASKS_MAX: usize = 64;
/// The most restarts a `fail` restart policy may make.
pub const RESTART_ATTEMPTS_MAX: i64 = 100;

const DEFAULT_CPU_MILLIS: u64 = 100;
const DEFAULT_MEMORY_BYTES: u64 = 128 << 20;

/// Parses and validates a job spec.
pub fn parse_job(file: &SourceFile) -> Checked<Job> {
    read::checked(file, read_job)
}

fn read_job(top: &mut Table, d: &mut Diagnostics) -> Option<Job> {
    let Some(mut t) = top.table(d, "job") else {
        if !top.has("job") {
            d.error_hint(0..0, "missing [job] table", "start the file with [job] and name = \"...\"");
        }
        // Still read the groups, to report their problems too.
        let _ = read_groups(top, d, JobType::Service, &[], &[], &[]);
        return None;
    };
    t.path = "[job]".into();
    let name = t.required_str(d, "name", "\"web\"").and_then(|(n, s)| check_job_name(d, n, s));
    let namespace = match t.str(d, "namespace") {
        Some((n, s)) => check_name(d, "namespace", n, s),
        None => Some(crate::acl::DEFAULT_NAMESPACE),
    };
    let job_type = t
        .str(d, "type")
        .map(|w| keyword(d, "job type", w, JobType::WORDS, JobType::from_word))
        .unwrap_or(Some(JobType::Service));
    let priority = match t.int(d, "priority") {
        Some((p, _)) if (1..=100).contains(&p) => p as u8,
        Some((p, s)) => {
            d.error_hint(s, format!("priority {p} is out of range"), "use 1 (lowest) to 100 (highest)");
            50
        }
        None => 50,
    };
    let objective =
        t.str(d, "objective").and_then(|w| keyword(d, "objective", w, Objective::WORDS, Objective::from_word));
    let labels: BTreeMap<String, String> =
        t.str_map(d, "labels").into_iter().map(|(k, v, _)| (k.to_string(), v.to_string())).collect();
    let jurisdictions: Vec<Arc<str>> = t
        .str_list(d, "jurisdictions")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(j, s)| check_name(d, "jurisdiction", j, s).map(Arc::from))
        .collect();
    if jurisdictions.len() > JURISDICTIONS_MAX {
        d.error(t.span.clone(), format!("{} jurisdictions; at most {JURISDICTIONS_MAX}", jurisdictions.len()));
    }
    let federation = t.table(d, "federation").map(|mut f| {
        f.path = "[job.federation]".into();
        let spec = read_federation(&mut f, d);
        f.finish(d);
        spec
    });
    let constraints = read_constraints(&mut t, d);
    let affinities = read_affinities(&mut t, d);
    let spreads = read_spreads(&mut t, d);
    t.finish(d);

    let groups = read_groups(top, d, job_type.unwrap_or(JobType::Service), &constraints, &affinities, &spreads);
    let job_type = job_type?;
    for (g, span) in &groups {
        if g.update.is_some() && job_type == JobType::Batch {
            d.warning(
                span.clone(),
                format!("group `{}`: [group.update] is for service and system jobs; this batch job ignores it", g.name),
                None,
            );
        }
        if g.update.is_some_and(|u| u.canary > 0 || u.auto_revert) && job_type == JobType::System {
            d.warning(
                span.clone(),
                format!(
                    "group `{}`: a system job is updated max_parallel nodes at a time, stagger apart; canary and \
                     auto_revert are for services and are ignored",
                    g.name
                ),
                None,
            );
        }
        if g.update.is_some_and(|u| u.canary > 0) && g.on_disconnect == OnDisconnect::Stop {
            d.error_hint(
                span.clone(),
                format!(
                    "group `{}`: canaries run beside the old version, which on_disconnect = \"stop\" forbids",
                    g.name
                ),
                "drop `canary`, or let the group run two instances at once (on_disconnect = \"keep\")",
            );
        }
    }
    if job_type == JobType::System {
        for (g, span) in &groups {
            if g.count != 1 {
                d.warning(
                    span.clone(),
                    format!("group `{}`: count is ignored for system jobs (one instance per node)", g.name),
                    None,
                );
            }
        }
    }
    Some(Job {
        id: JobId::new(name?),
        namespace: Arc::from(namespace?),
        job_type,
        priority,
        objective: objective.unwrap_or(job_type.default_objective()),
        labels,
        jurisdictions,
        federation: federation.unwrap_or_default(),
        groups: groups.into_iter().map(|(g, _)| g).collect(),
        version: 0,
        stopped: false,
    })
}

/// The most jurisdictions a job may name.
pub const JURISDICTIONS_MAX: usize = 16;

/// Whether `name` may name a job, group or task: 1 to 64 ASCII letters,
/// digits, `-`, `_` or `.`, starting with a letter or digit. Agents build
/// paths from task names, so such a name never leaves its directory.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Words the API's routes put where a job's name goes: `/v1/jobs/plan`
/// is the dry run. A job so named could run but never be read or stopped
/// through `/v1/jobs/NAME`, so the words are refused as job names.
pub const RESERVED_JOB_NAMES: &[&str] = &["plan"];
/// The same for nodes: `/v1/nodes/batch` registers many, and
/// `/v1/nodes/heartbeat` heartbeats them.
pub const RESERVED_NODE_IDS: &[&str] = &["batch", "heartbeat"];

/// Why `id` cannot name a node, if it cannot: 1 to 128 letters, digits,
/// `-`, `_` or `.`, starting with a letter or digit (so never `.` or `..`,
/// which a URL would resolve away), and not a word of the API's routes.
pub fn node_id_problem(id: &str) -> Option<String> {
    let chars_ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !chars_ok {
        return Some(format!(
            "node id `{id}`: use 1 to 128 letters, digits, `-`, `_` and `.`, starting with a letter or digit"
        ));
    }
    RESERVED_NODE_IDS.contains(&id).then(|| {
        format!("node id `{id}` is a word of the API (`/v1/nodes/{id}` is taken by another route); choose another")
    })
}

/// The directory beside the task directories that holds an allocation's
/// logs: no task may take its name.
pub const LOGS_DIR: &str = "logs";

/// The directory beside the task directories that the tasks of an
/// allocation share (`HANSE_ALLOC_DIR`): no task may take its name.
pub const SHARED_DIR: &str = "alloc";

/// A task name: a valid name that is neither [`LOGS_DIR`] (a task named so
/// would own its allocation's log directory, security review of item 4)
/// nor [`SHARED_DIR`].
pub fn is_valid_task_name(name: &str) -> bool {
    is_valid_name(name) && name != LOGS_DIR && name != SHARED_DIR
}

/// A POSIX-portable user name, as `useradd` accepts by default.
pub fn is_valid_user(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
}

/// A job's name: a valid name that no route of the API takes.
fn check_job_name<'a>(d: &mut Diagnostics, name: &'a str, span: Span) -> Option<&'a str> {
    let name = check_name(d, "job", name, span.clone())?;
    if RESERVED_JOB_NAMES.contains(&name) {
        d.error_hint(
            span,
            format!("the job name `{name}` is a word of the API: `/v1/jobs/{name}` is taken by another route"),
            "choose another name; a job so named could run but never be read or stopped",
        );
        return None;
    }
    Some(name)
}

fn check_name<'a>(d: &mut Diagnostics, what: &str, name: &'a str, span: Span) -> Option<&'a str> {
    if is_valid_name(name) {
        Some(name)
    } else {
        d.error_hint(
            span,
            format!("invalid {what} name `{name}`"),
            "use 1 to 64 letters, digits, `-`, `_` or `.`, starting with a letter or digit",
        );
        None
    }
}

fn read_federation(f: &mut Table, d: &mut Diagnostics) -> FederationSpec {
    let mut spec = FederationSpec::default();
    if let Some((word, span)) = f.str(d, "delegate") {
        if let Some(mode) =
            keyword(d, "delegation mode", (word, span.clone()), DelegateMode::WORDS, DelegateMode::from_word)
        {
            spec.delegate = mode;
        }
    }
    if let Some((share, s)) = f.float(d, "max_remote_share") {
        if (0.0..=1.0).contains(&share) {
            spec.max_remote_share = Some(share);
        } else {
            d.error_hint(s, format!("max_remote_share {share} is out of range"), "a share is 0.0 to 1.0 (0.5 = half)");
        }
    }
    if let Some((cost, s)) = f.float(d, "max_cost_per_cpu_hour") {
        if cost >= 0.0 {
            spec.max_cost_per_cpu_hour = Some(cost);
        } else {
            d.error(s, "max_cost_per_cpu_hour cannot be negative");
        }
    }
    spec
}

type Spanned<T> = (T, Span);

fn read_groups(
    top: &mut Table,
    d: &mut Diagnostics,
    job_type: JobType,
    job_constraints: &[Spanned<Predicate>],
    job_affinities: &[Affinity],
    job_spreads: &[Spread],
) -> Vec<(TaskGroup, Span)> {
    let tables = top.tables(d, "group");
    if tables.is_empty() && !top.has("group") {
        d.error_hint(0..0, "the job has no [[group]]", "add a [[group]] with a name, a count and a [[group.task]]");
    }
    if tables.len() > GROUPS_MAX {
        d.error(tables[GROUPS_MAX].span.clone(), format!("a job has at most {GROUPS_MAX} groups"));
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for mut g in tables.into_iter().take(GROUPS_MAX) {
        let span = g.span.clone();
        let name = g.required_str(d, "name", "\"web\"").and_then(|(n, s)| {
            let n = check_name(d, "group", n, s.clone())?;
            if !seen.insert(n.to_string()) {
                d.error_hint(s, format!("duplicate group name `{n}`"), "another group has this name; rename one");
                return None;
            }
            Some(n)
        });
        let count = match g.int(d, "count") {
            None => 1,
            Some((c, s)) if c < 0 => {
                d.error_hint(s, format!("count {c} is negative"), "count is the number of instances: 0 or more");
                0
            }
            Some((c, s)) if c > GROUP_COUNT_MAX => {
                d.error_hint(
                    s,
                    format!("count {c} is too large"),
                    format!("a group runs at most {GROUP_COUNT_MAX} instances"),
                );
                0
            }
            Some((c, _)) => c as u32,
        };
        let mut distinct_hosts = g.bool(d, "distinct_hosts").is_some_and(|(b, _)| b);
        let datasets = g.str_list(d, "datasets").unwrap_or_default().into_iter().map(|(s, _)| Arc::from(s)).collect();
        let (own_constraints, dh) = read_constraints_with_distinct(&mut g, d);
        distinct_hosts |= dh;
        let mut constraints: Vec<Spanned<Predicate>> = job_constraints.to_vec();
        constraints.extend(own_constraints);
        check_contradictions(d, &constraints);
        let mut affinities = job_affinities.to_vec();
        affinities.extend(read_affinities(&mut g, d));
        let mut spreads = job_spreads.to_vec();
        spreads.extend(read_spreads(&mut g, d));
        let tasks = read_tasks(&mut g, d);
        let restart = read_restart(&mut g, d);
        let update = read_update(&mut g, d);
        let reschedule = read_reschedule(&mut g, d, job_type);
        let on_disconnect = g
            .str(d, "on_disconnect")
            .and_then(|w| keyword(d, "on_disconnect", w, OnDisconnect::WORDS, OnDisconnect::from_word))
            .unwrap_or(OnDisconnect::Keep);
        g.finish(d);
        if let Some(name) = name {
            let group = TaskGroup {
                name: Arc::from(name),
                count,
                constraints: constraints.into_iter().map(|(c, _)| c).collect(),
                affinities,
                spreads,
                distinct_hosts,
                datasets,
                tasks,
                restart,
                on_disconnect,
                update,
                reschedule,
            };
            out.push((group, span));
        }
    }
    out
}

fn read_constraints(t: &mut Table, d: &mut Diagnostics) -> Vec<Spanned<Predicate>> {
    let (constraints, distinct) = read_constraints_with_distinct(t, d);
    if distinct {
        d.error_hint(
            t.span.clone(),
            "distinct_hosts is a group constraint",
            "move it to a [[group.constraint]] or set distinct_hosts = true in the [[group]]",
        );
    }
    constraints
}

fn read_constraints_with_distinct(t: &mut Table, d: &mut Diagnostics) -> (Vec<Spanned<Predicate>>, bool) {
    let mut out = Vec::new();
    let mut distinct = false;
    for mut c in t.tables(d, "constraint") {
        let operator = c.get("operator").and_then(|v| v.get_ref().as_str());
        if operator == Some("distinct_hosts") {
            distinct = true;
            c.finish(d);
            continue;
        }
        if let Some(p) = read_predicate(&mut c, d) {
            out.push((p, c.span.clone()));
        }
        c.finish(d);
    }
    (out, distinct)
}

/// `attribute`, `operator` (default `=`), `value`.
fn read_predicate(c: &mut Table, d: &mut Diagnostics) -> Option<Predicate> {
    let target = c.required_str(d, "attribute", "\"${attr.arch}\"").and_then(|(a, s)| match Target::parse(a) {
        Ok(t) => Some(t),
        Err(msg) => {
            d.error(s, msg);
            None
        }
    });
    let op = match c.str(d, "operator") {
        None => Some(Operator::Eq),
        Some(w) => keyword(d, "operator", w, Operator::WORDS, Operator::from_word),
    };
    let value = c.scalar_text(d, "value");
    let (target, op) = (target?, op?);
    let value = match (op.takes_value(), value) {
        (true, Some((v, _, _))) => v,
        (true, None) => {
            c.missing(d, "value", "\"x86_64\"");
            return None;
        }
        (false, Some((_, _, s))) => {
            d.warning(s, format!("`{}` takes no value; this one is ignored", op.as_str()), None);
            String::new()
        }
        (false, None) => String::new(),
    };
    match Predicate::new(target, op, value) {
        Ok(p) => Some(p),
        Err(msg) => {
            d.error(c.span.clone(), msg);
            None
        }
    }
}

/// Flags pairs of constraints on one attribute that no node can satisfy
/// together, such as `arch = x86_64` and `arch = arm64`.
fn check_contradictions(d: &mut Diagnostics, constraints: &[Spanned<Predicate>]) {
    for (j, (b, bspan)) in constraints.iter().enumerate() {
        for (a, _) in &constraints[..j] {
            if a.target != b.target || !contradict(a, b) {
                continue;
            }
            d.error_hint(
                bspan.clone(),
                format!("constraints `{a}` and `{b}` can never both hold"),
                "remove or change one of them; as written no node is feasible",
            );
            break;
        }
    }
}

fn contradict(a: &Predicate, b: &Predicate) -> bool {
    use Operator::*;
    let needs_value = |p: &Predicate| !matches!(p.op, IsNotSet | Ne | IsSet);
    match (a.op, b.op) {
        (IsSet, IsNotSet) | (IsNotSet, IsSet) => true,
        (IsNotSet, _) => needs_value(b),
        (_, IsNotSet) => needs_value(a),
        // An equality pins the value: every other predicate must accept it.
        (Eq, _) => !b.matches(Some(&a.value)),
        (_, Eq) => !a.matches(Some(&b.value)),
        _ => empty_numeric_range(a, b) || empty_numeric_range(b, a),
    }
}

/// `x > lo` with `x < hi` where no number lies between.
fn empty_numeric_range(lower: &Predicate, upper: &Predicate) -> bool {
    use Operator::*;
    let (Ok(lo), Ok(hi)) = (lower.value.parse::<f64>(), upper.value.parse::<f64>()) else { return false };
    match (lower.op, upper.op) {
        (Gt, Lt) | (Gt, Le) | (Ge, Lt) => lo >= hi,
        (Ge, Le) => lo > hi,
        _ => false,
    }
}

fn read_affinities(t: &mut Table, d: &mut Diagnostics) -> Vec<Affinity> {
    let mut out = Vec::new();
    for mut a in t.tables(d, "affinity") {
        let predicate = read_predicate(&mut a, d);
        let weight = match a.int(d, "weight") {
            None => {
                a.missing(d, "weight", "50");
                None
            }
            Some((0, s)) => {
                d.error_hint(s, "an affinity with weight 0 has no effect", "use -100 to 100, not 0");
                None
            }
            Some((w, s)) if !(-100..=100).contains(&w) => {
                d.error_hint(s, format!("affinity weight {w} is out of range"), "use -100 (avoid) to 100 (prefer)");
                None
            }
            Some((w, _)) => Some(w as i8),
        };
        a.finish(d);
        if let (Some(predicate), Some(weight)) = (predicate, weight) {
            out.push(Affinity { predicate, weight });
        }
    }
    out
}

fn read_spreads(t: &mut Table, d: &mut Diagnostics) -> Vec<Spread> {
    let mut out = Vec::new();
    for mut s in t.tables(d, "spread") {
        let target = s
            .required_str(d, "attribute", "\"${node.zone}\"")
            .and_then(|(a, sp)| Target::parse(a).map_err(|msg| d.error(sp, msg)).ok());
        let weight = match s.int(d, "weight") {
            None => 50,
            Some((w, _)) if (1..=100).contains(&w) => w as u8,
            Some((w, sp)) => {
                d.error_hint(sp, format!("spread weight {w} is out of range"), "use 1 to 100");
                50
            }
        };
        let mut targets: Vec<SpreadTarget> = Vec::new();
        let mut total = 0i64;
        for mut st in s.tables(d, "targets") {
            let value = st.required_str(d, "value", "\"zone-a\"");
            let percent = match st.int(d, "percent") {
                Some((p, _)) if (0..=100).contains(&p) => Some(p),
                Some((p, sp)) => {
                    d.error_hint(sp, format!("percent {p} is out of range"), "use 0 to 100");
                    None
                }
                None => {
                    st.missing(d, "percent", "50");
                    None
                }
            };
            if let (Some((v, vs)), Some(p)) = (value, percent) {
                if targets.iter().any(|t| t.value == v) {
                    d.error(vs, format!("spread target `{v}` is listed twice"));
                } else {
                    total += p;
                    targets.push(SpreadTarget { value: v.to_string(), percent: p as u8 });
                }
            }
            st.finish(d);
        }
        if total > 100 {
            d.error_hint(
                s.span.clone(),
                format!("spread target percentages add up to {total}"),
                "they may add up to at most 100",
            );
        }
        s.finish(d);
        if let Some(target) = target {
            out.push(Spread { target, weight, targets });
        }
    }
    out
}

/// `restart = { attempts = 2, delay = "1s", mode = "fail" }`.
fn read_restart(g: &mut Table, d: &mut Diagnostics) -> RestartPolicy {
    let mut policy = RestartPolicy::default();
    let Some(mut r) = g.table(d, "restart") else { return policy };
    r.path = format!("{}.restart", g.path.trim_end_matches("]]").trim_start_matches("[["));
    match r.int(d, "attempts") {
        Some((n, _)) if (0..=RESTART_ATTEMPTS_MAX).contains(&n) => policy.attempts = n as u32,
        Some((n, s)) => d.error_hint(
            s,
            format!("attempts = {n}"),
            format!("restart at most {RESTART_ATTEMPTS_MAX} times; for more, use mode = \"delay\""),
        ),
        None => {}
    }
    if let Some((text, s)) = r.str(d, "delay") {
        match parse_duration_ms(text) {
            Ok(ms) => policy.delay_ms = ms,
            Err(h) => d.error_hint(s, "invalid restart delay", h),
        }
    }
    if let Some(mode) =
        r.str(d, "mode").and_then(|w| keyword(d, "restart mode", w, RestartMode::WORDS, RestartMode::from_word))
    {
        policy.mode = mode;
    }
    r.finish(d);
    policy
}

/// The most checks one task may have.
pub const CHECKS_MAX: usize = 16;
/// The shortest interval between two runs of a check.
pub const CHECK_INTERVAL_MIN_MS: u64 = 100;

/// A duration field of `t`, `default` when absent; an error when invalid
/// or outside `range`.
fn duration_in(
    t: &mut Table,
    d: &mut Diagnostics,
    key: &'static str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> u64 {
    let Some((text, span)) = t.str(d, key) else { return default };
    match parse_duration_ms(text) {
        Ok(ms) if range.contains(&ms) => ms,
        Ok(_) => {
            let (lo, hi) = (range.start(), range.end());
            d.error_hint(span, format!("{key} = \"{text}\" is out of range"), format!("use {lo} ms to {hi} ms"));
            default
        }
        Err(h) => {
            d.error_hint(span, format!("invalid {key}"), h);
            default
        }
    }
}

/// `[group.update]`: see [`UpdateStrategy`].
fn read_update(g: &mut Table, d: &mut Diagnostics) -> Option<UpdateStrategy> {
    let mut u = g.table(d, "update")?;
    u.path = format!("{}.update", g.path.trim_end_matches("]]").trim_start_matches("[["));
    let mut out = UpdateStrategy::default();
    match u.int(d, "max_parallel") {
        Some((n, _)) if (1..=GROUP_COUNT_MAX).contains(&n) => out.max_parallel = n as u32,
        Some((n, s)) => d.error_hint(
            s,
            format!("max_parallel = {n}"),
            "replace at least 1 instance at a time (and at most a group's largest count)",
        ),
        None => {}
    }
    match u.int(d, "canary") {
        Some((n, _)) if (0..=GROUP_COUNT_MAX).contains(&n) => out.canary = n as u32,
        Some((n, s)) => d.error_hint(s, format!("canary = {n}"), "canaries are a number of instances: 0 or more"),
        None => {}
    }
    const HOUR_MS: u64 = 3_600_000;
    out.min_healthy_time_ms = duration_in(&mut u, d, "min_healthy_time", out.min_healthy_time_ms, 0..=HOUR_MS);
    out.healthy_deadline_ms = duration_in(&mut u, d, "healthy_deadline", out.healthy_deadline_ms, 1..=24 * HOUR_MS);
    out.stagger_ms = duration_in(&mut u, d, "stagger", out.stagger_ms, 0..=HOUR_MS);
    out.auto_promote = u.bool(d, "auto_promote").is_some_and(|(b, _)| b);
    out.auto_revert = u.bool(d, "auto_revert").is_some_and(|(b, _)| b);
    if out.min_healthy_time_ms >= out.healthy_deadline_ms {
        d.error_hint(
            u.span.clone(),
            "min_healthy_time is not shorter than healthy_deadline: no instance could ever be healthy",
            "make healthy_deadline longer than min_healthy_time",
        );
    }
    if out.auto_promote && out.canary == 0 {
        d.warning(u.span.clone(), "auto_promote without canaries does nothing", None);
    }
    u.finish(d);
    Some(out)
}

/// The most reschedules a `[group.reschedule]` may allow per interval.
pub const RESCHEDULE_ATTEMPTS_MAX: i64 = 1_000;

/// `[group.reschedule]`: see [`ReschedulePolicy`]. What it leaves out is
/// the job type's default, except that `attempts` without `unlimited`
/// means a limit (`unlimited = false`).
fn read_reschedule(g: &mut Table, d: &mut Diagnostics, job_type: JobType) -> ReschedulePolicy {
    let mut out = ReschedulePolicy::for_type(job_type);
    let Some(mut r) = g.table(d, "reschedule") else { return out };
    r.path = format!("{}.reschedule", g.path.trim_end_matches("]]").trim_start_matches("[["));
    if job_type == JobType::System {
        d.warning(
            r.span.clone(),
            format!(
                "[group.reschedule] is for service and batch jobs; a system job's instance is tried again on its \
                 own node, at most {} times",
                crate::scheduler::reconcile::SYSTEM_FAILURES_MAX
            ),
            None,
        );
    }
    let limited = r.has("attempts");
    let interval_given = r.has("interval");
    match r.int(d, "attempts") {
        Some((n, _)) if (0..=RESCHEDULE_ATTEMPTS_MAX).contains(&n) => out.attempts = n as u32,
        Some((n, s)) => d.error_hint(
            s,
            format!("attempts = {n}"),
            format!("allow 0 to {RESCHEDULE_ATTEMPTS_MAX} reschedules per interval, or unlimited = true"),
        ),
        None => {}
    }
    const DAY_MS: u64 = 86_400_000;
    out.interval_ms = duration_in(&mut r, d, "interval", out.interval_ms, 1_000..=365 * DAY_MS);
    out.delay_ms = duration_in(&mut r, d, "delay", out.delay_ms, 0..=7 * DAY_MS);
    out.max_delay_ms = duration_in(&mut r, d, "max_delay", out.max_delay_ms, 0..=7 * DAY_MS);
    if let Some(f) = r
        .str(d, "delay_function")
        .and_then(|w| keyword(d, "delay_function", w, DelayFunction::WORDS, DelayFunction::from_word))
    {
        out.delay_function = f;
    }
    match r.bool(d, "unlimited") {
        Some((u, s)) => {
            out.unlimited = u;
            if u && (limited || interval_given) {
                d.warning(s, "attempts and interval are ignored with unlimited = true", None);
            }
        }
        None if limited => out.unlimited = false,
        None => {}
    }
    if interval_given && out.unlimited {
        d.warning(
            r.span.clone(),
            "interval counts attempts, and an unlimited policy has none",
            Some("for a limit, set attempts (unlimited = false follows)".into()),
        );
    }
    if !out.unlimited && out.attempts > 0 && out.interval_ms == 0 && !interval_given {
        d.error_hint(
            r.span.clone(),
            "attempts without an interval: the limit would never apply",
            "say over how long they count, such as interval = \"1h\"",
        );
    }
    if out.max_delay_ms < out.delay_ms && out.delay_function != DelayFunction::Constant {
        d.error_hint(
            r.span.clone(),
            "max_delay is shorter than delay",
            "make max_delay at least delay: it is the longest a growing delay gets",
        );
    }
    r.finish(d);
    out
}

/// A task's `[[group.task.check]]` entries: see [`Check`]. Script checks
/// are for exec tasks only (they run as the task's user).
fn read_checks(t: &mut Table, d: &mut Diagnostics, exec: bool) -> Vec<Check> {
    let tables = t.tables(d, "check");
    if tables.len() > CHECKS_MAX {
        d.error(tables[CHECKS_MAX].span.clone(), format!("a task has at most {CHECKS_MAX} checks"));
    }
    let mut names: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for mut c in tables.into_iter().take(CHECKS_MAX) {
        let name = c.required_str(d, "name", "\"alive\"").and_then(|(n, s)| {
            let n = check_name(d, "check", n, s.clone())?;
            if names.iter().any(|x| x == n) {
                d.error(s, format!("duplicate check name `{n}` in this task"));
                return None;
            }
            names.push(n.to_string());
            Some(n)
        });
        let kind = c.required_str(d, "type", "\"tcp\"").and_then(|w| {
            keyword(d, "check type", w, &["tcp", "http", "script"], |w| match w {
                "tcp" => Some("tcp"),
                "http" => Some("http"),
                "script" => Some("script"),
                _ => None,
            })
        });
        let kind = match kind {
            Some("tcp") => check_port(&mut c, d).map(|port| CheckKind::Tcp { port }),
            Some("http") => {
                let port = check_port(&mut c, d);
                let path = match c.str(d, "path") {
                    Some((p, _))
                        if p.starts_with('/') && !p.chars().any(|ch| ch.is_whitespace() || ch.is_control()) =>
                    {
                        p.to_string()
                    }
                    Some((p, s)) => {
                        d.error_hint(s, format!("invalid path `{p}`"), "a path starts with `/` and has no spaces");
                        "/".into()
                    }
                    None => "/".into(),
                };
                port.map(|port| CheckKind::Http { port, path })
            }
            Some(_) => {
                if !exec {
                    d.error_hint(
                        c.span.clone(),
                        "a script check needs an exec task",
                        "it runs as the task's user; use a tcp or http check for other drivers",
                    );
                }
                let command = c.required_str(d, "command", "\"/usr/bin/test\"").map(|(x, _)| x.to_string());
                let args = c.str_list(d, "args").unwrap_or_default().into_iter().map(|(a, _)| a.to_string()).collect();
                command.filter(|_| exec).map(|command| CheckKind::Script { command, args })
            }
            None => None,
        };
        let interval_ms = duration_in(&mut c, d, "interval", 10_000, CHECK_INTERVAL_MIN_MS..=3_600_000);
        let timeout_ms = duration_in(&mut c, d, "timeout", 2_000, 1..=3_600_000);
        c.finish(d);
        if let (Some(name), Some(kind)) = (name, kind) {
            out.push(Check { name: Arc::from(name), kind, interval_ms, timeout_ms });
        }
    }
    out
}

fn check_port(c: &mut Table, d: &mut Diagnostics) -> Option<u16> {
    match c.int(d, "port") {
        Some((p, _)) if (1..=65_535).contains(&p) => Some(p as u16),
        Some((p, s)) => {
            d.error_hint(s, format!("port {p} is out of range"), "a TCP port is 1 to 65535");
            None
        }
        None => {
            c.missing(d, "port", "8080");
            None
        }
    }
}

fn read_tasks(g: &mut Table, d: &mut Diagnostics) -> Vec<Task> {
    let tables = g.tables(d, "task");
    if tables.is_empty() && !g.has("task") {
        d.error_hint(
            g.span.clone(),
            format!("{} has no task", g.path),
            "add a [[group.task]] with a name and a driver",
        );
    }
    if tables.len() > TASKS_MAX {
        d.error(tables[TASKS_MAX].span.clone(), format!("a group has at most {TASKS_MAX} tasks"));
    }
    let mut names: Vec<String> = Vec::new();
    let mut gpu_model: Option<Arc<str>> = None;
    let mut out = Vec::new();
    for mut t in tables.into_iter().take(TASKS_MAX) {
        let name = t.required_str(d, "name", "\"server\"").and_then(|(n, s)| {
            let n = check_name(d, "task", n, s.clone())?;
            if n == LOGS_DIR {
                d.error_hint(s, "a task may not be named `logs`", "the allocation's log directory has that name");
                return None;
            }
            if n == SHARED_DIR {
                d.error_hint(
                    s,
                    "a task may not be named `alloc`",
                    "the directory an allocation's tasks share (HANSE_ALLOC_DIR) has that name",
                );
                return None;
            }
            if names.iter().any(|x| x == n) {
                d.error(s, format!("duplicate task name `{n}` in this group"));
                return None;
            }
            names.push(n.to_string());
            Some(n)
        });
        let driver = t.required_str(d, "driver", "\"exec\"").and_then(|w| {
            keyword(d, "driver", w, &["exec", "mock"], |w| match w {
                "exec" => Some("exec"),
                "mock" => Some("mock"),
                _ => None,
            })
        });
        let driver = match driver {
            Some("exec") => {
                let command = t.required_str(d, "command", "\"/usr/bin/env\"").map(|(c, _)| c.to_string());
                let args = t.str_list(d, "args").unwrap_or_default().into_iter().map(|(a, _)| a.to_string()).collect();
                let env = t.str_map(d, "env").into_iter().map(|(k, v, _)| (k.to_string(), v.to_string())).collect();
                let user = t.str(d, "user").and_then(|(u, s)| {
                    if is_valid_user(u) {
                        Some(u.to_string())
                    } else {
                        d.error_hint(
                            s,
                            format!("invalid user `{u}`"),
                            "a user name is 1 to 32 lowercase letters, digits, `_` or `-`, starting with a letter or `_`",
                        );
                        None
                    }
                });
                command.map(|command| Driver::Exec { command, args, env, user })
            }
            Some(_) => {
                let run_for_ms = match t.str(d, "run_for") {
                    Some((text, s)) => parse_duration_ms(text).map_err(|h| d.error_hint(s, "invalid run_for", h)).ok(),
                    None => Some(0),
                };
                let exit_code = t.int(d, "exit_code").map_or(0, |(c, _)| c as i32);
                run_for_ms.map(|run_for_ms| Driver::Mock { run_for_ms, exit_code })
            }
            None => None,
        };
        let (resources, gpu) = match t.table(d, "resources") {
            Some(mut r) => {
                r.path = format!("{}.resources", t.path.trim_end_matches("]]").trim_start_matches("[["));
                let out = read_resources(&mut r, d);
                r.finish(d);
                out
            }
            None => (
                Resources { cpu_millis: DEFAULT_CPU_MILLIS, memory_bytes: DEFAULT_MEMORY_BYTES, ..Default::default() },
                None,
            ),
        };
        if let Some(model) = gpu.as_ref().and_then(|g| g.model.clone()) {
            match &gpu_model {
                Some(m) if *m != model => d.error_hint(
                    t.span.clone(),
                    format!("tasks of one group ask for two GPU models, `{m}` and `{model}`"),
                    "an instance runs on one node: put tasks needing different GPU models in different groups",
                ),
                _ => gpu_model = Some(model),
            }
        }
        let kill_timeout_ms = match t.str(d, "kill_timeout") {
            Some((text, s)) => parse_duration_ms(text).unwrap_or_else(|h| {
                d.error_hint(s, "invalid kill_timeout", h);
                KILL_TIMEOUT_MS
            }),
            None => KILL_TIMEOUT_MS,
        };
        let checks = read_checks(&mut t, d, matches!(driver, Some(Driver::Exec { .. })));
        t.finish(d);
        if let (Some(name), Some(driver)) = (name, driver) {
            out.push(Task { name: Arc::from(name), driver, resources, gpu, kill_timeout_ms, checks });
        }
    }
    out
}

fn read_resources(r: &mut Table, d: &mut Diagnostics) -> (Resources, Option<GpuAsk>) {
    let mut res =
        Resources { cpu_millis: DEFAULT_CPU_MILLIS, memory_bytes: DEFAULT_MEMORY_BYTES, ..Default::default() };
    if let Some((text, _quoted, s)) = r.scalar_text(d, "cpu") {
        match resources::parse_cpu(&text) {
            Ok(m) => res.cpu_millis = m,
            Err(h) => d.error_hint(s, format!("invalid cpu `{text}`"), h),
        }
    }
    for (key, slot) in [("memory", &mut res.memory_bytes), ("disk", &mut res.disk_bytes)] {
        if let Some((text, quoted, s)) = r.scalar_text(d, key) {
            match resources::parse_bytes(&text) {
                Ok(b) => *slot = b,
                Err(_) if !quoted => d.error_hint(
                    s,
                    format!("{key} needs a unit"),
                    format!("write a quoted size such as \"{text}MiB\" or \"{text}GiB\""),
                ),
                Err(h) => d.error_hint(s, format!("invalid {key} `{text}`"), h),
            }
        }
    }
    if let Some((text, _, s)) = r.scalar_text(d, "power") {
        match resources::parse_watts(&text) {
            Ok(w) => res.power_watts = w,
            Err(h) => d.error_hint(s, format!("invalid power `{text}`"), h),
        }
    }
    let gpu = match r.get("gpu") {
        None => None,
        Some(v) => match v.get_ref() {
            toml::de::DeValue::Integer(_) => {
                r.int(d, "gpu").and_then(|(n, s)| gpu_count(d, n, s)).map(|count| GpuAsk { count, model: None })
            }
            toml::de::DeValue::Table(_) => r.table(d, "gpu").and_then(|mut g| {
                let count = g.int(d, "count").map_or(Some(1), |(n, s)| gpu_count(d, n, s));
                let model = g.str(d, "model").map(|(m, _)| Arc::from(m));
                g.finish(d);
                count.map(|count| GpuAsk { count, model })
            }),
            other => {
                d.error_hint(
                    v.span(),
                    format!("`gpu` must be a count or a table, not {}", other.type_str()),
                    "write gpu = 1 or gpu = { count = 2, model = \"nvidia-a100\" }",
                );
                None
            }
        },
    };
    (res, gpu)
}

fn gpu_count(d: &mut Diagnostics, n: i64, s: Span) -> Option<u32> {
    if (1..=64).contains(&n) {
        Some(n as u32)
    } else {
        d.error_hint(s, format!("gpu count {n} is out of range"), "use 1 to 64, or leave `gpu` out");
        None
    }
}
