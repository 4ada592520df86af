//! The delegation cores alone (pure: no socket, no clock): what a shell
//! cannot see from outside, the bounds a lease, a grace and a batch of
//! offers keep.

use cluster_core::command::Command;
use cluster_core::diag::SourceFile;
use cluster_core::model::Job;
use cluster_core::spec::parse_job;
use cluster_core::state::ClusterState;
use federation::local::nodes_in;
use federation::policy::{Policy, parse_policy};
use federation::proto::origin::{Origin, Overflowing};
use federation::proto::target::Target;
use federation::proto::{Action, Message, Outcome, Plants, Timing, ToOrigin, ToTarget};

fn policy(name: &str, peer: &str) -> Policy {
    let text = format!(
        "[cluster]\nname = \"{name}\"\njurisdictions = [\"eu\"]\n\n[[peer]]\ncluster = \"{peer}\"\ndelegate_to = true\naccept_from = true\n\n[inbound]\nmax_share_of_capacity = 1.0\n"
    );
    parse_policy(&SourceFile::new("p.toml", text)).value.unwrap()
}

fn job(name: &str, count: u32, extra: &str) -> Job {
    let text = format!(
        "[job]\nname = \"{name}\"\n[[group]]\nname = \"g\"\ncount = {count}\n{extra}\n[[group.task]]\nname = \"t\"\ndriver = \"mock\"\nkill_timeout = \"2s\"\nresources = {{ cpu = 1, memory = \"1GiB\" }}\n"
    );
    parse_job(&SourceFile::new("job.toml", text)).value.unwrap()
}

/// A state with `n` nodes of `cpu` cores, in the EU.
fn state(n: usize, cpu: u32) -> ClusterState {
    let mut s = ClusterState::new();
    for node in nodes_in("eu", "n", n, cpu) {
        s.apply(&Command::UpsertNode(node));
    }
    s
}

fn timing(lease_ms: u64, grace_ms: u64) -> Timing {
    Timing { lease_ms, grace_ms, renew_every_ms: 1_000, retry_ms: 500 }
}

fn offer(id: &str, job: Job, indices: Vec<u32>, grace_ms: u64) -> ToTarget {
    ToTarget::Offer { id: id.into(), job, indices, grace_ms }
}

/// The answers in `actions` (the target's replies, after their commits).
fn outcomes(actions: &[Action]) -> Vec<Outcome> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ProposeThenSend { reply: Message::ToOrigin(ToOrigin::Outcome { outcome, .. }), .. } => {
                Some(outcome.clone())
            }
            Action::Send { message: Message::ToOrigin(ToOrigin::Outcome { outcome, .. }), .. } => Some(outcome.clone()),
            _ => None,
        })
        .collect()
}

/// eu-west's state once it offered instances 1-3 of a 4-instance job to
/// eu-central under a 3 s lease and 1 s grace (the offer applied), its
/// policy, and the origin core that offered.
fn delegated() -> (ClusterState, Policy, Origin) {
    let mut s = state(1, 1);
    let p = policy("eu-west", "eu-central");
    let j = job("big", 4, "");
    s.apply(&Command::RegisterJob(j.clone()));
    let work = Overflowing { eval: 1, job: j, group: "g".into(), indices: vec![1, 2, 3] };
    let mut o = Origin::new("eu-west", timing(3_000, 1_000), Plants::default(), 0);
    for a in o.delegate(&p, &s, &work, "eu-central", 0) {
        if let Action::ProposeThenSend { command, .. } = a {
            s.apply(&command);
        }
    }
    (s, p, o)
}

#[test]
fn offers_decided_before_the_first_applies_share_the_room_instead_of_each_taking_it() {
    let s = state(1, 8);
    let p = policy("eu-central", "eu-west");
    let mut t = Target::new(timing(3_000, 2_000), Plants::default(), 1);
    let taken: Vec<Vec<u32>> = (0..2)
        .map(|n| {
            let m = offer(&format!("eu-west/j{n}/e1-g-0"), job(&format!("j{n}"), 6, ""), (0..6).collect(), 2_000);
            match outcomes(&t.on_message(&p, &s, "eu-west", m, 0)).as_slice() {
                [Outcome::Registered { indices }] => indices.clone(),
                [Outcome::Refused { .. }] => Vec::new(),
                other => panic!("{other:?}"),
            }
        })
        .collect();
    assert_eq!(taken[0].len(), 6);
    assert_eq!(taken[1].len(), 2, "8 cores: the second offer gets what the first left");
}

#[test]
fn at_most_once_work_must_stop_within_half_the_shorter_grace() {
    let s = state(2, 8);
    let p = policy("eu-central", "eu-west");
    let mut t = Target::new(timing(3_000, 10_000), Plants::default(), 1);
    let stop = job("s", 1, "on_disconnect = \"stop\"");
    // The target's own grace (10 s) allows a 2 s kill timeout; the
    // origin's (3 s) does not: the origin re-places after its own grace.
    let m = offer("eu-west/s/e1-g-0", stop.clone(), vec![0], 3_000);
    match outcomes(&t.on_message(&p, &s, "eu-west", m, 0)).as_slice() {
        [Outcome::Refused { message, .. }] => assert!(message.contains("1500 ms"), "{message}"),
        other => panic!("{other:?}"),
    }
    let m = offer("eu-west/s/e1-g-0-a2", stop, vec![0], 4_000);
    assert!(matches!(outcomes(&t.on_message(&p, &s, "eu-west", m, 0)).as_slice(), [Outcome::Registered { .. }]));
}

#[test]
fn a_renewal_is_never_answered_with_a_longer_lease_than_the_delegation_was_offered_under() {
    // Offered under a 3 s lease ...
    let (s, p, _) = delegated();
    // ... and renewed by a leader whose policy now says 30 s.
    let mut o = Origin::new("eu-west", timing(30_000, 1_000), Plants::default(), 10);
    let id = Origin::records(&s)[0].0.id.clone();
    let progress = federation::proto::wire::Progress { id, indices: Vec::new() };
    let renew = ToOrigin::Renew { session: 1, seq: 0, delegations: vec![progress] };
    let ack = o.on_message(&s, "eu-central", renew, 20).into_iter().find_map(|a| match a {
        Action::Send { message: Message::ToTarget(ToTarget::RenewAck { lease_ms, .. }), .. } => Some(lease_ms),
        _ => None,
    });
    assert_eq!(ack, Some(3_000));
    // A leader whose policy shortened the lease to 1 s (grace 0.5 s) still
    // waits the lease and grace the delegation was offered under.
    // (A fresh leader each time: a tick that resends the offer restarts
    // the wait.)
    let expired = |now| {
        let mut o = Origin::new("eu-west", timing(1_000, 500), Plants::default(), 100);
        o.tick(&p, &s, now).iter().any(|a| {
            matches!(a, Action::Propose(Command::Guarded { then, .. }) if matches!(then.as_slice(), [Command::Release { .. }]))
        })
    };
    assert!(!expired(100 + 3_999), "expired before the lease and grace it was offered under");
    assert!(expired(100 + 4_000));
}

/// An expiry, once decided, is final: a renewal that arrives while the
/// expiry's commit is in flight names the delegation untracked, so the
/// target never starts or keeps work the origin is placing again
/// (`hanse-sim`, seed 2805, with raft-rs in the loop).
#[test]
fn a_renewal_arriving_while_an_expiry_commits_does_not_extend_the_lease() {
    let (s, p, mut o) = delegated();
    let id = Origin::records(&s)[0].0.id.clone();
    let untracked_in_ack = |o: &mut Origin, now| {
        let progress = federation::proto::wire::Progress { id: id.clone(), indices: Vec::new() };
        let renew = ToOrigin::Renew { session: 1, seq: 0, delegations: vec![progress] };
        o.on_message(&s, "eu-central", renew, now).into_iter().find_map(|a| match a {
            Action::Send { message: Message::ToTarget(ToTarget::RenewAck { untracked, .. }), .. } => Some(untracked),
            _ => None,
        })
    };
    assert_eq!(untracked_in_ack(&mut o, 100), Some(Vec::new()), "a live delegation is vouched for");
    // Past lease and grace without a renewal: the tick proposes the expiry,
    // which has not applied when the next renewal arrives.
    let expiring = o.tick(&p, &s, 100 + 4_000).iter().any(|a| {
        matches!(a, Action::Propose(Command::Guarded { then, .. }) if matches!(then.as_slice(), [Command::Release { .. }]))
    });
    assert!(expiring);
    assert_eq!(untracked_in_ack(&mut o, 100 + 4_100), Some(vec![id.clone()]));
    // And the decision stands: the next tick proposes the expiry again.
    let again = o.tick(&p, &s, 100 + 4_700).iter().any(|a| matches!(a, Action::Propose(Command::Guarded { .. })));
    assert!(again, "a renewal must not undo an expiry already proposed");
}

/// An offer whose task name would leave an agent's directories is refused
/// like the HTTP path's checker refuses it (security review, row 10).
#[test]
fn an_offer_with_a_task_name_that_leaves_its_directory_is_refused() {
    let s = state(1, 8);
    let p = policy("eu-central", "eu-west");
    let mut t = Target::new(timing(3_000, 2_000), Plants::default(), 1);
    let mut j = job("trav", 1, "");
    j.groups[0].tasks[0].name = "../../../../tmp/TRAVERSED".into();
    let m = offer("eu-west/trav/e1-g-0", j, vec![0], 2_000);
    match outcomes(&t.on_message(&p, &s, "eu-west", m, 0)).as_slice() {
        [Outcome::Refused { message, .. }] => assert!(message.contains("not a valid task name"), "{message}"),
        other => panic!("accepted: {other:?}"),
    }
    // Nor may a task take the log directory's name, or name a local user.
    for (name, user, why) in [("logs", None, "not a valid task name"), ("t", Some("root"), "names a user")] {
        let mut j = job("trav", 1, "");
        j.groups[0].tasks[0].name = name.into();
        j.groups[0].tasks[0].driver = cluster_core::model::job::Driver::Exec {
            command: "/bin/true".into(),
            args: Vec::new(),
            env: Default::default(),
            user: user.map(str::to_string),
        };
        let m = offer(&format!("eu-west/trav/e1-g-{name}"), j, vec![0], 2_000);
        match outcomes(&t.on_message(&p, &s, "eu-west", m, 0)).as_slice() {
            [Outcome::Refused { message, .. }] => assert!(message.contains(why), "{message}"),
            other => panic!("accepted: {other:?}"),
        }
    }
}
