//! One allocation on an agent: its tasks started together, restarted by
//! the group's policy, stopped on request, and every change reported.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::driver::{Drivers, Exit, StartError, TaskContext};
use super::health;
use super::logs::Rotation;
use super::rpc::AgentAlloc;
use crate::model::alloc::{AllocHealth, AllocReport, AllocStatus, CheckState, CheckStatus, TaskPhase, TaskState};
use crate::model::job::{CheckKind, JobType, RestartMode, Task};

/// What the agent wants of a running allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Run,
    /// Stop every task, each within its kill timeout but no later than
    /// `deadline`; the allocation then reports `status`.
    Stop {
        deadline: Option<tokio::time::Instant>,
        status: AllocStatus,
    },
}

/// An operator's request to a running allocation (`hanse alloc restart`,
/// `hanse alloc signal`), answered with what was done or why not.
#[derive(Debug)]
pub struct Op {
    /// One task by name, or every task.
    pub task: Option<String>,
    pub kind: OpKind,
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Stop the task and start it again in place, outside its restart
    /// policy (its restarts are not counted).
    Restart,
    /// Send this signal to every process of the task.
    Signal(i32),
}

/// What a task's run hears besides its control: operators' requests, and
/// where it counts its starts (for the health judge).
struct Side<'a> {
    ops: mpsc::UnboundedReceiver<TaskOp>,
    starts: &'a std::sync::atomic::AtomicU64,
}

/// One task's part of an [`Op`].
type TaskOp = (OpKind, tokio::sync::oneshot::Sender<Result<String, String>>);

/// Where an agent keeps allocations, and how it runs them.
#[derive(Clone)]
pub struct Env {
    pub drivers: Drivers,
    pub allocs_dir: PathBuf,
    pub rotation: Rotation,
    /// Renews the deadlines of the tasks' supervisors ([`super::fence`]).
    pub fence: std::sync::Arc<super::fence::Fence>,
}

/// Changes one task's state and reports the allocation.
type Report<'a> = &'a (dyn Fn(&(dyn Fn(&mut TaskState) + Sync)) + Sync);

/// How one task ended for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Succeeded,
    Failed,
    Stopped,
}

/// Runs `alloc` until it ends or is stopped; sends a report on every
/// change of a task, the last one terminal.
pub async fn run(
    env: Env,
    alloc: AgentAlloc,
    control: watch::Receiver<Control>,
    reports: mpsc::UnboundedSender<AllocReport>,
    ops: mpsc::UnboundedReceiver<Op>,
) {
    let tasks = &alloc.group.tasks;
    let (task_ops, mut task_op_rxs): (Vec<_>, Vec<_>) =
        tasks.iter().map(|_| mpsc::unbounded_channel::<TaskOp>()).unzip();
    let states: Arc<Mutex<Vec<TaskState>>> = Arc::new(Mutex::new(
        tasks
            .iter()
            .map(|t| TaskState {
                name: t.name.clone(),
                state: TaskPhase::Pending,
                restarts: 0,
                exit_code: None,
                signal: None,
                message: String::new(),
                checks: t
                    .checks
                    .iter()
                    .map(|c| CheckState {
                        name: c.name.clone(),
                        kind: c.kind.word().into(),
                        status: CheckStatus::Pending,
                        output: String::new(),
                    })
                    .collect(),
            })
            .collect(),
    ));
    let health: Mutex<Option<AllocHealth>> = Mutex::new(None);
    let current = |s: &[TaskState]| {
        if s.iter().any(|t| t.state == TaskPhase::Running) { AllocStatus::Running } else { AllocStatus::Pending }
    };
    let send = |status: AllocStatus| {
        let tasks = states.lock().expect("task states").clone();
        let health = *health.lock().expect("health");
        let _ = reports.send(AllocReport { id: alloc.id, status, tasks, health });
    };
    let report = |i: usize, f: &(dyn Fn(&mut TaskState) + Sync)| {
        let status = {
            let mut s = states.lock().expect("task states");
            f(&mut s[i]);
            current(&s)
        };
        send(status);
    };
    // A sibling failing for good stops the others.
    let (fail_tx, fail_rx) = watch::channel(false);
    let dir = env.allocs_dir.join(alloc.id.to_string());
    // Every start of every task: the health judge starts its wait again.
    let starts = &std::sync::atomic::AtomicU64::new(0);
    let mut op_rxs = task_op_rxs.drain(..);
    let runs = tasks.iter().enumerate().map(|(i, task)| {
        let ops = op_rxs.next().expect("one per task");
        let ctx = TaskContext {
            alloc: alloc.id,
            job: alloc.job.to_string(),
            group: alloc.group.name.to_string(),
            index: alloc.index,
            task: task.clone(),
            dir: dir.join(&*task.name),
            logs: dir.join("logs"),
            rotation: env.rotation,
            fence: Some(env.fence.clone()),
        };
        let (control, fail_rx, fail_tx) = (control.clone(), fail_rx.clone(), fail_tx.clone());
        let env = &env;
        let alloc = &alloc;
        let report = &report;
        async move {
            let end = run_task(env, alloc, ctx, control, fail_rx, Side { ops, starts }, &|f| report(i, f)).await;
            if end == End::Failed {
                let _ = fail_tx.send(true);
            }
            end
        }
    });
    // Services and system jobs are judged healthy or not (batch work is
    // done when it ends); checks run for display whatever the type.
    let judged = alloc.job_type != JobType::Batch;
    let changed = || {
        let status = current(&states.lock().expect("task states"));
        send(status)
    };
    let monitor = watch_health(&env, &alloc, &states, starts, judged.then_some(&health), &changed);
    let dispatch = dispatch(tasks, ops, &task_ops);
    let ends = tokio::select! {
        ends = futures_join_all(runs) => ends,
        never = monitor => match never {},
        never = dispatch => match never {},
    };
    let status = if let Control::Stop { status, .. } = *control.borrow() {
        status
    } else if ends.contains(&End::Failed) {
        AllocStatus::Failed
    } else {
        AllocStatus::Complete
    };
    send(status);
}

/// Hands each operator's request to the tasks it names, one after the
/// other, and answers it with what they did. Never returns.
async fn dispatch(
    tasks: &[Task],
    mut ops: mpsc::UnboundedReceiver<Op>,
    task_ops: &[mpsc::UnboundedSender<TaskOp>],
) -> std::convert::Infallible {
    while let Some(op) = ops.recv().await {
        // Its caller gave up (it timed out): acting now would surprise.
        if op.reply.is_closed() {
            continue;
        }
        let targets: Vec<usize> = match &op.task {
            None => (0..tasks.len()).collect(),
            Some(name) => tasks.iter().position(|t| *t.name == **name).into_iter().collect(),
        };
        if targets.is_empty() {
            let names: Vec<&str> = tasks.iter().map(|t| &*t.name).collect();
            let name = op.task.as_deref().unwrap_or_default();
            let _ = op.reply.send(Err(format!("no task `{name}` here (its tasks: {})", names.join(", "))));
            continue;
        }
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        for i in targets {
            if op.reply.is_closed() {
                break;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ended = || format!("task `{}` has ended", tasks[i].name);
            if task_ops[i].send((op.kind, tx)).is_err() {
                failed.push(ended());
                continue;
            }
            match rx.await {
                Ok(Ok(m)) => done.push(m),
                Ok(Err(e)) => failed.push(e),
                Err(_) => failed.push(ended()),
            }
        }
        let answer = match (done.is_empty(), failed.is_empty()) {
            (_, true) => Ok(done.join("; ")),
            (true, false) => Err(failed.join("; ")),
            (false, false) => Ok(format!("{}; but {}", done.join("; "), failed.join("; "))),
        };
        let _ = op.reply.send(answer);
    }
    std::future::pending().await
}

/// Runs the checks of `alloc`'s tasks while they run, and judges its
/// health into `health` (when given), calling `changed` on each change.
/// Never returns: the caller drops it when the tasks have ended.
async fn watch_health(
    env: &Env,
    alloc: &AgentAlloc,
    states: &Mutex<Vec<TaskState>>,
    starts: &std::sync::atomic::AtomicU64,
    health: Option<&Mutex<Option<AllocHealth>>>,
    changed: &(dyn Fn() + Sync),
) -> std::convert::Infallible {
    let checks = alloc
        .group
        .tasks
        .iter()
        .enumerate()
        .flat_map(|(i, task)| task.checks.iter().enumerate().map(move |(j, check)| (i, task, j, check)));
    let dir = env.allocs_dir.join(alloc.id.to_string());
    let loops = checks.map(|(i, task, j, check)| {
        let dir = dir.join(&*task.name);
        async move {
            let account = match &check.kind {
                CheckKind::Script { .. } => env.drivers.check_account(task),
                _ => Ok(None),
            };
            loop {
                let running = states.lock().expect("task states")[i].state == TaskPhase::Running;
                if running {
                    let (status, output) = match &account {
                        Ok(a) => health::run_check(check, &dir, a.as_ref()).await,
                        Err(e) => (CheckStatus::Critical, e.clone()),
                    };
                    let differs = {
                        let mut s = states.lock().expect("task states");
                        let c = &mut s[i].checks[j];
                        let differs = c.status != status || c.output != output;
                        c.status = status;
                        c.output = output;
                        differs
                    };
                    if differs {
                        changed();
                    }
                }
                // Bounded as the spec parser bounds it, whatever a peer sent.
                let interval = check.interval_ms.clamp(crate::spec::job::CHECK_INTERVAL_MIN_MS, 3_600_000);
                let wait = if running { interval } else { interval.min(250) };
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    });
    let judge = async {
        let Some(health) = health else { return std::future::pending().await };
        let mut judge = health::Judge::new(&alloc.group.update.unwrap_or_default(), tokio::time::Instant::now());
        loop {
            let now = tokio::time::Instant::now();
            let started = starts.load(std::sync::atomic::Ordering::SeqCst);
            let verdict = judge.observe(&states.lock().expect("task states"), started, now);
            if let Some(v) = verdict {
                *health.lock().expect("health") = Some(v);
                changed();
                return std::future::pending().await;
            }
            // Looked at again when it may turn, and at least every 250 ms
            // for the tasks' changes.
            let next = judge.next_look(now).min(now + Duration::from_millis(250));
            tokio::time::sleep_until(next).await;
        }
    };
    let mut all: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>> = Vec::new();
    all.push(Box::pin(judge));
    for l in loops {
        all.push(Box::pin(l));
    }
    futures_join_all(all.into_iter()).await;
    unreachable!("health loops never end")
}

/// Awaits every future (few: the tasks of one group).
async fn futures_join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    // Polled together: each awaits its own process.
    let joined = std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in set.iter_mut().enumerate() {
            if out.len() <= i {
                out.push(None);
            }
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    });
    joined.await;
    out.into_iter().map(|v| v.expect("every future finished")).collect()
}

/// Resolves when the agent asks the allocation to stop, or a sibling
/// failed; with the stop's deadline.
async fn stop_asked(
    control: &mut watch::Receiver<Control>,
    failed: &mut watch::Receiver<bool>,
) -> Option<tokio::time::Instant> {
    loop {
        if let Control::Stop { deadline, .. } = *control.borrow_and_update() {
            return deadline;
        }
        if *failed.borrow_and_update() {
            return None;
        }
        tokio::select! {
            r = control.changed() => if r.is_err() { return None },
            r = failed.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
}

fn grace(task: &Task, deadline: Option<tokio::time::Instant>) -> Duration {
    let own = Duration::from_millis(task.kill_timeout_ms);
    match deadline {
        Some(d) => own.min(d.saturating_duration_since(tokio::time::Instant::now())),
        None => own,
    }
}

async fn run_task(
    env: &Env,
    alloc: &AgentAlloc,
    ctx: TaskContext,
    mut control: watch::Receiver<Control>,
    mut failed: watch::Receiver<bool>,
    side: Side<'_>,
    report: Report<'_>,
) -> End {
    let Side { mut ops, starts } = side;
    let policy = alloc.group.restart;
    let driver = env.drivers.for_task(&ctx.task).clone();
    let mut restarts = 0u32;
    let name = ctx.task.name.clone();
    'start: loop {
        let start = driver.start(&ctx);
        tokio::pin!(start);
        let mut run = tokio::select! {
            r = &mut start => r,
            deadline = stop_asked(&mut control, &mut failed) => {
                // A start is never dropped halfway: its supervisor, told
                // to end, could still start the task after the allocation
                // was reported stopped, and the cluster places a stopped
                // at-most-once instance again at once (found by
                // hanse-chaos: the replacement ran beside it on the same
                // node). The start finishes (its own timeouts bound it),
                // then whatever it started is stopped.
                let message = match start.await {
                    Ok(mut r) => {
                        let exit = r.stop(grace(&ctx.task, deadline)).await;
                        format!("stopped as it started: {}", exit.describe())
                    }
                    Err(_) => "stopped before it started".to_string(),
                };
                report(&|t| {
                    t.state = TaskPhase::Dead;
                    t.message = message.clone();
                });
                return End::Stopped;
            }
        };
        let exit: Result<Exit, StartError> = match run.as_mut() {
            Err(e) => Err(e.clone()),
            Ok(r) => {
                // This run's row: the last run's exit is history now, and
                // so are its checks' results.
                starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                report(&|t| {
                    t.state = TaskPhase::Running;
                    t.exit_code = None;
                    t.signal = None;
                    t.message = "started".into();
                    for c in &mut t.checks {
                        c.status = CheckStatus::Pending;
                        c.output.clear();
                    }
                });
                loop {
                    tokio::select! {
                        exit = r.wait() => break Ok(exit),
                        deadline = stop_asked(&mut control, &mut failed) => {
                            let exit = r.stop(grace(&ctx.task, deadline)).await;
                            report(&|t| {
                                t.state = TaskPhase::Dead;
                                t.exit_code = exit.code;
                                t.signal = exit.signal;
                                t.message = format!("stopped: {}", exit.describe());
                            });
                            return End::Stopped;
                        }
                        Some((kind, reply)) = ops.recv() => match kind {
                            OpKind::Signal(_) if reply.is_closed() => {}
                            OpKind::Restart if reply.is_closed() => {}
                            OpKind::Signal(signal) => {
                                let sent = r.signal(signal).await;
                                let _ = reply.send(match sent {
                                    Ok(()) => Ok(format!("task `{name}`: signal {signal} sent")),
                                    Err(e) => Err(format!("task `{name}`: {e}")),
                                });
                            }
                            OpKind::Restart => {
                                let exit = r.stop(grace(&ctx.task, None)).await;
                                // A stop that came meanwhile wins: nothing
                                // starts again.
                                let stopping = matches!(*control.borrow(), Control::Stop { .. }) || *failed.borrow();
                                report(&|t| {
                                    t.state = if stopping { TaskPhase::Dead } else { TaskPhase::Pending };
                                    t.exit_code = exit.code;
                                    t.signal = exit.signal;
                                    t.message = if stopping {
                                        format!("stopped: {}", exit.describe())
                                    } else {
                                        format!("restarted by an operator ({})", exit.describe())
                                    };
                                });
                                if stopping {
                                    let _ = reply.send(Err(format!("task `{name}` stopped: its allocation is stopping")));
                                    return End::Stopped;
                                }
                                let _ = reply.send(Ok(format!("task `{name}` stopped; starting it again")));
                                continue 'start;
                            }
                        },
                    }
                }
            }
        };
        let (exit_code, signal, what) = match &exit {
            Ok(e) => (e.code, e.signal, e.describe()),
            Err(e) => (None, None, e.to_string()),
        };
        let done = matches!(exit, Ok(e) if e.success()) && alloc.job_type == JobType::Batch;
        let unrunnable = matches!(exit, Err(StartError::Unrunnable(_)));
        let fatal = unrunnable || matches!(exit, Err(StartError::Fatal(_)));
        let may_restart = !done && !fatal && (policy.mode == RestartMode::Delay || restarts < policy.attempts);
        if !may_restart {
            report(&|t| {
                t.state = if unrunnable { TaskPhase::Unrunnable } else { TaskPhase::Dead };
                t.exit_code = exit_code;
                t.signal = signal;
                t.message = if done || fatal { what.clone() } else { format!("{what}; no restarts left") };
            });
            return if done { End::Succeeded } else { End::Failed };
        }
        restarts += 1;
        let delay = Duration::from_millis(policy.delay_ms);
        report(&|t| {
            t.state = TaskPhase::Pending;
            t.exit_code = exit_code;
            t.signal = signal;
            t.restarts = restarts;
            t.message = format!("{what}; restarting in {delay:?}");
        });
        let wake = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                _ = stop_asked(&mut control, &mut failed) => {
                    report(&|t| {
                        t.state = TaskPhase::Dead;
                        t.message = format!("{what}; stopped while waiting to restart");
                    });
                    return End::Stopped;
                }
                Some((_, reply)) = ops.recv() => {
                    let _ = reply.send(Err(format!("task `{name}` is not running: it restarts in a moment")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::agent::driver::{Driver, Running};
    use crate::ids::AllocId;
    use crate::model::alloc::DesiredStatus;

    /// A start whose effect outlives its future, as a task supervisor's
    /// does: the task comes alive 100 ms in whether or not anyone still
    /// awaits the start, and only `stop` ends it.
    struct LateStart(Arc<AtomicBool>);
    struct LateRun(Arc<AtomicBool>);

    #[async_trait]
    impl Driver for LateStart {
        async fn start(&self, _: &TaskContext) -> Result<Box<dyn Running>, StartError> {
            let alive = self.0.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                alive.store(true, Ordering::SeqCst);
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(Box::new(LateRun(self.0.clone())))
        }
    }

    #[async_trait]
    impl Running for LateRun {
        async fn wait(&mut self) -> Exit {
            std::future::pending().await
        }
        async fn stop(&mut self, _grace: Duration) -> Exit {
            self.0.store(false, Ordering::SeqCst);
            Exit { code: None, signal: Some(libc::SIGTERM) }
        }
    }

    /// An agent's environment for a test, in a directory of its own.
    fn test_env(drivers: Drivers, name: &str) -> (Env, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("hanse-runner-{name}-{}", std::process::id()));
        let fence = Arc::new(super::super::fence::Fence::new());
        (Env { drivers, allocs_dir: dir.clone(), rotation: Rotation::default(), fence }, dir)
    }

    /// Allocation `id` of a service whose group says `group` and whose one
    /// mock task `t` says `task`.
    fn test_alloc(id: u64, group: &str, task: &str) -> AgentAlloc {
        let text = format!(
            "[job]\nname = \"j\"\ntype = \"service\"\n[[group]]\nname = \"g\"\n{group}[[group.task]]\nname = \"t\"\n\
             driver = \"mock\"\n{task}resources = {{ cpu = 1, memory = \"1GiB\" }}\n"
        );
        let job = crate::spec::job::parse_job(&crate::diag::SourceFile::new("j.toml", text)).value.expect("a job");
        AgentAlloc {
            id: AllocId(id),
            job: job.id.clone(),
            job_type: job.job_type,
            index: 0,
            group: Arc::new(job.groups[0].clone()),
            desired: DesiredStatus::Run,
            status: AllocStatus::Pending,
            lease: None,
        }
    }

    /// Found by hanse-chaos: a stop that came while a task was starting
    /// reported the allocation stopped at once, the cluster placed the
    /// at-most-once instance again, and the abandoned start's task ran
    /// beside its replacement.
    #[tokio::test]
    async fn a_stop_during_a_start_is_reported_only_once_the_started_task_is_stopped() {
        let alive = Arc::new(AtomicBool::new(false));
        let mut drivers = Drivers::new(None);
        drivers.mock = Arc::new(LateStart(alive.clone()));
        let (env, dir) = test_env(drivers, "late");
        let alloc = test_alloc(7, "on_disconnect = \"stop\"\n", "");
        let (control_tx, control_rx) = watch::channel(Control::Run);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_ops, ops_rx) = mpsc::unbounded_channel();
        let runner = tokio::spawn(run(env, alloc, control_rx, tx, ops_rx));
        tokio::time::sleep(Duration::from_millis(20)).await;
        control_tx.send(Control::Stop { deadline: None, status: AllocStatus::Lost }).unwrap();
        let last = loop {
            let r = rx.recv().await.expect("a terminal report");
            if r.status.is_terminal() {
                break r;
            }
        };
        assert_eq!(last.status, AllocStatus::Lost);
        assert!(!alive.load(Ordering::SeqCst), "reported stopped while its task runs");
        // Nor does the task come alive after the report.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!alive.load(Ordering::SeqCst), "the task started after its allocation was reported stopped");
        runner.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An operator's restart stops the task and starts it again in place,
    /// its restarts uncounted; a signal to a driver that takes none, or to
    /// a task that is not there, is answered with why.
    #[tokio::test]
    async fn an_operators_restart_starts_the_task_again_in_place() {
        let (env, dir) = test_env(Drivers::new(None), "ops");
        let alloc = test_alloc(8, "", "run_for = \"1h\"\n");
        let (control_tx, control_rx) = watch::channel(Control::Run);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let runner = tokio::spawn(run(env, alloc, control_rx, tx, ops_rx));
        let running = |r: &AllocReport| r.status == AllocStatus::Running && r.tasks[0].state == TaskPhase::Running;
        while !running(&rx.recv().await.expect("reports")) {}
        let ask = |task: Option<&str>, kind| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            ops.send(Op { task: task.map(str::to_string), kind, reply }).unwrap();
            answer
        };
        let no_signals = ask(None, OpKind::Signal(libc::SIGHUP)).await.unwrap();
        assert_eq!(no_signals, Err("task `t`: this driver's tasks take no signals".to_string()));
        let missing = ask(Some("u"), OpKind::Restart).await.unwrap();
        assert_eq!(missing, Err("no task `u` here (its tasks: t)".to_string()));
        assert_eq!(
            ask(Some("t"), OpKind::Restart).await.unwrap(),
            Ok("task `t` stopped; starting it again".to_string())
        );
        let mut seen_restart = false;
        loop {
            let r = rx.recv().await.expect("reports");
            seen_restart |= r.tasks[0].message.starts_with("restarted by an operator");
            if seen_restart && running(&r) {
                assert_eq!(r.tasks[0].restarts, 0, "an operator's restart is not the policy's");
                break;
            }
            assert!(!r.status.is_terminal(), "{r:?}");
        }
        control_tx.send(Control::Stop { deadline: None, status: AllocStatus::Complete }).unwrap();
        runner.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
