//! Finding and executing a task's program, in the child between fork and
//! exec, and saying what went wrong when the kernel refuses it.
//!
//! The C library's `execvp`, which `std::process::Command` calls, hands
//! a file the kernel cannot run (`ENOEXEC`) to `/bin/sh`: a binary built
//! for another machine then fails as `Syntax error: "(" unexpected`, and
//! is restarted as if it had run. Here the child searches the task's
//! `PATH` itself and calls `execve(2)` on each candidate, so nothing but
//! the kernel decides what runs: an `ENOEXEC` comes back to the agent as
//! an error it reports as such ("not a program for this machine"), and the
//! task is not started again. A script is run only through its `#!` line;
//! one without is refused, as Nomad's exec driver does.
//!
//! Everything the child needs is prepared before the fork ([`Launch::new`]);
//! [`Launch::exec`] only calls `execve`, which is async-signal-safe.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A prepared `execve`: the paths to try in order, and the argument and
/// environment arrays, NUL-terminated, pointing into the strings kept here.
pub struct Launch {
    /// Absolute candidates, in `PATH` order.
    paths: Vec<CString>,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the CStrings this value owns, whose heap
// buffers never move; the value is only read, and only in the child.
unsafe impl Send for Launch {}
// SAFETY: as above: nothing mutates it after construction.
unsafe impl Sync for Launch {}

impl Launch {
    /// Prepares running `command` with `args` and exactly `env`, from
    /// `dir` (the task's directory: relative commands and relative `PATH`
    /// entries are resolved against it). `None` when a string holds a NUL
    /// byte, which no exec can pass.
    pub fn new(command: &str, args: &[String], env: &[(String, String)], dir: &Path) -> Option<Launch> {
        let path_var = env.iter().rev().find(|(k, _)| k == "PATH").map_or("", |(_, v)| v.as_str());
        let paths = candidates(command, path_var, dir)
            .into_iter()
            .map(|p| CString::new(p.into_os_string().into_encoded_bytes()).ok())
            .collect::<Option<Vec<_>>>()?;
        let argv = std::iter::once(command)
            .chain(args.iter().map(String::as_str))
            .map(|a| CString::new(a).ok())
            .collect::<Option<Vec<_>>>()?;
        let envp = env.iter().map(|(k, v)| CString::new(format!("{k}={v}")).ok()).collect::<Option<Vec<_>>>()?;
        let ptrs = |v: &[CString]| v.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        Some(Launch { argv_ptrs: ptrs(&argv), envp_ptrs: ptrs(&envp), paths, _argv: argv, _envp: envp })
    }

    /// Everything the task's process does between fork and exec, for the
    /// agent's own children and a supervisor's task alike: a session of
    /// its own (its process group is its pid, it joins no group of its
    /// parent's, and it has no controlling terminal to type into); into
    /// its cgroup (`cgroup_procs`) while still root; the task's user
    /// (`ids`: uid, gid, groups), whose failure fails the start so that
    /// nothing runs as root; a death signal if `parent` dies, exiting if it
    /// already has; then [`Launch::exec`]. Returns only on failure.
    ///
    /// # Safety
    /// Only in the child between fork and exec (`pre_exec`): it makes only
    /// async-signal-safe calls, on memory prepared before the fork.
    pub unsafe fn become_task(
        &self,
        cgroup_procs: Option<&std::ffi::CStr>,
        ids: Option<&(u32, u32, Vec<u32>)>,
        parent: i32,
    ) -> std::io::Error {
        // SAFETY: the caller is the child between fork and exec; every
        // call is async-signal-safe.
        unsafe {
            libc::setsid();
            if let Some(p) = cgroup_procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            if let Some((uid, gid, groups)) = ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return std::io::Error::last_os_error();
                }
            }
            // After the switch: changing credentials clears it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(127);
            }
        }
        // As the task's user: what it may not run, it does not run.
        std::io::Error::from_raw_os_error(self.exec())
    }

    /// Tries each candidate as `execvp` does, but never through a shell:
    /// a missing one (`ENOENT`, `ENOTDIR`) or one not permitted (`EACCES`)
    /// moves on to the next; any other refusal ends the search. Returns
    /// only on failure, with the errno to report (`EACCES` if some
    /// candidate was refused so, else `ENOENT`). Async-signal-safe.
    pub fn exec(&self) -> i32 {
        let mut denied = false;
        for path in &self.paths {
            // SAFETY: every pointer is a NUL-terminated string owned by
            // `self`, and both arrays end in a null pointer.
            unsafe { libc::execve(path.as_ptr(), self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr()) };
            match std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::ENOENT) {
                // Not here (or a stale mount on the way, as glibc's
                // execvp also passes over): the next entry.
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                libc::EACCES => denied = true,
                e => return e,
            }
        }
        if denied { libc::EACCES } else { libc::ENOENT }
    }
}

/// Where `command` is looked for: itself when it names a path (relative
/// to `dir` unless absolute), else each `PATH` entry (an empty or relative
/// entry counts from `dir`, as the shell counts from the working
/// directory).
pub fn candidates(command: &str, path_var: &str, dir: &Path) -> Vec<PathBuf> {
    if command.is_empty() {
        return Vec::new();
    }
    if command.contains('/') {
        return vec![dir.join(command)];
    }
    path_var.split(':').map(|entry| dir.join(entry).join(command)).collect()
}

/// Where a command that was not found was looked for, for the message:
/// "in the task's directory /d" or "in PATH (/usr/bin:/bin)".
pub fn looked_in(command: &str, path_var: &str, dir: &Path) -> String {
    if command.starts_with('/') {
        String::new()
    } else if command.contains('/') {
        format!(" in the task's directory {} (relative commands start there)", dir.display())
    } else {
        format!(" in PATH ({path_var})")
    }
}

/// Why the kernel would not run the file at `path` (`ENOEXEC`), from its
/// first bytes: a program for another machine, an empty file, a script
/// without `#!`. Says nothing unless what it opened (never blocking on a
/// FIFO, checked on the descriptor, not the name) is a regular file
/// `may_read` allows: the task's user could run it, but perhaps not read
/// it, and the agent tells no more than that user could learn.
pub fn why_not_a_program(path: &Path, may_read: impl Fn(&std::fs::Metadata) -> bool) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    let Ok(mut file) = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) else {
        return String::new();
    };
    let Ok(meta) = file.metadata() else { return String::new() };
    if !meta.is_file() || !may_read(&meta) {
        return String::new();
    }
    if meta.len() == 0 {
        return ": it is an empty file".into();
    }
    let mut head = [0u8; 20];
    let n = file.read(&mut head).unwrap_or(0);
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") && n >= 20 {
        let machine = if head[5] == 2 {
            u16::from_be_bytes([head[18], head[19]])
        } else {
            u16::from_le_bytes([head[18], head[19]])
        };
        return format!(": it is a program for {}, and this node is {}", machine_name(machine), this_machine());
    }
    if head.starts_with(b"#!") {
        return ": the interpreter its `#!` line names cannot be run here".into();
    }
    ": it is not a program; a script needs a `#!` line (such as `#!/bin/sh`) to say what runs it".into()
}

/// An ELF `e_machine`'s usual name.
fn machine_name(machine: u16) -> String {
    match machine {
        3 => "i386".into(),
        8 => "mips".into(),
        20 => "ppc".into(),
        21 => "ppc64".into(),
        22 => "s390x".into(),
        40 => "arm".into(),
        62 => "x86_64".into(),
        183 => "aarch64".into(),
        243 => "riscv".into(),
        258 => "loongarch".into(),
        m => format!("machine type {m}"),
    }
}

/// This machine's name as `uname -m` says it.
fn this_machine() -> String {
    // SAFETY: an all-zero utsname is a valid out-parameter for uname(2).
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes only into `u`.
    if unsafe { libc::uname(&mut u) } != 0 {
        return std::env::consts::ARCH.into();
    }
    let bytes: Vec<u8> = u.machine.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    OsStr::from_bytes(&bytes).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_path_and_the_task_directory() {
        let dir = Path::new("/d/task");
        assert_eq!(candidates("/bin/true", "/usr/bin", dir), vec![PathBuf::from("/bin/true")]);
        assert_eq!(candidates("./run.sh", "/usr/bin", dir), vec![PathBuf::from("/d/task/./run.sh")]);
        assert_eq!(
            candidates("ls", "/usr/bin::bin", dir),
            vec![PathBuf::from("/usr/bin/ls"), PathBuf::from("/d/task/ls"), PathBuf::from("/d/task/bin/ls")]
        );
        assert_eq!(looked_in("ls", "/usr/bin", dir), " in PATH (/usr/bin)");
        assert!(looked_in("./run.sh", "", dir).contains("/d/task"));
        assert_eq!(looked_in("/x", "", dir), "");
    }

    #[test]
    fn a_nul_byte_cannot_be_passed() {
        assert!(Launch::new("a\0b", &[], &[], Path::new("/")).is_none());
        assert!(Launch::new("true", &["x\0".into()], &[], Path::new("/")).is_none());
        assert!(Launch::new("true", &[], &[("PATH".into(), "/bin".into())], Path::new("/")).is_some());
    }

    #[test]
    fn files_the_kernel_refuses_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("hanse-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let all = |_: &std::fs::Metadata| true;
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18..20].copy_from_slice(&183u16.to_le_bytes());
        std::fs::write(dir.join("arm"), &elf).unwrap();
        std::fs::write(dir.join("empty"), b"").unwrap();
        std::fs::write(dir.join("script"), b"echo hi\n").unwrap();
        assert!(why_not_a_program(&dir.join("arm"), all).contains("a program for aarch64"));
        assert_eq!(why_not_a_program(&dir.join("empty"), all), ": it is an empty file");
        assert!(why_not_a_program(&dir.join("script"), all).contains("`#!` line"));
        assert_eq!(why_not_a_program(&dir.join("script"), |_| false), "", "unreadable: nothing said");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
