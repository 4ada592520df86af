//! Resource limits through cgroups v2: one cgroup per task under
//! `/sys/fs/cgroup/hanse`, with `cpu.max` and `memory.max` from the task's
//! resources. Machines without cgroups v2 (or without the rights) run
//! tasks without limits, and the agent says so when it starts.

use std::fs;
use std::path::{Path, PathBuf};

use crate::ids::AllocId;
use crate::resources::Resources;

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Debug)]
pub struct Cgroups {
    dir: PathBuf,
    /// Begins the name of each of this agent's task cgroups: agents of
    /// several clusters on one machine number allocations alike, and one
    /// must never empty or kill another's cgroup.
    owner: String,
}

impl Cgroups {
    /// The cgroup parent of agent `agent` of cluster `cluster`, made ready
    /// to hold task cgroups with cpu and memory controllers; why not, when
    /// it cannot be.
    pub fn detect(cluster: &str, agent: &str) -> Result<Cgroups, String> {
        let root = Path::new(ROOT);
        let controllers = fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|_| format!("cgroups v2 is not mounted at {ROOT}"))?;
        for c in ["cpu", "memory"] {
            if !controllers.split_whitespace().any(|w| w == c) {
                return Err(format!("the {c} controller is not available in {ROOT}"));
            }
        }
        let dir = root.join("hanse");
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        for parent in [root, dir.as_path()] {
            fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory")
                .map_err(|e| format!("cannot enable cpu and memory in {}: {e}", parent.display()))?;
        }
        let safe = |s: &str| {
            s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect::<String>()
        };
        Ok(Cgroups { dir, owner: format!("{}.{}", safe(cluster), safe(agent)) })
    }

    /// A task's cgroup with its limits; its directory,
    /// `/sys/fs/cgroup/hanse/CLUSTER.AGENT.ALLOC-TASK`.
    pub fn create(&self, alloc: AllocId, task: &str, r: Resources) -> Result<PathBuf, String> {
        let dir = self.dir.join(format!("{}.{alloc}-{task}", self.owner));
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let period = 100_000u64;
        if r.cpu_millis > 0 {
            let quota = (r.cpu_millis * period / 1000).max(1_000);
            fs::write(dir.join("cpu.max"), format!("{quota} {period}")).map_err(|e| format!("cpu.max: {e}"))?;
        }
        if r.memory_bytes > 0 {
            fs::write(dir.join("memory.max"), r.memory_bytes.to_string()).map_err(|e| format!("memory.max: {e}"))?;
        }
        Ok(dir)
    }
}

/// Kills whatever still runs in the task cgroup `dir` (left by a
/// supervisor that was itself killed), and waits up to 5 s for it to
/// empty: a new run of the task must never join its survivors.
pub async fn empty(dir: &Path) {
    let populated = || fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty());
    if !populated() {
        return;
    }
    tracing::warn!(cgroup = %dir.display(), "processes of an earlier run of the task are left: killing them");
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if !populated() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Agents of two clusters on one machine both run an allocation 7:
    /// their task cgroups must differ, or emptying one kills the other.
    #[test]
    fn agents_of_two_clusters_never_share_a_task_cgroup() {
        let dir = std::env::temp_dir().join(format!("hanse-cgroups-{}", std::process::id()));
        let safe = |c: &str, a: &str| Cgroups { dir: dir.clone(), owner: format!("{c}.{a}") };
        let (a, b) = (safe("eu-west", "node-1"), safe("us-east", "node-1"));
        let r = Resources::default();
        let (da, db) = (a.create(AllocId(7), "web", r).unwrap(), b.create(AllocId(7), "web", r).unwrap());
        let _ = fs::remove_dir_all(&dir);
        assert_ne!(da, db);
        assert_eq!(da.file_name().unwrap(), "eu-west.node-1.a000007-web", "{da:?}");
    }
}
