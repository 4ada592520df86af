//! Every class of job spec error, each reported with its line and column.

use cluster_core::diag::{Severity, SourceFile};
use cluster_core::model::{JobType, Objective, Operator, Target};
use cluster_core::spec::parse_job;

const TASK: &str = "[[group.task]]\nname = \"t\"\ndriver = \"exec\"\ncommand = \"/bin/true\"\n";

/// Errors as (line, column, message), in file order.
fn errors(text: &str) -> Vec<(usize, usize, String, Option<String>)> {
    let file = SourceFile::new("job.toml", text);
    let checked = parse_job(&file);
    assert!(checked.value.is_none() || checked.diagnostics.iter().all(|d| d.severity != Severity::Error));
    checked
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| {
            let (l, c) = file.position(d.span.start);
            (l, c, d.message.clone(), d.hint.clone())
        })
        .collect()
}

fn has(errs: &[(usize, usize, String, Option<String>)], line: usize, col: usize, needle: &str) -> bool {
    errs.iter().any(|(l, c, m, h)| {
        *l == line && *c == col && (m.contains(needle) || h.as_deref().is_some_and(|h| h.contains(needle)))
    })
}

#[test]
fn a_valid_spec_parses_with_defaults() {
    let text = format!("[job]\nname = \"web\"\n\n[[group]]\nname = \"g\"\ncount = 3\n\n{TASK}");
    let checked = parse_job(&SourceFile::new("job.toml", text));
    let job = checked.value.expect("valid");
    assert_eq!(job.job_type, JobType::Service);
    assert_eq!(job.objective, Objective::Latency, "service jobs default to the latency objective");
    assert_eq!(job.groups[0].count, 3);
    assert_eq!(job.groups[0].resources().cpu_millis, 100, "default cpu");
}

#[test]
fn unknown_field_names_the_closest_valid_one() {
    let text = format!("[job]\nname = \"web\"\nprioirty = 5\n\n[[group]]\nname = \"g\"\ncoutn = 2\n{TASK}");
    let errs = errors(&text);
    assert!(has(&errs, 3, 1, "did you mean `priority`?"), "{errs:?}");
    assert!(has(&errs, 7, 1, "did you mean `count`?"), "{errs:?}");
}

#[test]
fn negative_count_is_refused() {
    let errs = errors(&format!("[job]\nname = \"web\"\n[[group]]\nname = \"g\"\ncount = -1\n{TASK}"));
    assert!(has(&errs, 5, 9, "count -1 is negative"), "{errs:?}");
}

#[test]
fn size_with_a_space_or_without_a_unit_is_refused_with_a_hint() {
    let text = "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\ncommand = \"/bin/true\"\nresources = { memory = \"2 GB\", disk = 512 }\n";
    let errs = errors(text);
    assert!(has(&errs, 9, 24, "\"2GB\""), "{errs:?}");
    assert!(has(&errs, 9, 39, "disk needs a unit"), "{errs:?}");
}

#[test]
fn unknown_constraint_operator_suggests_one() {
    let text = format!(
        "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[[group.constraint]]\nattribute = \"${{attr.kernel}}\"\noperator = \"verison\"\nvalue = \"6\"\n{TASK}"
    );
    let errs = errors(&text);
    assert!(has(&errs, 7, 12, "did you mean `version`?"), "{errs:?}");
}

#[test]
fn contradictory_constraints_are_refused() {
    let c = |attr: &str, op: &str, v: &str| {
        format!("[[group.constraint]]\nattribute = \"{attr}\"\noperator = \"{op}\"\nvalue = \"{v}\"\n")
    };
    let head = "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n";
    let cases = [
        (c("${attr.arch}", "=", "x86_64") + &c("${attr.arch}", "=", "arm64"), true),
        (c("${attr.arch}", "=", "x86_64") + &c("${attr.arch}", "!=", "x86_64"), true),
        (c("${attr.cores}", ">", "8") + &c("${attr.cores}", "<", "4"), true),
        (c("${attr.kernel}", "=", "5.10") + &c("${attr.kernel}", "version", ">= 6"), true),
        (c("${attr.cores}", ">", "4") + &c("${attr.cores}", "<", "8"), false),
        (c("${attr.arch}", "=", "x86_64") + &c("${attr.os}", "=", "linux"), false),
    ];
    for (constraints, contradictory) in cases {
        let errs = errors(&format!("{head}{constraints}{TASK}"));
        let found = errs.iter().any(|(l, c, m, _)| *l == 9 && *c == 1 && m.contains("can never both hold"));
        assert_eq!(found, contradictory, "{constraints}\n{errs:?}");
    }
    let job_and_group = format!(
        "[job]\nname = \"web\"\n[[job.constraint]]\nattribute = \"${{node.environment}}\"\nvalue = \"edge\"\n[[group]]\nname = \"g\"\n[[group.constraint]]\nattribute = \"${{node.environment}}\"\nvalue = \"cloud\"\n{TASK}"
    );
    assert!(has(&errors(&job_and_group), 8, 1, "can never both hold"), "a group constraint may contradict the job's");
}

#[test]
fn unknown_attribute_scope_and_node_field_get_hints() {
    let text = format!(
        "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[[group.affinity]]\nattribute = \"${{node.enviroment}}\"\nvalue = \"edge\"\nweight = 10\n[[group.spread]]\nattribute = \"${{atr.zone}}\"\n{TASK}"
    );
    let errs = errors(&text);
    assert!(has(&errs, 6, 13, "${node.environment}"), "{errs:?}");
    assert!(has(&errs, 10, 13, "${attr.zone}"), "{errs:?}");
}

#[test]
fn wrong_types_and_ranges() {
    let text = format!(
        "[job]\nname = \"web\"\npriority = \"high\"\n[[group]]\nname = \"g\"\ncount = \"3\"\n[[group.affinity]]\nattribute = \"${{attr.arch}}\"\nvalue = \"arm64\"\nweight = 500\n{TASK}"
    );
    let errs = errors(&text);
    assert!(has(&errs, 3, 12, "must be an integer, not string"), "{errs:?}");
    assert!(has(&errs, 6, 9, "must be an integer"), "{errs:?}");
    assert!(has(&errs, 10, 10, "out of range"), "{errs:?}");
}

#[test]
fn missing_required_fields_point_at_their_table() {
    let text = "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\n";
    let errs = errors(text);
    assert!(has(&errs, 5, 1, "missing `command`"), "{errs:?}");
    let no_job = errors("[[group]]\nname = \"g\"\n");
    assert!(no_job.iter().any(|(_, _, m, _)| m.contains("missing [job]")), "{no_job:?}");
}

#[test]
fn duplicate_names_and_spread_over_100_percent() {
    let text = format!(
        "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[[group.spread]]\nattribute = \"${{node.zone}}\"\ntargets = [{{ value = \"a\", percent = 70 }}, {{ value = \"b\", percent = 40 }}]\n{TASK}[[group]]\nname = \"g\"\n{TASK}"
    );
    let errs = errors(&text);
    assert!(errs.iter().any(|(_, _, m, _)| m.contains("duplicate group name `g`")), "{errs:?}");
    assert!(errs.iter().any(|(_, _, m, _)| m.contains("add up to 110")), "{errs:?}");
}

#[test]
fn every_problem_is_reported_not_the_first() {
    let text = "[job]\nname = \"web\"\ntype = \"servce\"\n[[group]]\nname = \"g\"\ncount = -2\n[[group.task]]\nname = \"t\"\ndriver = \"exce\"\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(has(&errs, 3, 8, "did you mean `service`?"));
    assert!(has(&errs, 6, 9, "negative"));
    assert!(has(&errs, 9, 10, "did you mean `exec`?"));
}

#[test]
fn toml_syntax_errors_have_positions() {
    let errs = errors("[job]\nname = \"web\nx = 1\n");
    assert!(!errs.is_empty());
    assert!(errs.iter().all(|(_, _, m, _)| m.starts_with("invalid TOML")), "{errs:?}");
    assert_eq!(errs[0].0, 2, "{errs:?}");
}

#[test]
fn oversized_specs_are_refused_before_parsing() {
    let text = format!("[job]\nname = \"web\"\n# {}\n", "x".repeat(1 << 20));
    let errs = errors(&text);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].2.contains("the limit is 1048576"), "{errs:?}");
}

#[test]
fn invalid_regexp_and_version_range_are_reported() {
    let c = |op: &str, v: &str| {
        format!("[[group.constraint]]\nattribute = \"${{attr.x}}\"\noperator = \"{op}\"\nvalue = \"{v}\"\n")
    };
    let text = format!(
        "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n{}{}{TASK}",
        c("regexp", "(unclosed"),
        c("version", "~~1")
    );
    let errs = errors(&text);
    assert!(has(&errs, 5, 1, "invalid regular expression"), "{errs:?}");
    assert!(has(&errs, 9, 1, "invalid version range"), "{errs:?}");
}

#[test]
fn constraints_parse_into_typed_predicates() {
    let text = format!(
        "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[[group.constraint]]\nattribute = \"${{node.datasets}}\"\noperator = \"set_contains\"\nvalue = \"a,b\"\n[[group.constraint]]\noperator = \"distinct_hosts\"\n{TASK}"
    );
    let job = parse_job(&SourceFile::new("j.toml", text)).value.expect("valid");
    let g = &job.groups[0];
    assert!(g.distinct_hosts, "distinct_hosts as a constraint operator sets the group flag");
    assert_eq!(g.constraints.len(), 1);
    assert_eq!(g.constraints[0].target, Target::Datasets);
    assert_eq!(g.constraints[0].op, Operator::SetContains);
}

#[test]
fn restart_disconnect_and_kill_timeout_are_read_and_checked() {
    let text = "[job]\nname = \"edge\"\n\n[[group]]\nname = \"g\"\non_disconnect = \"stop\"\nrestart = { attempts = 5, delay = \"250ms\", mode = \"delay\" }\n\n[[group.task]]\nname = \"t\"\ndriver = \"exec\"\ncommand = \"/bin/true\"\nkill_timeout = \"30s\"\n";
    let job = parse_job(&SourceFile::new("job.toml", text)).value.expect("valid");
    let g = &job.groups[0];
    assert_eq!(g.on_disconnect, cluster_core::model::job::OnDisconnect::Stop);
    assert_eq!((g.restart.attempts, g.restart.delay_ms), (5, 250));
    assert_eq!(g.restart.mode, cluster_core::model::job::RestartMode::Delay);
    assert_eq!(g.tasks[0].kill_timeout_ms, 30_000);

    let defaults = format!("[job]\nname = \"web\"\n\n[[group]]\nname = \"g\"\n\n{TASK}");
    let job = parse_job(&SourceFile::new("job.toml", defaults)).value.expect("valid");
    assert_eq!(job.groups[0].on_disconnect, cluster_core::model::job::OnDisconnect::Keep);
    assert_eq!(job.groups[0].restart.attempts, 2);
    assert_eq!(job.groups[0].tasks[0].kill_timeout_ms, 5_000);

    let bad = format!(
        "[job]\nname = \"x\"\n\n[[group]]\nname = \"g\"\non_disconnect = \"pause\"\nrestart = {{ attempts = -1, mode = \"fial\" }}\n\n{TASK}kill_timeout = \"soon\"\n"
    );
    let errs = errors(&bad);
    assert!(has(&errs, 6, 17, "keep"), "{errs:?}");
    assert!(has(&errs, 7, 24, "attempts = -1"), "{errs:?}");
    assert!(has(&errs, 7, 35, "fail"), "{errs:?}");
    assert!(has(&errs, 13, 16, "kill_timeout"), "{errs:?}");
}

#[test]
fn prefer_remote_is_a_delegation_mode_without_a_warning() {
    let text = format!(
        "[job]\nname = \"web\"\n[job.federation]\ndelegate = \"prefer-remote\"\n\n[[group]]\nname = \"g\"\n{TASK}"
    );
    let checked = parse_job(&SourceFile::new("job.toml", text));
    let job = checked.value.expect("valid");
    assert_eq!(job.federation.delegate, cluster_core::model::DelegateMode::PreferRemote);
    assert!(checked.diagnostics.is_empty(), "{:?}", checked.diagnostics);
}

#[test]
fn an_update_block_and_checks_parse_with_their_defaults() {
    use cluster_core::model::job::{CheckKind, UpdateStrategy};
    let text = format!(
        "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[group.update]\nmax_parallel = 3\ncanary = 1\nauto_revert = true\n\
         min_healthy_time = \"5s\"\n{TASK}[[group.task.check]]\nname = \"up\"\ntype = \"http\"\nport = 8080\npath = \"/ready\"\n\
         interval = \"2s\"\n[[group.task.check]]\nname = \"alive\"\ntype = \"tcp\"\nport = 8080\n\
         [[group.task.check]]\nname = \"sane\"\ntype = \"script\"\ncommand = \"/bin/true\"\n"
    );
    let checked = parse_job(&SourceFile::new("job.toml", text));
    let job = checked.value.unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    let update = job.groups[0].update.expect("an update block");
    let want = UpdateStrategy {
        max_parallel: 3,
        canary: 1,
        auto_revert: true,
        min_healthy_time_ms: 5_000,
        ..Default::default()
    };
    assert_eq!(update, want);
    assert_eq!(update.healthy_deadline_ms, 300_000, "Nomad's default deadline");
    let checks = &job.groups[0].tasks[0].checks;
    assert_eq!(checks[0].kind, CheckKind::Http { port: 8080, path: "/ready".into() });
    assert_eq!((checks[0].interval_ms, checks[0].timeout_ms), (2_000, 2_000));
    assert_eq!(checks[1].kind, CheckKind::Tcp { port: 8080 });
    assert_eq!(checks[2].kind, CheckKind::Script { command: "/bin/true".into(), args: vec![] });
}

#[test]
fn update_blocks_and_checks_that_cannot_work_are_refused_where_they_are_written() {
    let group = "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n";
    let errs = errors(&format!("{group}[group.update]\nmax_parallel = 0\n{TASK}"));
    assert!(has(&errs, 6, 16, "replace at least 1 instance"), "{errs:?}");
    let errs = errors(&format!("{group}[group.update]\nmin_healthy_time = \"1m\"\nhealthy_deadline = \"30s\"\n{TASK}"));
    assert!(has(&errs, 5, 1, "no instance could ever be healthy"), "{errs:?}");
    let errs = errors(&format!("{group}on_disconnect = \"stop\"\n[group.update]\ncanary = 1\n{TASK}"));
    assert!(has(&errs, 3, 1, "canaries run beside the old version"), "{errs:?}");
    let check = |body: &str| errors(&format!("{group}{TASK}[[group.task.check]]\nname = \"c\"\n{body}"));
    let errs = check("type = \"tcp\"\n");
    assert!(errs.iter().any(|(l, _, m, _)| *l == 9 && m.contains("port")), "{errs:?}");
    let errs = check("type = \"icmp\"\nport = 1\n");
    assert!(has(&errs, 11, 8, "tcp"), "{errs:?}");
    let errs = check("type = \"tcp\"\nport = 70000\n");
    assert!(has(&errs, 12, 8, "1 to 65535"), "{errs:?}");
    let errs = check("type = \"http\"\nport = 80\npath = \"no-slash\"\n");
    assert!(has(&errs, 13, 8, "starts with `/`"), "{errs:?}");
    let errs = check("type = \"tcp\"\nport = 80\ninterval = \"10ms\"\n");
    assert!(has(&errs, 13, 12, "out of range"), "{errs:?}");
    let mock = "[[group.task]]\nname = \"t\"\ndriver = \"mock\"\n";
    let errs = errors(&format!(
        "{group}{mock}[[group.task.check]]\nname = \"c\"\ntype = \"script\"\ncommand = \"/bin/true\"\n"
    ));
    assert!(has(&errs, 8, 1, "a script check needs an exec task"), "{errs:?}");
}

#[test]
fn a_reschedule_block_parses_over_the_job_types_defaults() {
    use cluster_core::model::JobType;
    use cluster_core::model::job::{DelayFunction, ReschedulePolicy};
    let parse = |kind: &str, block: &str| {
        let text = format!("[job]\nname = \"web\"\ntype = \"{kind}\"\n[[group]]\nname = \"g\"\n{block}{TASK}");
        let checked = parse_job(&SourceFile::new("job.toml", text));
        checked.value.unwrap_or_else(|| panic!("{:?}", checked.diagnostics)).groups[0].reschedule
    };
    // Nomad's defaults: services forever, 30 s doubling to 1 h; batch once a day after 5 s.
    let service = parse("service", "");
    assert_eq!(service, ReschedulePolicy::for_type(JobType::Service));
    assert!(service.unlimited && service.delay_ms == 30_000 && service.max_delay_ms == 3_600_000);
    assert_eq!(service.delay_function, DelayFunction::Exponential);
    let batch = parse("batch", "");
    assert_eq!((batch.attempts, batch.interval_ms, batch.delay_ms, batch.unlimited), (1, 86_400_000, 5_000, false));
    assert_eq!(batch.delay_function, DelayFunction::Constant);
    // A limit written without `unlimited` is a limit, even on a service.
    let limited = parse("service", "[group.reschedule]\nattempts = 3\ninterval = \"30m\"\n");
    assert_eq!((limited.attempts, limited.interval_ms, limited.unlimited), (3, 1_800_000, false));
    assert_eq!(limited.delay_ms, 30_000, "the rest stays the service default");
    let all = parse(
        "batch",
        "[group.reschedule]\ndelay = \"10s\"\ndelay_function = \"fibonacci\"\nmax_delay = \"2m\"\nunlimited = true\n",
    );
    assert_eq!((all.delay_ms, all.max_delay_ms, all.unlimited), (10_000, 120_000, true));
    assert_eq!(all.delay_function, DelayFunction::Fibonacci);
}

#[test]
fn reschedule_blocks_that_cannot_work_are_refused_where_they_are_written() {
    let group = "[job]\nname = \"web\"\n[[group]]\nname = \"g\"\n[group.reschedule]\n";
    let errs = errors(&format!("{group}delay_function = \"linear\"\n{TASK}"));
    assert!(has(&errs, 6, 18, "exponential"), "{errs:?}");
    let errs = errors(&format!("{group}attempts = -2\n{TASK}"));
    assert!(has(&errs, 6, 12, "attempts = -2"), "{errs:?}");
    let errs = errors(&format!("{group}delay = \"2m\"\nmax_delay = \"1m\"\n{TASK}"));
    assert!(has(&errs, 5, 1, "max_delay is shorter than delay"), "{errs:?}");
    let errs = errors(&format!("{group}unlimited = false\nattempts = 2\n{TASK}"));
    assert!(has(&errs, 5, 1, "attempts without an interval"), "{errs:?}");
    let errs = errors(&format!("{group}interval = \"0s\"\n{TASK}"));
    assert!(has(&errs, 6, 12, "out of range"), "{errs:?}");
}

#[test]
fn stagger_paces_a_system_job_and_canaries_there_are_warned_about() {
    let text = "[job]\nname = \"agentd\"\ntype = \"system\"\n[[group]]\nname = \"g\"\n[group.update]\nmax_parallel = 3\nstagger = \"45s\"\ncanary = 1\n";
    let checked = parse_job(&SourceFile::new("job.toml", format!("{text}{TASK}")));
    let update = checked.value.unwrap_or_else(|| panic!("{:?}", checked.diagnostics)).groups[0].update.unwrap();
    assert_eq!((update.max_parallel, update.stagger_ms), (3, 45_000));
    assert!(
        checked.diagnostics.iter().any(|d| d.message.contains("canary and auto_revert are for services")),
        "{:?}",
        checked.diagnostics
    );
    let errs = errors(&format!("{text}stagger = \"2h\"\n{TASK}").replace("stagger = \"45s\"\n", ""));
    assert!(has(&errs, 9, 11, "out of range"), "{errs:?}");
}
