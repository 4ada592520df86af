//! An allocation's health, as its agent sees it: each task's checks run on
//! their interval, and the instance is judged once, healthy or unhealthy
//! (see [`crate::model::alloc::AllocHealth`]), after Nomad's client-side
//! deployment health.
//!
//! Healthy: every task has been running, without a restart, for the
//! group's `min_healthy_time`, every check passing all along. Unhealthy:
//! not healthy by its `healthy_deadline` after the allocation started.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::driver::Account;
use crate::model::alloc::{AllocHealth, CHECK_OUTPUT_MAX, CheckStatus, TaskPhase, TaskState};
use crate::model::job::{Check, CheckKind, UpdateStrategy};

/// Runs `check` once, within its timeout: its status and what it said.
/// Script checks run in `dir` as `account` (the task's user).
pub async fn run_check(check: &Check, dir: &Path, account: Option<&Account>) -> (CheckStatus, String) {
    let timeout = Duration::from_millis(check.timeout_ms);
    let run = async {
        match &check.kind {
            CheckKind::Tcp { port } => match tokio::net::TcpStream::connect(("127.0.0.1", *port)).await {
                Ok(_) => (CheckStatus::Passing, format!("connected to 127.0.0.1:{port}")),
                Err(e) => (CheckStatus::Critical, format!("127.0.0.1:{port}: {e}")),
            },
            CheckKind::Http { port, path } => http_get(*port, path, timeout).await,
            CheckKind::Script { command, args } => script(command, args, dir, account).await,
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((status, output)) => (status, clip(output)),
        Err(_) => (CheckStatus::Critical, format!("timed out after {} ms", check.timeout_ms)),
    }
}

fn clip(mut s: String) -> String {
    if s.len() > CHECK_OUTPUT_MAX {
        let mut end = CHECK_OUTPUT_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `GET http://127.0.0.1:port{path}`: passing on 2xx. No redirect is
/// followed.
async fn http_get(port: u16, path: &str, timeout: Duration) -> (CheckStatus, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let call = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .build()
            .into();
        match agent.get(&url).call() {
            Ok(r) if r.status().is_success() => (CheckStatus::Passing, format!("HTTP {}", r.status().as_u16())),
            Ok(r) => (CheckStatus::Critical, format!("HTTP {}", r.status().as_u16())),
            Err(e) => (CheckStatus::Critical, format!("{url}: {e}")),
        }
    });
    call.await.unwrap_or_else(|e| (CheckStatus::Critical, format!("the check did not finish: {e}")))
}

/// Runs `command args` in `dir` as `account`: passing when it exits 0.
/// What it said last (a line of its output) is the check's output.
async fn script(command: &str, args: &[String], dir: &Path, account: Option<&Account>) -> (CheckStatus, String) {
    let mut cmd = tokio::process::Command::new(command);
    // Its own process group, killed whole when it times out or the
    // allocation ends (dropped); and dead with the agent.
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    if let Some(a) = account.filter(|a| (a.uid, a.gid) != (Account::current().uid, Account::current().gid)) {
        let (uid, gid, groups) = (a.uid, a.gid, a.groups.clone());
        // SAFETY: setgroups, setgid and setuid are async-signal-safe; they
        // run in the child between fork and exec, in the order that lets
        // each succeed (groups and gid while still privileged), touching
        // only what was moved in.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = match cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return (CheckStatus::Critical, format!("cannot run `{command}`: {e}")),
    };
    let group = child.id().map(|pid| KillGroup(pid as i32));
    let out = child.wait_with_output().await;
    // Whatever it left behind in its group goes with it.
    drop(group);
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout });
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            match out.status.code() {
                Some(0) => (CheckStatus::Passing, last),
                Some(c) => (CheckStatus::Critical, if last.is_empty() { format!("exit code {c}") } else { last }),
                None => (CheckStatus::Critical, "killed by a signal".into()),
            }
        }
        Err(e) => (CheckStatus::Critical, format!("cannot run `{command}`: {e}")),
    }
}

/// Kills a process group when dropped (a check's, when it ended, timed out
/// or its allocation stopped).
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group the check's process leads.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// Judges one allocation's health from its tasks' states over time.
#[derive(Debug)]
pub struct Judge {
    min_healthy: Duration,
    deadline: Instant,
    /// Since when every task has run with every check passing, and the
    /// tasks' starts then.
    good_since: Option<(Instant, u64)>,
    verdict: Option<AllocHealth>,
}

impl Judge {
    pub fn new(update: &UpdateStrategy, started: Instant) -> Judge {
        // Bounded as the spec parser bounds them, whatever a peer sent.
        let day = Duration::from_secs(86_400);
        Judge {
            min_healthy: Duration::from_millis(update.min_healthy_time_ms).min(day),
            deadline: started + Duration::from_millis(update.healthy_deadline_ms).min(day),
            good_since: None,
            verdict: None,
        }
    }

    /// Looks at the tasks at `now`, `starts` being how many times its tasks
    /// were started so far (any start, an operator's restart too, begins
    /// the wait again); the verdict, once there is one (it never changes
    /// after).
    pub fn observe(&mut self, tasks: &[TaskState], starts: u64, now: Instant) -> Option<AllocHealth> {
        if self.verdict.is_some() {
            return self.verdict;
        }
        let restarts = starts;
        let good = !tasks.is_empty()
            && tasks
                .iter()
                .all(|t| t.state == TaskPhase::Running && t.checks.iter().all(|c| c.status == CheckStatus::Passing));
        self.good_since = match self.good_since {
            Some((since, r)) if good && r == restarts => Some((since, r)),
            _ if good => Some((now, restarts)),
            _ => None,
        };
        if self.good_since.is_some_and(|(since, _)| now.duration_since(since) >= self.min_healthy) {
            self.verdict = Some(AllocHealth::Healthy);
        } else if now >= self.deadline {
            self.verdict = Some(AllocHealth::Unhealthy);
        }
        self.verdict
    }

    /// When the verdict can next change without a task changing.
    pub fn next_look(&self, now: Instant) -> Instant {
        match self.good_since {
            Some((since, _)) => (since + self.min_healthy).min(self.deadline),
            None => self.deadline,
        }
        .max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::alloc::CheckState;

    fn task(state: TaskPhase, restarts: u32, check: Option<CheckStatus>) -> TaskState {
        TaskState {
            name: "t".into(),
            state,
            restarts,
            exit_code: None,
            signal: None,
            message: String::new(),
            checks: check
                .map(|status| CheckState { name: "c".into(), kind: "tcp".into(), status, output: String::new() })
                .into_iter()
                .collect(),
        }
    }

    fn strategy(min_ms: u64, deadline_ms: u64) -> UpdateStrategy {
        UpdateStrategy { min_healthy_time_ms: min_ms, healthy_deadline_ms: deadline_ms, ..UpdateStrategy::default() }
    }

    #[test]
    fn healthy_after_min_healthy_time_of_running_with_checks_passing() {
        let t0 = Instant::now();
        let mut j = Judge::new(&strategy(1_000, 10_000), t0);
        let ok = [task(TaskPhase::Running, 0, Some(CheckStatus::Passing))];
        assert_eq!(j.observe(&ok, 1, t0), None);
        assert_eq!(j.next_look(t0), t0 + Duration::from_millis(1_000));
        assert_eq!(j.observe(&ok, 1, t0 + Duration::from_millis(999)), None);
        assert_eq!(j.observe(&ok, 1, t0 + Duration::from_millis(1_000)), Some(AllocHealth::Healthy));
        // Final: a later failure changes nothing.
        let bad = [task(TaskPhase::Dead, 1, None)];
        assert_eq!(j.observe(&bad, 2, t0 + Duration::from_secs(60)), Some(AllocHealth::Healthy));
    }

    #[test]
    fn a_failing_check_or_a_restart_starts_the_wait_again() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut j = Judge::new(&strategy(1_000, 10_000), t0);
        assert_eq!(j.observe(&[task(TaskPhase::Running, 0, Some(CheckStatus::Passing))], 1, t0), None);
        assert_eq!(j.observe(&[task(TaskPhase::Running, 0, Some(CheckStatus::Critical))], 1, t0 + ms(500)), None);
        assert_eq!(j.observe(&[task(TaskPhase::Running, 0, Some(CheckStatus::Passing))], 1, t0 + ms(600)), None);
        assert_eq!(j.observe(&[task(TaskPhase::Running, 1, Some(CheckStatus::Passing))], 2, t0 + ms(1_500)), None);
        assert_eq!(j.observe(&[task(TaskPhase::Running, 1, Some(CheckStatus::Passing))], 2, t0 + ms(2_400)), None);
        let at = t0 + ms(2_500);
        assert_eq!(
            j.observe(&[task(TaskPhase::Running, 1, Some(CheckStatus::Passing))], 2, at),
            Some(AllocHealth::Healthy)
        );
    }

    #[test]
    fn unhealthy_at_the_deadline() {
        let t0 = Instant::now();
        let mut j = Judge::new(&strategy(1_000, 3_000), t0);
        let pending = [task(TaskPhase::Running, 0, Some(CheckStatus::Pending))];
        assert_eq!(j.observe(&pending, 1, t0 + Duration::from_millis(2_999)), None);
        assert_eq!(j.next_look(t0), t0 + Duration::from_millis(3_000));
        assert_eq!(j.observe(&pending, 1, t0 + Duration::from_millis(3_000)), Some(AllocHealth::Unhealthy));
    }

    #[tokio::test]
    async fn checks_pass_and_fail_as_their_targets_do() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = std::env::temp_dir();
        let tcp = Check { name: "t".into(), kind: CheckKind::Tcp { port }, interval_ms: 100, timeout_ms: 1_000 };
        assert_eq!(run_check(&tcp, &dir, None).await.0, CheckStatus::Passing);
        drop(listener);
        let (status, output) = run_check(&tcp, &dir, None).await;
        assert_eq!(status, CheckStatus::Critical);
        assert!(output.contains(&port.to_string()), "{output}");
        let script = |args: &[&str]| Check {
            name: "s".into(),
            kind: CheckKind::Script { command: "/bin/sh".into(), args: args.iter().map(|a| a.to_string()).collect() },
            interval_ms: 100,
            timeout_ms: 500,
        };
        assert_eq!(run_check(&script(&["-c", "echo fine"]), &dir, None).await, (CheckStatus::Passing, "fine".into()));
        let (status, output) = run_check(&script(&["-c", "echo broken >&2; exit 2"]), &dir, None).await;
        assert_eq!((status, output.as_str()), (CheckStatus::Critical, "broken"));
        let (status, output) = run_check(&script(&["-c", "sleep 5"]), &dir, None).await;
        assert_eq!(status, CheckStatus::Critical);
        assert!(output.contains("timed out"), "{output}");
        // As the task's user: root's agent runs a check as `nobody`.
        if Account::current().uid == 0 {
            let nobody = Account::lookup("nobody").expect("a nobody account");
            let (status, output) = run_check(&script(&["-c", "id -u; id -G"]), &dir, Some(&nobody)).await;
            assert_eq!(status, CheckStatus::Passing, "{output}");
            let groups: Vec<u32> = output.split_whitespace().map(|g| g.parse().unwrap()).collect();
            let mut want = nobody.groups.clone();
            want.sort();
            let mut got = groups.clone();
            got.sort();
            assert_eq!(got, want, "the check runs with nobody's groups only");
            let (_, uid) = run_check(&script(&["-c", "id -G; id -u"]), &dir, Some(&nobody)).await;
            assert_eq!(uid, nobody.uid.to_string());
        }
    }

    #[tokio::test]
    async fn an_http_check_passes_on_2xx_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for answer in ["200 OK", "503 Service Unavailable"] {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap();
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /ready "));
                let reply = format!("HTTP/1.1 {answer}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                conn.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let check = Check {
            name: "h".into(),
            kind: CheckKind::Http { port, path: "/ready".into() },
            interval_ms: 100,
            timeout_ms: 2_000,
        };
        let dir = std::env::temp_dir();
        assert_eq!(run_check(&check, &dir, None).await, (CheckStatus::Passing, "HTTP 200".into()));
        assert_eq!(run_check(&check, &dir, None).await, (CheckStatus::Critical, "HTTP 503".into()));
    }
}
