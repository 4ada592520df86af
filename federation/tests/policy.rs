//! Policy files: the examples check; every class of mistake is reported at
//! its line and column; rules that can never matter are warned about; a
//! job narrows the policy and never widens it.

use cluster_core::diag::{Severity, SourceFile};
use cluster_core::spec::parse_job;
use federation::policy::{Overflow, Trigger, parse_policy};

fn example(path: &str) -> SourceFile {
    let full = format!("{}/../examples/{path}", env!("CARGO_MANIFEST_DIR"));
    SourceFile::new(path, std::fs::read_to_string(full).unwrap())
}

/// (line, column, message) of every diagnostic of `severity`.
fn found(file: &SourceFile, severity: Severity) -> Vec<(usize, usize, String)> {
    let checked = parse_policy(file);
    file.records(&checked.diagnostics)
        .into_iter()
        .filter(|r| r.severity == severity)
        .map(|r| (r.line, r.column, r.message))
        .collect()
}

#[test]
fn the_example_policies_check_clean() {
    for name in ["eu-west", "us-east", "edge-1"] {
        let file = example(&format!("policies/{name}.toml"));
        let checked = parse_policy(&file);
        assert!(checked.diagnostics.is_empty(), "{name}: {}", file.render(&checked.diagnostics));
        let p = checked.value.unwrap();
        assert_eq!(p.cluster, name);
    }
    let p = parse_policy(&example("policies/eu-west.toml")).value.unwrap();
    assert!(p.may_delegate_to("eu-central") && p.may_delegate_to("us-east") && !p.may_delegate_to("edge-1"));
    assert!(p.accepts_from("edge-1") && !p.accepts_from("us-east"));
    assert_eq!(p.overflow.triggers, vec![Trigger::Unplaceable, Trigger::QueueWait(30_000)]);
    assert_eq!(p.retry.grace_ms, 10_000);
}

#[test]
fn every_mistake_is_located() {
    let file = example("invalid/broken-policy.toml");
    let errors = found(&file, Severity::Error);
    let expect = [
        (9, 1, "unknown field `acept_from`"),
        (12, 11, "listed twice"),
        (15, 24, "unknown overflow measure `utilisation`"),
        (16, 20, "is not a share"),
    ];
    for (line, col, words) in expect {
        assert!(
            errors.iter().any(|(l, c, m)| (*l, *c) == (line, col) && m.contains(words)),
            "expected {line}:{col} {words} in {errors:#?}"
        );
    }
    // A rule shadowed by an earlier one is an error too.
    assert!(errors.iter().any(|(l, _, m)| *l == 22 && m.contains("changes nothing")), "{errors:#?}");
    assert_eq!(errors.len(), expect.len() + 1, "{errors:#?}");
    let hints = parse_policy(&file).diagnostics;
    assert!(hints.iter().any(|d| d.hint.as_deref() == Some("did you mean `accept_from`?")));
}

#[test]
fn rules_that_cannot_matter_are_warned_about() {
    let text = r#"
[cluster]
name = "edge-1"
jurisdictions = ["eu"]

[[peer]]
cluster = "eu-west"

[overflow]
max_remote_share = 0.2

[[rule]]
match = { data = "us-only" }
jurisdictions = ["us"]
"#;
    let file = SourceFile::new("p.toml", text);
    let warnings = found(&file, Severity::Warning);
    let has = |line: usize, words: &str| warnings.iter().any(|(l, _, m)| *l == line && m.contains(words));
    assert!(has(6, "neither delegated to nor accepted from"), "{warnings:#?}");
    assert!(has(9, "[overflow] never applies"), "{warnings:#?}");
    assert!(has(12, "can never run"), "{warnings:#?}");
    assert!(found(&file, Severity::Error).is_empty());
}

#[test]
fn a_grace_shorter_than_a_deposed_leaders_window_is_warned_about() {
    let text = |grace: &str| {
        format!(
            "[cluster]\nname = \"eu-west\"\njurisdictions = [\"eu\"]\n\n[retry]\nlease = \"30s\"\ngrace = \"{grace}\"\n"
        )
    };
    let short = SourceFile::new("p.toml", text("1s"));
    let warnings = found(&short, Severity::Warning);
    assert!(warnings.iter().any(|(l, _, m)| *l == 5 && m.contains("under 2 s")), "{warnings:#?}");
    assert!(found(&short, Severity::Error).is_empty(), "a warning, not an error");
    let enough = SourceFile::new("p.toml", text("2s"));
    assert!(found(&enough, Severity::Warning).iter().all(|(_, _, m)| !m.contains("grace")));
}

#[test]
fn a_job_narrows_the_policy_and_never_widens_it() {
    let p = parse_policy(&example("policies/eu-west.toml")).value.unwrap();
    let job = |federation: &str, labels: &str| {
        let text = format!(
            "[job]\nname = \"j\"\nlabels = {{ {labels} }}\n{federation}\n[[group]]\nname = \"g\"\ncount = 1\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nresources = {{ cpu = 1, memory = \"1GiB\" }}\n"
        );
        parse_job(&SourceFile::new("j.toml", text)).value.expect("the job checks")
    };
    let plain = job("", "team = \"web\"");
    assert_eq!(p.remote_share(&plain), 0.5);
    assert_eq!(p.allowed_jurisdictions(&plain), None, "no rule matches: anywhere");
    let narrow = job("[job.federation]\nmax_remote_share = 0.2\nmax_cost_per_cpu_hour = 0.05", "team = \"web\"");
    assert_eq!(p.remote_share(&narrow), 0.2);
    assert_eq!(p.cost_ceiling(&narrow), Some(0.05));
    let wide = job("[job.federation]\nmax_remote_share = 0.9\nmax_cost_per_cpu_hour = 0.5", "team = \"web\"");
    assert_eq!(p.remote_share(&wide), 0.5, "a job cannot widen the policy's share");
    assert_eq!(p.cost_ceiling(&wide), Some(0.08), "nor its cost ceiling");
    let never = job("[job.federation]\ndelegate = \"never\"", "team = \"web\"");
    assert_eq!(p.remote_share(&never), 0.0);
    let pii = job("", "data = \"eu-pii\"");
    assert_eq!(p.allowed_jurisdictions(&pii).unwrap().into_iter().collect::<Vec<_>>(), vec!["eu".to_string()]);
}

#[test]
fn each_overflow_trigger_fires_on_its_own_measure() {
    let o = |triggers: Vec<Trigger>| Overflow { triggers, max_remote_share: 1.0, max_cost_per_cpu_hour: None };
    assert!(o(vec![Trigger::Unplaceable]).fires(0, 0.0));
    let busy = o(vec![Trigger::Utilization(0.8)]);
    assert!(!busy.fires(u64::MAX, 0.8), "not above 0.8");
    assert!(busy.fires(0, 0.81));
    let wait = o(vec![Trigger::QueueWait(30_000)]);
    assert!(!wait.fires(29_999, 1.0));
    assert!(wait.fires(30_000, 0.0));
    assert!(o(vec![Trigger::Utilization(0.8), Trigger::QueueWait(30_000)]).fires(30_000, 0.1), "any trigger");
    assert!(!o(Vec::new()).fires(u64::MAX, 1.0), "no trigger, no overflow");
}
