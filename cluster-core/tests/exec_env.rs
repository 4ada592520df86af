//! A task's environment is its spec's `env`, `HANSE_*` and a minimal
//! `PATH`: never the agent's (security review, row 13: tasks printed the
//! agent's `AWS_SECRET_ACCESS_KEY`). One test in this binary: it sets a
//! variable in the process environment, as an agent's would be.

use std::time::Duration;

use cluster_core::agent::driver::{Drivers, TaskContext};
use cluster_core::agent::logs::Rotation;
use cluster_core::diag::SourceFile;
use cluster_core::ids::AllocId;
use cluster_core::spec::parse_job;

#[tokio::test(flavor = "current_thread")]
async fn a_task_never_sees_the_agents_environment() {
    // SAFETY: the only thread of this test binary's runtime; nothing else
    // reads the environment meanwhile.
    unsafe { std::env::set_var("AGENT_SECRET_ACCESS_KEY", "AKIAFAKE") };
    let text = "[job]\nname = \"envy\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\n\
                command = \"sh\"\nargs = [\"-c\", \"env\"]\nenv = { DB_PASSWORD = \"mine\" }\n\
                resources = { cpu = \"100m\", memory = \"16MiB\" }\n";
    let job = parse_job(&SourceFile::new("envy.toml", text.to_string())).value.expect("the spec parses");
    let task = job.groups[0].tasks[0].clone();
    // A relative data dir, as in the README's agent configs.
    let base = std::env::temp_dir().join(format!("hanse-exec-env-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    std::env::set_current_dir(&base).unwrap();
    let ctx = TaskContext {
        alloc: AllocId(1),
        job: "envy".into(),
        group: "g".into(),
        index: 0,
        task,
        dir: "data/allocs/a000001/t".into(),
        logs: "data/allocs/a000001/logs".into(),
        rotation: Rotation::default(),
        fence: None,
    };
    let mut run = Drivers::new(None).exec.start(&ctx).await.expect("sh starts");
    let exit = tokio::time::timeout(Duration::from_secs(10), run.wait()).await.expect("sh ends");
    assert!(exit.success(), "{exit:?}");
    let out = std::fs::read_to_string(base.join("data/allocs/a000001/logs/t.stdout.0")).unwrap();
    assert!(!out.contains("AKIAFAKE"), "the agent's environment leaked into the task:\n{out}");
    assert!(out.contains("DB_PASSWORD=mine"), "{out}");
    assert!(out.contains("PATH=/usr/local/sbin:"), "{out}");
    let task_dir = base.join("data/allocs/a000001/t");
    assert!(out.contains(&format!("HANSE_TASK_DIR={}", task_dir.display())), "not absolute:\n{out}");
    assert!(!out.contains("HANSE_ORIGIN"), "not delegated:\n{out}");

    // Instance 1 of the job a target registered for eu-west's `web`,
    // whose instances here are eu-west's 3 and 7: the task knows it is
    // eu-west's instance 7 (a sharded batch job's shard).
    let mut delegated = job.clone();
    cluster_core::model::job::mark_delegated(&mut delegated, "eu-west", "web", &[3, 7]);
    let ctx = TaskContext {
        alloc: AllocId(2),
        index: 1,
        task: delegated.groups[0].tasks[0].clone(),
        dir: base.join("data/allocs/a000002/t"),
        logs: base.join("data/allocs/a000002/logs"),
        ..ctx
    };
    let mut run = Drivers::new(None).exec.start(&ctx).await.expect("sh starts");
    let exit = tokio::time::timeout(Duration::from_secs(10), run.wait()).await.expect("sh ends");
    assert!(exit.success(), "{exit:?}");
    let out = std::fs::read_to_string(base.join("data/allocs/a000002/logs/t.stdout.0")).unwrap();
    let _ = std::fs::remove_dir_all(&base);
    for line in ["HANSE_ORIGIN=eu-west", "HANSE_ORIGIN_JOB=web", "HANSE_ORIGIN_INDEX=7", "HANSE_ALLOC_INDEX=1"] {
        assert!(out.lines().any(|l| l == line), "no {line}:\n{out}");
    }
}

/// A task name that would leave the allocation's directory is refused
/// before anything is created, however the job arrived (security review,
/// row 10: a peer's offer named a task `../../../tmp/x`).
#[tokio::test(flavor = "current_thread")]
async fn a_task_name_that_leaves_its_directory_is_refused() {
    let text = "[job]\nname = \"trav\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\n\
                command = \"true\"\nresources = { cpu = \"100m\", memory = \"16MiB\" }\n";
    let job = parse_job(&SourceFile::new("trav.toml", text.to_string())).value.expect("the spec parses");
    let base = std::env::temp_dir().join(format!("hanse-exec-trav-{}", std::process::id()));
    for name in ["../../escaped", "/tmp/absolute", ".hidden", ""] {
        let mut task = job.groups[0].tasks[0].clone();
        task.name = name.into();
        let ctx = TaskContext {
            alloc: AllocId(2),
            job: "trav".into(),
            group: "g".into(),
            index: 0,
            dir: base.join("allocs/a000002").join(name),
            logs: base.join("allocs/a000002/logs"),
            task,
            rotation: Rotation::default(),
            fence: None,
        };
        match Drivers::new(None).exec.start(&ctx).await {
            Err(e) => assert!(e.to_string().contains("not a valid task name"), "{name}: {e}"),
            Ok(_) => panic!("{name:?}: started"),
        }
    }
    assert!(!base.join("escaped").exists() && !base.exists(), "nothing was created");
}

/// The exec driver runs only where the agent's config enables it (its
/// default is mock only): elsewhere a task is refused at once, and says
/// how to enable it (security review, finding 1: "the exec driver is
/// always on").
#[tokio::test(flavor = "current_thread")]
async fn a_driver_the_agent_does_not_enable_refuses_every_task() {
    let text = "[job]\nname = \"off\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\n\
                command = \"true\"\nresources = { cpu = \"100m\", memory = \"16MiB\" }\n";
    let job = parse_job(&SourceFile::new("off.toml", text.to_string())).value.expect("the spec parses");
    let base = std::env::temp_dir().join(format!("hanse-exec-off-{}", std::process::id()));
    let ctx = TaskContext {
        alloc: AllocId(3),
        job: "off".into(),
        group: "g".into(),
        index: 0,
        dir: base.join("allocs/a000003/t"),
        logs: base.join("allocs/a000003/logs"),
        task: job.groups[0].tasks[0].clone(),
        rotation: Rotation::default(),
        fence: None,
    };
    match Drivers::only(None, &["mock".to_string()], Default::default()).exec.start(&ctx).await {
        Err(e) => assert!(e.to_string().contains("driver exec is not enabled"), "{e}"),
        Ok(_) => panic!("a disabled driver started a task"),
    }
    assert!(!base.exists(), "nothing was created");
}
