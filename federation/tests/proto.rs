//! The delegation cores alone (pure: no socket, no clock): what a shell
//! cannot see from outside, the bounds a lease, a grace and a batch of
//! offers keep.

use cluster_core::command::Command;
use cluster_core::diag::SourceFile;
use cluster_core::model::AllocStatus;
use cluster_core::model::Job;
use cluster_core::model::alloc::AllocReport;
use cluster_core::spec::parse_job;
use cluster_core::state::ClusterState;
use federation::delegation::Rejection;
use federation::local::nodes_in;
use federation::policy::{Policy, parse_policy};
use federation::proto::origin::{Origin, Overflowing};
use federation::proto::target::Target;
use federation::proto::{
    Action, DelegationId, Floor, Message, Outcome, Plants, Timing, ToOrigin, ToTarget, inbound_key,
};

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
    Timing { lease_ms, grace_ms, renew_every_ms: 1_000, retry_ms: 500, collect_every_ms: 1_000 }
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
    let work = Overflowing {
        eval: 1,
        job: j,
        group: "g".into(),
        indices: vec![1, 2, 3],
        remote: 0,
        refused_by: Default::default(),
    };
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
    for (n, name, user, why) in [(1, "logs", None, "not a valid task name"), (2, "t", Some("root"), "names a user")] {
        let mut j = job("trav", 1, "");
        j.groups[0].tasks[0].name = name.into();
        j.groups[0].tasks[0].driver = cluster_core::model::job::Driver::Exec {
            command: "/bin/true".into(),
            args: Vec::new(),
            env: Default::default(),
            user: user.map(str::to_string),
        };
        let m = offer(&format!("eu-west/trav/e1-g-{n}"), j, vec![0], 2_000);
        match outcomes(&t.on_message(&p, &s, "eu-west", m, 0)).as_slice() {
            [Outcome::Refused { message, .. }] => assert!(message.contains(why), "{message}"),
            other => panic!("accepted: {other:?}"),
        }
    }
}

/// Applies the commands among `actions`, as a shell does once they commit.
fn commit(s: &mut ClusterState, actions: &[Action]) {
    for a in actions {
        if let Action::Propose(c) | Action::ProposeThenSend { command: c, .. } = a {
            s.apply(c);
        }
    }
}

/// Plans every pending evaluation, as a leader's workers would.
fn settle(s: &mut ClusterState) {
    let pending: Vec<_> = s.pending_evals().collect();
    for e in pending {
        let job = s.job(&s.eval(e).unwrap().job).unwrap().clone();
        let plan = cluster_core::scheduler::schedule(s, &job, &Default::default());
        s.apply(&Command::ApplyPlans(vec![(e, plan)]));
    }
}

#[test]
fn delegation_ids_name_their_evaluation_and_attempt() {
    let d = DelegationId::parse("eu-west/web/e12-g-3").unwrap();
    assert_eq!((d.origin, d.eval, d.base, d.attempt), ("eu-west", 12, "eu-west/web/e12-g-3", 1));
    // A group name may hold dashes, digits and `a`s.
    let d = DelegationId::parse("eu-west/web/e7-api-a2-0-4-a13").unwrap();
    assert_eq!((d.eval, d.base, d.attempt), (7, "eu-west/web/e7-api-a2-0-4", 13));
    for bad in [
        "",
        "eu-west",
        "eu-west/web/x7-g-0",
        "eu-west/web/e-g-0",
        "eu-west/web/e7-g-x",
        "eu-west/web/e7-g-0-a",
        "/web/e7-g-0",
    ] {
        assert_eq!(DelegationId::parse(bad), None, "{bad}");
    }
}

/// The tombstone of a refused offer goes once the origin's floor covers
/// it, and the floor refuses the late re-offer in its place, without a
/// record: even now that the target has room for it. What the origin still
/// has pending is never covered.
#[test]
fn a_late_offer_is_refused_after_its_tombstone_is_collected() {
    let mut s = ClusterState::new();
    let p = policy("eu-central", "eu-west");
    let mut t = Target::new(timing(3_000, 2_000), Plants::default(), 1);
    let offer_of = |id: &str| offer(id, job("j", 1, ""), vec![0], 2_000);
    let floor = |floor, pending: &[&str]| {
        ToTarget::Floor(Floor { incarnation: 1, floor, pending: pending.iter().map(|p| p.to_string()).collect() })
    };
    let actions = t.on_message(&p, &s, "eu-west", offer_of("eu-west/j/e3-g-0"), 0);
    assert!(matches!(outcomes(&actions).as_slice(), [Outcome::Refused { .. }]), "no node here");
    commit(&mut s, &actions);
    assert!(s.record(&inbound_key("eu-west/j/e3-g-0")).is_some(), "a tombstone");
    for node in nodes_in("eu", "n", 2, 8) {
        s.apply(&Command::UpsertNode(node));
    }
    // A floor at its sequence does not cover it, nor one that names it
    // pending; one past it does.
    for f in [floor(3, &[]), floor(9, &["eu-west/j/e3-g-0"])] {
        let actions = t.on_message(&p, &s, "eu-west", f, 1_000);
        assert!(actions.is_empty(), "{actions:?}");
    }
    let actions = t.on_message(&p, &s, "eu-west", floor(9, &["eu-west/j/e5-g-0"]), 2_000);
    commit(&mut s, &actions);
    assert!(s.record(&inbound_key("eu-west/j/e3-g-0")).is_none(), "collected under the floor");
    assert_eq!(Target::floor(&s, "eu-west").0.floor, 9);
    // A floor not above the committed one is not committed (a late one
    // would name as pending what has ended since); nor does a higher one
    // uncover what the committed one covers (the origin may have
    // collected it, and lost track).
    let actions = t.on_message(&p, &s, "eu-west", floor(9, &["eu-west/j/e3-g-0"]), 3_000);
    assert!(actions.is_empty(), "{actions:?}");
    let refused = offer("eu-west/j/e7-g-0", job("j", 1, "on_disconnect = \"stop\""), vec![0], 2_000);
    let actions = t.on_message(&p, &s, "eu-west", refused, 3_100);
    assert!(matches!(outcomes(&actions).as_slice(), [Outcome::Refused { .. }]), "its kill timeout is too long");
    commit(&mut s, &actions);
    let actions = t.on_message(&p, &s, "eu-west", floor(12, &["eu-west/j/e3-g-0", "eu-west/j/e5-g-0"]), 3_200);
    commit(&mut s, &actions);
    assert_eq!(Target::floor(&s, "eu-west").0.pending, vec!["eu-west/j/e5-g-0".to_string()]);
    assert!(s.record(&inbound_key("eu-west/j/e7-g-0")).is_none());
    let actions = t.on_message(&p, &s, "eu-west", offer_of("eu-west/j/e3-g-0"), 4_000);
    match outcomes(&actions).as_slice() {
        [Outcome::Refused { message, .. }] => assert!(message.contains("older than"), "{message}"),
        other => panic!("a late offer was taken: {other:?}"),
    }
    assert!(actions.iter().all(|a| matches!(a, Action::Send { .. })), "refused by the floor, nothing to commit");
    // What the origin named pending below the floor may still arrive.
    let actions = t.on_message(&p, &s, "eu-west", offer_of("eu-west/j/e5-g-0"), 4_000);
    assert!(matches!(outcomes(&actions).as_slice(), [Outcome::Registered { .. }]));
    // An origin rebuilt on empty disks is a new incarnation: its floor
    // replaces the old one, however low.
    let rebuilt = ToTarget::Floor(Floor { incarnation: 2, floor: 1, pending: Vec::new() });
    let actions = t.on_message(&p, &s, "eu-west", rebuilt, 5_000);
    commit(&mut s, &actions);
    let (committed, _) = Target::floor(&s, "eu-west");
    assert_eq!((committed.incarnation, committed.floor), (2, 1));
    // Another origin's floor is its own.
    let p2 = policy("eu-central", "us-east");
    let other = offer("us-east/k/e3-g-0", job("k", 1, ""), vec![0], 2_000);
    assert!(matches!(
        outcomes(&t.on_message(&p2, &s, "us-east", other, 4_000)).as_slice(),
        [Outcome::Registered { .. }]
    ));
}

/// A revoked delegation's tombstone stays while anything of it is alive,
/// floor or not: a revocation asked again must hear the truth, not the
/// floor's "nothing alive".
#[test]
fn a_revoked_tombstone_stays_while_its_work_is_alive() {
    let mut s = state(2, 8);
    let p = policy("eu-central", "eu-west");
    let mut t = Target::new(timing(3_000, 2_000), Plants::default(), 1);
    let id = "eu-west/j/e3-g-0";
    let actions = t.on_message(&p, &s, "eu-west", offer(id, job("j", 1, ""), vec![0], 2_000), 0);
    commit(&mut s, &actions);
    t.tick(&s, 100);
    settle(&mut s);
    let actions = t.on_message(&p, &s, "eu-west", ToTarget::Revoke { id: id.into() }, 1_000);
    commit(&mut s, &actions);
    settle(&mut s);
    let job_id = federation::protocol::target_job_id(id);
    assert_eq!(federation::proto::target::alive(&s, &job_id), 1, "stopping, not yet stopped");
    let actions = t.on_message(
        &p,
        &s,
        "eu-west",
        ToTarget::Floor(Floor { incarnation: 1, floor: 9, pending: Vec::new() }),
        2_000,
    );
    assert!(actions.is_empty(), "{actions:?}");
    let ids: Vec<_> = s.allocs_of_job(&job_id.as_str().into()).map(|a| a.id).collect();
    let reports = ids.into_iter().map(|id| AllocReport::status(id, AllocStatus::Complete));
    s.apply(&Command::AllocStatus(reports.collect()));
    // Once it ended, the same floor (not above: not committed again) lets
    // it go.
    let actions = t.on_message(
        &p,
        &s,
        "eu-west",
        ToTarget::Floor(Floor { incarnation: 1, floor: 9, pending: Vec::new() }),
        3_000,
    );
    commit(&mut s, &actions);
    assert!(s.record(&inbound_key(id)).is_none());
    let asked_again = t.on_message(&p, &s, "eu-west", ToTarget::Revoke { id: id.into() }, 4_000);
    assert!(matches!(
        asked_again.as_slice(),
        [Action::Send { message: Message::ToOrigin(ToOrigin::Revoked { alive: 0, .. }), .. }]
    ));
}

/// A target that runs nothing for an origin but keeps tombstones its
/// floor does not cover yet still renews, every lease, naming nothing, to
/// hear the floor; once they are covered it keeps quiet.
#[test]
fn a_target_with_uncovered_tombstones_asks_for_the_floor() {
    let mut s = ClusterState::new();
    let p = policy("eu-central", "eu-west");
    let mut t = Target::new(timing(3_000, 2_000), Plants::default(), 1);
    let renewals = |t: &mut Target, s: &ClusterState, now| {
        (t.tick(s, now).into_iter())
            .filter(|a| matches!(a, Action::Send { message: Message::ToOrigin(ToOrigin::Renew { delegations, .. }), .. } if delegations.is_empty()))
            .count()
    };
    assert_eq!(renewals(&mut t, &s, 0), 0);
    let actions = t.on_message(&p, &s, "eu-west", offer("eu-west/j/e3-g-0", job("j", 1, ""), vec![0], 2_000), 0);
    commit(&mut s, &actions);
    assert_eq!(renewals(&mut t, &s, 100), 1);
    assert_eq!(renewals(&mut t, &s, 1_200), 0, "not at the renewal interval: every lease");
    assert_eq!(renewals(&mut t, &s, 3_100), 1);
    let floor = ToTarget::Floor(Floor { incarnation: 1, floor: 4, pending: Vec::new() });
    let actions = t.on_message(&p, &s, "eu-west", floor, 3_200);
    commit(&mut s, &actions);
    assert_eq!(renewals(&mut t, &s, 6_200), 0, "covered: nothing to ask");
}

/// The origin answers a renewal with its floor when the floor changed
/// since it last sent one there, or a lease later; an empty renewal (a
/// target asking for it) does not put its expiries off.
#[test]
fn an_origin_answers_renewals_with_its_floor_when_it_changed() {
    let (s, p, mut o) = delegated();
    let floors = |o: &mut Origin, now| {
        let renew = ToOrigin::Renew { session: 1, seq: 0, delegations: Vec::new() };
        (o.on_message(&s, "eu-central", renew, now).into_iter())
            .filter(|a| matches!(a, Action::Send { message: Message::ToTarget(ToTarget::Floor(_)), .. }))
            .count()
    };
    assert_eq!(floors(&mut o, 10), 1);
    assert_eq!(floors(&mut o, 1_000), 0, "unchanged");
    o.tick(&p, &s, 3_100);
    assert_eq!(floors(&mut o, 3_100), 1, "a lease later");
    // Offered at 0 under a 3 s lease and 1 s grace: it expires at 4 s,
    // renewals naming nothing or not.
    floors(&mut o, 3_900);
    let expiring = o.tick(&p, &s, 4_000).iter().any(|a| {
        matches!(a, Action::Propose(Command::Guarded { then, .. }) if matches!(then.as_slice(), [Command::Release { .. }]))
    });
    assert!(expiring, "an empty renewal put the expiry off");
}

/// The origin's side: its floor names what it still offers, tracks or
/// revokes, including a delegation whose record has not applied yet; an
/// ended delegation's record goes at the second collection pass that finds
/// it (so `job status` shows it for an interval); the same instances are
/// delegated again under a new id; every renewal's answer carries the floor.
#[test]
fn the_floor_names_what_is_pending_and_ended_delegations_are_collected() {
    let mut s = state(1, 1);
    let p = policy("eu-west", "eu-central");
    let j = job("big", 4, "");
    s.apply(&Command::RegisterJob(j.clone()));
    settle(&mut s);
    let mut o = Origin::new("eu-west", timing(3_000, 1_000), Plants::default(), 0);
    let work = Origin::overflow(&s, 0).pop().expect("3 instances overflow");
    let proposed = o.delegate(&p, &s, &work, "eu-central", 0);
    let id = format!("eu-west/big/e{}-g-1", s.next_eval_id());
    let floor = |o: &Origin, s: &ClusterState, target| match o.floor(s, target) {
        Floor { incarnation: 0, floor, pending } => (floor, pending),
        other => panic!("{other:?}"),
    };
    assert_eq!(floor(&o, &s, "eu-central"), (s.next_eval_id(), vec![id.clone()]), "in flight: pending");
    assert_eq!(floor(&o, &s, "us-east").1, vec![id.clone()], "in flight: pending to every target");
    commit(&mut s, &proposed);
    o.tick(&p, &s, 1);
    assert_eq!(floor(&o, &s, "eu-central").1, vec![id.clone()], "offered: pending");
    assert_eq!(floor(&o, &s, "us-east").1, Vec::<String>::new(), "applied: pending to its target only");
    let outcome = Outcome::Refused { reason: Rejection::NoCapacity, message: "full".into() };
    let actions = o.on_message(&s, "eu-central", ToOrigin::Outcome { id: id.clone(), outcome }, 10);
    commit(&mut s, &actions);
    let (sequence, pending) = floor(&o, &s, "eu-central");
    assert!(pending.is_empty() && sequence > DelegationId::parse(&id).unwrap().eval, "ended: covered");
    let drops = |o: &mut Origin, s: &ClusterState, now| {
        o.tick(&p, s, now).into_iter().find_map(|a| match a {
            Action::Propose(Command::DropRecords(r)) => Some(r.into_iter().map(|(k, _)| k).collect::<Vec<_>>()),
            _ => None,
        })
    };
    assert_eq!(drops(&mut o, &s, 2_000), None, "the first pass only sees it");
    assert_eq!(drops(&mut o, &s, 2_500), None, "not before the interval");
    assert_eq!(drops(&mut o, &s, 3_000), Some(vec![format!("delegation/{id}")]));
    settle(&mut s);
    let again = Origin::overflow(&s, 0).pop().expect("released: overflowing again");
    let proposed = o.delegate(&p, &s, &again, "eu-central", 3_100);
    commit(&mut s, &proposed);
    let ids: Vec<String> = Origin::records(&s).into_iter().map(|(r, _)| r.id).collect();
    assert!(ids.len() == 2 && ids.iter().all(|i| DelegationId::parse(i).unwrap().attempt == 1), "{ids:?}");
    let renew = ToOrigin::Renew { session: 1, seq: 0, delegations: Vec::new() };
    let sent = o.on_message(&s, "eu-central", renew, 3_200).into_iter().find_map(|a| match a {
        Action::Send { message: Message::ToTarget(ToTarget::Floor(f)), .. } => Some(f),
        _ => None,
    });
    assert_eq!(sent, Some(o.floor(&s, "eu-central")));
}

/// A delegated instance that failed and waits for its reschedule delay is
/// reported `Rescheduling` (the origin does not count it stuck); past its
/// limit, `Failed`. An offer whose reschedule policy is past what a spec
/// may say is refused.
#[test]
fn a_failed_delegated_instance_waiting_for_its_delay_is_rescheduling_not_stuck() {
    use federation::proto::IndexState;
    use federation::proto::target::{Target as T, progress};
    let mut s = state(1, 8);
    let p = policy("eu-central", "eu-west");
    let mut t = Target::new(timing(3_000, 2_000), Plants::default(), 1);
    let mut greedy = job("greedy", 1, "");
    greedy.groups[0].reschedule.attempts = u32::MAX;
    match outcomes(&t.on_message(&p, &s, "eu-west", offer("eu-west/greedy/e1-g-0", greedy, vec![0], 2_000), 0))
        .as_slice()
    {
        [Outcome::Refused { message, .. }] => assert!(message.contains("reschedule policy"), "{message}"),
        other => panic!("accepted: {other:?}"),
    }
    let flaky = job("flaky", 1, "[group.reschedule]\nattempts = 1\ninterval = \"1h\"\ndelay = \"30s\"\n");
    let actions = t.on_message(&p, &s, "eu-west", offer("eu-west/flaky/e1-g-0", flaky, vec![7], 2_000), 0);
    assert!(matches!(outcomes(&actions).as_slice(), [Outcome::Registered { .. }]), "{:?}", outcomes(&actions));
    commit(&mut s, &actions);
    settle(&mut s);
    let r = T::records(&s).into_iter().map(|(r, _)| r).find(|r| r.id == "eu-west/flaky/e1-g-0").unwrap();
    let fail = |s: &mut ClusterState, at: u64| {
        let live: Vec<_> = s.allocs_of_job(&cluster_core::ids::JobId::new(&r.job)).filter(|a| a.is_live()).collect();
        let reports = live.iter().map(|a| AllocReport::status(a.id, AllocStatus::Failed)).collect();
        s.apply(&Command::AllocReports { now_ms: at, reports });
    };
    fail(&mut s, 1_000_000);
    let job = s.job(&cluster_core::ids::JobId::new(&r.job)).unwrap().clone();
    let plan_at = |s: &mut ClusterState, now: u64| {
        let config = cluster_core::scheduler::SchedulerConfig { now_ms: Some(now), ..Default::default() };
        let eval = s.pending_evals().next().unwrap();
        s.apply(&Command::ApplyPlans(vec![(eval, cluster_core::scheduler::schedule(s, &job, &config))]));
    };
    plan_at(&mut s, 1_000_010);
    assert_eq!(progress(&s, &r).indices, vec![(7, IndexState::Rescheduling)], "its evaluation waits 30 s");
    // Placed again after the delay, it fails again: one an hour, final.
    plan_at(&mut s, 1_030_000);
    assert_eq!(progress(&s, &r).indices, vec![(7, IndexState::Pending)], "placed again, not yet running");
    fail(&mut s, 1_040_000);
    assert_eq!(progress(&s, &r).indices, vec![(7, IndexState::Failed)]);
}
