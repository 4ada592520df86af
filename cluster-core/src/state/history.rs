//! What the state keeps of a job beside its current version: its older
//! versions, which versions proved stable, and its deployments.
//!
//! A deployment ([`Deployment`]) opens when a version of a service job with
//! an `[group.update]` is registered, and moves on here, deterministically,
//! as plans and the agents' health reports are applied: canaries promoted
//! (`auto_promote`), success once every instance of the version is healthy
//! and no older one is left, failure when one is unhealthy, and then with
//! `auto_revert` the last stable version registered again.

use serde::{Deserialize, Serialize};

use super::ClusterState;
use crate::ids::{EvalId, JobId};
use crate::model::alloc::{AllocHealth, AllocStatus, CheckStatus, DesiredStatus, TaskPhase};
use crate::model::deployment::{Deployment, DeploymentGroup, DeploymentStatus};
use crate::model::eval::EvalTrigger;
use crate::model::job::{Job, JobType, TaskGroup};

/// Versions of a job kept, the current one included (Nomad keeps 6).
pub const JOB_VERSIONS_KEPT: usize = 6;

/// A job's past, kept while the job is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobHistory {
    /// Older versions, oldest first: at most [`JOB_VERSIONS_KEPT`] - 1.
    pub older: Vec<Job>,
    /// Versions whose deployment succeeded, ascending.
    pub stable: Vec<u64>,
    /// Versions `auto_revert` registered (never rolled back in turn),
    /// ascending; the last [`JOB_VERSIONS_KEPT`].
    pub rollbacks: Vec<u64>,
    /// The spec text each kept version was submitted as (a revert keeps
    /// the text of the version it reverts to), by version, ascending.
    pub submitted: Vec<(u64, String)>,
    /// Its deployments, oldest first: at most [`JOB_VERSIONS_KEPT`].
    pub deployments: Vec<Deployment>,
}

/// Whether an instance of `a`'s group `ga` may stand for one of `b`'s
/// `gb` unchanged: the jobs and the groups are the same but for version
/// and count and reschedule policy (scaling, a new reschedule policy and
/// reverting to the spec it runs restart nothing; running a stopped job
/// again starts it afresh).
pub(crate) fn same_instances(a: &Job, ga: &TaskGroup, b: &Job, gb: &TaskGroup) -> bool {
    let bare = |j: &Job| Job { groups: Vec::new(), version: 0, ..j.clone() };
    TaskGroup { count: gb.count, reschedule: gb.reschedule, ..ga.clone() } == *gb && bare(a) == bare(b)
}

impl ClusterState {
    /// Job `id`'s older versions, stable versions and deployments.
    pub fn job_history(&self, id: &JobId) -> Option<&JobHistory> {
        self.histories.get(id)
    }

    /// Version `version` of job `id`: the current one or one kept.
    pub fn job_version(&self, id: &JobId, version: u64) -> Option<&Job> {
        let current = self.job(id).filter(|j| j.version == version);
        current.or_else(|| self.histories.get(id)?.older.iter().find(|j| j.version == version))
    }

    /// The text version `version` of job `id` was submitted as, if kept.
    pub fn submitted(&self, id: &JobId, version: u64) -> Option<&str> {
        let h = self.histories.get(id)?;
        h.submitted.iter().find(|(v, _)| *v == version).map(|(_, t)| t.as_str())
    }

    /// Keeps `text` as what version `version` of job `id` was submitted as.
    pub(crate) fn keep_submitted(&mut self, id: &JobId, version: u64, text: &str) {
        let h = self.histories.entry(id.clone()).or_default();
        h.submitted.retain(|(v, _)| *v != version);
        h.submitted.push((version, text.to_string()));
        let kept: Vec<u64> = h.older.iter().map(|j| j.version).collect();
        h.submitted.retain(|(v, _)| *v == version || kept.contains(v));
    }

    /// The deployment of version `version` of job `id`, if it had one.
    pub fn deployment_of(&self, id: &JobId, version: u64) -> Option<&Deployment> {
        self.histories.get(id)?.deployments.iter().rev().find(|d| d.job_version == version)
    }

    /// Job `id`'s latest deployment, if it has had one.
    pub fn latest_deployment(&self, id: &JobId) -> Option<&Deployment> {
        self.histories.get(id)?.deployments.last()
    }

    /// The deployment running for job `id`'s current version, if any.
    pub fn active_deployment(&self, id: &JobId) -> Option<&Deployment> {
        let job = self.job(id)?;
        self.latest_deployment(id).filter(|d| d.status.is_active() && d.job_version == job.version)
    }

    /// Keeps `old`, the version a newer one replaces.
    pub(super) fn keep_version(&mut self, old: Job) {
        let h = self.histories.entry(old.id.clone()).or_default();
        h.older.push(old);
        let over = h.older.len().saturating_sub(JOB_VERSIONS_KEPT - 1);
        h.older.drain(..over);
        // Texts go with their versions (the current one is added after).
        let first = h.older.first().map_or(u64::MAX, |j| j.version);
        h.submitted.retain(|(v, _)| *v >= first);
    }

    /// Opens the deployment of `job`'s current version, ending the one
    /// before (cancelled): when it is a running service with groups that
    /// have an `[group.update]`.
    pub(crate) fn open_deployment(&mut self, id: &JobId) {
        let Some(job) = self.job(id) else { return };
        let stale = crate::scheduler::reconcile::stale_held(self, job);
        // Canaries are tried beside an older version; a group with none
        // running (a first version, say) has nothing to compare them to.
        // At-most-once work never runs beside its replacement: no canaries.
        let groups: Vec<DeploymentGroup> = job
            .groups
            .iter()
            .filter_map(|g| {
                let u = g.update.as_ref()?;
                let beside = g.on_disconnect != crate::model::job::OnDisconnect::Stop;
                let canaries = if beside { self.canaries_wanted(id, job.version, g, u.canary, &stale) } else { 0 };
                Some(DeploymentGroup { name: g.name.clone(), canaries, promoted: canaries == 0 })
            })
            .collect();
        let placed_from = self.next_alloc;
        let (version, open) = (job.version, job.job_type == JobType::Service && !job.stopped && !groups.is_empty());
        let h = self.histories.entry(id.clone()).or_default();
        if let Some(d) = h.deployments.last_mut().filter(|d| d.status.is_active() && d.job_version != version) {
            d.status = DeploymentStatus::Cancelled;
            d.description = format!("version {version} of the job took over");
        }
        if !open || h.deployments.last().is_some_and(|d| d.job_version == version) {
            return;
        }
        h.deployments.push(Deployment {
            job: id.clone(),
            job_version: version,
            status: DeploymentStatus::Running,
            description: "placing the new version".into(),
            groups,
            placed_from: crate::ids::AllocId(placed_from),
        });
        let over = h.deployments.len().saturating_sub(JOB_VERSIONS_KEPT);
        h.deployments.drain(..over);
    }

    /// How many canaries group `g` (of job `id`'s `version`) waits for:
    /// `asked`, or fewer if fewer can run. A canary can run at an index
    /// below `count` where a canary of `version` runs, or where an instance
    /// of an older version runs (or is held elsewhere at an older spec,
    /// `stale`: [`crate::scheduler::reconcile::stale_held`]) and no
    /// instance of `version` but a canary does. A canary is tried beside
    /// the instance at its index, not in its place, so canaries at every
    /// index (`canary = count`, a blue/green update) leave room for all of
    /// them; instances carried over to `version` in place (a revert to
    /// what runs) leave none. 0: nothing older to try canaries beside.
    fn canaries_wanted(
        &self,
        id: &JobId,
        version: u64,
        g: &TaskGroup,
        asked: u32,
        stale: &std::collections::BTreeSet<(std::sync::Arc<str>, u32)>,
    ) -> u32 {
        use std::collections::BTreeSet;
        let mine = |a: &&crate::model::Allocation| a.is_live() && a.group == g.name && a.index < g.count;
        let (mut canaries, mut current) = (BTreeSet::new(), BTreeSet::new());
        for a in self.allocs_of_job(id).filter(mine).filter(|a| a.job_version == version) {
            if a.canary {
                canaries.insert(a.index)
            } else {
                current.insert(a.index)
            };
        }
        let held_older = stale.iter().filter(|(n, i)| *n == g.name && *i < g.count).map(|(_, i)| *i);
        let older = self.allocs_of_job(id).filter(mine).filter(|a| a.job_version < version).map(|a| a.index);
        let mut room: BTreeSet<u32> = held_older.chain(older).filter(|i| !current.contains(i)).collect();
        room.extend(canaries);
        asked.min(room.len() as u32)
    }

    /// The groups whose canaries job `id`'s running deployment of
    /// `version` waits to see promoted (none: no such deployment).
    pub(crate) fn groups_awaiting_promotion(&self, id: &JobId, version: u64) -> Vec<std::sync::Arc<str>> {
        let d = self.active_deployment(id).filter(|d| d.job_version == version);
        d.map(|d| d.groups.iter().filter(|g| d.awaits_promotion(&g.name)).map(|g| g.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Promotes the canaries of job `id`'s running deployment (every group,
    /// or only `group`). Errors: no deployment running, or none of its
    /// groups awaits promotion, or a canary is not yet healthy.
    pub(crate) fn promote(&mut self, id: &JobId, group: Option<&str>) -> Result<(), String> {
        let d = self.active_deployment(id).ok_or_else(|| format!("job {id} has no deployment running"))?;
        let waiting: Vec<_> = d
            .groups
            .iter()
            .filter(|g| g.canaries > 0 && !g.promoted && group.is_none_or(|n| *g.name == *n))
            .map(|g| (g.name.clone(), g.canaries))
            .collect();
        if waiting.is_empty() {
            return Err(match group {
                Some(g) => format!("group `{g}` of job {id} has no canaries waiting for promotion"),
                None => format!("the deployment of job {id} has no canaries waiting for promotion"),
            });
        }
        let version = d.job_version;
        let job = self.job(id).filter(|j| j.version == version);
        let stale = job.map(|j| crate::scheduler::reconcile::stale_held(self, j)).unwrap_or_default();
        for (name, asked) in &waiting {
            let healthy = self.healthy_canaries(id, version, name);
            let spec = job.and_then(|j| j.group(name));
            let want = spec.map_or(*asked, |g| self.canaries_wanted(id, version, g, *asked, &stale));
            if healthy < want as usize {
                return Err(format!(
                    "group `{name}`: {healthy} of {want} canaries are healthy; promote once they all are"
                ));
            }
        }
        let d = self.histories.get_mut(id).and_then(|h| h.deployments.last_mut()).expect("the deployment above");
        for g in d.groups.iter_mut().filter(|g| waiting.iter().any(|(n, _)| *n == g.name)) {
            g.promoted = true;
        }
        d.description = "canaries promoted; replacing the rest".into();
        Ok(())
    }

    /// How many canaries of `job`'s `version` in `group` are healthy.
    fn healthy_canaries(&self, job: &JobId, version: u64, group: &str) -> usize {
        let canary = |a: &&crate::model::Allocation| a.canary && a.job_version == version && &*a.group == group;
        self.allocs_of_job(job).filter(canary).filter(|a| a.health == Some(AllocHealth::Healthy)).count()
    }

    /// Fails job `id`'s running deployment, for `why`; with `auto_revert`
    /// registers its last stable version again. Whether a version was
    /// registered (its evaluation is then open).
    pub(crate) fn fail_deployment(&mut self, id: &JobId, why: String) -> Result<bool, String> {
        let d = self.active_deployment(id).ok_or_else(|| format!("job {id} has no deployment running"))?;
        let version = d.job_version;
        let job = self.job(id).expect("a deployment's job").clone();
        let auto_revert =
            job.groups.iter().any(|g| g.update.is_some_and(|u| u.auto_revert) && d.group(&g.name).is_some());
        let mut description = why;
        let mut reverted = false;
        let rollback = self.histories.get(id).is_some_and(|h| h.rollbacks.contains(&version));
        if auto_revert && rollback {
            // A rollback that fails too is left as it is: rolling back
            // again would walk the job through every stable version.
            description.push_str("; it was itself a rollback, so it is not rolled back again");
        } else if auto_revert {
            // The newest stable version whose spec differs from this one:
            // rolling back to the spec that just failed would loop.
            let h = self.histories.get(id);
            let stable = h.map(|h| h.stable.clone()).unwrap_or_default();
            let target = stable
                .iter()
                .rev()
                .filter(|v| **v < version)
                .filter_map(|v| self.job_version(id, *v))
                .find(|old| Job { version, stopped: false, ..(*old).clone() } != job)
                .cloned();
            match target {
                Some(old) => {
                    description.push_str(&format!("; rolled back to version {}", old.version));
                    let (from, back) = (old.version, Job { version: job.version, stopped: false, ..old });
                    let new = self.upsert_job(back);
                    if let Some(text) = self.submitted(id, from).map(str::to_string) {
                        self.keep_submitted(id, new, &text);
                    }
                    let h = self.histories.entry(id.clone()).or_default();
                    h.rollbacks.push(new);
                    let over = h.rollbacks.len().saturating_sub(JOB_VERSIONS_KEPT);
                    h.rollbacks.drain(..over);
                    reverted = true;
                }
                None => description.push_str("; no stable version to roll back to"),
            }
        }
        let h = self.histories.get_mut(id).expect("a deployment's history");
        let d = h.deployments.iter_mut().rev().find(|d| d.job_version == version).expect("the deployment above");
        d.status = DeploymentStatus::Failed;
        d.description = description;
        if reverted {
            self.open_deployment(id);
        }
        Ok(reverted)
    }

    /// Moves job `id`'s running deployment on from what its instances
    /// report: promotes healthy canaries with `auto_promote`, fails it when
    /// one is unhealthy, marks it successful once done. The evaluation it
    /// opened when the job needs one (canaries promoted, a version rolled
    /// back).
    pub(crate) fn advance_deployment(&mut self, id: &JobId) -> Option<EvalId> {
        let moved = self.deployment_moved(id);
        moved.then(|| self.create_eval(id, EvalTrigger::Deployment, None))
    }

    /// [`Self::advance_deployment`] but for the evaluation: whether the
    /// job needs one.
    pub(crate) fn deployment_moved(&mut self, id: &JobId) -> bool {
        let Some(d) = self.active_deployment(id) else { return false };
        let Some(job) = self.job(id) else { return false };
        let version = d.job_version;
        // An instance it placed that became unhealthy, or failed before it
        // was healthy, fails it (not one placed before it opened and
        // carried over: a revert or a scale does not judge those again).
        let bad = self.allocs_of_job(id).find(|a| {
            a.id >= d.placed_from
                && a.job_version == version
                && d.group(&a.group).is_some()
                && (a.health == Some(AllocHealth::Unhealthy)
                    || (a.health.is_none() && a.status == AllocStatus::Failed && a.desired == DesiredStatus::Run))
        });
        if let Some(a) = bad {
            let mut checks = a.tasks.iter().flat_map(|t| t.checks.iter().map(move |c| (t, c)));
            let check = checks.find(|(_, c)| c.status != CheckStatus::Passing);
            let task = a.tasks.iter().find(|t| t.state != TaskPhase::Running && !t.message.is_empty());
            let why = match (task, check) {
                (Some(t), _) => format!("allocation {} unhealthy: task `{}`: {}", a.id, t.name, t.message),
                (None, Some((t, c))) if c.output.is_empty() => {
                    format!("allocation {} unhealthy: check `{}` of task `{}` is {}", a.id, c.name, t.name, c.status)
                }
                (None, Some((t, c))) => format!(
                    "allocation {} unhealthy: check `{}` of task `{}` is {}: {}",
                    a.id, c.name, t.name, c.status, c.output
                ),
                (None, None) => format!("allocation {} unhealthy: not healthy by its healthy_deadline", a.id),
            };
            return self.fail_deployment(id, why).unwrap_or(false);
        }
        let mut promote = Vec::new();
        let mut done = true;
        let (mut healthy_all, mut want_all) = (0, 0);
        // Held at an older spec (the same for every group: found once).
        let stale = crate::scheduler::reconcile::stale_held(self, job);
        for g in &d.groups {
            let Some(spec) = job.group(&g.name) else { continue };
            if g.canaries > 0 && !g.promoted {
                let healthy = self.healthy_canaries(id, version, &g.name);
                // Fewer if fewer can run (an older instance lost since);
                // none if nothing older is left to try them beside (a
                // revert carried it all over): nothing to wait for.
                let want = self.canaries_wanted(id, version, spec, g.canaries, &stale);
                let auto = spec.update.is_some_and(|u| u.auto_promote) && healthy >= want as usize;
                if auto || want == 0 {
                    promote.push((g.name.clone(), auto));
                }
                done = false;
                continue;
            }
            let mine = self.allocs_of_job(id).filter(|a| a.group == g.name && a.is_live());
            let (mut healthy, mut older) = (0u32, 0u32);
            for a in mine {
                if a.job_version != version {
                    older += 1;
                } else if a.health == Some(AllocHealth::Healthy) {
                    healthy += 1;
                }
            }
            // Instances another cluster holds count as its own deployment's,
            // unless they run an older spec, replaced here: older, until
            // their holder has let them go.
            let stale_here = stale.iter().filter(|(group, _)| *group == g.name).count() as u32;
            let held = self.held_of_job(id).filter(|(group, _)| **group == *g.name).count() as u32;
            older += stale_here;
            let want = spec.count.saturating_sub(held - stale_here.min(held));
            healthy_all += healthy.min(want);
            want_all += want;
            done &= older == 0 && healthy >= want;
        }
        let h = self.histories.get_mut(id).expect("a deployment's history");
        let d = h.deployments.last_mut().expect("the deployment above");
        if !promote.is_empty() {
            for g in d.groups.iter_mut().filter(|g| promote.iter().any(|(n, _)| *n == g.name)) {
                g.promoted = true;
            }
            d.description = if promote.iter().any(|(_, auto)| *auto) {
                "canaries promoted on their own (auto_promote); replacing the rest".into()
            } else {
                "nothing older left to try canaries beside; replacing the rest".into()
            };
            return true;
        }
        if done {
            d.status = DeploymentStatus::Successful;
            d.description = "every instance of the version is healthy".into();
            if let Err(at) = h.stable.binary_search(&version) {
                h.stable.insert(at, version);
            }
        } else if d.groups.iter().all(|g| g.promoted) {
            d.description = format!("{healthy_all} of {want_all} instances healthy");
        } else {
            d.description = "canaries placed; waiting for their promotion".into();
        }
        false
    }
}
