//! Task drivers behind one trait: `exec` runs a real child process, `mock`
//! pretends to (a duration and an exit code, no process).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::process::Child;

use super::cgroups::Cgroups;
use super::fence::Fence;
use super::logs::{RotatingWriter, Rotation};
use crate::ids::AllocId;
use crate::model::job::{Driver as DriverSpec, Task};

/// Everything a driver needs to start one task of an allocation.
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub alloc: AllocId,
    pub job: String,
    pub group: String,
    pub index: u32,
    pub task: Task,
    /// The task's working directory, inside the allocation's directory.
    pub dir: PathBuf,
    /// The allocation's log directory.
    pub logs: PathBuf,
    pub rotation: Rotation,
    /// For at-most-once work: the fence that kills the task's process
    /// group if the agent cannot renew its lease ([`super::fence`]).
    pub fence: Option<Arc<Fence>>,
}

/// How a run of a task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    pub fn success(self) -> bool {
        self.code == Some(0)
    }

    pub fn describe(self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "ended".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// Its program cannot run, on this node or, with this spec, any
    /// other alike: missing, not executable, not a program for this
    /// machine, or a spec no driver takes. Neither restarted nor placed
    /// again ([`crate::model::alloc::TaskPhase::Unrunnable`]).
    #[error("{0}")]
    Unrunnable(String),
    /// Starting again on this node cannot help (its config refuses the
    /// task's user or driver); another node may take it.
    #[error("{0}")]
    Fatal(String),
    #[error("{0}")]
    Failed(String),
}

/// A running task.
#[async_trait]
pub trait Running: Send {
    /// Waits for the task to end. Cancel-safe.
    async fn wait(&mut self) -> Exit;
    /// Asks it to end (SIGTERM), forces it (SIGKILL) after `grace`.
    async fn stop(&mut self, grace: Duration) -> Exit;
}

#[async_trait]
pub trait Driver: Send + Sync + 'static {
    async fn start(&self, ctx: &TaskContext) -> Result<Box<dyn Running>, StartError>;
}

/// The names of the drivers there are.
pub const DRIVER_NAMES: &[&str] = &["exec", "mock"];

/// The drivers an agent offers, by the name a task spec uses. One its
/// config does not enable refuses every task (its node does not advertise
/// it either, so the scheduler places none there).
#[derive(Clone)]
pub struct Drivers {
    pub exec: Arc<dyn Driver>,
    pub mock: Arc<dyn Driver>,
    switches_user: bool,
}

/// A local account a task runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its supplementary groups (`getgrouplist`), its primary group among them.
    pub groups: Vec<u32>,
}

impl Account {
    /// The account named `name` in the system's user database
    /// (`getpwnam_r`, `getgrouplist`); an error says what went wrong.
    pub fn lookup(name: &str) -> Result<Account, String> {
        let c_name = CString::new(name).map_err(|_| format!("`{name}` is not a user name"))?;
        let mut size = 16 << 10;
        let (uid, gid) = loop {
            let mut buf = vec![0 as libc::c_char; size];
            // SAFETY: an all-zero passwd is a valid out-parameter; getpwnam_r
            // writes only into it and `buf`, whose length it is given.
            let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            let rc = unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
            match rc {
                libc::ERANGE if size < 1 << 20 => size *= 4,
                0 if found.is_null() => return Err(format!("there is no user `{name}` on this machine")),
                0 => break (pwd.pw_uid, pwd.pw_gid),
                e => {
                    return Err(format!("cannot look up user `{name}`: {}", std::io::Error::from_raw_os_error(e)));
                }
            }
        };
        let mut groups = vec![0 as libc::gid_t; 64];
        loop {
            let mut n = groups.len() as libc::c_int;
            // SAFETY: `groups` holds `n` entries; getgrouplist writes at
            // most `n` and says how many there are.
            let rc = unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
            if rc >= 0 {
                groups.truncate(n.max(0) as usize);
                break;
            }
            if groups.len() >= 65_536 {
                return Err(format!("user `{name}` is in too many groups"));
            }
            groups.resize((n.max(0) as usize).max(groups.len() * 2), 0);
        }
        Ok(Account { name: name.to_string(), uid, gid, groups })
    }

    /// The account this process runs as (its effective uid and gid).
    pub fn current() -> Account {
        // SAFETY: geteuid and getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Account { name: format!("uid {uid}"), uid, gid, groups: Vec::new() }
    }
}

/// Whom exec tasks run as. A task that names no `user` runs as
/// `default`; one that names a user runs as it only if `allowed` lists it.
/// Accounts are looked up once, when the agent reads its config. Switching
/// users needs the agent to run as root (Nomad's exec driver likewise; its
/// `user.denylist` is the reverse of this allowlist).
#[derive(Clone, Debug, Default)]
pub struct TaskUsers {
    /// `None`: the agent's own user.
    pub default: Option<Account>,
    /// The accounts a task spec may ask for, by name.
    pub allowed: Vec<Account>,
}

impl TaskUsers {
    fn switches(&self) -> bool {
        let me = Account::current();
        let other = |a: &Account| (a.uid, a.gid) != (me.uid, me.gid);
        self.default.as_ref().is_some_and(other) || self.allowed.iter().any(other)
    }

    /// The account `task` runs as, or why it may not run.
    pub fn account_for(&self, task: &str, asked: Option<&str>) -> Result<Option<Account>, StartError> {
        let Some(user) = asked else { return Ok(self.default.clone()) };
        match self.allowed.iter().find(|a| a.name == user) {
            Some(a) => Ok(Some(a.clone())),
            None => {
                let names: Vec<&str> = self.allowed.iter().map(|a| a.name.as_str()).collect();
                let allowed = if names.is_empty() { "none".to_string() } else { names.join(", ") };
                Err(StartError::Fatal(format!(
                    "task `{task}` asks to run as `{user}`, which this agent does not allow \
                     (its `allowed_users`: {allowed})"
                )))
            }
        }
    }
}

impl Drivers {
    /// Every driver; tasks run as the agent's own user.
    pub fn new(cgroups: Option<Cgroups>) -> Drivers {
        Drivers::only(cgroups, &["exec".into(), "mock".into()], TaskUsers::default())
    }

    /// Only the drivers named in `enabled` (of [`DRIVER_NAMES`]), exec
    /// tasks running as `users` says.
    pub fn only(cgroups: Option<Cgroups>, enabled: &[String], users: TaskUsers) -> Drivers {
        let on = |name: &str| enabled.iter().any(|e| e == name);
        let off = |name: &'static str| -> Arc<dyn Driver> { Arc::new(Disabled(name)) };
        let switches = on("exec") && users.switches();
        Drivers {
            exec: if on("exec") { Arc::new(Exec { cgroups, users }) } else { off("exec") },
            mock: if on("mock") { Arc::new(Mock) } else { off("mock") },
            switches_user: switches,
        }
    }

    /// Whether tasks may run as users other than the agent's: their
    /// directories must then be reachable (0711 on the way, not readable).
    pub fn switches_user(&self) -> bool {
        self.switches_user
    }

    pub fn for_task(&self, task: &Task) -> &Arc<dyn Driver> {
        match task.driver {
            DriverSpec::Exec { .. } => &self.exec,
            DriverSpec::Mock { .. } => &self.mock,
        }
    }
}

/// A driver the agent's config does not enable.
struct Disabled(&'static str);

#[async_trait]
impl Driver for Disabled {
    async fn start(&self, _: &TaskContext) -> Result<Box<dyn Running>, StartError> {
        Err(StartError::Fatal(format!(
            "driver {} is not enabled on this node (add it to `drivers` in the agent's config)",
            self.0
        )))
    }
}

/// Runs for the spec's `run_for` and exits with its `exit_code`.
pub struct Mock;

struct MockRun {
    until: tokio::time::Instant,
    code: i32,
}

#[async_trait]
impl Driver for Mock {
    async fn start(&self, ctx: &TaskContext) -> Result<Box<dyn Running>, StartError> {
        let DriverSpec::Mock { run_for_ms, exit_code } = ctx.task.driver else {
            return Err(StartError::Unrunnable("the mock driver runs mock tasks only".into()));
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(run_for_ms);
        Ok(Box::new(MockRun { until, code: exit_code }))
    }
}

#[async_trait]
impl Running for MockRun {
    async fn wait(&mut self) -> Exit {
        tokio::time::sleep_until(self.until).await;
        Exit { code: Some(self.code), signal: None }
    }

    async fn stop(&mut self, _grace: Duration) -> Exit {
        Exit { code: None, signal: Some(libc::SIGTERM) }
    }
}

/// A real child process in a session (and process group) of its own, in
/// the task's directory, with stdout and stderr to rotating files, limited by a
/// cgroup when the machine offers cgroups v2. A task gets SIGKILL when its
/// agent dies (its own children that leave its group can escape that); a restarted agent starts them
/// again from its local state.
pub struct Exec {
    pub cgroups: Option<Cgroups>,
    pub users: TaskUsers,
}

struct ExecRun {
    child: Child,
    pid: i32,
    /// The fence watching this group, and the allocation it belongs to.
    fence: Option<(Arc<Fence>, AllocId)>,
    copiers: Vec<tokio::task::JoinHandle<()>>,
    cgroup: Option<PathBuf>,
    exit: Option<Exit>,
}

#[async_trait]
impl Driver for Exec {
    async fn start(&self, ctx: &TaskContext) -> Result<Box<dyn Running>, StartError> {
        let DriverSpec::Exec { command, args, env, user } = &ctx.task.driver else {
            return Err(StartError::Unrunnable("the exec driver runs exec tasks only".into()));
        };
        // Its directory and logs are named after it: a name that could
        // leave the allocation's directory is refused, however the job came
        // (the API checks it; an offer or a state file might not).
        if !crate::spec::job::is_valid_task_name(&ctx.task.name) {
            return Err(StartError::Unrunnable(format!("`{}` is not a valid task name", ctx.task.name)));
        }
        let account = self.users.account_for(&ctx.task.name, user.as_deref())?;
        let me = Account::current();
        let account = account.filter(|a| (a.uid, a.gid) != (me.uid, me.gid));
        if let Some(a) = &account {
            if me.uid != 0 {
                return Err(StartError::Fatal(format!(
                    "task `{}` would run as `{}`, but the agent runs as uid {} and only root can switch users",
                    ctx.task.name, a.name, me.uid
                )));
            }
        }
        std::fs::create_dir_all(&ctx.dir)
            .map_err(|e| StartError::Failed(format!("cannot create {}: {e}", ctx.dir.display())))?;
        if let Some(a) = &account {
            task_dir_for(&ctx.dir, a)
                .map_err(|e| StartError::Failed(format!("cannot give {} to `{}`: {e}", ctx.dir.display(), a.name)))?;
        }
        let shared = shared_dir(&ctx.dir);
        shared_dir_for(&shared, account.as_ref())
            .map_err(|e| StartError::Failed(format!("cannot create the shared directory {}: {e}", shared.display())))?;
        let ids = account.as_ref().map(|a| (a.uid, a.gid, a.groups.clone()));
        // SAFETY: getpid cannot fail. The child checks its parent is still
        // this process once its death signal is set.
        let agent_pid = unsafe { libc::getpid() };
        let mut stdout = writer(ctx, "stdout")?;
        let mut stderr = writer(ctx, "stderr")?;
        let cgroup = match &self.cgroups {
            Some(c) => match c.create(ctx.alloc, &ctx.task.name, ctx.task.resources) {
                Ok(dir) => Some(dir),
                Err(e) => {
                    tracing::warn!(alloc = %ctx.alloc, task = %ctx.task.name, "no cgroup, running without limits: {e}");
                    None
                }
            },
            None => None,
        };
        let procs = cgroup
            .as_ref()
            .and_then(|d| CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok());
        // Never the agent's environment (its secrets, security review row
        // 13): the task's own, `HANSE_*` and a minimal `PATH`.
        let environment = task_env(ctx, env);
        let path_var = environment.iter().rev().find(|(k, _)| k == "PATH").map_or(String::new(), |(_, v)| v.clone());
        let dir = std::path::absolute(&ctx.dir).unwrap_or_else(|_| ctx.dir.clone());
        // The child executes the program itself, never through a shell
        // ([`super::launch`]).
        let launch = super::launch::Launch::new(command, args, &environment, &dir).ok_or_else(|| {
            StartError::Unrunnable(format!(
                "task `{}`: a command, argument or env value holds a NUL byte",
                ctx.task.name
            ))
        })?;
        let mut cmd = tokio::process::Command::new(command);
        cmd.args(args)
            .env_clear()
            .envs(environment)
            .current_dir(&ctx.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made: setsid, open, write, close, setgroups, setgid, setuid,
        // prctl, getppid, _exit, execve, on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own: its process group is its pid, it can
                // join no group of the agent's session (a stop would miss
                // it), and it has no controlling terminal to type into.
                libc::setsid();
                // Into the cgroup while still root: its files are root's.
                if let Some(p) = &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                // Drop to the task's user: its group alone, then the user.
                // A failure here fails the start; nothing runs as root.
                if let Some((uid, gid, groups)) = &ids {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // After the switch: changing credentials clears it. An agent
                // that died before this point would leave an orphan: exit.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != agent_pid {
                    libc::_exit(127);
                }
                // As the task's user: what it may not run, it does not run.
                Err(std::io::Error::from_raw_os_error(launch.exec()))
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            use super::launch::{candidates, looked_in, why_not_a_program};
            let found = candidates(command, &path_var, &dir);
            // The file the kernel refused: the first regular file on the
            // way that the task's user may execute.
            let program =
                || found.iter().find(|p| std::fs::metadata(p).is_ok_and(|m| executable_by(&m, account.as_ref())));
            match e.kind() {
                _ if e.raw_os_error() == Some(libc::ENOEXEC) => {
                    let why = program()
                        .map(|p| why_not_a_program(p, |m| readable_by(m, account.as_ref())))
                        .unwrap_or_default();
                    StartError::Unrunnable(format!(
                        "command `{command}` is not a program this node can run (exec format error){why}"
                    ))
                }
                std::io::ErrorKind::NotFound => match program() {
                    // The file is there: what it needs is not.
                    Some(p) => StartError::Unrunnable(format!(
                        "command `{command}` ({}) is there, but the interpreter its `#!` line names, or the loader \
                         its ELF header names, is not on this node",
                        p.display()
                    )),
                    None => StartError::Unrunnable(format!(
                        "command `{command}` not found{}",
                        looked_in(command, &path_var, &dir)
                    )),
                },
                // This node refused the switch of user: another may not.
                _ if e.raw_os_error() == Some(libc::EPERM) => StartError::Fatal(format!(
                    "this node refused to run task `{}` as `{}` (operation not permitted)",
                    ctx.task.name,
                    account.as_ref().map_or("its own user", |a| a.name.as_str())
                )),
                std::io::ErrorKind::PermissionDenied => match &account {
                    Some(a) => StartError::Unrunnable(format!(
                        "command `{command}` is not executable by `{}` (permission denied)",
                        a.name
                    )),
                    None => {
                        StartError::Unrunnable(format!("command `{command}` is not executable (permission denied)"))
                    }
                },
                _ => StartError::Failed(format!("cannot start `{command}`: {e}")),
            }
        })?;
        let pid = child.id().map_or(0, |p| p as i32);
        let fence = ctx.fence.clone().filter(|_| pid > 0).map(|f| (f, ctx.alloc));
        if let Some((f, alloc)) = &fence {
            f.register(*alloc, pid);
        }
        let mut copiers = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            copiers.push(tokio::spawn(async move { copy(&mut out, &mut stdout).await }));
        }
        if let Some(mut err) = child.stderr.take() {
            copiers.push(tokio::spawn(async move { copy(&mut err, &mut stderr).await }));
        }
        Ok(Box::new(ExecRun { child, pid, fence, copiers, cgroup, exit: None }))
    }
}

/// Whether `account` (`None`: the agent's own) may execute a regular
/// file with metadata `m` (root: any execute bit).
fn executable_by(m: &std::fs::Metadata, account: Option<&Account>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = Account::current();
    let a = account.unwrap_or(&me);
    m.is_file() && if a.uid == 0 { m.mode() & 0o111 != 0 } else { permits(m, a, 0o1) }
}

/// Whether `account` (`None`: the agent's own) may read a file with
/// metadata `m`: the agent says what is in a file only to whom could read it.
fn readable_by(m: &std::fs::Metadata, account: Option<&Account>) -> bool {
    account.is_none_or(|a| permits(m, a, 0o4))
}

/// Whether the one class of `m`'s mode that applies to `a` (owner, else
/// group, else others, as the kernel picks it) has `bit` (4 read, 1 exec).
fn permits(m: &std::fs::Metadata, a: &Account, bit: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let shift = if m.uid() == a.uid {
        6
    } else if m.gid() == a.gid || a.groups.contains(&m.gid()) {
        3
    } else {
        0
    };
    (m.mode() >> shift) & bit != 0
}

/// The directory the tasks of an allocation share (`HANSE_ALLOC_DIR`):
/// `alloc/` in the allocation's directory, beside the tasks' own (Nomad's
/// `NOMAD_ALLOC_DIR` likewise).
fn shared_dir(task_dir: &Path) -> PathBuf {
    task_dir.parent().unwrap_or(Path::new("/")).join(crate::spec::job::SHARED_DIR)
}

/// Creates the shared directory, once per allocation: the first task to
/// start makes it, for its user (0700), so that the group's tasks running
/// as that user share it and no other user reads it. A task of the group
/// running as another user cannot write it.
fn shared_dir_for(dir: &Path, account: Option<&Account>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            if let Some(a) = account {
                std::os::unix::fs::lchown(dir, Some(a.uid), Some(a.gid))?;
            }
            Ok(())
        }
        // Made by a sibling, or before the agent restarted; never a link
        // (the allocation's directory is the agent's: no task plants one).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if std::fs::symlink_metadata(dir)?.is_dir() {
                Ok(())
            } else {
                Err(std::io::Error::other("it is not a directory"))
            }
        }
        Err(e) => Err(e),
    }
}

/// A task directory for `account`: its own, 0700, and its allocation's
/// directory passable (0711) but not readable, so the task reaches its
/// directory and nothing beside it.
fn task_dir_for(dir: &Path, account: &Account) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Never follow a link planted where the directory should be.
    if std::fs::symlink_metadata(dir)?.file_type().is_symlink() {
        return Err(std::io::Error::other("it is a symbolic link"));
    }
    std::os::unix::fs::lchown(dir, Some(account.uid), Some(account.gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(alloc_dir) = dir.parent() {
        std::fs::set_permissions(alloc_dir, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

fn writer(ctx: &TaskContext, stream: &str) -> Result<RotatingWriter, StartError> {
    RotatingWriter::open(&ctx.logs, &format!("{}.{stream}", ctx.task.name), ctx.rotation)
        .map_err(|e| StartError::Failed(format!("cannot open the {stream} log in {}: {e}", ctx.logs.display())))
}

/// `PATH` for a task whose spec sets none.
pub const TASK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The task's whole environment: a minimal `PATH`, where it runs
/// (`HANSE_*`, absolute paths whatever the agent's `data_dir`), and its
/// spec's `env`, which may override `PATH`.
fn task_env(ctx: &TaskContext, env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let dir = std::path::absolute(&ctx.dir).unwrap_or_else(|_| ctx.dir.clone());
    let alloc_dir = shared_dir(&dir).display().to_string();
    let mut out: Vec<(String, String)> = vec![
        ("PATH".into(), TASK_PATH.into()),
        ("HANSE_ALLOC_ID".into(), ctx.alloc.to_string()),
        ("HANSE_ALLOC_DIR".into(), alloc_dir),
        ("HANSE_TASK_DIR".into(), dir.display().to_string()),
        ("HANSE_JOB".into(), ctx.job.clone()),
        ("HANSE_GROUP".into(), ctx.group.clone()),
        ("HANSE_ALLOC_INDEX".into(), ctx.index.to_string()),
        ("HANSE_TASK".into(), ctx.task.name.to_string()),
    ];
    out.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

async fn copy(from: &mut (impl AsyncReadExt + Unpin), to: &mut RotatingWriter) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Err(e) = to.write(&buf[..n]) {
                    tracing::warn!("task output lost: {e}");
                }
            }
        }
    }
}

impl ExecRun {
    /// The process ended: take what is left of its group and its output.
    async fn reap(&mut self, status: std::io::Result<std::process::ExitStatus>) -> Exit {
        if self.pid > 0 {
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
        if let Some((f, alloc)) = self.fence.take() {
            f.forget(alloc, self.pid);
        }
        for c in self.copiers.drain(..) {
            // A grandchild holding the pipes open must not hold us.
            let _ = tokio::time::timeout(Duration::from_secs(1), c).await;
        }
        if let Some(dir) = self.cgroup.take() {
            let _ = std::fs::remove_dir(dir);
        }
        let exit = match status {
            Ok(s) => Exit { code: s.code(), signal: s.signal() },
            Err(_) => Exit { code: None, signal: None },
        };
        self.exit = Some(exit);
        exit
    }
}

impl Drop for ExecRun {
    /// A run dropped before it ended (the agent stopping) takes its
    /// process group with it.
    fn drop(&mut self) {
        if self.exit.is_none() && self.pid > 0 {
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
        if let Some((f, alloc)) = self.fence.take() {
            f.forget(alloc, self.pid);
        }
    }
}

#[async_trait]
impl Running for ExecRun {
    async fn wait(&mut self) -> Exit {
        if let Some(e) = self.exit {
            return e;
        }
        let status = self.child.wait().await;
        self.reap(status).await
    }

    async fn stop(&mut self, grace: Duration) -> Exit {
        if let Some(e) = self.exit {
            return e;
        }
        if self.pid > 0 {
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-self.pid, libc::SIGTERM) };
        }
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s,
            Err(_) => {
                if self.pid > 0 {
                    // SAFETY: as above; and the child itself, in case it
                    // left its group (it cannot: it leads its session).
                    unsafe {
                        libc::kill(-self.pid, libc::SIGKILL);
                        libc::kill(self.pid, libc::SIGKILL);
                    }
                }
                self.child.wait().await
            }
        };
        self.reap(status).await
    }
}
