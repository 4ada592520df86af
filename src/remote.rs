//! The verbs that talk to a running cluster over its HTTP API:
//! `job run|plan|status|stop|list`, `node list|status|drain`,
//! `alloc status`, `operator raft ...`, `server members`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cluster_core::server::api::{
    AllocView, DeploymentView, EvalView, JobStatus, JobSummary, LogsChunk, NodeView, PlanReport,
};
use cluster_core::server::client::{Client, ClientError};
use cluster_core::server::rpc::WriteReply;
use cluster_core::spec::{self, parse_job};
use indicatif::{ProgressBar, ProgressStyle};

use crate::Outcome;
use crate::output::{plural, print_json, table};

/// How long `job run` waits for peers to take what does not fit locally.
const DELEGATION_WAIT: Duration = Duration::from_secs(10);

/// Reads and checks a spec locally (so problems point into the user's file)
/// and returns its text.
fn read_spec(path: &Path) -> anyhow::Result<(String, String)> {
    let file = spec::read_source(path).with_context(|| format!("cannot read {}", path.display()))?;
    let checked = parse_job(&file);
    if checked.value.is_none() {
        eprint!("{}", file.render(&checked.diagnostics));
        anyhow::bail!("{} does not check; nothing was submitted", file.name);
    }
    Ok((file.name.clone(), file.text.to_string()))
}

fn api(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

pub fn job_run(c: &Client, path: &Path, detach: bool, timeout: Duration, json: bool) -> anyhow::Result<Outcome> {
    let (name, text) = read_spec(path)?;
    let reg = c.submit(&text, &name).map_err(api)?;
    if detach {
        if json {
            print_json(&reg)?;
        } else {
            println!("job {} registered (version {}), evaluation e{:06}", reg.job, reg.version, reg.eval);
        }
        return Ok(Outcome::Ok);
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("a valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("job {}: waiting for evaluation e{:06}", reg.job, reg.eval));
    let deadline = Instant::now() + timeout;
    let mut eval_id = reg.eval;
    let eval: Option<EvalView> = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let view = match c.eval(eval_id, left.min(Duration::from_secs(5))) {
            Ok(v) => Some(v),
            // Superseded by a newer evaluation of the job: follow that one.
            Err(e) if e.status() == Some(404) => c.job(&reg.job).map_err(api)?.eval,
            Err(e) => return Err(api(e)),
        };
        match &view {
            Some(v) => {
                eval_id = v.id;
                bar.set_message(format!("job {}: evaluation e{:06} {}, {} placed", reg.job, v.id, v.status, v.placed));
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
        // Failed instances waiting for their reschedule delay: what can be
        // done now is done (the status below says when they follow).
        let waits = |v: &EvalView| v.status == "pending" && v.wait_until_ms.is_some();
        if view.as_ref().is_some_and(|v| !v.is_open() || v.status == "blocked" || waits(v)) || left.is_zero() {
            break view;
        }
    };
    // In a federation, what does not fit here may be delegated: a blocked
    // evaluation is followed by one that counts the delegated instances.
    let federated = c.get::<serde_json::Value>("/v1/federation/delegations").is_ok();
    let mut eval = eval;
    if federated && eval.as_ref().is_some_and(|e| e.status == "blocked") {
        bar.set_message(format!("job {}: offering what does not fit here to peers", reg.job));
        let until = Instant::now() + DELEGATION_WAIT.min(deadline.saturating_duration_since(Instant::now()));
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(250));
            let latest = c.job(&reg.job).map_err(api)?.eval;
            if latest.as_ref().is_some_and(|e| e.status == "complete") {
                eval = latest;
                break;
            }
        }
    }
    // A rolling update: followed until every instance of the version is
    // healthy, it failed, or the wait is over.
    let placed = eval.as_ref().is_none_or(|e| e.status != "blocked");
    let mut deployment = c.deployment(&reg.job, Some(reg.version)).ok().filter(|_| placed);
    // Canaries all healthy and waiting for a promotion: what was asked is done.
    let awaiting = |d: &DeploymentView| {
        d.groups.iter().any(|g| g.canaries > 0 && !g.promoted)
            && d.groups.iter().all(|g| g.promoted || g.canaries == 0 || g.healthy >= g.canaries)
    };
    while let Some(d) = deployment.as_ref().filter(|d| d.status == "running" && !awaiting(d)) {
        let healthy: u32 = d.groups.iter().map(|g| g.healthy).sum();
        let desired: u32 = d.groups.iter().map(|g| g.desired).sum();
        let older: u32 = d.groups.iter().map(|g| g.older).sum();
        bar.set_message(format!(
            "job {}: deployment of version {}: {healthy} of {desired} healthy, {older} of the older version left ({})",
            reg.job, d.job_version, d.description
        ));
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        deployment = Some(c.deployment(&reg.job, Some(reg.version)).map_err(api)?);
    }
    bar.finish_and_clear();
    let status = c.job(&reg.job).map_err(api)?;
    if json {
        print_json(&status)?;
    } else {
        print_job(&status);
        if let Some(d) = &deployment {
            println!();
            print_deployment(d);
            if d.status == "running" && awaiting(d) {
                println!("its canaries are healthy: `hanse job promote {}` replaces the rest", reg.job);
            }
        }
    }
    match deployment.as_ref().map(|d| d.status.as_str()) {
        Some("failed") => anyhow::bail!(
            "the deployment of job {} version {} failed: {}",
            reg.job,
            reg.version,
            deployment.as_ref().map_or("", |d| d.description.as_str())
        ),
        Some("running") if deployment.as_ref().is_some_and(awaiting) => {}
        Some("running") => anyhow::bail!(
            "the deployment of job {} version {} is still running after {timeout:?}; \
             follow it with `hanse job deployment status {}`",
            reg.job,
            reg.version,
            reg.job
        ),
        _ => {}
    }
    match eval {
        // What it printed decides: a job whose instances failed for good
        // (a start error, say) did not run, whatever its evaluation placed.
        _ if status.summary.status == "failed" => {
            anyhow::bail!("job {} failed: its instances failed for good; see `hanse job status {}`", reg.job, reg.job)
        }
        Some(e) if e.status == "blocked" => Ok(Outcome::PlacementFailed),
        Some(e) if e.status == "pending" && e.wait_until_ms.is_some() => Ok(Outcome::Ok),
        Some(e) if e.status == "pending" => {
            anyhow::bail!("job {} is still waiting for a scheduler after {timeout:?}; see `hanse job status`", reg.job)
        }
        _ => Ok(Outcome::Ok),
    }
}

pub fn job_plan(c: &Client, path: &Path, verbose: bool, json: bool) -> anyhow::Result<Outcome> {
    let (name, text) = read_spec(path)?;
    let submit = cluster_core::server::api::JobSubmit { spec: text.clone(), source: Some(name.clone()) };
    // A federated cluster answers for its peers too; any other, for itself.
    match c.post::<federation::api::FederatedPlan>("/v1/federation/plan", &submit) {
        Ok(f) => {
            if json {
                print_json(&f)?;
            } else {
                print_plan(&f.local, verbose);
                print_federated(&f);
            }
            return Ok(if f.left == 0 { Outcome::Ok } else { Outcome::PlacementFailed });
        }
        Err(e) if e.status() == Some(404) => {}
        Err(e) => return Err(api(e)),
    }
    let report = c.plan(&text, &name).map_err(api)?;
    if json {
        print_json(&report)?;
    } else {
        print_plan(&report, verbose);
    }
    Ok(if report.unplaced == 0 { Outcome::Ok } else { Outcome::PlacementFailed })
}

fn print_federated(f: &federation::api::FederatedPlan) {
    if f.local.unplaced == 0 {
        return;
    }
    println!(
        "\nfederation: {} of the {} unplaced here",
        plural(u64::from(f.local.unplaced as u32 - f.left), "instance"),
        f.local.unplaced
    );
    let mut t = table(&["cluster", "instances", "why"]);
    t.add_row(vec![f.local.fleet.clone(), f.local.placed.to_string(), "local".into()]);
    for (cluster, group, n) in &f.delegated {
        t.add_row(vec![cluster.clone(), n.to_string(), format!("delegated (group {group})")]);
    }
    for (cluster, why) in &f.refused {
        t.add_row(vec![cluster.clone(), "0".into(), format!("refused: {why}")]);
    }
    println!("{t}");
    if f.left > 0 {
        println!("{} would wait for capacity", plural(u64::from(f.left), "instance"));
    }
}

pub fn delegations(c: &Client, json: bool) -> anyhow::Result<Outcome> {
    let d: federation::api::Delegations = c.get("/v1/federation/delegations").map_err(|e| match e.status() {
        Some(404) => anyhow::anyhow!(
            "this cluster takes no part in a federation (no [federation] policy in its servers' config)"
        ),
        _ => api(e),
    })?;
    if json {
        print_json(&d)?;
        return Ok(Outcome::Ok);
    }
    if d.outbound.is_empty() && d.inbound.is_empty() {
        println!("{}: no delegations", d.cluster);
        return Ok(Outcome::Ok);
    }
    if !d.outbound.is_empty() {
        let mut t = table(&["outbound", "to", "job", "instances", "state", "running", "note"]);
        for o in &d.outbound {
            let state = if o.state == "revoking" { "revoking (not yet confirmed)".into() } else { o.state.clone() };
            t.add_row(vec![
                o.id.clone(),
                o.target.clone(),
                format!("{}.{}", o.job, o.group),
                o.indices.len().to_string(),
                state,
                format!("{}/{}", o.running, o.indices.len()),
                o.note.clone(),
            ]);
        }
        println!("{t}");
    }
    if !d.inbound.is_empty() {
        let mut t = table(&["inbound", "from", "job here", "instances", "state", "running", "returned"]);
        for i in &d.inbound {
            t.add_row(vec![
                i.id.clone(),
                i.origin.clone(),
                i.job.clone(),
                i.indices.len().to_string(),
                i.state.clone(),
                i.running.to_string(),
                i.returned.len().to_string(),
            ]);
        }
        println!("{t}");
    }
    Ok(Outcome::Ok)
}

pub fn print_plan(r: &PlanReport, verbose: bool) {
    println!(
        "{} ({}, objective {}): {} on {} ({})",
        r.job,
        r.job_type,
        r.objective,
        plural(r.placed as u64 + r.unplaced, "instance"),
        r.fleet,
        plural(r.nodes as u64, "node")
    );
    println!("  placed {}, unplaced {}", r.placed, r.unplaced);
    if r.stops > 0 {
        println!("  stopped {}", r.stops);
    }
    if r.kept_older > 0 {
        println!(
            "  {} of the older version keep running: their replacements cannot be placed yet",
            plural(r.kept_older, "instance")
        );
    }
    if r.rolling > 0 {
        println!(
            "  rolling update: {} of the older version are replaced as the deployment goes, \
             max_parallel at a time, each once its replacement is healthy; this plan starts the first",
            plural(r.rolling, "instance")
        );
    }
    if r.deferred > 0 {
        println!(
            "  and {} more placements or stops not planned here: the cluster plans a job in parts of at most {}",
            r.deferred,
            cluster_core::scheduler::PLAN_CHANGES_MAX
        );
    }
    if !r.by_class.is_empty() {
        let mut t = table(&["node class", "instances", "nodes"]);
        for (class, c) in &r.by_class {
            t.add_row(vec![class.clone(), c.instances.to_string(), c.nodes.to_string()]);
        }
        println!("\n{t}");
    }
    if verbose && !r.placements.is_empty() {
        let mut t = table(&["instance", "node", "class", "score"]);
        for p in &r.placements {
            t.add_row(vec![
                format!("{}.{}[{}]", r.job, p.group, p.index),
                p.node.clone(),
                p.class.clone(),
                format!("{:.3}", p.score),
            ]);
        }
        println!("\n{t}");
    }
    for u in &r.unplaced_groups {
        println!("\nunplaced: {} of group {}", plural(u.count.into(), "instance"), u.group);
        for reason in &u.reasons {
            println!("  {:>6} nodes  {}", reason.nodes, reason.reason);
        }
    }
}

fn print_eval(e: &EvalView) {
    println!("evaluation e{:06} ({}): {}, {} placed", e.id, e.trigger, e.status, e.placed);
    if let Some(at) = e.wait_until_ms.filter(|_| e.status == "pending") {
        println!(
            "  failed instances are placed again {} ({}): their reschedule delay",
            from_now(at),
            crate::output::unix_ms_text(at)
        );
    }
    for u in &e.unplaced {
        println!("  unplaced: {} of group {}: {}", plural(u.count.into(), "instance"), u.group, u.explanation);
    }
}

/// "in 25s", "now" (at or past `at_ms`, Unix ms, by this machine's clock).
fn from_now(at_ms: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    if at_ms <= now { "now".into() } else { format!("in {}", seconds(at_ms - now)) }
}

/// Milliseconds as "45s", "2m30s", "1h".
fn seconds(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

fn alloc_table(allocs: &[AllocView]) -> comfy_table::Table {
    let mut t = table(&["alloc", "instance", "node", "version", "desired", "status"]);
    for a in allocs {
        t.add_row(vec![
            a.name.clone(),
            format!("{}.{}[{}]", a.job, a.group, a.index),
            a.node.clone(),
            a.job_version.to_string(),
            a.desired.clone(),
            a.status.clone(),
        ]);
    }
    t
}

fn print_job(s: &JobStatus) {
    let j = &s.summary;
    let counts: Vec<String> = j.allocs.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!("job {} ({}, objective {}), version {}: {}", j.id, j.job_type, j.objective, j.version, j.status);
    let instances: Vec<String> = j
        .instances
        .iter()
        .map(|(k, v)| if k == "failed" { format!("{v} failed for good") } else { format!("{v} {k}") })
        .collect();
    let instances = if instances.is_empty() { String::new() } else { format!(" ({})", instances.join(", ")) };
    println!(
        "  {} wanted{instances}; allocations: {}",
        plural(j.desired, "instance"),
        if counts.is_empty() { "none".into() } else { counts.join(", ") }
    );
    if let Some(e) = &s.eval {
        print!("  ");
        print_eval(e);
    }
    // An update that cannot be placed takes nothing down: say what runs.
    let older = (s.allocations.iter())
        .filter(|a| {
            a.desired == "run" && a.job_version < j.version && matches!(a.status.as_str(), "pending" | "running")
        })
        .count();
    if older > 0 && s.eval.as_ref().is_some_and(|e| e.status == "blocked") {
        println!(
            "  version {} cannot be placed yet: {} of the older version keep running until it can",
            j.version,
            plural(older as u64, "instance")
        );
    }
    let live: Vec<AllocView> =
        s.allocations.iter().filter(|a| a.status != "lost" || a.desired == "run").cloned().collect();
    if !live.is_empty() {
        println!("\n{}", alloc_table(&live));
    }
}

pub fn job_status(c: &Client, id: Option<&str>, json: bool) -> anyhow::Result<Outcome> {
    let Some(id) = id else { return job_list(c, "", json) };
    let s = c.job(id).map_err(api)?;
    let delegations = c.get::<federation::api::Delegations>("/v1/federation/delegations").ok();
    let waiting = delegations.as_ref().and_then(|d| d.waiting.get(&s.summary.id).cloned());
    let remote: Vec<federation::api::Outbound> =
        delegations.map(|d| d.outbound.into_iter().filter(|o| o.job == s.summary.id).collect()).unwrap_or_default();
    if json {
        // The job's status as the cluster API gives it, and, in a
        // federation, its delegations and what waits for a peer.
        let mut v = serde_json::to_value(&s)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("delegations".into(), serde_json::to_value(&remote)?);
            o.insert("waiting".into(), serde_json::to_value(&waiting)?);
        }
        print_json(&v)?;
    } else {
        print_job(&s);
        if let Some(w) = &waiting {
            println!("  waiting for a peer: {} (retried as summaries change)", plural(w.instances.into(), "instance"));
            for (cluster, why) in &w.refused {
                println!("    {cluster}: {why}");
            }
        }
        let active: Vec<_> = remote.iter().filter(|o| o.active()).collect();
        if !active.is_empty() {
            let mut t = table(&["delegated to", "group", "instances", "running", "state"]);
            for o in active {
                t.add_row(vec![
                    o.target.clone(),
                    o.group.clone(),
                    o.indices.len().to_string(),
                    o.running.to_string(),
                    if o.state == "revoking" {
                        "revoking: the target has not yet confirmed the stop".into()
                    } else {
                        o.state.clone()
                    },
                ]);
            }
            println!("\n{t}");
        }
        let elsewhere: Vec<federation::api::RemoteAllocations> =
            c.get(&format!("/v1/federation/jobs/{}", s.summary.id)).unwrap_or_default();
        let rows: Vec<_> = elsewhere.iter().flat_map(|r| r.allocations.iter().map(move |a| (r, a))).collect();
        if !rows.is_empty() {
            let mut t = table(&["cluster", "alloc", "instance there", "node", "desired", "status"]);
            for (r, a) in rows {
                t.add_row(vec![
                    r.cluster.clone(),
                    a.name.clone(),
                    format!("{}[{}]", a.group, a.index),
                    a.node.clone(),
                    a.desired.clone(),
                    a.status.clone(),
                ]);
            }
            println!("\n{t}");
        }
    }
    Ok(Outcome::Ok)
}

/// `hanse job list`; `query`: the filters (`?status=...`), or empty.
pub fn job_list(c: &Client, query: &str, json: bool) -> anyhow::Result<Outcome> {
    let jobs: Vec<JobSummary> = c.get_all(&format!("/v1/jobs{query}")).map_err(api)?;
    if json {
        print_json(&jobs)?;
        return Ok(Outcome::Ok);
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["job", "type", "version", "status", "wanted", "running", "pending"]);
    for j in &jobs {
        let n = |k: &str| j.allocs.get(k).copied().unwrap_or(0).to_string();
        t.add_row(vec![
            j.id.clone(),
            j.job_type.clone(),
            j.version.to_string(),
            j.status.clone(),
            j.desired.to_string(),
            n("running"),
            n("pending"),
        ]);
    }
    println!("{t}");
    Ok(Outcome::Ok)
}

pub fn job_stop(c: &Client, id: &str, json: bool) -> anyhow::Result<Outcome> {
    let r = c.stop(id).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        println!("job {} stopping (version {}), evaluation e{:06}", r.job, r.version, r.eval);
    }
    Ok(Outcome::Ok)
}

/// `hanse job scale JOB GROUP COUNT`: only the count changes, so nothing
/// running restarts.
pub fn job_scale(c: &Client, id: &str, group: &str, count: u32, json: bool) -> anyhow::Result<Outcome> {
    let r = c.scale(id, group, count).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "job {} group {group} scaled to {} (version {}), evaluation e{:06}",
            r.job,
            plural(count.into(), "instance"),
            r.version,
            r.eval
        );
    }
    Ok(Outcome::Ok)
}

/// `hanse job history JOB`.
pub fn job_history(c: &Client, id: &str, json: bool) -> anyhow::Result<Outcome> {
    let h = c.versions(id).map_err(api)?;
    if json {
        print_json(&h)?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["version", "", "stable", "deployment", "changes"]);
    for v in &h.versions {
        t.add_row(vec![
            v.version.to_string(),
            if v.current { "current".into() } else { String::new() },
            if v.stable { "yes".into() } else { "-".into() },
            v.deployment.clone().unwrap_or_else(|| "-".into()),
            if v.changes.is_empty() { "-".into() } else { v.changes.join("; ") },
        ]);
    }
    println!("{t}");
    Ok(Outcome::Ok)
}

/// `hanse job inspect JOB [--version N]`: the spec as it was submitted
/// (as the cluster keeps it, in JSON, for a job registered otherwise, or
/// with `--json`).
pub fn job_inspect(c: &Client, id: &str, version: Option<u64>, json: bool) -> anyhow::Result<Outcome> {
    let h = c.versions(id).map_err(api)?;
    let found = match version {
        Some(v) => h.versions.iter().find(|x| x.version == v),
        None => h.versions.iter().find(|x| x.current),
    };
    let Some(v) = found else {
        let kept: Vec<String> = h.versions.iter().map(|v| v.version.to_string()).collect();
        anyhow::bail!(
            "job {id} has no version {} kept (kept: {}); see `hanse job history {id}`",
            version.unwrap_or_default(),
            kept.join(", ")
        );
    };
    if v.spec.is_none() {
        anyhow::bail!("job {id}'s specs are shown only to a token that may submit in its namespace");
    }
    match &v.submitted {
        Some(text) if !json => print!("{text}{}", if text.ends_with('\n') { "" } else { "\n" }),
        _ => print_json(v)?,
    }
    Ok(Outcome::Ok)
}

/// `hanse job revert JOB VERSION`.
pub fn job_revert(c: &Client, id: &str, version: u64, json: bool) -> anyhow::Result<Outcome> {
    let r = c.revert(id, version).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "job {} reverted to version {version}: registered as version {}, evaluation e{:06}",
            r.job, r.version, r.eval
        );
    }
    Ok(Outcome::Ok)
}

/// `hanse job promote JOB [--group G]`.
pub fn job_promote(c: &Client, id: &str, group: Option<&str>, json: bool) -> anyhow::Result<Outcome> {
    let r = c.promote(id, group).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        let what = group.map_or("canaries".to_string(), |g| format!("canaries of group {g}"));
        println!("job {id}: {what} promoted; the rest of the old version is replaced next");
    }
    Ok(Outcome::Ok)
}

/// `hanse job deployment status JOB`.
pub fn deployment_status(c: &Client, id: &str, json: bool) -> anyhow::Result<Outcome> {
    let d = c.deployment(id, None).map_err(api)?;
    if json {
        print_json(&d)?;
    } else {
        print_deployment(&d);
    }
    Ok(Outcome::Ok)
}

fn print_deployment(d: &DeploymentView) {
    println!("deployment of job {} version {}: {} ({})", d.job, d.job_version, d.status, d.description);
    let mut t = table(&["group", "desired", "placed", "healthy", "unhealthy", "older left", "canaries", "promoted"]);
    for g in &d.groups {
        t.add_row(vec![
            g.name.clone(),
            g.desired.to_string(),
            g.placed.to_string(),
            g.healthy.to_string(),
            g.unhealthy.to_string(),
            g.older.to_string(),
            g.canaries.to_string(),
            if g.canaries == 0 {
                "-".into()
            } else if g.promoted {
                "yes".into()
            } else {
                "no".into()
            },
        ]);
    }
    println!("{t}");
}

/// `hanse job deployment fail JOB`.
pub fn deployment_fail(c: &Client, id: &str, json: bool) -> anyhow::Result<Outcome> {
    let running = c.deployment(id, None).map_err(api)?;
    let r = c.fail_deployment(id).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        let d = c.deployment(id, Some(running.job_version)).map_err(api)?;
        println!("deployment of job {id} version {} failed: {}", d.job_version, d.description);
    }
    Ok(Outcome::Ok)
}

/// `hanse alloc restart ALLOC [--task T]`.
pub fn alloc_restart(c: &Client, arg: &str, task: Option<&str>, json: bool) -> anyhow::Result<Outcome> {
    let id = resolve_alloc(c, arg)?;
    let r = c.restart_alloc(&id, task).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        println!("allocation a{:06}: {}", r.alloc, r.done);
    }
    Ok(Outcome::Ok)
}

/// `hanse alloc signal ALLOC [--task T] [-s SIGNAL]`.
pub fn alloc_signal(c: &Client, arg: &str, task: Option<&str>, signal: &str, json: bool) -> anyhow::Result<Outcome> {
    // Refused here before anything is asked of the cluster.
    cluster_core::server::api::parse_signal(signal).map_err(anyhow::Error::msg)?;
    let id = resolve_alloc(c, arg)?;
    let r = c.signal_alloc(&id, task, signal).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        println!("allocation a{:06}: {}", r.alloc, r.done);
    }
    Ok(Outcome::Ok)
}

/// `hanse alloc stop ALLOC`: stops it; the job places it again.
pub fn alloc_stop(c: &Client, arg: &str, json: bool) -> anyhow::Result<Outcome> {
    let id = resolve_alloc(c, arg)?;
    let r = c.stop_alloc(&id).map_err(api)?;
    if json {
        print_json(&r)?;
    } else {
        match r.eval {
            Some(e) => println!(
                "allocation a{:06} stopping; evaluation e{e:06} places its instance again (`hanse job status` shows where)",
                r.alloc
            ),
            None => println!("allocation a{:06} was already stopping or ended: nothing changed", r.alloc),
        }
    }
    Ok(Outcome::Ok)
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

/// `hanse node list`; `query`: the filters, or empty.
pub fn node_list(c: &Client, query: &str, json: bool) -> anyhow::Result<Outcome> {
    let nodes: Vec<NodeView> = c.get_all(&format!("/v1/nodes{query}")).map_err(api)?;
    if json {
        print_json(&nodes)?;
        return Ok(Outcome::Ok);
    }
    let mut t =
        table(&["node", "class", "zone", "status", "eligible", "cpu used/total", "mem GiB used/total", "allocs"]);
    for n in &nodes {
        t.add_row(vec![
            n.id.clone(),
            n.class.clone(),
            n.zone.clone(),
            if n.draining { format!("{} (draining)", n.status) } else { n.status.clone() },
            n.eligible.to_string(),
            format!("{}/{}", n.cpu_used_millis as f64 / 1000.0, n.cpu_millis as f64 / 1000.0),
            format!("{}/{}", gib(n.memory_used_bytes), gib(n.memory_bytes)),
            n.allocs.to_string(),
        ]);
    }
    println!("{t}");
    println!("{}", plural(nodes.len() as u64, "node"));
    Ok(Outcome::Ok)
}

pub fn node_status(c: &Client, id: &str, json: bool) -> anyhow::Result<Outcome> {
    let s = c.node(id).map_err(api)?;
    if json {
        print_json(&s)?;
        return Ok(Outcome::Ok);
    }
    let n = &s.node;
    println!(
        "node {} ({}, {} / {}), {}{}, eligible {}",
        n.id,
        n.class,
        n.region,
        n.zone,
        n.status,
        if n.draining { ", draining" } else { "" },
        n.eligible
    );
    println!(
        "  cpu {} of {} cores used, memory {} of {} GiB used",
        n.cpu_used_millis as f64 / 1000.0,
        n.cpu_millis as f64 / 1000.0,
        gib(n.memory_used_bytes),
        gib(n.memory_bytes)
    );
    if !s.allocations.is_empty() {
        println!("\n{}", alloc_table(&s.allocations));
    }
    Ok(Outcome::Ok)
}

pub fn node_drain(
    c: &Client,
    id: &str,
    disable: bool,
    deadline: Option<Duration>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let r = c.drain(id, !disable, deadline).map_err(api)?;
    if json {
        print_json(&r)?;
        return Ok(Outcome::Ok);
    }
    if disable {
        println!("node {id}: drain ended; it takes new work again");
        return Ok(Outcome::Ok);
    }
    // Each job's evaluation says what could move; an evaluation a later
    // one superseded is skipped (the later one is for the same job).
    if let WriteReply::Evals(evals) = &r {
        for e in evals {
            let _ = c.eval(e.0, Duration::from_secs(10));
        }
    }
    let here: Vec<AllocView> = c.get_all(&format!("/v1/allocations?node={id}")).map_err(api)?;
    let live = |a: &&AllocView| matches!(a.status.as_str(), "pending" | "running");
    let moving = here.iter().filter(live).filter(|a| a.desired == "stop").count();
    let stuck: Vec<&AllocView> = here.iter().filter(live).filter(|a| a.desired == "run").collect();
    let until =
        deadline.map_or("until they can move".to_string(), |d| format!("until they can move, or for {d:?} at most"));
    println!(
        "node {id}: draining; it takes no new work; {} moving to other nodes",
        plural(moving as u64, "allocation")
    );
    if !stuck.is_empty() {
        let names: Vec<&str> = stuck.iter().map(|a| a.name.as_str()).collect();
        println!(
            "  {} cannot move now (no other node fits them; `hanse job status JOB` says why) and keep running here {until}: {}",
            plural(stuck.len() as u64, "allocation"),
            names.join(", ")
        );
    } else if let Some(d) = deadline {
        println!("  what has not stopped within {d:?} is stopped then");
    }
    Ok(Outcome::Ok)
}

/// `hanse node eligibility NODE --enable|--disable`.
pub fn node_eligibility(c: &Client, id: &str, eligible: bool, json: bool) -> anyhow::Result<Outcome> {
    let r = c.eligibility(id, eligible).map_err(api)?;
    if json {
        print_json(&r)?;
    } else if eligible {
        println!("node {id}: eligible; it takes new work");
    } else {
        println!("node {id}: not eligible; it takes no new work, and what runs there keeps running");
    }
    Ok(Outcome::Ok)
}

/// Where `hanse alloc logs` starts reading.
#[derive(Clone, Copy, Debug)]
pub enum LogStart {
    /// The oldest byte the agent kept.
    Oldest,
    /// A byte offset in the task's output (counted across rotations).
    Offset(u64),
    /// The last lines (`--tail N`).
    Lines(u64),
}

/// Prints a task's log, a chunk at a time (memory stays bounded by one
/// chunk, whatever the log's size): without `follow`, everything from
/// `start` to where the output ended when the command began; with it,
/// then keeps printing until the task is done or Ctrl-C. Output rotated
/// away before it was read is said on stderr.
pub fn alloc_logs(
    c: &Client,
    alloc: &str,
    task: Option<&str>,
    stderr: bool,
    follow: bool,
    start: LogStart,
) -> anyhow::Result<Outcome> {
    use std::io::Write as _;
    let alloc = &resolve_alloc(c, alloc)?;
    let read = |offset: u64, limit: u64| c.logs(alloc, task, stderr, offset, limit).map_err(api);
    // Where the output ends now: a read from the end, of nothing. A server
    // of an earlier release cannot say (400): read until nothing comes.
    let at_end = match c.logs(alloc, task, stderr, u64::MAX, 0) {
        Err(e) if e.status() == Some(400) && matches!(start, LogStart::Oldest) => {
            LogsChunk { next: u64::MAX, ..LogsChunk::default() }
        }
        other => other.map_err(api)?,
    };
    if at_end.next == u64::MAX && !matches!(start, LogStart::Oldest) {
        anyhow::bail!("the agent of {alloc}'s node cannot say where its output ends (an older release): upgrade it");
    }
    let end = at_end.next;
    let mut offset = match start {
        LogStart::Oldest => at_end.oldest,
        LogStart::Offset(o) => o,
        LogStart::Lines(n) => {
            let (from, all) = tail_start(&read, at_end.oldest, end, n)?;
            if !all && at_end.oldest > 0 {
                eprintln!("[fewer than {n} lines were kept: the first {} bytes were rotated away]", at_end.oldest);
            }
            from
        }
    };
    if let LogStart::Oldest = start {
        if at_end.oldest > 0 {
            eprintln!("[the first {} bytes were rotated away; this starts at byte {}]", at_end.oldest, at_end.oldest);
        }
    }
    if offset > end {
        anyhow::bail!("the output of {alloc} is {end} bytes long: there is no byte {offset}");
    }
    let mut out = std::io::stdout().lock();
    loop {
        // Without -f, no further than where the output ended at the start.
        if !follow && offset >= end {
            return Ok(Outcome::Ok);
        }
        let limit = if follow { rpc_chunk() } else { rpc_chunk().min(end - offset) };
        let chunk = read(offset, limit)?;
        if chunk.oldest > offset {
            eprintln!("[{} bytes rotated away before they were read]", chunk.oldest - offset);
        }
        out.write_all(&chunk.data)?;
        out.flush()?;
        let more = chunk.next > offset;
        offset = chunk.next;
        if !follow && (offset >= end || !more) {
            return Ok(Outcome::Ok);
        }
        if follow && chunk.done && !more {
            return Ok(Outcome::Ok);
        }
        if !more {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The largest read the servers answer.
fn rpc_chunk() -> u64 {
    cluster_core::agent::rpc::LOG_CHUNK_MAX
}

/// The offset where the last `lines` lines before `end` begin (a last
/// line without its newline counts), scanning back one read at a time,
/// and whether all of them were kept (else: from `oldest`, the kept ones).
fn tail_start(
    read: &dyn Fn(u64, u64) -> anyhow::Result<LogsChunk>,
    oldest: u64,
    end: u64,
    lines: u64,
) -> anyhow::Result<(u64, bool)> {
    if lines == 0 {
        return Ok((end, true));
    }
    // The newline that ends the last line is not a boundary.
    let mut last = end;
    let mut seen = 0;
    while last > oldest {
        let from = last.saturating_sub(rpc_chunk()).max(oldest);
        let chunk = read(from, last - from)?;
        // Where the bytes read begin: later than asked if what was asked
        // was rotated away meanwhile.
        let base = chunk.next - chunk.data.len() as u64;
        for (i, b) in chunk.data.iter().enumerate().rev() {
            let at = base + i as u64;
            if *b == b'\n' && at + 1 < end && at < last {
                seen += 1;
                if seen == lines {
                    return Ok((at + 1, true));
                }
            }
        }
        if base > from || chunk.data.is_empty() {
            return Ok((base.max(oldest), false));
        }
        last = from;
    }
    // The kept output has fewer lines: all of them, and said if some were lost.
    Ok((oldest, oldest == 0))
}

/// An allocation's id from what a user may type: `a000042`, `42`, or an
/// instance's name `JOB.GROUP[INDEX]` (its live allocation, else its latest).
fn resolve_alloc(c: &Client, arg: &str) -> anyhow::Result<String> {
    let Some((path, index)) = arg.strip_suffix(']').and_then(|a| a.split_once('[')) else {
        return Ok(arg.to_string());
    };
    let (job, group) = path
        .rsplit_once('.')
        .with_context(|| format!("`{arg}` is neither an allocation id (a000042) nor an instance (JOB.GROUP[INDEX])"))?;
    let index: u32 = index.parse().with_context(|| format!("`{index}` in `{arg}` is not an instance index"))?;
    let status = c.job(job).map_err(api)?;
    let mut mine: Vec<&AllocView> =
        status.allocations.iter().filter(|a| a.group == group && a.index == index).collect();
    mine.sort_by_key(|a| (a.desired == "run" && matches!(a.status.as_str(), "running" | "pending"), a.id));
    mine.last().map(|a| a.name.clone()).with_context(|| format!("job {job} has no allocation for {arg}"))
}

/// `hanse alloc status [ID]`; `query`: the list's filters, or empty.
pub fn alloc_status(c: &Client, id: Option<&str>, query: &str, json: bool) -> anyhow::Result<Outcome> {
    let allocs = match id {
        Some(id) => vec![c.alloc(&resolve_alloc(c, id)?).map_err(api)?],
        None => c.get_all(&format!("/v1/allocations{query}")).map_err(api)?,
    };
    if json {
        if id.is_some() {
            print_json(&allocs[0])?;
        } else {
            print_json(&allocs)?;
        }
    } else {
        println!("{}", alloc_table(&allocs));
        if let [a] = allocs.as_slice() {
            print_tasks(a);
        }
    }
    Ok(Outcome::Ok)
}

/// One allocation's tasks as its agent reported them.
fn print_tasks(a: &AllocView) {
    if a.tasks.is_empty() {
        println!("no task reported yet");
        return;
    }
    let mut t = table(&["task", "state", "restarts", "exit", "message"]);
    for task in &a.tasks {
        let exit = match (task.exit_code, task.signal) {
            (Some(c), _) => format!("code {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "-".into(),
        };
        t.add_row(vec![task.name.clone(), task.state.clone(), task.restarts.to_string(), exit, task.message.clone()]);
    }
    println!("{t}");
    if let Some(h) = &a.health {
        println!("health: {h}{}", if a.canary { " (canary)" } else { "" });
    }
    if let Some(at) = a.failed_at_ms {
        println!("failed at {}", crate::output::unix_ms_text(at));
    }
    if let Some(at) = a.reschedule_at_ms {
        let after = at.saturating_sub(a.failed_at_ms.unwrap_or(at));
        println!(
            "reschedule: its instance is placed again {} ({}), {} after it failed",
            from_now(at),
            crate::output::unix_ms_text(at),
            seconds(after)
        );
    } else if a.reschedule_final {
        println!(
            "reschedule: none; its instance is not placed again (a task could not start, or the group's \
             [group.reschedule] limit is reached) until the job changes"
        );
    }
    if !a.reschedules.is_empty() {
        let events: Vec<String> = (a.reschedules.iter())
            .map(|(at, waited)| format!("failed {}, waited {}", crate::output::unix_ms_text(*at), seconds(*waited)))
            .collect();
        println!("earlier reschedules of its instance: {}", events.join("; "));
    }
    let checks: Vec<_> = a.tasks.iter().flat_map(|t| t.checks.iter().map(move |c| (t, c))).collect();
    if !checks.is_empty() {
        let mut t = table(&["task", "check", "type", "status", "output"]);
        for (task, c) in checks {
            t.add_row(vec![task.name.clone(), c.name.clone(), c.kind.clone(), c.status.clone(), c.output.clone()]);
        }
        println!("{t}");
    }
}

pub fn list_peers(c: &Client, json: bool) -> anyhow::Result<Outcome> {
    let peers = c.peers().map_err(api)?;
    if json {
        print_json(&peers)?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["id", "address", "role"]);
    for p in &peers {
        t.add_row(vec![p.id.to_string(), p.address.clone(), if p.leader { "leader" } else { "follower" }.into()]);
    }
    println!("{t}");
    Ok(Outcome::Ok)
}

pub fn add_peer(c: &Client, id: u64, address: &str) -> anyhow::Result<Outcome> {
    c.add_peer(id, address).map_err(api)?;
    println!("server {id} at {address} added as a voter");
    Ok(Outcome::Ok)
}

pub fn remove_peer(c: &Client, id: u64) -> anyhow::Result<Outcome> {
    c.remove_peer(id).map_err(api)?;
    println!("server {id} removed");
    Ok(Outcome::Ok)
}

pub fn transfer_leader(c: &Client, id: u64) -> anyhow::Result<Outcome> {
    c.transfer_leader(id).map_err(api)?;
    println!("leadership transfer to server {id} requested");
    Ok(Outcome::Ok)
}

pub fn server_members(c: &Client, json: bool) -> anyhow::Result<Outcome> {
    let leader = c.leader().map_err(api)?;
    let peers = c.peers().map_err(api)?;
    if json {
        print_json(&serde_json::json!({ "leader": leader, "servers": peers }))?;
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["raft id", "address", "role"]);
    for p in &peers {
        t.add_row(vec![p.id.to_string(), p.address.clone(), if p.leader { "leader" } else { "follower" }.into()]);
    }
    println!("{t}");
    println!("term {}, commit {}, applied {}", leader.term, leader.commit, leader.applied);
    Ok(Outcome::Ok)
}

/// `hanse system gc`.
pub fn system_gc(c: &Client, json: bool) -> anyhow::Result<Outcome> {
    let counts: cluster_core::state::GcCounts = c.put("/v1/system/gc", &serde_json::json!({})).map_err(api)?;
    if json {
        print_json(&counts)?;
    } else {
        println!(
            "collected {} jobs, {} allocations, {} evaluations, {} nodes",
            counts.jobs, counts.allocs, counts.evals, counts.nodes
        );
    }
    Ok(Outcome::Ok)
}

/// `hanse operator audit`: the trail of the server the client talks to.
pub fn operator_audit(c: &Client, since: Option<Duration>, limit: u64, json: bool) -> anyhow::Result<Outcome> {
    use cluster_core::server::audit::AuditRecord;
    let now = cluster_core::server::unix_ms();
    let since_ms = since.map_or(0, |d| now.saturating_sub(d.as_millis() as u64));
    let records: Vec<AuditRecord> =
        c.get(&format!("/v1/operator/audit?since_ms={since_ms}&limit={limit}")).map_err(api)?;
    if json {
        print_json(&records)?;
        return Ok(Outcome::Ok);
    }
    if records.is_empty() {
        println!("nothing recorded{}", if since.is_some() { " in that time" } else { "" });
        return Ok(Outcome::Ok);
    }
    let mut t = table(&["time", "from", "token", "action", "outcome"]);
    for r in &records {
        let from = r.origin.clone().map(|o| format!("cluster {o}")).or_else(|| r.source.clone()).unwrap_or_default();
        let token = match &r.accessor {
            Some(a) => format!("{} ({})", r.token, a.get(..8).unwrap_or(a)),
            None => r.token.clone(),
        };
        let action = match &r.object {
            Some(o) => format!("{} {} ({o})", r.method, r.route),
            None => format!("{} {}", r.method, r.route),
        };
        t.add_row(vec![
            crate::output::unix_ms_text(r.time_ms),
            from,
            token,
            action,
            format!("{} {}", r.outcome, r.status),
        ]);
    }
    println!("{t}");
    Ok(Outcome::Ok)
}
