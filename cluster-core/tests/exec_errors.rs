//! What the exec driver says when a task's program cannot run, and that
//! no shell ever runs a file the kernel refused (the C library's `execvp`
//! hands such a file to `/bin/sh`: a binary for another machine then
//! failed as `Syntax error: "(" unexpected` and was started 12 times).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_core::agent::driver::{Drivers, StartError, TaskContext};
use cluster_core::agent::logs::Rotation;
use cluster_core::diag::SourceFile;
use cluster_core::ids::AllocId;
use cluster_core::spec::parse_job;

/// A task running `command` with `extra` spec lines, in `base/allocs/…`.
fn ctx(base: &Path, n: u64, command: &str, extra: &str) -> TaskContext {
    let text = format!(
        "[job]\nname = \"x\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\n\
         command = \"{command}\"\n{extra}resources = {{ cpu = \"100m\", memory = \"16MiB\" }}\n"
    );
    let job = parse_job(&SourceFile::new("x.toml", text)).value.expect("the spec parses");
    let alloc = base.join(format!("allocs/a{n:06}"));
    TaskContext {
        alloc: AllocId(n),
        job: "x".into(),
        group: "g".into(),
        index: 0,
        task: job.groups[0].tasks[0].clone(),
        dir: alloc.join("t"),
        logs: alloc.join("logs"),
        rotation: Rotation::default(),
        fence: None,
    }
}

/// Starts the task; `Err` with the driver's message, or `Ok` with what it
/// wrote once it ended.
async fn start(c: &TaskContext) -> Result<String, StartError> {
    let mut run = Drivers::new(None).exec.start(c).await?;
    let exit = tokio::time::timeout(Duration::from_secs(10), run.wait()).await.expect("it ends");
    let out = std::fs::read_to_string(c.logs.join("t.stdout.0")).unwrap_or_default();
    let err = std::fs::read_to_string(c.logs.join("t.stderr.0")).unwrap_or_default();
    Ok(format!("{}|{out}|{err}", exit.describe()))
}

/// The message of a start refused as unrunnable: never restarted, never
/// placed again.
fn unrunnable(r: Result<String, StartError>) -> String {
    match r {
        Err(StartError::Unrunnable(m)) => m,
        other => panic!("not refused as unrunnable: {other:?}"),
    }
}

/// An ELF header for a machine that is not this one, executable. Its
/// machine number is one no emulator registers with binfmt_misc (a host
/// with qemu-user would run an aarch64 header through qemu).
fn foreign_binary(path: &PathBuf) -> &'static str {
    use std::os::unix::fs::PermissionsExt;
    let (machine, name) = (0x9999u16, "machine type 39321");
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1;
    elf[16] = 2; // an executable
    elf[18..20].copy_from_slice(&machine.to_le_bytes());
    std::fs::write(path, elf).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    name
}

fn executable(path: &PathBuf, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_file_the_kernel_cannot_run_is_refused_without_a_shell() {
    let base = std::env::temp_dir().join(format!("hanse-exec-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(base.join("bin")).unwrap();
    let bin = base.join("bin");

    let arch = foreign_binary(&bin.join("foreign"));
    let m = unrunnable(start(&ctx(&base, 1, bin.join("foreign").to_str().unwrap(), "")).await);
    assert!(m.contains("exec format error") && m.contains(&format!("a program for {arch}")), "{m}");
    assert!(!m.contains("Syntax error"), "{m}");

    executable(&bin.join("empty"), "");
    let m = unrunnable(start(&ctx(&base, 2, bin.join("empty").to_str().unwrap(), "")).await);
    assert!(m.contains("exec format error") && m.contains("empty file"), "{m}");

    // Decided: a script runs through its `#!` line only, never `sh` by default.
    executable(&bin.join("noshebang"), "echo ran > ran.txt\n");
    let c = ctx(&base, 3, bin.join("noshebang").to_str().unwrap(), "");
    let m = unrunnable(start(&c).await);
    assert!(m.contains("`#!` line"), "{m}");
    assert!(!c.dir.join("ran.txt").exists(), "no shell ran it");

    executable(&bin.join("shebang"), "#!/bin/sh\necho ran with $0\n");
    let out = start(&ctx(&base, 4, bin.join("shebang").to_str().unwrap(), "")).await.expect("it runs");
    assert!(out.starts_with("exited with code 0|ran with "), "{out}");

    // Found through the task's own PATH (a relative entry counts from
    // its directory), as the shell would.
    let env = format!("env = {{ PATH = \"/nonexistent:{}\" }}\n", bin.display());
    let out = start(&ctx(&base, 5, "shebang", &env)).await.expect("found in the task's PATH");
    assert!(out.contains("ran with"), "{out}");

    // There, but what it needs is not: said so, not "not found".
    executable(&bin.join("orphan"), "#!/no/such/interpreter\necho hi\n");
    let m = unrunnable(start(&ctx(&base, 10, bin.join("orphan").to_str().unwrap(), "")).await);
    assert!(m.contains("is there, but the interpreter"), "{m}");

    // Not found: where it was looked for.
    let m = unrunnable(start(&ctx(&base, 6, "./run.sh", "")).await);
    let task_dir = base.join("allocs/a000006/t");
    assert!(
        m.contains("`./run.sh` not found in the task's directory") && m.contains(task_dir.to_str().unwrap()),
        "{m}"
    );
    let m = unrunnable(start(&ctx(&base, 7, "no-such-program-here", &env)).await);
    assert!(m.contains(&format!("not found in PATH (/nonexistent:{})", bin.display())), "{m}");
    let m = unrunnable(start(&ctx(&base, 8, "/no/such/command", "")).await);
    assert_eq!(m, "command `/no/such/command` not found");

    // Found but not executable: permission denied, as before.
    std::fs::write(bin.join("plain"), "#!/bin/sh\n").unwrap();
    let m = unrunnable(start(&ctx(&base, 9, bin.join("plain").to_str().unwrap(), "")).await);
    assert!(m.contains("not executable"), "{m}");
    std::fs::remove_dir_all(&base).unwrap();
}
