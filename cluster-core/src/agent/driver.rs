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
use super::supervise::{Control, Order, Plan, socket_for};
use crate::ids::AllocId;
use crate::model::job::{Driver as DriverSpec, ENV_ORIGIN_INDEX, ENV_ORIGIN_INDEXES, Task};

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
    /// The registry through which the agent renews the deadline of the
    /// task's supervisor ([`super::fence`]); `None`: nothing renews it.
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
    /// Sends `signal` to every process of the task (`hanse alloc signal`).
    async fn signal(&mut self, signal: i32) -> Result<(), String> {
        let _ = signal;
        Err("this driver's tasks take no signals".into())
    }
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
    /// What the exec driver was made of, when enabled (to add supervision).
    exec_parts: Option<(Option<Cgroups>, TaskUsers)>,
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
        let exec_parts = on("exec").then(|| (cgroups.clone(), users.clone()));
        Drivers {
            exec: if on("exec") { Arc::new(Exec { cgroups, users, supervision: None }) } else { off("exec") },
            mock: if on("mock") { Arc::new(Mock) } else { off("mock") },
            switches_user: switches,
            exec_parts,
        }
    }

    /// The same drivers, exec tasks each run under a supervisor
    /// ([`super::supervise`]).
    pub fn supervised(&self, supervision: Supervision) -> Drivers {
        let mut out = self.clone();
        if let Some((cgroups, users)) = self.exec_parts.clone() {
            out.exec = Arc::new(Exec { cgroups, users, supervision: Some(supervision) });
        }
        out
    }

    /// Whether tasks may run as users other than the agent's: their
    /// directories must then be reachable (0711 on the way, not readable).
    pub fn switches_user(&self) -> bool {
        self.switches_user
    }

    /// The account `task`'s script checks run as: the one the task itself
    /// runs as ([`TaskUsers::account_for`]); an error when exec tasks do
    /// not run here or may not run as the task's user.
    pub fn check_account(&self, task: &Task) -> Result<Option<Account>, String> {
        let Some((_, users)) = &self.exec_parts else {
            return Err("script checks run only where the exec driver is enabled".into());
        };
        let user = match &task.driver {
            DriverSpec::Exec { user, .. } => user.as_deref(),
            DriverSpec::Mock { .. } => None,
        };
        users.account_for(&task.name, user).map_err(|e| e.to_string())
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

/// A real process in a session (and process group) of its own, in the
/// task's directory, with stdout and stderr to rotating files, limited by
/// a cgroup when the machine offers cgroups v2.
///
/// With [`Supervision`] (the `hanse agent`), each task runs under its own
/// supervisor ([`super::supervise`]), which holds its whole process tree,
/// outlives the agent for the task's deadline, and is found again by a
/// restarted agent. Without (agents inside tests), the task is the agent's
/// own child and gets SIGKILL when the agent dies.
pub struct Exec {
    pub cgroups: Option<Cgroups>,
    pub users: TaskUsers,
    pub supervision: Option<Supervision>,
}

/// How exec tasks are supervised: the program to run as `PROGRAM
/// task-supervisor` (the `hanse` binary) and the directory of the
/// supervisors' sockets (the agent's, 0700).
#[derive(Clone, Debug)]
pub struct Supervision {
    pub program: PathBuf,
    pub sockets: PathBuf,
}

/// The deadline a supervisor starts with when the agent has given none
/// yet (milliseconds); the agent renews it within a tick.
const FIRST_DEADLINE_MS: u64 = 5_000;

struct ExecRun {
    child: Child,
    pid: i32,
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
        if let Some(sv) = &self.supervision {
            let first = ctx.fence.as_ref().map_or(FIRST_DEADLINE_MS, |f| f.left(ctx.alloc, FIRST_DEADLINE_MS));
            let plan = Plan {
                command: command.clone(),
                args: args.clone(),
                env: environment,
                dir: dir.clone(),
                ids,
                cgroup,
                logs: std::path::absolute(&ctx.logs).unwrap_or_else(|_| ctx.logs.clone()),
                task: ctx.task.name.to_string(),
                log_file_bytes: ctx.rotation.file_bytes,
                log_files: ctx.rotation.files,
                socket: socket_for(&sv.sockets, &ctx.alloc.to_string(), &ctx.task.name),
                deadline_ms: first,
            };
            return supervised(sv, ctx, plan).await.map_err(|e| match e {
                Unstarted::Exec(e) => exec_error(e, command, &path_var, &dir, account.as_ref(), &ctx.task.name),
                Unstarted::Other(m) => StartError::Failed(m),
            });
        }
        let mut stdout = writer(ctx, "stdout")?;
        let mut stderr = writer(ctx, "stderr")?;
        let mut cmd = tokio::process::Command::new(command);
        cmd.args(args)
            .env_clear()
            .envs(environment)
            .current_dir(&ctx.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: `become_task` runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || Err(launch.become_task(procs.as_deref(), ids.as_ref(), agent_pid)));
        }
        let mut child =
            cmd.spawn().map_err(|e| exec_error(e, command, &path_var, &dir, account.as_ref(), &ctx.task.name))?;
        let pid = child.id().map_or(0, |p| p as i32);
        let mut copiers = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            copiers.push(tokio::spawn(async move { copy(&mut out, &mut stdout).await }));
        }
        if let Some(mut err) = child.stderr.take() {
            copiers.push(tokio::spawn(async move { copy(&mut err, &mut stderr).await }));
        }
        Ok(Box::new(ExecRun { child, pid, copiers, cgroup, exit: None }))
    }
}

/// Why a supervised task did not start.
enum Unstarted {
    /// The kernel would not execute its program.
    Exec(std::io::Error),
    Other(String),
}

/// Starts `plan` under a new supervisor, or, when one already runs it (an
/// agent restarted while its tasks ran on), attaches to that one; a task
/// that ended while no agent was there is returned ended.
async fn supervised(sv: &Supervision, ctx: &TaskContext, plan: Plan) -> Result<Box<dyn Running>, Unstarted> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let socket = plan.socket.clone();
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => {
            tracing::info!(alloc = %ctx.alloc, task = %ctx.task.name, "the task runs on under its supervisor: attached again");
            return attach(stream, ctx, socket)
                .map_err(|e| Unstarted::Other(format!("cannot attach to {}: {e}", plan.socket.display())));
        }
        // No supervisor there (none, or one that is gone): start one.
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {}
        // One may be there: never a second beside it.
        Err(e) => {
            return Err(Unstarted::Other(format!("cannot reach the task supervisor at {}: {e}", socket.display())));
        }
    }
    if let Some(exit) = take_exit(&socket) {
        tracing::info!(alloc = %ctx.alloc, task = %ctx.task.name, "the task {} while the agent was away", exit.describe());
        return Ok(Box::new(Ended(exit)));
    }
    if plan.deadline_ms == 0 {
        // The allocation's deadline passed unrenewed (the agent was frozen
        // or cut off past its lease, and its servers may have placed the
        // work elsewhere): no new run before the agent renews it. A task
        // whose delay ran out meanwhile must not start the moment the
        // agent thaws (found by hanse-chaos: a second copy of at-most-once
        // work beside its replacement).
        return Err(Unstarted::Other(
            "the allocation's lease ran out while the agent could not renew it: it starts again once renewed".into(),
        ));
    }
    if let Some(cg) = &plan.cgroup {
        super::cgroups::empty(cg).await;
    }
    let mut child = tokio::process::Command::new(&sv.program)
        .arg("task-supervisor")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Unstarted::Other(format!("cannot start {} task-supervisor: {e}", sv.program.display())))?;
    let mut line = serde_json::to_string(&plan).expect("a plan encodes");
    line.push('\n');
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    // Until attached, this start owns the supervisor: dropped (a stop won
    // the race with it), timed out or failed, it ends it, tree and all.
    let mut guard = Unattached(Some(child));
    let said = async move {
        stdin.write_all(line.as_bytes()).await?;
        drop(stdin);
        let mut answer = String::new();
        tokio::io::BufReader::new(stdout).read_line(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(Duration::from_secs(10), said).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return Err(Unstarted::Other(format!("the task supervisor did not answer: {e}"))),
        Err(_) => return Err(Unstarted::Other("the task supervisor did not answer within 10 s".into())),
    };
    let mut words = answer.split_whitespace();
    match (words.next(), words.next()) {
        (Some("started"), Some(_)) => {}
        (Some("failed"), Some("exec")) => {
            let errno = words.next().and_then(|e| e.parse().ok()).unwrap_or(libc::EIO);
            return Err(Unstarted::Exec(std::io::Error::from_raw_os_error(errno)));
        }
        (Some("failed"), Some("setup")) => {
            return Err(Unstarted::Other(answer.trim().trim_start_matches("failed setup ").to_string()));
        }
        _ => return Err(Unstarted::Other(format!("the task supervisor said {:?}", answer.trim()))),
    }
    let run = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => attach(stream, ctx, socket)
            .map_err(|e| Unstarted::Other(format!("cannot attach to the task supervisor: {e}")))?,
        // A task that ended at once: its supervisor recorded how, and left.
        Err(e) => match take_exit(&socket) {
            Some(exit) => Box::new(Ended(exit)),
            None => {
                return Err(Unstarted::Other(format!("cannot reach the task supervisor at {}: {e}", socket.display())));
            }
        },
    };
    // Reaped by tokio once it ends; never killed with the agent.
    guard.0 = None;
    Ok(run)
}

/// A supervisor started but not yet attached to: dropped, it is told to
/// end (SIGTERM: it kills its task's whole tree, then exits).
struct Unattached(Option<tokio::process::Child>);

impl Drop for Unattached {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Not yet reaped, so its pid is still its own.
            if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
                // SAFETY: kill(2) on this process's own unreaped child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    }
}

impl Supervision {
    /// Ends what the supervisors of `alloc`'s `tasks` still run, and waits
    /// (10 s at most) until they are gone: for at-most-once work a
    /// restarted agent reports lost, which the servers replace at once.
    pub async fn kill_leftovers(&self, alloc: AllocId, tasks: &[Task]) {
        use tokio::io::AsyncReadExt;
        for t in tasks {
            let socket = socket_for(&self.sockets, &alloc.to_string(), &t.name);
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
                let sent = stream.try_clone().and_then(|s| Control::new(s).send(Order::Kill));
                // It closes the socket as it exits, once the tree is gone.
                let reader = stream.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(stream));
                if let (Ok(()), Ok(mut s)) = (sent, reader) {
                    let gone = async move {
                        let mut buf = [0u8; 256];
                        while s.read(&mut buf).await? > 0 {}
                        Ok::<_, std::io::Error>(())
                    };
                    if tokio::time::timeout(Duration::from_secs(10), gone).await.is_err() {
                        tracing::error!(%alloc, task = %t.name, "the task's supervisor did not end within 10 s of a kill");
                    }
                }
            }
            let _ = take_exit(&socket);
        }
    }
}

/// The exit a supervisor recorded beside `socket`, taken (the file is
/// removed once read).
fn take_exit(socket: &Path) -> Option<Exit> {
    let file = super::supervise::exit_file(socket);
    let text = std::fs::read_to_string(&file).ok()?;
    let _ = std::fs::remove_file(&file);
    let (code, signal) = super::supervise::parse_exit(&text)?;
    Some(Exit { code, signal })
}

fn attach(
    stream: std::os::unix::net::UnixStream,
    ctx: &TaskContext,
    socket: PathBuf,
) -> std::io::Result<Box<dyn Running>> {
    stream.set_nonblocking(true)?;
    let control = Arc::new(Control::new(stream.try_clone()?));
    let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::net::UnixStream::from_std(stream)?));
    let fence = ctx.fence.clone().map(|f| (f, ctx.alloc));
    if let Some((f, alloc)) = &fence {
        f.register(*alloc, control.clone());
    }
    Ok(Box::new(SupervisedRun { control, lines, socket, fence, exit: None }))
}

/// A task that had ended before the agent came back to it.
struct Ended(Exit);

#[async_trait]
impl Running for Ended {
    async fn wait(&mut self) -> Exit {
        self.0
    }

    async fn stop(&mut self, _grace: Duration) -> Exit {
        self.0
    }
}

/// A task under its supervisor, through the supervisor's socket.
struct SupervisedRun {
    control: Arc<Control>,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::UnixStream>>,
    socket: PathBuf,
    fence: Option<(Arc<Fence>, AllocId)>,
    exit: Option<Exit>,
}

impl SupervisedRun {
    fn ended(&mut self, exit: Exit) -> Exit {
        if let Some((f, alloc)) = self.fence.take() {
            f.forget(alloc, &self.control);
        }
        let _ = std::fs::remove_file(super::supervise::exit_file(&self.socket));
        self.exit = Some(exit);
        exit
    }
}

#[async_trait]
impl Running for SupervisedRun {
    async fn wait(&mut self) -> Exit {
        if let Some(e) = self.exit {
            return e;
        }
        // `next_line` is cancel-safe: a line half read stays buffered.
        loop {
            match self.lines.next_line().await {
                Ok(Some(line)) => {
                    let exit = line.trim().strip_prefix("exit ").and_then(super::supervise::parse_exit);
                    if let Some((code, signal)) = exit {
                        return self.ended(Exit { code, signal });
                    }
                }
                // Gone: its exit file says how the task ended, if it did.
                _ => {
                    let exit = take_exit(&self.socket).unwrap_or(Exit { code: None, signal: None });
                    return self.ended(exit);
                }
            }
        }
    }

    async fn signal(&mut self, signal: i32) -> Result<(), String> {
        if self.exit.is_some() {
            return Err("the task has ended".into());
        }
        self.control.send(Order::Signal { signal }).map_err(|e| format!("its supervisor is gone: {e}"))
    }

    async fn stop(&mut self, grace: Duration) -> Exit {
        if let Some(e) = self.exit {
            return e;
        }
        let _ = self.control.send(Order::Stop { grace_ms: grace.as_millis() as u64 });
        if let Ok(e) = tokio::time::timeout(grace + Duration::from_secs(5), self.wait()).await {
            return e;
        }
        let _ = self.control.send(Order::Kill);
        match tokio::time::timeout(Duration::from_secs(5), self.wait()).await {
            Ok(e) => e,
            Err(_) => self.ended(Exit { code: None, signal: Some(libc::SIGKILL) }),
        }
    }
}

impl Drop for SupervisedRun {
    /// A run dropped before it ended (the agent stopping, cleanly or not)
    /// leaves its task to the supervisor: it runs on until its deadline,
    /// or until the agent comes back and attaches again.
    fn drop(&mut self) {
        if let Some((f, alloc)) = self.fence.take() {
            f.forget(alloc, &self.control);
        }
    }
}

/// Why the kernel would not execute a task's `command`, in words: what
/// is missing, or not a program for this machine, or not permitted.
fn exec_error(
    e: std::io::Error,
    command: &str,
    path_var: &str,
    dir: &Path,
    account: Option<&Account>,
    task: &str,
) -> StartError {
    use super::launch::{candidates, looked_in, why_not_a_program};
    let found = candidates(command, path_var, dir);
    // The file the kernel refused: the first regular file on the
    // way that the task's user may execute.
    let program = || found.iter().find(|p| std::fs::metadata(p).is_ok_and(|m| executable_by(&m, account)));
    match e.kind() {
        _ if e.raw_os_error() == Some(libc::ENOEXEC) => {
            let why = program().map(|p| why_not_a_program(p, |m| readable_by(m, account))).unwrap_or_default();
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
            None => {
                StartError::Unrunnable(format!("command `{command}` not found{}", looked_in(command, path_var, dir)))
            }
        },
        // This node refused the switch of user: another may not.
        _ if e.raw_os_error() == Some(libc::EPERM) => StartError::Fatal(format!(
            "this node refused to run task `{}` as `{}` (operation not permitted)",
            task,
            account.map_or("its own user", |a| a.name.as_str())
        )),
        std::io::ErrorKind::PermissionDenied => match account {
            Some(a) => StartError::Unrunnable(format!(
                "command `{command}` is not executable by `{}` (permission denied)",
                a.name
            )),
            None => StartError::Unrunnable(format!("command `{command}` is not executable (permission denied)")),
        },
        _ => StartError::Failed(format!("cannot start `{command}`: {e}")),
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
    // A delegated instance's index at its origin (see `ENV_ORIGIN`).
    let origin_index = env.get(ENV_ORIGIN_INDEXES).and_then(|l| l.split(',').nth(ctx.index as usize));
    if let Some(i) = origin_index {
        out.push((ENV_ORIGIN_INDEX.into(), i.to_string()));
    }
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
        // Reaped: its pid may be reused from here on, so it is forgotten
        // before anything awaits (a signal or a stop in between must not
        // reach another process group).
        let pid = std::mem::replace(&mut self.pid, 0);
        if pid > 0 {
            // SAFETY: kill(2) on our own child's process group, whose
            // leader was reaped just now: what is left of it.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
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

    async fn signal(&mut self, signal: i32) -> Result<(), String> {
        if self.exit.is_some() || self.pid <= 0 {
            return Err("the task has ended".into());
        }
        // SAFETY: kill(2) on our own child's process group, not yet reaped.
        match unsafe { libc::kill(-self.pid, signal) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error().to_string()),
        }
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
