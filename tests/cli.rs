//! The `hanse` binary as an operator uses it: exit codes, messages, JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hanse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hanse"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run hanse")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn example_jobs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs");
    let mut jobs: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    jobs.sort();
    assert!(jobs.len() >= 4, "web, GPU training, edge inference and EU analytics examples");
    jobs
}

/// A job spec in a file of its own, removed when dropped.
struct TempSpec(PathBuf);

impl TempSpec {
    fn new(name: &str, body: &str) -> TempSpec {
        let path = std::env::temp_dir().join(format!("hanse-cli-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, body).unwrap();
        TempSpec(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempSpec {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn validate_prints_every_error_with_file_line_and_column() {
    let out = hanse(&["job", "validate", "examples/invalid/broken-job.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for (pos, what) in [
        ("4:8", "unknown job type `servce`"),
        ("8:9", "count -2 is negative"),
        ("14:1", "can never both hold"),
        ("20:12", "unknown operator `~=`"),
        ("27:29", "unknown field `memroy`"),
        ("27:53", "invalid disk `2 GB`"),
    ] {
        let line = format!("examples/invalid/broken-job.toml:{pos}: error: ");
        assert!(err.lines().any(|l| l.starts_with(&line) && l.contains(what)), "missing {line}{what} in\n{err}");
    }
    assert!(err.contains("hint: did you mean `memory`?"), "{err}");
    assert!(text(&out.stdout).contains("invalid: 6 errors"));
}

#[test]
fn validate_accepts_every_example_job() {
    let jobs = example_jobs();
    let mut args = vec!["job", "validate"];
    args.extend(jobs.iter().map(|p| p.to_str().unwrap()));
    let out = hanse(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).matches(": ok: job ").count(), jobs.len());
}

#[test]
fn validate_json_reports_positions_for_scripts() {
    let out = hanse(&["job", "validate", "--json", "examples/invalid/broken-job.toml", "examples/jobs/web.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v[0]["valid"], false);
    assert_eq!(v[0]["diagnostics"][0]["line"], 4);
    assert_eq!(v[0]["diagnostics"][0]["column"], 8);
    assert_eq!(v[0]["diagnostics"][0]["hint"], "did you mean `service`?");
    assert_eq!(v[1]["valid"], true);
}

#[test]
fn plan_places_every_example_on_the_example_fleet() {
    for job in example_jobs() {
        let out = hanse(&["job", "plan", job.to_str().unwrap(), "--nodes", "examples/fleets/eu-west.toml", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}: {}", job.display(), text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["placed"].as_u64().unwrap() > 0, "{}", job.display());
        assert_eq!(v["unplaced"], 0);
    }
}

#[test]
fn plan_explains_unplaceable_instances_and_exits_2() {
    let spec = TempSpec::new(
        "huge",
        "[job]\nname = \"huge\"\n[[group]]\nname = \"g\"\ncount = 3\n[[group.constraint]]\nattribute = \"${attr.arch}\"\nvalue = \"arm64\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\ncommand = \"/bin/true\"\nresources = { cpu = 1, memory = \"3GiB\" }\n",
    );
    let out = hanse(&["job", "plan", spec.path(), "--nodes", "examples/fleets/eu-west.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("unplaced: 3 instances of group g"), "{stdout}");
    assert!(stdout.contains("memory exhausted"), "arm64 edge nodes have 2 GiB: {stdout}");
    assert!(stdout.contains("constraint ${attr.arch} = arm64"), "{stdout}");
}

#[test]
fn plan_is_deterministic_for_a_seed() {
    let args =
        ["job", "plan", "examples/jobs/web.toml", "--nodes", "examples/fleets/eu-west.toml", "--json", "--seed", "7"];
    assert_eq!(hanse(&args).stdout, hanse(&args).stdout);
}

#[test]
fn unreadable_and_invalid_inputs_exit_1_with_a_message() {
    let out = hanse(&["job", "plan", "no/such/job.toml", "--nodes", "examples/fleets/eu-west.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read no/such/job.toml"), "{}", text(&out.stderr));
    let out = hanse(&["job", "plan", "examples/invalid/broken-job.toml", "--nodes", "examples/fleets/eu-west.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("broken-job.toml:4:8"), "{}", text(&out.stderr));
}

#[test]
fn shell_completion_scripts_know_every_command() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef hanse"), ("fish", "complete -c hanse")] {
        let out = hanse(&["completion", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: no `{marker}` in {script:.300}");
        for word in ["scale", "drain", "logs", "snapshot"] {
            assert!(script.contains(word), "{shell}: `{word}` is not completed");
        }
    }
    let out = hanse(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("possible values"), "{}", text(&out.stderr));
}

/// The README's "Job specs in brief" is a spec `job validate` accepts, as
/// a reader would copy it.
#[test]
fn the_readmes_spec_in_brief_validates() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("## Job specs in brief").nth(1).expect("the section");
    let block = section.split("```toml\n").nth(1).and_then(|b| b.split("\n```").next()).expect("its toml block");
    let spec = TempSpec::new("brief", block);
    let out = hanse(&["job", "validate", spec.path()]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("ok: job web"), "{}", text(&out.stdout));
}
