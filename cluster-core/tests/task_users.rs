//! Tasks without the keys to the house (security review, item 4): an
//! agent that runs as root starts exec tasks as an unprivileged user, in a
//! directory only that user can enter, and a spec's `user` only when the
//! agent allows it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_core::agent::driver::{Account, Drivers, StartError, TaskContext, TaskUsers};
use cluster_core::agent::logs::Rotation;
use cluster_core::diag::SourceFile;
use cluster_core::ids::AllocId;
use cluster_core::model::job::Task;
use cluster_core::spec::parse_job;

fn task(script: &str, user: Option<&str>) -> Task {
    let user = user.map_or(String::new(), |u| format!("user = \"{u}\"\n"));
    let text = format!(
        "[job]\nname = \"who\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\n\
         command = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\n{user}resources = {{ cpu = \"100m\", memory = \"16MiB\" }}\n"
    );
    parse_job(&SourceFile::new("who.toml", text)).value.expect("the spec parses").groups[0].tasks[0].clone()
}

fn context(data: &Path, alloc: u64, task: Task) -> TaskContext {
    let dir = data.join("allocs").join(AllocId(alloc).to_string());
    TaskContext {
        alloc: AllocId(alloc),
        job: "who".into(),
        group: "g".into(),
        index: 0,
        task,
        dir: dir.join("t"),
        logs: dir.join("logs"),
        rotation: Rotation::default(),
        fence: None,
    }
}

/// Runs the task to its end; its stdout.
async fn run(drivers: &Drivers, ctx: &TaskContext) -> Result<String, StartError> {
    let mut run = drivers.exec.start(ctx).await?;
    let exit = tokio::time::timeout(Duration::from_secs(10), run.wait()).await.expect("the task ends");
    assert!(exit.success(), "{exit:?}");
    Ok(std::fs::read_to_string(ctx.logs.join("t.stdout.0")).unwrap_or_default())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn tasks_run_as_the_agents_task_user_and_only_allowed_spec_users() {
    let base = Scratch(std::env::temp_dir().join(format!("hanse-task-users-{}", std::process::id())));
    let data = base.0.join("data");
    let nobody = Account::lookup("nobody").expect("this machine has a nobody");
    let daemon = Account::lookup("daemon").expect("this machine has a daemon user");
    let users = TaskUsers { default: Some(nobody.clone()), allowed: vec![daemon.clone()] };
    let drivers = Drivers::only(None, &["exec".into()], users);
    if Account::current().uid != 0 {
        // Only root switches users: a task that would is refused by name.
        let err = run(&drivers, &context(&data, 1, task("id -u", None))).await.unwrap_err();
        assert!(err.to_string().contains("only root can switch users"), "{err}");
        return;
    }
    assert!(drivers.switches_user());
    // As an agent running as root lays out its data directory (0711 on the
    // way), with a secret in it and another allocation's log beside.
    for d in [&data, &data.join("allocs")] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    cluster_core::private::write_private(&data.join("agent.state"), b"SECRET-STATE").unwrap();
    let other = context(&data, 9, task("echo OTHER-TASKS-OUTPUT", None));
    run(&drivers, &other).await.unwrap();

    let probe = "id -u; id -G; touch \"$HANSE_TASK_DIR/mine\" && echo wrote; \
                 cat ../../../agent.state 2>/dev/null || echo state-denied; \
                 ls ../.. >/dev/null 2>&1 || echo list-denied; \
                 cat ../../a000009/logs/t.stdout.0 2>/dev/null || echo logs-denied; \
                 echo session=$(cut -d' ' -f6 /proc/$$/stat) pid=$$ tty=$(cut -d' ' -f7 /proc/$$/stat); \
                 perl -e 'print setpgrp(0, getpgrp($ARGV[0])) ? \"joined\\n\" : \"refused\\n\"' $PPID";
    let ctx = context(&data, 1, task(probe, None));
    let out = run(&drivers, &ctx).await.unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let groups: Vec<String> = nobody.groups.iter().map(u32::to_string).collect();
    assert_eq!(lines[0], nobody.uid.to_string(), "runs as nobody: {out}");
    assert_eq!(lines[1], groups.join(" "), "with nobody's groups alone, none of root's: {out}");
    assert_eq!(lines[2], "wrote", "writes its own directory: {out}");
    for denied in ["state-denied", "list-denied", "logs-denied"] {
        assert!(lines.contains(&denied), "{denied}: {out}");
    }
    assert!(!out.contains("SECRET-STATE") && !out.contains("OTHER-TASKS-OUTPUT"), "{out}");
    // A session of its own: it leads it, has no terminal, and cannot join
    // the agent's process group (where a stop would miss it).
    let session = lines.iter().find(|l| l.starts_with("session=")).expect("the session line");
    let field = |k: &str| session.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap().to_string();
    assert_eq!(field("session="), field("pid="), "{session}");
    assert_eq!(field("tty="), "0", "{session}");
    assert_eq!(lines.last(), Some(&"refused"), "joined the agent's process group: {out}");
    let meta = std::fs::metadata(&ctx.dir).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (nobody.uid, nobody.gid), "the task's directory is nobody's");
    assert_eq!(mode(&ctx.dir), 0o700);
    assert_eq!(mode(ctx.dir.parent().unwrap()), 0o711, "the allocation's directory: passable, not readable");
    assert_eq!(mode(&ctx.logs), 0o700, "logs are the agent's");
    assert_eq!(mode(&ctx.logs.join("t.stdout.0")), 0o600);

    // A user the agent allows; then one it does not, refused before anything runs.
    let out = run(&drivers, &context(&data, 2, task("id -u; id -G", Some("daemon")))).await.unwrap();
    let groups: Vec<String> = daemon.groups.iter().map(u32::to_string).collect();
    assert_eq!(out, format!("{}\n{}\n", daemon.uid, groups.join(" ")));
    // A task may not take the log directory's name, nor the shared
    // directory's, however the job came.
    for name in ["logs", "alloc"] {
        let mut named = task("true", None);
        named.name = name.into();
        match run(&drivers, &context(&data, 4, named)).await {
            Err(StartError::Unrunnable(m)) => assert!(m.contains("not a valid task name"), "{m}"),
            other => panic!("a task named {name} ran: {other:?}"),
        }
    }
    let refused = context(&data, 3, task("touch /tmp/should-not-exist", Some("root")));
    match run(&drivers, &refused).await {
        Err(StartError::Fatal(m)) => assert!(m.contains("does not allow") && m.contains("daemon"), "{m}"),
        other => panic!("root was not refused: {other:?}"),
    }
    assert!(!refused.dir.exists(), "nothing was made for the refused task");
}

/// An agent that switches nobody keeps its data directory private.
#[test]
fn an_agent_that_runs_tasks_as_itself_needs_no_passable_directories() {
    let me = Account::current();
    let users = TaskUsers { default: Some(me), allowed: Vec::new() };
    assert!(!Drivers::only(None, &["exec".into()], users).switches_user());
    assert!(!Drivers::new(None).switches_user());
}

/// The spec checker refuses a task named `logs`, and a `user` that is not
/// a user name, each located.
#[test]
fn the_spec_refuses_the_log_directorys_name_and_bad_users() {
    let spec = |name: &str, user: &str| {
        let text = format!(
            "[job]\nname = \"j\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"{name}\"\ndriver = \"exec\"\n\
             command = \"true\"\nuser = \"{user}\"\n"
        );
        let file = SourceFile::new("j.toml", text);
        let checked = parse_job(&file);
        (checked.value.is_some(), file.render(&checked.diagnostics))
    };
    let (ok, text) = spec("logs", "daemon");
    assert!(!ok && text.contains("may not be named `logs`") && text.contains("j.toml:6"), "{text}");
    let (ok, text) = spec("t", "Root; rm -rf /");
    assert!(!ok && text.contains("invalid user") && text.contains("j.toml:9"), "{text}");
    assert!(spec("t", "www-data").0);
}
