//! The nemesis: faults drawn from the seed, each held for a while and then
//! healed, one at a time or two overlapping. `kill -9` of a leader, a
//! follower or an agent (started again from its disk a few seconds
//! later); SIGSTOP and SIGCONT; partitions and one-way drops with
//! nftables; a process restarted with its wall clock skewed, and later
//! restarted on the true clock again (a jump back).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cluster_core::scheduler::Rng;
use serde_json::json;

use crate::history::History;
use crate::sleep_unless;
use crate::world::{CLUSTERS, Kind, Life, World};

#[derive(Clone, Debug)]
enum Fault {
    Kill {
        proc: usize,
        what: &'static str,
    },
    Pause {
        proc: usize,
    },
    /// Every node of a cluster cut from every node of the others.
    Isolate {
        cluster: usize,
    },
    /// A server cut from the rest of its cluster (servers and agents).
    CutServer {
        proc: usize,
    },
    /// An agent cut from its servers.
    CutAgent {
        proc: usize,
    },
    /// Packets from one server to another are dropped; back they go.
    OneWay {
        from: usize,
        to: usize,
    },
    /// Restarted with its wall clock off by `offset_s` seconds.
    Clock {
        proc: usize,
        offset_s: i64,
    },
}

impl Fault {
    /// The processes it acts on (none may be in two faults at once).
    fn procs(&self, world: &World) -> Vec<usize> {
        match self {
            Fault::Kill { proc, .. }
            | Fault::Pause { proc }
            | Fault::CutServer { proc }
            | Fault::CutAgent { proc }
            | Fault::Clock { proc, .. } => vec![*proc],
            Fault::OneWay { from, to } => vec![*from, *to],
            Fault::Isolate { cluster } => {
                let procs = world.procs.lock().unwrap();
                (0..procs.len()).filter(|i| procs[*i].cluster == *cluster).collect()
            }
        }
    }
}

pub struct Nemesis<'a> {
    world: &'a World,
    history: &'a History,
    /// Per active fault: the (from node, to node) pairs whose packets drop.
    blocks: Mutex<BTreeMap<u64, Vec<(usize, usize)>>>,
    /// What each node's rules drop now.
    applied: Mutex<BTreeMap<usize, BTreeSet<usize>>>,
    busy: Mutex<BTreeSet<usize>>,
    pub injected: AtomicU64,
    /// The longest a pause lasts.
    max_pause: Duration,
}

impl<'a> Nemesis<'a> {
    pub fn new(world: &'a World, history: &'a History, max_pause: Duration) -> Nemesis<'a> {
        Nemesis {
            world,
            history,
            blocks: Mutex::default(),
            applied: Mutex::default(),
            busy: Mutex::default(),
            injected: AtomicU64::new(0),
            max_pause,
        }
    }

    /// Injects faults until `stop`, then heals everything: partitions
    /// lifted, processes thawed, started again, and back on the true clock.
    pub fn run(&self, seed: u64, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut rng = Rng::new(seed ^ 0x00ba_d5ee_d000);
        let active = AtomicU64::new(0);
        std::thread::scope(|s| {
            let mut id = 0;
            while !stop.load(Ordering::Relaxed) && !crate::INTERRUPTED.load(Ordering::Relaxed) {
                sleep_unless(stop, Duration::from_millis(2000 + rng.below(5000) as u64));
                if stop.load(Ordering::Relaxed) || active.load(Ordering::Relaxed) >= 2 {
                    continue;
                }
                let Some(fault) = self.draw(&mut rng) else { continue };
                let hold = Duration::from_millis(match fault {
                    Fault::Pause { .. } => {
                        1000 + rng.below(self.max_pause.as_millis().max(1001) as usize - 1000) as u64
                    }
                    Fault::Kill { .. } => 1000 + rng.below(9000) as u64,
                    _ => 3000 + rng.below(17_000) as u64,
                });
                let procs = fault.procs(self.world);
                {
                    let mut busy = self.busy.lock().unwrap();
                    if procs.iter().any(|p| busy.contains(p)) {
                        continue;
                    }
                    busy.extend(procs.iter().copied());
                }
                id += 1;
                let this = id;
                active.fetch_add(1, Ordering::Relaxed);
                self.injected.fetch_add(1, Ordering::Relaxed);
                let active = &active;
                s.spawn(move || {
                    self.hold(this, &fault, hold, stop);
                    self.busy.lock().unwrap().retain(|p| !procs.contains(p));
                    active.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        self.blocks.lock().unwrap().clear();
        // Both, whatever the first says.
        let lifted = self.apply_blocks();
        let restarted = self.world.heal_processes();
        lifted.and(restarted)?;
        self.history.write(json!({ "t_ms": self.world.now_ms(), "nemesis": "healed everything" }));
        Ok(())
    }

    /// A fault on processes that run; `None` when the draw finds none to
    /// act on (the next turn draws again).
    fn draw(&self, rng: &mut Rng) -> Option<Fault> {
        let (servers, agents): (Vec<usize>, Vec<usize>) = {
            let procs = self.world.procs.lock().unwrap();
            let all: Vec<usize> = (0..procs.len()).filter(|i| procs[*i].life == Life::Running).collect();
            all.iter().partition(|i| matches!(procs[**i].kind, Kind::Server { .. }))
        };
        let pick = |rng: &mut Rng, from: &[usize]| (!from.is_empty()).then(|| from[rng.below(from.len())]);
        let all: Vec<usize> = servers.iter().chain(&agents).copied().collect();
        let cluster = rng.below(CLUSTERS.len());
        Some(match rng.below(100) {
            0..15 => match self.world.leader(cluster) {
                Some(proc) => Fault::Kill { proc, what: "leader" },
                None => Fault::Kill { proc: pick(rng, &servers)?, what: "server" },
            },
            15..25 => {
                let leader = self.world.leader(cluster);
                let procs = self.world.procs.lock().unwrap();
                let followers: Vec<usize> =
                    servers.iter().copied().filter(|i| procs[*i].cluster == cluster && Some(*i) != leader).collect();
                drop(procs);
                Fault::Kill { proc: pick(rng, &followers)?, what: "follower" }
            }
            25..37 => Fault::Kill { proc: pick(rng, &agents)?, what: "agent" },
            37..50 => Fault::Pause { proc: pick(rng, &all)? },
            50..60 => Fault::Isolate { cluster },
            60..70 => Fault::CutServer { proc: pick(rng, &servers)? },
            70..80 => Fault::CutAgent { proc: pick(rng, &agents)? },
            80..88 => {
                let from = pick(rng, &servers)?;
                let others: Vec<usize> = servers.iter().copied().filter(|s| *s != from).collect();
                Fault::OneWay { from, to: pick(rng, &others)? }
            }
            _ => {
                let offset_s = (10 + rng.below(290) as i64) * if rng.below(2) == 0 { 1 } else { -1 };
                Fault::Clock { proc: pick(rng, &all)?, offset_s }
            }
        })
    }

    /// Applies `fault`, holds it for `hold` (or until `stop`), heals it.
    fn hold(&self, id: u64, fault: &Fault, hold: Duration, stop: &AtomicBool) {
        let name = |i: usize| self.world.procs.lock().unwrap()[i].name.clone();
        let node = |i: usize| self.world.procs.lock().unwrap()[i].node;
        let describe = match fault {
            Fault::Kill { proc, what } => format!("kill -9 {what} {}", name(*proc)),
            Fault::Pause { proc } => format!("SIGSTOP {}", name(*proc)),
            Fault::Isolate { cluster } => format!("partition {} from the federation", CLUSTERS[*cluster].0),
            Fault::CutServer { proc } => format!("partition {} from its cluster", name(*proc)),
            Fault::CutAgent { proc } => format!("partition agent {} from its servers", name(*proc)),
            Fault::OneWay { from, to } => format!("drop packets {} -> {}", name(*from), name(*to)),
            Fault::Clock { proc, offset_s } => format!("restart {} with its clock {offset_s:+} s off", name(*proc)),
        };
        let started = Instant::now();
        self.history.write(
            json!({ "t_ms": self.world.now_ms(), "fault": describe, "id": id, "hold_ms": hold.as_millis() as u64 }),
        );
        let mut failed = None;
        match fault {
            Fault::Kill { proc, .. } => self.world.kill(*proc),
            Fault::Pause { proc } => self.world.freeze(*proc, true),
            Fault::Clock { proc, offset_s } => {
                failed = self.world.restart(*proc, Some(format!("{offset_s:+}"))).err();
            }
            Fault::Isolate { .. } | Fault::CutServer { .. } | Fault::CutAgent { .. } | Fault::OneWay { .. } => {
                let pairs = self.pairs(fault, &node);
                self.blocks.lock().unwrap().insert(id, pairs);
                failed = self.apply_blocks().err();
            }
        }
        if let Some(e) = failed {
            self.history.write(json!({ "t_ms": self.world.now_ms(), "fault_error": format!("{e:#}"), "id": id }));
        }
        sleep_unless(stop, hold.saturating_sub(started.elapsed()));
        let healed = match fault {
            Fault::Kill { proc, .. } => self.world.restart(*proc, None),
            Fault::Pause { proc } => {
                self.world.freeze(*proc, false);
                Ok(())
            }
            Fault::Clock { proc, .. } => self.world.restart(*proc, None),
            _ => {
                self.blocks.lock().unwrap().remove(&id);
                self.apply_blocks()
            }
        };
        let mut event = json!({ "t_ms": self.world.now_ms(), "healed": describe, "id": id });
        if let Err(e) = healed {
            event["error"] = json!(format!("{e:#}"));
        }
        self.history.write(event);
    }

    /// The (from node, to node) pairs a partition drops.
    fn pairs(&self, fault: &Fault, node: &dyn Fn(usize) -> usize) -> Vec<(usize, usize)> {
        let procs: Vec<(usize, usize, Kind)> =
            self.world.procs.lock().unwrap().iter().map(|p| (p.node, p.cluster, p.kind)).collect();
        let both = |a: usize, b: usize| [(a, b), (b, a)];
        match fault {
            Fault::Isolate { cluster } => {
                let inside: Vec<usize> = procs.iter().filter(|p| p.1 == *cluster).map(|p| p.0).collect();
                let outside: Vec<usize> = procs.iter().filter(|p| p.1 != *cluster).map(|p| p.0).collect();
                inside.iter().flat_map(|a| outside.iter().flat_map(move |b| both(*a, *b))).collect()
            }
            Fault::CutServer { proc } => {
                let (me, cluster) = (node(*proc), procs.iter().find(|p| p.0 == node(*proc)).map_or(0, |p| p.1));
                procs.iter().filter(|p| p.1 == cluster && p.0 != me).flat_map(|p| both(me, p.0)).collect()
            }
            Fault::CutAgent { proc } => {
                let (me, cluster) = (node(*proc), procs.iter().find(|p| p.0 == node(*proc)).map_or(0, |p| p.1));
                (procs.iter())
                    .filter(|p| p.1 == cluster && matches!(p.2, Kind::Server { .. }))
                    .flat_map(|p| both(me, p.0))
                    .collect()
            }
            Fault::OneWay { from, to } => vec![(node(*from), node(*to))],
            _ => Vec::new(),
        }
    }

    /// Writes every node's rules whose set of dropped sources changed.
    /// One fault at a time: what is read and what is written stay one
    /// (two faults healing at once must not write a stale set last).
    fn apply_blocks(&self) -> anyhow::Result<()> {
        let mut applied = self.applied.lock().unwrap();
        let mut want: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        for (from, to) in self.blocks.lock().unwrap().values().flatten() {
            want.entry(*to).or_default().insert(*from);
        }
        let nodes: BTreeSet<usize> = want.keys().chain(applied.keys()).copied().collect();
        for n in nodes {
            let next = want.get(&n).cloned().unwrap_or_default();
            if applied.get(&n).cloned().unwrap_or_default() != next {
                self.world.net.block(n, &next)?;
                applied.insert(n, next);
            }
        }
        Ok(())
    }
}
